//! Dot products over embedding rows: the vectorisable kernel the HNSW graph runs on, and the
//! naive loop kept as the benchmark's baseline.

use serde::{Deserialize, Serialize};

/// Independent partial sums per dot product. A single running sum is one long dependency chain
/// that LLVM may not reorder (float addition is not associative), so the naive loop runs one
/// multiply-add per cycle at best; 16 accumulators give it four 4-wide SSE (or two AVX) registers
/// of independent work, which it vectorises without `unsafe` or target-specific code.
const LANES: usize = 16;

/// Which dot-product loop an HNSW build and search use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DotKernel {
    /// 16 accumulators over `chunks_exact(16)`: the one to use.
    #[default]
    Vectorised,
    /// One running sum: exists only so the benchmark can measure what the vectorised kernel buys.
    Naive,
}

/// `a · b` with 16 independent accumulators; the order of additions differs from [`dot_naive`],
/// so results agree to f32 rounding, not bit for bit.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let a_blocks = a.chunks_exact(LANES);
    let b_blocks = b.chunks_exact(LANES);
    let tail: f32 = a_blocks
        .remainder()
        .iter()
        .zip(b_blocks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut sums = [0.0f32; LANES];
    for (x, y) in a_blocks.zip(b_blocks) {
        for ((sum, x), y) in sums.iter_mut().zip(x).zip(y) {
            *sum += x * y;
        }
    }
    // A plain sum: a pairwise fold (8 + 8, then 4 + 4) looked cheaper but made LLVM split the
    // accumulators into 2-wide registers, which measured 1.6× slower than this (4-wide).
    sums.iter().sum::<f32>() + tail
}

/// `a · b` with one running sum, in index order.
#[inline]
pub fn dot_naive(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectorised_and_naive_agree_on_every_remainder_length() {
        for len in [0, 1, 15, 16, 17, 31, 32, 33, 512, 515] {
            let a: Vec<f32> = (0..len)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
                .collect();
            let b: Vec<f32> = (0..len)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0)
                .collect();
            let exact: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            let tolerance = 1e-5 * (1.0 + len as f64);
            assert!(
                (f64::from(dot(&a, &b)) - exact).abs() < tolerance,
                "len {len}"
            );
            assert!(
                (f64::from(dot_naive(&a, &b)) - exact).abs() < tolerance,
                "len {len}"
            );
        }
    }
}
