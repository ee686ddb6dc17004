//! Inter-layer sharing of distant tokens (PoD): the shared decode, its plan, the V pool and the copy
//! of values into it. The method is described on [`SharedDecodePlan`].

use super::status::StatusWord;
use std::ffi::c_void;

use super::cache::{PageTable, PagedKvLayout, RopeMode};
use super::decode::{
    check_outputs, check_query, check_table_buffers, launch_merge, DecodePlan, DecodeWorkspace,
    KvElement,
};
use super::DecodeConfig;
use crate::backend::private::{Addr, AddrMut};
use crate::device::{check_aligned, Family};
use crate::error::{Error, Result};
use crate::launch::{grid, launch_kernel};
use crate::params::*;
use crate::validate::{exactly, owned};
use crate::{Backend, DeviceRead, DeviceWrite};

impl PagedKvLayout {
    /// Elements of a V pool for this cache (bf16/f16): `[num_pages][num_kv_heads][page_size][head_dim]`,
    /// half of [`elements`](Self::elements); page `p` of the pool holds the values of the tokens of page
    /// `p` of the leader's cache. A quantised cache has no V pool yet: `Err(Unsupported)`.
    ///
    /// ```
    /// use fusekit::attention::{KvFormat, PagedKvLayout};
    /// let l = PagedKvLayout::new(100, 16, 3, 64, KvFormat::Bf16)?;
    /// assert_eq!(l.v_pool_elements()? * 2, l.elements());
    /// assert!(PagedKvLayout::new(100, 16, 3, 64, KvFormat::Int8 { group: 32 })?.v_pool_elements().is_err());
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn v_pool_elements(&self) -> Result<u64> {
        if self.format().group().is_some() {
            return Err(Error::Unsupported {
                what: format!(
                    "a V pool (inter-layer sharing) for a {:?} cache: bf16/f16 only",
                    self.format()
                ),
            });
        }
        Ok(self.elements() / 2)
    }
}

/// Inter-layer sharing of distant tokens (PoD, "Compressing KV Cache for Long-Context LLM Inference with
/// Inter-Layer Attention Similarity"): a group of consecutive layers attends to its distant tokens with
/// the scores of the group's leader layer, so a member layer keeps only the values of its distant
/// tokens, in a **V pool**, and drops their keys.
///
/// A member layer's decode is two partial attentions merged by the LSE gate:
/// * **proximal** tokens (the sinks and the recent window, on the layer's own cache and its proximal
///   page table): the layer's own q, K and V;
/// * **distant** tokens (on the distant page table): the leader's q against the leader's keys (the
///   leader's cache, whose pages the distant table names) and the member's values (its V pool, whose page
///   `p` holds the values of the tokens of the leader's page `p`).
///
/// Both parts' splits land in one workspace and one merge combines them in split order (fp32 partials,
/// `o = g·oᴾ + (1 − g)·oᴰ` with `g = Σexp(aᴾ) / (Σexp(aᴾ) + Σexp(aᴰ))`, as
/// [`reference::merge`](super::reference::merge)). A member layer saves the keys of its distant tokens:
/// half of their bytes. The leader's own decode is an ordinary [`decode`](super::decode) over all its
/// tokens. [`copy_values`] moves the values of pages that turn distant from a member's cache into its
/// pool (after which the member's pages can be freed).
///
/// Positions differ between the two parts (the distant tokens sit between the sinks and the window), so
/// the kernels cannot rotate keys here: the cache's RoPE mode must be [`RopeMode::None`] (keys cached
/// after RoPE, q rotated by the caller, as most engines do). bf16/f16 caches; sharing over KIVI caches
/// is not built (`Err(Unsupported)`).
///
/// The plan: the proximal part (a plan over the layer's own cache) and the distant part (a plan over the
/// leader's cache, where a sequence may have no distant token), with one configuration and split size.
///
/// ```
/// use fusekit::attention::{DecodeConfig, KvFormat, PageTable, PagedKvLayout, SharedDecodePlan};
/// let l = PagedKvLayout::new(64, 16, 3, 64, KvFormat::Bf16)?;
/// // Sequence 0: sinks + window on 2 pages of its own (20 tokens), 100 distant tokens on the leader's
/// // pages 10..17. Sequence 1: short, nothing distant.
/// let prox = PageTable { page_indptr: &[0, 2, 3], page_indices: &[0, 1, 2], seq_lens: &[20, 9] };
/// let dist = PageTable { page_indptr: &[0, 7, 7], page_indices: &[10, 11, 12, 13, 14, 15, 16], seq_lens: &[100, 0] };
/// let plan = SharedDecodePlan::new::<half::bf16>(&l, &prox, &dist, &DecodeConfig::new(9), Some(64))?;
/// assert_eq!(plan.n_splits(), 1 + 2);
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct SharedDecodePlan {
    proximal: DecodePlan,
    distant: DecodePlan,
}

impl SharedDecodePlan {
    /// Validates a shared decode of `T` elements: a bf16/f16 layout of format `T` without RoPE in the
    /// kernels, no sliding window (the proximal table is the window), two tables of the same batch;
    /// every proximal sequence holds at least one token, a distant one may hold none.
    pub fn new<T: KvElement>(
        layout: &PagedKvLayout,
        proximal: &PageTable<'_>,
        distant: &PageTable<'_>,
        cfg: &DecodeConfig,
        split_size: Option<usize>,
    ) -> Result<Self> {
        if layout.rope() != RopeMode::None {
            return Err(Error::Unsupported {
                what: format!(
                    "inter-layer sharing over a cache with {:?}: the proximal and distant parts have \
                     different positions, so keys must be cached after RoPE (RopeMode::None)",
                    layout.rope()
                ),
            });
        }
        if cfg.window.is_some() {
            return Err(Error::invalid(
                "cfg.window",
                "a shared decode attends to its proximal and distant tables whole; leave window None",
            ));
        }
        layout.v_pool_elements()?;
        let proximal_plan = DecodePlan::new::<T>(layout, proximal, cfg, split_size)?;
        if distant.seq_lens.len() != proximal.seq_lens.len() {
            return Err(Error::shape(
                "distant.seq_lens",
                format!("the proximal table's batch, {}", proximal.seq_lens.len()),
                format!("{}", distant.seq_lens.len()),
            ));
        }
        let distant_plan = DecodePlan::build::<T>(layout, distant, cfg, split_size, None, true)?;
        if proximal_plan.n_splits + distant_plan.n_splits > 65535 {
            return Err(Error::Unsupported {
                what: "more than 65535 splits per row in a shared decode".into(),
            });
        }
        Ok(SharedDecodePlan {
            proximal: proximal_plan,
            distant: distant_plan,
        })
    }

    /// Partials per row: the proximal part's splits, then the distant part's.
    ///
    /// ```
    /// # use fusekit::attention::{DecodeConfig, KvFormat, PageTable, PagedKvLayout, SharedDecodePlan};
    /// let l = PagedKvLayout::new(8, 4, 1, 64, KvFormat::F16)?;
    /// let prox = PageTable { page_indptr: &[0, 1], page_indices: &[0], seq_lens: &[3] };
    /// let dist = PageTable { page_indptr: &[0, 0], page_indices: &[], seq_lens: &[0] };
    /// assert_eq!(SharedDecodePlan::new::<half::f16>(&l, &prox, &dist, &DecodeConfig::new(1), None)?.n_splits(), 2);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn n_splits(&self) -> usize {
        self.proximal.n_splits + self.distant.n_splits
    }

    /// Rows of the output: sequences × query heads.
    ///
    /// ```
    /// # use fusekit::attention::{DecodeConfig, KvFormat, PageTable, PagedKvLayout, SharedDecodePlan};
    /// let l = PagedKvLayout::new(8, 4, 2, 64, KvFormat::F16)?;
    /// let prox = PageTable { page_indptr: &[0, 1], page_indices: &[0], seq_lens: &[3] };
    /// let dist = PageTable { page_indptr: &[0, 2], page_indices: &[5, 6], seq_lens: &[8] };
    /// assert_eq!(SharedDecodePlan::new::<half::f16>(&l, &prox, &dist, &DecodeConfig::new(4), None)?.rows(), 4);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn rows(&self) -> usize {
        self.proximal.rows()
    }
}

impl<B: Backend> DecodeWorkspace<B> {
    /// Allocates the workspace of a shared decode on `dev`.
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// # use fusekit::attention::{DecodeConfig, DecodeWorkspace, KvFormat, PageTable, PagedKvLayout, SharedDecodePlan};
    /// let dev = fusekit::emu::Emulator::new()?;
    /// let l = PagedKvLayout::new(8, 4, 1, 64, KvFormat::F16)?;
    /// let prox = PageTable { page_indptr: &[0, 1], page_indices: &[0], seq_lens: &[3] };
    /// let dist = PageTable { page_indptr: &[0, 0], page_indices: &[], seq_lens: &[0] };
    /// let plan = SharedDecodePlan::new::<half::f16>(&l, &prox, &dist, &DecodeConfig::new(1), None)?;
    /// let _ws = DecodeWorkspace::for_shared(&dev, &plan)?;
    /// # Ok(()) }
    /// ```
    pub fn for_shared(dev: &B, plan: &SharedDecodePlan) -> Result<Self> {
        let parts = plan.rows() * plan.n_splits();
        let d = plan.proximal.layout.head_dim();
        Ok(DecodeWorkspace {
            o_part: dev.alloc_zeros(parts * d)?,
            lse_part: dev.alloc_zeros(parts)?,
            status: StatusWord::new(dev)?,
            head_dim: d,
        })
    }
}

/// A page table on the device: the three buffers of a [`PageTable`], holding the values a plan was made
/// from.
#[derive(Debug)]
pub struct DeviceTable<'a, P, I, S> {
    /// `batch + 1` offsets into `page_indices`.
    pub page_indptr: &'a P,
    /// Page numbers, sequence after sequence.
    pub page_indices: &'a I,
    /// Tokens per sequence.
    pub seq_lens: &'a S,
}

impl<P, I, S> Clone for DeviceTable<'_, P, I, S> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<P, I, S> Copy for DeviceTable<'_, P, I, S> {}

/// Decode of a layer that shares its distant tokens' scores with its group's leader (see
/// [`SharedDecodePlan`]): the proximal part is `q` over the layer's own `cache` through `proximal`;
/// the distant part is `q_leader` (the leader layer's query for this step, `[batch, num_qo_heads,
/// head_dim]` as q) over the keys of `leader_cache` and the values of `v_pool`
/// ([`v_pool_elements`](PagedKvLayout::v_pool_elements)) through `distant`. Both caches have the plan's
/// layout. Outputs as [`decode`](super::decode): `o` and `lse` of the merged attention; a device table
/// that disagrees with the plan comes out NaN and [`DecodeWorkspace::check_status_sync`] names the
/// sequence.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::attention::{decode_shared, DecodeConfig, DecodeWorkspace, DeviceTable, KvFormat, PageTable, PagedKvLayout, SharedDecodePlan};
/// use half::bf16;
/// let dev = fusekit::emu::Emulator::new()?;
/// let l = PagedKvLayout::new(4, 16, 1, 64, KvFormat::Bf16)?;
/// // 3 proximal tokens on page 0 of the layer's cache, 20 distant ones on pages 2, 3 of the leader's.
/// let prox = PageTable { page_indptr: &[0, 1], page_indices: &[0], seq_lens: &[3] };
/// let dist = PageTable { page_indptr: &[0, 2], page_indices: &[2, 3], seq_lens: &[20] };
/// let plan = SharedDecodePlan::new::<bf16>(&l, &prox, &dist, &DecodeConfig::new(1), None)?;
/// let cache = dev.upload(&vec![bf16::ONE; l.elements() as usize])?;    // values 1
/// let leader = dev.upload(&vec![bf16::ZERO; l.elements() as usize])?;  // keys 0
/// let pool = dev.upload(&vec![bf16::from_f32(4.0); l.v_pool_elements()? as usize])?; // values 4
/// let q = dev.upload(&vec![bf16::ZERO; 64])?;
/// let up = |t: &PageTable| -> fusekit::Result<_> { Ok((dev.upload(t.page_indptr)?, dev.upload(t.page_indices)?, dev.upload(t.seq_lens)?)) };
/// let ((pi, px, pl), (di, dx, dl)) = (up(&prox)?, up(&dist)?);
/// let mut ws = DecodeWorkspace::for_shared(&dev, &plan)?;
/// let (mut o, mut lse) = (dev.alloc_zeros::<bf16>(64)?, dev.alloc_zeros::<f32>(1)?);
/// decode_shared(
///     &dev, &plan,
///     &q, &cache, DeviceTable { page_indptr: &pi, page_indices: &px, seq_lens: &pl },
///     &q, &leader, &pool, DeviceTable { page_indptr: &di, page_indices: &dx, seq_lens: &dl },
///     &mut ws, &mut o, &mut lse,
/// )?;
/// ws.check_status_sync(&dev)?;
/// // 23 equal scores: 3 tokens with value 1, 20 with value 4.
/// assert!(dev.download(&o)?.iter().all(|&x| (x.to_f32() - 83.0 / 23.0).abs() < 2e-2));
/// assert!((dev.download(&lse)?[0] - 23f32.ln()).abs() < 1e-5);
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn decode_shared<B, T, Q, C, P, I, S, O, L>(
    dev: &B,
    plan: &SharedDecodePlan,
    q: &Q,
    cache: &C,
    proximal: DeviceTable<'_, P, I, S>,
    q_leader: &Q,
    leader_cache: &C,
    v_pool: &C,
    distant: DeviceTable<'_, P, I, S>,
    ws: &mut DecodeWorkspace<B>,
    o: &mut O,
    lse: &mut L,
) -> Result<()>
where
    B: Backend,
    T: KvElement,
    Q: DeviceRead<T, B>,
    C: DeviceRead<T, B>,
    P: DeviceRead<i32, B>,
    I: DeviceRead<i32, B>,
    S: DeviceRead<u32, B>,
    O: DeviceWrite<T, B>,
    L: DeviceWrite<f32, B>,
{
    let (pp, dp) = (&plan.proximal, &plan.distant);
    let l = &pp.layout;
    let (d, rows) = (l.head_dim(), plan.rows());
    let elems = l.elements() as usize;
    for (name, buf, n, what) in [
        ("cache", cache, elems, "layout.elements()"),
        ("leader_cache", leader_cache, elems, "layout.elements()"),
        ("v_pool", v_pool, elems / 2, "layout.v_pool_elements()"),
    ] {
        owned(dev, name, buf)?;
        exactly(name, buf.len(), n, what)?;
    }
    check_query::<B, T, Q>(dev, pp.elem, "q", q, rows * d)?;
    check_query::<B, T, Q>(dev, pp.elem, "q_leader", q_leader, rows * d)?;
    for (t, p) in [(&proximal, pp), (&distant, dp)] {
        check_table_buffers(
            dev,
            p.batch,
            p.n_page_indices,
            t.page_indptr,
            t.page_indices,
            t.seq_lens,
        )?;
    }
    let n = plan.n_splits();
    check_outputs::<B, T, O, L>(dev, o, lse, ws, rows, d, n)?;
    let (cp, _x) = cache.addr(dev);
    let (lcp, _y) = leader_cache.addr(dev);
    let (vp, _z) = v_pool.addr(dev);
    check_aligned("cache", cp, 16)?;
    check_aligned("leader_cache", lcp, 16)?;
    check_aligned("v_pool", vp, 16)?;
    let (qp, _a) = q.addr(dev);
    let (qlp, _b) = q_leader.addr(dev);
    check_aligned("q", qp, 16)?;
    check_aligned("q_leader", qlp, 16)?;
    let (pip, _c) = proximal.page_indptr.addr(dev);
    let (pxp, _d) = proximal.page_indices.addr(dev);
    let (psp, _e) = proximal.seq_lens.addr(dev);
    let (dip, _f) = distant.page_indptr.addr(dev);
    let (dxp, _g) = distant.page_indices.addr(dev);
    let (dsp, _h) = distant.seq_lens.addr(dev);
    let (op, _i) = o.addr_mut(dev);
    let (lp, _j) = lse.addr_mut(dev);
    let (opp, _k) = ws.o_part.addr_mut(dev);
    let (lpp, _l) = ws.lse_part.addr_mut(dev);
    let (stp, _m) = ws.status.arm(dev, pp.batch)?;
    let prox = pp.params(qp, cp, None, (pip, pxp, psp), (opp, lpp, stp), (0, n));
    let mut dist = dp.params(
        qlp,
        lcp,
        None,
        (dip, dxp, dsp),
        (opp, lpp, stp),
        (pp.n_splits, n),
    );
    dist.v_cache = vp as *const c_void;
    dist.v_page_stride = (l.num_kv_heads() * l.page_size() * d) as i64;
    dist.v_start = 0;
    let kernel = &pp.launches()[0].kernel;
    launch_kernel(
        dev,
        Family::Attention,
        kernel,
        pp.decode_config(),
        &prox,
        None,
    )?;
    launch_kernel(
        dev,
        Family::Attention,
        kernel,
        dp.decode_config(),
        &dist,
        None,
    )?;
    launch_merge(dev, pp.elem, (opp, lpp), (op, lp), rows, n, d)
}

/// Copies the values of whole pages of a bf16/f16 `cache` into a V pool (inter-layer sharing): the values
/// of `src_pages[i]` (every KV head and slot) go to page `dst_pages[i]` of `v_pool`. This is how a member
/// layer's tokens turn distant: copy their values into its pool at the pages where the leader keeps their
/// keys, then free the member's pages. Checked on the host: lists of equal length, pages in range, no
/// destination twice. The two page lists are uploaded (a few bytes per page).
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::attention::{copy_values, Kv, KvFormat, PagedKvLayout};
/// use half::f16;
/// let dev = fusekit::emu::Emulator::new()?;
/// let l = PagedKvLayout::new(4, 16, 2, 64, KvFormat::F16)?;
/// let host: Vec<f16> = (0..l.elements()).map(|i| f16::from_f32((i % 1000) as f32)).collect();
/// let cache = dev.upload(&host)?;
/// let mut pool = dev.alloc_zeros::<f16>(l.v_pool_elements()? as usize)?;
/// copy_values(&dev, &l, &cache, &mut pool, &[1, 3], &[2, 0])?;
/// let got = dev.download(&pool)?;
/// // Page 2 of the pool: the values of cache page 1, head 1, slot 5, channel 7.
/// let at = ((2 * 2 + 1) * 16 + 5) * 64 + 7;
/// assert_eq!(got[at], host[l.offset(Kv::V, 1, 1, 5, 7) as usize]);
/// # Ok(()) }
/// ```
pub fn copy_values<B, T, C, VP>(
    dev: &B,
    layout: &PagedKvLayout,
    cache: &C,
    v_pool: &mut VP,
    src_pages: &[i32],
    dst_pages: &[i32],
) -> Result<()>
where
    B: Backend,
    T: KvElement,
    C: DeviceRead<T, B>,
    VP: DeviceWrite<T, B>,
{
    if layout.format() != T::FORMAT {
        return Err(Error::DType {
            arg: "cache",
            expected: format!("{:?} (the layout's format)", layout.format()),
            got: T::SUFFIX.to_string(),
        });
    }
    let pool_elems = layout.v_pool_elements()? as usize;
    owned(dev, "cache", cache)?;
    owned(dev, "v_pool", v_pool)?;
    exactly(
        "cache",
        cache.len(),
        layout.elements() as usize,
        "layout.elements()",
    )?;
    exactly(
        "v_pool",
        v_pool.len(),
        pool_elems,
        "layout.v_pool_elements()",
    )?;
    exactly(
        "dst_pages",
        dst_pages.len(),
        src_pages.len(),
        "src_pages.len()",
    )?;
    let np = layout.num_pages();
    let mut seen = vec![false; np];
    for (arg, list) in [("src_pages", src_pages), ("dst_pages", dst_pages)] {
        if let Some((i, &p)) = list
            .iter()
            .enumerate()
            .find(|(_, &p)| p < 0 || p as usize >= np)
        {
            return Err(Error::OutOfRange {
                arg,
                index: i,
                value: p as i64,
                allowed: format!("[0, {np})"),
            });
        }
    }
    for (i, &p) in dst_pages.iter().enumerate() {
        if std::mem::replace(&mut seen[p as usize], true) {
            return Err(Error::invalid(
                "dst_pages",
                format!("page {p} is a destination twice (entry {i})"),
            ));
        }
    }
    if src_pages.is_empty() {
        return Ok(());
    }
    let (sl, dl) = (dev.upload(src_pages)?, dev.upload(dst_pages)?);
    let (cp, _a) = cache.addr(dev);
    let (vp, _b) = v_pool.addr_mut(dev);
    check_aligned("cache", cp, 16)?;
    check_aligned("v_pool", vp, 16)?;
    let (sp, _c) = sl.addr(dev);
    let (dp, _d) = dl.addr(dev);
    let run = (layout.num_kv_heads() * layout.page_size() * layout.head_dim() * 2) as i64;
    let p = fk_attn_copy_values_params {
        src: cp as *const c_void,
        dst: vp as *mut c_void,
        src_pages: sp as *const i32,
        dst_pages: dp as *const i32,
        status: std::ptr::null_mut(),
        n: src_pages.len() as i64,
        src_num_pages: np as i64,
        dst_num_pages: np as i64,
        src_page_stride: 2 * run,
        src_start: run,
        dst_page_stride: run,
        dst_start: 0,
        run_bytes: run,
    };
    launch_kernel(
        dev,
        Family::Attention,
        "fk_attn_copy_values",
        grid(src_pages.len().min(1 << 16), FK_ATTN_COPY_THREADS),
        &p,
        None,
    )
}
