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
//! owner (queue full, encoding failed, owner gone) have their credit released
//! here, since the owner will never acknowledge them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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

pub enum Item {
    Status {
        pid: LocalPid,
        stream_id: u64,
        status: Status,
    },
    Events {
        pid: LocalPid,
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
    pid: LocalPid,
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
        pid,
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
            pid,
            stream_id,
            batch,
            stats,
            credit,
        } => {
            QUEUED_EVENTS.fetch_sub(batch.len(), Ordering::AcqRel);
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
                Ok(()) => {
                    StreamStats::add(&stats.delivered, total - failed);
                    StreamStats::add(&stats.batches, 1);
                    failed
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
