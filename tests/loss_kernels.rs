//! The loss kernels against the f64 reference, on the SIMT emulator always and on a GPU when one is
//! present: every configuration, every dtype, edge sizes, every row path (shared memory, cluster,
//! re-read), > 2^31-element offsets, determinism, vocabulary shards, sigmoid focal, fused linear + CE,
//! non-finite logits, bad input.
#![allow(clippy::needless_range_loop)]

use fusekit::loss::verify::{self, feature_matrix, Case};
use fusekit::loss::*;
use fusekit::testing::{emu_large, first_bit_difference, poisoned, seed_for, Dist, Rng};
use fusekit::{Backend, Error};
use half::{bf16, f16};

fn matrix<B: Backend, T: LossElement>(dev: &B, rng: &mut Rng, n: usize, v: usize) {
    for case in feature_matrix(n, v) {
        let rep = verify::run::<B, T>(dev, rng, &case).unwrap_or_else(|e| panic!("{e}"));
        println!(
            "{} {} n={n} v={v} {:?}: grad {} | rows {}",
            dev.kind(),
            T::NAME,
            case.cfg.kind,
            rep.grad,
            rep.rows
        );
    }
}

fn every_configuration<B: Backend, T: LossElement>(dev: &B, name: &str, sizes: &[(usize, usize)]) {
    let mut rng = Rng::new(seed_for(name));
    for &(n, v) in sizes {
        matrix::<B, T>(dev, &mut rng, n, v);
    }
}

const EDGE_SIZES: &[(usize, usize)] = &[(1, 1), (3, 7), (5, 8), (7, 9), (8, 1003), (4, 4096 + 5)];

#[test]
fn every_configuration_matches_the_reference_f32() {
    let name = "every_configuration_matches_the_reference_f32";
    fusekit::on_every_backend!(name, |dev| every_configuration::<_, f32>(
        dev, name, EDGE_SIZES
    ));
}

#[test]
fn every_configuration_matches_the_reference_bf16() {
    let name = "every_configuration_matches_the_reference_bf16";
    fusekit::on_every_backend!(name, |dev| every_configuration::<_, bf16>(
        dev, name, EDGE_SIZES
    ));
}

#[test]
fn every_configuration_matches_the_reference_f16() {
    let name = "every_configuration_matches_the_reference_f16";
    fusekit::on_every_backend!(name, |dev| every_configuration::<_, f16>(
        dev,
        name,
        &[(3, 7), (8, 1003)]
    ));
}

#[test]
fn llm_vocabularies_on_every_row_path() {
    fusekit::on_every_backend!("llm_vocabularies_on_every_row_path", |dev| {
        llm_vocabularies_on_every_row_path_on(dev)
    });
}

fn llm_vocabularies_on_every_row_path_on<B: Backend>(dev: &B) {
    // Auto: 32000 bf16 rows fit one block's shared memory; 50257, 128256 and 256000 bf16 and every f32
    // size here go to a cluster on sm_90+ (else the re-read path). Each size also runs forced onto the
    // re-read path and, where the device has clusters, onto every cluster size whose slice fits.
    let mut rng = Rng::new(seed_for("llm_vocabularies_on_every_row_path"));
    let props = dev.props().clone();
    for v in [32000, 50257, 128256, 256000] {
        let mut paths = vec![RowPath::Auto, RowPath::Reread];
        for ctas in [2, 4, 8] {
            let c = RowPath::Cluster { ctas };
            if c.resolve(&props, v, 2, true).is_ok() {
                paths.push(c);
            }
        }
        for &row_path in &paths {
            for mut case in [
                Case {
                    weights: true,
                    ..Case::ce(3, v)
                },
                Case {
                    inplace: true,
                    targets_i64: true,
                    ignore_frac: 0.3,
                    ..Case::ce(4, v)
                },
            ] {
                case.row_path = row_path;
                case.cfg.label_smoothing = LabelSmoothing::PyTorch(0.1);
                case.cfg.z_loss = 1e-4;
                let resolved = row_path.resolve(&props, v, 2, true).unwrap();
                let rep =
                    verify::run::<B, bf16>(dev, &mut rng, &case).unwrap_or_else(|e| panic!("{e}"));
                println!(
                    "{} bf16 v={v} {row_path:?} -> {resolved:?} inplace={}: grad {} rows {}",
                    dev.kind(),
                    case.inplace,
                    rep.grad,
                    rep.rows
                );
            }
        }
        let f32_case = Case {
            row_pad: 3,
            ..Case::ce(2, v)
        };
        let rep = verify::run::<B, f32>(dev, &mut rng, &f32_case).unwrap_or_else(|e| panic!("{e}"));
        println!(
            "{} f32 v={v} Auto -> {:?}: grad {}",
            dev.kind(),
            RowPath::Auto.resolve(&props, v, 4, true).unwrap(),
            rep.grad
        );
    }
}

#[test]
fn cluster_path_edges() {
    fusekit::on_every_backend!("cluster_path_edges", |dev| cluster_path_edges_on(dev));
}

fn cluster_path_edges_on<B: Backend>(dev: &B) {
    // Vocabularies just past one block's limit, not multiples of the vector width, with a last slice
    // that is short or empty, misaligned rows (row_pad), softcap and the focal family.
    if dev.props().compute_capability.0 < 9 {
        println!("no thread-block clusters on this device: the cluster path is not used here");
        return;
    }
    let mut rng = Rng::new(seed_for("cluster_path_edges"));
    let v_edge = (ROW_CACHE_LIMIT - 16) / 2;
    for (v, ctas) in [
        (v_edge + 1, 2),
        (v_edge + 7, 4),
        (v_edge * 2 + 13, 8),
        (57, 8),
        (9, 8),
        (1, 2),
    ] {
        for (pad, cfg) in [
            (0, LossConfig::default()),
            (
                1,
                LossConfig {
                    softcap: Some(30.0),
                    kind: LossKind::Focal { gamma: 2.0 },
                    ..LossConfig::default()
                },
            ),
            (
                5,
                LossConfig {
                    kind: LossKind::Poly1 { epsilon: 1.0 },
                    reduction: Reduction::Sum,
                    ..LossConfig::default()
                },
            ),
        ] {
            let case = Case {
                row_pad: pad,
                cfg,
                grad_output: true,
                row_path: RowPath::Cluster { ctas },
                ..Case::ce(5, v)
            };
            let rep =
                verify::run::<B, bf16>(dev, &mut rng, &case).unwrap_or_else(|e| panic!("{e}"));
            println!(
                "{} cluster{ctas} v={v} pad={pad}: grad {} rows {}",
                dev.kind(),
                rep.grad,
                rep.rows
            );
            // f32 slices are twice as long in bytes: (v_edge + 1, 2) does not fit, and says so.
            let f32_path = case.row_path.resolve(dev.props(), v, 4, true);
            match verify::run::<B, f32>(dev, &mut rng, &case) {
                Ok(rep) => println!("cluster{ctas} f32 v={v} pad={pad}: grad {}", rep.grad),
                Err(e) if f32_path.is_err() && e.contains("unsupported") => {
                    println!("cluster{ctas} f32 v={v}: {e}")
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}

/// Every instantiation of the fused row kernel (storage type × target index type × row path), and of
/// the shard kernels, on a small case: each compiled kernel must have run somewhere (scripts/emu-test
/// checks that every kernel of every family launched).
#[test]
fn every_instantiation_of_the_row_and_shard_kernels() {
    fusekit::on_every_backend!("every_instantiation_of_the_row_and_shard_kernels", |dev| {
        every_instantiation_on(dev)
    });
}

fn every_instantiation_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("every_instantiation_of_the_row_and_shard_kernels"));
    let mut paths = vec![RowPath::SharedMemory, RowPath::Reread];
    if dev.props().compute_capability.0 >= 9 {
        paths.extend([2, 4, 8].map(|ctas| RowPath::Cluster { ctas }));
    }
    fn one<B: Backend, T: LossElement>(dev: &B, rng: &mut Rng, paths: &[RowPath]) {
        for targets_i64 in [false, true] {
            for &row_path in paths {
                let case = Case {
                    targets_i64,
                    row_path,
                    ignore_frac: 0.2,
                    ..Case::ce(5, 1003)
                };
                verify::run::<B, T>(dev, rng, &case)
                    .unwrap_or_else(|e| panic!("{} {row_path:?} i64 {targets_i64}: {e}", T::NAME));
            }
            shard_case::<B, T>(dev, rng, targets_i64);
        }
    }
    one::<B, f32>(dev, &mut rng, &paths);
    one::<B, f16>(dev, &mut rng, &paths);
    one::<B, bf16>(dev, &mut rng, &paths);
}

/// Two vocabulary shards of a small case through stats, combine and backward, in `T` with i32 or i64
/// targets, against the unsharded reference.
fn shard_case<B: Backend, T: LossElement>(dev: &B, rng: &mut Rng, targets_i64: bool) {
    let (n, v, cut) = (6usize, 301usize, 140usize);
    let cfg = LossConfig {
        label_smoothing: LabelSmoothing::PyTorch(0.05),
        ..LossConfig::default()
    };
    let x: Vec<T> = rng.sample_as(
        Dist::Normal {
            mean: 0.0,
            std: 2.0,
        },
        n * v,
    );
    let targets: Vec<i64> = (0..n)
        .map(|i| {
            if i == 2 {
                -100
            } else {
                rng.below(v as u64) as i64
            }
        })
        .collect();
    let bounds = [0, cut, v];
    if targets_i64 {
        verify::run_shards(dev, &x, n, v, &targets, &bounds, &cfg)
    } else {
        let t: Vec<i32> = targets.iter().map(|&y| y as i32).collect();
        verify::run_shards(dev, &x, n, v, &t, &bounds, &cfg)
    }
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn row_cache_limit_boundary() {
    fusekit::on_every_backend!("row_cache_limit_boundary", |dev| {
        row_cache_limit_boundary_on(dev)
    });
}

fn row_cache_limit_boundary_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("row_cache_limit_boundary"));
    let v_edge = (ROW_CACHE_LIMIT - 16) / 2;
    for v in [v_edge - 1, v_edge, v_edge + 1] {
        verify::run::<B, bf16>(
            dev,
            &mut rng,
            &Case {
                row_pad: 1,
                ..Case::ce(3, v)
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn results_are_bitwise_deterministic() {
    fusekit::on_every_backend!("results_are_bitwise_deterministic", |dev| {
        results_are_bitwise_deterministic_on(dev)
    });
}

fn results_are_bitwise_deterministic_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("results_are_bitwise_deterministic"));
    for case in [
        Case::ce(64, 32000),
        // Auto: a cluster per row on sm_90+; then the re-read path.
        Case::ce(16, 128256),
        Case {
            row_path: RowPath::Reread,
            ..Case::ce(16, 128256)
        },
        Case {
            weights: true,
            ..Case::ce(33, 5000)
        },
    ] {
        let inp = verify::inputs::<bf16>(&case, &mut rng);
        let (_, g1) = verify::run_with(dev, &case, &inp).unwrap();
        for _ in 0..3 {
            let (_, g2) = verify::run_with(dev, &case, &inp).unwrap();
            assert_eq!(first_bit_difference(&g1, &g2), None, "{case:?}");
        }
    }
    // The reduced loss and per-row outputs too.
    let (n, v) = (512, 32000);
    let case = Case::ce(n, v);
    let inp = verify::inputs::<bf16>(&case, &mut rng);
    let run = || {
        let x = dev.upload(&inp.logits).unwrap();
        let t: Vec<i32> = inp.targets.iter().map(|&y| y as i32).collect();
        let t = dev.upload(&t).unwrap();
        let mut g = dev.alloc_zeros::<bf16>(n * v).unwrap();
        let mut out = LossOutputs::new(dev, n).unwrap();
        fwd_bwd(
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
        (
            dev.download(&out.rows).unwrap(),
            dev.download(&out.lse).unwrap(),
            dev.download(&out.loss).unwrap(),
        )
    };
    let a = run();
    let b = run();
    assert_eq!(first_bit_difference(&a.0, &b.0), None);
    assert_eq!(first_bit_difference(&a.1, &b.1), None);
    assert_eq!(first_bit_difference(&a.2, &b.2), None);
}

#[test]
fn more_than_2_pow_31_elements() {
    fusekit::on_every_backend!("more_than_2_pow_31_elements", |dev| {
        more_than_2_pow_31_elements_on(dev)
    });
}

fn more_than_2_pow_31_elements_on<B: Backend>(dev: &B) {
    // Rows far apart: buffers of more than 2^31 elements of which only the rows are touched (the
    // emulator's large buffers are mapped lazily, so this costs a few pages there). Every offset past
    // 2^31 goes through the kernels' 64-bit row arithmetic, separate logits and gradient strides, and
    // the in-place path.
    let (n, v) = (3usize, 1003usize);
    let (row_stride, grad_stride) = ((1usize << 30) + 8, (1usize << 30) + 40);
    let mut rng = Rng::new(seed_for("more_than_2_pow_31_elements"));
    let vals: Vec<bf16> = rng
        .sample(
            Dist::Logits {
                std: 2.0,
                outlier_frac: 0.01,
                outlier_scale: 6.0,
            },
            n * v,
        )
        .into_iter()
        .map(bf16::from_f64)
        .collect();
    let targets: Vec<i64> = (0..n).map(|_| rng.below(v as u64) as i64).collect();
    let t = dev.upload(&targets).unwrap();
    let cfg = LossConfig {
        reduction: Reduction::Sum,
        ..LossConfig::default()
    };
    let xf: Vec<f64> = vals.iter().map(|z| z.to_f64()).collect();
    let r = reference::fwd_bwd(&xf, n, v, &targets, None, None, &cfg).unwrap();
    let rows = Rows {
        n_rows: n,
        vocab: v,
        row_stride,
        grad_stride,
    };
    let extent = |stride: usize| (n - 1) * stride + v;
    assert!(extent(row_stride) > 1 << 31);
    let mut x = dev.alloc_zeros::<bf16>(extent(row_stride)).unwrap();
    for i in 0..n {
        let mut row = dev
            .view_mut(&mut x, i * row_stride..i * row_stride + v)
            .unwrap();
        dev.write(&vals[i * v..(i + 1) * v], &mut row).unwrap();
    }
    for inplace in [false, true] {
        let mut out = LossOutputs::new(dev, n).unwrap();
        let (g, stride): (Vec<bf16>, usize) = if inplace {
            fwd_bwd_inplace(dev, rows, &mut x, &t, &Default::default(), &cfg, &mut out).unwrap();
            let mut g = Vec::new();
            for i in 0..n {
                let view = dev.view(&x, i * row_stride..i * row_stride + v).unwrap();
                g.extend(dev.download(&view).unwrap());
            }
            (g, row_stride)
        } else {
            let mut gbuf = dev.alloc_zeros::<bf16>(extent(grad_stride)).unwrap();
            fwd_bwd(
                dev,
                rows,
                &x,
                &t,
                &mut gbuf,
                &Default::default(),
                &cfg,
                &mut out,
            )
            .unwrap();
            let mut g = Vec::new();
            for i in 0..n {
                let view = dev
                    .view(&gbuf, i * grad_stride..i * grad_stride + v)
                    .unwrap();
                g.extend(dev.download(&view).unwrap());
            }
            (g, grad_stride)
        };
        out.check_targets_sync(dev, &t, v, cfg.ignore_index)
            .unwrap();
        verify::compare_loss_grad(
            &format!("grad, stride {stride}, in place {inplace}"),
            &cfg,
            n,
            v,
            &xf,
            &targets,
            None,
            None,
            &g,
            &r,
        )
        .unwrap();
        verify::compare_stats("rows", &dev.download(&out.rows).unwrap(), &r.rows).unwrap();
        verify::compare_stats("loss", &dev.download(&out.loss).unwrap(), &[r.loss]).unwrap();
    }
}

#[test]
fn more_than_2_pow_31_dense_elements() {
    fusekit::on_every_backend!("more_than_2_pow_31_dense_elements", |dev| {
        more_than_2_pow_31_dense_elements_on(dev)
    });
}

fn more_than_2_pow_31_dense_elements_on<B: Backend>(dev: &B) {
    let (n, v) = (16_400usize, 131_072usize); // 2.15e9 elements, 4.3 GB of bf16 per buffer
    if dev.kind() == "emu" && !emu_large() {
        println!(
            "emulator: the dense 2^31-element case is opt-in (FUSEKIT_EMU_LARGE=1); \
             more_than_2_pow_31_elements covers the same offsets with sparse rows"
        );
        return;
    }
    if dev.props().total_mem < 12 << 30 {
        println!(
            "only {} GiB of device memory: cannot hold two 4.3 GB buffers; nothing to check",
            dev.props().total_mem >> 30
        );
        return;
    }
    assert!(n * v > 1 << 31);
    // Cheap deterministic pattern (hash of the index), so the upload dominates, not the generator.
    let val = |k: usize| {
        let h = (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
        bf16::from_f32((h as f32 / (1u64 << 24) as f32) * 8.0 - 4.0)
    };
    let host: Vec<bf16> = (0..n * v).map(val).collect();
    let mut x = dev.upload(&host).unwrap();
    let targets: Vec<i64> = (0..n).map(|i| ((i * 7919) % v) as i64).collect();
    let t = dev.upload(&targets).unwrap();
    let mut out = LossOutputs::new(dev, n).unwrap();
    let cfg = LossConfig {
        reduction: Reduction::Sum,
        ..LossConfig::default()
    };
    fwd_bwd_inplace(
        dev,
        Rows::contiguous(n, v),
        &mut x,
        &t,
        &Default::default(),
        &cfg,
        &mut out,
    )
    .unwrap();
    out.check_targets_sync(dev, &t, v, cfg.ignore_index)
        .unwrap();
    let rows_out = dev.download(&out.rows).unwrap();
    // Check rows straddling and beyond element 2^31, and the first.
    for i in [0, (1usize << 31) / v, (1usize << 31) / v + 1, n - 1] {
        let xi: Vec<f64> = (0..v).map(|j| host[i * v + j].to_f64()).collect();
        let r = reference::fwd_bwd(&xi, 1, v, &[targets[i]], None, None, &cfg).unwrap();
        let g = dev
            .download(&dev.view(&x, i * v..(i + 1) * v).unwrap())
            .unwrap();
        verify::compare_loss_grad(
            &format!("grad row {i}"),
            &cfg,
            1,
            v,
            &xi,
            &[targets[i]],
            None,
            None,
            &g,
            &r,
        )
        .unwrap();
        verify::compare_stats(&format!("loss row {i}"), &rows_out[i..i + 1], &r.rows).unwrap();
    }
}

#[test]
fn invalid_targets_are_reported_and_never_read_out_of_bounds() {
    fusekit::on_every_backend!("invalid_targets_are_reported", |dev| {
        invalid_targets_are_reported_and_never_read_out_of_bounds_on(dev)
    });
}

fn invalid_targets_are_reported_and_never_read_out_of_bounds_on<B: Backend>(dev: &B) {
    let (n, v) = (6, 50);
    let x = dev.upload(&vec![0.5f32; n * v]).unwrap();
    let mut g = poisoned::<B, f32>(dev, n * v).unwrap();
    let mut out = LossOutputs::new(dev, n).unwrap();
    let cfg = LossConfig::default();
    for (bad_row, bad) in [(4usize, 50i32), (2, -1), (5, i32::MAX)] {
        let mut t = vec![3i32; n];
        t[1] = -100;
        t[bad_row] = bad;
        let td = dev.upload(&t).unwrap();
        fwd_bwd(
            dev,
            Rows::contiguous(n, v),
            &x,
            &td,
            &mut g,
            &Default::default(),
            &cfg,
            &mut out,
        )
        .unwrap();
        let e = out
            .check_targets_sync(dev, &td, v, cfg.ignore_index)
            .unwrap_err();
        // The reference reports the same row, and the mean is NaN on both sides.
        let t64: Vec<i64> = t.iter().map(|&y| y as i64).collect();
        let r = reference::fwd_bwd(&vec![0.5; n * v], n, v, &t64, None, None, &cfg).unwrap();
        assert_eq!(r.status, Err(e.clone()));
        assert!(r.loss.is_nan() && dev.download(&out.loss).unwrap()[0].is_nan());
        match e {
            Error::OutOfRange {
                arg: "targets",
                index,
                value,
                ..
            } => {
                assert_eq!((index, value), (bad_row, bad as i64));
            }
            other => panic!("{other}"),
        }
        let gh = dev.download(&g).unwrap();
        assert!(gh[bad_row * v..(bad_row + 1) * v].iter().all(|&z| z == 0.0));
        let rows = dev.download(&out.rows).unwrap();
        assert!(rows[bad_row].is_nan());
        assert!((rows[0] - (v as f32).ln()).abs() < 1e-5);
    }
}

#[test]
fn forward_only_matches_fused_rows() {
    fusekit::on_every_backend!("forward_only_matches_fused_rows", |dev| {
        forward_only_matches_fused_rows_on(dev)
    });
}

fn forward_only_matches_fused_rows_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("forward_only_matches_fused_rows"));
    let (n, v) = (17, 3001);
    let case = Case::ce(n, v);
    let inp = verify::inputs::<bf16>(&case, &mut rng);
    let x = dev.upload(&inp.logits).unwrap();
    let t = dev.upload(&inp.targets).unwrap();
    let mut out = LossOutputs::new(dev, n).unwrap();
    forward(
        dev,
        Rows::contiguous(n, v),
        &x,
        &t,
        &Default::default(),
        &case.cfg,
        &mut out,
    )
    .unwrap();
    let xf: Vec<f64> = inp.logits.iter().map(|z| z.to_f64()).collect();
    let r = reference::fwd_bwd(&xf, n, v, &inp.targets, None, None, &case.cfg).unwrap();
    verify::compare_stats("rows", &dev.download(&out.rows).unwrap(), &r.rows).unwrap();
    verify::compare_stats("loss", &dev.download(&out.loss).unwrap(), &[r.loss]).unwrap();
}

#[test]
fn vocabulary_shards_equal_the_unsharded_kernel() {
    fusekit::on_every_backend!("vocabulary_shards_equal_the_unsharded_kernel", |dev| {
        vocabulary_shards_equal_the_unsharded_kernel_on(dev)
    });
}

fn vocabulary_shards_equal_the_unsharded_kernel_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("vocabulary_shards_equal_the_unsharded_kernel"));
    let (n, v) = (24, 10_007);
    let bounds = [0, 2500, 5003, 7777, v];
    let p = bounds.len() - 1;
    let cfg = LossConfig {
        label_smoothing: LabelSmoothing::PyTorch(0.1),
        softcap: Some(20.0),
        ..LossConfig::default()
    };
    let vals = rng.sample(
        Dist::Logits {
            std: 2.0,
            outlier_frac: 0.01,
            outlier_scale: 8.0,
        },
        n * v,
    );
    let x: Vec<f32> = vals.iter().map(|&z| z as f32).collect();
    let targets: Vec<i64> = (0..n)
        .map(|i| {
            if i % 7 == 3 {
                -100
            } else {
                rng.below(v as u64) as i64
            }
        })
        .collect();
    let w: Vec<f32> = (0..v).map(|_| rng.uniform(0.5, 1.5) as f32).collect();
    let wd = dev.upload(&w).unwrap();
    let extras = LossExtras {
        class_weights: Some(&wd),
        class_weights_host: Some(&w),
        ..Default::default()
    };
    let td = dev.upload(&targets).unwrap();
    let mut stats = dev.alloc_zeros::<f32>(p * n * SHARD_STAT_WIDTH).unwrap();
    let shards: Vec<B::Buffer<f32>> = bounds
        .windows(2)
        .map(|b| {
            let h: Vec<f32> = (0..n)
                .flat_map(|i| x[i * v + b[0]..i * v + b[1]].to_vec())
                .collect();
            dev.upload(&h).unwrap()
        })
        .collect();
    for (k, b) in bounds.windows(2).enumerate() {
        let spec = ShardSpec {
            vocab_offset: b[0],
            full_vocab: v,
        };
        let mut part = dev
            .view_mut(
                &mut stats,
                k * n * SHARD_STAT_WIDTH..(k + 1) * n * SHARD_STAT_WIDTH,
            )
            .unwrap();
        shard_stats(
            dev,
            Rows::contiguous(n, b[1] - b[0]),
            &shards[k],
            &td,
            spec,
            &extras,
            &cfg,
            &mut part,
        )
        .unwrap();
    }
    let mut out = LossOutputs::new(dev, n).unwrap();
    shard_combine(dev, n, v, &stats, p, &td, &extras, &cfg, &mut out).unwrap();
    out.check_targets_sync(dev, &td, v, cfg.ignore_index)
        .unwrap();
    let mut grad = vec![0f32; n * v];
    for (k, b) in bounds.windows(2).enumerate() {
        let vs = b[1] - b[0];
        let spec = ShardSpec {
            vocab_offset: b[0],
            full_vocab: v,
        };
        let mut g = poisoned::<B, f32>(dev, n * vs).unwrap();
        shard_backward(
            dev,
            Rows::contiguous(n, vs),
            &shards[k],
            &td,
            spec,
            &extras,
            &cfg,
            &out,
            &mut g,
        )
        .unwrap();
        let gh = dev.download(&g).unwrap();
        for i in 0..n {
            grad[i * v + b[0]..i * v + b[1]].copy_from_slice(&gh[i * vs..(i + 1) * vs]);
        }
    }
    let xf: Vec<f64> = x.iter().map(|&z| z as f64).collect();
    let wf: Vec<f64> = w.iter().map(|&z| z as f64).collect();
    let r = reference::fwd_bwd(&xf, n, v, &targets, Some(&wf), None, &cfg).unwrap();
    verify::compare_loss_grad(
        "shard grad",
        &cfg,
        n,
        v,
        &xf,
        &targets,
        Some(&w),
        None,
        &grad,
        &r,
    )
    .unwrap();
    verify::compare_stats("shard rows", &dev.download(&out.rows).unwrap(), &r.rows).unwrap();
    verify::compare_stats("shard lse", &dev.download(&out.lse).unwrap(), &r.lse).unwrap();
    verify::compare_stats("shard loss", &dev.download(&out.loss).unwrap(), &[r.loss]).unwrap();
}

#[test]
fn sigmoid_focal_matches_the_reference() {
    fusekit::on_every_backend!("sigmoid_focal_matches_the_reference", |dev| {
        sigmoid_focal_matches_the_reference_on(dev)
    });
}

fn sigmoid_focal_matches_the_reference_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("sigmoid_focal_matches_the_reference"));
    fn one<B: Backend, T: LossElement>(
        dev: &B,
        rng: &mut Rng,
        n: usize,
        cfg: SigmoidFocalConfig,
        offset: usize,
    ) {
        let (xs, ts, go) = verify::sigmoid_focal_inputs::<T>(rng, n + offset, &cfg);
        let go = &go[..if cfg.reduction == Reduction::None {
            n
        } else {
            1
        }];
        let xd = dev.upload(&xs).unwrap();
        let td = dev.upload(&ts).unwrap();
        let mut g = poisoned::<B, T>(dev, n + offset).unwrap();
        let god = dev.upload(go).unwrap();
        let mut out = SigmoidFocalOutputs::new(dev, n, cfg.reduction == Reduction::None).unwrap();
        out.loss = poisoned(dev, 1).unwrap();
        {
            // An offset view: the scalar path when the start is not 16-byte aligned.
            let total = n + offset;
            let mut gv = dev.view_mut(&mut g, offset..total).unwrap();
            sigmoid_focal_fwd_bwd(
                dev,
                &dev.view(&xd, offset..total).unwrap(),
                &dev.view(&td, offset..total).unwrap(),
                &mut gv,
                Some(dev.view(&god, 0..go.len()).unwrap()),
                &cfg,
                &mut out,
            )
            .unwrap();
        }
        let (rl, rg) = verify::sigmoid_focal_expected(&xs[offset..], &ts[offset..], go, &cfg);
        let gh = dev.download(&g).unwrap();
        verify::compare_elementwise_grad(
            &format!("sigmoid focal grad {} n={n} {cfg:?}", T::NAME),
            &gh[offset..],
            &rg,
        )
        .unwrap();
        match cfg.reduction {
            Reduction::None => {
                verify::compare_stats(
                    "sigmoid focal elements",
                    &dev.download(&out.elements).unwrap()[..n],
                    &rl,
                )
                .unwrap();
            }
            r => {
                let total: f64 =
                    rl.iter().sum::<f64>() / if r == Reduction::Mean { n as f64 } else { 1.0 };
                verify::compare_stats(
                    "sigmoid focal loss",
                    &dev.download(&out.loss).unwrap(),
                    &[total],
                )
                .unwrap();
            }
        }
    }
    for n in [1, 7, 4099, 1_000_003] {
        for cfg in verify::SIGMOID_FOCAL_CONFIGS {
            one::<B, f32>(dev, &mut rng, n, cfg, 0);
            one::<B, bf16>(dev, &mut rng, n, cfg, 0);
            one::<B, bf16>(dev, &mut rng, n, cfg, 3);
            if n < 10_000 {
                one::<B, f16>(dev, &mut rng, n, cfg, 1);
            }
        }
    }
}

#[test]
fn bad_arguments_are_typed_errors() {
    fusekit::on_every_backend!("bad_arguments_are_typed_errors", |dev| {
        bad_arguments_are_typed_errors_on(dev)
    });
}

fn bad_arguments_are_typed_errors_on<B: Backend>(dev: &B) {
    let (n, v) = (4, 10);
    let x = dev.alloc_zeros::<f32>(n * v).unwrap();
    let mut g = dev.alloc_zeros::<f32>(n * v).unwrap();
    let t = dev.alloc_zeros::<i32>(n).unwrap();
    let mut out = LossOutputs::new(dev, n).unwrap();
    let rows = Rows::contiguous(n, v);
    let cfg = LossConfig::default();
    let none = LossExtras::default();
    macro_rules! expect {
        ($res:expr, $pat:pat) => {{
            let r = $res;
            assert!(matches!(r, Err($pat)), "{:?}", r);
        }};
    }
    // fwd_bwd on the logits `x`, varying what the case under test varies.
    macro_rules! fb {
        ($rows:expr, $t:expr, $g:expr, $ex:expr, $cfg:expr, $out:expr) => {
            fwd_bwd(dev, $rows, &x, $t, $g, $ex, $cfg, $out)
        };
    }
    expect!(
        fb!(Rows::contiguous(0, v), &t, &mut g, &none, &cfg, &mut out),
        Error::Shape { arg: "logits", .. }
    );
    expect!(
        fb!(Rows::contiguous(n, 0), &t, &mut g, &none, &cfg, &mut out),
        Error::Shape { arg: "logits", .. }
    );
    expect!(
        fb!(
            Rows::contiguous(n, v + 1),
            &t,
            &mut g,
            &none,
            &cfg,
            &mut out
        ),
        Error::Shape { arg: "logits", .. }
    );
    expect!(
        fb!(
            Rows {
                row_stride: v - 1,
                ..rows
            },
            &t,
            &mut g,
            &none,
            &cfg,
            &mut out
        ),
        Error::Layout { arg: "logits", .. }
    );
    // Row paths: a cluster size other than 2/4/8; shared memory for a row that cannot fit it; a cluster
    // on a GPU without clusters.
    let path = |row_path| LossExtras {
        row_path,
        ..Default::default()
    };
    expect!(
        fb!(
            rows,
            &t,
            &mut g,
            &path(RowPath::Cluster { ctas: 3 }),
            &cfg,
            &mut out
        ),
        Error::InvalidArgument {
            arg: "row_path",
            ..
        }
    );
    {
        let vb = 1 << 20;
        let xb = dev.alloc_zeros::<f32>(vb).unwrap();
        let mut gb = dev.alloc_zeros::<f32>(vb).unwrap();
        let r = fwd_bwd(
            dev,
            Rows::contiguous(1, vb),
            &xb,
            &dev.view(&t, 0..1).unwrap(),
            &mut gb,
            &path(RowPath::SharedMemory),
            &cfg,
            &mut LossOutputs::new(dev, 1).unwrap(),
        );
        expect!(r, Error::Unsupported { .. });
    }
    if dev.props().compute_capability.0 < 9 {
        expect!(
            fb!(
                rows,
                &t,
                &mut g,
                &path(RowPath::Cluster { ctas: 2 }),
                &cfg,
                &mut out
            ),
            Error::Unsupported { .. }
        );
    }
    let mut short = dev.alloc_zeros::<f32>(n * v - 1).unwrap();
    expect!(
        fb!(rows, &t, &mut short, &none, &cfg, &mut out),
        Error::Shape { arg: "grad", .. }
    );
    let t3 = dev.alloc_zeros::<i32>(n - 1).unwrap();
    expect!(
        fb!(rows, &t3, &mut g, &none, &cfg, &mut out),
        Error::Shape { arg: "targets", .. }
    );
    let w = dev.alloc_zeros::<f32>(v + 1).unwrap();
    let bad_w = LossExtras {
        class_weights: Some(&w),
        ..Default::default()
    };
    expect!(
        fb!(rows, &t, &mut g, &bad_w, &cfg, &mut out),
        Error::Shape {
            arg: "class_weights",
            ..
        }
    );
    let w = dev.alloc_zeros::<f32>(v).unwrap();
    let smooth = LossConfig {
        label_smoothing: LabelSmoothing::PyTorch(0.1),
        ..cfg
    };
    let w_only = LossExtras {
        class_weights: Some(&w),
        ..Default::default()
    };
    expect!(
        fb!(rows, &t, &mut g, &w_only, &smooth, &mut out),
        Error::InvalidArgument {
            arg: "class_weights_host",
            ..
        }
    );
    let go = dev.alloc_zeros::<f32>(2).unwrap();
    let bad_go = LossExtras {
        grad_output: Some(dev.view(&go, 0..2).unwrap()),
        ..Default::default()
    };
    expect!(
        fb!(rows, &t, &mut g, &bad_go, &cfg, &mut out),
        Error::Shape {
            arg: "grad_output",
            ..
        }
    );
    let mut small_out = LossOutputs::new(dev, n - 1).unwrap();
    expect!(
        fb!(rows, &t, &mut g, &none, &cfg, &mut small_out),
        Error::Shape { arg: "out", .. }
    );
    for (bad_cfg, arg) in [
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
                kind: LossKind::Poly1 { epsilon: -2.0 },
                ..cfg
            },
            "epsilon",
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
                z_loss: -1.0,
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
                kind: LossKind::Focal { gamma: 2.0 },
                label_smoothing: LabelSmoothing::PyTorch(0.1),
                ..cfg
            },
            "label_smoothing",
        ),
    ] {
        let r = fb!(rows, &t, &mut g, &none, &bad_cfg, &mut out);
        assert!(
            matches!(&r, Err(Error::InvalidArgument { arg: a, .. }) if *a == arg),
            "{bad_cfg:?}: {r:?}"
        );
    }
    // Sigmoid focal.
    let mut so = SigmoidFocalOutputs::new(dev, n * v, false).unwrap();
    let tf = dev.alloc_zeros::<f32>(n * v - 1).unwrap();
    expect!(
        sigmoid_focal_fwd_bwd(
            dev,
            &x,
            &tf,
            &mut g,
            None,
            &SigmoidFocalConfig::default(),
            &mut so
        ),
        Error::Shape { arg: "targets", .. }
    );
    let tf = dev.alloc_zeros::<f32>(n * v).unwrap();
    let bad = SigmoidFocalConfig {
        gamma: -0.5,
        ..Default::default()
    };
    expect!(
        sigmoid_focal_fwd_bwd(dev, &x, &tf, &mut g, None, &bad, &mut so),
        Error::InvalidArgument { arg: "gamma", .. }
    );
    let empty = dev.alloc_zeros::<f32>(4).unwrap();
    expect!(
        sigmoid_focal_fwd_bwd(
            dev,
            &dev.view(&empty, 0..0).unwrap(),
            &dev.view(&tf, 0..0).unwrap(),
            &mut dev.view_mut(&mut g, 0..0).unwrap(),
            None,
            &SigmoidFocalConfig::default(),
            &mut so
        ),
        Error::Shape { arg: "logits", .. }
    );
    // Shards.
    let spec = ShardSpec {
        vocab_offset: 5,
        full_vocab: 12,
    };
    let mut st = dev.alloc_zeros::<f32>(n * SHARD_STAT_WIDTH).unwrap();
    expect!(
        shard_stats(dev, rows, &x, &t, spec, &none, &cfg, &mut st),
        Error::Shape { arg: "shard", .. }
    );
    let spec = ShardSpec {
        vocab_offset: 0,
        full_vocab: v,
    };
    let mut short_st = dev.alloc_zeros::<f32>(n * SHARD_STAT_WIDTH - 1).unwrap();
    expect!(
        shard_stats(dev, rows, &x, &t, spec, &none, &cfg, &mut short_st),
        Error::Shape { arg: "stats", .. }
    );
    expect!(
        shard_combine(dev, n, v, &st, 0, &t, &none, &cfg, &mut out),
        Error::InvalidArgument {
            arg: "n_shards",
            ..
        }
    );
    expect!(
        shard_combine(dev, n, v, &st, 2, &t, &none, &cfg, &mut out),
        Error::Shape { arg: "stats", .. }
    );
}

#[test]
fn grad_overlapping_logits_is_a_layout_error() {
    // Only reachable through memory the caller wraps unsafely, e.g. a framework's tensor storage
    // handed over as a raw pointer.
    let name = "grad_overlapping_logits_is_a_layout_error";
    let (n, v) = (4, 10);
    let rows = Rows::contiguous(n, v);
    let cfg = LossConfig::default();
    if let Some(dev) = fusekit::testing::emulator_for(name) {
        let buf = dev.alloc_zeros::<f32>(2 * n * v).unwrap();
        let t = dev.alloc_zeros::<i32>(n).unwrap();
        let mut out = LossOutputs::new(&dev, n).unwrap();
        // SAFETY: aliases the buffer 8 elements in, inside it; used only for this call.
        let mut alias = unsafe {
            fusekit::emu::ViewMut::from_raw_parts(buf.as_ptr().add(8) as *mut f32, n * v)
        };
        let r = fwd_bwd(
            &dev,
            rows,
            &buf,
            &t,
            &mut alias,
            &Default::default(),
            &cfg,
            &mut out,
        );
        assert!(matches!(r, Err(Error::Layout { arg: "grad", .. })), "{r:?}");
    }
    if let Some(gpu) = fusekit::testing::gpu_for(name) {
        use cudarc::driver::DevicePtr;
        let s = gpu.stream();
        let buf = s.alloc_zeros::<f32>(2 * n * v).unwrap();
        let t = s.alloc_zeros::<i32>(n).unwrap();
        let mut out = LossOutputs::new(&gpu, n).unwrap();
        let base = buf.device_ptr(s).0;
        // SAFETY: aliases the first buffer 8 elements in; leaked below so it is freed only once.
        let mut alias = unsafe { s.upgrade_device_ptr::<f32>(base + 32, n * v) };
        let r = fwd_bwd(
            &gpu,
            rows,
            &buf,
            &t,
            &mut alias,
            &Default::default(),
            &cfg,
            &mut out,
        );
        alias.leak();
        assert!(matches!(r, Err(Error::Layout { arg: "grad", .. })), "{r:?}");
    }
}

#[test]
fn linear_cross_entropy_matches_the_reference_for_every_chunking() {
    fusekit::on_every_backend!("linear_cross_entropy_matches_the_reference", |dev| {
        linear_cross_entropy_matches_the_reference_for_every_chunking_on(dev)
    });
}

fn linear_cross_entropy_matches_the_reference_for_every_chunking_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("linear_cross_entropy_matches_the_reference"));
    let (n, h, v) = (37, 64, 1003);
    let (hid, w) = verify::linear_ce_inputs(&mut rng, n, h, v);
    let t: Vec<i64> = (0..n)
        .map(|i| {
            if i == 5 {
                -100
            } else {
                rng.below(v as u64) as i64
            }
        })
        .collect();
    let (hd, td) = (dev.upload(&hid).unwrap(), dev.upload(&t).unwrap());
    let cfg = LossConfig {
        z_loss: 1e-4,
        ..LossConfig::default()
    };
    for chunking in [
        Chunking::Rows(1),
        Chunking::Rows(8),
        Chunking::Rows(n),
        Chunking::MemoryBudget(10 * v * 2),
    ] {
        let rep = verify::run_linear_ce(dev, &hid, &w, n, h, v, &t, &cfg, chunking)
            .unwrap_or_else(|e| panic!("{e}"));
        println!("{chunking:?}: {rep:?}");
    }
    // Bad input.
    let mut lce = LinearCrossEntropy::new(dev, v, h, Chunking::Rows(8)).unwrap();
    let mut dh = dev.alloc_zeros::<bf16>(n * h).unwrap();
    let mut dw = dev.alloc_zeros::<f32>(v * h).unwrap();
    let mut out = LossOutputs::new(dev, n).unwrap();
    let r = lce.fwd_bwd(
        dev,
        n,
        &hd,
        &hd,
        &td,
        &Default::default(),
        &cfg,
        &mut dh,
        &mut dw,
        false,
        &mut out,
    );
    assert!(
        matches!(r, Err(Error::Shape { arg: "weight", .. })),
        "{r:?}"
    );
    assert!(matches!(
        LinearCrossEntropy::new(dev, v, h, Chunking::Rows(0)),
        Err(Error::InvalidArgument {
            arg: "chunking",
            ..
        })
    ));
}

/// Uploads logits `[n, v]` and targets, runs the fused kernel into a poisoned gradient, and returns the
/// gradient (read back) and the outputs.
fn fused_from_host<B: Backend, T: LossElement>(
    dev: &B,
    n: usize,
    v: usize,
    x: &[T],
    targets: &[i64],
    cfg: &LossConfig,
) -> (Vec<T>, LossOutputs<B>) {
    let xd = dev.upload(x).unwrap();
    let td = dev.upload(targets).unwrap();
    let mut g = poisoned::<B, T>(dev, n * v).unwrap();
    let mut out = LossOutputs::new(dev, n).unwrap();
    fwd_bwd(
        dev,
        Rows::contiguous(n, v),
        &xd,
        &td,
        &mut g,
        &Default::default(),
        cfg,
        &mut out,
    )
    .unwrap();
    (dev.download(&g).unwrap(), out)
}

#[test]
fn masked_minus_infinity_logits_are_handled() {
    fusekit::on_every_backend!("masked_minus_infinity_logits_are_handled", |dev| {
        masked_minus_infinity_logits_are_handled_on(dev)
    });
}

fn masked_minus_infinity_logits_are_handled_on<B: Backend>(dev: &B) {
    // Padded vocabularies mask their tail (and sometimes their head) with -inf.
    let mut rng = Rng::new(seed_for("masked_minus_infinity_logits"));
    let (n, v) = (9, 5000);
    let mut x: Vec<bf16> = rng.sample_as(
        Dist::Normal {
            mean: 0.0,
            std: 2.0,
        },
        n * v,
    );
    let targets: Vec<i64> = (0..n).map(|_| 100 + rng.below(4000) as i64).collect();
    for i in 0..n {
        for j in (0..50).chain(4500..v) {
            x[i * v + j] = bf16::NEG_INFINITY;
        }
    }
    let cfg = LossConfig::default();
    let (g, out) = fused_from_host(dev, n, v, &x, &targets, &cfg);
    let xf: Vec<f64> = x.iter().map(|z| z.to_f64()).collect();
    let r = reference::fwd_bwd(&xf, n, v, &targets, None, None, &cfg).unwrap();
    verify::compare_loss_grad("masked grad", &cfg, n, v, &xf, &targets, None, None, &g, &r)
        .unwrap();
    verify::compare_stats("masked rows", &dev.download(&out.rows).unwrap(), &r.rows).unwrap();
}

/// Rows of NaN-free logits, a single NaN, a NaN run long enough to cover whole threads' shares, an
/// all-NaN row, and NaN among otherwise masked (−inf) logits. A diverged model must see NaN: every row
/// with a NaN logit has a NaN loss, lse and gradient, and the clean rows match the reference.
fn nan_rows<B: Backend, T: LossElement>(dev: &B, rng: &mut Rng, v: usize) {
    let n = 6;
    let mut x: Vec<f64> = rng.sample(
        Dist::Logits {
            std: 2.0,
            outlier_frac: 0.01,
            outlier_scale: 6.0,
        },
        n * v,
    );
    let targets: Vec<i64> = (0..n).map(|_| rng.below(v as u64) as i64).collect();
    let at = |rng: &mut Rng| rng.below(v as u64) as usize;
    let j = at(rng);
    x[v + j] = f64::NAN; // row 1: one NaN
    let a = at(rng);
    let b = (a + v / 2 + 1).min(v);
    x[2 * v + a..2 * v + b].fill(f64::NAN); // row 2: a run
    x[3 * v..4 * v].fill(f64::NAN); // row 3: all NaN
    x[4 * v..5 * v].fill(f64::NEG_INFINITY); // row 4: masked but for one NaN
    x[4 * v + at(rng)] = f64::NAN;
    let xt: Vec<T> = x.iter().map(|&z| T::from_f64(z)).collect();
    let xr: Vec<f64> = xt.iter().map(|z| z.to_f64()).collect();
    let td = dev.upload(&targets).unwrap();
    let cfg = LossConfig {
        reduction: Reduction::None,
        ..LossConfig::default()
    };
    let (gh, out) = fused_from_host(dev, n, v, &xt, &targets, &cfg);
    let rows = dev.download(&out.rows).unwrap();
    let lse = dev.download(&out.lse).unwrap();
    let r = reference::fwd_bwd(&xr, n, v, &targets, None, None, &cfg).unwrap();
    for i in 0..n {
        let has_nan = xr[i * v..(i + 1) * v].iter().any(|z| z.is_nan());
        let ctx = format!("{} v={v} row {i}", T::NAME);
        if has_nan {
            assert!(rows[i].is_nan(), "{ctx}: loss {} should be NaN", rows[i]);
            assert!(lse[i].is_nan(), "{ctx}: lse {} should be NaN", lse[i]);
            let nan_grad = gh[i * v..(i + 1) * v]
                .iter()
                .filter(|z| z.to_f64().is_nan() && !z.is_poison())
                .count();
            assert_eq!(
                nan_grad, v,
                "{ctx}: every gradient element should be a written NaN"
            );
        } else {
            let ri = reference::fwd_bwd(
                &xr[i * v..(i + 1) * v],
                1,
                v,
                &targets[i..i + 1],
                None,
                None,
                &cfg,
            )
            .unwrap();
            verify::compare_loss_grad(
                &format!("{ctx} grad"),
                &cfg,
                1,
                v,
                &xr[i * v..(i + 1) * v],
                &targets[i..i + 1],
                None,
                None,
                &gh[i * v..(i + 1) * v],
                &ri,
            )
            .unwrap();
            verify::compare_stats(&format!("{ctx} loss"), &rows[i..i + 1], &r.rows[i..i + 1])
                .unwrap();
        }
    }
    // The shard path: split the all-NaN and the one-NaN rows so that one shard sees only NaN (row 3)
    // and another sees none (row 1 away from its NaN); the combine must keep the NaN.
    let cut = (j + 1).min(v - 1).max(1);
    if v >= 2 {
        let bounds = [0, cut, v];
        let mut stats = dev.alloc_zeros::<f32>(2 * n * SHARD_STAT_WIDTH).unwrap();
        for (k, w) in bounds.windows(2).enumerate() {
            let h: Vec<T> = (0..n)
                .flat_map(|i| xt[i * v + w[0]..i * v + w[1]].to_vec())
                .collect();
            let hd = dev.upload(&h).unwrap();
            let mut part = dev
                .view_mut(
                    &mut stats,
                    k * n * SHARD_STAT_WIDTH..(k + 1) * n * SHARD_STAT_WIDTH,
                )
                .unwrap();
            shard_stats(
                dev,
                Rows::contiguous(n, w[1] - w[0]),
                &hd,
                &td,
                ShardSpec {
                    vocab_offset: w[0],
                    full_vocab: v,
                },
                &Default::default(),
                &cfg,
                &mut part,
            )
            .unwrap();
        }
        let mut out2 = LossOutputs::new(dev, n).unwrap();
        shard_combine(
            dev,
            n,
            v,
            &stats,
            2,
            &td,
            &Default::default(),
            &cfg,
            &mut out2,
        )
        .unwrap();
        let rows2 = dev.download(&out2.rows).unwrap();
        for i in 0..n {
            let has_nan = xr[i * v..(i + 1) * v].iter().any(|z| z.is_nan());
            assert_eq!(
                rows2[i].is_nan(),
                has_nan,
                "{} v={v} row {i}: sharded loss {} (fused {})",
                T::NAME,
                rows2[i],
                rows[i]
            );
        }
    }
}

#[test]
fn nan_logits_make_their_rows_nan() {
    fusekit::on_every_backend!("nan_logits_make_their_rows_nan", |dev| {
        nan_logits_make_their_rows_nan_on(dev)
    });
}

fn nan_logits_make_their_rows_nan_on<B: Backend>(dev: &B) {
    let seed = seed_for("nan_logits_make_their_rows_nan");
    let mut rng = Rng::new(seed);
    for &v in &[1usize, 7, 1003, 32000, 131072] {
        nan_rows::<B, f32>(dev, &mut rng, v);
        nan_rows::<B, bf16>(dev, &mut rng, v);
    }
}
