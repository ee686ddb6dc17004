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
        assert!(reference::maps_are_bijections(op), "{op:?}");
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

#[test]
fn block_indices_barriers_with_predicates_and_atomics() {
    fusekit::on_every_backend!(
        "block_indices_barriers_with_predicates_and_atomics",
        |dev| {
            for pred_mod in [1u32, 2, 3, 64, 1000] {
                let mut got = fusekit::selftest::block_builtins(dev, pred_mod).unwrap();
                let want = reference::block_builtins(pred_mod);
                // The CAS winner is whichever thread got there first: only that there was one is checked.
                assert_ne!(got.global[2], 0, "{}: no CAS winner", dev.kind());
                got.global[2] = 0;
                assert_eq!(got, want, "{} pred_mod {pred_mod}", dev.kind());
            }
        }
    );
}

#[test]
fn bf16_and_f16_conversions_round_like_the_device() {
    fusekit::on_every_backend!("bf16_and_f16_conversions_round_like_the_device", |dev| {
        let mut rng = Rng::new(seed_for("bf16_and_f16_conversions"));
        // Ties (both parities), subnormals of both types, overflow edges, infinities, NaN, signed zeros.
        let mut x: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            65504.0,
            65519.99,
            65520.0,
            -65520.0,
            1e-8,
            5.96e-8,
            2.98e-8,
            2.99e-8,
            6.1e-5,
            6.0e-5,
            1e-40,
            -1e-45,
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            1.0 + 1.0 / 1024.0,
            1.0 + 3.0 / 1024.0,
            3.4e38,
        ];
        x.extend((0..4000).map(|_| f32::from_bits(rng.next_u64() as u32)));
        x.extend((0..2000).map(|_| (rng.normal() * 1e3) as f32));
        let (b, h, back) = fusekit::selftest::convert(dev, &x).unwrap();
        for (i, &v) in x.iter().enumerate() {
            let (wb, wh) = (half::bf16::from_f32(v), half::f16::from_f32(v));
            if v.is_nan() {
                assert!(
                    half::bf16::from_bits(b[i]).is_nan() && half::f16::from_bits(h[i]).is_nan()
                );
                assert!(back[2 * i].is_nan() && back[2 * i + 1].is_nan());
                continue;
            }
            assert_eq!(
                b[i],
                wb.to_bits(),
                "{}: bf16 of {v:e} ({:#x})",
                dev.kind(),
                v.to_bits()
            );
            assert_eq!(
                h[i],
                wh.to_bits(),
                "{}: f16 of {v:e} ({:#x})",
                dev.kind(),
                v.to_bits()
            );
            assert_eq!(back[2 * i].to_bits(), wb.to_f32().to_bits());
            assert_eq!(back[2 * i + 1].to_bits(), wh.to_f32().to_bits());
        }
    });
}
