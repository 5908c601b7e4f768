//! `twin-executor model …`: make a seeded random-weight checkpoint (for trying twin without a
//! download), describe a checkpoint directory (CLIP or Qwen2.5-VL), and generate from a
//! Qwen2.5-VL one.

use std::path::Path;

use anyhow::Context;
use clap::ValueEnum;
use twin_ml::clip::{ClipConfig, ClipModel};
use twin_ml::qwen::{
    EngineOptions, GenerationRequest, Message, QwenAssets, QwenPreprocessor, QwenTokenizer, QwenVl,
    QwenVlConfig, SamplingParams,
};
use twin_ml::tch::{Device, Kind};

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

/// Sizes `init-qwen` can make.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum QwenPreset {
    /// Width 32, 2 decoder layers, vision depth 4: instant, for tests and the demo.
    Tiny,
    /// Width 512, 8 layers, vision depth 4 (105M parameters): the CPU benchmark's shape.
    Small,
    /// The shape of Qwen2.5-VL-3B-Instruct (3.75B parameters).
    #[value(name = "3b")]
    B3,
}

/// Writes a Qwen2.5-VL checkpoint with seeded random weights to `dir` — config, weights,
/// preprocessor config and a byte-level tokenizer carrying Qwen's special tokens — so the
/// generation and eval paths can run without a download. It writes text, not answers.
pub fn init_qwen(dir: &Path, preset: QwenPreset, seed: u64) -> anyhow::Result<String> {
    let config = match preset {
        QwenPreset::Tiny => QwenVlConfig::tiny(),
        QwenPreset::Small => QwenVlConfig::bench_small(),
        QwenPreset::B3 => QwenVlConfig::qwen2_5_vl_3b(),
    };
    // Larger-than-default weights give the random model peaked distributions, so its greedy
    // output is not one token repeated.
    let model = QwenVl::init_random_scaled(config, seed, Device::Cpu, Kind::Float, 25.0)?;
    // At most 512×512 pixels per image (256 merged tokens), like TWIN's training images.
    let preprocessor = QwenPreprocessor {
        max_pixels: 512 * 512,
        ..QwenPreprocessor::default()
    };
    let hash = model
        .save_pretrained(dir, &preprocessor)
        .with_context(|| format!("writing {}", dir.display()))?;
    QwenTokenizer::byte_level()?.save(dir)?;
    Ok(hash)
}

/// Whether `dir`'s config declares Qwen2.5-VL.
fn is_qwen(dir: &Path) -> bool {
    twin_ml::weights::read_json(&dir.join("config.json"))
        .map(|c| {
            c["architectures"]
                .as_array()
                .is_some_and(|a| a.iter().any(|n| n == twin_ml::qwen::config::ARCHITECTURE))
                || c["model_type"] == "qwen2_5_vl"
        })
        .unwrap_or(false)
}

/// A summary of a checkpoint directory: architecture, sizes, parameter count (by part for
/// Qwen2.5-VL), weights hash, and the memory the weights take.
pub fn info(dir: &Path) -> anyhow::Result<serde_json::Value> {
    if is_qwen(dir) {
        return qwen_info(dir);
    }
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

fn qwen_info(dir: &Path) -> anyhow::Result<serde_json::Value> {
    let model = QwenVl::load(dir, Device::Cpu)?;
    let c = model.config();
    let counts = model.parameter_counts();
    let total = counts.total();
    let checkpoint = twin_ml::weights::Checkpoint::open(dir)?;
    let dtypes: std::collections::BTreeSet<String> = checkpoint
        .tensor_names()
        .filter_map(|n| checkpoint.tensor(n))
        .map(|t| format!("{:?}", t.dtype))
        .collect();
    // A decode step's key/value cache per sequence and token: two tensors per layer.
    let kv_per_token_bf16 =
        2 * c.text.num_hidden_layers * c.text.num_key_value_heads * c.text.head_dim() * 2;
    let assets = QwenAssets::load(dir, c);
    Ok(serde_json::json!({
        "architecture": twin_ml::qwen::config::ARCHITECTURE,
        "parameters": {
            "vision": counts.vision,
            "embedding": counts.embedding,
            "decoder": counts.decoder,
            "lm_head": counts.lm_head,
            "total": total,
        },
        "tied_embeddings": c.tie_word_embeddings,
        "checkpoint_dtypes": dtypes,
        "text": {
            "hidden_size": c.text.hidden_size,
            "layers": c.text.num_hidden_layers,
            "heads": c.text.num_attention_heads,
            "kv_heads": c.text.num_key_value_heads,
            "vocab_size": c.text.vocab_size,
            "max_position_embeddings": c.text.max_position_embeddings,
            "mrope_section": c.text.mrope_section,
        },
        "vision": {
            "hidden_size": c.vision.hidden_size,
            "depth": c.vision.depth,
            "window_size": c.vision.window_size,
            "fullatt_block_indexes": c.vision.fullatt_block_indexes,
            "patch_size": c.vision.patch_size,
        },
        "memory": {
            "weights_bf16_bytes": total * 2,
            "weights_f32_bytes": total * 4,
            "kv_cache_bf16_bytes_per_token": kv_per_token_bf16,
        },
        "tokenizer": assets.as_ref().map(|a| a.tokenizer.inner().get_vocab_size(true)).ok(),
        "chat_template": match &assets {
            Ok(a) if a.processor.template.is_builtin() => "built-in Qwen2.5-VL format",
            Ok(_) => "the checkpoint's",
            Err(_) => "unavailable",
        },
        "weights_hash": model.weights_hash(),
        "device": twin_ml::device::describe(),
    }))
}

/// What `model generate` was asked.
#[derive(Debug, Clone)]
pub struct GenerateArgs {
    pub images: Vec<std::path::PathBuf>,
    pub prompt: String,
    pub system: Option<String>,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub samples: usize,
    pub seed: u64,
    pub device: twin_ml::DeviceRequest,
}

/// One chat turn with images through a Qwen2.5-VL checkpoint: the completions (text, tokens,
/// log-probabilities) and how long each phase took.
pub fn generate(dir: &Path, args: &GenerateArgs) -> anyhow::Result<serde_json::Value> {
    let device = twin_ml::device::select(args.device)?;
    let model = QwenVl::load(dir, device)?;
    let assets = QwenAssets::load(dir, model.config())?;
    let images = args
        .images
        .iter()
        .map(|p| {
            image::open(p)
                .with_context(|| format!("reading image {}", p.display()))
                .map(|i| (p.display().to_string(), i))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let named: Vec<(&str, &image::DynamicImage)> =
        images.iter().map(|(n, i)| (n.as_str(), i)).collect();
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(Message::system(system.clone()));
    }
    messages.push(Message::user_with_images(images.len(), args.prompt.clone()));
    let prompt = assets
        .processor
        .prepare(&assets.tokenizer, &messages, &named, true)?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        max_new_tokens: args.max_new_tokens,
        stop_token_ids: assets.stop_tokens(model.config()),
        seed: args.seed,
    };
    let request = GenerationRequest {
        prompt: &prompt,
        samples: args.samples,
        params: &params,
    };
    let (out, stats) = twin_ml::qwen::generate(&model, &[request], &EngineOptions::default())?;
    let completions = out[0]
        .iter()
        .map(|c| {
            Ok(serde_json::json!({
                "text": assets.tokenizer.decode(&c.tokens)?,
                "tokens": c.tokens,
                "logprobs": c.logprobs,
                "margins": c.margins,
                "finish": c.finish,
            }))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(serde_json::json!({
        "prompt_tokens": prompt.len(),
        "images": prompt.images.iter().map(|i| [i.resized.0, i.resized.1]).collect::<Vec<_>>(),
        "completions": completions,
        "stats": stats,
    }))
}
