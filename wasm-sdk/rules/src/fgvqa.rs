//! The FGVQA scorers of lmms-eval: yes/no pairs and 0-3 multi-choice answers.

use crate::py;
use crate::tags::{first_tag_content, remove_tags, tagged_digit};

const YES: [&str; 6] = ["yes", "y", "yeah", "yep", "true", "1"];
const NO: [&str; 5] = ["no", "n", "nope", "false", "0"];

/// Whether `\b` holds between the character before byte `i` of `s` and a word character at `i`
/// (text start counts as non-word).
fn word_starts_at(s: &str, i: usize) -> bool {
    !s[..i].chars().next_back().is_some_and(py::is_word)
}

/// Whether `\b` holds between a word character ending at byte `i` of `s` and what follows.
fn word_ends_at(s: &str, i: usize) -> bool {
    !s[i..].chars().next().is_some_and(py::is_word)
}

/// Last element of `re.findall(r"\b(yes|no)\b", c)`. Candidates cannot overlap (`yes` holds
/// no `n`, `no` no `y`), so findall's non-overlapping scan keeps every candidate and the last
/// one is found by scanning backwards.
fn last_yes_no(c: &str) -> Option<&'static str> {
    let bytes = c.as_bytes();
    (0..bytes.len()).rev().find_map(|i| {
        let word = match bytes[i] {
            b'y' if bytes[i..].starts_with(b"yes") => "yes",
            b'n' if bytes[i..].starts_with(b"no") => "no",
            _ => return None,
        };
        (word_starts_at(c, i) && word_ends_at(c, i + word.len())).then_some(word)
    })
}

/// lmms-eval `normalize_yes_no`: the last standalone `yes`/`no` of the stripped, lowered text;
/// else a YES/NO synonym spelled with only `[a-z0-9]` kept; else the first whitespace-separated
/// word; `""` for blank text.
pub fn normalize_yes_no(t: &str) -> String {
    let c = py::lower(py::strip(t));
    if c.is_empty() {
        return String::new();
    }
    if let Some(word) = last_yes_no(&c) {
        return word.to_owned();
    }
    // re.sub(r"[^a-z0-9]+", "", c): keep ASCII lowercase letters and digits only.
    let key: String = c
        .chars()
        .filter(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit())
        .collect();
    if YES.contains(&key.as_str()) {
        return "yes".to_owned();
    }
    if NO.contains(&key.as_str()) {
        return "no".to_owned();
    }
    py::split(&c).next().unwrap_or_default().to_owned()
}

/// lmms-eval `tag_answer`: `normalize_yes_no` of the stripped content of the FIRST
/// `<answer>...</answer>` (case-insensitive, may span lines); `""` when there is none.
pub fn tag_answer(t: &str) -> String {
    first_tag_content(t).map_or_else(String::new, |content| normalize_yes_no(py::strip(content)))
}

/// The answer the pair scorer compares: [`tag_answer`], or when that is empty,
/// `normalize_yes_no` of the prediction with every `<answer>`/`</answer>` removed.
pub fn fgvqa_pair_answer(pred: &str) -> String {
    let a = tag_answer(pred);
    if a.is_empty() {
        normalize_yes_no(&remove_tags(pred))
    } else {
        a
    }
}

/// 1.0 iff [`fgvqa_pair_answer`] equals `label` exactly (the label is not normalised).
pub fn fgvqa_pair(pred: &str, label: &str) -> f64 {
    if fgvqa_pair_answer(pred) == label {
        1.0
    } else {
        0.0
    }
}

/// Last element of `re.findall(r"\b([0-3])\b", t)`: a digit 0-3 with no word character on
/// either side. Single characters cannot overlap, so the backward scan finds it.
fn last_standalone_digit(t: &str) -> Option<char> {
    let bytes = t.as_bytes();
    (0..bytes.len()).rev().find_map(|i| match bytes[i] {
        b @ b'0'..=b'3' if word_starts_at(t, i) && word_ends_at(t, i + 1) => Some(char::from(b)),
        _ => None,
    })
}

/// lmms-eval `numeric`: the digit of the first `<answer> d </answer>` with d in 0-3
/// (case-insensitive tag, whitespace allowed around d), else the last standalone digit 0-3,
/// else `""`.
pub fn numeric(t: &str) -> String {
    tagged_digit(t)
        .or_else(|| last_standalone_digit(t))
        .map_or_else(String::new, String::from)
}

/// The answer the multi-choice scorer compares: [`numeric`], or when that is empty, `numeric`
/// of the prediction with every `<answer>`/`</answer>` removed.
pub fn fgvqa_multi_answer(pred: &str) -> String {
    let a = numeric(pred);
    if a.is_empty() {
        numeric(&remove_tags(pred))
    } else {
        a
    }
}

/// 1.0 iff [`fgvqa_multi_answer`] equals `label` exactly.
pub fn fgvqa_multi(pred: &str, label: &str) -> f64 {
    if fgvqa_multi_answer(pred) == label {
        1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yes_no_words() {
        assert_eq!(normalize_yes_no("yes."), "yes");
        assert_eq!(normalize_yes_no("Yes!"), "yes");
        assert_eq!(normalize_yes_no("no, it is not"), "no");
        assert_eq!(normalize_yes_no("Yes, or rather no"), "no");
        assert_eq!(normalize_yes_no("NO"), "no");
        assert_eq!(normalize_yes_no("y"), "yes");
        assert_eq!(normalize_yes_no("Y."), "yes");
        assert_eq!(normalize_yes_no("1"), "yes");
        assert_eq!(normalize_yes_no("0"), "no");
        assert_eq!(normalize_yes_no("True"), "yes");
        assert_eq!(normalize_yes_no("FALSE!!"), "no");
        assert_eq!(normalize_yes_no("Nope."), "no");
        assert_eq!(normalize_yes_no("yeah"), "yes");
        assert_eq!(normalize_yes_no(" ye-p "), "yes");
        assert_eq!(normalize_yes_no("maybe so"), "maybe");
        assert_eq!(normalize_yes_no(""), "");
        assert_eq!(normalize_yes_no(" \u{85}\u{1c} "), "");
        // `\b` needs a non-word neighbour: letters, digits, `_` and Unicode letters block it.
        assert_eq!(normalize_yes_no("yesno"), "yesno");
        assert_eq!(normalize_yes_no("yes_"), "yes");
        assert_eq!(normalize_yes_no("_no"), "no");
        assert_eq!(normalize_yes_no("_no x"), "_no");
        assert_eq!(normalize_yes_no("noé x"), "noé");
        assert_eq!(normalize_yes_no("no\u{301} x"), "no");
        assert_eq!(normalize_yes_no("no² x"), "no²");
        assert_eq!(normalize_yes_no("yes\u{feff}"), "yes");
        // lower() runs first: the Kelvin sign becomes "k", U+0130 becomes "i" + U+0307.
        assert_eq!(normalize_yes_no("YES\u{212a}"), "yesk");
        assert_eq!(normalize_yes_no("ſ"), "ſ");
        assert_eq!(normalize_yes_no("\u{130}"), "i\u{307}");
        assert_eq!(normalize_yes_no("T\u{130}RUE"), "ti\u{307}rue");
    }

    #[test]
    fn tag_answer_takes_first_tag() {
        assert_eq!(tag_answer("<answer>No</answer> <answer>yes</answer>"), "no");
        assert_eq!(tag_answer("<ANſWER> Yes. </answer>"), "yes");
        assert_eq!(tag_answer("<answer>yes"), "");
        assert_eq!(tag_answer("</answer>yes<answer>"), "");
        assert_eq!(tag_answer("<answer> </answer>"), "");
        assert_eq!(tag_answer("<answer>a<answer>no</answer>"), "no");
    }

    #[test]
    fn pair() {
        assert_eq!(fgvqa_pair("<answer>yes</answer>", "yes"), 1.0);
        assert_eq!(fgvqa_pair("<answer>yes</answer>", "Yes"), 0.0);
        assert_eq!(fgvqa_pair_answer("<answer> </answer> Yes!"), "yes");
        assert_eq!(fgvqa_pair_answer("I think <answer>no"), "no");
        assert_eq!(fgvqa_pair_answer("<answer>yes<ANSWER>"), "yes");
        assert_eq!(fgvqa_pair_answer("<answer>\u{85}</answer>"), "");
        assert_eq!(fgvqa_pair_answer("Maybe <answer>"), "maybe");
        assert_eq!(fgvqa_pair_answer(""), "");
    }

    #[test]
    fn numeric_digits() {
        assert_eq!(numeric("<answer> 2 </answer>"), "2");
        assert_eq!(numeric("<ANſWER>\u{85}3\u{1f}</answer> 1"), "3");
        assert_eq!(numeric("<answer>4</answer> 1 then 2"), "2");
        assert_eq!(numeric("<answer>12</answer>"), "");
        assert_eq!(numeric("a1 1b _1 1_ é1 1é ²1"), "");
        assert_eq!(numeric("1\u{301} -3- 4"), "3");
        assert_eq!(numeric("(0)"), "0");
        assert_eq!(numeric("\u{661}"), "");
        assert_eq!(numeric("4 5 6"), "");
        assert_eq!(numeric(""), "");
        assert_eq!(numeric("<answer>1</answer><answer>2</answer>"), "1");
    }

    #[test]
    fn multi() {
        assert_eq!(fgvqa_multi("<answer>1</answer>", "1"), 1.0);
        assert_eq!(fgvqa_multi("<answer>1</answer>", "2"), 0.0);
        assert_eq!(fgvqa_multi_answer("x<answer>2"), "2");
        assert_eq!(fgvqa_multi_answer("a<answer>2"), "2");
        assert_eq!(fgvqa_multi_answer("nothing"), "");
    }
}
