//! The pipeline that moves every batch through the device (the diagram of the module above):
//! a producer thread fills pinned slots, the issuing thread queues copies and kernels on their
//! streams, and a writer thread writes finished batches, all ordered by events and [`Flow`].

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Condvar, Mutex, MutexGuard};

use cudarc::driver::{result as drv, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::device::{Gpu, Kernels, Streams};
use super::memory::{Events, Idle, Memory, Sizes};
use super::{Describe, SLOTS};
use crate::error::{Error, Result};
use crate::fold::packing::{self, Batch, Limits, OUT_HEADER};
use crate::fold::{Job, Progress, Work};

/// Runs the fold jobs `jobs` of `work` on `gpu`: every input range is copied to the device
/// once, and enters the accumulators of all the outputs.
pub(super) fn fold(gpu: &Gpu, work: &Work, jobs: &[Job]) -> Result<()> {
    let outputs = work.outputs();
    let (free, _) = gpu
        .ctx
        .mem_get_info()
        .or_cuda("cannot query device memory")?;
    let (batches, sizes) = fit(jobs, outputs, free, gpu.device)?;
    if batches.is_empty() {
        return Ok(());
    }
    let pieces: Vec<(usize, usize)> = batches
        .iter()
        .enumerate()
        .flat_map(|(b, batch)| (0..batch.pieces).map(move |k| (b, k)))
        .collect();
    let module = gpu.load_kernels()?;
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
    unsafe { gpu.ctx.disable_event_tracking() };
    let new_stream = || gpu.ctx.new_stream().or_cuda("cannot create a stream");
    let streams = Streams {
        h2d: new_stream()?,
        compute: new_stream()?,
        d2h: new_stream()?,
    };
    let mem = Memory::alloc(gpu, &streams.compute, &sizes)?;
    let events = Events::new(&gpu.ctx)?;
    // Dropped before `events` and `mem` (declared after them): nothing is in flight when
    // they are freed, whichever way this function returns.
    let _idle = Idle(&gpu.ctx);
    // Stream-ordered allocations are done before other streams use them.
    streams
        .compute
        .synchronize()
        .or_cuda("cannot allocate device memory")?;
    let flow = Flow::default();
    let run = Run {
        work,
        jobs,
        batches: &batches,
        mem: &mem,
        events: &events,
        flow: &flow,
    };
    std::thread::scope(|s| {
        let (done, written) = mpsc::channel();
        s.spawn(|| run.produce(&pieces, work.progress));
        s.spawn(|| run.write(written));
        let _stop = StopOnDrop(&flow);
        run.issue(&streams, &kernels, done)
    })
}

/// The batches of `jobs` and the buffers they need, within `free` bytes of device memory less
/// a sixteenth (the driver's own allocations, the module): the default limits halved until
/// the buffers fit, down to [`Limits::FLOOR`]; below that, an error.
fn fit(jobs: &[Job], outputs: usize, free: usize, device: usize) -> Result<(Vec<Batch>, Sizes)> {
    const MIB: usize = 1 << 20;
    let budget = free - free / 16;
    let mut limits = Limits::for_outputs(outputs);
    loop {
        let batches = packing::plan(jobs, outputs, limits);
        let sizes = Sizes::of(&batches, jobs, outputs);
        if sizes.device_bytes() <= budget {
            return Ok((batches, sizes));
        }
        limits = limits.halved().ok_or_else(|| {
            Error::Cuda(format!(
                "out of memory on cuda:{device}: {:.1} MiB of device memory are free, and the \
                 smallest batches need {:.1} MiB",
                free as f64 / MIB as f64,
                sizes.device_bytes() as f64 / MIB as f64
            ))
        })?;
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
    work: &'a Work<'a>,
    jobs: &'a [Job<'a>],
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
                let (len, read) = self.batches[b].fill_piece(self.work, self.jobs, k, buf)?;
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
    fn issue(&self, streams: &Streams, kernels: &Kernels, done: Sender<usize>) -> Result<()> {
        let (mem, ev) = (self.mem, self.events);
        let ptr = |s: &CudaSlice<u8>| s.device_ptr(&streams.compute).0;
        let raw: Vec<u64> = mem.raw.iter().map(ptr).collect();
        let out: Vec<u64> = mem.out.iter().map(ptr).collect();
        let acc = mem.acc.device_ptr(&streams.compute).0;
        let finite = u32::from(self.work.opts.finite);
        let nout = self.work.outputs() as u32;
        let mut p = 0;
        for (b, batch) in self.batches.iter().enumerate() {
            let side = b % 2;
            let nseg = batch.segments.len() as u32;
            // Output o's accumulators start `stride` elements after output o − 1's, and its
            // encoded bytes `out_bytes` after.
            let stride = batch.elems;
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
                launch
                    .arg(&raw[slot])
                    .arg(&nseg)
                    .arg(&nout)
                    .arg(&acc)
                    .arg(&stride);
                // SAFETY: the arguments are those of ema_accumulate; the piece's table describes
                // segments within the piece and the accumulators, `nout` arrays of `stride`
                // (packing.rs), which the accumulator buffer holds.
                unsafe { launch.launch(cfg) }.or_cuda("ema_accumulate")?;
                if k + 1 == batch.pieces {
                    // The output buffer's previous batch has reached the host.
                    streams
                        .compute
                        .wait(&ev.downloaded[side])
                        .or_cuda("stream wait")?;
                    let counts = out[side];
                    // SAFETY: the counters are the first 8 bytes of the output buffer.
                    unsafe { drv::memset_d8_async(counts, 0, 8, streams.compute.cu_stream()) }
                        .or_cuda("memset")?;
                    for o in 0..u64::from(nout) {
                        let acc_o = acc + o * stride * 8;
                        let data = counts + OUT_HEADER as u64 + o * batch.out_bytes;
                        let mut launch = streams.compute.launch_builder(&kernels.encode);
                        launch
                            .arg(&raw[slot])
                            .arg(&nseg)
                            .arg(&acc_o)
                            .arg(&data)
                            .arg(&counts)
                            .arg(&finite);
                        // SAFETY: the arguments are those of ema_encode; output o's
                        // accumulators and encoded bytes lie within their buffers, which hold
                        // `nout` of every batch's (and OUT_HEADER).
                        unsafe { launch.launch(cfg) }.or_cuda("ema_encode")?;
                    }
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
                let n = OUT_HEADER + nout as usize * batch.out_bytes as usize;
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
    fn write(&self, batches: Receiver<usize>) {
        let _gone = GoneOnDrop(self.flow, true);
        for b in batches {
            if self.flow.lock().stopped {
                return;
            }
            match self.finish(b) {
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
    fn finish(&self, b: usize) -> Result<()> {
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
            return Err(batch.error_from_cpu(self.work, self.jobs, counts));
        }
        let end = OUT_HEADER + batch.outputs * batch.out_bytes as usize;
        batch.write_out(self.jobs, &out[OUT_HEADER..end], self.work.sinks)
    }
}
