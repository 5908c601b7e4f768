//! The clocks a module sees: both stuck at the Unix epoch, and timers that have always fired.
//!
//! A module must not observe time (a score would depend on when it ran), so the wall clock and
//! the monotonic clock read 0. Sleeping is the other half. A guest sleeps by subscribing to
//! `wasi:clocks/monotonic-clock` and polling the pollable through `wasi:io/poll` (Rust's
//! `std::thread::sleep` on wasip2 does exactly that), and wasmtime-wasi's own timers wait on the
//! host's real clock inside that host call, where the epoch deadline cannot interrupt them: one
//! sleeping module would hold a thread and a pool slot for as long as it asked. Here every timer
//! is ready at once, which is also what a clock that never moves implies, so a sleeping guest is
//! back in its own code immediately, where fuel and the deadline apply. With sockets denied and
//! no files, timers were the only pollables that could wait, so every call now ends at its
//! deadline whatever the guest does.

use std::time::Duration;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock;
use wasmtime_wasi::p2::{DynFuture, DynPollable, Pollable, subscribe};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiView};

/// A clock stuck at the Unix epoch: modules must not observe time.
pub(crate) struct FixedClock;

impl HostWallClock for FixedClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FixedClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// Replaces wasmtime-wasi's `wasi:clocks/monotonic-clock` (already in `linker`) with one whose
/// timers are ready at once; pollables live in the store's WASI resource table.
pub(crate) fn shadow_monotonic_clock<T: WasiView + 'static>(
    linker: &mut Linker<T>,
) -> wasmtime::Result<()> {
    // The interface was added by `add_to_linker_sync`; redefining its functions needs shadowing,
    // which stays off for everything else so that no other definition is replaced by accident.
    linker.allow_shadowing(true);
    let added = monotonic_clock::add_to_linker::<T, HasTimers>(linker, |state| Timers {
        table: state.ctx().table,
    });
    linker.allow_shadowing(false);
    added
}

/// `wasi:clocks/monotonic-clock` for one call: the time is always 0 and every timer has fired.
struct Timers<'a> {
    table: &'a mut ResourceTable,
}

/// Names [`Timers`] as the linker's view of a store for this interface.
struct HasTimers;

impl HasData for HasTimers {
    type Data<'a> = Timers<'a>;
}

impl monotonic_clock::Host for Timers<'_> {
    fn now(&mut self) -> wasmtime::Result<monotonic_clock::Instant> {
        Ok(HostMonotonicClock::now(&FixedClock))
    }

    fn resolution(&mut self) -> wasmtime::Result<monotonic_clock::Duration> {
        Ok(HostMonotonicClock::resolution(&FixedClock))
    }

    fn subscribe_instant(
        &mut self,
        _when: monotonic_clock::Instant,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        self.elapsed()
    }

    fn subscribe_duration(
        &mut self,
        _duration: monotonic_clock::Duration,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        self.elapsed()
    }
}

impl Timers<'_> {
    /// A pollable that is already ready. Owned by its pollable, so dropping the pollable frees it.
    fn elapsed(&mut self) -> wasmtime::Result<Resource<DynPollable>> {
        let timer = self.table.push(Elapsed)?;
        subscribe(self.table, timer)
    }
}

/// A timer that has fired.
struct Elapsed;

// `Pollable` is an `async_trait`; this is the signature that macro would write, spelled out
// rather than adding the macro as a dependency for one empty method.
impl Pollable for Elapsed {
    fn ready<'life0, 'async_trait>(&'life0 mut self) -> DynFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(std::future::ready(()))
    }
}
