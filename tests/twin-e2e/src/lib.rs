//! End-to-end tests for twin.
