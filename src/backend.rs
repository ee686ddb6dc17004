//! Where kernels run: a CUDA GPU ([`Gpu`]) or the SIMT emulator ([`crate::emu::Emulator`]), behind one
//! trait, so that every entry point validates, plans and launches through the same code on both.
//!
//! Every fusekit function is generic over a [`Backend`] `B` and takes buffers that implement
//! [`DeviceRead`]`<T, B>` / [`DeviceWrite`]`<T, B>`: on a [`Gpu`], any cudarc buffer (`CudaSlice`,
//! `CudaView`, `CudaViewMut`, ...); on the emulator, [`crate::emu::Buffer`] and its views, which live in
//! host memory. The type parameter defaults to [`Gpu`], so CUDA code names no backend at all.
//!
//! ```
//! use fusekit::{Backend, emu::Emulator};
//! # fn main() -> fusekit::Result<()> {
//! let dev = Emulator::new()?;
//! let x = dev.upload(&[1.0f32, 2.0, 3.0])?;
//! assert_eq!(dev.download(&x)?, vec![1.0, 2.0, 3.0]);
//! # Ok(()) }
//! ```

use std::fmt::Debug;
use std::ops::Range;

use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice,
    LaunchConfig, SyncOnDrop, ValidAsZeroBits,
};

use crate::device::Family;
use crate::error::{DriverContext, Error, Result};
use crate::{DeviceProps, Gpu};

/// Element types a buffer can hold: plain values with an all-zero bit pattern (every integer and float
/// type fusekit uses).
pub trait Scalar:
    DeviceRepr + ValidAsZeroBits + Copy + Default + Debug + Send + Sync + 'static
{
}
impl<T: DeviceRepr + ValidAsZeroBits + Copy + Default + Debug + Send + Sync + 'static> Scalar
    for T
{
}

/// A device on which fusekit kernels run, with its buffer types. Handles are `Send + Sync`: one device
/// may be shared by several host threads (each launch is validated and queued independently).
pub trait Backend: private::Device + Sized + Clone + Debug + Send + Sync {
    /// An owned buffer of `T` on this device.
    type Buffer<T: Scalar>: DeviceRead<T, Self> + DeviceWrite<T, Self> + Debug;
    /// A borrowed, read-only window of a buffer.
    type View<'a, T: Scalar>: DeviceRead<T, Self> + Debug
    where
        Self: 'a;
    /// A borrowed, writable window of a buffer.
    type ViewMut<'a, T: Scalar>: DeviceRead<T, Self> + DeviceWrite<T, Self> + Debug
    where
        Self: 'a;

    /// The device's properties (for the emulator, those of the GPU it stands in for).
    ///
    /// ```
    /// # use fusekit::Backend;
    /// let dev = fusekit::emu::Emulator::new().unwrap();
    /// assert_eq!(dev.props().compute_capability, (9, 0));
    /// ```
    fn props(&self) -> &DeviceProps;

    /// `"gpu"` or `"emu"`, for reports.
    ///
    /// ```
    /// # use fusekit::Backend;
    /// assert_eq!(fusekit::emu::Emulator::new().unwrap().kind(), "emu");
    /// ```
    fn kind(&self) -> &'static str;

    /// A zeroed buffer of `n` elements.
    ///
    /// ```
    /// # use fusekit::Backend;
    /// let dev = fusekit::emu::Emulator::new().unwrap();
    /// let b = dev.alloc_zeros::<i32>(4).unwrap();
    /// assert_eq!(dev.download(&b).unwrap(), vec![0; 4]);
    /// ```
    fn alloc_zeros<T: Scalar>(&self, n: usize) -> Result<Self::Buffer<T>>;

    /// A buffer holding a copy of `host`.
    ///
    /// ```
    /// # use fusekit::Backend;
    /// let dev = fusekit::emu::Emulator::new().unwrap();
    /// let b = dev.upload(&[7u8, 8]).unwrap();
    /// assert_eq!(dev.download(&b).unwrap(), vec![7, 8]);
    /// ```
    fn upload<T: Scalar>(&self, host: &[T]) -> Result<Self::Buffer<T>>;

    /// Copies `host` into `dst` (same length).
    ///
    /// ```
    /// # use fusekit::Backend;
    /// let dev = fusekit::emu::Emulator::new().unwrap();
    /// let mut b = dev.alloc_zeros::<f32>(2).unwrap();
    /// dev.write(&[1.5, 2.5], &mut b).unwrap();
    /// assert_eq!(dev.download(&b).unwrap(), vec![1.5, 2.5]);
    /// ```
    fn write<T: Scalar, D: DeviceWrite<T, Self>>(&self, host: &[T], dst: &mut D) -> Result<()>;

    /// Waits for the device and copies `src` to the host.
    ///
    /// ```
    /// # use fusekit::Backend;
    /// let dev = fusekit::emu::Emulator::new().unwrap();
    /// let b = dev.upload(&[1i64, -1]).unwrap();
    /// assert_eq!(dev.download(&b).unwrap(), vec![1, -1]);
    /// ```
    fn download<T: Scalar, S: DeviceRead<T, Self>>(&self, src: &S) -> Result<Vec<T>>;

    /// Sets every element of `dst` to zero (queued, like a kernel).
    ///
    /// ```
    /// # use fusekit::Backend;
    /// let dev = fusekit::emu::Emulator::new().unwrap();
    /// let mut b = dev.upload(&[3u32; 3]).unwrap();
    /// dev.zero(&mut b).unwrap();
    /// assert_eq!(dev.download(&b).unwrap(), vec![0; 3]);
    /// ```
    fn zero<T: Scalar, D: DeviceWrite<T, Self>>(&self, dst: &mut D) -> Result<()>;

    /// Elements `range` of `buf`, read-only (`Err(Shape)` if out of bounds).
    ///
    /// ```
    /// # use fusekit::{Backend, DeviceRead};
    /// let dev = fusekit::emu::Emulator::new().unwrap();
    /// let b = dev.upload(&[1, 2, 3, 4]).unwrap();
    /// let v = dev.view(&b, 1..3).unwrap();
    /// assert_eq!(dev.download(&v).unwrap(), vec![2, 3]);
    /// ```
    fn view<'a, T: Scalar>(
        &self,
        buf: &'a Self::Buffer<T>,
        range: Range<usize>,
    ) -> Result<Self::View<'a, T>>
    where
        Self: 'a;

    /// Elements `range` of `buf`, writable (`Err(Shape)` if out of bounds).
    ///
    /// ```
    /// # use fusekit::Backend;
    /// let dev = fusekit::emu::Emulator::new().unwrap();
    /// let mut b = dev.upload(&[1, 2, 3, 4]).unwrap();
    /// let mut v = dev.view_mut(&mut b, 2..4).unwrap();
    /// dev.write(&[9, 9], &mut v).unwrap();
    /// assert_eq!(dev.download(&b).unwrap(), vec![1, 2, 9, 9]);
    /// ```
    fn view_mut<'a, T: Scalar>(
        &self,
        buf: &'a mut Self::Buffer<T>,
        range: Range<usize>,
    ) -> Result<Self::ViewMut<'a, T>>
    where
        Self: 'a;

    /// Waits for everything queued.
    ///
    /// ```
    /// # use fusekit::Backend;
    /// fusekit::emu::Emulator::new().unwrap().synchronize().unwrap();
    /// ```
    fn synchronize(&self) -> Result<()>;
}

/// A buffer kernels may read on backend `B`.
pub trait DeviceRead<T, B: Backend>: private::Addr<T, B> {
    /// Elements.
    ///
    /// ```
    /// # use fusekit::{Backend, DeviceRead};
    /// let dev = fusekit::emu::Emulator::new().unwrap();
    /// assert_eq!(DeviceRead::len(&dev.alloc_zeros::<f32>(5).unwrap()), 5);
    /// ```
    fn len(&self) -> usize {
        private::Addr::elems(self)
    }
    /// No elements.
    ///
    /// ```
    /// # use fusekit::{Backend, DeviceRead};
    /// let dev = fusekit::emu::Emulator::new().unwrap();
    /// assert!(DeviceRead::is_empty(&dev.alloc_zeros::<f32>(0).unwrap()));
    /// ```
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
impl<T, B: Backend, S: private::Addr<T, B> + ?Sized> DeviceRead<T, B> for S {}

/// A buffer kernels may write on backend `B`.
pub trait DeviceWrite<T, B: Backend>: DeviceRead<T, B> + private::AddrMut<T, B> {}
impl<T, B: Backend, S: DeviceRead<T, B> + private::AddrMut<T, B> + ?Sized> DeviceWrite<T, B> for S {}

/// The crate-internal side of a backend: addresses of buffers, kernel launches.
pub(crate) mod private {
    use super::*;

    /// A launch of one kernel: grid, block, dynamic shared memory.
    pub trait Device {
        /// Keeps a buffer's stream ordering until the launch using its address is queued.
        type Guard<'a>
        where
            Self: 'a;
        /// The GEMM library handle (cuBLAS on a GPU).
        type Blas;

        /// Launches kernel `name` of `family` with its by-value parameter struct (and, for the few
        /// kernels that take one, a second device-pointer argument), raising the kernel's dynamic
        /// shared-memory limit when the launch asks for more than the default 48 KiB.
        ///
        /// Contract, upheld by every family's safe layer: the struct has the header's layout (bindgen),
        /// and every pointer in it addresses a live buffer of this device with at least the extent the
        /// kernel touches, whose guards the caller holds until this returns.
        fn launch<P: DeviceRepr>(
            &self,
            family: Family,
            name: &str,
            cfg: LaunchConfig,
            params: &P,
            extra_ptr: Option<u64>,
        ) -> Result<()>;

        /// Whether a cluster of kernel `name` (compiled with fixed cluster dimensions) fits this device
        /// with `threads` threads and `smem` bytes of dynamic shared memory per block.
        fn cluster_fits(&self, family: Family, name: &str, threads: u32, smem: u32)
            -> Result<bool>;

        /// The CUDA handle, for what only a GPU has (event timing, bandwidth).
        fn as_gpu(&self) -> Option<&Gpu>;

        /// A GEMM handle on this device's stream.
        fn blas(&self) -> Result<Self::Blas>;
        /// Whether `other` queues work in the same order as `self` (the same CUDA stream).
        fn same_queue(&self, other: &Self) -> bool;
        /// `C = alpha op(A) op(B) + beta C` in cuBLAS's column-major convention (bf16 A and B; C bf16 or
        /// f32; f32 accumulation).
        ///
        /// # Safety
        /// Every pointer addresses a live buffer of this device holding the matrix its dimensions and
        /// leading dimension describe.
        unsafe fn gemm(&self, blas: &Self::Blas, g: &Gemm) -> Result<()>;
    }

    /// The address and length of a buffer on backend `B`.
    pub trait Addr<T, B: Device> {
        /// Elements.
        fn elems(&self) -> usize;
        /// The device address, with the guard that keeps it ordered.
        fn addr<'a>(&'a self, dev: &'a B) -> (u64, B::Guard<'a>);
        /// `Err(Layout)` naming `arg` unless the buffer belongs to `dev`.
        fn check_owner(&self, dev: &B, arg: &'static str) -> Result<()>;
    }

    /// The writable address of a buffer on backend `B`.
    pub trait AddrMut<T, B: Device> {
        /// The device address for writing, with its guard.
        fn addr_mut<'a>(&'a mut self, dev: &'a B) -> (u64, B::Guard<'a>);
    }

    /// One GEMM in cuBLAS's column-major terms.
    #[derive(Clone, Copy, Debug)]
    pub struct Gemm {
        pub trans_a: bool,
        pub trans_b: bool,
        pub m: usize,
        pub n: usize,
        pub k: usize,
        pub a: u64,
        pub lda: usize,
        pub b: u64,
        pub ldb: usize,
        pub c: u64,
        pub ldc: usize,
        pub c_f32: bool,
        pub beta: f32,
    }
}

pub(crate) use private::Gemm;

// ---------------------------------------------------------------------------------------------------
// The CUDA backend.

impl<T, S: DevicePtr<T>> private::Addr<T, Gpu> for S {
    fn elems(&self) -> usize {
        DeviceSlice::len(self)
    }
    fn addr<'a>(&'a self, gpu: &'a Gpu) -> (u64, SyncOnDrop<'a>) {
        self.device_ptr(gpu.stream())
    }
    fn check_owner(&self, gpu: &Gpu, arg: &'static str) -> Result<()> {
        crate::validate::same_context(gpu, arg, self)
    }
}

impl<T, S: DevicePtrMut<T>> private::AddrMut<T, Gpu> for S {
    fn addr_mut<'a>(&'a mut self, gpu: &'a Gpu) -> (u64, SyncOnDrop<'a>) {
        self.device_ptr_mut(gpu.stream())
    }
}

impl Backend for Gpu {
    type Buffer<T: Scalar> = CudaSlice<T>;
    type View<'a, T: Scalar> = CudaView<'a, T>;
    type ViewMut<'a, T: Scalar> = CudaViewMut<'a, T>;

    fn props(&self) -> &DeviceProps {
        Gpu::props(self)
    }
    fn kind(&self) -> &'static str {
        "gpu"
    }
    fn alloc_zeros<T: Scalar>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream()
            .alloc_zeros::<T>(n)
            .during("allocating device memory")
    }
    fn upload<T: Scalar>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream()
            .clone_htod(host)
            .during("copying to the device")
    }
    fn write<T: Scalar, D: DeviceWrite<T, Self>>(&self, host: &[T], dst: &mut D) -> Result<()> {
        let n = DeviceRead::len(dst);
        crate::validate::exactly("host", host.len(), n, "the destination's length")?;
        self.context()
            .bind_to_thread()
            .during("binding the CUDA context")?;
        let (p, _g) = private::AddrMut::addr_mut(dst, self);
        // SAFETY: dst holds n elements of T at p (its length), ordered on this stream by the guard.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(p, host, self.stream().cu_stream())
                .during("copying to the device")
        }
    }
    fn download<T: Scalar, S: DeviceRead<T, Self>>(&self, src: &S) -> Result<Vec<T>> {
        let n = DeviceRead::len(src);
        let mut host = vec![T::default(); n];
        self.context()
            .bind_to_thread()
            .during("binding the CUDA context")?;
        {
            let (p, _g) = private::Addr::addr(src, self);
            // SAFETY: src holds n elements at p; host has room for n.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(&mut host, p, self.stream().cu_stream())
                    .during("copying to the host")?;
            }
        }
        self.synchronize()?;
        Ok(host)
    }
    fn zero<T: Scalar, D: DeviceWrite<T, Self>>(&self, dst: &mut D) -> Result<()> {
        let bytes = DeviceRead::len(dst) * std::mem::size_of::<T>();
        self.context()
            .bind_to_thread()
            .during("binding the CUDA context")?;
        let (p, _g) = private::AddrMut::addr_mut(dst, self);
        // SAFETY: dst holds `bytes` bytes at p.
        unsafe {
            cudarc::driver::result::memset_d8_async(p, 0, bytes, self.stream().cu_stream())
                .during("clearing device memory")
        }
    }
    fn view<'a, T: Scalar>(
        &self,
        buf: &'a CudaSlice<T>,
        range: Range<usize>,
    ) -> Result<CudaView<'a, T>>
    where
        Self: 'a,
    {
        let len = buf.len();
        buf.try_slice(range.clone())
            .ok_or_else(|| out_of_bounds(range, len))
    }
    fn view_mut<'a, T: Scalar>(
        &self,
        buf: &'a mut CudaSlice<T>,
        range: Range<usize>,
    ) -> Result<CudaViewMut<'a, T>>
    where
        Self: 'a,
    {
        let len = buf.len();
        buf.try_slice_mut(range.clone())
            .ok_or_else(|| out_of_bounds(range, len))
    }
    fn synchronize(&self) -> Result<()> {
        Gpu::synchronize(self)
    }
}

impl private::Device for Gpu {
    type Guard<'a> = SyncOnDrop<'a>;
    type Blas = cudarc::cublas::CudaBlas;

    fn launch<P: DeviceRepr>(
        &self,
        family: Family,
        name: &str,
        cfg: LaunchConfig,
        params: &P,
        extra_ptr: Option<u64>,
    ) -> Result<()> {
        use cudarc::driver::PushKernelArg;
        let f = self.function(family, name, cfg.shared_mem_bytes)?;
        let mut b = self.stream().launch_builder(&f);
        b.arg(params);
        if let Some(p) = &extra_ptr {
            b.arg(p);
        }
        // SAFETY: see the contract of `Device::launch`.
        unsafe { b.launch(cfg) }.during(&format!("launching {name}"))?;
        Ok(())
    }

    fn cluster_fits(&self, family: Family, name: &str, threads: u32, smem: u32) -> Result<bool> {
        Gpu::cluster_fits(self, family, name, threads, smem)
    }

    fn as_gpu(&self) -> Option<&Gpu> {
        Some(self)
    }

    fn blas(&self) -> Result<cudarc::cublas::CudaBlas> {
        let missing = |detail: &str| {
            Error::Library {
            library: "cuBLAS",
            during: "opening the library".into(),
            detail: format!(
                "{detail} (install the CUDA toolkit or the nvidia-cublas wheel and add its lib folder \
                 to LD_LIBRARY_PATH)"
            ),
        }
        };
        if !crate::device::library_present(&[
            "libcublas.so",
            "libcublas.so.13",
            "libcublas.so.12",
            "libcublas.so.11",
        ]) {
            return Err(missing("libcublas was not found"));
        }
        // cudarc opens libcublas under the names of the CUDA version it was built for, and panics when
        // none opens (a graph that pins CUDA 12 on a machine with only libcublas.so.13): an Err too.
        let stream = self.stream().clone();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cudarc::cublas::CudaBlas::new(stream)
        })) {
            Ok(r) => r.map_err(blas_err("creating a cuBLAS handle")),
            Err(_) => Err(missing(
                "libcublas could not be opened under the names of the CUDA version cudarc was built for",
            )),
        }
    }

    fn same_queue(&self, other: &Gpu) -> bool {
        std::sync::Arc::ptr_eq(self.stream(), other.stream())
    }

    unsafe fn gemm(&self, blas: &cudarc::cublas::CudaBlas, g: &Gemm) -> Result<()> {
        use cudarc::cublas::result as r;
        use cudarc::cublas::sys::{
            cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t as Op, cudaDataType,
        };
        let one = 1.0f32;
        let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
        // SAFETY: forwarded from the caller (pointers and dimensions describe live matrices).
        unsafe {
            r::gemm_ex(
                *blas.handle(),
                op(g.trans_a),
                op(g.trans_b),
                g.m as i32,
                g.n as i32,
                g.k as i32,
                &one as *const f32 as *const _,
                g.a as *const _,
                cudaDataType::CUDA_R_16BF,
                g.lda as i32,
                g.b as *const _,
                cudaDataType::CUDA_R_16BF,
                g.ldb as i32,
                &g.beta as *const f32 as *const _,
                g.c as *mut _,
                if g.c_f32 {
                    cudaDataType::CUDA_R_32F
                } else {
                    cudaDataType::CUDA_R_16BF
                },
                g.ldc as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas_err("a GEMM"))
    }
}

fn blas_err(during: &str) -> impl Fn(cudarc::cublas::result::CublasError) -> Error + '_ {
    move |e| Error::Library {
        library: "cuBLAS",
        during: during.to_string(),
        detail: format!("{:?}", e.0),
    }
}

pub(crate) fn out_of_bounds(range: Range<usize>, len: usize) -> Error {
    Error::shape(
        "range",
        format!("a range inside 0..{len}"),
        format!("{}..{}", range.start, range.end),
    )
}

/// Address of an optional buffer (0 when absent), with its guard.
pub(crate) fn opt_addr<'a, T, B: Backend, S: DeviceRead<T, B>>(
    s: Option<&'a S>,
    dev: &'a B,
) -> (u64, Option<B::Guard<'a>>) {
    match s {
        Some(s) => {
            let (p, g) = private::Addr::addr(s, dev);
            (p, Some(g))
        }
        None => (0, None),
    }
}
