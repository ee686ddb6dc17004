//! `fusekit check`: every kernel family's self-check against its CPU reference, as one table.
//!
//! A family plugs in by adding its [`SelfCheck`]s to [`registry`]. Each check has a CPU part (the reference
//! on known values and identities, always run) and a kernel part (kernel vs reference on small random
//! inputs), run on the GPU when one is present and on the SIMT emulator otherwise (mode `emu`; both with
//! `--emu`), plus GPU-only figures (achieved bandwidth).

use std::fmt::Write as _;

pub(crate) mod row;
pub use row::{CheckRow, SelfCheck};

use crate::emu::Emulator;
use crate::error::{Error, Result};
use crate::testing::Rng;
use crate::{Backend, Gpu};

/// Every family's self-check.
///
/// ```
/// assert!(fusekit::check::registry().iter().any(|c| c.family == "probe"));
/// assert!(fusekit::check::registry().iter().any(|c| c.family == "loss"));
/// ```
pub fn registry() -> Vec<SelfCheck> {
    vec![
        crate::probe::self_check(),
        crate::attention::check::self_check(),
        crate::loss::check::self_check(),
        crate::moe::check::self_check(),
        crate::quant::check::self_check(),
        crate::selftest::self_check(),
    ]
}

/// Options of `fusekit check`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckOptions {
    /// Exit non-zero when no GPU is present.
    pub require_gpu: bool,
    /// Run the kernels on the SIMT emulator too when a GPU is present (without one they always do).
    pub emu: bool,
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

/// Runs every family's self-check. Without a GPU it says so and runs every kernel on the SIMT emulator
/// (rows of mode `emu`), and succeeds unless `require_gpu` is set.
///
/// ```
/// let out = fusekit::check::run(&fusekit::check::CheckOptions { require_gpu: false, emu: false, seed: Some(1) });
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
/// let out = run_with(&CheckOptions { require_gpu: true, emu: false, seed: Some(1) }, none);
/// assert_eq!(out.exit_code, 2);
/// assert!(out.rows.iter().any(|r| r.mode == "emu"));
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
            let _ = writeln!(text, "{e}: running the kernels on the SIMT emulator");
            None
        }
        Err(e) => {
            let _ = writeln!(
                text,
                "the GPU could not be used: {e}: running the kernels on the SIMT emulator"
            );
            None
        }
    };
    let emu = if gpu.is_none() || opts.emu {
        match Emulator::new().and_then(|e| e.check_available().map(|_| e)) {
            Ok(e) => {
                let _ = writeln!(
                    text,
                    "emulator: {} ({:?} schedule, {} build); kernels run as host C++ from the same .cu sources",
                    e.props().name,
                    e.options().schedule,
                    e.options().sanitizer.name()
                );
                Some(e)
            }
            Err(err) => {
                let _ = writeln!(text, "the emulator could not be used: {err}");
                None
            }
        }
    } else {
        None
    };
    let mut rows = Vec::new();
    for check in registry() {
        let mut rng = Rng::new(seed ^ fnv(check.family));
        rows.extend((check.cpu)(&mut rng));
        let mut kernel_rows = |mode: &'static str, res: Result<Vec<CheckRow>>| match res {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(CheckRow {
                kernel: format!("{} ({mode})", check.family),
                mode,
                max_err: f64::NAN,
                pass: false,
                gbps: None,
                note: e.to_string(),
            }),
        };
        if let Some(e) = &emu {
            kernel_rows("emu", (check.emu)(e, &mut rng));
        }
        if let Some(g) = &gpu {
            kernel_rows("gpu", (check.gpu)(g, &mut rng));
            if let Some(extra) = check.gpu_extra {
                kernel_rows("gpu", extra(g, &mut rng));
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
    if let Some(e) = &emu {
        let st = e.stats();
        let _ = writeln!(
            text,
            "\nemulator: {} launches, {} blocks, {} GPU threads, {:.1} M context switches/s over {:.2} s",
            st.launches,
            st.blocks,
            st.threads,
            st.switches_per_second() / 1e6,
            st.seconds
        );
    }
    let failed = rows.iter().filter(|r| !r.pass).count();
    let exit_code = if failed > 0 {
        let _ = writeln!(text, "\n{failed} check(s) FAILED");
        1
    } else if gpu.is_none() && opts.require_gpu {
        let _ = writeln!(
            text,
            "\n--require-gpu: no GPU was usable, so no kernel ran on hardware"
        );
        2
    } else if gpu.is_none() && emu.is_some() {
        let _ = writeln!(
            text,
            "\nall {} checks passed; the kernels ran on the emulator only (no GPU): logic, indexing, \
             barriers, not speed or the memory model",
            rows.len()
        );
        0
    } else if gpu.is_none() {
        let _ = writeln!(
            text,
            "\nCPU references passed; kernels not run (no GPU, no emulator)"
        );
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
