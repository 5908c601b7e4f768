//! Typed async client of the twin HTTP API v1, used by the CLI and by executors.
//!
//! API boundary: the only crate that imports reqwest. Every call maps a non-2xx answer to
//! [`ClientError::Api`] carrying the server's stable error code, so callers branch on codes,
//! never on message text.

pub mod models;
mod transfer;

pub use transfer::TransferEvent;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use twin_core::api::{
    ArtefactBody, BlobStored, CancelBody, CandidatePage, CompleteBody, CreateExperiment, EpochBody,
    ErrorBody, EventsPage, FailBody, Health, HeartbeatResponse, LeaseGrant, LeaseRequest,
    ProgressBody, ReleaseBody, ReviewBody, ReviewOutcome, TrainRecordBody, TrainingReport,
};
use twin_core::job::JobState;
use twin_core::projection::{BuiltDataset, Dataset, Experiment, Lineage, ModuleInfo};
use twin_core::{BlobHash, RecordedEvent};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("cannot reach the twin server at {url}: {source}")]
    Transport { url: String, source: reqwest::Error },
    #[error("unexpected answer from {url}: {message}")]
    Protocol { url: String, message: String },
    #[error("CA file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
}

impl ClientError {
    /// The server's error code, for API errors.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The message followed by its causes, `: `-separated (what anyhow's `{:#}` prints), for
    /// logs: a transport error's own text names only the URL, its causes say why (a refused
    /// connection, a certificate not trusted).
    pub fn with_causes(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            text.push_str(": ");
            text.push_str(&c.to_string());
            cause = c.source();
        }
        text
    }
}

/// Filters of `GET /v1/jobs`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobFilter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experiment: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// Query of [`Client::candidates`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct CandidateFilter {
    /// `pending`, `accepted` or `rejected`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    pub offset: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// A submitted job, and whether the server replayed an earlier submission with the same key.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub job: JobState,
    pub replayed: bool,
}

/// The longest an executor's job call (start, heartbeat, progress, artefacts, complete, fail,
/// release) may take: each is one small append, so a call this slow means a wedged server or
/// network, and the executor's retry and lease logic should take over rather than hang.
pub const EXECUTOR_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest wait for the next bytes of a response.
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    /// [`EXECUTOR_CALL_TIMEOUT`] unless changed with [`Client::with_call_timeout`].
    call_timeout: Duration,
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Result<Self, ClientError> {
        Self::with_ca_file(base, token, None)
    }

    /// A client that also trusts the certificates in the PEM file `ca_file` (a private CA's),
    /// besides the public roots it trusts anyway.
    pub fn with_ca_file(
        base: &str,
        token: Option<String>,
        ca_file: Option<&Path>,
    ) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder().use_rustls_tls();
        if let Some(path) = ca_file {
            for ca in read_ca_file(path)? {
                builder = builder.add_root_certificate(ca);
            }
        }
        let http = builder
            .connect_timeout(Duration::from_secs(10))
            // Idle connections are dropped well before the server's keep-alive (actix: 5 s)
            // closes them: reusing one the server is closing fails the request ("error sending
            // request"), which cost an executor a whole attempt after a long model load.
            .pool_idle_timeout(Duration::from_secs(2))
            // No overall timeout (a transfer of tens of gigabytes must not be cut off), but a
            // server that stops sending mid-response is given up on.
            .read_timeout(READ_TIMEOUT)
            .build()
            .map_err(|source| ClientError::Transport {
                url: base.to_owned(),
                source,
            })?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http,
            call_timeout: EXECUTOR_CALL_TIMEOUT,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        // Says this is no browser's cross-site request (the server refuses a body-less POST
        // without it).
        let mut rb = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .header("x-twin-client", concat!("twin/", env!("CARGO_PKG_VERSION")));
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        rb
    }

    async fn send(&self, rb: RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let resp = rb.send().await.map_err(|source| ClientError::Transport {
            url: self.base.clone(),
            source,
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap_or_default();
        Err(match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => ClientError::Api {
                status,
                code: e.error.code,
                message: e.error.message,
            },
            Err(_) => ClientError::Api {
                status,
                code: "http_error".into(),
                message: String::from_utf8_lossy(&body).chars().take(500).collect(),
            },
        })
    }

    async fn json<T: DeserializeOwned>(&self, rb: RequestBuilder) -> Result<T, ClientError> {
        let resp = self.send(rb).await?;
        let url = resp.url().to_string();
        resp.json().await.map_err(|e| ClientError::Protocol {
            url,
            message: e.to_string(),
        })
    }

    /// The Prometheus text exposition.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let resp = self.send(self.request(Method::GET, "/metrics")).await?;
        let url = resp.url().to_string();
        resp.text()
            .await
            .map_err(|source| ClientError::Transport { url, source })
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        self.json(self.request(Method::GET, "/healthz")).await
    }

    /// Submits a job document (see `JobSubmission`); `idempotency_key` makes retries safe.
    pub async fn submit(
        &self,
        submission: &serde_json::Value,
        idempotency_key: Option<&str>,
    ) -> Result<Submitted, ClientError> {
        let mut rb = self.request(Method::POST, "/v1/jobs").json(submission);
        if let Some(k) = idempotency_key {
            rb = rb.header("Idempotency-Key", k);
        }
        let resp = self.send(rb).await?;
        let replayed = resp.status() == StatusCode::OK;
        let url = resp.url().to_string();
        let job = resp.json().await.map_err(|e| ClientError::Protocol {
            url,
            message: e.to_string(),
        })?;
        Ok(Submitted { job, replayed })
    }

    pub async fn jobs(&self, filter: &JobFilter) -> Result<Vec<JobState>, ClientError> {
        self.json(self.request(Method::GET, "/v1/jobs").query(filter))
            .await
    }

    pub async fn job(&self, id: &str) -> Result<JobState, ClientError> {
        self.json(self.request(Method::GET, &format!("/v1/jobs/{id}")))
            .await
    }

    /// A training run's steps, validations and checkpoints.
    pub async fn training(&self, id: &str) -> Result<TrainingReport, ClientError> {
        self.json(self.request(Method::GET, &format!("/v1/jobs/{id}/training")))
            .await
    }

    pub async fn cancel(&self, id: &str, reason: Option<String>) -> Result<JobState, ClientError> {
        self.json(
            self.request(Method::POST, &format!("/v1/jobs/{id}/cancel"))
                .json(&CancelBody { reason }),
        )
        .await
    }

    pub async fn experiments(&self) -> Result<Vec<Experiment>, ClientError> {
        self.json(self.request(Method::GET, "/v1/experiments"))
            .await
    }

    pub async fn create_experiment(
        &self,
        body: &CreateExperiment,
    ) -> Result<Experiment, ClientError> {
        self.json(self.request(Method::POST, "/v1/experiments").json(body))
            .await
    }

    pub async fn datasets(&self) -> Result<Vec<Dataset>, ClientError> {
        self.json(self.request(Method::GET, "/v1/datasets")).await
    }

    pub async fn built_datasets(&self) -> Result<Vec<BuiltDataset>, ClientError> {
        self.json(self.request(Method::GET, "/v1/built-datasets"))
            .await
    }

    /// A built dataset by manifest hash or name.
    pub async fn built_dataset(&self, reference: &str) -> Result<BuiltDataset, ClientError> {
        self.json(self.request(Method::GET, &format!("/v1/built-datasets/{reference}")))
            .await
    }

    /// A succeeded mine job's candidates with their review status.
    pub async fn candidates(
        &self,
        job: &str,
        query: &CandidateFilter,
    ) -> Result<CandidatePage, ClientError> {
        self.json(
            self.request(Method::GET, &format!("/v1/jobs/{job}/candidates"))
                .query(query),
        )
        .await
    }

    /// Accepts or rejects candidates of a mine job.
    pub async fn review(&self, job: &str, body: &ReviewBody) -> Result<ReviewOutcome, ClientError> {
        self.json(
            self.request(Method::POST, &format!("/v1/jobs/{job}/reviews"))
                .json(body),
        )
        .await
    }

    /// The log's chain head, to anchor a later `twin replay --expect-head`.
    pub async fn log_head(&self) -> Result<twin_core::api::LogHead, ClientError> {
        self.json(self.request(Method::GET, "/v1/log/head")).await
    }

    pub async fn lineage(&self, target: &str) -> Result<Lineage, ClientError> {
        self.json(self.request(Method::GET, &format!("/v1/lineage/{target}")))
            .await
    }

    /// One page of events from `from`, waiting up to `wait` for new ones when there are none.
    pub async fn events(
        &self,
        from: u64,
        prefix: Option<&str>,
        wait: Duration,
    ) -> Result<EventsPage, ClientError> {
        let mut query = vec![
            ("from", from.to_string()),
            ("wait_ms", wait.as_millis().to_string()),
        ];
        if let Some(p) = prefix {
            query.push(("prefix", p.to_owned()));
        }
        self.json(
            self.request(Method::GET, "/v1/events")
                .query(&query)
                .timeout(wait + Duration::from_secs(30)),
        )
        .await
    }

    /// Server-Sent Events from `from` as a stream of decoded events.
    pub async fn event_stream(
        &self,
        from: u64,
        prefix: Option<&str>,
    ) -> Result<impl Stream<Item = Result<RecordedEvent, ClientError>> + use<>, ClientError> {
        let mut query = vec![("from", from.to_string())];
        if let Some(p) = prefix {
            query.push(("prefix", p.to_owned()));
        }
        let resp = self
            .send(self.request(Method::GET, "/v1/events/stream").query(&query))
            .await?;
        let url = resp.url().to_string();
        let mut buffer = String::new();
        let body = resp.bytes_stream();
        Ok(body
            .map(move |chunk| {
                let chunk = chunk.map_err(|source| ClientError::Transport {
                    url: url.clone(),
                    source,
                })?;
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                let mut out = Vec::new();
                while let Some(end) = buffer.find("\n\n") {
                    let frame: String = buffer.drain(..end + 2).collect();
                    let data: String = frame
                        .lines()
                        .filter_map(|l| l.strip_prefix("data:"))
                        .map(str::trim_start)
                        .collect();
                    if !data.is_empty() {
                        out.push(
                            serde_json::from_str(&data).map_err(|e| ClientError::Protocol {
                                url: url.clone(),
                                message: e.to_string(),
                            }),
                        );
                    }
                }
                Ok(futures_util::stream::iter(out))
            })
            .flat_map(|r: Result<_, ClientError>| match r {
                Ok(s) => s.left_stream(),
                Err(e) => futures_util::stream::iter(vec![Err(e)]).right_stream(),
            }))
    }

    pub async fn put_blob(&self, bytes: Bytes) -> Result<BlobStored, ClientError> {
        let hash = BlobHash::of(&bytes);
        self.json(
            self.request(Method::PUT, &format!("/v1/blobs/{hash}"))
                .header("content-type", "application/octet-stream")
                .body(bytes),
        )
        .await
    }

    pub async fn has_blob(&self, hash: &BlobHash) -> Result<bool, ClientError> {
        match self
            .send(self.request(Method::HEAD, &format!("/v1/blobs/{hash}")))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(404) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Downloads a blob and checks its hash.
    pub async fn get_blob(&self, hash: &BlobHash) -> Result<Bytes, ClientError> {
        let resp = self
            .send(self.request(Method::GET, &format!("/v1/blobs/{hash}")))
            .await?;
        let url = resp.url().to_string();
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.clone(),
                source,
            })?;
        if BlobHash::of(&bytes) != *hash {
            return Err(ClientError::Protocol {
                url,
                message: format!("downloaded bytes do not hash to {hash}"),
            });
        }
        Ok(bytes)
    }

    // --- the module registry ---

    /// Uploads a Wasm component; the server compiles and describes it before registering it,
    /// and points `name` at it when given.
    pub async fn add_module(
        &self,
        bytes: Bytes,
        name: Option<&str>,
    ) -> Result<ModuleInfo, ClientError> {
        let mut rb = self
            .request(Method::POST, "/v1/modules")
            .header("content-type", "application/wasm")
            .body(bytes);
        if let Some(name) = name {
            rb = rb.query(&[("name", name)]);
        }
        self.json(rb).await
    }

    pub async fn modules(&self) -> Result<Vec<ModuleInfo>, ClientError> {
        self.json(self.request(Method::GET, "/v1/modules")).await
    }

    /// A module by registry name or hash.
    pub async fn module(&self, reference: &str) -> Result<ModuleInfo, ClientError> {
        self.json(self.request(Method::GET, &format!("/v1/modules/{reference}")))
            .await
    }

    /// Points registry name `name` at module `hash` (atomically: jobs see the old or the new).
    pub async fn set_module_alias(
        &self,
        name: &str,
        hash: &str,
    ) -> Result<ModuleInfo, ClientError> {
        self.json(
            self.request(Method::PUT, &format!("/v1/modules/aliases/{name}"))
                .json(&serde_json::json!({ "hash": hash })),
        )
        .await
    }

    // --- the executor protocol ---

    /// Asks for a job; `None` when none came within the request's `wait_ms`.
    pub async fn lease(&self, request: &LeaseRequest) -> Result<Option<LeaseGrant>, ClientError> {
        let rb = self
            .request(Method::POST, "/v1/executors/lease")
            .json(request)
            .timeout(Duration::from_millis(request.wait_ms) + Duration::from_secs(30));
        let resp = self.send(rb).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let url = resp.url().to_string();
        resp.json()
            .await
            .map(Some)
            .map_err(|e| ClientError::Protocol {
                url,
                message: e.to_string(),
            })
    }

    /// Bounds each executor job call by `timeout` instead of [`EXECUTOR_CALL_TIMEOUT`].
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    async fn job_call<B: Serialize, T: DeserializeOwned>(
        &self,
        id: &str,
        verb: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.json(
            self.request(Method::POST, &format!("/v1/jobs/{id}/{verb}"))
                .json(body)
                .timeout(self.call_timeout),
        )
        .await
    }

    pub async fn start(&self, id: &str, epoch: u64) -> Result<JobState, ClientError> {
        self.job_call(id, "start", &EpochBody { epoch }).await
    }

    pub async fn heartbeat(&self, id: &str, epoch: u64) -> Result<HeartbeatResponse, ClientError> {
        self.job_call(id, "heartbeat", &EpochBody { epoch }).await
    }

    pub async fn progress(&self, id: &str, body: &ProgressBody) -> Result<JobState, ClientError> {
        self.job_call(id, "progress", body).await
    }

    pub async fn record_artefact(
        &self,
        id: &str,
        body: &ArtefactBody,
    ) -> Result<JobState, ClientError> {
        self.job_call(id, "artefacts", body).await
    }

    pub async fn record_training(
        &self,
        id: &str,
        body: &TrainRecordBody,
    ) -> Result<JobState, ClientError> {
        self.job_call(id, "training", body).await
    }

    pub async fn complete(&self, id: &str, body: &CompleteBody) -> Result<JobState, ClientError> {
        self.job_call(id, "complete", body).await
    }

    pub async fn fail(&self, id: &str, body: &FailBody) -> Result<JobState, ClientError> {
        self.job_call(id, "fail", body).await
    }

    /// Gives a held job back unfinished (the executor is shutting down): it is queued again at
    /// once and the attempt counts against no limit.
    pub async fn release(&self, id: &str, body: &ReleaseBody) -> Result<JobState, ClientError> {
        self.job_call(id, "release", body).await
    }
}

/// The certificates of a PEM file, at least one.
fn read_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, ClientError> {
    let fail = |message: String| ClientError::CaFile {
        path: path.to_owned(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| fail(e.to_string()))?;
    if certs.is_empty() {
        return Err(fail("holds no PEM certificate".into()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_executor_call_to_a_server_that_never_answers_times_out() {
        // Accepts connections and reads nothing back: a wedged server.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let client = Client::new(&format!("http://{addr}"), None)
            .unwrap()
            .with_call_timeout(Duration::from_millis(300));
        let started = std::time::Instant::now();
        let err = client
            .heartbeat("01j00000000000000000000000", 1)
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(err, ClientError::Transport { .. }), "{err}");
        held.abort();
    }

    #[tokio::test]
    async fn a_transport_error_with_its_causes_says_why() {
        // Port 1 on loopback: nothing listens there, the connection is refused at once.
        let client = Client::new("http://127.0.0.1:1", None).expect("a plain client builds");
        let err = client.health().await.expect_err("nothing listens");
        assert!(matches!(err, ClientError::Transport { .. }), "{err}");
        let text = err.with_causes();
        assert!(text.starts_with(&err.to_string()), "{text}");
        assert!(text.to_lowercase().contains("refused"), "{text}");
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").expect("write");
        let err = Client::with_ca_file("https://127.0.0.1:1", None, Some(&path)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&path.display().to_string()) && text.contains("no PEM certificate"),
            "{text}"
        );
        let missing = dir.path().join("absent.pem");
        let err = Client::with_ca_file("https://127.0.0.1:1", None, Some(&missing)).unwrap_err();
        assert!(err.to_string().contains("absent.pem"), "{err}");
    }
}
