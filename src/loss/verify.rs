//! GPU-vs-reference verification of the loss kernels: random inputs of a given shape and configuration,
//! poisoned outputs, the kernel, the f64 reference, and a comparison. Used by the tests, `fusekit check` and
//! the GPU suite; callers may run it to validate a device.

use cudarc::driver::{CudaSlice, DevicePtr};

use super::{
    reference, LabelSmoothing, LossConfig, LossElement, LossExtras, LossOutputs, Reduction,
    RowPath, Rows,
};
use crate::testing::{compare, poisoned, Dist, Element, Report, Rng, Tolerance};
use crate::Gpu;

/// One verification case.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Case {
    /// Rows.
    pub n_rows: usize,
    /// Classes.
    pub vocab: usize,
    /// Extra elements between rows (0: dense).
    pub row_pad: usize,
    /// The loss.
    pub cfg: LossConfig,
    /// Random positive class weights.
    pub weights: bool,
    /// A random upstream gradient.
    pub grad_output: bool,
    /// Overwrite the logits with the gradient.
    pub inplace: bool,
    /// Targets as i64 (else i32).
    pub targets_i64: bool,
    /// Fraction of rows whose target is the ignore index.
    pub ignore_frac: f64,
    /// Row path of the fused kernel (tests force each one).
    pub row_path: RowPath,
}

impl Case {
    /// A dense, plain cross-entropy case of the given size.
    ///
    /// ```
    /// let c = fusekit::loss::verify::Case::ce(4, 1000);
    /// assert_eq!((c.n_rows, c.vocab, c.inplace), (4, 1000, false));
    /// ```
    pub fn ce(n_rows: usize, vocab: usize) -> Self {
        Case {
            n_rows,
            vocab,
            row_pad: 0,
            cfg: LossConfig::default(),
            weights: false,
            grad_output: false,
            inplace: false,
            targets_i64: false,
            ignore_frac: 0.0,
            row_path: RowPath::Auto,
        }
    }
}

/// Errors of each output against the reference.
#[derive(Clone, Debug)]
pub struct CaseReport {
    /// Gradient.
    pub grad: Report,
    /// Per-row losses.
    pub rows: Report,
    /// Per-row lse.
    pub lse: Report,
    /// Reduced loss (mean/sum).
    pub loss: Option<Report>,
    /// Bytes the fused kernel must move (read logits once, write the gradient once).
    pub floor_bytes: u64,
}

impl CaseReport {
    /// Largest relative L2 error over the outputs.
    ///
    /// ```
    /// # use fusekit::testing::Report;
    /// # let r = |e| Report { n: 1, rel_l2: e, max_abs: e, max_abs_at: 0 };
    /// let c = fusekit::loss::verify::CaseReport { grad: r(1e-3), rows: r(1e-6), lse: r(0.0), loss: None, floor_bytes: 0 };
    /// assert_eq!(c.worst_rel_l2(), 1e-3);
    /// ```
    pub fn worst_rel_l2(&self) -> f64 {
        [
            Some(&self.grad),
            Some(&self.rows),
            Some(&self.lse),
            self.loss.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|r| r.rel_l2)
        .fold(0.0, f64::max)
    }
}

/// Tolerance of a gradient stored as T. Gradient entries are mostly tiny (p_j / N), so the absolute
/// slack is far below them: a wrong entry cannot hide under it.
///
/// ```
/// let t = fusekit::loss::verify::grad_tolerance::<half::bf16>();
/// assert!(t.rtol < 1e-2 && t.atol < 1e-8);
/// ```
pub fn grad_tolerance<T: Element>() -> Tolerance {
    match T::NAME {
        // One rounding to 8 significant bits is 2^-9 relative; the fp32 value before it is ~1e-6.
        "bf16" => Tolerance {
            rel_l2: 1e-2,
            atol: 1e-9,
            rtol: 8e-3,
        },
        // f16 has 11 bits but flushes below 6e-8 (subnormals lose relative precision).
        "f16" => Tolerance {
            rel_l2: 2e-3,
            atol: 1e-7,
            rtol: 2e-3,
        },
        _ => Tolerance {
            rel_l2: 1e-5,
            atol: 1e-9,
            rtol: 1e-4,
        },
    }
}

/// Tolerance of the fp32 statistics (loss, lse): fp32 accumulation over up to 256k terms carries ~1e-6
/// relative error on lse, i.e. a few 1e-5 absolute on a loss of lse − z_y.
pub const STATS_TOLERANCE: Tolerance = Tolerance {
    rel_l2: 1e-5,
    atol: 5e-5,
    rtol: 1e-5,
};

/// Random inputs for a case: logits (as T, and the same values widened), targets, weights, upstream.
#[derive(Clone, Debug)]
pub struct CaseInputs<T> {
    /// Logits as stored (row-padded).
    pub logits: Vec<T>,
    /// The same logits widened to f64 (dense, no padding): what the reference sees.
    pub logits_f64: Vec<f64>,
    /// Targets (the ignore index for ignored rows).
    pub targets: Vec<i64>,
    /// Class weights.
    pub weights: Option<Vec<f32>>,
    /// Upstream gradient.
    pub grad_output: Option<Vec<f32>>,
}

/// Draws the inputs of `case`: LLM-like logits (Gaussian bulk, 0.5% large outliers), uniform targets.
///
/// ```
/// use fusekit::loss::verify::{inputs, Case};
/// let c = Case { row_pad: 2, ..Case::ce(3, 5) };
/// let inp = inputs::<f32>(&c, &mut fusekit::testing::Rng::new(1));
/// assert_eq!((inp.logits.len(), inp.logits_f64.len(), inp.targets.len()), (2 * 7 + 5, 15, 3));
/// ```
pub fn inputs<T: LossElement>(case: &Case, rng: &mut Rng) -> CaseInputs<T> {
    let (n, v, stride) = (case.n_rows, case.vocab, case.vocab + case.row_pad);
    let mut logits = vec![T::from_f64(0.0); (n - 1) * stride + v];
    let mut logits_f64 = vec![0.0; n * v];
    let vals = rng.sample(
        Dist::Logits {
            std: 2.0,
            outlier_frac: 0.005,
            outlier_scale: 8.0,
        },
        n * v,
    );
    for i in 0..n {
        for j in 0..v {
            let t = T::from_f64(vals[i * v + j]);
            logits[i * stride + j] = t;
            logits_f64[i * v + j] = t.to_f64();
        }
    }
    let targets = (0..n)
        .map(|_| {
            if rng.unit() < case.ignore_frac {
                case.cfg.ignore_index
            } else {
                rng.below(v as u64) as i64
            }
        })
        .collect();
    let weights = case
        .weights
        .then(|| (0..v).map(|_| rng.uniform(0.2, 2.0) as f32).collect());
    let grad_output = case.grad_output.then(|| {
        let k = if case.cfg.reduction == Reduction::None {
            n
        } else {
            1
        };
        (0..k).map(|_| rng.uniform(0.5, 2.0) as f32).collect()
    });
    CaseInputs {
        logits,
        logits_f64,
        targets,
        weights,
        grad_output,
    }
}

fn up<T: Element>(gpu: &Gpu, v: &[T]) -> Result<CudaSlice<T>, String> {
    gpu.stream()
        .clone_htod(v)
        .map_err(|e| format!("upload: {e:?}", e = e.0))
}

fn down<T: Element, S: DevicePtr<T>>(gpu: &Gpu, s: &S) -> Result<Vec<T>, String> {
    gpu.stream()
        .clone_dtoh(s)
        .map_err(|e| format!("download: {:?}", e.0))
}

/// Runs `case` on the GPU against the reference. `Err` describes the first failed comparison.
///
/// ```
/// let Some(gpu) = fusekit::testing::gpu_or_skip("verify::run doc") else { return };
/// let mut rng = fusekit::testing::Rng::new(3);
/// let rep = fusekit::loss::verify::run::<half::bf16>(&gpu, &mut rng, &fusekit::loss::verify::Case::ce(4, 1000)).unwrap();
/// assert!(rep.worst_rel_l2() < 1e-2);
/// ```
pub fn run<T: LossElement>(gpu: &Gpu, rng: &mut Rng, case: &Case) -> Result<CaseReport, String> {
    let inp = inputs::<T>(case, rng);
    run_with(gpu, case, &inp).map(|(r, _)| r)
}

/// [`run`] on given inputs; also returns the gradient as read back (for determinism checks).
///
/// ```
/// use fusekit::loss::verify::{inputs, run_with, Case};
/// let Some(gpu) = fusekit::testing::gpu_or_skip("verify::run_with doc") else { return };
/// let case = Case::ce(2, 100);
/// let inp = inputs::<f32>(&case, &mut fusekit::testing::Rng::new(4));
/// let (_, g1) = run_with(&gpu, &case, &inp).unwrap();
/// let (_, g2) = run_with(&gpu, &case, &inp).unwrap();
/// assert_eq!(fusekit::testing::first_bit_difference(&g1, &g2), None);
/// ```
pub fn run_with<T: LossElement>(
    gpu: &Gpu,
    case: &Case,
    inp: &CaseInputs<T>,
) -> Result<(CaseReport, Vec<T>), String> {
    let (n, v, stride) = (case.n_rows, case.vocab, case.vocab + case.row_pad);
    let rows = Rows {
        n_rows: n,
        vocab: v,
        row_stride: stride,
        grad_stride: stride,
    };
    let mut logits = up(gpu, &inp.logits)?;
    let w_dev = match &inp.weights {
        Some(w) => Some(up(gpu, w)?),
        None => None,
    };
    let go_dev = match &inp.grad_output {
        Some(g) => Some(up(gpu, g)?),
        None => None,
    };
    let extras = LossExtras {
        class_weights: w_dev.as_ref(),
        class_weights_host: inp.weights.as_deref(),
        grad_output: go_dev.as_ref().map(|g| g.as_view()),
        row_path: case.row_path,
    };
    let mut out = LossOutputs::new(gpu, n).map_err(|e| e.to_string())?;
    out.rows = poisoned(gpu, n).map_err(|e| e.to_string())?;
    out.lse = poisoned(gpu, n).map_err(|e| e.to_string())?;
    out.loss = poisoned(gpu, 1).map_err(|e| e.to_string())?;
    let run = |logits: &mut CudaSlice<T>, out: &mut LossOutputs| -> Result<Vec<T>, String> {
        macro_rules! go {
            ($I:ty) => {{
                let t: Vec<$I> = inp.targets.iter().map(|&y| y as $I).collect();
                let t = up(gpu, &t)?;
                if case.inplace {
                    super::fwd_bwd_inplace(gpu, rows, logits, &t, &extras, &case.cfg, out)
                        .map_err(|e| e.to_string())?;
                    out.check_targets_sync(gpu, &t, v, case.cfg.ignore_index)
                        .map_err(|e| e.to_string())?;
                    down(gpu, logits)
                } else {
                    let mut g = poisoned::<T>(gpu, logits.len()).map_err(|e| e.to_string())?;
                    super::fwd_bwd(gpu, rows, logits, &t, &mut g, &extras, &case.cfg, out)
                        .map_err(|e| e.to_string())?;
                    out.check_targets_sync(gpu, &t, v, case.cfg.ignore_index)
                        .map_err(|e| e.to_string())?;
                    down(gpu, &g)
                }
            }};
        }
        if case.targets_i64 {
            go!(i64)
        } else {
            go!(i32)
        }
    };
    let grad_full = run(&mut logits, &mut out)?;
    // Dense view of the gradient rows (padding elements are not part of the output).
    let grad: Vec<T> = (0..n)
        .flat_map(|i| grad_full[i * stride..i * stride + v].to_vec())
        .collect();
    let w64: Option<Vec<f64>> = inp
        .weights
        .as_ref()
        .map(|w| w.iter().map(|&x| x as f64).collect());
    let g64: Option<Vec<f64>> = inp
        .grad_output
        .as_ref()
        .map(|g| g.iter().map(|&x| x as f64).collect());
    let r = reference::fwd_bwd(
        &inp.logits_f64,
        n,
        v,
        &inp.targets,
        w64.as_deref(),
        g64.as_deref(),
        &case.cfg,
    );
    let what = format!("{} {case:?}", T::NAME);
    let grad_rep = compare(
        &format!("grad ({what})"),
        &grad,
        &r.grad,
        grad_tolerance::<T>(),
    )?;
    let rows_rep = compare(
        &format!("rows ({what})"),
        &down(gpu, &out.rows)?,
        &r.rows,
        STATS_TOLERANCE,
    )?;
    let lse_rep = compare(
        &format!("lse ({what})"),
        &down(gpu, &out.lse)?,
        &r.lse,
        STATS_TOLERANCE,
    )?;
    let loss_rep = if case.cfg.reduction != Reduction::None {
        Some(compare(
            &format!("loss ({what})"),
            &down(gpu, &out.loss)?,
            &[r.loss],
            STATS_TOLERANCE,
        )?)
    } else {
        None
    };
    let floor_bytes = 2 * (n * v * std::mem::size_of::<T>()) as u64;
    Ok((
        CaseReport {
            grad: grad_rep,
            rows: rows_rep,
            lse: lse_rep,
            loss: loss_rep,
            floor_bytes,
        },
        grad,
    ))
}

/// The configurations every dtype is checked with (the family's feature matrix).
///
/// ```
/// let cases = fusekit::loss::verify::feature_matrix(8, 1003);
/// assert!(cases.len() >= 16 && cases.iter().all(|c| c.n_rows == 8));
/// ```
pub fn feature_matrix(n_rows: usize, vocab: usize) -> Vec<Case> {
    use super::LossKind::*;
    let base = Case::ce(n_rows, vocab);
    let with = |f: &dyn Fn(&mut Case)| {
        let mut c = base;
        f(&mut c);
        c
    };
    vec![
        base,
        with(&|c| c.cfg.reduction = Reduction::Sum),
        with(&|c| {
            c.cfg.reduction = Reduction::None;
            c.grad_output = true;
        }),
        with(&|c| {
            c.ignore_frac = 0.3;
            c.targets_i64 = true;
        }),
        with(&|c| c.cfg.label_smoothing = LabelSmoothing::PyTorch(0.1)),
        with(&|c| c.cfg.label_smoothing = LabelSmoothing::Megatron(0.1)),
        with(&|c| {
            c.weights = true;
            c.cfg.label_smoothing = LabelSmoothing::PyTorch(0.05);
            c.ignore_frac = 0.1;
        }),
        with(&|c| c.cfg.z_loss = 1e-4),
        with(&|c| c.cfg.softcap = Some(15.0)),
        with(&|c| {
            c.inplace = true;
            c.grad_output = true;
        }),
        with(&|c| c.row_pad = 3),
        with(&|c| c.cfg.kind = Focal { gamma: 2.0 }),
        with(&|c| {
            c.cfg.kind = Focal { gamma: 0.5 };
            c.weights = true;
        }),
        with(&|c| c.cfg.kind = Poly1 { epsilon: 1.0 }),
        with(&|c| {
            c.cfg.kind = Poly1Focal {
                gamma: 2.0,
                epsilon: 0.5,
            }
        }),
        with(&|c| c.cfg.kind = Gce { q: 0.7 }),
    ]
}

/// Worst error of the reference gradient against finite differences (all configurations), for tests.
#[doc(hidden)]
pub fn reference_fd_error_for_tests(rng: &mut Rng) -> f64 {
    super::check::reference_fd_error(rng)
}

/// Worst error of the kernels' host-built row maths against the reference, for tests.
#[doc(hidden)]
pub fn host_math_error_for_tests(rng: &mut Rng) -> f64 {
    super::check::host_math_error(rng)
}

/// Worst error of the sigmoid focal maths (host build, reference, finite differences), for tests.
#[doc(hidden)]
pub fn sigmoid_focal_error_for_tests(rng: &mut Rng) -> f64 {
    super::check::sigmoid_focal_error(rng)
}
