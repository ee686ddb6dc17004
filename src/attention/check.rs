//! The attention family's rows of `fusekit check`: the reference's split-and-merge identity on the CPU,
//! and one paged GQA decode against the reference on the GPU or the emulator.

use super::{
    append_quantized, decode, decode_quantized, pack_quantized, prefill, prefill_quantized,
    reference, AppendPlan, AppendWorkspace, DecodeConfig, DecodePlan, DecodeWorkspace, Kv,
    KvElement, KvFormat, PageTable, PagedKvLayout, PrefillPlan, PrefillWorkspace,
};
use crate::check::row::{CheckRow, SelfCheck};
use crate::error::Result;
use crate::testing::{Dist, Element, Rng};
use crate::{Backend, Gpu};
use half::bf16;

pub(crate) fn self_check() -> SelfCheck {
    SelfCheck {
        family: "attention",
        cpu: cpu_check,
        gpu: kernel_check::<Gpu>,
        emu: kernel_check::<crate::emu::Emulator>,
        gpu_extra: None,
    }
}

/// Largest `|got − want| / max(1, |want|)`; NaN (never a pass) if any value is NaN (`f64::max` would
/// drop it).
fn max_rel_err<T: Element>(got: &[T], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(g, w)| (g.to_f64() - w).abs() / w.abs().max(1.0))
        .fold(0.0, |m: f64, e| {
            if e.is_nan() || m.is_nan() {
                f64::NAN
            } else {
                m.max(e)
            }
        })
}

/// The two rows of an attention output: o within `tol_o`, lse within 1e-5 (relative to max(1, |lse|)).
fn o_lse_rows(
    kernel: &str,
    mode: &'static str,
    (got_o, got_lse): (&[bf16], &[f32]),
    (want_o, want_lse): (&[f64], &[f64]),
    tol_o: f64,
    note: &str,
) -> [CheckRow; 2] {
    let (err_o, err_l) = (max_rel_err(got_o, want_o), max_rel_err(got_lse, want_lse));
    [
        CheckRow {
            kernel: format!("{kernel} (o)"),
            mode,
            max_err: err_o,
            pass: err_o < tol_o,
            gbps: None,
            note: note.into(),
        },
        CheckRow {
            kernel: format!("{kernel} (lse)"),
            mode,
            max_err: err_l,
            pass: err_l < 1e-5,
            gbps: None,
            note: "relative to max(1, |lse|)".into(),
        },
    ]
}

/// `n` standard normal values rounded to bf16, as f64.
fn bf16_normal(rng: &mut Rng, n: usize) -> Vec<f64> {
    rng.sample(
        Dist::Normal {
            mean: 0.0,
            std: 1.0,
        },
        n,
    )
    .into_iter()
    .map(|x| bf16::from_f64(x).to_f64())
    .collect()
}

fn mode_of<B: Backend>(dev: &B) -> &'static str {
    if dev.kind() == "gpu" {
        "gpu"
    } else {
        "emu"
    }
}

/// A cache of `lens` tokens on shuffled pages of 16, 2 KV heads of dim 128, random values.
fn case(rng: &mut Rng, lens: &[u32]) -> (PagedKvLayout, Vec<f64>, Vec<i32>, Vec<i32>) {
    let need: usize = lens.iter().map(|&l| (l as usize).div_ceil(16)).sum();
    let l = PagedKvLayout::new(need + 1, 16, 2, 128, bf16::FORMAT).expect("valid layout");
    let cache: Vec<f64> = rng
        .sample(
            Dist::Normal {
                mean: 0.0,
                std: 1.0,
            },
            l.elements() as usize,
        )
        .into_iter()
        .map(|x| bf16::from_f64(x).to_f64())
        .collect();
    let mut pages: Vec<i32> = (0..l.num_pages() as i32).collect();
    for i in (1..pages.len()).rev() {
        pages.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let (mut indptr, mut idx) = (vec![0i32], Vec::new());
    for &len in lens {
        let n = (len as usize).div_ceil(16);
        let s = idx.len();
        idx.extend_from_slice(&pages[s..s + n]);
        indptr.push(idx.len() as i32);
    }
    (l, cache, indptr, idx)
}

fn cpu_check(rng: &mut Rng) -> Vec<CheckRow> {
    // Split-and-merge of one sequence equals the whole, to f64 rounding.
    let lens = [300u32];
    let (l, cache, indptr, idx) = case(rng, &lens);
    let t = PageTable {
        page_indptr: &indptr,
        page_indices: &idx,
        seq_lens: &lens,
    };
    let cfg = DecodeConfig::new(2);
    let q = rng.sample(
        Dist::Normal {
            mean: 0.0,
            std: 1.0,
        },
        128,
    );
    let whole = reference::attend(&l, &cache, &t, 0, 0, &q, &cfg, 0, 300);
    let a = reference::attend(&l, &cache, &t, 0, 0, &q, &cfg, 0, 123);
    let b = reference::attend(&l, &cache, &t, 0, 0, &q, &cfg, 123, 300);
    let err = match reference::merge(&a.0, &[a.1], &b.0, &[b.1], 128) {
        Ok((o, lse)) => o
            .iter()
            .zip(&whole.0)
            .map(|(x, y)| (x - y).abs())
            .fold((lse[0] - whole.1).abs(), f64::max),
        Err(_) => f64::INFINITY,
    };
    let mut rows = vec![CheckRow {
        kernel: "attention merge (reference)".into(),
        mode: "cpu-ref",
        max_err: err,
        pass: err < 1e-12,
        gbps: None,
        note: "two splits of 300 tokens merged vs the whole".into(),
    }];
    rows.push(prefill_cpu_check(rng));
    rows
}

fn kernel_check<B: Backend>(dev: &B, rng: &mut Rng) -> Result<Vec<CheckRow>> {
    let mut rows = decode_check(dev, rng)?;
    rows.extend(prefill_check(dev, rng)?);
    rows.extend(prefill_quant_check(dev, rng)?);
    Ok(rows)
}

fn decode_check<B: Backend>(dev: &B, rng: &mut Rng) -> Result<Vec<CheckRow>> {
    let lens = [1u32, 100, 700];
    let (l, cache, indptr, idx) = case(rng, &lens);
    let t = PageTable {
        page_indptr: &indptr,
        page_indices: &idx,
        seq_lens: &lens,
    };
    let cfg = DecodeConfig::new(8);
    let d = 128;
    let rows = lens.len() * 8;
    let q = bf16_normal(rng, rows * d);
    let plan = DecodePlan::new::<bf16>(&l, &t, &cfg, Some(256))?;
    let cache_d = dev.upload(&cache.iter().map(|&x| bf16::from_f64(x)).collect::<Vec<_>>())?;
    let q_d = dev.upload(&q.iter().map(|&x| bf16::from_f64(x)).collect::<Vec<_>>())?;
    let (ip, xp, lp) = (dev.upload(&indptr)?, dev.upload(&idx)?, dev.upload(&lens)?);
    let mut ws = DecodeWorkspace::new(dev, &plan)?;
    let mut o = dev.upload(&vec![bf16::poison(); rows * d])?;
    let mut lse = dev.upload(&vec![f32::poison(); rows])?;
    decode(
        dev, &plan, &q_d, &cache_d, &ip, &xp, &lp, &mut ws, &mut o, &mut lse,
    )?;
    ws.check_status_sync(dev)?;
    let want = reference::decode(&l, &cache, &t, &q, &cfg)?;
    let mode = mode_of(dev);
    let mut rows_out = o_lse_rows(
        "fk_attn_decode_bf16_d128_h4 + merge",
        mode,
        (&dev.download(&o)?, &dev.download(&lse)?),
        (&want.o, &want.lse),
        1e-2,
        "GQA 4, pages of 16, lengths 1/100/700, splits of 256",
    )
    .to_vec();
    rows_out.extend(quant_check(dev, rng, mode)?);
    rows_out.extend(retention_shared_check(dev, rng)?);
    rows_out.extend(retention_shared_quant_check(dev, rng)?);
    Ok(rows_out)
}

/// A KIVI int4 cache filled by the append kernels (a 300-token prefill, then one decode step), checked
/// byte for byte against the host packer, then a quantised decode against the reference over the
/// dequantised cache.
fn quant_check<B: Backend>(dev: &B, rng: &mut Rng, mode: &'static str) -> Result<Vec<CheckRow>> {
    let (d, hkv, g) = (128, 2, 64);
    let l = PagedKvLayout::new(24, 16, hkv, d, KvFormat::Int4 { group: g })?;
    let row = hkv * d;
    let sample = |rng: &mut Rng, n: usize| -> Vec<bf16> {
        rng.sample(
            Dist::Normal {
                mean: 0.0,
                std: 1.0,
            },
            n,
        )
        .into_iter()
        .map(bf16::from_f64)
        .collect()
    };
    let (k, v) = (sample(rng, 301 * row), sample(rng, 301 * row));
    let pages: Vec<i32> = (0..19).map(|i| (i * 5 + 3) % 24).collect();
    let mut cache = dev.alloc_zeros::<u8>(l.bytes() as usize)?;
    let mut res = dev.alloc_zeros::<bf16>(l.residual_elements(1) as usize)?;
    let slots = dev.upload(&[0i32])?;
    let mut aws = AppendWorkspace::new(dev)?;
    for (from, to) in [(0usize, 300usize), (300, 301)] {
        let lens = [to as u32];
        let indptr = [0, to.div_ceil(16) as i32];
        let t = PageTable {
            page_indptr: &indptr,
            page_indices: &pages[..indptr[1] as usize],
            seq_lens: &lens,
        };
        let ai = [0, (to - from) as i32];
        let plan = AppendPlan::new_quantized::<bf16>(&l, &t, &ai, &[0], 1)?;
        let (kd, vd) = (
            dev.upload(&k[from * row..to * row])?,
            dev.upload(&v[from * row..to * row])?,
        );
        let (ad, ip, xp, lp) = (
            dev.upload(&ai)?,
            dev.upload(&indptr)?,
            dev.upload(t.page_indices)?,
            dev.upload(&lens)?,
        );
        append_quantized(
            dev, &plan, &kd, &vd, &ad, &mut cache, &mut res, &ip, &xp, &lp, &slots, &mut aws,
        )?;
        aws.check_status_sync(dev)?;
    }
    let lens = [301u32];
    let indptr = [0, 19];
    let t = PageTable {
        page_indptr: &indptr,
        page_indices: &pages,
        seq_lens: &lens,
    };
    let mut values = vec![0.0; l.elements() as usize];
    for tok in 0..301 {
        for h in 0..hkv {
            for e in 0..d {
                let p = pages[tok / 16] as usize;
                let i = (tok * hkv + h) * d + e;
                values[l.offset(Kv::K, p, h, tok % 16, e) as usize] = k[i].to_f64();
                values[l.offset(Kv::V, p, h, tok % 16, e) as usize] = v[i].to_f64();
            }
        }
    }
    let packed = pack_quantized::<bf16>(&l, &values, &t, &[0], 1)?;
    let bytes = dev.download(&cache)?;
    let diff = bytes
        .iter()
        .zip(&packed.bytes)
        .filter(|(a, b)| a != b)
        .count();
    let cfg = DecodeConfig::new(8);
    let q: Vec<bf16> = sample(rng, 8 * d);
    let plan = DecodePlan::new_quantized::<bf16>(&l, &t, &[0], 1, &cfg, Some(128))?;
    let (qd, ip, xp, lp) = (
        dev.upload(&q)?,
        dev.upload(&indptr)?,
        dev.upload(&pages)?,
        dev.upload(&lens)?,
    );
    let mut ws = DecodeWorkspace::new(dev, &plan)?;
    let mut o = dev.upload(&vec![bf16::poison(); 8 * d])?;
    let mut lse = dev.upload(&[f32::poison(); 8])?;
    decode_quantized(
        dev, &plan, &qd, &cache, &res, &ip, &xp, &lp, &slots, &mut ws, &mut o, &mut lse,
    )?;
    ws.check_status_sync(dev)?;
    let q64: Vec<f64> = q.iter().map(|x| x.to_f64()).collect();
    let want = reference::decode(&l, &packed.dequantized, &t, &q64, &cfg)?;
    let err = max_rel_err(&dev.download(&o)?, &want.o);
    Ok(vec![
        CheckRow {
            kernel: "fk_attn_append_q4_bf16_d128 (bytes vs host packer)".into(),
            mode,
            max_err: diff as f64,
            pass: diff == 0,
            gbps: None,
            note: "KIVI int4 g64: a 300-token prefill + 1 decode step; differing bytes".into(),
        },
        CheckRow {
            kernel: "fk_attn_decode_q4_bf16_d128_h4 + merge (o)".into(),
            mode,
            max_err: err,
            pass: err < 1e-2,
            gbps: None,
            note: "GQA 4, 301 tokens (4 groups + 45 in the residual), splits of 128".into(),
        },
    ])
}

// Prefill.

/// The last new token of a prefill sees the whole sequence: its row equals a decode of that token.
fn prefill_cpu_check(rng: &mut Rng) -> CheckRow {
    let lens = [40u32, 77];
    let (l, cache, indptr, idx) = case(rng, &lens);
    let t = PageTable {
        page_indptr: &indptr,
        page_indices: &idx,
        seq_lens: &lens,
    };
    let cfg = DecodeConfig::new(4);
    let qo = [0, 9, 9 + 77];
    let q = rng.sample(
        Dist::Normal {
            mean: 0.0,
            std: 1.0,
        },
        86 * 4 * 128,
    );
    // The last query of each sequence, as a decode batch.
    let last: Vec<f64> = [8usize, 85]
        .iter()
        .flat_map(|&tok| q[tok * 4 * 128..(tok + 1) * 4 * 128].iter().copied())
        .collect();
    let err = match (
        reference::prefill(&l, &cache, &t, &qo, &q, &cfg),
        reference::decode(&l, &cache, &t, &last, &cfg),
    ) {
        (Ok(p), Ok(d)) => [8usize, 85]
            .iter()
            .enumerate()
            .flat_map(|(b, &tok)| {
                let (p, d) = (&p, &d);
                (0..4 * 128)
                    .map(move |i| (p.o[tok * 512 + i] - d.o[b * 512 + i]).abs())
                    .chain((0..4).map(move |h| (p.lse[tok * 4 + h] - d.lse[b * 4 + h]).abs()))
            })
            .fold(0.0, f64::max),
        _ => f64::INFINITY,
    };
    CheckRow {
        kernel: "attention prefill (reference)".into(),
        mode: "cpu-ref",
        max_err: err,
        pass: err < 1e-12,
        gbps: None,
        note: "last new token of a prefill vs a decode of it".into(),
    }
}

/// One chunked, ragged GQA prefill against the reference.
fn prefill_check<B: Backend>(dev: &B, rng: &mut Rng) -> Result<Vec<CheckRow>> {
    // Cached prefix + new tokens: (0 + 100), (60 + 33), (200 + 1).
    let lens = [100u32, 93, 201];
    let qo = [0, 100, 133, 134];
    let (l, cache, indptr, idx) = case(rng, &lens);
    let t = PageTable {
        page_indptr: &indptr,
        page_indices: &idx,
        seq_lens: &lens,
    };
    let cfg = DecodeConfig::new(8);
    let d = 128;
    let rows = 134 * 8;
    let q = bf16_normal(rng, rows * d);
    let plan = PrefillPlan::new::<bf16>(&l, &t, &qo, &cfg)?;
    let cache_d = dev.upload(&cache.iter().map(|&x| bf16::from_f64(x)).collect::<Vec<_>>())?;
    let q_d = dev.upload(&q.iter().map(|&x| bf16::from_f64(x)).collect::<Vec<_>>())?;
    let (ip, xp, lp, qp) = (
        dev.upload(&indptr)?,
        dev.upload(&idx)?,
        dev.upload(&lens)?,
        dev.upload(&qo)?,
    );
    let mut ws = PrefillWorkspace::new(dev)?;
    let mut o = dev.upload(&vec![bf16::poison(); rows * d])?;
    let mut lse = dev.upload(&vec![f32::poison(); rows])?;
    prefill(
        dev, &plan, &q_d, &cache_d, &ip, &xp, &lp, &qp, &mut ws, &mut o, &mut lse,
    )?;
    ws.check_status_sync(dev)?;
    let want = reference::prefill(&l, &cache, &t, &qo, &q, &cfg)?;
    Ok(o_lse_rows(
        "fk_attn_prefill_bf16_d128",
        mode_of(dev),
        (&dev.download(&o)?, &dev.download(&lse)?),
        (&want.o, &want.lse),
        2e-2,
        "GQA 4, pages of 16, 100/33/1 new tokens over 0/60/200 cached",
    )
    .to_vec())
}

/// The same chunked, ragged GQA prefill over a KIVI int4 (g64) cache, against the reference over what
/// the kernel attends to: the dequantised values rounded to bf16.
fn prefill_quant_check<B: Backend>(dev: &B, rng: &mut Rng) -> Result<Vec<CheckRow>> {
    let lens = [100u32, 93, 201];
    let qo = [0, 100, 133, 134];
    let (l16, cache, indptr, idx) = case(rng, &lens);
    let l = PagedKvLayout::new(l16.num_pages(), 16, 2, 128, KvFormat::Int4 { group: 64 })?;
    let t = PageTable {
        page_indptr: &indptr,
        page_indices: &idx,
        seq_lens: &lens,
    };
    let slots = [2, 0, 1];
    let packed = pack_quantized::<bf16>(&l, &cache, &t, &slots, 3)?;
    let view: Vec<f64> = packed
        .dequantized
        .iter()
        .map(|&v| bf16::from_f32(v as f32).to_f64())
        .collect();
    let cfg = DecodeConfig::new(8);
    let d = 128;
    let rows = 134 * 8;
    let q = bf16_normal(rng, rows * d);
    let plan = PrefillPlan::new_quantized::<bf16>(&l, &t, &qo, &slots, 3, &cfg)?;
    let (c, r) = (dev.upload(&packed.bytes)?, dev.upload(&packed.residual)?);
    let q_d = dev.upload(&q.iter().map(|&x| bf16::from_f64(x)).collect::<Vec<_>>())?;
    let (ip, xp, lp, qp, sp) = (
        dev.upload(&indptr)?,
        dev.upload(&idx)?,
        dev.upload(&lens)?,
        dev.upload(&qo)?,
        dev.upload(&slots)?,
    );
    let mut ws = PrefillWorkspace::new(dev)?;
    let mut o = dev.upload(&vec![bf16::poison(); rows * d])?;
    let mut lse = dev.upload(&vec![f32::poison(); rows])?;
    prefill_quantized(
        dev, &plan, &q_d, &c, &r, &ip, &xp, &lp, &qp, &sp, &mut ws, &mut o, &mut lse,
    )?;
    ws.check_status_sync(dev)?;
    let want = reference::prefill(&l16, &view, &t, &qo, &q, &cfg)?;
    Ok(o_lse_rows(
        "fk_attn_prefill_q4_bf16_d128",
        mode_of(dev),
        (&dev.download(&o)?, &dev.download(&lse)?),
        (&want.o, &want.lse),
        2e-2,
        "KIVI int4 g64, GQA 4, 100/33/1 new tokens over 0/60/200 cached",
    )
    .to_vec())
}

// Retention and inter-layer sharing.

/// The three buffers of a page table on `dev`.
#[allow(clippy::type_complexity)]
fn upload_table<B: Backend>(
    dev: &B,
    t: &PageTable,
) -> Result<(B::Buffer<i32>, B::Buffer<i32>, B::Buffer<u32>)> {
    Ok((
        dev.upload(t.page_indptr)?,
        dev.upload(t.page_indices)?,
        dev.upload(t.seq_lens)?,
    ))
}

/// The distant table of a retention on pages of 16: each sequence's evicted pages and token count.
fn evicted_table(
    kept: &super::Retained,
    indptr: &[i32],
    idx: &[i32],
) -> (Vec<i32>, Vec<i32>, Vec<u32>) {
    let (mut dptr, mut didx, mut dlen) = (vec![0i32], Vec::new(), Vec::new());
    for (b, ev) in kept.evicted.iter().enumerate() {
        let pages = &idx[indptr[b] as usize..indptr[b + 1] as usize];
        didx.extend_from_slice(&pages[ev.start as usize / 16..ev.end as usize / 16]);
        dptr.push(didx.len() as i32);
        dlen.push(ev.end - ev.start);
    }
    (dptr, didx, dlen)
}

/// Sinks + window retention on the cache of `case` (no RoPE in the kernels, as the shared decode
/// requires), then a shared decode whose leader is the layer itself: proximal =
/// the kept table, distant = the evicted pages, values copied into a V pool; it must equal exact
/// attention over the whole sequence.
fn retention_shared_check<B: Backend>(dev: &B, rng: &mut Rng) -> Result<Vec<CheckRow>> {
    use super::{copy_values, decode_shared, DeviceTable, Retention, SharedDecodePlan};
    let lens = [700u32, 50];
    let (l, cache, indptr, idx) = case(rng, &lens);
    let t = PageTable {
        page_indptr: &indptr,
        page_indices: &idx,
        seq_lens: &lens,
    };
    let kept = Retention::new(4, 100)?.apply(&l, &t)?;
    // The evicted pages of each sequence, as the distant table.
    let (dptr, didx, dlen) = evicted_table(&kept, &indptr, &idx);
    let dist = PageTable {
        page_indptr: &dptr,
        page_indices: &didx,
        seq_lens: &dlen,
    };
    let cfg = DecodeConfig::new(8);
    let d = 128;
    let rows = lens.len() * 8;
    let q = bf16_normal(rng, rows * d);
    let to_bf16 = |x: &[f64]| x.iter().map(|&v| bf16::from_f64(v)).collect::<Vec<_>>();
    let plan = SharedDecodePlan::new::<bf16>(&l, &kept.table(), &dist, &cfg, Some(128))?;
    let cache_d = dev.upload(&to_bf16(&cache))?;
    let q_d = dev.upload(&to_bf16(&q))?;
    let mut pool = dev.upload(&vec![bf16::poison(); l.v_pool_elements()? as usize])?;
    copy_values(dev, &l, &cache_d, &mut pool, &didx, &didx)?;
    let ((pi, px, pl), (di, dx, dl)) =
        (upload_table(dev, &kept.table())?, upload_table(dev, &dist)?);
    let mut ws = DecodeWorkspace::for_shared(dev, &plan)?;
    let mut o = dev.upload(&vec![bf16::poison(); rows * d])?;
    let mut lse = dev.upload(&vec![f32::poison(); rows])?;
    decode_shared(
        dev,
        &plan,
        &q_d,
        &cache_d,
        DeviceTable {
            page_indptr: &pi,
            page_indices: &px,
            seq_lens: &pl,
        },
        &q_d,
        &cache_d,
        &pool,
        DeviceTable {
            page_indptr: &di,
            page_indices: &dx,
            seq_lens: &dl,
        },
        &mut ws,
        &mut o,
        &mut lse,
    )?;
    ws.check_status_sync(dev)?;
    let want = reference::decode(&l, &cache, &t, &q, &cfg)?;
    Ok(o_lse_rows(
        "fk_attn_decode_bf16_d128_h4 shared + fk_attn_copy_values",
        mode_of(dev),
        (&dev.download(&o)?, &dev.download(&lse)?),
        (&want.o, &want.lse),
        1e-2,
        "retention (sinks 4, window 100) splits 700 tokens into kept + evicted; merged = exact",
    )
    .to_vec())
}

/// [`retention_shared_check`] over a KIVI int8 cache (groups of 32, so eviction in units of 32
/// tokens): the member's cache packed on the host, the evicted pages' V codes and parameters copied
/// into a V pool of bytes, the shared decode's distant part over them; it must equal exact attention
/// over the whole dequantised sequence.
fn retention_shared_quant_check<B: Backend>(dev: &B, rng: &mut Rng) -> Result<Vec<CheckRow>> {
    use super::SharedDecodePlan;
    use super::{copy_values_quantized, decode_shared_quantized, DeviceTable, Retention};
    let lens = [700u32, 50];
    let (plain, cache, indptr, idx) = case(rng, &lens);
    let l = PagedKvLayout::new(plain.num_pages(), 16, 2, 128, KvFormat::Int8 { group: 32 })?;
    let t = PageTable {
        page_indptr: &indptr,
        page_indices: &idx,
        seq_lens: &lens,
    };
    let slots = [1i32, 0];
    let packed = pack_quantized::<bf16>(&l, &cache, &t, &slots, 2)?;
    let kept = Retention::new(4, 100)?.apply(&l, &t)?;
    let (dptr, didx, dlen) = evicted_table(&kept, &indptr, &idx);
    let dist = PageTable {
        page_indptr: &dptr,
        page_indices: &didx,
        seq_lens: &dlen,
    };
    let cfg = DecodeConfig::new(8);
    let d = 128;
    let rows = lens.len() * 8;
    let q = bf16_normal(rng, rows * d);
    let plan = SharedDecodePlan::new_quantized::<bf16>(
        &l,
        &kept.table(),
        &dist,
        &slots,
        2,
        &cfg,
        Some(128),
    )?;
    let cache_d = dev.upload(&packed.bytes)?;
    let (res_d, slots_d) = (dev.upload(&packed.residual)?, dev.upload(&slots)?);
    let q_d = dev.upload(&q.iter().map(|&x| bf16::from_f64(x)).collect::<Vec<_>>())?;
    let mut pool = dev.upload(&vec![u8::poison(); l.v_pool_bytes() as usize])?;
    copy_values_quantized(dev, &l, &cache_d, &mut pool, &didx, &didx)?;
    let ((pi, px, pl), (di, dx, dl)) =
        (upload_table(dev, &kept.table())?, upload_table(dev, &dist)?);
    let mut ws = DecodeWorkspace::for_shared(dev, &plan)?;
    let mut o = dev.upload(&vec![bf16::poison(); rows * d])?;
    let mut lse = dev.upload(&vec![f32::poison(); rows])?;
    decode_shared_quantized(
        dev,
        &plan,
        &q_d,
        &cache_d,
        &res_d,
        &slots_d,
        DeviceTable {
            page_indptr: &pi,
            page_indices: &px,
            seq_lens: &pl,
        },
        &q_d,
        &cache_d,
        &pool,
        DeviceTable {
            page_indptr: &di,
            page_indices: &dx,
            seq_lens: &dl,
        },
        &mut ws,
        &mut o,
        &mut lse,
    )?;
    ws.check_status_sync(dev)?;
    let want = reference::decode(&l, &packed.dequantized, &t, &q, &cfg)?;
    Ok(o_lse_rows(
        "fk_attn_decode_q8_bf16_d128_h4 shared + fk_attn_copy_values",
        mode_of(dev),
        (&dev.download(&o)?, &dev.download(&lse)?),
        (&want.o, &want.lse),
        1e-2,
        "KIVI int8 g32: retention (sinks 4, window 100) splits 700 tokens; merged = exact over the dequantised cache",
    )
    .to_vec())
}
