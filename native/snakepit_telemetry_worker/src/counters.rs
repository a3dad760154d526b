//! The stream's counters, named as `TelemetryStream.stats()` names them.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        /// Every counter of `_COUNTERS` in `stream.py`, as atomics.
        #[derive(Debug, Default)]
        pub struct Counters {
            $(pub $name: AtomicU64,)*
        }

        impl Counters {
            pub const NAMES: &'static [&'static str] = &[$(stringify!($name),)*];

            /// `(name, value)` for every counter, in [`Counters::NAMES`] order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::SeqCst)),)*]
            }

            /// The counter called `name`, if there is one.
            pub fn by_name(&self, name: &str) -> Option<&AtomicU64> {
                match name {
                    $(stringify!($name) => Some(&self.$name),)*
                    _ => None,
                }
            }

            pub fn reset(&self) {
                $(self.$name.store(0, Ordering::SeqCst);)*
            }
        }
    };
}

counters! {
    sent,
    dropped_queue_full,
    dropped_invalid,
    dropped_disabled,
    dropped_sampled,
    dropped_filtered,
    dropped_oversized,
    measurements_dropped,
    interrupted_sends,
    internal_errors,
    streams_opened,
    controls_applied,
    controls_truncated,
    stats_reports,
    batches_sent,
    refused_calls,
}

#[inline]
pub fn add(counter: &AtomicU64, amount: u64) {
    if amount != 0 {
        counter.fetch_add(amount, Ordering::SeqCst);
    }
}

/// Failures counted outside any stream in this process (the Python
/// package's `errors` module mirrors its count here), added to the
/// `internal_errors` of every stats event as `stream.py` does.
pub static PROCESS_ERRORS: AtomicU64 = AtomicU64::new(0);
