//! `fgvqa-multi`: the FGVQA evaluation scorer for multi questions (how many of 3 candidates
//! match), as a Wasm component.
//!
//! The digit 0–3 in an `<answer>` tag, else the last standalone digit 0–3 in the text; 1.0 iff it
//! equals the label verbatim. Exactly lmms-eval's rule, reproduced by `twin_rules::fgvqa_multi`.

use twin_guest::{Description, Reward, Rollout, Score};

pub struct FgvqaMulti;

impl Reward for FgvqaMulti {
    fn describe() -> Description {
        Description::new(
            "fgvqa-multi",
            env!("CARGO_PKG_VERSION"),
            "FGVQA multi accuracy: the count 0-3 equals the label (lmms-eval rule)",
        )
    }

    fn configure(params: &str) -> Result<Self, String> {
        twin_guest::no_params(params)?;
        Ok(FgvqaMulti)
    }

    fn score(&mut self, r: &Rollout) -> Result<Score, String> {
        Ok(Score::new(twin_rules::fgvqa_multi(
            &r.completion,
            &r.ground_truth,
        )))
    }
}

twin_guest::export_reward!(FgvqaMulti);

#[cfg(test)]
mod tests {
    #[test]
    fn multi_rule() {
        assert_eq!(twin_rules::fgvqa_multi("<answer> 2 </answer>", "2"), 1.0);
        assert_eq!(
            twin_rules::fgvqa_multi("I count 3 matches, maybe 1", "1"),
            1.0
        );
        assert_eq!(twin_rules::fgvqa_multi("<answer>4</answer>", "4"), 0.0);
    }
}
