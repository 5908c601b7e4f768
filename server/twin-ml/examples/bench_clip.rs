//! Benchmark of the CLIP image path: the vision tower + projection of ViT-B/32 (`--arch b32`,
//! the default) or ViT-L/14 (`--arch l14`) on one `[batch, 3, 224, 224]` tensor already on the
//! device in the model's kind (median of `--reps` runs after `--warmup`), both through
//! `image_features` (what callers use: the last layer computes the class token only) and through
//! `vision_forward` (every output, like transformers' forward); and, unless `--forward-only`,
//! preprocessing throughput on 640×480 images, all of them per `preprocess_batch` call. Runs on
//! `--device cpu` (the default) or `cuda`, in `--dtype f32` or `bf16` (default `auto`: the
//! device's compute kind, bf16 on CUDA and f32 on the CPU, as `ClipModel::load` picks); on CUDA
//! the clock starts and stops after `tch::Cuda::synchronize`, so images/s = batch / median
//! seconds of finished work.
//!
//! With `--workdir` (what `deploy/bench-clip.sh` passes) it uses what
//! `bench/clip_reference.py` left there, the same weights, input batch and PNGs transformers
//! was timed on, and first checks that the embeddings (raw, and L2-normalised: the parity
//! number) and pixel values agree with transformers', both computed in the same dtype. Without
//! it, a seeded random model and generated images are used.
//!
//! ```text
//! cargo run --release -p twin-ml --example bench_clip -- [--workdir DIR] [--threads 2] [--batch 8]
//!     [--reps 7] [--warmup 2] [--preprocess-rounds 4] [--device cpu|cuda] [--dtype auto|f32|bf16]
//!     [--arch b32|l14] [--forward-only]
//! ```
//! Prints a human summary and one line `RESULT {json}`; on CUDA with peak GPU memory from NVML
//! and the driver's free memory (`examples/common/gpu_memory.rs`: tch cannot read libtorch's
//! allocator statistics).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use twin_ml::clip::{ClipConfig, ClipModel, ClipPreprocessor};
use twin_ml::tch::{self, Device, Kind, Tensor};
use twin_ml::weights::read_safetensors;

#[path = "common/gpu_memory.rs"]
mod gpu_memory;

struct Args {
    workdir: Option<PathBuf>,
    threads: i32,
    batch: i64,
    reps: usize,
    warmup: usize,
    preprocess_rounds: usize,
    cuda: bool,
    /// `None`: the device's compute kind (bf16 on CUDA, f32 on the CPU).
    kind: Option<Kind>,
    arch: String,
    forward_only: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        workdir: None,
        threads: 2,
        batch: 8,
        reps: 7,
        warmup: 2,
        preprocess_rounds: 8,
        cuda: false,
        kind: None,
        arch: "b32".into(),
        forward_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => {
                args.cuda = match value()?.as_str() {
                    "cpu" => false,
                    "cuda" => true,
                    other => bail!("--device {other}: cpu or cuda"),
                }
            }
            "--dtype" => {
                args.kind = match value()?.as_str() {
                    "f32" => Some(Kind::Float),
                    "bf16" => Some(Kind::BFloat16),
                    "auto" => None,
                    other => bail!("--dtype {other}: f32, bf16 or auto"),
                }
            }
            "--arch" => {
                args.arch = value()?;
                arch_config(&args.arch)?;
            }
            "--forward-only" => args.forward_only = true,
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

/// The image tower and projection of `--arch`.
fn arch_config(arch: &str) -> anyhow::Result<ClipConfig> {
    Ok(match arch {
        "b32" => ClipConfig::vit_b32().vision_only(),
        "l14" => ClipConfig::vit_l14().vision_only(),
        other => bail!("--arch {other}: b32 or l14"),
    })
}

fn dtype_name(kind: Kind) -> &'static str {
    if kind == Kind::BFloat16 {
        "bf16"
    } else {
        "f32"
    }
}

/// Waits until the work queued on `device` is done, so a clock read after it times finished
/// work: CUDA kernels run asynchronously, CPU ones have finished when their call returns.
fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// L2-normalised rows in f32 (CLIP compares embeddings by cosine).
fn normalized(embeds: &Tensor) -> Tensor {
    let e = embeds.to_kind(Kind::Float);
    let norm = e.norm_scalaropt_dim(2, [-1], true);
    e / norm
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
    // Before anything touches CUDA, so the sampler's baseline is other processes' memory only.
    let sampler = args.cuda.then(gpu_memory::GpuMemory::start);
    tch::set_num_threads(args.threads);
    let device = if args.cuda {
        twin_ml::device::select(twin_ml::DeviceRequest::Cuda)?
    } else {
        Device::Cpu
    };
    let command: Vec<String> = std::env::args().skip(1).collect();
    println!(
        "command: cargo run --release -p twin-ml --example bench_clip -- {}",
        command.join(" ")
    );
    println!(
        "machine: {} ({} logical CPUs), libtorch threads {}, device {}",
        cpu_model(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        tch::get_num_threads(),
        twin_ml::device::describe()
    );
    let arch = arch_config(&args.arch)?;
    let kind = args
        .kind
        .unwrap_or_else(|| twin_ml::device::compute_kind(device));

    let (model, preprocessor, pixel_values, images, reference) = match &args.workdir {
        Some(dir) => {
            let model_dir = dir.join("model");
            let model = ClipModel::load_as(&model_dir, device, kind)?;
            let (ours, wanted) = (&model.config().vision, &arch.vision);
            if (ours.hidden_size, ours.num_hidden_layers, ours.patch_size)
                != (
                    wanted.hidden_size,
                    wanted.num_hidden_layers,
                    wanted.patch_size,
                )
            {
                bail!(
                    "{} is not --arch {}: pass the arch the reference was run with",
                    model_dir.display(),
                    args.arch
                );
            }
            let preprocessor = ClipPreprocessor::load(&model_dir)?;
            let reference: std::collections::BTreeMap<String, Tensor> =
                read_safetensors(&dir.join("reference.safetensors"))?
                    .into_iter()
                    .collect();
            let pixel_values = reference
                .get("pixel_values")
                .context("reference lacks pixel_values")?
                .shallow_clone();
            let images = if args.forward_only {
                Vec::new()
            } else {
                let mut paths: Vec<PathBuf> = std::fs::read_dir(dir.join("images"))?
                    .map(|e| e.map(|e| e.path()))
                    .collect::<Result<_, _>>()?;
                paths.sort();
                paths
                    .iter()
                    .map(|p| image::open(p).with_context(|| p.display().to_string()))
                    .collect::<anyhow::Result<Vec<_>>>()?
            };
            (model, preprocessor, pixel_values, images, Some(reference))
        }
        None => {
            // Seeded random weights in f32, saved and loaded back so the model computes in
            // the kind asked for on the device asked for, as with a workdir.
            let scratch = tempfile::tempdir()?;
            ClipModel::init_random(arch, 0, Device::Cpu)?.save_pretrained(scratch.path())?;
            let model = ClipModel::load_as(scratch.path(), device, kind)?;
            let size = model.config().vision.image_size;
            tch::manual_seed(1);
            let pixel_values =
                Tensor::randn([args.batch, 3, size, size], (Kind::Float, Device::Cpu));
            (
                model,
                ClipPreprocessor::clip_default(size as usize),
                pixel_values,
                generated_images(8),
                None,
            )
        }
    };
    let pixel_values = pixel_values.narrow(0, 0, args.batch.min(pixel_values.size()[0]));
    let batch = pixel_values.size()[0];
    // Timed on pixels already on the device in the model's kind, as the reference times them.
    let model_pixels = pixel_values.to_device(device).to_kind(model.kind());

    let mut parity = serde_json::Map::new();
    if let Some(reference) = &reference {
        let ours = model.image_features(&model_pixels)?;
        let theirs = reference
            .get("image_embeds")
            .context("reference lacks image_embeds")?
            .narrow(0, 0, batch)
            .to_device(device);
        let d = max_abs_diff(&ours, &theirs);
        let dn = max_abs_diff(&normalized(&ours), &normalized(&theirs));
        println!(
            "parity ({}): image_embeds max |diff| vs transformers {d:.3e}, normalised {dn:.3e}",
            dtype_name(model.kind())
        );
        parity.insert("image_embeds_max_abs_diff".into(), d.into());
        parity.insert("normalized_embeds_max_abs_diff".into(), dn.into());
        if let (Some(expected), false) = (reference.get("image_pixel_values"), images.is_empty()) {
            let d = max_abs_diff(&preprocessor.preprocess_batch(&images)?, expected);
            println!(
                "parity: pixel_values of the 640x480 images max |diff| vs transformers {d:.3e}"
            );
            parity.insert("pixel_values_max_abs_diff".into(), d.into());
        }
    }

    // The two paths alternate within each repetition so machine noise hits both alike.
    for _ in 0..args.warmup {
        let _ = model.image_features(&model_pixels)?;
        let _ = model.vision_forward(&model_pixels)?;
    }
    let (mut samples, mut full_samples) =
        (Vec::with_capacity(args.reps), Vec::with_capacity(args.reps));
    for _ in 0..args.reps {
        synchronize(device);
        let start = Instant::now();
        let out = model.image_features(&model_pixels)?;
        synchronize(device);
        samples.push(start.elapsed().as_secs_f64() * 1e3);
        drop(out);
        let start = Instant::now();
        let out = model.vision_forward(&model_pixels)?;
        synchronize(device);
        full_samples.push(start.elapsed().as_secs_f64() * 1e3);
        drop(out);
    }
    let forward_ms = median_ms(samples.clone());
    let full_forward_ms = median_ms(full_samples.clone());

    let preprocess = if args.forward_only {
        None
    } else {
        let _ = preprocessor.preprocess_batch(&images[..1])?;
        let start = Instant::now();
        for _ in 0..args.preprocess_rounds {
            let _ = preprocessor.preprocess_batch(&images)?;
        }
        let preprocessed = args.preprocess_rounds * images.len();
        Some((
            preprocessed,
            preprocessed as f64 / start.elapsed().as_secs_f64(),
        ))
    };

    println!(
        "forward (image_features): {} {}, batch {batch}, median {forward_ms:.1} ms over {} reps ({:.1} images/s); samples {:?}",
        args.arch,
        dtype_name(model.kind()),
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
    if let Some((preprocessed, per_s)) = preprocess {
        println!(
            "preprocess: {per_s:.1} images/s ({preprocessed} images of 640x480, {} per call)",
            images.len()
        );
    }
    let mut result = serde_json::json!({
        "side": "twin-ml",
        "device": if args.cuda { "cuda" } else { "cpu" },
        "dtype": dtype_name(model.kind()),
        "arch": args.arch,
        "threads": tch::get_num_threads(),
        "batch": batch,
        "reps": args.reps,
        "forward_ms_median": forward_ms,
        "forward_ms_all": samples,
        "forward_images_per_s": batch as f64 / forward_ms * 1e3,
        // Image embeddings per second: image_features is how this crate computes them.
        "images_per_s": batch as f64 / forward_ms * 1e3,
        "full_forward_ms_median": full_forward_ms,
        "full_forward_ms_all": full_samples,
        "full_forward_images_per_s": batch as f64 / full_forward_ms * 1e3,
        "parity": parity,
    });
    if let Some((preprocessed, per_s)) = preprocess {
        result["preprocess_images_per_s"] = per_s.into();
        result["preprocess_images"] = preprocessed.into();
    }
    if let (Some(fields), Some(object)) = (
        gpu_memory::fields(sampler).as_object(),
        result.as_object_mut(),
    ) {
        object.extend(fields.clone());
    }
    println!("RESULT {result}");
    Ok(())
}
