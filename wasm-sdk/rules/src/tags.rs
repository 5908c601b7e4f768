//! Hand-written equivalents of the `re` calls on `<answer>` tags: the reward's `findall`, the
//! FGVQA `search`es and the tag-removing `sub`, each a single linear scan.
//!
//! All positions are byte offsets into the input `&str` and always fall on char boundaries.

use std::borrow::Cow;

use crate::py::is_space;
use crate::tables::ANSWER_FOLDS;

/// If `<answer>` (or `</answer>` when `closing`) starts at byte `i`, the byte just past it.
///
/// Matching is that of `re.IGNORECASE` on a str pattern: `<`, `/`, `>` only match themselves
/// and each letter matches the characters measured into [`ANSWER_FOLDS`] (for `s` that
/// includes U+017F, two bytes in UTF-8, so a tag is 8..=10 bytes long).
fn tag_at(s: &str, i: usize, closing: bool) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut k = i;
    if bytes.get(k) != Some(&b'<') {
        return None;
    }
    k += 1;
    if closing {
        if bytes.get(k) != Some(&b'/') {
            return None;
        }
        k += 1;
    }
    for fold in ANSWER_FOLDS {
        let c = s.get(k..)?.chars().next()?;
        if !fold.contains(&c) {
            return None;
        }
        k += c.len_utf8();
    }
    if bytes.get(k) != Some(&b'>') {
        return None;
    }
    Some(k + 1)
}

/// Byte offsets of the `<` bytes of `s` at or after `from`; every tag starts with one.
fn lt_positions(s: &str, from: usize) -> impl Iterator<Item = usize> + '_ {
    let mut next = from;
    std::iter::from_fn(move || {
        // `str::find` of an ASCII char is a memchr over the bytes: fast, and safe on UTF-8
        // since `<` never occurs inside a multi-byte sequence.
        let i = next + s.get(next..)?.find('<')?;
        next = i + 1;
        Some(i)
    })
}

/// First `<answer>` at or after `from`: `(start, end)`.
fn find_open(s: &str, from: usize) -> Option<(usize, usize)> {
    lt_positions(s, from).find_map(|i| tag_at(s, i, false).map(|end| (i, end)))
}

/// First `</answer>` at or after `from`: `(start, end)`.
fn find_close(s: &str, from: usize) -> Option<(usize, usize)> {
    lt_positions(s, from).find_map(|i| tag_at(s, i, true).map(|end| (i, end)))
}

/// End of the Python-whitespace run starting at byte `i` (`\s*`, greedy).
fn skip_space(s: &str, i: usize) -> usize {
    let rest = &s[i..];
    rest.char_indices()
        .find(|&(_, c)| !is_space(c))
        .map_or(s.len(), |(k, _)| i + k)
}

/// Start of the Python-whitespace run that ends at byte `hi`, but not before `lo`.
fn skip_space_back(s: &str, lo: usize, hi: usize) -> usize {
    s[lo..hi]
        .char_indices()
        .rev()
        .find(|&(_, c)| !is_space(c))
        .map_or(lo, |(k, c)| lo + k + c.len_utf8())
}

/// One match of `<answer>\s*(.*?)\s*</answer>` (IGNORECASE, DOTALL), as byte offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerMatch {
    /// Where the opening tag starts (`m.start()`).
    pub start: usize,
    /// Where group 1 starts: after the opening tag and all the whitespace that follows it.
    pub content_start: usize,
    /// Where group 1 ends: before the whitespace run that precedes the closing tag.
    pub content_end: usize,
    /// Just past the closing tag (`m.end()`).
    pub end: usize,
}

impl AnswerMatch {
    /// Group 1 of the match in `s`, the string the match was found in (`""` for any other
    /// string whose char boundaries do not fit, rather than a panic).
    pub fn content<'a>(&self, s: &'a str) -> &'a str {
        s.get(self.content_start..self.content_end)
            .unwrap_or_default()
    }
}

/// Iterator over the matches of `re.finditer(r"<answer>\s*(.*?)\s*</answer>", s, re.I | re.S)`;
/// see [`answer_matches`].
#[derive(Debug, Clone)]
pub struct AnswerMatches<'a> {
    s: &'a str,
    pos: usize,
    done: bool,
}

impl Iterator for AnswerMatches<'_> {
    type Item = AnswerMatch;

    fn next(&mut self) -> Option<AnswerMatch> {
        if self.done {
            return None;
        }
        let s = self.s;
        let found = find_open(s, self.pos).and_then(|(start, open_end)| {
            // The greedy `\s*` takes the whole run; giving some back never helps, since the
            // lazy group would then start on whitespace and can only end where it could have
            // ended anyway (see the crate docs).
            let content_start = skip_space(s, open_end);
            // The lazy group ends at the first j from which `\s*</answer>` matches, i.e. at
            // the start of the whitespace run before the FIRST closing tag after the group's
            // start (never before the group's start).
            let (close, end) = find_close(s, content_start)?;
            let content_end = skip_space_back(s, content_start, close);
            Some(AnswerMatch {
                start,
                content_start,
                content_end,
                end,
            })
        });
        match found {
            Some(m) => {
                self.pos = m.end;
                Some(m)
            }
            None => {
                // No opening tag left, or one without a closing tag after it: then no later
                // opening tag has one either, so findall is over. Stopping here (instead of
                // retrying at every later `<answer>` as sre does) keeps adversarial input such
                // as many unclosed tags linear.
                self.done = true;
                None
            }
        }
    }
}

/// All matches of the reward's `re.findall(r"<answer>\s*(.*?)\s*</answer>", s, re.I | re.S)`,
/// in order, as byte offsets. Linear time: the scan for closing tags never revisits text.
pub fn answer_matches(s: &str) -> AnswerMatches<'_> {
    AnswerMatches {
        s,
        pos: 0,
        done: false,
    }
}

/// Group 1 of `re.search(r"<answer>(.*?)</answer>", s, re.I | re.S)`: the text between the
/// FIRST opening tag and the first closing tag after it.
pub(crate) fn first_tag_content(s: &str) -> Option<&str> {
    // If the first opening tag has no closing tag after it, no later one has either.
    let (_, open_end) = find_open(s, 0)?;
    let (close, _) = find_close(s, open_end)?;
    Some(&s[open_end..close])
}

/// Group 1 of `re.search(r"<answer>\s*([0-3])\s*</answer>", s, re.I)`: the first opening tag
/// whose content is one digit 0-3 with only whitespace around it.
pub(crate) fn tagged_digit(s: &str) -> Option<char> {
    let bytes = s.as_bytes();
    let mut from = 0;
    while let Some((_, open_end)) = find_open(s, from) {
        // Backtracking the first `\s*` would put whitespace where the digit must be, and the
        // second `\s*` is followed by `<`, so greedy runs are the only candidates.
        let d = skip_space(s, open_end);
        if let Some(&b @ b'0'..=b'3') = bytes.get(d)
            && tag_at(s, skip_space(s, d + 1), true).is_some()
        {
            return Some(char::from(b));
        }
        // Opening tags cannot overlap (a tag holds one `<`), so resume after this one.
        from = open_end;
    }
    None
}

/// `re.sub(r"</?answer>", "", s, flags=re.IGNORECASE)`: removes every opening and closing tag
/// in one left-to-right pass; tags that only form once others are removed stay.
pub(crate) fn remove_tags(s: &str) -> Cow<'_, str> {
    let mut out = String::new();
    let mut copied = 0;
    let mut from = 0;
    while let Some((start, end)) = lt_positions(s, from).find_map(|i| {
        tag_at(s, i, false)
            .or_else(|| tag_at(s, i, true))
            .map(|end| (i, end))
    }) {
        out.push_str(&s[copied..start]);
        copied = end;
        from = end;
    }
    if copied == 0 {
        return Cow::Borrowed(s);
    }
    out.push_str(&s[copied..]);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(s: &str) -> Vec<&str> {
        answer_matches(s).map(|m| m.content(s)).collect()
    }

    #[test]
    fn tags_ignore_case_with_long_s() {
        assert_eq!(tag_at("<ANSWER>", 0, false), Some(8));
        assert_eq!(tag_at("<anſwer>", 0, false), Some(9));
        assert_eq!(tag_at("</AnſWeR>", 0, true), Some(10));
        assert_eq!(tag_at("<answer", 0, false), None);
        assert_eq!(tag_at("< answer>", 0, false), None);
        // Other look-alikes are not case variants for sre.
        assert_eq!(tag_at("<\u{212b}nswer>", 0, false), None);
        assert_eq!(tag_at("<ａnswer>", 0, false), None);
        assert_eq!(tag_at("x<answer>", 1, false), Some(9));
    }

    #[test]
    fn findall_groups() {
        assert_eq!(contents("<answer> yes </answer>"), ["yes"]);
        assert_eq!(contents("<answer>\u{1c}a b\u{85}</answer>"), ["a b"]);
        assert_eq!(contents("<answer>   </answer>"), [""]);
        assert_eq!(contents("<answer></answer>"), [""]);
        assert_eq!(contents("<answer>a</answer><answer>b</answer>"), ["a", "b"]);
        // Nested: the first opening tag wins, its group runs to the first closing tag.
        assert_eq!(
            contents("<answer>a<answer>b</answer>c</answer>"),
            ["a<answer>b"]
        );
        // An unclosed tag matches nothing (and no later tag can have a closer either).
        assert_eq!(contents("<answer>a"), Vec::<&str>::new());
        assert_eq!(contents("</answer><answer>x</answer>"), ["x"]);
        assert_eq!(contents("<answer>x</answer></answer>"), ["x"]);
        // U+FEFF is not Python whitespace, so it stays in the group.
        assert_eq!(
            contents("<answer>\u{feff}x\u{feff}</answer>"),
            ["\u{feff}x\u{feff}"]
        );
        let s = "ab <ANſWER>\n1\n</answer> c";
        let m: Vec<AnswerMatch> = answer_matches(s).collect();
        assert_eq!(
            m,
            [AnswerMatch {
                start: 3,
                content_start: 13,
                content_end: 14,
                end: 24
            }]
        );
    }

    #[test]
    fn searches() {
        assert_eq!(
            first_tag_content("<answer> a </answer><answer>b</answer>"),
            Some(" a ")
        );
        assert_eq!(first_tag_content("<answer>a"), None);
        assert_eq!(first_tag_content(""), None);
        assert_eq!(
            tagged_digit("<answer> 7 </answer><answer>\u{85}2\u{1f}</answer>"),
            Some('2')
        );
        assert_eq!(tagged_digit("<answer>12</answer>"), None);
        assert_eq!(tagged_digit("<answer>\u{feff}1</answer>"), None);
        assert_eq!(tagged_digit("<answer>3"), None);
    }

    #[test]
    fn sub_removes_tags_once() {
        assert_eq!(remove_tags("a<ANSWER>b</anſwer>c"), "abc");
        assert_eq!(remove_tags("<ans<answer>wer>"), "<answer>");
        assert_eq!(remove_tags("no tags <answer"), "no tags <answer");
        assert!(matches!(remove_tags("plain"), Cow::Borrowed(_)));
        assert_eq!(remove_tags("<answer>"), "");
    }

    #[test]
    fn many_unclosed_tags_stay_linear() {
        let s = "<answer>".repeat(200_000);
        assert_eq!(answer_matches(&s).count(), 0);
        assert_eq!(first_tag_content(&s), None);
        assert_eq!(tagged_digit(&s), None);
        let s = "<answer>1 ".repeat(100_000) + "</answer>";
        assert_eq!(answer_matches(&s).count(), 1);
    }
}
