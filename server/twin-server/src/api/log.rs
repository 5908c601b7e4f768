//! The log's chain head, for anchoring offline audits.

use actix_web::{get, web};
use twin_core::api::LogHead;
use twin_log::ChainError;

use crate::api::responses::{Forbidden, Unauthorized, Unavailable};
use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::service::Service;

/// Routes under `/v1`.
pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(log_head);
}

/// The last durable record's sequence number and hash: write it down, then
/// `twin replay --expect-head <anchor>` proves the log still holds it.
#[utoipa::path(
    tag = "audit",
    operation_id = "audit_log_head",
    responses((status = 200, body = LogHead), Unauthorized, Forbidden, Unavailable)
)]
#[get("/log/head")]
async fn log_head(caller: Caller, svc: web::Data<Service>) -> Result<web::Json<LogHead>, ApiError> {
    caller.require(Role::Read)?;
    let head = svc.log.head().map_err(|e| match e {
        // The log is recovering from a write error (see twin-log's writer).
        ChainError::Storage { .. } => ApiError::StorageUnavailable,
        e => ApiError::internal("reading the log's head", e),
    })?;
    Ok(web::Json(to_body(head)))
}

fn to_body(head: twin_log::Head) -> LogHead {
    let hash = hex::encode(head.hash);
    LogHead {
        seq: head.seq,
        anchor: format!("{}:{hash}", head.seq),
        hash,
    }
}
