//! Bad input never reaches a kernel (issue 11): every plan's argument checks, one case per argument per
//! kind of bad value, each asserting the exact error; a property test that drives random shapes and
//! configurations through the plans, the CPU reference and the emulated kernels; the buffer context
//! checks; several host threads sharing one device.
//!
//! Every test here runs without a GPU (the plans need none; the launches run on the emulator, and on a
//! GPU too when one is present).

use fusekit::loss::{
    self, Chunking, FusedArgs, FusedPlan, GradBuffer, LabelSmoothing, LinearCeLens,
    LinearCrossEntropy, LossConfig, LossExtras, LossKind, LossOutputs, Reduction, RowPath, Rows,
    ShardCombinePlan, ShardPlan, ShardSpec, ShardStage, SigmoidFocalConfig, SigmoidFocalPlan,
};
use fusekit::moe::{self, EpCountsPlan, GateConfig, GateLens, GatePlan, PermuteShape};
use fusekit::testing::{seed_for, Rng};
use fusekit::{Backend, DeviceProps, Error};
use half::bf16;
use proptest::prelude::*;

fn h100() -> DeviceProps {
    DeviceProps::example_h100()
}

fn a100() -> DeviceProps {
    let mut p = DeviceProps::example_h100();
    p.compute_capability = (8, 0);
    p
}

/// `Err` of exactly this variant naming exactly this argument.
macro_rules! bad {
    ($res:expr, $variant:ident, $arg:expr) => {{
        let r = $res;
        assert!(
            matches!(&r, Err(Error::$variant { arg, .. }) if *arg == $arg),
            "expected Err({} {{ arg: {:?} }}), got {:?}",
            stringify!($variant),
            $arg,
            r.as_ref().map(|_| "Ok")
        );
    }};
}

/// `Err(Unsupported)`.
macro_rules! unsupported {
    ($res:expr) => {{
        let r = $res;
        assert!(
            matches!(&r, Err(Error::Unsupported { .. })),
            "expected Err(Unsupported), got {:?}",
            r.as_ref().map(|_| "Ok")
        );
    }};
}

// ---------------------------------------------------------------- fused loss

fn fused(rows: Rows, args: &FusedArgs<'_>, cfg: &LossConfig) -> fusekit::Result<FusedPlan> {
    FusedPlan::new::<bf16, i64>(&h100(), rows, args, cfg)
}

fn dense(n: usize, v: usize) -> FusedArgs<'static> {
    FusedArgs::new(n * v, GradBuffer::Separate(n * v), n, n)
}

#[test]
fn fused_plan_rejects_each_bad_argument() {
    let (n, v) = (4, 10);
    let rows = Rows::contiguous(n, v);
    let cfg = LossConfig::default();
    assert!(fused(rows, &dense(n, v), &cfg).is_ok());
    // logits: empty batch, vocab 0, vocab >= 2^31, short buffer, stride < vocab, extent overflow.
    bad!(
        fused(Rows::contiguous(0, v), &dense(0, v), &cfg),
        Shape,
        "logits"
    );
    bad!(
        fused(Rows::contiguous(n, 0), &dense(n, 0), &cfg),
        Shape,
        "logits"
    );
    bad!(
        fused(Rows::contiguous(1, 1 << 31), &dense(1, 1 << 31), &cfg),
        Shape,
        "logits"
    );
    bad!(
        fused(
            rows,
            &FusedArgs {
                logits: n * v - 1,
                ..dense(n, v)
            },
            &cfg
        ),
        Shape,
        "logits"
    );
    bad!(
        fused(
            Rows {
                row_stride: v - 1,
                ..rows
            },
            &dense(n, v),
            &cfg
        ),
        Layout,
        "logits"
    );
    let huge = Rows {
        n_rows: 1 << 40,
        vocab: v,
        row_stride: 1 << 40,
        grad_stride: v,
    };
    bad!(
        fused(
            huge,
            &FusedArgs::new(usize::MAX, GradBuffer::None, 1 << 40, 1 << 40),
            &cfg
        ),
        Shape,
        "logits"
    );
    // grad: stride < vocab, short buffer, extent overflow; in place ignores grad_stride.
    bad!(
        fused(
            Rows {
                grad_stride: v - 1,
                ..rows
            },
            &dense(n, v),
            &cfg
        ),
        Layout,
        "grad"
    );
    bad!(
        fused(
            rows,
            &FusedArgs {
                grad: GradBuffer::Separate(n * v - 1),
                ..dense(n, v)
            },
            &cfg
        ),
        Shape,
        "grad"
    );
    let wide_grad = Rows {
        n_rows: 1 << 40,
        vocab: v,
        row_stride: v,
        grad_stride: 1 << 40,
    };
    bad!(
        fused(
            wide_grad,
            &FusedArgs::new(v << 40, GradBuffer::Separate(usize::MAX), 1 << 40, 1 << 40),
            &cfg
        ),
        Shape,
        "grad"
    );
    assert!(fused(
        Rows {
            grad_stride: 0,
            ..rows
        },
        &FusedArgs {
            grad: GradBuffer::InPlace,
            ..dense(n, v)
        },
        &cfg
    )
    .is_ok());
    // targets: one per row.
    for t in [0, n - 1, n + 1] {
        bad!(
            fused(
                rows,
                &FusedArgs {
                    targets: t,
                    ..dense(n, v)
                },
                &cfg
            ),
            Shape,
            "targets"
        );
    }
    // out: fewer rows than the call.
    bad!(
        fused(
            rows,
            &FusedArgs {
                out_rows: n - 1,
                ..dense(n, v)
            },
            &cfg
        ),
        Shape,
        "out"
    );
    // class weights: length; host copy missing with smoothing, or the wrong length.
    for w in [0, v - 1, v + 1] {
        bad!(
            fused(
                rows,
                &FusedArgs {
                    class_weights: Some(w),
                    ..dense(n, v)
                },
                &cfg
            ),
            Shape,
            "class_weights"
        );
    }
    let smooth = LossConfig {
        label_smoothing: LabelSmoothing::PyTorch(0.1),
        ..cfg
    };
    bad!(
        fused(
            rows,
            &FusedArgs {
                class_weights: Some(v),
                ..dense(n, v)
            },
            &smooth
        ),
        InvalidArgument,
        "class_weights_host"
    );
    let short_host = vec![1.0f32; v - 1];
    bad!(
        fused(
            rows,
            &FusedArgs {
                class_weights: Some(v),
                class_weights_host: Some(&short_host),
                ..dense(n, v)
            },
            &smooth
        ),
        Shape,
        "class_weights_host"
    );
    // grad_output: 1 element for mean/sum, n for none.
    for (red, len) in [
        (Reduction::Mean, 2),
        (Reduction::Sum, 0),
        (Reduction::None, 1),
    ] {
        bad!(
            fused(
                rows,
                &FusedArgs {
                    grad_output: Some(len),
                    ..dense(n, v)
                },
                &LossConfig {
                    reduction: red,
                    ..cfg
                }
            ),
            Shape,
            "grad_output"
        );
    }
    // Row paths: a cluster size other than 2/4/8; shared memory for a row that cannot fit; a
    // cluster on a GPU without clusters.
    bad!(
        fused(
            rows,
            &FusedArgs {
                row_path: RowPath::Cluster { ctas: 3 },
                ..dense(n, v)
            },
            &cfg
        ),
        InvalidArgument,
        "row_path"
    );
    unsupported!(fused(
        Rows::contiguous(1, 1 << 20),
        &FusedArgs {
            row_path: RowPath::SharedMemory,
            ..dense(1, 1 << 20)
        },
        &cfg
    ));
    unsupported!(FusedPlan::new::<bf16, i64>(
        &a100(),
        rows,
        &FusedArgs {
            row_path: RowPath::Cluster { ctas: 2 },
            ..dense(n, v)
        },
        &cfg
    ));
    // Every scalar of the configuration, each bad value.
    let bad_cfgs: Vec<(LossConfig, &str)> = vec![
        (
            LossConfig {
                kind: LossKind::Focal { gamma: -1.0 },
                ..cfg
            },
            "gamma",
        ),
        (
            LossConfig {
                kind: LossKind::Focal { gamma: f32::NAN },
                ..cfg
            },
            "gamma",
        ),
        (
            LossConfig {
                kind: LossKind::Focal {
                    gamma: f32::INFINITY,
                },
                ..cfg
            },
            "gamma",
        ),
        (
            LossConfig {
                kind: LossKind::Poly1Focal {
                    gamma: -0.5,
                    epsilon: 0.0,
                },
                ..cfg
            },
            "gamma",
        ),
        (
            LossConfig {
                kind: LossKind::Poly1Focal {
                    gamma: 1.0,
                    epsilon: -2.0,
                },
                ..cfg
            },
            "epsilon",
        ),
        (
            LossConfig {
                kind: LossKind::Poly1 { epsilon: -2.0 },
                ..cfg
            },
            "epsilon",
        ),
        (
            LossConfig {
                kind: LossKind::Poly1 { epsilon: f32::NAN },
                ..cfg
            },
            "epsilon",
        ),
        (
            LossConfig {
                kind: LossKind::Gce { q: 0.0 },
                ..cfg
            },
            "q",
        ),
        (
            LossConfig {
                kind: LossKind::Gce { q: 1.5 },
                ..cfg
            },
            "q",
        ),
        (
            LossConfig {
                kind: LossKind::Gce { q: f32::NAN },
                ..cfg
            },
            "q",
        ),
        (
            LossConfig {
                softcap: Some(0.0),
                ..cfg
            },
            "softcap",
        ),
        (
            LossConfig {
                softcap: Some(-1.0),
                ..cfg
            },
            "softcap",
        ),
        (
            LossConfig {
                softcap: Some(f32::INFINITY),
                ..cfg
            },
            "softcap",
        ),
        (
            LossConfig {
                z_loss: -1.0,
                ..cfg
            },
            "z_loss",
        ),
        (
            LossConfig {
                z_loss: f32::NAN,
                ..cfg
            },
            "z_loss",
        ),
        (
            LossConfig {
                label_smoothing: LabelSmoothing::PyTorch(1.5),
                ..cfg
            },
            "label_smoothing",
        ),
        (
            LossConfig {
                label_smoothing: LabelSmoothing::Megatron(-0.1),
                ..cfg
            },
            "label_smoothing",
        ),
        (
            LossConfig {
                label_smoothing: LabelSmoothing::PyTorch(f32::NAN),
                ..cfg
            },
            "label_smoothing",
        ),
        (
            LossConfig {
                kind: LossKind::Focal { gamma: 2.0 },
                label_smoothing: LabelSmoothing::PyTorch(0.1),
                ..cfg
            },
            "label_smoothing",
        ),
    ];
    for (c, arg) in bad_cfgs {
        bad!(fused(rows, &dense(n, v), &c), InvalidArgument, arg);
    }
}

#[test]
fn sigmoid_focal_plan_rejects_each_bad_argument() {
    let n = 1000;
    let cfg = SigmoidFocalConfig::default();
    let plan = |l, t, g, go, c: &SigmoidFocalConfig, on, pe| {
        SigmoidFocalPlan::new::<f32>(l, t, g, go, c, on, pe)
    };
    assert!(plan(n, n, n, None, &cfg, n, false).is_ok());
    bad!(plan(0, 0, 0, None, &cfg, 0, false), Shape, "logits");
    for t in [n - 1, n + 1] {
        bad!(plan(n, t, n, None, &cfg, n, false), Shape, "targets");
        bad!(plan(n, n, t, None, &cfg, n, false), Shape, "grad");
        bad!(plan(n, n, n, None, &cfg, t, false), Shape, "out");
    }
    let none = SigmoidFocalConfig {
        reduction: Reduction::None,
        ..cfg
    };
    bad!(plan(n, n, n, None, &none, n, false), Shape, "out.elements");
    bad!(plan(n, n, n, Some(1), &none, n, true), Shape, "grad_output");
    bad!(plan(n, n, n, Some(n), &cfg, n, false), Shape, "grad_output");
    for g in [-0.5, f32::NAN, f32::INFINITY] {
        bad!(
            plan(
                n,
                n,
                n,
                None,
                &SigmoidFocalConfig { gamma: g, ..cfg },
                n,
                false
            ),
            InvalidArgument,
            "gamma"
        );
    }
    for a in [1.5, f32::NAN, f32::NEG_INFINITY] {
        bad!(
            plan(
                n,
                n,
                n,
                None,
                &SigmoidFocalConfig { alpha: a, ..cfg },
                n,
                false
            ),
            InvalidArgument,
            "alpha"
        );
    }
}

#[test]
fn shard_plans_reject_each_bad_argument() {
    let (n, vs, v) = (4, 6, 12);
    let rows = Rows::contiguous(n, vs);
    let cfg = LossConfig::default();
    let spec = ShardSpec {
        vocab_offset: 6,
        full_vocab: v,
    };
    let args = FusedArgs::new(n * vs, GradBuffer::None, n, n);
    let stats = ShardStage::Stats { stats: n * 4 };
    let plan = |rows, spec, args: &FusedArgs<'_>, stage| {
        ShardPlan::new::<f32, i32>(rows, spec, args, &cfg, stage)
    };
    assert!(plan(rows, spec, &args, stats).is_ok());
    bad!(
        plan(
            rows,
            ShardSpec {
                vocab_offset: 7,
                ..spec
            },
            &args,
            stats
        ),
        Shape,
        "shard"
    );
    bad!(
        plan(
            rows,
            ShardSpec {
                vocab_offset: usize::MAX,
                ..spec
            },
            &args,
            stats
        ),
        Shape,
        "shard"
    );
    bad!(
        plan(Rows::contiguous(0, vs), spec, &args, stats),
        Shape,
        "logits"
    );
    bad!(
        plan(
            rows,
            spec,
            &FusedArgs {
                logits: n * vs - 1,
                ..args
            },
            stats
        ),
        Shape,
        "logits"
    );
    bad!(
        plan(
            rows,
            spec,
            &FusedArgs {
                targets: n + 1,
                ..args
            },
            stats
        ),
        Shape,
        "targets"
    );
    bad!(
        plan(
            rows,
            spec,
            &FusedArgs {
                class_weights: Some(vs),
                ..args
            },
            stats
        ),
        Shape,
        "class_weights"
    );
    bad!(
        plan(rows, spec, &args, ShardStage::Stats { stats: n * 4 - 1 }),
        Shape,
        "stats"
    );
    bad!(
        plan(rows, spec, &args, ShardStage::Backward { grad: n * vs - 1 }),
        Shape,
        "grad"
    );
    bad!(
        plan(
            rows,
            spec,
            &FusedArgs {
                out_rows: n - 1,
                ..args
            },
            ShardStage::Backward { grad: n * vs }
        ),
        Shape,
        "out"
    );
    bad!(
        plan(
            Rows {
                grad_stride: vs - 1,
                ..rows
            },
            spec,
            &args,
            ShardStage::Backward { grad: n * vs }
        ),
        Layout,
        "grad"
    );
    // Combine.
    let combine = |n_rows, stats, shards, args: &FusedArgs<'_>| {
        ShardCombinePlan::new::<i64>(n_rows, v, stats, shards, args, &cfg)
    };
    assert!(combine(n, 2 * n * 4, 2, &args).is_ok());
    bad!(combine(n, 2 * n * 4, 0, &args), InvalidArgument, "n_shards");
    bad!(combine(n, 2 * n * 4 - 1, 2, &args), Shape, "stats");
    bad!(combine(n, usize::MAX, usize::MAX, &args), Shape, "stats");
    bad!(combine(0, 0, 2, &args), Shape, "logits");
    bad!(
        combine(
            n,
            2 * n * 4,
            2,
            &FusedArgs {
                targets: n - 1,
                ..args
            }
        ),
        Shape,
        "targets"
    );
    bad!(
        combine(
            n,
            2 * n * 4,
            2,
            &FusedArgs {
                out_rows: n - 1,
                ..args
            }
        ),
        Shape,
        "out"
    );
}

#[test]
fn linear_ce_plan_rejects_each_bad_argument() {
    let Some(dev) = fusekit::testing::emulator_for("linear_ce_plan_rejects_each_bad_argument")
    else {
        return;
    };
    let (n, h, v) = (5, 8, 16);
    let lce = LinearCrossEntropy::new(&dev, v, h, Chunking::Rows(3)).unwrap();
    let lens = LinearCeLens {
        hidden: n * h,
        weight: v * h,
        grad_hidden: n * h,
        grad_weight: v * h,
    };
    let args = FusedArgs::new(0, GradBuffer::None, n, n);
    let cfg = LossConfig::default();
    let plan = |n, lens: &LinearCeLens, args: &FusedArgs<'_>| {
        lce.plan::<i64>(&h100(), n, lens, args, &cfg)
    };
    assert!(plan(n, &lens, &args).is_ok());
    bad!(
        plan(
            n,
            &LinearCeLens {
                hidden: n * h - 1,
                ..lens
            },
            &args
        ),
        Shape,
        "hidden"
    );
    bad!(
        plan(
            n,
            &LinearCeLens {
                weight: v * h + 1,
                ..lens
            },
            &args
        ),
        Shape,
        "weight"
    );
    bad!(
        plan(
            n,
            &LinearCeLens {
                grad_hidden: n * h - 1,
                ..lens
            },
            &args
        ),
        Shape,
        "grad_hidden"
    );
    bad!(
        plan(
            n,
            &LinearCeLens {
                grad_weight: v * h - 1,
                ..lens
            },
            &args
        ),
        Shape,
        "grad_weight"
    );
    bad!(
        plan(
            n,
            &lens,
            &FusedArgs {
                targets: n - 1,
                ..args
            }
        ),
        Shape,
        "targets"
    );
    bad!(
        plan(
            n,
            &lens,
            &FusedArgs {
                out_rows: n - 1,
                ..args
            }
        ),
        Shape,
        "out"
    );
    unsupported!(plan(1 << 31, &lens, &args));
    // The constructor: empty weight, dimensions beyond cuBLAS, chunking.
    bad!(
        LinearCrossEntropy::new(&dev, 0, h, Chunking::Rows(3)),
        Shape,
        "weight"
    );
    bad!(
        LinearCrossEntropy::new(&dev, v, 0, Chunking::Rows(3)),
        Shape,
        "weight"
    );
    unsupported!(LinearCrossEntropy::new(&dev, 1 << 31, h, Chunking::Rows(3)));
    bad!(
        LinearCrossEntropy::new(&dev, v, h, Chunking::Rows(0)),
        InvalidArgument,
        "chunking"
    );
    bad!(
        LinearCrossEntropy::new(&dev, 1 << 20, h, Chunking::Rows(1 << 12)),
        InvalidArgument,
        "chunking"
    );
    bad!(
        LinearCrossEntropy::new(&dev, v, h, Chunking::Rows(usize::MAX)),
        InvalidArgument,
        "chunking"
    );
}

// ---------------------------------------------------------------- MoE

#[test]
fn gate_plan_rejects_each_bad_argument() {
    let cfg = GateConfig::deepseek_v3();
    let t = 16;
    let lens = GateLens::dense(&cfg, t);
    let plan = |cfg: &GateConfig, t, lens: &GateLens| GatePlan::new::<bf16>(&h100(), cfg, t, lens);
    assert!(plan(&cfg, t, &lens).is_ok());
    bad!(plan(&cfg, 0, &GateLens::dense(&cfg, 0)), Shape, "logits");
    bad!(
        plan(
            &cfg,
            t,
            &GateLens {
                logits: lens.logits - 1,
                ..lens
            }
        ),
        Shape,
        "logits"
    );
    bad!(plan(&cfg, usize::MAX, &lens), Shape, "logits");
    bad!(
        plan(
            &cfg,
            t,
            &GateLens {
                ids: lens.ids + 1,
                ..lens
            }
        ),
        Shape,
        "ids"
    );
    bad!(
        plan(&cfg, t, &GateLens { weights: 0, ..lens }),
        Shape,
        "weights"
    );
    bad!(
        plan(
            &cfg,
            t,
            &GateLens {
                counts: 255,
                ..lens
            }
        ),
        Shape,
        "counts"
    );
    bad!(
        plan(
            &cfg,
            t,
            &GateLens {
                bias: Some(257),
                ..lens
            }
        ),
        Shape,
        "bias"
    );
    assert!(plan(&cfg, t, &GateLens { bias: None, ..lens }).is_ok());
    let bad_cfgs: Vec<(GateConfig, &str)> = vec![
        (
            GateConfig {
                n_experts: 0,
                ..cfg
            },
            "n_experts",
        ),
        (
            GateConfig {
                n_experts: 1 << 20,
                ..cfg
            },
            "n_experts",
        ),
        (GateConfig { top_k: 0, ..cfg }, "top_k"),
        (GateConfig { top_k: 1000, ..cfg }, "top_k"),
        (
            GateConfig {
                top_k: 33,
                n_group: 1,
                topk_group: 1,
                ..cfg
            },
            "top_k",
        ),
        (GateConfig { n_group: 0, ..cfg }, "n_group"),
        (GateConfig { n_group: 7, ..cfg }, "n_group"),
        (
            GateConfig {
                topk_group: 0,
                ..cfg
            },
            "topk_group",
        ),
        (
            GateConfig {
                topk_group: 9,
                ..cfg
            },
            "topk_group",
        ),
        (
            GateConfig {
                scaling: f32::NAN,
                ..cfg
            },
            "scaling",
        ),
        (
            GateConfig {
                scaling: f32::INFINITY,
                ..cfg
            },
            "scaling",
        ),
    ];
    for (c, arg) in bad_cfgs {
        let l = GateLens::dense(&c, t);
        bad!(plan(&c, t, &l), InvalidArgument, arg);
    }
}

#[test]
fn permute_and_ep_plans_reject_each_bad_argument() {
    let p = h100();
    assert!(PermuteShape::new(16, 2, 8, 4).is_ok());
    bad!(PermuteShape::new(0, 2, 8, 4), Shape, "ids");
    bad!(PermuteShape::new(16, 0, 8, 4), InvalidArgument, "top_k");
    bad!(PermuteShape::new(16, 1000, 8, 4), InvalidArgument, "top_k");
    bad!(PermuteShape::new(16, 2, 0, 4), InvalidArgument, "n_experts");
    bad!(
        PermuteShape::new(16, 2, 1 << 20, 4),
        InvalidArgument,
        "n_experts"
    );
    bad!(
        PermuteShape::new(16, 2, 8, 0),
        InvalidArgument,
        "block_size"
    );
    unsupported!(PermuteShape::new(1 << 30, 4, 8, 1));
    unsupported!(PermuteShape::new(usize::MAX, 4, 8, 1));
    unsupported!(PermuteShape::new(16, 2, 256, usize::MAX));
    let s = PermuteShape::new(16, 2, 8, 4).unwrap();
    let h = 64;
    bad!(s.build_launches(31), Shape, "ids");
    assert!(s
        .gather_launch::<bf16>(&p, h, 16 * h, s.max_rows() * h)
        .is_ok());
    bad!(s.gather_launch::<bf16>(&p, 0, 0, 0), Shape, "hidden");
    bad!(
        s.gather_launch::<bf16>(&p, h, 16 * h - 1, s.max_rows() * h),
        Shape,
        "hidden"
    );
    bad!(
        s.gather_launch::<bf16>(&p, h, 16 * h, s.max_rows() * h + 1),
        Shape,
        "out"
    );
    bad!(
        s.gather_launch::<bf16>(&p, usize::MAX, 0, 0),
        Shape,
        "hidden"
    );
    assert!(s
        .combine_launch::<bf16>(&p, h, s.max_rows() * h, 32, 16 * h)
        .is_ok());
    bad!(
        s.combine_launch::<bf16>(&p, 0, 0, 32, 0),
        Shape,
        "expert_out"
    );
    bad!(
        s.combine_launch::<bf16>(&p, h, s.max_rows() * h - 1, 32, 16 * h),
        Shape,
        "expert_out"
    );
    bad!(
        s.combine_launch::<bf16>(&p, h, s.max_rows() * h, 31, 16 * h),
        Shape,
        "weights"
    );
    bad!(
        s.combine_launch::<bf16>(&p, h, s.max_rows() * h, 32, 16 * h + 1),
        Shape,
        "out"
    );
    bad!(
        s.combine_launch::<bf16>(&p, usize::MAX, 0, 32, 0),
        Shape,
        "out"
    );
    // Expert-parallel counts.
    let ep = |t, k, e, r, ids, m, tpr| EpCountsPlan::new(&p, t, k, e, r, ids, m, tpr);
    assert!(ep(2, 2, 4, 2, 4, 4, 2).is_ok());
    bad!(ep(2, 2, 4, 0, 4, 0, 0), InvalidArgument, "n_ranks");
    bad!(ep(2, 2, 4, 3, 4, 6, 3), InvalidArgument, "n_ranks");
    bad!(ep(2, 2, 0, 1, 4, 2, 1), InvalidArgument, "n_ranks");
    bad!(ep(0, 2, 4, 2, 0, 0, 2), Shape, "ids");
    bad!(ep(2, 0, 4, 2, 0, 4, 2), Shape, "ids");
    bad!(ep(2, 2, 4, 2, 3, 4, 2), Shape, "ids");
    bad!(ep(2, 2, 4, 2, 4, 5, 2), Shape, "membership");
    bad!(ep(2, 2, 4, 2, 4, 4, 1), Shape, "tokens_per_rank");
    bad!(ep(usize::MAX, 2, 4, 2, 4, 4, 2), Shape, "ids");
}

// ---------------------------------------------------------------- contexts and the status word

/// A buffer, an output or a plan made on one device and passed with another is `Err(Layout)`.
#[test]
fn buffers_of_another_device_are_layout_errors() {
    let name = "buffers_of_another_device_are_layout_errors";
    let (Some(a), Some(b)) = (
        fusekit::testing::emulator_for(name),
        fusekit::testing::emulator_for(name),
    ) else {
        return;
    };
    let (n, v) = (2, 8);
    let x = a.upload(&[0.0f32; 16]).unwrap();
    let xb = b.upload(&[0.0f32; 16]).unwrap();
    let t = a.upload(&[1i32, 2]).unwrap();
    let mut g = a.alloc_zeros::<f32>(16).unwrap();
    let mut out = LossOutputs::new(&a, n).unwrap();
    let mut out_b = LossOutputs::new(&b, n).unwrap();
    let rows = Rows::contiguous(n, v);
    let cfg = LossConfig::default();
    let none = LossExtras::default();
    assert!(loss::fwd_bwd(&a, rows, &x, &t, &mut g, &none, &cfg, &mut out).is_ok());
    bad!(
        loss::fwd_bwd(&a, rows, &xb, &t, &mut g, &none, &cfg, &mut out),
        Layout,
        "logits"
    );
    bad!(
        loss::fwd_bwd(&a, rows, &x, &t, &mut g, &none, &cfg, &mut out_b),
        Layout,
        "out"
    );
    let wb = b.upload(&[1.0f32; 8]).unwrap();
    let ex = LossExtras {
        class_weights: Some(&wb),
        ..Default::default()
    };
    bad!(
        loss::fwd_bwd(&a, rows, &x, &t, &mut g, &ex, &cfg, &mut out),
        Layout,
        "class_weights"
    );
    // MoE: a permutation plan of another device.
    let ids = a.upload(&[0i32, 1, 1, 0]).unwrap();
    let mut plan_b = moe::PermutePlan::new(&b, 2, 2, 2, 1).unwrap();
    bad!(plan_b.build(&a, &ids), Layout, "plan");
    let hid = a.alloc_zeros::<bf16>(2 * 4).unwrap();
    let mut o = a.alloc_zeros::<bf16>(plan_b.max_rows() * 4).unwrap();
    bad!(moe::gather(&a, &plan_b, &hid, 4, &mut o), Layout, "plan");
}

/// `check_targets_sync` names the caller's row: outputs with more rows than the call, and a chunk of
/// fused linear + CE after the first.
#[test]
fn check_targets_names_the_callers_row() {
    fusekit::on_every_backend!("check_targets_names_the_callers_row", |dev| {
        check_targets_on(dev)
    });
}

fn check_targets_on<B: Backend>(dev: &B) {
    let (n, v) = (4, 8);
    let x = dev.upload(&vec![0.0f32; n * v]).unwrap();
    let t = dev.upload(&[1i32, 2, 99, 3]).unwrap();
    let mut g = dev.alloc_zeros::<f32>(n * v).unwrap();
    let mut out = LossOutputs::new(dev, 16).unwrap(); // more rows than the call
    let cfg = LossConfig::default();
    loss::fwd_bwd(
        dev,
        Rows::contiguous(n, v),
        &x,
        &t,
        &mut g,
        &Default::default(),
        &cfg,
        &mut out,
    )
    .unwrap();
    let e = out
        .check_targets_sync(dev, &t, v, cfg.ignore_index)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::OutOfRange {
                arg: "targets",
                index: 2,
                value: 99,
                ..
            }
        ),
        "{e:?}"
    );
    // Fused linear + CE in chunks of 2 rows: the bad target is row 3, in the second chunk.
    let (h, n) = (4, 5);
    let hidden = dev.upload(&vec![bf16::from_f32(0.1); n * h]).unwrap();
    let weight = dev.upload(&vec![bf16::from_f32(0.2); v * h]).unwrap();
    let t = dev.upload(&[0i64, 1, 2, -7, 4]).unwrap();
    let mut dh = dev.alloc_zeros::<bf16>(n * h).unwrap();
    let mut dw = dev.alloc_zeros::<f32>(v * h).unwrap();
    let mut out = LossOutputs::new(dev, n).unwrap();
    let mut lce = LinearCrossEntropy::new(dev, v, h, Chunking::Rows(2)).unwrap();
    lce.fwd_bwd(
        dev,
        n,
        &hidden,
        &weight,
        &t,
        &Default::default(),
        &cfg,
        &mut dh,
        &mut dw,
        false,
        &mut out,
    )
    .unwrap();
    let e = out
        .check_targets_sync(dev, &t, v, cfg.ignore_index)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::OutOfRange {
                arg: "targets",
                index: 3,
                value: -7,
                ..
            }
        ),
        "{e:?}"
    );
}

// ---------------------------------------------------------------- several host threads

/// One device shared by several host threads launching different shapes at once: every result equals
/// the same call made alone.
#[test]
fn threads_sharing_a_device_get_single_threaded_results() {
    fusekit::on_every_backend!(
        "threads_sharing_a_device_get_single_threaded_results",
        |dev| { threads_on(dev) }
    );
}

fn loss_job<B: Backend>(dev: &B, seed: u64, n: usize, v: usize) -> (Vec<bf16>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let x: Vec<bf16> = (0..n * v)
        .map(|_| bf16::from_f64(rng.normal() * 3.0))
        .collect();
    let t: Vec<i64> = (0..n).map(|_| rng.below(v as u64) as i64).collect();
    let x = dev.upload(&x).unwrap();
    let t = dev.upload(&t).unwrap();
    let mut g = dev.alloc_zeros::<bf16>(n * v).unwrap();
    let mut out = LossOutputs::new(dev, n).unwrap();
    loss::fwd_bwd(
        dev,
        Rows::contiguous(n, v),
        &x,
        &t,
        &mut g,
        &Default::default(),
        &LossConfig::default(),
        &mut out,
    )
    .unwrap();
    (dev.download(&g).unwrap(), dev.download(&out.rows).unwrap())
}

fn gate_job<B: Backend>(dev: &B, seed: u64, t: usize) -> (Vec<i32>, Vec<f32>) {
    let cfg = GateConfig::deepseek_v3();
    let mut rng = Rng::new(seed);
    let x: Vec<f32> = (0..t * cfg.n_experts)
        .map(|_| rng.normal() as f32)
        .collect();
    let x = dev.upload(&x).unwrap();
    let mut ids = dev.alloc_zeros::<i32>(t * cfg.top_k).unwrap();
    let mut w = dev.alloc_zeros::<f32>(t * cfg.top_k).unwrap();
    let mut c = dev.alloc_zeros::<i32>(cfg.n_experts).unwrap();
    moe::gate(dev, &cfg, t, &x, None, &mut ids, &mut w, &mut c, false).unwrap();
    (dev.download(&ids).unwrap(), dev.download(&w).unwrap())
}

fn threads_on<B: Backend>(dev: &B) {
    let seed = seed_for("threads_sharing_a_device_get_single_threaded_results");
    let shapes = [(3usize, 1000usize), (1, 4097), (5, 77), (2, 20000)];
    let alone_loss: Vec<_> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(n, v))| loss_job(dev, seed + i as u64, n, v))
        .collect();
    let alone_gate = gate_job(dev, seed + 100, 40);
    // On a GPU each thread queues on a stream of its own (a handle per thread), as callers would.
    std::thread::scope(|s| {
        let handles: Vec<_> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(n, v))| {
                let d = dev.clone();
                s.spawn(move || loss_job(&d, seed + i as u64, n, v))
            })
            .collect();
        let d = dev.clone();
        let gate = s.spawn(move || gate_job(&d, seed + 100, 40));
        for (i, h) in handles.into_iter().enumerate() {
            let got = h.join().expect("loss thread");
            assert_eq!(
                fusekit::testing::first_bit_difference(&got.0, &alone_loss[i].0),
                None,
                "grad of shape {:?}",
                shapes[i]
            );
            assert_eq!(
                fusekit::testing::first_bit_difference(&got.1, &alone_loss[i].1),
                None,
                "rows of shape {:?}",
                shapes[i]
            );
        }
        let got = gate.join().expect("gate thread");
        assert_eq!(got.0, alone_gate.0);
        assert_eq!(
            fusekit::testing::first_bit_difference(&got.1, &alone_gate.1),
            None
        );
    });
}

// ---------------------------------------------------------------- property test

fn cases() -> u32 {
    std::env::var("FUSEKIT_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024)
}

/// A length near `exact`: exact most of the time, else off by one, zero, or absurd; always exact when
/// `!fuzz`.
fn near(exact: usize, fuzz: bool) -> BoxedStrategy<usize> {
    if !fuzz {
        return Just(exact).boxed();
    }
    prop_oneof![
        6 => Just(exact),
        1 => Just(exact.saturating_sub(1)),
        1 => Just(exact.saturating_add(1)),
        1 => Just(0usize),
        1 => Just(usize::MAX),
    ]
    .boxed()
}

/// A configuration every kernel takes.
fn valid_loss_config() -> impl Strategy<Value = LossConfig> {
    let kind = prop_oneof![
        4 => Just(LossKind::CrossEntropy),
        1 => (0.0f32..4.0).prop_map(|g| LossKind::Focal { gamma: g }),
        1 => (-1.0f32..4.0).prop_map(|e| LossKind::Poly1 { epsilon: e }),
        1 => (0.0f32..4.0, -1.0f32..4.0).prop_map(|(g, e)| LossKind::Poly1Focal { gamma: g, epsilon: e }),
        1 => (0.05f32..1.0).prop_map(|q| LossKind::Gce { q }),
    ];
    let reduction = prop_oneof![
        Just(Reduction::Mean),
        Just(Reduction::Sum),
        Just(Reduction::None)
    ];
    (
        kind,
        0.0f32..0.5,
        any::<bool>(),
        reduction,
        prop_oneof![2 => Just(None), 1 => (1.0f32..50.0).prop_map(Some)],
        prop_oneof![2 => Just(0.0f32), 1 => 0.0f32..1e-3],
    )
        .prop_map(
            |(kind, eps, megatron, reduction, softcap, z_loss)| LossConfig {
                kind,
                label_smoothing: match (kind, megatron) {
                    (LossKind::CrossEntropy, false) => LabelSmoothing::PyTorch(eps),
                    (LossKind::CrossEntropy, true) => LabelSmoothing::Megatron(eps),
                    _ => LabelSmoothing::None,
                },
                softcap,
                z_loss,
                reduction,
                ..LossConfig::default()
            },
        )
}

fn any_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -2.0f32..4.0,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(-1e30f32),
        1 => Just(0.0f32),
    ]
}

fn loss_config() -> impl Strategy<Value = LossConfig> {
    let kind = prop_oneof![
        4 => Just(LossKind::CrossEntropy),
        1 => any_f32().prop_map(|g| LossKind::Focal { gamma: g }),
        1 => any_f32().prop_map(|e| LossKind::Poly1 { epsilon: e }),
        1 => (any_f32(), any_f32()).prop_map(|(g, e)| LossKind::Poly1Focal { gamma: g, epsilon: e }),
        1 => any_f32().prop_map(|q| LossKind::Gce { q }),
    ];
    let smoothing = prop_oneof![
        3 => Just(LabelSmoothing::None),
        1 => any_f32().prop_map(LabelSmoothing::PyTorch),
        1 => any_f32().prop_map(LabelSmoothing::Megatron),
    ];
    let reduction = prop_oneof![
        Just(Reduction::Mean),
        Just(Reduction::Sum),
        Just(Reduction::None)
    ];
    let softcap = prop_oneof![3 => Just(None), 1 => any_f32().prop_map(Some)];
    let z = prop_oneof![3 => Just(0.0f32), 1 => any_f32()];
    (kind, smoothing, reduction, softcap, z, -200i64..5).prop_map(
        |(kind, label_smoothing, reduction, softcap, z_loss, ignore)| LossConfig {
            kind,
            ignore_index: if ignore < -100 { -100 } else { ignore },
            label_smoothing,
            z_loss,
            softcap,
            reduction,
        },
    )
}

fn row_path() -> impl Strategy<Value = RowPath> {
    prop_oneof![
        4 => Just(RowPath::Auto),
        1 => Just(RowPath::SharedMemory),
        1 => Just(RowPath::Reread),
        1 => (0u32..10).prop_map(|ctas| RowPath::Cluster { ctas }),
    ]
}

/// Everything a fused call can be given, sized around a valid call.
#[derive(Clone, Debug)]
struct FusedInput {
    rows: Rows,
    logits: usize,
    grad: GradBuffer,
    targets: usize,
    weights: Option<usize>,
    weights_host: Option<usize>,
    grad_output: Option<usize>,
    out_rows: usize,
    path: RowPath,
    cfg: LossConfig,
}

fn fused_input(max_rows: usize, max_vocab: usize) -> impl Strategy<Value = FusedInput> {
    // Half the inputs are valid calls (every length exact, a configuration the kernels take), half are
    // fuzzed (any length off, any scalar out of its domain, any row path).
    let fuzzed = (
        1..=max_rows,
        1..=max_vocab,
        0usize..3,
        0usize..3,
        loss_config(),
        row_path(),
    )
        .prop_map(|(n, v, pad, gpad, cfg, path)| (true, n, v, pad, gpad, cfg, path));
    let valid = (
        1..=max_rows,
        1..=max_vocab,
        0usize..2,
        0usize..2,
        valid_loss_config(),
    )
        .prop_map(|(n, v, pad, gpad, cfg)| (false, n, v, pad, gpad, cfg, RowPath::Auto));
    let edge = prop_oneof![Just(0usize), Just(1usize)];
    (prop_oneof![valid, fuzzed], edge)
        .prop_map(|((fuzz, n, v, pad, gpad, cfg, path), e)| {
            // Now and then an empty batch or vocabulary.
            let (n, v) = if fuzz && e == 0 {
                (n % 2 * n, v)
            } else {
                (n, v)
            };
            (fuzz, n, v, pad, gpad, cfg, path)
        })
        .prop_flat_map(|(fuzz, n, v, pad, gpad, cfg, path)| {
            let rows = Rows {
                n_rows: n,
                vocab: v,
                row_stride: match pad {
                    0 => v,
                    1 => v + 1,
                    _ => v.saturating_sub(1),
                },
                grad_stride: v + gpad,
            };
            let ext = |s: usize| if n == 0 { 0 } else { (n - 1) * s + v };
            let go = if cfg.reduction == Reduction::None {
                n
            } else {
                1
            };
            let grad = prop_oneof![
                1 => Just(GradBuffer::None),
                1 => Just(GradBuffer::InPlace),
                3 => near(ext(rows.grad_stride), fuzz).prop_map(GradBuffer::Separate),
            ];
            // Class weights come with their host copy on valid calls.
            let weights = near(v, fuzz);
            let weights = if fuzz {
                (
                    prop_oneof![3 => Just(None), 1 => weights.prop_map(Some)],
                    prop_oneof![1 => Just(None), 1 => near(v, true).prop_map(Some)],
                )
                    .boxed()
            } else {
                prop_oneof![3 => Just((None, None)), 1 => Just((Some(v), Some(v)))].boxed()
            };
            (
                Just(rows),
                near(ext(rows.row_stride), fuzz),
                grad,
                near(n, fuzz),
                weights,
                prop_oneof![2 => Just(None), 1 => near(go, fuzz).prop_map(Some)],
                near(n, fuzz),
                Just(path),
                Just(cfg),
            )
        })
        .prop_map(
            |(
                rows,
                logits,
                grad,
                targets,
                (weights, weights_host),
                grad_output,
                out_rows,
                path,
                cfg,
            )| {
                FusedInput {
                    rows,
                    logits,
                    grad,
                    targets,
                    weights,
                    weights_host,
                    grad_output,
                    out_rows: out_rows.min(1 << 20),
                    path,
                    cfg,
                }
            },
        )
}

fn plan_of(inp: &FusedInput, host: &[f32], props: &DeviceProps) -> fusekit::Result<FusedPlan> {
    let args = FusedArgs {
        logits: inp.logits,
        grad: inp.grad,
        targets: inp.targets,
        class_weights: inp.weights,
        class_weights_host: inp.weights_host.map(|w| &host[..w.min(host.len())]),
        grad_output: inp.grad_output,
        row_path: inp.path,
        out_rows: inp.out_rows,
    };
    FusedPlan::new::<bf16, i32>(props, inp.rows, &args, &inp.cfg)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases() * 8, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random shapes, lengths and configurations through the fused plan: never a panic; `Ok` only with
    /// launches a GPU can take, buffers long enough for them, and a valid configuration.
    #[test]
    fn fused_plans_never_panic_and_only_accept_what_a_gpu_can_launch(
        inp in fused_input(1 << 12, 1 << 20),
        sm90 in any::<bool>(),
    ) {
        let props = if sm90 { h100() } else { a100() };
        let host = vec![1.0f32; inp.rows.vocab + 1];
        if let Ok(plan) = plan_of(&inp, &host, &props) {
            let r = inp.rows;
            prop_assert!(r.n_rows >= 1 && r.vocab >= 1 && r.row_stride >= r.vocab);
            prop_assert!(inp.logits >= (r.n_rows - 1) * r.row_stride + r.vocab);
            if let GradBuffer::Separate(g) = inp.grad {
                prop_assert!(g >= (r.n_rows - 1) * r.grad_stride + r.vocab);
            }
            prop_assert_eq!(inp.targets, r.n_rows);
            prop_assert!(inp.out_rows >= r.n_rows);
            for l in plan.launches() {
                prop_assert!(l.grid >= 1 && (32..=1024).contains(&l.block), "{:?}", l);
                prop_assert!(u64::from(l.shared_mem_bytes) <= props.smem_per_block_optin, "{:?}", l);
            }
            if matches!(plan.row_path(), RowPath::Cluster { .. }) {
                prop_assert!(props.compute_capability.0 >= 9);
            }
        }
    }

    /// The MoE plans, the same way.
    #[test]
    fn moe_plans_never_panic(
        t in prop_oneof![Just(0usize), 1usize..5000, Just(usize::MAX / 2)],
        e in prop_oneof![0usize..300, Just(1usize << 20)],
        k in 0usize..40,
        groups in 0usize..20,
        topk_group in 0usize..20,
        block in prop_oneof![0usize..300, Just(usize::MAX)],
        h in prop_oneof![0usize..5000, Just(usize::MAX)],
        ranks in 0usize..20,
        off in -1i64..2,
    ) {
        let cfg = GateConfig { n_experts: e, top_k: k, n_group: groups, topk_group, ..GateConfig::deepseek_v3() };
        let mut lens = GateLens::dense(&cfg, t);
        lens.ids = lens.ids.saturating_add_signed(off as isize);
        if let Ok(p) = GatePlan::new::<f32>(&h100(), &cfg, t, &lens) {
            prop_assert!(cfg.validate().is_ok() && t >= 1);
            prop_assert!(p.launches()[0].grid >= 1);
        }
        if let Ok(s) = PermuteShape::new(t, k, e, block) {
            prop_assert!(s.max_rows() < 1 << 31);
            let _ = s.build_launches(t.saturating_mul(k));
            let _ = s.gather_launch::<bf16>(&h100(), h, t.saturating_mul(h), s.max_rows().saturating_mul(h));
            let _ = s.combine_launch::<f32>(&h100(), h, s.max_rows().saturating_mul(h), s.slots(), t.saturating_mul(h));
        }
        let _ = EpCountsPlan::new(&h100(), t, k, e, ranks, t.saturating_mul(k), t.saturating_mul(ranks), ranks);
    }
}

/// A proptest runner seeded from the test's seed (printed, and replayable with `FUSEKIT_SEED`).
fn seeded_runner(name: &str, cases: u32) -> (u64, proptest::test_runner::TestRunner) {
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let seed = seed_for(name);
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &key);
    (seed, TestRunner::new_with_rng(config, rng))
}

/// Small random calls end to end on the emulator: the call errs exactly when its plan does, with the
/// same error; otherwise every output matches the f64 reference. Seeded (the seed is printed); at least a
/// quarter of the cases must launch and an eighth must be refused, so the property cannot pass vacuously.
#[test]
fn fused_calls_err_as_planned_or_match_the_reference() {
    use std::cell::Cell;
    let name = "fused_calls_err_as_planned_or_match_the_reference";
    let Some(dev) = fusekit::testing::emulator_for(name) else {
        return;
    };
    let (seed, mut runner) = seeded_runner(name, cases());
    let (launched, refused) = (Cell::new(0u32), Cell::new(0u32));
    let r = runner.run(&(fused_input(6, 300), any::<u64>()), |(inp, seed)| {
        fused_call_property(&dev, &inp, seed, &launched, &refused)
    });
    if let Err(e) = r {
        panic!("seed {seed}: {e}");
    }
    let (l, f) = (launched.get(), refused.get());
    println!("{name}: {l} calls launched and matched the reference, {f} refused as planned");
    assert!(
        l >= cases() / 4 && f >= cases() / 8,
        "launched {l}, refused {f} of {}",
        cases()
    );
}

fn fused_call_property(
    dev: &fusekit::emu::Emulator,
    inp: &FusedInput,
    seed: u64,
    launched: &std::cell::Cell<u32>,
    refused: &std::cell::Cell<u32>,
) -> Result<(), proptest::test_runner::TestCaseError> {
    let host = vec![1.0f32; inp.rows.vocab + 1];
    let planned = plan_of(inp, &host, dev.props());
    // Buffers of the asked lengths (absurd lengths are capped: the plan's verdict on those is the
    // property above; here the call must still agree with it when both are small).
    let cap = |x: usize| x.min(1 << 16);
    let lens = [
        Some(inp.logits),
        Some(inp.targets),
        Some(inp.out_rows),
        inp.weights,
        inp.weights_host,
        inp.grad_output,
        match inp.grad {
            GradBuffer::Separate(g) => Some(g),
            _ => None,
        },
    ];
    if lens.iter().flatten().any(|&x| x > 1 << 16) {
        return Ok(());
    }
    let mut rng = Rng::new(seed);
    let logits: Vec<bf16> = (0..cap(inp.logits))
        .map(|_| bf16::from_f64(rng.normal() * 2.0))
        .collect();
    let targets: Vec<i32> = (0..cap(inp.targets))
        .map(|_| {
            if rng.unit() < 0.1 {
                inp.cfg.ignore_index as i32
            } else {
                rng.below(inp.rows.vocab.max(1) as u64) as i32
            }
        })
        .collect();
    let x = dev.upload(&logits).unwrap();
    let t = dev.upload(&targets).unwrap();
    let w = inp
        .weights
        .map(|n| dev.upload(&vec![1.0f32; cap(n)]).unwrap());
    let go = inp
        .grad_output
        .map(|n| dev.upload(&vec![1.0f32; cap(n)]).unwrap());
    let extras = LossExtras {
        class_weights: w.as_ref(),
        class_weights_host: inp.weights_host.map(|n| &host[..n.min(host.len())]),
        grad_output: go.as_ref().map(|g| dev.view(g, 0..g.len()).unwrap()),
        row_path: inp.path,
    };
    let mut out = LossOutputs::new(dev, inp.out_rows).unwrap();
    let r = match inp.grad {
        GradBuffer::None => loss::forward(dev, inp.rows, &x, &t, &extras, &inp.cfg, &mut out),
        GradBuffer::InPlace => {
            let mut x2 = dev.upload(&logits).unwrap();
            loss::fwd_bwd_inplace(dev, inp.rows, &mut x2, &t, &extras, &inp.cfg, &mut out)
        }
        GradBuffer::Separate(g) => {
            let mut gb = dev.alloc_zeros::<bf16>(g.max(1)).unwrap();
            let mut gv = dev.view_mut(&mut gb, 0..g).unwrap();
            loss::fwd_bwd(dev, inp.rows, &x, &t, &mut gv, &extras, &inp.cfg, &mut out)
        }
    };
    match (&planned, &r) {
        (Err(pe), Err(ce)) => {
            refused.set(refused.get() + 1);
            prop_assert_eq!(pe, ce)
        }
        (Ok(_), Ok(())) => {
            // The launch ran: compare with the reference through the tests' own comparison.
            let case = loss::verify::Case {
                n_rows: inp.rows.n_rows,
                vocab: inp.rows.vocab,
                row_pad: 0,
                cfg: inp.cfg,
                weights: inp.weights.is_some(),
                grad_output: inp.grad_output.is_some(),
                inplace: inp.grad == GradBuffer::InPlace,
                targets_i64: false,
                ignore_frac: 0.1,
                row_path: inp.path,
            };
            let rep = loss::verify::run::<_, bf16>(dev, &mut rng, &case);
            prop_assert!(rep.is_ok(), "{:?}: {:?}", case, rep.err());
            launched.set(launched.get() + 1);
        }
        _ => prop_assert!(
            false,
            "plan {:?} but call {:?}",
            planned.as_ref().map(|_| ()),
            r
        ),
    }
    Ok(())
}

/// The MoE gate and permutation end to end on the emulator, with random configurations (valid or not):
/// the call, the plan and the CPU reference agree on the error, or the kernels match the reference (gate
/// bit for bit; permute + gather + combine within bf16 rounding). Non-vacuous as above.
#[test]
fn moe_calls_err_as_planned_or_match_the_reference() {
    use std::cell::Cell;
    let name = "moe_calls_err_as_planned_or_match_the_reference";
    let Some(dev) = fusekit::testing::emulator_for(name) else {
        return;
    };
    let (seed, mut runner) = seeded_runner(name, cases() / 4);
    let (launched, refused) = (Cell::new(0u32), Cell::new(0u32));
    let strategy = (
        0usize..40,    // tokens
        0usize..70,    // experts
        0usize..10,    // top_k
        0usize..9,     // groups
        0usize..9,     // kept groups
        any::<bool>(), // softmax
        0usize..20,    // block size
        any::<u64>(),  // data seed
        any::<bool>(), // fuzzed (else made valid)
    );
    let r = runner.run(&strategy, |(t, e, k, g, kg, softmax, block, s, fuzz)| {
        // Half the cases are made valid: groups dividing the experts, top-k reachable.
        let (t, e, k, g, kg, block) = if fuzz {
            (t, e, k, g, kg, block)
        } else {
            let e = e.max(1);
            let g = (1..=g.clamp(1, 8)).rev().find(|d| e % d == 0).unwrap_or(1);
            let kg = kg.clamp(1, g);
            let reach = if g > 1 { kg * (e / g) } else { e };
            (t.max(1), e, k.clamp(1, reach.min(32)), g, kg, block.max(1))
        };
        let cfg = GateConfig {
            n_experts: e,
            top_k: k,
            n_group: g,
            topk_group: kg,
            scoring: if softmax {
                moe::Scoring::Softmax
            } else {
                moe::Scoring::Sigmoid
            },
            ..GateConfig::deepseek_v3()
        };
        let mut rng = Rng::new(s);
        let plan = GatePlan::new::<f32>(dev.props(), &cfg, t, &GateLens::dense(&cfg, t));
        match plan {
            Err(pe) => {
                // The call with buffers of the lengths it asks for, and the reference, err the same.
                let lens = GateLens::dense(&cfg, t);
                let x = dev.alloc_zeros::<f32>(lens.logits).unwrap();
                let mut ids = dev.alloc_zeros::<i32>(lens.ids).unwrap();
                let mut w = dev.alloc_zeros::<f32>(lens.weights).unwrap();
                let mut c = dev.alloc_zeros::<i32>(lens.counts).unwrap();
                let ce = moe::gate(&dev, &cfg, t, &x, None, &mut ids, &mut w, &mut c, false)
                    .unwrap_err();
                prop_assert_eq!(&pe, &ce);
                let host = vec![0.0f32; lens.logits];
                prop_assert!(moe::reference::gate(&host, t, None, &cfg).is_err());
                refused.set(refused.get() + 1);
            }
            Ok(_) => {
                let r = moe::check::run_gate::<_, f32>(&dev, &cfg, t, &mut rng);
                prop_assert!(r.is_ok(), "{:?}: {:?}", cfg, r.err());
                launched.set(launched.get() + 1);
            }
        }
        match PermuteShape::new(t, k, e, block) {
            Err(_) => {
                prop_assert!(moe::PermutePlan::new(&dev, t, k, e, block).is_err());
            }
            Ok(_) => {
                let r = moe::check::run_permute::<_, bf16>(&dev, &mut rng, t, k, e, block, 24);
                prop_assert!(
                    r.is_ok(),
                    "t {} k {} e {} block {}: {:?}",
                    t,
                    k,
                    e,
                    block,
                    r.err()
                );
                prop_assert!(r.unwrap().0 < 1e-2);
            }
        }
        Ok(())
    });
    if let Err(e) = r {
        panic!("seed {seed}: {e}");
    }
    let (l, f) = (launched.get(), refused.get());
    println!("{name}: {l} gate calls matched the reference, {f} refused as planned");
    assert!(
        l >= cases() / 16 && f >= cases() / 16,
        "launched {l}, refused {f} of {}",
        cases() / 4
    );
}

#[test]
fn copy_plan_rejects_each_bad_argument() {
    use fusekit::probe::CopyPlan;
    let p = h100();
    assert!(CopyPlan::new(&p, 5, 5, 4).is_ok());
    assert!(CopyPlan::new(&p, 0, 0, 4).unwrap().launches().is_empty());
    bad!(CopyPlan::new(&p, 5, 4, 4), Shape, "dst");
    bad!(CopyPlan::new(&p, 4, 5, 4), Shape, "dst");
    bad!(CopyPlan::new(&p, usize::MAX, usize::MAX, 4), Shape, "src");
}
