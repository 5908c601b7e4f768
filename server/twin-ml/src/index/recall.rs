//! How much of the exact top-k an approximate search found, over a seeded sample of queries.

use std::collections::HashSet;

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::Neighbours;

/// Recall@k over the queries of the exact result.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Recall {
    /// Queries compared (those of the exact result with at least one neighbour).
    pub queries: usize,
    /// Exact neighbours the approximate search also returned.
    pub found: usize,
    /// Exact neighbours in all (k per query, fewer where the scope holds fewer).
    pub expected: usize,
    /// `found / expected`; 1 when nothing was expected.
    pub recall: f64,
}

/// Recall@k of `approx` against `exact`, over the queries `exact` answered: for each, the share
/// of its first k rows that appear among the first k rows of `approx` for the same query (a
/// query `approx` did not answer counts as finding none). Strict set overlap: an approximate
/// neighbour that ties the k-th exact similarity but is another row counts as a miss.
pub fn recall_at_k(approx: &Neighbours, exact: &Neighbours, k: usize) -> Recall {
    let mut recall = Recall {
        queries: 0,
        found: 0,
        expected: 0,
        recall: 1.0,
    };
    for result in exact.results() {
        let truth: Vec<usize> = result.neighbours.iter().take(k).map(|n| n.row).collect();
        if truth.is_empty() {
            continue;
        }
        let returned: HashSet<usize> = approx
            .get(result.query)
            .unwrap_or_default()
            .iter()
            .take(k)
            .map(|n| n.row)
            .collect();
        recall.queries += 1;
        recall.expected += truth.len();
        recall.found += truth.iter().filter(|row| returned.contains(row)).count();
    }
    if recall.expected > 0 {
        recall.recall = recall.found as f64 / recall.expected as f64;
    }
    recall
}

/// `count` distinct rows of `0..rows` (all of them if `count >= rows`), ascending, the same for
/// the same seed. The sampler is rand 0.9's `StdRng`, so a rand upgrade may change the sample.
pub fn sample_queries(rows: usize, count: usize, seed: u64) -> Vec<usize> {
    if count >= rows {
        return (0..rows).collect();
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sample = rand::seq::index::sample(&mut rng, rows, count).into_vec();
    sample.sort_unstable();
    sample
}
