#!/usr/bin/env python3
"""Benchmark of issue 21: confab nodes on one PostgreSQL database (a primary
with a synchronous standby) behind `confab proxy`, against a single node on
the same PostgreSQL pair and a plain embedded single node.

    run.py SETUP[,SETUP...] USERS RATE DURATION [--runs 3] [--out DIR]
           [--perf ROLE:SECS] [--tag-suffix S] [--set KEY=VALUE ...]

SETUP: embedded (one `confab serve`, its own redb store), pg1 (one
`confab serve` with `database_url`, no cluster, no proxy), n1 / n2 / n3
(1, 2 or 3 nodes on the database behind one proxy). With several setups the
runs are interleaved: round 1 of every setup, then round 2, ...

One invocation starts one PostgreSQL pair under /tmp/confab-bench-pg
(primary: initdb, durable defaults -- fsync, synchronous_commit and
full_page_writes on -- wal_level=replica; standby: pg_basebackup -X stream
-R, named standby1, made synchronous with ALTER SYSTEM SET
synchronous_standby_names on the primary only), and every run gets a fresh
database (CREATE DATABASE, dropped after the run) and fresh data dirs. Every
process this script starts is stopped and every directory deleted when it
ends, also on an error or a signal (children also get PR_SET_PDEATHSIG, so
a SIGKILLed script takes them with it).

Per run: wait for a quiet machine, start the setup, run `confab bench
--users U --rate R --duration D --json ...` against it, and once a second
sample every process's CPU (utime+stime of /proc/PID/stat; a PostgreSQL
server is its postmaster, its children and the children it reaped), RSS,
the nodes' /metrics (messages stored, commit batches and their durations)
and, through one psql session kept open, the primary's pg_stat_database,
pg_stat_wal and pg_stat_replication; pg_stat_activity of the confab
connections is sampled 4 times a second (wait events).

CPU per message is taken over the sending window only: from the first to
the last 1 s sample in which the nodes' stored counter grows, minus 3 s at
each end (signups, room creation, drain and the history check are
outside it), divided by the messages stored in that window.

A run is `overlapped` (kept in the raw file, left out of the medians, and
run again, up to twice) when the rest of the machine used more than 0.20
cores during the window or the 1-minute load average was above 1.5 when it
started.
"""
import argparse, collections, ctypes, json, os, re, shutil, signal, subprocess, sys, threading, time
import urllib.request

BIN = os.environ.get("CONFAB_BIN", "target/release/confab")
PGBIN = os.environ.get("CONFAB_PG_BIN", "/usr/lib/postgresql/15/bin")
ROOT = "/tmp/confab-bench-pg"
NODE_PORTS = [19181, 19182, 19183]
PROXY_PORT, SINGLE_PORT = 19180, 19190
PG_PRIMARY, PG_STANDBY = 19191, 19192
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SECRET = "0123456789abcdef0123456789abcdef-bench-pg"
OTHER_LIMIT, LOAD_LIMIT = 0.20, 1.5

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _tied():
    """preexec_fn: the child dies (SIGKILL) when this script dies."""
    _libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


def _tied_session():
    _tied()
    os.setsid()


class Interrupted(Exception):
    pass


def _on_signal(signum, _frame):
    raise Interrupted(f"signal {signum}")


# ---------------------------------------------------------------- /proc

def stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_ticks(pid):
    f = stat_fields(pid)
    return int(f[11]) + int(f[12])  # fields 14, 15: utime, stime


def rss_mb(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def children(ppid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(stat_fields(d)[1]) == ppid:  # field 4: ppid
                    out.append(int(d))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return out


def tree_ticks(postmaster):
    """A PostgreSQL server's CPU: the postmaster (with the children it has
    reaped: cutime, cstime) and its live children."""
    f = stat_fields(postmaster)
    total = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    for c in children(postmaster):
        try:
            total += cpu_ticks(c)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def tree_rss_mb(postmaster):
    total = rss_mb(postmaster)
    for c in children(postmaster):
        try:
            total += rss_mb(c)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total  # counts shared buffers once per process that touched them: an upper bound


def busy_ticks():  # all CPUs: user+nice+system+irq+softirq+steal
    f = open("/proc/stat").readline().split()[1:]
    return sum(int(x) for i, x in enumerate(f) if i not in (3, 4, 8, 9))


def loadavg():
    return open("/proc/loadavg").read().split()[0]


def uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def wait_quiet(limit=0.2, timeout=1200):
    """Wait until the machine is quiet: three 5 s windows in a row under
    `limit` cores and a 1-minute load average under LOAD_LIMIT."""
    t0, quiet = time.time(), 0
    while time.time() - t0 < timeout:
        b0 = busy_ticks(); time.sleep(5); cores = (busy_ticks() - b0) / TICK / 5
        quiet = quiet + 1 if cores < limit else 0
        if quiet >= 3 and float(loadavg()) < LOAD_LIMIT:
            return True
        if not quiet:
            print(f"  machine busy ({cores:.2f} cores, load {loadavg()}), waiting", file=sys.stderr, flush=True)
    print("  machine never became quiet; running anyway", file=sys.stderr, flush=True)
    return False


# ---------------------------------------------------------------- PostgreSQL

def psql(port, sql, db="postgres"):
    r = subprocess.run([f"{PGBIN}/psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                        "-p", str(port), "-U", "postgres", "-d", db, "-c", sql],
                       capture_output=True, text=True, env=dict(os.environ, PGCONNECT_TIMEOUT="5"))
    if r.returncode:
        raise RuntimeError(f"psql on port {port}: {r.stderr.strip()}\n{sql}")
    return r.stdout.strip()


class Session:
    """One psql kept open: a query, then the lines up to a marker."""

    def __init__(self, port):
        self.p = subprocess.Popen([f"{PGBIN}/psql", "-X", "-A", "-t", "-q", "-F", "|", "-h", "127.0.0.1",
                                   "-p", str(port), "-U", "postgres", "-d", "postgres"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, preexec_fn=_tied)
        self.lock = threading.Lock()

    def query(self, sql):
        with self.lock:
            self.p.stdin.write(sql.rstrip(";") + ";\n\\echo __end__\n")
            self.p.stdin.flush()
            out = []
            while True:
                line = self.p.stdout.readline()
                if not line:
                    raise RuntimeError("psql session ended")
                line = line.rstrip("\n")
                if line == "__end__":
                    return out
                if line:
                    out.append(line)

    def close(self):
        try:
            self.p.stdin.close()
            self.p.wait(5)
        except Exception:
            self.p.kill()


PG_SETTINGS = [
    "listen_addresses=127.0.0.1", "unix_socket_directories=",
    # durable defaults, spelled out
    "fsync=on", "synchronous_commit=on", "full_page_writes=on",
    "wal_level=replica", "max_wal_senders=5", "wal_keep_size=256MB",
    "max_connections=300", "shared_buffers=256MB",
]


STARTED = []  # every PostgreSQL server started, stopped in reverse order at the end


class PgServer:
    def __init__(self, name, port):
        self.dir, self.port, self.proc = os.path.join(ROOT, name), port, None

    def start(self, extra=()):
        log = open(os.path.join(ROOT, os.path.basename(self.dir) + ".log"), "a")
        cmd = [f"{PGBIN}/postgres", "-D", self.dir, "-p", str(self.port)]
        for s in PG_SETTINGS + list(extra):
            cmd += ["-c", s]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     user="postgres", group="postgres", extra_groups=[],
                                     env=dict(os.environ, LC_ALL="C"), preexec_fn=_tied_session)
        STARTED.append(self)
        for _ in range(300):
            time.sleep(0.1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres on {self.port} exited; see {log.name}")
            try:
                psql(self.port, "select 1")
                return
            except RuntimeError:
                pass
        raise RuntimeError(f"postgres on {self.port} did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGQUIT)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()


def as_postgres(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, user="postgres", group="postgres", extra_groups=[],
                       env=dict(os.environ, LC_ALL="C"), preexec_fn=_tied)
    if r.returncode:
        raise RuntimeError(f"{cmd[0]} failed: {r.stdout}{r.stderr}")


def start_pair():
    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(ROOT)
    os.chmod(ROOT, 0o700)
    shutil.chown(ROOT, "postgres", "postgres")
    primary, standby = PgServer("primary", PG_PRIMARY), PgServer("standby", PG_STANDBY)
    as_postgres([f"{PGBIN}/initdb", "-D", primary.dir, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                 "--locale=C"])
    primary.start()
    as_postgres([f"{PGBIN}/pg_basebackup", "-h", "127.0.0.1", "-p", str(PG_PRIMARY), "-U", "postgres",
                 "-D", standby.dir, "-X", "stream", "-c", "fast", "-R"])
    standby.start([f"primary_conninfo=host=127.0.0.1 port={PG_PRIMARY} user=postgres application_name=standby1"])
    psql(PG_PRIMARY, "ALTER SYSTEM SET synchronous_standby_names = 'standby1'")
    psql(PG_PRIMARY, "SELECT pg_reload_conf()")
    for _ in range(300):
        if psql(PG_PRIMARY, "SELECT sync_state FROM pg_stat_replication WHERE application_name='standby1'") == "sync":
            return primary, standby
        time.sleep(0.1)
    raise RuntimeError("the standby never became synchronous")


# ---------------------------------------------------------------- confab

def metrics(port):
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except Exception:
        return None
    out = {}
    for name in ("confab_messages_stored_total", "confab_commit_batch_size_sum", "confab_commit_batch_size_count",
                 "confab_commit_duration_seconds_sum", "confab_commit_duration_seconds_count",
                 "confab_search_indexed_total"):
        m = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def start_confab(cmd, cwd, log):
    out = open(os.path.join(cwd, log), "w")
    p = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_tied)
    for _ in range(600):
        time.sleep(0.1)
        if "listening on" in open(os.path.join(cwd, log)).read():
            return p
        if p.poll() is not None:
            break
    raise RuntimeError(f"{cmd} did not start; see {cwd}/{log}:\n{open(os.path.join(cwd, log)).read()[-2000:]}")


def stop_procs(procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ---------------------------------------------------------------- sampling

ACTIVITY_SQL = ("SELECT application_name, state, coalesce(wait_event_type,''), coalesce(wait_event,''), count(*) "
                "FROM pg_stat_activity WHERE application_name LIKE 'confab%' GROUP BY 1,2,3,4")


def pg_stats(sess, db):
    row = sess.query(
        f"SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname='{db}'), "
        "wal_records, wal_bytes, wal_write, wal_sync, "
        "(SELECT coalesce(extract(epoch FROM flush_lag),0) FROM pg_stat_replication "
        " WHERE application_name='standby1'), "
        "(SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn),0) FROM pg_stat_replication "
        " WHERE application_name='standby1'), "
        "(SELECT sync_state FROM pg_stat_replication WHERE application_name='standby1'), "
        "(SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter) "
        "FROM pg_stat_wal")[0].split("|")
    return {"xact_commit": int(row[0] or 0), "wal_records": int(row[1]), "wal_bytes": float(row[2]),
            "wal_write": int(row[3]), "wal_sync": int(row[4]), "flush_lag_s": float(row[5] or 0),
            "flush_lag_bytes": float(row[6] or 0), "sync_state": row[7], "checkpoints": int(row[8])}


class ActivitySampler(threading.Thread):
    """pg_stat_activity of the confab connections, 4 times a second."""

    def __init__(self, sess):
        super().__init__(daemon=True)
        self.sess, self.stop_at, self.samples = sess, False, []

    def run(self):
        while not self.stop_at:
            t = time.time()
            try:
                rows = self.sess.query(ACTIVITY_SQL)
                self.samples.append((t, [r.split("|") for r in rows]))
            except Exception:
                return
            time.sleep(max(0, 0.25 - (time.time() - t)))


def strace_writer(pid, secs, out_prefix):
    """strace of a node's database writer thread (`pg-writer`) for `secs`: its
    socket calls, to count round trips per commit (slows that thread while it runs)."""
    tid = next(t for t in os.listdir(f"/proc/{pid}/task")
               if open(f"/proc/{pid}/task/{t}/comm").read().strip() == "pg-writer")
    def go():
        p = subprocess.Popen(["strace", "-tt", "-e", "trace=sendto,recvfrom,sendmsg,recvmsg,write,read,writev",
                              "-s", "40", "-p", tid, "-o", out_prefix + ".strace.txt"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_tied)
        time.sleep(secs)
        p.send_signal(signal.SIGINT)
        p.wait(10)
    th = threading.Thread(target=go, daemon=True)
    th.start()
    return th


def perf_profile(pids, secs, out_prefix, delay):
    """perf record -g of these processes for `secs`, `delay` s from now; the top of its report."""
    def go():
        time.sleep(delay)
        data = out_prefix + ".perf.data"
        subprocess.run(["perf", "record", "-F", "499", "-g", "-p", ",".join(map(str, pids)), "-o", data, "--",
                        "sleep", str(secs)], capture_output=True)
        for kind, args in (("self", ["--no-children"]), ("children", ["--children"])):
            r = subprocess.run(["perf", "report", "-i", data, "--stdio", "--sort", "dso,sym", "--percent-limit",
                                "0.7", "-g", "none"] + args, capture_output=True, text=True)
            with open(f"{out_prefix}.perf-{kind}.txt", "w") as f:
                f.write(r.stdout[:60000])
        os.remove(data)
    th = threading.Thread(target=go, daemon=True)
    th.start()
    return th


# ---------------------------------------------------------------- one run

def one_run(pair, setup, users, rate, duration, out, tag, perf, sets, no_wait=False):
    quiet = None if no_wait else wait_quiet()
    before = {"uptime": uptime(), "loadavg1": float(loadavg()), "quiet": quiet}
    d = os.path.join(ROOT, "run-" + tag)
    os.makedirs(d)
    primary, standby = pair
    db = "bench_" + re.sub(r"[^a-z0-9_]", "_", tag.lower())
    procs = {}
    url_pg = f"host=127.0.0.1,127.0.0.1 port={PG_PRIMARY},{PG_STANDBY} user=postgres dbname={db}"
    extra = []
    for s in sets:
        extra += ["--set", s]
    try:
        if setup != "embedded":
            psql(PG_PRIMARY, f"CREATE DATABASE {db}")
        if setup == "embedded":
            procs["node"] = start_confab([BIN, "serve", "--listen", f"127.0.0.1:{SINGLE_PORT}", "--data-dir", "d"]
                                         + extra, d, "node.log")
            url, node_ports = f"http://127.0.0.1:{SINGLE_PORT}", [SINGLE_PORT]
        elif setup == "pg1":
            with open(os.path.join(d, "single.toml"), "w") as f:
                f.write(f'[store]\ndatabase_url = "{url_pg}"\n')
            procs["node"] = start_confab([BIN, "serve", "--config", "single.toml", "--listen",
                                          f"127.0.0.1:{SINGLE_PORT}", "--data-dir", "d"] + extra, d, "node.log")
            url, node_ports = f"http://127.0.0.1:{SINGLE_PORT}", [SINGLE_PORT]
        else:
            n = int(setup[1:])
            nodes = ", ".join(f'"n{i+1}=127.0.0.1:{NODE_PORTS[i]}"' for i in range(n))
            with open(os.path.join(d, "cluster.toml"), "w") as f:
                f.write(f'[store]\ndatabase_url = "{url_pg}"\n'
                        f'[cluster]\ncluster_secret = "{SECRET}"\ncluster_nodes = [{nodes}]\n')
            for i in range(n):
                procs[f"n{i+1}"] = start_confab([BIN, "serve", "--config", "cluster.toml", "--node", f"n{i+1}",
                                                 "--data-dir", f"d{i+1}"] + extra, d, f"n{i+1}.log")
            procs["proxy"] = start_confab([BIN, "proxy", "--config", "cluster.toml", "--listen",
                                           f"127.0.0.1:{PROXY_PORT}"], d, "proxy.log")
            url, node_ports = f"http://127.0.0.1:{PROXY_PORT}", NODE_PORTS[:n]
            for _ in range(300):
                try:
                    if urllib.request.urlopen(url + "/readyz", timeout=2).status == 200:
                        break
                except Exception:
                    pass
                time.sleep(0.1)
            else:
                raise RuntimeError("the proxy's /readyz never said 200")
        sess = None if setup == "embedded" else Session(PG_PRIMARY)
        activity = None
        if sess:
            activity = ActivitySampler(Session(PG_PRIMARY))
            activity.start()
        bench_json = os.path.join(out, f"{tag}.bench.json")
        bench = subprocess.Popen([BIN, "bench", "--url", url, "--users", str(users), "--rate", str(rate),
                                  "--duration", str(duration), "--quiet", "--json", bench_json],
                                 stdout=subprocess.PIPE, stderr=open(os.path.join(d, "bench.err"), "w"), text=True,
                                 preexec_fn=_tied)
        pids = {r: p.pid for r, p in procs.items()}
        pids["bench"] = bench.pid
        pg_pids = {} if setup == "embedded" else {"pg_primary": primary.proc.pid, "pg_standby": standby.proc.pid}
        me = os.getpid()
        samples, perf_thread, sending_since = [], None, None
        while bench.poll() is None:
            t = time.time()
            try:
                ms = {p: metrics(p) for p in node_ports}
                s = {"t": round(t, 3), "busy": busy_ticks(),
                     "stored": sum(int(m["confab_messages_stored_total"]) for m in ms.values() if m),
                     "node_metrics": {str(p): m for p, m in ms.items()},
                     "cpu": {r: cpu_ticks(p) for r, p in pids.items()},
                     "rss": {r: round(rss_mb(p), 1) for r, p in pids.items()}}
                s["cpu"]["script"] = cpu_ticks(me)  # this sampler and its psql sessions are not "other"
                for child in children(me):
                    if child not in pids.values() and child not in (primary.proc.pid, standby.proc.pid):
                        try:
                            s["cpu"]["script"] += cpu_ticks(child)
                        except (FileNotFoundError, ProcessLookupError):
                            pass
                for r, p in pg_pids.items():
                    s["cpu"][r] = tree_ticks(p)
                    s["rss"][r] = round(tree_rss_mb(p), 1)
                    per = {}
                    for c in children(p):
                        try:
                            per[c] = cpu_ticks(c)
                        except (FileNotFoundError, ProcessLookupError):
                            pass
                    s.setdefault("pgproc", {})[r] = per
                if sess:
                    s["pg"] = pg_stats(sess, db)
                samples.append(s)
                if len(samples) > 1 and s["stored"] > samples[-2]["stored"] and sending_since is None:
                    sending_since = t
                if perf and perf_thread is None and sending_since and t - sending_since > 10:
                    role, secs = perf
                    if role.endswith("-strace"):
                        perf_thread = strace_writer(pids[role[:-7]], secs, os.path.join(out, f"{tag}.{role}"))
                    elif role == "pg_writer":
                        rows = sess.query("SELECT pid FROM pg_stat_activity WHERE application_name='confab-writer' "
                                          "ORDER BY pid LIMIT 1")
                        target = [int(rows[0])]
                    elif role in ("pg_primary", "pg_standby"):  # the postmaster and every child
                        target = [pg_pids[role]] + children(pg_pids[role])
                    else:
                        target = [pids[role]]
                    if not role.endswith("-strace"):
                        perf_thread = perf_profile(target, secs, os.path.join(out, f"{tag}.{role}"), 0)
            except (FileNotFoundError, ProcessLookupError):
                pass
            time.sleep(max(0, 1.0 - (time.time() - t)))
        row = bench.stdout.read().strip()
        labels = {}  # PostgreSQL pid -> what it is, asked while the connections still live
        for r, port in (("pg_primary", PG_PRIMARY), ("pg_standby", PG_STANDBY)):
            if r in pg_pids:
                for line in psql(port, "SELECT pid, backend_type, coalesce(application_name,'') "
                                       "FROM pg_stat_activity").splitlines():
                    pid, btype, app = line.split("|")
                    labels[int(pid)] = app if app.startswith("confab") else btype
        if activity:
            activity.stop_at = True
            activity.join(5)
            activity.sess.close()
        if sess:
            sess.close()
        if perf_thread:
            perf_thread.join(120)
        after_uptime = uptime()
    finally:
        stop_procs(list(procs.values()))
        if setup != "embedded":
            for _ in range(20):
                try:
                    psql(PG_PRIMARY, f"DROP DATABASE IF EXISTS {db}")
                    break
                except RuntimeError:
                    time.sleep(0.5)
        shutil.rmtree(d, ignore_errors=True)

    res = {"tag": tag, "setup": setup, "users": users, "rate": rate, "duration": duration, "sets": sets,
           "before": before, "after_uptime": after_uptime, "bench_row": row}
    try:
        b = json.load(open(bench_json))["steps"][0]
        res["bench"] = {k: b[k] for k in ("sent", "acked", "delivered", "expected_deliveries", "errors",
                                          "errors_by_kind", "lost", "history_mismatches", "achieved_rate")}
        res["bench"]["acked_per_s"] = round(b["acked"] / b["duration_secs"], 1)
        res["bench"]["deliver_ms"] = b["deliver_ms"]
        res["bench"]["ack_ms"] = b["ack_ms"]
    except Exception as e:  # the bench failed: keep what there is
        res["bench_error"] = repr(e)

    grow = [i for i in range(1, len(samples)) if samples[i]["stored"] > samples[i - 1]["stored"]]
    if len(grow) < 8:
        res["window_error"] = "no sending window"
    else:
        a, b_ = grow[0] + 3, grow[-1] - 3
        s0, s1 = samples[a], samples[b_]
        msgs, secs = s1["stored"] - s0["stored"], s1["t"] - s0["t"]
        roles = list(s1["cpu"])
        mine = sum(s1["cpu"][r] - s0["cpu"][r] for r in roles)
        res.update({
            "window_s": round(secs, 1), "window_msgs": msgs, "msgs_per_s": round(msgs / secs),
            "cpu_us_per_msg": {r: round((s1["cpu"][r] - s0["cpu"][r]) / TICK * 1e6 / msgs, 1) for r in roles},
            "cores": {r: round((s1["cpu"][r] - s0["cpu"][r]) / TICK / secs, 3) for r in roles},
            "other_cores": round((s1["busy"] - s0["busy"] - mine) / TICK / secs, 3),
            "rss_mb_end_of_window": s1["rss"],
            "rss_mb_max": {r: max(s["rss"].get(r, 0) for s in samples) for r in s1["rss"]},
        })
        if "pgproc" in s1 and "pgproc" in s0:
            res["pg_cpu_us_per_msg_by_process"] = {}
            for r in s1["pgproc"]:
                by = collections.Counter()
                for pid, t1 in s1["pgproc"][r].items():
                    t0 = s0["pgproc"].get(r, {}).get(pid, 0)
                    by[labels.get(pid, "other")] += t1 - t0
                reaped = (s1["cpu"][r] - s0["cpu"][r]) - sum(by.values())  # postmaster, exited children
                by["postmaster and exited"] += reaped
                res["pg_cpu_us_per_msg_by_process"][r] = {k: round(v / TICK * 1e6 / msgs, 1)
                                                           for k, v in by.most_common() if v}
        nodes = {}
        for p in s1["node_metrics"]:
            m0, m1 = s0["node_metrics"][p] or {}, s1["node_metrics"][p] or {}
            dd = {k: m1.get(k, 0) - m0.get(k, 0) for k in m1}
            c = dd.get("confab_commit_batch_size_count", 0)
            nodes[p] = {"stored": int(dd.get("confab_messages_stored_total", 0)),
                        "commits_per_s": round(c / secs, 1),
                        "mean_batch": round(dd["confab_commit_batch_size_sum"] / c, 2) if c else None,
                        "mean_commit_ms": round(dd["confab_commit_duration_seconds_sum"] / c * 1e3, 2) if c else None,
                        "indexed_per_s": round(dd.get("confab_search_indexed_total", 0) / secs)}
        res["nodes"] = nodes
        if "pg" in s1 and "pg" in s0:
            p0, p1 = s0["pg"], s1["pg"]
            res["pg"] = {"commits_per_s": round((p1["xact_commit"] - p0["xact_commit"]) / secs, 1),
                         "wal_bytes_per_msg": round((p1["wal_bytes"] - p0["wal_bytes"]) / msgs),
                         "wal_records_per_msg": round((p1["wal_records"] - p0["wal_records"]) / msgs, 2),
                         "wal_syncs_per_s": round((p1["wal_sync"] - p0["wal_sync"]) / secs, 1),
                         "checkpoints_in_window": p1["checkpoints"] - p0["checkpoints"],
                         "flush_lag_ms_max": round(max(s["pg"]["flush_lag_s"] for s in samples[a:b_ + 1]) * 1e3, 2),
                         "sync_state": sorted({s["pg"]["sync_state"] for s in samples[a:b_ + 1]})}
        if activity and activity.samples:
            # share of samples in which each writer connection was in each state / wait
            ws = [(t, rows) for t, rows in activity.samples if s0["t"] <= t <= s1["t"]]
            counts = collections.Counter()
            for _, rows in ws:
                for app, state, wtype, wev, cnt in rows:
                    counts[(app, state, f"{wtype}:{wev}" if wtype else "cpu/none")] += int(cnt)
            res["pg_activity"] = {"samples": len(ws),
                                  "per_sample": {" | ".join(k): round(v / len(ws), 3)
                                                 for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}}
    overlapped = res.get("other_cores", 0) > OTHER_LIMIT or before["loadavg1"] > LOAD_LIMIT
    res["overlapped"] = overlapped
    # small samples file: the per-second series
    with open(os.path.join(out, f"{tag}.samples.json"), "w") as f:
        json.dump([{k: s[k] for k in ("t", "stored", "cpu") if k in s} for s in samples], f, separators=(",", ":"))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("setups")
    ap.add_argument("users", type=int)
    ap.add_argument("rate", type=int)
    ap.add_argument("duration", type=int)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)) + "/raw")
    ap.add_argument("--perf", help="ROLE:SECS (node, n1, proxy, bench, pg_primary, pg_writer): perf record -g "
                                   "of that process for SECS from 10 s into the sending")
    ap.add_argument("--set", action="append", default=[], help="passed to every confab serve")
    ap.add_argument("--tag-suffix", default="")
    ap.add_argument("--no-rerun", action="store_true")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine (smoke tests)")
    a = ap.parse_args()
    setups = a.setups.split(",")
    for s in setups:
        if s not in ("embedded", "pg1", "n1", "n2", "n3"):
            sys.exit(f"unknown setup {s}")
    perf = None
    if a.perf:
        role, secs = a.perf.split(":")
        perf = (role, int(secs))
    os.makedirs(a.out, exist_ok=True)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    pair = None
    try:
        pair = start_pair()
        print(f"PostgreSQL primary :{PG_PRIMARY}, synchronous standby :{PG_STANDBY}", file=sys.stderr, flush=True)
        for rnd in range(a.runs):
            for setup in setups:
                for attempt in range(1 if a.no_rerun else 3):
                    tag = f"{setup}-u{a.users}-r{a.rate}-d{a.duration}{a.tag_suffix}-{time.strftime('%m%d-%H%M%S')}"
                    print(f"run {tag} (round {rnd + 1}, attempt {attempt + 1})", file=sys.stderr, flush=True)
                    res = one_run(pair, setup, a.users, a.rate, a.duration, a.out, tag, perf, a.set, a.no_wait)
                    res["perf"] = a.perf
                    res["suffix"] = a.tag_suffix
                    print(json.dumps(res), flush=True)
                    with open(os.path.join(a.out, "results.jsonl"), "a") as f:
                        f.write(json.dumps(res) + "\n")
                    if not res["overlapped"] or a.no_rerun:
                        break
                    print("  overlapped another load: run again", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for s in STARTED[::-1]:
            s.stop()
        shutil.rmtree(ROOT, ignore_errors=True)


if __name__ == "__main__":
    main()
