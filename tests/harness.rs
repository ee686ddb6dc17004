//! CPU tests of the verification harness itself: a harness that cannot fail proves nothing.

use fusekit::testing::{check_written, compare, decide, Dist, Element, Rng, Tolerance};
use fusekit::Error;
use half::{bf16, f16};

#[test]
fn compare_passes_within_tolerance_and_reports_errors() {
    let reference = [1.0, -2.0, 3.5, 0.0];
    let out = [1.0f32 + 1e-7, -2.0, 3.5, 0.0];
    let r = compare("y", &out, &reference, Tolerance::F32).unwrap();
    assert_eq!(r.n, 4);
    assert!(r.max_abs > 0.0 && r.max_abs < 1e-6);
    assert_eq!(r.max_abs_at, 0);
    assert!(r.rel_l2 > 0.0);
}

#[test]
fn compare_rejects_nan_everywhere() {
    let reference = [1.0, 2.0];
    assert!(compare("y", &[f32::NAN, 2.0], &reference, Tolerance::F32).is_err());
    assert!(compare("y", &[bf16::NAN, bf16::ONE], &reference, Tolerance::BF16).is_err());
    // A NaN reference is a broken test: it fails too, even if the output is NaN as well.
    assert!(compare("y", &[f32::NAN, 2.0], &[f64::NAN, 2.0], Tolerance::F32).is_err());
    // The loosest tolerance cannot let a NaN through.
    let loose = Tolerance {
        rel_l2: f64::INFINITY,
        atol: f64::INFINITY,
        rtol: f64::INFINITY,
    };
    assert!(compare("y", &[f32::NAN, 2.0], &reference, loose).is_err());
}

#[test]
fn compare_rejects_per_element_and_l2_excess() {
    let reference = [1.0, 1.0, 1.0, 1.0];
    // One element off by 1e-3: per-element failure under F32.
    let err = compare("y", &[1.0f32, 1.001, 1.0, 1.0], &reference, Tolerance::F32).unwrap_err();
    assert!(err.contains("[1]"), "{err}");
    // Every element slightly off: each within atol+rtol but the L2 bound catches it.
    let tol = Tolerance {
        rel_l2: 1e-6,
        atol: 1e-3,
        rtol: 0.0,
    };
    let err = compare("y", &[1.0005f32; 4], &reference, tol).unwrap_err();
    assert!(err.contains("relative L2"), "{err}");
    // Length mismatch.
    assert!(compare("y", &[1.0f32; 3], &reference, Tolerance::F32).is_err());
}

#[test]
fn compare_handles_infinities_exactly() {
    assert!(compare("y", &[f32::INFINITY], &[f64::INFINITY], Tolerance::F32).is_ok());
    assert!(compare("y", &[f32::NEG_INFINITY], &[f64::INFINITY], Tolerance::F32).is_err());
    assert!(compare("y", &[f32::MAX], &[f64::INFINITY], Tolerance::F32).is_err());
    assert!(compare("y", &[f32::INFINITY], &[1.0], Tolerance::F32).is_err());
}

#[test]
fn exact_tolerance_is_exact() {
    assert!(compare("ids", &[1i32, 2, 3], &[1.0, 2.0, 3.0], Tolerance::EXACT).is_ok());
    assert!(compare("ids", &[1i32, 2, 4], &[1.0, 2.0, 3.0], Tolerance::EXACT).is_err());
}

#[test]
fn poison_is_detected_for_every_element_type() {
    fn check<T: Element>(good: T) {
        assert!(!good.is_poison(), "{} good value looks poisoned", T::NAME);
        assert!(T::poison().is_poison());
        let mut v = vec![good; 9];
        assert!(check_written("v", &v).is_ok());
        v[7] = T::poison();
        let err = check_written("v", &v).unwrap_err();
        assert!(err.contains("[7]"), "{err}");
        // compare() refuses unwritten outputs too, whatever the tolerance.
        let reference: Vec<f64> = v.iter().map(|_| good.to_f64()).collect();
        let loose = Tolerance {
            rel_l2: f64::INFINITY,
            atol: f64::INFINITY,
            rtol: f64::INFINITY,
        };
        assert!(compare("v", &v, &reference, loose).is_err());
    }
    check(1.5f32);
    check(1.5f64);
    check(f16::from_f32(1.5));
    check(bf16::from_f32(1.5));
    check(7i32);
    check(7i64);
    check(7u32);
    check(7u8);
}

#[test]
fn float_poison_is_a_nan_no_arithmetic_produces() {
    assert!(f32::poison().is_nan());
    assert!(bf16::poison().is_nan());
    assert!(f16::poison().is_nan());
    // The canonical NaN produced by arithmetic is not the poison pattern.
    let nan = f32::NAN;
    assert!(!nan.is_poison());
    assert!(!(std::hint::black_box(0.0f32) / 0.0).is_poison());
    assert!(!bf16::from_f32(f32::NAN).is_poison());
}

#[test]
fn rng_is_reproducible_and_seed_sensitive() {
    let a: Vec<u64> = {
        let mut r = Rng::new(42);
        (0..100).map(|_| r.next_u64()).collect()
    };
    let b: Vec<u64> = {
        let mut r = Rng::new(42);
        (0..100).map(|_| r.next_u64()).collect()
    };
    let c: Vec<u64> = {
        let mut r = Rng::new(43);
        (0..100).map(|_| r.next_u64()).collect()
    };
    assert_eq!(a, b);
    assert_ne!(a, c);
}

fn moments(v: &[f64]) -> (f64, f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    let kurt = v.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n / (var * var);
    (mean, var, kurt)
}

#[test]
fn distributions_have_the_intended_shape() {
    let seed = fusekit::testing::seed_for("distributions_have_the_intended_shape");
    let mut rng = Rng::new(seed);
    let n = 200_000;
    let (m, v, k) = moments(&rng.sample(
        Dist::Normal {
            mean: 1.0,
            std: 2.0,
        },
        n,
    ));
    assert!(
        (m - 1.0).abs() < 0.05 && (v - 4.0).abs() < 0.1 && (k - 3.0).abs() < 0.15,
        "{m} {v} {k}"
    );
    let u = rng.sample(Dist::Uniform { lo: -1.0, hi: 3.0 }, n);
    assert!(u.iter().all(|x| (-1.0..3.0).contains(x)));
    let (m, _, _) = moments(&u);
    assert!((m - 1.0).abs() < 0.02);
    // Heavy tails: kurtosis far above the Gaussian 3.
    let (_, _, k) = moments(&rng.sample(
        Dist::HeavyTail {
            nu: 3.0,
            scale: 1.0,
        },
        n,
    ));
    assert!(k > 6.0, "student-t(3) kurtosis {k}");
    // Logits: about 1% outliers at 20x the bulk.
    let l = rng.sample(
        Dist::Logits {
            std: 1.0,
            outlier_frac: 0.01,
            outlier_scale: 20.0,
        },
        n,
    );
    let big = l.iter().filter(|x| **x > 8.0).count() as f64 / n as f64;
    assert!((0.004..0.02).contains(&big), "outlier fraction {big}");
    // below() is in range and roughly uniform.
    let mut counts = [0usize; 7];
    for _ in 0..70_000 {
        counts[rng.below(7) as usize] += 1;
    }
    assert!(
        counts.iter().all(|&c| (9_000..11_000).contains(&c)),
        "{counts:?}"
    );
}

#[test]
fn skip_decision_follows_require_flag() {
    let no_dev = || {
        Err(Error::NoDevice {
            reason: "test: no driver".into(),
        })
    };
    assert!(matches!(decide("t", no_dev(), false), Ok(None)));
    let err = decide("t", no_dev(), true).unwrap_err();
    assert!(err.contains("FUSEKIT_REQUIRE_GPU=1"), "{err}");
    // Errors other than "no device" always fail, required or not.
    let broken = || {
        Err(Error::Unsupported {
            what: "compute capability 7.0".into(),
        })
    };
    assert!(decide("t", broken(), false).is_err());
    assert!(decide("t", broken(), true).is_err());
}
