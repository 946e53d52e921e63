#!/usr/bin/env python3
"""Tables of docs/PERFORMANCE.md ("The cluster on PostgreSQL") from raw/results.jsonl.

    summarize.py [raw/results.jsonl] [--all]

Groups runs by setup, users, rate, duration, --set and --tag-suffix; a group's
figures are medians over its runs that did not overlap another load
(--all: every run, overlapped ones marked). Latencies in ms (send->deliver
from the scheduled send time), CPU in microseconds per stored message over the
sending window.
"""
import json, os, statistics, sys

path = next((a for a in sys.argv[1:] if not a.startswith("--")),
            os.path.join(os.path.dirname(os.path.abspath(__file__)), "raw", "results.jsonl"))
show_all = "--all" in sys.argv
runs = [json.loads(l) for l in open(path) if l.strip()]


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def f(x, nd=1):
    if x is None:
        return "—"
    if isinstance(x, float) and nd == 0:
        return f"{x:,.0f}"
    return f"{x:,.{nd}f}" if isinstance(x, float) else f"{x:,}"


groups = {}
for r in runs:
    key = (r["setup"], r["users"], r["rate"], r["duration"], " ".join(r.get("sets", [])), r.get("suffix", ""))
    groups.setdefault(key, []).append(r)

print("## runs\n")
print("| setup | users | rate | tag | acked/s | errors | lost | hist | p50 | p99 | max | other cores | load before | overlapped |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for key, rs in groups.items():
    for r in rs:
        b = r.get("bench", {})
        dm = b.get("deliver_ms", {})
        print(f"| {key[0]} | {key[1]} | {key[2]} | {r['tag']} | {f(b.get('acked_per_s'))} | {b.get('errors')} | "
              f"{b.get('lost')} | {b.get('history_mismatches')} | {f(dm.get('p50'),2)} | {f(dm.get('p99'),2)} | "
              f"{f(dm.get('max'),2)} | {r.get('other_cores')} | {r['before']['loadavg1']} | "
              f"{'yes' if r['overlapped'] else ''} |")

print("\n## medians (runs that did not overlap another load)\n")
print("| setup | users | rate | dur | set | runs | acked/s | errors | lost | p50 | p99 | max | "
      "Σ nodes µs | each node µs | proxy µs | pg primary µs | pg standby µs | bench µs | "
      "cores: nodes / proxy / primary / standby / bench | commits/s (per node) | mean batch | mean commit ms | WAL B/msg |")
print("|" + "---|" * 23)
for key, rs in groups.items():
    ok = [r for r in rs if show_all or not r["overlapped"]]
    if not ok:
        continue
    bs = [r.get("bench", {}) for r in ok]
    g = lambda k: med([b.get(k) for b in bs])
    gd = lambda k: med([b.get("deliver_ms", {}).get(k) for b in bs])
    us = lambda role: med([r.get("cpu_us_per_msg", {}).get(role) for r in ok])
    co = lambda role: med([r.get("cores", {}).get(role) for r in ok])
    node_roles = sorted({k for r in ok for k in r.get("cpu_us_per_msg", {}) if k == "node" or k[:1] == "n"})
    sum_nodes = med([sum(r["cpu_us_per_msg"][k] for k in node_roles) for r in ok if "cpu_us_per_msg" in r])
    sum_cores = med([sum(r["cores"][k] for k in node_roles) for r in ok if "cores" in r])
    each = " / ".join(f(us(k)) for k in node_roles)
    cps = " / ".join(f(med([r["nodes"][p]["commits_per_s"] for r in ok if "nodes" in r]), 0)
                     for p in (ok[0].get("nodes") or {}))
    mb = " / ".join(f(med([r["nodes"][p]["mean_batch"] for r in ok if "nodes" in r]), 1)
                    for p in (ok[0].get("nodes") or {}))
    mc = " / ".join(f(med([r["nodes"][p]["mean_commit_ms"] for r in ok if "nodes" in r]), 2)
                    for p in (ok[0].get("nodes") or {}))
    wal = med([r.get("pg", {}).get("wal_bytes_per_msg") for r in ok])
    cores = " / ".join(f(x, 2) for x in (sum_cores, co("proxy"), co("pg_primary"), co("pg_standby"), co("bench")))
    print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4] or ''}{key[5]} | {len(ok)} | {f(g('acked_per_s'),0)} | "
          f"{f(g('errors'))} | {f(g('lost'))} | {f(gd('p50'),2)} | {f(gd('p99'),2)} | {f(gd('max'),2)} | "
          f"{f(sum_nodes)} | {each} | {f(us('proxy'))} | {f(us('pg_primary'))} | {f(us('pg_standby'))} | "
          f"{f(us('bench'))} | {cores} | {cps} | {mb} | {mc} | {f(wal, 0)} |")
