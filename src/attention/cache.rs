//! The paged KV cache: its storage format, its layout (where every K and V element lives, in 64-bit
//! offsets) and the page table of a batch of sequences, each validated before any kernel reads them.

use crate::error::{Error, Result};

/// Head dimensions the attention kernels are built for. Anything else is `Err(Unsupported)`, never a
/// wrong answer.
pub const HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Storage format of the cache's elements.
///
/// The quantised formats of issue 14 (KIVI int8/int4: K grouped per channel, V per token, with a scale
/// and zero point per group and the most recent tokens in full precision) are designed in
/// `src/attention/DESIGN.md` and not built yet; they will be variants of this enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvFormat {
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

impl KvFormat {
    /// Bytes of one stored element.
    ///
    /// ```
    /// assert_eq!(fusekit::attention::KvFormat::Bf16.bytes_per_element(), 2);
    /// ```
    pub fn bytes_per_element(self) -> usize {
        match self {
            KvFormat::Bf16 | KvFormat::F16 => 2,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedKvLayout {
    num_pages: usize,
    page_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
    format: KvFormat,
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
        let l = PagedKvLayout {
            num_pages,
            page_size,
            num_kv_heads,
            head_dim,
            format,
        };
        // Every offset below is at most elements() - 1: one checked product here covers them all.
        let total =
            (2 * num_kv_heads as u128) * page_size as u128 * head_dim as u128 * num_pages as u128;
        if total * format.bytes_per_element() as u128 > i64::MAX as u128 {
            return Err(Error::invalid(
                "num_pages",
                format!("a cache of {total} elements exceeds 64-bit byte offsets"),
            ));
        }
        Ok(l)
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

    /// Elements of the whole cache.
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
            if len == 0 || len > cap || len + (self.page_size as u64) <= cap {
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
