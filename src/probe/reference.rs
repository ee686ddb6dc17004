//! CPU reference of the probe kernels.

/// What `fk_copy_v16` computes: `dst = src`.
///
/// ```
/// assert_eq!(fusekit::probe::reference::copy(&[1u8, 2, 3]), vec![1, 2, 3]);
/// ```
pub fn copy<T: Copy>(src: &[T]) -> Vec<T> {
    src.to_vec()
}
