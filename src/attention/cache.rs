//! The paged KV cache: its storage format, its layout (where every K and V element lives, in 64-bit
//! offsets) and the page table of a batch of sequences, each validated before any kernel reads them.

use crate::error::{Error, Result};

/// Head dimensions the attention kernels are built for. Anything else is `Err(Unsupported)`, never a
/// wrong answer.
pub const HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Group sizes of the quantised formats: tokens per K group (per channel), channels per V group.
pub const KIVI_GROUPS: [usize; 3] = [32, 64, 128];

// The prefill kernel stages the K parameters of the groups a tile touches and the V parameters of a
// token for groups of at least 32 (kernels/attention/prefill.cu, qtiles: NGK, VGM; and
// PrefillPlan::shared_mem_bytes); a smaller group would overflow that staging.
const _: () = {
    let mut i = 0;
    while i < KIVI_GROUPS.len() {
        assert!(KIVI_GROUPS[i] >= 32 && KIVI_GROUPS[i].is_power_of_two());
        i += 1;
    }
};

/// Storage format of the cache's elements.
///
/// The quantised formats are KIVI's: keys are quantised **per channel** over groups of `group`
/// consecutive tokens (positions `g·group .. (g+1)·group` of a sequence), values **per token** over
/// groups of `min(group, head_dim)` channels, each group asymmetric with an f16 scale and zero point:
/// `x ≈ code · scale + zero`, codes in `0 ..= 2^bits − 1`. Only complete token groups are quantised:
/// the newest `len % group` tokens of a sequence stay in full precision in a per-sequence residual
/// ([`PagedKvLayout::residual_elements`]) until their group fills. The byte layout of a page is given
/// by [`PagedKvLayout::code_offset`], [`PagedKvLayout::k_param_offset`] and
/// [`PagedKvLayout::v_param_offset`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvFormat {
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
    /// 8-bit KIVI codes; `group` in [`KIVI_GROUPS`].
    Int8 {
        /// Tokens per K group and (at most) channels per V group.
        group: usize,
    },
    /// 4-bit KIVI codes, two per byte (the even channel in the low nibble); `group` in
    /// [`KIVI_GROUPS`].
    Int4 {
        /// Tokens per K group and (at most) channels per V group.
        group: usize,
    },
}

impl KvFormat {
    /// Bits of one stored element (a code for the quantised formats, without their scales).
    ///
    /// ```
    /// use fusekit::attention::KvFormat;
    /// assert_eq!(KvFormat::Bf16.bits_per_code(), 16);
    /// assert_eq!(KvFormat::Int4 { group: 64 }.bits_per_code(), 4);
    /// ```
    pub fn bits_per_code(self) -> usize {
        match self {
            KvFormat::Bf16 | KvFormat::F16 => 16,
            KvFormat::Int8 { .. } => 8,
            KvFormat::Int4 { .. } => 4,
        }
    }

    /// The KIVI group size of a quantised format; `None` for bf16 and f16.
    ///
    /// ```
    /// use fusekit::attention::KvFormat;
    /// assert_eq!(KvFormat::Int8 { group: 32 }.group(), Some(32));
    /// assert_eq!(KvFormat::F16.group(), None);
    /// ```
    pub fn group(self) -> Option<usize> {
        match self {
            KvFormat::Bf16 | KvFormat::F16 => None,
            KvFormat::Int8 { group } | KvFormat::Int4 { group } => Some(group),
        }
    }

    /// Largest code of a quantised format (`2^bits − 1`); `None` for bf16 and f16.
    ///
    /// ```
    /// use fusekit::attention::KvFormat;
    /// assert_eq!(KvFormat::Int4 { group: 32 }.max_code(), Some(15));
    /// ```
    pub fn max_code(self) -> Option<u32> {
        self.group().map(|_| (1u32 << self.bits_per_code()) - 1)
    }
}

/// Which channels RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Channel `c` with `c + head_dim / 2` (Hugging Face / GPT-NeoX `rotate_half`); frequency index
    /// `c mod head_dim / 2`.
    Half,
    /// Channels `2i` and `2i + 1` (GPT-J, llama.cpp / GGUF); frequency index `i`.
    Interleaved,
}

/// Rotary position embedding: the pair of frequency index `i` is rotated by the angle
/// `pos · theta^(−2i / head_dim)`, the first channel of the pair becoming `x₁ cos − x₂ sin` and the
/// second `x₂ cos + x₁ sin`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    /// Base of the frequencies (10 000 for Llama 2, 500 000 for Llama 3, 100 000 for SmolLM2).
    pub theta: f32,
    /// Channel pairing.
    pub style: RopeStyle,
}

/// Where a cache's keys get their rotary embedding, a per-cache choice. Positions are indices in the
/// cache: token `j` of a sequence is at position `j`, and a decode's query (the sequence's last token)
/// at `len − 1`.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum RopeMode {
    /// The caller rotates q and k (or the model has no RoPE); the kernels rotate nothing.
    #[default]
    None,
    /// The append kernels rotate keys at their position before storing (or quantising) them; decode
    /// rotates q.
    AtAppend(Rope),
    /// Keys are cached before RoPE; decode rotates each key at its position in the cache, and q. This
    /// is what retention needs: after eviction a key's position is its index in the kept cache.
    InAttention(Rope),
}

impl RopeMode {
    /// The rotation, if any.
    ///
    /// ```
    /// use fusekit::attention::{Rope, RopeMode, RopeStyle};
    /// let r = Rope { theta: 1e4, style: RopeStyle::Half };
    /// assert_eq!(RopeMode::InAttention(r).rope(), Some(r));
    /// assert_eq!(RopeMode::None.rope(), None);
    /// ```
    pub fn rope(self) -> Option<Rope> {
        match self {
            RopeMode::None => None,
            RopeMode::AtAppend(r) | RopeMode::InAttention(r) => Some(r),
        }
    }
}

/// Which half of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kv {
    /// Keys.
    K,
    /// Values.
    V,
}

/// The shape of a paged KV cache (one layer): `num_pages` pages of `page_size` token slots. A page holds
/// the keys, then the values, of every KV head: `[2][num_kv_heads][page_size][head_dim]` elements, so
/// one head's slice of a page is `page_size · head_dim` contiguous elements (a kernel reads each KV head
/// of a page as one run). Offsets are 64-bit: caches past 2^31 elements and contexts past 128k tokens
/// are in scope.
///
/// ```
/// use fusekit::attention::{Kv, KvFormat, PagedKvLayout};
/// let l = PagedKvLayout::new(1024, 16, 8, 128, KvFormat::Bf16)?;
/// assert_eq!(l.elements(), 1024 * 2 * 8 * 16 * 128);
/// assert_eq!(l.offset(Kv::V, 1, 0, 0, 0), 2 * 8 * 16 * 128 + 8 * 16 * 128);
/// // Head dim 96 has no kernel: a typed error, not a wrong answer.
/// assert!(matches!(PagedKvLayout::new(1024, 16, 8, 96, KvFormat::Bf16), Err(fusekit::Error::Unsupported { .. })));
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PagedKvLayout {
    num_pages: usize,
    page_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
    format: KvFormat,
    rope: RopeMode,
}

impl PagedKvLayout {
    /// Validates a layout: at least one page, `page_size >= 1` (any size, 1 and 16 included), at
    /// least one KV head, a head dim in [`HEAD_DIMS`], and a total that fits 64-bit offsets and the
    /// page table's i32 page indices.
    pub fn new(
        num_pages: usize,
        page_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
        format: KvFormat,
    ) -> Result<Self> {
        if num_pages == 0 || num_pages > i32::MAX as usize {
            return Err(Error::invalid(
                "num_pages",
                format!("must be in 1..=2^31-1 (i32 page indices), got {num_pages}"),
            ));
        }
        if page_size == 0 {
            return Err(Error::invalid("page_size", "must be >= 1, got 0"));
        }
        if num_kv_heads == 0 {
            return Err(Error::invalid("num_kv_heads", "must be >= 1, got 0"));
        }
        if !HEAD_DIMS.contains(&head_dim) {
            return Err(Error::Unsupported {
                what: format!(
                    "head_dim {head_dim}: the attention kernels are built for {HEAD_DIMS:?}"
                ),
            });
        }
        if let Some(g) = format.group() {
            if !KIVI_GROUPS.contains(&g) {
                return Err(Error::Unsupported {
                    what: format!("KIVI group {g}: the quantised formats use {KIVI_GROUPS:?}"),
                });
            }
        }
        let l = PagedKvLayout {
            num_pages,
            page_size,
            num_kv_heads,
            head_dim,
            format,
            rope: RopeMode::None,
        };
        // Every offset below is at most bytes() - 1 (or elements() - 1): one checked product here
        // covers them all.
        let total =
            (2 * num_kv_heads as u128) * page_size as u128 * head_dim as u128 * num_pages as u128;
        let bytes = (l.page_bytes_u128()) * num_pages as u128;
        if total * 2 > i64::MAX as u128 || bytes > i64::MAX as u128 {
            return Err(Error::invalid(
                "num_pages",
                format!("a cache of {total} elements exceeds 64-bit byte offsets"),
            ));
        }
        Ok(l)
    }

    fn page_bytes_u128(&self) -> u128 {
        let (h, ps, d) = (
            self.num_kv_heads as u128,
            self.page_size as u128,
            self.head_dim as u128,
        );
        match self.format.group() {
            None => 2 * h * ps * d * 2,
            Some(_) => {
                let codes = 2 * h * ps * d * self.format.bits_per_code() as u128 / 8;
                let kp = h * self.k_param_slots() as u128 * d * 4;
                let vp = h * ps * (d / self.v_group() as u128) * 4;
                (codes + kp + vp).div_ceil(16) * 16
            }
        }
    }

    /// Bytes of one page: `2 · page_elements()` for bf16/f16; for a quantised format the K and V codes,
    /// the K parameters ([`k_param_slots`](Self::k_param_slots) × `head_dim` (scale, zero) f16 pairs
    /// per head) and the V parameters (`head_dim / v_group` pairs per token and head), rounded up to
    /// 16 bytes.
    ///
    /// ```
    /// # use fusekit::attention::{KvFormat, PagedKvLayout};
    /// let l = PagedKvLayout::new(3, 64, 2, 128, KvFormat::Int4 { group: 64 })?;
    /// // codes 2·2·64·64 B, K params 2·1·128·4 B, V params 2·64·2·4 B
    /// assert_eq!(l.page_bytes(), 16384 + 1024 + 1024);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn page_bytes(&self) -> u64 {
        self.page_bytes_u128() as u64
    }

    /// Bytes of the whole cache (the device buffer's size).
    ///
    /// ```
    /// # use fusekit::attention::{KvFormat, PagedKvLayout};
    /// let l = PagedKvLayout::new(3, 16, 2, 64, KvFormat::Bf16)?;
    /// assert_eq!(l.bytes(), 2 * l.elements());
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn bytes(&self) -> u64 {
        self.num_pages as u64 * self.page_bytes()
    }

    /// Quantised formats: slots of K parameters per page and head, `ceil(page_size / group)`. The
    /// parameters of a token group live in the page of its first token, in slot
    /// `(first token's slot) / group`. Pages of `group` tokens or a multiple store no unused slot;
    /// smaller pages hold one slot each, used by every `group / page_size`-th page. `0` for bf16/f16.
    ///
    /// ```
    /// # use fusekit::attention::{KvFormat, PagedKvLayout};
    /// assert_eq!(PagedKvLayout::new(3, 128, 1, 64, KvFormat::Int8 { group: 32 })?.k_param_slots(), 4);
    /// assert_eq!(PagedKvLayout::new(3, 16, 1, 64, KvFormat::Int8 { group: 32 })?.k_param_slots(), 1);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn k_param_slots(&self) -> usize {
        self.format
            .group()
            .map_or(0, |g| self.page_size.div_ceil(g))
    }

    /// Quantised formats: channels per V group, `min(group, head_dim)`; `0` for bf16/f16.
    ///
    /// ```
    /// # use fusekit::attention::{KvFormat, PagedKvLayout};
    /// assert_eq!(PagedKvLayout::new(3, 16, 1, 64, KvFormat::Int4 { group: 128 })?.v_group(), 64);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn v_group(&self) -> usize {
        self.format.group().map_or(0, |g| g.min(self.head_dim))
    }

    /// Quantised formats: bytes of one token's codes for one head (`head_dim · bits / 8`).
    ///
    /// ```
    /// # use fusekit::attention::{KvFormat, PagedKvLayout};
    /// assert_eq!(PagedKvLayout::new(3, 16, 1, 128, KvFormat::Int4 { group: 32 })?.code_row_bytes(), 64);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn code_row_bytes(&self) -> usize {
        self.head_dim * self.format.bits_per_code() / 8
    }

    /// Quantised formats: byte offset of the codes of token `slot` of `page`, head `kv_head`. A page is
    /// `[K codes [heads][page_size][code_row_bytes]] [V codes, same] [K params] [V params]`.
    ///
    /// ```
    /// # use fusekit::attention::{Kv, KvFormat, PagedKvLayout};
    /// let l = PagedKvLayout::new(3, 16, 2, 64, KvFormat::Int8 { group: 32 })?;
    /// assert_eq!(l.code_offset(Kv::V, 1, 1, 2), l.page_bytes() + (2 * 16 + 16 + 2) * 64);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn code_offset(&self, kv: Kv, page: usize, kv_head: usize, slot: usize) -> u64 {
        debug_assert!(self.format.group().is_some());
        debug_assert!(
            page < self.num_pages && kv_head < self.num_kv_heads && slot < self.page_size
        );
        let half = match kv {
            Kv::K => 0,
            Kv::V => 1,
        };
        page as u64 * self.page_bytes()
            + (((half * self.num_kv_heads + kv_head) * self.page_size + slot)
                * self.code_row_bytes()) as u64
    }

    /// Quantised formats: `(page_bytes, V codes, K params, V params)`, the byte offsets within a page the
    /// kernels take; zeros for bf16/f16.
    pub(crate) fn quant_sections(&self) -> (i64, i64, i64, i64) {
        if self.format.group().is_none() {
            return (0, 0, 0, 0);
        }
        (
            self.page_bytes() as i64,
            self.code_offset(Kv::V, 0, 0, 0) as i64,
            self.k_params_start() as i64,
            self.v_params_start() as i64,
        )
    }

    /// Byte offset, within a page, of the K parameters: after both code sections.
    fn k_params_start(&self) -> u64 {
        (2 * self.num_kv_heads * self.page_size * self.code_row_bytes()) as u64
    }

    /// Byte offset, within a page, of the V parameters: after the K parameters.
    fn v_params_start(&self) -> u64 {
        self.k_params_start()
            + (self.num_kv_heads * self.k_param_slots() * self.head_dim * 4) as u64
    }

    /// Quantised formats: byte offset of channel `dim`'s (scale, zero) f16 pair of the K group whose
    /// parameters sit in slot `gslot` of `page` (see [`k_param_slots`](Self::k_param_slots)).
    ///
    /// ```
    /// # use fusekit::attention::{KvFormat, PagedKvLayout};
    /// let l = PagedKvLayout::new(3, 64, 1, 64, KvFormat::Int8 { group: 32 })?;
    /// assert_eq!(l.k_param_offset(0, 0, 1, 3), 2 * 64 * 64 + (64 + 3) * 4);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn k_param_offset(&self, page: usize, kv_head: usize, gslot: usize, dim: usize) -> u64 {
        debug_assert!(gslot < self.k_param_slots() && dim < self.head_dim);
        page as u64 * self.page_bytes()
            + self.k_params_start()
            + (((kv_head * self.k_param_slots() + gslot) * self.head_dim + dim) * 4) as u64
    }

    /// Quantised formats: byte offset of the (scale, zero) f16 pair of V group `vgroup` (channels
    /// `vgroup · v_group ..`) of token `slot` of `page`.
    ///
    /// ```
    /// # use fusekit::attention::{KvFormat, PagedKvLayout};
    /// let l = PagedKvLayout::new(3, 16, 1, 128, KvFormat::Int4 { group: 32 })?;
    /// assert_eq!(l.v_param_offset(0, 0, 1, 2), 2 * 16 * 64 + 128 * 4 + (4 + 2) * 4);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn v_param_offset(&self, page: usize, kv_head: usize, slot: usize, vgroup: usize) -> u64 {
        let per_tok = self.head_dim / self.v_group();
        debug_assert!(slot < self.page_size && vgroup < per_tok);
        page as u64 * self.page_bytes()
            + self.v_params_start()
            + (((kv_head * self.page_size + slot) * per_tok + vgroup) * 4) as u64
    }

    /// Quantised formats: elements of a full-precision residual with `slots` sequence slots,
    /// `[slots][2][num_kv_heads][group][head_dim]` (the newest `len % group` tokens of the sequence in
    /// each slot, token `t` at index `t % group`). `0` for bf16/f16.
    ///
    /// ```
    /// # use fusekit::attention::{KvFormat, PagedKvLayout};
    /// let l = PagedKvLayout::new(3, 16, 2, 64, KvFormat::Int4 { group: 32 })?;
    /// assert_eq!(l.residual_elements(5), 5 * 2 * 2 * 32 * 64);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn residual_elements(&self, slots: usize) -> u64 {
        self.format.group().map_or(0, |g| {
            (slots * 2 * self.num_kv_heads * g * self.head_dim) as u64
        })
    }

    /// Quantised formats: offset, in elements, of element `dim` of token index `i` (`< group`) of head
    /// `kv_head` in residual slot `slot`.
    ///
    /// ```
    /// # use fusekit::attention::{Kv, KvFormat, PagedKvLayout};
    /// let l = PagedKvLayout::new(3, 16, 2, 64, KvFormat::Int4 { group: 32 })?;
    /// assert_eq!(l.residual_offset(Kv::V, 1, 0, 3, 5), (2 * 2 + 2) * 32 * 64 + 3 * 64 + 5);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn residual_offset(
        &self,
        kv: Kv,
        slot: usize,
        kv_head: usize,
        i: usize,
        dim: usize,
    ) -> u64 {
        let g = self.format.group().unwrap_or(0);
        debug_assert!(i < g && dim < self.head_dim && kv_head < self.num_kv_heads);
        let half = match kv {
            Kv::K => 0,
            Kv::V => 1,
        };
        ((((slot * 2 + half) * self.num_kv_heads + kv_head) * g + i) * self.head_dim + dim) as u64
    }

    /// The same layout with its keys' rotary embedding: applied at append or in attention
    /// ([`RopeMode`]). `theta` must be finite and > 1.
    ///
    /// ```
    /// use fusekit::attention::{KvFormat, PagedKvLayout, Rope, RopeMode, RopeStyle};
    /// let r = Rope { theta: 1e5, style: RopeStyle::Interleaved };
    /// let l = PagedKvLayout::new(4, 16, 3, 64, KvFormat::Bf16)?.with_rope(RopeMode::InAttention(r))?;
    /// assert_eq!(l.rope(), RopeMode::InAttention(r));
    /// let bad = Rope { theta: f32::NAN, ..r };
    /// assert!(l.with_rope(RopeMode::AtAppend(bad)).is_err());
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn with_rope(self, rope: RopeMode) -> Result<Self> {
        if let Some(r) = rope.rope() {
            if !(r.theta.is_finite() && r.theta > 1.0) {
                return Err(Error::invalid(
                    "rope.theta",
                    format!("must be finite and > 1, got {}", r.theta),
                ));
            }
        }
        Ok(PagedKvLayout { rope, ..self })
    }

    /// Where the keys get their rotary embedding.
    ///
    /// ```
    /// # use fusekit::attention::{KvFormat, PagedKvLayout, RopeMode};
    /// assert_eq!(PagedKvLayout::new(3, 1, 1, 64, KvFormat::F16)?.rope(), RopeMode::None);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn rope(&self) -> RopeMode {
        self.rope
    }

    /// Pages in the cache.
    ///
    /// ```
    /// # use fusekit::attention::{KvFormat, PagedKvLayout};
    /// assert_eq!(PagedKvLayout::new(3, 1, 1, 64, KvFormat::F16)?.num_pages(), 3);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn num_pages(&self) -> usize {
        self.num_pages
    }

    /// Token slots per page.
    ///
    /// ```
    /// # use fusekit::attention::{KvFormat, PagedKvLayout};
    /// assert_eq!(PagedKvLayout::new(3, 16, 1, 64, KvFormat::F16)?.page_size(), 16);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// KV heads.
    ///
    /// ```
    /// # use fusekit::attention::{KvFormat, PagedKvLayout};
    /// assert_eq!(PagedKvLayout::new(3, 16, 4, 64, KvFormat::F16)?.num_kv_heads(), 4);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }

    /// Elements per head vector.
    ///
    /// ```
    /// # use fusekit::attention::{KvFormat, PagedKvLayout};
    /// assert_eq!(PagedKvLayout::new(3, 16, 4, 256, KvFormat::F16)?.head_dim(), 256);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Storage format.
    ///
    /// ```
    /// # use fusekit::attention::{KvFormat, PagedKvLayout};
    /// assert_eq!(PagedKvLayout::new(3, 16, 4, 64, KvFormat::Bf16)?.format(), KvFormat::Bf16);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn format(&self) -> KvFormat {
        self.format
    }

    /// Elements of one page (K and V of every head).
    ///
    /// ```
    /// # use fusekit::attention::{KvFormat, PagedKvLayout};
    /// assert_eq!(PagedKvLayout::new(3, 16, 4, 64, KvFormat::Bf16)?.page_elements(), 2 * 4 * 16 * 64);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn page_elements(&self) -> u64 {
        2 * (self.num_kv_heads * self.page_size * self.head_dim) as u64
    }

    /// Elements of the whole cache (for a quantised format, the logical elements its codes stand for).
    ///
    /// ```
    /// # use fusekit::attention::{KvFormat, PagedKvLayout};
    /// assert_eq!(PagedKvLayout::new(3, 16, 4, 64, KvFormat::Bf16)?.elements(), 3 * 2 * 4 * 16 * 64);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn elements(&self) -> u64 {
        self.num_pages as u64 * self.page_elements()
    }

    /// Offset, in elements, of element `dim` of the K or V vector of `kv_head` in `slot` of `page`.
    /// Arguments past the layout's ranges are a caller bug, caught in debug builds.
    ///
    /// ```
    /// # use fusekit::attention::{Kv, KvFormat, PagedKvLayout};
    /// let l = PagedKvLayout::new(3, 16, 4, 64, KvFormat::Bf16)?;
    /// assert_eq!(l.offset(Kv::K, 0, 1, 2, 3), 16 * 64 + 2 * 64 + 3);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn offset(&self, kv: Kv, page: usize, kv_head: usize, slot: usize, dim: usize) -> u64 {
        debug_assert!(page < self.num_pages && kv_head < self.num_kv_heads);
        debug_assert!(slot < self.page_size && dim < self.head_dim);
        let half = match kv {
            Kv::K => 0,
            Kv::V => 1,
        };
        let head_run = (self.page_size * self.head_dim) as u64;
        page as u64 * self.page_elements()
            + (half * self.num_kv_heads as u64 + kv_head as u64) * head_run
            + (slot * self.head_dim + dim) as u64
    }

    /// Checks `table` against this cache: a non-empty batch, a CSR page list (`page_indptr` of
    /// `batch + 1` non-decreasing entries from 0 to `page_indices.len()`), every page index in
    /// `[0, num_pages)`, and each sequence's length in `1..=` its pages' capacity with no page past
    /// the one its last token needs. Names the first offending argument and position.
    ///
    /// ```
    /// use fusekit::attention::{KvFormat, PageTable, PagedKvLayout};
    /// let l = PagedKvLayout::new(8, 16, 2, 64, KvFormat::Bf16)?;
    /// // Two sequences: 20 tokens on pages 3, 5; 16 tokens on page 0.
    /// let t = PageTable { page_indptr: &[0, 2, 3], page_indices: &[3, 5, 0], seq_lens: &[20, 16] };
    /// l.check_page_table(&t)?;
    /// let bad = PageTable { page_indices: &[3, 8, 0], ..t };
    /// assert!(matches!(l.check_page_table(&bad), Err(fusekit::Error::OutOfRange { arg: "page_indices", .. })));
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn check_page_table(&self, t: &PageTable<'_>) -> Result<()> {
        self.check_table(t, false)
    }

    /// [`check_page_table`](Self::check_page_table); with `allow_empty`, a sequence may hold no token
    /// (and then no page).
    pub(crate) fn check_table(&self, t: &PageTable<'_>, allow_empty: bool) -> Result<()> {
        let batch = t.seq_lens.len();
        if batch == 0 {
            return Err(Error::shape(
                "seq_lens",
                "at least one sequence",
                "an empty batch",
            ));
        }
        if t.page_indptr.len() != batch + 1 {
            return Err(Error::shape(
                "page_indptr",
                format!("batch + 1 = {} entries", batch + 1),
                format!("{}", t.page_indptr.len()),
            ));
        }
        if t.page_indptr[0] != 0 || t.page_indptr[batch] as i64 != t.page_indices.len() as i64 {
            return Err(Error::invalid(
                "page_indptr",
                format!(
                    "must run from 0 to page_indices.len() = {}, got {} .. {}",
                    t.page_indices.len(),
                    t.page_indptr[0],
                    t.page_indptr[batch]
                ),
            ));
        }
        for b in 0..batch {
            let (lo, hi) = (t.page_indptr[b], t.page_indptr[b + 1]);
            if hi < lo {
                return Err(Error::invalid(
                    "page_indptr",
                    format!("decreases at sequence {b}: {lo} then {hi}"),
                ));
            }
            let pages = (hi - lo) as u64;
            let len = t.seq_lens[b] as u64;
            let cap = pages * self.page_size as u64;
            if (len == 0 && !allow_empty) || len > cap || len + (self.page_size as u64) <= cap {
                return Err(Error::invalid(
                    "seq_lens",
                    format!(
                        "sequence {b} has {len} tokens on {pages} pages of {}: each sequence needs \
                         1 token at least and exactly ceil(len / page_size) pages",
                        self.page_size
                    ),
                ));
            }
        }
        if let Some((i, &p)) = t
            .page_indices
            .iter()
            .enumerate()
            .find(|(_, &p)| p < 0 || p as usize >= self.num_pages)
        {
            return Err(Error::OutOfRange {
                arg: "page_indices",
                index: i,
                value: p as i64,
                allowed: format!("[0, {})", self.num_pages),
            });
        }
        Ok(())
    }
}

/// The pages of a batch of sequences (CSR, as FlashInfer's paged KV): sequence `b` owns pages
/// `page_indices[page_indptr[b] .. page_indptr[b + 1]]` in token order and holds `seq_lens[b]` tokens,
/// token `i` in slot `i % page_size` of its `i / page_size`-th page. Checked by
/// [`PagedKvLayout::check_page_table`].
#[derive(Clone, Copy, Debug)]
pub struct PageTable<'a> {
    /// `batch + 1` offsets into `page_indices`.
    pub page_indptr: &'a [i32],
    /// Page numbers, sequence after sequence.
    pub page_indices: &'a [i32],
    /// Tokens per sequence (u32: contexts up to 4G tokens).
    pub seq_lens: &'a [u32],
}

/// Element types of the query, the cache and the output: bf16 and f16.
pub trait KvElement: crate::testing::Element + crate::dtype::sealed::Sealed {
    /// Kernel-name suffix.
    const SUFFIX: &'static str;
    /// The cache format of this element type.
    const FORMAT: KvFormat;
}
impl KvElement for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    const FORMAT: KvFormat = KvFormat::Bf16;
}
impl KvElement for half::f16 {
    const SUFFIX: &'static str = "f16";
    const FORMAT: KvFormat = KvFormat::F16;
}
