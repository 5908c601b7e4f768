//! `twin-server model …`: make a seeded random-weight checkpoint (for trying twin without a
//! download) and describe a checkpoint directory.

use std::path::Path;

use anyhow::Context;
use clap::ValueEnum;
use twin_ml::clip::{ClipConfig, ClipModel};
use twin_ml::tch::Device;

/// Sizes `init-clip` can make.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ClipPreset {
    /// 32×32 images, 2 layers of width 32: instant, for tests.
    Tiny,
    /// The size of openai/clip-vit-base-patch32 (88M parameters in the image tower).
    B32,
    /// The size of openai/clip-vit-large-patch14.
    L14,
}

/// Writes a `CLIPVisionModelWithProjection` checkpoint with seeded random weights to `dir`;
/// returns its weights hash. Its embeddings carry colour and layout, not semantics: good enough
/// to exercise mining end to end, not to mine real hard negatives.
pub fn init_clip(dir: &Path, preset: ClipPreset, seed: u64) -> anyhow::Result<String> {
    let config = match preset {
        ClipPreset::Tiny => ClipConfig::tiny(),
        ClipPreset::B32 => ClipConfig::vit_b32(),
        ClipPreset::L14 => ClipConfig::vit_l14(),
    }
    .vision_only();
    let model = ClipModel::init_random(config, seed, Device::Cpu)?;
    model
        .save_pretrained(dir)
        .with_context(|| format!("writing {}", dir.display()))
}

/// A summary of a checkpoint directory: architecture, sizes, parameter count, weights hash.
pub fn info(dir: &Path) -> anyhow::Result<serde_json::Value> {
    let model = ClipModel::load(dir, Device::Cpu)?;
    let c = model.config();
    // Counted from the checkpoint's headers: what the file holds, both towers included.
    let checkpoint = twin_ml::weights::Checkpoint::open(dir)?;
    let params: i64 = checkpoint
        .tensor_names()
        .filter_map(|n| checkpoint.tensor(n))
        .map(|t| t.shape.iter().product::<i64>())
        .sum();
    Ok(serde_json::json!({
        "architecture": c.architecture.hf_name(),
        "image_size": c.vision.image_size,
        "patch_size": c.vision.patch_size,
        "vision_layers": c.vision.num_hidden_layers,
        "vision_width": c.vision.hidden_size,
        "text_tower": c.text.is_some(),
        "embedding_dim": model.embedding_dim(),
        "parameters": params,
        "bytes_f32": params * 4,
        "bytes_bf16": params * 2,
        "weights_hash": model.weights_hash(),
        "device": twin_ml::device::describe(),
    }))
}
