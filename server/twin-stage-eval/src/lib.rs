//! twin's `eval` stage: a Qwen2.5-VL checkpoint answers FGVQA-style questions with greedy
//! decoding, scorer modules grade the answers, and the job reports per-subset accuracy.

mod eval;

pub use eval::EvalStage;
