//! Every public CPU function of the MoE family and the probe reference: each bad value of each argument
//! is a typed error naming that argument (never a panic), and valid input still succeeds.

use fusekit::moe::reference::{
    combine, ep_counts, gate, max_vio, plan, route_token, scores, update_bias,
};
use fusekit::moe::simulate::{
    simulate_cpu, simulate_device, skew, weights_are_unbiased, SimConfig, SimTrace, StepLogits,
};
use fusekit::moe::{GateConfig, Scoring};
use fusekit::Error;

/// Asserts that `r` is `Err(Error::$variant { arg, .. })` with `arg == $arg`, with an optional context
/// for the message.
macro_rules! assert_err {
    ($r:expr, $variant:ident, $arg:expr) => {
        assert_err!($r, $variant, $arg, "")
    };
    ($r:expr, $variant:ident, $arg:expr, $($ctx:tt)+) => {{
        let r = &$r;
        let want: &str = $arg;
        assert!(
            matches!(r, Err(Error::$variant { arg, .. }) if *arg == want),
            "{}: expected Err({}) naming `{want}`, got {r:?}",
            format!($($ctx)+),
            stringify!($variant)
        );
    }};
}

/// 4 experts, top-2, no groups.
fn cfg4() -> GateConfig {
    GateConfig {
        n_experts: 4,
        top_k: 2,
        ..GateConfig::default()
    }
}

/// 8 experts in 4 groups of 2, 2 groups kept, top-2.
fn grouped() -> GateConfig {
    GateConfig {
        n_experts: 8,
        top_k: 2,
        n_group: 4,
        topk_group: 2,
        ..GateConfig::default()
    }
}

/// Gate configurations the reference used to panic on (or silently misuse), each with the field that
/// [`GateConfig::validate`] names.
fn bad_gate_configs() -> Vec<(GateConfig, &'static str)> {
    vec![
        // zero experts: `expect("fewer eligible experts than top_k")`
        (
            GateConfig {
                n_experts: 0,
                ..cfg4()
            },
            "n_experts",
        ),
        // top_k > experts: the same expect
        (GateConfig { top_k: 5, ..cfg4() }, "top_k"),
        (GateConfig { top_k: 0, ..cfg4() }, "top_k"),
        // n_group not dividing E: index past `kept`
        (
            GateConfig {
                n_group: 3,
                ..grouped()
            },
            "n_group",
        ),
        // n_group > E: groups of 0 experts, division by zero
        (
            GateConfig {
                n_experts: 4,
                n_group: 8,
                topk_group: 1,
                top_k: 1,
                ..grouped()
            },
            "n_group",
        ),
        // topk_group > n_group: `best.unwrap()` on None
        (
            GateConfig {
                topk_group: 5,
                ..grouped()
            },
            "topk_group",
        ),
        (
            GateConfig {
                topk_group: 0,
                ..grouped()
            },
            "topk_group",
        ),
        // top_k beyond the experts of the kept groups: the expect again
        (
            GateConfig {
                topk_group: 1,
                top_k: 3,
                ..grouped()
            },
            "top_k",
        ),
        (
            GateConfig {
                scaling: f32::INFINITY,
                ..cfg4()
            },
            "scaling",
        ),
    ]
}

// ---------------------------------------------------------------------------------------------------
// scores, max_vio, probe::reference::copy: total functions.

#[test]
fn scores_is_total() {
    assert!(scores(&[], Scoring::Sigmoid).is_empty());
    assert!(scores(&[], Scoring::Softmax).is_empty());
    assert_eq!(scores(&[0.0; 1000], Scoring::Softmax).len(), 1000);
    let s = scores(&[f32::NAN, f32::INFINITY, 0.0], Scoring::Softmax);
    assert!(s.iter().all(|x| x.is_nan()), "{s:?}");
    assert_eq!(scores(&[0.0, 1.0], Scoring::Sigmoid)[0], 0.5);
}

#[test]
fn max_vio_is_total() {
    assert_eq!(max_vio(&[]), 0.0);
    assert_eq!(max_vio(&[0, 0]), 0.0);
    assert_eq!(max_vio(&[-5, 1]), 0.0);
    assert_eq!(max_vio(&[i32::MAX, i32::MAX]), 0.0);
    assert_eq!(max_vio(&[10, 10, 20, 0]), 1.0);
}

#[test]
fn probe_copy_is_total() {
    assert!(fusekit::probe::reference::copy::<u8>(&[]).is_empty());
    assert_eq!(
        fusekit::probe::reference::copy(&[1.5f32, -0.0]),
        vec![1.5, -0.0]
    );
}

// ---------------------------------------------------------------------------------------------------
// route_token

#[test]
fn route_token_valid() {
    let r = route_token(&[0.0, 3.0, 1.0, 3.0], Some(&[0.0, 0.0, 5.0, 0.0]), &cfg4());
    assert!(
        matches!(&r, Ok((ids, w)) if ids == &[2, 1] && w.len() == 2),
        "{r:?}"
    );
    let r = route_token(&[0.0; 8], None, &grouped());
    assert!(matches!(&r, Ok((ids, _)) if ids.len() == 2), "{r:?}");
}

#[test]
fn route_token_bad_cfg() {
    for (c, field) in bad_gate_configs() {
        let logits = vec![0.0f32; c.n_experts];
        assert_err!(
            route_token(&logits, None, &c),
            InvalidArgument,
            field,
            "{c:?}"
        );
    }
}

#[test]
fn route_token_bad_logits() {
    for len in [0, 3, 5] {
        assert_err!(
            route_token(&vec![0.0; len], None, &cfg4()),
            Shape,
            "logits",
            "{len}"
        );
    }
}

#[test]
fn route_token_bad_bias() {
    for len in [0, 3, 5] {
        let r = route_token(&[0.0; 4], Some(&vec![0.0; len]), &cfg4());
        assert_err!(r, Shape, "bias", "{len}");
    }
}

// ---------------------------------------------------------------------------------------------------
// gate

#[test]
fn gate_valid() {
    let r = gate(&[0.0, 1.0, 2.0, 5.0, 1.0, 0.0, 0.0, 0.0], 2, None, &cfg4());
    assert!(
        matches!(&r, Ok((ids, w, c)) if ids.len() == 4 && w.len() == 4 && c.iter().sum::<i32>() == 4),
        "{r:?}"
    );
    let r = gate(&[f32::NAN; 8], 1, Some(&[f32::NAN; 8]), &grouped());
    assert!(matches!(&r, Ok((ids, _, _)) if ids.len() == 2), "{r:?}");
}

#[test]
fn gate_bad_cfg() {
    for (c, field) in bad_gate_configs() {
        let logits = vec![0.0f32; 2 * c.n_experts];
        assert_err!(gate(&logits, 2, None, &c), InvalidArgument, field, "{c:?}");
    }
}

#[test]
fn gate_bad_n_tokens() {
    // zero tokens, and more than the i32 counts hold
    for t in [0, i32::MAX as usize + 1, usize::MAX] {
        assert_err!(
            gate(&[0.0; 4], t, None, &cfg4()),
            InvalidArgument,
            "n_tokens",
            "{t}"
        );
    }
}

#[test]
fn gate_bad_logits() {
    // empty, short (used to slice out of bounds), long (the rest used to be ignored)
    for len in [0, 4, 7, 9] {
        assert_err!(
            gate(&vec![0.0; len], 2, None, &cfg4()),
            Shape,
            "logits",
            "{len}"
        );
    }
    // The most tokens and experts: a 2^41-element expectation, checked without allocating.
    let big = GateConfig {
        n_experts: 1024,
        top_k: 1,
        ..GateConfig::default()
    };
    assert_err!(
        gate(&[0.0; 4], i32::MAX as usize, None, &big),
        Shape,
        "logits"
    );
}

#[test]
fn gate_bad_bias() {
    for len in [0, 3, 5] {
        assert_err!(
            gate(&[0.0; 8], 2, Some(&vec![0.0; len]), &cfg4()),
            Shape,
            "bias",
            "{len}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------
// update_bias

#[test]
fn update_bias_valid() {
    let mut b = vec![0.0f32; 3];
    let r = update_bias(&mut b, &[1, 2, 3], 0.1, false);
    assert!(matches!(r, Ok(())), "{r:?}");
    assert_eq!(b, vec![0.1, 0.0, -0.1]);
    let r = update_bias(&mut b, &[0, 0, 0], 0.0, true);
    assert!(matches!(r, Ok(())), "{r:?}");
}

#[test]
fn update_bias_bad_bias() {
    assert_err!(update_bias(&mut [], &[], 0.1, false), Shape, "bias");
    assert_err!(update_bias(&mut [], &[1, 2], 0.1, true), Shape, "bias");
}

#[test]
fn update_bias_bad_counts() {
    for counts in [&[][..], &[1, 2][..], &[1, 2, 3, 4][..]] {
        let mut b = vec![0.5f32; 3];
        assert_err!(
            update_bias(&mut b, counts, 0.1, false),
            Shape,
            "counts",
            "{counts:?}"
        );
        assert_eq!(b, vec![0.5; 3], "bias untouched on error");
    }
}

#[test]
fn update_bias_bad_rate() {
    for rate in [-1e-3, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut b = vec![0.5f32; 2];
        assert_err!(
            update_bias(&mut b, &[1, 2], rate, false),
            InvalidArgument,
            "rate",
            "{rate}"
        );
        assert_eq!(b, vec![0.5; 2], "bias untouched on error");
    }
}

// ---------------------------------------------------------------------------------------------------
// plan

#[test]
fn plan_valid() {
    let r = plan(&[1, 0, 1, 0], 2, 2);
    assert!(
        matches!(&r, Ok((sorted, ..)) if sorted == &[1, 3, 0, 2]),
        "{r:?}"
    );
    // Out-of-range ids are left out, as the kernels do (not an error).
    let r = plan(&[-1, 7, i32::MIN, i32::MAX], 4, 1);
    assert!(
        matches!(&r, Ok((sorted, slot_row, ..)) if sorted.is_empty() && slot_row == &[-1; 4]),
        "{r:?}"
    );
}

#[test]
fn plan_bad_ids() {
    assert_err!(plan(&[], 4, 1), Shape, "ids");
}

#[test]
fn plan_bad_n_experts() {
    // 0, and so many that the per-expert table would be a huge allocation
    for e in [0, 1025, usize::MAX] {
        assert_err!(plan(&[0], e, 1), InvalidArgument, "n_experts", "{e}");
    }
}

#[test]
fn plan_bad_block_size() {
    // 0 used to divide by zero; huge ones overflow the padded rows or pass i32::MAX rows
    for bs in [0, usize::MAX, 1 << 40, (1 << 21) + 2] {
        assert_err!(
            plan(&[0, 1], 1024, bs),
            InvalidArgument,
            "block_size",
            "{bs}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------
// combine

#[test]
fn combine_valid() {
    let r = combine(&[1.0, 3.0], &[0.5, 0.25], &[0, 1], 1, 2, 1);
    assert!(matches!(&r, Ok(out) if out == &[0.5 + 0.75]), "{r:?}");
    // Negative rows (invalid ids) are skipped; an empty layout is fine when nothing is routed.
    let r = combine(&[], &[0.5, 0.25], &[-1, i32::MIN], 1, 2, 3);
    assert!(matches!(&r, Ok(out) if out == &[0.0; 3]), "{r:?}");
}

#[test]
fn combine_bad_expert_out() {
    // 5 elements are not rows of 2
    assert_err!(
        combine(&[0.0; 5], &[1.0], &[0], 1, 1, 2),
        Shape,
        "expert_out"
    );
}

#[test]
fn combine_bad_weights() {
    for len in [0, 1, 3] {
        let r = combine(&[0.0; 4], &vec![1.0; len], &[0, 1], 1, 2, 2);
        assert_err!(r, Shape, "weights", "{len}");
    }
}

#[test]
fn combine_bad_slot_row() {
    for len in [0, 1, 3] {
        let r = combine(&[0.0; 4], &[1.0, 1.0], &vec![0; len], 1, 2, 2);
        assert_err!(r, Shape, "slot_row", "{len}");
    }
    // n_tokens · k overflows: the expected length does not exist
    assert_err!(
        combine(&[0.0; 4], &[1.0], &[0], usize::MAX, 2, 2),
        Shape,
        "slot_row"
    );
    // A row past expert_out's 2 rows used to index out of bounds.
    for (bad, i, v) in [([1, 2], 1usize, 2i32), ([i32::MAX, 0], 0, i32::MAX)] {
        let r = combine(&[0.0; 4], &[1.0, 1.0], &bad, 1, 2, 2);
        assert!(
            matches!(r, Err(Error::OutOfRange { arg: "slot_row", index, value, .. })
                if index == i && value == v as i64),
            "{bad:?}: {r:?}"
        );
    }
}

#[test]
fn combine_bad_n_tokens() {
    assert_err!(
        combine(&[0.0; 2], &[1.0], &[0], 0, 1, 2),
        InvalidArgument,
        "n_tokens"
    );
}

#[test]
fn combine_bad_k() {
    assert_err!(
        combine(&[0.0; 2], &[1.0], &[0], 1, 0, 2),
        InvalidArgument,
        "k"
    );
}

#[test]
fn combine_bad_h() {
    assert_err!(
        combine(&[0.0; 2], &[1.0], &[0], 1, 1, 0),
        InvalidArgument,
        "h"
    );
    // Nothing routed, so expert_out is empty whatever h is: the n_tokens · h output overflows, or is
    // far too large to allocate (used to abort the process).
    let r = combine(&[], &[1.0, 1.0], &[-1, -1], 2, 1, usize::MAX);
    assert_err!(r, InvalidArgument, "h");
    assert_err!(
        combine(&[], &[1.0], &[-1], 1, 1, 1 << 62),
        InvalidArgument,
        "h"
    );
}

// ---------------------------------------------------------------------------------------------------
// ep_counts

#[test]
fn ep_counts_valid() {
    let r = ep_counts(&[0, 3, 1, 0], 2, 2, 2);
    assert!(
        matches!(&r, Ok((m, tpr)) if m == &[1, 1, 1, 0] && tpr == &[2, 1]),
        "{r:?}"
    );
    // Out-of-range ids are skipped, as the kernel does.
    let r = ep_counts(&[-1, 4, i32::MAX, 0], 2, 2, 2);
    assert!(
        matches!(&r, Ok((m, tpr)) if m == &[0, 0, 1, 0] && tpr == &[1, 0]),
        "{r:?}"
    );
}

#[test]
fn ep_counts_bad_ids() {
    // empty; 3 ids are not rows of 2 (the last one used to be dropped)
    for ids in [&[][..], &[0, 1, 2][..]] {
        assert_err!(ep_counts(ids, 2, 2, 2), Shape, "ids", "{ids:?}");
    }
}

#[test]
fn ep_counts_bad_k() {
    // used to divide by zero
    assert_err!(ep_counts(&[0, 1], 0, 2, 2), InvalidArgument, "k");
}

#[test]
fn ep_counts_bad_n_ranks() {
    for n in [0, 1025, usize::MAX] {
        assert_err!(
            ep_counts(&[0, 1], 2, n, 1),
            InvalidArgument,
            "n_ranks",
            "{n}"
        );
    }
}

#[test]
fn ep_counts_bad_experts_per_rank() {
    // 0; more than 1024 experts in all; a product that overflows (used to panic in debug builds)
    for epr in [0, 513, usize::MAX] {
        let r = ep_counts(&[0, 1], 2, 2, epr);
        assert_err!(r, InvalidArgument, "experts_per_rank", "{epr}");
    }
}

// ---------------------------------------------------------------------------------------------------
// SimConfig, SimTrace::tail_mean, skew, StepLogits

fn small(steps: usize) -> SimConfig {
    SimConfig {
        n_tokens: 64,
        ..SimConfig::paper_64x6(steps)
    }
}

#[test]
fn sim_config_constructors_are_valid() {
    for c in [
        SimConfig::paper_64x6(0),
        SimConfig::paper_64x6(usize::MAX),
        SimConfig::deepseek_v3(1),
    ] {
        assert_eq!(c.gate.validate(), Ok(()), "{c:?}");
    }
    assert_eq!(SimConfig::paper_64x6(300).validate(), Ok(()));
    assert_eq!(SimConfig::deepseek_v3(300).validate(), Ok(()));
}

/// Run configurations that are invalid, with the field named.
fn bad_sim_configs() -> Vec<(SimConfig, &'static str)> {
    let c = small(2);
    let mut v: Vec<(SimConfig, &'static str)> = bad_gate_configs()
        .into_iter()
        .map(|(gate, f)| (SimConfig { gate, ..c }, f))
        .collect();
    v.extend([
        (SimConfig { n_tokens: 0, ..c }, "n_tokens"),
        (
            SimConfig {
                n_tokens: i32::MAX as usize + 1,
                ..c
            },
            "n_tokens",
        ),
        (SimConfig { steps: 0, ..c }, "steps"),
        (SimConfig { rate: -1.0, ..c }, "rate"),
        (
            SimConfig {
                rate: f32::NAN,
                ..c
            },
            "rate",
        ),
        (SimConfig { skew: -0.5, ..c }, "skew"),
        (
            SimConfig {
                skew: f64::INFINITY,
                ..c
            },
            "skew",
        ),
    ]);
    v
}

#[test]
fn sim_config_validate_names_the_field() {
    assert_eq!(small(2).validate(), Ok(()));
    for (c, field) in bad_sim_configs() {
        assert_err!(c.validate(), InvalidArgument, field, "{c:?}");
    }
}

fn trace(maxvio: Vec<f64>) -> SimTrace {
    SimTrace {
        maxvio,
        bias: vec![],
        weights_unbiased: true,
    }
}

#[test]
fn tail_mean_valid() {
    let t = trace(vec![1.0, 0.2, 0.1]);
    assert!(matches!(t.tail_mean(2), Ok(m) if (m - 0.15).abs() < 1e-12));
    // n past the trace: the whole trace
    assert!(matches!(t.tail_mean(usize::MAX), Ok(m) if (m - 1.3 / 3.0).abs() < 1e-12));
}

#[test]
fn tail_mean_bad_n() {
    assert_err!(trace(vec![1.0]).tail_mean(0), InvalidArgument, "n");
}

#[test]
fn tail_mean_bad_maxvio() {
    // An empty trace used to underflow `len - 1`.
    assert_err!(trace(vec![]).tail_mean(20), Shape, "maxvio");
}

#[test]
fn skew_valid() {
    let r = skew(&small(1));
    assert!(matches!(&r, Ok(s) if s.len() == 64), "{r:?}");
    // skew reads only the gate, the skew and the seed: other fields may be anything.
    let r = skew(&SimConfig {
        n_tokens: 0,
        steps: 0,
        rate: f32::NAN,
        skew: 0.0,
        ..small(1)
    });
    assert!(matches!(&r, Ok(s) if s.iter().all(|&x| x == 0.0)), "{r:?}");
}

#[test]
fn skew_bad_cfg() {
    // n_tokens, steps and rate are not read by skew (skew_valid passes bad ones).
    for (c, field) in bad_sim_configs()
        .into_iter()
        .filter(|(_, f)| !matches!(*f, "n_tokens" | "steps" | "rate"))
    {
        assert_err!(skew(&c), InvalidArgument, field, "{c:?}");
    }
}

#[test]
fn step_logits_valid() {
    let r = StepLogits::new(&SimConfig {
        n_tokens: 4,
        steps: 0,
        rate: f32::NAN,
        ..small(1)
    });
    assert!(
        matches!(&r, Ok(l) if l.step(0).len() == 4 * 64 && l.step(usize::MAX).len() == 4 * 64),
        "{r:?}"
    );
}

#[test]
fn step_logits_bad_cfg() {
    // steps and rate are not read by StepLogits (step_logits_valid passes bad ones); n_tokens = 0 used
    // to divide by zero in step().
    for (c, field) in bad_sim_configs()
        .into_iter()
        .filter(|(_, f)| !matches!(*f, "steps" | "rate"))
    {
        assert_err!(StepLogits::new(&c), InvalidArgument, field, "{c:?}");
    }
}

// ---------------------------------------------------------------------------------------------------
// weights_are_unbiased

/// Logits of 2 tokens over `cfg4()`, and the gate's ids and weights for them.
fn gated() -> (Vec<f32>, Vec<i32>, Vec<f32>) {
    let logits = vec![0.1f32, 0.9, -0.3, 0.4, 1.0, -1.0, 0.5, 0.0];
    let (ids, w, _) = gate(&logits, 2, Some(&[5.0, 0.0, 0.0, 0.0]), &cfg4()).unwrap();
    (logits, ids, w)
}

#[test]
fn weights_are_unbiased_valid() {
    let (logits, ids, w) = gated();
    let r = weights_are_unbiased(&logits, &ids, &w, &cfg4());
    assert!(matches!(r, Ok(true)), "{r:?}");
    let mut w2 = w.clone();
    w2[1] += 1.0;
    let r = weights_are_unbiased(&logits, &ids, &w2, &cfg4());
    assert!(matches!(r, Ok(false)), "{r:?}");
}

#[test]
fn weights_are_unbiased_bad_cfg() {
    let (logits, ids, w) = gated();
    for (c, field) in bad_gate_configs() {
        let r = weights_are_unbiased(&logits, &ids, &w, &c);
        assert_err!(r, InvalidArgument, field, "{c:?}");
    }
}

#[test]
fn weights_are_unbiased_bad_logits() {
    let (logits, ids, w) = gated();
    // empty; not rows of E = 4 (used to slice out of bounds)
    for l in [&[][..], &logits[..7]] {
        let r = weights_are_unbiased(l, &ids, &w, &cfg4());
        assert_err!(r, Shape, "logits", "{}", l.len());
    }
}

#[test]
fn weights_are_unbiased_bad_ids() {
    let (logits, ids, w) = gated();
    // not T·K = 4 ids (short used to drop a token; odd used to divide unevenly)
    for l in [&ids[..2], &ids[..3], &[0, 1, 2, 3, 0, 1][..]] {
        assert_err!(
            weights_are_unbiased(&logits, l, &w, &cfg4()),
            Shape,
            "ids",
            "{l:?}"
        );
    }
    // an id outside [0, E) used to index out of bounds
    for (i, v) in [(0usize, -1i32), (3, 4), (2, i32::MAX), (1, i32::MIN)] {
        let mut bad = ids.clone();
        bad[i] = v;
        let r = weights_are_unbiased(&logits, &bad, &w, &cfg4());
        assert!(
            matches!(r, Err(Error::OutOfRange { arg: "ids", index, value, .. })
                if index == i && value == v as i64),
            "{bad:?}: {r:?}"
        );
    }
}

#[test]
fn weights_are_unbiased_bad_weights() {
    let (logits, ids, w) = gated();
    for l in [&w[..3], &[0.5f32; 5][..], &[][..]] {
        let r = weights_are_unbiased(&logits, &ids, l, &cfg4());
        assert_err!(r, Shape, "weights", "{l:?}");
    }
}

// ---------------------------------------------------------------------------------------------------
// simulate_cpu, simulate_device

#[test]
fn simulate_cpu_valid() {
    let r = simulate_cpu(&small(2));
    assert!(
        matches!(&r, Ok(t) if t.maxvio.len() == 2 && t.bias.len() == 64 && t.weights_unbiased),
        "{r:?}"
    );
}

/// A trace of usize::MAX steps: it cannot be allocated (used to abort in `Vec::with_capacity`).
fn endless() -> SimConfig {
    SimConfig {
        n_tokens: 1,
        steps: usize::MAX,
        ..small(1)
    }
}

#[test]
fn simulate_cpu_bad_cfg() {
    for (c, field) in bad_sim_configs() {
        assert_err!(simulate_cpu(&c), InvalidArgument, field, "{c:?}");
    }
    assert_err!(simulate_cpu(&endless()), InvalidArgument, "steps");
}

#[test]
fn simulate_device_bad_cfg_is_checked_on_the_host() {
    let dev = fusekit::emu::Emulator::new().unwrap();
    for (c, field) in bad_sim_configs() {
        assert_err!(simulate_device(&dev, &c), InvalidArgument, field, "{c:?}");
    }
    assert_err!(simulate_device(&dev, &endless()), InvalidArgument, "steps");
}

#[test]
fn simulate_device_valid() {
    let dev = fusekit::emu::Emulator::new().unwrap();
    let cfg = SimConfig {
        n_tokens: 32,
        ..small(2)
    };
    let r = simulate_device(&dev, &cfg);
    let cpu = simulate_cpu(&cfg);
    assert!(
        matches!((&r, &cpu), (Ok(d), Ok(c)) if d.bias == c.bias && d.weights_unbiased),
        "{r:?} vs {cpu:?}"
    );
}
