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
        // The plain kernels (default config) and the general ones (softcap, label smoothing).
        let general = LossConfig {
            softcap: Some(20.0),
            label_smoothing: LabelSmoothing::PyTorch(0.1),
            ..LossConfig::default()
        };
        for targets_i64 in [false, true] {
            for &row_path in paths {
                for cfg in [LossConfig::default(), general] {
                    let case = Case {
                        targets_i64,
                        row_path,
                        ignore_frac: 0.2,
                        cfg,
                        ..Case::ce(5, 1003)
                    };
                    verify::run::<B, T>(dev, rng, &case).unwrap_or_else(|e| {
                        panic!("{} {row_path:?} i64 {targets_i64}: {e}", T::NAME)
                    });
                }
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
    // A bad configuration scalar reaches the caller as the plan's error (each scalar and each bad value:
    // tests/robustness.rs, at the plan, which every call goes through).
    let bad_cfg = LossConfig {
        kind: LossKind::Focal { gamma: -1.0 },
        ..cfg
    };
    expect!(
        fb!(rows, &t, &mut g, &none, &bad_cfg, &mut out),
        Error::InvalidArgument { arg: "gamma", .. }
    );
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
    // One, many, all but the target, the target, all: on every row path and loss kind.
    for v in [7, 1003] {
        masked_edge_rows::<B, f32>(dev, &mut rng, v);
        masked_edge_rows::<B, bf16>(dev, &mut rng, v);
    }
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

// ---------------------------------------------------------------------------------------------------
// Edge semantics (src/loss/edges.md): the kernels against the reference where inputs are not finite or
// weights are degenerate. NaN may appear only where the reference has NaN, and there it must be a
// written NaN (not the poison); infinities must match exactly; the rest within the usual tolerances.

/// What one fused call produced.
struct Fused<T> {
    grad: Vec<T>,
    rows: Vec<f32>,
    lse: Vec<f32>,
    loss: f32,
    status: fusekit::Result<()>,
}

/// The fused kernel on `x` `[n, v]` with optional class weights (device and host copies) on `path`.
#[allow(clippy::too_many_arguments)]
fn fused_edges<B: Backend, T: LossElement>(
    dev: &B,
    n: usize,
    v: usize,
    x: &[T],
    targets: &[i64],
    weights: Option<&[f32]>,
    cfg: &LossConfig,
    path: RowPath,
) -> Fused<T> {
    let xd = dev.upload(x).unwrap();
    let td = dev.upload(targets).unwrap();
    let wd = weights.map(|w| dev.upload(w).unwrap());
    let mut g = poisoned::<B, T>(dev, n * v).unwrap();
    let mut out = LossOutputs::new(dev, n).unwrap();
    out.loss = poisoned(dev, 1).unwrap();
    let extras = LossExtras {
        class_weights: wd.as_ref(),
        class_weights_host: weights,
        row_path: path,
        ..Default::default()
    };
    fwd_bwd(
        dev,
        Rows::contiguous(n, v),
        &xd,
        &td,
        &mut g,
        &extras,
        cfg,
        &mut out,
    )
    .unwrap();
    Fused {
        grad: dev.download(&g).unwrap(),
        rows: dev.download(&out.rows).unwrap(),
        lse: dev.download(&out.lse).unwrap(),
        loss: dev.download(&out.loss).unwrap()[0],
        status: out.check_targets_sync(dev, &td, v, cfg.ignore_index),
    }
}

/// `got` with its NaN cleared to 0 where the reference is NaN (both sides), after checking that NaN
/// appears exactly there and is written.
fn clear_nan<T: LossElement>(what: &str, got: &[T], want: &[f64]) -> (Vec<T>, Vec<f64>) {
    assert_eq!(got.len(), want.len(), "{what}");
    let mut g = got.to_vec();
    let mut w = want.to_vec();
    for i in 0..got.len() {
        let (o, r) = (got[i].to_f64(), want[i]);
        assert!(!got[i].is_poison(), "{what}[{i}]: never written");
        assert_eq!(
            o.is_nan(),
            r.is_nan(),
            "{what}[{i}]: {o:e}, reference {r:e}"
        );
        if r.is_nan() {
            g[i] = T::from_f64(0.0);
            w[i] = 0.0;
        }
    }
    (g, w)
}

/// The fused kernel's outputs against the reference, non-finite values included; returns the reference.
#[allow(clippy::too_many_arguments)]
fn assert_edges_match<T: LossElement>(
    what: &str,
    cfg: &LossConfig,
    n: usize,
    v: usize,
    xr: &[f64],
    targets: &[i64],
    weights: Option<&[f32]>,
    got: &Fused<T>,
) -> reference::RefOutput {
    let w64: Option<Vec<f64>> = weights.map(|w| w.iter().map(|&x| x as f64).collect());
    let r = reference::fwd_bwd(xr, n, v, targets, w64.as_deref(), None, cfg).unwrap();
    let (g, gw) = clear_nan(&format!("{what} grad"), &got.grad, &r.grad);
    let clean = reference::RefOutput {
        grad: gw,
        ..r.clone()
    };
    verify::compare_loss_grad(what, cfg, n, v, xr, targets, weights, None, &g, &clean)
        .unwrap_or_else(|e| panic!("{e}"));
    for (name, out, want) in [("rows", &got.rows, &r.rows), ("lse", &got.lse, &r.lse)] {
        let (o, w) = clear_nan(&format!("{what} {name}"), out, want);
        verify::compare_stats(&format!("{what} {name}"), &o, &w).unwrap_or_else(|e| panic!("{e}"));
    }
    if cfg.reduction != Reduction::None {
        let (o, w) = clear_nan(&format!("{what} loss"), &[got.loss], &[r.loss]);
        verify::compare_stats(&format!("{what} loss"), &o, &w).unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(got.status, r.status, "{what} status");
    r
}

/// [`fused_edges`] checked by [`assert_edges_match`] (logits `x` widened as the reference sees them).
#[allow(clippy::too_many_arguments)]
fn edges<B: Backend, T: LossElement>(
    dev: &B,
    what: &str,
    x: &[T],
    (n, v): (usize, usize),
    targets: &[i64],
    weights: Option<&[f32]>,
    cfg: &LossConfig,
    path: RowPath,
) -> (Fused<T>, reference::RefOutput) {
    let what = format!("{} {} {path:?} {what}", dev.kind(), T::NAME);
    let xr: Vec<f64> = x.iter().map(|z| z.to_f64()).collect();
    let got = fused_edges::<B, T>(dev, n, v, x, targets, weights, cfg, path);
    let r = assert_edges_match(&what, cfg, n, v, &xr, targets, weights, &got);
    (got, r)
}

/// The row paths a row of `v` elements of T can take on `dev`.
fn row_paths<B: Backend, T: LossElement>(dev: &B, v: usize) -> Vec<RowPath> {
    [
        RowPath::SharedMemory,
        RowPath::Reread,
        RowPath::Cluster { ctas: 2 },
    ]
    .into_iter()
    .filter(|p| {
        p.resolve(dev.props(), v, std::mem::size_of::<T>(), true)
            .is_ok()
    })
    .collect()
}

/// Rows with masked (−∞) logits: 0 one masked class, 1 many, 2 all but the target, 3 the target, 4 every
/// logit, 5 the target, of a class whose weight is 0 in the weighted configurations. Every row path, the
/// whole family, label smoothing with and without weight 0 on the masked classes, z-loss, softcap.
fn masked_edge_rows<B: Backend, T: LossElement>(dev: &B, rng: &mut Rng, v: usize) {
    let n = 6;
    let targets: Vec<i64> = vec![v as i64 - 1, v as i64 / 2, 1, 0, 2, 5];
    // The masked classes of rows 0 and 1, which the weighted configurations give weight 0 (row 5's target
    // among them).
    let masked = |j: usize| j % 3 == 2 && !targets[..4].contains(&(j as i64));
    let mut x: Vec<f64> = rng.sample(
        Dist::Normal {
            mean: 0.0,
            std: 2.0,
        },
        n * v,
    );
    let first = (0..v).find(|&j| masked(j)).unwrap();
    x[first] = f64::NEG_INFINITY;
    for j in (0..v).filter(|&j| masked(j)) {
        x[v + j] = f64::NEG_INFINITY;
    }
    for j in (0..v).filter(|&j| j != 1) {
        x[2 * v + j] = f64::NEG_INFINITY;
    }
    x[3 * v] = f64::NEG_INFINITY;
    x[4 * v..5 * v].fill(f64::NEG_INFINITY);
    x[5 * v + 5] = f64::NEG_INFINITY;
    let xt: Vec<T> = x.iter().map(|&z| T::from_f64(z)).collect();
    let zero_masked: Vec<f32> = (0..v)
        .map(|j| {
            if masked(j) {
                0.0
            } else {
                rng.uniform(0.5, 2.0) as f32
            }
        })
        .collect();
    let ce = LossConfig::default();
    let smooth = LossConfig {
        label_smoothing: LabelSmoothing::PyTorch(0.1),
        ..ce
    };
    let configs: Vec<(&str, LossConfig, Option<&[f32]>)> = vec![
        ("ce", ce, None),
        ("ce weighted", ce, Some(&zero_masked)),
        ("smoothing", smooth, None),
        ("smoothing, masked weight 0", smooth, Some(&zero_masked)),
        (
            "megatron smoothing + z-loss, sum",
            LossConfig {
                label_smoothing: LabelSmoothing::Megatron(0.2),
                z_loss: 1e-3,
                reduction: Reduction::Sum,
                ..ce
            },
            Some(&zero_masked),
        ),
        (
            "focal",
            LossConfig {
                kind: LossKind::Focal { gamma: 2.0 },
                ..ce
            },
            None,
        ),
        (
            "focal 0.5 weighted",
            LossConfig {
                kind: LossKind::Focal { gamma: 0.5 },
                ..ce
            },
            Some(&zero_masked),
        ),
        (
            "poly1",
            LossConfig {
                kind: LossKind::Poly1 { epsilon: 1.0 },
                ..ce
            },
            Some(&zero_masked),
        ),
        (
            "poly1 focal",
            LossConfig {
                kind: LossKind::Poly1Focal {
                    gamma: 2.0,
                    epsilon: 1.0,
                },
                reduction: Reduction::None,
                ..ce
            },
            None,
        ),
        (
            "gce",
            LossConfig {
                kind: LossKind::Gce { q: 0.5 },
                ..ce
            },
            None,
        ),
        ("z-loss", LossConfig { z_loss: 1e-3, ..ce }, None),
        (
            "softcap",
            LossConfig {
                softcap: Some(30.0),
                ..ce
            },
            None,
        ),
    ];
    for path in row_paths::<B, T>(dev, v) {
        for (name, cfg, w) in &configs {
            let what = format!("v={v} {name}");
            let (got, r) = edges(dev, &what, &xt, (n, v), &targets, *w, cfg, path);
            let what = format!("{} {} {path:?} {what}", dev.kind(), T::NAME);
            // The decisions themselves (on the kernel's outputs), for plain CE and weighted smoothing.
            let rows = &got.rows;
            let grad_row = |i: usize| &got.grad[i * v..(i + 1) * v];
            if *name == "ce" {
                assert!(rows[0].is_finite() && rows[1].is_finite(), "{what}");
                assert!(grad_row(0)[first].to_f64() == 0.0, "{what}");
                assert!(rows[2] == 0.0 && grad_row(2).iter().all(|g| g.to_f64() == 0.0));
                assert_eq!(rows[3], f32::INFINITY, "{what}: masked target");
                assert!(grad_row(3).iter().all(|g| g.to_f64().is_finite()), "{what}");
                assert!(grad_row(3)[0].to_f64() < 0.0, "{what}");
                assert!(
                    rows[4].is_nan() && got.lse[4] == f32::NEG_INFINITY,
                    "{what}: all masked"
                );
                assert!(got.loss.is_nan(), "{what}: a NaN row makes the mean NaN");
            }
            if *name == "smoothing" {
                assert_eq!((rows[0], rows[1]), (f32::INFINITY, f32::INFINITY), "{what}");
            }
            if *name == "smoothing, masked weight 0" {
                // Weight 0 on the masked classes: finite, and row 5's masked target weighs out to
                // its smoothing term alone.
                for i in [0, 1, 5] {
                    assert!(
                        rows[i].is_finite() && r.rows[i].is_finite(),
                        "{what} row {i}"
                    );
                }
                assert_eq!(rows[3], f32::INFINITY, "{what}");
            }
        }
    }
}

#[test]
fn nan_class_weights_are_never_averaged_away() {
    fusekit::on_every_backend!("nan_class_weights_are_never_averaged_away", |dev| {
        nan_class_weights_on::<_, f32>(dev);
        nan_class_weights_on::<_, bf16>(dev);
    });
}

fn nan_class_weights_on<B: Backend, T: LossElement>(dev: &B) {
    let mut rng = Rng::new(seed_for("nan_class_weights_are_never_averaged_away"));
    let (n, v) = (4, 37);
    let x: Vec<T> = rng.sample_as(
        Dist::Normal {
            mean: 0.0,
            std: 2.0,
        },
        n * v,
    );
    let targets = [0i64, 5, 0, 9];
    let mut w: Vec<f32> = (0..v).map(|_| rng.uniform(0.5, 2.0) as f32).collect();
    let mean = LossConfig::default();
    let sum = LossConfig {
        reduction: Reduction::Sum,
        ..mean
    };
    let smooth = LossConfig {
        label_smoothing: LabelSmoothing::PyTorch(0.1),
        ..mean
    };
    let focal = LossConfig {
        kind: LossKind::Focal { gamma: 2.0 },
        ..mean
    };
    let run = |what: &str, w: &[f32], cfg: &LossConfig| {
        edges(dev, what, &x, (n, v), &targets, Some(w), cfg, RowPath::Auto).0
    };
    // NaN on a target's class: its rows are NaN; through the mean's denominator, the mean and every
    // gradient element are NaN (it used to be a loss of 0: "denominator > 0" was false).
    w[0] = f32::NAN;
    for cfg in [mean, focal] {
        let got = run("NaN target weight, mean", &w, &cfg);
        assert!(got.loss.is_nan() && got.rows[0].is_nan() && got.rows[1].is_finite());
        assert!(got.grad.iter().all(|g| g.to_f64().is_nan()));
    }
    let got = run("NaN target weight, sum", &w, &sum);
    assert!(got.loss.is_nan());
    assert!(got.grad[v..2 * v].iter().all(|g| g.to_f64().is_finite()));
    // NaN on a class no row targets: never read without smoothing; with smoothing every row is NaN.
    w[0] = 1.0;
    w[3] = f32::NAN;
    let got = run("NaN other weight, mean", &w, &mean);
    assert!(got.loss.is_finite() && got.grad.iter().all(|g| g.to_f64().is_finite()));
    let got = run("NaN other weight, smoothing", &w, &smooth);
    assert!(got.loss.is_nan() && got.rows.iter().all(|l| l.is_nan()));
}

#[test]
fn mean_over_zero_negative_or_nan_total_weight() {
    fusekit::on_every_backend!("mean_over_zero_negative_or_nan_total_weight", |dev| {
        mean_denominator_edges_on::<_, f32>(dev);
        mean_denominator_edges_on::<_, bf16>(dev);
    });
}

fn mean_denominator_edges_on<B: Backend, T: LossElement>(dev: &B) {
    let mut rng = Rng::new(seed_for("mean_over_zero_negative_or_nan_total_weight"));
    let (n, v) = (3, 1003);
    let mut xr: Vec<f64> = rng.sample(
        Dist::Normal {
            mean: 0.0,
            std: 2.0,
        },
        n * v,
    );
    let targets = [4i64, 7, 4];
    let mean = LossConfig::default();
    let smooth = LossConfig {
        label_smoothing: LabelSmoothing::PyTorch(0.1),
        z_loss: 1e-3,
        ..mean
    };
    let weights = |w4: f32, w7: f32| {
        let mut w = vec![1.0f32; v];
        w[4] = w4;
        w[7] = w7;
        w
    };
    let run = |what: &str, xr: &[f64], targets: &[i64], w: Option<&[f32]>, cfg: &LossConfig| {
        let x: Vec<T> = xr.iter().map(|&z| T::from_f64(z)).collect();
        edges(dev, what, &x, (n, v), targets, w, cfg, RowPath::Auto).0
    };
    let zero_grad = |got: &Fused<T>| got.grad.iter().all(|g| g.to_f64() == 0.0);
    // D = 0: the targets' weights are 0, or cancel: loss 0 and zero gradient (PyTorch: NaN).
    for cfg in [mean, smooth] {
        for (w4, w7) in [(0.0, 0.0), (1.0, -2.0)] {
            let got = run("D = 0", &xr, &targets, Some(&weights(w4, w7)), &cfg);
            assert_eq!(got.loss, 0.0, "{w4} {w7} {cfg:?}");
            assert!(zero_grad(&got));
        }
    }
    // D < 0 divides, as PyTorch does (it used to give 0 and a zero gradient): with every weight negative
    // the mean is again a weighted average of the rows' (positive) losses.
    let got = run("D < 0", &xr, &targets, Some(&weights(-1.0, -0.5)), &mean);
    assert!(got.loss.is_finite() && got.loss > 0.0 && !zero_grad(&got));
    // Every row ignored: 0, zero gradient (PyTorch: NaN loss, zero gradient).
    let got = run("all ignored", &xr, &[-100; 3], None, &mean);
    assert!(got.loss == 0.0 && zero_grad(&got));
    // D = 0 never hides a NaN row (it used to give 0): a NaN logit in a weight-0 row...
    xr[v + 11] = f64::NAN;
    let got = run(
        "D = 0, NaN row",
        &xr,
        &targets,
        Some(&weights(0.0, 0.0)),
        &mean,
    );
    assert!(got.loss.is_nan() && got.rows[1].is_nan());
    // ...or every target out of range (rows NaN, gradient 0, reported).
    xr[v + 11] = 0.0;
    let got = run(
        "all out of range",
        &xr,
        &[v as i64, -1, 1 << 40],
        None,
        &mean,
    );
    assert!(got.loss.is_nan() && zero_grad(&got));
    assert!(matches!(
        got.status,
        Err(Error::OutOfRange {
            arg: "targets",
            index: 0,
            ..
        })
    ));
}

#[test]
fn sigmoid_focal_at_infinite_logits() {
    fusekit::on_every_backend!("sigmoid_focal_at_infinite_logits", |dev| {
        sigmoid_focal_at_infinite_logits_on::<_, f32>(dev);
        sigmoid_focal_at_infinite_logits_on::<_, bf16>(dev);
    });
}

fn sigmoid_focal_at_infinite_logits_on<B: Backend, T: LossElement>(dev: &B) {
    let inf = f64::INFINITY;
    // ±∞ with both targets, large finite logits, an ordinary one; 21 elements so the vector body and
    // the scalar tail both see infinities.
    let base = [
        (inf, 1.0),
        (-inf, 0.0),
        (inf, 0.0),
        (-inf, 1.0),
        (40.0, 0.0),
        (-40.0, 1.0),
        (0.5, 1.0),
    ];
    let (xs, ts): (Vec<T>, Vec<T>) = base
        .iter()
        .cycle()
        .take(21)
        .map(|&(x, t)| (T::from_f64(x), T::from_f64(t)))
        .unzip();
    let n = xs.len();
    let xd = dev.upload(&xs).unwrap();
    let td = dev.upload(&ts).unwrap();
    for alpha in [0.25, -1.0, 0.0, 1.0] {
        for gamma in [0.0, 0.5, 2.0] {
            for reduction in [Reduction::None, Reduction::Sum] {
                let cfg = SigmoidFocalConfig {
                    alpha,
                    gamma,
                    reduction,
                };
                let what = format!("{} {} {cfg:?}", dev.kind(), T::NAME);
                let mut g = poisoned::<B, T>(dev, n).unwrap();
                let mut out =
                    SigmoidFocalOutputs::new(dev, n, reduction == Reduction::None).unwrap();
                sigmoid_focal_fwd_bwd(dev, &xd, &td, &mut g, None, &cfg, &mut out).unwrap();
                let (rl, rg) = verify::sigmoid_focal_expected(&xs, &ts, &vec![1.0; n], &cfg);
                let gh = dev.download(&g).unwrap();
                assert!(gh.iter().all(|g| g.to_f64().is_finite()), "{what}: {gh:?}");
                verify::compare_elementwise_grad(&what, &gh, &rg).unwrap_or_else(|e| panic!("{e}"));
                let (got, want) = if reduction == Reduction::None {
                    (dev.download(&out.elements).unwrap()[..n].to_vec(), rl)
                } else {
                    (
                        dev.download(&out.loss).unwrap(),
                        vec![rl.iter().sum::<f64>()],
                    )
                };
                assert!(got.iter().all(|l| !l.is_nan()), "{what}: {got:?}");
                verify::compare_stats(&what, &got, &want).unwrap_or_else(|e| panic!("{e}"));
                // A correct prediction at ±∞ costs nothing; a wrong one +∞ (0 if α_t = 0) with the
                // gradient ±α_t.
                if reduction == Reduction::None {
                    assert_eq!((got[0], got[1]), (0.0, 0.0), "{what}");
                    assert_eq!((gh[0].to_f64(), gh[1].to_f64()), (0.0, 0.0), "{what}");
                    let at0 = if alpha < 0.0 { 1.0 } else { 1.0 - alpha };
                    let at1 = if alpha < 0.0 { 1.0 } else { alpha };
                    assert_eq!(gh[2].to_f64(), at0 as f64, "{what}");
                    assert_eq!(gh[3].to_f64(), -at1 as f64, "{what}");
                    let lim = |at: f32| if at == 0.0 { 0.0 } else { f32::INFINITY };
                    assert_eq!((got[2], got[3]), (lim(at0), lim(at1)), "{what}");
                }
            }
        }
    }
}
