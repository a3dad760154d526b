//! The compiled-in event catalog.
//!
//! Every atom the NIF can ever hand to the BEAM is a [`Sym`]: a name fixed at
//! compile time. The NIF turns each one into an atom once, when it loads, and
//! afterwards only looks atoms up by index. Bytes that arrive from Python are
//! compared against these names; they are never turned into atoms themselves.

use std::collections::HashMap;
use std::sync::OnceLock;

macro_rules! symbols {
    ($($variant:ident => $text:literal,)*) => {
        /// A compile-time name that the NIF preallocates as an atom.
        #[allow(non_camel_case_types)]
        #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum Sym {
            $($variant,)*
        }

        impl Sym {
            /// Every symbol, in index order: `Sym::ALL[s.index()] == s`.
            pub const ALL: &'static [Sym] = &[$(Sym::$variant,)*];

            /// The atom text.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Sym::$variant => $text,)*
                }
            }

            /// Position in [`Sym::ALL`], for index-based atom tables.
            pub const fn index(self) -> usize {
                self as usize
            }
        }
    };
}

symbols! {
    // Event name segments.
    snakepit => "snakepit",
    python => "python",
    call => "call",
    tool => "tool",
    execution => "execution",
    result_size => "result_size",
    start => "start",
    stop => "stop",
    exception => "exception",
    telemetry => "telemetry",
    stats => "stats",
    // Measurement keys.
    duration => "duration",
    system_time => "system_time",
    bytes => "bytes",
    // The Python worker's own counters (`telemetry.python.stats`).
    emitted => "emitted",
    sent => "sent",
    dropped_queue_full => "dropped_queue_full",
    dropped_invalid => "dropped_invalid",
    dropped_disabled => "dropped_disabled",
    dropped_sampled => "dropped_sampled",
    dropped_filtered => "dropped_filtered",
    measurements_dropped => "measurements_dropped",
    internal_errors => "internal_errors",
    interrupted_sends => "interrupted_sends",
    queue_len => "queue_len",
    // Metadata keys.
    command => "command",
    result => "result",
    error_type => "error_type",
    error_message => "error_message",
    session_id => "session_id",
    correlation_id => "correlation_id",
}

/// How a measurement is carried on the wire and what Elixir receives.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Nanoseconds on the wire, Erlang `:native` time units in Elixir, the
    /// unit `:telemetry` users expect for `duration` and `system_time`.
    Nanoseconds,
    /// Bytes, passed through.
    Bytes,
    /// A plain number, passed through.
    Count,
}

impl Unit {
    pub const fn name(self) -> &'static str {
        match self {
            Unit::Nanoseconds => "native time",
            Unit::Bytes => "bytes",
            Unit::Count => "count",
        }
    }
}

/// A measurement that the catalog knows by name.
#[derive(Copy, Clone, Debug)]
pub struct MeasurementSpec {
    pub key: Sym,
    pub unit: Unit,
}

/// One event: where it comes from in Python and what it becomes in Elixir.
#[derive(Debug)]
pub struct EventSpec {
    /// Dotted name as Python emits it, e.g. `"python.call.stop"`.
    pub python: &'static str,
    /// The `:telemetry` event name.
    pub name: &'static [Sym],
    /// Measurements this event documents.
    pub measurements: &'static [MeasurementSpec],
    /// Metadata keys this event documents (besides the standard ones that
    /// every event carries: node, pool_name, worker_id, correlation_id).
    pub metadata: &'static [Sym],
    pub doc: &'static str,
}

const fn m(key: Sym, unit: Unit) -> MeasurementSpec {
    MeasurementSpec { key, unit }
}

const SPAN_START: &[MeasurementSpec] = &[m(Sym::system_time, Unit::Nanoseconds)];
const SPAN_STOP: &[MeasurementSpec] = &[m(Sym::duration, Unit::Nanoseconds)];

pub use table::EVENTS;
use table::EXTRA_METADATA_KEYS;

/// The tables, in their own module so that the glob import of the symbol
/// names (which reads well in the tables) cannot shadow names elsewhere.
mod table {
    use super::{m, EventSpec, Sym, Unit, SPAN_START, SPAN_STOP};
    use Sym::*;

    /// The catalog. Order is stable; an event's index is its [`EventId`].
    pub static EVENTS: &[EventSpec] = &[
        EventSpec {
            python: "python.call.start",
            name: &[snakepit, python, call, start],
            measurements: SPAN_START,
            metadata: &[command, session_id],
            doc: "A Python call began.",
        },
        EventSpec {
            python: "python.call.stop",
            name: &[snakepit, python, call, stop],
            measurements: SPAN_STOP,
            metadata: &[command, session_id, result],
            doc: "A Python call returned.",
        },
        EventSpec {
            python: "python.call.exception",
            name: &[snakepit, python, call, exception],
            measurements: SPAN_STOP,
            metadata: &[command, session_id, error_type, error_message],
            doc: "A Python call raised.",
        },
        EventSpec {
            python: "tool.execution.start",
            name: &[snakepit, python, tool, execution, start],
            measurements: SPAN_START,
            metadata: &[tool],
            doc: "A tool began executing.",
        },
        EventSpec {
            python: "tool.execution.stop",
            name: &[snakepit, python, tool, execution, stop],
            measurements: SPAN_STOP,
            metadata: &[tool, result],
            doc: "A tool finished.",
        },
        EventSpec {
            python: "tool.execution.exception",
            name: &[snakepit, python, tool, execution, exception],
            measurements: SPAN_STOP,
            metadata: &[tool, error_type, error_message],
            doc: "A tool raised.",
        },
        EventSpec {
            python: "tool.result_size",
            name: &[snakepit, python, tool, result_size],
            measurements: &[m(bytes, Unit::Bytes)],
            metadata: &[tool],
            doc: "Size of a tool's result.",
        },
        EventSpec {
            python: "telemetry.python.stats",
            name: &[snakepit, telemetry, python, stats],
            measurements: &[
                m(emitted, Unit::Count),
                m(sent, Unit::Count),
                m(dropped_queue_full, Unit::Count),
                m(dropped_invalid, Unit::Count),
                m(dropped_disabled, Unit::Count),
                m(dropped_sampled, Unit::Count),
                m(dropped_filtered, Unit::Count),
                m(measurements_dropped, Unit::Count),
                m(internal_errors, Unit::Count),
                m(interrupted_sends, Unit::Count),
                m(queue_len, Unit::Count),
            ],
            metadata: &[],
            doc: "The worker's own cumulative counters, sent by its stream (never sampled or filtered).",
        },
    ];

    /// Metadata keys that arrive as atoms besides those events document:
    /// the standard keys that can come from Python.
    pub static EXTRA_METADATA_KEYS: &[Sym] = &[correlation_id];
}

/// Index of an event in [`EVENTS`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct EventId(pub u16);

impl EventId {
    pub fn spec(self) -> &'static EventSpec {
        &EVENTS[self.0 as usize]
    }
}

struct Index {
    events: HashMap<&'static str, EventId>,
    measurements: HashMap<&'static str, MeasurementSpec>,
    metadata: HashMap<&'static str, Sym>,
}

fn index() -> &'static Index {
    static INDEX: OnceLock<Index> = OnceLock::new();
    INDEX.get_or_init(|| Index {
        events: EVENTS
            .iter()
            .enumerate()
            .map(|(i, e)| (e.python, EventId(i as u16)))
            .collect(),
        // A key means the same, with the same unit, in every event that
        // documents it (a test checks this), so one table serves all events.
        measurements: EVENTS
            .iter()
            .flat_map(|e| e.measurements)
            .map(|spec| (spec.key.name(), *spec))
            .collect(),
        metadata: EVENTS
            .iter()
            .flat_map(|e| e.metadata)
            .chain(EXTRA_METADATA_KEYS)
            .map(|s| (s.name(), *s))
            .collect(),
    })
}

/// Looks up a dotted Python event name.
pub fn event(python_name: &str) -> Option<EventId> {
    index().events.get(python_name).copied()
}

/// Looks up a measurement key.
pub fn measurement(key: &str) -> Option<MeasurementSpec> {
    index().measurements.get(key).copied()
}

/// Metadata keys that arrive as atoms, in catalog order, without repeats.
pub fn metadata_keys() -> Vec<Sym> {
    let mut keys: Vec<Sym> = Vec::new();
    for key in EVENTS
        .iter()
        .flat_map(|e| e.metadata)
        .chain(EXTRA_METADATA_KEYS)
    {
        if !keys.contains(key) {
            keys.push(*key);
        }
    }
    keys
}

/// Looks up a metadata key.
pub fn metadata_key(key: &str) -> Option<Sym> {
    index().metadata.get(key).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn symbol_indexes_match_their_position() {
        for (i, s) in Sym::ALL.iter().enumerate() {
            assert_eq!(s.index(), i);
        }
    }

    #[test]
    fn symbol_names_are_unique() {
        let names: HashSet<_> = Sym::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(names.len(), Sym::ALL.len());
    }

    #[test]
    fn python_names_and_event_names_are_unique() {
        let python: HashSet<_> = EVENTS.iter().map(|e| e.python).collect();
        let elixir: HashSet<_> = EVENTS.iter().map(|e| e.name).collect();
        assert_eq!(python.len(), EVENTS.len());
        assert_eq!(elixir.len(), EVENTS.len());
    }

    #[test]
    fn every_event_is_under_snakepit_and_documents_known_keys() {
        for e in EVENTS {
            assert_eq!(e.name[0], Sym::snakepit, "{}", e.python);
            for spec in e.measurements {
                assert!(measurement(spec.key.name()).is_some(), "{}", e.python);
            }
            for key in e.metadata {
                assert_eq!(metadata_key(key.name()), Some(*key), "{}", e.python);
            }
        }
    }

    #[test]
    fn a_measurement_key_has_one_unit_everywhere() {
        for e in EVENTS {
            for spec in e.measurements {
                assert_eq!(
                    measurement(spec.key.name()).unwrap().unit,
                    spec.unit,
                    "{}",
                    e.python
                );
            }
        }
    }

    #[test]
    fn every_symbol_is_used_by_the_catalog() {
        let used: HashSet<Sym> = EVENTS
            .iter()
            .flat_map(|e| {
                e.name
                    .iter()
                    .copied()
                    .chain(e.measurements.iter().map(|m| m.key))
                    .chain(e.metadata.iter().copied())
            })
            .chain(EXTRA_METADATA_KEYS.iter().copied())
            .collect();
        for s in Sym::ALL {
            assert!(used.contains(s), "{} is preallocated but unused", s.name());
        }
    }

    #[test]
    fn lookups() {
        let id = event("tool.execution.stop").expect("in catalog");
        assert_eq!(
            id.spec().name,
            &[
                Sym::snakepit,
                Sym::python,
                Sym::tool,
                Sym::execution,
                Sym::stop
            ]
        );
        assert!(event("tool.execution").is_none());
        assert!(event("").is_none());
        assert_eq!(metadata_key("tool"), Some(Sym::tool));
        assert!(
            metadata_key("snakepit").is_none(),
            "event segments are not keys"
        );
        assert_eq!(
            measurement("duration").map(|s| s.unit),
            Some(Unit::Nanoseconds)
        );
    }
}
