#!/usr/bin/env bash
# HTTP benchmark: durable job submissions (POST /v1/jobs, each fsynced before the answer)
# against actix-web's bare hello world, same machine, same run, wrk with 64 connections.
# Usage: deploy/bench_http.sh [SECONDS]   (needs wrk: apt-get install wrk)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
cargo build --release --locked --quiet -p twin-server --bin twin-server --example hello
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

start() { # name command... → prints the URL once listening
  local out="$work/$1.out"; shift
  "$@" >"$out" 2>"$work/err.log" &
  for _ in $(seq 100); do grep -q 'listening on' "$out" 2>/dev/null && break; sleep 0.1; done
  sed -n 's/.*listening on //p' "$out" | head -1
}

twin=$(RUST_LOG=error start twin target/release/twin-server serve --no-executor --listen 127.0.0.1:0 --data-dir "$work/data")
hello=$(start hello target/release/examples/hello 127.0.0.1:0)
cat >"$work/submit.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"spec":{"kind":"ingest","dataset":"bench","source":{"dir":"/tmp/none"}}}'
LUA

echo "# $(date -u +%F) $(nproc) cores, $(uname -m); wrk -t2 -c64 -d${secs}s --latency"
run() { # label url [script]
  local label=$1 url=$2; shift 2
  wrk -t2 -c64 -d"${secs}s" --latency "$@" "$url" >"$work/wrk.txt"
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.txt")
  p50=$(awk '$1=="50%" {print $2}' "$work/wrk.txt")
  p99=$(awk '$1=="99%" {print $2}' "$work/wrk.txt")
  printf '%-34s %12s req/s   p50 %8s   p99 %8s\n' "$label" "$rps" "$p50" "$p99"
  echo "$rps"  >"$work/$label.rps"
}
run hello "$hello/"
run submit "$twin/v1/jobs" -s "$work/submit.lua"
ratio=$(awk -v a="$(cat "$work/submit.rps")" -v b="$(cat "$work/hello.rps")" 'BEGIN {printf "%.1f", 100*a/b}')
echo "durable submissions = ${ratio}% of hello world"
curl -s "$twin/metrics" | grep -E '^twin_log_(batches|appended_records)_total' || true
