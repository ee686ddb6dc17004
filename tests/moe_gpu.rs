//! The MoE kernels on a GPU against the reference: gate (bit-exact ids, weights, counts), determinism,
//! non-finite logits, the bias update and MaxVio, the permutation / gather / combine, expert-parallel
//! counts, the full-scale balance demonstration, and bad input. Skips loudly without a GPU.

use fusekit::moe::check::{gate_configs, gate_inputs, run_gate, run_permute};
use fusekit::moe::simulate::{simulate_gpu, SimConfig};
use fusekit::moe::*;
use fusekit::testing::{first_bit_difference, gpu_or_skip, poisoned, seed_for, Rng};
use fusekit::Error;
use half::bf16;

#[test]
fn gate_matches_the_reference_bit_for_bit() {
    let Some(gpu) = gpu_or_skip("gate_matches_the_reference_bit_for_bit") else {
        return;
    };
    let mut rng = Rng::new(seed_for("gate_matches_the_reference_bit_for_bit"));
    for cfg in gate_configs() {
        for t in [1, 7, 64, 4099] {
            run_gate::<f32>(&gpu, &cfg, t, &mut rng).unwrap_or_else(|e| panic!("{e}"));
            run_gate::<bf16>(&gpu, &cfg, t, &mut rng).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    // Millions of tokens, DeepSeek-V3 routing.
    run_gate::<bf16>(&gpu, &GateConfig::deepseek_v3(), 1 << 20, &mut rng)
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn gate_is_deterministic_and_counts_accumulate() {
    let Some(gpu) = gpu_or_skip("gate_is_deterministic_and_counts_accumulate") else {
        return;
    };
    let mut rng = Rng::new(seed_for("gate_is_deterministic"));
    let s = gpu.stream();
    let cfg = GateConfig::deepseek_v3();
    let t = 16384;
    let (logits, bias) = gate_inputs::<bf16>(&cfg, t, &mut rng);
    let (ld, bd) = (s.clone_htod(&logits).unwrap(), s.clone_htod(&bias).unwrap());
    let run = |counts: &mut cudarc::driver::CudaSlice<i32>, acc: bool| {
        let mut ids = s.alloc_zeros::<i32>(t * 8).unwrap();
        let mut w = s.alloc_zeros::<f32>(t * 8).unwrap();
        gate(&gpu, &cfg, t, &ld, Some(&bd), &mut ids, &mut w, counts, acc).unwrap();
        (s.clone_dtoh(&ids).unwrap(), s.clone_dtoh(&w).unwrap())
    };
    let mut c1 = s.alloc_zeros::<i32>(256).unwrap();
    let (i1, w1) = run(&mut c1, false);
    let once = s.clone_dtoh(&c1).unwrap();
    for _ in 0..3 {
        let mut c2 = s.alloc_zeros::<i32>(256).unwrap();
        let (i2, w2) = run(&mut c2, false);
        assert_eq!(i1, i2);
        assert_eq!(first_bit_difference(&w1, &w2), None);
        assert_eq!(once, s.clone_dtoh(&c2).unwrap());
    }
    run(&mut c1, true);
    let twice = s.clone_dtoh(&c1).unwrap();
    assert!(twice.iter().zip(&once).all(|(a, b)| *a == 2 * b));
    assert_eq!(once.iter().sum::<i32>() as usize, t * 8);
}

#[test]
fn non_finite_logits_follow_the_documented_rule() {
    let Some(gpu) = gpu_or_skip("non_finite_logits_follow_the_documented_rule") else {
        return;
    };
    let s = gpu.stream();
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
        let ld = s.clone_htod(&rows).unwrap();
        let mut ids = poisoned::<i32>(&gpu, 12).unwrap();
        let mut w = poisoned::<f32>(&gpu, 12).unwrap();
        let mut c = s.alloc_zeros::<i32>(e).unwrap();
        gate(&gpu, &cfg, 3, &ld, None, &mut ids, &mut w, &mut c, false).unwrap();
        let (ih, wh) = (s.clone_dtoh(&ids).unwrap(), s.clone_dtoh(&w).unwrap());
        let (ri, rw, _) = reference::gate(&rows, 3, None, &cfg);
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
fn bias_update_maxvio_and_window_match_the_reference() {
    let Some(gpu) = gpu_or_skip("bias_update_maxvio_and_window") else {
        return;
    };
    let mut rng = Rng::new(seed_for("bias_update_maxvio_and_window"));
    let s = gpu.stream();
    for (e, rule) in [
        (64, UpdateRule::Sign),
        (256, UpdateRule::Proportional),
        (1, UpdateRule::Sign),
        (1000, UpdateRule::Sign),
    ] {
        let w = 5;
        let mut st = BalanceState::new(&gpu, e, w).unwrap();
        let mut bias = vec![0.0f32; e];
        let mut hist: Vec<Vec<i32>> = Vec::new();
        for step in 0..12 {
            let counts: Vec<i32> = (0..e)
                .map(|i| (rng.below(100) + if i % 3 == 0 { 50 } else { 0 }) as i32)
                .collect();
            s.memcpy_htod(&counts, &mut st.counts).unwrap();
            st.update(&gpu, 1e-3, rule, step % 2 == 0).unwrap();
            reference::update_bias(&mut bias, &counts, 1e-3, rule == UpdateRule::Proportional);
            hist.push(counts.clone());
            let got = st.bias_sync(&gpu).unwrap();
            let worst = got
                .iter()
                .zip(&bias)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-6, "bias after step {step}: {worst}");
            let mv = st.maxvio_batch_sync(&gpu).unwrap() as f64;
            assert!((mv - reference::max_vio(&counts)).abs() < 1e-6);
            let from = hist.len().saturating_sub(w);
            let sum: Vec<i32> = (0..e)
                .map(|i| hist[from..].iter().map(|c| c[i]).sum())
                .collect();
            let mw = st.maxvio_window_sync(&gpu).unwrap().unwrap() as f64;
            assert!(
                (mw - reference::max_vio(&sum)).abs() < 1e-6,
                "window MaxVio at step {step}"
            );
            let left = st.counts_sync(&gpu).unwrap();
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
    let Some(gpu) = gpu_or_skip("permutation_gather_combine_match_the_reference") else {
        return;
    };
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
        let (err, gbps) = run_permute(&gpu, &mut rng, t, k, e, block, h)
            .unwrap_or_else(|m| panic!("T={t} K={k} E={e} block={block} H={h}: {m}"));
        println!(
            "T={t} K={k} E={e} block={block} H={h}: combine rel err {err:.2e}, {gbps:.0} GB/s"
        );
    }
}

#[test]
fn invalid_expert_ids_are_reported_not_written() {
    let Some(gpu) = gpu_or_skip("invalid_expert_ids_are_reported") else {
        return;
    };
    let s = gpu.stream();
    let ids = s.clone_htod(&[0i32, 3, 1, 9, 2, -4]).unwrap();
    let mut plan = PermutePlan::new(&gpu, 3, 2, 4, 1).unwrap();
    plan.build(&gpu, &ids).unwrap();
    match plan.check_ids_sync(&gpu, &ids) {
        Err(Error::OutOfRange {
            arg: "ids",
            index: 3,
            value: 9,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let rows = s.clone_dtoh(&plan.slot_row).unwrap();
    assert_eq!((rows[3], rows[5]), (-1, -1));
    assert_eq!(plan.total_rows_sync(&gpu).unwrap(), 4);
}

#[test]
fn expert_parallel_counts_match_the_reference() {
    let Some(gpu) = gpu_or_skip("expert_parallel_counts_match_the_reference") else {
        return;
    };
    let mut rng = Rng::new(seed_for("expert_parallel_counts"));
    let s = gpu.stream();
    for (t, k, e, r) in [
        (1, 1, 1, 1),
        (4096, 8, 256, 8),
        (999, 6, 160, 32),
        (100, 10, 512, 512),
    ] {
        let ids: Vec<i32> = (0..t * k).map(|_| rng.below(e as u64) as i32).collect();
        let idd = s.clone_htod(&ids).unwrap();
        let mut m = poisoned::<u8>(&gpu, t * r).unwrap();
        let mut tpr = s.alloc_zeros::<i32>(r).unwrap();
        ep_counts(&gpu, &idd, t, k, e, r, &mut m, &mut tpr).unwrap();
        let (rm, rt) = reference::ep_counts(&ids, k, r, e / r);
        assert_eq!(s.clone_dtoh(&m).unwrap(), rm);
        assert_eq!(s.clone_dtoh(&tpr).unwrap(), rt);
    }
}

#[test]
fn balance_demonstration_at_full_scale() {
    let Some(gpu) = gpu_or_skip("balance_demonstration_at_full_scale") else {
        return;
    };
    for cfg in [SimConfig::paper_64x6(300), SimConfig::deepseek_v3(300)] {
        let with = simulate_gpu(&gpu, &cfg).unwrap();
        let without = simulate_gpu(
            &gpu,
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
            with.tail_mean(20),
            without.tail_mean(20)
        );
        assert!(with.tail_mean(20) <= 0.1, "{}", with.tail_mean(20));
        assert!(without.tail_mean(20) > 1.0);
        assert!(with.weights_unbiased && without.weights_unbiased);
        // The GPU run follows the CPU reference exactly (same maths, bit for bit) for the first steps.
        let cpu = fusekit::moe::simulate::simulate_cpu(&SimConfig { steps: 3, ..cfg });
        assert_eq!(&with.maxvio[..3], &cpu.maxvio[..]);
    }
}

#[test]
fn bad_arguments_are_typed_errors() {
    let Some(gpu) = gpu_or_skip("moe_bad_arguments_are_typed_errors") else {
        return;
    };
    let s = gpu.stream();
    let cfg = GateConfig::default();
    let (t, e, k) = (4, cfg.n_experts, cfg.top_k);
    let l = s.alloc_zeros::<f32>(t * e).unwrap();
    let mut ids = s.alloc_zeros::<i32>(t * k).unwrap();
    let mut w = s.alloc_zeros::<f32>(t * k).unwrap();
    let mut c = s.alloc_zeros::<i32>(e).unwrap();
    macro_rules! expect {
        ($r:expr, $p:pat) => {{
            let r = $r;
            assert!(matches!(r, Err($p)), "{r:?}");
        }};
    }
    expect!(
        gate(&gpu, &cfg, t + 1, &l, None, &mut ids, &mut w, &mut c, false),
        Error::Shape { arg: "logits", .. }
    );
    expect!(
        gate(&gpu, &cfg, 0, &l, None, &mut ids, &mut w, &mut c, false),
        Error::Shape { arg: "logits", .. }
    );
    let mut short = s.alloc_zeros::<i32>(t * k - 1).unwrap();
    expect!(
        gate(&gpu, &cfg, t, &l, None, &mut short, &mut w, &mut c, false),
        Error::Shape { arg: "ids", .. }
    );
    let b = s.alloc_zeros::<f32>(e + 1).unwrap();
    expect!(
        gate(&gpu, &cfg, t, &l, Some(&b), &mut ids, &mut w, &mut c, false),
        Error::Shape { arg: "bias", .. }
    );
    let bad = GateConfig { n_group: 5, ..cfg };
    expect!(
        gate(&gpu, &bad, t, &l, None, &mut ids, &mut w, &mut c, false),
        Error::InvalidArgument { arg: "n_group", .. }
    );
    expect!(
        PermutePlan::new(&gpu, 4, 2, 8, 0),
        Error::InvalidArgument {
            arg: "block_size",
            ..
        }
    );
    let mut plan = PermutePlan::new(&gpu, 4, 2, 8, 1).unwrap();
    expect!(plan.build(&gpu, &ids), Error::Shape { arg: "ids", .. });
    let hid = s.alloc_zeros::<bf16>(4 * 16).unwrap();
    let mut out = s.alloc_zeros::<bf16>(3).unwrap();
    expect!(
        gather(&gpu, &plan, &hid, 16, &mut out),
        Error::Shape { arg: "out", .. }
    );
    let mut m = s.alloc_zeros::<u8>(t * 3).unwrap();
    let mut tpr = s.alloc_zeros::<i32>(3).unwrap();
    expect!(
        ep_counts(&gpu, &ids, t, k, e, 3, &mut m, &mut tpr),
        Error::InvalidArgument { arg: "n_ranks", .. }
    );
    let mut st = BalanceState::new(&gpu, e, 0).unwrap();
    expect!(
        st.update(&gpu, -1.0, UpdateRule::Sign, true),
        Error::InvalidArgument { arg: "rate", .. }
    );
    expect!(
        BalanceState::new(&gpu, 2000, 0),
        Error::InvalidArgument {
            arg: "n_experts",
            ..
        }
    );
}
