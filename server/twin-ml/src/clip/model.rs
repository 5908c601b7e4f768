//! CLIP's vision and text towers with their projections, in tch. One struct per Hugging Face
//! module, each built by `new(path, …)` (sizes from the config) on a `VarStore` path equal to
//! the module's key prefix (`vision_model.encoder.layers.3.self_attn.q_proj`), and a `forward`
//! that follows transformers 5.17's `modeling_clip.py` step for step, so a checkpoint's keys are
//! the variables' names and the outputs agree with the reference to float rounding.
//!
//! Everything runs in the device's compute kind (`device::compute_kind`: bf16 on CUDA, f32 on
//! the CPU) under `tch::no_grad`.

use std::path::Path;

use image::DynamicImage;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::config::{Activation, ClipArchitecture, ClipConfig, ClipTextConfig, ClipVisionConfig};
use super::preprocess::{ClipPreprocessor, to_model_input};
use crate::MlError;
use crate::weights::{CONFIG_FILE, Checkpoint, INDEX_FILE, SINGLE_FILE, write_safetensors};

/// Weights are overwritten by the checkpoint (or `init_random`), so variables start as zeros
/// rather than paying for random initialisation.
const ZERO: nn::Init = nn::Init::Const(0.0);

fn linear(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> nn::Linear {
    nn::linear(
        p,
        in_dim,
        out_dim,
        nn::LinearConfig {
            ws_init: ZERO,
            bs_init: Some(ZERO),
            bias,
        },
    )
}

fn layer_norm(p: nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(
        p,
        vec![dim],
        nn::LayerNormConfig {
            eps,
            ..Default::default()
        },
    )
}

fn embedding(p: nn::Path, count: i64, dim: i64) -> nn::Embedding {
    nn::embedding(
        p,
        count,
        dim,
        nn::EmbeddingConfig {
            ws_init: ZERO,
            ..Default::default()
        },
    )
}

impl Activation {
    fn apply(self, x: &Tensor) -> Tensor {
        match self {
            // transformers' QuickGELUActivation: input * sigmoid(1.702 * input).
            Activation::QuickGelu => x * (x * 1.702).sigmoid(),
            Activation::Gelu => x.gelu("none"),
            Activation::GeluNew | Activation::GeluPytorchTanh => x.gelu("tanh"),
            Activation::Relu => x.relu(),
        }
    }
}

/// Which positions a query may attend to.
enum Mask<'a> {
    /// Every position (the vision tower).
    Full,
    /// Positions up to the query's own (the text tower without padding).
    Causal,
    /// A boolean `[B, 1, T, T]` mask, true where attention is allowed.
    Explicit(&'a Tensor),
}

/// `CLIPAttention`: multi-head self-attention through `scaled_dot_product_attention`, which is
/// also what transformers' default "sdpa" attention calls.
///
/// `q_proj`, `k_proj` and `v_proj` are stacked into one `[3·hidden, hidden]` weight and one
/// bias, so a single GEMM computes all three. The checkpoint's six variables are registered as
/// views into these tensors, so loading (or `init_random`, or saving) goes through the usual
/// per-key variables while the forward pass reads the stacked ones. Invariant: the store's kind
/// and device are never changed after building (that would re-allocate the views).
struct Attention {
    qkv_weight: Tensor,
    qkv_bias: Tensor,
    out_proj: nn::Linear,
    hidden: i64,
    num_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(p: nn::Path, hidden: i64, num_heads: i64) -> Attention {
        let options = (p.kind(), p.device());
        let qkv_weight = Tensor::zeros([3 * hidden, hidden], options);
        let qkv_bias = Tensor::zeros([3 * hidden], options);
        for (i, name) in ["q_proj", "k_proj", "v_proj"].into_iter().enumerate() {
            let sub = &p / name;
            let rows = i as i64 * hidden;
            let _ = sub.add("weight", qkv_weight.narrow(0, rows, hidden), false);
            let _ = sub.add("bias", qkv_bias.narrow(0, rows, hidden), false);
        }
        Attention {
            qkv_weight,
            qkv_bias,
            out_proj: linear(&p / "out_proj", hidden, hidden, true),
            hidden,
            num_heads,
            head_dim: hidden / num_heads,
        }
    }

    /// `[B, T, n·hidden]` projections → n tensors `[B, heads, T, head_dim]`.
    fn split_heads(&self, projected: &Tensor, n: i64) -> Vec<Tensor> {
        let (batch, len) = (projected.size()[0], projected.size()[1]);
        let heads = projected
            .view([batch, len, n, self.num_heads, self.head_dim])
            .permute([2, 0, 3, 1, 4]);
        (0..n).map(|i| heads.select(0, i)).collect()
    }

    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask<'_>) -> Tensor {
        let (batch, len) = (q.size()[0], q.size()[2]);
        let scale = (self.head_dim as f64).powf(-0.5);
        let (explicit, causal) = match mask {
            Mask::Full => (None, false),
            Mask::Causal => (None, true),
            Mask::Explicit(m) => (Some(*m), false),
        };
        let out =
            Tensor::scaled_dot_product_attention(q, k, v, explicit, 0.0, causal, scale, false);
        self.out_proj
            .forward(&out.transpose(1, 2).reshape([batch, len, self.hidden]))
    }

    fn forward(&self, x: &Tensor, mask: &Mask<'_>) -> Tensor {
        let qkv = self.split_heads(&x.linear(&self.qkv_weight, Some(&self.qkv_bias)), 3);
        self.attend(&qkv[0], &qkv[1], &qkv[2], mask)
    }

    /// The output for the first position only (`[B, 1, hidden]`), attending over all of them:
    /// what the class token needs in the last layer, without the queries of the others.
    fn forward_first(&self, x: &Tensor) -> Tensor {
        let h = self.hidden;
        let q = x.narrow(1, 0, 1).linear(
            &self.qkv_weight.narrow(0, 0, h),
            Some(&self.qkv_bias.narrow(0, 0, h)),
        );
        let kv = x.linear(
            &self.qkv_weight.narrow(0, h, 2 * h),
            Some(&self.qkv_bias.narrow(0, h, 2 * h)),
        );
        let q = self.split_heads(&q, 1);
        let kv = self.split_heads(&kv, 2);
        self.attend(&q[0], &kv[0], &kv[1], &Mask::Full)
    }
}

/// `CLIPMLP`.
struct Mlp {
    fc1: nn::Linear,
    fc2: nn::Linear,
    activation: Activation,
}

impl Mlp {
    fn new(p: nn::Path, hidden: i64, intermediate: i64, activation: Activation) -> Mlp {
        Mlp {
            fc1: linear(&p / "fc1", hidden, intermediate, true),
            fc2: linear(&p / "fc2", intermediate, hidden, true),
            activation,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2
            .forward(&self.activation.apply(&self.fc1.forward(x)))
    }
}

/// `CLIPEncoderLayer`: pre-norm attention and MLP, each with a residual.
struct EncoderLayer {
    layer_norm1: nn::LayerNorm,
    self_attn: Attention,
    layer_norm2: nn::LayerNorm,
    mlp: Mlp,
}

/// The sizes both towers' encoders are built from.
struct EncoderShape {
    hidden: i64,
    intermediate: i64,
    heads: i64,
    layers: i64,
    eps: f64,
    activation: Activation,
}

impl EncoderLayer {
    fn new(p: nn::Path, s: &EncoderShape) -> EncoderLayer {
        EncoderLayer {
            layer_norm1: layer_norm(&p / "layer_norm1", s.hidden, s.eps),
            self_attn: Attention::new(&p / "self_attn", s.hidden, s.heads),
            layer_norm2: layer_norm(&p / "layer_norm2", s.hidden, s.eps),
            mlp: Mlp::new(&p / "mlp", s.hidden, s.intermediate, s.activation),
        }
    }

    fn forward(&self, x: &Tensor, mask: &Mask<'_>) -> Tensor {
        let x = x + self.self_attn.forward(&self.layer_norm1.forward(x), mask);
        &x + self.mlp.forward(&self.layer_norm2.forward(&x))
    }

    /// [`EncoderLayer::forward`]'s first position only, `[B, 1, hidden]` (unmasked).
    fn forward_first(&self, x: &Tensor) -> Tensor {
        let attended = self.self_attn.forward_first(&self.layer_norm1.forward(x));
        let first = x.narrow(1, 0, 1) + attended;
        &first + self.mlp.forward(&self.layer_norm2.forward(&first))
    }
}

/// `CLIPEncoder`.
struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    fn new(p: nn::Path, s: &EncoderShape) -> Encoder {
        let layers = &p / "layers";
        Encoder {
            layers: (0..s.layers)
                .map(|i| EncoderLayer::new(&layers / i, s))
                .collect(),
        }
    }

    fn forward(&self, x: &Tensor, mask: &Mask<'_>) -> Tensor {
        let mut x = x.shallow_clone();
        for layer in &self.layers {
            x = layer.forward(&x, mask);
        }
        x
    }
}

/// `CLIPVisionEmbeddings`: patches by a bias-free strided convolution, a class token in front,
/// learned absolute positions added.
struct VisionEmbeddings {
    class_embedding: Tensor,
    patch_embedding: nn::Conv2D,
    position_embedding: nn::Embedding,
}

impl VisionEmbeddings {
    fn new(p: nn::Path, c: &ClipVisionConfig) -> VisionEmbeddings {
        VisionEmbeddings {
            class_embedding: p.var("class_embedding", &[c.hidden_size], ZERO),
            patch_embedding: nn::conv2d(
                &p / "patch_embedding",
                c.num_channels,
                c.hidden_size,
                c.patch_size,
                nn::ConvConfig {
                    stride: c.patch_size,
                    bias: false,
                    ws_init: ZERO,
                    ..Default::default()
                },
            ),
            position_embedding: embedding(
                &p / "position_embedding",
                c.num_positions(),
                c.hidden_size,
            ),
        }
    }

    fn forward(&self, pixel_values: &Tensor) -> Tensor {
        let batch = pixel_values.size()[0];
        let patches = self
            .patch_embedding
            .forward(pixel_values)
            .flatten(2, -1)
            .transpose(1, 2);
        let class = self
            .class_embedding
            .view([1, 1, -1])
            .expand([batch, 1, -1], false);
        Tensor::cat(&[class, patches], 1) + &self.position_embedding.ws
    }
}

/// `CLIPVisionModel` (transformers' `vision_model`).
struct VisionTransformer {
    embeddings: VisionEmbeddings,
    pre_layrnorm: nn::LayerNorm,
    encoder: Encoder,
    post_layernorm: nn::LayerNorm,
}

impl VisionTransformer {
    fn new(p: nn::Path, c: &ClipVisionConfig) -> VisionTransformer {
        let shape = EncoderShape {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            layers: c.num_hidden_layers,
            eps: c.layer_norm_eps,
            activation: c.hidden_act,
        };
        VisionTransformer {
            embeddings: VisionEmbeddings::new(&p / "embeddings", c),
            // Sic: the checkpoint key is spelled "pre_layrnorm".
            pre_layrnorm: layer_norm(&p / "pre_layrnorm", c.hidden_size, c.layer_norm_eps),
            encoder: Encoder::new(&p / "encoder", &shape),
            post_layernorm: layer_norm(&p / "post_layernorm", c.hidden_size, c.layer_norm_eps),
        }
    }

    /// `(last_hidden_state, pooler_output)`: the encoder's output, and the class token after
    /// `post_layernorm`.
    fn forward(&self, pixel_values: &Tensor) -> (Tensor, Tensor) {
        let x = self
            .pre_layrnorm
            .forward(&self.embeddings.forward(pixel_values));
        let last = self.encoder.forward(&x, &Mask::Full);
        let pooled = self.post_layernorm.forward(&last.select(1, 0));
        (last, pooled)
    }

    /// `pooler_output` alone. Pooling reads only the class token, so the last layer computes
    /// that one position (its keys and values still come from every patch): the same numbers as
    /// [`VisionTransformer::forward`] up to float rounding, for about 1/L less work.
    fn pooled(&self, pixel_values: &Tensor) -> Tensor {
        let mut x = self
            .pre_layrnorm
            .forward(&self.embeddings.forward(pixel_values));
        let Some((last, rest)) = self.encoder.layers.split_last() else {
            return self.post_layernorm.forward(&x.select(1, 0));
        };
        for layer in rest {
            x = layer.forward(&x, &Mask::Full);
        }
        self.post_layernorm
            .forward(&last.forward_first(&x).select(1, 0))
    }
}

/// `CLIPTextModel` (transformers' `text_model`).
struct TextTransformer {
    token_embedding: nn::Embedding,
    position_embedding: nn::Embedding,
    encoder: Encoder,
    final_layer_norm: nn::LayerNorm,
    eos_token_id: Option<i64>,
}

impl TextTransformer {
    fn new(p: nn::Path, c: &ClipTextConfig) -> TextTransformer {
        let shape = EncoderShape {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            layers: c.num_hidden_layers,
            eps: c.layer_norm_eps,
            activation: c.hidden_act,
        };
        let embeddings = &p / "embeddings";
        TextTransformer {
            token_embedding: embedding(
                &embeddings / "token_embedding",
                c.vocab_size,
                c.hidden_size,
            ),
            position_embedding: embedding(
                &embeddings / "position_embedding",
                c.max_position_embeddings,
                c.hidden_size,
            ),
            encoder: Encoder::new(&p / "encoder", &shape),
            final_layer_norm: layer_norm(&p / "final_layer_norm", c.hidden_size, c.layer_norm_eps),
            eos_token_id: c.eos_token_id,
        }
    }

    /// `(last_hidden_state, pooler_output)`: the final-layer-normed sequence, and its state at
    /// each sequence's end-of-text token.
    fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> (Tensor, Tensor) {
        let (batch, len) = (input_ids.size()[0], input_ids.size()[1]);
        let x =
            self.token_embedding.forward(input_ids) + self.position_embedding.ws.narrow(0, 0, len);
        // transformers' create_causal_mask: causal, and no attention to padding keys.
        let explicit = attention_mask.map(|m| {
            let device = input_ids.device();
            let causal = Tensor::ones([len, len], (Kind::Bool, device)).tril(0);
            let keys = m.to_device(device).ne(0).view([batch, 1, 1, len]);
            causal.view([1, 1, len, len]).logical_and(&keys)
        });
        let mask = match &explicit {
            Some(m) => Mask::Explicit(m),
            None => Mask::Causal,
        };
        let last = self
            .final_layer_norm
            .forward(&self.encoder.forward(&x, &mask));
        // The legacy eos id 2 of old OpenAI configs means "the highest id in the sequence" (the
        // end-of-text token has the highest id in CLIP's vocabulary); otherwise the first eos.
        let eos_position = match self.eos_token_id {
            Some(eos) if eos != 2 => input_ids.eq(eos).to_kind(Kind::Int).argmax(-1, false),
            _ => input_ids.argmax(-1, false),
        };
        let rows = Tensor::arange(batch, (Kind::Int64, last.device()));
        let pooled = last.index(&[Some(rows), Some(eos_position.to_device(last.device()))]);
        (last, pooled)
    }
}

/// The vision tower's outputs, named as transformers names them.
#[derive(Debug)]
pub struct VisionOutput {
    /// `[N, 1 + patches, hidden]`, before `post_layernorm`.
    pub last_hidden_state: Tensor,
    /// `[N, hidden]`: the class token after `post_layernorm`.
    pub pooler_output: Tensor,
    /// `[N, projection_dim]`: `visual_projection(pooler_output)`, un-normalised
    /// (`get_image_features`, `image_embeds`). Equal to `pooler_output` for a bare
    /// `CLIPVisionModel`, which has no projection.
    pub image_embeds: Tensor,
}

/// The text tower's outputs, named as transformers names them.
#[derive(Debug)]
pub struct TextOutput {
    /// `[N, T, hidden]`, after `final_layer_norm`.
    pub last_hidden_state: Tensor,
    /// `[N, hidden]`: the state at each sequence's end-of-text token.
    pub pooler_output: Tensor,
    /// `[N, projection_dim]`: `text_projection(pooler_output)`, un-normalised
    /// (`get_text_features`, `text_embeds`).
    pub text_embeds: Tensor,
}

/// A CLIP model: the vision tower with its projection, and for a `CLIPModel` checkpoint the
/// text tower with its own.
///
/// `Send` but not `Sync` (tch tensors are not): share it behind a mutex or give it a thread.
pub struct ClipModel {
    config: ClipConfig,
    vision: VisionTransformer,
    visual_projection: Option<nn::Linear>,
    text: Option<(TextTransformer, nn::Linear)>,
    vs: nn::VarStore,
    weights_hash: Option<String>,
}

impl std::fmt::Debug for ClipModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipModel")
            .field("architecture", &self.config.architecture)
            .field("device", &self.vs.device())
            .field("kind", &self.vs.kind())
            .field("weights_hash", &self.weights_hash)
            .finish_non_exhaustive()
    }
}

/// The `vision_model.` key prefix, which a bare `CLIPVisionModel` checkpoint lacks.
const VISION_PREFIX: &str = "vision_model.";

impl ClipModel {
    /// Builds the variables for `config` on `device` in `kind`, all zero.
    fn build(config: ClipConfig, device: Device, kind: Kind) -> Result<ClipModel, MlError> {
        config
            .validate()
            .map_err(|m| MlError::Invalid(format!("CLIP config: {m}")))?;
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let root = vs.root();
        let vision = VisionTransformer::new(&root / "vision_model", &config.vision);
        let visual_projection = (config.architecture != ClipArchitecture::Vision).then(|| {
            linear(
                &root / "visual_projection",
                config.vision.hidden_size,
                config.projection_dim,
                false,
            )
        });
        let text = config.text.as_ref().map(|t| {
            let tower = TextTransformer::new(&root / "text_model", t);
            let projection = linear(
                &root / "text_projection",
                t.hidden_size,
                config.projection_dim,
                false,
            );
            (tower, projection)
        });
        if config.architecture == ClipArchitecture::Clip {
            let _ = root.var(
                "logit_scale",
                &[],
                nn::Init::Const(config.logit_scale_init_value),
            );
        }
        Ok(ClipModel {
            config,
            vision,
            visual_projection,
            text,
            vs,
            weights_hash: None,
        })
    }

    /// Loads a Hugging Face `CLIPModel`, `CLIPVisionModelWithProjection` or `CLIPVisionModel`
    /// checkpoint directory (`config.json` + `model.safetensors` or sharded safetensors) onto
    /// `device`, in bf16 on CUDA and f32 on the CPU. Every tensor is checked (present, right
    /// shape) before the model is returned.
    pub fn load(dir: &Path, device: Device) -> Result<ClipModel, MlError> {
        ClipModel::load_as(dir, device, crate::device::compute_kind(device))
    }

    /// [`ClipModel::load`] in a chosen kind: bf16 on the CPU or f32 on a GPU, for benchmarks
    /// and parity checks that hold the kind fixed across devices.
    pub fn load_as(dir: &Path, device: Device, kind: Kind) -> Result<ClipModel, MlError> {
        let checkpoint = Checkpoint::open(dir)?;
        let config = ClipConfig::from_file(&checkpoint.config_path())?;
        ClipModel::from_checkpoint(&checkpoint, config, device, kind)
    }

    /// Like [`ClipModel::load`] but only the image tower and its projection, whatever the
    /// checkpoint holds: for embedding images without the text tower's memory.
    pub fn load_vision(dir: &Path, device: Device) -> Result<ClipModel, MlError> {
        let checkpoint = Checkpoint::open(dir)?;
        let config = ClipConfig::from_file(&checkpoint.config_path())?.vision_only();
        ClipModel::from_checkpoint(
            &checkpoint,
            config,
            device,
            crate::device::compute_kind(device),
        )
    }

    fn from_checkpoint(
        checkpoint: &Checkpoint,
        config: ClipConfig,
        device: Device,
        kind: Kind,
    ) -> Result<ClipModel, MlError> {
        let mut model = ClipModel::build(config, device, kind)?;
        // Decided by the keys rather than the declared class: a bare vision tower's keys have
        // no `vision_model.` prefix, every other layout's do.
        let prefixed = checkpoint.contains("vision_model.embeddings.class_embedding");
        let unprefixed = !prefixed && checkpoint.contains("embeddings.class_embedding");
        let report =
            checkpoint.load_into(&model.vs, |name| match name.strip_prefix(VISION_PREFIX) {
                Some(rest) if unprefixed => rest.to_owned(),
                _ => name.to_owned(),
            })?;
        if !report.unused.is_empty() {
            tracing::debug!(dir = %checkpoint.dir().display(), unused = ?report.unused, "checkpoint tensors not used");
        }
        model.vs.freeze();
        model.weights_hash = Some(report.weights_hash);
        Ok(model)
    }

    /// A model with seeded random weights and no download: the same `seed` and `config` give
    /// the same weights on every machine. Scales follow transformers' `_init_weights`, so
    /// activations stay in a realistic range.
    pub fn init_random(
        config: ClipConfig,
        seed: u64,
        device: Device,
    ) -> Result<ClipModel, MlError> {
        use rand::SeedableRng;
        let mut model = ClipModel::build(config, device, crate::device::compute_kind(device))?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut vars: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, mut var) in vars {
            let std = match init_std(&name, &model.config) {
                Init::Constant(c) => {
                    let _ = tch::no_grad(|| var.f_fill_(c))?;
                    continue;
                }
                Init::Std(s) => s,
            };
            crate::weights::fill_uniform(&mut var, std, &mut rng)?;
        }
        model.vs.freeze();
        Ok(model)
    }

    /// Writes `config.json`, `model.safetensors` and `preprocessor_config.json` into `dir` in
    /// the layout transformers saves for this architecture (`CLIPVisionModelWithProjection`
    /// for a vision-only model), so [`ClipModel::load`] and transformers' `from_pretrained`
    /// both read it back. Returns the new weights hash.
    pub fn save_pretrained(&self, dir: &Path) -> Result<String, MlError> {
        std::fs::create_dir_all(dir).map_err(|e| MlError::io(dir, e))?;
        let mut config = self.config.to_json();
        config["dtype"] = serde_json::json!(if self.kind() == Kind::BFloat16 {
            "bfloat16"
        } else {
            "float32"
        });
        let config_path = dir.join(CONFIG_FILE);
        let text =
            serde_json::to_string_pretty(&config).map_err(|e| MlError::io(&config_path, e))?;
        std::fs::write(&config_path, text + "\n").map_err(|e| MlError::io(&config_path, e))?;

        let bare = self.config.architecture == ClipArchitecture::Vision;
        let tensors: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(name, t)| match name.strip_prefix(VISION_PREFIX) {
                Some(rest) if bare => (rest.to_owned(), t),
                _ => (name, t),
            })
            .collect();
        // A sharded index left from an earlier save would shadow the new single file.
        let stale_index = dir.join(INDEX_FILE);
        if stale_index.exists() {
            std::fs::remove_file(&stale_index).map_err(|e| MlError::io(&stale_index, e))?;
        }
        write_safetensors(&dir.join(SINGLE_FILE), &tensors)?;
        ClipPreprocessor::clip_default(self.config.vision.image_size as usize).save(dir)?;
        Checkpoint::open(dir)?.weights_hash()
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The kind the model computes in (bf16 on CUDA, f32 on the CPU).
    pub fn kind(&self) -> Kind {
        self.vs.kind()
    }

    /// Size of [`ClipModel::image_features`]' rows.
    pub fn embedding_dim(&self) -> i64 {
        self.config.projection_dim
    }

    /// SHA-256 of the weights files the model was loaded from, concatenated in shard order
    /// (`None` for [`ClipModel::init_random`]; [`ClipModel::save_pretrained`] returns the hash
    /// of what it wrote).
    /// Bytes the weights take on the model's device.
    pub fn resident_bytes(&self) -> u64 {
        crate::weights::var_store_bytes(&self.vs)
    }

    pub fn weights_hash(&self) -> Option<&str> {
        self.weights_hash.as_deref()
    }

    fn check_pixels(&self, pixel_values: &Tensor) -> Result<(), MlError> {
        let c = &self.config.vision;
        let size = pixel_values.size();
        let expected = [c.num_channels, c.image_size, c.image_size];
        if size.len() != 4 || size[1..] != expected || size[0] == 0 {
            return Err(MlError::Invalid(format!(
                "pixel_values has shape {size:?}, expected [N, {}, {}, {}]",
                expected[0], expected[1], expected[2]
            )));
        }
        if !pixel_values.is_floating_point() {
            return Err(MlError::Invalid(format!(
                "pixel_values has kind {:?}, expected a floating-point tensor",
                pixel_values.kind()
            )));
        }
        Ok(())
    }

    /// The vision tower's outputs for a `[N, 3, image_size, image_size]` batch (moved to the
    /// model's device and kind first); tensors in the model's kind on its device.
    pub fn vision_forward(&self, pixel_values: &Tensor) -> Result<VisionOutput, MlError> {
        self.check_pixels(pixel_values)?;
        let pixels = to_model_input(pixel_values, self.device(), self.kind());
        Ok(tch::no_grad(|| {
            let (last_hidden_state, pooler_output) = self.vision.forward(&pixels);
            let image_embeds = match &self.visual_projection {
                Some(p) => p.forward(&pooler_output),
                None => pooler_output.shallow_clone(),
            };
            VisionOutput {
                last_hidden_state,
                pooler_output,
                image_embeds,
            }
        }))
    }

    /// Projected, un-normalised image embeddings `[N, projection_dim]` (transformers'
    /// `get_image_features` / `image_embeds`), in the model's kind on its device. Skips the
    /// work `last_hidden_state` alone needs (see `VisionTransformer::pooled`); the parity
    /// fixtures check it against transformers separately from [`ClipModel::vision_forward`].
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor, MlError> {
        self.check_pixels(pixel_values)?;
        let pixels = to_model_input(pixel_values, self.device(), self.kind());
        Ok(tch::no_grad(|| {
            let pooled = self.vision.pooled(&pixels);
            match &self.visual_projection {
                Some(p) => p.forward(&pooled),
                None => pooled,
            }
        }))
    }

    /// Preprocesses `images`, runs them as one batch and returns their embeddings as an f32
    /// CPU tensor `[N, projection_dim]`, un-normalised (divide by the L2 norm for cosines).
    pub fn embed_images(
        &self,
        preprocessor: &ClipPreprocessor,
        images: &[DynamicImage],
    ) -> Result<Tensor, MlError> {
        if images.is_empty() {
            return Ok(Tensor::zeros(
                [0, self.embedding_dim()],
                (Kind::Float, Device::Cpu),
            ));
        }
        let pixels = preprocessor.preprocess_batch(images)?;
        Ok(self
            .image_features(&pixels)?
            .to_kind(Kind::Float)
            .to_device(Device::Cpu))
    }

    /// The text tower's outputs for `[N, T]` token ids and an optional `[N, T]` attention mask
    /// (1 for tokens, 0 for padding).
    pub fn text_forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<TextOutput, MlError> {
        let Some((tower, projection)) = &self.text else {
            return Err(MlError::Invalid(format!(
                "this {} has no text tower",
                self.config.architecture.hf_name()
            )));
        };
        let text = self
            .config
            .text
            .as_ref()
            .expect("a model with a text tower has a text config");
        let size = input_ids.size();
        if size.len() != 2 || size[1] == 0 || size[1] > text.max_position_embeddings {
            return Err(MlError::Invalid(format!(
                "input_ids has shape {size:?}, expected [N, T] with 0 < T <= {}",
                text.max_position_embeddings
            )));
        }
        if input_ids.is_floating_point() || input_ids.kind() == Kind::Bool {
            return Err(MlError::Invalid(format!(
                "input_ids has kind {:?}, expected integers",
                input_ids.kind()
            )));
        }
        if size[0] > 0 {
            let (min, max) = (
                input_ids.min().int64_value(&[]),
                input_ids.max().int64_value(&[]),
            );
            if min < 0 || max >= text.vocab_size {
                return Err(MlError::Invalid(format!(
                    "input_ids hold ids {min}..={max}, the vocabulary has {}",
                    text.vocab_size
                )));
            }
        }
        if let Some(mask) = attention_mask
            && mask.size() != size
        {
            return Err(MlError::Invalid(format!(
                "attention_mask has shape {:?}, input_ids {size:?}",
                mask.size()
            )));
        }
        let ids = input_ids.to_device(self.device()).to_kind(Kind::Int64);
        Ok(tch::no_grad(|| {
            let (last_hidden_state, pooler_output) = tower.forward(&ids, attention_mask);
            let text_embeds = projection.forward(&pooler_output);
            TextOutput {
                last_hidden_state,
                pooler_output,
                text_embeds,
            }
        }))
    }

    /// Projected, un-normalised text embeddings `[N, projection_dim]` (transformers'
    /// `get_text_features` / `text_embeds`).
    pub fn text_features(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor, MlError> {
        Ok(self.text_forward(input_ids, attention_mask)?.text_embeds)
    }
}

enum Init {
    Constant(f64),
    Std(f64),
}

/// transformers' `CLIPPreTrainedModel._init_weights`, by variable name.
fn init_std(name: &str, config: &ClipConfig) -> Init {
    let (hidden, layers) = if name.starts_with("text_model.") {
        let t = config
            .text
            .as_ref()
            .expect("text variables exist only with a text config");
        (t.hidden_size as f64, t.num_hidden_layers as f64)
    } else {
        (
            config.vision.hidden_size as f64,
            config.vision.num_hidden_layers as f64,
        )
    };
    let is_norm =
        name.contains("layer_norm") || name.contains("layrnorm") || name.contains("layernorm");
    if name == "logit_scale" {
        Init::Constant(config.logit_scale_init_value)
    } else if is_norm {
        Init::Constant(if name.ends_with(".weight") { 1.0 } else { 0.0 })
    } else if name.ends_with(".bias") {
        Init::Constant(0.0)
    } else if name.ends_with("class_embedding") {
        Init::Std(hidden.powf(-0.5))
    } else if name.contains("embedding") {
        Init::Std(0.02)
    } else if name.contains("q_proj")
        || name.contains("k_proj")
        || name.contains("v_proj")
        || name.contains("fc2")
    {
        Init::Std(hidden.powf(-0.5) * (2.0 * layers).powf(-0.5))
    } else if name.contains("out_proj") {
        Init::Std(hidden.powf(-0.5))
    } else if name.contains("fc1") {
        Init::Std((2.0 * hidden).powf(-0.5))
    } else {
        // The projections.
        Init::Std(hidden.powf(-0.5))
    }
}
