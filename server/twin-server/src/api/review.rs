//! Candidate review: list a mine job's candidates with their status, record verdicts.

use actix_web::{HttpResponse, get, post, web};
use twin_core::api::{CandidatePage, ReviewBody, ReviewOutcome};

use crate::api::responses::{
    BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, Unauthorized, Unavailable,
};
use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::mining::CandidateQuery;
use crate::service::Service;

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(candidates).service(review);
}

/// A succeeded mine job's kept candidates (both images' blobs and source paths, similarity,
/// every filter's verdict) with their review status, filtered and paged.
#[utoipa::path(
    tag = "review",
    operation_id = "review_candidates",
    params(("id" = twin_core::JobId, Path, description = "mine job id"), CandidateQuery),
    responses((status = 200, body = CandidatePage), BadRequest, Unauthorized, Forbidden, NotFound)
)]
#[get("/jobs/{id}/candidates")]
async fn candidates(
    caller: Caller,
    svc: web::Data<Service>,
    id: web::Path<String>,
    query: web::Query<CandidateQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    // Off the async worker: the candidate file is read and parsed whole (see
    // `Service::read_candidates_off_worker`).
    let svc = svc.into_inner();
    let page = web::block(move || svc.list_candidates(&id, &query))
        .await
        .map_err(|e| ApiError::internal("candidates task", e))??;
    Ok(HttpResponse::Ok().json(page))
}

/// Accepts or rejects candidates, by id or every pending one a filter kept. One
/// `candidate_reviewed` event per changed verdict, with the caller as its actor.
#[utoipa::path(
    tag = "review",
    operation_id = "review_record",
    params(("id" = twin_core::JobId, Path, description = "mine job id")),
    request_body = ReviewBody,
    responses(
        (status = 200, body = ReviewOutcome),
        BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge, Unavailable
    )
)]
#[post("/jobs/{id}/reviews")]
async fn review(
    caller: Caller,
    svc: web::Data<Service>,
    id: web::Path<String>,
    body: web::Json<ReviewBody>,
) -> Result<HttpResponse, ApiError> {
    let actor = caller.require(Role::Submit)?;
    Ok(HttpResponse::Ok().json(svc.review(actor, &id, body.into_inner()).await?))
}
