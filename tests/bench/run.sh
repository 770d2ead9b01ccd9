#!/usr/bin/env bash
# The Sealpost benchmark, as documented in docs/benchmarks.md: builds the release binaries and
# runs Sealpost and Postfix (Debian's package, needs root) side by side against the same sink.
# Prints one table on stdout and writes the full report as JSON.
#
#   sudo tests/bench/run.sh                 # defaults sized for a 2-core machine
#   sudo tests/bench/run.sh --messages 20000 --sessions 100   # any `sealpost-bench run` option
#
# Environment: BENCH_JSON (default target/bench/report.json).
set -euo pipefail
cd "$(dirname "$0")/../.."

cargo build --release -p sealpost -p sealpost-bench
json="${BENCH_JSON:-target/bench/report.json}"
mkdir -p "$(dirname "$json")"
# 1,000 idle sessions need ~2,100 descriptors between the load generator and the relay.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec target/release/sealpost-bench run \
  --sealpost-bin target/release/sealpost \
  --messages 5000 --sessions 50 \
  --fifty-kb-messages 5000 --accept-messages 5000 \
  --queued 200000 --queued-size 5KB \
  --idle-sessions 1000 \
  --postfix auto \
  --json "$json" \
  "$@"
