#!/usr/bin/env python3
"""--each against xargs -P4 (issue 10's targets), interleaved round by round.

Usage: bench/each.py QSEM [ROUNDS]

Two workloads, each run by `qsem --each` (-j4, its own lock directory) and by
`xargs -P4 -n1`, alternately, ROUNDS times (default 5): 20,000 items of
`true`, and 1,000 items of a 10 ms job (`sh -c 'sleep 0.01' sh ITEM`).
Prints the medians of wall time and their ratio, qsem over xargs.
"""
import statistics
import subprocess
import sys
import tempfile
import time

QSEM = sys.argv[1]
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
WORKLOADS = {
    "20,000 x true": (20000, ["true"]),
    "1,000 x 10 ms job": (1000, ["sh", "-c", "sleep 0.01", "sh"]),
}


def timed(argv, items, env=None):
    data = "".join(f"{i}\n" for i in range(items)).encode()
    t = time.perf_counter()
    subprocess.run(argv, input=data, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main():
    print("| workload | qsem --each -j4, median s | xargs -P4 -n1, median s | ratio |")
    print("|---|---|---|---|")
    for name, (items, cmd) in WORKLOADS.items():
        q, x = [], []
        for _ in range(ROUNDS):
            with tempfile.TemporaryDirectory() as d:
                env = {"PATH": "/usr/bin:/bin", "QSEM_DIR": d, "QSEM_HISTORY_SIZE": "1048576"}
                q.append(timed([QSEM, "--id", "each", "-j4", "--each", "--", *cmd], items, env))
            x.append(timed(["xargs", "-P4", "-n1", *cmd], items))
        mq, mx = statistics.median(q), statistics.median(x)
        print(f"| {name} | {mq:.3f} | {mx:.3f} | **{mq / mx:.2f}x** |")


main()
