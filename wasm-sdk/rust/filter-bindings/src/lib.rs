//! Generated bindings of the `filter` world. They live in their own crate because wit-bindgen
//! names its export macros after interfaces, and the reward and filter worlds share `module`.
#![allow(unsafe_code)]

wit_bindgen::generate!({
    path: "../../wit",
    world: "filter",
    pub_export_macro: true,
    export_macro_name: "__export_filter_world",
    default_bindings_module: "twin_guest::filter_world",
});
