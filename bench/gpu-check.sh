#!/usr/bin/env bash
# The GPU check of ema-tool's CUDA path, one prepared command for one 10-minute device call:
# the strict CUDA tests on the device, then `--device cuda` against `--device cpu` on every
# fixture case and on generated series, bit for bit, one line per case, then the benchmark
# series on both devices: GB/s of input, against the PCIe link's nominal host-to-device
# bandwidth and against the CPU path on the same machine.
#
#   bench/gpu-check.sh --prepare   # here, with the crates: release binaries -> bench/out/bin
#   bench/gpu-check.sh             # on the GPU machine (the device tool's $OUT gets the log)
#   DEVICE=cpu bench/gpu-check.sh  # rehearsal without a GPU (cpu against cpu)
#   STAND_IN=1 bench/gpu-check.sh  # rehearsal on the stand-in driver (tests/stand-in/libcuda.c)
#
# Binaries, first found: $EMA_TOOL and $GPU_CHECK; bench/out/bin/{ema-tool,gpu-check,cuda-tests}
# (made by --prepare and carried to the GPU machine: bench/out is git-ignored); else built on
# the spot with `cargo build --offline --release --features cuda`, from vendor/ when it exists.
#
# Environment: DEVICE (cuda), WORK (bench/out/gpu-check; about 2.5 x SERIES_GB of disk),
# SERIES_GB (2: the f32 benchmark series; the bf16 one is half of it), RUNS (1 timed run per
# device), FIXTURES (fixtures), OUT (where the log is written, gpu-check.log; the device tool
# sets it), EMA_NAN_NESS (1: NaN against NaN compared by NaN-ness only, see gpu-check.rs).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-$root/bench/out/gpu-check}
SERIES_GB=${SERIES_GB:-2}
RUNS=${RUNS:-1}
FIXTURES=${FIXTURES:-$root/fixtures}
bin_dir=$root/bench/out/bin

build() {
    local cfg=()
    if [[ -d vendor ]]; then
        cfg=(--config 'source.crates-io.replace-with="vendored"'
             --config 'source.vendored.directory="vendor"')
    fi
    local target=${CARGO_TARGET_DIR:-target} tests
    cargo build "${cfg[@]}" --offline --release --features cuda \
        --bin ema-tool --example gpu-check >&2
    # The CUDA tests, to run on the device against the carried ema-tool (EMA_TOOL_BIN).
    # Build messages go to stderr, so that a failed build shows its error, not `cp ""`.
    tests=$(cargo test "${cfg[@]}" --offline --release --features cuda --test cuda --no-run \
        --message-format=json |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
    if [[ -z $tests ]]; then
        echo "gpu-check.sh: the CUDA tests did not build" >&2
        exit 1
    fi
    mkdir -p "$bin_dir"
    cp "$target/release/ema-tool" "$target/release/examples/gpu-check" "$bin_dir/"
    cp "$tests" "$bin_dir/cuda-tests"
}

if [[ ${1:-} == --prepare ]]; then
    build
    echo "binaries in $bin_dir; carry bench/out/bin to the GPU machine"
    exit 0
fi

if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT"
    exec > >(tee "$OUT/gpu-check.log") 2>&1
fi
say() { printf '\n== %s\n' "$*"; }
if [[ -n ${EMA_TOOL:-} && -n ${GPU_CHECK:-} ]]; then
    :
elif [[ -x $bin_dir/ema-tool && -x $bin_dir/gpu-check ]]; then
    EMA_TOOL=$bin_dir/ema-tool GPU_CHECK=$bin_dir/gpu-check
else
    say "building (no bench/out/bin)"
    build
    EMA_TOOL=$bin_dir/ema-tool GPU_CHECK=$bin_dir/gpu-check
fi

rm -rf "$WORK"
mkdir -p "$WORK"
start=$SECONDS

say "machine"
uname -srm
nproc
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current \
        --format=csv,noheader || true
fi

# Only the driver is needed (the kernels are embedded PTX). ldconfig's list is read whole:
# `ldconfig -p | grep -q` fails under pipefail when grep stops reading early (status 141).
if [[ ${STAND_IN:-} == 1 ]]; then
    mkdir -p "$WORK/lib"
    cc -shared -fPIC -O2 -ffp-contract=off -I src/fold/cuda -o "$WORK/lib/libcuda.so" \
        tests/stand-in/libcuda.c -lpthread
    export LD_LIBRARY_PATH=$WORK/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "driver: the stand-in, $WORK/lib/libcuda.so (kernels on the CPU)"
elif [[ $DEVICE != cpu ]]; then
    libs=$(ldconfig -p 2>/dev/null || true)
    if grep -q 'libcuda\.so' <<<"$libs"; then
        echo "driver: $(grep -m1 'libcuda\.so' <<<"$libs" | sed 's/.*=> //')"
    else
        echo "driver: no libcuda.so in ldconfig's cache (LD_LIBRARY_PATH may still have one)"
    fi
fi

failures=0
check() { # NAME A B: compare two outputs
    local r
    if r=$("$GPU_CHECK" compare "$2" "$3"); then
        echo "ok    $1: $r"
    else
        echo "FAIL  $1: $r"
        failures=$((failures + 1))
    fi
}

say "device"
"$GPU_CHECK" gen "$WORK/probe" --count 2 --tensors 2 --elems 1000 >/dev/null
if ! "$EMA_TOOL" ema "$WORK"/probe/*.safetensors -o "$WORK/probe.safetensors" --device "$DEVICE"; then
    echo "the device cannot be used; stopping"
    exit 1
fi

if [[ $DEVICE != cpu && ${STAND_IN:-} != 1 && -x ${CUDA_TESTS:-$bin_dir/cuda-tests} ]]; then
    say "the CUDA tests on the device (strict: success and the CPU's bytes required)"
    if ! EMA_TOOL_BIN=$EMA_TOOL EMA_TOOL_TEST_STRICT=1 "${CUDA_TESTS:-$bin_dir/cuda-tests}" \
        --test-threads 4 2>&1 | grep -E '^test |test result|panicked|differ|left|right'; then
        failures=$((failures + 1))
    fi
fi

say "agreement: fixture cases (--device cpu vs --device $DEVICE, bit for bit)"
if [[ -f $FIXTURES/cases.json ]]; then
    "$GPU_CHECK" cases "$FIXTURES" "$EMA_TOOL" "$WORK/cases" "$DEVICE" || failures=$((failures + 1))
else
    echo "no $FIXTURES/cases.json"
fi

say "agreement: generated series"
agree() { # NAME SERIES_DIR ARGS...: one command on both devices
    local name=$1 dir=$2 side dev
    shift 2
    for side in cpu dev; do
        dev=$([[ $side == cpu ]] && echo cpu || echo "$DEVICE")
        if ! "$EMA_TOOL" "$@" "$dir"/*.safetensors -o "$WORK/$name.$side.out" --device "$dev" \
            --quiet; then
            echo "FAIL  $name: --device $dev failed"
            failures=$((failures + 1))
            return
        fi
    done
    check "$name" "$WORK/$name.cpu.out" "$WORK/$name.dev.out"
}
# Large tensors split over batches (24 Mi elements > 16 Mi per batch), many small ones packed
# together, every input dtype, every output dtype.
"$GPU_CHECK" gen "$WORK/s-f32" --count 5 --tensors 2 --elems 17000000 --small 17000 --dtype f32
"$GPU_CHECK" gen "$WORK/s-bf16" --count 6 --tensors 20 --elems 1000003 --small 5000 --dtype bf16
"$GPU_CHECK" gen "$WORK/s-f16" --count 4 --tensors 10 --elems 777777 --small 100 --dtype f16
"$GPU_CHECK" gen "$WORK/s-f64" --count 3 --tensors 4 --elems 500000 --small 10 --dtype f64
for spec in "f32-ema:s-f32:ema --momentum 0.01" \
            "f32-swa:s-f32:swa" \
            "f32-to-bf16:s-f32:ema --momentum 0.3 --dtype bf16" \
            "f32-to-f16:s-f32:ema --momentum 0.3 --dtype f16" \
            "bf16-ema:s-bf16:ema --momentum 0.0002" \
            "bf16-annealing:s-bf16:ema --strategy annealing --gamma 3" \
            "bf16-to-f32:s-bf16:ema --dtype f32 --check-finite" \
            "f16-ema:s-f16:ema --momentum 0.1 --check-finite" \
            "f16-per-iter:s-f16:ema --momentum 0.001 --per-iter" \
            "f64-ema:s-f64:ema --momentum 0.2" \
            "f64-to-f32:s-f64:swa --dtype f32"; do
    IFS=: read -r name dir args <<<"$spec"
    # shellcheck disable=SC2086
    agree "$name" "$WORK/$dir" $args
done
rm -rf "$WORK"/s-* "$WORK"/*.out

say "benchmark (page-cached inputs, medians of $RUNS runs, whole process)"
now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { print a - b }'; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
bench() { # NAME SERIES_DIR ARGS...
    local name=$1 dir=$2
    shift 2
    local bytes cat_s cpu_s gpu_s t
    bytes=$(stat -c %s "$dir"/*.safetensors | awk '{ s += $1 } END { print s }')
    cat "$dir"/*.safetensors >/dev/null
    cat_s=$(for _ in 1 2 3; do t=$(now); cat "$dir"/*.safetensors >/dev/null; since "$t"; done | median)
    local cpu_t=() gpu_t=()
    for _ in $(seq "$RUNS"); do
        t=$(now)
        "$EMA_TOOL" "$@" "$dir"/*.safetensors -o "$WORK/b.safetensors" --force --quiet --device cpu
        cpu_t+=("$(since "$t")")
        t=$(now)
        "$EMA_TOOL" "$@" "$dir"/*.safetensors -o "$WORK/b.safetensors" --force --quiet --device "$DEVICE"
        gpu_t+=("$(since "$t")")
    done
    cpu_s=$(printf '%s\n' "${cpu_t[@]}" | median)
    gpu_s=$(printf '%s\n' "${gpu_t[@]}" | median)
    awk -v n="$name" -v b="$bytes" -v c="$cat_s" -v p="$cpu_s" -v g="$gpu_s" -v d="$DEVICE" \
        -v s0="$startup_s" -v l="$link_gbs" 'BEGIN {
        printf "%-20s %6.2f GB input | cat %6.2f GB/s | cpu %6.2f s %6.2f GB/s | %s %6.2f s %6.2f GB/s (%6.2f GB/s after start-up) | %s/cpu speed %5.2fx | %s/cat time %5.2fx\n",
            n, b / 1e9, b / 1e9 / c, p, b / 1e9 / p, d, g, b / 1e9 / g, b / 1e9 / (g - s0 > 0 ? g - s0 : g), d, p / g, d, g / c
        if (l > 0) printf "%-20s %s at %5.1f%% of the link'"'"'s nominal %.1f GB/s (after start-up)\n", "", d, 100 * b / 1e9 / (g - s0 > 0 ? g - s0 : g) / l, l }'
}
# The PCIe link's nominal host-to-device bandwidth (GB/s per lane x lanes, encoding
# included); idle GPUs drop to a lower generation, so the maxima of the GPU's link are used.
link_gbs=0
if [[ $DEVICE != cpu && ${STAND_IN:-} != 1 ]] && command -v nvidia-smi >/dev/null; then
    link=$(nvidia-smi --query-gpu=pcie.link.gen.max,pcie.link.width.max \
        --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -d ' ') || true
    link_gbs=$(awk -F, -v l="$link" 'BEGIN { split(l, a, ","); g = a[1] + 0; w = a[2] + 0;
        lane = g == 3 ? 0.985 : g == 4 ? 1.969 : g == 5 ? 3.938 : g >= 6 ? 7.877 : 0;
        print lane * w }')
    echo "PCIe link: gen ${link%,*} x${link#*,}: $link_gbs GB/s nominal host to device"
fi
startup_s=$(for _ in 1 2 3; do
    t=$(now)
    "$EMA_TOOL" ema "$WORK"/probe/*.safetensors -o "$WORK/probe.safetensors" --force --quiet \
        --device "$DEVICE"
    since "$t"
done | median)
echo "start-up of --device $DEVICE (a fold of 2 x 8 KB: driver, context, PTX JIT): $startup_s s"
echo "GB/s: GB of input per second of the whole command; x: $DEVICE speed over cpu's, and"
echo "$DEVICE time over the time cat takes to read the inputs (1.00: bound by reading them)"
# 4 MiB f32 tensors per checkpoint (SERIES_GB may be a fraction: 0.5).
per=$(awk -v g="$SERIES_GB" 'BEGIN { n = int(g * 1024 / 8 / 4); print (n < 4 ? 4 : n) }')
"$GPU_CHECK" gen "$WORK/b-f32" --count 8 --tensors "$per" --elems 1048576 --dtype f32
bench "ema f32, 8 inputs" "$WORK/b-f32" ema --momentum 0.01
rm -rf "$WORK/b-f32"
"$GPU_CHECK" gen "$WORK/b-bf16" --count 8 --tensors $((per / 4)) --elems 4194304 --small 2000 --dtype bf16
bench "ema bf16, 8 inputs" "$WORK/b-bf16" ema --momentum 0.0002
rm -rf "$WORK/b-bf16"

say "done in $((SECONDS - start)) s: $failures failed agreement check(s)"
[[ $failures -eq 0 ]]
