//! Fused losses: cross-entropy and its family (label smoothing, z-loss, softcap, class weights, focal,
//! Poly-1, generalised CE), forward and backward in one kernel over logits `[N, V]`; sigmoid focal loss;
//! vocabulary-parallel shards.
//!
//! # The template
//! Every row loss here depends on the row only through `lse`, `z_y` and `Σ_j w_j z_j`, so its gradient is
//! `∂ℓ/∂z_j = a·p_j + b·[j = y] + c·w_j` for three per-row scalars. One kernel computes the statistics
//! (fp32, online max/sum-exp), the loss and `(a, b, c)` per row, then writes the gradient in a second
//! sweep over the row, held on chip between the sweeps when it fits (then HBM sees one read of the logits
//! and one write of the gradient: the traffic floor): in one block's shared memory, or on sm_90+ split
//! over a thread-block cluster whose slice statistics merge through distributed shared memory (see
//! [`RowPath`]). The target column is computed in fp32 and rounded once.
//!
//! | [`LossKind`] | loss ℓ for target y (p = softmax(z), w_y = class weight or 1) |
//! | --- | --- |
//! | `CrossEntropy` | `(1−ε) w_y (lse − z_y) + (ε/V) Σ_j w_j (lse − z_j)` (ε: label smoothing) |
//! | `Focal { γ }` | `−w_y (1−p_y)^γ log p_y` (w = α per class) |
//! | `Poly1 { ε₁ }` | `w_y (−log p_y + ε₁ (1−p_y))` |
//! | `Poly1Focal { γ, ε₁ }` | focal `+ ε₁ w_y (1−p_y)^{γ+1}` |
//! | `Gce { q }` | `w_y (1 − p_y^q) / q` |
//!
//! Every kind may add a z-loss `s·lse²` and use a logit softcap `z = c·tanh(x/c)` (gradient chained through
//! `1 − tanh²`).
//!
//! # Semantics worth knowing
//! * `ignore_index` rows: loss 0, lse 0, gradient 0, not counted in a mean.
//! * `Reduction::Mean` divides by `D = Σ w_{y_i}` over the counted rows (not ignored, target in range;
//!   the row count without weights), for the smoothing term too, as PyTorch does (checked against torch
//!   2.15.0, with and without class weights). It divides whenever `D ≠ 0` (negative totals included);
//!   with `D = 0` (every row ignored, or weights that are 0 or cancel) the mean is **0 with a zero
//!   gradient**, where PyTorch returns a NaN loss, unless a row's loss is NaN (then NaN).
//! * The upstream gradient (`grad_output`) multiplies the gradient: one value for mean/sum, one per row
//!   for `Reduction::None`. The per-row `loss`/`lse` outputs are never scaled.
//! * Targets outside `[0, V)` that are not `ignore_index` never cause an out-of-bounds access: that row's
//!   loss and lse become NaN, its gradient 0, and [`LossOutputs::check_targets_sync`] reports the first one
//!   as [`Error::OutOfRange`]. (Checking device targets on the host would need a synchronisation the
//!   launch functions never make.)
//! * A NaN logit makes its row's loss, lse and every gradient element of the row NaN, and so a mean or
//!   sum; a NaN is never averaged away (NaN class weights included), whichever threads of the block saw
//!   it. Masked `−∞` logits are fine; a term weighted by exactly 0 adds 0, never `0·∞`. The whole table,
//!   beside PyTorch's results for the same inputs, is below (*Edge semantics of the fused losses*).
//! * Deterministic: the same inputs give the same bits on every run (fixed-order reductions, no atomics
//!   on data).
//!
#![doc = include_str!("edges.md")]

mod launch;
mod plan;
pub mod reference;

pub use plan::{
    FusedArgs, FusedPlan, GradBuffer, ShardCombinePlan, ShardPlan, ShardStage, SigmoidFocalPlan,
};

pub use launch::{RowPath, ROW_CACHE_LIMIT};

use crate::error::{Error, Result};
use crate::params::fk_loss_config;
use crate::{Backend, DeviceRead, DeviceWrite, Gpu};

pub use crate::dtype::{Float as LossElement, Index as TargetIndex};

/// Which row loss.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LossKind {
    /// Cross-entropy (with optional label smoothing, class weights, z-loss, softcap).
    CrossEntropy,
    /// Softmax focal loss; class weights act as per-class α.
    Focal {
        /// Focusing parameter γ ≥ 0 (γ = 0 is cross-entropy).
        gamma: f32,
    },
    /// PolyLoss Poly-1: CE + ε(1 − p_y).
    Poly1 {
        /// ε ≥ −1.
        epsilon: f32,
    },
    /// Poly-1 focal form: focal + ε(1 − p_y)^{γ+1}.
    Poly1Focal {
        /// Focusing parameter γ ≥ 0.
        gamma: f32,
        /// ε ≥ −1.
        epsilon: f32,
    },
    /// Generalised cross-entropy (1 − p_y^q)/q.
    Gce {
        /// q in (0, 1]; q → 0 is CE, q = 1 is MAE.
        q: f32,
    },
}

/// Label smoothing, in either convention.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LabelSmoothing {
    /// None.
    None,
    /// PyTorch: target distribution (1 − ε)·onehot + ε/V.
    PyTorch(f32),
    /// Megatron: ε scaled by V/(V − 1), so the off-target mass per class is ε/(V − 1).
    Megatron(f32),
}

/// How per-row losses are reduced (and how the gradient is scaled).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// No reduction: the upstream gradient has one value per row.
    None,
    /// Mean over non-ignored rows, weighted by the target class weights when given.
    Mean,
    /// Sum.
    Sum,
}

/// Everything about the loss that is not a buffer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossConfig {
    /// The row loss.
    pub kind: LossKind,
    /// Rows whose target equals this are ignored (PyTorch's default: -100).
    pub ignore_index: i64,
    /// Label smoothing (cross-entropy only).
    pub label_smoothing: LabelSmoothing,
    /// z-loss scale s ≥ 0: adds s·lse².
    pub z_loss: f32,
    /// Logit softcap c > 0: z = c·tanh(x/c).
    pub softcap: Option<f32>,
    /// Reduction.
    pub reduction: Reduction,
}

impl Default for LossConfig {
    /// Plain cross-entropy, mean reduction, ignore_index −100.
    fn default() -> Self {
        LossConfig {
            kind: LossKind::CrossEntropy,
            ignore_index: -100,
            label_smoothing: LabelSmoothing::None,
            z_loss: 0.0,
            softcap: None,
            reduction: Reduction::Mean,
        }
    }
}

impl LossConfig {
    /// Checks every scalar parameter; returns the kernel's view of them.
    pub(crate) fn to_params(
        self,
        vocab: usize,
        weights: Option<&[f32]>,
        has_weights: bool,
    ) -> Result<fk_loss_config> {
        let finite = |arg: &'static str, v: f32, lo: f32, hi: f32, range: &str| -> Result<()> {
            if v.is_finite() && v >= lo && v <= hi {
                Ok(())
            } else {
                Err(Error::invalid(arg, format!("must be {range}, got {v}")))
            }
        };
        let (kind, gamma, poly_eps, gce_q) = match self.kind {
            LossKind::CrossEntropy => (crate::params::FK_LOSS_CE, 0.0, 0.0, 1.0),
            LossKind::Focal { gamma } => {
                finite("gamma", gamma, 0.0, 1e3, "finite and >= 0")?;
                (crate::params::FK_LOSS_FOCAL, gamma, 0.0, 1.0)
            }
            LossKind::Poly1 { epsilon } => {
                finite("epsilon", epsilon, -1.0, 1e6, "finite and >= -1")?;
                (crate::params::FK_LOSS_POLY1, 0.0, epsilon, 1.0)
            }
            LossKind::Poly1Focal { gamma, epsilon } => {
                finite("gamma", gamma, 0.0, 1e3, "finite and >= 0")?;
                finite("epsilon", epsilon, -1.0, 1e6, "finite and >= -1")?;
                (crate::params::FK_LOSS_POLY1_FOCAL, gamma, epsilon, 1.0)
            }
            LossKind::Gce { q } => {
                if !(q.is_finite() && q > 0.0 && q <= 1.0) {
                    return Err(Error::invalid("q", format!("must be in (0, 1], got {q}")));
                }
                (crate::params::FK_LOSS_GCE, 0.0, 0.0, q)
            }
        };
        let eps = match self.label_smoothing {
            LabelSmoothing::None => 0.0,
            LabelSmoothing::PyTorch(e) | LabelSmoothing::Megatron(e) => {
                finite("label_smoothing", e, 0.0, 1.0, "in [0, 1]")?;
                if self.kind != LossKind::CrossEntropy && e != 0.0 {
                    return Err(Error::invalid(
                        "label_smoothing",
                        format!(
                            "applies to LossKind::CrossEntropy only, not {:?}",
                            self.kind
                        ),
                    ));
                }
                reference::effective_smoothing(self.label_smoothing, vocab) as f32
            }
        };
        finite("z_loss", self.z_loss, 0.0, f32::MAX, "finite and >= 0")?;
        let softcap = match self.softcap {
            None => 0.0,
            Some(c) if c.is_finite() && c > 0.0 => c,
            Some(c) => {
                return Err(Error::invalid(
                    "softcap",
                    format!("must be finite and > 0, got {c}"),
                ))
            }
        };
        let weight_sum = weights.map_or(vocab as f64, |w| w.iter().map(|&x| x as f64).sum());
        Ok(fk_loss_config {
            kind,
            has_weights: has_weights as u32,
            smoothing: eps,
            z_loss: self.z_loss,
            softcap,
            gamma,
            poly_eps,
            gce_q,
            weight_sum: weight_sum as f32,
            vocab: vocab as f32,
        })
    }
}

/// Geometry of a logits matrix: `n_rows` rows of `vocab` classes, row `i` starting at element
/// `i·row_stride` (`row_stride ≥ vocab`; a padded or sliced matrix is fine).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    /// Rows (tokens).
    pub n_rows: usize,
    /// Classes per row.
    pub vocab: usize,
    /// Elements between row starts in the logits.
    pub row_stride: usize,
    /// Elements between row starts in the gradient.
    pub grad_stride: usize,
}

impl Rows {
    /// A dense `[n_rows, vocab]` matrix (logits and gradient).
    ///
    /// ```
    /// let r = fusekit::loss::Rows::contiguous(4, 10);
    /// assert_eq!((r.row_stride, r.grad_stride), (10, 10));
    /// ```
    pub fn contiguous(n_rows: usize, vocab: usize) -> Self {
        Rows {
            n_rows,
            vocab,
            row_stride: vocab,
            grad_stride: vocab,
        }
    }
}

/// Optional per-call buffers.
pub struct LossExtras<'a, B: Backend + 'a = Gpu> {
    /// Class weights `[V]` (f32). For the focal family they are the per-class α.
    pub class_weights: Option<&'a B::Buffer<f32>>,
    /// Host copy of the same weights, used for `Σ_j w_j` (label smoothing). Required with smoothing and
    /// weights; otherwise unused. (Reading the device copy would need a synchronisation.)
    pub class_weights_host: Option<&'a [f32]>,
    /// Upstream gradient: `[1]` for mean/sum, `[N]` for `Reduction::None`. `None` means 1.
    pub grad_output: Option<B::View<'a, f32>>,
    /// How the fused kernel keeps a row between its passes ([`RowPath::Auto`]: the fastest available).
    pub row_path: RowPath,
}

impl<B: Backend> Default for LossExtras<'_, B> {
    fn default() -> Self {
        LossExtras {
            class_weights: None,
            class_weights_host: None,
            grad_output: None,
            row_path: RowPath::Auto,
        }
    }
}

/// Outputs and device workspace of the loss kernels. Allocate once per batch shape and reuse: the launch
/// functions allocate nothing, so they are CUDA-graph safe.
pub struct LossOutputs<B: Backend = Gpu> {
    /// Per-row loss `[N]` (0 for ignored rows, NaN for rows with an invalid target).
    pub rows: B::Buffer<f32>,
    /// Per-row log-sum-exp of the softcapped logits `[N]` (0 for ignored rows).
    pub lse: B::Buffer<f32>,
    /// The reduced loss `[1]`: written for `Reduction::Mean` and `Reduction::Sum`.
    pub loss: B::Buffer<f32>,
    /// Per-row gradient coefficients `[N, 4]` (vocabulary-shard path only).
    pub coeffs: B::Buffer<f32>,
    pub(crate) denominator: B::Buffer<f32>,
    pub(crate) status: B::Buffer<u64>,
    n_rows: usize,
}

impl<B: Backend> LossOutputs<B> {
    /// Allocates outputs for `n_rows` rows on the device.
    ///
    /// ```
    /// let dev = fusekit::emu::Emulator::new().unwrap(); // or fusekit::Gpu::new(0)
    /// let out = fusekit::loss::LossOutputs::new(&dev, 4096).unwrap();
    /// ```
    pub fn new(dev: &B, n_rows: usize) -> Result<Self> {
        let coeffs = n_rows
            .checked_mul(4)
            .ok_or_else(|| Error::shape("n_rows", "n_rows * 4 below 2^64", format!("{n_rows}")))?;
        Ok(LossOutputs {
            rows: dev.alloc_zeros(n_rows.max(1))?,
            lse: dev.alloc_zeros(n_rows.max(1))?,
            loss: dev.alloc_zeros(1)?,
            coeffs: dev.alloc_zeros(coeffs.max(1))?,
            denominator: dev.alloc_zeros(1)?,
            status: dev.alloc_zeros(1)?,
            n_rows,
        })
    }

    /// Rows these outputs hold.
    ///
    /// ```
    /// # let dev = fusekit::emu::Emulator::new().unwrap();
    /// assert_eq!(fusekit::loss::LossOutputs::new(&dev, 8).unwrap().n_rows(), 8);
    /// ```
    pub fn n_rows(&self) -> usize {
        self.n_rows
    }

    /// Waits for the device and returns the reduced loss.
    ///
    /// ```
    /// # let dev = fusekit::emu::Emulator::new().unwrap();
    /// # let out = fusekit::loss::LossOutputs::new(&dev, 8).unwrap();
    /// let loss: f32 = out.loss_sync(&dev).unwrap();
    /// ```
    pub fn loss_sync(&self, dev: &B) -> Result<f32> {
        Ok(dev.download(&self.loss)?[0])
    }

    /// Waits for the device; `Err(OutOfRange)` naming the first row whose target was outside `[0, V)`
    /// (and not `ignore_index`) in the last launch that used these outputs.
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// use fusekit::Backend;
    /// let dev = fusekit::emu::Emulator::new()?;
    /// let logits = dev.upload(&[0.0f32; 8])?;
    /// let targets = dev.upload(&[1i32, 9])?; // 9 >= V = 4
    /// let mut grad = dev.alloc_zeros::<f32>(8)?;
    /// let mut out = fusekit::loss::LossOutputs::new(&dev, 2)?;
    /// let rows = fusekit::loss::Rows::contiguous(2, 4);
    /// let cfg = fusekit::loss::LossConfig::default();
    /// fusekit::loss::fwd_bwd(&dev, rows, &logits, &targets, &mut grad, &Default::default(), &cfg, &mut out)?;
    /// let err = out.check_targets_sync(&dev, &targets, rows.vocab, cfg.ignore_index).unwrap_err();
    /// assert_eq!(err.to_string(), "targets[1] = 9 is outside [0, 4) (or ignore_index -100)");
    /// # Ok(()) }
    /// ```
    pub fn check_targets_sync<I: TargetIndex, S: DeviceRead<I, B>>(
        &self,
        dev: &B,
        targets: &S,
        vocab: usize,
        ignore_index: i64,
    ) -> Result<()> {
        let st = dev.download(&self.status)?;
        if st[0] == 0 {
            return Ok(());
        }
        // The status word only says that some row was bad (a chunk of fused linear + CE, or a call with
        // fewer rows than these outputs, numbers its rows its own way): find the first on the host.
        let all = dev.download(targets)?;
        let allowed = format!("[0, {vocab}) (or ignore_index {ignore_index})");
        let bad = all.iter().enumerate().find(|(_, t)| {
            let t = t.to_i64();
            t != ignore_index && !(0..vocab as i64).contains(&t)
        });
        Err(match bad {
            Some((index, t)) => Error::OutOfRange {
                arg: "targets",
                index,
                value: t.to_i64(),
                allowed,
            },
            None => Error::invalid(
                "targets",
                format!(
                    "the last launch found a target outside {allowed}, but these targets hold none \
                     (pass the same targets and vocab as that launch)"
                ),
            ),
        })
    }
}

use crate::validate::{at_least as check_len, owned as check_ctx};

impl<B: Backend> LossExtras<'_, B> {
    /// `Err(Layout)` unless every buffer here belongs to `dev`.
    pub(crate) fn check_owner(&self, dev: &B) -> Result<()> {
        if let Some(w) = self.class_weights {
            check_ctx(dev, "class_weights", w)?;
        }
        if let Some(g) = &self.grad_output {
            check_ctx(dev, "grad_output", g)?;
        }
        Ok(())
    }

    /// The lengths of a call with these extras, for its plan.
    pub(crate) fn args(
        &self,
        logits: usize,
        grad: GradBuffer,
        targets: usize,
        out_rows: usize,
    ) -> FusedArgs<'_> {
        FusedArgs {
            logits,
            grad,
            targets,
            class_weights: self.class_weights.map(|w| w.len()),
            class_weights_host: self.class_weights_host,
            grad_output: self.grad_output.as_ref().map(|g| g.len()),
            row_path: self.row_path,
            out_rows,
        }
    }
}

impl<B: Backend> LossOutputs<B> {
    /// `Err(Layout)` unless these outputs were allocated on `dev`.
    pub(crate) fn check_owner(&self, dev: &B) -> Result<()> {
        check_ctx(dev, "out", &self.rows)
    }
}

/// The device checks of a fused call (every buffer on `dev`), then its plan.
#[allow(clippy::too_many_arguments)]
fn plan_call<B: Backend, T: LossElement, I: TargetIndex, S: DeviceRead<I, B>>(
    dev: &B,
    rows: Rows,
    logits_len: usize,
    grad: GradBuffer,
    targets: &S,
    extras: &LossExtras<'_, B>,
    cfg: &LossConfig,
    out: &LossOutputs<B>,
) -> Result<FusedPlan> {
    check_ctx(dev, "targets", targets)?;
    extras.check_owner(dev)?;
    out.check_owner(dev)?;
    let args = extras.args(logits_len, grad, targets.len(), out.n_rows);
    FusedPlan::new::<T, I>(dev.props(), rows, &args, cfg)
}

/// Fused forward + backward: per-row loss and lse into `out`, the reduced loss into `out.loss` (mean/sum),
/// and the gradient of the (reduced, upstream-scaled) loss into `grad`, in one pass over the logits.
/// Queued on the device's stream; nothing is synchronised.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::loss::{fwd_bwd, LossConfig, LossOutputs, Rows};
/// let dev = fusekit::emu::Emulator::new()?; // or fusekit::Gpu::new(0)?
/// let (n, v) = (2, 3);
/// let logits = dev.upload(&[1.0f32, 2.0, 3.0, 1.0, 1.0, 1.0])?;
/// let targets = dev.upload(&[2i64, 0])?;
/// let mut grad = dev.alloc_zeros::<f32>(n * v)?;
/// let mut out = LossOutputs::new(&dev, n)?;
/// fwd_bwd(&dev, Rows::contiguous(n, v), &logits, &targets, &mut grad, &Default::default(), &LossConfig::default(), &mut out)?;
/// println!("loss = {}", out.loss_sync(&dev)?);
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn fwd_bwd<B, T, I, L, S, G>(
    dev: &B,
    rows: Rows,
    logits: &L,
    targets: &S,
    grad: &mut G,
    extras: &LossExtras<'_, B>,
    cfg: &LossConfig,
    out: &mut LossOutputs<B>,
) -> Result<()>
where
    B: Backend,
    T: LossElement,
    I: TargetIndex,
    L: DeviceRead<T, B>,
    S: DeviceRead<I, B>,
    G: DeviceWrite<T, B>,
{
    check_ctx(dev, "logits", logits)?;
    check_ctx(dev, "grad", grad)?;
    let plan = plan_call::<B, T, I, S>(
        dev,
        rows,
        logits.len(),
        GradBuffer::Separate(grad.len()),
        targets,
        extras,
        cfg,
        out,
    )?;
    let (l_len, g_len) = (logits.len() as u64, grad.len() as u64);
    let (lp, _lg) = logits.addr(dev);
    let (gp, _lg2) = grad.addr_mut(dev);
    // Byte sizes of live buffers cannot overflow.
    let size = std::mem::size_of::<T>() as u64;
    let (l_end, g_end) = (lp + l_len * size, gp + g_len * size);
    if lp < g_end && gp < l_end {
        return Err(Error::layout(
            "grad",
            "overlaps logits; use fwd_bwd_inplace to overwrite the logits",
        ));
    }
    launch::fused::<B, I, S>(dev, &plan, lp, gp, targets, extras, out)
}

/// [`fwd_bwd`] writing the gradient over the logits (`grad_stride` is taken equal to `row_stride`): no
/// second `[N, V]` buffer.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::loss::{fwd_bwd_inplace, LossConfig, LossOutputs, Rows};
/// let dev = fusekit::emu::Emulator::new()?;
/// let mut logits = dev.upload(&[half::bf16::ONE; 6])?;
/// let targets = dev.upload(&[2i32, 0])?;
/// let mut out = LossOutputs::new(&dev, 2)?;
/// fwd_bwd_inplace(&dev, Rows::contiguous(2, 3), &mut logits, &targets, &Default::default(), &LossConfig::default(), &mut out)?;
/// # Ok(()) }
/// ```
pub fn fwd_bwd_inplace<B, T, I, L, S>(
    dev: &B,
    rows: Rows,
    logits: &mut L,
    targets: &S,
    extras: &LossExtras<'_, B>,
    cfg: &LossConfig,
    out: &mut LossOutputs<B>,
) -> Result<()>
where
    B: Backend,
    T: LossElement,
    I: TargetIndex,
    L: DeviceWrite<T, B>,
    S: DeviceRead<I, B>,
{
    check_ctx(dev, "logits", logits)?;
    let plan = plan_call::<B, T, I, S>(
        dev,
        rows,
        logits.len(),
        GradBuffer::InPlace,
        targets,
        extras,
        cfg,
        out,
    )?;
    let (lp, _lg) = logits.addr_mut(dev);
    launch::fused::<B, I, S>(dev, &plan, lp, lp, targets, extras, out)
}

/// Forward only: per-row loss and lse, and the reduced loss; no gradient (one read of the logits).
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::loss::{forward, LossConfig, LossOutputs, Rows};
/// let dev = fusekit::emu::Emulator::new()?;
/// let logits = dev.upload(&[0.5f32; 6])?;
/// let targets = dev.upload(&[2i32, 0])?;
/// let mut out = LossOutputs::new(&dev, 2)?;
/// forward(&dev, Rows::contiguous(2, 3), &logits, &targets, &Default::default(), &LossConfig::default(), &mut out)?;
/// assert!((out.loss_sync(&dev)? - 3f32.ln()).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub fn forward<B, T, I, L, S>(
    dev: &B,
    rows: Rows,
    logits: &L,
    targets: &S,
    extras: &LossExtras<'_, B>,
    cfg: &LossConfig,
    out: &mut LossOutputs<B>,
) -> Result<()>
where
    B: Backend,
    T: LossElement,
    I: TargetIndex,
    L: DeviceRead<T, B>,
    S: DeviceRead<I, B>,
{
    check_ctx(dev, "logits", logits)?;
    let plan = plan_call::<B, T, I, S>(
        dev,
        rows,
        logits.len(),
        GradBuffer::None,
        targets,
        extras,
        cfg,
        out,
    )?;
    let (lp, _lg) = logits.addr(dev);
    launch::fused::<B, I, S>(dev, &plan, lp, 0, targets, extras, out)
}

mod shard;
pub use shard::{shard_backward, shard_combine, shard_stats, ShardSpec, SHARD_STAT_WIDTH};

mod linear_ce;
pub use linear_ce::{linear_ce_reference, Chunking, LinearCeLens, LinearCrossEntropy};

mod sigmoid;
pub use sigmoid::{sigmoid_focal_fwd_bwd, SigmoidFocalConfig, SigmoidFocalOutputs};

pub(crate) mod check;
#[doc(hidden)] // test harness (crate docs)
pub mod verify;

impl<B: Backend> std::fmt::Debug for LossOutputs<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LossOutputs")
            .field("n_rows", &self.n_rows)
            .finish()
    }
}

impl<B: Backend> std::fmt::Debug for LossExtras<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LossExtras")
            .field("class_weights", &self.class_weights.map(|w| w.len()))
            .field(
                "class_weights_host",
                &self.class_weights_host.map(|w| w.len()),
            )
            .field("grad_output", &self.grad_output.as_ref().map(|g| g.len()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_arg(r: Result<fk_loss_config>) -> &'static str {
        match r {
            Err(Error::InvalidArgument { arg, .. }) => arg,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn config_scalars_are_validated_with_named_arguments() {
        let ok = LossConfig::default();
        assert!(ok.to_params(10, None, false).is_ok());
        let bad = |c: LossConfig| err_arg(c.to_params(10, None, false));
        assert_eq!(
            bad(LossConfig {
                kind: LossKind::Focal { gamma: -0.1 },
                ..ok
            }),
            "gamma"
        );
        assert_eq!(
            bad(LossConfig {
                kind: LossKind::Poly1Focal {
                    gamma: 1.0,
                    epsilon: f32::INFINITY
                },
                ..ok
            }),
            "epsilon"
        );
        assert_eq!(
            bad(LossConfig {
                kind: LossKind::Gce { q: -1.0 },
                ..ok
            }),
            "q"
        );
        assert_eq!(
            bad(LossConfig {
                kind: LossKind::Gce { q: f32::NAN },
                ..ok
            }),
            "q"
        );
        assert_eq!(
            bad(LossConfig {
                z_loss: f32::NAN,
                ..ok
            }),
            "z_loss"
        );
        assert_eq!(
            bad(LossConfig {
                softcap: Some(-3.0),
                ..ok
            }),
            "softcap"
        );
        assert_eq!(
            bad(LossConfig {
                label_smoothing: LabelSmoothing::Megatron(-0.1),
                ..ok
            }),
            "label_smoothing"
        );
        assert_eq!(
            bad(LossConfig {
                kind: LossKind::Gce { q: 0.5 },
                label_smoothing: LabelSmoothing::PyTorch(0.1),
                ..ok
            }),
            "label_smoothing"
        );
    }

    #[test]
    fn config_maps_to_kernel_parameters() {
        let c = LossConfig {
            label_smoothing: LabelSmoothing::Megatron(0.1),
            softcap: Some(30.0),
            ..LossConfig::default()
        };
        let p = c.to_params(11, None, false).unwrap();
        assert!((p.smoothing - 0.11).abs() < 1e-7);
        assert_eq!(
            (p.softcap, p.vocab, p.weight_sum, p.has_weights),
            (30.0, 11.0, 11.0, 0)
        );
        let p = LossConfig::default()
            .to_params(3, Some(&[1.0, 2.0, 0.5]), true)
            .unwrap();
        assert_eq!((p.weight_sum, p.has_weights), (3.5, 1));
    }

    #[test]
    fn rows_are_validated() {
        assert!(Rows::contiguous(2, 3).validate().is_ok());
        assert!(matches!(
            Rows::contiguous(0, 3).validate(),
            Err(Error::Shape { arg: "logits", .. })
        ));
        assert!(matches!(
            Rows::contiguous(2, 0).validate(),
            Err(Error::Shape { .. })
        ));
        let r = Rows {
            row_stride: 2,
            ..Rows::contiguous(2, 3)
        };
        assert!(matches!(
            r.validate(),
            Err(Error::Layout { arg: "logits", .. })
        ));
        let r = Rows {
            grad_stride: 2,
            ..Rows::contiguous(2, 3)
        };
        assert!(matches!(
            r.validate(),
            Err(Error::Layout { arg: "grad", .. })
        ));
        assert_eq!(
            Rows {
                row_stride: 5,
                ..Rows::contiguous(3, 3)
            }
            .extent_of("logits", 5)
            .unwrap(),
            13
        );
    }

    #[test]
    fn launch_shapes() {
        assert_eq!(launch::row_threads(1, 2), 64);
        assert_eq!(launch::row_threads(32000, 2), 512);
        assert_eq!(launch::row_threads(2000, 4), 128);
    }
}
