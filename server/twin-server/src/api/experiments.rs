//! Experiments: named groups of jobs.

use actix_web::{HttpResponse, get, post, web};
use twin_core::api::CreateExperiment;
use twin_core::projection::Experiment;

use crate::api::responses::{
    BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, Unauthorized, Unavailable,
};
use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::service::Service;

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(create).service(list).service(get_experiment);
}

/// Creates an experiment; its name is its id.
#[utoipa::path(
    tag = "experiments",
    operation_id = "experiments_create",
    request_body = CreateExperiment,
    responses(
        (status = 201, body = Experiment),
        BadRequest, Unauthorized, Forbidden, Conflict, PayloadTooLarge, Unavailable
    )
)]
#[post("/experiments")]
async fn create(
    caller: Caller,
    svc: web::Data<Service>,
    body: web::Json<CreateExperiment>,
) -> Result<HttpResponse, ApiError> {
    let actor = caller.require(Role::Submit)?;
    let exp = svc.create_experiment(actor, body.into_inner()).await?;
    Ok(HttpResponse::Created().json(exp))
}

/// Lists experiments with their job ids.
#[utoipa::path(
    tag = "experiments",
    operation_id = "experiments_list",
    responses((status = 200, body = Vec<Experiment>), Unauthorized, Forbidden)
)]
#[get("/experiments")]
async fn list(
    caller: Caller,
    svc: web::Data<Service>,
) -> Result<web::Json<Vec<Experiment>>, ApiError> {
    caller.require(Role::Read)?;
    Ok(web::Json(
        svc.read(|p| p.experiments.values().cloned().collect()),
    ))
}

/// One experiment.
#[utoipa::path(
    tag = "experiments",
    operation_id = "experiments_get",
    params(("id" = twin_core::ExperimentId, Path)),
    responses((status = 200, body = Experiment), Unauthorized, Forbidden, NotFound)
)]
#[get("/experiments/{id}")]
async fn get_experiment(
    caller: Caller,
    svc: web::Data<Service>,
    id: web::Path<String>,
) -> Result<web::Json<Experiment>, ApiError> {
    caller.require(Role::Read)?;
    let found = id
        .parse()
        .ok()
        .and_then(|id| svc.read(|p| p.experiments.get(&id).cloned()));
    found.map(web::Json).ok_or_else(|| ApiError::NotFound {
        what: "experiment",
        id: id.chars().take(80).collect(),
    })
}
