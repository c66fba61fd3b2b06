"""The journal's cost on the per-job path (issue 12, item 3): `qsem -- true`
with the journal off (QSEM_HISTORY_SIZE=0), on (the default limit), and on
with a small limit that rotates every few hundred records. The variants run
interleaved, in a new random order each round, each in its own lock
directory; wall time from posix_spawn to wait4, and CPU time (user+system
from wait4, which time spent waiting for a CPU does not inflate). Medians,
and the median of per-round differences against "off".

    python3 bench/history.py QSEM ROUNDS WORKDIR
"""
import os
import random
import statistics
import sys
import time

qsem, rounds, work = sys.argv[1], int(sys.argv[2]), sys.argv[3]
variants = {"off": "0", "on": None, "on, rotating": "32768"}
envs = {}
for name, size in variants.items():
    env = dict(os.environ)
    env["QSEM_DIR"] = os.path.join(work, name.replace(", ", "-"))
    env.pop("QSEM_HISTORY_SIZE", None)
    if size is not None:
        env["QSEM_HISTORY_SIZE"] = size
    envs[name] = env

wall = {n: [] for n in variants}
cpu = {n: [] for n in variants}
argv = [qsem, "--id", "bench", "--", "true"]
for n in variants:  # warm up: lock directories, journals, page cache
    for _ in range(20):
        os.waitpid(os.posix_spawn(qsem, argv, envs[n]), 0)
load0 = os.getloadavg()[0]
for _ in range(rounds):
    order = list(variants)
    random.shuffle(order)
    for n in order:
        t = time.perf_counter()
        pid = os.posix_spawn(qsem, argv, envs[n])
        _, status, usage = os.wait4(pid, 0)
        wall[n].append(time.perf_counter() - t)
        cpu[n].append(usage.ru_utime + usage.ru_stime)
        assert os.waitstatus_to_exitcode(status) == 0
load1 = os.getloadavg()[0]

print(f"{rounds} interleaved rounds, load average {load0:.2f} -> {load1:.2f}\n")
print("| journal | wall p50 | wall p90 | CPU p50 | paired wall diff vs off (p50) |")
print("|---|---|---|---|---|")
for n in variants:
    w = sorted(wall[n])
    diff = statistics.median(a - b for a, b in zip(wall[n], wall["off"]))
    print(
        f"| {n} | {statistics.median(w) * 1e3:.3f} ms | {w[int(len(w) * 0.9)] * 1e3:.3f} ms"
        f" | {statistics.median(cpu[n]) * 1e3:.3f} ms | {diff * 1e6:+.0f} us |"
    )
for n in ("on", "on, rotating"):
    d = os.path.join(envs[n]["QSEM_DIR"], ".history")
    sizes = {f: os.path.getsize(os.path.join(d, f)) for f in ("bench", ".1/bench") if os.path.exists(os.path.join(d, f))}
    print(f"\n{n}: journal files {sizes}")
