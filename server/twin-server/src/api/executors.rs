//! The executor protocol: lease, start, heartbeat, progress, artefacts, complete, fail, release.
//! Every call after the lease carries the lease's epoch; a stale epoch gets 409 `stale_epoch`.

use actix_web::{HttpResponse, post, web};
use twin_core::api::{
    ArtefactBody, CompleteBody, EpochBody, FailBody, HeartbeatResponse, LeaseGrant, LeaseRequest,
    ProgressBody, ReleaseBody, TrainRecordBody,
};
use twin_core::job::{JobCommand, JobState};

use crate::api::responses::{
    BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, TooManyRequests, Unauthorized,
    Unavailable,
};
use crate::auth::{Caller, Role};
use crate::error::{ApiError, text_limits};
use crate::service::{Service, now_ms};

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(lease)
        .service(start)
        .service(heartbeat)
        .service(progress)
        .service(artefact)
        .service(training_record)
        .service(complete)
        .service(fail)
        .service(release);
}

/// Leases the best queued job this executor can run (priority, then age), waiting up to
/// `wait_ms`; 204 when none came.
#[utoipa::path(
    tag = "executors",
    operation_id = "executors_lease",
    request_body = LeaseRequest,
    responses(
        (status = 200, body = LeaseGrant), (status = 204, description = "no job came"),
        BadRequest, Unauthorized, Forbidden, PayloadTooLarge, TooManyRequests, Unavailable
    )
)]
#[post("/executors/lease")]
async fn lease(
    caller: Caller,
    svc: web::Data<Service>,
    body: web::Json<LeaseRequest>,
) -> Result<HttpResponse, ApiError> {
    let actor = caller.require(Role::Execute)?;
    let body = body.into_inner();
    let _slot = if body.wait_ms == 0 {
        None
    } else {
        Some(svc.waiters.acquire(&caller)?)
    };
    Ok(match svc.lease(actor, body).await? {
        Some(grant) => HttpResponse::Ok().json(grant),
        None => HttpResponse::NoContent().finish(),
    })
}

/// Marks the leased job running.
#[utoipa::path(
    tag = "executors",
    operation_id = "executors_start",
    params(("id" = twin_core::JobId, Path)),
    request_body = EpochBody,
    responses((status = 200, body = JobState), BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge, Unavailable)
)]
#[post("/jobs/{id}/start")]
async fn start(
    caller: Caller,
    svc: web::Data<Service>,
    id: web::Path<String>,
    body: web::Json<EpochBody>,
) -> Result<web::Json<JobState>, ApiError> {
    let actor = caller.require(Role::Execute)?;
    svc.job_command(actor, &id, JobCommand::Start { epoch: body.epoch })
        .await
        .map(web::Json)
}

/// Extends the lease; says whether cancellation was requested.
#[utoipa::path(
    tag = "executors",
    operation_id = "executors_heartbeat",
    params(("id" = twin_core::JobId, Path)),
    request_body = EpochBody,
    responses(
        (status = 200, body = HeartbeatResponse),
        BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge
    )
)]
#[post("/jobs/{id}/heartbeat")]
async fn heartbeat(
    caller: Caller,
    svc: web::Data<Service>,
    id: web::Path<String>,
    body: web::Json<EpochBody>,
) -> Result<web::Json<HeartbeatResponse>, ApiError> {
    let actor = caller.require(Role::Execute)?;
    let cancel_requested = svc.heartbeat(actor, &id, body.epoch)?;
    Ok(web::Json(HeartbeatResponse {
        cancel_requested,
        lease_ttl_ms: svc.lease_ttl.as_millis() as u64,
    }))
}

/// Records a progress event.
#[utoipa::path(
    tag = "executors",
    operation_id = "executors_progress",
    params(("id" = twin_core::JobId, Path)),
    request_body = ProgressBody,
    responses((status = 200, body = JobState), BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge, Unavailable)
)]
#[post("/jobs/{id}/progress")]
async fn progress(
    caller: Caller,
    svc: web::Data<Service>,
    id: web::Path<String>,
    body: web::Json<ProgressBody>,
) -> Result<web::Json<JobState>, ApiError> {
    let actor = caller.require(Role::Execute)?;
    let b = body.into_inner();
    if b.fraction.is_some_and(|f| !(0.0..=1.0).contains(&f)) {
        return Err(ApiError::InvalidBody(
            "fraction: must be within [0, 1]".into(),
        ));
    }
    if b.counters.len() > text_limits::PROGRESS_COUNTERS
        || b.counters
            .keys()
            .any(|k| k.len() > text_limits::COUNTER_NAME)
    {
        return Err(ApiError::InvalidBody(format!(
            "counters: at most {} of them, names of at most {} bytes",
            text_limits::PROGRESS_COUNTERS,
            text_limits::COUNTER_NAME
        )));
    }
    if b.counters.values().any(|v| !v.is_finite()) {
        return Err(ApiError::InvalidBody(
            "counters: values must be finite".into(),
        ));
    }
    let cmd = JobCommand::Progress {
        epoch: b.epoch,
        // An executor's words, kept (shortened) rather than refused: a report is not worth
        // failing over.
        message: truncate_utf8(b.message, text_limits::PROGRESS_MESSAGE),
        fraction: b.fraction,
        counters: b.counters,
    };
    svc.job_command(actor, &id, cmd).await.map(web::Json)
}

/// Records an uploaded blob as a named artefact of the job.
#[utoipa::path(
    tag = "executors",
    operation_id = "executors_record_artefact",
    params(("id" = twin_core::JobId, Path)),
    request_body = ArtefactBody,
    responses((status = 200, body = JobState), BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge, Unavailable)
)]
#[post("/jobs/{id}/artefacts")]
async fn artefact(
    caller: Caller,
    svc: web::Data<Service>,
    id: web::Path<String>,
    body: web::Json<ArtefactBody>,
) -> Result<web::Json<JobState>, ApiError> {
    let actor = caller.require(Role::Execute)?;
    let b = body.into_inner();
    let bytes = svc.blobs.len(&b.blob).map_err(|_| {
        ApiError::InvalidBody(format!(
            "blob: {} is not in the blob store; upload it first",
            b.blob
        ))
    })?;
    let cmd = JobCommand::RecordArtefact {
        epoch: b.epoch,
        name: b.name,
        blob: b.blob,
        bytes,
    };
    svc.job_command(actor, &id, cmd).await.map(web::Json)
}

/// Records a training step or validation of the leased `train` job (a `train_step` or
/// `train_validation` event). Numbers must be finite and named blobs uploaded.
#[utoipa::path(
    tag = "executors",
    operation_id = "executors_record_training",
    params(("id" = twin_core::JobId, Path)),
    request_body = TrainRecordBody,
    responses((status = 200, body = JobState), BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge, Unavailable)
)]
#[post("/jobs/{id}/training")]
async fn training_record(
    caller: Caller,
    svc: web::Data<Service>,
    id: web::Path<String>,
    body: web::Json<TrainRecordBody>,
) -> Result<web::Json<JobState>, ApiError> {
    let actor = caller.require(Role::Execute)?;
    let b = body.into_inner();
    let cmd = JobCommand::RecordTraining {
        epoch: b.epoch,
        record: Box::new(b.record),
    };
    svc.job_command(actor, &id, cmd).await.map(web::Json)
}

/// Completes the job with its typed output.
#[utoipa::path(
    tag = "executors",
    operation_id = "executors_complete",
    params(("id" = twin_core::JobId, Path)),
    request_body = CompleteBody,
    responses((status = 200, body = JobState), BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge, Unavailable)
)]
#[post("/jobs/{id}/complete")]
async fn complete(
    caller: Caller,
    svc: web::Data<Service>,
    id: web::Path<String>,
    body: web::Json<CompleteBody>,
) -> Result<web::Json<JobState>, ApiError> {
    let actor = caller.require(Role::Execute)?;
    let b = body.into_inner();
    let cmd = JobCommand::Complete {
        epoch: b.epoch,
        output: Box::new(b.output),
        dataset: Service::dataset_id(),
    };
    svc.job_command(actor, &id, cmd).await.map(web::Json)
}

/// Fails the attempt with a failure code and message; retried with backoff when `retryable` and
/// attempts remain. After a cancellation request this ends the job as cancelled.
#[utoipa::path(
    tag = "executors",
    operation_id = "executors_fail",
    params(("id" = twin_core::JobId, Path)),
    request_body = FailBody,
    responses((status = 200, body = JobState), BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge, Unavailable)
)]
#[post("/jobs/{id}/fail")]
async fn fail(
    caller: Caller,
    svc: web::Data<Service>,
    id: web::Path<String>,
    body: web::Json<FailBody>,
) -> Result<web::Json<JobState>, ApiError> {
    let actor = caller.require(Role::Execute)?;
    let b = body.into_inner();
    if let Some(detail) = b.detail.as_ref()
        && detail.len() > FailBody::MAX_DETAIL_BYTES
    {
        return Err(ApiError::InvalidBody(format!(
            "detail: at most {} bytes, got {}",
            FailBody::MAX_DETAIL_BYTES,
            detail.len()
        )));
    }
    let cmd = JobCommand::Fail {
        epoch: b.epoch,
        error: truncate_utf8(b.error, FailBody::MAX_ERROR_BYTES),
        retryable: b.retryable,
        code: b.code,
        detail: b.detail,
        now: now_ms(),
    };
    svc.job_command(actor, &id, cmd).await.map(web::Json)
}

/// Gives the job back unfinished (the executor is shutting down): it is queued again at once,
/// with no backoff, and the attempt counts against no limit. After a cancellation request this
/// ends the job as cancelled.
#[utoipa::path(
    tag = "executors",
    operation_id = "executors_release",
    params(("id" = twin_core::JobId, Path)),
    request_body = ReleaseBody,
    responses((status = 200, body = JobState), BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge, Unavailable)
)]
#[post("/jobs/{id}/release")]
async fn release(
    caller: Caller,
    svc: web::Data<Service>,
    id: web::Path<String>,
    body: web::Json<ReleaseBody>,
) -> Result<web::Json<JobState>, ApiError> {
    let actor = caller.require(Role::Execute)?;
    let b = body.into_inner();
    let reason = b
        .reason
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| format!("released by {actor}"));
    let cmd = JobCommand::ReleaseLease {
        epoch: b.epoch,
        reason: truncate_utf8(reason, ReleaseBody::MAX_REASON_BYTES),
    };
    svc.job_command(actor, &id, cmd).await.map(web::Json)
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn truncate_utf8(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::truncate_utf8;

    #[test]
    fn truncation_keeps_whole_characters_within_the_limit() {
        assert_eq!(truncate_utf8("short".into(), 16), "short");
        assert_eq!(truncate_utf8("abcdef".into(), 3), "abc");
        // "é" is two bytes: a cut through it keeps the characters before it.
        assert_eq!(truncate_utf8("aéb".into(), 2), "a");
        assert_eq!(truncate_utf8("aéb".into(), 3), "aé");
    }
}
