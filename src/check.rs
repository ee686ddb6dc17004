//! `fusekit check`: every kernel family's self-check against its CPU reference, as one table.
//!
//! A family plugs in by adding its [`SelfCheck`]s to [`registry`]. Each check has a CPU part (the reference
//! on known values and identities, always run) and a GPU part (kernel vs reference on small random inputs,
//! plus an achieved-bandwidth figure), run when a GPU is present.

use std::fmt::Write as _;

use crate::error::{Error, Result};
use crate::testing::Rng;
use crate::Gpu;

/// One line of the check table.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckRow {
    /// Kernel (or reference) checked.
    pub kernel: String,
    /// "gpu" when the kernel ran, "cpu-ref" when only the reference was checked.
    pub mode: &'static str,
    /// Largest error against the reference (0 for exact checks).
    pub max_err: f64,
    /// Whether every comparison passed.
    pub pass: bool,
    /// Achieved bandwidth, where the check measured one.
    pub gbps: Option<f64>,
    /// Sizes checked, or what failed.
    pub note: String,
}

impl CheckRow {
    /// A row of the table.
    ///
    /// ```
    /// let r = fusekit::check::CheckRow::new("k", "cpu-ref", 1e-7, true, "n=8".into(), None);
    /// assert!(r.pass && r.gbps.is_none());
    /// ```
    pub fn new(
        kernel: &str,
        mode: &'static str,
        max_err: f64,
        pass: bool,
        note: String,
        gbps: Option<f64>,
    ) -> Self {
        CheckRow {
            kernel: kernel.into(),
            mode,
            max_err,
            pass,
            gbps,
            note,
        }
    }
}

type CpuCheck = fn(&mut Rng) -> Vec<CheckRow>;
type GpuCheck = fn(&Gpu, &mut Rng) -> Result<Vec<CheckRow>>;

/// A family's self-check.
#[derive(Clone, Copy, Debug)]
pub struct SelfCheck {
    /// Family name, as the folder under kernels/.
    pub family: &'static str,
    /// CPU-reference checks (run everywhere).
    pub cpu: CpuCheck,
    /// Kernel-vs-reference checks (run with a GPU).
    pub gpu: GpuCheck,
}

/// Every family's self-check.
///
/// ```
/// assert!(fusekit::check::registry().iter().any(|c| c.family == "probe"));
/// assert!(fusekit::check::registry().iter().any(|c| c.family == "loss"));
/// ```
pub fn registry() -> Vec<SelfCheck> {
    vec![
        crate::probe::self_check(),
        crate::loss::check::self_check(),
        crate::moe::check::self_check(),
    ]
}

/// Options of `fusekit check`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckOptions {
    /// Exit non-zero when no GPU is present.
    pub require_gpu: bool,
    /// Seed for the random inputs (fresh when `None`).
    pub seed: Option<u64>,
}

/// Outcome of a check run.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckOutcome {
    /// What was printed.
    pub text: String,
    /// Table rows.
    pub rows: Vec<CheckRow>,
    /// Process exit code: 0 all passed (or no GPU and not required), 1 a check failed, 2 GPU required but absent.
    pub exit_code: i32,
}

/// Runs every family's self-check. Without a GPU it says so, runs the CPU references, and succeeds
/// unless `require_gpu` is set.
///
/// ```
/// let out = fusekit::check::run(&fusekit::check::CheckOptions { require_gpu: false, seed: Some(1) });
/// assert!(out.text.contains("copy"));
/// ```
pub fn run(opts: &CheckOptions) -> CheckOutcome {
    run_with(opts, Gpu::new(0))
}

/// [`run`] with the GPU decision made by the caller (tests use it to exercise the no-GPU path).
///
/// ```
/// use fusekit::{check::{run_with, CheckOptions}, Error};
/// let none = Err(Error::NoDevice { reason: "test".into() });
/// let out = run_with(&CheckOptions { require_gpu: true, seed: Some(1) }, none);
/// assert_eq!(out.exit_code, 2);
/// ```
pub fn run_with(opts: &CheckOptions, gpu: Result<Gpu>) -> CheckOutcome {
    let seed = opts
        .seed
        .unwrap_or_else(|| crate::testing::seed_for("fusekit check"));
    let mut text = String::new();
    let _ = writeln!(
        text,
        "fusekit {} check (seed {seed})",
        env!("CARGO_PKG_VERSION")
    );
    let gpu = match gpu {
        Ok(g) => {
            let _ = writeln!(text, "{}", g.props());
            Some(g)
        }
        Err(e @ Error::NoDevice { .. }) => {
            let _ = writeln!(text, "{e}: running the CPU references only");
            None
        }
        Err(e) => {
            let _ = writeln!(
                text,
                "the GPU could not be used: {e}: running the CPU references only"
            );
            None
        }
    };
    let mut rows = Vec::new();
    for check in registry() {
        let mut rng = Rng::new(seed ^ fnv(check.family));
        rows.extend((check.cpu)(&mut rng));
        if let Some(g) = &gpu {
            match (check.gpu)(g, &mut rng) {
                Ok(r) => rows.extend(r),
                Err(e) => rows.push(CheckRow {
                    kernel: format!("{} (gpu)", check.family),
                    mode: "gpu",
                    max_err: f64::NAN,
                    pass: false,
                    gbps: None,
                    note: e.to_string(),
                }),
            }
        }
    }
    let _ = writeln!(
        text,
        "\n{:<30} {:<8} {:>11} {:<5} {:>9}  note",
        "kernel", "mode", "max error", "pass", "GB/s"
    );
    for r in &rows {
        let gbps = r
            .gbps
            .map(|g| format!("{g:.1}"))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            text,
            "{:<30} {:<8} {:>11.3e} {:<5} {:>9}  {}",
            r.kernel,
            r.mode,
            r.max_err,
            if r.pass { "ok" } else { "FAIL" },
            gbps,
            r.note
        );
    }
    let failed = rows.iter().filter(|r| !r.pass).count();
    let exit_code = if failed > 0 {
        let _ = writeln!(text, "\n{failed} check(s) FAILED");
        1
    } else if gpu.is_none() && opts.require_gpu {
        let _ = writeln!(
            text,
            "\n--require-gpu: no GPU was usable, so no kernel was checked"
        );
        2
    } else if gpu.is_none() {
        let _ = writeln!(text, "\nCPU references passed; kernels not run (no GPU)");
        0
    } else {
        let _ = writeln!(text, "\nall {} checks passed", rows.len());
        0
    };
    CheckOutcome {
        text,
        rows,
        exit_code,
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}
