//! CPU tests of the MoE reference and configuration checks (always run).

use fusekit::moe::reference::{
    self, ep_counts, gate, max_vio, plan, route_token, scores, update_bias,
};
use fusekit::moe::{GateConfig, Scoring};
use fusekit::testing::{seed_for, Rng};
use fusekit::Error;

fn cfg(e: usize, k: usize) -> GateConfig {
    GateConfig {
        n_experts: e,
        top_k: k,
        ..GateConfig::default()
    }
}

#[test]
fn config_validation_names_the_field() {
    let arg = |c: GateConfig| match c.validate() {
        Err(Error::InvalidArgument { arg, .. }) => arg,
        other => panic!("{other:?}"),
    };
    assert!(GateConfig::deepseek_v3().validate().is_ok());
    assert_eq!(arg(cfg(0, 1)), "n_experts");
    assert_eq!(arg(cfg(1025, 1)), "n_experts");
    assert_eq!(arg(cfg(64, 0)), "top_k");
    assert_eq!(arg(cfg(64, 33)), "top_k");
    assert_eq!(arg(cfg(4, 5)), "top_k");
    assert_eq!(
        arg(GateConfig {
            n_group: 7,
            ..GateConfig::deepseek_v3()
        }),
        "n_group"
    );
    assert_eq!(
        arg(GateConfig {
            n_group: 64,
            n_experts: 128,
            ..GateConfig::deepseek_v3()
        }),
        "n_group"
    );
    assert_eq!(
        arg(GateConfig {
            topk_group: 9,
            ..GateConfig::deepseek_v3()
        }),
        "topk_group"
    );
    assert_eq!(
        arg(GateConfig {
            topk_group: 0,
            ..GateConfig::deepseek_v3()
        }),
        "topk_group"
    );
    // 2 kept groups of 8 experts cannot supply 20.
    assert_eq!(
        arg(GateConfig {
            topk_group: 2,
            top_k: 20,
            n_experts: 64,
            n_group: 8,
            ..GateConfig::deepseek_v3()
        }),
        "top_k"
    );
    assert_eq!(
        arg(GateConfig {
            scaling: f32::NAN,
            ..GateConfig::default()
        }),
        "scaling"
    );
}

#[test]
fn ties_go_to_the_lower_index_and_output_is_best_first() {
    let c = GateConfig {
        renormalize: false,
        ..cfg(6, 4)
    };
    let (ids, _) = route_token(&[1.0, 2.0, 2.0, 0.5, 2.0, 1.0], None, &c).unwrap();
    assert_eq!(ids, vec![1, 2, 4, 0]);
}

#[test]
fn bias_selects_but_never_weights() {
    let c = GateConfig {
        renormalize: false,
        ..cfg(4, 2)
    };
    let logits = [0.3, -1.0, 2.0, 0.0];
    let s = scores(&logits, Scoring::Sigmoid);
    let (ids, w) = route_token(&logits, Some(&[0.0, 10.0, 0.0, 0.0]), &c).unwrap();
    assert_eq!(ids, vec![1, 2]);
    assert_eq!(w[0].to_bits(), s[1].to_bits());
    assert_eq!(w[1].to_bits(), s[2].to_bits());
}

#[test]
fn excluded_groups_stay_excluded_whatever_the_bias_sign() {
    // 4 groups of 2; keep 1 group. Group 3 has the best scores; a negative bias elsewhere must not
    // make masked experts (masked with a mask, not with 0 or -inf values) come back.
    let c = GateConfig {
        n_experts: 8,
        top_k: 2,
        n_group: 4,
        topk_group: 1,
        renormalize: false,
        ..GateConfig::default()
    };
    let logits = [-3.0, -3.0, -2.0, -2.0, -1.0, -1.0, 3.0, 2.5];
    let bias = [-5.0, -5.0, -5.0, -5.0, -5.0, -5.0, -0.5, -0.5];
    let (ids, _) = route_token(&logits, Some(&bias), &c).unwrap();
    assert_eq!(ids, vec![6, 7]);
    // Every biased score negative: with "mask to 0" (a known bug) the excluded groups would win.
    let bias = [-1.0f32; 8];
    let c = GateConfig {
        top_k: 2,
        topk_group: 1,
        ..c
    };
    let (ids, _) = route_token(&logits, Some(&bias), &c).unwrap();
    assert_eq!(ids, vec![6, 7]);
}

#[test]
fn group_score_is_the_sum_of_the_top_two() {
    // Group 0 = {0, 1}: top-2 sum 0.9 + 0.1; group 1 = {2, 3}: 0.6 + 0.5 wins although group 0 has the max.
    let c = GateConfig {
        n_experts: 4,
        top_k: 1,
        n_group: 2,
        topk_group: 1,
        renormalize: false,
        ..GateConfig::default()
    };
    let s = |p: f32| -((1.0 - p) / p).ln(); // logit of p
    let (ids, _) = route_token(&[s(0.9), s(0.1), s(0.6), s(0.5)], None, &c).unwrap();
    assert_eq!(ids, vec![2]);
}

#[test]
fn nan_logits_never_win_and_propagate_to_weights() {
    let c = GateConfig {
        renormalize: false,
        ..cfg(4, 2)
    };
    let (ids, w) = route_token(&[f32::NAN, 0.0, f32::NAN, -1.0], None, &c).unwrap();
    assert_eq!(ids, vec![1, 3]);
    assert!(w.iter().all(|x| x.is_finite()));
    let (ids, w) = route_token(&[f32::NAN, 0.0, f32::NAN, -1.0], None, &cfg(4, 3)).unwrap();
    assert_eq!(ids, vec![1, 3, 0]);
    assert!(
        w.iter().all(|x| x.is_nan()),
        "renormalised with a NaN member: all NaN, visibly"
    );
    // Softmax: one NaN logit poisons the row.
    let s = scores(&[f32::NAN, 0.0], Scoring::Softmax);
    assert!(s.iter().all(|x| x.is_nan()));
    // Sigmoid saturates at ±inf.
    let s = scores(&[f32::INFINITY, f32::NEG_INFINITY], Scoring::Sigmoid);
    assert_eq!(s, vec![1.0, 0.0]);
}

#[test]
fn renormalisation_and_scaling() {
    let c = GateConfig {
        scaling: 2.5,
        ..cfg(8, 3)
    };
    let mut rng = Rng::new(seed_for("renormalisation_and_scaling"));
    let logits: Vec<f32> = (0..8).map(|_| rng.normal() as f32).collect();
    let (_, w) = route_token(&logits, None, &c).unwrap();
    let sum: f64 = w.iter().map(|&x| x as f64).sum();
    assert!((sum - 2.5).abs() < 1e-6, "{sum}");
    let p = scores(&logits, Scoring::Softmax);
    assert!((p.iter().map(|&x| x as f64).sum::<f64>() - 1.0).abs() < 1e-6);
}

#[test]
fn portable_exp_is_accurate() {
    for x in [
        -87.0f32, -10.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.0, 10.0, 88.0,
    ] {
        let got = fusekit::moe::check::exp_portable_for_tests(x) as f64;
        let want = (x as f64).exp();
        assert!(
            (got - want).abs() / want < 3e-7,
            "exp({x}) = {got} vs {want}"
        );
    }
    assert_eq!(fusekit::moe::check::exp_portable_for_tests(-200.0), 0.0);
    assert_eq!(
        fusekit::moe::check::exp_portable_for_tests(100.0),
        f32::INFINITY
    );
    assert!(fusekit::moe::check::exp_portable_for_tests(f32::NAN).is_nan());
    let mut rng = Rng::new(seed_for("portable_exp_is_accurate"));
    assert!(fusekit::moe::check::exp_error_for_tests(&mut rng) < 3e-7);
}

#[test]
fn gate_counts_are_the_histogram_of_ids() {
    let mut rng = Rng::new(seed_for("gate_counts_are_the_histogram_of_ids"));
    for c in fusekit::moe::check::gate_configs() {
        let (logits, bias) = fusekit::moe::check::gate_inputs::<f32>(&c, 50, &mut rng);
        let (ids, w, counts) = gate(&logits, 50, Some(&bias), &c).unwrap();
        let mut h = vec![0; c.n_experts];
        for &i in &ids {
            h[i as usize] += 1;
        }
        assert_eq!(h, counts);
        assert_eq!(w.len(), 50 * c.top_k);
        for t in 0..50 {
            let mut row: Vec<i32> = ids[t * c.top_k..(t + 1) * c.top_k].to_vec();
            row.sort();
            row.dedup();
            assert_eq!(row.len(), c.top_k, "duplicate expert in {c:?}");
        }
    }
    assert_eq!(
        fusekit::moe::check::reference_selection_mismatches_for_tests(&mut rng),
        0
    );
}

#[test]
fn bias_update_and_maxvio() {
    assert_eq!(max_vio(&[3, 3, 3]), 0.0);
    assert_eq!(max_vio(&[0, 0]), 0.0);
    assert!((max_vio(&[1, 2, 3, 6]) - 1.0).abs() < 1e-12);
    let mut b = vec![0.5f32; 4];
    update_bias(&mut b, &[0, 10, 5, 5], 1e-3, false).unwrap();
    assert_eq!(b, vec![0.501, 0.499, 0.5, 0.5]);
    let mut b = vec![0.0f32; 2];
    update_bias(&mut b, &[0, 20], 0.1, true).unwrap();
    assert!((b[0] - 0.1).abs() < 1e-7 && (b[1] + 0.1).abs() < 1e-7);
}

#[test]
fn plan_is_a_stable_padded_counting_sort() {
    let ids = [2, 0, 2, 2, 1, 0, -1, 5];
    let (sorted, slot_row, off, poff, blocks) = plan(&ids, 4, 2).unwrap();
    assert_eq!(sorted, vec![1, 5, 4, -1, 0, 2, 3, -1]);
    assert_eq!(slot_row, vec![4, 0, 5, 6, 2, 1, -1, -1]);
    assert_eq!(off, vec![0, 2, 3, 6, 6]);
    assert_eq!(poff, vec![0, 2, 4, 8, 8]);
    assert_eq!(blocks, vec![0, 1, 2, 2]);
}

#[test]
fn combine_reference_is_the_weighted_sum() {
    let out = reference::combine(&[1.0, 2.0, 10.0, 20.0], &[0.5, 0.25], &[1, 0], 1, 2, 2).unwrap();
    assert_eq!(out, vec![0.5 * 10.0 + 0.25 * 1.0, 0.5 * 20.0 + 0.25 * 2.0]);
}

#[test]
fn ep_counts_reference() {
    // E = 8 over 4 ranks (2 each); token 0 -> experts 0, 1 (rank 0 only), token 1 -> 7, 2 (ranks 3, 1).
    let (m, tpr) = ep_counts(&[0, 1, 7, 2], 2, 4, 2).unwrap();
    assert_eq!(m, vec![1, 0, 0, 0, 0, 1, 0, 1]);
    assert_eq!(tpr, vec![1, 1, 0, 1]);
}
