//! The `eval` stage: a Qwen2.5-VL checkpoint answers FGVQA-style questions, scorer modules grade
//! the answers, and the job reports per-subset accuracy.
//!
//! Questions come from a built dataset's eval split (the manifest pinned at submission; images
//! are blobs, shown at the size the dataset's exports give the model, within the checkpoint's
//! pixel bounds) or from a `questions.jsonl` written by `twin import` (images beside it, brought
//! within the spec's `image_bounds`: lmms-eval's by default, which the paper's FGVQA numbers
//! used, or the checkpoint's). The user turn is the images,
//! then the question followed by the evaluation instruction (`twin_data::prompts::eval_text`),
//! rendered with the checkpoint's chat template; decoding is greedy. Each completion is scored by
//! the job's pair or multi scorer module (the server pinned both to hashes), run by twin-plugins
//! as a `score` job runs rewards; the per-sample record's `parsed_answer` is the FGVQA rule's
//! reading of the completion (`twin_rules`), for people reading the samples.
//!
//! Faults. A checkpoint that does not load fails the job with the loader's error (which names
//! the file or tensor). An image that cannot be read fails the job naming the image and the
//! question: skipping it would change the denominator and make two evaluations of the same data
//! incomparable. Running out of memory fails the job with advice; the cached model and the
//! executor are unaffected, so later jobs run. A prompt longer than the model's context fails the
//! job with the engine's message, naming the question.
//!
//! Resume: two phases (`twin_stage::StageContext::phase`), `answers` (every completion) and
//! `samples` (the scored samples). While answering, the answers so far are checkpointed as
//! `answers.partial` (about once a minute). A job re-leased after its executor died regenerates
//! only the questions no earlier attempt answered with the weights the checkpoint directory holds
//! now, and skips scoring when the samples are there. The model lives in the executor's model
//! cache, keyed by the directory and a fingerprint of its files, so a checkpoint replaced in
//! place is loaded afresh.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use image::DynamicImage;
use serde::{Deserialize, Serialize};
use twin_core::eval::{
    AppliedImageBounds, EvalData, EvalFinish, EvalOutput, EvalSample, EvalSpec, ImageBounds,
    QuestionKind, QuestionsUpload, ScorerRef, ScorerSummary, subset_metrics,
};
use twin_core::event::JobOutput;
use twin_core::job::JobState;
use twin_core::score::{Grants, ModuleLimits};
use twin_core::spec::JobSpec;
use twin_core::{BlobHash, JobKind};
use twin_data::build::{BuiltDataset, ImageRef, RowKind, Split};
use twin_data::import::QuestionLine;
use twin_ml::MlError;
use twin_ml::device::JobDevice;
use twin_ml::qwen::{
    EngineOptions, FinishReason, GenerationRequest, Message, PreparedPrompt, QwenAssets,
    QwenPreprocessor, QwenProcessor, QwenVl, SamplingParams,
};
use twin_ml::tch::Device;
use twin_plugins::{Host, Module, PluginError, QuestionType, Rollout};
use twin_stage::{
    AllowedRoots, CachedModel, FileError, JsonLines, ModelCache, ModelKey, ModelStore, Stage,
    StageContext, StageError,
};

const ANSWERS: &str = "answers";
const SAMPLES: &str = "samples";
/// Shares of an evaluation's time: generation is nearly all of it, scoring is Wasm calls over
/// text.
const PLAN: [(&str, f64); 2] = [(ANSWERS, 0.9), (SAMPLES, 0.1)];
/// The model cache's family for Qwen2.5-VL checkpoints.
const QWEN_FAMILY: &str = "qwen2.5-vl";
/// Answers per scorer call.
const SCORE_BATCH: usize = 256;

/// A Qwen2.5-VL checkpoint as the model cache keeps it.
pub(crate) struct Qwen {
    pub model: QwenVl,
    pub assets: QwenAssets,
    pub hash: String,
    pub stops: Vec<i64>,
}

/// Runs `eval` jobs; scorer modules run on the shared plugin host, the model in the shared
/// model cache.
pub struct EvalStage {
    host: Arc<Host>,
    models: Arc<ModelCache>,
    store: Arc<ModelStore>,
}

impl EvalStage {
    pub fn new(host: Arc<Host>, models: Arc<ModelCache>, store: Arc<ModelStore>) -> Self {
        Self {
            host,
            models,
            store,
        }
    }

    fn key(dir: &str, device: &JobDevice) -> ModelKey {
        ModelKey::checkpoint(QWEN_FAMILY, Path::new(dir), &device.name)
    }

    /// The checkpoint at `dir` on `device`, from the cache or loaded.
    fn qwen(&self, dir: &str, device: &JobDevice) -> Result<CachedModel<Qwen>, StageError> {
        let kind = twin_ml::device::compute_kind(device.device);
        let expected = twin_ml::weights::Checkpoint::open(Path::new(dir))
            .map(|c| c.bytes_as(kind, |_| true))
            .unwrap_or(0);
        self.models
            .get_or_load_expecting(&Self::key(dir, device), expected, || {
                load(dir, device.device)
            })
    }

    /// The hash of the weights the checkpoint directory holds now: the cached model's when it
    /// is cached (its key fingerprints the files), otherwise read from the files.
    fn weights_hash(&self, dir: &str, device: &JobDevice) -> Result<String, StageError> {
        match self.models.get::<Qwen>(&Self::key(dir, device))? {
            Some(qwen) => Ok(qwen.hash.clone()),
            None => checkpoint_hash(dir),
        }
    }
}

/// Loads a checkpoint; returns it with the bytes its weights take on the device.
pub(crate) fn load(dir: &str, device: Device) -> Result<(Qwen, u64), StageError> {
    let path = Path::new(dir);
    let model = QwenVl::load(path, device).map_err(load_failure)?;
    let assets = QwenAssets::load(path, model.config()).map_err(load_failure)?;
    let hash = model
        .weights_hash()
        .ok_or_else(|| StageError::model("spec.model: the checkpoint has no weights hash"))?
        .to_owned();
    let stops = assets.stop_tokens(model.config());
    let bytes = model.resident_bytes();
    Ok((
        Qwen {
            model,
            assets,
            hash,
            stops,
        },
        bytes,
    ))
}

fn load_failure(e: MlError) -> StageError {
    StageError::new(e.loading_failure_code(), format!("spec.model: {e}"))
}

/// A libtorch-side failure as a job error. Allocation failures say what to change; everything
/// else keeps the ML layer's message (which names the tensor, file or limit).
pub(crate) fn ml_failure(what: &str, e: MlError) -> StageError {
    match e {
        MlError::OutOfMemory(_) => StageError::out_of_memory(format!(
            "{what}: {e}; lower spec.batch_size or spec.max_new_tokens (or use a device with \
             more memory)"
        )),
        e => StageError::new(e.failure_code(), format!("{what}: {e}")),
    }
}

/// Where a question's image comes from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ImageSource {
    /// A blob of the server's store (a built dataset's image), shown at `resized` (width,
    /// height), the size the dataset's exports give the model.
    Blob {
        hash: BlobHash,
        path: String,
        resized: (u32, u32),
    },
    /// A file; `name` is its path as questions.jsonl gives it. Read under the executor's
    /// allowed roots.
    File { path: PathBuf, name: String },
    /// An image of an uploaded questions file ([`EvalData::Uploaded`]); `name` as the file
    /// gives it.
    Uploaded { hash: BlobHash, name: String },
}

impl ImageSource {
    fn name(&self) -> &str {
        match self {
            ImageSource::Blob { path, .. } => path,
            ImageSource::File { name, .. } | ImageSource::Uploaded { name, .. } => name,
        }
    }
}

/// The pixel bounds the job's images are brought within. A built dataset's images keep the
/// checkpoint's, whatever the policy: they are shown at the size the dataset's exports give the
/// model in training, and other bounds would resize them again. An imported question's images
/// take the policy's.
pub(crate) fn image_bounds(
    data: &EvalData,
    policy: ImageBounds,
    checkpoint: &QwenPreprocessor,
) -> AppliedImageBounds {
    let policy = match data {
        EvalData::Built(_) => ImageBounds::Checkpoint,
        EvalData::Questions(_) | EvalData::Uploaded(_) => policy,
    };
    let (min_pixels, max_pixels) = policy
        .pixels()
        .unwrap_or((checkpoint.min_pixels, checkpoint.max_pixels));
    AppliedImageBounds {
        policy,
        min_pixels,
        max_pixels,
    }
}

/// One question to ask.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Question {
    pub id: String,
    pub subset: String,
    pub kind: QuestionKind,
    /// The question text, without the evaluation instruction.
    pub question: String,
    pub target: String,
    pub images: Vec<ImageSource>,
}

/// The eval split of a built dataset, every question under `subset`.
pub(crate) fn built_questions(dataset: &BuiltDataset, subset: &str) -> Vec<Question> {
    let image = |i: &ImageRef| ImageSource::Blob {
        hash: i.blob,
        path: i.path.clone(),
        resized: (i.resized_width, i.resized_height),
    };
    dataset
        .rows(Split::Eval)
        .map(|row| Question {
            id: row.id.clone(),
            subset: subset.to_owned(),
            kind: match row.kind {
                RowKind::Pair { .. } => QuestionKind::Pair,
                RowKind::Multi { .. } => QuestionKind::Multi,
            },
            question: row.question.clone(),
            target: row.answer.clone(),
            images: row.images.iter().map(image).collect(),
        })
        .collect()
}

/// A question line's type: `pairwise` (or `pair`) is a pair question and any other type a multi
/// question; without a type (TWIN's import), a yes/no answer makes a pair question and a count
/// 0–3 a multi question.
fn question_kind(line: &QuestionLine) -> Result<QuestionKind, String> {
    match line.question_type.as_deref().map(str::trim) {
        Some(t) if t.eq_ignore_ascii_case("pairwise") || t.eq_ignore_ascii_case("pair") => {
            Ok(QuestionKind::Pair)
        }
        Some(t) if !t.is_empty() => Ok(QuestionKind::Multi),
        _ => {
            let answer = line.answer.trim();
            if answer.eq_ignore_ascii_case("yes") || answer.eq_ignore_ascii_case("no") {
                Ok(QuestionKind::Pair)
            } else if matches!(answer, "0" | "1" | "2" | "3") {
                Ok(QuestionKind::Multi)
            } else {
                Err(format!(
                    "no question_type, and the answer {answer:?} is neither yes/no nor a count 0-3"
                ))
            }
        }
    }
}

/// The largest questions file read (FGVQA's 12k questions take ~3 MB).
pub(crate) const MAX_QUESTIONS_BYTES: u64 = 128 << 20;
/// The largest image file read.
pub(crate) const MAX_IMAGE_BYTES: u64 = 256 << 20;

/// The questions of a `questions.jsonl` on this machine (under the executor's allowed roots), in
/// file order; images resolved against its directory.
pub(crate) fn file_questions(
    files: &AllowedRoots,
    path: &Path,
) -> Result<Vec<Question>, StageError> {
    let field = |e: FileError| StageError::bad_input(format!("spec.data.questions: {e}"));
    let text = files
        .read_to_string(path, MAX_QUESTIONS_BYTES)
        .map_err(field)?;
    let resolved = files.resolve(path).map_err(field)?;
    let base = resolved.parent().unwrap_or(Path::new("/"));
    parse_questions(&text, &path.display().to_string(), &|p| {
        twin_data::import::safe_relative(p).map(|rel| ImageSource::File {
            path: base.join(rel),
            name: p.to_owned(),
        })
    })
}

/// The questions of an uploaded questions file, each image the blob uploaded for its name.
pub(crate) fn uploaded_questions(
    bundle: &BlobHash,
    ctx: &StageContext,
) -> Result<Vec<Question>, StageError> {
    let field = format!("spec.data.uploaded ({bundle})");
    let upload: QuestionsUpload = serde_json::from_slice(&ctx.download(bundle)?)
        .map_err(|_| StageError::bad_input(format!("{field}: not a questions upload")))?;
    let bytes = ctx.download(&upload.questions)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| StageError::bad_input(format!("{field}: the questions are not UTF-8")))?;
    parse_questions(text, &field, &|p| {
        upload.images.get(p).map(|hash| ImageSource::Uploaded {
            hash: *hash,
            name: p.to_owned(),
        })
    })
}

/// Questions from the lines of a questions file; `image` locates an image by the name a line
/// gives it (`None`: not one this file may name).
fn parse_questions(
    text: &str,
    shown: &str,
    image: &dyn Fn(&str) -> Option<ImageSource>,
) -> Result<Vec<Question>, StageError> {
    let mut questions = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let bad = |m: String| StageError::bad_input(format!("{shown} line {n}: {m}"));
        let line: QuestionLine = serde_json::from_str(raw).map_err(|e| bad(e.to_string()))?;
        let kind = question_kind(&line).map_err(bad)?;
        let subset = line
            .subset
            .clone()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "twin".to_owned());
        let question = match (line.question.trim().is_empty(), kind) {
            (false, _) => line.question.clone(),
            (true, QuestionKind::Pair) => twin_data::prompts::default_pair_question(&subset)
                .ok_or_else(|| {
                    bad(format!(
                        "the question is empty and subset `{subset}` has no default pair question"
                    ))
                })?
                .to_owned(),
            (true, QuestionKind::Multi) => {
                return Err(bad("the question is empty".into()));
            }
        };
        if line.images.is_empty() {
            return Err(bad("the question has no images".into()));
        }
        let images = line
            .images
            .iter()
            .map(|p| {
                image(p).ok_or_else(|| bad(format!("image {p:?} is not a relative path inside")))
            })
            .collect::<Result<_, _>>()?;
        questions.push(Question {
            id: format!("q{n}"),
            subset,
            kind,
            question,
            target: line.answer.clone(),
            images,
        });
    }
    Ok(questions)
}

/// The questions of the chosen subsets (case-insensitive; all when `subsets` is empty), at most
/// `limit` per subset, in data order.
pub(crate) fn select(
    questions: Vec<Question>,
    subsets: &[String],
    limit: Option<u32>,
) -> Result<Vec<Question>, StageError> {
    let present: std::collections::BTreeSet<String> =
        questions.iter().map(|q| q.subset.clone()).collect();
    if let Some(missing) = subsets
        .iter()
        .find(|s| !present.iter().any(|p| p.eq_ignore_ascii_case(s)))
    {
        return Err(StageError::bad_input(format!(
            "spec.subsets: no question is in subset `{missing}` (the data has: {})",
            present.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    let mut taken: HashMap<String, u32> = HashMap::new();
    let chosen: Vec<Question> = questions
        .into_iter()
        .filter(|q| subsets.is_empty() || subsets.iter().any(|s| s.eq_ignore_ascii_case(&q.subset)))
        .filter(|q| {
            let n = taken.entry(q.subset.clone()).or_default();
            *n += 1;
            limit.is_none_or(|l| *n <= l)
        })
        .collect();
    if chosen.is_empty() {
        return Err(StageError::bad_input("the data has no questions"));
    }
    Ok(chosen)
}

/// Reads and decodes a question's image; a built dataset's image is resized (Pillow's bicubic)
/// to the size its exports give the model, rounded as the processor rounds.
fn read_image(
    source: &ImageSource,
    question: &str,
    preprocessor: &QwenPreprocessor,
    fetch: &Fetch<'_>,
) -> Result<DynamicImage, StageError> {
    let name = source.name();
    let bad = |m: String| StageError::bad_input(format!("image {name} (question {question}): {m}"));
    let bytes =
        fetch(source).map_err(|e| e.context(format!("image {name} (question {question})")))?;
    let (_, image) = twin_data::decode::decode(&bytes).map_err(|e| bad(e.to_string()))?;
    let ImageSource::Blob {
        resized: (w, h), ..
    } = source
    else {
        return Ok(image);
    };
    preprocessor.resize_rounded(&image, *w, *h).map_err(bad)
}

/// Reads an image's bytes: a blob from the server's store, or a file under the allowed roots.
pub(crate) type Fetch<'a> = dyn Fn(&ImageSource) -> Result<Bytes, StageError> + 'a;

/// The bytes of `source`, as the job's [`Fetch`].
fn source_bytes(source: &ImageSource, ctx: &StageContext) -> Result<Bytes, StageError> {
    match source {
        ImageSource::Blob { hash, .. } | ImageSource::Uploaded { hash, .. } => ctx.download(hash),
        ImageSource::File { path, .. } => ctx
            .files()
            .read(path, MAX_IMAGE_BYTES)
            .map(Bytes::from)
            .map_err(|e| StageError::bad_input(e.to_string())),
    }
}
/// Sees each engine call's answers and how many questions are done.
pub(crate) type AfterBatch<'a> = dyn FnMut(&[Generation], usize) -> Result<(), StageError> + 'a;

/// A question's completion, before scoring. The `answers` artefact (and its checkpoints) hold
/// these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Generation {
    pub id: String,
    /// The weights that answered (a resumed job regenerates answers of other weights).
    pub model_hash: String,
    pub prompt: String,
    pub completion: String,
    pub finish: EvalFinish,
    pub tokens: u64,
    pub prompt_tokens: u64,
}

/// What generation needs: a loaded checkpoint and the job's limits.
pub(crate) struct Answerer<'a> {
    pub model: &'a QwenVl,
    pub assets: &'a QwenAssets,
    pub model_hash: &'a str,
    pub stops: &'a [i64],
    pub max_new_tokens: usize,
    pub batch_size: usize,
    /// The bounds of an imported question's images (`image_bounds`); a built dataset's images
    /// go through the checkpoint's processor as it is.
    pub image_bounds: AppliedImageBounds,
}

impl Answerer<'_> {
    /// Answers `questions` in engine calls of `batch_size` prompts, in order; `after_batch` sees
    /// each call's answers and how many questions are done (progress, checkpoints, cancellation).
    pub fn answer(
        &self,
        questions: &[&Question],
        fetch: &Fetch<'_>,
        after_batch: &mut AfterBatch<'_>,
    ) -> Result<Vec<Generation>, StageError> {
        let params = SamplingParams::greedy(self.max_new_tokens, self.stops.to_vec());
        let options = EngineOptions {
            max_batch_rows: self.batch_size,
            ..EngineOptions::default()
        };
        let checkpoint = &self.assets.processor;
        let imported = checkpoint
            .with_pixel_bounds(self.image_bounds.min_pixels, self.image_bounds.max_pixels)
            .map_err(|e| ml_failure("spec.image_bounds", e))?;
        let mut out = Vec::with_capacity(questions.len());
        for chunk in questions.chunks(self.batch_size.max(1)) {
            let mut prompts = Vec::with_capacity(chunk.len());
            for q in chunk {
                let processor = match q.images.first() {
                    Some(ImageSource::File { .. } | ImageSource::Uploaded { .. }) => &imported,
                    _ => checkpoint,
                };
                prompts.push(self.prompt(q, processor, fetch)?);
            }
            let requests: Vec<GenerationRequest<'_>> = prompts
                .iter()
                .map(|prompt| GenerationRequest {
                    prompt,
                    samples: 1,
                    params: &params,
                })
                .collect();
            let (completions, _) = twin_ml::qwen::generate(self.model, &requests, &options)
                .map_err(|e| engine_failure(e, chunk))?;
            let mut batch = Vec::with_capacity(chunk.len());
            for ((q, prompt), c) in chunk.iter().zip(&prompts).zip(completions) {
                let c = c.into_iter().next().ok_or_else(|| {
                    StageError::internal(format!(
                        "question {}: the engine returned no completion",
                        q.id
                    ))
                })?;
                let completion = self
                    .assets
                    .tokenizer
                    .decode(&c.tokens)
                    .map_err(|e| ml_failure(&format!("question {}", q.id), e))?;
                batch.push(Generation {
                    id: q.id.clone(),
                    model_hash: self.model_hash.to_owned(),
                    prompt: prompt.text.clone(),
                    completion,
                    finish: match c.finish {
                        FinishReason::Stop => EvalFinish::Stop,
                        FinishReason::Length => EvalFinish::Length,
                    },
                    tokens: c.tokens.len() as u64,
                    prompt_tokens: prompt.len() as u64,
                });
            }
            out.extend(batch.iter().cloned());
            after_batch(&batch, out.len())?;
        }
        Ok(out)
    }

    /// A question's prompt: its images read and brought within `processor`'s bounds, then the
    /// question and the evaluation instruction, under the checkpoint's chat template.
    fn prompt(
        &self,
        q: &Question,
        processor: &QwenProcessor,
        fetch: &Fetch<'_>,
    ) -> Result<PreparedPrompt, StageError> {
        let images = q
            .images
            .iter()
            .map(|s| read_image(s, &q.id, &processor.preprocessor, fetch))
            .collect::<Result<Vec<_>, _>>()?;
        let named: Vec<(&str, &DynamicImage)> = q
            .images
            .iter()
            .map(ImageSource::name)
            .zip(&images)
            .collect();
        let messages = [Message::user_with_images(
            images.len(),
            twin_data::prompts::eval_text(&q.question),
        )];
        processor
            .prepare(&self.assets.tokenizer, &messages, &named, true)
            .map_err(|e| ml_failure(&format!("question {}", q.id), e))
    }
}

/// The engine's error; one tied to a request names that request's question (and carries its
/// id as the detail).
fn engine_failure(e: MlError, chunk: &[&Question]) -> StageError {
    if let MlError::Request { index, message } = &e
        && let Some(q) = chunk.get(*index)
    {
        return StageError::new(e.failure_code(), format!("question {}: {message}", q.id))
            .with_detail(format!("question {}", q.id));
    }
    let first = chunk.first().map_or("", |q| q.id.as_str());
    let last = chunk.last().map_or("", |q| q.id.as_str());
    ml_failure(&format!("generating questions {first} to {last}"), e)
}

/// A scorer module ready to run.
pub(crate) struct Scorer<'a> {
    pub reference: &'a ScorerRef,
    pub hash: BlobHash,
    pub module: Arc<Module>,
}

/// Scores every answer with its question type's scorer; returns the samples in question order
/// and a summary of each scorer (keyed `pair`, `multi`).
pub(crate) fn score(
    host: &Host,
    scorers: &[(QuestionKind, Scorer<'_>)],
    grants: &Grants,
    limits: &ModuleLimits,
    questions: &[Question],
    answers: &HashMap<String, Generation>,
) -> Result<(Vec<EvalSample>, BTreeMap<String, ScorerSummary>), StageError> {
    let limits = host.config().limits.with_job_limits(limits);
    let mut scores: Vec<Option<f64>> = vec![None; questions.len()];
    let mut summaries = BTreeMap::new();
    for (kind, scorer) in scorers {
        let mine: Vec<usize> = (0..questions.len())
            .filter(|&i| questions[i].kind == *kind)
            .collect();
        let params = scorer.reference.params.to_string();
        let mut fuel = 0u64;
        for chunk in mine.chunks(SCORE_BATCH) {
            let rollouts = chunk
                .iter()
                .map(|&i| {
                    let q = &questions[i];
                    let a = answer_of(answers, q)?;
                    Ok(Rollout {
                        prompt: twin_data::prompts::eval_text(&q.question),
                        completion: a.completion.clone(),
                        ground_truth: q.target.clone(),
                        question_type: match kind {
                            QuestionKind::Pair => QuestionType::Pair,
                            QuestionKind::Multi => QuestionType::Multi,
                        },
                        metadata: serde_json::json!({"id": q.id, "subset": q.subset}).to_string(),
                    })
                })
                .collect::<Result<Vec<_>, StageError>>()?;
            let out = host
                .score(&scorer.module, &params, grants, Some(&limits), &rollouts)
                .map_err(|e| scorer_failure(*kind, &scorer.reference.module, &e))?;
            fuel = fuel.saturating_add(out.fuel_used);
            for (&i, s) in chunk.iter().zip(out.values) {
                scores[i] = Some(s.score);
            }
        }
        summaries.insert(
            kind.as_str().to_owned(),
            ScorerSummary {
                module: scorer.reference.module.clone(),
                module_hash: scorer.hash,
                module_version: scorer.module.descriptor.version.clone(),
                scored: mine.len() as u64,
                fuel_used: fuel,
            },
        );
    }
    let samples = questions
        .iter()
        .zip(scores)
        .map(|(q, score)| {
            let a = answer_of(answers, q)?;
            let score = score.ok_or_else(|| {
                StageError::internal(format!(
                    "question {}: no scorer for {} questions",
                    q.id,
                    q.kind.as_str()
                ))
            })?;
            Ok(EvalSample {
                id: q.id.clone(),
                subset: q.subset.clone(),
                question_type: q.kind,
                images: q.images.iter().map(|i| i.name().to_owned()).collect(),
                prompt: a.prompt.clone(),
                completion: a.completion.clone(),
                parsed_answer: match q.kind {
                    QuestionKind::Pair => twin_rules::fgvqa_pair_answer(&a.completion),
                    QuestionKind::Multi => twin_rules::fgvqa_multi_answer(&a.completion),
                },
                target: q.target.clone(),
                score,
                finish: a.finish,
                tokens: a.tokens,
                prompt_tokens: a.prompt_tokens,
            })
        })
        .collect::<Result<Vec<_>, StageError>>()?;
    Ok((samples, summaries))
}

fn answer_of<'a>(
    answers: &'a HashMap<String, Generation>,
    q: &Question,
) -> Result<&'a Generation, StageError> {
    answers
        .get(&q.id)
        .ok_or_else(|| StageError::internal(format!("question {}: no answer was generated", q.id)))
}

/// The job's output from its samples.
pub(crate) fn summarise(
    samples: &[EvalSample],
    model_hash: String,
    device: String,
    samples_blob: BlobHash,
    scorers: BTreeMap<String, ScorerSummary>,
    resumed: u64,
    started: Instant,
) -> EvalOutput {
    EvalOutput {
        model_hash,
        model_manifest: None,
        device,
        image_bounds: None,
        questions: samples.len() as u64,
        subsets: subset_metrics(
            samples
                .iter()
                .map(|s| (s.subset.as_str(), s.question_type, s.score)),
        ),
        samples: samples_blob,
        scorers,
        prompt_tokens: samples.iter().map(|s| s.prompt_tokens).sum(),
        generated_tokens: samples.iter().map(|s| s.tokens).sum(),
        truncated: samples
            .iter()
            .filter(|s| s.finish == EvalFinish::Length)
            .count() as u64,
        resumed,
        wall_seconds: started.elapsed().as_secs_f64(),
    }
}

/// A scorer module's failure as the job's, the host's code for it as the detail.
fn scorer_failure(kind: QuestionKind, module: &str, e: &PluginError) -> StageError {
    StageError::new(
        e.failure_code(),
        format!(
            "{} scorer (module {module}) failed [{}]: {e}",
            kind.as_str(),
            e.code()
        ),
    )
    .with_detail(e.code())
}

impl EvalStage {
    fn questions(&self, spec: &EvalSpec, ctx: &StageContext) -> Result<Vec<Question>, StageError> {
        let all = match &spec.data {
            EvalData::Built(reference) => {
                // The server pins the manifest at submission: a job without one is a server bug.
                let manifest = spec.manifest.ok_or_else(|| {
                    StageError::internal("spec.manifest was not pinned at submission")
                })?;
                let dataset = BuiltDataset::from_manifest(&ctx.download(&manifest)?)
                    .map_err(|e| StageError::bad_input(format!("built dataset {manifest}: {e}")))?;
                let name = spec.dataset_name.as_deref().unwrap_or(reference);
                built_questions(&dataset, name)
            }
            EvalData::Questions(path) => file_questions(ctx.files(), Path::new(path))?,
            EvalData::Uploaded(bundle) => uploaded_questions(bundle, ctx)?,
        };
        select(all, &spec.subsets, spec.limit)
    }

    /// The scorer modules, by the hashes the server pinned.
    fn scorers<'a>(
        &self,
        spec: &'a EvalSpec,
        ctx: &StageContext,
    ) -> Result<Vec<(QuestionKind, Scorer<'a>)>, StageError> {
        spec.scorers
            .each()
            .into_iter()
            .map(|(kind, reference)| {
                let hash = reference.module_hash.ok_or_else(|| {
                    StageError::internal(format!(
                        "spec.scorers.{}: module {} was not resolved to a hash",
                        kind.as_str(),
                        reference.module
                    ))
                })?;
                let module = match self.host.get(&hash.to_hex()) {
                    Some(m) => m,
                    None => self
                        .host
                        .load(&ctx.download(&hash)?)
                        .map_err(|e| scorer_failure(kind, &reference.module, &e))?,
                };
                Ok((
                    kind,
                    Scorer {
                        reference,
                        hash,
                        module,
                    },
                ))
            })
            .collect()
    }
}

impl Stage for EvalStage {
    fn kind(&self) -> JobKind {
        JobKind::Eval
    }

    fn run(&self, job: &JobState, ctx: &StageContext) -> Result<JobOutput, StageError> {
        let started = Instant::now();
        let JobSpec::Eval(spec) = &job.submission.spec else {
            return Err(StageError::internal(
                "the eval stage got another kind of job",
            ));
        };
        let device =
            twin_ml::device::for_job(spec.device).map_err(|e| ml_failure("spec.device", e))?;
        // Held to the end: the store keeps the model's files while the job may still load them.
        let checkpoint = self.store.resolve(ctx, &spec.model, spec.model_manifest)?;
        let model_dir = checkpoint.dir.to_string_lossy().into_owned();
        let questions = self.questions(spec, ctx)?;
        let scorers = self.scorers(spec, ctx)?;
        // Read from the file rather than the loaded model: a resumed job that loads no model
        // still reports them.
        let preprocessor = QwenPreprocessor::load(&checkpoint.dir).map_err(load_failure)?;
        let bounds = image_bounds(&spec.data, spec.image_bounds, &preprocessor);
        ctx.plan(&PLAN)?;
        let total = questions.len();

        // Answers recorded by an earlier attempt count only if they are of the weights the
        // directory holds now.
        let mut resumed = total;
        let answers = ctx.phase_checked(
            ANSWERS,
            JsonLines,
            |recorded: &Vec<Generation>| {
                let hash = self.weights_hash(&model_dir, &device)?;
                let answered: HashSet<&str> = recorded
                    .iter()
                    .filter(|g| g.model_hash == hash)
                    .map(|g| g.id.as_str())
                    .collect();
                Ok(questions.iter().all(|q| answered.contains(q.id.as_str())))
            },
            |p| {
                let qwen = self.qwen(&model_dir, &device)?;
                ctx.note(&qwen.note());
                let asked: HashSet<&str> = questions.iter().map(|q| q.id.as_str()).collect();
                // A checkpoint's answers of other weights (the directory changed between
                // attempts) are redone.
                let mut answers: Vec<Generation> = p.partial()?.unwrap_or_default();
                answers.retain(|g| g.model_hash == qwen.hash && asked.contains(g.id.as_str()));
                resumed = answers.len();
                if resumed > 0 {
                    p.progress(
                        resumed,
                        total,
                        &format!("resumed: {resumed} answers from an earlier attempt"),
                        BTreeMap::new(),
                    );
                }
                let answered: HashSet<String> = answers.iter().map(|g| g.id.clone()).collect();
                let todo: Vec<&Question> = questions
                    .iter()
                    .filter(|q| !answered.contains(&q.id))
                    .collect();
                let answerer = Answerer {
                    model: &qwen.model,
                    assets: &qwen.assets,
                    model_hash: &qwen.hash,
                    stops: &qwen.stops,
                    max_new_tokens: spec.max_new_tokens as usize,
                    batch_size: spec.batch_size as usize,
                    image_bounds: bounds,
                };
                let mut generated_tokens = 0u64;
                let fetch = |s: &ImageSource| source_bytes(s, ctx);
                answerer.answer(&todo, &fetch, &mut |batch, done| {
                    answers.extend(batch.iter().cloned());
                    generated_tokens += batch.iter().map(|g| g.tokens).sum::<u64>();
                    let answered = resumed + done;
                    p.progress(
                        answered,
                        total,
                        &format!("answered {answered} of {total} questions"),
                        BTreeMap::from([
                            ("answered".to_owned(), answered as f64),
                            ("generated_tokens".to_owned(), generated_tokens as f64),
                        ]),
                    );
                    ctx.check_cancelled()?;
                    if answered < total && p.checkpoint_due() {
                        p.checkpoint(&answers)?;
                    }
                    Ok(())
                })?;
                Ok(answers)
            },
        )?;
        // Every answer is of one model: the weights the phase checked or loaded.
        let model_hash = match answers.value.first() {
            Some(g) => g.model_hash.clone(),
            None => self.weights_hash(&model_dir, &device)?,
        };
        let answers: HashMap<String, Generation> = answers
            .value
            .into_iter()
            .map(|g| (g.id.clone(), g))
            .collect();

        let mut summaries = BTreeMap::new();
        let samples = ctx.phase(SAMPLES, JsonLines, |p| {
            p.progress(0, 1, &format!("scoring {total} answers"), BTreeMap::new());
            let (samples, scored) = score(
                &self.host,
                &scorers,
                &spec.grants,
                &spec.limits,
                &questions,
                &answers,
            )?;
            summaries = scored;
            Ok(samples)
        })?;
        if samples.resumed {
            // Scored by an earlier attempt: the counts are the samples', the fuel is not known.
            summaries = scorers
                .iter()
                .map(|(kind, s)| {
                    let summary = ScorerSummary {
                        module: s.reference.module.clone(),
                        module_hash: s.hash,
                        module_version: s.module.descriptor.version.clone(),
                        scored: samples
                            .value
                            .iter()
                            .filter(|x| x.question_type == *kind)
                            .count() as u64,
                        fuel_used: 0,
                    };
                    (kind.as_str().to_owned(), summary)
                })
                .collect();
        }
        let mut output = summarise(
            &samples.value,
            model_hash,
            device.name,
            samples.blob,
            summaries,
            resumed as u64,
            started,
        );
        output.model_manifest = Some(checkpoint.manifest);
        output.image_bounds = Some(bounds);
        Ok(JobOutput::Eval(output))
    }
}

/// The weights hash of a checkpoint directory, without loading it.
fn checkpoint_hash(dir: &str) -> Result<String, StageError> {
    twin_ml::weights::Checkpoint::open(Path::new(dir))
        .and_then(|c| c.weights_hash())
        .map_err(load_failure)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use twin_core::event::ManifestEntry;
    use twin_ml::qwen::{QwenTokenizer, QwenVlConfig};
    use twin_ml::tch::Kind;
    use twin_plugins::HostConfig;
    use twin_stage::testing::{MemoryBackend, job};

    /// A seeded random tiny checkpoint, as `twin-server model init-qwen --preset tiny` writes it.
    fn tiny_model(dir: &Path, seed: u64) {
        let model =
            QwenVl::init_random_scaled(QwenVlConfig::tiny(), seed, Device::Cpu, Kind::Float, 25.0)
                .unwrap();
        let preprocessor = QwenPreprocessor {
            max_pixels: 512 * 512,
            ..QwenPreprocessor::default()
        };
        model.save_pretrained(dir, &preprocessor).unwrap();
        QwenTokenizer::byte_level().unwrap().save(dir).unwrap();
    }

    /// A small PNG whose colours depend on `n`.
    fn png(path: &Path, n: u8, size: u32) {
        let img = image::RgbImage::from_fn(size, size, |x, y| {
            image::Rgb([n.wrapping_mul(40), (x * 4) as u8, (y * 4) as u8 ^ n])
        });
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        img.save(path).unwrap();
    }

    fn modules_dir() -> PathBuf {
        std::env::var_os("TWIN_MODULES_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/wasm32-wasip2/guest")
            })
    }

    fn module(host: &Host, name: &str) -> Arc<Module> {
        let path = modules_dir().join(format!("{name}.wasm"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; build the modules first with deploy/build-modules.sh",
                path.display()
            )
        });
        host.load(&bytes).unwrap()
    }

    fn line(subset: &str, kind: &str, question: &str, answer: &str, images: &[&str]) -> String {
        serde_json::json!({"subset": subset, "question_type": kind, "question": question,
                           "answer": answer, "images": images})
        .to_string()
    }

    /// Six questions in two subsets (CUB: three pairs and a multi; MET: a pair with an empty
    /// question and a multi), over eight images.
    fn questions_jsonl(dir: &Path) -> PathBuf {
        for n in 0..8u8 {
            png(&dir.join(format!("img/{n}.png")), n, 40 + u32::from(n) * 8);
        }
        let q = twin_data::prompts::CUB_PAIR_QUESTION;
        let m = twin_data::prompts::MULTI_QUESTION;
        let lines = [
            line("CUB", "pairwise", q, "yes", &["img/0.png", "img/1.png"]),
            line("CUB", "pairwise", q, "no", &["img/2.png", "img/3.png"]),
            line("MET", "pairwise", "", "no", &["img/4.png", "img/5.png"]),
            line(
                "CUB",
                "multi",
                m,
                "2",
                &["img/0.png", "img/1.png", "img/6.png", "img/7.png"],
            ),
            line(
                "MET",
                "multi",
                m,
                "0",
                &["img/4.png", "img/5.png", "img/6.png", "img/7.png"],
            ),
            line("CUB", "pairwise", q, "yes", &["img/6.png", "img/7.png"]),
        ];
        let path = dir.join("questions.jsonl");
        std::fs::write(&path, lines.join("\n") + "\n\n").unwrap();
        path
    }

    /// An eval stage, a memory backend holding the FGVQA scorers, and a job over `questions`
    /// answered by the checkpoint at `model`, two questions per engine call.
    fn eval_job(
        model: &Path,
        questions: &Path,
        models: &Arc<ModelCache>,
    ) -> (EvalStage, MemoryBackend, JobState) {
        let backend =
            MemoryBackend::new().with_allowed_roots(&[model.parent().expect("in a directory")]);
        let read = |name: &str| std::fs::read(modules_dir().join(format!("{name}.wasm"))).unwrap();
        let pair = backend.put(read("fgvqa_pair"));
        let multi = backend.put(read("fgvqa_multi"));
        let host = Arc::new(Host::new(HostConfig::default()).unwrap());
        let job = job(serde_json::json!({
            "kind": "eval",
            "model": model.to_str().unwrap(),
            "data": {"questions": questions.to_str().unwrap()},
            "device": "cpu", "batch_size": 2, "max_new_tokens": 6,
            "scorers": {
                "pair": {"module": "fgvqa-pair", "module_hash": pair.to_hex()},
                "multi": {"module": "fgvqa-multi", "module_hash": multi.to_hex()},
            },
        }));
        let store = model.parent().expect("in a directory").join("model-store");
        let store = Arc::new(ModelStore::open(store, 1 << 30).unwrap());
        (EvalStage::new(host, models.clone(), store), backend, job)
    }

    fn evaluated(out: JobOutput) -> EvalOutput {
        match out {
            JobOutput::Eval(out) => out,
            other => panic!("an eval job's output, got {other:?}"),
        }
    }

    #[test]
    fn a_job_stopped_mid_answering_resumes_from_its_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpt = tmp.path().join("qwen");
        tiny_model(&ckpt, 1);
        let questions = questions_jsonl(tmp.path());
        let models = Arc::new(ModelCache::new(1 << 30));

        // Start to finish, for comparison.
        let (stage, straight, job) = eval_job(&ckpt, &questions, &models);
        let whole = evaluated(stage.run(&job, &straight.context(&[])).unwrap());
        assert_eq!(straight.names(), [ANSWERS, SAMPLES]);
        assert_eq!((whole.questions, whole.resumed), (6, 0));
        assert_eq!(whole.image_bounds, Some(lmms_eval_bounds()));

        // The executor dies after the first engine call's checkpoint (two of six answers)...
        let (stage, backend, job) = eval_job(&ckpt, &questions, &models);
        backend.cancel_after("answers.partial");
        let attempt = |earlier: &[twin_core::job::Artefact]| {
            let ctx = backend
                .context(earlier)
                .with_checkpoint_every(std::time::Duration::ZERO);
            stage.run(&job, &ctx)
        };
        assert_eq!(attempt(&[]).unwrap_err(), StageError::cancelled());
        assert_eq!(backend.names(), ["answers.partial"]);

        // ...and the next attempt answers the other four, to the same samples.
        backend.reset_cancel();
        let resumed = evaluated(attempt(&backend.artefacts()).unwrap());
        assert_eq!(resumed.resumed, 2);
        assert_eq!(resumed.samples, whole.samples);
        assert_eq!(resumed.subsets, whole.subsets);
        assert_eq!(resumed.model_hash, whole.model_hash);
        assert!(
            backend.fractions().contains(&(
                Some(0.3),
                "resumed: 2 answers from an earlier attempt".into()
            )),
            "{:?}",
            backend.fractions()
        );
        let names = backend.names();
        assert_eq!(names[names.len() - 2..], [ANSWERS, SAMPLES]);

        // A third attempt only reports: both phases are done.
        let before = backend.artefacts().len();
        let again = evaluated(attempt(&backend.artefacts()).unwrap());
        assert_eq!((again.resumed, again.samples), (6, whole.samples));
        assert_eq!(again.scorers["pair"].scored, whole.scorers["pair"].scored);
        assert_eq!(backend.artefacts().len(), before);
        // One load served every attempt.
        assert_eq!(models.stats().misses, 1);

        // The checkpoint replaced in place: the answers of the old weights are redone.
        tiny_model(&ckpt, 2);
        let replaced = evaluated(attempt(&backend.artefacts()).unwrap());
        assert_ne!(replaced.model_hash, whole.model_hash);
        assert_eq!(replaced.resumed, 0);
        assert_eq!(models.stats().misses, 2);
        // New answers (of the new weights); the samples are recorded again unless the new
        // weights happened to say the same (the same blob is recorded once).
        assert_eq!(backend.names().iter().filter(|n| *n == ANSWERS).count(), 2);
    }

    fn lmms_eval_bounds() -> AppliedImageBounds {
        AppliedImageBounds {
            policy: ImageBounds::LmmsEval,
            min_pixels: 200_704,
            max_pixels: 1_605_632,
        }
    }

    /// A fetch with no blob store: files are read from disk.
    fn no_blobs(s: &ImageSource) -> Result<Bytes, StageError> {
        match s {
            ImageSource::File { path, .. } => std::fs::read(path)
                .map(Bytes::from)
                .map_err(|e| StageError::bad_input(format!("cannot read: {e}"))),
            other => Err(StageError::bad_input(format!(
                "no blob store here ({other:?})"
            ))),
        }
    }

    /// A questions file read with its own directory as the allowed root.
    fn questions_at(path: &Path) -> Result<Vec<Question>, StageError> {
        let dir = path.parent().unwrap().canonicalize().unwrap();
        file_questions(&AllowedRoots::new([dir]).unwrap(), path)
    }

    #[test]
    fn a_tiny_model_answers_and_the_scorer_modules_grade_the_answers() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpt = tmp.path().join("qwen");
        tiny_model(&ckpt, 1);
        let questions = select(
            questions_at(&questions_jsonl(tmp.path())).unwrap(),
            &[],
            None,
        )
        .unwrap();
        assert_eq!(questions.len(), 6);
        let (loaded, bytes) = load(ckpt.to_str().unwrap(), Device::Cpu).unwrap();
        assert_eq!(bytes, loaded.model.resident_bytes());
        let max_new_tokens = 12;
        let answerer = Answerer {
            model: &loaded.model,
            assets: &loaded.assets,
            model_hash: &loaded.hash,
            stops: &loaded.stops,
            max_new_tokens,
            batch_size: 4,
            image_bounds: lmms_eval_bounds(),
        };
        let refs: Vec<&Question> = questions.iter().collect();
        let mut batches = Vec::new();
        let answers = answerer
            .answer(&refs, &no_blobs, &mut |batch, done| {
                batches.push((batch.len(), done));
                Ok(())
            })
            .unwrap();
        // Engine calls of batch_size prompts; progress after each.
        assert_eq!(batches, [(4, 4), (2, 6)]);
        assert_eq!(answers.len(), 6);
        for (q, a) in questions.iter().zip(&answers) {
            assert_eq!(a.id, q.id);
            assert_eq!(a.model_hash, loaded.hash);
            assert!(a.tokens >= 1 && a.tokens <= max_new_tokens as u64, "{a:?}");
            assert_eq!(
                a.finish == EvalFinish::Length,
                a.tokens == max_new_tokens as u64,
                "{a:?}"
            );
            // Images first, then the question and the evaluation instruction, then the turn.
            let user = format!(
                "{}<|im_end|>\n<|im_start|>assistant\n",
                twin_data::prompts::eval_text(&q.question)
            );
            assert!(a.prompt.ends_with(&user), "{}", a.prompt);
            assert_eq!(
                a.prompt.matches("<|image_pad|>").count(),
                q.images.len(),
                "{}",
                a.prompt
            );
            assert!(a.prompt_tokens as usize > a.prompt.len() / 2, "{a:?}");
        }
        // MET's empty pair question took the subset's default text.
        assert!(
            answers[2]
                .prompt
                .contains(twin_data::prompts::MET_PAIR_QUESTION)
        );
        // Greedy decoding: the same answers again.
        let again = answerer
            .answer(&refs, &no_blobs, &mut |_, _| Ok(()))
            .unwrap();
        assert_eq!(
            again.iter().map(|a| &a.completion).collect::<Vec<_>>(),
            answers.iter().map(|a| &a.completion).collect::<Vec<_>>()
        );

        let host = Host::new(HostConfig::default()).unwrap();
        let pair_ref = ScorerRef {
            module: "fgvqa-pair".into(),
            module_hash: None,
            params: serde_json::json!({}),
        };
        let multi_ref = ScorerRef {
            module: "fgvqa-multi".into(),
            ..pair_ref.clone()
        };
        let pair = module(&host, "fgvqa_pair");
        let multi = module(&host, "fgvqa_multi");
        let scorers = [
            (
                QuestionKind::Pair,
                Scorer {
                    reference: &pair_ref,
                    hash: pair.hash.parse().unwrap(),
                    module: pair.clone(),
                },
            ),
            (
                QuestionKind::Multi,
                Scorer {
                    reference: &multi_ref,
                    hash: multi.hash.parse().unwrap(),
                    module: multi.clone(),
                },
            ),
        ];
        // Made-up completions with known answers, and the model's own.
        let mut known: HashMap<String, Generation> =
            answers.iter().map(|a| (a.id.clone(), a.clone())).collect();
        let said = [
            "Same bird. <answer>Yes</answer>",
            "<answer>yes</answer>",
            "They differ, so no.",
            "I count <answer> 2 </answer>.",
            "<answer>1</answer>",
            "",
        ];
        for (q, text) in questions.iter().zip(said) {
            known.get_mut(&q.id).unwrap().completion = text.to_owned();
        }
        let (samples, summaries) = score(
            &host,
            &scorers,
            &Grants::default(),
            &ModuleLimits::default(),
            &questions,
            &known,
        )
        .unwrap();
        let scores: Vec<f64> = samples.iter().map(|s| s.score).collect();
        assert_eq!(scores, [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
        let parsed: Vec<&str> = samples.iter().map(|s| s.parsed_answer.as_str()).collect();
        assert_eq!(parsed, ["yes", "yes", "no", "2", "1", ""]);
        assert_eq!(summaries["pair"].scored, 4);
        assert_eq!(summaries["multi"].scored, 2);
        assert_eq!(summaries["multi"].module_hash.to_hex(), multi.hash);
        let metrics = subset_metrics(
            samples
                .iter()
                .map(|s| (s.subset.as_str(), s.question_type, s.score)),
        );
        let cub = &metrics["CUB"];
        assert_eq!((cub.pair_count, cub.multi_count), (3, 1));
        assert_eq!(cub.pairwise_total, Some(1.0 / 3.0));
        assert_eq!(cub.multiple_choice_total, Some(1.0));
        assert_eq!(cub.overall_total, Some(0.5));
        assert_eq!(metrics["MET"].overall_total, Some(0.5));

        // The model's own answers: every score is the FGVQA rule's verdict, in [0, 1].
        let own: HashMap<String, Generation> =
            answers.iter().map(|a| (a.id.clone(), a.clone())).collect();
        let (samples, _) = score(
            &host,
            &scorers,
            &Grants::default(),
            &ModuleLimits::default(),
            &questions,
            &own,
        )
        .unwrap();
        for s in &samples {
            let rule = match s.question_type {
                QuestionKind::Pair => twin_rules::fgvqa_pair(&s.completion, &s.target),
                QuestionKind::Multi => twin_rules::fgvqa_multi(&s.completion, &s.target),
            };
            assert_eq!(s.score, rule, "{s:?}");
            assert_eq!(
                s.images,
                questions
                    .iter()
                    .find(|q| q.id == s.id)
                    .unwrap()
                    .images
                    .iter()
                    .map(|i| i.name().to_owned())
                    .collect::<Vec<_>>()
            );
        }
        let out = summarise(
            &samples,
            loaded.hash.clone(),
            "cpu".into(),
            BlobHash::of(&twin_stage::Codec::encode(&JsonLines, &samples).unwrap()),
            summaries,
            0,
            Instant::now(),
        );
        assert_eq!(out.questions, 6);
        assert_eq!(
            out.generated_tokens,
            answers.iter().map(|a| a.tokens).sum::<u64>()
        );
        for m in out.subsets.values() {
            for v in [m.pairwise_total, m.multiple_choice_total, m.overall_total]
                .into_iter()
                .flatten()
            {
                assert!((0.0..=1.0).contains(&v), "{m:?}");
            }
        }
    }

    #[test]
    fn an_unreadable_image_fails_naming_it_and_its_question() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpt = tmp.path().join("qwen");
        tiny_model(&ckpt, 2);
        png(&tmp.path().join("a.png"), 1, 32);
        std::fs::write(tmp.path().join("bad.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();
        std::fs::write(
            tmp.path().join("q.jsonl"),
            line("CUB", "pairwise", "Same?", "yes", &["a.png", "bad.png"]) + "\n",
        )
        .unwrap();
        let questions = questions_at(&tmp.path().join("q.jsonl")).unwrap();
        let loaded = load(ckpt.to_str().unwrap(), Device::Cpu).unwrap().0;
        let answerer = Answerer {
            model: &loaded.model,
            assets: &loaded.assets,
            model_hash: &loaded.hash,
            stops: &loaded.stops,
            max_new_tokens: 4,
            batch_size: 8,
            image_bounds: lmms_eval_bounds(),
        };
        let err = answerer
            .answer(&[&questions[0]], &no_blobs, &mut |_, _| Ok(()))
            .unwrap_err();
        assert!(
            err.message
                .starts_with("image bad.png (question q1): cannot decode"),
            "{err}"
        );
        assert!(!err.retryable);
    }

    /// The FGVQA protocol: lmms-eval gives Qwen2.5-VL's processor `min_pixels` 256·28·28 and
    /// `max_pixels` 2048·28·28 over the checkpoint's, so an imported question's small image is
    /// scaled up before the model sees it; `image_bounds: checkpoint` keeps the checkpoint's.
    #[test]
    fn an_imported_questions_image_reaches_the_model_at_lmms_evals_size() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpt = tmp.path().join("qwen");
        tiny_model(&ckpt, 5);
        // 100 wide, 80 high: 8000 pixels, below lmms-eval's min_pixels.
        let small = tmp.path().join("img/small.png");
        std::fs::create_dir_all(small.parent().unwrap()).unwrap();
        image::RgbImage::from_fn(100, 80, |x, y| image::Rgb([x as u8, y as u8, 7]))
            .save(&small)
            .unwrap();
        let path = tmp.path().join("q.jsonl");
        let images = ["img/small.png", "img/small.png"];
        std::fs::write(
            &path,
            line("CUB", "pairwise", "Same?", "yes", &images) + "\n",
        )
        .unwrap();
        let questions = questions_at(&path).unwrap();
        let loaded = load(ckpt.to_str().unwrap(), Device::Cpu).unwrap().0;
        let checkpoint = QwenPreprocessor::load(&ckpt).unwrap();
        assert_eq!(
            (checkpoint.min_pixels, checkpoint.max_pixels),
            (3136, 512 * 512)
        );

        // smart_resize by hand. Both sides round to multiples of 28: 80 → 84, 100 → 112, and
        // 84·112 = 9408 pixels. lmms-eval: below 200704, so scale by β = √(200704 / (80·100))
        // and round up to multiples of 28: 80β/28 = 14.31 → 15 (420), 100β/28 = 17.89 → 18
        // (504). The checkpoint: 9408 is within [3136, 262144], so 84×112 stays.
        let beta = (200_704f64 / (80.0 * 100.0)).sqrt();
        assert_eq!(
            ((80.0 * beta / 28.0).ceil(), (100.0 * beta / 28.0).ceil()),
            (15.0, 18.0)
        );
        let data = EvalData::Questions(path.to_string_lossy().into_owned());
        let cases = [
            (ImageBounds::LmmsEval, (200_704, 1_605_632), (420, 504)),
            (ImageBounds::Checkpoint, (3136, 512 * 512), (84, 112)),
        ];
        for (policy, (min_pixels, max_pixels), (height, width)) in cases {
            let bounds = image_bounds(&data, policy, &checkpoint);
            assert_eq!(
                bounds,
                AppliedImageBounds {
                    policy,
                    min_pixels,
                    max_pixels
                }
            );
            let answerer = Answerer {
                model: &loaded.model,
                assets: &loaded.assets,
                model_hash: &loaded.hash,
                stops: &loaded.stops,
                max_new_tokens: 1,
                batch_size: 1,
                image_bounds: bounds,
            };
            let answer = answerer
                .answer(&[&questions[0]], &no_blobs, &mut |_, _| Ok(()))
                .unwrap()
                .remove(0);
            // Each <|image_pad|> of the rendered prompt became one token per 2×2 block of 14-pixel
            // patches: (height / 28)·(width / 28).
            let text = loaded.assets.tokenizer.encode(&answer.prompt).unwrap();
            let pads = answer.prompt.matches("<|image_pad|>").count();
            assert_eq!(pads, 2);
            let per_image = (height / 28) * (width / 28);
            assert_eq!(
                answer.prompt_tokens as usize,
                text.len() - pads + pads * per_image,
                "{policy:?}: each image at {height}×{width}"
            );
        }
        assert_eq!(
            image_bounds(&data, ImageBounds::LmmsEval, &checkpoint),
            lmms_eval_bounds()
        );
        // A built dataset's images keep the checkpoint's bounds (their resized size is the
        // dataset's), and the output says so.
        let built = image_bounds(
            &EvalData::Built("pairs".into()),
            ImageBounds::LmmsEval,
            &checkpoint,
        );
        assert_eq!(
            built,
            AppliedImageBounds {
                policy: ImageBounds::Checkpoint,
                min_pixels: 3136,
                max_pixels: 512 * 512
            }
        );
    }

    #[test]
    fn a_checkpoint_missing_a_tensor_is_refused_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpt = tmp.path().join("qwen");
        tiny_model(&ckpt, 3);
        let weights = ckpt.join("model.safetensors");
        let mut bytes = std::fs::read(&weights).unwrap();
        let key = b"\"model.norm.weight\"";
        let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
        bytes[at + key.len() - 2] = b'X';
        std::fs::write(&weights, bytes).unwrap();
        let err = load(ckpt.to_str().unwrap(), Device::Cpu).err().unwrap();
        assert_eq!(err.code, twin_core::FailureCode::ModelError);
        assert!(
            err.message.starts_with("spec.model: checkpoint ")
                && err.message.ends_with("missing tensor `model.norm.weight`"),
            "{err}"
        );
    }

    #[test]
    fn the_stop_tokens_end_turns_and_text() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpt = tmp.path().join("qwen");
        tiny_model(&ckpt, 4);
        let loaded = load(ckpt.to_str().unwrap(), Device::Cpu).unwrap().0;
        assert!(loaded.stops.contains(&151_645), "{:?}", loaded.stops); // <|im_end|>
        assert!(loaded.stops.contains(&151_643), "{:?}", loaded.stops); // <|endoftext|>
        for id in &loaded.model.config().eos_token_ids {
            assert!(loaded.stops.contains(id));
        }
        assert!(loaded.stops.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn running_out_of_memory_says_what_to_lower() {
        let e = ml_failure(
            "generating questions q1 to q8",
            MlError::OutOfMemory("CUDA out of memory. Tried to allocate 2.00 GiB".into()),
        );
        assert_eq!(
            e.message,
            "generating questions q1 to q8: out of memory: CUDA out of memory. Tried to \
             allocate 2.00 GiB; lower spec.batch_size or spec.max_new_tokens (or use a device \
             with more memory)"
        );
        assert!(!e.retryable);
        assert_eq!(e.code, twin_core::FailureCode::OutOfMemory);
        let chunk = [Question {
            id: "q9".into(),
            subset: "s".into(),
            kind: QuestionKind::Pair,
            question: "?".into(),
            target: "yes".into(),
            images: Vec::new(),
        }];
        let refs: Vec<&Question> = chunk.iter().collect();
        let e = engine_failure(
            MlError::Request {
                index: 0,
                message: "the prompt's 700 tokens plus 5000 new tokens exceed the context of \
                          4096 tokens"
                    .into(),
            },
            &refs,
        );
        assert_eq!(
            e.message,
            "question q9: the prompt's 700 tokens plus 5000 new tokens exceed the context of \
             4096 tokens"
        );
        assert_eq!(e.code, twin_core::FailureCode::BadInput);
        assert_eq!(e.detail.as_deref(), Some("question q9"));
        // An index past the chunk (an engine bug) falls back to naming the chunk.
        let e = engine_failure(
            MlError::Request {
                index: 3,
                message: "the prompt is empty".into(),
            },
            &refs,
        );
        assert_eq!(
            e.message,
            "generating questions q9 to q9: request 3: the prompt is empty"
        );
    }

    #[test]
    fn question_lines_are_typed_and_selected_per_subset() {
        let tmp = tempfile::tempdir().unwrap();
        let path = questions_jsonl(tmp.path());
        let all = questions_at(&path).unwrap();
        let ids: Vec<&str> = all.iter().map(|q| q.id.as_str()).collect();
        assert_eq!(ids, ["q1", "q2", "q3", "q4", "q5", "q6"]);
        assert_eq!(all[3].kind, QuestionKind::Multi);
        assert_eq!(all[3].images.len(), 4);
        assert_eq!(
            all[0].images[0],
            ImageSource::File {
                path: tmp.path().join("img/0.png"),
                name: "img/0.png".into()
            }
        );
        // At most two per subset, in file order; subsets case-insensitively.
        let two = select(all.clone(), &[], Some(2)).unwrap();
        let ids: Vec<&str> = two.iter().map(|q| q.id.as_str()).collect();
        assert_eq!(ids, ["q1", "q2", "q3", "q5"]);
        let met = select(all.clone(), &["met".into()], None).unwrap();
        assert!(met.iter().all(|q| q.subset == "MET") && met.len() == 2);
        let err = select(all, &["ilias".into()], None).unwrap_err();
        assert!(
            err.message.contains("no question is in subset `ilias`"),
            "{err}"
        );
        assert!(err.message.contains("CUB, MET"), "{err}");

        // Without a type (TWIN's import) the answer decides; bad lines are named.
        let q = |t: Option<&str>, a: &str| QuestionLine {
            subset: None,
            question_type: t.map(str::to_owned),
            question: "?".into(),
            answer: a.into(),
            images: vec!["a.png".into()],
        };
        assert_eq!(question_kind(&q(None, "Yes")), Ok(QuestionKind::Pair));
        assert_eq!(question_kind(&q(None, "3")), Ok(QuestionKind::Multi));
        assert_eq!(
            question_kind(&q(Some("pairwise"), "0")),
            Ok(QuestionKind::Pair)
        );
        assert_eq!(
            question_kind(&q(Some("counting"), "1")),
            Ok(QuestionKind::Multi)
        );
        assert!(question_kind(&q(None, "maybe")).is_err());
        for (bad, want) in [
            (
                r#"{"question": "?", "answer": "maybe", "images": ["a.png"]}"#,
                "line 2: no question_type",
            ),
            (
                r#"{"question": "?", "answer": "yes", "images": ["../a.png"]}"#,
                "line 2: image \"../a.png\"",
            ),
            (
                r#"{"question": "?", "answer": "yes", "images": []}"#,
                "line 2: the question has no images",
            ),
            (
                r#"{"question": "", "subset": "nope", "answer": "no", "images": ["a"]}"#,
                "has no default pair question",
            ),
            (r#"{"answer": "yes"}"#, "line 2: missing field"),
        ] {
            let p = tmp.path().join("bad.jsonl");
            std::fs::write(
                &p,
                format!("{}\n{bad}\n", line("x", "pairwise", "?", "yes", &["a"])),
            )
            .unwrap();
            let err = questions_at(&p).unwrap_err();
            assert!(err.message.contains(want), "{bad}: {err}");
        }
        // Lines without a subset are TWIN's.
        let p = tmp.path().join("twin.jsonl");
        std::fs::write(
            &p,
            r#"{"question": "?", "answer": "no", "images": ["a", "b"]}"#,
        )
        .unwrap();
        assert_eq!(questions_at(&p).unwrap()[0].subset, "twin");
    }

    #[test]
    fn a_built_datasets_eval_split_becomes_questions_shown_at_their_resized_size() {
        let mut images = Vec::new();
        for category in ["mug", "shoe"] {
            for i in 0..4 {
                for k in 0..4 {
                    images.push(ManifestEntry {
                        blob: BlobHash::of(format!("{category}/{i}/{k}").as_bytes()),
                        path: format!("{category}/i{i}/{k}.png"),
                        category: category.into(),
                        instance: format!("i{i}"),
                        width: 1024,
                        height: 768,
                        format: "png".into(),
                        phash: "0000000000000000".into(),
                    });
                }
            }
        }
        let config = twin_data::build::BuildConfig::from_json(&serde_json::json!({
            "seed": 3, "eval_fraction": 0.5, "negatives": "random",
            "multi_questions": {"eval": 4},
        }))
        .unwrap();
        let dataset = twin_data::build::build(
            &twin_data::build::BuildInputs {
                images: &images,
                hard_negatives: &[],
                synthetic_negatives: &[],
            },
            &config,
        )
        .unwrap();
        let questions = built_questions(&dataset, "pairs");
        let eval = &dataset.counts.eval;
        assert_eq!(questions.len() as u64, eval.pair_rows + eval.multi_rows);
        assert!(eval.multi_rows > 0);
        for (q, row) in questions.iter().zip(dataset.rows(Split::Eval)) {
            assert_eq!(
                (q.id.as_str(), q.subset.as_str()),
                (row.id.as_str(), "pairs")
            );
            assert_eq!(q.target, row.answer);
            assert_eq!(q.question, row.question);
            let want = if matches!(row.kind, RowKind::Pair { .. }) {
                2
            } else {
                4
            };
            assert_eq!(q.images.len(), want);
            assert_eq!(q.kind == QuestionKind::Pair, want == 2);
            let ImageSource::Blob { resized, .. } = &q.images[0] else {
                panic!("a built dataset's images are blobs");
            };
            assert_eq!(*resized, (512, 384));
        }

        // A blob image is shown at the row's resized size, rounded as the processor rounds.
        let mut bytes = Vec::new();
        image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            1024,
            768,
            image::Rgb([9, 80, 200]),
        ))
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
        let blob = BlobHash::of(&bytes);
        let source = ImageSource::Blob {
            hash: blob,
            path: "mug/i0/0.png".into(),
            resized: (512, 384),
        };
        let fetch = |s: &ImageSource| {
            assert_eq!(*s, source);
            Ok(Bytes::from(bytes.clone()))
        };
        let preprocessor = QwenPreprocessor::default();
        let img = read_image(&source, "eval-pair-000000", &preprocessor, &fetch).unwrap();
        // smart_resize(384, 512) with factor 28: 392 × 504.
        assert_eq!((img.width(), img.height()), (504, 392));
        let prepared = preprocessor.prepare(&img, "x").unwrap();
        assert_eq!(prepared.resized, (392, 504), "the processor keeps the size");
        let missing = |_: &ImageSource| Err(StageError::unavailable("server unreachable"));
        let err = read_image(&source, "q", &preprocessor, &missing).unwrap_err();
        assert!(err.retryable, "a fetch failure stays retryable: {err}");
        assert_eq!(err.code, twin_core::FailureCode::Unavailable);
    }
}
