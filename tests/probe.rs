//! The copy probe on a GPU: every size exact, outputs poisoned first, bad input rejected. Skips loudly
//! without a GPU.

use fusekit::probe;
use fusekit::testing::{check_written, gpu_or_skip, poisoned, seed_for, Rng};
use fusekit::Error;

#[test]
fn copy_is_exact_for_edge_and_random_sizes() {
    let Some(gpu) = gpu_or_skip("copy_is_exact_for_edge_and_random_sizes") else {
        return;
    };
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
        let src = gpu.stream().clone_htod(&data).unwrap();
        let mut dst = poisoned::<u8>(&gpu, n).unwrap();
        probe::copy(&gpu, &src, &mut dst).unwrap();
        let back = gpu.stream().clone_dtoh(&dst).unwrap();
        let first_bad = back.iter().zip(&data).position(|(a, b)| a != b);
        assert_eq!(first_bad, None, "size {n}: first mismatch at {first_bad:?}");
    }
}

#[test]
fn copy_of_f32_keeps_every_bit_and_writes_everything() {
    let Some(gpu) = gpu_or_skip("copy_of_f32_keeps_every_bit_and_writes_everything") else {
        return;
    };
    let mut rng = Rng::new(seed_for("copy_of_f32_keeps_every_bit"));
    let n = 1_000_003;
    let data: Vec<f32> = (0..n)
        .map(|_| f32::from_bits(rng.next_u64() as u32))
        .collect();
    let src = gpu.stream().clone_htod(&data).unwrap();
    let mut dst = poisoned::<f32>(&gpu, n).unwrap();
    probe::copy(&gpu, &src, &mut dst).unwrap();
    let back = gpu.stream().clone_dtoh(&dst).unwrap();
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
    let Some(gpu) = gpu_or_skip("copy_rejects_bad_arguments") else {
        return;
    };
    let src = gpu.stream().alloc_zeros::<u8>(1024).unwrap();
    let mut short = gpu.stream().alloc_zeros::<u8>(1000).unwrap();
    let e = probe::copy(&gpu, &src, &mut short).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "dst", .. }), "{e}");

    let mut dst = gpu.stream().alloc_zeros::<u8>(1024).unwrap();
    let src_off = src.slice(3..1003);
    let mut dst_view = dst.slice_mut(0..1000);
    let e = probe::copy(&gpu, &src_off, &mut dst_view).unwrap_err();
    assert!(matches!(e, Error::Layout { arg: "src", .. }), "{e}");
    let e = probe::copy(&gpu, &src.slice(0..1000), &mut dst.slice_mut(5..1005)).unwrap_err();
    assert!(matches!(e, Error::Layout { arg: "dst", .. }), "{e}");

    // Overlap inside one allocation, through two views that do not alias in Rust's eyes.
    let mut buf = gpu.stream().alloc_zeros::<u8>(4096).unwrap();
    let (a, mut b) = buf.split_at_mut(2048);
    // Disjoint halves are fine.
    probe::copy(&gpu, &a, &mut b).unwrap();

    // Empty copies are a no-op, not an error.
    let e0 = gpu.stream().alloc_zeros::<u8>(16).unwrap();
    let mut d0 = gpu.stream().alloc_zeros::<u8>(16).unwrap();
    probe::copy(&gpu, &e0.slice(0..0), &mut d0.slice_mut(0..0)).unwrap();
    gpu.synchronize().unwrap();
}

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
