#!/usr/bin/env python3
"""Draws docs/posthoc.png, the figure of the README's post-hoc EMA example, from ema-tool's own
`posthoc --dry-run --json` over the committed PostHocEMA fixture folder.

    cargo build --release
    python3 docs/posthoc-figure.py [--ema-tool target/release/ema-tool]

Needs matplotlib and numpy. Left: the power-function profiles of the two snapshot σ_rel at the
last snapshot, and of the synthesised targets. Middle: the solved weights of the 12
snapshots for each target. Right: each target's profile next to the combination of the
snapshots' profiles with those weights (what the solve fits).
"""

import argparse
import json
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGETS = "0.08,0.12,0.16"


def profile(t, gamma, s):
    """The power-function EMA profile of exponent `gamma` at step `t`, over steps `s`."""
    return np.where(s <= t, (gamma + 1) * s ** gamma / t ** (gamma + 1), 0.0)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ema-tool", default=str(ROOT / "target" / "release" / "ema-tool"))
    p.add_argument("--out", default=str(ROOT / "docs" / "posthoc.png"))
    args = p.parse_args()
    plan = json.loads(subprocess.run(
        [args.ema_tool, "posthoc", "fixtures/posthoc/run", "--snapshot-sigma-rels", "0.05,0.28",
         "--sigma-rel", TARGETS, "--dry-run", "--json"],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    snaps, outs, T = plan["snapshots"], plan["outputs"], plan["step"]
    s = np.linspace(0.5, T, 600)

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 3.8))
    for g in sorted({x["gamma"] for x in snaps}, reverse=True):
        sig = next(x["sigma_rel"] for x in snaps if x["gamma"] == g)
        a.plot(s, profile(T, g, s), lw=2, label=f"snapshot profile σ_rel {sig:.3g}")
    for o in outs:
        a.plot(s, profile(T, o["params"]["gamma"], s), "--",
               label=f"target σ_rel {o['params']['sigma_rel']}")
    a.set(title=f"Power-function EMA profiles at step {T}", xlabel="training step",
          ylabel="weight of the model of that step")
    a.legend(fontsize=7)

    x = np.arange(len(snaps))
    width = 0.8 / len(outs)
    for j, o in enumerate(outs):
        b.bar(x + (j - (len(outs) - 1) / 2) * width, o["weights"], width,
              label=f"σ_rel {o['params']['sigma_rel']}")
    b.axhline(0, color="black", lw=0.5)
    b.set_xticks(x, [f"{v['step']}\n{v['sigma_rel']:.3g}" for v in snaps], fontsize=7)
    b.set(title="Solved weights of the snapshots", xlabel="snapshot (step, σ_rel)",
          ylabel="weight")
    b.legend(fontsize=7)

    for o in outs:
        fit = sum(w * profile(v["step"], v["gamma"], s) for w, v in zip(o["weights"], snaps))
        line, = c.plot(s, profile(T, o["params"]["gamma"], s), "--", lw=1)
        c.plot(s, fit, color=line.get_color(), lw=2, alpha=0.6,
               label=f"σ_rel {o['params']['sigma_rel']}: snapshots combined (solid), target (dashed)")
    c.set(title="What the weights synthesise", xlabel="training step")
    c.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
