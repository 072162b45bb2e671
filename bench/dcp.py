#!/usr/bin/env python3
"""Benchmark: SWA of a series of torch distributed checkpoints (DCP).

    python bench/dcp.py [--size-gb 1.0] [--checkpoints 3] [--dir /tmp/ema-tool-dcp-bench]
                        [--ema-tool target/release/ema-tool] [--keep]

Generates (once; reused when --dir already holds a matching series) N DCP checkpoints
``step-{1000,2000,...}`` of about SIZE/N GB each, saved by a real 2-process gloo run
(``torch.multiprocessing`` spawn, CPU) of DTensors sharded ``Shard(0)`` over 2 ranks with an
odd first dim (uneven chunks): one ``__0_0.distcp`` and ``__1_0.distcp`` per checkpoint,
f32 and bf16 tensors, a ``step`` entry. Then it times, each in its own process (peak RSS from
``wait4``):

* ``cat``: reading every file once (``cat files > /dev/null``), the read limit;
* ``torch``: ``dcp_to_torch_save`` of each checkpoint to a temporary ``.pt``, ``torch.load``,
  and a float64 running sum, then the mean cast back and saved as safetensors: what one does
  today in Python;
* ``ema-tool`` (with ``--ema-tool PATH``): ``PATH swa DIRS -o out.safetensors``.

Prints one line per measurement (seconds, peak RSS MB) and, with ema-tool, the ratios.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def gen_worker(rank, port, root, n_ckpt, per_ckpt_bytes):
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    mesh = init_device_mesh('cpu', (2,))
    # layers of (4097 x 1024) f32 and bf16 (4097 rows: chunks of 2049 and 2048)
    rows, cols = 4097, 1024
    per_layer = rows * cols * (4 + 2)
    layers = max(1, per_ckpt_bytes // per_layer)
    lo = (rows + 1) // 2
    mine = (0, lo) if rank == 0 else (lo, rows)
    g = torch.Generator().manual_seed(rank)
    for c in range(n_ckpt):
        sd = {}
        for i in range(layers):
            for name, dt in (('w', torch.float32), ('h', torch.bfloat16)):
                local = torch.randn(mine[1] - mine[0], cols, generator=g).to(dt)
                sd[f'layers.{i}.{name}'] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                                              shape=torch.Size([rows, cols]), stride=(cols, 1))
        dcp.save({'model': sd, 'step': 1000 * (c + 1)}, checkpoint_id=str(Path(root) / f'step-{1000 * (c + 1)}'))
        del sd
    dist.barrier()
    dist.destroy_process_group()


def generate(root, n_ckpt, size_gb):
    import socket
    import torch.multiprocessing as mp
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    mp.spawn(gen_worker, args=(port, str(root), n_ckpt, int(size_gb * 1e9 / n_ckpt)), nprocs=2, join=True)


TORCH_SWA = r'''
import sys, tempfile, torch
from pathlib import Path
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from safetensors.torch import save_file
dirs, out = sys.argv[1:-1], sys.argv[-1]

def flat(o, p='', d=None):
    d = {} if d is None else d
    if isinstance(o, torch.Tensor): d[p] = o
    elif isinstance(o, dict):
        for k, v in o.items(): flat(v, f'{p}.{k}' if p else str(k), d)
    return d

acc, last = None, None
with tempfile.TemporaryDirectory() as t:
    for d in dirs:
        pt = Path(t) / 'x.pt'
        dcp_to_torch_save(d, pt)
        sd = flat(torch.load(pt, weights_only=False))
        pt.unlink()
        if acc is None:
            acc = {k: v.double() for k, v in sd.items() if v.is_floating_point()}
        else:
            for k in acc: acc[k] += sd[k].double()
        last = sd
res = {k: (acc[k] / len(dirs)).to(last[k].dtype) if k in acc else v for k, v in last.items()}
save_file({k: v.contiguous() for k, v in res.items()}, out)
'''


def timed(cmd, **kw):
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, **kw)
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f'{cmd[0]} failed with {rc}')
    return dt, ru.ru_maxrss / 1024  # Linux: kB


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--size-gb', type=float, default=1.0, help='total size of the series (default 1.0)')
    ap.add_argument('--checkpoints', type=int, default=3)
    ap.add_argument('--dir', default=os.path.join(tempfile.gettempdir(), 'ema-tool-dcp-bench'))
    ap.add_argument('--ema-tool', help='time PATH swa DIRS -o out.safetensors too')
    ap.add_argument('--keep', action='store_true', help='keep the generated series')
    ap.add_argument('--generate-only', action='store_true', help=argparse.SUPPRESS)
    a = ap.parse_args()
    root = Path(a.dir)
    if a.generate_only:
        generate(root, a.checkpoints, a.size_gb)
        return
    stamp = root / 'series.json'
    want = {'size_gb': a.size_gb, 'checkpoints': a.checkpoints}
    if not (stamp.exists() and json.loads(stamp.read_text()) == want):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        t0 = time.perf_counter()
        # in a child process: this one stays small, so the peak RSS its children report (Linux
        # keeps ru_maxrss across fork + exec) is theirs
        subprocess.run([sys.executable, __file__, '--generate-only', '--dir', str(root), '--size-gb', str(a.size_gb),
                        '--checkpoints', str(a.checkpoints)], check=True)
        stamp.write_text(json.dumps(want))
        print(f'generated {a.checkpoints} checkpoints in {time.perf_counter() - t0:.1f} s')
    dirs = [str(root / f'step-{1000 * (c + 1)}') for c in range(a.checkpoints)]
    files = sorted(str(p) for d in dirs for p in Path(d).iterdir())
    total = sum(os.path.getsize(f) for f in files)
    print(f'series: {a.checkpoints} DCP checkpoints, 2 ranks, {total / 1e9:.2f} GB in {root}')
    out = root / 'out'
    out.mkdir(exist_ok=True)
    res = {}
    res['cat'] = timed(['sh', '-c', 'cat "$@" > /dev/null', 'cat'] + files)
    res['torch'] = timed([sys.executable, '-c', TORCH_SWA] + dirs + [str(out / 'torch.safetensors')])
    if a.ema_tool:
        res['ema-tool'] = timed([a.ema_tool, 'swa'] + dirs + ['-o', str(out / 'ema-tool.safetensors')])
    for k, (s, rss) in res.items():
        print(f'{k:10s} {s:8.2f} s  {total / 1e9 / s:6.2f} GB/s  peak RSS {rss:8.0f} MB')
    if a.ema_tool:
        print(f'ema-tool / cat = {res["ema-tool"][0] / res["cat"][0]:.2f}x, '
              f'torch / ema-tool = {res["torch"][0] / res["ema-tool"][0]:.1f}x')
    shutil.rmtree(out, ignore_errors=True)
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
