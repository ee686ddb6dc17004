//! CUDA-event timing shared by `fusekit check`, the benchmarks and the probes.

use cudarc::driver::sys::CUevent_flags;

use crate::error::{DriverContext, Result};
use crate::Gpu;

/// Per-launch times of a timed run, in milliseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    /// Median time of one launch.
    pub median_ms: f64,
    /// Fastest launch.
    pub min_ms: f64,
    /// Slowest launch.
    pub max_ms: f64,
    /// Launches timed.
    pub samples: usize,
}

impl Timing {
    /// Summary of per-launch samples (ms). An empty sample set gives zeros.
    ///
    /// ```
    /// let t = fusekit::timing::Timing::from_samples(vec![3.0, 1.0, 2.0]);
    /// assert_eq!((t.median_ms, t.min_ms, t.max_ms, t.samples), (2.0, 1.0, 3.0, 3));
    /// ```
    pub fn from_samples(mut ms: Vec<f64>) -> Self {
        if ms.is_empty() {
            return Timing {
                median_ms: 0.0,
                min_ms: 0.0,
                max_ms: 0.0,
                samples: 0,
            };
        }
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        let median = if n % 2 == 1 {
            ms[n / 2]
        } else {
            0.5 * (ms[n / 2 - 1] + ms[n / 2])
        };
        Timing {
            median_ms: median,
            min_ms: ms[0],
            max_ms: ms[n - 1],
            samples: n,
        }
    }

    /// Achieved bandwidth in GB/s (1e9 bytes/s) for `bytes` moved per launch, at the median.
    ///
    /// ```
    /// let t = fusekit::timing::Timing::from_samples(vec![1.0]);
    /// assert_eq!(t.gbps(3_000_000_000), 3000.0);
    /// ```
    pub fn gbps(&self, bytes: u64) -> f64 {
        if self.median_ms <= 0.0 {
            return 0.0;
        }
        bytes as f64 / (self.median_ms * 1e-3) / 1e9
    }
}

/// Runs `launch` `warmup` times, then times each of `iters` launches with a pair of CUDA events on the
/// handle's stream. Synchronises (the name says so: this is a measurement).
///
/// ```no_run
/// # fn main() -> fusekit::Result<()> {
/// let gpu = fusekit::Gpu::new(0)?;
/// let src = gpu.stream().alloc_zeros::<u8>(1 << 28).unwrap();
/// let mut dst = gpu.stream().alloc_zeros::<u8>(1 << 28).unwrap();
/// let t = fusekit::timing::time_launches_sync(&gpu, 2, 10, || fusekit::probe::copy(&gpu, &src, &mut dst))?;
/// println!("{:.1} GB/s", t.gbps(2 << 28));
/// # Ok(()) }
/// ```
pub fn time_launches_sync(
    gpu: &Gpu,
    warmup: usize,
    iters: usize,
    mut launch: impl FnMut() -> Result<()>,
) -> Result<Timing> {
    for _ in 0..warmup {
        launch()?;
    }
    let ctx = gpu.context();
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let mut events = Vec::with_capacity(iters + 1);
    for _ in 0..=iters {
        events.push(ctx.new_event(flags).during("creating a timing event")?);
    }
    events[0]
        .record(gpu.stream())
        .during("recording an event")?;
    for i in 0..iters {
        launch()?;
        events[i + 1]
            .record(gpu.stream())
            .during("recording an event")?;
    }
    gpu.synchronize()?;
    let mut ms = Vec::with_capacity(iters);
    for w in events.windows(2) {
        ms.push(w[0].elapsed_ms(&w[1]).during("reading an event time")? as f64);
    }
    Ok(Timing::from_samples(ms))
}
