//! `distinct-instance`: a negative pair must show two different instances (and two different
//! images); with `same_category`, also two instances of the same category, which is what makes
//! a negative hard rather than trivially different.

use serde::Deserialize;
use twin_guest::{CandidatePair, Description, Filter, Verdict};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistinctInstance {
    #[serde(default)]
    same_category: bool,
}

impl Filter for DistinctInstance {
    fn describe() -> Description {
        Description::new(
            "distinct-instance",
            env!("CARGO_PKG_VERSION"),
            "drops pairs of an instance with itself; optionally requires one category",
        )
        .with_parameters(
            r#"{"type":"object","properties":{"same_category":{"type":"boolean","default":false}},"additionalProperties":false}"#,
        )
    }

    fn configure(params: &str) -> Result<Self, String> {
        twin_guest::params(params)
    }

    fn judge(&mut self, p: &CandidatePair) -> Result<Verdict, String> {
        Ok(if p.instance_a == p.instance_b {
            Verdict::drop(format!("both images are of instance {:?}", p.instance_a))
        } else if p.image_a == p.image_b {
            Verdict::drop("the same image on both sides")
        } else if self.same_category && p.category_a != p.category_b {
            Verdict::drop(format!(
                "categories differ ({:?} vs {:?})",
                p.category_a, p.category_b
            ))
        } else {
            Verdict::keep()
        })
    }
}

twin_guest::export_filter!(DistinctInstance);

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(ia: &str, ib: &str, ca: &str, cb: &str) -> CandidatePair {
        CandidatePair {
            image_a: format!("img-{ia}"),
            image_b: format!("img-{ib}-2"),
            instance_a: ia.into(),
            instance_b: ib.into(),
            category_a: ca.into(),
            category_b: cb.into(),
            phash_a: 0,
            phash_b: 0,
            similarity: 0.9,
            rank: 1,
            metadata: "{}".into(),
        }
    }

    #[test]
    fn instance_and_category_rules() {
        let mut any = DistinctInstance::configure("{}").unwrap();
        assert!(!any.judge(&pair("x", "x", "mug", "mug")).unwrap().keep);
        assert!(any.judge(&pair("x", "y", "mug", "shoe")).unwrap().keep);
        let mut same = DistinctInstance::configure(r#"{"same_category": true}"#).unwrap();
        assert!(!same.judge(&pair("x", "y", "mug", "shoe")).unwrap().keep);
        assert!(same.judge(&pair("x", "y", "mug", "mug")).unwrap().keep);
    }
}
