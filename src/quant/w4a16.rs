//! W4A16: `y = x · Ŵᵀ` with `Ŵ` a packed int4 weight ([`PackedW4`]) and `x`, `y` bf16 or f16, on
//! tensor cores with fp32 accumulation (`kernels/quant/w4a16.cu`).

use std::ffi::c_void;

use cudarc::driver::LaunchConfig;

use super::packed::{PackedW4, W4_K_PAD, W4_N_PAD};
use super::rtn::{ScaleFormat, WeightQuant};
use super::splitk::{self, SplitKPlan, SplitKWorkspace};
use crate::backend::private::Addr;
use crate::device::{check_aligned, Family};
use crate::error::{Error, Result};
use crate::launch::launch_kernel;
use crate::params::*;
use crate::plan::PlannedLaunch;
use crate::validate::owned;
use crate::{Backend, DeviceProps, DeviceRead, DeviceWrite};

/// Activation types of the W4A16 kernel: bf16 and f16 (the weight's scales are the same type).
pub trait W4Element: crate::testing::Element + crate::dtype::sealed::Sealed {
    /// Kernel-name suffix.
    const SUFFIX: &'static str;
    /// The scale format a weight for this activation type has.
    const SCALES: ScaleFormat;
}
impl W4Element for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    const SCALES: ScaleFormat = ScaleFormat::Bf16;
}
impl W4Element for half::f16 {
    const SUFFIX: &'static str = "f16";
    const SCALES: ScaleFormat = ScaleFormat::F16;
}

/// The validated plan of a [`w4a16`] product: `m` rows of activations times a packed `n × k` weight.
/// The kernel takes 16, 32 or 64 rows per block (the smallest that covers `m`), 64 output columns, and
/// splits `k` into 128-deep slabs shared out among `splits` blocks along z (split-K) so that small `m`
/// still fills the GPU: by default about two blocks per SM, at most
/// [`W4A16_MAX_SPLITS`](super::W4A16_MAX_SPLITS). The split is
/// part of the plan, so a plan gives the same bits on every run (the splits are added in order).
///
/// ```
/// use fusekit::quant::{quantize_rtn, PackedW4, W4A16Plan, WeightQuant};
/// let q = quantize_rtn(&vec![0.5f32; 256 * 1024], 256, 1024, &WeightQuant::int4(Some(128), false))?;
/// let p = PackedW4::pack(&q)?;
/// let gpu = fusekit::DeviceProps::example_h100();
/// let plan = W4A16Plan::new::<half::bf16>(&gpu, &p, 1, None)?;
/// // 4 column blocks x 8 slabs: 8 splits of one slab each fill 32 of 132 SMs' worth.
/// assert_eq!((plan.splits(), plan.workspace_elements()), (8, 8 * 256));
/// assert_eq!(plan.workspace_counters(), 4); // one per 16 x 64 output tile
/// // One launch: the last block of each tile to finish adds its splits.
/// assert_eq!(plan.launches().len(), 1);
/// assert_eq!(plan.launches()[0].kernel, "fk_w4a16_bf16_m16");
/// let one = W4A16Plan::new::<half::bf16>(&gpu, &p, 100, Some(1))?;
/// assert_eq!((one.launches().len(), one.launches()[0].kernel.as_str()), (1, "fk_w4a16_bf16_m64"));
/// assert!(W4A16Plan::new::<half::f16>(&gpu, &p, 1, None).is_err()); // bf16 scales
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct W4A16Plan {
    m: usize,
    n: usize,
    k: usize,
    k_pad: usize,
    n_pad: usize,
    scheme: WeightQuant,
    mt: usize,
    splits: usize,
    slabs_per_split: usize,
    elem: &'static str,
}

impl W4A16Plan {
    /// Validates a product of `m` rows of `T` activations with `w` on the GPU `props` describes
    /// (compute capability 8.0 or newer): `T`'s scale format is the weight's, `m ≤ 4194240`,
    /// `n` and the padded `k` below 2^31. `split` forces the number of k-splits (clamped to the slabs, at most
    /// [`W4A16_MAX_SPLITS`](super::W4A16_MAX_SPLITS)); `None` chooses it from the GPU's SM count.
    /// `m = 0` is valid and launches
    /// nothing.
    pub fn new<T: W4Element>(
        props: &DeviceProps,
        w: &PackedW4,
        m: usize,
        split: Option<usize>,
    ) -> Result<Self> {
        splitk::check_request(
            props,
            ("W4A16", "mma.sync bf16/f16 and cp.async need"),
            m,
            64,
            split,
        )?;
        let scheme = w.scheme();
        if scheme.scale_format != T::SCALES {
            return Err(Error::DType {
                arg: "x",
                expected: format!("{:?} (the weight's scale format)", scheme.scale_format),
                got: T::SUFFIX.to_string(),
            });
        }
        if w.n() >= 1 << 31 || w.k_pad() >= 1 << 31 {
            return Err(Error::Unsupported {
                what: format!("a {} x {} weight (n and k below 2^31)", w.n(), w.k()),
            });
        }
        let mt = if m <= 16 {
            1
        } else if m <= 32 {
            2
        } else {
            4
        };
        let slabs = w.k_pad() / W4_K_PAD;
        let blocks_mn = (w.n_pad() / W4_N_PAD) * m.div_ceil(16 * mt).max(1);
        let (splits, slabs_per_split) = splitk::choose(props, blocks_mn, slabs, split);
        let plan = W4A16Plan {
            m,
            n: w.n(),
            k: w.k(),
            k_pad: w.k_pad(),
            n_pad: w.n_pad(),
            scheme,
            mt,
            splits,
            slabs_per_split,
            elem: T::SUFFIX,
        };
        splitk::check_shared_memory(props, plan.shared_mem_bytes(), 16 * mt)?;
        Ok(plan)
    }

    /// Rows of activations.
    pub fn m(&self) -> usize {
        self.m
    }

    /// k-splits (blocks along z); with more than one, the last block of each output tile to finish adds
    /// the fp32 partials in split order, in the same launch.
    pub fn splits(&self) -> usize {
        self.splits
    }

    /// fp32 elements of workspace the product needs: `splits · m · n` with several splits, else 0.
    pub fn workspace_elements(&self) -> usize {
        splitk::partials(self.splits, self.m * self.n)
    }

    /// Arrival counters the product needs: one per output tile (`16·MT` rows × 64 columns) with several
    /// splits, else 0.
    pub fn workspace_counters(&self) -> usize {
        splitk::counters(
            self.splits,
            (self.n_pad / W4_N_PAD) * self.m.div_ceil(16 * self.mt),
        )
    }

    /// Dynamic shared memory of the GEMM kernel: 4 pipeline stages of codes (4 KiB), scales and zero
    /// points (768 B) and the `16·MT × 128` activation tile.
    ///
    /// ```
    /// use fusekit::quant::{quantize_rtn, PackedW4, W4A16Plan, WeightQuant};
    /// let p = PackedW4::pack(&quantize_rtn(&vec![1.0f32; 64 * 128], 64, 128, &WeightQuant::int4(None, true))?)?;
    /// let plan = W4A16Plan::new::<half::bf16>(&fusekit::DeviceProps::example_h100(), &p, 1, None)?;
    /// assert_eq!(plan.shared_mem_bytes(), 4 * (4096 + 768 + 4096));
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn shared_mem_bytes(&self) -> u32 {
        FK_W4A16_STAGES * (4096 + 768 + 16 * self.mt as u32 * 128 * 2)
    }

    /// The kernels this plan launches, in order: one (none for `m = 0`).
    pub fn launches(&self) -> Vec<PlannedLaunch> {
        if self.m == 0 {
            return Vec::new();
        }
        vec![PlannedLaunch::new(
            format!("fk_w4a16_{}_m{}", self.elem, 16 * self.mt),
            self.config(),
        )]
    }

    fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                (self.n_pad / W4_N_PAD) as u32,
                self.m.div_ceil(16 * self.mt) as u32,
                self.splits as u32,
            ),
            block_dim: (FK_W4A16_THREADS, 1, 1),
            shared_mem_bytes: self.shared_mem_bytes(),
        }
    }
}

/// A [`PackedW4`] on a device: its codes, scales and (asymmetric) zero points, for [`w4a16`].
#[derive(Debug)]
pub struct W4A16Weight<B: Backend> {
    n: usize,
    k: usize,
    scheme: WeightQuant,
    codes: B::Buffer<u32>,
    scales: B::Buffer<u16>,
    zeros: Option<B::Buffer<u8>>,
}

impl<B: Backend> W4A16Weight<B> {
    /// Uploads `w` to `dev`, after [`PackedW4::validate`] (buffers of the wrong length are an `Err`).
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// use fusekit::quant::{quantize_rtn, PackedW4, W4A16Weight, WeightQuant};
    /// let dev = fusekit::emu::Emulator::new()?;
    /// let p = PackedW4::pack(&quantize_rtn(&vec![1.0f32; 64 * 128], 64, 128, &WeightQuant::int4(None, true))?)?;
    /// let w = W4A16Weight::upload(&dev, &p)?;
    /// assert_eq!((w.n(), w.k()), (64, 128));
    /// # Ok(()) }
    /// ```
    pub fn upload(dev: &B, w: &PackedW4) -> Result<Self> {
        w.validate()?;
        Ok(W4A16Weight {
            n: w.n(),
            k: w.k(),
            scheme: w.scheme(),
            codes: dev.upload(&w.codes)?,
            scales: dev.upload(&w.scales)?,
            zeros: w.zeros.as_ref().map(|z| dev.upload(z)).transpose()?,
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

/// Scratch for the split-K partials of [`w4a16`] ([`SplitKWorkspace`], shared with BiLLM).
pub type W4A16Workspace<B> = SplitKWorkspace<B>;

impl splitk::private::Sealed for W4A16Plan {}
impl SplitKPlan for W4A16Plan {
    fn workspace_elements(&self) -> usize {
        W4A16Plan::workspace_elements(self)
    }
    fn workspace_counters(&self) -> usize {
        W4A16Plan::workspace_counters(self)
    }
}

/// `y = x · Ŵᵀ`: `x` is `[m][k]` row-major `T` (the plan's `m`, the weight's `k`), `y` is `[m][n]`.
/// Each weight is `round_T((code − zero) · scale)`, dequantised in registers and multiplied on tensor
/// cores with fp32 accumulation; the result, rounded once to `T`, matches
/// [`PackedW4::dequantize_rounded`] times `x` in f64 to fp32 accumulation error. `x` with rows
/// 16-byte aligned (`k % 8 == 0`, an aligned buffer) is loaded by `cp.async`; other `x` also works,
/// element by element. NaN or infinity in `x` or a scale makes the affected outputs NaN/inf, never a
/// finite wrong value. Shapes, dtypes, the weight and the workspace are checked against the plan
/// before anything is launched (`Err`, nothing written).
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::quant::{quantize_rtn, w4a16, PackedW4, W4A16Plan, W4A16Weight, W4A16Workspace, WeightQuant};
/// use half::bf16;
/// let dev = fusekit::emu::Emulator::new()?;
/// let (m, n, k) = (2, 8, 64);
/// // Every weight 0.5 (exact in int4 with a bf16 scale), every activation 1.
/// let q = quantize_rtn(&vec![0.5f32; n * k], n, k, &WeightQuant::int4(Some(32), false))?;
/// let packed = PackedW4::pack(&q)?;
/// let w = W4A16Weight::upload(&dev, &packed)?;
/// let plan = W4A16Plan::new::<bf16>(dev.props(), &packed, m, None)?;
/// let mut ws = W4A16Workspace::new(&dev, &plan)?;
/// let x = dev.upload(&vec![bf16::ONE; m * k])?;
/// let mut y = dev.alloc_zeros::<bf16>(m * n)?;
/// w4a16(&dev, &plan, &x, &w, &mut ws, &mut y)?;
/// assert!(dev.download(&y)?.iter().all(|&v| v == bf16::from_f32(32.0)));
/// # Ok(()) }
/// ```
pub fn w4a16<B, T, X, Y>(
    dev: &B,
    plan: &W4A16Plan,
    x: &X,
    w: &W4A16Weight<B>,
    ws: &mut W4A16Workspace<B>,
    y: &mut Y,
) -> Result<()>
where
    B: Backend,
    T: W4Element,
    X: DeviceRead<T, B>,
    Y: DeviceWrite<T, B>,
{
    splitk::check_io(
        dev,
        (plan.elem, T::SUFFIX),
        (plan.m, plan.n, plan.k),
        x,
        y,
        ws,
        plan,
    )?;
    if (w.n, w.k, w.scheme) != (plan.n, plan.k, plan.scheme) {
        return Err(Error::shape(
            "w",
            format!(
                "the plan's {} x {} weight ({:?})",
                plan.n, plan.k, plan.scheme
            ),
            format!("{} x {} ({:?})", w.n, w.k, w.scheme),
        ));
    }
    owned(dev, "w", &w.codes)?;
    owned(dev, "w", &w.scales)?;
    if let Some(z) = &w.zeros {
        owned(dev, "w", z)?;
    }
    let launches = plan.launches();
    if launches.is_empty() {
        return Ok(());
    }
    let (xp, _a) = x.addr(dev);
    let (yp, _b) = y.addr_mut(dev);
    let (cp, _c) = w.codes.addr(dev);
    let (sp, _d) = w.scales.addr(dev);
    let zp = w.zeros.as_ref().map(|z| z.addr(dev));
    let (wp, kp, ws_guards) = splitk::ws_addrs(dev, ws, plan.splits);
    check_aligned("y", yp, 2)?;
    check_aligned("x", xp, 2)?;
    let a_vec = plan.k % 8 == 0 && xp % 16 == 0;
    let p = fk_w4a16_params {
        x: xp as *const c_void,
        codes: cp as *const u32,
        scales: sp as *const c_void,
        zeros: zp.as_ref().map_or(std::ptr::null(), |z| z.0 as *const u8),
        y: yp as *mut c_void,
        ws: wp as *mut f32,
        counters: kp as *mut u32,
        m: plan.m as i64,
        lda: plan.k as i64,
        n: plan.n as i32,
        k: plan.k as i32,
        k_pad: plan.k_pad as i32,
        n_groups: (plan.k_pad / plan.scheme.group.unwrap_or(plan.k_pad)) as i32,
        group_len: plan.scheme.group.unwrap_or(plan.k_pad) as i32,
        slabs_per_split: plan.slabs_per_split as i32,
        a_vec: a_vec as i32,
    };
    // The kernel reads x's m·k elements and the weight buffers (their lengths checked against the
    // header by W4A16Weight::upload, the header equal to the plan's), and writes y's m·n elements,
    // with several splits also ws's splits·m·n and its counters (one per tile; both checked against
    // the plan).
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

/// The W4A16 reference: `x · Ŵᵀ` in f64 with `Ŵ` = [`PackedW4::dequantize_rounded`] (the weights the
/// kernel multiplies by), `x` `[m][k]` as f32. Returns `[m][n]`.
///
/// ```
/// use fusekit::quant::{quantize_rtn, reference_w4a16, PackedW4, WeightQuant};
/// let p = PackedW4::pack(&quantize_rtn(&vec![0.5f32; 2 * 4], 2, 4, &WeightQuant::int4(None, false))?)?;
/// assert_eq!(reference_w4a16(&[1.0, 2.0, 3.0, 4.0], 1, &p)?, vec![5.0, 5.0]);
/// # Ok::<(), fusekit::Error>(())
/// ```
pub fn reference_w4a16(x: &[f32], m: usize, w: &PackedW4) -> Result<Vec<f64>> {
    let (n, k) = (w.n(), w.k());
    if x.len() != m * k {
        return Err(Error::shape(
            "x",
            format!("{m} x {k} values"),
            format!("{}", x.len()),
        ));
    }
    w.validate()?;
    let wd = w.dequantize_rounded();
    let mut y = vec![0.0f64; m * n];
    for r in 0..m {
        let xr = &x[r * k..(r + 1) * k];
        for c in 0..n {
            let wr = &wd[c * k..(c + 1) * k];
            y[r * n + c] = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
        }
    }
    Ok(y)
}
