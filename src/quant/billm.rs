//! BiLLM (Huang et al. 2024, "BiLLM: Pushing the Limit of Post-Training Quantization for LLMs"): 1-bit
//! post-training quantisation of a linear layer from its calibration Hessian (issue 16, item 1). The
//! quantiser only: the packed format and the kernels that read it come next (`src/quant/DESIGN.md`).
//!
//! Per block of 128 input channels (the block is also the parameter group), in f64:
//! 1. Salience `w_ij² / U_jj²` (`U` the upper Cholesky factor of the dampened `H⁻¹`, as GPTQ), summed
//!    per column; the most salient columns are binarised residually (order 2: `B₁ = α₁·sign(w − μ₁) +
//!    μ₁`, then the same on `w − B₁`), per output row. Their number (0 to [`BillmConfig::max_salient`];
//!    the reference code tries 1 to 48, fusekit also 0, which a block of evenly spread weights takes) is
//!    the one with the lowest reconstruction error of the block (ties: the fewest).
//! 2. The other weights are split at a break point `p` (searched over the 10th … 90th percentiles of
//!    their `|w|`) into a concentrated group (`|w| < p`) and a sparse group (`|w| ≥ p`), each binarised
//!    with its own per-row `(α, μ)`; `p` is the one with the lowest reconstruction error.
//! 3. The block's quantisation error is propagated to the later blocks through `U`, as GPTQ's lazy
//!    block update (`W[:, later] −= Err · U[block, later]`, the errors taken column by column with the
//!    in-block propagation, so the later blocks get the optimal compensation for the block's fixed
//!    binarisation).
//!
//! Every `(α, μ)` is rounded to f16 (the paper's storage) before the signs are chosen, so
//! [`BillmWeight::dequantize`] is exactly what a kernel computes. Deterministic: no randomness, ties
//! broken by column index.

use super::gptq::{damped_inverse_factor, propagate_block_errors, zero_dead_channels, Hessian};
use crate::error::{Error, Result};

/// BiLLM's block (and parameter group) length in input channels.
pub const BILLM_BLOCK: usize = 128;

/// Settings of [`quantize_billm`].
///
/// ```
/// let c = fusekit::quant::BillmConfig::default();
/// assert_eq!((c.damp, c.max_salient, c.break_points), (0.01, 48, 81));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BillmConfig {
    /// Dampening added to the Hessian's diagonal, as a fraction of its mean (1 %).
    pub damp: f64,
    /// The most salient columns per block the search tries (the reference code searches 1 to 49
    /// exclusive, i.e. up to 48); at least 1, at most the block.
    pub max_salient: usize,
    /// Break-point candidates: the percentiles `10 + 80·i/(break_points − 1)`, `i = 0 … break_points −
    /// 1`, of the non-salient `|w|` (81: every whole percentile from 10 to 90); at least 2.
    pub break_points: usize,
}

impl Default for BillmConfig {
    fn default() -> Self {
        BillmConfig {
            damp: 0.01,
            max_salient: 48,
            break_points: 81,
        }
    }
}

/// A `(α, μ)` pair: the binarised value is `α·s + μ` with `s = ±1`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Binary {
    /// Scale (f16-representable, ≥ 0).
    pub alpha: f32,
    /// Mean (f16-representable).
    pub mu: f32,
}

impl Binary {
    fn value(self, positive: bool) -> f64 {
        let s = if positive { 1.0 } else { -1.0 };
        self.alpha as f64 * s + self.mu as f64
    }
}

/// A BiLLM-quantised `[n][k]` weight in unpacked form: per block of [`BILLM_BLOCK`] columns, its
/// salient columns and, per output row, four `(α, μ)` pairs; per weight a sign bit, a second sign bit
/// for salient columns, and for the others the group (concentrated or sparse) it belongs to.
#[derive(Clone, Debug, PartialEq)]
pub struct BillmWeight {
    /// Output channels.
    pub n: usize,
    /// Input channels.
    pub k: usize,
    /// Per block, its salient columns (absolute indices, ascending).
    pub salient: Vec<Vec<usize>>,
    /// `[n][k]` first sign bits (`true`: +1).
    pub sign: Vec<bool>,
    /// `[n][k]` residual sign bits of salient columns (`false` elsewhere).
    pub sign2: Vec<bool>,
    /// `[n][k]`: `true` where a non-salient weight is in the sparse group (`|w| ≥ p`).
    pub sparse: Vec<bool>,
    /// `[n][blocks][4]`: salient order 1, salient order 2, concentrated, sparse.
    pub params: Vec<[Binary; 4]>,
    /// Per block, the break point `p` chosen.
    pub break_point: Vec<f32>,
}

impl BillmWeight {
    /// Blocks of [`BILLM_BLOCK`] columns (the last may be shorter).
    pub fn blocks(&self) -> usize {
        self.k.div_ceil(BILLM_BLOCK)
    }

    /// The `[n][k]` weights the format stands for, in f32: `α₁s₁ + μ₁ + α₂s₂ + μ₂` in salient columns,
    /// `αs + μ` of the weight's group elsewhere (each term f16-representable, summed in f64).
    ///
    /// ```
    /// use fusekit::quant::{quantize_billm, BillmConfig, Hessian};
    /// let (n, k) = (4, 32);
    /// let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 23) as f32 - 11.0) / 10.0).collect();
    /// let x: Vec<f32> = (0..16 * k).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect();
    /// let mut h = Hessian::new(k)?;
    /// h.add(&x)?;
    /// let q = quantize_billm(&w, n, k, &h, &BillmConfig::default())?;
    /// assert_eq!(q.dequantize().len(), n * k);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn dequantize(&self) -> Vec<f32> {
        let (n, k, nb) = (self.n, self.k, self.blocks());
        let mut out = vec![0.0f32; n * k];
        let mut is_salient = vec![false; k];
        for cols in &self.salient {
            for &c in cols {
                is_salient[c] = true;
            }
        }
        for r in 0..n {
            for (c, &sal) in is_salient.iter().enumerate() {
                let p = &self.params[r * nb + c / BILLM_BLOCK];
                let i = r * k + c;
                out[i] = if sal {
                    (p[0].value(self.sign[i]) + p[1].value(self.sign2[i])) as f32
                } else if self.sparse[i] {
                    p[3].value(self.sign[i]) as f32
                } else {
                    p[2].value(self.sign[i]) as f32
                };
            }
        }
        out
    }
}

fn f16_round(v: f64) -> f32 {
    half::f16::from_f64(v).to_f32()
}

/// Binarises the values `vals` (one row's members of a group): `μ = mean`, `α = mean|v − μ|`, both
/// rounded to f16 before use; returns the pair and writes each value's sign (`v ≥ μ`).
fn binarize(vals: &[f64], signs: &mut [bool]) -> Binary {
    if vals.is_empty() {
        return Binary::default();
    }
    let mu = f16_round(vals.iter().sum::<f64>() / vals.len() as f64);
    let alpha =
        f16_round(vals.iter().map(|&v| (v - mu as f64).abs()).sum::<f64>() / vals.len() as f64);
    for (s, &v) in signs.iter_mut().zip(vals) {
        *s = v >= mu as f64;
    }
    Binary { alpha, mu }
}

/// Squared error of binarising `vals` as [`binarize`] does.
fn binarize_err(vals: &[f64], scratch: &mut Vec<bool>) -> f64 {
    scratch.clear();
    scratch.resize(vals.len(), false);
    let b = binarize(vals, scratch);
    vals.iter()
        .zip(scratch.iter())
        .map(|(&v, &s)| (v - b.value(s)).powi(2))
        .sum()
}

/// Residual binarisation of order 2 of one row's salient values: the pairs and both sign vectors.
fn residual2(vals: &[f64], s1: &mut [bool], s2: &mut [bool]) -> (Binary, Binary) {
    let b1 = binarize(vals, s1);
    let res: Vec<f64> = vals
        .iter()
        .zip(s1.iter())
        .map(|(&v, &s)| v - b1.value(s))
        .collect();
    let b2 = binarize(&res, s2);
    (b1, b2)
}

fn residual2_err(vals: &[f64]) -> f64 {
    let mut s1 = vec![false; vals.len()];
    let mut s2 = vec![false; vals.len()];
    let (b1, b2) = residual2(vals, &mut s1, &mut s2);
    vals.iter()
        .enumerate()
        .map(|(i, &v)| (v - b1.value(s1[i]) - b2.value(s2[i])).powi(2))
        .sum()
}

/// The `q`-quantile (0..=1) of sorted values, by linear interpolation.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// One block's binarisation: `wb` is `[n][cnt]` (the block's current weights), `u_diag` the block's
/// `U_jj`. Returns the salient columns (block-relative), break point, and fills `out` (`[n][cnt]`
/// dequantised) and the bits.
struct BlockResult {
    salient: Vec<usize>,
    break_point: f64,
    params: Vec<[Binary; 4]>,
    sign: Vec<bool>,
    sign2: Vec<bool>,
    sparse: Vec<bool>,
    q: Vec<f64>,
}

fn binarize_block(
    wb: &[f64],
    n: usize,
    cnt: usize,
    u_diag: &[f64],
    cfg: &BillmConfig,
) -> BlockResult {
    // Column salience: Σ_r w² / U_jj².
    let mut sal: Vec<(f64, usize)> = (0..cnt)
        .map(|j| {
            let d = u_diag[j] * u_diag[j];
            ((0..n).map(|r| wb[r * cnt + j].powi(2)).sum::<f64>() / d, j)
        })
        .collect();
    sal.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let order: Vec<usize> = sal.iter().map(|s| s.1).collect();
    // The number of salient columns: lowest error of residual(salient) + binarise(rest), per row.
    let max_c = cfg.max_salient.min(cnt);
    let mut best = (f64::INFINITY, 0usize);
    let mut scratch = Vec::new();
    let mut is_sal = vec![false; cnt];
    let (mut sv, mut rv) = (Vec::with_capacity(cnt), Vec::with_capacity(cnt));
    for c in 0..=max_c {
        is_sal.iter_mut().for_each(|s| *s = false);
        order[..c].iter().for_each(|&j| is_sal[j] = true);
        let mut e = 0.0;
        for r in 0..n {
            sv.clear();
            rv.clear();
            for j in 0..cnt {
                if is_sal[j] {
                    sv.push(wb[r * cnt + j]);
                } else {
                    rv.push(wb[r * cnt + j]);
                }
            }
            e += residual2_err(&sv) + binarize_err(&rv, &mut scratch);
        }
        if e < best.0 {
            best = (e, c);
        }
    }
    let mut salient: Vec<usize> = order[..best.1].to_vec();
    salient.sort_unstable();
    is_sal.iter_mut().for_each(|s| *s = false);
    salient.iter().for_each(|&j| is_sal[j] = true);
    // The break point: percentiles of the non-salient |w| of the block.
    let mut mags: Vec<f64> = (0..n)
        .flat_map(|r| (0..cnt).filter(|&j| !is_sal[j]).map(move |j| (r, j)))
        .map(|(r, j)| wb[r * cnt + j].abs())
        .collect();
    mags.sort_by(f64::total_cmp);
    let nbp = cfg.break_points;
    let mut best_p = (f64::INFINITY, 0.0f64);
    let (mut cv, mut spv) = (Vec::with_capacity(cnt), Vec::with_capacity(cnt));
    for i in 0..nbp {
        let p = quantile(&mags, (10.0 + 80.0 * i as f64 / (nbp - 1) as f64) / 100.0);
        let mut e = 0.0;
        for r in 0..n {
            cv.clear();
            spv.clear();
            for j in (0..cnt).filter(|&j| !is_sal[j]) {
                let v = wb[r * cnt + j];
                if v.abs() < p {
                    cv.push(v);
                } else {
                    spv.push(v);
                }
            }
            e += binarize_err(&cv, &mut scratch) + binarize_err(&spv, &mut scratch);
        }
        if e < best_p.0 {
            best_p = (e, p);
        }
    }
    let p = best_p.1;
    // The final binarisation with the chosen columns and break point.
    let mut res = BlockResult {
        salient,
        break_point: p,
        params: vec![[Binary::default(); 4]; n],
        sign: vec![false; n * cnt],
        sign2: vec![false; n * cnt],
        sparse: vec![false; n * cnt],
        q: vec![0.0; n * cnt],
    };
    let mut s1 = Vec::new();
    let mut s2 = Vec::new();
    for r in 0..n {
        let row = &wb[r * cnt..(r + 1) * cnt];
        let groups: [Vec<usize>; 3] = [
            (0..cnt).filter(|&j| is_sal[j]).collect(),
            (0..cnt)
                .filter(|&j| !is_sal[j] && row[j].abs() < p)
                .collect(),
            (0..cnt)
                .filter(|&j| !is_sal[j] && row[j].abs() >= p)
                .collect(),
        ];
        let vals = |g: &[usize]| -> Vec<f64> { g.iter().map(|&j| row[j]).collect() };
        let sv = vals(&groups[0]);
        s1.clear();
        s1.resize(sv.len(), false);
        s2.clear();
        s2.resize(sv.len(), false);
        let (b1, b2) = residual2(&sv, &mut s1, &mut s2);
        for (t, &j) in groups[0].iter().enumerate() {
            res.sign[r * cnt + j] = s1[t];
            res.sign2[r * cnt + j] = s2[t];
            res.q[r * cnt + j] = b1.value(s1[t]) + b2.value(s2[t]);
        }
        let mut pr = [b1, b2, Binary::default(), Binary::default()];
        for (gi, g) in groups[1..].iter().enumerate() {
            let gv = vals(g);
            s1.clear();
            s1.resize(gv.len(), false);
            let b = binarize(&gv, &mut s1);
            pr[2 + gi] = b;
            for (t, &j) in g.iter().enumerate() {
                res.sign[r * cnt + j] = s1[t];
                res.sparse[r * cnt + j] = gi == 1;
                res.q[r * cnt + j] = b.value(s1[t]);
            }
        }
        res.params[r] = pr;
    }
    res
}

/// BiLLM quantisation of a `[n][k]` weight `w` with the layer's Hessian `h` (`k` input channels, at
/// least one calibration row). Channels that never activate (`H_jj = 0`) are zeroed first, as GPTQ.
/// Errors: shapes, non-finite weights, an empty Hessian, settings out of range, a Hessian that is not
/// positive definite after dampening.
///
/// ```
/// use fusekit::quant::{binarize_sign_mean, quantize_billm, relative_output_error, BillmConfig, Hessian};
/// let (n, k, rows) = (16, 256, 128);
/// let x: Vec<f32> = (0..rows * k).map(|i| (((i * 7919) % 1009) as f32 / 504.0 - 1.0)).collect();
/// let w: Vec<f32> = (0..n * k).map(|i| {
///     let v = ((i * 2654435761usize) % 1000) as f32 / 500.0 - 1.0;
///     if i % k == 3 { 8.0 * v } else { v * v * v } // one salient input channel
/// }).collect();
/// let mut h = Hessian::new(k)?;
/// h.add(&x)?;
/// let q = quantize_billm(&w, n, k, &h, &BillmConfig::default())?;
/// let e_billm = relative_output_error(&x, &w, &q.dequantize(), k)?;
/// let e_sign = relative_output_error(&x, &w, &binarize_sign_mean(&w, n, k)?, k)?;
/// assert!(e_billm < e_sign);
/// # Ok::<(), fusekit::Error>(())
/// ```
pub fn quantize_billm(
    w: &[f32],
    n: usize,
    k: usize,
    h: &Hessian,
    cfg: &BillmConfig,
) -> Result<BillmWeight> {
    if n == 0 || k == 0 || w.len() != n * k {
        return Err(Error::shape(
            "w",
            format!("[n][k] with n, k >= 1 (n = {n}, k = {k})"),
            format!("{} values", w.len()),
        ));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(
            "w",
            format!("weight ({}, {}) is {}", i / k, i % k, w[i]),
        ));
    }
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
    if !(cfg.damp > 0.0 && cfg.damp.is_finite()) {
        return Err(Error::invalid(
            "cfg.damp",
            format!("dampening must be a positive fraction, got {}", cfg.damp),
        ));
    }
    if cfg.max_salient == 0 || cfg.max_salient > BILLM_BLOCK || cfg.break_points < 2 {
        return Err(Error::invalid(
            "cfg",
            format!(
                "max_salient {} (1..=128) and break_points {} (at least 2)",
                cfg.max_salient, cfg.break_points
            ),
        ));
    }
    let mut wm: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    let mut hm = h.matrix();
    zero_dead_channels(&mut hm, &mut wm, n, k);
    let u = damped_inverse_factor(&mut hm, k, cfg.damp)?;
    let nb = k.div_ceil(BILLM_BLOCK);
    let mut out = BillmWeight {
        n,
        k,
        salient: Vec::with_capacity(nb),
        sign: vec![false; n * k],
        sign2: vec![false; n * k],
        sparse: vec![false; n * k],
        params: vec![[Binary::default(); 4]; n * nb],
        break_point: Vec::with_capacity(nb),
    };
    let mut err = vec![0.0; n * BILLM_BLOCK];
    for b in 0..nb {
        let (i1, i2) = (b * BILLM_BLOCK, ((b + 1) * BILLM_BLOCK).min(k));
        let cnt = i2 - i1;
        let mut wb = vec![0.0; n * cnt];
        for r in 0..n {
            wb[r * cnt..(r + 1) * cnt].copy_from_slice(&wm[r * k + i1..r * k + i2]);
        }
        let u_diag: Vec<f64> = (i1..i2).map(|j| u[j * k + j]).collect();
        let res = binarize_block(&wb, n, cnt, &u_diag, cfg);
        out.salient
            .push(res.salient.iter().map(|&j| i1 + j).collect());
        out.break_point.push(res.break_point as f32);
        for r in 0..n {
            out.params[r * nb + b] = res.params[r];
            for j in 0..cnt {
                out.sign[r * k + i1 + j] = res.sign[r * cnt + j];
                out.sign2[r * k + i1 + j] = res.sign2[r * cnt + j];
                out.sparse[r * k + i1 + j] = res.sparse[r * cnt + j];
            }
        }
        // Errors column by column with the in-block propagation (the binarisation fixed), then the
        // lazy update of every later column.
        for r in 0..n {
            let row = &mut wb[r * cnt..(r + 1) * cnt];
            for i in 0..cnt {
                let col = i1 + i;
                let e = (row[i] - res.q[r * cnt + i]) / u[col * k + col];
                err[r * BILLM_BLOCK + i] = e;
                for j in i + 1..cnt {
                    row[j] -= e * u[col * k + i1 + j];
                }
            }
        }
        propagate_block_errors(&mut wm, n, k, &err, BILLM_BLOCK, i1, i2, &u);
    }
    Ok(out)
}

/// The plain 1-bit baseline BiLLM is compared with: each row `α·sign(w)` with `α = mean|w|` of the row
/// (XNOR-Net's scale), returned dense `[n][k]`.
///
/// ```
/// let q = fusekit::quant::binarize_sign_mean(&[1.0, -3.0, 2.0, 2.0], 2, 2)?;
/// assert_eq!(q, vec![2.0, -2.0, 2.0, 2.0]);
/// # Ok::<(), fusekit::Error>(())
/// ```
pub fn binarize_sign_mean(w: &[f32], n: usize, k: usize) -> Result<Vec<f32>> {
    if n == 0 || k == 0 || w.len() != n * k {
        return Err(Error::shape(
            "w",
            format!("[n][k] with n, k >= 1 (n = {n}, k = {k})"),
            format!("{} values", w.len()),
        ));
    }
    let mut out = vec![0.0f32; n * k];
    for (o, row) in out.chunks_exact_mut(k).zip(w.chunks_exact(k)) {
        let a = (row.iter().map(|v| v.abs() as f64).sum::<f64>() / k as f64) as f32;
        for (d, &v) in o.iter_mut().zip(row) {
            *d = if v >= 0.0 { a } else { -a };
        }
    }
    Ok(out)
}
