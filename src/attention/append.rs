//! Append: new tokens' K and V into their pages, quantised on the way for the KIVI formats. The plan is
//! validated on the host from the page table (lengths after the append) and the new tokens per sequence.

use super::status::StatusWord;
use std::ffi::c_void;

use cudarc::driver::LaunchConfig;

use super::cache::KvElement;
use super::cache::RopeMode;
use super::cache::{PageTable, PagedKvLayout};
use super::decode::{check_table_buffers, rope_log2_theta, rope_style};
use super::kivi::{check_quant_buffers, check_quant_plan};
use crate::device::{check_aligned, Family};
use crate::error::{Error, Result};
use crate::launch::launch_kernel;
use crate::params::*;
use crate::plan::PlannedLaunch;
use crate::validate::{exactly, owned};
use crate::{Backend, DeviceRead, DeviceWrite};

/// The validated plan of an [`append`] or [`append_quantized`]: sequence `b` appends
/// `append_indptr[b + 1] − append_indptr[b]` new tokens, which take its last positions (the page table
/// holds the lengths **after** the append, and its pages for them).
///
/// ```
/// use fusekit::attention::{AppendPlan, KvFormat, PageTable, PagedKvLayout};
/// let l = PagedKvLayout::new(8, 16, 2, 64, KvFormat::Bf16)?;
/// // Sequence 0 grows from 20 to 21 tokens (a decode step), sequence 1 from 0 to 17 (a prefill).
/// let t = PageTable { page_indptr: &[0, 2, 4], page_indices: &[0, 1, 2, 3], seq_lens: &[21, 17] };
/// let plan = AppendPlan::new::<half::bf16>(&l, &t, &[0, 1, 18])?;
/// assert_eq!(plan.new_tokens(), 18);
/// // More new tokens than the sequence holds: an error naming the argument.
/// assert!(AppendPlan::new::<half::bf16>(&l, &t, &[0, 22, 39]).is_err());
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct AppendPlan {
    layout: PagedKvLayout,
    batch: usize,
    n_new: usize,
    n_page_indices: usize,
    /// Quantised caches: the most groups one sequence completes, and the residual slots.
    max_groups: usize,
    slots: Option<usize>,
    elem: &'static str,
}

impl AppendPlan {
    /// Validates an append of `T` tokens to a bf16/f16 cache of format `T`.
    pub fn new<T: KvElement>(
        layout: &PagedKvLayout,
        table: &PageTable<'_>,
        append_indptr: &[i32],
    ) -> Result<Self> {
        if layout.format() != T::FORMAT {
            return Err(Error::DType {
                arg: "cache",
                expected: format!(
                    "{:?} (the layout's format; a quantised cache takes AppendPlan::new_quantized)",
                    layout.format()
                ),
                got: T::SUFFIX.to_string(),
            });
        }
        Self::build::<T>(layout, table, append_indptr, None)
    }

    /// Validates an append of `T` tokens to a quantised (KIVI) cache: the groups the new tokens complete
    /// are quantised into the pages, the rest go to each sequence's residual slot.
    ///
    /// ```
    /// use fusekit::attention::{AppendPlan, KvFormat, PageTable, PagedKvLayout};
    /// let l = PagedKvLayout::new(8, 16, 1, 64, KvFormat::Int4 { group: 32 })?;
    /// let t = PageTable { page_indptr: &[0, 3], page_indices: &[4, 5, 6], seq_lens: &[33] };
    /// let plan = AppendPlan::new_quantized::<half::f16>(&l, &t, &[0, 2], &[0], 1)?; // 31 -> 33 tokens
    /// let names: Vec<String> = plan.launches().into_iter().map(|l| l.kernel).collect();
    /// assert_eq!(names, ["fk_attn_append_q4_f16_d64", "fk_attn_append_f16_d64"]);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn new_quantized<T: KvElement>(
        layout: &PagedKvLayout,
        table: &PageTable<'_>,
        append_indptr: &[i32],
        residual_slots: &[i32],
        slots: usize,
    ) -> Result<Self> {
        check_quant_plan(
            layout,
            table.seq_lens.len(),
            residual_slots,
            slots,
            "AppendPlan::new",
        )?;
        Self::build::<T>(layout, table, append_indptr, Some(slots))
    }

    fn build<T: KvElement>(
        layout: &PagedKvLayout,
        table: &PageTable<'_>,
        append_indptr: &[i32],
        slots: Option<usize>,
    ) -> Result<Self> {
        layout.check_page_table(table)?;
        let batch = table.seq_lens.len();
        if batch > 65535 || layout.num_kv_heads() > 65535 {
            return Err(Error::Unsupported {
                what: format!(
                    "an append of {batch} sequences x {} KV heads (at most 65535 each)",
                    layout.num_kv_heads()
                ),
            });
        }
        exactly("append_indptr", append_indptr.len(), batch + 1, "batch + 1")?;
        if append_indptr[0] != 0 {
            return Err(Error::invalid(
                "append_indptr",
                format!("must start at 0, got {}", append_indptr[0]),
            ));
        }
        let mut max_groups = 0usize;
        for b in 0..batch {
            let n = append_indptr[b + 1] as i64 - append_indptr[b] as i64;
            let len = table.seq_lens[b] as i64;
            if n < 0 || n > len {
                return Err(Error::invalid(
                    "append_indptr",
                    format!(
                        "sequence {b} appends {n} tokens but holds {len} after the append (each \
                         sequence appends 0 ..= its length)"
                    ),
                ));
            }
            if let Some(g) = layout.format().group() {
                let (len, old) = (len as usize, (len - n) as usize);
                max_groups = max_groups.max(len / g - old / g);
            }
        }
        let n_new = append_indptr[batch] as usize;
        Ok(AppendPlan {
            layout: *layout,
            batch,
            n_new,
            n_page_indices: table.page_indices.len(),
            max_groups,
            slots,
            elem: T::SUFFIX,
        })
    }

    /// New tokens in the batch (rows of `k_new` and `v_new`).
    ///
    /// ```
    /// # use fusekit::attention::{AppendPlan, KvFormat, PageTable, PagedKvLayout};
    /// let l = PagedKvLayout::new(2, 16, 1, 64, KvFormat::F16)?;
    /// let t = PageTable { page_indptr: &[0, 1], page_indices: &[1], seq_lens: &[5] };
    /// assert_eq!(AppendPlan::new::<half::f16>(&l, &t, &[0, 5])?.new_tokens(), 5);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn new_tokens(&self) -> usize {
        self.n_new
    }

    /// The launches: for a quantised cache, the group quantisation (when a group completes), then the
    /// copy of the newest tokens into the residual; for bf16/f16, the copy into the pages.
    ///
    /// ```
    /// # use fusekit::attention::{AppendPlan, KvFormat, PageTable, PagedKvLayout};
    /// let l = PagedKvLayout::new(2, 16, 1, 128, KvFormat::Bf16)?;
    /// let t = PageTable { page_indptr: &[0, 1], page_indices: &[1], seq_lens: &[5] };
    /// let plan = AppendPlan::new::<half::bf16>(&l, &t, &[0, 1])?;
    /// assert_eq!(plan.launches()[0].kernel, "fk_attn_append_bf16_d128");
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn launches(&self) -> Vec<PlannedLaunch> {
        let d = self.layout.head_dim();
        let mut v = Vec::new();
        if self.n_new == 0 {
            return v;
        }
        if self.max_groups > 0 {
            let bits = self.layout.format().bits_per_code();
            v.push(PlannedLaunch {
                kernel: format!("fk_attn_append_q{bits}_{}_d{d}", self.elem),
                grid: self.max_groups.min(u32::MAX as usize) as u32,
                block: FK_ATTN_APPEND_THREADS,
                shared_mem_bytes: 0,
            });
        }
        let vectors = self.n_new as u64 * 2 * self.layout.num_kv_heads() as u64 * (d as u64 / 8);
        v.push(PlannedLaunch {
            kernel: format!("fk_attn_append_{}_d{d}", self.elem),
            grid: vectors
                .div_ceil(FK_ATTN_APPEND_THREADS as u64)
                .clamp(1, 1 << 16) as u32,
            block: FK_ATTN_APPEND_THREADS,
            shared_mem_bytes: 0,
        });
        v
    }
}

/// The status word of an append. Reusable across appends.
#[derive(Debug)]
pub struct AppendWorkspace<B: Backend> {
    status: StatusWord<B>,
}

impl<B: Backend> AppendWorkspace<B> {
    /// Allocates the status word on `dev`.
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// let dev = fusekit::emu::Emulator::new()?;
    /// let ws = fusekit::attention::AppendWorkspace::new(&dev)?;
    /// ws.check_status_sync(&dev)?; // nothing appended yet
    /// # Ok(()) }
    /// ```
    pub fn new(dev: &B) -> Result<Self> {
        Ok(AppendWorkspace {
            status: StatusWord::new(dev)?,
        })
    }

    /// After an append: `Err(OutOfRange)` naming the first sequence whose device tables disagreed with
    /// the plan (its writes were skipped, so its part of the cache is unspecified; nothing outside the
    /// cache was written), else `Ok`. Synchronises the stream.
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// let dev = fusekit::emu::Emulator::new()?;
    /// fusekit::attention::AppendWorkspace::new(&dev)?.check_status_sync(&dev)?;
    /// # Ok(()) }
    /// ```
    pub fn check_status_sync(&self, dev: &B) -> Result<()> {
        self.status.check_sync(
            dev,
            "device tables equal to the plan's (append_indptr, pages in range, \
             ceil(len / page_size) pages per sequence, residual slots in range)",
        )
    }
}

/// Appends new tokens to a bf16/f16 cache: row `i` of `k_new` and `v_new` (`[new_tokens, num_kv_heads,
/// head_dim]`) of sequence `b` (rows `append_indptr[b] ..`) goes to position `seq_lens[b] − n_b + i`
/// of that sequence. The device tables must hold the plan's values (other values are never written out
/// of bounds: see [`AppendWorkspace::check_status_sync`]).
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::attention::{append, AppendPlan, AppendWorkspace, Kv, KvFormat, PageTable, PagedKvLayout};
/// use half::bf16;
/// let dev = fusekit::emu::Emulator::new()?;
/// let l = PagedKvLayout::new(2, 4, 1, 64, KvFormat::Bf16)?;
/// // One sequence on page 1, growing from 2 to 3 tokens.
/// let t = PageTable { page_indptr: &[0, 1], page_indices: &[1], seq_lens: &[3] };
/// let plan = AppendPlan::new::<bf16>(&l, &t, &[0, 1])?;
/// let k = dev.upload(&vec![bf16::ONE; 64])?;
/// let v = dev.upload(&vec![bf16::from_f32(2.0); 64])?;
/// let mut cache = dev.alloc_zeros::<bf16>(l.elements() as usize)?;
/// let (ai, pi, px, lens) = (dev.upload(&[0i32, 1])?, dev.upload(t.page_indptr)?, dev.upload(t.page_indices)?, dev.upload(t.seq_lens)?);
/// let mut ws = AppendWorkspace::new(&dev)?;
/// append(&dev, &plan, &k, &v, &ai, &mut cache, &pi, &px, &lens, &mut ws)?;
/// ws.check_status_sync(&dev)?;
/// let host = dev.download(&cache)?;
/// assert_eq!(host[l.offset(Kv::V, 1, 0, 2, 63) as usize], bf16::from_f32(2.0));
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn append<B, T, K, V, A, C, P, I, S>(
    dev: &B,
    plan: &AppendPlan,
    k_new: &K,
    v_new: &V,
    append_indptr: &A,
    cache: &mut C,
    page_indptr: &P,
    page_indices: &I,
    seq_lens: &S,
    ws: &mut AppendWorkspace<B>,
) -> Result<()>
where
    B: Backend,
    T: KvElement,
    K: DeviceRead<T, B>,
    V: DeviceRead<T, B>,
    A: DeviceRead<i32, B>,
    C: DeviceWrite<T, B>,
    P: DeviceRead<i32, B>,
    I: DeviceRead<i32, B>,
    S: DeviceRead<u32, B>,
{
    if plan.slots.is_some() {
        return Err(Error::DType {
            arg: "cache",
            expected: "the bytes of a quantised cache: this plan is for append_quantized".into(),
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
    let (cp, _c) = cache.addr_mut(dev);
    check_aligned("cache", cp, 16)?;
    run::<B, T, K, V, A, P, I, S>(
        dev,
        plan,
        k_new,
        v_new,
        append_indptr,
        cp,
        None,
        page_indptr,
        page_indices,
        seq_lens,
        ws,
    )
}

/// Appends new tokens to a quantised (KIVI) cache: the token groups the append completes are quantised
/// (K per channel, V per token, as [`pack_quantized`](super::pack_quantized) does, bit for bit) into the
/// pages, reading the tokens already in the residual; the new tokens past the last complete group go
/// to the sequence's residual slot. Arguments as [`append`], plus the cache's bytes, its residual and
/// the residual slots the plan was made from.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::Backend;
/// use fusekit::attention::{append_quantized, pack_quantized, AppendPlan, AppendWorkspace, KvFormat, PageTable, PagedKvLayout};
/// use half::bf16;
/// let dev = fusekit::emu::Emulator::new()?;
/// let l = PagedKvLayout::new(2, 32, 1, 64, KvFormat::Int8 { group: 32 })?;
/// // A 32-token prefill: one group, quantised straight into page 1.
/// let t = PageTable { page_indptr: &[0, 1], page_indices: &[1], seq_lens: &[32] };
/// let plan = AppendPlan::new_quantized::<bf16>(&l, &t, &[0, 32], &[0], 1)?;
/// let kv: Vec<bf16> = (0..32 * 64).map(|i| bf16::from_f32((i % 13) as f32 - 6.0)).collect();
/// let (k, v) = (dev.upload(&kv)?, dev.upload(&kv)?);
/// let mut cache = dev.alloc_zeros::<u8>(l.bytes() as usize)?;
/// let mut residual = dev.alloc_zeros::<bf16>(l.residual_elements(1) as usize)?;
/// let (ai, pi, px, lens, slots) = (dev.upload(&[0i32, 32])?, dev.upload(t.page_indptr)?, dev.upload(t.page_indices)?, dev.upload(t.seq_lens)?, dev.upload(&[0i32])?);
/// let mut ws = AppendWorkspace::new(&dev)?;
/// append_quantized(&dev, &plan, &k, &v, &ai, &mut cache, &mut residual, &pi, &px, &lens, &slots, &mut ws)?;
/// ws.check_status_sync(&dev)?;
/// // The same bytes as packing on the host.
/// let mut values = vec![0.0; l.elements() as usize];
/// for t in 0..32 { for e in 0..64 {
///     let x = kv[t * 64 + e].to_f64();
///     values[l.offset(fusekit::attention::Kv::K, 1, 0, t, e) as usize] = x;
///     values[l.offset(fusekit::attention::Kv::V, 1, 0, t, e) as usize] = x;
/// } }
/// assert_eq!(dev.download(&cache)?, pack_quantized::<bf16>(&l, &values, &t, &[0], 1)?.bytes);
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn append_quantized<B, T, K, V, A, C, R, P, I, S, RS>(
    dev: &B,
    plan: &AppendPlan,
    k_new: &K,
    v_new: &V,
    append_indptr: &A,
    cache: &mut C,
    residual: &mut R,
    page_indptr: &P,
    page_indices: &I,
    seq_lens: &S,
    residual_slots: &RS,
    ws: &mut AppendWorkspace<B>,
) -> Result<()>
where
    B: Backend,
    T: KvElement,
    K: DeviceRead<T, B>,
    V: DeviceRead<T, B>,
    A: DeviceRead<i32, B>,
    C: DeviceWrite<u8, B>,
    R: DeviceWrite<T, B>,
    P: DeviceRead<i32, B>,
    I: DeviceRead<i32, B>,
    S: DeviceRead<u32, B>,
    RS: DeviceRead<i32, B>,
{
    let slots = check_quant_buffers::<B, T, C, R, RS>(
        dev,
        "append",
        &plan.layout,
        plan.slots,
        plan.batch,
        cache,
        residual,
        residual_slots,
    )?;
    let (cp, _c) = cache.addr_mut(dev);
    let (rp, _r) = residual.addr_mut(dev);
    let (sp, _s) = residual_slots.addr(dev);
    check_aligned("cache", cp, 16)?;
    check_aligned("residual", rp, 16)?;
    run::<B, T, K, V, A, P, I, S>(
        dev,
        plan,
        k_new,
        v_new,
        append_indptr,
        cp,
        Some((rp, sp, slots)),
        page_indptr,
        page_indices,
        seq_lens,
        ws,
    )
}

#[allow(clippy::too_many_arguments)]
fn run<B, T, K, V, A, P, I, S>(
    dev: &B,
    plan: &AppendPlan,
    k_new: &K,
    v_new: &V,
    append_indptr: &A,
    cp: u64,
    quant: Option<(u64, u64, usize)>,
    page_indptr: &P,
    page_indices: &I,
    seq_lens: &S,
    ws: &mut AppendWorkspace<B>,
) -> Result<()>
where
    B: Backend,
    T: KvElement,
    K: DeviceRead<T, B>,
    V: DeviceRead<T, B>,
    A: DeviceRead<i32, B>,
    P: DeviceRead<i32, B>,
    I: DeviceRead<i32, B>,
    S: DeviceRead<u32, B>,
{
    if plan.elem != T::SUFFIX {
        return Err(Error::DType {
            arg: "k_new",
            expected: plan.elem.to_string(),
            got: T::SUFFIX.to_string(),
        });
    }
    owned(dev, "k_new", k_new)?;
    owned(dev, "v_new", v_new)?;
    owned(dev, "append_indptr", append_indptr)?;
    check_table_buffers(
        dev,
        plan.batch,
        plan.n_page_indices,
        page_indptr,
        page_indices,
        seq_lens,
    )?;
    let l = &plan.layout;
    let row = l.num_kv_heads() * l.head_dim();
    exactly(
        "k_new",
        k_new.len(),
        plan.n_new * row,
        "new_tokens * num_kv_heads * head_dim",
    )?;
    exactly(
        "v_new",
        v_new.len(),
        plan.n_new * row,
        "new_tokens * num_kv_heads * head_dim",
    )?;
    exactly(
        "append_indptr",
        append_indptr.len(),
        plan.batch + 1,
        "batch + 1",
    )?;
    let (kp, _k) = k_new.addr(dev);
    let (vp, _v) = v_new.addr(dev);
    check_aligned("k_new", kp, 16)?;
    check_aligned("v_new", vp, 16)?;
    let (ap, _a) = append_indptr.addr(dev);
    let (ip, _i) = page_indptr.addr(dev);
    let (xp, _x) = page_indices.addr(dev);
    let (lp, _l) = seq_lens.addr(dev);
    let (stp, _s) = ws.status.arm(dev, plan.batch)?;
    let (rp, rsp, slots) = quant.unwrap_or((0, 0, 0));
    let q = quant.is_some();
    let (page_bytes, v_codes_start, k_params_start, v_params_start) = l.quant_sections();
    let mut p = fk_attn_append_params {
        k_new: kp as *const c_void,
        v_new: vp as *const c_void,
        append_indptr: ap as *const i32,
        cache: cp as *mut c_void,
        residual: rp as *mut c_void,
        residual_slots: rsp as *const i32,
        page_indptr: ip as *const i32,
        page_indices: xp as *const i32,
        seq_lens: lp as *const u32,
        status: stp as *mut u64,
        num_pages: l.num_pages() as i64,
        n_page_indices: plan.n_page_indices as i64,
        n_new: plan.n_new as i64,
        page_bytes,
        v_codes_start,
        k_params_start,
        v_params_start,
        batch: plan.batch as i32,
        num_kv_heads: l.num_kv_heads() as i32,
        page_size: l.page_size() as i32,
        n_slots: slots as i32,
        group: l.format().group().unwrap_or(0) as i32,
        v_group: l.v_group() as i32,
        k_param_slots: l.k_param_slots() as i32,
        to_residual: 0,
        rope_log2_theta: rope_log2_theta(l),
        rope_style: rope_style(l),
        rope_k: matches!(l.rope(), RopeMode::AtAppend(_)) as i32,
    };
    for launch in plan.launches() {
        let cfg = if launch.kernel.contains("_q") {
            LaunchConfig {
                grid_dim: (launch.grid, l.num_kv_heads() as u32, plan.batch as u32),
                block_dim: (launch.block, 1, 1),
                shared_mem_bytes: 0,
            }
        } else {
            p.to_residual = q as i32;
            launch.config()
        };
        launch_kernel(dev, Family::Attention, &launch.kernel, cfg, &p, None)?;
    }
    Ok(())
}
