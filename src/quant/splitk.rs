//! Split-K shared by the quantised GEMMs ([`w4a16`](super::w4a16), [`billm_matmul`](super::billm_matmul)):
//! how many k-splits a plan takes, the fp32 workspace of their partial sums, and the reduce kernel
//! (`fk_w4a16_reduce_*`) that adds them in split order, so a plan gives the same bits on every run.

use std::ffi::c_void;

use cudarc::driver::LaunchConfig;

use crate::device::Family;
use crate::error::{Error, Result};
use crate::launch::{grid, launch_kernel};
use crate::params::fk_w4a16_reduce_params;
use crate::validate::{at_least, exactly, owned};
use crate::{Backend, DeviceProps, DeviceRead, DeviceWrite};

/// Most k-splits a plan uses (each adds `M·N` fp32 partials to the workspace).
pub const W4A16_MAX_SPLITS: usize = 32;

/// `(splits, k-units per split)` for `units` k-units (slabs, blocks) over `ctas` blocks per split:
/// `split` if given, else about two blocks per SM; at least 1, at most the units and
/// [`W4A16_MAX_SPLITS`]; every split gets whole units.
pub(crate) fn choose(
    props: &DeviceProps,
    ctas: usize,
    units: usize,
    split: Option<usize>,
) -> (usize, usize) {
    let want = split.unwrap_or_else(|| (2 * props.sm_count as usize).div_ceil(ctas.max(1)));
    let want = want.clamp(1, units.min(W4A16_MAX_SPLITS));
    let per_split = units.div_ceil(want);
    (units.div_ceil(per_split), per_split)
}

/// A plan whose product may split k: what its workspace must hold.
pub trait SplitKPlan: private::Sealed {
    /// fp32 elements of workspace the product needs (0 with one split).
    fn workspace_elements(&self) -> usize;
}

pub(crate) mod private {
    pub trait Sealed {}
}

/// fp32 scratch for the split-K partials of [`w4a16`](super::w4a16) and
/// [`billm_matmul`](super::billm_matmul), sized for a plan; a plan needing more is an `Err(Shape)` at
/// launch.
#[derive(Debug)]
pub struct SplitKWorkspace<B: Backend> {
    pub(crate) buf: B::Buffer<f32>,
}

impl<B: Backend> SplitKWorkspace<B> {
    /// A workspace for `plan` (and any plan needing no more).
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// use fusekit::Backend;
    /// use fusekit::quant::{quantize_rtn, PackedW4, SplitKWorkspace, W4A16Plan, WeightQuant};
    /// let dev = fusekit::emu::Emulator::new()?;
    /// let p = PackedW4::pack(&quantize_rtn(&vec![1.0f32; 64 * 256], 64, 256, &WeightQuant::int4(None, true))?)?;
    /// let plan = W4A16Plan::new::<half::bf16>(dev.props(), &p, 1, Some(2))?;
    /// let ws = SplitKWorkspace::new(&dev, &plan)?;
    /// # Ok(()) }
    /// ```
    pub fn new<P: SplitKPlan>(dev: &B, plan: &P) -> Result<Self> {
        Ok(SplitKWorkspace {
            buf: dev.alloc_zeros(plan.workspace_elements().max(1))?,
        })
    }
}

/// The reduce kernel's launch shape for `mn` outputs.
pub(crate) fn reduce_config(mn: usize) -> LaunchConfig {
    grid(mn.div_ceil(256).min(65535 * 8), 256)
}

/// `y[i] = Σ_s ws[s][i]` in split order, rounded to the element type `elem` ("bf16", "f16"), for the
/// `mn` outputs at device address `y` from the `splits` partials at `ws`.
pub(crate) fn launch_reduce<B: Backend>(
    dev: &B,
    elem: &str,
    ws: u64,
    y: u64,
    mn: usize,
    splits: usize,
) -> Result<()> {
    let r = fk_w4a16_reduce_params {
        ws: ws as *const f32,
        y: y as *mut c_void,
        mn: mn as i64,
        splits: splits as i32,
    };
    // Reads splits·mn partials, writes mn outputs (the callers checked both lengths against the plan).
    launch_kernel(
        dev,
        Family::Quant,
        &format!("fk_w4a16_reduce_{elem}"),
        reduce_config(mn),
        &r,
        None,
    )
}

/// The checks every quantised GEMM makes before launching (`Err`, nothing written): the activation
/// type the call names (`given`, its kernel suffix) is the plan's (`elem`), `x` holds `m·k` and `y`
/// `m·n` elements, the workspace at least `need`, all three on `dev`.
pub(crate) fn check_io<B, T, X, Y>(
    dev: &B,
    (elem, given): (&str, &str),
    (m, n, k): (usize, usize, usize),
    x: &X,
    y: &Y,
    ws: &SplitKWorkspace<B>,
    need: usize,
) -> Result<()>
where
    B: Backend,
    X: DeviceRead<T, B>,
    Y: DeviceWrite<T, B>,
{
    if elem != given {
        return Err(Error::DType {
            arg: "x",
            expected: elem.to_string(),
            got: given.to_string(),
        });
    }
    owned(dev, "x", x)?;
    owned(dev, "y", y)?;
    owned(dev, "ws", &ws.buf)?;
    exactly("x", x.len(), m * k, "m * k")?;
    exactly("y", y.len(), m * n, "m * n")?;
    at_least("ws", ws.buf.len(), need, "plan.workspace_elements()")
}
