#!/usr/bin/python3
"""confab failover drill under Patroni + etcd, all on 127.0.0.1.

Subcommands (run as root; Patroni/PostgreSQL run as the `postgres` user):
  up [--ttl 10 --loop-wait 2 --retry-timeout 4]   etcd, pg1+pg2 (Patroni), confab n1, n2, proxy
  run KIND LABEL [--kill-at 20 --duration 60 --users 200 --rate 500]
        KIND: primary (SIGKILL the leader's Patroni and its postgres tree),
              standby (SIGKILL the sync standby's Patroni and its postgres tree),
              standby-freeze (SIGSTOP them instead: sockets stay open, nothing
                answers, as for a host that hangs; SIGKILLed after the bench),
              switchover (patronictl switchover), none (baseline)
  restore            start every Patroni that is not running; wait for leader + sync standby
  timing TTL LOOP RETRY   patronictl edit-config of the DCS timing (applies at once)
  status             the Patroni members, the sync settings, confab /readyz
  check              SQL: no duplicate (room, sender, client_id), every room's seqs 1..n
  down               stop everything this script started (by pid), keep the data
  wipe               down + delete /tmp/drill's data directories

Everything lives under /tmp/drill (pids/, logs/, etcd/, pg1/, pg2/, confab/);
raw results go to raw/ next to this script.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import psycopg2

HERE = os.path.dirname(os.path.abspath(__file__))
RAW = os.path.join(HERE, "raw")
BASE = "/tmp/drill"
PIDS = os.path.join(BASE, "pids")
LOGS = os.path.join(BASE, "logs")
CONFAB = os.environ.get("CONFAB_BIN", "/tmp/confab-drill")
PGBIN = "/usr/lib/postgresql/15/bin"
ETCD_URL = "http://127.0.0.1:23790"
MEMBERS = {"pg1": (25432, 28008), "pg2": (25433, 28009)}
NODES = {"n1": 28081, "n2": 28082}
PROXY = 28080
DSN_RW = ("host=127.0.0.1,127.0.0.1 port=25432,25433 user=postgres dbname=confab "
          "target_session_attrs=read-write connect_timeout=1")


def now():
    return time.time()


def ts(t=None):
    t = now() if t is None else t
    return time.strftime("%H:%M:%S", time.localtime(t)) + ".%03d" % int((t % 1) * 1000)


def log(*a):
    print(ts(), *a, flush=True)


# ---------------------------------------------------------------- processes

def start(name, argv, user=None, env=None):
    os.makedirs(PIDS, exist_ok=True)
    os.makedirs(LOGS, exist_ok=True)
    if user:
        argv = ["setpriv", "--reuid=" + user, "--regid=" + user, "--init-groups"] + argv
    out = open(os.path.join(LOGS, name + ".log"), "ab")
    out.write(("\n==== %s start: %s\n" % (ts(), " ".join(argv))).encode())
    out.flush()
    p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, env=env, cwd=BASE)
    with open(os.path.join(PIDS, name + ".pid"), "w") as f:
        f.write(str(p.pid))
    log("started", name, "pid", p.pid)
    return p.pid


def pid_of(name):
    try:
        pid = int(open(os.path.join(PIDS, name + ".pid")).read())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def alive(pid):
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    # a zombie is not alive
    try:
        st = open("/proc/%d/stat" % pid).read().split(")")[-1].split()[0]
        return st != "Z"
    except OSError:
        return False


def postmaster_pid(member):
    try:
        pid = int(open(os.path.join(BASE, member, "data", "postmaster.pid")).readline())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def kill_host(member, sig=signal.SIGKILL):
    """SIGKILL (or SIGSTOP: a frozen host) the member's Patroni and its whole
    postgres tree at one instant."""
    pids = []
    p = pid_of("patroni-" + member)
    if p:
        pids.append(p)
    pm = postmaster_pid(member)
    if pm:
        pids.append(pm)
        pids.extend(children(pm))
    t = now()
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    log(signal.Signals(sig).name, member, "pids", pids)
    return t, pids


def stop(name, pid=None, grace=10):
    pid = pid or pid_of(name)
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return
    until = now() + grace
    while now() < until and alive(pid):
        time.sleep(0.1)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
    log("stopped", name, pid)


# ---------------------------------------------------------------- http

def http_json(url, timeout=0.5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except Exception:
            return e.code, None
    except Exception:
        return None, None


def http_text(url, timeout=0.5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except Exception:
        return None, ""


def patroni(member):
    code, j = http_json("http://127.0.0.1:%d/patroni" % MEMBERS[member][1], timeout=0.3)
    if not j:
        return {"role": "down"}
    return {"role": j.get("role"), "state": j.get("state"), "timeline": j.get("timeline")}


def leader():
    for m in MEMBERS:
        if patroni(m)["role"] in ("master", "primary"):
            return m
    return None


def cluster():
    for m in MEMBERS:
        code, j = http_json("http://127.0.0.1:%d/cluster" % MEMBERS[m][1], timeout=1)
        if j:
            return j
    return None


def metrics(port):
    code, text = http_text("http://127.0.0.1:%d/metrics" % port, timeout=0.5)
    if code != 200:
        return None
    out = {"stored": 0.0, "sync": None, "commit_failures": 0.0, "rejected": 0.0}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        parts = line.rsplit(" ", 1)
        if len(parts) != 2:
            continue
        k, v = parts
        try:
            v = float(v)
        except ValueError:
            continue
        if k == "confab_messages_stored_total":
            out["stored"] = v
        elif k == "confab_db_sync_standbys":
            out["sync"] = v
        elif k == "confab_commit_failures_total":
            out["commit_failures"] = v
        elif k.startswith("confab_messages_rejected_total"):
            out["rejected"] += v
    return out


# ---------------------------------------------------------------- up/down

def write_patroni_yml(member, ttl, loop_wait, retry_timeout):
    pg_port, api_port = MEMBERS[member]
    d = os.path.join(BASE, member)
    tmpl = open(os.path.join(HERE, "patroni.yml.tmpl")).read()
    y = (tmpl.replace("{name}", member).replace("{pg_port}", str(pg_port))
         .replace("{api_port}", str(api_port)).replace("{dir}", d)
         .replace("{ttl}", str(ttl)).replace("{loop_wait}", str(loop_wait))
         .replace("{retry_timeout}", str(retry_timeout)))
    os.makedirs(d, exist_ok=True)
    path = os.path.join(BASE, member + ".yml")
    open(path, "w").write(y)
    subprocess.run(["chown", "-R", "postgres:postgres", d, path], check=True)
    os.chmod(d, 0o700)
    return path


def start_patroni(member):
    env = {"PATH": "/usr/bin:/bin", "HOME": os.path.join(BASE, member), "LANG": "C.UTF-8"}
    return start("patroni-" + member, ["patroni", os.path.join(BASE, member + ".yml")],
                 user="postgres", env=env)


def wait(what, fn, timeout):
    until = now() + timeout
    while now() < until:
        r = fn()
        if r:
            return r
        time.sleep(0.2)
    raise SystemExit("timed out waiting for " + what)


def healthy():
    """Leader running, the other member its streaming sync standby."""
    c = cluster()
    if not c:
        return False
    ms = c.get("members", [])
    roles = sorted((m.get("role"), m.get("state")) for m in ms)
    ok = len(ms) == 2 and any(r[0] == "leader" and r[1] == "running" for r in roles) and any(
        r[0] == "sync_standby" and r[1] in ("running", "streaming") for r in roles)
    if not ok:
        return False
    try:
        with psycopg2.connect(DSN_RW.replace("dbname=confab", "dbname=postgres")) as c2:
            cur = c2.cursor()
            cur.execute("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync' AND state = 'streaming'")
            return cur.fetchone()[0] == 1
    except Exception:
        return False


def up(ttl=10, loop_wait=2, retry_timeout=4):
    os.makedirs(BASE, exist_ok=True)
    if not pid_of("etcd"):
        start("etcd", ["etcd", "--name", "drill", "--data-dir", os.path.join(BASE, "etcd"),
                       "--listen-client-urls", ETCD_URL, "--advertise-client-urls", ETCD_URL,
                       "--listen-peer-urls", "http://127.0.0.1:23800",
                       "--initial-advertise-peer-urls", "http://127.0.0.1:23800",
                       "--initial-cluster", "drill=http://127.0.0.1:23800",
                       "--initial-cluster-token", "confab-drill", "--initial-cluster-state", "new"])
        wait("etcd", lambda: http_json(ETCD_URL + "/health")[0] == 200, 30)
    for m in MEMBERS:
        write_patroni_yml(m, ttl, loop_wait, retry_timeout)
    if not pid_of("patroni-pg1"):
        start_patroni("pg1")
    wait("a leader", leader, 90)
    if not pid_of("patroni-pg2"):
        start_patroni("pg2")
    wait("the sync standby", healthy, 120)
    ld = leader()
    con = psycopg2.connect(host="127.0.0.1", port=MEMBERS[ld][0], user="postgres", dbname="postgres")
    con.autocommit = True
    cur = con.cursor()
    cur.execute("SELECT 1 FROM pg_database WHERE datname = 'confab'")
    if not cur.fetchone():
        cur.execute("CREATE DATABASE confab")
        log("created database confab on", ld)
    con.close()
    cfg = os.path.join(HERE, "cluster.toml")
    for n in NODES:
        if not pid_of("confab-" + n):
            os.makedirs(os.path.join(BASE, "confab", n), exist_ok=True)
            start("confab-" + n, [CONFAB, "serve", "--config", cfg, "--node", n,
                                  "--data-dir", os.path.join(BASE, "confab", n)])
    if not pid_of("confab-proxy"):
        start("confab-proxy", [CONFAB, "proxy", "--config", cfg, "--listen", "127.0.0.1:%d" % PROXY])
    wait("the proxy's /readyz", lambda: http_json("http://127.0.0.1:%d/readyz" % PROXY)[0] == 200, 120)
    status()


def down():
    for n in ["confab-proxy"] + ["confab-" + n for n in NODES]:
        stop(n)
    for m in MEMBERS:
        stop("patroni-" + m, grace=30)
        pm = postmaster_pid(m)
        if pm:
            stop("postmaster-" + m, pid=pm, grace=30)
    stop("etcd")


def wipe():
    down()
    for d in ["etcd", "pg1", "pg2", "confab"]:
        subprocess.run(["rm", "-rf", os.path.join(BASE, d)])
    log("wiped data directories")


def restore():
    for m in MEMBERS:
        if not pid_of("patroni-" + m):
            start_patroni(m)
    t0 = now()
    wait("leader + sync standby", healthy, 180)
    log("healthy after %.1f s" % (now() - t0))
    wait("the proxy's /readyz", lambda: http_json("http://127.0.0.1:%d/readyz" % PROXY)[0] == 200, 60)
    return now() - t0


def timing(ttl, loop_wait, retry_timeout):
    ld = leader() or "pg1"
    subprocess.run(["patronictl", "-c", os.path.join(BASE, ld + ".yml"), "edit-config", "--force",
                    "-s", "ttl=%s" % ttl, "-s", "loop_wait=%s" % loop_wait,
                    "-s", "retry_timeout=%s" % retry_timeout], check=True)


def status():
    subprocess.run(["patronictl", "-c", os.path.join(BASE, "pg1.yml"), "list"])
    subprocess.run(["patronictl", "-c", os.path.join(BASE, "pg1.yml"), "show-config"])
    print("proxy /readyz:", http_json("http://127.0.0.1:%d/readyz" % PROXY))
    for n, p in NODES.items():
        print(n, "metrics:", metrics(p))


def check():
    con = psycopg2.connect(DSN_RW)
    cur = con.cursor()
    cur.execute("SELECT count(*), count(DISTINCT room) FROM messages")
    total, rooms = cur.fetchone()
    cur.execute("SELECT room, sender, client_id, count(*) FROM messages GROUP BY 1,2,3 HAVING count(*) > 1")
    dups = cur.fetchall()
    cur.execute("SELECT room, max(seq), count(*) FROM messages GROUP BY room HAVING max(seq) <> count(*) OR min(seq) <> 1")
    gaps = cur.fetchall()
    con.close()
    r = {"messages": total, "rooms": rooms, "duplicates": len(dups), "gappy_rooms": len(gaps),
         "duplicate_rows": [list(map(str, d)) for d in dups[:10]], "gap_rows": [list(map(str, g)) for g in gaps[:10]]}
    print(json.dumps(r))
    return r


# ---------------------------------------------------------------- the poller

class Poller:
    """Samples every 100 ms: each Patroni's role, each node's metrics, and the
    primary's synchronous_standby_names and pg_stat_replication (SQL)."""

    def __init__(self, path):
        self.out = open(path, "w")
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.samples = []
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self.poll_patroni, self.poll_metrics, self.poll_sql)]

    def emit(self, rec):
        with self.lock:
            self.samples.append(rec)
            self.out.write(json.dumps(rec) + "\n")

    def tick(self, t0):
        d = 0.1 - (now() - t0)
        if d > 0:
            self.stop.wait(d)

    def poll_patroni(self):
        while not self.stop.is_set():
            t0 = now()
            r = {m: patroni(m) for m in MEMBERS}
            self.emit({"t": t0, "src": "patroni", **{m: r[m]["role"] for m in MEMBERS}})
            self.tick(t0)

    def poll_metrics(self):
        while not self.stop.is_set():
            t0 = now()
            r = {n: metrics(p) for n, p in NODES.items()}
            self.emit({"t": t0, "src": "metrics", **r})
            self.tick(t0)

    def poll_sql(self):
        con = None
        while not self.stop.is_set():
            t0 = now()
            rec = {"t": t0, "src": "sql"}
            try:
                if con is None or con.closed:
                    con = psycopg2.connect(DSN_RW.replace("dbname=confab", "dbname=postgres"))
                    con.autocommit = True
                cur = con.cursor()
                cur.execute("SELECT inet_server_port(), current_setting('synchronous_standby_names'), "
                            "(SELECT string_agg(application_name || ':' || state || ':' || sync_state, ',') FROM pg_stat_replication)")
                port, ssn, rep = cur.fetchone()
                rec.update({"port": port, "ssn": ssn, "rep": rep})
            except Exception as e:
                rec["error"] = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
                try:
                    if con:
                        con.close()
                except Exception:
                    pass
                con = None
            self.emit(rec)
            self.tick(t0)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *a):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=3)
        self.out.close()

    def stored(self):
        with self.lock:
            return [(s["t"], sum((s[n] or {}).get("stored", 0) for n in NODES))
                    for s in self.samples if s["src"] == "metrics" and all(s[n] for n in NODES)]


def stored_gaps(series, t_from):
    """Gaps between consecutive increases of the stored-messages counter after t_from."""
    gaps = []
    last_inc = None
    prev = None
    for t, v in series:
        if prev is not None and v > prev[1]:
            if last_inc is not None and t >= t_from:
                gaps.append((last_inc, t))
            last_inc = t
        prev = (t, v)
    return gaps


def analyse(kind, event_t, samples, victim, other):
    """Times relative to the event (kill / switchover command)."""
    rel = lambda t: None if t is None else round(t - event_t, 3)
    res = {"event_t": ts(event_t)}
    met = [s for s in samples if s["src"] == "metrics" and all(s[n] for n in NODES)]
    series = [(s["t"], sum(s[n]["stored"] for n in NODES)) for s in met]
    gaps = [g for g in stored_gaps(series, event_t - 1) if g[1] > event_t]
    if gaps:
        g = max(gaps, key=lambda g: g[1] - g[0])
        res["write_pause"] = {"last_store_before_s": rel(g[0]), "first_store_after_s": rel(g[1]),
                              "pause_s": round(g[1] - g[0], 3)}
    pat = [s for s in samples if s["src"] == "patroni" and s["t"] >= event_t]
    if other:
        p = next((s["t"] for s in pat if s.get(other) in ("master", "primary")), None)
        res["other_leader_s"] = rel(p)
    if victim:
        d = next((s["t"] for s in pat if s.get(victim) == "down"), None)
        res["victim_api_down_s"] = rel(d)
    sync0 = next((s["t"] for s in met if s["t"] >= event_t and any(s[n]["sync"] == 0 for n in NODES)), None)
    res["confab_sync_standbys_0_s"] = rel(sync0)
    sq = [s for s in samples if s["src"] == "sql" and s["t"] >= event_t]
    res["sql_first_error_s"] = rel(next((s["t"] for s in sq if "error" in s), None))
    res["sql_first_ok_new_port_s"] = rel(next((s["t"] for s in sq if "port" in s and other and s["port"] == MEMBERS[other][0]), None))
    res["ssn_empty_s"] = rel(next((s["t"] for s in sq if s.get("ssn") == ""), None))
    res["ssn_values"] = sorted({s.get("ssn") for s in sq if "ssn" in s})
    res["sql_errors"] = sorted({s["error"] for s in sq if "error" in s})[:5]
    # sync standby back (after restore): first sample with a sync standby again after a 0
    return res


def patroni_log_lines(member, t_from, t_to, words=("promot", "leader", "synchronous", "sync", "acquir", "lock", "demot", "rewind", "WARNING", "ERROR")):
    path = os.path.join(LOGS, "patroni-" + member + ".log")
    out = []
    try:
        for line in open(path, errors="replace"):
            if len(line) < 23 or not line[:4].isdigit():
                continue
            try:
                t = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
            except ValueError:
                continue
            if t_from <= t <= t_to and any(w.lower() in line.lower() for w in words):
                out.append(line.rstrip())
    except OSError:
        pass
    return out


def run(kind, label, kill_at=20.0, duration=60, users=200, rate=500):
    os.makedirs(RAW, exist_ok=True)
    if not healthy():
        raise SystemExit("not healthy: run restore first")
    ld = leader()
    sb = [m for m in MEMBERS if m != ld][0]
    victim, other = {"primary": (ld, sb), "standby": (sb, ld), "standby-freeze": (sb, ld),
                     "switchover": (ld, sb), "none": (None, None)}[kind]
    log("run", label, kind, "leader", ld, "standby", sb)
    bench_txt = os.path.join(RAW, label + "-bench.txt")
    bench_json = os.path.join(RAW, label + "-bench.json")
    argv = [CONFAB, "bench", "--url", "http://127.0.0.1:%d" % PROXY, "--users", str(users), "--rate", str(rate),
            "--duration", str(duration), "--prefix", label.replace("-", "_") + "_", "--source-ips", "1",
            "--drain", "10", "--json", bench_json]
    event_t = None
    extra = {}
    with Poller(os.path.join(RAW, label + "-poll.jsonl")) as poller:
        t_start = now()
        with open(bench_txt, "w") as bout:
            bout.write("$ " + " ".join(argv) + "\n")
            bout.flush()
            bench = subprocess.Popen(argv, stdout=bout, stderr=subprocess.STDOUT)
            # sending has begun when the nodes store messages
            base = None
            while bench.poll() is None:
                s = poller.stored()
                if s:
                    base = s[0][1] if base is None else base
                    if s[-1][1] - base >= 50:
                        break
                time.sleep(0.1)
            send_t = now()
            log("sending began (seen at %s)" % ts(send_t))
            while bench.poll() is None and now() < send_t + kill_at:
                time.sleep(0.05)
            if kind in ("primary", "standby"):
                event_t, pids = kill_host(victim)
                extra["killed_pids"] = pids
            elif kind == "standby-freeze":
                event_t, pids = kill_host(victim, signal.SIGSTOP)
                extra["stopped_pids"] = pids
            elif kind == "switchover":
                event_t = now()
                r = subprocess.run(["patronictl", "-c", os.path.join(BASE, ld + ".yml"), "switchover",
                                    "--leader", ld, "--candidate", sb, "--force"], capture_output=True, text=True)
                extra["switchover_cmd_s"] = round(now() - event_t, 3)
                extra["switchover_output"] = (r.stdout + r.stderr).strip().splitlines()[-6:]
                log("switchover returned after %.2f s" % extra["switchover_cmd_s"])
            else:
                event_t = now()
            rc = bench.wait()
            if kind == "standby-freeze":
                # the frozen host is then lost for good; `restore` starts its Patroni again
                for pid in extra["stopped_pids"]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                log("SIGKILL the frozen pids")
        t_end = now()
        samples = list(poller.samples)
    res = {"label": label, "kind": kind, "leader_before": ld, "standby_before": sb, "victim": victim,
           "bench_rc": rc, "send_began": ts(send_t), **extra}
    res.update(analyse(kind, event_t, samples, victim, other))
    try:
        b = json.load(open(bench_json))["steps"][0]
        res["bench"] = {k: b.get(k) for k in ("sent", "acked", "errors", "errors_by_kind", "lost", "history_mismatches",
                                              "delivered", "expected_deliveries")}
        res["bench"]["ack_ms"] = b.get("ack_ms")
        res["bench"]["deliver_ms"] = b.get("deliver_ms")
    except Exception as e:
        res["bench"] = {"error": str(e)}
    res["sql_check"] = check()
    res["patroni_log"] = {m: patroni_log_lines(m, event_t - 2 if event_t else t_start, t_end) for m in MEMBERS}
    path = os.path.join(RAW, label + "-summary.json")
    json.dump(res, open(path, "w"), indent=2)
    with open(os.path.join(RAW, "summary.jsonl"), "a") as f:
        f.write(json.dumps({k: v for k, v in res.items() if k != "patroni_log"}) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "patroni_log"}, indent=2))
    return res


def main():
    a = sys.argv[1:]
    if not a:
        print(__doc__)
        return
    opts = {}
    pos = []
    i = 0
    while i < len(a):
        if a[i].startswith("--"):
            opts[a[i][2:].replace("-", "_")] = a[i + 1]
            i += 2
        else:
            pos.append(a[i])
            i += 1
    cmd = pos[0]
    if cmd == "up":
        up(int(opts.get("ttl", 10)), int(opts.get("loop_wait", 2)), int(opts.get("retry_timeout", 4)))
    elif cmd == "down":
        down()
    elif cmd == "wipe":
        wipe()
    elif cmd == "restore":
        restore()
    elif cmd == "status":
        status()
    elif cmd == "check":
        check()
    elif cmd == "timing":
        timing(*pos[1:4])
    elif cmd == "run":
        run(pos[1], pos[2], float(opts.get("kill_at", 20)), int(opts.get("duration", 60)),
            int(opts.get("users", 200)), int(opts.get("rate", 500)))
    else:
        print(__doc__)


if __name__ == "__main__":
    main()
