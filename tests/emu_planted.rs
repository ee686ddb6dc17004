//! Planted bugs (kernels/selftest/planted.cu): each checker of the SIMT emulator must report the bug
//! planted for it, at the right source line. The emulator's own checks run in this process; the
//! sanitizer ones run the bug in a child process under AddressSanitizer + UBSan or ThreadSanitizer
//! (the sanitizer runtime preloaded, as scripts/emu-test does) and read its report.

use std::process::Command;

use fusekit::emu::{variant_built, EmuOptions, Emulator, Sanitizer, Schedule};
use fusekit::selftest::{planted, Planted};
use fusekit::Error;

/// `planted.cu:<line>` of the first line of the planted source containing `needle`.
fn line_of(needle: &str) -> String {
    let src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/kernels/selftest/planted.cu"
    ))
    .unwrap();
    let n = src
        .lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("`{needle}` not in planted.cu"));
    format!("planted.cu:{}", n + 1)
}

fn emu() -> Option<Emulator> {
    fusekit::testing::emulator_for("emu_planted")
}

fn report(bug: Planted, threads: u32) -> String {
    let dev = emu().unwrap();
    match planted(&dev, bug, threads, &[1.0; 128]) {
        Err(Error::Emulation { kernel, report }) => {
            println!("{bug:?}: {kernel}: {report}");
            report
        }
        other => panic!("{bug:?}: expected an emulator report, got {other:?}"),
    }
}

#[test]
fn divergent_barrier_is_reported_with_both_lines() {
    if emu().is_none() {
        return;
    }
    let r = report(Planted::DivergentBarrier, 64);
    assert!(r.contains("divergent __syncthreads"), "{r}");
    let src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/kernels/selftest/planted.cu"
    ))
    .unwrap();
    // The two barriers of the planted branch (the first two `__syncthreads();` after its case label).
    let start = src
        .lines()
        .position(|l| l.contains("case FK_PLANTED_DIVERGENT_BARRIER"))
        .unwrap();
    let lines: Vec<usize> = src
        .lines()
        .enumerate()
        .skip(start)
        .filter(|(_, l)| l.trim() == "__syncthreads();")
        .take(2)
        .map(|(i, _)| i + 1)
        .collect();
    for l in lines {
        assert!(r.contains(&format!("planted.cu:{l}")), "line {l} in: {r}");
    }
}

#[test]
fn deadlock_is_reported_not_hung() {
    if emu().is_none() {
        return;
    }
    let r = report(Planted::Deadlock, 64);
    assert!(r.contains("deadlock"), "{r}");
    assert!(
        r.contains("thread 0: wait at __syncthreads") && r.contains("__syncwarp"),
        "{r}"
    );
}

#[test]
fn shuffle_outside_its_mask_is_reported() {
    if emu().is_none() {
        return;
    }
    let r = report(Planted::ShuffleOutsideMask, 32);
    assert!(
        r.contains("reads lane 20, which is outside the mask"),
        "{r}"
    );
    assert!(r.contains(&line_of("__shfl_sync(0x0000ffffu")), "{r}");
}

#[test]
fn mask_naming_exited_lanes_is_reported() {
    if emu().is_none() {
        return;
    }
    let r = report(Planted::ExitedLane, 32);
    assert!(r.contains("16-31, which have exited"), "{r}");
}

#[test]
fn cluster_block_read_after_exit_is_reported() {
    if emu().is_none() {
        return;
    }
    // Whichever comes first, the read of a block that is gone or the exit of a block still being read,
    // is reported (the same way every run: it does not depend on the two blocks' timing).
    let r = report(Planted::ClusterExited, 64);
    assert!(r.contains("exited"), "{r}");
    assert!(r.contains(&line_of("map_shared_rank(&part, 1)")), "{r}");
}

#[test]
fn uninitialised_shared_memory_reads_poison() {
    let Some(dev) = emu() else { return };
    let out = planted(&dev, Planted::UninitShared, 64, &[1.0; 64]).unwrap();
    // Shared memory starts every block as 0xff bytes: NaN as a float, so the sum is NaN, not 1.
    assert!(out[..64].iter().all(|x| x.is_nan()), "{:?}", &out[..8]);
}

#[test]
fn cp_async_destination_read_before_the_wait_is_stale() {
    let Some(dev) = emu() else { return };
    let input: Vec<f32> = (0..128).map(|i| i as f32).collect();
    let out = planted(&dev, Planted::CpAsyncNoWait, 128, &input).unwrap();
    // The copies land only at a wait: the kernel read the poisoned stage, never its input.
    assert!(
        out[..128].iter().all(|x| x.to_bits() == 0xffff_ffff),
        "{:?}",
        &out[..8]
    );
}

#[test]
fn missing_barrier_gives_a_wrong_sum_under_some_schedule() {
    let Some(base) = emu() else { return };
    let input: Vec<f32> = (0..128).map(|i| i as f32).collect();
    let want: f32 = input.iter().sum();
    let mut wrong = Vec::new();
    for s in Schedule::ALL {
        let dev = base.with_schedule(s);
        let out = planted(&dev, Planted::MissingBarrier, 128, &input).unwrap();
        println!("{s:?}: sum {} (want {want})", out[0]);
        if out[0] != want {
            wrong.push(s);
        }
    }
    assert!(
        !wrong.is_empty(),
        "a reduction without its barrier gave the right sum under every schedule"
    );
    // And the fixed order that happens to work exists too: a race can hide under one schedule.
    assert!(wrong.len() < Schedule::ALL.len(), "{wrong:?}");
}

// ---------------------------------------------------------------------------------------------------
// Sanitizer checkers, in a child process.

/// Runs `bug` in a child copy of this test binary under `san`; returns its stderr and stdout, or None
/// (with a SKIP line) when this build has no such variant.
fn under_sanitizer(san: Sanitizer, bug: &str, threads: u32) -> Option<String> {
    emu()?; // FUSEKIT_BACKENDS without the emulator (the GPU suite): nothing to run
    if !variant_built(san) {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIP (no `{}` emulator in this build; build with FUSEKIT_EMU_VARIANTS=plain,asan,tsan): {bug}",
            san.name()
        );
        return None;
    }
    let lib = if san == Sanitizer::Address {
        "libasan.so"
    } else {
        "libtsan.so"
    };
    let runtime = std::env::var("FUSEKIT_SANITIZER_RUNTIME_DIR")
        .map(|d| format!("{d}/{lib}"))
        .unwrap_or_else(|_| {
            let out = Command::new(std::env::var("CC").unwrap_or_else(|_| "gcc".into()))
                .arg(format!("-print-file-name={lib}"))
                .output()
                .expect("gcc -print-file-name");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        });
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "planted_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FUSEKIT_PLANTED_CHILD", format!("{bug}:{threads}"))
        .env("FUSEKIT_EMU_SANITIZER", san.name())
        .env("LD_PRELOAD", &runtime)
        .env("ASAN_OPTIONS", "detect_leaks=0")
        .env("UBSAN_OPTIONS", "print_stacktrace=1")
        .env(
            "TSAN_OPTIONS",
            format!(
                "halt_on_error=1 suppressions={}/kernels/emu/tsan.supp",
                env!("CARGO_MANIFEST_DIR")
            ),
        )
        .output()
        .expect("running the child");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        !out.status.success(),
        "{bug} under {}: the child passed, no report:\n{text}",
        san.name()
    );
    Some(text)
}

/// The child side: runs the planted bug named by FUSEKIT_PLANTED_CHILD (nothing otherwise).
#[test]
fn planted_child() {
    let Ok(spec) = std::env::var("FUSEKIT_PLANTED_CHILD") else {
        return;
    };
    let (name, threads) = spec.split_once(':').unwrap();
    let bug = *Planted::ALL
        .iter()
        .find(|b| format!("{b:?}") == name)
        .unwrap();
    let dev = Emulator::new().unwrap();
    assert_ne!(EmuOptions::from_env().unwrap().sanitizer, Sanitizer::None);
    let input: Vec<f32> = (0..128).map(|i| i as f32).collect();
    let r = planted(&dev, bug, threads.parse().unwrap(), &input);
    println!("planted {name}: {r:?}");
    // Reaching here means no sanitizer stopped the process: fail, so the parent sees no silent pass.
    std::process::exit(3);
}

#[test]
fn out_of_bounds_global_write_is_reported_by_asan() {
    let Some(r) = under_sanitizer(Sanitizer::Address, "OobGlobal", 32) else {
        return;
    };
    assert!(r.contains("AddressSanitizer: heap-buffer-overflow"), "{r}");
    assert!(r.contains(&line_of("p.out[p.n] = 1.0f")), "{r}");
}

#[test]
fn out_of_bounds_dynamic_shared_write_is_reported_by_asan() {
    let Some(r) = under_sanitizer(Sanitizer::Address, "OobDynamicShared", 32) else {
        return;
    };
    assert!(r.contains("AddressSanitizer: use-after-poison"), "{r}");
    assert!(r.contains(&line_of("d[p.dyn_smem / 4 + t] = 1.0f")), "{r}");
}

#[test]
fn out_of_bounds_static_shared_index_is_reported_by_ubsan() {
    let Some(r) = under_sanitizer(Sanitizer::Address, "OobStaticShared", 128) else {
        return;
    };
    // Which thread gets there first depends on the schedule: any index in 64..128.
    assert!(
        (64..128).any(|i| r.contains(&format!("index {i} out of bounds for type 'float [64]'"))),
        "{r}"
    );
    assert!(r.contains(&line_of("s[t] = p.in[t % p.n]")), "{r}");
}

#[test]
fn missing_barrier_is_reported_as_a_race_by_tsan() {
    let Some(r) = under_sanitizer(Sanitizer::Thread, "MissingBarrier", 128) else {
        return;
    };
    assert!(r.contains("ThreadSanitizer: data race"), "{r}");
    assert!(r.contains("planted.cu"), "{r}");
}
