//! Quantised matmul (issue 15, 4-bit as in OSTQuant / QuaRot; issue 16, 1-bit as in BiLLM): the
//! quantisers that produce the weight formats and the transforms that make them accurate (host code, f64
//! where it matters), the packed int4 formats and the W4A16, W4A4 and BiLLM kernels that read them
//! (`kernels/quant/`).
//!
//! * [`WeightQuant`] and [`QuantizedWeight`]: a k-bit (2..=8) integer weight format, per output channel
//!   or in groups of 32/64/128 input channels, symmetric or with zero points, its scales rounded to the
//!   bf16/f16 a kernel will read (or f32, a reference), and its exact dequantisation.
//! * [`quantize_rtn`]: round-to-nearest, with an optional MSE clipping search per group.
//! * [`quantize_tokens`]: per-token dynamic activation quantisation (the A of W4A4).
//! * [`Hessian`] and [`quantize_gptq`]: GPTQ (Frantar et al. 2023) from calibration activations: 1 %
//!   dampening, the upper Cholesky factor of the inverse Hessian, blocks of 128 columns with lazy
//!   updates, act-order with static groups (so the group structure stays contiguous and kernels need no
//!   permutation index).
//! * [`quantize_billm`] ([`BillmWeight`], [`BillmConfig`]): BiLLM's 1-bit quantiser (salient columns by
//!   inverse-Hessian salience, binarised residually; the rest split at a searched break point into two
//!   binarised groups; block-wise GPTQ-style compensation), and [`binarize_sign_mean`], the plain
//!   1-bit baseline; [`PackedBillm`], its packed form (format version 2) with the bits per weight
//!   counted the paper's way and strictly ([`BitsPerWeight`]).
//! * [`billm_matmul`] with [`BillmPlan`], [`BillmDeviceWeight`], [`BillmWorkspace`]: `y = x · Ŵᵀ` read
//!   straight from the packed bits on tensor cores (bit planes times the activations split by the
//!   salient mask, then seven multiply-adds per row-block), checked against [`reference_billm`]; and
//!   [`billm_unpack`], the dense bf16/f16 weight, with [`BillmDense`] (unpack once, then a cuBLAS
//!   GEMM per product) for large M.
//! * [`PackedW4`]: an int4 weight packed in `mma.sync` fragment order (format version 1, K and N padded
//!   internally), lossless to unpack, with the exact dense matrix the kernel multiplies by.
//! * [`safetensors`]: the safetensors container, read and written without dependencies: the on-disk
//!   form of packed layers ([`PackedW4::to_safetensors`], versioned) and checkpoints to quantise.
//! * [`EquivalentTransform`], [`search_scales`] and [`qsur`]: OSTQuant-style equivalent transforms (a
//!   given orthogonal matrix and diagonal scaling fused into the layers on both sides of an activation,
//!   float outputs unchanged), a SmoothQuant-form search of the scaling, and the quantisation space
//!   utilisation rate that says how well data fill their grid.
//! * [`w4a16`] with [`W4A16Plan`], [`W4A16Weight`], [`W4A16Workspace`]: `y = x · Ŵᵀ` for bf16/f16
//!   activations on tensor cores, any M (16/32/64-row tiles, split-K for small M), checked against
//!   [`reference_w4a16`].
//! * [`w4a4`] with [`W4A4Plan`], [`W4A4Weight`] and [`PackedW4A4`] (int4 per output channel,
//!   symmetric): `y = x̂ · Ŵᵀ` for int4 tokens from [`hadamard_quantize`] on integer tensor cores
//!   (`m16n8k64.s4` on sm_80/86/89, widened to `m16n8k32.s8` on sm_90: [`W4A4Path`]), exact int32 sums
//!   and the zero-point correction in the epilogue, checked against [`reference_w4a4`].
//! * [`hadamard_quantize`] / [`hadamard_rotate`] with [`HadamardPlan`]: the online rotation of
//!   activations on the GPU, `x·H_n` per token fused with its int4/int8 quantisation
//!   ([`QuantizedActivations`]: codes, a scale and a zero point per token) or rounded to bf16/f16.
//! * [`hadamard`]: the normalised Hadamard transform of sizes `m · 2^k` (m ∈ {1, 12, 20, 28, 36, 44,
//!   60}), the rotation QuaRot and OSTQuant fuse into weights (`W·H`) and apply online to activations
//!   (`x·H`), exact in f64.
//!
//! Weights are `[n][k]` row-major (`n` output channels, `k` input channels, PyTorch's `nn.Linear`
//! layout): `y = x · Wᵀ`, and groups run along `k`.

mod act;
mod billm;
mod billm_gemm;
pub(crate) mod check;
mod gptq;
pub mod hadamard;
mod linalg;
mod online;
mod packed;
mod rtn;
pub mod safetensors;
mod splitk;
mod transform;
mod w4a16;
mod w4a4;

pub use act::{quantize_tokens, QuantizedTokens};
pub use billm::{
    billm_bit, binarize_sign_mean, quantize_billm, BillmConfig, BillmWeight, Binary, BitsPerWeight,
    PackedBillm, BILLM_BLOCK, BILLM_FORMAT_VERSION,
};
pub use billm_gemm::{
    billm_matmul, billm_unpack, reference_billm, BillmDense, BillmDeviceWeight, BillmPlan,
    BillmWorkspace,
};
pub use gptq::{quantize_gptq, GptqConfig, Hessian};
pub use online::{
    hadamard_quantize, hadamard_rotate, HadamardOutput, HadamardPlan, QuantizedActivations,
};
pub use packed::{PackedW4, W4_FORMAT_VERSION, W4_K_PAD, W4_N_PAD};
pub use rtn::{quantize_rtn, QuantizedWeight, ScaleFormat, WeightQuant};
pub use splitk::{SplitKPlan, SplitKWorkspace, W4A16_MAX_SPLITS};
pub use transform::{qsur, search_scales, EquivalentTransform, ScaleSearch, QSUR_SHRINKAGE};
pub use w4a16::{reference_w4a16, w4a16, W4A16Plan, W4A16Weight, W4A16Workspace, W4Element};
pub use w4a4::{
    reference_w4a4, w4a4, PackedW4A4, W4A4Path, W4A4Plan, W4A4Weight, W4A4_FORMAT_VERSION,
    W4A4_K_PAD, W4A4_MAX_K, W4A4_N_PAD,
};

/// `‖X·Wᵀ − X·Ŵᵀ‖ / ‖X·Wᵀ‖` in f64 for activations `x` (`[rows][k]`) and two `[n][k]` weights: the
/// output error the quantisers are judged by.
///
/// ```
/// use fusekit::quant::relative_output_error;
/// let x = [1.0f32, 2.0];       // one row, k = 2
/// let w = [1.0f32, 1.0];       // n = 1
/// let w_hat = [1.0f32, 1.5];
/// // y = 3, ŷ = 4
/// assert!((relative_output_error(&x, &w, &w_hat, 2).unwrap() - 1.0 / 3.0).abs() < 1e-12);
/// ```
pub fn relative_output_error(x: &[f32], w: &[f32], w_hat: &[f32], k: usize) -> crate::Result<f64> {
    use crate::Error;
    if k == 0 || x.len() % k != 0 || w.len() % k != 0 || w.len() != w_hat.len() {
        return Err(Error::shape(
            "w_hat",
            format!("x [rows][{k}], w and w_hat [n][{k}] of equal size"),
            format!("x {}, w {}, w_hat {}", x.len(), w.len(), w_hat.len()),
        ));
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for xr in x.chunks_exact(k) {
        for (wr, hr) in w.chunks_exact(k).zip(w_hat.chunks_exact(k)) {
            let (mut y, mut yh) = (0.0f64, 0.0f64);
            for ((&a, &b), &c) in xr.iter().zip(wr).zip(hr) {
                y += a as f64 * b as f64;
                yh += a as f64 * c as f64;
            }
            num += (y - yh) * (y - yh);
            den += y * y;
        }
    }
    Ok(if den > 0.0 {
        (num / den).sqrt()
    } else if num > 0.0 {
        f64::INFINITY
    } else {
        0.0
    })
}
