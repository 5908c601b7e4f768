#!/usr/bin/env python3
"""Write wasm-sdk/conformance/binary-match.jsonl (stdlib only).

    python3 gen_binary_match_vectors.py > ../../conformance/binary-match.jsonl
    python3 ../../conformance/oracle.py expect ../../conformance/binary-match.jsonl \
        > ../../conformance/binary-match.expected.jsonl

`--dropped` prints the cases left out of the shared vectors because the SDK
runtimes cannot agree with CPython 3.11 on them (see the READMEs).
Invisible and non-ASCII space characters are written as \\u escapes.
"""
import json, sys, unicodedata
A = lambda s: f"<answer>{s}</answer>"
T = "<think>The two images show the same mug: handle shape and logo match.</think>\n"
cases = [
 # (question_type, completion, ground_truth, case description)
 ("pair", A("yes"), "yes", "correct yes"),
 ("pair", A("no"), "no", "correct no"),
 ("pair", A("yes"), "no", "incorrect yes"),
 ("pair", T + A("Yes"), "yes", "reasoning then answer, capitalised"),
 ("pair", A("YES."), "yes", "upper case and trailing period"),
 ("pair", A("yes") + " wait, actually " + A("no"), "no", "multiple tags: last wins"),
 ("pair", A("yes") + " wait, actually " + A("no"), "yes", "multiple tags: earlier one does not count"),
 ("pair", A("yes") + " then <answer>no", "yes", "unclosed last tag ignored"),
 ("pair", "<answer>yes", "yes", "only an unclosed tag"),
 ("pair", "yes</answer>", "yes", "closing tag only"),
 ("pair", "<answer>yes</answer", "yes", "truncated closing tag"),
 ("pair", "<ANSWER>yes</ANSWER>", "yes", "upper-case tags"),
 ("pair", "<Answer>No</aNsWeR>", "no", "mixed-case tags"),
 ("pair", "<an\u017fwer>yes</answer>", "yes", "U+017F long s in opening tag (IGNORECASE)"),
 ("pair", "<answer>no</an\u017fwer>", "no", "U+017F long s in closing tag"),
 ("pair", "<AN\u017fWER>yes</AN\u017fWER>", "yes", "U+017F in both upper-case tags"),
 ("pair", "<\u0430nswer>yes</answer>", "yes", "Cyrillic a in tag is not a tag"),
 ("pair", "< answer>yes</answer>", "yes", "space inside tag is not a tag"),
 ("pair", "<answer type=\"final\">yes</answer>", "yes", "tag with attribute is not a tag"),
 ("pair", A("\n   yes \t\n"), "yes", "ASCII whitespace around answer"),
 ("other", A("not sure"), "not sure", "inner space kept"),
 ("other", A("not sure"), "notsure", "inner space not removed"),
 ("pair", A("'yes'!"), "yes", "punctuation around answer"),
 ("pair", A("y.e.s"), "yes", "punctuation inside answer deleted"),
 ("pair", A("\u201cyes\u201d"), "yes", "curly quotes are not string.punctuation"),
 ("pair", A("\x1cyes\x1c"), "yes", "U+001C around answer (Python whitespace)"),
 ("pair", A("\x1d\x1e\x1fno"), "no", "U+001D-U+001F before answer"),
 ("pair", A("\x85no\x85"), "no", "U+0085 around answer"),
 ("pair", A("\xa0yes\xa0"), "yes", "U+00A0 around answer"),
 ("pair", A("yes"), "\x1fyes\x85", "U+001F/U+0085 around ground truth"),
 ("pair", A("\x0b\x0cyes"), "yes", "vertical tab and form feed"),
 ("pair", A("\u3000yes\u2028"), "yes", "U+3000 and U+2028 around answer"),
 ("pair", A("\u2003no\u202f"), "no", "U+2003 and U+202F around answer"),
 ("pair", A("\ufeffyes"), "yes", "U+FEFF is not Python whitespace"),
 ("pair", A("yes"), "yes\ufeff", "trailing U+FEFF in ground truth is kept"),
 ("pair", A("\u200byes"), "yes", "U+200B is not whitespace"),
 ("pair", A("\u180eyes"), "yes", "U+180E is not whitespace"),
 ("other", A("not\xa0sure"), "not sure", "inner U+00A0 not normalised"),
 ("pair", A(""), "yes", "empty answer"),
 ("pair", A("   "), "", "whitespace-only answer, empty truth: both absent"),
 ("pair", A("..."), "...", "punctuation-only: both absent"),
 ("pair", A("yes"), "", "empty ground truth"),
 ("pair", A("yes") + A(""), "yes", "last tag empty wins"),
 ("pair", "yes", "yes", "missing tags"),
 ("pair", "", "no", "empty completion"),
 ("pair", "<answer><answer>yes</answer></answer>", "yes", "nested tags: group is '<answer>yes'"),
 ("other", "<answer><answer>yes</answer></answer>", "answeryes", "nested tags: punctuation of inner tag deleted"),
 ("other", A("yes\nno"), "yes\nno", "DOTALL: newline inside answer"),
 ("multi", A("0"), "0", "multi 0"),
 ("multi", A("1"), "1", "multi 1"),
 ("multi", T + A(" 2 "), "2", "multi 2 with spaces"),
 ("multi", A("3"), "3", "multi 3"),
 ("multi", A("2"), "1", "multi wrong count"),
 ("multi", A("three"), "3", "multi word vs digit"),
 ("multi", A("03"), "3", "multi leading zero"),
 ("multi", A("(3)."), "3", "multi punctuation"),
 ("multi", A("-1"), "1", "minus sign is punctuation"),
 ("multi", A("1") + " hmm " + A("3"), "3", "multi last wins"),
 ("other", A("Caf\xe9"), "caf\xe9", "accented Latin lower-cased"),
 ("other", A("\xc9T\xc9"), "\xe9t\xe9", "accented capitals"),
 ("other", A("cafe"), "caf\xe9", "accent matters"),
 ("other", A("\u039f\u0394\u039f\u03a3"), "\u03bf\u03b4\u03bf\u03c2", "Greek final sigma"),
 ("other", A("\u039f\u0394\u039f\u03a3"), "\u03bf\u03b4\u03bf\u03c3", "Greek final sigma is not medial sigma"),
 ("other", A("\u03a3\u039f\u03a6\u0399\u0391"), "\u03c3\u03bf\u03c6\u03b9\u03b1", "Greek initial capital sigma"),
 ("other", A("\u03a3"), "\u03c3", "lone capital sigma"),
 ("other", A("\u039f\u0394\u039f\u03a3."), "\u03bf\u03b4\u03bf\u03c2", "final sigma before a period (case-ignorable)"),
 ("other", A("\u0391\u03a3 \u0391"), "\u03b1\u03c2 \u03b1", "final sigma before a space"),
 ("other", A("\u0391\u03a3'\u0391"), "\u03b1\u03c3\u03b1", "medial sigma across an apostrophe"),
 ("other", A("\u0391\u03a3\u0301"), "\u03b1\u03c2\u0301", "final sigma before a combining accent"),
 ("other", A("1\u03a3"), "1\u03c2", "sigma after a digit is not final"),
 ("other", A("\u662f"), "\u662f", "CJK equal"),
 ("other", A("\u662f\u3002"), "\u662f", "CJK full stop is not string.punctuation"),
 ("other", A("\uff39\uff25\uff33"), "yes", "full-width letters"),
 ("other", A("\u017f"), "s", "long s in the answer is not s"),
 ("other", A("\U0001f44d"), "\U0001f44d", "astral emoji"),
]
dropped = [
 # componentize-js drops one leading U+FEFF from every string it receives
 ("pair", A("yes"), "\ufeffyes", "leading U+FEFF in ground truth is kept"),
 # case pairs new in Unicode 16: CPython 3.11 (Unicode 14) leaves them,
 # componentize-py 0.25.1's CPython 3.14 lowers them (the JS template's pyLower
 # uses CPython 3.11 tables and agrees with the oracle)
 ("other", A("\ua7dc"), "\u019b", "U+A7DC (Unicode 16) lowers to U+019B"),
 ("other", A("\u1c89"), "\u1c8a", "U+1C89 (Unicode 16) lowers to U+1C8A"),
 ("other", A("\U00010d50"), "\U00010d70", "Garay capital (Unicode 16)"),
]
which = dropped if "--dropped" in sys.argv else cases
def esc(s):
    out=[]
    for c in s:
        o=ord(c)
        if o>=0x80 and (not c.isprintable() or c.isspace() or unicodedata.category(c) in ("Cf","Mn","Zs","Zl","Zp")):
            out.append("\\u%04x"%o if o<0x10000 else "\\u%04x\\u%04x"%(0xd800+((o-0x10000)>>10),0xdc00+((o-0x10000)&0x3ff)))
        else: out.append(c)
    return "".join(out)
for q,c,g,d in which:
    prompt = {"pair":"Do these two images show the same object instance? Answer yes or no inside <answer></answer>.",
              "multi":"How many of the three candidates show the same instance as the reference (0-3)? Answer inside <answer></answer>.",
              "other":"Answer inside <answer></answer>."}[q]
    line = esc(json.dumps({"prompt":prompt,"completion":c,"ground_truth":g,"question_type":q,"metadata":json.dumps({"case":d})}, ensure_ascii=False))
    assert json.loads(line)["completion"]==c
    print(line)
