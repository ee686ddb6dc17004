//! The `__host__ __device__` maths headers of `kernels/include/`, compiled for the host by build.rs (cc) so
//! CPU tests check the formulas the kernels run, bit for bit.

extern "C" {
    fn fk_host_f32_to_bf16_bits(x: f32) -> u16;
    fn fk_host_bf16_bits_to_f32(h: u16) -> f32;
}

/// f32 -> bf16 exactly as the kernels' `fk_f32_to_bf16_bits` rounds it.
pub(crate) fn f32_to_bf16_bits(x: f32) -> u16 {
    // SAFETY: pure function of its argument.
    unsafe { fk_host_f32_to_bf16_bits(x) }
}

/// bf16 -> f32 as the kernels widen it.
pub(crate) fn bf16_bits_to_f32(h: u16) -> f32 {
    // SAFETY: pure function of its argument.
    unsafe { fk_host_bf16_bits_to_f32(h) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn bf16_rounding_matches_half_crate() {
        let mut rng = crate::testing::Rng::new(0x5eed_bf16);
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(0x3f80_8000), // 1 + 2^-8: halfway between two bf16, ties to even (down)
            f32::from_bits(0x3f81_8000), // 1 + 3·2^-8: halfway, ties to even (up)
            3.4e38,
        ];
        let randoms = (0..100_000).map(|_| f32::from_bits(rng.next_u64() as u32));
        for x in specials.into_iter().chain(randoms) {
            let ours = f32_to_bf16_bits(x);
            let theirs = bf16::from_f32(x).to_bits();
            if x.is_nan() {
                assert!(bf16::from_bits(ours).is_nan(), "NaN {x:?} must stay NaN");
            } else {
                assert_eq!(ours, theirs, "x = {x:e} ({:#010x})", x.to_bits());
                assert_eq!(
                    bf16_bits_to_f32(ours).to_bits(),
                    bf16::from_bits(theirs).to_f32().to_bits()
                );
            }
        }
    }
}

/// The kernels' per-row loss result (fk_loss_math.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct RowResult {
    pub loss: f32,
    pub a: f32,
    pub b: f32,
    pub c: f32,
}

extern "C" {
    fn fk_host_row_loss(
        cfg: *const crate::params::fk_loss_config,
        lse: f32,
        logp: f32,
        swz: f32,
        wy: f32,
    ) -> RowResult;
    fn fk_host_sigmoid_focal(x: f32, t: f32, alpha: f32, gamma: f32, grad: *mut f32) -> f32;
}

/// `fk_row_loss` exactly as the kernels evaluate it (fp32).
pub(crate) fn row_loss(
    cfg: &crate::params::fk_loss_config,
    lse: f32,
    logp: f32,
    swz: f32,
    wy: f32,
) -> RowResult {
    // SAFETY: reads the struct, returns by value.
    unsafe { fk_host_row_loss(cfg, lse, logp, swz, wy) }
}

/// `fk_sigmoid_focal` exactly as the kernels evaluate it: (loss, dloss/dx).
pub(crate) fn sigmoid_focal(x: f32, t: f32, alpha: f32, gamma: f32) -> (f32, f32) {
    let mut g = 0.0f32;
    // SAFETY: writes one float through a valid pointer.
    let l = unsafe { fk_host_sigmoid_focal(x, t, alpha, gamma, &mut g) };
    (l, g)
}

extern "C" {
    fn fk_host_exp_portable(x: f32) -> f32;
    fn fk_host_moe_sigmoid(x: f32) -> f32;
}

/// The kernels' portable exp (fk_moe_math.h), bit for bit.
pub(crate) fn exp_portable(x: f32) -> f32 {
    // SAFETY: pure function.
    unsafe { fk_host_exp_portable(x) }
}

/// The kernels' router sigmoid (fk_moe_math.h), bit for bit.
pub(crate) fn moe_sigmoid(x: f32) -> f32 {
    // SAFETY: pure function.
    unsafe { fk_host_moe_sigmoid(x) }
}
