//! The training reward `binary_match` (TWIN `training/reward.py`) and our format check.

use crate::py;
use crate::tags::answer_matches;

/// Python's `string.punctuation`; `char::is_ascii_punctuation` is exactly this set (tested).
#[cfg(test)]
const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

/// The prediction of a completion: group 1 of the LAST `<answer>...</answer>` match, stripped.
/// `None` when there is no match; `Some("")` when the last tag pair holds only whitespace.
pub fn binary_match_prediction(completion: &str) -> Option<&str> {
    answer_matches(completion)
        .last()
        .map(|m| py::strip(m.content(completion)))
}

/// The reward's normalisation: `strip()`, `lower()`, delete every character of
/// `string.punctuation`, `strip()`; `None` when nothing is left.
pub fn normalize_answer(s: &str) -> Option<String> {
    let lowered = py::lower(py::strip(s));
    // Deleting ASCII punctuation never changes the lowering, but it can expose whitespace,
    // hence the second strip.
    let kept: String = lowered
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    let out = py::strip(&kept);
    (!out.is_empty()).then(|| out.to_owned())
}

/// 1.0 iff the completion has a prediction and it equals the ground truth once both are
/// normalised (and neither normalises to nothing); 0.0 otherwise.
pub fn binary_match(completion: &str, ground_truth: &str) -> f64 {
    let pred = binary_match_prediction(completion).and_then(normalize_answer);
    match (pred, normalize_answer(ground_truth)) {
        (Some(p), Some(g)) if p == g => 1.0,
        _ => 0.0,
    }
}

/// Result of [`format_check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormatCheck {
    /// The reward's `findall` finds at least one `<answer>...</answer>`.
    pub answer_tag: bool,
    /// Some non-whitespace text precedes the first match; false when there is no match.
    pub explanation: bool,
}

/// Our format rule: a completion should explain itself and then give a tagged answer.
pub fn format_check(completion: &str) -> FormatCheck {
    match answer_matches(completion).next() {
        Some(m) => FormatCheck {
            answer_tag: true,
            explanation: !py::strip(&completion[..m.start]).is_empty(),
        },
        None => FormatCheck {
            answer_tag: false,
            explanation: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punctuation_is_string_punctuation() {
        let ascii: String = (0..128u8)
            .map(char::from)
            .filter(char::is_ascii_punctuation)
            .collect();
        assert_eq!(ascii, PUNCTUATION);
    }

    #[test]
    fn prediction_is_last_match() {
        assert_eq!(
            binary_match_prediction("<answer>a</answer> <answer> b </answer>"),
            Some("b")
        );
        assert_eq!(
            binary_match_prediction("<answer> \u{1c}\u{85} </answer>"),
            Some("")
        );
        assert_eq!(binary_match_prediction("<answer>a"), None);
        assert_eq!(binary_match_prediction(""), None);
        assert_eq!(binary_match_prediction("</answer>a<answer>"), None);
        assert_eq!(
            binary_match_prediction("<anſwer>\u{1f}Cat\u{1d}</ANSWER>"),
            Some("Cat")
        );
    }

    #[test]
    fn normalisation() {
        assert_eq!(
            normalize_answer("  Hello, World!  ").as_deref(),
            Some("hello world")
        );
        assert_eq!(normalize_answer("a ."), Some("a".to_owned()));
        assert_eq!(normalize_answer("?!"), None);
        assert_eq!(normalize_answer(" \u{85} "), None);
        assert_eq!(normalize_answer(""), None);
        // Unicode punctuation is not in string.punctuation.
        assert_eq!(normalize_answer("«a»").as_deref(), Some("«a»"));
        assert_eq!(normalize_answer("\u{130}").as_deref(), Some("i\u{307}"));
        // The final sigma is decided before the punctuation goes.
        assert_eq!(normalize_answer("ΟΔΟΣ.").as_deref(), Some("οδος"));
        assert_eq!(normalize_answer("ΟΔΟΣ.Α").as_deref(), Some("οδοσα"));
        assert_eq!(normalize_answer("a_b").as_deref(), Some("ab"));
        // U+00A0 surfaces once the dot goes and is stripped.
        assert_eq!(normalize_answer("x\u{a0}.").as_deref(), Some("x"));
    }

    #[test]
    fn reward() {
        assert_eq!(
            binary_match("Reasoning. <answer>Paris.</answer>", "paris"),
            1.0
        );
        assert_eq!(
            binary_match("<ANſWER>\u{85}PARIS\u{1c}</answer>", " Paris!"),
            1.0
        );
        assert_eq!(
            binary_match("<answer>Paris</answer><answer>Rome</answer>", "paris"),
            0.0
        );
        assert_eq!(binary_match("<answer>.</answer>", "."), 0.0);
        assert_eq!(binary_match("<answer></answer>", ""), 0.0);
        assert_eq!(binary_match("Paris", "Paris"), 0.0);
        assert_eq!(binary_match("<answer>\u{feff}Paris</answer>", "Paris"), 0.0);
        assert_eq!(binary_match("<answer>ΟΔΟΣ</answer>", "οδος"), 1.0);
        assert_eq!(binary_match("<answer>\u{130}</answer>", "i\u{307}"), 1.0);
        assert_eq!(binary_match("<answer>\u{130}</answer>", "i"), 0.0);
    }

    #[test]
    fn format() {
        let yes = |a, e| FormatCheck {
            answer_tag: a,
            explanation: e,
        };
        assert_eq!(format_check("Because. <answer>x</answer>"), yes(true, true));
        assert_eq!(
            format_check(" \u{85}\u{1c}<answer>x</answer>"),
            yes(true, false)
        );
        assert_eq!(format_check("\u{feff}<answer>x</answer>"), yes(true, true));
        assert_eq!(format_check("<answer>x</answer> after"), yes(true, false));
        assert_eq!(format_check("text <answer>x"), yes(false, false));
        assert_eq!(format_check(""), yes(false, false));
        // The first match starts at the first opening tag, nested or not.
        assert_eq!(
            format_check("<answer>a<answer>b</answer>"),
            yes(true, false)
        );
        assert_eq!(
            format_check("</answer> <answer>b</answer>"),
            yes(true, true)
        );
    }
}
