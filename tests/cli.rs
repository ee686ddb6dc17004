//! `fusekit check` as a user runs it.

use std::process::Command;

fn fusekit(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fusekit"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn check_without_gpu_runs_references_and_exits_zero() {
    let (code, text) = fusekit(&["check", "--seed", "7"]);
    println!("{text}");
    for family in fusekit::check::registry() {
        assert!(
            text.contains(family.family) || text.contains("copy"),
            "{text}"
        );
    }
    if fusekit::probe_driver().is_err() {
        assert_eq!(code, 0, "{text}");
        assert!(text.contains("no CUDA device"), "{text}");
        assert!(text.contains("cpu-ref"), "{text}");
        assert!(!text.contains("FAIL"), "{text}");
    } else {
        assert_eq!(code, 0, "{text}");
        assert!(text.contains(" gpu "), "{text}");
    }
}

#[test]
fn check_require_gpu_fails_without_gpu() {
    let (code, text) = fusekit(&["check", "--require-gpu", "--seed", "7"]);
    if fusekit::probe_driver().is_err() {
        assert_eq!(code, 2, "{text}");
        assert!(text.contains("--require-gpu"), "{text}");
    } else {
        assert_eq!(code, 0, "{text}");
    }
}

#[test]
fn bad_command_line_is_a_usage_error() {
    assert_eq!(fusekit(&["frobnicate"]).0, 64);
    assert_eq!(fusekit(&["check", "--seed", "x"]).0, 64);
    assert_eq!(fusekit(&[]).0, 64);
    let (code, text) = fusekit(&["ptxas"]);
    assert_eq!(code, 0);
    assert!(text.contains("fk_copy_v16"), "{text}");
}
