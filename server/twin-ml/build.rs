//! Gives twin-ml's own tests and examples an rpath to libtorch, passes its location on, and
//! builds the CUDA shim (csrc/cuda_graph.cpp) where libtorch has a CUDA build.
//!
//! torch-sys reports the library directory it linked against; binaries that embed twin-ml add it
//! as their rpath (see `twin_ml_build::rpath` use in twin-server's build script) so nobody has to
//! set `LD_LIBRARY_PATH`.
//!
//! The shim is a shared library of its own, linked against libtorch_cuda and embedded in the
//! crate (src/cuda_graph.rs writes it out and opens it once CUDA is loaded): linking it into
//! the binaries would make every one of them load the CUDA libraries at start, and fail to
//! start against a CPU-only libtorch. It needs libtorch_cuda and the CUDA runtime's headers
//! (the wheel's nvidia packages carry them: deploy/requirements-ml.txt adds the `crt` headers
//! the runtime's headers include). Without them the crate builds without the shim (cfg
//! `twin_cuda_shim` unset, with a build warning) and decodes eagerly everywhere.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/cuda_graph.cpp");
    println!("cargo:rerun-if-env-changed=TWIN_CUDA_INCLUDE");
    println!("cargo:rerun-if-env-changed=TWIN_NO_CUDA_SHIM");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rustc-check-cfg=cfg(twin_cuda_shim)");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    println!("cargo:rustc-env=TWIN_LIBTORCH_LIB={dir}");
    println!("cargo:libtorch_lib={dir}");
    if std::env::var_os("TWIN_NO_CUDA_SHIM").is_some() {
        println!("cargo:warning=TWIN_NO_CUDA_SHIM is set: built without CUDA graphs");
        return;
    }
    match build_shim(Path::new(&dir)) {
        Ok(()) => println!("cargo:rustc-cfg=twin_cuda_shim"),
        Err(why) => println!("cargo:warning=built without the CUDA shim (no CUDA graphs): {why}"),
    }
}

fn build_shim(lib: &Path) -> Result<(), String> {
    if !lib.join("libtorch_cuda.so").exists() {
        return Err(format!("{} has no libtorch_cuda.so", lib.display()));
    }
    let root = lib
        .parent()
        .ok_or("libtorch's lib directory has no parent")?;
    let cuda_include = cuda_include(lib).ok_or(
        "no CUDA runtime headers with crt/host_config.h found (set TWIN_CUDA_INCLUDE, CUDA_HOME, \
         or install deploy/requirements-ml.txt)",
    )?;
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let target = out.join("libtwin_cuda_graph.so");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    // cc picks the C++ compiler and target flags as torch-sys's own build does.
    let compiler = cc::Build::new()
        .cpp(true)
        .std("c++17")
        .pic(true)
        .opt_level(2)
        .cargo_metadata(false)
        .try_get_compiler()
        .map_err(|e| e.to_string())?;
    let mut command: Command = compiler.to_command();
    command
        .arg("-shared")
        .arg(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .arg("-I")
        .arg(root.join("include"))
        .arg("-I")
        .arg(root.join("include/torch/csrc/api/include"))
        .arg("-I")
        .arg(&cuda_include)
        .arg("csrc/cuda_graph.cpp")
        .arg("-o")
        .arg(&target)
        .arg("-L")
        .arg(lib)
        .args(["-ltorch_cuda", "-lc10_cuda", "-ltorch_cpu", "-lc10"]);
    let output = command
        .output()
        .map_err(|e| format!("running {command:?}: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let first: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("error"))
            .take(3)
            .collect();
        return Err(format!(
            "compiling csrc/cuda_graph.cpp failed: {}",
            first.join(" | ")
        ));
    }
    Ok(())
}

/// A directory holding `cuda_runtime_api.h` and `crt/host_config.h`: TWIN_CUDA_INCLUDE, then
/// `$CUDA_HOME/include`, the wheel's nvidia packages next to torch, /usr/local/cuda/include.
fn cuda_include(lib: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("TWIN_CUDA_INCLUDE") {
        candidates.push(dir.into());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            candidates.push(PathBuf::from(home).join("include"));
        }
    }
    // site-packages/torch/lib → site-packages/nvidia/<package>/include
    let nvidia = lib
        .canonicalize()
        .ok()
        .and_then(|l| Some(l.parent()?.parent()?.join("nvidia")));
    if let Some(entries) = nvidia.and_then(|dir| std::fs::read_dir(dir).ok()) {
        let mut dirs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path().join("include"))
            .collect();
        dirs.sort();
        candidates.extend(dirs);
    }
    candidates.push("/usr/local/cuda/include".into());
    candidates
        .into_iter()
        .find(|d| d.join("cuda_runtime_api.h").exists() && d.join("crt/host_config.h").exists())
}
