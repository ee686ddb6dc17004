//! Pure plans of the MoE family's entry points: every check on shapes, lengths and configuration, and
//! the launch geometry, from lengths and [`DeviceProps`] alone (see [`crate::plan`]). The entry points
//! check their buffers' devices, build a plan from the buffers' lengths, and launch it.

use super::launch::experts_per_lane;
use super::{GateConfig, HiddenElement, RouterElement};
use crate::error::{Error, Result};
use crate::launch::grid;
use crate::params::*;
use crate::plan::{fits_i32, mul, PlannedLaunch};
use crate::validate::exactly;
use crate::DeviceProps;

/// Lengths of the buffers of one [`gate`](super::gate) call, for its plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateLens {
    /// Elements of the router logits.
    pub logits: usize,
    /// Elements of the selection bias, if one is passed.
    pub bias: Option<usize>,
    /// Elements of the ids output.
    pub ids: usize,
    /// Elements of the weights output.
    pub weights: usize,
    /// Elements of the counts.
    pub counts: usize,
}

impl GateLens {
    /// The exact lengths a call over `n_tokens` tokens with `cfg` needs (with a bias); saturating, so an
    /// overflowing shape still reaches the plan and its error.
    ///
    /// ```
    /// let cfg = fusekit::moe::GateConfig::deepseek_v3();
    /// let lens = fusekit::moe::GateLens::dense(&cfg, 16);
    /// assert_eq!((lens.logits, lens.ids), (16 * 256, 16 * 8));
    /// ```
    pub fn dense(cfg: &GateConfig, n_tokens: usize) -> Self {
        GateLens {
            logits: n_tokens.saturating_mul(cfg.n_experts),
            bias: Some(cfg.n_experts),
            ids: n_tokens.saturating_mul(cfg.top_k),
            weights: n_tokens.saturating_mul(cfg.top_k),
            counts: cfg.n_experts,
        }
    }
}

/// The validated plan of one [`gate`](super::gate) call.
///
/// ```
/// use fusekit::moe::{GateConfig, GateLens, GatePlan};
/// let cfg = GateConfig::deepseek_v3();
/// let h100 = fusekit::DeviceProps::example_h100();
/// let plan = GatePlan::new::<half::bf16>(&h100, &cfg, 4096, &GateLens::dense(&cfg, 4096))?;
/// assert_eq!(plan.launches()[0].kernel, "fk_moe_gate_bf16_e8");
/// let short = GateLens { counts: 255, ..GateLens::dense(&cfg, 4096) };
/// assert!(GatePlan::new::<half::bf16>(&h100, &cfg, 4096, &short).is_err());
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct GatePlan {
    pub(crate) cfg: GateConfig,
    pub(crate) n_tokens: usize,
    launch: PlannedLaunch,
}

impl GatePlan {
    /// Validates a gate call over `n_tokens` tokens with router logits of type `T`.
    pub fn new<T: RouterElement>(
        props: &DeviceProps,
        cfg: &GateConfig,
        n_tokens: usize,
        lens: &GateLens,
    ) -> Result<Self> {
        cfg.validate()?;
        if n_tokens == 0 {
            return Err(Error::shape(
                "logits",
                "at least one token",
                "an empty batch (0 tokens)",
            ));
        }
        let (e, k) = (cfg.n_experts, cfg.top_k);
        exactly(
            "logits",
            lens.logits,
            mul("logits", n_tokens, e, "T * E")?,
            "[T, E]",
        )?;
        let tk = mul("ids", n_tokens, k, "T * K")?;
        exactly("ids", lens.ids, tk, "[T, K]")?;
        exactly("weights", lens.weights, tk, "[T, K]")?;
        exactly("counts", lens.counts, e, "[E]")?;
        if let Some(b) = lens.bias {
            exactly("bias", b, e, "[E]")?;
        }
        // Counts are 32-bit: at most T·K per expert.
        fits_i32("ids", tk, "T * K (the per-expert counts are 32-bit)")?;
        let warps = FK_MOE_GATE_WARPS as usize;
        let blocks = n_tokens
            .div_ceil(warps)
            .min(props.sm_count as usize * 8)
            .max(1);
        Ok(GatePlan {
            cfg: *cfg,
            n_tokens,
            launch: PlannedLaunch::new(
                format!("fk_moe_gate_{}_e{}", T::SUFFIX, experts_per_lane(e)),
                grid(blocks, FK_MOE_GATE_WARPS * 32),
            ),
        })
    }

    /// The one launch (plus a memset of the counts when not accumulating).
    pub fn launches(&self) -> Vec<PlannedLaunch> {
        vec![self.launch.clone()]
    }
}

/// `Err(InvalidArgument)` unless `n_experts` is in `1..=FK_MOE_MAX_EXPERTS`.
pub(crate) fn check_experts(n_experts: usize) -> Result<()> {
    if n_experts == 0 || n_experts > FK_MOE_MAX_EXPERTS as usize {
        return Err(Error::invalid(
            "n_experts",
            format!("must be in 1..={FK_MOE_MAX_EXPERTS}, got {n_experts}"),
        ));
    }
    Ok(())
}

/// `window · n_experts`, the length of a balance state's window, checked (it must fit 32 bits).
pub(crate) fn balance_window(n_experts: usize, window: usize) -> Result<usize> {
    check_experts(n_experts)?;
    window
        .checked_mul(n_experts)
        .filter(|&w| w <= i32::MAX as usize)
        .ok_or_else(|| {
            Error::invalid(
                "window",
                format!("{window} steps x {n_experts} experts is too large"),
            )
        })
}

/// `Err(InvalidArgument)` unless the bias-update rate is finite and ≥ 0.
pub(crate) fn check_rate(rate: f32) -> Result<()> {
    if !rate.is_finite() || rate < 0.0 {
        return Err(Error::invalid(
            "rate",
            format!("must be finite and >= 0, got {rate}"),
        ));
    }
    Ok(())
}

/// The validated shape of an expert-major permutation: what [`PermutePlan`](super::PermutePlan) sizes
/// its buffers and its kernels' grids from, and the checks of [`gather`](super::gather) and
/// [`combine`](super::combine).
///
/// ```
/// let s = fusekit::moe::PermuteShape::new(4096, 8, 256, 128)?;
/// assert_eq!(s.max_rows(), 4096 * 8 + 256 * 127);
/// assert!(fusekit::moe::PermuteShape::new(1 << 30, 8, 256, 1).is_err()); // rows beyond 2^31
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PermuteShape {
    pub(crate) n_tokens: usize,
    pub(crate) top_k: usize,
    pub(crate) n_experts: usize,
    pub(crate) block_size: usize,
    max_rows: usize,
}

impl PermuteShape {
    /// `n_tokens × top_k` slots over `n_experts`, padded per expert to `block_size` rows (1: none).
    pub fn new(n_tokens: usize, top_k: usize, n_experts: usize, block_size: usize) -> Result<Self> {
        if n_tokens == 0 {
            return Err(Error::shape("ids", "at least one token", "0 tokens"));
        }
        if top_k == 0 || top_k > FK_MOE_MAX_TOPK as usize {
            return Err(Error::invalid(
                "top_k",
                format!("must be in 1..={FK_MOE_MAX_TOPK}, got {top_k}"),
            ));
        }
        check_experts(n_experts)?;
        if block_size == 0 {
            return Err(Error::invalid("block_size", "must be >= 1 (1: no padding)"));
        }
        // Every count must fit the kernels' 32-bit rows.
        let max_rows = n_tokens
            .checked_mul(top_k)
            .and_then(|s| s.checked_add(n_experts.checked_mul(block_size - 1)?))
            .filter(|&r| r <= i32::MAX as usize)
            .ok_or_else(|| Error::Unsupported {
                what: format!(
                    "{n_tokens} tokens x top-{top_k} + {n_experts} experts x (block {block_size} - 1) \
                     permuted rows exceed 2^31 - 1"
                ),
            })?;
        Ok(PermuteShape {
            n_tokens,
            top_k,
            n_experts,
            block_size,
            max_rows,
        })
    }

    /// Upper bound of the permuted rows: `T·K + E·(block_size − 1)`.
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// Slots `T·K` (below 2^31 by construction).
    pub fn slots(&self) -> usize {
        self.n_tokens * self.top_k
    }

    /// Chunks of the plan kernels.
    pub(crate) fn n_chunks(&self) -> usize {
        self.slots().div_ceil(FK_MOE_PLAN_CHUNK as usize)
    }

    /// The four launches of a build from `ids` of `ids` elements.
    ///
    /// ```
    /// let s = fusekit::moe::PermuteShape::new(16, 2, 8, 1)?;
    /// let names: Vec<_> = s.build_launches(32)?.into_iter().map(|l| l.kernel).collect();
    /// assert_eq!(names, ["fk_moe_plan_count", "fk_moe_plan_scan_chunks", "fk_moe_plan_scan", "fk_moe_plan_scatter"]);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn build_launches(&self, ids: usize) -> Result<Vec<PlannedLaunch>> {
        exactly("ids", ids, self.slots(), "[T, K] of the plan")?;
        let nc = self.n_chunks();
        Ok(vec![
            PlannedLaunch::new("fk_moe_plan_count".into(), grid(nc, 256)),
            PlannedLaunch::new(
                "fk_moe_plan_scan_chunks".into(),
                grid(self.n_experts.div_ceil(32), 1024),
            ),
            PlannedLaunch::new("fk_moe_plan_scan".into(), grid(1, 1024)),
            PlannedLaunch::new("fk_moe_plan_scatter".into(), grid(nc, 32)),
        ])
    }

    /// The launch of a [`gather`](super::gather) of `hidden` elements into `out` elements, rows of
    /// `hidden_size`, element type `T`.
    pub fn gather_launch<T: HiddenElement>(
        &self,
        props: &DeviceProps,
        hidden_size: usize,
        hidden: usize,
        out: usize,
    ) -> Result<PlannedLaunch> {
        if hidden_size == 0 {
            return Err(Error::shape("hidden", "hidden_size >= 1", "0"));
        }
        let (th, rh) = self.row_extents("hidden", "out", hidden_size)?;
        exactly("hidden", hidden, th, "[T, H]")?;
        exactly("out", out, rh, "[max_rows, H]")?;
        Ok(PlannedLaunch::new(
            format!("fk_moe_gather_{}", T::SUFFIX),
            grid(row_blocks(props, self.max_rows), FK_MOE_ROW_THREADS),
        ))
    }

    /// The launch of a [`combine`](super::combine) of `expert_out` elements with `weights` into `out`.
    pub fn combine_launch<T: HiddenElement>(
        &self,
        props: &DeviceProps,
        hidden_size: usize,
        expert_out: usize,
        weights: usize,
        out: usize,
    ) -> Result<PlannedLaunch> {
        if hidden_size == 0 {
            return Err(Error::shape("expert_out", "hidden_size >= 1", "0"));
        }
        let (th, rh) = self.row_extents("out", "expert_out", hidden_size)?;
        exactly("expert_out", expert_out, rh, "[max_rows, H]")?;
        exactly("weights", weights, self.slots(), "[T, K]")?;
        exactly("out", out, th, "[T, H]")?;
        Ok(PlannedLaunch::new(
            format!("fk_moe_combine_{}", T::SUFFIX),
            grid(row_blocks(props, self.n_tokens), FK_MOE_ROW_THREADS),
        ))
    }

    /// `(T·H, max_rows·H)`, checked, the errors naming the token-major and the expert-major argument.
    fn row_extents(
        &self,
        tokens_arg: &'static str,
        rows_arg: &'static str,
        h: usize,
    ) -> Result<(usize, usize)> {
        Ok((
            mul(tokens_arg, self.n_tokens, h, "T * H")?,
            mul(rows_arg, self.max_rows, h, "max_rows * H")?,
        ))
    }
}

fn row_blocks(props: &DeviceProps, rows: usize) -> usize {
    rows.min(props.sm_count as usize * 16)
}

/// The validated plan of [`ep_counts`](super::ep_counts).
///
/// ```
/// let p = fusekit::moe::EpCountsPlan::new(&fusekit::DeviceProps::example_h100(), 2, 2, 4, 2, 4, 4, 2)?;
/// assert_eq!(p.experts_per_rank(), 2);
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct EpCountsPlan {
    pub(crate) n_tokens: usize,
    pub(crate) top_k: usize,
    pub(crate) n_ranks: usize,
    experts_per_rank: usize,
    launch: PlannedLaunch,
}

impl EpCountsPlan {
    /// Validates a call for `n_tokens × top_k` ids over `n_experts` split over `n_ranks`, with buffers of
    /// `ids`, `membership` and `tokens_per_rank` elements.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        props: &DeviceProps,
        n_tokens: usize,
        top_k: usize,
        n_experts: usize,
        n_ranks: usize,
        ids: usize,
        membership: usize,
        tokens_per_rank: usize,
    ) -> Result<Self> {
        if n_ranks == 0
            || n_experts == 0
            || n_experts % n_ranks != 0
            || n_experts > FK_MOE_MAX_EXPERTS as usize
        {
            return Err(Error::invalid(
                "n_ranks",
                format!(
                    "must divide n_experts {n_experts} (<= {FK_MOE_MAX_EXPERTS}), got {n_ranks}"
                ),
            ));
        }
        if n_tokens == 0 || top_k == 0 {
            return Err(Error::shape(
                "ids",
                "at least one token and top_k >= 1",
                format!("T = {n_tokens}, K = {top_k}"),
            ));
        }
        exactly("ids", ids, mul("ids", n_tokens, top_k, "T * K")?, "[T, K]")?;
        exactly(
            "membership",
            membership,
            mul("membership", n_tokens, n_ranks, "T * R")?,
            "[T, R]",
        )?;
        exactly("tokens_per_rank", tokens_per_rank, n_ranks, "[R]")?;
        fits_i32("ids", n_tokens, "tokens (the per-rank counts are 32-bit)")?;
        Ok(EpCountsPlan {
            n_tokens,
            top_k,
            n_ranks,
            experts_per_rank: n_experts / n_ranks,
            launch: PlannedLaunch::new(
                "fk_moe_ep_counts".into(),
                grid(
                    n_tokens
                        .div_ceil(256)
                        .min(props.sm_count as usize * 8)
                        .max(1),
                    256,
                ),
            ),
        })
    }

    /// Experts each rank owns.
    pub fn experts_per_rank(&self) -> usize {
        self.experts_per_rank
    }

    /// The one launch (plus a memset of `tokens_per_rank`).
    pub fn launches(&self) -> Vec<PlannedLaunch> {
        vec![self.launch.clone()]
    }
}
