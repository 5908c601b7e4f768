#!/usr/bin/env python3
"""Reference oracle for the binary-match conformance vectors (stdlib only).

The reward is the TWIN training reward, run here under CPython (the reference
is CPython 3.11) with the reference expressions verbatim.

    python3 oracle.py expect binary-match.jsonl > binary-match.expected.jsonl
    python3 oracle.py check binary-match.expected.jsonl OUTPUTS.jsonl [--input binary-match.jsonl]

`expect` prints {"score": 1.0, "components": {}} for each input line.
`check` compares a module's output lines (e.g. from
`twin modules run reward.wasm --input binary-match.jsonl`) with the expected
ones and exits 1 at the first mismatch, naming the line (and, with --input,
the rollout). Scores must be JSON numbers equal to the expected value and
components objects equal to the expected ones; line counts must match.
"""

import argparse
import json
import re
import string
import sys


def binary_match(completion, ground_truth):
    m = re.findall(r"<answer>\s*(.*?)\s*</answer>", completion, re.IGNORECASE | re.DOTALL)
    prediction = m[-1].strip() if m else None

    def normalise(s):
        if s is None:
            return None
        s = s.strip().lower()
        s = "".join(ch for ch in s if ch not in string.punctuation).strip()
        return s or None

    p, t = normalise(prediction), normalise(ground_truth)
    return 1.0 if p is not None and t is not None and p == t else 0.0


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [(n, json.loads(line)) for n, line in enumerate(f, 1) if line.strip()]


def expect(args):
    for _, r in read_jsonl(args.input):
        out = {"score": binary_match(r["completion"], r["ground_truth"]), "components": {}}
        print(json.dumps(out))
    return 0


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check(args):
    expected = read_jsonl(args.expected)
    try:
        actual = read_jsonl(args.actual)
    except (OSError, ValueError) as e:
        print(f"cannot read {args.actual}: {e}", file=sys.stderr)
        return 1
    inputs = read_jsonl(args.input) if args.input else None

    for i, (n, exp) in enumerate(expected):
        if i >= len(actual):
            print(f"{args.actual}: ends after {len(actual)} lines, expected {len(expected)}", file=sys.stderr)
            return 1
        an, act = actual[i]
        ok = (
            isinstance(act, dict)
            and is_number(act.get("score"))
            and act["score"] == exp["score"]
            and isinstance(act.get("components"), dict)
            and act["components"] == exp["components"]
        )
        if not ok:
            print(f"mismatch at result {i + 1} ({args.actual} line {an}, {args.expected} line {n}):", file=sys.stderr)
            print(f"  expected {json.dumps(exp)}", file=sys.stderr)
            print(f"  actual   {json.dumps(act, ensure_ascii=False)}", file=sys.stderr)
            if inputs and i < len(inputs):
                print(f"  input    {json.dumps(inputs[i][1], ensure_ascii=True)}", file=sys.stderr)
            return 1
    if len(actual) > len(expected):
        print(f"{args.actual}: {len(actual)} lines, expected {len(expected)}", file=sys.stderr)
        return 1
    print(f"ok: {len(expected)} results match", file=sys.stderr)
    return 0


def main():
    ap = argparse.ArgumentParser(description="binary-match reference oracle")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("expect", help="print expected outputs for an input JSONL")
    e.add_argument("input")
    c = sub.add_parser("check", help="compare outputs with expected; exit 1 on the first mismatch")
    c.add_argument("expected")
    c.add_argument("actual")
    c.add_argument("--input", help="the input JSONL, to show the failing rollout")
    args = ap.parse_args()
    return expect(args) if args.cmd == "expect" else check(args)


if __name__ == "__main__":
    sys.exit(main())
