//! The SIMT emulator: fusekit's CUDA kernels, compiled from the very same `.cu` sources as host C++,
//! run on the CPU as a [`Backend`] beside [`crate::Gpu`].
//!
//! Every GPU thread is a fiber; a block's fibers take turns (in a chosen [`Schedule`]) until each
//! reaches a barrier or a warp collective; shuffles, votes, `__match_any_sync`, `mma.sync` and
//! `ldmatrix` complete once every lane of their mask has arrived; a thread-block cluster's blocks run
//! together, one OS thread each, with their own shared memory. Shared memory is filled with `0xff` at
//! every block start. The launch fails with [`Error::Emulation`] (file:line, block, lanes) on a
//! divergent barrier or collective, a mask that names exited lanes, a shuffle reading outside its mask,
//! a deadlock, `map_shared_rank` to an exited block, a bad `cp.async`, or more threads than the kernel's
//! `__launch_bounds__`. Built with AddressSanitizer + UBSan or ThreadSanitizer ([`Sanitizer`]), it also
//! reports out-of-bounds accesses and shared-memory races between barriers.
//!
//! What it cannot show: timing, occupancy, register pressure, the memory model (fences), races
//! between blocks in global memory, hardware convergence (`__activemask`), and the last bits of libm and
//! of tensor-core accumulation: see `kernels/emu/README.md`. The GPU suite stays the hardware truth.
//!
//! ```
//! use fusekit::{Backend, emu::Emulator};
//! use fusekit::loss::{fwd_bwd, LossConfig, LossOutputs, Rows};
//! # fn main() -> fusekit::Result<()> {
//! let dev = Emulator::new()?;
//! let logits = dev.upload(&[1.0f32, 2.0, 3.0, 1.0, 1.0, 1.0])?;
//! let targets = dev.upload(&[2i64, 0])?;
//! let mut grad = dev.alloc_zeros::<f32>(6)?;
//! let mut out = LossOutputs::new(&dev, 2)?;
//! fwd_bwd(&dev, Rows::contiguous(2, 3), &logits, &targets, &mut grad, &Default::default(), &LossConfig::default(), &mut out)?;
//! let loss = out.loss_sync(&dev)?;
//! assert!((loss - 0.75311).abs() < 1e-4); // mean of log(e + e² + e³) − 3 and log 3
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::{DeviceRepr, LaunchConfig};
use once_cell::sync::Lazy;

use crate::backend::{out_of_bounds, private, Backend, DeviceRead, DeviceWrite, Gemm, Scalar};
use crate::device::Family;
use crate::error::{Error, Result};
use crate::params::{
    fk_emu_kernel_info, fk_emu_launch_desc, fk_emu_launch_stats, fk_emu_library_info,
    FK_EMU_ABI_VERSION, FK_EMU_SCHEDULE_RANDOM, FK_EMU_SCHEDULE_ROUND_ROBIN,
    FK_EMU_SCHEDULE_WARP_GREEDY, FK_EMU_SCHEDULE_WARP_GREEDY_REVERSED,
};
use crate::DeviceProps;

mod libs {
    include!(concat!(env!("OUT_DIR"), "/emu_libs.rs"));
}

/// The order in which a block's threads run between synchronisation points. A race that gives the
/// right answer under one order can give a wrong one under another; CI runs the suite under each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Schedule {
    /// Thread 0, 1, 2, ... each to its next barrier or collective, then again.
    #[default]
    RoundRobin,
    /// Each warp runs as far as it can (through its own collectives) before the next warp starts.
    WarpGreedy,
    /// [`Schedule::WarpGreedy`] with warps, and lanes within them, in reverse order.
    WarpGreedyReversed,
    /// The runnable threads in a random order each round (the seed in [`EmuOptions::seed`]).
    Random,
}

impl Schedule {
    /// Every schedule.
    pub const ALL: [Schedule; 4] = [
        Schedule::RoundRobin,
        Schedule::WarpGreedy,
        Schedule::WarpGreedyReversed,
        Schedule::Random,
    ];

    /// Its name in `FUSEKIT_EMU_SCHEDULE`.
    ///
    /// ```
    /// assert_eq!(fusekit::emu::Schedule::WarpGreedyReversed.name(), "warp-greedy-reversed");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Schedule::RoundRobin => "round-robin",
            Schedule::WarpGreedy => "warp-greedy",
            Schedule::WarpGreedyReversed => "warp-greedy-reversed",
            Schedule::Random => "random",
        }
    }

    /// Parses a name of [`Schedule::name`].
    ///
    /// ```
    /// use fusekit::emu::Schedule;
    /// assert_eq!(Schedule::parse("warp-greedy").unwrap(), Schedule::WarpGreedy);
    /// assert!(Schedule::parse("fastest").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<Schedule> {
        Schedule::ALL
            .into_iter()
            .find(|x| x.name() == s.trim())
            .ok_or_else(|| {
                Error::invalid(
                    "FUSEKIT_EMU_SCHEDULE",
                    format!(
                        "unknown schedule `{s}` (round-robin, warp-greedy, warp-greedy-reversed, random)"
                    ),
                )
            })
    }

    fn code(self) -> u32 {
        match self {
            Schedule::RoundRobin => FK_EMU_SCHEDULE_ROUND_ROBIN,
            Schedule::WarpGreedy => FK_EMU_SCHEDULE_WARP_GREEDY,
            Schedule::WarpGreedyReversed => FK_EMU_SCHEDULE_WARP_GREEDY_REVERSED,
            Schedule::Random => FK_EMU_SCHEDULE_RANDOM,
        }
    }
}

/// Which build of the emulated kernels runs: plain, or under a sanitizer. The sanitizer builds exist
/// when the crate was built with `FUSEKIT_EMU_VARIANTS` naming them, and need the sanitizer runtime
/// preloaded (`LD_PRELOAD=$(gcc -print-file-name=libasan.so)`, or `libtsan.so`); `scripts/emu-test`
/// does both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub enum Sanitizer {
    /// No instrumentation: the fastest.
    #[default]
    None,
    /// AddressSanitizer + UndefinedBehaviorSanitizer: out-of-bounds global and dynamic-shared accesses,
    /// out-of-bounds indexing of static shared arrays, undefined behaviour; the process aborts with the
    /// report.
    Address,
    /// ThreadSanitizer, one TSan fiber per GPU thread, barriers as happens-before edges: shared-memory
    /// races between barriers within a block.
    Thread,
}

impl Sanitizer {
    /// The variant's name (`FUSEKIT_EMU_SANITIZER`, `FUSEKIT_EMU_VARIANTS`).
    ///
    /// ```
    /// assert_eq!(fusekit::emu::Sanitizer::Address.name(), "asan");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Sanitizer::None => "plain",
            Sanitizer::Address => "asan",
            Sanitizer::Thread => "tsan",
        }
    }

    /// Parses `none`/`plain`, `asan` or `tsan`.
    ///
    /// ```
    /// use fusekit::emu::Sanitizer;
    /// assert_eq!(Sanitizer::parse("tsan").unwrap(), Sanitizer::Thread);
    /// ```
    pub fn parse(s: &str) -> Result<Sanitizer> {
        match s.trim() {
            "" | "none" | "plain" => Ok(Sanitizer::None),
            "asan" | "address" => Ok(Sanitizer::Address),
            "tsan" | "thread" => Ok(Sanitizer::Thread),
            other => Err(Error::invalid(
                "FUSEKIT_EMU_SANITIZER",
                format!("unknown sanitizer `{other}` (none, asan, tsan)"),
            )),
        }
    }

    /// The symbol its runtime defines (present when it was preloaded).
    fn runtime_symbol(self) -> Option<&'static CStr> {
        match self {
            Sanitizer::None => None,
            Sanitizer::Address => Some(c"__asan_init"),
            Sanitizer::Thread => Some(c"__tsan_init"),
        }
    }
}

/// How an [`Emulator`] runs kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmuOptions {
    /// Thread order within a block.
    pub schedule: Schedule,
    /// Seed of [`Schedule::Random`].
    pub seed: u64,
    /// Which build of the kernels.
    pub sanitizer: Sanitizer,
    /// Stack of each GPU thread in KiB (0: 64, or 512 under a sanitizer).
    pub stack_kib: u32,
}

impl Default for EmuOptions {
    fn default() -> Self {
        EmuOptions {
            schedule: Schedule::RoundRobin,
            seed: 0x5eed,
            sanitizer: Sanitizer::None,
            stack_kib: 0,
        }
    }
}

impl EmuOptions {
    /// Options from the environment: `FUSEKIT_EMU_SCHEDULE` (a [`Schedule::name`]),
    /// `FUSEKIT_EMU_SEED`, `FUSEKIT_EMU_SANITIZER` (`none`, `asan`, `tsan`), `FUSEKIT_EMU_STACK_KIB`;
    /// defaults otherwise.
    ///
    /// ```
    /// let o = fusekit::emu::EmuOptions::from_env().unwrap();
    /// println!("{:?}", o.schedule);
    /// ```
    pub fn from_env() -> Result<EmuOptions> {
        let mut o = EmuOptions::default();
        if let Ok(s) = std::env::var("FUSEKIT_EMU_SCHEDULE") {
            o.schedule = Schedule::parse(&s)?;
        }
        if let Ok(s) = std::env::var("FUSEKIT_EMU_SEED") {
            o.seed = s.trim().parse().map_err(|_| {
                Error::invalid("FUSEKIT_EMU_SEED", format!("not an integer: `{s}`"))
            })?;
        }
        if let Ok(s) = std::env::var("FUSEKIT_EMU_SANITIZER") {
            o.sanitizer = Sanitizer::parse(&s)?;
        }
        if let Ok(s) = std::env::var("FUSEKIT_EMU_STACK_KIB") {
            o.stack_kib = s.trim().parse().map_err(|_| {
                Error::invalid("FUSEKIT_EMU_STACK_KIB", format!("not an integer: `{s}`"))
            })?;
        }
        Ok(o)
    }
}

/// What the emulator has done, summed over the launches of an [`Emulator`] and its clones.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EmuStats {
    /// Kernel launches.
    pub launches: u64,
    /// Blocks run.
    pub blocks: u64,
    /// GPU threads run.
    pub threads: u64,
    /// Fiber context switches.
    pub switches: u64,
    /// Completed `__syncthreads`.
    pub barriers: u64,
    /// Completed warp collectives.
    pub warp_ops: u64,
    /// Wall-clock seconds inside launches.
    pub seconds: f64,
}

impl EmuStats {
    /// Context switches per second of launch time.
    ///
    /// ```
    /// let s = fusekit::emu::EmuStats { switches: 1000, seconds: 0.5, ..Default::default() };
    /// assert_eq!(s.switches_per_second(), 2000.0);
    /// ```
    pub fn switches_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.switches as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// The SIMT emulator as a [`Backend`]: kernels run on the CPU over host buffers ([`Buffer`]).
/// Cloning shares the statistics.
#[derive(Clone)]
pub struct Emulator {
    props: Arc<DeviceProps>,
    opts: EmuOptions,
    stats: Arc<Mutex<EmuStats>>,
    /// The emulated CUDA context: buffers remember the emulator they were allocated on, and a call
    /// that mixes emulators is `Err(Layout)`, as one that mixes CUDA contexts is on a GPU.
    ctx: u64,
}

/// Context ids of emulators (0: memory no emulator owns, a raw-pointer view).
static NEXT_CTX: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl fmt::Debug for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emulator")
            .field("props", &self.props.name)
            .field("opts", &self.opts)
            .finish()
    }
}

impl Emulator {
    /// An emulated H100 (compute capability 9.0: thread-block clusters, 227 KiB of opt-in shared memory
    /// per block, 132 SMs), with options from the environment ([`EmuOptions::from_env`]).
    ///
    /// ```
    /// let dev = fusekit::emu::Emulator::new().unwrap();
    /// ```
    pub fn new() -> Result<Self> {
        Self::with(emulated_h100(), EmuOptions::from_env()?)
    }

    /// An emulator standing in for the GPU `props` describes (its compute capability decides whether
    /// clusters exist, its opt-in limit how much shared memory a block may have), with `opts`.
    ///
    /// ```
    /// use fusekit::emu::{EmuOptions, Emulator, Schedule};
    /// let mut a100 = fusekit::DeviceProps::example_h100();
    /// a100.compute_capability = (8, 0);
    /// let dev = Emulator::with(a100, EmuOptions { schedule: Schedule::WarpGreedy, ..Default::default() }).unwrap();
    /// ```
    pub fn with(props: DeviceProps, opts: EmuOptions) -> Result<Self> {
        if props.smem_per_block_optin > 227 * 1024 {
            return Err(Error::Unsupported {
                what: format!(
                    "the emulator holds at most 227 KiB of shared memory per block, {} asks for {}",
                    props.name, props.smem_per_block_optin
                ),
            });
        }
        Ok(Emulator {
            props: Arc::new(props),
            opts,
            stats: Arc::new(Mutex::new(EmuStats::default())),
            ctx: NEXT_CTX.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// The same emulated device with other options (statistics shared).
    ///
    /// ```
    /// use fusekit::emu::{Emulator, Schedule};
    /// let dev = Emulator::new().unwrap();
    /// let greedy = dev.with_schedule(Schedule::WarpGreedy);
    /// assert_eq!(greedy.options().schedule, Schedule::WarpGreedy);
    /// ```
    pub fn with_schedule(&self, schedule: Schedule) -> Self {
        Emulator {
            opts: EmuOptions {
                schedule,
                ..self.opts
            },
            ..self.clone()
        }
    }

    /// The options.
    ///
    /// ```
    /// let dev = fusekit::emu::Emulator::new().unwrap();
    /// let _ = dev.options().sanitizer;
    /// ```
    pub fn options(&self) -> EmuOptions {
        self.opts
    }

    /// Statistics of every launch so far (this emulator and its clones).
    ///
    /// ```
    /// let dev = fusekit::emu::Emulator::new().unwrap();
    /// assert_eq!(dev.stats().launches, 0);
    /// ```
    pub fn stats(&self) -> EmuStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the emulated kernels of this build can be loaded for these options (a sanitizer variant
    /// needs its build and its runtime preloaded); `Err` says what is missing.
    ///
    /// ```
    /// let dev = fusekit::emu::Emulator::new().unwrap();
    /// if let Err(e) = dev.check_available() { println!("{e}"); }
    /// ```
    pub fn check_available(&self) -> Result<()> {
        library(self.opts.sanitizer, Family::Probe).map(|_| ())
    }

    /// Kernel names of a family's emulated library (the same names as its fatbin's).
    ///
    /// ```
    /// let dev = fusekit::emu::Emulator::new().unwrap();
    /// assert!(dev.kernels(fusekit::Family::Probe).unwrap().contains(&"fk_copy_v16".to_string()));
    /// ```
    pub fn kernels(&self, family: Family) -> Result<Vec<String>> {
        let lib = library(self.opts.sanitizer, family)?;
        let mut v: Vec<String> = lib.kernels.keys().cloned().collect();
        v.sort();
        Ok(v)
    }
}

/// Props of the emulated H100.
fn emulated_h100() -> DeviceProps {
    DeviceProps {
        name: "SIMT emulator (H100 SXM properties)".into(),
        theoretical_bandwidth: 0.0,
        ..DeviceProps::example_h100()
    }
}

// ---------------------------------------------------------------------------------------------------
// Host memory standing in for device memory.

/// A buffer of the emulator's "device" memory: host memory, 256-byte aligned like a CUDA allocation,
/// sized exactly (so AddressSanitizer catches a kernel that reads or writes past its end). Buffers of
/// 64 MiB and more are mapped from the operating system instead, zero pages committed only where
/// written: a test can address more than 2^31 elements while touching a few rows (past their end a
/// kernel reads zeros up to the next page, then faults).
pub struct Buffer<T> {
    ptr: NonNull<T>,
    len: usize,
    ctx: u64,
}

// SAFETY: a plain owned allocation of Copy values.
unsafe impl<T: Send> Send for Buffer<T> {}
// SAFETY: shared access only reads.
unsafe impl<T: Sync> Sync for Buffer<T> {}

const ALIGN: usize = 256;
/// Buffers from this size up are mmap'ed (lazily committed zero pages).
const MAP_THRESHOLD: usize = 64 << 20;

extern "C" {
    fn mmap(
        addr: *mut c_void,
        len: usize,
        prot: c_int,
        flags: c_int,
        fd: c_int,
        off: i64,
    ) -> *mut c_void;
    fn munmap(addr: *mut c_void, len: usize) -> c_int;
}
const PROT_READ: c_int = 1;
const PROT_WRITE: c_int = 2;
const MAP_PRIVATE: c_int = 0x02;
const MAP_ANONYMOUS: c_int = 0x20;
const MAP_NORESERVE: c_int = 0x4000;

impl<T> Buffer<T> {
    fn layout(len: usize) -> Result<std::alloc::Layout> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .filter(|b| *b <= isize::MAX as usize)
            .ok_or_else(|| {
                Error::shape(
                    "buffer",
                    "a size below isize::MAX bytes",
                    format!("{len} elements"),
                )
            })?;
        std::alloc::Layout::from_size_align(bytes, ALIGN.max(std::mem::align_of::<T>()))
            .map_err(|e| Error::invalid("buffer", e.to_string()))
    }

    fn zeroed(len: usize, ctx: u64) -> Result<Self> {
        let layout = Self::layout(len)?;
        if layout.size() == 0 {
            // No allocation: an aligned dangling pointer kernels must not touch.
            let p = ALIGN.max(std::mem::align_of::<T>()) as *mut T;
            return Ok(Buffer {
                ptr: NonNull::new(p).expect("non-zero"),
                len,
                ctx,
            });
        }
        let p = if layout.size() >= MAP_THRESHOLD {
            // SAFETY: an anonymous private mapping; released in Drop with the same length.
            let m = unsafe {
                mmap(
                    std::ptr::null_mut(),
                    layout.size(),
                    PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if m as isize == -1 {
                std::ptr::null_mut()
            } else {
                m as *mut T
            }
        } else {
            // SAFETY: non-zero size.
            unsafe { std::alloc::alloc_zeroed(layout) as *mut T }
        };
        let ptr = NonNull::new(p).ok_or_else(|| Error::Unsupported {
            what: format!("the host could not allocate {} bytes", layout.size()),
        })?;
        Ok(Buffer { ptr, len, ctx })
    }

    /// Elements.
    ///
    /// ```
    /// # use fusekit::Backend;
    /// let dev = fusekit::emu::Emulator::new().unwrap();
    /// assert_eq!(dev.alloc_zeros::<f32>(3).unwrap().len(), 3);
    /// ```
    pub fn len(&self) -> usize {
        self.len
    }

    /// No elements.
    ///
    /// ```
    /// # use fusekit::Backend;
    /// let dev = fusekit::emu::Emulator::new().unwrap();
    /// assert!(dev.alloc_zeros::<f32>(0).unwrap().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first element's address (what a kernel receives as the device pointer).
    ///
    /// ```
    /// # use fusekit::Backend;
    /// let dev = fusekit::emu::Emulator::new().unwrap();
    /// assert_eq!(dev.alloc_zeros::<f32>(4).unwrap().as_ptr() as usize % 256, 0);
    /// ```
    pub fn as_ptr(&self) -> *const T {
        self.ptr.as_ptr()
    }
}

impl<'a, T> View<'a, T> {
    /// A read-only window over memory the caller owns (the emulator's counterpart of cudarc's
    /// `upgrade_device_ptr`, for framework storage handed over as a raw pointer).
    ///
    /// # Safety
    /// `ptr` addresses `len` initialised `T` that stay alive and unmodified by the host for `'a`.
    ///
    /// ```
    /// let data = [1.0f32, 2.0];
    /// // SAFETY: `data` outlives the view.
    /// let v = unsafe { fusekit::emu::View::from_raw_parts(data.as_ptr(), 2) };
    /// ```
    pub unsafe fn from_raw_parts(ptr: *const T, len: usize) -> Self {
        View {
            ptr,
            len,
            ctx: 0,
            _p: PhantomData,
        }
    }
}

impl<'a, T> ViewMut<'a, T> {
    /// A writable window over memory the caller owns.
    ///
    /// # Safety
    /// `ptr` addresses `len` initialised `T` that stay alive, and that nothing else accesses except
    /// through the kernels it is passed to, for `'a`.
    ///
    /// ```
    /// let mut data = [0.0f32; 2];
    /// // SAFETY: `data` outlives the view and is not touched meanwhile.
    /// let v = unsafe { fusekit::emu::ViewMut::from_raw_parts(data.as_mut_ptr(), 2) };
    /// ```
    pub unsafe fn from_raw_parts(ptr: *mut T, len: usize) -> Self {
        ViewMut {
            ptr,
            len,
            ctx: 0,
            _p: PhantomData,
        }
    }
}

impl<T> Drop for Buffer<T> {
    fn drop(&mut self) {
        let layout = Self::layout(self.len).expect("validated at allocation");
        if layout.size() >= MAP_THRESHOLD {
            // SAFETY: mapped with this length in `zeroed`.
            unsafe { munmap(self.ptr.as_ptr() as *mut c_void, layout.size()) };
        } else if layout.size() != 0 {
            // SAFETY: allocated with this layout in `zeroed`.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr() as *mut u8, layout) }
        }
    }
}

impl<T> fmt::Debug for Buffer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "emu::Buffer<{}>[{}]",
            std::any::type_name::<T>(),
            self.len
        )
    }
}

/// A read-only window of a [`Buffer`].
pub struct View<'a, T> {
    ptr: *const T,
    len: usize,
    ctx: u64,
    _p: PhantomData<&'a T>,
}

/// A writable window of a [`Buffer`].
pub struct ViewMut<'a, T> {
    ptr: *mut T,
    len: usize,
    ctx: u64,
    _p: PhantomData<&'a mut T>,
}

impl<T> fmt::Debug for View<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "emu::View<{}>[{}]", std::any::type_name::<T>(), self.len)
    }
}
impl<T> fmt::Debug for ViewMut<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "emu::ViewMut<{}>[{}]",
            std::any::type_name::<T>(),
            self.len
        )
    }
}

/// A raw window into host memory that kernels address as device memory.
trait HostWindow {
    fn base(&self) -> u64;
    fn elems(&self) -> usize;
}
impl<T> HostWindow for Buffer<T> {
    fn base(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
    fn elems(&self) -> usize {
        self.len
    }
}
impl<T> HostWindow for View<'_, T> {
    fn base(&self) -> u64 {
        self.ptr as u64
    }
    fn elems(&self) -> usize {
        self.len
    }
}
impl<T> HostWindow for ViewMut<'_, T> {
    fn base(&self) -> u64 {
        self.ptr as u64
    }
    fn elems(&self) -> usize {
        self.len
    }
}

macro_rules! emu_addr {
    ($ty:ty) => {
        impl<T> private::Addr<T, Emulator> for $ty {
            fn elems(&self) -> usize {
                HostWindow::elems(self)
            }
            fn addr<'a>(&'a self, _dev: &'a Emulator) -> (u64, ()) {
                (self.base(), ())
            }
            fn check_owner(&self, dev: &Emulator, arg: &'static str) -> Result<()> {
                // Memory of a raw-pointer view (context 0) belongs to no emulator: any may use it.
                if self.ctx == 0 || self.ctx == dev.ctx {
                    Ok(())
                } else {
                    Err(Error::layout(
                        arg,
                        "belongs to another emulated device than the handle",
                    ))
                }
            }
        }
    };
}
emu_addr!(Buffer<T>);
emu_addr!(View<'_, T>);
emu_addr!(ViewMut<'_, T>);

impl<T> private::AddrMut<T, Emulator> for Buffer<T> {
    fn addr_mut<'a>(&'a mut self, _dev: &'a Emulator) -> (u64, ()) {
        (self.ptr.as_ptr() as u64, ())
    }
}
impl<T> private::AddrMut<T, Emulator> for ViewMut<'_, T> {
    fn addr_mut<'a>(&'a mut self, _dev: &'a Emulator) -> (u64, ()) {
        (self.ptr as u64, ())
    }
}

impl Backend for Emulator {
    type Buffer<T: Scalar> = Buffer<T>;
    type View<'a, T: Scalar> = View<'a, T>;
    type ViewMut<'a, T: Scalar> = ViewMut<'a, T>;

    fn props(&self) -> &DeviceProps {
        &self.props
    }
    fn kind(&self) -> &'static str {
        "emu"
    }
    fn alloc_zeros<T: Scalar>(&self, n: usize) -> Result<Buffer<T>> {
        Buffer::zeroed(n, self.ctx)
    }
    fn upload<T: Scalar>(&self, host: &[T]) -> Result<Buffer<T>> {
        let mut b = Buffer::zeroed(host.len(), self.ctx)?;
        self.write(host, &mut b)?;
        Ok(b)
    }
    fn write<T: Scalar, D: DeviceWrite<T, Self>>(&self, host: &[T], dst: &mut D) -> Result<()> {
        let n = DeviceRead::len(dst);
        crate::validate::exactly("host", host.len(), n, "the destination's length")?;
        let (p, ()) = private::AddrMut::addr_mut(dst, self);
        if n > 0 {
            // SAFETY: dst holds n elements of T at p; host is a distinct Rust slice.
            unsafe { std::ptr::copy_nonoverlapping(host.as_ptr(), p as *mut T, n) }
        }
        Ok(())
    }
    fn download<T: Scalar, S: DeviceRead<T, Self>>(&self, src: &S) -> Result<Vec<T>> {
        let n = DeviceRead::len(src);
        let (p, ()) = private::Addr::addr(src, self);
        let mut v = Vec::with_capacity(n);
        if n > 0 {
            // SAFETY: src holds n initialised elements at p (buffers are zeroed at allocation).
            unsafe {
                std::ptr::copy_nonoverlapping(p as *const T, v.as_mut_ptr(), n);
                v.set_len(n);
            }
        }
        Ok(v)
    }
    fn zero<T: Scalar, D: DeviceWrite<T, Self>>(&self, dst: &mut D) -> Result<()> {
        let n = DeviceRead::len(dst);
        let (p, ()) = private::AddrMut::addr_mut(dst, self);
        if n > 0 {
            // SAFETY: dst holds n elements at p; all-zero bits are a valid T (Scalar).
            unsafe { std::ptr::write_bytes(p as *mut T, 0, n) }
        }
        Ok(())
    }
    fn view<'a, T: Scalar>(&self, buf: &'a Buffer<T>, range: Range<usize>) -> Result<View<'a, T>>
    where
        Self: 'a,
    {
        if range.start > range.end || range.end > buf.len {
            return Err(out_of_bounds(range, buf.len));
        }
        Ok(View {
            // SAFETY: in bounds (checked).
            ptr: unsafe { buf.ptr.as_ptr().add(range.start) },
            len: range.end - range.start,
            ctx: buf.ctx,
            _p: PhantomData,
        })
    }
    fn view_mut<'a, T: Scalar>(
        &self,
        buf: &'a mut Buffer<T>,
        range: Range<usize>,
    ) -> Result<ViewMut<'a, T>>
    where
        Self: 'a,
    {
        if range.start > range.end || range.end > buf.len {
            return Err(out_of_bounds(range, buf.len));
        }
        Ok(ViewMut {
            // SAFETY: in bounds (checked).
            ptr: unsafe { buf.ptr.as_ptr().add(range.start) },
            len: range.end - range.start,
            ctx: buf.ctx,
            _p: PhantomData,
        })
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

impl private::Device for Emulator {
    type Guard<'a> = ();
    type Blas = ();

    fn launch<P: DeviceRepr>(
        &self,
        family: Family,
        name: &str,
        cfg: LaunchConfig,
        params: &P,
        extra_ptr: Option<u64>,
    ) -> Result<()> {
        let lib = library(self.opts.sanitizer, family)?;
        let &(index, _) = lib.kernels.get(name).ok_or_else(|| Error::Unsupported {
            what: format!(
                "kernel `{name}` is not in the emulated `{}` family",
                family.name()
            ),
        })?;
        let extra = extra_ptr.unwrap_or(0);
        let args: [*const c_void; 2] = [
            params as *const P as *const c_void,
            &extra as *const u64 as *const c_void,
        ];
        let mut desc = fk_emu_launch_desc {
            kernel: index,
            grid: [cfg.grid_dim.0, cfg.grid_dim.1, cfg.grid_dim.2],
            block: [cfg.block_dim.0, cfg.block_dim.1, cfg.block_dim.2],
            cluster: [0, 0, 0],
            dynamic_smem: cfg.shared_mem_bytes as u64,
            // The CUDA launcher raises MAX_DYNAMIC_SHARED_SIZE_BYTES to what a launch asks for.
            dynamic_smem_limit: (cfg.shared_mem_bytes as u64).max(48 * 1024),
            device_smem_optin: self.props.smem_per_block_optin,
            max_threads_per_block: 1024,
            cluster_capable: (self.props.compute_capability.0 >= 9) as u32,
            args: args.as_ptr(),
            n_args: if extra_ptr.is_some() { 2 } else { 1 },
            arg_size: [0; 8],
            schedule: self.opts.schedule.code(),
            fiber_stack_kib: self.opts.stack_kib,
            seed: self.opts.seed,
        };
        desc.arg_size[0] = std::mem::size_of::<P>() as u32;
        desc.arg_size[1] = 8;
        let mut stats = fk_emu_launch_stats::default();
        let mut err = vec![0u8; 8192];
        let t0 = Instant::now();
        // SAFETY: `desc` points at live argument bytes of the sizes given; the runtime checks them
        // against the kernel's signature. The pointers inside the params struct address host buffers
        // the safe layer has checked (the Backend contract).
        let rc = unsafe {
            (lib.launch)(
                &desc,
                &mut stats,
                err.as_mut_ptr() as *mut c_char,
                err.len() as u64,
            )
        };
        let secs = t0.elapsed().as_secs_f64();
        trace_launch(family, name);
        {
            let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            s.launches += 1;
            s.blocks += stats.blocks;
            s.threads += stats.threads;
            s.switches += stats.switches;
            s.barriers += stats.barriers;
            s.warp_ops += stats.warp_ops;
            s.seconds += secs;
        }
        if rc != 0 {
            let report = CStr::from_bytes_until_nul(&err)
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_else(|_| String::from_utf8_lossy(&err).into_owned());
            return Err(Error::Emulation {
                kernel: name.to_string(),
                report,
            });
        }
        Ok(())
    }

    fn cluster_fits(&self, _f: Family, _n: &str, threads: u32, smem: u32) -> Result<bool> {
        Ok(self.props.compute_capability.0 >= 9
            && threads <= 1024
            && smem as u64 <= self.props.smem_per_block_optin)
    }

    fn as_gpu(&self) -> Option<&crate::Gpu> {
        None
    }

    fn blas(&self) -> Result<()> {
        Ok(())
    }
    fn same_queue(&self, _other: &Emulator) -> bool {
        true // launches run to completion, in call order
    }
    unsafe fn gemm(&self, _blas: &(), g: &Gemm) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { host_gemm(g) };
        Ok(())
    }
}

/// With `FUSEKIT_EMU_TRACE=FILE`, appends `family kernel` to FILE the first time this process launches a
/// kernel (scripts/emu-test checks from these that every kernel of every family ran).
fn trace_launch(family: Family, name: &str) {
    static SEEN: Lazy<Mutex<std::collections::HashSet<String>>> =
        Lazy::new(|| Mutex::new(std::collections::HashSet::new()));
    let Some(path) = std::env::var_os("FUSEKIT_EMU_TRACE") else {
        return;
    };
    let key = format!("{} {name}", family.name());
    if SEEN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key.clone())
    {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            // One write of the whole line: appends from concurrent tests never interleave.
            let _ = f.write_all(format!("{key}\n").as_bytes());
        }
    }
}

/// cuBLAS's `gemm_ex` (column-major, bf16 A and B, f32 accumulation in k order, C bf16 or f32) on the
/// host, for the emulator.
///
/// # Safety
/// As [`private::Device::gemm`].
unsafe fn host_gemm(g: &Gemm) {
    use half::bf16;
    let a = g.a as *const bf16;
    let b = g.b as *const bf16;
    for j in 0..g.n {
        for i in 0..g.m {
            let mut acc = 0.0f32;
            for k in 0..g.k {
                // op(A)[i, k], op(B)[k, j] in column-major storage.
                // SAFETY: inside the matrices (caller's contract).
                let (x, y) = unsafe {
                    let x = if g.trans_a {
                        *a.add(k + i * g.lda)
                    } else {
                        *a.add(i + k * g.lda)
                    };
                    let y = if g.trans_b {
                        *b.add(j + k * g.ldb)
                    } else {
                        *b.add(k + j * g.ldb)
                    };
                    (x, y)
                };
                acc += x.to_f32() * y.to_f32();
            }
            let at = i + j * g.ldc;
            // SAFETY: inside C.
            unsafe {
                if g.c_f32 {
                    let c = (g.c as *mut f32).add(at);
                    *c = acc + if g.beta != 0.0 { g.beta * *c } else { 0.0 };
                } else {
                    let c = (g.c as *mut bf16).add(at);
                    let old = if g.beta != 0.0 {
                        g.beta * (*c).to_f32()
                    } else {
                        0.0
                    };
                    *c = bf16::from_f32(acc + old);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The family libraries.

type LaunchFn = unsafe extern "C" fn(
    *const fk_emu_launch_desc,
    *mut fk_emu_launch_stats,
    *mut c_char,
    u64,
) -> c_int;

struct Library {
    launch: LaunchFn,
    kernels: HashMap<String, (u32, fk_emu_kernel_info)>,
    info: fk_emu_library_info,
}

// SAFETY: the library's tables are immutable after loading; its launch function is thread-safe.
unsafe impl Send for Library {}
// SAFETY: as above.
unsafe impl Sync for Library {}

#[link(name = "dl")]
extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn dlerror() -> *mut c_char;
}
const RTLD_NOW: c_int = 2;
const RTLD_LOCAL: c_int = 0;
const RTLD_DEFAULT: *mut c_void = std::ptr::null_mut();

type Libraries = Mutex<HashMap<(Sanitizer, Family), Arc<Library>>>;
static LIBRARIES: Lazy<Libraries> = Lazy::new(|| Mutex::new(HashMap::new()));

/// Whether this build compiled the emulated kernels with `sanitizer` (`FUSEKIT_EMU_VARIANTS` at build
/// time; the repository's `.cargo/config.toml` builds all three).
///
/// ```
/// let _ = fusekit::emu::variant_built(fusekit::emu::Sanitizer::Address);
/// ```
pub fn variant_built(sanitizer: Sanitizer) -> bool {
    std::env::var_os("FUSEKIT_EMU_DIR").is_some()
        || libs::EMU_LIBS
            .iter()
            .any(|(v, _, _)| *v == sanitizer.name())
}

/// Where this build put the family's library for a variant (`FUSEKIT_EMU_DIR` overrides: the folder
/// holding `<variant>/libfk_emu_<family>.so`, for binaries run away from their build).
fn library_path(san: Sanitizer, family: Family) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("FUSEKIT_EMU_DIR") {
        return Ok(PathBuf::from(dir)
            .join(san.name())
            .join(format!("libfk_emu_{}.so", family.name())));
    }
    if let Some(why) = libs::EMU_NOT_BUILT {
        return Err(Error::Unsupported {
            what: format!("the SIMT emulator is not part of this build: {why}"),
        });
    }
    libs::EMU_LIBS
        .iter()
        .find(|(v, f, _)| *v == san.name() && *f == family.name())
        .map(|(_, _, p)| PathBuf::from(p))
        .ok_or_else(|| Error::Unsupported {
            what: format!(
                "this build has no `{}` emulator for family `{}` (build with FUSEKIT_EMU_VARIANTS \
                 naming it, e.g. plain,asan,tsan)",
                san.name(),
                family.name()
            ),
        })
}

fn library(san: Sanitizer, family: Family) -> Result<Arc<Library>> {
    let mut libs = LIBRARIES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(l) = libs.get(&(san, family)) {
        return Ok(l.clone());
    }
    if let Some(sym) = san.runtime_symbol() {
        // SAFETY: dlsym on the global scope with a valid C string.
        if unsafe { dlsym(RTLD_DEFAULT, sym.as_ptr()) }.is_null() {
            let lib = if san == Sanitizer::Address {
                "libasan.so"
            } else {
                "libtsan.so"
            };
            return Err(Error::Unsupported {
                what: format!(
                    "the `{}` emulator needs its sanitizer runtime loaded first: run with \
                     LD_PRELOAD=$(gcc -print-file-name={lib}) (scripts/emu-test does)",
                    san.name()
                ),
            });
        }
    }
    let path = library_path(san, family)?;
    let cpath = CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| Error::invalid("FUSEKIT_EMU_DIR", "contains a NUL byte"))?;
    // SAFETY: dlopen of a library this build made (or the caller pointed at); its constructors only
    // set up the kernel table.
    let handle = unsafe { dlopen(cpath.as_ptr(), RTLD_NOW | RTLD_LOCAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a C string or null.
        let why = unsafe {
            let e = dlerror();
            if e.is_null() {
                "unknown error".to_string()
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(Error::Unsupported {
            what: format!(
                "cannot load the emulated `{}` kernels: {why}",
                family.name()
            ),
        });
    }
    let sym = |name: &CStr| -> Result<*mut c_void> {
        // SAFETY: valid handle and C string.
        let p = unsafe { dlsym(handle, name.as_ptr()) };
        if p.is_null() {
            Err(Error::Unsupported {
                what: format!(
                    "{} does not export {}",
                    path.display(),
                    name.to_string_lossy()
                ),
            })
        } else {
            Ok(p)
        }
    };
    type InfoFn = unsafe extern "C" fn() -> *const fk_emu_library_info;
    type KernelsFn = unsafe extern "C" fn() -> *const fk_emu_kernel_info;
    // SAFETY: the symbols have these signatures (fk_emu_abi.h, checked by the ABI version below).
    let (info_fn, kernels_fn, launch): (InfoFn, KernelsFn, LaunchFn) = unsafe {
        (
            std::mem::transmute::<*mut c_void, InfoFn>(sym(c"fk_emu_library")?),
            std::mem::transmute::<*mut c_void, KernelsFn>(sym(c"fk_emu_kernels")?),
            std::mem::transmute::<*mut c_void, LaunchFn>(sym(c"fk_emu_launch")?),
        )
    };
    // SAFETY: returns a pointer to a static struct.
    let info = unsafe { *info_fn() };
    if info.abi_version != FK_EMU_ABI_VERSION {
        return Err(Error::Unsupported {
            what: format!(
                "{} speaks emulator ABI {}, this crate {}: rebuild",
                path.display(),
                info.abi_version,
                FK_EMU_ABI_VERSION
            ),
        });
    }
    let mut kernels = HashMap::new();
    // SAFETY: an array of n_kernels entries with static name strings.
    unsafe {
        let table = kernels_fn();
        for i in 0..info.n_kernels {
            let k = *table.add(i as usize);
            let name = CStr::from_ptr(k.name).to_string_lossy().into_owned();
            kernels.insert(name, (i, k));
        }
    }
    let lib = Arc::new(Library {
        launch,
        kernels,
        info,
    });
    libs.insert((san, family), lib.clone());
    Ok(lib)
}

/// What a family's emulated library is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FamilyInfo {
    /// The sanitizer it was built with.
    pub sanitizer: Sanitizer,
    /// The `__CUDA_ARCH__` its sources were compiled for (the device branches it runs).
    pub arch: u32,
    /// Kernels in its launch table.
    pub kernels: u32,
    /// Bytes of static `__shared__` variables of all its kernels together (an upper bound per kernel).
    pub static_smem: u64,
}

impl Emulator {
    /// What the emulated library of `family` is (loading it).
    ///
    /// ```
    /// let dev = fusekit::emu::Emulator::new().unwrap();
    /// let info = dev.family_info(fusekit::Family::Loss).unwrap();
    /// assert_eq!(info.arch, 900);
    /// ```
    pub fn family_info(&self, family: Family) -> Result<FamilyInfo> {
        let l = library(self.opts.sanitizer, family)?;
        Ok(FamilyInfo {
            sanitizer: match l.info.sanitizer {
                1 => Sanitizer::Address,
                2 => Sanitizer::Thread,
                _ => Sanitizer::None,
            },
            arch: l.info.arch,
            kernels: l.info.n_kernels,
            static_smem: l.info.static_smem,
        })
    }
}
