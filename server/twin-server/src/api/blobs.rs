//! Blobs: content-addressed upload (checked against the hash in the path) and download.

use actix_web::{HttpResponse, get, head, put, web};
use futures_util::StreamExt;
use twin_core::BlobHash;
use twin_core::api::BlobStored;

use crate::api::responses::{
    BadRequest, Forbidden, NotFound, PayloadTooLarge, Unauthorized, Unavailable,
};
use crate::api::{Binary, Limits};
use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::service::Service;

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(upload).service(download).service(exists);
}

fn parse_hash(h: &str) -> Result<BlobHash, ApiError> {
    h.parse().map_err(|_| ApiError::InvalidId {
        what: "blob hash",
        value: h.chars().take(80).collect(),
    })
}

/// Uploads a blob; the body must hash to `{hash}` (SHA-256, lower-case hex).
#[utoipa::path(
    tag = "blobs",
    operation_id = "blobs_upload",
    params(("hash" = twin_core::BlobHash, Path)),
    request_body(content = inline(Binary), content_type = "application/octet-stream"),
    responses(
        (status = 201, body = BlobStored), (status = 200, body = BlobStored, description = "already stored"),
        BadRequest, Unauthorized, Forbidden, PayloadTooLarge, Unavailable
    )
)]
#[put("/blobs/{hash}")]
async fn upload(
    caller: Caller,
    svc: web::Data<Service>,
    limits: web::Data<Limits>,
    hash: web::Path<String>,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    caller.require_any(&[Role::Submit, Role::Execute])?;
    let expected = parse_hash(&hash)?;
    if svc.blobs.contains(&expected) {
        // Drain nothing: the bytes are known. Answer without reading the body.
        let bytes = svc.blobs.len(&expected)?;
        return Ok(HttpResponse::Ok().json(BlobStored {
            hash: expected,
            bytes,
        }));
    }
    let mut writer = svc.blobs.writer(limits.max_blob_bytes)?;
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| match e {
            actix_web::error::PayloadError::Overflow => ApiError::PayloadTooLarge {
                limit: limits.max_blob_bytes,
            },
            other => ApiError::InvalidBody(format!("body: {other}")),
        })?;
        writer.write(&chunk)?;
    }
    let (hash, bytes) = web::block(move || writer.finish(Some(expected)))
        .await
        .map_err(|e| ApiError::internal("blob upload", e))??;
    Ok(HttpResponse::Created().json(BlobStored { hash, bytes }))
}

/// Downloads a blob.
#[utoipa::path(
    tag = "blobs",
    operation_id = "blobs_download",
    params(("hash" = twin_core::BlobHash, Path)),
    responses(
        (status = 200, content_type = "application/octet-stream", body = inline(Binary)),
        BadRequest, Unauthorized, Forbidden, NotFound
    )
)]
#[get("/blobs/{hash}")]
async fn download(
    caller: Caller,
    svc: web::Data<Service>,
    hash: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let hash = parse_hash(&hash)?;
    let len = svc.blobs.len(&hash)?;
    let file = tokio::fs::File::open(svc.blobs.path(&hash))
        .await
        .map_err(|e| ApiError::internal("blob open", e))?;
    // Streamed in 64 KiB chunks: a large artefact never sits whole in memory.
    let body = futures_util::stream::unfold(Some(file), |file| async move {
        use tokio::io::AsyncReadExt;
        let mut file = file?;
        let mut chunk = vec![0u8; 64 * 1024];
        match file.read(&mut chunk).await {
            Ok(0) => None,
            Ok(n) => {
                chunk.truncate(n);
                Some((Ok(bytes::Bytes::from(chunk)), Some(file)))
            }
            Err(e) => Some((Err(actix_web::error::ErrorInternalServerError(e)), None)),
        }
    });
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .no_chunking(len)
        .streaming(body))
}

/// Whether a blob is stored (its size in `X-Blob-Bytes`).
#[utoipa::path(
    tag = "blobs",
    operation_id = "blobs_exists",
    params(("hash" = twin_core::BlobHash, Path)),
    responses(
        (status = 200, description = "stored", headers(("X-Blob-Bytes" = u64, description = "its size in bytes"))),
        BadRequest, Unauthorized, Forbidden, NotFound
    )
)]
#[head("/blobs/{hash}")]
async fn exists(
    caller: Caller,
    svc: web::Data<Service>,
    hash: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let len = svc.blobs.len(&parse_hash(&hash)?)?;
    Ok(HttpResponse::Ok()
        .insert_header(("X-Blob-Bytes", len.to_string()))
        .finish())
}
