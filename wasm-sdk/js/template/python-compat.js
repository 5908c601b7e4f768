// Python 3 str semantics for JavaScript reward modules.
//
// A twin reward is specified by its CPython reference; JS regexes and String
// methods differ from Python's in ways that change scores. These helpers
// reproduce what CPython 3.11 does; see README.md, "Differences from Python",
// for what is still different.

import { CASED, CASE_IGNORABLE, LOWER } from "./python-casing.js";

/**
 * Regex character-class body (use inside [...]) of exactly the characters for
 * which CPython's str.isspace() is true: what `\s` matches in a str pattern
 * and what str.strip() / str.split() remove. JS `\s` and trim() also treat
 * U+FEFF as space and miss U+001C..U+001F and U+0085.
 */
export const PY_SPACE =
  "\\t\\n\\x0B\\x0C\\r\\x1C-\\x1F \\x85\\xA0\\u1680\\u2000-\\u200A" +
  "\\u2028\\u2029\\u202F\\u205F\\u3000";

/**
 * Regex source matching one letter the way re.IGNORECASE does for a str
 * pattern, for ASCII letters. Python also matches U+017F (long s) for "s"/"S",
 * U+0131 (dotless i) and U+0130 (dotted capital I) for "i"/"I", and U+212A
 * (Kelvin sign) for "k"/"K"; JS /i matches none of these and /iu differs
 * elsewhere, so spell tags out with this instead of a flag.
 */
export function pyIgnoreCaseLetter(ch) {
  const extra = {
    s: "\\u017F",
    i: "\\u0130\\u0131",
    k: "\\u212A",
  }[ch.toLowerCase()] ?? "";
  return `[${ch.toLowerCase()}${ch.toUpperCase()}${extra}]`;
}

/** Regex source for a literal ASCII word under re.IGNORECASE. */
export function pyIgnoreCase(word) {
  return Array.from(word, (c) => (/[a-z]/i.test(c) ? pyIgnoreCaseLetter(c) : escapeRegExp(c))).join("");
}

function escapeRegExp(s) {
  return s.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
}

const STRIP_RE = new RegExp(`^[${PY_SPACE}]+|[${PY_SPACE}]+$`, "gu");

/** str.strip() with no argument. */
export function pyStrip(s) {
  return s.replace(STRIP_RE, "");
}

/** string.punctuation: !"#$%&'()*+,-./:;<=>?@[\]^_`{|}~ (ASCII only). */
export const PY_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

const PUNCTUATION_RE = /[!"#$%&'()*+,\-./:;<=>?@[\\\]^_`{|}~]/g;

/** "".join(ch for ch in s if ch not in string.punctuation) */
export function deletePunctuation(s) {
  return s.replace(PUNCTUATION_RE, "");
}

function inRanges(table, cp) {
  // table: sorted, disjoint [first, last, first, last, ...]
  let lo = 0;
  let hi = table.length / 2 - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (cp < table[2 * mid]) hi = mid - 1;
    else if (cp > table[2 * mid + 1]) lo = mid + 1;
    else return true;
  }
  return false;
}

const isCased = (c) => inRanges(CASED, c.codePointAt(0));
const isCaseIgnorable = (c) => inRanges(CASE_IGNORABLE, c.codePointAt(0));

/** CPython 3.11's lower-case mapping of one code point other than U+03A3. */
function lowerCodePoint(cp) {
  if (cp === 0x130) return "i\u0307"; // the one multi-character mapping
  // LOWER: sorted, disjoint runs [first, last, step, delta, ...]
  let lo = 0;
  let hi = LOWER.length / 4 - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const first = LOWER[4 * mid];
    if (cp < first) hi = mid - 1;
    else if (cp > LOWER[4 * mid + 1]) lo = mid + 1;
    else {
      const step = LOWER[4 * mid + 2];
      return (cp - first) % step === 0 ? String.fromCodePoint(cp + LOWER[4 * mid + 3]) : String.fromCodePoint(cp);
    }
  }
  return String.fromCodePoint(cp);
}

// CPython's handle_capital_sigma (Objects/unicodeobject.c): U+03A3 lowers to
// final sigma U+03C2 in the context
//   \p{Cased} \p{Case_Ignorable}* U+03A3 !(\p{Case_Ignorable}* \p{Cased})
// and to U+03C3 otherwise.
function isFinalSigma(cps, i) {
  let j = i - 1;
  let c;
  for (; j >= 0; j--) {
    c = cps[j];
    if (!isCaseIgnorable(c)) break;
  }
  let final = j >= 0 && isCased(c);
  if (final && i + 1 < cps.length) {
    for (j = i + 1; j < cps.length; j++) {
      c = cps[j];
      if (!isCaseIgnorable(c)) break;
    }
    final = j === cps.length || !isCased(c);
  }
  return final;
}

const ASCII_ONLY = /^[\0-\x7F]*$/;

/**
 * str.lower() of CPython 3.11, independent of the JS engine.
 * String.prototype.toLowerCase differs from it: engines follow newer Unicode
 * versions (SpiderMonkey in componentize-js 0.23 lower-cases 55 code points
 * that are unassigned in CPython 3.11's Unicode 14), and engines disagree on
 * the Final_Sigma rule (V8 applies it, that SpiderMonkey does not). So the
 * mapping and the rule come from tables measured from CPython 3.11.
 */
export function pyLower(s) {
  if (ASCII_ONLY.test(s)) return s.toLowerCase();
  const cps = Array.from(s);
  let out = "";
  for (let i = 0; i < cps.length; i++) {
    const c = cps[i];
    if (c === "\u03A3") out += isFinalSigma(cps, i) ? "\u03C2" : "\u03C3";
    else out += lowerCodePoint(c.codePointAt(0));
  }
  return out;
}
