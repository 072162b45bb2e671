#!/usr/bin/env bash
# The torture loop of tests/torture.rs: RUNS runs of `ema-tool ema` (default 300), each with a
# random fault (SIGKILL/SIGTERM/SIGINT/SIGHUP at a random moment, a file-size limit, a full
# tmpfs, an input truncated or rewritten while read, or none), checking after each that
# nothing was lost. Prints the count of runs that lost nothing and a tally per fault.
# EMA_TOOL_SEED=N replays a run. The full-disk fault needs root (mount); without it, skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
TORTURE_RUNS="${1:-300}" exec cargo test --test torture -- --ignored --nocapture
