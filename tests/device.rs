//! Device layer: "no GPU" is a clean error, the build embedded every family, props and errors read well.

use fusekit::{Error, Family, Gpu};

#[test]
fn missing_gpu_is_a_clean_error_not_a_panic() {
    match fusekit::probe_driver() {
        Err(e) => {
            assert!(e.is_no_device(), "{e:?}");
            let g = Gpu::new(0);
            assert!(matches!(g, Err(Error::NoDevice { .. })), "{g:?}");
            let msg = g.unwrap_err().to_string();
            assert!(msg.starts_with("no CUDA device:"), "{msg}");
        }
        Ok(n) => {
            // On a GPU host: an ordinal past the last device is NoDevice too, not a panic.
            let g = Gpu::new(n + 3);
            assert!(matches!(g, Err(Error::NoDevice { .. })), "{g:?}");
        }
    }
}

#[test]
fn every_kernel_folder_is_a_family_with_a_fatbin() {
    let compiled = fusekit::compiled_families();
    let declared: Vec<&str> = Family::ALL.iter().map(|f| f.name()).collect();
    let mut a = compiled.clone();
    let mut b = declared.clone();
    a.sort();
    b.sort();
    assert_eq!(a, b, "kernels/ folders vs Family::ALL");
    for f in Family::ALL {
        let bin = f.fatbin();
        assert!(bin.len() > 16, "family {} has an empty fatbin", f.name());
        // Fatbin container magic 0xBA55ED50, little-endian.
        assert_eq!(
            &bin[..4],
            &[0x50, 0xed, 0x55, 0xba],
            "family {}: not a fatbin",
            f.name()
        );
    }
}

#[test]
fn ptxas_report_covers_every_kernel_on_every_architecture_without_spills() {
    let report = fusekit::PTXAS_REPORT;
    for arch in ["sm_80 ", "sm_86 ", "sm_89 ", "sm_90a"] {
        assert!(report.contains(arch), "no {arch} entries in:\n{report}");
    }
    assert!(report.contains("fk_copy_v16"));
    for line in report.lines() {
        let spills = line
            .rsplit("spills")
            .next()
            .unwrap()
            .trim()
            .trim_end_matches('B')
            .trim();
        let n: u64 = spills
            .parse()
            .unwrap_or_else(|_| panic!("unparsable line {line}"));
        // The build fails on spills unless allowlisted; none is allowlisted today.
        assert_eq!(n, 0, "{line}");
    }
}

#[test]
fn props_display_names_the_sass_target() {
    let p = fusekit::DeviceProps::example_h100();
    let s = p.to_string();
    assert!(
        s.contains("sm_90a") && s.contains("132 SMs") && s.contains("driver 13.0"),
        "{s}"
    );
}

#[test]
fn error_messages_name_argument_and_expectation() {
    let e = Error::OutOfRange {
        arg: "targets",
        index: 17,
        value: 50304,
        allowed: "[0, 50257)".into(),
    };
    assert_eq!(e.to_string(), "targets[17] = 50304 is outside [0, 50257)");
    let e = Error::shape("dst", "1024 elements (the length of src)", "1000 elements");
    assert_eq!(
        e.to_string(),
        "shape of `dst`: expected 1024 elements (the length of src), got 1000 elements"
    );
}
