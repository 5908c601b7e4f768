//! Large blob transfers with flat memory: resumable uploads (`/v1/uploads`) and downloads that
//! resume with HTTP `Range`, every byte streamed and hashed on the way.
//!
//! Nothing here holds a blob in memory: bodies are streamed in [`CHUNK`]-sized pieces, and the
//! client's reqwest has no overall timeout, so a transfer of tens of gigabytes is not cut off.
//! A transport error (a broken connection, a restarted server) is retried a bounded number of
//! times with backoff, continuing from the server's offset (uploads) or the bytes already
//! written (downloads). API errors are not retried: the server has said no.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};
use twin_core::BlobHash;
use twin_core::api::{BlobStored, UploadCreate, UploadStatus};

use crate::{Client, ClientError};

/// One read from a file or reader, and so one chunk of a streamed request body.
const CHUNK: usize = 1 << 20;
/// Bytes per `PATCH` of a resumable upload: a broken connection costs at most the part in flight
/// beyond what the server had made durable, and each part is a checkpoint.
const PART: u64 = 256 << 20;
/// Consecutive failed attempts (without progress in between) before a transfer gives up.
const MAX_ATTEMPTS: u32 = 6;

/// What a transfer reports to an observer (the CLI prints these on stderr).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum TransferEvent {
    /// The transfer continues earlier work: an unfinished upload session of the same blob, or a
    /// `.partial` download file, from this byte.
    Resumed { offset: u64 },
    /// A transport error; the transfer tries again from `offset` after a pause.
    Retrying {
        attempt: u32,
        offset: u64,
        error: String,
    },
}

/// Consecutive failures without progress, and the pause before the next try.
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn new() -> Self {
        Self { attempt: 0 }
    }

    /// Progress was made: the next failure starts the count afresh.
    fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Counts a failure; `Err` (the failure itself) when the attempts are spent, else waits.
    async fn fail(
        &mut self,
        error: ClientError,
        offset: u64,
        observe: &mut dyn FnMut(TransferEvent),
    ) -> Result<(), ClientError> {
        self.attempt += 1;
        if self.attempt >= MAX_ATTEMPTS {
            return Err(error);
        }
        observe(TransferEvent::Retrying {
            attempt: self.attempt,
            offset,
            error: error.to_string(),
        });
        let delay = Duration::from_millis(250 << self.attempt.min(6));
        tokio::time::sleep(delay.min(Duration::from_secs(10))).await;
        Ok(())
    }
}

/// Whether an error is worth retrying: the connection, not the server's verdict.
fn transient(e: &ClientError) -> bool {
    match e {
        ClientError::Transport { .. } => true,
        // Another PATCH of the session is still in flight (a broken one the server has not
        // noticed yet), or the request raced a restart.
        ClientError::Api { code, .. } => code == "upload_busy",
        ClientError::Protocol { .. } | ClientError::CaFile { .. } => false,
    }
}

/// Checks that a reader declared to hold `bytes` bytes has none left: a longer input is an
/// error, not silently cut.
async fn at_end<R: AsyncRead + Unpin>(reader: &mut R, bytes: u64) -> std::io::Result<()> {
    let mut probe = [0u8; 1];
    match reader.read(&mut probe).await? {
        0 => Ok(()),
        _ => Err(std::io::Error::other(format!(
            "the input is longer than the declared {bytes} bytes"
        ))),
    }
}

fn hash_of(hasher: Sha256) -> BlobHash {
    BlobHash(hasher.finalize().into())
}

/// SHA-256 and length of a file's first `limit` bytes (all of it with `u64::MAX`), streamed.
async fn hash_file(path: &Path, limit: u64) -> std::io::Result<(Sha256, u64)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let file = std::fs::File::open(&path)?;
        let mut reader = file.take(limit);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut len = 0u64;
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                return Ok((hasher, len));
            }
            hasher.update(&buf[..n]);
            len += n as u64;
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

fn local(path: &Path, what: &str, e: impl std::fmt::Display) -> ClientError {
    ClientError::Protocol {
        url: path.display().to_string(),
        message: format!("{what}: {e}"),
    }
}

/// `bytes a-b/total` → (a, total).
fn parse_content_range(value: &str) -> Option<(u64, u64)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()?))
}

/// A request body streamed from `file` (positioned where the part starts), `len` bytes in
/// [`CHUNK`]-sized pieces.
fn file_body(file: tokio::fs::File, len: u64) -> reqwest::Body {
    let reader = file.take(len);
    let stream = futures_util::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        let mut buf = BytesMut::with_capacity(CHUNK);
        match reader.read_buf(&mut buf).await {
            Ok(0) => None,
            Ok(_) => Some((Ok::<Bytes, std::io::Error>(buf.freeze()), Some(reader))),
            Err(e) => Some((Err(e), None)),
        }
    });
    reqwest::Body::wrap_stream(stream)
}

/// Where a download's bytes go: a file being resumed, or any writer.
trait Sink {
    async fn put(&mut self, chunk: &[u8]) -> std::io::Result<()>;
    /// Drops everything written (the server ignored a `Range`); false when impossible.
    async fn restart(&mut self) -> std::io::Result<bool>;
}

struct WriterSink<'a, W>(&'a mut W);

impl<W: AsyncWrite + Unpin> Sink for WriterSink<'_, W> {
    async fn put(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.0.write_all(chunk).await
    }

    async fn restart(&mut self) -> std::io::Result<bool> {
        Ok(false)
    }
}

struct FileSink(tokio::io::BufWriter<tokio::fs::File>);

impl Sink for FileSink {
    async fn put(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.0.write_all(chunk).await
    }

    async fn restart(&mut self) -> std::io::Result<bool> {
        self.0.flush().await?;
        let file = self.0.get_mut();
        file.set_len(0).await?;
        file.seek(std::io::SeekFrom::Start(0)).await?;
        Ok(true)
    }
}

impl Client {
    /// Uploads a file of any size, resumably: hashes it (streamed), returns at once if the server
    /// has the blob, else sends it through an upload session in parts, continuing from the
    /// server's offset after a transport error. An unfinished session of this caller for the same
    /// blob (an earlier, interrupted run) is continued too.
    pub async fn upload_file(&self, path: &Path) -> Result<BlobStored, ClientError> {
        self.upload_file_observed(path, &mut |_| {}).await
    }

    /// [`Client::upload_file`], reporting resumption and retries to `observe`.
    pub async fn upload_file_observed(
        &self,
        path: &Path,
        observe: &mut dyn FnMut(TransferEvent),
    ) -> Result<BlobStored, ClientError> {
        let (hasher, bytes) = hash_file(path, u64::MAX)
            .await
            .map_err(|e| local(path, "reading", e))?;
        self.upload_file_as(path, hash_of(hasher), bytes, observe)
            .await
    }

    /// [`Client::upload_file_observed`] of a file whose hash and length the caller already has
    /// (a model's files, hashed for its manifest): not read twice. The server checks the hash,
    /// so a file that changed since is refused, not stored under the wrong name.
    pub async fn upload_file_as(
        &self,
        path: &Path,
        hash: BlobHash,
        bytes: u64,
        observe: &mut dyn FnMut(TransferEvent),
    ) -> Result<BlobStored, ClientError> {
        let mut backoff = Backoff::new();
        let mut status = loop {
            match self.create_upload(bytes, Some(hash)).await {
                Ok(s) => break s,
                Err(e) if transient(&e) => backoff.fail(e, 0, observe).await?,
                Err(e) => return Err(e),
            }
        };
        if status.offset > 0 && status.blob.is_none() {
            observe(TransferEvent::Resumed {
                offset: status.offset,
            });
        }
        loop {
            if let Some(blob) = status.blob.take() {
                return self.check_stored(blob, hash);
            }
            let offset = status.offset;
            let len = PART.min(bytes.saturating_sub(offset));
            let mut file = tokio::fs::File::open(path)
                .await
                .map_err(|e| local(path, "opening", e))?;
            file.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(|e| local(path, "seeking", e))?;
            match self
                .patch_upload(&status.id, offset, len, file_body(file, len))
                .await
            {
                Ok(next) => {
                    if next.offset > offset || next.blob.is_some() {
                        backoff.reset();
                    }
                    status = next;
                }
                Err(e) if e.code() == Some("upload_offset_mismatch") || transient(&e) => {
                    backoff.fail(e, offset, observe).await?;
                    status = self
                        .upload_status_retrying(&status.id, &mut backoff, observe)
                        .await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Uploads `bytes` bytes read once from `reader` (a pipe, a generator), hashing them on the
    /// way and checking the server's hash against that. **Not resumable**: the bytes cannot be
    /// read again, so a broken connection fails the upload (its session is deleted); use
    /// [`Client::upload_file`] for files.
    pub async fn upload_reader<R: AsyncRead + Unpin + Send + 'static>(
        &self,
        reader: R,
        bytes: u64,
    ) -> Result<BlobStored, ClientError> {
        let mut reader = reader;
        let status = self.create_upload(bytes, None).await?;
        if let Some(blob) = status.blob {
            // Zero bytes: stored at creation. The input must be empty too.
            at_end(&mut reader, bytes)
                .await
                .map_err(|e| local(Path::new("(input)"), "reading", e))?;
            return self.check_stored(blob, hash_of(Sha256::new()));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        // The hasher travels with the stream; the last chunk hands the digest over. It is sent
        // before the last chunk goes out: with a Content-Length, hyper stops polling the body
        // once it has that many bytes.
        let state = (reader, Sha256::new(), 0u64, Some(tx));
        let stream = futures_util::stream::unfold(Some(state), move |state| async move {
            let (mut reader, mut hasher, mut done, mut tx) = state?;
            let want = (bytes - done).min(CHUNK as u64);
            let mut buf = BytesMut::with_capacity(CHUNK);
            let read = (&mut reader).take(want).read_buf(&mut buf).await;
            match read {
                Ok(0) => Some((
                    Err(std::io::Error::other(format!(
                        "the input ended after {done} of the declared {bytes} bytes"
                    ))),
                    None,
                )),
                Ok(n) => {
                    hasher.update(&buf);
                    done += n as u64;
                    if done == bytes {
                        if let Err(e) = at_end(&mut reader, bytes).await {
                            return Some((Err(e), None));
                        }
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(hash_of(hasher.clone()));
                        }
                    }
                    Some((
                        Ok::<Bytes, std::io::Error>(buf.freeze()),
                        Some((reader, hasher, done, tx)),
                    ))
                }
                Err(e) => Some((Err(e), None)),
            }
        });
        let result = self
            .patch_upload(&status.id, 0, bytes, reqwest::Body::wrap_stream(stream))
            .await;
        let status = match result {
            Ok(s) => s,
            Err(e) => {
                // Nothing can resume it: free the server's partial file now, not in 24 h.
                let _ = self.delete_upload(&status.id).await;
                return Err(e);
            }
        };
        let expected = rx.await.map_err(|_| ClientError::Protocol {
            url: self.base.clone(),
            message: "the upload ended before the input was read to its end".into(),
        })?;
        match status.blob {
            Some(blob) => self.check_stored(blob, expected),
            None => Err(ClientError::Protocol {
                url: self.base.clone(),
                message: format!(
                    "the server holds {} of {bytes} bytes after the whole input was sent",
                    status.offset
                ),
            }),
        }
    }

    /// Downloads a blob into `dest` through `<dest>.partial` (resumed if an earlier attempt left
    /// one), continuing with `Range` after a transport error, checking the SHA-256 before the
    /// rename into place. Returns the blob's length.
    pub async fn download_to_file(&self, hash: &BlobHash, dest: &Path) -> Result<u64, ClientError> {
        self.download_to_file_observed(hash, dest, &mut |_| {})
            .await
    }

    /// [`Client::download_to_file`], reporting resumption and retries to `observe`.
    pub async fn download_to_file_observed(
        &self,
        hash: &BlobHash,
        dest: &Path,
        observe: &mut dyn FnMut(TransferEvent),
    ) -> Result<u64, ClientError> {
        let mut partial = dest.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let (hasher, offset) = match hash_file(&partial, u64::MAX).await {
            Ok(h) => h,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Sha256::new(), 0),
            Err(e) => return Err(local(&partial, "reading", e)),
        };
        if offset > 0 {
            observe(TransferEvent::Resumed { offset });
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&partial)
            .await
            .map_err(|e| local(&partial, "opening", e))?;
        let mut sink = FileSink(tokio::io::BufWriter::with_capacity(CHUNK, file));
        let result = self
            .download_into(hash, &mut sink, hasher, offset, observe)
            .await;
        let flushed = async {
            sink.0.flush().await?;
            sink.0.get_ref().sync_all().await
        }
        .await;
        match result {
            Ok(len) => {
                flushed.map_err(|e| local(&partial, "writing", e))?;
                tokio::fs::rename(&partial, dest)
                    .await
                    .map_err(|e| local(dest, "renaming the download into place", e))?;
                Ok(len)
            }
            Err(e) => {
                // A partial file that hashes wrong is useless to resume; any other is kept.
                if matches!(&e, ClientError::Protocol { message, .. } if message.contains("do not hash to"))
                {
                    let _ = tokio::fs::remove_file(&partial).await;
                }
                Err(e)
            }
        }
    }

    /// Streams a blob into `w` (a file, stdout, a hashing sink), checking its SHA-256 at the end,
    /// continuing with `Range` after a transport error. Returns the blob's length. On a hash
    /// mismatch the bytes are already written: the caller discards them.
    pub async fn download_to_writer<W: AsyncWrite + Unpin>(
        &self,
        hash: &BlobHash,
        w: &mut W,
    ) -> Result<u64, ClientError> {
        self.download_to_writer_observed(hash, w, &mut |_| {}).await
    }

    /// [`Client::download_to_writer`], reporting retries to `observe`.
    pub async fn download_to_writer_observed<W: AsyncWrite + Unpin>(
        &self,
        hash: &BlobHash,
        w: &mut W,
        observe: &mut dyn FnMut(TransferEvent),
    ) -> Result<u64, ClientError> {
        let mut sink = WriterSink(w);
        let len = self
            .download_into(hash, &mut sink, Sha256::new(), 0, observe)
            .await?;
        sink.0
            .flush()
            .await
            .map_err(|e| local(Path::new("(output)"), "writing", e))?;
        Ok(len)
    }

    /// The download loop: `offset` bytes (hashed into `hasher`) are already in `sink`.
    async fn download_into(
        &self,
        hash: &BlobHash,
        sink: &mut impl Sink,
        mut hasher: Sha256,
        mut offset: u64,
        observe: &mut dyn FnMut(TransferEvent),
    ) -> Result<u64, ClientError> {
        let path = format!("/v1/blobs/{hash}");
        let url = format!("{}{path}", self.base);
        let out = |e: std::io::Error| local(Path::new("(output)"), "writing", e);
        let mut backoff = Backoff::new();
        let mut total: Option<u64> = None;
        loop {
            if total == Some(offset) {
                break;
            }
            let mut rb = self.request(Method::GET, &path);
            if offset > 0 {
                rb = rb.header("range", format!("bytes={offset}-"));
            }
            let resp = match self.send(rb).await {
                Ok(r) => r,
                // 416: the resumed prefix is at least as long as the blob. Hash what is there.
                Err(e) if e.status() == Some(416) && offset > 0 => break,
                Err(e) if transient(&e) => {
                    backoff.fail(e, offset, observe).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match resp.status() {
                StatusCode::PARTIAL_CONTENT => {
                    let range = resp
                        .headers()
                        .get("content-range")
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_content_range);
                    match range {
                        Some((start, len)) if start == offset => total = Some(len),
                        _ => {
                            return Err(ClientError::Protocol {
                                url,
                                message: format!(
                                    "asked for bytes from {offset}, got Content-Range {range:?}"
                                ),
                            });
                        }
                    }
                }
                _ => {
                    if offset > 0 {
                        // The whole blob came instead of the rest: start over if the sink can.
                        if !sink.restart().await.map_err(out)? {
                            return Err(ClientError::Protocol {
                                url,
                                message: "the server ignored the Range of a resumed download"
                                    .into(),
                            });
                        }
                        offset = 0;
                        hasher = Sha256::new();
                    }
                    total = resp.content_length();
                }
            }
            let mut body = resp.bytes_stream();
            let before = offset;
            let mut broken = None;
            while let Some(chunk) = body.next().await {
                match chunk {
                    Ok(chunk) => {
                        sink.put(&chunk).await.map_err(out)?;
                        hasher.update(&chunk);
                        offset += chunk.len() as u64;
                    }
                    Err(source) => {
                        broken = Some(ClientError::Transport {
                            url: url.clone(),
                            source,
                        });
                        break;
                    }
                }
            }
            if offset > before {
                backoff.reset();
            }
            match (broken, total) {
                (Some(e), _) => backoff.fail(e, offset, observe).await?,
                (None, Some(t)) if offset < t => {
                    let e = ClientError::Protocol {
                        url: url.clone(),
                        message: format!("the body ended after {offset} of {t} bytes"),
                    };
                    backoff.fail(e, offset, observe).await?;
                }
                (None, _) => break,
            }
        }
        let actual = hash_of(hasher);
        if actual != *hash {
            return Err(ClientError::Protocol {
                url,
                message: format!("downloaded bytes do not hash to {hash} (got {actual})"),
            });
        }
        Ok(offset)
    }

    /// `POST /v1/uploads`.
    pub async fn create_upload(
        &self,
        bytes: u64,
        hash: Option<BlobHash>,
    ) -> Result<UploadStatus, ClientError> {
        self.json(
            self.request(Method::POST, "/v1/uploads")
                .json(&UploadCreate { bytes, hash }),
        )
        .await
    }

    /// `GET /v1/uploads/{id}`: where a session stands (its `offset` is where to continue).
    pub async fn upload_status(&self, id: &str) -> Result<UploadStatus, ClientError> {
        self.json(self.request(Method::GET, &format!("/v1/uploads/{id}")))
            .await
    }

    /// `DELETE /v1/uploads/{id}`: abandons a session and its partial file.
    pub async fn delete_upload(&self, id: &str) -> Result<(), ClientError> {
        self.send(self.request(Method::DELETE, &format!("/v1/uploads/{id}")))
            .await
            .map(drop)
    }

    /// `PATCH /v1/uploads/{id}`: `len` bytes of `body` appended at `offset`.
    async fn patch_upload(
        &self,
        id: &str,
        offset: u64,
        len: u64,
        body: reqwest::Body,
    ) -> Result<UploadStatus, ClientError> {
        self.json(
            self.request(Method::PATCH, &format!("/v1/uploads/{id}"))
                .header("content-type", "application/offset+octet-stream")
                .header("upload-offset", offset.to_string())
                .header("content-length", len.to_string())
                .body(body),
        )
        .await
    }

    /// The session's status, retrying transport errors with `backoff`.
    async fn upload_status_retrying(
        &self,
        id: &str,
        backoff: &mut Backoff,
        observe: &mut dyn FnMut(TransferEvent),
    ) -> Result<UploadStatus, ClientError> {
        loop {
            match self.upload_status(id).await {
                Ok(s) => return Ok(s),
                Err(e) if transient(&e) => backoff.fail(e, 0, observe).await?,
                Err(e) => return Err(e),
            }
        }
    }

    /// The server's answer for a finished upload, checked against the client's own hash.
    fn check_stored(
        &self,
        blob: BlobStored,
        expected: BlobHash,
    ) -> Result<BlobStored, ClientError> {
        if blob.hash == expected {
            Ok(blob)
        } else {
            Err(ClientError::Protocol {
                url: self.base.clone(),
                message: format!(
                    "the server stored the upload as {}, but the bytes sent hash to {expected}",
                    blob.hash
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_parse() {
        assert_eq!(parse_content_range("bytes 5-9/10"), Some((5, 10)));
        assert_eq!(parse_content_range("bytes */10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }
}
