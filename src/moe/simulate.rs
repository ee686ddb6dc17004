//! The balance demonstration: a synthetic router with a persistent per-expert skew, run for a few hundred
//! steps with and without the bias update. On the CPU through the reference (always available), and on
//! the GPU through the kernels.

use super::{reference, GateConfig, UpdateRule};
use crate::testing::Rng;

/// A demonstration run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SimConfig {
    /// The gate.
    pub gate: GateConfig,
    /// Tokens per step (fresh every step).
    pub n_tokens: usize,
    /// Steps.
    pub steps: usize,
    /// Bias update rate u (0: no update, the baseline).
    pub rate: f32,
    /// Update rule.
    pub rule: UpdateRule,
    /// Standard deviation of the persistent per-expert logit skew.
    pub skew: f64,
    /// Seed of the skew and the tokens.
    pub seed: u64,
}

impl SimConfig {
    /// The paper's setting: 64 experts, top-6; 16384 tokens a step (sampling noise alone gives MaxVio
    /// ≈ 0.06 at this size), u = 1e-3, sign rule.
    ///
    /// ```
    /// let c = fusekit::moe::simulate::SimConfig::paper_64x6(300);
    /// assert_eq!((c.gate.n_experts, c.gate.top_k, c.steps), (64, 6, 300));
    /// ```
    pub fn paper_64x6(steps: usize) -> Self {
        SimConfig {
            gate: GateConfig::default(),
            n_tokens: 16384,
            steps,
            rate: 1e-3,
            rule: UpdateRule::Sign,
            skew: 0.5,
            seed: 1,
        }
    }

    /// DeepSeek-V3 routing: 256 experts, top-8, 8 groups / 4 kept; 65536 tokens a step (at 16384 the
    /// sampling noise of 256 experts alone is MaxVio ≈ 0.12), u = 1e-3.
    ///
    /// ```
    /// let c = fusekit::moe::simulate::SimConfig::deepseek_v3(300);
    /// assert_eq!((c.gate.n_experts, c.gate.n_group), (256, 8));
    /// ```
    pub fn deepseek_v3(steps: usize) -> Self {
        SimConfig {
            gate: GateConfig::deepseek_v3(),
            n_tokens: 65536,
            ..Self::paper_64x6(steps)
        }
    }
}

/// What a run shows.
#[derive(Clone, Debug, PartialEq)]
pub struct SimTrace {
    /// MaxVio_batch of every step.
    pub maxvio: Vec<f64>,
    /// The bias at the end.
    pub bias: Vec<f32>,
    /// Every step's gate weights equalled, bit for bit, the weights recomputed from the unbiased scores
    /// of the chosen experts (the bias never reached them).
    pub weights_unbiased: bool,
}

impl SimTrace {
    /// Mean MaxVio over the last `n` steps.
    ///
    /// ```
    /// let t = fusekit::moe::simulate::SimTrace { maxvio: vec![1.0, 0.2, 0.1], bias: vec![], weights_unbiased: true };
    /// assert!((t.tail_mean(2) - 0.15).abs() < 1e-12);
    /// ```
    pub fn tail_mean(&self, n: usize) -> f64 {
        let n = n.min(self.maxvio.len()).max(1);
        self.maxvio[self.maxvio.len() - n..].iter().sum::<f64>() / n as f64
    }
}

/// The persistent per-expert skew.
///
/// ```
/// let c = fusekit::moe::simulate::SimConfig::paper_64x6(1);
/// assert_eq!(fusekit::moe::simulate::skew(&c).len(), 64);
/// ```
pub fn skew(cfg: &SimConfig) -> Vec<f32> {
    let mut rng = Rng::new(cfg.seed);
    (0..cfg.gate.n_experts)
        .map(|_| (cfg.skew * rng.normal()) as f32)
        .collect()
}

/// Noise blocks the steps draw their tokens from: generating T·E fresh normals every step would make the
/// host, not the router, the cost of a run (65536 × 256 per step).
const NOISE_BLOCKS: usize = 8;

/// The router logits of every step: the skew plus N(0, 1) noise per token and expert. Step s takes noise
/// block s mod 8, its tokens rotated by a step-dependent offset, so consecutive batches hold different
/// token mixes while the pool is generated once.
#[derive(Clone, Debug)]
pub struct StepLogits {
    skew: Vec<f32>,
    noise: Vec<Vec<f32>>,
    n_tokens: usize,
    n_experts: usize,
    seed: u64,
}

impl StepLogits {
    /// The skew and the noise pool of `cfg`.
    ///
    /// ```
    /// use fusekit::moe::simulate::{SimConfig, StepLogits};
    /// let c = SimConfig { n_tokens: 4, ..SimConfig::paper_64x6(1) };
    /// assert_eq!(StepLogits::new(&c).step(0).len(), 4 * 64);
    /// ```
    pub fn new(cfg: &SimConfig) -> Self {
        let (t, e) = (cfg.n_tokens, cfg.gate.n_experts);
        let noise = (0..NOISE_BLOCKS)
            .map(|b| {
                let mut rng = Rng::new(cfg.seed ^ (0x9e37_79b9 * (b as u64 + 1)));
                (0..t * e).map(|_| rng.normal() as f32).collect()
            })
            .collect();
        StepLogits {
            skew: skew(cfg),
            noise,
            n_tokens: t,
            n_experts: e,
            seed: cfg.seed,
        }
    }

    /// Logits `[T, E]` of step `step`.
    ///
    /// ```
    /// use fusekit::moe::simulate::{SimConfig, StepLogits};
    /// let c = SimConfig { n_tokens: 8, ..SimConfig::paper_64x6(1) };
    /// let l = StepLogits::new(&c);
    /// assert_ne!(l.step(0), l.step(1));
    /// ```
    pub fn step(&self, step: usize) -> Vec<f32> {
        let (t, e) = (self.n_tokens, self.n_experts);
        let block = &self.noise[step % NOISE_BLOCKS];
        let shift = (Rng::new(self.seed ^ step as u64).next_u64() % t as u64) as usize;
        let mut out = Vec::with_capacity(t * e);
        for i in 0..t {
            let src = (i + shift) % t;
            out.extend(
                block[src * e..(src + 1) * e]
                    .iter()
                    .zip(&self.skew)
                    .map(|(n, s)| s + n),
            );
        }
        out
    }
}

/// Checks that `weights` are exactly the unbiased, renormalised, scaled scores of `ids`.
///
/// ```
/// use fusekit::moe::{reference, simulate::weights_are_unbiased, GateConfig};
/// let cfg = GateConfig { n_experts: 4, top_k: 2, ..GateConfig::default() };
/// let logits = [0.1f32, 0.9, -0.3, 0.4];
/// let (ids, w, _) = reference::gate(&logits, 1, Some(&[5.0, 0.0, 0.0, 0.0]), &cfg);
/// assert!(weights_are_unbiased(&logits, &ids, &w, &cfg));
/// ```
pub fn weights_are_unbiased(
    logits: &[f32],
    ids: &[i32],
    weights: &[f32],
    cfg: &GateConfig,
) -> bool {
    let (e, k) = (cfg.n_experts, cfg.top_k);
    for t in 0..ids.len() / k {
        let s = reference::scores(&logits[t * e..(t + 1) * e], cfg.scoring);
        let mut w: Vec<f32> = ids[t * k..(t + 1) * k]
            .iter()
            .map(|&i| s[i as usize])
            .collect();
        if cfg.renormalize {
            let mut sum = 0.0f32;
            for &x in &w {
                sum += x;
            }
            if sum != 0.0 {
                w.iter_mut().for_each(|x| *x /= sum);
            }
        }
        w.iter_mut().for_each(|x| *x *= cfg.scaling);
        if w.iter()
            .zip(&weights[t * k..(t + 1) * k])
            .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            return false;
        }
    }
    true
}

/// The demonstration on the CPU reference.
///
/// ```
/// use fusekit::moe::simulate::{simulate_cpu, SimConfig};
/// let cfg = SimConfig { n_tokens: 256, ..SimConfig::paper_64x6(3) };
/// assert_eq!(simulate_cpu(&cfg).maxvio.len(), 3);
/// ```
pub fn simulate_cpu(cfg: &SimConfig) -> SimTrace {
    let logits_of = StepLogits::new(cfg);
    let mut bias = vec![0.0f32; cfg.gate.n_experts];
    let mut maxvio = Vec::with_capacity(cfg.steps);
    let mut unbiased = true;
    for step in 0..cfg.steps {
        let logits = logits_of.step(step);
        let (ids, w, counts) = reference::gate(&logits, cfg.n_tokens, Some(&bias), &cfg.gate);
        if step % 50 == 0 {
            unbiased &= weights_are_unbiased(&logits, &ids, &w, &cfg.gate);
        }
        maxvio.push(reference::max_vio(&counts));
        if cfg.rate > 0.0 {
            reference::update_bias(
                &mut bias,
                &counts,
                cfg.rate,
                cfg.rule == UpdateRule::Proportional,
            );
        }
    }
    SimTrace {
        maxvio,
        bias,
        weights_unbiased: unbiased,
    }
}

/// The demonstration on a device (a GPU, or the emulator at small sizes): the fused gate, the device
/// bias update and the device MaxVio, with the unbiased-weights check done against the reference on
/// every 50th step.
///
/// ```
/// use fusekit::moe::simulate::{simulate_device, SimConfig};
/// let dev = fusekit::emu::Emulator::new().unwrap(); // or fusekit::Gpu::new(0)
/// let cfg = SimConfig { n_tokens: 256, ..SimConfig::paper_64x6(3) };
/// let trace = simulate_device(&dev, &cfg).unwrap();
/// assert_eq!(trace.maxvio.len(), 3);
/// ```
pub fn simulate_device<B: crate::Backend>(dev: &B, cfg: &SimConfig) -> crate::Result<SimTrace> {
    let logits_of = StepLogits::new(cfg);
    let (e, k, t) = (cfg.gate.n_experts, cfg.gate.top_k, cfg.n_tokens);
    let mut state = super::BalanceState::new(dev, e, 0)?;
    let mut ids = dev.alloc_zeros::<i32>(t * k)?;
    let mut w = dev.alloc_zeros::<f32>(t * k)?;
    let mut logits_d = dev.alloc_zeros::<f32>(t * e)?;
    let mut maxvio = Vec::with_capacity(cfg.steps);
    let mut unbiased = true;
    for step in 0..cfg.steps {
        let logits = logits_of.step(step);
        dev.write(&logits, &mut logits_d)?;
        super::gate(
            dev,
            &cfg.gate,
            t,
            &logits_d,
            Some(&state.bias),
            &mut ids,
            &mut w,
            &mut state.counts,
            false,
        )?;
        if step % 50 == 0 {
            let ih = dev.download(&ids)?;
            let wh = dev.download(&w)?;
            unbiased &= weights_are_unbiased(&logits, &ih, &wh, &cfg.gate);
        }
        state.update(dev, cfg.rate, cfg.rule, true)?;
        maxvio.push(state.maxvio_batch_sync(dev)? as f64);
    }
    Ok(SimTrace {
        maxvio,
        bias: state.bias_sync(dev)?,
        weights_unbiased: unbiased,
    })
}
