//! The disk cache of compiled modules: native code, so trusted only from a private directory and
//! only after its checksums match.
//!
//! Loading an artefact (`Component::deserialize`) maps its bytes as executable code without
//! checking them, so whoever can write the cache can run code as this process. Two defences:
//! the directory must be this user's and writable by nobody else ([`ModuleCache::open`] creates it
//! 0700 and refuses one that is not), and each artefact `<module>-<engine>.cwasm` has a sidecar
//! `<module>-<engine>.cwasm.json` naming the SHA-256 of the module it was compiled from, the
//! SHA-256 of the artefact's bytes and the engine's fingerprint. An artefact is handed to wasmtime
//! only when all three match, from the same bytes that were hashed (read once, so the file cannot
//! change between the check and the load); anything else is recompiled and rewritten. The sidecar
//! is no signature: it catches truncated, swapped and stale files, while the directory's
//! ownership keeps out anyone who could forge both.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasmtime::Engine;

use crate::PluginError;

/// Where a user's module cache lives when nothing else is configured:
/// `$XDG_CACHE_HOME/twin/module-cache`, or `~/.cache/twin/module-cache`. `None` when neither
/// variable names an absolute directory; a shared temporary directory is never a fallback, since
/// anyone could create it first.
pub fn user_cache_dir() -> Option<PathBuf> {
    let absolute = |var: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    absolute("XDG_CACHE_HOME")
        .or_else(|| absolute("HOME").map(|home| home.join(".cache")))
        .map(|cache| cache.join("twin").join("module-cache"))
}

/// Hex SHA-256 of everything an engine's compiled code depends on (wasmtime's version, the
/// target, every setting that changes code): artefacts from an engine with another fingerprint
/// are never loaded.
pub(crate) fn engine_fingerprint(engine: &Engine) -> String {
    use std::hash::Hash;
    let mut hasher = Sha256Hasher(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hex::encode(hasher.0.finalize())
}

/// Feeds `Hash` output into SHA-256, so the fingerprint is the same in every process and build of
/// this code (std's `DefaultHasher` promises neither) and too long to collide by chance.
struct Sha256Hasher(Sha256);

impl std::hash::Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(&self) -> u64 {
        unreachable!("only the SHA-256 digest of the written bytes is used")
    }
}

/// The user that owns the files this process creates (its effective uid), read from a file it
/// creates in `dir` and removes: std has no `geteuid`, and the probe needs no `unsafe` and no
/// dependency. A cache this process cannot write in is no use to it anyway.
fn owner_of_new_files(dir: &Path) -> std::io::Result<u32> {
    let probe = tempfile::NamedTempFile::new_in(dir)?;
    Ok(probe.as_file().metadata()?.uid())
}

/// What an artefact claims to be, written beside it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Sidecar {
    /// SHA-256 of the module's bytes (the module's identity).
    module_sha256: String,
    /// SHA-256 of the artefact file's bytes.
    artefact_sha256: String,
    /// [`engine_fingerprint`] of the engine that compiled it.
    engine: String,
}

/// A private directory of compiled artefacts for one engine.
#[derive(Debug)]
pub(crate) struct ModuleCache {
    dir: PathBuf,
    engine: String,
}

impl ModuleCache {
    /// Creates `dir` (mode 0700, parents included) unless it exists, and refuses it unless it is
    /// a directory owned by this user that nobody else can write.
    pub fn open(dir: &Path, engine: String) -> Result<Self, PluginError> {
        let refuse = |why: String| {
            PluginError::Host(format!(
                "module cache {}: {why}; compiled modules are native code, so the cache must be \
                 a directory private to this user",
                dir.display()
            ))
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| refuse(format!("cannot create it: {e}")))?;
        // The entry itself (a symbolic link, possibly) and what it leads to must both be ours:
        // someone else's link could be pointed elsewhere after this check.
        let entry =
            std::fs::symlink_metadata(dir).map_err(|e| refuse(format!("cannot stat it: {e}")))?;
        let target = std::fs::metadata(dir).map_err(|e| refuse(format!("cannot stat it: {e}")))?;
        if !target.is_dir() {
            return Err(refuse("it is not a directory".into()));
        }
        let me = owner_of_new_files(dir).map_err(|e| {
            refuse(format!(
                "cannot create a file in it (owner uid {}): {e}",
                target.uid()
            ))
        })?;
        for meta in [&entry, &target] {
            if meta.uid() != me {
                return Err(refuse(format!(
                    "it is owned by uid {}, not by this user (uid {me})",
                    meta.uid()
                )));
            }
        }
        let mode = target.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(refuse(format!(
                "it is writable by group or others (mode {mode:03o}); run `chmod 700 {}`",
                dir.display()
            )));
        }
        Ok(Self {
            dir: dir.to_owned(),
            engine,
        })
    }

    fn artefact_path(&self, module_hash: &str) -> PathBuf {
        // Both parts are hex digests (the module's from `module_hash`), so the name stays inside
        // the directory.
        self.dir
            .join(format!("{module_hash}-{}.cwasm", &self.engine[..16]))
    }

    fn sidecar_path(&self, module_hash: &str) -> PathBuf {
        let mut path = self.artefact_path(module_hash).into_os_string();
        path.push(".json");
        path.into()
    }

    /// The cached artefact of `module_hash`, if there is one whose sidecar vouches for these exact
    /// bytes, this module and this engine. A missing artefact is `None` quietly; a mismatching one
    /// is `None` with a warning (it will be recompiled and overwritten).
    pub fn read(&self, module_hash: &str) -> Option<Vec<u8>> {
        let path = self.artefact_path(module_hash);
        let artefact = std::fs::read(&path).ok()?;
        match self.verify(module_hash, &artefact) {
            Ok(()) => Some(artefact),
            Err(why) => {
                tracing::warn!(path = %path.display(), why, "not loading a cached module; recompiling it");
                None
            }
        }
    }

    fn verify(&self, module_hash: &str, artefact: &[u8]) -> Result<(), String> {
        let sidecar = std::fs::read(self.sidecar_path(module_hash))
            .map_err(|e| format!("no readable sidecar: {e}"))?;
        let sidecar: Sidecar =
            serde_json::from_slice(&sidecar).map_err(|e| format!("bad sidecar: {e}"))?;
        if sidecar.module_sha256 != module_hash {
            return Err(format!(
                "compiled from module {}, not this one",
                sidecar.module_sha256
            ));
        }
        if sidecar.engine != self.engine {
            return Err(format!("compiled by another engine ({})", sidecar.engine));
        }
        let actual = hex::encode(Sha256::digest(artefact));
        if sidecar.artefact_sha256 != actual {
            return Err(format!(
                "the artefact's SHA-256 is {actual}, not the {} its sidecar names",
                sidecar.artefact_sha256
            ));
        }
        Ok(())
    }

    /// Stores `artefact` as `module_hash`'s. Best effort: a failed write costs a recompilation
    /// later, nothing more. Each file is written under a temporary name and renamed into place,
    /// so a reader sees whole files; a reader that catches the artefact of one writer beside the
    /// sidecar of another finds the hashes differ and recompiles.
    pub fn write(&self, module_hash: &str, artefact: &[u8]) {
        let sidecar = Sidecar {
            module_sha256: module_hash.to_owned(),
            artefact_sha256: hex::encode(Sha256::digest(artefact)),
            engine: self.engine.clone(),
        };
        let sidecar = serde_json::to_vec(&sidecar).expect("a struct of strings serializes");
        let written = self
            .replace(&self.artefact_path(module_hash), artefact)
            .and_then(|()| self.replace(&self.sidecar_path(module_hash), &sidecar));
        if let Err(e) = written {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not cache a compiled module");
        }
    }

    fn replace(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        // `NamedTempFile` creates the file 0600 under a fresh name in the cache directory.
        let mut file = tempfile::NamedTempFile::new_in(&self.dir)?;
        file.write_all(bytes)?;
        file.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_artefact_is_read_back_only_while_its_sidecar_vouches_for_it() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("cache");
        let cache = ModuleCache::open(&dir, "e".repeat(64)).expect("a private directory");
        let module = "a".repeat(64);
        assert_eq!(cache.read(&module), None, "nothing cached yet");
        cache.write(&module, b"compiled code");
        assert_eq!(cache.read(&module).as_deref(), Some(&b"compiled code"[..]));
        assert_eq!(cache.read(&"b".repeat(64)), None, "another module");
        // An engine whose fingerprint starts the same finds the files, and its sidecar check
        // refuses them.
        let engine = format!("{}{}", "e".repeat(16), "f".repeat(48));
        let other_engine = ModuleCache::open(&dir, engine).expect("the same directory");
        assert!(other_engine.artefact_path(&module).exists());
        assert_eq!(
            other_engine.read(&module),
            None,
            "another engine's artefact"
        );
        // Bytes changed after the sidecar was written.
        std::fs::write(cache.artefact_path(&module), b"planted code").expect("write");
        assert_eq!(cache.read(&module), None, "a tampered artefact");
        // No sidecar at all.
        cache.write(&module, b"compiled code");
        std::fs::remove_file(cache.sidecar_path(&module)).expect("remove");
        assert_eq!(cache.read(&module), None, "no sidecar");
    }

    #[test]
    fn the_directory_is_created_private() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("nested").join("cache");
        ModuleCache::open(&dir, "e".repeat(64)).expect("a fresh private directory");
        let mode = std::fs::metadata(&dir).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn the_fingerprint_is_stable_and_names_the_engine() {
        let a = Engine::default();
        let mut config = wasmtime::Config::new();
        config.consume_fuel(true);
        let b = Engine::new(&config).expect("engine");
        assert_eq!(engine_fingerprint(&a), engine_fingerprint(&a.clone()));
        assert_eq!(engine_fingerprint(&a).len(), 64);
        assert_ne!(engine_fingerprint(&a), engine_fingerprint(&b));
    }
}
