//! OSTQuant-style equivalent transforms (an orthogonal matrix and a diagonal scaling fused into the layers
//! around an activation, leaving the float model's outputs unchanged) and QSUR, OSTQuant's quantisation
//! space utilisation rate, which says how well a distribution fills the grid it is quantised on.

use crate::error::{Error, Result};

use super::act::quantize_tokens;
use super::linalg::cholesky_lower;
use super::rtn::{quantize_rtn, WeightQuant};

/// Shrinkage of the covariance toward its mean variance in [`qsur`]: `Σ + ε·(tr Σ / d)·I`, so that fewer
/// tokens than channels (a singular sample covariance) still give a finite, comparable number.
pub const QSUR_SHRINKAGE: f64 = 1e-2;

/// QSUR of the rows of `x` (`[rows][k]`, at least 2 rows), normalised per dimension.
///
/// OSTQuant defines QSUR as the volume of the data's ellipsoid `E = {μ + Σ^½u : |u| ≤ c}` over the volume
/// of the quantisation space that must contain it, the cube of half-side `r = max_i (|μ_i| + c·√Σ_ii)`
/// (E's extent along channel i is `μ_i ± c√Σ_ii`): `QSUR = V_d c^d √det Σ / (2r)^d`. In hundreds of
/// dimensions that is astronomically small, so this returns it relative to the best case (zero-mean,
/// isotropic data, `QSUR = V_d / 2^d`), to the power `1/d`:
/// `(det Σ)^{1/2d} / max_i (|μ_i|/c + √Σ_ii)`, the geometric mean of the standard deviations along the
/// principal axes over the largest per-channel extent. It lies in (0, 1], is 1 exactly for isotropic,
/// zero-mean data, is unchanged by a rotation of isotropic data, and falls as outlier channels stretch
/// the cube. `c² = χ²_d(0.99)` (Wilson–Hilferty); μ and Σ in f64, Σ shrunk by [`QSUR_SHRINKAGE`].
///
/// ```
/// use fusekit::quant::qsur;
/// // Channel 1 has 10x the spread of channel 0: the cube is stretched along it.
/// let x: Vec<f32> = (0..2000).flat_map(|i| {
///     let (a, b) = (((i * 7919) % 1000) as f32 / 500.0 - 1.0, ((i * 104729) % 997) as f32 / 498.5 - 1.0);
///     [a, 10.0 * b]
/// }).collect();
/// let q = qsur(&x, 2)?;
/// assert!(q > 0.2 && q < 0.4); // about sqrt(1·10)/10 = 0.32
/// # Ok::<(), fusekit::Error>(())
/// ```
pub fn qsur(x: &[f32], k: usize) -> Result<f64> {
    if k == 0 || x.len() % k != 0 || x.len() / k < 2 {
        return Err(Error::shape(
            "x",
            "[rows][k] with rows >= 2",
            format!("{} values for k = {k}", x.len()),
        ));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid("x", format!("value {i} is {}", x[i])));
    }
    let rows = x.len() / k;
    let mut mu = vec![0.0f64; k];
    for r in 0..rows {
        for (m, &v) in mu.iter_mut().zip(&x[r * k..(r + 1) * k]) {
            *m += v as f64;
        }
    }
    mu.iter_mut().for_each(|m| *m /= rows as f64);
    let mut cov = vec![0.0f64; k * k];
    let mut centred = vec![0.0f64; k];
    for r in 0..rows {
        for (c, (&v, m)) in centred
            .iter_mut()
            .zip(x[r * k..(r + 1) * k].iter().zip(&mu))
        {
            *c = v as f64 - m;
        }
        for i in 0..k {
            let ci = centred[i];
            for j in 0..=i {
                cov[i * k + j] += ci * centred[j];
            }
        }
    }
    for i in 0..k {
        for j in 0..=i {
            cov[i * k + j] /= (rows - 1) as f64;
            cov[j * k + i] = cov[i * k + j];
        }
    }
    let trace: f64 = (0..k).map(|i| cov[i * k + i]).sum();
    if trace <= 0.0 {
        return Ok(0.0); // every row the same: no spread to quantise
    }
    let ridge = QSUR_SHRINKAGE * trace / k as f64;
    (0..k).for_each(|i| cov[i * k + i] += ridge);
    let d = k as f64;
    let z = 2.326_347_874; // 0.99 normal quantile
    let c = (d * (1.0 - 2.0 / (9.0 * d) + z * (2.0 / (9.0 * d)).sqrt()).powi(3)).sqrt();
    let extent = (0..k)
        .map(|i| mu[i].abs() / c + cov[i * k + i].sqrt())
        .fold(0.0f64, f64::max);
    let mut l = cov;
    cholesky_lower(&mut l, k)
        .ok_or_else(|| Error::invalid("x", "covariance is not positive definite"))?;
    // (det Σ)^{1/2d} = exp(Σ log L_ii / d).
    let log_geo = (0..k).map(|i| l[i * k + i].ln()).sum::<f64>() / d;
    Ok((log_geo.exp() / extent).min(1.0))
}

/// An equivalent transform `T = D⁻¹·Q` of a `k`-channel activation: `D = diag(scales)` (positive),
/// `Q` orthogonal (or the identity). Activations become `x·T`; the layer that reads them takes
/// `W·T⁻ᵀ = W·D·Q`, so `(x·T)·(W·D·Q)ᵀ = x·Wᵀ` exactly; the layer that writes them takes `Tᵀ·W` and
/// `b·T`. Fused into both, the float model computes the same outputs (OSTQuant's learnable equivalent
/// transformation pairs, here with a given `Q` and `D`).
///
/// ```
/// use fusekit::quant::EquivalentTransform;
/// let t = EquivalentTransform::new(vec![2.0, 0.5], Some(vec![0.6, 0.8, -0.8, 0.6]))?;
/// let (x, w) = ([1.0f32, 3.0], [0.25f32, -1.0]); // one token, one output
/// let (xt, wt) = (t.activations(&x)?, t.consumer_weight(&w)?);
/// let y: f32 = xt.iter().zip(&wt).map(|(a, b)| a * b).sum();
/// assert!((y - (0.25 - 3.0)).abs() < 1e-6);
/// assert!(EquivalentTransform::new(vec![1.0, 1.0], Some(vec![1.0, 1.0, 0.0, 1.0])).is_err()); // not orthogonal
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct EquivalentTransform {
    scales: Vec<f64>,
    rotation: Option<Vec<f64>>,
}

impl EquivalentTransform {
    /// `T = diag(scales)⁻¹·rotation`. Scales must be finite and positive; the rotation `k × k`
    /// row-major with `Q·Qᵀ = I` to 1e-9 per entry.
    pub fn new(scales: Vec<f64>, rotation: Option<Vec<f64>>) -> Result<Self> {
        let k = scales.len();
        if k == 0 {
            return Err(Error::shape("scales", "at least one channel", "0"));
        }
        if let Some(i) = scales.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Error::invalid(
                "scales",
                format!("scale {i} is {}", scales[i]),
            ));
        }
        if let Some(q) = &rotation {
            if q.len() != k * k {
                return Err(Error::shape(
                    "rotation",
                    format!("{k} x {k}"),
                    format!("{} values", q.len()),
                ));
            }
            for i in 0..k {
                for j in 0..k {
                    let dot: f64 = (0..k).map(|t| q[i * k + t] * q[j * k + t]).sum();
                    if (dot - (i == j) as u8 as f64).abs() > 1e-9 {
                        return Err(Error::invalid(
                            "rotation",
                            format!("not orthogonal: (Q·Qᵀ)[{i}][{j}] = {dot}"),
                        ));
                    }
                }
            }
        }
        Ok(EquivalentTransform { scales, rotation })
    }

    /// The normalised Hadamard rotation of `k` channels (sizes of [`super::hadamard::factor`]), with
    /// the given scales (`None`: all 1).
    pub fn hadamard(k: usize, scales: Option<Vec<f64>>) -> Result<Self> {
        let q = super::hadamard::matrix(k)?;
        Self::new(scales.unwrap_or_else(|| vec![1.0; k]), Some(q))
    }

    /// Channels.
    pub fn k(&self) -> usize {
        self.scales.len()
    }

    /// `rows · k` values times the `k × k` matrix `m` (`None`: identity), after dividing (`div`) or
    /// multiplying each channel by its scale, in f64.
    fn apply(&self, x: &[f32], div: bool) -> Result<Vec<f32>> {
        let k = self.k();
        if x.len() % k != 0 {
            return Err(Error::shape(
                "x",
                format!("rows of {k}"),
                format!("{} values", x.len()),
            ));
        }
        let mut out = vec![0.0f32; x.len()];
        let mut row = vec![0.0f64; k];
        for (xr, or) in x.chunks(k).zip(out.chunks_mut(k)) {
            for ((r, &v), s) in row.iter_mut().zip(xr).zip(&self.scales) {
                *r = if div { v as f64 / s } else { v as f64 * s };
            }
            match &self.rotation {
                None => or.iter_mut().zip(&row).for_each(|(o, r)| *o = *r as f32),
                Some(q) => {
                    for (j, o) in or.iter_mut().enumerate() {
                        *o = (0..k).map(|t| row[t] * q[t * k + j]).sum::<f64>() as f32;
                    }
                }
            }
        }
        Ok(out)
    }

    /// `x·T = x·D⁻¹·Q` for activations `[rows][k]`.
    pub fn activations(&self, x: &[f32]) -> Result<Vec<f32>> {
        self.apply(x, true)
    }

    /// `W·D·Q` for a `[n][k]` weight that reads the transformed activations.
    pub fn consumer_weight(&self, w: &[f32]) -> Result<Vec<f32>> {
        self.apply(w, false)
    }

    /// `(Tᵀ·W, b·T)` for the layer that writes the activations: `w` is `[k][k_in]` (its `k` outputs are
    /// the transformed channels), `b` its `k` biases (or empty).
    ///
    /// ```
    /// use fusekit::quant::EquivalentTransform;
    /// let t = EquivalentTransform::hadamard(4, Some(vec![1.0, 2.0, 4.0, 8.0]))?;
    /// // A 4 -> 4 producer, then a 4 -> 1 consumer: the chain's output is unchanged.
    /// let (w1, b1) = ((0..16).map(|i| i as f32 / 8.0 - 1.0).collect::<Vec<_>>(), vec![0.5f32, -1.0, 0.0, 2.0]);
    /// let w2 = [1.0f32, -2.0, 0.5, 3.0];
    /// let x = [0.3f32, -0.7, 1.1, 0.2];
    /// let chain = |w1: &[f32], b1: &[f32], w2: &[f32]| -> f32 {
    ///     (0..4).map(|o| (b1[o] + (0..4).map(|i| x[i] * w1[o * 4 + i]).sum::<f32>()) * w2[o]).sum()
    /// };
    /// let (w1t, b1t) = t.producer(&w1, &b1, 4)?;
    /// let w2t = t.consumer_weight(&w2)?;
    /// assert!((chain(&w1, &b1, &w2) - chain(&w1t, &b1t, &w2t)).abs() < 1e-5);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn producer(&self, w: &[f32], b: &[f32], k_in: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let k = self.k();
        if k_in == 0 || w.len() != k * k_in || !(b.is_empty() || b.len() == k) {
            return Err(Error::shape(
                "w",
                format!("[{k}][{k_in}] and {k} or 0 biases"),
                format!("{} weights, {} biases", w.len(), b.len()),
            ));
        }
        // (Tᵀ·W)[j][c] = Σ_t T[t][j]·W[t][c], T[t][j] = Q[t][j] / s_t: the columns of W transformed as
        // activations.
        let mut wt = vec![0.0f32; w.len()];
        let mut col = vec![0.0f32; k];
        for c in 0..k_in {
            for t in 0..k {
                col[t] = w[t * k_in + c];
            }
            let tc = self.activations(&col)?;
            for j in 0..k {
                wt[j * k_in + c] = tc[j];
            }
        }
        let bt = if b.is_empty() {
            Vec::new()
        } else {
            self.activations(b)?
        };
        Ok((wt, bt))
    }
}

/// The result of [`search_scales`]: the SmoothQuant exponent chosen (`None`: no scaling was best), the
/// scales, and the calibration error with them and without.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleSearch {
    /// `α` of `s_j = max|x_j|^α / max|W_·j|^(1−α)`, or `None` when unit scales won.
    pub alpha: Option<f64>,
    /// The chosen per-channel scales.
    pub scales: Vec<f64>,
    /// Relative output error with the chosen scales.
    pub error: f64,
    /// Relative output error with unit scales (the same rotation).
    pub error_unscaled: f64,
}

/// Searches the diagonal scaling of an equivalent transform for a `[n][k]` weight and its calibration
/// activations `x`: candidates are unit scales and SmoothQuant's `s_j = max|x_j|^α / max_i|W_ij|^(1−α)`
/// for α = 0, 0.1, …, 1 (normalised to geometric mean 1), each with the optional `rotation` after it;
/// each is judged by the relative output error `‖x·Wᵀ − Q(x·T)·Q(W·D·Q)ᵀ‖/‖x·Wᵀ‖` on `x` itself, with the
/// weight quantised by RTN with `scheme` and, if `act_bits` is given, the activations per token
/// (asymmetric). Returns the best.
pub fn search_scales(
    x: &[f32],
    w: &[f32],
    n: usize,
    k: usize,
    scheme: &WeightQuant,
    act_bits: Option<u32>,
    rotation: Option<&[f64]>,
) -> Result<ScaleSearch> {
    if k == 0 || n == 0 || w.len() != n * k || x.is_empty() || x.len() % k != 0 {
        return Err(Error::shape(
            "x, w",
            format!("[rows][{k}] and [{n}][{k}]"),
            format!("{} and {} values", x.len(), w.len()),
        ));
    }
    let rows = x.len() / k;
    let xmax: Vec<f64> = (0..k)
        .map(|j| (0..rows).fold(0.0f64, |m, r| m.max((x[r * k + j] as f64).abs())))
        .collect();
    let wmax: Vec<f64> = (0..k)
        .map(|j| (0..n).fold(0.0f64, |m, r| m.max((w[r * k + j] as f64).abs())))
        .collect();
    let reference: Vec<f64> = (0..rows * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            (0..k)
                .map(|j| x[r * k + j] as f64 * w[c * k + j] as f64)
                .sum()
        })
        .collect();
    let norm = reference
        .iter()
        .map(|v| v * v)
        .sum::<f64>()
        .sqrt()
        .max(1e-300);
    let judge = |scales: Vec<f64>| -> Result<(f64, Vec<f64>)> {
        let t = EquivalentTransform::new(scales, rotation.map(|q| q.to_vec()))?;
        let (xt, wt) = (t.activations(x)?, t.consumer_weight(w)?);
        let xq = match act_bits {
            Some(b) => quantize_tokens(&xt, k, b, false)?.dequantize(),
            None => xt,
        };
        let wq = quantize_rtn(&wt, n, k, scheme)?.dequantize();
        let mut err = 0.0f64;
        for (i, want) in reference.iter().enumerate() {
            let (r, c) = (i / n, i % n);
            let got: f64 = (0..k)
                .map(|j| xq[r * k + j] as f64 * wq[c * k + j] as f64)
                .sum();
            err += (got - want) * (got - want);
        }
        Ok((err.sqrt() / norm, t.scales))
    };
    let (error_unscaled, unit) = judge(vec![1.0; k])?;
    let mut best = ScaleSearch {
        alpha: None,
        scales: unit,
        error: error_unscaled,
        error_unscaled,
    };
    for step in 0..=10 {
        let alpha = step as f64 / 10.0;
        let mut s: Vec<f64> = (0..k)
            .map(|j| {
                let v = xmax[j].max(1e-8).powf(alpha) / wmax[j].max(1e-8).powf(1.0 - alpha);
                if v.is_finite() && v > 0.0 {
                    v
                } else {
                    1.0
                }
            })
            .collect();
        let geo = (s.iter().map(|v| v.ln()).sum::<f64>() / k as f64).exp();
        s.iter_mut().for_each(|v| *v /= geo);
        let (e, scales) = judge(s)?;
        if e < best.error {
            best = ScaleSearch {
                alpha: Some(alpha),
                scales,
                error: e,
                error_unscaled,
            };
        }
    }
    Ok(best)
}
