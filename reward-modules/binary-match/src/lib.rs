//! `binary-match`: TWIN's training reward as a Wasm component.
//!
//! 1.0 iff the text of the last `<answer>…</answer>` tag in the completion, normalised (strip,
//! lowercase, ASCII punctuation deleted, strip), equals the normalised ground truth; else 0.0.
//! The rule is CPython 3.11's, reproduced exactly by `twin_rules` (see its docs and its
//! differential test against CPython).

use twin_guest::{Description, Reward, Rollout, Score};

pub struct BinaryMatch;

impl Reward for BinaryMatch {
    fn describe() -> Description {
        Description::new(
            "binary-match",
            env!("CARGO_PKG_VERSION"),
            "1 iff the last <answer> tag equals the ground truth after normalisation (TWIN)",
        )
    }

    fn configure(params: &str) -> Result<Self, String> {
        twin_guest::no_params(params)?;
        Ok(BinaryMatch)
    }

    fn score(&mut self, r: &Rollout) -> Result<Score, String> {
        Ok(Score::new(twin_rules::binary_match(
            &r.completion,
            &r.ground_truth,
        )))
    }
}

twin_guest::export_reward!(BinaryMatch);

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(completion: &str, truth: &str) -> Rollout {
        Rollout {
            prompt: String::new(),
            completion: completion.into(),
            ground_truth: truth.into(),
            question_type: twin_guest::QuestionType::Pair,
            metadata: "{}".into(),
        }
    }

    #[test]
    fn scores_the_last_tag() {
        let mut m = BinaryMatch::configure("{}").unwrap();
        let mut s = |c: &str, t: &str| m.score(&rollout(c, t)).unwrap().score;
        assert_eq!(s("Same logo. <answer>Yes.</answer>", "yes"), 1.0);
        assert_eq!(
            s("<answer>no</answer> wait <answer>yes</answer>", "yes"),
            1.0
        );
        assert_eq!(
            s("<answer>yes</answer> wait <answer>no</answer>", "yes"),
            0.0
        );
        assert_eq!(s("yes", "yes"), 0.0);
        assert_eq!(s("<answer> ... </answer>", "..."), 0.0);
    }

    #[test]
    fn refuses_parameters() {
        assert!(BinaryMatch::configure(r#"{"x":1}"#).is_err());
        assert!(BinaryMatch::configure("null").is_ok());
    }
}
