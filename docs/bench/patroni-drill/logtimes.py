#!/usr/bin/python3
"""Exact instants from the logs for each run in raw/summary.jsonl: Patroni's
promotion / sync-standby removal and confab's storage failing / recovered,
in seconds after the event (kill, SIGSTOP, or the switchover command)."""
import glob, json, os, re, time
HERE = os.path.dirname(os.path.abspath(__file__))
LOGS = os.environ.get("DRILL_LOGS", "/tmp/drill/logs")

def t_patroni(line):
    m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)[,.](\d{3})", line)
    return m and time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000

def t_confab(line):
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{6})Z", line)
    return m and time.mktime(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) + int(m.group(2)) / 1e6

def lines(pattern, parse, words):
    out = []
    for f in sorted(glob.glob(os.path.join(LOGS, pattern))):
        for l in open(f, errors="replace"):
            if any(w in l for w in words):
                t = parse(l)
                if t:
                    out.append((t, os.path.basename(f)[:-4], l.strip()))
    return out

pat = lines("patroni-*.log", t_patroni, ("promoted self to leader", "Assigning synchronous standby status to []",
                                          "received switchover request"))
cfb = lines("confab-n*.log", t_confab, ("storage failing", "storage recovered", "unknown commit was resolved"))
rows = [json.loads(l) for l in open(os.path.join(HERE, "raw", "summary.jsonl"))]
day = time.strftime("%Y-%m-%d ")
for r in rows:
    if r["kind"] == "none":
        continue
    ev = time.mktime(time.strptime(day + r["event_t"][:8], "%Y-%m-%d %H:%M:%S")) + int(r["event_t"][9:]) / 1000
    win = lambda xs: [(round(t - ev, 3), who, l[l.find("INFO:") + 6 if "INFO:" in l else l.find("confab::"):][:90])
                      for t, who, l in xs if -1 <= t - ev <= 40]
    print("==", r["label"], r["kind"], "event", r["event_t"])
    for x in win(pat) + win(cfb):
        print("  %+8.3f  %-12s %s" % x)
