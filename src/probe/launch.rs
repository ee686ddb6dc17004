//! The unsafe boundary of the probe family: parameter struct, launch shape, launch.

use std::ffi::c_void;

use cudarc::driver::LaunchConfig;

use crate::device::Family;
use crate::error::Result;
use crate::launch::launch_kernel;
use crate::params::{fk_copy_params, FK_COPY_THREADS, FK_COPY_UNROLL};
use crate::Backend;

/// Grid for a grid-stride streaming kernel: enough blocks to cover the work, at most one full wave.
pub(crate) fn streaming_grid<B: Backend>(
    dev: &B,
    work_items: u64,
    items_per_block: u64,
    threads: u32,
) -> u32 {
    let p = dev.props();
    let blocks_per_sm = (p.max_threads_per_sm / threads).max(1) as u64;
    let wave = p.sm_count as u64 * blocks_per_sm;
    work_items.div_ceil(items_per_block).clamp(1, wave) as u32
}

/// Launches `fk_copy_v16`. The caller has checked: same length, 16-byte aligned, no overlap, n_bytes > 0,
/// and holds the stream guards of both buffers until this returns.
pub(super) fn copy_v16<B: Backend>(dev: &B, src: u64, dst: u64, n_bytes: u64) -> Result<()> {
    let params = fk_copy_params {
        src: src as *const c_void,
        dst: dst as *mut c_void,
        n_bytes,
    };
    let per_block = (FK_COPY_THREADS * FK_COPY_UNROLL) as u64;
    let cfg = LaunchConfig {
        grid_dim: (
            streaming_grid(dev, n_bytes / 16, per_block, FK_COPY_THREADS),
            1,
            1,
        ),
        block_dim: (FK_COPY_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // The kernel reads n_bytes from src and writes n_bytes to dst; the caller checked both.
    launch_kernel(dev, Family::Probe, "fk_copy_v16", cfg, &params, None)
}
