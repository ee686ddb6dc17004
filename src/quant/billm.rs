//! BiLLM (Huang et al. 2024, "BiLLM: Pushing the Limit of Post-Training Quantization for LLMs"): 1-bit
//! post-training quantisation of a linear layer from its calibration Hessian (issue 16, item 1), and its
//! packed form [`PackedBillm`] (item 2). The kernels that read it are in `billm_gemm.rs`.
//!
//! Per block of 128 input channels (the block is also the parameter group), in f64, as the reference
//! code (`Aaronhuang-778/BiLLM`: `bigptq.py`, `utils/autosearch.py`) does it:
//! 1. The salience matrix `S = w² / U_jj²` (`U` the upper Cholesky factor of the dampened `H⁻¹`, as
//!    GPTQ); columns ranked by their summed salience. The number `c` of salient columns (1 to
//!    [`BillmConfig::max_salient`], 49 as the reference) is the one whose split of `S` into the top-`c`
//!    columns and the rest, each binarised residually per row, approximates `S` best: a two-group
//!    clustering of the salience (an error on the weights would always prefer more columns).
//! 2. The break point `p`: over the 10th … 90th percentiles of `S` with the salient columns zeroed, the
//!    one whose split of the non-salient `S` into `S < p` (concentrated) and `S ≥ p` (sparse), each
//!    binarised per row, approximates `S` best.
//! 3. The weights are then binarised per row: the salient columns residually (order 2: `B₁ =
//!    α₁·sign(w − μ₁) + μ₁`, then the same on `w − B₁`), the concentrated and sparse groups each with
//!    its own `(α, μ)`.
//! 4. The block's quantisation error is propagated to the later blocks through `U`
//!    (`W[:, later] −= Err · U[block, later]`). One deliberate difference from the reference code: the
//!    errors are taken column by column with the in-block propagation, as GPTQ does (the optimal
//!    compensation of the later blocks for the block's fixed binarisation); the reference takes every
//!    column's error against the block's uncompensated weights. A value equal to its group's mean gets
//!    sign +1 (the reference's `sign(0) = 0` has no 1-bit encoding).
//!
//! Every `(α, μ)` is rounded to f16 (the paper's storage) before the signs are chosen, so
//! [`BillmWeight::dequantize`] is exactly what a kernel computes. Deterministic: no randomness, ties
//! broken by column index.

use super::gptq::{damped_inverse_factor, propagate_block_errors, zero_dead_channels, Hessian};
use super::safetensors::{
    halves_le, le_halves, le_words, words_le, LayerFileReader, LayerFileWriter,
};
use crate::error::{Error, Result};

/// BiLLM's block (and parameter group) length in input channels.
pub const BILLM_BLOCK: usize = 128;

/// The most break-point candidates [`BillmConfig::break_points`] may ask for.
const BILLM_MAX_BREAK_POINTS: usize = 1001;

/// Settings of [`quantize_billm`].
///
/// ```
/// let c = fusekit::quant::BillmConfig::default();
/// assert_eq!((c.damp, c.max_salient, c.break_points), (0.01, 49, 81));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BillmConfig {
    /// Dampening added to the Hessian's diagonal, as a fraction of its mean (1 %).
    pub damp: f64,
    /// The most salient columns per block the search tries (from 1; the reference code's 49); at
    /// least 1, at most the block.
    pub max_salient: usize,
    /// Break-point candidates: the percentiles `10 + 80·i/(break_points − 1)`, `i = 0 … break_points −
    /// 1`, of the block's salience with the salient columns zeroed (81: every whole percentile from 10
    /// to 90, as the reference); at least 2.
    pub break_points: usize,
}

impl Default for BillmConfig {
    fn default() -> Self {
        BillmConfig {
            damp: 0.01,
            max_salient: 49,
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
    /// `[n][k]`: `true` where a non-salient weight is in the sparse group (salience `≥ p`).
    pub sparse: Vec<bool>,
    /// `[n][blocks][4]`: salient order 1, salient order 2, concentrated, sparse.
    pub params: Vec<[Binary; 4]>,
    /// Per block, the break point `p` chosen (a salience value `w² / U_jj²`).
    pub break_point: Vec<f64>,
}

/// Bits per weight of a [`BillmWeight`], counted two ways.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BitsPerWeight {
    /// The paper's count: one sign bit per weight plus the residual sign bit of each salient weight
    /// (BiLLM's "1.08 bits"); no bitmap, no column indices, no `(α, μ)`.
    pub paper: f64,
    /// Every bit the packed layer stores: the sign bits, the residual sign bits, the group bitmap of
    /// the non-salient weights, a 128-bit salient-column mask per block, and four f16 `(α, μ)` pairs
    /// per row and block (128 bits per row and block).
    pub strict: f64,
}

impl BillmWeight {
    /// Blocks of [`BILLM_BLOCK`] columns (the last may be shorter).
    pub fn blocks(&self) -> usize {
        self.k.div_ceil(BILLM_BLOCK)
    }

    /// Salient columns over all blocks.
    pub fn salient_columns(&self) -> usize {
        self.salient.iter().map(Vec::len).sum()
    }

    /// Bits per weight, the paper's way and strictly (see [`BitsPerWeight`]). With `c` salient columns
    /// of `k` and `b` blocks: paper `1 + c/k`, strict `2 + 128·b·(n + 1)/(n·k)`: about 3 bits for
    /// `k` a multiple of 128.
    ///
    /// ```
    /// use fusekit::quant::{quantize_billm, BillmConfig, Hessian};
    /// let (n, k) = (64, 256);
    /// let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 23) as f32 - 11.0) / 10.0).collect();
    /// let x: Vec<f32> = (0..64 * k).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect();
    /// let mut h = Hessian::new(k)?;
    /// h.add(&x)?;
    /// let q = quantize_billm(&w, n, k, &h, &BillmConfig::default())?;
    /// let b = q.bits_per_weight();
    /// assert_eq!(b.paper, 1.0 + q.salient_columns() as f64 / k as f64);
    /// assert!((b.strict - (2.0 + 128.0 * 2.0 * 65.0 / (64.0 * 256.0))).abs() < 1e-12);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn bits_per_weight(&self) -> BitsPerWeight {
        let (n, k, nb) = (self.n as f64, self.k as f64, self.blocks() as f64);
        let c = self.salient_columns() as f64;
        let weights = n * k;
        BitsPerWeight {
            paper: (weights + n * c) / weights,
            strict: (weights + n * c + n * (k - c) + 128.0 * nb + 128.0 * n * nb) / weights,
        }
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
    let (alpha, mu) = binarize_f64(vals, signs, true);
    Binary {
        alpha: alpha as f32,
        mu: mu as f32,
    }
}

/// [`binarize`] in f64, `(α, μ)` rounded to f16 only when `round` (the searches, which binarise the
/// salience matrix, do not round: its values can lie outside f16's range).
fn binarize_f64(vals: &[f64], signs: &mut [bool], round: bool) -> (f64, f64) {
    if vals.is_empty() {
        return (0.0, 0.0);
    }
    let r = |v: f64| if round { f16_round(v) as f64 } else { v };
    let mu = r(vals.iter().sum::<f64>() / vals.len() as f64);
    let alpha = r(vals.iter().map(|&v| (v - mu).abs()).sum::<f64>() / vals.len() as f64);
    for (s, &v) in signs.iter_mut().zip(vals) {
        *s = v >= mu;
    }
    (alpha, mu)
}

/// Squared error of the residual binarisation of order `order` of `vals`, unrounded (the searches).
fn search_err(vals: &[f64], order: usize, scratch: &mut Vec<bool>, res: &mut Vec<f64>) -> f64 {
    res.clear();
    res.extend_from_slice(vals);
    scratch.clear();
    scratch.resize(vals.len(), false);
    for _ in 0..order {
        let (a, m) = binarize_f64(res, scratch, false);
        for (v, &sg) in res.iter_mut().zip(scratch.iter()) {
            *v -= if sg { a + m } else { m - a };
        }
    }
    res.iter().map(|v| v * v).sum()
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
    // The salience matrix S = w² / U_jj², and the columns ranked by their summed salience.
    let sal_m: Vec<f64> = (0..n * cnt)
        .map(|i| wb[i].powi(2) / u_diag[i % cnt].powi(2))
        .collect();
    let mut sal: Vec<(f64, usize)> = (0..cnt)
        .map(|j| ((0..n).map(|r| sal_m[r * cnt + j]).sum::<f64>(), j))
        .collect();
    sal.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let order: Vec<usize> = sal.iter().map(|s| s.1).collect();
    // The number of salient columns, as the reference code chooses it: the split of S into the top-c
    // columns and the rest, each binarised residually (order 2) per row, with the lowest squared
    // error of S (a two-group clustering of the salience, not of the weights).
    let max_c = cfg.max_salient.min(cnt);
    let mut best = (f64::INFINITY, 1usize);
    let (mut scratch, mut res) = (Vec::new(), Vec::new());
    let mut is_sal = vec![false; cnt];
    let (mut sv, mut rv) = (Vec::with_capacity(cnt), Vec::with_capacity(cnt));
    for c in 1..=max_c {
        is_sal.iter_mut().for_each(|s| *s = false);
        order[..c].iter().for_each(|&j| is_sal[j] = true);
        let mut e = 0.0;
        for r in 0..n {
            sv.clear();
            rv.clear();
            for j in 0..cnt {
                if is_sal[j] {
                    sv.push(sal_m[r * cnt + j]);
                } else {
                    rv.push(sal_m[r * cnt + j]);
                }
            }
            e += search_err(&sv, 2, &mut scratch, &mut res)
                + search_err(&rv, 2, &mut scratch, &mut res);
        }
        if e < best.0 {
            best = (e, c);
        }
    }
    let mut salient: Vec<usize> = order[..best.1].to_vec();
    salient.sort_unstable();
    is_sal.iter_mut().for_each(|s| *s = false);
    salient.iter().for_each(|&j| is_sal[j] = true);
    // The break point: percentiles of S over the block with the salient columns zeroed (as the
    // reference code takes them), each candidate judged by the error of binarising S's non-salient
    // part as two groups (S < p, S ≥ p).
    let mut mags: Vec<f64> = (0..n * cnt)
        .map(|i| if is_sal[i % cnt] { 0.0 } else { sal_m[i] })
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
                let v = sal_m[r * cnt + j];
                if v < p {
                    cv.push(v);
                } else {
                    spv.push(v);
                }
            }
            e += search_err(&cv, 1, &mut scratch, &mut res)
                + search_err(&spv, 1, &mut scratch, &mut res);
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
                .filter(|&j| !is_sal[j] && sal_m[r * cnt + j] < p)
                .collect(),
            (0..cnt)
                .filter(|&j| !is_sal[j] && sal_m[r * cnt + j] >= p)
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
    if n == 0 || k == 0 || n.checked_mul(k) != Some(w.len()) {
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
    if cfg.max_salient == 0
        || cfg.max_salient > BILLM_BLOCK
        || !(2..=BILLM_MAX_BREAK_POINTS).contains(&cfg.break_points)
    {
        return Err(Error::invalid(
            "cfg",
            format!(
                "max_salient {} (1..=128) and break_points {} (2..=1001)",
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
        if let Some(r) = (0..n).find(|&r| {
            res.params[r]
                .iter()
                .any(|p| !p.alpha.is_finite() || !p.mu.is_finite())
        }) {
            return Err(Error::invalid(
                "w",
                format!(
                    "block {b}, row {r}: a binarisation parameter (α, μ) overflows f16 \
                     (weights, after compensation, beyond ±65504)"
                ),
            ));
        }
        out.salient
            .push(res.salient.iter().map(|&j| i1 + j).collect());
        out.break_point.push(res.break_point);
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
    if n == 0 || k == 0 || n.checked_mul(k) != Some(w.len()) {
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

/// Version of [`PackedBillm`]'s layout; a reader of another version refuses it.
pub const BILLM_FORMAT_VERSION: u32 = 2;

/// Where column `j` (0 to 127) of a block lives in the four words of a row's bit plane (format 2):
/// word `j / 32`, bit `(j % 32) / 2 + 16·(j % 2)`. The even columns of each 32 fill the low half-word
/// and the odd ones the high half, so the column pair `(2i, 2i + 1)` sits at bits `(i, i + 16)`: one
/// rotation and one AND put it where a bf16/f16 pair keeps its exponent bit 14 (the kernel's 0 / 2.0
/// operands, `kernels/quant/billm.cu`). Format 1 stored column `j` at bit `j % 32`.
///
/// ```
/// use fusekit::quant::billm_bit;
/// assert_eq!(billm_bit(0), (0, 0));
/// assert_eq!(billm_bit(1), (0, 16));
/// assert_eq!(billm_bit(30), (0, 15));
/// assert_eq!(billm_bit(127), (3, 31));
/// ```
pub fn billm_bit(j: usize) -> (usize, u32) {
    let c = j % 32;
    (j / 32, (c / 2 + 16 * (c % 2)) as u32)
}

/// A [`BillmWeight`] packed for the kernels (format version [`BILLM_FORMAT_VERSION`]). K is padded to
/// a multiple of 128 (the kernels zero-fill activations past K, so padded weights never contribute;
/// their bits are 0). Per block `b` of 128 columns and output row `r`, with column `j` of the block at
/// word `w` and bit `i` given by [`billm_bit`] (even columns of each 32 in the low half-word, odd ones
/// in the high half):
/// - `signs[(b·n + r)·4 + w]`, bit `i`: the first sign of column `128b + j` (1: +1);
/// - `second[(b·n + r)·4 + w]`, the same bit: the residual sign where the column is salient, else 1
///   when the weight is in the sparse group (salience `≥ p`): the two never coexist, so one bit
///   serves;
/// - `params[(b·n + r)·8 ..][..8]`: f16 bits of `α₁, μ₁, α₂, μ₂` (salient, orders 1 and 2),
///   `α_c, μ_c` (concentrated), `α_s, μ_s` (sparse);
/// - and per block, `salient[b·4 + w]`: the salient-column mask, shared by all rows.
///
/// A GEMV row-block is then `α₁·Σ_S s₁x + μ₁·Σ_S x + α₂·Σ_S s₂x + μ₂·Σ_S x + α_c·Σ_C s x + μ_c·Σ_C x +
/// α_s·Σ_P s x + μ_s·Σ_P x` over the salient (S), concentrated (C) and sparse (P) columns: signed sums
/// of activations selected by bit masks, then eight multiply-adds. For K a multiple of 128,
/// [`PackedBillm::bytes`] is exactly [`BitsPerWeight::strict`] · n · k / 8.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedBillm {
    n: usize,
    k: usize,
    /// `[blocks][n][4]` first sign bits.
    pub signs: Vec<u32>,
    /// `[blocks][n][4]` second bits (residual sign or sparse-group flag).
    pub second: Vec<u32>,
    /// `[blocks][4]` salient-column masks.
    pub salient: Vec<u32>,
    /// `[blocks][n][8]` f16 bits of the four `(α, μ)` pairs.
    pub params: Vec<u16>,
}

impl PackedBillm {
    /// Packs `q` (which must be consistent: see [`PackedBillm::validate`] for what is checked after).
    ///
    /// ```
    /// use fusekit::quant::{quantize_billm, BillmConfig, Hessian, PackedBillm};
    /// let (n, k) = (8, 256);
    /// let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 23) as f32 - 11.0) / 10.0).collect();
    /// let x: Vec<f32> = (0..32 * k).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect();
    /// let mut h = Hessian::new(k)?;
    /// h.add(&x)?;
    /// let q = quantize_billm(&w, n, k, &h, &BillmConfig::default())?;
    /// let p = PackedBillm::pack(&q)?;
    /// assert_eq!(p.dequantize(), q.dequantize());
    /// assert_eq!(p.bytes() as f64, q.bits_per_weight().strict * (n * k) as f64 / 8.0);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn pack(q: &BillmWeight) -> Result<Self> {
        let (n, k, nb) = (q.n, q.k, q.blocks());
        if n == 0
            || k == 0
            || q.sign.len() != n * k
            || q.sign2.len() != n * k
            || q.sparse.len() != n * k
            || q.params.len() != n * nb
            || q.salient.len() != nb
        {
            return Err(Error::shape(
                "q",
                format!("a consistent BiLLM weight of {n} x {k}"),
                "buffers of other lengths".to_string(),
            ));
        }
        let mut p = PackedBillm {
            n,
            k,
            signs: vec![0; nb * n * 4],
            second: vec![0; nb * n * 4],
            salient: vec![0; nb * 4],
            params: vec![0; nb * n * 8],
        };
        let mut is_sal = vec![false; k];
        for (b, cols) in q.salient.iter().enumerate() {
            for &c in cols {
                if c >= k || c / BILLM_BLOCK != b {
                    return Err(Error::invalid(
                        "q.salient",
                        format!("column {c} listed in block {b} of a weight of {k} columns"),
                    ));
                }
                is_sal[c] = true;
                let j = c % BILLM_BLOCK;
                let (w, bit) = billm_bit(j);
                p.salient[b * 4 + w] |= 1 << bit;
            }
        }
        for r in 0..n {
            for (c, &sal) in is_sal.iter().enumerate() {
                let (b, j) = (c / BILLM_BLOCK, c % BILLM_BLOCK);
                let (w, bit) = billm_bit(j);
                let word = (b * n + r) * 4 + w;
                let i = r * k + c;
                if q.sign[i] {
                    p.signs[word] |= 1 << bit;
                }
                let second = if sal { q.sign2[i] } else { q.sparse[i] };
                if second {
                    p.second[word] |= 1 << bit;
                }
            }
            for b in 0..nb {
                for (t, pair) in q.params[r * nb + b].iter().enumerate() {
                    p.params[(b * n + r) * 8 + 2 * t] = half::f16::from_f32(pair.alpha).to_bits();
                    p.params[(b * n + r) * 8 + 2 * t + 1] = half::f16::from_f32(pair.mu).to_bits();
                }
            }
        }
        p.validate()?;
        Ok(p)
    }

    /// Output channels.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input channels.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes stored: signs, second bits, masks and parameters.
    pub fn bytes(&self) -> usize {
        4 * (self.signs.len() + self.second.len() + self.salient.len()) + 2 * self.params.len()
    }

    /// Checks the buffers against the header: lengths, padding bits zero, every parameter finite and
    /// every `α ≥ 0`. Any mismatch is an `Err` naming it.
    ///
    /// ```
    /// use fusekit::quant::{quantize_billm, BillmConfig, Hessian, PackedBillm};
    /// let (n, k) = (4, 100);
    /// let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 23) as f32 - 11.0) / 10.0).collect();
    /// let mut h = Hessian::new(k)?;
    /// h.add(&(0..16 * k).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect::<Vec<_>>())?;
    /// let mut p = PackedBillm::pack(&quantize_billm(&w, n, k, &h, &BillmConfig::default())?)?;
    /// p.signs[3] |= 1 << 31; // column 127: padding
    /// assert!(p.validate().is_err());
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn validate(&self) -> Result<()> {
        let (n, k) = (self.n, self.k);
        let nb = k.div_ceil(BILLM_BLOCK);
        let want = [
            ("signs", self.signs.len(), nb * n * 4),
            ("second", self.second.len(), nb * n * 4),
            ("salient", self.salient.len(), nb * 4),
            ("params", self.params.len(), nb * n * 8),
        ];
        for (name, got, expected) in want {
            if got != expected {
                return Err(Error::shape(
                    "packed",
                    format!("{name}: {expected} entries for {n} x {k}"),
                    format!("{got}"),
                ));
            }
        }
        // Padding columns of the last block: no bits set.
        let tail = k - (nb - 1) * BILLM_BLOCK;
        let pad_mask = |w: usize| -> u32 {
            (tail..BILLM_BLOCK)
                .map(billm_bit)
                .filter(|&(word, _)| word == w)
                .fold(0, |m, (_, bit)| m | 1 << bit)
        };
        let b = nb - 1;
        for w in 0..4 {
            let m = pad_mask(w);
            let bad = self.salient[b * 4 + w] & m != 0
                || (0..n).any(|r| {
                    let i = (b * n + r) * 4 + w;
                    (self.signs[i] | self.second[i]) & m != 0
                });
            if bad {
                return Err(Error::invalid(
                    "packed",
                    format!("bits set in the padding columns of the last block (k = {k})"),
                ));
            }
        }
        for (i, chunk) in self.params.chunks_exact(2).enumerate() {
            let (a, mu) = (
                half::f16::from_bits(chunk[0]).to_f32(),
                half::f16::from_bits(chunk[1]).to_f32(),
            );
            if !a.is_finite() || !mu.is_finite() || a < 0.0 {
                return Err(Error::invalid(
                    "packed",
                    format!("parameter pair {i}: (α, μ) = ({a}, {mu}): α must be finite and ≥ 0, μ finite"),
                ));
            }
        }
        Ok(())
    }

    /// The [`BillmWeight`] the buffers encode (break points are not stored: 0).
    pub fn unpack(&self) -> BillmWeight {
        let (n, k) = (self.n, self.k);
        let nb = k.div_ceil(BILLM_BLOCK);
        let bit = |v: &[u32], b: usize, r: Option<usize>, j: usize| -> bool {
            let base = match r {
                Some(r) => (b * n + r) * 4,
                None => b * 4,
            };
            let (w, i) = billm_bit(j);
            v[base + w] >> i & 1 == 1
        };
        let salient: Vec<Vec<usize>> = (0..nb)
            .map(|b| {
                (b * BILLM_BLOCK..((b + 1) * BILLM_BLOCK).min(k))
                    .filter(|&c| bit(&self.salient, b, None, c % BILLM_BLOCK))
                    .collect()
            })
            .collect();
        let mut q = BillmWeight {
            n,
            k,
            salient,
            sign: vec![false; n * k],
            sign2: vec![false; n * k],
            sparse: vec![false; n * k],
            params: vec![[Binary::default(); 4]; n * nb],
            break_point: vec![0.0; nb],
        };
        for r in 0..n {
            for c in 0..k {
                let (b, j) = (c / BILLM_BLOCK, c % BILLM_BLOCK);
                let i = r * k + c;
                q.sign[i] = bit(&self.signs, b, Some(r), j);
                let second = bit(&self.second, b, Some(r), j);
                if bit(&self.salient, b, None, j) {
                    q.sign2[i] = second;
                } else {
                    q.sparse[i] = second;
                }
            }
            for b in 0..nb {
                let p = &self.params[(b * n + r) * 8..(b * n + r + 1) * 8];
                for t in 0..4 {
                    q.params[r * nb + b][t] = Binary {
                        alpha: half::f16::from_bits(p[2 * t]).to_f32(),
                        mu: half::f16::from_bits(p[2 * t + 1]).to_f32(),
                    };
                }
            }
        }
        q
    }

    /// The dense `[n][k]` weights the packed layer stands for (what the kernels multiply by).
    pub fn dequantize(&self) -> Vec<f32> {
        self.unpack().dequantize()
    }
}

const BILLM_FILE_FORMAT: &str = "fusekit.packed_billm";

impl PackedBillm {
    /// The on-disk form of named packed layers: a safetensors file with metadata
    /// `format = "fusekit.packed_billm"`, `version = "2"`, per layer `name = "n=…;k=…"`, and the tensors
    /// `name.signs`, `name.second` (U32 `[blocks, n, 4]`), `name.salient` (U32 `[blocks, 4]`) and
    /// `name.params` (F16 `[blocks, n, 8]`): the in-memory buffers byte for byte. Layer names must be
    /// non-empty, without `;` and `=`, and not `format`/`version`.
    ///
    /// ```
    /// use fusekit::quant::{quantize_billm, BillmConfig, Hessian, PackedBillm};
    /// let (n, k) = (6, 150);
    /// let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 23) as f32 - 11.0) / 10.0).collect();
    /// let mut h = Hessian::new(k)?;
    /// h.add(&(0..16 * k).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect::<Vec<_>>())?;
    /// let p = PackedBillm::pack(&quantize_billm(&w, n, k, &h, &BillmConfig::default())?)?;
    /// let bytes = PackedBillm::to_safetensors(&[("mlp.up_proj", &p)])?;
    /// assert_eq!(PackedBillm::from_safetensors(&bytes)?, vec![("mlp.up_proj".to_string(), p)]);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn to_safetensors(layers: &[(&str, &PackedBillm)]) -> Result<Vec<u8>> {
        let mut file = LayerFileWriter::new(BILLM_FILE_FORMAT, BILLM_FORMAT_VERSION);
        for (name, p) in layers {
            file.layer(name, format!("n={};k={}", p.n, p.k))?;
            p.validate()?;
            let nb = p.k.div_ceil(BILLM_BLOCK);
            file.tensor(
                format!("{name}.signs"),
                "U32",
                vec![nb, p.n, 4],
                le_words(&p.signs),
            );
            file.tensor(
                format!("{name}.second"),
                "U32",
                vec![nb, p.n, 4],
                le_words(&p.second),
            );
            file.tensor(
                format!("{name}.salient"),
                "U32",
                vec![nb, 4],
                le_words(&p.salient),
            );
            file.tensor(
                format!("{name}.params"),
                "F16",
                vec![nb, p.n, 8],
                le_halves(&p.params),
            );
        }
        file.finish()
    }

    /// Reads the layers [`to_safetensors`](Self::to_safetensors) wrote, in name order. Another format or
    /// version, a header that does not parse, a tensor of the wrong dtype or shape, a missing or an
    /// unexpected tensor, buffers that fail [`validate`](Self::validate): a typed `Err`.
    ///
    /// ```
    /// use fusekit::quant::PackedBillm;
    /// assert!(PackedBillm::from_safetensors(b"\x02\0\0\0\0\0\0\0{}").is_err()); // no format metadata
    /// ```
    pub fn from_safetensors(bytes: &[u8]) -> Result<Vec<(String, PackedBillm)>> {
        let mut file = LayerFileReader::open(
            bytes,
            BILLM_FILE_FORMAT,
            BILLM_FORMAT_VERSION,
            "packed BiLLM",
        )?;
        let mut out = Vec::new();
        for (name, h) in file.layers() {
            let bad =
                |what: String| Error::invalid("safetensors", format!("layer {name:?}: {what}"));
            if name.is_empty() || name.contains([';', '=']) {
                return Err(bad("a layer name to_safetensors would refuse".into()));
            }
            let parsed = h
                .strip_prefix("n=")
                .and_then(|r| r.split_once(";k="))
                .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
            let Some((n, k)) = parsed else {
                return Err(bad(format!("header {h:?}")));
            };
            if n == 0 || k == 0 || n >= 1 << 31 || k >= 1 << 31 {
                return Err(bad(format!("a {n} x {k} weight")));
            }
            let nb = k.div_ceil(BILLM_BLOCK);
            let p = PackedBillm {
                n,
                k,
                signs: words_le(file.take(&name, "signs", "U32", vec![nb, n, 4])?),
                second: words_le(file.take(&name, "second", "U32", vec![nb, n, 4])?),
                salient: words_le(file.take(&name, "salient", "U32", vec![nb, 4])?),
                params: halves_le(file.take(&name, "params", "F16", vec![nb, n, 8])?),
            };
            p.validate()?;
            out.push((name, p));
        }
        file.finish()?;
        Ok(out)
    }
}
