#!/usr/bin/env python3
"""qsem against its peers, in one run on one machine (issue 3).

Run through bench/run.sh, which installs the peers and builds the binaries.
Every comparison is taken in the same run, interleaved where it can be, and
reported as medians and ratios, because the machine it was written for is
small and shared. Writes a Markdown report to stdout (and progress to stderr).

Usage: bench.py QSEM STAMP WORKDIR [--quick] [--only SECTION,...]
"""

import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

QSEM, STAMP, WORK = sys.argv[1], sys.argv[2], sys.argv[3]
QUICK = "--quick" in sys.argv
ONLY = None
STATIC = sys.argv[sys.argv.index("--static") + 1] if "--static" in sys.argv else None
if "--only" in sys.argv:
    ONLY = set(sys.argv[sys.argv.index("--only") + 1].split(","))

LOCKS = os.path.join(WORK, "locks")
SEMHOME = os.path.join(WORK, "semhome")  # GNU sem's ~/.parallel, kept apart
ENV = dict(os.environ, QSEM_DIR=LOCKS, HOME=SEMHOME)
os.makedirs(os.path.join(SEMHOME, ".parallel"), exist_ok=True)
open(os.path.join(SEMHOME, ".parallel", "will-cite"), "a").close()
DEVNULL = os.open(os.devnull, os.O_RDWR)
FLOCK = shutil.which("flock")
SEM = shutil.which("sem")
TRUE = shutil.which("true")
HELP = subprocess.run([QSEM, "--help"], capture_output=True, text=True).stdout
HAS_BG = "--bg" in HELP and "--wait-all" in HELP

out = []  # the Markdown report


def say(*a):
    print(*a, file=sys.stderr, flush=True)


def emit(line=""):
    out.append(line)
    print(line, flush=True)


def now():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def spawn(argv, stdout=DEVNULL, stderr=DEVNULL):
    fa = [(os.POSIX_SPAWN_DUP2, DEVNULL, 0), (os.POSIX_SPAWN_DUP2, stdout, 1),
          (os.POSIX_SPAWN_DUP2, stderr, 2)]
    return os.posix_spawn(argv[0], argv, ENV, file_actions=fa)


def run_timed(argv):
    """Wall time of one run (spawn to reap), in ns, and the child's rusage."""
    t0 = now()
    pid = spawn(argv)
    _, status, ru = os.wait4(pid, 0)
    t1 = now()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv} failed: {status}")
    return t1 - t0, ru


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ms(ns):
    return f"{ns / 1e6:.3f}"


def loadavg():
    return open("/proc/loadavg").read().split()[0]


def section(name):
    return ONLY is None or name in ONLY


def fresh_id(prefix):
    return f"{prefix}{os.getpid()}x{random.randrange(1 << 30)}"


# 1. Per-job overhead ---------------------------------------------------------

def overhead():
    emit("## 1. Per-job overhead")
    emit()
    lock = os.path.join(WORK, "flockfile")
    sid = fresh_id("b")
    cmds = {
        "true": [TRUE],
        "flock FILE true": [FLOCK, lock, "true"],
        "qsem --id b -j2 -- true": [QSEM, "--id", sid, "-j2", "--", "true"],
        "sem --fg --id b -j2 true": [SEM, "--fg", "--id", sid, "-j2", "true"],
    }
    if STATIC:
        cmds["qsem, dynamic build (cargo build --release)"] = [STATIC, "--id", sid, "-j2", "--", "true"]
    rounds = 60 if QUICK else 800
    sem_every = 20
    samples = {k: [] for k in cmds}
    cpu = {k: [] for k in cmds}  # user+system CPU of the command and its child
    paired = {k: [] for k in cmds}  # X - true, within one round
    for argv in cmds.values():  # warm up caches and lock files
        run_timed(argv)
    la = [loadavg()]
    for r in range(rounds):
        keys = [k for k in cmds if not k.startswith("sem") or r % sem_every == 0]
        random.shuffle(keys)
        got = {}
        for k in keys:
            wall, ru = run_timed(cmds[k])
            got[k] = wall
            samples[k].append(wall)
            cpu[k].append(int((ru.ru_utime + ru.ru_stime) * 1e9))
        for k in keys:
            paired[k].append(got[k] - got["true"])
    la.append(loadavg())
    med = {k: statistics.median(v) for k, v in samples.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    pmed = {k: statistics.median(v) for k, v in paired.items()}
    base = med["true"]
    ov = {k: med[k] - base for k in cmds}
    emit(f"{rounds} interleaved rounds in random order (GNU sem: every {sem_every}th round); "
         f"wall time from posix_spawn to wait4, load average {la[0]} -> {la[1]}.")
    emit()
    emit("| command | runs | median ms | p10 ms | p90 ms | overhead over `true` ms | vs flock overhead |")
    emit("|---|---|---|---|---|---|---|")
    for k, v in samples.items():
        rel = "" if k == "true" else f"{ov[k] / ov['flock FILE true']:.2f}x"
        emit(f"| `{k}` | {len(v)} | {ms(med[k])} | {ms(pct(v, 10))} | {ms(pct(v, 90))} | "
             f"{ms(ov[k]) if k != 'true' else '-'} | {rel} |")
    q, f, s = ov["qsem --id b -j2 -- true"], ov["flock FILE true"], ov["sem --fg --id b -j2 true"]
    emit()
    emit("The same runs, two noise-robust views: the median of the per-round difference "
         "(X - `true` in the same round), and CPU time (user+system of the command and its "
         "child, from wait4), which waiting in the run queue does not inflate.")
    emit()
    emit("| command | paired overhead ms | vs flock | CPU ms | CPU overhead ms | vs flock |")
    emit("|---|---|---|---|---|---|")
    cf = cmed["flock FILE true"] - cmed["true"]
    for k in cmds:
        if k == "true":
            emit(f"| `true` | - | | {ms(cmed[k])} | - | |")
            continue
        co = cmed[k] - cmed["true"]
        emit(f"| `{k}` | {ms(pmed[k])} | {pmed[k] / pmed['flock FILE true']:.2f}x | "
             f"{ms(cmed[k])} | {ms(co)} | {co / cf:.2f}x |")
    emit()
    emit(f"- qsem overhead / flock overhead = **{q / f:.2f}x** (target <= 1.15x)")
    emit(f"- GNU sem overhead / qsem overhead = **{s / q:.0f}x** (target >= 40x)")
    if STATIC:
        st = ov["qsem, dynamic build (cargo build --release)"]
        emit(f"- the same qsem linked dynamically: **{st / f:.2f}x** flock's overhead, "
             f"{s / st:.0f}x below GNU sem's")
    emit()
    res = {"ov_ratio_flock": q / f, "ov_ratio_sem": s / q}
    if STATIC:
        res["static_ratio"] = ov["qsem, dynamic build (cargo build --release)"] / f
    return res


# 2. Handoff latency ----------------------------------------------------------

def parse_log(path):
    ev = []
    for line in open(path):
        kind, pid, t = line.split()
        ev.append((kind, int(pid), int(t)))
    return ev


def wrap(tool, jid, job):
    if tool == "qsem":
        return [QSEM, "--id", jid, "-j1", "--"] + job
    if tool == "flock":
        return [FLOCK, os.path.join(WORK, jid + ".flock")] + job
    if tool == "sem":
        return [SEM, "--fg", "--id", jid, "-j1"] + job
    raise ValueError(tool)


def handoff_run(tool, mode, n, hold_ms):
    """n jobs at -j1 queued behind one another; returns [(latency, waited)] in ns."""
    jid = fresh_id("h")
    log = os.path.join(WORK, f"handoff-{tool}-{mode}.log")
    if os.path.exists(log):
        os.unlink(log)
    job = [STAMP, log, "inf" if mode == "kill" else str(hold_ms)]
    wrappers = []
    spawned = {}
    # The first job must hold before the others queue.
    wrappers.append(spawn(wrap(tool, jid, job)))
    while not os.path.exists(log) or os.path.getsize(log) == 0:
        time.sleep(0.002)
    for _ in range(n - 1):
        t = now()
        wrappers.append(spawn(wrap(tool, jid, job)))
        spawned[wrappers[-1]] = t
        time.sleep(0.01)
    kills = []
    if mode == "kill":
        seen = set()
        deadline = time.time() + n * 5 + 60
        while len(seen) < n and time.time() < deadline:
            ev = parse_log(log)
            new = [e for e in ev if e[0] == "S" and e[1] not in seen]
            if not new:
                time.sleep(0.003)
                continue
            for _, pid, _ in new:
                seen.add(pid)
                time.sleep(hold_ms / 1000)
                t = now()
                os.kill(pid, signal.SIGKILL)
                kills.append((pid, t))
    for w in wrappers:
        os.waitpid(w, 0)
    ev = parse_log(log)
    starts = sorted((t, pid) for k, pid, t in ev if k == "S")
    ends = {pid: t for k, pid, t in ev if k == "E"}
    if mode == "kill":
        ends = dict(kills)
    # Map each job's start back to the time its wrapper was spawned: the job is
    # the wrapper's descendant, so use arrival order instead (spawned 10 ms
    # apart, served FIFO by qsem; for peers that are not FIFO, "waited" is
    # measured from the earliest unserved spawn, a lower bound).
    spawn_times = sorted(spawned.values())
    res = []
    for i in range(1, len(starts)):
        prev_pid = starts[i - 1][1]
        if prev_pid not in ends:
            continue
        lat = starts[i][0] - ends[prev_pid]
        waited = starts[i][0] - spawn_times[i - 1] if i - 1 < len(spawn_times) else 0
        res.append((lat, waited))
    return res


def handoff():
    emit("## 2. Handoff latency at -j1")
    emit()
    n = 15 if QUICK else 60
    hold = 100
    emit(f"{n} jobs queued at -j1 (spawned 10 ms apart behind a holder); each job is a tiny "
         f"compiled helper (`bench/stamp.rs`) that writes a CLOCK_MONOTONIC stamp as its first "
         f"action and, after holding {hold} ms, as its last. Latency = next job's first stamp - "
         f"previous job's last stamp (normal exit), or - the instant before `kill -9` of the "
         f"holding job (kill). The last waiters have waited ~{n * hold / 1000:.0f} s. "
         f"Load average at start {loadavg()}.")
    emit()
    emit("| tool | end of holder | handoffs | p50 ms | p90 ms | p99 ms | max ms | p50 ms, waited > 3 s |")
    emit("|---|---|---|---|---|---|---|---|")
    result = {}
    for mode in ["exit", "kill"]:
        for tool in ["qsem", "flock", "sem"]:
            nn = n if tool != "sem" else max(15, n // 2 + 1)
            say(f"handoff {tool} {mode} n={nn}")
            r = handoff_run(tool, mode, nn, hold)
            lats = [x for x, _ in r]
            long = [x for x, w in r if w > 3e9]
            emit(f"| {tool} | {mode} | {len(lats)} | {ms(pct(lats, 50))} | {ms(pct(lats, 90))} | "
                 f"{ms(pct(lats, 99))} | {ms(max(lats))} | "
                 f"{ms(statistics.median(long)) if long else '-'} |")
            result[(tool, mode)] = (pct(lats, 50), pct(lats, 99))
    emit()
    return result


# 3. Pipeline ----------------------------------------------------------------

def pipeline():
    emit("## 3. Pipeline: 200 x `sleep 0.05` at -j4 (ideal 2.5 s)")
    emit()
    pid_ = fresh_id("p")
    if HAS_BG:
        qsem_script = (f'for i in $(seq 200); do {QSEM} --id {pid_} -j4 --bg -- sleep 0.05; done; '
                       f'{QSEM} --id {pid_} --wait-all')
        qsem_label = "qsem --bg + --wait-all"
    else:
        qsem_script = (f'for i in $(seq 200); do {QSEM} --id {pid_} -j4 -- sleep 0.05 & done; wait')
        qsem_label = "qsem (foreground jobs with &)"
    scripts = {
        qsem_label: qsem_script,
        "xargs -P4": "seq 200 | xargs -P4 -I{} sleep 0.05",
        "GNU sem": f'for i in $(seq 200); do {SEM} --id {pid_} -j4 sleep 0.05; done; {SEM} --wait --id {pid_}',
    }
    reps = 1 if QUICK else 5
    times = {k: [] for k in scripts}
    for r in range(reps):
        keys = list(scripts)
        random.shuffle(keys)
        for k in keys:
            if k == "GNU sem" and r > 0:
                continue  # ~1 minute a run; once is enough to place it
            say(f"pipeline {k}")
            t0 = now()
            subprocess.run(["bash", "-c", scripts[k]], env=ENV, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[k].append(now() - t0)
    emit(f"Each script run {reps}x interleaved (GNU sem once), `bash -c`; load average {loadavg()}.")
    emit()
    emit("| runner | runs | median s | vs ideal 2.5 s | vs xargs -P4 |")
    emit("|---|---|---|---|---|")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        emit(f"| {k} | {len(v)} | {med[k] / 1e9:.3f} | {med[k] / 2.5e9:.2f}x | "
             f"{med[k] / med['xargs -P4']:.2f}x |")
    emit()
    emit("Scripts:")
    emit()
    for k, s in scripts.items():
        emit(f"- {k}: `{s.replace(QSEM, 'qsem').replace(SEM, 'sem').replace(pid_, 'p')}`")
    emit()
    return {"pipe_ideal": med[qsem_label] / 2.5e9, "pipe_xargs": med[qsem_label] / med["xargs -P4"],
            "xargs_ideal": med["xargs -P4"] / 2.5e9}


# 4. Idle waiters ------------------------------------------------------------

def cpu_ns(pid):
    """CPU time (ns) of all live threads of pid, from schedstat; and utime+stime ticks."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
    except (FileNotFoundError, ProcessLookupError):
        return 0, 0
    return total, ticks


def idle_waiters():
    emit("## 4. Idle waiters: CPU of 100 waiters blocked for 5 s")
    emit()
    n = 100
    hz = os.sysconf("SC_CLK_TCK")
    emit("| tool | waiters | CPU s during the 5 s (schedstat) | same, utime+stime ticks | CPU s incl. start-up |")
    emit("|---|---|---|---|---|")
    res = {}
    for tool in ["qsem", "flock", "sem"]:
        jid = fresh_id("i")
        log = os.path.join(WORK, f"idle-{tool}.log")
        holder = spawn(wrap(tool, jid, [STAMP, log, "inf"]))
        while not os.path.exists(log) or os.path.getsize(log) == 0:
            time.sleep(0.005)
        nn = n if tool != "sem" else 20
        ws = [spawn(wrap(tool, jid, ["true"])) for _ in range(nn)]
        time.sleep(3 if tool == "sem" else 1.5)
        a = [cpu_ns(w) for w in ws]
        time.sleep(5)
        b = [cpu_ns(w) for w in ws]
        d = sum(y[0] - x[0] for x, y in zip(a, b)) / 1e9
        dt = sum(y[1] - x[1] for x, y in zip(a, b)) / hz
        tot = sum(y[0] for y in b) / 1e9
        scale = "" if nn == n else f" (x{n // nn} for 100: {d * n / nn:.3f})"
        emit(f"| {tool} | {nn} | {d:.4f}{scale} | {dt:.2f} | {tot:.3f} |")
        res[tool] = d * n / nn
        # Let them all finish: kill the holding job.
        ev = parse_log(log)
        os.kill(ev[0][1], signal.SIGKILL)
        for w in [holder] + ws:
            os.waitpid(w, 0)
    emit()
    emit("CPU of GNU sem's waiters scales linearly with their number (each polls); 20 are "
         "measured to keep the shared machine usable.")
    emit()
    return res


# 5. Scale -------------------------------------------------------------------

def scale():
    emit("## 5. Scale")
    emit()
    n = 200 if QUICK else 1000
    big, small = fresh_id("big"), fresh_id("small")
    log = os.path.join(WORK, "scale.log")
    if os.path.exists(log):
        os.unlink(log)
    say(f"scale: starting {n - 1} holders")
    holders = []
    for i in range(n - 1):
        holders.append(spawn([QSEM, "--id", big, f"-j{n}", "--", STAMP, log, "inf"]))
        if i % 50 == 49:
            time.sleep(0.05)
    holders.append(spawn([QSEM, "--id", small, "-j2", "--", STAMP, log, "inf"]))
    deadline = time.time() + 120
    while time.time() < deadline:
        if sum(1 for _ in open(log)) >= n:
            break
        time.sleep(0.1)
    rounds = 30 if QUICK else 100
    s = {"big": [], "small": [], "true": []}
    for _ in range(rounds):
        order = ["big", "small", "true"]
        random.shuffle(order)
        for k in order:
            argv = {"big": [QSEM, "--id", big, f"-j{n}", "--", "true"],
                    "small": [QSEM, "--id", small, "-j2", "--", "true"],
                    "true": [TRUE]}[k]
            s[k].append(run_timed(argv)[0])
    m = {k: statistics.median(v) for k, v in s.items()}
    emit(f"Acquisition + run of `true` with {n - 1} of {n} slots held by live qsem jobs, "
         f"against -j2 with 1 of 2 held; {rounds} interleaved rounds; load average {loadavg()}.")
    emit()
    emit("| case | median ms | overhead over `true` ms |")
    emit("|---|---|---|")
    emit(f"| `qsem -j{n} -- true`, {n - 1} held | {ms(m['big'])} | {ms(m['big'] - m['true'])} |")
    emit(f"| `qsem -j2 -- true`, 1 held | {ms(m['small'])} | {ms(m['small'] - m['true'])} |")
    emit(f"| `true` | {ms(m['true'])} | - |")
    emit()
    ratio = m["big"] / m["small"]
    emit(f"- -j{n} / -j2 (whole command) = **{ratio:.2f}x**; overhead only = "
         f"{(m['big'] - m['true']) / (m['small'] - m['true']):.2f}x (target <= 2x)")
    t0 = now()
    st = subprocess.run([QSEM, "--status", "--id", big], env=ENV, capture_output=True)
    emit(f"- `qsem --status --id big` with {n - 1} holders: {ms(now() - t0)} ms")
    emit()
    for p in holders:
        os.kill(p, signal.SIGTERM)
    for p in holders:
        os.waitpid(p, 0)

    # 10,000 ids in one lock directory.
    nid = 1000 if QUICK else 10000
    say(f"scale: creating {nid} ids")
    subprocess.run(["bash", "-c", f"seq {nid} | xargs -P4 -I@ {QSEM} --id many@ -- true"],
                   env=ENV, check=True)
    emptydir = os.path.join(WORK, "empty")
    os.makedirs(emptydir, exist_ok=True)
    r = {"status": [], "acq_many": [], "acq_empty": []}
    for i in range(10 if QUICK else 20):
        t0 = now()
        subprocess.run([QSEM, "--status"], env=ENV, stdout=subprocess.DEVNULL, check=True)
        r["status"].append(now() - t0)
    for _ in range(rounds):
        order = ["acq_many", "acq_empty"]
        random.shuffle(order)
        for k in order:
            d = LOCKS if k == "acq_many" else emptydir
            r[k].append(run_timed([QSEM, "--dir", d, "--id", f"many{nid // 2}", "--", "true"])[0])
    t0 = now()
    subprocess.run([QSEM, "--status", "--id", f"many{nid // 2}"], env=ENV, stdout=subprocess.DEVNULL)
    one = now() - t0
    mm = {k: statistics.median(v) for k, v in r.items()}
    emit(f"{nid} ids in one lock directory (each created by a real `qsem --id manyK -- true`):")
    emit()
    emit("| case | median ms |")
    emit("|---|---|")
    emit(f"| `qsem --status` (all ids, none held) | {ms(mm['status'])} |")
    emit(f"| `qsem --status --id many{nid // 2}` | {ms(one)} |")
    emit(f"| `qsem --id many{nid // 2} -- true` among {nid} ids | {ms(mm['acq_many'])} |")
    emit(f"| same in a lock directory with 1 id | {ms(mm['acq_empty'])} |")
    emit()
    return {"j1000_ratio": ratio,
            "j1000_ov_ratio": (m["big"] - m["true"]) / (m["small"] - m["true"])}


# 6. Memory ------------------------------------------------------------------

def vm_hwm_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def memory():
    emit("## 6. Memory and size")
    emit()
    sid = fresh_id("m")
    # Peak RSS is read as VmHWM of the live wrapper while its job (`sleep 1`)
    # runs: the wrapper's peak is behind it by then, and VmHWM counts only its
    # own address space. (ru_maxrss from wait4 would not do: with a vfork-style
    # spawn, as std's posix_spawn is, the launcher's RSS is charged to the
    # child at exec.)
    cmds = {
        "sleep 1 (the job itself)": ["sleep", "1"],
        "flock FILE sleep 1": [FLOCK, os.path.join(WORK, "flockfile"), "sleep", "1"],
        "qsem -- sleep 1": [QSEM, "--id", sid, "--", "sleep", "1"],
        "sem --fg sleep 1": [SEM, "--fg", "--id", sid, "sleep", "1"],
    }
    emit("| process | peak RSS KiB (VmHWM, median of 3) |")
    emit("|---|---|")
    res = {}
    for k, argv in cmds.items():
        v = []
        for _ in range(3):
            pid = os.posix_spawnp(argv[0], argv, ENV)
            time.sleep(0.6)
            v.append(vm_hwm_kib(pid))
            os.waitpid(pid, 0)
        res[k] = statistics.median(v)
        emit(f"| `{k}` | {res[k]:.0f} |")
    size = os.path.getsize(QSEM)
    stripped = os.path.join(WORK, "qsem.stripped")
    if shutil.which("strip"):
        subprocess.run(["strip", "-o", stripped, QSEM], check=False)
    ss = os.path.getsize(stripped) if os.path.exists(stripped) else 0
    emit()
    emit(f"- binary: {size} bytes ({size / 1048576:.2f} MiB); stripped: {ss} bytes "
         f"({ss / 1048576:.2f} MiB); flock(1): {os.path.getsize(FLOCK)} bytes")
    emit()
    return {"rss_kib": res["qsem -- sleep 1"], "flock_kib": res["flock FILE sleep 1"]}


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "?")
    emit("# qsem benchmark run")
    emit()
    emit(f"- date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    emit(f"- machine: {os.cpu_count()} CPUs ({cpu}), kernel {os.uname().release}, "
         f"load average {open('/proc/loadavg').read().strip()}")
    ver = subprocess.run([QSEM, "--version"], capture_output=True, text=True).stdout.strip()
    pv = subprocess.run([SEM, "--version"], capture_output=True, text=True, env=ENV).stdout.splitlines()
    fv = subprocess.run([FLOCK, "--version"], capture_output=True, text=True).stdout.strip()
    emit(f"- {ver}; {pv[0] if pv else 'GNU parallel ?'}; {fv}; --bg available: {HAS_BG}")
    emit()


def targets(sm):
    """The issue's targets against this run's numbers."""
    rows = []

    def row(what, target, got, ok, floor=""):
        rows.append(f"| {what} | {target} | {got} | {'met' if ok else '**missed**'} | {floor} |")

    if "overhead" in sm:
        o = sm["overhead"]
        row("overhead vs flock(1)'s", "<= 1.15x", f"{o['ov_ratio_flock']:.2f}x",
            o["ov_ratio_flock"] <= 1.15,
            f"dynamic build: {o['static_ratio']:.2f}x" if "static_ratio" in o else "")
        row("overhead below GNU sem's", ">= 40x", f"{o['ov_ratio_sem']:.0f}x", o["ov_ratio_sem"] >= 40)
    if "handoff" in sm:
        h = sm["handoff"]
        for mode in ["exit", "kill"]:
            p50, p99 = h[("qsem", mode)]
            f50, f99 = h[("flock", mode)]
            row(f"handoff p50 after {mode}", "<= 1 ms", f"{p50 / 1e6:.2f} ms", p50 <= 1e6,
                f"flock(1) same run: {f50 / 1e6:.2f} ms")
            row(f"handoff p99 after {mode}", "<= 5 ms", f"{p99 / 1e6:.2f} ms", p99 <= 5e6,
                f"flock(1) same run: {f99 / 1e6:.2f} ms")
    if "pipeline" in sm:
        p = sm["pipeline"]
        row("pipeline vs ideal 2.5 s", "<= 1.15x", f"{p['pipe_ideal']:.2f}x", p["pipe_ideal"] <= 1.15,
            f"xargs -P4: {p['xargs_ideal']:.2f}x")
        row("pipeline vs xargs -P4", "<= 1.10x", f"{p['pipe_xargs']:.2f}x", p["pipe_xargs"] <= 1.10)
    if "idle" in sm:
        i = sm["idle"]
        row("100 idle waiters, CPU over 5 s", "< 0.05 s", f"{i['qsem']:.4f} s", i["qsem"] < 0.05,
            f"GNU sem: {i['sem']:.2f} s")
    if "scale" in sm:
        r = sm["scale"]["j1000_ratio"]
        row("-j1000 acquisition vs -j2", "<= 2x", f"{r:.2f}x", r <= 2,
            f"overhead only: {sm['scale']['j1000_ov_ratio']:.2f}x")
    if "memory" in sm:
        k = sm["memory"]["rss_kib"]
        fk = sm["memory"]["flock_kib"]
        row("peak RSS of qsem vs flock(1)'s", "<= 1.6x", f"{k / fk:.2f}x ({k / 1024:.2f} MiB)",
            k <= 1.6 * fk, f"flock(1): {fk / 1024:.2f} MiB")
    emit("## Targets")
    emit()
    emit("| what | target | this run | | for comparison |")
    emit("|---|---|---|---|---|")
    for r in rows:
        emit(r)
    emit()


def main():
    os.makedirs(LOCKS, exist_ok=True)
    machine()
    summary = {}
    for name, fn in [("overhead", overhead), ("handoff", handoff), ("pipeline", pipeline),
                     ("idle", idle_waiters), ("scale", scale), ("memory", memory)]:
        if section(name):
            say(f"== {name} ({time.strftime('%H:%M:%S')})")
            summary[name] = fn()
    targets(summary)
    emit(f"Finished {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, "
         f"load average {open('/proc/loadavg').read().strip()}.")


if __name__ == "__main__":
    main()
