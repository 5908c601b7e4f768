//! The mining index: for every image, the most similar images of *other* instances, within its
//! category or across the whole dataset — the hard negatives of the mine stage.
//!
//! Two searches answer the same question with the same result type ([`Neighbours`]):
//! - [`HnswIndex`] (instant-distance's HNSW graph, CPU), approximate;
//! - [`search_exact`] (chunked matrix products with libtorch), exact: the recall oracle, the GPU
//!   path, and on a 2-core CPU also the faster one for a per-category scope (it multiplies each
//!   category by itself) and about even with HNSW for a global scope at 100k rows; HNSW pays off
//!   for a global scope beyond that (BENCHMARKS.md, "Mining index").
//!
//! [`recall_at_k`] over a seeded [`sample_queries`] sample says how close the first came to the
//! second. A query's own instance is never among its neighbours, and under
//! [`Scope::PerCategory`] neither is any other category.
//!
//! **Result order (both searches):** similarity descending, ties by row ascending; `rank` counts
//! from 1 in that order.

mod exact;
mod hnsw;
mod kernel;
mod matrix;
mod recall;
pub mod synthetic;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

pub use exact::search_exact;
pub use hnsw::{Determinism, HnswIndex, HnswParams, search_hnsw};
pub use kernel::{DotKernel, dot, dot_naive};
pub use matrix::{EmbeddingMatrix, RowLabel};
pub use recall::{Recall, recall_at_k, sample_queries};

use crate::MlError;

/// Where a query's neighbours may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Only rows of the query's category.
    PerCategory,
    /// Any row of the matrix.
    Global,
}

/// Which rows to find neighbours for.
#[derive(Debug, Clone, Copy)]
pub enum Queries<'a> {
    All,
    /// These rows, each at most once in the result (duplicates collapse), in ascending order.
    Rows(&'a [usize]),
}

impl Queries<'_> {
    /// The query rows, ascending and distinct, each checked against the matrix.
    fn resolve(self, matrix: &EmbeddingMatrix) -> Result<Vec<usize>, MlError> {
        match self {
            Queries::All => Ok((0..matrix.len()).collect()),
            Queries::Rows(rows) => {
                if let Some(&bad) = rows.iter().find(|&&row| row >= matrix.len()) {
                    return Err(MlError::Invalid(format!(
                        "query row {bad} is out of range: the matrix has {} rows",
                        matrix.len()
                    )));
                }
                let mut rows = rows.to_vec();
                rows.sort_unstable();
                rows.dedup();
                Ok(rows)
            }
        }
    }
}

/// One neighbour of a query.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Neighbour {
    /// The neighbour's row in the matrix.
    pub row: usize,
    /// Cosine similarity to the query (the dot product of the two unit rows).
    pub similarity: f32,
    /// Position in the query's list, from 1.
    pub rank: u32,
}

/// A query row and its neighbours, best first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryNeighbours {
    pub query: usize,
    pub neighbours: Vec<Neighbour>,
}

/// The answer of a search: one list per query row, ordered by query row.
///
/// Serialisable for reports, but not deserialisable: only a search builds one, which is what
/// keeps the order [`Neighbours::get`] relies on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Neighbours {
    k: usize,
    results: Vec<QueryNeighbours>,
}

impl Neighbours {
    /// The k that was asked for; a list may be shorter (see [`Neighbours::short_lists`]).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Every query's list, ascending by query row.
    pub fn results(&self) -> &[QueryNeighbours] {
        &self.results
    }

    /// The list of one query row, if it was queried.
    pub fn get(&self, query: usize) -> Option<&[Neighbour]> {
        self.results
            .binary_search_by_key(&query, |result| result.query)
            .ok()
            .map(|at| self.results[at].neighbours.as_slice())
    }

    /// How many queries got fewer than k neighbours: their scope held fewer than k rows of other
    /// instances (or, for HNSW, the graph did not reach them).
    pub fn short_lists(&self) -> usize {
        self.results
            .iter()
            .filter(|result| result.neighbours.len() < self.k)
            .count()
    }

    /// Total neighbours over all queries.
    pub fn total(&self) -> usize {
        self.results.iter().map(|r| r.neighbours.len()).sum()
    }

    fn new(k: usize, mut results: Vec<QueryNeighbours>) -> Self {
        results.sort_unstable_by_key(|result| result.query);
        let neighbours = Self { k, results };
        let short = neighbours.short_lists();
        if short > 0 {
            tracing::info!(
                k,
                queries = neighbours.results.len(),
                short,
                "some queries have fewer than k neighbours from other instances in their scope"
            );
        }
        neighbours
    }
}

/// Orders candidates (already free of the query's instance) by similarity descending, then row
/// ascending, keeps the first k and numbers them.
fn rank_candidates(mut candidates: Vec<(usize, f32)>, k: usize) -> Vec<Neighbour> {
    candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    candidates.truncate(k);
    candidates
        .into_iter()
        .zip(1u32..)
        .map(|((row, similarity), rank)| Neighbour {
            row,
            similarity,
            rank,
        })
        .collect()
}

/// The rows one search space covers: a category's rows, or all rows.
#[derive(Debug)]
struct Partition {
    rows: Vec<usize>,
    /// Distinct instances among `rows`.
    instances: usize,
    /// Rows of the largest instance: a query must look this much past k to be sure of k others.
    largest_instance: usize,
}

/// Splits the matrix by scope; partition order is by category id, so it is deterministic.
/// Empty partitions never appear (only categories that have rows are listed).
fn partitions(matrix: &EmbeddingMatrix, scope: Scope) -> Vec<(u32, Partition)> {
    let mut by_key: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (row, &label) in matrix.labels().iter().enumerate() {
        by_key
            .entry(partition_key(label, scope))
            .or_default()
            .push(row);
    }
    by_key
        .into_iter()
        .map(|(key, rows)| {
            let mut sizes: HashMap<u32, usize> = HashMap::new();
            for &row in &rows {
                *sizes.entry(matrix.label(row).instance).or_default() += 1;
            }
            let partition = Partition {
                instances: sizes.len(),
                largest_instance: sizes.values().copied().max().unwrap_or(0),
                rows,
            };
            (key, partition)
        })
        .collect()
}

/// The partition key of a row under a scope.
fn partition_key(label: RowLabel, scope: Scope) -> u32 {
    match scope {
        Scope::PerCategory => label.category,
        Scope::Global => 0,
    }
}
