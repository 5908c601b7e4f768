//! Bounds on held connections: long polls (`GET /v1/events?wait_ms`, a lease's `wait_ms`) and
//! Server-Sent Events streams each hold a connection and a task while they wait.
//!
//! Two limits: one for the whole server, and one per token for tokens without the `execute`
//! role, so one script tailing events in a loop cannot starve everyone else, while a fleet of
//! executors sharing one execute token (the batch-system deployment) is never refused for
//! being many. A request over a limit gets 429 `too_many_waiters` at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::auth::{Caller, Role};
use crate::error::ApiError;

#[derive(Debug)]
pub struct Waiters {
    global: AtomicUsize,
    per_token: AtomicUsize,
    total: AtomicUsize,
    by_token: Mutex<HashMap<String, usize>>,
}

/// One held wait; dropping it (the request ended, the stream closed) frees it.
#[derive(Debug)]
pub struct Slot {
    waiters: Arc<Waiters>,
    token: Option<String>,
}

impl Waiters {
    /// The defaults: 4,096 waits in all, 32 per non-executor token.
    pub const GLOBAL: usize = 4096;
    pub const PER_TOKEN: usize = 32;

    pub fn new(global: usize, per_token: usize) -> Arc<Self> {
        Arc::new(Self {
            global: AtomicUsize::new(global),
            per_token: AtomicUsize::new(per_token),
            total: AtomicUsize::new(0),
            by_token: Mutex::new(HashMap::new()),
        })
    }

    pub fn set_limits(&self, global: usize, per_token: usize) {
        self.global.store(global, Ordering::Relaxed);
        self.per_token.store(per_token, Ordering::Relaxed);
    }

    /// Takes a slot for `caller`, or refuses with 429.
    pub fn acquire(self: &Arc<Self>, caller: &Caller) -> Result<Slot, ApiError> {
        let global = self.global.load(Ordering::Relaxed);
        if self.total.fetch_add(1, Ordering::AcqRel) >= global {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::TooManyWaiters(format!(
                "the server holds {global} waiting requests already"
            )));
        }
        let mut slot = Slot {
            waiters: self.clone(),
            token: None,
        };
        if !caller.has(Role::Execute) {
            let per_token = self.per_token.load(Ordering::Relaxed);
            let mut by_token = self.by_token.lock();
            let n = by_token.entry(caller.name.clone()).or_default();
            if *n >= per_token {
                // `slot` drops here and gives the global count back.
                return Err(ApiError::TooManyWaiters(format!(
                    "token `{}` holds {per_token} waiting requests already",
                    caller.name
                )));
            }
            *n += 1;
            slot.token = Some(caller.name.clone());
        }
        Ok(slot)
    }

    pub fn held(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.waiters.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(token) = &self.token {
            let mut by_token = self.waiters.by_token.lock();
            if let Some(n) = by_token.get_mut(token) {
                *n -= 1;
                if *n == 0 {
                    by_token.remove(token);
                }
            }
        }
    }
}
