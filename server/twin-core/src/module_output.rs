//! The checks every value a reward or filter module returns passes before the host uses it.
//!
//! A module is untrusted code: its scores feed training, its verdicts decide what a dataset
//! keeps, its `describe` answer is stored in the registry and the log. `twin-plugins` turns the
//! component's records into the plain values below and calls these checks; they live here, away
//! from wasmtime, so they can be fuzzed on their own (`fuzz/fuzz_targets/module_output.rs`).
//! A failed check is a [`BadOutput`], which the host reports as `bad_output`.

use std::collections::BTreeMap;

/// Longest module name or score component name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Longest module version, in bytes.
pub const MAX_VERSION_BYTES: usize = 64;
/// Longest module summary, in bytes.
pub const MAX_SUMMARY_BYTES: usize = 1024;
/// Longest parameters schema, in bytes.
pub const MAX_SCHEMA_BYTES: usize = 32 * 1024;
/// Most components of one score.
pub const MAX_COMPONENTS: usize = 64;
/// Longest verdict reason, in bytes: a reason is copied into every candidate's record.
pub const MAX_REASON_BYTES: usize = 1024;
/// Longest error message kept from a module (longer ones are cut, see [`cut_message`]).
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// What marks a message as cut.
const CUT_MARK: &str = " […]";

/// Why a module's output was refused, as a sentence naming the item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadOutput(pub String);

/// A call must return one value per item of its batch; `what` names the values ("scores").
pub fn check_count(returned: usize, batch_len: usize, what: &str) -> Result<(), BadOutput> {
    if returned != batch_len {
        return Err(BadOutput(format!(
            "{returned} {what} for a batch of {batch_len}"
        )));
    }
    Ok(())
}

/// Checks the score of rollout `index`: finite, at most [`MAX_COMPONENTS`] components with
/// non-empty, distinct names of at most [`MAX_NAME_BYTES`] and finite values. Returns the
/// components by name.
pub fn check_score(
    index: usize,
    score: f64,
    components: Vec<(String, f64)>,
) -> Result<BTreeMap<String, f64>, BadOutput> {
    if !score.is_finite() {
        return Err(BadOutput(format!(
            "score {score} of rollout {index} is not finite"
        )));
    }
    if components.len() > MAX_COMPONENTS {
        return Err(BadOutput(format!(
            "rollout {index} has {} score components, over the limit of {MAX_COMPONENTS}",
            components.len()
        )));
    }
    let mut by_name = BTreeMap::new();
    for (name, value) in components {
        if name.len() > MAX_NAME_BYTES {
            return Err(BadOutput(format!(
                "a score component name of rollout {index} is {} bytes, over the limit of \
                 {MAX_NAME_BYTES}",
                name.len()
            )));
        }
        if !value.is_finite() {
            return Err(BadOutput(format!(
                "component {name:?} of rollout {index} is {value}"
            )));
        }
        if name.is_empty() || by_name.contains_key(&name) {
            return Err(BadOutput(format!(
                "component name {name:?} of rollout {index} is empty or repeated"
            )));
        }
        by_name.insert(name, value);
    }
    Ok(by_name)
}

/// Checks verdict `index`: its reason, if any, is at most [`MAX_REASON_BYTES`].
pub fn check_verdict(index: usize, reason: Option<&str>) -> Result<(), BadOutput> {
    if let Some(reason) = reason
        && reason.len() > MAX_REASON_BYTES
    {
        return Err(BadOutput(format!(
            "the reason of verdict {index} is {} bytes, over the limit of {MAX_REASON_BYTES}",
            reason.len()
        )));
    }
    Ok(())
}

/// The text fields of a module's `describe` answer.
#[derive(Debug, Clone, Copy)]
pub struct DescriptorText<'a> {
    pub name: &'a str,
    pub version: &'a str,
    pub summary: &'a str,
    pub parameters_schema: &'a str,
}

/// Checks what `describe` returned (it is stored in the registry and the log as it is): each
/// field within its limit, the schema JSON, the name not blank.
pub fn check_descriptor(d: DescriptorText<'_>) -> Result<(), BadOutput> {
    for (field, value, limit) in [
        ("name", d.name, MAX_NAME_BYTES),
        ("version", d.version, MAX_VERSION_BYTES),
        ("summary", d.summary, MAX_SUMMARY_BYTES),
        ("parameters-schema", d.parameters_schema, MAX_SCHEMA_BYTES),
    ] {
        if value.len() > limit {
            return Err(BadOutput(format!(
                "describe: {field} is {} bytes, over the limit of {limit}",
                value.len()
            )));
        }
    }
    serde_json::from_str::<serde_json::Value>(d.parameters_schema)
        .map_err(|e| BadOutput(format!("describe: parameters-schema is not JSON: {e}")))?;
    if d.name.trim().is_empty() {
        return Err(BadOutput("describe: empty name".into()));
    }
    Ok(())
}

/// `message` cut to [`MAX_MESSAGE_BYTES`] (at a character boundary), marked when cut: a module's
/// error text goes into job records and API bodies.
pub fn cut_message(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str(CUT_MARK);
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        assert_eq!(cut_message("short".into()), "short");
        let cut = cut_message("é".repeat(MAX_MESSAGE_BYTES));
        assert!(
            cut.len() <= MAX_MESSAGE_BYTES + CUT_MARK.len(),
            "{}",
            cut.len()
        );
        assert!(cut.ends_with(CUT_MARK));
    }

    #[test]
    fn scores_must_be_finite_with_distinct_named_components() {
        let ok = check_score(0, 0.5, vec![("a".into(), 1.0), ("b".into(), -1.0)]);
        assert_eq!(ok.expect("valid").len(), 2);
        let refused = |score: f64, components: Vec<(&str, f64)>, expect: &str| {
            let components = components
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v))
                .collect();
            let err = check_score(3, score, components).expect_err("refused");
            assert!(err.0.contains(expect), "{err} should mention {expect:?}");
            assert!(err.0.contains("rollout 3"), "{err} names the rollout");
        };
        refused(f64::NAN, vec![], "not finite");
        refused(1.0, vec![("a", f64::INFINITY)], "is inf");
        refused(1.0, vec![("a", 1.0), ("a", 2.0)], "repeated");
        refused(1.0, vec![("", 1.0)], "empty");
        refused(1.0, vec![("a", 1.0); MAX_COMPONENTS + 1], "over the limit");
    }

    #[test]
    fn a_descriptor_over_the_caps_or_with_a_bad_schema_is_refused() {
        let ok = DescriptorText {
            name: "x",
            version: "1",
            summary: "",
            parameters_schema: "{}",
        };
        assert_eq!(check_descriptor(ok), Ok(()));
        let summary = "s".repeat(MAX_SUMMARY_BYTES + 1);
        let err = check_descriptor(DescriptorText {
            summary: &summary,
            ..ok
        });
        assert!(err.expect_err("long").0.contains("summary"));
        let schema = format!("\"{}\"", "s".repeat(MAX_SCHEMA_BYTES));
        let err = check_descriptor(DescriptorText {
            parameters_schema: &schema,
            ..ok
        });
        assert!(err.expect_err("long").0.contains("parameters-schema"));
        let err = check_descriptor(DescriptorText {
            parameters_schema: "{",
            ..ok
        });
        assert!(err.expect_err("not JSON").0.contains("not JSON"));
        let err = check_descriptor(DescriptorText { name: " ", ..ok });
        assert!(err.expect_err("blank").0.contains("empty name"));
    }
}
