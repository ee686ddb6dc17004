//! The cache modes through fusekit's own kernels (`--kernels`): every layer's real q, k (after RoPE) and
//! v go into a paged cache of the mode's format (bf16, or KIVI packed bit for bit as the append kernels
//! write it), then the decode kernel attends for the last query and the prefill kernel for all queries
//! at once, on the GPU when there is one, else on the SIMT emulator (the same .cu sources as host C++).
//! The outputs are compared with exact attention (the table's reference) and the last query's with the
//! CPU model of the mode (`kv::attention`, which the main table uses), so the table's figures are shown
//! to be what the kernels compute.

use crate::kv::{self, Carry, Dims, Mode};
use crate::model::{Qkv, Rope};
use fusekit::attention::{
    decode, decode_quantized, pack_quantized, prefill, prefill_quantized, DecodeConfig, DecodePlan,
    DecodeWorkspace, Kv, KvFormat, PageTable, PagedKvLayout, PrefillPlan, PrefillWorkspace,
};
use fusekit::Backend;
use half::bf16;

const PAGE: usize = 16;

/// Relative L2 error of `a` against `b`; NaN anywhere gives NaN.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den).sqrt()
}

/// One layer's results for one format: decode of the last query against exact and against the CPU
/// model, and the prefill of every query against exact.
struct LayerErr {
    decode_exact: f64,
    decode_cpu: f64,
    prefill_exact: f64,
}

fn err(e: fusekit::Error) -> String {
    e.to_string()
}

/// Runs one layer through the kernels in `format`: (decode output of the last query, prefill outputs of
/// every query), both `[.., heads · head_dim]` as f32.
fn layer<B: Backend>(
    dev: &B,
    x: &Qkv,
    d: Dims,
    format: KvFormat,
) -> Result<(Vec<f32>, Vec<f32>), String> {
    let (t, hd, hkv, hq) = (x.tokens, d.head_dim, d.kv_heads, d.heads);
    let pages = t.div_ceil(PAGE);
    let layout = PagedKvLayout::new(pages + 1, PAGE, hkv, hd, format).map_err(err)?;
    // The sequence's pages in reverse order (page 0 unused): the kernels gather through the table.
    let indices: Vec<i32> = (1..=pages as i32).rev().collect();
    let (indptr, lens) = (vec![0, pages as i32], vec![t as u32]);
    let table = PageTable {
        page_indptr: &indptr,
        page_indices: &indices,
        seq_lens: &lens,
    };
    let mut values = vec![0f64; layout.elements() as usize];
    for tok in 0..t {
        let (page, slot) = (indices[tok / PAGE] as usize, tok % PAGE);
        for h in 0..hkv {
            for e in 0..hd {
                let src = (tok * hkv + h) * hd + e;
                values[layout.offset(Kv::K, page, h, slot, e) as usize] = x.k[src] as f64;
                values[layout.offset(Kv::V, page, h, slot, e) as usize] = x.v[src] as f64;
            }
        }
    }
    let q: Vec<bf16> = x.q.iter().map(|&v| bf16::from_f32(v)).collect();
    let cfg = DecodeConfig::new(hq);
    let (ip, xp, lp) = (
        dev.upload(&indptr).map_err(err)?,
        dev.upload(&indices).map_err(err)?,
        dev.upload(&lens).map_err(err)?,
    );
    let q_all = dev.upload(&q).map_err(err)?;
    let q_last = dev.upload(&q[(t - 1) * hq * hd..]).map_err(err)?;
    let qo = [0, t as i32];
    let qo_d = dev.upload(&qo).map_err(err)?;
    let mut o_dec = dev.alloc_zeros::<bf16>(hq * hd).map_err(err)?;
    let mut lse_dec = dev.alloc_zeros::<f32>(hq).map_err(err)?;
    let mut o_pre = dev.alloc_zeros::<bf16>(t * hq * hd).map_err(err)?;
    let mut lse_pre = dev.alloc_zeros::<f32>(t * hq).map_err(err)?;
    let mut pws = PrefillWorkspace::new(dev).map_err(err)?;
    if format.group().is_none() {
        let cache: Vec<bf16> = values.iter().map(|&v| bf16::from_f64(v)).collect();
        let c = dev.upload(&cache).map_err(err)?;
        let plan = DecodePlan::new::<bf16>(&layout, &table, &cfg, None).map_err(err)?;
        let mut ws = DecodeWorkspace::new(dev, &plan).map_err(err)?;
        decode(
            dev,
            &plan,
            &q_last,
            &c,
            &ip,
            &xp,
            &lp,
            &mut ws,
            &mut o_dec,
            &mut lse_dec,
        )
        .map_err(err)?;
        ws.check_status_sync(dev).map_err(err)?;
        let plan = PrefillPlan::new::<bf16>(&layout, &table, &qo, &cfg).map_err(err)?;
        prefill(
            dev,
            &plan,
            &q_all,
            &c,
            &ip,
            &xp,
            &lp,
            &qo_d,
            &mut pws,
            &mut o_pre,
            &mut lse_pre,
        )
        .map_err(err)?;
    } else {
        let packed = pack_quantized::<bf16>(&layout, &values, &table, &[0], 1).map_err(err)?;
        let (c, r) = (
            dev.upload(&packed.bytes).map_err(err)?,
            dev.upload(&packed.residual).map_err(err)?,
        );
        let slots = dev.upload(&[0i32]).map_err(err)?;
        let plan =
            DecodePlan::new_quantized::<bf16>(&layout, &table, &[0], 1, &cfg, None).map_err(err)?;
        let mut ws = DecodeWorkspace::new(dev, &plan).map_err(err)?;
        decode_quantized(
            dev,
            &plan,
            &q_last,
            &c,
            &r,
            &ip,
            &xp,
            &lp,
            &slots,
            &mut ws,
            &mut o_dec,
            &mut lse_dec,
        )
        .map_err(err)?;
        ws.check_status_sync(dev).map_err(err)?;
        let plan =
            PrefillPlan::new_quantized::<bf16>(&layout, &table, &qo, &[0], 1, &cfg).map_err(err)?;
        prefill_quantized(
            dev,
            &plan,
            &q_all,
            &c,
            &r,
            &ip,
            &xp,
            &lp,
            &qo_d,
            &slots,
            &mut pws,
            &mut o_pre,
            &mut lse_pre,
        )
        .map_err(err)?;
    }
    pws.check_status_sync(dev).map_err(err)?;
    let f32s = |v: Vec<bf16>| v.into_iter().map(f32::from).collect::<Vec<f32>>();
    Ok((
        f32s(dev.download(&o_dec).map_err(err)?),
        f32s(dev.download(&o_pre).map_err(err)?),
    ))
}

/// The formats run through the kernels, with the CPU model of each.
fn formats() -> Vec<(String, KvFormat, Mode)> {
    let mut v = vec![("bf16 cache".to_string(), KvFormat::Bf16, Mode::Bf16)];
    for bits in [8u32, 4] {
        for g in [32usize, 64, 128] {
            let f = if bits == 8 {
                KvFormat::Int8 { group: g }
            } else {
                KvFormat::Int4 { group: g }
            };
            v.push((format!("KIVI int{bits}, G = {g}"), f, Mode::Kivi(f)));
        }
    }
    v
}

fn mean_max(v: &[f64]) -> (f64, f64) {
    (
        v.iter().sum::<f64>() / v.len() as f64,
        v.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
    )
}

/// Every format through the kernels on `dev` (`where_` names it): the markdown table and a line per
/// format as it goes.
pub fn table<B: Backend>(
    dev: &B,
    where_: &str,
    dumps: &[Qkv],
    exact: &[Vec<f32>],
    d: Dims,
    rope: &Rope,
    threads: usize,
) -> Result<String, String> {
    let width = d.heads * d.head_dim;
    let mut out = format!(
        "| KV mode ({where_}) | decode, last query, vs exact: mean / worst layer | decode vs the CPU model of the mode: worst layer | prefill of all {} queries at once vs exact: mean / worst layer |\n| --- | --- | --- | --- |\n",
        dumps.first().map_or(0, |x| x.tokens)
    );
    for (name, format, mode) in formats() {
        let t0 = std::time::Instant::now();
        let mut errs = Vec::new();
        let mut carry = Carry::default();
        for (l, (x, oe)) in dumps.iter().zip(exact).enumerate() {
            let (dec, pre) = layer(dev, x, d, format)?;
            let cpu = kv::attention(&mode, l, x, d, rope, &mut carry, threads);
            let last = (x.tokens - 1) * width;
            errs.push(LayerErr {
                decode_exact: rel(&dec, &oe[last..]),
                decode_cpu: rel(&dec, &cpu[last..]),
                prefill_exact: rel(&pre, oe),
            });
        }
        let de = mean_max(&errs.iter().map(|e| e.decode_exact).collect::<Vec<_>>());
        let dc = mean_max(&errs.iter().map(|e| e.decode_cpu).collect::<Vec<_>>());
        let pe = mean_max(&errs.iter().map(|e| e.prefill_exact).collect::<Vec<_>>());
        if [de.1, dc.1, pe.1].iter().any(|v| !v.is_finite()) {
            return Err(format!("{name}: a kernel output is not finite"));
        }
        println!(
            "{name} through the kernels ({where_}): decode vs exact {:.2e}/{:.2e}, vs CPU model worst {:.2e}; prefill vs exact {:.2e}/{:.2e} ({:.1} s)",
            de.0,
            de.1,
            dc.1,
            pe.0,
            pe.1,
            t0.elapsed().as_secs_f64()
        );
        out += &format!(
            "| {name} | {:.2e} / {:.2e} | {:.2e} | {:.2e} / {:.2e} |\n",
            de.0, de.1, dc.1, pe.0, pe.1
        );
    }
    Ok(out)
}
