//! The compiler child for hosts that are not `twin-server` (tests, tools): compiles one module.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(twin_plugins::compile_main(&args));
}
