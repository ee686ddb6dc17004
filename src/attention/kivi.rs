//! KIVI quantisation on the host: the group quantiser (bit for bit the arithmetic of the append
//! kernel), the packing of a whole cache into the byte layout of [`PagedKvLayout`], and the residual
//! slots that hold each sequence's newest, not yet quantised tokens.
//!
//! Arithmetic of one group (f32, as the kernel does it): `lo`, `hi` the min and max; the scale
//! `(hi − lo) / (2^bits − 1)` and the zero `lo` rounded to f16 (round to nearest even); then each code
//! `clamp(rint((x − zero) / scale), 0, 2^bits − 1)` with f32 subtraction and correctly rounded
//! division; a zero scale gives code 0. A group holding a NaN or an infinity, or whose scale or zero
//! overflows f16, stores NaN parameters: it dequantises to NaN, never to a wrong finite value.

use half::f16;

use super::cache::{Kv, KvElement, KvFormat, PageTable, PagedKvLayout};
use crate::error::{Error, Result};
use crate::validate::{exactly, owned};
use crate::{Backend, DeviceRead};

/// The quantised group: f16 scale and zero, and one code per value.
pub(crate) struct Group {
    pub scale: f16,
    pub zero: f16,
    pub codes: Vec<u8>,
}

impl Group {
    /// The value code `i` stands for, exactly (f64 of the f16 parameters).
    pub fn dequant(&self, i: usize) -> f64 {
        self.codes[i] as f64 * self.scale.to_f64() + self.zero.to_f64()
    }
}

/// Quantises one group of values to codes in `0..=max_code`.
pub(crate) fn quantize_group(x: &[f32], max_code: u32) -> Group {
    let finite = x.iter().all(|v| v.is_finite());
    let lo = x.iter().cloned().fold(f32::INFINITY, f32::min);
    let hi = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let scale = f16::from_f32((hi - lo) / max_code as f32);
    let zero = f16::from_f32(lo);
    if !finite || !scale.is_finite() || !zero.is_finite() {
        return Group {
            scale: f16::NAN,
            zero: f16::NAN,
            codes: vec![0; x.len()],
        };
    }
    let (s, z) = (scale.to_f32(), zero.to_f32());
    let codes = x
        .iter()
        .map(|&v| {
            if s == 0.0 {
                0
            } else {
                ((v - z) / s).round_ties_even().clamp(0.0, max_code as f32) as u8
            }
        })
        .collect();
    Group { scale, zero, codes }
}

/// Checks the residual slots of a quantised cache's batch: one per sequence, each in `[0, slots)`,
/// no two sequences sharing one.
pub(crate) fn check_residual_slots(
    batch: usize,
    residual_slots: &[i32],
    slots: usize,
) -> Result<()> {
    exactly("residual_slots", residual_slots.len(), batch, "batch")?;
    let mut seen = vec![false; slots];
    for (i, &s) in residual_slots.iter().enumerate() {
        if s < 0 || s as usize >= slots {
            return Err(Error::OutOfRange {
                arg: "residual_slots",
                index: i,
                value: s as i64,
                allowed: format!("[0, {slots})"),
            });
        }
        if std::mem::replace(&mut seen[s as usize], true) {
            return Err(Error::invalid(
                "residual_slots",
                format!("slot {s} is given to two sequences (the second at position {i})"),
            ));
        }
    }
    Ok(())
}

/// What every quantised plan checks first: the layout is quantised (else `Err(DType)` naming
/// `plain`, the constructor a bf16/f16 cache takes), at most 2^31 − 1 slots, and the residual slots
/// fit ([`check_residual_slots`]).
pub(crate) fn check_quant_plan(
    layout: &PagedKvLayout,
    batch: usize,
    residual_slots: &[i32],
    slots: usize,
    plain: &str,
) -> Result<()> {
    if layout.format().group().is_none() {
        return Err(Error::DType {
            arg: "layout",
            expected: format!("a quantised format (Int8 or Int4); bf16/f16 caches take {plain}"),
            got: format!("{:?}", layout.format()),
        });
    }
    if slots > i32::MAX as usize {
        return Err(Error::invalid(
            "slots",
            format!("at most 2^31-1 residual slots, got {slots}"),
        ));
    }
    check_residual_slots(batch, residual_slots, slots)
}

/// What every quantised entry point checks of its plan and buffers before a launch: the plan is for a
/// quantised cache (`slots`; else `Err(DType)` naming `plain`, the entry point of a bf16/f16 plan),
/// and the cache, residual and residual slots are on `dev` with the layout's sizes. Returns the slots.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_quant_buffers<B, T, C, R, RS>(
    dev: &B,
    plain: &str,
    layout: &PagedKvLayout,
    slots: Option<usize>,
    batch: usize,
    cache: &C,
    residual: &R,
    residual_slots: &RS,
) -> Result<usize>
where
    B: Backend,
    T: KvElement,
    C: DeviceRead<u8, B> + ?Sized,
    R: DeviceRead<T, B> + ?Sized,
    RS: DeviceRead<i32, B> + ?Sized,
{
    let Some(slots) = slots else {
        return Err(Error::DType {
            arg: "cache",
            expected: format!(
                "{:?} elements: this plan is for {plain} (a bf16/f16 cache)",
                layout.format()
            ),
            got: "the bytes of a quantised cache".into(),
        });
    };
    owned(dev, "cache", cache)?;
    owned(dev, "residual", residual)?;
    owned(dev, "residual_slots", residual_slots)?;
    check_quant_sizes(
        layout,
        slots,
        batch,
        cache.len(),
        residual.len(),
        residual_slots.len(),
    )?;
    Ok(slots)
}

/// The sizes of a quantised cache's device buffers: the pages' bytes, the residual of `slots` slots,
/// one residual slot per sequence.
pub(crate) fn check_quant_sizes(
    layout: &PagedKvLayout,
    slots: usize,
    batch: usize,
    cache_len: usize,
    residual_len: usize,
    residual_slots_len: usize,
) -> Result<()> {
    exactly(
        "cache",
        cache_len,
        layout.bytes() as usize,
        "layout.bytes()",
    )?;
    exactly(
        "residual",
        residual_len,
        layout.residual_elements(slots) as usize,
        "layout.residual_elements(slots)",
    )?;
    exactly("residual_slots", residual_slots_len, batch, "batch")
}

/// A quantised cache packed on the host, as the device holds it.
#[derive(Clone, Debug)]
pub struct PackedCache<T> {
    /// The pages, [`PagedKvLayout::bytes`] bytes (pages no sequence owns are zero).
    pub bytes: Vec<u8>,
    /// The full-precision residual, [`PagedKvLayout::residual_elements`]`(slots)` elements.
    pub residual: Vec<T>,
    /// The cache as the kernels read it, in f64 and [`PagedKvLayout::offset`] order: dequantised codes
    /// for complete groups, the residual's values for the newest tokens, 0 elsewhere. The oracle of a
    /// quantised decode is [`reference::decode`](super::reference::decode) over this.
    pub dequantized: Vec<f64>,
}

/// Packs the tokens of a batch into a quantised cache: `values` holds the cache's logical K and V in
/// [`PagedKvLayout::offset`] order (only the batch's tokens are read); each value is first rounded to
/// `T` (the element type K and V arrive in), then complete token groups are quantised into the pages
/// and each sequence's newest `len % group` tokens go to its residual slot. This is what a sequence of
/// appends leaves in the cache, bit for bit; it serves to import a cache and as the tests' oracle.
///
/// ```
/// use fusekit::attention::{pack_quantized, Kv, KvFormat, PageTable, PagedKvLayout};
/// let l = PagedKvLayout::new(4, 16, 1, 64, KvFormat::Int8 { group: 32 })?;
/// let values: Vec<f64> = (0..l.elements()).map(|i| (i % 7) as f64).collect();
/// // 40 tokens: one group of 32 quantised, 8 in the residual.
/// let t = PageTable { page_indptr: &[0, 3], page_indices: &[2, 0, 3], seq_lens: &[40] };
/// let p = pack_quantized::<half::bf16>(&l, &values, &t, &[1], 2)?;
/// assert_eq!(p.bytes.len() as u64, l.bytes());
/// assert_eq!(p.residual.len() as u64, l.residual_elements(2));
/// let at = l.offset(Kv::K, 0, 0, 5, 9) as usize; // token 21 (page 0 is the sequence's second)
/// assert!((p.dequantized[at] - values[at]).abs() < 6.0 / 255.0);
/// # Ok::<(), fusekit::Error>(())
/// ```
pub fn pack_quantized<T: KvElement>(
    layout: &PagedKvLayout,
    values: &[f64],
    table: &PageTable<'_>,
    residual_slots: &[i32],
    slots: usize,
) -> Result<PackedCache<T>> {
    let g = layout.format().group().ok_or_else(|| Error::DType {
        arg: "layout",
        expected: "a quantised format (Int8 or Int4)".into(),
        got: format!("{:?}", layout.format()),
    })?;
    layout.check_page_table(table)?;
    exactly(
        "values",
        values.len(),
        layout.elements() as usize,
        "layout.elements()",
    )?;
    check_residual_slots(table.seq_lens.len(), residual_slots, slots)?;
    let (d, ps, hkv) = (layout.head_dim(), layout.page_size(), layout.num_kv_heads());
    let max_code = layout.format().max_code().unwrap_or(0);
    let int4 = matches!(layout.format(), KvFormat::Int4 { .. });
    let gv = layout.v_group();
    let mut out = PackedCache {
        bytes: vec![0u8; layout.bytes() as usize],
        residual: vec![T::from_f64(0.0); layout.residual_elements(slots) as usize],
        dequantized: vec![0.0; layout.elements() as usize],
    };
    let put_code = |bytes: &mut [u8], row: u64, dim: usize, code: u8| {
        if int4 {
            let b = &mut bytes[row as usize + dim / 2];
            *b = if dim % 2 == 0 {
                (*b & 0xF0) | code
            } else {
                (*b & 0x0F) | (code << 4)
            };
        } else {
            bytes[row as usize + dim] = code;
        }
    };
    let put_param = |bytes: &mut [u8], at: u64, s: f16, z: f16| {
        let at = at as usize;
        bytes[at..at + 2].copy_from_slice(&s.to_bits().to_le_bytes());
        bytes[at + 2..at + 4].copy_from_slice(&z.to_bits().to_le_bytes());
    };
    for (b, (&len, &slot)) in table.seq_lens.iter().zip(residual_slots).enumerate() {
        let (len, slot) = (len as usize, slot as usize);
        let pages = &table.page_indices[table.page_indptr[b] as usize..];
        let nq = len / g * g;
        let loc = |t: usize| (pages[t / ps] as usize, t % ps);
        for h in 0..hkv {
            let val = |kv: Kv, t: usize, e: usize| {
                let (p, s) = loc(t);
                T::from_f64(values[layout.offset(kv, p, h, s, e) as usize]).to_f64() as f32
            };
            // K: per channel over each complete group of tokens.
            for g0 in (0..nq).step_by(g) {
                let (pp, ps0) = loc(g0);
                for e in 0..d {
                    let xs: Vec<f32> = (g0..g0 + g).map(|t| val(Kv::K, t, e)).collect();
                    let q = quantize_group(&xs, max_code);
                    put_param(
                        &mut out.bytes,
                        layout.k_param_offset(pp, h, ps0 / g, e),
                        q.scale,
                        q.zero,
                    );
                    for (i, t) in (g0..g0 + g).enumerate() {
                        let (p, s) = loc(t);
                        put_code(
                            &mut out.bytes,
                            layout.code_offset(Kv::K, p, h, s),
                            e,
                            q.codes[i],
                        );
                        out.dequantized[layout.offset(Kv::K, p, h, s, e) as usize] = q.dequant(i);
                    }
                }
            }
            // V: per token over groups of channels.
            for t in 0..nq {
                let (p, s) = loc(t);
                for vg in 0..d / gv {
                    let xs: Vec<f32> = (vg * gv..(vg + 1) * gv).map(|e| val(Kv::V, t, e)).collect();
                    let q = quantize_group(&xs, max_code);
                    put_param(
                        &mut out.bytes,
                        layout.v_param_offset(p, h, s, vg),
                        q.scale,
                        q.zero,
                    );
                    for i in 0..gv {
                        let e = vg * gv + i;
                        put_code(
                            &mut out.bytes,
                            layout.code_offset(Kv::V, p, h, s),
                            e,
                            q.codes[i],
                        );
                        out.dequantized[layout.offset(Kv::V, p, h, s, e) as usize] = q.dequant(i);
                    }
                }
            }
            // The residual: the newest len - nq tokens, in T.
            for t in nq..len {
                let (p, s) = loc(t);
                for kv in [Kv::K, Kv::V] {
                    for e in 0..d {
                        let x = T::from_f64(values[layout.offset(kv, p, h, s, e) as usize]);
                        out.residual[layout.residual_offset(kv, slot, h, t % g, e) as usize] = x;
                        out.dequantized[layout.offset(kv, p, h, s, e) as usize] = x.to_f64();
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The KIVI round trip of one KV head's `[tokens][head_dim]` keys (`Kv::K`: per channel over complete
/// groups of `group` tokens) or values (`Kv::V`: per token over groups of `min(group, head_dim)`
/// channels, complete token groups only), with the arithmetic of the kernels; the newest
/// `tokens % group` tokens are returned unchanged (the full-precision residual). For bf16/f16 the
/// values come back rounded to that format.
pub(crate) fn roundtrip(
    kv: Kv,
    x: &[f64],
    tokens: usize,
    head_dim: usize,
    format: KvFormat,
) -> Result<Vec<f64>> {
    if head_dim == 0 {
        return Err(Error::invalid("head_dim", "must be >= 1, got 0"));
    }
    exactly("x", x.len(), tokens * head_dim, "tokens * head_dim")?;
    let g = match format {
        KvFormat::Bf16 => {
            return Ok(x
                .iter()
                .map(|&v| half::bf16::from_f64(v).to_f64())
                .collect())
        }
        KvFormat::F16 => return Ok(x.iter().map(|&v| f16::from_f64(v).to_f64()).collect()),
        KvFormat::Int8 { group } | KvFormat::Int4 { group } => group,
    };
    if !super::cache::KIVI_GROUPS.contains(&g) {
        return Err(Error::Unsupported {
            what: format!("KIVI group {g}"),
        });
    }
    let max_code = format.max_code().unwrap_or(0);
    let mut out = x.to_vec();
    let nq = tokens / g * g;
    match kv {
        Kv::K => {
            for g0 in (0..nq).step_by(g) {
                for e in 0..head_dim {
                    let xs: Vec<f32> = (g0..g0 + g).map(|t| x[t * head_dim + e] as f32).collect();
                    let q = quantize_group(&xs, max_code);
                    for i in 0..g {
                        out[(g0 + i) * head_dim + e] = q.dequant(i);
                    }
                }
            }
        }
        Kv::V => {
            let gv = g.min(head_dim);
            if head_dim % gv != 0 {
                return Err(Error::invalid(
                    "head_dim",
                    format!("{head_dim} is not a multiple of the V group {gv}"),
                ));
            }
            for t in 0..nq {
                for e0 in (0..head_dim).step_by(gv) {
                    let r = t * head_dim + e0..t * head_dim + e0 + gv;
                    let xs: Vec<f32> = x[r.clone()].iter().map(|&v| v as f32).collect();
                    let q = quantize_group(&xs, max_code);
                    for i in 0..gv {
                        out[r.start + i] = q.dequant(i);
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_quantiser_edges() {
        // A constant group: scale 0, codes 0, exact.
        let q = quantize_group(&[1.5; 32], 15);
        assert_eq!((q.scale.to_f32(), q.zero.to_f32()), (0.0, 1.5));
        assert!(q.codes.iter().all(|&c| c == 0));
        // Endpoints map to 0 and max; error at most half a step (plus the f16 rounding of the zero).
        let xs: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let q = quantize_group(&xs, 255);
        let step = q.scale.to_f64();
        for (i, &x) in xs.iter().enumerate() {
            assert!((q.dequant(i) - x as f64).abs() <= 0.5 * step + 2e-3, "{i}");
        }
        // Non-finite values or an f16 overflow: NaN parameters, never a finite wrong value.
        for bad in [f32::NAN, f32::INFINITY, 1e6] {
            let mut v = xs.clone();
            v[7] = bad;
            let q = quantize_group(&v, 15);
            assert!(q.scale.is_nan() && q.dequant(0).is_nan(), "{bad}");
        }
    }

    #[test]
    fn residual_slots_are_checked() {
        assert!(check_residual_slots(2, &[0, 1], 2).is_ok());
        assert!(check_residual_slots(2, &[0, 0], 2).is_err());
        assert!(check_residual_slots(2, &[0, 2], 2).is_err());
        assert!(check_residual_slots(2, &[0], 2).is_err());
    }
}
