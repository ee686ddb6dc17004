//! The loss family's part of `fusekit check` (the checks themselves live in [`super::verify`]).

use super::verify::{
    feature_matrix, host_math_error, reference_fd_error, sigmoid_focal_error, Case,
};
use super::{LossConfig, LossKind, Reduction};
use crate::check::row::{CheckRow, SelfCheck};
use crate::testing::{Dist, Rng};

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
