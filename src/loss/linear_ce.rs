//! Fused linear + cross-entropy: `loss(hidden · weightᵀ, targets)` and the gradients for `hidden` and
//! `weight`, without ever holding the `[N, V]` logits: rows are processed in chunks of C, each chunk's
//! logits `[C, V]` (bf16) computed by cuBLAS, turned into their gradient in place by the fused loss kernel,
//! and consumed by two more GEMMs. The extra memory is `C·V·2` bytes whatever N is.
//!
//! Per chunk c (rows r0..r1), row-major:
//! ```text
//! L_c  = H_c · Wᵀ                      [C, V]  bf16   (cuBLAS, fp32 accumulation)
//! L_c ← ∂loss/∂L_c                     [C, V]  bf16   (fk_ce_fwd_bwd, in place; mean over all N rows)
//! dH_c = L_c · W                       [C, H]  bf16
//! dW  += L_cᵀ · H_c                    [V, H]  fp32   (accumulated across chunks in fp32)
//! ```
//! Like Liger-Kernel, the logits of a chunk are materialised in bf16 (the GEMM's output type); the loss
//! statistics and the gradient's target column are fp32.

use half::bf16;

use super::launch::{denominator, fused_kernel, reduce_rows, FusedPtrs};
use super::{
    check_ctx, check_len, FusedArgs, FusedPlan, GradBuffer, LossConfig, LossExtras, LossOutputs,
    Reduction, Rows, TargetIndex,
};
use crate::backend::opt_addr;
use crate::backend::private::{Addr, AddrMut, Device};
use crate::backend::Gemm;
use crate::error::{Error, Result};
use crate::plan::mul;
use crate::validate::exactly;
use crate::{Backend, DeviceRead, DeviceWrite, Gpu};

/// Lengths of the buffers of one [`LinearCrossEntropy::fwd_bwd`] call, for its plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearCeLens {
    /// Elements of `hidden`.
    pub hidden: usize,
    /// Elements of `weight`.
    pub weight: usize,
    /// Elements of `grad_hidden`.
    pub grad_hidden: usize,
    /// Elements of `grad_weight`.
    pub grad_weight: usize,
}

/// How many rows a chunk holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunking {
    /// Exactly this many rows per chunk (the last may be shorter).
    Rows(usize),
    /// As many rows as fit `bytes` of bf16 logits (`bytes / (2·V)`, at least 1).
    MemoryBudget(usize),
}

/// Workspace and GEMM handle (cuBLAS on a GPU) of fused linear + cross-entropy for one (V, H) pair.
pub struct LinearCrossEntropy<B: Backend = Gpu> {
    blas: <B as Device>::Blas,
    dev: B,
    chunk_rows: usize,
    vocab: usize,
    hidden: usize,
    logits: B::Buffer<bf16>,
}

impl<B: Backend> std::fmt::Debug for LinearCrossEntropy<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinearCrossEntropy")
            .field("vocab", &self.vocab)
            .field("hidden", &self.hidden)
            .field("chunk_rows", &self.chunk_rows)
            .finish()
    }
}

impl<B: Backend> LinearCrossEntropy<B> {
    /// Workspace for classifier weights `[vocab, hidden]`, chunked as asked. On a GPU it opens cuBLAS on
    /// the handle's stream (`Err(Library)` when libcublas cannot be found); the emulator multiplies on
    /// the host.
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// use fusekit::loss::{Chunking, LinearCrossEntropy};
    /// let dev = fusekit::emu::Emulator::new()?; // or fusekit::Gpu::new(0)?
    /// let lce = LinearCrossEntropy::new(&dev, 1000, 64, Chunking::MemoryBudget(64 << 10))?;
    /// assert_eq!(lce.chunk_rows(), 32);
    /// # Ok(()) }
    /// ```
    pub fn new(dev: &B, vocab: usize, hidden: usize, chunking: Chunking) -> Result<Self> {
        if vocab == 0 || hidden == 0 {
            return Err(Error::shape(
                "weight",
                "[vocab >= 1, hidden >= 1]",
                format!("[{vocab}, {hidden}]"),
            ));
        }
        if vocab > i32::MAX as usize || hidden > i32::MAX as usize {
            return Err(Error::Unsupported {
                what: format!("vocab {vocab} / hidden {hidden} beyond cuBLAS's 32-bit dimensions"),
            });
        }
        let chunk_rows = match chunking {
            Chunking::Rows(0) => {
                return Err(Error::invalid(
                    "chunking",
                    "Rows(0): a chunk needs at least one row",
                ))
            }
            Chunking::Rows(c) => c,
            Chunking::MemoryBudget(b) => (b / (2 * vocab)).max(1),
        };
        // Checked: a product that wrapped would allocate too small a chunk for the GEMM to write.
        match chunk_rows.checked_mul(vocab) {
            Some(e) if e <= i32::MAX as usize => {}
            _ => {
                return Err(Error::invalid(
                    "chunking",
                    format!("{chunk_rows} rows x vocab {vocab} exceed cuBLAS's 32-bit sizes"),
                ))
            }
        }
        let blas = dev.blas()?;
        let logits = dev.alloc_zeros::<bf16>(chunk_rows * vocab)?;
        Ok(LinearCrossEntropy {
            blas,
            dev: dev.clone(),
            chunk_rows,
            vocab,
            hidden,
            logits,
        })
    }

    /// Rows per chunk.
    ///
    /// ```
    /// # let dev = fusekit::emu::Emulator::new().unwrap();
    /// # let lce = fusekit::loss::LinearCrossEntropy::new(&dev, 1000, 64, fusekit::loss::Chunking::Rows(256)).unwrap();
    /// assert_eq!(lce.chunk_rows(), 256);
    /// ```
    pub fn chunk_rows(&self) -> usize {
        self.chunk_rows
    }

    /// Peak device memory this path needs beyond its inputs and outputs: the bf16 logits of one chunk.
    ///
    /// ```
    /// # let dev = fusekit::emu::Emulator::new().unwrap();
    /// # let lce = fusekit::loss::LinearCrossEntropy::new(&dev, 1000, 64, fusekit::loss::Chunking::Rows(256)).unwrap();
    /// assert_eq!(lce.extra_bytes(), 256 * 1000 * 2);
    /// ```
    pub fn extra_bytes(&self) -> usize {
        self.chunk_rows * self.vocab * 2
    }

    /// Validates a [`fwd_bwd`](Self::fwd_bwd) call of `n_rows` rows from the lengths of its buffers,
    /// without a device: the plan of each chunk's fused kernel.
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// use fusekit::loss::{Chunking, FusedArgs, GradBuffer, LinearCeLens, LinearCrossEntropy, LossConfig};
    /// let dev = fusekit::emu::Emulator::new()?;
    /// let lce = LinearCrossEntropy::new(&dev, 16, 8, Chunking::Rows(3))?;
    /// let lens = LinearCeLens { hidden: 4 * 8, weight: 16 * 8, grad_hidden: 4 * 8, grad_weight: 16 * 8 };
    /// let args = FusedArgs::new(0, GradBuffer::None, 4, 4);
    /// lce.plan::<i64>(&fusekit::DeviceProps::example_h100(), 4, &lens, &args, &LossConfig::default())?;
    /// let short = LinearCeLens { weight: 16 * 8 - 1, ..lens };
    /// assert!(lce.plan::<i64>(&fusekit::DeviceProps::example_h100(), 4, &short, &args, &LossConfig::default()).is_err());
    /// # Ok(()) }
    /// ```
    pub fn plan<I: TargetIndex>(
        &self,
        props: &crate::DeviceProps,
        n_rows: usize,
        lens: &LinearCeLens,
        args: &FusedArgs<'_>,
        cfg: &LossConfig,
    ) -> Result<FusedPlan> {
        let (v, h) = (self.vocab, self.hidden);
        if n_rows > i32::MAX as usize {
            return Err(Error::Unsupported {
                what: format!("{n_rows} rows beyond cuBLAS's 32-bit dimensions"),
            });
        }
        let nh = mul("hidden", n_rows, h, "N * H")?;
        let vh = mul("weight", v, h, "V * H")?;
        exactly("hidden", lens.hidden, nh, "[N, H]")?;
        exactly("weight", lens.weight, vh, "[V, H]")?;
        check_len("grad_hidden", lens.grad_hidden, nh, "[N, H]")?;
        check_len("grad_weight", lens.grad_weight, vh, "[V, H]")?;
        // The whole batch's targets, outputs and upstream gradient; each chunk's fused kernel works in
        // place in the chunk buffer.
        let params = super::plan::common(n_rows, v, args, cfg, true)?;
        let chunk = Rows::contiguous(self.chunk_rows.min(n_rows).max(1), v);
        FusedPlan::assemble::<bf16, I>(props, chunk, params, cfg, args.row_path, true)
    }

    /// Loss of `hidden [N, H] · weightᵀ` against `targets [N]`, with `grad_hidden [N, H]` (bf16) and
    /// `grad_weight [V, H]` (fp32; overwritten, or added to with `accumulate` for gradient accumulation over
    /// micro-batches). Every [`LossConfig`] option applies. Queued on the handle's stream.
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// use fusekit::Backend;
    /// use fusekit::loss::{Chunking, LinearCrossEntropy, LossConfig, LossOutputs};
    /// use half::bf16;
    /// let dev = fusekit::emu::Emulator::new()?; // or fusekit::Gpu::new(0)? (n = 1024, V = 32000, ...)
    /// let (n, h, v) = (4, 8, 16);
    /// let hidden = dev.alloc_zeros::<bf16>(n * h)?;
    /// let weight = dev.alloc_zeros::<bf16>(v * h)?;
    /// let targets = dev.alloc_zeros::<i64>(n)?;
    /// let mut dh = dev.alloc_zeros::<bf16>(n * h)?;
    /// let mut dw = dev.alloc_zeros::<f32>(v * h)?;
    /// let mut out = LossOutputs::new(&dev, n)?;
    /// let mut lce = LinearCrossEntropy::new(&dev, v, h, Chunking::Rows(3))?;
    /// lce.fwd_bwd(&dev, n, &hidden, &weight, &targets, &Default::default(), &LossConfig::default(), &mut dh, &mut dw, false, &mut out)?;
    /// assert!((out.loss_sync(&dev)? - 16f32.ln()).abs() < 1e-5);
    /// # Ok(()) }
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn fwd_bwd<I, Hs, Ws, S, Gh, Gw>(
        &mut self,
        dev: &B,
        n_rows: usize,
        hidden: &Hs,
        weight: &Ws,
        targets: &S,
        extras: &LossExtras<'_, B>,
        cfg: &LossConfig,
        grad_hidden: &mut Gh,
        grad_weight: &mut Gw,
        accumulate: bool,
        out: &mut LossOutputs<B>,
    ) -> Result<()>
    where
        I: TargetIndex,
        Hs: DeviceRead<bf16, B>,
        Ws: DeviceRead<bf16, B>,
        S: DeviceRead<I, B>,
        Gh: DeviceWrite<bf16, B>,
        Gw: DeviceWrite<f32, B>,
    {
        let (v, h) = (self.vocab, self.hidden);
        if !dev.same_queue(&self.dev) {
            return Err(Error::layout(
                "dev",
                "is not the handle this LinearCrossEntropy was made with (its cuBLAS stream)",
            ));
        }
        check_ctx(dev, "hidden", hidden)?;
        check_ctx(dev, "weight", weight)?;
        check_ctx(dev, "grad_hidden", grad_hidden)?;
        check_ctx(dev, "grad_weight", grad_weight)?;
        check_ctx(dev, "targets", targets)?;
        extras.check_owner(dev)?;
        out.check_owner(dev)?;
        let args = extras.args(0, GradBuffer::None, targets.len(), out.n_rows());
        let plan = self.plan::<I>(
            dev.props(),
            n_rows,
            &LinearCeLens {
                hidden: hidden.len(),
                weight: weight.len(),
                grad_hidden: grad_hidden.len(),
                grad_weight: grad_weight.len(),
            },
            &args,
            cfg,
        )?;
        let (hp, _a) = hidden.addr(dev);
        let (wp, _b) = weight.addr(dev);
        let (tp, _c) = targets.addr(dev);
        let (cwp, _d) = opt_addr(extras.class_weights, dev);
        let (gop, _e) = opt_addr(extras.grad_output.as_ref(), dev);
        let (ghp, _f) = grad_hidden.addr_mut(dev);
        if !accumulate {
            dev.zero(grad_weight)?;
        }
        let (gwp, _g) = grad_weight.addr_mut(dev);
        dev.zero(&mut out.status)?;
        if cfg.reduction == Reduction::Mean {
            denominator::<B, I>(dev, tp, cwp, n_rows, v, cfg.ignore_index, out)?;
        }
        let (lp, _h) = self.logits.addr_mut(dev);
        let (rp, _i) = out.rows.addr_mut(dev);
        let (sp, _j) = out.lse.addr_mut(dev);
        let (dp, _k) = out.denominator.addr(dev);
        let (stp, _l) = out.status.addr_mut(dev);
        let isz = std::mem::size_of::<I>() as u64;
        let mut r0 = 0;
        while r0 < n_rows {
            let c = self.chunk_rows.min(n_rows - r0);
            let hc = hp + (r0 * h * 2) as u64;
            // L_c (col-major V×C) = W(H×V col-major)ᵀ · H_c(H×C col-major)
            let logits_gemm = Gemm {
                trans_a: true,
                trans_b: false,
                m: v,
                n: c,
                k: h,
                a: wp,
                lda: h,
                b: hc,
                ldb: h,
                c: lp,
                ldc: v,
                c_f32: false,
                beta: 0.0,
            };
            // SAFETY: W is V·H, H_c is C·H elements at hc, the chunk buffer holds chunk_rows·V >= C·V; the
            // leading dimensions are the row lengths of these row-major matrices.
            unsafe { dev.gemm(&self.blas, &logits_gemm)? };
            let ptr = FusedPtrs {
                logits: lp,
                grad: lp,
                targets: tp + r0 as u64 * isz,
                weights: cwp,
                grad_output: if gop != 0 && cfg.reduction == Reduction::None {
                    gop + 4 * r0 as u64
                } else {
                    gop
                },
                denominator: dp,
                rows: rp + 4 * r0 as u64,
                lse: sp + 4 * r0 as u64,
                status: stp,
            };
            fused_kernel(dev, &plan.chunk(c), &ptr)?;
            // dH_c (col-major H×C) = W(H×V col-major) · dL_c(V×C col-major)
            let dh = Gemm {
                trans_a: false,
                trans_b: false,
                m: h,
                n: c,
                k: v,
                a: wp,
                lda: h,
                b: lp,
                ldb: v,
                c: ghp + (r0 * h * 2) as u64,
                ldc: h,
                c_f32: false,
                beta: 0.0,
            };
            // SAFETY: as above; dH_c is C·H elements inside grad_hidden (length checked == N·H).
            unsafe { dev.gemm(&self.blas, &dh)? };
            // dW (col-major H×V) += H_c(H×C col-major) · dL_c(V×C col-major)ᵀ, fp32 output
            let dw = Gemm {
                trans_a: false,
                trans_b: true,
                m: h,
                n: v,
                k: c,
                a: hc,
                lda: h,
                b: lp,
                ldb: v,
                c: gwp,
                ldc: h,
                c_f32: true,
                beta: 1.0,
            };
            // SAFETY: grad_weight holds V·H fp32 (checked); H_c and the chunk as above.
            unsafe { dev.gemm(&self.blas, &dw)? };
            r0 += c;
        }
        drop((_i, _j, _k, _l));
        reduce_rows(dev, n_rows, cfg.reduction, out)
    }
}

/// CPU reference of fused linear + CE (f64), with the chunk logits rounded to bf16 as the GPU path stores
/// them. Returns (per-row loss, reduced loss, grad_hidden [N, H], grad_weight [V, H]). Edge semantics are
/// [`reference::fwd_bwd`](super::reference::fwd_bwd)'s: a target outside `[0, v)` (not the ignore index)
/// makes its row's loss NaN and adds nothing to the gradients.
///
/// `Err(Shape)` naming `n`, `h`, `v`, `hidden`, `weight` or `targets` for a zero dimension, a size
/// product beyond `usize` or a slice of the wrong length; `Err(InvalidArgument { arg: "n", .. })` when the
/// `[n, v]` logits cannot be allocated; `Err(InvalidArgument)` for a configuration the kernels reject.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::loss::{linear_ce_reference, LossConfig};
/// let (rows, loss, dh, dw) = linear_ce_reference(&[1.0, 0.0], &[1.0, 0.0, 0.0, 1.0], 1, 2, 2, &[0], &LossConfig::default())?;
/// assert!((loss - rows[0]).abs() < 1e-15 && dh.len() == 2 && dw.len() == 4);
/// # Ok(()) }
/// ```
#[allow(clippy::type_complexity)] // (rows, loss, grad_hidden, grad_weight), as before it was fallible
pub fn linear_ce_reference(
    hidden: &[f64],
    weight: &[f64],
    n: usize,
    h: usize,
    v: usize,
    targets: &[i64],
    cfg: &LossConfig,
) -> Result<(Vec<f64>, f64, Vec<f64>, Vec<f64>)> {
    let dims = |arg: &'static str, x: usize, what: &str| {
        if x == 0 {
            Err(Error::shape(arg, format!("{what} >= 1"), "0"))
        } else {
            Ok(())
        }
    };
    dims("n", n, "rows")?;
    dims("h", h, "hidden size")?;
    dims("v", v, "classes")?;
    let product = |arg: &'static str, a: usize, b: usize, what: &str| {
        a.checked_mul(b).ok_or_else(|| {
            Error::shape(
                arg,
                format!("{what} = {a} x {b} elements"),
                "a product beyond usize::MAX",
            )
        })
    };
    let nh = product("hidden", n, h, "[n, h]")?;
    let vh = product("weight", v, h, "[v, h]")?;
    crate::validate::exactly("hidden", hidden.len(), nh, "[n, h]")?;
    crate::validate::exactly("weight", weight.len(), vh, "[v, h]")?;
    crate::validate::exactly("targets", targets.len(), n, "one per row")?;
    cfg.to_params(v, None, false)?;
    // The [n, v] logits are not bounded by the inputs' sizes: checked, and allocated fallibly.
    let mut logits = Vec::new();
    n.checked_mul(v)
        .and_then(|nv| logits.try_reserve_exact(nv).ok().map(|_| nv))
        .map(|nv| logits.resize(nv, 0.0))
        .ok_or_else(|| {
            Error::invalid(
                "n",
                format!("the [{n}, {v}] logits of the reference do not fit in host memory"),
            )
        })?;
    for i in 0..n {
        for j in 0..v {
            let dot: f64 = (0..h).map(|k| hidden[i * h + k] * weight[j * h + k]).sum();
            logits[i * v + j] = bf16::from_f64(dot).to_f64();
        }
    }
    let r = super::reference::fwd_bwd(&logits, n, v, targets, None, None, cfg)?;
    let mut dh = vec![0.0; n * h];
    let mut dw = vec![0.0; v * h];
    for i in 0..n {
        for j in 0..v {
            let g = r.grad[i * v + j];
            if g == 0.0 {
                continue;
            }
            for k in 0..h {
                dh[i * h + k] += g * weight[j * h + k];
                dw[j * h + k] += g * hidden[i * h + k];
            }
        }
    }
    Ok((r.rows, r.loss, dh, dw))
}
