//! The one place kernels are launched: a family's `launch.rs` builds the parameter struct and the launch
//! shape, this hands them to the backend (cudarc on a GPU, the SIMT emulator on the CPU).

use cudarc::driver::{DeviceRepr, LaunchConfig};

use crate::device::Family;
use crate::error::Result;
use crate::Backend;

/// Launches kernel `name` of `family` with its by-value parameter struct (and, for the few kernels that
/// take one, a second device-pointer argument).
///
/// Contract, upheld by every family's safe layer before it gets here: the struct has the header's layout
/// (bindgen), and every pointer in it addresses a live buffer of this device with at least the extent
/// the kernel touches, whose guards the caller holds until this returns.
pub(crate) fn launch_kernel<B: Backend, P: DeviceRepr>(
    dev: &B,
    family: Family,
    name: &str,
    cfg: LaunchConfig,
    params: &P,
    extra_ptr: Option<u64>,
) -> Result<()> {
    dev.launch(family, name, cfg, params, extra_ptr)
}

/// A one-dimensional launch shape.
pub(crate) fn grid(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.clamp(1, u32::MAX as usize) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}
