//! The one place kernels are launched: a family's `launch.rs` builds the parameter struct and the launch
//! shape, this calls cudarc.

use cudarc::driver::sys::CUfunction_attribute as FnAttr;
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

use crate::device::Family;
use crate::error::{DriverContext, Result};
use crate::Gpu;

/// Launches kernel `name` of `family` with its by-value parameter struct (and, for the few kernels that
/// take one, a second device-pointer argument), raising the dynamic shared-memory limit when the launch
/// asks for more than the default 48 KiB.
///
/// Contract, upheld by every family's safe layer before it gets here: the struct has the header's layout
/// (bindgen), and every pointer in it addresses a live buffer of this context with at least the extent
/// the kernel touches, whose stream guards the caller holds until this returns.
pub(crate) fn launch_kernel<P: DeviceRepr>(
    gpu: &Gpu,
    family: Family,
    name: &str,
    cfg: LaunchConfig,
    params: &P,
    extra_ptr: Option<u64>,
) -> Result<()> {
    let f = gpu.function(family, name)?;
    if cfg.shared_mem_bytes > 48 * 1024 {
        f.set_attribute(
            FnAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            cfg.shared_mem_bytes as i32,
        )
        .during(&format!("raising the shared-memory limit of {name}"))?;
    }
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(params);
    if let Some(p) = &extra_ptr {
        b.arg(p);
    }
    // SAFETY: see the contract above.
    unsafe { b.launch(cfg) }.during(&format!("launching {name}"))?;
    Ok(())
}

/// A one-dimensional launch shape.
pub(crate) fn grid(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.clamp(1, u32::MAX as usize) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}
