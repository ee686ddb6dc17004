//! Split-KV decode over a paged bf16/f16 cache: the plan (validated on the host, without a device),
//! the workspace, and the launch of the decode and merge kernels.

use super::status::StatusWord;
use std::ffi::c_void;

use cudarc::driver::LaunchConfig;

use super::cache::{KvElement, KvFormat, PageTable, PagedKvLayout, RopeMode, RopeStyle};
use super::kivi::{check_quant_buffers, check_quant_plan};
use super::DecodeConfig;
use crate::backend::private::AddrMut;
use crate::device::{check_aligned, Family};
use crate::error::{Error, Result};
use crate::launch::launch_kernel;
use crate::params::*;
use crate::plan::PlannedLaunch;
use crate::validate::{exactly, owned};
use crate::{Backend, DeviceRead, DeviceWrite};

/// Tokens per split when the caller does not choose: long enough that the partials (4·(head_dim + 1)
/// bytes per head and split) are small against the split's K and V, short enough that a batch of
/// one long sequence still fills the GPU.
pub const DEFAULT_SPLIT_SIZE: usize = 512;

/// The validated plan of a [`decode`]: shapes, the grid (splits × KV heads × head chunks × batch) and
/// the kernel parameters, from the host's copy of the page table, without a device.
///
/// ```
/// use fusekit::attention::{DecodeConfig, DecodePlan, KvFormat, PageTable, PagedKvLayout};
/// let l = PagedKvLayout::new(1024, 16, 8, 128, KvFormat::Bf16)?;
/// let lens = [1000u32, 17];
/// let idx: Vec<i32> = (0..65).collect();
/// let t = PageTable { page_indptr: &[0, 63, 65], page_indices: &idx, seq_lens: &lens };
/// let plan = DecodePlan::new::<half::bf16>(&l, &t, &DecodeConfig::new(32), None)?;
/// assert_eq!(plan.n_splits(), 2); // 1000 tokens in splits of 512
/// assert_eq!(plan.launches()[0].kernel, "fk_attn_decode_bf16_d128_h4");
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct DecodePlan {
    pub(super) layout: PagedKvLayout,
    pub(super) cfg: DecodeConfig,
    pub(super) batch: usize,
    pub(super) n_page_indices: usize,
    split_size: usize,
    pub(super) n_splits: usize,
    heads_per_cta: usize,
    pub(super) elem: &'static str,
    /// Residual slots of a quantised cache (`None`: a bf16/f16 cache, or the distant part of a
    /// quantised shared decode, which has no residual).
    pub(super) slots: Option<usize>,
    /// Sequences may hold no token (the distant part of a shared decode).
    allow_empty: bool,
}

impl DecodePlan {
    /// Validates a decode of `T` elements: the layout's format is `T`'s, the page table fits the
    /// layout, the configuration fits the cache, at most 65535 sequences, and a split size of at least
    /// one token (`None`: [`DEFAULT_SPLIT_SIZE`]).
    pub fn new<T: KvElement>(
        layout: &PagedKvLayout,
        table: &PageTable<'_>,
        cfg: &DecodeConfig,
        split_size: Option<usize>,
    ) -> Result<Self> {
        if layout.format() != T::FORMAT {
            return Err(Error::DType {
                arg: "cache",
                expected: format!(
                    "{:?} (the layout's format; a quantised cache takes DecodePlan::new_quantized)",
                    layout.format()
                ),
                got: T::SUFFIX.to_string(),
            });
        }
        Self::build::<T>(layout, table, cfg, split_size, None, false)
    }

    /// Validates a decode over a quantised (KIVI int8/int4) cache whose query, output and residual are
    /// `T`: as [`new`](Self::new), plus the residual slots (`residual_slots[b]` is sequence `b`'s slot
    /// in a residual of `slots` slots; each in range, none shared).
    ///
    /// ```
    /// use fusekit::attention::{DecodeConfig, DecodePlan, KvFormat, PageTable, PagedKvLayout};
    /// let l = PagedKvLayout::new(8, 16, 2, 64, KvFormat::Int4 { group: 32 })?;
    /// let t = PageTable { page_indptr: &[0, 3, 4], page_indices: &[0, 1, 2, 3], seq_lens: &[40, 9] };
    /// let plan = DecodePlan::new_quantized::<half::bf16>(&l, &t, &[1, 0], 2, &DecodeConfig::new(2), None)?;
    /// assert_eq!(plan.launches()[0].kernel, "fk_attn_decode_q4_bf16_d64_h1");
    /// assert!(DecodePlan::new_quantized::<half::bf16>(&l, &t, &[1, 1], 2, &DecodeConfig::new(2), None).is_err());
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn new_quantized<T: KvElement>(
        layout: &PagedKvLayout,
        table: &PageTable<'_>,
        residual_slots: &[i32],
        slots: usize,
        cfg: &DecodeConfig,
        split_size: Option<usize>,
    ) -> Result<Self> {
        Self::build_quantized::<T>(
            layout,
            table,
            (residual_slots, slots),
            cfg,
            split_size,
            "DecodePlan::new",
        )
    }

    /// [`new_quantized`](Self::new_quantized) for a caller whose bf16/f16 counterpart is `plain` (named by
    /// the error a bf16/f16 layout gets).
    pub(super) fn build_quantized<T: KvElement>(
        layout: &PagedKvLayout,
        table: &PageTable<'_>,
        (residual_slots, slots): (&[i32], usize),
        cfg: &DecodeConfig,
        split_size: Option<usize>,
        plain: &str,
    ) -> Result<Self> {
        check_quant_plan(layout, table.seq_lens.len(), residual_slots, slots, plain)?;
        Self::build::<T>(layout, table, cfg, split_size, Some(slots), false)
    }

    pub(super) fn build<T: KvElement>(
        layout: &PagedKvLayout,
        table: &PageTable<'_>,
        cfg: &DecodeConfig,
        split_size: Option<usize>,
        slots: Option<usize>,
        allow_empty: bool,
    ) -> Result<Self> {
        layout.check_table(table, allow_empty)?;
        cfg.validate(layout)?;
        let batch = table.seq_lens.len();
        if batch > 65535 {
            return Err(Error::Unsupported {
                what: format!("a decode batch of {batch} sequences (at most 65535 per call)"),
            });
        }
        let split_size = split_size.unwrap_or(DEFAULT_SPLIT_SIZE);
        if split_size == 0 || split_size > i32::MAX as usize {
            return Err(Error::invalid(
                "split_size",
                format!("must be in 1..=2^31-1 tokens, got {split_size}"),
            ));
        }
        let max_len = *table.seq_lens.iter().max().unwrap_or(&1) as usize;
        let n_splits = max_len.div_ceil(split_size).max(1);
        if n_splits > 65535 || cfg.num_qo_heads > i32::MAX as usize {
            return Err(Error::Unsupported {
                what: format!("{n_splits} splits of {split_size} tokens (at most 65535)"),
            });
        }
        let group = cfg.num_qo_heads / layout.num_kv_heads();
        let heads_per_cta = group
            .next_power_of_two()
            .min(FK_ATTN_MAX_HEADS_PER_CTA as usize);
        let chunks = group.div_ceil(heads_per_cta);
        if layout.num_kv_heads() * chunks > 65535 {
            return Err(Error::Unsupported {
                what: format!(
                    "{} KV heads x {chunks} head chunks (at most 65535 CTAs in y)",
                    layout.num_kv_heads()
                ),
            });
        }
        Ok(DecodePlan {
            layout: *layout,
            cfg: *cfg,
            batch,
            n_page_indices: table.page_indices.len(),
            split_size,
            n_splits,
            heads_per_cta,
            elem: T::SUFFIX,
            slots,
            allow_empty,
        })
    }

    /// Splits per sequence (of the longest).
    ///
    /// ```
    /// # use fusekit::attention::{DecodeConfig, DecodePlan, KvFormat, PageTable, PagedKvLayout};
    /// let l = PagedKvLayout::new(4, 16, 1, 64, KvFormat::F16)?;
    /// let t = PageTable { page_indptr: &[0, 4], page_indices: &[0, 1, 2, 3], seq_lens: &[64] };
    /// assert_eq!(DecodePlan::new::<half::f16>(&l, &t, &DecodeConfig::new(1), Some(16))?.n_splits(), 4);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn n_splits(&self) -> usize {
        self.n_splits
    }

    /// Rows of the output: sequences × query heads.
    ///
    /// ```
    /// # use fusekit::attention::{DecodeConfig, DecodePlan, KvFormat, PageTable, PagedKvLayout};
    /// let l = PagedKvLayout::new(4, 16, 2, 64, KvFormat::F16)?;
    /// let t = PageTable { page_indptr: &[0, 1, 2], page_indices: &[0, 1], seq_lens: &[5, 9] };
    /// assert_eq!(DecodePlan::new::<half::f16>(&l, &t, &DecodeConfig::new(6), None)?.rows(), 12);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn rows(&self) -> usize {
        self.batch * self.cfg.num_qo_heads
    }

    /// The two launches: the split decode, then the merge.
    ///
    /// ```
    /// # use fusekit::attention::{DecodeConfig, DecodePlan, KvFormat, PageTable, PagedKvLayout};
    /// let l = PagedKvLayout::new(4, 16, 2, 256, KvFormat::F16)?;
    /// let t = PageTable { page_indptr: &[0, 1], page_indices: &[3], seq_lens: &[5] };
    /// let names: Vec<String> = DecodePlan::new::<half::f16>(&l, &t, &DecodeConfig::new(2), None)?
    ///     .launches().into_iter().map(|l| l.kernel).collect();
    /// assert_eq!(names, ["fk_attn_decode_f16_d256_h1", "fk_attn_merge_f16"]);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn launches(&self) -> Vec<PlannedLaunch> {
        vec![
            PlannedLaunch {
                kernel: format!(
                    "fk_attn_decode_{}{}_d{}_h{}",
                    match self.layout.format() {
                        KvFormat::Int8 { .. } => "q8_",
                        KvFormat::Int4 { .. } => "q4_",
                        _ => "",
                    },
                    self.elem,
                    self.layout.head_dim(),
                    self.heads_per_cta
                ),
                grid: self.n_splits as u32,
                block: FK_ATTN_DECODE_THREADS,
                shared_mem_bytes: 0,
            },
            PlannedLaunch {
                kernel: format!("fk_attn_merge_{}", self.elem),
                grid: self.rows().min(1 << 20) as u32,
                block: FK_ATTN_MERGE_THREADS,
                shared_mem_bytes: 0,
            },
        ]
    }

    /// The decode kernel's parameters: device addresses of q, the cache (K, and V in its own half), the
    /// quantised residual (address, slots address, slot count), the table (indptr, indices, lens) and
    /// the workspace (partials, lse partials, status); this launch's splits are partials
    /// `split_base .. split_base + n_splits` of `splits_per_row` per row.
    pub(crate) fn params(
        &self,
        qp: u64,
        cp: u64,
        quant: Option<(u64, u64, usize)>,
        (ip, xp, sp): (u64, u64, u64),
        (opp, lpp, stp): (u64, u64, u64),
        (split_base, splits_per_row): (usize, usize),
    ) -> fk_attn_decode_params {
        let l = &self.layout;
        let d = l.head_dim();
        let (rp, rsp, slots) = quant.unwrap_or((0, 0, 0));
        let (page_bytes, v_codes_start, k_params_start, v_params_start) = l.quant_sections();
        let (v_page_stride, v_start) = if l.format().group().is_some() {
            (page_bytes, v_codes_start)
        } else {
            (
                l.page_elements() as i64,
                (l.num_kv_heads() * l.page_size() * d) as i64,
            )
        };
        fk_attn_decode_params {
            q: qp as *const c_void,
            cache: cp as *const c_void,
            page_indptr: ip as *const i32,
            page_indices: xp as *const i32,
            seq_lens: sp as *const u32,
            o_part: opp as *mut f32,
            lse_part: lpp as *mut f32,
            status: stp as *mut u64,
            num_pages: l.num_pages() as i64,
            n_page_indices: self.n_page_indices as i64,
            batch: self.batch as i32,
            num_qo_heads: self.cfg.num_qo_heads as i32,
            num_kv_heads: l.num_kv_heads() as i32,
            page_size: l.page_size() as i32,
            split_size: self.split_size as i32,
            n_splits: self.n_splits as i32,
            split_base: split_base as i32,
            splits_per_row: splits_per_row as i32,
            allow_empty: self.allow_empty as i32,
            v_cache: cp as *const c_void,
            v_page_stride,
            v_start,
            window: self.cfg.window.map_or(0, |w| w.min(i32::MAX as u32) as i32),
            scale: self.cfg.scale(d) as f32,
            softcap: self.cfg.softcap.unwrap_or(0.0),
            residual: rp as *const c_void,
            residual_slots: rsp as *const i32,
            page_bytes,
            k_params_start,
            v_params_start,
            n_slots: slots as i32,
            group: l.format().group().unwrap_or(0) as i32,
            v_group: l.v_group() as i32,
            k_param_slots: l.k_param_slots() as i32,
            rope_log2_theta: rope_log2_theta(l),
            rope_style: rope_style(l),
            rope_q: l.rope().rope().is_some() as i32,
            rope_k: matches!(l.rope(), RopeMode::InAttention(_)) as i32,
        }
    }

    pub(crate) fn decode_config(&self) -> LaunchConfig {
        let group = self.cfg.num_qo_heads / self.layout.num_kv_heads();
        let chunks = group.div_ceil(self.heads_per_cta);
        LaunchConfig {
            grid_dim: (
                self.n_splits as u32,
                (self.layout.num_kv_heads() * chunks) as u32,
                self.batch as u32,
            ),
            block_dim: (FK_ATTN_DECODE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Device scratch of a decode: the splits' partial states and the page-table status word. Reusable
/// for any plan with at most as many rows × splits as the one it was made for.
#[derive(Debug)]
pub struct DecodeWorkspace<B: Backend> {
    pub(super) o_part: B::Buffer<f32>,
    pub(super) lse_part: B::Buffer<f32>,
    pub(super) status: StatusWord<B>,
    pub(super) head_dim: usize,
}

impl<B: Backend> DecodeWorkspace<B> {
    /// Allocates the workspace of `plan` on `dev`.
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// use fusekit::attention::{DecodeConfig, DecodePlan, DecodeWorkspace, KvFormat, PageTable, PagedKvLayout};
    /// let dev = fusekit::emu::Emulator::new()?;
    /// let l = PagedKvLayout::new(4, 16, 1, 64, KvFormat::Bf16)?;
    /// let t = PageTable { page_indptr: &[0, 1], page_indices: &[0], seq_lens: &[3] };
    /// let plan = DecodePlan::new::<half::bf16>(&l, &t, &DecodeConfig::new(1), None)?;
    /// let _ws = DecodeWorkspace::new(&dev, &plan)?;
    /// # Ok(()) }
    /// ```
    pub fn new(dev: &B, plan: &DecodePlan) -> Result<Self> {
        let parts = plan.rows() * plan.n_splits;
        Ok(DecodeWorkspace {
            o_part: dev.alloc_zeros(parts * plan.layout.head_dim())?,
            lse_part: dev.alloc_zeros(parts)?,
            status: StatusWord::new(dev)?,
            head_dim: plan.layout.head_dim(),
        })
    }

    /// After a [`decode`]: `Err(OutOfRange)` naming the first sequence whose device page table
    /// disagreed with the plan's (its outputs are NaN), else `Ok`. Synchronises the stream.
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// # use fusekit::attention::{DecodeConfig, DecodePlan, DecodeWorkspace, KvFormat, PageTable, PagedKvLayout};
    /// # let dev = fusekit::emu::Emulator::new()?;
    /// # let l = PagedKvLayout::new(4, 16, 1, 64, KvFormat::Bf16)?;
    /// # let t = PageTable { page_indptr: &[0, 1], page_indices: &[0], seq_lens: &[3] };
    /// # let plan = DecodePlan::new::<half::bf16>(&l, &t, &DecodeConfig::new(1), None)?;
    /// let ws = DecodeWorkspace::new(&dev, &plan)?;
    /// ws.check_status_sync(&dev)?; // nothing launched yet: Ok
    /// # Ok(()) }
    /// ```
    pub fn check_status_sync(&self, dev: &B) -> Result<()> {
        self.status.check_sync(
            dev,
            "a device page table equal to the plan's (pages in range, ceil(len / page_size) \
             pages per sequence)",
        )
    }
}

/// Decode attention of one query token per sequence over a paged cache: `o = softmax(scale · q Kᵀ) V`
/// per query head (GQA: query head `h` reads KV head `h / (Hq / Hkv)`), with the plan's softcap and
/// window, and `lse` (natural log) per head. `q` and `o` are `[batch, num_qo_heads, head_dim]`, `lse`
/// is `[batch, num_qo_heads]`; the device page table (`page_indptr`, `page_indices`, `seq_lens`) must
/// hold the values the plan was made from (a different one is never read out of bounds: the sequence
/// comes out NaN and [`DecodeWorkspace::check_status_sync`] reports it). Splits of a fixed size, merged
/// in order: the result for a sequence does not depend on the rest of the batch.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::attention::{decode, DecodeConfig, DecodePlan, DecodeWorkspace, KvFormat, PageTable, PagedKvLayout};
/// use half::bf16;
/// let dev = fusekit::emu::Emulator::new()?;
/// let l = PagedKvLayout::new(2, 16, 1, 64, KvFormat::Bf16)?;
/// let t = PageTable { page_indptr: &[0, 1], page_indices: &[1], seq_lens: &[3] };
/// let plan = DecodePlan::new::<bf16>(&l, &t, &DecodeConfig::new(2), None)?;
/// let cache = dev.upload(&vec![bf16::ONE; l.elements() as usize])?; // every value 1
/// let q = dev.upload(&vec![bf16::ZERO; 2 * 64])?;
/// let (indptr, idx, lens) = (dev.upload(t.page_indptr)?, dev.upload(t.page_indices)?, dev.upload(t.seq_lens)?);
/// let mut ws = DecodeWorkspace::new(&dev, &plan)?;
/// let mut o = dev.alloc_zeros::<bf16>(2 * 64)?;
/// let mut lse = dev.alloc_zeros::<f32>(2)?;
/// decode(&dev, &plan, &q, &cache, &indptr, &idx, &lens, &mut ws, &mut o, &mut lse)?;
/// assert!(dev.download(&o)?.iter().all(|&x| x == bf16::ONE));
/// assert!((dev.download(&lse)?[0] - 3f32.ln()).abs() < 1e-6); // three equal scores
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn decode<B, T, Q, C, P, I, S, O, L>(
    dev: &B,
    plan: &DecodePlan,
    q: &Q,
    cache: &C,
    page_indptr: &P,
    page_indices: &I,
    seq_lens: &S,
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
    if plan.slots.is_some() {
        return Err(Error::DType {
            arg: "cache",
            expected: "the codes of a quantised cache: this plan is for decode_quantized".into(),
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
    run::<B, T, Q, P, I, S, O, L>(
        dev,
        plan,
        q,
        cp,
        None,
        page_indptr,
        page_indices,
        seq_lens,
        ws,
        o,
        lse,
    )
}

/// [`decode`] over a quantised (KIVI int8/int4) cache: `cache` is the layout's
/// [`bytes`](PagedKvLayout::bytes) (codes and f16 scales and zero points, as
/// [`pack_quantized`](super::pack_quantized) or the append kernels write them), `residual` the
/// full-precision newest tokens (`layout.residual_elements(slots)` elements of `T`), and
/// `residual_slots[b]` sequence `b`'s residual slot (the values the plan was made from). Codes are
/// dequantised in registers; no full-precision copy of the cache is ever made.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::attention::{decode_quantized, pack_quantized, DecodeConfig, DecodePlan, DecodeWorkspace, KvFormat, PageTable, PagedKvLayout};
/// use half::bf16;
/// let dev = fusekit::emu::Emulator::new()?;
/// let l = PagedKvLayout::new(3, 16, 1, 64, KvFormat::Int8 { group: 32 })?;
/// let t = PageTable { page_indptr: &[0, 3], page_indices: &[2, 0, 1], seq_lens: &[40] };
/// let values = vec![1.0; l.elements() as usize]; // every K and V element 1
/// let packed = pack_quantized::<bf16>(&l, &values, &t, &[0], 1)?;
/// let plan = DecodePlan::new_quantized::<bf16>(&l, &t, &[0], 1, &DecodeConfig::new(1), None)?;
/// let (cache, res) = (dev.upload(&packed.bytes)?, dev.upload(&packed.residual)?);
/// let (indptr, idx, lens, slots) = (dev.upload(t.page_indptr)?, dev.upload(t.page_indices)?, dev.upload(t.seq_lens)?, dev.upload(&[0i32])?);
/// let q = dev.upload(&vec![bf16::ZERO; 64])?;
/// let mut ws = DecodeWorkspace::new(&dev, &plan)?;
/// let (mut o, mut lse) = (dev.alloc_zeros::<bf16>(64)?, dev.alloc_zeros::<f32>(1)?);
/// decode_quantized(&dev, &plan, &q, &cache, &res, &indptr, &idx, &lens, &slots, &mut ws, &mut o, &mut lse)?;
/// assert!(dev.download(&o)?.iter().all(|&x| x == bf16::ONE));
/// assert!((dev.download(&lse)?[0] - 40f32.ln()).abs() < 1e-5);
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn decode_quantized<B, T, Q, C, R, P, I, S, RS, O, L>(
    dev: &B,
    plan: &DecodePlan,
    q: &Q,
    cache: &C,
    residual: &R,
    page_indptr: &P,
    page_indices: &I,
    seq_lens: &S,
    residual_slots: &RS,
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
    P: DeviceRead<i32, B>,
    I: DeviceRead<i32, B>,
    S: DeviceRead<u32, B>,
    RS: DeviceRead<i32, B>,
    O: DeviceWrite<T, B>,
    L: DeviceWrite<f32, B>,
{
    let slots = check_quant_buffers::<B, T, C, R, RS>(
        dev,
        "decode",
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
    run::<B, T, Q, P, I, S, O, L>(
        dev,
        plan,
        q,
        cp,
        Some((rp, sp, slots)),
        page_indptr,
        page_indices,
        seq_lens,
        ws,
        o,
        lse,
    )
}

/// `log2(theta)` of the layout's RoPE (0 without).
pub(crate) fn rope_log2_theta(l: &PagedKvLayout) -> f32 {
    l.rope()
        .rope()
        .map_or(0.0, |r| (r.theta as f64).log2() as f32)
}

/// The kernels' RoPE style code: 0 half, 1 interleaved.
pub(crate) fn rope_style(l: &PagedKvLayout) -> i32 {
    match l.rope().rope().map(|r| r.style) {
        Some(RopeStyle::Interleaved) => 1,
        _ => 0,
    }
}

/// The device page table's buffers: on `dev`, of the plan's sizes.
pub(crate) fn check_table_buffers<B, P, I, S>(
    dev: &B,
    batch: usize,
    n_page_indices: usize,
    page_indptr: &P,
    page_indices: &I,
    seq_lens: &S,
) -> Result<()>
where
    B: Backend,
    P: DeviceRead<i32, B>,
    I: DeviceRead<i32, B>,
    S: DeviceRead<u32, B>,
{
    owned(dev, "page_indptr", page_indptr)?;
    owned(dev, "page_indices", page_indices)?;
    owned(dev, "seq_lens", seq_lens)?;
    exactly("page_indptr", page_indptr.len(), batch + 1, "batch + 1")?;
    exactly(
        "page_indices",
        page_indices.len(),
        n_page_indices,
        "the plan's page table",
    )?;
    exactly("seq_lens", seq_lens.len(), batch, "batch")
}

/// A query buffer of a decode: of the plan's element type, on `dev`, `n` elements.
pub(super) fn check_query<B, T, Q>(
    dev: &B,
    elem: &str,
    arg: &'static str,
    q: &Q,
    n: usize,
) -> Result<()>
where
    B: Backend,
    T: KvElement,
    Q: DeviceRead<T, B>,
{
    if elem != T::SUFFIX {
        return Err(Error::DType {
            arg,
            expected: elem.to_string(),
            got: T::SUFFIX.to_string(),
        });
    }
    owned(dev, arg, q)?;
    exactly(arg, q.len(), n, "batch * num_qo_heads * head_dim")
}

/// The outputs (`rows` of head dim `d`) and a workspace holding `splits` partials per row.
pub(super) fn check_outputs<B, T, O, L>(
    dev: &B,
    o: &O,
    lse: &L,
    ws: &DecodeWorkspace<B>,
    rows: usize,
    d: usize,
    splits: usize,
) -> Result<()>
where
    B: Backend,
    T: KvElement,
    O: DeviceWrite<T, B>,
    L: DeviceWrite<f32, B>,
{
    owned(dev, "o", o)?;
    owned(dev, "lse", lse)?;
    exactly("o", o.len(), rows * d, "batch * num_qo_heads * head_dim")?;
    exactly("lse", lse.len(), rows, "batch * num_qo_heads")?;
    if ws.head_dim != d || ws.lse_part.len() < rows * splits {
        return Err(Error::shape(
            "ws",
            format!("a workspace for {} partials of head_dim {d}", rows * splits),
            format!("{} partials of head_dim {}", ws.lse_part.len(), ws.head_dim),
        ));
    }
    owned(dev, "ws", &ws.o_part)
}

/// The checks every decode shares and the two launches. `quant`: the residual's and the slots'
/// addresses and the slot count of a quantised cache.
#[allow(clippy::too_many_arguments)]
fn run<B, T, Q, P, I, S, O, L>(
    dev: &B,
    plan: &DecodePlan,
    q: &Q,
    cp: u64,
    quant: Option<(u64, u64, usize)>,
    page_indptr: &P,
    page_indices: &I,
    seq_lens: &S,
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
    let (d, rows) = (plan.layout.head_dim(), plan.rows());
    check_query::<B, T, Q>(dev, plan.elem, "q", q, rows * d)?;
    check_table_buffers(
        dev,
        plan.batch,
        plan.n_page_indices,
        page_indptr,
        page_indices,
        seq_lens,
    )?;
    check_outputs::<B, T, O, L>(dev, o, lse, ws, rows, d, plan.n_splits)?;
    let (qp, _a) = q.addr(dev);
    check_aligned("q", qp, 16)?;
    let (ip, _c) = page_indptr.addr(dev);
    let (xp, _d) = page_indices.addr(dev);
    let (sp, _e) = seq_lens.addr(dev);
    let (op, _f) = o.addr_mut(dev);
    let (lp, _g) = lse.addr_mut(dev);
    let (opp, _h) = ws.o_part.addr_mut(dev);
    let (lpp, _i) = ws.lse_part.addr_mut(dev);
    let (stp, _j) = ws.status.arm(dev, plan.batch)?;
    let p = plan.params(
        qp,
        cp,
        quant,
        (ip, xp, sp),
        (opp, lpp, stp),
        (0, plan.n_splits),
    );
    let launches = plan.launches();
    // The kernel reads q, the cache through the checked page table, and writes rows x splits partials.
    launch_kernel(
        dev,
        Family::Attention,
        &launches[0].kernel,
        plan.decode_config(),
        &p,
        None,
    )?;
    launch_merge(dev, plan.elem, (opp, lpp), (op, lp), rows, plan.n_splits, d)
}

/// The merge of `n_splits` partials per row (in split order) into `o` (`elem`) and `lse`.
pub(crate) fn launch_merge<B: Backend>(
    dev: &B,
    elem: &str,
    (opp, lpp): (u64, u64),
    (op, lp): (u64, u64),
    rows: usize,
    n_splits: usize,
    d: usize,
) -> Result<()> {
    let m = fk_attn_merge_params {
        o_part: opp as *const f32,
        lse_part: lpp as *const f32,
        o: op as *mut c_void,
        lse: lp as *mut f32,
        rows: rows as i64,
        n_splits: n_splits as i32,
        head_dim: d as i32,
    };
    let cfg = LaunchConfig {
        grid_dim: (rows.clamp(1, 1 << 20) as u32, 1, 1),
        block_dim: (FK_ATTN_MERGE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    launch_kernel(
        dev,
        Family::Attention,
        &format!("fk_attn_merge_{elem}"),
        cfg,
        &m,
        None,
    )
}
