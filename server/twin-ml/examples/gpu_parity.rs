//! Parity on a device: every f32 fixture run in f32 against its (CPU-made) expected outputs with
//! the fixture's own tolerance, and every bf16 fixture run in bf16 against transformers' bf16
//! outputs with the bf16 tolerances its `meta.json` states (`twin_ml::parity`; fixture sets made
//! by `tests/fixtures/make_parity_fixtures.py`, layout in `tests/fixtures/parity/README.md`).
//!
//! ```text
//! gpu_parity --fixtures DIR [--fixtures DIR …] [--bf16-fixtures DIR …] [--device cuda|cpu]
//!     --out results.json
//! ```
//!
//! On CUDA, TF32 is turned off first (cuBLAS and cuDNN, through twin-ml's CUDA shim), so an f32
//! run is f32 and the CPU's 1e-4 tolerances apply; if it cannot be turned off the program stops
//! before running anything. Prints each fixture's report (max |diff| against the tolerance per
//! output), writes `results.json` (per fixture: device, dtype, each output's max_abs_diff,
//! tolerance and verdict, greedy-token equality) and one `RESULT {json}` summary line, and exits
//! non-zero if any fixture is not as expected: a match fixture outside a tolerance, a
//! must-mismatch fixture inside all of them, a fixture that could not run, or a fixture of the
//! wrong precision for its flag. `--device cpu` runs the same checks on the CPU (bf16 fixtures
//! made with `--device cpu --dtype bfloat16`), which tests the whole path without a GPU.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use twin_ml::parity::{self, Fixture, FixtureDtype, FixtureReport};
use twin_ml::tch::Device;

struct Args {
    fixtures: Vec<PathBuf>,
    bf16_fixtures: Vec<PathBuf>,
    device: String,
    out: PathBuf,
}

const USAGE: &str = "gpu_parity --fixtures DIR [--fixtures DIR ...] [--bf16-fixtures DIR ...] \
                     [--device cuda|cpu] --out results.json";

fn parse_args() -> anyhow::Result<Args> {
    let mut fixtures = Vec::new();
    let mut bf16_fixtures = Vec::new();
    let mut device = "cuda".to_owned();
    let mut out = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--fixtures" => fixtures.push(PathBuf::from(value()?)),
            "--bf16-fixtures" => bf16_fixtures.push(PathBuf::from(value()?)),
            "--device" => device = value()?,
            "--out" => out = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\nusage: {USAGE}"),
        }
    }
    if fixtures.is_empty() && bf16_fixtures.is_empty() {
        bail!("no fixture sets given\nusage: {USAGE}");
    }
    let out = out.with_context(|| format!("--out is required\nusage: {USAGE}"))?;
    Ok(Args {
        fixtures,
        bf16_fixtures,
        device,
        out,
    })
}

/// The device, with TF32 off where it is CUDA.
fn open_device(name: &str) -> anyhow::Result<(Device, &'static str)> {
    match name {
        "cpu" => Ok((Device::Cpu, "not applicable (cpu)")),
        "cuda" => {
            let device = twin_ml::device::select(twin_ml::DeviceRequest::Cuda)?;
            // An f32 run held to the CPU's tolerances must not round matmul and convolution
            // inputs to TF32's 10 mantissa bits; libtorch allows it for cuDNN by default.
            twin_ml::cuda_graph::set_tf32(false)
                .map_err(|e| anyhow::anyhow!("turning TF32 off failed: {e}"))?;
            Ok((device, "off"))
        }
        other => bail!("--device {other:?}: cuda or cpu"),
    }
}

/// One fixture's entry in results.json.
fn fixture_json(set: &Path, report: &FixtureReport, meta_device: &str) -> Value {
    let outputs: Vec<Value> = report
        .outputs
        .iter()
        .map(|o| {
            json!({
                "name": o.name,
                "shape": o.shape,
                // JSON has no infinity: a shape mismatch or a NaN is null here, and fails.
                "max_abs_diff": o.max_abs_diff.is_finite().then_some(o.max_abs_diff),
                "tolerance": o.tolerance,
                "within_tolerance": o.within_tolerance(),
                "shape_mismatch": o.shape_mismatch,
            })
        })
        .collect();
    json!({
        "fixture": report.fixture,
        "set": set.display().to_string(),
        "kind": report.kind,
        "device": report.device,
        "dtype": report.dtype,
        "reference_device": meta_device,
        "reference_dtype": parity::dtype_name(report.reference_dtype.kind()),
        "expect": format!("{:?}", report.expect).to_lowercase(),
        "as_expected": report.as_expected(),
        // Compared exactly (an integer output); null where the fixture compares none.
        "greedy_tokens_equal": report
            .output("greedy_tokens")
            .map(|o| o.shape_mismatch.is_none() && o.max_abs_diff == 0.0),
        "outputs": outputs,
        "error": null,
    })
}

/// Runs every fixture of the sets given, expecting `dtype`; returns their JSON entries and the
/// names of the fixtures that were not as expected.
fn run_sets(
    sets: &[PathBuf],
    dtype: FixtureDtype,
    device: Device,
    entries: &mut Vec<Value>,
    unexpected: &mut Vec<String>,
) -> anyhow::Result<()> {
    let kind = dtype.kind();
    let dtype_name = parity::dtype_name(kind);
    for set in sets {
        let dirs = parity::fixture_dirs(set)
            .with_context(|| format!("listing fixtures in {}", set.display()))?;
        if dirs.is_empty() {
            bail!(
                "no fixtures (directories with a meta.json) in {}",
                set.display()
            );
        }
        for dir in dirs {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let started = Instant::now();
            let outcome = Fixture::open(&dir).and_then(|fixture| {
                // A set's flag says what precision its fixtures are: a bf16 fixture run in f32
                // (or the other way round) would be judged by the wrong tolerances.
                if fixture.meta.dtype != dtype {
                    return Err(twin_ml::MlError::Invalid(format!(
                        "its meta.json says {}, the set was given as {dtype_name}",
                        parity::dtype_name(fixture.meta.dtype.kind())
                    )));
                }
                let report = parity::run_fixture_as(&dir, device, kind)?;
                Ok((fixture.meta.device, report))
            });
            match outcome {
                Ok((meta_device, report)) => {
                    print!("{report}");
                    println!("  ({:.1} s)", started.elapsed().as_secs_f64());
                    let device_kind = if device.is_cuda() { "cuda" } else { "cpu" };
                    if dtype == FixtureDtype::Bfloat16 && meta_device != device_kind {
                        // Still compared: bf16 rounding differs little between devices, but
                        // the claim "against transformers on the same device" does not hold.
                        println!(
                            "  note: the bf16 reference ran on {meta_device}, this run on \
                             {device_kind}"
                        );
                    }
                    if !report.as_expected() {
                        unexpected.push(format!("{}/{name}", set.display()));
                    }
                    entries.push(fixture_json(set, &report, &meta_device));
                }
                Err(e) => {
                    println!("{name} ({dtype_name}): COULD NOT RUN: {e}");
                    unexpected.push(format!("{}/{name}", set.display()));
                    entries.push(json!({
                        "fixture": name,
                        "set": set.display().to_string(),
                        "dtype": dtype_name,
                        "as_expected": false,
                        "error": e.to_string(),
                    }));
                }
            }
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let started = Instant::now();
    let (device, tf32) = open_device(&args.device)?;
    println!(
        "gpu_parity on {} ({}), TF32 {tf32}",
        twin_ml::device::name(device),
        twin_ml::device::describe()
    );
    let mut entries = Vec::new();
    let mut unexpected = Vec::new();
    run_sets(
        &args.fixtures,
        FixtureDtype::Float32,
        device,
        &mut entries,
        &mut unexpected,
    )?;
    run_sets(
        &args.bf16_fixtures,
        FixtureDtype::Bfloat16,
        device,
        &mut entries,
        &mut unexpected,
    )?;
    let passed = unexpected.is_empty();
    let seconds = started.elapsed().as_secs_f64();
    let results = json!({
        "device": twin_ml::device::name(device),
        "device_description": twin_ml::device::describe(),
        "tf32": tf32,
        "f32_sets": args.fixtures.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "bf16_sets": args.bf16_fixtures.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "fixtures": entries,
        "unexpected": unexpected,
        "passed": passed,
        "seconds": seconds,
    });
    let text = serde_json::to_string_pretty(&results)?;
    std::fs::write(&args.out, text + "\n")
        .with_context(|| format!("writing {}", args.out.display()))?;
    let summary = json!({
        "device": twin_ml::device::name(device),
        "tf32": tf32,
        "fixtures": entries.len(),
        "greedy_equal": entries.iter().filter(|e| e["greedy_tokens_equal"] == json!(true)).count(),
        "greedy_compared": entries.iter().filter(|e| e["greedy_tokens_equal"].is_boolean()).count(),
        "unexpected": unexpected,
        "passed": passed,
        "seconds": (seconds * 10.0).round() / 10.0,
    });
    println!("RESULT {summary}");
    if !passed {
        bail!(
            "{} fixture(s) not as expected (details in {})",
            summary["unexpected"].as_array().map_or(0, Vec::len),
            args.out.display()
        );
    }
    println!(
        "all {} fixtures as expected; results in {}",
        entries.len(),
        args.out.display()
    );
    Ok(())
}
