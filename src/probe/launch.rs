//! The unsafe boundary of the probe family: parameter struct, launch shape, launch.

use std::ffi::c_void;

use super::CopyPlan;
use crate::device::Family;
use crate::error::Result;
use crate::launch::launch_kernel;
use crate::params::{fk_copy_params, FK_COPY_THREADS, FK_COPY_UNROLL};
use crate::plan::PlannedLaunch;
use crate::Backend;

/// Grid for a grid-stride streaming kernel: enough blocks to cover the work, at most one full wave.
pub(crate) fn streaming_grid(
    p: &crate::DeviceProps,
    work_items: u64,
    items_per_block: u64,
    threads: u32,
) -> u32 {
    let blocks_per_sm = (p.max_threads_per_sm / threads).max(1) as u64;
    let wave = p.sm_count as u64 * blocks_per_sm;
    work_items.div_ceil(items_per_block).clamp(1, wave) as u32
}

/// The launch of `fk_copy_v16` for `n_bytes`.
pub(super) fn copy_launch(p: &crate::DeviceProps, n_bytes: u64) -> PlannedLaunch {
    let per_block = (FK_COPY_THREADS * FK_COPY_UNROLL) as u64;
    PlannedLaunch {
        kernel: "fk_copy_v16".into(),
        grid: streaming_grid(p, n_bytes / 16, per_block, FK_COPY_THREADS),
        block: FK_COPY_THREADS,
        shared_mem_bytes: 0,
    }
}

/// Launches `fk_copy_v16` as planned. The caller has checked: 16-byte aligned, no overlap, n_bytes > 0,
/// and holds the stream guards of both buffers until this returns.
pub(super) fn copy_v16<B: Backend>(dev: &B, plan: &CopyPlan, src: u64, dst: u64) -> Result<()> {
    let params = fk_copy_params {
        src: src as *const c_void,
        dst: dst as *mut c_void,
        n_bytes: plan.n_bytes,
    };
    for l in plan.launches() {
        // The kernel reads n_bytes from src and writes n_bytes to dst; the caller checked both.
        launch_kernel(dev, Family::Probe, &l.kernel, l.config(), &params, None)?;
    }
    Ok(())
}
