//! Inter-layer sharing of distant tokens (PoD): the shared decode, its plan, the V pool and the copy
//! of values into it. The method is described on [`SharedDecodePlan`].

use super::status::StatusWord;
use std::ffi::c_void;

use super::cache::{KvElement, PageTable, PagedKvLayout, RopeMode};
use super::decode::{
    check_outputs, check_query, check_table_buffers, launch_merge, DecodePlan, DecodeWorkspace,
};
use super::kivi::check_quant_buffers;
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
    /// `p` of the leader's cache. A quantised cache's pool is bytes ([`v_pool_bytes`](Self::v_pool_bytes)):
    /// `Err(DType)`.
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
            return Err(Error::DType {
                arg: "layout",
                expected: "bf16/f16 elements (a quantised cache's V pool is bytes: v_pool_bytes)"
                    .into(),
                got: format!("{:?}", self.format()),
            });
        }
        Ok(self.elements() / 2)
    }

    /// Bytes of one page of a V pool. bf16/f16: `2 · num_kv_heads · page_size · head_dim`. KIVI
    /// int8/int4: the page's V codes (`[num_kv_heads][page_size][code_row_bytes]`), then its V
    /// parameters (a (scale, zero) f16 pair per token, head and V group), rounded up to 16 bytes. The K
    /// codes and K parameters of the cache's page are not in the pool: they are what a member layer
    /// saves on its distant tokens.
    ///
    /// ```
    /// use fusekit::attention::{KvFormat, PagedKvLayout};
    /// let l = PagedKvLayout::new(10, 16, 3, 64, KvFormat::Bf16)?;
    /// assert_eq!(l.v_pool_page_bytes(), 3 * 16 * 64 * 2);
    /// let q = PagedKvLayout::new(10, 16, 3, 64, KvFormat::Int4 { group: 32 })?;
    /// // V codes 3·16·32 B, V parameters 3·16·2·4 B; the cache's page also holds the K codes and the
    /// // K parameters (3 heads · 64 channels · 4 B).
    /// assert_eq!(q.v_pool_page_bytes(), 1536 + 384);
    /// assert_eq!(q.page_bytes(), 2 * 1536 + 3 * 64 * 4 + 384);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn v_pool_page_bytes(&self) -> u64 {
        let (codes, params) = self.v_pool_sections();
        codes + params.div_ceil(16) * 16
    }

    /// Bytes of a V pool: [`num_pages`](Self::num_pages) × [`v_pool_page_bytes`](Self::v_pool_page_bytes)
    /// (for bf16/f16, 2 × [`v_pool_elements`](Self::v_pool_elements)).
    ///
    /// ```
    /// use fusekit::attention::{KvFormat, PagedKvLayout};
    /// let l = PagedKvLayout::new(10, 16, 3, 64, KvFormat::Int8 { group: 64 })?;
    /// assert_eq!(l.v_pool_bytes(), 10 * l.v_pool_page_bytes());
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn v_pool_bytes(&self) -> u64 {
        self.num_pages() as u64 * self.v_pool_page_bytes()
    }

    /// Bytes of a V pool page's values and (quantised) V parameters, unpadded.
    fn v_pool_sections(&self) -> (u64, u64) {
        let rows = (self.num_kv_heads() * self.page_size()) as u64;
        match self.format().group() {
            None => (rows * self.head_dim() as u64 * 2, 0),
            Some(_) => (
                rows * self.code_row_bytes() as u64,
                rows * (self.head_dim() / self.v_group()) as u64 * 4,
            ),
        }
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
/// after RoPE, q rotated by the caller, as most engines do).
///
/// **KIVI int8/int4 caches** ([`new_quantized`](Self::new_quantized), [`decode_shared_quantized`],
/// [`copy_values_quantized`]): the proximal part reads the layer's own cache and residual as
/// [`decode_quantized`](super::decode_quantized) does; the distant part reads the leader's K codes with
/// their per-channel group parameters and the member's V codes with their per-token parameters from a
/// V pool of bytes ([`v_pool_page_bytes`](PagedKvLayout::v_pool_page_bytes)). Distant tokens never
/// come from a residual: each sequence's distant tokens are whole token groups, and must be a range of
/// the leader's sequence that starts at a multiple of `lcm(page_size, group)` (so the distant table's
/// groups are the leader's groups, and their K parameters sit in the table's pages), which is what
/// [`Retention::evicted`](super::Retention::evicted) gives. A member layer then saves the K codes and K
/// parameters of its distant tokens: `1 − v_pool_page_bytes / page_bytes` of their bytes.
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
        check_shared(layout, cfg)?;
        if layout.format() != T::FORMAT {
            return Err(Error::DType {
                arg: "cache",
                expected: format!(
                    "{:?} (the layout's format; a quantised cache takes SharedDecodePlan::new_quantized)",
                    layout.format()
                ),
                got: T::SUFFIX.to_string(),
            });
        }
        let proximal_plan = DecodePlan::new::<T>(layout, proximal, cfg, split_size)?;
        Self::with_distant::<T>(proximal_plan, distant, split_size)
    }

    /// Validates a shared decode over KIVI int8/int4 caches whose query, output and residual are `T`:
    /// as [`new`](Self::new), the proximal part as
    /// [`DecodePlan::new_quantized`](super::DecodePlan::new_quantized) (the layer's residual slots), and
    /// every distant sequence whole token groups (`Err(InvalidArgument)` naming `distant.seq_lens`
    /// otherwise).
    ///
    /// ```
    /// use fusekit::attention::{DecodeConfig, KvFormat, PageTable, PagedKvLayout, SharedDecodePlan};
    /// let l = PagedKvLayout::new(64, 16, 3, 64, KvFormat::Int4 { group: 32 })?;
    /// // Sequence 0: 32 sinks and a 40-token window on 5 pages of its own (8 tokens in its residual
    /// // slot), 96 distant tokens (3 groups) on the leader's pages 10..16.
    /// let prox = PageTable { page_indptr: &[0, 5], page_indices: &[0, 1, 2, 3, 4], seq_lens: &[72] };
    /// let dist = PageTable { page_indptr: &[0, 6], page_indices: &[10, 11, 12, 13, 14, 15], seq_lens: &[96] };
    /// let cfg = DecodeConfig::new(9);
    /// let plan = SharedDecodePlan::new_quantized::<half::bf16>(&l, &prox, &dist, &[0], 1, &cfg, Some(64))?;
    /// assert_eq!(plan.n_splits(), 2 + 2);
    /// // 80 distant tokens are not whole groups of 32.
    /// let short = PageTable { page_indices: &[10, 11, 12, 13, 14], seq_lens: &[80], page_indptr: &[0, 5] };
    /// assert!(SharedDecodePlan::new_quantized::<half::bf16>(&l, &prox, &short, &[0], 1, &cfg, None).is_err());
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn new_quantized<T: KvElement>(
        layout: &PagedKvLayout,
        proximal: &PageTable<'_>,
        distant: &PageTable<'_>,
        residual_slots: &[i32],
        slots: usize,
        cfg: &DecodeConfig,
        split_size: Option<usize>,
    ) -> Result<Self> {
        check_shared(layout, cfg)?;
        let proximal_plan = DecodePlan::build_quantized::<T>(
            layout,
            proximal,
            (residual_slots, slots),
            cfg,
            split_size,
            "SharedDecodePlan::new",
        )?;
        if let Some(g) = layout.format().group() {
            if let Some((b, &n)) = distant
                .seq_lens
                .iter()
                .enumerate()
                .find(|(_, &n)| n as usize % g != 0)
            {
                return Err(Error::invalid(
                    "distant.seq_lens",
                    format!(
                        "sequence {b} has {n} distant tokens, not whole groups of {g}: distant tokens \
                         are a range of the leader's sequence starting at a multiple of \
                         lcm(page_size, group), as Retention::evicted gives"
                    ),
                ));
            }
        }
        Self::with_distant::<T>(proximal_plan, distant, split_size)
    }

    /// The distant part of a plan whose proximal part is made: the same batch, configuration and split
    /// size, sequences that may be empty, no residual.
    fn with_distant<T: KvElement>(
        proximal_plan: DecodePlan,
        distant: &PageTable<'_>,
        split_size: Option<usize>,
    ) -> Result<Self> {
        if distant.seq_lens.len() != proximal_plan.batch {
            return Err(Error::shape(
                "distant.seq_lens",
                format!("the proximal table's batch, {}", proximal_plan.batch),
                format!("{}", distant.seq_lens.len()),
            ));
        }
        let (layout, cfg) = (proximal_plan.layout, proximal_plan.cfg);
        let distant_plan = DecodePlan::build::<T>(&layout, distant, &cfg, split_size, None, true)?;
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

/// What every shared plan requires of its cache and configuration: no RoPE in the kernels, no window.
fn check_shared(layout: &PagedKvLayout, cfg: &DecodeConfig) -> Result<()> {
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
    Ok(())
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
    if plan.proximal.slots.is_some() {
        return Err(Error::DType {
            arg: "cache",
            expected:
                "bf16/f16 elements: this plan is for a quantised cache (decode_shared_quantized)"
                    .into(),
            got: T::SUFFIX.to_string(),
        });
    }
    let elems = plan.proximal.layout.elements() as usize;
    for (name, buf, n, what) in [
        ("cache", cache, elems, "layout.elements()"),
        ("leader_cache", leader_cache, elems, "layout.elements()"),
        ("v_pool", v_pool, elems / 2, "layout.v_pool_elements()"),
    ] {
        owned(dev, name, buf)?;
        exactly(name, buf.len(), n, what)?;
    }
    let (cp, _x) = cache.addr(dev);
    let (lcp, _y) = leader_cache.addr(dev);
    let (vp, _z) = v_pool.addr(dev);
    launch_shared::<B, T, Q, P, I, S, O, L>(
        dev,
        plan,
        (q, cp, None),
        proximal,
        (q_leader, lcp, vp),
        distant,
        ws,
        o,
        lse,
    )
}

/// [`decode_shared`] over KIVI int8/int4 caches (see [`SharedDecodePlan`] and
/// [`SharedDecodePlan::new_quantized`]): the proximal part is `q` over the layer's own quantised `cache`
/// (its bytes), its `residual` and `residual_slots` (as [`decode_quantized`](super::decode_quantized))
/// through `proximal`; the distant part is `q_leader` over the K codes and parameters of
/// `leader_cache` (the leader's quantised cache, same layout) and the V codes and parameters of
/// `v_pool` ([`v_pool_bytes`](PagedKvLayout::v_pool_bytes), filled by [`copy_values_quantized`])
/// through `distant`. A device distant sequence that is not whole token groups, like any device table
/// that disagrees with the plan, comes out NaN and [`DecodeWorkspace::check_status_sync`] names it.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::attention::{copy_values_quantized, decode_shared_quantized, pack_quantized, DecodeConfig, DecodeWorkspace, DeviceTable, KvFormat, PageTable, PagedKvLayout, SharedDecodePlan};
/// use half::bf16;
/// let dev = fusekit::emu::Emulator::new()?;
/// let l = PagedKvLayout::new(4, 32, 1, 64, KvFormat::Int8 { group: 32 })?;
/// let fill = |v: f64| -> Vec<f64> { (0..l.elements()).map(|i| if (i / 2048) % 2 == 1 { v } else { 0.0 }).collect() };
/// let prox = PageTable { page_indptr: &[0, 2], page_indices: &[0, 1], seq_lens: &[40] };
/// let dist = PageTable { page_indptr: &[0, 1], page_indices: &[2], seq_lens: &[32] };
/// // The member layer: 40 proximal tokens on its pages 0, 1 (keys 0, values 1; 8 in its residual slot).
/// let member = pack_quantized::<bf16>(&l, &fill(1.0), &prox, &[0], 1)?;
/// // The leader: 32 distant tokens on its page 2 (keys 0). The member's values of those tokens (4), on
/// // page 2 of the member's cache before it freed it, go to page 2 of the pool.
/// let leader = pack_quantized::<bf16>(&l, &fill(0.0), &dist, &[0], 1)?;
/// let before = pack_quantized::<bf16>(&l, &fill(4.0), &dist, &[0], 1)?;
/// let plan = SharedDecodePlan::new_quantized::<bf16>(&l, &prox, &dist, &[0], 1, &DecodeConfig::new(1), None)?;
/// let (cache, res, slots) = (dev.upload(&member.bytes)?, dev.upload(&member.residual)?, dev.upload(&[0i32])?);
/// let leader = dev.upload(&leader.bytes)?;
/// let mut pool = dev.alloc_zeros::<u8>(l.v_pool_bytes() as usize)?;
/// copy_values_quantized(&dev, &l, &dev.upload(&before.bytes)?, &mut pool, &[2], &[2])?;
/// let q = dev.upload(&vec![bf16::ZERO; 64])?;
/// let up = |t: &PageTable| -> fusekit::Result<_> { Ok((dev.upload(t.page_indptr)?, dev.upload(t.page_indices)?, dev.upload(t.seq_lens)?)) };
/// let ((pi, px, pl), (di, dx, dl)) = (up(&prox)?, up(&dist)?);
/// let mut ws = DecodeWorkspace::for_shared(&dev, &plan)?;
/// let (mut o, mut lse) = (dev.alloc_zeros::<bf16>(64)?, dev.alloc_zeros::<f32>(1)?);
/// decode_shared_quantized(
///     &dev, &plan,
///     &q, &cache, &res, &slots, DeviceTable { page_indptr: &pi, page_indices: &px, seq_lens: &pl },
///     &q, &leader, &pool, DeviceTable { page_indptr: &di, page_indices: &dx, seq_lens: &dl },
///     &mut ws, &mut o, &mut lse,
/// )?;
/// ws.check_status_sync(&dev)?;
/// // 72 equal scores: 40 tokens with value 1, 32 with value 4.
/// assert!(dev.download(&o)?.iter().all(|&x| (x.to_f32() - 168.0 / 72.0).abs() < 2e-2));
/// assert!((dev.download(&lse)?[0] - 72f32.ln()).abs() < 1e-5);
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn decode_shared_quantized<B, T, Q, C, R, RS, P, I, S, O, L>(
    dev: &B,
    plan: &SharedDecodePlan,
    q: &Q,
    cache: &C,
    residual: &R,
    residual_slots: &RS,
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
    C: DeviceRead<u8, B>,
    R: DeviceRead<T, B>,
    RS: DeviceRead<i32, B>,
    P: DeviceRead<i32, B>,
    I: DeviceRead<i32, B>,
    S: DeviceRead<u32, B>,
    O: DeviceWrite<T, B>,
    L: DeviceWrite<f32, B>,
{
    let pp = &plan.proximal;
    let l = &pp.layout;
    let slots = check_quant_buffers::<B, T, C, R, RS>(
        dev,
        "decode_shared",
        l,
        pp.slots,
        pp.batch,
        cache,
        residual,
        residual_slots,
    )?;
    for (name, buf, n, what) in [
        ("leader_cache", leader_cache, l.bytes(), "layout.bytes()"),
        ("v_pool", v_pool, l.v_pool_bytes(), "layout.v_pool_bytes()"),
    ] {
        owned(dev, name, buf)?;
        exactly(name, buf.len(), n as usize, what)?;
    }
    let (cp, _x) = cache.addr(dev);
    let (rp, _r) = residual.addr(dev);
    let (sp, _s) = residual_slots.addr(dev);
    check_aligned("residual", rp, 16)?;
    let (lcp, _y) = leader_cache.addr(dev);
    let (vp, _z) = v_pool.addr(dev);
    launch_shared::<B, T, Q, P, I, S, O, L>(
        dev,
        plan,
        (q, cp, Some((rp, sp, slots))),
        proximal,
        (q_leader, lcp, vp),
        distant,
        ws,
        o,
        lse,
    )
}

/// The checks both shared decodes share and the three launches (proximal, distant, merge): the
/// member's `q`, cache address and quantised residual (address, slots address, slot count); the
/// leader's q, cache address and the V pool's address.
#[allow(clippy::too_many_arguments)]
fn launch_shared<B, T, Q, P, I, S, O, L>(
    dev: &B,
    plan: &SharedDecodePlan,
    (q, cp, quant): (&Q, u64, Option<(u64, u64, usize)>),
    proximal: DeviceTable<'_, P, I, S>,
    (q_leader, lcp, vp): (&Q, u64, u64),
    distant: DeviceTable<'_, P, I, S>,
    ws: &mut DecodeWorkspace<B>,
    o: &mut O,
    lse: &mut L,
) -> Result<()>
where
    B: Backend,
    T: KvElement,
    Q: DeviceRead<T, B>,
    P: DeviceRead<i32, B>,
    I: DeviceRead<i32, B>,
    S: DeviceRead<u32, B>,
    O: DeviceWrite<T, B>,
    L: DeviceWrite<f32, B>,
{
    let (pp, dp) = (&plan.proximal, &plan.distant);
    let l = &pp.layout;
    let (d, rows) = (l.head_dim(), plan.rows());
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
    let prox = pp.params(qp, cp, quant, (pip, pxp, psp), (opp, lpp, stp), (0, n));
    // The distant part: no residual (whole groups; the kernel checks the device lengths), values
    // from the pool.
    let mut dist = dp.params(
        qlp,
        lcp,
        None,
        (dip, dxp, dsp),
        (opp, lpp, stp),
        (pp.n_splits, n),
    );
    let (codes, _) = l.v_pool_sections();
    dist.v_cache = vp as *const c_void;
    dist.v_start = 0;
    if l.format().group().is_some() {
        dist.v_page_stride = l.v_pool_page_bytes() as i64;
        dist.v_params_start = codes as i64;
    } else {
        dist.v_page_stride = (l.num_kv_heads() * l.page_size() * d) as i64;
    }
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
            expected: format!(
                "{:?} (the layout's format; a quantised cache takes copy_values_quantized)",
                layout.format()
            ),
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
    check_copy_lists(layout, src_pages, dst_pages)?;
    let (cp, _a) = cache.addr(dev);
    let (vp, _b) = v_pool.addr_mut(dev);
    let run = (layout.num_kv_heads() * layout.page_size() * layout.head_dim() * 2) as i64;
    launch_copies(
        dev,
        layout,
        (cp, vp),
        (src_pages, dst_pages),
        (2 * run, run),
        &[(run, 0, run)],
    )
}

/// [`copy_values`] for a KIVI int8/int4 cache: the V codes and V parameters of `src_pages[i]` of the
/// quantised `cache` (its bytes) go to page `dst_pages[i]` of `v_pool`
/// ([`v_pool_bytes`](PagedKvLayout::v_pool_bytes)), as [`decode_shared_quantized`] reads them. The
/// same host checks; two copies per page (codes, then parameters), bit for bit.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::attention::{copy_values_quantized, KvFormat, PagedKvLayout};
/// let dev = fusekit::emu::Emulator::new()?;
/// let l = PagedKvLayout::new(4, 16, 2, 64, KvFormat::Int4 { group: 32 })?;
/// let host: Vec<u8> = (0..l.bytes()).map(|i| (i % 251) as u8).collect();
/// let cache = dev.upload(&host)?;
/// let mut pool = dev.alloc_zeros::<u8>(l.v_pool_bytes() as usize)?;
/// copy_values_quantized(&dev, &l, &cache, &mut pool, &[1, 3], &[2, 0])?;
/// let got = dev.download(&pool)?;
/// // Page 2 of the pool starts with the V codes of cache page 1 (head 0, slot 0).
/// let at = l.code_offset(fusekit::attention::Kv::V, 1, 0, 0) as usize;
/// let pp = l.v_pool_page_bytes() as usize;
/// assert_eq!(&got[2 * pp..2 * pp + 32], &host[at..at + 32]);
/// # Ok(()) }
/// ```
pub fn copy_values_quantized<B, C, VP>(
    dev: &B,
    layout: &PagedKvLayout,
    cache: &C,
    v_pool: &mut VP,
    src_pages: &[i32],
    dst_pages: &[i32],
) -> Result<()>
where
    B: Backend,
    C: DeviceRead<u8, B>,
    VP: DeviceWrite<u8, B>,
{
    if layout.format().group().is_none() {
        return Err(Error::DType {
            arg: "layout",
            expected: "a quantised format (Int8 or Int4); bf16/f16 caches take copy_values".into(),
            got: format!("{:?}", layout.format()),
        });
    }
    owned(dev, "cache", cache)?;
    owned(dev, "v_pool", v_pool)?;
    exactly(
        "cache",
        cache.len(),
        layout.bytes() as usize,
        "layout.bytes()",
    )?;
    exactly(
        "v_pool",
        v_pool.len(),
        layout.v_pool_bytes() as usize,
        "layout.v_pool_bytes()",
    )?;
    check_copy_lists(layout, src_pages, dst_pages)?;
    let (cp, _a) = cache.addr(dev);
    let (vp, _b) = v_pool.addr_mut(dev);
    let (_, v_codes, _, v_params) = layout.quant_sections();
    let (codes, params) = layout.v_pool_sections();
    // The V parameters are the page's last section and the page is padded to 16 bytes after them, so
    // the padded run stays inside the source page.
    let params = params.div_ceil(16) * 16;
    launch_copies(
        dev,
        layout,
        (cp, vp),
        (src_pages, dst_pages),
        (
            layout.page_bytes() as i64,
            layout.v_pool_page_bytes() as i64,
        ),
        &[
            (v_codes, 0, codes as i64),
            (v_params, codes as i64, params as i64),
        ],
    )
}

/// The page lists of a copy into a V pool: equal lengths, pages in range, no destination twice.
fn check_copy_lists(layout: &PagedKvLayout, src_pages: &[i32], dst_pages: &[i32]) -> Result<()> {
    exactly(
        "dst_pages",
        dst_pages.len(),
        src_pages.len(),
        "src_pages.len()",
    )?;
    let np = layout.num_pages();
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
    let mut seen = vec![false; np];
    for (i, &p) in dst_pages.iter().enumerate() {
        if std::mem::replace(&mut seen[p as usize], true) {
            return Err(Error::invalid(
                "dst_pages",
                format!("page {p} is a destination twice (entry {i})"),
            ));
        }
    }
    Ok(())
}

/// Uploads the page lists and launches `fk_attn_copy_values` once per run `(source start, destination
/// start, bytes)` of every listed page; `(src_stride, dst_stride)`: bytes per page of the cache and the
/// pool.
fn launch_copies<B: Backend>(
    dev: &B,
    layout: &PagedKvLayout,
    (cp, vp): (u64, u64),
    (src_pages, dst_pages): (&[i32], &[i32]),
    (src_stride, dst_stride): (i64, i64),
    runs: &[(i64, i64, i64)],
) -> Result<()> {
    check_aligned("cache", cp, 16)?;
    check_aligned("v_pool", vp, 16)?;
    if src_pages.is_empty() {
        return Ok(());
    }
    let (sl, dl) = (dev.upload(src_pages)?, dev.upload(dst_pages)?);
    let (sp, _c) = sl.addr(dev);
    let (dp, _d) = dl.addr(dev);
    let np = layout.num_pages() as i64;
    for &(src_start, dst_start, run_bytes) in runs {
        debug_assert!(src_start % 16 == 0 && dst_start % 16 == 0 && run_bytes % 16 == 0);
        let p = fk_attn_copy_values_params {
            src: cp as *const c_void,
            dst: vp as *mut c_void,
            src_pages: sp as *const i32,
            dst_pages: dp as *const i32,
            status: std::ptr::null_mut(),
            n: src_pages.len() as i64,
            src_num_pages: np,
            dst_num_pages: np,
            src_page_stride: src_stride,
            src_start,
            dst_page_stride: dst_stride,
            dst_start,
            run_bytes,
        };
        launch_kernel(
            dev,
            Family::Attention,
            "fk_attn_copy_values",
            grid(src_pages.len().min(1 << 16), FK_ATTN_COPY_THREADS),
            &p,
            None,
        )?;
    }
    Ok(())
}
