//! Attention benchmarks (issue 14): decode at batch 1/16/64 × context 4k/32k/128k over bf16, KIVI int8
//! and int4 caches (G = 64), Llama-3-8B's attention shape (32 query heads over 8 KV heads, head dim 128,
//! pages of 16), with the KV bytes read, GB/s and % of the copy floor (the cache's bytes ÷ the copy
//! bandwidth measured in the same run); and causal prefill of 512 to 16k new tokens (batch 1, the same
//! shape) in TFLOP/s. Peers: benches/peers/attention.py (PyTorch SDPA over contiguous K/V, GQA) in the
//! same GPU-suite run, under the same bench names. `FUSEKIT_QUICK=1`: the smaller shapes only.
//!
//! The caches are zero-filled on the device (no host upload of tens of GB): decode time does not depend
//! on the values, and the bytes read are the same.

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use fusekit::attention::*;
use fusekit::timing::time_launches_sync;
use fusekit::Gpu;
use half::bf16;

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;
const PS: usize = 16;

fn quick() -> bool {
    std::env::var("FUSEKIT_QUICK").is_ok_and(|v| v == "1")
}

/// KV bytes a decode reads per token and KV head (codes and parameters, K and V).
fn bytes_per_token_head(format: KvFormat) -> f64 {
    match format.group() {
        None => (2 * D * 2) as f64,
        Some(g) => {
            let bits = format.bits_per_code() as f64;
            2.0 * D as f64 * bits / 8.0
                + 4.0 * D as f64 / g as f64
                + 4.0 * D as f64 / g.min(D) as f64
        }
    }
}

/// One sequence after another on consecutive pages.
fn contiguous_table(batch: usize, ctx: usize) -> (Vec<i32>, Vec<i32>, Vec<u32>) {
    let per = ctx.div_ceil(PS);
    let indptr = (0..=batch).map(|b| (b * per) as i32).collect();
    let indices = (0..(batch * per) as i32).collect();
    (indptr, indices, vec![ctx as u32; batch])
}

/// One decode configuration's timing, printed and emitted (criterion too for batch 16 at 32k).
struct Record<'a, 'c> {
    gpu: &'a Gpu,
    group: &'a mut criterion::BenchmarkGroup<'c, criterion::measurement::WallTime>,
    name: &'a str,
    fname: &'a str,
    batch: usize,
    ctx: usize,
    bytes: f64,
    copy: f64,
}

impl Record<'_, '_> {
    fn measure(&mut self, run: &mut dyn FnMut()) {
        let tm = time_launches_sync(self.gpu, 3, 20, || {
            run();
            Ok(())
        })
        .unwrap();
        if self.batch == 16 && self.ctx == 32768 {
            let gpu = self.gpu;
            self.group.bench_function(self.name, |b| {
                b.iter_custom(|iters| common::event_time(gpu, iters, &mut *run))
            });
        }
        let gbps = self.bytes / (tm.median_ms * 1e-3) / 1e9;
        println!(
            "{}: {:.1} us, {:.0} GB/s, {:.1}% of the copy floor",
            self.name,
            tm.median_ms * 1e3,
            gbps,
            100.0 * gbps / self.copy
        );
        common::emit(
            self.name,
            &[
                ("batch", self.batch as f64),
                ("ctx", self.ctx as f64),
                ("kv_bytes", self.bytes),
                ("median_us", tm.median_ms * 1e3),
                ("min_us", tm.min_ms * 1e3),
                ("gbps", gbps),
                ("pct_of_floor", 100.0 * gbps / self.copy),
            ],
            &[("format", self.fname), ("device", &self.gpu.props().name)],
        );
    }
}

fn decode_bench(c: &mut Criterion) {
    let Some(gpu) = common::gpu_or_skip("bench attention/decode") else {
        return;
    };
    let copy = fusekit::probe::measure_copy_bandwidth_sync(&gpu, 1 << 30, 20)
        .unwrap()
        .gbps();
    let s = gpu.stream();
    let mut g = c.benchmark_group("attention");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(1));
    let formats = [
        ("bf16", KvFormat::Bf16),
        ("int8", KvFormat::Int8 { group: 64 }),
        ("int4", KvFormat::Int4 { group: 64 }),
    ];
    let contexts: &[usize] = if quick() {
        &[4096, 32768]
    } else {
        &[4096, 32768, 131072]
    };
    for &batch in &[1usize, 16, 64] {
        for &ctx in contexts {
            let (indptr, indices, lens) = contiguous_table(batch, ctx);
            let t = PageTable {
                page_indptr: &indptr,
                page_indices: &indices,
                seq_lens: &lens,
            };
            let (ip, xp, lp) = (
                s.clone_htod(&indptr).unwrap(),
                s.clone_htod(&indices).unwrap(),
                s.clone_htod(&lens).unwrap(),
            );
            let q = s.alloc_zeros::<bf16>(batch * HQ * D).unwrap();
            let mut o = s.alloc_zeros::<bf16>(batch * HQ * D).unwrap();
            let mut lse = s.alloc_zeros::<f32>(batch * HQ).unwrap();
            let cfg = DecodeConfig::new(HQ);
            for (fname, format) in formats {
                let layout = PagedKvLayout::new(indices.len(), PS, HKV, D, format).unwrap();
                let bytes = (batch * ctx * HKV) as f64 * bytes_per_token_head(format);
                let name = format!("attention/decode_{fname}/b{batch}_ctx{ctx}");
                let mut rec = Record {
                    gpu: &gpu,
                    group: &mut g,
                    name: &name,
                    fname,
                    batch,
                    ctx,
                    bytes,
                    copy,
                };
                if format.group().is_none() {
                    let cache = s.alloc_zeros::<bf16>(layout.elements() as usize).unwrap();
                    let plan = DecodePlan::new::<bf16>(&layout, &t, &cfg, None).unwrap();
                    let mut ws = DecodeWorkspace::new(&gpu, &plan).unwrap();
                    rec.measure(&mut || {
                        decode(
                            &gpu, &plan, &q, &cache, &ip, &xp, &lp, &mut ws, &mut o, &mut lse,
                        )
                        .unwrap()
                    });
                } else {
                    let slots: Vec<i32> = (0..batch as i32).collect();
                    let sd = s.clone_htod(&slots).unwrap();
                    let cache = s.alloc_zeros::<u8>(layout.bytes() as usize).unwrap();
                    let res = s
                        .alloc_zeros::<bf16>(layout.residual_elements(batch) as usize)
                        .unwrap();
                    let plan =
                        DecodePlan::new_quantized::<bf16>(&layout, &t, &slots, batch, &cfg, None)
                            .unwrap();
                    let mut ws = DecodeWorkspace::new(&gpu, &plan).unwrap();
                    rec.measure(&mut || {
                        decode_quantized(
                            &gpu, &plan, &q, &cache, &res, &ip, &xp, &lp, &sd, &mut ws, &mut o,
                            &mut lse,
                        )
                        .unwrap()
                    });
                }
            }
        }
    }
    g.finish();
}

fn prefill_bench(c: &mut Criterion) {
    let Some(gpu) = common::gpu_or_skip("bench attention/prefill") else {
        return;
    };
    let s = gpu.stream();
    let mut g = c.benchmark_group("attention");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(1));
    let lengths: &[usize] = if quick() {
        &[512, 4096]
    } else {
        &[512, 2048, 8192, 16384]
    };
    for &n in lengths {
        let (indptr, indices, lens) = contiguous_table(1, n);
        let t = PageTable {
            page_indptr: &indptr,
            page_indices: &indices,
            seq_lens: &lens,
        };
        let layout = PagedKvLayout::new(indices.len(), PS, HKV, D, KvFormat::Bf16).unwrap();
        let qo = [0i32, n as i32];
        let cfg = DecodeConfig::new(HQ);
        let plan = PrefillPlan::new::<bf16>(&layout, &t, &qo, &cfg).unwrap();
        let cache = s.alloc_zeros::<bf16>(layout.elements() as usize).unwrap();
        let q = s.alloc_zeros::<bf16>(n * HQ * D).unwrap();
        let (ip, xp, lp, qi) = (
            s.clone_htod(&indptr).unwrap(),
            s.clone_htod(&indices).unwrap(),
            s.clone_htod(&lens).unwrap(),
            s.clone_htod(&qo).unwrap(),
        );
        let mut o = s.alloc_zeros::<bf16>(n * HQ * D).unwrap();
        let mut lse = s.alloc_zeros::<f32>(n * HQ).unwrap();
        let mut ws = PrefillWorkspace::new(&gpu).unwrap();
        let mut run = || {
            prefill(
                &gpu, &plan, &q, &cache, &ip, &xp, &lp, &qi, &mut ws, &mut o, &mut lse,
            )
            .unwrap()
        };
        let name = format!("attention/prefill/{n}");
        let tm = time_launches_sync(&gpu, 3, 20, || {
            run();
            Ok(())
        })
        .unwrap();
        if n == 2048 || (quick() && n == 4096) {
            g.bench_function(&name, |b| {
                b.iter_custom(|iters| common::event_time(&gpu, iters, &mut run))
            });
        }
        // Causal: n(n+1)/2 (query, key) pairs per head, 2 GEMMs of 2·D FLOPs each.
        let flops = 4.0 * (HQ * D) as f64 * (n as f64 * (n as f64 + 1.0) / 2.0);
        let tflops = flops / (tm.median_ms * 1e-3) / 1e12;
        println!(
            "{name}: {:.1} us, {:.1} TFLOP/s",
            tm.median_ms * 1e3,
            tflops
        );
        common::emit(
            &name,
            &[
                ("n", n as f64),
                ("median_us", tm.median_ms * 1e3),
                ("min_us", tm.min_ms * 1e3),
                ("tflops", tflops),
            ],
            &[("dtype", "bf16"), ("device", &gpu.props().name)],
        );
    }
    g.finish();
}

criterion_group!(benches, decode_bench, prefill_bench);
criterion_main!(benches);
