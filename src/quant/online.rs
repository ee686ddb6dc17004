//! The online Hadamard transform of activations, fused with per-token quantisation
//! (`kernels/quant/hadamard.cu`): `x·H_n` for each token, then either rounded to bf16/f16 (for W4A16
//! with a rotated weight) or quantised to int4/int8 codes with an fp32 scale and zero point per token
//! (the activations of W4A4 / W4A8). One pass over the activations: they are read once and only the
//! codes are written.

use std::ffi::c_void;

use cudarc::driver::LaunchConfig;

use super::act::QuantizedTokens;
use super::hadamard::factor;
use super::w4a16::W4Element;
use crate::backend::private::AddrMut;
use crate::device::Family;
use crate::error::{Error, Result};
use crate::launch::launch_kernel;
use crate::params::*;
use crate::plan::PlannedLaunch;
use crate::validate::{at_least, exactly, owned};
use crate::{Backend, DeviceProps, DeviceRead, DeviceWrite};

/// What the fused kernel writes for each token `r = x·H_n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HadamardOutput {
    /// `r` rounded to the activation type ([`hadamard_rotate`]).
    Rotated,
    /// 4-bit codes, two per byte (element `2j` in the low nibble of byte `j`, the order of int4
    /// `mma.sync` operands), with a scale and zero point per token ([`hadamard_quantize`]).
    Int4 {
        /// Zero point 8 and `scale = 2·max|r| / 15`; else asymmetric over `[min(r, 0), max(r, 0)]`.
        symmetric: bool,
    },
    /// 8-bit codes, one per byte, with a scale and zero point per token ([`hadamard_quantize`]).
    Int8 {
        /// Zero point 128 and `scale = 2·max|r| / 255`; else asymmetric.
        symmetric: bool,
    },
}

impl HadamardOutput {
    fn bits(self) -> u32 {
        match self {
            HadamardOutput::Rotated => 0,
            HadamardOutput::Int4 { .. } => 4,
            HadamardOutput::Int8 { .. } => 8,
        }
    }

    fn symmetric(self) -> bool {
        matches!(
            self,
            HadamardOutput::Int4 { symmetric: true } | HadamardOutput::Int8 { symmetric: true }
        )
    }
}

/// The validated plan of the fused Hadamard kernel over `rows` tokens of `n` channels:
/// `n = m · 2^k` with `m ∈ {1, 12, 20, 28, 36, 44, 60}` (see [`factor`]), the token held in shared
/// memory (`4·n` bytes, so `n` up to about 50000 on an H100, 24000 on an sm_86 card), one block per
/// token.
///
/// ```
/// use fusekit::quant::{HadamardOutput, HadamardPlan};
/// let gpu = fusekit::DeviceProps::example_h100();
/// // SmolLM2's hidden size: 576 = 36 · 16.
/// let plan = HadamardPlan::new::<half::bf16>(&gpu, 1000, 576, HadamardOutput::Int4 { symmetric: false })?;
/// assert_eq!((plan.factor(), plan.code_bytes_per_row()), ((36, 16), 288));
/// assert_eq!(plan.launches()[0].kernel, "fk_hadq_bf16_m36");
/// assert!(HadamardPlan::new::<half::bf16>(&gpu, 1, 11008, HadamardOutput::Rotated).is_err()); // 43 · 256
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct HadamardPlan {
    rows: usize,
    n: usize,
    m: usize,
    p: usize,
    out: HadamardOutput,
    elem: &'static str,
}

impl HadamardPlan {
    /// Validates the transform of `rows` tokens of `n` `T` channels with output `out` on the GPU
    /// `props` describes: `n` a supported Hadamard size whose row fits in shared memory, `rows` below
    /// 2^31. `rows = 0` is valid and launches nothing.
    pub fn new<T: W4Element>(
        props: &DeviceProps,
        rows: usize,
        n: usize,
        out: HadamardOutput,
    ) -> Result<Self> {
        let (m, p) = factor(n)?;
        if n >= 1 << 28 {
            return Err(Error::Unsupported {
                what: format!("a Hadamard transform of {n} channels (below 2^28)"),
            });
        }
        if rows >= 1 << 31 {
            return Err(Error::Unsupported {
                what: format!("{rows} tokens in one launch (below 2^31)"),
            });
        }
        let plan = HadamardPlan {
            rows,
            n,
            m,
            p,
            out,
            elem: T::SUFFIX,
        };
        if plan.shared_mem_bytes() as u64 > props.smem_per_block_optin {
            return Err(Error::Unsupported {
                what: format!(
                    "a Hadamard transform of {n} channels: the token needs {} B of shared memory ({} allows {})",
                    4 * n.next_multiple_of(32) + 128,
                    props.name,
                    props.smem_per_block_optin
                ),
            });
        }
        Ok(plan)
    }

    /// Tokens.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Channels per token.
    pub fn n(&self) -> usize {
        self.n
    }

    /// `(m, 2^k)` with `n = m · 2^k`.
    pub fn factor(&self) -> (usize, usize) {
        (self.m, self.p)
    }

    /// What the kernel writes.
    pub fn output(&self) -> HadamardOutput {
        self.out
    }

    /// Bytes of codes per token: `ceil(n / 2)` for int4, `n` for int8, 0 for [`HadamardOutput::Rotated`].
    pub fn code_bytes_per_row(&self) -> usize {
        match self.out {
            HadamardOutput::Rotated => 0,
            HadamardOutput::Int4 { .. } => self.n.div_ceil(2),
            HadamardOutput::Int8 { .. } => self.n,
        }
    }

    /// Dynamic shared memory per block: the token in fp32 plus 128 bytes of reduction scratch.
    pub fn shared_mem_bytes(&self) -> u32 {
        (4 * self.n.next_multiple_of(32) + 128) as u32
    }

    /// The kernels this plan launches (none for `rows = 0`).
    pub fn launches(&self) -> Vec<PlannedLaunch> {
        if self.rows == 0 {
            return Vec::new();
        }
        vec![PlannedLaunch::new(
            format!("fk_hadq_{}_m{}", self.elem, self.m),
            self.config(),
        )]
    }

    fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.rows as u32, 1, 1),
            block_dim: (FK_HADQ_THREADS, 1, 1),
            shared_mem_bytes: self.shared_mem_bytes(),
        }
    }

    fn params(
        &self,
        x: u64,
        y: u64,
        codes: u64,
        scales: u64,
        zeros: u64,
        vec: bool,
    ) -> fk_hadq_params {
        fk_hadq_params {
            x: x as *const c_void,
            y: y as *mut c_void,
            codes: codes as *mut u8,
            scales: scales as *mut f32,
            zeros: zeros as *mut u8,
            rows: self.rows as i64,
            norm: (1.0 / (self.n as f64).sqrt()) as f32,
            n: self.n as i32,
            m: self.m as i32,
            log2p: self.p.trailing_zeros() as i32,
            bits: self.out.bits() as i32,
            symmetric: self.out.symmetric() as i32,
            vec: vec as i32,
        }
    }

    /// Launches the plan's one kernel (callers have checked every buffer against the plan).
    fn launch<B: Backend>(&self, dev: &B, p: &fk_hadq_params) -> Result<()> {
        launch_kernel(
            dev,
            Family::Quant,
            &self.launches()[0].kernel,
            self.config(),
            p,
            None,
        )
    }

    fn check_type<T: W4Element>(&self) -> Result<()> {
        if self.elem != T::SUFFIX {
            return Err(Error::DType {
                arg: "x",
                expected: self.elem.to_string(),
                got: T::SUFFIX.to_string(),
            });
        }
        Ok(())
    }
}

/// Per-token quantised activations on a device, as [`hadamard_quantize`] writes them: `[rows][bytes]`
/// codes (see [`HadamardPlan::code_bytes_per_row`]), one f32 scale and one zero point per token. A
/// value is `(code − zero) · scale`; a token that held NaN or infinity has a NaN scale.
#[derive(Debug)]
pub struct QuantizedActivations<B: Backend> {
    rows: usize,
    n: usize,
    bits: u32,
    codes: B::Buffer<u8>,
    scales: B::Buffer<f32>,
    zeros: B::Buffer<u8>,
}

impl<B: Backend> QuantizedActivations<B> {
    /// Buffers for the output of `plan` (which must quantise: int4 or int8).
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// use fusekit::Backend;
    /// use fusekit::quant::{HadamardOutput, HadamardPlan, QuantizedActivations};
    /// let dev = fusekit::emu::Emulator::new()?;
    /// let plan = HadamardPlan::new::<half::f16>(dev.props(), 3, 384, HadamardOutput::Int8 { symmetric: true })?;
    /// let q = QuantizedActivations::new(&dev, &plan)?;
    /// assert_eq!((q.rows(), q.n(), q.bits()), (3, 384, 8));
    /// # Ok(()) }
    /// ```
    pub fn new(dev: &B, plan: &HadamardPlan) -> Result<Self> {
        Self::from_buffers(
            plan,
            dev.alloc_zeros((plan.rows * plan.code_bytes_per_row()).max(1))?,
            dev.alloc_zeros(plan.rows.max(1))?,
            dev.alloc_zeros(plan.rows.max(1))?,
        )
    }

    /// Wraps buffers the caller owns (no copy): `codes` at least
    /// `rows · plan.code_bytes_per_row()` bytes, `scales` and `zeros` at least `rows` entries.
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// use fusekit::Backend;
    /// use fusekit::quant::{HadamardOutput, HadamardPlan, QuantizedActivations};
    /// let dev = fusekit::emu::Emulator::new()?;
    /// let plan = HadamardPlan::new::<half::bf16>(dev.props(), 4, 64, HadamardOutput::Int4 { symmetric: true })?;
    /// let q = QuantizedActivations::<fusekit::emu::Emulator>::from_buffers(
    ///     &plan,
    ///     dev.alloc_zeros::<u8>(4 * 32)?,
    ///     dev.alloc_zeros::<f32>(4)?,
    ///     dev.alloc_zeros::<u8>(4)?,
    /// )?;
    /// assert!(QuantizedActivations::<fusekit::emu::Emulator>::from_buffers(
    ///     &plan, dev.alloc_zeros::<u8>(100)?, dev.alloc_zeros::<f32>(4)?, dev.alloc_zeros::<u8>(4)?
    /// ).is_err());
    /// # Ok(()) }
    /// ```
    pub fn from_buffers(
        plan: &HadamardPlan,
        codes: B::Buffer<u8>,
        scales: B::Buffer<f32>,
        zeros: B::Buffer<u8>,
    ) -> Result<Self> {
        let bits = plan.out.bits();
        if bits == 0 {
            return Err(Error::invalid(
                "plan",
                "a plan with HadamardOutput::Rotated writes no codes (use hadamard_rotate)",
            ));
        }
        at_least(
            "codes",
            codes.len(),
            plan.rows * plan.code_bytes_per_row(),
            "rows * code_bytes_per_row",
        )?;
        at_least("scales", scales.len(), plan.rows, "rows")?;
        at_least("zeros", zeros.len(), plan.rows, "rows")?;
        Ok(QuantizedActivations {
            rows: plan.rows,
            n: plan.n,
            bits,
            codes,
            scales,
            zeros,
        })
    }

    /// Uploads tokens quantised on the host ([`quantize_tokens`](super::quantize_tokens), 4 or 8 bits)
    /// in the device layout (int4 codes two per byte, element `2j` in the low nibble), for a W4A4
    /// product of activations that were not quantised by [`hadamard_quantize`]. Codes beyond the bit
    /// width, or scale and zero-point counts that do not match the rows, are an `Err`.
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// use fusekit::quant::{quantize_tokens, QuantizedActivations};
    /// let dev = fusekit::emu::Emulator::new()?;
    /// let t = quantize_tokens(&[0.5, -1.0, 2.0, 0.0, 1.0, 3.0], 3, 4, false)?;
    /// let q = QuantizedActivations::upload(&dev, &t)?;
    /// assert_eq!((q.rows(), q.n(), q.bits()), (2, 3, 4));
    /// assert_eq!(q.download(&dev)?, t);
    /// # Ok(()) }
    /// ```
    pub fn upload(dev: &B, t: &QuantizedTokens) -> Result<Self> {
        if t.bits != 4 && t.bits != 8 {
            return Err(Error::Unsupported {
                what: format!("{}-bit activation codes on a device (4 or 8)", t.bits),
            });
        }
        let k = t.k;
        if k == 0 || t.codes.len() % k != 0 {
            return Err(Error::shape(
                "t",
                format!("rows of k = {k} >= 1 codes"),
                format!("{} codes", t.codes.len()),
            ));
        }
        let rows = t.codes.len() / k;
        exactly("t.scales", t.scales.len(), rows, "rows")?;
        exactly("t.zeros", t.zeros.len(), rows, "rows")?;
        let max = (1u32 << t.bits) - 1;
        if let Some(i) = t.codes.iter().position(|&c| c as u32 > max) {
            return Err(Error::invalid(
                "t",
                format!(
                    "code {} at ({}, {}) (at most {max})",
                    t.codes[i],
                    i / k,
                    i % k
                ),
            ));
        }
        if let Some(r) = t.zeros.iter().position(|&z| z as u32 > max) {
            return Err(Error::invalid(
                "t",
                format!("zero point {} of token {r} (at most {max})", t.zeros[r]),
            ));
        }
        let codes = if t.bits == 4 {
            let per = k.div_ceil(2);
            let mut packed = vec![0u8; rows * per];
            for (i, &c) in t.codes.iter().enumerate() {
                let (r, j) = (i / k, i % k);
                packed[r * per + j / 2] |= c << (4 * (j % 2));
            }
            packed
        } else {
            t.codes.clone()
        };
        Ok(QuantizedActivations {
            rows,
            n: k,
            bits: t.bits,
            // Never an empty allocation (no rows): one unused element, as `new` makes.
            codes: dev.upload(if codes.is_empty() { &[0u8][..] } else { &codes })?,
            scales: dev.upload(if rows == 0 { &[0f32][..] } else { &t.scales })?,
            zeros: dev.upload(if rows == 0 { &[0u8][..] } else { &t.zeros })?,
        })
    }

    /// Tokens.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Channels per token.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Bits per code (4 or 8).
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// The packed codes, `[rows][ceil(n·bits/8)]` bytes.
    pub fn codes(&self) -> &B::Buffer<u8> {
        &self.codes
    }

    /// The per-token scales.
    pub fn scales(&self) -> &B::Buffer<f32> {
        &self.scales
    }

    /// The per-token zero points.
    pub fn zeros(&self) -> &B::Buffer<u8> {
        &self.zeros
    }

    /// Copies the activations to the host, int4 codes unpacked to one per byte: the layout of
    /// [`quantize_tokens`](super::quantize_tokens)' result, so the two compare directly.
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// use fusekit::Backend;
    /// use fusekit::quant::{hadamard_quantize, HadamardOutput, HadamardPlan, QuantizedActivations};
    /// let dev = fusekit::emu::Emulator::new()?;
    /// let plan = HadamardPlan::new::<half::bf16>(dev.props(), 1, 16, HadamardOutput::Int4 { symmetric: true })?;
    /// let mut q = QuantizedActivations::new(&dev, &plan)?;
    /// // A constant token rotates to 4·1 in channel 0 and 0 elsewhere.
    /// let x = dev.upload(&vec![half::bf16::ONE; 16])?;
    /// hadamard_quantize(&dev, &plan, &x, &mut q)?;
    /// let t = q.download(&dev)?;
    /// assert_eq!((t.codes[0], t.codes[1], t.zeros[0]), (15, 8, 8)); // round(4 / (8/15)) + 8 = 16 → 15
    /// # Ok(()) }
    /// ```
    pub fn download(&self, dev: &B) -> Result<QuantizedTokens> {
        let raw = dev.download(&self.codes)?;
        let codes = if self.bits == 4 {
            let per = self.n.div_ceil(2);
            (0..self.rows * self.n)
                .map(|i| {
                    let (r, c) = (i / self.n, i % self.n);
                    (raw[r * per + c / 2] >> (4 * (c % 2))) & 15
                })
                .collect()
        } else {
            raw[..self.rows * self.n].to_vec()
        };
        let mut scales = dev.download(&self.scales)?;
        let mut zeros = dev.download(&self.zeros)?;
        scales.truncate(self.rows);
        zeros.truncate(self.rows);
        Ok(QuantizedTokens {
            k: self.n,
            bits: self.bits,
            codes,
            scales,
            zeros,
        })
    }
}

/// `y = x · H_n` for each of the plan's tokens (`x`, `y` `[rows][n]` `T`), in fp32, rounded once to
/// `T`; the plan's output must be [`HadamardOutput::Rotated`]. Compare
/// [`hadamard::rotate_rows`](super::hadamard::rotate_rows), the f64 reference. Rows that are 16 bytes
/// (`n % 8 == 0`, aligned buffers) go through vector loads, others element by element.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::quant::{hadamard_rotate, HadamardOutput, HadamardPlan};
/// use half::bf16;
/// let dev = fusekit::emu::Emulator::new()?;
/// let plan = HadamardPlan::new::<bf16>(dev.props(), 2, 12, HadamardOutput::Rotated)?;
/// let x = dev.upload(&vec![bf16::from_f32(2.0); 24])?;
/// let mut y = dev.alloc_zeros::<bf16>(24)?;
/// hadamard_rotate(&dev, &plan, &x, &mut y)?;
/// // The norm is kept: |y|² = |x|² = 48 per token.
/// let y = dev.download(&y)?;
/// let norm: f32 = y[..12].iter().map(|v| v.to_f32() * v.to_f32()).sum();
/// assert!((norm - 48.0).abs() < 0.5);
/// # Ok(()) }
/// ```
pub fn hadamard_rotate<B, T, X, Y>(dev: &B, plan: &HadamardPlan, x: &X, y: &mut Y) -> Result<()>
where
    B: Backend,
    T: W4Element,
    X: DeviceRead<T, B>,
    Y: DeviceWrite<T, B>,
{
    plan.check_type::<T>()?;
    if plan.out != HadamardOutput::Rotated {
        return Err(Error::invalid(
            "plan",
            format!(
                "a plan for {:?} (hadamard_rotate needs HadamardOutput::Rotated)",
                plan.out
            ),
        ));
    }
    owned(dev, "x", x)?;
    owned(dev, "y", y)?;
    exactly("x", x.len(), plan.rows * plan.n, "rows * n")?;
    exactly("y", y.len(), plan.rows * plan.n, "rows * n")?;
    if plan.rows == 0 {
        return Ok(());
    }
    let (xp, _a) = x.addr(dev);
    let (yp, _b) = y.addr_mut(dev);
    crate::device::check_aligned("x", xp, 2)?;
    crate::device::check_aligned("y", yp, 2)?;
    let vec = plan.n % 8 == 0 && xp % 16 == 0 && yp % 16 == 0;
    let p = plan.params(xp, yp, 0, 0, 0, vec);
    // Reads rows·n elements of x, writes rows·n of y (lengths checked above).
    plan.launch(dev, &p)
}

/// The rotation fused with per-token quantisation: for each token, `r = x · H_n` in fp32, then codes,
/// scale and zero point exactly as [`quantize_tokens`](super::quantize_tokens) computes them from `r`
/// (the same f32 operations; a code can differ from the f64 reference's by one only where `r / scale`
/// lies within fp32 rounding of a half-integer). A token holding NaN or infinity (or whose rotated
/// range overflows f32) gets a NaN scale and codes 0, so whatever consumes it produces NaN, never a
/// finite wrong value.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::quant::{hadamard_quantize, HadamardOutput, HadamardPlan, QuantizedActivations};
/// let dev = fusekit::emu::Emulator::new()?;
/// // Two tokens of MiniLM's width, 384 = 12 · 32, to int8.
/// let plan = HadamardPlan::new::<half::f16>(dev.props(), 2, 384, HadamardOutput::Int8 { symmetric: false })?;
/// let x: Vec<half::f16> = (0..768).map(|i| half::f16::from_f32((i % 7) as f32 - 3.0)).collect();
/// let xd = dev.upload(&x)?;
/// let mut q = QuantizedActivations::new(&dev, &plan)?;
/// hadamard_quantize(&dev, &plan, &xd, &mut q)?;
/// let t = q.download(&dev)?;
/// assert!(t.scales.iter().all(|s| s.is_finite() && *s > 0.0));
/// # Ok(()) }
/// ```
pub fn hadamard_quantize<B, T, X>(
    dev: &B,
    plan: &HadamardPlan,
    x: &X,
    out: &mut QuantizedActivations<B>,
) -> Result<()>
where
    B: Backend,
    T: W4Element,
    X: DeviceRead<T, B>,
{
    plan.check_type::<T>()?;
    if plan.out.bits() == 0 {
        return Err(Error::invalid(
            "plan",
            "a plan for HadamardOutput::Rotated (hadamard_quantize needs Int4 or Int8)",
        ));
    }
    if (out.rows, out.n, out.bits) != (plan.rows, plan.n, plan.out.bits()) {
        return Err(Error::shape(
            "out",
            format!(
                "{} tokens x {} channels, {} bits",
                plan.rows,
                plan.n,
                plan.out.bits()
            ),
            format!("{} x {}, {} bits", out.rows, out.n, out.bits),
        ));
    }
    owned(dev, "x", x)?;
    owned(dev, "out", &out.codes)?;
    owned(dev, "out", &out.scales)?;
    owned(dev, "out", &out.zeros)?;
    exactly("x", x.len(), plan.rows * plan.n, "rows * n")?;
    if plan.rows == 0 {
        return Ok(());
    }
    let (xp, _a) = x.addr(dev);
    let (cp, _b) = out.codes.addr_mut(dev);
    let (sp, _c) = out.scales.addr_mut(dev);
    let (zp, _d) = out.zeros.addr_mut(dev);
    crate::device::check_aligned("x", xp, 2)?;
    let vec = plan.n % 8 == 0 && xp % 16 == 0 && cp % 4 == 0;
    let p = plan.params(xp, 0, cp, sp, zp, vec);
    // Reads rows·n elements of x; writes rows·code_bytes_per_row codes and rows scales and zero points
    // into buffers QuantizedActivations::new sized for this shape (checked above).
    plan.launch(dev, &p)
}
