//! MoE routing with auxiliary-loss-free load balancing (Wang et al. 2024; DeepSeek-V3 "noaux_tc").
//!
//! * [`gate`]: router logits `[T, E]` and a selection bias `[E]` → top-k ids `[T, K]`, gate weights
//!   `[T, K]` and per-expert counts `[E]`, in one launch. Selection uses `score + bias`; the weights use
//!   the unbiased score, so the bias never reaches them (gate weights are bitwise independent of the
//!   bias for the same selection). Optional group-limited routing, renormalisation, scaling factor.
//! * [`BalanceState::update`]: `b_i += u·sign(c̄ − c_i)` (or proportional) from device counts, MaxVio of
//!   the batch and of a running window, all on the device.
//! * [`PermutePlan`], [`gather`], [`combine`]: the stable expert-major permutation for grouped GEMMs
//!   (optionally padded to a block size, with the expert of each block), the gather of hidden states and
//!   the weighted fp32 combine.
//! * [`ep_counts`]: tokens per rank and the token × rank membership an expert-parallel all-to-all needs.
//!
//! # Determinism and ties
//! Ties go to the lower expert index (and the lower group index). Everything is bitwise reproducible:
//! scores use an exp implemented with single-rounding operations only (identical on the host, which is
//! how the reference matches the kernel bit for bit), reductions have a fixed order, counts are integer.
//!
//! # Non-finite logits
//! A NaN biased score sorts below every number (as −∞): it is chosen only when nothing better is left, and
//! then its weight is NaN, so the NaN propagates instead of being hidden. A group whose score is NaN ranks
//! as −∞. With softmax scoring, a NaN logit makes the whole row's scores NaN (the normaliser is NaN), and
//! a +∞ logit gives NaN scores (∞ − ∞). With sigmoid scoring, ±∞ logits give scores 1 and 0.
//! When renormalising, a zero sum of the selected scores leaves them unnormalised (zeros), not NaN; a NaN
//! among them makes every weight of that token NaN.

mod launch;
mod plan;
pub mod reference;

pub use plan::{EpCountsPlan, GateLens, GatePlan, PermuteShape};

use half::bf16;

use crate::error::{Error, Result};
use crate::params::{FK_MOE_MAX_EXPERTS, FK_MOE_MAX_GROUPS, FK_MOE_MAX_TOPK};
use crate::testing::Element;
use crate::{Backend, DeviceRead, DeviceWrite, Gpu};

/// Router-logit element types: f32 and bf16.
pub trait RouterElement: Element + crate::dtype::sealed::Sealed {
    /// Kernel-name suffix.
    const SUFFIX: &'static str;
}
impl RouterElement for f32 {
    const SUFFIX: &'static str = "f32";
}
impl RouterElement for bf16 {
    const SUFFIX: &'static str = "bf16";
}

pub use crate::dtype::Float as HiddenElement;

/// How router logits become scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// σ(x) per expert (DeepSeek-V3).
    Sigmoid,
    /// softmax over the experts.
    Softmax,
}

/// The gate's configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GateConfig {
    /// Experts E, 1..=1024.
    pub n_experts: usize,
    /// Experts per token K, 1..=32.
    pub top_k: usize,
    /// Score function.
    pub scoring: Scoring,
    /// Expert groups (1: no group limit). E must be a multiple; at most 32.
    pub n_group: usize,
    /// Groups kept per token (group score = sum of its top-2 biased scores).
    pub topk_group: usize,
    /// Divide the selected weights by their sum.
    pub renormalize: bool,
    /// Routed scaling factor, applied last.
    pub scaling: f32,
}

impl Default for GateConfig {
    /// 64 experts, top-6, sigmoid, no groups, renormalised, scale 1 (the paper's setting).
    fn default() -> Self {
        GateConfig {
            n_experts: 64,
            top_k: 6,
            scoring: Scoring::Sigmoid,
            n_group: 1,
            topk_group: 1,
            renormalize: true,
            scaling: 1.0,
        }
    }
}

impl GateConfig {
    /// DeepSeek-V3: 256 experts, top-8, 8 groups of which 4 kept, sigmoid, renormalised, × 2.5.
    ///
    /// ```
    /// let c = fusekit::moe::GateConfig::deepseek_v3();
    /// assert_eq!((c.n_experts, c.top_k, c.n_group, c.topk_group, c.scaling), (256, 8, 8, 4, 2.5));
    /// ```
    pub fn deepseek_v3() -> Self {
        GateConfig {
            n_experts: 256,
            top_k: 8,
            scoring: Scoring::Sigmoid,
            n_group: 8,
            topk_group: 4,
            renormalize: true,
            scaling: 2.5,
        }
    }

    /// Checks the configuration (every error names the field).
    ///
    /// ```
    /// use fusekit::moe::GateConfig;
    /// let bad = GateConfig { n_experts: 250, ..GateConfig::deepseek_v3() };
    /// assert!(bad.validate().unwrap_err().to_string().contains("n_group"));
    /// ```
    pub fn validate(&self) -> Result<()> {
        let e = self.n_experts;
        if e == 0 || e > FK_MOE_MAX_EXPERTS as usize {
            return Err(Error::invalid(
                "n_experts",
                format!("must be in 1..={FK_MOE_MAX_EXPERTS}, got {e}"),
            ));
        }
        if self.top_k == 0 || self.top_k > FK_MOE_MAX_TOPK as usize {
            return Err(Error::invalid(
                "top_k",
                format!("must be in 1..={FK_MOE_MAX_TOPK}, got {}", self.top_k),
            ));
        }
        if self.n_group == 0 || self.n_group > FK_MOE_MAX_GROUPS as usize || e % self.n_group != 0 {
            return Err(Error::invalid(
                "n_group",
                format!(
                    "must divide n_experts {e} and be in 1..={FK_MOE_MAX_GROUPS}, got {}",
                    self.n_group
                ),
            ));
        }
        if self.topk_group == 0 || self.topk_group > self.n_group {
            return Err(Error::invalid(
                "topk_group",
                format!(
                    "must be in 1..=n_group {}, got {}",
                    self.n_group, self.topk_group
                ),
            ));
        }
        let reachable = if self.n_group > 1 {
            self.topk_group * (e / self.n_group)
        } else {
            e
        };
        if self.top_k > reachable {
            return Err(Error::invalid(
                "top_k",
                format!(
                    "{} exceeds the {reachable} experts reachable in {} kept group(s)",
                    self.top_k, self.topk_group
                ),
            ));
        }
        if !self.scaling.is_finite() {
            return Err(Error::invalid(
                "scaling",
                format!("must be finite, got {}", self.scaling),
            ));
        }
        Ok(())
    }
}

use crate::validate::owned as check_ctx;

/// The fused gate: ids `[T, K]` (best first), weights `[T, K]` and counts `[E]` from router logits
/// `[T, E]` and an optional selection bias `[E]`. Counts are added to (`accumulate_counts`: over
/// micro-batches) or overwritten. One kernel launch (plus a memset of the counts when not accumulating).
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::moe::{gate, GateConfig};
/// let dev = fusekit::emu::Emulator::new()?; // or fusekit::Gpu::new(0)?
/// let cfg = GateConfig::deepseek_v3();
/// let t = 16;
/// let logits = dev.alloc_zeros::<half::bf16>(t * cfg.n_experts)?;
/// let bias = dev.alloc_zeros::<f32>(cfg.n_experts)?;
/// let mut ids = dev.alloc_zeros::<i32>(t * cfg.top_k)?;
/// let mut w = dev.alloc_zeros::<f32>(t * cfg.top_k)?;
/// let mut counts = dev.alloc_zeros::<i32>(cfg.n_experts)?;
/// gate(&dev, &cfg, t, &logits, Some(&bias), &mut ids, &mut w, &mut counts, false)?;
/// assert_eq!(dev.download(&counts)?.iter().sum::<i32>(), (t * cfg.top_k) as i32);
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn gate<B, T, L, I, W, C>(
    dev: &B,
    cfg: &GateConfig,
    n_tokens: usize,
    logits: &L,
    bias: Option<&B::Buffer<f32>>,
    ids: &mut I,
    weights: &mut W,
    counts: &mut C,
    accumulate_counts: bool,
) -> Result<()>
where
    B: Backend,
    T: RouterElement,
    L: DeviceRead<T, B>,
    I: DeviceWrite<i32, B>,
    W: DeviceWrite<f32, B>,
    C: DeviceWrite<i32, B>,
{
    check_ctx(dev, "logits", logits)?;
    check_ctx(dev, "ids", ids)?;
    check_ctx(dev, "weights", weights)?;
    check_ctx(dev, "counts", counts)?;
    if let Some(b) = bias {
        check_ctx(dev, "bias", b)?;
    }
    let lens = GateLens {
        logits: logits.len(),
        bias: bias.map(|b| b.len()),
        ids: ids.len(),
        weights: weights.len(),
        counts: counts.len(),
    };
    let plan = GatePlan::new::<T>(dev.props(), cfg, n_tokens, &lens)?;
    if !accumulate_counts {
        dev.zero(counts)?;
    }
    launch::gate::<B, T, L, I, W, C>(dev, &plan, logits, bias, ids, weights, counts)
}

/// How the bias moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateRule {
    /// `b_i += u·sign(c̄ − c_i)` (the paper's rule, u = 1e-3).
    Sign,
    /// `b_i += u·(c̄ − c_i)/c̄`: proportional to the relative violation.
    Proportional,
}

/// Device state of auxiliary-loss-free balancing: the bias, the per-expert counts the gate adds to, and
/// load statistics. Everything stays on the device; read the statistics with the `_sync` methods.
pub struct BalanceState<B: Backend = Gpu> {
    /// Selection bias `[E]` (fp32), passed to [`gate`].
    pub bias: B::Buffer<f32>,
    /// Per-expert counts `[E]` of the current step, passed to [`gate`] (`accumulate_counts` over
    /// micro-batches; all-reduce across ranks before [`BalanceState::update`]).
    pub counts: B::Buffer<i32>,
    maxvio_batch: B::Buffer<f32>,
    window: Option<B::Buffer<i32>>,
    window_sum: B::Buffer<i64>,
    window_pos: B::Buffer<i32>,
    window_fill: B::Buffer<i32>,
    maxvio_window: B::Buffer<f32>,
    window_len: usize,
    n_experts: usize,
}

impl<B: Backend> BalanceState<B> {
    /// Zero bias and counts for `n_experts`; `window` > 0 keeps the last `window` steps' counts for a
    /// running MaxVio.
    ///
    /// ```
    /// # let dev = fusekit::emu::Emulator::new().unwrap();
    /// let state = fusekit::moe::BalanceState::new(&dev, 256, 100).unwrap();
    /// ```
    pub fn new(dev: &B, n_experts: usize, window: usize) -> Result<Self> {
        let wn = plan::balance_window(n_experts, window)?;
        Ok(BalanceState {
            bias: dev.alloc_zeros(n_experts)?,
            counts: dev.alloc_zeros(n_experts)?,
            maxvio_batch: dev.alloc_zeros(1)?,
            window: if window > 0 {
                Some(dev.alloc_zeros(wn)?)
            } else {
                None
            },
            window_sum: dev.alloc_zeros(n_experts)?,
            window_pos: dev.alloc_zeros(1)?,
            window_fill: dev.alloc_zeros(1)?,
            maxvio_window: dev.alloc_zeros(1)?,
            window_len: window,
            n_experts,
        })
    }

    /// Experts.
    ///
    /// ```
    /// # let dev = fusekit::emu::Emulator::new().unwrap();
    /// assert_eq!(fusekit::moe::BalanceState::new(&dev, 64, 0).unwrap().n_experts(), 64);
    /// ```
    pub fn n_experts(&self) -> usize {
        self.n_experts
    }

    /// One bias update from `counts` (then zeroed for the next step when `reset_counts`), MaxVio of the
    /// batch and of the window. One single-block kernel, no host round trip.
    ///
    /// ```
    /// # let dev = fusekit::emu::Emulator::new().unwrap();
    /// let mut st = fusekit::moe::BalanceState::new(&dev, 64, 10).unwrap();
    /// st.update(&dev, 1e-3, fusekit::moe::UpdateRule::Sign, true).unwrap();
    /// println!("MaxVio {}", st.maxvio_batch_sync(&dev).unwrap());
    /// ```
    pub fn update(
        &mut self,
        dev: &B,
        rate: f32,
        rule: UpdateRule,
        reset_counts: bool,
    ) -> Result<()> {
        plan::check_rate(rate)?;
        check_ctx(dev, "state", &self.bias)?;
        launch::bias_update(
            dev,
            self,
            rate,
            rule == UpdateRule::Proportional,
            reset_counts,
        )
    }

    /// MaxVio of the last update's batch, `(max_i c_i − c̄)/c̄`. Synchronises.
    ///
    /// ```
    /// # let dev = fusekit::emu::Emulator::new().unwrap();
    /// let st = fusekit::moe::BalanceState::new(&dev, 64, 0).unwrap();
    /// let v: f32 = st.maxvio_batch_sync(&dev).unwrap();
    /// ```
    pub fn maxvio_batch_sync(&self, dev: &B) -> Result<f32> {
        Ok(dev.download(&self.maxvio_batch)?[0])
    }

    /// MaxVio of the counts summed over the last `window` updates (None without a window). Synchronises.
    ///
    /// ```
    /// # let dev = fusekit::emu::Emulator::new().unwrap();
    /// let st = fusekit::moe::BalanceState::new(&dev, 64, 0).unwrap();
    /// assert_eq!(st.maxvio_window_sync(&dev).unwrap(), None); // no window
    /// ```
    pub fn maxvio_window_sync(&self, dev: &B) -> Result<Option<f32>> {
        if self.window.is_none() {
            return Ok(None);
        }
        Ok(Some(dev.download(&self.maxvio_window)?[0]))
    }

    /// The bias, on the host. Synchronises.
    ///
    /// ```
    /// # let dev = fusekit::emu::Emulator::new().unwrap();
    /// let st = fusekit::moe::BalanceState::new(&dev, 64, 0).unwrap();
    /// assert_eq!(st.bias_sync(&dev).unwrap(), vec![0.0; 64]);
    /// ```
    pub fn bias_sync(&self, dev: &B) -> Result<Vec<f32>> {
        dev.download(&self.bias)
    }

    /// The counts, on the host. Synchronises.
    ///
    /// ```
    /// # let dev = fusekit::emu::Emulator::new().unwrap();
    /// let st = fusekit::moe::BalanceState::new(&dev, 8, 0).unwrap();
    /// assert_eq!(st.counts_sync(&dev).unwrap(), vec![0; 8]);
    /// ```
    pub fn counts_sync(&self, dev: &B) -> Result<Vec<i32>> {
        dev.download(&self.counts)
    }
}

/// Buffers of the expert-major permutation of `T·K` slots (slot `s = t·K + k`), sized once per shape.
pub struct PermutePlan<B: Backend = Gpu> {
    /// Slot at each row of the (padded) expert-major layout, −1 for padding: `[max_rows]`.
    pub sorted_slots: B::Buffer<i32>,
    /// Row of each slot (−1 when its id was invalid): `[T·K]`.
    pub slot_row: B::Buffer<i32>,
    /// Unpadded start of each expert's rows, `[E + 1]` (the last is the number of routed slots).
    pub offsets: B::Buffer<i32>,
    /// Start of each expert's rows padded to `block_size`, `[E + 1]` (the last is the padded total).
    pub padded_offsets: B::Buffer<i32>,
    /// Expert of each block of `block_size` rows, −1 past the end: `[max_blocks]`.
    pub block_expert: B::Buffer<i32>,
    chunk_counts: B::Buffer<i32>,
    status: B::Buffer<i32>,
    pub(crate) shape: PermuteShape,
}

impl<B: Backend> PermutePlan<B> {
    /// Buffers for `n_tokens × top_k` slots over `n_experts`, padded per expert to `block_size` rows
    /// (1: no padding).
    ///
    /// ```
    /// # let dev = fusekit::emu::Emulator::new().unwrap();
    /// let plan = fusekit::moe::PermutePlan::new(&dev, 4096, 8, 256, 128).unwrap();
    /// assert_eq!(plan.max_rows(), 4096 * 8 + 256 * 127);
    /// ```
    pub fn new(
        dev: &B,
        n_tokens: usize,
        top_k: usize,
        n_experts: usize,
        block_size: usize,
    ) -> Result<Self> {
        let shape = PermuteShape::new(n_tokens, top_k, n_experts, block_size)?;
        let (max_rows, slots, n_chunks) = (shape.max_rows(), shape.slots(), shape.n_chunks());
        let a = |n: usize| dev.alloc_zeros::<i32>(n.max(1));
        Ok(PermutePlan {
            sorted_slots: a(max_rows)?,
            slot_row: a(slots)?,
            offsets: a(n_experts + 1)?,
            padded_offsets: a(n_experts + 1)?,
            block_expert: a(max_rows.div_ceil(block_size))?,
            chunk_counts: a(n_chunks * n_experts)?,
            status: a(1)?,
            shape,
        })
    }

    /// Upper bound of the rows of the permuted layout: `T·K + E·(block_size − 1)`.
    ///
    /// ```
    /// # let dev = fusekit::emu::Emulator::new().unwrap();
    /// let plan = fusekit::moe::PermutePlan::new(&dev, 10, 2, 4, 8).unwrap();
    /// assert_eq!(plan.max_rows(), 20 + 4 * 7);
    /// ```
    pub fn max_rows(&self) -> usize {
        self.shape.max_rows()
    }

    /// Tokens, experts per token, experts, block size.
    ///
    /// ```
    /// # let dev = fusekit::emu::Emulator::new().unwrap();
    /// let plan = fusekit::moe::PermutePlan::new(&dev, 10, 2, 4, 8).unwrap();
    /// assert_eq!(plan.shape(), (10, 2, 4, 8));
    /// ```
    pub fn shape(&self) -> (usize, usize, usize, usize) {
        let s = &self.shape;
        (s.n_tokens, s.top_k, s.n_experts, s.block_size)
    }

    /// Builds the plan from expert ids `[T, K]` (e.g. from [`gate`]): four small kernels, no sync.
    /// Ids outside `[0, E)` are left out of the layout (their `slot_row` is −1) and reported by
    /// [`PermutePlan::check_ids_sync`].
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// use fusekit::Backend;
    /// let dev = fusekit::emu::Emulator::new()?;
    /// let ids = dev.upload(&[1i32, 0, 1, 0])?;
    /// let mut plan = fusekit::moe::PermutePlan::new(&dev, 2, 2, 2, 1)?;
    /// plan.build(&dev, &ids)?;
    /// plan.check_ids_sync(&dev, &ids)?;
    /// assert_eq!(dev.download(&plan.sorted_slots)?, vec![1, 3, 0, 2]);
    /// # Ok(()) }
    /// ```
    pub fn build<I: DeviceRead<i32, B>>(&mut self, dev: &B, ids: &I) -> Result<()> {
        check_ctx(dev, "ids", ids)?;
        check_ctx(dev, "plan", &self.status)?;
        let launches = self.shape.build_launches(ids.len())?;
        launch::plan(dev, self, ids, &launches)
    }

    /// `Err(OutOfRange)` naming the first slot whose expert id was outside `[0, E)` in the last build.
    /// Synchronises.
    ///
    /// ```
    /// # use fusekit::Backend;
    /// # let dev = fusekit::emu::Emulator::new().unwrap();
    /// let ids = dev.upload(&[0i32, 7]).unwrap(); // 7 >= E = 4
    /// let mut plan = fusekit::moe::PermutePlan::new(&dev, 1, 2, 4, 1).unwrap();
    /// plan.build(&dev, &ids).unwrap();
    /// assert!(plan.check_ids_sync(&dev, &ids).is_err());
    /// ```
    pub fn check_ids_sync<I: DeviceRead<i32, B>>(&self, dev: &B, ids: &I) -> Result<()> {
        let st = dev.download(&self.status)?[0];
        if st == 0 {
            return Ok(());
        }
        let slot = self.shape.slots().saturating_sub(st as usize);
        let all = dev.download(ids)?;
        Err(Error::OutOfRange {
            arg: "ids",
            index: slot,
            value: all.get(slot).copied().unwrap_or(-1) as i64,
            allowed: format!("[0, {})", self.shape.n_experts),
        })
    }

    /// Rows of the permuted layout actually used (the padded total). Synchronises.
    ///
    /// ```
    /// # use fusekit::Backend;
    /// # let dev = fusekit::emu::Emulator::new().unwrap();
    /// let ids = dev.upload(&[0i32, 1, 1, 1]).unwrap();
    /// let mut plan = fusekit::moe::PermutePlan::new(&dev, 2, 2, 2, 4).unwrap();
    /// plan.build(&dev, &ids).unwrap();
    /// assert_eq!(plan.total_rows_sync(&dev).unwrap(), 8); // 1 -> 4 rows, 3 -> 4 rows
    /// ```
    pub fn total_rows_sync(&self, dev: &B) -> Result<usize> {
        let v = dev.download(&self.padded_offsets)?;
        Ok(v[self.shape.n_experts] as usize)
    }
}

/// Gathers hidden states `[T, H]` into the plan's expert-major layout `out [max_rows, H]`: row r gets
/// the hidden state of slot `sorted_slots[r]`'s token, padding rows get zeros; rows past the padded total
/// are not written. One kernel, no sync.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// let dev = fusekit::emu::Emulator::new()?;
/// # let plan = fusekit::moe::PermutePlan::new(&dev, 2, 2, 2, 1)?;
/// let hidden = dev.alloc_zeros::<half::bf16>(2 * 64)?;
/// let mut out = dev.alloc_zeros::<half::bf16>(plan.max_rows() * 64)?;
/// fusekit::moe::gather(&dev, &plan, &hidden, 64, &mut out)?;
/// # Ok(()) }
/// ```
pub fn gather<B: Backend, T: HiddenElement, Hs: DeviceRead<T, B>, O: DeviceWrite<T, B>>(
    dev: &B,
    plan: &PermutePlan<B>,
    hidden: &Hs,
    hidden_size: usize,
    out: &mut O,
) -> Result<()> {
    check_ctx(dev, "hidden", hidden)?;
    check_ctx(dev, "out", out)?;
    check_ctx(dev, "plan", &plan.status)?;
    let l = plan
        .shape
        .gather_launch::<T>(dev.props(), hidden_size, hidden.len(), out.len())?;
    launch::gather(dev, plan, &l, hidden, hidden_size, out)
}

/// Weighted combine of expert outputs `[max_rows, H]` (in the plan's layout) back to tokens:
/// `out[t] = Σ_k weights[t, k] · expert_out[slot_row[t·K + k]]`, fp32 accumulation in k order.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// let dev = fusekit::emu::Emulator::new()?;
/// # let plan = fusekit::moe::PermutePlan::new(&dev, 2, 2, 2, 1)?;
/// let expert_out = dev.alloc_zeros::<half::bf16>(plan.max_rows() * 64)?;
/// let weights = dev.alloc_zeros::<f32>(2 * 2)?;
/// let mut out = dev.alloc_zeros::<half::bf16>(2 * 64)?;
/// fusekit::moe::combine(&dev, &plan, &expert_out, &weights, 64, &mut out)?;
/// # Ok(()) }
/// ```
pub fn combine<
    B: Backend,
    T: HiddenElement,
    X: DeviceRead<T, B>,
    W: DeviceRead<f32, B>,
    O: DeviceWrite<T, B>,
>(
    dev: &B,
    plan: &PermutePlan<B>,
    expert_out: &X,
    weights: &W,
    hidden_size: usize,
    out: &mut O,
) -> Result<()> {
    check_ctx(dev, "expert_out", expert_out)?;
    check_ctx(dev, "weights", weights)?;
    check_ctx(dev, "out", out)?;
    check_ctx(dev, "plan", &plan.status)?;
    let l = plan.shape.combine_launch::<T>(
        dev.props(),
        hidden_size,
        expert_out.len(),
        weights.len(),
        out.len(),
    )?;
    launch::combine(dev, plan, &l, expert_out, weights, hidden_size, out)
}

/// Expert-parallel dispatch counts for experts split evenly over `n_ranks` (rank r owns experts
/// `[r·E/R, (r+1)·E/R)`): `membership [T, R]` (1 if token t has an expert on rank r) and
/// `tokens_per_rank [R]` (distinct tokens each rank receives; overwritten). Ids outside `[0, E)` are
/// skipped (the plan reports them).
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// let dev = fusekit::emu::Emulator::new()?;
/// let ids = dev.upload(&[0i32, 3, 1, 0])?; // T = 2, K = 2, E = 4
/// let mut m = dev.alloc_zeros::<u8>(2 * 2)?;
/// let mut tpr = dev.alloc_zeros::<i32>(2)?;
/// fusekit::moe::ep_counts(&dev, &ids, 2, 2, 4, 2, &mut m, &mut tpr)?;
/// assert_eq!(dev.download(&tpr)?, vec![2, 1]);
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn ep_counts<
    B: Backend,
    I: DeviceRead<i32, B>,
    M: DeviceWrite<u8, B>,
    R: DeviceWrite<i32, B>,
>(
    dev: &B,
    ids: &I,
    n_tokens: usize,
    top_k: usize,
    n_experts: usize,
    n_ranks: usize,
    membership: &mut M,
    tokens_per_rank: &mut R,
) -> Result<()> {
    check_ctx(dev, "ids", ids)?;
    check_ctx(dev, "membership", membership)?;
    check_ctx(dev, "tokens_per_rank", tokens_per_rank)?;
    let plan = EpCountsPlan::new(
        dev.props(),
        n_tokens,
        top_k,
        n_experts,
        n_ranks,
        ids.len(),
        membership.len(),
        tokens_per_rank.len(),
    )?;
    dev.zero(tokens_per_rank)?;
    launch::ep_counts(dev, &plan, ids, membership, tokens_per_rank)
}

#[doc(hidden)] // test harness (crate docs)
pub mod check;
pub mod simulate;

impl<B: Backend> std::fmt::Debug for PermutePlan<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PermutePlan")
            .field("shape", &self.shape)
            .field("max_rows", &self.max_rows())
            .finish()
    }
}

impl<B: Backend> std::fmt::Debug for BalanceState<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalanceState")
            .field("n_experts", &self.n_experts)
            .field("window", &self.window_len)
            .finish()
    }
}
