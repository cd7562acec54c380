//! The async runtime openraft runs on: tokio, exactly as openraft's own `TokioRuntime`, except
//! that the random numbers openraft draws (election timeouts) can come from a seeded generator
//! on the current thread ([`seed_thread_rng`]). The deterministic simulation ([`crate::sim`])
//! seeds it so a run is reproduced by its seed; everywhere else nothing is seeded and the draws
//! come from the thread's OS-seeded generator, as before.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use openraft::{AsyncRuntime, OptionalSend};
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
        Tokio::sleep_until(deadline)
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
