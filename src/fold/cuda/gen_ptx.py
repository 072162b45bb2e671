#!/usr/bin/env python3
"""Compiles kernels.cu into kernels.ptx, the PTX that ema-tool embeds and the CUDA driver
compiles for the device when the module is loaded (no NVRTC at run time).

    python3 -m venv /tmp/nvrtc && /tmp/nvrtc/bin/pip install nvidia-cuda-nvrtc-cu12==12.0.140
    /tmp/nvrtc/bin/python src/fold/cuda/gen_ptx.py          # rewrites kernels.ptx
    /tmp/nvrtc/bin/python src/fold/cuda/gen_ptx.py --check  # exit 1 if kernels.ptx differs
    python3 src/fold/cuda/gen_ptx.py --wheel                 # the pinned wheel

NVRTC comes from the pinned `nvidia-cuda-nvrtc-cu12` wheel of the Python running this script
(called through ctypes; no CUDA toolkit, no GPU). Both ends are chosen to be conservative: the
PTX ISA is CUDA 12.0's (8.0), so any driver from 525 on (CUDA 12.0 or newer, 13.x included)
loads it, and the architecture is compute_60, so the driver can JIT it for any GPU from Pascal
on. (NVRTC 13 emits ISA 9.x, which needs a CUDA 13 driver, and dropped everything before
compute_75.)
"""

import ctypes
import glob
import os
import sys
import zlib

WHEEL = "nvidia-cuda-nvrtc-cu12==12.0.140"
LIBRARY = "libnvrtc.so.12"
ARCH = "compute_60"
# Unfused multiply and add, as on the CPU (the kernels also say so with __dmul_rn/__dadd_rn).
OPTIONS = [f"--gpu-architecture={ARCH}", "--fmad=false"]

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "kernels.cu")
OUTPUT = os.path.join(HERE, "kernels.ptx")


def nvrtc():
    """The LIBRARY of the `nvidia` package of this Python environment."""
    try:
        import nvidia  # the namespace package of NVIDIA's wheels
    except ImportError:
        sys.exit(f"gen_ptx.py: no `nvidia` package here: pip install {WHEEL}")
    for root in nvidia.__path__:
        found = sorted(glob.glob(os.path.join(root, "*", "lib", LIBRARY)))
        if found:
            return ctypes.CDLL(found[0])
    sys.exit(f"gen_ptx.py: no {LIBRARY} in {list(nvidia.__path__)}: pip install {WHEEL}")


def compile_ptx(lib, source):
    def check(what, rc, prog=None):
        if rc == 0:
            return
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        msg = lib.nvrtcGetErrorString(rc).decode()
        log = ""
        if prog is not None:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace")
        sys.exit(f"gen_ptx.py: {what}: {msg}\n{log}")

    prog = ctypes.c_void_p()
    check(
        "nvrtcCreateProgram",
        lib.nvrtcCreateProgram(
            ctypes.byref(prog), source.encode(), b"kernels.cu", 0, None, None
        ),
    )
    opts = (ctypes.c_char_p * len(OPTIONS))(*(o.encode() for o in OPTIONS))
    check("nvrtcCompileProgram", lib.nvrtcCompileProgram(prog, len(OPTIONS), opts), prog)
    size = ctypes.c_size_t()
    check("nvrtcGetPTXSize", lib.nvrtcGetPTXSize(prog, ctypes.byref(size)))
    buf = ctypes.create_string_buffer(size.value)
    check("nvrtcGetPTX", lib.nvrtcGetPTX(prog, buf))
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return buf.value.decode()


def main():
    if sys.argv[1:] == ["--wheel"]:
        print(WHEEL)  # for CI, which installs it into a throwaway venv
        return
    check = sys.argv[1:] == ["--check"]
    if sys.argv[1:] not in ([], ["--check"]):
        sys.exit("usage: gen_ptx.py [--check | --wheel]")
    lib = nvrtc()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    with open(SOURCE, encoding="utf-8") as f:
        source = f.read()
    # The CRC-32 of the source lets `cargo test` notice a stale PTX without NVRTC.
    header = (
        f"// Generated from kernels.cu by gen_ptx.py ({WHEEL}, NVRTC "
        f"{major.value}.{minor.value}, {' '.join(OPTIONS)}); do not edit.\n"
        f"// kernels.cu crc32 {zlib.crc32(source.encode()):08x}\n"
    )
    ptx = header + compile_ptx(lib, source)
    if check:
        with open(OUTPUT, encoding="utf-8") as f:
            if f.read() != ptx:
                sys.exit(
                    "gen_ptx.py: src/fold/cuda/kernels.ptx is not the PTX of kernels.cu: "
                    "run src/fold/cuda/gen_ptx.py and commit the result"
                )
        print("kernels.ptx is up to date")
        return
    with open(OUTPUT, "w", encoding="utf-8") as f:
        f.write(ptx)
    print(f"wrote {OUTPUT} ({len(ptx)} bytes)")


if __name__ == "__main__":
    main()
