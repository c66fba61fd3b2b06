#!/usr/bin/env python3
"""Handoff after a normal exit, qsem against flock(1) (and, with --peer,
another qsem build), interleaved round by round: a quick A/B of one change
to the local engine's handoff, without the rest of bench/engine.py.

Usage: bench/handoff.py QSEM STAMP WORKDIR [--peer OTHER_QSEM]
Environment: W waiters queued per round (default 40), ROUNDS (default 3),
MODE `exit` (default) or `kill` (the holding job is killed with SIGKILL).
STAMP is bench/stamp.rs built (see bench/files.sh). Prints one line per tool:
p50 of every handoff measured, in ms.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine  # noqa: E402  (reads QSEM, STAMP, WORKDIR and --peer from argv)

waiters = int(os.environ.get("W", "40"))
rounds = int(os.environ.get("ROUNDS", "3"))
mode = os.environ.get("MODE", "exit")
os.makedirs(engine.LOCKS, exist_ok=True)
lat = {t: [] for t in ["qsem", "flock", "peer"] if t != "peer" or engine.PEER}
for _ in range(rounds):
    for tool in lat:
        for _ in range(max(1, 40 // waiters)):
            lat[tool] += engine.handoffs(tool, waiters, mode, waiters)
load = open("/proc/loadavg").read().split()[0]
for tool, v in lat.items():
    print(f"{tool:5} {mode} W={waiters} p50 {engine.p50(v) / 1e6:.2f} ms  n={len(v)}  (load {load})")
