// binary-match: the TWIN training reward as a twin reward module (JavaScript).
//
// Score 1.0 when the last <answer>...</answer> in the completion equals the
// ground truth after normalisation, else 0.0. The reference is CPython 3.11:
//
//   m = re.findall(r"<answer>\s*(.*?)\s*</answer>", completion, re.IGNORECASE | re.DOTALL)
//   prediction = m[-1].strip() if m else None
//   normalise(x): x.strip().lower(), delete string.punctuation, .strip(); "" -> None
//
// JS regexes and String methods differ from Python's, so the Python parts are
// spelled out with the helpers in python-compat.js (explicit whitespace class,
// Python strip and lower, the exact IGNORECASE letters). README.md lists what
// still differs.
//
// Edit `describe`, `configure` and `scoreOne` to write your own reward.

import { PY_SPACE, deletePunctuation, pyIgnoreCase, pyLower, pyStrip } from "./python-compat.js";

const NAME = "binary-match";
const VERSION = "1.0.0";
const SUMMARY =
  "1.0 if the last <answer>...</answer> equals the ground truth after " +
  "strip/lower/ASCII-punctuation removal, else 0.0";
const PARAMETERS_SCHEMA = '{"type":"object","additionalProperties":false}';

// --- the reward ------------------------------------------------------------

// <answer>\s*(.*?)\s*</answer> with IGNORECASE | DOTALL: the tags are spelled
// out with Python's case-insensitive letters ("s" also matches U+017F), `s`
// is DOTALL, `u` makes `.` step over whole code points, `g` scans like findall.
const ANSWER_RE = new RegExp(
  `${pyIgnoreCase("<answer>")}[${PY_SPACE}]*(.*?)[${PY_SPACE}]*${pyIgnoreCase("</answer>")}`,
  "gsu",
);

/** m[-1].strip() of re.findall(...), or null when nothing matched. */
export function extractAnswer(completion) {
  let last = null;
  for (const m of completion.matchAll(ANSWER_RE)) last = m[1];
  return last === null ? null : pyStrip(last);
}

/** strip, lower, delete string.punctuation, strip; "" -> null. */
export function normalise(text) {
  if (text === null) return null;
  const out = pyStrip(deletePunctuation(pyLower(pyStrip(text))));
  return out === "" ? null : out;
}

export function scoreOne(rollout) {
  const prediction = normalise(extractAnswer(rollout.completion));
  const truth = normalise(rollout.groundTruth);
  const hit = prediction !== null && truth !== null && prediction === truth;
  const components = []; // e.g. [{ name: "format", value: 1.0 }]
  return { score: hit ? 1.0 : 0.0, components };
}

// --- WIT exports -----------------------------------------------------------
// Interface `module` is exported as `module`, `scorer` as `scorer`. Record
// fields are camelCase (groundTruth, questionType, parametersSchema); enums
// are their WIT case names as strings ("reward", "pair"). For
// result<T, string>, return T for ok and throw a *string* for err: anything
// else thrown (an Error, a TypeError from a bug) traps the instance, so
// `score` converts those into a string naming the failing rollout.
// console.log is a no-op (stdio is disabled) and there is no clock.

export const module = {
  describe() {
    return {
      name: NAME,
      version: VERSION,
      kind: "reward",
      summary: SUMMARY,
      parametersSchema: PARAMETERS_SCHEMA,
    };
  },

  configure(params) {
    // binary-match takes no parameters: accept a JSON object with no keys
    // ("{}", " { } "), reject everything else, "null" and "" included.
    let value;
    try {
      value = JSON.parse(params);
    } catch (e) {
      throw `${NAME}: parameters are not valid JSON: ${e.message}`;
    }
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      const kind = value === null ? "null" : Array.isArray(value) ? "array" : typeof value;
      throw `${NAME}: parameters must be a JSON object, got ${kind}`;
    }
    const keys = Object.keys(value);
    if (keys.length > 0) {
      throw `${NAME}: takes no parameters, got ${JSON.stringify(keys.sort())}`;
    }
  },
};

export const scorer = {
  score(batch) {
    return batch.map((rollout, i) => {
      try {
        return scoreOne(rollout);
      } catch (e) {
        if (typeof e === "string") throw e;
        const what = e instanceof Error ? `${e.name}: ${e.message}\n${e.stack}` : String(e);
        throw `${NAME}: rollout ${i}: ${what}`;
      }
    });
  },
};
