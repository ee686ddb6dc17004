//! Attention over a paged, compressible KV cache (issue 14): **in progress**.
//!
//! Built so far (checked on the SIMT emulator; not yet run on a GPU):
//! * [`PagedKvLayout`] and [`PageTable`]: the cache's layout (any page size, GQA/MQA, head dims 64,
//!   128 and 256, 64-bit offsets; bf16, f16 and the KIVI int8/int4 formats of [`KvFormat`]) and a
//!   batch's pages, validated with typed errors;
//! * [`DecodeConfig`]: query heads, scale, softcap, sliding window;
//! * [`decode`] / [`decode_quantized`] with their [`DecodePlan`] and [`DecodeWorkspace`]: split-KV
//!   decode over a bf16/f16 or quantised paged cache (fixed split size, so batch-invariant; codes
//!   dequantised in registers), the query heads of a KV head read each KV byte once, and the merge of
//!   the splits' `(o, lse)` in split order;
//! * [`append`] / [`append_quantized`] with their [`AppendPlan`]: new tokens into their pages, the token
//!   groups they complete quantised on the way (bit for bit as [`pack_quantized`] does on the host),
//!   the newest tokens kept in each sequence's full-precision residual slot;
//! * [`prefill`] with its [`PrefillPlan`] and [`PrefillWorkspace`]: causal flash attention of ragged
//!   batches of new tokens over the paged bf16/f16 cache that holds them (chunked prefill over a cached
//!   prefix), on tensor cores (`mma.sync`, `ldmatrix`, a `cp.async` pipeline), GQA rows packed per KV
//!   head, RoPE of q and (keys cached before RoPE) of each K tile in the kernel; [`prefill_quantized`]
//!   over a KIVI int8/int4 cache, each K/V tile dequantised in shared memory;
//! * [`reference`](mod@reference): exact decode and prefill attention in f64, the merge of partial
//!   states, and the KIVI round trip.
//!
//! * RoPE in the kernels, a per-cache choice ([`RopeMode`] on the layout): keys rotated by the append
//!   kernels, or cached before RoPE and rotated in the decode kernel at their index in the cache (what
//!   retention needs); q rotated by decode; both pairings ([`RopeStyle`]).
//!
//! * [`Retention`]: attention sinks + a recent window (StreamingLLM) applied to a batch's page table,
//!   in units of whole pages and KIVI groups, returning the kept table and the freed pages; with keys
//!   cached before RoPE the kept keys take their new positions.
//!
//! * [`decode_shared`] with its [`SharedDecodePlan`], and [`copy_values`]: inter-layer sharing of
//!   distant tokens (PoD): a layer's proximal tokens on its own cache, its distant tokens scored by its
//!   group leader's q and keys against its own values in a V pool, the two parts merged by the LSE gate.
//!   Over KIVI int8/int4 caches: [`SharedDecodePlan::new_quantized`], [`decode_shared_quantized`] and
//!   [`copy_values_quantized`] (a V pool of V codes and parameters).

mod append;
mod cache;
pub(crate) mod check;
mod decode;
mod kivi;
mod prefill;
pub mod reference;
mod retention;
mod shared;
mod status;

pub use append::{append, append_quantized, AppendPlan, AppendWorkspace};
pub use cache::{
    Kv, KvElement, KvFormat, PageTable, PagedKvLayout, Rope, RopeMode, RopeStyle, HEAD_DIMS,
    KIVI_GROUPS,
};
pub use decode::{decode, decode_quantized, DecodePlan, DecodeWorkspace, DEFAULT_SPLIT_SIZE};
pub use kivi::{pack_quantized, PackedCache};
pub use prefill::{prefill, prefill_quantized, PrefillPlan, PrefillWorkspace};
pub use retention::{Retained, Retention};
pub use shared::{
    copy_values, copy_values_quantized, decode_shared, decode_shared_quantized, DeviceTable,
    SharedDecodePlan,
};

use crate::error::{Error, Result};

/// One decode step's attention configuration.
///
/// ```
/// use fusekit::attention::{DecodeConfig, KvFormat, PagedKvLayout};
/// let l = PagedKvLayout::new(64, 16, 8, 128, KvFormat::Bf16)?;
/// let cfg = DecodeConfig { softcap: Some(50.0), ..DecodeConfig::new(32) }; // 4 query heads per KV head
/// cfg.validate(&l)?;
/// assert_eq!(cfg.scale(128), 1.0 / 128f64.sqrt());
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeConfig {
    /// Query heads: a multiple of the cache's KV heads (GQA; equal: MHA; one KV head: MQA).
    pub num_qo_heads: usize,
    /// Score scale; `None`: `1 / sqrt(head_dim)`.
    pub sm_scale: Option<f32>,
    /// Logit softcap `c > 0`: scores become `c · tanh(s / c)` (Gemma 2).
    pub softcap: Option<f32>,
    /// Sliding window: attend to the last `window >= 1` tokens of each sequence only (prefill: the
    /// last `window` tokens up to and including each query).
    pub window: Option<u32>,
}

impl DecodeConfig {
    /// `num_qo_heads` query heads, default scale, no softcap, no window.
    ///
    /// ```
    /// let c = fusekit::attention::DecodeConfig::new(8);
    /// assert_eq!((c.num_qo_heads, c.softcap, c.window), (8, None, None));
    /// ```
    pub fn new(num_qo_heads: usize) -> Self {
        DecodeConfig {
            num_qo_heads,
            sm_scale: None,
            softcap: None,
            window: None,
        }
    }

    /// Checks the configuration against a cache: query heads a non-zero multiple of its KV heads, a
    /// finite positive scale and softcap, a window of at least one token.
    ///
    /// ```
    /// use fusekit::attention::{DecodeConfig, KvFormat, PagedKvLayout};
    /// let l = PagedKvLayout::new(64, 16, 8, 128, KvFormat::Bf16)?;
    /// assert!(DecodeConfig::new(12).validate(&l).is_err()); // 12 query heads over 8 KV heads
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn validate(&self, layout: &PagedKvLayout) -> Result<()> {
        let hkv = layout.num_kv_heads();
        if self.num_qo_heads == 0 || self.num_qo_heads % hkv != 0 {
            return Err(Error::invalid(
                "num_qo_heads",
                format!(
                    "must be a non-zero multiple of the cache's {hkv} KV heads, got {}",
                    self.num_qo_heads
                ),
            ));
        }
        if let Some(s) = self.sm_scale {
            if !(s.is_finite() && s > 0.0) {
                return Err(Error::invalid(
                    "sm_scale",
                    format!("must be finite and > 0, got {s}"),
                ));
            }
        }
        if let Some(c) = self.softcap {
            if !(c.is_finite() && c > 0.0) {
                return Err(Error::invalid(
                    "softcap",
                    format!("must be finite and > 0, got {c}"),
                ));
            }
        }
        if self.window == Some(0) {
            return Err(Error::invalid("window", "must be >= 1 token, got 0"));
        }
        Ok(())
    }

    /// The score scale for `head_dim`: `sm_scale`, or `1 / sqrt(head_dim)`.
    ///
    /// ```
    /// let c = fusekit::attention::DecodeConfig { sm_scale: Some(0.5), ..fusekit::attention::DecodeConfig::new(1) };
    /// assert_eq!(c.scale(64), 0.5);
    /// ```
    pub fn scale(&self, head_dim: usize) -> f64 {
        self.sm_scale
            .map_or(1.0 / (head_dim as f64).sqrt(), |s| s as f64)
    }
}
