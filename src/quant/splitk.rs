//! Split-K shared by the quantised GEMMs ([`w4a16`](super::w4a16), [`billm_matmul`](super::billm_matmul)):
//! how many k-splits a plan takes, and the workspace of their fp32 partial sums and per-tile arrival
//! counters. The splits are added inside the same launch, by the last block of each output tile to
//! arrive, in split order (`kernels/include/fk_splitk.cuh`), so a product is one launch and a plan
//! gives the same bits on every run.

use crate::backend::private::AddrMut;
use crate::error::{Error, Result};
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
    /// Arrival counters the product needs: one per output tile with several splits, else 0.
    fn workspace_counters(&self) -> usize;
}

pub(crate) mod private {
    pub trait Sealed {}
}

/// Scratch for the split-K products of [`w4a16`](super::w4a16) and
/// [`billm_matmul`](super::billm_matmul), sized for a plan (a plan needing more is an `Err(Shape)` at
/// launch): the fp32 partial sums, and one arrival counter per output tile with which the last block of
/// a tile to finish knows to add the splits. The counters start at 0 and every launch leaves them at 0,
/// so one workspace serves any number of products and plans, one launch at a time: two launches in
/// flight at once (on two streams) need two workspaces.
#[derive(Debug)]
pub struct SplitKWorkspace<B: Backend> {
    pub(crate) buf: B::Buffer<f32>,
    pub(crate) counters: B::Buffer<u32>,
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
            counters: dev.alloc_zeros(plan.workspace_counters().max(1))?,
        })
    }
}

/// The checks every quantised GEMM makes before launching (`Err`, nothing written): the activation
/// type the call names (`given`, its kernel suffix) is the plan's (`elem`), `x` holds `m·k` and `y`
/// `m·n` elements, the workspace at least `plan`'s partials and counters, all on `dev`.
pub(crate) fn check_io<B, T, X, Y>(
    dev: &B,
    (elem, given): (&str, &str),
    (m, n, k): (usize, usize, usize),
    x: &X,
    y: &Y,
    ws: &SplitKWorkspace<B>,
    plan: &dyn SplitKPlan,
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
    exactly("x", x.len(), m * k, "m * k")?;
    exactly("y", y.len(), m * n, "m * n")?;
    check_ws(dev, ws, plan)
}

/// The workspace is `dev`'s and holds at least `plan`'s partials and counters.
pub(crate) fn check_ws<B: Backend>(
    dev: &B,
    ws: &SplitKWorkspace<B>,
    plan: &dyn SplitKPlan,
) -> Result<()> {
    owned(dev, "ws", &ws.buf)?;
    owned(dev, "ws", &ws.counters)?;
    at_least(
        "ws",
        ws.buf.len(),
        plan.workspace_elements(),
        "plan.workspace_elements()",
    )?;
    at_least(
        "ws",
        ws.counters.len(),
        plan.workspace_counters(),
        "plan.workspace_counters()",
    )
}

/// Workspace elements for `splits` partials of `mn` outputs: 0 with one split (no workspace used).
pub(crate) fn partials(splits: usize, mn: usize) -> usize {
    if splits > 1 {
        splits * mn
    } else {
        0
    }
}

/// Arrival counters for `tiles` output tiles: 0 with one split.
pub(crate) fn counters(splits: usize, tiles: usize) -> usize {
    if splits > 1 {
        tiles
    } else {
        0
    }
}

/// The device addresses of the workspace's partials and counters for a launch of `splits` splits (0, a
/// null pointer, for one split: the kernel then writes y directly), with their guards.
pub(crate) fn ws_addrs<'a, B: Backend>(
    dev: &'a B,
    ws: &'a mut SplitKWorkspace<B>,
    splits: usize,
) -> (u64, u64, [B::Guard<'a>; 2]) {
    let (w, gw) = ws.buf.addr_mut(dev);
    let (c, gc) = ws.counters.addr_mut(dev);
    let (w, c) = if splits > 1 { (w, c) } else { (0, 0) };
    (w, c, [gw, gc])
}

/// A launch's result, after putting the workspace's counters back to 0 when it failed: a launch stopped
/// midway may leave a tile's counter partly counted, which would make a later product's last block
/// add too early and write a wrong sum.
pub(crate) fn settle<B: Backend>(
    dev: &B,
    ws: &mut SplitKWorkspace<B>,
    launched: Result<()>,
) -> Result<()> {
    if launched.is_err() {
        // The launch's own error is the one to report; a failed reset leaves nothing worse.
        let _ = dev.zero(&mut ws.counters);
    }
    launched
}

/// The checks every quantised GEMM plan makes of its request (`Err`): compute capability 8.0 or newer
/// (`kernel` names the product and `needs` what it needs it for), at most `max_rows` rows of activations
/// per launch (`rows_per_block` × 65535 blocks along the grid's token axis), and at least one k-split
/// when one is forced.
pub(crate) fn check_request(
    props: &DeviceProps,
    (kernel, needs): (&str, &str),
    m: usize,
    rows_per_block: usize,
    split: Option<usize>,
) -> Result<()> {
    let (major, minor) = props.compute_capability;
    if (major, minor) < (8, 0) {
        return Err(Error::Unsupported {
            what: format!("{kernel} on compute capability {major}.{minor} ({needs} 8.0+)"),
        });
    }
    let max_rows = 65535 * rows_per_block;
    if m > max_rows {
        return Err(Error::Unsupported {
            what: format!("{m} rows (at most 65535 x {rows_per_block} = {max_rows} per launch)"),
        });
    }
    if split == Some(0) {
        return Err(Error::invalid("split", "0 k-splits (at least 1)"));
    }
    Ok(())
}

/// `Err(Unsupported)` when a block's `bytes` of dynamic shared memory (for `rows` rows per block) exceed
/// what the GPU `props` describes lets a block opt into.
pub(crate) fn check_shared_memory(props: &DeviceProps, bytes: u32, rows: usize) -> Result<()> {
    if bytes as u64 > props.smem_per_block_optin {
        return Err(Error::Unsupported {
            what: format!(
                "{bytes} B of shared memory for {rows} rows per block on {} (at most {} B)",
                props.name, props.smem_per_block_optin
            ),
        });
    }
    Ok(())
}
