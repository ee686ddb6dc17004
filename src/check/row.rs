//! The rows of `fusekit check` and the shape of a family's self-check: what the families fill in,
//! below them; the registry and the runner that call the families live in the module above.

use crate::emu::Emulator;
use crate::error::Result;
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
type EmuCheck = fn(&Emulator, &mut Rng) -> Result<Vec<CheckRow>>;

/// A family's self-check.
#[derive(Clone, Copy, Debug)]
pub struct SelfCheck {
    /// Family name, as the folder under kernels/.
    pub family: &'static str,
    /// CPU-reference checks (run everywhere).
    pub cpu: CpuCheck,
    /// Kernel-vs-reference checks on a GPU (run with a GPU).
    pub gpu: GpuCheck,
    /// The same checks on the SIMT emulator (run without a GPU, or with `--emu`).
    pub emu: EmuCheck,
    /// What only a GPU measures (bandwidth, throughput).
    pub gpu_extra: Option<GpuCheck>,
}
