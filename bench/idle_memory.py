#!/usr/bin/env python3
"""What a sweep's writes cost when the memory they get was handed back to the host.

    python3 bench/run.py --suite sweep --reps 1 --keep     # generates bench/out/series/f32
    python3 bench/idle_memory.py [BINARY] [--reps 7] [--idle 6]

On a virtual machine with free page reporting (a Linux guest whose kernel log says "Free page
reporting enabled"), memory that stays free for a few seconds is reported to the host, which
takes it back; the next use of those pages faults on the host first. A sweep's outputs on tmpfs
are new page-cache pages (2.1 GB for the 8-value sweep of `bench/run.py --suite sweep`), so
what they cost depends on how long the memory freed before the run has been free.

For one fold, then for the 8-value sweep (outputs on /dev/shm, the decays of `bench/run.py`),
each repetition runs BINARY (default: target/release/ema-tool) in two ways, in alternating
order, after an untimed run; every run follows a run of the same outputs, so that the memory
freed before it is as large as what it takes:

* `freed just before`: the outputs of the previous run are left in place for --idle seconds,
  then removed, and the run starts at once;
* `freed, idle`: the outputs of the previous run are removed, and the run starts --idle seconds
  later.

Both wait as long, so that only the age of the freed memory differs. Prints the medians of
wall, user and system time, and for each way the ratio of the sweep's median wall time to the
one fold's. User and system time come from wait4(2), wall time from the clock around
it. Needs Linux and Python 3.9+.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from ab import series_inputs, timed_ema  # noqa: E402 (bench/ is not a package)
from run import SWEEPS  # noqa: E402

DECAYS = {1: "0.999", 8: SWEEPS[8]}
WAYS = ("freed just before", "freed, idle")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("binary", nargs="?", default=str(ROOT / "target" / "release" / "ema-tool"))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--idle", type=float, default=6.0,
                   help="seconds between the end of a run and the next (default 6)")
    p.add_argument("--series", default=str(ROOT / "bench" / "out" / "series" / "f32"))
    args = p.parse_args()
    inputs = series_inputs(args.series, "idle_memory.py")
    d = Path(f"/dev/shm/ema-tool-idle-{os.getpid()}")
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()

    def clear():
        for f in d.iterdir():
            f.unlink()

    res = {}
    try:
        for k in DECAYS:
            clear()
            timed_ema(args.binary, DECAYS[k], d, inputs, "idle_memory.py")  # untimed; kept
            for r in range(args.reps):
                for way in WAYS if r % 2 == 0 else WAYS[::-1]:
                    if way == "freed just before":
                        time.sleep(args.idle)
                        clear()
                    else:
                        clear()
                        time.sleep(args.idle)
                    t = timed_ema(args.binary, DECAYS[k], d, inputs, "idle_memory.py")
                    res.setdefault((way, k), []).append(t)
    finally:
        shutil.rmtree(d, ignore_errors=True)

    med = statistics.median
    kernel = Path("/proc/cmdline").read_text().strip() if Path("/proc/cmdline").exists() else "?"
    order = re.search(r"page_reporting\.page_reporting_order=\d+", kernel)
    cpu_name = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                     if l.startswith("model name")), "?")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "?"
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs ({cpu_name}), Linux "
          f"{os.uname().release}{', ' + order.group(0) if order else ''}; checkout at {commit}; "
          f"{args.reps} repetitions, "
          f"--idle {args.idle:g} s; command: python3 bench/idle_memory.py "
          f"{' '.join(sys.argv[1:])}".rstrip())
    print()
    print("| run | way | wall s | user s | sys s |")
    print("|---|---|---|---|---|")
    for k in DECAYS:
        what = "one fold" if k == 1 else f"{k}-value sweep"
        for way in WAYS:
            v = res[(way, k)]
            w, u, s = (med(x[i] for x in v) for i in range(3))
            print(f"| {what} | {way} | {w:.3f} | {u:.3f} | {s:.3f} |")
    print()
    for way in WAYS:
        sweep, one = (med(x[0] for x in res[(way, k)]) for k in (8, 1))
        print(f"- 8-value sweep / one fold, {way}: {sweep / one:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
