#!/bin/sh
# Reproduces docs/PERFORMANCE.md "Scale-out" (issue 9): one benchmark at a time,
# setups interleaved round by round. Raw results: raw/results.jsonl (+ per-run
# samples and `confab bench --json` files).
set -e
S="$(dirname "$0")/scaleout.py"
# 1. top step through the proxy (3 nodes) vs. a single plain node
for r in 1 2 3; do
  python3 "$S" n3    5000 5000 30 --runs 1
  python3 "$S" plain 5000 5000 30 --runs 1
done
# 2. per-process CPU per message, well below saturation
for r in 1 2 3; do
  for s in plain n1 n2 n3; do python3 "$S" $s 2000 3000 30 --runs 1; done
done
# cross-check: nodes pinned to core 1, proxy + driver to core 0
python3 "$S" n1 2000 3000 30 --runs 1 --pin
python3 "$S" n3 2000 3000 30 --runs 1 --pin
