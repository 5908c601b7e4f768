//! `Qwen2_5_VLForConditionalGeneration` in tch: the vision tower and the decoder on one
//! `VarStore` whose variable names are the hub layout's keys (`visual.*`, `model.*`,
//! `lm_head.weight` unless tied), loading from a Hugging Face checkpoint directory, seeded random
//! initialisation and saving for tests and benchmarks, and the full-sequence forward pass the
//! parity tests and log-probability checks use. Generation lives in `engine.rs`.

use std::path::Path;

use tch::nn;
use tch::{Device, Kind, Tensor};

use super::chat::{ChatTemplate, PreparedPrompt, QwenProcessor, QwenTokenizer};
use super::config::QwenVlConfig;
use super::preprocess::{PreparedImage, QwenPreprocessor};
use super::text::{TextMask, TextModel};
use super::vision::{Grid, VisionTower};
use crate::MlError;
use crate::weights::{CONFIG_FILE, Checkpoint, INDEX_FILE, SINGLE_FILE, write_safetensors};

/// The model, its tokenizer and its processor: everything a checkpoint directory holds.
pub struct QwenVl {
    config: QwenVlConfig,
    pub(crate) vision: VisionTower,
    pub(crate) text: TextModel,
    vs: nn::VarStore,
    weights_hash: Option<String>,
}

impl std::fmt::Debug for QwenVl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QwenVl")
            .field("device", &self.vs.device())
            .field("kind", &self.vs.kind())
            .field("weights_hash", &self.weights_hash)
            .finish_non_exhaustive()
    }
}

/// Parameter counts by part, for `model info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ParameterCounts {
    pub vision: i64,
    pub embedding: i64,
    pub decoder: i64,
    /// Zero when tied to the embedding.
    pub lm_head: i64,
}

impl ParameterCounts {
    pub fn total(&self) -> i64 {
        self.vision + self.embedding + self.decoder + self.lm_head
    }
}

impl QwenVl {
    fn build(config: QwenVlConfig, device: Device, kind: Kind) -> Result<QwenVl, MlError> {
        config
            .validate()
            .map_err(|m| MlError::Invalid(format!("Qwen2.5-VL config: {m}")))?;
        let mut vs = nn::VarStore::new(device);
        // Set before any variable exists, so each is created in `kind` (no conversion later
        // that could detach the tensors the modules hold).
        vs.set_kind(kind);
        let root = vs.root();
        let vision = VisionTower::new(&root / "visual", &config.vision);
        let text = TextModel::new(&root, &config.text, config.tie_word_embeddings);
        Ok(QwenVl {
            config,
            vision,
            text,
            vs,
            weights_hash: None,
        })
    }

    /// Loads a Hugging Face checkpoint directory onto `device` in bf16 on CUDA and f32 on the
    /// CPU. Every tensor is checked (present, right shape) before any is read.
    pub fn load(dir: &Path, device: Device) -> Result<QwenVl, MlError> {
        QwenVl::load_as(dir, device, crate::device::compute_kind(device))
    }

    /// [`QwenVl::load`] in a chosen kind (f32 on a GPU for parity checks, say).
    pub fn load_as(dir: &Path, device: Device, kind: Kind) -> Result<QwenVl, MlError> {
        let checkpoint = Checkpoint::open(dir)?;
        let config = QwenVlConfig::from_file(&checkpoint.config_path())?;
        let mut model = QwenVl::build(config, device, kind)?;
        // transformers 5 saves the hub layout; checkpoints written by transformers 4.5x's
        // internal names (`model.language_model.*`, `model.visual.*`) are read as well.
        let internal = checkpoint.contains("model.language_model.embed_tokens.weight");
        let report = checkpoint.load_into(&model.vs, |name| {
            if !internal {
                return name.to_owned();
            }
            if let Some(rest) = name.strip_prefix("model.") {
                format!("model.language_model.{rest}")
            } else if let Some(rest) = name.strip_prefix("visual.") {
                format!("model.visual.{rest}")
            } else {
                name.to_owned()
            }
        })?;
        if !report.unused.is_empty() {
            tracing::debug!(dir = %dir.display(), unused = ?report.unused, "checkpoint tensors not used");
        }
        model.vs.freeze();
        model.weights_hash = Some(report.weights_hash);
        Ok(model)
    }

    /// Seeded random weights (uniform with transformers' `initializer_range` 0.02 as standard
    /// deviation, norms at one, biases at zero): the same seed and config give the same model on
    /// every machine. `scale` multiplies the standard deviation (tests use larger weights so
    /// greedy decoding has clear margins).
    pub fn init_random(
        config: QwenVlConfig,
        seed: u64,
        device: Device,
        kind: Kind,
    ) -> Result<QwenVl, MlError> {
        QwenVl::init_random_scaled(config, seed, device, kind, 1.0)
    }

    pub fn init_random_scaled(
        config: QwenVlConfig,
        seed: u64,
        device: Device,
        kind: Kind,
        scale: f64,
    ) -> Result<QwenVl, MlError> {
        use rand::SeedableRng;
        let mut model = QwenVl::build(config, device, kind)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut vars: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, mut var) in vars {
            let is_norm = name.contains("norm") || name.contains("ln_q");
            if is_norm || name.ends_with(".bias") {
                let value = if is_norm { 1.0 } else { 0.0 };
                let _ = tch::no_grad(|| var.f_fill_(value))?;
                continue;
            }
            crate::weights::fill_uniform(&mut var, 0.02 * scale, &mut rng)?;
        }
        model.vs.freeze();
        Ok(model)
    }

    /// Writes `config.json` (the nested layout transformers 5 writes), `model.safetensors` in
    /// the hub's key layout and `preprocessor_config.json`; returns the weights hash.
    pub fn save_pretrained(
        &self,
        dir: &Path,
        preprocessor: &QwenPreprocessor,
    ) -> Result<String, MlError> {
        self.save_pretrained_as(dir, preprocessor, self.kind())
    }

    /// [`QwenVl::save_pretrained`] with the floating-point weights written as `kind` (a
    /// training run's bf16 checkpoint of f32 weights, as transformers' `save_pretrained` of a
    /// bf16 model writes it).
    pub fn save_pretrained_as(
        &self,
        dir: &Path,
        preprocessor: &QwenPreprocessor,
        kind: Kind,
    ) -> Result<String, MlError> {
        std::fs::create_dir_all(dir).map_err(|e| MlError::io(dir, e))?;
        let mut config = self.config.to_json();
        config["dtype"] = serde_json::json!(match kind {
            Kind::BFloat16 => "bfloat16",
            Kind::Half => "float16",
            _ => "float32",
        });
        let path = dir.join(CONFIG_FILE);
        let text = serde_json::to_string_pretty(&config).map_err(|e| MlError::io(&path, e))?;
        std::fs::write(&path, text + "\n").map_err(|e| MlError::io(&path, e))?;
        let stale_index = dir.join(INDEX_FILE);
        if stale_index.exists() {
            std::fs::remove_file(&stale_index).map_err(|e| MlError::io(&stale_index, e))?;
        }
        let tensors: Vec<(String, Tensor)> = torch_call(|| {
            self.vs
                .variables()
                .into_iter()
                .map(|(name, t)| {
                    let t = if t.is_floating_point() && t.kind() != kind {
                        t.detach().to_kind(kind)
                    } else {
                        t
                    };
                    (name, t)
                })
                .collect()
        })?;
        write_safetensors(&dir.join(SINGLE_FILE), &tensors)?;
        preprocessor.save(dir)?;
        Checkpoint::open(dir)?.weights_hash()
    }

    pub fn config(&self) -> &QwenVlConfig {
        &self.config
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn kind(&self) -> Kind {
        self.vs.kind()
    }

    pub fn weights_hash(&self) -> Option<&str> {
        self.weights_hash.as_deref()
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Bytes the weights take on the model's device.
    pub fn resident_bytes(&self) -> u64 {
        crate::weights::var_store_bytes(&self.vs)
    }

    pub fn parameter_counts(&self) -> ParameterCounts {
        let mut counts = ParameterCounts {
            vision: 0,
            embedding: 0,
            decoder: 0,
            lm_head: 0,
        };
        for (name, t) in self.vs.variables() {
            let n = t.numel() as i64;
            if name.starts_with("visual.") {
                counts.vision += n;
            } else if name.starts_with("model.embed_tokens") {
                counts.embedding += n;
            } else if name.starts_with("lm_head") {
                counts.lm_head += n;
            } else {
                counts.decoder += n;
            }
        }
        counts
    }

    /// The merged image tokens `[Σ tokens, hidden]` of `images`, in order.
    pub fn encode_images(&self, images: &[&PreparedImage]) -> Result<Tensor, MlError> {
        let (pixels, grids) = self.image_pixels(images)?;
        torch_call(|| tch::no_grad(|| self.vision.forward(&pixels, &grids)))
    }

    /// The patches of `images`, checked and stacked `[Σ patches, patch_dim]` on the model's
    /// device, with their grids: the vision tower's input.
    pub(crate) fn image_pixels(
        &self,
        images: &[&PreparedImage],
    ) -> Result<(Tensor, Vec<Grid>), MlError> {
        let grids: Vec<Grid> = images.iter().map(|i| i.grid).collect();
        let dim = self.config.vision.patch_dim();
        for (i, image) in images.iter().enumerate() {
            if image.patches.len() as i64 != image.grid.patches() * dim {
                return Err(MlError::Invalid(format!(
                    "image {i}: {} values do not make {} patches of {dim} (preprocessed for \
                     another patch size?)",
                    image.patches.len(),
                    image.grid.patches()
                )));
            }
        }
        let mut all = Vec::with_capacity(images.iter().map(|i| i.patches.len()).sum());
        for image in images {
            all.extend_from_slice(&image.patches);
        }
        let pixels = torch_call(|| {
            Tensor::from_slice(&all)
                .view([-1, dim])
                .to_device(self.device())
        })?;
        Ok((pixels, grids))
    }

    /// Input embeddings `[1, L, hidden]` of a prompt, image tokens replaced by `image_embeds`
    /// rows in order.
    pub fn embed_prompt(&self, input_ids: &[i64], image_embeds: Option<&Tensor>) -> Tensor {
        let device = self.device();
        let ids = Tensor::from_slice(input_ids).to_device(device).unsqueeze(0);
        let embeds = self.text.embed(&ids);
        match image_embeds {
            Some(img) => {
                let mask = ids
                    .eq(self.config.image_token_id)
                    .unsqueeze(-1)
                    .expand_as(&embeds);
                embeds.masked_scatter(&mask, &img.to_kind(embeds.kind()))
            }
            None => embeds,
        }
    }

    /// Positions `[3, 1, L]` of a prepared prompt followed by `extra` generated tokens.
    pub fn positions(&self, prompt: &PreparedPrompt, extra: &[i64]) -> Tensor {
        let len = prompt.len() as i64;
        let mut flat = Vec::with_capacity(3 * (prompt.len() + extra.len()));
        for axis in &prompt.positions.axes {
            flat.extend_from_slice(axis);
            flat.extend((0..extra.len() as i64).map(|i| prompt.positions.decode_position(len + i)));
        }
        Tensor::from_slice(&flat)
            .view([3, 1, -1])
            .to_device(self.device())
    }

    /// Logits `[L + extra, vocab]` (f32) of a whole prompt followed by `extra` tokens, in one
    /// forward pass without a cache: the reference the engine's log-probabilities are checked
    /// against, and what the parity fixtures compare.
    pub fn sequence_logits(
        &self,
        prompt: &PreparedPrompt,
        extra: &[i64],
    ) -> Result<Tensor, MlError> {
        let images: Vec<&PreparedImage> = prompt.images.iter().collect();
        let image_embeds = if images.is_empty() {
            None
        } else {
            Some(self.encode_images(&images)?)
        };
        torch_call(|| {
            tch::no_grad(|| {
                let mut ids = prompt.input_ids.clone();
                ids.extend_from_slice(extra);
                let embeds = self.embed_prompt(&ids, image_embeds.as_ref());
                let positions = self.positions(prompt, extra);
                let hidden = self
                    .text
                    .forward(&embeds, &positions, TextMask::Causal, None);
                self.text.logits(&hidden.squeeze_dim(0))
            })
        })
    }
}

/// Everything needed to turn chats into model inputs and ids back into text, loaded from the
/// same checkpoint directory.
#[derive(Debug)]
pub struct QwenAssets {
    pub tokenizer: QwenTokenizer,
    pub processor: QwenProcessor,
}

impl QwenAssets {
    /// The tokens that end a reply: the config's end-of-sequence ids plus the chat format's
    /// end-of-turn and end-of-text tokens where the tokenizer has them.
    pub fn stop_tokens(&self, config: &QwenVlConfig) -> Vec<i64> {
        let mut ids = config.eos_token_ids.clone();
        for token in [super::chat::IM_END, "<|endoftext|>"] {
            if let Some(id) = self.tokenizer.token_id(token) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    pub fn load(dir: &Path, config: &QwenVlConfig) -> Result<QwenAssets, MlError> {
        Ok(QwenAssets {
            tokenizer: QwenTokenizer::load(dir)?,
            processor: QwenProcessor::new(
                config,
                ChatTemplate::load(dir)?,
                QwenPreprocessor::load(dir)?,
            ),
        })
    }
}

/// Runs a libtorch computation, turning its panics (tch's infallible API panics on a libtorch
/// error) into errors, allocation failures recognised as such.
pub(crate) fn torch_call<T>(f: impl FnOnce() -> T) -> Result<T, MlError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => Ok(v),
        Err(payload) => {
            let text = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "libtorch failed".to_owned());
            Err(MlError::from_torch(tch::TchError::Torch(text)))
        }
    }
}
