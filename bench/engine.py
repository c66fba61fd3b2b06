#!/usr/bin/env python3
"""The local (lock-file) engine's speed targets (issue 10), against its peers in
the same run:

  1. handoff with 1,000 waiters queued: p50 <= 1.15x the 10-waiter figure
  2. 500 idle holders: <= 0.05 CPU-s per 10 s
  3. -j1000 with 999 held vs -j2 with 1 held: <= 1.5x (whole command)
  4. handoff after exit and after kill -9: p50 <= 1.10x flock(1)'s

Usage: bench/engine.py QSEM STAMP WORKDIR [--quick] [--peer OTHER_QSEM]
(bench/files.sh runs it). --peer measures another qsem build (say, the one
before a change) beside it in the same run, for the handoff and -j1000 rows.
Prints a Markdown report on stdout; progress on stderr.
"""

import os
import signal
import statistics
import subprocess
import sys
import time

QSEM, STAMP, WORK = sys.argv[1], sys.argv[2], sys.argv[3]
QUICK = "--quick" in sys.argv
PEER = sys.argv[sys.argv.index("--peer") + 1] if "--peer" in sys.argv else None
LOCKS = os.path.join(WORK, "engine-locks")
ENV = dict(os.environ, QSEM_DIR=LOCKS)
DEVNULL = os.open(os.devnull, os.O_RDWR)
FLOCK = "/usr/bin/flock"
TRUE = "/bin/true"
IDS = iter(range(1_000_000))


def say(msg):
    print(f"engine: {msg}", file=sys.stderr, flush=True)


def now():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def spawn(argv):
    fa = [(os.POSIX_SPAWN_DUP2, DEVNULL, 0), (os.POSIX_SPAWN_DUP2, DEVNULL, 1),
          (os.POSIX_SPAWN_DUP2, DEVNULL, 2)]
    return os.posix_spawn(argv[0], argv, ENV, file_actions=fa)


def fresh(prefix):
    return f"{prefix}{next(IDS)}-{os.getpid()}"


def events(log):
    out = []
    if os.path.exists(log):
        for line in open(log):
            kind, pid, t = line.split()
            out.append((kind, int(pid), int(t)))
    return out


def wait_lines(log, n, limit=300):
    deadline = time.time() + limit
    while time.time() < deadline and len(events(log)) < n:
        time.sleep(0.01)


def wrap(tool, jid, job):
    if tool in ("qsem", "peer"):
        return [QSEM if tool == "qsem" else PEER, "--id", jid, "-j1", "--"] + job
    return [FLOCK, os.path.join(WORK, jid + ".flock")] + job


def queued(tool, jid):
    out = subprocess.run([QSEM if tool == "qsem" else PEER, "--status", "--json", "--id", jid],
                         env=ENV, capture_output=True, text=True).stdout
    at = out.find('"waiting":')
    return int(out[at + 10:].split(",")[0].split("}")[0]) if at >= 0 else 0


def p50(xs):
    return statistics.median(xs) if xs else float("nan")


def handoffs(tool, waiters, mode, measured):
    """`waiters` jobs queued at -j1 behind a holder; the first `measured`
    handoffs (end of one job -> start of the next), in ns."""
    jid = fresh("h")
    log = os.path.join(WORK, f"{jid}.log")
    job = [STAMP, log, "inf" if mode == "kill" else "20"]
    # The first holder stays until every waiter has queued, then exits.
    go = os.path.join(WORK, f"{jid}.go")
    first = job if mode == "kill" else [STAMP, log, f"until:{go}"]
    procs = [spawn(wrap(tool, jid, first))]
    wait_lines(log, 1)
    for i in range(waiters):
        procs.append(spawn(wrap(tool, jid, job)))
        if i % 50 == 49:
            time.sleep(0.05)
    # Let every waiter queue before the first release (their start-up would
    # otherwise compete with the handoffs measured).
    if tool == "flock":
        time.sleep(1 + waiters / 400)
    else:
        deadline = time.time() + 120
        while time.time() < deadline and queued(tool, jid) < waiters:
            time.sleep(0.1)
        time.sleep(0.5)
    if mode != "kill":
        open(go, "w").close()
    ends = {}
    if mode == "kill":
        seen = set()
        for _ in range(measured + 1):
            wait_lines(log, len(seen) + 1, 60)
            ev = [e for e in events(log) if e[0] == "S" and e[1] not in seen]
            if not ev:
                break
            pid = ev[0][1]
            seen.add(pid)
            time.sleep(0.02)
            ends[pid] = now()
            os.kill(pid, signal.SIGKILL)
    else:
        wait_lines(log, 2 * (measured + 1), 120)
    starts = sorted((t, pid) for k, pid, t in events(log) if k == "S")
    if mode != "kill":
        ends = {pid: t for k, pid, t in events(log) if k == "E"}
    lat = [starts[i][0] - ends[starts[i - 1][1]]
           for i in range(1, min(len(starts), measured + 1)) if starts[i - 1][1] in ends]
    # The rest: let them run through (no holding), then reap.
    for p in procs:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        os.waitpid(p, 0)
    return lat


def cpu_ns(pid):
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total


def idle_holders(n, windows):
    jid = fresh("idle")
    log = os.path.join(WORK, f"{jid}.log")
    procs = []
    for i in range(n):
        procs.append(spawn([QSEM, "--id", jid, f"-j{n}", "--", STAMP, log, "inf"]))
        if i % 50 == 49:
            time.sleep(0.05)
    wait_lines(log, n)
    t0 = time.time()
    res = []
    for start in windows:
        time.sleep(max(0, start - (time.time() - t0)))
        a = sum(cpu_ns(p) for p in procs)
        time.sleep(10)
        b = sum(cpu_ns(p) for p in procs)
        res.append((start, (b - a) / 1e9))
    for p in procs:
        os.kill(p, signal.SIGTERM)
    for p in procs:
        os.waitpid(p, 0)
    return res


def timed(argv):
    t0 = now()
    pid = spawn(argv)
    os.waitpid(pid, 0)
    return now() - t0


def scale(qsem, n, rounds):
    big, small = fresh("big"), fresh("small")
    log = os.path.join(WORK, f"{big}.log")
    procs = []
    for i in range(n - 1):
        procs.append(spawn([qsem, "--id", big, f"-j{n}", "--", STAMP, log, "inf"]))
        if i % 50 == 49:
            time.sleep(0.05)
    procs.append(spawn([qsem, "--id", small, "-j2", "--", STAMP, log, "inf"]))
    wait_lines(log, n)
    time.sleep(2)  # past the start-up's contention for the mutex
    s = {"big": [], "small": []}
    for _ in range(rounds):
        s["big"].append(timed([qsem, "--id", big, f"-j{n}", "--", TRUE]))
        s["small"].append(timed([qsem, "--id", small, "-j2", "--", TRUE]))
    for p in procs:
        os.kill(p, signal.SIGTERM)
    for p in procs:
        os.waitpid(p, 0)
    return p50(s["big"]), p50(s["small"])


def main():
    os.makedirs(LOCKS, exist_ok=True)
    out = []
    emit = out.append
    load = open("/proc/loadavg").read().split()[0]
    emit(f"### Local engine (bench/files.sh{' --quick' if QUICK else ''}; load average {load} at start)")
    emit("")
    emit("| target | measured | goal | met |")
    emit("|---|---|---|---|")

    many = 200 if QUICK else 1000
    say(f"handoff with 10 and {many} waiters")
    small = p50(sum((handoffs("qsem", 10, "exit", 10) for _ in range(1 if QUICK else 3)), []))
    big = p50(handoffs("qsem", many, "exit", 50))
    r = big / small
    emit(f"| handoff p50, {many} waiters queued / 10 queued | {big / 1e6:.2f} / {small / 1e6:.2f} ms = {r:.2f}x | <= 1.15x | {'yes' if r <= 1.15 else 'NO'} |")

    for mode in ["exit", "kill"]:
        say(f"handoff after {mode}, qsem and flock")
        n = 15 if QUICK else 40
        lat = {t: [] for t in ["qsem", "flock", "peer"] if t != "peer" or PEER}
        for _ in range(1 if QUICK else 3):
            for tool in lat:
                lat[tool] += handoffs(tool, n, mode, n)
        q, f = p50(lat["qsem"]), p50(lat["flock"])
        r = q / f
        emit(f"| handoff p50 after {mode}, qsem / flock(1) | {q / 1e6:.2f} / {f / 1e6:.2f} ms = {r:.2f}x | <= 1.10x | {'yes' if r <= 1.10 else 'NO'} |")
        if PEER:
            pp = p50(lat["peer"])
            emit(f"| (peer build) handoff p50 after {mode}, peer / flock(1) | {pp / 1e6:.2f} / {f / 1e6:.2f} ms = {pp / f:.2f}x | | |")

    n = 100 if QUICK else 500
    say(f"{n} idle holders")
    for start, cpu in idle_holders(n, [3] if QUICK else [3, 40]):
        emit(f"| {n} idle holders, CPU-s over 10 s from {start} s after all started | {cpu:.4f} | <= 0.05 | {'yes' if cpu <= 0.05 else 'NO'} |")

    n, rounds = (200, 20) if QUICK else (1000, 60)
    say(f"-j{n} with {n - 1} held")
    b, s = scale(QSEM, n, rounds)
    emit(f"| `-j{n}` with {n - 1} held / `-j2` with 1 held (whole command, p50) | {b / 1e6:.2f} / {s / 1e6:.2f} ms = {b / s:.2f}x | <= 1.5x | {'yes' if b / s <= 1.5 else 'NO'} |")
    if PEER:
        b, s = scale(PEER, n, rounds)
        emit(f"| (peer build) `-j{n}` with {n - 1} held / `-j2` with 1 held | {b / 1e6:.2f} / {s / 1e6:.2f} ms = {b / s:.2f}x | | |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
