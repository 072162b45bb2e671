//! The driver, the device and the kernels: the CUDA driver is loaded at run time (cudarc's
//! `dynamic-loading`), the device opened once per process, and the kernels loaded from the
//! PTX embedded in the binary (`kernels.ptx`, made from `kernels.cu` by `gen_ptx.py`), which
//! the driver compiles for the device: no NVRTC, no CUDA toolkit at run time.

use std::sync::{Arc, Mutex};

use cudarc::driver::{result as drv, sys, CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use super::Describe;
use crate::error::{Error, Result};

/// The PTX of the kernels (compute_60, PTX ISA 8.0 of NVRTC 12.0: see `gen_ptx.py`).
pub(crate) const PTX: &str = include_str!("kernels.ptx");

/// The names under which cudarc looks for the driver library (also `nvcuda`'s, Windows' name,
/// left out of messages elsewhere).
fn driver_names() -> Vec<String> {
    let mut names = Vec::new();
    let lib = if cfg!(windows) { "nvcuda" } else { "cuda" };
    for n in cudarc::get_lib_name_candidates(lib) {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names
}

/// An opened device.
pub(super) struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub device: usize,
}

impl Gpu {
    /// Loads the driver and opens device `device`.
    pub fn open(device: usize) -> Result<Gpu> {
        // SAFETY: only tries to dlopen the driver library under its usual names.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Cuda(format!(
                "no CUDA driver: none of {} can be loaded (no NVIDIA driver on this machine, \
                 or its library is not on the loader's path)",
                driver_names().join(", ")
            )));
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
        Ok(Gpu { ctx, device })
    }

    /// Loads the kernels: the driver compiles the embedded PTX for this device
    /// (`cuModuleLoadData`).
    pub fn load_kernels(&self) -> Result<Arc<CudaModule>> {
        self.ctx.load_module(Ptx::from_src(PTX)).map_err(|e| {
            let old = e.0 == sys::cudaError_enum::CUDA_ERROR_UNSUPPORTED_PTX_VERSION;
            super::describe(
                &format!(
                    "cannot load the kernels on cuda:{}{}",
                    self.device,
                    if old {
                        " (their PTX is ISA 8.0: the driver must support CUDA 12.0, version 525 or newer)"
                    } else {
                        ""
                    }
                ),
                e,
            )
        })
    }
}

/// The two kernels of a fold.
pub(super) struct Kernels {
    pub accumulate: CudaFunction,
    pub encode: CudaFunction,
}

/// The streams of the pipeline: copies in, kernels, copies out.
pub(super) struct Streams {
    pub h2d: Arc<CudaStream>,
    pub compute: Arc<CudaStream>,
    pub d2h: Arc<CudaStream>,
}
