//! Plans: every entry point is a pure plan (shapes, lengths, configuration, launch geometry and kernel
//! parameters, computed from lengths and [`DeviceProps`](crate::DeviceProps) alone, with no device) and a
//! launch that fills in the buffers' addresses. A plan is what the CUDA launch and the SIMT emulator both
//! use, so every argument check runs, and is tested, without a GPU; callers can also validate a call
//! ahead of time, or from lengths alone when their tensors are not cudarc buffers.
//!
//! Every size, offset and product computed from a caller's input goes through the checked helpers here:
//! a product that does not fit `usize`, or the kernel's index type, is an `Err`, never a wrapped value.

use cudarc::driver::LaunchConfig;

use crate::error::{Error, Result};

/// One kernel launch of a plan: the kernel's name and its grid, block and dynamic shared memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedLaunch {
    /// The kernel (`extern "C"` name in its family's module).
    pub kernel: String,
    /// Blocks in x.
    pub grid: u32,
    /// Threads per block.
    pub block: u32,
    /// Dynamic shared memory per block, bytes.
    pub shared_mem_bytes: u32,
}

impl PlannedLaunch {
    pub(crate) fn new(kernel: String, cfg: LaunchConfig) -> Self {
        PlannedLaunch {
            kernel,
            grid: cfg.grid_dim.0,
            block: cfg.block_dim.0,
            shared_mem_bytes: cfg.shared_mem_bytes,
        }
    }

    pub(crate) fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.grid, 1, 1),
            block_dim: (self.block, 1, 1),
            shared_mem_bytes: self.shared_mem_bytes,
        }
    }
}

/// `a · b`, or `Err(Shape)` naming `arg` when the product does not fit `usize`.
pub(crate) fn mul(arg: &'static str, a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| {
        Error::shape(
            arg,
            format!("{what} below 2^64"),
            format!("{a} x {b} overflows"),
        )
    })
}

/// `a · b · c`, checked as [`mul`].
pub(crate) fn mul3(arg: &'static str, a: usize, b: usize, c: usize, what: &str) -> Result<usize> {
    mul(arg, mul(arg, a, b, what)?, c, what)
}

/// Elements a strided matrix of `n` rows of `width` at `stride` spans: `(n − 1)·stride + width` (0 for no
/// rows), checked.
pub(crate) fn extent(arg: &'static str, n: usize, stride: usize, width: usize) -> Result<usize> {
    if n == 0 {
        return Ok(0);
    }
    (n - 1)
        .checked_mul(stride)
        .and_then(|x| x.checked_add(width))
        .ok_or_else(|| {
            Error::shape(
                arg,
                "(n_rows - 1) * stride + width below 2^64",
                format!("{n} rows at stride {stride} overflow"),
            )
        })
}

/// `Err(Unsupported)` unless `x` fits the kernel's `i64` index type (every size here does on 64-bit
/// hosts; kept so a 32-bit index type is never a silent narrowing).
pub(crate) fn fits_i64(arg: &'static str, x: usize) -> Result<i64> {
    i64::try_from(x).map_err(|_| Error::Unsupported {
        what: format!("`{arg}` = {x} does not fit the kernels' 64-bit signed index"),
    })
}

/// `Err(Unsupported)` unless `x < 2^31` (a kernel with 32-bit counts or rows).
pub(crate) fn fits_i32(arg: &'static str, x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::Unsupported {
        what: format!("`{arg}` = {x}: {what} must be below 2^31"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_products_never_wrap() {
        assert_eq!(mul("a", 3, 4, "x").unwrap(), 12);
        assert!(matches!(
            mul("a", usize::MAX, 2, "x"),
            Err(Error::Shape { arg: "a", .. })
        ));
        assert!(matches!(
            mul3("b", 1 << 40, 1 << 20, 1 << 4, "x"),
            Err(Error::Shape { arg: "b", .. })
        ));
        assert_eq!(extent("l", 0, 7, 5).unwrap(), 0);
        assert_eq!(extent("l", 3, 7, 5).unwrap(), 19);
        assert!(matches!(
            extent("l", usize::MAX, 2, 1),
            Err(Error::Shape { arg: "l", .. })
        ));
        assert!(matches!(
            extent("l", 2, usize::MAX, 1),
            Err(Error::Shape { arg: "l", .. })
        ));
        assert!(fits_i32("n", 1 << 31, "rows").is_err());
        assert_eq!(fits_i32("n", (1 << 31) - 1, "rows").unwrap(), i32::MAX);
        assert_eq!(fits_i64("n", 5).unwrap(), 5);
    }
}
