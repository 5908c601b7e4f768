//! Clustered synthetic embeddings for the index's tests and benchmark: a seeded mixture of
//! Gaussians, categories around random unit centres and instances around sub-centres of their
//! category, so "nearest other instance" has the structure real CLIP embeddings give it.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{EmbeddingMatrix, RowLabel};
use crate::MlError;

/// The shape of a synthetic set. Row order is category, then instance, then image; instance
/// ids are unique across categories.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClusteredSpec {
    pub categories: usize,
    pub instances_per_category: usize,
    pub images_per_instance: usize,
    pub dim: usize,
    /// Length of an instance sub-centre's offset from its unit category centre.
    pub instance_spread: f32,
    /// Length of an image's offset from its instance sub-centre.
    pub image_spread: f32,
    pub seed: u64,
}

impl ClusteredSpec {
    /// Spreads that give cosine ≈ 0.92 between images of one instance, ≈ 0.68 between images of
    /// two instances of one category and ≈ 0 across categories.
    pub fn new(
        categories: usize,
        instances_per_category: usize,
        images_per_instance: usize,
        dim: usize,
        seed: u64,
    ) -> Self {
        Self {
            categories,
            instances_per_category,
            images_per_instance,
            dim,
            instance_spread: 0.6,
            image_spread: 0.35,
            seed,
        }
    }

    pub fn rows(&self) -> usize {
        self.categories * self.instances_per_category * self.images_per_instance
    }
}

/// Draws the set; the same spec gives the same matrix.
pub fn clustered(spec: &ClusteredSpec) -> Result<EmbeddingMatrix, MlError> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let dim = spec.dim;
    let mut values = Vec::with_capacity(spec.rows() * dim);
    let mut labels = Vec::with_capacity(spec.rows());
    let mut instance = 0u32;
    for category in 0..spec.categories {
        let mut centre = gaussian(&mut rng, dim, 1.0);
        let norm = centre.iter().map(|v| v * v).sum::<f32>().sqrt();
        centre.iter_mut().for_each(|v| *v /= norm);
        for _ in 0..spec.instances_per_category {
            let sub_centre = offset(&centre, &gaussian(&mut rng, dim, spec.instance_spread));
            for _ in 0..spec.images_per_instance {
                values.extend(offset(
                    &sub_centre,
                    &gaussian(&mut rng, dim, spec.image_spread),
                ));
                labels.push(RowLabel {
                    instance,
                    category: u32::try_from(category)
                        .map_err(|_| MlError::Invalid("too many categories".into()))?,
                });
            }
            instance += 1;
        }
    }
    EmbeddingMatrix::new(dim, values, labels)
}

/// A vector of `dim` normal draws scaled so its expected length is `length`.
fn gaussian(rng: &mut StdRng, dim: usize, length: f32) -> Vec<f32> {
    let scale = f64::from(length) / (dim as f64).sqrt();
    (0..dim)
        .map(|_| {
            // Box–Muller; 1 - u keeps the logarithm's argument in (0, 1].
            let u: f64 = 1.0 - rng.random::<f64>();
            let v: f64 = rng.random::<f64>();
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos() * scale) as f32
        })
        .collect()
}

fn offset(centre: &[f32], by: &[f32]) -> Vec<f32> {
    centre.iter().zip(by).map(|(c, d)| c + d).collect()
}
