#!/usr/bin/env python3
"""The etcd engine's speed on a loopback 3-member cluster (issue 13).

Starts its own cluster (Debian's etcd, data on tmpfs), then measures, in one
run: the handoff after a normal exit (the holder's job's last instant to the
waiter's job's first), for qsem and for `etcdctl lock` in alternation; the
wall time of an uncontended `qsem -- true`; and the CPU the cluster spends
while 100 qsem waiters wait. Prints Markdown.

Usage: bench/etcd.py QSEM STAMP [ROUNDS [OTHER_QSEM]]
    (STAMP: bench/stamp.rs compiled, e.g. rustc -O -o /tmp/stamp bench/stamp.rs;
    OTHER_QSEM, another build, e.g. an earlier commit's, is measured in the
    same rounds for the handoff and the uncontended job)
"""

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

QSEM, STAMP = sys.argv[1], sys.argv[2]
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 30
OTHER = sys.argv[4] if len(sys.argv) > 4 else None
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(work):
    ports = [(free_port(), free_port()) for _ in range(3)]
    initial = ",".join(f"n{i}=http://127.0.0.1:{p}" for i, (_, p) in enumerate(ports))
    procs = []
    for i, (client, peer) in enumerate(ports):
        procs.append(subprocess.Popen(
            ["etcd", "--name", f"n{i}", "--data-dir", f"{work}/n{i}",
             "--listen-client-urls", f"http://127.0.0.1:{client}",
             "--advertise-client-urls", f"http://127.0.0.1:{client}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", initial, "--initial-cluster-state", "new"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    endpoints = ",".join(f"127.0.0.1:{c}" for c, _ in ports)
    for _ in range(300):
        ok = subprocess.run(["etcdctl", f"--endpoints={endpoints}", "endpoint", "health"],
                            capture_output=True).returncode == 0
        if ok:
            return procs, endpoints
        time.sleep(0.1)
    sys.exit("the cluster did not start")


def stamps(log):
    s, e = {}, {}
    for line in open(log):
        kind, pid, ns = line.split()
        (s if kind == "S" else e)[pid] = int(ns)
    return s, e


def handoff(cmd_hold, cmd_wait, log, env):
    """One handoff: a holder whose job lasts 300 ms, a waiter queued behind it."""
    if os.path.exists(log):
        os.unlink(log)
    h = subprocess.Popen(cmd_hold(log), env=env)
    while not os.path.exists(log):
        time.sleep(0.005)
    time.sleep(0.05)  # the waiter queues while the job still runs
    w = subprocess.Popen(cmd_wait(log), env=env)
    h.wait()
    w.wait()
    s, e = stamps(log)
    # The holder's job ends first; the waiter's starts last.
    return (max(s.values()) - min(e.values())) / 1e6


def cpu_of(pids):
    total = 0
    for pid in pids:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        total += int(f[11]) + int(f[12])
    return total / TICK


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main():
    work = tempfile.mkdtemp(prefix="qsem-etcd-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    procs, endpoints = start_cluster(work)
    env = dict(os.environ, QSEM_BACKEND=f"etcd://{endpoints}", QSEM_DIR=f"{work}/locks")
    etcdctl = ["etcdctl", f"--endpoints={endpoints}"]
    try:
        log = f"{work}/log"
        builds = [QSEM] + ([OTHER] if OTHER else [])
        ours = {b: [] for b in builds}
        theirs = []
        for r in range(ROUNDS):
            for b in builds:
                ours[b].append(handoff(lambda l: [b, "--id", "h", "--", STAMP, l, "300"],
                                       lambda l: [b, "--id", "h", "--", STAMP, l, "0"], log, env))
            theirs.append(handoff(lambda l: etcdctl + ["lock", "h", STAMP, l, "300"],
                                  lambda l: etcdctl + ["lock", "h", STAMP, l, "0"], log, env))
        print("| handoff after a normal exit, 1 waiter | p50 | p90 |")
        print("|---|---|---|")
        for b in builds:
            print(f"| {b} --backend etcd:// | {pct(ours[b], 50):.1f} ms | {pct(ours[b], 90):.1f} ms |")
        print(f"| etcdctl lock | {pct(theirs, 50):.1f} ms | {pct(theirs, 90):.1f} ms |")
        print()
        walls = {b: [] for b in builds}
        local = []
        for _ in range(ROUNDS * 2):
            for b in builds:
                t = time.monotonic()
                subprocess.run([b, "--id", "u", "--", "true"], env=env, check=True)
                walls[b].append((time.monotonic() - t) * 1e3)
            t = time.monotonic()
            subprocess.run([QSEM, "--id", "u", "--", "true"], env=dict(env, QSEM_BACKEND=""), check=True)
            local.append((time.monotonic() - t) * 1e3)
        for b in builds:
            print(f"uncontended `{b} -- true`, wall, p50: {pct(walls[b], 50):.1f} ms "
                  f"(p90 {pct(walls[b], 90):.1f} ms)")
        print(f"the same on lock files, interleaved: {pct(local, 50):.1f} ms")
        print()
        pids = [p.pid for p in procs]
        idle = 10.0
        base0 = cpu_of(pids)
        time.sleep(idle)
        base = (cpu_of(pids) - base0) / idle
        holder = subprocess.Popen([QSEM, "--id", "idle", "--", "sleep", "600"], env=env)
        time.sleep(0.5)
        waiters = [subprocess.Popen([QSEM, "--id", "idle", "--", "true"], env=env) for _ in range(100)]
        for _ in range(600):
            out = subprocess.run([QSEM, "--status", "--id", "idle"], env=env,
                                 capture_output=True, text=True).stdout
            if "100 waiting" in out:
                break
            time.sleep(0.1)
        time.sleep(2)
        c0 = cpu_of(pids)
        time.sleep(idle * 3)
        busy = (cpu_of(pids) - c0) / (idle * 3)
        print(f"cluster CPU (3 members): idle {base:.4f} cores; with 100 waiters "
              f"{busy:.4f} cores, so the waiters cost {busy - base:.4f} cores")
        for w in waiters:
            w.send_signal(signal.SIGTERM)
        holder.send_signal(signal.SIGTERM)
        for p in waiters + [holder]:
            p.wait()
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)


main()
