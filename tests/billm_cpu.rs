//! BiLLM's 1-bit quantiser (issue 16, item 1) on the CPU: against the plain 1-bit baseline by output
//! error (2/3-bit RTN printed beside it) on correlated activations with an outlier channel, the structure of what it
//! stores (salient columns, sign bits, groups, f16 parameters), determinism, blocks with no and with
//! the most salient columns, K not a multiple of the block, dead channels and bad input. Seeded, seeds
//! printed.

use fusekit::quant::{
    binarize_sign_mean, quantize_billm, quantize_rtn, relative_output_error, BillmConfig,
    BillmWeight, Hessian, PackedBillm, WeightQuant, BILLM_BLOCK,
};
use fusekit::testing::{seed_for, Dist, Rng};
use fusekit::Error;

/// Activations with a shared low-rank part and one outlier channel (as real layer inputs).
fn activations(rng: &mut Rng, rows: usize, k: usize) -> Vec<f32> {
    let base: Vec<f64> = rng.sample(
        Dist::Normal {
            mean: 0.0,
            std: 1.0,
        },
        rows * 4,
    );
    let noise = rng.sample(
        Dist::Normal {
            mean: 0.0,
            std: 0.3,
        },
        rows * k,
    );
    (0..rows * k)
        .map(|i| {
            let (r, c) = (i / k, i % k);
            let shared: f64 = (0..4)
                .map(|t| base[r * 4 + t] * (((c * 7 + t * 13) % 11) as f64 / 5.0 - 1.0))
                .sum();
            let v = shared + noise[i];
            (if c == 5 { 12.0 * v } else { v }) as f32
        })
        .collect()
}

/// Weights: heavy-tailed, a few columns much larger (salient input channels).
fn weights(rng: &mut Rng, n: usize, k: usize) -> Vec<f32> {
    let mut w: Vec<f32> = rng
        .sample(
            Dist::HeavyTail {
                nu: 5.0,
                scale: 0.02,
            },
            n * k,
        )
        .into_iter()
        .map(|v| v as f32)
        .collect();
    for r in 0..n {
        for c in (3..k).step_by(61) {
            w[r * k + c] *= 8.0;
        }
    }
    w
}

fn hessian(x: &[f32], k: usize) -> Hessian {
    let mut h = Hessian::new(k).unwrap();
    h.add(x).unwrap();
    h
}

/// What the quantiser stores is consistent and decodes to its dequantisation.
fn check_structure(q: &BillmWeight, cfg: &BillmConfig) {
    let (n, k) = (q.n, q.k);
    assert_eq!(q.salient.len(), q.blocks());
    let mut is_sal = vec![false; k];
    for (b, cols) in q.salient.iter().enumerate() {
        let (i1, i2) = (b * BILLM_BLOCK, ((b + 1) * BILLM_BLOCK).min(k));
        assert!(
            cols.len() <= cfg.max_salient.min(i2 - i1),
            "block {b}: {} salient",
            cols.len()
        );
        assert!(
            cols.windows(2).all(|p| p[0] < p[1]),
            "block {b}: not ascending"
        );
        assert!(
            cols.iter().all(|&c| (i1..i2).contains(&c)),
            "block {b}: outside"
        );
        cols.iter().for_each(|&c| is_sal[c] = true);
        assert!(q.break_point[b] >= 0.0);
    }
    for r in 0..n {
        for (c, &sal) in is_sal.iter().enumerate() {
            let i = r * k + c;
            if sal {
                assert!(!q.sparse[i], "[{r}][{c}]: salient and sparse");
            } else {
                assert!(
                    !q.sign2[i],
                    "[{r}][{c}]: a residual sign outside the salient columns"
                );
            }
        }
    }
    for p in q.params.iter().flatten() {
        assert_eq!(half::f16::from_f32(p.alpha).to_f32(), p.alpha);
        assert_eq!(half::f16::from_f32(p.mu).to_f32(), p.mu);
        assert!(p.alpha >= 0.0 && p.alpha.is_finite() && p.mu.is_finite());
    }
}

#[test]
fn billm_beats_one_bit_and_is_consistent() {
    let mut rng = Rng::new(seed_for("billm_beats_one_bit_and_is_consistent"));
    for (n, k) in [(48, 256), (33, 200), (16, 130)] {
        let x = activations(&mut rng, 256, k);
        let w = weights(&mut rng, n, k);
        let h = hessian(&x, k);
        let cfg = BillmConfig::default();
        let q = quantize_billm(&w, n, k, &h, &cfg).unwrap();
        check_structure(&q, &cfg);
        let e_billm = relative_output_error(&x, &w, &q.dequantize(), k).unwrap();
        let e_sign =
            relative_output_error(&x, &w, &binarize_sign_mean(&w, n, k).unwrap(), k).unwrap();
        let rtn = |bits| {
            let s = WeightQuant {
                bits,
                ..WeightQuant::int4(Some(128), false)
            };
            relative_output_error(&x, &w, &quantize_rtn(&w, n, k, &s).unwrap().dequantize(), k)
                .unwrap()
        };
        let (e2, e3) = (rtn(2), rtn(3));
        println!("n={n} k={k}: BiLLM {e_billm:.4}, sign·mean {e_sign:.4}, RTN 2-bit {e2:.4}, RTN 3-bit {e3:.4}");
        assert!(
            e_billm < 0.8 * e_sign,
            "BiLLM {e_billm} against sign·mean {e_sign}"
        );
        assert!(e_billm.is_finite());
        // Deterministic.
        assert_eq!(quantize_billm(&w, n, k, &h, &cfg).unwrap(), q);
    }
}

#[test]
fn billm_salient_column_counts_at_both_ends() {
    let mut rng = Rng::new(seed_for("billm_salient_column_counts_at_both_ends"));
    let (n, k) = (8, 128);
    let x = activations(&mut rng, 64, k);
    let h = hessian(&x, k);
    // Rows of ±0.5, half of each sign: no column stands out in the weights (the salience still
    // varies with U_jj); the search takes 1 to 49 columns and the structure holds.
    let w: Vec<f32> = (0..n * k)
        .map(|i| if (i / k + i % k) % 2 == 0 { 0.5 } else { -0.5 })
        .collect();
    let q = quantize_billm(&w, n, k, &h, &BillmConfig::default()).unwrap();
    check_structure(&q, &BillmConfig::default());
    // Two columns far larger than the rest: with max_salient = 2 both are taken.
    let mut w = weights(&mut rng, n, k);
    for r in 0..n {
        w[r * k + 10] = 5.0 + r as f32;
        w[r * k + 90] = -4.0 - r as f32;
    }
    let cfg = BillmConfig {
        max_salient: 2,
        ..BillmConfig::default()
    };
    let q = quantize_billm(&w, n, k, &h, &cfg).unwrap();
    check_structure(&q, &cfg);
    assert_eq!(q.salient[0], vec![10, 90]);
    // Residual binarisation of the two columns: within a step of each value.
    let d = q.dequantize();
    for r in 0..n {
        for c in [10, 90] {
            assert!(
                (d[r * k + c] - w[r * k + c]).abs() < 0.25 * w[r * k + c].abs(),
                "[{r}][{c}]"
            );
        }
    }
}

#[test]
fn billm_dead_channels_and_bad_input() {
    let mut rng = Rng::new(seed_for("billm_dead_channels_and_bad_input"));
    let (n, k) = (4, 64);
    let mut x = activations(&mut rng, 32, k);
    for r in 0..32 {
        x[r * k + 7] = 0.0; // channel 7 never activates
    }
    let h = hessian(&x, k);
    let w = weights(&mut rng, n, k);
    let q = quantize_billm(&w, n, k, &h, &BillmConfig::default()).unwrap();
    assert!(q.dequantize().iter().all(|v| v.is_finite()));
    let cfg = BillmConfig::default();
    assert!(matches!(
        quantize_billm(&w[1..], n, k, &h, &cfg),
        Err(Error::Shape { .. })
    ));
    let mut bad = w.clone();
    bad[3] = f32::NAN;
    assert!(quantize_billm(&bad, n, k, &h, &cfg).is_err());
    assert!(quantize_billm(&w, n, k, &Hessian::new(k).unwrap(), &cfg).is_err()); // no rows
    assert!(matches!(
        quantize_billm(&w[..n * 32], n, 32, &h, &cfg),
        Err(Error::Shape { .. })
    ));
    for c in [
        BillmConfig { damp: 0.0, ..cfg },
        BillmConfig {
            damp: f64::NAN,
            ..cfg
        },
        BillmConfig {
            max_salient: 0,
            ..cfg
        },
        BillmConfig {
            max_salient: 129,
            ..cfg
        },
        BillmConfig {
            break_points: 1,
            ..cfg
        },
    ] {
        assert!(quantize_billm(&w, n, k, &h, &c).is_err(), "{c:?}");
    }
    assert!(binarize_sign_mean(&w, n, k + 1).is_err());
    // Weights whose binarisation parameters overflow f16: an Err, never NaN in the output.
    let huge: Vec<f32> = w.iter().map(|v| v * 1e7).collect();
    assert!(matches!(
        quantize_billm(&huge, n, k, &h, &cfg),
        Err(Error::InvalidArgument { .. })
    ));
    // A salient column past k in the last block: pack refuses it.
    let q = quantize_billm(
        &w[..n * 40],
        n,
        40,
        &hessian(&activations(&mut rng, 16, 40), 40),
        &cfg,
    )
    .unwrap();
    let mut bad = q.clone();
    bad.salient[0].push(120);
    assert!(PackedBillm::pack(&bad).is_err());
    assert!(PackedBillm::pack(&q).is_ok());
}

/// The block-wise compensation is what the Hessian buys: on correlated activations, BiLLM with the
/// layer's Hessian has a lower output error than the same quantiser given only its diagonal (`U` is
/// then diagonal: no compensation, and a salience from the diagonal alone).
#[test]
fn billm_compensation_lowers_the_output_error() {
    let mut rng = Rng::new(seed_for("billm_compensation_lowers_the_output_error"));
    let (n, k) = (32, 384);
    let x = activations(&mut rng, 512, k);
    let w = weights(&mut rng, n, k);
    let h = hessian(&x, k);
    let hm = h.matrix();
    // One row per channel, v_j·e_j with v_j² = H_jj·k/2: a Hessian equal to diag(H).
    let mut xd = vec![0.0f32; k * k];
    for j in 0..k {
        xd[j * k + j] = (hm[j * k + j] * k as f64 / 2.0).sqrt() as f32;
    }
    let hd = hessian(&xd, k);
    let cfg = BillmConfig::default();
    let full = quantize_billm(&w, n, k, &h, &cfg).unwrap();
    let diag = quantize_billm(&w, n, k, &hd, &cfg).unwrap();
    let e_full = relative_output_error(&x, &w, &full.dequantize(), k).unwrap();
    let e_diag = relative_output_error(&x, &w, &diag.dequantize(), k).unwrap();
    println!("BiLLM with the Hessian {e_full:.4}, with its diagonal only {e_diag:.4}");
    assert!(e_full < 0.9 * e_diag, "{e_full} against {e_diag}");
}

/// The packed form (format 2) round-trips the quantiser's output bit for bit (dequantised values
/// equal), stores exactly the strict bit count for K a multiple of 128, and refuses buffers that do
/// not match their header.
#[test]
fn billm_packing_round_trips_and_validates() {
    let mut rng = Rng::new(seed_for("billm_packing_round_trips_and_validates"));
    for (n, k) in [(5, 128), (7, 200), (3, 130), (9, 64), (1, 1), (4, 384)] {
        let x = activations(&mut rng, 64, k);
        let w = weights(&mut rng, n, k);
        let q = quantize_billm(&w, n, k, &hessian(&x, k), &BillmConfig::default()).unwrap();
        let p = PackedBillm::pack(&q).unwrap();
        let u = p.unpack();
        assert_eq!(
            (u.sign.clone(), u.sign2.clone(), u.sparse.clone()),
            (q.sign.clone(), q.sign2.clone(), q.sparse.clone()),
            "n={n} k={k}"
        );
        assert_eq!(
            (u.salient.clone(), u.params.clone()),
            (q.salient.clone(), q.params.clone())
        );
        let (a, b) = (p.dequantize(), q.dequantize());
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "n={n} k={k}"
        );
        if k % BILLM_BLOCK == 0 {
            assert_eq!(
                p.bytes() as f64 * 8.0,
                q.bits_per_weight().strict * (n * k) as f64
            );
        } else {
            assert!(p.bytes() as f64 * 8.0 > q.bits_per_weight().strict * (n * k) as f64);
        }
        // Corruptions: a NaN or negative parameter, a missing word, a padding bit.
        let mut bad = p.clone();
        bad.params[1] = half::f16::NAN.to_bits();
        assert!(bad.validate().is_err());
        let mut bad = p.clone();
        bad.params[0] = half::f16::from_f32(-1.0).to_bits();
        assert!(bad.validate().is_err());
        let mut bad = p.clone();
        bad.signs.pop();
        assert!(matches!(bad.validate(), Err(Error::Shape { .. })));
        if k % BILLM_BLOCK != 0 {
            let mut bad = p.clone();
            let last = (k.div_ceil(BILLM_BLOCK) - 1) * n * 4 + 3;
            bad.second[last] |= 1 << 31;
            assert!(bad.validate().is_err(), "n={n} k={k}");
            let mut bad = p.clone();
            bad.signs[last] |= 1 << 31;
            assert!(bad.validate().is_err(), "n={n} k={k}");
            let mut bad = p.clone();
            let mask = (k.div_ceil(BILLM_BLOCK) - 1) * 4 + 3;
            bad.salient[mask] |= 1 << 31;
            assert!(bad.validate().is_err(), "n={n} k={k}");
        }
    }
}

/// The on-disk form: round trip of several layers; truncations and wrong metadata are errors, never
/// panics.
#[test]
fn billm_safetensors_round_trip_and_refusals() {
    let mut rng = Rng::new(seed_for("billm_safetensors_round_trip_and_refusals"));
    let mut layers = Vec::new();
    for (n, k) in [(4, 130), (3, 256)] {
        let x = activations(&mut rng, 32, k);
        let w = weights(&mut rng, n, k);
        let q = quantize_billm(&w, n, k, &hessian(&x, k), &BillmConfig::default()).unwrap();
        layers.push(PackedBillm::pack(&q).unwrap());
    }
    let named: Vec<(&str, &PackedBillm)> = vec![("a.up", &layers[0]), ("b.down", &layers[1])];
    let bytes = PackedBillm::to_safetensors(&named).unwrap();
    let back = PackedBillm::from_safetensors(&bytes).unwrap();
    assert_eq!(
        back,
        vec![
            ("a.up".to_string(), layers[0].clone()),
            ("b.down".to_string(), layers[1].clone())
        ]
    );
    for cut in (0..bytes.len()).step_by(7) {
        assert!(
            PackedBillm::from_safetensors(&bytes[..cut]).is_err(),
            "cut at {cut}"
        );
    }
    // A W4 file is not a BiLLM file; names that cannot be stored are refused.
    assert!(PackedBillm::to_safetensors(&[("a;b", &layers[0])]).is_err());
    assert!(PackedBillm::to_safetensors(&[("x", &layers[0]), ("x", &layers[1])]).is_err());
    // A packed W4 file is not a BiLLM file, and a file with a tensor no header names is refused.
    let w4 = fusekit::quant::PackedW4::pack(
        &quantize_rtn(
            &vec![0.5f32; 64 * 128],
            64,
            128,
            &WeightQuant::int4(Some(128), false),
        )
        .unwrap(),
    )
    .unwrap();
    let w4_file = fusekit::quant::PackedW4::to_safetensors(&[("a.up", &w4)]).unwrap();
    assert!(PackedBillm::from_safetensors(&w4_file).is_err());
    let st = fusekit::quant::safetensors::SafeTensors::parse(&bytes).unwrap();
    let mut tensors: Vec<(String, &str, Vec<usize>, Vec<u8>)> = st
        .names()
        .map(|nm| {
            let t = st.tensor(nm).unwrap();
            (
                nm.to_string(),
                t.dtype.as_str(),
                t.shape.clone(),
                t.data.to_vec(),
            )
        })
        .collect();
    let meta: Vec<(&str, &str)> = st
        .metadata()
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let rewrite = |t: &[(String, &str, Vec<usize>, Vec<u8>)]| {
        fusekit::quant::safetensors::write(t, &meta).unwrap()
    };
    assert_eq!(
        PackedBillm::from_safetensors(&rewrite(&tensors))
            .unwrap()
            .len(),
        2
    );
    tensors.push(("extra".to_string(), "U8", vec![1], vec![0]));
    assert!(PackedBillm::from_safetensors(&rewrite(&tensors)).is_err());
    tensors.pop();
    // A missing tensor, and a tensor of the wrong dtype.
    let removed = tensors.remove(0);
    assert!(PackedBillm::from_safetensors(&rewrite(&tensors)).is_err());
    tensors.insert(
        0,
        (
            removed.0.clone(),
            "BF16",
            removed.2.clone(),
            removed.3.clone(),
        ),
    );
    assert!(PackedBillm::from_safetensors(&rewrite(&tensors)).is_err());
    // The same file claiming version 9 (one byte of the header changed).
    let pat = b"\"version\":\"2\"";
    let at = bytes
        .windows(pat.len())
        .position(|w| w == pat)
        .expect("version in the header");
    let mut v9 = bytes.clone();
    v9[at + pat.len() - 2] = b'9';
    assert!(matches!(
        PackedBillm::from_safetensors(&v9),
        Err(Error::Unsupported { .. })
    ));
}

/// An independent, naive recomputation of the two searches on one block (the reference code's
/// definition: salience S = w²/U_jj² with U the upper Cholesky factor of the dampened H⁻¹; the count
/// and the break point chosen by how well a two-group binarisation approximates S) agrees with what
/// the quantiser chose. Pins that the searches run on S, not on the weights.
#[test]
fn billm_searches_match_a_naive_recomputation() {
    let mut rng = Rng::new(seed_for("billm_searches_match_a_naive_recomputation"));
    let (n, k) = (24, 96); // one block
    let x = activations(&mut rng, 200, k);
    let w = weights(&mut rng, n, k);
    let h = hessian(&x, k);
    let cfg = BillmConfig::default();
    let q = quantize_billm(&w, n, k, &h, &cfg).unwrap();
    // U_jj: H + damp, inverted (Gauss-Jordan), then the upper Cholesky factor of the inverse: for
    // A = UᵀU, U_jj² = A_jj − Σ_{i<j} U_ij², computed row by row.
    let mut a = h.matrix();
    let mean = (0..k).map(|j| a[j * k + j]).sum::<f64>() / k as f64;
    for j in 0..k {
        a[j * k + j] += 0.01 * mean;
    }
    let mut inv = vec![0.0f64; k * k];
    (0..k).for_each(|j| inv[j * k + j] = 1.0);
    for c in 0..k {
        let p = a[c * k + c];
        for j in 0..k {
            a[c * k + j] /= p;
            inv[c * k + j] /= p;
        }
        for r in 0..k {
            if r != c {
                let f = a[r * k + c];
                for j in 0..k {
                    a[r * k + j] -= f * a[c * k + j];
                    inv[r * k + j] -= f * inv[c * k + j];
                }
            }
        }
    }
    let mut u = vec![0.0f64; k * k];
    for i in 0..k {
        let d = inv[i * k + i] - (0..i).map(|t| u[t * k + i].powi(2)).sum::<f64>();
        u[i * k + i] = d.sqrt();
        for j in i + 1..k {
            let s = inv[i * k + j] - (0..i).map(|t| u[t * k + i] * u[t * k + j]).sum::<f64>();
            u[i * k + j] = s / u[i * k + i];
        }
    }
    let s: Vec<f64> = (0..n * k)
        .map(|i| (w[i] as f64).powi(2) / u[(i % k) * k + i % k].powi(2))
        .collect();
    // Residual binarisation error (order `o`) of a list, unrounded.
    let err = |vals: &[f64], o: usize| -> f64 {
        let mut r = vals.to_vec();
        for _ in 0..o {
            if r.is_empty() {
                break;
            }
            let mu = r.iter().sum::<f64>() / r.len() as f64;
            let al = r.iter().map(|v| (v - mu).abs()).sum::<f64>() / r.len() as f64;
            r.iter_mut()
                .for_each(|v| *v -= if *v >= mu { al + mu } else { mu - al });
        }
        r.iter().map(|v| v * v).sum()
    };
    let mut cols: Vec<(f64, usize)> = (0..k)
        .map(|j| ((0..n).map(|r| s[r * k + j]).sum(), j))
        .collect();
    cols.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let (mut best, mut best_c) = (f64::INFINITY, 0);
    for c in 1..=cfg.max_salient.min(k) {
        let top: Vec<usize> = cols[..c].iter().map(|t| t.1).collect();
        let e: f64 = (0..n)
            .map(|r| {
                let (sv, rv): (Vec<f64>, Vec<f64>) = (0..k)
                    .map(|j| (top.contains(&j), s[r * k + j]))
                    .fold((vec![], vec![]), |(mut a, mut b), (t, v)| {
                        if t {
                            a.push(v)
                        } else {
                            b.push(v)
                        }
                        (a, b)
                    });
                err(&sv, 2) + err(&rv, 2)
            })
            .sum();
        if e < best {
            (best, best_c) = (e, c);
        }
    }
    assert_eq!(q.salient[0].len(), best_c, "salient columns");
    let mut top: Vec<usize> = cols[..best_c].iter().map(|t| t.1).collect();
    top.sort_unstable();
    assert_eq!(q.salient[0], top);
    let mut mags: Vec<f64> = (0..n * k)
        .map(|i| if top.contains(&(i % k)) { 0.0 } else { s[i] })
        .collect();
    mags.sort_by(f64::total_cmp);
    let (mut best, mut best_p) = (f64::INFINITY, 0.0);
    for i in 0..cfg.break_points {
        let qt = (10.0 + 80.0 * i as f64 / (cfg.break_points - 1) as f64) / 100.0;
        let pos = qt * (mags.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        let p = mags[lo] + (mags[hi] - mags[lo]) * (pos - lo as f64);
        let e: f64 = (0..n)
            .map(|r| {
                let rest: Vec<f64> = (0..k)
                    .filter(|j| !top.contains(j))
                    .map(|j| s[r * k + j])
                    .collect();
                let (c, sp): (Vec<f64>, Vec<f64>) = rest.iter().partition(|&&v| v < p);
                err(&c, 1) + err(&sp, 1)
            })
            .sum();
        if e < best {
            (best, best_p) = (e, p);
        }
    }
    let got = q.break_point[0];
    assert!(
        (got - best_p).abs() <= 1e-9 * best_p.abs().max(1e-300),
        "break point {got} against {best_p}"
    );
}
