//! twin's data recipe without a model: procedural sample images (`synth`), import of the public
//! TWIN and FGVQA parquet layouts (`import`), and building TWIN pair/multi datasets from
//! instances and hard negatives, with their JSONL and parquet exports (`build`, `export`), and the one size-capped decode of untrusted images (`decode`).

pub mod build;
pub mod decode;
pub mod export;
pub mod import;
pub mod prompts;
pub mod synth;
