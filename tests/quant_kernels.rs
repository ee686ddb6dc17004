//! The W4A16 kernel (issue 15) against its f64 reference, on the SIMT emulator always and on a GPU when
//! one is present: every group size, symmetric and asymmetric, bf16 and f16, edge shapes (M = 1, 3, 17,
//! 33, 70; K not a multiple of the group, of 16 or of 8; N tails), forced and automatic split-K, the
//! packed format's round trip, determinism, non-finite inputs and bad input. Then the online Hadamard
//! kernel fused with per-token quantisation against the f64 rotation and `quantize_tokens`: every
//! Paley factor, both load paths, int4/int8, symmetric and asymmetric, outlier, zero and non-finite
//! tokens, bad input. Then BiLLM's 1-bit kernels against the f64 product with the packed weight's exact
//! values: M = 1 to 64, K and N tails, blocks with no, some and all columns salient, split-K, a weight
//! from the quantiser, non-finite activations, the exact unpack to bf16/f16, bad input. Seeded, seeds
//! printed.

use fusekit::quant::{
    billm_matmul, billm_unpack, hadamard_quantize, hadamard_rotate, quantize_billm, quantize_rtn,
    quantize_tokens, reference_billm, reference_w4a16, reference_w4a4, w4a16, w4a4, BillmConfig,
    BillmDense, BillmDeviceWeight, BillmPlan, BillmWeight, BillmWorkspace, Binary, HadamardOutput,
    HadamardPlan, Hessian, PackedBillm, PackedW4, PackedW4A4, QuantizedActivations,
    QuantizedTokens, ScaleFormat, SplitKWorkspace, W4A16Plan, W4A16Weight, W4A16Workspace,
    W4A4Plan, W4A4Weight, W4Element, WeightQuant, BILLM_BLOCK, W4A4_MAX_K,
};
use fusekit::testing::{
    compare, compare_with_floor, emu_large, poisoned, seed_for, Dist, Element, Rng, Tolerance,
};
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

/// Compares `y` (`[m][n]`) with the f64 reference `want`: per element, one rounding to T (relative,
/// and half the spacing of T's subnormals, 2^-25 for f16, where tiny outputs round absolutely) plus
/// `accumulation[i]` (the fp32 accumulation bound of the kernel at hand), then the relative L2 error.
fn check_output<T: W4Element>(
    what: &str,
    y: &[T],
    want: &[f64],
    n: usize,
    accumulation: &[f64],
) -> Result<(), String> {
    let (rtol, subnormal) = if T::NAME == "bf16" {
        (2f64.powi(-8), 2f64.powi(-134))
    } else {
        (2f64.powi(-11), 2f64.powi(-25))
    };
    for (i, (got, want)) in y.iter().zip(want).enumerate() {
        let got = got.to_f64();
        let slack = rtol * want.abs() + accumulation[i] + subnormal;
        if !(got - want).abs().le(&slack) {
            return Err(format!(
                "{what}: y[{}][{}] = {got}, reference {want} (slack {slack:e})",
                i / n,
                i % n,
            ));
        }
    }
    let tol = Tolerance {
        rel_l2: if T::NAME == "bf16" { 4e-3 } else { 5e-4 },
        atol: f64::INFINITY,
        rtol: 0.0,
    };
    compare(what, y, want, tol)?;
    Ok(())
}

/// One rounding of an fp32 sum to T, plus fp32 accumulation over k terms (bounded by Σ|x·w|).
fn check<T: W4Element>(what: &str, y: &[T], x: &[T], m: usize, p: &PackedW4) -> Result<(), String> {
    let xf: Vec<f32> = x.iter().map(|v| v.to_f64() as f32).collect();
    let want = reference_w4a16(&xf, m, p).map_err(|e| e.to_string())?;
    let wd = p.dequantize_rounded();
    let (n, k) = (p.n(), p.k());
    let bound: Vec<f64> = (0..m * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            1e-6 * (0..k)
                .map(|j| (xf[r * k + j] as f64 * wd[c * k + j] as f64).abs())
                .sum::<f64>()
        })
        .collect();
    check_output(what, y, &want, n, &bound)
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

// ---- The online Hadamard transform fused with per-token quantisation (kernels/quant/hadamard.cu) ----

/// Every Paley factor, vector and element paths: n = m·2^k with k = 0 (element path only), 1 and 2
/// (the vector path with one or two register levels: 24…120, 48, 240), 3 and more (three register
/// levels, then radix-8 passes of every remainder 1, 2, 3), more lanes than threads in the mix (3072 =
/// 12·256), and the real models' widths.
const HAD_SIZES: [usize; 27] = [
    1, 2, 4, 8, 16, 32, 12, 20, 28, 36, 44, 60, 24, 40, 56, 72, 88, 120, 48, 240, 96, 384, 576,
    1536, 2048, 3072, 4096,
];

/// Heavy-tailed tokens; in the second token (when there is one) a massive channel as in SmolLM2's
/// residual stream (2.6e4 against a median near 1); a token of zeros when there are four or more.
fn tokens<T: W4Element>(rng: &mut Rng, rows: usize, n: usize) -> Vec<T> {
    let mut x = activations::<T>(rng, rows, n);
    if rows > 1 {
        x[n + n / 3] = T::from_f64(2.6e4);
    }
    if rows > 3 {
        x[3 * n..4 * n]
            .iter_mut()
            .for_each(|v| *v = T::from_f64(0.0));
    }
    x
}

fn to_f32<T: W4Element>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f64() as f32).collect()
}

/// The f64 rotation of `x` (`[rows][n]`).
fn rotated(x: &[f32], n: usize) -> Vec<f64> {
    let mut r: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    fusekit::quant::hadamard::rotate_rows(&mut r, n).unwrap();
    r
}

/// The kernel's codes against quantize_tokens of the f64 rotation rounded to f32: scales to fp32
/// accumulation error; zero points equal, or one apart where −min/scale lies within fp32 error of a
/// half-integer (then that token's codes are one step shifted and only the value bound applies);
/// every value within half a step of the exact rotation (a full step where clamped) plus the fp32
/// error of the rotation (relative to the token's norm); codes at most one apart, rarely.
fn check_codes(
    what: &str,
    got: &QuantizedTokens,
    x: &[f32],
    n: usize,
    symmetric: bool,
) -> Result<(), String> {
    let r64 = rotated(x, n);
    let r32: Vec<f32> = r64.iter().map(|&v| v as f32).collect();
    let want = quantize_tokens(&r32, n, got.bits, symmetric).map_err(|e| e.to_string())?;
    let maxq = (1u32 << got.bits) - 1;
    let rows = x.len() / n;
    let mut flips = 0usize;
    for r in 0..rows {
        let row = &r64[r * n..(r + 1) * n];
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        let (s, sw) = (got.scales[r] as f64, want.scales[r] as f64);
        if (s - sw).abs() > 2e-5 * sw || s.is_nan() {
            return Err(format!("{what}: token {r}: scale {s} against {sw}"));
        }
        let (z, zw) = (got.zeros[r] as f64, want.zeros[r] as f64);
        let same_zero = z == zw;
        if !same_zero {
            let lo = row.iter().fold(0.0f64, |m, &v| m.min(v));
            let t = -lo / sw;
            if (z - zw).abs() > 1.0 || (t - t.floor() - 0.5).abs() > 1e-3 * t.max(1.0) {
                return Err(format!("{what}: token {r}: zero point {z} against {zw}"));
            }
        }
        for c in 0..n {
            let i = r * n + c;
            let code = got.codes[i] as u32;
            if code > maxq {
                return Err(format!("{what}: [{r}][{c}]: code {code} > {maxq}"));
            }
            let v = r64[i];
            let deq = (code as f64 - z) * s;
            let clamped = code == 0 || code == maxq;
            let bound = s * if clamped { 1.0 + 1e-4 } else { 0.5 + 1e-4 } + 4e-7 * norm;
            if (deq - v).abs() > bound || deq.is_nan() {
                return Err(format!(
                    "{what}: [{r}][{c}]: code {code} (zero {z}, scale {s}) = {deq}, exact {v}"
                ));
            }
            let cw = want.codes[i] as i64;
            if same_zero {
                if (code as i64 - cw).abs() > 1 {
                    return Err(format!("{what}: [{r}][{c}]: code {code} against {cw}"));
                }
                flips += (code as i64 != cw) as usize;
            }
        }
    }
    // Symmetric grids put the token's largest magnitude exactly on a half step (max|r| / scale = 7.5
    // or 127.5), so its code flips with the last bit of the fp32 rotation: one per token, plus 1 %.
    if flips > rows + rows * n / 100 {
        return Err(format!(
            "{what}: {flips} codes one step off the reference's"
        ));
    }
    Ok(())
}

fn symmetric(out: HadamardOutput) -> bool {
    matches!(
        out,
        HadamardOutput::Int4 { symmetric: true } | HadamardOutput::Int8 { symmetric: true }
    )
}

fn had_modes() -> [HadamardOutput; 4] {
    [
        HadamardOutput::Int4 { symmetric: false },
        HadamardOutput::Int4 { symmetric: true },
        HadamardOutput::Int8 { symmetric: false },
        HadamardOutput::Int8 { symmetric: true },
    ]
}

/// Runs the quantising kernel into poisoned buffers and returns the host copy.
fn run_hadq<B: Backend, T: W4Element, X: fusekit::DeviceRead<T, B>>(
    dev: &B,
    plan: &HadamardPlan,
    x: &X,
) -> Result<QuantizedTokens, Error> {
    let rows = plan.rows();
    let codes = dev.upload(&vec![0xA5u8; rows * plan.code_bytes_per_row()])?;
    let scales = poisoned::<B, f32>(dev, rows)?;
    let zeros = dev.upload(&vec![0xA5u8; rows])?;
    let mut q = QuantizedActivations::from_buffers(plan, codes, scales, zeros)?;
    hadamard_quantize(dev, plan, x, &mut q)?;
    q.download(dev)
}

#[test]
fn hadamard_rotation_matches_the_reference() {
    fusekit::on_every_backend!("hadamard_rotation_matches_the_reference", |dev| {
        hadamard_rotation_on::<_, bf16>(dev, Tolerance::BF16);
        hadamard_rotation_on::<_, f16>(dev, Tolerance::F16);
    });
}

fn hadamard_rotation_on<B: Backend, T: W4Element>(dev: &B, tol: Tolerance) {
    let mut rng = Rng::new(seed_for("hadamard_rotation_matches_the_reference"));
    let mut sizes = HAD_SIZES.to_vec();
    if dev.kind() == "gpu" || emu_large() {
        sizes.extend([16384, 36 * 512, 60 * 256]);
    }
    for (i, &n) in sizes.iter().enumerate() {
        let rows = [1, 2, 3, 5][i % 4];
        let x = tokens::<T>(&mut rng, rows, n);
        let plan = HadamardPlan::new::<T>(dev.props(), rows, n, HadamardOutput::Rotated).unwrap();
        let xd = dev.upload(&x).unwrap();
        let mut y = poisoned::<B, T>(dev, rows * n).unwrap();
        hadamard_rotate(dev, &plan, &xd, &mut y).unwrap();
        let y = dev.download(&y).unwrap();
        let xf = to_f32(&x);
        let want = rotated(&xf, n);
        // fp32 sums of up to log2(n) + m terms of the token's size.
        let norms: Vec<f64> = xf
            .chunks_exact(n)
            .map(|r| r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt())
            .collect();
        let what = format!("{} rotate n={n} rows={rows}", T::NAME);
        compare_with_floor(&what, &y, &want, tol, |j| 4e-7 * norms[j / n])
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn hadamard_quantization_matches_quantize_tokens() {
    fusekit::on_every_backend!("hadamard_quantization_matches_quantize_tokens", |dev| {
        hadamard_quantization_on::<_, bf16>(dev);
        hadamard_quantization_on::<_, f16>(dev);
    });
}

fn hadamard_quantization_on<B: Backend, T: W4Element>(dev: &B) {
    let mut rng = Rng::new(seed_for("hadamard_quantization_matches_quantize_tokens"));
    let mut sizes = HAD_SIZES.to_vec();
    if dev.kind() == "gpu" || emu_large() {
        sizes.extend([16384, 36 * 512, 60 * 256]);
    }
    for (i, &n) in sizes.iter().enumerate() {
        for (j, out) in had_modes().into_iter().enumerate() {
            let rows = [1, 4, 3, 6, 2][(i + j) % 5];
            let x = tokens::<T>(&mut rng, rows, n);
            let plan = HadamardPlan::new::<T>(dev.props(), rows, n, out).unwrap();
            let xd = dev.upload(&x).unwrap();
            let got = run_hadq(dev, &plan, &xd).unwrap();
            let what = format!("{} n={n} rows={rows} {out:?}", T::NAME);
            check_codes(&what, &got, &to_f32(&x), n, symmetric(out))
                .unwrap_or_else(|e| panic!("{e}"));
            if rows > 3 {
                // The token of zeros: scale 1, every code its zero point.
                assert_eq!(got.scales[3], 1.0, "{what}");
                assert!(
                    got.codes[3 * n..4 * n].iter().all(|&c| c == got.zeros[3]),
                    "{what}"
                );
            }
        }
    }
}

#[test]
fn hadamard_element_path_gives_the_same_bits() {
    fusekit::on_every_backend!("hadamard_element_path_gives_the_same_bits", |dev| {
        let mut rng = Rng::new(seed_for("hadamard_element_path_gives_the_same_bits"));
        for n in [24, 576, 1536, 4096] {
            let rows = 3;
            let x = tokens::<bf16>(&mut rng, rows, n);
            // x one element into its buffer: 2-byte aligned rows, so the element path.
            let mut host = vec![bf16::ZERO; rows * n + 1];
            host[1..].copy_from_slice(&x);
            let buf = dev.upload(&host).unwrap();
            let view = dev.view(&buf, 1..rows * n + 1).unwrap();
            let xd = dev.upload(&x).unwrap();
            let rot =
                HadamardPlan::new::<bf16>(dev.props(), rows, n, HadamardOutput::Rotated).unwrap();
            let mut a = poisoned::<_, bf16>(dev, rows * n).unwrap();
            let mut b = poisoned::<_, bf16>(dev, rows * n).unwrap();
            hadamard_rotate(dev, &rot, &xd, &mut a).unwrap();
            hadamard_rotate(dev, &rot, &view, &mut b).unwrap();
            let (a, b) = (dev.download(&a).unwrap(), dev.download(&b).unwrap());
            // Same butterfly levels in the same order: the same bits.
            assert!(
                a.iter().zip(&b).all(|(u, v)| u.to_bits() == v.to_bits()),
                "n={n}"
            );
            for out in had_modes() {
                let plan = HadamardPlan::new::<bf16>(dev.props(), rows, n, out).unwrap();
                let u = run_hadq(dev, &plan, &xd).unwrap();
                let v = run_hadq(dev, &plan, &view).unwrap();
                assert_eq!(u, v, "n={n} {out:?}");
            }
        }
    });
}

#[test]
fn hadamard_non_finite_tokens_get_a_nan_scale() {
    fusekit::on_every_backend!("hadamard_non_finite_tokens_get_a_nan_scale", |dev| {
        let mut rng = Rng::new(seed_for("hadamard_non_finite_tokens_get_a_nan_scale"));
        for n in [12, 576] {
            let rows = 4;
            let mut x = activations::<f16>(&mut rng, rows, n);
            x[n + 5] = f16::NAN;
            x[2 * n + n - 1] = f16::INFINITY;
            x[3 * n] = f16::NEG_INFINITY;
            let xd = dev.upload(&x).unwrap();
            for out in had_modes() {
                let plan = HadamardPlan::new::<f16>(dev.props(), rows, n, out).unwrap();
                let got = run_hadq(dev, &plan, &xd).unwrap();
                assert!(got.scales[0].is_finite(), "n={n} {out:?}");
                check_codes(
                    "finite token",
                    &QuantizedTokens {
                        codes: got.codes[..n].to_vec(),
                        scales: got.scales[..1].to_vec(),
                        zeros: got.zeros[..1].to_vec(),
                        ..got.clone()
                    },
                    &to_f32(&x[..n]),
                    n,
                    symmetric(out),
                )
                .unwrap_or_else(|e| panic!("{e}"));
                for r in 1..rows {
                    assert!(
                        got.scales[r].is_nan(),
                        "n={n} {out:?} token {r}: scale {}",
                        got.scales[r]
                    );
                    assert!(got.codes[r * n..(r + 1) * n].iter().all(|&c| c == 0));
                }
            }
            let plan =
                HadamardPlan::new::<f16>(dev.props(), rows, n, HadamardOutput::Rotated).unwrap();
            let mut y = poisoned::<_, f16>(dev, rows * n).unwrap();
            hadamard_rotate(dev, &plan, &xd, &mut y).unwrap();
            let y = dev.download(&y).unwrap();
            assert!(y[..n].iter().all(|v| v.is_finite()));
            // Every output of a token with NaN or infinity is non-finite (inf − inf is NaN).
            assert!(y[n..].iter().all(|v| !v.is_finite()), "n={n}");
        }
    });
}

#[test]
fn hadamard_bad_input_is_a_typed_error() {
    fusekit::on_every_backend!("hadamard_bad_input_is_a_typed_error", |dev| {
        let int4 = HadamardOutput::Int4 { symmetric: false };
        let props = dev.props();
        // Sizes without a Hadamard matrix here, and size 0.
        for n in [0, 10, 14, 11008] {
            assert!(
                HadamardPlan::new::<bf16>(props, 1, n, int4).is_err(),
                "n={n}"
            );
        }
        // A token larger than shared memory.
        assert!(matches!(
            HadamardPlan::new::<bf16>(props, 1, 1 << 20, int4),
            Err(Error::Unsupported { .. })
        ));
        let plan = HadamardPlan::new::<bf16>(props, 2, 64, int4).unwrap();
        let rot = HadamardPlan::new::<bf16>(props, 2, 64, HadamardOutput::Rotated).unwrap();
        let x = dev.upload(&vec![bf16::ONE; 128]).unwrap();
        let xh = dev.upload(&vec![f16::ONE; 128]).unwrap();
        let short = dev.upload(&vec![bf16::ONE; 127]).unwrap();
        let mut q = QuantizedActivations::new(dev, &plan).unwrap();
        // Wrong type, wrong length, a rotation plan for codes, codes for another shape.
        assert!(matches!(
            hadamard_quantize(dev, &plan, &xh, &mut q),
            Err(Error::DType { .. })
        ));
        assert!(matches!(
            hadamard_quantize(dev, &plan, &short, &mut q),
            Err(Error::Shape { .. })
        ));
        assert!(QuantizedActivations::new(dev, &rot).is_err());
        assert!(hadamard_quantize(dev, &rot, &x, &mut q).is_err());
        let other = HadamardPlan::new::<bf16>(props, 3, 64, int4).unwrap();
        let mut q3 = QuantizedActivations::new(dev, &other).unwrap();
        assert!(matches!(
            hadamard_quantize(dev, &plan, &x, &mut q3),
            Err(Error::Shape { .. })
        ));
        let mut y = dev.alloc_zeros::<bf16>(128).unwrap();
        assert!(hadamard_rotate(dev, &plan, &x, &mut y).is_err());
        let mut y_short = dev.alloc_zeros::<bf16>(100).unwrap();
        assert!(matches!(
            hadamard_rotate(dev, &rot, &x, &mut y_short),
            Err(Error::Shape { .. })
        ));
        // No tokens: nothing launched, nothing written.
        let empty = HadamardPlan::new::<bf16>(props, 0, 64, int4).unwrap();
        let mut qe = QuantizedActivations::from_buffers(
            &empty,
            dev.upload(&[0xA5u8; 4]).unwrap(),
            dev.upload(&[f32::NAN; 1]).unwrap(),
            dev.upload(&[0xA5u8; 1]).unwrap(),
        )
        .unwrap();
        let none = dev.alloc_zeros::<bf16>(0).unwrap();
        hadamard_quantize(dev, &empty, &none, &mut qe).unwrap();
        assert!(empty.launches().is_empty());
        assert_eq!(dev.download(qe.codes()).unwrap(), vec![0xA5u8; 4]);
        assert!(dev.download(qe.scales()).unwrap()[0].is_nan());
        assert_eq!(dev.download(qe.zeros()).unwrap(), vec![0xA5u8]);
        // Sizes whose shared-memory arithmetic would overflow: an Err, not a panic.
        for n in [1usize << 40, 12 << 50] {
            assert!(
                HadamardPlan::new::<bf16>(props, 1, n, int4).is_err(),
                "n={n}"
            );
        }
    });
}

// ---- BiLLM 1-bit weights read from their packed bits (kernels/quant/billm.cu, issue 16) ----

/// A BiLLM weight with random bits and parameters, and `salient(b)` salient columns in block `b`
/// (clamped to the block): any count from 0 to all 128, which the quantiser (1 to 49) never gives.
fn billm_synthetic(
    rng: &mut Rng,
    n: usize,
    k: usize,
    salient: impl Fn(usize) -> usize,
) -> PackedBillm {
    let nb = k.div_ceil(BILLM_BLOCK);
    let mut cols = Vec::with_capacity(nb);
    let mut is_sal = vec![false; k];
    for b in 0..nb {
        let lo = b * BILLM_BLOCK;
        let len = BILLM_BLOCK.min(k - lo);
        let mut idx: Vec<usize> = (lo..lo + len).collect();
        for i in (1..idx.len()).rev() {
            idx.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut c: Vec<usize> = idx[..salient(b).min(len)].to_vec();
        c.sort_unstable();
        for &j in &c {
            is_sal[j] = true;
        }
        cols.push(c);
    }
    let f16r = |v: f64| f16::from_f64(v).to_f32();
    let mut q = BillmWeight {
        n,
        k,
        salient: cols,
        sign: (0..n * k).map(|_| rng.below(2) == 1).collect(),
        sign2: vec![false; n * k],
        sparse: vec![false; n * k],
        params: Vec::with_capacity(n * nb),
        break_point: vec![0.0; nb],
    };
    for i in 0..n * k {
        let bit = rng.below(2) == 1;
        if is_sal[i % k] {
            q.sign2[i] = bit;
        } else {
            q.sparse[i] = bit;
        }
    }
    for r in 0..n {
        let scale = 0.5 + (r % 5) as f64 * 0.5;
        for _ in 0..nb {
            let mut pair = |a: f64, m: f64| Binary {
                alpha: f16r(scale * a * (0.5 + rng.unit())),
                mu: f16r(scale * m * rng.normal()),
            };
            q.params.push([
                pair(0.08, 0.02),
                pair(0.03, 0.01),
                pair(0.01, 0.002),
                pair(0.04, 0.01),
            ]);
        }
    }
    PackedBillm::pack(&q).unwrap()
}

fn run_billm<B: Backend, T: W4Element>(
    dev: &B,
    p: &PackedBillm,
    x: &[T],
    m: usize,
    split: Option<usize>,
) -> Result<(Vec<T>, usize), Error> {
    let plan = BillmPlan::new::<T>(dev.props(), p, m, split)?;
    let w = BillmDeviceWeight::upload(dev, p)?;
    let mut ws = BillmWorkspace::new(dev, &plan)?;
    let xd = dev.upload(x)?;
    let mut y = poisoned::<B, T>(dev, m * p.n())?;
    billm_matmul(dev, &plan, &xd, &w, &mut ws, &mut y)?;
    Ok((dev.download(&y)?, plan.splits()))
}

/// One rounding of an fp32 result to T, plus fp32 accumulation: the kernel's sums are of activations
/// (times 2.0) over a block, then multiplied by the row-block's (α, μ) combinations, so the bound scales
/// with Σ_block Σ|x| · Σ|α, μ|, not with Σ|x·w|.
fn check_billm<T: W4Element>(
    what: &str,
    y: &[T],
    x: &[T],
    m: usize,
    p: &PackedBillm,
) -> Result<(), String> {
    let xf: Vec<f32> = x.iter().map(|v| v.to_f64() as f32).collect();
    let want = reference_billm(&xf, m, p).map_err(|e| e.to_string())?;
    let (n, k) = (p.n(), p.k());
    let nb = k.div_ceil(BILLM_BLOCK);
    let mut bound = vec![0.0f64; m * n];
    for r in 0..m {
        let xb: Vec<f64> = (0..nb)
            .map(|b| {
                (b * BILLM_BLOCK..((b + 1) * BILLM_BLOCK).min(k))
                    .map(|j| (xf[r * k + j] as f64).abs())
                    .sum()
            })
            .collect();
        for c in 0..n {
            bound[r * n + c] = 1e-5
                * (0..nb)
                    .map(|b| {
                        let pb = &p.params[(b * n + c) * 8..(b * n + c + 1) * 8];
                        xb[b]
                            * pb.iter()
                                .map(|&h| f16::from_bits(h).to_f64().abs())
                                .sum::<f64>()
                    })
                    .sum::<f64>();
        }
    }
    check_output(what, y, &want, n, &bound)
}

#[test]
fn billm_matches_the_reference() {
    fusekit::on_every_backend!("billm_matches_the_reference", |dev| {
        billm_matches_the_reference_on::<_, bf16>(dev);
        billm_matches_the_reference_on::<_, f16>(dev);
    });
}

fn billm_matches_the_reference_on<B: Backend, T: W4Element>(dev: &B) {
    let mut rng = Rng::new(seed_for("billm_matches_the_reference"));
    // (m, n, k): M = 1, 3, 4, 5, 8, 9, 16, 17, 33 and 64 (every token-group kernel, partial groups, more
    // than one tile along z); K = 1, not a multiple of 128, of 32 or of 2; N tails (65, 72, 100, 130).
    let mut shapes = vec![
        (1, 64, 128),
        (3, 100, 200),
        (4, 72, 384),
        (5, 130, 100),
        (8, 64, 257),
        (9, 72, 300),
        (16, 65, 1),
        (17, 64, 136),
        (33, 40, 640),
        (64, 100, 130),
    ];
    if dev.kind() == "gpu" || emu_large() {
        shapes.extend([(1, 4096, 4096), (64, 1000, 1536)]);
    }
    for (case, (m, n, k)) in shapes.into_iter().enumerate() {
        // Salient columns per block: none, all, the quantiser's range, cycling by block and case.
        let p = billm_synthetic(&mut rng, n, k, |b| match (b + case) % 4 {
            0 => 0,
            1 => BILLM_BLOCK,
            2 => 49,
            _ => 1 + (b * 7 + case * 3) % 48,
        });
        let x = activations::<T>(&mut rng, m, k);
        let split = [Some(1), Some(2), None][case % 3];
        let (y, splits) = run_billm(dev, &p, &x, m, split).unwrap();
        let what = format!("{} m={m} n={n} k={k} splits={splits}", T::NAME);
        check_billm(&what, &y, &x, m, &p).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn billm_quantised_layer_matches_the_reference() {
    fusekit::on_every_backend!("billm_quantised_layer_matches_the_reference", |dev| {
        // A weight from the quantiser itself (salient columns 1 to 49 per block, the searched break
        // point), calibrated on heavy-tailed activations with outlier channels.
        let mut rng = Rng::new(seed_for("billm_quantised_layer_matches_the_reference"));
        let (n, k) = (96, 384);
        let w = weights(&mut rng, n, k);
        let mut cal: Vec<f32> = rng
            .sample(
                Dist::HeavyTail {
                    nu: 4.0,
                    scale: 1.0,
                },
                256 * k,
            )
            .into_iter()
            .map(|v| v as f32)
            .collect();
        for row in cal.chunks_exact_mut(k) {
            row[17] *= 30.0;
            row[300] *= 12.0;
        }
        let mut h = Hessian::new(k).unwrap();
        h.add(&cal).unwrap();
        let p = PackedBillm::pack(&quantize_billm(&w, n, k, &h, &BillmConfig::default()).unwrap())
            .unwrap();
        for m in [1, 7, 16] {
            let x = activations::<bf16>(&mut rng, m, k);
            let (y, splits) = run_billm(dev, &p, &x, m, None).unwrap();
            check_billm(&format!("quantised m={m} splits={splits}"), &y, &x, m, &p)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    });
}

#[test]
fn billm_split_k_is_deterministic_and_unaligned_x_works() {
    fusekit::on_every_backend!(
        "billm_split_k_is_deterministic_and_unaligned_x_works",
        |dev| {
            let mut rng = Rng::new(seed_for(
                "billm_split_k_is_deterministic_and_unaligned_x_works",
            ));
            let (m, n, k) = (3, 64, 600); // 5 blocks
            let p = billm_synthetic(&mut rng, n, k, |b| 10 * b);
            let x = activations::<f16>(&mut rng, m, k);
            // 5 blocks shared out as whole blocks per split: 1, 3+2, 2+2+1, 2+2+1, 1 x 5, 1 x 5.
            for (split, want) in [(1, 1), (2, 2), (3, 3), (4, 3), (5, 5), (6, 5)] {
                let (a, s) = run_billm(dev, &p, &x, m, Some(split)).unwrap();
                assert_eq!(s, want, "{split} splits asked");
                check_billm(&format!("splits={s}"), &a, &x, m, &p)
                    .unwrap_or_else(|e| panic!("{e}"));
                let (b, _) = run_billm(dev, &p, &x, m, Some(split)).unwrap();
                assert!(
                    a.iter().zip(&b).all(|(u, v)| u.to_bits() == v.to_bits()),
                    "split {split}: two runs differ"
                );
            }
            // x one element into a buffer: rows 2-byte aligned only.
            let plan = BillmPlan::new::<f16>(dev.props(), &p, m, None).unwrap();
            let wd = BillmDeviceWeight::upload(dev, &p).unwrap();
            let mut ws = BillmWorkspace::new(dev, &plan).unwrap();
            let mut host = vec![f16::ZERO; m * k + 1];
            host[1..].copy_from_slice(&x);
            let buf = dev.upload(&host).unwrap();
            let view = dev.view(&buf, 1..m * k + 1).unwrap();
            let mut y = poisoned::<_, f16>(dev, m * n).unwrap();
            billm_matmul(dev, &plan, &view, &wd, &mut ws, &mut y).unwrap();
            check_billm("unaligned x", &dev.download(&y).unwrap(), &x, m, &p)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    );
}

/// One workspace serves every split-K product, W4A16 and BiLLM alike, any number of times in any
/// order of plans: each launch's last block per tile leaves the tile's arrival counter at 0, so a
/// counter left behind would make a later product skip (or repeat) its sum and leave poison in y.
/// And a workspace with the partials' room but too few counters is refused.
#[test]
fn split_k_workspace_is_reused_across_plans_and_products() {
    fusekit::on_every_backend!(
        "split_k_workspace_is_reused_across_plans_and_products",
        |dev| {
            let mut rng = Rng::new(seed_for(
                "split_k_workspace_is_reused_across_plans_and_products",
            ));
            let (n, k) = (200, 1000); // 4 W4A16 column blocks, 8 slabs; 4 BiLLM row blocks, 8 blocks
            let w4 = PackedW4::pack(
                &quantize_rtn(
                    &weights(&mut rng, n, k),
                    n,
                    k,
                    &scheme::<bf16>(Some(128), false),
                )
                .unwrap(),
            )
            .unwrap();
            let bl = billm_synthetic(&mut rng, n, k, |b| 7 * b);
            let w4d = W4A16Weight::upload(dev, &w4).unwrap();
            let bld = BillmDeviceWeight::upload(dev, &bl).unwrap();
            // Sized for the largest plan below (m = 40, 8 splits: 5 BiLLM token tiles x 4 row blocks).
            let big = BillmPlan::new::<bf16>(dev.props(), &bl, 40, Some(8)).unwrap();
            let big_w4 = W4A16Plan::new::<bf16>(dev.props(), &w4, 40, Some(8)).unwrap();
            assert!(big.workspace_counters() >= big_w4.workspace_counters());
            let mut ws = SplitKWorkspace::new(dev, &big).unwrap();
            for (round, &(m, split)) in [(40, 8), (1, 8), (17, 3), (40, 8), (5, 2), (1, 1), (33, 8)]
                .iter()
                .enumerate()
            {
                let x = activations::<bf16>(&mut rng, m, k);
                let xd = dev.upload(&x).unwrap();
                let plan = W4A16Plan::new::<bf16>(dev.props(), &w4, m, Some(split)).unwrap();
                let mut y = poisoned::<_, bf16>(dev, m * n).unwrap();
                w4a16(dev, &plan, &xd, &w4d, &mut ws, &mut y).unwrap();
                check(
                    &format!("round {round}: w4a16 m={m}, {split} splits"),
                    &dev.download(&y).unwrap(),
                    &x,
                    m,
                    &w4,
                )
                .unwrap_or_else(|e| panic!("{e}"));
                let plan = BillmPlan::new::<bf16>(dev.props(), &bl, m, Some(split)).unwrap();
                let mut y = poisoned::<_, bf16>(dev, m * n).unwrap();
                billm_matmul(dev, &plan, &xd, &bld, &mut ws, &mut y).unwrap();
                check_billm(
                    &format!("round {round}: billm m={m}, {split} splits"),
                    &dev.download(&y).unwrap(),
                    &x,
                    m,
                    &bl,
                )
                .unwrap_or_else(|e| panic!("{e}"));
            }
            // A workspace with room for the partials of a 64 x 64 output over 8 splits but one counter
            // (one tile): m = 1 over 8 splits of the 200 columns needs fewer partials but 4 counters
            // (one per 64-column block), and is refused before anything runs.
            let narrow = PackedW4::pack(
                &quantize_rtn(
                    &weights(&mut rng, 64, k),
                    64,
                    k,
                    &scheme::<bf16>(Some(128), false),
                )
                .unwrap(),
            )
            .unwrap();
            let wide = W4A16Plan::new::<bf16>(dev.props(), &narrow, 64, Some(8)).unwrap();
            let one = W4A16Plan::new::<bf16>(dev.props(), &w4, 1, Some(8)).unwrap();
            assert!(wide.workspace_elements() >= one.workspace_elements());
            assert_eq!(
                (wide.workspace_counters(), one.workspace_counters()),
                (1, 4)
            );
            let mut ws1 = SplitKWorkspace::new(dev, &wide).unwrap();
            let x = dev.upload(&activations::<bf16>(&mut rng, 1, k)).unwrap();
            let mut y = poisoned::<_, bf16>(dev, n).unwrap();
            let e = w4a16(dev, &one, &x, &w4d, &mut ws1, &mut y).unwrap_err();
            assert!(format!("{e}").contains("workspace_counters"), "{e}");
            assert!(
                dev.download(&y).unwrap().iter().all(|v| v.is_nan()),
                "nothing written"
            );
        }
    );
}

#[test]
fn billm_non_finite_activations_give_non_finite_outputs() {
    fusekit::on_every_backend!(
        "billm_non_finite_activations_give_non_finite_outputs",
        |dev| {
            let mut rng = Rng::new(seed_for(
                "billm_non_finite_activations_give_non_finite_outputs",
            ));
            let (m, n, k) = (6, 72, 300);
            let p = billm_synthetic(&mut rng, n, k, |b| [5, 0, 128][b]);
            let mut x = activations::<bf16>(&mut rng, m, k);
            x[2 * k + 37] = bf16::NAN; // token 2
            x[3 * k + 140] = bf16::INFINITY; // token 3
            x[4 * k + 299] = bf16::NEG_INFINITY; // token 4, the last column
            for split in [Some(1), Some(3)] {
                let (y, _) = run_billm(dev, &p, &x, m, split).unwrap();
                for r in 0..m {
                    for c in 0..n {
                        let v = y[r * n + c];
                        assert!(!v.is_poison(), "y[{r}][{c}] not written");
                        let bad = (2..=4).contains(&r);
                        assert_eq!(v.to_f64().is_finite(), !bad, "y[{r}][{c}] = {}", v.to_f64());
                    }
                }
            }
        }
    );
}

/// The unpack into a whole buffer (16-byte stores where k % 8 == 0) and into a view one element in
/// (rows 2-byte aligned only: element stores), each bit for bit against `want` rounded to T.
fn unpack_matches<B: Backend, T: W4Element>(
    dev: &B,
    wd: &BillmDeviceWeight<B>,
    want: &[f32],
    n: usize,
    k: usize,
) {
    let mut buf = poisoned::<_, T>(dev, n * k + 1).unwrap();
    for offset in [0, 1] {
        {
            let mut view = dev.view_mut(&mut buf, offset..offset + n * k).unwrap();
            billm_unpack(dev, wd, &mut view).unwrap();
        }
        let all = dev.download(&buf).unwrap();
        if offset == 0 {
            assert!(all[n * k].is_poison(), "the unpack wrote past its buffer");
        }
        let got = &all[offset..offset + n * k];
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(
                g.to_f64().to_bits(),
                T::from_f64(*w as f64).to_f64().to_bits(),
                "{} n={n} k={k} offset={offset}: w[{}][{}]",
                T::NAME,
                i / k,
                i % k
            );
        }
    }
}

#[test]
fn billm_unpack_is_exact() {
    fusekit::on_every_backend!("billm_unpack_is_exact", |dev| {
        let mut rng = Rng::new(seed_for("billm_unpack_is_exact"));
        for (n, k) in [(1, 1), (3, 100), (17, 128), (9, 300), (64, 641), (5, 392)] {
            let p = billm_synthetic(&mut rng, n, k, |b| [0, 128, 49, 7, 100, 1][b % 6]);
            let wd = BillmDeviceWeight::upload(dev, &p).unwrap();
            let want = p.dequantize();
            unpack_matches::<_, bf16>(dev, &wd, &want, n, k);
            unpack_matches::<_, f16>(dev, &wd, &want, n, k);
        }
    });
}

#[test]
fn billm_dense_path_matches_the_reference() {
    fusekit::on_every_backend!("billm_dense_path_matches_the_reference", |dev| {
        // Large M: unpack once, then the GEMM (cuBLAS on a GPU, the host on the emulator), against
        // x · bf16(Ŵ)ᵀ in f64 (the weights it multiplies by).
        let mut rng = Rng::new(seed_for("billm_dense_path_matches_the_reference"));
        let (n, k) = (72, 300);
        let p = billm_synthetic(&mut rng, n, k, |b| [3, 128, 0][b]);
        let dense = BillmDense::new(dev, &BillmDeviceWeight::upload(dev, &p).unwrap()).unwrap();
        let wd: Vec<f64> = p
            .dequantize()
            .iter()
            .map(|&v| bf16::from_f32(v).to_f64())
            .collect();
        assert_eq!(
            dev.download(dense.weight()).unwrap(),
            wd.iter().map(|&v| bf16::from_f64(v)).collect::<Vec<_>>()
        );
        for m in [1, 65, 130] {
            let x = activations::<bf16>(&mut rng, m, k);
            let xd = dev.upload(&x).unwrap();
            let mut y = poisoned::<_, bf16>(dev, m * n).unwrap();
            dense.matmul(dev, m, &xd, &mut y).unwrap();
            let mut want = vec![0.0f64; m * n];
            let mut bound = vec![0.0f64; m * n];
            for r in 0..m {
                for c in 0..n {
                    for j in 0..k {
                        let t = x[r * k + j].to_f64() * wd[c * k + j];
                        want[r * n + c] += t;
                        bound[r * n + c] += 1e-6 * t.abs();
                    }
                }
            }
            check_output(
                &format!("dense m={m}"),
                &dev.download(&y).unwrap(),
                &want,
                n,
                &bound,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        // Wrong lengths: refused, nothing written.
        let x = dev.upload(&activations::<bf16>(&mut rng, 3, k)).unwrap();
        let mut y = poisoned::<_, bf16>(dev, 3 * n - 1).unwrap();
        assert!(matches!(
            dense.matmul(dev, 3, &x, &mut y),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            dense.matmul(dev, 4, &x, &mut y),
            Err(Error::Shape { .. })
        ));
        assert!(dev.download(&y).unwrap().iter().all(|v| v.is_poison()));
    });
}

#[test]
fn billm_bad_input_is_a_typed_error() {
    fusekit::on_every_backend!("billm_bad_input_is_a_typed_error", |dev| {
        let mut rng = Rng::new(seed_for("billm_bad_input_is_a_typed_error"));
        let (m, n, k) = (2, 64, 200);
        let p = billm_synthetic(&mut rng, n, k, |_| 9);
        // Buffers that do not match the header, bits in the padding, a negative or NaN scale: refused
        // at upload (the kernel would read past them or multiply by them).
        let mut bad = p.clone();
        bad.signs.pop();
        assert!(matches!(
            BillmDeviceWeight::upload(dev, &bad),
            Err(Error::Shape { .. })
        ));
        let mut bad = p.clone();
        bad.salient.truncate(4);
        assert!(matches!(
            BillmDeviceWeight::upload(dev, &bad),
            Err(Error::Shape { .. })
        ));
        let mut bad = p.clone();
        bad.second[(n + 5) * 4 + 3] |= 1 << 31; // block 1, row 5, column 255: padding (k = 200)
        assert!(matches!(
            BillmDeviceWeight::upload(dev, &bad),
            Err(Error::InvalidArgument { .. })
        ));
        for v in [f16::NAN, f16::INFINITY, f16::from_f32(-0.5)] {
            let mut bad = p.clone();
            bad.params[8 * 7] = v.to_bits(); // block 0, row 7, α₁
            assert!(matches!(
                BillmDeviceWeight::upload(dev, &bad),
                Err(Error::InvalidArgument { .. })
            ));
        }
        // Plans: a pre-Ampere GPU, 0 splits, too many rows.
        let mut turing: DeviceProps = dev.props().clone();
        turing.compute_capability = (7, 5);
        assert!(matches!(
            BillmPlan::new::<bf16>(&turing, &p, m, None),
            Err(Error::Unsupported { .. })
        ));
        assert!(BillmPlan::new::<bf16>(dev.props(), &p, m, Some(0)).is_err());
        assert!(matches!(
            BillmPlan::new::<bf16>(dev.props(), &p, 65535 * 16 + 1, None),
            Err(Error::Unsupported { .. })
        ));
        // Launch: another dtype than the plan's, wrong lengths, a weight of another shape, a too-small
        // workspace; nothing written.
        let plan = BillmPlan::new::<bf16>(dev.props(), &p, m, Some(1)).unwrap();
        let wd = BillmDeviceWeight::upload(dev, &p).unwrap();
        let mut ws = BillmWorkspace::new(dev, &plan).unwrap();
        let x = dev.upload(&activations::<bf16>(&mut rng, m, k)).unwrap();
        let xh = dev.upload(&activations::<f16>(&mut rng, m, k)).unwrap();
        let short = dev
            .upload(&activations::<bf16>(&mut rng, m, k - 1))
            .unwrap();
        let mut y = poisoned::<_, bf16>(dev, m * n).unwrap();
        let mut yh = poisoned::<_, f16>(dev, m * n).unwrap();
        let mut y_short = poisoned::<_, bf16>(dev, m * n - 1).unwrap();
        assert!(matches!(
            billm_matmul(dev, &plan, &xh, &wd, &mut ws, &mut yh),
            Err(Error::DType { .. })
        ));
        assert!(matches!(
            billm_matmul(dev, &plan, &short, &wd, &mut ws, &mut y),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            billm_matmul(dev, &plan, &x, &wd, &mut ws, &mut y_short),
            Err(Error::Shape { .. })
        ));
        let p2 = billm_synthetic(&mut rng, n, 2 * k, |_| 3);
        let wd2 = BillmDeviceWeight::upload(dev, &p2).unwrap();
        assert!(matches!(
            billm_matmul(dev, &plan, &x, &wd2, &mut ws, &mut y),
            Err(Error::Shape { .. })
        ));
        let plan2 = BillmPlan::new::<bf16>(dev.props(), &p2, m, Some(2)).unwrap();
        let x2 = dev
            .upload(&activations::<bf16>(&mut rng, m, 2 * k))
            .unwrap();
        assert!(matches!(
            billm_matmul(dev, &plan2, &x2, &wd2, &mut ws, &mut y),
            Err(Error::Shape { .. })
        ));
        assert!(
            dev.download(&y).unwrap().iter().all(|v| v.is_poison()),
            "a refused launch wrote y"
        );
        assert!(dev.download(&yh).unwrap().iter().all(|v| v.is_poison()));
        // The unpack: a dense buffer of the wrong length.
        let mut dense = poisoned::<_, bf16>(dev, n * k - 1).unwrap();
        assert!(matches!(
            billm_unpack(dev, &wd, &mut dense),
            Err(Error::Shape { .. })
        ));
        assert!(dev.download(&dense).unwrap().iter().all(|v| v.is_poison()));
        // m = 0 launches nothing and is fine.
        let plan0 = BillmPlan::new::<bf16>(dev.props(), &p, 0, None).unwrap();
        let empty = dev.alloc_zeros::<bf16>(0).unwrap();
        let mut y0 = dev.alloc_zeros::<bf16>(0).unwrap();
        billm_matmul(dev, &plan0, &empty, &wd, &mut ws, &mut y0).unwrap();
    });
}

// ---- W4A4 ----

/// A per-channel symmetric int4 weight for the W4A4 kernel, scales in `fmt`.
fn w4a4_weight(rng: &mut Rng, n: usize, k: usize, fmt: ScaleFormat) -> PackedW4A4 {
    let s = WeightQuant {
        mse_clip: false,
        scale_format: fmt,
        ..WeightQuant::int4(None, true)
    };
    PackedW4A4::pack(&quantize_rtn(&weights(rng, n, k), n, k, &s).unwrap()).unwrap()
}

/// `m` heavy-tailed tokens quantised to int4 on the host.
fn int4_tokens(rng: &mut Rng, m: usize, k: usize, symmetric: bool) -> QuantizedTokens {
    let x: Vec<f32> = activations::<bf16>(rng, m, k)
        .iter()
        .map(|v| v.to_f32())
        .collect();
    quantize_tokens(&x, k, 4, symmetric).unwrap()
}

/// `props` with another compute capability (the plan picks the W4A4 path from it; the emulator runs both).
fn with_cc(props: &DeviceProps, cc: (u32, u32)) -> DeviceProps {
    let mut p = props.clone();
    p.compute_capability = cc;
    p
}

fn run_w4a4<B: Backend, T: W4Element>(
    dev: &B,
    props: &DeviceProps,
    p: &PackedW4A4,
    t: &QuantizedTokens,
    split: Option<usize>,
) -> Result<(Vec<T>, W4A4Plan), Error> {
    let m = t.scales.len();
    let plan = W4A4Plan::new::<T>(props, p, m, split)?;
    let xq = QuantizedActivations::upload(dev, t)?;
    let w = W4A4Weight::upload(dev, p)?;
    let mut ws = SplitKWorkspace::new(dev, &plan)?;
    let mut y = poisoned::<B, T>(dev, m * p.n())?;
    w4a4(dev, &plan, &xq, &w, &mut ws, &mut y)?;
    Ok((dev.download(&y)?, plan))
}

/// The integer sums are exact: the kernel's only errors are two f32 roundings (2^-23 relative) and the
/// rounding to T, so the slack beyond T's half-ulp is |reference| · 2^-22.
fn check_w4a4<T: W4Element>(
    what: &str,
    y: &[T],
    t: &QuantizedTokens,
    p: &PackedW4A4,
) -> Result<(), String> {
    let want = reference_w4a4(t, p).map_err(|e| e.to_string())?;
    let bound: Vec<f64> = want.iter().map(|w| w.abs() * 2f64.powi(-22)).collect();
    check_output(what, y, &want, p.n(), &bound)
}

#[test]
fn w4a4_matches_the_reference() {
    fusekit::on_every_backend!("w4a4_matches_the_reference", |dev| {
        w4a4_matches_the_reference_on::<_, bf16>(dev);
        w4a4_matches_the_reference_on::<_, f16>(dev);
    });
}

fn w4a4_matches_the_reference_on<B: Backend, T: W4Element>(dev: &B) {
    let mut rng = Rng::new(seed_for(&format!("w4a4_matches_the_reference_{}", T::NAME)));
    // (m, n, k): one token, tails of N (1, 70, 130, 200), K not a multiple of the 128-deep chunk
    // (8, 200, 1000), both tile heights (16, 64) and several token tiles.
    for (i, &(m, n, k)) in [
        (1, 64, 128),
        (3, 70, 200),
        (17, 1, 8),
        (33, 130, 1000),
        (70, 200, 384),
    ]
    .iter()
    .enumerate()
    {
        let p = w4a4_weight(&mut rng, n, k, T::SCALES);
        let t = int4_tokens(&mut rng, m, k, i % 2 == 0);
        let mut first: Option<Vec<T>> = None;
        for cc in [(8, 0), (8, 9), (9, 0)] {
            for split in [None, Some(1), Some(2), Some(5)] {
                let props = with_cc(dev.props(), cc);
                let (y, plan) = run_w4a4::<B, T>(dev, &props, &p, &t, split).unwrap();
                let what = format!(
                    "{} m={m} n={n} k={k} {:?} {} splits",
                    T::NAME,
                    plan.path(),
                    plan.splits()
                );
                check_w4a4(&what, &y, &t, &p).unwrap_or_else(|e| panic!("{e}"));
                // Exact integer sums: every path and split gives the same bits.
                match &first {
                    None => first = Some(y),
                    Some(f) => assert!(
                        f.iter()
                            .zip(&y)
                            .all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits()),
                        "{what}: differs from the first path and split"
                    ),
                }
            }
        }
    }
}

/// The pipeline W4A4 exists for: activations with a massive channel rotated and quantised to int4 by the
/// online Hadamard kernel, times a weight rotated the same way (W·H) and quantised per channel; the
/// kernel's output is the exact product of what it was given, and close to the float product.
#[test]
fn w4a4_after_the_online_hadamard() {
    fusekit::on_every_backend!("w4a4_after_the_online_hadamard", |dev| {
        let mut rng = Rng::new(seed_for("w4a4_after_the_online_hadamard"));
        let (m, n, k) = (5, 96, 576); // SmolLM2's hidden size, 36 · 16
        let mut x: Vec<f32> = activations::<bf16>(&mut rng, m, k)
            .iter()
            .map(|v| v.to_f32())
            .collect();
        for r in 0..m {
            x[r * k + 17] = 400.0 * if r % 2 == 0 { 1.0 } else { -1.0 }; // a massive activation
        }
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let w = weights(&mut rng, n, k);
        let mut wr: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        fusekit::quant::hadamard::rotate_rows(&mut wr, k).unwrap();
        let wr: Vec<f32> = wr.iter().map(|&v| v as f32).collect();
        let s = WeightQuant {
            mse_clip: true,
            ..WeightQuant::int4(None, true)
        };
        let p = PackedW4A4::pack(&quantize_rtn(&wr, n, k, &s).unwrap()).unwrap();

        let hplan =
            HadamardPlan::new::<bf16>(dev.props(), m, k, HadamardOutput::Int4 { symmetric: false })
                .unwrap();
        let mut xq = QuantizedActivations::new(dev, &hplan).unwrap();
        let xd = dev.upload(&xb).unwrap();
        hadamard_quantize(dev, &hplan, &xd, &mut xq).unwrap();
        let plan = W4A4Plan::new::<bf16>(dev.props(), &p, m, None).unwrap();
        let wd = W4A4Weight::upload(dev, &p).unwrap();
        let mut ws = SplitKWorkspace::new(dev, &plan).unwrap();
        let mut y = poisoned::<_, bf16>(dev, m * n).unwrap();
        w4a4(dev, &plan, &xq, &wd, &mut ws, &mut y).unwrap();
        let y = dev.download(&y).unwrap();
        let t = xq.download(dev).unwrap();
        check_w4a4("after the Hadamard", &y, &t, &p).unwrap_or_else(|e| panic!("{e}"));
        // Against the float product x·Wᵀ (= (x·H)·(W·H)ᵀ): W4A4's quantisation error, not a wrong answer.
        let exact: Vec<f64> = (0..m * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                (0..k)
                    .map(|j| xb[r * k + j].to_f64() * w[c * k + j] as f64)
                    .sum()
            })
            .collect();
        let num: f64 = y
            .iter()
            .zip(&exact)
            .map(|(a, b)| (a.to_f64() - b).powi(2))
            .sum();
        let den: f64 = exact.iter().map(|b| b * b).sum();
        let rel = (num / den).sqrt();
        println!("W4A4 after the Hadamard: relative error against the float product {rel:.4}");
        assert!(rel < 0.25, "relative error {rel}");
    });
}

#[test]
fn w4a4_non_finite_tokens_give_nan_rows() {
    fusekit::on_every_backend!("w4a4_non_finite_tokens_give_nan_rows", |dev| {
        let mut rng = Rng::new(seed_for("w4a4_non_finite_tokens_give_nan_rows"));
        let (m, n, k) = (4, 72, 256);
        let p = w4a4_weight(&mut rng, n, k, ScaleFormat::Bf16);
        let mut t = int4_tokens(&mut rng, m, k, false);
        // The Hadamard kernel marks a token that held NaN or infinity with a NaN scale and codes 0.
        t.scales[2] = f32::NAN;
        t.codes[2 * k..3 * k].iter_mut().for_each(|c| *c = 0);
        for split in [Some(1), Some(2)] {
            let (y, _) = run_w4a4::<_, bf16>(dev, dev.props(), &p, &t, split).unwrap();
            for r in 0..m {
                let row = &y[r * n..(r + 1) * n];
                if r == 2 {
                    assert!(row.iter().all(|v| v.is_nan()), "token 2 must be NaN");
                } else {
                    assert!(
                        row.iter().all(|v| v.is_finite()),
                        "token {r} must be finite"
                    );
                }
            }
            let keep: Vec<usize> = (0..m).filter(|&r| r != 2).collect();
            let sub = QuantizedTokens {
                k,
                bits: 4,
                codes: keep
                    .iter()
                    .flat_map(|&r| t.codes[r * k..(r + 1) * k].to_vec())
                    .collect(),
                scales: keep.iter().map(|&r| t.scales[r]).collect(),
                zeros: keep.iter().map(|&r| t.zeros[r]).collect(),
            };
            let ys: Vec<bf16> = keep
                .iter()
                .flat_map(|&r| y[r * n..(r + 1) * n].to_vec())
                .collect();
            check_w4a4("finite tokens", &ys, &sub, &p).unwrap_or_else(|e| panic!("{e}"));
        }
    });
}

#[test]
fn w4a4_bad_input_is_a_typed_error() {
    fusekit::on_every_backend!("w4a4_bad_input_is_a_typed_error", |dev| {
        let mut rng = Rng::new(seed_for("w4a4_bad_input_is_a_typed_error"));
        let (m, n, k) = (3, 64, 256);
        let p = w4a4_weight(&mut rng, n, k, ScaleFormat::Bf16);
        let t = int4_tokens(&mut rng, m, k, true);
        let props = dev.props();
        let unsupported = |e: Error| assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        // Weights: grouped, asymmetric, 8-bit, NaN scales.
        let w = weights(&mut rng, n, k);
        for s in [
            WeightQuant::int4(Some(128), true),
            WeightQuant::int4(None, false),
            WeightQuant {
                bits: 8,
                ..WeightQuant::int4(None, true)
            },
        ] {
            unsupported(PackedW4A4::pack(&quantize_rtn(&w, n, k, &s).unwrap()).unwrap_err());
        }
        let mut q = quantize_rtn(&w, n, k, &WeightQuant::int4(None, true)).unwrap();
        q.scales[5] = f32::NAN;
        assert!(PackedW4A4::pack(&q).is_err());
        q.scales[5] = 1.0;
        q.codes.pop();
        assert!(PackedW4A4::pack(&q).is_err());
        // Plans: an old GPU, k not a multiple of 8, k beyond the limit, zero splits.
        unsupported(W4A4Plan::new::<bf16>(&with_cc(props, (7, 5)), &p, m, None).unwrap_err());
        let odd = w4a4_weight(&mut rng, 2, 100, ScaleFormat::Bf16);
        unsupported(W4A4Plan::new::<bf16>(props, &odd, m, None).unwrap_err());
        // k beyond W4A4_MAX_K: refused by the packer (its column sums and the sm_90 sums are int32).
        unsupported(
            PackedW4A4::pack(
                &quantize_rtn(
                    &vec![0.5; W4A4_MAX_K + 8],
                    1,
                    W4A4_MAX_K + 8,
                    &WeightQuant::int4(None, true),
                )
                .unwrap(),
            )
            .unwrap_err(),
        );
        assert!(W4A4Plan::new::<bf16>(props, &p, m, Some(0)).is_err());
        // Launches: each refused before anything is written.
        let plan = W4A4Plan::new::<bf16>(props, &p, m, Some(2)).unwrap();
        let wd = W4A4Weight::upload(dev, &p).unwrap();
        let xq = QuantizedActivations::upload(dev, &t).unwrap();
        let mut ws = SplitKWorkspace::new(dev, &plan).unwrap();
        let mut y = poisoned::<_, bf16>(dev, m * n).unwrap();
        // int8 activations
        let t8 = quantize_tokens(&vec![0.25f32; m * k], k, 8, true).unwrap();
        let x8 = QuantizedActivations::upload(dev, &t8).unwrap();
        assert!(matches!(
            w4a4(dev, &plan, &x8, &wd, &mut ws, &mut y),
            Err(Error::DType { .. })
        ));
        // tokens that are not the plan's
        let t4 = int4_tokens(&mut rng, m + 1, k, true);
        let x4 = QuantizedActivations::upload(dev, &t4).unwrap();
        assert!(matches!(
            w4a4(dev, &plan, &x4, &wd, &mut ws, &mut y),
            Err(Error::Shape { .. })
        ));
        // another weight
        let other =
            W4A4Weight::upload(dev, &w4a4_weight(&mut rng, n + 1, k, ScaleFormat::Bf16)).unwrap();
        assert!(matches!(
            w4a4(dev, &plan, &xq, &other, &mut ws, &mut y),
            Err(Error::Shape { .. })
        ));
        // y of the wrong length and of the wrong type
        let mut short = poisoned::<_, bf16>(dev, m * n - 1).unwrap();
        assert!(w4a4(dev, &plan, &xq, &wd, &mut ws, &mut short).is_err());
        let mut yf = poisoned::<_, f16>(dev, m * n).unwrap();
        assert!(matches!(
            w4a4(dev, &plan, &xq, &wd, &mut ws, &mut yf),
            Err(Error::DType { .. })
        ));
        // a workspace for one split
        let one = W4A4Plan::new::<bf16>(props, &p, m, Some(1)).unwrap();
        let mut small = SplitKWorkspace::new(dev, &one).unwrap();
        assert!(w4a4(dev, &plan, &xq, &wd, &mut small, &mut y).is_err());
        assert!(
            dev.download(&y).unwrap().iter().all(|v| v.is_nan()),
            "a refused launch wrote y"
        );
        // Host tokens with codes beyond 4 bits are refused at upload.
        let mut bad = t.clone();
        bad.codes[3] = 16;
        assert!(QuantizedActivations::upload(dev, &bad).is_err());
        // No tokens: a valid (empty) upload and a plan that launches nothing.
        let empty = QuantizedTokens {
            k,
            bits: 4,
            codes: vec![],
            scales: vec![],
            zeros: vec![],
        };
        assert_eq!(QuantizedActivations::upload(dev, &empty).unwrap().rows(), 0);
        assert!(W4A4Plan::new::<bf16>(props, &p, 0, None)
            .unwrap()
            .launches()
            .is_empty());
        // And the good launch works.
        w4a4(dev, &plan, &xq, &wd, &mut ws, &mut y).unwrap();
        check_w4a4("after the refusals", &dev.download(&y).unwrap(), &t, &p)
            .unwrap_or_else(|e| panic!("{e}"));
    });
}
