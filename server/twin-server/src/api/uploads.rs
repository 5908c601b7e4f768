//! Resumable blob uploads (tus-like): `POST /v1/uploads` opens a session of a declared length,
//! `PATCH /v1/uploads/{id}` appends at `Upload-Offset`, `GET` tells where to continue, `DELETE`
//! abandons it. The last byte stores the blob. Sessions live in the blob store
//! (`twin_log::blob`, `blobs/uploads/`), so they survive a restart.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, delete, get, patch, post, web};
use futures_util::StreamExt;
use twin_core::api::{BlobStored, UploadCreate, UploadStatus};
use twin_log::BlobError;
use twin_log::blob::{UploadInfo, UploadWriter};

use crate::api::blobs::{SPACE_CHECK_BYTES, content_length, ensure_space};
use crate::api::responses::{
    BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, Unauthorized, Unavailable,
};
use crate::api::{Binary, Limits};
use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::service::Service;

/// A session unused this long is removed with its partial file (at start-up and whenever a
/// session is created).
pub const UPLOAD_IDLE: Duration = Duration::from_secs(24 * 3600);

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(create_upload)
        .service(append_upload)
        .service(upload_status)
        .service(delete_upload);
}

fn parse_id(id: &str) -> Result<String, ApiError> {
    if !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(id.to_owned())
    } else {
        Err(ApiError::InvalidId {
            what: "upload id",
            value: id.chars().take(80).collect(),
        })
    }
}

/// The session, if the caller may use it: its creator, or an admin.
fn owned(caller: &Caller, svc: &Service, id: &str) -> Result<UploadInfo, ApiError> {
    let info = svc.blobs.upload(id)?;
    if info.owner == caller.name || caller.require(Role::Admin).is_ok() {
        Ok(info)
    } else {
        Err(ApiError::NotUploadOwner {
            id: info.id,
            owner: info.owner,
        })
    }
}

fn status_of(info: &UploadInfo) -> UploadStatus {
    UploadStatus {
        id: info.id.clone(),
        bytes: info.bytes,
        offset: info.offset,
        blob: None,
    }
}

/// Runs a blocking blob-store call off the async workers.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, BlobError> + Send + 'static,
) -> Result<T, ApiError> {
    web::block(f)
        .await
        .map_err(|e| ApiError::internal(what, e))?
        .map_err(ApiError::from)
}

/// Makes what the writer received durable. A full disk ends the session (its partial file is
/// removed); on another failure the dropped writer keeps the last checkpoint.
async fn checkpoint(mut w: UploadWriter) -> Result<UploadWriter, ApiError> {
    blocking("upload checkpoint", move || match w.checkpoint() {
        Ok(()) => Ok(w),
        Err(e @ BlobError::NoSpace { .. }) => {
            w.abort();
            Err(e)
        }
        Err(e) => Err(e),
    })
    .await
}

/// Stores the blob once every declared byte is in.
async fn finish(w: UploadWriter) -> Result<UploadStatus, ApiError> {
    let id = w.id().to_owned();
    let (hash, bytes) = blocking("upload finish", move || w.finish()).await?;
    Ok(UploadStatus {
        id,
        bytes,
        offset: bytes,
        blob: Some(BlobStored { hash, bytes }),
    })
}

/// Starts a resumable upload of `bytes` bytes.
///
/// Refused with 413 over `max_blob_bytes`, and with 503 `storage_unavailable` when the blob
/// would leave less free space than `storage_reserve_bytes` (before anything is written). With
/// `hash`: a blob already stored is answered at once (200, `blob` set, nothing to send), and an
/// unfinished session of this caller for the same hash and length is returned (200, its
/// `offset` says where to continue), so an interrupted client resumes by asking again.
/// Otherwise 201 and a new session at offset 0. Send the bytes with `PATCH /v1/uploads/{id}`.
/// Sessions unused for 24 hours are removed.
#[utoipa::path(
    tag = "blobs",
    operation_id = "uploads_create",
    request_body = UploadCreate,
    responses(
        (status = 201, body = UploadStatus, description = "a new session"),
        (status = 200, body = UploadStatus, description = "the blob is already stored (`blob` set) or an unfinished session of the caller for it continues"),
        BadRequest, Unauthorized, Forbidden, PayloadTooLarge, Unavailable
    )
)]
#[post("/uploads")]
async fn create_upload(
    caller: Caller,
    svc: web::Data<Service>,
    limits: web::Data<Limits>,
    body: web::Json<UploadCreate>,
) -> Result<HttpResponse, ApiError> {
    let owner = caller
        .require_any(&[Role::Submit, Role::Execute])?
        .to_owned();
    let UploadCreate { bytes, hash } = body.into_inner();
    if bytes > limits.max_blob_bytes {
        return Err(ApiError::PayloadTooLarge {
            limit: limits.max_blob_bytes,
        });
    }
    if let Some(hash) = hash
        && svc.blobs.contains(&hash)
    {
        let bytes = svc.blobs.len(&hash)?;
        return Ok(HttpResponse::Ok().json(UploadStatus {
            id: String::new(),
            bytes,
            offset: bytes,
            blob: Some(BlobStored { hash, bytes }),
        }));
    }
    let store = svc.blobs.clone();
    let swept = blocking("upload sweep", move || store.sweep_uploads(UPLOAD_IDLE)).await?;
    if swept > 0 {
        tracing::info!(swept, "removed idle upload sessions");
    }
    let root = svc.blobs.root().to_owned();
    let reserve = limits.storage_reserve_bytes;
    let store = svc.blobs.clone();
    let id = ulid::Ulid::new().to_string();
    let (info, created) = blocking("upload create", move || {
        store.create_upload(&id, &owner, bytes, hash)
    })
    .await?;
    // After the look-up, since a resumed session needs room for the rest only. A new session
    // refused here holds no bytes yet; it is removed again.
    if let Err(e) = ensure_space(&root, bytes - info.offset, reserve) {
        if created {
            let _ = svc.blobs.delete_upload(&info.id);
        }
        return Err(e);
    }
    if created && bytes == 0 {
        // Nothing to send: the empty blob is stored now.
        let store = svc.blobs.clone();
        let id = info.id.clone();
        let w = blocking("upload begin", move || store.begin_upload(&id, 0)).await?;
        return Ok(HttpResponse::Created().json(finish(w).await?));
    }
    let status = status_of(&info);
    Ok(if created {
        HttpResponse::Created().json(status)
    } else {
        HttpResponse::Ok().json(status)
    })
}

/// Appends the body at `Upload-Offset`, which must be the session's offset (else 409
/// `upload_offset_mismatch`; `GET` the session for the right one).
///
/// The body (`application/offset+octet-stream` or `application/octet-stream`) is streamed to
/// disk and hashed on the way. Bytes past the declared length are refused with 413. One
/// `PATCH` at a time per session: another one meanwhile gets 409 `upload_busy`. If the
/// connection breaks, what arrived is kept and the session's offset says how much. When the
/// last byte arrives the blob is checked against the claimed hash (a mismatch is 400
/// `blob_hash_mismatch` and ends the session), made durable and stored: the answer carries
/// `blob`. Free space is checked up front and every 64 MiB (503 `storage_unavailable`, the
/// session removed if it was already receiving); a full disk also removes the session.
#[utoipa::path(
    tag = "blobs",
    operation_id = "uploads_append",
    params(
        ("id" = String, Path, description = "the session's id"),
        ("Upload-Offset" = u64, Header, description = "where this body starts: the session's current offset")
    ),
    // Documented as plain octet-stream, which client generators understand (openapi-python-client
    // skips an endpoint whose only body type is tus's `application/offset+octet-stream`);
    // both are accepted.
    request_body(content = inline(Binary), content_type = "application/octet-stream"),
    responses(
        (status = 200, body = UploadStatus, description = "the bytes are durable; `blob` is set once the last one arrived"),
        BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge, Unavailable
    )
)]
#[patch("/uploads/{id}")]
async fn append_upload(
    caller: Caller,
    svc: web::Data<Service>,
    limits: web::Data<Limits>,
    id: web::Path<String>,
    req: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    caller.require_any(&[Role::Submit, Role::Execute])?;
    let id = parse_id(&id)?;
    let content_type = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if ![
        "application/offset+octet-stream",
        "application/octet-stream",
    ]
    .contains(&essence)
    {
        return Err(ApiError::InvalidBody(
            "send the bytes as `Content-Type: application/octet-stream` (or \
             `application/offset+octet-stream`)"
                .into(),
        ));
    }
    let offset: u64 = req
        .headers()
        .get("upload-offset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            ApiError::InvalidBody("the `Upload-Offset` header (a byte offset) is required".into())
        })?;
    let info = owned(&caller, &svc, &id)?;
    if offset != info.offset {
        return Err(ApiError::UploadOffsetMismatch {
            id,
            expected: info.offset,
            got: offset,
        });
    }
    let room = info.bytes - info.offset;
    let declared = content_length(&req);
    if declared.is_some_and(|n| n > room) {
        return Err(ApiError::PayloadTooLarge { limit: room });
    }
    let root = svc.blobs.root().to_owned();
    let reserve = limits.storage_reserve_bytes;
    ensure_space(&root, declared.unwrap_or(room), reserve)?;
    let store = svc.blobs.clone();
    let session = id.clone();
    // Busy and offset are checked again under the store's lock; after a restart this rehashes
    // the partial file.
    let mut w = blocking("upload begin", move || store.begin_upload(&session, offset)).await?;
    let mut unchecked = 0u64;
    while let Some(chunk) = payload.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                // A broken connection: keep what arrived, durably, for the resume.
                let received = w.offset();
                checkpoint(w).await?;
                tracing::info!(%id, received, error = %e, "upload body ended early");
                return Err(ApiError::InvalidBody(format!(
                    "body: {e}; {received} bytes are kept"
                )));
            }
        };
        match w.write(&chunk) {
            Ok(()) => {}
            Err(BlobError::TooLarge { .. }) => {
                checkpoint(w).await?;
                return Err(ApiError::PayloadTooLarge { limit: room });
            }
            Err(e @ BlobError::NoSpace { .. }) => {
                w.abort();
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        }
        unchecked += chunk.len() as u64;
        if unchecked >= SPACE_CHECK_BYTES {
            unchecked = 0;
            if let Err(e) = ensure_space(&root, 0, reserve) {
                // Give the space back to the log: the session ends.
                w.abort();
                return Err(e);
            }
            w = checkpoint(w).await?;
        }
    }
    if w.offset() == w.bytes() {
        return Ok(HttpResponse::Ok().json(finish(w).await?));
    }
    let w = checkpoint(w).await?;
    let status = UploadStatus {
        id,
        bytes: w.bytes(),
        offset: w.offset(),
        blob: None,
    };
    drop(w);
    Ok(HttpResponse::Ok().json(status))
}

/// Where a session stands: `offset` is where the next `PATCH` starts.
#[utoipa::path(
    tag = "blobs",
    operation_id = "uploads_status",
    params(("id" = String, Path, description = "the session's id")),
    responses(
        (status = 200, body = UploadStatus),
        BadRequest, Unauthorized, Forbidden, NotFound
    )
)]
#[get("/uploads/{id}")]
async fn upload_status(
    caller: Caller,
    svc: web::Data<Service>,
    id: web::Path<String>,
) -> Result<web::Json<UploadStatus>, ApiError> {
    caller.require_any(&[Role::Submit, Role::Execute])?;
    let id = parse_id(&id)?;
    Ok(web::Json(status_of(&owned(&caller, &svc, &id)?)))
}

/// Abandons a session and removes its partial file (409 `upload_busy` while a `PATCH` runs).
#[utoipa::path(
    tag = "blobs",
    operation_id = "uploads_abort",
    params(("id" = String, Path, description = "the session's id")),
    responses(
        (status = 204, description = "removed"),
        BadRequest, Unauthorized, Forbidden, NotFound, Conflict
    )
)]
#[delete("/uploads/{id}")]
async fn delete_upload(
    caller: Caller,
    svc: web::Data<Service>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require_any(&[Role::Submit, Role::Execute])?;
    let id = parse_id(&id)?;
    owned(&caller, &svc, &id)?;
    let store = svc.blobs.clone();
    blocking("upload delete", move || store.delete_upload(&id)).await?;
    Ok(HttpResponse::NoContent().finish())
}
