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

use std::sync::Arc;

use cudarc::cublas::result as blas;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;

use super::launch::{denominator, fused_kernel, opt_ptr, reduce_rows, FusedPtrs};
use super::{
    check_common, check_ctx, check_len, LossConfig, LossExtras, LossOutputs, Reduction, Rows,
    TargetIndex,
};
use crate::error::{DriverContext, Error, Result};
use crate::Gpu;

/// How many rows a chunk holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunking {
    /// Exactly this many rows per chunk (the last may be shorter).
    Rows(usize),
    /// As many rows as fit `bytes` of bf16 logits (`bytes / (2·V)`, at least 1).
    MemoryBudget(usize),
}

/// Workspace and cuBLAS handle of fused linear + cross-entropy for one (V, H) pair.
pub struct LinearCrossEntropy {
    blas: CudaBlas,
    stream: Arc<cudarc::driver::CudaStream>,
    chunk_rows: usize,
    vocab: usize,
    hidden: usize,
    logits: CudaSlice<bf16>,
}

impl std::fmt::Debug for LinearCrossEntropy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinearCrossEntropy")
            .field("vocab", &self.vocab)
            .field("hidden", &self.hidden)
            .field("chunk_rows", &self.chunk_rows)
            .finish()
    }
}

fn blas_err(during: &str) -> impl Fn(cudarc::cublas::result::CublasError) -> Error + '_ {
    move |e| Error::Library {
        library: "cuBLAS",
        during: during.to_string(),
        detail: format!("{:?}", e.0),
    }
}

impl LinearCrossEntropy {
    /// Workspace for classifier weights `[vocab, hidden]`, chunked as asked. Opens cuBLAS on the handle's
    /// stream (`Err(Library)` when libcublas cannot be found).
    ///
    /// ```no_run
    /// # fn main() -> fusekit::Result<()> {
    /// use fusekit::loss::{Chunking, LinearCrossEntropy};
    /// let gpu = fusekit::Gpu::new(0)?;
    /// let lce = LinearCrossEntropy::new(&gpu, 128256, 4096, Chunking::MemoryBudget(512 << 20))?;
    /// println!("{} rows per chunk, {} MiB extra", lce.chunk_rows(), lce.extra_bytes() >> 20);
    /// # Ok(()) }
    /// ```
    pub fn new(gpu: &Gpu, vocab: usize, hidden: usize, chunking: Chunking) -> Result<Self> {
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
        if chunk_rows * vocab > i32::MAX as usize {
            return Err(Error::invalid(
                "chunking",
                format!("{chunk_rows} rows x vocab {vocab} exceed cuBLAS's 32-bit sizes"),
            ));
        }
        // SAFETY: only tries to dlopen libcublas by its known names.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Library {
                library: "cuBLAS",
                during: "opening the library".into(),
                detail: "libcublas was not found (install the CUDA toolkit or the nvidia-cublas wheel and add its lib folder to LD_LIBRARY_PATH)".into(),
            });
        }
        let blas =
            CudaBlas::new(gpu.stream().clone()).map_err(blas_err("creating a cuBLAS handle"))?;
        let logits = gpu
            .stream()
            .alloc_zeros::<bf16>(chunk_rows * vocab)
            .during("allocating the logits chunk")?;
        Ok(LinearCrossEntropy {
            blas,
            stream: gpu.stream().clone(),
            chunk_rows,
            vocab,
            hidden,
            logits,
        })
    }

    /// Rows per chunk.
    ///
    /// ```no_run
    /// # let gpu = fusekit::Gpu::new(0).unwrap();
    /// # let lce = fusekit::loss::LinearCrossEntropy::new(&gpu, 1000, 64, fusekit::loss::Chunking::Rows(256)).unwrap();
    /// assert_eq!(lce.chunk_rows(), 256);
    /// ```
    pub fn chunk_rows(&self) -> usize {
        self.chunk_rows
    }

    /// Peak device memory this path needs beyond its inputs and outputs: the bf16 logits of one chunk.
    ///
    /// ```no_run
    /// # let gpu = fusekit::Gpu::new(0).unwrap();
    /// # let lce = fusekit::loss::LinearCrossEntropy::new(&gpu, 1000, 64, fusekit::loss::Chunking::Rows(256)).unwrap();
    /// assert_eq!(lce.extra_bytes(), 256 * 1000 * 2);
    /// ```
    pub fn extra_bytes(&self) -> usize {
        self.chunk_rows * self.vocab * 2
    }

    /// Loss of `hidden [N, H] · weightᵀ` against `targets [N]`, with `grad_hidden [N, H]` (bf16) and
    /// `grad_weight [V, H]` (fp32; overwritten, or added to with `accumulate` for gradient accumulation over
    /// micro-batches). Every [`LossConfig`] option applies. Queued on the handle's stream.
    ///
    /// ```no_run
    /// # fn main() -> fusekit::Result<()> {
    /// use fusekit::loss::{Chunking, LinearCrossEntropy, LossConfig, LossOutputs};
    /// use half::bf16;
    /// let gpu = fusekit::Gpu::new(0)?;
    /// let (n, h, v) = (1024, 256, 32000);
    /// let s = gpu.stream();
    /// let hidden = s.alloc_zeros::<bf16>(n * h).unwrap();
    /// let weight = s.alloc_zeros::<bf16>(v * h).unwrap();
    /// let targets = s.alloc_zeros::<i64>(n).unwrap();
    /// let mut dh = s.alloc_zeros::<bf16>(n * h).unwrap();
    /// let mut dw = s.alloc_zeros::<f32>(v * h).unwrap();
    /// let mut out = LossOutputs::new(&gpu, n)?;
    /// let mut lce = LinearCrossEntropy::new(&gpu, v, h, Chunking::Rows(256))?;
    /// lce.fwd_bwd(&gpu, n, &hidden, &weight, &targets, &Default::default(), &LossConfig::default(), &mut dh, &mut dw, false, &mut out)?;
    /// # Ok(()) }
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn fwd_bwd<I, Hs, Ws, S, Gh, Gw>(
        &mut self,
        gpu: &Gpu,
        n_rows: usize,
        hidden: &Hs,
        weight: &Ws,
        targets: &S,
        extras: &LossExtras<'_>,
        cfg: &LossConfig,
        grad_hidden: &mut Gh,
        grad_weight: &mut Gw,
        accumulate: bool,
        out: &mut LossOutputs,
    ) -> Result<()>
    where
        I: TargetIndex,
        Hs: DevicePtr<bf16>,
        Ws: DevicePtr<bf16>,
        S: DevicePtr<I>,
        Gh: DevicePtrMut<bf16>,
        Gw: DevicePtrMut<f32>,
    {
        let (v, h) = (self.vocab, self.hidden);
        if !Arc::ptr_eq(gpu.stream(), &self.stream) {
            return Err(Error::layout(
                "gpu",
                "is not the handle this LinearCrossEntropy was made with (its cuBLAS stream)",
            ));
        }
        for (arg, ok) in [
            (
                "hidden",
                Arc::ptr_eq(hidden.stream().context(), gpu.context()),
            ),
            (
                "weight",
                Arc::ptr_eq(weight.stream().context(), gpu.context()),
            ),
        ] {
            if !ok {
                return Err(Error::layout(
                    arg,
                    "belongs to another CUDA context than the Gpu handle",
                ));
            }
        }
        check_ctx(gpu, "grad_hidden", grad_hidden)?;
        check_ctx(gpu, "grad_weight", grad_weight)?;
        if n_rows > i32::MAX as usize {
            return Err(Error::Unsupported {
                what: format!("{n_rows} rows beyond cuBLAS's 32-bit dimensions"),
            });
        }
        let rows = Rows::contiguous(n_rows, v);
        let ck = check_common(gpu, rows, usize::MAX, targets, extras, cfg, out)?;
        // An unusable row path is an error before any work is queued.
        extras.row_path.resolve(gpu.props(), v, 2, true)?;
        if hidden.len() != n_rows * h {
            return Err(Error::shape(
                "hidden",
                format!("[{n_rows}, {h}] = {} elements", n_rows * h),
                format!("{}", hidden.len()),
            ));
        }
        if weight.len() != v * h {
            return Err(Error::shape(
                "weight",
                format!("[{v}, {h}] = {} elements", v * h),
                format!("{}", weight.len()),
            ));
        }
        check_len("grad_hidden", grad_hidden.len(), n_rows * h, "[N, H]")?;
        check_len("grad_weight", grad_weight.len(), v * h, "[V, H]")?;

        let stream = gpu.stream().clone();
        let (hp, _a) = hidden.device_ptr(&stream);
        let (wp, _b) = weight.device_ptr(&stream);
        let (tp, _c) = targets.device_ptr(&stream);
        let (cwp, _d) = opt_ptr(extras.class_weights, &stream);
        let (gop, _e) = opt_ptr(extras.grad_output.as_ref(), &stream);
        let (ghp, _f) = grad_hidden.device_ptr_mut(&stream);
        if !accumulate {
            stream
                .memset_zeros(grad_weight)
                .during("clearing grad_weight")?;
        }
        let (gwp, _g) = grad_weight.device_ptr_mut(&stream);
        stream
            .memset_zeros(&mut out.status)
            .during("clearing the loss status")?;
        if cfg.reduction == Reduction::Mean {
            denominator::<I>(gpu, tp, cwp, n_rows, v, cfg.ignore_index, out)?;
        }
        let (lp, _h) = self.logits.device_ptr_mut(&stream);
        let (rp, _i) = out.rows.device_ptr_mut(&stream);
        let (sp, _j) = out.lse.device_ptr_mut(&stream);
        let (dp, _k) = out.denominator.device_ptr(&stream);
        let (stp, _l) = out.status.device_ptr_mut(&stream);
        let handle = *self.blas.handle();
        let (one, zero) = (1.0f32, 0.0f32);
        let isz = std::mem::size_of::<I>() as u64;
        let mut r0 = 0;
        while r0 < n_rows {
            let c = self.chunk_rows.min(n_rows - r0);
            let hc = hp + (r0 * h * 2) as u64;
            // L_c (col-major V×C) = W(H×V col-major)ᵀ · H_c(H×C col-major)
            // SAFETY: W is V·H, H_c is C·H elements at hc, the chunk buffer holds chunk_rows·V >= C·V; the
            // leading dimensions are the row lengths of these row-major matrices.
            unsafe {
                blas::gemm_ex(
                    handle,
                    cublasOperation_t::CUBLAS_OP_T,
                    cublasOperation_t::CUBLAS_OP_N,
                    v as i32,
                    c as i32,
                    h as i32,
                    &one as *const f32 as *const _,
                    wp as *const _,
                    cudaDataType::CUDA_R_16BF,
                    h as i32,
                    hc as *const _,
                    cudaDataType::CUDA_R_16BF,
                    h as i32,
                    &zero as *const f32 as *const _,
                    lp as *mut _,
                    cudaDataType::CUDA_R_16BF,
                    v as i32,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(blas_err("computing a logits chunk"))?;
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
            fused_kernel::<bf16, I>(
                gpu,
                Rows::contiguous(c, v),
                &ptr,
                cfg.reduction,
                cfg.ignore_index,
                ck.cfg,
                extras.row_path,
            )?;
            // dH_c (col-major H×C) = W(H×V col-major) · dL_c(V×C col-major)
            // SAFETY: as above; dH_c is C·H elements inside grad_hidden (length checked >= N·H).
            unsafe {
                blas::gemm_ex(
                    handle,
                    cublasOperation_t::CUBLAS_OP_N,
                    cublasOperation_t::CUBLAS_OP_N,
                    h as i32,
                    c as i32,
                    v as i32,
                    &one as *const f32 as *const _,
                    wp as *const _,
                    cudaDataType::CUDA_R_16BF,
                    h as i32,
                    lp as *const _,
                    cudaDataType::CUDA_R_16BF,
                    v as i32,
                    &zero as *const f32 as *const _,
                    (ghp + (r0 * h * 2) as u64) as *mut _,
                    cudaDataType::CUDA_R_16BF,
                    h as i32,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(blas_err("computing grad_hidden"))?;
            // dW (col-major H×V) += H_c(H×C col-major) · dL_c(V×C col-major)ᵀ, fp32 output
            // SAFETY: grad_weight holds V·H fp32 (checked); H_c and the chunk as above.
            unsafe {
                blas::gemm_ex(
                    handle,
                    cublasOperation_t::CUBLAS_OP_N,
                    cublasOperation_t::CUBLAS_OP_T,
                    h as i32,
                    v as i32,
                    c as i32,
                    &one as *const f32 as *const _,
                    hc as *const _,
                    cudaDataType::CUDA_R_16BF,
                    h as i32,
                    lp as *const _,
                    cudaDataType::CUDA_R_16BF,
                    v as i32,
                    &one as *const f32 as *const _,
                    gwp as *mut _,
                    cudaDataType::CUDA_R_32F,
                    h as i32,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(blas_err("accumulating grad_weight"))?;
            r0 += c;
        }
        drop((_i, _j, _k, _l));
        reduce_rows(gpu, n_rows, cfg.reduction, out)
    }
}

/// CPU reference of fused linear + CE (f64), with the chunk logits rounded to bf16 as the GPU path stores
/// them. Returns (per-row loss, reduced loss, grad_hidden [N, H], grad_weight [V, H]).
///
/// ```
/// use fusekit::loss::{linear_ce_reference, LossConfig};
/// let (rows, loss, dh, dw) = linear_ce_reference(&[1.0, 0.0], &[1.0, 0.0, 0.0, 1.0], 1, 2, 2, &[0], &LossConfig::default());
/// assert!((loss - rows[0]).abs() < 1e-15 && dh.len() == 2 && dw.len() == 4);
/// ```
pub fn linear_ce_reference(
    hidden: &[f64],
    weight: &[f64],
    n: usize,
    h: usize,
    v: usize,
    targets: &[i64],
    cfg: &LossConfig,
) -> (Vec<f64>, f64, Vec<f64>, Vec<f64>) {
    let mut logits = vec![0.0; n * v];
    for i in 0..n {
        for j in 0..v {
            let dot: f64 = (0..h).map(|k| hidden[i * h + k] * weight[j * h + k]).sum();
            logits[i * v + j] = bf16::from_f64(dot).to_f64();
        }
    }
    let r = super::reference::fwd_bwd(&logits, n, v, targets, None, None, cfg);
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
    (r.rows, r.loss, dh, dw)
}
