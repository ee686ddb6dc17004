//! Dense symmetric positive-definite algebra in f64 for the quantisers (row-major `n × n`).

/// Lower Cholesky factor `L` of `a` (`a = L·Lᵀ`), in place (the strict upper triangle is zeroed).
/// `None` if `a` is not positive definite (a pivot ≤ 0 or not finite).
pub(crate) fn cholesky_lower(a: &mut [f64], n: usize) -> Option<()> {
    debug_assert_eq!(a.len(), n * n);
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        if d.is_nan() || d <= 0.0 || d.is_infinite() {
            return None;
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = s / d;
        }
        for k in j + 1..n {
            a[j * n + k] = 0.0;
        }
    }
    Some(())
}

/// The inverse of a symmetric positive-definite `a` through its Cholesky factor; `None` if `a` is not
/// positive definite.
pub(crate) fn spd_inverse(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = a.to_vec();
    cholesky_lower(&mut l, n)?;
    // L⁻¹ (lower), column by column by forward substitution.
    let mut li = vec![0.0; n * n];
    for c in 0..n {
        li[c * n + c] = 1.0 / l[c * n + c];
        for i in c + 1..n {
            let mut s = 0.0;
            for k in c..i {
                s -= l[i * n + k] * li[k * n + c];
            }
            li[i * n + c] = s / l[i * n + i];
        }
    }
    // A⁻¹ = L⁻ᵀ · L⁻¹.
    let mut inv = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = 0.0;
            for k in i..n {
                s += li[k * n + i] * li[k * n + j];
            }
            inv[i * n + j] = s;
            inv[j * n + i] = s;
        }
    }
    Some(inv)
}

/// The upper Cholesky factor `U` of `a⁻¹` (`a⁻¹ = Uᵀ·U`), what GPTQ propagates errors with; `None` if
/// `a` is not positive definite.
pub(crate) fn upper_cholesky_of_inverse(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut inv = spd_inverse(a, n)?;
    cholesky_lower(&mut inv, n)?;
    // U = Lᵀ.
    let mut u = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            u[j * n + i] = inv[i * n + j];
        }
    }
    Some(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_and_factors_are_exact_to_rounding() {
        // A = B·Bᵀ + I for a fixed B.
        let n = 7;
        let b: Vec<f64> = (0..n * n)
            .map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0)
            .collect();
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|k| b[i * n + k] * b[j * n + k]).sum::<f64>()
                    + if i == j { 1.0 } else { 0.0 };
            }
        }
        let inv = spd_inverse(&a, n).unwrap();
        for i in 0..n {
            for j in 0..n {
                let s: f64 = (0..n).map(|k| a[i * n + k] * inv[k * n + j]).sum();
                assert!(
                    (s - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9,
                    "{i} {j} {s}"
                );
            }
        }
        let u = upper_cholesky_of_inverse(&a, n).unwrap();
        for i in 0..n {
            for j in 0..n {
                if i > j {
                    assert_eq!(u[i * n + j], 0.0);
                }
                let s: f64 = (0..n).map(|k| u[k * n + i] * u[k * n + j]).sum();
                assert!((s - inv[i * n + j]).abs() < 1e-9);
            }
        }
        let mut not_pd = vec![1.0, 2.0, 2.0, 1.0];
        assert!(cholesky_lower(&mut not_pd, 2).is_none());
        assert!(cholesky_lower(&mut [f64::NAN], 1).is_none());
    }
}
