//! Host-side bindings generated from `wasm-sdk/wit/plugin.wit`, one module per world.

/// A module exporting the `reward` world.
pub mod reward {
    wasmtime::component::bindgen!({
        path: "../../wasm-sdk/wit",
        world: "reward",
    });
}

/// A module exporting the `filter` world.
pub mod filter {
    wasmtime::component::bindgen!({
        path: "../../wasm-sdk/wit",
        world: "filter",
    });
}

/// The `lookup` capability's import, for modules built against `reward-with-lookup`.
pub mod lookup {
    wasmtime::component::bindgen!({
        path: "../../wasm-sdk/wit",
        world: "reward-with-lookup",
    });
}
