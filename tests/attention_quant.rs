//! Decode over quantised (KIVI int8/int4) paged caches against the f64 reference over the dequantised
//! cache, on the SIMT emulator always and on a GPU when one is present: both element types, both code
//! widths, every head dim and group size, page sizes 1, odd, 16 and a multiple of the group, lengths
//! around group and page boundaries (so the full-precision residual is empty, partial and nearly
//! full), GQA 1/2/3/8, splits that start inside a group, window, softcap, outlier key channels; outputs
//! poisoned first; NaN in a group reaches the output; bad input is a typed error and a bad device
//! table is never read. Also sinks + window retention in a streaming loop over bf16/f16 and quantised
//! caches (append, retention, decode, append into the freed pages).

use fusekit::attention::{
    append, append_quantized, decode_quantized, pack_quantized, reference, AppendPlan,
    AppendWorkspace, DecodeConfig, DecodePlan, DecodeWorkspace, Kv, KvElement, KvFormat,
    PackedCache, PageTable, PagedKvLayout, Rope, RopeMode, RopeStyle,
};
use fusekit::testing::{compare, compare_with_floor, poisoned, seed_for, Dist, Rng, Tolerance};
use fusekit::{Backend, Error};
use half::{bf16, f16};

mod common;
use common::{check_o_lse, random_q};

struct Setup<T> {
    layout: PagedKvLayout,
    values: Vec<f64>,
    packed: PackedCache<T>,
    indptr: Vec<i32>,
    indices: Vec<i32>,
    lens: Vec<u32>,
    slots: Vec<i32>,
    n_slots: usize,
}

impl<T> Setup<T> {
    fn table(&self) -> PageTable<'_> {
        PageTable {
            page_indptr: &self.indptr,
            page_indices: &self.indices,
            seq_lens: &self.lens,
        }
    }
}

/// Random K/V (keys with outlier channels ×8, as real models have: the distribution KIVI's per-channel
/// keys are for) on scrambled pages, residual slots scrambled too, packed on the host.
fn setup<T: KvElement>(
    rng: &mut Rng,
    format: KvFormat,
    page_size: usize,
    kv_heads: usize,
    d: usize,
    lens: &[u32],
) -> Setup<T> {
    let need: usize = lens.iter().map(|&l| (l as usize).div_ceil(page_size)).sum();
    let layout = PagedKvLayout::new(need + 2, page_size, kv_heads, d, format).unwrap();
    let mut values = rng.sample(
        Dist::Normal {
            mean: 0.0,
            std: 1.0,
        },
        layout.elements() as usize,
    );
    for (i, v) in values.iter_mut().enumerate() {
        if i % d == 3 || i % d == d - 1 {
            *v *= 8.0;
        }
    }
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
    let n_slots = lens.len() + 1;
    let mut slots: Vec<i32> = (0..n_slots as i32).collect();
    for i in (1..slots.len()).rev() {
        slots.swap(i, rng.below(i as u64 + 1) as usize);
    }
    slots.truncate(lens.len());
    let t = PageTable {
        page_indptr: &indptr,
        page_indices: &indices,
        seq_lens: lens,
    };
    let packed = pack_quantized::<T>(&layout, &values, &t, &slots, n_slots).unwrap();
    Setup {
        layout,
        values,
        packed,
        indptr,
        indices,
        lens: lens.to_vec(),
        slots,
        n_slots,
    }
}

struct Out<T> {
    o: Vec<T>,
    lse: Vec<f32>,
    status: Result<(), Error>,
}

fn launch<B: Backend, T: KvElement>(
    dev: &B,
    s: &Setup<T>,
    q: &[T],
    cfg: &DecodeConfig,
    split: Option<usize>,
    device_indices: &[i32],
    device_slots: &[i32],
) -> Result<Out<T>, Error> {
    let t = s.table();
    let plan = DecodePlan::new_quantized::<T>(&s.layout, &t, &s.slots, s.n_slots, cfg, split)?;
    let rows = plan.rows();
    let d = s.layout.head_dim();
    let (c, r) = (
        dev.upload(&s.packed.bytes)?,
        dev.upload(&s.packed.residual)?,
    );
    let qd = dev.upload(q)?;
    let (ip, xp, lp, sp) = (
        dev.upload(&s.indptr)?,
        dev.upload(device_indices)?,
        dev.upload(&s.lens)?,
        dev.upload(device_slots)?,
    );
    let mut ws = DecodeWorkspace::new(dev, &plan)?;
    let mut o = poisoned::<B, T>(dev, rows * d)?;
    let mut lse = poisoned::<B, f32>(dev, rows)?;
    decode_quantized(
        dev, &plan, &qd, &c, &r, &ip, &xp, &lp, &sp, &mut ws, &mut o, &mut lse,
    )?;
    let status = ws.check_status_sync(dev);
    Ok(Out {
        o: dev.download(&o)?,
        lse: dev.download(&lse)?,
        status,
    })
}

/// One quantised decode against `reference::decode` over the packed cache's dequantised values.
fn run_case<B: Backend, T: KvElement>(
    dev: &B,
    rng: &mut Rng,
    s: &Setup<T>,
    cfg: &DecodeConfig,
    split: Option<usize>,
) -> Result<(), String> {
    let d = s.layout.head_dim();
    let rows = s.lens.len() * cfg.num_qo_heads;
    let q = random_q::<T>(rng, rows * d);
    let out = launch(dev, s, &q, cfg, split, &s.indices, &s.slots).map_err(|e| e.to_string())?;
    out.status.map_err(|e| e.to_string())?;
    let q64: Vec<f64> = q.iter().map(|x| x.to_f64()).collect();
    let want = reference::decode(&s.layout, &s.packed.dequantized, &s.table(), &q64, cfg).unwrap();
    let what = format!(
        "{} {:?} d={d} ps={} hkv={} hq={} lens={:?} split={split:?} {cfg:?}",
        T::NAME,
        s.layout.format(),
        s.layout.page_size(),
        s.layout.num_kv_heads(),
        cfg.num_qo_heads,
        s.lens
    );
    // The dequantised values are the reference's exactly (one fp32 FMA from the codes), so the
    // tolerances are those of the bf16/f16 decode: one rounding of an fp32 result to T.
    check_o_lse::<T>(&what, &out.o, &out.lse, &want.o, &want.lse)?;
    Ok(())
}

#[test]
fn quantized_decode_matches_the_reference() {
    fusekit::on_every_backend!("quantized_decode_matches_the_reference", |dev| {
        every_instantiation_on(dev)
    });
}

fn every_instantiation_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("quantized_decode_matches_the_reference"));
    fn one<B: Backend, T: KvElement>(dev: &B, rng: &mut Rng, int4: bool) {
        let fmt = |group| {
            if int4 {
                KvFormat::Int4 { group }
            } else {
                KvFormat::Int8 { group }
            }
        };
        // Every head dim × GQA groups 1, 2, 3 and 8 (heads per CTA 1, 2, 4 with 3 live, 8); group sizes
        // and page sizes (1, odd, 16, a multiple of the group) rotate through the cases.
        let cases = [(2, 1, 16), (1, 2, 1), (1, 3, 5), (2, 8, 128)];
        for (i, d) in [64, 128, 256].into_iter().enumerate() {
            for (j, &(hkv, group, ps)) in cases.iter().enumerate() {
                let g = [32, 64, 128][(i + j) % 3];
                // Lengths: 1 (all residual), a group minus one, exactly one group (empty residual),
                // and one past several groups.
                let lens = [1u32, g as u32 - 1, g as u32, 2 * g as u32 + 9];
                let s = setup::<T>(rng, fmt(g), ps, hkv, d, &lens);
                run_case(dev, rng, &s, &DecodeConfig::new(hkv * group), None)
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
    for int4 in [false, true] {
        one::<B, bf16>(dev, &mut rng, int4);
        one::<B, f16>(dev, &mut rng, int4);
    }
}

#[test]
fn quantized_splits_window_softcap_and_nan() {
    fusekit::on_every_backend!("quantized_splits_window_softcap_and_nan", |dev| {
        splits_on(dev)
    });
}

fn splits_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("quantized_splits_window_softcap_and_nan"));
    // Splits of 48 tokens over groups of 32: splits start inside a group; a window starts mid-group.
    let s = setup::<bf16>(
        &mut rng,
        KvFormat::Int4 { group: 32 },
        16,
        2,
        128,
        &[200, 97, 1],
    );
    for cfg in [
        DecodeConfig::new(8),
        DecodeConfig {
            softcap: Some(3.0),
            ..DecodeConfig::new(8)
        },
        DecodeConfig {
            window: Some(75),
            ..DecodeConfig::new(8)
        },
    ] {
        run_case(dev, &mut rng, &s, &cfg, Some(48)).unwrap_or_else(|e| panic!("{e}"));
    }
    // A NaN key inside the window: that sequence's heads of that KV head are NaN, nothing else.
    let mut s = setup::<f16>(
        &mut rng,
        KvFormat::Int8 { group: 64 },
        64,
        1,
        64,
        &[150, 70],
    );
    let l = s.layout;
    let page = s.indices[0] as usize; // sequence 0, token 10: in its first (quantised) group
    s.values[l.offset(Kv::K, page, 0, 10, 5) as usize] = f64::NAN;
    let t = s.table();
    s.packed = pack_quantized::<f16>(&l, &s.values, &t, &s.slots, s.n_slots).unwrap();
    let q = random_q::<f16>(&mut rng, 2 * 2 * 64);
    let out = launch(
        dev,
        &s,
        &q,
        &DecodeConfig::new(2),
        None,
        &s.indices,
        &s.slots,
    )
    .unwrap();
    out.status.unwrap();
    assert!(
        out.o[..2 * 64].iter().all(|x| x.is_nan()),
        "sequence 0 is NaN"
    );
    assert!(out.lse[..2].iter().all(|x| x.is_nan()));
    assert!(
        out.o[2 * 64..].iter().all(|x| x.to_f64().is_finite()),
        "sequence 1 is finite"
    );
}

#[test]
fn quantized_bad_input_is_a_typed_error() {
    fusekit::on_every_backend!("quantized_bad_input_is_a_typed_error", |dev| {
        bad_input_on(dev)
    });
}

fn bad_input_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("quantized_bad_input_is_a_typed_error"));
    let s = setup::<bf16>(&mut rng, KvFormat::Int8 { group: 32 }, 16, 1, 64, &[40, 5]);
    let t = s.table();
    let cfg = DecodeConfig::new(2);
    // A quantised layout through the bf16/f16 constructor, and the reverse.
    assert!(matches!(
        DecodePlan::new::<bf16>(&s.layout, &t, &cfg, None),
        Err(Error::DType { .. })
    ));
    let plain = PagedKvLayout::new(8, 16, 1, 64, KvFormat::Bf16).unwrap();
    assert!(matches!(
        DecodePlan::new_quantized::<bf16>(&plain, &t, &s.slots, 3, &cfg, None),
        Err(Error::DType { .. })
    ));
    // Residual slots: shared, out of range, missing.
    for (slots, n) in [(vec![0, 0], 3), (vec![0, 3], 3), (vec![0], 3)] {
        assert!(
            DecodePlan::new_quantized::<bf16>(&s.layout, &t, &slots, n, &cfg, None).is_err(),
            "{slots:?}"
        );
    }
    // Unsupported group sizes.
    for g in [0, 16, 96, 256] {
        assert!(matches!(
            PagedKvLayout::new(4, 16, 1, 64, KvFormat::Int4 { group: g }),
            Err(Error::Unsupported { .. })
        ));
    }
    // A residual of the wrong size.
    let plan =
        DecodePlan::new_quantized::<bf16>(&s.layout, &t, &s.slots, s.n_slots, &cfg, None).unwrap();
    let c = dev.upload(&s.packed.bytes).unwrap();
    let short = dev
        .upload(&s.packed.residual[..s.packed.residual.len() - 1])
        .unwrap();
    let q = dev.upload(&vec![bf16::ONE; 2 * 2 * 64]).unwrap();
    let (ip, xp, lp, sp) = (
        dev.upload(&s.indptr).unwrap(),
        dev.upload(&s.indices).unwrap(),
        dev.upload(&s.lens).unwrap(),
        dev.upload(&s.slots).unwrap(),
    );
    let mut ws = DecodeWorkspace::new(dev, &plan).unwrap();
    let mut o = poisoned::<B, bf16>(dev, 2 * 2 * 64).unwrap();
    let mut lse = poisoned::<B, f32>(dev, 4).unwrap();
    assert!(matches!(
        decode_quantized(dev, &plan, &q, &c, &short, &ip, &xp, &lp, &sp, &mut ws, &mut o, &mut lse),
        Err(Error::Shape {
            arg: "residual",
            ..
        })
    ));
    // The bf16 decode refuses a quantised plan.
    let cb = dev
        .upload(&vec![bf16::ONE; s.layout.elements() as usize])
        .unwrap();
    assert!(matches!(
        fusekit::attention::decode(dev, &plan, &q, &cb, &ip, &xp, &lp, &mut ws, &mut o, &mut lse),
        Err(Error::DType { .. })
    ));
    // Device tables that disagree with the plan: a page out of range (sequence 0), a residual slot
    // out of range (sequence 1). Nothing is read there; the sequence is NaN and the status names it.
    let q_host = random_q::<bf16>(&mut rng, 2 * 2 * 64);
    let mut bad_idx = s.indices.clone();
    bad_idx[1] = -3;
    let out = launch(dev, &s, &q_host, &cfg, None, &bad_idx, &s.slots).unwrap();
    assert!(matches!(
        out.status,
        Err(Error::OutOfRange {
            arg: "page_table",
            index: 0,
            ..
        })
    ));
    assert!(out.o[..2 * 64].iter().all(|x| x.is_nan()));
    assert!(out.o[2 * 64..].iter().all(|x| x.to_f64().is_finite()));
    let out = launch(dev, &s, &q_host, &cfg, None, &s.indices, &[s.slots[0], 99]).unwrap();
    assert!(matches!(
        out.status,
        Err(Error::OutOfRange {
            arg: "page_table",
            index: 1,
            ..
        })
    ));
    assert!(out.o[2 * 64..].iter().all(|x| x.is_nan()));
    assert!(out.o[..2 * 64].iter().all(|x| x.to_f64().is_finite()));
}

#[test]
fn packing_agrees_with_the_round_trip_and_saves_memory() {
    let mut rng = Rng::new(seed_for("packing_agrees_with_the_round_trip"));
    for format in [KvFormat::Int8 { group: 64 }, KvFormat::Int4 { group: 32 }] {
        let s = setup::<bf16>(&mut rng, format, 64, 2, 128, &[130, 31]);
        let l = s.layout;
        let kv = Kv::K;
        for (b, &len) in s.lens.iter().enumerate() {
            let pages = &s.indices[s.indptr[b] as usize..];
            for h in 0..2 {
                for kind in [kv, Kv::V] {
                    let at = |t: usize, e: usize| {
                        l.offset(kind, pages[t / 64] as usize, h, t % 64, e) as usize
                    };
                    let x: Vec<f64> = (0..len as usize)
                        .flat_map(|t| (0..128).map(move |e| (t, e)))
                        .map(|(t, e)| bf16::from_f64(s.values[at(t, e)]).to_f64())
                        .collect();
                    let r = reference::kivi_roundtrip(kind, &x, len as usize, 128, format).unwrap();
                    for t in 0..len as usize {
                        for e in 0..128 {
                            assert_eq!(
                                r[t * 128 + e].to_bits(),
                                s.packed.dequantized[at(t, e)].to_bits(),
                                "{format:?} seq {b} head {h} {kind:?} token {t} dim {e}"
                            );
                        }
                    }
                }
            }
        }
        // Bytes per cached token and head against bf16 (2 · 2 · head_dim): int8 about 1/2, int4 about
        // 1/4, plus the f16 scales and zero points.
        let bf16_bytes = 2.0 * 2.0 * 128.0 * 64.0 * 2.0;
        let ratio = l.page_bytes() as f64 / bf16_bytes;
        let want = if format.bits_per_code() == 8 {
            0.5
        } else {
            0.25
        };
        assert!(
            ratio > want && ratio < want * 1.35,
            "{format:?}: {ratio} of bf16"
        );
    }
}

/// A scrambled free list of `n` pages (a real allocator's order).
fn scrambled(rng: &mut Rng, n: usize) -> Vec<i32> {
    let mut free: Vec<i32> = (0..n as i32).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, rng.below(i as u64 + 1) as usize);
    }
    free
}

/// `n` random K or V elements, rows of `d`, channel 5 an outlier channel (×10).
fn kv_rows<T: KvElement>(rng: &mut Rng, n: usize, d: usize) -> Vec<T> {
    rng.sample(
        Dist::Normal {
            mean: 0.0,
            std: 1.0,
        },
        n,
    )
    .into_iter()
    .enumerate()
    .map(|(i, x)| T::from_f64(if i % d == 5 { x * 10.0 } else { x }))
    .collect()
}

/// The logical cache (f64, [`PagedKvLayout::offset`] order) holding the first `lens[b]` rows of each
/// sequence's K and V (`[tokens][num_kv_heads][head_dim]`) on its pages.
fn logical_cache<T: KvElement>(
    l: &PagedKvLayout,
    k: &[Vec<T>],
    v: &[Vec<T>],
    pages: &[Vec<i32>],
    lens: &[u32],
) -> Vec<f64> {
    let (ps, hkv, d) = (l.page_size(), l.num_kv_heads(), l.head_dim());
    let mut out = vec![0.0; l.elements() as usize];
    for (b, &len) in lens.iter().enumerate() {
        for t in 0..len as usize {
            for h in 0..hkv {
                for e in 0..d {
                    let i = (t * hkv + h) * d + e;
                    let p = pages[b][t / ps] as usize;
                    out[l.offset(Kv::K, p, h, t % ps, e) as usize] = k[b][i].to_f64();
                    out[l.offset(Kv::V, p, h, t % ps, e) as usize] = v[b][i].to_f64();
                }
            }
        }
    }
    out
}

/// The values a quantised cache's bytes and residual stand for, in f64 and [`PagedKvLayout::offset`]
/// order (0 where no token is), read through the layout's byte offsets: what
/// [`pack_quantized`]'s `dequantized` is for the packer's own bytes; and each element's quantisation
/// step (its group's scale; 0 for residual tokens).
fn dequantize_device<T: KvElement>(
    l: &PagedKvLayout,
    bytes: &[u8],
    residual: &[T],
    t: &PageTable<'_>,
    slots: &[i32],
) -> (Vec<f64>, Vec<f64>) {
    let (ps, hkv, d) = (l.page_size(), l.num_kv_heads(), l.head_dim());
    let g = l.format().group().unwrap();
    let int4 = matches!(l.format(), KvFormat::Int4 { .. });
    let f16_at = |at: u64| {
        f16::from_bits(u16::from_le_bytes([
            bytes[at as usize],
            bytes[at as usize + 1],
        ]))
        .to_f64()
    };
    let code = |row: u64, e: usize| -> f64 {
        if int4 {
            let b = bytes[row as usize + e / 2];
            (if e % 2 == 0 { b & 0xF } else { b >> 4 }) as f64
        } else {
            bytes[row as usize + e] as f64
        }
    };
    let mut out = vec![0.0; l.elements() as usize];
    let mut steps = vec![0.0; l.elements() as usize];
    for (b, &len) in t.seq_lens.iter().enumerate() {
        let pages = &t.page_indices[t.page_indptr[b] as usize..];
        let nq = len as usize / g * g;
        for tok in 0..len as usize {
            let (p, s) = (pages[tok / ps] as usize, tok % ps);
            for h in 0..hkv {
                for e in 0..d {
                    for kv in [Kv::K, Kv::V] {
                        let at_out = l.offset(kv, p, h, s, e) as usize;
                        let x = if tok >= nq {
                            residual
                                [l.residual_offset(kv, slots[b] as usize, h, tok % g, e) as usize]
                                .to_f64()
                        } else {
                            let at = match kv {
                                Kv::K => {
                                    let first = tok / g * g;
                                    let gp = pages[first / ps] as usize;
                                    l.k_param_offset(gp, h, first % ps / g, e)
                                }
                                Kv::V => l.v_param_offset(p, h, s, e / l.v_group()),
                            };
                            steps[at_out] = f16_at(at);
                            code(l.code_offset(kv, p, h, s), e) * f16_at(at) + f16_at(at + 2)
                        };
                        out[at_out] = x;
                    }
                }
            }
        }
    }
    (out, steps)
}

/// A batch that grows by appends: each sequence's K/V rows (`[tokens][num_kv_heads][head_dim]`) and the
/// pages it will own when full.
struct Growing<T> {
    layout: PagedKvLayout,
    k: Vec<Vec<T>>,
    v: Vec<Vec<T>>,
    pages: Vec<Vec<i32>>,
    slots: Vec<i32>,
    n_slots: usize,
}

impl<T: KvElement> Growing<T> {
    fn new(
        rng: &mut Rng,
        format: KvFormat,
        ps: usize,
        hkv: usize,
        d: usize,
        full: &[usize],
    ) -> Self {
        let need: usize = full.iter().map(|&l| l.div_ceil(ps)).sum();
        let layout = PagedKvLayout::new(need + 3, ps, hkv, d, format).unwrap();
        let mut free = scrambled(rng, layout.num_pages());
        let mut gen = |n: usize| -> Vec<T> { kv_rows(rng, n, d) };
        let k = full.iter().map(|&l| gen(l * hkv * d)).collect();
        let v = full.iter().map(|&l| gen(l * hkv * d)).collect();
        let pages = full
            .iter()
            .map(|&l| free.drain(..l.div_ceil(ps)).collect())
            .collect();
        let n_slots = full.len() + 2;
        let slots = (0..full.len() as i32)
            .map(|i| n_slots as i32 - 1 - i)
            .collect();
        Growing {
            layout,
            k,
            v,
            pages,
            slots,
            n_slots,
        }
    }

    /// The page table of lengths `lens`.
    fn table(&self, lens: &[u32]) -> (Vec<i32>, Vec<i32>) {
        let ps = self.layout.page_size();
        let (mut indptr, mut idx) = (vec![0i32], Vec::new());
        for (b, &l) in lens.iter().enumerate() {
            idx.extend_from_slice(&self.pages[b][..(l as usize).div_ceil(ps)]);
            indptr.push(idx.len() as i32);
        }
        (indptr, idx)
    }

    /// The logical cache holding the first `lens[b]` tokens of each sequence.
    fn values(&self, lens: &[u32]) -> Vec<f64> {
        logical_cache(&self.layout, &self.k, &self.v, &self.pages, lens)
    }

    /// Rows `from[b] .. to[b]` of every sequence, concatenated, and their CSR offsets.
    fn rows(&self, from: &[u32], to: &[u32]) -> (Vec<T>, Vec<T>, Vec<i32>) {
        let row = self.layout.num_kv_heads() * self.layout.head_dim();
        let (mut k, mut v, mut ind) = (Vec::new(), Vec::new(), vec![0i32]);
        for b in 0..from.len() {
            let r = from[b] as usize * row..to[b] as usize * row;
            k.extend_from_slice(&self.k[b][r.clone()]);
            v.extend_from_slice(&self.v[b][r]);
            ind.push(ind[b] + (to[b] - from[b]) as i32);
        }
        (k, v, ind)
    }
}

#[test]
fn appends_equal_packing_bit_for_bit() {
    fusekit::on_every_backend!("appends_equal_packing_bit_for_bit", |dev| {
        appends_on(dev)
    });
}

fn appends_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("appends_equal_packing_bit_for_bit"));
    fn one<B: Backend, T: KvElement>(
        dev: &B,
        rng: &mut Rng,
        format: KvFormat,
        ps: usize,
        hkv: usize,
        d: usize,
    ) {
        // Steps: a prefill chunk, decode steps (some sequences append nothing) of one token across a group
        // boundary, then a chunk that completes several groups at once.
        let steps: [[u32; 3]; 5] = [
            [45, 1, 31],
            [46, 1, 32],
            [47, 2, 33],
            [64, 3, 34],
            [200, 130, 34],
        ];
        let full = [200, 130, 34];
        let g = Growing::<T>::new(rng, format, ps, hkv, d, &full);
        let l = g.layout;
        let mut cache = dev.alloc_zeros::<u8>(l.bytes() as usize).unwrap();
        let mut res = dev
            .alloc_zeros::<T>(l.residual_elements(g.n_slots) as usize)
            .unwrap();
        let sd = dev.upload(&g.slots).unwrap();
        let mut ws = AppendWorkspace::new(dev).unwrap();
        let mut prev = [0u32; 3];
        for lens in steps {
            let (indptr, idx) = g.table(&lens);
            let t = PageTable {
                page_indptr: &indptr,
                page_indices: &idx,
                seq_lens: &lens,
            };
            let (k, v, ai) = g.rows(&prev, &lens);
            let plan = AppendPlan::new_quantized::<T>(&l, &t, &ai, &g.slots, g.n_slots).unwrap();
            let (kd, vd, ad) = (
                dev.upload(&k).unwrap(),
                dev.upload(&v).unwrap(),
                dev.upload(&ai).unwrap(),
            );
            let (ip, xp, lp) = (
                dev.upload(&indptr).unwrap(),
                dev.upload(&idx).unwrap(),
                dev.upload(&lens).unwrap(),
            );
            append_quantized(
                dev, &plan, &kd, &vd, &ad, &mut cache, &mut res, &ip, &xp, &lp, &sd, &mut ws,
            )
            .unwrap();
            ws.check_status_sync(dev).unwrap();
            let want = pack_quantized::<T>(&l, &g.values(&lens), &t, &g.slots, g.n_slots).unwrap();
            let got = dev.download(&cache).unwrap();
            let what = format!(
                "{} {format:?} ps={ps} hkv={hkv} d={d} lens={lens:?}",
                T::NAME
            );
            if let Some(i) = (0..got.len()).find(|&i| got[i] != want.bytes[i]) {
                panic!("{what}: cache byte {i}: {} != {}", got[i], want.bytes[i]);
            }
            // The residual's live entries: each sequence's newest len % group tokens.
            let gr = format.group().unwrap();
            let got_r = dev.download(&res).unwrap();
            for (b, &len) in lens.iter().enumerate() {
                for tok in (len as usize / gr * gr)..len as usize {
                    for kv in [Kv::K, Kv::V] {
                        for h in 0..hkv {
                            for e in 0..d {
                                let at = l.residual_offset(kv, g.slots[b] as usize, h, tok % gr, e)
                                    as usize;
                                assert_eq!(
                                    got_r[at].to_f64().to_bits(),
                                    want.residual[at].to_f64().to_bits(),
                                    "{what}: residual seq {b} token {tok} {kv:?} head {h} dim {e}"
                                );
                            }
                        }
                    }
                }
            }
            prev = lens;
        }
    }
    // Every element type × code width × head dim (each append kernel), page sizes 1, odd, 16 and
    // multiples of the group, every group size.
    let mut i = 0;
    for d in [64, 128, 256] {
        for bits in [8, 4] {
            let g = [32, 64, 128][i % 3];
            let format = if bits == 8 {
                KvFormat::Int8 { group: g }
            } else {
                KvFormat::Int4 { group: g }
            };
            let ps = [16, 1, 64, 5, 128, 7][i % 6];
            let hkv = 1 + i % 2;
            one::<B, bf16>(dev, &mut rng, format, ps, hkv, d);
            one::<B, f16>(dev, &mut rng, format, [1, 16, 5][i % 3], 2 - i % 2, d);
            i += 1;
        }
    }
}

#[test]
fn plain_append_writes_the_pages() {
    fusekit::on_every_backend!("plain_append_writes_the_pages", |dev| {
        plain_append_on(dev)
    });
}

fn plain_append_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("plain_append_writes_the_pages"));
    for (ps, d) in [(1, 64), (16, 128), (7, 256)] {
        let full = [40, 1, 23];
        let g = Growing::<f16>::new(&mut rng, KvFormat::F16, ps, 2, d, &full);
        let l = g.layout;
        let mut cache = dev.alloc_zeros::<f16>(l.elements() as usize).unwrap();
        let mut ws = AppendWorkspace::new(dev).unwrap();
        let mut prev = [0u32; 3];
        for lens in [[17u32, 1, 22], [18, 1, 23], [40, 1, 23]] {
            let (indptr, idx) = g.table(&lens);
            let t = PageTable {
                page_indptr: &indptr,
                page_indices: &idx,
                seq_lens: &lens,
            };
            let (k, v, ai) = g.rows(&prev, &lens);
            let plan = AppendPlan::new::<f16>(&l, &t, &ai).unwrap();
            let (kd, vd, ad) = (
                dev.upload(&k).unwrap(),
                dev.upload(&v).unwrap(),
                dev.upload(&ai).unwrap(),
            );
            let (ip, xp, lp) = (
                dev.upload(&indptr).unwrap(),
                dev.upload(&idx).unwrap(),
                dev.upload(&lens).unwrap(),
            );
            append(
                dev, &plan, &kd, &vd, &ad, &mut cache, &ip, &xp, &lp, &mut ws,
            )
            .unwrap();
            ws.check_status_sync(dev).unwrap();
            let want = g.values(&lens);
            let got = dev.download(&cache).unwrap();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(a.to_f64(), *b, "ps={ps} d={d} lens={lens:?} element {i}");
            }
            prev = lens;
        }
    }
}

#[test]
fn append_bad_input_is_a_typed_error() {
    fusekit::on_every_backend!("append_bad_input_is_a_typed_error", |dev| {
        append_bad_input_on(dev)
    });
}

fn append_bad_input_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("append_bad_input_is_a_typed_error"));
    let g = Growing::<bf16>::new(&mut rng, KvFormat::Int8 { group: 32 }, 16, 1, 64, &[40, 20]);
    let l = g.layout;
    let lens = [40u32, 20];
    let (indptr, idx) = g.table(&lens);
    let t = PageTable {
        page_indptr: &indptr,
        page_indices: &idx,
        seq_lens: &lens,
    };
    // Host checks: indptr length, start, decreasing, more new tokens than the sequence holds.
    for ai in [vec![0, 5], vec![1, 5, 9], vec![0, 5, 4], vec![0, 41, 45]] {
        assert!(
            AppendPlan::new_quantized::<bf16>(&l, &t, &ai, &g.slots, g.n_slots).is_err(),
            "{ai:?}"
        );
    }
    assert!(matches!(
        AppendPlan::new::<bf16>(&l, &t, &[0, 1, 2]),
        Err(Error::DType { .. })
    ));
    let (k, v, ai) = g.rows(&[0, 0], &lens);
    let plan = AppendPlan::new_quantized::<bf16>(&l, &t, &ai, &g.slots, g.n_slots).unwrap();
    let (kd, vd) = (dev.upload(&k).unwrap(), dev.upload(&v).unwrap());
    let (ip, lp, sd) = (
        dev.upload(&indptr).unwrap(),
        dev.upload(&lens).unwrap(),
        dev.upload(&g.slots).unwrap(),
    );
    let mut cache = dev.alloc_zeros::<u8>(l.bytes() as usize).unwrap();
    let mut res = dev
        .alloc_zeros::<bf16>(l.residual_elements(g.n_slots) as usize)
        .unwrap();
    let mut ws = AppendWorkspace::new(dev).unwrap();
    let xp = dev.upload(&idx).unwrap();
    // A short k_new.
    let short = dev.upload(&k[1..]).unwrap();
    let ad = dev.upload(&ai).unwrap();
    assert!(matches!(
        append_quantized(
            dev, &plan, &short, &vd, &ad, &mut cache, &mut res, &ip, &xp, &lp, &sd, &mut ws
        ),
        Err(Error::Shape { arg: "k_new", .. })
    ));
    // Device tables that disagree with the plan: a page out of range for sequence 0, an append_indptr
    // that gives sequence 1 more tokens than it holds. Nothing is written out of bounds (the emulator's
    // bounds checks and sanitizers watch every access); the status names the first bad sequence.
    let mut bad_idx = idx.clone();
    bad_idx[0] = l.num_pages() as i32;
    let xbad = dev.upload(&bad_idx).unwrap();
    append_quantized(
        dev, &plan, &kd, &vd, &ad, &mut cache, &mut res, &ip, &xbad, &lp, &sd, &mut ws,
    )
    .unwrap();
    assert!(matches!(
        ws.check_status_sync(dev),
        Err(Error::OutOfRange {
            arg: "page_table",
            index: 0,
            ..
        })
    ));
    let abad = dev.upload(&[0i32, 40, 61]).unwrap();
    append_quantized(
        dev, &plan, &kd, &vd, &abad, &mut cache, &mut res, &ip, &xp, &lp, &sd, &mut ws,
    )
    .unwrap();
    assert!(matches!(
        ws.check_status_sync(dev),
        Err(Error::OutOfRange {
            arg: "page_table",
            index: 1,
            ..
        })
    ));
}

/// A plain (bf16/f16) or quantised device cache and what appends to and decodes over it need.
struct DevCache<B: Backend, T: KvElement> {
    layout: PagedKvLayout,
    quant: bool,
    bytes: B::Buffer<u8>,
    elems: B::Buffer<T>,
    res: B::Buffer<T>,
    slots: Vec<i32>,
    n_slots: usize,
    slots_dev: B::Buffer<i32>,
    ws: AppendWorkspace<B>,
}

impl<B: Backend, T: KvElement> DevCache<B, T> {
    fn new(dev: &B, layout: PagedKvLayout, slots: &[i32], n_slots: usize) -> Result<Self, Error> {
        let quant = layout.format().group().is_some();
        Ok(DevCache {
            layout,
            quant,
            bytes: dev.alloc_zeros::<u8>(if quant { layout.bytes() as usize } else { 1 })?,
            elems: dev.alloc_zeros::<T>(if quant { 1 } else { layout.elements() as usize })?,
            res: dev.alloc_zeros::<T>(layout.residual_elements(n_slots).max(1) as usize)?,
            slots: slots.to_vec(),
            n_slots,
            slots_dev: dev.upload(slots)?,
            ws: AppendWorkspace::new(dev)?,
        })
    }

    /// Appends rows `k`, `v` (CSR offsets `ai`) to the sequences of `t`, which already counts them.
    fn append(
        &mut self,
        dev: &B,
        t: &PageTable<'_>,
        k: &[T],
        v: &[T],
        ai: &[i32],
    ) -> Result<(), Error> {
        let l = self.layout;
        let (kd, vd, ad) = (dev.upload(k)?, dev.upload(v)?, dev.upload(ai)?);
        let (ip, xp, lp) = (
            dev.upload(t.page_indptr)?,
            dev.upload(t.page_indices)?,
            dev.upload(t.seq_lens)?,
        );
        if self.quant {
            let plan = AppendPlan::new_quantized::<T>(&l, t, ai, &self.slots, self.n_slots)?;
            append_quantized(
                dev,
                &plan,
                &kd,
                &vd,
                &ad,
                &mut self.bytes,
                &mut self.res,
                &ip,
                &xp,
                &lp,
                &self.slots_dev,
                &mut self.ws,
            )?;
        } else {
            let plan = AppendPlan::new::<T>(&l, t, ai)?;
            append(
                dev,
                &plan,
                &kd,
                &vd,
                &ad,
                &mut self.elems,
                &ip,
                &xp,
                &lp,
                &mut self.ws,
            )?;
        }
        self.ws.check_status_sync(dev)
    }

    /// Decodes random queries over `t` (split size 32) and checks o and lse against
    /// `reference::decode` over `oracle` (the cache's values in f64): tolerances of the element type
    /// on o (the kernels' f32 RoPE angles and MUFU sine/cosine add about 1e-6 relative), 1e-4 on lse.
    fn decode_matches(
        &self,
        dev: &B,
        rng: &mut Rng,
        t: &PageTable<'_>,
        cfg: &DecodeConfig,
        oracle: &[f64],
        what: &str,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let (l, d) = (self.layout, self.layout.head_dim());
        let rows = t.seq_lens.len() * cfg.num_qo_heads;
        let q = random_q::<T>(rng, rows * d);
        let (qd, ip, xp, lp) = (
            dev.upload(&q)?,
            dev.upload(t.page_indptr)?,
            dev.upload(t.page_indices)?,
            dev.upload(t.seq_lens)?,
        );
        let plan = if self.quant {
            DecodePlan::new_quantized::<T>(&l, t, &self.slots, self.n_slots, cfg, Some(32))?
        } else {
            DecodePlan::new::<T>(&l, t, cfg, Some(32))?
        };
        let mut dws = DecodeWorkspace::new(dev, &plan)?;
        let mut o = poisoned::<B, T>(dev, rows * d)?;
        let mut lse = poisoned::<B, f32>(dev, rows)?;
        if self.quant {
            decode_quantized(
                dev,
                &plan,
                &qd,
                &self.bytes,
                &self.res,
                &ip,
                &xp,
                &lp,
                &self.slots_dev,
                &mut dws,
                &mut o,
                &mut lse,
            )?;
        } else {
            fusekit::attention::decode(
                dev,
                &plan,
                &qd,
                &self.elems,
                &ip,
                &xp,
                &lp,
                &mut dws,
                &mut o,
                &mut lse,
            )?;
        }
        dws.check_status_sync(dev)?;
        let q64: Vec<f64> = q.iter().map(|x| x.to_f64()).collect();
        let want = reference::decode(&l, oracle, t, &q64, cfg)?;
        let tol_o = if T::NAME == "bf16" {
            Tolerance {
                rel_l2: 1e-2,
                atol: 2e-3,
                rtol: 1e-2,
            }
        } else {
            Tolerance {
                rel_l2: 3e-3,
                atol: 1e-3,
                rtol: 3e-3,
            }
        };
        compare(&format!("o {what}"), &dev.download(&o)?, &want.o, tol_o)?;
        compare(
            &format!("lse {what}"),
            &dev.download(&lse)?,
            &want.lse,
            Tolerance {
                rel_l2: 1e-4,
                atol: 1e-3,
                rtol: 1e-4,
            },
        )?;
        Ok(())
    }
}

/// RoPE in the kernels: keys cached before RoPE and rotated in the decode kernel (`InAttention`), or
/// rotated by the append kernels (`AtAppend`); q rotated at the sequence's last position either way.
/// Against the f64 reference (which rotates in f64) for both pairings, a bf16/f16 and a quantised cache.
#[allow(clippy::too_many_arguments)]
fn rope_case<B: Backend, T: KvElement>(
    dev: &B,
    rng: &mut Rng,
    format: KvFormat,
    mode: RopeMode,
    ps: usize,
    hkv: usize,
    group: usize,
    d: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let full = [70u32, 33];
    let mut g = Growing::<T>::new(rng, format, ps, hkv, d, &full.map(|x| x as usize));
    g.layout = g.layout.with_rope(mode).unwrap();
    let l = g.layout;
    let quant = format.group().is_some();
    let mut cache = DevCache::<B, T>::new(dev, l, &g.slots, g.n_slots)?;
    // A prefill of all but the last token, then a decode step's append.
    let mut prev = [0u32; 2];
    for lens in [[69u32, 32], full] {
        let (indptr, idx) = g.table(&lens);
        let t = PageTable {
            page_indptr: &indptr,
            page_indices: &idx,
            seq_lens: &lens,
        };
        let (k, v, ai) = g.rows(&prev, &lens);
        cache.append(dev, &t, &k, &v, &ai)?;
        prev = lens;
    }
    let (indptr, idx) = g.table(&full);
    let t = PageTable {
        page_indptr: &indptr,
        page_indices: &idx,
        seq_lens: &full,
    };
    // What the cache holds: raw keys (InAttention), or keys rotated at their position and rounded to T
    // (AtAppend); quantised on top for the KIVI formats.
    let mut values = g.values(&full);
    if let RopeMode::AtAppend(r) = mode {
        for (b, &len) in full.iter().enumerate() {
            for tok in 0..len as usize {
                for h in 0..hkv {
                    let at =
                        |e| l.offset(Kv::K, g.pages[b][tok / ps] as usize, h, tok % ps, e) as usize;
                    let mut k: Vec<f64> = (0..d).map(|e| values[at(e)]).collect();
                    reference::rope_rotate(&mut k, tok as f64, &r)?;
                    for (e, x) in k.into_iter().enumerate() {
                        values[at(e)] = T::from_f64(x).to_f64();
                    }
                }
            }
        }
    }
    let what = format!(
        "{} {format:?} {mode:?} ps={ps} hkv={hkv} group={group} d={d}",
        T::NAME
    );
    let oracle = if quant {
        let packed = pack_quantized::<T>(&l, &values, &t, &g.slots, g.n_slots)?.dequantized;
        let (device, steps) = dequantize_device(
            &l,
            &dev.download(&cache.bytes)?,
            &dev.download(&cache.res)?,
            &t,
            &g.slots,
        );
        if let RopeMode::AtAppend(_) = mode {
            // The kernel rotates in f32 with the MUFU sine/cosine, the oracle in f64: a rotated key is
            // off by up to |pair| · (|angle| · 2^-22 + 2^-19) (`eps`, bounded over the cache; an
            // absolute error, large against a key that nearly cancels), may round to the neighbouring
            // T value (2^-7 relative covers a bf16 ulp), and its group's min, max, scale and a code may
            // move by one step. Each element is then within one step of its own group plus those, and
            // decode is checked over what the device holds.
            let max_abs = values.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let eps = 2.0 * max_abs * (70.0 * 2f64.powi(-22) + 2f64.powi(-19));
            compare_with_floor(
                &format!("cache {what}"),
                &device,
                &packed,
                Tolerance {
                    rel_l2: 5e-3,
                    atol: 0.0,
                    rtol: 0.0,
                },
                |i| 1.05 * steps[i] + 2f64.powi(-7) * packed[i].abs() + eps,
            )?;
        } else if let Some(i) = (0..device.len()).find(|&i| device[i] != packed[i]) {
            return Err(
                format!("{what}: cache element {i}: {} != {}", device[i], packed[i]).into(),
            );
        }
        device
    } else {
        values
    };
    cache.decode_matches(
        dev,
        rng,
        &t,
        &DecodeConfig::new(hkv * group),
        &oracle,
        &what,
    )
}

#[test]
fn rope_in_attention_and_at_append_match_the_reference() {
    fusekit::on_every_backend!(
        "rope_in_attention_and_at_append_match_the_reference",
        |dev| { rope_on(dev) }
    );
}

fn rope_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for(
        "rope_in_attention_and_at_append_match_the_reference",
    ));
    let half = Rope {
        theta: 1e4,
        style: RopeStyle::Half,
    };
    let inter = Rope {
        theta: 1e5,
        style: RopeStyle::Interleaved,
    };
    let e = |r: Result<(), Box<dyn std::error::Error>>| r.unwrap_or_else(|e| panic!("{e}"));
    for (i, r) in [half, inter].into_iter().enumerate() {
        for (j, mode) in [RopeMode::InAttention(r), RopeMode::AtAppend(r)]
            .into_iter()
            .enumerate()
        {
            let d = [64, 128, 256][(i + j) % 3];
            e(rope_case::<B, bf16>(
                dev,
                &mut rng,
                KvFormat::Bf16,
                mode,
                16,
                2,
                3,
                d,
            ));
            e(rope_case::<B, f16>(
                dev,
                &mut rng,
                KvFormat::F16,
                mode,
                5,
                1,
                8,
                d,
            ));
            e(rope_case::<B, bf16>(
                dev,
                &mut rng,
                KvFormat::Int8 { group: 32 },
                mode,
                16,
                1,
                4,
                d,
            ));
            e(rope_case::<B, f16>(
                dev,
                &mut rng,
                KvFormat::Int4 { group: 64 },
                mode,
                64,
                2,
                1,
                d,
            ));
        }
    }
    // Prefill rotates too, in its own instantiation (tests/attention_prefill.rs checks its results).
    let l = PagedKvLayout::new(4, 16, 1, 64, KvFormat::Bf16)
        .unwrap()
        .with_rope(RopeMode::InAttention(half))
        .unwrap();
    let t = PageTable {
        page_indptr: &[0, 1],
        page_indices: &[0],
        seq_lens: &[5],
    };
    let plan = fusekit::attention::PrefillPlan::new::<bf16>(&l, &t, &[0, 5], &DecodeConfig::new(1))
        .unwrap();
    assert_eq!(plan.launches()[0].kernel, "fk_attn_prefill_rope_bf16_d64");
}

/// A batch under a streaming loop: each sequence's K/V rows (`[tokens][num_kv_heads][head_dim]`, the
/// tokens it holds now) and pages; pages come from, and go back to, a scrambled free list.
struct Stream<T> {
    layout: PagedKvLayout,
    k: Vec<Vec<T>>,
    v: Vec<Vec<T>>,
    pages: Vec<Vec<i32>>,
    free: Vec<i32>,
    slots: Vec<i32>,
    n_slots: usize,
}

impl<T: KvElement> Stream<T> {
    fn new(rng: &mut Rng, layout: PagedKvLayout, batch: usize) -> Self {
        let free = scrambled(rng, layout.num_pages());
        let n_slots = batch + 1;
        Stream {
            layout,
            k: vec![Vec::new(); batch],
            v: vec![Vec::new(); batch],
            pages: vec![Vec::new(); batch],
            free,
            slots: (0..batch as i32).map(|i| n_slots as i32 - 1 - i).collect(),
            n_slots,
        }
    }

    fn row(&self) -> usize {
        self.layout.num_kv_heads() * self.layout.head_dim()
    }

    fn lens(&self) -> Vec<u32> {
        self.k
            .iter()
            .map(|k| (k.len() / self.row()) as u32)
            .collect()
    }

    /// `n[b]` new random tokens for each sequence (keys with an outlier channel), pages taken from the
    /// free list as needed; returns the new rows and their CSR offsets, as append takes them.
    fn grow(&mut self, rng: &mut Rng, n: &[u32]) -> (Vec<T>, Vec<T>, Vec<i32>) {
        let (row, d, ps) = (self.row(), self.layout.head_dim(), self.layout.page_size());
        let (mut k, mut v, mut ind) = (Vec::new(), Vec::new(), vec![0i32]);
        for (b, &n) in n.iter().enumerate() {
            let (nk, nv) = (
                kv_rows::<T>(rng, n as usize * row, d),
                kv_rows::<T>(rng, n as usize * row, d),
            );
            k.extend_from_slice(&nk);
            v.extend_from_slice(&nv);
            self.k[b].extend(nk);
            self.v[b].extend(nv);
            let need = (self.k[b].len() / row).div_ceil(ps);
            while self.pages[b].len() < need {
                self.pages[b].push(self.free.pop().expect("free page"));
            }
            ind.push(ind[b] + n as i32);
        }
        (k, v, ind)
    }

    fn table(&self) -> (Vec<i32>, Vec<i32>) {
        let (mut indptr, mut idx) = (vec![0i32], Vec::new());
        for p in &self.pages {
            idx.extend_from_slice(p);
            indptr.push(idx.len() as i32);
        }
        (indptr, idx)
    }

    /// The logical cache: every sequence's tokens at their index.
    fn values(&self) -> Vec<f64> {
        logical_cache(&self.layout, &self.k, &self.v, &self.pages, &self.lens())
    }

    /// What retention must do, worked out independently of `Retention::apply`: drop the evicted rows
    /// and the pages that held them (returned), keep the rest in order.
    fn evict(&mut self, b: usize, tokens: std::ops::Range<u32>) -> Vec<i32> {
        let (row, ps) = (self.row(), self.layout.page_size());
        let r = tokens.start as usize * row..tokens.end as usize * row;
        self.k[b].drain(r.clone());
        self.v[b].drain(r);
        let freed: Vec<i32> = self.pages[b]
            .drain(tokens.start as usize / ps..tokens.end as usize / ps)
            .collect();
        self.free.extend(freed.iter().rev());
        freed
    }
}

/// One retention case: the cache, the policy and the first append's token counts.
struct RetentionCase {
    bf16: bool,
    format: KvFormat,
    rope: RopeMode,
    ps: usize,
    hkv: usize,
    group: usize,
    d: usize,
    sinks: u32,
    window: u32,
    prefill: [u32; 3],
}

/// Sinks + window retention over one cache: a prefill, then rounds of (retention, decode, append), the
/// decode each time against the f64 reference over the kept tokens at their new positions, the device
/// cache each time equal (bytes or elements) to a cache packed from the kept tokens alone; pages freed
/// by eviction come back through the free list and are written by later appends.
fn retention_case<B: Backend, T: KvElement>(
    dev: &B,
    rng: &mut Rng,
    c: &RetentionCase,
    rounds: &[&[u32]],
) -> Result<(), Box<dyn std::error::Error>> {
    let RetentionCase {
        format,
        rope,
        ps,
        hkv,
        group,
        d,
        ..
    } = *c;
    let prefill = &c.prefill;
    let policy = fusekit::attention::Retention::new(c.sinks, c.window)?;
    let quant = format.group().is_some();
    let tokens: u32 = prefill
        .iter()
        .chain(rounds.iter().flat_map(|r| r.iter()))
        .sum();
    let pages = tokens as usize / ps + 2 * prefill.len() + 4;
    let layout = PagedKvLayout::new(pages, ps, hkv, d, format)?.with_rope(rope)?;
    let unit = policy.unit(&layout);
    let mut s = Stream::<T>::new(rng, layout, prefill.len());
    let l = s.layout;
    let mut cache = DevCache::<B, T>::new(dev, l, &s.slots, s.n_slots)?;
    let cfg = DecodeConfig::new(hkv * group);
    let what = format!(
        "{} {format:?} {rope:?} ps={ps} unit={unit} hkv={hkv} group={group} d={d} {policy:?}",
        T::NAME
    );
    let mut append_rows = prefill.to_vec();
    let mut evicted_any = false;
    for (round, next) in rounds.iter().enumerate() {
        // Append.
        let (k, v, ai) = s.grow(rng, &append_rows);
        let (indptr, idx) = s.table();
        let lens = s.lens();
        let t = PageTable {
            page_indptr: &indptr,
            page_indices: &idx,
            seq_lens: &lens,
        };
        cache.append(dev, &t, &k, &v, &ai)?;
        // Retention on the host table; the oracle drops the same rows by itself.
        let kept = policy.apply(&l, &t)?;
        let mut freed = Vec::new();
        for (b, &len) in lens.iter().enumerate() {
            let ev = kept.evicted[b].clone();
            if ev.is_empty() {
                assert!(
                    len as usize
                        <= (policy.sinks() as usize).div_ceil(unit) * unit
                            + policy.window() as usize
                            + unit,
                    "{what}: sequence {b} of {len} tokens kept whole"
                );
                continue;
            }
            assert_eq!(ev.start as usize % unit, 0, "{what}: eviction start");
            assert_eq!(ev.end as usize % unit, 0, "{what}: eviction end");
            let sinks_kept = (policy.sinks() as usize).min(len as usize);
            assert!(ev.start as usize >= sinks_kept, "{what}: a sink evicted");
            assert!(
                ev.end as usize <= (len as usize).saturating_sub(policy.window() as usize),
                "{what}: a window token evicted"
            );
            assert!(
                len as usize - ev.len()
                    < sinks_kept.div_ceil(unit) * unit + policy.window() as usize + unit,
                "{what}: kept more than a unit past sinks + window"
            );
            evicted_any = true;
            freed.extend(s.evict(b, ev));
        }
        assert_eq!(kept.freed, freed, "{what}: round {round} freed pages");
        let (indptr, idx) = s.table();
        let lens = s.lens();
        assert_eq!(
            (&kept.page_indptr, &kept.page_indices, &kept.seq_lens),
            (&indptr, &idx, &lens),
            "{what}: round {round} kept table"
        );
        let t = kept.table();
        // The device cache equals one built from the kept tokens alone: the same live bytes on every
        // kept page (groups stay aligned). A reused page may keep stale bytes where nothing is read:
        // slots of residual tokens, parameter slots of groups that start on another page.
        let oracle = if quant {
            let want = pack_quantized::<T>(&l, &s.values(), &t, &s.slots, s.n_slots)?;
            let got = dev.download(&cache.bytes)?;
            let g = format.group().unwrap();
            let (crb, nvg) = (l.code_row_bytes(), d / l.v_group());
            for (b, &len) in lens.iter().enumerate() {
                let nq = len as usize / g * g;
                for (j, &p) in s.pages[b].iter().enumerate() {
                    let p = p as usize;
                    for h in 0..hkv {
                        let mut live: Vec<(String, u64, usize)> = Vec::new();
                        for slot in 0..ps {
                            let tok = j * ps + slot;
                            if tok >= nq {
                                break;
                            }
                            for kv in [Kv::K, Kv::V] {
                                live.push((
                                    format!("{kv:?} codes of token {tok}"),
                                    l.code_offset(kv, p, h, slot),
                                    crb,
                                ));
                            }
                            for vg in 0..nvg {
                                live.push((
                                    format!("V params of token {tok}"),
                                    l.v_param_offset(p, h, slot, vg),
                                    4,
                                ));
                            }
                            if tok % g == 0 {
                                for e in 0..d {
                                    live.push((
                                        format!("K params of group at {tok}"),
                                        l.k_param_offset(p, h, slot / g, e),
                                        4,
                                    ));
                                }
                            }
                        }
                        for (name, at, n) in live {
                            let r = at as usize..at as usize + n;
                            if got[r.clone()] != want.bytes[r.clone()] {
                                return Err(format!(
                                    "{what}: round {round}: sequence {b} page {p} head {h}: {name}: {:?} != {:?}",
                                    &got[r.clone()],
                                    &want.bytes[r]
                                )
                                .into());
                            }
                        }
                    }
                }
            }
            want.dequantized
        } else {
            s.values()
        };
        // Decode over the kept table.
        let at = format!("{what} round {round} lens {lens:?}");
        cache.decode_matches(dev, rng, &t, &cfg, &oracle, &at)?;
        append_rows = next.to_vec();
    }
    assert!(evicted_any, "{what}: the case never evicted anything");
    Ok(())
}

#[test]
fn retention_streams_sinks_and_window() {
    fusekit::on_every_backend!("retention_streams_sinks_and_window", |dev| {
        retention_on(dev)
    });
}

fn retention_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("retention_streams_sinks_and_window"));
    let r = Rope {
        theta: 1e4,
        style: RopeStyle::Half,
    };
    let ri = Rope {
        theta: 1e5,
        style: RopeStyle::Interleaved,
    };
    // Rounds: a prefill, decode steps of one token, a chunk, a step; a short sequence never evicts.
    let rounds: [&[u32]; 4] = [&[1, 1, 1], &[40, 0, 3], &[1, 1, 1], &[0, 0, 0]];
    let cases = [
        RetentionCase {
            bf16: true,
            format: KvFormat::Bf16,
            rope: RopeMode::InAttention(r),
            ps: 16,
            hkv: 2,
            group: 3,
            d: 64,
            sinks: 4,
            window: 40,
            prefill: [150, 33, 5],
        },
        RetentionCase {
            bf16: false,
            format: KvFormat::F16,
            rope: RopeMode::None,
            ps: 1,
            hkv: 1,
            group: 1,
            d: 128,
            sinks: 0,
            window: 17,
            prefill: [90, 18, 2],
        },
        RetentionCase {
            bf16: true,
            format: KvFormat::Int4 { group: 32 },
            rope: RopeMode::InAttention(ri),
            ps: 16,
            hkv: 1,
            group: 4,
            d: 128,
            sinks: 4,
            window: 64,
            prefill: [200, 70, 9],
        },
        // Page 5, group 64: a unit of 320 tokens.
        RetentionCase {
            bf16: false,
            format: KvFormat::Int8 { group: 64 },
            rope: RopeMode::InAttention(r),
            ps: 5,
            hkv: 1,
            group: 2,
            d: 64,
            sinks: 1,
            window: 100,
            prefill: [780, 65, 1],
        },
    ];
    for c in &cases {
        if c.bf16 {
            retention_case::<B, bf16>(dev, &mut rng, c, &rounds).unwrap();
        } else {
            retention_case::<B, f16>(dev, &mut rng, c, &rounds).unwrap();
        }
    }
}

#[test]
fn retention_bad_input_is_a_typed_error() {
    use fusekit::attention::Retention;
    let r = Rope {
        theta: 1e4,
        style: RopeStyle::Half,
    };
    let l = PagedKvLayout::new(8, 4, 1, 64, KvFormat::Bf16).unwrap();
    let t = PageTable {
        page_indptr: &[0, 3],
        page_indices: &[1, 2, 3],
        seq_lens: &[12],
    };
    let p = Retention::new(4, 4).unwrap();
    assert!(matches!(
        Retention::new(4, 0),
        Err(Error::InvalidArgument { arg: "window", .. })
    ));
    let at_append = l.with_rope(RopeMode::AtAppend(r)).unwrap();
    assert!(matches!(
        p.apply(&at_append, &t),
        Err(Error::Unsupported { .. })
    ));
    let in_attn = l.with_rope(RopeMode::InAttention(r)).unwrap();
    assert_eq!(p.apply(&in_attn, &t).unwrap().freed, [2]);
    let bad_page = PageTable {
        page_indices: &[1, 2, 8],
        ..t
    };
    assert!(matches!(
        p.apply(&l, &bad_page),
        Err(Error::OutOfRange {
            arg: "page_indices",
            ..
        })
    ));
    let bad_len = PageTable {
        seq_lens: &[13],
        ..t
    };
    assert!(matches!(
        p.apply(&l, &bad_len),
        Err(Error::InvalidArgument {
            arg: "seq_lens",
            ..
        })
    ));
    let empty = PageTable {
        page_indptr: &[0],
        page_indices: &[],
        seq_lens: &[],
    };
    assert!(p.apply(&l, &empty).is_err());
}
