//! CPU tests of the loss family's reference and maths (always run): known values, identities, finite
#![allow(clippy::needless_range_loop)] // index arithmetic mirrors the formulas
//! differences, the vocabulary-shard algebra, and the PyTorch conventions.

use fusekit::loss::reference::{self, combine_stats, effective_smoothing, fwd_bwd, shard_stats};
use fusekit::loss::{LabelSmoothing, LossConfig, LossKind, Reduction};
use fusekit::testing::{seed_for, Dist, Rng};

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

#[test]
fn ce_gradient_is_softmax_minus_onehot_and_rows_sum_to_zero() {
    let mut rng = Rng::new(seed_for("ce_gradient_is_softmax_minus_onehot"));
    let (n, v) = (5, 33);
    let x = rng.sample(
        Dist::Logits {
            std: 3.0,
            outlier_frac: 0.05,
            outlier_scale: 10.0,
        },
        n * v,
    );
    let t: Vec<i64> = (0..n).map(|_| rng.below(v as u64) as i64).collect();
    let cfg = LossConfig {
        reduction: Reduction::Sum,
        ..LossConfig::default()
    };
    let r = fwd_bwd(&x, n, v, &t, None, None, &cfg).unwrap();
    for i in 0..n {
        let row = &x[i * v..(i + 1) * v];
        let m = row.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + row.iter().map(|z| (z - m).exp()).sum::<f64>().ln();
        assert!(close(r.lse[i], lse, 1e-14));
        assert!(close(r.rows[i], lse - row[t[i] as usize], 1e-13));
        let s: f64 = r.grad[i * v..(i + 1) * v].iter().sum();
        assert!(s.abs() < 1e-14, "row {i} gradient sums to {s}");
        for j in 0..v {
            let want = (row[j] - lse).exp() - if j as i64 == t[i] { 1.0 } else { 0.0 };
            assert!(close(r.grad[i * v + j], want, 1e-13));
        }
    }
    assert!(close(r.loss, r.rows.iter().sum(), 1e-14));
}

#[test]
fn label_smoothing_matches_the_pytorch_target_distribution() {
    // Gradient = p − q with q = (1 − ε) onehot + ε/V; Megatron's ε is ε·V/(V−1).
    let (v, eps) = (10, 0.2f32);
    let x: Vec<f64> = (0..v).map(|j| (j as f64 * 0.37).sin() * 3.0).collect();
    for (ls, e) in [
        (LabelSmoothing::PyTorch(eps), eps as f64),
        (LabelSmoothing::Megatron(eps), eps as f64 * 10.0 / 9.0),
    ] {
        let cfg = LossConfig {
            label_smoothing: ls,
            reduction: Reduction::Sum,
            ..LossConfig::default()
        };
        assert!(close(effective_smoothing(ls, v), e, 1e-7));
        let r = fwd_bwd(&x, 1, v, &[4], None, None, &cfg).unwrap();
        let lse = r.lse[0];
        for j in 0..v {
            let q = (1.0 - e) * if j == 4 { 1.0 } else { 0.0 } + e / v as f64;
            assert!(
                close(r.grad[j], (x[j] - lse).exp() - q, 1e-12),
                "{ls:?} j={j}"
            );
        }
        let want: f64 = (0..v)
            .map(|j| -((1.0 - e) * if j == 4 { 1.0 } else { 0.0 } + e / v as f64) * (x[j] - lse))
            .sum();
        assert!(close(r.rows[0], want, 1e-12));
    }
}

#[test]
fn focal_with_gamma_zero_is_cross_entropy_and_poly_eps_zero_too() {
    let mut rng = Rng::new(seed_for("focal_gamma_zero"));
    let (n, v) = (4, 17);
    let x = rng.sample(
        Dist::Normal {
            mean: 0.0,
            std: 2.0,
        },
        n * v,
    );
    let t: Vec<i64> = (0..n).map(|_| rng.below(v as u64) as i64).collect();
    let ce = fwd_bwd(&x, n, v, &t, None, None, &LossConfig::default()).unwrap();
    for kind in [
        LossKind::Focal { gamma: 0.0 },
        LossKind::Poly1 { epsilon: 0.0 },
        LossKind::Poly1Focal {
            gamma: 0.0,
            epsilon: 0.0,
        },
    ] {
        let r = fwd_bwd(
            &x,
            n,
            v,
            &t,
            None,
            None,
            &LossConfig {
                kind,
                ..LossConfig::default()
            },
        )
        .unwrap();
        assert!(close(r.loss, ce.loss, 1e-13), "{kind:?}");
        for (a, b) in r.grad.iter().zip(&ce.grad) {
            assert!((a - b).abs() < 1e-14, "{kind:?}");
        }
    }
    // GCE tends to CE as q -> 0.
    let g = fwd_bwd(
        &x,
        n,
        v,
        &t,
        None,
        None,
        &LossConfig {
            kind: LossKind::Gce { q: 1e-6 },
            ..LossConfig::default()
        },
    )
    .unwrap();
    assert!(close(g.loss, ce.loss, 1e-4));
}

#[test]
fn focal_down_weights_easy_examples() {
    // A confident correct row loses most of its loss under focal, a wrong one keeps it.
    let x = [8.0, 0.0, 0.0, 0.0, 0.0, 8.0];
    let cfg_f = LossConfig {
        kind: LossKind::Focal { gamma: 2.0 },
        reduction: Reduction::None,
        ..LossConfig::default()
    };
    let cfg_c = LossConfig {
        reduction: Reduction::None,
        ..LossConfig::default()
    };
    let f = fwd_bwd(&x, 2, 3, &[0, 0], None, None, &cfg_f).unwrap();
    let c = fwd_bwd(&x, 2, 3, &[0, 0], None, None, &cfg_c).unwrap();
    assert!(f.rows[0] < 1e-6 * c.rows[0] + 1e-9);
    assert!(f.rows[1] > 0.99 * c.rows[1]);
}

#[test]
fn reference_gradients_match_finite_differences() {
    let mut rng = Rng::new(seed_for("reference_gradients_match_finite_differences"));
    let err = fusekit::loss::verify::reference_fd_error(&mut rng);
    assert!(err < 1e-5, "worst relative error {err:e}");
}

#[test]
fn kernel_row_maths_match_the_reference() {
    let mut rng = Rng::new(seed_for("kernel_row_maths_match_the_reference"));
    let err = fusekit::loss::verify::host_math_error(&mut rng);
    assert!(err < 1e-4, "worst relative error {err:e}");
}

#[test]
fn sigmoid_focal_maths_agree_and_match_torchvision_values() {
    let mut rng = Rng::new(seed_for("sigmoid_focal_maths"));
    assert!(fusekit::loss::verify::sigmoid_focal_error(&mut rng) < 1e-4);
    // torchvision: x=2, t=1, alpha=.25, gamma=2: ce = softplus(-2), p_t = sigmoid(2)
    let p: f64 = 1.0 / (1.0 + (-2.0f64).exp());
    let ce = (1.0 + (-2.0f64).exp()).ln();
    let (l, _) = reference::sigmoid_focal(2.0, 1.0, 0.25, 2.0);
    assert!(close(l, 0.25 * ce * (1.0 - p).powi(2), 1e-14));
    // alpha < 0 disables the weighting; negatives use 1 − alpha.
    let (l0, _) = reference::sigmoid_focal(-1.0, 0.0, -1.0, 2.0);
    let (l1, _) = reference::sigmoid_focal(-1.0, 0.0, 0.25, 2.0);
    assert!(close(l1, 0.75 * l0, 1e-14));
}

#[test]
fn ignored_rows_and_all_ignored_batches() {
    let x = [1.0, 2.0, 3.0, 3.0, 2.0, 1.0];
    let cfg = LossConfig::default();
    let r = fwd_bwd(&x, 2, 3, &[-100, 1], None, None, &cfg).unwrap();
    assert_eq!(r.rows[0], 0.0);
    assert_eq!(r.lse[0], 0.0);
    assert!(r.grad[..3].iter().all(|&g| g == 0.0));
    // The mean is over the one counted row.
    assert!(close(r.loss, r.rows[1], 1e-15));
    // All ignored: loss 0 and zero gradient, not NaN.
    let r = fwd_bwd(&x, 2, 3, &[-100, -100], None, None, &cfg).unwrap();
    assert_eq!(r.loss, 0.0);
    assert!(r.grad.iter().all(|&g| g == 0.0));
}

#[test]
fn weighted_mean_divides_by_the_target_weights() {
    let x = [0.0, 1.0, 0.0, 1.0];
    let w = [2.0, 0.5];
    let cfg = LossConfig::default();
    let r = fwd_bwd(&x, 2, 2, &[0, 1], Some(&w), None, &cfg).unwrap();
    let want = (r.rows[0] + r.rows[1]) / 2.5;
    assert!(close(r.loss, want, 1e-15));
    let lse = (1.0f64.exp() + 1.0).ln();
    assert!(close(r.rows[0], 2.0 * (lse - 0.0), 1e-15));
}

#[test]
fn vocabulary_shards_combine_to_the_unsharded_result() {
    let mut rng = Rng::new(seed_for("vocabulary_shards_combine"));
    let (n, v) = (6, 40);
    let x = rng.sample(
        Dist::Logits {
            std: 2.0,
            outlier_frac: 0.02,
            outlier_scale: 10.0,
        },
        n * v,
    );
    let t: Vec<i64> = (0..n)
        .map(|i| {
            if i == 2 {
                -100
            } else {
                rng.below(v as u64) as i64
            }
        })
        .collect();
    let w: Vec<f64> = (0..v).map(|_| rng.uniform(0.5, 1.5)).collect();
    let cfg = LossConfig {
        label_smoothing: LabelSmoothing::PyTorch(0.1),
        z_loss: 1e-3,
        softcap: Some(8.0),
        ..LossConfig::default()
    };
    let full = fwd_bwd(&x, n, v, &t, Some(&w), None, &cfg).unwrap();
    for bounds in [vec![0, 40], vec![0, 13, 40], vec![0, 7, 19, 20, 40]] {
        let parts: Vec<Vec<[f64; 4]>> = bounds
            .windows(2)
            .map(|b| {
                let vs = b[1] - b[0];
                let shard: Vec<f64> = (0..n)
                    .flat_map(|i| x[i * v + b[0]..i * v + b[1]].to_vec())
                    .collect();
                shard_stats(&shard, n, vs, b[0], &t, Some(&w), &cfg).unwrap()
            })
            .collect();
        for i in 0..n {
            if t[i] == -100 {
                continue;
            }
            let row: Vec<[f64; 4]> = parts.iter().map(|p| p[i]).collect();
            let (lse, zy, _) = combine_stats(&row);
            assert!(close(lse, full.lse[i], 1e-13), "shards {bounds:?} row {i}");
            let z_y = {
                let c = 8.0f64;
                c * (x[i * v + t[i] as usize] / c).tanh()
            };
            assert!(close(zy, z_y, 1e-13));
        }
    }
}

#[test]
fn nan_reaches_the_combined_lse_from_any_shard_and_masked_shards_drop_out() {
    let cfg = LossConfig::default();
    let clean = [0.5, -1.0, 2.0, 0.25];
    // Shard 1 is all NaN, all masked (−∞), or one NaN among masked logits.
    for (shard1, want_nan) in [
        ([f64::NAN; 4], true),
        ([f64::NEG_INFINITY; 4], false),
        (
            [
                f64::NEG_INFINITY,
                f64::NAN,
                f64::NEG_INFINITY,
                f64::NEG_INFINITY,
            ],
            true,
        ),
    ] {
        let a = shard_stats(&clean, 1, 4, 0, &[1], None, &cfg).unwrap();
        let b = shard_stats(&shard1, 1, 4, 4, &[1], None, &cfg).unwrap();
        for parts in [[a[0], b[0]], [b[0], a[0]]] {
            let (lse, _, _) = combine_stats(&parts);
            assert_eq!(lse.is_nan(), want_nan, "{shard1:?}: lse {lse}");
            if !want_nan {
                let full = fwd_bwd(&clean, 1, 4, &[1], None, None, &cfg).unwrap();
                assert!(close(lse, full.lse[0], 1e-15));
            }
        }
    }
    // The unsharded reference: a NaN logit makes the row and the mean NaN, other rows stay finite.
    let x = [0.0, f64::NAN, 1.0, 0.0, 2.0, 3.0];
    let out = fwd_bwd(&x, 2, 3, &[0, 2], None, None, &cfg).unwrap();
    assert!(out.rows[0].is_nan() && out.lse[0].is_nan() && out.loss.is_nan());
    assert!(out.grad[..3].iter().all(|g| g.is_nan()));
    assert!(out.rows[1].is_finite() && out.grad[3..].iter().all(|g| g.is_finite()));
}

#[test]
fn linear_ce_reference_gradients_match_finite_differences() {
    // Values on a 1/8 grid with h = 2 keep every logit exactly representable in bf16, so the reference's
    // bf16 rounding of the logits is the identity and finite differences apply.
    let (n, h, v) = (3, 2, 5);
    let hid: Vec<f64> = (0..n * h)
        .map(|k| ((k * 5 % 7) as f64 - 3.0) / 8.0)
        .collect();
    let w: Vec<f64> = (0..v * h)
        .map(|k| ((k * 3 % 11) as f64 - 5.0) / 8.0)
        .collect();
    let t = [1i64, 4, 0];
    let cfg = LossConfig::default();
    let (_, _, dh, dw) = fusekit::loss::linear_ce_reference(&hid, &w, n, h, v, &t, &cfg).unwrap();
    // Finite differences on the exact (unrounded) maths: the loss as a function of hidden and weight.
    let loss = |hid: &[f64], w: &[f64]| {
        let mut logits = vec![0.0; n * v];
        for i in 0..n {
            for j in 0..v {
                logits[i * v + j] = (0..h).map(|k| hid[i * h + k] * w[j * h + k]).sum();
            }
        }
        fwd_bwd(&logits, n, v, &t, None, None, &cfg).unwrap().loss
    };
    let e = 1e-6;
    for k in 0..n * h {
        let (mut p, mut m) = (hid.clone(), hid.clone());
        p[k] += e;
        m[k] -= e;
        let fd = (loss(&p, &w) - loss(&m, &w)) / (2.0 * e);
        assert!((fd - dh[k]).abs() < 1e-7, "dh[{k}] {} vs {fd}", dh[k]);
    }
    for k in 0..v * h {
        let (mut p, mut m) = (w.clone(), w.clone());
        p[k] += e;
        m[k] -= e;
        let fd = (loss(&hid, &p) - loss(&hid, &m)) / (2.0 * e);
        assert!((fd - dw[k]).abs() < 1e-7, "dw[{k}] {} vs {fd}", dw[k]);
    }
}

/// Found by the emulator (through this reference): a row with a masked (−∞) logit and no label
/// smoothing had a NaN loss, `0 · Σ_j (lse − z_j)` with one term infinite.
#[test]
fn masked_logit_without_smoothing_has_a_finite_loss() {
    let x = [1.0, f64::NEG_INFINITY, 0.5, -2.0];
    let finite = [1.0f64, 0.5, -2.0];
    let lse = finite.iter().map(|z| z.exp()).sum::<f64>().ln();
    let r = reference::fwd_bwd(&x, 1, 4, &[2], None, None, &LossConfig::default()).unwrap();
    assert!((r.rows[0] - (lse - 0.5)).abs() < 1e-12, "{:?}", r.rows);
    assert!(r.grad.iter().all(|g| g.is_finite()), "{:?}", r.grad);
    assert_eq!(r.grad[1], 0.0);
    // With smoothing, the masked class carries ε/V of the target mass: the loss is +∞ (as in PyTorch).
    let smooth = LossConfig {
        label_smoothing: LabelSmoothing::PyTorch(0.1),
        ..LossConfig::default()
    };
    let r = reference::fwd_bwd(&x, 1, 4, &[2], None, None, &smooth).unwrap();
    assert_eq!(r.rows[0], f64::INFINITY);
}

// ---------------------------------------------------------------------------------------------------
// Edge semantics (src/loss/edges.md), on the reference; tests/loss_kernels.rs holds the kernels to them.

const NEG: f64 = f64::NEG_INFINITY;

fn row(x: &[f64], y: i64, w: Option<&[f64]>, cfg: &LossConfig) -> reference::RefOutput {
    let cfg = LossConfig {
        reduction: Reduction::Sum,
        ..*cfg
    };
    fwd_bwd(x, 1, x.len(), &[y], w, None, &cfg).unwrap()
}

#[test]
fn masked_logits_one_many_all_but_the_target_and_all() {
    let ce = LossConfig::default();
    let kinds = [
        ce,
        LossConfig {
            kind: LossKind::Focal { gamma: 2.0 },
            ..ce
        },
        LossConfig {
            kind: LossKind::Poly1 { epsilon: 1.0 },
            ..ce
        },
        LossConfig {
            kind: LossKind::Poly1Focal {
                gamma: 2.0,
                epsilon: 1.0,
            },
            ..ce
        },
        LossConfig {
            kind: LossKind::Gce { q: 0.5 },
            ..ce
        },
        LossConfig { z_loss: 1e-3, ..ce },
    ];
    for cfg in kinds {
        // One or many masked: the masked classes drop out of the softmax; their gradient is exactly 0.
        for x in [[1.0, NEG, 0.5, -2.0, 0.0], [NEG, NEG, 0.5, NEG, 0.0]] {
            let finite: Vec<f64> = x.iter().cloned().filter(|z| z.is_finite()).collect();
            let r = row(&x, 2, None, &cfg);
            let want = row(
                &finite,
                finite.iter().position(|&z| z == 0.5).unwrap() as i64,
                None,
                &cfg,
            );
            assert!(close(r.rows[0], want.rows[0], 1e-14), "{cfg:?} {x:?}");
            assert!(close(r.lse[0], want.lse[0], 1e-14));
            for (j, &z) in x.iter().enumerate() {
                assert!(r.grad[j].is_finite());
                if z == NEG {
                    assert_eq!(r.grad[j], 0.0, "{cfg:?} {x:?}");
                }
            }
        }
        // All but the target masked: p_y = 1, loss 0 (plus the z-loss s·lse²), gradient 0.
        let r = row(&[NEG, NEG, 0.5, NEG], 2, None, &cfg);
        let z = cfg.z_loss as f64 * 0.25;
        assert!(close(r.rows[0], z, 1e-15), "{cfg:?}: {}", r.rows[0]);
        if cfg.z_loss == 0.0 {
            assert!(r.grad.iter().all(|&g| g == 0.0), "{cfg:?} {:?}", r.grad);
        }
        // Every logit masked: lse = log 0 = −∞, log-softmax is undefined: loss and gradient NaN.
        let r = row(&[NEG; 4], 2, None, &cfg);
        assert_eq!(r.lse[0], NEG);
        assert!(r.rows[0].is_nan() && r.grad.iter().all(|g| g.is_nan()));
    }
}

#[test]
fn a_masked_target_has_an_infinite_loss_and_a_finite_gradient() {
    let x = [1.0, NEG, 0.5, -2.0];
    let ce = LossConfig::default();
    let lse = [1.0f64, 0.5, -2.0]
        .iter()
        .map(|z| z.exp())
        .sum::<f64>()
        .ln();
    let p = |j: usize| (x[j] - lse).exp();
    // CE (and focal, Poly-1, which reduce to it at p_y = 0): +∞, gradient p − onehot, as PyTorch.
    for kind in [
        LossKind::CrossEntropy,
        LossKind::Focal { gamma: 2.0 },
        LossKind::Focal { gamma: 0.5 },
        LossKind::Poly1 { epsilon: 1.0 },
        LossKind::Poly1Focal {
            gamma: 2.0,
            epsilon: 1.0,
        },
    ] {
        let r = row(&x, 1, None, &LossConfig { kind, ..ce });
        assert_eq!(r.rows[0], f64::INFINITY, "{kind:?}");
        let want = [p(0), -1.0, p(2), p(3)];
        for j in 0..4 {
            // Poly-1 adds ε·p_y(p − onehot) = 0; focal's extra terms vanish at p_y = 0.
            assert!(
                close(r.grad[j], want[j], 1e-14),
                "{kind:?} [{j}] {:?}",
                r.grad
            );
        }
    }
    // GCE is bounded: (1 − 0^q)/q, and flat there.
    let r = row(
        &x,
        1,
        None,
        &LossConfig {
            kind: LossKind::Gce { q: 0.5 },
            ..ce
        },
    );
    assert!(close(r.rows[0], 2.0, 1e-15) && r.grad.iter().all(|&g| g == 0.0));
    // A class of weight 0 weighs its row out even there: loss 0, not 0·∞ (PyTorch: NaN).
    let r = row(&x, 1, Some(&[1.0, 0.0, 1.0, 1.0]), &ce);
    assert_eq!(r.rows[0], 0.0);
    assert!(r.grad.iter().all(|&g| g == 0.0));
}

#[test]
fn label_smoothing_over_masked_logits() {
    let x = [1.0, NEG, 0.5, -2.0];
    let smooth = LossConfig {
        label_smoothing: LabelSmoothing::PyTorch(0.1),
        ..LossConfig::default()
    };
    // The masked class carries ε/V of the target mass: +∞ (as PyTorch), with a finite gradient whose
    // masked element is −ε/V.
    let e = 0.1f32 as f64;
    let r = row(&x, 2, None, &smooth);
    assert_eq!(r.rows[0], f64::INFINITY);
    assert!(r.grad.iter().all(|g| g.is_finite()));
    assert!(close(r.grad[1], -e / 4.0, 1e-15));
    // Weight 0 on the masked class: it carries nothing, the loss is finite (PyTorch: NaN, 0·∞).
    let w = [1.0, 0.0, 2.0, 0.5];
    let r = row(&x, 2, Some(&w), &smooth);
    let lse = [1.0f64, 0.5, -2.0]
        .iter()
        .map(|z| z.exp())
        .sum::<f64>()
        .ln();
    let want = (1.0 - e) * 2.0 * (lse - 0.5)
        + e / 4.0 * (1.0 * (lse - 1.0) + 2.0 * (lse - 0.5) + 0.5 * (lse + 2.0));
    assert!(close(r.rows[0], want, 1e-14), "{} vs {want}", r.rows[0]);
    assert_eq!(r.grad[1], 0.0);
    // The shard statistics agree: Σ w z skips the weight-0 masked class.
    let s = shard_stats(&x, 1, 4, 0, &[2], Some(&w), &smooth).unwrap();
    assert!(close(s[0][3], 1.0 + 2.0 * 0.5 + 0.5 * -2.0, 1e-15));
}

/// Two rows of three classes, their targets, and the mean and sum configurations.
fn two_rows() -> ([f64; 6], [i64; 2], LossConfig, LossConfig) {
    let mean = LossConfig::default();
    let sum = LossConfig {
        reduction: Reduction::Sum,
        ..mean
    };
    ([0.0, 1.0, 2.0, 2.0, 1.0, 0.0], [0, 2], mean, sum)
}

#[test]
fn nan_class_weights_are_never_averaged_away() {
    let (x, t, mean, sum) = two_rows();
    // On a target's class: that row is NaN, and so are the mean (its denominator) and every gradient.
    let w = [f64::NAN, 1.0, 1.0];
    let r = fwd_bwd(&x, 2, 3, &t, Some(&w), None, &mean).unwrap();
    assert!(r.loss.is_nan() && r.rows[0].is_nan() && r.rows[1].is_finite());
    assert!(r.grad.iter().all(|g| g.is_nan()), "{:?}", r.grad);
    // A sum keeps the other row's gradient.
    let r = fwd_bwd(&x, 2, 3, &t, Some(&w), None, &sum).unwrap();
    assert!(r.loss.is_nan());
    assert!(r.grad[..3].iter().all(|g| g.is_nan()) && r.grad[3..].iter().all(|g| g.is_finite()));
    // On a class no row targets: never read without smoothing (as PyTorch); with smoothing, Σ_j w_j
    // and Σ_j w_j z_j are NaN in every row.
    let w = [1.0, f64::NAN, 1.0];
    let r = fwd_bwd(&x, 2, 3, &t, Some(&w), None, &mean).unwrap();
    let clean = fwd_bwd(&x, 2, 3, &t, Some(&[1.0, 1.0, 1.0]), None, &mean).unwrap();
    assert_eq!(r, clean);
    let smooth = LossConfig {
        label_smoothing: LabelSmoothing::PyTorch(0.1),
        ..mean
    };
    let r = fwd_bwd(&x, 2, 3, &t, Some(&w), None, &smooth).unwrap();
    assert!(r.loss.is_nan() && r.rows.iter().all(|l| l.is_nan()));
    assert!(r.grad.iter().all(|g| g.is_nan()));
}

#[test]
fn mean_over_zero_negative_or_nan_total_weight() {
    let (x, t, mean, sum) = two_rows();
    // D = Σ w_y = 0 (the targets' weights are 0, or cancel): nothing to average: loss 0, gradient 0
    // (PyTorch: NaN, 0/0, or ±∞).
    for w in [[0.0, 1.0, 0.0], [1.0, 5.0, -1.0]] {
        let r = fwd_bwd(&x, 2, 3, &t, Some(&w), None, &mean).unwrap();
        assert_eq!(r.loss, 0.0, "{w:?}");
        assert!(r.grad.iter().all(|&g| g == 0.0), "{w:?}");
    }
    // D < 0: the mean divides by it, as PyTorch does.
    let w = [-1.0, 1.0, -2.0];
    let r = fwd_bwd(&x, 2, 3, &t, Some(&w), None, &mean).unwrap();
    let s = fwd_bwd(&x, 2, 3, &t, Some(&w), None, &sum).unwrap();
    assert!(close(r.loss, s.loss / -3.0, 1e-15));
    for (a, b) in r.grad.iter().zip(&s.grad) {
        assert!(close(*a, b / -3.0, 1e-15));
    }
    // D = 0 never hides a NaN: a NaN row (a NaN logit, or an invalid target) keeps the mean NaN.
    let xn = [f64::NAN, 1.0, 2.0, 2.0, 1.0, 0.0];
    let r = fwd_bwd(&xn, 2, 3, &t, Some(&[0.0, 1.0, 0.0]), None, &mean).unwrap();
    assert!(r.loss.is_nan() && r.grad[..3].iter().all(|g| g.is_nan()));
    assert!(r.grad[3..].iter().all(|&g| g == 0.0));
    let r = fwd_bwd(&x, 2, 3, &[3, -1], None, None, &mean).unwrap();
    assert!(r.loss.is_nan() && r.status.is_err() && r.grad.iter().all(|&g| g == 0.0));
    // Every row ignored: loss 0 and zero gradient (PyTorch: NaN and zero gradient).
    let r = fwd_bwd(&x, 2, 3, &[-100, -100], None, None, &mean).unwrap();
    assert_eq!(r.loss, 0.0);
    assert!(r.status.is_ok() && r.grad.iter().all(|&g| g == 0.0));
}

#[test]
fn sigmoid_focal_at_infinite_logits_takes_the_limits() {
    let inf = f64::INFINITY;
    for gamma in [0.0, 0.5, 2.0] {
        for alpha in [0.25, -1.0, 0.0, 1.0] {
            // α_t: α for positives, 1 − α for negatives, 1 when disabled.
            let at = |t: f64| {
                if alpha < 0.0 {
                    1.0
                } else {
                    alpha * t + (1.0 - alpha) * (1.0 - t)
                }
            };
            let wrong = |t: f64| if at(t) == 0.0 { 0.0 } else { inf };
            for (x, t, want) in [
                (inf, 1.0, (0.0, 0.0)),
                (-inf, 0.0, (0.0, 0.0)),
                (inf, 0.0, (wrong(0.0), at(0.0))),
                (-inf, 1.0, (wrong(1.0), -at(1.0))),
            ] {
                let got = reference::sigmoid_focal(x, t, alpha, gamma);
                assert_eq!(got, want, "x={x} t={t} alpha={alpha} gamma={gamma}");
                // The limit of the finite values.
                let near = reference::sigmoid_focal(x.signum() * 40.0, t, alpha, gamma);
                assert!((near.1 - want.1).abs() < 1e-12, "{near:?} vs {want:?}");
            }
        }
    }
}
