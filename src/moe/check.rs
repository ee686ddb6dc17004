//! The MoE family's part of `fusekit check`, and GPU-vs-reference runs shared with the tests.

use half::bf16;

use super::{reference, GateConfig, Scoring};
use crate::check::row::{CheckRow, SelfCheck};
use crate::testing::{Dist, Element, Rng};
use crate::{Backend, Gpu};

/// Gate configurations every check covers.
///
/// ```
/// let cfgs = fusekit::moe::check::gate_configs();
/// assert!(cfgs.iter().all(|c| c.validate().is_ok()));
/// ```
pub fn gate_configs() -> Vec<GateConfig> {
    let base = GateConfig::default();
    vec![
        base,
        GateConfig::deepseek_v3(),
        GateConfig {
            n_experts: 160,
            top_k: 6,
            ..base
        },
        GateConfig {
            n_experts: 512,
            top_k: 10,
            renormalize: false,
            scaling: 1.0,
            ..base
        },
        GateConfig {
            n_experts: 1024,
            top_k: 32,
            scoring: Scoring::Softmax,
            ..base
        },
        GateConfig {
            n_experts: 1,
            top_k: 1,
            ..base
        },
        GateConfig {
            n_experts: 33,
            top_k: 5,
            scoring: Scoring::Softmax,
            ..base
        },
        GateConfig {
            n_experts: 96,
            top_k: 4,
            n_group: 32,
            topk_group: 2,
            ..base
        },
        GateConfig {
            n_experts: 8,
            top_k: 8,
            n_group: 8,
            topk_group: 8,
            ..base
        },
    ]
}

/// Random logits for `cfg` (with ties and outliers), as T.
///
/// ```
/// let cfg = fusekit::moe::GateConfig::deepseek_v3();
/// let (logits, bias) = fusekit::moe::check::gate_inputs::<f32>(&cfg, 3, &mut fusekit::testing::Rng::new(2));
/// assert_eq!((logits.len(), bias.len()), (3 * 256, 256));
/// ```
pub fn gate_inputs<T: Element>(
    cfg: &GateConfig,
    n_tokens: usize,
    rng: &mut Rng,
) -> (Vec<T>, Vec<f32>) {
    let e = cfg.n_experts;
    let mut v: Vec<T> = rng
        .sample(
            Dist::Logits {
                std: 1.5,
                outlier_frac: 0.01,
                outlier_scale: 4.0,
            },
            n_tokens * e,
        )
        .into_iter()
        .map(T::from_f64)
        .collect();
    // Exact ties: copy some experts' logits onto others.
    for t in 0..n_tokens {
        if e >= 2 && t % 3 == 0 {
            let (a, b) = (rng.below(e as u64) as usize, rng.below(e as u64) as usize);
            v[t * e + a] = v[t * e + b];
        }
    }
    let bias = (0..e).map(|_| (rng.normal() * 0.05) as f32).collect();
    (v, bias)
}

/// Runs the gate on a device (the emulator or a GPU) and compares ids, weights (bit for bit: the
/// reference emulates the kernel's arithmetic) and counts with the reference. Returns the number of
/// tokens checked.
///
/// ```
/// let dev = fusekit::emu::Emulator::new().unwrap();
/// let cfg = fusekit::moe::GateConfig::deepseek_v3();
/// fusekit::moe::check::run_gate::<_, half::bf16>(&dev, &cfg, 20, &mut fusekit::testing::Rng::new(5)).unwrap();
/// ```
pub fn run_gate<B: Backend, T: super::RouterElement>(
    dev: &B,
    cfg: &GateConfig,
    n_tokens: usize,
    rng: &mut Rng,
) -> Result<usize, String> {
    let (logits, bias) = gate_inputs::<T>(cfg, n_tokens, rng);
    let e = |x: crate::Error| x.to_string();
    let ld = dev.upload(&logits).map_err(e)?;
    let bd = dev.upload(&bias).map_err(e)?;
    let (k, ne) = (cfg.top_k, cfg.n_experts);
    let mut ids = crate::testing::poisoned::<B, i32>(dev, n_tokens * k).map_err(e)?;
    let mut w = crate::testing::poisoned::<B, f32>(dev, n_tokens * k).map_err(e)?;
    let mut counts = crate::testing::poisoned::<B, i32>(dev, ne).map_err(e)?;
    super::gate(
        dev,
        cfg,
        n_tokens,
        &ld,
        Some(&bd),
        &mut ids,
        &mut w,
        &mut counts,
        false,
    )
    .map_err(e)?;
    let (ih, wh, ch) = (
        dev.download(&ids).map_err(e)?,
        dev.download(&w).map_err(e)?,
        dev.download(&counts).map_err(e)?,
    );
    let lf: Vec<f32> = logits.iter().map(|x| x.to_f64() as f32).collect();
    let (ri, rw, rc) = reference::gate(&lf, n_tokens, Some(&bias), cfg).map_err(e)?;
    crate::testing::check_written("weights", &wh)?;
    if let Some(i) = ih.iter().zip(&ri).position(|(a, b)| a != b) {
        return Err(format!(
            "{} {cfg:?}: ids differ at token {} slot {}: {} vs reference {}",
            T::NAME,
            i / k,
            i % k,
            ih[i],
            ri[i]
        ));
    }
    if let Some(i) = wh
        .iter()
        .zip(&rw)
        .position(|(a, b)| a.to_bits() != b.to_bits())
    {
        return Err(format!(
            "{} {cfg:?}: weight {i} = {:e} vs reference {:e}",
            T::NAME,
            wh[i],
            rw[i]
        ));
    }
    if ch != rc {
        return Err(format!("{} {cfg:?}: counts differ", T::NAME));
    }
    Ok(n_tokens)
}

/// Largest relative error of the portable exp against f64 exp over its range (ulp-level).
pub(crate) fn exp_error(rng: &mut Rng) -> f64 {
    let mut worst: f64 = 0.0;
    for _ in 0..20000 {
        let x = rng.uniform(-87.0, 88.0) as f32;
        let got = crate::host_math::exp_portable(x) as f64;
        let want = (x as f64).exp();
        worst = worst.max((got - want).abs() / want);
    }
    worst
}

/// Reference self-consistency: the selection equals a sort by (biased key desc, index asc) restricted to
/// the kept groups; counts equal the ids' histogram. Returns the number of mismatches.
pub(crate) fn reference_selection_mismatches(rng: &mut Rng) -> usize {
    let mut bad = 0;
    for cfg in gate_configs() {
        let (logits, bias) = gate_inputs::<f32>(&cfg, 16, rng);
        let e = cfg.n_experts;
        for t in 0..16 {
            let row = &logits[t * e..(t + 1) * e];
            let Ok((ids, _)) = reference::route_token(row, Some(&bias), &cfg) else {
                bad += 1;
                continue;
            };
            let s = reference::scores(row, cfg.scoring);
            let key = |i: usize| {
                let v = s[i] + bias[i];
                if v.is_nan() {
                    f32::NEG_INFINITY
                } else {
                    v
                }
            };
            // Kept groups by the top-2 rule.
            let gs = e / cfg.n_group;
            let mut groups: Vec<(f32, usize)> = (0..cfg.n_group)
                .map(|g| {
                    let mut v: Vec<f32> = (g * gs..(g + 1) * gs).map(key).collect();
                    v.sort_by(|a, b| b.total_cmp(a));
                    (if gs >= 2 { v[0] + v[1] } else { v[0] }, g)
                })
                .collect();
            groups.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let kept: Vec<usize> = groups[..if cfg.n_group > 1 { cfg.topk_group } else { 1 }]
                .iter()
                .map(|x| x.1)
                .collect();
            let mut cand: Vec<usize> = (0..e)
                .filter(|i| cfg.n_group == 1 || kept.contains(&(i / gs)))
                .collect();
            cand.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
            let want: Vec<i32> = cand[..cfg.top_k].iter().map(|&i| i as i32).collect();
            if want != ids {
                bad += 1;
            }
        }
    }
    bad
}

pub(crate) fn self_check() -> SelfCheck {
    SelfCheck {
        family: "moe",
        cpu: |rng| {
            let e = exp_error(rng);
            let bad = reference_selection_mismatches(rng);
            let sim = super::simulate::simulate_cpu(&super::simulate::SimConfig {
                n_tokens: 1024,
                ..super::simulate::SimConfig::paper_64x6(40)
            });
            vec![
                CheckRow::new(
                    "fk_moe_math.h exp (host)",
                    "cpu-ref",
                    e,
                    e < 3e-7,
                    "portable exp vs f64 exp".into(),
                    None,
                ),
                CheckRow::new(
                    "gate reference",
                    "cpu-ref",
                    bad as f64,
                    bad == 0,
                    format!("{} configs vs sort-based selection", gate_configs().len()),
                    None,
                ),
                match sim {
                    // 40 steps: the trace has a first and a last MaxVio.
                    Ok(sim) => {
                        let (first, last) = (sim.maxvio[0], sim.maxvio[sim.maxvio.len() - 1]);
                        CheckRow::new(
                            "balance (reference)",
                            "cpu-ref",
                            0.0,
                            sim.weights_unbiased && last < first,
                            format!("MaxVio {first:.2} -> {last:.2} in 40 steps"),
                            None,
                        )
                    }
                    Err(err) => CheckRow::new(
                        "balance (reference)",
                        "cpu-ref",
                        f64::NAN,
                        false,
                        err.to_string(),
                        None,
                    ),
                },
            ]
        },
        gpu: kernels_check::<Gpu>,
        emu: kernels_check::<crate::emu::Emulator>,
        gpu_extra: None,
    }
}

/// The gate (every configuration, f32 and bf16) and plan/gather/combine on a device against the
/// reference (with the combine's GB/s on a GPU).
fn kernels_check<B: Backend>(dev: &B, rng: &mut Rng) -> crate::Result<Vec<CheckRow>> {
    let mode = dev.kind();
    let mut rows = Vec::new();
    for (name, res) in [
        (
            "fk_moe_gate_f32",
            gate_configs()
                .iter()
                .try_for_each(|c| run_gate::<B, f32>(dev, c, 67, rng).map(|_| ())),
        ),
        (
            "fk_moe_gate_bf16",
            gate_configs()
                .iter()
                .try_for_each(|c| run_gate::<B, bf16>(dev, c, 67, rng).map(|_| ())),
        ),
    ] {
        rows.push(match res {
            Ok(()) => CheckRow::new(
                name,
                mode,
                0.0,
                true,
                format!(
                    "{} configs, ids/weights/counts bit-exact",
                    gate_configs().len()
                ),
                None,
            ),
            Err(m) => CheckRow::new(name, mode, f64::NAN, false, m, None),
        });
    }
    rows.push(
        match run_permute::<B, bf16>(dev, rng, 1000, 8, 64, 16, 256) {
            Ok((err, gbps)) => CheckRow::new(
                "fk_moe_plan/gather/combine",
                mode,
                err,
                err < 1e-2,
                "T=1000 K=8 E=64 block 16, H=256 bf16".into(),
                gbps,
            ),
            Err(m) => CheckRow::new("fk_moe_plan/gather/combine", mode, f64::NAN, false, m, None),
        },
    );
    rows.push(match bias_update_run(dev, rng) {
        Ok(err) => CheckRow::new(
            "fk_moe_bias_update/maxvio",
            mode,
            err,
            err < 1e-5,
            "E=256, window 4, six steps; bias and MaxVio abs error".into(),
            None,
        ),
        Err(m) => CheckRow::new("fk_moe_bias_update/maxvio", mode, f64::NAN, false, m, None),
    });
    rows.push(match ep_counts_run(dev, rng) {
        Ok(()) => CheckRow::new(
            "fk_moe_ep_counts",
            mode,
            0.0,
            true,
            "T=999 K=6 E=160 over 32 ranks, bit-exact".into(),
            None,
        ),
        Err(m) => CheckRow::new("fk_moe_ep_counts", mode, f64::NAN, false, m, None),
    });
    Ok(rows)
}

/// Six bias updates (with a window of 4) against the reference; the worst absolute error of the bias
/// and of the two MaxVio figures.
fn bias_update_run<B: Backend>(dev: &B, rng: &mut Rng) -> Result<f64, String> {
    let e = |e: crate::Error| e.to_string();
    let (n, win) = (256usize, 4usize);
    let mut st = super::BalanceState::new(dev, n, win).map_err(e)?;
    let mut bias = vec![0.0f32; n];
    let mut hist: Vec<Vec<i32>> = Vec::new();
    let mut worst: f64 = 0.0;
    for _ in 0..6 {
        let counts: Vec<i32> = (0..n)
            .map(|i| (rng.below(50) + (i % 4) as u64 * 20) as i32)
            .collect();
        dev.write(&counts, &mut st.counts).map_err(e)?;
        st.update(dev, 1e-3, super::UpdateRule::Sign, true)
            .map_err(e)?;
        reference::update_bias(&mut bias, &counts, 1e-3, false).map_err(e)?;
        hist.push(counts.clone());
        for (a, b) in st.bias_sync(dev).map_err(e)?.iter().zip(&bias) {
            worst = worst.max((a - b).abs() as f64);
        }
        worst = worst.max(
            (st.maxvio_batch_sync(dev).map_err(e)? as f64 - reference::max_vio(&counts)).abs(),
        );
        let from = hist.len().saturating_sub(win);
        let sum: Vec<i32> = (0..n)
            .map(|i| hist[from..].iter().map(|c| c[i]).sum())
            .collect();
        let mw = st.maxvio_window_sync(dev).map_err(e)?.unwrap_or(f32::NAN) as f64;
        worst = worst.max((mw - reference::max_vio(&sum)).abs());
    }
    Ok(worst)
}

/// Expert-parallel counts against the reference, exactly.
fn ep_counts_run<B: Backend>(dev: &B, rng: &mut Rng) -> Result<(), String> {
    let e = |e: crate::Error| e.to_string();
    let (t, k, ne, r) = (999usize, 6usize, 160usize, 32usize);
    let ids: Vec<i32> = (0..t * k).map(|_| rng.below(ne as u64) as i32).collect();
    let idd = dev.upload(&ids).map_err(e)?;
    let mut m = crate::testing::poisoned::<B, u8>(dev, t * r).map_err(e)?;
    let mut tpr = dev.alloc_zeros::<i32>(r).map_err(e)?;
    super::ep_counts(dev, &idd, t, k, ne, r, &mut m, &mut tpr).map_err(e)?;
    let (rm, rt) = reference::ep_counts(&ids, k, r, ne / r).map_err(e)?;
    if dev.download(&m).map_err(e)? != rm || dev.download(&tpr).map_err(e)? != rt {
        return Err("membership or tokens per rank differ".into());
    }
    Ok(())
}

/// Plan + gather + identity "experts" + combine on a device against the reference, hidden states of type
/// `T`; returns the relative L2 error of the combine and, on a GPU, the combine's GB/s.
///
/// ```
/// let dev = fusekit::emu::Emulator::new().unwrap();
/// let (err, _gbps) = fusekit::moe::check::run_permute::<_, half::bf16>(&dev, &mut fusekit::testing::Rng::new(6), 100, 4, 16, 8, 64).unwrap();
/// assert!(err < 1e-2);
/// ```
pub fn run_permute<B: Backend, T: super::HiddenElement>(
    dev: &B,
    rng: &mut Rng,
    t: usize,
    k: usize,
    e: usize,
    block: usize,
    h: usize,
) -> Result<(f64, Option<f64>), String> {
    let er = |x: crate::Error| x.to_string();
    let ids: Vec<i32> = (0..t * k).map(|_| rng.below(e as u64) as i32).collect();
    let hidden: Vec<T> = rng
        .sample(
            Dist::Normal {
                mean: 0.0,
                std: 1.0,
            },
            t * h,
        )
        .into_iter()
        .map(T::from_f64)
        .collect();
    let w: Vec<f32> = (0..t * k).map(|_| rng.uniform(0.0, 1.0) as f32).collect();
    let idd = dev.upload(&ids).map_err(er)?;
    let mut plan = super::PermutePlan::new(dev, t, k, e, block).map_err(er)?;
    crate::testing::poison(dev, &mut plan.sorted_slots).map_err(er)?;
    crate::testing::poison(dev, &mut plan.slot_row).map_err(er)?;
    crate::testing::poison(dev, &mut plan.block_expert).map_err(er)?;
    plan.build(dev, &idd).map_err(er)?;
    plan.check_ids_sync(dev, &idd).map_err(er)?;
    let (rs, rr, ro, rpo, rb) = reference::plan(&ids, e, block).map_err(er)?;
    let got_sorted = dev.download(&plan.sorted_slots).map_err(er)?;
    if got_sorted[..rs.len()] != rs[..] || got_sorted[rs.len()..].iter().any(|&x| x != -1) {
        return Err("sorted_slots differ from the reference".into());
    }
    if dev.download(&plan.slot_row).map_err(er)? != rr {
        return Err("slot_row differs".into());
    }
    if dev.download(&plan.offsets).map_err(er)? != ro
        || dev.download(&plan.padded_offsets).map_err(er)? != rpo
    {
        return Err("offsets differ".into());
    }
    let be = dev.download(&plan.block_expert).map_err(er)?;
    if be[..rb.len()] != rb[..] || be[rb.len()..].iter().any(|&x| x != -1) {
        return Err("block_expert differs".into());
    }
    let hd = dev.upload(&hidden).map_err(er)?;
    let mut perm = crate::testing::poisoned::<B, T>(dev, plan.max_rows() * h).map_err(er)?;
    super::gather(dev, &plan, &hd, h, &mut perm).map_err(er)?;
    let ph = dev.download(&perm).map_err(er)?;
    for (r, &slot) in rs.iter().enumerate() {
        let want: &[T] = if slot < 0 {
            &[]
        } else {
            &hidden[(slot as usize / k) * h..(slot as usize / k + 1) * h]
        };
        let got = &ph[r * h..(r + 1) * h];
        let ok = if slot < 0 {
            got.iter().all(|x| x.to_f64() == 0.0)
        } else {
            got.iter()
                .zip(want)
                .all(|(a, b)| bytemuck::bytes_of(&a.to_f64()) == bytemuck::bytes_of(&b.to_f64()))
        };
        if !ok {
            return Err(format!("gather row {r} (slot {slot}) wrong"));
        }
    }
    // Identity experts: expert_out = the gathered rows; combine = Σ_k w_k h_t.
    let wd = dev.upload(&w).map_err(er)?;
    let mut out = crate::testing::poisoned::<B, T>(dev, t * h).map_err(er)?;
    super::combine(dev, &plan, &perm, &wd, h, &mut out).map_err(er)?;
    let ph64: Vec<f64> = ph.iter().map(|x| x.to_f64()).collect();
    let want = reference::combine(&ph64, &w, &rr, t, k, h).map_err(er)?;
    let oh = dev.download(&out).map_err(er)?;
    let rep = crate::testing::compare(
        "combine",
        &oh,
        &want,
        crate::testing::Tolerance {
            rel_l2: 1e-2,
            atol: 1e-6,
            rtol: 1e-2,
        },
    )?;
    let gbps = match dev.as_gpu() {
        Some(gpu) => {
            let tm = crate::timing::time_launches_sync(gpu, 2, 10, || {
                // The same launch, through the Gpu-typed buffers of this run.
                super::combine(dev, &plan, &perm, &wd, h, &mut out)
            })
            .map_err(er)?;
            Some(tm.gbps(((t * k + t) * h * std::mem::size_of::<T>()) as u64))
        }
        None => None,
    };
    Ok((rep.rel_l2, gbps))
}

/// The kernels' portable exp, for tests.
#[doc(hidden)]
pub fn exp_portable_for_tests(x: f32) -> f32 {
    crate::host_math::exp_portable(x)
}

/// [`exp_error`] for tests.
#[doc(hidden)]
pub fn exp_error_for_tests(rng: &mut Rng) -> f64 {
    exp_error(rng)
}

/// [`reference_selection_mismatches`] for tests.
#[doc(hidden)]
pub fn reference_selection_mismatches_for_tests(rng: &mut Rng) -> usize {
    reference_selection_mismatches(rng)
}
