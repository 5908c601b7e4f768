//! Host-side bindings generated from `wasm-sdk/wit/plugin.wit`, one module per world.

/// A module exporting the `reward` world.
pub mod reward {
    wasmtime::component::bindgen!({
        path: "../../wasm-sdk/wit",
        world: "reward",
    });
}

/// A module exporting the `filter` world. Shared records come from the reward bindings, so one
/// set of conversions serves both.
pub mod filter {
    wasmtime::component::bindgen!({
        path: "../../wasm-sdk/wit",
        world: "filter",
        with: { "twin:plugin/types": crate::bindings::reward::twin::plugin::types },
    });
}

/// The `lookup` capability's import, for modules built against `reward-with-lookup`. Trappable,
/// so that the host can end a call that makes too many lookups.
pub mod lookup {
    wasmtime::component::bindgen!({
        path: "../../wasm-sdk/wit",
        world: "reward-with-lookup",
        imports: { "twin:plugin/lookup.get": trappable },
        with: { "twin:plugin/types": crate::bindings::reward::twin::plugin::types },
    });
}
