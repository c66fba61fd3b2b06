#!/usr/bin/env python3
"""The PostgreSQL engine against the lock-file engine, in one run (issue 11).

Starts a throwaway cluster of its own (scram-sha-256 over TCP on 127.0.0.1,
as a fleet would connect), then measures, interleaving the two engines where
it compares them:

  handoff   p50 from a holder's job ending to the next job starting, with 1
            and with 50 waiters queued, PostgreSQL and lock files
  kill9     p50 from `kill -9` of the holding qsem to the waiter's job start
  job       wall time of an uncontended `qsem -- true`, and the server's CPU
            per job (the postmaster's reaped children, before and after)
  floor     what one new session costs without qsem: `pgbench -C` running
            `SELECT 1` on a new connection each time, wall and server CPU
            per connection, with scram-sha-256 and with trust (a role that
            the throwaway cluster lets in without a password)
  idle      server CPU of 100 idle waiters over 10 s, in cores: on one host
            (one head on the server), and on 100 hosts (100 heads, each with
            a lock directory of its own)
  busy      how busy 3 slots are with 60 waiters running 0.3 s jobs (-j3)

Usage: bench/postgres.py QSEM [--quick] [--trust] [--handoff]   (as root:
the server runs as `postgres`). Prints a Markdown report on stdout,
progress on stderr. `--trust` runs qsem as the role that logs in without a
password (no SCRAM exchange: what peer or certificate authentication
costs), `--handoff` measures the handoffs only.

       bench/postgres.py QSEM --versus OTHER [--runs N]
times only the uncontended job, N (200) times each, QSEM and OTHER taking
turns on one cluster, and the server's CPU per job of each: two builds
compared in the same minutes.
"""

import glob
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

QSEM = os.path.abspath(sys.argv[1])
QUICK = "--quick" in sys.argv
TRUST = "--trust" in sys.argv
HANDOFF_ONLY = "--handoff" in sys.argv


def option(name, default):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


VERSUS = option("--versus", None)
BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
WORK = tempfile.mkdtemp(prefix="qsem-pg-bench-", dir="/tmp")
PASSWORD = "bench-pw"
TRUSTED = "bench_trusted"
HZ = os.sysconf("SC_CLK_TCK")


def say(*a):
    print(*a, file=sys.stderr, flush=True)


def as_postgres(*cmd, **kw):
    return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True,
                          capture_output=True, text=True, **kw)


def start_cluster():
    os.chown(WORK, *postgres_ids())
    pw = os.path.join(WORK, "pw")
    with open(pw, "w") as f:
        f.write(PASSWORD)
    os.chown(pw, *postgres_ids())
    data = os.path.join(WORK, "data")
    as_postgres(f"{BIN}/initdb", "-D", data, "-U", "postgres", "--auth-local=trust",
                "--auth-host=scram-sha-256", "--no-sync", f"--pwfile={pw}")
    hba = os.path.join(data, "pg_hba.conf")
    with open(hba) as f:
        rules = f.read()
    with open(hba, "w") as f:
        f.write(f"host all {TRUSTED} 127.0.0.1/32 trust\n" + rules)
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    opts = (f"-p {port} -k {WORK} -c listen_addresses=127.0.0.1 -c max_connections=200 "
            "-c fsync=off -c shared_buffers=32MB")
    as_postgres(f"{BIN}/pg_ctl", "-D", data, "-o", opts, "-l", f"{WORK}/log", "-w", "start")
    pid = int(open(os.path.join(data, "postmaster.pid")).readline())
    return data, port, pid


def postgres_ids():
    import pwd
    p = pwd.getpwnam("postgres")
    return p.pw_uid, p.pw_gid


def cpu_of(pid, children=True):
    """utime+stime (+ reaped children's) of pid, in seconds."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    ticks = int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if children else 0)
    return ticks / HZ


def server_cpu(postmaster):
    """The server's CPU so far: the postmaster, its reaped children, and the
    children still running."""
    total = cpu_of(postmaster)
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                st = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
                if int(st[1]) == postmaster:
                    total += cpu_of(int(p), children=False)
            except OSError:
                pass
    return total


def engine_env(engine, locks, url):
    env = dict(os.environ, QSEM_DIR=locks)
    env.pop("QSEM_BACKEND", None)
    if engine == "postgres":
        env["QSEM_BACKEND"] = url
    return env


def wait_until(cond, limit=30):
    end = time.time() + limit
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def handoffs(engine, url, waiters, rounds):
    """Handoff times (ms): each job logs its start and end; with waiters
    queued behind a holder, each start follows the previous end."""
    gaps = []
    for r in range(rounds):
        d = tempfile.mkdtemp(dir=WORK)
        env = engine_env(engine, os.path.join(d, "locks"), url)
        log = os.path.join(d, "log")
        job = f"echo s $(date +%s%N) >> {log}; sleep 0.05; echo e $(date +%s%N) >> {log}"
        first = subprocess.Popen([QSEM, "--id", "h", "--", "sh", "-c",
                                  f"touch {d}/go; sleep 0.5; " + job], env=env)
        wait_until(lambda: os.path.exists(f"{d}/go"))
        procs = [first]
        for i in range(waiters):
            procs.append(subprocess.Popen([QSEM, "--id", "h", "--", "sh", "-c", job], env=env))
            time.sleep(0.01)
        for p in procs:
            p.wait()
        events = sorted((int(t), k) for k, t in (l.split() for l in open(log)))
        end = None
        for t, k in events:
            if k == "e":
                end = t
            elif end is not None:
                gaps.append((t - end) / 1e6)
                end = None
    return gaps


def kill9(url, rounds):
    gaps = []
    for r in range(rounds):
        d = tempfile.mkdtemp(dir=WORK)
        env = engine_env("postgres", os.path.join(d, "locks"), url)
        holder = subprocess.Popen([QSEM, "--id", "k9", "--", "sh", "-c",
                                   f"echo $$ > {d}/job; exec sleep 60"], env=env)
        wait_until(lambda: os.path.exists(f"{d}/job") and open(f"{d}/job").read().strip())
        # The waiter's own qsem locally queues nothing: it is on another "host".
        wenv = engine_env("postgres", os.path.join(d, "locks2"), url)
        waiter = subprocess.Popen([QSEM, "--id", "k9", "--", "sh", "-c",
                                   f"date +%s%N > {d}/start"], env=wenv)
        time.sleep(0.6)
        t0 = time.time_ns()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        waiter.wait()
        gaps.append((int(open(f"{d}/start").read()) - t0) / 1e6)
        os.kill(int(open(f"{d}/job").read()), signal.SIGKILL)
    return gaps


def uncontended(url, postmaster, n):
    d = tempfile.mkdtemp(dir=WORK)
    env = engine_env("postgres", os.path.join(d, "locks"), url)
    walls = []
    cpu0 = server_cpu(postmaster)
    for i in range(n):
        t = time.perf_counter()
        subprocess.run([QSEM, "--id", "u", "--", "true"], env=env, check=True)
        walls.append((time.perf_counter() - t) * 1000)
    time.sleep(0.5)
    return walls, (server_cpu(postmaster) - cpu0) / n * 1000


def floor(port, postmaster, n):
    """Per new connection running `SELECT 1` (pgbench -C): wall ms (its
    "average connection time" plus the query) and server CPU ms, with
    scram-sha-256 and with trust; None without pgbench."""
    pgbench = shutil.which("pgbench") or shutil.which("pgbench", path=BIN)
    if not pgbench:
        return None
    script = os.path.join(WORK, "select1.sql")
    with open(script, "w") as f:
        f.write("SELECT 1;\n")
    trusted_role(port)
    out = {}
    for user in ["postgres", TRUSTED]:
        env = dict(os.environ, PGPASSWORD=PASSWORD)
        cpu0 = server_cpu(postmaster)
        t = time.perf_counter()
        subprocess.run([pgbench, "-h", "127.0.0.1", "-p", str(port), "-U", user, "-n", "-C",
                        "-f", script, "-t", str(n), "postgres"], env=env, check=True,
                       capture_output=True)
        wall = (time.perf_counter() - t) / n * 1000
        time.sleep(0.5)
        out[user] = (wall, (server_cpu(postmaster) - cpu0) / n * 1000)
    return out["postgres"], out[TRUSTED]


def trusted_role(port):
    """The role that logs in without a password, once."""
    as_postgres(f"{BIN}/psql", "-h", WORK, "-p", str(port), "-U", "postgres", "-qc",
                f"DO $$BEGIN CREATE ROLE {TRUSTED} LOGIN; "
                "EXCEPTION WHEN duplicate_object THEN NULL; END$$")


def idle(url, postmaster, n, secs, hosts=1):
    d = tempfile.mkdtemp(dir=WORK)
    env = engine_env("postgres", os.path.join(d, "locks"), url)
    holder = subprocess.Popen([QSEM, "--id", "idle", "--", "sh", "-c",
                               f"touch {d}/go; sleep 600"], env=env)
    wait_until(lambda: os.path.exists(f"{d}/go"))
    # Waiter i runs on "host" i % hosts: a lock directory of its own.
    waiters = [subprocess.Popen([QSEM, "--id", "idle", "--", "true"],
                                env=engine_env("postgres", os.path.join(d, f"host{i % hosts}"),
                                               url))
               for i in range(n)]
    time.sleep(3)
    cpu0 = server_cpu(postmaster)
    time.sleep(secs)
    cores = (server_cpu(postmaster) - cpu0) / secs
    for p in [holder, *waiters]:
        p.send_signal(signal.SIGTERM)
    for p in [holder, *waiters]:
        p.wait()
    return cores


def busy(engine, url, waiters, jobs, secs):
    d = tempfile.mkdtemp(dir=WORK)
    env = engine_env(engine, os.path.join(d, "locks"), url)
    log = os.path.join(d, "log")
    job = f"echo s $(date +%s%N) >> {log}; sleep {secs}; echo e $(date +%s%N) >> {log}"
    procs = [subprocess.Popen([QSEM, "--id", "b", f"-j{jobs}", "--", "sh", "-c", job], env=env)
             for _ in range(waiters)]
    for p in procs:
        p.wait()
    ev = [(k, int(t)) for k, t in (l.split() for l in open(log))]
    starts = [t for k, t in ev if k == "s"]
    ends = [t for k, t in ev if k == "e"]
    ran = sum(e - s for s, e in zip(sorted(starts), sorted(ends)))
    return ran / (jobs * (max(ends) - min(starts)))


def p50(xs):
    return statistics.median(xs)


def main():
    data, port, postmaster = start_cluster()
    url = f"postgres://postgres:{PASSWORD}@127.0.0.1:{port}/postgres"
    if TRUST:
        trusted_role(port)
        url = f"postgres://{TRUSTED}@127.0.0.1:{port}/postgres"
    say("cluster up; waiting out qsem's grace after a server start")
    time.sleep(7)
    rounds = 3 if QUICK else 10
    try:
        print("| measure | PostgreSQL | lock files | ratio |")
        print("|---|---|---|---|")
        for w, r in [(1, rounds * 2), (50, 1 if QUICK else 2)]:
            pg, fl = [], []
            for _ in range(r):
                pg += handoffs("postgres", url, w, 1)
                fl += handoffs("files", url, w, 1)
            print(f"| handoff p50, {w} waiter(s) ({len(pg)} samples) | {p50(pg):.2f} ms "
                  f"| {p50(fl):.2f} ms | {p50(pg) / p50(fl):.2f}x |")
        if HANDOFF_ONLY:
            return
        k = kill9(url, rounds)
        print(f"| handoff after kill -9 of the holder, p50 ({len(k)} samples) | "
              f"{p50(k):.0f} ms | | |")
        walls, cpu = uncontended(url, postmaster, 20 if QUICK else 100)
        print(f"| uncontended `qsem -- true`, wall p50 | {p50(walls):.2f} ms | | |")
        print(f"| server CPU per uncontended job | {cpu:.2f} ms | | |")
        fl = floor(port, postmaster, 50 if QUICK else 200)
        if fl:
            for (wall, cpu), auth in zip(fl, ["scram-sha-256", "trust"]):
                print(f"| floor: new connection + `SELECT 1` ({auth}), wall | {wall:.2f} ms "
                      f"| | server CPU {cpu:.2f} ms |")
        secs = 5 if QUICK else 10
        cores = idle(url, postmaster, 100, secs)
        print(f"| server CPU of 100 idle waiters on one host | {cores:.4f} cores | | |")
        cores = idle(url, postmaster, 100, secs, hosts=100)
        print(f"| server CPU of 100 idle waiters on 100 hosts | {cores:.4f} cores | | |")
        b_pg = busy("postgres", url, 60, 3, 0.3)
        b_fl = busy("files", url, 60, 3, 0.3)
        print(f"| slots busy, 60 waiters, -j3, 0.3 s jobs | {b_pg * 100:.1f}% "
              f"| {b_fl * 100:.1f}% | |")
    finally:
        as_postgres(f"{BIN}/pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(WORK, ignore_errors=True)


def versus(url, postmaster, runs):
    """Uncontended jobs of QSEM and VERSUS in turns: wall p50 and server
    CPU per job of each."""
    d = tempfile.mkdtemp(dir=WORK)
    env = engine_env("postgres", os.path.join(d, "locks"), url)
    binaries = [QSEM, os.path.abspath(VERSUS)]
    walls = {b: [] for b in binaries}
    cpu = {b: 0.0 for b in binaries}
    for b in binaries:
        subprocess.run([b, "--id", "u", "--", "true"], env=env, check=True)
    for _ in range(runs):
        for b in binaries:
            cpu0 = server_cpu(postmaster)
            t = time.perf_counter()
            subprocess.run([b, "--id", "u", "--", "true"], env=env, check=True)
            walls[b].append((time.perf_counter() - t) * 1000)
            # The server process's exit is part of the job's cost.
            time.sleep(0.02)
            cpu[b] += server_cpu(postmaster) - cpu0
    print("| build | uncontended wall p50 | p10 | p90 | server CPU per job |")
    print("|---|---|---|---|---|")
    for b in binaries:
        w = sorted(walls[b])
        print(f"| {b} | {p50(w):.2f} ms | {w[len(w) // 10]:.2f} ms | "
              f"{w[len(w) * 9 // 10]:.2f} ms | {cpu[b] / runs * 1000:.2f} ms |")


if VERSUS:
    data, port, postmaster = start_cluster()
    try:
        say("cluster up; waiting out qsem's grace after a server start")
        time.sleep(7)
        versus(f"postgres://postgres:{PASSWORD}@127.0.0.1:{port}/postgres", postmaster,
               int(option("--runs", "200")))
    finally:
        as_postgres(f"{BIN}/pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(WORK, ignore_errors=True)
else:
    main()
