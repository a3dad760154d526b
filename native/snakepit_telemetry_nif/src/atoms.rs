//! Every atom the NIF produces exists before the first byte from Python
//! arrives: the fixed protocol atoms below, and one atom per catalog
//! [`Sym`], created in [`load`] from compile-time strings.

use once_cell::sync::OnceCell;
use rustler::{Atom, Env, Term};
use snakepit_telemetry_core::catalog::Sym;
use snakepit_telemetry_core::stats::StreamStats;

rustler::atoms! {
    ok,
    error,
    // Messages to the GrpcStream process.
    snakepit_telemetry,
    snakepit_telemetry_events,
    // Stream statuses and close reasons.
    connecting,
    open,
    closed,
    // Protocols of an open stream.
    batches,
    events,
    stopped,
    end_of_stream,
    connect_failed,
    keepalive_timeout,
    // Errors.
    invalid_address,
    invalid_option,
    invalid_secret,
    control_queue_full,
    // Catalog description.
    python,
    name,
    measurements,
    metadata,
    doc,
    unit,
    // stderr-path errors.
    not_telemetry,
    too_large,
    invalid_json,
    unknown_event,
    malformed,
    encode_failed,
    invalid_utf8,
    invalid_input,
    invalid_line,
    invalid_options,
    dirty,
    // runtime_info keys.
    live_streams,
    delivery_queue,
    // Python traceback frames: {:python, :frame, [function], [file: .., line: ..]}.
    frame,
    file,
    line,
}

static CATALOG: OnceCell<Vec<Atom>> = OnceCell::new();
static STATS: OnceCell<Vec<Atom>> = OnceCell::new();

/// The preallocated atom for a catalog symbol.
pub fn sym(s: Sym) -> Atom {
    CATALOG.get().expect("atoms are created when the NIF loads")[s.index()]
}

/// The preallocated atom for a stream counter name.
pub fn stat(name: &str) -> Atom {
    let index = StreamStats::NAMES
        .iter()
        .position(|n| *n == name)
        .expect("counter names come from StreamStats::NAMES");
    STATS.get().expect("atoms are created when the NIF loads")[index]
}

/// NIF load callback: creates the catalog atoms. The `rustler::atoms!` ones
/// are registered by rustler itself at the same moment.
pub fn load(env: Env, _info: Term) -> bool {
    let make = |names: &mut dyn Iterator<Item = &'static str>| -> Option<Vec<Atom>> {
        names.map(|n| Atom::from_str(env, n).ok()).collect()
    };
    let (Some(catalog), Some(stats)) = (
        make(&mut Sym::ALL.iter().map(|s| s.name())),
        make(&mut StreamStats::NAMES.iter().copied()),
    ) else {
        return false;
    };
    // A second load in the same VM (e.g. after a purge) finds them set.
    let _ = CATALOG.set(catalog);
    let _ = STATS.set(stats);
    true
}
