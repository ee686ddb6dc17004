//! The GPU handle: context, stream, device properties, capability checks and the lazily loaded kernel
//! modules. "No GPU" is an [`Error::NoDevice`], never a panic.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};

use cudarc::driver::sys::{CUdevice_attribute as Attr, CUresult};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};
use once_cell::sync::{Lazy, OnceCell};

use crate::error::{DriverContext, Error, Result};

mod fatbins {
    include!(concat!(env!("OUT_DIR"), "/families.rs"));
}

/// A kernel family: one folder under `kernels/`, compiled into one fatbin, loaded as one module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Family {
    /// Attention over a paged KV cache: split-KV decode and the merge of partial states.
    Attention,
    /// Fused losses: cross-entropy family, focal, Poly-1, GCE, sigmoid focal, vocabulary shards.
    Loss,
    /// MoE routing: fused gate, bias update, permutation, gather, combine, expert-parallel counts.
    Moe,
    /// Device probes: the bandwidth probe every memory-bound floor is measured with.
    Probe,
    /// Quantised matmul: W4A16 (packed int4 weights, bf16/f16 activations) with split-K.
    Quant,
    /// Conformance kernels of the constructs the SIMT emulator models (mma.sync, ldmatrix, cp.async,
    /// warp collectives), run on the emulator and on a GPU against the same expectations
    /// ([`crate::selftest`]).
    Selftest,
}

impl Family {
    /// Every family, in fatbin order.
    pub const ALL: &'static [Family] = &[
        Family::Attention,
        Family::Loss,
        Family::Moe,
        Family::Probe,
        Family::Quant,
        Family::Selftest,
    ];

    /// The folder name under `kernels/`.
    ///
    /// ```
    /// assert_eq!(fusekit::Family::Probe.name(), "probe");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Family::Attention => "attention",
            Family::Loss => "loss",
            Family::Moe => "moe",
            Family::Probe => "probe",
            Family::Quant => "quant",
            Family::Selftest => "selftest",
        }
    }

    /// The embedded fatbin of this family (empty in a docs.rs build, which compiles no kernel).
    ///
    /// ```
    /// // Every family has a fatbin; outside docs.rs builds it holds SASS and PTX.
    /// assert!(!fusekit::Family::Probe.fatbin().is_empty());
    /// ```
    pub fn fatbin(self) -> &'static [u8] {
        fatbins::FATBINS
            .iter()
            .find(|(name, _)| *name == self.name())
            .map(|(_, bin)| *bin)
            .unwrap_or(&[])
    }

    fn index(self) -> usize {
        Family::ALL.iter().position(|f| *f == self).unwrap()
    }
}

/// Names of the kernel folders the build compiled (for checks that every folder has a [`Family`]).
#[doc(hidden)]
pub fn compiled_families() -> Vec<&'static str> {
    fatbins::FATBINS.iter().map(|(n, _)| *n).collect()
}

/// What fusekit needs to know about a device, read once when the handle is made.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceProps {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (u32, u32),
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// L2 cache size in bytes.
    pub l2_bytes: u64,
    /// Largest dynamic shared memory one block may opt into, in bytes.
    pub smem_per_block_optin: u64,
    /// Shared memory per multiprocessor, in bytes.
    pub smem_per_sm: u64,
    /// Resident threads per multiprocessor.
    pub max_threads_per_sm: u32,
    /// Device memory in bytes.
    pub total_mem: u64,
    /// Theoretical memory bandwidth in bytes/s from the memory clock and bus width (0 if the driver does not
    /// report them). Floors use the *measured* copy bandwidth, never this.
    pub theoretical_bandwidth: f64,
    /// CUDA driver version, e.g. 13000 for 13.0.
    pub driver_version: i32,
}

impl DeviceProps {
    /// SASS architecture string fusekit runs on this device ("sm_90a" on Hopper, "sm_80" on A100...).
    ///
    /// ```
    /// # let mut p = fusekit::DeviceProps::example_h100();
    /// assert_eq!(p.sass_target(), "sm_90a");
    /// p.compute_capability = (8, 6);
    /// assert_eq!(p.sass_target(), "sm_86");
    /// ```
    pub fn sass_target(&self) -> String {
        match self.compute_capability {
            (9, 0) => "sm_90a".into(),
            (ma, mi) => format!("sm_{ma}{mi}"),
        }
    }

    /// Props of an H100 SXM, for documentation examples and CPU tests.
    #[doc(hidden)]
    pub fn example_h100() -> Self {
        DeviceProps {
            ordinal: 0,
            name: "NVIDIA H100 80GB HBM3".into(),
            compute_capability: (9, 0),
            sm_count: 132,
            l2_bytes: 50 * 1024 * 1024,
            smem_per_block_optin: 227 * 1024,
            smem_per_sm: 228 * 1024,
            max_threads_per_sm: 2048,
            total_mem: 80 * (1 << 30),
            theoretical_bandwidth: 3.35e12,
            driver_version: 13000,
        }
    }
}

impl fmt::Display for DeviceProps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (ma, mi) = self.compute_capability;
        write!(
            f,
            "GPU {}: {} (compute {ma}.{mi}, {}), {} SMs, {:.1} GiB, L2 {} MiB, smem/block {} KiB, driver {}.{}",
            self.ordinal,
            self.name,
            self.sass_target(),
            self.sm_count,
            self.total_mem as f64 / (1u64 << 30) as f64,
            self.l2_bytes >> 20,
            self.smem_per_block_optin >> 10,
            self.driver_version / 1000,
            (self.driver_version % 1000) / 10
        )?;
        if self.theoretical_bandwidth > 0.0 {
            write!(
                f,
                ", {:.2} TB/s theoretical",
                self.theoretical_bandwidth / 1e12
            )?;
        }
        Ok(())
    }
}

/// The oldest compute capability fusekit ships SASS for.
pub const MIN_COMPUTE_CAPABILITY: (u32, u32) = (8, 0);

/// The oldest CUDA driver API the kernels and fusekit's driver calls need: 13.0 (driver r580 or newer).
/// The fatbins are built by nvcc 13.0 (their PTX is ISA 9.0), and cudarc binds the 13.0 driver API, whose
/// newer entry points an older driver lacks.
pub const MIN_DRIVER_VERSION: i32 = 13000;

/// `Err(Unsupported)` naming the required version unless `version` (as `cuDriverGetVersion` reports it,
/// 1000·major + 10·minor) is at least [`MIN_DRIVER_VERSION`].
pub(crate) fn check_driver_version(version: i32) -> Result<()> {
    if version < MIN_DRIVER_VERSION {
        return Err(Error::Unsupported {
            what: format!(
                "the CUDA driver supports CUDA {}.{}; fusekit's kernels need CUDA {}.{} or newer \
                 (NVIDIA driver r580+)",
                version / 1000,
                version % 1000 / 10,
                MIN_DRIVER_VERSION / 1000,
                MIN_DRIVER_VERSION % 1000 / 10
            ),
        });
    }
    Ok(())
}

/// Modules and functions of one CUDA context, shared by every [`Gpu`] on that context.
struct ModuleCache {
    modules: Vec<OnceCell<Arc<CudaModule>>>,
    /// Each function with the dynamic shared memory its attribute has been raised to (only ever raised,
    /// under this lock, so one thread's launch never lowers the limit under another's).
    functions: Mutex<HashMap<(Family, String), (CudaFunction, u32)>>,
    /// (kernel, threads, dynamic shared memory) -> whether one of its clusters fits the GPU.
    clusters: Mutex<HashMap<(String, u32, u32), bool>>,
}

type CacheRegistry = Mutex<Vec<(Weak<CudaContext>, Arc<ModuleCache>)>>;
static CACHES: Lazy<CacheRegistry> = Lazy::new(|| Mutex::new(Vec::new()));

fn cache_for(ctx: &Arc<CudaContext>) -> Arc<ModuleCache> {
    let mut caches = CACHES.lock().unwrap_or_else(|p| p.into_inner());
    caches.retain(|(w, _)| w.strong_count() > 0);
    if let Some((_, c)) = caches
        .iter()
        .find(|(w, _)| w.upgrade().is_some_and(|c| Arc::ptr_eq(&c, ctx)))
    {
        return c.clone();
    }
    let cache = Arc::new(ModuleCache {
        modules: Family::ALL.iter().map(|_| OnceCell::new()).collect(),
        functions: Mutex::new(HashMap::new()),
        clusters: Mutex::new(HashMap::new()),
    });
    caches.push((Arc::downgrade(ctx), cache.clone()));
    cache
}

/// Checks, without touching anything that could panic, that a CUDA driver and at least one device exist.
/// Returns the device count.
///
/// ```
/// match fusekit::probe_driver() {
///     Ok(n) => println!("{n} CUDA device(s)"),
///     Err(e) => println!("running on the CPU: {e}"),
/// }
/// ```
pub fn probe_driver() -> Result<usize> {
    // cudarc panics on first use if libcuda cannot be opened: look for it first (under the names cudarc
    // tries; with dynamic linking the process could not have started without it).
    if !library_present(LIBCUDA) {
        return Err(Error::NoDevice {
            reason: "the CUDA driver library (libcuda.so) was not found on this machine".into(),
        });
    }
    // cuDriverGetVersion exists in every driver: ask before any call an old driver may lack (cudarc
    // resolves each entry point on first use and panics on a missing one).
    let mut version = 0;
    // SAFETY: writes one int; the library was found above.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    if r != CUresult::CUDA_SUCCESS {
        return Err(Error::NoDevice {
            reason: format!("cuDriverGetVersion failed: {r:?}"),
        });
    }
    check_driver_version(version)?;
    cudarc::driver::result::init().map_err(|e| Error::NoDevice {
        reason: format!("cuInit failed: {}", driver_error_text(e)),
    })?;
    let n = cudarc::driver::result::device::get_count().map_err(|e| Error::NoDevice {
        reason: format!("cuDeviceGetCount failed: {}", driver_error_text(e)),
    })?;
    if n <= 0 {
        return Err(Error::NoDevice {
            reason: "the CUDA driver reports no device".into(),
        });
    }
    Ok(n as usize)
}

/// Whether one of the shared libraries `names` can be opened. Works whether cudarc loads libraries at run
/// time or links them (then they are loaded already), without cudarc's own probe, which exists only with
/// its `dynamic-loading` feature. Callers pass names cudarc would also try.
pub(crate) fn library_present(names: &[&str]) -> bool {
    #[cfg(unix)]
    {
        use std::ffi::{c_char, c_int, c_void, CString};
        extern "C" {
            fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
            fn dlclose(handle: *mut c_void) -> c_int;
        }
        const RTLD_LAZY: c_int = 1;
        names.iter().any(|name| {
            let Ok(c) = CString::new(*name) else {
                return false;
            };
            // SAFETY: dlopen of a library by name; the handle is closed at once (the library stays
            // loaded while anything else holds it, which is what cudarc's own open does).
            unsafe {
                let h = dlopen(c.as_ptr(), RTLD_LAZY);
                if h.is_null() {
                    false
                } else {
                    dlclose(h);
                    true
                }
            }
        })
    }
    #[cfg(not(unix))]
    {
        let _ = names;
        false
    }
}

/// The driver library under the names every driver installs (both among those cudarc tries).
pub(crate) const LIBCUDA: &[&str] = &["libcuda.so.1", "libcuda.so"];

fn driver_error_text(e: DriverError) -> String {
    match e.error_string() {
        Ok(s) => format!("{:?} ({})", e.0, s.to_string_lossy()),
        Err(_) => format!("{:?}", e.0),
    }
}

/// A GPU to run fusekit kernels on: a CUDA context, the stream kernels are queued on, the device's
/// properties, and the kernel modules of that context (loaded on first use, once per context).
///
/// Cloning is cheap and shares everything. Every kernel launch goes onto [`Gpu::stream`]; fusekit never
/// synchronises unless a function's name says so.
#[derive(Clone)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    props: Arc<DeviceProps>,
    cache: Arc<ModuleCache>,
}

impl fmt::Debug for Gpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gpu").field("props", &self.props).finish()
    }
}

impl Gpu {
    /// Opens device `ordinal` with a new stream of its own.
    ///
    /// ```
    /// match fusekit::Gpu::new(0) {
    ///     Ok(gpu) => println!("{}", gpu.props()),
    ///     Err(e) if e.is_no_device() => println!("no GPU here: {e}"),
    ///     Err(e) => panic!("{e}"),
    /// }
    /// ```
    pub fn new(ordinal: usize) -> Result<Self> {
        let count = probe_driver()?;
        if ordinal >= count {
            return Err(Error::NoDevice {
                reason: format!(
                    "device ordinal {ordinal} requested, the driver has {count} device(s)"
                ),
            });
        }
        let ctx = CudaContext::new(ordinal).during("creating the CUDA context")?;
        let stream = ctx.new_stream().during("creating a stream")?;
        Self::from_stream(stream)
    }

    /// Wraps a caller's cudarc stream: kernels go onto it, and the caller's own slices work unchanged.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let ctx = cudarc::driver::CudaContext::new(0)?;
    /// let stream = ctx.default_stream();
    /// let gpu = fusekit::Gpu::from_stream(stream.clone())?;
    /// assert!(std::sync::Arc::ptr_eq(gpu.stream(), &stream));
    /// # Ok(()) }
    /// ```
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context().clone();
        let props = read_props(&ctx)?;
        if props.compute_capability < MIN_COMPUTE_CAPABILITY {
            let (ma, mi) = props.compute_capability;
            return Err(Error::Unsupported {
                what: format!(
                    "{} has compute capability {ma}.{mi}; fusekit needs 8.0 or newer (sm_80, sm_86, sm_89, sm_90a SASS, compute_90 PTX)",
                    props.name
                ),
            });
        }
        let cache = cache_for(&ctx);
        Ok(Gpu {
            ctx,
            stream,
            props: Arc::new(props),
            cache,
        })
    }

    /// The same device and modules, queuing onto another stream of the same context.
    ///
    /// ```no_run
    /// # fn main() -> fusekit::Result<()> {
    /// let gpu = fusekit::Gpu::new(0)?;
    /// let side = gpu.with_stream(gpu.context().new_stream().unwrap())?;
    /// assert_eq!(side.props(), gpu.props());
    /// # Ok(()) }
    /// ```
    pub fn with_stream(&self, stream: Arc<CudaStream>) -> Result<Self> {
        if !Arc::ptr_eq(stream.context(), &self.ctx) {
            return Err(Error::layout("stream", "belongs to another CUDA context"));
        }
        Ok(Gpu {
            ctx: self.ctx.clone(),
            stream,
            props: self.props.clone(),
            cache: self.cache.clone(),
        })
    }

    /// The stream every launch through this handle goes onto.
    ///
    /// ```no_run
    /// # let gpu = fusekit::Gpu::new(0).unwrap();
    /// let buf = gpu.stream().alloc_zeros::<f32>(1024).unwrap();
    /// ```
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context.
    ///
    /// ```no_run
    /// # let gpu = fusekit::Gpu::new(0).unwrap();
    /// let other = gpu.context().new_stream().unwrap();
    /// ```
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Device properties read when the handle was made.
    ///
    /// ```no_run
    /// # let gpu = fusekit::Gpu::new(0).unwrap();
    /// println!("{} SMs, {} MiB of L2", gpu.props().sm_count, gpu.props().l2_bytes >> 20);
    /// ```
    pub fn props(&self) -> &DeviceProps {
        &self.props
    }

    /// Waits for everything queued on this handle's stream.
    ///
    /// ```no_run
    /// # let gpu = fusekit::Gpu::new(0).unwrap();
    /// gpu.synchronize().unwrap();
    /// ```
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().during("synchronising the stream")
    }

    /// Loads (once per context) the family's module and returns one of its kernels, its dynamic
    /// shared-memory limit raised to at least `smem` bytes (never lowered).
    pub(crate) fn function(&self, family: Family, name: &str, smem: u32) -> Result<CudaFunction> {
        let mut fns = self
            .cache
            .functions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let entry = match fns.entry((family, name.to_string())) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let module =
                    self.cache.modules[family.index()].get_or_try_init(|| self.load(family))?;
                let f = module.load_function(name).during(&format!(
                    "looking up kernel `{name}` in family `{}`",
                    family.name()
                ))?;
                v.insert((f, 48 * 1024))
            }
        };
        if smem > entry.1 {
            entry
                .0
                .set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
                .during(&format!("raising the shared-memory limit of {name}"))?;
            entry.1 = smem;
        }
        Ok(entry.0.clone())
    }

    /// Whether at least one cluster of kernel `name` (compiled with fixed cluster dimensions) fits on this
    /// GPU with `threads` threads and `smem` bytes of dynamic shared memory per block, as the driver's
    /// occupancy calculator says (a MIG slice or a GPU with small GPCs may fit none). Cached per context.
    pub(crate) fn cluster_fits(
        &self,
        family: Family,
        name: &str,
        threads: u32,
        smem: u32,
    ) -> Result<bool> {
        let key = (name.to_string(), threads, smem);
        if let Some(&ok) = self
            .cache
            .clusters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(ok);
        }
        let f = self.function(family, name, smem)?;
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (8, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem,
        };
        let ok = f
            .occupancy_max_active_clusters(cfg, &self.stream)
            .during(&format!("asking how many clusters of {name} fit"))?
            > 0;
        self.cache
            .clusters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, ok);
        Ok(ok)
    }

    fn load(&self, family: Family) -> Result<Arc<CudaModule>> {
        let bin = family.fatbin();
        if bin.is_empty() {
            return Err(Error::Unsupported {
                what: format!(
                    "family `{}` was built without kernels (DOCS_RS build)",
                    family.name()
                ),
            });
        }
        // load_module copies the image into a Vec (malloc'd, 16-byte aligned), as cuModuleLoadData wants.
        let image = cudarc::nvrtc::Ptx::from_binary(bin.to_vec());
        self.ctx.load_module(image).map_err(|e| match e.0 {
            CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU
            | CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => Error::Unsupported {
                what: format!(
                    "family `{}` has no code this driver can run on {} ({}): {}",
                    family.name(),
                    self.props.name,
                    self.props.sass_target(),
                    driver_error_text(e)
                ),
            },
            _ => Error::driver(format!("loading the `{}` kernels", family.name()), e),
        })
    }
}

fn read_props(ctx: &Arc<CudaContext>) -> Result<DeviceProps> {
    let attr = |a: Attr| -> Result<i64> {
        ctx.attribute(a)
            .map(|v| v as i64)
            .during("reading a device attribute")
    };
    let mut driver_version = 0i32;
    // SAFETY: writes one int; the driver library is loaded (a context exists).
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) }
        .result()
        .during("reading the driver version")?;
    let mem_clock_khz = attr(Attr::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE).unwrap_or(0);
    let bus_bits = attr(Attr::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH).unwrap_or(0);
    Ok(DeviceProps {
        ordinal: ctx.ordinal(),
        name: ctx.name().during("reading the device name")?,
        compute_capability: (
            attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? as u32,
            attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)? as u32,
        ),
        sm_count: attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
        l2_bytes: attr(Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as u64,
        smem_per_block_optin: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
            as u64,
        smem_per_sm: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)? as u64,
        max_threads_per_sm: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR)? as u32,
        total_mem: ctx.total_mem().during("reading the memory size")? as u64,
        // DDR: two transfers per clock.
        theoretical_bandwidth: 2.0 * mem_clock_khz as f64 * 1e3 * bus_bits as f64 / 8.0,
        driver_version,
    })
}

/// Where a device buffer starts, for alignment checks and parameter structs.
pub(crate) fn check_aligned(arg: &'static str, ptr: u64, align: u64) -> Result<()> {
    if ptr % align != 0 {
        return Err(Error::layout(
            arg,
            format!("device pointer {ptr:#x} is not {align}-byte aligned"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod driver_version_tests {
    use super::*;

    #[test]
    fn an_old_driver_is_unsupported_and_named() {
        let e = check_driver_version(12080).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("CUDA 12.8") && msg.contains("13.0"), "{msg}");
        assert!(check_driver_version(13000).is_ok());
        assert!(check_driver_version(13020).is_ok());
    }
}
