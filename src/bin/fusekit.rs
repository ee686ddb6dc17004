//! The `fusekit` command: `fusekit check [--require-gpu] [--emu] [--seed N]`, `fusekit ptxas`.

use std::process::ExitCode;

const USAGE: &str = "usage:
  fusekit check [--require-gpu] [--emu] [--seed N]
                                             self-check every kernel family against its CPU reference
                                             (kernels on the GPU; on the SIMT emulator without one,
                                             or also with --emu)
  fusekit ptxas                              print the build's ptxas resource report
  fusekit emu-kernels                        list every kernel of the emulated families (family kernel)
  fusekit help";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("check") => {
            let mut opts = fusekit::check::CheckOptions::default();
            let mut it = args[1..].iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--require-gpu" => opts.require_gpu = true,
                    "--emu" => opts.emu = true,
                    "--seed" => match it.next().and_then(|s| s.parse().ok()) {
                        Some(s) => opts.seed = Some(s),
                        None => return usage_error("--seed takes an unsigned integer"),
                    },
                    other => return usage_error(&format!("unknown option `{other}`")),
                }
            }
            let out = fusekit::check::run(&opts);
            print!("{}", out.text);
            ExitCode::from(out.exit_code as u8)
        }
        Some("emu-kernels") => {
            let dev = match fusekit::emu::Emulator::new() {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("fusekit: {e}");
                    return ExitCode::from(1);
                }
            };
            for family in fusekit::Family::ALL {
                match dev.kernels(*family) {
                    Ok(names) => names.iter().for_each(|n| println!("{} {n}", family.name())),
                    Err(e) => {
                        eprintln!("fusekit: {e}");
                        return ExitCode::from(1);
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Some("ptxas") => {
            print!("{}", fusekit::PTXAS_REPORT);
            ExitCode::SUCCESS
        }
        Some("help" | "--help" | "-h") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some(other) => usage_error(&format!("unknown command `{other}`")),
        None => usage_error("no command given"),
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("fusekit: {msg}\n{USAGE}");
    ExitCode::from(64)
}
