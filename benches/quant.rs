//! Quantised-matmul benchmarks (issue 15, item 9): W4A16 (int4 g128 asymmetric, bf16 activations) at
//! M ∈ {1, 8, 16, 64, 256, 4096} × (N × K) ∈ {4096², 8192², 8192 × 28672}, beside cuBLAS bf16 at the same
//! shape in the same run, with the floor: max(packed weight bytes ÷ the copy bandwidth measured in this
//! run, 2·M·N·K ÷ the bf16 tensor peak measured through cuBLAS at 8192³ in this run). `FUSEKIT_QUICK=1`:
//! 4096² only. Weights are random codes and scales (the time does not depend on the values).
//!
//! The online Hadamard transform fused with asymmetric int4 per-token quantisation
//! (`hadamard_quantize`) at tokens ∈ {1, 16, 256, 4096} × n ∈ {576, 1536, 4096, 14336} (SmolLM2's widths,
//! a 4096 model and Llama-3-8B's MLP width 28·512), against bytes moved (2 in + ½ out per element) ÷
//! the measured copy bandwidth; its peer (`benches/peers/quant.py`) is the same in PyTorch (a bf16
//! matmul with the explicit matrix, then the quantisation in tensor ops).
//!
//! W4A4 (`w4a4`: int4 tokens with a per-token scale and zero point, int4 weights per channel) at the W4A16
//! shapes and M, beside cuBLAS bf16 and W4A16 g128 in the same run; the floor is max(packed weight and
//! int4 activation bytes ÷ the copy bandwidth, 2·M·N·K ÷ twice the measured bf16 peak: int8 and int4
//! `mma.sync` run at twice bf16's rate on A100/H100, Hopper's int8 path included).
//!
//! BiLLM's 1-bit matmul (`billm_matmul`) at M ∈ {1, 8, 16, 64} at the W4A16 shapes, beside cuBLAS bf16 and
//! W4A16 g128 in the same run, and its unpack to dense bf16 (`billm_unpack`).

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use fusekit::quant::{
    billm_matmul, billm_unpack, hadamard_quantize, w4a16, BillmDeviceWeight, BillmPlan,
    BillmWeight, BillmWorkspace, Binary, HadamardOutput, HadamardPlan, PackedBillm, PackedW4,
    QuantizedActivations, QuantizedTokens, QuantizedWeight, W4A16Plan, W4A16Weight, W4A16Workspace,
    WeightQuant, BILLM_BLOCK,
};
use fusekit::timing::time_launches_sync;
use fusekit::Gpu;
use half::bf16;

fn quick() -> bool {
    std::env::var("FUSEKIT_QUICK").is_ok_and(|v| v == "1")
}

/// A random int4 g128 asymmetric weight, packed.
fn random_weight(n: usize, k: usize, seed: u64) -> PackedW4 {
    let mut rng = fusekit::testing::Rng::new(seed);
    let groups = k.div_ceil(128);
    let q = QuantizedWeight {
        n,
        k,
        scheme: WeightQuant::int4(Some(128), false),
        codes: (0..n * k).map(|_| rng.below(16) as u8).collect(),
        scales: (0..n * groups)
            .map(|_| bf16::from_f64(0.001 + 0.01 * rng.uniform(0.0, 1.0)).to_f32())
            .collect(),
        zeros: (0..n * groups).map(|_| rng.below(16) as u8).collect(),
    };
    PackedW4::pack(&q).expect("valid weight")
}

/// cuBLAS bf16 `y[M][N] = x[M][K] · W[N][K]ᵀ` (column-major: `yᵀ = W · xᵀ`), median µs.
fn cublas_us(gpu: &Gpu, blas: &CudaBlas, m: usize, n: usize, k: usize) -> f64 {
    let s = gpu.stream();
    let w = s.alloc_zeros::<bf16>(n * k).unwrap();
    let x = s.alloc_zeros::<bf16>(m * k).unwrap();
    let mut y = s.alloc_zeros::<bf16>(m * n).unwrap();
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: bf16::ONE,
        lda: k as i32,
        ldb: k as i32,
        beta: bf16::ZERO,
        ldc: n as i32,
    };
    let t = time_launches_sync(gpu, 3, 20, || {
        // SAFETY: w is n×k, x is m×k, y is m×n with the leading dimensions above: every access in bounds.
        unsafe { blas.gemm(cfg, &w, &x, &mut y) }.unwrap();
        Ok(())
    })
    .unwrap();
    t.median_ms * 1e3
}

/// The copy bandwidth measured now (GB/s) and a cuBLAS handle on the GPU's stream.
fn copy_and_blas(gpu: &Gpu) -> (f64, CudaBlas) {
    let copy = fusekit::probe::measure_copy_bandwidth_sync(gpu, 1 << 30, 20)
        .unwrap()
        .gbps();
    (copy, CudaBlas::new(gpu.stream().clone()).unwrap())
}

/// The bf16 tensor peak measured now through cuBLAS at 8192³, TFLOP/s.
fn bf16_peak_tflops(gpu: &Gpu, blas: &CudaBlas) -> f64 {
    let n = 8192usize;
    2.0 * (n as f64).powi(3) / (cublas_us(gpu, blas, n, n, n) * 1e-6) / 1e12
}

/// The benchmark's weight shapes `(n, k)`: 4096² only with `FUSEKIT_QUICK=1`.
fn gemm_shapes() -> &'static [(usize, usize)] {
    if quick() {
        &[(4096, 4096)]
    } else {
        &[(4096, 4096), (8192, 8192), (8192, 28672)]
    }
}

/// Times `run` (3 warm-up, 20 timed launches) and, when `register`, also hands it to criterion as
/// `name`; returns the timing.
fn timed(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    gpu: &Gpu,
    name: &str,
    register: bool,
    mut run: impl FnMut(),
) -> fusekit::timing::Timing {
    let t = time_launches_sync(gpu, 3, 20, || {
        run();
        Ok(())
    })
    .unwrap();
    if register {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| common::event_time(gpu, iters, &mut run))
        });
    }
    t
}

fn w4a16_bench(c: &mut Criterion) {
    let Some(gpu) = common::gpu_or_skip("bench quant/w4a16") else {
        return;
    };
    let (copy, blas) = copy_and_blas(&gpu);
    let peak_tflops = bf16_peak_tflops(&gpu, &blas);
    println!("copy bandwidth {copy:.0} GB/s, cuBLAS bf16 peak {peak_tflops:.0} TFLOP/s (8192³)");
    let shapes = gemm_shapes();
    let mut g = c.benchmark_group("quant");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(1));
    for &(n, k) in shapes {
        let p = random_weight(n, k, (n * 31 + k) as u64);
        let w = W4A16Weight::upload(&gpu, &p).unwrap();
        for m in [1usize, 8, 16, 64, 256, 4096] {
            let plan = W4A16Plan::new::<bf16>(gpu.props(), &p, m, None).unwrap();
            let mut ws = W4A16Workspace::new(&gpu, &plan).unwrap();
            let x = gpu.stream().alloc_zeros::<bf16>(m * k).unwrap();
            let mut y = gpu.stream().alloc_zeros::<bf16>(m * n).unwrap();
            let name = format!("quant/w4a16_g128/{n}x{k}/m{m}");
            let t = timed(&mut g, &gpu, &name, m == 1 && n == 4096, || {
                w4a16(&gpu, &plan, &x, &w, &mut ws, &mut y).unwrap();
            });
            let us = t.median_ms * 1e3;
            let bytes = p.bytes() as f64 + 2.0 * (m * k + m * n) as f64;
            let flops = 2.0 * (m * n * k) as f64;
            let floor_us = (bytes / (copy * 1e9)).max(flops / (peak_tflops * 1e12)) * 1e6;
            let cublas = cublas_us(&gpu, &blas, m, n, k);
            println!(
                "{name}: {us:.1} us ({:.0} GB/s, {:.1} TFLOP/s), {:.0}% of the floor ({floor_us:.1} us), \
                 cuBLAS bf16 {cublas:.1} us ({:.2}x)",
                bytes / (us * 1e-6) / 1e9,
                flops / (us * 1e-6) / 1e12,
                100.0 * floor_us / us,
                cublas / us
            );
            common::emit(
                &name,
                &[
                    ("m", m as f64),
                    ("n", n as f64),
                    ("k", k as f64),
                    ("splits", plan.splits() as f64),
                    ("median_us", us),
                    ("min_us", t.min_ms * 1e3),
                    ("floor_us", floor_us),
                    ("pct_of_floor", 100.0 * floor_us / us),
                    ("cublas_bf16_us", cublas),
                    ("speedup_vs_cublas", cublas / us),
                ],
                &[("device", &gpu.props().name)],
            );
        }
    }
    g.finish();
}

fn hadamard_bench(c: &mut Criterion) {
    let Some(gpu) = common::gpu_or_skip("bench quant/hadq") else {
        return;
    };
    let copy = fusekit::probe::measure_copy_bandwidth_sync(&gpu, 1 << 30, 20)
        .unwrap()
        .gbps();
    let widths: &[usize] = if quick() {
        &[4096]
    } else {
        &[576, 1536, 4096, 14336]
    };
    let mut g = c.benchmark_group("quant");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(1));
    let out = HadamardOutput::Int4 { symmetric: false };
    for &n in widths {
        for t in [1usize, 16, 256, 4096] {
            let plan = HadamardPlan::new::<bf16>(gpu.props(), t, n, out).unwrap();
            let x = gpu.stream().alloc_zeros::<bf16>(t * n).unwrap();
            let mut q = QuantizedActivations::new(&gpu, &plan).unwrap();
            let name = format!("quant/hadq_int4/{t}x{n}");
            let tm = timed(&mut g, &gpu, &name, t == 4096 && n == 4096, || {
                hadamard_quantize(&gpu, &plan, &x, &mut q).unwrap();
            });
            let us = tm.median_ms * 1e3;
            let bytes = (t * (2 * n + plan.code_bytes_per_row() + 5)) as f64;
            let floor_us = bytes / (copy * 1e9) * 1e6;
            println!(
                "{name}: {us:.2} us ({:.0} GB/s), {:.0}% of the floor ({floor_us:.2} us)",
                bytes / (us * 1e-6) / 1e9,
                100.0 * floor_us / us
            );
            common::emit(
                &name,
                &[
                    ("t", t as f64),
                    ("n", n as f64),
                    ("median_us", us),
                    ("min_us", tm.min_ms * 1e3),
                    ("floor_us", floor_us),
                    ("pct_of_floor", 100.0 * floor_us / us),
                ],
                &[("device", &gpu.props().name)],
            );
        }
    }
    g.finish();
}

/// A random int4 weight per output channel, symmetric, packed for W4A4.
fn random_w4a4(n: usize, k: usize, seed: u64) -> fusekit::quant::PackedW4A4 {
    let mut rng = fusekit::testing::Rng::new(seed);
    let q = QuantizedWeight {
        n,
        k,
        scheme: WeightQuant::int4(None, true),
        codes: (0..n * k).map(|_| rng.below(16) as u8).collect(),
        scales: (0..n)
            .map(|_| bf16::from_f64(0.001 + 0.01 * rng.uniform(0.0, 1.0)).to_f32())
            .collect(),
        zeros: vec![8; n],
    };
    fusekit::quant::PackedW4A4::pack(&q).expect("valid weight")
}

fn w4a4_bench(c: &mut Criterion) {
    use fusekit::quant::{w4a4, SplitKWorkspace, W4A4Plan, W4A4Weight};
    let Some(gpu) = common::gpu_or_skip("bench quant/w4a4") else {
        return;
    };
    let (copy, blas) = copy_and_blas(&gpu);
    let peak_tflops = bf16_peak_tflops(&gpu, &blas);
    let shapes = gemm_shapes();
    let mut g = c.benchmark_group("quant");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(1));
    for &(n, k) in shapes {
        let p = random_w4a4(n, k, (n * 37 + k) as u64);
        let w = W4A4Weight::upload(&gpu, &p).unwrap();
        let p16 = random_weight(n, k, (n * 31 + k) as u64);
        let w16 = W4A16Weight::upload(&gpu, &p16).unwrap();
        for m in [1usize, 8, 16, 64, 256, 4096] {
            let plan = W4A4Plan::new::<bf16>(gpu.props(), &p, m, None).unwrap();
            let mut ws = SplitKWorkspace::new(&gpu, &plan).unwrap();
            let mut rng = fusekit::testing::Rng::new(m as u64);
            let tokens = QuantizedTokens {
                k,
                bits: 4,
                codes: (0..m * k).map(|_| rng.below(16) as u8).collect(),
                scales: vec![0.01; m],
                zeros: (0..m).map(|_| rng.below(16) as u8).collect(),
            };
            let x = QuantizedActivations::upload(&gpu, &tokens).unwrap();
            let mut y = gpu.stream().alloc_zeros::<bf16>(m * n).unwrap();
            let name = format!("quant/w4a4/{n}x{k}/m{m}");
            let t = timed(&mut g, &gpu, &name, m == 1 && n == 4096, || {
                w4a4(&gpu, &plan, &x, &w, &mut ws, &mut y).unwrap();
            });
            let us = t.median_ms * 1e3;
            let bytes = p.bytes() as f64 + (m * k) as f64 / 2.0 + 2.0 * (m * n) as f64;
            let flops = 2.0 * (m * n * k) as f64;
            let floor_us = (bytes / (copy * 1e9)).max(flops / (2.0 * peak_tflops * 1e12)) * 1e6;
            let cublas = cublas_us(&gpu, &blas, m, n, k);
            let plan16 = W4A16Plan::new::<bf16>(gpu.props(), &p16, m, None).unwrap();
            let mut ws16 = W4A16Workspace::new(&gpu, &plan16).unwrap();
            let x16 = gpu.stream().alloc_zeros::<bf16>(m * k).unwrap();
            let w4a16_us = timed(&mut g, &gpu, "", false, || {
                w4a16(&gpu, &plan16, &x16, &w16, &mut ws16, &mut y).unwrap();
            })
            .median_ms
                * 1e3;
            println!(
                "{name} ({:?}): {us:.1} us, {:.0}% of the floor ({floor_us:.1} us), cuBLAS bf16 {cublas:.1} us \
                 ({:.2}x), W4A16 g128 {w4a16_us:.1} us ({:.2}x)",
                plan.path(),
                100.0 * floor_us / us,
                cublas / us,
                w4a16_us / us
            );
            common::emit(
                &name,
                &[
                    ("m", m as f64),
                    ("n", n as f64),
                    ("k", k as f64),
                    ("splits", plan.splits() as f64),
                    ("median_us", us),
                    ("min_us", t.min_ms * 1e3),
                    ("floor_us", floor_us),
                    ("pct_of_floor", 100.0 * floor_us / us),
                    ("cublas_bf16_us", cublas),
                    ("speedup_vs_cublas", cublas / us),
                    ("w4a16_us", w4a16_us),
                ],
                &[("device", &gpu.props().name)],
            );
        }
    }
    g.finish();
}

/// A random BiLLM weight (random bits, up to 49 salient columns per block, f16 parameters), packed.
fn random_billm(n: usize, k: usize, seed: u64) -> PackedBillm {
    let mut rng = fusekit::testing::Rng::new(seed);
    let nb = k.div_ceil(BILLM_BLOCK);
    let salient: Vec<Vec<usize>> = (0..nb)
        .map(|b| {
            let lo = b * BILLM_BLOCK;
            let len = BILLM_BLOCK.min(k - lo);
            let c = (1 + rng.below(49) as usize).min(len);
            (lo..lo + c).map(|j| lo + (j - lo) * len / c).collect()
        })
        .collect();
    let mut is_sal = vec![false; k];
    salient.iter().flatten().for_each(|&j| is_sal[j] = true);
    let bits = |rng: &mut fusekit::testing::Rng| -> Vec<bool> {
        (0..n * k).map(|_| rng.below(2) == 1).collect()
    };
    let sign = bits(&mut rng);
    let second = bits(&mut rng);
    let f = |v: f64| half::f16::from_f64(v).to_f32();
    let q = BillmWeight {
        n,
        k,
        salient,
        sign,
        sign2: (0..n * k).map(|i| second[i] && is_sal[i % k]).collect(),
        sparse: (0..n * k).map(|i| second[i] && !is_sal[i % k]).collect(),
        params: (0..n * nb)
            .map(|_| {
                [0.02, 0.01, 0.005, 0.01].map(|a| Binary {
                    alpha: f(a * (0.5 + rng.unit())),
                    mu: f(0.1 * a * rng.normal()),
                })
            })
            .collect(),
        break_point: vec![0.0; nb],
    };
    PackedBillm::pack(&q).expect("valid weight")
}

/// BiLLM (issue 16, item 7): `billm_matmul` reading the packed bits at M ∈ {1, 8, 16, 64} × the W4A16
/// shapes, beside cuBLAS bf16 and fusekit's W4A16 (g128) at the same shape in the same run; the floor is
/// the packed bytes (plus activations and outputs) ÷ the copy bandwidth measured in this run. For large M
/// the unpack (`billm_unpack`, n·k two-byte writes) and a dense GEMM are the path; the unpack is timed
/// at each shape too.
fn billm_bench(c: &mut Criterion) {
    let Some(gpu) = common::gpu_or_skip("bench quant/billm") else {
        return;
    };
    let (copy, blas) = copy_and_blas(&gpu);
    let shapes = gemm_shapes();
    let mut g = c.benchmark_group("quant");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(1));
    for &(n, k) in shapes {
        let p = random_billm(n, k, (n * 17 + k) as u64);
        let w = BillmDeviceWeight::upload(&gpu, &p).unwrap();
        let p4 = random_weight(n, k, (n * 31 + k) as u64);
        let w4 = W4A16Weight::upload(&gpu, &p4).unwrap();
        for m in [1usize, 8, 16, 64] {
            let plan = BillmPlan::new::<bf16>(gpu.props(), &p, m, None).unwrap();
            let mut ws = BillmWorkspace::new(&gpu, &plan).unwrap();
            let x = gpu.stream().alloc_zeros::<bf16>(m * k).unwrap();
            let mut y = gpu.stream().alloc_zeros::<bf16>(m * n).unwrap();
            let name = format!("quant/billm/{n}x{k}/m{m}");
            let t = timed(&mut g, &gpu, &name, m == 1 && n == 4096, || {
                billm_matmul(&gpu, &plan, &x, &w, &mut ws, &mut y).unwrap();
            });
            let us = t.median_ms * 1e3;
            let bytes = p.bytes() as f64 + 2.0 * (m * k + m * n) as f64;
            let floor_us = bytes / (copy * 1e9) * 1e6;
            let cublas = cublas_us(&gpu, &blas, m, n, k);
            let plan4 = W4A16Plan::new::<bf16>(gpu.props(), &p4, m, None).unwrap();
            let mut ws4 = W4A16Workspace::new(&gpu, &plan4).unwrap();
            let w4a16_us = time_launches_sync(&gpu, 3, 20, || {
                w4a16(&gpu, &plan4, &x, &w4, &mut ws4, &mut y)
            })
            .unwrap()
            .median_ms
                * 1e3;
            println!(
                "{name}: {us:.1} us ({:.0} GB/s), {:.0}% of the floor ({floor_us:.1} us), cuBLAS bf16 \
                 {cublas:.1} us ({:.2}x), W4A16 g128 {w4a16_us:.1} us ({:.2}x)",
                bytes / (us * 1e-6) / 1e9,
                100.0 * floor_us / us,
                cublas / us,
                w4a16_us / us
            );
            common::emit(
                &name,
                &[
                    ("m", m as f64),
                    ("n", n as f64),
                    ("k", k as f64),
                    ("splits", plan.splits() as f64),
                    ("median_us", us),
                    ("min_us", t.min_ms * 1e3),
                    ("floor_us", floor_us),
                    ("pct_of_floor", 100.0 * floor_us / us),
                    ("cublas_bf16_us", cublas),
                    ("speedup_vs_cublas", cublas / us),
                    ("w4a16_us", w4a16_us),
                    ("speedup_vs_w4a16", w4a16_us / us),
                ],
                &[("device", &gpu.props().name)],
            );
        }
        let mut dense = gpu.stream().alloc_zeros::<bf16>(n * k).unwrap();
        let name = format!("quant/billm_unpack/{n}x{k}");
        let t = time_launches_sync(&gpu, 3, 20, || billm_unpack(&gpu, &w, &mut dense)).unwrap();
        let us = t.median_ms * 1e3;
        let bytes = p.bytes() as f64 + 2.0 * (n * k) as f64;
        let floor_us = bytes / (copy * 1e9) * 1e6;
        println!(
            "{name}: {us:.1} us, {:.0}% of the floor ({floor_us:.1} us)",
            100.0 * floor_us / us
        );
        common::emit(
            &name,
            &[
                ("n", n as f64),
                ("k", k as f64),
                ("median_us", us),
                ("floor_us", floor_us),
                ("pct_of_floor", 100.0 * floor_us / us),
            ],
            &[("device", &gpu.props().name)],
        );
    }
    g.finish();
}

criterion_group!(
    benches,
    w4a16_bench,
    w4a4_bench,
    hadamard_bench,
    billm_bench
);
criterion_main!(benches);
