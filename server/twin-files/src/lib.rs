//! Opening the files a job names on a machine's file system, safely: only under the configured
//! allowed roots, never under a denied directory (the server's data directory, an executor's
//! model store), only regular files, and every read capped.
//!
//! A job spec comes from whoever holds a submit token, and the server and executors read with
//! their own permissions, so a path in a spec is untrusted. [`AllowedRoots`] is the one gate:
//!
//! - **Roots.** With no roots (the default) every path is refused, with an error saying to upload
//!   the file instead (`twin submit` does) or to configure `allowed_roots`.
//! - **Symlinks and `..`.** A path is canonicalized first, and the result must lie under a root
//!   and under no denied directory, so a symlink counts where it points.
//! - **Regular files only.** The canonical path is opened with `O_NOFOLLOW` (a symlink swapped in
//!   after the check is refused, not followed) and `O_NONBLOCK` (a FIFO or a terminal opens at
//!   once instead of blocking the stage past cancellation), then `fstat`ed: anything but a
//!   regular file (`/dev/zero`, a FIFO, a socket) is refused before a byte is read.
//! - **Capped reads.** Each read names its cap; a file over it is refused, and the read itself
//!   stops one byte past the cap, so a file that grows while read cannot exhaust memory.
//! - **No oracle.** A path outside the roots, one that does not exist and one this process may
//!   not read give the same error, which never carries an `io::Error` or any of the file's
//!   bytes: job failures are visible to every read token.
//!
//! Not covered: a directory under a root that someone with write access to it swaps for a
//! symlink between the check and the open of a file below it (only the last component is opened
//! `O_NOFOLLOW`); roots are meant to be read-only data trees.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why a path a job names cannot be read. The display names the path as given (the submitter's
/// own text) and never the file's content or the operating system's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error(
        "{path}: this machine reads no paths from job specs (no allowed roots are configured); \
         upload the file instead (`twin submit` uploads what a spec names) or configure \
         `allowed_roots`"
    )]
    NoRoots { path: String },
    /// Outside the roots, under a denied directory, missing or unreadable: one error for all, so
    /// that a submitter cannot probe the file system.
    #[error("{path}: not a readable path under the allowed roots")]
    Unavailable { path: String },
    #[error("{path}: not a regular file")]
    NotRegular { path: String },
    #[error("{path}: not a directory")]
    NotDirectory { path: String },
    #[error("{path}: larger than the {max} bytes allowed")]
    TooLarge { path: String, max: u64 },
    #[error("{path}: not UTF-8 text")]
    NotText { path: String },
}

/// A root that cannot be used, at configuration time.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("allowed root {0}: must be an absolute path")]
    Relative(PathBuf),
    #[error("allowed root {path}: {source}")]
    Unusable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The directories paths from job specs may be read under, and those they never may.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedRoots {
    /// Canonical.
    roots: Vec<PathBuf>,
    /// Canonical where they exist.
    denied: Vec<PathBuf>,
}

impl AllowedRoots {
    /// No roots: every path is refused.
    pub fn none() -> Self {
        Self::default()
    }

    /// The given roots, canonicalized (each must exist and be a directory).
    pub fn new<I, P>(roots: I) -> Result<Self, RootError>
    where
        I: IntoIterator<Item = P>,
        P: AsRef<Path>,
    {
        let mut canonical = Vec::new();
        for root in roots {
            let root = root.as_ref();
            if !root.is_absolute() {
                return Err(RootError::Relative(root.to_owned()));
            }
            let c = root.canonicalize().map_err(|source| RootError::Unusable {
                path: root.to_owned(),
                source,
            })?;
            if !c.is_dir() {
                return Err(RootError::Unusable {
                    path: root.to_owned(),
                    source: std::io::Error::other("not a directory"),
                });
            }
            canonical.push(c);
        }
        Ok(Self {
            roots: canonical,
            denied: Vec::new(),
        })
    }

    /// Never allows anything under `dir`, even below a root (the data directory, whose blob
    /// files sit at predictable paths, or a model store).
    pub fn deny(mut self, dir: &Path) -> Self {
        self.denied
            .push(dir.canonicalize().unwrap_or_else(|_| dir.to_owned()));
        self
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// The canonical roots.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// The directories never allowed.
    pub fn denied(&self) -> &[PathBuf] {
        &self.denied
    }

    /// `path` canonicalized, if it exists under a root and under no denied directory.
    pub fn resolve(&self, path: &Path) -> Result<PathBuf, FileError> {
        let shown = || path.display().to_string();
        if self.roots.is_empty() {
            return Err(FileError::NoRoots { path: shown() });
        }
        let unavailable = || FileError::Unavailable { path: shown() };
        if !path.is_absolute() {
            return Err(unavailable());
        }
        let canonical = path.canonicalize().map_err(|_| unavailable())?;
        let inside = self.roots.iter().any(|r| canonical.starts_with(r))
            && !self.denied.iter().any(|d| canonical.starts_with(d));
        if inside {
            Ok(canonical)
        } else {
            Err(unavailable())
        }
    }

    /// `path` canonicalized, if it is a directory under the roots.
    pub fn dir(&self, path: &Path) -> Result<PathBuf, FileError> {
        let canonical = self.resolve(path)?;
        match std::fs::metadata(&canonical) {
            Ok(m) if m.is_dir() => Ok(canonical),
            Ok(_) => Err(FileError::NotDirectory {
                path: path.display().to_string(),
            }),
            Err(_) => Err(FileError::Unavailable {
                path: path.display().to_string(),
            }),
        }
    }

    /// Opens `path` if it is a regular file under the roots, of at most `max` bytes; the file
    /// and its size.
    pub fn open(&self, path: &Path, max: u64) -> Result<(File, u64), FileError> {
        let canonical = self.resolve(path)?;
        let shown = || path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&canonical)
            .map_err(|_| FileError::Unavailable { path: shown() })?;
        // fstat of what was opened, not a stat of the name: nothing can be swapped in between.
        let meta = file
            .metadata()
            .map_err(|_| FileError::Unavailable { path: shown() })?;
        if !meta.is_file() {
            return Err(FileError::NotRegular { path: shown() });
        }
        if meta.len() > max {
            return Err(FileError::TooLarge { path: shown(), max });
        }
        Ok((file, meta.len()))
    }

    /// Checks that `path` is a regular file under the roots of at most `max` bytes, without
    /// reading it (the server's check at submission).
    pub fn check_file(&self, path: &Path, max: u64) -> Result<PathBuf, FileError> {
        self.open(path, max)?;
        self.resolve(path)
    }

    /// The bytes of `path`, a regular file under the roots of at most `max` bytes.
    pub fn read(&self, path: &Path, max: u64) -> Result<Vec<u8>, FileError> {
        let (file, len) = self.open(path, max)?;
        let shown = || path.display().to_string();
        let mut bytes = Vec::with_capacity(len.min(max) as usize);
        // One byte past the cap tells a file that grew since the fstat from one that did not.
        file.take(max.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|_| FileError::Unavailable { path: shown() })?;
        if bytes.len() as u64 > max {
            return Err(FileError::TooLarge { path: shown(), max });
        }
        Ok(bytes)
    }

    /// [`AllowedRoots::read`] as UTF-8 text.
    pub fn read_to_string(&self, path: &Path, max: u64) -> Result<String, FileError> {
        String::from_utf8(self.read(path, max)?).map_err(|_| FileError::NotText {
            path: path.display().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    struct Tree {
        _dir: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
        roots: AllowedRoots,
    }

    /// `<tmp>/root` (allowed) holding `a.txt`, `sub/b.txt`, `data/` (denied), and `<tmp>/outside`
    /// holding `secret.txt`.
    fn tree() -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("a.txt"), b"hello").unwrap();
        std::fs::write(root.join("sub/b.txt"), b"world").unwrap();
        std::fs::write(root.join("data/blob"), b"blob").unwrap();
        std::fs::write(outside.join("secret.txt"), b"secret").unwrap();
        let roots = AllowedRoots::new([&root]).unwrap().deny(&root.join("data"));
        Tree {
            _dir: dir,
            root,
            outside,
            roots,
        }
    }

    /// Reads `path` with a 1 KiB cap; `Ok(content)` or the error's display.
    fn check(roots: &AllowedRoots, path: &Path, expect: Result<&str, &str>) {
        let got = roots.read_to_string(path, 1024).map_err(|e| e.to_string());
        match (&got, expect) {
            (Ok(text), Ok(want)) => assert_eq!(text, want),
            (Err(e), Err(want)) => assert!(e.contains(want), "{e:?} should contain {want:?}"),
            _ => panic!("{}: got {got:?}, want {expect:?}", path.display()),
        }
    }

    #[test]
    fn files_under_a_root_are_read() {
        let t = tree();
        check(&t.roots, &t.root.join("a.txt"), Ok("hello"));
        check(&t.roots, &t.root.join("sub/../sub/b.txt"), Ok("world"));
    }

    #[test]
    fn paths_outside_the_roots_missing_or_denied_get_one_error() {
        let t = tree();
        let same = "not a readable path under the allowed roots";
        check(&t.roots, &t.outside.join("secret.txt"), Err(same));
        check(&t.roots, &t.root.join("../outside/secret.txt"), Err(same));
        check(&t.roots, &t.root.join("missing.txt"), Err(same));
        check(&t.roots, &t.root.join("data/blob"), Err(same));
        check(&t.roots, Path::new("/etc/hostname"), Err(same));
        check(&t.roots, Path::new("relative.txt"), Err(same));
    }

    #[test]
    fn a_symlink_counts_where_it_points() {
        let t = tree();
        std::os::unix::fs::symlink(t.outside.join("secret.txt"), t.root.join("out.txt")).unwrap();
        std::os::unix::fs::symlink(t.root.join("a.txt"), t.root.join("in.txt")).unwrap();
        std::os::unix::fs::symlink(&t.outside, t.root.join("outdir")).unwrap();
        check(
            &t.roots,
            &t.root.join("out.txt"),
            Err("not a readable path"),
        );
        check(
            &t.roots,
            &t.root.join("outdir/secret.txt"),
            Err("not a readable path"),
        );
        check(&t.roots, &t.root.join("in.txt"), Ok("hello"));
    }

    #[test]
    fn no_roots_refuses_everything_and_says_what_to_do() {
        let t = tree();
        check(
            &AllowedRoots::none(),
            &t.root.join("a.txt"),
            Err("upload the file instead"),
        );
    }

    #[test]
    fn devices_and_fifos_are_refused_before_a_read_and_without_blocking() {
        let t = tree();
        let fifo = t.root.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let started = std::time::Instant::now();
        check(&t.roots, &fifo, Err("not a regular file"));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let dev = AllowedRoots::new(["/dev"]).unwrap();
        check(&dev, Path::new("/dev/zero"), Err("not a regular file"));
        check(&dev, Path::new("/dev/null"), Err("not a regular file"));
        check(&t.roots, &t.root.join("sub"), Err("not a regular file"));
    }

    #[test]
    fn reads_are_capped_before_reading() {
        let t = tree();
        let big = t.root.join("big");
        std::fs::write(&big, vec![b'x'; 2048]).unwrap();
        check(&t.roots, &big, Err("larger than the 1024 bytes allowed"));
        assert_eq!(t.roots.read(&big, 2048).unwrap().len(), 2048);
    }

    #[test]
    fn errors_never_carry_the_file_content_or_the_os_reason() {
        let t = tree();
        let bad = t.root.join("bad.txt");
        std::fs::write(&bad, b"\xffsecret-bytes").unwrap();
        let e = t.roots.read_to_string(&bad, 1024).unwrap_err().to_string();
        assert!(!e.contains("secret"), "{e}");
        let e = t
            .roots
            .read(&t.root.join("missing"), 10)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("No such file"), "{e}");
    }

    #[test]
    fn directories_are_checked_the_same_way() {
        let t = tree();
        assert_eq!(
            t.roots.dir(&t.root.join("sub")).unwrap(),
            t.root.join("sub").canonicalize().unwrap()
        );
        assert!(matches!(
            t.roots.dir(&t.root.join("a.txt")),
            Err(FileError::NotDirectory { .. })
        ));
        assert!(matches!(
            t.roots.dir(&t.outside),
            Err(FileError::Unavailable { .. })
        ));
        assert!(matches!(
            t.roots.dir(&t.root.join("data")),
            Err(FileError::Unavailable { .. })
        ));
        assert!(AllowedRoots::new(["relative"]).is_err());
        assert!(AllowedRoots::new(["/no/such/root"]).is_err());
    }
}
