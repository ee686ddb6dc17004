//! Verification harness shared by the tests, the benchmarks and `fusekit check`: the GPU-or-skip decision,
//! seeded random inputs with realistic distributions, output poisoning, and comparison against an f64 CPU
//! reference in which NaN never passes.

use std::fmt;

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::{Backend, Gpu};

/// Environment variable that turns a GPU test's skip into a failure.
pub const REQUIRE_GPU_ENV: &str = "FUSEKIT_REQUIRE_GPU";
/// Environment variable that replays a seed.
pub const SEED_ENV: &str = "FUSEKIT_SEED";

/// True when `FUSEKIT_REQUIRE_GPU=1`.
///
/// ```
/// let strict = fusekit::testing::gpu_required();
/// # let _ = strict;
/// ```
pub fn gpu_required() -> bool {
    std::env::var(REQUIRE_GPU_ENV).is_ok_and(|v| v.trim() == "1")
}

/// The decision behind [`gpu_or_skip`], as a pure function: `Ok(Some(gpu))` to run, `Ok(None)` to skip
/// (the skip line is printed), `Err(message)` to fail the test.
///
/// ```
/// use fusekit::{testing::decide, Error};
/// let none = || Err(Error::NoDevice { reason: "no libcuda".into() });
/// assert!(decide("t", none(), false).unwrap().is_none()); // prints "SKIP (no CUDA device): t"
/// assert!(decide("t", none(), true).is_err());            // FUSEKIT_REQUIRE_GPU=1: a failure
/// ```
pub fn decide(name: &str, gpu: Result<Gpu>, require: bool) -> Result<Option<Gpu>, String> {
    match gpu {
        Ok(g) => Ok(Some(g)),
        Err(Error::NoDevice { reason }) if !require => {
            // Straight to the stderr handle, not eprintln!: the test harness captures the macros' output
            // of passing tests, and a skip must stay visible in every test log.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "SKIP (no CUDA device): {name} ({reason})"
            );
            Ok(None)
        }
        Err(e @ Error::NoDevice { .. }) => Err(format!(
            "{name}: {REQUIRE_GPU_ENV}=1 but no GPU is usable: {e}"
        )),
        Err(e) => Err(format!("{name}: the GPU could not be opened: {e}")),
    }
}

/// Opens GPU 0 for a test, or prints `SKIP (no CUDA device): <name>` and returns `None`. Under
/// `FUSEKIT_REQUIRE_GPU=1` a missing GPU panics instead, failing the test. Any other error opening the
/// GPU always fails.
///
/// ```
/// let Some(gpu) = fusekit::testing::gpu_or_skip("doc_example") else { return };
/// println!("{}", gpu.props());
/// ```
pub fn gpu_or_skip(name: &str) -> Option<Gpu> {
    match decide(name, Gpu::new(0), gpu_required()) {
        Ok(g) => g,
        Err(msg) => panic!("{msg}"),
    }
}

/// Environment variable naming the backends the kernel tests run on: `emu`, `gpu` or `emu,gpu` (the
/// default: the emulator always, the GPU when one is present). The GPU suite sets `gpu`.
pub const BACKENDS_ENV: &str = "FUSEKIT_BACKENDS";
/// Environment variable that lets the emulator run the sizes a GPU test runs but CI cannot afford
/// (multi-gigabyte buffers, hundreds of LLM-vocabulary rows).
pub const EMU_LARGE_ENV: &str = "FUSEKIT_EMU_LARGE";

fn backend_enabled(which: &str) -> bool {
    match std::env::var(BACKENDS_ENV) {
        Ok(v) => v.split(',').any(|b| b.trim() == which),
        Err(_) => true,
    }
}

/// The emulator for a kernel test (options from the environment: schedule, sanitizer), or `None` when
/// `FUSEKIT_BACKENDS` leaves it out. A build without the emulator fails the test with the reason.
///
/// ```
/// if let Some(dev) = fusekit::testing::emulator_for("doc_example") {
///     println!("{:?}", dev.options());
/// }
/// ```
pub fn emulator_for(name: &str) -> Option<crate::emu::Emulator> {
    if !backend_enabled("emu") {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIP (emulator, {BACKENDS_ENV}): {name}"
        );
        return None;
    }
    let dev = crate::emu::Emulator::new().unwrap_or_else(|e| panic!("{name}: {e}"));
    if let Err(e) = dev.check_available() {
        panic!("{name}: the emulator cannot run here: {e}");
    }
    Some(dev)
}

/// GPU 0 for the GPU half of a kernel test: like [`gpu_or_skip`], and `None` when `FUSEKIT_BACKENDS`
/// leaves the GPU out.
///
/// ```
/// if let Some(gpu) = fusekit::testing::gpu_for("doc_example") { println!("{}", gpu.props()); }
/// ```
pub fn gpu_for(name: &str) -> Option<Gpu> {
    if !backend_enabled("gpu") {
        return None;
    }
    gpu_or_skip(name)
}

/// True when the emulator should also run the large sizes (`FUSEKIT_EMU_LARGE=1`).
///
/// ```
/// let _ = fusekit::testing::emu_large();
/// ```
pub fn emu_large() -> bool {
    std::env::var(EMU_LARGE_ENV).is_ok_and(|v| v.trim() == "1")
}

/// Runs a kernel test's body on every backend: the SIMT emulator, then GPU 0 when one is present
/// ([`emulator_for`], [`gpu_for`]). The body sees `$dev: &impl Backend` and is compiled once per
/// backend.
///
/// ```
/// use fusekit::Backend;
/// fusekit::on_every_backend!("doc_example", |dev| {
///     let b = dev.upload(&[1u8, 2]).unwrap();
///     assert_eq!(dev.download(&b).unwrap(), vec![1, 2]);
/// });
/// ```
#[macro_export]
macro_rules! on_every_backend {
    ($name:expr, |$dev:ident| $body:expr) => {{
        if let Some(emu) = $crate::testing::emulator_for($name) {
            let $dev = &emu;
            $body;
        }
        if let Some(gpu) = $crate::testing::gpu_for($name) {
            let $dev = &gpu;
            $body;
        }
    }};
}

/// The seed for a test: `FUSEKIT_SEED` if set, else fresh from the clock. Printed either way, so a
/// failing test's captured output shows how to replay it.
///
/// ```
/// let seed = fusekit::testing::seed_for("doc_example");
/// let mut rng = fusekit::testing::Rng::new(seed);
/// # let _ = rng.uniform(0.0, 1.0);
/// ```
pub fn seed_for(name: &str) -> u64 {
    let seed = std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed);
            splitmix64(t ^ (std::process::id() as u64) << 32)
        });
    println!("seed for {name}: {seed} (replay with {SEED_ENV}={seed})");
    seed
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// xoshiro256** seeded through splitmix64: fast, reproducible across platforms.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator from a seed.
    ///
    /// ```
    /// let (mut a, mut b) = (fusekit::testing::Rng::new(7), fusekit::testing::Rng::new(7));
    /// assert_eq!(a.next_u64(), b.next_u64());
    /// ```
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut s = [0u64; 4];
        for v in &mut s {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            *v = splitmix64(x);
        }
        Rng { s }
    }

    /// Next 64 random bits.
    ///
    /// ```
    /// let mut r = fusekit::testing::Rng::new(1);
    /// assert_ne!(r.next_u64(), r.next_u64());
    /// ```
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    ///
    /// ```
    /// let x = fusekit::testing::Rng::new(2).unit();
    /// assert!((0.0..1.0).contains(&x));
    /// ```
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    ///
    /// ```
    /// let x = fusekit::testing::Rng::new(3).uniform(-2.0, 2.0);
    /// assert!((-2.0..2.0).contains(&x));
    /// ```
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform integer in [0, n). `n` must be > 0.
    ///
    /// ```
    /// assert!(fusekit::testing::Rng::new(4).below(10) < 10);
    /// ```
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Standard normal (Box–Muller).
    ///
    /// ```
    /// let z = fusekit::testing::Rng::new(5).normal();
    /// assert!(z.is_finite());
    /// ```
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit(); // (0, 1]
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Student-t with `nu` degrees of freedom: heavy tails (nu = 3 has infinite kurtosis).
    ///
    /// ```
    /// let t = fusekit::testing::Rng::new(6).student_t(3.0);
    /// assert!(t.is_finite());
    /// ```
    pub fn student_t(&mut self, nu: f64) -> f64 {
        let z = self.normal();
        let chi2: f64 = (0..nu.max(1.0).round() as usize)
            .map(|_| self.normal().powi(2))
            .sum();
        z / (chi2 / nu).sqrt().max(1e-12)
    }

    /// Values drawn from `dist`.
    ///
    /// ```
    /// use fusekit::testing::{Dist, Rng};
    /// let v = Rng::new(8).sample(Dist::Logits { std: 2.0, outlier_frac: 0.01, outlier_scale: 10.0 }, 1000);
    /// assert_eq!(v.len(), 1000);
    /// ```
    pub fn sample(&mut self, dist: Dist, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.draw(dist)).collect()
    }

    /// `n` draws from `dist`, each rounded to `T` (round to nearest even).
    ///
    /// ```
    /// use fusekit::testing::{Dist, Rng};
    /// let v: Vec<half::bf16> = Rng::new(8).sample_as(Dist::Normal { mean: 0.0, std: 1.0 }, 5);
    /// assert_eq!(v.len(), 5);
    /// ```
    pub fn sample_as<T: Element>(&mut self, dist: Dist, n: usize) -> Vec<T> {
        (0..n).map(|_| T::from_f64(self.draw(dist))).collect()
    }

    fn draw(&mut self, dist: Dist) -> f64 {
        match dist {
            Dist::Uniform { lo, hi } => self.uniform(lo, hi),
            Dist::Normal { mean, std } => mean + std * self.normal(),
            Dist::HeavyTail { nu, scale } => scale * self.student_t(nu),
            Dist::Logits {
                std,
                outlier_frac,
                outlier_scale,
            } => {
                let z = std * self.normal();
                if self.unit() < outlier_frac {
                    z.abs() * outlier_scale
                } else {
                    z
                }
            }
        }
    }
}

/// Input distributions for kernel tests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dist {
    /// Uniform in [lo, hi).
    Uniform {
        /// Lower bound.
        lo: f64,
        /// Upper bound (exclusive).
        hi: f64,
    },
    /// Gaussian.
    Normal {
        /// Mean.
        mean: f64,
        /// Standard deviation.
        std: f64,
    },
    /// Student-t scaled: heavy tails, as activations with outlier channels.
    HeavyTail {
        /// Degrees of freedom.
        nu: f64,
        /// Scale.
        scale: f64,
    },
    /// LLM-like logits: Gaussian bulk plus a fraction of large positive outliers (confident tokens).
    Logits {
        /// Bulk standard deviation.
        std: f64,
        /// Fraction of entries that are outliers.
        outlier_frac: f64,
        /// Outlier magnitude relative to the bulk.
        outlier_scale: f64,
    },
}

/// An element type fusekit tests read back: convertible to f64, with a poison bit pattern that a kernel
/// never legitimately writes.
pub trait Element: crate::Scalar + PartialEq {
    /// Type name for messages.
    const NAME: &'static str;
    /// The poison value written before a launch.
    fn poison() -> Self;
    /// Bitwise equality with the poison value.
    fn is_poison(&self) -> bool;
    /// Widening conversion.
    fn to_f64(self) -> f64;
    /// Narrowing conversion (round to nearest).
    fn from_f64(x: f64) -> Self;
}

macro_rules! float_element {
    ($t:ty, $name:literal, $bits:expr, $from_bits:expr, $to_bits:expr, $to:expr, $from:expr) => {
        impl Element for $t {
            const NAME: &'static str = $name;
            fn poison() -> Self {
                $from_bits($bits)
            }
            fn is_poison(&self) -> bool {
                $to_bits(*self) == $bits
            }
            fn to_f64(self) -> f64 {
                $to(self)
            }
            fn from_f64(x: f64) -> Self {
                $from(x)
            }
        }
    };
}

// Quiet NaNs with a recognisable payload: no arithmetic produces these exact bits.
float_element!(
    f32,
    "f32",
    0x7fc0_dead_u32,
    f32::from_bits,
    f32::to_bits,
    |x: f32| x as f64,
    |x: f64| x as f32
);
float_element!(
    f64,
    "f64",
    0x7ff8_dead_dead_dead_u64,
    f64::from_bits,
    f64::to_bits,
    |x: f64| x,
    |x: f64| x
);
float_element!(
    f16,
    "f16",
    0x7e5d_u16,
    f16::from_bits,
    f16::to_bits,
    f16::to_f64,
    f16::from_f64
);
float_element!(
    bf16,
    "bf16",
    0x7fad_u16,
    bf16::from_bits,
    bf16::to_bits,
    bf16::to_f64,
    bf16::from_f64
);

macro_rules! int_element {
    ($t:ty, $name:literal, $poison:expr) => {
        impl Element for $t {
            const NAME: &'static str = $name;
            fn poison() -> Self {
                $poison
            }
            fn is_poison(&self) -> bool {
                *self == $poison
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(x: f64) -> Self {
                x.round() as $t
            }
        }
    };
}
int_element!(i32, "i32", i32::MIN + 0x5a5a);
int_element!(i64, "i64", i64::MIN + 0x5a5a);
int_element!(u32, "u32", 0xdead_5a5a);
int_element!(u8, "u8", 0xa5);

/// Allocates `n` elements on the device, every one set to `T::poison()`, so a test can prove the kernel
/// wrote every output.
///
/// ```
/// # use fusekit::Backend;
/// let dev = fusekit::emu::Emulator::new().unwrap();
/// let out = fusekit::testing::poisoned::<_, f32>(&dev, 1000).unwrap();
/// assert!(dev.download(&out).unwrap().iter().all(|x| fusekit::testing::Element::is_poison(x)));
/// ```
pub fn poisoned<B: Backend, T: Element>(dev: &B, n: usize) -> Result<B::Buffer<T>> {
    dev.upload(&vec![T::poison(); n])
}

/// Sets every element of `buf` to `T::poison()`.
///
/// ```
/// # use fusekit::Backend;
/// let dev = fusekit::emu::Emulator::new().unwrap();
/// let mut b = dev.alloc_zeros::<i32>(3).unwrap();
/// fusekit::testing::poison(&dev, &mut b).unwrap();
/// ```
pub fn poison<B: Backend, T: Element, D: crate::DeviceWrite<T, B>>(
    dev: &B,
    buf: &mut D,
) -> Result<()> {
    dev.write(&vec![T::poison(); buf.len()], buf)
}

/// Err naming the first elements still holding the poison value.
///
/// ```
/// use fusekit::testing::{check_written, Element};
/// assert!(check_written("out", &[1.0f32, 2.0]).is_ok());
/// assert!(check_written("out", &[1.0f32, f32::poison()]).is_err());
/// ```
pub fn check_written<T: Element>(name: &str, out: &[T]) -> Result<(), String> {
    let unwritten: Vec<usize> = out
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_poison())
        .map(|(i, _)| i)
        .collect();
    if unwritten.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{name}: {} of {} elements never written (first at {:?})",
            unwritten.len(),
            out.len(),
            &unwritten[..unwritten.len().min(8)]
        ))
    }
}

/// Acceptance thresholds: `|out − ref| ≤ atol + rtol·|ref|` per element, and ‖out − ref‖₂/‖ref‖₂ ≤ rel_l2.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// Relative L2 error bound over the whole output.
    pub rel_l2: f64,
    /// Absolute per-element slack.
    pub atol: f64,
    /// Relative per-element slack.
    pub rtol: f64,
}

impl Tolerance {
    /// Bit-for-bit (integers, copies, ids).
    pub const EXACT: Tolerance = Tolerance {
        rel_l2: 0.0,
        atol: 0.0,
        rtol: 0.0,
    };
    /// fp32 outputs with fp32 accumulation.
    pub const F32: Tolerance = Tolerance {
        rel_l2: 1e-5,
        atol: 1e-5,
        rtol: 1e-4,
    };
    /// f16 outputs (10-bit mantissa).
    pub const F16: Tolerance = Tolerance {
        rel_l2: 2e-3,
        atol: 1e-3,
        rtol: 4e-3,
    };
    /// bf16 outputs (7-bit mantissa): one rounding is 2^-9 relative.
    pub const BF16: Tolerance = Tolerance {
        rel_l2: 1e-2,
        atol: 1e-3,
        rtol: 1.6e-2,
    };
}

/// How far an output is from its reference.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Elements compared.
    pub n: usize,
    /// ‖out − ref‖₂ / ‖ref‖₂ (or ‖out − ref‖₂ when the reference is all zeros).
    pub rel_l2: f64,
    /// Largest |out − ref|.
    pub max_abs: f64,
    /// Where the largest |out − ref| is.
    pub max_abs_at: usize,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "n={} rel_l2={:.3e} max_abs={:.3e} (at {})",
            self.n, self.rel_l2, self.max_abs, self.max_abs_at
        )
    }
}

/// Compares `out` with an f64 `reference`. Fails on: a length mismatch, any NaN (in `out`, or in the
/// reference, which would be a broken test), an infinity that differs, the poison value, a per-element
/// excess, or the relative L2 bound.
///
/// ```
/// use fusekit::testing::{compare, Tolerance};
/// let r = compare("y", &[1.0f32, 2.0], &[1.0, 2.0], Tolerance::F32).unwrap();
/// assert_eq!(r.max_abs, 0.0);
/// assert!(compare("y", &[f32::NAN, 2.0], &[1.0, 2.0], Tolerance::F32).is_err());
/// assert!(compare("y", &[1.1f32, 2.0], &[1.0, 2.0], Tolerance::F32).is_err());
/// ```
pub fn compare<T: Element>(
    name: &str,
    out: &[T],
    reference: &[f64],
    tol: Tolerance,
) -> Result<Report, String> {
    compare_with_floor(name, out, reference, tol, |_| 0.0)
}

/// [`compare`] with an extra absolute slack `floor(i)` for element i: the rounding error a correct
/// implementation makes in that element beyond `atol + rtol·|ref|` (e.g. an fp32 difference of two
/// nearly equal terms, whose size the test knows). The relative L2 bound becomes
/// `‖out − ref‖ ≤ rel_l2·‖ref‖ + ‖floor‖`, so outputs whose exact values are all below the resolution
/// the floor describes do not fail it. (With a zero floor this is [`compare`]: `atol` never loosens the
/// L2 bound.)
///
/// ```
/// use fusekit::testing::{compare, compare_with_floor, Tolerance};
/// // 1e-9 computed as 0 (the difference of two terms of size 1 in fp32): within atol, but alone it
/// // fails the relative L2 bound; a floor that describes the fp32 resolution admits it.
/// assert!(compare("g", &[0.0f32], &[1e-9], Tolerance::F32).is_err());
/// let tight = Tolerance { rel_l2: 1e-5, atol: 0.0, rtol: 1e-4 };
/// assert!(compare("g", &[0.0f32], &[1e-9], tight).is_err());
/// assert!(compare_with_floor("g", &[0.0f32], &[1e-9], tight, |_| 1e-7).is_ok());
/// assert!(compare_with_floor("g", &[1e-6f32], &[1e-9], tight, |_| 1e-7).is_err());
/// ```
pub fn compare_with_floor<T: Element>(
    name: &str,
    out: &[T],
    reference: &[f64],
    tol: Tolerance,
    floor: impl Fn(usize) -> f64,
) -> Result<Report, String> {
    if out.len() != reference.len() {
        return Err(format!(
            "{name}: {} elements out, {} in the reference",
            out.len(),
            reference.len()
        ));
    }
    check_written(name, out)?;
    let (mut diff2, mut ref2, mut max_abs, mut max_abs_at) = (0.0f64, 0.0f64, 0.0f64, 0usize);
    let mut slack2 = 0.0f64;
    let mut bad: Vec<String> = Vec::new();
    let mut n_bad = 0usize;
    for (i, (&o, &r)) in out.iter().zip(reference).enumerate() {
        let o = o.to_f64();
        let fault = if r.is_nan() {
            Some("reference is NaN (the test is broken)".to_string())
        } else if o.is_nan() {
            Some(format!("NaN where the reference is {r:e}"))
        } else if r.is_infinite() || o.is_infinite() {
            (o != r).then(|| format!("{o:e} where the reference is {r:e}"))
        } else {
            let d = (o - r).abs();
            let f = floor(i);
            let slack = tol.atol + f;
            diff2 += d * d;
            ref2 += r * r;
            slack2 += f * f;
            if d > max_abs {
                max_abs = d;
                max_abs_at = i;
            }
            (d > slack + tol.rtol * r.abs())
                .then(|| format!("{o:e} vs reference {r:e} (|diff| {d:.3e}, slack {slack:.1e})"))
        };
        if let Some(msg) = fault {
            n_bad += 1;
            if bad.len() < 8 {
                bad.push(format!("[{i}] {msg}"));
            }
        }
    }
    let rel_l2 = if ref2 > 0.0 {
        (diff2 / ref2).sqrt()
    } else {
        diff2.sqrt()
    };
    let report = Report {
        n: out.len(),
        rel_l2,
        max_abs,
        max_abs_at,
    };
    if n_bad > 0 {
        return Err(format!(
            "{name}: {n_bad} of {} elements outside atol {:e} + rtol {:e}·|ref|: {}; {report}",
            out.len(),
            tol.atol,
            tol.rtol,
            bad.join("; ")
        ));
    }
    if diff2.sqrt() > tol.rel_l2 * ref2.sqrt() + slack2.sqrt() && rel_l2 > tol.rel_l2 {
        return Err(format!(
            "{name}: relative L2 error {rel_l2:.3e} > {:e} (floor slack {:.1e}); {report}",
            tol.rel_l2,
            slack2.sqrt()
        ));
    }
    Ok(report)
}

/// First index where `a` and `b` differ bit for bit (`None` when identical, lengths included: a length
/// mismatch reports the shorter length). Determinism tests use it: NaN payloads and ±0 count as different.
///
/// ```
/// use fusekit::testing::first_bit_difference;
/// assert_eq!(first_bit_difference(&[1.0f32, 0.0], &[1.0, 0.0]), None);
/// assert_eq!(first_bit_difference(&[1.0f32, 0.0], &[1.0, -0.0]), Some(1));
/// ```
pub fn first_bit_difference<T: bytemuck::Pod>(a: &[T], b: &[T]) -> Option<usize> {
    let size = std::mem::size_of::<T>();
    let (ab, bb): (&[u8], &[u8]) = (bytemuck::cast_slice(a), bytemuck::cast_slice(b));
    match ab
        .chunks(size)
        .zip(bb.chunks(size))
        .position(|(x, y)| x != y)
    {
        Some(i) => Some(i),
        None if a.len() != b.len() => Some(a.len().min(b.len())),
        None => None,
    }
}
