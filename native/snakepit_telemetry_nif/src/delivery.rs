//! The delivery thread: the one place that sends to Elixir.
//!
//! Stream tasks hand it batches over a bounded crossbeam channel. Sending
//! from a thread of our own keeps term building off the tokio workers, and
//! `OwnedEnv::send_and_clear` panics on BEAM scheduler threads anyway. The
//! bound is the Rust hop's share of bounded memory: when Elixir falls behind
//! and the channel is full, batches are dropped and counted, never queued
//! without limit.

use std::sync::Arc;
use std::thread;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use once_cell::sync::Lazy;
use rustler::{Encoder, LocalPid, OwnedEnv};
use snakepit_telemetry_core::decode::Decoded;
use snakepit_telemetry_core::stats::StreamStats;
use snakepit_telemetry_core::stream::Status;

use crate::atoms;
use crate::encode;

/// Batches waiting for the delivery thread, across all streams.
const CAPACITY: usize = 64;

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
    },
}

static QUEUE: Lazy<Sender<Item>> = Lazy::new(|| {
    let (tx, rx) = bounded(CAPACITY);
    thread::Builder::new()
        .name("snakepit-telemetry-deliver".into())
        .spawn(move || run(rx))
        .expect("snakepit_telemetry: cannot start the delivery thread");
    tx
});

/// Queues a status change. Statuses are few and must not be lost, so this
/// waits for room; the delivery thread never blocks, so the wait is short.
pub fn status(pid: LocalPid, stream_id: u64, status: Status) {
    let _ = QUEUE.send(Item::Status {
        pid,
        stream_id,
        status,
    });
}

/// Queues a batch, or drops and counts it when the queue is full.
pub fn events(pid: LocalPid, stream_id: u64, batch: Vec<Decoded>, stats: &Arc<StreamStats>) {
    let item = Item::Events {
        pid,
        stream_id,
        batch,
        stats: stats.clone(),
    };
    if let Err(TrySendError::Full(item) | TrySendError::Disconnected(item)) = QUEUE.try_send(item) {
        if let Item::Events { batch, .. } = item {
            StreamStats::add(&stats.dropped_buffer_full, batch.len() as u64);
        }
    }
}

/// Batches currently queued for delivery.
pub fn queued() -> usize {
    QUEUE.len()
}

fn run(rx: Receiver<Item>) {
    let mut env = OwnedEnv::new();
    for item in rx {
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
            } => {
                let total = batch.len() as u64;
                let mut failed = 0u64;
                let sent = env.send_and_clear(&pid, |env| {
                    let (events, bad) = encode::events(env, &batch);
                    failed = bad;
                    (atoms::snakepit_telemetry_events(), stream_id, events).encode(env)
                });
                StreamStats::add(&stats.dropped_encode, failed);
                match sent {
                    Ok(()) => {
                        StreamStats::add(&stats.delivered, total - failed);
                        StreamStats::add(&stats.batches, 1);
                    }
                    Err(_) => StreamStats::add(&stats.dropped_receiver_down, total - failed),
                }
            }
        }
    }
}
