//! `similarity-band`: keeps candidate negatives whose embedding similarity lies in `[min, max]`.
//!
//! Below the band a pair is too easy to be a hard negative; above it, it is likely the same
//! instance photographed twice or a mislabelled duplicate. Fails closed: a similarity that is not
//! a finite number is dropped.

use serde::Deserialize;
use twin_guest::{CandidatePair, Description, Filter, Verdict};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimilarityBand {
    #[serde(default = "default_min")]
    min: f64,
    #[serde(default = "default_max")]
    max: f64,
}

fn default_min() -> f64 {
    -1.0
}

fn default_max() -> f64 {
    1.0
}

impl Filter for SimilarityBand {
    fn describe() -> Description {
        Description::new(
            "similarity-band",
            env!("CARGO_PKG_VERSION"),
            "keeps candidates whose embedding similarity lies in [min, max]",
        )
        .with_parameters(
            r#"{"type":"object","properties":{"min":{"type":"number","default":-1.0},"max":{"type":"number","default":1.0}},"additionalProperties":false}"#,
        )
    }

    fn configure(params: &str) -> Result<Self, String> {
        let band: Self = twin_guest::params(params)?;
        if !band.min.is_finite() || !band.max.is_finite() || band.min > band.max {
            return Err(format!(
                "the band [{}, {}] is empty or not finite",
                band.min, band.max
            ));
        }
        Ok(band)
    }

    fn judge(&mut self, pair: &CandidatePair) -> Result<Verdict, String> {
        let s = pair.similarity;
        Ok(if !s.is_finite() {
            Verdict::drop(format!("similarity {s} is not a finite number"))
        } else if s < self.min {
            Verdict::drop(format!("similarity {s:.4} below {}", self.min))
        } else if s > self.max {
            Verdict::drop(format!("similarity {s:.4} above {}", self.max))
        } else {
            Verdict::keep()
        })
    }
}

twin_guest::export_filter!(SimilarityBand);

#[cfg(test)]
mod tests {
    use super::*;

    pub fn pair(similarity: f64) -> CandidatePair {
        CandidatePair {
            image_a: "a".into(),
            image_b: "b".into(),
            instance_a: "i1".into(),
            instance_b: "i2".into(),
            category_a: "mug".into(),
            category_b: "mug".into(),
            phash_a: 0,
            phash_b: u64::MAX,
            similarity,
            rank: 0,
            metadata: "{}".into(),
        }
    }

    #[test]
    fn band_is_inclusive_and_fails_closed() {
        let mut f = SimilarityBand::configure(r#"{"min": 0.8, "max": 0.95}"#).unwrap();
        assert!(f.judge(&pair(0.8)).unwrap().keep);
        assert!(f.judge(&pair(0.95)).unwrap().keep);
        assert!(!f.judge(&pair(0.79)).unwrap().keep);
        assert!(!f.judge(&pair(0.96)).unwrap().keep);
        assert!(!f.judge(&pair(f64::NAN)).unwrap().keep);
        assert!(SimilarityBand::configure(r#"{"min": 0.9, "max": 0.1}"#).is_err());
        assert!(SimilarityBand::configure(r#"{"low": 0.9}"#).is_err());
    }
}
