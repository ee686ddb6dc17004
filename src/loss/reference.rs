//! CPU reference of the fused-loss family, in f64, written from the formulas (not from the kernels'
//! coefficient form), so the kernels, the shared `fk_loss_math.h` and this file check each other.
//!
//! No function here panics: a slice of the wrong length, an empty batch or vocabulary, a size product
//! that overflows, or a configuration the kernels reject is a typed [`Error`] naming the parameter. The
//! edge semantics (masked and NaN logits, NaN or zero-sum class weights, invalid targets) are the
//! kernels', documented in `src/loss/edges.md`.

use super::{LabelSmoothing, LossConfig, LossKind, Reduction};
use crate::error::{Error, Result};
use crate::validate::exactly;

/// Reference results of a fused forward + backward.
#[derive(Clone, Debug, PartialEq)]
pub struct RefOutput {
    /// Per-row loss (0 for ignored rows).
    pub rows: Vec<f64>,
    /// Per-row log-sum-exp of the softcapped logits (0 for ignored rows).
    pub lse: Vec<f64>,
    /// Gradient of the reduced loss (times the upstream gradient) with respect to the logits, [N, V].
    pub grad: Vec<f64>,
    /// The reduced loss (mean or sum; the sum of rows for `Reduction::None`).
    pub loss: f64,
    /// What the kernel's status word reports for the same input through
    /// [`LossOutputs::check_targets_sync`](super::LossOutputs::check_targets_sync): `Ok`, or
    /// `Err(OutOfRange { arg: "targets", .. })` naming the first row whose target lies outside `[0, v)`
    /// and is not the ignore index (that row's loss and lse are NaN and its gradient 0, as in the kernel).
    pub status: Result<()>,
}

/// `Err(Shape)` for a dimension of 0.
fn nonzero(arg: &'static str, value: usize, what: &str) -> Result<()> {
    if value == 0 {
        return Err(Error::shape(arg, format!("{what} >= 1"), "0"));
    }
    Ok(())
}

/// `a · b` elements of `arg`, or `Err(Shape)` when the product overflows `usize`.
fn elements(arg: &'static str, a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| {
        Error::shape(
            arg,
            format!("{what} = {a} x {b} elements"),
            "a product beyond usize::MAX",
        )
    })
}

/// `k·x`, with `0·(±∞) = 0`: a term weighted by exactly 0 (a class weight, `1 − ε`, `α_t`) contributes
/// nothing, even where `x` is infinite (a masked logit); a NaN `x` still gives NaN. As `fk_weighted`.
fn weighted(k: f64, x: f64) -> f64 {
    if k == 0.0 && x.is_infinite() {
        0.0
    } else {
        k * x
    }
}

/// The scalar parameters of `cfg`, checked as the kernels check them (`Err(InvalidArgument)` naming
/// `gamma`, `epsilon`, `q`, `label_smoothing`, `z_loss` or `softcap`).
fn check_config(cfg: &LossConfig, vocab: usize, has_weights: bool) -> Result<()> {
    cfg.to_params(vocab, None, has_weights).map(|_| ())
}

/// The softcapped logit `c·tanh(x/c)` and its derivative `1 − tanh²` (x and 1 without a cap).
///
/// ```
/// let (z, dz) = fusekit::loss::reference::softcap(0.0, Some(30.0));
/// assert_eq!((z, dz), (0.0, 1.0));
/// ```
pub fn softcap(x: f64, c: Option<f32>) -> (f64, f64) {
    match c {
        Some(c) if c > 0.0 => {
            let c = c as f64;
            let t = (x / c).tanh();
            (c * t, 1.0 - t * t)
        }
        _ => (x, 1.0),
    }
}

/// The label-smoothing ε actually applied (the Megatron form rescales by V/(V−1)).
///
/// ```
/// use fusekit::loss::{reference::effective_smoothing, LabelSmoothing};
/// assert!((effective_smoothing(LabelSmoothing::PyTorch(0.1), 11) - 0.1).abs() < 1e-8);
/// assert!((effective_smoothing(LabelSmoothing::Megatron(0.1), 11) - 0.11).abs() < 1e-8);
/// ```
pub fn effective_smoothing(s: LabelSmoothing, vocab: usize) -> f64 {
    match s {
        LabelSmoothing::None => 0.0,
        LabelSmoothing::PyTorch(e) => e as f64,
        LabelSmoothing::Megatron(e) if vocab > 1 => e as f64 * vocab as f64 / (vocab as f64 - 1.0),
        LabelSmoothing::Megatron(e) => e as f64,
    }
}

/// Loss of one row and dloss/dz (before the softcap chain and the upstream scale).
/// `z`: softcapped logits; `w`: class weights (None: all 1).
///
/// `Err(Shape)` for an empty `z` or a `w` of another length, `Err(OutOfRange { arg: "y", .. })` for
/// `y >= z.len()`, `Err(InvalidArgument)` for a configuration the kernels reject.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::loss::{reference::row_loss_grad, LossConfig};
/// let (loss, lse, grad) = row_loss_grad(&[0.0, 0.0], 0, None, &LossConfig::default())?;
/// assert!((loss - 2f64.ln()).abs() < 1e-15 && (lse - 2f64.ln()).abs() < 1e-15);
/// assert!((grad[0] + 0.5).abs() < 1e-15 && (grad[1] - 0.5).abs() < 1e-15);
/// assert!(row_loss_grad(&[0.0, 0.0], 2, None, &LossConfig::default()).is_err());
/// # Ok(()) }
/// ```
pub fn row_loss_grad(
    z: &[f64],
    y: usize,
    w: Option<&[f64]>,
    cfg: &LossConfig,
) -> Result<(f64, f64, Vec<f64>)> {
    let v = z.len();
    nonzero("z", v, "V")?;
    if y >= v {
        return Err(Error::OutOfRange {
            arg: "y",
            index: 0,
            value: i64::try_from(y).unwrap_or(i64::MAX),
            allowed: format!("[0, {v})"),
        });
    }
    if let Some(w) = w {
        exactly("w", w.len(), v, "one class weight per logit")?;
    }
    check_config(cfg, v, w.is_some())?;
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    // Every logit masked: lse = log 0 = −∞ (not −∞ − (−∞)); the loss and p are then NaN. (A NaN logit
    // also leaves m = −∞, but it is not masked, and its NaN reaches lse below.)
    let lse = if z.iter().all(|&zj| zj == f64::NEG_INFINITY) {
        f64::NEG_INFINITY
    } else {
        m + z.iter().map(|zj| (zj - m).exp()).sum::<f64>().ln()
    };
    let p: Vec<f64> = z.iter().map(|zj| (zj - lse).exp()).collect();
    let wj = |j: usize| w.map_or(1.0, |w| w[j]);
    let wy = wj(y);
    let logp = z[y] - lse;
    let py = logp.exp();
    let q = -logp.exp_m1(); // 1 − p_y
    let delta = |j: usize| if j == y { 1.0 } else { 0.0 };
    let (mut loss, mut grad): (f64, Vec<f64>) = match cfg.kind {
        LossKind::CrossEntropy => {
            let eps = effective_smoothing(cfg.label_smoothing, v);
            let wsum: f64 = (0..v).map(wj).sum();
            // Without smoothing the term is absent, not 0 · Σ: a masked (−∞) logit would make it 0 · ∞.
            // Likewise a class of weight 0 adds nothing, masked or not.
            let smooth = if eps == 0.0 {
                0.0
            } else {
                eps / v as f64 * (0..v).map(|j| weighted(wj(j), lse - z[j])).sum::<f64>()
            };
            let loss = weighted((1.0 - eps) * wy, -logp) + smooth;
            // The smoothing term only with smoothing: Σ_j w_j of a NaN weight no row targets must not
            // reach the gradient through 0 · NaN (the kernel's c and Σ w terms are absent too).
            let grad = (0..v)
                .map(|j| {
                    let g = (1.0 - eps) * wy * (p[j] - delta(j));
                    if eps == 0.0 {
                        g
                    } else {
                        g + eps / v as f64 * (wsum * p[j] - wj(j))
                    }
                })
                .collect();
            (loss, grad)
        }
        LossKind::Focal { gamma } | LossKind::Poly1Focal { gamma, .. } => {
            let g = gamma as f64;
            let qg = q.powf(g);
            // p log p → 0 as p → 0: a masked target (p = 0, log p = −∞) has a finite gradient.
            let t2 = if g == 0.0 || q <= 0.0 || py == 0.0 {
                0.0
            } else {
                g * q.powf(g - 1.0) * py * logp
            };
            let b = wy * (-qg + t2); // dℓ/dz_j = b (δ_j − p_j)
            let mut loss = weighted(-wy * qg, logp);
            let mut grad: Vec<f64> = (0..v).map(|j| b * (delta(j) - p[j])).collect();
            if let LossKind::Poly1Focal { epsilon, .. } = cfg.kind {
                let e = epsilon as f64;
                loss += e * wy * q.powf(g + 1.0);
                // d(1 − p_y)^{γ+1}/dz_j = (γ+1)(1 − p_y)^γ · p_y (p_j − δ_j)
                for (j, gj) in grad.iter_mut().enumerate() {
                    *gj += e * wy * (g + 1.0) * qg * py * (p[j] - delta(j));
                }
            }
            (loss, grad)
        }
        LossKind::Poly1 { epsilon } => {
            let e = epsilon as f64;
            let loss = weighted(wy, -logp + e * q);
            let grad = (0..v)
                .map(|j| wy * ((p[j] - delta(j)) + e * py * (p[j] - delta(j))))
                .collect();
            (loss, grad)
        }
        LossKind::Gce { q: qq } => {
            let qq = qq as f64;
            let pq = (qq * logp).exp();
            let loss = wy * (1.0 - pq) / qq;
            let grad = (0..v).map(|j| wy * pq * (p[j] - delta(j))).collect();
            (loss, grad)
        }
    };
    if cfg.z_loss != 0.0 {
        let s = cfg.z_loss as f64;
        loss += s * lse * lse;
        for (j, gj) in grad.iter_mut().enumerate() {
            *gj += 2.0 * s * lse * p[j];
        }
    }
    Ok((loss, lse, grad))
}

/// Fused forward + backward over `logits` `[n, v]` (row-major) with `targets` `[n]`.
/// `grad_output`: None (1), one value (mean/sum) or n values (none). As in the kernel:
/// * a target outside [0, v) that is not the ignore index makes its row's loss and lse NaN and its
///   gradient 0, and is reported in [`RefOutput::status`];
/// * a NaN logit makes its row's loss, lse and gradient NaN; either makes a mean or sum NaN;
/// * the mean divides by `D = Σ w_{y_i}` over the counted rows whenever `D ≠ 0` (a NaN or negative `D`
///   included); `D = 0` (every row ignored, or the counted rows' weights summing to zero) gives loss 0
///   and a zero gradient, unless a row's loss is NaN: then the mean is NaN.
///
/// `Err(Shape)` naming `n`, `v`, `logits`, `targets`, `weights` or `grad_output` for a zero dimension,
/// an `n·v` beyond `usize` or a slice of the wrong length; `Err(InvalidArgument)` for a configuration the
/// kernels reject.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::loss::{reference, LossConfig};
/// let out = reference::fwd_bwd(&[0.0, 0.0], 1, 2, &[1], None, None, &LossConfig::default())?;
/// assert!((out.loss - 2f64.ln()).abs() < 1e-15);
/// assert!((out.grad[0] - 0.5).abs() < 1e-15 && (out.grad[1] + 0.5).abs() < 1e-15);
/// assert!(out.status.is_ok());
/// # Ok(()) }
/// ```
pub fn fwd_bwd(
    logits: &[f64],
    n: usize,
    v: usize,
    targets: &[i64],
    weights: Option<&[f64]>,
    grad_output: Option<&[f64]>,
    cfg: &LossConfig,
) -> Result<RefOutput> {
    nonzero("n", n, "rows")?;
    nonzero("v", v, "classes")?;
    let nv = elements("logits", n, v, "[n, v]")?;
    exactly("logits", logits.len(), nv, "[n, v]")?;
    exactly("targets", targets.len(), n, "one per row")?;
    if let Some(w) = weights {
        exactly("weights", w.len(), v, "one class weight per class")?;
    }
    if let Some(g) = grad_output {
        let need = if cfg.reduction == Reduction::None {
            n
        } else {
            1
        };
        exactly(
            "grad_output",
            g.len(),
            need,
            &format!("for {:?} reduction", cfg.reduction),
        )?;
    }
    check_config(cfg, v, weights.is_some())?;
    let valid = |y: i64| y != cfg.ignore_index && (0..v as i64).contains(&y);
    let mut rows = vec![0.0; n];
    let mut lse = vec![0.0; n];
    let mut grad = vec![0.0; nv];
    let mut denom = 0.0;
    for &y in targets {
        if valid(y) {
            denom += weights.map_or(1.0, |w| w[y as usize]);
        }
    }
    let status = match targets
        .iter()
        .position(|&y| y != cfg.ignore_index && !valid(y))
    {
        None => Ok(()),
        Some(i) => Err(Error::OutOfRange {
            arg: "targets",
            index: i,
            value: targets[i],
            allowed: format!("[0, {v}) (or ignore_index {})", cfg.ignore_index),
        }),
    };
    for i in 0..n {
        let y = targets[i];
        if y == cfg.ignore_index {
            continue;
        }
        if !valid(y) {
            rows[i] = f64::NAN;
            lse[i] = f64::NAN;
            continue;
        }
        let x = &logits[i * v..(i + 1) * v];
        let (z, dz): (Vec<f64>, Vec<f64>) = x.iter().map(|&xj| softcap(xj, cfg.softcap)).unzip();
        let (l, s, gz) = row_loss_grad(&z, y as usize, weights, cfg)?;
        rows[i] = l;
        lse[i] = s;
        let mut scale = match (cfg.reduction, grad_output) {
            (_, None) => 1.0,
            (Reduction::None, Some(g)) => g[i],
            (_, Some(g)) => g[0],
        };
        if cfg.reduction == Reduction::Mean {
            // D ≠ 0 divides, NaN and negative included (a NaN weight is never averaged away).
            scale = if denom != 0.0 { scale / denom } else { 0.0 };
        }
        for j in 0..v {
            grad[i * v + j] = scale * gz[j] * dz[j];
        }
    }
    // NaN rows (a NaN logit, or an invalid target) make the reduced loss NaN, as in the kernel.
    let total: f64 = rows.iter().sum();
    let loss = match cfg.reduction {
        Reduction::Mean => {
            if denom != 0.0 {
                total / denom
            } else if total.is_nan() {
                f64::NAN
            } else {
                // Nothing to average (every row ignored, or zero total weight): 0, not PyTorch's 0/0.
                0.0
            }
        }
        _ => total,
    };
    Ok(RefOutput {
        rows,
        lse,
        grad,
        loss,
        status,
    })
}

/// Per-row statistics of a vocabulary shard `logits` [n, vs] starting at class `offset`:
/// (max, Σ exp(z − max), z_y if y is in the shard else 0, Σ w_j z_j if smoothing else 0). `weights` are
/// the whole vocabulary's (at least `offset + vs` of them); a class of weight 0 adds nothing to Σ w z,
/// even where its logit is masked.
///
/// `Err(Shape)` naming `n`, `vs`, `logits`, `targets` or `weights` for a zero dimension, an `n·vs` beyond
/// `usize` or a slice of the wrong length; `Err(InvalidArgument { arg: "offset", .. })` when
/// `offset + vs` exceeds `i64::MAX` (class ids are i64); `Err(InvalidArgument)` for a configuration the
/// kernels reject.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::loss::{reference, LossConfig};
/// let s = reference::shard_stats(&[1.0, 2.0], 1, 2, 2, &[3], None, &LossConfig::default())?;
/// assert_eq!(s[0][0], 2.0);
/// assert_eq!(s[0][2], 2.0); // class 3 is local column 1
/// # Ok(()) }
/// ```
pub fn shard_stats(
    logits: &[f64],
    n: usize,
    vs: usize,
    offset: usize,
    targets: &[i64],
    weights: Option<&[f64]>,
    cfg: &LossConfig,
) -> Result<Vec<[f64; 4]>> {
    nonzero("n", n, "rows")?;
    nonzero("vs", vs, "shard classes")?;
    let nv = elements("logits", n, vs, "[n, vs]")?;
    exactly("logits", logits.len(), nv, "[n, vs]")?;
    exactly("targets", targets.len(), n, "one per row")?;
    let end = offset
        .checked_add(vs)
        .filter(|&e| i64::try_from(e).is_ok())
        .ok_or_else(|| {
            Error::invalid(
                "offset",
                format!("offset + vs must be at most i64::MAX, got {offset} + {vs}"),
            )
        })?;
    if let Some(w) = weights {
        if w.len() < end {
            return Err(Error::shape(
                "weights",
                format!("at least offset + vs = {end} elements (the whole vocabulary's weights)"),
                format!("{}", w.len()),
            ));
        }
    }
    check_config(cfg, end, weights.is_some())?;
    let smoothing =
        cfg.kind == LossKind::CrossEntropy && cfg.label_smoothing != LabelSmoothing::None;
    Ok((0..n)
        .map(|i| {
            if targets[i] == cfg.ignore_index {
                return [f64::NEG_INFINITY, 0.0, 0.0, 0.0];
            }
            let z: Vec<f64> = logits[i * vs..(i + 1) * vs]
                .iter()
                .map(|&x| softcap(x, cfg.softcap).0)
                .collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            // Masked logits add nothing, so an all-masked shard is the empty {−∞, 0}; a NaN makes s NaN.
            let s = z
                .iter()
                .filter(|&&zj| zj != f64::NEG_INFINITY)
                .map(|zj| (zj - m).exp())
                .sum();
            // Checked: an i64::MIN target minus the offset must not overflow (it is in no shard).
            let local = targets[i].checked_sub(offset as i64);
            let zy = match local {
                Some(l) if (0..vs as i64).contains(&l) => z[l as usize],
                _ => 0.0,
            };
            let swz = if smoothing {
                z.iter()
                    .enumerate()
                    .map(|(j, &zj)| weighted(weights.map_or(1.0, |w| w[offset + j]), zj))
                    .sum()
            } else {
                0.0
            };
            [m, s, zy, swz]
        })
        .collect())
}

/// Merges per-shard statistics (in shard order) into the global log-sum-exp, target logit and Σ w z.
///
/// ```
/// use fusekit::loss::reference::combine_stats;
/// let (lse, zy, _) = combine_stats(&[[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.5, 0.0]]);
/// assert!((lse - 2f64.ln()).abs() < 1e-15);
/// assert_eq!(zy, 0.5);
/// ```
pub fn combine_stats(parts: &[[f64; 4]]) -> (f64, f64, f64) {
    let m = parts.iter().map(|p| p[0]).fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = parts
        .iter()
        // Skip empty shards ({−∞, 0}: every logit masked) but not a shard that saw only NaN ({−∞, NaN}):
        // its NaN must reach the loss.
        .filter(|p| !(p[0] == f64::NEG_INFINITY && p[1] == 0.0))
        .map(|p| p[1] * (p[0] - m).exp())
        .sum();
    (
        m + s.ln(),
        parts.iter().map(|p| p[2]).sum(),
        parts.iter().map(|p| p[3]).sum(),
    )
}

/// Sigmoid focal loss of one element (torchvision semantics) and its derivative.
///
/// At `x = ±∞` the loss and gradient are their limits, as in the kernel: 0 and 0 for a correct
/// prediction (`x = +∞, t = 1` or `x = −∞, t = 0`), `+∞` and `±α_t` for a wrong one, where torchvision's
/// formula gives NaN (`0·∞` in `x·t` or in `α_t·ce`). A class of weight `α_t = 0` has loss 0.
///
/// ```
/// let (l, g) = fusekit::loss::reference::sigmoid_focal(0.0, 1.0, 0.25, 2.0);
/// // p = 0.5: ce = ln 2, (1 − p_t)^2 = 0.25, times α = 0.25
/// assert!((l - 0.25 * 0.25 * 2f64.ln()).abs() < 1e-15);
/// assert!(g < 0.0);
/// assert_eq!(fusekit::loss::reference::sigmoid_focal(f64::INFINITY, 1.0, 0.25, 2.0), (0.0, 0.0));
/// ```
pub fn sigmoid_focal(x: f64, t: f64, alpha: f64, gamma: f64) -> (f64, f64) {
    let p = 1.0 / (1.0 + (-x).exp());
    let ce = if x.is_infinite() {
        // x(1 − t) (x = +∞) or −x·t (x = −∞): 0 where the factor is 0 (a correct prediction), not 0·∞.
        weighted(if x > 0.0 { 1.0 - t } else { -t }, x)
    } else {
        x.max(0.0) - x * t + (-x.abs()).exp().ln_1p()
    };
    let pt = p * t + (1.0 - p) * (1.0 - t);
    let m = 1.0 - pt;
    let mg = m.powf(gamma);
    let dm = -p * (1.0 - p) * (2.0 * t - 1.0);
    let dmg = if gamma == 0.0 || m <= 0.0 {
        0.0
    } else {
        gamma * m.powf(gamma - 1.0) * dm
    };
    // ce·dmg → 0 at x = ±∞ (dm decays like e^{−|x|}); not ∞·0.
    let ce_dmg = weighted(dmg, ce);
    let mut l = ce * mg;
    let mut g = (p - t) * mg + ce_dmg;
    if alpha >= 0.0 {
        let at = alpha * t + (1.0 - alpha) * (1.0 - t);
        // α_t = 0 weighs the element out: loss 0 even where ce is infinite.
        l = weighted(at, l);
        g *= at;
    }
    (l, g)
}
