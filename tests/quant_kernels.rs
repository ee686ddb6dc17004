//! The W4A16 kernel (issue 15) against its f64 reference, on the SIMT emulator always and on a GPU when
//! one is present: every group size, symmetric and asymmetric, bf16 and f16, edge shapes (M = 1, 3, 17,
//! 33, 70; K not a multiple of the group, of 16 or of 8; N tails), forced and automatic split-K, the
//! packed format's round trip, determinism, non-finite inputs and bad input. Seeded, seeds printed.

use fusekit::quant::{
    quantize_rtn, reference_w4a16, w4a16, PackedW4, ScaleFormat, W4A16Plan, W4A16Weight,
    W4A16Workspace, W4Element, WeightQuant,
};
use fusekit::testing::{compare, emu_large, poisoned, seed_for, Dist, Element, Rng, Tolerance};
use fusekit::{Backend, DeviceProps, Error};
use half::{bf16, f16};

/// Weights: Gaussian rows of different scales with a few large outliers (as trained layers have).
fn weights(rng: &mut Rng, n: usize, k: usize) -> Vec<f32> {
    let mut w: Vec<f32> = rng
        .sample(
            Dist::Normal {
                mean: 0.0,
                std: 0.02,
            },
            n * k,
        )
        .into_iter()
        .map(|v| v as f32)
        .collect();
    for r in 0..n {
        let s = 0.5 + (r % 7) as f32 * 0.4;
        w[r * k..(r + 1) * k].iter_mut().for_each(|v| *v *= s);
    }
    for i in 0..(n * k / 97).max(1) {
        let at = (i * 7919 + 13) % (n * k);
        w[at] *= 12.0;
    }
    w
}

/// Activations: heavy-tailed, rounded to T.
fn activations<T: W4Element>(rng: &mut Rng, m: usize, k: usize) -> Vec<T> {
    rng.sample(
        Dist::HeavyTail {
            nu: 4.0,
            scale: 1.0,
        },
        m * k,
    )
    .into_iter()
    .map(T::from_f64)
    .collect()
}

fn scheme<T: W4Element>(group: Option<usize>, symmetric: bool) -> WeightQuant {
    WeightQuant {
        mse_clip: false,
        scale_format: T::SCALES,
        ..WeightQuant::int4(group, symmetric)
    }
}

/// Runs one product on `dev` and returns y.
fn run<B: Backend, T: W4Element>(
    dev: &B,
    p: &PackedW4,
    x: &[T],
    m: usize,
    split: Option<usize>,
) -> Result<(Vec<T>, usize), Error> {
    let plan = W4A16Plan::new::<T>(dev.props(), p, m, split)?;
    let w = W4A16Weight::upload(dev, p)?;
    let mut ws = W4A16Workspace::new(dev, &plan)?;
    let xd = dev.upload(x)?;
    let mut y = poisoned::<B, T>(dev, m * p.n())?;
    w4a16(dev, &plan, &xd, &w, &mut ws, &mut y)?;
    Ok((dev.download(&y)?, plan.splits()))
}

/// One rounding of an fp32 sum to T, plus fp32 accumulation over k terms.
fn check<T: W4Element>(what: &str, y: &[T], x: &[T], m: usize, p: &PackedW4) -> Result<(), String> {
    let xf: Vec<f32> = x.iter().map(|v| v.to_f64() as f32).collect();
    let want = reference_w4a16(&xf, m, p).map_err(|e| e.to_string())?;
    // Per element: |Σ x·w| of the absolute terms bounds the fp32 accumulation error.
    let wd = p.dequantize_rounded();
    let (n, k) = (p.n(), p.k());
    let abs_sum: Vec<f64> = (0..m * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            (0..k)
                .map(|j| (xf[r * k + j] as f64 * wd[c * k + j] as f64).abs())
                .sum()
        })
        .collect();
    let rtol = if T::NAME == "bf16" {
        2f64.powi(-8)
    } else {
        2f64.powi(-11)
    };
    for i in 0..m * n {
        let got = y[i].to_f64();
        let slack = rtol * want[i].abs() + 1e-6 * abs_sum[i] + 1e-30;
        if !(got - want[i]).abs().le(&slack) {
            return Err(format!(
                "{what}: y[{}][{}] = {got}, reference {} (slack {slack:e})",
                i / n,
                i % n,
                want[i]
            ));
        }
    }
    let tol = Tolerance {
        rel_l2: if T::NAME == "bf16" { 4e-3 } else { 5e-4 },
        atol: f64::INFINITY,
        rtol: 0.0,
    };
    compare(what, y, &want, tol)?;
    Ok(())
}

#[test]
fn w4a16_matches_the_reference() {
    fusekit::on_every_backend!("w4a16_matches_the_reference", |dev| {
        w4a16_matches_the_reference_on::<_, bf16>(dev);
        w4a16_matches_the_reference_on::<_, f16>(dev);
    });
}

fn w4a16_matches_the_reference_on<B: Backend, T: W4Element>(dev: &B) {
    let mut rng = Rng::new(seed_for("w4a16_matches_the_reference"));
    // (m, n, k): M = 1, 3, 5, 17, 33, 70; k a multiple of 128 (128, 384), of 8 only (200, 136), not of 8
    // (100: one slab; 300: three slabs, the element path across slabs and splits); n tails (100, 72, 130).
    let mut shapes = vec![
        (1, 64, 128),
        (3, 100, 200),
        (17, 72, 384),
        (33, 64, 136),
        (70, 130, 100),
        (5, 72, 300),
        (2, 320, 1152),
    ];
    // Real-model sizes: on a GPU, or on the emulator with FUSEKIT_EMU_LARGE=1.
    if dev.kind() == "gpu" || emu_large() {
        shapes.extend([(1, 4096, 4096), (256, 1000, 1536)]);
    }
    let groups = [Some(32), Some(64), Some(128), None];
    let mut case = 0usize;
    for (m, n, k) in shapes {
        let w = weights(&mut rng, n, k);
        let x = activations::<T>(&mut rng, m, k);
        for group in groups {
            for symmetric in [false, true] {
                case += 1;
                let q = quantize_rtn(&w, n, k, &scheme::<T>(group, symmetric)).unwrap();
                let p = PackedW4::pack(&q).unwrap();
                // Cycle through one split, a forced 2 and the GPU-sized default.
                let split = [Some(1), Some(2), None][case % 3];
                let (y, splits) = run(dev, &p, &x, m, split).unwrap();
                let what = format!(
                    "{} m={m} n={n} k={k} group={group:?} symmetric={symmetric} splits={splits}",
                    T::NAME
                );
                check(&what, &y, &x, m, &p).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}

#[test]
fn split_k_is_deterministic_and_every_split_agrees() {
    fusekit::on_every_backend!("split_k_is_deterministic_and_every_split_agrees", |dev| {
        let mut rng = Rng::new(seed_for("split_k_is_deterministic_and_every_split_agrees"));
        let (m, n, k) = (5, 64, 640); // 5 slabs
        let w = weights(&mut rng, n, k);
        let x = activations::<bf16>(&mut rng, m, k);
        let p = PackedW4::pack(&quantize_rtn(&w, n, k, &scheme::<bf16>(Some(64), false)).unwrap())
            .unwrap();
        // 5 slabs shared out as whole slabs per split: 1, 3+2, 2+2+1, 2+2+1, 1 x 5, 1 x 5.
        for (split, want) in [(1, 1), (2, 2), (3, 3), (4, 3), (5, 5), (6, 5)] {
            let (a, s) = run(dev, &p, &x, m, Some(split)).unwrap();
            assert_eq!(s, want, "{split} splits asked");
            check(&format!("splits={s}"), &a, &x, m, &p).unwrap_or_else(|e| panic!("{e}"));
            let (b, _) = run(dev, &p, &x, m, Some(split)).unwrap();
            assert!(
                a.iter().zip(&b).all(|(u, v)| u.to_bits() == v.to_bits()),
                "split {split}: two runs differ"
            );
        }
    });
}

#[test]
fn unaligned_activations_take_the_element_path() {
    fusekit::on_every_backend!("unaligned_activations_take_the_element_path", |dev| {
        let mut rng = Rng::new(seed_for("unaligned_activations_take_the_element_path"));
        let (m, n, k) = (3, 64, 256);
        let w = weights(&mut rng, n, k);
        let x = activations::<f16>(&mut rng, m, k);
        let p = PackedW4::pack(&quantize_rtn(&w, n, k, &scheme::<f16>(Some(128), true)).unwrap())
            .unwrap();
        let plan = W4A16Plan::new::<f16>(dev.props(), &p, m, None).unwrap();
        let wd = W4A16Weight::upload(dev, &p).unwrap();
        let mut ws = W4A16Workspace::new(dev, &plan).unwrap();
        // x one element into a buffer: rows 2-byte aligned only.
        let mut host = vec![f16::ZERO; m * k + 1];
        host[1..].copy_from_slice(&x);
        let buf = dev.upload(&host).unwrap();
        let view = dev.view(&buf, 1..m * k + 1).unwrap();
        let mut y = poisoned::<_, f16>(dev, m * n).unwrap();
        w4a16(dev, &plan, &view, &wd, &mut ws, &mut y).unwrap();
        check("unaligned x", &dev.download(&y).unwrap(), &x, m, &p)
            .unwrap_or_else(|e| panic!("{e}"));
    });
}

#[test]
fn non_finite_inputs_give_non_finite_outputs() {
    fusekit::on_every_backend!("non_finite_inputs_give_non_finite_outputs", |dev| {
        let mut rng = Rng::new(seed_for("non_finite_inputs_give_non_finite_outputs"));
        let (m, n, k) = (4, 72, 160);
        let w = weights(&mut rng, n, k);
        let mut x = activations::<bf16>(&mut rng, m, k);
        x[2 * k + 37] = bf16::NAN; // row 2
        x[3 * k + 5] = bf16::INFINITY; // row 3
        let p = PackedW4::pack(&quantize_rtn(&w, n, k, &scheme::<bf16>(Some(32), false)).unwrap())
            .unwrap();
        // A NaN or infinite scale (output channel 70, group 1: n-block 1, lane row 70 % 8 = 6,
        // subtile 0) never reaches the kernel: the upload refuses it.
        let ng = p.n_groups();
        for bad in [bf16::NAN, bf16::INFINITY] {
            let mut q = p.clone();
            q.scales[(ng + 1) * 64 + 6 * 8] = bad.to_bits();
            assert!(matches!(
                W4A16Weight::upload(dev, &q),
                Err(Error::InvalidArgument { .. })
            ));
        }
        for split in [Some(1), Some(3)] {
            let (y, _) = run(dev, &p, &x, m, split).unwrap();
            for r in 0..m {
                for c in 0..n {
                    let v = y[r * n + c].to_f64();
                    assert!(!y[r * n + c].is_poison(), "y[{r}][{c}] not written");
                    if r == 2 {
                        assert!(v.is_nan(), "y[{r}][{c}] = {v}, NaN expected");
                    } else if r == 3 {
                        // inf · w: ±inf, or NaN where the weight is 0 (a zero-point code).
                        assert!(!v.is_finite(), "y[{r}][{c}] = {v}, non-finite expected");
                    } else {
                        assert!(v.is_finite(), "y[{r}][{c}] = {v}");
                    }
                }
            }
        }
    });
}

#[test]
fn packing_round_trips_and_pads_with_exact_zeros() {
    let mut rng = Rng::new(seed_for("packing_round_trips_and_pads_with_exact_zeros"));
    for &(n, k) in &[(1, 1), (3, 100), (65, 129), (64, 384), (7, 31)] {
        let w = weights(&mut rng, n, k);
        for group in [Some(32), Some(64), Some(128), None] {
            for symmetric in [false, true] {
                for sf in [ScaleFormat::Bf16, ScaleFormat::F16] {
                    let s = WeightQuant {
                        scale_format: sf,
                        ..WeightQuant::int4(group, symmetric)
                    };
                    let q = quantize_rtn(&w, n, k, &s).unwrap();
                    let p = PackedW4::pack(&q).unwrap();
                    assert_eq!(p.unpack(), q, "n={n} k={k} {s:?}");
                    assert_eq!(p.codes.len(), p.n_pad() * p.k_pad() / 8);
                    // The rounded dense weight is the exact dequantisation rounded to the scale type.
                    let d = q.dequantize();
                    let r = p.dequantize_rounded();
                    for (a, b) in d.iter().zip(&r) {
                        let want = match sf {
                            ScaleFormat::Bf16 => bf16::from_f32(*a).to_f32(),
                            _ => f16::from_f32(*a).to_f32(),
                        };
                        assert_eq!(want.to_bits(), b.to_bits());
                    }
                }
            }
        }
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    fusekit::on_every_backend!("w4a16_bad_input_is_a_typed_error", |dev| {
        let mut rng = Rng::new(seed_for("w4a16_bad_input_is_a_typed_error"));
        let (m, n, k) = (2, 64, 128);
        let w = weights(&mut rng, n, k);
        let q = quantize_rtn(&w, n, k, &scheme::<bf16>(Some(64), false)).unwrap();
        let p = PackedW4::pack(&q).unwrap();
        // Packing: 3-bit codes, f32 scales, a NaN scale, a code out of range.
        let q3 = quantize_rtn(
            &w,
            n,
            k,
            &WeightQuant {
                bits: 3,
                ..scheme::<bf16>(Some(64), false)
            },
        )
        .unwrap();
        assert!(matches!(
            PackedW4::pack(&q3),
            Err(Error::Unsupported { .. })
        ));
        let qf = quantize_rtn(
            &w,
            n,
            k,
            &WeightQuant {
                scale_format: ScaleFormat::F32,
                ..scheme::<bf16>(None, false)
            },
        )
        .unwrap();
        assert!(matches!(
            PackedW4::pack(&qf),
            Err(Error::Unsupported { .. })
        ));
        let mut qn = q.clone();
        qn.scales[3] = f32::INFINITY;
        assert!(PackedW4::pack(&qn).is_err());
        let mut qc = q.clone();
        qc.codes[5] = 16;
        assert!(PackedW4::pack(&qc).is_err());
        let mut qs = q.clone();
        qs.codes.pop();
        assert!(matches!(PackedW4::pack(&qs), Err(Error::Shape { .. })));
        // A packed weight whose buffers do not match its header is refused at upload.
        let mut bad = p.clone();
        bad.codes.pop();
        assert!(matches!(
            W4A16Weight::upload(dev, &bad),
            Err(Error::Shape { .. })
        ));
        let mut bad = p.clone();
        bad.zeros = None;
        assert!(matches!(
            W4A16Weight::upload(dev, &bad),
            Err(Error::Shape { .. })
        ));
        let mut bad = p.clone();
        bad.scales.truncate(10);
        assert!(matches!(
            W4A16Weight::upload(dev, &bad),
            Err(Error::Shape { .. })
        ));
        // A padded weight that is not zero (k = 100: k tile 7, k = 112..127, is padding; lane 0's first
        // nibble is row 0, k = 112): refused, the kernel would multiply by it.
        let p100 = PackedW4::pack(
            &quantize_rtn(
                &weights(&mut rng, n, 100),
                n,
                100,
                &scheme::<bf16>(Some(32), false),
            )
            .unwrap(),
        )
        .unwrap();
        let mut bad = p100.clone();
        bad.codes[7 * 32 * 4] ^= 1;
        assert!(matches!(
            W4A16Weight::upload(dev, &bad),
            Err(Error::InvalidArgument { .. })
        ));
        // Plans: f16 activations for bf16 scales, a pre-Ampere GPU, 0 splits.
        assert!(matches!(
            W4A16Plan::new::<f16>(dev.props(), &p, m, None),
            Err(Error::DType { .. })
        ));
        let mut turing: DeviceProps = dev.props().clone();
        turing.compute_capability = (7, 5);
        assert!(matches!(
            W4A16Plan::new::<bf16>(&turing, &p, m, None),
            Err(Error::Unsupported { .. })
        ));
        assert!(W4A16Plan::new::<bf16>(dev.props(), &p, m, Some(0)).is_err());
        // Launch: wrong lengths, a weight of another shape, a too-small workspace.
        let plan = W4A16Plan::new::<bf16>(dev.props(), &p, m, Some(1)).unwrap();
        let wd = W4A16Weight::upload(dev, &p).unwrap();
        let mut ws = W4A16Workspace::new(dev, &plan).unwrap();
        let x = dev.upload(&activations::<bf16>(&mut rng, m, k)).unwrap();
        let short = dev
            .upload(&activations::<bf16>(&mut rng, m, k - 1))
            .unwrap();
        let mut y = poisoned::<_, bf16>(dev, m * n).unwrap();
        let mut y_short = poisoned::<_, bf16>(dev, m * n - 1).unwrap();
        assert!(matches!(
            w4a16(dev, &plan, &short, &wd, &mut ws, &mut y),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            w4a16(dev, &plan, &x, &wd, &mut ws, &mut y_short),
            Err(Error::Shape { .. })
        ));
        let p2 = PackedW4::pack(
            &quantize_rtn(
                &weights(&mut rng, n, 2 * k),
                n,
                2 * k,
                &scheme::<bf16>(Some(64), false),
            )
            .unwrap(),
        )
        .unwrap();
        let wd2 = W4A16Weight::upload(dev, &p2).unwrap();
        assert!(matches!(
            w4a16(dev, &plan, &x, &wd2, &mut ws, &mut y),
            Err(Error::Shape { .. })
        ));
        let plan2 = W4A16Plan::new::<bf16>(dev.props(), &p2, m, Some(2)).unwrap();
        let x2 = dev
            .upload(&activations::<bf16>(&mut rng, m, 2 * k))
            .unwrap();
        assert!(matches!(
            w4a16(dev, &plan2, &x2, &wd2, &mut ws, &mut y),
            Err(Error::Shape { .. })
        ));
        assert!(
            dev.download(&y).unwrap().iter().all(|v| v.is_poison()),
            "a refused launch wrote y"
        );
        // m = 0 launches nothing and is fine.
        let plan0 = W4A16Plan::new::<bf16>(dev.props(), &p, 0, None).unwrap();
        let empty = dev.alloc_zeros::<bf16>(0).unwrap();
        let mut y0 = dev.alloc_zeros::<bf16>(0).unwrap();
        w4a16(dev, &plan0, &empty, &wd, &mut ws, &mut y0).unwrap();
    });
}
