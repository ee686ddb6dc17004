//! The quantised-matmul family's rows of `fusekit check`: the packed formats' round trips (int4 and
//! BiLLM's 1-bit) and the rotation's orthogonality on the CPU; one W4A16 product per activation type
//! against the f64 reference on the GPU or the emulator, and the online Hadamard kernel (rotation, and
//! rotation fused with int4 quantisation) against the f64 rotation, BiLLM's 1-bit matmul and unpack
//! against the packed weight's exact values, and W4A4 on the Hadamard kernel's int4 tokens against the
//! exact integer product.

use super::{
    hadamard, hadamard_quantize, hadamard_rotate, quantize_rtn, reference_w4a16, w4a16,
    HadamardOutput, HadamardPlan, PackedW4, QuantizedActivations, ScaleFormat, W4A16Plan,
    W4A16Weight, W4A16Workspace, W4Element, WeightQuant,
};
use crate::check::row::{CheckRow, SelfCheck};
use crate::error::Result;
use crate::testing::{Dist, Rng};
use crate::{Backend, Gpu};

pub(crate) fn self_check() -> SelfCheck {
    SelfCheck {
        family: "quant",
        cpu: cpu_check,
        gpu: kernel_check::<Gpu>,
        emu: kernel_check::<crate::emu::Emulator>,
        gpu_extra: None,
    }
}

fn normal(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    rng.sample(Dist::Normal { mean: 0.0, std }, n)
        .into_iter()
        .map(|x| x as f32)
        .collect()
}

fn cpu_check(rng: &mut Rng) -> Vec<CheckRow> {
    let (n, k) = (72, 200);
    let w = normal(rng, n * k, 0.05);
    let round_trip = quantize_rtn(&w, n, k, &WeightQuant::int4(Some(64), false))
        .and_then(|q| Ok(PackedW4::pack(&q)?.unpack() == q));
    let ok = matches!(round_trip, Ok(true));
    // H·Hᵀ = I at SmolLM2's 576 = 36·16, in f64.
    let orth = hadamard::matrix(576).map(|h| {
        let mut e = 0.0f64;
        for i in 0..576 {
            for j in 0..576 {
                let d: f64 = (0..576).map(|t| h[i * 576 + t] * h[j * 576 + t]).sum();
                e = e.max((d - (i == j) as u8 as f64).abs());
            }
        }
        e
    });
    let e = orth.unwrap_or(f64::NAN);
    // BiLLM: quantise a 40 x 200 layer (two blocks, a tail), pack, read back through safetensors: the
    // same weights bit for bit, and the packed bytes against the strict bit count.
    let billm = (|| -> Result<bool> {
        let (n, k) = (40, 200);
        let w = normal(rng, n * k, 0.05);
        let x = normal(rng, 64 * k, 1.0);
        let mut h = super::Hessian::new(k)?;
        h.add(&x)?;
        let q = super::quantize_billm(&w, n, k, &h, &super::BillmConfig::default())?;
        let p = super::PackedBillm::pack(&q)?;
        let back =
            super::PackedBillm::from_safetensors(&super::PackedBillm::to_safetensors(&[(
                "l", &p,
            )])?)?;
        let same = back.len() == 1
            && back[0]
                .1
                .dequantize()
                .iter()
                .zip(q.dequantize())
                .all(|(a, b)| a.to_bits() == b.to_bits());
        Ok(same && p.bytes() as f64 * 8.0 >= q.bits_per_weight().strict * (n * k) as f64)
    })();
    let billm_ok = matches!(billm, Ok(true));
    vec![
        CheckRow {
            kernel: "PackedW4 pack/unpack (host)".into(),
            mode: "cpu-ref",
            max_err: if ok { 0.0 } else { f64::NAN },
            pass: ok,
            gbps: None,
            note: "72 x 200 int4 g64 asymmetric: unpack(pack(q)) == q".into(),
        },
        CheckRow {
            kernel: "PackedBillm pack/safetensors/unpack (host)".into(),
            mode: "cpu-ref",
            max_err: if billm_ok { 0.0 } else { f64::NAN },
            pass: billm_ok,
            gbps: None,
            note: "BiLLM 40 x 200 (two blocks, a tail): quantise, pack, write and read back: the same weights bit for bit".into(),
        },
        CheckRow {
            kernel: "hadamard::matrix(576) (host)".into(),
            mode: "cpu-ref",
            max_err: e,
            pass: e < 1e-12,
            gbps: None,
            note: "max |H·Hᵀ − I| in f64 (36 · 16)".into(),
        },
    ]
}

fn kernel_check<B: Backend>(dev: &B, rng: &mut Rng) -> Result<Vec<CheckRow>> {
    Ok(vec![
        product::<B, half::bf16>(dev, rng)?,
        product::<B, half::f16>(dev, rng)?,
        rotate(dev, rng)?,
        rotate_quantize(dev, rng)?,
        billm_product(dev, rng)?,
        w4a4_product(dev, rng)?,
    ])
}

/// W4A4 as it is used: 9 bf16 tokens of 576 = 36·16 channels (one with a 2.6e4 channel) rotated and
/// quantised to int4 by the online Hadamard kernel, times a 130 × 576 weight (per channel, symmetric;
/// n tail) on two k-splits, on the path the device's compute capability picks, against
/// [`reference_w4a4`](super::reference_w4a4) of the tokens the kernel wrote (exact integer sums: only
/// the epilogue rounds). Largest error relative to max(|y|, 1e-3 · max|y|).
fn w4a4_product<B: Backend>(dev: &B, rng: &mut Rng) -> Result<CheckRow> {
    use half::bf16;
    let (m, n, k) = (9, 130, 576);
    let w = normal(rng, n * k, 0.05);
    let p = super::PackedW4A4::pack(&quantize_rtn(&w, n, k, &WeightQuant::int4(None, true))?)?;
    let mut x = normal(rng, m * k, 1.0);
    x[4 * k + 100] = 2.6e4;
    let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let hplan =
        HadamardPlan::new::<bf16>(dev.props(), m, k, HadamardOutput::Int4 { symmetric: false })?;
    let mut xq = QuantizedActivations::new(dev, &hplan)?;
    hadamard_quantize(dev, &hplan, &dev.upload(&xb)?, &mut xq)?;
    let plan = super::W4A4Plan::new::<bf16>(dev.props(), &p, m, Some(2))?;
    let wd = super::W4A4Weight::upload(dev, &p)?;
    let mut ws = super::SplitKWorkspace::new(dev, &plan)?;
    let mut y = dev.upload(&vec![bf16::NAN; m * n])?;
    super::w4a4(dev, &plan, &xq, &wd, &mut ws, &mut y)?;
    let got = dev.download(&y)?;
    let want = super::reference_w4a4(&xq.download(dev)?, &p)?;
    let floor = 1e-3 * want.iter().fold(0.0f64, |a, v| a.max(v.abs()));
    let err = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g.to_f64() - w).abs() / w.abs().max(floor))
        .fold(0.0f64, max_or_nan);
    let path = match plan.path() {
        super::W4A4Path::Int4 => "s4",
        super::W4A4Path::Int8 => "s8",
    };
    Ok(CheckRow {
        kernel: format!("fk_hadq_bf16_m36 (int4) + fk_w4a4_{path}_bf16_m16 (split-K)"),
        mode: if dev.kind() == "gpu" { "gpu" } else { "emu" },
        max_err: err,
        pass: err < 4e-3,
        gbps: None,
        note: "9 tokens x 576 (one with a 2.6e4 channel) rotated and quantised to int4 on the device, 130 x 576 weight per channel, 2 k-splits, against the exact integer product of the codes; tolerance 4e-3 (one rounding to bf16)".into(),
    })
}

/// BiLLM: a 130 x 300 layer quantised by [`quantize_billm`](super::quantize_billm) (three blocks, a
/// tail; n tail), 5 bf16 tokens on two k-splits against [`reference_billm`](super::reference_billm)
/// (largest error relative to max(1, |y|)), and the f16 unpack against
/// [`PackedBillm::dequantize`](super::PackedBillm::dequantize) (bits that differ: none allowed).
fn billm_product<B: Backend>(dev: &B, rng: &mut Rng) -> Result<CheckRow> {
    use half::{bf16, f16};
    let (m, n, k) = (5, 130, 300);
    let w = normal(rng, n * k, 0.05);
    let mut h = super::Hessian::new(k)?;
    h.add(&normal(rng, 64 * k, 1.0))?;
    let p = super::PackedBillm::pack(&super::quantize_billm(
        &w,
        n,
        k,
        &h,
        &super::BillmConfig::default(),
    )?)?;
    let x: Vec<bf16> = normal(rng, m * k, 1.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let plan = super::BillmPlan::new::<bf16>(dev.props(), &p, m, Some(2))?;
    let wd = super::BillmDeviceWeight::upload(dev, &p)?;
    let mut ws = super::BillmWorkspace::new(dev, &plan)?;
    let xd = dev.upload(&x)?;
    let mut y = dev.upload(&vec![bf16::NAN; m * n])?;
    super::billm_matmul(dev, &plan, &xd, &wd, &mut ws, &mut y)?;
    let got = dev.download(&y)?;
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let want = super::reference_billm(&xf, m, &p)?;
    let err = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g.to_f64() - w).abs() / w.abs().max(1.0))
        .fold(0.0f64, max_or_nan);
    let mut dense = dev.upload(&vec![f16::NAN; n * k])?;
    super::billm_unpack(dev, &wd, &mut dense)?;
    let differ = dev
        .download(&dense)?
        .iter()
        .zip(p.dequantize())
        .filter(|(g, w)| g.to_bits() != f16::from_f32(*w).to_bits())
        .count();
    Ok(CheckRow {
        kernel: "fk_billm_bf16_t2 (split-K); fk_billm_unpack_f16".into(),
        mode: if dev.kind() == "gpu" { "gpu" } else { "emu" },
        max_err: if differ == 0 { err } else { f64::NAN },
        pass: err < 8e-3 && differ == 0,
        gbps: None,
        note: format!("BiLLM 5 x 130 x 300 from quantize_billm, 2 k-splits: tolerance 8e-3 (one rounding to bf16); unpack to f16: {differ} of {} values differ from dequantize (0 allowed)", n * k),
    })
}

fn max_or_nan(a: f64, e: f64) -> f64 {
    if e.is_nan() || a.is_nan() {
        f64::NAN
    } else {
        a.max(e)
    }
}

/// 5 tokens of 1536 = 12 · 128 (f16) rotated, against the f64 rotation: largest error relative to the
/// token's RMS.
fn rotate<B: Backend>(dev: &B, rng: &mut Rng) -> Result<CheckRow> {
    let (rows, n) = (5, 1536);
    let x: Vec<half::f16> = normal(rng, rows * n, 1.0)
        .into_iter()
        .map(half::f16::from_f32)
        .collect();
    let plan = HadamardPlan::new::<half::f16>(dev.props(), rows, n, HadamardOutput::Rotated)?;
    let xd = dev.upload(&x)?;
    let mut y = dev.upload(&vec![half::f16::NAN; rows * n])?;
    hadamard_rotate(dev, &plan, &xd, &mut y)?;
    let got = dev.download(&y)?;
    let mut want: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
    hadamard::rotate_rows(&mut want, n)?;
    let mut err = 0.0f64;
    for (g, w) in got.chunks_exact(n).zip(want.chunks_exact(n)) {
        let rms = (w.iter().map(|v| v * v).sum::<f64>() / n as f64).sqrt();
        for (a, b) in g.iter().zip(w) {
            err = max_or_nan(err, (a.to_f64() - b).abs() / rms);
        }
    }
    Ok(CheckRow {
        kernel: "fk_hadq_f16_m12 (rotate)".into(),
        mode: if dev.kind() == "gpu" { "gpu" } else { "emu" },
        max_err: err,
        pass: err < 4e-3,
        gbps: None,
        note: "5 tokens x 1536 = 12 · 128: x·H against f64, error / token RMS; tolerance 4e-3 (f16 rounding)".into(),
    })
}

/// 6 tokens of 576 = 36 · 16 (bf16, one with a 2.6e4 channel) rotated and quantised to asymmetric
/// int4: the largest distance of a dequantised value from the exact rotation, in quantisation steps
/// (at most 1/2, or 1 where a code is clamped at the grid's end).
fn rotate_quantize<B: Backend>(dev: &B, rng: &mut Rng) -> Result<CheckRow> {
    let (rows, n) = (6, 576);
    let mut xf = normal(rng, rows * n, 1.0);
    xf[n + 100] = 2.6e4;
    let x: Vec<half::bf16> = xf.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let out = HadamardOutput::Int4 { symmetric: false };
    let plan = HadamardPlan::new::<half::bf16>(dev.props(), rows, n, out)?;
    let xd = dev.upload(&x)?;
    let mut q = QuantizedActivations::from_buffers(
        &plan,
        dev.upload(&vec![0xA5u8; rows * plan.code_bytes_per_row()])?,
        dev.upload(&vec![f32::NAN; rows])?,
        dev.upload(&vec![0xA5u8; rows])?,
    )?;
    hadamard_quantize(dev, &plan, &xd, &mut q)?;
    let t = q.download(dev)?;
    let mut want: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
    hadamard::rotate_rows(&mut want, n)?;
    let mut err = 0.0f64;
    for (i, w) in want.iter().enumerate() {
        let r = i / n;
        let s = t.scales[r] as f64;
        let deq = (t.codes[i] as f64 - t.zeros[r] as f64) * s;
        let clamped = t.codes[i] == 0 || t.codes[i] == 15;
        let steps = (deq - w).abs() / s;
        err = max_or_nan(err, if clamped { steps / 2.0 } else { steps });
    }
    Ok(CheckRow {
        kernel: "fk_hadq_bf16_m36 (rotate + int4)".into(),
        mode: if dev.kind() == "gpu" { "gpu" } else { "emu" },
        max_err: err,
        pass: err <= 0.5 + 1e-3,
        gbps: None,
        note: "6 tokens x 576 = 36 · 16, one with a 2.6e4 channel, asymmetric int4 per token: |dequantised − exact| in steps (clamped codes: half); at most 1/2".into(),
    })
}

/// 17 rows x a 130 x 300 weight (g128, asymmetric; k and n tails) on two k-splits, against
/// [`reference_w4a16`]: largest error relative to max(1, |y|).
fn product<B: Backend, T: W4Element>(dev: &B, rng: &mut Rng) -> Result<CheckRow> {
    let (m, n, k) = (17, 130, 300);
    let w = normal(rng, n * k, 0.05);
    let s = WeightQuant {
        scale_format: T::SCALES,
        ..WeightQuant::int4(Some(128), false)
    };
    let p = PackedW4::pack(&quantize_rtn(&w, n, k, &s)?)?;
    let x: Vec<T> = normal(rng, m * k, 1.0)
        .into_iter()
        .map(|v| T::from_f64(v as f64))
        .collect();
    let plan = W4A16Plan::new::<T>(dev.props(), &p, m, Some(2))?;
    let wd = W4A16Weight::upload(dev, &p)?;
    let mut ws = W4A16Workspace::new(dev, &plan)?;
    let xd = dev.upload(&x)?;
    let mut y = dev.upload(&vec![T::poison(); m * n])?;
    w4a16(dev, &plan, &xd, &wd, &mut ws, &mut y)?;
    let got = dev.download(&y)?;
    let xf: Vec<f32> = x.iter().map(|v| v.to_f64() as f32).collect();
    let want = reference_w4a16(&xf, m, &p)?;
    let err = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g.to_f64() - w).abs() / w.abs().max(1.0))
        .fold(0.0f64, max_or_nan);
    let tol = if T::SCALES == ScaleFormat::Bf16 {
        8e-3
    } else {
        1e-3
    };
    Ok(CheckRow {
        kernel: format!("fk_w4a16_{}_m32 (split-K)", T::SUFFIX),
        mode: if dev.kind() == "gpu" { "gpu" } else { "emu" },
        max_err: err,
        pass: err < tol,
        gbps: None,
        note: format!("17 x 130 x 300, int4 g128 asymmetric, 2 k-splits; tolerance {tol:e} (one rounding to {})", T::SUFFIX),
    })
}
