//! The delivery thread: the one place that sends to Elixir.
//!
//! Stream tasks hand it batches over a crossbeam channel. Sending from a
//! thread of our own keeps term building off the tokio workers, and
//! `OwnedEnv::send_and_clear` panics on BEAM scheduler threads anyway.
//!
//! The queue is bounded in events, not batches (a slow producer makes
//! one-event batches, so a bound in batches would hold almost nothing): when
//! more than [`MAX_QUEUED_EVENTS`] wait, new batches are dropped and counted,
//! never queued without limit. Batches of one stream that wait together are
//! merged into one message, so a busy BEAM receives fewer, larger messages.
//!
//! Every batch carries its stream's [`Credit`]: events that do not reach the
//! receiver (queue full, encoding failed, receiver gone) have their credit
//! released here, since nobody will ever acknowledge them.
//!
//! Events go to the stream's [`Route`]: the process that executes them (the
//! worker's delivery process in Elixir), which its owner may replace when it
//! dies ([`Route::redirect`]). The route counts what its receiver holds
//! unacknowledged, so the events a dead receiver took with it are counted
//! too, never lost silently.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Instant;

use crossbeam_channel::{unbounded, Receiver, Sender};
use once_cell::sync::Lazy;
use rustler::{Encoder, LocalPid, OwnedEnv};
use snakepit_telemetry_core::credit::Credit;
use snakepit_telemetry_core::decode::Decoded;
use snakepit_telemetry_core::stats::StreamStats;
use snakepit_telemetry_core::stream::Status;

use crate::atoms;
use crate::encode;

/// Events waiting for the delivery thread, across all streams, at most.
pub const MAX_QUEUED_EVENTS: usize = 65_536;

/// Largest merged message, in events.
const MAX_MESSAGE_EVENTS: usize = 4_096;

static QUEUED_EVENTS: AtomicUsize = AtomicUsize::new(0);

/// Where a stream's events go, and how many its receiver holds
/// unacknowledged.
pub struct Route {
    state: Mutex<RouteState>,
}

struct RouteState {
    pid: LocalPid,
    /// Bumped by every redirect: a send to an older receiver finished after
    /// the redirect went to a process that is gone.
    generation: u64,
    /// Events sent to the current receiver and not yet acknowledged.
    unacked: usize,
}

impl Route {
    pub fn new(pid: LocalPid) -> Self {
        Route {
            state: Mutex::new(RouteState {
                pid,
                generation: 0,
                unacked: 0,
            }),
        }
    }

    // Every critical section is a few loads and stores (nothing is encoded
    // or sent under the lock), so `stream_ack` never waits long on a
    // scheduler. A panic cannot happen inside one; recover anyway.
    fn lock(&self) -> MutexGuard<'_, RouteState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn current(&self) -> (LocalPid, u64) {
        let state = self.lock();
        (state.pid, state.generation)
    }

    /// Records `n` events sent to the receiver of `generation` as delivered.
    /// `false` when the route was redirected meanwhile: that receiver is
    /// gone, and the events with it. (Under the lock, so a redirect sees
    /// `delivered` and `unacked` agree.)
    fn sent(&self, generation: u64, n: usize, stats: &StreamStats) -> bool {
        let mut state = self.lock();
        if state.generation != generation {
            return false;
        }
        state.unacked += n;
        StreamStats::add(&stats.delivered, n as u64);
        true
    }

    /// The receiver has handled `n` events (never below zero).
    pub fn ack(&self, n: usize) {
        let mut state = self.lock();
        state.unacked = state.unacked.saturating_sub(n);
    }

    /// Sends the stream's next events to `pid`, and returns how many events
    /// the previous receiver held unacknowledged. Called once it died: those
    /// events move from `delivered` to `dropped_receiver_down`.
    pub fn redirect(&self, pid: LocalPid, stats: &StreamStats) -> usize {
        let mut state = self.lock();
        state.pid = pid;
        state.generation += 1;
        let lost = std::mem::take(&mut state.unacked);
        let lost64 = lost as u64;
        let _ = stats
            .delivered
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                Some(d.saturating_sub(lost64))
            });
        StreamStats::add(&stats.dropped_receiver_down, lost64);
        lost
    }
}

pub enum Item {
    Status {
        pid: LocalPid,
        stream_id: u64,
        status: Status,
    },
    Events {
        route: Arc<Route>,
        stream_id: u64,
        batch: Vec<Decoded>,
        stats: Arc<StreamStats>,
        credit: Arc<Credit>,
    },
}

static QUEUE: Lazy<Sender<Item>> = Lazy::new(|| {
    let (tx, rx) = unbounded();
    thread::Builder::new()
        .name("snakepit-telemetry-deliver".into())
        .spawn(move || run(rx))
        .expect("snakepit_telemetry: cannot start the delivery thread");
    tx
});

/// Queues a status change. Statuses are few (a handful per connection) and
/// must not be lost, so they are not subject to the event bound.
pub fn status(pid: LocalPid, stream_id: u64, status: Status) {
    let _ = QUEUE.send(Item::Status {
        pid,
        stream_id,
        status,
    });
}

/// Queues a batch, or drops and counts it (and releases its credit) when
/// the queue is full.
pub fn events(
    route: &Arc<Route>,
    stream_id: u64,
    batch: Vec<Decoded>,
    stats: &Arc<StreamStats>,
    credit: &Arc<Credit>,
) {
    let n = batch.len();
    if QUEUED_EVENTS.fetch_add(n, Ordering::AcqRel) + n > MAX_QUEUED_EVENTS {
        QUEUED_EVENTS.fetch_sub(n, Ordering::AcqRel);
        StreamStats::add(&stats.dropped_buffer_full, n as u64);
        credit.release(n);
        return;
    }
    let item = Item::Events {
        route: route.clone(),
        stream_id,
        batch,
        stats: stats.clone(),
        credit: credit.clone(),
    };
    if QUEUE.send(item).is_err() {
        // Only if the delivery thread is gone, which it never is by design.
        QUEUED_EVENTS.fetch_sub(n, Ordering::AcqRel);
        StreamStats::add(&stats.dropped_buffer_full, n as u64);
        credit.release(n);
    }
}

/// Events currently queued for delivery.
pub fn queued() -> usize {
    QUEUED_EVENTS.load(Ordering::Acquire)
}

/// Takes every item waiting right now, merging consecutive batches of the
/// same stream (statuses keep their place, so order per stream holds).
fn take_ready(first: Item, rx: &Receiver<Item>) -> Vec<Item> {
    let mut items = vec![first];
    while let Ok(next) = rx.try_recv() {
        if let (
            Some(Item::Events {
                stats: last, batch, ..
            }),
            Item::Events {
                stats, batch: more, ..
            },
        ) = (items.last_mut(), &next)
        {
            // The same stream: its stats (like its credit) are its own; a
            // stream id alone may be reused by another owner.
            if Arc::ptr_eq(last, stats) && batch.len() + more.len() <= MAX_MESSAGE_EVENTS {
                if let Item::Events { batch: more, .. } = next {
                    batch.extend(more);
                }
                continue;
            }
        }
        items.push(next);
        if items.len() >= 1_024 {
            break;
        }
    }
    items
}

fn run(rx: Receiver<Item>) {
    let mut env = OwnedEnv::new();
    while let Ok(first) = rx.recv() {
        for item in take_ready(first, &rx) {
            deliver(&mut env, item);
        }
    }
}

fn deliver(env: &mut OwnedEnv, item: Item) {
    match item {
        Item::Status {
            pid,
            stream_id,
            status,
        } => {
            // The receiver may be gone; a status nobody hears needs no count.
            let _ = env.send_and_clear(&pid, |env| {
                (
                    atoms::snakepit_telemetry(),
                    stream_id,
                    encode::status(env, &status),
                )
                    .encode(env)
            });
        }
        Item::Events {
            route,
            stream_id,
            batch,
            stats,
            credit,
        } => {
            QUEUED_EVENTS.fetch_sub(batch.len(), Ordering::AcqRel);
            let (pid, generation) = route.current();
            let total = batch.len() as u64;
            let mut failed = 0u64;
            let started = Instant::now();
            let sent = env.send_and_clear(&pid, |env| {
                let (events, bad) = encode::events(env, &batch);
                failed = bad;
                (atoms::snakepit_telemetry_events(), stream_id, events).encode(env)
            });
            let elapsed = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            StreamStats::add(&stats.deliver_ns, elapsed);
            StreamStats::add(&stats.dropped_encode, failed);
            // Only what reached the owner stays pending until its ack.
            let lost = match sent {
                Ok(()) if route.sent(generation, (total - failed) as usize, &stats) => {
                    StreamStats::add(&stats.batches, 1);
                    failed
                }
                // Received by a process that has been replaced since: it
                // died with them.
                Ok(()) => {
                    StreamStats::add(&stats.dropped_receiver_down, total - failed);
                    total
                }
                Err(_) => {
                    StreamStats::add(&stats.dropped_receiver_down, total - failed);
                    total
                }
            };
            credit.release(lost as usize);
        }
    }
}
