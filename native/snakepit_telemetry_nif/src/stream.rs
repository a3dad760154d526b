//! Stream handles: open, control, close and inspect telemetry streams.
//!
//! None of these NIFs wait on the network: `stream_open` spawns the stream's
//! task and returns its handle at once, control messages go on a bounded
//! queue (a full queue is an error, not a wait), and the task reports back to
//! the owner process with messages (see `Snakepit.Telemetry.GrpcStream`).
//!
//! Statuses go to the stream's owner; events go to its receiver (the
//! worker's delivery process; the owner itself when it passes its own pid).
//! The receiver acknowledges the events it has handled with `stream_ack`; at
//! most `max_pending_events` unacknowledged events (plus one wire message)
//! are ever on their way to it, so its mailbox stays bounded and a slow
//! receiver slows the worker down instead (see
//! `snakepit_telemetry_core::credit`). When a receiver dies, the owner
//! points the stream at a new one with `stream_redirect`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustler::{Atom, Encoder, Env, LocalPid, NifMap, ResourceArc, Term};
use snakepit_telemetry_core::credit::Credit;
use snakepit_telemetry_core::decode::{DecodeConfig, Decoded, Limits};
use snakepit_telemetry_core::enforce::ControlState;
use snakepit_telemetry_core::proto::{
    telemetry_control::Control, TelemetryControl, TelemetryEventFilter, TelemetrySamplingUpdate,
    TelemetryToggle,
};
use snakepit_telemetry_core::stats::StreamStats;
use snakepit_telemetry_core::stream::{self, Address, Sink, Status, StreamConfig};
use tokio::sync::{mpsc, oneshot};

use crate::atoms;
use crate::delivery::{self, Route};
use crate::runtime::RUNTIME;
use crate::secret::SecretHandle;

/// Control messages a stream buffers while connecting or busy.
const CONTROL_QUEUE: usize = 64;

/// The Elixir-side handle of one stream. Dropping the last reference (the
/// owner closed it, or died) drops `controls` and `stop`, which ends the
/// stream's task and frees its connection.
pub struct StreamHandle {
    controls: mpsc::Sender<TelemetryControl>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    stats: Arc<StreamStats>,
    credit: Arc<Credit>,
    route: Arc<Route>,
}

#[rustler::resource_impl]
impl rustler::Resource for StreamHandle {}

/// Options from `Snakepit.Telemetry.GrpcStream`; every key is required (the
/// Elixir side fills in defaults).
#[derive(NifMap)]
pub struct OpenOptions {
    connect_timeout_ms: u64,
    /// Bound on one open attempt (connect, handshake, response headers).
    open_timeout_ms: u64,
    /// HTTP/2 PING interval; 0: no keepalive.
    keepalive_interval_ms: u64,
    keepalive_timeout_ms: u64,
    retry_interval_ms: u64,
    max_batch: usize,
    max_pending_events: usize,
    max_message_bytes: usize,
    native_per_sec: u64,
    max_event_parts: usize,
    max_part_bytes: usize,
    max_measurements: usize,
    max_metadata: usize,
    max_key_bytes: usize,
    max_value_bytes: usize,
}

/// A `Snakepit.Telemetry.Control` state, as the NIF takes it: rules oldest
/// first, each `{rate, patterns}`. The stream enforces it on a worker that
/// only serves `StreamTelemetry` until the owner's control messages arrive
/// (see `snakepit_telemetry_core::enforce`).
#[derive(NifMap)]
pub struct ControlOptions {
    enabled: bool,
    default_rate: f64,
    rules: Vec<(f64, Vec<String>)>,
    allow: Vec<String>,
    deny: Vec<String>,
}

impl ControlOptions {
    fn state(self) -> ControlState {
        ControlState::new(
            self.enabled,
            self.default_rate,
            self.rules,
            self.allow,
            self.deny,
        )
    }
}

impl OpenOptions {
    /// Decoding settings, shared by the gRPC and the stderr paths.
    pub fn decode_config(&self) -> DecodeConfig {
        DecodeConfig {
            limits: Limits {
                max_event_parts: self.max_event_parts,
                max_part_bytes: self.max_part_bytes,
                max_measurements: self.max_measurements,
                max_metadata: self.max_metadata,
                max_key_bytes: self.max_key_bytes,
                max_value_bytes: self.max_value_bytes,
                // Traceback bounds are fixed (see the README's span table).
                ..Limits::default()
            },
            native_per_sec: self.native_per_sec,
        }
    }

    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }
}

struct NifSink {
    owner: LocalPid,
    route: Arc<Route>,
    stream_id: u64,
    stats: Arc<StreamStats>,
    credit: Arc<Credit>,
}

impl Sink for NifSink {
    fn status(&mut self, status: Status) {
        delivery::status(self.owner, self.stream_id, status);
    }

    fn events(&mut self, batch: Vec<Decoded>) {
        delivery::events(
            &self.route,
            self.stream_id,
            batch,
            &self.stats,
            &self.credit,
        );
    }
}

// Dirty: the address and options are decoded from whatever the caller
// passes (an address string has no size bound), so the call's cost is not
// bounded by anything this NIF controls. Opening is rare; the dirty hop
// costs microseconds.
#[rustler::nif(schedule = "DirtyCpu", name = "stream_open_nif")]
fn stream_open(
    owner: LocalPid,
    receiver: LocalPid,
    stream_id: u64,
    address: String,
    options: OpenOptions,
    control: ControlOptions,
    secret: Option<ResourceArc<SecretHandle>>,
) -> Result<ResourceArc<StreamHandle>, (Atom, String)> {
    let address =
        Address::parse(&address).map_err(|e| (atoms::invalid_address(), e.to_string()))?;
    if options.max_batch == 0 || options.native_per_sec == 0 || options.max_pending_events == 0 {
        return Err((
            atoms::invalid_option(),
            "max_batch, max_pending_events and native_per_sec must be positive".into(),
        ));
    }
    let config = StreamConfig {
        connect_timeout: Duration::from_millis(options.connect_timeout_ms),
        open_timeout: Duration::from_millis(options.open_timeout_ms.max(1)),
        keepalive_interval: (options.keepalive_interval_ms > 0)
            .then(|| Duration::from_millis(options.keepalive_interval_ms)),
        keepalive_timeout: Duration::from_millis(options.keepalive_timeout_ms.max(1)),
        retry_interval: Duration::from_millis(options.retry_interval_ms.max(1)),
        max_batch: options.max_batch,
        max_message_bytes: options.max_message_bytes,
        decode: options.decode_config(),
        control: control.state(),
        // Sent on every call of this stream; the resource keeps it out of
        // the owner's terms.
        secret: secret.map(|handle| handle.0.clone()),
        // The HTTP/2 windows are chosen together with the credit; see
        // StreamConfig.
        ..StreamConfig::default()
    };
    let (controls, controls_rx) = mpsc::channel(CONTROL_QUEUE);
    let (stop, stop_rx) = oneshot::channel();
    let stats = Arc::new(StreamStats::default());
    let credit = Arc::new(Credit::new(options.max_pending_events));
    let route = Arc::new(Route::new(receiver));
    let sink = NifSink {
        owner,
        route: route.clone(),
        stream_id,
        stats: stats.clone(),
        credit: credit.clone(),
    };
    RUNTIME.spawn(stream::run(
        address,
        config,
        controls_rx,
        stop_rx,
        stats.clone(),
        credit.clone(),
        sink,
    ));
    Ok(ResourceArc::new(StreamHandle {
        controls,
        stop: Mutex::new(Some(stop)),
        stats,
        credit,
        route,
    }))
}

fn send_control<'a>(env: Env<'a>, handle: &StreamHandle, control: Control) -> Term<'a> {
    let message = TelemetryControl {
        control: Some(control),
    };
    match handle.controls.try_send(message) {
        Ok(()) => atoms::ok().encode(env),
        Err(mpsc::error::TrySendError::Full(_)) => {
            (atoms::error(), atoms::control_queue_full()).encode(env)
        }
        Err(mpsc::error::TrySendError::Closed(_)) => (atoms::error(), atoms::closed()).encode(env),
    }
}

#[rustler::nif]
fn stream_toggle<'a>(env: Env<'a>, handle: ResourceArc<StreamHandle>, enabled: bool) -> Term<'a> {
    send_control(env, &handle, Control::Toggle(TelemetryToggle { enabled }))
}

// Dirty, like stream_filter: the pattern lists have no size bound.
#[rustler::nif(schedule = "DirtyCpu")]
fn stream_sampling<'a>(
    env: Env<'a>,
    handle: ResourceArc<StreamHandle>,
    rate: f64,
    patterns: Vec<String>,
) -> Term<'a> {
    if !(0.0..=1.0).contains(&rate) {
        return (atoms::error(), atoms::invalid_option()).encode(env);
    }
    send_control(
        env,
        &handle,
        Control::Sampling(TelemetrySamplingUpdate {
            sampling_rate: rate,
            event_patterns: patterns,
        }),
    )
}

#[rustler::nif(schedule = "DirtyCpu")]
fn stream_filter<'a>(
    env: Env<'a>,
    handle: ResourceArc<StreamHandle>,
    allow: Vec<String>,
    deny: Vec<String>,
) -> Term<'a> {
    send_control(
        env,
        &handle,
        Control::Filter(TelemetryEventFilter { allow, deny }),
    )
}

/// Ends the stream now. Idempotent; the owner still receives the
/// `{:closed, :stopped}` status.
#[rustler::nif]
fn stream_close(handle: ResourceArc<StreamHandle>) -> Atom {
    if let Some(stop) = handle.stop.lock().map(|mut s| s.take()).unwrap_or(None) {
        let _ = stop.send(());
    }
    atoms::ok()
}

/// Acknowledges `n` events the owner has handled, so that many more may be
/// sent to it. Acknowledging more than is pending is harmless (the count
/// never goes below zero).
#[rustler::nif]
fn stream_ack(handle: ResourceArc<StreamHandle>, n: usize) -> Atom {
    handle.route.ack(n);
    handle.credit.release(n);
    atoms::ok()
}

/// Sends the stream's next events to `receiver`, after its previous receiver
/// died. The events that receiver held unacknowledged (in its mailbox, or
/// being handled) are gone with it: they move from `delivered` to
/// `dropped_receiver_down`, their credit is released, and their number is
/// returned.
#[rustler::nif]
fn stream_redirect(handle: ResourceArc<StreamHandle>, receiver: LocalPid) -> usize {
    let lost = handle.route.redirect(receiver, &handle.stats);
    handle.credit.release(lost);
    lost
}

/// Events on their way to the stream's receiver or being handled there:
/// decoded and not yet acknowledged (a level, not a counter).
#[rustler::nif]
fn stream_pending(handle: ResourceArc<StreamHandle>) -> usize {
    handle.credit.pending()
}

#[rustler::nif]
fn stream_stats<'a>(env: Env<'a>, handle: ResourceArc<StreamHandle>) -> Term<'a> {
    stats_map(env, &handle.stats)
}

/// A stream's counters as a map with preallocated atom keys.
pub fn stats_map<'a>(env: Env<'a>, stats: &StreamStats) -> Term<'a> {
    let snapshot = stats.snapshot();
    let keys: Vec<Term<'a>> = snapshot
        .iter()
        .map(|(name, _)| atoms::stat(name).encode(env))
        .collect();
    let values: Vec<Term<'a>> = snapshot.iter().map(|(_, v)| v.encode(env)).collect();
    Term::map_from_term_arrays(env, &keys, &values).expect("counter names are unique")
}

/// Process-wide figures: live stream tasks and batches waiting for delivery.
#[rustler::nif]
fn runtime_info<'a>(env: Env<'a>) -> Term<'a> {
    let keys = [
        atoms::live_streams().encode(env),
        atoms::delivery_queue().encode(env),
    ];
    let values = [
        stream::live_streams().encode(env),
        delivery::queued().encode(env),
    ];
    Term::map_from_term_arrays(env, &keys, &values).expect("distinct keys")
}
