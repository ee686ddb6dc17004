//! Conformance of the constructs the emulator models — mma.sync fragments, ldmatrix, cp.async, warp
//! collectives — against expectations written in Rust from the PTX ISA and the CUDA programming guide
//! (fusekit::selftest::reference), on the emulator always and on a GPU when one is present (where they
//! check the hardware, and so whether the emulator's layouts are the hardware's).

use fusekit::selftest::{
    cp_async_pipeline, ldmatrix, mma, reference, warp, LdMatrix, MmaOp, WarpCase, WarpOp,
};
use fusekit::testing::{seed_for, Rng};
use fusekit::Backend;

/// The (lane, register, element) -> (row, col) maps cover each tile exactly once.
#[test]
fn fragment_maps_are_bijections_onto_the_tiles() {
    for op in MmaOp::ALL {
        let (k, per_reg) = (op.k(), 32 / op.bits() as usize);
        let mut a = vec![0u32; 16 * k];
        let mut b = vec![0u32; k * 8];
        let mut c = [0u32; 128];
        for lane in 0..32 {
            for reg in 0..4 {
                for i in 0..per_reg {
                    let (r, col) = reference::a_coord(op, lane, reg, i);
                    a[r * k + col] += 1;
                }
                let (r, col) = reference::c_coord(lane, reg);
                c[r * 8 + col] += 1;
            }
            for reg in 0..2 {
                for i in 0..per_reg {
                    let (kk, n) = reference::b_coord(op, lane, reg, i);
                    b[kk * 8 + n] += 1;
                }
            }
        }
        assert!(a.iter().all(|&x| x == 1), "{op:?}: A");
        assert!(b.iter().all(|&x| x == 1), "{op:?}: B");
        assert!(c.iter().all(|&x| x == 1), "{op:?}: C");
    }
}

fn skip_op<B: Backend>(dev: &B, op: MmaOp) -> bool {
    let skip = dev.props().compute_capability < op.min_capability();
    if skip {
        println!(
            "{}: {op:?} needs compute capability {:?}",
            dev.kind(),
            op.min_capability()
        );
    }
    skip
}

#[test]
fn mma_layouts_select_the_isa_elements() {
    fusekit::on_every_backend!("mma_layouts_select_the_isa_elements", |dev| {
        mma_layouts_on(dev)
    });
}

/// A holds a distinct small value per element, B is a 0/1 matrix selecting one column of A per output
/// column (several selections): D must be exactly those columns of A (plus C's tags), which holds only
/// if the A, B and C/D layouts of the kernel's registers are the ISA's.
fn mma_layouts_on<B: Backend>(dev: &B) {
    for op in MmaOp::ALL {
        if skip_op(dev, op) {
            continue;
        }
        let k = op.k();
        // Values every input type holds exactly: small signed integers (s4: -8..7).
        let range = if op == MmaOp::S4M16N8K64 { 15 } else { 31 };
        let a: Vec<f64> = (0..16 * k)
            .map(|e| ((e * 7 + e / k) % range) as f64 - (range / 2) as f64)
            .collect();
        for shift in [0usize, 1, 5, k / 2 + 3] {
            let mut bm = vec![0.0; k * 8];
            for n in 0..8 {
                bm[((n * 3 + shift) % k) * 8 + n] = 1.0;
            }
            let c: Vec<f64> = (0..128).map(|e| (e % 11) as f64).collect();
            let f = reference::pack(op, &a, &bm, &c);
            let d = mma(dev, op, &f).unwrap();
            let got = reference::unpack_d(op, &d);
            let want: Vec<f64> = (0..128)
                .map(|e| a[(e / 8) * k + (e % 8 * 3 + shift) % k] + c[e])
                .collect();
            assert_eq!(got, want, "{} {op:?} shift {shift}", dev.kind());
        }
    }
}

#[test]
fn mma_tiny_gemm_matches_f64() {
    fusekit::on_every_backend!("mma_tiny_gemm_matches_f64", |dev| mma_gemm_on(dev));
}

fn mma_gemm_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("mma_tiny_gemm_matches_f64"));
    for op in MmaOp::ALL {
        if skip_op(dev, op) {
            continue;
        }
        let k = op.k();
        for _ in 0..4 {
            let sample = |rng: &mut Rng, n: usize| -> Vec<f64> {
                (0..n)
                    .map(|_| match op {
                        MmaOp::S8M16N8K32 => rng.below(256) as f64 - 128.0,
                        MmaOp::S4M16N8K64 => rng.below(16) as f64 - 8.0,
                        MmaOp::E4m3M16N8K32 => rng.normal() * 4.0,
                        _ => rng.normal() * 2.0,
                    })
                    .collect()
            };
            let a = sample(&mut rng, 16 * k);
            let b = sample(&mut rng, k * 8);
            let c: Vec<f64> = if op.is_integer() {
                (0..128).map(|_| rng.below(2001) as f64 - 1000.0).collect()
            } else {
                (0..128).map(|_| rng.normal()).collect()
            };
            let f = reference::pack(op, &a, &b, &c);
            let got = reference::unpack_d(op, &mma(dev, op, &f).unwrap());
            let want = reference::gemm(op, &a, &b, &c);
            for e in 0..128 {
                let tol = if op.is_integer() {
                    0.0
                } else {
                    // f32 accumulation of K exact products in some order.
                    let scale: f64 = (0..k)
                        .map(|kk| (a[(e / 8) * k + kk] * b[kk * 8 + e % 8]).abs())
                        .sum();
                    (scale + c[e].abs()) * k as f64 * 2f64.powi(-23)
                };
                assert!(
                    (got[e] - want[e]).abs() <= tol,
                    "{} {op:?} D[{}][{}] = {} vs {} (tol {tol:e})",
                    dev.kind(),
                    e / 8,
                    e % 8,
                    got[e],
                    want[e]
                );
            }
        }
    }
}

#[test]
fn ldmatrix_returns_the_isa_fragments() {
    fusekit::on_every_backend!("ldmatrix_returns_the_isa_fragments", |dev| ldmatrix_on(dev));
}

fn ldmatrix_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("ldmatrix_returns_the_isa_fragments"));
    for v in LdMatrix::ALL {
        for _ in 0..3 {
            let tile: Vec<u16> = (0..256).map(|_| rng.next_u64() as u16).collect();
            // Rows in a random order: the address each lane gives decides what each matrix holds.
            let mut rows: Vec<u32> = (0..32).collect();
            for i in (1..32).rev() {
                rows.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let got = ldmatrix(dev, v, &tile, &rows).unwrap();
            assert_eq!(
                got,
                reference::ldmatrix(v, &tile, &rows),
                "{} {v:?}",
                dev.kind()
            );
        }
    }
}

#[test]
fn warp_collectives_follow_the_programming_guide() {
    fusekit::on_every_backend!("warp_collectives_follow_the_programming_guide", |dev| {
        warp_on(dev)
    });
}

fn warp_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("warp_collectives_follow_the_programming_guide"));
    let values: Vec<u32> = (0..32).map(|_| rng.next_u64() as u32).collect();
    let mut cases = Vec::new();
    for op in [
        WarpOp::ShflIdx,
        WarpOp::ShflUp,
        WarpOp::ShflDown,
        WarpOp::ShflXor,
    ] {
        for width in [32, 16, 8, 4, 2, 1] {
            for arg in [0, 1, 3, 7, 13, 31] {
                if op == WarpOp::ShflIdx || arg < width.max(2) || op == WarpOp::ShflXor {
                    cases.push(WarpCase {
                        op,
                        arg,
                        width,
                        mask: u32::MAX,
                    });
                }
            }
        }
    }
    for op in [
        WarpOp::Ballot,
        WarpOp::Any,
        WarpOp::All,
        WarpOp::MatchAny,
        WarpOp::ReduceAdd,
        WarpOp::ReduceMin,
        WarpOp::ReduceMax,
    ] {
        for mask in [u32::MAX, 0x0000_ffff, 0xaaaa_aaaa, 0x8000_0001] {
            cases.push(WarpCase {
                op,
                arg: 0,
                width: 32,
                mask,
            });
        }
    }
    // Partial masks for shuffles whose sources stay inside them.
    cases.push(WarpCase {
        op: WarpOp::ShflXor,
        arg: 1,
        width: 32,
        mask: 0x0000_ffff,
    });
    cases.push(WarpCase {
        op: WarpOp::ShflIdx,
        arg: 3,
        width: 8,
        mask: 0xff00_ff00,
    });
    let got = warp(dev, &values, &cases).unwrap();
    for (i, case) in cases.iter().enumerate() {
        assert_eq!(
            &got[i * 32..(i + 1) * 32],
            &reference::warp(&values, case)[..],
            "{} {case:?}",
            dev.kind()
        );
    }
    // All-equal and all-set inputs for the votes.
    let ones = [1u32; 32];
    for op in [WarpOp::Any, WarpOp::All, WarpOp::MatchAny] {
        let case = WarpCase {
            op,
            arg: 0,
            width: 32,
            mask: u32::MAX,
        };
        assert_eq!(
            warp(dev, &ones, &[case]).unwrap(),
            reference::warp(&ones, &case).to_vec()
        );
    }
}

#[test]
fn cp_async_pipeline_delivers_every_element() {
    fusekit::on_every_backend!("cp_async_pipeline_delivers_every_element", |dev| {
        for n in [1usize, 3, 127, 128, 129, 1000, 4096 + 3] {
            let src: Vec<u32> = (0..n as u32).map(|i| i.wrapping_mul(2654435761)).collect();
            assert_eq!(
                cp_async_pipeline(dev, &src).unwrap(),
                src,
                "{} n = {n}",
                dev.kind()
            );
        }
    });
}
