"""Seeds for the torch_reader fuzz target: small checkpoints written by the real torch.save.

Run with a Python that has torch: `python fuzz/make_torch_seeds.py` (writes
fuzz/seeds/torch_reader/). The files are committed; rerun only to change them.
"""
import argparse
import collections
import os

import torch

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", "torch_reader")
os.makedirs(here, exist_ok=True)
torch.manual_seed(0)

w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
seeds = {
    "plain_state_dict.pth": collections.OrderedDict(
        [("conv.weight", w), ("conv.bias", torch.zeros(3)), ("bn.num_batches_tracked", torch.tensor(5))]
    ),
    "mmengine.pth": {
        "meta": {"iter": 1000, "epoch": 2},
        "state_dict": {"head.weight": w, "head.bias": torch.ones(2, dtype=torch.bfloat16)},
        "ema_state_dict": {"module.head.weight": w * 2, "module.head.bias": torch.ones(2, dtype=torch.bfloat16), "steps": torch.tensor(1000)},
        "message_hub": {"log_scalars": {}, "runtime_info": {"iter": 1000}},
    },
    "shared_and_views.pth": {"a": w, "a_t": w.t(), "row": w[1], "scalar": torch.tensor(3.5, dtype=torch.float16)},
    "timm.pth": {"epoch": 12, "state_dict": {"fc.weight": w}, "state_dict_ema": {"fc.weight": w + 1}, "args": argparse.Namespace(lr=0.1, model="resnet")},
    "empty_and_int.pth": {"e": torch.empty(0, 3), "i8": torch.tensor([1, -1], dtype=torch.int8), "flag": torch.tensor(True)},
}
for name, obj in seeds.items():
    torch.save(obj, os.path.join(here, name))
# The legacy (non-zip) format, which the reader must refuse with a message.
torch.save({"w": w}, os.path.join(here, "legacy_format.pth"), _use_new_zipfile_serialization=False)
print("wrote", len(seeds) + 1, "seeds to", here)
