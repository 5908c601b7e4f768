//! The module registry: upload (compiled and described off the request thread, in a child
//! process), list, describe, and name → hash aliases.

use actix_web::{HttpResponse, get, post, put, web};
use futures_util::StreamExt;
use serde::Deserialize;
use twin_core::api::AliasBody;
use twin_core::projection::ModuleInfo;

use crate::api::Binary;
use crate::api::responses::{
    BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, Unauthorized, Unavailable,
    Unprocessable,
};
use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::service::Service;

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(add)
        .service(list)
        .service(alias)
        .service(describe);
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct AddQuery {
    /// Registry name to point at the module once it is registered.
    name: Option<String>,
}

/// Uploads a Wasm component (`application/wasm`). The server compiles it in a child process
/// (size- and time-limited), asks it to `describe` itself, stores it and logs its registration.
/// 201 when new, 200 when these bytes were registered before; a refused module records nothing.
#[utoipa::path(
    tag = "modules",
    operation_id = "modules_add",
    params(AddQuery),
    request_body(content = inline(Binary), content_type = "application/wasm"),
    responses(
        (status = 201, body = ModuleInfo), (status = 200, body = ModuleInfo, description = "already registered"),
        BadRequest, Unauthorized, Forbidden, Conflict, PayloadTooLarge, Unprocessable, Unavailable
    )
)]
#[post("/modules")]
async fn add(
    caller: Caller,
    svc: web::Data<Service>,
    query: web::Query<AddQuery>,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let actor = caller.require(Role::Submit)?;
    let limit = svc.plugins.config().max_module_bytes;
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::InvalidBody(format!("body: {e}")))?;
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(ApiError::Module(twin_plugins::PluginError::TooLarge {
                size: (body.len() + chunk.len()) as u64,
                limit,
            }));
        }
        body.extend_from_slice(&chunk);
    }
    let (info, created) = svc
        .add_module(
            caller.claimant(actor),
            body.freeze(),
            query.into_inner().name,
        )
        .await?;
    let mut resp = if created {
        HttpResponse::Created()
    } else {
        HttpResponse::Ok()
    };
    Ok(resp.json(info))
}

/// Every registered module, with the names that point at it.
#[utoipa::path(
    tag = "modules",
    operation_id = "modules_list",
    responses((status = 200, body = Vec<ModuleInfo>), Unauthorized, Forbidden)
)]
#[get("/modules")]
async fn list(caller: Caller, svc: web::Data<Service>) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let modules: Vec<ModuleInfo> = svc.read(|p| p.modules.values().cloned().collect());
    Ok(HttpResponse::Ok().json(modules))
}

/// One module, by registry name or hash.
#[utoipa::path(
    tag = "modules",
    operation_id = "modules_describe",
    params(("reference" = String, Path, description = "name or SHA-256")),
    responses((status = 200, body = ModuleInfo), Unauthorized, Forbidden, NotFound)
)]
#[get("/modules/{reference}")]
async fn describe(
    caller: Caller,
    svc: web::Data<Service>,
    reference: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    Ok(HttpResponse::Ok().json(svc.module(&reference)?))
}

/// Points a registry name at a registered module. Jobs resolve names when submitted, so a
/// switch affects later submissions only.
#[utoipa::path(
    tag = "modules",
    operation_id = "modules_set_alias",
    params(("name" = String, Path)),
    request_body = AliasBody,
    responses(
        (status = 200, body = ModuleInfo),
        BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge, Unavailable
    )
)]
#[put("/modules/aliases/{name}")]
async fn alias(
    caller: Caller,
    svc: web::Data<Service>,
    name: web::Path<String>,
    body: web::Json<AliasBody>,
) -> Result<HttpResponse, ApiError> {
    let actor = caller.require(Role::Submit)?;
    let info = svc
        .set_module_alias(caller.claimant(actor), &name, &body.hash)
        .await?;
    Ok(HttpResponse::Ok().json(info))
}
