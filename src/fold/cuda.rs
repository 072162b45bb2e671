//! The CUDA executor: fold jobs stream through pinned staging buffers into fused kernels that
//! NVRTC compiles at run time; copy jobs run on the CPU path.
//!
//! cudarc loads `libcuda` and `libnvrtc` only when first used (its `dynamic-loading` feature),
//! so this module builds without a CUDA toolkit, the binary starts on machines without CUDA,
//! and every failure to find or use the device is an [`Error::Cuda`], never a panic.
//!
//! The pipeline, over the batches that [`super::packing`] plans (a piece is one input of one
//! batch: its segment table and raw bytes):
//!
//! ```text
//! producer thread   reads piece p into pinned slot p % SLOTS (positioned reads, in parallel)
//! h2d stream        copies the slot to device slot p % SLOTS
//! compute stream    ema_accumulate on it; after a batch's last input, ema_encode
//! d2h stream        copies the encoded batch to one of two pinned output buffers
//! issuing thread    queues all of the above, without waiting on the device
//! writer thread     waits for each batch's output and writes it to the sink
//! ```
//!
//! Events order the streams: a copy into a device slot waits for the kernels that read its
//! previous piece, the kernels wait for their copy, the producer refills a pinned slot once its
//! copy is done, and an output buffer is reused once the writer has written it out. Reading,
//! copies, kernels and writing thus overlap, and only a full pipeline makes a thread wait, so
//! the throughput is that of the slowest of reading the inputs and the host-to-device link.

use std::ffi::CString;
use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use cudarc::driver::{
    result as drv, sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream,
    DevicePtr, DriverError, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use cudarc::nvrtc::{self, Ptx};

use super::packing::{self, Batch, Limits, OUT_HEADER};
use super::{cpu, Checks, Job, Progress, Sink};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// Pieces in flight: pinned staging buffers, and as many device input buffers.
const SLOTS: usize = 4;

/// Checks that device `device` can be used: driver, device, NVRTC. Takes milliseconds.
pub fn check_device(device: usize) -> Result<()> {
    guarded(|| Gpu::open(device).map(drop))
}

/// Runs the fold jobs on device `device` and the copy jobs on the CPU.
pub fn execute(
    device: usize,
    ckpts: &[Checkpoint],
    jobs: &[Job],
    sink: &dyn Sink,
    checks: Checks,
    progress: &Progress,
) -> Result<()> {
    let copies: Vec<usize> = (0..jobs.len())
        .filter(|&i| matches!(jobs[i], Job::Copy { .. }))
        .collect();
    if !copies.is_empty() {
        let sub: Vec<Job> = copies.iter().map(|&i| jobs[i].clone()).collect();
        let renumbered = Renumber { sink, to: &copies };
        cpu::execute(ckpts, &sub, &renumbered, checks, progress)?;
    }
    if copies.len() == jobs.len() {
        return Ok(());
    }
    guarded(|| Gpu::open(device)?.fold(ckpts, jobs, sink, checks, progress))
}

/// A sink for a subset of the jobs: job `i` of the subset is job `to[i]`.
struct Renumber<'a> {
    sink: &'a dyn Sink,
    to: &'a [usize],
}

impl Sink for Renumber<'_> {
    fn write(&self, tensor: usize, off: u64, bytes: &[u8]) -> Result<()> {
        self.sink.write(self.to[tensor], off, bytes)
    }
}

/// Runs `f`, turning a panic into an error: cudarc panics where a library or one of its
/// symbols is missing, and the contract is one line on stderr and exit status 1.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    static LAST: Mutex<Option<String>> = Mutex::new(None);
    let previous = panic::take_hook();
    panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        // A fault of ours says where; a library's own messages say enough.
        let text = match info.location().filter(|l| l.file().starts_with("src/")) {
            Some(l) => format!("internal error: {msg} (at {}:{})", l.file(), l.line()),
            None => format!("a CUDA library call failed: {msg}"),
        };
        *LAST.lock().unwrap_or_else(|e| e.into_inner()) = Some(text);
    }));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    panic::set_hook(previous);
    result.unwrap_or_else(|_| {
        let msg = LAST.lock().unwrap_or_else(|e| e.into_inner()).take();
        Err(Error::Cuda(msg.unwrap_or_else(|| "unknown panic".into())))
    })
}

/// `what: <the driver's description> (<error name>)`.
fn describe(what: &str, e: DriverError) -> Error {
    let text = |r: std::result::Result<&std::ffi::CStr, DriverError>| {
        r.ok().map(|s| s.to_string_lossy().into_owned())
    };
    let name = text(e.error_name()).unwrap_or_else(|| format!("{:?}", e.0));
    let desc = text(e.error_string()).unwrap_or_default();
    Error::Cuda(format!("{what}: {desc} ({name})"))
}

/// Maps driver errors to [`Error::Cuda`] with what was being done.
trait Describe<T> {
    fn or_cuda(self, what: &str) -> Result<T>;
}

impl<T> Describe<T> for std::result::Result<T, DriverError> {
    fn or_cuda(self, what: &str) -> Result<T> {
        self.map_err(|e| describe(what, e))
    }
}

/// An opened device.
struct Gpu {
    ctx: Arc<CudaContext>,
    device: usize,
}

impl Gpu {
    /// Loads the driver, opens device `device` and checks that NVRTC can be loaded.
    fn open(device: usize) -> Result<Gpu> {
        // SAFETY: only tries to dlopen the driver library under its usual names.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Cuda(
                "no CUDA driver: libcuda.so cannot be loaded (no NVIDIA driver on this machine, \
                 or its library is not on the loader's path)"
                    .into(),
            ));
        }
        drv::init().or_cuda("cannot initialise the CUDA driver")?;
        let count = drv::device::get_count().or_cuda("cannot count the CUDA devices")?;
        if device >= count.max(0) as usize {
            return Err(Error::Cuda(format!(
                "no device cuda:{device}: this machine has {count} CUDA device{}",
                if count == 1 { "" } else { "s" }
            )));
        }
        // The context opened by check_device is kept for execute: creating the primary
        // context again after its last release would cost a good part of a second.
        static OPENED: Mutex<Option<(usize, Arc<CudaContext>)>> = Mutex::new(None);
        let mut opened = OPENED.lock().unwrap_or_else(|e| e.into_inner());
        let ctx = match &*opened {
            Some((d, ctx)) if *d == device => ctx.clone(),
            _ => {
                let ctx =
                    CudaContext::new(device).or_cuda(&format!("cannot open cuda:{device}"))?;
                *opened = Some((device, ctx.clone()));
                ctx
            }
        };
        ctx.bind_to_thread()
            .or_cuda(&format!("cannot use cuda:{device}"))?;
        // SAFETY: only tries to dlopen the NVRTC library under its usual names.
        if !unsafe { nvrtc::sys::is_culib_present() } {
            return Err(Error::Cuda(
                "NVRTC cannot be loaded (libnvrtc.so): the kernels are compiled at run time by \
                 the CUDA toolkit's NVRTC; install it and put its lib directory on \
                 LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        Ok(Gpu { ctx, device })
    }

    /// Compiles the kernels for this device: a cubin when NVRTC knows the device's
    /// architecture (no JIT, no PTX version to agree with the driver), else PTX for the newest
    /// architecture it knows, which the driver compiles.
    fn compile(&self) -> Result<Arc<CudaModule>> {
        let (major, minor) = self
            .ctx
            .compute_capability()
            .or_cuda("cannot read the compute capability")?;
        let cc = major * 10 + minor;
        let archs = nvrtc_archs()?;
        let (arch, cubin) = if archs.contains(&cc) {
            (format!("--gpu-architecture=sm_{cc}"), true)
        } else {
            let a = archs
                .iter()
                .copied()
                .filter(|&a| a <= cc)
                .max()
                .ok_or_else(|| {
                    Error::Cuda(format!(
                        "NVRTC {} cannot compile for compute capability {major}.{minor}",
                        nvrtc_version()
                    ))
                })?;
            (format!("--gpu-architecture=compute_{a}"), false)
        };
        let src = CString::new(packing::KERNELS).expect("the kernel source has no NUL");
        let prog = Program(
            nvrtc::result::create_program(&src, Some(c"ema_tool_kernels.cu"))
                .map_err(|e| Error::Cuda(format!("NVRTC cannot create a program: {e:?}")))?,
        );
        // Unfused multiply and add, as on the CPU (the kernels also say so with __dmul_rn).
        let opts = [arch.as_str(), "--fmad=false"];
        // SAFETY: `prog` is a live program.
        if let Err(e) = unsafe { nvrtc::result::compile_program(prog.0, &opts) } {
            // SAFETY: as above.
            let log = unsafe { nvrtc::result::get_program_log(prog.0) }
                .map(|l| l.iter().map(|&c| c as u8 as char).collect::<String>())
                .unwrap_or_default();
            let log = log
                .trim_end_matches('\0')
                .split_whitespace()
                .collect::<Vec<_>>();
            return Err(Error::Cuda(format!(
                "NVRTC {} cannot compile the kernels with {opts:?} ({e:?}): {}",
                nvrtc_version(),
                log.join(" ")
            )));
        }
        let image = if cubin {
            let mut size = 0usize;
            // SAFETY: `prog` is a compiled program; the buffer has the size NVRTC reports.
            let bin = unsafe {
                nvrtc::sys::nvrtcGetCUBINSize(prog.0, &mut size)
                    .result()
                    .and_then(|()| {
                        let mut bin = vec![0u8; size];
                        nvrtc::sys::nvrtcGetCUBIN(prog.0, bin.as_mut_ptr().cast())
                            .result()
                            .map(|()| bin)
                    })
            };
            Ptx::from_binary(bin.map_err(|e| Error::Cuda(format!("NVRTC: no cubin: {e:?}")))?)
        } else {
            // SAFETY: `prog` is a compiled program.
            let ptx = unsafe { nvrtc::result::get_ptx(prog.0) }
                .map_err(|e| Error::Cuda(format!("NVRTC: no PTX: {e:?}")))?;
            let text: String = ptx
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8 as char)
                .collect();
            Ptx::from_src(text)
        };
        self.ctx.load_module(image).or_cuda(&format!(
            "cannot load the kernels compiled by NVRTC {} on cuda:{} (is the driver older than \
             NVRTC?)",
            nvrtc_version(),
            self.device
        ))
    }

    /// Runs the fold jobs of `jobs` (copy jobs are left alone).
    fn fold(
        &self,
        ckpts: &[Checkpoint],
        jobs: &[Job],
        sink: &dyn Sink,
        checks: Checks,
        progress: &Progress,
    ) -> Result<()> {
        let batches = packing::plan(ckpts, jobs, Limits::default());
        if batches.is_empty() {
            return Ok(());
        }
        let pieces: Vec<(usize, usize)> = batches
            .iter()
            .enumerate()
            .flat_map(|(b, batch)| (0..batch.pieces).map(move |k| (b, k)))
            .collect();
        let sizes = Sizes {
            stage: pieces
                .iter()
                .map(|&(b, k)| batches[b].piece_bytes(ckpts, jobs, k))
                .max()
                .unwrap_or(0) as usize,
            out: OUT_HEADER + batches.iter().map(|b| b.out_bytes).max().unwrap_or(0) as usize,
            acc: batches.iter().map(|b| b.elems).max().unwrap_or(0) as usize,
        };
        let module = self.compile()?;
        let function = |name: &str| {
            module
                .load_function(name)
                .or_cuda(&format!("the kernels have no {name}"))
        };
        let kernels = Kernels {
            accumulate: function("ema_accumulate")?,
            encode: function("ema_encode")?,
        };
        // The streams are ordered by the events below, not by cudarc's per-buffer tracking,
        // which would add waits between pieces that do not share buffers.
        // SAFETY: no buffer of this context object exists yet; every use of a buffer on a
        // stream other than the one that wrote it waits for an event recorded after the write.
        unsafe { self.ctx.disable_event_tracking() };
        let new_stream = || self.ctx.new_stream().or_cuda("cannot create a stream");
        let streams = Streams {
            h2d: new_stream()?,
            compute: new_stream()?,
            d2h: new_stream()?,
        };
        let mem = Memory::alloc(self, &streams.compute, &sizes)?;
        let events = Events::new(&self.ctx)?;
        // Dropped before `events` and `mem` (declared after them): nothing is in flight when
        // they are freed, whichever way this function returns.
        let _idle = Idle(&self.ctx);
        // Stream-ordered allocations are done before other streams use them.
        streams
            .compute
            .synchronize()
            .or_cuda("cannot allocate device memory")?;
        let flow = Flow::default();
        let run = Run {
            ckpts,
            jobs,
            batches: &batches,
            mem: &mem,
            events: &events,
            flow: &flow,
        };
        std::thread::scope(|s| {
            let (done, written) = mpsc::channel();
            s.spawn(|| run.produce(&pieces, progress));
            s.spawn(|| run.write(written, sink, checks));
            let _stop = StopOnDrop(&flow);
            run.issue(&streams, &kernels, checks, done)
        })
    }
}

/// A live NVRTC program, destroyed on drop.
struct Program(nvrtc::sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by create_program and is destroyed once.
        let _ = unsafe { nvrtc::result::destroy_program(self.0) };
    }
}

/// The architectures (`75`, `80`, `90`, ...) that the loaded NVRTC compiles for.
fn nvrtc_archs() -> Result<Vec<i32>> {
    let mut n = 0;
    // SAFETY: NVRTC writes one int, then `n` ints into a buffer of that size.
    unsafe {
        nvrtc::sys::nvrtcGetNumSupportedArchs(&mut n)
            .result()
            .and_then(|()| {
                let mut archs = vec![0; n.max(0) as usize];
                nvrtc::sys::nvrtcGetSupportedArchs(archs.as_mut_ptr())
                    .result()
                    .map(|()| archs)
            })
    }
    .map_err(|e| Error::Cuda(format!("NVRTC cannot list its architectures: {e:?}")))
}

/// `major.minor` of the loaded NVRTC.
fn nvrtc_version() -> String {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC writes two ints.
    match unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }.result() {
        Ok(()) => format!("{major}.{minor}"),
        Err(_) => "(unknown version)".into(),
    }
}

struct Kernels {
    accumulate: CudaFunction,
    encode: CudaFunction,
}

struct Streams {
    h2d: Arc<CudaStream>,
    compute: Arc<CudaStream>,
    d2h: Arc<CudaStream>,
}

/// Buffer sizes in bytes (`acc`: in f64 elements).
struct Sizes {
    stage: usize,
    out: usize,
    acc: usize,
}

/// Pinned host memory, used through its raw pointer by one thread at a time as the pipeline's
/// events and [`Flow`] decide.
struct HostBuf {
    _mem: PinnedHostSlice<u8>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the memory is plain bytes owned by `_mem` (itself Send and Sync); which thread may
// touch it when is the pipeline's protocol, stated where the bytes are borrowed.
unsafe impl Send for HostBuf {}
// SAFETY: as above.
unsafe impl Sync for HostBuf {}

impl HostBuf {
    /// The bytes, to write.
    ///
    /// # Safety
    /// While the slice lives, no other slice of this buffer may exist and no device copy from
    /// or to it may be in flight.
    #[allow(clippy::mut_from_ref)] // the pipeline, not the borrow checker, makes it exclusive
    unsafe fn bytes_mut(&self) -> &mut [u8] {
        std::slice::from_raw_parts_mut(self.ptr, self.len)
    }

    /// The bytes, to read or to copy to the device.
    ///
    /// # Safety
    /// While the slice lives, nothing may write the buffer (no [`HostBuf::bytes_mut`] slice, no
    /// copy from the device into it).
    unsafe fn bytes(&self) -> &[u8] {
        std::slice::from_raw_parts(self.ptr, self.len)
    }
}

/// Every buffer of the pipeline, allocated once.
struct Memory {
    stage: Vec<HostBuf>,
    out_host: Vec<HostBuf>,
    raw: Vec<CudaSlice<u8>>,
    acc: CudaSlice<f64>,
    out: Vec<CudaSlice<u8>>,
}

impl Memory {
    fn alloc(gpu: &Gpu, stream: &Arc<CudaStream>, sizes: &Sizes) -> Result<Memory> {
        const MIB: usize = 1 << 20;
        let device_bytes = SLOTS * sizes.stage + 2 * sizes.out + 8 * sizes.acc;
        let (free, _) = gpu
            .ctx
            .mem_get_info()
            .or_cuda("cannot query device memory")?;
        if device_bytes > free {
            return Err(Error::Cuda(format!(
                "out of memory on cuda:{}: the fold needs {} MiB of device memory, {} MiB are free",
                gpu.device,
                device_bytes.div_ceil(MIB),
                free / MIB
            )));
        }
        fn oom(what: &'static str, n: usize) -> impl Fn(DriverError) -> Error {
            move |e| {
                describe(
                    &format!("cannot allocate {} MiB of {what}", n.div_ceil(MIB)),
                    e,
                )
            }
        }
        let device = |n: usize| -> Result<CudaSlice<u8>> {
            // SAFETY: the memory is uninitialised; every byte is written (copies, kernels)
            // before it is read.
            unsafe { stream.alloc::<u8>(n) }.map_err(oom("device memory", n))
        };
        let host = |n: usize| -> Result<HostBuf> {
            // SAFETY: as above, for host memory; flags 0: plain page-locked memory, which the
            // host reads fast (write-combined memory would make reading outputs slow).
            let mut mem = unsafe { gpu.ctx.alloc_pinned_with_flags::<u8>(n, 0) }
                .map_err(oom("pinned host memory", n))?;
            let ptr = mem.as_mut_ptr().or_cuda("pinned host memory")?;
            Ok(HostBuf {
                _mem: mem,
                ptr,
                len: n,
            })
        };
        Ok(Memory {
            stage: (0..SLOTS)
                .map(|_| host(sizes.stage))
                .collect::<Result<_>>()?,
            out_host: (0..2).map(|_| host(sizes.out)).collect::<Result<_>>()?,
            raw: (0..SLOTS)
                .map(|_| device(sizes.stage))
                .collect::<Result<_>>()?,
            // SAFETY: as above; accumulators are assigned by the first input of each segment.
            acc: unsafe { stream.alloc::<f64>(sizes.acc) }
                .map_err(oom("device memory", 8 * sizes.acc))?,
            out: (0..2).map(|_| device(sizes.out)).collect::<Result<_>>()?,
        })
    }
}

/// Waits for the device to finish everything on drop.
struct Idle<'a>(&'a Arc<CudaContext>);

impl Drop for Idle<'_> {
    fn drop(&mut self) {
        let _ = self.0.synchronize();
    }
}

/// The events that order the streams and the host.
struct Events {
    /// Piece copied out of pinned slot i (the producer may refill it).
    copied: Vec<CudaEvent>,
    /// Kernels done with device slot i (the next copy may overwrite it).
    consumed: Vec<CudaEvent>,
    /// Batch encoded into device output buffer i.
    encoded: Vec<CudaEvent>,
    /// Device output buffer i copied to pinned output buffer i.
    downloaded: Vec<CudaEvent>,
}

impl Events {
    fn new(ctx: &Arc<CudaContext>) -> Result<Events> {
        // Events the host waits on block the thread instead of spinning, leaving the CPU to the
        // readers; stream-to-stream events need no timing.
        let blocking = Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC);
        let make = |n: usize, flags| {
            (0..n)
                .map(|_| ctx.new_event(flags).or_cuda("cannot create an event"))
                .collect::<Result<Vec<_>>>()
        };
        Ok(Events {
            copied: make(SLOTS, blocking)?,
            consumed: make(SLOTS, None)?,
            encoded: make(2, None)?,
            downloaded: make(2, blocking)?,
        })
    }
}

/// Hand-over of pinned slots between the producer and the issuing thread.
#[derive(Default)]
struct Flow {
    state: Mutex<FlowState>,
    changed: Condvar,
}

#[derive(Default)]
struct FlowState {
    /// Pieces read into their slots.
    filled: usize,
    /// Pieces whose copy to the device is queued.
    issued: usize,
    /// Bytes of the piece in each slot.
    lens: [usize; SLOTS],
    /// Batches written to the sink.
    written: usize,
    /// The producer's or the writer's error.
    error: Option<Error>,
    /// The producer has returned (or unwound).
    producer_gone: bool,
    /// The writer has returned (or unwound).
    writer_gone: bool,
    /// The issuing thread has returned (or unwound): stop producing and writing.
    stopped: bool,
}

impl Flow {
    fn lock(&self) -> MutexGuard<'_, FlowState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut FlowState)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }

    /// Waits until piece `p` is in its slot; its length.
    fn wait_filled(&self, p: usize) -> Result<usize> {
        let mut st = self.lock();
        loop {
            if st.filled > p {
                return Ok(st.lens[p % SLOTS]);
            }
            if let Some(e) = st.error.take() {
                return Err(e);
            }
            if st.producer_gone {
                return Err(Error::Cuda("the reading thread stopped".into()));
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits until `n` batches are written to the sink.
    fn wait_written(&self, n: usize) -> Result<()> {
        let mut st = self.lock();
        loop {
            if st.written >= n {
                return Ok(());
            }
            if let Some(e) = st.error.take() {
                return Err(e);
            }
            if st.writer_gone {
                return Err(Error::Cuda("the writing thread stopped".into()));
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits until the copy of the piece before `p` in its slot is queued; false: stop.
    fn wait_slot(&self, p: usize) -> bool {
        let mut st = self.lock();
        loop {
            if st.stopped {
                return false;
            }
            if st.issued + SLOTS > p {
                return true;
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Tells the producer to stop, on every way out of the issuing thread.
struct StopOnDrop<'a>(&'a Flow);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.update(|st| st.stopped = true);
    }
}

/// Tells the issuing thread that the producer (`.1` false) or the writer (true) is gone, on
/// every way out of it.
struct GoneOnDrop<'a>(&'a Flow, bool);

impl Drop for GoneOnDrop<'_> {
    fn drop(&mut self) {
        let writer = self.1;
        self.0.update(|st| {
            if writer {
                st.writer_gone = true;
            } else {
                st.producer_gone = true;
            }
        });
    }
}

/// One fold on the device: what both threads share.
struct Run<'a> {
    ckpts: &'a [Checkpoint],
    jobs: &'a [Job],
    batches: &'a [Batch],
    mem: &'a Memory,
    events: &'a Events,
    flow: &'a Flow,
}

impl Run<'_> {
    /// The producer: reads every piece into its slot, in order.
    fn produce(&self, pieces: &[(usize, usize)], progress: &Progress) {
        let _gone = GoneOnDrop(self.flow, false);
        let result = (|| -> Result<()> {
            for (p, &(b, k)) in pieces.iter().enumerate() {
                let slot = p % SLOTS;
                if !self.flow.wait_slot(p) {
                    return Ok(());
                }
                if p >= SLOTS {
                    // The copy of piece p - SLOTS, queued before `issued` passed it, is done.
                    self.events.copied[slot]
                        .synchronize()
                        .or_cuda("copy to the device")?;
                }
                // SAFETY: the slot's last copy is done and the issuing thread reads the slot
                // only after `filled` passes p, below.
                let buf = unsafe { self.mem.stage[slot].bytes_mut() };
                let (len, read) = self.batches[b].fill_piece(self.ckpts, self.jobs, k, buf)?;
                progress.add(read);
                self.flow.update(|st| {
                    st.lens[slot] = len;
                    st.filled = p + 1;
                });
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.flow.update(|st| st.error = Some(e));
        }
    }

    /// The issuing thread: queues copies and kernels for every piece and hands each batch to
    /// the writer once its output's copy is queued.
    fn issue(
        &self,
        streams: &Streams,
        kernels: &Kernels,
        checks: Checks,
        done: Sender<usize>,
    ) -> Result<()> {
        let (mem, ev) = (self.mem, self.events);
        let ptr = |s: &CudaSlice<u8>| s.device_ptr(&streams.compute).0;
        let raw: Vec<u64> = mem.raw.iter().map(ptr).collect();
        let out: Vec<u64> = mem.out.iter().map(ptr).collect();
        let acc = mem.acc.device_ptr(&streams.compute).0;
        let finite = u32::from(checks.finite);
        let mut p = 0;
        for (b, batch) in self.batches.iter().enumerate() {
            let side = b % 2;
            let nseg = batch.segments.len() as u32;
            let cfg = LaunchConfig {
                grid_dim: (batch.blocks, 1, 1),
                block_dim: (packing::BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            for k in 0..batch.pieces {
                let slot = p % SLOTS;
                let len = self.flow.wait_filled(p)?;
                streams
                    .h2d
                    .wait(&ev.consumed[slot])
                    .or_cuda("stream wait")?;
                {
                    // SAFETY: the producer wrote the slot's first `len` bytes and leaves them
                    // alone until the copy queued here is done (it waits for `copied[slot]`).
                    let piece = unsafe { &mem.stage[slot].bytes()[..len] };
                    // SAFETY: the device slot holds at least `len` bytes, and the kernels that
                    // read it before are done (the wait on `consumed[slot]` above).
                    unsafe { drv::memcpy_htod_async(raw[slot], piece, streams.h2d.cu_stream()) }
                        .or_cuda("copy to the device")?;
                }
                ev.copied[slot].record(&streams.h2d).or_cuda("event")?;
                self.flow.update(|st| st.issued = p + 1);
                streams
                    .compute
                    .wait(&ev.copied[slot])
                    .or_cuda("stream wait")?;
                let mut launch = streams.compute.launch_builder(&kernels.accumulate);
                launch.arg(&raw[slot]).arg(&nseg).arg(&acc);
                // SAFETY: the arguments are those of ema_accumulate; the piece's table describes
                // segments within the piece and the accumulators (packing.rs).
                unsafe { launch.launch(cfg) }.or_cuda("ema_accumulate")?;
                if k + 1 == batch.pieces {
                    // The output buffer's previous batch has reached the host.
                    streams
                        .compute
                        .wait(&ev.downloaded[side])
                        .or_cuda("stream wait")?;
                    let counts = out[side];
                    let data = counts + OUT_HEADER as u64;
                    // SAFETY: the counters are the first 8 bytes of the output buffer.
                    unsafe { drv::memset_d8_async(counts, 0, 8, streams.compute.cu_stream()) }
                        .or_cuda("memset")?;
                    let mut launch = streams.compute.launch_builder(&kernels.encode);
                    launch
                        .arg(&raw[slot])
                        .arg(&nseg)
                        .arg(&acc)
                        .arg(&data)
                        .arg(&counts)
                        .arg(&finite);
                    // SAFETY: the arguments are those of ema_encode; the output buffer holds
                    // OUT_HEADER + out_bytes of every batch.
                    unsafe { launch.launch(cfg) }.or_cuda("ema_encode")?;
                    ev.encoded[side].record(&streams.compute).or_cuda("event")?;
                }
                ev.consumed[slot]
                    .record(&streams.compute)
                    .or_cuda("event")?;
                p += 1;
            }
            // The pinned output buffer's previous batch, b - 2, is written out.
            self.flow.wait_written(b.saturating_sub(1))?;
            streams.d2h.wait(&ev.encoded[side]).or_cuda("stream wait")?;
            {
                let n = OUT_HEADER + batch.out_bytes as usize;
                // SAFETY: nothing reads the buffer: the writer is done with batch b - 2 and
                // reads batch b only after `downloaded[side]`, recorded below.
                let host = unsafe { &mut mem.out_host[side].bytes_mut()[..n] };
                // SAFETY: the device buffer holds `n` bytes, encoded before `encoded[side]`.
                unsafe { drv::memcpy_dtoh_async(host, out[side], streams.d2h.cu_stream()) }
                    .or_cuda("copy from the device")?;
            }
            ev.downloaded[side].record(&streams.d2h).or_cuda("event")?;
            if done.send(b).is_err() {
                break; // the writer has stopped; wait_written says why
            }
        }
        drop(done);
        self.flow.wait_written(self.batches.len())
    }

    /// The writer: writes each batch handed over by the issuing thread, in order.
    fn write(&self, batches: Receiver<usize>, sink: &dyn Sink, checks: Checks) {
        let _gone = GoneOnDrop(self.flow, true);
        for b in batches {
            if self.flow.lock().stopped {
                return;
            }
            match self.finish(b, sink, checks) {
                Ok(()) => self.flow.update(|st| st.written = b + 1),
                Err(e) => {
                    self.flow.update(|st| st.error = Some(e));
                    return;
                }
            }
        }
    }

    /// Waits for batch `b`'s output and writes it to the sink, or fails as the CPU path would
    /// when the kernels counted NaN/Inf or overflow.
    fn finish(&self, b: usize, sink: &dyn Sink, checks: Checks) -> Result<()> {
        let side = b % 2;
        let batch = &self.batches[b];
        self.events.downloaded[side]
            .synchronize()
            .or_cuda("copy from the device")?;
        // SAFETY: the copy into the buffer is done, and the next one is queued only once this
        // batch is counted as written.
        let out = unsafe { self.mem.out_host[side].bytes() };
        let counts = packing::out_counts(out);
        if counts != [0, 0] {
            return Err(batch.error_from_cpu(self.ckpts, self.jobs, checks, counts));
        }
        let end = OUT_HEADER + batch.out_bytes as usize;
        batch.write_out(self.jobs, &out[OUT_HEADER..end], sink)
    }
}
