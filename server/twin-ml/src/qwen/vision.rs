//! Qwen2.5-VL's vision tower in tch, following transformers 5.17's
//! `Qwen2_5_VisionTransformerPretrainedModel`: a bias-free Conv3d patch embedding (computed as
//! one matrix product: its kernel equals its stride), 2-D rotary position embeddings, blocks of
//! RMSNorm → attention → RMSNorm → SwiGLU, attention inside windows of `window_size` pixels
//! except in the `fullatt_block_indexes` blocks, and the 2×2 patch merger. Tokens are reordered
//! window by window before the blocks and put back in raster order after the merger, exactly as
//! the reference does, so the output rows line up with the prompt's image placeholders.
//!
//! Attention runs one `scaled_dot_product_attention` per distinct segment length (windows at
//! an image's right and bottom edges are smaller), with all equal-length windows batched, rather
//! than one call per window: the results are the same, the calls far fewer.

use std::collections::BTreeMap;

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::config::QwenVisionConfig;
use super::layers::{RmsNorm, linear, silu_mlp_forward};

/// An image's patch grid: temporal, height and width in patches (`image_grid_thw`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub t: i64,
    pub h: i64,
    pub w: i64,
}

impl Grid {
    pub fn patches(&self) -> i64 {
        self.t * self.h * self.w
    }

    /// Tokens the merger turns this grid into (`t·h·w / merge²`): the placeholder count.
    pub fn tokens(&self, merge: i64) -> i64 {
        self.patches() / (merge * merge)
    }
}

/// Contiguous runs of the (window-ordered) sequence that attend among themselves, batched by
/// length: `(length, row indices of every run of that length, in order)`.
struct SegmentPlan {
    groups: Vec<(i64, Option<Tensor>)>,
}

impl SegmentPlan {
    /// `lengths` are consecutive runs covering the sequence.
    fn new(lengths: &[i64], device: Device) -> SegmentPlan {
        let mut by_length: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        let mut start = 0;
        for &len in lengths {
            by_length.entry(len).or_default().extend(start..start + len);
            start += len;
        }
        // One length means the runs tile the sequence in order: no gather needed.
        let single = by_length.len() == 1;
        let groups = by_length
            .into_iter()
            .map(|(len, rows)| {
                let index = (!single).then(|| Tensor::from_slice(&rows).to_device(device));
                (len, index)
            })
            .collect();
        SegmentPlan { groups }
    }
}

struct VisionAttention {
    qkv: nn::Linear,
    proj: nn::Linear,
    num_heads: i64,
    head_dim: i64,
}

impl VisionAttention {
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, plan: &SegmentPlan) -> Tensor {
        let n = x.size()[0];
        let hidden = self.num_heads * self.head_dim;
        let qkv = self
            .qkv
            .forward(x)
            .view([n, 3, self.num_heads, self.head_dim]);
        let q = rotary(&qkv.select(1, 0), cos, sin);
        let k = rotary(&qkv.select(1, 1), cos, sin);
        let v = qkv.select(1, 2);
        let scale = (self.head_dim as f64).powf(-0.5);
        let attend = |q: &Tensor, k: &Tensor, v: &Tensor, len: i64| {
            // [G·len, heads, hd] → [G, heads, len, hd]
            let shape = |t: &Tensor| {
                t.reshape([-1, len, self.num_heads, self.head_dim])
                    .transpose(1, 2)
            };
            let out = Tensor::scaled_dot_product_attention(
                &shape(q),
                &shape(k),
                &shape(v),
                None::<&Tensor>,
                0.0,
                false,
                scale,
                false,
            );
            out.transpose(1, 2).reshape([-1, hidden])
        };
        // Attention scores are materialised when libtorch's CPU kernels fall back to the math
        // path; at most this many segments go into one call so a batch of many large images
        // (full-attention blocks: one segment per image) stays within ~64 MiB of scores.
        let per_call = |len: i64| ((64 << 20) / (self.num_heads * len * len * 4)).max(1);
        let out = match plan.groups.as_slice() {
            [(len, None)] if n / len <= per_call(*len) => attend(&q, &k, &v, *len),
            [(len, None)] => {
                let rows = per_call(*len) * len;
                let parts: Vec<Tensor> = (0..n)
                    .step_by(rows as usize)
                    .map(|start| {
                        let take = rows.min(n - start);
                        attend(
                            &q.narrow(0, start, take),
                            &k.narrow(0, start, take),
                            &v.narrow(0, start, take),
                            *len,
                        )
                    })
                    .collect();
                Tensor::cat(&parts, 0)
            }
            groups => {
                let mut out = Tensor::zeros([n, hidden], (x.kind(), x.device()));
                for (len, index) in groups {
                    let index = index.as_ref().expect("several lengths carry their rows");
                    let part = attend(
                        &q.index_select(0, index),
                        &k.index_select(0, index),
                        &v.index_select(0, index),
                        *len,
                    );
                    let _ = out.index_copy_(0, index, &part);
                }
                out
            }
        };
        self.proj.forward(&out)
    }
}

/// transformers' `apply_rotary_pos_emb_vision`: rotate in f32, return in the input's kind.
/// `x` is `[N, heads, hd]`, `cos`/`sin` `[N, hd]` in f32.
fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let kind = x.kind();
    let x = x.to_kind(Kind::Float);
    let (cos, sin) = (cos.unsqueeze(-2), sin.unsqueeze(-2));
    let half = x.size()[2] / 2;
    let rotated = Tensor::cat(&[-x.narrow(2, half, half), x.narrow(2, 0, half)], 2);
    (&x * cos + rotated * sin).to_kind(kind)
}

struct VisionMlp {
    gate_proj: nn::Linear,
    up_proj: nn::Linear,
    down_proj: nn::Linear,
}

struct VisionBlock {
    norm1: RmsNorm,
    attn: VisionAttention,
    norm2: RmsNorm,
    mlp: VisionMlp,
}

struct Merger {
    ln_q: RmsNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    width: i64,
}

/// What the steps of one pass over a set of images share (see [`VisionTower::prepare`]).
pub(crate) struct VisionPass {
    window_index: Tensor,
    cos: Tensor,
    sin: Tensor,
    window_plan: SegmentPlan,
    full_plan: SegmentPlan,
    /// Patches per merged token.
    unit: i64,
}

/// The whole tower.
pub struct VisionTower {
    config: QwenVisionConfig,
    patch_embed: Tensor,
    blocks: Vec<VisionBlock>,
    merger: Merger,
    inv_freq: Tensor,
}

impl VisionTower {
    /// Variables under `p` (`visual`), named as the checkpoint names them.
    pub fn new(p: nn::Path, c: &QwenVisionConfig) -> VisionTower {
        let hidden = c.hidden_size;
        let patch_embed = (&p / "patch_embed" / "proj").var(
            "weight",
            &[
                hidden,
                c.in_channels,
                c.temporal_patch_size,
                c.patch_size,
                c.patch_size,
            ],
            nn::Init::Const(0.0),
        );
        let blocks = (0..c.depth)
            .map(|i| {
                let b = &p / "blocks" / i;
                VisionBlock {
                    norm1: RmsNorm::new(&b / "norm1", hidden, 1e-6),
                    attn: VisionAttention {
                        qkv: linear(&b / "attn" / "qkv", hidden, 3 * hidden, true),
                        proj: linear(&b / "attn" / "proj", hidden, hidden, true),
                        num_heads: c.num_heads,
                        head_dim: c.head_dim(),
                    },
                    norm2: RmsNorm::new(&b / "norm2", hidden, 1e-6),
                    mlp: VisionMlp {
                        gate_proj: linear(
                            &b / "mlp" / "gate_proj",
                            hidden,
                            c.intermediate_size,
                            true,
                        ),
                        up_proj: linear(&b / "mlp" / "up_proj", hidden, c.intermediate_size, true),
                        down_proj: linear(
                            &b / "mlp" / "down_proj",
                            c.intermediate_size,
                            hidden,
                            true,
                        ),
                    },
                }
            })
            .collect();
        let width = hidden * c.spatial_merge_size * c.spatial_merge_size;
        let m = &p / "merger";
        let merger = Merger {
            ln_q: RmsNorm::new(&m / "ln_q", hidden, 1e-6),
            fc1: linear(&m / "mlp" / 0, width, width, true),
            fc2: linear(&m / "mlp" / 2, width, c.out_hidden_size, true),
            width,
        };
        // transformers: 1 / base^(arange(0, d, 2) / d) with d = head_dim / 2, in f32.
        let spatial = c.head_dim() / 2;
        let exponents =
            Tensor::arange_start_step(0, spatial, 2, (Kind::Float, Device::Cpu)) / spatial as f64;
        let inv_freq = Tensor::from(c.rope_theta as f32)
            .pow(&exponents)
            .reciprocal()
            .to_device(p.device());
        VisionTower {
            config: c.clone(),
            patch_embed,
            blocks,
            merger,
            inv_freq,
        }
    }

    /// `pixel_values` `[patches, patch_dim]` for all `grids` (in order) → merged image tokens
    /// `[Σ tokens, out_hidden_size]` in raster order per image, images in order.
    pub fn forward(&self, pixel_values: &Tensor, grids: &[Grid]) -> Tensor {
        let pass = self.prepare(grids, pixel_values.device());
        let mut x = self.embed_patches(pixel_values, &pass);
        for i in 0..self.blocks.len() {
            x = self.block(i, &x, &pass);
        }
        self.merge(&x, &pass)
    }

    /// Blocks in the tower.
    pub(crate) fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// What every step of a pass over `grids` shares: the window order, the rotary tables in
    /// that order and the attention segments.
    pub(crate) fn prepare(&self, grids: &[Grid], device: Device) -> VisionPass {
        let c = &self.config;
        let unit = c.spatial_merge_size * c.spatial_merge_size;
        let n: i64 = grids.iter().map(Grid::patches).sum();
        let layout = window_layout(grids, c);
        let window_index = Tensor::from_slice(&layout.window_index).to_device(device);
        let (cos, sin) = self.rotary_tables(grids, device);
        let by_window = |t: &Tensor| {
            t.view([n / unit, unit, -1])
                .index_select(0, &window_index)
                .view([n, -1])
        };
        VisionPass {
            cos: by_window(&cos),
            sin: by_window(&sin),
            window_plan: SegmentPlan::new(&layout.window_lengths, device),
            full_plan: SegmentPlan::new(&layout.image_lengths, device),
            window_index,
            unit,
        }
    }

    /// The patch embedding `[patches, hidden]`, rows in window order: the blocks' input.
    pub(crate) fn embed_patches(&self, pixel_values: &Tensor, pass: &VisionPass) -> Tensor {
        let kind = self.patch_embed.kind();
        let hidden = self.config.hidden_size;
        let x = pixel_values
            .to_kind(kind)
            .matmul(&self.patch_embed.view([hidden, -1]).tr());
        let n = x.size()[0];
        x.view([n / pass.unit, pass.unit, -1])
            .index_select(0, &pass.window_index)
            .view([n, -1])
    }

    /// Block `i` on `x` `[patches, hidden]` (window order).
    pub(crate) fn block(&self, i: usize, x: &Tensor, pass: &VisionPass) -> Tensor {
        let block = &self.blocks[i];
        let plan = if self.config.fullatt_block_indexes.contains(&(i as i64)) {
            &pass.full_plan
        } else {
            &pass.window_plan
        };
        let h = block
            .attn
            .forward(&block.norm1.forward(x), &pass.cos, &pass.sin, plan);
        let x = x + h;
        let m = &block.mlp;
        let h = silu_mlp_forward(
            &block.norm2.forward(&x),
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        );
        &x + h
    }

    /// The merger on the last block's output: merged image tokens in raster order.
    pub(crate) fn merge(&self, x: &Tensor, pass: &VisionPass) -> Tensor {
        let merged = self.merger.ln_q.forward(x).view([-1, self.merger.width]);
        let merged = self
            .merger
            .fc2
            .forward(&self.merger.fc1.forward(&merged).gelu("none"));
        let reverse = pass.window_index.argsort(0, false);
        merged.index_select(0, &reverse)
    }

    /// cos and sin `[patches, head_dim]` (f32) of each patch's (row, column), patches in the
    /// processor's order: 2×2 merge blocks in raster order, raster order inside each block.
    fn rotary_tables(&self, grids: &[Grid], device: Device) -> (Tensor, Tensor) {
        let m = self.config.spatial_merge_size;
        let mut rows = Vec::new();
        let mut cols = Vec::new();
        for g in grids {
            for _ in 0..g.t {
                for bh in 0..g.h / m {
                    for bw in 0..g.w / m {
                        for mh in 0..m {
                            for mw in 0..m {
                                rows.push((bh * m + mh) as f32);
                                cols.push((bw * m + mw) as f32);
                            }
                        }
                    }
                }
            }
        }
        let rows = Tensor::from_slice(&rows).to_device(device).unsqueeze(1);
        let cols = Tensor::from_slice(&cols).to_device(device).unsqueeze(1);
        let freq = Tensor::cat(&[&rows * &self.inv_freq, &cols * &self.inv_freq], 1);
        let freq = Tensor::cat(&[&freq, &freq], 1);
        (freq.cos(), freq.sin())
    }
}

/// The reordering window attention needs, over merged tokens (groups of merge² patches).
#[derive(Debug, PartialEq)]
pub(crate) struct WindowLayout {
    /// Merged-token index at each position of the window order (transformers' `window_index`).
    pub window_index: Vec<i64>,
    /// Patches per window, in window order (empty windows left out).
    pub window_lengths: Vec<i64>,
    /// Patches per image frame: the full-attention blocks' segments.
    pub image_lengths: Vec<i64>,
}

/// transformers' `get_vision_window_index` and `get_vision_cu_seqlens`, as lengths: windows of
/// `window_size / merge / patch` merged tokens per side tile each frame from its top-left
/// corner, windows in raster order, tokens in raster order inside a window.
pub(crate) fn window_layout(grids: &[Grid], c: &QwenVisionConfig) -> WindowLayout {
    let m = c.spatial_merge_size;
    let unit = m * m;
    let side = c.window_size / m / c.patch_size;
    let mut layout = WindowLayout {
        window_index: Vec::new(),
        window_lengths: Vec::new(),
        image_lengths: Vec::new(),
    };
    let mut offset = 0;
    for g in grids {
        let (lh, lw) = (g.h / m, g.w / m);
        for t in 0..g.t {
            layout.image_lengths.push(g.h * g.w);
            let frame = offset + t * lh * lw;
            for wy in (0..lh).step_by(side as usize) {
                for wx in (0..lw).step_by(side as usize) {
                    let mut count = 0;
                    for y in wy..(wy + side).min(lh) {
                        for x in wx..(wx + side).min(lw) {
                            layout.window_index.push(frame + y * lw + x);
                            count += 1;
                        }
                    }
                    layout.window_lengths.push(count * unit);
                }
            }
        }
        offset += g.t * lh * lw;
    }
    layout
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_tile_each_image_from_its_corner() {
        let c = QwenVisionConfig {
            window_size: 56, // 2 merged tokens per window side
            ..QwenVisionConfig::default()
        };
        // 3×3 merged tokens: windows of 2×2, 2×1, 1×2, 1×1.
        let layout = window_layout(&[Grid { t: 1, h: 6, w: 6 }], &c);
        assert_eq!(layout.window_index, vec![0, 1, 3, 4, 2, 5, 6, 7, 8]);
        assert_eq!(layout.window_lengths, vec![16, 8, 8, 4]);
        assert_eq!(layout.image_lengths, vec![36]);
        // A second image continues the numbering.
        let layout = window_layout(&[Grid { t: 1, h: 2, w: 4 }, Grid { t: 1, h: 2, w: 2 }], &c);
        assert_eq!(layout.window_index, vec![0, 1, 2]);
        assert_eq!(layout.window_lengths, vec![8, 4]);
        assert_eq!(layout.image_lengths, vec![8, 4]);
    }
}
