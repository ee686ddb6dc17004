//! Device probes: the copy kernel whose bandwidth is the floor of every memory-bound kernel.
//!
//! Floors elsewhere in fusekit are `bytes moved / measured copy bandwidth`, with the bandwidth measured by
//! [`measure_copy_bandwidth_sync`] on the same GPU in the same run (the GEMM ceiling is measured through
//! cuBLAS in `benches/probe.rs`).

mod launch;
pub mod reference;

use crate::device::check_aligned;
use crate::error::{Error, Result};
use crate::timing::{time_launches_sync, Timing};
use crate::validate::owned;
use crate::{Backend, DeviceRead, DeviceWrite, Gpu};

/// Copies `src` into `dst` (same length) with 16-byte vector loads and stores, on the device's stream.
///
/// Both buffers must start 16-byte aligned (every allocation does; a view at an odd offset may not),
/// must not overlap, and must belong to the device. Any length is fine: the bytes past the last whole
/// 16-byte vector are copied one by one.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// let dev = fusekit::emu::Emulator::new()?; // or fusekit::Gpu::new(0)?
/// let src = dev.upload(&[1u32, 2, 3, 4, 5])?;
/// let mut dst = dev.alloc_zeros::<u32>(5)?;
/// fusekit::probe::copy(&dev, &src, &mut dst)?;
/// assert_eq!(dev.download(&dst)?, vec![1, 2, 3, 4, 5]);
/// # Ok(()) }
/// ```
pub fn copy<B: Backend, T, S: DeviceRead<T, B>, D: DeviceWrite<T, B>>(
    dev: &B,
    src: &S,
    dst: &mut D,
) -> Result<()> {
    owned(dev, "src", src)?;
    owned(dev, "dst", dst)?;
    let plan = CopyPlan::new(dev.props(), src.len(), dst.len(), std::mem::size_of::<T>())?;
    let n_bytes = plan.n_bytes;
    let (src_ptr, _src_guard) = src.addr(dev);
    let (dst_ptr, _dst_guard) = dst.addr_mut(dev);
    check_aligned("src", src_ptr, 16)?;
    check_aligned("dst", dst_ptr, 16)?;
    if n_bytes == 0 {
        return Ok(());
    }
    if src_ptr < dst_ptr + n_bytes && dst_ptr < src_ptr + n_bytes {
        return Err(Error::layout("dst", "overlaps src"));
    }
    launch::copy_v16(dev, &plan, src_ptr, dst_ptr)
}

/// The validated plan of a [`copy`] of `src` elements into `dst` elements of `elem_size` bytes:
/// lengths and sizes, and the launch (alignment and overlap are properties of the addresses, checked at
/// the launch).
///
/// ```
/// let p = fusekit::probe::CopyPlan::new(&fusekit::DeviceProps::example_h100(), 1 << 20, 1 << 20, 4)?;
/// assert_eq!(p.launches()[0].kernel, "fk_copy_v16");
/// assert!(fusekit::probe::CopyPlan::new(&fusekit::DeviceProps::example_h100(), 3, 4, 4).is_err());
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct CopyPlan {
    pub(crate) n_bytes: u64,
    launch: Option<crate::plan::PlannedLaunch>,
}

impl CopyPlan {
    /// Validates a copy on `props`' GPU.
    pub fn new(
        props: &crate::DeviceProps,
        src: usize,
        dst: usize,
        elem_size: usize,
    ) -> Result<Self> {
        if src != dst {
            return Err(Error::shape(
                "dst",
                format!("{src} elements (the length of src)"),
                format!("{dst} elements"),
            ));
        }
        let n_bytes = crate::plan::mul("src", src, elem_size, "the size in bytes")? as u64;
        Ok(CopyPlan {
            n_bytes,
            launch: (n_bytes > 0).then(|| launch::copy_launch(props, n_bytes)),
        })
    }

    /// The launch (none for an empty copy).
    pub fn launches(&self) -> Vec<crate::plan::PlannedLaunch> {
        self.launch.iter().cloned().collect()
    }
}

/// Measured device-to-device copy bandwidth.
#[derive(Clone, Debug, PartialEq)]
pub struct CopyBandwidth {
    /// Bytes copied per launch (each is read once and written once).
    pub bytes: u64,
    /// Per-launch times.
    pub timing: Timing,
}

impl CopyBandwidth {
    /// Achieved bandwidth at the median time, counting read + write (2 × bytes), in GB/s.
    ///
    /// ```
    /// use fusekit::{probe::CopyBandwidth, timing::Timing};
    /// let bw = CopyBandwidth { bytes: 1_500_000_000, timing: Timing::from_samples(vec![1.0]) };
    /// assert_eq!(bw.gbps(), 3000.0);
    /// ```
    pub fn gbps(&self) -> f64 {
        self.timing.gbps(2 * self.bytes)
    }
}

/// Allocates two buffers of `bytes` each, copies between them `warmup + iters` times and times each copy
/// with CUDA events. Use buffers far above L2 (the benchmark uses 1 GiB) to measure HBM, not cache.
/// Synchronises.
///
/// ```no_run
/// # fn main() -> fusekit::Result<()> {
/// let gpu = fusekit::Gpu::new(0)?;
/// let bw = fusekit::probe::measure_copy_bandwidth_sync(&gpu, 1 << 30, 20)?;
/// println!("copy: {:.0} GB/s", bw.gbps());
/// # Ok(()) }
/// ```
pub fn measure_copy_bandwidth_sync(gpu: &Gpu, bytes: usize, iters: usize) -> Result<CopyBandwidth> {
    if bytes == 0 || iters == 0 {
        return Err(Error::invalid(
            "bytes/iters",
            format!("must both be > 0, got {bytes} and {iters}"),
        ));
    }
    let alloc = |what: &str| {
        gpu.stream()
            .alloc_zeros::<u8>(bytes)
            .map_err(|e| Error::driver(format!("allocating {bytes} bytes for {what}"), e))
    };
    let src = alloc("the copy source")?;
    let mut dst = alloc("the copy destination")?;
    let timing = time_launches_sync(gpu, 3, iters, || copy(gpu, &src, &mut dst))?;
    Ok(CopyBandwidth {
        bytes: bytes as u64,
        timing,
    })
}

/// Sizes (bytes) the self-check copies: empty, below one vector, odd tails, several waves.
const CHECK_SIZES: &[usize] = &[0, 1, 15, 16, 17, 4096 + 3, (1 << 20) + 7, (24 << 20) + 13];

pub(crate) fn self_check() -> crate::check::row::SelfCheck {
    crate::check::row::SelfCheck {
        family: "probe",
        cpu: |rng| {
            let data: Vec<u8> = (0..4099).map(|_| rng.next_u64() as u8).collect();
            let ok = reference::copy(&data) == data;
            vec![crate::check::row::CheckRow {
                kernel: "copy (reference)".into(),
                mode: "cpu-ref",
                max_err: 0.0,
                pass: ok,
                gbps: None,
                note: "identity on 4099 random bytes".into(),
            }]
        },
        gpu: kernels_check::<Gpu>,
        emu: kernels_check::<crate::emu::Emulator>,
        gpu_extra: Some(|gpu, _rng| {
            let bw = measure_copy_bandwidth_sync(gpu, 256 << 20, 10)?;
            Ok(vec![crate::check::row::CheckRow {
                kernel: "fk_copy_v16 (bandwidth)".into(),
                mode: "gpu",
                max_err: 0.0,
                pass: true,
                gbps: Some(bw.gbps()),
                note: "256 MiB copy, median of 10".into(),
            }])
        }),
    }
}

/// `fk_copy_v16` against the reference on the check sizes (the multi-wave one on a GPU only).
fn kernels_check<B: Backend>(
    dev: &B,
    rng: &mut crate::testing::Rng,
) -> Result<Vec<crate::check::row::CheckRow>> {
    let mut pass = true;
    let mut note = String::new();
    let sizes: Vec<usize> = CHECK_SIZES
        .iter()
        .copied()
        .filter(|&n| dev.kind() == "gpu" || n <= (1 << 20) + 7)
        .collect();
    for &n in &sizes {
        let data: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
        let src = dev.upload(&data)?;
        let mut dst = crate::testing::poisoned::<B, u8>(dev, n)?;
        copy(dev, &src, &mut dst)?;
        if dev.download(&dst)? != reference::copy(&data) {
            pass = false;
            note = format!("mismatch at {n} bytes");
        }
    }
    if pass {
        note = format!(
            "{} sizes 0..{} B exact",
            sizes.len(),
            sizes[sizes.len() - 1]
        );
    }
    Ok(vec![crate::check::row::CheckRow {
        kernel: "fk_copy_v16".into(),
        mode: dev.kind(),
        max_err: 0.0,
        pass,
        gbps: None,
        note,
    }])
}
