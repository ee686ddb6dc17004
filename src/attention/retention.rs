//! Retention: attention sinks + a recent window (StreamingLLM; "When Attention Sink Emerges"), applied
//! to a batch's page table on the host. Evicted tokens leave the table; their pages go back to the
//! caller; no kernel moves data.
//!
//! The unit of eviction is `lcm(page_size, group)` tokens (`group` = 1 for bf16/f16 caches), so every
//! evicted range is whole pages and, for a KIVI cache, whole token groups: the kept tokens' groups stay
//! aligned to positions `g·G` of the kept sequence, their K parameters stay in the page of their first
//! token, and the residual (the newest `len % G` tokens) is untouched. The sinks are the first
//! `sinks` tokens rounded up to a unit, the window the last `window` tokens rounded up to a unit
//! boundary: at least `sinks` and `window` tokens are kept, at most a unit more of each.
//!
//! Positions: after eviction a key's position is its index in the kept sequence, and the query's is
//! `len − 1` of the kept sequence, as StreamingLLM assigns them. That needs keys cached before RoPE
//! ([`RopeMode::InAttention`]: decode rotates each key at its kept index) or no RoPE in the kernels
//! ([`RopeMode::None`]: the caller's business). A cache whose keys were rotated at append
//! ([`RopeMode::AtAppend`]) would keep their old positions against a query at its new one, so
//! [`Retention::apply`] refuses it.

use std::ops::Range;

use super::cache::{PageTable, PagedKvLayout, RopeMode};
use crate::error::{Error, Result};

/// A sinks + recent-window retention policy.
///
/// ```
/// use fusekit::attention::{KvFormat, PagedKvLayout, Retention};
/// let l = PagedKvLayout::new(64, 16, 2, 64, KvFormat::Bf16)?;
/// let r = Retention::new(4, 100)?;
/// // 300 tokens: the sinks are the first page (16 tokens), the window starts at the page boundary
/// // at or before token 200, so tokens 16..192 (11 pages) are evicted and 124 stay.
/// assert_eq!(r.evicted(&l, 300), 16..192);
/// assert_eq!(r.evicted(&l, 120), 16..16); // short: nothing to evict
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    sinks: u32,
    window: u32,
}

/// A page table after [`Retention::apply`]: the kept pages and lengths, and what was evicted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retained {
    /// `batch + 1` offsets into `page_indices`.
    pub page_indptr: Vec<i32>,
    /// The kept pages, sequence after sequence, in token order.
    pub page_indices: Vec<i32>,
    /// Tokens per sequence after eviction.
    pub seq_lens: Vec<u32>,
    /// The pages the table no longer references, sequence after sequence, in the order the sequence
    /// held them: hand them back to the allocator (with pages shared between sequences, such as a
    /// cached prefix, the caller's reference counts decide).
    pub freed: Vec<i32>,
    /// Per sequence, the token range (indices before eviction) that was evicted; empty if none.
    pub evicted: Vec<Range<u32>>,
}

impl Retained {
    /// The kept table, as the kernels and plans take it.
    ///
    /// ```
    /// use fusekit::attention::{KvFormat, PageTable, PagedKvLayout, Retention};
    /// let l = PagedKvLayout::new(8, 4, 1, 64, KvFormat::F16)?;
    /// let t = PageTable { page_indptr: &[0, 5], page_indices: &[7, 6, 5, 4, 3], seq_lens: &[18] };
    /// let kept = Retention::new(1, 6)?.apply(&l, &t)?;
    /// l.check_page_table(&kept.table())?;
    /// assert_eq!(kept.table().seq_lens, &[10]);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn table(&self) -> PageTable<'_> {
        PageTable {
            page_indptr: &self.page_indptr,
            page_indices: &self.page_indices,
            seq_lens: &self.seq_lens,
        }
    }
}

impl Retention {
    /// Keep the first `sinks` tokens (0: none, StreamingLLM's "window only" baseline) and the last
    /// `window >= 1` tokens of each sequence.
    ///
    /// ```
    /// use fusekit::attention::Retention;
    /// assert!(Retention::new(4, 1024).is_ok());
    /// assert!(Retention::new(4, 0).is_err()); // the newest token must stay
    /// ```
    pub fn new(sinks: u32, window: u32) -> Result<Self> {
        if window == 0 {
            return Err(Error::invalid(
                "window",
                "must keep at least the newest token, got 0",
            ));
        }
        Ok(Retention { sinks, window })
    }

    /// The sinks asked for (tokens).
    ///
    /// ```
    /// assert_eq!(fusekit::attention::Retention::new(4, 64)?.sinks(), 4);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn sinks(&self) -> u32 {
        self.sinks
    }

    /// The window asked for (tokens).
    ///
    /// ```
    /// assert_eq!(fusekit::attention::Retention::new(4, 64)?.window(), 64);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn window(&self) -> u32 {
        self.window
    }

    /// The unit of eviction for a cache, in tokens: `lcm(page_size, group)`, the page size for
    /// bf16/f16 caches.
    ///
    /// ```
    /// use fusekit::attention::{KvFormat, PagedKvLayout, Retention};
    /// let r = Retention::new(4, 256)?;
    /// assert_eq!(r.unit(&PagedKvLayout::new(8, 16, 1, 64, KvFormat::Int4 { group: 64 })?), 64);
    /// assert_eq!(r.unit(&PagedKvLayout::new(8, 48, 1, 64, KvFormat::Int8 { group: 32 })?), 96);
    /// assert_eq!(r.unit(&PagedKvLayout::new(8, 16, 1, 64, KvFormat::Bf16)?), 16);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn unit(&self, layout: &PagedKvLayout) -> usize {
        let ps = layout.page_size();
        let g = layout.format().group().unwrap_or(1);
        ps / gcd(ps, g) * g
    }

    /// The tokens (indices in a sequence of `len` tokens) this policy evicts; an empty range at the
    /// sinks' end (or at `len`) when there is nothing to evict. A non-empty range's bounds are multiples of
    /// [`unit`](Self::unit).
    ///
    /// ```
    /// use fusekit::attention::{KvFormat, PagedKvLayout, Retention};
    /// let l = PagedKvLayout::new(64, 16, 1, 64, KvFormat::Int8 { group: 32 })?; // unit 32
    /// let r = Retention::new(0, 40)?;
    /// assert_eq!(r.evicted(&l, 100), 0..32); // the last 40 tokens start at 60: keep from 32
    /// assert_eq!(r.evicted(&l, 104), 0..64);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn evicted(&self, layout: &PagedKvLayout, len: u32) -> Range<u32> {
        let unit = self.unit(layout) as u64;
        let len = len as u64;
        let sink_end = (self.sinks as u64).div_ceil(unit) * unit;
        let window_start = len.saturating_sub(self.window as u64) / unit * unit;
        if window_start > sink_end {
            sink_end as u32..window_start as u32
        } else {
            let at = sink_end.min(len) as u32;
            at..at
        }
    }

    /// Applies the policy to a batch: checks the table against the cache, then drops each sequence's
    /// evicted pages. The result's [`table`](Retained::table) is what plans and kernels take from now
    /// on (upload it in place of the old one); the cache's bytes and a quantised cache's residual slots
    /// stay as they are (freed pages keep their old bytes until an append overwrites what it uses; the
    /// kernels read nothing else). The kept keys are at new positions, so the cache must keep its keys
    /// before RoPE: a layout with [`RopeMode::AtAppend`] is an `Err(Unsupported)`. Call it as often as
    /// suits the engine (every step, or every unit of tokens): it is a pass over the table.
    ///
    /// ```
    /// use fusekit::attention::{KvFormat, PageTable, PagedKvLayout, Retention};
    /// let l = PagedKvLayout::new(16, 4, 1, 64, KvFormat::Bf16)?;
    /// // Two sequences: 21 tokens on 6 pages, 3 tokens on 1.
    /// let t = PageTable {
    ///     page_indptr: &[0, 6, 7],
    ///     page_indices: &[9, 3, 4, 12, 0, 7, 5],
    ///     seq_lens: &[21, 3],
    /// };
    /// let kept = Retention::new(4, 8)?.apply(&l, &t)?;
    /// // Sinks: page 9 (tokens 0..4). Window: tokens 13..21 start in the 4th page, so 12..21 stay.
    /// assert_eq!(kept.page_indices, [9, 12, 0, 7, 5]);
    /// assert_eq!(kept.seq_lens, [13, 3]);
    /// assert_eq!(kept.freed, [3, 4]);
    /// assert_eq!(kept.evicted, [4..12, 3..3]);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn apply(&self, layout: &PagedKvLayout, table: &PageTable<'_>) -> Result<Retained> {
        if let RopeMode::AtAppend(_) = layout.rope() {
            return Err(Error::Unsupported {
                what: "retention over a cache whose keys were rotated at append (RopeMode::AtAppend): \
                       kept keys would keep their old positions against the query's new one; cache \
                       keys before RoPE (RopeMode::InAttention)"
                    .into(),
            });
        }
        layout.check_page_table(table)?;
        let ps = layout.page_size() as u32;
        let batch = table.seq_lens.len();
        let mut out = Retained {
            page_indptr: Vec::with_capacity(batch + 1),
            page_indices: Vec::with_capacity(table.page_indices.len()),
            seq_lens: Vec::with_capacity(batch),
            freed: Vec::new(),
            evicted: Vec::with_capacity(batch),
        };
        out.page_indptr.push(0);
        for (b, &len) in table.seq_lens.iter().enumerate() {
            let pages = &table.page_indices
                [table.page_indptr[b] as usize..table.page_indptr[b + 1] as usize];
            let ev = self.evicted(layout, len);
            let (p0, p1) = ((ev.start / ps) as usize, (ev.end / ps) as usize);
            out.page_indices.extend_from_slice(&pages[..p0]);
            out.page_indices.extend_from_slice(&pages[p1..]);
            out.freed.extend_from_slice(&pages[p0..p1]);
            out.page_indptr.push(out.page_indices.len() as i32);
            out.seq_lens.push(len - (ev.end - ev.start));
            out.evicted.push(ev);
        }
        Ok(out)
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::KvFormat;
    use crate::testing::{seed_for, Rng};

    /// Every layout, policy and length: the evicted range is whole units, spares the sinks and the
    /// window, keeps less than a unit beyond them, and the kept table is valid with the freed pages
    /// exactly those that held evicted tokens.
    #[test]
    fn evicts_whole_units_and_keeps_sinks_and_window() {
        let mut rng = Rng::new(seed_for("evicts_whole_units_and_keeps_sinks_and_window"));
        let formats = [
            KvFormat::Bf16,
            KvFormat::Int8 { group: 32 },
            KvFormat::Int4 { group: 64 },
            KvFormat::Int8 { group: 128 },
        ];
        for case in 0..400 {
            let ps = [1, 3, 16, 48, 64, 200][case % 6];
            let format = formats[case / 6 % 4];
            let batch = 1 + rng.below(4) as usize;
            let lens: Vec<u32> = (0..batch).map(|_| 1 + rng.below(3000) as u32).collect();
            let pages: usize = lens.iter().map(|&l| (l as usize).div_ceil(ps)).sum();
            let l = PagedKvLayout::new(pages, ps, 1, 64, format).unwrap();
            let mut indptr = vec![0i32];
            for &len in &lens {
                indptr.push(indptr.last().unwrap() + (len as usize).div_ceil(ps) as i32);
            }
            let indices: Vec<i32> = (0..pages as i32).rev().collect();
            let t = PageTable {
                page_indptr: &indptr,
                page_indices: &indices,
                seq_lens: &lens,
            };
            let r = Retention::new(rng.below(40) as u32, 1 + rng.below(700) as u32).unwrap();
            let unit = r.unit(&l);
            assert_eq!(unit % ps, 0);
            assert_eq!(unit % format.group().unwrap_or(1), 0);
            let kept = r.apply(&l, &t).unwrap();
            l.check_page_table(&kept.table()).unwrap();
            let mut freed = Vec::new();
            for (b, &len) in lens.iter().enumerate() {
                let (ev, len) = (kept.evicted[b].clone(), len as usize);
                let what = format!("case {case}: {format:?} ps {ps} {r:?} len {len} {ev:?}");
                let sink_end = (r.sinks() as usize).div_ceil(unit) * unit;
                let limit = sink_end + r.window() as usize + unit;
                assert_eq!(kept.seq_lens[b] as usize, len - ev.len(), "{what}");
                if ev.is_empty() {
                    assert!(len < limit, "{what}: nothing evicted");
                    continue;
                }
                let (s, e) = (ev.start as usize, ev.end as usize);
                assert!(s % unit == 0 && e % unit == 0, "{what}: whole units");
                assert!(s >= r.sinks() as usize, "{what}: a sink evicted");
                assert!(
                    e + r.window() as usize <= len,
                    "{what}: a window token evicted"
                );
                assert!(len - ev.len() < limit, "{what}: kept too much");
                if let Some(g) = format.group() {
                    assert_eq!(ev.len() % g, 0, "{what}: residual moved");
                }
                let own = &indices[indptr[b] as usize..indptr[b + 1] as usize];
                freed.extend_from_slice(&own[s / ps..e / ps]);
            }
            assert_eq!(kept.freed, freed, "case {case}");
        }
    }
}
