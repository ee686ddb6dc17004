//! Shared by the quantisation examples (smollm2_quant, minilm_quant): the per-layer comparison of the
//! four quantisers, the activation statistics, and the README section writer.

use fusekit::quant::hadamard::rotate_rows_f32;
use fusekit::quant::{
    quantize_gptq, quantize_rtn, relative_output_error, GptqConfig, Hessian, WeightQuant,
};

/// The columns of the comparison, in order.
pub const METHODS: [&str; 4] = ["RTN", "RTN + Hadamard", "GPTQ", "GPTQ + Hadamard"];

/// A library error as an example's error.
pub fn e<T>(r: fusekit::Result<T>) -> Result<T, String> {
    r.map_err(|e| e.to_string())
}

/// Max |x| over RMS, averaged over tokens (rows of `k`).
pub fn peakiness(x: &[f32], k: usize) -> f64 {
    let rows = x.len() / k;
    x.chunks_exact(k)
        .map(|r| {
            let rms = (r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / k as f64).sqrt();
            let max = r.iter().fold(0f64, |a, &v| a.max((v as f64).abs()));
            if rms > 0.0 {
                max / rms
            } else {
                0.0
            }
        })
        .sum::<f64>()
        / rows as f64
}

/// One layer's comparison: per scheme, the relative output errors of [`METHODS`] on the evaluation
/// activations; per scheme, GPTQ + Hadamard with act-order (when asked for); the peakiness of the
/// evaluation activations before and after the rotation.
pub struct Comparison {
    pub errors: Vec<[f64; 4]>,
    pub act_order: Vec<f64>,
    pub peaks: (f64, f64),
}

/// Quantises the `[n][k]` weight `w` with each scheme by RTN and GPTQ (Hessian from the calibration
/// activations `xc`), each without and with the Hadamard rotation (W·H with x·H, exact in f64), and
/// judges them by the relative output error on the evaluation activations `xe`.
pub fn compare(
    w: &[f32],
    n: usize,
    k: usize,
    xc: &[f32],
    xe: &[f32],
    schemes: &[WeightQuant],
    act_order: bool,
) -> Result<Comparison, String> {
    let (xcr, xer) = (e(rotate_rows_f32(xc, k))?, e(rotate_rows_f32(xe, k))?);
    let wr = e(rotate_rows_f32(w, k))?;
    let hessian = |x: &[f32]| -> Result<Hessian, String> {
        let mut h = e(Hessian::new(k))?;
        e(h.add(x))?;
        Ok(h)
    };
    let (h, hr) = (hessian(xc)?, hessian(&xcr)?);
    let mut out = Comparison {
        errors: Vec::new(),
        act_order: Vec::new(),
        peaks: (peakiness(xe, k), peakiness(&xer, k)),
    };
    for s in schemes {
        let cfg = GptqConfig::default();
        let rtn = e(quantize_rtn(w, n, k, s))?.dequantize();
        let rtn_r = e(quantize_rtn(&wr, n, k, s))?.dequantize();
        let gptq = e(quantize_gptq(w, n, k, &h, s, &cfg))?.dequantize();
        let gptq_r = e(quantize_gptq(&wr, n, k, &hr, s, &cfg))?.dequantize();
        if act_order {
            // Columns by decreasing Hessian diagonal, static groups, after the rotation.
            let ao = GptqConfig {
                act_order: true,
                ..cfg
            };
            let gptq_ao = e(quantize_gptq(&wr, n, k, &hr, s, &ao))?.dequantize();
            out.act_order
                .push(e(relative_output_error(&xer, &wr, &gptq_ao, k))?);
        }
        out.errors.push([
            e(relative_output_error(xe, w, &rtn, k))?,
            e(relative_output_error(&xer, &wr, &rtn_r, k))?,
            e(relative_output_error(xe, w, &gptq, k))?,
            e(relative_output_error(&xer, &wr, &gptq_r, k))?,
        ]);
    }
    Ok(out)
}

/// Replaces the README's section between `<!-- name -->` and `<!-- /name -->` with `table`.
pub fn write_readme_section(name: &str, table: &str) -> Result<(), String> {
    let readme = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let text = std::fs::read_to_string(&readme).map_err(|e| e.to_string())?;
    let (open, close) = (format!("<!-- {name} -->"), format!("<!-- /{name} -->"));
    let (Some(a), Some(b)) = (text.find(&open), text.find(&close)) else {
        return Err(format!("README.md has no {open} … {close} markers"));
    };
    let new = format!("{}{open}\n{table}{}", &text[..a], &text[b..]);
    std::fs::write(&readme, new).map_err(|e| e.to_string())?;
    eprintln!("README.md updated");
    Ok(())
}

/// The header of the BiLLM tables (issue 16): one row per layer type, [`BillmRow::row`].
pub const BILLM_HEADER: &str = "| layer (in → out) | BiLLM | sign·mean 1-bit | RTN 2-bit | RTN 3-bit | salient columns per block | bits/weight (paper) | bits/weight (strict) | packed bytes vs bf16 |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";

/// One layer under BiLLM (Hessian from the calibration activations `xc`) and its baselines, judged
/// on `xe`.
pub struct BillmLayer {
    /// Relative output errors: BiLLM (the packed layer's weights), sign·mean 1-bit, RTN 2-bit and
    /// 3-bit (g128 asymmetric, MSE clipping).
    pub errors: [f64; 4],
    /// Bits per weight, the paper's count and strictly.
    pub bits: fusekit::quant::BitsPerWeight,
    /// Salient columns per 128-column block.
    pub salient_per_block: f64,
    /// `PackedBillm::bytes` of the layer.
    pub packed_bytes: usize,
    /// The packed layer's dense weights (what the kernels will multiply by; smollm2_quant's
    /// perplexity runs use them).
    #[allow(dead_code)]
    pub dense: Vec<f32>,
}

pub fn billm_layer(
    w: &[f32],
    n: usize,
    k: usize,
    xc: &[f32],
    xe: &[f32],
) -> Result<BillmLayer, String> {
    let mut h = e(Hessian::new(k))?;
    e(h.add(xc))?;
    let q = e(fusekit::quant::quantize_billm(
        w,
        n,
        k,
        &h,
        &fusekit::quant::BillmConfig::default(),
    ))?;
    let p = e(fusekit::quant::PackedBillm::pack(&q))?;
    let dense = p.dequantize();
    let err = |wq: &[f32]| e(relative_output_error(xe, w, wq, k));
    let rtn = |bits: u32| -> Result<f64, String> {
        let s = WeightQuant {
            bits,
            ..WeightQuant::int4(Some(128), false)
        };
        err(&e(quantize_rtn(w, n, k, &s))?.dequantize())
    };
    Ok(BillmLayer {
        errors: [
            err(&dense)?,
            err(&e(fusekit::quant::binarize_sign_mean(w, n, k))?)?,
            rtn(2)?,
            rtn(3)?,
        ],
        bits: q.bits_per_weight(),
        salient_per_block: q.salient_columns() as f64 / q.blocks() as f64,
        packed_bytes: p.bytes(),
        dense,
    })
}

/// One layer type's BiLLM results over the layers of a model.
#[derive(Default)]
pub struct BillmRow {
    errors: [Vec<f64>; 4],
    paper: Vec<f64>,
    strict: Vec<f64>,
    salient: Vec<f64>,
    /// Packed bytes over the layers.
    pub packed: usize,
    /// bf16 bytes over the layers.
    pub bf16: usize,
}

impl BillmRow {
    pub fn push(&mut self, l: &BillmLayer, n: usize, k: usize) {
        for (v, &x) in self.errors.iter_mut().zip(&l.errors) {
            v.push(x);
        }
        self.paper.push(l.bits.paper);
        self.strict.push(l.bits.strict);
        self.salient.push(l.salient_per_block);
        self.packed += l.packed_bytes;
        self.bf16 += 2 * n * k;
    }

    /// The table row: means over the layers, packed bytes against bf16 over all of them.
    pub fn row(&self, name: &str, k: usize, n: usize) -> String {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        format!(
            "| {name} ({k} → {n}) | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} | {:.3} | {:.3} | {:.1} % |\n",
            mean(&self.errors[0]),
            mean(&self.errors[1]),
            mean(&self.errors[2]),
            mean(&self.errors[3]),
            mean(&self.salient),
            mean(&self.paper),
            mean(&self.strict),
            100.0 * self.packed as f64 / self.bf16 as f64
        )
    }
}
