//! CPU reference of the MoE routing family. The gate emulates the kernel's fp32 arithmetic exactly (same
//! portable exp, same operation order, same reduction tree), so ids, counts and weights match bit for bit;
//! the rest is plain integer or f64 code.

use super::{GateConfig, Scoring};

fn key(v: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else {
        v
    }
}

fn better(va: f32, ia: usize, vb: f32, ib: usize) -> bool {
    va > vb || (va == vb && ia < ib)
}

/// Butterfly (xor-shuffle) all-reduce over 32 lane values, as a warp does it.
fn butterfly(mut v: [f32; 32], op: impl Fn(f32, f32) -> f32) -> f32 {
    for o in [16, 8, 4, 2, 1] {
        let prev = v;
        for l in 0..32 {
            v[l] = op(prev[l], prev[l ^ o]);
        }
    }
    v[0]
}

/// Unbiased scores of one token, exactly as the kernel computes them.
///
/// ```
/// use fusekit::moe::{reference::scores, GateConfig, Scoring};
/// let s = scores(&[0.0, 1.0], Scoring::Sigmoid);
/// assert_eq!(s[0], 0.5);
/// let p = scores(&[0.0, 0.0], Scoring::Softmax);
/// assert_eq!(p, vec![0.5, 0.5]);
/// ```
pub fn scores(logits: &[f32], scoring: Scoring) -> Vec<f32> {
    let e = logits.len();
    match scoring {
        Scoring::Sigmoid => logits
            .iter()
            .map(|&x| crate::host_math::moe_sigmoid(x))
            .collect(),
        Scoring::Softmax => {
            let npl = e.div_ceil(32);
            let mut lane_max = [f32::NEG_INFINITY; 32];
            for (i, &x) in logits.iter().enumerate() {
                lane_max[i % 32] = lane_max[i % 32].max(x);
            }
            // fmaxf ignores NaN, as f32::max does.
            let m = butterfly(lane_max, f32::max);
            let ex: Vec<f32> = logits
                .iter()
                .map(|&x| crate::host_math::exp_portable(x - m))
                .collect();
            let mut lane_sum = [0.0f32; 32];
            for (l, s) in lane_sum.iter_mut().enumerate() {
                for j in 0..npl {
                    let i = l + 32 * j;
                    if i < e {
                        *s += ex[i];
                    }
                }
            }
            let sum = butterfly(lane_sum, |a, b| a + b);
            ex.iter().map(|&x| x / sum).collect()
        }
    }
}

/// One token's routing: (ids best first, weights).
///
/// ```
/// use fusekit::moe::{reference::route_token, GateConfig, Scoring};
/// let cfg = GateConfig { n_experts: 4, top_k: 2, ..GateConfig::default() };
/// let (ids, w) = route_token(&[0.0, 3.0, 1.0, 3.0], Some(&[0.0, 0.0, 5.0, 0.0]), &cfg);
/// assert_eq!(ids, vec![2, 1]); // the bias picks expert 2 first; 1 beats 3 on the index tie
/// assert!(w[0] < w[1]);        // but the weights are the unbiased scores
/// ```
pub fn route_token(logits: &[f32], bias: Option<&[f32]>, cfg: &GateConfig) -> (Vec<i32>, Vec<f32>) {
    let e = cfg.n_experts;
    let s = scores(logits, cfg.scoring);
    let keys: Vec<f32> = (0..e)
        .map(|i| key(s[i] + bias.map_or(0.0, |b| b[i])))
        .collect();
    let mut eligible = vec![true; e];
    if cfg.n_group > 1 {
        let gs = e / cfg.n_group;
        // Group score: sum of the group's two largest keys (its only key for groups of one).
        let gscore: Vec<f32> = (0..cfg.n_group)
            .map(|g| {
                let (mut a1, mut a2) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                for &v in &keys[g * gs..(g + 1) * gs] {
                    if v > a1 {
                        a2 = a1;
                        a1 = v;
                    } else if v > a2 {
                        a2 = v;
                    }
                }
                key(if gs >= 2 { a1 + a2 } else { a1 })
            })
            .collect();
        let mut kept = vec![false; cfg.n_group];
        for _ in 0..cfg.topk_group {
            let mut best: Option<usize> = None;
            for g in 0..cfg.n_group {
                if !kept[g] && best.is_none_or(|b| better(gscore[g], g, gscore[b], b)) {
                    best = Some(g);
                }
            }
            kept[best.unwrap()] = true;
        }
        for (i, el) in eligible.iter_mut().enumerate() {
            *el = kept[i / gs];
        }
    }
    let mut ids = Vec::with_capacity(cfg.top_k);
    let mut w = Vec::with_capacity(cfg.top_k);
    for _ in 0..cfg.top_k {
        let mut best: Option<usize> = None;
        for i in 0..e {
            if eligible[i] && best.is_none_or(|b| better(keys[i], i, keys[b], b)) {
                best = Some(i);
            }
        }
        let b = best.expect("fewer eligible experts than top_k");
        eligible[b] = false;
        ids.push(b as i32);
        w.push(s[b]);
    }
    if cfg.renormalize {
        let mut sum = 0.0f32;
        for &x in &w {
            sum += x;
        }
        if sum != 0.0 {
            for x in &mut w {
                *x /= sum;
            }
        }
    }
    for x in &mut w {
        *x *= cfg.scaling;
    }
    (ids, w)
}

/// The gate over `n_tokens` rows of logits `[T, E]`: (ids `[T, K]`, weights `[T, K]`, counts `[E]`).
///
/// ```
/// use fusekit::moe::{reference::gate, GateConfig};
/// let cfg = GateConfig { n_experts: 3, top_k: 1, ..GateConfig::default() };
/// let (ids, _, counts) = gate(&[0.0, 1.0, 2.0, 5.0, 1.0, 0.0], 2, None, &cfg);
/// assert_eq!(ids, vec![2, 0]);
/// assert_eq!(counts, vec![1, 0, 1]);
/// ```
pub fn gate(
    logits: &[f32],
    n_tokens: usize,
    bias: Option<&[f32]>,
    cfg: &GateConfig,
) -> (Vec<i32>, Vec<f32>, Vec<i32>) {
    let e = cfg.n_experts;
    let mut ids = Vec::with_capacity(n_tokens * cfg.top_k);
    let mut weights = Vec::with_capacity(n_tokens * cfg.top_k);
    let mut counts = vec![0i32; e];
    for t in 0..n_tokens {
        let (i, w) = route_token(&logits[t * e..(t + 1) * e], bias, cfg);
        for &x in &i {
            counts[x as usize] += 1;
        }
        ids.extend(i);
        weights.extend(w);
    }
    (ids, weights, counts)
}

/// MaxVio = (max load − mean load) / mean load (0 when nothing was routed).
///
/// ```
/// assert_eq!(fusekit::moe::reference::max_vio(&[10, 10, 20, 0]), 1.0);
/// ```
pub fn max_vio(counts: &[i32]) -> f64 {
    let mean = counts.iter().map(|&c| c as f64).sum::<f64>() / counts.len() as f64;
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    if mean > 0.0 {
        (max - mean) / mean
    } else {
        0.0
    }
}

/// The bias update: `b_i += u·sign(mean − c_i)` (or `u·(mean − c_i)/mean`), as the kernel does it.
///
/// ```
/// let mut b = vec![0.0f32; 3];
/// fusekit::moe::reference::update_bias(&mut b, &[1, 2, 3], 0.1, false);
/// assert_eq!(b, vec![0.1, 0.0, -0.1]);
/// ```
pub fn update_bias(bias: &mut [f32], counts: &[i32], rate: f32, proportional: bool) {
    let mean = counts.iter().map(|&c| c as f64).sum::<f64>() / counts.len() as f64;
    for (b, &c) in bias.iter_mut().zip(counts) {
        let c = c as f64;
        let delta = if proportional {
            if mean > 0.0 {
                ((mean - c) / mean) as f32
            } else {
                0.0
            }
        } else if c < mean {
            1.0
        } else if c > mean {
            -1.0
        } else {
            0.0
        };
        *b += rate * delta;
    }
}

/// The permutation plan: (sorted slots with −1 padding, slot → row (−1 for invalid ids), offsets `[E+1]`,
/// padded offsets `[E+1]`, expert of each block).
pub type Plan = (Vec<i32>, Vec<i32>, Vec<i32>, Vec<i32>, Vec<i32>);

/// Stable counting sort of slots by expert, padded to `block_size`.
///
/// ```
/// let (sorted, slot_row, off, poff, blocks) = fusekit::moe::reference::plan(&[1, 0, 1, 0], 2, 2);
/// assert_eq!(sorted, vec![1, 3, 0, 2]);
/// assert_eq!(slot_row, vec![2, 0, 3, 1]);
/// assert_eq!((off, poff, blocks), (vec![0, 2, 4], vec![0, 2, 4], vec![0, 1]));
/// ```
pub fn plan(ids: &[i32], n_experts: usize, block_size: usize) -> Plan {
    let mut per: Vec<Vec<usize>> = vec![Vec::new(); n_experts];
    for (s, &id) in ids.iter().enumerate() {
        if id >= 0 && (id as usize) < n_experts {
            per[id as usize].push(s);
        }
    }
    let mut sorted = Vec::new();
    let mut slot_row = vec![-1i32; ids.len()];
    let (mut off, mut poff, mut blocks) = (vec![0i32], vec![0i32], Vec::new());
    let mut n = 0;
    for (e, slots) in per.iter().enumerate() {
        for &s in slots {
            slot_row[s] = sorted.len() as i32;
            sorted.push(s as i32);
        }
        let padded = slots.len().div_ceil(block_size) * block_size;
        sorted.extend(std::iter::repeat_n(-1, padded - slots.len()));
        blocks.extend(std::iter::repeat_n(e as i32, padded / block_size));
        n += slots.len();
        off.push(n as i32);
        poff.push(sorted.len() as i32);
    }
    (sorted, slot_row, off, poff, blocks)
}

/// Weighted combine in f64: `out[t] = Σ_k w[t,k] · expert_out[slot_row[t·K+k]]`.
///
/// ```
/// let out = fusekit::moe::reference::combine(&[1.0, 3.0], &[0.5, 0.25], &[0, 1], 1, 2, 1);
/// assert_eq!(out, vec![0.5 * 1.0 + 0.25 * 3.0]);
/// ```
pub fn combine(
    expert_out: &[f64],
    weights: &[f32],
    slot_row: &[i32],
    n_tokens: usize,
    k: usize,
    h: usize,
) -> Vec<f64> {
    let mut out = vec![0.0; n_tokens * h];
    for t in 0..n_tokens {
        for j in 0..k {
            let r = slot_row[t * k + j];
            if r < 0 {
                continue;
            }
            let w = weights[t * k + j] as f64;
            for x in 0..h {
                out[t * h + x] += w * expert_out[r as usize * h + x];
            }
        }
    }
    out
}

/// Expert-parallel dispatch: (membership `[T, R]`, distinct tokens per rank `[R]`).
///
/// ```
/// let (m, tpr) = fusekit::moe::reference::ep_counts(&[0, 3, 1, 0], 2, 2, 2);
/// assert_eq!(m, vec![1, 1, 1, 0]);
/// assert_eq!(tpr, vec![2, 1]);
/// ```
pub fn ep_counts(
    ids: &[i32],
    k: usize,
    n_ranks: usize,
    experts_per_rank: usize,
) -> (Vec<u8>, Vec<i32>) {
    let t = ids.len() / k;
    let mut m = vec![0u8; t * n_ranks];
    let mut tpr = vec![0i32; n_ranks];
    for i in 0..t {
        for j in 0..k {
            let id = ids[i * k + j];
            if id < 0 || id as usize >= n_ranks * experts_per_rank {
                continue;
            }
            let r = id as usize / experts_per_rank;
            if m[i * n_ranks + r] == 0 {
                m[i * n_ranks + r] = 1;
                tpr[r] += 1;
            }
        }
    }
    (m, tpr)
}
