"""The baseline ema-tool is measured against: the script a user writes instead.

    python bench/torch_ema.py OUT.safetensors IN.safetensors... [--momentum M | --swa]

Loads each checkpoint whole with safetensors, folds it into float32 accumulators with
`lerp_` as mmengine's ExponentialMovingAverage does (avg = x_0, then avg.lerp_(x_k, m)),
and saves in the inputs' dtypes. `--swa` uses m_k = 1/(k+1), mmengine's
StochasticWeightAverage. Prints the seconds spent after `import torch` on stderr.
"""

import argparse
import sys
import time

import torch
from safetensors.torch import load_file, save_file

start = time.perf_counter()
p = argparse.ArgumentParser()
p.add_argument("output")
p.add_argument("inputs", nargs="+")
p.add_argument("--momentum", type=float, default=0.0002)
p.add_argument("--swa", action="store_true")
args = p.parse_args()

avg, dtypes = None, None
for k, path in enumerate(args.inputs):
    sd = load_file(path)
    if avg is None:
        dtypes = {n: t.dtype for n, t in sd.items()}
        avg = {n: t.float() if t.is_floating_point() else t for n, t in sd.items()}
        continue
    m = 1.0 / (k + 1) if args.swa else args.momentum
    for n, t in sd.items():
        if t.is_floating_point():
            avg[n].lerp_(t.float(), m)
        else:
            avg[n] = t
    del sd
save_file({n: t.to(dtypes[n]) for n, t in avg.items()}, args.output)
print(f"torch_ema: {time.perf_counter() - start:.3f} s after import", file=sys.stderr)
