//! Conformance kernels (`kernels/selftest/`): the constructs the SIMT emulator models — `mma.sync`,
//! `ldmatrix`, `cp.async`, warp shuffles, votes, match and reduce — run on raw inputs, so that the same
//! expectations ([`reference`](mod@reference), written from the PTX ISA and the CUDA programming guide) check the
//! emulator on every `cargo test` and the hardware whenever a GPU runs the suite. If the emulator's
//! fragment layouts were wrong, a kernel built on them and the emulator would agree on a wrong answer;
//! these checks are what stop that, and the GPU run is what makes them the hardware's answer.
//!
//! Also: [`planted`], kernels with one deliberate bug each, which the emulator's checkers must report
//! (emulator only).
//!
//! ```
//! use fusekit::selftest::{reference, warp, WarpCase, WarpOp};
//! let dev = fusekit::emu::Emulator::new().unwrap();
//! let values: [u32; 32] = std::array::from_fn(|l| 100 + l as u32);
//! let case = WarpCase { op: WarpOp::ShflXor, arg: 1, width: 32, mask: u32::MAX };
//! let got = warp(&dev, &values, &[case]).unwrap();
//! assert_eq!(got, reference::warp(&values, &case).to_vec());
//! ```

pub mod reference;

use cudarc::driver::LaunchConfig;

use crate::backend::private::{Addr, AddrMut};
use crate::device::Family;
use crate::error::{Error, Result};
use crate::launch::{grid, launch_kernel};
use crate::params::*;
use crate::Backend;

/// The `mma.sync` shapes and types the crate wraps (`kernels/include/fk_mma.cuh`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MmaOp {
    /// m16n8k16, bf16 × bf16 + f32.
    Bf16M16N8K16,
    /// m16n8k16, f16 × f16 + f32.
    F16M16N8K16,
    /// m16n8k32, s8 × s8 + s32.
    S8M16N8K32,
    /// m16n8k64, s4 × s4 + s32.
    S4M16N8K64,
    /// m16n8k32, e4m3 × e4m3 + f32 (compute capability 8.9 and newer).
    E4m3M16N8K32,
}

impl MmaOp {
    /// Every op.
    pub const ALL: [MmaOp; 5] = [
        MmaOp::Bf16M16N8K16,
        MmaOp::F16M16N8K16,
        MmaOp::S8M16N8K32,
        MmaOp::S4M16N8K64,
        MmaOp::E4m3M16N8K32,
    ];

    /// The reduction depth K of the tile (M = 16, N = 8).
    ///
    /// ```
    /// assert_eq!(fusekit::selftest::MmaOp::S4M16N8K64.k(), 64);
    /// ```
    pub fn k(self) -> usize {
        match self {
            MmaOp::Bf16M16N8K16 | MmaOp::F16M16N8K16 => 16,
            MmaOp::S8M16N8K32 | MmaOp::E4m3M16N8K32 => 32,
            MmaOp::S4M16N8K64 => 64,
        }
    }

    /// Bits per input element.
    ///
    /// ```
    /// assert_eq!(fusekit::selftest::MmaOp::E4m3M16N8K32.bits(), 8);
    /// ```
    pub fn bits(self) -> u32 {
        // A [16][K] in 4 registers per lane: 16·K·bits = 32 lanes · 4 · 32 bits.
        (256 / self.k()) as u32
    }

    /// Integer accumulators (s32) rather than f32.
    ///
    /// ```
    /// assert!(fusekit::selftest::MmaOp::S8M16N8K32.is_integer());
    /// ```
    pub fn is_integer(self) -> bool {
        matches!(self, MmaOp::S8M16N8K32 | MmaOp::S4M16N8K64)
    }

    /// The oldest compute capability with the instruction.
    ///
    /// ```
    /// assert_eq!(fusekit::selftest::MmaOp::E4m3M16N8K32.min_capability(), (8, 9));
    /// ```
    pub fn min_capability(self) -> (u32, u32) {
        match self {
            MmaOp::E4m3M16N8K32 => (8, 9),
            _ => (8, 0),
        }
    }

    fn code(self) -> u32 {
        match self {
            MmaOp::Bf16M16N8K16 => FK_SELFTEST_MMA_M16N8K16_BF16,
            MmaOp::F16M16N8K16 => FK_SELFTEST_MMA_M16N8K16_F16,
            MmaOp::S8M16N8K32 => FK_SELFTEST_MMA_M16N8K32_S8,
            MmaOp::S4M16N8K64 => FK_SELFTEST_MMA_M16N8K64_S4,
            MmaOp::E4m3M16N8K32 => FK_SELFTEST_MMA_M16N8K32_E4M3,
        }
    }
}

/// Per-lane registers of one `mma.sync`: A `[32][4]`, B `[32][2]`, C `[32][4]` (f32 as bits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fragments {
    /// A: 4 registers per lane.
    pub a: Vec<u32>,
    /// B: 2 registers per lane.
    pub b: Vec<u32>,
    /// C: 4 accumulators per lane.
    pub c: Vec<u32>,
}

/// Runs one `mma.sync` of `op` on a warp with the given registers; returns D `[32][4]` (lane-major).
///
/// ```
/// use fusekit::selftest::{mma, reference, MmaOp};
/// let dev = fusekit::emu::Emulator::new().unwrap();
/// let op = MmaOp::Bf16M16N8K16;
/// let a: Vec<f64> = (0..16 * 16).map(|i| (i % 7) as f64).collect();
/// let b: Vec<f64> = (0..16 * 8).map(|i| (i % 5) as f64 - 2.0).collect();
/// let f = reference::pack(op, &a, &b, &[0.0; 128]);
/// let d = mma(&dev, op, &f).unwrap();
/// assert_eq!(reference::unpack_d(op, &d), reference::gemm(op, &a, &b, &[0.0; 128]));
/// ```
pub fn mma<B: Backend>(dev: &B, op: MmaOp, frags: &Fragments) -> Result<Vec<u32>> {
    if frags.a.len() != 128 || frags.b.len() != 64 || frags.c.len() != 128 {
        return Err(Error::shape(
            "frags",
            "a [32][4], b [32][2], c [32][4]",
            format!(
                "{} / {} / {} registers",
                frags.a.len(),
                frags.b.len(),
                frags.c.len()
            ),
        ));
    }
    if dev.props().compute_capability < op.min_capability() {
        return Err(Error::Unsupported {
            what: format!(
                "{op:?} needs compute capability {:?}, this device has {:?}",
                op.min_capability(),
                dev.props().compute_capability
            ),
        });
    }
    let a = dev.upload(&frags.a)?;
    let b = dev.upload(&frags.b)?;
    let c = dev.upload(&frags.c)?;
    let mut d = crate::testing::poisoned::<B, u32>(dev, 128)?;
    {
        let (ap, _a) = a.addr(dev);
        let (bp, _b) = b.addr(dev);
        let (cp, _c) = c.addr(dev);
        let (dp, _d) = d.addr_mut(dev);
        let p = fk_selftest_mma_params {
            a: ap as *const u32,
            b: bp as *const u32,
            c: cp as *const u32,
            d: dp as *mut u32,
            op: op.code(),
        };
        launch_kernel(
            dev,
            Family::Selftest,
            "fk_selftest_mma",
            grid(1, 32),
            &p,
            None,
        )?;
    }
    dev.download(&d)
}

/// `ldmatrix` variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LdMatrix {
    /// One 8×8 matrix (lanes 0–7 give its rows).
    X1,
    /// Two (lanes 0–15).
    X2,
    /// Four (all lanes).
    X4,
    /// [`LdMatrix::X1`] transposed.
    X1Trans,
    /// [`LdMatrix::X2`] transposed.
    X2Trans,
    /// [`LdMatrix::X4`] transposed.
    X4Trans,
}

impl LdMatrix {
    /// Every variant.
    pub const ALL: [LdMatrix; 6] = [
        LdMatrix::X1,
        LdMatrix::X2,
        LdMatrix::X4,
        LdMatrix::X1Trans,
        LdMatrix::X2Trans,
        LdMatrix::X4Trans,
    ];

    /// Matrices loaded.
    ///
    /// ```
    /// assert_eq!(fusekit::selftest::LdMatrix::X2Trans.count(), 2);
    /// ```
    pub fn count(self) -> usize {
        match self {
            LdMatrix::X1 | LdMatrix::X1Trans => 1,
            LdMatrix::X2 | LdMatrix::X2Trans => 2,
            LdMatrix::X4 | LdMatrix::X4Trans => 4,
        }
    }

    /// Transposed.
    ///
    /// ```
    /// assert!(fusekit::selftest::LdMatrix::X4Trans.trans());
    /// ```
    pub fn trans(self) -> bool {
        matches!(
            self,
            LdMatrix::X1Trans | LdMatrix::X2Trans | LdMatrix::X4Trans
        )
    }

    fn code(self) -> u32 {
        match self {
            LdMatrix::X1 => FK_SELFTEST_LDMATRIX_X1,
            LdMatrix::X2 => FK_SELFTEST_LDMATRIX_X2,
            LdMatrix::X4 => FK_SELFTEST_LDMATRIX_X4,
            LdMatrix::X1Trans => FK_SELFTEST_LDMATRIX_X1_TRANS,
            LdMatrix::X2Trans => FK_SELFTEST_LDMATRIX_X2_TRANS,
            LdMatrix::X4Trans => FK_SELFTEST_LDMATRIX_X4_TRANS,
        }
    }
}

/// Loads `tile` (32 rows of 8 b16) into shared memory and runs `ldmatrix` with lane l supplying the
/// address of row `row_of_lane[l]`; returns every lane's 4 registers `[32][4]` (unused ones 0).
///
/// ```
/// use fusekit::selftest::{ldmatrix, reference, LdMatrix};
/// let dev = fusekit::emu::Emulator::new().unwrap();
/// let tile: Vec<u16> = (0..256).collect();
/// let rows: Vec<u32> = (0..32).rev().collect();
/// let got = ldmatrix(&dev, LdMatrix::X4Trans, &tile, &rows).unwrap();
/// assert_eq!(got, reference::ldmatrix(LdMatrix::X4Trans, &tile, &rows));
/// ```
pub fn ldmatrix<B: Backend>(
    dev: &B,
    variant: LdMatrix,
    tile: &[u16],
    row_of_lane: &[u32],
) -> Result<Vec<u32>> {
    crate::validate::exactly("tile", tile.len(), 256, "32 rows of 8")?;
    crate::validate::exactly("row_of_lane", row_of_lane.len(), 32, "one per lane")?;
    if let Some(&r) = row_of_lane.iter().find(|&&r| r >= 32) {
        return Err(Error::invalid(
            "row_of_lane",
            format!("row {r} outside the 32-row tile"),
        ));
    }
    let t = dev.upload(tile)?;
    let r = dev.upload(row_of_lane)?;
    let mut out = crate::testing::poisoned::<B, u32>(dev, 128)?;
    {
        let (tp, _a) = t.addr(dev);
        let (rp, _b) = r.addr(dev);
        let (op, _c) = out.addr_mut(dev);
        let p = fk_selftest_ldmatrix_params {
            tile: tp as *const u16,
            row_of_lane: rp as *const u32,
            out: op as *mut u32,
            variant: variant.code(),
        };
        launch_kernel(
            dev,
            Family::Selftest,
            "fk_selftest_ldmatrix",
            grid(1, 32),
            &p,
            None,
        )?;
    }
    dev.download(&out)
}

/// Warp collectives [`warp`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WarpOp {
    /// `__shfl_sync(mask, v, arg, width)`.
    ShflIdx,
    /// `__shfl_up_sync(mask, v, arg, width)`.
    ShflUp,
    /// `__shfl_down_sync(mask, v, arg, width)`.
    ShflDown,
    /// `__shfl_xor_sync(mask, v, arg, width)`.
    ShflXor,
    /// `__ballot_sync(mask, v & 1)`.
    Ballot,
    /// `__any_sync(mask, v & 1)`.
    Any,
    /// `__all_sync(mask, v & 1)`.
    All,
    /// `__match_any_sync(mask, v & 7)`.
    MatchAny,
    /// `__reduce_add_sync(mask, v)`.
    ReduceAdd,
    /// `__reduce_min_sync(mask, (int)v)`.
    ReduceMin,
    /// `__reduce_max_sync(mask, (int)v)`.
    ReduceMax,
}

/// One case of [`warp`]: the lanes of `mask` call `op` (the others do not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WarpCase {
    /// The collective.
    pub op: WarpOp,
    /// Source lane, delta or lane mask (shuffles).
    pub arg: i32,
    /// Segment width (shuffles): a power of two in [1, 32].
    pub width: i32,
    /// Participating lanes.
    pub mask: u32,
}

/// Runs `cases` on a warp whose lane l holds `values[l]`; returns `[cases][32]` results (0xffffffff for
/// lanes outside a case's mask).
///
/// ```
/// use fusekit::selftest::{reference, warp, WarpCase, WarpOp};
/// let dev = fusekit::emu::Emulator::new().unwrap();
/// let values: [u32; 32] = std::array::from_fn(|l| l as u32 * 3);
/// let case = WarpCase { op: WarpOp::ShflUp, arg: 2, width: 8, mask: u32::MAX };
/// assert_eq!(warp(&dev, &values, &[case]).unwrap(), reference::warp(&values, &case).to_vec());
/// ```
pub fn warp<B: Backend>(dev: &B, values: &[u32], cases: &[WarpCase]) -> Result<Vec<u32>> {
    crate::validate::exactly("values", values.len(), 32, "one per lane")?;
    if cases.is_empty() {
        return Err(Error::shape("cases", "at least one case", "none"));
    }
    let raw: Vec<fk_selftest_warp_case> = cases
        .iter()
        .map(|c| fk_selftest_warp_case {
            op: match c.op {
                WarpOp::ShflIdx => FK_SELFTEST_WARP_SHFL_IDX,
                WarpOp::ShflUp => FK_SELFTEST_WARP_SHFL_UP,
                WarpOp::ShflDown => FK_SELFTEST_WARP_SHFL_DOWN,
                WarpOp::ShflXor => FK_SELFTEST_WARP_SHFL_XOR,
                WarpOp::Ballot => FK_SELFTEST_WARP_BALLOT,
                WarpOp::Any => FK_SELFTEST_WARP_ANY,
                WarpOp::All => FK_SELFTEST_WARP_ALL,
                WarpOp::MatchAny => FK_SELFTEST_WARP_MATCH_ANY,
                WarpOp::ReduceAdd => FK_SELFTEST_WARP_REDUCE_ADD,
                WarpOp::ReduceMin => FK_SELFTEST_WARP_REDUCE_MIN,
                WarpOp::ReduceMax => FK_SELFTEST_WARP_REDUCE_MAX,
            },
            arg: c.arg,
            width: c.width,
            mask: c.mask,
        })
        .collect();
    let v = dev.upload(values)?;
    let cs = dev.upload(&raw)?;
    let mut out = crate::testing::poisoned::<B, u32>(dev, 32 * cases.len())?;
    {
        let (vp, _a) = v.addr(dev);
        let (cp, _b) = cs.addr(dev);
        let (op, _c) = out.addr_mut(dev);
        let p = fk_selftest_warp_params {
            values: vp as *const u32,
            cases: cp as *const fk_selftest_warp_case,
            out: op as *mut u32,
            n_cases: cases.len() as u32,
        };
        launch_kernel(
            dev,
            Family::Selftest,
            "fk_selftest_warp",
            grid(1, 32),
            &p,
            None,
        )?;
    }
    dev.download(&out)
}

/// Copies `src` through the 3-stage `cp.async` pipeline of `fk_selftest_cp_async` (commit per stage,
/// `wait_group 1`, zero fill past the end, each thread reading another thread's vector); returns what
/// came out, which must equal `src`.
///
/// ```
/// let dev = fusekit::emu::Emulator::new().unwrap();
/// let src: Vec<u32> = (0..1000).collect();
/// assert_eq!(fusekit::selftest::cp_async_pipeline(&dev, &src).unwrap(), src);
/// ```
pub fn cp_async_pipeline<B: Backend>(dev: &B, src: &[u32]) -> Result<Vec<u32>> {
    if src.is_empty() {
        return Err(Error::shape("src", "at least one element", "none"));
    }
    let s = dev.upload(src)?;
    let mut out = crate::testing::poisoned::<B, u32>(dev, src.len())?;
    {
        let (sp, _a) = s.addr(dev);
        let (op, _b) = out.addr_mut(dev);
        let p = fk_selftest_cp_async_params {
            src: sp as *const u32,
            out: op as *mut u32,
            n: src.len() as i64,
        };
        launch_kernel(
            dev,
            Family::Selftest,
            "fk_selftest_cp_async",
            grid(1, FK_SELFTEST_CP_THREADS),
            &p,
            None,
        )?;
    }
    dev.download(&out)
}

/// What [`block_builtins`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockBuiltins {
    /// Per thread (by global id): flat block index, flat thread index, `__syncthreads_count`,
    /// `__syncthreads_and | __syncthreads_or << 1`.
    pub ids: Vec<[u32; 4]>,
    /// Per block: its shared atomic add (Σ (tid + 1)) + 10^6 · (its shared atomic max of the global id
    /// mod 1000).
    pub shared: Vec<u32>,
    /// Global atomics: add of 1 per thread, max of the global ids, the CAS winners (1), and the float
    /// sum of 0.5 per thread (bits).
    pub global: [u32; 4],
    /// The float atomic sum.
    pub float_sum: f32,
}

/// The grid and block of [`block_builtins`]: every dimension used.
pub const BLOCK_GRID: (u32, u32, u32) = (2, 3, 2);
/// See [`BLOCK_GRID`].
pub const BLOCK_DIM: (u32, u32, u32) = (8, 4, 2);

/// Launches `fk_selftest_block` over [`BLOCK_GRID`] × [`BLOCK_DIM`]: thread, block and grid indices in
/// x, y, z, `__syncthreads_count/_and/_or` of `global id % pred_mod == 0`, and shared and global
/// atomics.
///
/// ```
/// use fusekit::selftest::{block_builtins, reference};
/// let dev = fusekit::emu::Emulator::new().unwrap();
/// let mut got = block_builtins(&dev, 3).unwrap();
/// assert!(got.global[2] != 0); // one thread won the CAS: which one is a race by design
/// got.global[2] = 0;
/// assert_eq!(got, reference::block_builtins(3));
/// ```
pub fn block_builtins<B: Backend>(dev: &B, pred_mod: u32) -> Result<BlockBuiltins> {
    if pred_mod == 0 {
        return Err(Error::invalid("pred_mod", "must be >= 1"));
    }
    let (g, b) = (BLOCK_GRID, BLOCK_DIM);
    let (nb, nt) = ((g.0 * g.1 * g.2) as usize, (b.0 * b.1 * b.2) as usize);
    let mut ids = crate::testing::poisoned::<B, u32>(dev, nb * nt * 4)?;
    let mut shared = crate::testing::poisoned::<B, u32>(dev, nb)?;
    let mut global = dev.alloc_zeros::<u32>(4)?;
    let mut fsum = dev.alloc_zeros::<f32>(1)?;
    {
        let (ip, _a) = ids.addr_mut(dev);
        let (sp, _b) = shared.addr_mut(dev);
        let (gp, _c) = global.addr_mut(dev);
        let (fp, _d) = fsum.addr_mut(dev);
        let p = fk_selftest_block_params {
            out_ids: ip as *mut u32,
            shared_sums: sp as *mut u32,
            global_counters: gp as *mut u32,
            global_float: fp as *mut f32,
            pred_mod,
        };
        let cfg = LaunchConfig {
            grid_dim: g,
            block_dim: b,
            shared_mem_bytes: 0,
        };
        launch_kernel(dev, Family::Selftest, "fk_selftest_block", cfg, &p, None)?;
    }
    let raw = dev.download(&ids)?;
    let gl = dev.download(&global)?;
    Ok(BlockBuiltins {
        ids: raw.chunks(4).map(|c| [c[0], c[1], c[2], c[3]]).collect(),
        shared: dev.download(&shared)?,
        global: [gl[0], gl[1], gl[2], gl[3]],
        float_sum: dev.download(&fsum)?[0],
    })
}

/// f32 → bf16 and f16 by the kernels' intrinsics (`__float2bfloat16_rn`, `__float2half_rn`) and back:
/// (bf16 bits, f16 bits, [bf16 as f32, f16 as f32] per input).
///
/// ```
/// let dev = fusekit::emu::Emulator::new().unwrap();
/// let (b, h, _) = fusekit::selftest::convert(&dev, &[1.0, 65520.0]).unwrap();
/// assert_eq!(b[0], half::bf16::ONE.to_bits());
/// assert_eq!(h[1], half::f16::INFINITY.to_bits());
/// ```
pub fn convert<B: Backend>(dev: &B, input: &[f32]) -> Result<(Vec<u16>, Vec<u16>, Vec<f32>)> {
    if input.is_empty() {
        return Err(Error::shape("input", "at least one value", "none"));
    }
    let n = input.len();
    let x = dev.upload(input)?;
    let mut ob = crate::testing::poisoned::<B, u32>(dev, n.div_ceil(2))?;
    let mut oh = crate::testing::poisoned::<B, u32>(dev, n.div_ceil(2))?;
    let mut back = crate::testing::poisoned::<B, f32>(dev, 2 * n)?;
    {
        let (xp, _a) = x.addr(dev);
        let (bp, _b) = ob.addr_mut(dev);
        let (hp, _c) = oh.addr_mut(dev);
        let (kp, _d) = back.addr_mut(dev);
        let p = fk_selftest_convert_params {
            in_: xp as *const f32,
            out_bf16: bp as *mut u16,
            out_f16: hp as *mut u16,
            back: kp as *mut f32,
            n: n as i64,
        };
        launch_kernel(
            dev,
            Family::Selftest,
            "fk_selftest_convert",
            grid(n.div_ceil(256).min(64), 256),
            &p,
            None,
        )?;
    }
    let halves = |v: Vec<u32>| -> Vec<u16> {
        v.iter()
            .flat_map(|w| [*w as u16, (*w >> 16) as u16])
            .take(n)
            .collect()
    };
    Ok((
        halves(dev.download(&ob)?),
        halves(dev.download(&oh)?),
        dev.download(&back)?,
    ))
}

/// The planted bugs of `kernels/selftest/planted.cu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Planted {
    /// A block reduction with its barrier left out: a shared-memory race (ThreadSanitizer), and a wrong
    /// sum under some thread orders.
    MissingBarrier,
    /// A write one element past a global buffer (AddressSanitizer).
    OobGlobal,
    /// A `__shared__ float[64]` indexed by 128 threads (UBSan bounds).
    OobStaticShared,
    /// A write past the launch's dynamic shared memory (AddressSanitizer).
    OobDynamicShared,
    /// `__syncthreads()` reached from two lines (the emulator's barrier check).
    DivergentBarrier,
    /// Lane 0 at `__syncthreads()`, its warp at `__syncwarp()` (the emulator's deadlock check).
    Deadlock,
    /// A shuffle reading a lane outside its mask (the emulator's shuffle check).
    ShuffleOutsideMask,
    /// A full-mask shuffle after half the warp exited (the emulator's collective check).
    ExitedLane,
    /// Shared memory read that nobody wrote (poisoned: the output is NaN).
    UninitShared,
    /// A `cp.async` destination read before any wait (stale: the output is poison).
    CpAsyncNoWait,
    /// `map_shared_rank` into a cluster block that exited.
    ClusterExited,
}

impl Planted {
    /// Every planted bug.
    pub const ALL: [Planted; 11] = [
        Planted::MissingBarrier,
        Planted::OobGlobal,
        Planted::OobStaticShared,
        Planted::OobDynamicShared,
        Planted::DivergentBarrier,
        Planted::Deadlock,
        Planted::ShuffleOutsideMask,
        Planted::ExitedLane,
        Planted::UninitShared,
        Planted::CpAsyncNoWait,
        Planted::ClusterExited,
    ];
}

/// Runs a planted bug on the emulator with `threads` threads per block over `input`; returns the
/// output buffer (`[max(threads, input.len()) + 1]`, poisoned before the launch) or the emulator's
/// report. The sanitizer bugs abort the process under their sanitizer build (that is the report).
///
/// ```
/// use fusekit::selftest::{planted, Planted};
/// let dev = fusekit::emu::Emulator::new().unwrap();
/// let err = planted(&dev, Planted::Deadlock, 64, &[1.0; 64]).unwrap_err();
/// assert!(err.to_string().contains("deadlock"));
/// ```
pub fn planted(
    dev: &crate::emu::Emulator,
    bug: Planted,
    threads: u32,
    input: &[f32],
) -> Result<Vec<f32>> {
    if input.is_empty() {
        return Err(Error::shape("input", "at least one element", "none"));
    }
    let n_out = (threads as usize).max(input.len()) + 1;
    let inp = dev.upload(input)?;
    let mut out = crate::testing::poisoned::<crate::emu::Emulator, f32>(dev, n_out)?;
    let dyn_smem = 256u32;
    {
        let (ip, _a) = inp.addr(dev);
        let (op, _b) = out.addr_mut(dev);
        let p = fk_planted_params {
            in_: ip as *const f32,
            out: op as *mut f32,
            n: if bug == Planted::OobGlobal {
                n_out as i64
            } else {
                input.len() as i64
            },
            bug: match bug {
                Planted::MissingBarrier => FK_PLANTED_MISSING_BARRIER,
                Planted::OobGlobal => FK_PLANTED_OOB_GLOBAL,
                Planted::OobStaticShared => FK_PLANTED_OOB_STATIC_SHARED,
                Planted::OobDynamicShared => FK_PLANTED_OOB_DYNAMIC_SHARED,
                Planted::DivergentBarrier => FK_PLANTED_DIVERGENT_BARRIER,
                Planted::Deadlock => FK_PLANTED_DEADLOCK,
                Planted::ShuffleOutsideMask => FK_PLANTED_SHFL_OUTSIDE_MASK,
                Planted::ExitedLane => FK_PLANTED_EXITED_LANE,
                Planted::UninitShared => FK_PLANTED_UNINIT_SHARED,
                Planted::CpAsyncNoWait => FK_PLANTED_CP_ASYNC_NO_WAIT,
                Planted::ClusterExited => 0,
            },
            dyn_smem,
        };
        let (name, cfg) = if bug == Planted::ClusterExited {
            ("fk_planted_cluster_exited", grid(2, threads))
        } else {
            (
                "fk_planted",
                LaunchConfig {
                    shared_mem_bytes: dyn_smem,
                    ..grid(1, threads)
                },
            )
        };
        launch_kernel(dev, Family::Selftest, name, cfg, &p, None)?;
    }
    dev.download(&out)
}

pub(crate) fn self_check() -> crate::check::row::SelfCheck {
    crate::check::row::SelfCheck {
        family: "selftest",
        cpu: |_rng| {
            let bad = MmaOp::ALL
                .iter()
                .filter(|&&op| !reference::maps_are_bijections(op))
                .count();
            vec![crate::check::row::CheckRow::new(
                "fragment maps (reference)",
                "cpu-ref",
                bad as f64,
                bad == 0,
                "A/B/C maps of every mma op cover their tiles once".into(),
                None,
            )]
        },
        gpu: kernels_check::<crate::Gpu>,
        emu: kernels_check::<crate::emu::Emulator>,
        gpu_extra: None,
    }
}

/// Every conformance kernel against its expectation; a row per construct.
fn kernels_check<B: Backend>(
    dev: &B,
    rng: &mut crate::testing::Rng,
) -> Result<Vec<crate::check::row::CheckRow>> {
    use crate::check::row::CheckRow;
    let mode = dev.kind();
    let row = |name: &str, ok: std::result::Result<(), String>, note: &str| match ok {
        Ok(()) => CheckRow::new(name, mode, 0.0, true, note.into(), None),
        Err(m) => CheckRow::new(name, mode, f64::NAN, false, m, None),
    };
    let mut rows = Vec::new();
    let mut mma_ok = Ok(());
    let mut ran = Vec::new();
    for op in MmaOp::ALL {
        if dev.props().compute_capability < op.min_capability() {
            continue;
        }
        let k = op.k();
        let a: Vec<f64> = (0..16 * k).map(|_| rng.below(7) as f64 - 3.0).collect();
        let b: Vec<f64> = (0..k * 8).map(|_| rng.below(7) as f64 - 3.0).collect();
        let c: Vec<f64> = (0..128).map(|_| rng.below(9) as f64).collect();
        let got = reference::unpack_d(op, &mma(dev, op, &reference::pack(op, &a, &b, &c))?);
        if got != reference::gemm(op, &a, &b, &c) {
            mma_ok = Err(format!("{op:?}: D differs from the f64 GEMM"));
        }
        ran.push(format!("{op:?}"));
    }
    rows.push(row("fk_selftest_mma", mma_ok, &ran.join(", ")));
    let tile: Vec<u16> = (0..256).map(|_| rng.next_u64() as u16).collect();
    let rows_of: Vec<u32> = (0..32).map(|l| (l * 7 + 3) % 32).collect();
    let mut ld_ok = Ok(());
    for v in LdMatrix::ALL {
        if ldmatrix(dev, v, &tile, &rows_of)? != reference::ldmatrix(v, &tile, &rows_of) {
            ld_ok = Err(format!("{v:?} differs"));
        }
    }
    rows.push(row(
        "fk_selftest_ldmatrix",
        ld_ok,
        "x1/x2/x4, .trans, permuted rows",
    ));
    let values: Vec<u32> = (0..32).map(|_| rng.next_u64() as u32).collect();
    let cases: Vec<WarpCase> = [
        (WarpOp::ShflIdx, 5, 8),
        (WarpOp::ShflUp, 3, 16),
        (WarpOp::ShflDown, 2, 32),
        (WarpOp::ShflXor, 9, 32),
        (WarpOp::Ballot, 0, 32),
        (WarpOp::MatchAny, 0, 32),
        (WarpOp::ReduceMax, 0, 32),
    ]
    .iter()
    .map(|&(op, arg, width)| WarpCase {
        op,
        arg,
        width,
        mask: u32::MAX,
    })
    .collect();
    let got = warp(dev, &values, &cases)?;
    let ok = cases
        .iter()
        .enumerate()
        .all(|(i, c)| got[i * 32..(i + 1) * 32] == reference::warp(&values, c)[..]);
    rows.push(row(
        "fk_selftest_warp",
        if ok {
            Ok(())
        } else {
            Err("a collective differs".into())
        },
        "shuffles, ballot, match, reduce",
    ));
    let src: Vec<u32> = (0..1001).map(|_| rng.next_u64() as u32).collect();
    let ok = cp_async_pipeline(dev, &src)? == src;
    rows.push(row(
        "fk_selftest_cp_async",
        if ok {
            Ok(())
        } else {
            Err("elements lost".into())
        },
        "3 stages, wait_group 1, zero fill",
    ));
    let mut got = block_builtins(dev, 3)?;
    let cas = got.global[2] != 0;
    got.global[2] = 0;
    let ok = cas && got == reference::block_builtins(3);
    rows.push(row(
        "fk_selftest_block",
        if ok {
            Ok(())
        } else {
            Err("indices, barrier predicates or atomics differ".into())
        },
        "3D grid/block, __syncthreads_count/and/or, atomics",
    ));
    Ok(rows)
}
