//! Commands that talk to a running server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use twin_client::{Client, JobFilter};
use twin_core::RecordedEvent;
use twin_core::api::CreateExperiment;
use twin_core::job::{Attempt, JobState, JobStatus};
use twin_core::model::ModelRef;
use twin_core::spec::{JobKind, field_pointer};

use crate::{Command, Conn, Failure};

#[derive(Args)]
pub struct SubmitArgs {
    /// Spec file (.toml or .json). Relative paths it names (source, model, questions) are
    /// resolved against its directory.
    pub file: PathBuf,
    /// Put the job in this experiment.
    #[arg(long)]
    pub experiment: Option<String>,
    /// Makes a retried submission return the original job.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Wait for the job to finish (exit 1 unless it succeeds).
    #[arg(long)]
    pub wait: bool,
    /// Send the paths the spec names as they are, for executors that read them under their
    /// `allowed_roots`, instead of uploading the files (images, manifests, question files,
    /// model directories) and naming the blobs.
    #[arg(long)]
    pub no_upload: bool,
}

#[derive(Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first.
    Ls {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        experiment: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show one job in full (JSON).
    Show { id: String },
    /// Cancel a job.
    Cancel {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Wait for a job to finish, with a progress bar; exit 1 unless it succeeds.
    Wait {
        id: String,
        /// Give up after this many seconds (exit 2).
        #[arg(long)]
        timeout: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum EventsCommand {
    /// Print events from a sequence number; with -f keep following (Server-Sent Events).
    Tail {
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Only streams starting with this (e.g. `job/`).
        #[arg(long)]
        prefix: Option<String>,
        #[arg(short = 'f', long)]
        follow: bool,
    },
}

#[derive(Subcommand)]
pub enum ExperimentsCommand {
    Ls,
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
}

/// Reads a spec file as JSON, whatever its format, and makes the paths it names on the
/// executor (`JobKind::host_path_fields`: `spec.source.dir`, `spec.model`, …) absolute against
/// the spec file's directory, so `model = "clip"` beside the spec means that `clip`, not one in
/// whatever directory the executor happens to run in.
pub fn load_spec(path: &Path) -> anyhow::Result<serde_json::Value> {
    let (mut value, base) = read_spec(path)?;
    resolve_host_paths(&mut value, &base);
    Ok(value)
}

/// A spec file as JSON, whatever its format, and the directory its relative paths are against.
pub(crate) fn read_spec(path: &Path) -> anyhow::Result<(serde_json::Value, PathBuf)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value = match path.extension().and_then(|e| e.to_str()) {
        Some("json") => serde_json::from_str(&text)
            .with_context(|| format!("parsing {} as JSON", path.display()))?,
        _ => {
            let t: toml::Value = toml::from_str(&text)
                .with_context(|| format!("parsing {} as TOML", path.display()))?;
            serde_json::to_value(t)?
        }
    };
    let base = path
        .canonicalize()
        .with_context(|| format!("resolving {}", path.display()))?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    Ok((value, base))
}

/// Makes every relative path field of the submission's kind absolute against `base`; anything
/// else (an unknown kind, a field of the wrong type) is left for the server to refuse by name.
pub(crate) fn resolve_host_paths(submission: &mut serde_json::Value, base: &Path) {
    let Some(kind) = submission
        .pointer("/spec/kind")
        .and_then(|k| k.as_str())
        .and_then(JobKind::parse)
    else {
        return;
    };
    for field in kind.host_path_fields() {
        if let Some(slot) = submission.pointer_mut(&field_pointer(field))
            && let Some(p) = slot
                .as_str()
                .filter(|p| !p.is_empty() && !p.starts_with('/'))
        {
            *slot = serde_json::Value::String(base.join(p).display().to_string());
        }
    }
    // A model field is a path only when it looks like one (`./clip`, `ckpts/qwen`); a bare word
    // names a registered model and stays as it is.
    for field in kind.model_fields() {
        if let Some(slot) = submission.pointer_mut(&field_pointer(field))
            && let Some(ModelRef::Path(p)) = slot.as_str().map(ModelRef::parse)
            && !p.starts_with('/')
        {
            *slot = serde_json::Value::String(base.join(p).display().to_string());
        }
    }
}

/// How an attempt ended, for people: `failed (out_of_memory): <message>; detail: <detail>`,
/// `released: <reason>`, `cancelled`, `ok`, or `running` while it has not ended.
pub(crate) fn attempt_outcome(a: &Attempt) -> String {
    if a.released {
        return match &a.release_reason {
            Some(reason) => format!("released: {reason}"),
            None => "released".into(),
        };
    }
    match (&a.error, a.code) {
        (Some(message), Some(code)) => {
            let detail = a
                .detail
                .as_ref()
                .map(|d| format!("; detail: {d}"))
                .unwrap_or_default();
            format!("failed ({code}): {message}{detail}")
        }
        // An attempt that ended without a failure code was cancelled; its error says so.
        (Some(message), None) => message.clone(),
        (None, _) if a.ended_at.is_some() => "ok".into(),
        (None, _) => "running".into(),
    }
}

/// One line of at most `max` characters, for a table cell.
pub(crate) fn cell(text: &str, max: usize) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= max {
        return line;
    }
    let mut cut: String = line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// The last column of `jobs ls`: the progress of a running job, else how its latest attempt
/// ended when that was not a success (so a failed or retrying job shows its failure code).
fn job_note(j: &JobState) -> String {
    if let Some(p) = &j.progress {
        return p.message.clone();
    }
    match j.attempts.last() {
        Some(a) if a.ended_at.is_some() && (a.error.is_some() || a.released) => {
            cell(&attempt_outcome(a), 120)
        }
        _ => String::new(),
    }
}

fn print_jobs(jobs: &[JobState]) {
    println!(
        "{:<26}  {:<8}  {:<10}  {:>4}  {:<12}  PROGRESS / LAST ATTEMPT",
        "ID", "KIND", "STATE", "TRY", "EXPERIMENT"
    );
    for j in jobs {
        let progress = job_note(j);
        let exp = j
            .experiment
            .as_ref()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<26}  {:<8}  {:<10}  {:>4}  {:<12}  {}",
            j.id,
            j.kind.as_str(),
            j.status.as_str(),
            j.attempts.len(),
            exp,
            progress
        );
    }
}

/// A millisecond timestamp as RFC 3339 UTC.
pub fn when(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

fn print_event(e: &RecordedEvent) {
    let data = serde_json::to_value(&e.event)
        .ok()
        .and_then(|v| v.get("data").cloned())
        .unwrap_or_default();
    println!(
        "{:>6}  {}  {:<40}  {:<24} {}  {}",
        e.seq,
        when(e.ts),
        e.stream,
        e.event.event_type(),
        e.actor,
        data
    );
}

/// The error a finished job that did not succeed is reported with, or `None` for a success.
/// A failed job names its failure code: `job <id> failed (out_of_memory): <message>`.
fn unsuccessful(job: &JobState) -> Option<String> {
    match job.status {
        JobStatus::Succeeded => None,
        JobStatus::Failed => Some(match job.attempts.last().filter(|a| a.code.is_some()) {
            Some(a) => format!("job {} {}", job.id, attempt_outcome(a)),
            None => format!("job {} failed: no error recorded", job.id),
        }),
        s => {
            let last = job
                .attempts
                .iter()
                .rev()
                .find_map(|a| a.error.as_deref())
                .unwrap_or("no error recorded");
            Some(format!("job {} {}: {last}", job.id, s.as_str()))
        }
    }
}

fn finished(job: &JobState) -> Result<(), Failure> {
    match unsuccessful(job) {
        None => Ok(()),
        Some(message) => Err(Failure {
            code: 1,
            error: anyhow!(message),
        }),
    }
}

pub(crate) async fn wait(
    client: &Client,
    id: &str,
    timeout: Option<u64>,
    json: bool,
) -> Result<(), Failure> {
    let bar = ProgressBar::new(1000);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {msg}")
            .expect("static template"),
    );
    let deadline = timeout.map(|t| tokio::time::Instant::now() + Duration::from_secs(t));
    let prefix = format!("job/{id}");
    let mut job = client.job(id).await?;
    let mut from = 1;
    while !job.status.is_terminal() {
        bar.set_prefix(job.status.as_str().to_string());
        if let Some(p) = &job.progress {
            bar.set_position((p.fraction.unwrap_or(0.0) * 1000.0) as u64);
        }
        // Progress while it runs; while it waits for a retry, why the last attempt failed.
        bar.set_message(job_note(&job));
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            bar.abandon();
            return Err(Failure {
                code: 2,
                error: anyhow!("timed out waiting for job {id} ({})", job.status.as_str()),
            });
        }
        // Long-poll the job's own events so the bar moves as soon as something happens.
        let page = client
            .events(from, Some(&prefix), Duration::from_secs(2))
            .await?;
        from = page.next;
        bar.tick();
        job = client.job(id).await?;
    }
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&job)?);
    } else {
        println!(
            "job {} {} after {} attempt(s)",
            job.id,
            job.status.as_str(),
            job.attempts.len()
        );
        if let Some(r) = &job.result {
            println!("result: {}", serde_json::to_string(r)?);
        }
    }
    finished(&job)
}

/// Submits a loaded spec file as `twin submit` does: `--experiment` and `--idempotency-key`
/// applied, the job id printed, and with `--wait` waited for.
pub(crate) async fn submit(
    client: &Client,
    mut submission: serde_json::Value,
    args: &SubmitArgs,
    json: bool,
) -> Result<(), Failure> {
    if let Some(e) = &args.experiment {
        submission
            .as_object_mut()
            .ok_or_else(|| anyhow!("the spec file must hold a table/object"))?
            .insert("experiment".into(), e.clone().into());
    }
    if !args.no_upload {
        crate::uploads::upload_host_paths(client, &mut submission).await?;
    }
    let submitted = client
        .submit(&submission, args.idempotency_key.as_deref())
        .await?;
    let job = submitted.job;
    if json {
        println!("{}", serde_json::to_string_pretty(&job)?);
    } else {
        let note = if submitted.replayed {
            " (replayed: this key was used before)"
        } else {
            ""
        };
        println!("submitted job {} ({}){note}", job.id, job.kind.as_str());
    }
    if args.wait {
        return wait(client, job.id.as_str(), None, json).await;
    }
    Ok(())
}

pub async fn run(conn: Conn, command: Command) -> Result<(), Failure> {
    let client = Client::with_ca_file(&conn.server, conn.token.clone(), conn.ca_file.as_deref())?;
    match command {
        Command::Submit(args) => {
            return submit(&client, load_spec(&args.file)?, &args, conn.json).await;
        }
        Command::Train(command) => return crate::train::run(&client, command, conn.json).await,
        Command::Modules(command) => {
            return crate::modules::online(&client, command, conn.json).await;
        }
        Command::Review(command) => {
            return crate::review::review(&client, command, conn.json).await;
        }
        Command::Dataset(command) => {
            return crate::review::dataset(&client, command, conn.json).await;
        }
        Command::Eval(command) => {
            return crate::eval::run(&client, command, conn.json).await;
        }
        Command::Blobs(command) => return crate::blobs::run(&client, command, conn.json).await,
        Command::Models(command) => return crate::models::run(&client, command, conn.json).await,
        Command::Score(args) => {
            let wait_for = args.wait;
            let submission = crate::modules::score(&client, args).await?;
            let job = client.submit(&submission, None).await?.job;
            if conn.json && !wait_for {
                println!("{}", serde_json::to_string_pretty(&job)?);
            } else if !conn.json {
                println!("submitted job {} (score)", job.id);
            }
            if wait_for {
                return wait(&client, job.id.as_str(), None, conn.json).await;
            }
        }
        Command::Jobs(JobsCommand::Ls {
            state,
            kind,
            experiment,
            limit,
        }) => {
            let jobs = client
                .jobs(&JobFilter {
                    state,
                    kind,
                    experiment,
                    limit: Some(limit),
                })
                .await?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&jobs)?)
            } else {
                print_jobs(&jobs)
            }
        }
        Command::Jobs(JobsCommand::Show { id }) => {
            println!("{}", serde_json::to_string_pretty(&client.job(&id).await?)?)
        }
        Command::Jobs(JobsCommand::Cancel { id, reason }) => {
            let job = client.cancel(&id, reason).await?;
            println!(
                "job {} is {}{}",
                job.id,
                job.status.as_str(),
                if job.cancel_requested.is_some() && !job.status.is_terminal() {
                    " (cancellation requested)"
                } else {
                    ""
                }
            );
        }
        Command::Jobs(JobsCommand::Wait { id, timeout }) => {
            return wait(&client, &id, timeout, conn.json).await;
        }
        Command::Events(EventsCommand::Tail {
            from,
            prefix,
            follow,
        }) => {
            if follow {
                let mut stream = client.event_stream(from, prefix.as_deref()).await?;
                while let Some(e) = stream.next().await {
                    let e = e?;
                    if conn.json {
                        println!("{}", serde_json::to_string(&e)?)
                    } else {
                        print_event(&e)
                    }
                }
            } else {
                let mut from = from;
                loop {
                    let page = client
                        .events(from, prefix.as_deref(), Duration::ZERO)
                        .await?;
                    for e in &page.events {
                        if conn.json {
                            println!("{}", serde_json::to_string(e)?)
                        } else {
                            print_event(e)
                        }
                    }
                    if page.next > page.last_seq || page.next == from {
                        break;
                    }
                    from = page.next;
                }
            }
        }
        Command::Experiments(ExperimentsCommand::Ls) => {
            let exps = client.experiments().await?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&exps)?);
            } else {
                for e in exps {
                    println!(
                        "{:<24} {:>4} jobs  by {}  {}",
                        e.name,
                        e.jobs.len(),
                        e.created_by,
                        e.description
                    );
                }
            }
        }
        Command::Experiments(ExperimentsCommand::Create { name, description }) => {
            let e = client
                .create_experiment(&CreateExperiment { name, description })
                .await?;
            println!("created experiment {}", e.name);
        }
        Command::Lineage {
            target,
            data_dir: None,
        } => crate::replay::print_lineage(&client.lineage(&target).await?, conn.json)?,
        Command::Replay(_)
        | Command::Log(_)
        | Command::SampleData(_)
        | Command::Import(_)
        | Command::Lineage { .. } => {
            return Err(anyhow!("not an online command").into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use twin_core::FailureCode;
    use twin_core::event::{
        Event, JobAttemptFailed, JobLeaseExpired, JobLeaseReleased, JobLeased, JobProgress,
        JobSubmitted,
    };

    #[test]
    fn every_path_a_spec_names_is_resolved_against_the_spec_file() {
        let base = Path::new("/work/specs");
        let check = |mut spec: serde_json::Value, expect: serde_json::Value| {
            resolve_host_paths(&mut spec, base);
            assert_eq!(spec, expect);
        };
        check(
            serde_json::json!({"spec": {"kind": "mine", "model": "./clip", "dataset": "d"}}),
            serde_json::json!({"spec": {"kind": "mine", "model": "/work/specs/./clip", "dataset": "d"}}),
        );
        check(
            serde_json::json!({"spec": {"kind": "eval", "model": "../qwen",
                "data": {"questions": "fgvqa/questions.jsonl"}}}),
            serde_json::json!({"spec": {"kind": "eval", "model": "/work/specs/../qwen",
                "data": {"questions": "/work/specs/fgvqa/questions.jsonl"}}}),
        );
        check(
            serde_json::json!({"spec": {"kind": "ingest", "source": {"dir": "images"}}}),
            serde_json::json!({"spec": {"kind": "ingest", "source": {"dir": "/work/specs/images"}}}),
        );
        // Absolute paths, other fields, unknown kinds and wrong types are left alone.
        for unchanged in [
            serde_json::json!({"spec": {"kind": "mine", "model": "/abs/clip", "dataset": "clip"}}),
            // A bare word is a registered model's name.
            serde_json::json!({"spec": {"kind": "mine", "model": "clip", "dataset": "d"}}),
            serde_json::json!({"spec": {"kind": "eval", "model": "/m", "data": {"built": "pairs"}}}),
            serde_json::json!({"spec": {"kind": "no-such-kind", "model": "clip"}}),
            serde_json::json!({"spec": {"kind": "mine", "model": 3}}),
        ] {
            check(unchanged.clone(), unchanged);
        }
    }

    /// A job with `max_attempts` after `events` (each applied 10 ms after the previous one).
    fn job(max_attempts: u32, events: &[Event]) -> JobState {
        let submitted = JobSubmitted {
            id: "01clitestjob0000000000one".parse().expect("valid id"),
            submission: twin_core::JobSubmission::from_json(serde_json::json!({
                "spec": {"kind": "ingest", "dataset": "d", "source": {"dir": "/d"}},
                "retry": {"max_attempts": max_attempts}
            }))
            .expect("valid submission"),
        };
        let mut j = JobState::from_submitted(&submitted, "alice", 0);
        for (i, e) in events.iter().enumerate() {
            j.apply(e, (i as i64 + 1) * 10, "executor");
        }
        j
    }

    fn leased(epoch: u64) -> Event {
        Event::JobLeased(JobLeased {
            epoch,
            executor: "gpu-1".into(),
        })
    }

    fn failed(epoch: u64, code: FailureCode, detail: Option<&str>, retry_at: Option<i64>) -> Event {
        Event::JobAttemptFailed(JobAttemptFailed {
            epoch,
            error: "CUDA out of memory; lower batch_size".into(),
            retryable: retry_at.is_some(),
            retry_at,
            code,
            detail: detail.map(str::to_owned),
        })
    }

    #[test]
    fn a_failed_job_is_reported_with_its_code_message_and_detail() {
        let j = job(
            1,
            &[
                leased(1),
                failed(1, FailureCode::OutOfMemory, Some("batch_size=64"), None),
            ],
        );
        assert_eq!(
            unsuccessful(&j).as_deref(),
            Some(
                "job 01clitestjob0000000000one failed (out_of_memory): CUDA out of memory; \
                 lower batch_size; detail: batch_size=64"
            )
        );
        let lost = job(
            1,
            &[
                leased(1),
                Event::JobLeaseExpired(JobLeaseExpired {
                    epoch: 1,
                    retry_at: None,
                }),
            ],
        );
        assert_eq!(
            unsuccessful(&lost).as_deref(),
            Some("job 01clitestjob0000000000one failed (executor_lost): lease expired")
        );
    }

    #[test]
    fn every_way_an_attempt_ends_reads_plainly() {
        let j = job(
            3,
            &[
                leased(1),
                failed(1, FailureCode::Unclassified, None, Some(0)),
                leased(2),
                Event::JobLeaseReleased(JobLeaseReleased {
                    epoch: 2,
                    reason: "executor shutting down".into(),
                }),
                leased(3),
            ],
        );
        let outcomes: Vec<String> = j.attempts.iter().map(attempt_outcome).collect();
        assert_eq!(
            outcomes,
            [
                "failed (unclassified): CUDA out of memory; lower batch_size",
                "released: executor shutting down",
                "running",
            ]
        );
    }

    #[test]
    fn jobs_ls_shows_progress_or_the_latest_attempts_failure() {
        let retrying = job(
            3,
            &[
                leased(1),
                failed(1, FailureCode::Unavailable, None, Some(0)),
            ],
        );
        assert_eq!(
            job_note(&retrying),
            "failed (unavailable): CUDA out of memory; lower batch_size"
        );
        let running = job(
            3,
            &[
                leased(1),
                failed(1, FailureCode::Unavailable, None, Some(0)),
                leased(2),
                Event::JobProgress(JobProgress {
                    epoch: 2,
                    message: "120/600 images".into(),
                    fraction: Some(0.2),
                    counters: Default::default(),
                }),
            ],
        );
        assert_eq!(job_note(&running), "120/600 images");
        assert_eq!(job_note(&job(3, &[])), "");
        // A long, multi-line message stays one table cell.
        assert_eq!(cell("a\nb  c", 10), "a b c");
        assert_eq!(cell(&"x".repeat(200), 5), "xxxx…");
    }
}
