//! The packed int4 weight the W4A16 kernel reads (format version 1): codes in tensor-core fragment
//! order, scales and zero points in the order each lane loads them, K and N padded internally.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

use super::rtn::{QuantizedWeight, ScaleFormat, WeightQuant};
use super::safetensors::{
    halves_le, le_halves, le_words, words_le, LayerFileReader, LayerFileWriter,
};

/// The packed format's version (`FK_W4_FORMAT_VERSION` in `kernels/include/quant_params.h`).
pub const W4_FORMAT_VERSION: u32 = 1;
/// K is padded to a multiple of this (one k slab of the kernel).
pub const W4_K_PAD: usize = 128;
/// N is padded to a multiple of this (one n block of the kernel).
pub const W4_N_PAD: usize = 64;

/// An int4 weight packed for the W4A16 kernel, format version 1.
///
/// Layout (all little-endian; `k_pad = ceil(k / 128)·128`, `n_pad = ceil(n / 64)·64`,
/// `group_len` = the scheme's group or `k_pad` for one group per output channel,
/// `n_groups = k_pad / group_len`):
///
/// * `codes`: `u32` words `[n_pad/64][k_pad/16][32 lanes][4]`. Tile `(nb, kt)` is 512 bytes holding the
///   weights `W[n][k]` for `n ∈ nb·64 .. +64`, `k ∈ kt·16 .. +16`, exactly as `mma.sync.m16n8k16`'s B
///   operand wants them: lane `l = 4g + t`, word `w`, nibble `s` (bits `4s..4s+3`) holds the code of
///   `n = nb·64 + 8·(2w + ((s & 3) >> 1)) + g` and `k = kt·16 + 2t + (s >> 2) + 8·(s & 1)`.
///   So one 16-byte load gives a lane its operands for 8 MMAs, and `(word >> 4p) & 0x000f000f` (p ∈ 0..4)
///   is the pair of one B register.
/// * `scales`: the scale bits (bf16 or f16) `[n_pad/64][n_groups][8 g][8 j]` for `n = nb·64 + 8j + g`.
/// * `zeros` (asymmetric schemes only; symmetric ones have zero point 8): one byte per scale, in the
///   scales' order (a lane's eight zero points are 8 contiguous bytes, each turned into a
///   `(magic + z)` pair by one byte permute).
/// * Padding: every weight at `k ≥ k` or `n ≥ n` has its group's zero point as code (so it is exactly
///   0); groups wholly in the padding have scale 0 and zero point 8.
///
/// A weight is `round_T((code − zero) · scale)` for the activation type `T` (the scale's format):
/// [`dequantize_rounded`](Self::dequantize_rounded) is that exact dense matrix.
///
/// ```
/// use fusekit::quant::{quantize_rtn, PackedW4, WeightQuant};
/// let w: Vec<f32> = (0..3 * 100).map(|i| ((i * 37) % 23) as f32 - 11.0).collect();
/// let q = quantize_rtn(&w, 3, 100, &WeightQuant::int4(Some(32), false))?;
/// let p = PackedW4::pack(&q)?;
/// assert_eq!((p.k_pad(), p.n_pad(), p.n_groups()), (128, 64, 4));
/// assert_eq!(p.codes.len(), 64 * 128 / 8);
/// assert_eq!(p.unpack(), q); // lossless
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct PackedW4 {
    n: usize,
    k: usize,
    scheme: WeightQuant,
    /// The fragment-ordered codes (see the type's documentation).
    pub codes: Vec<u32>,
    /// The scale bits, bf16 or f16 per the scheme.
    pub scales: Vec<u16>,
    /// The zero points (bytes, in the scales' order), `None` for a symmetric scheme.
    pub zeros: Option<Vec<u8>>,
}

/// Where the code of `W[n][k]` lives: (word index, bit shift).
fn code_slot(ktiles: usize, n: usize, k: usize) -> (usize, u32) {
    let (nb, nn) = (n / 64, n % 64);
    let (kt, kk) = (k / 16, k % 16);
    let (j, g) = (nn / 8, nn % 8);
    let (w, jh) = (j / 2, j % 2);
    let r = kk / 8; // b register
    let t = (kk % 8) / 2;
    let h = kk % 2;
    let p = 2 * jh + r; // pair
    let s = p + 4 * h; // nibble
    let lane = 4 * g + t;
    (((nb * ktiles + kt) * 32 + lane) * 4 + w, 4 * s as u32)
}

/// Index of the scale and zero point of `n` in group `gi`.
fn param_slot(n_groups: usize, n: usize, gi: usize) -> usize {
    let (nb, nn) = (n / 64, n % 64);
    let (j, g) = (nn / 8, nn % 8);
    (nb * n_groups + gi) * 64 + g * 8 + j
}

impl PackedW4 {
    /// Packs a 4-bit weight with bf16 or f16 scales (the activation type the kernel will run with).
    /// Other bit widths, f32 scales and non-finite scales are a typed `Err`.
    ///
    /// ```
    /// use fusekit::quant::{quantize_rtn, PackedW4, ScaleFormat, WeightQuant};
    /// let w = vec![0.25f32; 8 * 64];
    /// let q = quantize_rtn(&w, 8, 64, &WeightQuant::int4(None, true))?;
    /// assert!(PackedW4::pack(&q)?.zeros.is_none()); // symmetric: no zero points stored
    /// let f32_scales = quantize_rtn(&w, 8, 64, &WeightQuant { scale_format: ScaleFormat::F32, ..WeightQuant::int4(None, true) })?;
    /// assert!(PackedW4::pack(&f32_scales).is_err());
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn pack(q: &QuantizedWeight) -> Result<Self> {
        let s = q.scheme;
        s.validate()?;
        if s.bits != 4 {
            return Err(Error::Unsupported {
                what: format!("packing {}-bit codes for the W4 kernels (4 only)", s.bits),
            });
        }
        if s.scale_format == ScaleFormat::F32 {
            return Err(Error::Unsupported {
                what: "f32 scales in the packed W4 format (bf16 or f16, the activation type)"
                    .into(),
            });
        }
        let ng_q = q.groups();
        if q.n == 0
            || q.k == 0
            || q.codes.len() != q.n * q.k
            || q.scales.len() != q.n * ng_q
            || q.zeros.len() != q.n * ng_q
        {
            return Err(Error::shape(
                "q",
                format!(
                    "{} codes and {} scales and zero points",
                    q.n * q.k,
                    q.n * ng_q
                ),
                format!(
                    "{} codes, {} scales, {} zero points",
                    q.codes.len(),
                    q.scales.len(),
                    q.zeros.len()
                ),
            ));
        }
        if let Some(i) = q.scales.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid("q", format!("scale {i} is {}", q.scales[i])));
        }
        if let Some(i) = q.codes.iter().position(|&c| c > 15) {
            return Err(Error::invalid(
                "q",
                format!("code {i} is {} (> 15)", q.codes[i]),
            ));
        }
        if let Some(i) = q.zeros.iter().position(|&z| z > 15) {
            return Err(Error::invalid(
                "q",
                format!("zero point {i} is {} (> 15)", q.zeros[i]),
            ));
        }
        if s.symmetric {
            if let Some(i) = q.zeros.iter().position(|&z| z != 8) {
                return Err(Error::invalid(
                    "q",
                    format!(
                        "symmetric scheme with zero point {} at {i} (8 expected)",
                        q.zeros[i]
                    ),
                ));
            }
        }
        let mut p = PackedW4 {
            n: q.n,
            k: q.k,
            scheme: s,
            codes: Vec::new(),
            scales: Vec::new(),
            zeros: None,
        };
        let (k_pad, n_pad, ng, gl) = (p.k_pad(), p.n_pad(), p.n_groups(), p.group_len());
        let ktiles = k_pad / 16;
        p.codes = vec![0u32; n_pad * k_pad / 8];
        p.scales = vec![0u16; n_pad / 64 * ng * 64];
        let mut zeros = vec![8u8; n_pad / 64 * ng * 64];
        let g_q = s.group_len(q.k);
        let bits = |v: f32| match s.scale_format {
            ScaleFormat::Bf16 => half::bf16::from_f32(v).to_bits(),
            _ => half::f16::from_f32(v).to_bits(),
        };
        for n in 0..n_pad {
            for gi in 0..ng {
                // The stored group this packed group stands for (none: wholly padding).
                let src = (n < q.n && gi * gl < q.k).then(|| n * ng_q + (gi * gl) / g_q);
                let si = param_slot(ng, n, gi);
                let z = src.map_or(8, |i| q.zeros[i]);
                p.scales[si] = src.map_or(0, |i| bits(q.scales[i]));
                zeros[si] = z;
                for k in gi * gl..(gi + 1) * gl {
                    let code = if n < q.n && k < q.k {
                        q.codes[n * q.k + k] as u32
                    } else {
                        z as u32
                    };
                    let (wi, sh) = code_slot(ktiles, n, k);
                    p.codes[wi] |= code << sh;
                }
            }
        }
        if !s.symmetric {
            p.zeros = Some(zeros);
        }
        Ok(p)
    }

    /// Checks that the buffers have the lengths the header implies (the fields are public, so a caller
    /// may have changed them): `codes` `n_pad·k_pad/8` words, `scales` `n_pad·n_groups` values, `zeros`
    /// as many bytes exactly when the scheme is asymmetric, every zero point ≤ 15. Scales are not
    /// checked (a NaN scale gives NaN outputs, never a finite wrong value).
    ///
    /// ```
    /// use fusekit::quant::{quantize_rtn, PackedW4, WeightQuant};
    /// let mut p = PackedW4::pack(&quantize_rtn(&vec![1.0f32; 64 * 128], 64, 128, &WeightQuant::int4(Some(32), false))?)?;
    /// p.validate()?;
    /// p.zeros = None; // an asymmetric weight without its zero points
    /// assert!(p.validate().is_err());
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn validate(&self) -> Result<()> {
        self.scheme.validate()?;
        if self.scheme.bits != 4 || self.scheme.scale_format == ScaleFormat::F32 {
            return Err(Error::Unsupported {
                what: format!("a packed W4 weight with scheme {:?}", self.scheme),
            });
        }
        let params = self.n_pad() / W4_N_PAD * self.n_groups() * 64;
        let want_zeros = (!self.scheme.symmetric).then_some(params);
        if self.n == 0
            || self.k == 0
            || self.codes.len() != self.n_pad() * self.k_pad() / 8
            || self.scales.len() != params
            || self.zeros.as_ref().map(|z| z.len()) != want_zeros
        {
            return Err(Error::shape(
                "w",
                format!(
                    "{} code words, {params} scales and {} zero points ({} x {} weight, {:?})",
                    self.n_pad() * self.k_pad() / 8,
                    want_zeros.unwrap_or(0),
                    self.n,
                    self.k,
                    self.scheme
                ),
                format!(
                    "{} code words, {} scales, {} zero points",
                    self.codes.len(),
                    self.scales.len(),
                    self.zeros.as_ref().map_or(0, |z| z.len())
                ),
            ));
        }
        if let Some(i) = self
            .zeros
            .as_ref()
            .and_then(|z| z.iter().position(|&v| v > 15))
        {
            return Err(Error::invalid(
                "w",
                format!("zero point byte {i} is above 15"),
            ));
        }
        // Scales: finite (the exponent field of a bf16/f16 not all ones).
        let exp_mask: u16 = if self.scheme.scale_format == ScaleFormat::Bf16 {
            0x7f80
        } else {
            0x7c00
        };
        if let Some(i) = self.scales.iter().position(|&b| b & exp_mask == exp_mask) {
            return Err(Error::invalid(
                "w",
                format!("scale {i} is not finite (bits {:#06x})", self.scales[i]),
            ));
        }
        // Padding: every padded weight is exactly zero (its code is its group's zero point), and a group
        // wholly in the padding has scale 0 and zero point 8; the kernel relies on it, the reference
        // never reads it.
        let (n, k, gl) = (self.n, self.k, self.group_len());
        for r in 0..self.n_pad() {
            let cols = if r < n {
                k..self.k_pad()
            } else {
                0..self.k_pad()
            };
            for c in cols {
                let gi = c / gl;
                if self.code_at(r, c) != self.zero_at(r, gi) {
                    return Err(Error::invalid(
                        "w",
                        format!("padded weight ({r}, {c}) is not zero (its code is not the group's zero point)"),
                    ));
                }
            }
            for gi in 0..self.n_groups() {
                if (r >= n || gi * gl >= k)
                    && (self.scale_at(r, gi) != 0.0 || self.zero_at(r, gi) != 8)
                {
                    return Err(Error::invalid(
                        "w",
                        format!("padding group ({r}, {gi}) must have scale 0 and zero point 8"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Output channels.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Input channels.
    pub fn k(&self) -> usize {
        self.k
    }
    /// The quantisation scheme.
    pub fn scheme(&self) -> WeightQuant {
        self.scheme
    }
    /// `k` rounded up to a multiple of 128.
    pub fn k_pad(&self) -> usize {
        self.k.div_ceil(W4_K_PAD) * W4_K_PAD
    }
    /// `n` rounded up to a multiple of 64.
    pub fn n_pad(&self) -> usize {
        self.n.div_ceil(W4_N_PAD) * W4_N_PAD
    }
    /// Input channels per packed group: the scheme's group, or `k_pad` per output channel.
    pub fn group_len(&self) -> usize {
        self.scheme.group.unwrap_or(self.k_pad())
    }
    /// Packed groups per row: `k_pad / group_len`.
    pub fn n_groups(&self) -> usize {
        self.k_pad() / self.group_len()
    }
    /// Bytes of the packed weight (codes, scales, zero points): what a GEMV streams.
    ///
    /// ```
    /// use fusekit::quant::{quantize_rtn, PackedW4, WeightQuant};
    /// let q = quantize_rtn(&vec![1.0f32; 64 * 128], 64, 128, &WeightQuant::int4(Some(128), false))?;
    /// assert_eq!(PackedW4::pack(&q)?.bytes(), 64 * 128 / 2 + 64 * 2 + 64);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn bytes(&self) -> usize {
        4 * self.codes.len() + 2 * self.scales.len() + self.zeros.as_ref().map_or(0, |z| z.len())
    }

    fn code_at(&self, n: usize, k: usize) -> u8 {
        let (wi, sh) = code_slot(self.k_pad() / 16, n, k);
        ((self.codes[wi] >> sh) & 15) as u8
    }

    fn scale_at(&self, n: usize, gi: usize) -> f32 {
        let si = param_slot(self.n_groups(), n, gi);
        match self.scheme.scale_format {
            ScaleFormat::Bf16 => half::bf16::from_bits(self.scales[si]).to_f32(),
            _ => half::f16::from_bits(self.scales[si]).to_f32(),
        }
    }

    fn zero_at(&self, n: usize, gi: usize) -> u8 {
        let si = param_slot(self.n_groups(), n, gi);
        self.zeros.as_ref().map_or(8, |z| z[si])
    }

    /// The [`QuantizedWeight`] this was packed from (codes, scales and zero points of the unpadded
    /// weight): the unpack reference.
    pub fn unpack(&self) -> QuantizedWeight {
        let g = self.scheme.group_len(self.k);
        let ng_q = self.k.div_ceil(g);
        let gl = self.group_len();
        let mut q = QuantizedWeight {
            n: self.n,
            k: self.k,
            scheme: self.scheme,
            codes: vec![0; self.n * self.k],
            scales: vec![0.0; self.n * ng_q],
            zeros: vec![0; self.n * ng_q],
        };
        for n in 0..self.n {
            for k in 0..self.k {
                q.codes[n * self.k + k] = self.code_at(n, k);
            }
            for gq in 0..ng_q {
                let gi = (gq * g) / gl;
                q.scales[n * ng_q + gq] = self.scale_at(n, gi);
                q.zeros[n * ng_q + gq] = self.zero_at(n, gi);
            }
        }
        q
    }

    /// The dense `[n][k]` weight the kernel multiplies by: `round_T((code − zero) · scale)` with `T` the
    /// scale format (bf16 or f16), as f32. The W4A16 reference is this matrix times `x` in f64.
    ///
    /// ```
    /// use fusekit::quant::{quantize_rtn, PackedW4, WeightQuant};
    /// let w: Vec<f32> = (0..64).map(|i| i as f32 / 7.0).collect();
    /// let p = PackedW4::pack(&quantize_rtn(&w, 1, 64, &WeightQuant::int4(None, false))?)?;
    /// let d = p.dequantize_rounded();
    /// assert!(d.iter().all(|&v| half::bf16::from_f32(v).to_f32() == v)); // bf16 values
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn dequantize_rounded(&self) -> Vec<f32> {
        let gl = self.group_len();
        let mut out = vec![0.0f32; self.n * self.k];
        for n in 0..self.n {
            for k in 0..self.k {
                let gi = k / gl;
                let v =
                    (self.code_at(n, k) as f32 - self.zero_at(n, gi) as f32) * self.scale_at(n, gi);
                out[n * self.k + k] = match self.scheme.scale_format {
                    ScaleFormat::Bf16 => half::bf16::from_f32(v).to_f32(),
                    _ => half::f16::from_f32(v).to_f32(),
                };
            }
        }
        out
    }
}

/// The `format` metadata of a packed-W4 safetensors file.
const FILE_FORMAT: &str = "fusekit.packed_w4";

impl PackedW4 {
    /// The on-disk form of named packed layers: a safetensors file (readable by any safetensors
    /// library) with metadata `format = "fusekit.packed_w4"`, `version = "1"` and, per layer `name`,
    /// `name = "n=…;k=…;group=32|64|128|channel;symmetric=0|1;scales=bf16|f16;mse_clip=0|1"` (the last
    /// records how the codes were chosen), and the tensors
    /// `name.codes` (U32 `[n_pad/64, k_pad/16, 32, 4]`), `name.scales` (BF16/F16
    /// `[n_pad/64, n_groups, 8, 8]`) and, asymmetric only, `name.zeros` (U8, the scales' shape): the
    /// in-memory buffers byte for byte. Layer names must be non-empty, without `;`, `=` and not
    /// `format`/`version`.
    ///
    /// ```
    /// use fusekit::quant::{quantize_rtn, PackedW4, WeightQuant};
    /// let w: Vec<f32> = (0..70 * 150).map(|i| (i % 13) as f32 - 6.0).collect();
    /// let p = PackedW4::pack(&quantize_rtn(&w, 70, 150, &WeightQuant::int4(Some(32), false))?)?;
    /// let bytes = PackedW4::to_safetensors(&[("mlp.down_proj", &p)])?;
    /// let back = PackedW4::from_safetensors(&bytes)?;
    /// assert_eq!(back, vec![("mlp.down_proj".to_string(), p)]);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn to_safetensors(layers: &[(&str, &PackedW4)]) -> Result<Vec<u8>> {
        let mut file = LayerFileWriter::new(FILE_FORMAT, W4_FORMAT_VERSION);
        for (name, p) in layers {
            file.layer(name, p.header_string())?;
            p.validate()?;
            let (nb, ng) = (p.n_pad() / W4_N_PAD, p.n_groups());
            let scales_dtype = if p.scheme.scale_format == ScaleFormat::Bf16 {
                "BF16"
            } else {
                "F16"
            };
            file.tensor(
                format!("{name}.codes"),
                "U32",
                vec![nb, p.k_pad() / 16, 32, 4],
                le_words(&p.codes),
            );
            file.tensor(
                format!("{name}.scales"),
                scales_dtype,
                vec![nb, ng, 8, 8],
                le_halves(&p.scales),
            );
            if let Some(z) = &p.zeros {
                file.tensor(format!("{name}.zeros"), "U8", vec![nb, ng, 8, 8], z.clone());
            }
        }
        file.finish()
    }

    fn header_string(&self) -> String {
        format!(
            "n={};k={};group={};symmetric={};scales={};mse_clip={}",
            self.n,
            self.k,
            self.scheme
                .group
                .map_or("channel".to_string(), |g| g.to_string()),
            self.scheme.symmetric as u8,
            if self.scheme.scale_format == ScaleFormat::Bf16 {
                "bf16"
            } else {
                "f16"
            },
            self.scheme.mse_clip as u8
        )
    }

    /// Reads the layers [`to_safetensors`](Self::to_safetensors) wrote, in name order. Another format,
    /// another version (`Err(Unsupported)` naming both), a layer header that does not parse, a tensor of
    /// the wrong dtype or shape, a missing or unexpected tensor: a typed `Err`, before anything is used.
    ///
    /// ```
    /// use fusekit::quant::PackedW4;
    /// assert!(PackedW4::from_safetensors(b"\x02\0\0\0\0\0\0\0{}").is_err()); // no format metadata
    /// ```
    pub fn from_safetensors(bytes: &[u8]) -> Result<Vec<(String, PackedW4)>> {
        let mut file = LayerFileReader::open(bytes, FILE_FORMAT, W4_FORMAT_VERSION, "packed W4")?;
        let mut out = Vec::new();
        for (name, h) in file.layers() {
            let (name, h) = (&name, &h);
            let bad =
                |what: String| Error::invalid("safetensors", format!("layer {name:?}: {what}"));
            let mut fields = BTreeMap::new();
            for kv in h.split(';') {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| bad(format!("header {h:?}")))?;
                fields.insert(k, v);
            }
            let get = |k: &str| {
                fields
                    .get(k)
                    .copied()
                    .ok_or_else(|| bad(format!("no {k} in {h:?}")))
            };
            let num = |k: &str| -> Result<usize> {
                get(k)?.parse().map_err(|_| bad(format!("{k} in {h:?}")))
            };
            let (n, k) = (num("n")?, num("k")?);
            let group = match get("group")? {
                "channel" => None,
                g => Some(g.parse().map_err(|_| bad(format!("group in {h:?}")))?),
            };
            let symmetric = match get("symmetric")? {
                "0" => false,
                "1" => true,
                _ => return Err(bad(format!("symmetric in {h:?}"))),
            };
            let (scale_format, sdt) = match get("scales")? {
                "bf16" => (ScaleFormat::Bf16, "BF16"),
                "f16" => (ScaleFormat::F16, "F16"),
                _ => return Err(bad(format!("scales in {h:?}"))),
            };
            if n == 0 || k == 0 || n >= 1 << 31 || k >= 1 << 31 {
                return Err(bad(format!("a {n} x {k} weight")));
            }
            // How the codes were chosen (recorded, not needed to read them); absent: no search.
            let mse_clip = match fields.get("mse_clip") {
                None | Some(&"0") => false,
                Some(&"1") => true,
                Some(v) => return Err(bad(format!("mse_clip {v:?} in {h:?}"))),
            };
            if let Some(f) = fields
                .keys()
                .find(|f| !["n", "k", "group", "symmetric", "scales", "mse_clip"].contains(f))
            {
                return Err(bad(format!("unknown field {f:?} in {h:?}")));
            }
            if name.is_empty() || name.contains([';', '=']) {
                return Err(bad("a layer name to_safetensors would refuse".into()));
            }
            let scheme = WeightQuant {
                bits: 4,
                group,
                symmetric,
                scale_format,
                mse_clip,
            };
            scheme.validate()?;
            let mut p = PackedW4 {
                n,
                k,
                scheme,
                codes: Vec::new(),
                scales: Vec::new(),
                zeros: None,
            };
            let (nb, ng) = (p.n_pad() / W4_N_PAD, p.n_groups());
            p.codes = words_le(file.take(name, "codes", "U32", vec![nb, p.k_pad() / 16, 32, 4])?);
            p.scales = halves_le(file.take(name, "scales", sdt, vec![nb, ng, 8, 8])?);
            if !symmetric {
                p.zeros = Some(file.take(name, "zeros", "U8", vec![nb, ng, 8, 8])?.to_vec());
            }
            p.validate()?;
            out.push((name.clone(), p));
        }
        file.finish()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_own_slot() {
        // 64 x 128: the slots of all weights are distinct and cover the tile words exactly.
        let mut seen = std::collections::HashSet::new();
        for n in 0..64 {
            for k in 0..128 {
                assert!(seen.insert(code_slot(8, n, k)));
            }
        }
        assert_eq!(seen.len(), 64 * 128);
        assert!(seen.iter().all(|&(w, s)| w < 64 * 128 / 8 && s < 32));
    }

    #[test]
    fn padding_is_exactly_zero() {
        // n = 70, k = 150: columns 70..128 and k 150..256 are padding; groups of 32 (8 per row, the last
        // three wholly padding from k = 160) and per channel; asymmetric, so the zero points vary.
        for group in [Some(32), None] {
            let (n, k) = (70, 150);
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 0.9)
                .collect();
            let q = super::super::quantize_rtn(&w, n, k, &WeightQuant::int4(group, false)).unwrap();
            let p = PackedW4::pack(&q).unwrap();
            let gl = p.group_len();
            for r in 0..p.n_pad() {
                for c in 0..p.k_pad() {
                    if r < n && c < k {
                        continue;
                    }
                    let gi = c / gl;
                    assert_eq!(
                        p.code_at(r, c),
                        p.zero_at(r, gi),
                        "padded ({r}, {c}) is not its zero point"
                    );
                }
                for gi in 0..p.n_groups() {
                    if r >= n || gi * gl >= k {
                        assert_eq!(
                            (p.scale_at(r, gi), p.zero_at(r, gi)),
                            (0.0, 8),
                            "padding group ({r}, {gi})"
                        );
                    } else {
                        assert!(p.scale_at(r, gi) > 0.0);
                    }
                }
            }
        }
    }

    #[test]
    fn lane_words_follow_the_mma_fragment() {
        // Lane 4g + t, word w: pair p of nibbles (p, p + 4) is B register (p & 1) of subtile 2w + (p >> 1):
        // rows 2t, 2t + 1 (+8 for register 1) of column g.
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            for w in 0..4 {
                for p in 0..4 {
                    let j = 2 * w + p / 2;
                    let r = p % 2;
                    for h in 0..2 {
                        let (n, k) = (8 * j + g, 2 * t + h + 8 * r);
                        assert_eq!(code_slot(1, n, k), (lane * 4 + w, 4 * (p + 4 * h) as u32));
                    }
                }
            }
        }
    }
}
