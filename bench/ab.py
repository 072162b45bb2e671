#!/usr/bin/env python3
"""Times two ema-tool binaries against each other on the sweep series, run by run in pairs.

    python3 bench/run.py --suite sweep --reps 1 --keep     # generates bench/out/series/f32
    python3 bench/ab.py OLD_BINARY NEW_BINARY [--reps 15]

For one fold and the 4- and 8-value sweeps of `bench/run.py --suite sweep` (outputs on
/dev/shm), each repetition runs OLD and NEW one after the other, in alternating order, so that
the machine's noise falls on both alike; the three runs of a binary come in a rotating order,
after one untimed repetition. Prints the medians of wall, user and system time, and the
medians of the per-repetition ratios: each binary's sweep against its own one fold, and NEW's
sweeps against OLD's one fold. User and system time come from wait4(2), wall time from the
clock around it.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
import time

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from run import SWEEPS  # noqa: E402 (bench/ is not a package)

DECAYS = {1: "0.999", 4: SWEEPS[4], 8: SWEEPS[8]}


def timed_ema(binary, decays, d, inputs, who):
    """Wall, user and system seconds of one `ema` run of `binary` with `decays` into the
    directory `d`; exits naming `who` (the calling script) if it fails."""
    cmd = [binary, "ema", "-q", "--decay", decays, "-o", str(d / "e-{decay}.safetensors")]
    start = time.perf_counter()
    p = subprocess.Popen([*cmd, *inputs])
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - start
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if p.returncode != 0:
        sys.exit(f"{who}: {binary} exited with status {p.returncode}: {' '.join(cmd)}")
    return wall, ru.ru_utime, ru.ru_stime


def run(binary, k, inputs):
    """Wall, user and system seconds of one `ema` run with `k` decays into /dev/shm."""
    d = Path(f"/dev/shm/ema-tool-ab-{os.getpid()}-{k}")
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    try:
        return timed_ema(binary, DECAYS[k], d, inputs, "ab.py")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def series_inputs(series, who):
    """The checkpoints of the series in `series`, in step order (step_2000 before step_10000),
    read once so that they are page-cached; exits naming `who` when there are none."""
    natural = lambda f: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", f.name)]
    inputs = [str(f) for f in sorted(Path(series).glob("*.safetensors"), key=natural)]
    if not inputs:
        sys.exit(f"{who}: no checkpoints in {series}: run bench/run.py --suite sweep --keep")
    for f in inputs:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    return inputs


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--series", default=str(ROOT / "bench" / "out" / "series" / "f32"))
    args = p.parse_args()
    inputs = series_inputs(args.series, "ab.py")
    pairs = (("old", args.old), ("new", args.new))
    for k in DECAYS:  # untimed
        for _, binary in pairs:
            run(binary, k, inputs)
    res = {}
    ks = list(DECAYS)
    for r in range(args.reps):
        for k in ks[r % 3:] + ks[:r % 3]:
            for name, binary in pairs if r % 2 == 0 else pairs[::-1]:
                res.setdefault((name, k), []).append(run(binary, k, inputs))
    med = statistics.median
    print(f"{args.reps} repetitions, {len(inputs)} inputs from {args.series}; medians")
    print()
    print("| run | binary | wall s | user s | sys s |")
    print("|---|---|---|---|---|")
    for k in DECAYS:
        what = "one fold" if k == 1 else f"{k}-value sweep"
        for name, _ in pairs:
            v = res[(name, k)]
            w, u, s = (med(x[i] for x in v) for i in range(3))
            print(f"| {what} | {name} | {w:.3f} | {u:.3f} | {s:.3f} |")
    print()
    ratio = lambda a, b: med(x[0] / y[0] for x, y in zip(res[a], res[b]))
    for k in (4, 8):
        old, new = ratio(("old", k), ("old", 1)), ratio(("new", k), ("new", 1))
        cross = ratio(("new", k), ("old", 1))
        print(f"- {k}-value sweep / one fold: old {old:.2f}×, new {new:.2f}×, "
              f"new sweep / old one fold {cross:.2f}×")


if __name__ == "__main__":
    main()
