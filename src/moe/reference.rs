//! CPU reference of the MoE routing family. The gate emulates the kernel's fp32 arithmetic exactly (same
//! portable exp, same operation order, same reduction tree), so ids, counts and weights match bit for bit;
//! the rest is plain integer or f64 code.
//!
//! # Errors
//! No function here panics on any input. Those that can fail return [`crate::Result`]: a size argument
//! outside its domain (zero tokens, zero experts, a block size of 0...) is [`Error::InvalidArgument`] and a
//! gate configuration is checked by [`GateConfig::validate`], both naming the argument or field; a slice
//! whose length disagrees with the sizes is [`Error::Shape`] naming the slice; a value inside a slice
//! that would index out of bounds is [`Error::OutOfRange`] with its position and value. Results for valid
//! input are unchanged (bit for bit).

use super::{GateConfig, Scoring};
use crate::error::{Error, Result};
use crate::params::FK_MOE_MAX_EXPERTS;
use crate::validate::exactly;

/// `Err(InvalidArgument)` naming `arg` when the size `v` is 0.
fn nonzero(arg: &'static str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(Error::invalid(arg, "must be >= 1, got 0"));
    }
    Ok(())
}

/// `Err(InvalidArgument)` naming `arg` unless `1 <= v <= i32::MAX`: token counts the reference keeps in
/// i32 (the kernels' counts).
pub(super) fn check_tokens(arg: &'static str, v: usize) -> Result<()> {
    if v == 0 || v > i32::MAX as usize {
        return Err(Error::invalid(
            arg,
            format!("must be in 1..={} (i32 counts), got {v}", i32::MAX),
        ));
    }
    Ok(())
}

/// `Err(InvalidArgument)` naming `arg` unless `1 <= n <= FK_MOE_MAX_EXPERTS` (1024), the kernels' range.
fn check_experts(arg: &'static str, n: usize) -> Result<()> {
    if n == 0 || n > FK_MOE_MAX_EXPERTS as usize {
        return Err(Error::invalid(
            arg,
            format!("must be in 1..={FK_MOE_MAX_EXPERTS}, got {n}"),
        ));
    }
    Ok(())
}

/// The rows of `[rows, width]` in the `len` elements of `arg` (`width` >= 1, named `width_name`), or
/// `Err(Shape)` naming `arg` when there are none or `len` is not a whole number of rows.
pub(super) fn rows_of(
    arg: &'static str,
    len: usize,
    width: usize,
    width_name: &str,
) -> Result<usize> {
    if len == 0 || len % width != 0 {
        return Err(Error::shape(
            arg,
            format!("[T, {width_name}] with T >= 1: a non-zero multiple of {width_name} = {width} elements"),
            format!("{len} elements"),
        ));
    }
    Ok(len / width)
}

/// `a · b`, the length `arg` must have (`what` describes it), or `Err(Shape)` naming `arg` on overflow.
fn len_product(arg: &'static str, a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| {
        Error::shape(
            arg,
            format!("{what} with fewer than 2^64 elements"),
            format!("{a} x {b}, which overflows"),
        )
    })
}

/// An empty vector with room for `n` elements, or `Err(InvalidArgument)` naming `arg` (the size argument
/// that asked for them) when the host cannot allocate them: no abort on a huge size product.
pub(super) fn try_with_capacity<T>(n: usize, arg: &'static str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|e| {
        Error::invalid(
            arg,
            format!(
                "{n} elements of {} bytes cannot be allocated on the host: {e}",
                std::mem::size_of::<T>()
            ),
        )
    })?;
    Ok(v)
}

fn key(v: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else {
        v
    }
}

fn better(va: f32, ia: usize, vb: f32, ib: usize) -> bool {
    va > vb || (va == vb && ia < ib)
}

/// Butterfly (xor-shuffle) all-reduce over 32 lane values, as a warp does it.
fn butterfly(mut v: [f32; 32], op: impl Fn(f32, f32) -> f32) -> f32 {
    for o in [16, 8, 4, 2, 1] {
        let prev = v;
        for l in 0..32 {
            v[l] = op(prev[l], prev[l ^ o]);
        }
    }
    v[0]
}

/// Unbiased scores of one token, exactly as the kernel computes them. Total: no input makes it fail (one
/// score per logit, none for none; non-finite logits as the module documentation says).
///
/// ```
/// use fusekit::moe::{reference::scores, GateConfig, Scoring};
/// let s = scores(&[0.0, 1.0], Scoring::Sigmoid);
/// assert_eq!(s[0], 0.5);
/// let p = scores(&[0.0, 0.0], Scoring::Softmax);
/// assert_eq!(p, vec![0.5, 0.5]);
/// assert!(scores(&[], Scoring::Softmax).is_empty());
/// ```
pub fn scores(logits: &[f32], scoring: Scoring) -> Vec<f32> {
    let e = logits.len();
    match scoring {
        Scoring::Sigmoid => logits
            .iter()
            .map(|&x| crate::host_math::moe_sigmoid(x))
            .collect(),
        Scoring::Softmax => {
            let npl = e.div_ceil(32);
            let mut lane_max = [f32::NEG_INFINITY; 32];
            for (i, &x) in logits.iter().enumerate() {
                lane_max[i % 32] = lane_max[i % 32].max(x);
            }
            // fmaxf ignores NaN, as f32::max does.
            let m = butterfly(lane_max, f32::max);
            let ex: Vec<f32> = logits
                .iter()
                .map(|&x| crate::host_math::exp_portable(x - m))
                .collect();
            let mut lane_sum = [0.0f32; 32];
            for (l, s) in lane_sum.iter_mut().enumerate() {
                for j in 0..npl {
                    let i = l + 32 * j;
                    if i < e {
                        *s += ex[i];
                    }
                }
            }
            let sum = butterfly(lane_sum, |a, b| a + b);
            ex.iter().map(|&x| x / sum).collect()
        }
    }
}

/// One token's routing: (ids best first, weights).
///
/// # Errors
/// [`GateConfig::validate`]'s errors for `cfg`; [`Error::Shape`] for `logits` or `bias` not of length
/// `cfg.n_experts`.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::moe::{reference::route_token, GateConfig, Scoring};
/// let cfg = GateConfig { n_experts: 4, top_k: 2, ..GateConfig::default() };
/// let (ids, w) = route_token(&[0.0, 3.0, 1.0, 3.0], Some(&[0.0, 0.0, 5.0, 0.0]), &cfg)?;
/// assert_eq!(ids, vec![2, 1]); // the bias picks expert 2 first; 1 beats 3 on the index tie
/// assert!(w[0] < w[1]);        // but the weights are the unbiased scores
/// // Three logits for four experts:
/// assert!(matches!(
///     route_token(&[0.0; 3], None, &cfg),
///     Err(fusekit::Error::Shape { arg: "logits", .. })
/// ));
/// # Ok(()) }
/// ```
pub fn route_token(
    logits: &[f32],
    bias: Option<&[f32]>,
    cfg: &GateConfig,
) -> Result<(Vec<i32>, Vec<f32>)> {
    cfg.validate()?;
    exactly("logits", logits.len(), cfg.n_experts, "[E]")?;
    if let Some(b) = bias {
        exactly("bias", b.len(), cfg.n_experts, "[E]")?;
    }
    route_checked(logits, bias, cfg)
}

/// [`route_token`] on arguments already checked: `cfg` valid, `logits` and `bias` of length E. The errors
/// left cannot happen with a valid configuration; they replace what would otherwise be a panic.
fn route_checked(
    logits: &[f32],
    bias: Option<&[f32]>,
    cfg: &GateConfig,
) -> Result<(Vec<i32>, Vec<f32>)> {
    let e = cfg.n_experts;
    let s = scores(logits, cfg.scoring);
    let keys: Vec<f32> = (0..e)
        .map(|i| key(s[i] + bias.map_or(0.0, |b| b[i])))
        .collect();
    let mut eligible = vec![true; e];
    if cfg.n_group > 1 {
        let gs = e / cfg.n_group;
        // Group score: sum of the group's two largest keys (its only key for groups of one).
        let gscore: Vec<f32> = (0..cfg.n_group)
            .map(|g| {
                let (mut a1, mut a2) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                for &v in &keys[g * gs..(g + 1) * gs] {
                    if v > a1 {
                        a2 = a1;
                        a1 = v;
                    } else if v > a2 {
                        a2 = v;
                    }
                }
                key(if gs >= 2 { a1 + a2 } else { a1 })
            })
            .collect();
        let mut kept = vec![false; cfg.n_group];
        for _ in 0..cfg.topk_group {
            let mut best: Option<usize> = None;
            for g in 0..cfg.n_group {
                if !kept[g] && best.is_none_or(|b| better(gscore[g], g, gscore[b], b)) {
                    best = Some(g);
                }
            }
            let g = best.ok_or_else(|| {
                Error::invalid("topk_group", format!("exceeds n_group {}", cfg.n_group))
            })?;
            kept[g] = true;
        }
        for (i, el) in eligible.iter_mut().enumerate() {
            *el = kept[i / gs];
        }
    }
    let mut ids = Vec::with_capacity(cfg.top_k);
    let mut w = Vec::with_capacity(cfg.top_k);
    for _ in 0..cfg.top_k {
        let mut best: Option<usize> = None;
        for i in 0..e {
            if eligible[i] && best.is_none_or(|b| better(keys[i], i, keys[b], b)) {
                best = Some(i);
            }
        }
        let b = best.ok_or_else(|| {
            Error::invalid(
                "top_k",
                format!("{} exceeds the eligible experts", cfg.top_k),
            )
        })?;
        eligible[b] = false;
        ids.push(b as i32);
        w.push(s[b]);
    }
    if cfg.renormalize {
        let mut sum = 0.0f32;
        for &x in &w {
            sum += x;
        }
        if sum != 0.0 {
            for x in &mut w {
                *x /= sum;
            }
        }
    }
    for x in &mut w {
        *x *= cfg.scaling;
    }
    Ok((ids, w))
}

/// The gate over `n_tokens` rows of logits `[T, E]`: (ids `[T, K]`, weights `[T, K]`, counts `[E]`).
///
/// # Errors
/// [`GateConfig::validate`]'s errors for `cfg`; [`Error::InvalidArgument`] for `n_tokens` outside
/// `1..=i32::MAX`; [`Error::Shape`] for `logits` not of length `n_tokens · E` or `bias` not of length E.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::moe::{reference::gate, GateConfig};
/// let cfg = GateConfig { n_experts: 3, top_k: 1, ..GateConfig::default() };
/// let (ids, _, counts) = gate(&[0.0, 1.0, 2.0, 5.0, 1.0, 0.0], 2, None, &cfg)?;
/// assert_eq!(ids, vec![2, 0]);
/// assert_eq!(counts, vec![1, 0, 1]);
/// // A bias for two experts where the gate has three:
/// assert!(matches!(
///     gate(&[0.0; 6], 2, Some(&[0.0; 2]), &cfg),
///     Err(fusekit::Error::Shape { arg: "bias", .. })
/// ));
/// # Ok(()) }
/// ```
pub fn gate(
    logits: &[f32],
    n_tokens: usize,
    bias: Option<&[f32]>,
    cfg: &GateConfig,
) -> Result<(Vec<i32>, Vec<f32>, Vec<i32>)> {
    cfg.validate()?;
    check_tokens("n_tokens", n_tokens)?;
    let e = cfg.n_experts;
    let te = len_product("logits", n_tokens, e, "[n_tokens, E]")?;
    exactly("logits", logits.len(), te, "[n_tokens, E]")?;
    if let Some(b) = bias {
        exactly("bias", b.len(), e, "[E]")?;
    }
    // K <= E (validated), so T·K <= T·E, the length of `logits`.
    let mut ids = Vec::with_capacity(n_tokens * cfg.top_k);
    let mut weights = Vec::with_capacity(n_tokens * cfg.top_k);
    let mut counts = vec![0i32; e];
    for t in 0..n_tokens {
        let (i, w) = route_checked(&logits[t * e..(t + 1) * e], bias, cfg)?;
        for &x in &i {
            // x < E; a count is at most n_tokens <= i32::MAX.
            counts[x as usize] += 1;
        }
        ids.extend(i);
        weights.extend(w);
    }
    Ok((ids, weights, counts))
}

/// MaxVio = (max load − mean load) / mean load (0 when nothing was routed, and for no experts).
/// Total: no input makes it fail.
///
/// ```
/// assert_eq!(fusekit::moe::reference::max_vio(&[10, 10, 20, 0]), 1.0);
/// assert_eq!(fusekit::moe::reference::max_vio(&[]), 0.0);
/// ```
pub fn max_vio(counts: &[i32]) -> f64 {
    let mean = counts.iter().map(|&c| c as f64).sum::<f64>() / counts.len() as f64;
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    if mean > 0.0 {
        (max - mean) / mean
    } else {
        0.0
    }
}

/// The bias update: `b_i += u·sign(mean − c_i)` (or `u·(mean − c_i)/mean`), as the kernel does it.
///
/// # Errors
/// [`Error::Shape`] for an empty `bias` or `counts` not of the length of `bias`;
/// [`Error::InvalidArgument`] for `rate` not finite or negative (as [`crate::moe::BalanceState::update`]).
/// `bias` is left unchanged on error.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::moe::reference::update_bias;
/// let mut b = vec![0.0f32; 3];
/// update_bias(&mut b, &[1, 2, 3], 0.1, false)?;
/// assert_eq!(b, vec![0.1, 0.0, -0.1]);
/// assert!(matches!(
///     update_bias(&mut b, &[1, 2], 0.1, false),
///     Err(fusekit::Error::Shape { arg: "counts", .. })
/// ));
/// # Ok(()) }
/// ```
pub fn update_bias(bias: &mut [f32], counts: &[i32], rate: f32, proportional: bool) -> Result<()> {
    if bias.is_empty() {
        return Err(Error::shape("bias", "[E] with E >= 1", "0 elements"));
    }
    exactly(
        "counts",
        counts.len(),
        bias.len(),
        "[E], the length of bias",
    )?;
    if !rate.is_finite() || rate < 0.0 {
        return Err(Error::invalid(
            "rate",
            format!("must be finite and >= 0, got {rate}"),
        ));
    }
    let mean = counts.iter().map(|&c| c as f64).sum::<f64>() / counts.len() as f64;
    for (b, &c) in bias.iter_mut().zip(counts) {
        let c = c as f64;
        let delta = if proportional {
            if mean > 0.0 {
                ((mean - c) / mean) as f32
            } else {
                0.0
            }
        } else if c < mean {
            1.0
        } else if c > mean {
            -1.0
        } else {
            0.0
        };
        *b += rate * delta;
    }
    Ok(())
}

/// The permutation plan: (sorted slots with −1 padding, slot → row (−1 for invalid ids), offsets `[E+1]`,
/// padded offsets `[E+1]`, expert of each block).
pub type Plan = (Vec<i32>, Vec<i32>, Vec<i32>, Vec<i32>, Vec<i32>);

/// Stable counting sort of slots by expert, padded to `block_size`. Ids outside `[0, n_experts)` are left
/// out (their `slot_row` is −1), as the kernels do.
///
/// # Errors
/// [`Error::Shape`] for empty `ids`; [`Error::InvalidArgument`] for `n_experts` outside
/// `1..=FK_MOE_MAX_EXPERTS` (1024), for `block_size` 0, and for a `block_size` whose worst-case layout,
/// `ids.len() + n_experts · (block_size − 1)` rows, exceeds `i32::MAX` (the kernels' limit, as
/// [`crate::moe::PermutePlan::new`]).
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::moe::reference::plan;
/// let (sorted, slot_row, off, poff, blocks) = plan(&[1, 0, 1, 0], 2, 2)?;
/// assert_eq!(sorted, vec![1, 3, 0, 2]);
/// assert_eq!(slot_row, vec![2, 0, 3, 1]);
/// assert_eq!((off, poff, blocks), (vec![0, 2, 4], vec![0, 2, 4], vec![0, 1]));
/// assert!(matches!(
///     plan(&[1, 0], 2, 0),
///     Err(fusekit::Error::InvalidArgument { arg: "block_size", .. })
/// ));
/// # Ok(()) }
/// ```
pub fn plan(ids: &[i32], n_experts: usize, block_size: usize) -> Result<Plan> {
    if ids.is_empty() {
        return Err(Error::shape("ids", "at least one slot", "0 elements"));
    }
    check_experts("n_experts", n_experts)?;
    if block_size == 0 {
        return Err(Error::invalid("block_size", "must be >= 1 (1: no padding)"));
    }
    if ids.len() > i32::MAX as usize {
        return Err(Error::shape(
            "ids",
            format!("at most {} slots (i32 rows)", i32::MAX),
            format!("{} elements", ids.len()),
        ));
    }
    // Every row number below fits an i32.
    n_experts
        .checked_mul(block_size - 1)
        .and_then(|pad| pad.checked_add(ids.len()))
        .filter(|&rows| rows <= i32::MAX as usize)
        .ok_or_else(|| {
            Error::invalid(
                "block_size",
                format!(
                    "{} slots + {n_experts} experts x (block_size {block_size} - 1) padded rows \
                     exceed {}",
                    ids.len(),
                    i32::MAX
                ),
            )
        })?;
    let mut per: Vec<Vec<usize>> = vec![Vec::new(); n_experts];
    for (s, &id) in ids.iter().enumerate() {
        if id >= 0 && (id as usize) < n_experts {
            per[id as usize].push(s);
        }
    }
    let mut sorted = Vec::new();
    let mut slot_row = vec![-1i32; ids.len()];
    let (mut off, mut poff, mut blocks) = (vec![0i32], vec![0i32], Vec::new());
    let mut n = 0;
    for (e, slots) in per.iter().enumerate() {
        for &s in slots {
            slot_row[s] = sorted.len() as i32;
            sorted.push(s as i32);
        }
        let padded = slots.len().div_ceil(block_size) * block_size;
        sorted.extend(std::iter::repeat_n(-1, padded - slots.len()));
        blocks.extend(std::iter::repeat_n(e as i32, padded / block_size));
        n += slots.len();
        off.push(n as i32);
        poff.push(sorted.len() as i32);
    }
    Ok((sorted, slot_row, off, poff, blocks))
}

/// Weighted combine in f64: `out[t] = Σ_k w[t,k] · expert_out[slot_row[t·K+k]]`. Negative rows in
/// `slot_row` (invalid ids) are skipped.
///
/// # Errors
/// [`Error::InvalidArgument`] for `n_tokens`, `k` or `h` of 0, or an `n_tokens · h` output that
/// overflows or cannot be allocated (named `h`); [`Error::Shape`] for `slot_row` or `weights` not of
/// length `n_tokens · k` and for `expert_out` not a whole number of rows of `h`; [`Error::OutOfRange`]
/// for a row of `slot_row` past the rows of `expert_out`.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::moe::reference::combine;
/// let out = combine(&[1.0, 3.0], &[0.5, 0.25], &[0, 1], 1, 2, 1)?;
/// assert_eq!(out, vec![0.5 * 1.0 + 0.25 * 3.0]);
/// // Row 2 of an expert_out with two rows:
/// assert!(matches!(
///     combine(&[1.0, 3.0], &[0.5, 0.25], &[0, 2], 1, 2, 1),
///     Err(fusekit::Error::OutOfRange { arg: "slot_row", index: 1, value: 2, .. })
/// ));
/// # Ok(()) }
/// ```
pub fn combine(
    expert_out: &[f64],
    weights: &[f32],
    slot_row: &[i32],
    n_tokens: usize,
    k: usize,
    h: usize,
) -> Result<Vec<f64>> {
    nonzero("n_tokens", n_tokens)?;
    nonzero("k", k)?;
    nonzero("h", h)?;
    let tk = len_product("slot_row", n_tokens, k, "[n_tokens, k]")?;
    exactly("slot_row", slot_row.len(), tk, "[n_tokens, k]")?;
    exactly("weights", weights.len(), tk, "[n_tokens, k]")?;
    if expert_out.len() % h != 0 {
        return Err(Error::shape(
            "expert_out",
            format!("[rows, h]: a multiple of h = {h} elements"),
            format!("{} elements", expert_out.len()),
        ));
    }
    let rows = expert_out.len() / h;
    if let Some(i) = slot_row.iter().position(|&r| r >= 0 && r as usize >= rows) {
        return Err(Error::OutOfRange {
            arg: "slot_row",
            index: i,
            value: slot_row[i] as i64,
            allowed: format!("[0, {rows}) (the rows of expert_out), or negative (skipped)"),
        });
    }
    let th = n_tokens.checked_mul(h).ok_or_else(|| {
        Error::invalid("h", format!("n_tokens {n_tokens} x h {h} outputs overflow"))
    })?;
    let mut out = try_with_capacity(th, "h")?;
    out.resize(th, 0.0);
    for t in 0..n_tokens {
        for j in 0..k {
            let r = slot_row[t * k + j];
            if r < 0 {
                continue;
            }
            let w = weights[t * k + j] as f64;
            for x in 0..h {
                out[t * h + x] += w * expert_out[r as usize * h + x];
            }
        }
    }
    Ok(out)
}

/// Expert-parallel dispatch: (membership `[T, R]`, distinct tokens per rank `[R]`) for `ids [T, k]` and
/// `n_ranks` ranks of `experts_per_rank` experts each. Ids outside `[0, n_ranks · experts_per_rank)` are
/// skipped, as the kernel does.
///
/// # Errors
/// [`Error::InvalidArgument`] for `k`, `n_ranks` or `experts_per_rank` of 0, and for more than
/// `FK_MOE_MAX_EXPERTS` (1024) experts in all (named `n_ranks` when it alone exceeds it, else
/// `experts_per_rank`); [`Error::Shape`] for `ids` empty or not a whole number of rows of `k`.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::moe::reference::ep_counts;
/// let (m, tpr) = ep_counts(&[0, 3, 1, 0], 2, 2, 2)?;
/// assert_eq!(m, vec![1, 1, 1, 0]);
/// assert_eq!(tpr, vec![2, 1]);
/// // Three ids do not make rows of two:
/// assert!(matches!(
///     ep_counts(&[0, 3, 1], 2, 2, 2),
///     Err(fusekit::Error::Shape { arg: "ids", .. })
/// ));
/// # Ok(()) }
/// ```
pub fn ep_counts(
    ids: &[i32],
    k: usize,
    n_ranks: usize,
    experts_per_rank: usize,
) -> Result<(Vec<u8>, Vec<i32>)> {
    nonzero("k", k)?;
    check_experts("n_ranks", n_ranks)?;
    nonzero("experts_per_rank", experts_per_rank)?;
    let max = FK_MOE_MAX_EXPERTS as usize;
    let n_experts = n_ranks
        .checked_mul(experts_per_rank)
        .filter(|&e| e <= max)
        .ok_or_else(|| {
            Error::invalid(
                "experts_per_rank",
                format!("{n_ranks} ranks x {experts_per_rank} exceed {max} experts"),
            )
        })?;
    let t = rows_of("ids", ids.len(), k, "k")?;
    let tr = len_product("ids", t, n_ranks, "[T, n_ranks] membership")?;
    let mut m = vec![0u8; tr];
    let mut tpr = vec![0i32; n_ranks];
    for i in 0..t {
        for j in 0..k {
            let id = ids[i * k + j];
            if id < 0 || id as usize >= n_experts {
                continue;
            }
            let r = id as usize / experts_per_rank;
            if m[i * n_ranks + r] == 0 {
                m[i * n_ranks + r] = 1;
                tpr[r] += 1;
            }
        }
    }
    Ok((m, tpr))
}
