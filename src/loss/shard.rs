//! Vocabulary-parallel cross-entropy family: each rank holds `logits[:, off .. off + Vs]`.
//!
//! ```text
//! rank r:  shard_stats(logits_r)          -> stats_r  [N, 4]   (max, sum exp, z_y or 0, sum w z)
//!          all-gather stats over ranks    -> stats    [P, N, 4] (NCCL, by the caller)
//!          shard_combine(stats)           -> loss, lse, gradient coefficients   (same bits on every rank)
//!          shard_backward(logits_r)       -> grad_r
//! ```

use std::ffi::c_void;

use super::launch::{denominator, launch, reduce_rows, reduction_code};
use super::{
    check_ctx, GradBuffer, LossConfig, LossElement, LossExtras, LossOutputs, Reduction, Rows,
    ShardCombinePlan, ShardPlan, ShardStage, TargetIndex,
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
    pub(crate) fn validate(&self, shard_vocab: usize) -> Result<()> {
        if self
            .vocab_offset
            .checked_add(shard_vocab)
            .is_none_or(|end| end > self.full_vocab)
        {
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
    check_ctx(dev, "stats", stats)?;
    let plan = plan_shard::<B, T, I, L, S>(
        dev,
        rows,
        spec,
        logits,
        targets,
        extras,
        cfg,
        usize::MAX,
        ShardStage::Stats { stats: stats.len() },
    )?;
    let (lp, _a) = logits.addr(dev);
    let (tp, _b) = targets.addr(dev);
    let (sp, _c) = stats.addr_mut(dev);
    let (wp, _d) = opt_addr(extras.class_weights, dev);
    let rows = plan.rows;
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
        cfg: plan.params,
    };
    let l = &plan.launches()[0];
    launch(dev, &l.kernel, l.config(), &p)
}

/// The device checks of a per-shard call (every buffer on `dev`), then its plan.
#[allow(clippy::too_many_arguments)]
fn plan_shard<
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
    out_rows: usize,
    stage: ShardStage,
) -> Result<ShardPlan> {
    check_ctx(dev, "logits", logits)?;
    check_ctx(dev, "targets", targets)?;
    extras.check_owner(dev)?;
    let args = extras.args(logits.len(), GradBuffer::None, targets.len(), out_rows);
    ShardPlan::new::<T, I>(rows, spec, &args, cfg, stage)
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
    check_ctx(dev, "stats", stats)?;
    check_ctx(dev, "targets", targets)?;
    extras.check_owner(dev)?;
    out.check_owner(dev)?;
    let args = extras.args(0, GradBuffer::None, targets.len(), out.n_rows());
    let plan = ShardCombinePlan::new::<I>(n_rows, full_vocab, stats.len(), n_shards, &args, cfg)?;
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
            n_rows: plan.n_rows as i64,
            n_shards: plan.n_shards as i64,
            vocab: plan.vocab as i64,
            ignore_index: cfg.ignore_index,
            reduction: reduction_code(cfg.reduction),
            cfg: plan.params,
        };
        let l = plan.combine_launch();
        launch(dev, &l.kernel, l.config(), &p)?;
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
    check_ctx(dev, "grad", grad)?;
    out.check_owner(dev)?;
    let plan = plan_shard::<B, T, I, L, S>(
        dev,
        rows,
        spec,
        logits,
        targets,
        extras,
        cfg,
        out.n_rows(),
        ShardStage::Backward { grad: grad.len() },
    )?;
    let (l_len, g_len) = (logits.len() as u64, grad.len() as u64);
    let (lp, _a) = logits.addr(dev);
    let (gp, _b) = grad.addr_mut(dev);
    // Byte sizes of live buffers cannot overflow.
    let size = std::mem::size_of::<T>() as u64;
    let (l_end, g_end) = (lp + l_len * size, gp + g_len * size);
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
        cfg: plan.params,
    };
    let l = &plan.launches()[0];
    launch(dev, &l.kernel, l.config(), &p)
}
