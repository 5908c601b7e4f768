//! `near-duplicate`: drops candidate pairs whose 64-bit perceptual hashes are within
//! `max_distance` bits (Hamming), i.e. near-identical pictures that are unlikely to be two
//! distinct instances and would teach the model a wrong "no".

use serde::Deserialize;
use twin_guest::{CandidatePair, Description, Filter, Verdict};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NearDuplicate {
    #[serde(default = "default_distance")]
    max_distance: u32,
}

fn default_distance() -> u32 {
    4
}

impl Filter for NearDuplicate {
    fn describe() -> Description {
        Description::new(
            "near-duplicate",
            env!("CARGO_PKG_VERSION"),
            "drops pairs whose perceptual hashes differ in at most max_distance bits",
        )
        .with_parameters(
            r#"{"type":"object","properties":{"max_distance":{"type":"integer","minimum":0,"maximum":64,"default":4}},"additionalProperties":false}"#,
        )
    }

    fn configure(params: &str) -> Result<Self, String> {
        let f: Self = twin_guest::params(params)?;
        if f.max_distance > 64 {
            return Err(format!("max_distance {} is over 64 bits", f.max_distance));
        }
        Ok(f)
    }

    fn judge(&mut self, p: &CandidatePair) -> Result<Verdict, String> {
        let distance = (p.phash_a ^ p.phash_b).count_ones();
        Ok(if distance <= self.max_distance {
            Verdict::drop(format!(
                "perceptual hashes {distance} bits apart (≤ {})",
                self.max_distance
            ))
        } else {
            Verdict::keep()
        })
    }
}

twin_guest::export_filter!(NearDuplicate);

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(a: u64, b: u64) -> CandidatePair {
        CandidatePair {
            image_a: "a".into(),
            image_b: "b".into(),
            instance_a: "x".into(),
            instance_b: "y".into(),
            category_a: String::new(),
            category_b: String::new(),
            phash_a: a,
            phash_b: b,
            similarity: 0.5,
            rank: 0,
            metadata: "{}".into(),
        }
    }

    #[test]
    fn hamming_threshold() {
        let mut f = NearDuplicate::configure(r#"{"max_distance": 2}"#).unwrap();
        assert!(!f.judge(&pair(0b1011, 0b1011)).unwrap().keep);
        assert!(!f.judge(&pair(0b1011, 0b1000)).unwrap().keep);
        assert!(f.judge(&pair(0b1011, 0b0100)).unwrap().keep);
        assert!(NearDuplicate::configure(r#"{"max_distance": 65}"#).is_err());
    }
}
