//! The context a stage runs in: server calls, cancellation, and phases that end in artefacts.
//!
//! A stage declares its phases and their shares of the work with [`StageContext::plan`], then
//! runs each through [`StageContext::phase`]. A phase whose artefact an earlier attempt of the
//! job recorded is not run again: its artefact is downloaded and decoded. Otherwise the phase
//! runs, and its result is uploaded and recorded under the phase's name. Inside a phase,
//! [`Phase::progress`] reports `done` of `total` and the context turns it into the job's overall
//! fraction from the plan's weights, so no stage writes fractions by hand; a long phase saves
//! what it has so far with [`Phase::checkpoint`] when [`Phase::checkpoint_due`] says so, and an
//! attempt that starts the phase again picks it up with [`Phase::partial`].
//!
//! Once a phase has run in an attempt, later phases run too, even where an earlier attempt left
//! their artefacts: those were made from what the re-run phase has just replaced.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use twin_client::JobFilter;
use twin_core::BlobHash;
use twin_core::job::{Artefact, JobState};
use twin_core::train::TrainRecord;

use crate::StageError;
use crate::backend::StageBackend;
use crate::codec::Codec;
use twin_files::AllowedRoots;

/// Overrides [`StageContext::DEFAULT_CHECKPOINT_EVERY`] (milliseconds), for tests that need a
/// checkpoint within seconds.
pub const CHECKPOINT_EVERY_ENV: &str = "TWIN_CHECKPOINT_EVERY_MS";

/// A checkpoint is not due until this many times its last cost has passed, so saving a large
/// partial result (a mining run's embedding table) takes at most a tenth of the phase's time.
const CHECKPOINT_COST_FACTOR: u32 = 9;

/// What a running stage may do: store and fetch blobs, record artefacts, report progress, run
/// phases, see cancellation. One per job attempt.
pub struct StageContext {
    backend: Arc<dyn StageBackend>,
    /// The job's artefacts when this attempt was leased: what earlier attempts recorded.
    earlier: Vec<Artefact>,
    cancel: Arc<AtomicBool>,
    checkpoint_every: Duration,
    plan: Mutex<Plan>,
    /// Where paths a spec names may be read (none unless the executor is configured with roots).
    files: Arc<AllowedRoots>,
}

#[derive(Debug, Default)]
struct Plan {
    phases: Vec<Planned>,
    /// A phase ran its work in this attempt (so later phases may not reuse earlier artefacts).
    fresh: bool,
    /// The overall fraction reached, for messages that carry none of their own.
    reached: Option<f64>,
}

#[derive(Debug, Clone)]
struct Planned {
    name: String,
    /// Where the phase starts in the job's overall fraction, and its share of it.
    start: f64,
    weight: f64,
}

/// A finished phase's value and the blob it is stored in.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseOutput<T> {
    pub value: T,
    pub blob: BlobHash,
    /// Taken from an earlier attempt's artefact rather than computed by this one.
    pub resumed: bool,
}

impl StageContext {
    pub const DEFAULT_CHECKPOINT_EVERY: Duration = Duration::from_secs(60);

    /// A context for one attempt: `earlier` are the job's artefacts when it was leased (the
    /// lease grant's job state), `cancel` is raised when the stage should stop. The checkpoint
    /// interval is [`Self::DEFAULT_CHECKPOINT_EVERY`] unless `TWIN_CHECKPOINT_EVERY_MS` is set.
    pub fn new(
        backend: Arc<dyn StageBackend>,
        earlier: &[Artefact],
        cancel: Arc<AtomicBool>,
    ) -> Self {
        Self {
            backend,
            earlier: earlier.to_vec(),
            cancel,
            checkpoint_every: checkpoint_every_from_env(),
            plan: Mutex::new(Plan::default()),
            files: Arc::new(AllowedRoots::none()),
        }
    }

    /// Lets the stage read paths its spec names under `roots` (see [`AllowedRoots`]).
    #[must_use]
    pub fn with_allowed_roots(mut self, roots: Arc<AllowedRoots>) -> Self {
        self.files = roots;
        self
    }

    /// The only way a stage opens a path its spec names: under the executor's allowed roots,
    /// regular files only, every read capped.
    pub fn files(&self) -> &AllowedRoots {
        &self.files
    }

    #[must_use]
    pub fn with_checkpoint_every(mut self, every: Duration) -> Self {
        self.checkpoint_every = every;
        self
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// `Err(cancelled)` once the stage should stop; long work calls it between steps.
    pub fn check_cancelled(&self) -> Result<(), StageError> {
        if self.is_cancelled() {
            Err(StageError::cancelled())
        } else {
            Ok(())
        }
    }

    /// Stores bytes in the server's blob store.
    pub fn upload(&self, bytes: Vec<u8>) -> Result<BlobHash, StageError> {
        self.backend.upload(bytes)
    }

    /// Fetches a blob from the server (its hash checked).
    pub fn download(&self, hash: &BlobHash) -> Result<Bytes, StageError> {
        self.backend.download(hash)
    }

    /// Streams a blob from the server into a file (its hash checked).
    pub fn download_to_file(
        &self,
        hash: &BlobHash,
        dest: &std::path::Path,
    ) -> Result<u64, StageError> {
        self.backend.download_to_file(hash, dest)
    }

    /// Streams a file into the server's blob store.
    pub fn upload_file(&self, path: &std::path::Path) -> Result<BlobHash, StageError> {
        self.backend.upload_file(path)
    }

    /// Jobs on the server (to find reusable results of earlier jobs).
    pub fn jobs(&self, filter: &JobFilter) -> Result<Vec<JobState>, StageError> {
        self.backend.jobs(filter)
    }

    /// Records a training step or validation of this job (a `train_step` or `train_validation`
    /// event).
    pub fn record_training(&self, record: &TrainRecord) -> Result<(), StageError> {
        self.backend.record_training(record)
    }

    /// Uploads the checkpoint directory `dir` (each file streamed, skipped when the server has
    /// it) and its canonical manifest, and registers it as a model this job wrote, pointing
    /// `name` at it when given. Returns the manifest hash (the model's identity).
    pub fn register_checkpoint(
        &self,
        dir: &std::path::Path,
        name: Option<&str>,
    ) -> Result<BlobHash, StageError> {
        let local = twin_client::models::scan_model_dir(dir, |_, _| {})
            .map_err(|e| StageError::internal(format!("checkpoint {}: {e}", dir.display())))?;
        for (file, path) in local.manifest.files.iter().zip(&local.paths) {
            let stored = self.upload_file(path)?;
            if stored != file.sha256 {
                return Err(StageError::internal(format!(
                    "checkpoint file {} changed while it was uploaded",
                    path.display()
                )));
            }
            self.check_cancelled()?;
        }
        let manifest = self.upload(local.manifest.to_bytes())?;
        self.backend.register_checkpoint(manifest, name)?;
        Ok(manifest)
    }

    /// Records `blob` as the job's artefact `name`. Recording the same artefact again is a
    /// no-op on the server; a new blob under the same name supersedes the old one.
    pub fn record_artefact(&self, name: &str, blob: BlobHash) -> Result<(), StageError> {
        self.backend.record_artefact(name, blob)?;
        crate::fault::stall_after(name, &self.cancel);
        Ok(())
    }

    /// The blob an earlier attempt last recorded as artefact `name`.
    pub fn recorded(&self, name: &str) -> Option<BlobHash> {
        self.earlier
            .iter()
            .rev()
            .find(|a| a.name == name)
            .map(|a| a.blob)
    }

    /// Progress of a stage without a plan: `done` of `total` of the whole job. Best effort: a
    /// lost progress event is not worth failing the job for.
    pub fn progress(
        &self,
        done: usize,
        total: usize,
        message: &str,
        counters: BTreeMap<String, f64>,
    ) {
        self.report(message, Some(ratio(done, total)), counters);
    }

    /// A progress message that moves no fraction: the job stays where it has got to.
    pub fn note(&self, message: &str) {
        let reached = self.plan.lock().reached;
        self.send(message, reached, &BTreeMap::new());
    }

    /// Declares the stage's phases in order, each with its share of the work (any positive
    /// weights; they are normalised). Every phase the stage runs must be declared.
    pub fn plan(&self, phases: &[(&str, f64)]) -> Result<(), StageError> {
        let total: f64 = phases.iter().map(|(_, w)| w).sum();
        if phases.is_empty() || !total.is_finite() {
            return Err(StageError::internal("a stage's plan needs phases"));
        }
        let mut planned = Vec::with_capacity(phases.len());
        let mut start = 0.0;
        for (name, weight) in phases {
            if !(weight.is_finite() && *weight > 0.0) {
                return Err(StageError::internal(format!(
                    "phase {name}: weight {weight} is not positive"
                )));
            }
            if planned.iter().any(|p: &Planned| p.name == *name) {
                return Err(StageError::internal(format!(
                    "phase {name} is planned twice"
                )));
            }
            let weight = weight / total;
            planned.push(Planned {
                name: (*name).to_owned(),
                start,
                weight,
            });
            start += weight;
        }
        self.plan.lock().phases = planned;
        Ok(())
    }

    /// Runs phase `name` unless an earlier attempt recorded its artefact, in which case that is
    /// downloaded and decoded with `codec` instead ("resumed: …"). A run's value is encoded,
    /// uploaded and recorded as artefact `name`. An artefact that no longer decodes (written by
    /// another version) is logged and the phase runs again.
    pub fn phase<T, C: Codec<T>>(
        &self,
        name: &str,
        codec: C,
        run: impl FnOnce(&mut Phase<'_, T, C>) -> Result<T, StageError>,
    ) -> Result<PhaseOutput<T>, StageError> {
        self.run_phase(name, codec, |_| Ok(true), run)
    }

    /// [`Self::phase`], except that an earlier attempt's artefact is reused only if
    /// `still_valid` accepts it (e.g. answers of the weights the checkpoint directory still
    /// holds); otherwise the phase runs again.
    pub fn phase_checked<T, C: Codec<T>>(
        &self,
        name: &str,
        codec: C,
        still_valid: impl FnOnce(&T) -> Result<bool, StageError>,
        run: impl FnOnce(&mut Phase<'_, T, C>) -> Result<T, StageError>,
    ) -> Result<PhaseOutput<T>, StageError> {
        self.run_phase(name, codec, still_valid, run)
    }

    fn run_phase<T, C: Codec<T>>(
        &self,
        name: &str,
        codec: C,
        still_valid: impl FnOnce(&T) -> Result<bool, StageError>,
        run: impl FnOnce(&mut Phase<'_, T, C>) -> Result<T, StageError>,
    ) -> Result<PhaseOutput<T>, StageError> {
        let (planned, reuse) = {
            let plan = self.plan.lock();
            let planned = plan
                .phases
                .iter()
                .find(|p| p.name == name)
                .cloned()
                .ok_or_else(|| {
                    StageError::internal(format!("phase {name} is not in the stage's plan"))
                })?;
            (planned, !plan.fresh)
        };
        let end = planned.start + planned.weight;
        if let Some(blob) = self.recorded(name).filter(|_| reuse) {
            match codec.decode(&self.download(&blob)?) {
                Ok(value) if still_valid(&value)? => {
                    tracing::info!(phase = name, %blob, "phase resumed from an earlier attempt");
                    self.report(
                        &format!("resumed: {name} from an earlier attempt"),
                        Some(end),
                        BTreeMap::new(),
                    );
                    return Ok(PhaseOutput {
                        value,
                        blob,
                        resumed: true,
                    });
                }
                Ok(_) => tracing::info!(
                    phase = name,
                    %blob,
                    "an earlier attempt's artefact is out of date; running the phase again"
                ),
                Err(error) => tracing::warn!(
                    phase = name,
                    %blob,
                    %error,
                    "an earlier attempt's artefact does not decode; running the phase again"
                ),
            }
        }
        self.plan.lock().fresh = true;
        let partial = reuse.then(|| self.recorded(&partial_name(name))).flatten();
        let now = Instant::now();
        let mut phase = Phase {
            ctx: self,
            planned,
            codec: &codec,
            partial,
            last_checkpoint: now,
            last_cost: Duration::ZERO,
            _value: PhantomData,
        };
        let value = run(&mut phase)?;
        let bytes = codec.encode(&value).map_err(|e| {
            StageError::internal(format!("phase {name}: its result does not encode: {e}"))
        })?;
        let blob = self.upload(bytes)?;
        self.record_artefact(name, blob)?;
        self.plan.lock().reached = Some(end);
        Ok(PhaseOutput {
            value,
            blob,
            resumed: false,
        })
    }

    fn report(&self, message: &str, fraction: Option<f64>, counters: BTreeMap<String, f64>) {
        if fraction.is_some() {
            self.plan.lock().reached = fraction;
        }
        self.send(message, fraction, &counters);
    }

    fn send(&self, message: &str, fraction: Option<f64>, counters: &BTreeMap<String, f64>) {
        // Phase weights summed in floating point can end a hair past 1; the server refuses that.
        let fraction = fraction
            .filter(|f| f.is_finite())
            .map(|f| f.clamp(0.0, 1.0));
        if let Err(e) = self.backend.progress(message, fraction, counters) {
            tracing::warn!(error = %e, "progress not recorded");
        }
    }
}

fn ratio(done: usize, total: usize) -> f64 {
    if total == 0 {
        1.0
    } else {
        (done as f64 / total as f64).clamp(0.0, 1.0)
    }
}

/// The artefact a phase's checkpoints are recorded under.
pub fn partial_name(phase: &str) -> String {
    format!("{phase}.partial")
}

fn checkpoint_every_from_env() -> Duration {
    match std::env::var(CHECKPOINT_EVERY_ENV) {
        Err(_) => StageContext::DEFAULT_CHECKPOINT_EVERY,
        Ok(v) => v.trim().parse().map(Duration::from_millis).unwrap_or_else(|_| {
            tracing::warn!(value = %v, "{CHECKPOINT_EVERY_ENV} is not a number of milliseconds; ignored");
            StageContext::DEFAULT_CHECKPOINT_EVERY
        }),
    }
}

/// A phase being run: progress within it, checkpoints of a partial result.
pub struct Phase<'a, T, C> {
    ctx: &'a StageContext,
    planned: Planned,
    codec: &'a C,
    /// The latest checkpoint of an earlier attempt.
    partial: Option<BlobHash>,
    last_checkpoint: Instant,
    last_cost: Duration,
    _value: PhantomData<fn() -> T>,
}

impl<T, C: Codec<T>> Phase<'_, T, C> {
    pub fn name(&self) -> &str {
        &self.planned.name
    }

    /// `done` of the phase's `total` steps, reported as the job's overall fraction.
    pub fn progress(
        &self,
        done: usize,
        total: usize,
        message: &str,
        counters: BTreeMap<String, f64>,
    ) {
        let fraction = self.planned.start + self.planned.weight * ratio(done, total);
        self.ctx.report(message, Some(fraction), counters);
    }

    /// The partial result an earlier attempt saved with [`Self::checkpoint`], if any (one that
    /// no longer decodes is logged and ignored).
    pub fn partial(&self) -> Result<Option<T>, StageError> {
        let Some(blob) = self.partial else {
            return Ok(None);
        };
        match self.codec.decode(&self.ctx.download(&blob)?) {
            Ok(value) => Ok(Some(value)),
            Err(error) => {
                tracing::warn!(phase = self.name(), %blob, %error, "an earlier attempt's checkpoint does not decode; ignored");
                Ok(None)
            }
        }
    }

    /// Whether a checkpoint is due: the context's checkpoint interval has passed since the
    /// phase began or last saved one, and so has nine times what the last one took.
    pub fn checkpoint_due(&self) -> bool {
        let wait = self
            .ctx
            .checkpoint_every
            .max(self.last_cost * CHECKPOINT_COST_FACTOR);
        self.last_checkpoint.elapsed() >= wait
    }

    /// Saves the work so far as artefact `<phase>.partial`, for an attempt that has to start
    /// this phase again.
    pub fn checkpoint(&mut self, partial: &T) -> Result<(), StageError> {
        let began = Instant::now();
        let name = partial_name(self.name());
        let bytes = self.codec.encode(partial).map_err(|e| {
            StageError::internal(format!("{name}: the partial result does not encode: {e}"))
        })?;
        let size = bytes.len();
        let blob = self.ctx.upload(bytes)?;
        self.ctx.record_artefact(&name, blob)?;
        self.last_cost = began.elapsed();
        self.last_checkpoint = Instant::now();
        tracing::info!(artefact = %name, %blob, bytes = size, millis = self.last_cost.as_millis() as u64, "checkpoint recorded");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Json, JsonLines};
    use crate::testing::MemoryBackend;

    fn run_twice_plan(ctx: &StageContext) -> Result<(), StageError> {
        ctx.plan(&[("a", 3.0), ("b", 1.0)])
    }

    #[test]
    fn phases_run_record_their_artefacts_and_report_weighted_progress() {
        let backend = MemoryBackend::new();
        let ctx = backend.context(&[]);
        run_twice_plan(&ctx).unwrap();
        let a = ctx
            .phase("a", Json, |p| {
                assert_eq!(p.partial()?, None);
                p.progress(1, 2, "half of a", BTreeMap::new());
                Ok(vec![1u32, 2])
            })
            .unwrap();
        assert!(!a.resumed);
        let b = ctx
            .phase("b", JsonLines, |p| {
                p.progress(1, 4, "a quarter of b", BTreeMap::new());
                Ok(vec!["x".to_owned()])
            })
            .unwrap();
        assert_eq!(backend.names(), ["a", "b"]);
        assert_eq!(&backend.blob(&a.blob)[..], b"[1,2]");
        assert_eq!(&backend.blob(&b.blob)[..], b"\"x\"\n");
        assert_eq!(
            backend.fractions(),
            [
                (Some(0.375), "half of a".into()),
                (Some(0.8125), "a quarter of b".into())
            ]
        );
        ctx.note("done");
        assert_eq!(backend.fractions()[2], (Some(1.0), "done".into()));
    }

    #[test]
    fn a_second_attempt_resumes_finished_phases_without_running_them() {
        let backend = MemoryBackend::new();
        let first = backend.context(&[]);
        run_twice_plan(&first).unwrap();
        first.phase("a", Json, |_| Ok(41u32)).unwrap();
        let earlier = backend.artefacts();

        let second = backend.context(&earlier);
        run_twice_plan(&second).unwrap();
        let a = second
            .phase("a", Json, |_| -> Result<u32, _> { panic!("a is done") })
            .unwrap();
        assert_eq!((a.value, a.resumed), (41, true));
        let b = second.phase("b", Json, |_| Ok(a.value + 1)).unwrap();
        assert_eq!((b.value, b.resumed), (42, false));
        // "a" is recorded once; the resumed phase reported where the job stands.
        assert_eq!(backend.names(), ["a", "b"]);
        assert!(
            backend
                .fractions()
                .contains(&(Some(0.75), "resumed: a from an earlier attempt".into()))
        );
    }

    #[test]
    fn after_a_phase_runs_later_phases_run_too() {
        let backend = MemoryBackend::new();
        let first = backend.context(&[]);
        run_twice_plan(&first).unwrap();
        first.phase("a", Json, |_| Ok(1u32)).unwrap();
        first.phase("b", Json, |_| Ok(10u32)).unwrap();
        let earlier = backend.artefacts();

        // The second attempt finds "a" out of date: "b" was made from the old "a".
        let second = backend.context(&earlier);
        run_twice_plan(&second).unwrap();
        let a = second
            .phase_checked("a", Json, |v: &u32| Ok(*v == 2), |_| Ok(2u32))
            .unwrap();
        assert!(!a.resumed);
        let b = second.phase("b", Json, |_| Ok(20u32)).unwrap();
        assert_eq!((b.value, b.resumed), (20, false));
    }

    #[test]
    fn an_artefact_that_does_not_decode_is_made_again() {
        let backend = MemoryBackend::new();
        let first = backend.context(&[]);
        first.plan(&[("a", 1.0)]).unwrap();
        first.phase("a", Json, |_| Ok("text".to_owned())).unwrap();
        let second = backend.context(&backend.artefacts());
        second.plan(&[("a", 1.0)]).unwrap();
        let a = second.phase("a", Json, |_| Ok(5u32)).unwrap();
        assert_eq!((a.value, a.resumed), (5, false));
    }

    #[test]
    fn a_phase_outside_the_plan_is_a_bug() {
        let backend = MemoryBackend::new();
        let ctx = backend.context(&[]);
        let err = ctx.phase("x", Json, |_| Ok(1u32)).unwrap_err();
        assert_eq!(err.code, twin_core::FailureCode::Internal);
        assert!(ctx.plan(&[("a", 1.0), ("a", 2.0)]).is_err());
        assert!(ctx.plan(&[("a", 0.0)]).is_err());
        assert!(ctx.plan(&[]).is_err());
    }

    #[test]
    fn checkpoints_are_due_by_the_interval_and_resume_the_next_attempt_mid_phase() {
        let backend = MemoryBackend::new();
        let first = backend
            .context(&[])
            .with_checkpoint_every(Duration::from_millis(30));
        first.plan(&[("a", 1.0)]).unwrap();
        let cancel = backend.cancel_flag();
        let err = first
            .phase("a", JsonLines, |p| {
                let mut done: Vec<u32> = Vec::new();
                assert!(!p.checkpoint_due(), "not before the interval has passed");
                for i in 0..3 {
                    std::thread::sleep(Duration::from_millis(40));
                    done.push(i);
                    assert!(p.checkpoint_due());
                    p.checkpoint(&done)?;
                }
                // The executor dies here.
                cancel.store(true, Ordering::SeqCst);
                first.check_cancelled()?;
                Ok(done)
            })
            .unwrap_err();
        assert_eq!(err, StageError::cancelled());
        assert_eq!(backend.names(), ["a.partial"; 3]);

        let second = backend.context(&backend.artefacts());
        second.plan(&[("a", 1.0)]).unwrap();
        let a = second
            .phase("a", JsonLines, |p| {
                let mut done = p.partial()?.unwrap_or_default();
                assert_eq!(done, [0, 1, 2], "the latest checkpoint");
                done.push(3);
                Ok(done)
            })
            .unwrap();
        assert_eq!(a.value, [0, 1, 2, 3]);
        assert_eq!(backend.names().last().map(String::as_str), Some("a"));
    }

    #[test]
    fn a_slow_checkpoint_spaces_out_the_next() {
        let backend = MemoryBackend::new().with_upload_delay(Duration::from_millis(20));
        let ctx = backend.context(&[]).with_checkpoint_every(Duration::ZERO);
        ctx.plan(&[("a", 1.0)]).unwrap();
        ctx.phase("a", Json, |p| {
            assert!(p.checkpoint_due());
            p.checkpoint(&1u32)?;
            // The next is due only after nine times the 20 ms the last one took.
            assert!(!p.checkpoint_due());
            std::thread::sleep(Duration::from_millis(200));
            assert!(p.checkpoint_due());
            Ok(2u32)
        })
        .unwrap();
    }

    #[test]
    fn progress_without_a_plan_is_a_share_of_the_whole_job() {
        let backend = MemoryBackend::new();
        let ctx = backend.context(&[]);
        ctx.progress(3, 4, "three of four", BTreeMap::new());
        ctx.progress(0, 0, "nothing to do", BTreeMap::new());
        assert_eq!(
            backend.fractions(),
            [
                (Some(0.75), "three of four".into()),
                (Some(1.0), "nothing to do".into())
            ]
        );
    }
}
