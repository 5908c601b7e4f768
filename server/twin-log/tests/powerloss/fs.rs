//! A FUSE filesystem that keeps in memory whatever was not made durable, and loses it at a
//! simulated power cut.
//!
//! The model is the least a POSIX file system promises after a crash:
//!
//! - a file's contents and size become durable only when it is `fsync`ed or `fdatasync`ed (both
//!   make the whole file durable); `sync_file_range` never reaches a FUSE file system, so it
//!   counts for nothing, as it does on a real disk after a power cut;
//! - a directory's entries (names created, linked, renamed or deleted) become durable only when
//!   that directory is `fsync`ed; a file fsynced but whose name was never made durable is gone;
//! - [`Control::cut`] is the power cut: every request after it fails with `EIO`, and
//!   [`Control::write_durable_image`] writes out what survived, durable names and durable contents
//!   only, as the disk one would find after reboot.
//!
//! It does not model a cut that keeps *part* of the unsynced writes (torn or reordered
//! write-back): everything not made durable is lost, all of it.
//!
//! Every file lives in memory, twice (live and durable), so it suits a test's few tens of MB.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;

const PAGE: usize = 4096;
const TTL: Duration = Duration::from_secs(1);

struct FileData {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Pages of `live` changed since the last fsync.
    dirty: BTreeSet<usize>,
}

impl FileData {
    fn mark(&mut self, from: usize, to: usize) {
        if to > from {
            self.dirty.extend(from / PAGE..to.div_ceil(PAGE));
        }
    }

    /// Resizes the live contents; the pages between the old and the new end change.
    fn set_len(&mut self, len: usize) {
        let old = self.live.len();
        self.mark(old.min(len), old.max(len));
        self.live.resize(len, 0);
    }

    fn fsync(&mut self) {
        self.durable.resize(self.live.len(), 0);
        for page in std::mem::take(&mut self.dirty) {
            let from = page * PAGE;
            let to = (from + PAGE).min(self.live.len());
            if from < to {
                self.durable[from..to].copy_from_slice(&self.live[from..to]);
            }
        }
    }
}

struct DirData {
    /// The name this directory was created or found under (for the statistics only).
    name: OsString,
    live: BTreeMap<OsString, u64>,
    durable: BTreeMap<OsString, u64>,
}

enum Node {
    File(FileData),
    Dir(DirData),
}

/// What the workload did, counted by the file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Files created in a directory named `blobs` (sled's blob files).
    pub blob_files_created: u64,
    pub file_fsyncs: u64,
    pub dir_fsyncs: u64,
    /// At the cut: names in a `blobs` directory that were not durable.
    pub blob_names_lost: u64,
    /// At the cut: files whose contents had unsynced changes.
    pub files_with_lost_writes: u64,
}

struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    /// Open directory handles: a snapshot of the entries at `opendir`, so a listing stays
    /// consistent while the directory changes.
    listings: HashMap<u64, Vec<(u64, FileType, OsString)>>,
    next_fh: u64,
    cut: bool,
    stats: Stats,
}

impl State {
    fn add(&mut self, node: Node) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, node);
        ino
    }

    fn dir(&mut self, ino: u64) -> Result<&mut DirData, Errno> {
        match self.nodes.get_mut(&ino) {
            Some(Node::Dir(d)) => Ok(d),
            Some(Node::File(_)) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn file(&mut self, ino: u64) -> Result<&mut FileData, Errno> {
        match self.nodes.get_mut(&ino) {
            Some(Node::File(f)) => Ok(f),
            Some(Node::Dir(_)) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    /// Live names pointing at `ino` (its link count).
    fn links(&self, ino: u64) -> u32 {
        let count = self
            .nodes
            .values()
            .filter_map(|n| match n {
                Node::Dir(d) => Some(d.live.values().filter(|&&i| i == ino).count()),
                Node::File(_) => None,
            })
            .sum::<usize>();
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let (kind, size, perm, nlink) = match self.nodes.get(&ino).ok_or(Errno::ENOENT)? {
            Node::File(f) => (
                FileType::RegularFile,
                f.live.len() as u64,
                0o644,
                self.links(ino),
            ),
            Node::Dir(_) => (FileType::Directory, 0, 0o755, 2),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    fn lookup(&mut self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.dir(parent)?
            .live
            .get(name)
            .copied()
            .ok_or(Errno::ENOENT)
    }

    /// Loads a directory tree as the durable starting state (hard links stay shared).
    fn load(
        &mut self,
        path: &Path,
        ino: u64,
        seen: &mut HashMap<(u64, u64), u64>,
    ) -> io::Result<()> {
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            let key = (meta.dev(), meta.ino());
            let child = if let Some(&child) = seen.get(&key) {
                child
            } else if meta.is_dir() {
                let child = self.add(Node::Dir(DirData {
                    name: entry.file_name(),
                    live: BTreeMap::new(),
                    durable: BTreeMap::new(),
                }));
                self.load(&entry.path(), child, seen)?;
                child
            } else if meta.is_file() {
                let bytes = std::fs::read(entry.path())?;
                let child = self.add(Node::File(FileData {
                    live: bytes.clone(),
                    durable: bytes,
                    dirty: BTreeSet::new(),
                }));
                seen.insert(key, child);
                child
            } else {
                return Err(io::Error::other(format!(
                    "{}: only files and directories are supported",
                    entry.path().display()
                )));
            };
            let dir = self
                .dir(ino)
                .map_err(|e| io::Error::other(format!("{e:?}")))?;
            dir.live.insert(entry.file_name(), child);
            dir.durable.insert(entry.file_name(), child);
        }
        Ok(())
    }

    /// Writes the durable tree under `ino` into `path` (which exists and is empty).
    fn write_durable(
        &self,
        ino: u64,
        path: &Path,
        written: &mut HashMap<u64, std::path::PathBuf>,
    ) -> io::Result<()> {
        let Some(Node::Dir(dir)) = self.nodes.get(&ino) else {
            return Err(io::Error::other("not a directory"));
        };
        for (name, &child) in &dir.durable {
            let target = path.join(name);
            if let Some(first) = written.get(&child) {
                // A directory reachable twice would be a cycle; files become hard links.
                if matches!(self.nodes.get(&child), Some(Node::File(_))) {
                    std::fs::hard_link(first, &target)?;
                }
                continue;
            }
            written.insert(child, target.clone());
            match self.nodes.get(&child) {
                Some(Node::File(f)) => std::fs::write(&target, &f.durable)?,
                Some(Node::Dir(_)) => {
                    std::fs::create_dir(&target)?;
                    self.write_durable(child, &target, written)?;
                }
                None => return Err(io::Error::other("a durable name points at no inode")),
            }
        }
        Ok(())
    }
}

/// The file system handed to FUSE.
pub struct PowerCutFs {
    state: Arc<Mutex<State>>,
}

/// The test's side: the power switch, and what survived.
#[derive(Clone)]
pub struct Control {
    state: Arc<Mutex<State>>,
}

impl PowerCutFs {
    /// A file system whose durable (and live) starting state is a copy of `image`.
    pub fn load(image: &Path) -> io::Result<(Self, Control)> {
        let mut state = State {
            nodes: HashMap::new(),
            next_ino: 2,
            listings: HashMap::new(),
            next_fh: 1,
            cut: false,
            stats: Stats::default(),
        };
        state.nodes.insert(
            INodeNo::ROOT.0,
            Node::Dir(DirData {
                name: OsString::from("/"),
                live: BTreeMap::new(),
                durable: BTreeMap::new(),
            }),
        );
        state.load(image, INodeNo::ROOT.0, &mut HashMap::new())?;
        let state = Arc::new(Mutex::new(state));
        Ok((
            Self {
                state: state.clone(),
            },
            Control { state },
        ))
    }

    /// Runs `f` on the state unless the power is off.
    fn with<T>(&self, f: impl FnOnce(&mut State) -> Result<T, Errno>) -> Result<T, Errno> {
        let mut state = self.state.lock();
        if state.cut {
            return Err(Errno::EIO);
        }
        f(&mut state)
    }
}

impl Control {
    /// The power cut: from now on every request fails, and nothing more becomes durable.
    pub fn cut(&self) -> Stats {
        let mut state = self.state.lock();
        state.cut = true;
        let mut lost_names = 0;
        let mut lost_writes = 0;
        for node in state.nodes.values() {
            match node {
                Node::Dir(d) if d.name == "blobs" => {
                    lost_names += d
                        .live
                        .iter()
                        .filter(|(n, i)| d.durable.get(*n) != Some(*i))
                        .count() as u64;
                }
                Node::File(f) if !f.dirty.is_empty() || f.live.len() != f.durable.len() => {
                    lost_writes += 1;
                }
                _ => {}
            }
        }
        state.stats.blob_names_lost = lost_names;
        state.stats.files_with_lost_writes = lost_writes;
        state.stats
    }

    /// Replaces the contents of `image` with what survived the cut.
    pub fn write_durable_image(&self, image: &Path) -> io::Result<()> {
        let state = self.state.lock();
        assert!(state.cut, "the image is only defined after the power cut");
        std::fs::remove_dir_all(image)?;
        std::fs::create_dir(image)?;
        state.write_durable(INodeNo::ROOT.0, image, &mut HashMap::new())
    }
}

impl Filesystem for PowerCutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.with(|s| {
            let ino = s.lookup(parent.0, name)?;
            s.attr(ino)
        }) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.with(|s| s.attr(ino.0)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Only the size is modelled; modes and times are accepted and not kept.
        match self.with(|s| {
            if let Some(size) = size {
                let len = usize::try_from(size).map_err(|_| Errno::EFBIG)?;
                s.file(ino.0)?.set_len(len);
            }
            s.attr(ino.0)
        }) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        match self.with(|s| {
            if s.dir(parent.0)?.live.contains_key(name) {
                return Err(Errno::EEXIST);
            }
            let ino = s.add(Node::Dir(DirData {
                name: name.to_owned(),
                live: BTreeMap::new(),
                durable: BTreeMap::new(),
            }));
            s.dir(parent.0)?.live.insert(name.to_owned(), ino);
            s.attr(ino)
        }) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.with(|s| {
            let existing = s.dir(parent.0)?.live.get(name).copied();
            let ino = match existing {
                Some(_) if flags & libc::O_EXCL != 0 => return Err(Errno::EEXIST),
                Some(ino) => ino,
                None => {
                    let ino = s.add(Node::File(FileData {
                        live: Vec::new(),
                        durable: Vec::new(),
                        dirty: BTreeSet::new(),
                    }));
                    let dir = s.dir(parent.0)?;
                    dir.live.insert(name.to_owned(), ino);
                    if dir.name == "blobs" {
                        s.stats.blob_files_created += 1;
                    }
                    ino
                }
            };
            s.attr(ino)
        }) {
            Ok(attr) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.with(|s| {
            let ino = s.lookup(parent.0, name)?;
            if matches!(s.nodes.get(&ino), Some(Node::Dir(_))) {
                return Err(Errno::EISDIR);
            }
            s.dir(parent.0)?.live.remove(name);
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.with(|s| {
            let ino = s.lookup(parent.0, name)?;
            if !s.dir(ino)?.live.is_empty() {
                return Err(Errno::ENOTEMPTY);
            }
            s.dir(parent.0)?.live.remove(name);
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.with(|s| {
            if flags.contains(RenameFlags::RENAME_EXCHANGE)
                || flags.contains(RenameFlags::RENAME_WHITEOUT)
            {
                return Err(Errno::EINVAL);
            }
            let ino = s.lookup(parent.0, name)?;
            if let Some(&old) = s.dir(newparent.0)?.live.get(newname) {
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return Err(Errno::EEXIST);
                }
                if let Ok(d) = s.dir(old)
                    && !d.live.is_empty()
                {
                    return Err(Errno::ENOTEMPTY);
                }
            }
            s.dir(parent.0)?.live.remove(name);
            s.dir(newparent.0)?.live.insert(newname.to_owned(), ino);
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match self.with(|s| {
            s.file(ino.0)?;
            let dir = s.dir(newparent.0)?;
            if dir.live.contains_key(newname) {
                return Err(Errno::EEXIST);
            }
            dir.live.insert(newname.to_owned(), ino.0);
            s.attr(ino.0)
        }) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|s| s.attr(ino.0)) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.with(|s| {
            let f = s.file(ino.0)?;
            let from = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(f.live.len());
            let to = from.saturating_add(size as usize).min(f.live.len());
            Ok(f.live[from..to].to_vec())
        }) {
            Ok(bytes) => reply.data(&bytes),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.with(|s| {
            let f = s.file(ino.0)?;
            let from = usize::try_from(offset).map_err(|_| Errno::EFBIG)?;
            let to = from + data.len();
            if to > f.live.len() {
                f.set_len(to);
            }
            f.live[from..to].copy_from_slice(data);
            f.mark(from, to);
            Ok(data.len() as u32)
        }) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() makes nothing durable.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.with(|s| {
            s.file(ino.0)?.fsync();
            s.stats.file_fsyncs += 1;
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|s| {
            let entries: Vec<(OsString, u64)> = s
                .dir(ino.0)?
                .live
                .iter()
                .map(|(n, &i)| (n.clone(), i))
                .collect();
            let mut listing = vec![
                (ino.0, FileType::Directory, OsString::from(".")),
                (ino.0, FileType::Directory, OsString::from("..")),
            ];
            for (name, child) in entries {
                let kind = match s.nodes.get(&child) {
                    Some(Node::Dir(_)) => FileType::Directory,
                    _ => FileType::RegularFile,
                };
                listing.push((child, kind, name));
            }
            let fh = s.next_fh;
            s.next_fh += 1;
            s.listings.insert(fh, listing);
            Ok(fh)
        }) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let state = self.state.lock();
        let Some(listing) = state.listings.get(&fh.0) else {
            reply.error(Errno::EBADF);
            return;
        };
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in listing.iter().enumerate().skip(skip) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.state.lock().listings.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.with(|s| {
            let dir = s.dir(ino.0)?;
            dir.durable = dir.live.clone();
            s.stats.dir_fsyncs += 1;
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(
            1 << 24,
            1 << 23,
            1 << 23,
            1 << 20,
            1 << 19,
            PAGE as u32,
            255,
            PAGE as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }
}
