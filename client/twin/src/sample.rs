//! A generated image set: each instance is a distinct shape and colour, each view a shifted,
//! re-lit render of it, so instances are near-duplicates within and distinct across.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use image::{ImageFormat, Rgb, RgbImage};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::Failure;

#[derive(Args)]
pub struct SampleArgs {
    /// Directory to create.
    pub dir: PathBuf,
    #[arg(long, default_value_t = 3)]
    pub categories: usize,
    #[arg(long, default_value_t = 4)]
    pub instances: usize,
    #[arg(long, default_value_t = 3)]
    pub views: usize,
    #[arg(long, default_value_t = 96)]
    pub size: u32,
    /// Also write this many corrupt files (truncated PNGs), to see them rejected.
    #[arg(long, default_value_t = 0)]
    pub corrupt: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

const CATEGORIES: [&str; 6] = ["mug", "sneaker", "lamp", "backpack", "kettle", "chair"];

fn render(
    size: u32,
    colour: [u8; 3],
    shape: u32,
    shift: (i32, i32),
    light: f32,
    rng: &mut StdRng,
) -> RgbImage {
    let bg = [
        rng.random_range(180..255u8),
        rng.random_range(180..255u8),
        rng.random_range(180..255u8),
    ];
    RgbImage::from_fn(size, size, |x, y| {
        let (cx, cy) = (
            (size as i32 / 2 + shift.0) as f32,
            (size as i32 / 2 + shift.1) as f32,
        );
        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
        let r = size as f32 * 0.3;
        let inside = match shape % 3 {
            0 => dx * dx + dy * dy < r * r,
            1 => dx.abs() < r && dy.abs() < r * 0.6,
            _ => dy > -r && dy.abs() + dx.abs() * 1.5 < r,
        };
        let c = if inside { colour } else { bg };
        Rgb(c.map(|v| ((v as f32) * light).clamp(0.0, 255.0) as u8))
    })
}

pub fn run(args: &SampleArgs) -> Result<(), Failure> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut written = 0;
    for c in 0..args.categories {
        let category = CATEGORIES
            .get(c)
            .map_or_else(|| format!("category-{c}"), |s| s.to_string());
        for i in 0..args.instances {
            let dir = args.dir.join(&category).join(format!("{category}-{i:02}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let colour = [rng.random(), rng.random(), rng.random()];
            let shape = rng.random_range(0..3);
            for v in 0..args.views {
                let shift = (rng.random_range(-8..8), rng.random_range(-8..8));
                let img = render(
                    args.size,
                    colour,
                    shape,
                    shift,
                    rng.random_range(0.8..1.2),
                    &mut rng,
                );
                let (ext, format) = if v % 2 == 0 {
                    ("png", ImageFormat::Png)
                } else {
                    ("jpg", ImageFormat::Jpeg)
                };
                let path = dir.join(format!("view-{v}.{ext}"));
                img.save_with_format(&path, format)
                    .with_context(|| format!("writing {}", path.display()))?;
                written += 1;
            }
        }
    }
    for k in 0..args.corrupt {
        let dir = args.dir.join(CATEGORIES[0]).join("broken");
        std::fs::create_dir_all(&dir)?;
        let mut png = Vec::new();
        RgbImage::new(32, 32).write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png)?;
        png.truncate(png.len() / 2);
        std::fs::write(dir.join(format!("corrupt-{k}.png")), png)?;
    }
    println!(
        "wrote {written} images and {} corrupt files under {}",
        args.corrupt,
        args.dir.display()
    );
    Ok(())
}
