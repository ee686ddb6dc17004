//! The attention decode and merge kernels against the f64 reference, on the SIMT emulator always and on
//! a GPU when one is present: every element type × head dim × heads-per-CTA instantiation, page sizes 1,
//! 16 and odd, lengths 1, not a multiple of the page and across several splits, GQA 1/2/3/4/8/12,
//! softcap and window; outputs poisoned first; a device page table that disagrees with the plan. Also
//! the shared decode of inter-layer sharing (PoD: proximal part + distant part on the leader's keys and
//! the layer's V pool, merged) and the copy of values into a V pool, over bf16/f16 and KIVI int8/int4
//! caches.

use fusekit::attention::{
    copy_values, copy_values_quantized, decode, decode_shared, decode_shared_quantized,
    pack_quantized, reference, DecodeConfig, DecodePlan, DecodeWorkspace, DeviceTable, Kv,
    KvElement, KvFormat, PageTable, PagedKvLayout, Rope, RopeMode, RopeStyle, SharedDecodePlan,
};
use fusekit::testing::{poisoned, seed_for, Dist, Rng};
use fusekit::{Backend, Error};
use half::{bf16, f16};

mod common;
use common::{check_o_lse, random_q};

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
    let q: Vec<T> = random_q(rng, rows * d);
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
    let (got_o, got_lse) = (dev.download(&o).unwrap(), dev.download(&lse).unwrap());
    check_o_lse::<T>(&what, &got_o, &got_lse, &want.o, &want.lse)?;
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

/// A batch for a shared decode. Sequence `b` of the member layer holds `sinks` full pages, then
/// `distant` full pages, then `window` tokens; its proximal table is the sinks' and the window's pages,
/// its distant table names pages of the leader's cache (and of the V pool), where `copy_values` puts
/// the member's distant values.
struct SharedCase {
    ps: usize,
    hkv: usize,
    group: usize,
    d: usize,
    seqs: Vec<(usize, usize, usize)>,
    /// The leader is the member itself (its cache, its q, its own pages): the shared decode is then
    /// exact attention over the whole sequence.
    identity: bool,
}

/// `(o, lse)` of the f64 reference decode over a table in which a sequence may be empty (then `(0, −∞)`).
fn reference_part(
    l: &PagedKvLayout,
    cache: &[f64],
    t: &PageTable<'_>,
    q: &[f64],
    cfg: &DecodeConfig,
) -> (Vec<f64>, Vec<f64>) {
    let (hq, d) = (cfg.num_qo_heads, l.head_dim());
    let batch = t.seq_lens.len();
    let (mut o, mut lse) = (
        vec![0.0; batch * hq * d],
        vec![f64::NEG_INFINITY; batch * hq],
    );
    for b in 0..batch {
        if t.seq_lens[b] == 0 {
            continue;
        }
        let (p0, p1) = (t.page_indptr[b] as usize, t.page_indptr[b + 1] as usize);
        let one = PageTable {
            page_indptr: &[0, (p1 - p0) as i32],
            page_indices: &t.page_indices[p0..p1],
            seq_lens: &t.seq_lens[b..b + 1],
        };
        let r = reference::decode(l, cache, &one, &q[b * hq * d..(b + 1) * hq * d], cfg).unwrap();
        o[b * hq * d..(b + 1) * hq * d].copy_from_slice(&r.o);
        lse[b * hq..(b + 1) * hq].copy_from_slice(&r.lse);
    }
    (o, lse)
}

type HostTable = (Vec<i32>, Vec<i32>, Vec<u32>);

fn pt(t: &HostTable) -> PageTable<'_> {
    PageTable {
        page_indptr: &t.0,
        page_indices: &t.1,
        seq_lens: &t.2,
    }
}

/// The host tables of a shared case, on pages scrambled by `rng` (the member's and, unless
/// `identity`, the leader's): `full` (the member's whole sequence), `prox`, `dist` (the leader's
/// pages), `lead` (the leader's own table over its sequences with distant tokens), and the copy lists
/// (`src[i]` of the member's cache to page `dst[i]` of the pool).
struct SharedTables {
    full: HostTable,
    prox: HostTable,
    dist: HostTable,
    lead: HostTable,
    src: Vec<i32>,
    dst: Vec<i32>,
}

fn shared_tables(rng: &mut Rng, c: &SharedCase, num_pages: usize) -> SharedTables {
    let ps = c.ps;
    let pages_of = |&(s, m, w): &(usize, usize, usize)| s + m + w.div_ceil(ps);
    let mut free: Vec<i32> = (0..num_pages as i32).collect();
    let mut lead_free = free.clone();
    for list in [&mut free, &mut lead_free] {
        for i in (1..list.len()).rev() {
            list.swap(i, rng.below(i as u64 + 1) as usize);
        }
    }
    let empty = || (vec![0i32], Vec::new(), Vec::new());
    let mut t = SharedTables {
        full: empty(),
        prox: empty(),
        dist: empty(),
        lead: empty(),
        src: Vec::new(),
        dst: Vec::new(),
    };
    for seq in &c.seqs {
        let &(s, m, w) = seq;
        let own: Vec<i32> = free.drain(..pages_of(seq)).collect();
        let lead: Vec<i32> = if c.identity {
            own[s..s + m].to_vec()
        } else {
            lead_free.drain(..m).collect()
        };
        t.full.1.extend_from_slice(&own);
        t.full.2.push(((s + m) * ps + w) as u32);
        t.prox.1.extend_from_slice(&own[..s]);
        t.prox.1.extend_from_slice(&own[s + m..]);
        t.prox.2.push((s * ps + w) as u32);
        t.dist.1.extend_from_slice(&lead);
        t.dist.2.push((m * ps) as u32);
        if m > 0 {
            t.lead.1.extend_from_slice(&lead);
            t.lead.2.push((m * ps) as u32);
            t.lead.0.push(t.lead.1.len() as i32);
        }
        t.src.extend_from_slice(&own[s..s + m]);
        t.dst.extend_from_slice(&lead);
        for h in [&mut t.full, &mut t.prox, &mut t.dist] {
            h.0.push(h.1.len() as i32);
        }
    }
    t
}

/// The oracle of a shared decode over the f64 values the kernels read (`member`, `leader`, in
/// [`PagedKvLayout::offset`] order): exact attention over the member's whole sequence when the leader is
/// the member itself, else the proximal part and the distant part (the leader's keys, the member's
/// values at the leader's pages) merged.
#[allow(clippy::too_many_arguments)]
fn shared_oracle(
    l: &PagedKvLayout,
    c: &SharedCase,
    t: &SharedTables,
    member: &[f64],
    leader: &[f64],
    q: &[f64],
    q_leader: &[f64],
    cfg: &DecodeConfig,
) -> Result<(Vec<f64>, Vec<f64>), Error> {
    if c.identity {
        let r = reference::decode(l, member, &pt(&t.full), q, cfg)?;
        return Ok((r.o, r.lse));
    }
    let mut combined = leader.to_vec();
    for (&sp, &dp) in t.src.iter().zip(&t.dst) {
        for h in 0..c.hkv {
            for slot in 0..c.ps {
                for e in 0..c.d {
                    combined[l.offset(Kv::V, dp as usize, h, slot, e) as usize] =
                        member[l.offset(Kv::V, sp as usize, h, slot, e) as usize];
                }
            }
        }
    }
    let (po, pl) = reference_part(l, member, &pt(&t.prox), q, cfg);
    let (dist_o, dlse) = reference_part(l, &combined, &pt(&t.dist), q_leader, cfg);
    reference::merge(&po, &pl, &dist_o, &dlse, c.d)
}

/// A page table's three buffers on the device, and their [`DeviceTable`].
type DevTable<B> = (
    <B as Backend>::Buffer<i32>,
    <B as Backend>::Buffer<i32>,
    <B as Backend>::Buffer<u32>,
);

fn upload_table<B: Backend>(dev: &B, t: &PageTable) -> Result<DevTable<B>, Error> {
    Ok((
        dev.upload(t.page_indptr)?,
        dev.upload(t.page_indices)?,
        dev.upload(t.seq_lens)?,
    ))
}

fn device_table<B: Backend>(
    t: &DevTable<B>,
) -> DeviceTable<'_, B::Buffer<i32>, B::Buffer<i32>, B::Buffer<u32>> {
    DeviceTable {
        page_indptr: &t.0,
        page_indices: &t.1,
        seq_lens: &t.2,
    }
}

fn shared_case<B: Backend, T: KvElement>(
    dev: &B,
    rng: &mut Rng,
    c: &SharedCase,
) -> Result<(), Box<dyn std::error::Error>> {
    let (ps, d) = (c.ps, c.d);
    let pages_of = |&(s, m, w): &(usize, usize, usize)| s + m + w.div_ceil(ps);
    let need: usize = c.seqs.iter().map(pages_of).sum();
    let l = PagedKvLayout::new(need + 3, ps, c.hkv, d, T::FORMAT)?;
    let normal = Dist::Normal {
        mean: 0.0,
        std: 1.0,
    };
    let mut random_t =
        |n: usize| -> Vec<T> { rng.sample(normal, n).into_iter().map(T::from_f64).collect() };
    let member = random_t(l.elements() as usize);
    let leader = if c.identity {
        member.clone()
    } else {
        random_t(l.elements() as usize)
    };
    let cfg = DecodeConfig::new(c.hkv * c.group);
    let rows = c.seqs.len() * cfg.num_qo_heads;
    let q = random_t(rows * d);
    let q_leader = if c.identity {
        q.clone()
    } else {
        random_t(rows * d)
    };
    let t = shared_tables(rng, c, l.num_pages());
    let (member_d, leader_d) = (dev.upload(&member)?, dev.upload(&leader)?);
    let mut pool = poisoned::<B, T>(dev, l.v_pool_elements()? as usize)?;
    copy_values(dev, &l, &member_d, &mut pool, &t.src, &t.dst)?;
    let plan = SharedDecodePlan::new::<T>(&l, &pt(&t.prox), &pt(&t.dist), &cfg, Some(32))?;
    let (pd, dd) = (
        upload_table(dev, &pt(&t.prox))?,
        upload_table(dev, &pt(&t.dist))?,
    );
    let (qd, qld) = (dev.upload(&q)?, dev.upload(&q_leader)?);
    let mut ws = DecodeWorkspace::for_shared(dev, &plan)?;
    let mut o = poisoned::<B, T>(dev, rows * d)?;
    let mut lse = poisoned::<B, f32>(dev, rows)?;
    decode_shared(
        dev,
        &plan,
        &qd,
        &member_d,
        device_table::<B>(&pd),
        &qld,
        &leader_d,
        &pool,
        device_table::<B>(&dd),
        &mut ws,
        &mut o,
        &mut lse,
    )?;
    ws.check_status_sync(dev)?;
    let f64s = |x: &[T]| -> Vec<f64> { x.iter().map(|v| v.to_f64()).collect() };
    let (want_o, want_lse) = shared_oracle(
        &l,
        c,
        &t,
        &f64s(&member),
        &f64s(&leader),
        &f64s(&q),
        &f64s(&q_leader),
        &cfg,
    )?;
    let what = format!(
        "shared {} ps={ps} hkv={} group={} d={d} seqs={:?} identity={}",
        T::NAME,
        c.hkv,
        c.group,
        c.seqs,
        c.identity
    );
    check_o_lse::<T>(
        &what,
        &dev.download(&o)?,
        &dev.download(&lse)?,
        &want_o,
        &want_lse,
    )?;
    Ok(())
}

#[test]
fn shared_decode_matches_the_reference() {
    fusekit::on_every_backend!("shared_decode_matches_the_reference", |dev| {
        shared_on(dev)
    });
}

fn shared_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("shared_decode_matches_the_reference"));
    for identity in [true, false] {
        // SmolLM2's shape (3 KV heads, 3 query heads each, head dim 64); a sequence without distant
        // tokens; one without sinks.
        let c = SharedCase {
            ps: 16,
            hkv: 3,
            group: 3,
            d: 64,
            seqs: vec![(1, 6, 40), (1, 0, 9), (0, 2, 1)],
            identity,
        };
        shared_case::<B, bf16>(dev, &mut rng, &c).unwrap();
        let c = SharedCase {
            ps: 1,
            hkv: 1,
            group: 8,
            d: 128,
            seqs: vec![(4, 50, 20), (1, 3, 1)],
            identity,
        };
        shared_case::<B, f16>(dev, &mut rng, &c).unwrap();
        let c = SharedCase {
            ps: 7,
            hkv: 2,
            group: 1,
            d: 256,
            seqs: vec![(1, 5, 13)],
            identity,
        };
        shared_case::<B, bf16>(dev, &mut rng, &c).unwrap();
    }
}

/// A shared decode over KIVI caches: as [`shared_case`], with the member's and the leader's caches
/// packed by [`pack_quantized`] (K and V with an outlier channel), the member's residual slots scrambled,
/// and the V pool of bytes filled by [`copy_values_quantized`] (poisoned first). `s · ps` and `m · ps`
/// must be whole groups (the alignment retention gives). The oracle is the f64 reference over exactly
/// what the kernels read: the dequantised caches.
fn shared_quant_case<B: Backend, T: KvElement>(
    dev: &B,
    rng: &mut Rng,
    c: &SharedCase,
    format: KvFormat,
) -> Result<(), Box<dyn std::error::Error>> {
    let (ps, d) = (c.ps, c.d);
    let g = format.group().unwrap();
    let pages_of = |&(s, m, w): &(usize, usize, usize)| s + m + w.div_ceil(ps);
    let need: usize = c.seqs.iter().map(pages_of).sum();
    let l = PagedKvLayout::new(need + 3, ps, c.hkv, d, format)?;
    let normal = Dist::Normal {
        mean: 0.0,
        std: 1.0,
    };
    let values = |rng: &mut Rng| -> Vec<f64> {
        rng.sample(normal, l.elements() as usize)
            .into_iter()
            .enumerate()
            .map(|(i, x)| if i % d == 5 { 8.0 * x } else { x })
            .collect()
    };
    let member = values(rng);
    let leader = if c.identity {
        member.clone()
    } else {
        values(rng)
    };
    let cfg = DecodeConfig::new(c.hkv * c.group);
    let batch = c.seqs.len();
    let rows = batch * cfg.num_qo_heads;
    let q: Vec<T> = random_q(rng, rows * d);
    let q_leader: Vec<T> = if c.identity {
        q.clone()
    } else {
        random_q(rng, rows * d)
    };
    for &(sinks, m, _) in &c.seqs {
        assert!(
            (sinks * ps) % g == 0 && (m * ps) % g == 0,
            "a misaligned case"
        );
    }
    let t = shared_tables(rng, c, l.num_pages());
    // One spare residual slot, the slots scrambled.
    let mut slots: Vec<i32> = (0..batch as i32 + 1).collect();
    for i in (1..slots.len()).rev() {
        slots.swap(i, rng.below(i as u64 + 1) as usize);
    }
    slots.truncate(batch);
    let n_slots = batch + 1;
    let packed_m = pack_quantized::<T>(&l, &member, &pt(&t.full), &slots, n_slots)?;
    let (lead_bytes, lead_deq) = if c.identity {
        (packed_m.bytes.clone(), packed_m.dequantized.clone())
    } else if t.lead.2.is_empty() {
        (
            vec![0u8; l.bytes() as usize],
            vec![0.0; l.elements() as usize],
        )
    } else {
        let k = t.lead.2.len();
        let p = pack_quantized::<T>(
            &l,
            &leader,
            &pt(&t.lead),
            &(0..k as i32).collect::<Vec<_>>(),
            k,
        )?;
        // Whole groups: nothing in the leader's residual.
        assert!(p.residual.iter().all(|x| x.to_f64() == 0.0));
        (p.bytes, p.dequantized)
    };
    let (member_d, leader_d) = (dev.upload(&packed_m.bytes)?, dev.upload(&lead_bytes)?);
    let (res_d, slots_d) = (dev.upload(&packed_m.residual)?, dev.upload(&slots)?);
    let mut pool = poisoned::<B, u8>(dev, l.v_pool_bytes() as usize)?;
    copy_values_quantized(dev, &l, &member_d, &mut pool, &t.src, &t.dst)?;
    let plan = SharedDecodePlan::new_quantized::<T>(
        &l,
        &pt(&t.prox),
        &pt(&t.dist),
        &slots,
        n_slots,
        &cfg,
        Some(32),
    )?;
    let (pd, dd) = (
        upload_table(dev, &pt(&t.prox))?,
        upload_table(dev, &pt(&t.dist))?,
    );
    let (qd, qld) = (dev.upload(&q)?, dev.upload(&q_leader)?);
    let mut ws = DecodeWorkspace::for_shared(dev, &plan)?;
    let mut o = poisoned::<B, T>(dev, rows * d)?;
    let mut lse = poisoned::<B, f32>(dev, rows)?;
    decode_shared_quantized(
        dev,
        &plan,
        &qd,
        &member_d,
        &res_d,
        &slots_d,
        device_table::<B>(&pd),
        &qld,
        &leader_d,
        &pool,
        device_table::<B>(&dd),
        &mut ws,
        &mut o,
        &mut lse,
    )?;
    ws.check_status_sync(dev)?;
    let f64s = |x: &[T]| -> Vec<f64> { x.iter().map(|v| v.to_f64()).collect() };
    // The oracle over exactly what the kernels read: the dequantised caches.
    let (want_o, want_lse) = shared_oracle(
        &l,
        c,
        &t,
        &packed_m.dequantized,
        &lead_deq,
        &f64s(&q),
        &f64s(&q_leader),
        &cfg,
    )?;
    let what = format!(
        "shared {format:?} {} ps={ps} hkv={} group={} d={d} seqs={:?} identity={}",
        T::NAME,
        c.hkv,
        c.group,
        c.seqs,
        c.identity
    );
    check_o_lse::<T>(
        &what,
        &dev.download(&o)?,
        &dev.download(&lse)?,
        &want_o,
        &want_lse,
    )?;
    Ok(())
}

#[test]
fn shared_quantized_decode_matches_the_reference() {
    fusekit::on_every_backend!("shared_quantized_decode_matches_the_reference", |dev| {
        shared_quant_on(dev)
    });
}

fn shared_quant_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("shared_quantized_decode_matches_the_reference"));
    let case = |ps, hkv, group, d, seqs: &[(usize, usize, usize)], identity| SharedCase {
        ps,
        hkv,
        group,
        d,
        seqs: seqs.to_vec(),
        identity,
    };
    for identity in [true, false] {
        // SmolLM2's shape at int4 G32: a sequence without distant tokens, one without sinks; residuals
        // of 8, 9 and 1 tokens.
        let c = case(16, 3, 3, 64, &[(2, 4, 40), (2, 0, 9), (0, 2, 1)], identity);
        shared_quant_case::<B, bf16>(dev, &mut rng, &c, KvFormat::Int4 { group: 32 }).unwrap();
        // Pages of a whole group, GQA 8; the second sequence's residual is empty.
        let c = case(64, 1, 8, 128, &[(1, 2, 70), (1, 1, 64)], identity);
        shared_quant_case::<B, f16>(dev, &mut rng, &c, KvFormat::Int8 { group: 64 }).unwrap();
        // Groups of 16 pages, head dim 256.
        let c = case(8, 2, 1, 256, &[(16, 32, 20)], identity);
        shared_quant_case::<B, bf16>(dev, &mut rng, &c, KvFormat::Int4 { group: 128 }).unwrap();
        // Page size 1.
        let c = case(1, 1, 4, 64, &[(32, 64, 5)], identity);
        shared_quant_case::<B, f16>(dev, &mut rng, &c, KvFormat::Int8 { group: 32 }).unwrap();
        // Pages of two K groups (K parameter slot 1 read) and 4 V groups per token; a sequence with
        // no distant token.
        let c = case(64, 2, 2, 128, &[(1, 2, 45), (2, 0, 33)], identity);
        shared_quant_case::<B, bf16>(dev, &mut rng, &c, KvFormat::Int4 { group: 32 }).unwrap();
        // Pages of 5 tokens: groups cross pages, units of lcm(5, 64) = 320 tokens.
        let c = case(5, 1, 2, 64, &[(64, 128, 7), (0, 64, 3)], identity);
        shared_quant_case::<B, f16>(dev, &mut rng, &c, KvFormat::Int4 { group: 64 }).unwrap();
    }
}

#[test]
fn shared_bad_input_is_a_typed_error() {
    fusekit::on_every_backend!("shared_bad_input_is_a_typed_error", |dev| {
        shared_bad_input_on(dev)
    });
}

fn shared_bad_input_on<B: Backend>(dev: &B) {
    let l = PagedKvLayout::new(8, 4, 1, 64, KvFormat::Bf16).unwrap();
    let prox = PageTable {
        page_indptr: &[0, 1],
        page_indices: &[0],
        seq_lens: &[3],
    };
    let dist = PageTable {
        page_indptr: &[0, 2],
        page_indices: &[5, 6],
        seq_lens: &[8],
    };
    let cfg = DecodeConfig::new(2);
    let plan = |l: &PagedKvLayout, p: &PageTable, d: &PageTable, c: &DecodeConfig| {
        SharedDecodePlan::new::<bf16>(l, p, d, c, None)
    };
    assert!(plan(&l, &prox, &dist, &cfg).is_ok());
    let rope = Rope {
        theta: 1e4,
        style: RopeStyle::Half,
    };
    let roped = l.with_rope(RopeMode::InAttention(rope)).unwrap();
    assert!(matches!(
        plan(&roped, &prox, &dist, &cfg),
        Err(Error::Unsupported { .. })
    ));
    let windowed = DecodeConfig {
        window: Some(4),
        ..cfg
    };
    assert!(matches!(
        plan(&l, &prox, &dist, &windowed),
        Err(Error::InvalidArgument {
            arg: "cfg.window",
            ..
        })
    ));
    // A quantised layout takes new_quantized.
    let q8 = PagedKvLayout::new(8, 4, 1, 64, KvFormat::Int8 { group: 32 }).unwrap();
    assert!(matches!(
        plan(&q8, &prox, &dist, &cfg),
        Err(Error::DType { arg: "cache", .. })
    ));
    let two = PageTable {
        page_indptr: &[0, 1, 2],
        page_indices: &[5, 6],
        seq_lens: &[4, 4],
    };
    assert!(matches!(
        plan(&l, &prox, &two, &cfg),
        Err(Error::Shape { .. })
    ));
    // An empty proximal sequence is an error (the query's own token is proximal); an empty distant
    // one is not; a distant page out of range is.
    let empty = PageTable {
        page_indptr: &[0, 0],
        page_indices: &[],
        seq_lens: &[0],
    };
    assert!(plan(&l, &empty, &dist, &cfg).is_err());
    assert!(plan(&l, &prox, &empty, &cfg).is_ok());
    let out = PageTable {
        page_indices: &[5, 8],
        ..dist
    };
    assert!(matches!(
        plan(&l, &prox, &out, &cfg),
        Err(Error::OutOfRange { .. })
    ));
    // copy_values: lists checked on the host.
    let cache = dev.alloc_zeros::<bf16>(l.elements() as usize).unwrap();
    let mut pool = dev
        .alloc_zeros::<bf16>(l.v_pool_elements().unwrap() as usize)
        .unwrap();
    assert!(matches!(
        copy_values(dev, &l, &cache, &mut pool, &[1, 2], &[3, 3]),
        Err(Error::InvalidArgument {
            arg: "dst_pages",
            ..
        })
    ));
    assert!(matches!(
        copy_values(dev, &l, &cache, &mut pool, &[1, 8], &[3, 4]),
        Err(Error::OutOfRange {
            arg: "src_pages",
            index: 1,
            ..
        })
    ));
    assert!(matches!(
        copy_values(dev, &l, &cache, &mut pool, &[1], &[3, 4]),
        Err(Error::Shape { .. })
    ));
    let mut small = dev.alloc_zeros::<bf16>(8).unwrap();
    assert!(matches!(
        copy_values(dev, &l, &cache, &mut small, &[1], &[3]),
        Err(Error::Shape { arg: "v_pool", .. })
    ));
    // A device distant table that disagrees with the plan: never read out of bounds, the sequence is
    // NaN and the status word names it.
    let p = plan(&l, &prox, &dist, &cfg).unwrap();
    let up = |t: &PageTable| {
        (
            dev.upload(t.page_indptr).unwrap(),
            dev.upload(t.page_indices).unwrap(),
            dev.upload(t.seq_lens).unwrap(),
        )
    };
    let ((pi, px, pl), (di, _, dl)) = (up(&prox), up(&dist));
    let bad_x = dev.upload(&[5i32, 1000]).unwrap();
    let q = dev.upload(&vec![bf16::ONE; 2 * 64]).unwrap();
    let mut ws = DecodeWorkspace::for_shared(dev, &p).unwrap();
    let mut o = poisoned::<B, bf16>(dev, 2 * 64).unwrap();
    let mut lse = poisoned::<B, f32>(dev, 2).unwrap();
    let prox_t = DeviceTable {
        page_indptr: &pi,
        page_indices: &px,
        seq_lens: &pl,
    };
    let bad_t = DeviceTable {
        page_indptr: &di,
        page_indices: &bad_x,
        seq_lens: &dl,
    };
    decode_shared(
        dev, &p, &q, &cache, prox_t, &q, &cache, &pool, bad_t, &mut ws, &mut o, &mut lse,
    )
    .unwrap();
    assert!(matches!(
        ws.check_status_sync(dev),
        Err(Error::OutOfRange { index: 0, .. })
    ));
    assert!(dev
        .download(&o)
        .unwrap()
        .iter()
        .all(|x| x.to_f32().is_nan()));
    // A V pool of the wrong size.
    assert!(matches!(
        decode_shared(
            dev, &p, &q, &cache, prox_t, &q, &cache, &small, bad_t, &mut ws, &mut o, &mut lse
        ),
        Err(Error::Shape { arg: "v_pool", .. })
    ));
}

#[test]
fn shared_quantized_bad_input_is_a_typed_error() {
    fusekit::on_every_backend!("shared_quantized_bad_input_is_a_typed_error", |dev| {
        shared_quant_bad_input_on(dev)
    });
}

fn shared_quant_bad_input_on<B: Backend>(dev: &B) {
    let l = PagedKvLayout::new(8, 16, 1, 64, KvFormat::Int8 { group: 32 }).unwrap();
    // 40 proximal tokens (8 in residual slot 0), 32 distant ones (one group) on the leader's pages 4, 5.
    let prox = PageTable {
        page_indptr: &[0, 3],
        page_indices: &[0, 1, 2],
        seq_lens: &[40],
    };
    let dist = PageTable {
        page_indptr: &[0, 2],
        page_indices: &[4, 5],
        seq_lens: &[32],
    };
    let cfg = DecodeConfig::new(2);
    let plan = |l: &PagedKvLayout, d: &PageTable| {
        SharedDecodePlan::new_quantized::<bf16>(l, &prox, d, &[0], 1, &cfg, None)
    };
    let p = plan(&l, &dist).unwrap();
    // Distant tokens that are not whole groups; a bf16 layout; a bad residual slot.
    let half_group = PageTable {
        page_indptr: &[0, 1],
        page_indices: &[4],
        seq_lens: &[16],
    };
    assert!(matches!(
        plan(&l, &half_group),
        Err(Error::InvalidArgument {
            arg: "distant.seq_lens",
            ..
        })
    ));
    let plain = PagedKvLayout::new(8, 16, 1, 64, KvFormat::Bf16).unwrap();
    assert!(matches!(
        plan(&plain, &dist),
        Err(Error::DType { arg: "layout", .. })
    ));
    assert!(matches!(
        SharedDecodePlan::new_quantized::<bf16>(&l, &prox, &dist, &[1], 1, &cfg, None),
        Err(Error::OutOfRange {
            arg: "residual_slots",
            ..
        })
    ));
    let cache = dev.alloc_zeros::<u8>(l.bytes() as usize).unwrap();
    let residual = dev
        .alloc_zeros::<bf16>(l.residual_elements(1) as usize)
        .unwrap();
    let slots = dev.upload(&[0i32]).unwrap();
    let mut pool = dev.alloc_zeros::<u8>(l.v_pool_bytes() as usize).unwrap();
    let small = dev
        .alloc_zeros::<u8>(l.v_pool_bytes() as usize - 16)
        .unwrap();
    let (pd, dd) = (
        upload_table(dev, &prox).unwrap(),
        upload_table(dev, &dist).unwrap(),
    );
    let (prox_t, dist_t) = (device_table::<B>(&pd), device_table::<B>(&dd));
    let q = dev.upload(&vec![bf16::ONE; 2 * 64]).unwrap();
    let mut ws = DecodeWorkspace::for_shared(dev, &p).unwrap();
    let mut o = poisoned::<B, bf16>(dev, 2 * 64).unwrap();
    let mut lse = poisoned::<B, f32>(dev, 2).unwrap();
    // The good call, then buffers of the wrong size.
    decode_shared_quantized(
        dev, &p, &q, &cache, &residual, &slots, prox_t, &q, &cache, &pool, dist_t, &mut ws, &mut o,
        &mut lse,
    )
    .unwrap();
    ws.check_status_sync(dev).unwrap();
    assert!(matches!(
        decode_shared_quantized(
            dev, &p, &q, &cache, &residual, &slots, prox_t, &q, &cache, &small, dist_t, &mut ws,
            &mut o, &mut lse,
        ),
        Err(Error::Shape { arg: "v_pool", .. })
    ));
    assert!(matches!(
        decode_shared_quantized(
            dev, &p, &q, &cache, &residual, &slots, prox_t, &q, &small, &pool, dist_t, &mut ws,
            &mut o, &mut lse,
        ),
        Err(Error::Shape {
            arg: "leader_cache",
            ..
        })
    ));
    let short = dev
        .alloc_zeros::<bf16>(l.residual_elements(1) as usize - 8)
        .unwrap();
    assert!(matches!(
        decode_shared_quantized(
            dev, &p, &q, &cache, &short, &slots, prox_t, &q, &cache, &pool, dist_t, &mut ws,
            &mut o, &mut lse,
        ),
        Err(Error::Shape {
            arg: "residual",
            ..
        })
    ));
    // A bf16 plan through the quantised entry point, a quantised plan through the bf16 one.
    let bf_prox = PageTable {
        page_indptr: &[0, 3],
        page_indices: &[0, 1, 2],
        seq_lens: &[40],
    };
    let bf_plan = SharedDecodePlan::new::<bf16>(&plain, &bf_prox, &dist, &cfg, None).unwrap();
    assert!(matches!(
        decode_shared_quantized(
            dev, &bf_plan, &q, &cache, &residual, &slots, prox_t, &q, &cache, &pool, dist_t,
            &mut ws, &mut o, &mut lse,
        ),
        Err(Error::DType { arg: "cache", .. })
    ));
    let bf_cache = dev.alloc_zeros::<bf16>(plain.elements() as usize).unwrap();
    let bf_pool = dev
        .alloc_zeros::<bf16>(plain.v_pool_elements().unwrap() as usize)
        .unwrap();
    assert!(matches!(
        decode_shared(
            dev, &p, &q, &bf_cache, prox_t, &q, &bf_cache, &bf_pool, dist_t, &mut ws, &mut o,
            &mut lse,
        ),
        Err(Error::DType { arg: "cache", .. })
    ));
    // A device distant length that is not whole groups (31 of the plan's 32): the distant part has no
    // residual to read the last tokens from, so the kernel refuses the sequence: NaN, named by the
    // status word.
    let bad_len = dev.upload(&[31u32]).unwrap();
    let bad_t = DeviceTable {
        seq_lens: &bad_len,
        ..dist_t
    };
    decode_shared_quantized(
        dev, &p, &q, &cache, &residual, &slots, prox_t, &q, &cache, &pool, bad_t, &mut ws, &mut o,
        &mut lse,
    )
    .unwrap();
    assert!(matches!(
        ws.check_status_sync(dev),
        Err(Error::OutOfRange { index: 0, .. })
    ));
    assert!(dev
        .download(&o)
        .unwrap()
        .iter()
        .all(|x| x.to_f32().is_nan()));
    // copy_values_quantized: the same host checks as copy_values, and the format.
    assert!(matches!(
        copy_values_quantized(dev, &l, &cache, &mut pool, &[1, 2], &[3, 3]),
        Err(Error::InvalidArgument {
            arg: "dst_pages",
            ..
        })
    ));
    assert!(matches!(
        copy_values_quantized(dev, &l, &cache, &mut pool, &[1], &[8]),
        Err(Error::OutOfRange {
            arg: "dst_pages",
            ..
        })
    ));
    let mut small = small;
    assert!(matches!(
        copy_values_quantized(dev, &l, &cache, &mut small, &[1], &[3]),
        Err(Error::Shape { arg: "v_pool", .. })
    ));
    let bf_bytes = dev.alloc_zeros::<u8>(plain.bytes() as usize).unwrap();
    let mut bf_pool_bytes = dev
        .alloc_zeros::<u8>(plain.v_pool_bytes() as usize)
        .unwrap();
    assert!(matches!(
        copy_values_quantized(dev, &plain, &bf_bytes, &mut bf_pool_bytes, &[1], &[3]),
        Err(Error::DType { arg: "layout", .. })
    ));
    let mut bf_pool = bf_pool;
    assert!(matches!(
        copy_values(dev, &l, &bf_cache, &mut bf_pool, &[1], &[3]),
        Err(Error::DType { arg: "cache", .. })
    ));
}
