#!/usr/bin/env python3
"""Times `ema-tool posthoc` against ema-pytorch's `PostHocEMA.synthesize_ema_model`.

    python3 bench/posthoc.py --python /path/to/venv/bin/python   # as in BENCHMARKS.md
    python3 bench/posthoc.py --mb 16 --reps 1                     # a quick run

It makes a PostHocEMA checkpoint folder with ema-pytorch itself (kept in the ignored
bench/out/posthoc/ between runs unless --clean): a model of 64 float32 parameters, two
profiles (sigma_rels 0.05 and 0.28), 8 snapshots of each, every snapshot --mb megabytes
(PostHocEMA writes float16). The folder is read once so that it is page-cached. Then, in
turn, --reps times:

- `ema-tool posthoc FOLDER --snapshot-sigma-rels 0.05,0.28 --sigma-rel S1,S2,S3,S4
  --no-normalize`: four outputs from one read;
- a Python process that builds the PostHocEMA over the same folder and calls
  `synthesize_ema_model(sigma_rel=S)` for each of the four values, saving each result's
  state dict with safetensors (what a user does with it).

Both write to /dev/shm (tmpfs), so the disk's write speed does not decide the figure.
Reported: wall, CPU and peak RSS of each whole process, and their ratio pair by pair; the
Python side also prints the time of its four synthesize calls alone (after `import torch`
and the model's construction). Untimed, the outputs are compared: ema-tool's --no-normalize
output is ema-pytorch's to within float16 rounding (ema-pytorch sums in float16 in place).
Needs torch, safetensors and ema-pytorch in --python.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import run_measured, build, log  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIGMA_RELS = (0.05, 0.28)
TARGETS = ("0.08", "0.12", "0.16", "0.2")
SNAPSHOTS = 8
TENSORS = 64

MAKE = textwrap.dedent("""
    import sys, torch, torch.nn as nn
    from ema_pytorch import PostHocEMA
    folder, elements, snapshots = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    net = nn.Module()
    net.p = nn.ParameterList([nn.Parameter(torch.randn(elements)) for _ in range({tensors})])
    ph = PostHocEMA(net, sigma_rels={sigma_rels}, update_every=1,
                    checkpoint_every_num_steps=10, checkpoint_folder=folder)
    with torch.no_grad():
        for step in range(10 * snapshots):
            for p in net.p:
                p.mul_(0.999).add_(0.01)
            ph.update()
""")

SYNTH = textwrap.dedent("""
    import sys, time, torch, torch.nn as nn
    from safetensors.torch import save_file
    from ema_pytorch import PostHocEMA
    folder, elements, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    net = nn.Module()
    net.p = nn.ParameterList([nn.Parameter(torch.zeros(elements)) for _ in range({tensors})])
    ph = PostHocEMA(net, sigma_rels={sigma_rels}, update_every=1,
                    checkpoint_every_num_steps=10, checkpoint_folder=folder)
    t = time.perf_counter()
    for s in sys.argv[4:]:
        m = ph.synthesize_ema_model(sigma_rel=float(s))
        sd = {{k: v.contiguous() for k, v in m.ema_model.state_dict().items()}}
        save_file(sd, out.replace("{{sigma_rel}}", s))
        del m, sd
    print(f"synthesize: {{time.perf_counter() - t:.2f}} s", file=sys.stderr)
""")

COMPARE = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file
    a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
    worst = 0.0
    for k, v in b.items():
        x = a[k] if k in a else a["ema_model." + k]
        d = (x.double() - v.double()).abs().max().item()
        worst = max(worst, d / max(v.double().abs().max().item(), 1e-30))
    print(worst)
""")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default=sys.executable, help="Python with torch and ema-pytorch")
    p.add_argument("--mb", type=int, default=256, help="megabytes per snapshot (float16)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "posthoc"))
    p.add_argument("--ema-tool", help="use this binary instead of building one")
    p.add_argument("--clean", action="store_true", help="delete the snapshot folder at the end")
    args = p.parse_args()

    class B:  # what run.build() reads
        ema_tool = args.ema_tool
        gen_series = None

    ema_tool = Path(args.ema_tool) if args.ema_tool else build(B)[0]
    elements = args.mb * 1_000_000 // 2 // TENSORS
    folder = Path(args.out) / f"snapshots-{args.mb}MB"
    if len(list(folder.glob("*.pt"))) != len(SIGMA_RELS) * SNAPSHOTS:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        log(f"making {len(SIGMA_RELS)} × {SNAPSHOTS} PostHocEMA snapshots of {args.mb} MB "
            f"in {folder}")
        make = MAKE.format(tensors=TENSORS, sigma_rels=SIGMA_RELS)
        subprocess.run([args.python, "-c", make, str(folder), str(elements), str(SNAPSHOTS)],
                       check=True)
    snaps = sorted(folder.glob("*.pt"))
    size = sum(f.stat().st_size for f in snaps)
    run_measured(["cat", *map(str, snaps)])

    shm = Path("/dev/shm") / f"ema-tool-posthoc-{os.getpid()}"
    shm.mkdir()
    tool_out = str(shm / "tool-{sigma_rel}.safetensors")
    py_out = str(shm / "py-{sigma_rel}.safetensors")
    tool = [str(ema_tool), "posthoc", "-q", str(folder), "--snapshot-sigma-rels",
            ",".join(map(str, SIGMA_RELS)), "--sigma-rel", ",".join(TARGETS),
            "--no-normalize", "--force", "-o", tool_out]
    synth = [args.python, "-c", SYNTH.format(tensors=TENSORS, sigma_rels=SIGMA_RELS),
             str(folder), str(elements), py_out, *TARGETS]
    res = {"ema-tool": [], "ema-pytorch": []}
    try:
        for rep in range(args.reps):
            order = ["ema-tool", "ema-pytorch"] if rep % 2 == 0 else ["ema-pytorch", "ema-tool"]
            for t in order:
                m = run_measured(tool if t == "ema-tool" else synth)
                res[t].append(m)
            log(f"  rep {rep + 1}/{args.reps}: " +
                ", ".join(f"{t} {res[t][-1]['wall']:.2f} s" for t in res))
        worst = max(float(subprocess.run(
            [args.python, "-c", COMPARE, tool_out.replace("{sigma_rel}", s),
             py_out.replace("{sigma_rel}", s)],
            capture_output=True, text=True, check=True).stdout) for s in TARGETS)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        if args.clean:
            shutil.rmtree(folder, ignore_errors=True)

    print(f"### posthoc: {len(SIGMA_RELS)} × {SNAPSHOTS} PostHocEMA snapshots × "
          f"{snaps[0].stat().st_size / 1e6:.0f} MB float16 ({size / 1e9:.2f} GB), "
          f"{len(TARGETS)} sigma_rel outputs, outputs on tmpfs\n")
    print(f"{args.reps} repetitions; median [min–max].\n")
    print("| tool | wall s | CPU s (user+sys) | peak RSS MiB |")
    print("|---|---|---|---|")
    for t, ms in res.items():
        w = [m["wall"] for m in ms]
        cpu = statistics.median(m["cpu"] for m in ms)
        user = statistics.median(m["user"] for m in ms)
        sys_ = statistics.median(m["sys"] for m in ms)
        label = ("`ema-tool posthoc`, 4 σ_rel in one run" if t == "ema-tool" else
                 "ema-pytorch `synthesize_ema_model` × 4 (+ save_file)")
        print(f"| {label} | {statistics.median(w):.2f} [{min(w):.2f}–{max(w):.2f}] | "
              f"{cpu:.2f} ({user:.2f}+{sys_:.2f}) | {max(m['rss_mib'] for m in ms):.0f} |")
    ratios = [b["wall"] / a["wall"] for a, b in zip(res["ema-tool"], res["ema-pytorch"])]
    inside = [float(m["stderr"].split("synthesize: ")[1].split()[0]) for m in res["ema-pytorch"]]
    print()
    print(f"- ema-pytorch / ema-tool, whole processes: **{statistics.median(ratios):.1f}×** "
          f"[{min(ratios):.1f}–{max(ratios):.1f}]")
    r_in = statistics.median(i / a["wall"] for i, a in zip(inside, res["ema-tool"]))
    print(f"- the four synthesize calls alone (after `import torch` and the model): "
          f"{statistics.median(inside):.2f} s, {r_in:.1f}× ema-tool's whole process")
    print(f"- largest |ema-tool − ema-pytorch| / max |ema-pytorch| over the outputs: {worst:.3g}")


if __name__ == "__main__":
    main()
