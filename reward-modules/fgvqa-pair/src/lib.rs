//! `fgvqa-pair`: the FGVQA evaluation scorer for pair (yes/no) questions, as a Wasm component.
//!
//! The first `<answer>` tag's text is reduced to "yes"/"no" (or its first word); without a usable
//! tag the whole completion, tags removed, is. 1.0 iff that equals the label verbatim. Exactly
//! lmms-eval's rule, reproduced by `twin_rules::fgvqa_pair`.

use twin_guest::{Description, Reward, Rollout, Score};

pub struct FgvqaPair;

impl Reward for FgvqaPair {
    fn describe() -> Description {
        Description::new(
            "fgvqa-pair",
            env!("CARGO_PKG_VERSION"),
            "FGVQA pair accuracy: the yes/no answer equals the label (lmms-eval rule)",
        )
    }

    fn configure(params: &str) -> Result<Self, String> {
        twin_guest::no_params(params)?;
        Ok(FgvqaPair)
    }

    fn score(&mut self, r: &Rollout) -> Result<Score, String> {
        Ok(Score::new(twin_rules::fgvqa_pair(
            &r.completion,
            &r.ground_truth,
        )))
    }
}

twin_guest::export_reward!(FgvqaPair);

#[cfg(test)]
mod tests {
    #[test]
    fn pair_rule() {
        assert_eq!(twin_rules::fgvqa_pair("<answer>Yes</answer>", "yes"), 1.0);
        assert_eq!(twin_rules::fgvqa_pair("They differ, so no.", "no"), 1.0);
        assert_eq!(
            twin_rules::fgvqa_pair("<answer>yes</answer><answer>no</answer>", "no"),
            0.0
        );
    }
}
