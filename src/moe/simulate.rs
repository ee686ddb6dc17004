//! The balance demonstration: a synthetic router with a persistent per-expert skew, run for a few hundred
//! steps with and without the bias update. On the CPU through the reference (always available), and on
//! the GPU through the kernels.
//!
//! # Errors
//! A run's configuration is checked first ([`SimConfig::validate`]); every error names the field at fault.

use super::{reference, GateConfig, UpdateRule};
use crate::error::{Error, Result};
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

    /// Checks the run: the gate ([`GateConfig::validate`]), `n_tokens` in `1..=i32::MAX` with a noise pool
    /// of `8 · n_tokens · n_experts` logits below 2^64, `steps` >= 1, `rate` finite and >= 0, `skew` finite
    /// and >= 0. Every error is [`Error::InvalidArgument`] naming the field (the gate's own field for
    /// the gate).
    ///
    /// ```
    /// use fusekit::moe::simulate::SimConfig;
    /// assert!(SimConfig::deepseek_v3(300).validate().is_ok());
    /// let bad = SimConfig { steps: 0, ..SimConfig::paper_64x6(300) };
    /// assert!(matches!(
    ///     bad.validate(),
    ///     Err(fusekit::Error::InvalidArgument { arg: "steps", .. })
    /// ));
    /// ```
    pub fn validate(&self) -> Result<()> {
        self.validate_logits()?;
        if self.steps == 0 {
            return Err(Error::invalid("steps", "must be >= 1, got 0"));
        }
        if !self.rate.is_finite() || self.rate < 0.0 {
            return Err(Error::invalid(
                "rate",
                format!("must be finite and >= 0, got {}", self.rate),
            ));
        }
        Ok(())
    }

    /// What [`skew`] needs: the gate and the skew.
    fn validate_skew(&self) -> Result<()> {
        self.gate.validate()?;
        if !self.skew.is_finite() || self.skew < 0.0 {
            return Err(Error::invalid(
                "skew",
                format!(
                    "a standard deviation: must be finite and >= 0, got {}",
                    self.skew
                ),
            ));
        }
        Ok(())
    }

    /// What [`StepLogits::new`] needs: the skew's fields and the tokens.
    fn validate_logits(&self) -> Result<()> {
        self.validate_skew()?;
        reference::check_tokens("n_tokens", self.n_tokens)?;
        self.n_tokens
            .checked_mul(self.gate.n_experts)
            .and_then(|te| te.checked_mul(NOISE_BLOCKS))
            .ok_or_else(|| {
                Error::invalid(
                    "n_tokens",
                    format!(
                        "a noise pool of {NOISE_BLOCKS} x {} tokens x {} experts overflows",
                        self.n_tokens, self.gate.n_experts
                    ),
                )
            })?;
        Ok(())
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
    /// Mean MaxVio over the last `n` steps (all of them when the trace is shorter).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for `n` of 0; [`Error::Shape`] (named `maxvio`) for a trace without
    /// steps.
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// use fusekit::moe::simulate::SimTrace;
    /// let t = SimTrace { maxvio: vec![1.0, 0.2, 0.1], bias: vec![], weights_unbiased: true };
    /// assert!((t.tail_mean(2)? - 0.15).abs() < 1e-12);
    /// assert!(matches!(t.tail_mean(0), Err(fusekit::Error::InvalidArgument { arg: "n", .. })));
    /// # Ok(()) }
    /// ```
    pub fn tail_mean(&self, n: usize) -> Result<f64> {
        if n == 0 {
            return Err(Error::invalid("n", "must be >= 1 step, got 0"));
        }
        if self.maxvio.is_empty() {
            return Err(Error::shape(
                "maxvio",
                "at least one step",
                "an empty trace",
            ));
        }
        let n = n.min(self.maxvio.len());
        Ok(self.maxvio[self.maxvio.len() - n..].iter().sum::<f64>() / n as f64)
    }
}

/// The persistent per-expert skew.
///
/// # Errors
/// [`GateConfig::validate`]'s errors for `cfg.gate`; [`Error::InvalidArgument`] for `cfg.skew` not
/// finite or negative.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::moe::simulate::{skew, SimConfig};
/// let c = SimConfig::paper_64x6(1);
/// assert_eq!(skew(&c)?.len(), 64);
/// let bad = SimConfig { skew: f64::NAN, ..c };
/// assert!(matches!(skew(&bad), Err(fusekit::Error::InvalidArgument { arg: "skew", .. })));
/// # Ok(()) }
/// ```
pub fn skew(cfg: &SimConfig) -> Result<Vec<f32>> {
    cfg.validate_skew()?;
    let mut rng = Rng::new(cfg.seed);
    Ok((0..cfg.gate.n_experts)
        .map(|_| (cfg.skew * rng.normal()) as f32)
        .collect())
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
    /// The skew and the noise pool of `cfg` (`steps` and `rate` are not used).
    ///
    /// # Errors
    /// [`skew`]'s errors; [`Error::InvalidArgument`] for `cfg.n_tokens` outside `1..=i32::MAX` or a
    /// noise pool the host cannot allocate (named `n_tokens`).
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// use fusekit::moe::simulate::{SimConfig, StepLogits};
    /// let c = SimConfig { n_tokens: 4, ..SimConfig::paper_64x6(1) };
    /// assert_eq!(StepLogits::new(&c)?.step(0).len(), 4 * 64);
    /// let empty = SimConfig { n_tokens: 0, ..c };
    /// assert!(matches!(
    ///     StepLogits::new(&empty),
    ///     Err(fusekit::Error::InvalidArgument { arg: "n_tokens", .. })
    /// ));
    /// # Ok(()) }
    /// ```
    pub fn new(cfg: &SimConfig) -> Result<Self> {
        cfg.validate_logits()?;
        let (t, e) = (cfg.n_tokens, cfg.gate.n_experts);
        let mut noise = Vec::with_capacity(NOISE_BLOCKS);
        for b in 0..NOISE_BLOCKS {
            let mut rng = Rng::new(cfg.seed ^ (0x9e37_79b9 * (b as u64 + 1)));
            // t·e does not overflow (validated); the pool may still be too large for the host.
            let mut block = reference::try_with_capacity(t * e, "n_tokens")?;
            block.extend((0..t * e).map(|_| rng.normal() as f32));
            noise.push(block);
        }
        Ok(StepLogits {
            skew: skew(cfg)?,
            noise,
            n_tokens: t,
            n_experts: e,
            seed: cfg.seed,
        })
    }

    /// Logits `[T, E]` of step `step`, any step (total: [`StepLogits::new`] checked the sizes).
    ///
    /// ```
    /// # fn main() -> fusekit::Result<()> {
    /// use fusekit::moe::simulate::{SimConfig, StepLogits};
    /// let c = SimConfig { n_tokens: 8, ..SimConfig::paper_64x6(1) };
    /// let l = StepLogits::new(&c)?;
    /// assert_ne!(l.step(0), l.step(1));
    /// assert_eq!(l.step(usize::MAX).len(), 8 * 64);
    /// # Ok(()) }
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

/// Checks that `weights` are exactly the unbiased, renormalised, scaled scores of `ids`: logits `[T, E]`,
/// ids and weights `[T, K]`.
///
/// # Errors
/// [`GateConfig::validate`]'s errors for `cfg`; [`Error::Shape`] for `logits` empty or not a whole
/// number of rows of E, and for `ids` or `weights` not of length `T · K`; [`Error::OutOfRange`] for an
/// id outside `[0, E)`.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::moe::{reference, simulate::weights_are_unbiased, GateConfig};
/// let cfg = GateConfig { n_experts: 4, top_k: 2, ..GateConfig::default() };
/// let logits = [0.1f32, 0.9, -0.3, 0.4];
/// let (ids, w, _) = reference::gate(&logits, 1, Some(&[5.0, 0.0, 0.0, 0.0]), &cfg)?;
/// assert!(weights_are_unbiased(&logits, &ids, &w, &cfg)?);
/// assert!(matches!(
///     weights_are_unbiased(&logits, &[0, 4], &w, &cfg),
///     Err(fusekit::Error::OutOfRange { arg: "ids", index: 1, value: 4, .. })
/// ));
/// # Ok(()) }
/// ```
pub fn weights_are_unbiased(
    logits: &[f32],
    ids: &[i32],
    weights: &[f32],
    cfg: &GateConfig,
) -> Result<bool> {
    cfg.validate()?;
    let (e, k) = (cfg.n_experts, cfg.top_k);
    let n_tokens = reference::rows_of("logits", logits.len(), e, "E")?;
    // K <= E (validated): T·K <= T·E, the length of `logits`.
    crate::validate::exactly("ids", ids.len(), n_tokens * k, "[T, K], T from logits")?;
    crate::validate::exactly(
        "weights",
        weights.len(),
        n_tokens * k,
        "[T, K], T from logits",
    )?;
    if let Some(i) = ids.iter().position(|&i| i < 0 || i as usize >= e) {
        return Err(Error::OutOfRange {
            arg: "ids",
            index: i,
            value: ids[i] as i64,
            allowed: format!("[0, {e}) (n_experts)"),
        });
    }
    for t in 0..n_tokens {
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
            return Ok(false);
        }
    }
    Ok(true)
}

/// The demonstration on the CPU reference.
///
/// # Errors
/// [`SimConfig::validate`]'s errors; [`Error::InvalidArgument`] naming `n_tokens` or `steps` when the
/// noise pool or the trace cannot be allocated on the host.
///
/// ```
/// # fn main() -> fusekit::Result<()> {
/// use fusekit::moe::simulate::{simulate_cpu, SimConfig};
/// let cfg = SimConfig { n_tokens: 256, ..SimConfig::paper_64x6(3) };
/// assert_eq!(simulate_cpu(&cfg)?.maxvio.len(), 3);
/// let bad = SimConfig { rate: -1e-3, ..cfg };
/// assert!(matches!(simulate_cpu(&bad), Err(fusekit::Error::InvalidArgument { arg: "rate", .. })));
/// # Ok(()) }
/// ```
pub fn simulate_cpu(cfg: &SimConfig) -> Result<SimTrace> {
    cfg.validate()?;
    let logits_of = StepLogits::new(cfg)?;
    let mut bias = vec![0.0f32; cfg.gate.n_experts];
    let mut maxvio = reference::try_with_capacity(cfg.steps, "steps")?;
    let mut unbiased = true;
    for step in 0..cfg.steps {
        let logits = logits_of.step(step);
        let (ids, w, counts) = reference::gate(&logits, cfg.n_tokens, Some(&bias), &cfg.gate)?;
        if step % 50 == 0 {
            unbiased &= weights_are_unbiased(&logits, &ids, &w, &cfg.gate)?;
        }
        maxvio.push(reference::max_vio(&counts));
        if cfg.rate > 0.0 {
            reference::update_bias(
                &mut bias,
                &counts,
                cfg.rate,
                cfg.rule == UpdateRule::Proportional,
            )?;
        }
    }
    Ok(SimTrace {
        maxvio,
        bias,
        weights_unbiased: unbiased,
    })
}

/// The demonstration on a device (a GPU, or the emulator at small sizes): the fused gate, the device
/// bias update and the device MaxVio, with the unbiased-weights check done against the reference on
/// every 50th step.
///
/// # Errors
/// [`SimConfig::validate`]'s errors, checked before anything reaches the device; the host allocation
/// errors of [`simulate_cpu`]; then the device's errors.
///
/// ```
/// use fusekit::moe::simulate::{simulate_device, SimConfig};
/// let dev = fusekit::emu::Emulator::new().unwrap(); // or fusekit::Gpu::new(0)
/// let cfg = SimConfig { n_tokens: 256, ..SimConfig::paper_64x6(3) };
/// let trace = simulate_device(&dev, &cfg).unwrap();
/// assert_eq!(trace.maxvio.len(), 3);
/// let bad = SimConfig { steps: 0, ..cfg };
/// assert!(matches!(
///     simulate_device(&dev, &bad),
///     Err(fusekit::Error::InvalidArgument { arg: "steps", .. })
/// ));
/// ```
pub fn simulate_device<B: crate::Backend>(dev: &B, cfg: &SimConfig) -> Result<SimTrace> {
    cfg.validate()?;
    let logits_of = StepLogits::new(cfg)?;
    // T·K <= T·E, which does not overflow (validated).
    let (e, k, t) = (cfg.gate.n_experts, cfg.gate.top_k, cfg.n_tokens);
    let mut state = super::BalanceState::new(dev, e, 0)?;
    let mut ids = dev.alloc_zeros::<i32>(t * k)?;
    let mut w = dev.alloc_zeros::<f32>(t * k)?;
    let mut logits_d = dev.alloc_zeros::<f32>(t * e)?;
    let mut maxvio = reference::try_with_capacity(cfg.steps, "steps")?;
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
            unbiased &= weights_are_unbiased(&logits, &ih, &wh, &cfg.gate)?;
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
