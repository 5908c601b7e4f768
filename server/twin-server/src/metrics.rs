//! Prometheus metrics: jobs by state, log appends and their latency, leases, failed attempts by
//! failure code, HTTP latency by route.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder, exponential_buckets,
};
use std::collections::BTreeMap;

use twin_core::FailureCode;
use twin_core::job::JobStatus;
use twin_log::{BatchStats, LogObserver};

pub struct Metrics {
    registry: Registry,
    pub jobs: IntGaugeVec,
    pub log_records: IntCounter,
    pub log_batches: IntCounter,
    pub log_append_seconds: Histogram,
    pub log_fsync_seconds: Histogram,
    pub log_append_failures: IntCounter,
    pub lease_expiries: IntCounter,
    /// Attempts that ended in failure, labelled `code` (a closed set: `FailureCode::ALL`).
    pub attempt_failures: IntCounterVec,
    pub stale_epoch_refusals: IntCounter,
    pub executor_restarts: IntCounter,
    pub http_seconds: HistogramVec,
}

fn seconds_buckets() -> Vec<f64> {
    exponential_buckets(0.000_05, 2.0, 18).expect("static bucket layout is valid")
}

impl Metrics {
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("twin".into()), None).expect("static prefix is valid");
        let jobs = IntGaugeVec::new(Opts::new("jobs", "Jobs by state"), &["state"]).expect("valid");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let histogram = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(seconds_buckets()))
                .expect("valid metric")
        };
        let m = Self {
            jobs,
            log_records: counter("log_appended_records_total", "Records made durable"),
            log_batches: counter("log_batches_total", "Group commits (one fsync each)"),
            log_append_seconds: histogram(
                "log_append_seconds",
                "Write + fsync time of one group commit",
            ),
            log_fsync_seconds: histogram("log_fsync_seconds", "fsync time of one group commit"),
            log_append_failures: counter(
                "log_append_failures_total",
                "Group commits that failed to become durable",
            ),
            lease_expiries: counter(
                "lease_expiries_total",
                "Leases expired: lapsed without a heartbeat, or their executor died",
            ),
            attempt_failures: IntCounterVec::new(
                Opts::new(
                    "attempt_failures_total",
                    "Job attempts that ended in failure, by failure code (an expired lease is executor_lost)",
                ),
                &["code"],
            )
            .expect("valid metric"),
            stale_epoch_refusals: counter(
                "stale_epoch_refusals_total",
                "Executor calls refused for a stale epoch",
            ),
            executor_restarts: counter(
                "executor_restarts_total",
                "Times the server's executor child exited and was started again",
            ),
            http_seconds: HistogramVec::new(
                HistogramOpts::new("http_request_seconds", "HTTP latency by route")
                    .buckets(seconds_buckets()),
                &["method", "route", "status"],
            )
            .expect("valid metric"),
            registry,
        };
        // Every code from the start: a series that appears only on the first failure of its
        // kind makes `rate()` miss that failure.
        for code in FailureCode::ALL {
            m.attempt_failures.with_label_values(&[code.as_str()]);
        }
        let collectors: [Box<dyn prometheus::core::Collector>; 12] = [
            Box::new(m.jobs.clone()),
            Box::new(m.log_records.clone()),
            Box::new(m.log_batches.clone()),
            Box::new(m.log_append_seconds.clone()),
            Box::new(m.log_fsync_seconds.clone()),
            Box::new(m.log_append_failures.clone()),
            Box::new(m.lease_expiries.clone()),
            Box::new(m.attempt_failures.clone()),
            Box::new(m.stale_epoch_refusals.clone()),
            Box::new(m.executor_restarts.clone()),
            Box::new(m.http_seconds.clone()),
            Box::new(
                prometheus::IntGauge::new("up", "1 while the server runs")
                    .inspect(|g| g.set(1))
                    .expect("valid metric"),
            ),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }

    /// The text exposition, with the job gauges refreshed from the projections.
    /// The text exposition, with the job counts taken beforehand (`Projections::count_by_status`
    /// under the projections' read lock), so the lock is not held while encoding.
    pub fn render(&self, jobs_by_status: BTreeMap<JobStatus, usize>) -> String {
        for (status, n) in jobs_by_status {
            self.jobs
                .with_label_values(&[status.as_str()])
                .set(n as i64);
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Feeds the log's batch timings into the histograms.
pub struct LogMetrics(pub std::sync::Arc<Metrics>);

impl LogObserver for LogMetrics {
    fn batch_durable(&self, stats: &BatchStats) {
        self.0.log_records.inc_by(stats.records as u64);
        self.0.log_batches.inc();
        self.0
            .log_append_seconds
            .observe((stats.write + stats.fsync).as_secs_f64());
        self.0.log_fsync_seconds.observe(stats.fsync.as_secs_f64());
    }

    fn append_failed(&self, _error: &str) {
        self.0.log_append_failures.inc();
    }
}
