//! The Llama forward of SmolLM2-135M on the CPU, in f32 with f64 where sums are long: weights
//! dequantised once, matmuls as dot products over `[out][in]` rows in 4×4 register blocks, on
//! `threads` threads. The attention is left to the caller (a closure per layer), so every KV mode runs
//! inside the same model.

use crate::gguf::Gguf;

/// Hyper-parameters read from the GGUF metadata.
#[derive(Clone, Debug)]
pub struct Config {
    pub layers: usize,
    pub dim: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rope_base: f64,
    pub eps: f64,
}

/// One transformer block, every matrix `[out][in]` in f32.
#[derive(Clone)]
struct Block {
    attn_norm: Vec<f32>,
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
    ffn_norm: Vec<f32>,
    w_gate: Vec<f32>,
    w_up: Vec<f32>,
    w_down: Vec<f32>,
}

/// The model with its weights dequantised to f32.
#[derive(Clone)]
pub struct Model {
    pub cfg: Config,
    /// `[vocab][dim]`; also the output projection (tied embeddings).
    embed: Vec<f32>,
    blocks: Vec<Block>,
    out_norm: Vec<f32>,
    pub rope: Rope,
    pub threads: usize,
}

/// Maps a linear layer's input (`layer, which, x`) to what it multiplies by (`None`: `x` itself).
pub type InputMap<'a> = dyn FnMut(usize, Linear, &[f32]) -> Option<Vec<f32>> + 'a;

/// The linear layers of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(dead_code)]
pub enum Linear {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

#[allow(dead_code)]
impl Linear {
    pub const ALL: [Linear; 7] = [
        Linear::Q,
        Linear::K,
        Linear::V,
        Linear::O,
        Linear::Gate,
        Linear::Up,
        Linear::Down,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Linear::Q => "q_proj",
            Linear::K => "k_proj",
            Linear::V => "v_proj",
            Linear::O => "o_proj",
            Linear::Gate => "gate_proj",
            Linear::Up => "up_proj",
            Linear::Down => "down_proj",
        }
    }
}

/// One layer's attention inputs for the whole sequence: `q` `[T][heads·head_dim]`, `k`, `v`
/// `[T][kv_heads·head_dim]`; `q`, `k` after RoPE at the true positions, `q_pre`, `k_pre` before.
#[derive(Clone)]
pub struct Qkv {
    pub tokens: usize,
    pub q_pre: Vec<f32>,
    pub k_pre: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// RoPE tables in GGUF's interleaved-pair order: pair `i` is elements `(2i, 2i+1)`, rotated by
/// `pos · base^(−2i/head_dim)` (computed in f64).
#[derive(Clone)]
pub struct Rope {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    fn new(head_dim: usize, base: f64, max_pos: usize) -> Self {
        let half = head_dim / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in 0..max_pos {
            for i in 0..half {
                let a = p as f64 * base.powf(-2.0 * i as f64 / head_dim as f64);
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Rope { half, cos, sin }
    }

    /// Rotates one head vector `x` (`head_dim` long) to position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let (c, s) = (
            &self.cos[pos * self.half..(pos + 1) * self.half],
            &self.sin[pos * self.half..(pos + 1) * self.half],
        );
        for i in 0..self.half {
            let (a, b) = (x[2 * i], x[2 * i + 1]);
            x[2 * i] = a * c[i] - b * s[i];
            x[2 * i + 1] = a * s[i] + b * c[i];
        }
    }
}

impl Model {
    /// Loads and dequantises the model (Llama architecture only).
    pub fn load(g: &Gguf, threads: usize) -> Result<Self, String> {
        let arch = match g.meta.get("general.architecture") {
            Some(crate::gguf::Value::Str(s)) => s.clone(),
            _ => String::new(),
        };
        if arch != "llama" {
            return Err(format!(
                "expected a llama GGUF, found architecture '{arch}'"
            ));
        }
        let heads = g.uint("llama.attention.head_count")?;
        let dim = g.uint("llama.embedding_length")?;
        let cfg = Config {
            layers: g.uint("llama.block_count")?,
            dim,
            ffn: g.uint("llama.feed_forward_length")?,
            heads,
            kv_heads: g.uint("llama.attention.head_count_kv")?,
            head_dim: dim / heads,
            vocab: g.strings("tokenizer.ggml.tokens")?.len(),
            rope_base: g.float("llama.rope.freq_base")?,
            eps: g.float("llama.attention.layer_norm_rms_epsilon")?,
        };
        if cfg.dim % 16 != 0 || cfg.ffn % 16 != 0 || cfg.head_dim != 64 {
            return Err(format!("unexpected shape {cfg:?}"));
        }
        let t = |name: &str, want: &[usize]| -> Result<Vec<f32>, String> {
            let (w, dims) = g.tensor_f32(name)?;
            if dims != want {
                return Err(format!("{name}: dims {dims:?}, expected {want:?}"));
            }
            Ok(w)
        };
        let (d, f, kvd) = (cfg.dim, cfg.ffn, cfg.kv_heads * cfg.head_dim);
        let embed = t("token_embd.weight", &[d, cfg.vocab])?;
        if g.tensors.contains_key("output.weight") {
            return Err("an untied output.weight: not handled by this example".into());
        }
        let blocks = (0..cfg.layers)
            .map(|l| -> Result<Block, String> {
                let n = |s: &str| format!("blk.{l}.{s}.weight");
                Ok(Block {
                    attn_norm: t(&n("attn_norm"), &[d])?,
                    wq: t(&n("attn_q"), &[d, d])?,
                    wk: t(&n("attn_k"), &[d, kvd])?,
                    wv: t(&n("attn_v"), &[d, kvd])?,
                    wo: t(&n("attn_output"), &[d, d])?,
                    ffn_norm: t(&n("ffn_norm"), &[d])?,
                    w_gate: t(&n("ffn_gate"), &[d, f])?,
                    w_up: t(&n("ffn_up"), &[d, f])?,
                    w_down: t(&n("ffn_down"), &[f, d])?,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out_norm = t("output_norm.weight", &[d])?;
        let rope = Rope::new(cfg.head_dim, cfg.rope_base, 4096);
        Ok(Model {
            cfg,
            embed,
            blocks,
            out_norm,
            rope,
            threads,
        })
    }

    fn rmsnorm(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let d = self.cfg.dim;
        let mut y = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
            let r = (1.0 / (ms + self.cfg.eps).sqrt()) as f32;
            for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                *o = v * r * g;
            }
        }
        y
    }

    /// Runs the model over `tokens`, calling `attend(layer, qkv)` for each layer's attention output
    /// (`[T][heads·head_dim]`, before the output projection). Returns the final normed hidden
    /// states `[T][dim]`.
    pub fn forward(
        &self,
        tokens: &[u32],
        attend: &mut dyn FnMut(usize, &Qkv) -> Vec<f32>,
    ) -> Vec<f32> {
        self.forward_observed(tokens, attend, &mut |_, _, _| {})
    }

    /// Layer `l`'s weight of `which`: `([out][in], out, in)`.
    #[allow(dead_code)]
    pub fn linear(&self, l: usize, which: Linear) -> (&[f32], usize, usize) {
        let (b, c) = (&self.blocks[l], &self.cfg);
        let (d, f, kvd) = (c.dim, c.ffn, c.kv_heads * c.head_dim);
        match which {
            Linear::Q => (&b.wq, d, d),
            Linear::K => (&b.wk, kvd, d),
            Linear::V => (&b.wv, kvd, d),
            Linear::O => (&b.wo, d, d),
            Linear::Gate => (&b.w_gate, f, d),
            Linear::Up => (&b.w_up, f, d),
            Linear::Down => (&b.w_down, d, f),
        }
    }

    /// [`forward`](Self::forward), also calling `observe(layer, which, x)` with the input `x`
    /// (`[T][in]`) of every linear layer (Q, K, V see the same input, as do Gate and Up).
    pub fn forward_observed(
        &self,
        tokens: &[u32],
        attend: &mut dyn FnMut(usize, &Qkv) -> Vec<f32>,
        observe: &mut dyn FnMut(usize, Linear, &[f32]),
    ) -> Vec<f32> {
        self.forward_mapped(tokens, attend, &mut |l, which, x| {
            observe(l, which, x);
            None
        })
    }

    /// Replaces layer `l`'s weight of `which` (`[out][in]`, the same shape).
    #[allow(dead_code)]
    pub fn set_linear(&mut self, l: usize, which: Linear, w: Vec<f32>) {
        let b = &mut self.blocks[l];
        let slot = match which {
            Linear::Q => &mut b.wq,
            Linear::K => &mut b.wk,
            Linear::V => &mut b.wv,
            Linear::O => &mut b.wo,
            Linear::Gate => &mut b.w_gate,
            Linear::Up => &mut b.w_up,
            Linear::Down => &mut b.w_down,
        };
        assert_eq!(slot.len(), w.len(), "set_linear: shape");
        *slot = w;
    }

    /// [`forward`](Self::forward) with every linear layer's input `x` (`[T][in]`) replaced by
    /// `map(layer, which, x)` where that returns `Some` (what a quantised layer multiplies by).
    pub fn forward_mapped(
        &self,
        tokens: &[u32],
        attend: &mut dyn FnMut(usize, &Qkv) -> Vec<f32>,
        map: &mut InputMap<'_>,
    ) -> Vec<f32> {
        let c = &self.cfg;
        let (t, d, hd) = (tokens.len(), c.dim, c.head_dim);
        let kvd = c.kv_heads * hd;
        let mut x = Vec::with_capacity(t * d);
        for &tok in tokens {
            x.extend_from_slice(&self.embed[tok as usize * d..(tok as usize + 1) * d]);
        }
        for (l, b) in self.blocks.iter().enumerate() {
            let h = self.rmsnorm(&x, &b.attn_norm);
            let [hq, hk, hv] = [Linear::Q, Linear::K, Linear::V].map(|w| map(l, w, &h));
            let q_pre = gemm(hq.as_deref().unwrap_or(&h), t, &b.wq, d, d, self.threads);
            let k_pre = gemm(hk.as_deref().unwrap_or(&h), t, &b.wk, kvd, d, self.threads);
            let v = gemm(hv.as_deref().unwrap_or(&h), t, &b.wv, kvd, d, self.threads);
            let (mut q, mut k) = (q_pre.clone(), k_pre.clone());
            for p in 0..t {
                for head in q[p * d..(p + 1) * d].chunks_exact_mut(hd) {
                    self.rope.apply(head, p);
                }
                for head in k[p * kvd..(p + 1) * kvd].chunks_exact_mut(hd) {
                    self.rope.apply(head, p);
                }
            }
            let qkv = Qkv {
                tokens: t,
                q_pre,
                k_pre,
                q,
                k,
                v,
            };
            let a = attend(l, &qkv);
            assert_eq!(a.len(), t * d, "attention output shape");
            let ao = map(l, Linear::O, &a);
            let o = gemm(ao.as_deref().unwrap_or(&a), t, &b.wo, d, d, self.threads);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let h = self.rmsnorm(&x, &b.ffn_norm);
            let [hg, hu] = [Linear::Gate, Linear::Up].map(|w| map(l, w, &h));
            let gate = gemm(
                hg.as_deref().unwrap_or(&h),
                t,
                &b.w_gate,
                c.ffn,
                d,
                self.threads,
            );
            let mut up = gemm(
                hu.as_deref().unwrap_or(&h),
                t,
                &b.w_up,
                c.ffn,
                d,
                self.threads,
            );
            for (u, &g) in up.iter_mut().zip(&gate) {
                *u *= g / (1.0 + (-g).exp());
            }
            let ud = map(l, Linear::Down, &up);
            let o = gemm(
                ud.as_deref().unwrap_or(&up),
                t,
                &b.w_down,
                d,
                c.ffn,
                self.threads,
            );
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        }
        self.rmsnorm(&x, &self.out_norm)
    }

    /// Logits `[rows][vocab]` of the normed hidden states `h` (`[rows][dim]`).
    pub fn logits(&self, h: &[f32]) -> Vec<f32> {
        let rows = h.len() / self.cfg.dim;
        gemm(
            h,
            rows,
            &self.embed,
            self.cfg.vocab,
            self.cfg.dim,
            self.threads,
        )
    }

    /// Negative log-likelihood (natural log, f64) of each next token: entry `p` is
    /// `−ln softmax(logits_p)[tokens[p+1]]`, for `p < T − 1`.
    pub fn next_token_nll(&self, h: &[f32], tokens: &[u32]) -> Vec<f64> {
        let d = self.cfg.dim;
        let n = tokens.len() - 1;
        let mut out = Vec::with_capacity(n);
        for start in (0..n).step_by(64) {
            let end = (start + 64).min(n);
            let logits = self.logits(&h[start * d..end * d]);
            for (i, row) in logits.chunks_exact(self.cfg.vocab).enumerate() {
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let lse = m + row.iter().map(|&z| (z as f64 - m).exp()).sum::<f64>().ln();
                out.push(lse - row[tokens[start + i + 1] as usize] as f64);
            }
        }
        out
    }
}

/// `y[r][o] = Σ_k x[r][k] · w[o][k]` for `x` `[rows][inner]`, `w` `[out][inner]`; rows split over
/// `threads` threads.
pub fn gemm(
    x: &[f32],
    rows: usize,
    w: &[f32],
    out: usize,
    inner: usize,
    threads: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), rows * inner);
    assert_eq!(w.len(), out * inner);
    let mut y = vec![0f32; rows * out];
    if rows == 0 {
        return y;
    }
    let per = rows.div_ceil(threads.max(1)).next_multiple_of(4);
    std::thread::scope(|s| {
        for (i, yc) in y.chunks_mut(per * out).enumerate() {
            let xc = &x[i * per * inner..((i * per + yc.len() / out) * inner)];
            s.spawn(move || gemm_rows(xc, w, yc, out, inner));
        }
    });
    y
}

/// One thread's rows, with the widest 4×4 block kernel the CPU has (chosen at run time).
fn gemm_rows(x: &[f32], w: &[f32], y: &mut [f32], out: usize, inner: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above); the kernel reads `inner` elements
            // of each row, and every row handed to it has at least `inner` (asserted in the kernel).
            return gemm_tiles(x, w, y, out, inner, |a, b, n| unsafe {
                block4x4_avx2(a, b, n)
            });
        }
    }
    gemm_tiles(x, w, y, out, inner, block4x4_portable)
}

/// Rows of `x` in tiles that stay in L2; for each tile, 4 rows of `w` against 4 rows of `x` at a
/// time (`block` computes the 16 dot products).
fn gemm_tiles(
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    out: usize,
    inner: usize,
    block: impl Fn([&[f32]; 4], [&[f32]; 4], usize) -> [[f32; 4]; 4],
) {
    let rows = x.len() / inner;
    let tile = ((192 * 1024) / (inner * 4)).max(4) / 4 * 4;
    // Edge blocks repeat the last row; their extra results are not written.
    fn row(m: &[f32], i: usize, n: usize, inner: usize) -> &[f32] {
        let s = i.min(n - 1) * inner;
        &m[s..s + inner]
    }
    for r0 in (0..rows).step_by(tile) {
        let r1 = (r0 + tile).min(rows);
        for o in (0..out).step_by(4) {
            let wr: [&[f32]; 4] = std::array::from_fn(|j| row(w, o + j, out, inner));
            for r in (r0..r1).step_by(4) {
                let xr: [&[f32]; 4] = std::array::from_fn(|i| row(x, r + i, rows, inner));
                let acc = block(xr, wr, inner);
                for (i, a) in acc.iter().enumerate().take((r1 - r).min(4)) {
                    let yr = &mut y[(r + i) * out..(r + i + 1) * out];
                    for (j, &v) in a.iter().enumerate().take((out - o).min(4)) {
                        yr[o + j] = v;
                    }
                }
            }
        }
    }
}

/// Any CPU: the 16 dot products of a 4×4 block, 8 lanes each.
fn block4x4_portable(x: [&[f32]; 4], w: [&[f32]; 4], inner: usize) -> [[f32; 4]; 4] {
    let mut out = [[0f32; 4]; 4];
    for i in 0..4 {
        for j in 0..4 {
            let mut acc = [0f32; 8];
            let (xc, wc) = (x[i][..inner].chunks_exact(8), w[j][..inner].chunks_exact(8));
            let tail: f32 = (inner / 8 * 8..inner).map(|k| x[i][k] * w[j][k]).sum();
            for (a, b) in xc.zip(wc) {
                for l in 0..8 {
                    acc[l] += a[l] * b[l];
                }
            }
            out[i][j] = acc.iter().sum::<f32>() + tail;
        }
    }
    out
}

/// The 4×4 block kernel in AVX2 + FMA intrinsics: 16 accumulators of 8 lanes, 4 loads of `x` and 4
/// of `w` per step. (Auto-vectorised Rust gave this loop only in some builds: with 16 codegen units
/// LLVM left it scalar, so the hot loop is written out. AVX2 + FMA only: the AVX-512 intrinsics need
/// Rust 1.89, above this crate's MSRV.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block4x4_avx2(x: [&[f32]; 4], w: [&[f32]; 4], inner: usize) -> [[f32; 4]; 4] {
    use std::arch::x86_64::*;
    assert!(x.iter().chain(&w).all(|r| r.len() >= inner));
    let full = inner / 8 * 8;
    let (xp, wp) = (x.map(|r| r.as_ptr()), w.map(|r| r.as_ptr()));
    let mut a = [[_mm256_setzero_ps(); 4]; 4];
    let mut k = 0;
    while k < full {
        let p = [
            _mm256_loadu_ps(xp[0].add(k)),
            _mm256_loadu_ps(xp[1].add(k)),
            _mm256_loadu_ps(xp[2].add(k)),
            _mm256_loadu_ps(xp[3].add(k)),
        ];
        let q = [
            _mm256_loadu_ps(wp[0].add(k)),
            _mm256_loadu_ps(wp[1].add(k)),
            _mm256_loadu_ps(wp[2].add(k)),
            _mm256_loadu_ps(wp[3].add(k)),
        ];
        a[0][0] = _mm256_fmadd_ps(p[0], q[0], a[0][0]);
        a[0][1] = _mm256_fmadd_ps(p[0], q[1], a[0][1]);
        a[0][2] = _mm256_fmadd_ps(p[0], q[2], a[0][2]);
        a[0][3] = _mm256_fmadd_ps(p[0], q[3], a[0][3]);
        a[1][0] = _mm256_fmadd_ps(p[1], q[0], a[1][0]);
        a[1][1] = _mm256_fmadd_ps(p[1], q[1], a[1][1]);
        a[1][2] = _mm256_fmadd_ps(p[1], q[2], a[1][2]);
        a[1][3] = _mm256_fmadd_ps(p[1], q[3], a[1][3]);
        a[2][0] = _mm256_fmadd_ps(p[2], q[0], a[2][0]);
        a[2][1] = _mm256_fmadd_ps(p[2], q[1], a[2][1]);
        a[2][2] = _mm256_fmadd_ps(p[2], q[2], a[2][2]);
        a[2][3] = _mm256_fmadd_ps(p[2], q[3], a[2][3]);
        a[3][0] = _mm256_fmadd_ps(p[3], q[0], a[3][0]);
        a[3][1] = _mm256_fmadd_ps(p[3], q[1], a[3][1]);
        a[3][2] = _mm256_fmadd_ps(p[3], q[2], a[3][2]);
        a[3][3] = _mm256_fmadd_ps(p[3], q[3], a[3][3]);
        k += 8;
    }
    let mut out = [[0f32; 4]; 4];
    let mut buf = [0f32; 8];
    for i in 0..4 {
        for j in 0..4 {
            _mm256_storeu_ps(buf.as_mut_ptr(), a[i][j]);
            let tail: f32 = (full..inner).map(|k| x[i][k] * w[j][k]).sum();
            out[i][j] = buf.iter().sum::<f32>() + tail;
        }
    }
    out
}
