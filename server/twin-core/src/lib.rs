//! The pure domain of twin: identifiers, job specs, events, the job state machine and projections.
//!
//! Architecture invariant: nothing in this crate does I/O or reads a clock. Time arrives as
//! [`Millis`] inside commands, identifiers are minted by the caller, so every function here is a
//! deterministic function of its arguments and replaying the log reproduces state exactly.

pub mod api;
pub mod build_config;
pub mod dataset;
pub mod eval;
pub mod event;
pub mod failure;
pub mod ids;
pub mod job;
pub mod mine;
pub mod model;
pub mod module_output;
pub mod projection;
pub mod record;
pub mod safetensors;
pub(crate) mod schema;
pub mod score;
pub mod spec;
pub mod train;

pub use event::{DecodeError, Event, EventSchema, RecordedEvent};
pub use failure::FailureCode;
pub use ids::{Actor, BlobHash, DatasetId, ExperimentId, IdError, JobId, Millis, StreamName};
pub use job::{JobCommand, JobState, JobStatus, Rejection};
pub use projection::Projections;
pub use spec::{JobKind, JobSubmission, SpecError};
