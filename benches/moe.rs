//! MoE routing benchmarks: the fused gate over T ∈ {1, 64, 4096, 16384, 65536} for four expert
//! configurations (CUDA-graph replay for T ≤ 64, so launch overhead is not what is measured), the
//! permutation plan, gather and combine at H ∈ {4096, 7168} bf16 with GB/s and % of the copy floor.
//! Peers: benches/peers/moe.py (the PyTorch composite) in the same GPU-suite run, same bench names.

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use fusekit::moe::*;
use fusekit::testing::{Dist, Rng};
use fusekit::timing::{time_launches_sync, Timing};
use fusekit::Gpu;
use half::bf16;

fn configs() -> Vec<(&'static str, GateConfig)> {
    let base = GateConfig::default();
    vec![
        ("e64k6", base),
        ("e256k8g8", GateConfig::deepseek_v3()),
        (
            "e160k6",
            GateConfig {
                n_experts: 160,
                ..base
            },
        ),
        (
            "e512k10",
            GateConfig {
                n_experts: 512,
                top_k: 10,
                ..base
            },
        ),
    ]
}

/// Per-call time of `f` replayed from a CUDA graph of `reps` calls.
fn graph_time(gpu: &Gpu, reps: usize, mut f: impl FnMut()) -> Timing {
    let s = gpu.stream();
    f(); // load modules outside the capture
    gpu.synchronize().unwrap();
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    for _ in 0..reps {
        f();
    }
    let graph = s
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("empty graph");
    graph.upload().unwrap();
    let t = time_launches_sync(gpu, 3, 50, || {
        graph
            .launch()
            .map_err(|e| fusekit::Error::driver("graph", e))
    })
    .unwrap();
    Timing {
        median_ms: t.median_ms / reps as f64,
        min_ms: t.min_ms / reps as f64,
        max_ms: t.max_ms / reps as f64,
        samples: t.samples,
    }
}

fn gate_bench(c: &mut Criterion) {
    let Some(gpu) = common::gpu_or_skip("bench moe/gate") else {
        return;
    };
    // Graph capture and cudarc's cross-stream event tracking do not mix; one stream is used here anyway.
    unsafe { gpu.context().disable_event_tracking() };
    let s = gpu.stream();
    let mut rng = Rng::new(5);
    let mut g = c.benchmark_group("moe");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(1));
    for (name, cfg) in configs() {
        let bias: Vec<f32> = (0..cfg.n_experts)
            .map(|_| (rng.normal() * 0.05) as f32)
            .collect();
        let bd = s.clone_htod(&bias).unwrap();
        for t in [1usize, 64, 4096, 16384, 65536] {
            let logits: Vec<bf16> = rng
                .sample(
                    Dist::Normal {
                        mean: 0.0,
                        std: 1.0,
                    },
                    t * cfg.n_experts,
                )
                .into_iter()
                .map(bf16::from_f64)
                .collect();
            let ld = s.clone_htod(&logits).unwrap();
            let mut ids = s.alloc_zeros::<i32>(t * cfg.top_k).unwrap();
            let mut w = s.alloc_zeros::<f32>(t * cfg.top_k).unwrap();
            let mut counts = s.alloc_zeros::<i32>(cfg.n_experts).unwrap();
            let mut f = || {
                gate(
                    &gpu,
                    &cfg,
                    t,
                    &ld,
                    Some(&bd),
                    &mut ids,
                    &mut w,
                    &mut counts,
                    false,
                )
                .unwrap()
            };
            let tm = if t <= 64 {
                graph_time(&gpu, 20, &mut f)
            } else {
                g.bench_function(format!("gate_{name}/{t}"), |b| {
                    b.iter_custom(|iters| common::event_time(&gpu, iters, &mut f))
                });
                time_launches_sync(&gpu, 3, 30, || {
                    f();
                    Ok(())
                })
                .unwrap()
            };
            println!("gate {name} T={t}: {:.2} us", tm.median_ms * 1e3);
            common::emit(
                &format!("moe/gate_{name}/{t}"),
                &[
                    ("t", t as f64),
                    ("e", cfg.n_experts as f64),
                    ("k", cfg.top_k as f64),
                    ("median_us", tm.median_ms * 1e3),
                    ("min_us", tm.min_ms * 1e3),
                ],
                &[
                    ("dtype", "bf16"),
                    ("timing", if t <= 64 { "graph" } else { "events" }),
                    ("device", &gpu.props().name),
                ],
            );
        }
    }
    g.finish();
}

fn permute_bench(c: &mut Criterion) {
    let Some(gpu) = common::gpu_or_skip("bench moe/permute") else {
        return;
    };
    let copy = fusekit::probe::measure_copy_bandwidth_sync(&gpu, 1 << 30, 20)
        .unwrap()
        .gbps();
    let s = gpu.stream();
    let mut rng = Rng::new(9);
    let (k, e) = (8usize, 256usize);
    let mut g = c.benchmark_group("moe");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(1));
    for t in [4096usize, 16384] {
        let ids: Vec<i32> = (0..t * k).map(|_| rng.below(e as u64) as i32).collect();
        let idd = s.clone_htod(&ids).unwrap();
        let w: Vec<f32> = (0..t * k).map(|_| rng.unit() as f32).collect();
        let wd = s.clone_htod(&w).unwrap();
        let mut plan = PermutePlan::new(&gpu, t, k, e, 128).unwrap();
        let tp = time_launches_sync(&gpu, 3, 30, || plan.build(&gpu, &idd)).unwrap();
        println!("plan T={t}: {:.2} us", tp.median_ms * 1e3);
        common::emit(
            &format!("moe/plan/{t}"),
            &[("t", t as f64), ("median_us", tp.median_ms * 1e3)],
            &[("device", &gpu.props().name)],
        );
        plan.build(&gpu, &idd).unwrap();
        let rows = plan.total_rows_sync(&gpu).unwrap();
        for h in [4096usize, 7168] {
            let hidden = s.alloc_zeros::<bf16>(t * h).unwrap();
            let mut perm = s.alloc_zeros::<bf16>(plan.max_rows() * h).unwrap();
            let mut out = s.alloc_zeros::<bf16>(t * h).unwrap();
            // gather floor: write every row once, read each token once.
            let gbytes = ((rows + t) * h * 2) as u64;
            let cbytes = ((t * k + t) * h * 2 + t * k * 8) as u64;
            let tg = time_launches_sync(&gpu, 3, 30, || gather(&gpu, &plan, &hidden, h, &mut perm))
                .unwrap();
            let tc = time_launches_sync(&gpu, 3, 30, || {
                combine(&gpu, &plan, &perm, &wd, h, &mut out)
            })
            .unwrap();
            g.bench_function(format!("combine/{t}x{h}"), |b| {
                b.iter_custom(|iters| {
                    common::event_time(&gpu, iters, || {
                        combine(&gpu, &plan, &perm, &wd, h, &mut out).unwrap()
                    })
                })
            });
            for (what, tm, bytes) in [("gather", tg, gbytes), ("combine", tc, cbytes)] {
                println!(
                    "{what} T={t} H={h}: {:.2} us, {:.0} GB/s, {:.1}% of the copy floor",
                    tm.median_ms * 1e3,
                    tm.gbps(bytes),
                    100.0 * tm.gbps(bytes) / copy
                );
                common::emit(
                    &format!("moe/{what}/{t}x{h}"),
                    &[
                        ("t", t as f64),
                        ("h", h as f64),
                        ("median_us", tm.median_ms * 1e3),
                        ("gbps", tm.gbps(bytes)),
                        ("pct_of_floor", 100.0 * tm.gbps(bytes) / copy),
                    ],
                    &[("dtype", "bf16"), ("device", &gpu.props().name)],
                );
            }
        }
    }
    g.finish();
}

criterion_group!(benches, gate_bench, permute_bench);
criterion_main!(benches);
