//! Blobs: content-addressed upload (checked against the hash in the path) and download, which
//! answers `Range` so a broken download resumes. Resumable uploads are in `uploads.rs`.

use std::path::Path;

use actix_web::{HttpRequest, HttpResponse, get, head, put, web};
use futures_util::StreamExt;
use twin_core::BlobHash;
use twin_core::api::BlobStored;

use crate::api::responses::{
    BadRequest, Forbidden, NotFound, PayloadTooLarge, RangeNotSatisfiable, Unauthorized,
    Unavailable,
};
use crate::api::{Binary, Limits};
use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::service::Service;

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(upload).service(download).service(exists);
}

/// While receiving a body, free space is checked again after this many bytes (another writer
/// may be filling the disk meanwhile).
pub(super) const SPACE_CHECK_BYTES: u64 = 64 << 20;

/// Refuses (503 `storage_unavailable`) when writing `need` more bytes under `root` would leave
/// less than `reserve` free.
pub(super) fn ensure_space(root: &Path, need: u64, reserve: u64) -> Result<(), ApiError> {
    let free = fs2::available_space(root).map_err(|e| ApiError::internal("statvfs", e))?;
    if free < need.saturating_add(reserve) {
        tracing::warn!(
            free,
            need,
            reserve,
            "refusing a blob upload: not enough free space"
        );
        return Err(ApiError::NoSpace(format!(
            "not enough free space: {need} more bytes and the {reserve}-byte reserve the server \
             keeps for its log do not fit in {free} free bytes; retry later"
        )));
    }
    Ok(())
}

/// The body length the client declared, if any.
pub(super) fn content_length(req: &HttpRequest) -> Option<u64> {
    req.headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn parse_hash(h: &str) -> Result<BlobHash, ApiError> {
    h.parse().map_err(|_| ApiError::InvalidId {
        what: "blob hash",
        value: h.chars().take(80).collect(),
    })
}

/// Uploads a blob; the body must hash to `{hash}` (SHA-256, lower-case hex).
///
/// The body is streamed to disk. It is refused with 413 over `max_blob_bytes` and with 503
/// `storage_unavailable` when it would leave less free space than `storage_reserve_bytes`, or
/// the disk fills while it arrives (nothing is kept). For large blobs, or over links that
/// break, use the resumable `/v1/uploads`.
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
    req: HttpRequest,
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
    let declared = content_length(&req);
    if declared.is_some_and(|n| n > limits.max_blob_bytes) {
        return Err(ApiError::PayloadTooLarge {
            limit: limits.max_blob_bytes,
        });
    }
    let root = svc.blobs.root().to_owned();
    ensure_space(&root, declared.unwrap_or(0), limits.storage_reserve_bytes)?;
    // Dropped on any error below, the writer removes its temporary file.
    let mut writer = svc.blobs.writer(limits.max_blob_bytes)?;
    let mut unchecked = 0u64;
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| match e {
            actix_web::error::PayloadError::Overflow => ApiError::PayloadTooLarge {
                limit: limits.max_blob_bytes,
            },
            other => ApiError::InvalidBody(format!("body: {other}")),
        })?;
        writer.write(&chunk)?;
        unchecked += chunk.len() as u64;
        if unchecked >= SPACE_CHECK_BYTES {
            unchecked = 0;
            ensure_space(&root, 0, limits.storage_reserve_bytes)?;
        }
    }
    let (hash, bytes) = web::block(move || writer.finish(Some(expected)))
        .await
        .map_err(|e| ApiError::internal("blob upload", e))??;
    Ok(HttpResponse::Created().json(BlobStored { hash, bytes }))
}

/// Downloads a blob, streamed. `Accept-Ranges: bytes`: with `Range: bytes=N-` (or `N-M`, or a
/// suffix `-N`) it answers 206 with that part and `Content-Range`, so a broken download resumes
/// where it stopped; a range starting past the end is 416. A multi-range or malformed `Range`
/// is ignored (the whole blob, 200), as RFC 9110 allows.
#[utoipa::path(
    tag = "blobs",
    operation_id = "blobs_download",
    params(
        ("hash" = twin_core::BlobHash, Path),
        ("Range" = Option<String>, Header, description = "`bytes=N-`, `bytes=N-M` (inclusive) or `bytes=-N` (the last N)")
    ),
    responses(
        (status = 200, content_type = "application/octet-stream", body = inline(Binary),
            headers(("Accept-Ranges" = String, description = "`bytes`"))),
        (status = 206, content_type = "application/octet-stream", body = inline(Binary), description = "the requested range",
            headers(
                ("Content-Range" = String, description = "`bytes <first>-<last>/<length>`"),
                ("Accept-Ranges" = String, description = "`bytes`")
            )),
        BadRequest, Unauthorized, Forbidden, NotFound, RangeNotSatisfiable
    )
)]
#[get("/blobs/{hash}")]
async fn download(
    caller: Caller,
    svc: web::Data<Service>,
    hash: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    caller.require(Role::Read)?;
    let hash = parse_hash(&hash)?;
    let len = svc.blobs.len(&hash)?;
    let range = match req.headers().get(actix_web::http::header::RANGE) {
        Some(v) => parse_range(v.to_str().unwrap_or_default(), len)?,
        None => None,
    };
    let mut file = tokio::fs::File::open(svc.blobs.path(&hash))
        .await
        .map_err(|e| ApiError::internal("blob open", e))?;
    let (start, count) = match range {
        Some((first, last)) => (first, last - first + 1),
        None => (0, len),
    };
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| ApiError::internal("blob seek", e))?;
    }
    // Streamed in 256 KiB chunks: a large blob never sits whole in memory.
    let body = futures_util::stream::unfold(Some(file.take(count)), |file| async move {
        let mut file = file?;
        let mut chunk = bytes::BytesMut::with_capacity(256 * 1024);
        match file.read_buf(&mut chunk).await {
            Ok(0) => None,
            Ok(_) => Some((Ok(chunk.freeze()), Some(file))),
            Err(e) => Some((Err(actix_web::error::ErrorInternalServerError(e)), None)),
        }
    });
    let mut resp = match range {
        Some((first, last)) => {
            let mut r = HttpResponse::PartialContent();
            r.insert_header(("Content-Range", format!("bytes {first}-{last}/{len}")));
            r
        }
        None => HttpResponse::Ok(),
    };
    Ok(resp
        .content_type("application/octet-stream")
        .insert_header(("Accept-Ranges", "bytes"))
        .no_chunking(count)
        .streaming(body))
}

/// A single byte range of a `len`-byte blob as (first, last) inclusive; `None` to send it
/// whole (no usable range: another unit, several ranges, malformed).
fn parse_range(header: &str, len: u64) -> Result<Option<(u64, u64)>, ApiError> {
    let unsatisfiable = || ApiError::RangeNotSatisfiable {
        range: header.chars().take(80).collect(),
        len,
    };
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // A suffix: the last N bytes.
        let Ok(n) = last.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 || len == 0 {
            return Err(unsatisfiable());
        }
        return Ok(Some((len.saturating_sub(n), len - 1)));
    }
    let Ok(first) = first.parse::<u64>() else {
        return Ok(None);
    };
    let last = if last.is_empty() {
        u64::MAX
    } else {
        match last.parse::<u64>() {
            Ok(l) if l >= first => l,
            _ => return Ok(None),
        }
    };
    if first >= len {
        return Err(unsatisfiable());
    }
    Ok(Some((first, last.min(len - 1))))
}

/// Whether a blob is stored (its size in `X-Blob-Bytes`).
#[utoipa::path(
    tag = "blobs",
    operation_id = "blobs_exists",
    params(("hash" = twin_core::BlobHash, Path)),
    responses(
        (status = 200, description = "stored", headers(
            ("X-Blob-Bytes" = u64, description = "its size in bytes"),
            ("Accept-Ranges" = String, description = "`bytes`: downloads take `Range`")
        )),
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
        .insert_header(("Accept-Ranges", "bytes"))
        .finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_as_rfc_9110_says() {
        let ok = |h: &str| parse_range(h, 10).ok().flatten();
        assert_eq!(ok("bytes=0-"), Some((0, 9)));
        assert_eq!(ok("bytes=4-"), Some((4, 9)));
        assert_eq!(ok("bytes=4-6"), Some((4, 6)));
        assert_eq!(ok("bytes=4-100"), Some((4, 9)));
        assert_eq!(ok("bytes=-3"), Some((7, 9)));
        assert_eq!(ok("bytes=-30"), Some((0, 9)));
        // Ignored: the whole blob.
        for h in [
            "items=0-1",
            "bytes=0-1,3-4",
            "bytes=5-2",
            "bytes=x-",
            "bytes=3",
        ] {
            assert_eq!(ok(h), None, "{h}");
            assert!(parse_range(h, 10).is_ok(), "{h}");
        }
        for h in ["bytes=10-", "bytes=11-12", "bytes=-0"] {
            assert!(
                matches!(
                    parse_range(h, 10),
                    Err(ApiError::RangeNotSatisfiable { len: 10, .. })
                ),
                "{h}"
            );
        }
        assert!(parse_range("bytes=0-", 0).is_err());
    }
}
