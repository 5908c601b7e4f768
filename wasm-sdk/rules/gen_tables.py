#!/usr/bin/env python3
"""Generator of wasm-sdk/rules/src/tables.rs: Unicode tables taken from CPython 3.11 itself.

Every table is measured by asking the running interpreter (str methods and the `re` module),
never read from the Unicode data files, because the Rust crate must agree with what CPython
3.11 *does*, including where that differs from the Unicode standard's own property lists.

Usage (from the repository root):

    python3 wasm-sdk/rules/gen_tables.py > wasm-sdk/rules/src/tables.rs

or with the output path as the only argument. tests/tables.rs reruns this script and fails if
the committed file differs, so the tables cannot drift from the reference interpreter.
"""

import re
import sys
import unicodedata

# The rules are pinned to CPython 3.11 (Unicode 14.0.0); another interpreter would silently
# produce other tables, so refuse instead.
if sys.version_info[:2] != (3, 11):
    sys.exit("gen_tables.py needs CPython 3.11, found %d.%d" % sys.version_info[:2])
if unicodedata.unidata_version != "14.0.0":
    sys.exit("gen_tables.py expects Unicode 14.0.0, found " + unicodedata.unidata_version)

SIGMA = "\u03a3"
SMALL_SIGMA = "\u03c3"
FINAL_SIGMA = "\u03c2"

# Every scalar value; surrogates are not chars in Rust and cannot occur in valid UTF-8.
CODE_POINTS = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
ALL = "".join(map(chr, CODE_POINTS))


def ranges(cps):
    """Collapse a sorted list of code points into inclusive (start, end) ranges."""
    out = []
    for cp in cps:
        if out and out[-1][1] + 1 == cp:
            out[-1][1] = cp
        else:
            out.append([cp, cp])
    return [tuple(r) for r in out]


def matched(pattern):
    """Code points that the compiled pattern matches as a single character.

    One findall over the string of all code points is much faster than a million
    fullmatch calls; every pattern used here matches exactly one character.
    """
    return sorted({ord(c) for c in re.findall(pattern, ALL)})


# --- whitespace: str.isspace(), which is also what strip(), split() and `\s` use.
space = [cp for cp in CODE_POINTS if chr(cp).isspace()]
assert matched(r"\s") == space, "re \\s differs from str.isspace()"
assert matched(r"(?i)\s") == space, "re (?i)\\s differs from str.isspace()"

# --- word characters for `\b`: sre's Unicode \w is isalnum() or '_'.
word = [cp for cp in CODE_POINTS if chr(cp).isalnum() or cp == 0x5F]
assert matched(r"\w") == word, "re \\w differs from isalnum() or '_'"

# --- `[0-3]` under IGNORECASE still matches only the four ASCII digits.
assert matched(r"(?i)[0-3]") == [0x30, 0x31, 0x32, 0x33]

# --- IGNORECASE literal matching of the tag "answer": for each letter, every single character
# that sre accepts in its place. Measured, not assumed (this is how U+017F LATIN SMALL LETTER
# LONG S turns up for "s"). The punctuation of the tags must match only itself.
for punct in "</>":
    assert matched("(?i)" + re.escape(punct)) == [ord(punct)], punct
folds = [matched("(?i)" + letter) for letter in "answer"]
for letter, fold in zip("answer", folds):
    # The tags are matched character by character, so a multi-character equivalent (which sre
    # does not have anyway) would break the matcher's model.
    assert ord(letter) in fold and all(
        re.fullmatch("(?i)<answer>", "<answer>".replace(letter, chr(cp), 1)) for cp in fold
    ), letter

# --- lowercase mapping (str.lower(), which is Unicode full lowercasing). Capital sigma is
# handled by the contextual rule in the Rust code, so it is left out of the table.
single = []  # (code point, lowercase code point)
multi = []  # (code point, lowercase string of several characters)
for cp in CODE_POINTS:
    if cp == 0x3A3:
        continue
    c = chr(cp)
    low = c.lower()
    if low == c:
        continue
    if len(low) == 1:
        single.append((cp, ord(low)))
    else:
        multi.append((cp, low))
assert chr(0x3A3).lower() == SMALL_SIGMA

# Runs of code points that map with the same delta at a fixed stride (1 for blocks like
# A-Z, 2 for the alternating upper/lower pairs of Latin Extended): about 180 runs instead
# of about 1,400 pairs. Built from consecutive entries of the sorted list, so runs never
# overlap and every mapped code point inside a run's span is on its stride.
runs = []  # [start, end, stride, delta]
for cp, low in single:
    delta = low - cp
    if runs:
        run = runs[-1]
        step = cp - run[1]
        if run[3] == delta and (step == run[2] or (run[0] == run[1] and step in (1, 2))):
            run[1] = cp
            run[2] = step
            continue
    runs.append([cp, cp, 1, delta])
# Check the runs decode back to exactly the measured mapping.
decoded = {}
for start, end, stride, delta in runs:
    for cp in range(start, end + 1, stride):
        decoded[cp] = cp + delta
assert decoded == dict(single)

# --- final sigma. CPython lowers U+03A3 to U+03C2 when, in the ORIGINAL string, the nearest
# preceding character that is not case-ignorable exists and is cased, and the nearest
# following character that is not case-ignorable is absent or not cased. CPython does not
# expose Cased / Case_Ignorable, so measure them through lower() itself:
#   T1(c): "A" + SIGMA + c lowers the sigma to final. "A" is cased and not ignorable, so
#          T1(c) = ignorable(c) or not cased(c).
#   T2(c): "A" + c + SIGMA lowers the sigma to final. Sigma is last, so
#          T2(c) = ignorable(c) or cased(c).
# Hence ignorable(c) = T1 and T2, and for non-ignorable c, cased(c) = not T1. A character
# that is both cased and ignorable (U+0345, U+02B0, ...) is skipped by both scans before
# its cased-ness is asked, so the only cased-ness the rule can observe is "cased and not
# ignorable" = not T1; that is the CASED table below.
ignorable = []
cased = []
for cp in CODE_POINTS:
    c = chr(cp)
    t1 = ("A" + SIGMA + c).lower()[1] == FINAL_SIGMA
    t2 = ("A" + c + SIGMA).lower()[-1] == FINAL_SIGMA
    if t1 and t2:
        ignorable.append(cp)
    elif not t1:
        cased.append(cp)
# Spot checks of the derivation against properties known from the Unicode standard.
for cp in (0x27, 0x2E, 0x3A, 0x5E, 0x60, 0xAD, 0x301, 0x345, 0x2019):
    assert cp in ignorable, hex(cp)
for cp in (0x41, 0x61, 0x3A3, 0x3C2, 0xDF, 0x1E9E, 0x130):
    assert cp in cased, hex(cp)
for cp in (0x20, 0x30, 0x5F, 0x4E00, 0x1F600):
    assert cp not in cased and cp not in ignorable, hex(cp)


def fmt_ranges(name, doc, rs):
    lines = ["/// " + d for d in doc]
    lines.append("pub(crate) const %s: &[(u32, u32)] = &[" % name)
    per_line = 5
    for i in range(0, len(rs), per_line):
        chunk = rs[i : i + per_line]
        lines.append("    " + " ".join("(0x%04X, 0x%04X)," % r for r in chunk))
    lines.append("];")
    return "\n".join(lines)


def rust_char(cp):
    c = chr(cp)
    if c.isascii() and c.isalnum():
        return "'%s'" % c
    return "'\\u{%x}'" % cp


def rust_str(s):
    return '"' + "".join("\\u{%x}" % ord(c) if not (c.isascii() and c.isalnum()) else c for c in s) + '"'


out = []
out.append("//! Unicode tables of CPython 3.11 (Unicode 14.0.0), GENERATED by gen_tables.py: do not edit.")
out.append("//!")
out.append("//! Regenerate from the repository root with")
out.append("//! `python3 wasm-sdk/rules/gen_tables.py > wasm-sdk/rules/src/tables.rs`;")
out.append("//! `tests/tables.rs` fails when this file and the generator's output differ.")
out.append("//! Ranges are inclusive `(first, last)` code points, sorted and disjoint, for binary search.")
out.append("")
out.append(fmt_ranges("SPACE", ["`str.isspace()` (also `\\s`, `strip()`, `split()`)."], ranges(space)))
out.append("")
out.append(fmt_ranges("WORD", ["`\\w` of `re` str patterns: `str.isalnum() or c == '_'`."], ranges(word)))
out.append("")
out.append(
    fmt_ranges(
        "CASE_IGNORABLE",
        ["Case-ignorable characters, as CPython's final-sigma rule sees them."],
        ranges(ignorable),
    )
)
out.append("")
out.append(
    fmt_ranges(
        "CASED",
        [
            "Cased characters that are not also case-ignorable: the only cased-ness the final-sigma",
            "rule can observe, since it skips case-ignorable characters before looking.",
        ],
        ranges(cased),
    )
)
out.append("")
out.append("/// Single-character `str.lower()` mappings as runs `(first, last, stride, delta)`: every")
out.append("/// `first + k * stride <= last` lowers to itself plus `delta`. U+03A3 is left to the")
out.append("/// final-sigma rule.")
out.append("pub(crate) const LOWER_RUNS: &[(u32, u32, u32, i32)] = &[")
per_line = 3
for i in range(0, len(runs), per_line):
    chunk = runs[i : i + per_line]
    out.append("    " + " ".join("(0x%04X, 0x%04X, %d, %d)," % tuple(r) for r in chunk))
out.append("];")
out.append("")
out.append("/// `str.lower()` mappings to several characters.")
out.append("pub(crate) const LOWER_MULTI: &[(char, &str)] = &[")
for cp, low in multi:
    out.append("    (%s, %s)," % (rust_char(cp), rust_str(low)))
out.append("];")
out.append("")
out.append("/// For each letter of `answer`, the characters that `re.IGNORECASE` accepts in its place")
out.append("/// (`<`, `/` and `>` match only themselves).")
out.append("pub(crate) const ANSWER_FOLDS: [&[char]; 6] = [")
for fold in folds:
    out.append("    &[" + ", ".join(rust_char(cp) for cp in fold) + "],")
out.append("];")
text = "\n".join(out) + "\n"

if len(sys.argv) > 1:
    with open(sys.argv[1], "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
else:
    sys.stdout.write(text)
