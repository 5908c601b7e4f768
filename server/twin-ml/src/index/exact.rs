//! Exact search with libtorch: similarities as a matrix product, one partition (a category, or
//! the whole matrix) and one chunk of query rows at a time, same-instance pairs masked to -inf,
//! then `topk`. The recall oracle for the HNSW index, and the fast path on a GPU.
//!
//! Searching per partition means a per-category search costs the sum of the squared category
//! sizes, not the square of the matrix: 100k rows in 500 categories is 500 products of 200 × 200.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use super::kernel::dot;
use super::{
    EmbeddingMatrix, Neighbours, Partition, Queries, QueryNeighbours, Scope, partition_key,
    partitions, rank_candidates,
};
use crate::MlError;

/// Similarities held at once, in elements: a chunk of queries × a partition's rows stays under
/// 128 MiB of f32 however large the partition (100k × 100k would be 40 GB).
const CHUNK_ELEMENTS: usize = 32 << 20;

/// The exact top-k neighbours of other instances (and, per category, of the same category) for
/// each query row, computed on `device` in f32.
///
/// Ties are broken by row like the HNSW path: where several rows tie with the k-th similarity,
/// all of them are fetched and the lowest rows kept, so the result does not depend on which
/// equal element `topk` happens to return.
pub fn search_exact(
    matrix: &EmbeddingMatrix,
    scope: Scope,
    k: usize,
    queries: Queries<'_>,
    device: Device,
) -> Result<Neighbours, MlError> {
    let rows = queries.resolve(matrix)?;
    let mut by_key: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for &row in &rows {
        by_key
            .entry(partition_key(matrix.label(row), scope))
            .or_default()
            .push(row);
    }
    let mut results = Vec::with_capacity(rows.len());
    for (key, partition) in partitions(matrix, scope) {
        let Some(queries) = by_key.get(&key) else {
            continue;
        };
        if partition.instances < 2 || k == 0 {
            results.extend(queries.iter().map(|&query| QueryNeighbours {
                query,
                neighbours: Vec::new(),
            }));
            continue;
        }
        search_partition(matrix, &partition, queries, k, device, &mut results)?;
    }
    Ok(Neighbours::new(k, results))
}

/// Exact top-k for `queries`, all rows of `partition`, which has at least two instances.
fn search_partition(
    matrix: &EmbeddingMatrix,
    partition: &Partition,
    queries: &[usize],
    k: usize,
    device: Device,
    results: &mut Vec<QueryNeighbours>,
) -> Result<(), MlError> {
    let n = partition.rows.len();
    let dim = to_i64(matrix.dim())?;
    // The global partition is the whole matrix: no need to copy it first.
    let values = if n == matrix.len() {
        Tensor::f_from_slice(matrix.values())?
    } else {
        let gathered: Vec<f32> = partition
            .rows
            .iter()
            .flat_map(|&row| matrix.row(row).iter().copied())
            .collect();
        Tensor::f_from_slice(&gathered)?
    };
    let all = values.f_view([to_i64(n)?, dim])?.f_to_device(device)?;
    let all_t = all.f_tr()?;
    let instance_ids: Vec<i64> = partition
        .rows
        .iter()
        .map(|&row| i64::from(matrix.label(row).instance))
        .collect();
    let instances = Tensor::f_from_slice(&instance_ids)?.f_to_device(device)?;
    let take = k.min(n);
    let chunk = (CHUNK_ELEMENTS / n).max(1);

    for chunk_rows in queries.chunks(chunk) {
        // Partition rows are ascending, so a query's position in them is a binary search.
        let local: Vec<i64> = chunk_rows
            .iter()
            .map(|row| {
                let at = partition.rows.binary_search(row).map_err(|_| {
                    MlError::Invalid(format!("query row {row} is not in its own partition"))
                })?;
                to_i64(at)
            })
            .collect::<Result<_, _>>()?;
        let index = Tensor::f_from_slice(&local)?.f_to_device(device)?;
        let similarity = all.f_index_select(0, &index)?.f_matmul(&all_t)?;
        let same_instance = instances
            .f_index_select(0, &index)?
            .f_unsqueeze(1)?
            .f_eq_tensor(&instances.f_unsqueeze(0)?)?;
        let similarity = similarity.f_masked_fill(&same_instance, f64::NEG_INFINITY)?;
        let (values, indices) = similarity.f_topk(to_i64(take)?, 1, true, true)?;
        // Rows holding more than `take` entries at or above their k-th value have a tie at the
        // boundary; only those are fetched whole.
        let kth = values.f_select(1, to_i64(take - 1)?)?;
        let at_least_kth = similarity
            .f_ge_tensor(&kth.f_unsqueeze(1)?)?
            .f_sum_dim_intlist(1, false, Kind::Int64)?;
        let values = to_vec_f32(&values)?;
        let indices = to_vec_i64(&indices)?;
        let kth = to_vec_f32(&kth)?;
        let at_least_kth = to_vec_i64(&at_least_kth)?;

        for (at, &query) in chunk_rows.iter().enumerate() {
            let tied = kth[at].is_finite() && at_least_kth[at] > to_i64(take)?;
            let found: Vec<(i64, f32)> = if tied {
                boundary_candidates(&similarity.f_get(to_i64(at)?)?, kth[at])?
            } else {
                let span = at * take..(at + 1) * take;
                indices[span.clone()]
                    .iter()
                    .copied()
                    .zip(values[span].iter().copied())
                    .collect()
            };
            // The matrix product chose the neighbours; their reported similarity is `dot`, as
            // in the HNSW path, because a BLAS kernel rounds differently for different chunk
            // shapes and the same pair must not get two values depending on what else was asked.
            let candidates = found
                .into_iter()
                .filter(|(_, similarity)| similarity.is_finite())
                .map(|(local, _)| {
                    let row = partition.rows[local as usize];
                    (row, dot(matrix.row(query), matrix.row(row)))
                })
                .collect();
            results.push(QueryNeighbours {
                query,
                neighbours: rank_candidates(candidates, k),
            });
        }
    }
    Ok(())
}

/// Every entry of one query's similarity row at or above `kth`, as (local row, similarity).
fn boundary_candidates(similarity: &Tensor, kth: f32) -> Result<Vec<(i64, f32)>, MlError> {
    let rows = similarity
        .f_ge(f64::from(kth))?
        .f_nonzero()?
        .f_flatten(0, -1)?;
    let values = to_vec_f32(&similarity.f_index_select(0, &rows)?)?;
    Ok(to_vec_i64(&rows)?.into_iter().zip(values).collect())
}

fn to_vec_f32(tensor: &Tensor) -> Result<Vec<f32>, MlError> {
    let flat = tensor.f_to_device(Device::Cpu)?.f_flatten(0, -1)?;
    Ok(Vec::<f32>::try_from(&flat)?)
}

fn to_vec_i64(tensor: &Tensor) -> Result<Vec<i64>, MlError> {
    let flat = tensor.f_to_device(Device::Cpu)?.f_flatten(0, -1)?;
    Ok(Vec::<i64>::try_from(&flat)?)
}

fn to_i64(value: usize) -> Result<i64, MlError> {
    i64::try_from(value).map_err(|_| MlError::Invalid(format!("{value} does not fit in an i64")))
}
