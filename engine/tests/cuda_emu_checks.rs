//! The emulated GPU's own checks (`engine/tests/cuda_emu/selftest.cpp`, run with
//! `FEDTUNE_CUDA_EMULATOR=1` as in CI): each fires on a kernel that breaks its rule — a
//! `__syncthreads` only some threads reach (or two different ones), a shuffle from an exited lane, a missing barrier
//! (the result changes between the two thread orders), an `mma.sync` without the whole warp,
//! dynamic shared memory over the limit, too many threads, a copy past an allocation, a kernel
//! without a host build, a misaligned `cp.async`, an `ldmatrix` without the whole warp — and
//! stays quiet on correct kernels (a block reduction, the barrier present, an `mma.sync` tile
//! against a plain product, the same with `ldmatrix` fragments (plain and `.trans`), a
//! `cp.async` tile that lands at its wait and not before, new memory reading as NaN).

mod gpu_common;

use gpu_common::emu;

#[test]
fn the_emulator_fails_kernels_that_break_the_rules_and_runs_correct_ones() {
    if !emu::requested() {
        eprintln!("FEDTUNE_CUDA_EMULATOR is not 1: the emulator is not checked");
        return;
    }
    let dir = emu::dir().unwrap_or_else(|e| panic!("FEDTUNE_CUDA_EMULATOR=1: {e}"));
    let out = std::process::Command::new(dir.join("selftest"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}");
    assert!(out.status.success(), "{report}");
    let ok = report.lines().filter(|l| l.starts_with("ok ")).count();
    assert_eq!(ok, 18, "{report}");
    assert!(!report.contains("FAIL"), "{report}");
    // The broken kernels' launches said why on stderr.
    let said = String::from_utf8_lossy(&out.stderr);
    for why in [
        "(every thread must reach it, or none)",
        "two different __syncthreads() calls",
        "shuffles from lane 5, which has exited",
        "mma.sync in warp 0 without lane 16",
        "over the kernel's limit",
        "is not inside one device allocation",
        "not built with: not_built",
        "cp.async with a source or destination not aligned",
        "ldmatrix in warp 0 without lane 16",
    ] {
        assert!(said.contains(why), "{why} missing from\n{said}");
    }
}
