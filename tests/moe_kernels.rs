//! The MoE kernels against the reference, on the SIMT emulator always and on a GPU when one is present:
//! gate (bit-exact ids, weights, counts), determinism, non-finite logits, the bias update and MaxVio,
//! the permutation / gather / combine, expert-parallel counts, the balance demonstration (full scale on
//! a GPU), and bad input.

use fusekit::moe::check::{gate_configs, gate_inputs, run_gate, run_permute};
use fusekit::moe::simulate::{simulate_device, SimConfig};
use fusekit::moe::*;
use fusekit::testing::{emu_large, first_bit_difference, poisoned, seed_for, Rng};
use fusekit::{Backend, Error};
use half::bf16;

#[test]
fn gate_matches_the_reference_bit_for_bit() {
    fusekit::on_every_backend!("gate_matches_the_reference_bit_for_bit", |dev| {
        gate_matches_the_reference_bit_for_bit_on(dev)
    });
}

fn gate_matches_the_reference_bit_for_bit_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("gate_matches_the_reference_bit_for_bit"));
    // The emulator runs every warp collective as 32 fiber switches (~60 per DeepSeek token): smaller batches
    // there; gate_grid_stride_loops_on_a_small_device covers the multi-token loop.
    let sizes: &[usize] = if dev.kind() == "gpu" || emu_large() {
        &[1, 7, 64, 4099]
    } else {
        &[1, 7, 64, 515]
    };
    for cfg in gate_configs() {
        for &t in sizes {
            run_gate::<B, f32>(dev, &cfg, t, &mut rng).unwrap_or_else(|e| panic!("{e}"));
            run_gate::<B, bf16>(dev, &cfg, t, &mut rng).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    // Millions of tokens, DeepSeek-V3 routing (the emulator: opt-in, FUSEKIT_EMU_LARGE=1; each token is
    // a warp of ~60 warp collectives there).
    let many = if dev.kind() == "gpu" || emu_large() {
        1 << 20
    } else {
        2048
    };
    run_gate::<B, bf16>(dev, &GateConfig::deepseek_v3(), many, &mut rng)
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn gate_grid_stride_loops_on_a_small_device() {
    // An emulated GPU with 2 SMs: the gate's grid (at most 8 blocks per SM) and the combine's (16 per
    // SM) are far smaller than the work, so every warp and block loops over many tokens and rows.
    let Some(emu) = fusekit::testing::emulator_for("gate_grid_stride_loops_on_a_small_device")
    else {
        return;
    };
    let props = fusekit::DeviceProps {
        sm_count: 2,
        ..emu.props().clone()
    };
    let dev = fusekit::emu::Emulator::with(props, emu.options()).unwrap();
    let mut rng = Rng::new(seed_for("gate_grid_stride_loops_on_a_small_device"));
    for cfg in [GateConfig::deepseek_v3(), gate_configs()[4]] {
        run_gate::<_, bf16>(&dev, &cfg, 1031, &mut rng).unwrap_or_else(|e| panic!("{e}"));
    }
    let (err, _) = run_permute::<_, bf16>(&dev, &mut rng, 700, 4, 32, 8, 40).unwrap();
    assert!(err < 1e-2);
}

#[test]
fn gate_is_deterministic_and_counts_accumulate() {
    fusekit::on_every_backend!("gate_is_deterministic_and_counts_accumulate", |dev| {
        gate_is_deterministic_and_counts_accumulate_on(dev)
    });
}

fn gate_is_deterministic_and_counts_accumulate_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("gate_is_deterministic"));
    let cfg = GateConfig::deepseek_v3();
    let t = if dev.kind() == "gpu" { 16384 } else { 1024 };
    let (logits, bias) = gate_inputs::<bf16>(&cfg, t, &mut rng);
    let (ld, bd) = (dev.upload(&logits).unwrap(), dev.upload(&bias).unwrap());
    let run = |counts: &mut B::Buffer<i32>, acc: bool| {
        let mut ids = dev.alloc_zeros::<i32>(t * 8).unwrap();
        let mut w = dev.alloc_zeros::<f32>(t * 8).unwrap();
        gate(dev, &cfg, t, &ld, Some(&bd), &mut ids, &mut w, counts, acc).unwrap();
        (dev.download(&ids).unwrap(), dev.download(&w).unwrap())
    };
    let mut c1 = dev.alloc_zeros::<i32>(256).unwrap();
    let (i1, w1) = run(&mut c1, false);
    let once = dev.download(&c1).unwrap();
    for _ in 0..3 {
        let mut c2 = dev.alloc_zeros::<i32>(256).unwrap();
        let (i2, w2) = run(&mut c2, false);
        assert_eq!(i1, i2);
        assert_eq!(first_bit_difference(&w1, &w2), None);
        assert_eq!(once, dev.download(&c2).unwrap());
    }
    run(&mut c1, true);
    let twice = dev.download(&c1).unwrap();
    assert!(twice.iter().zip(&once).all(|(a, b)| *a == 2 * b));
    assert_eq!(once.iter().sum::<i32>() as usize, t * 8);
}

#[test]
fn non_finite_logits_follow_the_documented_rule() {
    fusekit::on_every_backend!("non_finite_logits_follow_the_documented_rule", |dev| {
        non_finite_logits_follow_the_documented_rule_on(dev)
    });
}

fn non_finite_logits_follow_the_documented_rule_on<B: Backend>(dev: &B) {
    let e = 40;
    for scoring in [Scoring::Sigmoid, Scoring::Softmax] {
        let cfg = GateConfig {
            n_experts: e,
            top_k: 4,
            scoring,
            ..GateConfig::default()
        };
        let mut rows = vec![0.0f32; 3 * e];
        for (j, x) in rows.iter_mut().enumerate() {
            *x = ((j * 7) % 13) as f32 * 0.1;
        }
        rows[3] = f32::NAN; // token 0: one NaN
        for x in &mut rows[e..2 * e] {
            *x = f32::NAN; // token 1: all NaN
        }
        rows[2 * e + 5] = f32::INFINITY; // token 2: +inf
        rows[2 * e + 6] = f32::NEG_INFINITY;
        let ld = dev.upload(&rows).unwrap();
        let mut ids = poisoned::<B, i32>(dev, 12).unwrap();
        let mut w = poisoned::<B, f32>(dev, 12).unwrap();
        let mut c = dev.alloc_zeros::<i32>(e).unwrap();
        gate(dev, &cfg, 3, &ld, None, &mut ids, &mut w, &mut c, false).unwrap();
        let (ih, wh) = (dev.download(&ids).unwrap(), dev.download(&w).unwrap());
        let (ri, rw, _) = reference::gate(&rows, 3, None, &cfg).unwrap();
        assert_eq!(ih, ri, "{scoring:?}");
        assert_eq!(
            first_bit_difference(&wh, &rw),
            None,
            "{scoring:?}: {wh:?} vs {rw:?}"
        );
        assert_eq!(
            &ih[4..8],
            &[0, 1, 2, 3],
            "all-NaN row falls back to the lowest indices"
        );
    }
}

#[test]
fn gate_ties_and_non_finite_keys_match_the_reference() {
    fusekit::on_every_backend!("gate_ties_and_non_finite_keys_match_the_reference", |dev| {
        gate_ties_and_non_finite_keys_match_the_reference_on(dev)
    });
}

/// Logits and biases from three values each, so keys and group scores tie exactly and often (the order
/// is value descending, then index ascending, for experts and for groups), with NaN, +inf and -inf
/// logits sprinkled in: group-aligned (groups of 32 and 64 experts) and unaligned groups (3 and 1
/// experts), no groups, softmax.
fn gate_ties_and_non_finite_keys_match_the_reference_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("gate_ties_and_non_finite_keys"));
    let configs = [
        GateConfig::deepseek_v3(),
        GateConfig {
            n_experts: 512,
            top_k: 12,
            n_group: 8,
            topk_group: 3,
            ..GateConfig::deepseek_v3()
        },
        gate_configs()[7],
        gate_configs()[8],
        GateConfig::default(),
        GateConfig {
            n_experts: 160,
            top_k: 6,
            scoring: Scoring::Softmax,
            ..GateConfig::default()
        },
    ];
    let t = 96;
    for cfg in configs {
        let e = cfg.n_experts;
        let mut logits: Vec<f32> = (0..t * e)
            .map(|_| rng.below(3) as f32 * 0.5 - 0.5)
            .collect();
        for (i, x) in logits.iter_mut().enumerate() {
            // Tokens 1, 4, 7, ...: a few non-finite logits; token 2: every logit NaN.
            if i / e == 2 {
                *x = f32::NAN;
            } else if (i / e) % 3 == 1 {
                match rng.below(16) {
                    0 => *x = f32::NAN,
                    1 => *x = f32::INFINITY,
                    2 => *x = f32::NEG_INFINITY,
                    _ => {}
                }
            }
        }
        let bias: Vec<f32> = (0..e).map(|_| rng.below(3) as f32 * 0.25 - 0.25).collect();
        let (k, ld, bd) = (
            cfg.top_k,
            dev.upload(&logits).unwrap(),
            dev.upload(&bias).unwrap(),
        );
        for b in [None, Some(&bd)] {
            let mut ids = poisoned::<B, i32>(dev, t * k).unwrap();
            let mut w = poisoned::<B, f32>(dev, t * k).unwrap();
            let mut c = poisoned::<B, i32>(dev, e).unwrap();
            gate(dev, &cfg, t, &ld, b, &mut ids, &mut w, &mut c, false).unwrap();
            let hb = b.map(|_| bias.as_slice());
            let (ri, rw, rc) = reference::gate(&logits, t, hb, &cfg).unwrap();
            assert_eq!(
                dev.download(&ids).unwrap(),
                ri,
                "{cfg:?} bias {}",
                b.is_some()
            );
            // Bit for bit, except that a NaN weight only has to be NaN: its payload is whatever the
            // hardware (canonical NaN on a GPU) or the host compiler's operand order makes it.
            let wh = dev.download(&w).unwrap();
            let same = |x: &f32, y: &f32| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan());
            if let Some(i) = wh.iter().zip(&rw).position(|(x, y)| !same(x, y)) {
                panic!(
                    "{cfg:?} bias {}: weight {i} = {:e} ({:#x}) vs reference {:e} ({:#x})",
                    b.is_some(),
                    wh[i],
                    wh[i].to_bits(),
                    rw[i],
                    rw[i].to_bits()
                );
            }
            if let Some(i) = first_bit_difference(&wh, &rw) {
                println!(
                    "{cfg:?}: NaN weight {i} with payload {:#x}, reference {:#x}",
                    wh[i].to_bits(),
                    rw[i].to_bits()
                );
            }
            assert_eq!(
                dev.download(&c).unwrap(),
                rc,
                "{cfg:?} bias {}",
                b.is_some()
            );
        }
    }
}

#[test]
fn bias_update_maxvio_and_window_match_the_reference() {
    fusekit::on_every_backend!("bias_update_maxvio_and_window", |dev| {
        bias_update_maxvio_and_window_match_the_reference_on(dev)
    });
}

fn bias_update_maxvio_and_window_match_the_reference_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("bias_update_maxvio_and_window"));
    for (e, rule) in [
        (64, UpdateRule::Sign),
        (256, UpdateRule::Proportional),
        (1, UpdateRule::Sign),
        (1000, UpdateRule::Sign),
    ] {
        let w = 5;
        let mut st = BalanceState::new(dev, e, w).unwrap();
        let mut bias = vec![0.0f32; e];
        let mut hist: Vec<Vec<i32>> = Vec::new();
        for step in 0..12 {
            let counts: Vec<i32> = (0..e)
                .map(|i| (rng.below(100) + if i % 3 == 0 { 50 } else { 0 }) as i32)
                .collect();
            dev.write(&counts, &mut st.counts).unwrap();
            st.update(dev, 1e-3, rule, step % 2 == 0).unwrap();
            reference::update_bias(&mut bias, &counts, 1e-3, rule == UpdateRule::Proportional)
                .unwrap();
            hist.push(counts.clone());
            let got = st.bias_sync(dev).unwrap();
            let worst = got
                .iter()
                .zip(&bias)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-6, "bias after step {step}: {worst}");
            let mv = st.maxvio_batch_sync(dev).unwrap() as f64;
            assert!((mv - reference::max_vio(&counts)).abs() < 1e-6);
            let from = hist.len().saturating_sub(w);
            let sum: Vec<i32> = (0..e)
                .map(|i| hist[from..].iter().map(|c| c[i]).sum())
                .collect();
            let mw = st.maxvio_window_sync(dev).unwrap().unwrap() as f64;
            assert!(
                (mw - reference::max_vio(&sum)).abs() < 1e-6,
                "window MaxVio at step {step}"
            );
            let left = st.counts_sync(dev).unwrap();
            if step % 2 == 0 {
                assert!(left.iter().all(|&c| c == 0));
            } else {
                assert_eq!(left, counts);
            }
        }
    }
}

#[test]
fn permutation_gather_combine_match_the_reference() {
    fusekit::on_every_backend!("permutation_gather_combine_match_the_reference", |dev| {
        permutation_gather_combine_match_the_reference_on(dev)
    });
}

fn permutation_gather_combine_match_the_reference_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("permutation_gather_combine"));
    for (t, k, e, block, h) in [
        (1, 1, 1, 1, 8),
        (7, 3, 5, 1, 33),
        (1000, 8, 64, 16, 256),
        (4099, 8, 256, 128, 4096),
        (513, 32, 1024, 64, 7168),
        (20000, 6, 160, 1, 64),
        // 2048 chunks of slots: every warp of the chunk scan walks a 64-chunk segment.
        (65536, 8, 256, 128, 64),
    ] {
        // The emulator moves every byte through a fiber: the 580M-element case is opt-in there.
        let rows = t * k + e * (block - 1);
        if dev.kind() == "emu" && rows * h > 100_000_000 && !emu_large() {
            println!(
                "emulator: T={t} K={k} E={e} block={block} H={h} is opt-in (FUSEKIT_EMU_LARGE=1)"
            );
            continue;
        }
        let (err, gbps) = run_permute::<_, bf16>(dev, &mut rng, t, k, e, block, h)
            .unwrap_or_else(|m| panic!("T={t} K={k} E={e} block={block} H={h}: {m}"));
        println!(
            "{} T={t} K={k} E={e} block={block} H={h}: combine rel err {err:.2e}, {}",
            dev.kind(),
            gbps.map_or("no timing".to_string(), |g| format!("{g:.0} GB/s"))
        );
    }
}

#[test]
fn gather_and_combine_for_every_hidden_type() {
    fusekit::on_every_backend!("gather_and_combine_for_every_hidden_type", |dev| {
        let mut rng = Rng::new(seed_for("gather_and_combine_for_every_hidden_type"));
        // Vector (H a multiple of the 16-byte width) and scalar (odd H) paths of each instantiation.
        for h in [64, 37] {
            run_permute::<_, f32>(dev, &mut rng, 300, 4, 16, 8, h).unwrap();
            run_permute::<_, half::f16>(dev, &mut rng, 300, 4, 16, 8, h).unwrap();
            run_permute::<_, bf16>(dev, &mut rng, 300, 4, 16, 8, h).unwrap();
        }
    });
}

#[test]
fn invalid_expert_ids_are_reported_not_written() {
    fusekit::on_every_backend!("invalid_expert_ids_are_reported", |dev| {
        invalid_expert_ids_are_reported_not_written_on(dev)
    });
}

fn invalid_expert_ids_are_reported_not_written_on<B: Backend>(dev: &B) {
    let ids = dev.upload(&[0i32, 3, 1, 9, 2, -4]).unwrap();
    let mut plan = PermutePlan::new(dev, 3, 2, 4, 1).unwrap();
    plan.build(dev, &ids).unwrap();
    match plan.check_ids_sync(dev, &ids) {
        Err(Error::OutOfRange {
            arg: "ids",
            index: 3,
            value: 9,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let rows = dev.download(&plan.slot_row).unwrap();
    assert_eq!((rows[3], rows[5]), (-1, -1));
    assert_eq!(plan.total_rows_sync(dev).unwrap(), 4);
}

#[test]
fn expert_parallel_counts_match_the_reference() {
    fusekit::on_every_backend!("expert_parallel_counts_match_the_reference", |dev| {
        expert_parallel_counts_match_the_reference_on(dev)
    });
}

fn expert_parallel_counts_match_the_reference_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("expert_parallel_counts"));
    for (t, k, e, r) in [
        (1, 1, 1, 1),
        (4096, 8, 256, 8),
        (999, 6, 160, 32),
        (100, 10, 512, 512),
    ] {
        let ids: Vec<i32> = (0..t * k).map(|_| rng.below(e as u64) as i32).collect();
        let idd = dev.upload(&ids).unwrap();
        let mut m = poisoned::<B, u8>(dev, t * r).unwrap();
        let mut tpr = dev.alloc_zeros::<i32>(r).unwrap();
        ep_counts(dev, &idd, t, k, e, r, &mut m, &mut tpr).unwrap();
        let (rm, rt) = reference::ep_counts(&ids, k, r, e / r).unwrap();
        assert_eq!(dev.download(&m).unwrap(), rm);
        assert_eq!(dev.download(&tpr).unwrap(), rt);
    }
}

#[test]
fn balance_demonstration_at_full_scale() {
    fusekit::on_every_backend!("balance_demonstration_at_full_scale", |dev| {
        balance_demonstration_at_full_scale_on(dev)
    });
}

fn balance_demonstration_at_full_scale_on<B: Backend>(dev: &B) {
    if dev.kind() == "emu" && !emu_large() {
        // The emulator: the device loop (gate, bias update, MaxVio) follows the CPU reference bit for
        // bit over a few steps of a smaller batch; the convergence itself is the CPU reference's test
        // (tests/moe_balance.rs) and the GPU's here.
        for cfg in [SimConfig::paper_64x6(4), SimConfig::deepseek_v3(4)] {
            let cfg = SimConfig {
                n_tokens: 1024,
                ..cfg
            };
            let dev_trace = simulate_device(dev, &cfg).unwrap();
            let cpu = fusekit::moe::simulate::simulate_cpu(&cfg).unwrap();
            assert_eq!(
                dev_trace.maxvio,
                as_f32(&cpu.maxvio),
                "{} experts",
                cfg.gate.n_experts
            );
            assert_eq!(dev_trace.bias, cpu.bias, "{} experts", cfg.gate.n_experts);
            assert!(dev_trace.weights_unbiased);
        }
        return;
    }
    for cfg in [SimConfig::paper_64x6(300), SimConfig::deepseek_v3(300)] {
        let with = simulate_device(dev, &cfg).unwrap();
        let without = simulate_device(
            dev,
            &SimConfig {
                rate: 0.0,
                steps: 50,
                ..cfg
            },
        )
        .unwrap();
        println!(
            "{} experts: start {:.3}, last-20 {:.3}; without update {:.3}",
            cfg.gate.n_experts,
            with.maxvio[0],
            with.tail_mean(20).unwrap(),
            without.tail_mean(20).unwrap()
        );
        assert!(
            with.tail_mean(20).unwrap() <= 0.1,
            "{}",
            with.tail_mean(20).unwrap()
        );
        assert!(without.tail_mean(20).unwrap() > 1.0);
        assert!(with.weights_unbiased && without.weights_unbiased);
        // The device run follows the CPU reference exactly (same maths, bit for bit) for the first steps.
        let cpu = fusekit::moe::simulate::simulate_cpu(&SimConfig { steps: 3, ..cfg }).unwrap();
        assert_eq!(&with.maxvio[..3], &as_f32(&cpu.maxvio)[..]);
    }
}

/// The device keeps MaxVio in f32 (`(float)` of the same f64 expression the reference evaluates): the
/// reference's values rounded so. (Found on the emulator: the GPU test compared the f32 figures with the
/// reference's f64 ones and would have failed on its first GPU run.)
fn as_f32(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| x as f32 as f64).collect()
}

#[test]
fn bad_arguments_are_typed_errors() {
    fusekit::on_every_backend!("moe_bad_arguments_are_typed_errors", |dev| {
        bad_arguments_are_typed_errors_on(dev)
    });
}

fn bad_arguments_are_typed_errors_on<B: Backend>(dev: &B) {
    let cfg = GateConfig::default();
    let (t, e, k) = (4, cfg.n_experts, cfg.top_k);
    let l = dev.alloc_zeros::<f32>(t * e).unwrap();
    let mut ids = dev.alloc_zeros::<i32>(t * k).unwrap();
    let mut w = dev.alloc_zeros::<f32>(t * k).unwrap();
    let mut c = dev.alloc_zeros::<i32>(e).unwrap();
    macro_rules! expect {
        ($r:expr, $p:pat) => {{
            let r = $r;
            assert!(matches!(r, Err($p)), "{r:?}");
        }};
    }
    expect!(
        gate(dev, &cfg, t + 1, &l, None, &mut ids, &mut w, &mut c, false),
        Error::Shape { arg: "logits", .. }
    );
    expect!(
        gate(dev, &cfg, 0, &l, None, &mut ids, &mut w, &mut c, false),
        Error::Shape { arg: "logits", .. }
    );
    let mut short = dev.alloc_zeros::<i32>(t * k - 1).unwrap();
    expect!(
        gate(dev, &cfg, t, &l, None, &mut short, &mut w, &mut c, false),
        Error::Shape { arg: "ids", .. }
    );
    let b = dev.alloc_zeros::<f32>(e + 1).unwrap();
    expect!(
        gate(dev, &cfg, t, &l, Some(&b), &mut ids, &mut w, &mut c, false),
        Error::Shape { arg: "bias", .. }
    );
    let bad = GateConfig { n_group: 5, ..cfg };
    expect!(
        gate(dev, &bad, t, &l, None, &mut ids, &mut w, &mut c, false),
        Error::InvalidArgument { arg: "n_group", .. }
    );
    expect!(
        PermutePlan::new(dev, 4, 2, 8, 0),
        Error::InvalidArgument {
            arg: "block_size",
            ..
        }
    );
    let mut plan = PermutePlan::new(dev, 4, 2, 8, 1).unwrap();
    expect!(plan.build(dev, &ids), Error::Shape { arg: "ids", .. });
    let hid = dev.alloc_zeros::<bf16>(4 * 16).unwrap();
    let mut out = dev.alloc_zeros::<bf16>(3).unwrap();
    expect!(
        gather(dev, &plan, &hid, 16, &mut out),
        Error::Shape { arg: "out", .. }
    );
    let mut m = dev.alloc_zeros::<u8>(t * 3).unwrap();
    let mut tpr = dev.alloc_zeros::<i32>(3).unwrap();
    expect!(
        ep_counts(dev, &ids, t, k, e, 3, &mut m, &mut tpr),
        Error::InvalidArgument { arg: "n_ranks", .. }
    );
    let mut st = BalanceState::new(dev, e, 0).unwrap();
    expect!(
        st.update(dev, -1.0, UpdateRule::Sign, true),
        Error::InvalidArgument { arg: "rate", .. }
    );
    expect!(
        BalanceState::new(dev, 2000, 0),
        Error::InvalidArgument {
            arg: "n_experts",
            ..
        }
    );
}
