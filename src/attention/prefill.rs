//! Causal prefill over a paged bf16/f16 cache: the plan (validated on the host, without a device), the
//! workspace (the page-table status word), and the launch of the tensor-core flash-attention kernel.

use super::decode::check_table_buffers;
use super::kivi::{check_quant_buffers, check_quant_plan};
use super::status::StatusWord;
use std::ffi::c_void;

use cudarc::driver::LaunchConfig;

use super::cache::{PageTable, PagedKvLayout};
use super::{DecodeConfig, KvElement};
use crate::device::{check_aligned, Family};
use crate::error::{Error, Result};
use crate::launch::launch_kernel;
use crate::params::*;
use crate::plan::PlannedLaunch;
use crate::validate::{exactly, owned};
use crate::{Backend, DeviceRead, DeviceWrite};

/// Checks `qo_indptr` against a (checked) page table: `batch + 1` entries from 0, non-decreasing, and
/// no sequence with more new tokens than it holds in the cache. Returns the total of new tokens.
pub(crate) fn check_qo_indptr(table: &PageTable<'_>, qo_indptr: &[i32]) -> Result<usize> {
    let batch = table.seq_lens.len();
    if qo_indptr.len() != batch + 1 {
        return Err(Error::shape(
            "qo_indptr",
            format!("batch + 1 = {} entries", batch + 1),
            format!("{}", qo_indptr.len()),
        ));
    }
    if qo_indptr[0] != 0 {
        return Err(Error::invalid(
            "qo_indptr",
            format!("must start at 0, got {}", qo_indptr[0]),
        ));
    }
    for b in 0..batch {
        let (lo, hi) = (qo_indptr[b], qo_indptr[b + 1]);
        if hi < lo {
            return Err(Error::invalid(
                "qo_indptr",
                format!("decreases at sequence {b}: {lo} then {hi}"),
            ));
        }
        let (q, len) = ((hi - lo) as u64, table.seq_lens[b] as u64);
        if q > len {
            return Err(Error::invalid(
                "qo_indptr",
                format!(
                    "sequence {b} has {q} new tokens but {len} tokens in the cache (the cache holds \
                     the new tokens too: at most seq_lens[b])"
                ),
            ));
        }
    }
    Ok(qo_indptr[batch] as usize)
}

/// The validated plan of a [`prefill`]: shapes, the grid (query tiles × KV heads × sequences) and the
/// kernel, from the host's copies of the page table and `qo_indptr`, without a device. The
/// configuration is a [`DecodeConfig`] (query heads, scale, softcap, window), with the same meaning
/// per query: query `i` of a sequence's `q_len` new tokens sits at position `seq_len − q_len + i` and
/// attends to the cache tokens up to it (the last `window` of them with a window).
///
/// ```
/// use fusekit::attention::{DecodeConfig, KvFormat, PageTable, PagedKvLayout, PrefillPlan};
/// let l = PagedKvLayout::new(64, 16, 8, 128, KvFormat::Bf16)?;
/// // Two sequences: 100 cached + 30 new tokens, and 50 new tokens alone.
/// let idx: Vec<i32> = (0..13).collect();
/// let t = PageTable { page_indptr: &[0, 9, 13], page_indices: &idx, seq_lens: &[130, 50] };
/// let plan = PrefillPlan::new::<half::bf16>(&l, &t, &[0, 30, 80], &DecodeConfig::new(32))?;
/// assert_eq!(plan.total_q(), 80);
/// // 4 query heads per KV head: 50 tokens are 200 packed rows, 4 tiles of 64.
/// assert_eq!(plan.launches()[0].grid, 4);
/// assert_eq!(plan.launches()[0].kernel, "fk_attn_prefill_bf16_d128");
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct PrefillPlan {
    layout: PagedKvLayout,
    cfg: DecodeConfig,
    batch: usize,
    n_page_indices: usize,
    total_q: usize,
    q_tiles: usize,
    elem: &'static str,
    /// Residual slots of a quantised cache (`None`: a bf16/f16 cache).
    slots: Option<usize>,
}

impl PrefillPlan {
    /// Validates a prefill of `T` elements: the layout's format is `T`'s, the page table fits the
    /// layout, `qo_indptr` fits the page table ([`batch + 1`] entries from 0, non-decreasing, at most
    /// `seq_lens[b]` new tokens in sequence `b`), the configuration fits the cache, at most 65535
    /// sequences and KV heads, and fewer than 2^31 packed rows (`q_len · group`) per sequence. The
    /// layout's RoPE mode is honoured as in decode: q rotated at its token's position, and with
    /// `InAttention` each key at its index in the cache (in shared memory, per K tile).
    pub fn new<T: KvElement>(
        layout: &PagedKvLayout,
        table: &PageTable<'_>,
        qo_indptr: &[i32],
        cfg: &DecodeConfig,
    ) -> Result<Self> {
        if layout.format() != T::FORMAT {
            return Err(Error::DType {
                arg: "cache",
                expected: format!(
                    "{:?} (the layout's format; a quantised cache takes PrefillPlan::new_quantized)",
                    layout.format()
                ),
                got: T::SUFFIX.to_string(),
            });
        }
        Self::build::<T>(layout, table, qo_indptr, cfg, None)
    }

    /// Validates a prefill over a quantised (KIVI int8/int4) cache whose query, output and residual are
    /// `T`: as [`new`](Self::new), plus the residual slots (`residual_slots[b]` is sequence `b`'s slot
    /// in a residual of `slots` slots; each in range, none shared), as
    /// [`DecodePlan::new_quantized`](super::DecodePlan::new_quantized). The kernel dequantises each
    /// K/V tile in shared memory (to `T`, see [`prefill_quantized`]).
    ///
    /// ```
    /// use fusekit::attention::{DecodeConfig, KvFormat, PageTable, PagedKvLayout, PrefillPlan};
    /// let l = PagedKvLayout::new(8, 16, 2, 128, KvFormat::Int4 { group: 32 })?;
    /// let t = PageTable { page_indptr: &[0, 3, 4], page_indices: &[0, 1, 2, 3], seq_lens: &[40, 9] };
    /// let plan = PrefillPlan::new_quantized::<half::bf16>(&l, &t, &[0, 8, 17], &[1, 0], 2, &DecodeConfig::new(4))?;
    /// assert_eq!(plan.launches()[0].kernel, "fk_attn_prefill_q4_bf16_d128");
    /// assert!(PrefillPlan::new_quantized::<half::bf16>(&l, &t, &[0, 8, 17], &[1, 2], 2, &DecodeConfig::new(4)).is_err());
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn new_quantized<T: KvElement>(
        layout: &PagedKvLayout,
        table: &PageTable<'_>,
        qo_indptr: &[i32],
        residual_slots: &[i32],
        slots: usize,
        cfg: &DecodeConfig,
    ) -> Result<Self> {
        check_quant_plan(
            layout,
            table.seq_lens.len(),
            residual_slots,
            slots,
            "PrefillPlan::new",
        )?;
        Self::build::<T>(layout, table, qo_indptr, cfg, Some(slots))
    }

    fn build<T: KvElement>(
        layout: &PagedKvLayout,
        table: &PageTable<'_>,
        qo_indptr: &[i32],
        cfg: &DecodeConfig,
        slots: Option<usize>,
    ) -> Result<Self> {
        layout.check_page_table(table)?;
        cfg.validate(layout)?;
        let total_q = check_qo_indptr(table, qo_indptr)?;
        let batch = table.seq_lens.len();
        if batch > 65535 || layout.num_kv_heads() > 65535 {
            return Err(Error::Unsupported {
                what: format!(
                    "a prefill of {batch} sequences over {} KV heads (at most 65535 of each per call)",
                    layout.num_kv_heads()
                ),
            });
        }
        let group = cfg.num_qo_heads / layout.num_kv_heads();
        let rows = FK_ATTN_PREFILL_ROWS as usize;
        let max_rows = qo_indptr
            .windows(2)
            .map(|w| (w[1] - w[0]) as u64 * group as u64)
            .max()
            .unwrap_or(0);
        let q_tiles = max_rows.div_ceil(rows as u64);
        if q_tiles * rows as u64 > i32::MAX as u64 || cfg.num_qo_heads > i32::MAX as usize {
            return Err(Error::Unsupported {
                what: format!(
                    "{max_rows} packed rows (new tokens x {group} query heads per KV head) in one \
                     sequence: at most 2^31 - 64"
                ),
            });
        }
        Ok(PrefillPlan {
            layout: *layout,
            cfg: *cfg,
            batch,
            n_page_indices: table.page_indices.len(),
            total_q,
            q_tiles: q_tiles as usize,
            elem: T::SUFFIX,
            slots,
        })
    }

    /// New tokens in the batch: the rows of `q` and `o` (`qo_indptr[batch]`).
    ///
    /// ```
    /// # use fusekit::attention::{DecodeConfig, KvFormat, PageTable, PagedKvLayout, PrefillPlan};
    /// let l = PagedKvLayout::new(4, 16, 1, 64, KvFormat::F16)?;
    /// let t = PageTable { page_indptr: &[0, 1, 2], page_indices: &[0, 1], seq_lens: &[5, 9] };
    /// assert_eq!(PrefillPlan::new::<half::f16>(&l, &t, &[0, 5, 7], &DecodeConfig::new(2))?.total_q(), 7);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn total_q(&self) -> usize {
        self.total_q
    }

    /// Rows of `lse`: new tokens × query heads.
    ///
    /// ```
    /// # use fusekit::attention::{DecodeConfig, KvFormat, PageTable, PagedKvLayout, PrefillPlan};
    /// let l = PagedKvLayout::new(4, 16, 2, 64, KvFormat::F16)?;
    /// let t = PageTable { page_indptr: &[0, 1], page_indices: &[2], seq_lens: &[9] };
    /// assert_eq!(PrefillPlan::new::<half::f16>(&l, &t, &[0, 4], &DecodeConfig::new(6))?.rows(), 24);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn rows(&self) -> usize {
        self.total_q * self.cfg.num_qo_heads
    }

    /// Dynamic shared memory of the kernel: the Q tile and two stages of K and V tiles (40, 80 and
    /// 96 KiB at head dims 64, 128 and 256; within the 99 KiB a block may opt into on sm_86/sm_89).
    /// Over a quantised cache: the Q tile, one stage of K and V tiles, and two stages of their codes and
    /// parameters (at most 43, 85 and 69 KiB; head dim 256 takes tiles of 16 tokens).
    ///
    /// ```
    /// # use fusekit::attention::{DecodeConfig, KvFormat, PageTable, PagedKvLayout, PrefillPlan};
    /// let l = PagedKvLayout::new(4, 16, 1, 256, KvFormat::F16)?;
    /// let t = PageTable { page_indptr: &[0, 1], page_indices: &[0], seq_lens: &[9] };
    /// assert_eq!(PrefillPlan::new::<half::f16>(&l, &t, &[0, 9], &DecodeConfig::new(1))?.shared_mem_bytes(), 96 << 10);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn shared_mem_bytes(&self) -> u32 {
        let d = self.layout.head_dim() as u32;
        let quant = self.slots.is_some();
        let kv_tile = match d {
            64 => FK_ATTN_PREFILL_KV_TILE_D64,
            128 => FK_ATTN_PREFILL_KV_TILE_D128,
            _ if quant => FK_ATTN_PREFILL_KV_TILE_Q_D256,
            _ => FK_ATTN_PREFILL_KV_TILE_D256,
        };
        if !quant {
            return (FK_ATTN_PREFILL_ROWS + 4 * kv_tile) * d * 2;
        }
        // kernels/attention/prefill.cu, qtiles: codes [2][2][tile][code row], K params
        // [2][groups a tile touches][d] and V params [2][tile][d / 32] words.
        let code_row = self.layout.code_row_bytes() as u32;
        let k_groups = (kv_tile - 1) / 32 + 2;
        (FK_ATTN_PREFILL_ROWS + 2 * kv_tile) * d * 2
            + 4 * kv_tile * code_row
            + 2 * k_groups * d * 4
            + 2 * kv_tile * (d / 32) * 4
    }

    /// The launch: one CTA per (query tile of 64 packed rows, KV head, sequence); none when the batch
    /// has no new token. `grid` is the query tiles of the longest sequence (the x extent).
    ///
    /// ```
    /// # use fusekit::attention::{DecodeConfig, KvFormat, PageTable, PagedKvLayout, PrefillPlan};
    /// let l = PagedKvLayout::new(4, 16, 2, 64, KvFormat::F16)?;
    /// let t = PageTable { page_indptr: &[0, 1], page_indices: &[3], seq_lens: &[5] };
    /// let plan = PrefillPlan::new::<half::f16>(&l, &t, &[0, 5], &DecodeConfig::new(2))?;
    /// assert_eq!(plan.launches()[0].kernel, "fk_attn_prefill_f16_d64");
    /// assert!(PrefillPlan::new::<half::f16>(&l, &t, &[0, 0], &DecodeConfig::new(2))?.launches().is_empty());
    /// // With RoPE in the kernel: its own instantiation.
    /// let r = fusekit::attention::Rope { theta: 1e4, style: fusekit::attention::RopeStyle::Half };
    /// let lr = l.with_rope(fusekit::attention::RopeMode::InAttention(r))?;
    /// let plan = PrefillPlan::new::<half::f16>(&lr, &t, &[0, 5], &DecodeConfig::new(2))?;
    /// assert_eq!(plan.launches()[0].kernel, "fk_attn_prefill_rope_f16_d64");
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn launches(&self) -> Vec<PlannedLaunch> {
        if self.q_tiles == 0 {
            return Vec::new();
        }
        let variant = match self.layout.format().group() {
            // Quantised: RoPE is a runtime choice in the one instantiation.
            Some(_) => format!("q{}_", self.layout.format().bits_per_code()),
            None if self.layout.rope() == super::RopeMode::None => String::new(),
            None => "rope_".into(),
        };
        vec![PlannedLaunch::new(
            format!(
                "fk_attn_prefill_{variant}{}_d{}",
                self.elem,
                self.layout.head_dim()
            ),
            self.config(),
        )]
    }

    fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                self.q_tiles as u32,
                self.layout.num_kv_heads() as u32,
                self.batch as u32,
            ),
            block_dim: (FK_ATTN_PREFILL_THREADS, 1, 1),
            shared_mem_bytes: self.shared_mem_bytes(),
        }
    }
}

/// Device scratch of a prefill: the page-table status word. Reusable for any plan.
#[derive(Debug)]
pub struct PrefillWorkspace<B: Backend> {
    status: StatusWord<B>,
}

impl<B: Backend> PrefillWorkspace<B> {
    /// Allocates a workspace on `dev`.
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// let dev = fusekit::emu::Emulator::new()?;
    /// let _ws = fusekit::attention::PrefillWorkspace::new(&dev)?;
    /// # Ok(()) }
    /// ```
    pub fn new(dev: &B) -> Result<Self> {
        Ok(PrefillWorkspace {
            status: StatusWord::new(dev)?,
        })
    }

    /// After a [`prefill`]: `Err(OutOfRange)` naming the first sequence whose device page table,
    /// `qo_indptr` or (quantised cache, [`prefill_quantized`]) residual slot disagreed with the plan's
    /// (see [`prefill`] for which rows are then NaN), else `Ok`.
    /// Synchronises the stream.
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// let dev = fusekit::emu::Emulator::new()?;
    /// let ws = fusekit::attention::PrefillWorkspace::new(&dev)?;
    /// ws.check_status_sync(&dev)?; // nothing launched yet: Ok
    /// # Ok(()) }
    /// ```
    pub fn check_status_sync(&self, dev: &B) -> Result<()> {
        self.status.check_sync(
            dev,
            "a device page table and qo_indptr equal to the plan's (pages in range, \
             ceil(len / page_size) pages and at most len new tokens per sequence; quantised: \
             residual slots in range)",
        )
    }
}

/// Causal prefill attention of a batch of new tokens over a paged cache that already holds them:
/// for sequence `b` with `seq_lens[b] = L` cached tokens, of which the last `Q = qo_indptr[b+1] −
/// qo_indptr[b]` are new, query `i` attends to cache tokens `0 ..= L − Q + i` (bottom-right aligned
/// causal mask, so chunked prefill over a cached prefix works), with the plan's scale, softcap and
/// window; GQA: query head `h` reads KV head `h / (Hq / Hkv)`. `q` and `o` are `[total_q, num_qo_heads,
/// head_dim]` (16-byte aligned), `lse` is `[total_q, num_qo_heads]` (natural log). The device page
/// table and `qo_indptr` must hold the values the plan was made from; a different one is never read or
/// written out of bounds, and [`PrefillWorkspace::check_status_sync`] reports it: a sequence whose
/// length, page count or new-token rows do not fit comes out NaN (the rows that lie inside the output);
/// a page index outside the cache makes NaN the rows of every 64-row tile that would read that page.
///
/// Precision: scores and the softmax in fp32 (mma.sync with fp32 accumulators); the probabilities are
/// rounded to `T` before the `P·V` product, as FlashAttention does. A NaN or infinity in a key makes the
/// rows that attend to it NaN, and no other (the mask drops it exactly); in a value, it can also make
/// that element NaN in the other rows of a 64-row tile that loads the token (0 · NaN in `P·V`). Never a
/// finite wrong value.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::attention::{prefill, DecodeConfig, KvFormat, PageTable, PagedKvLayout, PrefillPlan, PrefillWorkspace};
/// use half::bf16;
/// let dev = fusekit::emu::Emulator::new()?;
/// let l = PagedKvLayout::new(2, 16, 1, 64, KvFormat::Bf16)?;
/// // 3 tokens in the cache, the last 2 of them new.
/// let t = PageTable { page_indptr: &[0, 1], page_indices: &[1], seq_lens: &[3] };
/// let qo = [0, 2];
/// let plan = PrefillPlan::new::<bf16>(&l, &t, &qo, &DecodeConfig::new(1))?;
/// let cache = dev.upload(&vec![bf16::ONE; l.elements() as usize])?; // every value 1
/// let q = dev.upload(&vec![bf16::ZERO; 2 * 64])?;
/// let (indptr, idx, lens) = (dev.upload(t.page_indptr)?, dev.upload(t.page_indices)?, dev.upload(t.seq_lens)?);
/// let qo_d = dev.upload(&qo)?;
/// let mut ws = PrefillWorkspace::new(&dev)?;
/// let mut o = dev.alloc_zeros::<bf16>(2 * 64)?;
/// let mut lse = dev.alloc_zeros::<f32>(2)?;
/// prefill(&dev, &plan, &q, &cache, &indptr, &idx, &lens, &qo_d, &mut ws, &mut o, &mut lse)?;
/// ws.check_status_sync(&dev)?;
/// assert!(dev.download(&o)?.iter().all(|&x| x == bf16::ONE));
/// let lse = dev.download(&lse)?; // the first new token sees 2 tokens, the second 3
/// assert!((lse[0] - 2f32.ln()).abs() < 1e-6 && (lse[1] - 3f32.ln()).abs() < 1e-6);
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn prefill<B, T, Q, C, P, I, S, QI, O, L>(
    dev: &B,
    plan: &PrefillPlan,
    q: &Q,
    cache: &C,
    page_indptr: &P,
    page_indices: &I,
    seq_lens: &S,
    qo_indptr: &QI,
    ws: &mut PrefillWorkspace<B>,
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
    QI: DeviceRead<i32, B>,
    O: DeviceWrite<T, B>,
    L: DeviceWrite<f32, B>,
{
    if plan.slots.is_some() {
        return Err(Error::DType {
            arg: "cache",
            expected: "the codes of a quantised cache: this plan is for prefill_quantized".into(),
            got: T::SUFFIX.to_string(),
        });
    }
    owned(dev, "cache", cache)?;
    exactly(
        "cache",
        cache.len(),
        plan.layout.elements() as usize,
        "layout.elements()",
    )?;
    let (cp, _b) = cache.addr(dev);
    check_aligned("cache", cp, 16)?;
    run::<B, T, Q, P, I, S, QI, O, L>(
        dev,
        plan,
        q,
        cp,
        None,
        (page_indptr, page_indices, seq_lens, qo_indptr),
        ws,
        o,
        lse,
    )
}

/// [`prefill`] over a quantised (KIVI int8/int4) cache: `cache` is the layout's
/// [`bytes`](PagedKvLayout::bytes), `residual` the full-precision newest tokens
/// (`layout.residual_elements(slots)` elements of `T`) and `residual_slots[b]` sequence `b`'s residual
/// slot, as for [`decode_quantized`](super::decode_quantized) (the new tokens are appended first, so
/// the cache holds them: complete groups as codes, the rest in the residual). Each K/V tile is
/// dequantised in shared memory, `fmaf(code, scale, zero)` in f32 rounded to `T`, and the tensor-core
/// loop runs on it; no full-precision copy of the cache is made in device memory. The attention is
/// then exact over those rounded values (the reference's view: [`PackedCache::dequantized`] rounded to
/// f32, then to `T`), with the precision of [`prefill`]. A residual slot on the device outside `[0, slots)` makes
/// its sequence NaN and is reported by [`PrefillWorkspace::check_status_sync`].
///
/// [`PackedCache::dequantized`]: super::PackedCache::dequantized
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::attention::{pack_quantized, prefill_quantized, DecodeConfig, KvFormat, PageTable, PagedKvLayout, PrefillPlan, PrefillWorkspace};
/// use half::bf16;
/// let dev = fusekit::emu::Emulator::new()?;
/// let l = PagedKvLayout::new(3, 16, 1, 64, KvFormat::Int8 { group: 32 })?;
/// // 40 tokens, the last 10 of them new: 32 as codes, 8 in the residual.
/// let t = PageTable { page_indptr: &[0, 3], page_indices: &[2, 0, 1], seq_lens: &[40] };
/// let packed = pack_quantized::<bf16>(&l, &vec![1.0; l.elements() as usize], &t, &[0], 1)?; // every K and V element 1
/// let qo = [0, 10];
/// let plan = PrefillPlan::new_quantized::<bf16>(&l, &t, &qo, &[0], 1, &DecodeConfig::new(1))?;
/// let (cache, res) = (dev.upload(&packed.bytes)?, dev.upload(&packed.residual)?);
/// let (indptr, idx, lens) = (dev.upload(t.page_indptr)?, dev.upload(t.page_indices)?, dev.upload(t.seq_lens)?);
/// let (qo_d, slots) = (dev.upload(&qo)?, dev.upload(&[0i32])?);
/// let q = dev.upload(&vec![bf16::ZERO; 10 * 64])?;
/// let mut ws = PrefillWorkspace::new(&dev)?;
/// let (mut o, mut lse) = (dev.alloc_zeros::<bf16>(10 * 64)?, dev.alloc_zeros::<f32>(10)?);
/// prefill_quantized(&dev, &plan, &q, &cache, &res, &indptr, &idx, &lens, &qo_d, &slots, &mut ws, &mut o, &mut lse)?;
/// ws.check_status_sync(&dev)?;
/// assert!(dev.download(&o)?.iter().all(|&x| x == bf16::ONE));
/// assert!((dev.download(&lse)?[0] - 31f32.ln()).abs() < 1e-5); // the first new token sees 31 tokens
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn prefill_quantized<B, T, Q, C, R, P, I, S, QI, RS, O, L>(
    dev: &B,
    plan: &PrefillPlan,
    q: &Q,
    cache: &C,
    residual: &R,
    page_indptr: &P,
    page_indices: &I,
    seq_lens: &S,
    qo_indptr: &QI,
    residual_slots: &RS,
    ws: &mut PrefillWorkspace<B>,
    o: &mut O,
    lse: &mut L,
) -> Result<()>
where
    B: Backend,
    T: KvElement,
    Q: DeviceRead<T, B>,
    C: DeviceRead<u8, B>,
    R: DeviceRead<T, B>,
    P: DeviceRead<i32, B>,
    I: DeviceRead<i32, B>,
    S: DeviceRead<u32, B>,
    QI: DeviceRead<i32, B>,
    RS: DeviceRead<i32, B>,
    O: DeviceWrite<T, B>,
    L: DeviceWrite<f32, B>,
{
    let slots = check_quant_buffers::<B, T, C, R, RS>(
        dev,
        "prefill",
        &plan.layout,
        plan.slots,
        plan.batch,
        cache,
        residual,
        residual_slots,
    )?;
    let (cp, _b) = cache.addr(dev);
    let (rp, _r) = residual.addr(dev);
    let (sp, _s) = residual_slots.addr(dev);
    check_aligned("cache", cp, 16)?;
    check_aligned("residual", rp, 16)?;
    run::<B, T, Q, P, I, S, QI, O, L>(
        dev,
        plan,
        q,
        cp,
        Some((rp, sp, slots)),
        (page_indptr, page_indices, seq_lens, qo_indptr),
        ws,
        o,
        lse,
    )
}

/// The checks both prefills share and the launch. `quant`: the residual's and the slots' addresses and
/// the slot count of a quantised cache.
#[allow(clippy::too_many_arguments)]
fn run<B, T, Q, P, I, S, QI, O, L>(
    dev: &B,
    plan: &PrefillPlan,
    q: &Q,
    cp: u64,
    quant: Option<(u64, u64, usize)>,
    (page_indptr, page_indices, seq_lens, qo_indptr): (&P, &I, &S, &QI),
    ws: &mut PrefillWorkspace<B>,
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
    QI: DeviceRead<i32, B>,
    O: DeviceWrite<T, B>,
    L: DeviceWrite<f32, B>,
{
    if plan.elem != T::SUFFIX {
        return Err(Error::DType {
            arg: "q",
            expected: plan.elem.to_string(),
            got: T::SUFFIX.to_string(),
        });
    }
    owned(dev, "q", q)?;
    owned(dev, "qo_indptr", qo_indptr)?;
    owned(dev, "o", o)?;
    owned(dev, "lse", lse)?;
    let (d, rows) = (plan.layout.head_dim(), plan.rows());
    exactly("q", q.len(), rows * d, "total_q * num_qo_heads * head_dim")?;
    check_table_buffers(
        dev,
        plan.batch,
        plan.n_page_indices,
        page_indptr,
        page_indices,
        seq_lens,
    )?;
    exactly("qo_indptr", qo_indptr.len(), plan.batch + 1, "batch + 1")?;
    exactly("o", o.len(), rows * d, "total_q * num_qo_heads * head_dim")?;
    exactly("lse", lse.len(), rows, "total_q * num_qo_heads")?;
    let (qp, _a) = q.addr(dev);
    let (ip, _c) = page_indptr.addr(dev);
    let (xp, _d) = page_indices.addr(dev);
    let (sp, _e) = seq_lens.addr(dev);
    let (qip, _f) = qo_indptr.addr(dev);
    let (op, _g) = o.addr_mut(dev);
    let (lp, _h) = lse.addr_mut(dev);
    check_aligned("q", qp, 16)?;
    check_aligned("o", op, 16)?;
    let (stp, _i) = ws.status.arm(dev, plan.batch)?;
    let launches = plan.launches();
    let Some(launch) = launches.first() else {
        return Ok(()); // no new token
    };
    let l = &plan.layout;
    let (page_bytes, v_codes_start, k_params_start, v_params_start) = l.quant_sections();
    let (rp, rsp, n_slots) = quant.unwrap_or((0, 0, 0));
    let p = fk_attn_prefill_params {
        q: qp as *const c_void,
        cache: cp as *const c_void,
        page_indptr: ip as *const i32,
        page_indices: xp as *const i32,
        seq_lens: sp as *const u32,
        qo_indptr: qip as *const i32,
        o: op as *mut c_void,
        lse: lp as *mut f32,
        status: stp as *mut u64,
        num_pages: l.num_pages() as i64,
        n_page_indices: plan.n_page_indices as i64,
        total_q: plan.total_q as i64,
        batch: plan.batch as i32,
        num_qo_heads: plan.cfg.num_qo_heads as i32,
        num_kv_heads: l.num_kv_heads() as i32,
        page_size: l.page_size() as i32,
        window: plan.cfg.window.map_or(0, |w| w.min(i32::MAX as u32) as i32),
        scale: plan.cfg.scale(d) as f32,
        softcap: plan.cfg.softcap.unwrap_or(0.0),
        rope_log2_theta: super::decode::rope_log2_theta(l),
        rope_style: super::decode::rope_style(l),
        rope_q: l.rope().rope().is_some() as i32,
        rope_k: matches!(l.rope(), super::RopeMode::InAttention(_)) as i32,
        residual: rp as *const c_void,
        residual_slots: rsp as *const i32,
        page_bytes,
        v_codes_start,
        k_params_start,
        v_params_start,
        n_slots: n_slots as i32,
        group: l.format().group().unwrap_or(0) as i32,
        v_group: l.v_group() as i32,
        k_param_slots: l.k_param_slots() as i32,
    };
    // The kernel reads q and the cache (quantised: and the residual slots the plan checked) through the
    // checked page table and qo_indptr, and writes the rows of o and lse that qo_indptr gives each
    // sequence.
    launch_kernel(
        dev,
        Family::Attention,
        &launch.kernel,
        plan.config(),
        &p,
        None,
    )
}
