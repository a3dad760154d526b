//! Runs a server's connections and calls on whichever thread asks: the
//! runtime's thread when something it waits on is ready (a read, the call's
//! timer), or an emitting thread that found a batch due ([`Flush`]).
//!
//! Every future of the server (each HTTP/2 connection, and each call hyper
//! hands to its executor) lives in one [`Driver`] and is polled with one
//! waker. A wake while a thread is polling them only asks that thread for
//! another round; otherwise it wakes the runtime's drive task. So a batch
//! an emitter sends goes from the queue through hyper and h2 into the socket
//! on the emitter's thread, and the runtime's thread is not woken for it.
//!
//! Polling never blocks: a thread that finds another one polling leaves it
//! the work. Futures are polled inside the runtime's context, so tokio's
//! I/O and `spawn` work from any thread.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Wake, Waker};

use tokio::runtime::Handle;
use tokio::sync::Notify;

use crate::stream::{Core, Flush};

/// A future the driver polls to completion.
pub type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A thread is polling the futures.
const POLLING: u8 = 1;
/// Something woke while they were polled: poll them again.
const AGAIN: u8 = 2;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// See the module documentation.
pub struct Driver {
    tasks: Mutex<Vec<Task>>,
    /// Handed over by hyper (or [`Driver::add`]) and not polled yet.
    added: Mutex<Vec<Task>>,
    state: AtomicU8,
    /// Wakes the drive task on the runtime's thread.
    wake_runtime: Arc<Notify>,
    handle: Handle,
    core: Arc<Core>,
    /// The process that may poll them, as [`forks`] counts it (a forked
    /// child must not: the sockets are its parent's).
    fork: u64,
    me: Weak<Driver>,
    /// Rounds of polling run by emitters ([`Flush`]) and by the runtime.
    rounds: [AtomicU64; 2],
    /// Time emitters spent in their rounds (ns).
    emitter_ns: AtomicU64,
}

/// Who ran a round of polling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum By {
    /// An emitting thread (through [`Flush`]).
    Emitter = 0,
    /// The runtime's thread.
    Runtime = 1,
}

/// Rounds of polling a driver ran, by who ran them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rounds {
    pub by_emitters: u64,
    pub by_runtime: u64,
    /// Time the emitters' rounds took (ns): what sending costs the threads
    /// that emit (an upper bound of their CPU, the rounds never block).
    pub emitter_ns: u64,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").field("fork", &self.fork).finish()
    }
}

impl Driver {
    /// A driver whose drive task runs on `handle`'s runtime.
    pub fn start(handle: Handle, core: Arc<Core>) -> Arc<Driver> {
        let driver = Arc::new_cyclic(|me| Driver {
            tasks: Mutex::new(Vec::new()),
            added: Mutex::new(Vec::new()),
            state: AtomicU8::new(0),
            wake_runtime: Arc::new(Notify::new()),
            handle: handle.clone(),
            core,
            fork: forks(),
            me: me.clone(),
            rounds: Default::default(),
            emitter_ns: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&driver);
        let woken = driver.wake_runtime.clone();
        handle.spawn(async move {
            loop {
                woken.notified().await;
                match weak.upgrade() {
                    Some(driver) => {
                        driver.poll_all(By::Runtime);
                    }
                    // Dropped: its drop woke us to end.
                    None => return,
                }
            }
        });
        driver
    }

    /// Adds a future and has it polled.
    pub fn add(&self, task: Task) {
        lock(&self.added).push(task);
        self.ask_poll();
    }

    /// Drops every future (their connections close).
    pub fn abort_all(&self) {
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        let added = std::mem::take(&mut *lock(&self.added));
        drop(tasks);
        drop(added);
    }

    /// The rounds of polling run so far.
    pub fn rounds(&self) -> Rounds {
        Rounds {
            by_emitters: self.rounds[By::Emitter as usize].load(Ordering::Relaxed),
            by_runtime: self.rounds[By::Runtime as usize].load(Ordering::Relaxed),
            emitter_ns: self.emitter_ns.load(Ordering::Relaxed),
        }
    }

    /// Futures not finished yet.
    pub fn len(&self) -> usize {
        lock(&self.tasks).len() + lock(&self.added).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Asks for a round of polling: of the thread polling now, or else of
    /// the runtime's thread.
    pub fn ask_poll(&self) {
        let before = self.state.fetch_or(AGAIN, Ordering::AcqRel);
        if before & POLLING == 0 {
            self.wake_runtime.notify_one();
        }
    }

    /// Polls every future on this thread until none asks for more; false
    /// if another thread is polling them (it will poll once more).
    pub fn poll_all(&self, by: By) -> bool {
        if self.fork != forks() {
            return false;
        }
        let Some(me) = self.me.upgrade() else {
            return false;
        };
        let Ok(mut tasks) = self.tasks.try_lock() else {
            // The holder may be past its last round: make sure someone
            // polls again.
            self.ask_poll();
            return false;
        };
        let started = (by == By::Emitter).then(std::time::Instant::now);
        let waker = Waker::from(me);
        let mut cx = Context::from_waker(&waker);
        let _runtime = self.handle.enter();
        self.state.fetch_or(POLLING, Ordering::AcqRel);
        self.rounds[by as usize].fetch_add(1, Ordering::Relaxed);
        let finished = loop {
            self.state.fetch_and(!AGAIN, Ordering::AcqRel);
            tasks.append(&mut lock(&self.added));
            tasks.retain_mut(|task| {
                match std::panic::catch_unwind(AssertUnwindSafe(|| task.as_mut().poll(&mut cx))) {
                    Ok(Poll::Pending) => true,
                    Ok(Poll::Ready(())) => false,
                    Err(_) => {
                        // A future that panicked is dropped (its
                        // connection closes); counted, never raised.
                        self.core.count("internal_errors", 1);
                        false
                    }
                }
            });
            if !lock(&self.added).is_empty() {
                continue;
            }
            if self
                .state
                .compare_exchange(POLLING, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                break true;
            }
        };
        if let Some(started) = started {
            let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.emitter_ns.fetch_add(took, Ordering::Relaxed);
        }
        finished
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Ends the drive task.
        self.wake_runtime.notify_one();
    }
}

impl Wake for Driver {
    fn wake(self: Arc<Self>) {
        self.ask_poll();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ask_poll();
    }
}

impl Flush for Driver {
    fn flush(&self) -> bool {
        self.poll_all(By::Emitter)
    }
}

/// Forks this process went through, counted in each child: a cheaper check
/// than `getpid` (a syscall, several us on a VM after a spell of user code),
/// and it sees every `fork()` through libc, from Python or not.
pub fn forks() -> u64 {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    static FORKS: AtomicU64 = AtomicU64::new(0);
    extern "C" fn in_child() {
        FORKS.fetch_add(1, Ordering::SeqCst);
    }
    REGISTERED.call_once(|| {
        // SAFETY: registers a handler that only adds to an atomic
        // (async-signal-safe), as pthread_atfork requires of the child's.
        unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
    });
    FORKS.load(Ordering::Relaxed)
}

/// hyper's executor for a driver's connections: their calls become the
/// driver's futures.
#[derive(Clone, Debug)]
pub struct DriverExec(pub Arc<Driver>);

impl<F> hyper::rt::Executor<F> for DriverExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.add(Box::pin(fut));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A future that is ready after `n` polls, waking itself in between.
    struct Countdown(Arc<AtomicUsize>, usize);

    impl Future for Countdown {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            if self.1 == 0 {
                return Poll::Ready(());
            }
            self.1 -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    /// A driver on a runtime of its own (not running until `block_on`), and
    /// its stream.
    fn driver() -> (tokio::runtime::Runtime, Arc<Core>, Arc<Driver>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let core = Arc::new(Core::new(Default::default()));
        let driver = Driver::start(rt.handle().clone(), core.clone());
        (rt, core, driver)
    }

    /// Wakes during a round make the polling thread poll again, on the
    /// thread that called `poll_all`, until the futures finish.
    #[test]
    fn a_wake_while_polling_means_another_round_here() {
        let (_rt, _core, driver) = driver();
        let polls = Arc::new(AtomicUsize::new(0));
        lock(&driver.added).push(Box::pin(Countdown(polls.clone(), 3)));
        assert!(driver.poll_all(By::Emitter));
        assert_eq!(polls.load(Ordering::SeqCst), 4);
        assert_eq!(driver.rounds().by_emitters, 1);
        assert!(driver.is_empty());
    }

    /// A future added from outside with nobody polling is polled by the
    /// runtime's drive task.
    #[test]
    fn the_runtime_polls_what_nobody_else_does() {
        let (rt, _core, driver) = driver();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        driver.add(Box::pin(async move {
            let _ = tx.send(());
        }));
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(30), rx)
                .await
                .expect("polled")
                .unwrap();
        });
    }

    /// A panicking future is dropped and counted; the others go on.
    /// A forked child does not poll its parent's futures (their sockets are
    /// the parent's); the parent still does.
    #[test]
    fn a_forked_child_leaves_the_parents_futures_alone() {
        let (_rt, _core, driver) = driver();
        let polls = Arc::new(AtomicUsize::new(0));
        lock(&driver.added).push(Box::pin(Countdown(polls.clone(), 1000)));
        // SAFETY: the child only polls (no allocation on a path that could
        // deadlock: the driver's locks are free) and exits at once.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let polled = driver.poll_all(By::Emitter) || polls.load(Ordering::SeqCst) != 0;
            unsafe { libc::_exit(if polled { 1 } else { 0 }) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status}"
        );
        assert!(driver.poll_all(By::Emitter));
        assert!(polls.load(Ordering::SeqCst) > 0);
    }

    #[test]
    fn a_panic_is_contained_and_counted() {
        let (_rt, core, driver) = driver();
        let polls = Arc::new(AtomicUsize::new(0));
        driver.add(Box::pin(async { panic!("boom") }));
        lock(&driver.added).push(Box::pin(Countdown(polls.clone(), 1)));
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let ran = driver.poll_all(By::Emitter);
        std::panic::set_hook(hook);
        assert!(ran);
        assert_eq!(polls.load(Ordering::SeqCst), 2);
        assert_eq!(core.stats().get("internal_errors"), Some(1));
        assert!(driver.is_empty());
    }
}
