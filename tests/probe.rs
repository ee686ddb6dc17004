//! The copy probe against the reference, on the SIMT emulator always and on a GPU when one is present:
//! every size exact, outputs poisoned first, bad input rejected; on a GPU also the context check and the
//! bandwidth figure.

use fusekit::probe;
use fusekit::testing::{check_written, gpu_or_skip, poisoned, seed_for, Rng};
use fusekit::{Backend, Error};

#[test]
fn copy_is_exact_for_edge_and_random_sizes() {
    fusekit::on_every_backend!("copy_is_exact_for_edge_and_random_sizes", |dev| {
        copy_is_exact_on(dev)
    });
}

fn copy_is_exact_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("copy_is_exact_for_edge_and_random_sizes"));
    let mut sizes = vec![
        1usize,
        2,
        15,
        16,
        17,
        31,
        33,
        4095,
        4097,
        1 << 20,
        (64 << 20) + 5,
    ];
    sizes.extend((0..6).map(|_| 1 + rng.below(3 << 20) as usize));
    for n in sizes {
        let data: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
        let src = dev.upload(&data).unwrap();
        let mut dst = poisoned::<B, u8>(dev, n).unwrap();
        probe::copy(dev, &src, &mut dst).unwrap();
        let back = dev.download(&dst).unwrap();
        let first_bad = back.iter().zip(&data).position(|(a, b)| a != b);
        assert_eq!(first_bad, None, "size {n}: first mismatch at {first_bad:?}");
    }
}

#[test]
fn copy_of_f32_keeps_every_bit_and_writes_everything() {
    fusekit::on_every_backend!("copy_of_f32_keeps_every_bit_and_writes_everything", |dev| {
        copy_of_f32_on(dev)
    });
}

fn copy_of_f32_on<B: Backend>(dev: &B) {
    let mut rng = Rng::new(seed_for("copy_of_f32_keeps_every_bit"));
    let n = 1_000_003;
    let data: Vec<f32> = (0..n)
        .map(|_| f32::from_bits(rng.next_u64() as u32))
        .collect();
    let src = dev.upload(&data).unwrap();
    let mut dst = poisoned::<B, f32>(dev, n).unwrap();
    probe::copy(dev, &src, &mut dst).unwrap();
    let back = dev.download(&dst).unwrap();
    let same = back
        .iter()
        .zip(&data)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "bit patterns differ");
    // Poison bits may legitimately occur in random input: only check where the input differs.
    let written: Vec<f32> = back
        .iter()
        .zip(&data)
        .filter(|(_, d)| d.to_bits() != f32::from_bits(0x7fc0_dead).to_bits())
        .map(|(b, _)| *b)
        .collect();
    check_written("dst", &written).unwrap();
}

#[test]
fn copy_rejects_bad_arguments() {
    fusekit::on_every_backend!("copy_rejects_bad_arguments", |dev| {
        copy_rejects_bad_arguments_on(dev)
    });
}

fn copy_rejects_bad_arguments_on<B: Backend>(dev: &B) {
    let src = dev.alloc_zeros::<u8>(1024).unwrap();
    let mut short = dev.alloc_zeros::<u8>(1000).unwrap();
    let e = probe::copy(dev, &src, &mut short).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "dst", .. }), "{e}");

    let mut dst = dev.alloc_zeros::<u8>(1024).unwrap();
    {
        let src_off = dev.view(&src, 3..1003).unwrap();
        let mut dst_view = dev.view_mut(&mut dst, 0..1000).unwrap();
        let e = probe::copy(dev, &src_off, &mut dst_view).unwrap_err();
        assert!(matches!(e, Error::Layout { arg: "src", .. }), "{e}");
    }
    let e = probe::copy(
        dev,
        &dev.view(&src, 0..1000).unwrap(),
        &mut dev.view_mut(&mut dst, 5..1005).unwrap(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Layout { arg: "dst", .. }), "{e}");

    // Views past the end are an error, not a panic.
    assert!(dev.view(&src, 1000..1025).is_err());

    // Empty copies are a no-op, not an error.
    let e0 = dev.alloc_zeros::<u8>(16).unwrap();
    let mut d0 = dev.alloc_zeros::<u8>(16).unwrap();
    probe::copy(
        dev,
        &dev.view(&e0, 0..0).unwrap(),
        &mut dev.view_mut(&mut d0, 0..0).unwrap(),
    )
    .unwrap();
    dev.synchronize().unwrap();
}

#[test]
fn copy_of_disjoint_halves_of_one_allocation() {
    // Two views of one allocation that do not alias in Rust's eyes (cudarc's split_at_mut; raw views
    // on the emulator): disjoint halves are fine, overlapping ones are a layout error.
    let name = "copy_of_disjoint_halves_of_one_allocation";
    if let Some(dev) = fusekit::testing::emulator_for(name) {
        let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let buf = dev.upload(&data).unwrap();
        let p = buf.as_ptr() as *mut u8;
        // SAFETY: both windows lie inside `buf`, which outlives them.
        let (a, mut b) = unsafe {
            (
                fusekit::emu::View::from_raw_parts(p, 2048),
                fusekit::emu::ViewMut::from_raw_parts(p.add(2048), 2048),
            )
        };
        probe::copy(&dev, &a, &mut b).unwrap();
        let back = dev.download(&buf).unwrap();
        assert_eq!(back[2048..], data[..2048]);
        // SAFETY: as above; the overlap is what the call must refuse.
        let mut c = unsafe { fusekit::emu::ViewMut::from_raw_parts(p.add(1024), 2048) };
        let e = probe::copy(&dev, &a, &mut c).unwrap_err();
        assert!(matches!(e, Error::Layout { arg: "dst", .. }), "{e}");
    }
    if let Some(gpu) = fusekit::testing::gpu_for(name) {
        let mut buf = gpu.stream().alloc_zeros::<u8>(4096).unwrap();
        let (a, mut b) = buf.split_at_mut(2048);
        probe::copy(&gpu, &a, &mut b).unwrap();
    }
}

// GPU only by nature: CUDA contexts and measured bandwidth have no emulated counterpart.
#[test]
fn copy_rejects_buffers_of_another_context() {
    let Some(gpu) = gpu_or_skip("copy_rejects_buffers_of_another_context") else {
        return;
    };
    // A non-primary context on the same device is a different context.
    let Ok(other) = cudarc::driver::CudaContext::new_non_primary(0, 0) else {
        println!("could not create a second context; nothing to check");
        return;
    };
    let foreign = other.default_stream().alloc_zeros::<u8>(64).unwrap();
    let mut dst = gpu.stream().alloc_zeros::<u8>(64).unwrap();
    let e = fusekit::probe::copy(&gpu, &foreign, &mut dst).unwrap_err();
    assert!(matches!(e, Error::Layout { arg: "src", .. }), "{e}");
}

#[test]
fn bandwidth_probe_reports_a_plausible_figure() {
    let Some(gpu) = gpu_or_skip("bandwidth_probe_reports_a_plausible_figure") else {
        return;
    };
    let bw = probe::measure_copy_bandwidth_sync(&gpu, 256 << 20, 5).unwrap();
    println!(
        "copy bandwidth on 256 MiB: {:.1} GB/s ({:?})",
        bw.gbps(),
        bw.timing
    );
    assert_eq!(bw.timing.samples, 5);
    // Sanity, not a speed target: any GPU fusekit supports copies faster than 50 GB/s.
    assert!(bw.gbps() > 50.0, "{} GB/s", bw.gbps());
    assert!(matches!(
        probe::measure_copy_bandwidth_sync(&gpu, 0, 5),
        Err(Error::InvalidArgument { .. })
    ));
}
