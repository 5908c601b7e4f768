//! Mining's server side: pinning what mine and build-dataset submissions read, listing a mine
//! job's candidates with their review status, and recording reviews.
//!
//! Reviews are events on stream `review/<job>`, one per verdict, with the reviewer as the
//! event's actor; the latest verdict on a pair wins. A build-dataset submission snapshots the
//! accepted pairs into a blob at submission, so its result cannot depend on when it ran.

use std::collections::{BTreeMap, BTreeSet};

use twin_core::api::{CandidatePage, ListedCandidate, ReviewBody, ReviewOutcome};
use twin_core::dataset::BuildDatasetSpec;
use twin_core::event::JobResult;
use twin_core::job::{JobState, JobStatus};
use twin_core::mine::{
    Candidate, CandidateReviewed, ComputeDevice, MineOutput, MineSpec, ReviewStatus, Verdict,
};
use twin_core::projection::Review;
use twin_core::score::Grants;
use twin_core::{BlobHash, Event, JobId, SpecError, StreamName};
use twin_log::{BlobStore, Expected};

use crate::error::ApiError;
use crate::service::{Service, parse_job_id};

/// At most this many verdicts in one review request.
const MAX_REVIEW_PAIRS: usize = 10_000;

pub(crate) fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidSpec(SpecError::Invalid {
        field: field.into(),
        message: message.into(),
    })
}

/// Query of `GET /v1/jobs/{id}/candidates`.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct CandidateQuery {
    /// `pending`, `accepted` or `rejected`; all kept candidates when absent.
    pub status: Option<ReviewStatus>,
    /// Only candidates this filter kept.
    pub filter: Option<String>,
    #[serde(default)]
    pub offset: usize,
    pub limit: Option<usize>,
}

/// One accepted pair in a build's snapshot.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AcceptedPair {
    pub pair: String,
    pub a: BlobHash,
    pub b: BlobHash,
    /// Who accepted it: a reviewer, or `filter:<name>`.
    pub by: String,
    pub mine: JobId,
}

fn status_of(
    c: &Candidate,
    review: Option<&Review>,
    auto_filter: Option<&str>,
) -> (ReviewStatus, Option<String>) {
    match review {
        Some(r) => (
            match r.verdict {
                Verdict::Accept => ReviewStatus::Accepted,
                Verdict::Reject => ReviewStatus::Rejected,
            },
            Some(r.actor.clone()),
        ),
        None if c.auto_accepted => (
            ReviewStatus::Accepted,
            auto_filter.map(|f| format!("filter:{f}")),
        ),
        None => (ReviewStatus::Pending, None),
    }
}

impl Service {
    /// Pins the filters' modules, checks their kind and capabilities, and pins the dataset.
    pub(crate) fn resolve_mine(&self, spec: &mut MineSpec) -> Result<(), ApiError> {
        spec.model_manifest = self.pin_model("spec.model", &spec.model)?;
        let (id, manifest) = self.pin_dataset(&spec.dataset)?;
        spec.dataset_id = Some(id);
        spec.manifest = Some(manifest);
        if spec.device == ComputeDevice::Cuda {
            self.require_gpu_executor("spec.device")?;
        }
        let grants = spec.grants.clone();
        for (i, f) in spec.filters.iter_mut().enumerate() {
            let field = format!("spec.filters[{i}].module");
            f.module_hash = Some(self.resolve_module_ref(&f.module, &field, "filter", &grants)?);
        }
        Ok(())
    }

    /// Pins the dataset and snapshots the accepted candidates of the named mine jobs.
    pub(crate) fn resolve_build(&self, spec: &mut BuildDatasetSpec) -> Result<(), ApiError> {
        let (id, manifest) = self.pin_dataset(&spec.dataset)?;
        spec.dataset_id = Some(id);
        spec.manifest = Some(manifest);
        for (i, h) in spec.synthetic.iter().enumerate() {
            if !self.blobs.contains(h) {
                return Err(invalid(
                    &format!("spec.synthetic[{i}]"),
                    format!("no blob {h}"),
                ));
            }
        }
        let mut accepted = Vec::new();
        for (i, job) in spec.mines.iter().enumerate() {
            let field = format!("spec.mines[{i}]");
            let (state, output) = self
                .mine_result(job)
                .map_err(|e| invalid(&field, e.to_string()))?;
            let JobSpecRef {
                manifest: mined, ..
            } = mine_spec(&state);
            if mined != Some(manifest) {
                return Err(invalid(
                    &field,
                    format!(
                        "mine job {job} mined another dataset than `{}`",
                        spec.dataset
                    ),
                ));
            }
            let candidates = self.read_candidates(&output)?;
            let reviews = self.read(|p| p.reviews.get(job).cloned().unwrap_or_default());
            let auto = mine_spec(&state).auto_accept;
            for c in candidates.iter().filter(|c| c.kept) {
                if let (ReviewStatus::Accepted, Some(by)) =
                    status_of(c, reviews.get(&c.id), auto.as_deref())
                {
                    accepted.push(AcceptedPair {
                        pair: c.id.clone(),
                        a: c.a.blob,
                        b: c.b.blob,
                        by,
                        mine: job.clone(),
                    });
                }
            }
        }
        accepted.sort_by(|x, y| x.pair.cmp(&y.pair).then(x.mine.cmp(&y.mine)));
        accepted.dedup_by(|x, y| x.pair == y.pair);
        let mut jsonl = Vec::new();
        for p in &accepted {
            serde_json::to_writer(&mut jsonl, p).expect("accepted pairs serialise");
            jsonl.push(b'\n');
        }
        let hash = self
            .blobs
            .put(&jsonl)
            .map_err(|e| ApiError::internal("storing the accepted pairs", e))?;
        spec.hard_negatives = Some(hash);
        Ok(())
    }

    /// Refuses a CUDA request unless some executor has reported a GPU to this server.
    pub(crate) fn require_gpu_executor(&self, field: &str) -> Result<(), ApiError> {
        if self
            .executors()
            .into_iter()
            .any(|e| e.capabilities.gpus > 0)
        {
            return Ok(());
        }
        Err(invalid(
            field,
            "CUDA was requested but no executor has a GPU (none has reported one to this \
             server); use \"auto\" or \"cpu\", or start an executor on a GPU machine",
        ))
    }

    fn pin_dataset(&self, reference: &str) -> Result<(twin_core::DatasetId, BlobHash), ApiError> {
        self.read(|p| {
            p.resolve_dataset(reference)
                .map(|d| (d.id.clone(), d.manifest))
        })
        .ok_or_else(|| {
            invalid(
                "spec.dataset",
                format!("no ingested dataset `{reference}`; run an ingest job first"),
            )
        })
    }

    /// A registered module of `kind` by name or hash, whose capabilities `grants` covers.
    pub(crate) fn resolve_module_ref(
        &self,
        reference: &str,
        field: &str,
        kind: &str,
        grants: &Grants,
    ) -> Result<BlobHash, ApiError> {
        let info = self
            .read(|p| p.resolve_module(reference).cloned())
            .ok_or_else(|| invalid(field, format!("no module `{reference}` is registered")))?;
        if info.module.kind != kind {
            return Err(invalid(
                field,
                format!(
                    "`{reference}` is a {} module, not a {kind}",
                    info.module.kind
                ),
            ));
        }
        for cap in &info.module.capabilities {
            let short = twin_plugins::capability::short_name(cap);
            if !grants.grants(short) {
                return Err(invalid(
                    "spec.grants",
                    format!(
                        "`{reference}` needs the `{short}` capability; grant it in spec.grants"
                    ),
                ));
            }
        }
        Ok(info.module.hash)
    }

    /// A succeeded mine job and its output.
    fn mine_result(&self, job: &JobId) -> Result<(JobState, MineOutput), ApiError> {
        let state = self.get_job(&job.to_string())?;
        match (&state.result, state.status) {
            (Some(JobResult::Mine(out)), JobStatus::Succeeded) => {
                let out = out.clone();
                Ok((state, out))
            }
            _ if state.kind != twin_core::JobKind::Mine => Err(ApiError::InvalidQuery(format!(
                "job {job} is a {} job, not a mine job",
                state.kind
            ))),
            _ => Err(ApiError::InvalidQuery(format!(
                "mine job {job} is {:?}; candidates exist once it has succeeded",
                state.status
            ))),
        }
    }

    fn read_candidates(&self, output: &MineOutput) -> Result<Vec<Candidate>, ApiError> {
        parse_candidates(&self.blobs, &output.candidates)
    }

    /// [`Self::read_candidates`] on a blocking thread: a candidate file runs to tens of
    /// megabytes, and reading and parsing it on an async worker would stall every request that
    /// worker serves.
    async fn read_candidates_off_worker(
        &self,
        output: &MineOutput,
    ) -> Result<Vec<Candidate>, ApiError> {
        let (blobs, hash) = (self.blobs.clone(), output.candidates);
        tokio::task::spawn_blocking(move || parse_candidates(&blobs, &hash))
            .await
            .map_err(|e| ApiError::internal("candidates task", e))?
    }

    /// A mine job's candidates with their review status, filtered and paged.
    pub fn list_candidates(
        &self,
        job: &str,
        q: &CandidateQuery,
    ) -> Result<CandidatePage, ApiError> {
        let id = parse_job_id(job)?;
        let (state, output) = self.mine_result(&id)?;
        let auto = mine_spec(&state).auto_accept;
        let reviews = self.read(|p| p.reviews.get(&id).cloned().unwrap_or_default());
        let all = self.read_candidates(&output)?;
        let mut page = CandidatePage {
            job: id.to_string(),
            pending: 0,
            accepted: 0,
            rejected: 0,
            dropped: 0,
            total: 0,
            candidates: Vec::new(),
        };
        let limit = q.limit.unwrap_or(100).min(10_000);
        for c in all {
            if !c.kept {
                page.dropped += 1;
                continue;
            }
            let (status, decided_by) = status_of(&c, reviews.get(&c.id), auto.as_deref());
            match status {
                ReviewStatus::Pending => page.pending += 1,
                ReviewStatus::Accepted => page.accepted += 1,
                ReviewStatus::Rejected => page.rejected += 1,
            }
            if q.status.is_some_and(|s| s != status) {
                continue;
            }
            if let Some(f) = &q.filter
                && !c.verdict(f).is_some_and(|v| v.keep)
            {
                continue;
            }
            page.total += 1;
            if page.total as usize > q.offset && page.candidates.len() < limit {
                page.candidates.push(ListedCandidate {
                    candidate: c,
                    status,
                    decided_by,
                });
            }
        }
        Ok(page)
    }

    /// Records one verdict event per named (or bulk-selected) candidate whose verdict changes.
    pub async fn review(
        &self,
        actor: &str,
        job: &str,
        body: ReviewBody,
    ) -> Result<ReviewOutcome, ApiError> {
        let id = parse_job_id(job)?;
        let (state, output) = self.mine_result(&id)?;
        let candidates = self.read_candidates_off_worker(&output).await?;
        let kept: BTreeMap<&str, &Candidate> = candidates
            .iter()
            .filter(|c| c.kept)
            .map(|c| (c.id.as_str(), c))
            .collect();
        let mut selected: BTreeSet<String> = BTreeSet::new();
        for p in &body.pairs {
            if !kept.contains_key(p.as_str()) {
                let why = if candidates.iter().any(|c| &c.id == p) {
                    "was dropped by a required filter"
                } else {
                    "is not a candidate of this job"
                };
                return Err(ApiError::InvalidBody(format!("pairs: `{p}` {why}")));
            }
            selected.insert(p.clone());
        }
        let auto = mine_spec(&state).auto_accept;
        let reviews = self.read(|p| p.reviews.get(&id).cloned().unwrap_or_default());
        if let Some(bulk) = &body.by_filter {
            let known = candidates
                .first()
                .is_none_or(|c| c.verdicts.iter().any(|v| v.filter == bulk.filter));
            if !known {
                return Err(ApiError::InvalidBody(format!(
                    "by_filter.filter: the job has no filter `{}`",
                    bulk.filter
                )));
            }
            for c in kept.values() {
                let pending =
                    status_of(c, reviews.get(&c.id), auto.as_deref()).0 == ReviewStatus::Pending;
                if pending && c.verdict(&bulk.filter).is_some_and(|v| v.keep == bulk.keep) {
                    selected.insert(c.id.clone());
                }
            }
        }
        if selected.is_empty() && body.by_filter.is_none() {
            return Err(ApiError::InvalidBody(
                "give `pairs` or `by_filter` to say which candidates".into(),
            ));
        }
        if selected.len() > MAX_REVIEW_PAIRS {
            return Err(ApiError::InvalidBody(format!(
                "at most {MAX_REVIEW_PAIRS} verdicts per request"
            )));
        }
        crate::error::check_text("note", &body.note, crate::error::text_limits::REVIEW_NOTE)?;
        let note = match (&body.by_filter, body.note.is_empty()) {
            (Some(b), true) => format!("bulk: filter {} keep={}", b.filter, b.keep),
            _ => body.note.clone(),
        };
        let stream = StreamName::Review(id.clone());
        for _ in 0..8 {
            let (reviews, version) = self.read(|p| {
                let r = p.reviews.get(&id).cloned().unwrap_or_default();
                (r, p.review_versions.get(&id).copied())
            });
            let changes: Vec<&String> = selected
                .iter()
                .filter(|p| reviews.get(*p).is_none_or(|r| r.verdict != body.verdict))
                .collect();
            let outcome = ReviewOutcome {
                recorded: changes.len() as u64,
                unchanged: (selected.len() - changes.len()) as u64,
                pairs: changes.iter().map(|p| (*p).clone()).collect(),
            };
            if changes.is_empty() {
                return Ok(outcome);
            }
            let events = changes
                .iter()
                .map(|p| {
                    (
                        stream.clone(),
                        Event::CandidateReviewed(CandidateReviewed {
                            job: id.clone(),
                            pair: (*p).clone(),
                            verdict: body.verdict,
                            note: note.clone(),
                        }),
                    )
                })
                .collect();
            let expected = match version {
                Some(v) => Expected::Version(v),
                None => Expected::NoStream,
            };
            match self
                .append(actor, events, vec![(stream.to_string(), expected)], None)
                .await
            {
                Ok(_) => return Ok(outcome),
                Err(ApiError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::Conflict(stream.to_string()))
    }
}

/// The parts of a mine job's spec the server needs.
struct JobSpecRef {
    manifest: Option<BlobHash>,
    auto_accept: Option<String>,
}

fn parse_candidates(blobs: &BlobStore, hash: &BlobHash) -> Result<Vec<Candidate>, ApiError> {
    let bytes = blobs.read(hash)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| ApiError::internal("candidates blob is not UTF-8", e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .map_err(|e| ApiError::internal("candidates blob does not parse", e))
}

fn mine_spec(state: &JobState) -> JobSpecRef {
    match &state.submission.spec {
        twin_core::spec::JobSpec::Mine(m) => JobSpecRef {
            manifest: m.manifest,
            auto_accept: m.auto_accept.clone(),
        },
        _ => JobSpecRef {
            manifest: None,
            auto_accept: None,
        },
    }
}
