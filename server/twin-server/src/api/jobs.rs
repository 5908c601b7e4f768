//! Jobs: submit, list with filters, get, cancel.

use actix_web::{HttpRequest, HttpResponse, get, post, web};
use serde::Deserialize;
use twin_core::JobKind;
use twin_core::api::{CancelBody, TrainingReport};
use twin_core::job::{JobState, JobStatus};

use crate::api::responses::{
    BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, Unauthorized, Unavailable,
};
use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::service::Service;

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(submit)
        .service(list)
        .service(get_job)
        .service(training)
        .service(cancel);
}

/// Submits a job. With an `Idempotency-Key` header a retried submission returns the original job
/// (200) instead of creating another (201); the same key with another body is refused (409).
#[utoipa::path(
    tag = "jobs",
    operation_id = "jobs_submit",
    request_body = twin_core::JobSubmission,
    params(("Idempotency-Key" = Option<String>, Header, description = "makes retries safe; scoped to the caller")),
    responses(
        (status = 201, body = JobState), (status = 200, body = JobState, description = "replayed submission"),
        BadRequest, Unauthorized, Forbidden, Conflict, PayloadTooLarge, Unavailable
    )
)]
#[post("/jobs")]
async fn submit(
    caller: Caller,
    svc: web::Data<Service>,
    req: HttpRequest,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let actor = caller.require(Role::Submit)?;
    let key = match req.headers().get("idempotency-key") {
        None => None,
        Some(v) => {
            let k = v.to_str().ok().filter(|k| !k.is_empty() && k.len() <= 255);
            Some(
                k.ok_or_else(|| {
                    ApiError::InvalidBody(
                        "Idempotency-Key: 1 to 255 visible ASCII characters".into(),
                    )
                })?
                .to_owned(),
            )
        }
    };
    let (job, replayed) = svc
        .submit(caller.claimant(actor), body.into_inner(), key)
        .await?;
    let mut resp = if replayed {
        HttpResponse::Ok()
    } else {
        HttpResponse::Created()
    };
    Ok(resp
        .insert_header(("Location", format!("/v1/jobs/{}", job.id)))
        .json(job))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// queued, leased, running, succeeded, failed or cancelled
    state: Option<String>,
    kind: Option<String>,
    experiment: Option<String>,
    /// At most this many, newest first (default 100, at most 10 000).
    limit: Option<usize>,
}

/// Lists jobs, newest first.
#[utoipa::path(
    tag = "jobs",
    operation_id = "jobs_list",
    params(ListQuery),
    responses((status = 200, body = Vec<JobState>), BadRequest, Unauthorized, Forbidden)
)]
#[get("/jobs")]
async fn list(
    caller: Caller,
    svc: web::Data<Service>,
    q: web::Query<ListQuery>,
) -> Result<web::Json<Vec<JobState>>, ApiError> {
    caller.require(Role::Read)?;
    let state = q
        .state
        .as_deref()
        .map(|s| {
            JobStatus::parse(s)
                .ok_or_else(|| ApiError::InvalidQuery(format!("state: unknown state `{s}`")))
        })
        .transpose()?;
    let kind = q
        .kind
        .as_deref()
        .map(|k| {
            JobKind::parse(k)
                .ok_or_else(|| ApiError::InvalidQuery(format!("kind: unknown kind `{k}`")))
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(100).min(10_000);
    let jobs = svc.read(|p| {
        p.jobs
            .values()
            .rev()
            .filter(|j| state.is_none_or(|s| j.status == s))
            .filter(|j| kind.is_none_or(|k| j.kind == k))
            .filter(|j| {
                q.experiment
                    .as_deref()
                    .is_none_or(|e| j.experiment.as_ref().is_some_and(|x| x.as_str() == e))
            })
            .take(limit)
            .cloned()
            .collect()
    });
    Ok(web::Json(jobs))
}

/// One job with its attempts, progress, artefacts and result.
#[utoipa::path(
    tag = "jobs",
    operation_id = "jobs_get",
    params(("id" = twin_core::JobId, Path)),
    responses((status = 200, body = JobState), BadRequest, Unauthorized, Forbidden, NotFound)
)]
#[get("/jobs/{id}")]
async fn get_job(
    caller: Caller,
    svc: web::Data<Service>,
    id: web::Path<String>,
) -> Result<web::Json<JobState>, ApiError> {
    caller.require(Role::Read)?;
    svc.get_job(&id).map(web::Json)
}

/// A training run's steps, validations and registered checkpoints (empty lists until it has
/// taken a step).
#[utoipa::path(
    tag = "jobs",
    operation_id = "jobs_training",
    params(("id" = twin_core::JobId, Path)),
    responses((status = 200, body = TrainingReport), BadRequest, Unauthorized, Forbidden, NotFound)
)]
#[get("/jobs/{id}/training")]
async fn training(
    caller: Caller,
    svc: web::Data<Service>,
    id: web::Path<String>,
) -> Result<web::Json<TrainingReport>, ApiError> {
    caller.require(Role::Read)?;
    let job = svc.get_job(&id)?;
    if job.kind != JobKind::Train {
        return Err(ApiError::InvalidQuery(format!(
            "job {} is a {} job; only train jobs have a training history",
            job.id, job.kind
        )));
    }
    Ok(web::Json(svc.read(|p| {
        let mut checkpoints: Vec<_> = p
            .models
            .values()
            .filter(|m| m.model.job.as_ref() == Some(&job.id))
            .cloned()
            .collect();
        checkpoints.sort_by_key(|m| m.registered_at);
        TrainingReport {
            job: job.id.clone(),
            log: p.training.get(&job.id).cloned().unwrap_or_default(),
            checkpoints,
        }
    })))
}

/// Cancels a job: a queued one at once, a running one through its executor's next heartbeat.
#[utoipa::path(
    tag = "jobs",
    operation_id = "jobs_cancel",
    params(("id" = twin_core::JobId, Path)),
    request_body = Option<CancelBody>,
    responses(
        (status = 200, body = JobState),
        BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge, Unavailable
    )
)]
#[post("/jobs/{id}/cancel")]
async fn cancel(
    caller: Caller,
    svc: web::Data<Service>,
    id: web::Path<String>,
    body: Option<web::Json<CancelBody>>,
) -> Result<web::Json<JobState>, ApiError> {
    let actor = caller.require(Role::Submit)?;
    let reason = body.and_then(|b| b.into_inner().reason);
    svc.cancel(actor, &id, reason).await.map(web::Json)
}
