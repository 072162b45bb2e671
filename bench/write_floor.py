#!/usr/bin/env python3
"""What writing one output costs the kernel, without ema-tool: the page cache's part of a sweep.

    python3 bench/write_floor.py                      # 268 MB files in /dev/shm, 7 of each way
    python3 bench/write_floor.py --dir /tmp --mb 64 --reps 5

Each repetition creates a fresh file in --dir and fills it with --mb MB from a buffer that is
already in cache (512 KiB, unless the way says otherwise), in one of these ways, and takes the CPU time (user + sys) of this
process from getrusage around it:

* `pwrite`: `os.pwrite` of 512 KiB at a time (ema-tool writes an output's ranges with
  `pwritev`, in batches of 64 KiB to 1 MiB; the 8-value sweep's are 512 KiB);
* `pwrite 64 KiB` and `pwrite 8 MiB`: the same with other sizes of write;
* `fallocate + pwrite`: the pages allocated first, then written over;
* `fallocate`: the allocation alone;
* `mmap`: a shared mapping of the file, filled by copying into it (every page faulted in);
* `overwrite`: `pwrite` over a file whose pages already exist;
* `pwrite, 8 files kept`: 8 fresh files written one after the other and removed only after the
  last, as a sweep's 8 outputs are, per file: the page cache then needs 8 files' worth of new
  pages, where the other ways reuse the pages of the file just removed.

The file is removed after each repetition, outside the timing; the ways take turns, so that a
busy moment of the machine falls on all of them. The medians tell how much of a sweep's cost per
output is the page cache's (allocating, copying into and accounting its pages) whatever the
program does: `bench/run.py --suite sweep` measures the `pwrite` way again and sets it beside
what each output of a sweep adds. Needs Linux and Python 3.8+.
"""

import argparse
import mmap
import os
import resource
import statistics
import sys
import time

CHUNK = 512 << 10


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def fill_pwrite(fd, size, buf):
    view = memoryview(buf)
    off = 0
    while off < size:
        n = min(len(buf), size - off)
        os.pwrite(fd, view[:n], off)
        off += n


def way(name, size):
    """The function that fills a fresh file `fd` of `size` bytes the way `name` says."""
    chunk = {"pwrite 64 KiB": 64 << 10, "pwrite 8 MiB": 8 << 20}.get(name, CHUNK)
    buf = bytearray(b"\x01" * chunk)

    def pwrite(fd):
        fill_pwrite(fd, size, buf)

    def fallocate_pwrite(fd):
        os.posix_fallocate(fd, 0, size)
        fill_pwrite(fd, size, buf)

    def fallocate(fd):
        os.posix_fallocate(fd, 0, size)

    def mapped(fd):
        os.ftruncate(fd, size)
        view = memoryview(buf)
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            for off in range(0, size, CHUNK):
                n = min(CHUNK, size - off)
                m[off:off + n] = view[:n]

    return {
        "pwrite": pwrite,
        "pwrite 64 KiB": pwrite,
        "pwrite 8 MiB": pwrite,
        "fallocate + pwrite": fallocate_pwrite,
        "fallocate": fallocate,
        "mmap": mapped,
    }[name]


def measure(path, name, size, reps):
    """CPU seconds of each of `reps` fills of a fresh file `path` the way `name` says; the file
    is removed after each, and whatever happens."""
    times = []
    for _ in range(reps):
        if os.path.exists(path):
            os.unlink(path)
        fill = way(name, size)
        try:
            c0 = cpu()
            fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
            try:
                fill(fd)
            finally:
                os.close(fd)
            times.append(cpu() - c0)
        finally:
            if os.path.exists(path):
                os.unlink(path)
    return times


def measure_overwrite(path, size, reps):
    """CPU seconds of each of `reps` writes over the pages of one file `path`."""
    buf = bytearray(b"\x01" * CHUNK)
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
    try:
        fill_pwrite(fd, size, buf)
        times = []
        for _ in range(reps):
            c0 = cpu()
            fill_pwrite(fd, size, buf)
            times.append(cpu() - c0)
        return times
    finally:
        os.close(fd)
        os.unlink(path)


def measure_kept(directory, size, files, reps):
    """CPU seconds per file of each of `reps` fills of `files` fresh files in `directory`, one
    after the other, all removed once the last is written (outside the timing)."""
    buf = bytearray(b"\x01" * CHUNK)
    paths = [os.path.join(directory, f"ema-tool-write-floor-{os.getpid()}-{i}.bin")
             for i in range(files)]
    times = []
    for _ in range(reps):
        try:
            c0 = cpu()
            for path in paths:
                fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
                try:
                    fill_pwrite(fd, size, buf)
                finally:
                    os.close(fd)
            times.append((cpu() - c0) / files)
        finally:
            for path in paths:
                if os.path.exists(path):
                    os.unlink(path)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/dev/shm", help="where the files go (default /dev/shm)")
    p.add_argument("--mb", type=float, default=268.435456, help="MB per file (default: 256 MiB)")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    size = int(args.mb * 1e6)
    path = os.path.join(args.dir, f"ema-tool-write-floor-{os.getpid()}.bin")
    cpu_name = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                     if l.startswith("model name")), "?")
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs ({cpu_name}), Linux "
          f"{os.uname().release}; command: python3 bench/write_floor.py {' '.join(sys.argv[1:])}"
          .rstrip())
    print()
    print(f"{size / 1e6:.0f} MB per file in {args.dir}, {args.reps} repetitions; "
          "CPU seconds: median [min–max]")
    print()
    print("| way | CPU s | GB/s of CPU |")
    print("|---|---|---|")
    names = ["pwrite", "pwrite 64 KiB", "pwrite 8 MiB", "fallocate + pwrite", "fallocate", "mmap"]
    kept = "pwrite, 8 files kept"
    results = {n: [] for n in names + ["overwrite", kept]}
    for _ in range(args.reps):
        for n in names:
            results[n] += measure(path, n, size, 1)
        results["overwrite"] += measure_overwrite(path, size, 1)
        results[kept] += measure_kept(args.dir, size, 8, 1)
    for n, ts in results.items():
        med = statistics.median(ts)
        print(f"| {n} | {med:.3f} [{min(ts):.3f}–{max(ts):.3f}] | {size / 1e9 / med:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
