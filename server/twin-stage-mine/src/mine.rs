//! The `mine` stage: CLIP embeddings → nearest neighbours from other instances → filter
//! modules → candidate hard negatives.
//!
//! Three phases, each ending in an artefact: `embeddings` (the embedding table), `neighbours`
//! (the unfiltered pairs, with the search's recall) and `candidates` (the filtered pairs). A job
//! re-leased after its executor died starts from the last phase it finished (see
//! `twin_stage::StageContext::phase`), and within the embedding phase from its last checkpoint
//! (`embeddings.partial`, the table so far). Embeddings are keyed by (model hash, image hash):
//! images already embedded by an earlier mine job with the same weights are taken from its
//! table, not recomputed. The CLIP image tower lives in the executor's model cache.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use twin_client::JobFilter;
use twin_core::event::{JobOutput, JobResult, ManifestEntry, RejectedFile};
use twin_core::job::{JobState, JobStatus};
use twin_core::mine::{
    Candidate, FilterMode, FilterSummary, FilterVerdict, MineOutput, MineScope, MineSpec,
    PairImage, SearchMethod,
};
use twin_core::spec::JobSpec;
use twin_core::{BlobHash, JobKind};
use twin_ml::MlError;
use twin_ml::clip::{ClipModel, ClipPreprocessor};
use twin_ml::device::JobDevice;
use twin_ml::index::{
    Determinism, EmbeddingMatrix, HnswParams, Neighbours, Queries, RowLabel, Scope, recall_at_k,
    sample_queries, search_exact, search_hnsw,
};
use twin_ml::tch::Device;
use twin_plugins::{CandidatePair, Host, PluginError};
use twin_stage::{
    CachedModel, Codec, Json, JsonLines, ModelCache, ModelKey, ModelStore, Phase, Stage,
    StageContext, StageError,
};

use crate::embeddings::EmbeddingTable;

const EMBEDDINGS: &str = "embeddings";
const NEIGHBOURS: &str = "neighbours";
const CANDIDATES: &str = "candidates";
/// Shares of a run's time: embedding dominates (a forward pass per image), an exact search is a
/// few matrix products, the filters are cheap Wasm calls.
const PLAN: [(&str, f64); 3] = [(EMBEDDINGS, 0.6), (NEIGHBOURS, 0.3), (CANDIDATES, 0.1)];
/// Above this many images a global search on the CPU uses HNSW rather than exact search.
const HNSW_FROM_ROWS: usize = 100_000;
/// The model cache's family for CLIP image towers.
const CLIP_FAMILY: &str = "clip-vision";

/// A CLIP image tower as the model cache keeps it.
struct Clip {
    model: ClipModel,
    preprocessor: ClipPreprocessor,
    hash: String,
}

/// Runs `mine` jobs; filter modules run on the shared plugin host, CLIP in the shared model
/// cache.
pub struct MineStage {
    host: Arc<Host>,
    models: Arc<ModelCache>,
    store: Arc<ModelStore>,
}

impl MineStage {
    pub fn new(host: Arc<Host>, models: Arc<ModelCache>, store: Arc<ModelStore>) -> Self {
        Self {
            host,
            models,
            store,
        }
    }

    /// The image tower of the checkpoint at `dir` on `device`, from the cache or loaded.
    fn clip(&self, dir: &str, device: &JobDevice) -> Result<CachedModel<Clip>, StageError> {
        let path = Path::new(dir);
        let key = ModelKey::checkpoint(CLIP_FAMILY, path, &device.name);
        let kind = twin_ml::device::compute_kind(device.device);
        // Only the image tower is loaded: the text tower's tensors do not count.
        let expected = twin_ml::weights::Checkpoint::open(path)
            .map(|c| {
                c.bytes_as(kind, |name| {
                    !name.starts_with("text_") && name != "logit_scale"
                })
            })
            .unwrap_or(0);
        self.models.get_or_load_expecting(&key, expected, || {
            let model = ClipModel::load_vision(path, device.device).map_err(load_failure)?;
            let preprocessor = ClipPreprocessor::load(path).map_err(load_failure)?;
            let hash = model
                .weights_hash()
                .ok_or_else(|| StageError::model("spec.model: the checkpoint has no weights hash"))?
                .to_owned();
            let bytes = model.resident_bytes();
            Ok((
                Clip {
                    model,
                    preprocessor,
                    hash,
                },
                bytes,
            ))
        })
    }
}

/// One unordered pair found by the search, before filtering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FoundPair {
    a: usize,
    b: usize,
    similarity: f64,
    /// Best rank of either image in the other's list, from 0.
    rank: u32,
}

/// The `neighbours` artefact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct NeighbourPhase {
    /// Manifest rows (in manifest order) that were embedded; pair indices point into it.
    rows: Vec<usize>,
    search: SearchMethod,
    recall_at_k: Option<f64>,
    pairs: Vec<FoundPair>,
    millis: u64,
}

fn load_failure(e: MlError) -> StageError {
    StageError::new(e.loading_failure_code(), format!("spec.model: {e}"))
}

fn ml_failure(what: &str, e: MlError) -> StageError {
    match e {
        MlError::OutOfMemory(_) => StageError::out_of_memory(format!(
            "{what}: {e}; lower spec.batch_size (or use a device with more memory)"
        )),
        e => StageError::new(e.failure_code(), format!("{what}: {e}")),
    }
}

/// A filter module's failure as the job's, the host's code for it as the detail.
fn filter_failure(label: &str, e: &PluginError) -> StageError {
    StageError::new(
        e.failure_code(),
        format!("filter {label} [{}]: {e}", e.code()),
    )
    .with_detail(e.code())
}

fn parse_manifest(bytes: &[u8]) -> Result<Vec<ManifestEntry>, StageError> {
    JsonLines
        .decode(bytes)
        .map_err(|e| StageError::bad_input(format!("dataset manifest: {e}")))
}

impl Stage for MineStage {
    fn kind(&self) -> JobKind {
        JobKind::Mine
    }

    fn run(&self, job: &JobState, ctx: &StageContext) -> Result<JobOutput, StageError> {
        let JobSpec::Mine(spec) = &job.submission.spec else {
            return Err(StageError::internal(
                "the mine stage got another kind of job",
            ));
        };
        // The server pins the manifest at submission: a job without one is a server bug.
        let manifest = spec
            .manifest
            .ok_or_else(|| StageError::internal("spec.manifest was not pinned at submission"))?;
        let entries = parse_manifest(&ctx.download(&manifest)?)?;
        if entries.is_empty() {
            return Err(StageError::bad_input("the dataset has no images"));
        }
        let device =
            twin_ml::device::for_job(spec.device).map_err(|e| ml_failure("spec.device", e))?;
        // Held to the end: the store keeps the model's files while the job may still load them.
        let checkpoint = self.store.resolve(ctx, &spec.model, spec.model_manifest)?;
        let model_dir = checkpoint.dir.to_string_lossy().into_owned();
        ctx.plan(&PLAN)?;
        let mut timings = BTreeMap::new();

        let started = Instant::now();
        let mut skipped = Vec::new();
        let mut reused = 0;
        let embeddings = ctx.phase(
            EMBEDDINGS,
            twin_stage::codec::custom(EmbeddingTable::encode, EmbeddingTable::decode),
            |p| {
                let clip = self.clip(&model_dir, &device)?;
                ctx.note(&clip.note());
                let (table, s, r) = embed(spec, &entries, &clip, ctx, p)?;
                (skipped, reused) = (s, r);
                Ok(table)
            },
        )?;
        let table = embeddings.value;
        if embeddings.resumed {
            skipped = entries
                .iter()
                .filter(|e| !table.rows.contains_key(&e.blob))
                .map(|e| RejectedFile {
                    path: e.path.clone(),
                    error: "not embedded by an earlier attempt".into(),
                })
                .collect();
        }
        timings.insert("embed".to_owned(), started.elapsed().as_millis() as u64);

        let started = Instant::now();
        let phase = ctx
            .phase(NEIGHBOURS, Json, |p| {
                search(spec, &entries, &table, device.device, p)
            })?
            .value;
        timings.insert("search".to_owned(), started.elapsed().as_millis() as u64);

        let started = Instant::now();
        let mut fuel = BTreeMap::new();
        let candidates = ctx.phase(CANDIDATES, JsonLines, |p| {
            let (candidates, used) = self.filter(spec, &entries, &phase, ctx, p)?;
            fuel = used;
            Ok(candidates)
        })?;
        timings.insert("filter".to_owned(), started.elapsed().as_millis() as u64);
        let summaries = self.summarise(spec, &candidates.value, &fuel);
        let mut listed = skipped.clone();
        listed.truncate(twin_core::event::IngestOutput::MAX_LISTED_REJECTS);
        let kept = candidates.value.iter().filter(|c| c.kept).count() as u64;
        let auto_accepted = candidates.value.iter().filter(|c| c.auto_accepted).count() as u64;
        Ok(JobOutput::Mine(MineOutput {
            model_hash: table.model_hash.clone(),
            model_manifest: Some(checkpoint.manifest),
            embeddings: embeddings.blob,
            candidates: candidates.blob,
            images: entries.len() as u64,
            reused_embeddings: reused,
            skipped: listed,
            skipped_total: skipped.len() as u64,
            search: phase.search,
            device: device.name,
            pairs: candidates.value.len() as u64,
            kept,
            auto_accepted,
            recall_at_k: phase.recall_at_k,
            filters: summaries,
            timings_ms: timings,
        }))
    }
}

/// Embeddings of earlier succeeded mine jobs with the same weights, merged (best effort: a
/// table that cannot be fetched is simply not reused).
fn earlier_embeddings(model_hash: &str, ctx: &StageContext) -> EmbeddingTable {
    let mut merged = EmbeddingTable::new(model_hash, 0);
    let filter = JobFilter {
        state: Some("succeeded".into()),
        kind: Some("mine".into()),
        experiment: None,
        limit: Some(1000),
    };
    let Ok(jobs) = ctx.jobs(&filter) else {
        return merged;
    };
    for j in jobs {
        let Some(JobResult::Mine(out)) = &j.result else {
            continue;
        };
        if out.model_hash != model_hash || j.status != JobStatus::Succeeded {
            continue;
        }
        let Ok(bytes) = ctx.download(&out.embeddings) else {
            continue;
        };
        if let Ok(t) = EmbeddingTable::decode(&bytes)
            && t.model_hash == model_hash
            && (merged.dim == 0 || merged.dim == t.dim)
        {
            merged.dim = t.dim;
            merged.rows.extend(t.rows);
        }
    }
    merged
}

/// Embeds every image of the manifest not embedded before (by this job's last checkpoint or an
/// earlier job); returns the table (for exactly the manifest's images that decode), the images
/// skipped with their reason, and how many rows were taken from earlier jobs. Saves the table
/// so far whenever a checkpoint is due.
fn embed<C: Codec<EmbeddingTable>>(
    spec: &MineSpec,
    entries: &[ManifestEntry],
    clip: &Clip,
    ctx: &StageContext,
    p: &mut Phase<'_, EmbeddingTable, C>,
) -> Result<(EmbeddingTable, Vec<RejectedFile>, u64), StageError> {
    let dim = clip.model.embedding_dim() as usize;
    // A checkpoint of other weights (the directory changed between attempts) is of no use.
    let mut table = p
        .partial()?
        .filter(|t| t.model_hash == clip.hash && t.dim == dim)
        .unwrap_or_else(|| EmbeddingTable::new(&clip.hash, dim));
    let resumed = table.rows.len();
    let earlier = earlier_embeddings(&clip.hash, ctx);
    let mut reused = 0u64;
    let mut todo = Vec::new();
    let mut seen = BTreeSet::new();
    for e in entries {
        if !seen.insert(e.blob) || table.rows.contains_key(&e.blob) {
            continue;
        }
        match earlier.rows.get(&e.blob) {
            Some(v) if v.len() == dim => {
                table.rows.insert(e.blob, v.clone());
                reused += 1;
            }
            _ => todo.push(e),
        }
    }
    let mut skipped = Vec::new();
    let batch = spec.batch_size.max(1) as usize;
    let total = todo.len();
    let from_earlier = if resumed > 0 {
        format!("{reused} reused, {resumed} from an earlier attempt")
    } else {
        format!("{reused} reused")
    };
    for (i, chunk) in todo.chunks(batch).enumerate() {
        ctx.check_cancelled()?;
        let mut images = Vec::with_capacity(chunk.len());
        let mut hashes = Vec::with_capacity(chunk.len());
        for e in chunk {
            let bytes = ctx.download(&e.blob)?;
            match image::load_from_memory(&bytes) {
                Ok(img) => {
                    images.push(img);
                    hashes.push(e.blob);
                }
                Err(err) => skipped.push(RejectedFile {
                    path: e.path.clone(),
                    error: format!("cannot decode: {err}"),
                }),
            }
        }
        if images.is_empty() {
            continue;
        }
        let features = clip
            .model
            .embed_images(&clip.preprocessor, &images)
            .map_err(|e| ml_failure("embedding", e))?;
        let flat: Vec<f32> = Vec::<f32>::try_from(
            features
                .to_kind(twin_ml::tch::Kind::Float)
                .to_device(Device::Cpu)
                .flatten(0, -1),
        )
        .map_err(|e| ml_failure("embedding", MlError::from_torch(e)))?;
        for (h, v) in hashes.iter().zip(flat.chunks_exact(dim)) {
            table.rows.insert(*h, v.to_vec());
        }
        let done = ((i + 1) * batch).min(total);
        p.progress(
            done,
            total,
            &format!("embedded {done} of {total} images ({from_earlier})"),
            BTreeMap::from([("embedded".to_owned(), done as f64)]),
        );
        if done < total && p.checkpoint_due() {
            p.checkpoint(&table)?;
        }
    }
    Ok((table, skipped, reused))
}

/// Numbers names in order of first appearance.
fn intern(names: impl Iterator<Item = String>) -> (Vec<u32>, usize) {
    let mut ids: HashMap<String, u32> = HashMap::new();
    let out = names
        .map(|n| {
            let next = ids.len() as u32;
            *ids.entry(n).or_insert(next)
        })
        .collect();
    (out, ids.len())
}

/// Finds each embedded image's neighbours from other instances and folds them into unordered
/// pairs; measures HNSW's recall against exact search on a sample.
fn search(
    spec: &MineSpec,
    entries: &[ManifestEntry],
    table: &EmbeddingTable,
    device: Device,
    p: &Phase<'_, NeighbourPhase, Json>,
) -> Result<NeighbourPhase, StageError> {
    let started = Instant::now();
    let mut seen = BTreeSet::new();
    let rows: Vec<usize> = (0..entries.len())
        .filter(|&i| table.rows.contains_key(&entries[i].blob) && seen.insert(entries[i].blob))
        .collect();
    let (instances, _) = intern(
        rows.iter()
            .map(|&i| format!("{}\u{0}{}", entries[i].category, entries[i].instance)),
    );
    let (categories, _) = intern(rows.iter().map(|&i| entries[i].category.clone()));
    let labels: Vec<RowLabel> = instances
        .iter()
        .zip(&categories)
        .map(|(&instance, &category)| RowLabel { instance, category })
        .collect();
    let mut values = Vec::with_capacity(rows.len() * table.dim);
    for &i in &rows {
        values.extend_from_slice(&table.rows[&entries[i].blob]);
    }
    // Measured on 2 CPU cores (BENCHMARKS.md, "Mining index"): exact search beats building an
    // HNSW graph per category (3.8 s vs 115 s at 100k rows) and globally up to ~100k rows; on a
    // GPU the matrix product always wins. HNSW pays off only for large global searches on a CPU.
    let method = match spec.search {
        SearchMethod::Auto
            if !device.is_cuda()
                && spec.scope == MineScope::Global
                && rows.len() > HNSW_FROM_ROWS =>
        {
            SearchMethod::Hnsw
        }
        SearchMethod::Auto => SearchMethod::Exact,
        m => m,
    };
    let mut phase = NeighbourPhase {
        rows: rows.clone(),
        search: method,
        recall_at_k: None,
        pairs: Vec::new(),
        millis: 0,
    };
    if rows.is_empty() {
        return Ok(phase);
    }
    let matrix =
        EmbeddingMatrix::new(table.dim, values, labels).map_err(|e| ml_failure("embeddings", e))?;
    let scope = match spec.scope {
        MineScope::PerCategory => Scope::PerCategory,
        MineScope::Global => Scope::Global,
    };
    let k = spec.k as usize;
    p.progress(
        0,
        1,
        &format!("searching {} images ({method:?})", rows.len()),
        BTreeMap::new(),
    );
    let found: Neighbours = match method {
        SearchMethod::Exact | SearchMethod::Auto => {
            search_exact(&matrix, scope, k, Queries::All, device)
                .map_err(|e| ml_failure("exact search", e))?
        }
        SearchMethod::Hnsw => {
            let params = HnswParams {
                ef_construction: spec.hnsw.ef_construction as usize,
                ef_search: spec.hnsw.ef_search as usize,
                seed: spec.seed,
                determinism: if spec.deterministic {
                    Determinism::Deterministic
                } else {
                    Determinism::Parallel
                },
                ..HnswParams::default()
            };
            let found = search_hnsw(&matrix, scope, k, &params)
                .map_err(|e| ml_failure("HNSW search", e))?;
            if spec.recall_sample > 0 {
                let sample = sample_queries(rows.len(), spec.recall_sample as usize, spec.seed);
                let exact = search_exact(&matrix, scope, k, Queries::Rows(&sample), device)
                    .map_err(|e| ml_failure("exact search", e))?;
                phase.recall_at_k = Some(recall_at_k(&found, &exact, k).recall);
            }
            found
        }
    };
    // Unordered pairs, each with its best rank; indices are positions in `rows`.
    let mut best: BTreeMap<(usize, usize), FoundPair> = BTreeMap::new();
    for q in found.results() {
        for n in &q.neighbours {
            let (a, b) = if q.query < n.row {
                (q.query, n.row)
            } else {
                (n.row, q.query)
            };
            let rank = n.rank.saturating_sub(1);
            best.entry((a, b))
                .and_modify(|p| p.rank = p.rank.min(rank))
                .or_insert(FoundPair {
                    a,
                    b,
                    // A cosine of unit rows, which f32 rounding can push just past 1 for two
                    // near-identical images; a filter's band is written for the true range.
                    similarity: f64::from(n.similarity).clamp(-1.0, 1.0),
                    rank,
                });
        }
    }
    phase.pairs = best.into_values().collect();
    phase.millis = started.elapsed().as_millis() as u64;
    Ok(phase)
}

fn phash(hex: &str) -> u64 {
    u64::from_str_radix(hex, 16).unwrap_or(0)
}

impl MineStage {
    /// Runs every filter over every pair (in batches); returns the candidates, sorted by id, and
    /// the fuel each filter used. A filter that traps drops its batch with the error as the
    /// reason (fail closed); one that refuses its parameters fails the job.
    fn filter(
        &self,
        spec: &MineSpec,
        entries: &[ManifestEntry],
        phase: &NeighbourPhase,
        ctx: &StageContext,
        p: &Phase<'_, Vec<Candidate>, JsonLines>,
    ) -> Result<(Vec<Candidate>, BTreeMap<String, u64>), StageError> {
        let image = |i: usize| {
            let e = &entries[phase.rows[i]];
            PairImage {
                blob: e.blob,
                path: e.path.clone(),
                instance: e.instance.clone(),
                category: e.category.clone(),
            }
        };
        let mut candidates: Vec<Candidate> = phase
            .pairs
            .iter()
            .map(|p| {
                let (a, b) = (image(p.a), image(p.b));
                Candidate {
                    id: Candidate::pair_id(&a.blob, &b.blob),
                    a,
                    b,
                    similarity: p.similarity,
                    rank: p.rank,
                    verdicts: Vec::new(),
                    kept: true,
                    auto_accepted: false,
                }
            })
            .collect();
        let pairs: Vec<CandidatePair> = phase
            .pairs
            .iter()
            .map(|p| {
                let (ea, eb) = (&entries[phase.rows[p.a]], &entries[phase.rows[p.b]]);
                CandidatePair {
                    image_a: ea.blob.to_hex(),
                    image_b: eb.blob.to_hex(),
                    instance_a: ea.instance.clone(),
                    instance_b: eb.instance.clone(),
                    category_a: ea.category.clone(),
                    category_b: eb.category.clone(),
                    phash_a: phash(&ea.phash),
                    phash_b: phash(&eb.phash),
                    similarity: p.similarity,
                    rank: p.rank,
                    metadata: "{}".into(),
                }
            })
            .collect();
        let limits = self.host.config().limits.with_job_limits(&spec.limits);
        let batch = spec.filter_batch.max(1) as usize;
        let mut fuel = BTreeMap::new();
        let steps = (spec.filters.len() * pairs.len().div_ceil(batch)).max(1);
        let mut step = 0;
        for f in &spec.filters {
            // The server pins filters at submission: one without a hash is a server bug.
            let hash = f.module_hash.ok_or_else(|| {
                StageError::internal(format!("filter {} was not resolved to a hash", f.module))
            })?;
            let module = match self.host.get(&hash.to_hex()) {
                Some(m) => m,
                None => self
                    .host
                    .load(&ctx.download(&hash)?)
                    .map_err(|e| filter_failure(f.label(), &e))?,
            };
            let params = f.params.to_string();
            let mut used = 0u64;
            for (chunk_index, chunk) in pairs.chunks(batch).enumerate() {
                ctx.check_cancelled()?;
                let (out, err) =
                    self.host
                        .judge_or_drop(&module, &params, &spec.grants, Some(&limits), chunk);
                match err {
                    Some(
                        e @ (PluginError::BadParams(_)
                        | PluginError::WrongKind { .. }
                        | PluginError::Host(_)),
                    ) => return Err(filter_failure(f.label(), &e)),
                    Some(e) => {
                        tracing::warn!(filter = f.label(), error = %e, "filter failed on a batch; its pairs are dropped")
                    }
                    None => {}
                }
                used = used.saturating_add(out.fuel_used);
                for (j, v) in out.values.into_iter().enumerate() {
                    let c = &mut candidates[chunk_index * batch + j];
                    if !v.keep && f.mode == FilterMode::Require {
                        c.kept = false;
                    }
                    c.verdicts.push(FilterVerdict {
                        filter: f.label().to_owned(),
                        keep: v.keep,
                        reason: v.reason,
                    });
                }
                step += 1;
                p.progress(
                    step,
                    steps,
                    &format!(
                        "filter {}: {} of {} pairs",
                        f.label(),
                        ((chunk_index + 1) * batch).min(pairs.len()),
                        pairs.len()
                    ),
                    BTreeMap::new(),
                );
            }
            fuel.insert(f.label().to_owned(), used);
        }
        if let Some(auto) = &spec.auto_accept {
            for c in &mut candidates {
                c.auto_accepted = c.kept && c.verdict(auto).is_some_and(|v| v.keep);
            }
        }
        candidates.sort_by(|x, y| x.id.cmp(&y.id));
        Ok((candidates, fuel))
    }

    fn summarise(
        &self,
        spec: &MineSpec,
        candidates: &[Candidate],
        fuel: &BTreeMap<String, u64>,
    ) -> BTreeMap<String, FilterSummary> {
        spec.filters
            .iter()
            .map(|f| {
                let name = f.label().to_owned();
                let kept = candidates
                    .iter()
                    .filter(|c| c.verdict(&name).is_some_and(|v| v.keep))
                    .count() as u64;
                let version = f
                    .module_hash
                    .and_then(|h| self.host.get(&h.to_hex()))
                    .map(|m| m.descriptor.version.clone())
                    .unwrap_or_default();
                let summary = FilterSummary {
                    module_hash: f.module_hash.unwrap_or(BlobHash([0; 32])),
                    module_version: version,
                    mode: f.mode,
                    kept,
                    dropped: candidates.len() as u64 - kept,
                    fuel_used: fuel.get(&name).copied().unwrap_or(0),
                };
                (name, summary)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use twin_ml::clip::ClipConfig;
    use twin_stage::testing::{MemoryBackend, job};

    /// Twelve images (3 categories × 2 instances × 2 views) and their manifest, in `backend`.
    fn dataset(backend: &MemoryBackend) -> BlobHash {
        let mut manifest = Vec::new();
        for (c, category) in ["mug", "shoe", "lamp"].into_iter().enumerate() {
            for instance in 0..2u8 {
                for view in 0..2u8 {
                    let img = image::RgbImage::from_fn(24, 24, |x, y| {
                        let shade = (c as u8 * 70).wrapping_add(instance * 30 + view * 5);
                        image::Rgb([shade, (x * 10) as u8, (y * 10) as u8 ^ instance])
                    });
                    let mut png = Vec::new();
                    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                        .unwrap();
                    manifest.push(ManifestEntry {
                        blob: backend.put(png),
                        path: format!("{category}/i{instance}/{view}.png"),
                        category: category.into(),
                        instance: format!("i{instance}"),
                        width: 24,
                        height: 24,
                        format: "png".into(),
                        phash: "0000000000000000".into(),
                    });
                }
            }
        }
        backend.put(JsonLines.encode(&manifest).unwrap())
    }

    #[test]
    fn a_job_stopped_mid_embedding_resumes_from_its_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpt = tmp.path().join("clip");
        ClipModel::init_random(ClipConfig::tiny().vision_only(), 3, Device::Cpu)
            .unwrap()
            .save_pretrained(&ckpt)
            .unwrap();
        let host = Arc::new(Host::new(twin_plugins::HostConfig::default()).unwrap());
        let models = Arc::new(ModelCache::new(1 << 30));
        let store = Arc::new(ModelStore::open(tmp.path().join("store"), 1 << 30).unwrap());
        let stage = MineStage::new(host, models.clone(), store);
        let spec = |manifest: BlobHash| {
            job(serde_json::json!({
                "kind": "mine", "dataset": "d", "manifest": manifest.to_hex(),
                "model": ckpt.to_str().unwrap(), "device": "cpu", "batch_size": 4, "k": 3,
            }))
        };
        let mined = |out: JobOutput| match out {
            JobOutput::Mine(out) => out,
            other => panic!("a mine job's output, got {other:?}"),
        };

        // Start to finish, for comparison.
        let straight = MemoryBackend::new().with_allowed_roots(&[tmp.path()]);
        let whole = mined(
            stage
                .run(&spec(dataset(&straight)), &straight.context(&[]))
                .unwrap(),
        );
        assert_eq!(straight.names(), [EMBEDDINGS, NEIGHBOURS, CANDIDATES]);
        // Per category, each image pairs with the other instance's two views.
        assert_eq!(whole.pairs, 12 * 2 / 2);

        // The executor dies after the first batch's checkpoint (4 of 12 images)...
        let backend = MemoryBackend::new().with_allowed_roots(&[tmp.path()]);
        let job = spec(dataset(&backend));
        backend.cancel_after("embeddings.partial");
        let attempt = |earlier: &[twin_core::job::Artefact]| {
            let ctx = backend
                .context(earlier)
                .with_checkpoint_every(Duration::ZERO);
            stage.run(&job, &ctx)
        };
        let err = attempt(&[]).unwrap_err();
        assert_eq!(err, StageError::cancelled());
        assert_eq!(backend.names(), ["embeddings.partial"]);
        let partial = EmbeddingTable::decode(&backend.blob(&backend.artefacts()[0].blob)).unwrap();
        assert_eq!(partial.rows.len(), 4);

        // ...and the next attempt embeds only the other eight, to the same result.
        backend.reset_cancel();
        let resumed = mined(attempt(&backend.artefacts()).unwrap());
        assert!(
            backend
                .fractions()
                .iter()
                .any(|(_, m)| m == "embedded 8 of 8 images (0 reused, 4 from an earlier attempt)"),
            "{:?}",
            backend.fractions()
        );
        assert_eq!(resumed.embeddings, whole.embeddings);
        assert_eq!(resumed.candidates, whole.candidates);
        assert_eq!(resumed.device, "cpu");
        let names = backend.names();
        assert_eq!(
            names[names.len() - 3..],
            [EMBEDDINGS, NEIGHBOURS, CANDIDATES]
        );

        // A third attempt redoes nothing. The model loaded once for all of them.
        let before = backend.artefacts().len();
        let again = mined(attempt(&backend.artefacts()).unwrap());
        assert_eq!(again.candidates, whole.candidates);
        assert_eq!(backend.artefacts().len(), before);
        assert_eq!(models.stats().misses, 1);
    }

    #[test]
    fn a_checkpoint_that_does_not_load_is_a_model_error() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("config.json"), "{}").unwrap();
        let host = Arc::new(Host::new(twin_plugins::HostConfig::default()).unwrap());
        let store_dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ModelStore::open(store_dir.path(), 1 << 30).unwrap());
        let stage = MineStage::new(host, Arc::new(ModelCache::new(1 << 30)), store);
        let backend = MemoryBackend::new().with_allowed_roots(&[tmp.path()]);
        let job = job(serde_json::json!({
            "kind": "mine", "dataset": "d", "manifest": dataset(&backend).to_hex(),
            "model": tmp.path().to_str().unwrap(), "device": "cpu",
        }));
        let err = stage.run(&job, &backend.context(&[])).unwrap_err();
        assert_eq!(err.code, twin_core::FailureCode::ModelError, "{err}");
        assert!(err.message.starts_with("spec.model: "), "{err}");
        assert!(backend.names().is_empty());
    }
}
