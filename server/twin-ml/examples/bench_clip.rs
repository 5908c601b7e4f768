//! Benchmark of the CLIP image path, f32 on the CPU: the ViT-B/32 vision tower + projection on
//! one `[batch, 3, 224, 224]` tensor (median of `--reps` runs after `--warmup`), both through
//! `image_features` (what callers use: the last layer computes the class token only) and through
//! `vision_forward` (every output, like transformers' forward); and preprocessing throughput on
//! 640×480 images, all of them per `preprocess_batch` call.
//!
//! With `--workdir` (what `deploy/bench-clip.sh` passes) it uses what
//! `bench/clip_reference.py` left there, the same weights, input batch and PNGs transformers
//! was timed on, and first checks that the embeddings and pixel values agree with transformers'.
//! Without it, a seeded random model and generated images are used.
//!
//! ```text
//! cargo run --release -p twin-ml --example bench_clip -- [--workdir DIR] [--threads 2] [--batch 8]
//!     [--reps 7] [--warmup 2] [--preprocess-rounds 4]
//! ```
//! Prints a human summary and one line `RESULT {json}`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use twin_ml::clip::{ClipConfig, ClipModel, ClipPreprocessor};
use twin_ml::tch::{self, Device, Kind, Tensor};
use twin_ml::weights::read_safetensors;

struct Args {
    workdir: Option<PathBuf>,
    threads: i32,
    batch: i64,
    reps: usize,
    warmup: usize,
    preprocess_rounds: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        workdir: None,
        threads: 2,
        batch: 8,
        reps: 7,
        warmup: 2,
        preprocess_rounds: 8,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--workdir" => args.workdir = Some(PathBuf::from(value()?)),
            "--threads" => args.threads = value()?.parse()?,
            "--batch" => args.batch = value()?.parse()?,
            "--reps" => args.reps = value()?.parse()?,
            "--warmup" => args.warmup = value()?.parse()?,
            "--preprocess-rounds" => args.preprocess_rounds = value()?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    if args.reps == 0 || args.batch <= 0 || args.threads <= 0 {
        bail!("--reps, --batch and --threads must be positive");
    }
    Ok(args)
}

fn median_ms(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Photo-like 640×480 images for runs without a workdir.
fn generated_images(count: usize) -> Vec<image::DynamicImage> {
    (0..count)
        .map(|i| {
            let f = 0.01 + i as f32 * 0.003;
            image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(640, 480, |x, y| {
                let v = |phase: f32| {
                    (127.0 + 100.0 * (f * x as f32 + 0.7 * f * y as f32 + phase).sin()) as u8
                };
                image::Rgb([v(0.0), v(2.0), v(4.0)])
            }))
        })
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    tch::set_num_threads(args.threads);
    let command: Vec<String> = std::env::args().skip(1).collect();
    println!(
        "command: cargo run --release -p twin-ml --example bench_clip -- {}",
        command.join(" ")
    );
    println!(
        "machine: {} ({} logical CPUs), libtorch threads {}",
        cpu_model(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        tch::get_num_threads()
    );

    let (model, preprocessor, pixel_values, images, reference) = match &args.workdir {
        Some(dir) => {
            let model_dir = dir.join("model");
            let model = ClipModel::load(&model_dir, Device::Cpu)?;
            let preprocessor = ClipPreprocessor::load(&model_dir)?;
            let reference: std::collections::BTreeMap<String, Tensor> =
                read_safetensors(&dir.join("reference.safetensors"))?
                    .into_iter()
                    .collect();
            let pixel_values = reference
                .get("pixel_values")
                .context("reference lacks pixel_values")?
                .shallow_clone();
            let mut paths: Vec<PathBuf> = std::fs::read_dir(dir.join("images"))?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()?;
            paths.sort();
            let images = paths
                .iter()
                .map(|p| image::open(p).with_context(|| p.display().to_string()))
                .collect::<anyhow::Result<Vec<_>>>()?;
            (model, preprocessor, pixel_values, images, Some(reference))
        }
        None => {
            let model =
                ClipModel::init_random(ClipConfig::vit_b32().vision_only(), 0, Device::Cpu)?;
            tch::manual_seed(1);
            let pixel_values = Tensor::randn([args.batch, 3, 224, 224], (Kind::Float, Device::Cpu));
            (
                model,
                ClipPreprocessor::clip_default(224),
                pixel_values,
                generated_images(8),
                None,
            )
        }
    };
    let pixel_values = pixel_values.narrow(0, 0, args.batch.min(pixel_values.size()[0]));
    let batch = pixel_values.size()[0];

    let mut parity = serde_json::Map::new();
    if let Some(reference) = &reference {
        let ours = model.image_features(&pixel_values)?;
        let theirs = reference
            .get("image_embeds")
            .context("reference lacks image_embeds")?;
        let d = max_abs_diff(&ours, &theirs.narrow(0, 0, batch));
        println!("parity: image_embeds max |diff| vs transformers {d:.3e}");
        parity.insert("image_embeds_max_abs_diff".into(), d.into());
        if let Some(expected) = reference.get("image_pixel_values") {
            let d = max_abs_diff(&preprocessor.preprocess_batch(&images)?, expected);
            println!(
                "parity: pixel_values of the 640x480 images max |diff| vs transformers {d:.3e}"
            );
            parity.insert("pixel_values_max_abs_diff".into(), d.into());
        }
    }

    // The two paths alternate within each repetition so machine noise hits both alike.
    for _ in 0..args.warmup {
        let _ = model.image_features(&pixel_values)?;
        let _ = model.vision_forward(&pixel_values)?;
    }
    let (mut samples, mut full_samples) =
        (Vec::with_capacity(args.reps), Vec::with_capacity(args.reps));
    for _ in 0..args.reps {
        let start = Instant::now();
        let out = model.image_features(&pixel_values)?;
        // Reading one value makes sure the work is done, not just queued.
        let _ = out.double_value(&[0, 0]);
        samples.push(start.elapsed().as_secs_f64() * 1e3);
        let start = Instant::now();
        let out = model.vision_forward(&pixel_values)?;
        let _ = out.image_embeds.double_value(&[0, 0]);
        full_samples.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let forward_ms = median_ms(samples.clone());
    let full_forward_ms = median_ms(full_samples.clone());

    let _ = preprocessor.preprocess_batch(&images[..1])?;
    let start = Instant::now();
    for _ in 0..args.preprocess_rounds {
        let _ = preprocessor.preprocess_batch(&images)?;
    }
    let preprocessed = args.preprocess_rounds * images.len();
    let preprocess_per_s = preprocessed as f64 / start.elapsed().as_secs_f64();

    println!(
        "forward (image_features): batch {batch}, median {forward_ms:.1} ms over {} reps ({:.1} images/s); samples {:?}",
        args.reps,
        batch as f64 / forward_ms * 1e3,
        samples
            .iter()
            .map(|s| (s * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    println!(
        "forward (vision_forward, all outputs): median {full_forward_ms:.1} ms ({:.1} images/s); samples {:?}",
        batch as f64 / full_forward_ms * 1e3,
        full_samples
            .iter()
            .map(|s| (s * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    println!(
        "preprocess: {preprocess_per_s:.1} images/s ({preprocessed} images of 640x480, {} per call)",
        images.len()
    );
    let result = serde_json::json!({
        "side": "twin-ml",
        "threads": tch::get_num_threads(),
        "batch": batch,
        "reps": args.reps,
        "forward_ms_median": forward_ms,
        "forward_ms_all": samples,
        "forward_images_per_s": batch as f64 / forward_ms * 1e3,
        "full_forward_ms_median": full_forward_ms,
        "full_forward_ms_all": full_samples,
        "preprocess_images_per_s": preprocess_per_s,
        "preprocess_images": preprocessed,
        "parity": parity,
    });
    println!("RESULT {result}");
    Ok(())
}
