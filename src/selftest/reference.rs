//! What the conformance kernels must return, written here in Rust from the PTX ISA (fragment layouts of
//! `mma.m16n8k16/k32/k64`, `ldmatrix`) and the CUDA C++ programming guide (shuffle, vote, match and reduce
//! semantics), independently of the emulator's C++ (`kernels/emu/`): the emulator is checked against
//! these, and so is a GPU.
//!
//! Notation of the ISA: `g = lane >> 2` (groupID), `t = lane % 4` (threadID_in_group); element 0 of a
//! packed register sits in its low bits.

use half::{bf16, f16};

use super::{BlockBuiltins, Fragments, LdMatrix, MmaOp, WarpCase, WarpOp, BLOCK_DIM, BLOCK_GRID};

/// (row, col) of element `i` (0-based, low bits first) of A register `reg` held by `lane`: the ISA's
/// "row = groupID for a_i where ...; col = threadID_in_group · E + (i mod E) (+ K/2 for the upper
/// registers)".
///
/// ```
/// use fusekit::selftest::{reference::a_coord, MmaOp};
/// // m16n8k16: lane 5 (g = 1, t = 1) holds a0 at (1, 2) and a7 at (9, 11).
/// assert_eq!(a_coord(MmaOp::Bf16M16N8K16, 5, 0, 0), (1, 2));
/// assert_eq!(a_coord(MmaOp::Bf16M16N8K16, 5, 3, 1), (9, 11));
/// ```
pub fn a_coord(op: MmaOp, lane: usize, reg: usize, i: usize) -> (usize, usize) {
    let (g, t) = (lane >> 2, lane & 3);
    let per_reg = 32 / op.bits() as usize; // elements per register: 2, 4 or 8
    let row = g + if reg == 1 || reg == 3 { 8 } else { 0 };
    let col = t * per_reg + i + if reg >= 2 { op.k() / 2 } else { 0 };
    (row, col)
}

/// (k, n) of element `i` of B register `reg` held by `lane`: "row = threadID_in_group · E + (i mod E)
/// (+ K/2 for the second register); col = groupID".
///
/// ```
/// use fusekit::selftest::{reference::b_coord, MmaOp};
/// // m16n8k32 (s8): lane 6 (g = 1, t = 2) holds b5 (register 1, element 1) at (16 + 9, 1).
/// assert_eq!(b_coord(MmaOp::S8M16N8K32, 6, 1, 1), (25, 1));
/// ```
pub fn b_coord(op: MmaOp, lane: usize, reg: usize, i: usize) -> (usize, usize) {
    let (g, t) = (lane >> 2, lane & 3);
    let per_reg = 32 / op.bits() as usize;
    (t * per_reg + i + if reg == 1 { op.k() / 2 } else { 0 }, g)
}

/// (row, col) of accumulator `i` (0..4) of `lane`: "row = groupID for c0, c1, groupID + 8 for c2, c3;
/// col = threadID_in_group · 2 + (i & 1)".
///
/// ```
/// assert_eq!(fusekit::selftest::reference::c_coord(31, 3), (15, 7));
/// ```
pub fn c_coord(lane: usize, i: usize) -> (usize, usize) {
    let (g, t) = (lane >> 2, lane & 3);
    (g + if i >= 2 { 8 } else { 0 }, 2 * t + (i & 1))
}

/// Whether the A, B and C maps of `op` cover their tiles exactly once.
///
/// ```
/// assert!(fusekit::selftest::reference::maps_are_bijections(fusekit::selftest::MmaOp::S4M16N8K64));
/// ```
pub fn maps_are_bijections(op: MmaOp) -> bool {
    let (k, per_reg) = (op.k(), 32 / op.bits() as usize);
    let (mut a, mut b, mut c) = (vec![0u32; 16 * k], vec![0u32; k * 8], [0u32; 128]);
    for lane in 0..32 {
        for reg in 0..4 {
            for i in 0..per_reg {
                let (r, col) = a_coord(op, lane, reg, i);
                a[r * k + col] += 1;
            }
            let (r, col) = c_coord(lane, reg);
            c[r * 8 + col] += 1;
        }
        for reg in 0..2 {
            for i in 0..per_reg {
                let (kk, n) = b_coord(op, lane, reg, i);
                b[kk * 8 + n] += 1;
            }
        }
    }
    a.iter().chain(&b).chain(&c).all(|&x| x == 1)
}

/// Encodes a value as the op's input type (round to nearest; integers saturate to the type's range).
fn encode(op: MmaOp, x: f64) -> u32 {
    match op {
        MmaOp::Bf16M16N8K16 => bf16::from_f64(x).to_bits() as u32,
        MmaOp::F16M16N8K16 => f16::from_f64(x).to_bits() as u32,
        MmaOp::S8M16N8K32 => (x.round().clamp(-128.0, 127.0) as i8) as u8 as u32,
        MmaOp::S4M16N8K64 => (x.round().clamp(-8.0, 7.0) as i8 as u8 & 0xf) as u32,
        MmaOp::E4m3M16N8K32 => e4m3_encode(x) as u32,
    }
}

/// The value an input element holds.
fn decode(op: MmaOp, v: u32) -> f64 {
    match op {
        MmaOp::Bf16M16N8K16 => bf16::from_bits(v as u16).to_f64(),
        MmaOp::F16M16N8K16 => f16::from_bits(v as u16).to_f64(),
        MmaOp::S8M16N8K32 => v as u8 as i8 as f64,
        MmaOp::S4M16N8K64 => (((v & 0xf) as u8) << 4) as i8 as f64 / 16.0,
        MmaOp::E4m3M16N8K32 => e4m3_decode(v as u8),
    }
}

/// e4m3 (OCP FP8: 4 exponent bits, bias 7, 3 mantissa bits, no infinity, S.1111.111 NaN) to f64.
///
/// ```
/// use fusekit::selftest::reference::e4m3_decode;
/// assert_eq!(e4m3_decode(0x38), 1.0);
/// assert_eq!(e4m3_decode(0x7e), 448.0);
/// assert_eq!(e4m3_decode(0x01), 2f64.powi(-9));
/// assert!(e4m3_decode(0x7f).is_nan());
/// ```
pub fn e4m3_decode(v: u8) -> f64 {
    let s = if v & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((v >> 3) & 0xf) as i32;
    let m = (v & 7) as f64;
    if e == 15 && v & 7 == 7 {
        return f64::NAN;
    }
    if e == 0 {
        return s * m * 2f64.powi(-9);
    }
    s * (1.0 + m / 8.0) * 2f64.powi(e - 7)
}

/// The e4m3 code nearest to `x` (ties to even; saturating at ±448).
///
/// ```
/// use fusekit::selftest::reference::{e4m3_decode, e4m3_encode};
/// assert_eq!(e4m3_decode(e4m3_encode(3.1)), 3.0);
/// assert_eq!(e4m3_decode(e4m3_encode(1e6)), 448.0);
/// ```
pub fn e4m3_encode(x: f64) -> u8 {
    let mut best = 0u8;
    let mut best_err = f64::INFINITY;
    for code in 0u8..=255 {
        let v = e4m3_decode(code);
        if v.is_nan() {
            continue;
        }
        let err = (v - x.clamp(-448.0, 448.0)).abs();
        if err < best_err || (err == best_err && code & 1 == 0) {
            best = code;
            best_err = err;
        }
    }
    best
}

/// Packs A `[16][K]`, B `[K][8]` (row-major, values the op's type can hold) and C `[16][8]` into the
/// per-lane registers of `op`, by [`a_coord`], [`b_coord`], [`c_coord`].
///
/// ```
/// use fusekit::selftest::{reference, MmaOp};
/// let f = reference::pack(MmaOp::S8M16N8K32, &[1.0; 16 * 32], &[2.0; 32 * 8], &[0.0; 128]);
/// assert_eq!(f.a[0], 0x0101_0101);
/// ```
pub fn pack(op: MmaOp, a: &[f64], b: &[f64], c: &[f64]) -> Fragments {
    let (k, bits) = (op.k(), op.bits() as usize);
    let per_reg = 32 / bits;
    let mut f = Fragments {
        a: vec![0; 128],
        b: vec![0; 64],
        c: vec![0; 128],
    };
    for lane in 0..32 {
        for reg in 0..4 {
            for i in 0..per_reg {
                let (r, col) = a_coord(op, lane, reg, i);
                f.a[lane * 4 + reg] |= encode(op, a[r * k + col]) << (i * bits);
            }
        }
        for reg in 0..2 {
            for i in 0..per_reg {
                let (kk, n) = b_coord(op, lane, reg, i);
                f.b[lane * 2 + reg] |= encode(op, b[kk * 8 + n]) << (i * bits);
            }
        }
        for i in 0..4 {
            let (r, col) = c_coord(lane, i);
            let x = c[r * 8 + col];
            f.c[lane * 4 + i] = if op.is_integer() {
                x as i32 as u32
            } else {
                (x as f32).to_bits()
            };
        }
    }
    f
}

/// D `[16][8]` (row-major) from the per-lane result registers of `op`.
///
/// ```
/// use fusekit::selftest::{reference, MmaOp};
/// let d: Vec<u32> = (0..128).map(|i| (i as f32).to_bits()).collect();
/// assert_eq!(reference::unpack_d(MmaOp::Bf16M16N8K16, &d)[0], 0.0);
/// ```
pub fn unpack_d(op: MmaOp, d: &[u32]) -> Vec<f64> {
    let mut out = vec![f64::NAN; 16 * 8];
    for lane in 0..32 {
        for i in 0..4 {
            let (r, c) = c_coord(lane, i);
            let v = d[lane * 4 + i];
            out[r * 8 + c] = if op.is_integer() {
                v as i32 as f64
            } else {
                f32::from_bits(v) as f64
            };
        }
    }
    out
}

/// D = A·B + C in f64 over the values the op's inputs hold (A, B rounded to its type first), rounded to
/// f32 (or wrapped to s32) as the accumulator stores it.
///
/// ```
/// use fusekit::selftest::{reference, MmaOp};
/// let d = reference::gemm(MmaOp::S4M16N8K64, &[1.0; 16 * 64], &[-1.0; 64 * 8], &[5.0; 128]);
/// assert_eq!(d[0], -59.0);
/// ```
pub fn gemm(op: MmaOp, a: &[f64], b: &[f64], c: &[f64]) -> Vec<f64> {
    let k = op.k();
    let q = |x: f64| decode(op, encode(op, x));
    (0..16 * 8)
        .map(|e| {
            let (r, n) = (e / 8, e % 8);
            let acc: f64 = (0..k).map(|kk| q(a[r * k + kk]) * q(b[kk * 8 + n])).sum();
            if op.is_integer() {
                (acc as i64 + c[e] as i64) as i32 as f64
            } else {
                (acc + c[e] as f32 as f64) as f32 as f64
            }
        })
        .collect()
}

/// What `ldmatrix` returns: lane `8j + r` supplies row `row_of_lane[8j + r]` of the tile as row r of
/// matrix j; lane l receives, in register j, elements (l/4, 2(l%4)) and (l/4, 2(l%4)+1) of matrix j (the
/// lower column in the low half), or of its transpose with `.trans`. Registers past the count are 0.
///
/// ```
/// use fusekit::selftest::{reference, LdMatrix};
/// let tile: Vec<u16> = (0..256).collect();
/// let rows: Vec<u32> = (0..32).collect();
/// let r = reference::ldmatrix(LdMatrix::X1, &tile, &rows);
/// assert_eq!(r[4 * 5], 10 | 11 << 16); // lane 5: row 1, columns 2 and 3 -> elements 10, 11
/// ```
pub fn ldmatrix(v: LdMatrix, tile: &[u16], row_of_lane: &[u32]) -> Vec<u32> {
    let m = |j: usize, r: usize, c: usize| -> u32 {
        tile[row_of_lane[8 * j + r] as usize * 8 + c] as u32
    };
    let mut out = vec![0u32; 128];
    for l in 0..32 {
        for j in 0..v.count() {
            let (a, c) = (l / 4, 2 * (l % 4));
            let (lo, hi) = if v.trans() {
                (m(j, c, a), m(j, c + 1, a))
            } else {
                (m(j, a, c), m(j, a, c + 1))
            };
            out[l * 4 + j] = lo | hi << 16;
        }
    }
    out
}

/// What the lanes of a [`WarpCase`] get (0xffffffff for lanes outside its mask), by the programming
/// guide: `__shfl_sync` reads lane `srcLane mod width` of the caller's width-segment; `__shfl_up_sync`
/// lane − delta and `__shfl_down_sync` lane + delta, keeping their own value past the segment's edge;
/// `__shfl_xor_sync` lane ^ laneMask, keeping its own value when that lies in a later segment.
///
/// ```
/// use fusekit::selftest::{reference, WarpCase, WarpOp};
/// let v: [u32; 32] = std::array::from_fn(|l| l as u32);
/// let r = reference::warp(&v, &WarpCase { op: WarpOp::ShflDown, arg: 3, width: 16, mask: u32::MAX });
/// assert_eq!((r[0], r[13], r[16]), (3, 13, 19));
/// ```
pub fn warp(values: &[u32], case: &WarpCase) -> [u32; 32] {
    let mut out = [u32::MAX; 32];
    let w = case.width.clamp(1, 32) as usize;
    let lanes: Vec<usize> = (0..32).filter(|l| (case.mask >> l) & 1 == 1).collect();
    let pred = |l: usize| values[l] & 1 == 1;
    for &l in &lanes {
        let seg = l & !(w - 1);
        out[l] = match case.op {
            WarpOp::ShflIdx => values[seg + (case.arg as usize & (w - 1))],
            WarpOp::ShflUp => {
                let d = case.arg as usize;
                if l - seg >= d {
                    values[l - d]
                } else {
                    values[l]
                }
            }
            WarpOp::ShflDown => {
                let d = case.arg as usize;
                if l - seg + d < w {
                    values[l + d]
                } else {
                    values[l]
                }
            }
            WarpOp::ShflXor => {
                let j = l ^ (case.arg as usize & 31);
                if j < seg + w {
                    values[j]
                } else {
                    values[l]
                }
            }
            WarpOp::Ballot => lanes.iter().filter(|&&k| pred(k)).map(|&k| 1u32 << k).sum(),
            WarpOp::Any => lanes.iter().any(|&k| pred(k)) as u32,
            WarpOp::All => lanes.iter().all(|&k| pred(k)) as u32,
            WarpOp::MatchAny => lanes
                .iter()
                .filter(|&&k| values[k] & 7 == values[l] & 7)
                .map(|&k| 1u32 << k)
                .sum(),
            WarpOp::ReduceAdd => lanes.iter().fold(0u32, |a, &k| a.wrapping_add(values[k])),
            WarpOp::ReduceMin => lanes.iter().map(|&k| values[k] as i32).min().unwrap() as u32,
            WarpOp::ReduceMax => lanes.iter().map(|&k| values[k] as i32).max().unwrap() as u32,
        };
    }
    out
}

/// What [`super::block_builtins`] must return: CUDA's x-fastest linear orders of blocks and threads,
/// block-wide counts of the predicate, and the atomics' totals.
///
/// ```
/// let r = fusekit::selftest::reference::block_builtins(1);
/// assert!(r.ids.iter().all(|t| t[2] == 64 && t[3] == 3)); // every thread: count 64, and = or = 1
/// ```
pub fn block_builtins(pred_mod: u32) -> BlockBuiltins {
    let (g, b) = (BLOCK_GRID, BLOCK_DIM);
    let (nb, nt) = (g.0 * g.1 * g.2, b.0 * b.1 * b.2);
    let mut ids = Vec::new();
    let mut shared = Vec::new();
    for block in 0..nb {
        let preds: Vec<bool> = (0..nt).map(|t| (block * nt + t) % pred_mod == 0).collect();
        let count = preds.iter().filter(|&&p| p).count() as u32;
        let (all, any) = (preds.iter().all(|&p| p), preds.iter().any(|&p| p));
        for t in 0..nt {
            ids.push([block, t, count, all as u32 | (any as u32) << 1]);
        }
        let max_gid = block * nt + nt - 1;
        shared.push(nt * (nt + 1) / 2 + 1_000_000 * (max_gid % 1000));
    }
    let total = nb * nt;
    BlockBuiltins {
        ids,
        shared,
        global: [total, total - 1, 0, 1],
        float_sum: 0.5 * total as f32,
    }
}
