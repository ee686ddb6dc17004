//! The unsafe boundary of the loss family: parameter structs, launch shapes, launches.

use std::ffi::c_void;

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

use super::{LossElement, LossExtras, LossOutputs, Reduction, Rows, TargetIndex};
use crate::device::Family;
use crate::error::{DriverContext, Result};
use crate::launch::launch_kernel;
use crate::params::*;
use crate::Gpu;

/// Rows up to this many bytes (plus 16)  stay in shared memory between the two passes (one HBM read). Longer rows
/// are re-read in pass 2, mostly from L2. 96 KiB keeps two blocks of 512 threads per SM on H100/A100.
pub const ROW_CACHE_LIMIT: usize = 96 * 1024;

pub(crate) fn reduction_code(r: Reduction) -> u32 {
    match r {
        Reduction::None => FK_REDUCTION_NONE,
        Reduction::Mean => FK_REDUCTION_MEAN,
        Reduction::Sum => FK_REDUCTION_SUM,
    }
}

/// Threads for a row kernel: about four 16-byte vectors per thread, a power of two in [64, 512].
pub(crate) fn row_threads(vocab: usize, elem_size: usize) -> u32 {
    let nvec = vocab.div_ceil(16 / elem_size);
    (nvec.div_ceil(4).next_power_of_two() as u32).clamp(64, FK_CE_MAX_THREADS)
}

pub(crate) fn row_grid(n_rows: usize) -> u32 {
    n_rows.min(1 << 22) as u32
}

pub(crate) fn launch(
    gpu: &Gpu,
    name: &str,
    cfg: LaunchConfig,
    params: &impl cudarc::driver::DeviceRepr,
) -> Result<()> {
    launch_kernel(gpu, Family::Loss, name, cfg, params, None)
}

pub(crate) fn one_block(threads: u32) -> LaunchConfig {
    crate::launch::grid(1, threads)
}

/// Mean denominator into out.denominator.
pub(crate) fn denominator<I: TargetIndex>(
    gpu: &Gpu,
    targets: u64,
    weights: u64,
    n_rows: usize,
    vocab: usize,
    ignore_index: i64,
    out: &mut LossOutputs,
) -> Result<()> {
    let (dp, _dg) = out.denominator.device_ptr_mut(gpu.stream());
    let p = fk_loss_denominator_params {
        targets: targets as *const c_void,
        weights: weights as *const f32,
        denominator: dp as *mut f32,
        n_rows: n_rows as i64,
        vocab: vocab as i64,
        ignore_index,
    };
    launch(
        gpu,
        &format!("fk_loss_denominator_{}", I::SUFFIX),
        one_block(FK_LOSS_REDUCE_THREADS),
        &p,
    )
}

/// Fixed-order sum of `n` floats at `values` into `out` (divided by `denominator` when non-zero).
pub(crate) fn reduce(gpu: &Gpu, values: u64, n: usize, denominator: u64, out: u64) -> Result<()> {
    let p = fk_loss_reduce_params {
        values: values as *const f32,
        denominator: denominator as *const f32,
        out: out as *mut f32,
        n: n as i64,
    };
    launch(gpu, "fk_loss_reduce", one_block(FK_LOSS_REDUCE_THREADS), &p)
}

/// Device pointers of one launch of the fused row kernel (0 = absent).
pub(crate) struct FusedPtrs {
    pub logits: u64,
    pub grad: u64,
    pub targets: u64,
    pub weights: u64,
    pub grad_output: u64,
    pub denominator: u64,
    pub rows: u64,
    pub lse: u64,
    pub status: u64,
}

/// The fused row kernel alone. The caller holds the stream guards of every pointer.
pub(crate) fn fused_kernel<T: LossElement, I: TargetIndex>(
    gpu: &Gpu,
    rows: Rows,
    ptr: &FusedPtrs,
    reduction: Reduction,
    ignore_index: i64,
    cfg: fk_loss_config,
) -> Result<()> {
    let size = std::mem::size_of::<T>();
    let cache_bytes = rows.vocab * size + 16;
    let cache_row = ptr.grad != 0
        && cache_bytes <= ROW_CACHE_LIMIT.min(gpu.props().smem_per_block_optin as usize - 1024);
    let p = fk_ce_params {
        logits: ptr.logits as *const c_void,
        grad: ptr.grad as *mut c_void,
        targets: ptr.targets as *const c_void,
        weights: ptr.weights as *const f32,
        grad_output: ptr.grad_output as *const f32,
        denominator: if reduction == Reduction::Mean {
            ptr.denominator as *const f32
        } else {
            std::ptr::null()
        },
        loss: ptr.rows as *mut f32,
        lse: ptr.lse as *mut f32,
        status: ptr.status as *mut u64,
        n_rows: rows.n_rows as i64,
        vocab: rows.vocab as i64,
        row_stride: rows.row_stride as i64,
        grad_stride: rows.grad_stride as i64,
        ignore_index,
        reduction: reduction_code(reduction),
        cache_row: cache_row as u32,
        cfg,
    };
    let lc = LaunchConfig {
        grid_dim: (row_grid(rows.n_rows), 1, 1),
        block_dim: (row_threads(rows.vocab, size), 1, 1),
        shared_mem_bytes: if cache_row { cache_bytes as u32 } else { 0 },
    };
    launch(
        gpu,
        &format!("fk_ce_fwd_bwd_{}_{}", T::SUFFIX, I::SUFFIX),
        lc,
        &p,
    )
}

/// Device pointer of an optional buffer, with its stream guard.
pub(crate) fn opt_ptr<'a, T, S: DevicePtr<T>>(
    s: Option<&'a S>,
    stream: &'a std::sync::Arc<cudarc::driver::CudaStream>,
) -> (u64, Option<cudarc::driver::SyncOnDrop<'a>>) {
    match s {
        Some(s) => {
            let (p, g) = s.device_ptr(stream);
            (p, Some(g))
        }
        None => (0, None),
    }
}

/// The fused kernel plus its mean-denominator prologue and reduction epilogue. `gp == 0`: forward only.
#[allow(clippy::too_many_arguments)]
pub(super) fn fused<T: LossElement, I: TargetIndex, S: DevicePtr<I>>(
    gpu: &Gpu,
    rows: Rows,
    lp: u64,
    gp: u64,
    targets: &S,
    extras: &LossExtras<'_>,
    reduction: Reduction,
    ignore_index: i64,
    cfg: fk_loss_config,
    out: &mut LossOutputs,
) -> Result<()> {
    let stream = gpu.stream().clone();
    let (tp, _tg) = targets.device_ptr(&stream);
    let (wp, _wg) = opt_ptr(extras.class_weights, &stream);
    let (gop, _gog) = opt_ptr(extras.grad_output.as_ref(), &stream);
    stream
        .memset_zeros(&mut out.status)
        .during("clearing the loss status")?;
    if reduction == Reduction::Mean {
        denominator::<I>(gpu, tp, wp, rows.n_rows, rows.vocab, ignore_index, out)?;
    }
    {
        let (rp, _rg) = out.rows.device_ptr_mut(&stream);
        let (sp, _sg) = out.lse.device_ptr_mut(&stream);
        let (dp, _dg) = out.denominator.device_ptr(&stream);
        let (stp, _stg) = out.status.device_ptr_mut(&stream);
        let ptr = FusedPtrs {
            logits: lp,
            grad: gp,
            targets: tp,
            weights: wp,
            grad_output: gop,
            denominator: dp,
            rows: rp,
            lse: sp,
            status: stp,
        };
        fused_kernel::<T, I>(gpu, rows, &ptr, reduction, ignore_index, cfg)?;
    }
    reduce_rows(gpu, rows.n_rows, reduction, out)
}

/// The reduced loss from the per-row losses (mean/sum); nothing for `Reduction::None`.
pub(crate) fn reduce_rows(
    gpu: &Gpu,
    n_rows: usize,
    reduction: Reduction,
    out: &mut LossOutputs,
) -> Result<()> {
    if reduction == Reduction::None {
        return Ok(());
    }
    let stream = gpu.stream();
    let (rp, _rg) = out.rows.device_ptr(stream);
    let (dp, _dg) = out.denominator.device_ptr(stream);
    let (op, _og) = out.loss.device_ptr_mut(stream);
    reduce(
        gpu,
        rp,
        n_rows,
        if reduction == Reduction::Mean { dp } else { 0 },
        op,
    )
}
