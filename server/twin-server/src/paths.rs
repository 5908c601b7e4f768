//! The check at submission of the paths a spec names, for a server configured with
//! `allowed_roots` (shared with its embedded executor).
//!
//! With roots configured, a spec whose `source.dir`, `source.manifest`, `data.questions` or model
//! path is not a directory or regular file under them (after canonicalizing, so `..` and
//! symlinks count where they lead; the data directory never) is refused at once with 400
//! `invalid_spec` naming the field, rather than failing later on an executor. Without roots there
//! is nothing to check against: the executor refuses the path when it runs the job, and specs
//! are meant to name uploaded blobs (`twin submit` uploads). A manifest is read here too (capped)
//! and each line's image checked the same way, so a manifest reaching out of the roots is refused
//! whole at submission; the executor checks each line again as it reads it.

use std::path::Path;

use twin_core::JobSubmission;
use twin_core::model::ModelRef;
use twin_core::spec::{IngestSource, JobSpec, SpecError};
use twin_files::{AllowedRoots, FileError};

use crate::error::ApiError;

/// The largest manifest or questions file accepted by path (as the stages cap their reads).
const MAX_LISTING_BYTES: u64 = 128 << 20;
/// The largest image a manifest line may name (as the ingest stage caps its reads).
const MAX_IMAGE_BYTES: u64 = 256 << 20;

/// What kind of thing a field names.
enum Expect {
    Directory,
    File,
}

/// Refuses a submission naming a path outside `roots`; accepts anything when there are none.
pub fn check(roots: &AllowedRoots, submission: &JobSubmission) -> Result<(), ApiError> {
    if roots.is_empty() {
        return Ok(());
    }
    let mut named: Vec<(&str, &str, Expect)> = Vec::new();
    match &submission.spec {
        JobSpec::Ingest(spec) => match &spec.source {
            IngestSource::Dir(d) => named.push(("spec.source.dir", d, Expect::Directory)),
            IngestSource::Manifest(m) => named.push(("spec.source.manifest", m, Expect::File)),
            IngestSource::Blobs(_) => {}
        },
        JobSpec::Eval(spec) => {
            if let twin_core::eval::EvalData::Questions(q) = &spec.data {
                named.push(("spec.data.questions", q, Expect::File));
            }
            if let ModelRef::Path(p) = ModelRef::parse(&spec.model) {
                named.push(("spec.model", p, Expect::Directory));
            }
        }
        JobSpec::Mine(spec) => {
            if let ModelRef::Path(p) = ModelRef::parse(&spec.model) {
                named.push(("spec.model", p, Expect::Directory));
            }
        }
        JobSpec::Train(spec) => {
            if let ModelRef::Path(p) = ModelRef::parse(&spec.model) {
                named.push(("spec.model", p, Expect::Directory));
            }
        }
        JobSpec::Score(_) | JobSpec::BuildDataset(_) => {}
    }
    for (field, path, expect) in named {
        let path = Path::new(path);
        let checked = match expect {
            Expect::Directory => roots.dir(path).map(drop),
            Expect::File => roots.check_file(path, MAX_LISTING_BYTES).map(drop),
        };
        let invalid = |message: String| {
            ApiError::InvalidSpec(SpecError::Invalid {
                field: field.to_owned(),
                message,
            })
        };
        checked.map_err(|e: FileError| invalid(e.to_string()))?;
        if field == "spec.source.manifest" {
            check_manifest_lines(roots, path).map_err(invalid)?;
        }
    }
    Ok(())
}

/// Every line of a manifest under the roots names a regular file under them (relative paths
/// against the manifest's directory); the first that does not, by line number. Lines that are
/// not manifest lines are left to the stage, which reports them.
fn check_manifest_lines(roots: &AllowedRoots, manifest: &Path) -> Result<(), String> {
    #[derive(serde::Deserialize)]
    struct Line {
        path: String,
    }
    let text = roots
        .read_to_string(manifest, MAX_LISTING_BYTES)
        .map_err(|e| e.to_string())?;
    let resolved = roots.resolve(manifest).map_err(|e| e.to_string())?;
    let base = resolved.parent().unwrap_or(Path::new("/"));
    for (n, raw) in text.lines().enumerate() {
        let Ok(line) = serde_json::from_str::<Line>(raw) else {
            continue;
        };
        roots
            .check_file(&base.join(&line.path), MAX_IMAGE_BYTES)
            .map_err(|e| format!("line {}: {e}", n + 1))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn submission(spec: serde_json::Value) -> JobSubmission {
        JobSubmission::from_json(serde_json::json!({ "spec": spec })).unwrap()
    }

    /// `Ok` or the refused field.
    fn check_spec(roots: &AllowedRoots, spec: serde_json::Value) -> Result<(), String> {
        check(roots, &submission(spec)).map_err(|e| match e {
            ApiError::InvalidSpec(e) => e.field().to_owned(),
            other => panic!("not invalid_spec: {other:?}"),
        })
    }

    #[test]
    fn paths_outside_the_roots_are_refused_at_submission_naming_the_field() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let data = root.join("data");
        std::fs::create_dir_all(root.join("imgs")).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(root.join("m.jsonl"), b"").unwrap();
        std::fs::write(root.join("imgs/a.png"), b"png").unwrap();
        let lines = |paths: &[&str]| {
            paths
                .iter()
                .map(|p| {
                    serde_json::json!({"path": p, "instance": "i", "category": "c"}).to_string()
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        std::fs::write(root.join("good.jsonl"), lines(&["imgs/a.png"])).unwrap();
        std::fs::write(
            root.join("reaching.jsonl"),
            lines(&["imgs/a.png", "/etc/hostname"]),
        )
        .unwrap();
        std::fs::write(root.join("dotdot.jsonl"), lines(&["../../outside.png"])).unwrap();
        std::fs::write(data.join("blob"), b"").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
        let roots = AllowedRoots::new([&root]).unwrap().deny(&data);
        let ingest = |source: serde_json::Value| serde_json::json!({"kind": "ingest", "dataset": "d", "source": source});
        let dir = |p: &Path| ingest(serde_json::json!({"dir": p}));
        let manifest = |p: &Path| ingest(serde_json::json!({"manifest": p}));
        assert_eq!(check_spec(&roots, dir(&root.join("imgs"))), Ok(()));
        assert_eq!(check_spec(&roots, manifest(&root.join("m.jsonl"))), Ok(()));
        assert_eq!(
            check_spec(&roots, manifest(&root.join("good.jsonl"))),
            Ok(())
        );
        let refused = [
            (dir(Path::new("/etc")), "spec.source.dir"),
            (dir(&root.join("etc")), "spec.source.dir"),
            (dir(&root.join("missing")), "spec.source.dir"),
            (manifest(Path::new("/dev/zero")), "spec.source.manifest"),
            (manifest(&data.join("blob")), "spec.source.manifest"),
            (manifest(&root.join("imgs")), "spec.source.manifest"),
            (
                manifest(&root.join("reaching.jsonl")),
                "spec.source.manifest",
            ),
            (manifest(&root.join("dotdot.jsonl")), "spec.source.manifest"),
            (
                serde_json::json!({"kind": "eval", "model": "/opt/qwen",
                    "data": {"questions": root.join("m.jsonl")}}),
                "spec.model",
            ),
            (
                serde_json::json!({"kind": "eval", "model": "qwen",
                    "data": {"questions": "/etc/hostname"}}),
                "spec.data.questions",
            ),
        ];
        for (spec, field) in refused {
            assert_eq!(
                check_spec(&roots, spec.clone()),
                Err(field.into()),
                "{spec}"
            );
        }
        // No roots: nothing to check here; the executor refuses paths when it runs the job.
        assert_eq!(
            check_spec(&AllowedRoots::none(), dir(Path::new("/etc"))),
            Ok(())
        );
    }
}
