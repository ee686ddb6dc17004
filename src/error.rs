//! The crate's one error type.

use std::fmt;

use cudarc::driver::DriverError;

/// Result alias used by every fallible fusekit function.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in fusekit. Messages name the argument at fault and the expected value.
///
/// ```
/// use fusekit::Error;
/// let e = Error::shape("logits", "[N, V] with N·V = 4096 elements", "4000 elements");
/// assert_eq!(
///     e.to_string(),
///     "shape of `logits`: expected [N, V] with N·V = 4096 elements, got 4000 elements"
/// );
/// ```
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// No usable CUDA driver or device: libcuda missing, no device, or the device ordinal absent.
    NoDevice {
        /// Why no device could be used.
        reason: String,
    },
    /// A CUDA driver call failed.
    Driver {
        /// What fusekit was doing.
        during: String,
        /// The driver's error.
        source: DriverError,
    },
    /// A buffer or dimension has the wrong size.
    Shape {
        /// The argument at fault.
        arg: &'static str,
        /// What was expected.
        expected: String,
        /// What was passed.
        got: String,
    },
    /// An element type that this function does not take.
    DType {
        /// The argument at fault.
        arg: &'static str,
        /// What was expected.
        expected: String,
        /// What was passed.
        got: String,
    },
    /// A pointer, stride or layout the kernel cannot use (alignment, overlap, non-contiguous).
    Layout {
        /// The argument at fault.
        arg: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An index inside a buffer lies outside its allowed range.
    OutOfRange {
        /// The argument at fault, e.g. `targets`.
        arg: &'static str,
        /// Position inside the argument.
        index: usize,
        /// The value found there.
        value: i64,
        /// The allowed range, in words (e.g. "[0, 50257) or ignore_index -100").
        allowed: String,
    },
    /// A scalar parameter outside its domain (γ < 0, block size 0, ...).
    InvalidArgument {
        /// The argument at fault.
        arg: &'static str,
        /// What is wrong with it, with the expected range.
        reason: String,
    },
    /// A vendor library (cuBLAS) call failed or the library is missing.
    Library {
        /// Which library.
        library: &'static str,
        /// What fusekit was doing.
        during: String,
        /// The library's status.
        detail: String,
    },
    /// A configuration the library does not support (GPU too old, head dim, expert count...).
    Unsupported {
        /// What is unsupported and what is.
        what: String,
    },
    /// A kernel failed while running on the SIMT emulator: a divergent barrier or warp collective, a
    /// deadlock, a shuffle reading outside its mask, a cluster misuse... ([`crate::emu`]). The report
    /// names the kernel, the block, the threads and the source lines.
    Emulation {
        /// The kernel.
        kernel: String,
        /// What the emulator's checker found.
        report: String,
    },
}

impl Error {
    /// A [`Error::Shape`] error.
    ///
    /// ```
    /// let e = fusekit::Error::shape("dst", "1024 bytes", "512 bytes");
    /// assert!(e.to_string().contains("`dst`"));
    /// ```
    pub fn shape(arg: &'static str, expected: impl Into<String>, got: impl Into<String>) -> Self {
        Error::Shape {
            arg,
            expected: expected.into(),
            got: got.into(),
        }
    }

    /// A [`Error::Layout`] error.
    ///
    /// ```
    /// let e = fusekit::Error::layout("src", "device pointer 0x...3 is not 16-byte aligned");
    /// assert!(e.to_string().starts_with("layout of `src`"));
    /// ```
    pub fn layout(arg: &'static str, reason: impl Into<String>) -> Self {
        Error::Layout {
            arg,
            reason: reason.into(),
        }
    }

    /// An [`Error::InvalidArgument`] error.
    ///
    /// ```
    /// let e = fusekit::Error::invalid("gamma", "must be finite and >= 0, got -1");
    /// assert_eq!(e.to_string(), "invalid `gamma`: must be finite and >= 0, got -1");
    /// ```
    pub fn invalid(arg: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            arg,
            reason: reason.into(),
        }
    }

    /// Wraps a driver error with what fusekit was doing.
    ///
    /// ```
    /// use cudarc::driver::{sys::CUresult, DriverError};
    /// let e = fusekit::Error::driver("launching fk_copy_v16", DriverError(CUresult::CUDA_ERROR_INVALID_VALUE));
    /// assert!(e.to_string().contains("fk_copy_v16"));
    /// ```
    pub fn driver(during: impl Into<String>, source: DriverError) -> Self {
        Error::Driver {
            during: during.into(),
            source,
        }
    }

    /// True for [`Error::NoDevice`]: the caller may fall back to the CPU.
    ///
    /// ```
    /// let e = fusekit::Error::NoDevice { reason: "libcuda not found".into() };
    /// assert!(e.is_no_device());
    /// ```
    pub fn is_no_device(&self) -> bool {
        matches!(self, Error::NoDevice { .. })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoDevice { reason } => write!(f, "no CUDA device: {reason}"),
            // The CUresult name only: cudarc's Debug of DriverError asks libcuda for a description, which
            // panics where libcuda is absent.
            Error::Driver { during, source } => {
                write!(f, "CUDA driver error while {during}: {:?}", source.0)
            }
            Error::Shape { arg, expected, got } => {
                write!(f, "shape of `{arg}`: expected {expected}, got {got}")
            }
            Error::DType { arg, expected, got } => {
                write!(f, "dtype of `{arg}`: expected {expected}, got {got}")
            }
            Error::Layout { arg, reason } => write!(f, "layout of `{arg}`: {reason}"),
            Error::OutOfRange {
                arg,
                index,
                value,
                allowed,
            } => write!(f, "{arg}[{index}] = {value} is outside {allowed}"),
            Error::InvalidArgument { arg, reason } => write!(f, "invalid `{arg}`: {reason}"),
            Error::Library {
                library,
                during,
                detail,
            } => write!(f, "{library} error while {during}: {detail}"),
            Error::Unsupported { what } => write!(f, "unsupported: {what}"),
            Error::Emulation { kernel, report } => {
                write!(f, "kernel `{kernel}` failed on the emulator: {report}")
            }
        }
    }
}

// Debug prints the Display text: never cudarc's DriverError Debug (see above), so `unwrap()` on a driver
// error cannot panic a second time inside the panic message.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Error({self})")
    }
}

impl std::error::Error for Error {
    /// The driver's error for [`Error::Driver`]; nothing else wraps another error.
    ///
    /// ```
    /// use std::error::Error as _;
    /// assert!(fusekit::Error::invalid("gamma", "must be >= 0").source().is_none());
    /// ```
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Driver { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<DriverError> for Error {
    fn from(source: DriverError) -> Self {
        Error::Driver {
            during: "a CUDA call".into(),
            source,
        }
    }
}

/// Adds context to driver results: `ctx.bind_to_thread().during("binding the context")?`.
pub(crate) trait DriverContext<T> {
    fn during(self, what: &str) -> Result<T>;
}

impl<T> DriverContext<T> for std::result::Result<T, DriverError> {
    fn during(self, what: &str) -> Result<T> {
        self.map_err(|e| Error::driver(what, e))
    }
}
