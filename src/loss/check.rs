//! The loss family's part of `fusekit check`, and the CPU checks of its maths shared with the unit tests.

use super::verify::{feature_matrix, Case};
use super::{reference, LossConfig, LossKind, Reduction};
use crate::check::{CheckRow, SelfCheck};
use crate::testing::{Dist, Rng};

/// Largest |analytic − numeric| / (|numeric| + 1e-3) of the reference gradient against central finite
/// differences of the reduced loss, over random small inputs of every configuration.
pub(crate) fn reference_fd_error(rng: &mut Rng) -> f64 {
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
            let r = reference::fwd_bwd(x, n, v, &targets, w.as_deref(), go.as_deref(), &case.cfg);
            match (case.cfg.reduction, &go) {
                (Reduction::None, Some(g)) => r.rows.iter().zip(g).map(|(a, b)| a * b).sum(),
                (Reduction::None, None) => r.rows.iter().sum(),
                (_, Some(g)) => r.loss * g[0],
                (_, None) => r.loss,
            }
        };
        let analytic =
            reference::fwd_bwd(&x, n, v, &targets, w.as_deref(), go.as_deref(), &case.cfg).grad;
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
pub(crate) fn host_math_error(rng: &mut Rng) -> f64 {
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
        let (loss, lse, grad) = reference::row_loss_grad(&z, y, w.as_deref(), &cfg);
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
pub(crate) fn sigmoid_focal_error(rng: &mut Rng) -> f64 {
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

fn row(
    kernel: &str,
    mode: &'static str,
    err: f64,
    tol: f64,
    note: String,
    gbps: Option<f64>,
) -> CheckRow {
    CheckRow::new(kernel, mode, err, err <= tol, note, gbps)
}

/// A kernel row from a check that may fail: `Ok(err)` judged against `tol`, `Err(msg)` a failed row.
fn kernel_row(
    name: &str,
    mode: &'static str,
    res: Result<f64, String>,
    tol: f64,
    note: String,
    gbps: Option<f64>,
) -> CheckRow {
    match res {
        Ok(e) => row(name, mode, e, tol, note, gbps),
        Err(msg) => CheckRow::new(name, mode, f64::NAN, false, msg, None),
    }
}

pub(crate) fn self_check() -> SelfCheck {
    SelfCheck {
        family: "loss",
        cpu: |rng| {
            vec![
                row(
                    "loss reference (fin. diff.)",
                    "cpu-ref",
                    reference_fd_error(rng),
                    1e-5,
                    "16 configs, grad vs central differences".into(),
                    None,
                ),
                row(
                    "fk_loss_math.h (host)",
                    "cpu-ref",
                    host_math_error(rng),
                    1e-4,
                    "fp32 row maths vs f64 reference".into(),
                    None,
                ),
                {
                    let (worst, note) = match replay_error(rng) {
                        Ok(e) => (
                            e,
                            "fp32 replay of fk_ce_fwd_bwd, GPU tolerances".to_string(),
                        ),
                        Err(e) => (f64::NAN, e),
                    };
                    row(
                        "fk_ce_fwd_bwd (host replay)",
                        "cpu-ref",
                        worst,
                        f64::INFINITY,
                        note,
                        None,
                    )
                },
                row(
                    "sigmoid focal maths",
                    "cpu-ref",
                    sigmoid_focal_error(rng),
                    1e-4,
                    "host build, reference, fin. diff.".into(),
                    None,
                ),
            ]
        },
        gpu: kernels_check::<crate::Gpu>,
        emu: kernels_check::<crate::emu::Emulator>,
        gpu_extra: Some(|gpu, rng| {
            // Throughput at a training-like size.
            let case = Case {
                cfg: LossConfig {
                    kind: LossKind::CrossEntropy,
                    ..LossConfig::default()
                },
                ..Case::ce(512, 32000)
            };
            let inp = super::verify::inputs::<half::bf16>(&case, rng);
            let name = "fk_ce_fwd_bwd_bf16 512x32000";
            let note = "GB/s of the 2·N·V·2 B floor".to_string();
            Ok(vec![match throughput(gpu, &case, &inp) {
                Ok(g) => row(name, "gpu", 0.0, 0.0, note, Some(g)),
                Err(e) => kernel_row(name, "gpu", Err(e), 0.0, note, None),
            }])
        }),
    }
}

/// The fused kernel on a device against the reference: the feature matrix in f32, bf16 and f16, and a 128k
/// vocabulary (past one block's shared memory: the cluster path on sm_90+).
fn kernels_check<B: crate::Backend>(dev: &B, rng: &mut Rng) -> crate::Result<Vec<CheckRow>> {
    use half::bf16;
    let mode = dev.kind();
    let mut rows = Vec::new();
    for (name, res) in [
        ("fk_ce_fwd_bwd_f32", run_matrix::<B, f32>(dev, rng)),
        ("fk_ce_fwd_bwd_bf16", run_matrix::<B, bf16>(dev, rng)),
        ("fk_ce_fwd_bwd_f16", run_matrix::<B, half::f16>(dev, rng)),
    ] {
        let note = "16 configs, N=8 V=1003, rel L2".to_string();
        rows.push(kernel_row(name, mode, res, f64::INFINITY, note, None));
    }
    let long = Case {
        weights: true,
        inplace: true,
        cfg: LossConfig {
            label_smoothing: super::LabelSmoothing::PyTorch(0.1),
            ..LossConfig::default()
        },
        ..Case::ce(4, 128256)
    };
    let path = super::RowPath::Auto
        .resolve(dev.props(), long.vocab, 2, true)
        .map(|p| format!("{p:?}"))
        .unwrap_or_else(|e| e.to_string());
    let res = super::verify::run::<B, bf16>(dev, rng, &long).map(|r| r.worst_rel_l2());
    let note = format!("{path}, in place, weights, smoothing");
    rows.push(kernel_row(
        "fk_ce_fwd_bwd_bf16 V=128256",
        mode,
        res,
        f64::INFINITY,
        note,
        None,
    ));
    rows.push(kernel_row(
        "fk_sigmoid_focal",
        mode,
        sigmoid_focal_run(dev, rng),
        f64::INFINITY,
        "f32 and bf16, n = 4099, the three test configs".into(),
        None,
    ));
    rows.push(kernel_row(
        "fk_ce_shard_stats/combine/bwd",
        mode,
        shards_run(dev, rng),
        f64::INFINITY,
        "bf16, 3 shards, N=8 V=1003, smoothing".into(),
        None,
    ));
    rows.push(kernel_row(
        "linear + CE",
        mode,
        linear_ce_run(dev, rng),
        f64::INFINITY,
        format!(
            "N=37 H=64 V=1003, chunks of 8 ({})",
            if mode == "gpu" {
                "cuBLAS GEMMs"
            } else {
                "host GEMMs"
            }
        ),
        None,
    ));
    Ok(rows)
}

/// Sigmoid focal against the reference: worst relative L2 error of the gradient.
fn sigmoid_focal_run<B: crate::Backend>(dev: &B, rng: &mut Rng) -> Result<f64, String> {
    use super::{sigmoid_focal_fwd_bwd, SigmoidFocalOutputs};
    let e = |e: crate::Error| e.to_string();
    let mut worst: f64 = 0.0;
    let n = 4099;
    for cfg in super::verify::SIGMOID_FOCAL_CONFIGS {
        macro_rules! go {
            ($T:ty) => {{
                let (xs, ts, go) = super::verify::sigmoid_focal_inputs::<$T>(rng, n, &cfg);
                let (x, t, god) = (
                    dev.upload(&xs).map_err(e)?,
                    dev.upload(&ts).map_err(e)?,
                    dev.upload(&go).map_err(e)?,
                );
                let mut g = crate::testing::poisoned::<B, $T>(dev, n).map_err(e)?;
                let mut out = SigmoidFocalOutputs::new(dev, n, cfg.reduction == Reduction::None)
                    .map_err(e)?;
                let gv = dev.view(&god, 0..go.len()).map_err(e)?;
                sigmoid_focal_fwd_bwd(dev, &x, &t, &mut g, Some(gv), &cfg, &mut out).map_err(e)?;
                let (_, want) = super::verify::sigmoid_focal_expected(&xs, &ts, &go, &cfg);
                let got = dev.download(&g).map_err(e)?;
                let rep =
                    super::verify::compare_elementwise_grad("sigmoid focal grad", &got, &want)?;
                worst = worst.max(rep.rel_l2);
            }};
        }
        go!(f32);
        go!(half::bf16);
    }
    Ok(worst)
}

/// Three vocabulary shards through stats, combine and backward, against the unsharded reference.
fn shards_run<B: crate::Backend>(dev: &B, rng: &mut Rng) -> Result<f64, String> {
    use half::bf16;
    let (n, v) = (8usize, 1003usize);
    let cfg = LossConfig {
        label_smoothing: super::LabelSmoothing::PyTorch(0.1),
        ..LossConfig::default()
    };
    let x: Vec<bf16> = rng.sample_as(
        Dist::Normal {
            mean: 0.0,
            std: 2.0,
        },
        n * v,
    );
    let targets: Vec<i64> = (0..n).map(|_| rng.below(v as u64) as i64).collect();
    super::verify::run_shards(dev, &x, n, v, &targets, &[0, 300, 701, v], &cfg)
}

/// Fused linear + CE (chunks of 8 rows) against the f64 reference: relative L2 error of grad_weight.
fn linear_ce_run<B: crate::Backend>(dev: &B, rng: &mut Rng) -> Result<f64, String> {
    let (n, h, v) = (37, 64, 1003);
    let (hid, w) = super::verify::linear_ce_inputs(rng, n, h, v);
    let t: Vec<i64> = (0..n).map(|_| rng.below(v as u64) as i64).collect();
    let cfg = LossConfig::default();
    let rep =
        super::verify::run_linear_ce(dev, &hid, &w, n, h, v, &t, &cfg, super::Chunking::Rows(8))?;
    Ok(rep.grad_weight_rel_l2)
}

/// The fused kernel replayed on the host (fp32, the kernel's reduction order) over the feature matrix
/// at N = 8, V = 1003 in f32 and bf16, through the GPU tests' checks; the worst relative L2 error.
fn replay_error(rng: &mut Rng) -> Result<f64, String> {
    use super::verify::{check_outputs, host_replay, inputs};
    let mut worst: f64 = 0.0;
    for case in feature_matrix(8, 1003) {
        let inp = inputs::<f32>(&case, rng);
        let r = host_replay(&case, &inp)?;
        let rep = check_outputs(&case, &inp, &r.grad, &r.rows, &r.lse, r.loss)?;
        worst = worst.max(rep.worst_rel_l2());
        let inp = inputs::<half::bf16>(&case, rng);
        let r = host_replay(&case, &inp)?;
        let rep = check_outputs(&case, &inp, &r.grad, &r.rows, &r.lse, r.loss)?;
        worst = worst.max(rep.worst_rel_l2());
    }
    Ok(worst)
}

fn run_matrix<B: crate::Backend, T: super::LossElement>(
    dev: &B,
    rng: &mut Rng,
) -> Result<f64, String> {
    let mut worst: f64 = 0.0;
    for case in feature_matrix(8, 1003) {
        worst = worst.max(super::verify::run::<B, T>(dev, rng, &case)?.worst_rel_l2());
    }
    Ok(worst)
}

fn throughput(
    gpu: &crate::Gpu,
    case: &Case,
    inp: &super::verify::CaseInputs<half::bf16>,
) -> Result<f64, String> {
    let s = gpu.stream();
    let e = |e: crate::Error| e.to_string();
    let logits = s
        .clone_htod(&inp.logits)
        .map_err(|e| format!("{:?}", e.0))?;
    let t: Vec<i32> = inp.targets.iter().map(|&y| y as i32).collect();
    let t = s.clone_htod(&t).map_err(|e| format!("{:?}", e.0))?;
    let mut g = s
        .alloc_zeros::<half::bf16>(logits.len())
        .map_err(|e| format!("{:?}", e.0))?;
    let mut out = super::LossOutputs::new(gpu, case.n_rows).map_err(e)?;
    let rows = super::Rows::contiguous(case.n_rows, case.vocab);
    let timing = crate::timing::time_launches_sync(gpu, 3, 20, || {
        super::fwd_bwd(
            gpu,
            rows,
            &logits,
            &t,
            &mut g,
            &Default::default(),
            &case.cfg,
            &mut out,
        )
    })
    .map_err(e)?;
    Ok(timing.gbps(2 * (case.n_rows * case.vocab * 2) as u64))
}
