//! Shared benchmark plumbing: GPU-or-skip, CUDA-event timing for criterion, and the one-line
//! machine-readable records (`FUSEKIT_BENCH {...}`) that scripts/gpu-suite collects into its report.
#![allow(dead_code)]

use std::time::Duration;

use fusekit::{timing::time_launches_sync, Gpu};

/// GPU 0, or a printed skip line (a failure under FUSEKIT_REQUIRE_GPU=1).
pub fn gpu_or_skip(bench: &str) -> Option<Gpu> {
    fusekit::testing::gpu_or_skip(bench)
}

/// Criterion `iter_custom` body: `iters` launches timed with CUDA events on the handle's stream.
pub fn event_time(gpu: &Gpu, iters: u64, mut launch: impl FnMut()) -> Duration {
    let t = time_launches_sync(gpu, 0, iters as usize, || {
        launch();
        Ok(())
    })
    .expect("timing failed");
    Duration::from_secs_f64(t.median_ms * 1e-3 * iters as f64)
}

/// Prints one record for the GPU-suite report: `FUSEKIT_BENCH {"bench": "...", ...}`.
pub fn emit(bench: &str, fields: &[(&str, f64)], labels: &[(&str, &str)]) {
    let mut s = format!("FUSEKIT_BENCH {{\"bench\": \"{bench}\"");
    for (k, v) in labels {
        s.push_str(&format!(", \"{k}\": \"{v}\""));
    }
    for (k, v) in fields {
        if v.is_finite() {
            s.push_str(&format!(", \"{k}\": {v:.6}"));
        } else {
            s.push_str(&format!(", \"{k}\": null"));
        }
    }
    s.push('}');
    println!("{s}");
}
