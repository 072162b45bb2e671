#!/usr/bin/env python3
"""`ema-tool inspect` of legacy-format and pickled-module checkpoints reads headers only:
its time against the size of the file, beside `torch.load` of the same file, in one run.

    python bench/formats.py [--size-mb 1024] [--runs 3] [--bin target/release/ema-tool]

Needs torch (the venv of fixtures/requirements.txt). Writes under bench/out/formats/ (made
once, reused): for each size, a legacy-format state dict (`_use_new_zipfile_serialization=
False`), a `torch.save(model)` of a whole nn.Module (zip), and a `pickle.dump` of a dict of
tensors (storages embedded as bytes). Prints a Markdown table: file, size, tensors, median
seconds of `ema-tool inspect`, of `ema-tool inspect --json -t` and of `torch.load`
(weights_only=False, mmap where torch allows; `pickle.load` for the pickle), and their ratio. Page-cached: every file is read
once before timing.
"""

import argparse
import os
import pickle
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn


def make(path, kind, mb):
    if os.path.exists(path):
        return
    torch.manual_seed(0)
    n = 64
    per = max(1, mb * 2**20 // 4 // n)
    if kind == "module":
        layers = [nn.Linear(1, 1) for _ in range(n)]
        for layer in layers:
            layer.weight = nn.Parameter(torch.randn(per))
        model = nn.Sequential(*layers)
        model.register_buffer("steps", torch.tensor(5))
        torch.save(model, path)
        return
    sd = {f"layers.{i}.weight": torch.randn(per) for i in range(n)}
    sd["layers.0.weight_t"] = sd["layers.0.weight"][: per // 2 * 2].view(2, -1).t()
    if kind == "legacy":
        torch.save({"state_dict": sd, "meta": {"epoch": 3}}, path,
                   _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(sd, f, protocol=4)


def timed(cmd, runs):
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def torch_load(path, runs):
    code = (
        "import pickle, sys, torch\n"
        "p = sys.argv[1]\n"
        "if p.endswith('.pkl'):\n"
        "    pickle.load(open(p, 'rb'))\n"
        "else:\n"
        "  try:\n"
        "    torch.load(p, weights_only=False, mmap=True)\n"
        "  except Exception:\n"
        "    torch.load(p, weights_only=False)\n"
    )
    return timed([sys.executable, "-c", code, path], runs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, nargs="+", default=[64, 1024])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bin", default="target/release/ema-tool")
    args = ap.parse_args()
    out = os.path.join("bench", "out", "formats")
    os.makedirs(out, exist_ok=True)
    rows = []
    for mb in args.size_mb:
        for kind, ext in [("legacy", "pth"), ("module", "pt"), ("pickle", "pkl")]:
            path = os.path.join(out, f"{kind}-{mb}mb.{ext}")
            make(path, kind, mb)
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
            size = os.path.getsize(path)
            a = timed([args.bin, "inspect", path], args.runs)
            b = timed([args.bin, "inspect", "--json", "-t", path], args.runs)
            c = torch_load(path, args.runs)
            rows.append((os.path.basename(path), size, a, b, c))
    print(f"`python bench/formats.py --size-mb {' '.join(map(str, args.size_mb))} "
          f"--runs {args.runs}` (median of {args.runs}, page-cached, torch {torch.__version__})\n")
    print("| file | bytes | `inspect` s | `inspect --json -t` s | `torch.load` s | torch.load / inspect |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, size, a, b, c in rows:
        print(f"| `{name}` | {size:,} | {a:.3f} | {b:.3f} | {c:.3f} | {c / a:.0f}× |")


if __name__ == "__main__":
    main()
