//! CPU references of the attention family, in f64: exact attention over the uncompressed cache (the
//! values the kernels will dequantise to), and the merge of partial attention states.
//!
//! # Errors
//! No function here panics on any input: a slice whose length disagrees with the layout, the batch or
//! the head counts is [`Error::Shape`] naming the slice; a configuration or page table is checked by
//! [`DecodeConfig::validate`] and [`PagedKvLayout::check_page_table`].
//!
//! # Conventions
//! Scores are `s_j = scale · q·k_j`, then `c · tanh(s_j / c)` with a softcap `c`. The state of a set of
//! tokens is `(o, lse)`: `lse = ln Σ_j exp(s_j)` and `o = Σ_j exp(s_j − lse) v_j`. The empty set is
//! `(0, −∞)`. A NaN in q, k or v makes its head's `o` and `lse` NaN.

use super::cache::{Kv, KvFormat, PageTable, PagedKvLayout, Rope, RopeMode, RopeStyle};
use super::DecodeConfig;
use crate::error::{Error, Result};
use crate::validate::exactly;

/// Output of a decode: `o` is `[batch, num_qo_heads, head_dim]`, `lse` is `[batch, num_qo_heads]`
/// (of a [`prefill`]: `total_q` new tokens in place of `batch`).
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded {
    /// Attention output per query head.
    pub o: Vec<f64>,
    /// Natural log-sum-exp of the (softcapped, scaled) scores per query head.
    pub lse: Vec<f64>,
}

/// Exact decode attention: for each sequence `b` and query head `h` (KV head `h / (Hq / Hkv)`), the
/// softmax-weighted sum of the values of the sequence's tokens (the last `window` of them with a
/// window), in f64. `cache` holds the whole cache as f64 in [`PagedKvLayout`] order; `q` is
/// `[batch, num_qo_heads, head_dim]`.
///
/// ```
/// use fusekit::attention::{reference, DecodeConfig, Kv, KvFormat, PageTable, PagedKvLayout};
/// let l = PagedKvLayout::new(2, 1, 1, 64, KvFormat::Bf16)?;
/// let mut cache = vec![0.0; l.elements() as usize];
/// for page in 0..2 {
///     cache[l.offset(Kv::V, page, 0, 0, 0) as usize] = page as f64; // v = [page, 0, ...]
/// }
/// let t = PageTable { page_indptr: &[0, 2], page_indices: &[0, 1], seq_lens: &[2] };
/// // q = 0: equal scores, so o is the mean of the two values and lse = ln 2.
/// let d = reference::decode(&l, &cache, &t, &vec![0.0; 64], &DecodeConfig::new(1))?;
/// assert_eq!(d.o[0], 0.5);
/// assert!((d.lse[0] - 2f64.ln()).abs() < 1e-15);
/// # Ok::<(), fusekit::Error>(())
/// ```
pub fn decode(
    layout: &PagedKvLayout,
    cache: &[f64],
    table: &PageTable<'_>,
    q: &[f64],
    cfg: &DecodeConfig,
) -> Result<Decoded> {
    layout.check_page_table(table)?;
    cfg.validate(layout)?;
    exactly(
        "cache",
        cache.len(),
        layout.elements() as usize,
        "layout.elements()",
    )?;
    let (hq, d) = (cfg.num_qo_heads, layout.head_dim());
    let batch = table.seq_lens.len();
    exactly(
        "q",
        q.len(),
        batch * hq * d,
        "batch * num_qo_heads * head_dim",
    )?;
    let mut out = Decoded {
        o: vec![0.0; batch * hq * d],
        lse: vec![0.0; batch * hq],
    };
    for b in 0..batch {
        let len = table.seq_lens[b] as usize;
        let lo = cfg.window.map_or(0, |w| len.saturating_sub(w as usize));
        for h in 0..hq {
            let i = b * hq + h;
            // With a RoPE mode the query (the sequence's last token) is rotated at position len - 1.
            let mut qh = q[i * d..(i + 1) * d].to_vec();
            if let Some(r) = layout.rope().rope() {
                rope_rotate(&mut qh, (len - 1) as f64, &r)?;
            }
            let (o, lse) = attend(layout, cache, table, b, h, &qh, cfg, lo, len);
            out.o[i * d..(i + 1) * d].copy_from_slice(&o);
            out.lse[i] = lse;
        }
    }
    Ok(out)
}

/// Exact causal prefill attention: sequence `b` holds `seq_lens[b] = L` tokens, of which the last
/// `Q = qo_indptr[b + 1] − qo_indptr[b]` are new; new token `i` (row `qo_indptr[b] + i` of `q`) sits at
/// position `L − Q + i` and attends, per query head `h` (KV head `h / (Hq / Hkv)`), to the cache tokens
/// `lo..=L − Q + i` with `lo = 0`, or the last `window` of them with a window. With a RoPE mode on the
/// layout, q is rotated at its position `L − Q + i` (and, for `InAttention`, each key at its index, as
/// in [`decode`]). `q` is `[total_q, num_qo_heads, head_dim]`; the output's `o` and `lse` are
/// `[total_q, num_qo_heads, ·]`.
///
/// ```
/// use fusekit::attention::{reference, DecodeConfig, Kv, KvFormat, PageTable, PagedKvLayout};
/// let l = PagedKvLayout::new(3, 1, 1, 64, KvFormat::Bf16)?;
/// let mut cache = vec![0.0; l.elements() as usize];
/// for page in 0..3 {
///     cache[l.offset(Kv::V, page, 0, 0, 0) as usize] = page as f64; // v = [page, 0, ...]
/// }
/// // 3 tokens, the last 2 new; q = 0: equal scores, so o is the mean of the values seen.
/// let t = PageTable { page_indptr: &[0, 3], page_indices: &[0, 1, 2], seq_lens: &[3] };
/// let p = reference::prefill(&l, &cache, &t, &[0, 2], &vec![0.0; 2 * 64], &DecodeConfig::new(1))?;
/// assert_eq!((p.o[0], p.o[64]), (0.5, 1.0)); // (0 + 1) / 2, (0 + 1 + 2) / 3
/// assert!((p.lse[1] - 3f64.ln()).abs() < 1e-15);
/// # Ok::<(), fusekit::Error>(())
/// ```
pub fn prefill(
    layout: &PagedKvLayout,
    cache: &[f64],
    table: &PageTable<'_>,
    qo_indptr: &[i32],
    q: &[f64],
    cfg: &DecodeConfig,
) -> Result<Decoded> {
    layout.check_page_table(table)?;
    cfg.validate(layout)?;
    let total = super::prefill::check_qo_indptr(table, qo_indptr)?;
    exactly(
        "cache",
        cache.len(),
        layout.elements() as usize,
        "layout.elements()",
    )?;
    let (hq, d) = (cfg.num_qo_heads, layout.head_dim());
    exactly(
        "q",
        q.len(),
        total * hq * d,
        "total_q * num_qo_heads * head_dim",
    )?;
    let mut out = Decoded {
        o: vec![0.0; total * hq * d],
        lse: vec![0.0; total * hq],
    };
    for (b, &len) in table.seq_lens.iter().enumerate() {
        let (q0, q1) = (qo_indptr[b] as usize, qo_indptr[b + 1] as usize);
        let first = len as usize - (q1 - q0);
        for (i, tok) in (q0..q1).enumerate() {
            let hi = first + i + 1;
            let lo = cfg.window.map_or(0, |w| hi.saturating_sub(w as usize));
            for h in 0..hq {
                let r = tok * hq + h;
                // With a RoPE mode the query is rotated at its token's position.
                let mut qh = q[r * d..(r + 1) * d].to_vec();
                if let Some(rope) = layout.rope().rope() {
                    rope_rotate(&mut qh, (first + i) as f64, &rope)?;
                }
                let (o, lse) = attend(layout, cache, table, b, h, &qh, cfg, lo, hi);
                out.o[r * d..(r + 1) * d].copy_from_slice(&o);
                out.lse[r] = lse;
            }
        }
    }
    Ok(out)
}

/// The state `(o, lse)` of query head `h` of sequence `b` over its tokens `lo..hi` (a split of the
/// sequence, as a split-KV kernel computes it). Inputs are assumed checked by the caller.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    layout: &PagedKvLayout,
    cache: &[f64],
    table: &PageTable<'_>,
    b: usize,
    h: usize,
    q: &[f64],
    cfg: &DecodeConfig,
    lo: usize,
    hi: usize,
) -> (Vec<f64>, f64) {
    let d = layout.head_dim();
    let kvh = h / (cfg.num_qo_heads / layout.num_kv_heads());
    let ps = layout.page_size();
    let pages = &table.page_indices[table.page_indptr[b] as usize..];
    let scale = cfg.scale(d);
    let at = |kv: Kv, tok: usize, e: usize| {
        cache[layout.offset(kv, pages[tok / ps] as usize, kvh, tok % ps, e) as usize]
    };
    // Keys cached before RoPE are rotated at their index in the cache.
    let rope_keys = match layout.rope() {
        RopeMode::InAttention(r) => Some(r),
        _ => None,
    };
    let scores: Vec<f64> = (lo..hi)
        .map(|j| {
            let mut k: Vec<f64> = (0..d).map(|e| at(Kv::K, j, e)).collect();
            if let Some(r) = rope_keys {
                // d is a supported head dim (even): the rotation cannot fail.
                let _ = rope_rotate(&mut k, j as f64, &r);
            }
            let s = scale * (0..d).map(|e| q[e] * k[e]).sum::<f64>();
            match cfg.softcap {
                Some(c) => c as f64 * (s / c as f64).tanh(),
                None => s,
            }
        })
        .collect();
    if scores.is_empty() {
        return (vec![0.0; d], f64::NEG_INFINITY);
    }
    // f64::max skips a NaN; the NaN then reaches the sum through exp(NaN - m).
    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let m = if m.is_finite() { m } else { 0.0 };
    let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
    let sum: f64 = w.iter().sum();
    let o = (0..d)
        .map(|e| {
            (lo..hi)
                .zip(&w)
                .map(|(j, wj)| wj * at(Kv::V, j, e))
                .sum::<f64>()
                / sum
        })
        .collect();
    (o, m + sum.ln())
}

/// Merges two partial attention states of the same query head over disjoint token sets into the
/// state of their union: with `m = max(lse_a, lse_b)`, `wa = e^(lse_a − m)`, `wb = e^(lse_b − m)`,
/// `o = (wa o_a + wb o_b) / (wa + wb)` and `lse = m + ln(wa + wb)`. An empty part (`lse = −∞`) leaves the
/// other unchanged; two empty parts give `(0, −∞)`. `o_*` are `[n, head_dim]`, `lse_*` are `[n]`.
///
/// ```
/// use fusekit::attention::reference::merge;
/// let (o, lse) = merge(&[1.0, 0.0], &[0.0], &[0.0, 1.0], &[0.0], 2)?;
/// assert_eq!(o, vec![0.5, 0.5]);
/// assert_eq!(lse, vec![2f64.ln()]);
/// let (o, lse) = merge(&[1.0, 2.0], &[3.0], &[9.0, 9.0], &[f64::NEG_INFINITY], 2)?;
/// assert_eq!((o, lse), (vec![1.0, 2.0], vec![3.0]));
/// # Ok::<(), fusekit::Error>(())
/// ```
pub fn merge(
    o_a: &[f64],
    lse_a: &[f64],
    o_b: &[f64],
    lse_b: &[f64],
    head_dim: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    if head_dim == 0 {
        return Err(Error::invalid("head_dim", "must be >= 1, got 0"));
    }
    let n = lse_a.len();
    exactly("lse_b", lse_b.len(), n, "lse_a.len()")?;
    exactly("o_a", o_a.len(), n * head_dim, "lse_a.len() * head_dim")?;
    exactly("o_b", o_b.len(), n * head_dim, "lse_a.len() * head_dim")?;
    let mut o = vec![0.0; n * head_dim];
    let mut lse = vec![f64::NEG_INFINITY; n];
    for i in 0..n {
        let (la, lb) = (lse_a[i], lse_b[i]);
        let r = i * head_dim..(i + 1) * head_dim;
        if la == f64::NEG_INFINITY && lb == f64::NEG_INFINITY {
            continue;
        }
        let m = la.max(lb);
        let m = if m.is_nan() { 0.0 } else { m };
        let (wa, wb) = ((la - m).exp(), (lb - m).exp());
        let s = wa + wb;
        for (e, x) in o[r.clone()].iter_mut().enumerate() {
            // A part of weight 0 adds nothing, whatever its o (an empty part's o is unspecified).
            let a = if wa == 0.0 {
                0.0
            } else {
                wa * o_a[r.start + e]
            };
            let b = if wb == 0.0 {
                0.0
            } else {
                wb * o_b[r.start + e]
            };
            *x = (a + b) / s;
        }
        lse[i] = m + s.ln();
        if la.is_nan() || lb.is_nan() {
            lse[i] = f64::NAN;
        }
    }
    Ok((o, lse))
}

/// Rotates one head vector by its rotary embedding at position `pos`, in f64 (see [`Rope`]): the pair
/// of frequency index `i` turns by `pos · theta^(−2i / len)`.
///
/// ```
/// use fusekit::attention::{reference::rope_rotate, Rope, RopeStyle};
/// let r = Rope { theta: 1e4, style: RopeStyle::Half };
/// let mut x = vec![1.0, 0.0, 0.0, 0.0]; // pair (0, 2) has frequency 1
/// rope_rotate(&mut x, 1.0, &r)?;
/// assert!((x[0] - 1f64.cos()).abs() < 1e-15 && (x[2] - 1f64.sin()).abs() < 1e-15);
/// // A rotation keeps the norm, and position 0 changes nothing.
/// let mut y = vec![0.3, -1.0, 2.0, 0.5];
/// rope_rotate(&mut y, 0.0, &Rope { style: RopeStyle::Interleaved, ..r })?;
/// assert_eq!(y, vec![0.3, -1.0, 2.0, 0.5]);
/// # Ok::<(), fusekit::Error>(())
/// ```
pub fn rope_rotate(x: &mut [f64], pos: f64, rope: &Rope) -> Result<()> {
    let d = x.len();
    if d == 0 || d % 2 != 0 {
        return Err(Error::invalid(
            "x",
            format!("a head vector of even length, got {d}"),
        ));
    }
    let theta = rope.theta as f64;
    for i in 0..d / 2 {
        let (a, b) = match rope.style {
            RopeStyle::Half => (i, i + d / 2),
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
        };
        let ang = pos * theta.powf(-2.0 * i as f64 / d as f64);
        let (s, c) = ang.sin_cos();
        let (x1, x2) = (x[a], x[b]);
        x[a] = x1 * c - x2 * s;
        x[b] = x2 * c + x1 * s;
    }
    Ok(())
}

/// The KIVI round trip of one KV head's `[tokens][head_dim]` keys or values, with the kernels'
/// arithmetic (see [`KvFormat`]): `Kv::K` quantises each channel over every complete group of `group`
/// tokens, `Kv::V` each complete group's tokens over groups of `min(group, head_dim)` channels; the
/// newest `tokens % group` tokens come back unchanged (the full-precision residual). Values are taken
/// as f32 (the kernels quantise from the element type); bf16/f16 formats return `x` rounded to them.
/// What a quantised cache does to a model's attention, for accuracy studies on the CPU.
///
/// ```
/// use fusekit::attention::{reference::kivi_roundtrip, Kv, KvFormat};
/// let x: Vec<f64> = (0..40 * 64).map(|i| ((i * 37 % 101) as f64 - 50.0) / 10.0).collect();
/// let r = kivi_roundtrip(Kv::K, &x, 40, 64, KvFormat::Int4 { group: 32 })?;
/// assert_eq!(&r[32 * 64..], &x[32 * 64..]); // 8 tokens left in full precision
/// // Within half a quantisation step (range 10 over 15 steps) plus the f16 rounding of the zero.
/// assert!(r.iter().zip(&x).all(|(a, b)| (a - b).abs() <= 0.5 * 10.0 / 15.0 + 3e-3));
/// # Ok::<(), fusekit::Error>(())
/// ```
pub fn kivi_roundtrip(
    kv: Kv,
    x: &[f64],
    tokens: usize,
    head_dim: usize,
    format: KvFormat,
) -> Result<Vec<f64>> {
    super::kivi::roundtrip(kv, x, tokens, head_dim, format)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{seed_for, Dist, Rng};

    /// A random cache and a batch of sequences of uneven lengths on shuffled pages.
    fn setup(
        rng: &mut Rng,
        page_size: usize,
        kv_heads: usize,
        d: usize,
        lens: &[u32],
    ) -> (PagedKvLayout, Vec<f64>, Vec<i32>, Vec<i32>) {
        let need: usize = lens.iter().map(|&l| (l as usize).div_ceil(page_size)).sum();
        let l = PagedKvLayout::new(need + 3, page_size, kv_heads, d, KvFormat::Bf16).unwrap();
        let cache = rng.sample(
            Dist::Normal {
                mean: 0.0,
                std: 1.0,
            },
            l.elements() as usize,
        );
        // Pages handed out in a scrambled order (a real allocator's free list).
        let mut pages: Vec<i32> = (0..l.num_pages() as i32).collect();
        for i in (1..pages.len()).rev() {
            pages.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut indptr = vec![0i32];
        let mut idx = Vec::new();
        for &len in lens {
            let n = (len as usize).div_ceil(page_size);
            idx.extend_from_slice(&pages[idx.len()..idx.len() + n]);
            indptr.push(idx.len() as i32);
        }
        (l, cache, indptr, idx)
    }

    /// The same attention by a different route: gather the sequence's K and V densely, then a
    /// two-pass softmax.
    fn dense(
        l: &PagedKvLayout,
        cache: &[f64],
        pages: &[i32],
        len: usize,
        kvh: usize,
        q: &[f64],
        scale: f64,
    ) -> (Vec<f64>, f64) {
        let (d, ps) = (l.head_dim(), l.page_size());
        let row = |kv, t: usize| -> Vec<f64> {
            (0..d)
                .map(|e| cache[l.offset(kv, pages[t / ps] as usize, kvh, t % ps, e) as usize])
                .collect()
        };
        let s: Vec<f64> = (0..len)
            .map(|t| scale * row(Kv::K, t).iter().zip(q).map(|(a, b)| a * b).sum::<f64>())
            .collect();
        let lse = s.iter().map(|x| x.exp()).sum::<f64>().ln();
        let mut o = vec![0.0; d];
        for (t, st) in s.iter().enumerate() {
            for (oe, ve) in o.iter_mut().zip(row(Kv::V, t)) {
                *oe += (st - lse).exp() * ve;
            }
        }
        (o, lse)
    }

    #[test]
    fn decode_matches_dense_attention_for_gqa_and_page_sizes() {
        let seed = seed_for("attention_reference_decode");
        let mut rng = Rng::new(seed);
        for (ps, hkv, group, d) in [
            (1, 1, 1, 64),
            (16, 2, 4, 128),
            (16, 1, 8, 256),
            (7, 3, 3, 64),
        ] {
            let lens = [1u32, 17, 33, 5];
            let (l, cache, indptr, idx) = setup(&mut rng, ps, hkv, d, &lens);
            let t = PageTable {
                page_indptr: &indptr,
                page_indices: &idx,
                seq_lens: &lens,
            };
            let hq = hkv * group;
            let q = rng.sample(
                Dist::Normal {
                    mean: 0.0,
                    std: 1.0,
                },
                lens.len() * hq * d,
            );
            let cfg = DecodeConfig::new(hq);
            let got = decode(&l, &cache, &t, &q, &cfg).unwrap();
            for (b, &len) in lens.iter().enumerate() {
                let pages = &idx[indptr[b] as usize..indptr[b + 1] as usize];
                for h in 0..hq {
                    let i = b * hq + h;
                    let (o, lse) = dense(
                        &l,
                        &cache,
                        pages,
                        len as usize,
                        h / group,
                        &q[i * d..(i + 1) * d],
                        cfg.scale(d),
                    );
                    assert!((got.lse[i] - lse).abs() < 1e-12, "seed {seed}: lse {b} {h}");
                    for (e, (g, r)) in got.o[i * d..(i + 1) * d].iter().zip(&o).enumerate() {
                        assert!((g - r).abs() < 1e-12, "seed {seed}: o {b} {h} {e}");
                    }
                }
            }
        }
    }

    #[test]
    fn merging_the_splits_of_a_sequence_gives_the_whole() {
        let seed = seed_for("attention_reference_merge");
        let mut rng = Rng::new(seed);
        let lens = [40u32];
        let (l, cache, indptr, idx) = setup(&mut rng, 16, 2, 64, &lens);
        let t = PageTable {
            page_indptr: &indptr,
            page_indices: &idx,
            seq_lens: &lens,
        };
        let cfg = DecodeConfig {
            softcap: Some(5.0),
            ..DecodeConfig::new(4)
        };
        let q = rng.sample(
            Dist::Normal {
                mean: 0.0,
                std: 2.0,
            },
            4 * 64,
        );
        for h in 0..4 {
            let qh = &q[h * 64..(h + 1) * 64];
            let whole = attend(&l, &cache, &t, 0, h, qh, &cfg, 0, 40);
            for cut in [0, 1, 16, 39, 40] {
                let a = attend(&l, &cache, &t, 0, h, qh, &cfg, 0, cut);
                let b = attend(&l, &cache, &t, 0, h, qh, &cfg, cut, 40);
                let (o, lse) = merge(&a.0, &[a.1], &b.0, &[b.1], 64).unwrap();
                assert!((lse[0] - whole.1).abs() < 1e-12, "seed {seed} cut {cut}");
                for (e, (g, r)) in o.iter().zip(&whole.0).enumerate() {
                    assert!((g - r).abs() < 1e-12, "seed {seed} cut {cut} e {e}");
                }
            }
        }
    }

    #[test]
    fn window_keeps_the_last_tokens_and_nan_propagates() {
        let mut rng = Rng::new(seed_for("attention_reference_window"));
        let lens = [20u32];
        let (l, mut cache, indptr, idx) = setup(&mut rng, 4, 1, 64, &lens);
        let t = PageTable {
            page_indptr: &indptr,
            page_indices: &idx,
            seq_lens: &lens,
        };
        let q = vec![0.1; 64];
        let cfg = DecodeConfig {
            window: Some(5),
            ..DecodeConfig::new(1)
        };
        let w = decode(&l, &cache, &t, &q, &cfg).unwrap();
        let part = attend(&l, &cache, &t, 0, 0, &q, &cfg, 15, 20);
        assert_eq!((w.o.clone(), w.lse[0]), part);
        // A NaN key outside the window changes nothing; inside, it makes the head NaN.
        let k_at = |tok: usize| l.offset(Kv::K, idx[tok / 4] as usize, 0, tok % 4, 0) as usize;
        cache[k_at(3)] = f64::NAN;
        assert_eq!(decode(&l, &cache, &t, &q, &cfg).unwrap(), w);
        cache[k_at(17)] = f64::NAN;
        let n = decode(&l, &cache, &t, &q, &cfg).unwrap();
        assert!(n.lse[0].is_nan() && n.o.iter().all(|x| x.is_nan()));
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let l = PagedKvLayout::new(4, 16, 2, 64, KvFormat::Bf16).unwrap();
        let cache = vec![0.0; l.elements() as usize];
        let t = PageTable {
            page_indptr: &[0, 2],
            page_indices: &[0, 1],
            seq_lens: &[20],
        };
        let q = vec![0.0; 4 * 64];
        let cfg = DecodeConfig::new(4);
        assert!(decode(&l, &cache, &t, &q, &cfg).is_ok());
        let e = |r: Result<Decoded>| r.unwrap_err();
        assert!(matches!(
            e(decode(&l, &cache[1..], &t, &q, &cfg)),
            Error::Shape { arg: "cache", .. }
        ));
        assert!(matches!(
            e(decode(&l, &cache, &t, &q[1..], &cfg)),
            Error::Shape { arg: "q", .. }
        ));
        // 3 query heads over 2 KV heads: not a GQA grouping.
        assert!(matches!(
            e(decode(&l, &cache, &t, &q[..3 * 64], &DecodeConfig::new(3))),
            Error::InvalidArgument {
                arg: "num_qo_heads",
                ..
            }
        ));
        // 33 tokens do not fit 2 pages of 16; 16 tokens do not need 2.
        for lens in [[33u32], [16]] {
            let bad = PageTable {
                seq_lens: &lens,
                ..t
            };
            assert!(matches!(
                e(decode(&l, &cache, &bad, &q, &cfg)),
                Error::InvalidArgument {
                    arg: "seq_lens",
                    ..
                }
            ));
        }
        let empty = PageTable {
            page_indptr: &[0],
            page_indices: &[],
            seq_lens: &[],
        };
        assert!(matches!(
            e(decode(&l, &cache, &empty, &[], &cfg)),
            Error::Shape {
                arg: "seq_lens",
                ..
            }
        ));
        let neg = PageTable {
            page_indices: &[0, -1],
            ..t
        };
        assert!(matches!(
            e(decode(&l, &cache, &neg, &q, &cfg)),
            Error::OutOfRange {
                arg: "page_indices",
                index: 1,
                value: -1,
                ..
            }
        ));
        let down = PageTable {
            page_indptr: &[0, 2, 1],
            seq_lens: &[20, 1],
            ..t
        };
        assert!(l.check_page_table(&down).is_err());
        for bad in [
            DecodeConfig {
                sm_scale: Some(f32::NAN),
                ..cfg
            },
            DecodeConfig {
                softcap: Some(0.0),
                ..cfg
            },
            DecodeConfig {
                window: Some(0),
                ..cfg
            },
        ] {
            assert!(matches!(
                e(decode(&l, &cache, &t, &q, &bad)),
                Error::InvalidArgument { .. }
            ));
        }
        assert!(merge(&[0.0], &[0.0], &[0.0], &[0.0, 1.0], 1).is_err());
        assert!(merge(&[], &[], &[], &[], 0).is_err());
    }
}
