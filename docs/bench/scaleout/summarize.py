#!/usr/bin/env python3
"""Medians and the per-process CPU model from raw/results.jsonl (written by scaleout.py)."""
import json, os, statistics as st, sys

RAW = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)) + "/raw"
runs = [json.loads(l) for l in open(os.path.join(RAW, "results.jsonl"))]
for r in runs:
    r["step"] = json.load(open(os.path.join(RAW, r["tag"] + ".bench.json")))["steps"][0]
med = lambda xs: st.median(xs)
BUSY = 0.2  # runs during which other processes used more than this many cores: shown, not in medians
group = lambda setup, users, pin=False, rate=None, all=False: [
    r for r in runs if r["setup"] == setup and r["users"] == users and r["pin"] == pin
    and rate in (None, r["rate"]) and (all or r.get("other_cores", 0) <= BUSY)]
nodes = lambda r: [k for k in r["cpu_us_per_msg"] if k not in ("proxy", "bench")]

print("## top step: 5000 users, 5000 msgs/s, 30 s\n")
print("| setup | run | sent | errors | lost | deliver p50 | p99 | p99.9 | max | ack p99 | proxy RSS MB | node RSS MB | other cores |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for setup in ("n3", "plain"):
    for i, r in enumerate(group(setup, 5000, all=True), 1):
        s, d = r["step"], r["step"]["deliver_ms"]
        rss = r["rss_mb_end_of_window"]
        print(f"| {setup} | {i} | {s['sent']} | {s['errors']} | {s['lost'] + s['history_mismatches']} | {d['p50']:.2f} | "
              f"{d['p99']:.2f} | {d['p999']:.2f} | {d['max']:.2f} | {s['ack_ms']['p99']:.2f} | "
              f"{rss.get('proxy', '-')} | {' / '.join(str(rss[n]) for n in nodes(r))} | {r.get('other_cores', '-')}{' (busy: not in median)' if r['other_cores'] > BUSY else ''} |")
    g = group(setup, 5000)
    if g:
        m = lambda k: med([r["step"]["deliver_ms"][k] for r in g])
        print(f"| {setup} | **median** | | | | {m('p50'):.2f} | {m('p99'):.2f} | {m('p999'):.2f} | {m('max'):.2f} | | | | |")

print("\n## CPU per message over the sending window (2000 users at 1000 and 3000 msgs/s, 5000 users at 5000 msgs/s)\n")
print("| setup | runs | msgs/s | µs/msg each node | Σ nodes | proxy | driver | other cores | proxy / Σ nodes |")
print("|---|---|---|---|---|---|---|---|---|")
model = {}
for setup, rate in (("plain", 3000), ("n1", 3000), ("n2", 3000), ("n3", 3000), ("n1", 1000),
                    ("plain", 5000), ("n3", 5000)):
    for pin in (False, True):
        g = group(setup, 5000 if rate == 5000 else 2000, pin, rate)
        if not g:
            continue
        ns = nodes(g[0])
        per = {n: med([r["cpu_us_per_msg"][n] for r in g]) for n in ns}
        tot = med([sum(r["cpu_us_per_msg"][n] for n in ns) for r in g])
        px = med([r["cpu_us_per_msg"]["proxy"] for r in g]) if setup != "plain" else None
        drv = med([r["cpu_us_per_msg"]["bench"] for r in g])
        oth = med([r.get("other_cores", 0) for r in g])
        rate = med([r["msgs_per_s"] for r in g])
        if not pin and rate == 3000:
            model[setup] = (tot, px)
        print(f"| {setup} @ {rate}{' pinned' if pin else ''} | {len(g)} | {rate} | {' / '.join(f'{per[n]:.1f}' for n in ns)} | "
              f"{tot:.1f} | {px if px is None else f'{px:.1f}'} | {drv:.1f} | {oth:.2f} | "
              f"{'-' if px is None else f'{px / tot:.0%}'} |")

print("\n## model (each node on its own core; proxies on their own cores)\n")
plain = model["plain"][0]
one = 1e6 / plain
print(f"plain node: {plain:.1f} µs/msg -> {one:,.0f} msgs/s per core")
print("| N | Σ nodes µs/msg | node capacity N×1e6/Σ | gain over N-1 | gain / plain node | proxy µs/msg | proxy / node | msgs/s per proxy core | proxy cores needed | cluster msgs/s per core (nodes+proxies) |")
print("|---|---|---|---|---|---|---|---|---|---|")
prev = 0
for n in (1, 2, 3):
    tot, px = model[f"n{n}"]
    cap = n * 1e6 / tot
    gain = cap - prev
    print(f"| {n} | {tot:.1f} | {cap:,.0f} | {gain:,.0f} | {gain / one:.2f} | {px:.1f} | {px / tot:.0%} | "
          f"{1e6 / px:,.0f} | {cap * px / 1e6:.2f} | {1e6 / (tot + px):,.0f} |")
    prev = cap
