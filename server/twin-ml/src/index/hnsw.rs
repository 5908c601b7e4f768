//! Approximate search: one instant-distance HNSW graph per partition (per category, or one for
//! the whole matrix), with distance `1 - dot` over the matrix's unit rows.
//!
//! instant-distance 0.6.1 fixes three things this module works around:
//! - a search returns at most `ef_search` points and `ef_search` is set at build time, so the
//!   index is built for one k, with `ef_search` raised to at least k + the largest instance of
//!   the partition: enough to drop the query's own instance and still have k others;
//! - the build inserts points from rayon's pool in whatever order its threads take them, so a
//!   [`Determinism::Deterministic`] build runs inside a one-thread pool (queries never change
//!   the graph, so they run in parallel either way);
//! - there is no insertion after build: a new dataset means a new index.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::time::Instant;

use instant_distance::{Builder, HnswMap, Point, Search};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::kernel::{DotKernel, dot, dot_naive};
use super::{
    EmbeddingMatrix, Neighbours, Partition, Queries, QueryNeighbours, Scope, partition_key,
    partitions, rank_candidates,
};
use crate::MlError;

/// Whether two builds from the same matrix and parameters must give the same graph.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Determinism {
    /// Build on one thread: identical neighbours on every run, at the cost of the other cores.
    #[default]
    Deterministic,
    /// Build on rayon's global pool: faster, but neighbours may differ slightly between runs.
    Parallel,
}

/// How the graph is built and searched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HnswParams {
    /// Candidates kept while linking each inserted point: more is a better graph, built slower.
    pub ef_construction: usize,
    /// Candidates kept per search (raised to k + the largest instance where that is more): more
    /// is higher recall, searched slower.
    pub ef_search: usize,
    /// Seeds the level each point is given, so a deterministic build is reproducible.
    pub seed: u64,
    pub determinism: Determinism,
    #[serde(default)]
    pub kernel: DotKernel,
}

impl Default for HnswParams {
    /// Reaches recall@10 ≥ 0.95 against exact search on the clustered benchmark sets (10k and
    /// 100k rows of dimension 512); BENCHMARKS.md, "Mining index", has the figures and costs.
    fn default() -> Self {
        Self {
            ef_construction: 100,
            ef_search: 100,
            seed: 0,
            determinism: Determinism::Deterministic,
            kernel: DotKernel::Vectorised,
        }
    }
}

/// The dot product a graph's distance uses, chosen at compile time so it inlines.
trait Kernel: Copy + Send + Sync {
    fn dot(a: &[f32], b: &[f32]) -> f32;
}

#[derive(Debug, Clone, Copy)]
struct Vectorised;

impl Kernel for Vectorised {
    #[inline]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot(a, b)
    }
}

#[derive(Debug, Clone, Copy)]
struct Naive;

impl Kernel for Naive {
    #[inline]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot_naive(a, b)
    }
}

/// A point of the graph: a borrowed matrix row, so the graph holds no copy of the embeddings.
#[derive(Debug, Clone, Copy)]
struct Row<'m, K> {
    values: &'m [f32],
    kernel: PhantomData<K>,
}

impl<'m, K> Row<'m, K> {
    fn new(values: &'m [f32]) -> Self {
        Self {
            values,
            kernel: PhantomData,
        }
    }
}

impl<K: Kernel> Point for Row<'_, K> {
    fn distance(&self, other: &Self) -> f32 {
        1.0 - K::dot(self.values, other.values)
    }
}

/// A partition's graph; the map's values are matrix rows.
enum Graph<'m> {
    Vectorised(HnswMap<Row<'m, Vectorised>, usize>),
    Naive(HnswMap<Row<'m, Naive>, usize>),
}

impl<'m> Graph<'m> {
    fn build(
        matrix: &'m EmbeddingMatrix,
        partition: &Partition,
        ef_search: usize,
        params: &HnswParams,
    ) -> Self {
        let builder = Builder::default()
            .ef_construction(params.ef_construction)
            .ef_search(ef_search)
            .seed(params.seed);
        match params.kernel {
            DotKernel::Vectorised => Graph::Vectorised(build_map(builder, matrix, partition)),
            DotKernel::Naive => Graph::Naive(build_map(builder, matrix, partition)),
        }
    }

    /// Rows of other instances the graph finds for `query`, with their similarity.
    fn candidates(
        &self,
        matrix: &EmbeddingMatrix,
        query: usize,
        search: &mut Search,
    ) -> Vec<(usize, f32)> {
        let rows: Vec<usize> = match self {
            Graph::Vectorised(map) => map
                .search(&Row::new(matrix.row(query)), search)
                .map(|item| *item.value)
                .collect(),
            Graph::Naive(map) => map
                .search(&Row::new(matrix.row(query)), search)
                .map(|item| *item.value)
                .collect(),
        };
        let instance = matrix.label(query).instance;
        rows.into_iter()
            .filter(|&row| matrix.label(row).instance != instance)
            // Recomputed with one kernel whichever the graph used, so both report the same
            // similarity for the same pair, and exactly `dot`, not `1 - (1 - dot)`.
            .map(|row| (row, dot(matrix.row(query), matrix.row(row))))
            .collect()
    }
}

fn build_map<'m, K: Kernel>(
    builder: Builder,
    matrix: &'m EmbeddingMatrix,
    partition: &Partition,
) -> HnswMap<Row<'m, K>, usize> {
    let points = partition
        .rows
        .iter()
        .map(|&row| Row::new(matrix.row(row)))
        .collect();
    builder.build(points, partition.rows.clone())
}

/// HNSW graphs over a matrix, built for one k and one scope.
pub struct HnswIndex<'m> {
    matrix: &'m EmbeddingMatrix,
    scope: Scope,
    k: usize,
    /// One per partition, in `by_key` order; `None` where the partition has a single instance
    /// (no query in it can have a neighbour, so no graph is built).
    graphs: Vec<Option<Graph<'m>>>,
    /// Partition key (category, or 0 for the global scope) → position in `partitions`.
    by_key: HashMap<u32, usize>,
}

impl std::fmt::Debug for HnswIndex<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HnswIndex")
            .field("rows", &self.matrix.len())
            .field("scope", &self.scope)
            .field("k", &self.k)
            .field("partitions", &self.graphs.len())
            .finish()
    }
}

impl<'m> HnswIndex<'m> {
    /// Builds one graph per partition of `scope` that has two instances or more.
    pub fn build(
        matrix: &'m EmbeddingMatrix,
        scope: Scope,
        k: usize,
        params: &HnswParams,
    ) -> Result<Self, MlError> {
        let started = Instant::now();
        let partitions = partitions(matrix, scope);
        let by_key = partitions
            .iter()
            .enumerate()
            .map(|(at, (key, _))| (*key, at))
            .collect();
        let build_all = || -> Vec<Option<Graph<'m>>> {
            partitions
                .par_iter()
                .map(|(_, partition)| {
                    (partition.instances >= 2).then(|| {
                        let ef_search = params.ef_search.max(k + partition.largest_instance);
                        Graph::build(matrix, partition, ef_search, params)
                    })
                })
                .collect()
        };
        let graphs = match params.determinism {
            Determinism::Parallel => build_all(),
            Determinism::Deterministic => rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .map_err(|e| MlError::ThreadPool(e.to_string()))?
                .install(build_all),
        };
        tracing::info!(
            rows = matrix.len(),
            ?scope,
            partitions = graphs.len(),
            graphs = graphs.iter().flatten().count(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "built the HNSW mining index"
        );
        Ok(Self {
            matrix,
            scope,
            k,
            graphs,
            by_key,
        })
    }

    /// The k the index was built for.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Up to k neighbours of other instances for each query row, on rayon's global pool.
    pub fn search(&self, queries: Queries<'_>) -> Result<Neighbours, MlError> {
        let rows = queries.resolve(self.matrix)?;
        let results = rows
            .par_iter()
            .map_init(Search::default, |search, &query| {
                let key = partition_key(self.matrix.label(query), self.scope);
                let graph = self
                    .by_key
                    .get(&key)
                    .and_then(|&at| self.graphs[at].as_ref());
                let neighbours = match graph {
                    Some(graph) => {
                        rank_candidates(graph.candidates(self.matrix, query, search), self.k)
                    }
                    None => Vec::new(),
                };
                QueryNeighbours { query, neighbours }
            })
            .collect();
        Ok(Neighbours::new(self.k, results))
    }
}

/// Builds the index and searches every row: the mine stage's CPU path in one call.
pub fn search_hnsw(
    matrix: &EmbeddingMatrix,
    scope: Scope,
    k: usize,
    params: &HnswParams,
) -> Result<Neighbours, MlError> {
    HnswIndex::build(matrix, scope, k, params)?.search(Queries::All)
}
