//! # fusekit
//!
//! Hand-written CUDA kernels behind a safe Rust API, for Rust ML stacks that want the fastest available
//! GPU kernels for fused losses, KV-cache attention, quantised matmul and MoE routing.
//!
//! * Kernels are compiled by `build.rs` (nvcc → one fatbin per family, SASS for sm_80/86/89/90a + PTX) and
//!   embedded in the crate; they are loaded once per CUDA context on first use.
//! * Every function takes cudarc's own buffers ([`cudarc::driver::CudaSlice`], views) and queues on the
//!   [`Gpu`] handle's stream (yours, if you wrap one with [`Gpu::from_stream`]); nothing synchronises unless
//!   its name ends in `_sync`.
//! * Every argument is validated: bad input is an [`Error`] naming the argument, never a panic.
//! * No GPU or no driver is [`Error::NoDevice`]: the crate builds, and its CPU references run, anywhere.
//! * Every entry point is a pure plan and a launch ([`plan`]): a call can be validated from lengths
//!   alone, without a device.
//!
//! The test harness (`testing`, `loss::verify`, `moe::check`), shared by the integration tests, the
//! benchmarks and `fusekit check`, is public only so they can reach it: hidden from these docs, outside
//! the API's stability and its no-panic rule (it assumes the inputs it generates itself).
//!
//! ```no_run
//! # fn main() -> fusekit::Result<()> {
//! let gpu = fusekit::Gpu::new(0)?;
//! let bw = fusekit::probe::measure_copy_bandwidth_sync(&gpu, 1 << 30, 20)?;
//! println!("{}: {:.0} GB/s device copy", gpu.props().name, bw.gbps());
//! # Ok(()) }
//! ```
#![warn(missing_docs, missing_debug_implementations)]

pub mod attention;
mod backend;
pub mod check;
mod device;
pub mod dtype;
pub mod emu;
mod error;
#[cfg_attr(not(test), allow(dead_code))]
mod host_math;
mod launch;
pub mod loss;
pub mod moe;
mod params;
pub mod plan;
pub mod probe;
pub mod quant;
pub mod selftest;
#[doc(hidden)] // the test harness: see the crate docs
pub mod testing;
pub mod timing;
mod validate;

pub use backend::{Backend, DeviceRead, DeviceWrite, Scalar};
/// The cudarc fusekit is built against: use it (`fusekit::cudarc`) for the slices and streams you pass,
/// so the types match whatever version your own dependencies resolve.
pub use cudarc;
pub use device::{
    compiled_families, probe_driver, DeviceProps, Family, Gpu, MIN_COMPUTE_CAPABILITY,
    MIN_DRIVER_VERSION,
};
pub use error::{Error, Result};
/// The half-precision types (`bf16`, `f16`) fusekit's kernels take.
pub use half;

/// The ptxas resource report of this build (per kernel and architecture: registers, shared memory,
/// stack, spills), as `fusekit ptxas` prints it.
///
/// ```
/// assert!(fusekit::PTXAS_REPORT.contains("fk_copy_v16") || fusekit::PTXAS_REPORT.contains("DOCS_RS"));
/// ```
pub const PTXAS_REPORT: &str = include_str!(concat!(env!("OUT_DIR"), "/ptxas-report.txt"));
