//! `synonym-match`: the training reward, but the normalised prediction is first looked up in a
//! table the job grants through the `lookup` capability ("yeah" → "yes", "identical" → "yes").
//!
//! It shows the capability mechanism: the module imports `twin:plugin/lookup`, so a job must
//! grant `lookup`, and every lookup it makes is recorded with the job.

use twin_guest::{Description, Reward, Rollout, Score};

pub struct SynonymMatch;

impl Reward for SynonymMatch {
    fn describe() -> Description {
        Description::new(
            "synonym-match",
            env!("CARGO_PKG_VERSION"),
            "binary-match after mapping the answer through the granted lookup table",
        )
    }

    fn configure(params: &str) -> Result<Self, String> {
        twin_guest::no_params(params)?;
        Ok(SynonymMatch)
    }

    fn score(&mut self, r: &Rollout) -> Result<Score, String> {
        let Some(truth) = twin_rules::normalize_answer(&r.ground_truth) else {
            return Ok(Score::new(0.0));
        };
        let Some(prediction) = twin_rules::binary_match_prediction(&r.completion)
            .and_then(twin_rules::normalize_answer)
        else {
            return Ok(Score::new(0.0));
        };
        let mapped = twin_guest::lookup(&prediction).unwrap_or(prediction);
        Ok(Score::new(if mapped == truth { 1.0 } else { 0.0 }))
    }
}

twin_guest::export_reward!(SynonymMatch);
