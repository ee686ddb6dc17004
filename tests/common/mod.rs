//! Test helpers shared by the attention test binaries (each includes this module with `mod common;`).
#![allow(dead_code)]

use fusekit::attention::KvElement;
use fusekit::testing::{compare, Dist, Rng, Tolerance};

/// lse of a decode or prefill: fp32 arithmetic against the f64 reference.
pub const LSE_TOL: Tolerance = Tolerance {
    rel_l2: 1e-5,
    atol: 1e-4,
    rtol: 1e-5,
};

/// `n` standard normal values rounded to `T` (queries).
pub fn random_q<T: KvElement>(rng: &mut Rng, n: usize) -> Vec<T> {
    rng.sample(
        Dist::Normal {
            mean: 0.0,
            std: 1.0,
        },
        n,
    )
    .into_iter()
    .map(T::from_f64)
    .collect()
}

/// o within one rounding to T of an fp32 result (2^-9 relative for bf16, 2^-12 for f16), lse within fp32.
pub fn check_o_lse<T: KvElement>(
    what: &str,
    got_o: &[T],
    got_lse: &[f32],
    want_o: &[f64],
    want_lse: &[f64],
) -> Result<(), String> {
    let tol_o = if T::NAME == "bf16" {
        Tolerance {
            rel_l2: 1e-2,
            atol: 1e-3,
            rtol: 8e-3,
        }
    } else {
        Tolerance {
            rel_l2: 2e-3,
            atol: 2e-4,
            rtol: 2e-3,
        }
    };
    compare(&format!("o {what}"), got_o, want_o, tol_o)?;
    compare(&format!("lse {what}"), got_lse, want_lse, LSE_TOL)?;
    Ok(())
}
