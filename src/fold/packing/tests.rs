//! Tests of the batch layout, and of the CUDA kernels run on the CPU: `cuda/kernels.cu` is
//! compiled by the host C compiler (`$CC`, else `cc`) with a small driver that emulates the
//! launches, and its outputs are compared byte for byte with the CPU path's. Without a C
//! compiler those tests say so and pass, unless `EMA_TOOL_TEST_STRICT=1`, where they fail.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use half::{bf16, f16};

use super::*;
use crate::checkpoint::{Checkpoint, Open};
use crate::codec::convert;
use crate::codec::safetensors::encode_header;
use crate::codec::TensorSpec;
use crate::fold::{Options, Progress};
use crate::plan::{Make, Order, Output, Plan, Src, Tensor};
use crate::runtime::Runtime;
use crate::testing::{missing_prerequisite, Rng};

/// The launches of the kernels, emulated one block and one thread at a time.
const DRIVER: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>

static u8* slurp(const char* path, size_t* len) {
    FILE* f = fopen(path, "rb");
    if (!f) { perror(path); exit(1); }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    u8* p = (u8*)malloc(n > 0 ? (size_t)n : 1);
    if (fread(p, 1, (size_t)n, f) != (size_t)n) { perror(path); exit(1); }
    fclose(f);
    *len = (size_t)n;
    return p;
}

static void spill(const char* path, const void* p, size_t n) {
    FILE* f = fopen(path, "wb");
    if (!f || fwrite(p, 1, n, f) != n) { perror(path); exit(1); }
    fclose(f);
}

int main(int argc, char** argv) {
    char path[4096];
    if (argc == 2 && !strcmp(argv[1], "layout")) {
        printf("%zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu\n", sizeof(Seg),
               offsetof(Seg, acc), offsetof(Seg, src), offsetof(Seg, out),
               offsetof(Seg, weights), offsetof(Seg, count), offsetof(Seg, first_block),
               offsetof(Seg, in_dtype), offsetof(Seg, out_dtype), offsetof(Seg, flags),
               (size_t)(BLOCK * ITEMS));
        return 0;
    }
    if (argc == 4 && !strcmp(argv[1], "encode")) {
        /* argv[2]: f64 values; argv[3].<dt>: the values stored as each dtype */
        size_t len;
        u8* in = slurp(argv[2], &len);
        size_t n = len / 8;
        for (u32 dt = 1; dt <= 6; dt++) {
            u8* out = (u8*)calloc(n * 8 + 1, 1);
            for (size_t i = 0; i < n; i++) {
                double v;
                memcpy(&v, in + 8 * i, 8);
                store(out, i, dt, v);
            }
            static const size_t size[7] = {0, 4, 2, 2, 8, 1, 1};
            snprintf(path, sizeof path, "%s.%u", argv[3], dt);
            spill(path, out, n * size[dt]);
            free(out);
        }
        free(in);
        return 0;
    }
    if (argc == 5 && !strcmp(argv[1], "decode")) {
        /* argv[2]: dtype; argv[3]: elements; argv[4]: their f64 values */
        u32 dt = (u32)atoi(argv[2]);
        static const size_t size[7] = {0, 4, 2, 2, 8, 1, 1};
        size_t len;
        u8* in = slurp(argv[3], &len);
        size_t n = len / size[dt];
        double* out = (double*)malloc(n * 8 + 8);
        for (size_t i = 0; i < n; i++) out[i] = load(in, i, dt);
        spill(argv[4], out, n * 8);
        free(in);
        free(out);
        return 0;
    }
    if (argc == 10 && !strcmp(argv[1], "batch")) {
        /* DIR PIECES NSEG BLOCKS ELEMS OUT_BYTES CHECK_FINITE NOUT: reads DIR/piece.<k>,
           writes DIR/out (the counters, then each output's OUT_BYTES) */
        const char* dir = argv[2];
        u32 pieces = (u32)atoi(argv[3]), nseg = (u32)atoi(argv[4]), blocks = (u32)atoi(argv[5]);
        size_t elems = (size_t)atoll(argv[6]), out_bytes = (size_t)atoll(argv[7]);
        u32 check = (u32)atoi(argv[8]), nout = (u32)atoi(argv[9]);
        double* acc = (double*)malloc(nout * elems * 8 + 8);
        for (size_t i = 0; i < nout * elems; i++) acc[i] = 12345.0; /* garbage: FIRST must overwrite */
        u8* piece = NULL;
        for (u32 k = 0; k < pieces; k++) {
            size_t len;
            free(piece);
            snprintf(path, sizeof path, "%s/piece.%u", dir, k);
            piece = slurp(path, &len);
            for (u32 b = 0; b < blocks; b++)
                for (u32 t = 0; t < BLOCK; t++) {
                    blockIdx.x = b;
                    threadIdx.x = t;
                    ema_accumulate(piece, nseg, nout, acc, (u64)elems);
                }
        }
        u8* out = (u8*)calloc(256 + nout * out_bytes, 1);
        for (u32 o = 0; o < nout; o++)
            for (u32 b = 0; b < blocks; b++)
                for (u32 t = 0; t < BLOCK; t++) {
                    blockIdx.x = b;
                    threadIdx.x = t;
                    ema_encode(piece, nseg, acc + o * elems, out + 256 + o * out_bytes,
                               (u32*)out, check);
                }
        snprintf(path, sizeof path, "%s/out", dir);
        spill(path, out, 256 + nout * out_bytes);
        free(out);
        free(piece);
        free(acc);
        return 0;
    }
    fprintf(stderr, "bad arguments\n");
    return 2;
}
"#;

/// The emulator binary, built once per test run; `None` without a working C compiler.
fn emulator() -> Option<&'static Path> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ema-tool-kernels-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let src = dir.join("emulator.c");
        let text = format!("#define EMA_HOST_TEST 1\n{KERNELS}\n{DRIVER}");
        std::fs::write(&src, text).ok()?;
        let bin = dir.join("emulator");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        // With the sanitizers where the compiler has them: an access outside a buffer by the
        // kernels fails the test instead of passing by luck.
        for extra in [&["-fsanitize=address,undefined"][..], &[]] {
            let ok = Command::new(&cc)
                .args(["-std=c99", "-O1", "-ffp-contract=off", "-Wall", "-o"])
                .arg(&bin)
                .arg(&src)
                .args(extra)
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Some(bin);
            }
        }
        missing_prerequisite(&format!(
            "a working C compiler ({cc}): the CUDA kernels are not emulated"
        ));
        None
    })
    .as_deref()
}

fn run(bin: &Path, args: &[&str]) {
    let out = Command::new(bin)
        .args(args)
        .output()
        .expect("emulator runs");
    assert!(
        out.status.success(),
        "emulator {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ema-tool-packing-")
        .tempdir()
        .expect("temp dir")
}

fn encode_vals(dtype: DType, vals: &[f64]) -> Vec<u8> {
    let mut out = vec![0u8; vals.len() * dtype.size()];
    convert::encode(dtype, vals, &mut out);
    out
}

/// Writes a safetensors file of `(name, dtype, shape, values)`.
fn write_st(path: &Path, tensors: &[(&str, DType, Vec<usize>, Vec<f64>)]) {
    let outs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(n, d, s, _)| TensorSpec {
            name: n.to_string(),
            dtype: *d,
            shape: s.clone(),
        })
        .collect();
    let (mut bytes, _) = encode_header(&outs, &BTreeMap::new());
    for (_, d, _, v) in tensors {
        bytes.extend(encode_vals(*d, v));
    }
    std::fs::write(path, bytes).expect("write checkpoint");
}

/// Output tensors in memory, and how many calls of each kind wrote them.
struct MemSink {
    tensors: Mutex<Vec<Vec<u8>>>,
    /// Calls of `write` (from anyone but `write_batch`) and of `write_batch`.
    calls: Mutex<(usize, usize)>,
}

impl MemSink {
    fn new(plan: &Plan) -> MemSink {
        let sizes = plan.specs().into_iter().map(|t| t.nbytes() as usize);
        MemSink {
            tensors: Mutex::new(sizes.map(|n| vec![0xEE; n]).collect()),
            calls: Mutex::new((0, 0)),
        }
    }
    fn put(&self, tensor: usize, off: u64, bytes: &[u8]) {
        let mut v = self.tensors.lock().unwrap();
        let off = off as usize;
        v[tensor][off..off + bytes.len()].copy_from_slice(bytes);
    }
    fn into_inner(self) -> Vec<Vec<u8>> {
        self.tensors.into_inner().unwrap()
    }
}

impl Sink for MemSink {
    fn write(&self, tensor: usize, off: u64, bytes: &[u8]) -> Result<()> {
        self.calls.lock().unwrap().0 += 1;
        self.put(tensor, off, bytes);
        Ok(())
    }
    fn write_batch(&self, writes: &[(usize, u64, &[u8])]) -> Result<()> {
        self.calls.lock().unwrap().1 += 1;
        for &(t, off, b) in writes {
            self.put(t, off, b);
        }
        Ok(())
    }
}

/// One [`MemSink`] per output of `plan`.
fn sinks_of(plan: &Plan) -> Vec<MemSink> {
    plan.outputs.iter().map(|_| MemSink::new(plan)).collect()
}

/// What the CUDA executor does with each batch, with the emulator in place of the device: the
/// tensors of every output.
fn emulate(bin: &Path, plan: &Plan, limits: Limits, opts: Options) -> Result<Vec<Vec<Vec<u8>>>> {
    let dir = tmp();
    let mem = sinks_of(plan);
    let sinks: Vec<&dyn Sink> = mem.iter().map(|s| s as &dyn Sink).collect();
    let (progress, rt) = (Progress::default(), Runtime::new());
    let work = Work::of(plan, &sinks, opts, &progress, &rt);
    let jobs = &work.jobs;
    let batches = super::plan(jobs, plan.outputs.len(), limits);
    for batch in &batches {
        let size = (0..batch.pieces)
            .map(|k| batch.piece_bytes(jobs, k))
            .max()
            .unwrap() as usize;
        for k in 0..batch.pieces {
            // Garbage in the padding, as in a reused staging buffer.
            let mut buf = vec![0xA5u8; size];
            let (len, read) = batch.fill_piece(&work, jobs, k, &mut buf)?;
            assert_eq!(len as u64, batch.piece_bytes(jobs, k));
            assert!(read <= len as u64);
            std::fs::write(dir.path().join(format!("piece.{k}")), &buf[..len]).unwrap();
        }
        let d = dir.path().to_str().unwrap();
        let args = [
            batch.pieces.to_string(),
            batch.segments.len().to_string(),
            batch.blocks.to_string(),
            batch.elems.to_string(),
            batch.out_bytes.to_string(),
            u32::from(opts.finite).to_string(),
            batch.outputs.to_string(),
        ];
        let mut all = vec!["batch", d];
        all.extend(args.iter().map(String::as_str));
        run(bin, &all);
        let out = std::fs::read(dir.path().join("out")).unwrap();
        let counts = out_counts(&out);
        if counts != [0, 0] {
            return Err(batch.error_from_cpu(&work, jobs, counts));
        }
        batch.write_out(jobs, &out[OUT_HEADER..], &sinks)?;
    }
    drop(work);
    for (o, m) in mem.iter().enumerate() {
        // The encoded batches reach each sink as one batch of writes each.
        let calls = *m.calls.lock().unwrap();
        assert_eq!(
            calls,
            (0, batches.len()),
            "output {o}: (write, write_batch) calls"
        );
    }
    Ok(mem.into_iter().map(MemSink::into_inner).collect())
}

fn cpu_outputs(plan: &Plan, opts: Options) -> Result<Vec<Vec<Vec<u8>>>> {
    let mem = sinks_of(plan);
    let sinks: Vec<&dyn Sink> = mem.iter().map(|s| s as &dyn Sink).collect();
    let (progress, rt) = (Progress::default(), Runtime::new());
    let work = Work::of(plan, &sinks, opts, &progress, &rt);
    cpu::execute(&work, &work.jobs)?;
    drop(work);
    Ok(mem.into_iter().map(MemSink::into_inner).collect())
}

/// A plan over `inputs` with an output for each row of `weights`, whose folds weigh input `k`
/// by `row[k]`.
fn plan_of(inputs: Vec<Checkpoint>, weights: &[&[f64]], tensors: Vec<Tensor>) -> Plan {
    Plan {
        inputs,
        order: Order::Given,
        outputs: weights
            .iter()
            .enumerate()
            .map(|(o, w)| Output {
                target: PathBuf::from(format!("out{o}.safetensors")),
                params: Vec::new(),
                weights: w.to_vec(),
            })
            .collect(),
        tensors,
    }
}

/// The output dtype and the first source of every fold tensor (by index).
fn folds(plan: &Plan) -> Vec<(usize, DType, Src)> {
    plan.tensors
        .iter()
        .enumerate()
        .filter_map(|(i, t)| match &t.make {
            Make::Fold { sources } => Some((i, t.dtype, sources[0])),
            _ => None,
        })
        .collect()
}

fn decoded(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    let mut v = vec![0.0; bytes.len() / dtype.size()];
    convert::decode(dtype, bytes, &mut v);
    v
}

/// Whether `half` rounds f64 to f16 through f32 here, as the kernels do (x86 with F16C).
fn f16_through_f32() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        false
    }
}

/// Asserts the kernels' bytes equal the CPU path's: bit for bit, NaN payloads aside, and for
/// f16 on hosts where the CPU path rounds f64 to f16 directly, within one unit in the last
/// place (the two roundings differ only at ties of the f32 value).
fn assert_same(what: &str, dtype: DType, gpu: &[u8], cpu: &[u8]) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    let (g, c) = (decoded(dtype, gpu), decoded(dtype, cpu));
    let size = dtype.size();
    for (i, (a, b)) in g.iter().zip(&c).enumerate() {
        if a.is_nan() && b.is_nan() {
            continue;
        }
        let (ga, cb) = (&gpu[i * size..][..size], &cpu[i * size..][..size]);
        if ga == cb {
            continue;
        }
        let near = dtype == DType::F16 && !f16_through_f32() && {
            let x = u16::from_le_bytes([ga[0], ga[1]]);
            let y = u16::from_le_bytes([cb[0], cb[1]]);
            (x ^ y) & 0x8000 == 0 && x.abs_diff(y) == 1
        };
        assert!(
            near,
            "{what}: element {i}: kernels give {a:e} ({ga:02x?}), the CPU path {b:e} ({cb:02x?})"
        );
    }
}

const FLOATS: [DType; 6] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::F64,
    DType::F8E4M3,
    DType::F8E5M2,
];

#[test]
fn constants_match_the_kernels() {
    let define = |name: &str| -> u64 {
        let line = KERNELS
            .lines()
            .find(|l| l.starts_with(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("#define {name}"));
        let v = line
            .split_whitespace()
            .nth(2)
            .unwrap()
            .trim_end_matches('u');
        v.parse().unwrap()
    };
    assert_eq!(define("BLOCK"), BLOCK as u64);
    assert_eq!(define("BLOCK") * define("ITEMS"), ELEMS_PER_BLOCK);
    assert_eq!(define("FLAG_FIRST"), FLAG_FIRST as u64);
    assert_eq!(define("FLAG_CONVERTS"), FLAG_CONVERTS as u64);
    for (d, name) in FLOATS.iter().zip([
        "DT_F32",
        "DT_F16",
        "DT_BF16",
        "DT_F64",
        "DT_F8E4M3",
        "DT_F8E5M2",
    ]) {
        assert_eq!(define(name), dtype_code(*d) as u64, "{name}");
    }
    // The table as the C compiler lays it out (the same ABI rules as NVRTC's for this struct).
    if let Some(bin) = emulator() {
        let out = Command::new(bin).arg("layout").output().unwrap();
        let got = String::from_utf8(out.stdout).unwrap();
        assert_eq!(got.trim(), "56 0 8 16 24 32 36 40 44 48 2048");
        assert_eq!(SEG_BYTES, 56);
    }
}

/// The embedded PTX was made from this `kernels.cu` (its header holds the source's CRC-32, and
/// CI regenerates it with NVRTC), and has both kernels with their parameters.
#[test]
fn the_ptx_is_that_of_the_kernels() {
    const PTX: &str = include_str!("../cuda/kernels.ptx");
    let crc = format!(
        "// kernels.cu crc32 {:08x}",
        crc32fast::hash(KERNELS.as_bytes())
    );
    assert!(
        PTX.lines().take(3).any(|l| l == crc),
        "src/fold/cuda/kernels.ptx is stale: run src/fold/cuda/gen_ptx.py (with {}) and commit it",
        "nvidia-cuda-nvrtc-cu12==12.0.140"
    );
    for (kernel, params) in [("ema_accumulate", 5), ("ema_encode", 6)] {
        let at = PTX
            .find(&format!(".visible .entry {kernel}("))
            .unwrap_or_else(|| panic!("no {kernel} in the PTX"));
        let head = &PTX[at..at + PTX[at..].find(')').unwrap()];
        assert_eq!(head.matches(".param").count(), params, "{head}");
    }
    assert!(PTX.contains("\n.version 8.0\n"), "PTX ISA 8.0 (CUDA 12.0)");
    assert!(PTX.contains("\n.target sm_60\n"), "compute_60 PTX");
    assert!(!PTX.contains("fma."), "--fmad=false: no fused multiply-add");
}

/// The NVRTC side of the kernel source, with the CUDA built-ins declared, is valid C++ (NVRTC
/// compiles C++; the emulator tests compile the other side of its `#ifdef` as C).
#[test]
fn kernels_are_valid_cpp() {
    const BUILTINS: &str =
        "#define __global__\n#define __device__\n#define __forceinline__ inline\n\
        struct uint3 { unsigned int x, y, z; };\nstatic uint3 blockIdx, threadIdx;\n\
        float __uint_as_float(unsigned int);\nunsigned int __float_as_uint(float);\n\
        double __longlong_as_double(long long);\nlong long __double_as_longlong(double);\n\
        double __dmul_rn(double, double);\ndouble __dadd_rn(double, double);\n\
        unsigned int atomicAdd(unsigned int*, unsigned int);\n";
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let dir = tmp();
    let src = dir.path().join("kernels.cu.cpp");
    std::fs::write(&src, format!("{BUILTINS}{KERNELS}")).unwrap();
    let out = match Command::new(&cxx)
        .args([
            "-std=c++11",
            "-fsyntax-only",
            "-Wall",
            "-Werror",
            "-Wno-unused-function",
        ])
        .arg(&src)
        .output()
    {
        Ok(o) => o,
        Err(_) => {
            missing_prerequisite(&format!(
                "a C++ compiler ({cxx}): the kernels' C++ is not checked"
            ));
            return;
        }
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Three checkpoints holding every float dtype, mixed dtypes in one tensor, a tensor larger
/// than the test batches, an empty tensor and a scalar.
fn fixture(dir: &Path) -> Vec<Checkpoint> {
    let mut rng = Rng::new(0x5eed);
    let mut paths = Vec::new();
    let mixed = [DType::F32, DType::BF16, DType::F16];
    let f8s = [DType::F8E4M3, DType::F8E5M2, DType::F8E4M3];
    for k in 0..3 {
        let mut v = |n: usize, scale: f64| (0..n).map(|_| rng.float(scale)).collect::<Vec<_>>();
        let mut tiny = v(300, 1e-5);
        tiny.extend(v(300, 1e-38)); // f32 and bf16 subnormals
        tiny.extend([0.0, -0.0, 6e-8, -6e-8, 1e-45]); // f16 subnormals
        let tensors = vec![
            ("big.f32", DType::F32, vec![50, 101], v(5050, 2.0)),
            ("b.bf16", DType::BF16, vec![1500], v(1500, 3.0)),
            ("c.f16", DType::F16, vec![7, 111], v(777, 60000.0)),
            ("d.mixed", mixed[k], vec![1000], v(1000, 1.0)),
            ("e.f64", DType::F64, vec![100], v(100, 1e10)),
            ("f.f8", f8s[k], vec![600], v(600, 400.0)),
            ("g.empty", DType::F32, vec![0, 4], vec![]),
            ("h.scalar", DType::F32, vec![], v(1, 1.0)),
            ("i.tiny", DType::F32, vec![tiny.len()], tiny),
        ];
        let p = dir.join(format!("iter_{k}.safetensors"));
        write_st(&p, &tensors);
        paths.push(p);
    }
    paths
        .iter()
        .map(|p| Checkpoint::open(p, Open::Readable).unwrap())
        .collect()
}

/// A fold per tensor and output dtype (f8 outputs only for tensors that fit them), with
/// weights that are not all equal, and copies in between that batches skip; one output per row
/// of `weights`.
fn fixture_plan(ckpts: Vec<Checkpoint>, weights: &[&[f64]]) -> Plan {
    let mut tensors = Vec::new();
    let of = |input: usize, tensor: usize| Src { input, tensor };
    for (ti, t) in ckpts[0].tensors().iter().enumerate() {
        for out in FLOATS {
            let f8 = matches!(out, DType::F8E4M3 | DType::F8E5M2);
            if f8 && !(t.name.starts_with("f.") || t.name.starts_with("d.")) {
                continue;
            }
            if out == DType::F16 && t.name.starts_with("e.") {
                continue; // would overflow
            }
            tensors.push(Tensor {
                name: t.name.clone(),
                dtype: out,
                shape: t.shape.clone(),
                make: Make::Fold {
                    sources: (0..3).map(|c| of(c, ti)).collect(),
                },
            });
        }
        tensors.push(Tensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            make: Make::Copy { source: of(2, ti) },
        });
    }
    // A fold with fewer inputs than the others in its batch.
    let t0 = &ckpts[0].tensors()[0];
    tensors.push(Tensor {
        name: t0.name.clone(),
        dtype: DType::F32,
        shape: t0.shape.clone(),
        make: Make::Fold {
            sources: vec![of(1, 0), of(2, 0)],
        },
    });
    plan_of(ckpts, weights, tensors)
}

/// The weights of the fixture's single output.
const WEIGHTS: &[f64] = &[0.0625, 0.3125, 0.625];

#[test]
fn plan_covers_every_element_once_within_limits() {
    let dir = tmp();
    let plan = fixture_plan(fixture(dir.path()), &[WEIGHTS]);
    let sinks: [&dyn Sink; 1] = [&Discard];
    let (progress, rt) = (Progress::default(), Runtime::new());
    let work = Work::of(&plan, &sinks, Options::default(), &progress, &rt);
    let jobs = &work.jobs;
    for limits in [
        Limits::default(),
        Limits {
            data_bytes: 8192,
            elems: 3000,
            segments: 4,
        },
        Limits {
            data_bytes: 64,
            elems: 1,
            segments: 1,
        },
    ] {
        let batches = super::plan(jobs, 1, limits);
        let mut covered: Vec<u64> = jobs.iter().map(|_| 0).collect();
        for b in &batches {
            assert!(!b.segments.is_empty() && b.segments.len() <= limits.segments);
            assert!(b.elems <= limits.elems);
            let (mut acc, mut blocks, mut out) = (0, 0, 0);
            for s in &b.segments {
                assert_eq!(s.start, covered[s.job], "segments of a job in order");
                covered[s.job] += s.count;
                assert_eq!((s.acc, s.first_block, s.out), (acc, blocks, out));
                acc += s.count;
                blocks += s.count.div_ceil(ELEMS_PER_BLOCK) as u32;
                assert!(
                    matches!(jobs[s.job].kind, Kind::Fold { .. }),
                    "a copy job in a batch"
                );
                out += align(s.count * jobs[s.job].dtype.size() as u64, DATA_ALIGN);
            }
            assert_eq!((b.elems, b.blocks, b.out_bytes), (acc, blocks, out));
            for k in 0..b.pieces {
                let data = b.piece_bytes(jobs, k) - b.table_bytes();
                assert!(data <= limits.data_bytes, "{data} > {}", limits.data_bytes);
            }
        }
        for (j, job) in jobs.iter().enumerate() {
            let want = match job.kind {
                Kind::Fold { .. } => job.numel(),
                Kind::Copy(_) => 0,
            };
            assert_eq!(covered[j], want, "job {j}");
        }
    }
}

#[test]
fn emulated_kernels_write_the_cpu_paths_bytes() {
    let Some(bin) = emulator() else { return };
    let dir = tmp();
    let plan = fixture_plan(fixture(dir.path()), &[WEIGHTS]);
    let cpu = cpu_outputs(&plan, Options::default()).unwrap();
    let finite = Options {
        finite: true,
        ..Options::default()
    };
    for limits in [
        Limits::default(),
        Limits {
            data_bytes: 8192,
            elems: 3000,
            segments: 4,
        },
    ] {
        let gpu = emulate(bin, &plan, limits, finite).unwrap();
        for (j, out_dtype, src) in folds(&plan) {
            let name = &plan.tensor_info(src).name;
            let what = format!("{name} as {out_dtype} ({limits:?})");
            assert_same(&what, out_dtype, &gpu[0][j], &cpu[0][j]);
        }
    }
}

#[test]
fn emulated_kernels_fold_a_sweep_into_each_outputs_cpu_bytes() {
    let Some(bin) = emulator() else { return };
    let dir = tmp();
    // Three outputs, one of which weighs the first input 0 (its accumulators are still
    // assigned by it).
    let rows: [&[f64]; 3] = [WEIGHTS, &[0.5, 0.25, 0.25], &[0.0, 0.1, 0.9]];
    let plan = fixture_plan(fixture(dir.path()), &rows);
    let cpu = cpu_outputs(&plan, Options::default()).unwrap();
    for limits in [
        Limits::for_outputs(3),
        Limits {
            data_bytes: 8192,
            elems: 1000,
            segments: 3,
        },
    ] {
        let gpu = emulate(bin, &plan, limits, Options::default()).unwrap();
        assert_eq!(gpu.len(), 3);
        for o in 0..3 {
            for (j, out_dtype, src) in folds(&plan) {
                let name = &plan.tensor_info(src).name;
                let what = format!("output {o}: {name} as {out_dtype} ({limits:?})");
                assert_same(&what, out_dtype, &gpu[o][j], &cpu[o][j]);
            }
        }
    }
}

#[test]
fn limits_for_a_sweep_keep_the_accumulators_of_one_output() {
    let one = Limits::default();
    for k in [1, 2, 3, 8, 100, 100_000] {
        let l = Limits::for_outputs(k);
        assert!(
            l.elems * k as u64 <= one.elems.max(ELEMS_PER_BLOCK * k as u64),
            "{k}"
        );
        assert!(
            l.elems >= ELEMS_PER_BLOCK && l.elems % ELEMS_PER_BLOCK == 0,
            "{k}"
        );
        assert_eq!((l.data_bytes, l.segments), (one.data_bytes, one.segments));
    }
    assert_eq!(Limits::for_outputs(1), one);
}

#[test]
fn emulated_kernels_report_what_the_cpu_path_reports() {
    let Some(bin) = emulator() else { return };
    let dir = tmp();
    let mk = |name: &str, vals: [f64; 4]| {
        let p = dir.path().join(name);
        write_st(&p, &[("w", DType::F32, vec![4], vals.to_vec())]);
        Checkpoint::open(&p, Open::Readable).unwrap()
    };
    let fold = |dtype| {
        let ckpts = vec![
            mk("a.safetensors", [1.0, 2.0, 1e5, 3.0]),
            mk("b.safetensors", [1.0, f64::NAN, 1e5, 3.0]),
        ];
        let tensor = Tensor {
            name: "w".into(),
            dtype,
            shape: vec![4],
            make: Make::Fold {
                sources: vec![
                    Src {
                        input: 0,
                        tensor: 0,
                    },
                    Src {
                        input: 1,
                        tensor: 0,
                    },
                ],
            },
        };
        plan_of(ckpts, &[&[0.5, 0.5]], vec![tensor])
    };
    let finite = Options {
        finite: true,
        ..Options::default()
    };
    let plain = Options::default();
    // NaN in an input, with --check-finite: the same error naming the input.
    let plan = fold(DType::F32);
    let gpu = emulate(bin, &plan, Limits::default(), finite).unwrap_err();
    let cpu = cpu_outputs(&plan, finite).unwrap_err();
    assert_eq!(gpu.to_string(), cpu.to_string());
    assert!(gpu.to_string().contains("b.safetensors"), "{gpu}");
    // Without it, NaN passes through.
    let out = emulate(bin, &plan, Limits::default(), plain).unwrap();
    assert!(decoded(DType::F32, &out[0][0])[1].is_nan());
    // 1e5 overflows f16: the CPU path's overflow error.
    let plan = fold(DType::F16);
    let gpu = emulate(bin, &plan, Limits::default(), plain).unwrap_err();
    let cpu = cpu_outputs(&plan, plain).unwrap_err();
    assert_eq!(gpu.to_string(), cpu.to_string());
    assert!(gpu.to_string().contains("overflow"), "{gpu}");
}

/// Values that exercise rounding: ties between neighbours of every narrow format, values just
/// off the ties, the edges of each range, specials, and random values over many binades.
fn codec_values() -> Vec<f64> {
    let mut v = vec![
        0.0,
        -0.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        f64::MIN_POSITIVE,
        5e-324,
        1e300,
        -1e300,
        f32::MAX as f64,
        f32::MAX as f64 * (1.0 + 2f64.powi(-25)),
        f32::MAX as f64 * (1.0 + 2f64.powi(-24)),
        f32::MIN_POSITIVE as f64 / 3.0,
        65504.0,
        65519.99,
        65520.0,
        448.0,
        464.0,
        464.1,
        480.0,
        57344.0,
        61440.0,
        61439.0,
    ];
    let mut neighbours = |vals: Vec<f64>| {
        for w in vals.windows(2) {
            if w[0].is_finite() && w[1].is_finite() {
                let mid = (w[0] + w[1]) / 2.0;
                v.extend([
                    w[0],
                    mid,
                    mid * (1.0 + 2f64.powi(-40)),
                    mid * (1.0 - 2f64.powi(-40)),
                ]);
            }
        }
    };
    neighbours((0..0x7c00u16).map(|b| f16::from_bits(b).to_f64()).collect());
    neighbours(
        (0..0x7f80u16)
            .step_by(7)
            .map(|b| bf16::from_bits(b).to_f64())
            .collect(),
    );
    for d in [DType::F8E4M3, DType::F8E5M2] {
        neighbours(decoded(d, &(0..0x7fu8).collect::<Vec<_>>()));
    }
    let mut rng = Rng::new(42);
    for _ in 0..20000 {
        let e = (rng.next() % 300) as i32 - 150;
        v.push(rng.float(1.0) * 2f64.powi(e));
    }
    let neg: Vec<f64> = v.iter().map(|x| -x).collect();
    v.extend(neg);
    v
}

#[test]
fn emulated_encoders_match_the_cpu_encoders() {
    let Some(bin) = emulator() else { return };
    let dir = tmp();
    let vals = codec_values();
    let input = dir.path().join("vals");
    std::fs::write(
        &input,
        vals.iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let out = dir.path().join("enc");
    run(
        bin,
        &["encode", input.to_str().unwrap(), out.to_str().unwrap()],
    );
    for d in FLOATS {
        let got = std::fs::read(format!("{}.{}", out.display(), dtype_code(d))).unwrap();
        assert_same(&format!("encode {d}"), d, &got, &encode_vals(d, &vals));
    }
}

#[test]
fn emulated_decoders_match_the_cpu_decoders() {
    let Some(bin) = emulator() else { return };
    let dir = tmp();
    let mut rng = Rng::new(7);
    for d in FLOATS {
        let raw: Vec<u8> = match d.size() {
            1 => (0..=255u8).collect(),
            2 => (0..=u16::MAX).flat_map(u16::to_le_bytes).collect(),
            n => (0..100_000)
                .flat_map(|_| rng.next().to_le_bytes()[..n].to_vec())
                .collect(),
        };
        let (input, output) = (dir.path().join("raw"), dir.path().join("dec"));
        std::fs::write(&input, &raw).unwrap();
        let code = dtype_code(d).to_string();
        run(
            bin,
            &[
                "decode",
                &code,
                input.to_str().unwrap(),
                output.to_str().unwrap(),
            ],
        );
        let got: Vec<f64> = std::fs::read(&output)
            .unwrap()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let want = decoded(d, &raw);
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // Bit for bit, NaN payloads and signs included: they reach an output NaN through
            // the fold's arithmetic. Only a signalling f64 NaN may come out unquieted here, as
            // the fold's first multiplication quiets it.
            let quieted = g.is_nan() && (g.to_bits() | 1 << 51) == w.to_bits();
            assert!(
                g.to_bits() == w.to_bits() || quieted,
                "decode {d}: element {i}: {g:e} ({:#x}) != {w:e} ({:#x})",
                g.to_bits(),
                w.to_bits()
            );
        }
    }
}

#[test]
fn limits_halve_down_to_the_floor() {
    let mut l = Limits::for_outputs(3);
    let mut steps = 0;
    while let Some(h) = l.halved() {
        assert!(h.data_bytes <= l.data_bytes && h.elems <= l.elems && h.segments <= l.segments);
        assert_eq!(h.elems % ELEMS_PER_BLOCK, 0);
        l = h;
        steps += 1;
    }
    assert_eq!(l, Limits::FLOOR);
    assert!((6..=16).contains(&steps), "{steps}");
}
