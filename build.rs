//! build.rs: kernels/<family>/*.cu -> one fatbin per family (SASS per supported GPU + PTX), launch-parameter
//! headers -> Rust (bindgen), host-testable device maths -> a static library (cc), the ptxas resource
//! report checked for spills, and the same .cu sources compiled as host C++ for the SIMT emulator
//! (kernels/emu/): one shared library per family and emulator variant, with a launch table by kernel
//! name. Writes to OUT_DIR only.

use std::collections::hash_map::DefaultHasher;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

/// SASS targets (real architectures) and the PTX target embedded for newer GPUs.
/// sm_90a carries the Hopper-only instructions (wgmma, setmaxnreg); it runs on sm_90 devices only.
const DEFAULT_SASS: &[&str] = &["80", "86", "89", "90a"];
const PTX_TARGET: &str = "90";

/// The SASS architectures to build: `FUSEKIT_SASS` (this project's list, e.g. `80,90a`), else
/// `CUDA_COMPUTE_CAP` as the Rust CUDA ecosystem sets it (candle's build, cudarc users: `90`, or a list;
/// 9.0 builds sm_90a, as the default does), else every supported architecture. PTX for compute_90 is
/// always embedded (newer GPUs JIT it).
fn sass_list() -> Result<Vec<String>, String> {
    let list = |v: &str| -> Vec<String> {
        v.split(',')
            .map(|s| s.trim().trim_start_matches("sm_").to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    if let Ok(v) = env::var("FUSEKIT_SASS") {
        if !v.trim().is_empty() {
            return Ok(list(&v));
        }
    }
    if let Ok(v) = env::var("CUDA_COMPUTE_CAP") {
        if !v.trim().is_empty() {
            let mut out = Vec::new();
            for cap in list(&v) {
                let n: u32 = cap.trim_end_matches('a').parse().map_err(|_| {
                    format!("CUDA_COMPUTE_CAP={v}: `{cap}` is not a compute capability such as 80 or 90")
                })?;
                if n < 80 {
                    return Err(format!(
                        "CUDA_COMPUTE_CAP={v}: fusekit's kernels need compute capability 8.0 or newer"
                    ));
                }
                out.push(if n == 90 { "90a".to_string() } else { cap });
            }
            return Ok(out);
        }
    }
    Ok(DEFAULT_SASS.iter().map(|s| s.to_string()).collect())
}

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernels = root.join("kernels");
    let include = kernels.join("include");

    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "FUSEKIT_SASS",
        "CUDA_COMPUTE_CAP",
        "DOCS_RS",
        "FUSEKIT_EMU_VARIANTS",
        "FUSEKIT_REQUIRE_EMU",
        "CXX",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    generate_params(&include, &out);
    build_host_math(&kernels);

    let families = families(&kernels);
    let docs_only = env::var_os("DOCS_RS").is_some();
    let mut report = String::new();
    if docs_only {
        // docs.rs has no nvcc: embed empty fatbins; the crate still documents and type-checks.
        for fam in &families {
            fs::write(out.join(format!("{fam}.fatbin")), b"").unwrap();
            // The next real build must not take these empty files for up-to-date output.
            let _ = fs::remove_file(out.join(format!("{fam}.stamp")));
        }
        report.push_str("DOCS_RS build: kernels were not compiled\n");
    } else {
        let nvcc = find_nvcc(&root).unwrap_or_else(|msg| fail(&msg));
        let sass = sass_list().unwrap_or_else(|msg| fail(&msg));
        let nvcc_version = run_capture(Command::new(&nvcc).arg("--version"))
            .unwrap_or_else(|e| fail(&format!("`{} --version` failed: {e}", nvcc.display())));
        let allow = read_allowlist(&kernels.join("ptxas-allowlist.txt"));
        let results: Vec<Result<String, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = families
                .iter()
                .map(|fam| {
                    let (nvcc, sass, nvcc_version, kernels, out) =
                        (&nvcc, &sass, &nvcc_version, &kernels, &out);
                    s.spawn(move || compile_family(nvcc, nvcc_version, sass, kernels, out, fam))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut errors = Vec::new();
        for (fam, res) in families.iter().zip(results) {
            match res {
                Ok(ptxas) => {
                    let mut rows = parse_ptxas(&ptxas);
                    rows.sort_by(|a, b| (&a.function, &a.arch).cmp(&(&b.function, &b.arch)));
                    for row in &rows {
                        // A stack frame is local memory too (a register array indexed at run time).
                        let spills = row.spill_stores + row.spill_loads + row.stack;
                        let _ = writeln!(
                            report,
                            "{fam:<8} {:<36} sm_{:<4} regs {:>3}  smem {:>6} B  stack {:>4} B  spills {:>4} B",
                            row.function,
                            row.arch,
                            row.registers,
                            row.smem,
                            row.stack,
                            row.spill_stores + row.spill_loads
                        );
                        if spills > 0 && !allow.iter().any(|a| a == &row.function) {
                            errors.push(format!(
                                "kernel `{}` (family {fam}, sm_{}) uses local memory: {} bytes of stack frame, \
                                 {} bytes of spill stores, {} bytes of spill loads. Fix the register pressure \
                                 or add a line `{}  # reason` to kernels/ptxas-allowlist.txt",
                                row.function,
                                row.arch,
                                row.stack,
                                row.spill_stores,
                                row.spill_loads,
                                row.function
                            ));
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        fs::write(out.join("ptxas-report.txt"), &report).unwrap();
        if !errors.is_empty() {
            fail(&errors.join("\n\n"));
        }
    }
    fs::write(out.join("ptxas-report.txt"), &report).unwrap();
    write_families_rs(&out, &families);
    build_emulator(&kernels, &out, &families, docs_only);
}

fn fail(msg: &str) -> ! {
    eprintln!("\nfusekit build error:\n{msg}\n");
    std::process::exit(1);
}

/// Kernel families: every folder under kernels/ except include/.
fn families(kernels: &Path) -> Vec<String> {
    let mut fams: Vec<String> = fs::read_dir(kernels)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "include" && n != "emu")
        .collect();
    fams.sort();
    fams
}

fn files_with_ext(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.extension()
                        .and_then(|x| x.to_str())
                        .is_some_and(|x| exts.contains(&x))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// nvcc in the documented order: NVCC, CUDA_HOME/CUDA_PATH, PATH, /usr/local/cuda, scripts/setup's folder.
fn find_nvcc(root: &Path) -> Result<PathBuf, String> {
    let mut tried = Vec::new();
    if let Some(p) = env::var_os("NVCC") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        tried.push(format!("NVCC={}", p.display()));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(dir) = env::var_os(var) {
            let p = PathBuf::from(dir).join("bin/nvcc");
            if p.is_file() {
                return Ok(p);
            }
            tried.push(format!("{var}/bin/nvcc = {}", p.display()));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.is_file() {
                return Ok(p);
            }
        }
        tried.push("nvcc on PATH".into());
    }
    for p in [
        PathBuf::from("/usr/local/cuda/bin/nvcc"),
        root.join(".toolchain/cuda/nvidia/cu13/bin/nvcc"),
    ] {
        if p.is_file() {
            return Ok(p);
        }
        tried.push(p.display().to_string());
    }
    Err(format!(
        "nvcc not found (looked at: {}).\n\
         Run `scripts/setup` (installs nvcc 13.0 from PyPI into .toolchain/, no GPU needed), \
         or point NVCC at an nvcc 13.0.x binary.",
        tried.join(", ")
    ))
}

fn run_capture(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| e.to_string())?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Compiles one family into OUT_DIR/<fam>.fatbin unless its stamp (sources, headers, flags, nvcc) is unchanged.
/// Returns the ptxas report text.
fn compile_family(
    nvcc: &Path,
    nvcc_version: &str,
    sass: &[String],
    kernels: &Path,
    out: &Path,
    fam: &str,
) -> Result<String, String> {
    let dir = kernels.join(fam);
    let sources = files_with_ext(&dir, &["cu"]);
    if sources.is_empty() {
        return Err(format!("kernels/{fam}/ holds no .cu file"));
    }
    let include = kernels.join("include");
    let mut args: Vec<String> = vec![
        "-fatbin".into(),
        "-O3".into(),
        "-std=c++17".into(),
        "-lineinfo".into(),
        // zstd-compressed device code: a tenth of the size (every binary embeds the fatbins). The driver
        // decompresses on load; it needs CUDA 12.8+, and our PTX 9.0 needs 13.0 anyway.
        "--compress-mode=size".into(),
        "--threads=0".into(),
        "-Xptxas=-v".into(),
        format!("-I{}", include.display()),
        format!("-I{}", dir.display()),
    ];
    if let Some(cccl) = nvcc
        .parent()
        .and_then(|b| b.parent())
        .map(|r| r.join("include/cccl"))
    {
        if cccl.is_dir() {
            args.push(format!("-I{}", cccl.display()));
        }
    }
    for sm in sass {
        let compute = sm.trim_end_matches(['a', 'f']);
        let compute = if sm.ends_with('a') || sm.ends_with('f') {
            sm.as_str()
        } else {
            compute
        };
        args.push(format!("-gencode=arch=compute_{compute},code=sm_{sm}"));
    }
    args.push(format!(
        "-gencode=arch=compute_{PTX_TARGET},code=compute_{PTX_TARGET}"
    ));

    let mut hasher = DefaultHasher::new();
    nvcc_version.hash(&mut hasher);
    args.hash(&mut hasher);
    for f in sources
        .iter()
        .chain(files_with_ext(&include, &["h", "cuh"]).iter())
        .chain(files_with_ext(&dir, &["h", "cuh"]).iter())
    {
        f.hash(&mut hasher);
        fs::read(f).unwrap().hash(&mut hasher);
    }
    let stamp = format!("{:016x}", hasher.finish());
    let fatbin = out.join(format!("{fam}.fatbin"));
    let stamp_file = out.join(format!("{fam}.stamp"));
    let report_file = out.join(format!("{fam}.ptxas.txt"));
    let built = fs::metadata(&fatbin).map(|m| m.len() > 0).unwrap_or(false);
    if built && fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str()) {
        return Ok(fs::read_to_string(&report_file).unwrap_or_default());
    }

    // One translation unit per family: a unity file that includes every .cu of the folder.
    let unity = out.join(format!("{fam}_unity.cu"));
    let mut text = String::new();
    for s in &sources {
        let _ = writeln!(text, "#include \"{}\"", s.display());
    }
    fs::write(&unity, text).unwrap();

    let mut cmd = Command::new(nvcc);
    cmd.args(&args).arg("-o").arg(&fatbin).arg(&unity);
    let report = run_capture(&mut cmd).map_err(|log| {
        format!(
            "nvcc failed on family `{fam}`:\n{} {}\n{log}",
            nvcc.display(),
            args.join(" ")
        )
    })?;
    fs::write(&report_file, &report).unwrap();
    fs::write(&stamp_file, &stamp).unwrap();
    Ok(report)
}

struct PtxasRow {
    function: String,
    arch: String,
    registers: u32,
    smem: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let idx = line.find(unit)?;
    line[..idx].split_whitespace().last()?.parse().ok()
}

/// Parses `nvcc -Xptxas -v` output: per function and architecture, registers, shared memory, stack, spills.
fn parse_ptxas(text: &str) -> Vec<PtxasRow> {
    let mut rows: Vec<PtxasRow> = Vec::new();
    let mut arch = String::new();
    let mut pending: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let name = parts.next().unwrap_or_default().to_string();
            arch = rest
                .split("for 'sm_")
                .nth(1)
                .unwrap_or("?")
                .trim_end_matches('\'')
                .to_string();
            rows.push(PtxasRow {
                function: name,
                arch: arch.clone(),
                registers: 0,
                smem: 0,
                stack: 0,
                spill_stores: 0,
                spill_loads: 0,
            });
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            pending = Some(rest.trim().to_string());
        } else if line.contains("bytes stack frame") {
            let name = pending.take().unwrap_or_default();
            let stack = number_before(line, "bytes stack frame").unwrap_or(0);
            let st = number_before(line, "bytes spill stores").unwrap_or(0);
            let ld = number_before(line, "bytes spill loads").unwrap_or(0);
            match rows
                .iter_mut()
                .rev()
                .find(|r| r.function == name && r.arch == arch)
            {
                Some(r) => {
                    r.stack = stack;
                    r.spill_stores = st;
                    r.spill_loads = ld;
                }
                None => rows.push(PtxasRow {
                    function: name,
                    arch: arch.clone(),
                    registers: 0,
                    smem: 0,
                    stack,
                    spill_stores: st,
                    spill_loads: ld,
                }),
            }
        } else if line.contains("Used ") && line.contains(" registers") {
            if let Some(r) = rows.last_mut() {
                r.registers = number_before(line, "registers").unwrap_or(0);
                r.smem = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    rows
}

/// kernels/ptxas-allowlist.txt: `<function>  # reason` per line; a line without a reason is a build error.
fn read_allowlist(path: &Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(path) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once('#') {
            Some((name, reason)) if !name.trim().is_empty() && !reason.trim().is_empty() => {
                names.push(name.trim().to_string())
            }
            _ => fail(&format!(
                "kernels/ptxas-allowlist.txt line {}: expected `<kernel>  # reason`, got `{line}`",
                i + 1
            )),
        }
    }
    names
}

/// kernels/include/*_params.h -> OUT_DIR/params.rs. One header per family, read by nvcc and by bindgen, so
/// the Rust and CUDA sides cannot disagree on a struct layout.
fn generate_params(include: &Path, out: &Path) {
    let headers = files_with_ext(include, &["h"]);
    let mut wrapper = String::new();
    for h in headers
        .iter()
        .filter(|h| h.to_string_lossy().ends_with("_params.h"))
    {
        let _ = writeln!(wrapper, "#include \"{}\"", h.display());
    }
    // The emulator's C interface (launch descriptors, kernel tables), for src/emu/.
    let emu_abi = include.parent().unwrap().join("emu").join("fk_emu_abi.h");
    let _ = writeln!(wrapper, "#include \"{}\"", emu_abi.display());
    let bindings = bindgen::Builder::default()
        .header_contents("fusekit_params_wrapper.h", &wrapper)
        .clang_arg(format!("-I{}", include.display()))
        .allowlist_type("fk_.*")
        .allowlist_var("FK_.*")
        .allowlist_function("fk_emu_.*")
        .derive_debug(true)
        .derive_default(true)
        .derive_copy(true)
        .use_core()
        .generate()
        .unwrap_or_else(|e| {
            fail(&format!(
                "bindgen failed on kernels/include/*_params.h: {e}\n\
                 (bindgen needs libclang: run scripts/setup, or install libclang-dev)"
            ))
        });
    bindings.write_to_file(out.join("params.rs")).unwrap();
}

/// Host build of the `__host__ __device__` maths headers (kernels/include/host/*.c), so CPU tests check the same
/// formulas the kernels run.
fn build_host_math(kernels: &Path) {
    let dir = kernels.join("include").join("host");
    let sources = files_with_ext(&dir, &["c"]);
    if sources.is_empty() {
        return;
    }
    cc::Build::new()
        .files(&sources)
        .include(kernels.join("include"))
        .flag_if_supported("-std=c11")
        // fk_moe_math.h relies on every a*b+c staying two roundings, as on the device.
        .flag_if_supported("-ffp-contract=off")
        .opt_level(2)
        .warnings(true)
        .compile("fusekit_host_math");
}

fn write_families_rs(out: &Path, families: &[String]) {
    let mut text = String::from("/// (family, fatbin) for every folder under kernels/.\n");
    text.push_str("pub(crate) static FATBINS: &[(&str, &[u8])] = &[\n");
    for fam in families {
        let _ = writeln!(
            text,
            "    (\"{fam}\", include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{fam}.fatbin\"))),"
        );
    }
    text.push_str("];\n");
    fs::write(out.join("families.rs"), text).unwrap();
}

// ---------------------------------------------------------------------------------------------------
// The SIMT emulator: every family's .cu sources compiled as host C++ against kernels/emu/fk_emu.h.

/// An emulator variant: name, sanitizer code (fk_emu_abi.h), the kernel unit's sanitizer flags.
type EmuVariant = (&'static str, u32, &'static [&'static str]);

/// Emulator variants: the plain build, AddressSanitizer + UBSan, ThreadSanitizer.
const EMU_VARIANTS: &[EmuVariant] = &[
    ("plain", 0, &[]),
    (
        "asan",
        1,
        &["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    ),
    ("tsan", 2, &["-fsanitize=thread"]),
];

/// Builds the emulated families for the variants in FUSEKIT_EMU_VARIANTS (default `plain`; `none` builds
/// nothing) and writes OUT_DIR/emu_libs.rs: (variant, family, library path) per library, or why there is
/// none. Kernel sources that do not compile as host C++ fail the build; a missing C++ compiler only does
/// when FUSEKIT_REQUIRE_EMU=1 (downstream users who never run the emulator need none).
fn build_emulator(kernels: &Path, out: &Path, families: &[String], docs_only: bool) {
    let requested = env::var("FUSEKIT_EMU_VARIANTS").unwrap_or_else(|_| "plain".into());
    let require = env::var("FUSEKIT_REQUIRE_EMU").is_ok_and(|v| v == "1");
    let mut libs: Vec<(String, String, PathBuf)> = Vec::new();
    let mut why_not: Option<String> = None;
    let variants: Vec<&EmuVariant> = if requested.trim() == "none" {
        why_not = Some("this build was made with FUSEKIT_EMU_VARIANTS=none".into());
        Vec::new()
    } else {
        let mut v = Vec::new();
        for name in requested
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
        {
            match EMU_VARIANTS.iter().find(|(n, _, _)| *n == name) {
                Some(x) => v.push(x),
                None => fail(&format!(
                    "FUSEKIT_EMU_VARIANTS: unknown variant `{name}` (known: plain, asan, tsan, none)"
                )),
            }
        }
        v
    };
    if docs_only && why_not.is_none() {
        why_not = Some("docs.rs build: the emulator was not compiled".into());
    }
    if why_not.is_none() && !variants.is_empty() {
        let tool = cc::Build::new()
            .cpp(true)
            .opt_level(2)
            .debug(true)
            .pic(true)
            .cargo_metadata(false)
            .cargo_warnings(false)
            .try_get_compiler();
        match tool {
            Err(e) => why_not = Some(format!("no C++ compiler for the emulator: {e}")),
            Ok(tool) => {
                let version =
                    run_capture(Command::new(tool.path()).arg("--version")).unwrap_or_default();
                if version.is_empty() {
                    why_not = Some(format!(
                        "the C++ compiler `{}` does not run",
                        tool.path().display()
                    ));
                } else {
                    let jobs: Vec<(&EmuVariant, &String)> = variants
                        .iter()
                        .flat_map(|v| families.iter().map(move |f| (*v, f)))
                        .collect();
                    let results: Vec<Result<PathBuf, String>> = std::thread::scope(|s| {
                        let handles: Vec<_> = jobs
                            .iter()
                            .map(|(variant, fam)| {
                                let tool = &tool;
                                let version = &version;
                                s.spawn(move || {
                                    build_emu_family(tool, version, kernels, out, variant, fam)
                                })
                            })
                            .collect();
                        handles.into_iter().map(|h| h.join().unwrap()).collect()
                    });
                    let mut errors = Vec::new();
                    for ((variant, fam), r) in jobs.iter().zip(results) {
                        match r {
                            Ok(p) => libs.push((variant.0.to_string(), fam.to_string(), p)),
                            Err(e) => errors.push(e),
                        }
                    }
                    if !errors.is_empty() {
                        fail(&errors.join("\n\n"));
                    }
                }
            }
        }
    }
    if let (Some(why), true) = (&why_not, require) {
        fail(&format!(
            "FUSEKIT_REQUIRE_EMU=1 but the emulator was not built: {why}"
        ));
    }
    let mut text = String::from(
        "/// (variant, family, shared library) of every emulated family this build compiled.\n\
         pub(crate) static EMU_LIBS: &[(&str, &str, &str)] = &[\n",
    );
    for (v, f, p) in &libs {
        let _ = writeln!(text, "    ({v:?}, {f:?}, {:?}),", p.display().to_string());
    }
    text.push_str("];\n/// Why the emulator was not built, if it was not.\n");
    let _ = writeln!(
        text,
        "pub(crate) static EMU_NOT_BUILT: Option<&str> = {why_not:?};"
    );
    fs::write(out.join("emu_libs.rs"), text).unwrap();
}

/// One emulated family library: scan the preprocessed sources for kernels, generate the unit with the
/// launch table, compile it (with the variant's sanitizer) and the runtime (without), link.
fn build_emu_family(
    tool: &cc::Tool,
    compiler_version: &str,
    kernels: &Path,
    out: &Path,
    variant: &EmuVariant,
    fam: &str,
) -> Result<PathBuf, String> {
    let (vname, vcode, sanitize) = *variant;
    let emu = kernels.join("emu");
    let dir = out.join("emu").join(vname);
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let fam_dir = kernels.join(fam);
    let sources = files_with_ext(&fam_dir, &["cu"]);
    let lib = dir.join(format!("libfk_emu_{fam}.so"));

    let base: Vec<String> = vec![
        "-std=c++17".into(),
        "-O2".into(),
        "-g".into(),
        "-fPIC".into(),
        "-fno-omit-frame-pointer".into(),
        // Device arithmetic: every a*b+c stays two roundings unless the source asks for fmaf.
        "-ffp-contract=off".into(),
        // `extern __shared__` declarations inside kernels name a thread_local defined by the runtime.
        "-fno-extern-tls-init".into(),
        "-Wall".into(),
        "-Wno-unknown-pragmas".into(),
        "-Wno-unused-function".into(),
        format!("-DFK_EMU_SANITIZER={vcode}"),
        format!("-I{}", emu.join("include").display()),
        format!("-I{}", emu.display()),
        format!("-I{}", kernels.join("include").display()),
        format!("-I{}", fam_dir.display()),
    ];

    // Stamp: sources, headers, flags, compiler.
    let mut hasher = DefaultHasher::new();
    compiler_version.hash(&mut hasher);
    base.hash(&mut hasher);
    sanitize.hash(&mut hasher);
    for f in sources
        .iter()
        .chain(files_with_ext(&fam_dir, &["h", "cuh"]).iter())
        .chain(files_with_ext(&kernels.join("include"), &["h", "cuh"]).iter())
        .chain(files_with_ext(&emu, &["h", "cpp"]).iter())
        .chain(files_with_ext(&emu.join("include"), &["h"]).iter())
    {
        f.hash(&mut hasher);
        fs::read(f).map_err(|e| e.to_string())?.hash(&mut hasher);
    }
    let stamp = format!("{:016x}", hasher.finish());
    let stamp_file = dir.join(format!("{fam}.stamp"));
    if lib.is_file() && fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str()) {
        return Ok(lib);
    }

    let mut unity = String::new();
    for s in &sources {
        let _ = writeln!(unity, "#include \"{}\"", s.display());
    }
    let scan_src = dir.join(format!("{fam}_scan.cpp"));
    fs::write(&scan_src, &unity).map_err(|e| e.to_string())?;
    let mut cmd = tool.to_command();
    cmd.args(&base)
        .arg("-DFK_EMU_SCAN")
        .arg("-E")
        .arg("-include")
        .arg(emu.join("fk_emu.h"))
        .arg(&scan_src);
    let pre = cmd
        .output()
        .map_err(|e| format!("running the C++ preprocessor: {e}"))?;
    if !pre.status.success() {
        return Err(format!(
            "emulator: preprocessing family `{fam}` failed:\n{}",
            String::from_utf8_lossy(&pre.stderr)
        ));
    }
    let kernels_found = scan_kernels(&String::from_utf8_lossy(&pre.stdout))
        .map_err(|e| format!("emulator: family `{fam}`: {e}"))?;
    if kernels_found.is_empty() {
        return Err(format!(
            "emulator: family `{fam}` defines no extern \"C\" __global__ kernel"
        ));
    }
    let _ = writeln!(unity, "#include \"fk_emu_table.h\"\nFK_EMU_TABLE(");
    for (i, k) in kernels_found.iter().enumerate() {
        let _ = writeln!(
            unity,
            "    FK_EMU_KERNEL({}, {}, {}, {}, {}){}",
            k.name,
            k.max_threads,
            k.cluster[0],
            k.cluster[1],
            k.cluster[2],
            if i + 1 < kernels_found.len() {
                ","
            } else {
                ")"
            }
        );
    }
    let unit = dir.join(format!("{fam}_emu.cpp"));
    fs::write(&unit, &unity).map_err(|e| e.to_string())?;

    let compile =
        |src: &Path, obj: &Path, extra: &[&str], include_emu: bool| -> Result<(), String> {
            let mut cmd = tool.to_command();
            cmd.args(&base).args(extra);
            if include_emu {
                cmd.arg("-include").arg(emu.join("fk_emu.h"));
            }
            cmd.arg("-c").arg(src).arg("-o").arg(obj);
            let o = cmd
                .output()
                .map_err(|e| format!("running the C++ compiler: {e}"))?;
            if !o.status.success() {
                return Err(format!(
                    "emulator ({vname}): compiling {} failed:\n{}",
                    src.display(),
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
            Ok(())
        };
    let kobj = dir.join(format!("{fam}_emu.o"));
    compile(&unit, &kobj, sanitize, true)?;
    // The runtime is never instrumented: it calls the sanitizers' fiber and sync interfaces itself.
    let mut objs = vec![kobj];
    for rt in ["fk_emu_runtime", "fk_emu_mma"] {
        let o = dir.join(format!("{fam}_{rt}.o"));
        compile(&emu.join(format!("{rt}.cpp")), &o, &[], false)?;
        objs.push(o);
    }
    let mut cmd = tool.to_command();
    cmd.args(sanitize)
        .arg("-shared")
        .arg("-o")
        .arg(&lib)
        .args(&objs)
        .arg("-lpthread")
        .arg("-ldl");
    let o = cmd
        .output()
        .map_err(|e| format!("running the linker: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "emulator ({vname}): linking {} failed:\n{}",
            lib.display(),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    fs::write(&stamp_file, &stamp).map_err(|e| e.to_string())?;
    Ok(lib)
}

struct EmuKernel {
    name: String,
    max_threads: String,
    cluster: [String; 3],
}

/// Tokens of preprocessed C++: identifiers, numbers, string literals, single punctuation characters.
fn cpp_tokens(text: &str) -> Vec<&str> {
    let b = text.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'#' && (i == 0 || b[i - 1] == b'\n') {
            // A line marker: skip the line.
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'"' || c == b'\'' {
            let start = i;
            i += 1;
            while i < b.len() && b[i] != c {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i = (i + 1).min(b.len());
            toks.push(&text[start..i]);
        } else if c.is_ascii_alphanumeric() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'.') {
                i += 1;
            }
            toks.push(&text[start..i]);
        } else {
            toks.push(&text[i..i + 1]);
            i += 1;
        }
    }
    toks
}

/// The text inside the balanced parentheses opening at toks[open] and the index after them.
fn paren_text(toks: &[&str], open: usize) -> Option<(String, usize)> {
    if toks.get(open) != Some(&"(") {
        return None;
    }
    let mut depth = 0;
    let mut parts = Vec::new();
    for (j, t) in toks.iter().enumerate().skip(open) {
        match *t {
            "(" => {
                depth += 1;
                if depth == 1 {
                    continue;
                }
            }
            ")" => {
                depth -= 1;
                if depth == 0 {
                    return Some((parts.join(" "), j + 1));
                }
            }
            _ => {}
        }
        parts.push(*t);
    }
    None
}

/// The top-level comma-separated arguments of a macro-argument text.
fn split_args(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in text.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(cur.trim().to_string());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

/// Finds the kernels (`extern "C" __global__ void [attributes] name(`) of a family preprocessed with
/// FK_EMU_SCAN, with their launch bounds and cluster dims, and checks the emulator's conventions.
fn scan_kernels(text: &str) -> Result<Vec<EmuKernel>, String> {
    let toks = cpp_tokens(text);
    let mut found = Vec::new();
    for i in 0..toks.len() {
        if toks[i] == "__fk_shared__" && i > 0 && toks[i - 1] == "extern" {
            // Dynamic shared memory: every kernel names it fk_smem (the runtime defines it).
            let name = toks[i + 1..]
                .iter()
                .take_while(|t| **t != "[")
                .last()
                .copied()
                .unwrap_or("");
            if name != "fk_smem" {
                return Err(format!(
                    "`extern __shared__ ... {name}[]`: dynamic shared memory must be named fk_smem \
                     (the emulator backs that name)"
                ));
            }
        }
        if toks[i] != "__fk_global__" {
            continue;
        }
        let mut j = i + 1;
        let mut max_threads = "0".to_string();
        let mut cluster = ["0".to_string(), "0".to_string(), "0".to_string()];
        let mut name = None;
        while j + 1 < toks.len() {
            match toks[j] {
                "__fk_launch_bounds__" | "__fk_cluster_dims__" => {
                    let (inner, next) = paren_text(&toks, j + 1)
                        .ok_or_else(|| format!("unbalanced {} near token {j}", toks[j]))?;
                    let args = split_args(&inner);
                    if toks[j] == "__fk_launch_bounds__" {
                        max_threads = format!("({})", args.first().cloned().unwrap_or_default());
                    } else {
                        for (k, c) in cluster.iter_mut().enumerate() {
                            *c = args
                                .get(k)
                                .map(|a| format!("({a})"))
                                .unwrap_or_else(|| "1".into());
                        }
                    }
                    j = next;
                }
                t if toks[j + 1] == "("
                    && (t.as_bytes()[0].is_ascii_alphabetic() || t.starts_with('_')) =>
                {
                    name = Some(t.to_string());
                    break;
                }
                _ => j += 1,
            }
        }
        let name = name.ok_or("a __global__ without a kernel name")?;
        if !(i >= 2 && toks[i - 2] == "extern" && toks[i - 1] == "\"C\"") {
            return Err(format!(
                "kernel `{name}` is not extern \"C\": the emulator (and the Rust launcher) find kernels \
                 by their unmangled names"
            ));
        }
        found.push(EmuKernel {
            name,
            max_threads,
            cluster,
        });
    }
    Ok(found)
}
