//! Sigmoid (binary, per element) focal loss with torchvision semantics, forward and backward fused.

use std::ffi::c_void;

use super::launch::{launch, reduce, reduction_code};
use super::{check_ctx, LossElement, Reduction, SigmoidFocalPlan};
use crate::backend::opt_addr;
use crate::backend::private::{Addr, AddrMut};
use crate::error::{Error, Result};
use crate::params::*;
use crate::{Backend, DeviceRead, DeviceWrite, Gpu};

/// Blocks of the sigmoid-focal kernel at most. The grid depends on n only (not on the GPU), so the
/// partial sums, and the reduced loss, are the same bits on every device.
pub(crate) const SIGMOID_FOCAL_MAX_BLOCKS: usize = 4096;

/// torchvision `sigmoid_focal_loss` parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SigmoidFocalConfig {
    /// Weight of the positive class in [0, 1]; negative disables the α weighting. Default 0.25.
    pub alpha: f32,
    /// Focusing parameter γ ≥ 0. Default 2.
    pub gamma: f32,
    /// Reduction over all elements. Default `Mean` (torchvision's default is `none`; say which you want).
    pub reduction: Reduction,
}

impl Default for SigmoidFocalConfig {
    fn default() -> Self {
        SigmoidFocalConfig {
            alpha: 0.25,
            gamma: 2.0,
            reduction: Reduction::Mean,
        }
    }
}

/// Outputs and workspace of [`sigmoid_focal_fwd_bwd`]; allocate once per size and reuse.
pub struct SigmoidFocalOutputs<B: Backend = Gpu> {
    /// The reduced loss `[1]` (mean/sum).
    pub loss: B::Buffer<f32>,
    /// Per-element loss `[n]` (written for `Reduction::None` only; empty otherwise).
    pub elements: B::Buffer<f32>,
    block_sums: B::Buffer<f32>,
    count: B::Buffer<f32>,
    n: usize,
}

impl<B: Backend> SigmoidFocalOutputs<B> {
    /// Allocates for `n` elements; `per_element` allocates the `[n]` loss output (`Reduction::None`).
    ///
    /// ```
    /// # let dev = fusekit::emu::Emulator::new().unwrap();
    /// let out = fusekit::loss::SigmoidFocalOutputs::new(&dev, 1 << 20, false).unwrap();
    /// ```
    pub fn new(dev: &B, n: usize, per_element: bool) -> Result<Self> {
        Ok(SigmoidFocalOutputs {
            loss: dev.alloc_zeros(1)?,
            elements: dev.alloc_zeros(if per_element { n.max(1) } else { 1 })?,
            block_sums: dev.alloc_zeros(SIGMOID_FOCAL_MAX_BLOCKS)?,
            count: dev.upload(&[n as f32])?,
            n,
        })
    }
}

/// Sigmoid focal loss over `n` elements (logits and {0, 1} targets of the same type, e.g. `[N, C]`
/// flattened): loss (reduced, or per element) and the gradient of the reduced loss, times the upstream
/// gradient, in one pass. Targets in between 0 and 1 follow the same formula (soft labels).
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::loss::{sigmoid_focal_fwd_bwd, SigmoidFocalConfig, SigmoidFocalOutputs};
/// let dev = fusekit::emu::Emulator::new()?; // or fusekit::Gpu::new(0)?
/// let x = dev.upload(&[0.3f32, -1.2, 2.0, 0.0])?;
/// let t = dev.upload(&[1.0f32, 0.0, 1.0, 0.0])?;
/// let mut grad = dev.alloc_zeros::<f32>(4)?;
/// let mut out = SigmoidFocalOutputs::new(&dev, 4, false)?;
/// sigmoid_focal_fwd_bwd(&dev, &x, &t, &mut grad, None, &SigmoidFocalConfig::default(), &mut out)?;
/// # Ok(()) }
/// ```
pub fn sigmoid_focal_fwd_bwd<B, T, L, Tt, G>(
    dev: &B,
    logits: &L,
    targets: &Tt,
    grad: &mut G,
    grad_output: Option<B::View<'_, f32>>,
    cfg: &SigmoidFocalConfig,
    out: &mut SigmoidFocalOutputs<B>,
) -> Result<()>
where
    B: Backend,
    T: LossElement,
    L: DeviceRead<T, B>,
    Tt: DeviceRead<T, B>,
    G: DeviceWrite<T, B>,
{
    check_ctx(dev, "logits", logits)?;
    check_ctx(dev, "targets", targets)?;
    check_ctx(dev, "grad", grad)?;
    check_ctx(dev, "out", &out.loss)?;
    if let Some(g) = &grad_output {
        check_ctx(dev, "grad_output", g)?;
    }
    let plan = SigmoidFocalPlan::new::<T>(
        logits.len(),
        targets.len(),
        grad.len(),
        grad_output.as_ref().map(|g| g.len()),
        cfg,
        out.n,
        out.elements.len() >= out.n,
    )?;
    let (n, blocks) = (plan.n, plan.blocks);
    let launches = plan.launches();
    let (lp, _a) = logits.addr(dev);
    let (tp, _b) = targets.addr(dev);
    let (gp, _c) = grad.addr_mut(dev);
    let bytes = n as u64 * std::mem::size_of::<T>() as u64;
    if lp < gp + bytes && gp < lp + bytes {
        return Err(Error::layout("grad", "overlaps logits"));
    }
    let (gop, _d) = opt_addr(grad_output.as_ref(), dev);
    {
        let (ep, _e) = out.elements.addr_mut(dev);
        let (bp, _f) = out.block_sums.addr_mut(dev);
        let p = fk_sigmoid_focal_params {
            logits: lp as *const c_void,
            targets: tp as *const c_void,
            grad: gp as *mut c_void,
            loss: if cfg.reduction == Reduction::None {
                ep as *mut f32
            } else {
                std::ptr::null_mut()
            },
            block_sums: if cfg.reduction == Reduction::None {
                std::ptr::null_mut()
            } else {
                bp as *mut f32
            },
            grad_output: gop as *const f32,
            n: n as i64,
            alpha: cfg.alpha,
            gamma: cfg.gamma,
            grad_scale: if cfg.reduction == Reduction::Mean {
                1.0 / n as f32
            } else {
                1.0
            },
            reduction: reduction_code(cfg.reduction),
        };
        launch(dev, &launches[0].kernel, launches[0].config(), &p)?;
    }
    if cfg.reduction != Reduction::None {
        let (bp, _a) = out.block_sums.addr(dev);
        let (cp, _b) = out.count.addr(dev);
        let (op, _c) = out.loss.addr_mut(dev);
        reduce(
            dev,
            bp,
            blocks,
            if cfg.reduction == Reduction::Mean {
                cp
            } else {
                0
            },
            op,
        )?;
    }
    Ok(())
}

impl<B: Backend> std::fmt::Debug for SigmoidFocalOutputs<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigmoidFocalOutputs")
            .field("n", &self.n)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::{reference, verify};
    use crate::testing::{compare, Rng};
    use half::bf16;

    /// The GPU test's inputs and gradient comparison, with the kernels' accurate per-element maths (the
    /// host build of fk_sigmoid_focal, which the kernels take for a vector holding a non-finite logit;
    /// their fast maths, exp2/rcp/lg2 and a log1p polynomial, run on the emulator in
    /// tests/loss_kernels.rs), the same scaling: a correct kernel must pass them.
    fn replay<T: crate::loss::LossElement>(
        rng: &mut Rng,
        n: usize,
        cfg: SigmoidFocalConfig,
    ) -> Result<(), String> {
        let (xs, ts, go) = verify::sigmoid_focal_inputs::<T>(rng, n, &cfg);
        let scale = if cfg.reduction == Reduction::Mean {
            1.0 / n as f32
        } else {
            1.0
        };
        let (mut got, mut want) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            let (x, t) = (xs[i].to_f64(), ts[i].to_f64());
            let up = if cfg.reduction == Reduction::None {
                go[i]
            } else {
                go[0]
            };
            let (_, g) = crate::host_math::sigmoid_focal(x as f32, t as f32, cfg.alpha, cfg.gamma);
            got.push(T::from_f64((g * (scale * up)) as f64));
            let (_, d) = reference::sigmoid_focal(x, t, cfg.alpha as f64, cfg.gamma as f64);
            want.push(d * up as f64 * scale as f64);
        }
        compare(
            "sigmoid focal grad",
            &got,
            &want,
            verify::grad_tolerance::<T>(),
        )
        .map(|_| ())
    }

    #[test]
    fn kernel_maths_meet_the_gpu_test_tolerances() {
        let seed = crate::testing::seed_for("sigmoid_focal_kernel_maths_meet_the_gpu_tolerances");
        let mut rng = Rng::new(seed);
        for n in [1, 7, 4099, 200_003] {
            for cfg in verify::SIGMOID_FOCAL_CONFIGS {
                replay::<f32>(&mut rng, n, cfg)
                    .unwrap_or_else(|e| panic!("seed {seed:#x} f32 {cfg:?}: {e}"));
                replay::<bf16>(&mut rng, n, cfg)
                    .unwrap_or_else(|e| panic!("seed {seed:#x} bf16 {cfg:?}: {e}"));
            }
        }
    }
}
