#!/usr/bin/env python3
"""Times ema-tool against the alternatives on generated checkpoint series.

    python3 bench/run.py                    # the default suite (see SUITES), as in BENCHMARKS.md
    python3 bench/run.py --suite scaling    # 2, 8, 32 checkpoints × 256 MB and 2 × 4 GB
    python3 bench/run.py --suite sweep      # sweeps of 4 and 8 decays against one fold
    python3 bench/run.py --count 8 --mix 16384x4096 --dtype bf16 --tools cat,ema,torch

For each series it generates the checkpoints (examples/gen-series.rs, kept in the ignored
bench/out/ between runs and deleted at the end unless --keep), reads them once so they are
page-cached, then runs every tool once per repetition, in a rotating order, and reports
for each the median wall time with its spread, the CPU time (user + sys), the peak RSS, and
ratios taken pair by pair within a repetition: wall / wall of `cat inputs > /dev/null` (the
read limit) and the PyTorch script's wall / ema-tool's. Wall, CPU and peak RSS come from
wait4(2) on the tool's own process (what /usr/bin/time reports, without needing it).

Peak RSS is GNU time's (/usr/bin/time, `apt-get install time`); without it the script
falls back to wait4's, which for a child of Python never reads below Python's own RSS
(~20 MiB: a process's peak includes its memory before exec), and says so.

Tools: cat (read limit), ema, swa (ema-tool), ema-tmpfs (ema-tool writing to /dev/shm: the
difference to `ema` is the cost of writing and fsyncing the output on disk), torch
(bench/torch_ema.py, needs torch and safetensors in --python), ema-pread (ema-tool reading
every input with pread instead of a mapping: --mapped-inputs 0), timm (timm's
avg_checkpoints.py, when found or given with --timm-script), sweep4 and sweep8 (one
`ema-tool ema` run with 4 or 8 decays; -tmpfs: outputs on /dev/shm), sep4-tmpfs (4 runs of one
decay each, one after the other). Then, untimed: ema-tool's
output with 1 and 3 threads must be the same bytes as with the default, and is compared
with the PyTorch script's; `ema-tool inspect` is timed on the largest checkpoint. With
sweeps on tmpfs, what a bare `pwrite` of one output to tmpfs costs (bench/write_floor.py) is
measured too, and the report sets it beside what each output of a sweep adds.
Needs Linux, Python 3.9+ and cargo (to build ema-tool and the generator).
"""

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import write_floor  # noqa: E402 (bench/ is not a package)
MIB = 1 << 20

# name: (count, mix, dtype, tools); mix is "TENSORSxELEMENTS[,...]" as gen-series takes it.
SUITES = {
    "default": [
        ("f32", 8, "64x1048576", "f32", "cat,ema,swa,ema-tmpfs,ema-pread,torch,timm"),
        ("bf16", 8, "64x2097152", "bf16", "cat,ema,swa,ema-tmpfs,torch,timm"),
        ("f32-small", 8, "16384x4096", "f32", "cat,ema,swa,torch"),
    ],
    # Sweeps (issue #11): one fold, 4- and 8-value sweeps and 4 separate runs, on tmpfs and disk.
    "sweep": [
        ("f32", 8, "64x1048576", "f32",
         "ema-tmpfs,sweep4-tmpfs,sweep8-tmpfs,sep4-tmpfs,ema,sweep4,sweep8"),
    ],
    "scaling": [
        ("f32-x2", 2, "64x1048576", "f32", "cat,ema"),
        ("f32-x8", 8, "64x1048576", "f32", "cat,ema"),
        ("f32-x32", 32, "64x1048576", "f32", "cat,ema"),
        ("f32-4GB-x2", 2, "64x16777216", "f32", "cat,ema"),
    ],
}
DTYPE_SIZE = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# GNU time forks the tool from a small process; without it, the peak RSS that wait4 reports
# for a child of this Python starts from this Python's own (memory is counted before exec).
GNU_TIME = "/usr/bin/time" if Path("/usr/bin/time").exists() else None


def run_measured(cmd, stdout_path=os.devnull, env=None):
    """Runs `cmd`; returns its wall, user and sys seconds and peak RSS (MiB).

    CPU times come from wait4(2) (microseconds, the tool's whole process tree); the peak RSS
    from GNU time's %M when /usr/bin/time exists, else from wait4 (then never below this
    Python's own RSS: see GNU_TIME).
    """
    with open(stdout_path, "wb") as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as tv:
        full = [GNU_TIME, "-f", "%M", "-o", tv.name, *map(str, cmd)] if GNU_TIME else cmd
        t0 = time.perf_counter()
        p = subprocess.Popen(full, stdout=out, stderr=err,
                             env=None if env is None else {**os.environ, **env})
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
        rss_kib = int(tv.read().split()[-1]) if GNU_TIME and p.returncode == 0 else ru.ru_maxrss
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} … failed ({p.returncode}): {stderr}")
    return {
        "wall": wall,
        "user": ru.ru_utime,
        "sys": ru.ru_stime,
        "cpu": ru.ru_utime + ru.ru_stime,
        "rss_mib": rss_kib / 1024,
        "stderr": stderr,
    }


def build(args):
    if args.ema_tool:
        return Path(args.ema_tool), Path(args.gen_series or "gen-series")
    log("building ema-tool and gen-series (release)…")
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--bin", "ema-tool", "--example", "gen-series"],
        cwd=ROOT,
        check=True,
    )
    rel = ROOT / "target" / "release"
    return rel / "ema-tool", rel / "examples" / "gen-series"


def generate(gen, out, name, count, mix, dtype):
    d = out / "series" / name
    params = {"count": count, "mix": mix, "dtype": dtype, "version": 1}
    stamp = d / "params.json"
    files = sorted(d.glob("*.safetensors"), key=lambda p: int(p.stem.split("_")[-1]))
    if stamp.exists() and json.loads(stamp.read_text()) == params and len(files) == count:
        return files
    shutil.rmtree(d, ignore_errors=True)
    log(f"generating {name}: {count} checkpoints, {mix} {dtype}…")
    subprocess.run(
        [gen, "--dir", d, "--count", str(count), "--mix", mix, "--dtype", dtype], check=True
    )
    stamp.write_text(json.dumps(params))
    return sorted(d.glob("*.safetensors"), key=lambda p: int(p.stem.split("_")[-1]))


def find_timm_script(args):
    """timm's avg_checkpoints.py: given, next to the installed package, or on PATH."""
    if args.timm_script:
        return Path(args.timm_script), None
    try:
        out = subprocess.run(
            [args.python, "-c", "import timm, os; print(timm.__version__); print(os.path.dirname(timm.__file__))"],
            capture_output=True, text=True, check=True,
        ).stdout.split("\n")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None, "timm is not installed in --python"
    version, pkg = out[0], Path(out[1])
    for cand in [pkg / "avg_checkpoints.py", pkg.parent / "avg_checkpoints.py"]:
        if cand.exists():
            return cand, None
    on_path = shutil.which("avg_checkpoints.py")
    if on_path:
        return Path(on_path), None
    return None, (
        f"timm {version} is installed but its package has no avg_checkpoints.py (the script "
        "lives in timm's git repository); pass --timm-script PATH to include it"
    )


# Environment of the tools that need one (none at present).
TOOL_ENV = {}
# --baseline: another ema-tool binary (an earlier build), timed as ema-base.
BASELINE = None


# The check that holds what a bare pwrite of one output costs (bench/write_floor.py).
BARE_PWRITE = "pwrite of one output to tmpfs, CPU s (bench/write_floor.py)"
BARE_PWRITE_KEPT = "pwrite of 8 outputs kept together on tmpfs, CPU s per output (bench/write_floor.py)"

# The decays of the sweeps.
SWEEPS = {
    4: "0.9,0.99,0.999,0.9999",
    8: "0.9,0.95,0.99,0.995,0.999,0.9995,0.9999,0.99995",
}


def commands(tool, ema_tool, python, inputs, outdir, timm_script):
    """The command of `tool` and the file it writes (a directory for several)."""
    ins = [str(p) for p in inputs]
    out = outdir / f"{tool}.safetensors"
    if tool.startswith(("sweep", "sep")):
        # sweepK[-tmpfs]: one run with K decays; sep4[-tmpfs]: four runs of one decay each.
        base = Path("/dev/shm") if tool.endswith("-tmpfs") else outdir
        d = base / f"ema-tool-bench-{os.getpid()}-{tool}"
        d.mkdir(exist_ok=True)
        if tool.startswith("sweep"):
            k = int(tool[len("sweep"):].split("-")[0])
            return [str(ema_tool), "ema", "-q", "--decay", SWEEPS[k],
                    "-o", str(d / "ema-{decay}.safetensors"), *ins], d
        runs = [
            " ".join([str(ema_tool), "ema", "-q", "--decay", v,
                      "-o", str(d / f"ema-{v}.safetensors"), *ins])
            for v in SWEEPS[4].split(",")
        ]
        return ["sh", "-c", " && ".join(runs)], d
    if tool == "cat":
        return ["cat", *ins], None
    if tool in ("ema", "swa"):
        return [str(ema_tool), tool, "-q", "-o", str(out), *ins], out
    if tool == "ema-pread":
        # Every input read with pread instead of mapping the first ones (the read strategy
        # ema-tool had before, for comparison).
        return [str(ema_tool), "ema", "-q", "--mapped-inputs", "0", "-o", str(out), *ins], out
    if tool == "ema-base":
        return [str(BASELINE), "ema", "-q", "-o", str(out), *ins], out
    if tool == "ema-tmpfs":
        out = Path("/dev/shm") / f"ema-tool-bench-{os.getpid()}.safetensors"
        return [str(ema_tool), "ema", "-q", "-o", str(out), *ins], out
    if tool == "torch":
        return [python, str(ROOT / "bench" / "torch_ema.py"), str(out), *ins], out
    if tool == "timm":
        out = outdir / "timm.pth"
        return [
            python, str(timm_script), "--input", str(inputs[0].parent),
            "--filter", "*.safetensors", "--no-sort", "--output", str(out),
        ], out
    raise ValueError(tool)


def median_spread(xs):
    return statistics.median(xs), min(xs), max(xs)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def compare_with_torch(python, a, b):
    """Largest |a - b| over all tensors of two safetensors files, relative to max |b|."""
    code = (
        "import sys, numpy as np\n"
        "from safetensors.numpy import load_file\n"
        "try:\n"
        "    from safetensors.torch import load_file as lt\n"
        "    a, b = lt(sys.argv[1]), lt(sys.argv[2])\n"
        "    a = {k: v.float().numpy() for k, v in a.items()}; b = {k: v.float().numpy() for k, v in b.items()}\n"
        "except ImportError:\n"
        "    a, b = load_file(sys.argv[1]), load_file(sys.argv[2])\n"
        "d = max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in b)\n"
        "m = max(float(np.abs(b[k].astype(np.float64)).max()) for k in b)\n"
        "print(d, m)\n"
    )
    r = subprocess.run([python, "-c", code, str(a), str(b)], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    d, m = map(float, r.stdout.split())
    return d, m


def bench_series(args, ema_tool, gen, name, count, mix, dtype, tools):
    out = Path(args.out)
    inputs = generate(gen, out, name, count, mix, dtype)
    size = sum(p.stat().st_size for p in inputs)
    groups = [g.split("x") for g in mix.split(",")]
    ntensors = sum(int(t) for t, _ in groups)
    # MemAvailable counts the page cache that can be reclaimed, the inputs' included.
    avail = next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo")
                 if l.startswith("MemAvailable:"))
    title = (
        f"{name}: {count} checkpoints × {inputs[0].stat().st_size / 1e6:.0f} MB {dtype} "
        f"({ntensors} tensors: {mix}), {size / 1e9:.2f} GB of inputs"
    )
    log(f"== {title}")
    if size > avail:
        log(f"warning: {size / 1e9:.1f} GB of inputs, {avail / 1e9:.1f} GB of memory available: "
            "the inputs may not stay page-cached")

    timm_script, timm_why = find_timm_script(args) if "timm" in tools else (None, None)
    notes = []
    if "timm" in tools and timm_script is None:
        notes.append(f"timm: skipped: {timm_why}")
        tools = [t for t in tools if t != "timm"]
    if "torch" in tools or "timm" in tools:
        r = subprocess.run([args.python, "-c", "import torch, safetensors"], capture_output=True)
        if r.returncode != 0:
            notes.append(f"torch/timm: skipped: torch or safetensors not importable by {args.python}")
            tools = [t for t in tools if t not in ("torch", "timm")]
    if not Path("/dev/shm").is_dir() and any(t.endswith("-tmpfs") for t in tools):
        notes.append("ema-tmpfs and the sweeps on tmpfs: skipped: no /dev/shm")
        tools = [t for t in tools if not t.endswith("-tmpfs")]
    for n in notes:
        log(n)

    outdir = out / "results"
    outdir.mkdir(parents=True, exist_ok=True)
    # Page the inputs in, and warm ema-tool up once.
    run_measured(["cat", *map(str, inputs)])
    cmd, o = commands("ema", ema_tool, args.python, inputs, outdir, None)
    run_measured(cmd)
    o.unlink()

    results = {t: [] for t in tools}
    for rep in range(args.reps):
        order = tools[rep % len(tools):] + tools[: rep % len(tools)]
        for t in order:
            cmd, o = commands(t, ema_tool, args.python, inputs, outdir, timm_script)
            m = run_measured(cmd, env=TOOL_ENV.get(t))
            if o is not None:
                last = rep == args.reps - 1
                m["sha256"] = sha256(o) if t in ("ema", "ema-pread", "ema-base") and last else None
                if o.is_dir():
                    shutil.rmtree(o)
                elif rep == args.reps - 1 and t in ("ema", "torch", "swa"):
                    o.rename(outdir / f"last-{t}.safetensors")
                else:
                    o.unlink()
            results[t].append(m)
        log(f"  rep {rep + 1}/{args.reps}: " + ", ".join(
            f"{t} {results[t][-1]['wall']:.3f} s" for t in tools))

    checks = {}
    if "ema" in tools:
        # The same bytes whatever the number of threads, the read strategy, the build.
        want = results["ema"][-1]["sha256"]
        for t, what in (("ema-pread", "inputs read with pread"), ("ema-base", "--baseline")):
            if t in tools:
                checks[f"same output with {what}"] = results[t][-1]["sha256"] == want
        for threads in (1, 3):
            cmd, o = commands("ema", ema_tool, args.python, inputs, outdir, None)
            cmd[2:2] = ["--threads", str(threads)]
            run_measured(cmd)
            checks[f"same output with --threads {threads}"] = sha256(o) == want
            o.unlink()
        if "torch" in tools:
            r = compare_with_torch(args.python, outdir / "last-ema.safetensors",
                                   outdir / "last-torch.safetensors")
            if r is not None:
                checks["max |ema-tool − torch|"] = r[0]
                checks["max |torch|"] = r[1]
        # inspect of the largest input, headers only: median of 20 runs.
        walls = [run_measured([str(ema_tool), "inspect", str(inputs[-1])])["wall"]
                 for _ in range(20)]
        checks["inspect ms (median of 20)"] = round(statistics.median(walls) * 1000, 1)
    if any(t.endswith("-tmpfs") and t.startswith("sweep") for t in tools):
        # What the page cache alone takes to write one output, without ema-tool.
        path = Path("/dev/shm") / f"ema-tool-write-floor-{os.getpid()}.bin"
        times = write_floor.measure(str(path), "pwrite", inputs[-1].stat().st_size, args.reps)
        checks[BARE_PWRITE] = round(statistics.median(times), 3)
        times = write_floor.measure_kept("/dev/shm", inputs[-1].stat().st_size, 8, args.reps)
        checks[BARE_PWRITE_KEPT] = round(statistics.median(times), 3)
    for f in outdir.glob("last-*"):
        f.unlink()
    return {
        "name": name, "title": title, "bytes": size, "count": count, "mix": mix,
        "dtype": dtype, "reps": args.reps, "results": results, "checks": checks,
        "notes": notes,
    }


def ratio_median(results, num, den):
    rs = [a["wall"] / b["wall"] for a, b in zip(results[num], results[den])]
    return median_spread(rs)


def report(s):
    res = s["results"]
    lines = [f"### {s['title']}", ""]
    lines.append(f"{s['reps']} repetitions; wall: median [min–max]; ratios: median of the "
                 "per-repetition ratios [min–max].")
    lines.append("")
    lines.append("| tool | wall s | CPU s (user+sys) | peak RSS MiB | GB/s | wall / cat |")
    lines.append("|---|---|---|---|---|---|")
    label = {
        "cat": "`cat` inputs > /dev/null (read limit)",
        "ema": "`ema-tool ema`",
        "swa": "`ema-tool swa`",
        "ema-tmpfs": "`ema-tool ema`, output on tmpfs",
        "ema-pread": "`ema-tool ema`, inputs read with pread",
        "ema-base": "`ema-tool ema`, --baseline binary",
        "torch": "PyTorch script (bench/torch_ema.py)",
        "timm": "timm avg_checkpoints.py",
        "sweep4-tmpfs": "`ema-tool ema`, 4-value sweep, outputs on tmpfs",
        "sweep8-tmpfs": "`ema-tool ema`, 8-value sweep, outputs on tmpfs",
        "sep4-tmpfs": "`ema-tool ema` run 4 times, outputs on tmpfs",
        "sweep4": "`ema-tool ema`, 4-value sweep",
        "sweep8": "`ema-tool ema`, 8-value sweep",
    }
    for t, ms in res.items():
        w = median_spread([m["wall"] for m in ms])
        cpu = statistics.median([m["cpu"] for m in ms])
        user = statistics.median([m["user"] for m in ms])
        sys_ = statistics.median([m["sys"] for m in ms])
        rss = max(m["rss_mib"] for m in ms)
        vs_cat = "–"
        if "cat" in res:
            r = ratio_median(res, t, "cat")
            vs_cat = f"{r[0]:.2f} [{r[1]:.2f}–{r[2]:.2f}]"
        lines.append(
            f"| {label[t]} | {w[0]:.3f} [{w[1]:.3f}–{w[2]:.3f}] | {cpu:.2f} ({user:.2f}+{sys_:.2f}) "
            f"| {rss:.0f} | {s['bytes'] / w[0] / 1e9:.1f} | {vs_cat} |"
        )
    lines.append("")
    if "torch" in res and "ema" in res:
        r = ratio_median(res, "torch", "ema")
        inside = [float(m["stderr"].split("torch_ema: ")[1].split()[0])
                  for m in res["torch"] if "torch_ema: " in m["stderr"]]
        lines.append(f"- PyTorch script / `ema-tool ema`: **{r[0]:.1f}×** [{r[1]:.1f}–{r[2]:.1f}] "
                     f"(the script after `import torch`: {statistics.median(inside):.2f} s)")
    if "timm" in res and "ema" in res:
        r = ratio_median(res, "timm", "ema")
        lines.append(f"- timm avg_checkpoints.py / `ema-tool swa`: **{r[0]:.1f}×** [{r[1]:.1f}–{r[2]:.1f}]")
    if "ema-tmpfs" in res and "ema" in res:
        r = ratio_median(res, "ema", "ema-tmpfs")
        lines.append(f"- output on disk (write + fsync) / on tmpfs: {r[0]:.2f} [{r[1]:.2f}–{r[2]:.2f}]")
    for one, suffix, where in (("ema-tmpfs", "-tmpfs", "outputs on tmpfs"), ("ema", "", "on disk")):
        for t, what in ((f"sweep4{suffix}", "4-value sweep"), (f"sweep8{suffix}", "8-value sweep"),
                        (f"sep4{suffix}", "4 separate runs")):
            if t in res and one in res:
                r = ratio_median(res, t, one)
                c = statistics.median(a["cpu"] / b["cpu"] for a, b in zip(res[t], res[one]))
                lines.append(f"- {what} / one fold, {where}: **{r[0]:.2f}×** wall "
                             f"[{r[1]:.2f}–{r[2]:.2f}], {c:.2f}× CPU")
    bare = s["checks"].get(BARE_PWRITE)
    for t, k in (("sweep4-tmpfs", 4), ("sweep8-tmpfs", 8)):
        if bare is None or t not in res or "ema-tmpfs" not in res:
            continue
        one = res["ema-tmpfs"]
        f = statistics.median(m["wall"] for m in one)
        med = lambda ms, key: statistics.median(m[key] for m in ms)
        du = (med(res[t], "user") - med(one, "user")) / (k - 1)
        ds = (med(res[t], "sys") - med(one, "sys")) / (k - 1)
        cores = len(os.sched_getaffinity(0))
        # The sweep's time estimated as the one fold's plus its extra CPU time spread over the
        # cores; and what the extra outputs' writes would add if each cost a bare pwrite.
        estimate = 1 + (k - 1) * (du + ds) / cores / f
        writes = 1 + (k - 1) * bare / cores / f
        kept = s["checks"].get(BARE_PWRITE_KEPT)
        kept_text = "" if kept is None else f"; of each of 8 kept together: {kept:.3f} s"
        kept_adds = "" if kept is None else f" ({(k - 1) * kept / cores / f:.2f}× at the cost of 8 kept)"
        lines.append(
            f"- {k}-value sweep, each output beyond the first: {du:.3f} s user + {ds:.3f} s sys "
            f"(a bare pwrite of one output: {bare:.3f} s{kept_text}); with one fold at {f:.3f} s "
            f"on {cores} cores, those costs estimate the sweep at {estimate:.2f}× one fold; the "
            f"bare writes alone would add {writes - 1:.2f}×{kept_adds}")
    for k, v in s["checks"].items():
        lines.append(f"- {k}: {v if not isinstance(v, float) else f'{v:.3g}'}")
    for n in s["notes"]:
        lines.append(f"- {n}")
    return "\n".join(lines) + "\n"


def targets(s):
    """The targets of issue #4, where the series is one they apply to."""
    res, out = s["results"], []
    if "ema" in res and "cat" in res:
        for t in ("ema", "swa"):
            if t in res:
                r = ratio_median(res, t, "cat")[0]
                out.append((f"{s['name']}: {t} wall ≤ 1.5 × cat", r <= 1.5, f"{r:.2f}×"))
        rss = max(m["rss_mib"] for t in ("ema", "swa") if t in res for m in res[t])
        out.append((f"{s['name']}: ema-tool peak RSS < 128 MiB", rss < 128, f"{rss:.0f} MiB"))
    if "torch" in res and "ema" in res:
        r = ratio_median(res, "torch", "ema")[0]
        out.append((f"{s['name']}: ≥ 10× faster than the PyTorch script", r >= 10, f"{r:.1f}×"))
    for t, bound in (("sweep4-tmpfs", 2.0), ("sweep8-tmpfs", 3.0)):
        if t in res and "ema-tmpfs" in res:
            r = ratio_median(res, t, "ema-tmpfs")[0]
            out.append((f"{s['name']}: {t} wall ≤ {bound} × one fold", r <= bound, f"{r:.2f}×"))
    sweeps = [m for t in res if t.startswith("sweep") for m in res[t]]
    if sweeps:
        rss = max(m["rss_mib"] for m in sweeps)
        out.append((f"{s['name']}: sweep peak RSS < 128 MiB", rss < 128, f"{rss:.0f} MiB"))
    ms = s["checks"].get("inspect ms (median of 20)")
    if ms is not None:
        out.append((f"{s['name']}: inspect < 20 ms", ms < 20, f"{ms} ms"))
    for k, v in s["checks"].items():
        if k.startswith("same output"):
            out.append((f"{s['name']}: {k}", v, "identical" if v else "DIFFERENT"))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="default")
    p.add_argument("--count", type=int, help="one custom series of COUNT checkpoints instead of a suite")
    p.add_argument("--mix", default="64x1048576", help="tensors of the custom series: TxE[,TxE…]")
    p.add_argument("--dtype", default="f32", choices=sorted(DTYPE_SIZE))
    p.add_argument("--tools", default="cat,ema,swa,ema-tmpfs,torch,timm")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    p.add_argument("--python", default=sys.executable, help="Python with torch for the baselines")
    p.add_argument("--timm-script", help="path to timm's avg_checkpoints.py")
    p.add_argument("--ema-tool", help="use this binary instead of building one")
    p.add_argument("--gen-series", help="with --ema-tool: the gen-series binary")
    p.add_argument("--baseline", help="also time this ema-tool binary (an earlier build) as ema-base")
    p.add_argument("--keep", action="store_true", help="keep the generated series")
    p.add_argument("--json", help="also write the raw measurements here")
    args = p.parse_args()
    if args.count:
        series = [(f"{args.dtype}-x{args.count}", args.count, args.mix, args.dtype, args.tools)]
    else:
        series = SUITES[args.suite]
    ema_tool, gen = build(args)
    global BASELINE
    if args.baseline:
        BASELINE = Path(args.baseline).resolve()
        series = [(n, c, m, d, t + ",ema-base") for n, c, m, d, t in series]
    version = subprocess.run([ema_tool, "--version"], capture_output=True, text=True).stdout.strip()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    machine = f"{len(os.sched_getaffinity(0))} CPUs ({cpu}), {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB"
    if not GNU_TIME:
        log("warning: no /usr/bin/time (apt-get install time): peak RSS from wait4, which "
            "includes this Python's own RSS as a floor")
    header = (f"{version}; {machine}; load average at start {os.getloadavg()[0]:.1f}; "
              f"command: python3 bench/run.py {' '.join(sys.argv[1:])}".rstrip())
    all_results, all_targets = [], []
    try:
        for name, count, mix, dtype, tools in series:
            s = bench_series(args, ema_tool, gen, name, count, mix, dtype, tools.split(","))
            all_results.append(s)
            all_targets += targets(s)
            print(report(s), flush=True)
            if not args.keep:
                shutil.rmtree(Path(args.out) / "series" / name, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(Path(args.out) / "results", ignore_errors=True)
    print(header)
    print()
    if all(s["count"] for s in all_results) and args.suite == "scaling" and not args.count:
        print("### Scaling")
        print()
        print("| series | GB read | ema wall s | s per GB | cat s per GB | ema peak RSS MiB |")
        print("|---|---|---|---|---|---|")
        for s in all_results:
            w = statistics.median(m["wall"] for m in s["results"]["ema"])
            c = statistics.median(m["wall"] for m in s["results"]["cat"])
            rss = max(m["rss_mib"] for m in s["results"]["ema"])
            gb = s["bytes"] / 1e9
            print(f"| {s['name']} | {gb:.2f} | {w:.3f} | {w / gb:.3f} | {c / gb:.3f} | {rss:.0f} |")
        print()
    if args.suite == "sweep" and not args.count:
        print("### Targets (issue #11; `inspect` and `--threads`: issue #4)")
        print()
        print("(Set for the 8 × 256 MB f32 series, page-cached, outputs on tmpfs.)")
    else:
        print("### Targets (issue #4)")
        print()
        print("(The targets are set for 8 checkpoints × 256 MB of few large tensors, f32 and bf16, and")
        print("`inspect` of any checkpoint; the other series are checked against them for information.)")
    print()
    for what, ok, got in all_targets:
        print(f"- {'PASS' if ok else 'FAIL'}: {what} ({got})")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "series": all_results}, indent=1))


if __name__ == "__main__":
    main()
