//! The public CPU functions of the loss family never panic (always run, no device): every bad argument is
//! a typed error naming the parameter, one case per argument per kind of bad value, and valid inputs are
//! `Ok`. The functions that cannot fail (softcap, effective_smoothing, combine_stats, sigmoid_focal) are
//! driven through their extremes.

use fusekit::loss::reference::{
    combine_stats, effective_smoothing, fwd_bwd, row_loss_grad, shard_stats, sigmoid_focal, softcap,
};
use fusekit::loss::{linear_ce_reference, LabelSmoothing, LossConfig, LossKind, Reduction};
use fusekit::Error;

const X: [f64; 6] = [1.0, 2.0, 3.0, 0.5, -1.0, 0.0]; // [2, 3]
const T: [i64; 2] = [2, 0];

fn ce() -> LossConfig {
    LossConfig::default()
}

/// Configurations the kernels reject, with the argument each names.
fn bad_configs() -> Vec<(LossConfig, &'static str)> {
    let c = ce();
    vec![
        (
            LossConfig {
                kind: LossKind::Focal { gamma: -1.0 },
                ..c
            },
            "gamma",
        ),
        (
            LossConfig {
                kind: LossKind::Focal { gamma: f32::NAN },
                ..c
            },
            "gamma",
        ),
        (
            LossConfig {
                kind: LossKind::Poly1 { epsilon: -2.0 },
                ..c
            },
            "epsilon",
        ),
        (
            LossConfig {
                kind: LossKind::Poly1Focal {
                    gamma: 2.0,
                    epsilon: f32::INFINITY,
                },
                ..c
            },
            "epsilon",
        ),
        (
            LossConfig {
                kind: LossKind::Gce { q: 0.0 },
                ..c
            },
            "q",
        ),
        (
            LossConfig {
                kind: LossKind::Gce { q: 1.5 },
                ..c
            },
            "q",
        ),
        (
            LossConfig {
                label_smoothing: LabelSmoothing::PyTorch(1.5),
                ..c
            },
            "label_smoothing",
        ),
        (
            LossConfig {
                label_smoothing: LabelSmoothing::Megatron(f32::NAN),
                ..c
            },
            "label_smoothing",
        ),
        (
            LossConfig {
                kind: LossKind::Focal { gamma: 2.0 },
                label_smoothing: LabelSmoothing::PyTorch(0.1),
                ..c
            },
            "label_smoothing",
        ),
        (LossConfig { z_loss: -1e-4, ..c }, "z_loss"),
        (
            LossConfig {
                z_loss: f32::NAN,
                ..c
            },
            "z_loss",
        ),
        (
            LossConfig {
                softcap: Some(0.0),
                ..c
            },
            "softcap",
        ),
        (
            LossConfig {
                softcap: Some(f32::INFINITY),
                ..c
            },
            "softcap",
        ),
    ]
}

// ---------------------------------------------------------------------------------------------------
// fwd_bwd

#[test]
fn fwd_bwd_valid_input_is_ok() {
    let r = fwd_bwd(&X, 2, 3, &T, None, None, &ce()).unwrap();
    let lse0 = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
    assert!((r.rows[0] - (lse0 - 3.0)).abs() < 1e-14);
    assert_eq!((r.rows.len(), r.lse.len(), r.grad.len()), (2, 2, 6));
    assert!(r.status.is_ok());
    // Weights, a per-row upstream gradient, every kind: Ok.
    let w = [0.5, 1.0, 2.0];
    let none = LossConfig {
        reduction: Reduction::None,
        ..ce()
    };
    assert!(fwd_bwd(&X, 2, 3, &T, Some(&w), Some(&[1.0, 2.0]), &none).is_ok());
    assert!(fwd_bwd(&X, 2, 3, &T, Some(&w), Some(&[3.0]), &ce()).is_ok());
    for kind in [
        LossKind::Focal { gamma: 2.0 },
        LossKind::Poly1 { epsilon: 1.0 },
        LossKind::Poly1Focal {
            gamma: 2.0,
            epsilon: 1.0,
        },
        LossKind::Gce { q: 0.7 },
    ] {
        let cfg = LossConfig { kind, ..ce() };
        assert!(
            fwd_bwd(&X, 2, 3, &T, Some(&w), None, &cfg).is_ok(),
            "{kind:?}"
        );
    }
}

#[test]
fn fwd_bwd_zero_rows_or_classes() {
    assert!(matches!(
        fwd_bwd(&[], 0, 3, &[], None, None, &ce()),
        Err(Error::Shape { arg: "n", .. })
    ));
    assert!(matches!(
        fwd_bwd(&[], 2, 0, &T, None, None, &ce()),
        Err(Error::Shape { arg: "v", .. })
    ));
}

#[test]
fn fwd_bwd_size_product_overflow() {
    assert!(matches!(
        fwd_bwd(&X, usize::MAX, 2, &T, None, None, &ce()),
        Err(Error::Shape { arg: "logits", .. })
    ));
    assert!(matches!(
        fwd_bwd(&X, 2, usize::MAX / 2 + 1, &T, None, None, &ce()),
        Err(Error::Shape { arg: "logits", .. })
    ));
}

#[test]
fn fwd_bwd_logits_of_the_wrong_length() {
    assert!(matches!(
        fwd_bwd(&X[..5], 2, 3, &T, None, None, &ce()),
        Err(Error::Shape { arg: "logits", .. })
    ));
    assert!(matches!(
        fwd_bwd(&[X, X].concat(), 2, 3, &T, None, None, &ce()),
        Err(Error::Shape { arg: "logits", .. })
    ));
}

#[test]
fn fwd_bwd_targets_of_the_wrong_length() {
    assert!(matches!(
        fwd_bwd(&X, 2, 3, &T[..1], None, None, &ce()),
        Err(Error::Shape { arg: "targets", .. })
    ));
    assert!(matches!(
        fwd_bwd(&X, 2, 3, &[0, 1, 2], None, None, &ce()),
        Err(Error::Shape { arg: "targets", .. })
    ));
}

#[test]
fn fwd_bwd_weights_of_the_wrong_length() {
    assert!(matches!(
        fwd_bwd(&X, 2, 3, &T, Some(&[1.0, 1.0]), None, &ce()),
        Err(Error::Shape { arg: "weights", .. })
    ));
    assert!(matches!(
        fwd_bwd(&X, 2, 3, &T, Some(&[1.0; 4]), None, &ce()),
        Err(Error::Shape { arg: "weights", .. })
    ));
    assert!(matches!(
        fwd_bwd(&X, 2, 3, &T, Some(&[]), None, &ce()),
        Err(Error::Shape { arg: "weights", .. })
    ));
}

#[test]
fn fwd_bwd_grad_output_of_the_wrong_length() {
    let none = LossConfig {
        reduction: Reduction::None,
        ..ce()
    };
    let sum = LossConfig {
        reduction: Reduction::Sum,
        ..ce()
    };
    for (go, cfg) in [
        (&[][..], ce()),
        (&[1.0, 1.0][..], ce()),
        (&[1.0, 1.0][..], sum),
        (&[1.0][..], none),
        (&[1.0, 1.0, 1.0][..], none),
    ] {
        assert!(
            matches!(
                fwd_bwd(&X, 2, 3, &T, None, Some(go), &cfg),
                Err(Error::Shape {
                    arg: "grad_output",
                    ..
                })
            ),
            "{} values for {:?}",
            go.len(),
            cfg.reduction
        );
    }
}

#[test]
fn fwd_bwd_invalid_configurations() {
    for (cfg, arg) in bad_configs() {
        match fwd_bwd(&X, 2, 3, &T, None, None, &cfg) {
            Err(Error::InvalidArgument { arg: a, .. }) => assert_eq!(a, arg, "{cfg:?}"),
            other => panic!("{cfg:?}: expected InvalidArgument({arg}), got {other:?}"),
        }
    }
}

/// A target outside [0, v) is what the kernel makes of it: the row's loss and lse NaN, its gradient 0,
/// the reduced loss NaN, and the first such row reported as `Err(OutOfRange)` in `status`.
#[test]
fn fwd_bwd_targets_out_of_range_are_reported_never_read() {
    for bad in [3i64, -1, -101, i64::MAX, i64::MIN] {
        let t = [0, -100, bad, bad];
        let x = [X.as_slice(), X.as_slice()].concat();
        let r = fwd_bwd(&x, 4, 3, &t, None, None, &ce()).unwrap();
        assert!(
            r.rows[2].is_nan() && r.lse[2].is_nan() && r.loss.is_nan(),
            "{bad}"
        );
        assert!(r.grad[6..].iter().all(|&g| g == 0.0), "{bad}");
        assert!(r.rows[0].is_finite() && r.rows[1] == 0.0);
        match &r.status {
            Err(Error::OutOfRange {
                arg: "targets",
                index: 2,
                value,
                allowed,
            }) => {
                assert_eq!(*value, bad);
                assert_eq!(allowed, "[0, 3) (or ignore_index -100)");
            }
            other => panic!("target {bad}: {other:?}"),
        }
        // The same message as LossOutputs::check_targets_sync.
        assert_eq!(
            r.status.clone().unwrap_err().to_string(),
            format!("targets[2] = {bad} is outside [0, 3) (or ignore_index -100)")
        );
    }
    // Another ignore index: -100 is now out of range, 7 is ignored.
    let cfg = LossConfig {
        ignore_index: 7,
        ..ce()
    };
    let r = fwd_bwd(&X, 2, 3, &[7, -100], None, None, &cfg).unwrap();
    assert_eq!(r.rows[0], 0.0);
    assert!(matches!(
        r.status,
        Err(Error::OutOfRange {
            arg: "targets",
            index: 1,
            value: -100,
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------------------
// row_loss_grad

#[test]
fn row_loss_grad_valid_input_is_ok() {
    let (l, lse, g) = row_loss_grad(&[0.0, 0.0], 1, Some(&[1.0, 2.0]), &ce()).unwrap();
    assert!((l - 2.0 * 2f64.ln()).abs() < 1e-15 && (lse - 2f64.ln()).abs() < 1e-15);
    assert!((g[1] + 1.0).abs() < 1e-15);
    assert!(row_loss_grad(&[5.0], 0, None, &ce()).is_ok());
}

#[test]
fn row_loss_grad_empty_row() {
    assert!(matches!(
        row_loss_grad(&[], 0, None, &ce()),
        Err(Error::Shape { arg: "z", .. })
    ));
}

#[test]
fn row_loss_grad_target_out_of_range() {
    assert!(matches!(
        row_loss_grad(&[0.0, 1.0], 2, None, &ce()),
        Err(Error::OutOfRange {
            arg: "y",
            index: 0,
            value: 2,
            ..
        })
    ));
    assert!(matches!(
        row_loss_grad(&[0.0, 1.0], usize::MAX, None, &ce()),
        Err(Error::OutOfRange {
            arg: "y",
            value: i64::MAX,
            ..
        })
    ));
}

#[test]
fn row_loss_grad_weights_of_the_wrong_length() {
    assert!(matches!(
        row_loss_grad(&[0.0, 1.0], 0, Some(&[1.0]), &ce()),
        Err(Error::Shape { arg: "w", .. })
    ));
    assert!(matches!(
        row_loss_grad(&[0.0, 1.0], 0, Some(&[1.0; 3]), &ce()),
        Err(Error::Shape { arg: "w", .. })
    ));
}

#[test]
fn row_loss_grad_invalid_configurations() {
    for (cfg, arg) in bad_configs() {
        match row_loss_grad(&[0.0, 1.0], 0, None, &cfg) {
            Err(Error::InvalidArgument { arg: a, .. }) => assert_eq!(a, arg, "{cfg:?}"),
            other => panic!("{cfg:?}: expected InvalidArgument({arg}), got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// shard_stats

#[test]
fn shard_stats_valid_input_is_ok() {
    let w = [1.0; 10];
    let smooth = LossConfig {
        label_smoothing: LabelSmoothing::PyTorch(0.1),
        ..ce()
    };
    let s = shard_stats(&X, 2, 3, 7, &[8, 0], Some(&w), &smooth).unwrap();
    assert_eq!(s[0][2], 2.0); // class 8 is local column 1
    assert_eq!(s[1][2], 0.0); // class 0 is in another shard
    assert_eq!(s[0][3], 6.0);
    // Targets far outside the shard, i64::MIN included: in no shard, never an overflow.
    let s = shard_stats(&X, 2, 3, 5, &[i64::MIN, i64::MAX], None, &ce()).unwrap();
    assert_eq!((s[0][2], s[1][2]), (0.0, 0.0));
    let s = shard_stats(
        &X,
        2,
        3,
        i64::MAX as usize - 3,
        &[i64::MAX - 1, -5],
        None,
        &ce(),
    )
    .unwrap();
    assert_eq!(s[0][2], 3.0);
}

#[test]
fn shard_stats_zero_rows_or_classes() {
    assert!(matches!(
        shard_stats(&[], 0, 3, 0, &[], None, &ce()),
        Err(Error::Shape { arg: "n", .. })
    ));
    assert!(matches!(
        shard_stats(&[], 2, 0, 0, &T, None, &ce()),
        Err(Error::Shape { arg: "vs", .. })
    ));
}

#[test]
fn shard_stats_size_product_overflow() {
    assert!(matches!(
        shard_stats(&X, usize::MAX, 3, 0, &T, None, &ce()),
        Err(Error::Shape { arg: "logits", .. })
    ));
}

#[test]
fn shard_stats_logits_of_the_wrong_length() {
    assert!(matches!(
        shard_stats(&X[..4], 2, 3, 0, &T, None, &ce()),
        Err(Error::Shape { arg: "logits", .. })
    ));
    assert!(matches!(
        shard_stats(&[X, X].concat(), 2, 3, 0, &T, None, &ce()),
        Err(Error::Shape { arg: "logits", .. })
    ));
}

#[test]
fn shard_stats_targets_of_the_wrong_length() {
    assert!(matches!(
        shard_stats(&X, 2, 3, 0, &T[..1], None, &ce()),
        Err(Error::Shape { arg: "targets", .. })
    ));
    assert!(matches!(
        shard_stats(&X, 2, 3, 0, &[0, 0, 0], None, &ce()),
        Err(Error::Shape { arg: "targets", .. })
    ));
}

#[test]
fn shard_stats_offset_beyond_the_class_ids() {
    for offset in [usize::MAX, usize::MAX - 2, i64::MAX as usize - 1] {
        assert!(
            matches!(
                shard_stats(&X, 2, 3, offset, &T, None, &ce()),
                Err(Error::InvalidArgument { arg: "offset", .. })
            ),
            "{offset}"
        );
    }
}

#[test]
fn shard_stats_weights_shorter_than_the_shard_end() {
    // The weights are the whole vocabulary's: they must reach offset + vs.
    assert!(matches!(
        shard_stats(&X, 2, 3, 4, &T, Some(&[1.0; 6]), &ce()),
        Err(Error::Shape { arg: "weights", .. })
    ));
    assert!(matches!(
        shard_stats(&X, 2, 3, 0, &T, Some(&[]), &ce()),
        Err(Error::Shape { arg: "weights", .. })
    ));
    assert!(shard_stats(&X, 2, 3, 4, &T, Some(&[1.0; 7]), &ce()).is_ok());
}

#[test]
fn shard_stats_invalid_configurations() {
    for (cfg, arg) in bad_configs() {
        match shard_stats(&X, 2, 3, 0, &T, None, &cfg) {
            Err(Error::InvalidArgument { arg: a, .. }) => assert_eq!(a, arg, "{cfg:?}"),
            other => panic!("{cfg:?}: expected InvalidArgument({arg}), got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// linear_ce_reference: hidden [n, h], weight [v, h]

const H: [f64; 4] = [1.0, 0.0, 0.5, -0.5]; // n = 2, h = 2
const W: [f64; 6] = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5]; // v = 3, h = 2

#[test]
fn linear_ce_reference_valid_input_is_ok() {
    let (rows, loss, dh, dw) = linear_ce_reference(&H, &W, 2, 2, 3, &[0, 2], &ce()).unwrap();
    assert_eq!((rows.len(), dh.len(), dw.len()), (2, 4, 6));
    assert!((loss - (rows[0] + rows[1]) / 2.0).abs() < 1e-15);
    // An invalid target: the kernel's NaN row, no gradient from it.
    let (rows, loss, dh, _) = linear_ce_reference(&H, &W, 2, 2, 3, &[0, 3], &ce()).unwrap();
    assert!(rows[1].is_nan() && loss.is_nan() && dh[2..].iter().all(|&g| g == 0.0));
}

#[test]
fn linear_ce_reference_zero_dimensions() {
    assert!(matches!(
        linear_ce_reference(&[], &W, 0, 2, 3, &[], &ce()),
        Err(Error::Shape { arg: "n", .. })
    ));
    assert!(matches!(
        linear_ce_reference(&[], &[], 2, 0, 3, &[0, 2], &ce()),
        Err(Error::Shape { arg: "h", .. })
    ));
    assert!(matches!(
        linear_ce_reference(&H, &[], 2, 2, 0, &[0, 2], &ce()),
        Err(Error::Shape { arg: "v", .. })
    ));
}

#[test]
fn linear_ce_reference_size_product_overflow() {
    assert!(matches!(
        linear_ce_reference(&H, &W, usize::MAX, 2, 3, &[0, 2], &ce()),
        Err(Error::Shape { arg: "hidden", .. })
    ));
    assert!(matches!(
        linear_ce_reference(&H, &W, 2, 2, usize::MAX, &[0, 2], &ce()),
        Err(Error::Shape { arg: "weight", .. })
    ));
}

#[test]
fn linear_ce_reference_hidden_of_the_wrong_length() {
    assert!(matches!(
        linear_ce_reference(&H[..3], &W, 2, 2, 3, &[0, 2], &ce()),
        Err(Error::Shape { arg: "hidden", .. })
    ));
    assert!(matches!(
        linear_ce_reference(&[H, H].concat(), &W, 2, 2, 3, &[0, 2], &ce()),
        Err(Error::Shape { arg: "hidden", .. })
    ));
}

#[test]
fn linear_ce_reference_weight_of_the_wrong_length() {
    assert!(matches!(
        linear_ce_reference(&H, &W[..5], 2, 2, 3, &[0, 2], &ce()),
        Err(Error::Shape { arg: "weight", .. })
    ));
    assert!(matches!(
        linear_ce_reference(&H, &[W, W].concat(), 2, 2, 3, &[0, 2], &ce()),
        Err(Error::Shape { arg: "weight", .. })
    ));
}

#[test]
fn linear_ce_reference_targets_of_the_wrong_length() {
    assert!(matches!(
        linear_ce_reference(&H, &W, 2, 2, 3, &[0], &ce()),
        Err(Error::Shape { arg: "targets", .. })
    ));
    assert!(matches!(
        linear_ce_reference(&H, &W, 2, 2, 3, &[0, 1, 2], &ce()),
        Err(Error::Shape { arg: "targets", .. })
    ));
}

#[test]
fn linear_ce_reference_invalid_configurations() {
    for (cfg, arg) in bad_configs() {
        match linear_ce_reference(&H, &W, 2, 2, 3, &[0, 2], &cfg) {
            Err(Error::InvalidArgument { arg: a, .. }) => assert_eq!(a, arg, "{cfg:?}"),
            other => panic!("{cfg:?}: expected InvalidArgument({arg}), got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The total functions: no argument makes them panic.

const EXTREMES: [f64; 9] = [
    0.0,
    -0.0,
    1.0,
    -1e300,
    1e300,
    f64::INFINITY,
    f64::NEG_INFINITY,
    f64::NAN,
    f64::MIN_POSITIVE,
];

#[test]
fn softcap_and_effective_smoothing_take_any_value() {
    for &x in &EXTREMES {
        for c in [
            None,
            Some(30.0),
            Some(0.0),
            Some(-1.0),
            Some(f32::NAN),
            Some(f32::INFINITY),
        ] {
            let (z, dz) = softcap(x, c);
            match c {
                Some(c) if c.is_finite() && c > 0.0 => {
                    assert!(x.is_nan() || z.abs() <= c as f64, "{x} {c}")
                }
                // No cap (a non-positive or NaN one is none): the identity.
                Some(c) if c.is_nan() || c <= 0.0 => assert_eq!(dz, 1.0),
                None => assert_eq!((z.to_bits(), dz), (x.to_bits(), 1.0)),
                Some(_) => {}
            }
        }
    }
    for v in [0, 1, 2, usize::MAX] {
        for s in [
            LabelSmoothing::None,
            LabelSmoothing::PyTorch(0.1),
            LabelSmoothing::Megatron(0.1),
            LabelSmoothing::Megatron(f32::NAN),
        ] {
            let e = effective_smoothing(s, v);
            assert!(e.is_nan() || (0.0..=0.25).contains(&e), "{s:?} {v}: {e}");
        }
    }
}

#[test]
fn combine_stats_takes_any_parts() {
    let (lse, zy, swz) = combine_stats(&[]);
    assert_eq!((lse, zy, swz), (f64::NEG_INFINITY, 0.0, 0.0));
    let (lse, _, _) = combine_stats(&[[f64::NEG_INFINITY, 0.0, 0.0, 0.0]]);
    assert_eq!(lse, f64::NEG_INFINITY);
    for &a in &EXTREMES {
        for &b in &EXTREMES {
            let _ = combine_stats(&[[a, b, a, b], [b, a, b, a]]);
        }
    }
}

#[test]
fn sigmoid_focal_takes_any_value() {
    for &x in &EXTREMES {
        for &t in &EXTREMES {
            for &alpha in &[-1.0, 0.0, 0.25, 1.0, f64::NAN] {
                for &gamma in &[0.0, 0.5, 2.0, f64::INFINITY] {
                    let _ = sigmoid_focal(x, t, alpha, gamma);
                }
            }
        }
    }
    assert_eq!(sigmoid_focal(f64::NEG_INFINITY, 0.0, 0.25, 2.0), (0.0, 0.0));
}
