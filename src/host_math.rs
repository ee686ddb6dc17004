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

/// The online-softmax state of fk_maxsum.h: running max `m`, Σ exp(x − m) as `s`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct MaxSum {
    pub m: f32,
    pub s: f32,
}

impl MaxSum {
    pub(crate) const EMPTY: MaxSum = MaxSum {
        m: f32::NEG_INFINITY,
        s: 0.0,
    };
}

extern "C" {
    fn fk_host_maxsum_merge(a: MaxSum, b: MaxSum) -> MaxSum;
    fn fk_host_maxsum_push(st: MaxSum, x: f32) -> MaxSum;
}

/// `fk_maxsum_merge`, host build.
pub(crate) fn maxsum_merge(a: MaxSum, b: MaxSum) -> MaxSum {
    // SAFETY: pure function of its arguments.
    unsafe { fk_host_maxsum_merge(a, b) }
}

/// `fk_maxsum_push`, host build.
pub(crate) fn maxsum_push(st: MaxSum, x: f32) -> MaxSum {
    // SAFETY: pure function of its arguments.
    unsafe { fk_host_maxsum_push(st, x) }
}

/// The (max, Σ exp) of one row as a loss kernel's block computes it: `threads` threads split the row as
/// fk_row_read does (elements before the first 16-byte boundary one by one, then 16-byte vectors of `vec`
/// elements, then the tail; each thread strided by the block size), each pushes its elements in that
/// order, and fk_block_reduce merges the states (xor-shuffle tree per warp, then warp 0 over the warps).
/// `head` is the number of elements before the first 16-byte boundary (from the row's address).
pub(crate) fn row_maxsum_as_kernel(row: &[f32], threads: usize, vec: usize, head: usize) -> MaxSum {
    let per_thread = thread_elements(row.len(), threads, vec, head)
        .into_iter()
        .map(|js| {
            js.into_iter()
                .fold(MaxSum::EMPTY, |s, j| maxsum_push(s, row[j]))
        })
        .collect();
    block_reduce_as_kernel(per_thread, MaxSum::EMPTY, maxsum_merge)
}

/// The elements of a row of `n` that each of `threads` threads visits in fk_row_read, in its order.
pub(crate) fn thread_elements(
    n: usize,
    threads: usize,
    vec: usize,
    head: usize,
) -> Vec<Vec<usize>> {
    assert!(threads % 32 == 0 && (32..=1024).contains(&threads) && vec > 0);
    let head = head.min(n);
    let nvec = (n - head) / vec;
    let tail0 = head + nvec * vec;
    (0..threads)
        .map(|t| {
            let mut js: Vec<usize> = (t..head).step_by(threads).collect();
            for v in (t..nvec).step_by(threads) {
                js.extend(head + v * vec..head + (v + 1) * vec);
            }
            js.extend((tail0 + t..n).step_by(threads));
            js
        })
        .collect()
}

/// fk_block_reduce on the host: an xor-shuffle tree in every warp, then warp 0 over the warps' results
/// (lanes past the warp count hold `identity`); returns what lane 0 ends with.
pub(crate) fn block_reduce_as_kernel<V: Copy>(
    mut v: Vec<V>,
    identity: V,
    op: impl Fn(V, V) -> V,
) -> V {
    let warp_tree = |lanes: &mut [V]| {
        for o in [16, 8, 4, 2, 1] {
            let before = lanes.to_vec();
            for (l, x) in lanes.iter_mut().enumerate() {
                *x = op(before[l], before[l ^ o]);
            }
        }
    };
    for w in v.chunks_mut(32) {
        warp_tree(w);
    }
    let nwarps = v.len() / 32;
    let mut lanes: Vec<V> = (0..32)
        .map(|l| if l < nwarps { v[l * 32] } else { identity })
        .collect();
    warp_tree(&mut lanes);
    lanes[0]
}

#[cfg(test)]
mod maxsum_tests {
    use super::*;
    use crate::testing::Rng;

    /// ln Σ exp in f64, or None when the row has a NaN (the kernel must then give NaN).
    fn lse_f64(row: &[f32]) -> Option<f64> {
        if row.iter().any(|x| x.is_nan()) {
            return None;
        }
        let m = row
            .iter()
            .map(|&x| x as f64)
            .fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            return Some(f64::NEG_INFINITY);
        }
        Some(m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln())
    }

    #[test]
    fn merge_and_push_special_values() {
        let nan = f32::NAN;
        let ninf = f32::NEG_INFINITY;
        let e = MaxSum::EMPTY;
        // A masked logit leaves a state unchanged; the empty state is the identity of the merge.
        assert_eq!(maxsum_push(e, ninf), e);
        let one = maxsum_push(e, 0.0);
        assert_eq!(one, MaxSum { m: 0.0, s: 1.0 });
        assert_eq!(maxsum_merge(e, one), one);
        assert_eq!(maxsum_merge(one, e), one);
        // A state that saw only NaN is not empty, and no merge loses it.
        let only_nan = maxsum_push(e, nan);
        assert_eq!(only_nan.m, ninf);
        assert!(only_nan.s.is_nan());
        for other in [
            e,
            one,
            only_nan,
            maxsum_push(e, ninf),
            MaxSum { m: 80.0, s: 3.0 },
        ] {
            assert!(maxsum_merge(only_nan, other).s.is_nan(), "{other:?}");
            assert!(maxsum_merge(other, only_nan).s.is_nan(), "{other:?}");
        }
        // NaN after a finite value, and a finite value after NaN.
        assert!(maxsum_push(one, nan).s.is_nan());
        assert!(maxsum_push(only_nan, 5.0).s.is_nan());
    }

    /// Rows with NaN runs, masked (−inf) runs, outliers, at sizes and offsets that put whole vectors and
    /// whole threads on NaN or −inf: the kernel's partition and reduction order must give NaN exactly
    /// when the row has a NaN, the empty state for an all-masked row, and ln Σ exp to fp32 accuracy
    /// otherwise.
    #[test]
    fn block_reduction_keeps_nan_and_masking() {
        let seed = crate::testing::seed_for("block_reduction_keeps_nan_and_masking");
        let mut rng = Rng::new(seed);
        let mut cases = 0;
        for &n in &[1usize, 2, 7, 8, 9, 31, 64, 65, 1003, 4101] {
            for &threads in &[64usize, 128, 512] {
                for &(vec, head) in &[(4usize, 0usize), (8, 0), (8, 3), (4, 1)] {
                    for pattern in 0..6 {
                        let mut row: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * 3.0).collect();
                        let a = rng.below(n as u64) as usize;
                        let b = a + rng.below((n - a) as u64 + 1) as usize;
                        match pattern {
                            0 => {}
                            1 => row[a] = f32::NAN,
                            2 => row[a..b].fill(f32::NAN),
                            3 => row[a..b].fill(f32::NEG_INFINITY),
                            4 => {
                                row.fill(f32::NEG_INFINITY);
                                row[a] = f32::NAN;
                            }
                            _ => row.fill(f32::NEG_INFINITY),
                        }
                        let got = row_maxsum_as_kernel(&row, threads, vec, head);
                        let lse = got.m + got.s.ln();
                        let ctx = format!("seed {seed:#x} n {n} threads {threads} vec {vec} head {head} pattern {pattern} [{a}, {b})");
                        match lse_f64(&row) {
                            None => assert!(lse.is_nan(), "{ctx}: NaN lost, got {got:?}"),
                            Some(r) if r == f64::NEG_INFINITY => {
                                assert_eq!(got, MaxSum::EMPTY, "{ctx}")
                            }
                            Some(r) => {
                                let err = (lse as f64 - r).abs() / r.abs().max(1.0);
                                assert!(err < 1e-5, "{ctx}: lse {lse} vs {r} (err {err:e})");
                            }
                        }
                        cases += 1;
                    }
                }
            }
        }
        eprintln!("block_reduction_keeps_nan_and_masking: {cases} rows, seed {seed:#x}");
    }
}
