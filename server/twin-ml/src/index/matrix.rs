//! The embedding matrix the mining index searches: n rows of d f32, L2-normalised, each labelled
//! with the instance and category of the image it embeds.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::MlError;

/// Which instance and which category a row belongs to. Ids are the caller's (the mine stage
/// numbers its instance and category names); only equality matters here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RowLabel {
    pub instance: u32,
    pub category: u32,
}

/// n × d embeddings in one row-major buffer, every row of unit length.
///
/// **Invariant:** every row has L2 norm 1 (up to f32 rounding), so a dot product is a cosine
/// similarity; a zero or non-finite row is refused at construction, never normalised to NaN.
#[derive(Debug, Clone)]
pub struct EmbeddingMatrix {
    dim: usize,
    values: Vec<f32>,
    labels: Vec<RowLabel>,
}

impl EmbeddingMatrix {
    /// Takes `labels.len()` rows of `dim` values each (row-major) and normalises every row.
    pub fn new(dim: usize, mut values: Vec<f32>, labels: Vec<RowLabel>) -> Result<Self, MlError> {
        if dim == 0 {
            return Err(MlError::Invalid(
                "embedding dimension must be at least 1".into(),
            ));
        }
        if values.len() != labels.len() * dim {
            return Err(MlError::Invalid(format!(
                "embedding matrix: {} values for {} labelled rows of dimension {dim} (expected {})",
                values.len(),
                labels.len(),
                labels.len() * dim
            )));
        }
        for (row, values) in values.chunks_exact_mut(dim).enumerate() {
            normalise(row, values)?;
        }
        Ok(Self {
            dim,
            values,
            labels,
        })
    }

    /// Copies an `[n, d]` tensor of any float kind, on any device (CLIP's output), into a matrix.
    pub fn from_tensor(embeddings: &Tensor, labels: Vec<RowLabel>) -> Result<Self, MlError> {
        let (rows, dim) = match embeddings.size().as_slice() {
            &[rows, dim] => (rows, dim),
            other => {
                return Err(MlError::Invalid(format!(
                    "embedding tensor has shape {other:?}, expected [rows, dim]"
                )));
            }
        };
        if rows as usize != labels.len() {
            return Err(MlError::Invalid(format!(
                "embedding tensor has {rows} rows but {} labels",
                labels.len()
            )));
        }
        let flat = embeddings
            .f_to_device(tch::Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?
            .f_flatten(0, -1)?;
        let values = Vec::<f32>::try_from(&flat)?;
        Self::new(dim as usize, values, labels)
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Row `row`'s unit vector. Panics if `row >= len()`, like slice indexing.
    pub fn row(&self, row: usize) -> &[f32] {
        &self.values[row * self.dim..(row + 1) * self.dim]
    }

    pub fn label(&self, row: usize) -> RowLabel {
        self.labels[row]
    }

    pub fn labels(&self) -> &[RowLabel] {
        &self.labels
    }

    /// All rows, row-major.
    pub fn values(&self) -> &[f32] {
        &self.values
    }
}

/// Scales one row to unit length. The norm is summed in f64 so long rows of small values do not
/// lose precision before the division.
fn normalise(row: usize, values: &mut [f32]) -> Result<(), MlError> {
    if values.iter().any(|v| !v.is_finite()) {
        return Err(MlError::NonFiniteEmbedding { row });
    }
    let norm = values
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 {
        return Err(MlError::ZeroEmbedding { row });
    }
    for v in values.iter_mut() {
        *v = (f64::from(*v) / norm) as f32;
    }
    Ok(())
}
