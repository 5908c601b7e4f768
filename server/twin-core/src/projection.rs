//! Projections: the read models (jobs, experiments, datasets, lineage) folded from the log.
//!
//! `Projections::apply` is the one reducer; the server runs it on every committed event and at
//! start-up over the whole log, and `twin replay` runs the same code offline, which is why a
//! replay up to sequence N shows exactly what the server knew at N.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::event::{Event, ModelRegistered, ModuleRegistered, RecordedEvent};
use crate::ids::{BlobHash, DatasetId, ExperimentId, JobId, Millis, StreamName};
use crate::job::{JobState, JobStatus};
use crate::mine::Verdict;

#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Experiment {
    pub id: ExperimentId,
    pub name: String,
    pub description: String,
    pub created_by: String,
    pub created_at: Millis,
    pub jobs: Vec<JobId>,
}

#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Dataset {
    pub id: DatasetId,
    pub name: String,
    pub job: JobId,
    pub manifest: BlobHash,
    pub images: u64,
    pub instances: u64,
    pub categories: u64,
    pub registered_at: Millis,
}

/// A dataset built by a build-dataset job, identified by its manifest's hash.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct BuiltDataset {
    pub hash: BlobHash,
    pub id: DatasetId,
    pub name: String,
    pub job: JobId,
    #[schema(value_type = BTreeMap<String, String>)]
    pub exports: BTreeMap<String, BlobHash>,
    pub counts: BTreeMap<String, u64>,
    pub built_at: Millis,
}

/// The latest verdict on one candidate pair.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Review {
    pub verdict: Verdict,
    pub actor: String,
    pub at: Millis,
    pub note: String,
}

/// Which event first brought a blob into the record.
/// A registered module and the names that point at it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ModuleInfo {
    #[serde(flatten)]
    pub module: ModuleRegistered,
    pub registered_by: String,
    pub registered_at: Millis,
    pub aliases: Vec<String>,
}

/// A registered model and the names that point at it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ModelInfo {
    #[serde(flatten)]
    pub model: ModelRegistered,
    pub registered_by: String,
    pub registered_at: Millis,
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Producer {
    pub seq: u64,
    pub job: Option<JobId>,
    /// `artefact:<name>`, `result`, or `dataset:<id>`.
    pub role: String,
}

/// Every read model, as of `last_seq`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Projections {
    pub last_seq: u64,
    pub jobs: BTreeMap<JobId, JobState>,
    pub experiments: BTreeMap<ExperimentId, Experiment>,
    pub datasets: BTreeMap<DatasetId, Dataset>,
    pub producers: HashMap<BlobHash, Producer>,
    pub modules: BTreeMap<BlobHash, ModuleInfo>,
    /// Registry name → module hash.
    pub aliases: BTreeMap<String, BlobHash>,
    /// Registry name → version of its `module/<name>` stream (for optimistic switches).
    pub alias_versions: BTreeMap<String, u64>,
    /// Registered models by manifest hash.
    pub models: BTreeMap<BlobHash, ModelInfo>,
    /// Model name → manifest hash.
    pub model_aliases: BTreeMap<String, BlobHash>,
    /// Model name → version of its `model/<name>` stream.
    pub model_alias_versions: BTreeMap<String, u64>,
    /// Built datasets by manifest hash.
    pub built: BTreeMap<BlobHash, BuiltDataset>,
    /// Mine job → candidate pair id → latest review.
    pub reviews: BTreeMap<JobId, BTreeMap<String, Review>>,
    /// Version of each `review/<job>` stream (for optimistic appends).
    pub review_versions: BTreeMap<JobId, u64>,
    /// Training runs' steps and validations, by job.
    pub training: BTreeMap<JobId, crate::train::TrainingLog>,
    /// Who owns each shared name (see [`Registry`]): whoever pointed it first (a module or model
    /// name), or submitted the job that first registered it (a dataset name, and a model name a
    /// training job's checkpoint took). Only the owner or an admin may point it elsewhere.
    #[serde(skip)]
    pub name_owners: BTreeMap<(Registry, String), String>,
    /// Events whose stream or payload did not fit (kept so a replay can report them).
    pub anomalies: Vec<String>,
}

/// The namespaces whose names have owners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Registry {
    Module,
    Model,
    /// Ingested datasets' names.
    Dataset,
    /// Built datasets' names.
    BuiltDataset,
}

impl Registry {
    pub fn as_str(self) -> &'static str {
        match self {
            Registry::Module => "module name",
            Registry::Model => "model name",
            Registry::Dataset => "dataset name",
            Registry::BuiltDataset => "built dataset name",
        }
    }
}

/// What produced an artefact or a job, as far back as the record goes.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Lineage {
    pub target: String,
    pub producer: Option<Producer>,
    pub job: Option<JobState>,
    pub experiment: Option<Experiment>,
    pub datasets: Vec<Dataset>,
    /// Registered models among the blobs (the job's checkpoint, with its files), or the model
    /// the target is (a manifest) or belongs to (one of its files).
    pub models: Vec<ModelInfo>,
    /// Blobs the job's spec or results refer to.
    pub blobs: Vec<BlobHash>,
}

impl Projections {
    pub fn count_by_status(&self) -> BTreeMap<JobStatus, usize> {
        let mut out: BTreeMap<_, _> = JobStatus::ALL.iter().map(|s| (*s, 0)).collect();
        for job in self.jobs.values() {
            *out.entry(job.status).or_default() += 1;
        }
        out
    }

    pub fn experiment_by_name(&self, name: &str) -> Option<&Experiment> {
        self.experiments.values().find(|e| e.name == name)
    }

    fn note_blobs(&mut self, rec: &RecordedEvent, job: Option<&JobId>) {
        for blob in rec.event.blob_refs() {
            let role = match &rec.event {
                Event::JobArtefactRecorded(a) => format!("artefact:{}", a.name),
                Event::DatasetRegistered(d) => format!("dataset:{}", d.id),
                Event::DatasetBuilt(d) => format!("dataset:{}", d.id),
                Event::ModuleRegistered(m) => format!("module:{}", m.name),
                Event::ModelRegistered(m) => format!("model:{}", m.hash),
                _ => "result".to_owned(),
            };
            self.producers.entry(blob).or_insert(Producer {
                seq: rec.seq,
                job: job.cloned(),
                role,
            });
        }
    }

    /// The owner of a shared name, if it has been taken.
    pub fn name_owner(&self, registry: Registry, name: &str) -> Option<&str> {
        self.name_owners
            .get(&(registry, name.to_owned()))
            .map(String::as_str)
    }

    /// A dataset name goes to the submitter of the job that first registered it.
    fn claim(&mut self, registry: Registry, name: &str, job: &JobId, actor: &str) {
        let owner = self
            .jobs
            .get(job)
            .map_or(actor, |j| j.submitted_by.as_str())
            .to_owned();
        self.name_owners
            .entry((registry, name.to_owned()))
            .or_insert(owner);
    }

    /// Folds one committed event in. Events must arrive in sequence order.
    pub fn apply(&mut self, rec: &RecordedEvent) {
        self.last_seq = rec.seq;
        let stream = rec.stream.parse::<StreamName>();
        match (&rec.event, stream) {
            (Event::ExperimentCreated(e), Ok(StreamName::Experiment(_))) => {
                self.experiments.insert(
                    e.id.clone(),
                    Experiment {
                        id: e.id.clone(),
                        name: e.name.clone(),
                        description: e.description.clone(),
                        created_by: rec.actor.clone(),
                        created_at: rec.ts,
                        jobs: Vec::new(),
                    },
                );
            }
            (Event::JobSubmitted(e), Ok(StreamName::Job(_))) => {
                if let Some(exp) = e
                    .submission
                    .experiment
                    .as_ref()
                    .and_then(|x| self.experiments.get_mut(x))
                {
                    exp.jobs.push(e.id.clone());
                }
                self.jobs.insert(
                    e.id.clone(),
                    JobState::from_submitted(e, &rec.actor, rec.ts),
                );
            }
            (Event::DatasetRegistered(d), Ok(StreamName::Dataset(_))) => {
                self.note_blobs(rec, Some(&d.job));
                self.claim(Registry::Dataset, &d.name, &d.job, &rec.actor);
                self.datasets.insert(
                    d.id.clone(),
                    Dataset {
                        id: d.id.clone(),
                        name: d.name.clone(),
                        job: d.job.clone(),
                        manifest: d.manifest,
                        images: d.images,
                        instances: d.instances,
                        categories: d.categories,
                        registered_at: rec.ts,
                    },
                );
            }
            (Event::DatasetBuilt(d), Ok(StreamName::Dataset(_))) => {
                self.note_blobs(rec, Some(&d.job));
                self.claim(Registry::BuiltDataset, &d.name, &d.job, &rec.actor);
                self.built.insert(
                    d.hash,
                    BuiltDataset {
                        hash: d.hash,
                        id: d.id.clone(),
                        name: d.name.clone(),
                        job: d.job.clone(),
                        exports: d.output.exports.clone(),
                        counts: d.output.counts.clone(),
                        built_at: rec.ts,
                    },
                );
            }
            (Event::CandidateReviewed(r), Ok(StreamName::Review(job))) if job == r.job => {
                self.review_versions.insert(job.clone(), rec.stream_version);
                self.reviews.entry(job).or_default().insert(
                    r.pair.clone(),
                    Review {
                        verdict: r.verdict,
                        actor: rec.actor.clone(),
                        at: rec.ts,
                        note: r.note.clone(),
                    },
                );
            }
            (Event::ModuleRegistered(m), Ok(StreamName::Module(_))) => {
                self.note_blobs(rec, None);
                let aliases = self
                    .aliases
                    .iter()
                    .filter(|(_, h)| **h == m.hash)
                    .map(|(a, _)| a.clone())
                    .collect();
                self.modules.insert(
                    m.hash,
                    ModuleInfo {
                        module: m.clone(),
                        registered_by: rec.actor.clone(),
                        registered_at: rec.ts,
                        aliases,
                    },
                );
            }
            (Event::ModuleAliasSet(a), Ok(StreamName::Module(_))) => {
                self.name_owners
                    .entry((Registry::Module, a.alias.clone()))
                    .or_insert_with(|| rec.actor.clone());
                self.alias_versions
                    .insert(a.alias.clone(), rec.stream_version);
                if let Some(prev) = self.aliases.insert(a.alias.clone(), a.hash)
                    && let Some(info) = self.modules.get_mut(&prev)
                {
                    info.aliases.retain(|x| x != &a.alias);
                }
                if let Some(info) = self.modules.get_mut(&a.hash) {
                    info.aliases.push(a.alias.clone());
                    info.aliases.sort();
                }
            }
            (Event::ModelRegistered(m), Ok(StreamName::Model(_))) => {
                self.note_blobs(rec, m.job.as_ref());
                let aliases = self
                    .model_aliases
                    .iter()
                    .filter(|(_, h)| **h == m.hash)
                    .map(|(a, _)| a.clone())
                    .collect();
                self.models.insert(
                    m.hash,
                    ModelInfo {
                        model: m.clone(),
                        registered_by: rec.actor.clone(),
                        registered_at: rec.ts,
                        aliases,
                    },
                );
            }
            (Event::ModelAliasSet(a), Ok(StreamName::Model(_))) => {
                // A checkpoint's name belongs to whoever submitted the training job, not to
                // the executor that recorded it.
                let owner = self
                    .models
                    .get(&a.hash)
                    .and_then(|m| m.model.job.as_ref())
                    .and_then(|j| self.jobs.get(j))
                    .map_or_else(|| rec.actor.clone(), |j| j.submitted_by.clone());
                self.name_owners
                    .entry((Registry::Model, a.alias.clone()))
                    .or_insert(owner);
                self.model_alias_versions
                    .insert(a.alias.clone(), rec.stream_version);
                if let Some(prev) = self.model_aliases.insert(a.alias.clone(), a.hash)
                    && let Some(info) = self.models.get_mut(&prev)
                {
                    info.aliases.retain(|x| x != &a.alias);
                }
                if let Some(info) = self.models.get_mut(&a.hash) {
                    info.aliases.push(a.alias.clone());
                    info.aliases.sort();
                }
            }
            (event, Ok(StreamName::Job(id))) => {
                self.note_blobs(rec, Some(&id));
                match self.jobs.get_mut(&id) {
                    Some(job) => {
                        match event {
                            Event::TrainStep(s) => {
                                let log = self.training.entry(id.clone()).or_default();
                                log.record_step(s.clone());
                            }
                            Event::TrainValidation(v) => {
                                let log = self.training.entry(id.clone()).or_default();
                                log.record_validation(v.clone());
                            }
                            _ => {}
                        }
                        job.apply(event, rec.ts, &rec.actor);
                        // The log's count is the truth optimistic concurrency checks against.
                        job.version = rec.stream_version;
                    }
                    None => self
                        .anomalies
                        .push(format!("seq {}: event for unknown job {id}", rec.seq)),
                }
            }
            (_, stream) => self.anomalies.push(format!(
                "seq {}: event {} does not belong on stream {:?}",
                rec.seq,
                rec.event.event_type(),
                stream
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string())
            )),
        }
    }

    /// An ingested dataset by id, or by name (the latest registration of that name).
    pub fn resolve_dataset(&self, reference: &str) -> Option<&Dataset> {
        if let Some(d) = reference
            .parse::<DatasetId>()
            .ok()
            .and_then(|id| self.datasets.get(&id))
        {
            return Some(d);
        }
        self.datasets
            .values()
            .filter(|d| d.name == reference)
            .max_by_key(|d| d.registered_at)
    }

    /// A built dataset by manifest hash, or by name (the latest build of that name).
    pub fn resolve_built(&self, reference: &str) -> Option<&BuiltDataset> {
        if let Ok(hash) = reference.parse::<BlobHash>() {
            return self.built.get(&hash);
        }
        self.built
            .values()
            .filter(|d| d.name == reference)
            .max_by_key(|d| d.built_at)
    }

    /// The module a job reference names: a registry name or a registered hash.
    pub fn resolve_module(&self, reference: &str) -> Option<&ModuleInfo> {
        let hash = match reference.parse::<BlobHash>() {
            Ok(h) => h,
            Err(_) => *self.aliases.get(reference)?,
        };
        self.modules.get(&hash)
    }

    /// The model a job reference names: a model name or a registered manifest hash.
    pub fn resolve_model(&self, reference: &str) -> Option<&ModelInfo> {
        let hash = match reference.parse::<BlobHash>() {
            Ok(h) => h,
            Err(_) => *self.model_aliases.get(reference)?,
        };
        self.models.get(&hash)
    }

    pub fn lineage(&self, target: &str) -> Option<Lineage> {
        let (producer, job_id) = match target.parse::<BlobHash>() {
            Ok(hash) => {
                let producer = self.producers.get(&hash)?.clone();
                let job = producer.job.clone();
                (Some(producer), job)
            }
            Err(_) => (
                None,
                Some(
                    target
                        .parse::<JobId>()
                        .ok()
                        .filter(|id| self.jobs.contains_key(id))?,
                ),
            ),
        };
        let job = job_id.as_ref().and_then(|id| self.jobs.get(id)).cloned();
        let experiment = job
            .as_ref()
            .and_then(|j| j.experiment.as_ref())
            .and_then(|e| self.experiments.get(e))
            .cloned();
        let datasets = self
            .datasets
            .values()
            .filter(|d| Some(&d.job) == job_id.as_ref())
            .cloned()
            .collect();
        let mut blobs: Vec<BlobHash> = job
            .iter()
            .flat_map(|j| {
                let results = j.result.iter().flat_map(|r| r.blobs());
                j.artefacts
                    .iter()
                    .map(|a| a.blob)
                    .chain(results)
                    .chain(j.submission.spec.inputs())
                    .collect::<Vec<_>>()
            })
            .collect();
        blobs.sort();
        blobs.dedup();
        let target_hash = target.parse::<BlobHash>().ok();
        let models = self
            .models
            .values()
            .filter(|m| {
                blobs.contains(&m.model.hash)
                    || target_hash.is_some_and(|t| {
                        t == m.model.hash || m.model.files.iter().any(|f| f.sha256 == t)
                    })
            })
            .cloned()
            .collect();
        Some(Lineage {
            target: target.to_owned(),
            producer,
            job,
            experiment,
            datasets,
            models,
            blobs,
        })
    }
}
