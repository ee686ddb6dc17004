//! Vocabulary-parallel cross-entropy family: each rank holds `logits[:, off .. off + Vs]`.
//!
//! ```text
//! rank r:  shard_stats(logits_r)          -> stats_r  [N, 4]   (max, sum exp, z_y or 0, sum w z)
//!          all-gather stats over ranks    -> stats    [P, N, 4] (NCCL, by the caller)
//!          shard_combine(stats)           -> loss, lse, gradient coefficients   (same bits on every rank)
//!          shard_backward(logits_r)       -> grad_r
//! ```

use std::ffi::c_void;

use cudarc::driver::LaunchConfig;

use super::launch::{denominator, launch, reduce_rows, reduction_code, row_grid, row_threads};
use super::{
    check_common, check_ctx, check_len, LossConfig, LossElement, LossExtras, LossOutputs,
    Reduction, Rows, TargetIndex,
};
use crate::backend::opt_addr;
use crate::backend::private::{Addr, AddrMut};
use crate::error::{Error, Result};
use crate::params::*;
use crate::{Backend, DeviceRead, DeviceWrite};

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
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::loss::*;
/// let dev = fusekit::emu::Emulator::new()?; // or fusekit::Gpu::new(0)?
/// let (n, vs) = (2, 3);
/// let shard = dev.upload(&[0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6])?;
/// let targets = dev.upload(&[4i64, 0])?;
/// let mut stats = dev.alloc_zeros::<f32>(n * SHARD_STAT_WIDTH)?;
/// let spec = ShardSpec { vocab_offset: 3, full_vocab: 6 };
/// shard_stats(&dev, Rows::contiguous(n, vs), &shard, &targets, spec, &Default::default(), &LossConfig::default(), &mut stats)?;
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn shard_stats<B, T, I, L, S, D>(
    dev: &B,
    rows: Rows,
    logits: &L,
    targets: &S,
    spec: ShardSpec,
    extras: &LossExtras<'_, B>,
    cfg: &LossConfig,
    stats: &mut D,
) -> Result<()>
where
    B: Backend,
    T: LossElement,
    I: TargetIndex,
    L: DeviceRead<T, B>,
    S: DeviceRead<I, B>,
    D: DeviceWrite<f32, B>,
{
    let kcfg = check_shard(dev, rows, spec, logits, targets, extras, cfg)?;
    check_ctx(dev, "stats", stats)?;
    check_len(
        "stats",
        stats.len(),
        rows.n_rows * SHARD_STAT_WIDTH,
        "[N, 4]",
    )?;
    let (lp, _a) = logits.addr(dev);
    let (tp, _b) = targets.addr(dev);
    let (sp, _c) = stats.addr_mut(dev);
    let (wp, _d) = opt_addr(extras.class_weights, dev);
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
        dev,
        &format!("fk_ce_shard_stats_{}_{}", T::SUFFIX, I::SUFFIX),
        lc,
        &p,
    )
}

/// Checks shared by the per-shard kernels; returns the kernel's loss configuration.
fn check_shard<
    B: Backend,
    T: LossElement,
    I: TargetIndex,
    L: DeviceRead<T, B>,
    S: DeviceRead<I, B>,
>(
    dev: &B,
    rows: Rows,
    spec: ShardSpec,
    logits: &L,
    targets: &S,
    extras: &LossExtras<'_, B>,
    cfg: &LossConfig,
) -> Result<fk_loss_config> {
    rows.validate()?;
    spec.validate(rows.vocab)?;
    check_ctx(dev, "logits", logits)?;
    check_ctx(dev, "targets", targets)?;
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
    weights_cfg(dev, cfg, extras, spec.full_vocab)
}

fn weights_cfg<B: Backend>(
    dev: &B,
    cfg: &LossConfig,
    extras: &LossExtras<'_, B>,
    vocab: usize,
) -> Result<fk_loss_config> {
    if let Some(w) = extras.class_weights {
        check_ctx(dev, "class_weights", w)?;
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
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::loss::*;
/// let dev = fusekit::emu::Emulator::new()?; // or fusekit::Gpu::new(0)?
/// let (n, p) = (2, 2);
/// let stats = dev.alloc_zeros::<f32>(p * n * SHARD_STAT_WIDTH)?; // gathered
/// let targets = dev.upload(&[4i64, 0])?;
/// let mut out = LossOutputs::new(&dev, n)?;
/// shard_combine(&dev, n, 6, &stats, p, &targets, &Default::default(), &LossConfig::default(), &mut out)?;
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn shard_combine<B, I, D, S>(
    dev: &B,
    n_rows: usize,
    full_vocab: usize,
    stats: &D,
    n_shards: usize,
    targets: &S,
    extras: &LossExtras<'_, B>,
    cfg: &LossConfig,
    out: &mut LossOutputs<B>,
) -> Result<()>
where
    B: Backend,
    I: TargetIndex,
    D: DeviceRead<f32, B>,
    S: DeviceRead<I, B>,
{
    if n_shards == 0 {
        return Err(Error::invalid("n_shards", "must be >= 1"));
    }
    check_ctx(dev, "stats", stats)?;
    check_len(
        "stats",
        stats.len(),
        n_shards * n_rows * SHARD_STAT_WIDTH,
        "[n_shards, N, 4]",
    )?;
    let rows = Rows::contiguous(n_rows, full_vocab);
    let ck = check_common(dev, rows, usize::MAX, targets, extras, cfg, out)?;
    let (tp, _a) = targets.addr(dev);
    let (wp, _b) = opt_addr(extras.class_weights, dev);
    let (gop, _c) = opt_addr(extras.grad_output.as_ref(), dev);
    dev.zero(&mut out.status)?;
    if cfg.reduction == Reduction::Mean {
        denominator::<B, I>(dev, tp, wp, n_rows, full_vocab, cfg.ignore_index, out)?;
    }
    {
        let (sp, _d) = stats.addr(dev);
        let (rp, _e) = out.rows.addr_mut(dev);
        let (lp, _f) = out.lse.addr_mut(dev);
        let (cp, _g) = out.coeffs.addr_mut(dev);
        let (dp, _h) = out.denominator.addr(dev);
        let (stp, _i) = out.status.addr_mut(dev);
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
        launch(dev, &format!("fk_ce_shard_combine_{}", I::SUFFIX), lc, &p)?;
    }
    reduce_rows(dev, n_rows, cfg.reduction, out)
}

/// One shard's gradient from the combined lse and coefficients in `out` (after [`shard_combine`]).
/// `grad` is a separate buffer with `rows.grad_stride`.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::loss::*;
/// let dev = fusekit::emu::Emulator::new()?; // or fusekit::Gpu::new(0)?
/// let (n, vs) = (2, 3);
/// let shard = dev.upload(&[0.1f32; 6])?;
/// let targets = dev.upload(&[4i64, 0])?;
/// let out = LossOutputs::new(&dev, n)?; // filled by shard_combine
/// let mut grad = dev.alloc_zeros::<f32>(n * vs)?;
/// let spec = ShardSpec { vocab_offset: 3, full_vocab: 6 };
/// shard_backward(&dev, Rows::contiguous(n, vs), &shard, &targets, spec, &Default::default(), &LossConfig::default(), &out, &mut grad)?;
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn shard_backward<B, T, I, L, S, G>(
    dev: &B,
    rows: Rows,
    logits: &L,
    targets: &S,
    spec: ShardSpec,
    extras: &LossExtras<'_, B>,
    cfg: &LossConfig,
    out: &LossOutputs<B>,
    grad: &mut G,
) -> Result<()>
where
    B: Backend,
    T: LossElement,
    I: TargetIndex,
    L: DeviceRead<T, B>,
    S: DeviceRead<I, B>,
    G: DeviceWrite<T, B>,
{
    let kcfg = check_shard(dev, rows, spec, logits, targets, extras, cfg)?;
    check_ctx(dev, "grad", grad)?;
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
    let (lp, _a) = logits.addr(dev);
    let (gp, _b) = grad.addr_mut(dev);
    let size = std::mem::size_of::<T>() as u64;
    let l_end = lp + ((rows.n_rows - 1) * rows.row_stride + rows.vocab) as u64 * size;
    let g_end = gp + ((rows.n_rows - 1) * rows.grad_stride + rows.vocab) as u64 * size;
    if lp != gp && lp < g_end && gp < l_end {
        return Err(Error::layout("grad", "partially overlaps logits"));
    }
    let (tp, _c) = targets.addr(dev);
    let (wp, _d) = opt_addr(extras.class_weights, dev);
    let (sp, _e) = out.lse.addr(dev);
    let (cp, _f) = out.coeffs.addr(dev);
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
        dev,
        &format!("fk_ce_shard_bwd_{}_{}", T::SUFFIX, I::SUFFIX),
        lc,
        &p,
    )
}
