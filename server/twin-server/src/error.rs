//! The one error table of the HTTP API: every failure maps to a stable code and a status.
//!
//! Messages name the bad field or id. Internal details (I/O errors, storage faults) are logged
//! with `tracing` and replaced by a generic message in the response.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use twin_core::api::{ErrorBody, ErrorDetail};
use twin_core::{Rejection, SpecError};
use twin_log::{AppendError, BlobError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidSpec(SpecError),
    #[error("{0}")]
    InvalidBody(String),
    #[error("{0}")]
    InvalidQuery(String),
    #[error("{what} `{value}` is not a valid id")]
    InvalidId { what: &'static str, value: String },
    #[error("missing bearer token: send `Authorization: Bearer <token>`")]
    Unauthenticated,
    #[error("unknown token")]
    BadToken,
    #[error("token `{name}` lacks the `{role}` role")]
    Forbidden { name: String, role: &'static str },
    #[error("{what} `{id}` not found")]
    NotFound { what: &'static str, id: String },
    #[error("no route for {method} {path}")]
    RouteNotFound { method: String, path: String },
    #[error("{0}")]
    Rejected(Rejection),
    #[error("experiment `{0}` already exists")]
    ExperimentExists(String),
    #[error("idempotency key `{0}` was already used with a different request")]
    IdempotencyKeyReused(String),
    #[error("job {job} is leased by `{holder}`; only the lease holder may act on it")]
    NotLeaseHolder { job: String, holder: String },
    #[error("concurrent change to {0}; retry")]
    Conflict(String),
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("blob {expected}: uploaded bytes hash to {actual}")]
    BlobHashMismatch { expected: String, actual: String },
    #[error(
        "the event log could not make the change durable, so nothing was recorded; retry later"
    )]
    StorageUnavailable,
    /// Applying a durable batch to the in-memory projections panicked: decisions on the stale
    /// state could contradict the log, so nothing more is appended until a restart rebuilds them.
    #[error(
        "the server's projections stopped at {0}; it refuses changes until a restart rebuilds them from the log"
    )]
    ProjectionsFailed(String),
    /// The blob store's file system is full, or a blob would leave less than the reserve the
    /// log needs.
    #[error("{0}")]
    NoSpace(String),
    #[error("upload {id} continues at byte {expected}, not at {got}: resume from {expected}")]
    UploadOffsetMismatch { id: String, expected: u64, got: u64 },
    #[error("upload {0} is busy with another request; retry when it ends")]
    UploadBusy(String),
    #[error("{what} `{name}` belongs to `{owner}`; only they or an admin may point it elsewhere")]
    NotOwner {
        what: &'static str,
        name: String,
        owner: String,
    },
    /// With auth off, a Host header that is not loopback nor configured (DNS rebinding).
    #[error(
        "Host `{0}` is not served: with no tokens configured only loopback names and `allowed_hosts` are"
    )]
    HostNotAllowed(String),
    /// Too many long polls or event streams held (`waiters`).
    #[error("{0}; retry when one ends")]
    TooManyWaiters(String),
    /// A browser's request from another origin.
    #[error("requests from origin `{0}` are refused: this API is not for web pages elsewhere")]
    CrossOrigin(String),
    #[error("upload {id} belongs to `{owner}`; only they or an admin may use it")]
    NotUploadOwner { id: String, owner: String },
    #[error("range `{range}` is outside the blob's {len} bytes")]
    RangeNotSatisfiable { range: String, len: u64 },
    /// An uploaded module was refused (not a component, invalid, too slow to compile, …).
    #[error("{0}")]
    Module(twin_plugins::PluginError),
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// Logs an internal failure and returns the opaque error sent to the client.
    pub fn internal(context: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "{context}");
        ApiError::Internal
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidSpec(SpecError::KindNotBuilt(_)) => "kind_not_built",
            ApiError::InvalidSpec(SpecError::UnknownKind(_)) => "unknown_kind",
            ApiError::InvalidSpec(_) => "invalid_spec",
            ApiError::InvalidBody(_) => "invalid_body",
            ApiError::InvalidQuery(_) => "invalid_query",
            ApiError::InvalidId { .. } => "invalid_id",
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::BadToken => "bad_token",
            ApiError::Forbidden { .. } => "forbidden",
            ApiError::NotFound { .. } => "not_found",
            ApiError::RouteNotFound { .. } => "route_not_found",
            ApiError::Rejected(Rejection::StaleEpoch { .. }) => "stale_epoch",
            ApiError::Rejected(Rejection::NotYetEligible { .. }) => "not_yet_eligible",
            ApiError::Rejected(Rejection::InvalidState { .. }) => "invalid_state",
            ApiError::Rejected(Rejection::WrongOutput { .. }) => "wrong_output",
            ApiError::ExperimentExists(_) => "experiment_exists",
            ApiError::IdempotencyKeyReused(_) => "idempotency_key_reused",
            ApiError::NotLeaseHolder { .. } => "not_lease_holder",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::BlobHashMismatch { .. } => "blob_hash_mismatch",
            ApiError::StorageUnavailable | ApiError::NoSpace(_) => "storage_unavailable",
            ApiError::ProjectionsFailed(_) => "projections_failed",
            ApiError::UploadOffsetMismatch { .. } => "upload_offset_mismatch",
            ApiError::UploadBusy(_) => "upload_busy",
            ApiError::NotUploadOwner { .. } | ApiError::NotOwner { .. } => "forbidden",
            ApiError::HostNotAllowed(_) => "host_not_allowed",
            ApiError::TooManyWaiters(_) => "too_many_waiters",
            ApiError::CrossOrigin(_) => "cross_origin",
            ApiError::RangeNotSatisfiable { .. } => "range_not_satisfiable",
            ApiError::Module(e) if e.is_module_fault() => e.code(),
            ApiError::Module(_) => "internal",
            ApiError::Internal => "internal",
        }
    }

    /// Every code with its status, for the documentation test.
    pub const TABLE: &[(&str, u16)] = &[
        ("invalid_spec", 400),
        ("kind_not_built", 400),
        ("unknown_kind", 400),
        ("invalid_body", 400),
        ("invalid_query", 400),
        ("invalid_id", 400),
        ("wrong_output", 400),
        ("blob_hash_mismatch", 400),
        ("unauthenticated", 401),
        ("bad_token", 401),
        ("forbidden", 403),
        ("host_not_allowed", 403),
        ("cross_origin", 403),
        ("not_found", 404),
        ("route_not_found", 404),
        ("stale_epoch", 409),
        ("not_yet_eligible", 409),
        ("invalid_state", 409),
        ("experiment_exists", 409),
        ("idempotency_key_reused", 409),
        ("not_lease_holder", 409),
        ("conflict", 409),
        ("upload_offset_mismatch", 409),
        ("upload_busy", 409),
        ("payload_too_large", 413),
        ("module_too_large", 413),
        ("range_not_satisfiable", 416),
        ("too_many_waiters", 429),
        ("not_wasm", 422),
        ("invalid_module", 422),
        ("compile_timeout", 422),
        ("world_mismatch", 422),
        ("unknown_import", 422),
        ("wrong_module_kind", 422),
        ("out_of_fuel", 422),
        ("deadline_exceeded", 422),
        ("memory_limit", 422),
        ("stack_overflow", 422),
        ("guest_trap", 422),
        ("guest_error", 422),
        ("bad_params", 422),
        ("bad_output", 422),
        ("capability_not_granted", 422),
        ("internal", 500),
        ("storage_unavailable", 503),
        ("projections_failed", 503),
    ];
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        let code = self.code();
        let status = ApiError::TABLE
            .iter()
            .find(|(c, _)| *c == code)
            .map_or(500, |(_, s)| *s);
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::Unauthenticated | ApiError::BadToken) {
            resp.insert_header(("WWW-Authenticate", "Bearer"));
        }
        if let ApiError::RangeNotSatisfiable { len, .. } = self {
            // RFC 9110 §15.5.17: the current length, so a client can correct its range.
            resp.insert_header(("Content-Range", format!("bytes */{len}")));
        }
        resp.json(ErrorBody {
            error: ErrorDetail {
                code: self.code().to_owned(),
                message: self.to_string(),
            },
        })
    }
}

impl From<SpecError> for ApiError {
    fn from(e: SpecError) -> Self {
        ApiError::InvalidSpec(e)
    }
}

/// Free text a caller writes into the log (a review note, a description, a reason): capped so
/// that no field can fill an event, whatever the JSON body limit is.
pub fn check_text(field: &str, text: &str, max_bytes: usize) -> Result<(), ApiError> {
    if text.len() > max_bytes {
        return Err(ApiError::InvalidBody(format!(
            "{field}: {} bytes, over the limit of {max_bytes}",
            text.len()
        )));
    }
    Ok(())
}

/// The caps [`check_text`] applies.
pub mod text_limits {
    pub const REVIEW_NOTE: usize = 2_000;
    pub const EXPERIMENT_DESCRIPTION: usize = 4_000;
    pub const CANCEL_REASON: usize = 500;
    pub const PROGRESS_MESSAGE: usize = 1_000;
    /// A progress report's counters: how many, and each name's length.
    pub const PROGRESS_COUNTERS: usize = 256;
    pub const COUNTER_NAME: usize = 64;
}

impl From<Rejection> for ApiError {
    fn from(e: Rejection) -> Self {
        ApiError::Rejected(e)
    }
}

impl From<AppendError> for ApiError {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::IdempotencyConflict { key } => ApiError::IdempotencyKeyReused(key),
            AppendError::VersionConflict { stream, .. } => ApiError::Conflict(stream),
            AppendError::TooLarge { limit } => ApiError::PayloadTooLarge {
                limit: limit as u64,
            },
            AppendError::Storage { message } => {
                tracing::error!(error = %message, "append failed");
                ApiError::StorageUnavailable
            }
            e @ (AppendError::Empty | AppendError::Closed) => ApiError::internal("append", e),
        }
    }
}

impl From<BlobError> for ApiError {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::NotFound(h) => ApiError::NotFound {
                what: "blob",
                id: h.to_hex(),
            },
            BlobError::HashMismatch { expected, actual } => ApiError::BlobHashMismatch {
                expected: expected.to_hex(),
                actual: actual.to_hex(),
            },
            BlobError::TooLarge { limit } => ApiError::PayloadTooLarge { limit },
            BlobError::NoSpace { path } => {
                tracing::error!(path = %path.display(), "blob store is full");
                ApiError::NoSpace(
                    "the blob store's file system is full; the upload was removed, retry later"
                        .into(),
                )
            }
            BlobError::UploadNotFound(id) => ApiError::NotFound { what: "upload", id },
            BlobError::UploadBusy(id) => ApiError::UploadBusy(id),
            BlobError::OffsetMismatch { id, expected, got } => {
                ApiError::UploadOffsetMismatch { id, expected, got }
            }
            BlobError::Io { path, source } if source.raw_os_error() == Some(28) => {
                tracing::error!(path = %path.display(), error = %source, "blob store is full");
                ApiError::StorageUnavailable
            }
            e @ BlobError::Io { .. } => ApiError::internal("blob store", e),
        }
    }
}
