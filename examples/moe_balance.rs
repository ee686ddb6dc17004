//! Auxiliary-loss-free load balancing, demonstrated: a synthetic router with a persistent per-expert skew,
//! run with and without the bias update. Uses the GPU kernels when a GPU is present, the CPU reference
//! otherwise.
//!
//!     cargo run --release --example moe_balance [steps]

use fusekit::moe::simulate::{simulate_cpu, simulate_device, SimConfig, SimTrace};

fn main() -> fusekit::Result<()> {
    let steps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let gpu = match fusekit::Gpu::new(0) {
        Ok(g) => {
            println!("running on {}", g.props().name);
            Some(g)
        }
        Err(e) => {
            println!("{e}: running the CPU reference");
            None
        }
    };
    let run = |cfg: &SimConfig| -> fusekit::Result<SimTrace> {
        match &gpu {
            Some(g) => simulate_device(g, cfg),
            None => simulate_cpu(cfg),
        }
    };
    println!(
        "\n{:<34} {:>8} {:>8} {:>8} {:>8} {:>10}  weights unbiased",
        "setting", "step 0", "step 50", "step 100", "last", "last-20 avg"
    );
    for (name, cfg) in [
        ("64 experts top-6", SimConfig::paper_64x6(steps)),
        (
            "256 experts top-8, 8 groups/4 kept",
            SimConfig::deepseek_v3(steps),
        ),
    ] {
        for (label, c) in [
            ("bias update u=1e-3", cfg),
            ("no update", SimConfig { rate: 0.0, ..cfg }),
        ] {
            let tr = run(&c)?;
            let at = |i: usize| tr.maxvio.get(i).copied().unwrap_or(f64::NAN);
            println!(
                "{:<34} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>10.3}  {}",
                format!("{name}, {label}"),
                at(0),
                at(50),
                at(100),
                at(tr.maxvio.len() - 1),
                tr.tail_mean(20)?,
                tr.weights_unbiased
            );
        }
    }
    Ok(())
}
