//! The attention decode and merge kernels against the f64 reference, on the SIMT emulator always and on
//! a GPU when one is present: every element type × head dim × heads-per-CTA instantiation, page sizes 1,
//! 16 and odd, lengths 1, not a multiple of the page and across several splits, GQA 1/2/3/4/8/12,
//! softcap and window; outputs poisoned first; a device page table that disagrees with the plan.

use fusekit::attention::{
    decode, reference, DecodeConfig, DecodePlan, DecodeWorkspace, KvElement, PageTable,
    PagedKvLayout,
};
use fusekit::testing::{compare, poisoned, seed_for, Dist, Rng, Tolerance};
use fusekit::{Backend, Error};
use half::{bf16, f16};

/// A random cache (keys with a few outlier channels, as real models have) and a batch on scrambled
/// pages.
struct Setup<T> {
    layout: PagedKvLayout,
    cache: Vec<T>,
    indptr: Vec<i32>,
    indices: Vec<i32>,
    lens: Vec<u32>,
}

fn setup<T: KvElement>(
    rng: &mut Rng,
    page_size: usize,
    kv_heads: usize,
    d: usize,
    lens: &[u32],
) -> Setup<T> {
    let need: usize = lens.iter().map(|&l| (l as usize).div_ceil(page_size)).sum();
    let layout = PagedKvLayout::new(need + 2, page_size, kv_heads, d, T::FORMAT).unwrap();
    let n = layout.elements() as usize;
    let mut vals = rng.sample(
        Dist::Normal {
            mean: 0.0,
            std: 1.0,
        },
        n,
    );
    // Outlier key channels (x8) in every head: the distribution KIVI quantises per channel for.
    for (i, v) in vals.iter_mut().enumerate() {
        if i % d == 3 || i % d == d - 1 {
            *v *= 8.0;
        }
    }
    let cache = vals.into_iter().map(T::from_f64).collect();
    let mut pages: Vec<i32> = (0..layout.num_pages() as i32).collect();
    for i in (1..pages.len()).rev() {
        pages.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let (mut indptr, mut indices) = (vec![0i32], Vec::new());
    for &len in lens {
        let k = (len as usize).div_ceil(page_size);
        let start = indices.len();
        indices.extend_from_slice(&pages[start..start + k]);
        indptr.push(indices.len() as i32);
    }
    Setup {
        layout,
        cache,
        indptr,
        indices,
        lens: lens.to_vec(),
    }
}

/// One decode on `dev` against the reference: o within the element type's rounding, lse within fp32.
fn run_case<B: Backend, T: KvElement>(
    dev: &B,
    rng: &mut Rng,
    s: &Setup<T>,
    cfg: &DecodeConfig,
    split: Option<usize>,
) -> Result<(), String> {
    let t = PageTable {
        page_indptr: &s.indptr,
        page_indices: &s.indices,
        seq_lens: &s.lens,
    };
    let d = s.layout.head_dim();
    let rows = s.lens.len() * cfg.num_qo_heads;
    let q: Vec<T> = rng
        .sample(
            Dist::Normal {
                mean: 0.0,
                std: 1.0,
            },
            rows * d,
        )
        .into_iter()
        .map(T::from_f64)
        .collect();
    let plan = DecodePlan::new::<T>(&s.layout, &t, cfg, split).map_err(|e| e.to_string())?;
    let cache_d = dev.upload(&s.cache).unwrap();
    let q_d = dev.upload(&q).unwrap();
    let (ip, xp, lp) = (
        dev.upload(&s.indptr).unwrap(),
        dev.upload(&s.indices).unwrap(),
        dev.upload(&s.lens).unwrap(),
    );
    let mut ws = DecodeWorkspace::new(dev, &plan).unwrap();
    let mut o = poisoned::<B, T>(dev, rows * d).unwrap();
    let mut lse = poisoned::<B, f32>(dev, rows).unwrap();
    decode(
        dev, &plan, &q_d, &cache_d, &ip, &xp, &lp, &mut ws, &mut o, &mut lse,
    )
    .map_err(|e| e.to_string())?;
    ws.check_status_sync(dev).map_err(|e| e.to_string())?;
    let cache64: Vec<f64> = s.cache.iter().map(|x| x.to_f64()).collect();
    let q64: Vec<f64> = q.iter().map(|x| x.to_f64()).collect();
    let want = reference::decode(&s.layout, &cache64, &t, &q64, cfg).unwrap();
    let what = format!(
        "{} d={d} ps={} hkv={} hq={} lens={:?} split={split:?} {cfg:?}",
        T::NAME,
        s.layout.page_size(),
        s.layout.num_kv_heads(),
        cfg.num_qo_heads,
        s.lens
    );
    let got_o = dev.download(&o).unwrap();
    // o: one rounding to T of an fp32 result (2^-9 relative for bf16, 2^-12 for f16).
    let tol_o = if T::NAME == "bf16" {
        Tolerance {
            rel_l2: 1e-2,
            atol: 1e-3,
            rtol: 8e-3,
        }
    } else {
        Tolerance {
            rel_l2: 2e-3,
            atol: 2e-4,
            rtol: 2e-3,
        }
    };
    compare(&format!("o {what}"), &got_o, &want.o, tol_o)?;
    let got_lse = dev.download(&lse).unwrap();
    compare(
        &format!("lse {what}"),
        &got_lse,
        &want.lse,
        Tolerance {
            rel_l2: 1e-5,
            atol: 1e-4,
            rtol: 1e-5,
        },
    )?;
    Ok(())
}

#[test]
fn decode_matches_the_reference_for_every_instantiation() {
    fusekit::on_every_backend!(
        "decode_matches_the_reference_for_every_instantiation",
        |dev| { every_instantiation_on(dev) }
    );
}

fn every_instantiation_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for(
        "decode_matches_the_reference_for_every_instantiation",
    ));
    fn one<B: Backend, T: KvElement>(dev: &B, rng: &mut Rng) {
        for d in [64, 128, 256] {
            // Groups 1, 2, 3 and 8: heads per CTA 1, 2, 4 (3 of them live) and 8.
            for (hkv, group, ps) in [(2, 1, 16), (1, 2, 1), (2, 3, 5), (1, 8, 16)] {
                let s = setup::<T>(rng, ps, hkv, d, &[1, 17, 40]);
                run_case(dev, rng, &s, &DecodeConfig::new(hkv * group), None)
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
    one::<B, bf16>(dev, &mut rng);
    one::<B, f16>(dev, &mut rng);
}

#[test]
fn splits_softcap_window_and_large_groups() {
    fusekit::on_every_backend!("splits_softcap_window_and_large_groups", |dev| {
        splits_on(dev)
    });
}

fn splits_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("splits_softcap_window_and_large_groups"));
    // Several splits of 64 tokens (the last one short), lengths around page and split boundaries.
    let s = setup::<bf16>(&mut rng, 16, 2, 128, &[200, 64, 65, 1, 129]);
    for cfg in [
        DecodeConfig::new(8),
        DecodeConfig {
            softcap: Some(2.0),
            ..DecodeConfig::new(8)
        },
        DecodeConfig {
            window: Some(70),
            sm_scale: Some(0.3),
            ..DecodeConfig::new(8)
        },
    ] {
        run_case(dev, &mut rng, &s, &cfg, Some(64)).unwrap_or_else(|e| panic!("{e}"));
    }
    // GQA 12: two head chunks (8 + 4) per KV head; MQA (one KV head).
    let s = setup::<f16>(&mut rng, 7, 1, 64, &[33, 90]);
    run_case(dev, &mut rng, &s, &DecodeConfig::new(12), Some(32)).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn results_do_not_depend_on_the_batch() {
    fusekit::on_every_backend!("results_do_not_depend_on_the_batch", |dev| {
        batch_invariance_on(dev)
    });
}

fn batch_invariance_on<B: Backend>(dev: &B) {
    // The same sequence alone and beside a long one: the same bits (fixed split size).
    let mut rng = Rng::new(seed_for("results_do_not_depend_on_the_batch"));
    let s = setup::<bf16>(&mut rng, 16, 1, 64, &[100, 1000]);
    let q: Vec<bf16> = (0..2 * 4 * 64)
        .map(|_| bf16::from_f64(rng.uniform(-1.0, 1.0)))
        .collect();
    let run = |lens: &[u32], npages: usize, q: &[bf16]| -> Vec<bf16> {
        let t = PageTable {
            page_indptr: &s.indptr[..lens.len() + 1],
            page_indices: &s.indices[..npages],
            seq_lens: lens,
        };
        let plan =
            DecodePlan::new::<bf16>(&s.layout, &t, &DecodeConfig::new(4), Some(128)).unwrap();
        let (c, qd) = (dev.upload(&s.cache).unwrap(), dev.upload(q).unwrap());
        let (ip, xp, lp) = (
            dev.upload(t.page_indptr).unwrap(),
            dev.upload(t.page_indices).unwrap(),
            dev.upload(lens).unwrap(),
        );
        let mut ws = DecodeWorkspace::new(dev, &plan).unwrap();
        let mut o = poisoned::<B, bf16>(dev, q.len()).unwrap();
        let mut lse = poisoned::<B, f32>(dev, q.len() / 64).unwrap();
        decode(
            dev, &plan, &qd, &c, &ip, &xp, &lp, &mut ws, &mut o, &mut lse,
        )
        .unwrap();
        dev.download(&o).unwrap()
    };
    let both = run(&s.lens, s.indices.len(), &q);
    let alone = run(&s.lens[..1], s.indptr[1] as usize, &q[..4 * 64]);
    assert!(
        both[..4 * 64]
            .iter()
            .zip(&alone)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "sequence 0 changed when a long sequence joined the batch"
    );
}

#[test]
fn bad_input_is_a_typed_error_and_a_bad_device_table_is_never_read() {
    fusekit::on_every_backend!(
        "bad_input_is_a_typed_error_and_a_bad_device_table_is_never_read",
        |dev| { bad_input_on(dev) }
    );
}

fn bad_input_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("attention_bad_input"));
    let s = setup::<bf16>(&mut rng, 16, 1, 64, &[20, 5]);
    let t = PageTable {
        page_indptr: &s.indptr,
        page_indices: &s.indices,
        seq_lens: &s.lens,
    };
    let cfg = DecodeConfig::new(2);
    // The layout is bf16: an f16 plan is a dtype error.
    assert!(matches!(
        DecodePlan::new::<f16>(&s.layout, &t, &cfg, None),
        Err(Error::DType { .. })
    ));
    assert!(matches!(
        DecodePlan::new::<bf16>(&s.layout, &t, &cfg, Some(0)),
        Err(Error::InvalidArgument {
            arg: "split_size",
            ..
        })
    ));
    let plan = DecodePlan::new::<bf16>(&s.layout, &t, &cfg, None).unwrap();
    let c = dev.upload(&s.cache).unwrap();
    let q = dev.upload(&vec![bf16::ONE; 2 * 2 * 64]).unwrap();
    let (ip, lp) = (dev.upload(&s.indptr).unwrap(), dev.upload(&s.lens).unwrap());
    let mut ws = DecodeWorkspace::new(dev, &plan).unwrap();
    let mut o = poisoned::<B, bf16>(dev, 2 * 2 * 64).unwrap();
    let mut lse = poisoned::<B, f32>(dev, 4).unwrap();
    // A short output buffer.
    let mut short = dev.alloc_zeros::<bf16>(2 * 2 * 64 - 1).unwrap();
    let xp = dev.upload(&s.indices).unwrap();
    assert!(matches!(
        decode(dev, &plan, &q, &c, &ip, &xp, &lp, &mut ws, &mut short, &mut lse),
        Err(Error::Shape { arg: "o", .. })
    ));
    // The device's page table names a page outside the cache: nothing is read there, the sequence
    // is NaN, the status names it, the other sequence is untouched.
    let mut bad_idx = s.indices.clone();
    bad_idx[0] = s.layout.num_pages() as i32 + 7;
    let xbad = dev.upload(&bad_idx).unwrap();
    decode(
        dev, &plan, &q, &c, &ip, &xbad, &lp, &mut ws, &mut o, &mut lse,
    )
    .unwrap();
    match ws.check_status_sync(dev) {
        Err(Error::OutOfRange {
            arg: "page_table",
            index: 0,
            ..
        }) => {}
        other => panic!("status: {other:?}"),
    }
    let got = dev.download(&o).unwrap();
    assert!(
        got[..2 * 64].iter().all(|x| x.is_nan()),
        "sequence 0 must be NaN"
    );
    assert!(
        got[2 * 64..].iter().all(|x| x.to_f64().is_finite()),
        "sequence 1 is valid"
    );
    // A device length past the plan's splits is caught the same way.
    let mut long = s.lens.clone();
    long[1] = 5000;
    let lbad = dev.upload(&long).unwrap();
    decode(
        dev, &plan, &q, &c, &ip, &xp, &lbad, &mut ws, &mut o, &mut lse,
    )
    .unwrap();
    assert!(ws.check_status_sync(dev).is_err());
    // The cache's own layout check: head dim 96 has no kernel.
    assert!(matches!(
        PagedKvLayout::new(4, 16, 1, 96, bf16::FORMAT),
        Err(Error::Unsupported { .. })
    ));
}
