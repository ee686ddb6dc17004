//! Per-token dynamic activation quantisation (the A of W4A4 / W4A8), the CPU reference of what the
//! online Hadamard kernel will fuse.

use crate::error::{Error, Result};

/// Activations `[rows][k]` quantised per token (row): `bits`-bit codes, one f32 scale and integer zero
/// point per row; a value is `(code − zero) · scale`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedTokens {
    /// Channels per token.
    pub k: usize,
    /// Bits per code.
    pub bits: u32,
    /// `[rows][k]` codes in `0..=2^bits − 1`.
    pub codes: Vec<u8>,
    /// `[rows]` scales.
    pub scales: Vec<f32>,
    /// `[rows]` zero points (`2^(bits−1)` when symmetric).
    pub zeros: Vec<u8>,
}

impl QuantizedTokens {
    /// The `[rows][k]` values the codes stand for, `(code − zero) · scale` in f32.
    ///
    /// ```
    /// let q = fusekit::quant::quantize_tokens(&[0.0, 1.0, 2.0, 3.0], 4, 8, false)?;
    /// assert!(q.dequantize().iter().zip([0.0, 1.0, 2.0, 3.0]).all(|(a, b)| (a - b).abs() < 0.01));
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn dequantize(&self) -> Vec<f32> {
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let r = i / self.k;
                (c as f32 - self.zeros[r] as f32) * self.scales[r]
            })
            .collect()
    }
}

/// Quantises each token (row of `k` channels) of `x` to `bits` (2..=8) bits, as the grids of
/// [`WeightQuant`](super::WeightQuant) without clipping: symmetric `scale = 2·max|x| / (2^bits − 1)`,
/// zero `2^(bits−1)`; asymmetric `scale = (max − min) / (2^bits − 1)` over `[min(x, 0), max(x, 0)]`,
/// `zero = round(−min / scale)`. Scales in f32 (computed per token at run time, never stored). A token
/// of zeros takes scale 1, a tiny one at least the smallest normal f32. Non-finite activations, and a
/// token whose range overflows f32, are an `Err`.
///
/// ```
/// let q = fusekit::quant::quantize_tokens(&[-1.0, 0.5, 4.0, 2.0], 2, 4, true)?;
/// assert_eq!(q.zeros, vec![8, 8]);
/// assert_eq!(q.scales[0], 2.0 / 15.0);
/// assert!(fusekit::quant::quantize_tokens(&[1.0, f32::NAN], 2, 4, true).is_err());
/// # Ok::<(), fusekit::Error>(())
/// ```
pub fn quantize_tokens(x: &[f32], k: usize, bits: u32, symmetric: bool) -> Result<QuantizedTokens> {
    if !(2..=8).contains(&bits) {
        return Err(Error::Unsupported {
            what: format!("{bits}-bit activation codes (2..=8)"),
        });
    }
    if k == 0 || x.len() % k != 0 {
        return Err(Error::shape(
            "x",
            format!("rows of k = {k} >= 1 channels"),
            format!("{} values", x.len()),
        ));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(
            "x",
            format!("activation ({}, {}) is {}", i / k, i % k, x[i]),
        ));
    }
    let maxq = ((1u32 << bits) - 1) as f32;
    let rows = x.len() / k;
    let mut q = QuantizedTokens {
        k,
        bits,
        codes: vec![0; x.len()],
        scales: vec![0.0; rows],
        zeros: vec![0; rows],
    };
    for (r, row) in x.chunks_exact(k).enumerate() {
        let (scale, zero) = if symmetric {
            let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let s = if amax > 0.0 {
                (2.0 * amax / maxq).max(f32::MIN_POSITIVE)
            } else {
                1.0
            };
            (s, (1u32 << (bits - 1)) as f32)
        } else {
            let lo = row.iter().fold(0.0f32, |m, &v| m.min(v));
            let hi = row.iter().fold(0.0f32, |m, &v| m.max(v));
            let s = if hi > lo {
                ((hi - lo) / maxq).max(f32::MIN_POSITIVE)
            } else {
                1.0
            };
            (s, (-lo / s).round().clamp(0.0, maxq))
        };
        if !scale.is_finite() {
            return Err(Error::invalid(
                "x",
                format!("token {r} spans more than f32 scales can: its range overflows"),
            ));
        }
        q.scales[r] = scale;
        q.zeros[r] = zero as u8;
        for (c, &v) in row.iter().enumerate() {
            q.codes[r * k + c] = ((v / scale).round() + zero).clamp(0.0, maxq) as u8;
        }
    }
    Ok(q)
}
