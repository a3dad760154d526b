//! The stream: a bounded lock-free queue of encoded events, its counters and
//! control state, and the calls that drain it (the logic of
//! `telemetry/stream.py`'s `TelemetryStream`, shared by the grpcio route
//! and the tonic server).
//!
//! Emitters push onto a [`crossbeam_queue::ArrayQueue`] and take no lock on
//! a passthrough control state (enabled, no filter, no sampling). A call's
//! sender sleeps on the flush interval and is woken by an emit only when it
//! sleeps on an empty queue (`idle`), as `stream.py` does.
//!
//! A call is a [`CallCell`] driven by [`Core::step`]: each step returns the
//! next message to send, how long to wait, or that the call ended
//! (superseded by a newer call, closed, or finished). The caller confirms a
//! message once the transport took it ([`Core::confirm`], or implicitly by
//! the next step) and finishes the call when it ends ([`Core::finish`]):
//! unsent events go back to the queue front, and the events of a message
//! handed out but not confirmed are counted as `interrupted_sends`.
//!
//! A server that can send from any thread installs a [`Flush`]: then the
//! emit that finds a batch due (its flush time is within the margin, or the
//! call waits on an empty queue) sends it itself, so that a steady stream
//! costs no thread wake per batch; the call's own timer stays the deadline.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use prost::Message;
use snakepit_telemetry_core::enforce::ControlState;
use snakepit_telemetry_core::proto::TelemetryControl;
use tokio::sync::Notify;

use crate::counters::{add, Counters, PROCESS_ERRORS};
use crate::event::{
    encode_batch, encode_name, event_message, event_message_len, EventWriter, Item,
};

/// Most events in one `StreamTelemetryBatches` message.
pub const MAX_BATCH_EVENTS: usize = 2048;
/// Default bound of one batch's bytes (also kept within max_message_bytes).
pub const MAX_BATCH_BYTES: usize = 1 << 20;
/// A batch this large goes out without waiting for the flush interval.
pub const FLUSH_EVENTS: usize = 256;
/// Upper bound on one wait, a safety net should a wake-up ever be missed.
pub const WAIT_SLICE: Duration = Duration::from_millis(500);
/// Floor for re-checking unchanged counters.
pub const STATS_MIN_POLL: Duration = Duration::from_millis(10);
/// How long a superseded call may keep its events stuck in a send before
/// they are handed back to the queue.
pub const TAKEOVER_GRACE: Duration = Duration::from_secs(1);
pub const STATS_EVENT: [&str; 3] = ["telemetry", "python", "stats"];
/// Counters reported in each stats event, in this order (`stream.py`).
pub const STATS_MEASUREMENTS: [&str; 13] = [
    "emitted",
    "sent",
    "dropped_queue_full",
    "dropped_invalid",
    "dropped_disabled",
    "dropped_sampled",
    "dropped_filtered",
    "dropped_oversized",
    "measurements_dropped",
    "internal_errors",
    "interrupted_sends",
    "queue_len",
    "refused_calls",
];
pub const INSTANCE_ID_KEY: &str = "instance_id";
pub const IMPLEMENTATION_KEY: &str = "implementation";
pub const IMPLEMENTATION: &str = "native";

/// Why an emit was refused (each is a counter).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    Invalid,
    Disabled,
    Filtered,
    Sampled,
    QueueFull,
    InternalError,
}

/// Sends what a call has ready from the calling thread; installed on a
/// [`Core`] by a server that can (see [`Core::install_flush`]).
pub trait Flush: Send + Sync {
    /// Runs the server's calls once on this thread (never blocking: if
    /// another thread is at it, leaves the work to it). False if it could
    /// not run here at all.
    fn flush(&self) -> bool;
}

/// The emit-side trigger of a [`Flush`].
struct InlineFlush {
    flush: Mutex<Option<Weak<dyn Flush>>>,
    /// Wall-clock ns (as [`now_ns`]) from which an emit flushes;
    /// `i64::MAX`: none is due.
    due_ns: AtomicI64,
    /// How long before its flush time a batch may go (ns); 0 without a
    /// flush.
    margin_ns: AtomicU64,
}

/// A stream's settings, validated by the caller.
#[derive(Clone, Debug)]
pub struct Settings {
    pub queue_size: usize,
    pub flush_interval: Duration,
    /// Zero disables stats events.
    pub stats_interval: Duration,
    pub max_message_bytes: usize,
    /// The control state before the first call and at the start of each.
    pub control: ControlState,
    /// Calls must carry this secret; `None`: calls are not checked.
    pub secret: Option<Vec<u8>>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            queue_size: 1024,
            flush_interval: Duration::from_millis(50),
            stats_interval: Duration::from_millis(1000),
            max_message_bytes: 4 * 1024 * 1024,
            control: ControlState::default(),
            secret: None,
        }
    }
}

/// A control state plus what the emit path derives from it.
#[derive(Debug)]
pub struct Control {
    pub state: ControlState,
    pub enabled: bool,
    pub filtering: bool,
    pub sampling: bool,
}

impl Control {
    pub fn new(state: ControlState) -> Control {
        Control {
            enabled: state.enabled(),
            filtering: state.filtering(),
            sampling: state.sampling(),
            state,
        }
    }

    fn passthrough(&self) -> bool {
        self.enabled && !self.filtering && !self.sampling
    }
}

/// What a call does next.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Send this message (a serialized `TelemetryEventBatch` or
    /// `TelemetryEvent`), then confirm it.
    Message(Vec<u8>),
    /// Nothing to send before `until`. `idle`: waiting for events, so an
    /// emit wakes the caller (it must announce itself, see
    /// [`Core::wait_blocking`]). `flush`: the flush time of the events
    /// waiting, if any (a [`Flush`] may send them from the margin before).
    Wait {
        until: Instant,
        idle: bool,
        flush: Option<Instant>,
    },
    /// The call was superseded, closed or finished; it is finished now.
    Ended,
}

#[derive(Debug)]
struct StatsClock {
    interval: Duration,
    last: Option<[u64; 13]>,
    next_due: Instant,
}

impl StatsClock {
    fn enabled(&self) -> bool {
        !self.interval.is_zero()
    }

    fn due(&self, now: Instant) -> bool {
        self.enabled() && now >= self.next_due
    }
}

#[derive(Debug)]
struct Pending {
    /// Events taken from the batch for this message (oversized included).
    consumed: usize,
    /// Events in it.
    encoded: usize,
    stats: bool,
}

#[derive(Debug)]
struct CallState {
    /// Events taken for this call and not handed out yet.
    batch: VecDeque<Item>,
    pending: Option<Pending>,
    clock: StatsClock,
    next_flush: Instant,
    finished: bool,
}

/// One telemetry call (either route).
#[derive(Debug)]
pub struct CallCell {
    pub generation: u64,
    pub batched: bool,
    ended: AtomicBool,
    /// Ended from outside (its server stops): the next step finishes it.
    cancelled: AtomicBool,
    state: Mutex<CallState>,
}

impl CallCell {
    pub fn is_finished(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Default)]
struct Shared {
    generation: u64,
    active: Option<u64>,
    /// Calls not finished yet.
    running: Vec<(u64, Weak<CallCell>)>,
    /// Superseded calls to finish by force once their grace ends.
    stale: Vec<(Instant, Weak<CallCell>)>,
    /// Events handed back by ended calls, sent before the queue's.
    front: VecDeque<Item>,
    /// Events taken by calls and not yet confirmed, dropped or handed back.
    in_flight: usize,
    /// Events that left the queue for good (taken by calls or drained).
    taken: u64,
}

/// Lock a mutex, recovering from poisoning (a panic elsewhere must not
/// stop telemetry).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The stream shared by emitters, calls and the server.
pub struct Core {
    settings: Settings,
    batch_bytes: usize,
    queue: ArrayQueue<Item>,
    /// Callers asleep on an empty queue; emit wakes them only then.
    idle: AtomicUsize,
    /// A full batch ([`FLUSH_EVENTS`]) is queued and its sender was told:
    /// until the sender takes from the queue, emits need not tell it again.
    batch_ready: AtomicBool,
    passthrough: AtomicBool,
    control: RwLock<Arc<Control>>,
    default_control: Arc<Control>,
    pub counters: Counters,
    /// Emits that did not reach the queue.
    refused: AtomicU64,
    shared: Mutex<Shared>,
    cond: Condvar,
    /// Threads waiting on `cond` (changed with `shared` held), so that a
    /// notification with nobody waiting costs no syscall.
    blocked: AtomicUsize,
    notify: Arc<Notify>,
    instance_id: String,
    stats_name: Vec<u8>,
    inline: InlineFlush,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("instance_id", &self.instance_id)
            .field("queue_size", &self.settings.queue_size)
            .finish_non_exhaustive()
    }
}

/// A random id for one stream instance (16 hex digits).
pub fn new_instance_id() -> String {
    let mut bytes = [0u8; 8];
    let from_urandom = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_ok();
    if !from_urandom {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(crate::clock::system_ns() as u128);
        h.write_u32(std::process::id());
        bytes = h.finish().to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Wall-clock nanoseconds since the epoch (see [`crate::clock`]).
#[inline]
pub fn now_ns() -> i64 {
    crate::clock::now_ns()
}

/// A snapshot of `stats()`.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// Every counter, then `enqueued`, `emitted`, `queue_len`, `in_flight`,
    /// `queue_size`, `max_message_bytes`.
    pub counts: Vec<(&'static str, u64)>,
    pub active_stream: bool,
    pub enabled: bool,
}

impl Stats {
    pub fn get(&self, name: &str) -> Option<u64> {
        self.counts
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }
}

impl Core {
    pub fn new(settings: Settings) -> Core {
        let queue_size = settings.queue_size.max(1);
        let default_control = Arc::new(Control::new(settings.control.clone()));
        let batch_bytes = MAX_BATCH_BYTES.min(settings.max_message_bytes);
        Core {
            batch_bytes,
            queue: ArrayQueue::new(queue_size),
            idle: AtomicUsize::new(0),
            batch_ready: AtomicBool::new(false),
            passthrough: AtomicBool::new(default_control.passthrough()),
            control: RwLock::new(default_control.clone()),
            default_control,
            counters: Counters::default(),
            refused: AtomicU64::new(0),
            shared: Mutex::new(Shared::default()),
            cond: Condvar::new(),
            blocked: AtomicUsize::new(0),
            notify: Arc::new(Notify::new()),
            instance_id: new_instance_id(),
            stats_name: encode_name(STATS_EVENT),
            inline: InlineFlush {
                flush: Mutex::new(None),
                due_ns: AtomicI64::new(i64::MAX),
                margin_ns: AtomicU64::new(0),
            },
            settings: Settings {
                queue_size,
                ..settings
            },
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    pub fn queue_size(&self) -> usize {
        self.settings.queue_size
    }

    // ------------------------------------------------------------ emit path

    /// Whether an event may skip every decision (enabled, no filter, no
    /// sampling): one atomic load.
    #[inline]
    pub fn passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// Whether the queue is full right now (a pre-check that saves the
    /// conversion of an event that cannot be queued).
    #[inline]
    pub fn is_full(&self) -> bool {
        self.queue.is_full()
    }

    /// Queues an encoded event, or counts it as `dropped_queue_full`.
    #[inline]
    pub fn push(&self, item: Item) {
        let timestamp_ns = item.timestamp_ns;
        if self.queue.push(item).is_err() {
            self.refuse(Reason::QueueFull);
            return;
        }
        // A sender that announced its sleep before this push sees the event
        // when it re-checks; one that announces later finds it queued.
        let idle = self.idle.load(Ordering::SeqCst) != 0;
        // A full batch goes without waiting for the flush time: the push that
        // fills it tells the sender, once per batch.
        let full = !self.batch_ready.load(Ordering::Relaxed)
            && self.queue.len() >= FLUSH_EVENTS
            && !self.batch_ready.swap(true, Ordering::AcqRel);
        if idle || full || timestamp_ns >= self.inline.due_ns.load(Ordering::Relaxed) {
            // Sending here saves the wake of a sleeping sender; a sender the
            // flush did not reach (another route's) is still woken.
            if self.flush_inline() && self.idle.load(Ordering::SeqCst) == 0 {
                return;
            }
            if idle || full {
                self.wake();
            }
        }
    }

    /// Runs the installed [`Flush`] on this thread; false without one.
    fn flush_inline(&self) -> bool {
        let flush = {
            let slot = lock(&self.inline.flush);
            match slot.as_ref().and_then(Weak::upgrade) {
                Some(flush) => flush,
                None => return false,
            }
        };
        // Telemetry never raises into the emitter.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| flush.flush())) {
            Ok(ran) => ran,
            Err(_) => {
                add(&self.counters.internal_errors, 1);
                false
            }
        }
    }

    /// Lets emits send due batches through `flush`, up to `margin` before
    /// their flush time (see [`Flush`]).
    pub fn install_flush(&self, flush: Weak<dyn Flush>, margin: Duration) {
        *lock(&self.inline.flush) = Some(flush);
        self.inline.margin_ns.store(
            u64::try_from(margin.as_nanos()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }

    /// Removes `flush` if it is the one installed.
    pub fn remove_flush(&self, flush: &Weak<dyn Flush>) {
        let mut slot = lock(&self.inline.flush);
        if slot.as_ref().is_some_and(|f| Weak::ptr_eq(f, flush)) {
            *slot = None;
            self.inline.margin_ns.store(0, Ordering::SeqCst);
            self.inline.due_ns.store(i64::MAX, Ordering::SeqCst);
        }
    }

    /// How long before its flush time a batch may go.
    pub fn flush_margin(&self) -> Duration {
        Duration::from_nanos(self.inline.margin_ns.load(Ordering::Relaxed))
    }

    /// Sets when emits should flush: at `flush` (a waiting call's flush
    /// time, [`Step::Wait`]) less the margin; never for `None` (an idle wait
    /// is seen by `push` itself; a call mid-send is run by its server).
    pub fn set_flush_due(&self, flush: Option<Instant>) {
        let due = match flush {
            Some(until) if self.inline.margin_ns.load(Ordering::Relaxed) != 0 => {
                let left = until
                    .saturating_duration_since(Instant::now())
                    .saturating_sub(self.flush_margin());
                now_ns().saturating_add(i64::try_from(left.as_nanos()).unwrap_or(i64::MAX))
            }
            _ => i64::MAX,
        };
        self.inline.due_ns.store(due, Ordering::Relaxed);
    }

    /// Counts an emit that did not reach the queue.
    pub fn refuse(&self, reason: Reason) {
        self.refused.fetch_add(1, Ordering::SeqCst);
        let c = &self.counters;
        let counter = match reason {
            Reason::Invalid => &c.dropped_invalid,
            Reason::Disabled => &c.dropped_disabled,
            Reason::Filtered => &c.dropped_filtered,
            Reason::Sampled => &c.dropped_sampled,
            Reason::QueueFull => &c.dropped_queue_full,
            Reason::InternalError => &c.internal_errors,
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }

    /// Adds `amount` to the counter called `name`; false if there is none.
    pub fn count(&self, name: &str, amount: u64) -> bool {
        match self.counters.by_name(name) {
            Some(counter) => {
                add(counter, amount);
                true
            }
            None => false,
        }
    }

    /// The control state in force.
    pub fn control(&self) -> Arc<Control> {
        self.control
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Toggle, filter and sampling decision for a valid dotted `name`, in
    /// `stream.py`'s order. `sampled`: a decision taken earlier (spans).
    pub fn decide(&self, name: &str, sampled: Option<bool>) -> Result<(), Reason> {
        let control = self.control();
        if !control.enabled {
            return Err(Reason::Disabled);
        }
        if control.filtering && !control.state.allowed(name) {
            return Err(Reason::Filtered);
        }
        match sampled {
            None => {
                if control.sampling {
                    let rate = control.state.rate_for(name);
                    if rate < 1.0 && fastrand::f64() >= rate {
                        return Err(Reason::Sampled);
                    }
                }
                Ok(())
            }
            Some(true) => Ok(()),
            Some(false) => Err(Reason::Sampled),
        }
    }

    /// A sampling decision for `name` (as `TelemetryStream.sample`).
    pub fn sample(&self, name: &str) -> bool {
        let control = self.control();
        if !control.sampling {
            return true;
        }
        let rate = control.state.rate_for(name);
        rate >= 1.0 || fastrand::f64() < rate
    }

    /// The rate in force for `name` (1.0 when not sampling).
    pub fn sample_rate(&self, name: &str) -> f64 {
        let control = self.control();
        if control.sampling {
            control.state.rate_for(name)
        } else {
            1.0
        }
    }

    fn set_control(&self, control: Arc<Control>) {
        let passthrough = control.passthrough();
        *self.control.write().unwrap_or_else(|e| e.into_inner()) = control;
        self.passthrough.store(passthrough, Ordering::SeqCst);
    }

    /// Wakes the threads blocked on `cond`; the caller holds `shared`.
    #[inline]
    fn notify_blocked(&self) {
        if self.blocked.load(Ordering::SeqCst) != 0 {
            self.cond.notify_all();
        }
    }

    /// Wakes every caller waiting on this stream.
    pub fn wake(&self) {
        {
            let _shared = lock(&self.shared);
            self.notify_blocked();
        }
        self.notify.notify_waiters();
    }

    // ---------------------------------------------------------- control path

    /// Applies one serialized `TelemetryControl`; malformed or empty ones
    /// are counted as `internal_errors`. With `generation`, only while that
    /// call is the newest.
    pub fn apply_control(&self, data: &[u8], generation: Option<u64>) -> bool {
        let Ok(control) = TelemetryControl::decode(data) else {
            add(&self.counters.internal_errors, 1);
            return false;
        };
        let shared = lock(&self.shared);
        if generation.is_some_and(|g| g != shared.generation) {
            return false;
        }
        let mut state = self.control().state.clone();
        let Some(truncated) = state.apply_counting(&control) else {
            drop(shared);
            add(&self.counters.internal_errors, 1);
            return false;
        };
        self.set_control(Arc::new(Control::new(state)));
        add(&self.counters.controls_applied, 1);
        add(&self.counters.controls_truncated, truncated as u64);
        drop(shared);
        true
    }

    /// Whether `generation` is still the newest call.
    pub fn is_current(&self, generation: u64) -> bool {
        lock(&self.shared).generation == generation
    }

    // ------------------------------------------------------------ inspection

    fn queue_len_locked(&self, shared: &Shared) -> usize {
        shared.front.len() + self.queue.len()
    }

    pub fn stats(&self) -> Stats {
        let shared = lock(&self.shared);
        let mut counts = self.counters.snapshot();
        let queue_len = self.queue_len_locked(&shared) as u64;
        let enqueued = shared.taken + queue_len;
        counts.push(("enqueued", enqueued));
        counts.push(("emitted", enqueued + self.refused.load(Ordering::SeqCst)));
        counts.push(("queue_len", queue_len));
        counts.push(("in_flight", shared.in_flight as u64));
        counts.push(("queue_size", self.settings.queue_size as u64));
        counts.push(("max_message_bytes", self.settings.max_message_bytes as u64));
        Stats {
            counts,
            active_stream: shared.active.is_some(),
            enabled: self.control().enabled,
        }
    }

    /// The stats event's values, in [`STATS_MEASUREMENTS`] order.
    fn stats_values_locked(&self, shared: &Shared) -> [u64; 13] {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
        let queue_len = self.queue_len_locked(shared) as u64;
        let emitted = shared.taken + queue_len + self.refused.load(Ordering::SeqCst);
        [
            emitted,
            get(&c.sent),
            get(&c.dropped_queue_full),
            get(&c.dropped_invalid),
            get(&c.dropped_disabled),
            get(&c.dropped_sampled),
            get(&c.dropped_filtered),
            get(&c.dropped_oversized),
            get(&c.measurements_dropped),
            get(&c.internal_errors) + PROCESS_ERRORS.load(Ordering::SeqCst),
            get(&c.interrupted_sends),
            queue_len,
            get(&c.refused_calls),
        ]
    }

    /// Waits until every queued event was handed to a transport.
    pub fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut shared = lock(&self.shared);
        while self.queue_len_locked(&shared) > 0 || shared.in_flight > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let wait = (deadline - now).min(WAIT_SLICE);
            self.blocked.fetch_add(1, Ordering::SeqCst);
            shared = self
                .cond
                .wait_timeout(shared, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            self.blocked.fetch_sub(1, Ordering::SeqCst);
        }
        true
    }

    /// Takes everything queued (tests, other transports).
    pub fn drain_queued(&self) -> Vec<Item> {
        let mut shared = lock(&self.shared);
        self.batch_ready.store(false, Ordering::Release);
        let mut out: Vec<Item> = shared.front.drain(..).collect();
        let n = self.queue.len();
        for _ in 0..n {
            match self.queue.pop() {
                Some(item) => out.push(item),
                None => break,
            }
        }
        shared.taken += out.len() as u64;
        out
    }

    /// Serialized messages of the drained events (as `StreamTelemetry`).
    pub fn drain_messages(&self) -> Vec<Vec<u8>> {
        self.drain_queued().iter().map(event_message).collect()
    }

    /// Ends the active call.
    pub fn close(&self) {
        {
            let mut shared = lock(&self.shared);
            shared.generation += 1;
            shared.active = None;
            self.notify_blocked();
        }
        self.notify.notify_waiters();
    }

    // ------------------------------------------------------------- call path

    /// Opens a call; it takes over from any previous one, which ends at its
    /// next step (or is finished by force after [`TAKEOVER_GRACE`]).
    pub fn open_call(&self, batched: bool) -> Arc<CallCell> {
        let now = Instant::now();
        let mut shared = lock(&self.shared);
        shared.generation += 1;
        let generation = shared.generation;
        shared.active = Some(generation);
        let cell = Arc::new(CallCell {
            generation,
            batched,
            ended: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
            state: Mutex::new(CallState {
                batch: VecDeque::new(),
                pending: None,
                clock: StatsClock {
                    interval: self.settings.stats_interval,
                    last: None,
                    next_due: now,
                },
                next_flush: now,
                finished: false,
            }),
        });
        let running = std::mem::take(&mut shared.running);
        for (g, weak) in running {
            if weak.strong_count() > 0 {
                shared.stale.push((now + TAKEOVER_GRACE, weak.clone()));
                shared.running.push((g, weak));
            }
        }
        shared.running.push((generation, Arc::downgrade(&cell)));
        add(&self.counters.streams_opened, 1);
        // Elixir re-sends its whole state on each call: start clean.
        self.set_control(self.default_control.clone());
        self.notify_blocked();
        drop(shared);
        self.notify.notify_waiters();
        cell
    }

    /// Finishes superseded calls whose grace ran out.
    fn reap_stale(&self, now: Instant) -> Option<Instant> {
        let (due, next) = {
            let mut shared = lock(&self.shared);
            if shared.stale.is_empty() {
                return None;
            }
            let mut due = Vec::new();
            shared.stale.retain(|(deadline, weak)| {
                if weak.strong_count() == 0 {
                    return false;
                }
                if *deadline <= now {
                    due.push(weak.clone());
                    return false;
                }
                true
            });
            let next = shared.stale.iter().map(|(d, _)| *d).min();
            (due, next)
        };
        for weak in due {
            if let Some(cell) = weak.upgrade() {
                self.finish(&cell);
            }
        }
        next
    }

    /// The next thing `cell` should do (see [`Step`]). Confirms the message
    /// of the previous step if it was not confirmed yet.
    pub fn step(&self, cell: &CallCell) -> Step {
        let now = Instant::now();
        // A batch may go this early (an emit that found it due).
        let flush_at = now + self.flush_margin();
        let stale_due = self.reap_stale(now);
        let mut st = lock(&cell.state);
        if st.finished {
            return Step::Ended;
        }
        if st.pending.is_some() {
            self.confirm_locked(cell, &mut st);
        }
        loop {
            let mut shared = lock(&self.shared);
            if shared.generation != cell.generation || cell.cancelled.load(Ordering::SeqCst) {
                drop(shared);
                self.finish_locked(cell, &mut st);
                return Step::Ended;
            }
            if st.batch.is_empty() {
                let queued = self.queue_len_locked(&shared);
                if queued == 0 {
                    if !st.clock.due(now) {
                        let mut until = now + WAIT_SLICE;
                        if st.clock.enabled() {
                            until = until.min(st.clock.next_due);
                        }
                        if let Some(d) = stale_due {
                            until = until.min(d);
                        }
                        // Within the flush interval an event would wait for
                        // its end anyway: sleep until then without asking
                        // emitters for a wake-up (one wake per batch, not two).
                        if cell.batched && st.next_flush > flush_at {
                            return Step::Wait {
                                until: until.min(st.next_flush),
                                idle: false,
                                flush: Some(st.next_flush),
                            };
                        }
                        return Step::Wait {
                            until,
                            idle: true,
                            flush: None,
                        };
                    }
                } else if cell.batched
                    && queued < FLUSH_EVENTS
                    && st.next_flush > flush_at
                    && !st.clock.due(now)
                {
                    // Until the flush time, or the stats time if sooner (the
                    // report and the batch then go together).
                    let mut until = st.next_flush;
                    if st.clock.enabled() {
                        until = until.min(st.clock.next_due);
                    }
                    if let Some(d) = stale_due {
                        until = until.min(d);
                    }
                    return Step::Wait {
                        until,
                        idle: false,
                        flush: Some(st.next_flush),
                    };
                }
                let report = self.stats_report_locked(&mut st.clock, cell.batched, now, &shared);
                self.take_locked(&mut shared, &mut st.batch);
                drop(shared);
                if let Some(report) = report {
                    st.pending = Some(Pending {
                        consumed: 0,
                        encoded: 0,
                        stats: true,
                    });
                    return Step::Message(report);
                }
                if st.batch.is_empty() {
                    // A stats check found nothing changed: wait again.
                    continue;
                }
                shared = lock(&self.shared);
            }
            if st.clock.due(now) {
                if let Some(report) =
                    self.stats_report_locked(&mut st.clock, cell.batched, now, &shared)
                {
                    st.pending = Some(Pending {
                        consumed: 0,
                        encoded: 0,
                        stats: true,
                    });
                    return Step::Message(report);
                }
            }
            drop(shared);
            let (message, consumed, encoded) = if cell.batched {
                let batch = encode_batch(&mut st.batch, self.batch_bytes, MAX_BATCH_EVENTS);
                add(&self.counters.dropped_oversized, batch.oversized as u64);
                (batch.payload, batch.consumed, batch.encoded)
            } else {
                let item = st.batch.pop_front().expect("batch not empty");
                if event_message_len(&item) > self.settings.max_message_bytes {
                    add(&self.counters.dropped_oversized, 1);
                    (Vec::new(), 1, 0)
                } else {
                    (event_message(&item), 1, 1)
                }
            };
            if encoded > 0 {
                st.pending = Some(Pending {
                    consumed,
                    encoded,
                    stats: false,
                });
                return Step::Message(message);
            }
            let mut shared = lock(&self.shared);
            shared.in_flight = shared.in_flight.saturating_sub(consumed);
            if shared.in_flight == 0 {
                self.notify_blocked();
            }
        }
    }

    /// Moves everything queued into `batch`; caller holds the lock.
    fn take_locked(&self, shared: &mut Shared, batch: &mut VecDeque<Item>) {
        self.batch_ready.store(false, Ordering::Release);
        let before = batch.len();
        batch.extend(shared.front.drain(..));
        let n = self.queue.len();
        for _ in 0..n {
            match self.queue.pop() {
                Some(item) => batch.push_back(item),
                None => break,
            }
        }
        let taken = batch.len() - before;
        shared.taken += taken as u64;
        shared.in_flight += taken;
    }

    /// A stats event if one is due and a counter changed.
    fn stats_report_locked(
        &self,
        clock: &mut StatsClock,
        batched: bool,
        now: Instant,
        shared: &Shared,
    ) -> Option<Vec<u8>> {
        if !clock.due(now) {
            return None;
        }
        let values = self.stats_values_locked(shared);
        if clock.last == Some(values) {
            clock.next_due = now + STATS_MIN_POLL.max(WAIT_SLICE.min(clock.interval));
            return None;
        }
        clock.last = Some(values);
        clock.next_due = now + clock.interval;
        add(&self.counters.stats_reports, 1);
        Some(self.stats_message(&values, batched))
    }

    fn stats_message(&self, values: &[u64; 13], batched: bool) -> Vec<u8> {
        let mut w = EventWriter::new(&self.stats_name, 512);
        for (key, value) in STATS_MEASUREMENTS.iter().zip(values) {
            w.measurement_int(key, (*value).min(i64::MAX as u64) as i64);
        }
        w.metadata(INSTANCE_ID_KEY, &self.instance_id);
        w.metadata(IMPLEMENTATION_KEY, IMPLEMENTATION);
        let item = w.finish(now_ns());
        if batched {
            let mut one = VecDeque::from([item]);
            encode_batch(&mut one, usize::MAX, 1).payload
        } else {
            event_message(&item)
        }
    }

    fn confirm_locked(&self, cell: &CallCell, st: &mut CallState) {
        let Some(pending) = st.pending.take() else {
            return;
        };
        if pending.stats {
            return;
        }
        st.next_flush = Instant::now() + self.settings.flush_interval;
        add(&self.counters.sent, pending.encoded as u64);
        if cell.batched {
            add(&self.counters.batches_sent, 1);
        }
        let mut shared = lock(&self.shared);
        shared.in_flight = shared.in_flight.saturating_sub(pending.consumed);
        if shared.in_flight == 0 {
            self.notify_blocked();
        }
    }

    /// Ends `cell`'s call from outside: its next step finishes it (the
    /// message in a send, if any, counts as sent once it asks again).
    pub fn cancel(&self, cell: &CallCell) {
        cell.cancelled.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// The message of the last step was taken by the transport.
    pub fn confirm(&self, cell: &CallCell) {
        let mut st = lock(&cell.state);
        self.confirm_locked(cell, &mut st);
    }

    /// The call ended: unsent events go back to the queue front; those of
    /// a message not confirmed are counted as `interrupted_sends`.
    /// Idempotent.
    pub fn finish(&self, cell: &CallCell) {
        let mut st = lock(&cell.state);
        self.finish_locked(cell, &mut st);
    }

    fn finish_locked(&self, cell: &CallCell, st: &mut CallState) {
        if st.finished {
            return;
        }
        st.finished = true;
        cell.ended.store(true, Ordering::SeqCst);
        let unsent = std::mem::take(&mut st.batch);
        let pending = st.pending.take();
        {
            let mut shared = lock(&self.shared);
            if let Some(p) = pending {
                add(&self.counters.interrupted_sends, p.encoded as u64);
                shared.in_flight = shared.in_flight.saturating_sub(p.consumed);
            }
            shared.in_flight = shared.in_flight.saturating_sub(unsent.len());
            shared.taken = shared.taken.saturating_sub(unsent.len() as u64);
            for item in unsent.into_iter().rev() {
                shared.front.push_front(item);
            }
            if shared.active == Some(cell.generation) {
                shared.active = None;
            }
            shared
                .running
                .retain(|(g, w)| *g != cell.generation && w.strong_count() > 0);
            self.notify_blocked();
        }
        self.notify.notify_waiters();
    }

    /// Whether a caller waiting for `cell` should look again now.
    fn should_wake(&self, shared: &Shared, cell: &CallCell, idle: bool) -> bool {
        shared.generation != cell.generation
            || cell.is_finished()
            || cell.cancelled.load(Ordering::SeqCst)
            || (idle && self.queue_len_locked(shared) > 0)
            // A full batch does not wait for the flush time (its wake may
            // have come before this waiter was counted).
            || (cell.batched && self.queue_len_locked(shared) >= FLUSH_EVENTS)
    }

    /// Blocks until `until`, a wake-up, a takeover or the end of the call.
    pub fn wait_blocking(&self, cell: &CallCell, until: Instant, idle: bool) {
        let shared = lock(&self.shared);
        if idle {
            self.idle.fetch_add(1, Ordering::SeqCst);
        }
        if !self.should_wake(&shared, cell, idle) {
            let timeout = until.saturating_duration_since(Instant::now());
            if !timeout.is_zero() {
                self.blocked.fetch_add(1, Ordering::SeqCst);
                let _ = self.cond.wait_timeout(shared, timeout);
                self.blocked.fetch_sub(1, Ordering::SeqCst);
            }
        }
        if idle {
            self.idle.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// For async waiters: the notification to wait on (registered before
    /// they check [`Core::announce_async`]).
    pub fn notify(&self) -> Arc<Notify> {
        self.notify.clone()
    }

    /// Announces an async waiter (after it enabled its notification);
    /// returns false if it should look again at once instead of waiting.
    /// An idle waiter must call [`Core::leave_idle`] once woken.
    pub fn announce_async(&self, cell: &CallCell, idle: bool) -> bool {
        let shared = lock(&self.shared);
        if idle {
            self.idle.fetch_add(1, Ordering::SeqCst);
        }
        !self.should_wake(&shared, cell, idle)
    }

    /// Callers asleep on an empty queue right now.
    pub fn idle_waiters(&self) -> usize {
        self.idle.load(Ordering::SeqCst)
    }

    pub fn leave_idle(&self) {
        self.idle.fetch_sub(1, Ordering::SeqCst);
    }

    /// Whether `cell`'s call may still send (not superseded, not finished).
    pub fn call_alive(&self, cell: &CallCell) -> bool {
        !cell.is_finished() && self.is_current(cell.generation)
    }
}

/// Adds to the process-wide count of failures outside any stream.
pub fn count_process_errors(amount: u64) {
    add(&PROCESS_ERRORS, amount);
}

pub fn process_errors() -> u64 {
    PROCESS_ERRORS.load(Ordering::SeqCst)
}

pub fn reset_process_errors() {
    PROCESS_ERRORS.store(0, Ordering::SeqCst);
}

/// In a forked child: random numbers must not repeat the parent's, and the
/// clock must not wait for a parent's thread.
pub fn reseed_after_fork() {
    crate::clock::after_fork();
    let id = new_instance_id();
    fastrand::seed(u64::from_str_radix(&id, 16).unwrap_or(0) ^ u64::from(std::process::id()));
}
