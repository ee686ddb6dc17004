//! The KV modes, as the attention of one layer over a whole sequence, teacher-forced: query `t` attends
//! causally to the cache as a decode at step `t` would see it (the cache then holds tokens `0..=t`).
//!
//! Scores are `q·k / √head_dim` (f32 dot products); the softmax weights are f32 exponentials of
//! `s − max`, summed in f64, and the weighted sum of the values is in f64. Every mode returns `[T][heads·head_dim]`.

use crate::model::{Qkv, Rope};
use fusekit::attention::{reference::kivi_roundtrip, Kv, KvFormat};

/// How the cache is kept.
#[derive(Clone, Debug)]
pub enum Mode {
    /// The keys and values as the model computed them (f32).
    Exact,
    /// Keys (after RoPE) and values rounded to bf16.
    Bf16,
    /// KIVI (`KvFormat::Int8`/`Int4` with a group `G`), the library's own round trip
    /// (`fusekit::attention::reference::kivi_roundtrip`, the append kernel's arithmetic) of the keys
    /// (after RoPE) and values rounded to bf16 (what an engine hands the append kernel): keys per
    /// channel over groups of `G` tokens, values per token over groups of `min(G, head_dim)` channels,
    /// asymmetric codes with f16 scale and zero; at step `t` the tokens past the last complete group
    /// stay in bf16 (the residual).
    Kivi(KvFormat),
    /// StreamingLLM: the first `sinks` tokens and the last `window` tokens (the query's own included);
    /// keys cached before RoPE and rotated at their position in the kept cache.
    Sinks { sinks: usize, window: usize },
    /// PoD: proximal tokens (the sinks and the last `window`) with per-layer scores; distant tokens
    /// scored by the group leader `leader[layer]`'s q·k (values per layer); the two parts merged by
    /// their log-sum-exp (`fusekit::attention::reference::merge`).
    Pod {
        sinks: usize,
        window: usize,
        leader: Vec<usize>,
    },
}

/// Shapes the attention needs.
#[derive(Clone, Copy)]
pub struct Dims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// State carried from layer to layer within one forward: the PoD leader's distant scores.
#[derive(Default)]
pub struct Carry {
    /// `(leader layer, [head][t][t] scores)`.
    leader_scores: Option<(usize, Vec<f32>)>,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum()
}

/// The state `(o, lse)` of a set of tokens given their scaled scores and values (f64 softmax).
fn part<'a>(scores: &[f32], values: impl Iterator<Item = &'a [f32]>, hd: usize) -> (Vec<f64>, f64) {
    let mut o = vec![0f64; hd];
    if scores.is_empty() {
        return (o, f64::NEG_INFINITY);
    }
    let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for (&s, v) in scores.iter().zip(values) {
        // exp of a non-positive f32 (relative error ~1e-7), summed in f64.
        let w = (s - m).exp() as f64;
        sum += w;
        for (o, &v) in o.iter_mut().zip(v) {
            *o += w * v as f64;
        }
    }
    o.iter_mut().for_each(|x| *x /= sum);
    (o, m as f64 + sum.ln())
}

/// Keys and values as one mode stores them, for one layer: `k`, `v` `[T][kv_heads·head_dim]`, and for
/// KIVI the quantised copies that replace them below the last complete group.
struct Store {
    k: Vec<f32>,
    v: Vec<f32>,
    quant: Option<(Vec<f32>, Vec<f32>, usize)>,
    kvd: usize,
    hd: usize,
}

impl Store {
    /// Key and value of token `j` of KV head `kvh` as the cache holds them at step `t`.
    fn kv(&self, kvh: usize, j: usize, t: usize) -> (&[f32], &[f32]) {
        let r = j * self.kvd + kvh * self.hd..j * self.kvd + (kvh + 1) * self.hd;
        match &self.quant {
            Some((kq, vq, g)) if j < (t + 1) / g * g => (&kq[r.clone()], &vq[r]),
            _ => (&self.k[r.clone()], &self.v[r]),
        }
    }
}

fn bf16_round(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect()
}

/// One layer's attention output under `mode`, for `x`'s whole sequence (`[T][heads·head_dim]`).
pub fn attention(
    mode: &Mode,
    layer: usize,
    x: &Qkv,
    dims: Dims,
    rope: &Rope,
    carry: &mut Carry,
    threads: usize,
) -> Vec<f32> {
    let (t_len, hd) = (x.tokens, dims.head_dim);
    let kvd = dims.kv_heads * hd;
    let mut store = Store {
        k: x.k.clone(),
        v: x.v.clone(),
        quant: None,
        kvd,
        hd,
    };
    match mode {
        Mode::Bf16 => {
            store.k = bf16_round(&x.k);
            store.v = bf16_round(&x.v);
        }
        Mode::Kivi(format) => {
            store.k = bf16_round(&x.k);
            store.v = bf16_round(&x.v);
            let (mut kq, mut vq) = (vec![0f32; x.k.len()], vec![0f32; x.v.len()]);
            for kvh in 0..dims.kv_heads {
                for (src, dst, kv) in [(&store.k, &mut kq, Kv::K), (&store.v, &mut vq, Kv::V)] {
                    let head: Vec<f64> = (0..t_len)
                        .flat_map(|j| src[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd].iter())
                        .map(|&v| v as f64)
                        .collect();
                    let r = kivi_roundtrip(kv, &head, t_len, hd, *format)
                        .expect("KIVI round trip of a whole head");
                    for j in 0..t_len {
                        for e in 0..hd {
                            dst[j * kvd + kvh * hd + e] = r[j * hd + e] as f32;
                        }
                    }
                }
            }
            let group = format.group().expect("a quantised format");
            store.quant = Some((kq, vq, group));
        }
        _ => {}
    }
    // The PoD leader's scores, when this layer follows its group's leader.
    let (shared, save) = match mode {
        Mode::Pod { leader, .. } => {
            let lead = leader[layer];
            let is_leader = leader
                .iter()
                .enumerate()
                .any(|(l, &g)| g == layer && l != layer);
            if lead != layer {
                match &carry.leader_scores {
                    Some((l, s)) if *l == lead => (Some(s.as_slice()), false),
                    _ => panic!("PoD: layer {layer} runs before its leader {lead}"),
                }
            } else {
                (None, is_leader)
            }
        }
        _ => (None, false),
    };
    let group = dims.heads / dims.kv_heads;
    let heads: Vec<usize> = (0..dims.heads).collect();
    let per = dims.heads.div_ceil(threads.max(1));
    let results: Vec<(usize, Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = heads
            .chunks(per)
            .map(|hs| {
                let store = &store;
                s.spawn(move || {
                    hs.iter()
                        .map(|&h| {
                            let lead =
                                shared.map(|s| &s[h * t_len * t_len..(h + 1) * t_len * t_len]);
                            let (o, sc) = head_attention(
                                mode,
                                h,
                                h / group,
                                x,
                                store,
                                dims,
                                rope,
                                lead,
                                save,
                            );
                            (h, o, sc)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("attention thread"))
            .collect()
    });
    let d = dims.heads * hd;
    let mut out = vec![0f32; t_len * d];
    let mut saved = Vec::new();
    for (h, o, sc) in results {
        for t in 0..t_len {
            out[t * d + h * hd..t * d + (h + 1) * hd].copy_from_slice(&o[t * hd..(t + 1) * hd]);
        }
        saved.extend(sc);
    }
    if save {
        carry.leader_scores = Some((layer, saved));
    }
    out
}

/// One query head over the whole sequence: its output `[T][head_dim]`, and (when `save`) its scores
/// `[t][t]` for the layers that share them.
#[allow(clippy::too_many_arguments)]
fn head_attention(
    mode: &Mode,
    h: usize,
    kvh: usize,
    x: &Qkv,
    store: &Store,
    dims: Dims,
    rope: &Rope,
    leader_scores: Option<&[f32]>,
    save: bool,
) -> (Vec<f32>, Vec<f32>) {
    let (t_len, hd) = (x.tokens, dims.head_dim);
    let (d, kvd) = (dims.heads * hd, dims.kv_heads * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; t_len * hd];
    let mut saved = if save {
        vec![0f32; t_len * t_len]
    } else {
        Vec::new()
    };
    let mut scores = Vec::with_capacity(t_len);
    let mut keys: Vec<f32> = Vec::new();
    for t in 0..t_len {
        let q = &x.q[t * d + h * hd..t * d + (h + 1) * hd];
        scores.clear();
        let o = match mode {
            Mode::Sinks { sinks, window } if t + 1 > sinks + window => {
                // Kept: tokens 0..S at positions 0..S, tokens t+1−W..=t at positions S..S+W; the
                // query (token t) at position S+W−1. Keys rotated from their pre-RoPE cache.
                let (s, w) = (*sinks, *window);
                let kept: Vec<usize> = (0..s).chain(t + 1 - w..=t).collect();
                let mut qr = x.q_pre[t * d + h * hd..t * d + (h + 1) * hd].to_vec();
                rope.apply(&mut qr, s + w - 1);
                keys.clear();
                for (pos, &j) in kept.iter().enumerate() {
                    let at = keys.len();
                    keys.extend_from_slice(&x.k_pre[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd]);
                    rope.apply(&mut keys[at..], pos);
                    scores.push(scale * dot(&qr, &keys[at..]));
                }
                let v = kept
                    .iter()
                    .map(|&j| &x.v[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd]);
                part(&scores, v, hd).0
            }
            Mode::Pod { sinks, window, .. } if t + 1 > sinks + window => {
                let (s, w) = (*sinks, *window);
                let prox: Vec<usize> = (0..s).chain(t + 1 - w..=t).collect();
                let dist = s..t + 1 - w;
                for &j in &prox {
                    scores.push(scale * dot(q, store.kv(kvh, j, t).0));
                }
                let vp = prox.iter().map(|&j| store.kv(kvh, j, t).1);
                let (op, lp) = part(&scores, vp, hd);
                let sd: Vec<f32> = match leader_scores {
                    Some(ls) => dist.clone().map(|j| ls[t * t_len + j]).collect(),
                    None => dist
                        .clone()
                        .map(|j| scale * dot(q, store.kv(kvh, j, t).0))
                        .collect(),
                };
                if save {
                    for (j, &v) in dist.clone().zip(&sd) {
                        saved[t * t_len + j] = v;
                    }
                }
                let (od, ld) = part(&sd, dist.map(|j| store.kv(kvh, j, t).1), hd);
                let (o, _) = fusekit::attention::reference::merge(&op, &[lp], &od, &[ld], hd)
                    .expect("merge shapes");
                o
            }
            _ => {
                for j in 0..=t {
                    scores.push(scale * dot(q, store.kv(kvh, j, t).0));
                }
                if save {
                    saved[t * t_len..t * t_len + t + 1].copy_from_slice(&scores);
                }
                part(&scores, (0..=t).map(|j| store.kv(kvh, j, t).1), hd).0
            }
        };
        for (dst, &v) in out[t * hd..(t + 1) * hd].iter_mut().zip(&o) {
            *dst = v as f32;
        }
    }
    (out, saved)
}

/// Each query's attention distribution over its distant tokens (`sinks..t+1−window`, renormalised
/// there), per head, from one layer's own scores: `[head][query]` lists, empty where a query has no
/// distant token.
pub fn distant_distributions(
    x: &Qkv,
    dims: Dims,
    sinks: usize,
    window: usize,
) -> Vec<Vec<Vec<f64>>> {
    let (t_len, hd) = (x.tokens, dims.head_dim);
    let (d, kvd) = (dims.heads * hd, dims.kv_heads * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    (0..dims.heads)
        .map(|h| {
            let kvh = h / (dims.heads / dims.kv_heads);
            (0..t_len)
                .map(|t| {
                    if t < sinks + window {
                        return Vec::new();
                    }
                    let q = &x.q[t * d + h * hd..t * d + (h + 1) * hd];
                    let s: Vec<f64> = (sinks..t + 1 - window)
                        .map(|j| {
                            (scale * dot(q, &x.k[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd]))
                                as f64
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    e.iter().map(|v| v / z).collect()
                })
                .collect()
        })
        .collect()
}

/// Mean Jensen-Shannon divergence (bits, 0..1) between two layers' distant distributions, over heads
/// and the queries that have distant tokens.
pub fn mean_js(a: &[Vec<Vec<f64>>], b: &[Vec<Vec<f64>>]) -> f64 {
    let (mut sum, mut n) = (0f64, 0usize);
    for (ha, hb) in a.iter().zip(b) {
        for (p, q) in ha.iter().zip(hb) {
            if p.is_empty() {
                continue;
            }
            let mut js = 0f64;
            for (&pi, &qi) in p.iter().zip(q) {
                let m = 0.5 * (pi + qi);
                if pi > 0.0 {
                    js += 0.5 * pi * (pi / m).log2();
                }
                if qi > 0.0 {
                    js += 0.5 * qi * (qi / m).log2();
                }
            }
            sum += js;
            n += 1;
        }
    }
    sum / n.max(1) as f64
}
