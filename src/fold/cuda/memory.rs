//! The buffers of the pipeline, allocated once per fold: pinned host staging and output
//! buffers, device input slots, accumulators and outputs, and the events that order them.

use std::sync::Arc;

use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaSlice, CudaStream, DriverError, PinnedHostSlice,
};

use super::device::Gpu;
use super::{describe, Describe, SLOTS};
use crate::error::{Error, Result};
use crate::fold::packing::{Batch, OUT_HEADER};
use crate::fold::Job;

/// Buffer sizes in bytes (`acc`: in f64 elements).
pub(super) struct Sizes {
    pub stage: usize,
    pub out: usize,
    pub acc: usize,
}

/// Pinned host memory, used through its raw pointer by one thread at a time as the pipeline's
/// events and [`Flow`] decide.
pub(super) struct HostBuf {
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
    pub unsafe fn bytes_mut(&self) -> &mut [u8] {
        // SAFETY: `ptr` points at `len` bytes of pinned memory owned by `_mem`, alive as long as
        // `self`; the caller guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The bytes, to read or to copy to the device.
    ///
    /// # Safety
    /// While the slice lives, nothing may write the buffer (no [`HostBuf::bytes_mut`] slice, no
    /// copy from the device into it).
    pub unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: as in `bytes_mut`; the caller guarantees that nothing writes meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// Every buffer of the pipeline, allocated once.
pub(super) struct Memory {
    pub stage: Vec<HostBuf>,
    pub out_host: Vec<HostBuf>,
    pub raw: Vec<CudaSlice<u8>>,
    pub acc: CudaSlice<f64>,
    pub out: Vec<CudaSlice<u8>>,
}

impl Sizes {
    /// The sizes for `batches` of `jobs` (of `outputs` outputs): their largest piece, output
    /// and accumulators.
    pub fn of(batches: &[Batch], jobs: &[Job], outputs: usize) -> Sizes {
        let max = |f: &dyn Fn(&Batch) -> u64| batches.iter().map(f).max().unwrap_or(0) as usize;
        Sizes {
            stage: max(&|b| {
                (0..b.pieces)
                    .map(|k| b.piece_bytes(jobs, k))
                    .max()
                    .unwrap_or(0)
            }),
            out: OUT_HEADER + outputs * max(&|b| b.out_bytes),
            acc: outputs * max(&|b| b.elems),
        }
    }

    /// Bytes of device memory that [`Memory::alloc`] allocates.
    pub fn device_bytes(&self) -> usize {
        SLOTS * self.stage + 2 * self.out + 8 * self.acc
    }
}

impl Memory {
    pub fn alloc(gpu: &Gpu, stream: &Arc<CudaStream>, sizes: &Sizes) -> Result<Memory> {
        const MIB: usize = 1 << 20;
        let device_bytes = sizes.device_bytes();
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
pub(super) struct Idle<'a>(pub &'a Arc<CudaContext>);

impl Drop for Idle<'_> {
    fn drop(&mut self) {
        let _ = self.0.synchronize();
    }
}

/// The events that order the streams and the host.
pub(super) struct Events {
    /// Piece copied out of pinned slot i (the producer may refill it).
    pub copied: Vec<CudaEvent>,
    /// Kernels done with device slot i (the next copy may overwrite it).
    pub consumed: Vec<CudaEvent>,
    /// Batch encoded into device output buffer i.
    pub encoded: Vec<CudaEvent>,
    /// Device output buffer i copied to pinned output buffer i.
    pub downloaded: Vec<CudaEvent>,
}

impl Events {
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Events> {
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
