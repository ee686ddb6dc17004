//! Device ceilings: copy bandwidth (fusekit's own 16-byte copy kernel, 1 GiB buffers, far above L2) and
//! bf16 GEMM peak (cuBLAS, 8192³, random data). Every later family states its floor against these two.

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use half::bf16;

const COPY_BYTES: usize = 1 << 30;
const GEMM_N: usize = 8192;

fn copy_bandwidth(c: &mut Criterion) {
    let Some(gpu) = common::gpu_or_skip("bench probe/copy_1GiB") else {
        return;
    };
    let src = gpu.stream().alloc_zeros::<u8>(COPY_BYTES).unwrap();
    let mut dst = gpu.stream().alloc_zeros::<u8>(COPY_BYTES).unwrap();
    let mut g = c.benchmark_group("probe");
    g.sample_size(20)
        .measurement_time(std::time::Duration::from_secs(3));
    g.throughput(Throughput::Bytes(2 * COPY_BYTES as u64));
    g.bench_function("copy_1GiB", |b| {
        b.iter_custom(|iters| {
            common::event_time(&gpu, iters, || {
                fusekit::probe::copy(&gpu, &src, &mut dst).unwrap()
            })
        })
    });
    g.finish();
    let bw = fusekit::probe::measure_copy_bandwidth_sync(&gpu, COPY_BYTES, 50).unwrap();
    let theo = gpu.props().theoretical_bandwidth / 1e9;
    println!(
        "copy ceiling: {:.1} GB/s median (min {:.3} ms, max {:.3} ms){}",
        bw.gbps(),
        bw.timing.min_ms,
        bw.timing.max_ms,
        if theo > 0.0 {
            format!(
                ", {:.0}% of the {theo:.0} GB/s theoretical",
                100.0 * bw.gbps() / theo
            )
        } else {
            String::new()
        }
    );
    common::emit(
        "probe/copy_1GiB",
        &[
            ("bytes", COPY_BYTES as f64),
            ("median_ms", bw.timing.median_ms),
            ("min_ms", bw.timing.min_ms),
            ("max_ms", bw.timing.max_ms),
            ("gbps", bw.gbps()),
            ("theoretical_gbps", theo),
        ],
        &[("device", &gpu.props().name)],
    );
}

fn gemm_peak(c: &mut Criterion) {
    let Some(gpu) = common::gpu_or_skip("bench probe/cublas_bf16_gemm") else {
        return;
    };
    let n = GEMM_N;
    let mut rng = fusekit::testing::Rng::new(0x6e44);
    let host: Vec<bf16> = (0..n * n).map(|_| bf16::from_f64(rng.normal())).collect();
    let a = gpu.stream().clone_htod(&host).unwrap();
    let b_mat = gpu.stream().clone_htod(&host).unwrap();
    let mut out = gpu.stream().alloc_zeros::<bf16>(n * n).unwrap();
    let blas = CudaBlas::new(gpu.stream().clone()).unwrap();
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_N,
        transb: cublasOperation_t::CUBLAS_OP_T,
        m: n as i32,
        n: n as i32,
        k: n as i32,
        alpha: bf16::ONE,
        lda: n as i32,
        ldb: n as i32,
        beta: bf16::ZERO,
        ldc: n as i32,
    };
    let flops = 2.0 * (n as f64).powi(3);
    let mut run = || {
        // SAFETY: a, b are n×n, out is n×n, leading dimensions n: every access is in bounds.
        unsafe { blas.gemm(cfg, &a, &b_mat, &mut out) }.unwrap();
    };
    let mut g = c.benchmark_group("probe");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(3));
    g.throughput(Throughput::Elements(flops as u64));
    g.bench_function("cublas_bf16_gemm_8192", |b| {
        b.iter_custom(|iters| common::event_time(&gpu, iters, &mut run))
    });
    g.finish();
    let t = fusekit::timing::time_launches_sync(&gpu, 3, 20, || {
        run();
        Ok(())
    })
    .unwrap();
    let tflops = flops / (t.median_ms * 1e-3) / 1e12;
    println!(
        "bf16 GEMM ceiling (cuBLAS, {n}³): {tflops:.1} TFLOP/s median ({:.3} ms)",
        t.median_ms
    );
    common::emit(
        "probe/cublas_bf16_gemm_8192",
        &[
            ("median_ms", t.median_ms),
            ("min_ms", t.min_ms),
            ("max_ms", t.max_ms),
            ("tflops", tflops),
        ],
        &[("device", &gpu.props().name)],
    );
}

criterion_group!(benches, copy_bandwidth, gemm_peak);
criterion_main!(benches);
