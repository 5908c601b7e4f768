//! Blob retention: which stored blobs no record refers to, and deleting them (admin only).
//!
//! "Refers to" is decided conservatively, so that a missed reference keeps a blob rather than
//! losing one: every SHA-256 written in hex anywhere in the log (any event's payload or stream,
//! whatever its type, so a new event type needs no code here) that names a stored blob is live,
//! and so is every stored blob named in hex inside a live blob that can hold references (text:
//! JSON, JSONL, CSV manifests; Arrow and Parquet files), transitively. Blobs that cannot hold
//! references are not read: model files and modules by their registration, images and weights by
//! their first bytes. Blobs younger than the request's `min_age_secs` are kept too: a model's
//! files are uploaded before the manifest that names them is registered.

use std::collections::HashSet;
use std::io::Read;
use std::time::{Duration, SystemTime};

use twin_core::BlobHash;
use twin_core::model::{GcReport, GcRequest, UnreferencedBlob};
use twin_log::{BlobStore, Log};

use crate::error::ApiError;
use crate::service::Service;

/// Records read from the log per batch.
const LOG_BATCH: usize = 4096;

impl Service {
    /// Lists (dry run) or deletes the blobs nothing refers to.
    pub async fn collect_blobs(&self, actor: &str, req: GcRequest) -> Result<GcReport, ApiError> {
        let log = self.log.clone();
        let blobs = self.blobs.clone();
        let leaves: HashSet<BlobHash> = self.read(|p| {
            p.modules
                .keys()
                .copied()
                .chain(
                    p.models
                        .values()
                        .flat_map(|m| m.model.files.iter().map(|f| f.sha256)),
                )
                .collect()
        });
        let report = tokio::task::spawn_blocking(move || collect(&log, &blobs, &leaves, &req))
            .await
            .map_err(|e| ApiError::internal("blob collection task", e))??;
        tracing::info!(
            actor,
            dry_run = report.dry_run,
            stored = report.stored,
            unreferenced = report.unreferenced.len(),
            bytes = report.unreferenced_bytes,
            "blob collection"
        );
        Ok(report)
    }
}

fn collect(
    log: &Log,
    blobs: &BlobStore,
    leaves: &HashSet<BlobHash>,
    req: &GcRequest,
) -> Result<GcReport, ApiError> {
    let mut stored = Vec::new();
    for b in blobs.list() {
        stored.push(b?);
    }
    let known: HashSet<BlobHash> = stored.iter().map(|b| b.hash).collect();

    // Roots: every stored blob the log names.
    let mut live = HashSet::new();
    let mut queue = Vec::new();
    let note = |h: BlobHash, live: &mut HashSet<BlobHash>, queue: &mut Vec<BlobHash>| {
        if known.contains(&h) && live.insert(h) {
            queue.push(h);
        }
    };
    let mut from = 1;
    loop {
        let batch = log
            .read_from(from, LOG_BATCH)
            .map_err(|e| ApiError::internal("reading the log for blob collection", e))?;
        let Some(last) = batch.last().map(|r| r.seq) else {
            break;
        };
        for r in &batch {
            let mut found = Vec::new();
            HexScanner::default().feed(r.stream.as_bytes(), &mut found);
            HexScanner::default().feed(&r.payload, &mut found);
            for h in found {
                note(h, &mut live, &mut queue);
            }
        }
        from = last + 1;
    }
    // Closure: what live manifests and tables name.
    while let Some(h) = queue.pop() {
        if leaves.contains(&h) {
            continue;
        }
        for found in references_in(blobs, &h)? {
            note(found, &mut live, &mut queue);
        }
    }

    let min_age = Duration::from_secs(req.min_age_secs);
    let now = SystemTime::now();
    let mut too_young = 0;
    let mut unreferenced = Vec::new();
    for b in &stored {
        if live.contains(&b.hash) {
            continue;
        }
        if now.duration_since(b.modified).unwrap_or_default() < min_age {
            too_young += 1;
            continue;
        }
        unreferenced.push(UnreferencedBlob {
            hash: b.hash,
            bytes: b.bytes,
        });
    }
    if !req.dry_run {
        for b in &unreferenced {
            blobs.remove(&b.hash)?;
        }
    }
    Ok(GcReport {
        dry_run: req.dry_run,
        stored: stored.len() as u64,
        referenced: live.len() as u64,
        too_young,
        unreferenced_bytes: unreferenced.iter().map(|b| b.bytes).sum(),
        unreferenced,
        deleted: !req.dry_run,
    })
}

/// The hashes written in a blob that may hold references; none for one that cannot.
fn references_in(blobs: &BlobStore, hash: &BlobHash) -> Result<Vec<BlobHash>, ApiError> {
    let mut file = blobs.open_blob(hash)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut found = Vec::new();
    let mut scanner = HexScanner::default();
    let mut first = true;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| ApiError::internal("reading a blob for collection", e))?;
        if n == 0 {
            break;
        }
        if first && !may_hold_references(&buf[..n]) {
            return Ok(Vec::new());
        }
        first = false;
        scanner.feed(&buf[..n], &mut found);
    }
    Ok(found)
}

/// Text (JSON, JSONL, CSV) and the table formats datasets are exported in can name blobs;
/// images, weights and other binary files cannot.
fn may_hold_references(head: &[u8]) -> bool {
    if head.starts_with(b"ARROW1") || head.starts_with(b"PAR1") {
        return true;
    }
    let head = &head[..head.len().min(4096)];
    match std::str::from_utf8(head) {
        Ok(_) => true,
        // A multi-byte character cut at the end of the sample is still text.
        Err(e) => e.error_len().is_none() && e.valid_up_to() + 4 > head.len(),
    }
}

/// Finds every 64-character run of lower-case hex in a byte stream fed in chunks (a run cut by
/// a chunk boundary is still found). Longer hex runs yield each of their 64-character windows:
/// the caller keeps only those that name a stored blob, so extra candidates cost nothing.
#[derive(Default)]
struct HexScanner {
    /// The hex run at the end of the previous chunk (its last 63 characters at most).
    carry: Vec<u8>,
}

impl HexScanner {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<BlobHash>) {
        let is_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        let mut run: Vec<u8> = std::mem::take(&mut self.carry);
        let emit = |run: &[u8], out: &mut Vec<BlobHash>| {
            if run.len() >= 64 {
                for w in run.windows(64) {
                    if let Ok(h) = std::str::from_utf8(w).unwrap_or("").parse::<BlobHash>() {
                        out.push(h);
                    }
                }
            }
        };
        let mut start = 0;
        while start < chunk.len() {
            let end = chunk[start..]
                .iter()
                .position(|&b| !is_hex(b))
                .map_or(chunk.len(), |p| start + p);
            run.extend_from_slice(&chunk[start..end]);
            if end == chunk.len() {
                break;
            }
            emit(&run, out);
            run.clear();
            start = end + 1;
        }
        if run.len() >= 64 {
            // Windows ending inside this chunk are found now; the next chunk needs 63 characters.
            emit(&run, out);
            run.drain(..run.len() - 63);
        }
        self.carry = run;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> Vec<BlobHash> {
        let mut s = HexScanner::default();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut out);
        }
        out.sort();
        out.dedup();
        out
    }

    #[test]
    fn hashes_are_found_across_chunk_boundaries() {
        let a = BlobHash::of(b"a");
        let b = BlobHash::of(b"b");
        let text = format!("{{\"x\":\"{a}\",\"y\":[\"{b}\"]}}");
        let mut want = vec![a, b];
        want.sort();
        for cut in 0..text.len() {
            let (l, r) = text.as_bytes().split_at(cut);
            assert_eq!(scan(&[l, r]), want, "cut at {cut}");
        }
        // Upper case, short runs and runs with a non-hex letter are not hashes.
        assert!(scan(&[a.to_hex().to_uppercase().as_bytes()]).is_empty());
        assert!(scan(&[&a.to_hex().as_bytes()[..63]]).is_empty());
        // A hash at the very end of the stream, with nothing after it.
        assert_eq!(scan(&[b"x ", a.to_hex().as_bytes()]), vec![a]);
    }

    #[test]
    fn binary_blobs_are_not_read() {
        assert!(may_hold_references(b"{\"a\": 1}\n"));
        assert!(may_hold_references(b"ARROW1\0\0"));
        assert!(!may_hold_references(b"\x89PNG\r\n\x1a\n\0\0"));
        assert!(!may_hold_references(&[0xff, 0xd8, 0xff, 0xe0]));
        // "é" cut in half at the end of the sample.
        let mut text = vec![b'x'; 4095];
        text.push(0xc3);
        assert!(may_hold_references(&text));
    }
}
