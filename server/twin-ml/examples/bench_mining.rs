//! Benchmark of the mining index on clustered synthetic embeddings (dimension 512): HNSW build
//! and query time, recall@10 against exact search, exact search time with libtorch on the CPU,
//! and, as the same-run baseline, the build with the naive dot product.
//!
//! `cargo run --release -p twin-ml --example bench_mining [-- --sizes 10000,100000]
//!  [--ef-construction N] [--ef-search N] [--image-spread X] [--sweep] [--full-exact]
//!  [--exact-only]`
//!
//! `--sweep` also builds with (ef_construction, ef_search) = (40, 40) and (64, 64) at every
//! size, to tune the defaults. `--image-spread X` draws images X from their instance centre
//! instead of 0.35 (0.6 makes instances of a category overlap). `--full-exact` also times exact
//! global search of every row above 10k rows (otherwise it is extrapolated from the 1,000-query
//! sample, and the summary says so). `--exact-only` skips everything HNSW.

use std::hint::black_box;
use std::time::Instant;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use twin_ml::index::synthetic::{ClusteredSpec, clustered};
use twin_ml::index::{
    Determinism, DotKernel, EmbeddingMatrix, HnswIndex, HnswParams, Queries, Scope, dot, dot_naive,
    recall_at_k, sample_queries, search_exact,
};
use twin_ml::tch::Device;

const DIM: usize = 512;
const K: usize = 10;
const SAMPLE: usize = 1000;
const SAMPLE_SEED: u64 = 42;
/// Rows of the naive-kernel baseline build (it is slow: one size is enough for the ratio).
const NAIVE_ROWS: usize = 10_000;

struct Args {
    sizes: Vec<usize>,
    params: HnswParams,
    sweep: bool,
    full_exact: bool,
    exact_only: bool,
    image_spread: Option<f32>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        sizes: vec![10_000, 100_000],
        params: HnswParams {
            determinism: Determinism::Parallel,
            ..HnswParams::default()
        },
        sweep: false,
        full_exact: false,
        exact_only: false,
        image_spread: None,
    };
    let mut raw = std::env::args().skip(1);
    while let Some(flag) = raw.next() {
        let mut value = || raw.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--sizes" => {
                args.sizes = value()?
                    .split(',')
                    .map(|s| s.trim().parse().context("--sizes takes numbers"))
                    .collect::<anyhow::Result<_>>()?;
            }
            "--ef-construction" => args.params.ef_construction = value()?.parse()?,
            "--ef-search" => args.params.ef_search = value()?.parse()?,
            "--image-spread" => args.image_spread = Some(value()?.parse()?),
            "--sweep" => args.sweep = true,
            "--full-exact" => args.full_exact = true,
            "--exact-only" => args.exact_only = true,
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(args)
}

/// Categories of 40 instances × 5 images, as many as make `rows`; `image_spread` overrides the
/// default 0.35 (0.6, the instance spread, makes instances overlap: a harder set).
fn spec(rows: usize, image_spread: Option<f32>) -> ClusteredSpec {
    let spec = ClusteredSpec::new(rows / 200, 40, 5, DIM, 2026);
    ClusteredSpec {
        image_spread: image_spread.unwrap_or(spec.image_spread),
        ..spec
    }
}

fn seconds(started: Instant) -> f64 {
    (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    json!({
        "cpu": cpu,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "rayon_threads": rayon::current_num_threads(),
        "torch_threads": twin_ml::tch::get_num_threads(),
        "device": twin_ml::device::describe(),
    })
}

/// Nanoseconds per dot product of two 512-wide rows, vectorised and naive, over the same pairs:
/// pairs among 64 rows (128 KiB, cache-resident: the arithmetic) and pairs spread over the whole
/// matrix (mostly cache misses: what a graph walk over a large index also pays).
fn kernel_micro(matrix: &EmbeddingMatrix) -> Value {
    let time = |kernel: fn(&[f32], &[f32]) -> f32, span: usize| {
        let pairs: Vec<(usize, usize)> = (0..4096)
            .map(|i| ((i * 31 + 7) % span, (i * 7919 + 13) % span))
            .collect();
        let rounds = 200;
        let started = Instant::now();
        let mut total = 0.0f32;
        for _ in 0..rounds {
            for &(a, b) in &pairs {
                total += kernel(black_box(matrix.row(a)), black_box(matrix.row(b)));
            }
        }
        black_box(total);
        started.elapsed().as_nanos() as f64 / (rounds * pairs.len()) as f64
    };
    let round = |ns: f64| (ns * 10.0).round() / 10.0;
    let cached = (time(dot, 64), time(dot_naive, 64));
    let spread = (time(dot, matrix.len()), time(dot_naive, matrix.len()));
    json!({
        "cached_ns_vectorised": round(cached.0),
        "cached_ns_naive": round(cached.1),
        "cached_ratio": (cached.1 / cached.0 * 100.0).round() / 100.0,
        "spread_ns_vectorised": round(spread.0),
        "spread_ns_naive": round(spread.1),
        "spread_ratio": (spread.1 / spread.0 * 100.0).round() / 100.0,
    })
}

/// Build, query every row, and recall@k against exact search on the query sample.
fn hnsw_run(
    matrix: &EmbeddingMatrix,
    scope: Scope,
    params: &HnswParams,
    exact_sample: &twin_ml::index::Neighbours,
) -> anyhow::Result<Value> {
    let started = Instant::now();
    let index = HnswIndex::build(matrix, scope, K, params)?;
    let build_s = seconds(started);
    let started = Instant::now();
    let approx = index.search(Queries::All)?;
    let query_s = seconds(started);
    let recall = recall_at_k(&approx, exact_sample, K);
    println!(
        "  hnsw {scope:?} ef_construction={} ef_search={} {:?}: build {build_s} s, query {query_s} s, recall@{K} {:.4}",
        params.ef_construction, params.ef_search, params.determinism, recall.recall
    );
    Ok(json!({
        "rows": matrix.len(),
        "scope": scope,
        "ef_construction": params.ef_construction,
        "ef_search": params.ef_search,
        "determinism": params.determinism,
        "kernel": params.kernel,
        "build_s": build_s,
        "query_all_s": query_s,
        "query_us_per_row": (query_s * 1e6 / matrix.len() as f64).round(),
        "recall_at_10": (recall.recall * 10000.0).round() / 10000.0,
        "recall_queries": recall.queries,
    }))
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let command =
        std::iter::once("cargo run --release -p twin-ml --example bench_mining --".to_owned())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" ");
    println!("command: {command}");
    let machine = machine();
    println!("machine: {machine}");

    let mut sizes = Vec::new();
    let mut kernel = Value::Null;
    let mut naive = Value::Null;
    let mut sweep = Vec::new();
    let started_all = Instant::now();
    for (at, &rows) in args.sizes.iter().enumerate() {
        let started = Instant::now();
        let shape = spec(rows, args.image_spread);
        let matrix = clustered(&shape)?;
        println!("{rows} rows × {DIM}: generated in {} s", seconds(started));
        if at == 0 {
            kernel = kernel_micro(&matrix);
            println!("  dot kernel: {kernel}");
        }

        let sample = sample_queries(matrix.len(), SAMPLE, SAMPLE_SEED);
        let mut exact = serde_json::Map::new();
        let mut exact_samples = Vec::new();
        for scope in [Scope::Global, Scope::PerCategory] {
            let started = Instant::now();
            let neighbours = search_exact(&matrix, scope, K, Queries::Rows(&sample), Device::Cpu)?;
            let sample_s = seconds(started);
            println!("  exact {scope:?}, {SAMPLE} queries: {sample_s} s");
            exact.insert(format!("{scope:?}_sample_s"), json!(sample_s));
            exact_samples.push((scope, neighbours));
        }
        // Per category, exact search multiplies each category by itself: cheap at any size.
        let started = Instant::now();
        search_exact(&matrix, Scope::PerCategory, K, Queries::All, Device::Cpu)?;
        let all_s = seconds(started);
        println!("  exact PerCategory, all {rows} queries: {all_s} s");
        exact.insert("PerCategory_all_s".into(), json!(all_s));
        if rows <= 10_000 || args.full_exact {
            let started = Instant::now();
            search_exact(&matrix, Scope::Global, K, Queries::All, Device::Cpu)?;
            let all_s = seconds(started);
            println!("  exact Global, all {rows} queries: {all_s} s");
            exact.insert("Global_all_s".into(), json!(all_s));
        } else {
            let sample_s = exact["Global_sample_s"].as_f64().unwrap_or(0.0);
            let estimate = (sample_s * rows as f64 / SAMPLE as f64).round();
            exact.insert("Global_all_s_extrapolated".into(), json!(estimate));
        }
        if args.exact_only {
            sizes.push(json!({ "rows": rows, "exact_cpu": exact }));
            continue;
        }

        if args.sweep {
            for (ef_construction, ef_search) in [(40, 40), (64, 64)] {
                let params = HnswParams {
                    ef_construction,
                    ef_search,
                    ..args.params
                };
                sweep.push(hnsw_run(
                    &matrix,
                    Scope::Global,
                    &params,
                    &exact_samples[0].1,
                )?);
            }
        }

        let mut hnsw = Vec::new();
        for (scope, exact_sample) in &exact_samples {
            hnsw.push(hnsw_run(&matrix, *scope, &args.params, exact_sample)?);
        }
        if rows == NAIVE_ROWS {
            let deterministic = HnswParams {
                determinism: Determinism::Deterministic,
                ..args.params
            };
            hnsw.push(hnsw_run(
                &matrix,
                Scope::Global,
                &deterministic,
                &exact_samples[0].1,
            )?);
            let baseline = HnswParams {
                kernel: DotKernel::Naive,
                ..args.params
            };
            let naive_run = hnsw_run(&matrix, Scope::Global, &baseline, &exact_samples[0].1)?;
            let ratio = naive_run["build_s"].as_f64().unwrap_or(0.0)
                / hnsw[0]["build_s"].as_f64().unwrap_or(f64::NAN);
            naive = json!({
                "rows": rows,
                "naive": naive_run,
                "build_ratio_naive_over_vectorised": (ratio * 100.0).round() / 100.0,
            });
        }
        sizes.push(json!({
            "rows": rows,
            "categories": shape.categories,
            "instances": shape.categories * shape.instances_per_category,
            "image_spread": (f64::from(shape.image_spread) * 100.0).round() / 100.0,
            "hnsw": hnsw,
            "exact_cpu": exact,
        }));
    }

    let summary = json!({
        "benchmark": "bench_mining",
        "command": command,
        "machine": machine,
        "dim": DIM,
        "k": K,
        "recall_sample": SAMPLE,
        "dot_kernel": kernel,
        "sizes": sizes,
        "naive_baseline": naive,
        "sweep": sweep,
        "total_s": seconds(started_all),
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
