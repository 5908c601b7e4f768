//! Checks the Unicode tables against CPython 3.11: src/tables.rs must equal a fresh run of
//! gen_tables.py, the primitives built on the tables must agree with Python on every code
//! point, and the tag matcher must accept exactly the characters `re.IGNORECASE` does.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use twin_rules::{answer_matches, py};

fn run_python(python: &str, args: &[&str]) -> String {
    let out = Command::new(python)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        out.status.success(),
        "{python} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("python printed UTF-8")
}

#[test]
fn committed_tables_match_generator() {
    let Some(python) = common::python311() else {
        return;
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = dir.join("gen_tables.py");
    // To a file, as a developer would regenerate it, so no stdout encoding is involved.
    let out = std::env::temp_dir().join(format!("twin-rules-tables-{}.rs", std::process::id()));
    run_python(
        &python,
        &[
            script.to_str().expect("UTF-8 path"),
            out.to_str().expect("UTF-8 path"),
        ],
    );
    let generated = std::fs::read_to_string(&out).expect("read generated tables");
    // Best effort: a leftover file in the temp dir is harmless.
    let _ = std::fs::remove_file(&out);
    let committed = std::fs::read_to_string(dir.join("src/tables.rs")).expect("read src/tables.rs");
    assert!(
        generated == committed,
        "src/tables.rs is stale or edited by hand; regenerate it with \
         `python3 wasm-sdk/rules/gen_tables.py > wasm-sdk/rules/src/tables.rs`"
    );
}

/// Python's side of the per-code-point check, as sections of `<byte length>\n<UTF-8 text>` (the
/// text holds every character, newlines included). Surrogates are excluded, and U+0000 is left
/// out of the lowering sections because it separates their pieces (it is ASCII anyway):
///
/// 1. a flag digit per scalar value: 1 = `isspace()`, 2 = `\w`;
/// 2. `lower()` of every char from U+0001 on, as NUL-separated pieces;
/// 3. the same pieces for `"AΣ" + c` (the sigma's form shows whether c can follow a word end);
/// 4. the same for `"A" + c + "Σ"` (whether c can stand between a cased letter and a word end).
///
/// Lowering one big string keeps this to about two seconds. A NUL ends each piece: it is
/// neither cased nor case-ignorable, so it stops the final-sigma scans at the piece boundary
/// exactly as the end of a separate string would.
const CHAR_PROBE: &str = r#"
import re, sys
chars = [chr(cp) for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
words = set(re.findall(r"\w", "".join(chars)))
def section(text):
    data = text.encode("utf-8")
    sys.stdout.buffer.write(b"%d\n" % len(data) + data)
section("".join(str((1 if c.isspace() else 0) | (2 if c in words else 0)) for c in chars))
rest = chars[1:]
section("\0".join(rest).lower())
section(("A\u03a3" + "\0A\u03a3".join(rest)).lower())
section(("A" + "\u03a3\0A".join(rest) + "\u03a3").lower())
"#;

/// For each letter of "answer", one line with the code points that can replace it in a tag the
/// reward's findall accepts. The candidates are what `(?i)letter` matches anywhere in Unicode
/// (sre compiles each literal of a pattern into its own case-insensitive test, so the letter
/// behaves the same inside the tag); each is then confirmed inside the whole pattern.
const TAG_PROBE: &str = r#"
import re
everything = "".join(chr(cp) for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF)
pat = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.IGNORECASE | re.DOTALL)
for k, letter in enumerate("answer"):
    ok = [c for c in re.findall("(?i)" + letter, everything)
          if pat.fullmatch("<" + "answer"[:k] + c + "answer"[k + 1:] + ">x</answer>")]
    print(" ".join("%x" % ord(c) for c in ok))
"#;

/// Splits the probe's output into its length-prefixed sections.
fn sections(mut out: &str) -> impl Iterator<Item = &str> {
    std::iter::from_fn(move || {
        let (len, rest) = out.split_once('\n')?;
        let len: usize = len.parse().expect("section length");
        let (section, rest) = rest.split_at(len);
        out = rest;
        Some(section)
    })
}

/// Every scalar value, in order.
fn all_chars() -> Vec<char> {
    (0..=0x10FFFFu32).filter_map(char::from_u32).collect()
}

/// `chars` with `before`/`after` around each one, NUL-separated, like the probe builds them.
fn chunks(chars: &[char], before: &str, after: &str) -> String {
    let mut s = String::with_capacity(chars.len() * (before.len() + after.len() + 5));
    for (i, &c) in chars.iter().enumerate() {
        if i > 0 {
            s.push('\0');
        }
        s.push_str(before);
        s.push(c);
        s.push_str(after);
    }
    s
}

#[test]
fn primitives_agree_with_python_on_every_code_point() {
    let Some(python) = common::python311() else {
        return;
    };
    let out = run_python(&python, &["-c", CHAR_PROBE]);
    let mut sections = sections(&out);
    let flags = sections.next().expect("flags section").as_bytes();
    let chars = all_chars();
    assert_eq!(chars.len(), flags.len(), "one flag per scalar value");
    let mut bad = Vec::new();
    for (&c, &f) in chars.iter().zip(flags) {
        let f = f - b'0';
        if py::is_space(c) != (f & 1 != 0) {
            bad.push(format!("is_space U+{:04X}", c as u32));
        }
        if py::is_word(c) != (f & 2 != 0) {
            bad.push(format!("is_word U+{:04X}", c as u32));
        }
    }

    let rest = &chars[1..];
    let checks = [
        ("lower(c)", "", ""),
        ("lower(AΣc)", "A\u{3a3}", ""),
        ("lower(AcΣ)", "A", "\u{3a3}"),
    ];
    for (what, before, after) in checks {
        let want: Vec<&str> = sections
            .next()
            .unwrap_or_else(|| panic!("no {what} section"))
            .split('\0')
            .collect();
        assert_eq!(want.len(), rest.len(), "one {what} piece per char");
        let got = py::lower(&chunks(rest, before, after));
        for ((&c, w), g) in rest.iter().zip(want).zip(got.split('\0')) {
            if w != g && bad.len() < 20 {
                bad.push(format!("{what} U+{:04X}: want {w:?}, got {g:?}", c as u32));
            }
        }
    }
    assert!(bad.is_empty(), "disagreements with CPython: {bad:?}");
}

/// Characters the Rust side tries in each letter's place: planes 0 and 1, which hold every
/// cased character of Unicode 14. Python's candidates come from all of Unicode and are asserted
/// to lie in this range; outside it the matcher could only accept a character by finding it in
/// the generated fold list, which holds exactly Python's candidates. (All 1.1M scalar values
/// for all six letters would cost about eight seconds in a debug build.)
const TAG_CHARS_BELOW: u32 = 0x2_0000;

#[test]
fn tag_letters_agree_with_python() {
    let Some(python) = common::python311() else {
        return;
    };
    let out = run_python(&python, &["-c", TAG_PROBE]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "one line per letter of \"answer\"");
    let chars: Vec<char> = (0..TAG_CHARS_BELOW).filter_map(char::from_u32).collect();
    for (k, line) in lines.into_iter().enumerate() {
        let want: BTreeSet<u32> = line
            .split(' ')
            .filter(|x| !x.is_empty())
            .map(|x| u32::from_str_radix(x, 16).expect("hex"))
            .collect();
        assert!(want.iter().all(|&cp| cp < TAG_CHARS_BELOW), "{want:x?}");
        // One string of chunks "<" + tag with letter k replaced + ">x</answer>": a single scan
        // tries every character, since a failed chunk's closing tag is never used (the scan
        // moves on to the next opening tag) and a matching chunk yields exactly one match.
        let before = format!("<{}", &"answer"[..k]);
        let after = format!("{}>x</answer>", &"answer"[k + 1..]);
        let text = chunks(&chars, &before, &after);
        let got: BTreeSet<u32> = answer_matches(&text)
            .filter_map(|m| text[m.start + before.len()..].chars().next())
            .map(u32::from)
            .collect();
        assert_eq!(
            got, want,
            "characters accepted for letter {k} of \"answer\""
        );
    }
}
