#!/bin/sh
# Extra runs after run_all.sh: (1) one node behind the proxy at 1,000 msgs/s —
# the per-node rate of the 3-node setup — to separate "smaller batches per node"
# from cluster overhead; (2) a perf profile (499 Hz, 10 s) of the proxy during
# a 1-node run at 3,000 msgs/s.
set -e
D="$(dirname "$0")"
python3 "$D/scaleout.py" n1 2000 1000 30 --runs 1
python3 "$D/scaleout.py" n1 2000 3000 30 --runs 1 --out /tmp/sobench/perf-run &
until grep -qs "t=  5s" /tmp/sobench/n1-u2000-r3000-*/bench.err; do sleep 1; done
perf record -F 499 -g -o /tmp/sobench/proxy.perf.data -p "$(pgrep -f 'confab proxy --config cluster.toml --listen 127.0.0.1:19189')" -- sleep 10
wait
perf report -i /tmp/sobench/proxy.perf.data --no-children --sort dso,sym --stdio 2>/dev/null | grep -v '^#' | grep '%' | head -40 > "$D/raw/proxy-perf-top.txt"
perf report -i /tmp/sobench/proxy.perf.data --no-children --sort dso --stdio 2>/dev/null | grep '%' | head -15 >> "$D/raw/proxy-perf-top.txt"
