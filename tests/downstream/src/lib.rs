//! Both crates in one graph: fusekit's error type and candle's CUDA device type are both reachable.

/// Whether a CUDA driver is present, asked through fusekit (never a panic without one).
pub fn fusekit_sees_a_driver() -> bool {
    fusekit::probe_driver().is_ok()
}

/// candle's CUDA device type, from the same build.
pub fn candle_cuda_device(ordinal: usize) -> candle_core::Result<candle_core::Device> {
    candle_core::Device::new_cuda(ordinal)
}
