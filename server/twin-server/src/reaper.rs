//! The lease reaper: one task that expires lapsed leases.
//!
//! Owns nothing but its timer: it wakes every quarter of the lease TTL (between 50 ms and 1 s),
//! asks the service to expire every lease past its deadline (through the job state machine, so
//! the expiry is an event and the retry rule applies), and stops when `stop` turns true.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::service::Service;

pub async fn run(svc: Arc<Service>, lease_ttl: Duration, mut stop: watch::Receiver<bool>) {
    let every = (lease_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => { svc.reap().await; }
            _ = stop.changed() => return,
        }
    }
}
