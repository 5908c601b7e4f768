//! The `build-dataset` stage: TWIN pair and multi questions from an ingested dataset and the
//! accepted hard negatives, exported as JSONL and parquet in the verl layout.
//!
//! The building itself is `twin_data::build` (pure and seeded); this stage fetches the inputs
//! the server pinned at submission, stores the manifest (whose hash is the dataset's identity)
//! and the exports as blobs, and reports the counts. Exported records name each image
//! `images/<sha256>.<ext>`, the layout `twin dataset export` writes.

use std::collections::BTreeMap;
use std::path::Path;

use twin_core::dataset::BuildDatasetOutput;
use twin_core::event::{JobOutput, ManifestEntry};
use twin_core::job::JobState;
use twin_core::spec::JobSpec;
use twin_core::{BlobHash, JobKind};
use twin_data::build::{BuildConfig, BuildInputs, ImageRef, NegativePair, Split};
use twin_data::export::{ExportOptions, PromptStyle};

use twin_stage::{Codec, Stage, StageContext, StageError};

pub struct BuildDatasetStage;

/// A JSONL input the server pinned (a manifest, a snapshot of accepted pairs).
fn jsonl<T: serde::Serialize + serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
) -> Result<Vec<T>, StageError> {
    twin_stage::JsonLines
        .decode(bytes)
        .map_err(|e| StageError::bad_input(format!("{what}: {e}")))
}

/// Where an exported record points for an image: `images/<sha256>.<ext>`.
pub fn image_file(image: &ImageRef) -> String {
    let ext = Path::new(&image.path)
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_else(|| "img".into());
    format!("images/{}.{ext}", image.blob)
}

impl Stage for BuildDatasetStage {
    fn kind(&self) -> JobKind {
        JobKind::BuildDataset
    }

    fn run(&self, job: &JobState, ctx: &StageContext) -> Result<JobOutput, StageError> {
        let JobSpec::BuildDataset(spec) = &job.submission.spec else {
            return Err(StageError::internal(
                "the build-dataset stage got another kind of job",
            ));
        };
        let config = BuildConfig::from_json(&spec.options)
            .map_err(|e| StageError::bad_input(format!("spec.options: {e}")))?;
        // The server pins the manifest at submission: a job without one is a server bug.
        let manifest = spec
            .manifest
            .ok_or_else(|| StageError::internal("spec.manifest was not pinned at submission"))?;
        let images: Vec<ManifestEntry> = jsonl(&ctx.download(&manifest)?, "the dataset manifest")?;
        let hard: Vec<NegativePair> = match spec.hard_negatives {
            Some(h) => jsonl(&ctx.download(&h)?, "the accepted hard negatives")?,
            None => Vec::new(),
        };
        let mut synthetic: Vec<NegativePair> = Vec::new();
        for h in &spec.synthetic {
            synthetic.extend(jsonl::<NegativePair>(
                &ctx.download(h)?,
                &format!("synthetic negatives {h}"),
            )?);
        }
        // Building, then exporting (no progress there: a shortfall must stay the last message).
        let steps = 2;
        ctx.progress(
            0,
            steps,
            &format!(
                "building from {} images, {} hard and {} synthetic negatives",
                images.len(),
                hard.len(),
                synthetic.len()
            ),
            BTreeMap::new(),
        );
        let dataset = twin_data::build::build(
            &BuildInputs {
                images: &images,
                hard_negatives: &hard,
                synthetic_negatives: &synthetic,
            },
            &config,
        )
        .map_err(|e| StageError::bad_input(e.to_string()))?;
        // The counts carry how many multi questions (or negatives) fell short, not why; the job's
        // last progress message, which its state keeps after it succeeds, says why.
        let shortfalls = dataset.shortfalls();
        if !shortfalls.is_empty() {
            ctx.progress(
                1,
                steps,
                &format!("built, short of: {}", shortfalls.join("; ")),
                BTreeMap::new(),
            );
        }
        let manifest = dataset.manifest();
        let stored = ctx.upload(manifest.bytes)?;
        debug_assert_eq!(stored, manifest.id);
        ctx.record_artefact("manifest", stored)?;
        let mut exports: BTreeMap<String, BlobHash> = BTreeMap::new();
        for split in [Split::Train, Split::Eval] {
            let options = ExportOptions {
                split,
                prompt: PromptStyle::Training,
            };
            let records = twin_data::export::records(&dataset, &options, image_file);
            let mut jsonl = Vec::new();
            let mut parquet = Vec::new();
            twin_data::export::write_jsonl(&records, &mut jsonl)
                .and_then(|()| twin_data::export::write_parquet(&records, &mut parquet))
                .map_err(|e| StageError::internal(format!("exporting {}: {e}", split.as_str())))?;
            for (name, bytes) in [
                (format!("{}.jsonl", split.as_str()), jsonl),
                (format!("{}.parquet", split.as_str()), parquet),
            ] {
                let hash: BlobHash = ctx.upload(bytes)?;
                ctx.record_artefact(&name, hash)?;
                exports.insert(name, hash);
            }
        }
        Ok(JobOutput::BuildDataset(BuildDatasetOutput {
            manifest: stored,
            exports,
            counts: dataset.flat_counts(),
        }))
    }
}
