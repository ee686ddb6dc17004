//! BiLLM on the GPU (issue 16, item 3): `y = x · Ŵᵀ` read straight from a [`PackedBillm`]'s bits on
//! tensor cores ([`billm_matmul`], for M from 1 to a few dozen), and the unpack of the packed weight to a
//! dense bf16/f16 matrix ([`billm_unpack`]) for large M, where a dense GEMM (cuBLAS) is the right tool
//! (`kernels/quant/billm.cu`).

use std::ffi::c_void;

use cudarc::driver::LaunchConfig;

use super::billm::{PackedBillm, BILLM_BLOCK, BILLM_FORMAT_VERSION};
use super::splitk::{self, SplitKPlan, SplitKWorkspace};
use super::w4a16::W4Element;
use crate::backend::private::{Addr, Device};
use crate::backend::Gemm;
use crate::device::{check_aligned, Family};
use crate::error::{Error, Result};
use crate::launch::{grid, launch_kernel};
use crate::params::*;
use crate::plan::PlannedLaunch;
use crate::validate::{exactly, owned};
use crate::{Backend, DeviceProps, DeviceRead, DeviceWrite};

// The kernels' block and format are the host's.
const _: () = assert!(FK_BILLM_BLOCK as usize == BILLM_BLOCK);
const _: () = assert!(FK_BILLM_FORMAT_VERSION == BILLM_FORMAT_VERSION);

/// The validated plan of a [`billm_matmul`]: `m` rows of activations times a packed `n × k` BiLLM
/// weight. A block takes 64 output rows and 4, 8 or 16 tokens (the smallest that covers `m`; more
/// tokens run as further blocks along z, each reading the weight again, so `m` beyond a few dozen is
/// better served by [`billm_unpack`] and a dense GEMM), and the 128-column blocks of `k` are shared out
/// among `splits` blocks along y (split-K, as [`W4A16Plan`](super::W4A16Plan): about two blocks per SM
/// by default, at most [`W4A16_MAX_SPLITS`](super::W4A16_MAX_SPLITS), added in order, so a plan
/// gives the same bits on every run).
///
/// ```
/// use fusekit::quant::{quantize_billm, BillmConfig, BillmPlan, Hessian, PackedBillm};
/// let (n, k) = (256, 1024);
/// let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 23) as f32 - 11.0) / 10.0).collect();
/// let mut h = Hessian::new(k)?;
/// h.add(&(0..16 * k).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect::<Vec<_>>())?;
/// let p = PackedBillm::pack(&quantize_billm(&w, n, k, &h, &BillmConfig::default())?)?;
/// let gpu = fusekit::DeviceProps::example_h100();
/// let plan = BillmPlan::new::<half::bf16>(&gpu, &p, 1, None)?;
/// // 4 row blocks x 8 column blocks: 8 splits of one column block each.
/// assert_eq!((plan.splits(), plan.workspace_elements()), (8, 8 * 256));
/// assert_eq!(plan.workspace_counters(), 4); // one per 64-row x 4-token output tile
/// // One launch: the last block of each tile to finish adds its splits.
/// assert_eq!(plan.launches().len(), 1);
/// assert_eq!(plan.launches()[0].kernel, "fk_billm_bf16_t1");
/// let one = BillmPlan::new::<half::f16>(&gpu, &p, 40, Some(1))?;
/// assert_eq!((one.launches().len(), one.launches()[0].kernel.as_str()), (1, "fk_billm_f16_t4"));
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct BillmPlan {
    m: usize,
    n: usize,
    k: usize,
    blocks: usize,
    tg: usize,
    splits: usize,
    blocks_per_split: usize,
    elem: &'static str,
}

impl BillmPlan {
    /// Validates a product of `m` rows of `T` (bf16 or f16) activations with `w` on the GPU `props`
    /// describes (compute capability 8.0 or newer: `mma.sync` bf16/f16 and `ldmatrix`), `m ≤ 1048560`,
    /// `n` and `k` below 2^31. `split` forces the number of k-splits (clamped to the 128-column blocks, at
    /// most [`W4A16_MAX_SPLITS`](super::W4A16_MAX_SPLITS)); `None` chooses it from the GPU's SM
    /// count. `m = 0` is valid and
    /// launches nothing.
    pub fn new<T: W4Element>(
        props: &DeviceProps,
        w: &PackedBillm,
        m: usize,
        split: Option<usize>,
    ) -> Result<Self> {
        splitk::check_request(
            props,
            ("BiLLM matmul", "mma.sync bf16/f16 and ldmatrix need"),
            m,
            16,
            split,
        )?;
        if w.n() >= 1 << 31 || w.k() >= 1 << 31 {
            return Err(Error::Unsupported {
                what: format!("a {} x {} weight (n and k below 2^31)", w.n(), w.k()),
            });
        }
        let tg = if m <= 4 {
            1
        } else if m <= 8 {
            2
        } else {
            4
        };
        let blocks = w.k().div_ceil(BILLM_BLOCK);
        let ctas = w.n().div_ceil(FK_BILLM_ROWS as usize) * m.div_ceil(4 * tg).max(1);
        let (splits, blocks_per_split) = splitk::choose(props, ctas, blocks, split);
        Ok(BillmPlan {
            m,
            n: w.n(),
            k: w.k(),
            blocks,
            tg,
            splits,
            blocks_per_split,
            elem: T::SUFFIX,
        })
    }

    /// Rows of activations.
    pub fn m(&self) -> usize {
        self.m
    }

    /// k-splits (blocks along y); with more than one, the last block of each output tile to finish adds
    /// the fp32 partials in split order, in the same launch.
    pub fn splits(&self) -> usize {
        self.splits
    }

    /// fp32 elements of workspace the product needs: `splits · m · n` with several splits, else 0.
    pub fn workspace_elements(&self) -> usize {
        splitk::partials(self.splits, self.m * self.n)
    }

    /// Arrival counters the product needs: one per output tile (64 rows of the weight × `4·TG`
    /// tokens) with several splits, else 0.
    pub fn workspace_counters(&self) -> usize {
        splitk::counters(
            self.splits,
            self.n.div_ceil(FK_BILLM_ROWS as usize) * self.m.div_ceil(4 * self.tg),
        )
    }

    /// Dynamic shared memory of the kernel: two staged activation tiles of 8 rows (each token's salient
    /// and other columns) of 136 elements per group of 4 tokens.
    ///
    /// ```
    /// use fusekit::quant::{quantize_billm, BillmConfig, BillmPlan, Hessian, PackedBillm};
    /// let (n, k) = (64, 128);
    /// let mut h = Hessian::new(k)?;
    /// h.add(&(0..16 * k).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect::<Vec<_>>())?;
    /// let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 23) as f32 - 11.0) / 10.0).collect();
    /// let p = PackedBillm::pack(&quantize_billm(&w, n, k, &h, &BillmConfig::default())?)?;
    /// let plan = BillmPlan::new::<half::bf16>(&fusekit::DeviceProps::example_h100(), &p, 16, None)?;
    /// assert_eq!(plan.shared_mem_bytes(), 2 * 4 * 8 * 136 * 2);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn shared_mem_bytes(&self) -> u32 {
        (2 * self.tg * 8 * (BILLM_BLOCK + 8) * 2) as u32
    }

    /// The kernels this plan launches, in order: one (none for `m = 0`).
    pub fn launches(&self) -> Vec<PlannedLaunch> {
        if self.m == 0 {
            return Vec::new();
        }
        vec![PlannedLaunch::new(
            format!("fk_billm_{}_t{}", self.elem, self.tg),
            self.config(),
        )]
    }

    fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                self.n.div_ceil(FK_BILLM_ROWS as usize) as u32,
                self.splits as u32,
                self.m.div_ceil(4 * self.tg) as u32,
            ),
            block_dim: (FK_BILLM_THREADS, 1, 1),
            shared_mem_bytes: self.shared_mem_bytes(),
        }
    }
}

/// A [`PackedBillm`] on a device: its sign bits, second bits, salient masks and parameters, for
/// [`billm_matmul`] and [`billm_unpack`].
#[derive(Debug)]
pub struct BillmDeviceWeight<B: Backend> {
    n: usize,
    k: usize,
    signs: B::Buffer<u32>,
    second: B::Buffer<u32>,
    salient: B::Buffer<u32>,
    params: B::Buffer<u16>,
}

impl<B: Backend> BillmDeviceWeight<B> {
    /// Uploads `w` to `dev`, after [`PackedBillm::validate`] (buffers that do not match the header,
    /// bits in the padding, non-finite or negative scales: an `Err`, nothing uploaded); `n` and `k`
    /// must be below 2^31 (`Err(Unsupported)`).
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// use fusekit::quant::{quantize_billm, BillmConfig, BillmDeviceWeight, Hessian, PackedBillm};
    /// let (n, k) = (8, 100);
    /// let mut h = Hessian::new(k)?;
    /// h.add(&(0..16 * k).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect::<Vec<_>>())?;
    /// let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 23) as f32 - 11.0) / 10.0).collect();
    /// let p = PackedBillm::pack(&quantize_billm(&w, n, k, &h, &BillmConfig::default())?)?;
    /// let dev = fusekit::emu::Emulator::new()?;
    /// let d = BillmDeviceWeight::upload(&dev, &p)?;
    /// assert_eq!((d.n(), d.k()), (8, 100));
    /// # Ok(()) }
    /// ```
    pub fn upload(dev: &B, w: &PackedBillm) -> Result<Self> {
        w.validate()?;
        if w.n() >= 1 << 31 || w.k() >= 1 << 31 {
            return Err(Error::Unsupported {
                what: format!("a {} x {} weight (n and k below 2^31)", w.n(), w.k()),
            });
        }
        Ok(BillmDeviceWeight {
            n: w.n(),
            k: w.k(),
            signs: dev.upload(&w.signs)?,
            second: dev.upload(&w.second)?,
            salient: dev.upload(&w.salient)?,
            params: dev.upload(&w.params)?,
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

    /// The device addresses of the signs, second bits, salient masks and parameters (and their
    /// guards), after checking that the buffers are `dev`'s and aligned as the kernels load them
    /// (16 bytes; the masks 4).
    fn ptrs<'a>(&'a self, dev: &'a B) -> Result<([u64; 4], [B::Guard<'a>; 4])> {
        owned(dev, "w", &self.signs)?;
        owned(dev, "w", &self.second)?;
        owned(dev, "w", &self.salient)?;
        owned(dev, "w", &self.params)?;
        let (s, gs) = self.signs.addr(dev);
        let (t, gt) = self.second.addr(dev);
        let (m, gm) = self.salient.addr(dev);
        let (p, gp) = self.params.addr(dev);
        for (a, align) in [(s, 16), (t, 16), (m, 4), (p, 16)] {
            check_aligned("w", a, align)?;
        }
        Ok(([s, t, m, p], [gs, gt, gm, gp]))
    }
}

/// Scratch for the split-K partials of [`billm_matmul`] ([`SplitKWorkspace`], shared with W4A16).
pub type BillmWorkspace<B> = SplitKWorkspace<B>;

impl splitk::private::Sealed for BillmPlan {}
impl SplitKPlan for BillmPlan {
    fn workspace_elements(&self) -> usize {
        BillmPlan::workspace_elements(self)
    }
    fn workspace_counters(&self) -> usize {
        BillmPlan::workspace_counters(self)
    }
}

/// `y = x · Ŵᵀ` with `Ŵ` a BiLLM weight read from its packed bits: `x` is `[m][k]` row-major `T`
/// (the plan's `m`, the weight's `k`), `y` is `[m][n]`. Per 128-column block and output row, the kernel
/// forms the seven bit-plane sums of the activations on tensor cores (fp32 accumulation) and applies the
/// row's `(α, μ)` pairs to them once (`kernels/quant/billm.cu`); the result, rounded once to `T`, matches
/// [`reference_billm`] (the packed weight's exact values times `x`, in f64) to fp32 accumulation error.
/// NaN or infinity in `x` makes the affected outputs NaN/inf, never a finite wrong value (as do bf16
/// activations beyond 1.7e38, half the bf16 range: the tensor cores sum them doubled). Shapes,
/// dtypes, the weight and the workspace are checked against the plan before anything is launched
/// (`Err`, nothing written).
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::quant::{
///     billm_matmul, quantize_billm, reference_billm, BillmConfig, BillmDeviceWeight, BillmPlan,
///     BillmWorkspace, Hessian, PackedBillm,
/// };
/// use half::bf16;
/// let (m, n, k) = (2, 16, 256);
/// let mut h = Hessian::new(k)?;
/// h.add(&(0..16 * k).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect::<Vec<_>>())?;
/// let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 23) as f32 - 11.0) / 10.0).collect();
/// let packed = PackedBillm::pack(&quantize_billm(&w, n, k, &h, &BillmConfig::default())?)?;
/// let dev = fusekit::emu::Emulator::new()?;
/// let dw = BillmDeviceWeight::upload(&dev, &packed)?;
/// let plan = BillmPlan::new::<bf16>(dev.props(), &packed, m, None)?;
/// let mut ws = BillmWorkspace::new(&dev, &plan)?;
/// let xs: Vec<bf16> = (0..m * k).map(|i| bf16::from_f32(((i % 7) as f32 - 3.0) / 4.0)).collect();
/// let x = dev.upload(&xs)?;
/// let mut y = dev.alloc_zeros::<bf16>(m * n)?;
/// billm_matmul(&dev, &plan, &x, &dw, &mut ws, &mut y)?;
/// let xf: Vec<f32> = xs.iter().map(|v| v.to_f32()).collect();
/// let want = reference_billm(&xf, m, &packed)?;
/// for (got, want) in dev.download(&y)?.iter().zip(&want) {
///     assert!((got.to_f64() - want).abs() <= 1e-2 * want.abs() + 1e-3);
/// }
/// # Ok(()) }
/// ```
pub fn billm_matmul<B, T, X, Y>(
    dev: &B,
    plan: &BillmPlan,
    x: &X,
    w: &BillmDeviceWeight<B>,
    ws: &mut BillmWorkspace<B>,
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
    if (w.n, w.k) != (plan.n, plan.k) {
        return Err(Error::shape(
            "w",
            format!("the plan's {} x {} weight", plan.n, plan.k),
            format!("{} x {}", w.n, w.k),
        ));
    }
    let ([sp, tp, mp, pp], _w) = w.ptrs(dev)?;
    let launches = plan.launches();
    if launches.is_empty() {
        return Ok(());
    }
    let (xp, _a) = x.addr(dev);
    let (yp, _b) = y.addr_mut(dev);
    let (wp, kp, ws_guards) = splitk::ws_addrs(dev, ws, plan.splits);
    check_aligned("x", xp, 2)?;
    check_aligned("y", yp, 2)?;
    let p = fk_billm_params {
        x: xp as *const c_void,
        signs: sp as *const u32,
        second: tp as *const u32,
        salient: mp as *const u32,
        params: pp as *const u16,
        y: yp as *mut c_void,
        ws: wp as *mut f32,
        counters: kp as *mut u32,
        m: plan.m as i64,
        lda: plan.k as i64,
        n: plan.n as i32,
        k: plan.k as i32,
        blocks: plan.blocks as i32,
        blocks_per_split: plan.blocks_per_split as i32,
    };
    // The kernel reads x's m·k elements and the weight's buffers (their lengths checked against the
    // header by BillmDeviceWeight::upload, the header equal to the plan's), and writes y's m·n elements,
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

/// The dense `[n][k]` weight a BiLLM layer stands for, in `T` (bf16 or f16): each value is
/// [`PackedBillm::dequantize`]'s, rounded once to `T`, written by one kernel launch
/// (`fk_billm_unpack_*`). For large M this and a dense GEMM (cuBLAS bf16) beat reading the bits per
/// token: the unpack costs `n·k` two-byte writes once per forward. `dense` must hold exactly `n·k`
/// elements; compute capability 8.0 or newer (the quantised-matmul kernels are built for sm_80 on).
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::quant::{billm_unpack, quantize_billm, BillmConfig, BillmDeviceWeight, Hessian, PackedBillm};
/// let (n, k) = (4, 200);
/// let mut h = Hessian::new(k)?;
/// h.add(&(0..16 * k).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect::<Vec<_>>())?;
/// let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 23) as f32 - 11.0) / 10.0).collect();
/// let packed = PackedBillm::pack(&quantize_billm(&w, n, k, &h, &BillmConfig::default())?)?;
/// let dev = fusekit::emu::Emulator::new()?;
/// let dw = BillmDeviceWeight::upload(&dev, &packed)?;
/// let mut dense = dev.alloc_zeros::<half::bf16>(n * k)?;
/// billm_unpack(&dev, &dw, &mut dense)?;
/// let want: Vec<half::bf16> = packed.dequantize().iter().map(|&v| half::bf16::from_f32(v)).collect();
/// assert_eq!(dev.download(&dense)?, want);
/// # Ok(()) }
/// ```
pub fn billm_unpack<B, T, Y>(dev: &B, w: &BillmDeviceWeight<B>, dense: &mut Y) -> Result<()>
where
    B: Backend,
    T: W4Element,
    Y: DeviceWrite<T, B>,
{
    let props = dev.props();
    if props.compute_capability < (8, 0) {
        return Err(Error::Unsupported {
            what: format!(
                "BiLLM unpack on compute capability {}.{} (8.0+)",
                props.compute_capability.0, props.compute_capability.1
            ),
        });
    }
    owned(dev, "dense", dense)?;
    let ([sp, tp, mp, pp], _w) = w.ptrs(dev)?;
    exactly("dense", dense.len(), w.n * w.k, "n * k")?;
    let (dp, _a) = dense.addr_mut(dev);
    check_aligned("dense", dp, 2)?;
    let blocks = w.k.div_ceil(BILLM_BLOCK);
    let p = fk_billm_unpack_params {
        signs: sp as *const u32,
        second: tp as *const u32,
        salient: mp as *const u32,
        params: pp as *const u16,
        w: dp as *mut c_void,
        n: w.n as i32,
        k: w.k as i32,
        blocks: blocks as i32,
        vec: (w.k % 8 == 0 && dp % 16 == 0) as i32,
    };
    let chunks = w.n * blocks * 16;
    // Reads the weight's buffers (lengths checked by upload), writes dense's n·k elements.
    launch_kernel(
        dev,
        Family::Quant,
        &format!("fk_billm_unpack_{}", T::SUFFIX),
        grid(chunks.div_ceil(256).min(65535 * 8), 256),
        &p,
        None,
    )
}

/// The BiLLM matmul reference: `x · Ŵᵀ` in f64 with `Ŵ` = [`PackedBillm::dequantize`] (the weights
/// the kernels multiply by), `x` `[m][k]` as f32. Returns `[m][n]`.
///
/// ```
/// use fusekit::quant::{quantize_billm, reference_billm, BillmConfig, Hessian, PackedBillm};
/// let (n, k) = (3, 40);
/// let mut h = Hessian::new(k)?;
/// h.add(&(0..16 * k).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect::<Vec<_>>())?;
/// let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 23) as f32 - 11.0) / 10.0).collect();
/// let p = PackedBillm::pack(&quantize_billm(&w, n, k, &h, &BillmConfig::default())?)?;
/// let x = vec![1.0f32; k];
/// let y = reference_billm(&x, 1, &p)?;
/// let row0: f64 = p.dequantize()[..k].iter().map(|&v| v as f64).sum();
/// assert_eq!(y[0], row0);
/// # Ok::<(), fusekit::Error>(())
/// ```
pub fn reference_billm(x: &[f32], m: usize, w: &PackedBillm) -> Result<Vec<f64>> {
    let (n, k) = (w.n(), w.k());
    if x.len() != m * k {
        return Err(Error::shape(
            "x",
            format!("{m} x {k} values"),
            format!("{}", x.len()),
        ));
    }
    w.validate()?;
    let wd = w.dequantize();
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

/// BiLLM for large M: the weight unpacked once to dense bf16 ([`billm_unpack`]), then one GEMM per
/// product (cuBLAS on a GPU, bf16 operands, fp32 accumulation; the emulator multiplies on the host).
/// Above a few dozen tokens this beats reading the bits per token ([`billm_matmul`]): the unpack writes
/// `n·k` two-byte values once, and the GEMM runs at tensor-core rate; it keeps those `2·n·k` bytes.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::quant::{quantize_billm, reference_billm, BillmConfig, BillmDense, BillmDeviceWeight, Hessian, PackedBillm};
/// use half::bf16;
/// let (m, n, k) = (70, 24, 200);
/// let mut h = Hessian::new(k)?;
/// h.add(&(0..16 * k).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect::<Vec<_>>())?;
/// let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 23) as f32 - 11.0) / 10.0).collect();
/// let packed = PackedBillm::pack(&quantize_billm(&w, n, k, &h, &BillmConfig::default())?)?;
/// let dev = fusekit::emu::Emulator::new()?;
/// let dense = BillmDense::new(&dev, &BillmDeviceWeight::upload(&dev, &packed)?)?;
/// let xs: Vec<bf16> = (0..m * k).map(|i| bf16::from_f32(((i % 7) as f32 - 3.0) / 4.0)).collect();
/// let x = dev.upload(&xs)?;
/// let mut y = dev.alloc_zeros::<bf16>(m * n)?;
/// dense.matmul(&dev, m, &x, &mut y)?;
/// let xf: Vec<f32> = xs.iter().map(|v| v.to_f32()).collect();
/// let want = reference_billm(&xf, m, &packed)?;
/// for (got, want) in dev.download(&y)?.iter().zip(&want) {
///     // The dense weight is rounded to bf16 once: a relative 2^-9 per weight on top of the output's.
///     assert!((got.to_f64() - want).abs() <= 2e-2 * want.abs() + 2e-2);
/// }
/// # Ok(()) }
/// ```
pub struct BillmDense<B: Backend> {
    blas: <B as Device>::Blas,
    n: usize,
    k: usize,
    w: B::Buffer<half::bf16>,
}

impl<B: Backend> std::fmt::Debug for BillmDense<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BillmDense")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish()
    }
}

impl<B: Backend> BillmDense<B> {
    /// Unpacks `w` on `dev` into a dense bf16 `[n][k]` buffer and opens the GEMM handle (`Err(Library)`
    /// when libcublas cannot be found on a GPU). `n` and `k` must be below 2^31 (cuBLAS's 32-bit sizes).
    pub fn new(dev: &B, w: &BillmDeviceWeight<B>) -> Result<Self> {
        let blas = dev.blas()?;
        let mut dense = dev.alloc_zeros::<half::bf16>(w.n * w.k)?;
        billm_unpack(dev, w, &mut dense)?;
        Ok(BillmDense {
            blas,
            n: w.n,
            k: w.k,
            w: dense,
        })
    }

    /// The dense weight (`[n][k]` bf16, row-major).
    pub fn weight(&self) -> &B::Buffer<half::bf16> {
        &self.w
    }

    /// `y = x · Ŵᵀ` for `m` rows: `x` is `[m][k]` bf16, `y` `[m][n]` bf16 (fp32 accumulation, one
    /// rounding). `m` below 2^31; lengths and devices checked first (`Err`, nothing written); `m = 0`
    /// does nothing.
    pub fn matmul<X, Y>(&self, dev: &B, m: usize, x: &X, y: &mut Y) -> Result<()>
    where
        X: DeviceRead<half::bf16, B>,
        Y: DeviceWrite<half::bf16, B>,
    {
        owned(dev, "x", x)?;
        owned(dev, "y", y)?;
        owned(dev, "w", &self.w)?;
        if m >= 1 << 31 {
            return Err(Error::Unsupported {
                what: format!("{m} rows (cuBLAS's sizes are 32-bit)"),
            });
        }
        exactly("x", x.len(), m * self.k, "m * k")?;
        exactly("y", y.len(), m * self.n, "m * n")?;
        if m == 0 {
            return Ok(());
        }
        let (xp, _a) = x.addr(dev);
        let (yp, _b) = y.addr_mut(dev);
        let (wp, _c) = self.w.addr(dev);
        // Yᵀ (col-major N×M) = W (K×N col-major)ᵀ · Xᵀ (K×M col-major).
        let g = Gemm {
            trans_a: true,
            trans_b: false,
            m: self.n,
            n: m,
            k: self.k,
            a: wp,
            lda: self.k,
            b: xp,
            ldb: self.k,
            c: yp,
            ldc: self.n,
            c_f32: false,
            beta: 0.0,
        };
        // SAFETY: W holds n·k, x m·k and y m·n elements (checked above), on this device; the leading
        // dimensions are the row lengths of these row-major matrices.
        unsafe { dev.gemm(&self.blas, &g) }
    }
}
