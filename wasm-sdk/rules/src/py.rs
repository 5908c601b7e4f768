//! Python-3.11-compatible string primitives: `isspace`, `\w`, `strip()`, `split()`, `lower()`.
//!
//! Rust's `char::is_whitespace`/`to_lowercase` follow newer Unicode and other definitions
//! (U+001C..U+001F and U+0085 are whitespace to Python, not to `trim()`; Python's `lower()` has
//! a contextual final-sigma rule), so every primitive here reads the tables measured from
//! CPython 3.11 by `gen_tables.py`, with ASCII fast paths in front.

use crate::tables;

/// Whether `c` is in one of the sorted, disjoint inclusive ranges.
fn in_ranges(ranges: &[(u32, u32)], c: char) -> bool {
    let c = c as u32;
    // Index of the first range starting after `c`; only the range before it can contain `c`.
    let i = ranges.partition_point(|&(first, _)| first <= c);
    i > 0 && ranges[i - 1].1 >= c
}

/// Python `c.isspace()`; also what `\s`, `str.strip()` and `str.split()` use.
///
/// Includes U+001C..U+001F and U+0085, which Rust's `char::is_whitespace` leaves out, and
/// excludes U+FEFF, U+200B and U+180E.
#[inline]
pub fn is_space(c: char) -> bool {
    if c.is_ascii() {
        // ASCII whitespace for Python: \t \n \v \f \r, the four separators U+001C..U+001F, space.
        return matches!(c, '\t'..='\r' | '\u{1c}'..='\u{20}');
    }
    // Nothing between U+0080 and U+0084 is whitespace; U+0085 is the first non-ASCII one.
    c >= '\u{85}' && in_ranges(tables::SPACE, c)
}

/// Whether `c` is a word character for `re`'s `\w` and `\b` on str patterns: Python
/// `c.isalnum() or c == '_'` (so `²`, `١`, `Ⅻ` are word characters, U+0301 is not).
#[inline]
pub fn is_word(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphanumeric() || c == '_';
    }
    in_ranges(tables::WORD, c)
}

/// Case-ignorable, as CPython's final-sigma rule sees it.
fn is_case_ignorable(c: char) -> bool {
    in_ranges(tables::CASE_IGNORABLE, c)
}

/// Cased and not case-ignorable; only ever asked of characters that are not case-ignorable,
/// where it is plain cased-ness (see `gen_tables.py`).
fn is_cased(c: char) -> bool {
    in_ranges(tables::CASED, c)
}

/// Python `str.strip()` with no arguments.
pub fn strip(s: &str) -> &str {
    s.trim_matches(is_space)
}

/// Python `str.split()` with no arguments: the non-empty runs between Python whitespace.
pub fn split(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_space).filter(|part| !part.is_empty())
}

/// Python `str.lower()`: Unicode 14 full lowercase mappings (`İ` becomes `i` + U+0307, the
/// Kelvin sign becomes ASCII `k`) and the final-sigma rule for U+03A3.
pub fn lower(s: &str) -> String {
    if s.is_ascii() {
        return s.to_ascii_lowercase();
    }
    let mut out = String::with_capacity(s.len());
    for (i, c) in s.char_indices() {
        if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
        } else if c == '\u{3a3}' {
            out.push(if is_final_sigma(s, i) {
                '\u{3c2}'
            } else {
                '\u{3c3}'
            });
        } else {
            push_lower(c, &mut out);
        }
    }
    out
}

/// CPython's `handle_capital_sigma`: the sigma at byte `i` ends a word when the nearest
/// preceding non-case-ignorable character exists and is cased, and the nearest following one
/// is absent or not cased. It looks at the original string, not at what was lowered so far.
///
/// Linear overall: each scan stops at the first non-ignorable character (a capital sigma is
/// one), so a run of ignorable characters is crossed by at most the two sigmas around it.
fn is_final_sigma(s: &str, i: usize) -> bool {
    let before = s[..i].chars().rev().find(|&c| !is_case_ignorable(c));
    if !before.is_some_and(is_cased) {
        return false;
    }
    let after = s[i + '\u{3a3}'.len_utf8()..]
        .chars()
        .find(|&c| !is_case_ignorable(c));
    !after.is_some_and(is_cased)
}

/// Appends the context-free lowercase of the non-ASCII, non-sigma `c`.
fn push_lower(c: char, out: &mut String) {
    let cp = c as u32;
    let runs = tables::LOWER_RUNS;
    let i = runs.partition_point(|&(first, ..)| first <= cp);
    if i > 0 {
        let (first, last, stride, delta) = runs[i - 1];
        if cp <= last && (cp - first).is_multiple_of(stride) {
            // The generator checked every run decodes to a valid scalar value; the fallback
            // keeps this panic-free rather than trusting that silently.
            if let Some(l) = cp.checked_add_signed(delta).and_then(char::from_u32) {
                out.push(l);
                return;
            }
        }
    }
    match tables::LOWER_MULTI.iter().find(|&&(from, _)| from == c) {
        Some(&(_, to)) => out.push_str(to),
        None => out.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_whitespace_differs_from_rust() {
        for c in [
            '\u{1c}', '\u{1d}', '\u{1e}', '\u{1f}', '\u{85}', '\u{a0}', '\u{2028}', '\u{3000}',
        ] {
            assert!(is_space(c), "{c:?}");
        }
        for c in ['\u{feff}', '\u{200b}', '\u{180e}', 'a', '\u{84}', '\u{0}'] {
            assert!(!is_space(c), "{c:?}");
        }
        assert_eq!(strip("\u{1c}\u{85} a b\u{2028}\u{1f}"), "a b");
        assert_eq!(strip("\u{feff}a\u{feff}"), "\u{feff}a\u{feff}");
        assert_eq!(strip(" \t\u{3000} "), "");
    }

    #[test]
    fn split_like_python() {
        let v: Vec<&str> = split("\u{85} a\u{1e}b  c\u{a0}").collect();
        assert_eq!(v, ["a", "b", "c"]);
        assert_eq!(split("  \u{2029} ").count(), 0);
        assert_eq!(split("").count(), 0);
        let v: Vec<&str> = split("a\u{feff}b").collect();
        assert_eq!(v, ["a\u{feff}b"]);
    }

    #[test]
    fn word_chars() {
        for c in ['a', 'Z', '0', '_', '²', '١', 'é', 'Σ', '中', 'Ⅻ'] {
            assert!(is_word(c), "{c:?}");
        }
        for c in [' ', '-', '\u{301}', '\u{345}', '😀', '.', '\u{85}'] {
            assert!(!is_word(c), "{c:?}");
        }
    }

    #[test]
    fn lower_full_mappings() {
        assert_eq!(lower("ABC xyz"), "abc xyz");
        assert_eq!(lower("\u{130}"), "i\u{307}");
        assert_eq!(lower("\u{212a}"), "k");
        assert_eq!(lower("ẞ"), "ß");
        assert_eq!(lower("ß"), "ß");
        assert_eq!(lower("ſ"), "ſ");
        assert_eq!(lower("ДЖ Ǆ ǅ Ⅻ Ａ"), "дж ǆ ǆ ⅻ ａ");
        assert_eq!(lower("\u{10400}"), "\u{10428}");
    }

    #[test]
    fn final_sigma() {
        assert_eq!(lower("Σ"), "σ");
        assert_eq!(lower("ΑΣ"), "ας");
        assert_eq!(lower("ΑΣΑ"), "ασα");
        assert_eq!(lower("ΑΣ ΑΣ"), "ας ας");
        assert_eq!(lower("ΣΑ"), "σα");
        // Case-ignorable characters are skipped on both sides.
        assert_eq!(lower("Α'Σ"), "α'ς");
        assert_eq!(lower("ΑΣ'"), "ας'");
        assert_eq!(lower("ΑΣ'Α"), "ασ'α");
        assert_eq!(lower("Α\u{301}Σ.\u{345}"), "α\u{301}ς.\u{345}");
        // U+0345 is cased and case-ignorable: skipped, so it neither starts nor blocks a word end.
        assert_eq!(lower("\u{345}Σ"), "\u{345}σ");
        assert_eq!(lower("ΑΣ\u{345}Α"), "ασ\u{345}α");
        // Digits are neither: "1Σ" has no cased character before the sigma.
        assert_eq!(lower("1Σ"), "1σ");
        assert_eq!(lower("ΑΣ1"), "ας1");
        // Context comes from the original string: "ΣΣ" is cased before the second sigma.
        assert_eq!(lower("ΣΣ"), "σς");
        assert_eq!(lower("ΣΣΣ"), "σσς");
    }
}
