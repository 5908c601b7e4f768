//! `twin sample DIR`: a procedural image set (`twin_data::synth`) of product-like categories
//! whose instances differ in one hard detail, with an ingest manifest and the ground truth.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use twin_data::synth::{self, SheetLayout, SynthConfig};

use crate::Failure;

#[derive(Args)]
pub struct SampleArgs {
    /// Directory to create (or add to).
    pub dir: PathBuf,
    #[arg(long, default_value_t = 6)]
    pub categories: usize,
    #[arg(long, default_value_t = 4)]
    pub instances: usize,
    #[arg(long, default_value_t = 4)]
    pub views: usize,
    /// Image width and height in pixels.
    #[arg(long, default_value_t = 224)]
    pub size: u32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also write this many corrupt files (truncated PNGs), to see them rejected.
    #[arg(long, default_value_t = 0)]
    pub corrupt: usize,
    /// Also write a contact sheet (instances × views of the first categories) to this PNG.
    #[arg(long, value_name = "PNG")]
    pub contact_sheet: Option<PathBuf>,
}

pub fn run(args: &SampleArgs) -> Result<(), Failure> {
    let config = SynthConfig {
        categories: args.categories,
        instances: args.instances,
        views: args.views,
        size: args.size,
        seed: args.seed,
    };
    let summary = synth::generate(&config, &args.dir, args.corrupt)
        .with_context(|| format!("generating samples under {}", args.dir.display()))?;
    println!(
        "wrote {} images of {} instances in {} categories and {} corrupt files under {}",
        summary.images,
        summary.instances,
        summary.categories,
        summary.corrupt,
        args.dir.display()
    );
    println!(
        "manifest {}, ground truth {}",
        summary.manifest.display(),
        summary.instances_file.display()
    );
    if let Some(path) = &args.contact_sheet {
        let layout = SheetLayout {
            cell: args.size.min(SheetLayout::default().cell),
            ..SheetLayout::default()
        };
        synth::write_contact_sheet(&config, layout, path)
            .with_context(|| format!("writing the contact sheet {}", path.display()))?;
        println!("contact sheet {}", path.display());
    }
    Ok(())
}
