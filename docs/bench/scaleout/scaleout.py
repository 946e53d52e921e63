#!/usr/bin/env python3
"""Scale-out benchmark of issue 9: confab nodes behind `confab proxy`.

One run = fresh data dirs, start the processes, run one `confab bench` step,
sample every process's CPU (utime+stime from /proc/PID/stat) and RSS and the
nodes' `confab_messages_stored_total` once a second, stop everything.

    scaleout.py SETUP USERS RATE DURATION [--runs 3] [--pin] [--out DIR]

SETUP: plain (one `confab serve`, no cluster, no proxy) or n1 / n2 / n3
(1, 2 or 3 nodes behind one proxy). --pin: nodes on core 1, proxy and
driver on core 0 (plain: node on core 1, driver on core 0).

CPU per message is taken over the sending window only: the samples in which
the nodes' stored counter grows, minus 3 s at each end (signups, room
creation, drain and the history check are outside it).
"""
import argparse, json, os, re, shutil, signal, subprocess, sys, time, urllib.request

BIN = os.environ.get("CONFAB_BIN", "/work/main/target/release/confab")
ROOT = "/tmp/sobench"
NODE_PORTS = [19181, 19182, 19183]
PROXY_PORT, PLAIN_PORT = 19189, 19190
TICK = os.sysconf("SC_CLK_TCK")
SECRET = "0123456789abcdef0123456789abcdef-bench"


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14, 15 (utime, stime)


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        kb = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
    return kb / 1024


def busy_ticks():  # all CPUs: user+nice+system+irq+softirq+steal
    f = open("/proc/stat").readline().split()[1:]
    return sum(int(x) for i, x in enumerate(f) if i not in (3, 4, 8, 9))


def wait_idle(limit=0.15, timeout=45):
    """Wait until the machine is quiet (another session's build would skew the CPU numbers)."""
    t0, quiet = time.time(), 0
    while time.time() - t0 < timeout and quiet < 3:  # three quiet 5 s windows in a row
        b0 = busy_ticks(); time.sleep(5); cores = (busy_ticks() - b0) / TICK / 5
        quiet = quiet + 1 if cores < limit else 0
        if not quiet:
            print(f"machine busy ({cores:.2f} cores), waiting", file=sys.stderr, flush=True)


def stored(port):
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except Exception:
        return None
    m = re.search(r"^confab_messages_stored_total(?:\{[^}]*\})? (\S+)", text, re.M)
    return int(float(m.group(1))) if m else 0


def start(cmd, cwd, log, core=None):
    if core is not None:
        cmd = ["taskset", "-c", str(core)] + cmd
    out = open(os.path.join(cwd, log), "w")
    p = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    for _ in range(100):
        time.sleep(0.1)
        if "listening on" in open(os.path.join(cwd, log)).read():
            return p
    sys.exit(f"{cmd} did not start; see {cwd}/{log}")


def one_run(setup, users, rate, duration, pin, out, tag):
    wait_idle()
    d = os.path.join(ROOT, tag)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    node_core, front_core = (1, 0) if pin else (None, None)
    procs = {}  # role -> Popen
    if setup == "plain":
        procs["node"] = start([BIN, "serve", "--listen", f"127.0.0.1:{PLAIN_PORT}", "--data-dir", "d"],
                              d, "node.log", node_core)
        url, node_ports = f"http://127.0.0.1:{PLAIN_PORT}", [PLAIN_PORT]
    else:
        n = int(setup[1:])
        nodes = ", ".join(f'"n{i+1}=127.0.0.1:{NODE_PORTS[i]}"' for i in range(n))
        with open(os.path.join(d, "cluster.toml"), "w") as f:
            f.write(f'[cluster]\ncluster_secret = "{SECRET}"\ncluster_nodes = [{nodes}]\n')
        for i in range(n):
            procs[f"n{i+1}"] = start([BIN, "serve", "--config", "cluster.toml", "--node", f"n{i+1}",
                                      "--data-dir", f"d{i+1}"], d, f"n{i+1}.log", node_core)
        procs["proxy"] = start([BIN, "proxy", "--config", "cluster.toml", "--listen",
                                f"127.0.0.1:{PROXY_PORT}"], d, "proxy.log", front_core)
        url, node_ports = f"http://127.0.0.1:{PROXY_PORT}", NODE_PORTS[:n]
        for _ in range(50):  # every link up
            st = urllib.request.urlopen(url + "/api/v1/status", timeout=2).read().decode()
            if st.count('"up"') >= n:
                break
            time.sleep(0.2)
        else:
            sys.exit(f"links not up: {st}")
    bench_cmd = [BIN, "bench", "--url", url, "--users", str(users), "--rate", str(rate),
                 "--duration", str(duration), "--json", os.path.join(out, f"{tag}.bench.json")]
    if front_core is not None:
        bench_cmd = ["taskset", "-c", str(front_core)] + bench_cmd
    bench = subprocess.Popen(bench_cmd, stdout=subprocess.PIPE, stderr=open(os.path.join(d, "bench.err"), "w"),
                             text=True)
    pids = {r: p.pid for r, p in procs.items()}
    pids["bench"] = bench.pid
    samples = []
    while bench.poll() is None:
        t = time.time()
        try:
            s = {"t": t, "busy": busy_ticks(), "stored": sum(stored(p) or 0 for p in node_ports),
                 "cpu": {r: cpu_ticks(p) for r, p in pids.items()},
                 "rss": {r: rss_mb(p) for r, p in pids.items()}}
            samples.append(s)
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(max(0, 1.0 - (time.time() - t)))
    row = bench.stdout.read().strip()
    for p in procs.values():
        p.send_signal(signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
    shutil.rmtree(d, ignore_errors=True)

    # sending window: from the first to the last sample where the counter grew, trimmed 3 s each end
    grow = [i for i in range(1, len(samples)) if samples[i]["stored"] > samples[i - 1]["stored"]]
    a, b = grow[0] + 3, grow[-1] - 3
    s0, s1 = samples[a], samples[b]
    msgs = s1["stored"] - s0["stored"]
    secs = s1["t"] - s0["t"]
    us = {r: (s1["cpu"][r] - s0["cpu"][r]) / TICK * 1e6 / msgs for r in pids}
    cores = {r: (s1["cpu"][r] - s0["cpu"][r]) / TICK / secs for r in pids}
    mine = sum(s1["cpu"][r] - s0["cpu"][r] for r in pids)
    other = (s1["busy"] - s0["busy"] - mine) / TICK / secs  # CPU of everything else (incl. softirq)
    res = {"tag": tag, "setup": setup, "users": users, "rate": rate, "duration": duration, "pin": pin,
           "bench_row": row, "window_s": round(secs, 1), "window_msgs": msgs,
           "msgs_per_s": round(msgs / secs), "cpu_us_per_msg": {r: round(v, 1) for r, v in us.items()},
           "cores": {r: round(v, 3) for r, v in cores.items()},
           "other_cores": round(other, 3),
           "rss_mb_end_of_window": {r: round(v, 1) for r, v in s1["rss"].items()},
           "rss_mb_max": {r: round(max(s["rss"][r] for s in samples), 1) for r in pids}}
    with open(os.path.join(out, f"{tag}.samples.json"), "w") as f:
        json.dump(samples, f)
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("setup", choices=["plain", "n1", "n2", "n3"])
    ap.add_argument("users", type=int)
    ap.add_argument("rate", type=int)
    ap.add_argument("duration", type=int)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pin", action="store_true")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)) + "/raw")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for i in range(a.runs):
        tag = f"{a.setup}-u{a.users}-r{a.rate}{'-pin' if a.pin else ''}-{time.strftime('%H%M%S')}"
        res = one_run(a.setup, a.users, a.rate, a.duration, a.pin, a.out, tag)
        print(json.dumps(res), flush=True)
        with open(os.path.join(a.out, "results.jsonl"), "a") as f:
            f.write(json.dumps(res) + "\n")
