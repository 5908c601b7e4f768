//! Qwen2.5-VL's language model in tch (transformers 5.17's `Qwen2_5_VLTextModel` and the LM
//! head): grouped-query attention with biases on q/k/v, multimodal rotary embeddings (M-RoPE:
//! the rotary frequencies split into time, height and width sections, each rotated by its own
//! coordinate of a 3-D position), RMSNorm and SwiGLU, with an optional preallocated key/value
//! cache that a forward pass writes into at a given column.

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::config::QwenTextConfig;
use super::layers::{RmsNorm, linear, silu_mlp_forward};
use crate::MlError;

/// Keys and values of every layer, `[rows, kv_heads, capacity, head_dim]` each, allocated once
/// for a whole generation.
pub struct KvCache {
    pub(crate) k: Vec<Tensor>,
    pub(crate) v: Vec<Tensor>,
}

impl KvCache {
    pub fn new(
        config: &QwenTextConfig,
        rows: i64,
        capacity: i64,
        kind: Kind,
        device: Device,
    ) -> Result<KvCache, MlError> {
        let shape = [
            rows,
            config.num_key_value_heads,
            capacity,
            config.head_dim(),
        ];
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..config.num_hidden_layers {
            k.push(Tensor::f_zeros(shape, (kind, device)).map_err(MlError::from_torch)?);
            v.push(Tensor::f_zeros(shape, (kind, device)).map_err(MlError::from_torch)?);
        }
        Ok(KvCache { k, v })
    }

    /// Bytes a cache of this shape takes.
    pub fn bytes(config: &QwenTextConfig, rows: i64, capacity: i64, kind: Kind) -> u64 {
        let per_layer = rows * config.num_key_value_heads * capacity * config.head_dim();
        (2 * config.num_hidden_layers * per_layer) as u64 * kind.elt_size_in_bytes() as u64
    }

    pub fn rows(&self) -> i64 {
        self.k.first().map_or(0, |t| t.size()[0])
    }

    pub fn capacity(&self) -> i64 {
        self.k.first().map_or(0, |t| t.size()[2])
    }

    /// Rows `start..start + n` as a cache of their own that shares this one's storage:
    /// writing into it writes into this cache.
    pub fn row_range(&self, start: i64, n: i64) -> KvCache {
        KvCache {
            k: self.k.iter().map(|t| t.narrow(0, start, n)).collect(),
            v: self.v.iter().map(|t| t.narrow(0, start, n)).collect(),
        }
    }

    /// Keeps only `rows` (indices into the current rows), in that order: drops finished
    /// sequences from a batch, or copies one prompt's cache into each of its samples.
    pub fn select_rows(&mut self, rows: &Tensor) {
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            *t = t.index_select(0, rows);
        }
    }

    /// Copies `src`'s columns `0..len` of row `src_row` into this cache's row `dst_row`, at
    /// columns `dst_col..dst_col + len`.
    pub fn copy_row_from(
        &mut self,
        src: &KvCache,
        src_row: i64,
        dst_row: i64,
        dst_col: i64,
        len: i64,
    ) {
        for (dst, src) in self
            .k
            .iter_mut()
            .zip(&src.k)
            .chain(self.v.iter_mut().zip(&src.v))
        {
            dst.get(dst_row)
                .narrow(1, dst_col, len)
                .copy_(&src.get(src_row).narrow(1, 0, len));
        }
    }
}

/// Where a forward pass with a cache writes its keys and values, and what it attends over.
#[derive(Clone, Copy)]
pub(crate) enum CacheSlot<'a> {
    /// Columns `start..start + L`; the queries attend over columns `0..start + L`.
    At(i64),
    /// The column held by a one-element i64 device tensor, for one query per row; the query
    /// attends over the cache's whole capacity under the explicit mask. No shape depends on
    /// the step, and the column never reaches the host, so a CUDA graph can capture the pass.
    Static(&'a Tensor),
}

/// Which keys each query may attend to.
pub enum TextMask<'a> {
    /// Every earlier position and itself, no padding anywhere.
    Causal,
    /// A boolean `[B, 1, queries, keys]` mask, true where attention is allowed; keys are the
    /// cache's columns `0..start + queries`.
    Explicit(&'a Tensor),
}

struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    o_proj: nn::Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    attn: Attention,
    post_attention_layernorm: RmsNorm,
    gate_proj: nn::Linear,
    up_proj: nn::Linear,
    down_proj: nn::Linear,
}

/// The decoder and its head.
pub struct TextModel {
    config: QwenTextConfig,
    pub(crate) embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `None` when the head is tied to the embedding.
    lm_head: Option<Tensor>,
    inv_freq: Tensor,
}

/// `[B, heads, L, hd]` rotated by cos/sin `[B, L, hd]` (transformers' `apply_rotary_pos_emb`,
/// in the input's kind).
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let rotated = Tensor::cat(&[-x.narrow(3, half, half), x.narrow(3, 0, half)], 3);
    x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)
}

impl TextModel {
    /// Variables named as the hub layout names them: `model.embed_tokens`, `model.layers.N`,
    /// `model.norm` under `model`, and `lm_head` under `root` unless tied.
    pub fn new(root: &nn::Path, c: &QwenTextConfig, tied: bool) -> TextModel {
        let p = root / "model";
        let hidden = c.hidden_size;
        let hd = c.head_dim();
        let embed_tokens =
            (&p / "embed_tokens").var("weight", &[c.vocab_size, hidden], nn::Init::Const(0.0));
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = &p / "layers" / i;
                let a = &l / "self_attn";
                let m = &l / "mlp";
                DecoderLayer {
                    input_layernorm: RmsNorm::new(&l / "input_layernorm", hidden, c.rms_norm_eps),
                    attn: Attention {
                        q_proj: linear(&a / "q_proj", hidden, c.num_attention_heads * hd, true),
                        k_proj: linear(&a / "k_proj", hidden, c.num_key_value_heads * hd, true),
                        v_proj: linear(&a / "v_proj", hidden, c.num_key_value_heads * hd, true),
                        o_proj: linear(&a / "o_proj", c.num_attention_heads * hd, hidden, false),
                        heads: c.num_attention_heads,
                        kv_heads: c.num_key_value_heads,
                        head_dim: hd,
                    },
                    post_attention_layernorm: RmsNorm::new(
                        &l / "post_attention_layernorm",
                        hidden,
                        c.rms_norm_eps,
                    ),
                    gate_proj: linear(&m / "gate_proj", hidden, c.intermediate_size, false),
                    up_proj: linear(&m / "up_proj", hidden, c.intermediate_size, false),
                    down_proj: linear(&m / "down_proj", c.intermediate_size, hidden, false),
                }
            })
            .collect();
        let norm = RmsNorm::new(&p / "norm", hidden, c.rms_norm_eps);
        let lm_head = (!tied).then(|| {
            (root / "lm_head").var("weight", &[c.vocab_size, hidden], nn::Init::Const(0.0))
        });
        // transformers: 1 / base^(arange(0, hd, 2) / hd), f32.
        let exponents = Tensor::arange_start_step(0, hd, 2, (Kind::Float, Device::Cpu)) / hd as f64;
        let inv_freq = Tensor::from(c.rope_theta as f32)
            .pow(&exponents)
            .reciprocal()
            .to_device(p.device());
        TextModel {
            config: c.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
        }
    }

    pub fn config(&self) -> &QwenTextConfig {
        &self.config
    }

    /// Token embeddings `[B, L, hidden]` for `ids` `[B, L]`.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        self.embed_tokens
            .index_select(0, &ids.flatten(0, -1))
            .view([ids.size()[0], ids.size()[1], self.config.hidden_size])
    }

    /// M-RoPE cos/sin `[B, L, hd]` in `kind` for positions `[3, B, L]` (transformers'
    /// `Qwen2_5_VLRotaryEmbedding`: frequencies in f32, the sections of the half-dimension
    /// taken from the time, height and width positions in turn, then duplicated).
    pub fn rotary(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let pos = positions.to_kind(Kind::Float).unsqueeze(-1); // [3, B, L, 1]
        let freqs = pos * &self.inv_freq; // [3, B, L, hd/2]
        let mut parts = Vec::with_capacity(3);
        let mut start = 0;
        for (i, &len) in self.config.mrope_section.iter().enumerate() {
            parts.push(freqs.get(i as i64 % 3).narrow(-1, start, len));
            start += len;
        }
        let half = Tensor::cat(&parts, -1);
        let full = Tensor::cat(&[&half, &half], -1);
        (full.cos().to_kind(kind), full.sin().to_kind(kind))
    }

    /// Runs the decoder over `embeds` `[B, L, hidden]` at `positions` `[3, B, L]` and returns
    /// the final-normed hidden states `[B, L, hidden]`. With a cache, keys and values are
    /// written at columns `start..start + L` and the queries attend over columns
    /// `0..start + L`; without one, over the `L` positions themselves.
    pub fn forward(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        mask: TextMask<'_>,
        cache: Option<(&mut KvCache, i64)>,
    ) -> Tensor {
        self.forward_slot(
            embeds,
            positions,
            mask,
            cache.map(|(c, start)| (c, CacheSlot::At(start))),
        )
    }

    /// [`TextModel::forward`] for one token per row written at the column `column` (a
    /// one-element i64 tensor on the model's device) holds, attending over the whole cache
    /// under `mask` `[B, 1, 1, capacity]`: the fixed-shape decode step a CUDA graph captures.
    pub(crate) fn forward_static(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        cache: &mut KvCache,
        column: &Tensor,
    ) -> Tensor {
        self.forward_slot(
            embeds,
            positions,
            TextMask::Explicit(mask),
            Some((cache, CacheSlot::Static(column))),
        )
    }

    fn forward_slot(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        mask: TextMask<'_>,
        mut cache: Option<(&mut KvCache, CacheSlot<'_>)>,
    ) -> Tensor {
        let (cos, sin) = self.rotary(positions, embeds.kind());
        let mut x = embeds.shallow_clone();
        for i in 0..self.layers.len() {
            let cache = cache.as_mut().map(|(c, s)| (&mut **c, *s));
            x = self.layer_slot(i, &x, &cos, &sin, &mask, cache);
        }
        self.final_norm(&x)
    }

    /// Decoder layers.
    pub(crate) fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Decoder layer `i` on `x` `[B, L, hidden]`, with cos/sin from [`TextModel::rotary`]:
    /// one step of [`TextModel::forward`], which training runs layer by layer to checkpoint.
    pub(crate) fn layer(
        &self,
        i: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &TextMask<'_>,
        cache: Option<(&mut KvCache, i64)>,
    ) -> Tensor {
        let cache = cache.map(|(c, start)| (c, CacheSlot::At(start)));
        self.layer_slot(i, x, cos, sin, mask, cache)
    }

    fn layer_slot(
        &self,
        i: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &TextMask<'_>,
        cache: Option<(&mut KvCache, CacheSlot<'_>)>,
    ) -> Tensor {
        let layer = &self.layers[i];
        let h = layer.input_layernorm.forward(x);
        let h = self.attend(&layer.attn, &h, cos, sin, mask, cache, i);
        let x = x + h;
        let h = layer.post_attention_layernorm.forward(&x);
        &x + silu_mlp_forward(&h, &layer.gate_proj, &layer.up_proj, &layer.down_proj)
    }

    /// The norm after the last layer.
    pub(crate) fn final_norm(&self, x: &Tensor) -> Tensor {
        self.norm.forward(x)
    }

    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        a: &Attention,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &TextMask<'_>,
        cache: Option<(&mut KvCache, CacheSlot<'_>)>,
        layer: usize,
    ) -> Tensor {
        let (b, l) = (x.size()[0], x.size()[1]);
        let heads = |t: Tensor, n: i64| t.view([b, l, n, a.head_dim]).transpose(1, 2);
        let q = rotate(&heads(a.q_proj.forward(x), a.heads), cos, sin);
        let k = rotate(&heads(a.k_proj.forward(x), a.kv_heads), cos, sin);
        let v = heads(a.v_proj.forward(x), a.kv_heads);
        let (k, v, start) = match cache {
            Some((cache, CacheSlot::At(start))) => {
                cache.k[layer].narrow(2, start, l).copy_(&k);
                cache.v[layer].narrow(2, start, l).copy_(&v);
                (
                    cache.k[layer].narrow(2, 0, start + l),
                    cache.v[layer].narrow(2, 0, start + l),
                    start,
                )
            }
            Some((cache, CacheSlot::Static(column))) => {
                // `index_copy_` takes the column from device memory; `narrow` would bake the
                // step's column into the kernel's arguments.
                let _ = cache.k[layer].index_copy_(2, column, &k);
                let _ = cache.v[layer].index_copy_(2, column, &v);
                // `start` only picks the mask variant, and the mask here is explicit.
                (
                    cache.k[layer].shallow_clone(),
                    cache.v[layer].shallow_clone(),
                    0,
                )
            }
            None => (k, v, 0),
        };
        let scale = (a.head_dim as f64).powf(-0.5);
        let gqa = a.heads != a.kv_heads;
        let out = match mask {
            // One query per row sees everything before it: no mask at all.
            TextMask::Causal if l == 1 => Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<&Tensor>,
                0.0,
                false,
                scale,
                gqa,
            ),
            // SDPA's `is_causal` aligns the triangle top-left, right only from column 0.
            TextMask::Causal if start == 0 => Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<&Tensor>,
                0.0,
                true,
                scale,
                gqa,
            ),
            TextMask::Causal => {
                let m = causal_mask(l, start, x.device());
                Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&m), 0.0, false, scale, gqa)
            }
            TextMask::Explicit(m) => {
                Tensor::scaled_dot_product_attention(&q, &k, &v, Some(*m), 0.0, false, scale, gqa)
            }
        };
        a.o_proj
            .forward(&out.transpose(1, 2).reshape([b, l, a.heads * a.head_dim]))
    }

    /// Logits `[…, vocab]` in f32 for final hidden states `[…, hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        hidden.matmul(&head.tr()).to_kind(Kind::Float)
    }
}

/// `[1, 1, queries, start + queries]`: query `i` (at column `start + i`) sees columns up to
/// its own.
pub(crate) fn causal_mask(queries: i64, start: i64, device: Device) -> Tensor {
    let rows = Tensor::arange(queries, (Kind::Int64, device)).unsqueeze(1) + start;
    let cols = Tensor::arange(start + queries, (Kind::Int64, device)).unsqueeze(0);
    cols.le_tensor(&rows).view([1, 1, queries, start + queries])
}
