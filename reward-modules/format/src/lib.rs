//! `format`: rewards the shape TWIN's prompts ask for: an explanation, then an `<answer>` tag.
//!
//! Components: `answer_tag` (a closed `<answer>…</answer>` pair exists, by the training reward's
//! own pattern) and `explanation` (non-whitespace text before the first such tag). The score is
//! their product unless `partial` is set, in which case it is their mean. TWIN itself trains with
//! no format reward; this is for `weighted-sum` experiments.

use serde::Deserialize;
use twin_guest::{Description, Reward, Rollout, Score};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Format {
    /// Mean of the two checks instead of their product.
    #[serde(default)]
    partial: bool,
}

impl Reward for Format {
    fn describe() -> Description {
        Description::new(
            "format",
            env!("CARGO_PKG_VERSION"),
            "1 iff the completion explains and then gives an <answer> tag",
        )
        .with_parameters(
            r#"{"type":"object","properties":{"partial":{"type":"boolean","default":false,"description":"score the mean of the two checks instead of their product"}},"additionalProperties":false}"#,
        )
    }

    fn configure(params: &str) -> Result<Self, String> {
        twin_guest::params(params)
    }

    fn score(&mut self, r: &Rollout) -> Result<Score, String> {
        let check = twin_rules::format_check(&r.completion);
        let tag = f64::from(u8::from(check.answer_tag));
        let explanation = f64::from(u8::from(check.explanation));
        let score = if self.partial {
            (tag + explanation) / 2.0
        } else {
            tag * explanation
        };
        Ok(Score::new(score)
            .with("answer_tag", tag)
            .with("explanation", explanation))
    }
}

twin_guest::export_reward!(Format);

#[cfg(test)]
mod tests {
    use super::*;

    fn score(m: &mut Format, completion: &str) -> f64 {
        let r = Rollout {
            prompt: String::new(),
            completion: completion.into(),
            ground_truth: "yes".into(),
            question_type: twin_guest::QuestionType::Pair,
            metadata: "{}".into(),
        };
        m.score(&r).unwrap().score
    }

    #[test]
    fn explanation_then_tag() {
        let mut strict = Format::configure("{}").unwrap();
        assert_eq!(
            score(&mut strict, "Same stitching. <answer>yes</answer>"),
            1.0
        );
        assert_eq!(score(&mut strict, "<answer>yes</answer> because"), 0.0);
        assert_eq!(score(&mut strict, "Same stitching, yes"), 0.0);
        let mut partial = Format::configure(r#"{"partial": true}"#).unwrap();
        assert_eq!(score(&mut partial, "<answer>yes</answer>"), 0.5);
        assert!(Format::configure(r#"{"partal": true}"#).is_err());
    }
}
