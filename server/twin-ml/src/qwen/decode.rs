//! The rollout engine's decode step, three ways: eager over the cache's filled columns, the
//! same step in fixed shapes, and that fixed-shape step captured and replayed as CUDA graphs.
//!
//! On a GPU, eager decoding of a small batch is bound by kernel launches (a 3B model issues
//! several hundred per token), not by reading the weights. A CUDA graph launches the whole
//! step at once, but replays exactly what it captured: the same kernels, shapes and memory.
//! So the fixed-shape step ([`StaticDecoder`]) keeps everything that varies out of shapes and
//! host values:
//!
//! - the cache is preallocated for the batch (rows × prompt + new tokens) and each step writes
//!   its column through `index_copy_` with the column in a device tensor;
//! - attention runs over the whole capacity under a validity mask `[rows, capacity]` that the
//!   step itself extends by the column it writes (the prompt's padding stays masked);
//! - token ids, positions and the column are written into fixed input tensors before each
//!   replay, and logits come out in a fixed output tensor;
//! - rows are padded up to a bucket (the batch's row count, then powers of two below it), one
//!   graph per bucket; when rows finish, the live ones are packed into the first rows of the
//!   same buffers, so the memory every graph captured stays valid.
//!
//! Masked columns add exact zeros, so the fixed-shape step computes what the eager one does up
//! to the order of float sums; its tokens are held to the engine's promise across batch
//! shapes (the margin rule). A graph replays the fixed-shape step's own kernels, so on one
//! device its tokens equal that step run eagerly. [`DecodeMode::Static`] runs that step
//! without graphs on any device, which is how the CPU tests cover the code a graph captures.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::engine::GenerationStats;
use super::model::{QwenVl, torch_call};
use super::text::{KvCache, TextMask};
use crate::MlError;
use crate::cuda_graph::CudaGraph;

/// How the engine runs its decode steps ([`super::EngineOptions::decode`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecodeMode {
    /// CUDA graphs on a CUDA device where the shim loads ([`crate::cuda_graph`]) unless
    /// `TWIN_CUDA_GRAPHS=0`, eager otherwise.
    #[default]
    Auto,
    /// One eager forward pass per step over the cache's filled columns.
    Eager,
    /// The fixed-shape step that graphs capture, run eagerly (any device).
    Static,
    /// CUDA graphs; where CUDA or the shim is missing, eager, and where a capture fails, the
    /// fixed-shape step run eagerly; either way with a warning and the reason in the stats.
    Graphs,
}

/// What the decode steps of one batch ran as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecodePath {
    Eager,
    Static,
    Graphs,
}

/// The decode state of one batch: its generation cache and whatever the path needs beside it.
pub(super) enum Decoder {
    Eager(EagerDecoder),
    Static(StaticDecoder),
}

impl Decoder {
    /// Takes over the batch's generation cache (`rows × capacity`, the prompt's `width` columns
    /// filled) and each row's prompt validity `[rows, width]` (`padded`: some prompt is shorter
    /// than `width`).
    pub(super) fn new(
        model: &QwenVl,
        mode: DecodeMode,
        cache: KvCache,
        prefix_valid: Tensor,
        width: i64,
        padded: bool,
        stats: &mut GenerationStats,
    ) -> Result<Decoder, MlError> {
        let eager = |cache, prefix_valid| {
            Decoder::Eager(EagerDecoder {
                cache,
                prefix_valid,
                width,
                padded,
            })
        };
        let graphs = match mode {
            DecodeMode::Eager => return Ok(eager(cache, prefix_valid)),
            DecodeMode::Auto if graphs_turned_off() => return Ok(eager(cache, prefix_valid)),
            DecodeMode::Static => None,
            DecodeMode::Auto | DecodeMode::Graphs => match graphs_on(model.device()) {
                Ok(index) => Some(index),
                Err(why) => {
                    if mode == DecodeMode::Graphs {
                        tracing::warn!(reason = %why, "CUDA graphs unavailable; decoding eagerly");
                        stats.graph_fallback = Some(why);
                    }
                    return Ok(eager(cache, prefix_valid));
                }
            },
        };
        let decoder = torch_call(|| {
            tch::no_grad(|| StaticDecoder::new(cache, &prefix_valid, width, graphs))
        })?;
        Ok(Decoder::Static(decoder))
    }

    /// Keeps only the rows at `keep` (indices into the current rows, ascending), in that order.
    pub(super) fn keep_rows(&mut self, keep: &[i64]) -> Result<(), MlError> {
        match self {
            Decoder::Eager(d) => d.keep_rows(keep),
            Decoder::Static(d) => d.keep_rows(keep),
        }
    }

    /// Runs one step: each live row's last token at its position, written at cache column
    /// `width + step`; returns the next logits `[rows, vocab]` (f32).
    pub(super) fn step(
        &mut self,
        model: &QwenVl,
        last_tokens: &[i64],
        positions: &[i64],
        step: i64,
        stats: &mut GenerationStats,
    ) -> Result<Tensor, MlError> {
        match self {
            Decoder::Eager(d) => d.step(model, last_tokens, positions, step),
            Decoder::Static(d) => d.step(model, last_tokens, positions, step, stats),
        }
    }

    pub(super) fn path(&self) -> DecodePath {
        match self {
            Decoder::Eager(_) => DecodePath::Eager,
            Decoder::Static(d) if d.graphs.is_some() => DecodePath::Graphs,
            Decoder::Static(_) => DecodePath::Static,
        }
    }
}

/// `TWIN_CUDA_GRAPHS=0` turns the default's graphs off in this process (an escape hatch should a
/// driver or libtorch build mishandle them); an explicit [`DecodeMode::Graphs`] still asks.
fn graphs_turned_off() -> bool {
    std::env::var_os("TWIN_CUDA_GRAPHS").is_some_and(|v| v == "0")
}

/// The CUDA device index graphs would run on, or why there are none.
fn graphs_on(device: Device) -> Result<usize, String> {
    match device {
        Device::Cuda(index) => crate::cuda_graph::available().map(|()| index),
        other => Err(format!(
            "the model is on {}, not a CUDA device",
            crate::device::name(other)
        )),
    }
}

pub(super) struct EagerDecoder {
    cache: KvCache,
    prefix_valid: Tensor,
    width: i64,
    padded: bool,
}

impl EagerDecoder {
    fn keep_rows(&mut self, keep: &[i64]) -> Result<(), MlError> {
        let device = self.prefix_valid.device();
        torch_call(|| {
            tch::no_grad(|| {
                let keep = Tensor::from_slice(keep).to_device(device);
                self.cache.select_rows(&keep);
                self.prefix_valid = self.prefix_valid.index_select(0, &keep);
            })
        })
    }

    fn step(
        &mut self,
        model: &QwenVl,
        last_tokens: &[i64],
        positions: &[i64],
        step: i64,
    ) -> Result<Tensor, MlError> {
        let device = model.device();
        let column = self.width + step;
        let n = last_tokens.len() as i64;
        torch_call(|| {
            tch::no_grad(|| {
                let ids = Tensor::from_slice(last_tokens)
                    .to_device(device)
                    .view([n, 1]);
                let embeds = model.text.embed(&ids);
                let pos = Tensor::from_slice(positions)
                    .to_device(device)
                    .view([1, n, 1])
                    .expand([3, n, 1], false);
                let hidden = if self.padded {
                    let generated = Tensor::ones([n, step + 1], (Kind::Bool, device));
                    let mask = Tensor::cat(&[&self.prefix_valid, &generated], 1).view([
                        n,
                        1,
                        1,
                        column + 1,
                    ]);
                    model.text.forward(
                        &embeds,
                        &pos,
                        TextMask::Explicit(&mask),
                        Some((&mut self.cache, column)),
                    )
                } else {
                    model.text.forward(
                        &embeds,
                        &pos,
                        TextMask::Causal,
                        Some((&mut self.cache, column)),
                    )
                };
                model.text.logits(&hidden.select(1, 0))
            })
        })
    }
}

/// Fixed-shape decoding, optionally through CUDA graphs (the module's description).
pub(super) struct StaticDecoder {
    /// `[rows, kv_heads, capacity, head_dim]` per layer; live rows are `0..live`.
    cache: KvCache,
    /// `[rows, capacity]`: which columns each row may attend to.
    valid: Tensor,
    /// Inputs written before each step: `[rows, 1]`, `[3, rows, 1]`, `[1]` (all i64).
    ids: Tensor,
    positions: Tensor,
    column: Tensor,
    width: i64,
    live: i64,
    /// Ascending; the last is the batch's row count.
    buckets: Vec<i64>,
    /// `Some(device index)` while graphs are in use.
    graphs: Option<usize>,
    /// Per bucket: its graph and the logits tensor its replays write.
    captured: BTreeMap<i64, (CudaGraph, Tensor)>,
}

impl StaticDecoder {
    fn new(
        cache: KvCache,
        prefix_valid: &Tensor,
        width: i64,
        graphs: Option<usize>,
    ) -> StaticDecoder {
        let (rows, capacity) = (cache.rows(), cache.capacity());
        let device = prefix_valid.device();
        let valid = Tensor::zeros([rows, capacity], (Kind::Bool, device));
        valid.narrow(1, 0, width).copy_(prefix_valid);
        let mut buckets: Vec<i64> = std::iter::successors(Some(1i64), |b| Some(b * 2))
            .take_while(|&b| b < rows)
            .collect();
        buckets.push(rows);
        StaticDecoder {
            ids: Tensor::zeros([rows, 1], (Kind::Int64, device)),
            positions: Tensor::zeros([3, rows, 1], (Kind::Int64, device)),
            column: Tensor::zeros([1], (Kind::Int64, device)),
            cache,
            valid,
            width,
            live: rows,
            buckets,
            graphs,
            captured: BTreeMap::new(),
        }
    }

    fn keep_rows(&mut self, keep: &[i64]) -> Result<(), MlError> {
        let device = self.valid.device();
        torch_call(|| {
            tch::no_grad(|| {
                let n = keep.len() as i64;
                let keep = Tensor::from_slice(keep).to_device(device);
                // Gathered first, then written into the leading rows of the same storage: the
                // captured graphs keep pointing at valid memory.
                for t in self
                    .cache
                    .k
                    .iter()
                    .chain(&self.cache.v)
                    .chain([&self.valid])
                {
                    let kept = t.index_select(0, &keep);
                    t.narrow(0, 0, n).copy_(&kept);
                }
            })
        })?;
        self.live = keep.len() as i64;
        Ok(())
    }

    fn bucket(&self) -> i64 {
        self.buckets
            .iter()
            .copied()
            .find(|&b| b >= self.live)
            .unwrap_or(self.live)
    }

    /// The fixed-shape step over the first `bucket` rows, reading the input tensors and writing
    /// the cache, the mask and fresh logits `[bucket, vocab]`. Nothing here reads a value on
    /// the host or copies from it, so a CUDA graph can capture it.
    fn static_step(&mut self, model: &QwenVl, bucket: i64) -> Tensor {
        let capacity = self.valid.size()[1];
        let mut valid = self.valid.narrow(0, 0, bucket);
        let _ = valid.index_fill_(1, &self.column, 1i64);
        let embeds = model.text.embed(&self.ids.narrow(0, 0, bucket));
        let mask = valid.view([bucket, 1, 1, capacity]);
        let mut rows = self.cache.row_range(0, bucket);
        let hidden = model.text.forward_static(
            &embeds,
            &self.positions.narrow(1, 0, bucket),
            &mask,
            &mut rows,
            &self.column,
        );
        model.text.logits(&hidden.select(1, 0))
    }

    fn step(
        &mut self,
        model: &QwenVl,
        last_tokens: &[i64],
        positions: &[i64],
        step: i64,
        stats: &mut GenerationStats,
    ) -> Result<Tensor, MlError> {
        let n = last_tokens.len() as i64;
        debug_assert_eq!(n, self.live);
        let bucket = self.bucket();
        torch_call(|| {
            tch::no_grad(|| {
                self.ids
                    .narrow(0, 0, n)
                    .copy_(&Tensor::from_slice(last_tokens).view([n, 1]));
                self.positions
                    .narrow(1, 0, n)
                    .copy_(&Tensor::from_slice(positions).view([1, n, 1]));
                let _ = self.column.fill_(self.width + step);
            })
        })?;
        let Some(device) = self.graphs else {
            let logits = torch_call(|| tch::no_grad(|| self.static_step(model, bucket)))?;
            return Ok(logits.narrow(0, 0, n));
        };
        if !self.captured.contains_key(&bucket) {
            let started = Instant::now();
            let captured = {
                let this = &mut *self;
                tch::no_grad(|| CudaGraph::capture(device, 1, || this.static_step(model, bucket)))
            };
            match captured {
                Ok(graph) => {
                    stats.graph_captures += 1;
                    stats.capture_seconds += started.elapsed().as_secs_f64();
                    self.captured.insert(bucket, graph);
                }
                Err(why) => {
                    // The warm-up may have run the step already, but running it again writes
                    // the same values.
                    tracing::warn!(reason = %why, bucket, "CUDA graph capture failed; \
                                   decoding eagerly in fixed shapes");
                    stats.graph_fallback = Some(format!("capture failed: {why}"));
                    self.graphs = None;
                    self.captured.clear();
                    let logits = torch_call(|| tch::no_grad(|| self.static_step(model, bucket)))?;
                    return Ok(logits.narrow(0, 0, n));
                }
            }
        }
        let (graph, logits) = &self.captured[&bucket];
        graph
            .replay()
            .map_err(|e| MlError::from_torch(tch::TchError::Torch(e)))?;
        stats.graph_replays += 1;
        Ok(logits.narrow(0, 0, n))
    }
}
