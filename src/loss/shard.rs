//! Vocabulary-parallel cross-entropy family: each rank holds `logits[:, off .. off + Vs]`.
//!
//! ```text
//! rank r:  shard_stats(logits_r)          -> stats_r  [N, 4]   (max, sum exp, z_y or 0, sum w z)
//!          all-gather stats over ranks    -> stats    [P, N, 4] (NCCL, by the caller)
//!          shard_combine(stats)           -> loss, lse, gradient coefficients   (same bits on every rank)
//!          shard_backward(logits_r)       -> grad_r
//! ```

use std::ffi::c_void;

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

use super::launch::{
    denominator, launch, opt_ptr, reduce_rows, reduction_code, row_grid, row_threads,
};
use super::{
    check_common, check_ctx, check_len, LossConfig, LossElement, LossExtras, LossOutputs,
    Reduction, Rows, TargetIndex,
};
use crate::error::{DriverContext, Error, Result};
use crate::params::*;
use crate::Gpu;

/// f32 values per row in a shard's statistics: max, Σ exp(z − max), z_y (or 0), Σ w_j z_j.
pub const SHARD_STAT_WIDTH: usize = 4;

/// Where a shard sits in the whole vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardSpec {
    /// Class id of the shard's first column.
    pub vocab_offset: usize,
    /// The whole vocabulary V.
    pub full_vocab: usize,
}

impl ShardSpec {
    fn validate(&self, shard_vocab: usize) -> Result<()> {
        if self.vocab_offset + shard_vocab > self.full_vocab {
            return Err(Error::shape(
                "shard",
                format!(
                    "vocab_offset + shard width <= full_vocab {}",
                    self.full_vocab
                ),
                format!("{} + {shard_vocab}", self.vocab_offset),
            ));
        }
        Ok(())
    }
}

/// Per-row statistics of one vocabulary shard into `stats` (`[N, 4]` f32), to be all-gathered.
/// `rows.vocab` is the shard width; class weights (if any) are the whole vocabulary's `[V]`.
///
/// ```no_run
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::loss::*;
/// let gpu = fusekit::Gpu::new(0)?;
/// let (n, vs) = (2, 3);
/// let shard = gpu.stream().clone_htod(&[0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6]).unwrap();
/// let targets = gpu.stream().clone_htod(&[4i64, 0]).unwrap();
/// let mut stats = gpu.stream().alloc_zeros::<f32>(n * SHARD_STAT_WIDTH).unwrap();
/// let spec = ShardSpec { vocab_offset: 3, full_vocab: 6 };
/// shard_stats(&gpu, Rows::contiguous(n, vs), &shard, &targets, spec, &Default::default(), &LossConfig::default(), &mut stats)?;
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn shard_stats<T, I, L, S, D>(
    gpu: &Gpu,
    rows: Rows,
    logits: &L,
    targets: &S,
    spec: ShardSpec,
    extras: &LossExtras<'_>,
    cfg: &LossConfig,
    stats: &mut D,
) -> Result<()>
where
    T: LossElement,
    I: TargetIndex,
    L: DevicePtr<T>,
    S: DevicePtr<I>,
    D: DevicePtrMut<f32>,
{
    let kcfg = check_shard(gpu, rows, spec, logits, targets, extras, cfg)?;
    check_ctx(gpu, "stats", stats)?;
    check_len(
        "stats",
        stats.len(),
        rows.n_rows * SHARD_STAT_WIDTH,
        "[N, 4]",
    )?;
    let s = gpu.stream();
    let (lp, _a) = logits.device_ptr(s);
    let (tp, _b) = targets.device_ptr(s);
    let (sp, _c) = stats.device_ptr_mut(s);
    let (wp, _d) = opt_ptr(extras.class_weights, s);
    let p = fk_ce_shard_stats_params {
        logits: lp as *const c_void,
        targets: tp as *const c_void,
        weights: wp as *const f32,
        stats: sp as *mut fk_shard_stat,
        status: std::ptr::null_mut(),
        n_rows: rows.n_rows as i64,
        shard_vocab: rows.vocab as i64,
        vocab_offset: spec.vocab_offset as i64,
        row_stride: rows.row_stride as i64,
        ignore_index: cfg.ignore_index,
        cfg: kcfg,
    };
    let lc = LaunchConfig {
        grid_dim: (row_grid(rows.n_rows), 1, 1),
        block_dim: (row_threads(rows.vocab, std::mem::size_of::<T>()), 1, 1),
        shared_mem_bytes: 0,
    };
    launch(
        gpu,
        &format!("fk_ce_shard_stats_{}_{}", T::SUFFIX, I::SUFFIX),
        lc,
        &p,
    )
}

/// Checks shared by the per-shard kernels; returns the kernel's loss configuration.
fn check_shard<T: LossElement, I: TargetIndex, L: DevicePtr<T>, S: DevicePtr<I>>(
    gpu: &Gpu,
    rows: Rows,
    spec: ShardSpec,
    logits: &L,
    targets: &S,
    extras: &LossExtras<'_>,
    cfg: &LossConfig,
) -> Result<fk_loss_config> {
    rows.validate()?;
    spec.validate(rows.vocab)?;
    check_ctx(gpu, "logits", logits)?;
    check_ctx(gpu, "targets", targets)?;
    check_len(
        "logits",
        logits.len(),
        (rows.n_rows - 1) * rows.row_stride + rows.vocab,
        "the shard",
    )?;
    if targets.len() != rows.n_rows {
        return Err(Error::shape(
            "targets",
            format!("{} elements", rows.n_rows),
            format!("{}", targets.len()),
        ));
    }
    weights_cfg(gpu, cfg, extras, spec.full_vocab)
}

fn weights_cfg(
    gpu: &Gpu,
    cfg: &LossConfig,
    extras: &LossExtras<'_>,
    vocab: usize,
) -> Result<fk_loss_config> {
    if let Some(w) = extras.class_weights {
        check_ctx(gpu, "class_weights", w)?;
        if w.len() != vocab {
            return Err(Error::shape(
                "class_weights",
                format!("{vocab} elements (full vocab)"),
                format!("{}", w.len()),
            ));
        }
    }
    if extras.class_weights.is_some()
        && extras.class_weights_host.is_none()
        && cfg.label_smoothing != super::LabelSmoothing::None
    {
        return Err(Error::invalid(
            "class_weights_host",
            "label smoothing with class weights needs the host copy",
        ));
    }
    cfg.to_params(
        vocab,
        extras.class_weights_host,
        extras.class_weights.is_some(),
    )
}

/// Merges the all-gathered statistics `[n_shards, N, 4]` (in shard order) into per-row loss, lse and
/// gradient coefficients in `out`, and the reduced loss. Validates targets against `full_vocab` (see
/// [`LossOutputs::check_targets_sync`]).
///
/// ```no_run
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::loss::*;
/// let gpu = fusekit::Gpu::new(0)?;
/// let (n, p) = (2, 2);
/// let stats = gpu.stream().alloc_zeros::<f32>(p * n * SHARD_STAT_WIDTH).unwrap(); // gathered
/// let targets = gpu.stream().clone_htod(&[4i64, 0]).unwrap();
/// let mut out = LossOutputs::new(&gpu, n)?;
/// shard_combine(&gpu, n, 6, &stats, p, &targets, &Default::default(), &LossConfig::default(), &mut out)?;
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn shard_combine<I, D, S>(
    gpu: &Gpu,
    n_rows: usize,
    full_vocab: usize,
    stats: &D,
    n_shards: usize,
    targets: &S,
    extras: &LossExtras<'_>,
    cfg: &LossConfig,
    out: &mut LossOutputs,
) -> Result<()>
where
    I: TargetIndex,
    D: DevicePtr<f32>,
    S: DevicePtr<I>,
{
    if n_shards == 0 {
        return Err(Error::invalid("n_shards", "must be >= 1"));
    }
    check_ctx(gpu, "stats", stats)?;
    check_len(
        "stats",
        stats.len(),
        n_shards * n_rows * SHARD_STAT_WIDTH,
        "[n_shards, N, 4]",
    )?;
    let rows = Rows::contiguous(n_rows, full_vocab);
    let ck = check_common(gpu, rows, usize::MAX, targets, extras, cfg, out)?;
    let stream = gpu.stream().clone();
    let (tp, _a) = targets.device_ptr(&stream);
    let (wp, _b) = opt_ptr(extras.class_weights, &stream);
    let (gop, _c) = opt_ptr(extras.grad_output.as_ref(), &stream);
    stream
        .memset_zeros(&mut out.status)
        .during("clearing the loss status")?;
    if cfg.reduction == Reduction::Mean {
        denominator::<I>(gpu, tp, wp, n_rows, full_vocab, cfg.ignore_index, out)?;
    }
    {
        let (sp, _d) = stats.device_ptr(&stream);
        let (rp, _e) = out.rows.device_ptr_mut(&stream);
        let (lp, _f) = out.lse.device_ptr_mut(&stream);
        let (cp, _g) = out.coeffs.device_ptr_mut(&stream);
        let (dp, _h) = out.denominator.device_ptr(&stream);
        let (stp, _i) = out.status.device_ptr_mut(&stream);
        let p = fk_ce_shard_combine_params {
            stats: sp as *const fk_shard_stat,
            targets: tp as *const c_void,
            weights: wp as *const f32,
            grad_output: gop as *const f32,
            denominator: if cfg.reduction == Reduction::Mean {
                dp as *const f32
            } else {
                std::ptr::null()
            },
            loss: rp as *mut f32,
            lse: lp as *mut f32,
            coeffs: cp as *mut fk_row_coeffs,
            status: stp as *mut u64,
            n_rows: n_rows as i64,
            n_shards: n_shards as i64,
            vocab: full_vocab as i64,
            ignore_index: cfg.ignore_index,
            reduction: reduction_code(cfg.reduction),
            cfg: ck.cfg,
        };
        let lc = LaunchConfig {
            grid_dim: (n_rows.div_ceil(256).min(65535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch(gpu, &format!("fk_ce_shard_combine_{}", I::SUFFIX), lc, &p)?;
    }
    reduce_rows(gpu, n_rows, cfg.reduction, out)
}

/// One shard's gradient from the combined lse and coefficients in `out` (after [`shard_combine`]).
/// `grad` is a separate buffer with `rows.grad_stride`.
///
/// ```no_run
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::loss::*;
/// let gpu = fusekit::Gpu::new(0)?;
/// let (n, vs) = (2, 3);
/// let shard = gpu.stream().clone_htod(&[0.1f32; 6]).unwrap();
/// let targets = gpu.stream().clone_htod(&[4i64, 0]).unwrap();
/// let out = LossOutputs::new(&gpu, n)?; // filled by shard_combine
/// let mut grad = gpu.stream().alloc_zeros::<f32>(n * vs).unwrap();
/// let spec = ShardSpec { vocab_offset: 3, full_vocab: 6 };
/// shard_backward(&gpu, Rows::contiguous(n, vs), &shard, &targets, spec, &Default::default(), &LossConfig::default(), &out, &mut grad)?;
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn shard_backward<T, I, L, S, G>(
    gpu: &Gpu,
    rows: Rows,
    logits: &L,
    targets: &S,
    spec: ShardSpec,
    extras: &LossExtras<'_>,
    cfg: &LossConfig,
    out: &LossOutputs,
    grad: &mut G,
) -> Result<()>
where
    T: LossElement,
    I: TargetIndex,
    L: DevicePtr<T>,
    S: DevicePtr<I>,
    G: DevicePtrMut<T>,
{
    let kcfg = check_shard(gpu, rows, spec, logits, targets, extras, cfg)?;
    check_ctx(gpu, "grad", grad)?;
    check_len(
        "grad",
        grad.len(),
        (rows.n_rows - 1) * rows.grad_stride + rows.vocab,
        "the shard gradient",
    )?;
    if out.n_rows() < rows.n_rows {
        return Err(Error::shape(
            "out",
            format!("LossOutputs for >= {} rows", rows.n_rows),
            format!("{} rows", out.n_rows()),
        ));
    }
    let s = gpu.stream();
    let (lp, _a) = logits.device_ptr(s);
    let (gp, _b) = grad.device_ptr_mut(s);
    let size = std::mem::size_of::<T>() as u64;
    let l_end = lp + ((rows.n_rows - 1) * rows.row_stride + rows.vocab) as u64 * size;
    let g_end = gp + ((rows.n_rows - 1) * rows.grad_stride + rows.vocab) as u64 * size;
    if lp != gp && lp < g_end && gp < l_end {
        return Err(Error::layout("grad", "partially overlaps logits"));
    }
    let (tp, _c) = targets.device_ptr(s);
    let (wp, _d) = opt_ptr(extras.class_weights, s);
    let (sp, _e) = out.lse.device_ptr(s);
    let (cp, _f) = out.coeffs.device_ptr(s);
    let p = fk_ce_shard_bwd_params {
        logits: lp as *const c_void,
        grad: gp as *mut c_void,
        targets: tp as *const c_void,
        weights: wp as *const f32,
        lse: sp as *const f32,
        coeffs: cp as *const fk_row_coeffs,
        n_rows: rows.n_rows as i64,
        shard_vocab: rows.vocab as i64,
        vocab_offset: spec.vocab_offset as i64,
        row_stride: rows.row_stride as i64,
        grad_stride: rows.grad_stride as i64,
        ignore_index: cfg.ignore_index,
        cfg: kcfg,
    };
    let lc = LaunchConfig {
        grid_dim: (row_grid(rows.n_rows), 1, 1),
        block_dim: (row_threads(rows.vocab, size as usize), 1, 1),
        shared_mem_bytes: 0,
    };
    launch(
        gpu,
        &format!("fk_ce_shard_bwd_{}_{}", T::SUFFIX, I::SUFFIX),
        lc,
        &p,
    )
}
