//! The emulated GPU of the tests (`engine/tests/cuda_emu`): with `FEDTUNE_CUDA_EMULATOR=1` and
//! no `FEDTUNE_REQUIRE_GPU`, the GPU tests run on a CUDA driver and cuBLASLt emulated on the CPU,
//! with fedtune's own kernel sources compiled as host C++ (same program as NVRTC compiles, with
//! the host definitions of its few inline PTX instructions). NVRTC itself is the real one (it
//! needs no GPU): the driver checks that every kernel of its PTX has a host build. The
//! libraries are built once per source hash under the tests' target directory with the host's
//! C++ compiler (`$CXX`, else `c++`) and loaded before cudarc opens the driver by name (shared
//! with `tests/cli_gpu_emulated.rs`, which runs the CLI on it).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const SHIM: &str = include_str!("../cuda_emu/shim.h");
const DRIVER: &str = include_str!("../cuda_emu/driver.cpp");
const CUBLASLT: &str = include_str!("../cuda_emu/cublaslt.cpp");
const SELFTEST: &str = include_str!("../cuda_emu/selftest.cpp");

/// Whether the tests are asked to use the emulated GPU.
pub fn requested() -> bool {
    std::env::var("FEDTUNE_CUDA_EMULATOR").is_ok_and(|v| v == "1")
}

/// The kernel program as host C++: dynamic shared memory (`extern __shared__ T name[];`) becomes
/// the launch's buffer.
fn host_program() -> String {
    let mut out = String::new();
    for line in fedtune_engine::cuda::compile::program().lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("extern __shared__ ")
            && let Some(decl) = rest.strip_suffix("[];")
            && let Some((ty, name)) = decl.rsplit_once(' ')
        {
            out.push_str(&format!("    {ty}* {name} = ({ty}*)ft_dynamic_smem();\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Kernel names: the identifiers after `__ft_kernel__ void` in the preprocessed program.
fn kernel_names(preprocessed: &str) -> Vec<String> {
    let mut names = Vec::new();
    for part in preprocessed.split("__ft_kernel__").skip(1) {
        let rest = part.trim_start();
        if let Some(rest) = rest.strip_prefix("void") {
            let name: String = rest
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                names.push(name);
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

fn run(cmd: &mut Command, what: &str) -> Result<Vec<u8>, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: cannot run the C++ compiler: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out.stdout)
}

/// Builds the libraries and the self-test of `program` (the host kernel program) into `dir`.
fn build(dir: &Path, program: &str) -> Result<(), String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let write = |name: &str, text: &str| {
        std::fs::write(tmp.join(name), text).map_err(|e| format!("{name}: {e}"))
    };
    write("shim.h", SHIM)?;
    write("driver.cpp", DRIVER)?;
    write("cublaslt.cpp", CUBLASLT)?;
    write("selftest.cpp", SELFTEST)?;
    write(
        "cublas.cpp",
        "extern \"C\" int ft_cublas_placeholder = 0;\n",
    )?;
    write("program.cpp", &format!("#include \"shim.h\"\n{program}"))?;
    let pre = run(
        Command::new(&cxx).current_dir(&tmp).args([
            "-E",
            "-P",
            "-x",
            "c++",
            "-std=c++17",
            "program.cpp",
        ]),
        "preprocessing the kernels",
    )?;
    let names = kernel_names(&String::from_utf8_lossy(&pre));
    if names.len() < 10 {
        return Err(format!("only {} kernels found in the program", names.len()));
    }
    let mut kernels = String::from("#include \"shim.h\"\n#define __ft_kernel__\n");
    kernels.push_str(program);
    kernels.push_str("\nFT_KERNEL_TABLE(\n");
    let entries: Vec<String> = names
        .iter()
        .map(|n| format!("    FT_KERNEL({n})"))
        .collect();
    kernels.push_str(&entries.join(",\n"));
    kernels.push_str(")\n");
    write("kernels.cpp", &kernels)?;
    let lib = |out: &str, srcs: &[&str]| {
        let mut c = Command::new(&cxx);
        c.current_dir(&tmp).args([
            "-O2",
            "-g",
            "-std=c++17",
            "-fPIC",
            "-shared",
            "-ffp-contract=off",
            "-fno-strict-aliasing",
            "-Wno-unknown-pragmas",
            "-o",
            out,
            &format!("-Wl,-soname,{out}"),
        ]);
        c.args(srcs).arg("-lpthread");
        c
    };
    // The two libraries compile side by side.
    let lt = lib("libcublasLt.so.13", &["cublaslt.cpp"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {cxx}: {e}"))?;
    let driver = run(
        &mut lib("libcuda.so.1", &["driver.cpp", "kernels.cpp"]),
        "compiling the emulated driver and kernels",
    );
    let lt_out = lt.wait_with_output().map_err(|e| e.to_string())?;
    driver?;
    if !lt_out.status.success() {
        return Err(format!(
            "compiling the emulated cuBLASLt failed:\n{}",
            String::from_utf8_lossy(&lt_out.stderr)
        ));
    }
    run(
        &mut lib("libcublas.so.13", &["cublas.cpp"]),
        "compiling the cuBLAS placeholder",
    )?;
    // The driver's checks against kernels that break their rules (cuda_emu_checks.rs).
    run(
        Command::new(&cxx).current_dir(&tmp).args([
            "-O1",
            "-std=c++17",
            "-ffp-contract=off",
            "-Wno-unknown-pragmas",
            "-o",
            "selftest",
            "driver.cpp",
            "selftest.cpp",
            "-lpthread",
        ]),
        "compiling the emulator's self-test",
    )?;
    match std::fs::rename(&tmp, dir) {
        Ok(()) => Ok(()),
        // Another process built the same sources first.
        Err(_) if dir.join("selftest").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => Err(format!("{}: {e}", dir.display())),
    }
}

/// The directory of the emulated `libcuda.so.1`, `libcublasLt.so.13` and `libcublas.so.13`,
/// built once per source hash (a process that runs `fedtune` finds them through
/// `LD_LIBRARY_PATH`; the tests' own process loads them, see `gpu_common::gpu`). Errors name
/// what failed.
pub fn dir() -> Result<&'static Path, String> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let program = host_program();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for s in [SHIM, DRIVER, CUBLASLT, SELFTEST, &program] {
            s.hash(&mut h);
        }
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("cuda-emu")
            .join(format!("{:016x}", h.finish()));
        if !dir.join("selftest").is_file() {
            build(&dir, &program)?;
        }
        Ok(dir)
    })
    .as_ref()
    .map(|p| p.as_path())
    .map_err(|e| e.clone())
}

/// The libraries in [`dir`], in load order (loaded by `gpu_common`; the CLI tests' commands
/// find them through `LD_LIBRARY_PATH`).
#[allow(dead_code)]
pub const LIBS: [&str; 3] = ["libcuda.so.1", "libcublasLt.so.13", "libcublas.so.13"];
