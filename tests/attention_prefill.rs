//! The attention prefill kernel against the f64 reference, on the SIMT emulator always and on a GPU
//! when one is present: every element type × head dim, page sizes 1, 16 and 5, new-token counts 1, 17,
//! 64, 65 and 130 over cached prefixes of 0, 33 and 100 tokens (chunked prefill), GQA 1/3/4/8, softcap
//! and window, a ragged batch, outputs poisoned first; NaN keys and values; bad input; a device page
//! table or qo_indptr that disagrees with the plan; KIVI int8/int4 caches (every instantiation, groups
//! 32/64/128, sequences wholly in the residual, RoPE), their bad input and a bad device residual slot.

use fusekit::attention::{
    pack_quantized, prefill, prefill_quantized, reference, DecodeConfig, Kv, KvElement, KvFormat,
    PageTable, PagedKvLayout, PrefillPlan, PrefillWorkspace, Rope, RopeMode, RopeStyle,
};
use fusekit::testing::{compare_with_floor, poisoned, seed_for, Dist, Element, Rng, Tolerance};
use fusekit::{Backend, Error};
use half::{bf16, f16};

mod common;

/// A random cache (keys and values with a few outlier channels, as real models have) holding a batch
/// of sequences on scrambled pages; sequence b has `prefix` cached tokens followed by `new` new ones.
struct Setup<T> {
    layout: PagedKvLayout,
    cache: Vec<T>,
    indptr: Vec<i32>,
    indices: Vec<i32>,
    lens: Vec<u32>,
    qo: Vec<i32>,
}

impl<T: KvElement> Setup<T> {
    fn table(&self) -> PageTable<'_> {
        PageTable {
            page_indptr: &self.indptr,
            page_indices: &self.indices,
            seq_lens: &self.lens,
        }
    }

    fn cache64(&self) -> Vec<f64> {
        self.cache.iter().map(|x| x.to_f64()).collect()
    }

    /// Sequence `b` alone, on the same cache and pages.
    fn only(&self, b: usize) -> Setup<T> {
        let (p0, p1) = (self.indptr[b] as usize, self.indptr[b + 1] as usize);
        Setup {
            layout: self.layout,
            cache: self.cache.clone(),
            indptr: vec![0, (p1 - p0) as i32],
            indices: self.indices[p0..p1].to_vec(),
            lens: vec![self.lens[b]],
            qo: vec![0, self.qo[b + 1] - self.qo[b]],
        }
    }

    /// The element range of sequence `b`'s rows in `[total_q, heads, width]`.
    fn rows_of(&self, b: usize, heads: usize, width: usize) -> std::ops::Range<usize> {
        self.qo[b] as usize * heads * width..self.qo[b + 1] as usize * heads * width
    }
}

/// `seqs`: (cached prefix, new tokens) per sequence.
fn setup<T: KvElement>(
    rng: &mut Rng,
    page_size: usize,
    kv_heads: usize,
    d: usize,
    seqs: &[(u32, u32)],
) -> Setup<T> {
    let lens: Vec<u32> = seqs.iter().map(|&(p, n)| p + n).collect();
    let need: usize = lens.iter().map(|&l| (l as usize).div_ceil(page_size)).sum();
    let layout = PagedKvLayout::new(need + 2, page_size, kv_heads, d, T::FORMAT).unwrap();
    let mut vals = rng.sample(
        Dist::Normal {
            mean: 0.0,
            std: 1.0,
        },
        layout.elements() as usize,
    );
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
    let (mut indptr, mut indices, mut qo) = (vec![0i32], Vec::new(), vec![0i32]);
    for (&len, &(_, new)) in lens.iter().zip(seqs) {
        let k = (len as usize).div_ceil(page_size);
        let start = indices.len();
        indices.extend_from_slice(&pages[start..start + k]);
        indptr.push(indices.len() as i32);
        qo.push(qo.last().unwrap() + new as i32);
    }
    Setup {
        layout,
        cache,
        indptr,
        indices,
        lens,
        qo,
    }
}

fn random_q<T: KvElement>(rng: &mut Rng, n: usize) -> Vec<T> {
    rng.sample(
        Dist::Normal {
            mean: 0.0,
            std: 1.0,
        },
        n,
    )
    .into_iter()
    .map(T::from_f64)
    .collect()
}

/// One prefill on `dev`: (o, lse) as downloaded, after the status check.
fn run<B: Backend, T: KvElement>(
    dev: &B,
    s: &Setup<T>,
    q: &[T],
    cfg: &DecodeConfig,
) -> Result<(Vec<T>, Vec<f32>), String> {
    let plan =
        PrefillPlan::new::<T>(&s.layout, &s.table(), &s.qo, cfg).map_err(|e| e.to_string())?;
    let d = s.layout.head_dim();
    let cache_d = dev.upload(&s.cache).unwrap();
    let q_d = dev.upload(q).unwrap();
    let (ip, xp, lp, qp) = (
        dev.upload(&s.indptr).unwrap(),
        dev.upload(&s.indices).unwrap(),
        dev.upload(&s.lens).unwrap(),
        dev.upload(&s.qo).unwrap(),
    );
    let mut ws = PrefillWorkspace::new(dev).unwrap();
    let mut o = poisoned::<B, T>(dev, plan.rows() * d).unwrap();
    let mut lse = poisoned::<B, f32>(dev, plan.rows()).unwrap();
    prefill(
        dev, &plan, &q_d, &cache_d, &ip, &xp, &lp, &qp, &mut ws, &mut o, &mut lse,
    )
    .map_err(|e| e.to_string())?;
    ws.check_status_sync(dev).map_err(|e| e.to_string())?;
    Ok((dev.download(&o).unwrap(), dev.download(&lse).unwrap()))
}

/// o within the element type's rounding plus the rounding of the probabilities to T before P·V (at
/// most u · Σ p_j |v_j| / Σ p_j per element, u = 2^-8 for bf16, 2^-11 for f16, computed by the
/// reference over |V|); lse within fp32.
fn check<T: KvElement>(
    what: &str,
    s: &Setup<T>,
    q: &[T],
    cfg: &DecodeConfig,
    got_o: &[T],
    got_lse: &[f32],
) -> Result<(), String> {
    let t = s.table();
    let oracle = rounded_rope(s, q, cfg);
    let ds = rope_score_bound(s, &oracle, cfg);
    let Oracle {
        layout,
        cache,
        q: q64,
        ..
    } = oracle;
    let want = reference::prefill(&layout, &cache, &t, &s.qo, &q64, cfg).unwrap();
    let abs_v = abs_values(&layout, cache);
    let mag = reference::prefill(&layout, &abs_v, &t, &s.qo, &q64, cfg).unwrap();
    let (tol, u) = if T::NAME == "bf16" {
        (
            Tolerance {
                rel_l2: 1e-2,
                atol: 1e-3,
                rtol: 8e-3,
            },
            2f64.powi(-8),
        )
    } else {
        (
            Tolerance {
                rel_l2: 2e-3,
                atol: 2e-4,
                rtol: 2e-3,
            },
            2f64.powi(-11),
        )
    };
    // With RoPE a few rotated q and k elements may round to the T value next to the oracle's (see
    // `rounded_rope`): a score moves by at most ds (per row, `rope_score_bound`), lse by at most ds and
    // o_i by at most 2·ds·Σ p_j |v_j| (the `mag` reference), on top of the P rounding.
    let hd = s.layout.head_dim();
    compare_with_floor(&format!("o {what}"), got_o, &want.o, tol, |i| {
        (u + 2.0 * ds[i / hd]) * mag.o[i]
    })?;
    compare_with_floor(
        &format!("lse {what}"),
        got_lse,
        &want.lse,
        common::LSE_TOL,
        |r| ds[r],
    )?;
    Ok(())
}

/// The oracle's inputs. With a RoPE mode the kernel rotates q and (`InAttention`) the keys in shared
/// memory and rounds them to T there, as an engine that applies RoPE in bf16 does: so the oracle
/// rotates them in f64 at their positions, rounds them to T, and attends without RoPE. The kernel's
/// rotation (f32 angle and inverse frequency, MUFU sine/cosine) is off the f64 one by at most
/// `eps = |pair| · (|angle| · 2^-22 + 2^-19)`: an element whose rounding to T is not the same within ±eps
/// may come out as the neighbouring T value; `flip` (q's, and the cache's for keys) holds that
/// neighbour's distance for those elements, 0 for the rest.
struct Oracle {
    layout: PagedKvLayout,
    cache: Vec<f64>,
    q: Vec<f64>,
    flip_q: Vec<f64>,
    flip_k: Vec<f64>,
}

fn rounded_rope<T: KvElement>(s: &Setup<T>, q: &[T], cfg: &DecodeConfig) -> Oracle {
    let mut o = Oracle {
        layout: s.layout,
        cache: s.cache64(),
        q: q.iter().map(|x| x.to_f64()).collect(),
        flip_q: vec![0.0; q.len()],
        flip_k: Vec::new(),
    };
    o.flip_k = vec![0.0; o.cache.len()];
    let Some(r) = s.layout.rope().rope() else {
        return o;
    };
    let l = s.layout;
    let (d, hq, ps) = (l.head_dim(), cfg.num_qo_heads, l.page_size());
    let half = r.style == RopeStyle::Half;
    let round = |x: &mut [f64], flip: &mut [f64], pos: usize| {
        reference::rope_rotate(x, pos as f64, &r).unwrap();
        let rotated = x.to_vec();
        for e in 0..d {
            let (i, partner) = if half {
                (e % (d / 2), (e + d / 2) % d)
            } else {
                (e / 2, e ^ 1)
            };
            let angle = pos as f64 * (r.theta as f64).powf(-2.0 * i as f64 / d as f64);
            let norm = rotated[e].hypot(rotated[partner]);
            let eps = norm * (angle.abs() * 2f64.powi(-22) + 2f64.powi(-19));
            let (lo, hi) = (
                T::from_f64(rotated[e] - eps).to_f64(),
                T::from_f64(rotated[e] + eps).to_f64(),
            );
            flip[e] = hi - lo;
            x[e] = T::from_f64(rotated[e]).to_f64();
        }
    };
    for (b, &len) in s.lens.iter().enumerate() {
        let (q0, q1) = (s.qo[b] as usize, s.qo[b + 1] as usize);
        let first = len as usize - (q1 - q0);
        for (i, tok) in (q0..q1).enumerate() {
            let rows = tok * hq * d..(tok + 1) * hq * d;
            for (row, flip) in o.q[rows.clone()]
                .chunks_mut(d)
                .zip(o.flip_q[rows].chunks_mut(d))
            {
                round(row, flip, first + i);
            }
        }
        if let RopeMode::InAttention(_) = l.rope() {
            let pages = &s.indices[s.indptr[b] as usize..];
            for j in 0..len as usize {
                for h in 0..l.num_kv_heads() {
                    let at = l.offset(Kv::K, pages[j / ps] as usize, h, j % ps, 0) as usize;
                    round(&mut o.cache[at..at + d], &mut o.flip_k[at..at + d], j);
                }
            }
        }
    }
    o.layout = l.with_rope(RopeMode::None).unwrap();
    o
}

/// Per output row, the most a score can move when the rotated q and k elements that may round the
/// other way (`Oracle::flip`) all do: `scale · max_j Σ_e (fq_e·|k_je| + |q_e|·fk_je + fq_e·fk_je)` over
/// the keys the row attends to (0 without RoPE). The RoPE cases use no window (all keys up to the row's
/// position).
fn rope_score_bound<T: KvElement>(s: &Setup<T>, o: &Oracle, cfg: &DecodeConfig) -> Vec<f64> {
    let d = s.layout.head_dim();
    let rows = o.q.len() / d;
    if s.layout.rope() == RopeMode::None {
        return vec![0.0; rows];
    }
    let (hq, ps) = (cfg.num_qo_heads, s.layout.page_size());
    let group = hq / s.layout.num_kv_heads();
    let scale = cfg.scale(d);
    let mut out = vec![0.0; rows];
    for (b, &len) in s.lens.iter().enumerate() {
        let (q0, q1) = (s.qo[b] as usize, s.qo[b + 1] as usize);
        let first = len as usize - (q1 - q0);
        let pages = &s.indices[s.indptr[b] as usize..];
        for (i, tok) in (q0..q1).enumerate() {
            for h in 0..hq {
                let r = tok * hq + h;
                let (qr, fq) = (&o.q[r * d..(r + 1) * d], &o.flip_q[r * d..(r + 1) * d]);
                let mut worst = 0.0f64;
                for j in 0..=first + i {
                    let at = o
                        .layout
                        .offset(Kv::K, pages[j / ps] as usize, h / group, j % ps, 0)
                        as usize;
                    let (k, fk) = (&o.cache[at..at + d], &o.flip_k[at..at + d]);
                    let sum: f64 = (0..d)
                        .map(|e| fq[e] * k[e].abs() + qr[e].abs() * fk[e] + fq[e] * fk[e])
                        .sum();
                    worst = worst.max(sum);
                }
                out[r] = scale * worst;
            }
        }
    }
    out
}

/// The cache with every value replaced by its magnitude (keys unchanged).
fn abs_values(l: &PagedKvLayout, mut cache: Vec<f64>) -> Vec<f64> {
    let page = l.page_elements() as usize;
    for p in cache.chunks_mut(page) {
        for x in &mut p[page / 2..] {
            *x = x.abs();
        }
    }
    cache
}

fn run_case<B: Backend, T: KvElement>(
    dev: &B,
    rng: &mut Rng,
    s: &Setup<T>,
    cfg: &DecodeConfig,
) -> Result<(), String> {
    let d = s.layout.head_dim();
    let q = random_q::<T>(rng, *s.qo.last().unwrap() as usize * cfg.num_qo_heads * d);
    let (o, lse) = run(dev, s, &q, cfg)?;
    let what = format!(
        "{} d={d} ps={} hkv={} hq={} lens={:?} qo={:?} {cfg:?} {:?}",
        T::NAME,
        s.layout.page_size(),
        s.layout.num_kv_heads(),
        cfg.num_qo_heads,
        s.lens,
        s.qo,
        s.layout.rope()
    );
    check(&what, s, &q, cfg, &o, &lse)
}

#[test]
fn prefill_matches_the_reference_for_every_instantiation() {
    fusekit::on_every_backend!(
        "prefill_matches_the_reference_for_every_instantiation",
        |dev| { every_instantiation_on(dev) }
    );
}

fn every_instantiation_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for(
        "prefill_matches_the_reference_for_every_instantiation",
    ));
    // Every element type x head dim x page size (1, 16, odd), GQA groups 1, 3, 4 and 8 in turn: a
    // fresh prefill of 65 tokens (two query tiles at group 1), 17 new tokens over a cached prefix of
    // 33, and one new token over 100.
    fn one<B: Backend, T: KvElement>(dev: &B, rng: &mut Rng, turn: &mut usize) {
        const GROUPS: [(usize, usize); 4] = [(2, 1), (1, 3), (2, 4), (1, 8)];
        for d in [64, 128, 256] {
            for ps in [1, 16, 5] {
                let (hkv, group) = GROUPS[*turn % GROUPS.len()];
                *turn += 1;
                let s = setup::<T>(rng, ps, hkv, d, &[(0, 65), (33, 17), (100, 1)]);
                run_case(dev, rng, &s, &DecodeConfig::new(hkv * group))
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
    let mut turn = 0;
    one::<B, bf16>(dev, &mut rng, &mut turn);
    one::<B, f16>(dev, &mut rng, &mut turn);
}

#[test]
fn chunked_prefill_over_cached_prefixes_in_a_ragged_batch() {
    fusekit::on_every_backend!(
        "chunked_prefill_over_cached_prefixes_in_a_ragged_batch",
        |dev| { chunked_on(dev) }
    );
}

fn chunked_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for(
        "chunked_prefill_over_cached_prefixes_in_a_ragged_batch",
    ));
    // New-token counts 1, 17, 64, 65, 130 over prefixes 0, 33, 100 (one batch, ragged), and a sequence
    // with no new token at all.
    let seqs = [
        (0, 130),
        (33, 64),
        (100, 65),
        (100, 1),
        (33, 17),
        (0, 1),
        (12, 0),
        (100, 17),
    ];
    let s = setup::<bf16>(&mut rng, 16, 2, 128, &seqs);
    run_case(dev, &mut rng, &s, &DecodeConfig::new(8)).unwrap_or_else(|e| panic!("{e}"));
    // The same batch with page size 1 and MHA in f16.
    let s = setup::<f16>(&mut rng, 1, 2, 64, &seqs);
    run_case(dev, &mut rng, &s, &DecodeConfig::new(2)).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn softcap_window_and_gqa_ratios() {
    fusekit::on_every_backend!("softcap_window_and_gqa_ratios", |dev| {
        softcap_window_on(dev)
    });
}

fn softcap_window_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("softcap_window_and_gqa_ratios"));
    let seqs = [(100, 65), (0, 130), (33, 17)];
    let s = setup::<bf16>(&mut rng, 5, 1, 128, &seqs);
    for cfg in [
        // Softcap with a scale that makes it bite.
        DecodeConfig {
            softcap: Some(2.0),
            sm_scale: Some(0.3),
            ..DecodeConfig::new(4)
        },
        // Windows shorter than a K/V tile, than a query tile's span, and longer than any sequence.
        DecodeConfig {
            window: Some(40),
            ..DecodeConfig::new(4)
        },
        DecodeConfig {
            window: Some(1),
            softcap: Some(30.0),
            ..DecodeConfig::new(4)
        },
        DecodeConfig {
            window: Some(100_000),
            ..DecodeConfig::new(4)
        },
    ] {
        run_case(dev, &mut rng, &s, &cfg).unwrap_or_else(|e| panic!("{e}"));
    }
    // GQA 3 and 8 over 2 KV heads, f16, head dim 64, odd pages, a window across tiles.
    let s = setup::<f16>(&mut rng, 5, 2, 64, &[(33, 64), (0, 17)]);
    for cfg in [
        DecodeConfig {
            window: Some(70),
            ..DecodeConfig::new(6)
        },
        DecodeConfig {
            softcap: Some(5.0),
            ..DecodeConfig::new(16)
        },
    ] {
        run_case(dev, &mut rng, &s, &cfg).unwrap_or_else(|e| panic!("{e}"));
    }
    // Head dim 256 (K/V tiles of 32 tokens) with a window and softcap.
    let s = setup::<bf16>(&mut rng, 16, 1, 256, &[(100, 65)]);
    let cfg = DecodeConfig {
        window: Some(50),
        softcap: Some(10.0),
        ..DecodeConfig::new(3)
    };
    run_case(dev, &mut rng, &s, &cfg).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn rising_scores_move_the_running_max() {
    fusekit::on_every_backend!("rising_scores_move_the_running_max", |dev| {
        rising_on(dev)
    });
}

/// Keys whose score grows along the sequence, by less and by more than the kernel's rescale
/// threshold (2^8) per K/V tile: the running max is stale for some tiles and moves on others.
fn rising_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("rising_scores_move_the_running_max"));
    fn one<B: Backend, T: KvElement>(dev: &B, rng: &mut Rng, d: usize, ps: usize) {
        let mut s = setup::<T>(rng, ps, 1, d, &[(100, 65), (0, 40)]);
        // Key dim 0 = position / 4 (exact in bf16 and f16 below 64), the query's dim 0 = 1 and the
        // rest small: the score rises by about scale / 4 per token.
        for b in 0..s.lens.len() {
            for t in 0..s.lens[b] as usize {
                let page = s.indices[s.indptr[b] as usize + t / ps] as usize;
                let at = s
                    .layout
                    .offset(fusekit::attention::Kv::K, page, 0, t % ps, 0)
                    as usize;
                s.cache[at] = T::from_f64(t as f64 / 4.0);
            }
        }
        let rows = *s.qo.last().unwrap() as usize * 2;
        let mut q = random_q::<T>(rng, rows * d);
        for (i, x) in q.iter_mut().enumerate() {
            *x = T::from_f64(if i % d == 0 { 1.0 } else { 0.1 * x.to_f64() });
        }
        // Per 64-token tile the max rises by 2^(64 · scale / 4 · log2 e): 2^6.9 at 0.3 (stale, then
        // moved), 2^23 at 1, 2^69 at 3.
        for scale in [0.3f32, 1.0, 3.0] {
            let cfg = DecodeConfig {
                sm_scale: Some(scale),
                ..DecodeConfig::new(2)
            };
            let (o, lse) = run(dev, &s, &q, &cfg).unwrap_or_else(|e| panic!("{e}"));
            check(
                &format!("rising d={d} scale={scale}"),
                &s,
                &q,
                &cfg,
                &o,
                &lse,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    one::<B, bf16>(dev, &mut rng, 64, 16);
    one::<B, f16>(dev, &mut rng, 256, 5);
}

#[test]
fn results_do_not_depend_on_the_batch() {
    fusekit::on_every_backend!("prefill_results_do_not_depend_on_the_batch", |dev| {
        batch_invariance_on(dev)
    });
}

fn batch_invariance_on<B: Backend>(dev: &B) {
    // A sequence alone and beside a longer one: the same bits.
    let mut rng = Rng::new(seed_for("prefill_results_do_not_depend_on_the_batch"));
    let s = setup::<bf16>(&mut rng, 16, 1, 64, &[(20, 30), (40, 100)]);
    let cfg = DecodeConfig::new(2);
    let q = random_q::<bf16>(&mut rng, 130 * 2 * 64);
    let (both, _) = run(dev, &s, &q, &cfg).unwrap();
    let (first, _) = run(dev, &s.only(0), &q[s.rows_of(0, 2, 64)], &cfg).unwrap();
    assert!(
        first
            .iter()
            .zip(&both)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "sequence 0 changed when a longer sequence joined the batch"
    );
}

#[test]
fn nan_keys_and_values_never_pass_as_finite() {
    fusekit::on_every_backend!("nan_keys_and_values_never_pass_as_finite", |dev| {
        nan_on(dev)
    });
}

fn nan_on<B: Backend>(dev: &B) {
    use fusekit::attention::Kv;
    let mut rng = Rng::new(seed_for("nan_keys_and_values_never_pass_as_finite"));
    let cfg = DecodeConfig::new(2);
    // 10 cached + 70 new tokens, one KV head; a NaN in dim 7 of the key, then of the value, of the
    // token at position 45 (new token 35).
    let mut s = setup::<bf16>(&mut rng, 16, 1, 64, &[(10, 70)]);
    let q = random_q::<bf16>(&mut rng, 70 * 2 * 64);
    let q64: Vec<f64> = q.iter().map(|x| x.to_f64()).collect();
    let (pos, first_new, dim) = (45usize, 10usize, 7usize);
    let l = s.layout;
    let page = s.indices[pos / 16] as usize;
    for kv in [Kv::K, Kv::V] {
        let at = l.offset(kv, page, 0, pos % 16, dim) as usize;
        let saved = s.cache[at];
        s.cache[at] = bf16::NAN;
        let (o, lse) = run(dev, &s, &q, &cfg).unwrap();
        let want = reference::prefill(&l, &s.cache64(), &s.table(), &s.qo, &q64, &cfg).unwrap();
        for row in 0..70 * 2 {
            let sees = first_new + row / 2 >= pos;
            // The reference's NaNs (every element and the lse of a row that sees the key; the value's
            // dim of a row that sees the value) must be NaN. A row that does not see the token never
            // meets the key (masked), but its P·V product meets the value with weight 0 (0 · NaN):
            // that one dim may be NaN. Every other element is the reference's.
            for e in 0..64 {
                let (g, w) = (o[row * 64 + e].to_f64(), want.o[row * 64 + e]);
                if w.is_nan() {
                    assert!(g.is_nan(), "{kv:?}: row {row} dim {e} must be NaN, got {g}");
                } else if g.is_nan() {
                    assert!(
                        kv == Kv::V && !sees && e == dim,
                        "{kv:?}: row {row} dim {e} is NaN, the reference {w}"
                    );
                } else {
                    assert!(
                        (g - w).abs() <= 2e-2 + 2e-2 * w.abs(),
                        "{kv:?}: row {row} dim {e}: {g} vs {w}"
                    );
                }
            }
            let (g, w) = (lse[row] as f64, want.lse[row]);
            assert!(
                g.is_nan() == w.is_nan() && (w.is_nan() || (g - w).abs() < 1e-4),
                "{kv:?}: lse row {row}: {g} vs {w}"
            );
            assert_eq!(w.is_nan(), kv == Kv::K && sees, "the reference's NaN rows");
        }
        s.cache[at] = saved;
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    fusekit::on_every_backend!("prefill_bad_input_is_a_typed_error", |dev| {
        bad_input_on(dev)
    });
}

fn bad_input_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("prefill_bad_input_is_a_typed_error"));
    let s = setup::<bf16>(&mut rng, 16, 1, 64, &[(10, 10), (0, 5)]);
    let t = s.table();
    let cfg = DecodeConfig::new(2);
    let invalid = |qo: &[i32]| match PrefillPlan::new::<bf16>(&s.layout, &t, qo, &cfg) {
        Err(Error::InvalidArgument {
            arg: "qo_indptr", ..
        }) => {}
        other => panic!("qo_indptr {qo:?}: {other:?}"),
    };
    invalid(&[0, 21, 26]); // 21 new tokens in a sequence of 20
    invalid(&[0, 10, 16]); // 6 in a sequence of 5
    invalid(&[0, 10, 9]); // decreasing
    invalid(&[1, 10, 15]); // not from 0
    assert!(matches!(
        PrefillPlan::new::<bf16>(&s.layout, &t, &[0, 10], &cfg),
        Err(Error::Shape {
            arg: "qo_indptr",
            ..
        })
    ));
    assert!(matches!(
        PrefillPlan::new::<f16>(&s.layout, &t, &s.qo, &cfg),
        Err(Error::DType { .. })
    ));
    assert!(matches!(
        PrefillPlan::new::<bf16>(&s.layout, &t, &s.qo, &DecodeConfig::new(0)),
        Err(Error::InvalidArgument {
            arg: "num_qo_heads",
            ..
        })
    ));
    let no_window = DecodeConfig {
        window: Some(0),
        ..cfg
    };
    assert!(matches!(
        PrefillPlan::new::<bf16>(&s.layout, &t, &s.qo, &no_window),
        Err(Error::InvalidArgument { arg: "window", .. })
    ));
    let plan = PrefillPlan::new::<bf16>(&s.layout, &t, &s.qo, &cfg).unwrap();
    let rows = plan.rows();
    assert_eq!(rows, 15 * 2);
    let c = dev.upload(&s.cache).unwrap();
    let q = dev.upload(&vec![bf16::ONE; rows * 64]).unwrap();
    let (ip, xp, lp, qp) = (
        dev.upload(&s.indptr).unwrap(),
        dev.upload(&s.indices).unwrap(),
        dev.upload(&s.lens).unwrap(),
        dev.upload(&s.qo).unwrap(),
    );
    let mut ws = PrefillWorkspace::new(dev).unwrap();
    let mut o = poisoned::<B, bf16>(dev, rows * 64).unwrap();
    let mut lse = poisoned::<B, f32>(dev, rows).unwrap();
    let shape = |r: fusekit::Result<()>| match r {
        Err(Error::Shape { arg, .. }) => arg,
        other => panic!("{other:?}"),
    };
    let mut short_o = dev.alloc_zeros::<bf16>(rows * 64 - 8).unwrap();
    let arg = shape(prefill(
        dev,
        &plan,
        &q,
        &c,
        &ip,
        &xp,
        &lp,
        &qp,
        &mut ws,
        &mut short_o,
        &mut lse,
    ));
    assert_eq!(arg, "o");
    let mut short_lse = dev.alloc_zeros::<f32>(rows - 1).unwrap();
    let arg = shape(prefill(
        dev,
        &plan,
        &q,
        &c,
        &ip,
        &xp,
        &lp,
        &qp,
        &mut ws,
        &mut o,
        &mut short_lse,
    ));
    assert_eq!(arg, "lse");
    let short_q = dev.upload(&vec![bf16::ONE; rows * 64 - 64]).unwrap();
    let arg = shape(prefill(
        dev, &plan, &short_q, &c, &ip, &xp, &lp, &qp, &mut ws, &mut o, &mut lse,
    ));
    assert_eq!(arg, "q");
    let qp3 = dev.upload(&[0i32, 10]).unwrap();
    let arg = shape(prefill(
        dev, &plan, &q, &c, &ip, &xp, &lp, &qp3, &mut ws, &mut o, &mut lse,
    ));
    assert_eq!(arg, "qo_indptr");
    // Nothing was launched by the failed calls: the outputs still hold the poison.
    assert!(dev.download(&o).unwrap().iter().all(|x| x.is_poison()));
    // A batch without new tokens launches nothing and succeeds.
    let none = PrefillPlan::new::<bf16>(&s.layout, &t, &[0, 0, 0], &cfg).unwrap();
    assert!(none.launches().is_empty());
    let (q0, qp0) = (
        dev.alloc_zeros::<bf16>(0).unwrap(),
        dev.upload(&[0i32, 0, 0]).unwrap(),
    );
    let (mut o0, mut l0) = (
        dev.alloc_zeros::<bf16>(0).unwrap(),
        dev.alloc_zeros::<f32>(0).unwrap(),
    );
    prefill(
        dev, &none, &q0, &c, &ip, &xp, &lp, &qp0, &mut ws, &mut o0, &mut l0,
    )
    .unwrap();
    ws.check_status_sync(dev).unwrap();
}

#[test]
fn a_device_table_that_disagrees_with_the_plan_is_never_read() {
    fusekit::on_every_backend!(
        "a_device_table_that_disagrees_with_the_plan_is_never_read",
        |dev| { bad_device_table_on(dev) }
    );
}

fn bad_device_table_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("prefill_bad_device_table"));
    let s = setup::<bf16>(&mut rng, 16, 1, 64, &[(30, 20), (0, 5)]);
    let cfg = DecodeConfig::new(2);
    let plan = PrefillPlan::new::<bf16>(&s.layout, &s.table(), &s.qo, &cfg).unwrap();
    let rows = plan.rows();
    let q_h = random_q::<bf16>(&mut rng, rows * 64);
    let c = dev.upload(&s.cache).unwrap();
    let q = dev.upload(&q_h).unwrap();
    let mut ws = PrefillWorkspace::new(dev).unwrap();
    // Launches with device tables `(indptr, indices, lens, qo)`; returns o, lse and the status.
    let mut launch = |indices: &[i32], lens: &[u32], qo: &[i32]| {
        let (ip, xp, lp, qp) = (
            dev.upload(&s.indptr).unwrap(),
            dev.upload(indices).unwrap(),
            dev.upload(lens).unwrap(),
            dev.upload(qo).unwrap(),
        );
        let mut o = poisoned::<B, bf16>(dev, rows * 64).unwrap();
        let mut lse = poisoned::<B, f32>(dev, rows).unwrap();
        prefill(
            dev, &plan, &q, &c, &ip, &xp, &lp, &qp, &mut ws, &mut o, &mut lse,
        )
        .unwrap();
        let status = ws.check_status_sync(dev);
        (
            dev.download(&o).unwrap(),
            dev.download(&lse).unwrap(),
            status,
        )
    };
    // Sequence b's rows against the reference of it alone.
    let exact = |b: usize, o: &[bf16], lse: &[f32]| {
        let rows = s.rows_of(b, 2, 1);
        let one = s.only(b);
        check(
            &format!("sequence {b}"),
            &one,
            &q_h[s.rows_of(b, 2, 64)],
            &cfg,
            &o[s.rows_of(b, 2, 64)],
            &lse[rows],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    };
    let seq1 = s.qo[1] as usize * 2; // first row of sequence 1
    let is_seq = |r: Result<(), Error>, b: usize| match r {
        Err(Error::OutOfRange {
            arg: "page_table",
            index,
            ..
        }) => assert_eq!(index, b),
        other => panic!("status: {other:?}"),
    };
    // A page outside the cache in sequence 0 (its first page: every query tile reads it).
    let mut bad_idx = s.indices.clone();
    bad_idx[0] = s.layout.num_pages() as i32 + 7;
    let (o, lse, st) = launch(&bad_idx, &s.lens, &s.qo);
    is_seq(st, 0);
    assert!(o[..seq1 * 64].iter().all(|x| x.is_nan()) && lse[..seq1].iter().all(|x| x.is_nan()));
    exact(1, &o, &lse);
    // Sequence 0's length no longer matches its pages.
    let (o, lse, st) = launch(&s.indices, &[70, 5], &s.qo);
    is_seq(st, 0);
    assert!(o[..seq1 * 64].iter().all(|x| x.is_nan()) && lse[..seq1].iter().all(|x| x.is_nan()));
    exact(1, &o, &lse);
    // qo_indptr gives sequence 1 more new tokens than it holds (and rows past the output): nothing is
    // written outside o (ASan checks it), the status names sequence 1, sequence 0 is exact.
    let (o, lse, st) = launch(&s.indices, &s.lens, &[0, 20, 31]);
    is_seq(st, 1);
    exact(0, &o, &lse);
    // Both sequences' rows past the output (sequence 0: all 50 tokens new): nothing is written.
    let (o, lse, st) = launch(&s.indices, &s.lens, &[0, 50, 55]);
    is_seq(st, 0);
    assert!(o.iter().all(|x| x.is_poison()) && lse.iter().all(|x| x.is_poison()));
}

#[test]
fn rope_in_prefill_matches_the_reference() {
    fusekit::on_every_backend!("rope_in_prefill_matches_the_reference", |dev| {
        rope_on(dev)
    });
}

/// RoPE in the prefill kernel: q rotated at each new token's position (both modes), keys rotated at
/// their index per K tile (`InAttention`; with `AtAppend` the cache's keys count as rotated already),
/// both pairings, every head dim, each with GQA 1/3/8 and page sizes 1/5/16, a window or a softcap on
/// some, a chunk over a cached prefix and a long fresh prefill (positions up to 300, several K tiles).
fn rope_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("rope_in_prefill_matches_the_reference"));
    let mut turn = 0;
    for style in [RopeStyle::Half, RopeStyle::Interleaved] {
        let r = Rope {
            theta: if style == RopeStyle::Half { 1e4 } else { 1e5 },
            style,
        };
        for mode in [RopeMode::InAttention(r), RopeMode::AtAppend(r)] {
            for d in [64, 128, 256] {
                // GQA and page size move against the head dim from one (style, mode) to the next, so
                // each head dim meets each of them; a window and a softcap on some.
                let (hkv, group) = [(1, 3), (2, 1), (1, 8)][(turn + turn / 3) % 3];
                let ps = [16, 5, 1][(turn + 2 * (turn / 3)) % 3];
                turn += 1;
                let seqs = [(0u32, 70u32), (230, 17), (300, 1)];
                let mut cfg = DecodeConfig::new(hkv * group);
                if turn % 4 == 2 {
                    cfg.window = Some(90);
                }
                if turn % 5 == 3 {
                    cfg.softcap = Some(30.0);
                }
                if turn % 2 == 0 {
                    let mut s = setup::<bf16>(&mut rng, ps, hkv, d, &seqs);
                    s.layout = s.layout.with_rope(mode).unwrap();
                    run_case(dev, &mut rng, &s, &cfg).unwrap_or_else(|e| panic!("{e}"));
                } else {
                    let mut s = setup::<f16>(&mut rng, ps, hkv, d, &seqs);
                    s.layout = s.layout.with_rope(mode).unwrap();
                    run_case(dev, &mut rng, &s, &cfg).unwrap_or_else(|e| panic!("{e}"));
                }
            }
        }
    }
}

/// A KIVI cache of `format` holding `s`'s tokens (the values of `s.cache`, rounded to T, quantised as
/// the append kernels do), each sequence in a scrambled residual slot.
struct QuantSetup<T: KvElement> {
    layout: PagedKvLayout,
    bytes: Vec<u8>,
    residual: Vec<T>,
    slots: Vec<i32>,
    n_slots: usize,
    /// `s` with its cache replaced by what the kernel attends over: the dequantised values
    /// (`fmaf(code, scale, zero)` in f32) rounded to T, the residual's values as they are.
    view: Setup<T>,
}

fn quantize<T: KvElement>(s: &Setup<T>, format: KvFormat) -> QuantSetup<T> {
    let l = &s.layout;
    let layout = PagedKvLayout::new(
        l.num_pages(),
        l.page_size(),
        l.num_kv_heads(),
        l.head_dim(),
        format,
    )
    .unwrap()
    .with_rope(l.rope())
    .unwrap();
    let batch = s.lens.len();
    let n_slots = batch + 2;
    let slots: Vec<i32> = (0..batch).map(|b| ((b + 2) % n_slots) as i32).collect();
    let packed = pack_quantized::<T>(&layout, &s.cache64(), &s.table(), &slots, n_slots).unwrap();
    let cache = packed
        .dequantized
        .iter()
        .map(|&v| T::from_f64(v as f32 as f64))
        .collect();
    QuantSetup {
        layout,
        bytes: packed.bytes,
        residual: packed.residual,
        slots,
        n_slots,
        view: Setup {
            layout: s.layout,
            cache,
            indptr: s.indptr.clone(),
            indices: s.indices.clone(),
            lens: s.lens.clone(),
            qo: s.qo.clone(),
        },
    }
}

/// One quantised prefill on `dev` with device residual slots `dev_slots` and page indices
/// `dev_indices`: (o, lse, status).
fn run_quant<B: Backend, T: KvElement>(
    dev: &B,
    qs: &QuantSetup<T>,
    q: &[T],
    cfg: &DecodeConfig,
    dev_slots: &[i32],
    dev_indices: &[i32],
) -> (Vec<T>, Vec<f32>, Result<(), Error>) {
    let s = &qs.view;
    let plan =
        PrefillPlan::new_quantized::<T>(&qs.layout, &s.table(), &s.qo, &qs.slots, qs.n_slots, cfg)
            .unwrap();
    let d = s.layout.head_dim();
    let (c, r) = (
        dev.upload(&qs.bytes).unwrap(),
        dev.upload(&qs.residual).unwrap(),
    );
    let q_d = dev.upload(q).unwrap();
    let (ip, xp, lp, qp, sp) = (
        dev.upload(&s.indptr).unwrap(),
        dev.upload(dev_indices).unwrap(),
        dev.upload(&s.lens).unwrap(),
        dev.upload(&s.qo).unwrap(),
        dev.upload(dev_slots).unwrap(),
    );
    let mut ws = PrefillWorkspace::new(dev).unwrap();
    let mut o = poisoned::<B, T>(dev, plan.rows() * d).unwrap();
    let mut lse = poisoned::<B, f32>(dev, plan.rows()).unwrap();
    prefill_quantized(
        dev, &plan, &q_d, &c, &r, &ip, &xp, &lp, &qp, &sp, &mut ws, &mut o, &mut lse,
    )
    .unwrap();
    let status = ws.check_status_sync(dev);
    (
        dev.download(&o).unwrap(),
        dev.download(&lse).unwrap(),
        status,
    )
}

fn quant_case<B: Backend, T: KvElement>(
    dev: &B,
    rng: &mut Rng,
    s: &Setup<T>,
    format: KvFormat,
    cfg: &DecodeConfig,
) -> Result<(), String> {
    let qs = quantize(s, format);
    let d = s.layout.head_dim();
    let q = random_q::<T>(rng, *s.qo.last().unwrap() as usize * cfg.num_qo_heads * d);
    let (o, lse, status) = run_quant(dev, &qs, &q, cfg, &qs.slots, &s.indices);
    status.map_err(|e| e.to_string())?;
    let what = format!(
        "{} {format:?} d={d} ps={} hkv={} hq={} lens={:?} qo={:?} {cfg:?} {:?}",
        T::NAME,
        s.layout.page_size(),
        s.layout.num_kv_heads(),
        cfg.num_qo_heads,
        s.lens,
        s.qo,
        s.layout.rope()
    );
    check(&what, &qs.view, &q, cfg, &o, &lse)
}

#[test]
fn quantized_prefill_matches_the_reference() {
    fusekit::on_every_backend!("quantized_prefill_matches_the_reference", |dev| {
        quantized_on(dev)
    });
}

/// Every quantised instantiation (int8/int4 x bf16/f16 x head dim) over a batch holding: a fresh
/// prefill of 65 tokens, 17 new over a prefix of 33, one new over 300, 20 new over 5 (under any group:
/// wholly in the residual) and 66 new over 190 (256 tokens: complete groups only, an empty residual);
/// so every group size has several coded groups. Groups 32/64/128, page sizes 16, 5, 1, 80 and 64 (pages
/// of several K parameter slots, groups that cross pages), GQA 1/3/4/8 in turn; a window of 100 (tiles
/// that start mid-group and touch three groups) on half the cases, a softcap and RoPE (in attention, at
/// append) on some.
fn quantized_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("quantized_prefill_matches_the_reference"));
    fn one<B: Backend, T: KvElement>(dev: &B, rng: &mut Rng, bits: usize, turn: &mut usize) {
        const GROUPS: [(usize, usize); 4] = [(2, 1), (1, 3), (2, 4), (1, 8)];
        const SEQS: [(u32, u32); 5] = [(0, 65), (33, 17), (300, 1), (5, 20), (190, 66)];
        for d in [64, 128, 256] {
            let (hkv, gqa) = GROUPS[*turn % GROUPS.len()];
            let ps = [16, 5, 1, 80, 64][*turn % 5];
            let group = [32, 64, 128][*turn % 3];
            *turn += 1;
            let mut s = setup::<T>(rng, ps, hkv, d, &SEQS);
            let mut cfg = DecodeConfig::new(hkv * gqa);
            if *turn % 2 == 0 {
                cfg.window = Some(100);
            }
            if *turn % 3 == 0 {
                cfg.softcap = Some(20.0);
            }
            if *turn % 4 == 1 {
                let r = Rope {
                    theta: 1e4,
                    style: RopeStyle::Half,
                };
                s.layout = s.layout.with_rope(RopeMode::InAttention(r)).unwrap();
            } else if *turn % 4 == 3 {
                let r = Rope {
                    theta: 1e5,
                    style: RopeStyle::Interleaved,
                };
                s.layout = s.layout.with_rope(RopeMode::AtAppend(r)).unwrap();
            }
            let format = if bits == 8 {
                KvFormat::Int8 { group }
            } else {
                KvFormat::Int4 { group }
            };
            quant_case(dev, rng, &s, format, &cfg).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let mut turn = 0;
    for bits in [8, 4] {
        one::<B, bf16>(dev, &mut rng, bits, &mut turn);
        one::<B, f16>(dev, &mut rng, bits, &mut turn);
    }
}

#[test]
fn quantized_prefill_bad_input_is_a_typed_error() {
    fusekit::on_every_backend!("quantized_prefill_bad_input_is_a_typed_error", |dev| {
        quantized_bad_input_on(dev)
    });
}

fn quantized_bad_input_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("quantized_prefill_bad_input_is_a_typed_error"));
    let s = setup::<bf16>(&mut rng, 16, 1, 64, &[(30, 20), (0, 40)]);
    let qs = quantize(&s, KvFormat::Int8 { group: 32 });
    let (t, cfg) = (s.table(), DecodeConfig::new(2));
    let dtype = |r: Result<PrefillPlan, Error>| {
        assert!(matches!(r, Err(Error::DType { .. })), "{r:?}");
    };
    // Plans: a quantised layout in new(), a bf16 layout in new_quantized(), shared and out-of-range
    // slots.
    dtype(PrefillPlan::new::<bf16>(&qs.layout, &t, &s.qo, &cfg));
    dtype(PrefillPlan::new_quantized::<bf16>(
        &s.layout,
        &t,
        &s.qo,
        &[0, 1],
        2,
        &cfg,
    ));
    let r = PrefillPlan::new_quantized::<bf16>(&qs.layout, &t, &s.qo, &[1, 1], 2, &cfg);
    assert!(matches!(r, Err(Error::InvalidArgument { .. })), "{r:?}");
    let r = PrefillPlan::new_quantized::<bf16>(&qs.layout, &t, &s.qo, &[0, 2], 2, &cfg);
    assert!(
        matches!(
            r,
            Err(Error::OutOfRange {
                arg: "residual_slots",
                ..
            })
        ),
        "{r:?}"
    );
    // Launches: each plan with the other entry point, a residual of the wrong size.
    let plan =
        PrefillPlan::new_quantized::<bf16>(&qs.layout, &t, &s.qo, &qs.slots, qs.n_slots, &cfg)
            .unwrap();
    let plain = PrefillPlan::new::<bf16>(&s.layout, &t, &s.qo, &cfg).unwrap();
    let q = dev
        .upload(&random_q::<bf16>(&mut rng, plan.rows() * 64))
        .unwrap();
    let (c, r) = (
        dev.upload(&qs.bytes).unwrap(),
        dev.upload(&qs.residual).unwrap(),
    );
    let short = dev.upload(&qs.residual[64..]).unwrap();
    let c16 = dev.upload(&s.cache).unwrap();
    let (ip, xp, lp, qp, sp) = (
        dev.upload(&s.indptr).unwrap(),
        dev.upload(&s.indices).unwrap(),
        dev.upload(&s.lens).unwrap(),
        dev.upload(&s.qo).unwrap(),
        dev.upload(&qs.slots).unwrap(),
    );
    let mut ws = PrefillWorkspace::new(dev).unwrap();
    let mut o = poisoned::<B, bf16>(dev, plan.rows() * 64).unwrap();
    let mut lse = poisoned::<B, f32>(dev, plan.rows()).unwrap();
    let e = prefill(
        dev, &plan, &q, &c16, &ip, &xp, &lp, &qp, &mut ws, &mut o, &mut lse,
    );
    assert!(matches!(e, Err(Error::DType { .. })), "{e:?}");
    let e = prefill_quantized(
        dev, &plain, &q, &c, &r, &ip, &xp, &lp, &qp, &sp, &mut ws, &mut o, &mut lse,
    );
    assert!(matches!(e, Err(Error::DType { .. })), "{e:?}");
    let e = prefill_quantized(
        dev, &plan, &q, &c, &short, &ip, &xp, &lp, &qp, &sp, &mut ws, &mut o, &mut lse,
    );
    assert!(
        matches!(
            e,
            Err(Error::Shape {
                arg: "residual",
                ..
            })
        ),
        "{e:?}"
    );
    // Nothing was launched: the outputs are still poison.
    assert!(dev.download(&o).unwrap().iter().all(|x| x.is_poison()));
    // A device residual slot outside [0, slots) for sequence 1: its rows are NaN, the status names it,
    // sequence 0 is exact.
    let q_h = random_q::<bf16>(&mut rng, plan.rows() * 64);
    let (o, lse, st) = run_quant(
        dev,
        &qs,
        &q_h,
        &cfg,
        &[qs.slots[0], qs.n_slots as i32],
        &s.indices,
    );
    let is_seq = |r: Result<(), Error>, b: usize| match r {
        Err(Error::OutOfRange {
            arg: "page_table",
            index,
            ..
        }) => assert_eq!(index, b),
        other => panic!("status: {other:?}"),
    };
    is_seq(st, 1);
    let seq1 = s.qo[1] as usize * 2;
    assert!(o[seq1 * 64..].iter().all(|x| x.is_nan()) && lse[seq1..].iter().all(|x| x.is_nan()));
    let exact = |b: usize, o: &[bf16], lse: &[f32]| {
        check(
            &format!("sequence {b}"),
            &qs.view.only(b),
            &q_h[s.rows_of(b, 2, 64)],
            &cfg,
            &o[s.rows_of(b, 2, 64)],
            &lse[s.rows_of(b, 2, 1)],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    };
    exact(0, &o, &lse);
    // A page outside the cache: sequence 1's first page (its codes and its first group's K
    // parameters), then sequence 0's second (codes of tokens 16..31, in its complete first group).
    // That sequence's rows are NaN, the status names it, the other is exact.
    for (b, at) in [(1usize, s.indptr[1] as usize), (0, 1)] {
        let mut bad = s.indices.clone();
        bad[at] = qs.layout.num_pages() as i32 + 3;
        let (o, lse, st) = run_quant(dev, &qs, &q_h, &cfg, &qs.slots, &bad);
        is_seq(st, b);
        let rows = s.rows_of(b, 2, 1);
        assert!(lse[rows.clone()].iter().all(|x| x.is_nan()));
        assert!(o[s.rows_of(b, 2, 64)].iter().all(|x| x.is_nan()));
        exact(1 - b, &o, &lse);
    }
}
