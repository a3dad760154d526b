//! Per-stream counters. Every event that enters a stream is accounted for:
//! `received == delivered + dropped_* + enforced_*` once the stream has gone
//! quiet (or closed). Events a stream holds back while its owner is busy count once
//! they are handed on: when the owner has acknowledged everything before
//! them, when they fill a batch or the credit, or when the stream closes.
//! Whole messages whose events cannot be known (`malformed_messages`,
//! `oversized_messages`) are counted as messages, outside that equation.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($field:ident: $doc:literal,)*) => {
        /// Counters for one telemetry stream, shared by its task, its
        /// delivery path and the handle Elixir holds.
        #[derive(Debug, Default)]
        pub struct StreamStats {
            $(#[doc = $doc] pub $field: AtomicU64,)*
        }

        impl StreamStats {
            /// Names of the counters, in [`StreamStats::snapshot`] order.
            pub const NAMES: &'static [&'static str] = &[$(stringify!($field),)*];

            /// A consistent-enough copy of every counter (each read is atomic;
            /// the set is not read under a lock).
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    received: "Events read off the gRPC stream.",
    delivered: "Events sent to the Elixir process.",
    dropped_unknown_event: "Events whose name is not in the catalog.",
    dropped_malformed: "Events with no name, too many name parts or oversized parts, or that did not decode (invalid UTF-8 in a string, a bad wire type, truncated); a bad event in a batch is dropped alone.",
    dropped_buffer_full: "Events dropped because the delivery buffer to Elixir was full.",
    dropped_receiver_down: "Events dropped because the Elixir process was gone.",
    dropped_encode: "Events the NIF could not turn into terms.",
    dropped_measurements: "Measurement values dropped: NaN, infinities, non-numbers, empty values, over the limit.",
    dropped_metadata: "Metadata entries dropped: over the entry limit or with an oversized key.",
    truncated_metadata: "Metadata values cut to the size limit (also traceback frames over the limit, once per event, and frame strings cut).",
    reserved_keys_dropped: "Metadata keys that Elixir sets (node, pool_name, worker_id, telemetry_span_context, emit_time, kind, reason, stacktrace) and the measurement monotonic_time, dropped from Python events (the key, not the event).",
    batches: "Batches sent to the Elixir process.",
    controls_sent: "Control messages handed to the gRPC stream.",
    connect_attempts: "Connection attempts, including the first.",
    wire_messages: "gRPC messages read off the stream (one event each, or one batch of events).",
    fallbacks: "Connections that fell back to StreamTelemetry because the worker does not implement StreamTelemetryBatches.",
    credit_waits: "Times the stream stopped reading because the owner had max_pending_events events unacknowledged.",
    deliver_ns: "Nanoseconds spent turning this stream's events into terms and sending them (over delivered: the cost per event).",
    malformed_messages: "Batch messages that could not be parsed at all (garbage, truncated): skipped, their events unknown; the stream carries on.",
    oversized_messages: "Messages refused for being over max_message_bytes (the call ends and the owner reconnects).",
    oversized_bytes_max: "The largest refused message seen, in bytes (a high-water mark, not a count).",
    open_timeouts: "Open attempts (connect, HTTP/2 handshake, response headers of the telemetry call) that did not finish within the open timeout.",
    keepalive_timeouts: "Open streams closed because an HTTP/2 PING was not answered within the keepalive timeout.",
    enforced_disabled: "Events of a StreamTelemetry (one event per message) worker dropped by the stream because telemetry is toggled off (see crate::enforce).",
    enforced_filtered: "Events of a StreamTelemetry worker dropped by the stream because the allow/deny filter refuses them.",
    enforced_sampled: "Events of a StreamTelemetry worker sampled out by the stream (per-pattern rates, spans whole).",
}

impl StreamStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Raises a high-water mark to `n`.
    pub fn max(counter: &AtomicU64, n: u64) {
        counter.fetch_max(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_lists_every_counter_in_order() {
        let stats = StreamStats::default();
        StreamStats::add(&stats.received, 3);
        StreamStats::add(&stats.dropped_unknown_event, 1);
        let snap = stats.snapshot();
        let names: Vec<_> = snap.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, StreamStats::NAMES);
        assert_eq!(snap[0], ("received", 3));
        assert!(snap.contains(&("dropped_unknown_event", 1)));
    }
}
