//! Exact search with libtorch: similarities as a matrix product, one chunk of query rows at a
//! time, excluded pairs masked to -inf, then `topk`. The recall oracle for the HNSW index, and
//! the fast path on a GPU.

use tch::{Device, Kind, Tensor};

use super::kernel::dot;
use super::{EmbeddingMatrix, Neighbours, Queries, QueryNeighbours, Scope, rank_candidates};
use crate::MlError;

/// Similarities held at once, in elements: a chunk of queries × all rows stays under 128 MiB of
/// f32 however large the matrix (100k × 100k would be 40 GB).
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
    let n = matrix.len();
    if n == 0 || k == 0 {
        let empty = rows
            .into_iter()
            .map(|query| QueryNeighbours {
                query,
                neighbours: Vec::new(),
            })
            .collect();
        return Ok(Neighbours::new(k, empty));
    }
    let n_i64 = to_i64(n)?;
    let all = Tensor::f_from_slice(matrix.values())?
        .f_view([n_i64, to_i64(matrix.dim())?])?
        .f_to_device(device)?;
    let all_t = all.f_tr()?;
    let instances = label_tensor(matrix, |label| label.instance, device)?;
    let categories = label_tensor(matrix, |label| label.category, device)?;
    let take = k.min(n);
    let chunk = (CHUNK_ELEMENTS / n).max(1);

    let mut results = Vec::with_capacity(rows.len());
    for chunk_rows in rows.chunks(chunk) {
        let index = Tensor::f_from_slice(
            &chunk_rows
                .iter()
                .map(|&row| to_i64(row))
                .collect::<Result<Vec<_>, _>>()?,
        )?
        .f_to_device(device)?;
        let similarity = all.f_index_select(0, &index)?.f_matmul(&all_t)?;
        let mut excluded = instances
            .f_index_select(0, &index)?
            .f_unsqueeze(1)?
            .f_eq_tensor(&instances.f_unsqueeze(0)?)?;
        if scope == Scope::PerCategory {
            let other_category = categories
                .f_index_select(0, &index)?
                .f_unsqueeze(1)?
                .f_ne_tensor(&categories.f_unsqueeze(0)?)?;
            excluded = excluded.f_logical_or(&other_category)?;
        }
        let similarity = similarity.f_masked_fill(&excluded, f64::NEG_INFINITY)?;
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
            let candidates: Vec<(usize, f32)> = if tied {
                boundary_candidates(&similarity.f_get(to_i64(at)?)?, kth[at])?
            } else {
                let span = at * take..(at + 1) * take;
                indices[span.clone()]
                    .iter()
                    .zip(&values[span])
                    .filter(|(_, similarity)| similarity.is_finite())
                    .map(|(&row, &similarity)| (row as usize, similarity))
                    .collect()
            };
            // The matrix product chose the neighbours; their reported similarity is `dot`, as
            // in the HNSW path, because a BLAS kernel rounds differently for different chunk
            // shapes and the same pair must not get two values depending on what else was asked.
            let candidates = candidates
                .into_iter()
                .map(|(row, _)| (row, dot(matrix.row(query), matrix.row(row))))
                .collect();
            results.push(QueryNeighbours {
                query,
                neighbours: rank_candidates(candidates, k),
            });
        }
    }
    Ok(Neighbours::new(k, results))
}

/// Every entry of one query's similarity row at or above `kth`, as (row, similarity).
fn boundary_candidates(similarity: &Tensor, kth: f32) -> Result<Vec<(usize, f32)>, MlError> {
    let rows = similarity
        .f_ge(f64::from(kth))?
        .f_nonzero()?
        .f_flatten(0, -1)?;
    let values = to_vec_f32(&similarity.f_index_select(0, &rows)?)?;
    let rows = to_vec_i64(&rows)?;
    Ok(rows
        .into_iter()
        .zip(values)
        .map(|(row, similarity)| (row as usize, similarity))
        .collect())
}

fn label_tensor(
    matrix: &EmbeddingMatrix,
    id: impl Fn(super::RowLabel) -> u32,
    device: Device,
) -> Result<Tensor, MlError> {
    let ids: Vec<i64> = matrix
        .labels()
        .iter()
        .map(|&label| i64::from(id(label)))
        .collect();
    Ok(Tensor::f_from_slice(&ids)?.f_to_device(device)?)
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
