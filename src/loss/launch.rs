//! The unsafe boundary of the loss family: parameter structs, launch shapes, launches.

use std::ffi::c_void;

use cudarc::driver::LaunchConfig;

use super::{FusedPlan, LossExtras, LossOutputs, Reduction, TargetIndex};
use crate::backend::opt_addr;
use crate::backend::private::{Addr, AddrMut};
use crate::device::Family;
use crate::error::{Error, Result};
use crate::launch::launch_kernel;
use crate::params::*;
use crate::{Backend, DeviceRead};

/// Rows up to this many bytes (plus 16) stay in one block's shared memory between the two passes (one HBM
/// read); it is also the largest slice a cluster block keeps. Longer rows are split over a cluster on
/// sm_90+, or re-read in pass 2 (see [`RowPath`]). 96 KiB keeps two blocks of 512 threads per SM on
/// H100/A100.
pub const ROW_CACHE_LIMIT: usize = 96 * 1024;

/// How the fused kernel keeps a row between its statistics pass and its gradient pass.
///
/// [`RowPath::Auto`] (the default) picks, per call, the path that moves the fewest bytes: a row of at
/// most [`ROW_CACHE_LIMIT`] bytes stays in one block's shared memory; a longer one, on a GPU with
/// thread-block clusters (compute capability ≥ 9.0), is split over a cluster of 2, 4 or 8 blocks that
/// each keep a slice of at most 64 KiB (96 KiB for rows above 512 KiB) in shared memory; anything else
/// re-reads the row in pass 2. `Auto` also asks the driver whether its cluster fits the GPU (a MIG
/// slice may fit none) and re-reads when it does not. The explicit paths exist so tests and benchmarks
/// can compare them; a path that cannot hold the row on this GPU is an [`Error::Unsupported`].
/// Forward-only calls make one pass and ignore the path.
///
/// ```
/// use fusekit::loss::RowPath;
/// let h100 = fusekit::DeviceProps::example_h100();
/// // 32000 bf16 logits (62.5 KiB) fit one block; 128256 (250 KiB) go to a cluster of 4 blocks.
/// assert_eq!(RowPath::Auto.resolve(&h100, 32000, 2, true).unwrap(), RowPath::SharedMemory);
/// assert_eq!(RowPath::Auto.resolve(&h100, 128256, 2, true).unwrap(), RowPath::Cluster { ctas: 4 });
/// let mut a100 = h100.clone();
/// a100.compute_capability = (8, 0);
/// assert_eq!(RowPath::Auto.resolve(&a100, 128256, 2, true).unwrap(), RowPath::Reread);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RowPath {
    /// The fastest path for the shape and the GPU.
    #[default]
    Auto,
    /// One block per row, the whole row in its shared memory (rows up to [`ROW_CACHE_LIMIT`] bytes).
    SharedMemory,
    /// A cluster of `ctas` blocks per row (2, 4 or 8; compute capability ≥ 9.0), each holding a slice of
    /// the row in its shared memory; the slices' statistics are merged through distributed shared memory.
    Cluster {
        /// Blocks per row: 2, 4 or 8.
        ctas: u32,
    },
    /// One block per row; pass 2 reads the row again from global memory (from L2 when it is still there).
    Reread,
}

/// Cluster slices above this many bytes are used only for rows that need them (> 8 × 64 KiB): smaller
/// slices leave room for more blocks, and more loads in flight, per SM.
const CLUSTER_SLICE_TARGET: usize = 64 * 1024;

impl RowPath {
    /// The concrete path (never `Auto`) this choice takes for rows of `vocab` elements of `elem_size`
    /// bytes on `props`' GPU; `with_grad == false` (forward only) always gives `Reread` (one pass, nothing
    /// to keep).
    ///
    /// ```
    /// use fusekit::loss::RowPath;
    /// let h100 = fusekit::DeviceProps::example_h100();
    /// assert_eq!(RowPath::Auto.resolve(&h100, 256000, 2, true).unwrap(), RowPath::Cluster { ctas: 8 });
    /// assert!(RowPath::SharedMemory.resolve(&h100, 256000, 2, true).is_err());
    /// assert_eq!(RowPath::Auto.resolve(&h100, 256000, 2, false).unwrap(), RowPath::Reread);
    /// ```
    pub fn resolve(
        self,
        props: &crate::DeviceProps,
        vocab: usize,
        elem_size: usize,
        with_grad: bool,
    ) -> Result<RowPath> {
        if let RowPath::Cluster { ctas } = self {
            if !matches!(ctas, 2 | 4 | 8) {
                return Err(Error::invalid(
                    "row_path",
                    format!("Cluster {{ ctas: {ctas} }}: expected 2, 4 or 8 blocks per row"),
                ));
            }
        }
        if !with_grad {
            return Ok(RowPath::Reread);
        }
        let limit = ROW_CACHE_LIMIT.min((props.smem_per_block_optin as usize).saturating_sub(1024));
        let fits = |elems: usize, cap: usize| elems * elem_size + 16 <= cap.min(limit);
        let clusters = props.compute_capability.0 >= 9;
        match self {
            RowPath::Auto => {
                if fits(vocab, limit) {
                    return Ok(RowPath::SharedMemory);
                }
                if clusters {
                    for cap in [CLUSTER_SLICE_TARGET, limit] {
                        for ctas in [2u32, 4, 8] {
                            if fits(cluster_slice(vocab, ctas), cap) {
                                return Ok(RowPath::Cluster { ctas });
                            }
                        }
                    }
                }
                Ok(RowPath::Reread)
            }
            RowPath::SharedMemory if !fits(vocab, limit) => Err(Error::Unsupported {
                what: format!(
                    "RowPath::SharedMemory: a row of {vocab} x {elem_size} B does not fit one block's \
                     shared memory ({limit} B)"
                ),
            }),
            RowPath::Cluster { ctas } => {
                if !clusters {
                    return Err(Error::Unsupported {
                        what: format!(
                            "RowPath::Cluster needs thread-block clusters (compute capability >= 9.0); \
                             this GPU is {}.{}",
                            props.compute_capability.0, props.compute_capability.1
                        ),
                    });
                }
                if !fits(cluster_slice(vocab, ctas), limit) {
                    return Err(Error::Unsupported {
                        what: format!(
                            "RowPath::Cluster {{ ctas: {ctas} }}: a slice of {} x {elem_size} B does not \
                             fit one block's shared memory ({limit} B)",
                            cluster_slice(vocab, ctas)
                        ),
                    });
                }
                Ok(self)
            }
            other => Ok(other),
        }
    }
}

/// Elements per CTA of a cluster row: V / ctas rounded up to a multiple of 8, so every slice starts on
/// the same 16-byte alignment as the row (8 elements are 16 B in bf16/f16 and 32 B in f32).
pub(crate) fn cluster_slice(vocab: usize, ctas: u32) -> usize {
    vocab.div_ceil(ctas as usize).div_ceil(8) * 8
}

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

pub(crate) fn launch<B: Backend>(
    dev: &B,
    name: &str,
    cfg: LaunchConfig,
    params: &impl cudarc::driver::DeviceRepr,
) -> Result<()> {
    launch_kernel(dev, Family::Loss, name, cfg, params, None)
}

pub(crate) fn one_block(threads: u32) -> LaunchConfig {
    crate::launch::grid(1, threads)
}

/// Mean denominator into out.denominator.
pub(crate) fn denominator<B: Backend, I: TargetIndex>(
    dev: &B,
    targets: u64,
    weights: u64,
    n_rows: usize,
    vocab: usize,
    ignore_index: i64,
    out: &mut LossOutputs<B>,
) -> Result<()> {
    let (dp, _dg) = out.denominator.addr_mut(dev);
    let p = fk_loss_denominator_params {
        targets: targets as *const c_void,
        weights: weights as *const f32,
        denominator: dp as *mut f32,
        n_rows: n_rows as i64,
        vocab: vocab as i64,
        ignore_index,
    };
    launch(
        dev,
        &format!("fk_loss_denominator_{}", I::SUFFIX),
        one_block(FK_LOSS_REDUCE_THREADS),
        &p,
    )
}

/// Fixed-order sum of `n` floats at `values` into `out` (divided by `denominator` when non-zero).
pub(crate) fn reduce<B: Backend>(
    dev: &B,
    values: u64,
    n: usize,
    denominator: u64,
    out: u64,
) -> Result<()> {
    let p = fk_loss_reduce_params {
        values: values as *const f32,
        denominator: denominator as *const f32,
        out: out as *mut f32,
        n: n as i64,
    };
    launch(dev, "fk_loss_reduce", one_block(FK_LOSS_REDUCE_THREADS), &p)
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

/// The fused row kernel alone, as `plan` says. The caller holds the guards of every pointer.
pub(crate) fn fused_kernel<B: Backend>(dev: &B, plan: &FusedPlan, ptr: &FusedPtrs) -> Result<()> {
    let rerouted;
    let mut plan = plan;
    if plan.auto_cluster() {
        // Auto only takes a cluster the driver can place (a MIG slice may fit none); a forced one errs.
        if let Some((name, threads, smem)) = plan.cluster_query() {
            if !dev.cluster_fits(Family::Loss, &name, threads, smem)? {
                rerouted = plan.rerouted();
                plan = &rerouted;
            }
        }
    }
    let rows = plan.rows;
    let l = plan.row_kernel();
    let (slice, cache_row) = match plan.row_path() {
        RowPath::Cluster { ctas } => (cluster_slice(rows.vocab, ctas), false),
        path => (0, path == RowPath::SharedMemory),
    };
    let p = fk_ce_params {
        logits: ptr.logits as *const c_void,
        grad: ptr.grad as *mut c_void,
        targets: ptr.targets as *const c_void,
        weights: ptr.weights as *const f32,
        grad_output: ptr.grad_output as *const f32,
        denominator: if plan.reduction == Reduction::Mean {
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
        ignore_index: plan.ignore_index,
        reduction: reduction_code(plan.reduction),
        cache_row: cache_row as u32,
        slice: slice as i64,
        cfg: plan.params,
    };
    launch(dev, &l.kernel, l.config(), &p)
}

/// The fused kernel plus its mean-denominator prologue and reduction epilogue. `gp == 0`: forward only.
pub(super) fn fused<B: Backend, I: TargetIndex, S: DeviceRead<I, B>>(
    dev: &B,
    plan: &FusedPlan,
    lp: u64,
    gp: u64,
    targets: &S,
    extras: &LossExtras<'_, B>,
    out: &mut LossOutputs<B>,
) -> Result<()> {
    let rows = plan.rows;
    let (tp, _tg) = targets.addr(dev);
    let (wp, _wg) = opt_addr(extras.class_weights, dev);
    let (gop, _gog) = opt_addr(extras.grad_output.as_ref(), dev);
    dev.zero(&mut out.status)?;
    if plan.reduction == Reduction::Mean {
        denominator::<B, I>(dev, tp, wp, rows.n_rows, rows.vocab, plan.ignore_index, out)?;
    }
    {
        let (rp, _rg) = out.rows.addr_mut(dev);
        let (sp, _sg) = out.lse.addr_mut(dev);
        let (dp, _dg) = out.denominator.addr(dev);
        let (stp, _stg) = out.status.addr_mut(dev);
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
        fused_kernel(dev, plan, &ptr)?;
    }
    reduce_rows(dev, rows.n_rows, plan.reduction, out)
}

/// The reduced loss from the per-row losses (mean/sum); nothing for `Reduction::None`.
pub(crate) fn reduce_rows<B: Backend>(
    dev: &B,
    n_rows: usize,
    reduction: Reduction,
    out: &mut LossOutputs<B>,
) -> Result<()> {
    if reduction == Reduction::None {
        return Ok(());
    }
    let (rp, _rg) = out.rows.addr(dev);
    let (dp, _dg) = out.denominator.addr(dev);
    let (op, _og) = out.loss.addr_mut(dev);
    reduce(
        dev,
        rp,
        n_rows,
        if reduction == Reduction::Mean { dp } else { 0 },
        op,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_math::{maxsum_merge, row_maxsum_as_kernel, MaxSum};
    use crate::testing::Rng;

    /// The kernel's slice of CTA `rank`: [j0, j0 + n).
    fn slice_of(vocab: usize, ctas: u32, rank: usize) -> (usize, usize) {
        let s = cluster_slice(vocab, ctas);
        let j0 = rank * s;
        (j0, if j0 >= vocab { 0 } else { s.min(vocab - j0) })
    }

    #[test]
    fn cluster_slices_partition_the_row_on_vector_boundaries() {
        for vocab in (1..300).chain([32000, 50257, 128256, 256000, 1 << 20, 1_000_003]) {
            for ctas in [2u32, 4, 8] {
                let mut next = 0;
                for rank in 0..ctas as usize {
                    let (j0, n) = slice_of(vocab, ctas, rank);
                    assert_eq!(j0 % 8, 0, "V {vocab} ctas {ctas} rank {rank}");
                    if n > 0 {
                        assert_eq!(
                            j0, next,
                            "V {vocab} ctas {ctas} rank {rank}: gap or overlap"
                        );
                        next = j0 + n;
                    }
                }
                assert_eq!(
                    next, vocab,
                    "V {vocab} ctas {ctas}: the slices must cover the row"
                );
            }
        }
    }

    #[test]
    fn auto_picks_a_path_that_resolves_and_fits() {
        let h100 = crate::DeviceProps::example_h100();
        let mut a100 = h100.clone();
        a100.compute_capability = (8, 0);
        a100.smem_per_block_optin = 163 * 1024;
        for props in [&h100, &a100] {
            for size in [2usize, 4] {
                for vocab in [
                    1,
                    7,
                    1003,
                    32000,
                    49144,
                    49145,
                    50257,
                    128256,
                    200_000,
                    256000,
                    1 << 20,
                ] {
                    let auto = RowPath::Auto.resolve(props, vocab, size, true).unwrap();
                    assert_ne!(auto, RowPath::Auto);
                    assert_eq!(auto.resolve(props, vocab, size, true).unwrap(), auto);
                    let row_fits = vocab * size + 16 <= ROW_CACHE_LIMIT;
                    assert_eq!(
                        auto == RowPath::SharedMemory,
                        row_fits,
                        "V {vocab} x {size}"
                    );
                    if let RowPath::Cluster { ctas } = auto {
                        assert!(props.compute_capability.0 >= 9);
                        assert!(cluster_slice(vocab, ctas) * size + 16 <= ROW_CACHE_LIMIT);
                    }
                    if !row_fits && props.compute_capability.0 < 9 {
                        assert_eq!(auto, RowPath::Reread);
                    }
                    // Forward only: one pass whatever was asked.
                    assert_eq!(
                        RowPath::Auto.resolve(props, vocab, size, false).unwrap(),
                        RowPath::Reread
                    );
                }
            }
        }
        // The issue's sizes on an H100, bf16: 32000 in one block, 128256 over 4, 256000 over 8.
        let p = |v| RowPath::Auto.resolve(&h100, v, 2, true).unwrap();
        assert_eq!(p(32000), RowPath::SharedMemory);
        assert_eq!(p(128256), RowPath::Cluster { ctas: 4 });
        assert_eq!(p(256000), RowPath::Cluster { ctas: 8 });
        // f32 at 256000 (1 MB) fits no cluster of 8 × 96 KiB: re-read.
        assert_eq!(
            RowPath::Auto.resolve(&h100, 256000, 4, true).unwrap(),
            RowPath::Reread
        );
    }

    /// The cluster kernel's statistics, replayed on the host: each CTA reduces its slice as a block
    /// does, then every CTA merges the C states in rank order. The result must be the row's lse, and a
    /// NaN anywhere, even alone in a slice, must survive.
    #[test]
    fn cluster_merge_of_slices_gives_the_row_lse() {
        let mut rng = Rng::new(crate::testing::seed_for("cluster_merge_of_slices"));
        for vocab in [1usize, 9, 57, 1003, 50257, 128256] {
            for ctas in [2u32, 4, 8] {
                for nan_at in [None, Some(rng.below(vocab as u64) as usize)] {
                    let mut row: Vec<f32> = (0..vocab).map(|_| rng.normal() as f32 * 3.0).collect();
                    if let Some(j) = nan_at {
                        row[j] = f32::NAN;
                    }
                    let mut st = MaxSum::EMPTY;
                    for rank in 0..ctas as usize {
                        let (j0, n) = slice_of(vocab, ctas, rank);
                        let threads = row_threads(n, 2) as usize;
                        let j0 = j0.min(vocab); // an empty slice past the row's end
                        let part = row_maxsum_as_kernel(&row[j0..j0 + n], threads, 8, 0);
                        st = maxsum_merge(st, part);
                    }
                    let lse = st.m as f64 + (st.s as f64).ln();
                    if nan_at.is_some() {
                        assert!(lse.is_nan(), "V {vocab} ctas {ctas}: NaN lost");
                        continue;
                    }
                    let m = row
                        .iter()
                        .map(|&x| x as f64)
                        .fold(f64::NEG_INFINITY, f64::max);
                    let want = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                    assert!(
                        (lse - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "V {vocab} ctas {ctas}: {lse} vs {want}"
                    );
                }
            }
        }
    }
}
