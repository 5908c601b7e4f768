//! The model registry over HTTP: register an uploaded checkpoint by its manifest, list,
//! describe, name → hash aliases; and the admin's collection of blobs nothing refers to.

use actix_web::{HttpResponse, get, post, put, web};
use twin_core::api::AliasBody;
use twin_core::model::{GcReport, GcRequest, RegisterModel};
use twin_core::projection::ModelInfo;

use crate::api::responses::{
    BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, Unauthorized, Unavailable,
};
use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::service::Service;

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(register)
        .service(list)
        .service(alias)
        .service(describe)
        .service(gc);
}

/// Registers a model whose files and canonical manifest are uploaded as blobs (`twin models add`
/// does both). The manifest's SHA-256 is the model's identity. 201 when new, 200 when this
/// manifest was registered before; a refused manifest records nothing.
#[utoipa::path(
    tag = "models",
    operation_id = "models_register",
    request_body = RegisterModel,
    responses(
        (status = 201, body = ModelInfo), (status = 200, body = ModelInfo, description = "already registered"),
        BadRequest, Unauthorized, Forbidden, Conflict, PayloadTooLarge, Unavailable
    )
)]
#[post("/models")]
async fn register(
    caller: Caller,
    svc: web::Data<Service>,
    body: web::Json<RegisterModel>,
) -> Result<HttpResponse, ApiError> {
    // Executors register the checkpoints their training jobs write.
    let actor = caller.require_any(&[Role::Submit, Role::Execute])?;
    let body = body.into_inner();
    let job = match (body.job, body.epoch) {
        (None, None) => None,
        (Some(job), Some(epoch)) => {
            // Only the executor holding the job's lease says a checkpoint is its.
            caller.require(Role::Execute)?;
            Some((job, epoch))
        }
        _ => {
            return Err(ApiError::InvalidBody(
                "job and epoch: give both (an executor registering its job's checkpoint) or \
                 neither"
                    .into(),
            ));
        }
    };
    let (info, created) = svc
        .register_model(caller.claimant(actor), body.manifest, body.name, job)
        .await?;
    let mut resp = if created {
        HttpResponse::Created()
    } else {
        HttpResponse::Ok()
    };
    Ok(resp.json(info))
}

/// Every registered model, with its files and the names that point at it.
#[utoipa::path(
    tag = "models",
    operation_id = "models_list",
    responses((status = 200, body = Vec<ModelInfo>), Unauthorized, Forbidden)
)]
#[get("/models")]
async fn list(caller: Caller, svc: web::Data<Service>) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let models: Vec<ModelInfo> = svc.read(|p| p.models.values().cloned().collect());
    Ok(HttpResponse::Ok().json(models))
}

/// One model, by name or manifest hash.
#[utoipa::path(
    tag = "models",
    operation_id = "models_describe",
    params(("reference" = String, Path, description = "name or manifest SHA-256")),
    responses((status = 200, body = ModelInfo), Unauthorized, Forbidden, NotFound)
)]
#[get("/models/{reference}")]
async fn describe(
    caller: Caller,
    svc: web::Data<Service>,
    reference: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    Ok(HttpResponse::Ok().json(svc.model(&reference)?))
}

/// Points a model name at a registered model. Jobs pin names when submitted, so a switch
/// affects later submissions only.
#[utoipa::path(
    tag = "models",
    operation_id = "models_set_alias",
    params(("name" = String, Path)),
    request_body = AliasBody,
    responses(
        (status = 200, body = ModelInfo),
        BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge, Unavailable
    )
)]
#[put("/models/aliases/{name}")]
async fn alias(
    caller: Caller,
    svc: web::Data<Service>,
    name: web::Path<String>,
    body: web::Json<AliasBody>,
) -> Result<HttpResponse, ApiError> {
    let actor = caller.require(Role::Submit)?;
    let info = svc
        .set_model_alias(caller.claimant(actor), &name, &body.hash)
        .await?;
    Ok(HttpResponse::Ok().json(info))
}

/// Lists (`dry_run`) or deletes the stored blobs that no record refers to: not a job's spec,
/// artefact or result, a dataset, a module, a model or its files, nor anything a referenced
/// manifest lists. Blobs younger than `min_age_secs` are kept. Admin only.
#[utoipa::path(
    tag = "blobs",
    operation_id = "blobs_gc",
    request_body = GcRequest,
    responses((status = 200, body = GcReport), BadRequest, Unauthorized, Forbidden, Unavailable)
)]
#[post("/admin/blobs/gc")]
async fn gc(
    caller: Caller,
    svc: web::Data<Service>,
    body: web::Json<GcRequest>,
) -> Result<HttpResponse, ApiError> {
    let actor = caller.require(Role::Admin)?.to_owned();
    let report = svc.collect_blobs(&actor, body.into_inner()).await?;
    Ok(HttpResponse::Ok().json(report))
}
