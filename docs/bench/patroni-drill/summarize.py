#!/usr/bin/python3
"""Prints raw/summary.jsonl as a table (times in seconds after the event)."""
import json, os, sys
rows = [json.loads(l) for l in open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "raw", "summary.jsonl"))]
print("| run | event | Patroni: other member leader | sync names cleared | last ack before / first ack after | write pause | bench sent/acked/errors | lost | history mismatches | ack max ms | dup / gappy rooms (SQL) |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    wp = r.get("write_pause") or {}
    b = r.get("bench") or {}
    errs = ", ".join("%s %s" % (k, v) for k, v in (b.get("errors_by_kind") or {}).items()) or "0"
    leader = r.get("other_leader_s") if r["kind"] in ("primary", "switchover") else "-"
    print("| %s | %s %s | %s | %s | %s / %s | %s | %s/%s/%s | %s | %s | %s | %s / %s |" % (
        r["label"], r["kind"], r.get("victim") or "", leader, r.get("ssn_empty_s"),
        wp.get("last_store_before_s"), wp.get("first_store_after_s"), wp.get("pause_s"),
        b.get("sent"), b.get("acked"), errs, b.get("lost"), b.get("history_mismatches"),
        (b.get("ack_ms") or {}).get("max"), r["sql_check"]["duplicates"], r["sql_check"]["gappy_rooms"]))
