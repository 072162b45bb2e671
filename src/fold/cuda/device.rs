//! The driver, the device and the kernels: the CUDA driver and NVRTC are loaded at run time
//! (cudarc's `dynamic-loading`), the device opened once per process, and the kernels of
//! `kernels.cu` compiled for it.

use std::ffi::CString;
use std::sync::{Arc, Mutex};

use cudarc::driver::{result as drv, sys, CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::{self, Ptx};

use super::Describe;
use crate::error::{Error, Result};
use crate::fold::packing;

/// An opened device.
pub(super) struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub device: usize,
}

impl Gpu {
    /// Loads the driver, opens device `device` and checks that NVRTC can be loaded.
    pub fn open(device: usize) -> Result<Gpu> {
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
    pub fn compile(&self) -> Result<Arc<CudaModule>> {
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
