#!/bin/sh
# Reproduces docs/PERFORMANCE.md "Scale-out" (issue 9). One benchmark at a time;
# scaleout.py waits (up to 45 s) for a quiet machine before each run and records
# the CPU used by everything else during the window (other_cores). Setups are
# interleaved round by round. Raw results: raw/results.jsonl, plus per-run 1 s
# samples (*.samples.json) and `confab bench --json` files (*.bench.json).
set -e
S="$(dirname "$0")/scaleout.py"
# per-process CPU per message, well below saturation
for r in 1 2; do
  for s in plain n1 n2 n3; do python3 "$S" $s 2000 3000 30 --runs 1; done
done
# top step through the proxy (3 nodes) vs. a single plain node
for r in 1 2; do
  python3 "$S" plain 5000 5000 30 --runs 1
  python3 "$S" n3    5000 5000 30 --runs 1
done
# cross-check: nodes pinned to core 1, proxy + driver to core 0
python3 "$S" n3 2000 3000 30 --runs 1 --pin
