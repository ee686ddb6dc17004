//! GPU-vs-reference verification of the loss kernels: random inputs of a given shape and configuration,
//! poisoned outputs, the kernel, the f64 reference, and a comparison. Used by the tests, `fusekit check` and
//! the GPU suite; callers may run it to validate a device.

use super::{
    reference, LabelSmoothing, LossConfig, LossElement, LossExtras, LossOutputs, Reduction,
    RowPath, Rows,
};
use crate::testing::{compare_with_floor, poisoned, Dist, Element, Report, Rng, Tolerance};
use crate::{Backend, DeviceRead};

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

/// The sigmoid focal configurations every test runs: torchvision's defaults (mean), plain BCE without
/// α (sum), and α = 0.5, γ = 1.5 (none).
///
/// ```
/// assert_eq!(fusekit::loss::verify::SIGMOID_FOCAL_CONFIGS.len(), 3);
/// ```
pub const SIGMOID_FOCAL_CONFIGS: [super::SigmoidFocalConfig; 3] = [
    super::SigmoidFocalConfig {
        alpha: 0.25,
        gamma: 2.0,
        reduction: Reduction::Mean,
    },
    super::SigmoidFocalConfig {
        alpha: -1.0,
        gamma: 0.0,
        reduction: Reduction::Sum,
    },
    super::SigmoidFocalConfig {
        alpha: 0.5,
        gamma: 1.5,
        reduction: Reduction::None,
    },
];

/// Sigmoid focal test inputs: logits N(−1, 3²) (a detector's mostly negative scores, with tails on both
/// sides), targets 1 with probability 0.1, and the upstream gradient (n values for `None`, else 1).
///
/// ```
/// use fusekit::loss::verify::{sigmoid_focal_inputs, SIGMOID_FOCAL_CONFIGS};
/// let (x, t, go) = sigmoid_focal_inputs::<f32>(&mut fusekit::testing::Rng::new(1), 10, &SIGMOID_FOCAL_CONFIGS[2]);
/// assert_eq!((x.len(), t.len(), go.len()), (10, 10, 10));
/// ```
pub fn sigmoid_focal_inputs<T: LossElement>(
    rng: &mut Rng,
    n: usize,
    cfg: &super::SigmoidFocalConfig,
) -> (Vec<T>, Vec<T>, Vec<f32>) {
    let xs = rng
        .sample(
            Dist::Normal {
                mean: -1.0,
                std: 3.0,
            },
            n,
        )
        .into_iter()
        .map(T::from_f64)
        .collect();
    let ts = (0..n)
        .map(|_| T::from_f64(if rng.unit() < 0.1 { 1.0 } else { 0.0 }))
        .collect();
    let k = if cfg.reduction == Reduction::None {
        n
    } else {
        1
    };
    let go = (0..k).map(|_| rng.uniform(0.5, 2.0) as f32).collect();
    (xs, ts, go)
}

/// The f64 reference of [`sigmoid_focal_fwd_bwd`](super::sigmoid_focal_fwd_bwd) for inputs `xs`,
/// targets `ts` and the upstream gradient `go` (`n` values for `Reduction::None`, else 1): the
/// per-element losses and the gradient (upstream and mean scale applied).
///
/// ```
/// use fusekit::loss::{verify::sigmoid_focal_expected, SigmoidFocalConfig};
/// let (l, g) = sigmoid_focal_expected(&[0.0f32, 2.0], &[1.0f32, 0.0], &[1.0], &SigmoidFocalConfig::default());
/// assert!(l[0] > 0.0 && g[0] < 0.0 && g[1] > 0.0);
/// ```
pub fn sigmoid_focal_expected<T: LossElement>(
    xs: &[T],
    ts: &[T],
    go: &[f32],
    cfg: &super::SigmoidFocalConfig,
) -> (Vec<f64>, Vec<f64>) {
    let n = xs.len();
    let mean = if cfg.reduction == Reduction::Mean {
        1.0 / n as f64
    } else {
        1.0
    };
    (0..n)
        .map(|i| {
            let (l, d) = reference::sigmoid_focal(
                xs[i].to_f64(),
                ts[i].to_f64(),
                cfg.alpha as f64,
                cfg.gamma as f64,
            );
            let up = go[if cfg.reduction == Reduction::None {
                i
            } else {
                0
            }] as f64;
            (l, d * up * mean)
        })
        .unzip()
}

/// An elementwise loss gradient (e.g. sigmoid focal) against its reference, with [`grad_tolerance`] and
/// the resolution of `T`'s subnormals as the floor (f16 stores a gradient of 1e-5 to ±3e-8 absolute,
/// 0.3% relative, whatever the kernel computed).
///
/// ```
/// use fusekit::loss::verify::compare_elementwise_grad;
/// let want = [1.17e-5];
/// let got = [half::f16::from_f64(want[0] * (1.0 + 1e-3))];
/// assert!(compare_elementwise_grad("g", &got, &want).is_ok());
/// assert!(compare_elementwise_grad("g", &[half::f16::from_f64(2e-5)], &want).is_err());
/// ```
pub fn compare_elementwise_grad<T: Element>(
    name: &str,
    got: &[T],
    reference: &[f64],
) -> Result<Report, String> {
    let q = quantum::<T>();
    compare_with_floor(name, got, reference, grad_tolerance::<T>(), |_| q)
}

/// Inputs of a fused linear + CE check: hidden states N(0, 1) (`n × h`) and a weight N(0, 0.3) (`v × h`),
/// both bf16, row-major.
///
/// ```
/// let (hid, w) = fusekit::loss::verify::linear_ce_inputs(&mut fusekit::testing::Rng::new(1), 3, 4, 5);
/// assert_eq!((hid.len(), w.len()), (12, 20));
/// ```
pub fn linear_ce_inputs(
    rng: &mut Rng,
    n: usize,
    h: usize,
    v: usize,
) -> (Vec<half::bf16>, Vec<half::bf16>) {
    let mut normal = |std: f64, len: usize| rng.sample_as(Dist::Normal { mean: 0.0, std }, len);
    let hid = normal(1.0, n * h);
    (hid, normal(0.3, v * h))
}

/// What [`run_linear_ce`] measured.
#[derive(Clone, Copy, Debug)]
pub struct LinearCeReport {
    /// Relative L2 error of the hidden-state gradient.
    pub grad_hidden_rel_l2: f64,
    /// Relative L2 error of the weight gradient (the first, non-accumulating call).
    pub grad_weight_rel_l2: f64,
    /// Device memory the plan holds beyond its inputs and outputs, bytes.
    pub extra_bytes: usize,
}

/// Fused linear + CE on a device against the f64 reference: one call into poisoned gradients (per-row
/// losses, the reduced loss, `grad_hidden` and `grad_weight` compared at bf16-level tolerances, since
/// each chunk's logits and gradient are bf16 before the GEMMs), the targets validated, then a second
/// call with `accumulate` that must double `grad_weight`. Hidden states `n × h` and weight `v × h` are
/// bf16, row-major.
///
/// ```
/// use fusekit::loss::{verify::{linear_ce_inputs, run_linear_ce}, Chunking, LossConfig};
/// let dev = fusekit::emu::Emulator::new().unwrap();
/// let mut rng = fusekit::testing::Rng::new(3);
/// let (hid, w) = linear_ce_inputs(&mut rng, 5, 8, 40);
/// let rep = run_linear_ce(&dev, &hid, &w, 5, 8, 40, &[1, 0, 39, 7, 2], &LossConfig::default(), Chunking::Rows(2)).unwrap();
/// assert!(rep.grad_weight_rel_l2 < 1e-2);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn run_linear_ce<B: Backend>(
    dev: &B,
    hidden: &[half::bf16],
    weight: &[half::bf16],
    n: usize,
    h: usize,
    v: usize,
    targets: &[i64],
    cfg: &LossConfig,
    chunking: super::Chunking,
) -> Result<LinearCeReport, String> {
    use half::bf16;
    let e = |e: crate::Error| e.to_string();
    let (hd, wd, td) = (
        dev.upload(hidden).map_err(e)?,
        dev.upload(weight).map_err(e)?,
        dev.upload(targets).map_err(e)?,
    );
    let h64: Vec<f64> = hidden.iter().map(|x| x.to_f64()).collect();
    let w64: Vec<f64> = weight.iter().map(|x| x.to_f64()).collect();
    let (rows_ref, loss_ref, dh_ref, dw_ref) =
        super::linear_ce_reference(&h64, &w64, n, h, v, targets, cfg).map_err(e)?;
    let mut lce = super::LinearCrossEntropy::new(dev, v, h, chunking).map_err(e)?;
    let mut dh = poisoned::<B, bf16>(dev, n * h).map_err(e)?;
    let mut dw = poisoned::<B, f32>(dev, v * h).map_err(e)?;
    let mut out = LossOutputs::new(dev, n).map_err(e)?;
    let none = LossExtras::default();
    let call = |lce: &mut super::LinearCrossEntropy<B>,
                dh: &mut B::Buffer<bf16>,
                dw: &mut B::Buffer<f32>,
                out: &mut LossOutputs<B>,
                acc: bool| {
        lce.fwd_bwd(dev, n, &hd, &wd, &td, &none, cfg, dh, dw, acc, out)
            .map_err(e)
    };
    call(&mut lce, &mut dh, &mut dw, &mut out, false)?;
    out.check_targets_sync(dev, &td, v, cfg.ignore_index)
        .map_err(e)?;
    let what = format!("{chunking:?}");
    let stats_tol = Tolerance {
        rel_l2: 1e-2,
        atol: 1e-6,
        rtol: 3e-2,
    };
    let grad_tol = |atol| Tolerance {
        rel_l2: 1e-2,
        atol,
        rtol: 5e-2,
    };
    let dl = |b: &B::Buffer<f32>| dev.download(b).map_err(e);
    crate::testing::compare(
        &format!("rows {what}"),
        &dl(&out.rows)?,
        &rows_ref,
        stats_tol,
    )?;
    crate::testing::compare(
        &format!("loss {what}"),
        &dl(&out.loss)?,
        &[loss_ref],
        stats_tol,
    )?;
    let dh_r = crate::testing::compare(
        &format!("grad_hidden {what}"),
        &dev.download(&dh).map_err(e)?,
        &dh_ref,
        grad_tol(2e-4),
    )?;
    let dw_r = crate::testing::compare(
        &format!("grad_weight {what}"),
        &dl(&dw)?,
        &dw_ref,
        grad_tol(2e-4),
    )?;
    // Accumulation adds a second identical gradient.
    call(&mut lce, &mut dh, &mut dw, &mut out, true)?;
    let dw2: Vec<f64> = dw_ref.iter().map(|x| 2.0 * x).collect();
    crate::testing::compare(
        &format!("accumulated grad_weight {what}"),
        &dl(&dw)?,
        &dw2,
        grad_tol(4e-4),
    )?;
    Ok(LinearCeReport {
        grad_hidden_rel_l2: dh_r.rel_l2,
        grad_weight_rel_l2: dw_r.rel_l2,
        extra_bytes: lce.extra_bytes(),
    })
}

/// Vocabulary-parallel loss on one device: the `n × v` logits `x` cut at `bounds` (ascending, from 0 to
/// `v`) into shards, each through [`shard_stats`](super::shard_stats), then
/// [`shard_combine`](super::shard_combine) and [`shard_backward`](super::shard_backward) per shard into
/// poisoned gradients, against the unsharded f64 reference. Returns the worst relative L2 error of the
/// gradient and of the per-row losses; `Err` names the first check that failed.
///
/// ```
/// use fusekit::loss::{verify::run_shards, LossConfig};
/// let dev = fusekit::emu::Emulator::new().unwrap();
/// let x: Vec<f32> = (0..2 * 5).map(|i| (i as f32 * 0.7).sin()).collect();
/// let err = run_shards(&dev, &x, 2, 5, &[3i32, 0], &[0, 2, 5], &LossConfig::default()).unwrap();
/// assert!(err < 1e-5);
/// ```
pub fn run_shards<B: Backend, T: LossElement, I: super::TargetIndex>(
    dev: &B,
    x: &[T],
    n: usize,
    v: usize,
    targets: &[I],
    bounds: &[usize],
    cfg: &LossConfig,
) -> Result<f64, String> {
    use super::{shard_backward, shard_combine, shard_stats, ShardSpec, SHARD_STAT_WIDTH};
    let e = |e: crate::Error| e.to_string();
    if x.len() != n * v
        || targets.len() != n
        || bounds.first() != Some(&0)
        || bounds.last() != Some(&v)
    {
        return Err(format!(
            "run_shards: inconsistent shapes (n {n}, v {v}, bounds {bounds:?})"
        ));
    }
    let td = dev.upload(targets).map_err(e)?;
    let p = bounds.len() - 1;
    let slice = |b: &[usize]| -> Vec<T> {
        (0..n)
            .flat_map(|i| x[i * v + b[0]..i * v + b[1]].to_vec())
            .collect()
    };
    let shards = bounds
        .windows(2)
        .map(|b| dev.upload(&slice(b)).map_err(e))
        .collect::<Result<Vec<_>, String>>()?;
    let spec = |b: &[usize]| ShardSpec {
        vocab_offset: b[0],
        full_vocab: v,
    };
    let none = LossExtras::default();
    let width = n * SHARD_STAT_WIDTH;
    let mut stats = poisoned::<B, f32>(dev, p * width).map_err(e)?;
    for (k, b) in bounds.windows(2).enumerate() {
        let mut part = dev
            .view_mut(&mut stats, k * width..(k + 1) * width)
            .map_err(e)?;
        let rows = Rows::contiguous(n, b[1] - b[0]);
        shard_stats(dev, rows, &shards[k], &td, spec(b), &none, cfg, &mut part).map_err(e)?;
    }
    let mut out = LossOutputs::new(dev, n).map_err(e)?;
    shard_combine(dev, n, v, &stats, p, &td, &none, cfg, &mut out).map_err(e)?;
    let mut grad = vec![T::from_f64(0.0); n * v];
    for (k, b) in bounds.windows(2).enumerate() {
        let vs = b[1] - b[0];
        let mut g = poisoned::<B, T>(dev, n * vs).map_err(e)?;
        let rows = Rows::contiguous(n, vs);
        shard_backward(
            dev,
            rows,
            &shards[k],
            &td,
            spec(b),
            &none,
            cfg,
            &out,
            &mut g,
        )
        .map_err(e)?;
        let gh = dev.download(&g).map_err(e)?;
        for i in 0..n {
            grad[i * v + b[0]..i * v + b[1]].copy_from_slice(&gh[i * vs..(i + 1) * vs]);
        }
    }
    let xf: Vec<f64> = x.iter().map(|z| z.to_f64()).collect();
    let t64: Vec<i64> = targets.iter().map(|&y| y.to_i64()).collect();
    let r = reference::fwd_bwd(&xf, n, v, &t64, None, None, cfg).map_err(e)?;
    let what = format!("{} shards {bounds:?}, {} targets", T::NAME, I::SUFFIX);
    let g = compare_loss_grad(&what, cfg, n, v, &xf, &t64, None, None, &grad, &r)?;
    let rows = compare_stats(&what, &dev.download(&out.rows).map_err(e)?, &r.rows)?;
    Ok(g.rel_l2.max(rows.rel_l2))
}

/// Slack of a per-row loss or lse beyond [`STATS_TOLERANCE`]: its fp32 resolution, `2^-22·max(1, |ref|)`.
/// A confident row's loss (1e-8, say) computed in fp32 from `log Σ exp` rounds to a few 1e-8 whatever
/// the implementation: fine against `atol`, but alone in a vector of such rows it would fail a relative
/// L2 bound.
///
/// ```
/// assert_eq!(fusekit::loss::verify::stats_floor(0.5), 2f64.powi(-22));
/// ```
pub fn stats_floor(reference: f64) -> f64 {
    2f64.powi(-22) * reference.abs().max(1.0)
}

/// Per-row losses, lses or a reduced loss against the reference: [`STATS_TOLERANCE`] plus
/// [`stats_floor`].
///
/// ```
/// use fusekit::loss::verify::compare_stats;
/// assert!(compare_stats("rows", &[0.0f32, 0.0], &[1e-8, 0.0]).is_ok());
/// assert!(compare_stats("rows", &[6.9f32], &[6.91]).is_err());
/// ```
pub fn compare_stats(name: &str, got: &[f32], reference: &[f64]) -> Result<Report, String> {
    compare_with_floor(name, got, reference, STATS_TOLERANCE, |i| {
        stats_floor(reference[i])
    })
}

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

fn up<B: Backend, T: Element>(dev: &B, v: &[T]) -> Result<B::Buffer<T>, String> {
    dev.upload(v).map_err(|e| format!("upload: {e}"))
}

fn down<B: Backend, T: Element, S: DeviceRead<T, B>>(dev: &B, s: &S) -> Result<Vec<T>, String> {
    dev.download(s).map_err(|e| format!("download: {e}"))
}

/// Runs `case` on a device (the emulator or a GPU) against the reference. `Err` describes the first
/// failed comparison.
///
/// ```
/// let dev = fusekit::emu::Emulator::new().unwrap();
/// let mut rng = fusekit::testing::Rng::new(3);
/// let rep = fusekit::loss::verify::run::<_, half::bf16>(&dev, &mut rng, &fusekit::loss::verify::Case::ce(4, 1000)).unwrap();
/// assert!(rep.worst_rel_l2() < 1e-2);
/// ```
pub fn run<B: Backend, T: LossElement>(
    dev: &B,
    rng: &mut Rng,
    case: &Case,
) -> Result<CaseReport, String> {
    let inp = inputs::<T>(case, rng);
    run_with(dev, case, &inp).map(|(r, _)| r)
}

/// [`run`] on given inputs; also returns the gradient as read back (for determinism checks).
///
/// ```
/// use fusekit::loss::verify::{inputs, run_with, Case};
/// let dev = fusekit::emu::Emulator::new().unwrap();
/// let case = Case::ce(2, 100);
/// let inp = inputs::<f32>(&case, &mut fusekit::testing::Rng::new(4));
/// let (_, g1) = run_with(&dev, &case, &inp).unwrap();
/// let (_, g2) = run_with(&dev, &case, &inp).unwrap();
/// assert_eq!(fusekit::testing::first_bit_difference(&g1, &g2), None);
/// ```
pub fn run_with<B: Backend, T: LossElement>(
    dev: &B,
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
    let e = |e: crate::Error| e.to_string();
    let mut logits = up(dev, &inp.logits)?;
    let w_dev = match &inp.weights {
        Some(w) => Some(up(dev, w)?),
        None => None,
    };
    let go_dev = match &inp.grad_output {
        Some(g) => Some(up(dev, g)?),
        None => None,
    };
    let go_view = match &go_dev {
        Some(g) => Some(dev.view(g, 0..g.len()).map_err(e)?),
        None => None,
    };
    let extras = LossExtras {
        class_weights: w_dev.as_ref(),
        class_weights_host: inp.weights.as_deref(),
        grad_output: go_view,
        row_path: case.row_path,
    };
    let mut out = LossOutputs::new(dev, n).map_err(e)?;
    out.rows = poisoned(dev, n).map_err(e)?;
    out.lse = poisoned(dev, n).map_err(e)?;
    out.loss = poisoned(dev, 1).map_err(e)?;
    let grad_full = {
        macro_rules! go {
            ($I:ty) => {{
                let t: Vec<$I> = inp.targets.iter().map(|&y| y as $I).collect();
                let t = up(dev, &t)?;
                if case.inplace {
                    super::fwd_bwd_inplace(
                        dev,
                        rows,
                        &mut logits,
                        &t,
                        &extras,
                        &case.cfg,
                        &mut out,
                    )
                    .map_err(e)?;
                    out.check_targets_sync(dev, &t, v, case.cfg.ignore_index)
                        .map_err(e)?;
                    down(dev, &logits)?
                } else {
                    let mut g = poisoned::<B, T>(dev, logits.len()).map_err(e)?;
                    super::fwd_bwd(dev, rows, &logits, &t, &mut g, &extras, &case.cfg, &mut out)
                        .map_err(e)?;
                    out.check_targets_sync(dev, &t, v, case.cfg.ignore_index)
                        .map_err(e)?;
                    down(dev, &g)?
                }
            }};
        }
        if case.targets_i64 {
            go!(i64)
        } else {
            go!(i32)
        }
    };
    // Dense view of the gradient rows (padding elements are not part of the output).
    let grad: Vec<T> = (0..n)
        .flat_map(|i| grad_full[i * stride..i * stride + v].to_vec())
        .collect();
    let rows_out = down(dev, &out.rows)?;
    let lse_out = down(dev, &out.lse)?;
    let loss_out = down(dev, &out.loss)?;
    let rep = check_outputs(case, inp, &grad, &rows_out, &lse_out, loss_out[0])?;
    Ok((rep, grad))
}

/// Compares a fused kernel's outputs for `case` (dense gradient rows, per-row loss and lse, reduced
/// loss) with the f64 reference, with the tolerances every GPU test uses. `Err` describes the first
/// failed comparison.
pub fn check_outputs<T: LossElement>(
    case: &Case,
    inp: &CaseInputs<T>,
    grad: &[T],
    rows: &[f32],
    lse: &[f32],
    loss: f32,
) -> Result<CaseReport, String> {
    let (n, v) = (case.n_rows, case.vocab);
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
    )
    .map_err(|e| format!("reference: {e}"))?;
    let what = format!("{} {case:?}", T::NAME);
    let grad_rep = compare_grad(&format!("grad ({what})"), case, inp, grad, &r.grad, &r.lse)?;
    let rows_rep = compare_stats(&format!("rows ({what})"), rows, &r.rows)?;
    let lse_rep = compare_stats(&format!("lse ({what})"), lse, &r.lse)?;
    let loss_rep = if case.cfg.reduction != Reduction::None {
        Some(compare_stats(
            &format!("loss ({what})"),
            &[loss],
            &[r.loss],
        )?)
    } else {
        None
    };
    Ok(CaseReport {
        grad: grad_rep,
        rows: rows_rep,
        lse: lse_rep,
        loss: loss_rep,
        floor_bytes: 2 * (n * v * std::mem::size_of::<T>()) as u64,
    })
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

/// Largest |analytic − numeric| / (|numeric| + 1e-3) of the reference gradient against central finite
/// differences of the reduced loss, over random small inputs of every configuration.
///
/// ```
/// let err = fusekit::loss::verify::reference_fd_error(&mut fusekit::testing::Rng::new(1));
/// assert!(err < 1e-4);
/// ```
pub fn reference_fd_error(rng: &mut Rng) -> f64 {
    let mut worst: f64 = 0.0;
    for case in feature_matrix(3, 7) {
        let (n, v) = (case.n_rows, case.vocab);
        let x = rng.sample(
            Dist::Normal {
                mean: 0.0,
                std: 1.5,
            },
            n * v,
        );
        let targets: Vec<i64> = (0..n)
            .map(|i| {
                if i == 1 && case.ignore_frac > 0.0 {
                    -100
                } else {
                    rng.below(v as u64) as i64
                }
            })
            .collect();
        let w: Option<Vec<f64>> = case
            .weights
            .then(|| (0..v).map(|_| rng.uniform(0.3, 2.0)).collect());
        let go: Option<Vec<f64>> = case.grad_output.then(|| {
            (0..if case.cfg.reduction == Reduction::None {
                n
            } else {
                1
            })
                .map(|_| rng.uniform(0.5, 2.0))
                .collect()
        });
        let total = |x: &[f64]| {
            // Never an error here: `analytic` below, with the same shapes, returns ∞ on one first.
            let Ok(r) =
                reference::fwd_bwd(x, n, v, &targets, w.as_deref(), go.as_deref(), &case.cfg)
            else {
                return f64::NAN;
            };
            match (case.cfg.reduction, &go) {
                (Reduction::None, Some(g)) => r.rows.iter().zip(g).map(|(a, b)| a * b).sum(),
                (Reduction::None, None) => r.rows.iter().sum(),
                (_, Some(g)) => r.loss * g[0],
                (_, None) => r.loss,
            }
        };
        let Ok(analytic) =
            reference::fwd_bwd(&x, n, v, &targets, w.as_deref(), go.as_deref(), &case.cfg)
        else {
            return f64::INFINITY;
        };
        let analytic = analytic.grad;
        let h = 1e-6;
        for k in 0..n * v {
            let mut xp = x.clone();
            let mut xm = x.clone();
            xp[k] += h;
            xm[k] -= h;
            let numeric = (total(&xp) - total(&xm)) / (2.0 * h);
            worst = worst.max((analytic[k] - numeric).abs() / (numeric.abs() + 1e-3));
        }
    }
    worst
}

/// Largest relative error of the kernels' fp32 row maths (fk_loss_math.h, host build) against the f64
/// reference: loss and the gradient rebuilt from (a, b, c).
///
/// ```
/// let err = fusekit::loss::verify::host_math_error(&mut fusekit::testing::Rng::new(1));
/// assert!(err < 1e-4);
/// ```
pub fn host_math_error(rng: &mut Rng) -> f64 {
    let mut worst: f64 = 0.0;
    for case in feature_matrix(1, 50) {
        let v = case.vocab;
        // fp32-representable inputs, so only the row maths differ between the two sides.
        let z: Vec<f64> = rng
            .sample(
                Dist::Logits {
                    std: 2.0,
                    outlier_frac: 0.02,
                    outlier_scale: 6.0,
                },
                v,
            )
            .into_iter()
            .map(|x| x as f32 as f64)
            .collect();
        let y = rng.below(v as u64) as usize;
        let w: Option<Vec<f64>> = case
            .weights
            .then(|| (0..v).map(|_| rng.uniform(0.3, 2.0)).collect());
        let cfg = LossConfig {
            softcap: None,
            ..case.cfg
        };
        let Ok((loss, lse, grad)) = reference::row_loss_grad(&z, y, w.as_deref(), &cfg) else {
            return f64::INFINITY;
        };
        let wf: Option<Vec<f32>> = w.as_ref().map(|w| w.iter().map(|&x| x as f32).collect());
        let Ok(k) = cfg.to_params(v, wf.as_deref(), w.is_some()) else {
            return f64::INFINITY;
        };
        let swz: f64 = (0..v)
            .map(|j| w.as_ref().map_or(1.0, |w| w[j]) * z[j])
            .sum();
        let wy = w.as_ref().map_or(1.0, |w| w[y]);
        // The kernel's order: (z_y − max) − log Σ exp(z − max), in fp32 from fp32 inputs, with the
        // (max, Σ exp) of the row split over a 128-thread block and merged as the kernel merges it.
        let zf: Vec<f32> = z.iter().map(|&x| x as f32).collect();
        let st = crate::host_math::row_maxsum_as_kernel(&zf, 128, 4, 0);
        let (m, ls) = (st.m, st.s.ln());
        let r = crate::host_math::row_loss(&k, m + ls, (zf[y] - m) - ls, swz as f32, wy as f32);
        // fp32 log Σ exp carries ~1e-7 absolute error whatever the loss: an absolute floor of 1e-6
        // (1e-4 of the 1e-2 in the denominator) for small losses.
        worst = worst.max((r.loss as f64 - loss).abs() / (loss.abs() + 1e-2));
        for j in 0..v {
            let p = (z[j] - lse).exp();
            let g = r.a as f64 * p
                + if j == y { r.b as f64 } else { 0.0 }
                + r.c as f64 * w.as_ref().map_or(1.0, |w| w[j]);
            worst = worst.max((g - grad[j]).abs() / (grad[j].abs() + 1e-3));
        }
    }
    worst
}

/// Largest error of the sigmoid focal maths: host build vs reference, and reference vs finite differences.
///
/// ```
/// let err = fusekit::loss::verify::sigmoid_focal_error(&mut fusekit::testing::Rng::new(1));
/// assert!(err < 1e-4);
/// ```
pub fn sigmoid_focal_error(rng: &mut Rng) -> f64 {
    let mut worst: f64 = 0.0;
    for &(alpha, gamma) in &[(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0), (0.25, 0.5)] {
        for _ in 0..200 {
            let x = rng.uniform(-12.0, 12.0);
            let t = if rng.unit() < 0.5 { 0.0 } else { 1.0 };
            let (l, g) = reference::sigmoid_focal(x, t, alpha, gamma);
            let (lh, gh) =
                crate::host_math::sigmoid_focal(x as f32, t as f32, alpha as f32, gamma as f32);
            worst = worst.max((lh as f64 - l).abs() / (l.abs() + 1e-3));
            worst = worst.max((gh as f64 - g).abs() / (g.abs() + 1e-3));
            let h = 1e-6;
            let fd = (reference::sigmoid_focal(x + h, t, alpha, gamma).0
                - reference::sigmoid_focal(x - h, t, alpha, gamma).0)
                / (2.0 * h);
            worst = worst.max((fd - g).abs() / (g.abs() + 1e-3));
        }
    }
    worst
}

/// fp32 error of the row statistics, relative to the size of the gradient's terms: the sum of
/// exponentials carries a few 1e-7 relative error and lse is rounded to its own ulp (2^-24·|lse|), and a
/// p_j computed from them carries both. See [`grad_floor`].
pub const STATS_EPS: f64 = 2e-6;

/// Absolute slack of each gradient element beyond [`grad_tolerance`]: `(STATS_EPS + 2^-22·|lse_i|)`
/// times the size of the terms the kernel adds for that element,
/// `|s_i|·(k·max_w·(p_j + [j = y]) + 2·z·|lse_i|·p_j + 2·ε_s·max_w/V)` (s_i the row's upstream scale,
/// k = 1 + γ + |ε| the size of the kind's coefficients, max_w the largest class weight, z the z-loss
/// scale, ε_s the label smoothing). Where the terms nearly cancel (p_y within ~1e-5 of 1 at the target:
/// `a·p_y + b`; p_j near ε_s/V with smoothing: `a·p_j + c·w_j`), the exact gradient is far smaller
/// than either term and no fp32 implementation (PyTorch's included) gets it to 1e-4 relative: its error
/// is that of the terms. Where nothing cancels the floor is ~1e-5 of the element or less, below
/// `rtol·|ref|`, and the relative L2 bound keeps its meaning.
///
/// `logits` are the dense reference logits `[N, V]` (before the softcap), `lse` the reference's.
///
/// ```
/// use fusekit::loss::verify::{grad_floor, Case};
/// let case = Case::ce(1, 2); // mean over 1 row: s = 1
/// let lse = [(2f64).ln()];
/// let f = grad_floor(&case, &[0.0, 0.0], None, &[], &[0], &lse);
/// // target column: terms a·p_y + b of size 1.5; the other: a·p_j = 0.5.
/// assert!(f[0] > 2.0 * f[1] && f[0] < 1e-5);
/// ```
pub fn grad_floor(
    case: &Case,
    logits: &[f64],
    weights: Option<&[f32]>,
    grad_output: &[f32],
    targets: &[i64],
    lse: &[f64],
) -> Vec<f64> {
    use super::LossKind::*;
    let cfg = &case.cfg;
    let (n, v) = (case.n_rows, case.vocab);
    let w = |j: usize| weights.map_or(1.0, |w| w[j] as f64);
    let max_w = weights.map_or(1.0, |w| w.iter().fold(0.0f64, |a, &x| a.max(x as f64)));
    let kind = match cfg.kind {
        CrossEntropy => 1.0,
        Focal { gamma } => 1.0 + gamma as f64,
        Poly1 { epsilon } => 1.0 + (epsilon as f64).abs(),
        Poly1Focal { gamma, epsilon } => 1.0 + gamma as f64 + (epsilon as f64).abs(),
        Gce { .. } => 1.0,
    };
    let smoothing = match cfg.label_smoothing {
        super::LabelSmoothing::None => 0.0,
        super::LabelSmoothing::PyTorch(e) | super::LabelSmoothing::Megatron(e) => 2.0 * e as f64,
    };
    let valid = |y: i64| y != cfg.ignore_index && (0..v as i64).contains(&y);
    let denominator: f64 = targets
        .iter()
        .filter(|&&y| valid(y))
        .map(|&y| w(y as usize))
        .sum();
    let mut floor = vec![0.0; n * v];
    for i in 0..n {
        if !valid(targets[i]) || !lse[i].is_finite() {
            continue;
        }
        let y = targets[i] as usize;
        let mut sc = match (cfg.reduction, grad_output.len()) {
            (_, 0) => 1.0,
            (Reduction::None, _) => grad_output[i] as f64,
            _ => grad_output[0] as f64,
        };
        if cfg.reduction == Reduction::Mean {
            sc = if denominator != 0.0 {
                sc / denominator
            } else {
                0.0
            };
        }
        let l = lse[i].abs();
        let eps = STATS_EPS + l * 2f64.powi(-22);
        for j in 0..v {
            let (z, _) = reference::softcap(logits[i * v + j], cfg.softcap);
            let p = (z - lse[i]).exp();
            let target = if j == y { 1.0 } else { 0.0 };
            let terms = kind * max_w * (p + target)
                + 2.0 * cfg.z_loss as f64 * l * p
                + smoothing * max_w / v as f64;
            floor[i * v + j] = eps * sc.abs() * terms;
        }
    }
    floor
}

/// The gradient comparison of [`check_outputs`]: [`grad_tolerance`] plus the per-element [`grad_floor`].
fn compare_grad<T: LossElement>(
    name: &str,
    case: &Case,
    inp: &CaseInputs<T>,
    grad: &[T],
    reference: &[f64],
    lse: &[f64],
) -> Result<Report, String> {
    let floor = grad_floor(
        case,
        &inp.logits_f64,
        inp.weights.as_deref(),
        inp.grad_output.as_deref().unwrap_or(&[]),
        &inp.targets,
        lse,
    );
    let q = quantum::<T>();
    compare_with_floor(name, grad, reference, grad_tolerance::<T>(), |e| {
        floor[e] + q
    })
}

/// Half the spacing of `T`'s smallest subnormals, where the gradient's scale reaches them: f16 (whose
/// subnormals are 6e-8 apart) cannot hold a gradient of 1e-8 other than as 0 or 6e-8.
fn quantum<T: Element>() -> f64 {
    if T::NAME == "f16" {
        2f64.powi(-25)
    } else {
        0.0
    }
}

/// A loss gradient `[n, v]` against the reference's, with [`grad_tolerance`] and [`grad_floor`]: what
/// every GPU test of a fused-loss gradient uses.
///
/// ```
/// use fusekit::loss::{reference, verify::compare_loss_grad, LossConfig};
/// let cfg = LossConfig::default();
/// let x = [0.5, -1.0, 2.0];
/// let r = reference::fwd_bwd(&x, 1, 3, &[2], None, None, &cfg).unwrap();
/// let got: Vec<f32> = r.grad.iter().map(|&g| g as f32).collect();
/// assert!(compare_loss_grad("g", &cfg, 1, 3, &x, &[2], None, None, &got, &r).is_ok());
/// ```
#[allow(clippy::too_many_arguments)]
pub fn compare_loss_grad<T: LossElement>(
    name: &str,
    cfg: &LossConfig,
    n: usize,
    v: usize,
    logits: &[f64],
    targets: &[i64],
    weights: Option<&[f32]>,
    grad_output: Option<&[f32]>,
    got: &[T],
    reference: &reference::RefOutput,
) -> Result<Report, String> {
    let case = Case {
        cfg: *cfg,
        ..Case::ce(n, v)
    };
    let floor = grad_floor(
        &case,
        logits,
        weights,
        grad_output.unwrap_or(&[]),
        targets,
        &reference.lse,
    );
    let q = quantum::<T>();
    compare_with_floor(name, got, &reference.grad, grad_tolerance::<T>(), |e| {
        floor[e] + q
    })
}

/// What [`host_replay`] returns: the kernel's outputs as the host computed them.
#[derive(Clone, Debug)]
pub struct Replay<T> {
    /// Dense gradient `[N, V]`.
    pub grad: Vec<T>,
    /// Per-row loss.
    pub rows: Vec<f32>,
    /// Per-row lse.
    pub lse: Vec<f32>,
    /// Reduced loss (mean/sum; the sum for `Reduction::None`).
    pub loss: f32,
}

/// The fused kernel replayed on the host in fp32, along the row path it takes on an H100
/// (`fk_ce_fwd_bwd`, one block per row, or `fk_ce_fwd_bwd_cluster*`, a cluster of blocks over slices of
/// the row, merged in rank order): the same thread split and reduction tree for the statistics (host
/// builds of fk_maxsum.h), the same per-row maths (host build of fk_loss_math.h), the same fp32 gradient
/// expression rounded once to `T`. Only the
/// library `expf`/`tanhf`/`logf` differ from CUDA's (by an ulp or so). It shows, without a GPU, that an
/// fp32 implementation of this algorithm meets [`check_outputs`]' tolerances, so a GPU failure of those
/// checks is a kernel bug, not a tolerance too tight for fp32.
///
/// Returns the dense gradient, per-row loss and lse, and the reduced loss (as fk_loss_reduce computes it).
pub fn host_replay<T: LossElement>(case: &Case, inp: &CaseInputs<T>) -> Result<Replay<T>, String> {
    use crate::host_math::{
        block_reduce_as_kernel, maxsum_merge, maxsum_push, thread_elements, MaxSum,
    };
    let (n, v, stride) = (case.n_rows, case.vocab, case.vocab + case.row_pad);
    let cfg = &case.cfg;
    let k = cfg
        .to_params(v, inp.weights.as_deref(), inp.weights.is_some())
        .map_err(|e| e.to_string())?;
    let w = |j: usize| inp.weights.as_ref().map_or(1.0f32, |w| w[j]);
    let cap = cfg.softcap.unwrap_or(0.0);
    let capped = |x: f32| -> (f32, f32) {
        if cap > 0.0 {
            let t = (x / cap).tanh();
            (cap * t, 1.0 - t * t)
        } else {
            (x, 1.0)
        }
    };
    let want_swz = matches!(cfg.kind, super::LossKind::CrossEntropy)
        && cfg.label_smoothing != super::LabelSmoothing::None;
    let valid = |y: i64| y != cfg.ignore_index && (0..v as i64).contains(&y);
    // fk_loss_denominator: f64 sum in a fixed order, stored as f32.
    let denominator = inp
        .targets
        .iter()
        .filter(|&&y| valid(y))
        .map(|&y| w(y as usize) as f64)
        .sum::<f64>() as f32;
    let size = std::mem::size_of::<T>();
    // The kernel's slices of a row: one block over the row, or on an H100 a cluster of blocks, each over
    // its slice (fk_ce_fwd_bwd_cluster*), merged in rank order.
    let path = case
        .row_path
        .resolve(&crate::DeviceProps::example_h100(), v, size, true)
        .map_err(|e| e.to_string())?;
    // (slices, threads per block): every block of a cluster has the threads of the nominal slice.
    let (slices, threads): (Vec<(usize, usize)>, usize) = match path {
        super::RowPath::Cluster { ctas } => {
            let len = super::launch::cluster_slice(v, ctas);
            let slices = (0..ctas as usize)
                .map(|r| ((r * len).min(v), (r * len + len).min(v)))
                .collect();
            (slices, super::launch::row_threads(len, size) as usize)
        }
        _ => (vec![(0, v)], super::launch::row_threads(v, size) as usize),
    };
    let mut grad = vec![T::from_f64(0.0); n * v];
    let (mut rows, mut lses) = (vec![0f32; n], vec![0f32; n]);
    for i in 0..n {
        let y = inp.targets[i];
        if y == cfg.ignore_index {
            continue;
        }
        if !valid(y) {
            rows[i] = f32::NAN;
            lses[i] = f32::NAN;
            continue;
        }
        let y = y as usize;
        let x: Vec<f32> = inp.logits[i * stride..i * stride + v]
            .iter()
            .map(|t| t.to_f64() as f32)
            .collect();
        let z: Vec<f32> = x.iter().map(|&xj| capped(xj).0).collect();
        let (mut st, mut swz) = (MaxSum::EMPTY, 0f32);
        for &(j0, j1) in &slices {
            // The slice's alignment: dense rows of T from a 16-byte aligned base.
            let head = {
                let mis = ((i * stride + j0) * size) % 16;
                if mis == 0 {
                    0
                } else {
                    (16 - mis) / size
                }
            };
            let parts = thread_elements(j1 - j0, threads, 16 / size, head);
            let part = block_reduce_as_kernel(
                parts
                    .iter()
                    .map(|js| {
                        js.iter()
                            .fold(MaxSum::EMPTY, |s, &j| maxsum_push(s, z[j0 + j]))
                    })
                    .collect(),
                MaxSum::EMPTY,
                maxsum_merge,
            );
            st = maxsum_merge(st, part);
            if want_swz {
                swz += block_reduce_as_kernel(
                    parts
                        .iter()
                        .map(|js| {
                            // fk_weighted: a class of weight 0 adds nothing, even a masked one.
                            js.iter().fold(0f32, |a, &j| match (w(j0 + j), z[j0 + j]) {
                                (wj, zj) if wj == 0.0 && zj.is_infinite() => a,
                                (wj, zj) => a + wj * zj,
                            })
                        })
                        .collect(),
                    0f32,
                    |a, b| a + b,
                );
            }
        }
        let ls = st.s.ln();
        let lse = st.m + ls;
        let r = crate::host_math::row_loss(&k, lse, (z[y] - st.m) - ls, swz, w(y));
        rows[i] = r.loss;
        lses[i] = lse;
        // fk_row_grad_scale
        let mut sc = 1f32;
        if let Some(g) = &inp.grad_output {
            sc = if cfg.reduction == Reduction::None {
                g[i]
            } else {
                g[0]
            };
        }
        if cfg.reduction == Reduction::Mean {
            sc = if denominator != 0.0 {
                sc / denominator
            } else {
                0.0
            };
        }
        let (a, b, c) = (r.a * sc, r.b * sc, r.c * sc);
        for j in 0..v {
            let (zj, dz) = capped(x[j]);
            let mut g = a * (zj - lse).exp();
            if c != 0.0 {
                g += c * w(j);
            }
            if j == y {
                g += b;
            }
            grad[i * v + j] = T::from_f64((g * dz) as f64);
        }
    }
    // fk_loss_reduce: f64 sum in a fixed order, / denominator for a mean.
    let total: f64 = rows.iter().map(|&r| r as f64).sum();
    let loss = match cfg.reduction {
        Reduction::Mean if denominator != 0.0 => (total / denominator as f64) as f32,
        Reduction::Mean if total.is_nan() => f32::NAN,
        Reduction::Mean => 0.0,
        _ => total as f32,
    };
    Ok(Replay {
        grad,
        rows,
        lse: lses,
        loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every GPU test's loss comparison, applied to the host replay of the kernel over many seeds: the
    /// tolerances must be reachable by fp32 statistics, or the GPU tests would fail on correct kernels.
    #[test]
    fn host_replay_meets_the_gpu_tolerances() {
        let seed = crate::testing::seed_for("host_replay_meets_the_gpu_tolerances");
        let mut rng = Rng::new(seed);
        let mut failures = Vec::new();
        let mut cases = 0;
        for round in 0..6 {
            for &(n, v) in &[(1, 1), (3, 7), (5, 8), (7, 9), (8, 1003), (4, 4101)] {
                for case in feature_matrix(n, v) {
                    for dtype in 0..3 {
                        let res = match dtype {
                            0 => replay_and_check::<f32>(&case, &mut rng),
                            1 => replay_and_check::<half::bf16>(&case, &mut rng),
                            _ => replay_and_check::<half::f16>(&case, &mut rng),
                        };
                        cases += 1;
                        if let Err(e) = res {
                            failures.push(format!("round {round}: {e}"));
                        }
                    }
                }
            }
        }
        assert!(
            failures.is_empty(),
            "seed {seed:#x}: {} of {cases} cases fail:\n{}",
            failures.len(),
            failures[..failures.len().min(6)].join("\n")
        );
    }

    /// The configurations of the GPU tests at LLM vocabularies (smoothing, z-loss, weights, ignored
    /// rows) and of the cluster-path edges (softcap with focal, Poly-1 with a sum and an upstream
    /// gradient), through the same checks.
    #[test]
    fn host_replay_meets_the_gpu_tolerances_at_llm_vocabularies() {
        let seed =
            crate::testing::seed_for("host_replay_meets_the_gpu_tolerances_at_llm_vocabularies");
        let mut rng = Rng::new(seed);
        for v in [32000, 50257, 128256] {
            let mut cases = vec![
                Case {
                    weights: true,
                    ..Case::ce(3, v)
                },
                Case {
                    targets_i64: true,
                    ignore_frac: 0.3,
                    ..Case::ce(4, v)
                },
            ];
            for c in &mut cases {
                c.cfg.label_smoothing = super::super::LabelSmoothing::PyTorch(0.1);
                c.cfg.z_loss = 1e-4;
            }
            cases.push(Case {
                row_pad: 1,
                grad_output: true,
                cfg: LossConfig {
                    softcap: Some(30.0),
                    kind: super::super::LossKind::Focal { gamma: 2.0 },
                    ..LossConfig::default()
                },
                ..Case::ce(5, v)
            });
            cases.push(Case {
                row_pad: 5,
                grad_output: true,
                cfg: LossConfig {
                    kind: super::super::LossKind::Poly1 { epsilon: 1.0 },
                    reduction: Reduction::Sum,
                    ..LossConfig::default()
                },
                ..Case::ce(5, v)
            });
            let h100 = crate::DeviceProps::example_h100();
            for case in &cases {
                for row_path in [
                    RowPath::Auto,
                    RowPath::Reread,
                    RowPath::Cluster { ctas: 2 },
                    RowPath::Cluster { ctas: 4 },
                    RowPath::Cluster { ctas: 8 },
                ] {
                    if row_path.resolve(&h100, v, 4, true).is_err() {
                        continue;
                    }
                    let case = Case { row_path, ..*case };
                    replay_and_check::<f32>(&case, &mut rng)
                        .unwrap_or_else(|e| panic!("seed {seed:#x}: {e}"));
                    replay_and_check::<half::bf16>(&case, &mut rng)
                        .unwrap_or_else(|e| panic!("seed {seed:#x}: {e}"));
                }
            }
        }
    }

    /// The cluster-path edges of the GPU tests (short and empty last slices, V past one block's limit).
    #[test]
    fn host_replay_of_cluster_edges_meets_the_gpu_tolerances() {
        let mut rng = Rng::new(crate::testing::seed_for("host_replay_of_cluster_edges"));
        let v_edge = (super::super::ROW_CACHE_LIMIT - 16) / 2;
        for (v, ctas) in [(v_edge + 1, 2), (v_edge + 7, 4), (57, 8), (9, 8), (1, 2)] {
            for pad in [0, 1, 5] {
                let case = Case {
                    row_pad: pad,
                    grad_output: true,
                    row_path: RowPath::Cluster { ctas },
                    ..Case::ce(5, v)
                };
                replay_and_check::<half::bf16>(&case, &mut rng).unwrap();
                // f32 slices are twice as long in bytes: (v_edge + 1, 2) does not fit one block.
                let fits = case
                    .row_path
                    .resolve(&crate::DeviceProps::example_h100(), v, 4, true)
                    .is_ok();
                match replay_and_check::<f32>(&case, &mut rng) {
                    Err(e) if !fits => assert!(e.contains("unsupported"), "{e}"),
                    res => res.unwrap(),
                }
            }
        }
    }

    type Mutant = Box<dyn Fn(&mut Vec<f32>, &mut Vec<f32>, &mut Vec<f32>)>;

    /// The checks are not toothless: realistic kernel bugs on top of a correct (replayed) output fail.
    #[test]
    fn the_checks_catch_realistic_kernel_bugs() {
        let mut rng = Rng::new(crate::testing::seed_for(
            "the_checks_catch_realistic_kernel_bugs",
        ));
        let case = Case {
            weights: true,
            cfg: LossConfig {
                z_loss: 1e-3,
                ..LossConfig::default()
            },
            ..Case::ce(8, 1003)
        };
        let inp = inputs::<f32>(&case, &mut rng);
        let Replay {
            grad: g,
            rows,
            lse,
            loss,
        } = host_replay(&case, &inp).unwrap();
        check_outputs(&case, &inp, &g, &rows, &lse, loss).expect("the replay itself passes");
        let v = case.vocab;
        let y0 = inp.targets[0] as usize;
        let targets = inp.targets.clone();
        let mutants: Vec<(&str, Mutant)> = vec![
            (
                "target column off by one",
                Box::new(move |g, _, _| g.swap(y0, (y0 + 1) % v)),
            ),
            (
                "one row scaled by 1 + 1e-3",
                Box::new(move |g, _, _| g[..v].iter_mut().for_each(|x| *x *= 1.001)),
            ),
            (
                "p_j from an lse 3e-4 too small (all rows)",
                Box::new(move |g, _, _| {
                    for i in 0..8 {
                        let y = targets[i] as usize;
                        for j in 0..v {
                            if j != y {
                                g[i * v + j] *= 1.0003;
                            }
                        }
                    }
                }),
            ),
            (
                "one element unwritten (poison)",
                Box::new(|g, _, _| g[17] = f32::from_bits(0x7fc0_dead)),
            ),
            ("a NaN", Box::new(|g, _, _| g[3] = f32::NAN)),
            // 10x the stats tolerance: 1e-4 relative (a loss of 100 has 1e-5 of slack), at least 1e-3.
            (
                "the loss of one row off by max(1e-4 relative, 1e-3)",
                Box::new(|_, r, _| r[2] += (1e-4 * r[2].abs()).max(1e-3)),
            ),
            (
                "lse of one row off by max(1e-4 relative, 1e-3)",
                Box::new(|_, _, l| l[5] += (1e-4 * l[5].abs()).max(1e-3)),
            ),
        ];
        for (what, m) in &mutants {
            let (mut g2, mut r2, mut l2) = (g.clone(), rows.clone(), lse.clone());
            m(&mut g2, &mut r2, &mut l2);
            assert!(
                check_outputs(&case, &inp, &g2, &r2, &l2, loss).is_err(),
                "not caught: {what}"
            );
        }
    }

    fn replay_and_check<T: LossElement>(case: &Case, rng: &mut Rng) -> Result<(), String> {
        let inp = inputs::<T>(case, rng);
        let r = host_replay(case, &inp)?;
        check_outputs(case, &inp, &r.grad, &r.rows, &r.lse, r.loss).map(|_| ())
    }
}
