//! The k-bit integer weight format and round-to-nearest quantisation.

use crate::error::{Error, Result};

/// The precision a kernel reads the scales in; the quantisers round every scale to it, so
/// [`QuantizedWeight::dequantize`] is exactly what the kernel multiplies by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleFormat {
    /// f32 scales (a reference format; no kernel reads it).
    F32,
    /// bf16 scales.
    Bf16,
    /// f16 scales.
    F16,
}

impl ScaleFormat {
    fn round(self, s: f64) -> f64 {
        match self {
            ScaleFormat::F32 => s as f32 as f64,
            ScaleFormat::Bf16 => half::bf16::from_f64(s).to_f64(),
            ScaleFormat::F16 => half::f16::from_f64(s).to_f64(),
        }
    }
}

/// A weight quantisation scheme: `bits`-bit codes, one (scale, zero point) per output channel
/// (`group: None`) or per `group` consecutive input channels of a row; symmetric (the zero point is
/// `2^(bits−1)`, not stored) or asymmetric (an integer zero point per group); and whether the
/// quantiser searches a clipping factor per group that minimises the group's squared error.
///
/// Grids follow GPTQ's quantiser: asymmetric groups span `[min(x, 0), max(x, 0)]` with
/// `scale = (max − min) / (2^bits − 1)` and `zero = round(−min / scale)`; symmetric groups take
/// `scale = 2·max|x| / (2^bits − 1)` and codes `(q − 2^(bits−1))·scale`. A value is
/// `(code − zero) · scale`; codes are rounded half away from zero and clamped to `[0, 2^bits − 1]`.
///
/// ```
/// use fusekit::quant::{ScaleFormat, WeightQuant};
/// let s = WeightQuant::int4(Some(128), false);
/// assert_eq!((s.bits, s.group, s.symmetric, s.scale_format, s.mse_clip), (4, Some(128), false, ScaleFormat::Bf16, true));
/// assert!(WeightQuant { group: Some(48), ..s }.validate().is_err());
/// assert!(WeightQuant { bits: 1, ..s }.validate().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightQuant {
    /// Bits per code, 2..=8.
    pub bits: u32,
    /// `None`: one group per output channel (the whole row); else 32, 64 or 128 input channels.
    pub group: Option<usize>,
    /// Symmetric grid (no stored zero point).
    pub symmetric: bool,
    /// The precision of the stored scales.
    pub scale_format: ScaleFormat,
    /// Search a clipping factor per group (81 factors from 1.0 down to 0.2) for the least squared error.
    pub mse_clip: bool,
}

impl WeightQuant {
    /// 4-bit codes with bf16 scales and the MSE clipping search.
    ///
    /// ```
    /// let s = fusekit::quant::WeightQuant::int4(None, true);
    /// assert_eq!(s.max_code(), 15);
    /// ```
    pub fn int4(group: Option<usize>, symmetric: bool) -> Self {
        WeightQuant {
            bits: 4,
            group,
            symmetric,
            scale_format: ScaleFormat::Bf16,
            mse_clip: true,
        }
    }

    /// `2^bits − 1`.
    ///
    /// ```
    /// let s = fusekit::quant::WeightQuant { bits: 3, ..fusekit::quant::WeightQuant::int4(None, false) };
    /// assert_eq!(s.max_code(), 7);
    /// ```
    pub fn max_code(&self) -> u32 {
        (1u32 << self.bits.min(8)) - 1
    }

    /// Checks the scheme: 2..=8 bits, groups of 32, 64 or 128.
    ///
    /// ```
    /// assert!(fusekit::quant::WeightQuant::int4(Some(64), false).validate().is_ok());
    /// ```
    pub fn validate(&self) -> Result<()> {
        if !(2..=8).contains(&self.bits) {
            return Err(Error::Unsupported {
                what: format!(
                    "{}-bit weight codes (2..=8 here; 1-bit is BiLLM's format)",
                    self.bits
                ),
            });
        }
        if let Some(g) = self.group {
            if ![32, 64, 128].contains(&g) {
                return Err(Error::Unsupported {
                    what: format!("weight groups of {g} input channels (32, 64 or 128, or None: per output channel)"),
                });
            }
        }
        Ok(())
    }

    /// Input channels per group for rows of `k`: the group, or `k` per output channel.
    pub(crate) fn group_len(&self, k: usize) -> usize {
        self.group.unwrap_or(k)
    }

    /// The (scale, zero) of a group with clipping factor `p`, the scale rounded to the scale format.
    fn params_at(&self, x: &[f64], p: f64) -> (f64, u32) {
        let maxq = self.max_code() as f64;
        let (scale, zero) = if self.symmetric {
            let mut amax = x.iter().fold(0.0f64, |m, v| m.max(v.abs())) * p;
            if amax == 0.0 {
                amax = 1.0;
            }
            let scale = self.round_scale(2.0 * amax / maxq);
            (scale, 1 << (self.bits - 1))
        } else {
            let mut lo = x.iter().fold(0.0f64, |m, &v| m.min(v)) * p;
            let mut hi = x.iter().fold(0.0f64, |m, &v| m.max(v)) * p;
            if lo == hi {
                lo = -1.0;
                hi = 1.0;
            }
            let scale = self.round_scale((hi - lo) / maxq);
            (scale, (-lo / scale).round().clamp(0.0, maxq) as u32)
        };
        (scale, zero)
    }

    fn round_scale(&self, s: f64) -> f64 {
        let r = self.scale_format.round(s);
        if r > 0.0 || r.is_infinite() {
            r
        } else {
            // Underflow: the smallest positive normal of the format (overflow stays infinite and is
            // refused by `params`).
            match self.scale_format {
                ScaleFormat::F32 => f32::MIN_POSITIVE as f64,
                ScaleFormat::Bf16 => half::bf16::MIN_POSITIVE.to_f64(),
                ScaleFormat::F16 => half::f16::MIN_POSITIVE.to_f64(),
            }
        }
    }

    /// The (scale, zero) of the group `x`: with the MSE search, the clipping factor whose grid gives the
    /// least squared error (ties keep the larger factor). A scale beyond the scale format's range is
    /// an `Err` (GPTQ's compensation can grow a group past the range its original weights were checked
    /// against).
    pub(crate) fn params(&self, x: &[f64]) -> Result<(f64, u32)> {
        let full = self.params_at(x, 1.0);
        if !full.0.is_finite() {
            return Err(Error::invalid(
                "w",
                format!(
                    "a group reaching {:e} needs a scale beyond {:?}'s range",
                    x.iter().fold(0.0f64, |m, v| m.max(v.abs())),
                    self.scale_format
                ),
            ));
        }
        if !self.mse_clip {
            return Ok(full);
        }
        let mut best = (f64::INFINITY, self.params_at(x, 1.0));
        for i in 0..=80 {
            let p = 1.0 - i as f64 / 100.0;
            let (s, z) = self.params_at(x, p);
            let err: f64 = x
                .iter()
                .map(|&v| {
                    let d = self.dequant(self.code(v, s, z), s, z) - v;
                    d * d
                })
                .sum();
            if err < best.0 {
                best = (err, (s, z));
            }
        }
        Ok(best.1)
    }

    /// The code of `x` on the grid (scale, zero).
    pub(crate) fn code(&self, x: f64, scale: f64, zero: u32) -> u8 {
        ((x / scale).round() + zero as f64).clamp(0.0, self.max_code() as f64) as u8
    }

    /// The value of a code, as a kernel computes it: `(code − zero) · scale` in f32.
    pub(crate) fn dequant(&self, code: u8, scale: f64, zero: u32) -> f64 {
        ((code as f32 - zero as f32) * scale as f32) as f64
    }
}

/// A quantised `[n][k]` weight: codes, and per row and group a scale (exactly representable in the
/// scheme's [`ScaleFormat`]) and an integer zero point. The last group of a row is shorter when the
/// group does not divide `k`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedWeight {
    /// Output channels.
    pub n: usize,
    /// Input channels.
    pub k: usize,
    /// The scheme the weight was quantised with.
    pub scheme: WeightQuant,
    /// `[n][k]` codes in `0..=2^bits − 1`.
    pub codes: Vec<u8>,
    /// `[n][groups]` scales.
    pub scales: Vec<f32>,
    /// `[n][groups]` zero points (`2^(bits−1)` everywhere for a symmetric scheme).
    pub zeros: Vec<u8>,
}

impl QuantizedWeight {
    /// Groups per row: `ceil(k / group)`, 1 per output channel.
    ///
    /// ```
    /// use fusekit::quant::{quantize_rtn, WeightQuant};
    /// let q = quantize_rtn(&vec![0.5f32; 2 * 100], 2, 100, &WeightQuant::int4(Some(32), false))?;
    /// assert_eq!(q.groups(), 4);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn groups(&self) -> usize {
        self.k.div_ceil(self.scheme.group_len(self.k))
    }

    /// The dense `[n][k]` f32 weight the codes stand for: `(code − zero) · scale`, in f32 as a kernel
    /// computes it.
    ///
    /// ```
    /// use fusekit::quant::{quantize_rtn, WeightQuant};
    /// let w: Vec<f32> = (0..64).map(|i| (i as f32 - 32.0) / 8.0).collect();
    /// let q = quantize_rtn(&w, 1, 64, &WeightQuant { mse_clip: false, ..WeightQuant::int4(None, false) })?;
    /// let back = q.dequantize();
    /// // 16 levels over [-4, 3.875]: every weight within half a step.
    /// assert!(w.iter().zip(&back).all(|(a, b)| (a - b).abs() <= 0.5 * 7.875 / 15.0 + 1e-3));
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn dequantize(&self) -> Vec<f32> {
        let (g, ng) = (self.scheme.group_len(self.k), self.groups());
        let mut out = vec![0.0f32; self.n * self.k];
        for r in 0..self.n {
            for c in 0..self.k {
                let gi = r * ng + c / g;
                out[r * self.k + c] = self.scheme.dequant(
                    self.codes[r * self.k + c],
                    self.scales[gi] as f64,
                    self.zeros[gi] as u32,
                ) as f32;
            }
        }
        out
    }
}

/// Checks a weight and a scheme: `w` is `n · k` finite values, `n, k ≥ 1`.
pub(crate) fn check_weight(w: &[f32], n: usize, k: usize, scheme: &WeightQuant) -> Result<()> {
    scheme.validate()?;
    if n == 0 || k == 0 || n.checked_mul(k) != Some(w.len()) {
        return Err(Error::shape(
            "w",
            format!("[n][k] with n, k >= 1 ({n} x {k})"),
            format!("{} values", w.len()),
        ));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(
            "w",
            format!("weight ({}, {}) is {}", i / k, i % k, w[i]),
        ));
    }
    let amax = w.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs()));
    let limit = match scheme.scale_format {
        ScaleFormat::F16 => 65504.0,
        ScaleFormat::Bf16 | ScaleFormat::F32 => f32::MAX as f64,
    };
    if 2.0 * amax / scheme.max_code() as f64 > limit / 2.0 {
        return Err(Error::invalid(
            "w",
            format!(
                "|w| reaches {amax:e}: its scales would overflow {:?} scales",
                scheme.scale_format
            ),
        ));
    }
    Ok(())
}

/// Round-to-nearest quantisation of a `[n][k]` weight with `scheme`: per row and group the grid of
/// [`WeightQuant`] (with its clipping search if `mse_clip`), then every weight to its nearest code.
/// Non-finite weights, empty or mismatched shapes and unsupported schemes are a typed `Err`.
///
/// ```
/// use fusekit::quant::{quantize_rtn, WeightQuant};
/// let w: Vec<f32> = (0..256).map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5).collect();
/// let q = quantize_rtn(&w, 2, 128, &WeightQuant::int4(Some(32), true))?;
/// assert_eq!((q.codes.len(), q.scales.len()), (256, 8));
/// assert!(q.zeros.iter().all(|&z| z == 8));
/// assert!(quantize_rtn(&[f32::NAN], 1, 1, &WeightQuant::int4(None, false)).is_err());
/// # Ok::<(), fusekit::Error>(())
/// ```
pub fn quantize_rtn(
    w: &[f32],
    n: usize,
    k: usize,
    scheme: &WeightQuant,
) -> Result<QuantizedWeight> {
    check_weight(w, n, k, scheme)?;
    let g = scheme.group_len(k);
    let ng = k.div_ceil(g);
    let mut q = QuantizedWeight {
        n,
        k,
        scheme: *scheme,
        codes: vec![0; n * k],
        scales: vec![0.0; n * ng],
        zeros: vec![0; n * ng],
    };
    let mut buf = Vec::with_capacity(g);
    for r in 0..n {
        for gi in 0..ng {
            let (c0, c1) = (gi * g, ((gi + 1) * g).min(k));
            buf.clear();
            buf.extend(w[r * k + c0..r * k + c1].iter().map(|&v| v as f64));
            let (s, z) = scheme.params(&buf)?;
            q.scales[r * ng + gi] = s as f32;
            q.zeros[r * ng + gi] = z as u8;
            for c in c0..c1 {
                q.codes[r * k + c] = scheme.code(w[r * k + c] as f64, s, z);
            }
        }
    }
    Ok(q)
}
