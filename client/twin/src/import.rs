//! `twin import twin|fgvqa`: the public TWIN and FGVQA parquet files into images, an ingest
//! manifest and a questions file (`twin_data::import`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use twin_data::import::{self, FgvqaImport, ImportSummary, MissingImages, TwinImport};

use crate::Failure;

#[derive(Subcommand)]
pub enum ImportCommand {
    /// TWIN training pairs (glab-caltech/TWIN): instances are the connected `yes` pairs.
    Twin {
        /// The parquet file of rows (question, answer, image_1, image_2).
        parquet: PathBuf,
        /// images.zip, or the directory it was extracted to.
        #[arg(long, value_name = "DIR_OR_ZIP")]
        images: PathBuf,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// The FGVQA benchmark (glab-caltech/FGVQA): images embedded or beside the parquet file.
    Fgvqa {
        /// The parquet file of rows (dataset_source, images, question, answer, question_type, extra).
        parquet: PathBuf,
        #[command(flatten)]
        output: OutputArgs,
    },
}

#[derive(Args)]
pub struct OutputArgs {
    /// Directory to write the images, manifest.jsonl and questions.jsonl to.
    #[arg(long)]
    out: PathBuf,
    /// Drop rows whose images are missing (and list them) instead of stopping at the first.
    #[arg(long)]
    skip_missing: bool,
}

impl OutputArgs {
    fn missing(&self) -> MissingImages {
        if self.skip_missing {
            MissingImages::Skip
        } else {
            MissingImages::Fail
        }
    }
}

pub fn run(command: &ImportCommand) -> Result<(), Failure> {
    let (summary, out) = match command {
        ImportCommand::Twin {
            parquet,
            images,
            output,
        } => (
            import::import_twin(&TwinImport {
                parquet: parquet.clone(),
                images: images.clone(),
                out: output.out.clone(),
                missing: output.missing(),
            })
            .context("importing TWIN")?,
            &output.out,
        ),
        ImportCommand::Fgvqa { parquet, output } => (
            import::import_fgvqa(&FgvqaImport {
                parquet: parquet.clone(),
                out: output.out.clone(),
                missing: output.missing(),
            })
            .context("importing FGVQA")?,
            &output.out,
        ),
    };
    report(&summary, out);
    Ok(())
}

fn report(s: &ImportSummary, out: &std::path::Path) {
    println!(
        "imported {} of {} rows: {} images of {} instances in {} categories under {}",
        s.rows_written,
        s.rows,
        s.images,
        s.instances,
        s.categories,
        out.display()
    );
    println!(
        "manifest {}, questions {}",
        s.manifest.display(),
        s.questions.display()
    );
    if !s.missing.is_empty() {
        println!(
            "{} missing images (their rows were dropped):",
            s.missing.len()
        );
        for m in s.missing.iter().take(20) {
            println!("  {m}");
        }
    }
    if s.conflicts > 0 {
        println!(
            "{} conflicts: `no` pairs inside one instance (TWIN) or images given two instance \
             ids (FGVQA, the first kept)",
            s.conflicts
        );
    }
}
