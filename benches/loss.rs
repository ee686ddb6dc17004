//! Fused-loss benchmarks: CE fwd+bwd over LLM vocabularies (bf16), the other kinds at one size, in-place,
//! sigmoid focal. Each reports time, GB/s and % of the floor `2·N·V·2 B / copy bandwidth`, with the copy
//! bandwidth measured in the same process. Peers (PyTorch eager, torch.compile, torchvision) are measured
//! by benches/peers/loss.py in the same GPU-suite run, under the same bench names.

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fusekit::loss::*;
use fusekit::testing::{Dist, Rng};
use fusekit::timing::time_launches_sync;
use fusekit::Gpu;
use half::bf16;

fn copy_gbps(gpu: &Gpu) -> f64 {
    fusekit::probe::measure_copy_bandwidth_sync(gpu, 1 << 30, 20)
        .unwrap()
        .gbps()
}

struct Problem {
    logits: cudarc::driver::CudaSlice<bf16>,
    grad: cudarc::driver::CudaSlice<bf16>,
    targets: cudarc::driver::CudaSlice<i64>,
    out: LossOutputs,
    rows: Rows,
}

fn problem(gpu: &Gpu, n: usize, v: usize) -> Problem {
    let s = gpu.stream();
    let mut rng = Rng::new(0x10_55);
    // Upload a 16 MiB random pattern repeatedly: realistic values without generating N·V on the host.
    let tile: Vec<bf16> = rng
        .sample(
            Dist::Logits {
                std: 2.0,
                outlier_frac: 0.005,
                outlier_scale: 8.0,
            },
            8 << 20,
        )
        .into_iter()
        .map(bf16::from_f64)
        .collect();
    let mut logits = s.alloc_zeros::<bf16>(n * v).unwrap();
    let mut off = 0;
    while off < n * v {
        let k = tile.len().min(n * v - off);
        s.memcpy_htod(&tile[..k], &mut logits.slice_mut(off..off + k))
            .unwrap();
        off += k;
    }
    let targets: Vec<i64> = (0..n).map(|_| rng.below(v as u64) as i64).collect();
    Problem {
        logits,
        grad: s.alloc_zeros::<bf16>(n * v).unwrap(),
        targets: s.clone_htod(&targets).unwrap(),
        out: LossOutputs::new(gpu, n).unwrap(),
        rows: Rows::contiguous(n, v),
    }
}

fn run(gpu: &Gpu, p: &mut Problem, cfg: &LossConfig, inplace: bool) -> fusekit::Result<()> {
    run_path(gpu, p, cfg, inplace, RowPath::Auto)
}

fn run_path(
    gpu: &Gpu,
    p: &mut Problem,
    cfg: &LossConfig,
    inplace: bool,
    row_path: RowPath,
) -> fusekit::Result<()> {
    let extras = LossExtras {
        row_path,
        ..Default::default()
    };
    if inplace {
        fwd_bwd_inplace(
            gpu,
            p.rows,
            &mut p.logits,
            &p.targets,
            &extras,
            cfg,
            &mut p.out,
        )
    } else {
        fwd_bwd(
            gpu,
            p.rows,
            &p.logits,
            &p.targets,
            &mut p.grad,
            &extras,
            cfg,
            &mut p.out,
        )
    }
}

fn record(
    gpu: &Gpu,
    name: &str,
    n: usize,
    v: usize,
    bytes: u64,
    copy: f64,
    mut f: impl FnMut() -> fusekit::Result<()>,
) {
    let t = time_launches_sync(gpu, 3, 20, &mut f).unwrap();
    let gbps = t.gbps(bytes);
    println!(
        "{name}: {:.3} ms, {gbps:.0} GB/s, {:.1}% of the {copy:.0} GB/s copy floor",
        t.median_ms,
        100.0 * gbps / copy
    );
    common::emit(
        name,
        &[
            ("n", n as f64),
            ("v", v as f64),
            ("median_ms", t.median_ms),
            ("min_ms", t.min_ms),
            ("max_ms", t.max_ms),
            ("gbps", gbps),
            ("floor_ms", bytes as f64 / (copy * 1e9) * 1e3),
            ("pct_of_floor", 100.0 * gbps / copy),
        ],
        &[("dtype", "bf16"), ("device", &gpu.props().name)],
    );
}

fn cross_entropy(c: &mut Criterion) {
    let Some(gpu) = common::gpu_or_skip("bench loss/ce") else {
        return;
    };
    let copy = copy_gbps(&gpu);
    let mut g = c.benchmark_group("loss");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(2));
    for n in [4096usize, 16384] {
        for v in [32000usize, 128256, 256000] {
            let mut p = problem(&gpu, n, v);
            let bytes = 2 * (n * v * 2) as u64;
            let cfg = LossConfig::default();
            g.throughput(Throughput::Bytes(bytes));
            g.bench_function(format!("ce_fwd_bwd_bf16/{n}x{v}"), |b| {
                b.iter_custom(|iters| {
                    common::event_time(&gpu, iters, || run(&gpu, &mut p, &cfg, false).unwrap())
                })
            });
            record(
                &gpu,
                &format!("loss/ce_fwd_bwd_bf16/{n}x{v}"),
                n,
                v,
                bytes,
                copy,
                || run(&gpu, &mut p, &cfg, false),
            );
            record(
                &gpu,
                &format!("loss/ce_fwd_bwd_inplace_bf16/{n}x{v}"),
                n,
                v,
                bytes,
                copy,
                || run(&gpu, &mut p, &cfg, true),
            );
            // What the automatic choice buys: every other row path that can run this shape.
            let auto = RowPath::Auto.resolve(gpu.props(), v, 2, true).unwrap();
            println!("loss/ce_fwd_bwd_bf16/{n}x{v}: Auto is {auto:?}");
            for (label, path) in [
                ("reread", RowPath::Reread),
                ("cluster2", RowPath::Cluster { ctas: 2 }),
                ("cluster4", RowPath::Cluster { ctas: 4 }),
                ("cluster8", RowPath::Cluster { ctas: 8 }),
            ] {
                if path == auto || path.resolve(gpu.props(), v, 2, true).is_err() {
                    continue;
                }
                record(
                    &gpu,
                    &format!("loss/ce_fwd_bwd_bf16_{label}/{n}x{v}"),
                    n,
                    v,
                    bytes,
                    copy,
                    || run_path(&gpu, &mut p, &cfg, false, path),
                );
            }
        }
    }
    g.finish();
}

fn other_kinds(c: &mut Criterion) {
    let Some(gpu) = common::gpu_or_skip("bench loss/kinds") else {
        return;
    };
    let copy = copy_gbps(&gpu);
    let (n, v) = (4096usize, 128256usize);
    let mut p = problem(&gpu, n, v);
    let bytes = 2 * (n * v * 2) as u64;
    let mut g = c.benchmark_group("loss");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(2));
    for (name, cfg) in [
        (
            "ce_smooth_zloss",
            LossConfig {
                label_smoothing: LabelSmoothing::PyTorch(0.1),
                z_loss: 1e-4,
                ..LossConfig::default()
            },
        ),
        (
            "focal",
            LossConfig {
                kind: LossKind::Focal { gamma: 2.0 },
                ..LossConfig::default()
            },
        ),
        (
            "poly1",
            LossConfig {
                kind: LossKind::Poly1 { epsilon: 1.0 },
                ..LossConfig::default()
            },
        ),
        (
            "gce",
            LossConfig {
                kind: LossKind::Gce { q: 0.7 },
                ..LossConfig::default()
            },
        ),
        (
            "ce_softcap",
            LossConfig {
                softcap: Some(30.0),
                ..LossConfig::default()
            },
        ),
    ] {
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(format!("{name}_fwd_bwd_bf16/{n}x{v}"), |b| {
            b.iter_custom(|iters| {
                common::event_time(&gpu, iters, || run(&gpu, &mut p, &cfg, false).unwrap())
            })
        });
        record(
            &gpu,
            &format!("loss/{name}_fwd_bwd_bf16/{n}x{v}"),
            n,
            v,
            bytes,
            copy,
            || run(&gpu, &mut p, &cfg, false),
        );
    }
    g.finish();
}

fn sigmoid_focal(c: &mut Criterion) {
    let Some(gpu) = common::gpu_or_skip("bench loss/sigmoid_focal") else {
        return;
    };
    let copy = copy_gbps(&gpu);
    let s = gpu.stream();
    let mut g = c.benchmark_group("loss");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(2));
    for (n, k) in [(65536usize, 80usize), (16384, 1000)] {
        let mut rng = Rng::new(7);
        let x: Vec<f32> = rng
            .sample(
                Dist::Normal {
                    mean: -2.0,
                    std: 2.0,
                },
                n * k,
            )
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let t: Vec<f32> = (0..n * k)
            .map(|_| if rng.unit() < 0.02 { 1.0 } else { 0.0 })
            .collect();
        let xd = s.clone_htod(&x).unwrap();
        let td = s.clone_htod(&t).unwrap();
        let mut gd = s.alloc_zeros::<f32>(n * k).unwrap();
        let mut out = SigmoidFocalOutputs::new(&gpu, n * k, false).unwrap();
        let cfg = SigmoidFocalConfig::default();
        let bytes = 3 * (n * k * 4) as u64;
        let mut f = || sigmoid_focal_fwd_bwd(&gpu, &xd, &td, &mut gd, None, &cfg, &mut out);
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(format!("sigmoid_focal_f32/{n}x{k}"), |b| {
            b.iter_custom(|iters| common::event_time(&gpu, iters, || f().unwrap()))
        });
        let t = time_launches_sync(&gpu, 3, 20, &mut f).unwrap();
        common::emit(
            &format!("loss/sigmoid_focal_f32/{n}x{k}"),
            &[
                ("n", n as f64),
                ("v", k as f64),
                ("median_ms", t.median_ms),
                ("gbps", t.gbps(bytes)),
                ("pct_of_floor", 100.0 * t.gbps(bytes) / copy),
            ],
            &[("dtype", "f32"), ("device", &gpu.props().name)],
        );
    }
    g.finish();
}

fn linear_ce(c: &mut Criterion) {
    let Some(gpu) = common::gpu_or_skip("bench loss/linear_ce") else {
        return;
    };
    let s = gpu.stream();
    let (h, v) = (4096usize, 128256usize);
    let mut rng = Rng::new(11);
    let tile: Vec<bf16> = rng
        .sample(
            Dist::Normal {
                mean: 0.0,
                std: 0.02,
            },
            1 << 22,
        )
        .into_iter()
        .map(bf16::from_f64)
        .collect();
    let fill = |len: usize| {
        let mut d = s.alloc_zeros::<bf16>(len).unwrap();
        let mut off = 0;
        while off < len {
            let k = tile.len().min(len - off);
            s.memcpy_htod(&tile[..k], &mut d.slice_mut(off..off + k))
                .unwrap();
            off += k;
        }
        d
    };
    let weight = fill(v * h);
    let mut g = c.benchmark_group("loss");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(3));
    for n in [8192usize, 16384] {
        let hidden = fill(n * h);
        let targets: Vec<i64> = (0..n).map(|_| rng.below(v as u64) as i64).collect();
        let t = s.clone_htod(&targets).unwrap();
        let mut dh = s.alloc_zeros::<bf16>(n * h).unwrap();
        let mut dw = s.alloc_zeros::<f32>(v * h).unwrap();
        let mut out = LossOutputs::new(&gpu, n).unwrap();
        let logits_bytes = n * v * 2;
        let mut lce =
            LinearCrossEntropy::new(&gpu, v, h, Chunking::MemoryBudget(logits_bytes / 8)).unwrap();
        let cfg = LossConfig::default();
        let mut f = || {
            lce.fwd_bwd(
                &gpu,
                n,
                &hidden,
                &weight,
                &t,
                &Default::default(),
                &cfg,
                &mut dh,
                &mut dw,
                false,
                &mut out,
            )
        };
        let flops = 3.0 * 2.0 * (n * v * h) as f64;
        g.throughput(Throughput::Elements(flops as u64));
        g.bench_function(format!("linear_ce_bf16/{n}x{h}x{v}"), |b| {
            b.iter_custom(|iters| common::event_time(&gpu, iters, || f().unwrap()))
        });
        let tm = time_launches_sync(&gpu, 2, 10, &mut f).unwrap();
        let extra = lce.extra_bytes();
        println!(
            "linear+CE {n}x{h}x{v}: {:.2} ms, {:.0} TFLOP/s, extra {} MiB = 1/{:.1} of the {} MiB bf16 logits",
            tm.median_ms,
            flops / (tm.median_ms * 1e-3) / 1e12,
            extra >> 20,
            logits_bytes as f64 / extra as f64,
            logits_bytes >> 20
        );
        common::emit(
            &format!("loss/linear_ce_bf16/{n}x{h}x{v}"),
            &[
                ("n", n as f64),
                ("v", v as f64),
                ("median_ms", tm.median_ms),
                ("tflops", flops / (tm.median_ms * 1e-3) / 1e12),
                ("extra_bytes", extra as f64),
                ("logits_bytes", logits_bytes as f64),
            ],
            &[("dtype", "bf16"), ("device", &gpu.props().name)],
        );
    }
    g.finish();
}

criterion_group!(
    benches,
    cross_entropy,
    other_kinds,
    sigmoid_focal,
    linear_ce
);
criterion_main!(benches);
