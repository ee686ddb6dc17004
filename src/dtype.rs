//! Element types the kernels are instantiated for, with the suffix of their kernel names.

use half::{bf16, f16};

use crate::testing::Element;

/// Floating-point storage types with kernels: f32, f16, bf16 (arithmetic is fp32 whatever the storage).
pub trait Float: Element + sealed::Sealed {
    /// Kernel-name suffix ("f32", "f16", "bf16").
    const SUFFIX: &'static str;
}
impl Float for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Float for f16 {
    const SUFFIX: &'static str = "f16";
}
impl Float for bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// Index types with kernels: i32, i64.
pub trait Index: Element + sealed::Sealed {
    /// Kernel-name suffix ("i32", "i64").
    const SUFFIX: &'static str;
    /// Widening conversion.
    fn to_i64(self) -> i64;
}
impl Index for i32 {
    const SUFFIX: &'static str = "i32";
    fn to_i64(self) -> i64 {
        self as i64
    }
}
impl Index for i64 {
    const SUFFIX: &'static str = "i64";
    fn to_i64(self) -> i64 {
        self
    }
}

pub(crate) mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for i32 {}
    impl Sealed for i64 {}
}
