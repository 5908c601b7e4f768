//! Health, metrics, the OpenAPI document and lineage.

use actix_web::{HttpResponse, get, web};
use twin_core::api::Health;
use twin_core::projection::{BuiltDataset, Dataset, Lineage};

use crate::api::responses::{Forbidden, NotFound, Unauthorized, Unavailable};
use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::service::{ExecutorSeen, Service};

/// Unversioned operational routes.
pub fn configure_root(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(healthz).service(metrics);
}

/// Routes under `/v1`.
pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(openapi_json)
        .service(lineage)
        .service(datasets)
        .service(dataset)
        .service(built_datasets)
        .service(built_dataset)
        .service(executors);
}

/// Liveness and the log's head. 503 (`projections_failed`, `storage_unavailable`) while the
/// in-memory state has stopped or the log is failing to write, so a supervisor restarts the
/// server or pages someone instead of trusting stale answers.
#[utoipa::path(
    tag = "system",
    operation_id = "system_health",
    responses((status = 200, body = Health), Unavailable)
)]
#[get("/healthz")]
async fn healthz(svc: web::Data<Service>) -> Result<web::Json<Health>, ApiError> {
    svc.health()?;
    Ok(web::Json(Health {
        status: "ok".into(),
        last_seq: svc.last_seq(),
        version: env!("CARGO_PKG_VERSION").into(),
    }))
}

/// Prometheus text exposition.
#[utoipa::path(
    tag = "system",
    operation_id = "system_metrics",
    responses((status = 200, content_type = "text/plain", body = String))
)]
#[get("/metrics")]
async fn metrics(svc: web::Data<Service>) -> HttpResponse {
    let counts = svc.read(|p| p.count_by_status());
    let text = svc.metrics.render(counts);
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(text)
}

/// This document.
#[utoipa::path(
    tag = "system",
    operation_id = "system_openapi",
    responses((status = 200, content_type = "application/json", body = Object))
)]
#[get("/openapi.json")]
async fn openapi_json(doc: web::Data<utoipa::openapi::OpenApi>) -> HttpResponse {
    HttpResponse::Ok().json(doc.get_ref())
}

/// What produced a blob (by SHA-256) or a job (by id): job, spec, inputs, outputs.
#[utoipa::path(
    tag = "audit",
    operation_id = "audit_lineage",
    params(("target" = String, Path, description = "blob hash or job id")),
    responses((status = 200, body = Lineage), Unauthorized, Forbidden, NotFound)
)]
#[get("/lineage/{target}")]
async fn lineage(
    caller: Caller,
    svc: web::Data<Service>,
    target: web::Path<String>,
) -> Result<web::Json<Lineage>, ApiError> {
    caller.require(Role::Read)?;
    svc.read(|p| p.lineage(&target))
        .map(web::Json)
        .ok_or_else(|| ApiError::NotFound {
            what: "blob or job",
            id: target.chars().take(80).collect(),
        })
}

/// Registered datasets.
#[utoipa::path(
    tag = "datasets",
    operation_id = "datasets_list",
    responses((status = 200, body = Vec<Dataset>), Unauthorized, Forbidden)
)]
#[get("/datasets")]
async fn datasets(
    caller: Caller,
    svc: web::Data<Service>,
) -> Result<web::Json<Vec<Dataset>>, ApiError> {
    caller.require(Role::Read)?;
    Ok(web::Json(
        svc.read(|p| p.datasets.values().cloned().collect()),
    ))
}

/// One dataset.
#[utoipa::path(
    tag = "datasets",
    operation_id = "datasets_get",
    params(("id" = twin_core::DatasetId, Path)),
    responses((status = 200, body = Dataset), Unauthorized, Forbidden, NotFound)
)]
#[get("/datasets/{id}")]
async fn dataset(
    caller: Caller,
    svc: web::Data<Service>,
    id: web::Path<String>,
) -> Result<web::Json<Dataset>, ApiError> {
    caller.require(Role::Read)?;
    let found = id
        .parse()
        .ok()
        .and_then(|id| svc.read(|p| p.datasets.get(&id).cloned()));
    found.map(web::Json).ok_or_else(|| ApiError::NotFound {
        what: "dataset",
        id: id.chars().take(80).collect(),
    })
}

/// Datasets built by build-dataset jobs, each identified by its manifest's hash.
#[utoipa::path(
    tag = "datasets",
    operation_id = "built_datasets_list",
    responses((status = 200, body = Vec<BuiltDataset>), Unauthorized, Forbidden)
)]
#[get("/built-datasets")]
async fn built_datasets(
    caller: Caller,
    svc: web::Data<Service>,
) -> Result<web::Json<Vec<BuiltDataset>>, ApiError> {
    caller.require(Role::Read)?;
    Ok(web::Json(svc.read(|p| p.built.values().cloned().collect())))
}

/// One built dataset, by manifest hash or by name (its latest build).
#[utoipa::path(
    tag = "datasets",
    operation_id = "built_datasets_get",
    params(("reference" = String, Path, description = "manifest hash or name")),
    responses((status = 200, body = BuiltDataset), Unauthorized, Forbidden, NotFound)
)]
#[get("/built-datasets/{reference}")]
async fn built_dataset(
    caller: Caller,
    svc: web::Data<Service>,
    reference: web::Path<String>,
) -> Result<web::Json<BuiltDataset>, ApiError> {
    caller.require(Role::Read)?;
    svc.read(|p| p.resolve_built(&reference).cloned())
        .map(web::Json)
        .ok_or_else(|| ApiError::NotFound {
            what: "built dataset",
            id: reference.chars().take(80).collect(),
        })
}

/// Executors seen since the server started.
#[utoipa::path(
    tag = "executors",
    operation_id = "executors_list",
    responses((status = 200, body = Vec<ExecutorSeen>), Unauthorized, Forbidden)
)]
#[get("/executors")]
async fn executors(
    caller: Caller,
    svc: web::Data<Service>,
) -> Result<web::Json<Vec<ExecutorSeen>>, ApiError> {
    caller.require(Role::Read)?;
    Ok(web::Json(svc.executors()))
}
