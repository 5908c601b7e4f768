//! Gives twin-ml's own tests and examples an rpath to libtorch and passes its location on.
//!
//! torch-sys reports the library directory it linked against; binaries that embed twin-ml add it
//! as their rpath (see `twin_ml_build::rpath` use in twin-server's build script) so nobody has to
//! set `LD_LIBRARY_PATH`.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-env=TWIN_LIBTORCH_LIB={dir}");
        println!("cargo:libtorch_lib={dir}");
    }
}
