//! The async runtime openraft runs on: tokio, exactly as openraft's own `TokioRuntime`, except
//! that the random numbers openraft draws (election timeouts) can come from a seeded generator
//! on the current thread ([`seed_thread_rng`]). The deterministic simulation ([`crate::sim`])
//! seeds it so a run is reproduced by its seed; everywhere else nothing is seeded and the draws
//! come from the thread's OS-seeded generator, as before.
//!
//! One more difference: openraft's long sleeps (every group's tick, ~100 ms) end on a shared
//! grid of [`TIMER_SLACK`] rather than each at its own random phase ([`coalesced`]). A node
//! runs a Raft instance per placement group; with 64 groups the spread ticks woke a tokio
//! worker ~640 times a second on an idle node (measured: ~1,100 context switches a second,
//! 4.5% of a core), where ticks that end together are served by one wake-up and their
//! heartbeats leave in one transport frame per peer. The same idea as Linux's timer slack: a
//! timer may fire a little late so that timers fire together. Raft's safety does not depend
//! on timing, and 25 ms on a 1.5-3 s election timeout changes nothing a user sees.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use openraft::{AsyncRuntime, Instant as _, OptionalSend};
use openraft_rt_tokio::TokioRuntime;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

thread_local! {
    static SEEDED: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// Makes openraft's random draws on this thread come from `seed` (`None`: from the OS-seeded
/// thread generator again).
pub fn seed_thread_rng(seed: Option<u64>) {
    SEEDED.with(|s| *s.borrow_mut() = seed.map(StdRng::seed_from_u64));
}

/// The grid openraft's long sleeps end on; see the module documentation.
pub const TIMER_SLACK: Duration = Duration::from_millis(25);

/// `deadline`, moved later to the next line of the [`TIMER_SLACK`] grid if it is further away
/// than the slack itself (short sleeps, such as openraft's 1 µs I/O-completion batching, keep
/// their deadline). Not on a seeded thread: the simulation keeps openraft's exact timing, so a
/// seed replays the same schedule whatever the grid's phase.
pub fn coalesced(deadline: <TokioRuntime as AsyncRuntime>::Instant) -> <TokioRuntime as AsyncRuntime>::Instant {
    type I = <TokioRuntime as AsyncRuntime>::Instant;
    static ORIGIN: OnceLock<I> = OnceLock::new();
    if SEEDED.with(|s| s.borrow().is_some()) {
        return deadline;
    }
    let now = I::now();
    if deadline <= now + TIMER_SLACK {
        return deadline;
    }
    let origin = *ORIGIN.get_or_init(|| now);
    let step = TIMER_SLACK.as_nanos();
    let offset = (deadline - origin).as_nanos().div_ceil(step) * step;
    // The offset fits a u64 of nanoseconds for five centuries of uptime.
    origin + Duration::from_nanos(u64::try_from(offset).unwrap_or(u64::MAX))
}

/// openraft's random source: the thread's seeded generator if there is one.
#[derive(Debug, Default)]
pub struct RaftRng;

impl RaftRng {
    fn draw<T>(f: impl FnOnce(&mut dyn RngCore) -> T) -> T {
        SEEDED.with(|s| match s.borrow_mut().as_mut() {
            Some(rng) => f(rng),
            None => f(&mut rand::rng()),
        })
    }
}

impl openraft_rand_core::TryRng for RaftRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(Self::draw(|r| r.next_u32()))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(Self::draw(|r| r.next_u64()))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        Self::draw(|r| r.fill_bytes(dst));
        Ok(())
    }
}

/// tokio, with [`RaftRng`] as openraft's random source.
#[derive(Debug)]
pub struct BasaltRuntime(TokioRuntime);

type Tokio = TokioRuntime;

impl AsyncRuntime for BasaltRuntime {
    type JoinError = <Tokio as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <Tokio as AsyncRuntime>::JoinHandle<T>;
    type Sleep = <Tokio as AsyncRuntime>::Sleep;
    type Instant = <Tokio as AsyncRuntime>::Instant;
    type TimeoutError = <Tokio as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = <Tokio as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = RaftRng;
    type Mpsc = <Tokio as AsyncRuntime>::Mpsc;
    type Watch = <Tokio as AsyncRuntime>::Watch;
    type Oneshot = <Tokio as AsyncRuntime>::Oneshot;
    type Mutex<T: OptionalSend + 'static> = <Tokio as AsyncRuntime>::Mutex<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        Tokio::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        Tokio::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        Tokio::sleep_until(coalesced(deadline))
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(duration: Duration, future: F) -> Self::Timeout<R, F> {
        Tokio::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(deadline: Self::Instant, future: F) -> Self::Timeout<R, F> {
        Tokio::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        Tokio::is_panic(join_error)
    }

    fn thread_rng() -> RaftRng {
        RaftRng
    }

    fn new(threads: usize) -> Self {
        Self(Tokio::new(threads))
    }

    fn block_on<F, T>(&mut self, future: F) -> T
    where
        F: Future<Output = T>,
    {
        self.0.block_on(future)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type I = <TokioRuntime as AsyncRuntime>::Instant;

    #[test]
    fn long_sleeps_end_on_a_shared_grid_and_short_ones_keep_their_deadline() {
        let now = I::now();
        // Ticks ~100 ms away at phases 1 ms apart end together, never early, at most one slack late.
        let ends: Vec<I> = (0..10).map(|ms| coalesced(now + Duration::from_millis(100 + ms))).collect();
        for (ms, end) in ends.iter().enumerate() {
            let asked = now + Duration::from_millis(100 + ms as u64);
            assert!(*end >= asked && *end - asked <= TIMER_SLACK, "{ms}: {end:?} for {asked:?}");
        }
        let distinct: std::collections::BTreeSet<I> = ends.iter().copied().collect();
        assert!(distinct.len() <= 2, "10 deadlines within 10 ms end at {} instants", distinct.len());
        // A grid line is a fixed point.
        assert_eq!(coalesced(ends[0]), ends[0]);
        let short = now + Duration::from_micros(1);
        assert_eq!(coalesced(short), short);
    }

    #[test]
    fn the_simulation_keeps_exact_deadlines() {
        seed_thread_rng(Some(7));
        let deadline = I::now() + Duration::from_millis(101);
        let kept = coalesced(deadline);
        seed_thread_rng(None);
        assert_eq!(kept, deadline);
    }
}
