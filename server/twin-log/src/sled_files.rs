//! sled's blob files, and the fsyncs and hard links that make them survive a power cut.
//!
//! sled 0.34 writes any log message over a quarter of its 512 KiB segment (a leaf holding a few
//! values of a few tens of KiB is enough) to a file of its own, `<log>/blobs/<lsn>`, and points
//! at it from its data file. It never fsyncs those files nor their directory; its `flush` ends in
//! `sync_file_range`, which makes nothing durable. So before an append is acknowledged, every blob
//! file the data file may point to must be durable, contents *and* name.
//!
//! Fsyncing `blobs/` alone cannot order this safely, because that directory changes both ways:
//!
//! - a **new** blob's name must be durable *before* the data file's fsync makes a pointer to it
//!   durable: after a power cut sled skips a pointer to a missing blob and falls back to the
//!   page's previous version, which may sit in a segment sled has already reused;
//! - a **deletion** must become durable only *after* that fsync: sled deletes a superseded blob
//!   as soon as the segment holding its replacement is written (by `sync_file_range`'s standard),
//!   and the data file's last durable state may still point at it.
//!
//! One directory fsync would make both durable at once. So this module keeps its own durable
//! record of the blobs: a hard link to each in `<log>/blob-links/`, a directory only it changes.
//! A sync (with every other sled user locked out, so no blob or pointer appears meanwhile) runs:
//!
//! 1. list `blobs/`; fsync each new file and hard-link it into `blob-links/`; fsync `blob-links/`;
//! 2. the caller fsyncs the data file;
//! 3. fsync `blobs/` (its new names, and deletions whose replacements step 2 made durable), then
//!    drop the links of the blobs sled deleted before step 1 (their replacements are durable).
//!
//! Before sled opens, [`prepare`] links back into `blobs/` any linked blob whose name a power cut
//! lost there, links what a crashed predecessor left unlinked, and fsyncs `blob-links/` (a link
//! the predecessor made may not be durable yet). A blob sled deleted just before a cut may come
//! back too: sled never reads it (nothing durable points at it), so it only costs its disk space.
//!
//! New logs get segments large enough ([`NEW_LOG_SEGMENT_SIZE`]) that records under the payload
//! cap never make a blob, so all this costs them one `readdir` per sync; it is what keeps older
//! logs (512 KiB segments) durable. `tests/powerloss` checks both under simulated power cuts.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::DirEntryExt;
use std::path::{Path, PathBuf};

/// sled's blob directory, inside the log directory.
const BLOBS: &str = "blobs";
/// This module's hard links to sled's blobs, inside the log directory (sled ignores it).
const LINKS: &str = "blob-links";

/// sled's segment size for a new log. sled writes a page to a blob file when it is over a
/// quarter of a segment; with 16 MiB (the most sled allows) that is 4 MiB, and a leaf of records
/// under the payload cap stays far below it (sled splits a leaf past 16 entries: 17 × ~97 KiB is
/// ~1.6 MiB), so a new log's appends need no blob fsyncs. The protocol above still covers any
/// page that does go to a blob (a record with a huge envelope, or an older log).
pub(crate) const NEW_LOG_SEGMENT_SIZE: usize = 16 << 20;
/// sled's default segment size, which every log created before [`NEW_LOG_SEGMENT_SIZE`] has.
const SLED_DEFAULT_SEGMENT_SIZE: usize = 512 << 10;

/// The segment size to open the log in `log_dir` with: sled fixes it when it creates the log
/// (in `conf`) and refuses another. A new log gets [`NEW_LOG_SEGMENT_SIZE`]; a log with data but
/// no readable `conf` gets sled's default, as it always did (such a log predates this rule, or
/// lost its `conf` to a cut during its first open, before it held any acknowledged record).
pub(crate) fn segment_size(log_dir: &Path) -> io::Result<usize> {
    match fs::read(log_dir.join("conf")) {
        Ok(bytes) => {
            // `conf` is sled's `key: value` lines followed by a 4-byte CRC.
            let text = String::from_utf8_lossy(&bytes[..bytes.len().saturating_sub(4)]);
            let recorded = text
                .lines()
                .find_map(|l| l.strip_prefix("segment_size: "))
                .and_then(|v| v.trim().parse().ok());
            if let Some(size) = recorded {
                return Ok(size);
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(if log_dir.join("db").exists() {
        SLED_DEFAULT_SEGMENT_SIZE
    } else {
        NEW_LOG_SEGMENT_SIZE
    })
}

/// Fsyncs a directory, so the names created, renamed or deleted in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Name → inode number of each file in a directory. The inode tells a file deleted and created
/// again under the same name from the one seen before (sled reuses names only after a crash,
/// when recovery rewinds its log sequence numbers).
fn list(dir: &Path) -> io::Result<HashMap<OsString, u64>> {
    fs::read_dir(dir)?
        .map(|e| e.map(|e| (e.file_name(), e.ino())))
        .collect()
}

/// Hard-links `file` as `link`, replacing a link left under that name (it belongs to an older
/// file of the same name: sled reuses names after a crash).
fn hard_link_replacing(file: &Path, link: &Path) -> io::Result<()> {
    match fs::hard_link(file, link) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(link)?;
            fs::hard_link(file, link)
        }
        other => other,
    }
}

fn ignore_not_found(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// What [`prepare`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Prepared {
    /// Linked blobs whose names a power cut lost, linked back into `blobs/`.
    pub(crate) restored: usize,
    /// Blobs a crashed predecessor left unlinked (maybe only in the page cache), fsynced and
    /// linked.
    pub(crate) linked: usize,
}

/// Before sled opens: links back into `blobs/` every linked blob missing there, fsyncs and links
/// every blob not linked yet, and fsyncs `blob-links/`.
///
/// This matters after a plain crash, not only after a power cut: the blobs the predecessor wrote
/// since its last sync may still be in the page cache, some linked but their links not yet
/// durable, and sled's recovery fsyncs the data file (when it zeroes the torn tail), which can
/// make a pointer to one of them durable before the first sync. So `blob-links/` is fsynced even
/// when nothing changed here: only then is every link seen durable.
pub(crate) fn prepare(log_dir: &Path) -> io::Result<Prepared> {
    let (blobs, links) = (log_dir.join(BLOBS), log_dir.join(LINKS));
    let mut done = Prepared::default();
    if !blobs.is_dir() {
        return Ok(done); // a new database: sled creates `blobs/`, the first sync the rest
    }
    if !links.is_dir() {
        fs::create_dir(&links)?;
        sync_dir(log_dir)?;
    }
    let mut present = list(&blobs)?;
    let linked = list(&links)?;
    for (name, ino) in &linked {
        if !present.contains_key(name) {
            fs::hard_link(links.join(name), blobs.join(name))?;
            present.insert(name.clone(), *ino);
            done.restored += 1;
        }
    }
    for (name, ino) in &present {
        if linked.get(name) != Some(ino) {
            File::open(blobs.join(name))?.sync_all()?;
            hard_link_replacing(&blobs.join(name), &links.join(name))?;
            done.linked += 1;
        }
    }
    sync_dir(&links)?;
    if done.restored > 0 {
        sync_dir(&blobs)?;
    }
    Ok(done)
}

/// The blob files of one open sled database that are durable, contents and name.
#[derive(Debug)]
pub(crate) struct BlobFiles {
    blobs: PathBuf,
    links: PathBuf,
    /// Name → inode of every blob fsynced and linked (durably) into `blob-links/`.
    durable: HashMap<OsString, u64>,
    /// Links were removed since `blob-links/` was last fsynced.
    links_removed: bool,
}

impl BlobFiles {
    /// After sled opened (and ran its recovery). Takes the links as the record of what is
    /// durable, so the first [`BlobFiles::sync`] fsyncs and links every blob not linked yet, and
    /// drops the links of blobs sled's recovery deleted (those past the end of the recovered
    /// log). That first sync is needed at every open, not only after a power cut: after a plain
    /// crash, blobs that never reached the disk are still in the page cache, sled recovers the
    /// pages they hold, and new acknowledged appends build on them.
    pub(crate) fn open(log_dir: &Path) -> io::Result<Self> {
        let (blobs, links) = (log_dir.join(BLOBS), log_dir.join(LINKS));
        fs::create_dir_all(&links)?;
        let durable = list(&links)?;
        Ok(Self {
            blobs,
            links,
            durable,
            links_removed: false,
        })
    }

    /// Runs `sync_data` (the fsync of sled's data file) between making every new blob durable
    /// and making sled's deletions durable, as the module doc explains. Returns how many blob
    /// files it fsynced.
    ///
    /// No sled operation may run meanwhile (the caller holds every user off): a blob created
    /// after the listing could be pointed at by the data file's fsync without being durable.
    /// With none running, every blob file listed is whole: sled writes a blob completely before
    /// it writes the pointer, and never appends to it afterwards.
    pub(crate) fn sync(&mut self, sync_data: impl FnOnce() -> io::Result<()>) -> io::Result<usize> {
        let mut present = list(&self.blobs)?;
        let gone: Vec<OsString> = self
            .durable
            .keys()
            .filter(|name| !present.contains_key(*name))
            .cloned()
            .collect();
        let new: Vec<OsString> = present
            .iter()
            .filter(|(name, ino)| self.durable.get(*name) != Some(*ino))
            .map(|(name, _)| name.clone())
            .collect();
        let mut synced = 0;
        for name in &new {
            let (file, link) = (self.blobs.join(name), self.links.join(name));
            let linked = File::open(&file)
                .and_then(|f| f.sync_all())
                .and_then(|()| hard_link_replacing(&file, &link));
            match linked {
                Ok(()) => synced += 1,
                // Deleted since the listing (by the tail of a write the flush waited for): its
                // replacement is in the data file this sync makes durable.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    present.remove(name);
                }
                Err(e) => return Err(e),
            }
        }
        if synced > 0 || self.links_removed {
            sync_dir(&self.links)?;
            self.links_removed = false;
        }
        sync_data()?;
        if !new.is_empty() || !gone.is_empty() {
            sync_dir(&self.blobs)?;
        }
        for name in &gone {
            ignore_not_found(fs::remove_file(self.links.join(name)))?;
            self.links_removed = true;
        }
        self.durable = present;
        Ok(synced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn ino(path: &Path) -> u64 {
        fs::metadata(path).map(|m| m.ino()).unwrap_or(0)
    }

    #[test]
    fn new_blobs_are_linked_before_the_data_sync_and_deleted_ones_unlinked_after() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path();
        fs::create_dir_all(log.join(BLOBS)).expect("blobs");
        fs::write(log.join(BLOBS).join("10"), b"old").expect("write");
        let mut files = BlobFiles::open(log).expect("open");
        assert_eq!(files.sync(|| Ok(())).expect("sync"), 1);
        let links = log.join(LINKS);
        assert_eq!(ino(&links.join("10")), ino(&log.join(BLOBS).join("10")));

        // sled writes a replacement blob and deletes the one it supersedes.
        fs::write(log.join(BLOBS).join("20"), b"new").expect("write");
        fs::remove_file(log.join(BLOBS).join("10")).expect("rm");
        let synced = files
            .sync(|| {
                assert!(
                    links.join("20").exists(),
                    "new blob linked before the data sync"
                );
                assert!(
                    links.join("10").exists(),
                    "deleted blob kept until the data sync"
                );
                Ok(())
            })
            .expect("sync");
        assert_eq!(synced, 1);
        assert!(
            !links.join("10").exists(),
            "link dropped after the data sync"
        );
        assert_eq!(
            files.sync(|| Ok(())).expect("sync"),
            0,
            "nothing new, nothing fsynced"
        );
    }

    #[test]
    fn a_log_keeps_the_segment_size_it_was_created_with() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path();
        assert_eq!(segment_size(log).expect("new"), NEW_LOG_SEGMENT_SIZE);
        fs::write(log.join("db"), b"").expect("db");
        assert_eq!(
            segment_size(log).expect("no conf"),
            SLED_DEFAULT_SEGMENT_SIZE
        );
        // What sled 0.34 writes (here with a dummy CRC).
        fs::write(
            log.join("conf"),
            b"segment_size: 524288\nuse_compression: false\nversion: 0.34\nCRC!",
        )
        .expect("conf");
        assert_eq!(segment_size(log).expect("conf"), 524_288);
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/log-v1/log");
        assert_eq!(segment_size(&fixture).expect("fixture"), 524_288);
    }

    #[test]
    fn prepare_links_what_a_crashed_predecessor_left_unlinked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path();
        fs::create_dir_all(log.join(BLOBS)).expect("blobs");
        fs::write(log.join(BLOBS).join("3"), b"page").expect("write");
        assert_eq!(
            prepare(log).expect("prepare"),
            Prepared {
                restored: 0,
                linked: 1
            }
        );
        assert_eq!(
            ino(&log.join(LINKS).join("3")),
            ino(&log.join(BLOBS).join("3"))
        );
        assert_eq!(
            BlobFiles::open(log)
                .expect("open")
                .sync(|| Ok(()))
                .expect("sync"),
            0
        );
    }

    #[test]
    fn prepare_brings_back_linked_blobs_a_power_cut_lost_and_a_reopen_drops_stale_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path();
        fs::create_dir_all(log.join(BLOBS)).expect("blobs");
        fs::write(log.join(BLOBS).join("7"), b"page").expect("write");
        BlobFiles::open(log)
            .expect("open")
            .sync(|| Ok(()))
            .expect("sync");
        // The cut lost the name in blobs/ (its directory was not yet fsynced).
        fs::remove_file(log.join(BLOBS).join("7")).expect("rm");
        assert_eq!(prepare(log).expect("prepare").restored, 1);
        assert_eq!(fs::read(log.join(BLOBS).join("7")).expect("read"), b"page");
        // A reopen knows the restored blob as durable: nothing to fsync.
        let mut files = BlobFiles::open(log).expect("open");
        assert_eq!(files.sync(|| Ok(())).expect("sync"), 0);
        // sled's recovery deletes a blob past the end of the recovered log: the next sync after
        // the reopen drops its link.
        fs::remove_file(log.join(BLOBS).join("7")).expect("rm");
        let mut files = BlobFiles::open(log).expect("open");
        files.sync(|| Ok(())).expect("sync");
        assert!(!log.join(LINKS).join("7").exists());
        assert_eq!(prepare(log).expect("prepare"), Prepared::default());
    }
}
