//! Differential test: every rule against its CPython 3.11 reference on hand-written adversarial
//! inputs and 24,000 seeded random ones, through one python3 subprocess.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use twin_rules::{answer_matches, py};

/// The reference, with the rules' expressions verbatim. Reads JSON lines {c, g, lp, lm} and
/// writes one JSON line of results per input.
const ORACLE: &str = r#"
import json, re, string, sys

ANSWER_RE = r"<answer>\s*(.*?)\s*</answer>"

# --- TWIN training/reward.py
def extract_prediction(completion):
    m = re.findall(ANSWER_RE, completion, re.IGNORECASE | re.DOTALL)
    return m[-1].strip() if m else None

def normalize(s):
    if s is None:
        return None
    s = s.strip().lower()
    s = "".join(ch for ch in s if ch not in string.punctuation)
    s = s.strip()
    return s if s else None

def binary_match(completion, ground_truth):
    pred = normalize(extract_prediction(completion))
    gt = normalize(ground_truth)
    return 1.0 if pred is not None and gt is not None and pred == gt else 0.0

# --- lmms-eval FGVQA
YES = {"yes", "y", "yeah", "yep", "true", "1"}
NO = {"no", "n", "nope", "false", "0"}

def normalize_yes_no(t):
    c = t.strip().lower()
    if not c:
        return ""
    found = re.findall(r"\b(yes|no)\b", c)
    if found:
        return found[-1]
    k = re.sub(r"[^a-z0-9]+", "", c)
    if k in YES:
        return "yes"
    if k in NO:
        return "no"
    parts = c.split()
    return parts[0] if parts else ""

def tag_answer(t):
    m = re.search(r"<answer>(.*?)</answer>", t, re.IGNORECASE | re.DOTALL)
    if not m:
        return ""
    return normalize_yes_no(m.group(1).strip())

def pair_answer(pred):
    a = tag_answer(pred)
    if a == "":
        a = normalize_yes_no(re.sub(r"</?answer>", "", pred, flags=re.IGNORECASE))
    return a

def numeric(t):
    m = re.search(r"<answer>\s*([0-3])\s*</answer>", t, re.IGNORECASE)
    if m:
        return m.group(1)
    found = re.findall(r"\b([0-3])\b", t)
    return found[-1] if found else ""

def multi_answer(pred):
    a = numeric(pred)
    if a == "":
        a = numeric(re.sub(r"</?answer>", "", pred, flags=re.IGNORECASE))
    return a

# --- our format check
def format_check(completion):
    first = next(re.finditer(ANSWER_RE, completion, re.IGNORECASE | re.DOTALL), None)
    if first is None:
        return False, False
    return True, completion[: first.start()].strip() != ""

# Lines split on b"\n" only: str.splitlines() would also split on U+2028, U+0085, ...
for line in sys.stdin.buffer.read().split(b"\n"):
    if not line:
        continue
    x = json.loads(line.decode("utf-8"))
    c, g = x["c"], x["g"]
    tag, expl = format_check(c)
    out = {
        "strip": c.strip(),
        "lower": c.lower(),
        "split": c.split(),
        "findall": re.findall(ANSWER_RE, c, re.IGNORECASE | re.DOTALL),
        "prediction": extract_prediction(c),
        "norm_prediction": normalize(extract_prediction(c)),
        "norm_completion": normalize(c),
        "norm_ground_truth": normalize(g),
        "reward": binary_match(c, g),
        "yes_no": normalize_yes_no(c),
        "tag_answer": tag_answer(c),
        "pair_answer": pair_answer(c),
        "pair": 1.0 if pair_answer(c) == x["lp"] else 0.0,
        "numeric": numeric(c),
        "multi_answer": multi_answer(c),
        "multi": 1.0 if multi_answer(c) == x["lm"] else 0.0,
        "answer_tag": tag,
        "explanation": expl,
    }
    sys.stdout.write(json.dumps(out) + "\n")
"#;

/// One test case: completion, ground truth, pair label, multi label.
struct Case {
    c: String,
    g: String,
    lp: &'static str,
    lm: &'static str,
}

/// What the crate computes for a case, shaped like the oracle's output.
fn rust_side(x: &Case) -> Value {
    let c = x.c.as_str();
    let format = twin_rules::format_check(c);
    json!({
        "strip": py::strip(c),
        "lower": py::lower(c),
        "split": py::split(c).collect::<Vec<_>>(),
        "findall": answer_matches(c).map(|m| m.content(c)).collect::<Vec<_>>(),
        "prediction": twin_rules::binary_match_prediction(c),
        "norm_prediction": twin_rules::binary_match_prediction(c).and_then(twin_rules::normalize_answer),
        "norm_completion": twin_rules::normalize_answer(c),
        "norm_ground_truth": twin_rules::normalize_answer(&x.g),
        "reward": twin_rules::binary_match(c, &x.g),
        "yes_no": twin_rules::normalize_yes_no(c),
        "tag_answer": twin_rules::tag_answer(c),
        "pair_answer": twin_rules::fgvqa_pair_answer(c),
        "pair": twin_rules::fgvqa_pair(c, x.lp),
        "numeric": twin_rules::numeric(c),
        "multi_answer": twin_rules::fgvqa_multi_answer(c),
        "multi": twin_rules::fgvqa_multi(c, x.lm),
        "answer_tag": format.answer_tag,
        "explanation": format.explanation,
    })
}

/// Fragments the random inputs are drawn from, with weights: tag pieces and look-alikes, every
/// kind of Python whitespace and some non-whitespace look-alikes, yes/no words, digits, ASCII
/// punctuation, and letters whose case or word-ness is special.
const ALPHABET: &[(&str, u32)] = &[
    ("<answer>", 8),
    ("</answer>", 8),
    ("<ANSWER>", 2),
    ("</ANSWER>", 2),
    ("<anſwer>", 2),
    ("</aNswer>", 2),
    ("</anſWER>", 1),
    ("<Answer>", 1),
    ("<answer", 2),
    ("</answer", 1),
    ("answer>", 1),
    ("<ans", 1),
    ("wer>", 1),
    ("<\u{212b}nswer>", 1),
    ("<ａnswer>", 1),
    ("<", 2),
    (">", 2),
    ("/", 1),
    (" ", 12),
    ("\n", 4),
    ("\t", 1),
    ("\r", 1),
    ("\u{b}", 1),
    ("\u{c}", 1),
    ("\u{1c}", 1),
    ("\u{1d}", 1),
    ("\u{1e}", 1),
    ("\u{1f}", 1),
    ("\u{85}", 2),
    ("\u{a0}", 1),
    ("\u{1680}", 1),
    ("\u{2000}", 1),
    ("\u{200a}", 1),
    ("\u{2028}", 1),
    ("\u{2029}", 1),
    ("\u{202f}", 1),
    ("\u{205f}", 1),
    ("\u{3000}", 1),
    ("\u{feff}", 1),
    ("\u{200b}", 1),
    ("\u{180e}", 1),
    ("\u{0}", 1),
    ("yes", 5),
    ("no", 5),
    ("Yes", 2),
    ("NO", 2),
    ("YES", 1),
    ("No", 1),
    ("y", 2),
    ("Y", 1),
    ("n", 1),
    ("yeah", 1),
    ("yep", 1),
    ("nope", 1),
    ("true", 1),
    ("True", 1),
    ("false", 1),
    ("maybe", 1),
    ("0", 3),
    ("1", 3),
    ("2", 3),
    ("3", 3),
    ("4", 2),
    ("7", 1),
    ("١", 1),
    ("²", 1),
    ("Ⅻ", 1),
    (".", 3),
    (",", 2),
    ("!", 2),
    ("?", 1),
    ("'", 2),
    ("\"", 1),
    ("-", 1),
    ("_", 3),
    (":", 1),
    (";", 1),
    ("(", 1),
    (")", 1),
    ("[", 1),
    ("]", 1),
    ("{", 1),
    ("}", 1),
    ("@", 1),
    ("#", 1),
    ("\\", 1),
    ("`", 1),
    ("^", 1),
    ("~", 1),
    ("|", 1),
    ("*", 1),
    ("+", 1),
    ("=", 1),
    ("%", 1),
    ("&", 1),
    ("$", 1),
    ("«", 1),
    ("’", 1),
    ("a", 3),
    ("b", 1),
    ("x", 1),
    ("Z", 1),
    ("s", 1),
    ("S", 1),
    ("ſ", 1),
    ("K", 1),
    ("\u{212a}", 1),
    ("İ", 2),
    ("I", 1),
    ("ı", 1),
    ("Σ", 4),
    ("σ", 1),
    ("ς", 1),
    ("ß", 1),
    ("ẞ", 1),
    ("é", 1),
    ("É", 1),
    ("\u{301}", 2),
    ("\u{345}", 2),
    ("\u{307}", 1),
    ("\u{2b0}", 1),
    ("\u{ad}", 1),
    ("Α", 1),
    ("Ω", 1),
    ("ω", 1),
    ("Д", 1),
    ("ж", 1),
    ("ǅ", 1),
    ("ﬁ", 1),
    ("中", 1),
    ("文", 1),
    ("あ", 1),
    ("\u{10400}", 1),
    ("😀", 1),
    ("👍🏽", 1),
    ("🇫🇷", 1),
];

const PAIR_LABELS: [&str; 5] = ["yes", "no", "", "maybe", "Yes"];
const MULTI_LABELS: [&str; 6] = ["0", "1", "2", "3", "", "4"];

/// Hand-written adversarial completions, including every unit-test input worth a second opinion.
const HAND: &[&str] = &[
    "",
    " ",
    "\u{85}",
    "\u{1c}\u{1d}\u{1e}\u{1f}",
    "\u{feff}",
    "<answer>",
    "</answer>",
    "<answer></answer>",
    "<answer> </answer>",
    "<answer>\u{1c}yes\u{1f}</answer>",
    "<answer>\u{85}Yes\u{85}</answer>",
    "<answer>\u{a0}no\u{2028}</answer>",
    "<answer>\u{feff}yes\u{feff}</answer>",
    "<anſwer>yes</anſwer>",
    "<ANſWER>no</answer>",
    "<answer>a<answer>b</answer>c</answer>",
    "</answer><answer>x</answer>",
    "</answer>yes<answer>",
    "<answer>yes</answer><answer>no</answer>",
    "<answer>No</answer> <answer>yes</answer>",
    "<answer>yes",
    "I think <answer>no",
    "<answer>yes<ANSWER>",
    "<answer> </answer> Yes!",
    "Maybe <answer>",
    "<ans<answer>wer>1</ans</answer>wer>",
    "<ans<answer>wer>yes</ans</answer>wer>",
    "yes.",
    "Yes!",
    "no, it is not",
    "Yes, or rather no",
    "y",
    "Y.",
    "1",
    "0",
    "true",
    "True",
    "FALSE!!",
    "Nope.",
    "yeah",
    " ye-p ",
    "maybe so",
    "yesno",
    "yes_",
    "_no",
    "_no x",
    "noé x",
    "no\u{301} x",
    "no² x",
    "yes\u{feff}",
    "YES\u{212a}",
    "T\u{130}RUE",
    "ſ",
    "\u{130}",
    "\u{130}stanbul",
    "ΟΔΟΣ",
    "ΟΔΟΣ.",
    "ΟΔΟΣ.Α",
    "Α'Σ",
    "ΑΣ'",
    "ΑΣ'Α",
    "Α\u{301}Σ.\u{345}",
    "\u{345}Σ",
    "ΑΣ\u{345}Α",
    "1Σ",
    "ΑΣ1",
    "ΣΣΣ",
    "<answer>ΣΑΣ</answer>",
    "<answer>ΟΔΟΣ</answer>",
    "<answer> 2 </answer>",
    "<ANſWER>\u{85}3\u{1f}</answer> 1",
    "<answer>4</answer> 1 then 2",
    "<answer>12</answer>",
    "a1 1b _1 1_ é1 1é ²1",
    "1\u{301} -3- 4",
    "(0)",
    "\u{661}",
    "4 5 6",
    "<answer>1</answer><answer>2</answer>",
    "x<answer>2",
    "a<answer>2",
    "<answer>\n1\n</answer>",
    "<answer>\u{feff}1</answer>",
    "Because. <answer>x</answer>",
    " \u{85}\u{1c}<answer>x</answer>",
    "<answer>x</answer> after",
    "Reasoning. <answer>Paris.</answer>",
    "<ANſWER>\u{85}PARIS\u{1c}</answer>",
    "<answer>.</answer>",
    "<answer>\u{130}</answer>",
    "  Hello, World!  ",
    "a .",
    "x\u{a0}.",
    "«a»",
    "a_b",
    "<\u{212b}nswer>yes</answer>",
    "<ａnswer>yes</answer>",
    "<answer\n>yes</answer>",
    "< answer>yes</answer>",
    "<answer>yes</ answer>",
    "<answer>yes</answer\u{85}>",
];

/// A random string of `len` fragments.
fn random_text(rng: &mut StdRng, cumulative: &[u32], len: usize) -> String {
    let total = cumulative.last().copied().unwrap_or(1);
    let mut s = String::new();
    for _ in 0..len {
        let r = rng.random_range(0..total);
        let i = cumulative.partition_point(|&w| w <= r);
        s.push_str(ALPHABET[i].0);
    }
    s
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for (i, &c) in HAND.iter().enumerate() {
        // Ground truths that hit both reward outcomes: the prediction itself, and variants.
        let pred = twin_rules::binary_match_prediction(c).unwrap_or("");
        for g in [c, pred, "yes", "", "Paris", "i\u{307}", "οδος"] {
            out.push(Case {
                c: c.to_owned(),
                g: g.to_owned(),
                lp: PAIR_LABELS[i % PAIR_LABELS.len()],
                lm: MULTI_LABELS[i % MULTI_LABELS.len()],
            });
        }
        out.push(Case {
            c: c.to_uppercase(),
            g: c.to_owned(),
            lp: "yes",
            lm: "1",
        });
    }

    let mut rng = StdRng::seed_from_u64(0x7a1e_2024);
    let cumulative: Vec<u32> = ALPHABET
        .iter()
        .scan(0, |acc, &(_, w)| {
            *acc += w;
            Some(*acc)
        })
        .collect();
    for _ in 0..24_000 {
        let len = if rng.random_bool(0.05) {
            rng.random_range(40..200)
        } else {
            rng.random_range(0..24)
        };
        let c = random_text(&mut rng, &cumulative, len);
        // A third of the ground truths derive from the prediction, so reward 1.0 is common.
        let pred = twin_rules::binary_match_prediction(&c)
            .unwrap_or("")
            .to_owned();
        let g = match rng.random_range(0..6) {
            0 | 1 => {
                let n = rng.random_range(0..4);
                random_text(&mut rng, &cumulative, n)
            }
            2 => pred,
            3 => format!(" {}. ", pred.to_uppercase()),
            4 => format!("{}{}", random_text(&mut rng, &cumulative, 1), pred),
            _ => pred.to_lowercase(),
        };
        out.push(Case {
            c,
            g,
            lp: PAIR_LABELS[rng.random_range(0..PAIR_LABELS.len())],
            lm: MULTI_LABELS[rng.random_range(0..MULTI_LABELS.len())],
        });
    }
    out
}

#[test]
fn rules_match_cpython() {
    let Some(python) = common::python311() else {
        return;
    };
    let cases = cases();
    let mut input = String::new();
    for x in &cases {
        input.push_str(&json!({"c": x.c, "g": x.g, "lp": x.lp, "lm": x.lm}).to_string());
        input.push('\n');
    }

    let mut child = Command::new(&python)
        .args(["-c", ORACLE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {python}: {e}"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    // Feed from another thread so a full stdout pipe cannot deadlock the two processes.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child.wait_with_output().expect("oracle output");
    writer
        .join()
        .expect("writer thread")
        .expect("write to oracle");
    assert!(
        output.status.success(),
        "oracle failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).expect("oracle prints ASCII JSON");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), cases.len(), "one oracle line per case");

    let mut reward_ones = 0;
    let mut mismatches = 0;
    let mut first = None;
    for (x, line) in cases.iter().zip(&lines) {
        let want: Value = serde_json::from_str(line).expect("oracle JSON");
        let got = rust_side(x);
        if want["reward"] == json!(1.0) {
            reward_ones += 1;
        }
        let Value::Object(fields) = &want else {
            panic!("oracle line is not an object: {line}");
        };
        let wrong: Vec<String> = fields
            .iter()
            .filter(|&(k, v)| got.get(k) != Some(v))
            .map(|(k, v)| format!("  {k}: python {v}, rust {}", got[k.as_str()]))
            .collect();
        if !wrong.is_empty() {
            mismatches += 1;
            first.get_or_insert_with(|| {
                format!(
                    "completion \"{}\"\nground truth \"{}\" (pair label {:?}, multi label {:?})\n{}",
                    common::escape(&x.c),
                    common::escape(&x.g),
                    x.lp,
                    x.lm,
                    wrong.join("\n")
                )
            });
        }
    }
    if let Some(first) = first {
        panic!(
            "{mismatches} of {} cases differ from CPython; first:\n{first}",
            cases.len()
        );
    }
    // The generator must exercise both reward outcomes, or the comparison proves little.
    assert!(
        reward_ones > 1_000,
        "only {reward_ones} cases with reward 1.0"
    );
    eprintln!(
        "{} cases agree with CPython ({reward_ones} with reward 1.0)",
        cases.len()
    );
}
