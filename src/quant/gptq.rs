//! GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
//! Transformers"): weights quantised column by column, each column's rounding error propagated to the
//! columns not yet quantised through the inverse Hessian of the layer's calibration activations.

use super::linalg::upper_cholesky_of_inverse;
use super::rtn::{check_weight, QuantizedWeight, WeightQuant};
use crate::error::{Error, Result};

/// The Hessian of a linear layer's squared output error, `H = (2/n) · Σ xᵀx` over `n` calibration
/// activation rows of `k` input channels, accumulated in f64.
///
/// ```
/// use fusekit::quant::Hessian;
/// let mut h = Hessian::new(2)?;
/// h.add(&[1.0, 2.0, 3.0, 0.0])?; // two rows
/// assert_eq!(h.rows(), 2);
/// assert_eq!(h.matrix(), vec![10.0, 2.0, 2.0, 4.0]); // (2/2)·[[1+9, 2], [2, 4]]
/// assert!(h.add(&[f32::NAN, 0.0]).is_err());
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Hessian {
    k: usize,
    sum: Vec<f64>,
    rows: usize,
}

impl Hessian {
    /// An empty Hessian of `k ≥ 1` input channels.
    ///
    /// ```
    /// assert!(fusekit::quant::Hessian::new(0).is_err());
    /// ```
    pub fn new(k: usize) -> Result<Self> {
        if k == 0 || k > 1 << 16 {
            return Err(Error::invalid(
                "k",
                format!("a Hessian of 1..=65536 input channels, got {k}"),
            ));
        }
        let mut sum = Vec::new();
        sum.try_reserve_exact(k * k)
            .map_err(|_| Error::Unsupported {
                what: format!("a Hessian of {k} x {k} f64: the allocation failed"),
            })?;
        sum.resize(k * k, 0.0);
        Ok(Hessian { k, sum, rows: 0 })
    }

    /// Adds calibration rows `x` (`[rows][k]`, finite).
    ///
    /// ```
    /// let mut h = fusekit::quant::Hessian::new(3)?;
    /// assert!(h.add(&[1.0, 2.0]).is_err()); // not rows of 3
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn add(&mut self, x: &[f32]) -> Result<()> {
        let k = self.k;
        if x.len() % k != 0 {
            return Err(Error::shape(
                "x",
                format!("rows of {k} activations"),
                format!("{} values", x.len()),
            ));
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "x",
                format!("activation ({}, {}) is {}", i / k, i % k, x[i]),
            ));
        }
        let mut row = vec![0.0f64; k];
        for xr in x.chunks_exact(k) {
            for (d, &s) in row.iter_mut().zip(xr) {
                *d = s as f64;
            }
            for i in 0..k {
                let xi = row[i];
                if xi == 0.0 {
                    continue;
                }
                let dst = &mut self.sum[i * k..i * k + i + 1];
                for (d, &xj) in dst.iter_mut().zip(&row[..=i]) {
                    *d += xi * xj;
                }
            }
            self.rows += 1;
        }
        Ok(())
    }

    /// Calibration rows added so far.
    ///
    /// ```
    /// assert_eq!(fusekit::quant::Hessian::new(4)?.rows(), 0);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input channels.
    ///
    /// ```
    /// assert_eq!(fusekit::quant::Hessian::new(4)?.k(), 4);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn k(&self) -> usize {
        self.k
    }

    /// `H = (2/n) · Σ xᵀx`, `k × k` row-major (zeros before any row).
    ///
    /// ```
    /// let mut h = fusekit::quant::Hessian::new(1)?;
    /// h.add(&[3.0])?;
    /// assert_eq!(h.matrix(), vec![18.0]);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn matrix(&self) -> Vec<f64> {
        let k = self.k;
        let f = if self.rows == 0 {
            0.0
        } else {
            2.0 / self.rows as f64
        };
        let mut m = vec![0.0; k * k];
        for i in 0..k {
            for j in 0..=i {
                let v = self.sum[i * k + j] * f;
                m[i * k + j] = v;
                m[j * k + i] = v;
            }
        }
        m
    }
}

/// GPTQ's settings.
///
/// ```
/// let c = fusekit::quant::GptqConfig::default();
/// assert_eq!((c.damp, c.block, c.act_order), (0.01, 128, false));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptqConfig {
    /// Dampening added to the Hessian's diagonal, as a fraction of its mean (0.01: GPTQ's 1 %).
    pub damp: f64,
    /// Columns per block of lazy updates (128; at least 1, longer than the weight means one block).
    /// With groups and without act-order, a multiple of the group.
    pub block: usize,
    /// Quantise columns in order of decreasing Hessian diagonal (act-order). Groups stay static: each
    /// group's (scale, zero) is fixed from the weights before quantisation, so the stored groups are
    /// contiguous input channels, as without act-order, and a kernel needs no permutation index.
    pub act_order: bool,
}

impl Default for GptqConfig {
    fn default() -> Self {
        GptqConfig {
            damp: 0.01,
            block: 128,
            act_order: false,
        }
    }
}

/// GPTQ quantisation of a `[n][k]` weight `w` with `scheme` and the layer's Hessian `h` (`k` input
/// channels, at least one calibration row). In f64: channels that never activate (`H_jj = 0`) are
/// zeroed, the diagonal is dampened by `damp · mean(diag H)`, `U` is the upper Cholesky factor of
/// `H⁻¹`, and column `j` (in act-order if asked) is quantised, its error `(w − q) / U_jj` propagated to
/// the later columns of its block at once and to the following blocks lazily. Per-channel parameters
/// come from the original rows (as GPTQ's code); with act-order, group parameters from the weights
/// before quantisation (GPTQ's static groups). Without act-order a group's parameters come from its
/// current weights when it starts, every compensation so far included: GPTQ's code instead reads the
/// weights without the updates from earlier columns of the same block, so for groups smaller than the
/// block (32 or 64 in blocks of 128) fusekit's groups differ from the reference's, and do not depend
/// on the block size (lazy updates are then an exact reordering). A scale that the compensation pushes
/// past the scale format's range is an `Err`.
///
/// ```
/// use fusekit::quant::{quantize_gptq, quantize_rtn, relative_output_error, GptqConfig, Hessian, WeightQuant};
/// // Correlated activations: every channel is mostly channel 0.
/// let (n, k, rows) = (8, 64, 256);
/// let x: Vec<f32> = (0..rows * k).map(|i| {
///     let (r, c) = (i / k, i % k);
///     let base = ((r * 7919) % 101) as f32 / 50.0 - 1.0;
///     base + 0.1 * (((r * 31 + c * 17) % 13) as f32 / 6.0 - 1.0)
/// }).collect();
/// let w: Vec<f32> = (0..n * k).map(|i| ((i * 2654435761usize) % 1000) as f32 / 500.0 - 1.0).collect();
/// let mut h = Hessian::new(k)?;
/// h.add(&x)?;
/// let s = WeightQuant::int4(Some(32), false);
/// let gptq = quantize_gptq(&w, n, k, &h, &s, &GptqConfig::default())?;
/// let rtn = quantize_rtn(&w, n, k, &s)?;
/// let e_gptq = relative_output_error(&x, &w, &gptq.dequantize(), k)?;
/// let e_rtn = relative_output_error(&x, &w, &rtn.dequantize(), k)?;
/// assert!(e_gptq < e_rtn);
/// # Ok::<(), fusekit::Error>(())
/// ```
pub fn quantize_gptq(
    w: &[f32],
    n: usize,
    k: usize,
    h: &Hessian,
    scheme: &WeightQuant,
    cfg: &GptqConfig,
) -> Result<QuantizedWeight> {
    check_weight(w, n, k, scheme)?;
    if h.k() != k {
        return Err(Error::shape(
            "h",
            format!("a Hessian of the weight's {k} input channels"),
            format!("{}", h.k()),
        ));
    }
    if h.rows() == 0 {
        return Err(Error::invalid("h", "no calibration rows were added"));
    }
    if cfg.damp.is_nan() || cfg.damp <= 0.0 || cfg.damp.is_infinite() {
        return Err(Error::invalid(
            "cfg.damp",
            format!("dampening must be a positive fraction, got {}", cfg.damp),
        ));
    }
    let g = scheme.group_len(k);
    // A block longer than the weight is the whole weight.
    let block = cfg.block.min(k);
    let dynamic = scheme.group.is_some() && !cfg.act_order;
    if block == 0 || (dynamic && block < k && block % g != 0) {
        return Err(Error::invalid(
            "cfg.block",
            format!(
                "{} columns per block: at least 1 and, with groups and no act-order, a multiple of \
                 the group ({g}) so no group straddles two blocks",
                cfg.block
            ),
        ));
    }
    let ng = k.div_ceil(g);
    let mut wm: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    let mut q = QuantizedWeight {
        n,
        k,
        scheme: *scheme,
        codes: vec![0; n * k],
        scales: vec![0.0; n * ng],
        zeros: vec![0; n * ng],
    };
    // Parameters fixed up front: per channel always (from the original rows, dead channels included,
    // as GPTQ's code does), every group with act-order (static groups, after the dead channels are
    // zeroed, as GPTQ's `static_groups`).
    let static_params = !dynamic;
    let mut fix_params = |wm: &[f64]| -> Result<()> {
        let mut buf = Vec::with_capacity(g);
        for r in 0..n {
            for gi in 0..ng {
                let (c0, c1) = (gi * g, ((gi + 1) * g).min(k));
                buf.clear();
                buf.extend_from_slice(&wm[r * k + c0..r * k + c1]);
                let (s, z) = scheme.params(&buf)?;
                q.scales[r * ng + gi] = s as f32;
                q.zeros[r * ng + gi] = z as u8;
            }
        }
        Ok(())
    };
    if scheme.group.is_none() {
        fix_params(&wm)?;
    }
    let mut hm = h.matrix();
    zero_dead_channels(&mut hm, &mut wm, n, k);
    if scheme.group.is_some() && cfg.act_order {
        fix_params(&wm)?;
    }
    // Column order: act-order sorts by decreasing diagonal (stable, so ties keep their order).
    let mut perm: Vec<usize> = (0..k).collect();
    if cfg.act_order {
        perm.sort_by(|&a, &b| hm[b * k + b].total_cmp(&hm[a * k + a]));
    }
    // Permuted weight (rows of k, column j = original perm[j]) and Hessian.
    let mut wp = vec![0.0; n * k];
    for r in 0..n {
        for (j, &c) in perm.iter().enumerate() {
            wp[r * k + j] = wm[r * k + c];
        }
    }
    let mut hp = vec![0.0; k * k];
    for (i, &a) in perm.iter().enumerate() {
        for (j, &b) in perm.iter().enumerate() {
            hp[i * k + j] = hm[a * k + b];
        }
    }
    let u = damped_inverse_factor(&mut hp, k, cfg.damp)?;
    let mut err = vec![0.0; n * block];
    let mut buf = Vec::with_capacity(g);
    for i1 in (0..k).step_by(block) {
        let i2 = (i1 + block).min(k);
        let cnt = i2 - i1;
        for i in 0..cnt {
            let col = i1 + i;
            let orig = perm[col];
            let gi = orig / g;
            if !static_params && orig % g == 0 {
                // A group starts (no act-order: orig = col): its parameters from the current weights.
                let c1 = (orig + g).min(k);
                for r in 0..n {
                    buf.clear();
                    buf.extend_from_slice(&wp[r * k + orig..r * k + c1]);
                    let (s, z) = scheme.params(&buf)?;
                    q.scales[r * ng + gi] = s as f32;
                    q.zeros[r * ng + gi] = z as u8;
                }
            }
            let d = u[col * k + col];
            let urow = &u[col * k..(col + 1) * k];
            for r in 0..n {
                let (s, z) = (q.scales[r * ng + gi] as f64, q.zeros[r * ng + gi] as u32);
                let x = wp[r * k + col];
                let c = scheme.code(x, s, z);
                q.codes[r * k + orig] = c;
                let e = (x - scheme.dequant(c, s, z)) / d;
                err[r * block + i] = e;
                let row = &mut wp[r * k..(r + 1) * k];
                for j in col + 1..i2 {
                    row[j] -= e * urow[j];
                }
            }
        }
        propagate_block_errors(&mut wp, n, k, &err, block, i1, i2, &u);
    }
    Ok(q)
}

/// Channels that never activate (`H_jj = 0`): their weight columns zeroed and `H_jj` set to 1, as
/// GPTQ's code (shared with BiLLM).
pub(crate) fn zero_dead_channels(hm: &mut [f64], wm: &mut [f64], n: usize, k: usize) {
    for j in 0..k {
        if hm[j * k + j] == 0.0 {
            hm[j * k + j] = 1.0;
            for r in 0..n {
                wm[r * k + j] = 0.0;
            }
        }
    }
}

/// `U`, the upper Cholesky factor of `(H + damp · mean(diag H) · I)⁻¹` (`hm` is dampened in place).
pub(crate) fn damped_inverse_factor(hm: &mut [f64], k: usize, damp: f64) -> Result<Vec<f64>> {
    let mean_diag = (0..k).map(|j| hm[j * k + j]).sum::<f64>() / k as f64;
    for j in 0..k {
        hm[j * k + j] += damp * mean_diag;
    }
    upper_cholesky_of_inverse(hm, k).ok_or_else(|| {
        Error::invalid(
            "h",
            "the dampened Hessian is not positive definite (calibration activations out of range?)",
        )
    })
}

/// The lazy update of a block's errors: `W[:, i2..] −= Err · U[i1..i2, i2..]`, `w` `[n][k]`, `err`
/// `[n][stride]` holding the block's `i2 − i1` column errors.
#[allow(clippy::too_many_arguments)]
pub(crate) fn propagate_block_errors(
    w: &mut [f64],
    n: usize,
    k: usize,
    err: &[f64],
    stride: usize,
    i1: usize,
    i2: usize,
    u: &[f64],
) {
    if i2 >= k {
        return;
    }
    for r in 0..n {
        let e = &err[r * stride..r * stride + (i2 - i1)];
        let row = &mut w[r * k..(r + 1) * k];
        for (i, &ei) in e.iter().enumerate() {
            if ei == 0.0 {
                continue;
            }
            let urow = &u[(i1 + i) * k..(i1 + i + 1) * k];
            for j in i2..k {
                row[j] -= ei * urow[j];
            }
        }
    }
}
