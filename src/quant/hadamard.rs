//! Normalised Hadamard transforms of sizes `n = m · 2^k`, m ∈ {1, 12, 20, 28, 36, 44, 60}: the
//! rotation of QuaRot and OSTQuant. `H` is orthogonal (`H·Hᵀ = I`), so `y = x·Wᵀ = (x·H)·(W·H)ᵀ`: the
//! weight is rotated offline ([`rotate_rows`] on its rows) and the activation online (the same map on
//! each token), which spreads an outlier channel over all `n` channels before quantisation.
//!
//! `H_n = (H_m ⊗ H_{2^k}) / √n`: `H_{2^k}` is Sylvester's (the fast Walsh–Hadamard butterfly), `H_m`
//! Paley's construction over the prime field `q` (type I, order `q + 1`, for q = 11, 19, 43, 59; type
//! II, order `2(q + 1)`, for q = 13, 17), entries ±1. Element `a·2^k + b` of a row is block `a`, lane `b`:
//! the transform is a butterfly over `b` within each block, then an `m × m` mix of the blocks. This is
//! the definition the kernels will implement; SmolLM2's 576 = 36·16 and 1536 = 12·128 and MiniLM's
//! 384 = 12·32 are all of this form.

use crate::error::{Error, Result};

/// The orders of the non-power-of-two Hadamard factors and their Paley construction
/// (`(m, q, type)`).
const PALEY: [(usize, u64, u8); 6] = [
    (12, 11, 1),
    (20, 19, 1),
    (28, 13, 2),
    (36, 17, 2),
    (44, 43, 1),
    (60, 59, 1),
];

/// `(m, 2^k)` with `n = m · 2^k`, or `Err(Unsupported)` naming `n`.
///
/// ```
/// use fusekit::quant::hadamard::factor;
/// assert_eq!(factor(576)?, (36, 16));
/// assert_eq!(factor(1536)?, (12, 128));
/// assert_eq!(factor(4096)?, (1, 4096));
/// assert!(factor(11008).is_err()); // 43 · 256: no Hadamard matrix of order 43
/// # Ok::<(), fusekit::Error>(())
/// ```
pub fn factor(n: usize) -> Result<(usize, usize)> {
    if n == 0 {
        return Err(Error::invalid("n", "a Hadamard transform of size 0"));
    }
    let p = 1usize << n.trailing_zeros();
    let odd_part = n / p;
    if odd_part == 1 {
        return Ok((1, n));
    }
    for &(m, _, _) in &PALEY {
        if n % m == 0 && (n / m).is_power_of_two() {
            return Ok((m, n / m));
        }
    }
    Err(Error::Unsupported {
        what: format!(
            "a Hadamard transform of size {n}: sizes are m·2^k with m in {{1, 12, 20, 28, 36, 44, 60}}"
        ),
    })
}

/// The quadratic character of `a` modulo the prime `q`: 0, 1 (a square) or −1.
fn chi(a: u64, q: u64) -> i8 {
    let a = a % q;
    if a == 0 {
        return 0;
    }
    // Euler's criterion.
    let (mut base, mut e, mut r) = (a, (q - 1) / 2, 1u64);
    while e > 0 {
        if e & 1 == 1 {
            r = r * base % q;
        }
        base = base * base % q;
        e >>= 1;
    }
    if r == 1 {
        1
    } else {
        -1
    }
}

/// The ±1 Hadamard matrix of order `m` (1 or a Paley order), row-major.
fn paley(m: usize) -> Vec<i8> {
    if m == 1 {
        return vec![1];
    }
    let &(_, q, kind) = PALEY.iter().find(|p| p.0 == m).expect("a Paley order");
    let qn = q as usize;
    let jac = |i: usize, j: usize| chi((j as u64 + q - i as u64) % q, q);
    // C = [[0, 1ᵀ], [±1, Q]] of order q + 1 (−1 column for type I, +1 for type II).
    let c = |i: usize, j: usize| -> i8 {
        match (i, j) {
            (0, 0) => 0,
            (0, _) => 1,
            (_, 0) => {
                if kind == 1 {
                    -1
                } else {
                    1
                }
            }
            _ => jac(i - 1, j - 1),
        }
    };
    let mut h = vec![0i8; m * m];
    if kind == 1 {
        // H = I + C.
        for i in 0..=qn {
            for j in 0..=qn {
                h[i * m + j] = c(i, j) + (i == j) as i8;
            }
        }
    } else {
        // Each entry of C becomes a 2×2 block: 0 → [[1, −1], [−1, −1]], ±1 → ±[[1, 1], [1, −1]].
        for i in 0..=qn {
            for j in 0..=qn {
                let blk: [[i8; 2]; 2] = match c(i, j) {
                    0 => [[1, -1], [-1, -1]],
                    s => [[s, s], [s, -s]],
                };
                for (a, row) in blk.iter().enumerate() {
                    for (b, &v) in row.iter().enumerate() {
                        h[(2 * i + a) * m + 2 * j + b] = v;
                    }
                }
            }
        }
    }
    h
}

/// The normalised `n × n` Hadamard matrix `H_n` (row-major, entries `±1/√n`); for tests and small sizes.
///
/// ```
/// let h = fusekit::quant::hadamard::matrix(12)?;
/// // Orthogonal: rows 0 and 5 are orthogonal, each of unit norm.
/// let dot: f64 = (0..12).map(|j| h[j] * h[5 * 12 + j]).sum();
/// let norm: f64 = (0..12).map(|j| h[j] * h[j]).sum();
/// assert!(dot.abs() < 1e-12 && (norm - 1.0).abs() < 1e-12);
/// # Ok::<(), fusekit::Error>(())
/// ```
pub fn matrix(n: usize) -> Result<Vec<f64>> {
    factor(n)?;
    if n > 1 << 14 {
        return Err(Error::Unsupported {
            what: format!("an explicit Hadamard matrix of order {n} (at most 16384; rotate_rows has no limit)"),
        });
    }
    let mut h = vec![0.0; n * n];
    for i in 0..n {
        h[i * n + i] = 1.0;
    }
    rotate_rows(&mut h, n)?;
    Ok(h)
}

/// Every row `r` of `data` (`[rows][n]`) becomes `r · H_n`, in f64, in place: the rotation of a
/// weight's rows (`W·H`, input channels) or of activations (`x·H`).
///
/// ```
/// use fusekit::quant::hadamard::rotate_rows;
/// // One outlier channel spreads evenly over all channels; the norm is kept.
/// let mut x = vec![0.0; 576];
/// x[100] = 2.6e4;
/// rotate_rows(&mut x, 576)?;
/// assert!(x.iter().all(|v| (v.abs() - 2.6e4 / 24.0).abs() < 1e-6));
/// assert!(rotate_rows(&mut vec![0.0; 10], 10).is_err());
/// # Ok::<(), fusekit::Error>(())
/// ```
pub fn rotate_rows(data: &mut [f64], n: usize) -> Result<()> {
    let (m, p) = factor(n)?;
    if data.len() % n != 0 {
        return Err(Error::shape(
            "data",
            format!("rows of {n}"),
            format!("{} values", data.len()),
        ));
    }
    let hm = paley(m);
    let norm = 1.0 / (n as f64).sqrt();
    let mut mix = vec![0.0; m];
    for row in data.chunks_exact_mut(n) {
        // The butterfly over the lanes of each block.
        for blk in row.chunks_exact_mut(p) {
            let mut h = 1;
            while h < p {
                for i in (0..p).step_by(2 * h) {
                    for j in i..i + h {
                        let (a, b) = (blk[j], blk[j + h]);
                        blk[j] = a + b;
                        blk[j + h] = a - b;
                    }
                }
                h *= 2;
            }
        }
        // y[c, d] = Σ_a Hm[a][c] · z[a, d].
        if m > 1 {
            for d in 0..p {
                for (c, out) in mix.iter_mut().enumerate() {
                    *out = (0..m).map(|a| hm[a * m + c] as f64 * row[a * p + d]).sum();
                }
                for (c, &v) in mix.iter().enumerate() {
                    row[c * p + d] = v;
                }
            }
        }
        for v in row.iter_mut() {
            *v *= norm;
        }
    }
    Ok(())
}

/// [`rotate_rows`] of f32 data, computed in f64 and rounded once: `[rows][n]` in, `[rows][n]` out.
///
/// ```
/// let w = vec![1.0f32; 2 * 64];
/// let r = fusekit::quant::hadamard::rotate_rows_f32(&w, 64)?;
/// // A constant row becomes √64 in channel 0 and 0 elsewhere.
/// assert_eq!(r[0], 8.0);
/// assert!(r[1..64].iter().all(|&v| v == 0.0));
/// # Ok::<(), fusekit::Error>(())
/// ```
pub fn rotate_rows_f32(data: &[f32], n: usize) -> Result<Vec<f32>> {
    let mut x: Vec<f64> = data.iter().map(|&v| v as f64).collect();
    rotate_rows(&mut x, n)?;
    Ok(x.into_iter().map(|v| v as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sign tables the kernel folds into its adds (`kernels/include/fk_had_tables.h`) are this
    /// module's Paley matrices: the header's text is regenerated here and compared.
    #[test]
    fn kernel_tables_are_current() {
        let mut out = String::from(
            "/* fk_had_tables.h: the sign patterns of the Paley Hadamard matrices H_m (src/quant/hadamard.rs) for the\n * online Hadamard kernel (kernels/quant/hadamard.cu). Generated; the unit test\n * quant::hadamard::tests::kernel_tables_are_current regenerates this text and compares it.\n * fk_had_col<M>(c) has bit a set when H_M[a][c] = -1: output block c of x.H is the sum over a of\n * +-(block a). With c a compile-time constant (an unrolled loop) every sign folds into an FADD/FSUB. */\n#ifndef FK_HAD_TABLES_H\n#define FK_HAD_TABLES_H\n\n#include <stdint.h>\n\ntemplate <int M>\n__device__ __forceinline__ uint64_t fk_had_col(int c);\n",
        );
        for &(m, _, _) in &PALEY {
            let h = paley(m);
            let words: Vec<String> = (0..m)
                .map(|c| {
                    let w = (0..m)
                        .filter(|&a| h[a * m + c] == -1)
                        .fold(0u64, |w, a| w | 1 << a);
                    format!("0x{w:016x}ull")
                })
                .collect();
            let lines: Vec<String> = words
                .chunks(4)
                .map(|c| format!("        {},", c.join(", ")))
                .collect();
            out += &format!(
                "\ntemplate <>\n__device__ __forceinline__ uint64_t fk_had_col<{m}>(int c) {{\n    constexpr uint64_t t[{m}] = {{\n{}\n    }};\n    return t[c];\n}}\n",
                lines.join("\n")
            );
        }
        out += "\n#endif\n";
        let header = include_str!("../../kernels/include/fk_had_tables.h");
        assert!(
            header == out,
            "kernels/include/fk_had_tables.h is stale; expected:\n{out}"
        );
    }

    #[test]
    fn every_base_order_is_a_hadamard_matrix() {
        for &(m, _, _) in PALEY.iter().chain(&[(1, 0, 0)]) {
            let h = paley(m);
            for i in 0..m {
                for j in 0..m {
                    let dot: i32 = (0..m)
                        .map(|k| h[i * m + k] as i32 * h[j * m + k] as i32)
                        .sum();
                    assert_eq!(
                        dot,
                        if i == j { m as i32 } else { 0 },
                        "order {m}, rows {i} {j}"
                    );
                }
            }
            assert!(h.iter().all(|&v| v == 1 || v == -1));
        }
    }

    /// `matrix(n)` is `(H_m ⊗ H_{2^k}) / √n` entry by entry, so `rotate_rows` computes `x·H`, not
    /// `x·Hᵀ` (the Paley factors are not symmetric).
    #[test]
    fn the_transform_is_x_times_h() {
        for n in [12, 24, 28, 56, 36, 120] {
            let (m, p) = factor(n).unwrap();
            let hm = paley(m);
            let h = matrix(n).unwrap();
            let asym = (0..m).any(|a| (0..m).any(|c| hm[a * m + c] != hm[c * m + a]));
            for i in 0..n {
                for j in 0..n {
                    let (a, b, c, d) = (i / p, i % p, j / p, j % p);
                    let sylvester = if (b & d).count_ones() % 2 == 0 {
                        1.0
                    } else {
                        -1.0
                    };
                    let want = hm[a * m + c] as f64 * sylvester / (n as f64).sqrt();
                    assert!((h[i * n + j] - want).abs() < 1e-12, "n {n} ({i}, {j})");
                }
            }
            if n == 12 {
                assert!(asym, "the test needs a non-symmetric factor");
            }
        }
    }
}
