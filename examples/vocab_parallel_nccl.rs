//! Vocabulary-parallel cross-entropy over every GPU of this machine with NCCL (cudarc's `nccl` feature):
//! rank r holds logits[:, r·V/P .. (r+1)·V/P]. Each rank computes its shard statistics, the ranks
//! all-gather them, every rank combines them (same bits everywhere) and writes its shard's gradient.
//! Each rank then checks its result against the unsharded kernel on the full logits.
//!
//!     cargo run --release --features nccl --example vocab_parallel_nccl
//!
//! Needs libnccl (e.g. the nvidia-nccl-cu13 wheel's lib folder on LD_LIBRARY_PATH).

use std::sync::Arc;

use cudarc::driver::CudaContext;
use cudarc::nccl::safe::{Comm, Id};
use fusekit::loss::*;
use fusekit::testing::{compare, Dist, Rng, Tolerance};
use half::bf16;

const N: usize = 256;
const V: usize = 32000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let world = fusekit::probe_driver()?;
    if V % world != 0 {
        return Err(format!("V = {V} does not split over {world} GPUs").into());
    }
    // The same inputs on every rank (a shared seed): full logits [N, V] and targets.
    let mut rng = Rng::new(42);
    let logits: Vec<bf16> = rng
        .sample(
            Dist::Logits {
                std: 2.0,
                outlier_frac: 0.005,
                outlier_scale: 8.0,
            },
            N * V,
        )
        .into_iter()
        .map(bf16::from_f64)
        .collect();
    let targets: Vec<i64> = (0..N)
        .map(|i| {
            if i % 17 == 0 {
                -100
            } else {
                rng.below(V as u64) as i64
            }
        })
        .collect();
    let (logits, targets) = (Arc::new(logits), Arc::new(targets));
    let id = Id::new().map_err(|e| format!("ncclGetUniqueId: {e:?}"))?;
    println!(
        "{world} rank(s), N = {N}, V = {V}, {} classes per rank",
        V / world
    );
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (logits, targets) = (logits.clone(), targets.clone());
                s.spawn(move || rank_main(rank, world, id, &logits, &targets))
            })
            .collect();
        for (rank, h) in handles.into_iter().enumerate() {
            match h.join().expect("rank thread panicked") {
                Ok(msg) => println!("rank {rank}: {msg}"),
                Err(e) => println!("rank {rank}: FAILED: {e}"),
            }
        }
    });
    Ok(())
}

fn rank_main(
    rank: usize,
    world: usize,
    id: Id,
    logits: &[bf16],
    targets: &[i64],
) -> Result<String, String> {
    let e = |x: cudarc::driver::DriverError| format!("{:?}", x.0);
    let ctx = CudaContext::new(rank).map_err(e)?;
    let stream = ctx.new_stream().map_err(e)?;
    let comm = Comm::from_rank(stream.clone(), rank, world, id)
        .map_err(|x| format!("NCCL init: {x:?}"))?;
    let gpu = fusekit::Gpu::from_stream(stream.clone()).map_err(|x| x.to_string())?;
    let vs = V / world;
    let spec = ShardSpec {
        vocab_offset: rank * vs,
        full_vocab: V,
    };
    let shard: Vec<bf16> = (0..N)
        .flat_map(|i| logits[i * V + rank * vs..i * V + (rank + 1) * vs].to_vec())
        .collect();
    let shard_d = stream.clone_htod(&shard).map_err(e)?;
    let t = stream.clone_htod(targets).map_err(e)?;
    let cfg = LossConfig {
        label_smoothing: LabelSmoothing::PyTorch(0.1),
        ..LossConfig::default()
    };
    let none = LossExtras::default();
    let f = |x: fusekit::Error| x.to_string();

    // 1. This rank's statistics, 2. all-gather [P, N, 4], 3. combine, 4. this shard's gradient.
    let mut mine = stream.alloc_zeros::<f32>(N * SHARD_STAT_WIDTH).map_err(e)?;
    shard_stats(
        &gpu,
        Rows::contiguous(N, vs),
        &shard_d,
        &t,
        spec,
        &none,
        &cfg,
        &mut mine,
    )
    .map_err(f)?;
    let mut all = stream
        .alloc_zeros::<f32>(world * N * SHARD_STAT_WIDTH)
        .map_err(e)?;
    comm.all_gather(&mine, &mut all)
        .map_err(|x| format!("all_gather: {x:?}"))?;
    let mut out = LossOutputs::new(&gpu, N).map_err(f)?;
    shard_combine(&gpu, N, V, &all, world, &t, &none, &cfg, &mut out).map_err(f)?;
    let mut grad = stream.alloc_zeros::<bf16>(N * vs).map_err(e)?;
    shard_backward(
        &gpu,
        Rows::contiguous(N, vs),
        &shard_d,
        &t,
        spec,
        &none,
        &cfg,
        &out,
        &mut grad,
    )
    .map_err(f)?;
    let loss = out.loss_sync(&gpu).map_err(f)?;

    // The unsharded kernel on this GPU, for comparison.
    let full = stream.clone_htod(logits).map_err(e)?;
    let mut full_grad = stream.alloc_zeros::<bf16>(N * V).map_err(e)?;
    let mut full_out = LossOutputs::new(&gpu, N).map_err(f)?;
    fwd_bwd(
        &gpu,
        Rows::contiguous(N, V),
        &full,
        &t,
        &mut full_grad,
        &none,
        &cfg,
        &mut full_out,
    )
    .map_err(f)?;
    let full_loss = full_out.loss_sync(&gpu).map_err(f)?;
    let fg = stream.clone_dtoh(&full_grad).map_err(e)?;
    let want: Vec<f64> = (0..N)
        .flat_map(|i| {
            fg[i * V + rank * vs..i * V + (rank + 1) * vs]
                .iter()
                .map(|x| x.to_f64())
                .collect::<Vec<_>>()
        })
        .collect();
    let got = stream.clone_dtoh(&grad).map_err(e)?;
    let rep = compare(
        "shard grad vs unsharded",
        &got,
        &want,
        Tolerance {
            rel_l2: 1e-2,
            atol: 1e-9,
            rtol: 1.6e-2,
        },
    )?;
    Ok(format!(
        "loss {loss:.6} (unsharded {full_loss:.6}), shard gradient {rep}"
    ))
}
