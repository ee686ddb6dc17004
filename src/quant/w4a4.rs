//! W4A4: `y = x̂ · Ŵᵀ` with `x̂` activations quantised per token to int4 (the output of
//! [`hadamard_quantize`](super::hadamard_quantize), [`QuantizedActivations`]) and `Ŵ` an int4 weight per
//! output channel, symmetric ([`PackedW4A4`]), on integer tensor cores (`kernels/quant/w4a4.cu`).
//!
//! Every product is exact in int32: `y[m][n] = s_x[m]·s_w[n]·(Σ_k (q_x − 8)(q_w − 8) − (z_x[m] − 8)·Σ_k (q_w − 8))`,
//! the last sum stored with the weight, so the result depends on neither the split nor the GPU path, and
//! only the epilogue rounds (two f32 multiplications, then the output type).

use std::ffi::c_void;

use cudarc::driver::LaunchConfig;

use super::act::QuantizedTokens;
use super::online::QuantizedActivations;
use super::rtn::{QuantizedWeight, ScaleFormat};
use super::splitk::{self, SplitKPlan, SplitKWorkspace};
use super::w4a16::W4Element;
use crate::backend::private::Addr;
use crate::device::{check_aligned, Family};
use crate::error::{Error, Result};
use crate::launch::launch_kernel;
use crate::params::*;
use crate::plan::PlannedLaunch;
use crate::validate::{exactly, owned};
use crate::{Backend, DeviceProps, DeviceWrite};

/// Version of [`PackedW4A4`]'s layout (`FK_W4A4_FORMAT_VERSION`).
pub const W4A4_FORMAT_VERSION: u32 = FK_W4A4_FORMAT_VERSION;
/// Input channels are padded to a multiple of this (a kernel chunk, two k64 MMA steps).
pub const W4A4_K_PAD: usize = FK_W4A4_KCHUNK as usize;
/// Output channels are padded to a multiple of this (a block's columns).
pub const W4A4_N_PAD: usize = FK_W4A4_NBLOCK as usize;
/// The largest `k` a W4A4 product takes: the sm_90 path sums 256× the products in int32.
pub const W4A4_MAX_K: usize = 65536;

const _: () = assert!(FK_W4A4_KCHUNK == 128 && FK_W4A4_NBLOCK == 64 && FK_W4A4_WARPS == 4);

/// Where code word `o` (8 input channels `8o..8o+7` of a 128-channel chunk) is stored within the
/// chunk's 16 words: the 4 × 4 transpose `4·(o % 4) + o / 4`, so lane `t` of a warp finds its words
/// `t, t + 4, t + 8, t + 12` (the B fragments of the chunk's two `m16n8k64` steps) in one 16-byte load.
fn chunk_position(o: usize) -> usize {
    4 * (o % 4) + o / 4
}

/// An int4 weight per output channel, symmetric (`w = s·(q − 8)`, `q` in 0..=15), packed for the W4A4
/// kernel (format [`W4A4_FORMAT_VERSION`]):
/// - `codes`: `[n_pad][k_pad / 8]` words; word `o` of a row holds `q − 8` of input channels `8o..8o+7`
///   as signed nibbles (channel `8o + i` in bits `4i..4i+3`, the order of `mma.sync`'s s4 operands),
///   and within each 128-channel chunk the 16 words are stored 4 × 4 transposed (word `4a + t` at
///   position `4t + a`). Padding is code 8 (the nibble 0), so padded weights are exactly zero.
/// - `scales`: `[n_pad]` f32 (the quantiser's bf16/f16 scale, exactly; 0 past `n`);
/// - `colsum`: `[n_pad]` i32, `Σ_k (q − 8)` per output channel (the zero-point correction of
///   asymmetric activations).
///
/// `n_pad` rounds `n` up to 64, `k_pad` rounds `k` up to 128. A [`PackedW4`](super::PackedW4) per
/// channel and symmetric (its on-disk form) converts with `PackedW4A4::pack(&packed.unpack())`.
///
/// ```
/// use fusekit::quant::{quantize_rtn, PackedW4A4, WeightQuant};
/// let w: Vec<f32> = (0..3 * 200).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0).collect();
/// let q = quantize_rtn(&w, 3, 200, &WeightQuant::int4(None, true))?;
/// let p = PackedW4A4::pack(&q)?;
/// assert_eq!((p.n(), p.k(), p.n_pad(), p.k_pad()), (3, 200, 64, 256));
/// assert_eq!(p.dequantize(), q.dequantize());
/// assert!(PackedW4A4::pack(&quantize_rtn(&w, 3, 200, &WeightQuant::int4(Some(32), true))?).is_err());
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct PackedW4A4 {
    n: usize,
    k: usize,
    scale_format: ScaleFormat,
    pub(crate) codes: Vec<u32>,
    pub(crate) scales: Vec<f32>,
    pub(crate) colsum: Vec<i32>,
}

impl PackedW4A4 {
    /// Packs `q`, which must be 4-bit, one group per output channel and symmetric (zero point 8), with
    /// finite non-negative scales; `n` at least 1 and below 2^31, `k` from 1 to [`W4A4_MAX_K`].
    /// Anything else is an `Err`.
    pub fn pack(q: &QuantizedWeight) -> Result<Self> {
        let s = q.scheme;
        if s.bits != 4 || s.group.is_some() || !s.symmetric {
            return Err(Error::Unsupported {
                what: format!(
                    "a W4A4 weight quantised as {s:?} (4-bit, one group per output channel, symmetric)"
                ),
            });
        }
        let (n, k) = (q.n, q.k);
        if n == 0 || k == 0 || n >= 1 << 31 {
            return Err(Error::shape(
                "q",
                "n in 1..2^31, k at least 1",
                format!("{n} x {k}"),
            ));
        }
        if k > W4A4_MAX_K {
            return Err(Error::Unsupported {
                what: format!("a W4A4 weight with k = {k} (at most {W4A4_MAX_K})"),
            });
        }
        if q.codes.len() != n * k || q.scales.len() != n || q.zeros.len() != n {
            return Err(Error::shape(
                "q",
                format!("{n} x {k} codes, {n} scales and zero points"),
                format!(
                    "{} codes, {} scales, {} zero points",
                    q.codes.len(),
                    q.scales.len(),
                    q.zeros.len()
                ),
            ));
        }
        if let Some(r) = q.scales.iter().position(|s| !(s.is_finite() && *s >= 0.0)) {
            return Err(Error::invalid(
                "q",
                format!(
                    "scale {} of output channel {r} (finite, at least 0)",
                    q.scales[r]
                ),
            ));
        }
        if let Some(i) = q.codes.iter().position(|&c| c > 15) {
            return Err(Error::invalid(
                "q",
                format!("code {} at {i} (0..=15)", q.codes[i]),
            ));
        }
        if let Some(r) = q.zeros.iter().position(|&z| z != 8) {
            return Err(Error::invalid(
                "q",
                format!("zero point {} of row {r} (8: symmetric)", q.zeros[r]),
            ));
        }
        let (n_pad, k_pad) = (
            n.next_multiple_of(W4A4_N_PAD),
            k.next_multiple_of(W4A4_K_PAD),
        );
        let words = k_pad / 8;
        let mut codes = vec![0u32; n_pad * words];
        let mut scales = vec![0.0f32; n_pad];
        let mut colsum = vec![0i32; n_pad];
        for r in 0..n {
            let row = &q.codes[r * k..(r + 1) * k];
            let out = &mut codes[r * words..(r + 1) * words];
            for (c, &code) in row.iter().enumerate() {
                let b = code as i32 - 8;
                let (o, i) = (c / 8, c % 8);
                let at = (o / 16) * 16 + chunk_position(o % 16);
                out[at] |= ((b as u32) & 0xf) << (4 * i);
                colsum[r] += b;
            }
            scales[r] = q.scales[r];
        }
        Ok(PackedW4A4 {
            n,
            k,
            scale_format: s.scale_format,
            codes,
            scales,
            colsum,
        })
    }

    /// Output channels.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input channels.
    pub fn k(&self) -> usize {
        self.k
    }

    /// `n` rounded up to [`W4A4_N_PAD`].
    pub fn n_pad(&self) -> usize {
        self.n.next_multiple_of(W4A4_N_PAD)
    }

    /// `k` rounded up to [`W4A4_K_PAD`].
    pub fn k_pad(&self) -> usize {
        self.k.next_multiple_of(W4A4_K_PAD)
    }

    /// The precision the quantiser stored the scales in (the packed scales are their exact f32 values).
    pub fn scale_format(&self) -> ScaleFormat {
        self.scale_format
    }

    /// Bytes of the packed weight: codes, scales and column sums (`n_pad·(k_pad/2 + 8)`).
    ///
    /// ```
    /// use fusekit::quant::{quantize_rtn, PackedW4A4, WeightQuant};
    /// let p = PackedW4A4::pack(&quantize_rtn(&vec![1.0f32; 64 * 128], 64, 128, &WeightQuant::int4(None, true))?)?;
    /// assert_eq!(p.bytes(), 64 * (64 + 8));
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn bytes(&self) -> usize {
        4 * (self.codes.len() + self.scales.len() + self.colsum.len())
    }

    /// The code `q − 8` (−8..=7) of output channel `r`, input channel `c` (both in range).
    fn code(&self, r: usize, c: usize) -> i32 {
        let words = self.k_pad() / 8;
        let o = c / 8;
        let w = self.codes[r * words + (o / 16) * 16 + chunk_position(o % 16)];
        (((w >> (4 * (c % 8))) & 0xf) as i32 ^ 8) - 8
    }

    /// The dense `[n][k]` weight, `(q − 8)·s` in f32 (exact: a 4-bit integer times a bf16/f16 scale),
    /// read back from the packed words.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = Vec::with_capacity(self.n * self.k);
        for r in 0..self.n {
            for c in 0..self.k {
                w.push(self.code(r, c) as f32 * self.scales[r]);
            }
        }
        w
    }
}

/// Which integer tensor-core instruction a [`W4A4Plan`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum W4A4Path {
    /// `mma.sync.m16n8k64.s4` (compute capability 8.x: Ampere, Ada).
    Int4,
    /// `mma.sync.m16n8k32.s8` on codes widened in registers (9.0 and newer: Hopper has no int4
    /// tensor cores; `src/quant/DESIGN.md` says why int8 rather than fp8).
    Int8,
}

/// The validated plan of a [`w4a4`] product: `m` quantised tokens times a packed `n × k` weight. The
/// kernel takes 16 or 64 tokens per block (16 up to `m = 16`), 64 output columns, and shares the
/// 128-deep k chunks out among `splits` blocks along z (split-K, as [`W4A16Plan`](super::W4A16Plan):
/// one launch, the last block of each tile adds the int32 partials). The result does not depend on
/// the split or the path: the sums are exact integers.
///
/// ```
/// use fusekit::quant::{quantize_rtn, PackedW4A4, W4A4Path, W4A4Plan, WeightQuant};
/// let p = PackedW4A4::pack(&quantize_rtn(&vec![0.5f32; 256 * 1024], 256, 1024, &WeightQuant::int4(None, true))?)?;
/// let h100 = fusekit::DeviceProps::example_h100();
/// let plan = W4A4Plan::new::<half::bf16>(&h100, &p, 1, None)?;
/// assert_eq!((plan.path(), plan.splits()), (W4A4Path::Int8, 8));
/// assert_eq!(plan.launches()[0].kernel, "fk_w4a4_s8_bf16_m16");
/// let mut ada = h100.clone();
/// ada.compute_capability = (8, 9);
/// let plan = W4A4Plan::new::<half::f16>(&ada, &p, 40, Some(1))?;
/// assert_eq!(plan.launches()[0].kernel, "fk_w4a4_s4_f16_m64");
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct W4A4Plan {
    m: usize,
    n: usize,
    k: usize,
    k_pad: usize,
    n_pad: usize,
    mt: usize,
    splits: usize,
    chunks_per_split: usize,
    path: W4A4Path,
    elem: &'static str,
}

impl W4A4Plan {
    /// Validates a product of `m` int4 tokens with `w` on the GPU `props` describes (compute
    /// capability 8.0 or newer; 9.0 and newer take [`W4A4Path::Int8`]), writing `T` (bf16 or f16):
    /// `k` a multiple of 8 (rows of codes are then whole 32-bit words) and at most [`W4A4_MAX_K`],
    /// `m ≤ 4194240`. `split` forces the number of k-splits (clamped to the chunks, at most
    /// [`W4A16_MAX_SPLITS`](super::W4A16_MAX_SPLITS)); `None` chooses it from the SM count. `m = 0` is
    /// valid and launches nothing.
    pub fn new<T: W4Element>(
        props: &DeviceProps,
        w: &PackedW4A4,
        m: usize,
        split: Option<usize>,
    ) -> Result<Self> {
        splitk::check_request(props, ("W4A4", "integer mma.sync needs"), m, 64, split)?;
        let k = w.k();
        if k % 8 != 0 || k > W4A4_MAX_K {
            return Err(Error::Unsupported {
                what: format!("W4A4 with k = {k} (a multiple of 8, at most {W4A4_MAX_K})"),
            });
        }
        let mt = if m <= 16 { 1 } else { 4 };
        let chunks = w.k_pad() / W4A4_K_PAD;
        let blocks_mn = (w.n_pad() / W4A4_N_PAD) * m.div_ceil(16 * mt).max(1);
        let (splits, chunks_per_split) = splitk::choose(props, blocks_mn, chunks, split);
        let plan = W4A4Plan {
            m,
            n: w.n(),
            k,
            k_pad: w.k_pad(),
            n_pad: w.n_pad(),
            mt,
            splits,
            chunks_per_split,
            path: if props.compute_capability >= (9, 0) {
                W4A4Path::Int8
            } else {
                W4A4Path::Int4
            },
            elem: T::SUFFIX,
        };
        splitk::check_shared_memory(props, plan.shared_mem_bytes(), 16 * mt)?;
        Ok(plan)
    }

    /// Tokens.
    pub fn m(&self) -> usize {
        self.m
    }

    /// The tensor-core path.
    pub fn path(&self) -> W4A4Path {
        self.path
    }

    /// k-splits (blocks along z); with more than one, the last block of each output tile to finish adds
    /// the int32 partials, in the same launch.
    pub fn splits(&self) -> usize {
        self.splits
    }

    /// Workspace elements (4 bytes each: the int32 partials) the product needs: `splits · m · n` with
    /// several splits, else 0.
    pub fn workspace_elements(&self) -> usize {
        splitk::partials(self.splits, self.m * self.n)
    }

    /// Arrival counters the product needs: one per output tile with several splits, else 0.
    pub fn workspace_counters(&self) -> usize {
        splitk::counters(
            self.splits,
            (self.n_pad / W4A4_N_PAD) * self.m.div_ceil(16 * self.mt),
        )
    }

    /// Dynamic shared memory: the four warps' int32 sums of a `16·MT × 64` tile.
    ///
    /// ```
    /// use fusekit::quant::{quantize_rtn, PackedW4A4, W4A4Plan, WeightQuant};
    /// let p = PackedW4A4::pack(&quantize_rtn(&vec![1.0f32; 64 * 128], 64, 128, &WeightQuant::int4(None, true))?)?;
    /// let plan = W4A4Plan::new::<half::bf16>(&fusekit::DeviceProps::example_h100(), &p, 1, None)?;
    /// assert_eq!(plan.shared_mem_bytes(), 4 * 16 * 64 * 4);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn shared_mem_bytes(&self) -> u32 {
        (FK_W4A4_WARPS as usize * 16 * self.mt * W4A4_N_PAD * 4) as u32
    }

    /// The kernels this plan launches: one (none for `m = 0`).
    pub fn launches(&self) -> Vec<PlannedLaunch> {
        if self.m == 0 {
            return Vec::new();
        }
        let path = match self.path {
            W4A4Path::Int4 => "s4",
            W4A4Path::Int8 => "s8",
        };
        vec![PlannedLaunch::new(
            format!("fk_w4a4_{path}_{}_m{}", self.elem, 16 * self.mt),
            self.config(),
        )]
    }

    fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                (self.n_pad / W4A4_N_PAD) as u32,
                self.m.div_ceil(16 * self.mt) as u32,
                self.splits as u32,
            ),
            block_dim: (FK_W4A4_THREADS, 1, 1),
            shared_mem_bytes: self.shared_mem_bytes(),
        }
    }
}

impl splitk::private::Sealed for W4A4Plan {}
impl SplitKPlan for W4A4Plan {
    fn workspace_elements(&self) -> usize {
        W4A4Plan::workspace_elements(self)
    }
    fn workspace_counters(&self) -> usize {
        W4A4Plan::workspace_counters(self)
    }
}

/// A [`PackedW4A4`] on a device, for [`w4a4`].
#[derive(Debug)]
pub struct W4A4Weight<B: Backend> {
    n: usize,
    k: usize,
    codes: B::Buffer<u32>,
    scales: B::Buffer<f32>,
    colsum: B::Buffer<i32>,
}

impl<B: Backend> W4A4Weight<B> {
    /// Uploads `w` to `dev`.
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// use fusekit::quant::{quantize_rtn, PackedW4A4, W4A4Weight, WeightQuant};
    /// let dev = fusekit::emu::Emulator::new()?;
    /// let p = PackedW4A4::pack(&quantize_rtn(&vec![1.0f32; 64 * 128], 64, 128, &WeightQuant::int4(None, true))?)?;
    /// let w = W4A4Weight::upload(&dev, &p)?;
    /// assert_eq!((w.n(), w.k()), (64, 128));
    /// # Ok(()) }
    /// ```
    pub fn upload(dev: &B, w: &PackedW4A4) -> Result<Self> {
        Ok(W4A4Weight {
            n: w.n,
            k: w.k,
            codes: dev.upload(&w.codes)?,
            scales: dev.upload(&w.scales)?,
            colsum: dev.upload(&w.colsum)?,
        })
    }

    /// Output channels.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input channels.
    pub fn k(&self) -> usize {
        self.k
    }
}

/// `y = x̂ · Ŵᵀ`: `x` holds the plan's `m` tokens of `k` int4 codes (per-token scale and zero point,
/// as [`hadamard_quantize`](super::hadamard_quantize) writes them), `w` the packed weight, `y` is
/// `[m][n]` `T`. The integer sums are exact, so `y` is [`reference_w4a4`] rounded through two f32
/// multiplications and once to `T`, the same bits for every split and on every GPU. A token whose
/// scale is NaN (the Hadamard kernel's mark of a token that held NaN or infinity) gives NaN outputs.
/// Shapes, bit widths, the weight and the workspace are checked against the plan before anything is
/// launched (`Err`, nothing written).
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::quant::{
///     quantize_rtn, quantize_tokens, reference_w4a4, w4a4, PackedW4A4, QuantizedActivations,
///     SplitKWorkspace, W4A4Plan, W4A4Weight, WeightQuant,
/// };
/// use half::bf16;
/// let (m, n, k) = (2, 8, 256);
/// let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 23) as f32 - 11.0) / 10.0).collect();
/// let packed = PackedW4A4::pack(&quantize_rtn(&w, n, k, &WeightQuant::int4(None, true))?)?;
/// let x: Vec<f32> = (0..m * k).map(|i| ((i % 7) as f32 - 3.0) / 4.0).collect();
/// let tokens = quantize_tokens(&x, k, 4, false)?;
/// let dev = fusekit::emu::Emulator::new()?;
/// let xq = QuantizedActivations::upload(&dev, &tokens)?;
/// let wd = W4A4Weight::upload(&dev, &packed)?;
/// let plan = W4A4Plan::new::<bf16>(dev.props(), &packed, m, None)?;
/// let mut ws = SplitKWorkspace::new(&dev, &plan)?;
/// let mut y = dev.alloc_zeros::<bf16>(m * n)?;
/// w4a4(&dev, &plan, &xq, &wd, &mut ws, &mut y)?;
/// let want = reference_w4a4(&tokens, &packed)?;
/// for (got, want) in dev.download(&y)?.iter().zip(&want) {
///     assert!((got.to_f64() - want).abs() <= want.abs() / 128.0 + 1e-30);
/// }
/// # Ok(()) }
/// ```
pub fn w4a4<B, T, Y>(
    dev: &B,
    plan: &W4A4Plan,
    x: &QuantizedActivations<B>,
    w: &W4A4Weight<B>,
    ws: &mut SplitKWorkspace<B>,
    y: &mut Y,
) -> Result<()>
where
    B: Backend,
    T: W4Element,
    Y: DeviceWrite<T, B>,
{
    if plan.elem != T::SUFFIX {
        return Err(Error::DType {
            arg: "y",
            expected: plan.elem.to_string(),
            got: T::SUFFIX.to_string(),
        });
    }
    if x.bits() != 4 {
        return Err(Error::DType {
            arg: "x",
            expected: "int4 codes".into(),
            got: format!("int{}", x.bits()),
        });
    }
    if (x.rows(), x.n()) != (plan.m, plan.k) {
        return Err(Error::shape(
            "x",
            format!("the plan's {} tokens of {} channels", plan.m, plan.k),
            format!("{} tokens of {}", x.rows(), x.n()),
        ));
    }
    if (w.n, w.k) != (plan.n, plan.k) {
        return Err(Error::shape(
            "w",
            format!("the plan's {} x {} weight", plan.n, plan.k),
            format!("{} x {}", w.n, w.k),
        ));
    }
    owned(dev, "x", x.codes())?;
    owned(dev, "x", x.scales())?;
    owned(dev, "x", x.zeros())?;
    owned(dev, "w", &w.codes)?;
    owned(dev, "w", &w.scales)?;
    owned(dev, "w", &w.colsum)?;
    owned(dev, "y", y)?;
    exactly("y", y.len(), plan.m * plan.n, "m * n")?;
    splitk::check_ws(dev, ws, plan)?;
    let launches = plan.launches();
    if launches.is_empty() {
        return Ok(());
    }
    let (xp, _a) = x.codes().addr(dev);
    let (xs, _b) = x.scales().addr(dev);
    let (xz, _c) = x.zeros().addr(dev);
    let (cp, _d) = w.codes.addr(dev);
    let (sp, _e) = w.scales.addr(dev);
    let (kp, _f) = w.colsum.addr(dev);
    let (yp, _g) = y.addr_mut(dev);
    let (wp, np, ws_guards) = splitk::ws_addrs(dev, ws, plan.splits);
    check_aligned("x", xp, 4)?;
    check_aligned("w", cp, 16)?;
    check_aligned("y", yp, 2)?;
    let p = fk_w4a4_params {
        x: xp as *const u8,
        x_scales: xs as *const f32,
        x_zeros: xz as *const u8,
        codes: cp as *const u32,
        w_scales: sp as *const f32,
        colsum: kp as *const i32,
        y: yp as *mut c_void,
        ws: wp as *mut i32,
        counters: np as *mut u32,
        m: plan.m as i64,
        n: plan.n as i32,
        k: plan.k as i32,
        k_pad: plan.k_pad as i32,
        chunks_per_split: plan.chunks_per_split as i32,
    };
    // The kernel reads x's m·k/2 code bytes (QuantizedActivations holds at least that) and m scales
    // and zero points, the weight's buffers (their lengths fixed by PackedW4A4::pack), and writes
    // y's m·n elements, with several splits also ws's splits·m·n and its counters (checked above).
    let launched = launch_kernel(
        dev,
        Family::Quant,
        &launches[0].kernel,
        plan.config(),
        &p,
        None,
    );
    drop(ws_guards);
    splitk::settle(dev, ws, launched)
}

/// The W4A4 reference: `Σ_k (q_x − z_x)·(q_w − 8)` as an exact integer per output, times `s_x·s_w` in
/// f64 (NaN where the token's scale is NaN), for the `[rows][k]` tokens `x` (4-bit) and the packed
/// weight. Returns `[rows][n]`.
///
/// ```
/// use fusekit::quant::{quantize_rtn, quantize_tokens, reference_w4a4, PackedW4A4, WeightQuant};
/// let p = PackedW4A4::pack(&quantize_rtn(&vec![0.5f32; 2 * 8], 2, 8, &WeightQuant::int4(None, true))?)?;
/// let x = quantize_tokens(&[1.0f32; 8], 8, 4, true)?;
/// let y = reference_w4a4(&x, &p)?;
/// // The product of what the codes stand for.
/// let (xd, wd) = (x.dequantize(), p.dequantize());
/// let want: f64 = (0..8).map(|i| xd[i] as f64 * wd[i] as f64).sum();
/// assert!((y[0] - want).abs() < 1e-6 && y[0] == y[1]);
/// # Ok::<(), fusekit::Error>(())
/// ```
pub fn reference_w4a4(x: &QuantizedTokens, w: &PackedW4A4) -> Result<Vec<f64>> {
    let (n, k) = (w.n, w.k);
    if x.bits != 4 || x.k != k || x.codes.len() % k.max(1) != 0 {
        return Err(Error::shape(
            "x",
            format!("int4 tokens of {k} channels"),
            format!("int{} tokens of {} ({} codes)", x.bits, x.k, x.codes.len()),
        ));
    }
    let rows = x.codes.len() / k;
    if x.scales.len() != rows || x.zeros.len() != rows {
        return Err(Error::shape(
            "x",
            format!("{rows} scales and zero points"),
            format!("{} and {}", x.scales.len(), x.zeros.len()),
        ));
    }
    let dense: Vec<i32> = (0..n)
        .flat_map(|r| (0..k).map(move |c| (r, c)))
        .map(|(r, c)| w.code(r, c))
        .collect();
    let mut y = vec![0.0f64; rows * n];
    for m in 0..rows {
        let xr = &x.codes[m * k..(m + 1) * k];
        let z = x.zeros[m] as i64;
        for c in 0..n {
            let wr = &dense[c * k..(c + 1) * k];
            let s: i64 = xr
                .iter()
                .zip(wr)
                .map(|(&a, &b)| (a as i64 - z) * b as i64)
                .sum();
            y[m * n + c] = s as f64 * x.scales[m] as f64 * w.scales[c] as f64;
        }
    }
    Ok(y)
}
