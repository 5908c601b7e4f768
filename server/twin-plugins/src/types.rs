//! The records modules consume and produce, as plain Rust values with serde forms.
//!
//! These mirror the WIT records in `wasm-sdk/wit/plugin.wit` field for field; the JSON forms use
//! the WIT names in snake_case, which is what `twin modules run` reads and what `score` jobs store.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a module is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleKind {
    Reward,
    Filter,
}

impl ModuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModuleKind::Reward => "reward",
            ModuleKind::Filter => "filter",
        }
    }
}

/// A module's answer to `describe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    pub name: String,
    pub version: String,
    pub kind: ModuleKind,
    pub summary: String,
    /// JSON Schema of `configure`'s parameters, as the module wrote it.
    pub parameters_schema: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuestionType {
    Pair,
    Multi,
    #[default]
    Other,
}

/// One model completion to score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    #[serde(default)]
    pub prompt: String,
    pub completion: String,
    pub ground_truth: String,
    #[serde(default)]
    pub question_type: QuestionType,
    /// A JSON object. In JSON input it may be given as an object or as a string holding one.
    #[serde(default = "empty_object", deserialize_with = "metadata_string")]
    pub metadata: String,
}

/// A reward's score for one rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardScore {
    pub score: f64,
    /// Named parts of a composite score, in the order the module gave them.
    #[serde(default)]
    pub components: BTreeMap<String, f64>,
}

/// A candidate negative pair for a filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandidatePair {
    pub image_a: String,
    pub image_b: String,
    pub instance_a: String,
    pub instance_b: String,
    #[serde(default)]
    pub category_a: String,
    #[serde(default)]
    pub category_b: String,
    #[serde(default)]
    pub phash_a: u64,
    #[serde(default)]
    pub phash_b: u64,
    pub similarity: f64,
    #[serde(default)]
    pub rank: u32,
    #[serde(default = "empty_object", deserialize_with = "metadata_string")]
    pub metadata: String,
}

/// A filter's judgement of one candidate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub keep: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The longest rollout line read: far above any real completion (a 2,048-token answer is a few
/// KiB), low enough that one line cannot take the reader's memory.
pub const MAX_ROLLOUT_LINE_BYTES: usize = 1 << 20;

/// Parses a JSONL file of rollouts (blank lines skipped); the error names the first bad line.
/// An empty file is an error: there is nothing to score.
pub fn parse_rollouts(bytes: &[u8]) -> Result<Vec<Rollout>, String> {
    let rollouts = rollout_lines(bytes).collect::<Result<Vec<Rollout>, String>>()?;
    if rollouts.is_empty() {
        return Err("the rollouts file has no rollouts".into());
    }
    Ok(rollouts)
}

/// Rollouts read one JSONL line at a time (blank lines skipped), so a large file is never held
/// parsed whole: a reader keeps one line and what it takes. Errors name the line.
pub fn rollout_lines<R: std::io::BufRead>(reader: R) -> RolloutLines<R> {
    RolloutLines {
        reader,
        line: 0,
        buf: Vec::new(),
        done: false,
    }
}

/// The iterator of [`rollout_lines`]; it ends after the first error.
#[derive(Debug)]
pub struct RolloutLines<R> {
    reader: R,
    line: usize,
    buf: Vec<u8>,
    done: bool,
}

impl<R: std::io::BufRead> Iterator for RolloutLines<R> {
    type Item = Result<Rollout, String>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::io::{BufRead, Read};
        while !self.done {
            self.buf.clear();
            self.line += 1;
            let limit = MAX_ROLLOUT_LINE_BYTES as u64 + 1;
            let read = (&mut self.reader)
                .take(limit)
                .read_until(b'\n', &mut self.buf);
            let fail = |done: &mut bool, message: String| {
                *done = true;
                Some(Err(message))
            };
            match read {
                Ok(0) => self.done = true,
                Err(e) => return fail(&mut self.done, format!("reading rollouts: {e}")),
                Ok(_) if self.buf.len() > MAX_ROLLOUT_LINE_BYTES => {
                    return fail(
                        &mut self.done,
                        format!(
                            "rollouts line {} is longer than {MAX_ROLLOUT_LINE_BYTES} bytes",
                            self.line
                        ),
                    );
                }
                Ok(_) => {
                    let Ok(text) = std::str::from_utf8(&self.buf) else {
                        return fail(
                            &mut self.done,
                            format!("rollouts line {} is not UTF-8", self.line),
                        );
                    };
                    if text.trim().is_empty() {
                        continue;
                    }
                    return Some(serde_json::from_str(text).map_err(|e| {
                        self.done = true;
                        format!("rollouts line {}: {e}", self.line)
                    }));
                }
            }
        }
        None
    }
}

fn empty_object() -> String {
    "{}".to_owned()
}

/// Accepts metadata as a JSON object (the natural form in JSONL) or as a string holding one (the
/// WIT form); either way the module receives a string.
fn metadata_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::de::Error;
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(s),
        v @ serde_json::Value::Object(_) => Ok(v.to_string()),
        serde_json::Value::Null => Ok(empty_object()),
        other => Err(D::Error::custom(format!(
            "metadata must be a JSON object or a string, not {other}"
        ))),
    }
}

#[cfg(test)]
mod rollout_tests {
    use super::*;

    #[test]
    fn rollouts_stream_line_by_line_and_errors_name_the_line() {
        let text = "{\"completion\":\"a\",\"ground_truth\":\"b\"}\n\n  \n\
                    {\"completion\":\"c\",\"ground_truth\":\"d\",\"metadata\":{\"k\":1}}";
        let all: Vec<Rollout> = rollout_lines(text.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].metadata, "{\"k\":1}");

        let bad = "{\"completion\":\"a\",\"ground_truth\":\"b\"}\nnot json\n{}\n";
        let mut lines = rollout_lines(bad.as_bytes());
        assert!(lines.next().unwrap().is_ok());
        let err = lines.next().unwrap().unwrap_err();
        assert!(err.starts_with("rollouts line 2:"), "{err}");
        assert!(lines.next().is_none(), "it stops at the first error");

        let mut long = vec![b' '; MAX_ROLLOUT_LINE_BYTES + 1];
        long.push(b'\n');
        let err = rollout_lines(&long[..]).next().unwrap().unwrap_err();
        assert!(err.contains("line 1 is longer than"), "{err}");
        let err = rollout_lines(&b"\xff\xfe\n"[..])
            .next()
            .unwrap()
            .unwrap_err();
        assert!(err.contains("line 1 is not UTF-8"), "{err}");
        assert!(parse_rollouts(b"\n\n").is_err());
    }
}
