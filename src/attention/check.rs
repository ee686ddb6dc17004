//! The attention family's rows of `fusekit check`: the reference's split-and-merge identity on the CPU,
//! and one paged GQA decode against the reference on the GPU or the emulator.

use super::{
    append_quantized, decode, decode_quantized, pack_quantized, reference, AppendPlan,
    AppendWorkspace, DecodeConfig, DecodePlan, DecodeWorkspace, Kv, KvElement, KvFormat, PageTable,
    PagedKvLayout,
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
    vec![CheckRow {
        kernel: "attention merge (reference)".into(),
        mode: "cpu-ref",
        max_err: err,
        pass: err < 1e-12,
        gbps: None,
        note: "two splits of 300 tokens merged vs the whole".into(),
    }]
}

fn kernel_check<B: Backend>(dev: &B, rng: &mut Rng) -> Result<Vec<CheckRow>> {
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
    let q: Vec<f64> = rng
        .sample(
            Dist::Normal {
                mean: 0.0,
                std: 1.0,
            },
            rows * d,
        )
        .into_iter()
        .map(|x| bf16::from_f64(x).to_f64())
        .collect();
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
    let got_o = dev.download(&o)?;
    let got_lse = dev.download(&lse)?;
    let err_o = got_o
        .iter()
        .zip(&want.o)
        .map(|(g, w)| (g.to_f64() - w).abs() / w.abs().max(1.0))
        .fold(0.0, f64::max);
    let err_l = got_lse
        .iter()
        .zip(&want.lse)
        .map(|(g, w)| (*g as f64 - w).abs() / w.abs().max(1.0))
        .fold(0.0, f64::max);
    let mode = if dev.kind() == "gpu" { "gpu" } else { "emu" };
    let mut rows_out = quant_check(dev, rng, mode)?;
    rows_out.splice(
        0..0,
        [
            CheckRow {
                kernel: "fk_attn_decode_bf16_d128_h4 + merge (o)".into(),
                mode,
                max_err: err_o,
                pass: err_o < 1e-2 && !err_o.is_nan(),
                gbps: None,
                note: "GQA 4, pages of 16, lengths 1/100/700, splits of 256".into(),
            },
            CheckRow {
                kernel: "fk_attn_decode_bf16_d128_h4 + merge (lse)".into(),
                mode,
                max_err: err_l,
                pass: err_l < 1e-5 && !err_l.is_nan(),
                gbps: None,
                note: "relative to max(1, |lse|)".into(),
            },
        ],
    );
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
    let err = dev
        .download(&o)?
        .iter()
        .zip(&want.o)
        .map(|(g, w)| (g.to_f64() - w).abs() / w.abs().max(1.0))
        .fold(0.0, f64::max);
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
            pass: err < 1e-2 && !err.is_nan(),
            gbps: None,
            note: "GQA 4, 301 tokens (4 groups + 45 in the residual), splits of 128".into(),
        },
    ])
}
