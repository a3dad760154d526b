//! One telemetry stream: connect to a worker, keep its telemetry call open,
//! forward control messages to it and hand decoded events to a [`Sink`] in
//! batches.
//!
//! Every connection first calls `StreamTelemetryBatches` (many events per
//! gRPC message) and falls back to `StreamTelemetry` (one event per message)
//! when the worker answers `UNIMPLEMENTED`. Both carry the same controls and
//! events; only the framing differs. Messages are decoded event by event
//! (see [`crate::wire`]): a bad event is dropped and counted, never the
//! call.
//!
//! Every open attempt (connect, HTTP/2 handshake, response headers) is
//! bounded by `open_timeout`, and every connection sends HTTP/2 PINGs, so a
//! worker that accepts and never answers, or stops answering later, ends
//! the attempt or the stream instead of hanging it.
//!
//! A worker on `StreamTelemetry` is taken for one that may not apply control
//! the way Elixir means it (Snakepit v0.13's Python does not): on such a
//! stream the task enforces the control state itself and sends the worker
//! no sampling rule (see [`crate::enforce`]).
//!
//! The stream reads only while its [`Credit`] allows: events handed to the
//! sink stay pending until the owner releases them, and while too many are
//! pending the call is left unread, so HTTP/2 flow control pushes back on
//! the worker instead of memory growing here or in the owner's mailbox.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use hyper_util::rt::TokioIo;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Streaming;

use crate::auth::Secret;
use crate::credit::Credit;
use crate::decode::{DecodeConfig, Decoded, Decoder};
use crate::enforce::{self, ControlState, Enforcer};
use crate::proto::{telemetry_control, TelemetryControl, TelemetryToggle};
use crate::stats::StreamStats;
use crate::wire::{self, Framing, Wire, WireCodec};

const BATCHES_PATH: &str = "/snakepit.bridge.BridgeService/StreamTelemetryBatches";
const EVENTS_PATH: &str = "/snakepit.bridge.BridgeService/StreamTelemetry";

/// Where a worker serves its telemetry stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// `host:port`, also accepted as `http://host:port`.
    Tcp(String),
    /// `unix:/absolute/path.sock` (or `unix:///absolute/path.sock`).
    Unix(PathBuf),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid worker address {address:?}: expected \"host:port\" or \"unix:/absolute/path\"")]
pub struct AddressError {
    pub address: String,
}

impl Address {
    pub fn parse(address: &str) -> Result<Address, AddressError> {
        let invalid = || AddressError {
            address: address.to_string(),
        };
        if let Some(rest) = address.strip_prefix("unix:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if !path.starts_with('/') || path.len() < 2 {
                return Err(invalid());
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        let authority = address.strip_prefix("http://").unwrap_or(address);
        let (host, port) = authority.rsplit_once(':').ok_or_else(invalid)?;
        if host.is_empty() || host.contains('/') || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(invalid());
        }
        Ok(Address::Tcp(authority.to_string()))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(authority) => write!(f, "{authority}"),
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// How one stream behaves.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// How long to keep trying to connect before giving up. Zero: one
    /// attempt (bounded by `open_timeout`).
    pub connect_timeout: Duration,
    /// Bound on one open attempt: connect, HTTP/2 handshake and the
    /// response headers of the telemetry call (the `UNIMPLEMENTED`
    /// fallback included). Also bounded by what is left of
    /// `connect_timeout`.
    pub open_timeout: Duration,
    /// HTTP/2 PING after this long without a byte from the worker;
    /// `None`: no keepalive. gRPC servers (grpc-core: grpcio) answer a
    /// client that pings an idle call more often than every 5 minutes with
    /// GOAWAY `too_many_pings` unless configured otherwise
    /// (`grpc.http2.min_recv_ping_interval_without_data_ms`,
    /// `grpc.http2.max_ping_strikes`), hence the default.
    pub keepalive_interval: Option<Duration>,
    /// How long a PING may go unanswered before the connection is closed
    /// (the stream ends with [`CloseReason::KeepaliveTimeout`]).
    pub keepalive_timeout: Duration,
    /// Pause between connection attempts.
    pub retry_interval: Duration,
    /// Most wire events folded into one batch for the sink (a batch message
    /// from the worker is never split, so one batch may hold more).
    pub max_batch: usize,
    /// Largest gRPC message accepted from the worker.
    pub max_message_bytes: usize,
    /// HTTP/2 stream window: what the worker may send ahead while the
    /// stream waits for credit. It bounds the memory (and the age of the
    /// events) buffered here for a slow owner.
    pub stream_window_bytes: u32,
    /// HTTP/2 connection window. Every connection carries one stream, so
    /// this is no extra buffering; it sets h2's budget for buffered small
    /// DATA frames (half of it), which must exceed the framing overhead of
    /// a whole stream window of the smallest gRPC messages (5 bytes, 251
    /// bytes of overhead each): at least ~100x `stream_window_bytes`.
    /// Otherwise h2 closes a paused connection (`ENHANCE_YOUR_CALM`).
    pub connection_window_bytes: u32,
    pub decode: DecodeConfig,
    /// The worker's control state when the stream opens (the owner sends
    /// it again once open): what a `StreamTelemetry` stream enforces before
    /// the owner's control messages reach it, e.g. on the events a worker
    /// buffered before the call opened.
    pub control: ControlState,
    /// The worker's secret, sent as [`crate::auth::SECRET_HEADER`] metadata
    /// on every telemetry call (both RPCs, every attempt); `None`: no
    /// secret (a worker started without one). `Debug` shows it redacted.
    pub secret: Option<Secret>,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            connect_timeout: Duration::from_secs(10),
            open_timeout: Duration::from_secs(5),
            keepalive_interval: Some(Duration::from_secs(300)),
            keepalive_timeout: Duration::from_secs(5),
            retry_interval: Duration::from_millis(100),
            max_batch: 512,
            max_message_bytes: 4 * 1024 * 1024,
            stream_window_bytes: 256 * 1024,
            connection_window_bytes: 32 * 1024 * 1024,
            decode: DecodeConfig::default(),
            control: ControlState::default(),
            secret: None,
        }
    }
}

/// Which RPC an open stream uses.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// `StreamTelemetryBatches`: many events per gRPC message.
    Batches,
    /// `StreamTelemetry`: one event per gRPC message (the fallback for
    /// workers without `StreamTelemetryBatches`).
    Events,
}

/// What a stream reports about itself, in order: `Connecting`, then `Open`
/// if a connection was made, then exactly one `Closed`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Connecting,
    Open(Protocol),
    Closed(CloseReason),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Closed by its owner (an explicit close, or the handle was dropped).
    Stopped,
    /// The worker ended the call.
    EndOfStream,
    /// The call failed after it was open.
    Error(String),
    /// No connection within the connect timeout; holds the last error
    /// ("open timed out after N ms" when the last attempt hit its bound).
    ConnectFailed(String),
    /// The worker stopped answering HTTP/2 PINGs on an open stream.
    KeepaliveTimeout,
}

/// Receives what a stream produces. Called from the stream's task.
pub trait Sink: Send + 'static {
    fn status(&mut self, status: Status);
    /// A non-empty batch of decoded events, whose credit the stream has
    /// taken. The sink accounts for them in the stream's stats (delivered or
    /// dropped) and sees that the credit of any it drops is released; the
    /// owner releases the rest once it has handled them.
    fn events(&mut self, batch: Vec<Decoded>);
}

static LIVE_STREAMS: AtomicUsize = AtomicUsize::new(0);

/// Stream tasks running right now in this process.
pub fn live_streams() -> usize {
    LIVE_STREAMS.load(Ordering::SeqCst)
}

struct LiveGuard;

impl LiveGuard {
    fn new() -> Self {
        LIVE_STREAMS.fetch_add(1, Ordering::SeqCst);
        LiveGuard
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        LIVE_STREAMS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs one stream to its end. Returns when the worker ends the call, the
/// call fails, no connection could be made in time, `stop` fires, or every
/// sender of `controls` is gone (the owner dropped its handle).
pub async fn run<S: Sink>(
    address: Address,
    config: StreamConfig,
    mut controls: mpsc::Receiver<TelemetryControl>,
    mut stop: oneshot::Receiver<()>,
    stats: Arc<StreamStats>,
    credit: Arc<Credit>,
    mut sink: S,
) {
    let live = LiveGuard::new();
    sink.status(Status::Connecting);
    let mut held = Held::default();
    let reason = tokio::select! {
        biased;
        _ = &mut stop => CloseReason::Stopped,
        reason = session(&address, &config, &mut controls, &stats, &credit, &mut held, &mut sink) => reason,
    };
    // Whatever was decoded still goes to the sink, which accounts for it.
    held.flush(&mut sink);
    // Once the owner hears `Closed`, its control sends fail and the stream
    // no longer counts as live: close both before saying so.
    controls.close();
    drop(live);
    sink.status(Status::Closed(reason));
}

/// Decoded events not handed to the sink yet (their credit is taken).
#[derive(Default)]
struct Held {
    events: Vec<Decoded>,
    /// Wire events they came from (rejected ones included).
    wire: usize,
}

impl Held {
    fn flush<S: Sink>(&mut self, sink: &mut S) {
        self.wire = 0;
        if !self.events.is_empty() {
            sink.events(std::mem::take(&mut self.events));
        }
    }
}

async fn session<S: Sink>(
    address: &Address,
    config: &StreamConfig,
    controls: &mut mpsc::Receiver<TelemetryControl>,
    stats: &StreamStats,
    credit: &Credit,
    held: &mut Held,
    sink: &mut S,
) -> CloseReason {
    let deadline = Instant::now() + config.connect_timeout;
    let open_timeout = config.open_timeout.max(Duration::from_millis(1));
    let mut first = true;
    let (outbound, mut inbound) = loop {
        StreamStats::add(&stats.connect_attempts, 1);
        // Each attempt ends by the connect deadline, except a lone first
        // attempt (connect_timeout zero), which gets the open timeout.
        let left = deadline.saturating_duration_since(Instant::now());
        let bound = if first && left.is_zero() {
            open_timeout
        } else {
            open_timeout.min(left.max(Duration::from_millis(1)))
        };
        first = false;
        match open(address, config, stats, bound).await {
            Ok(pair) => break pair,
            Err(error) => {
                if Instant::now() + config.retry_interval >= deadline {
                    return CloseReason::ConnectFailed(error);
                }
                tokio::time::sleep(config.retry_interval).await;
            }
        }
    };
    StreamStats::add(&stats.controls_sent, 1);
    sink.status(Status::Open(inbound.protocol()));

    let mut decoder = Decoder::new(config.decode.clone());
    // Every control passes through the enforcer's state; only a
    // `StreamTelemetry` stream applies it (see crate::enforce).
    let enforcing = inbound.protocol() == Protocol::Events;
    let mut enforcer = Enforcer::new(config.control.clone());
    // Set while the owner has too many events pending: the call is left
    // unread (controls and stop still work) until half the credit is back.
    let mut paused = false;
    loop {
        // Decoded events go to the sink at once when the owner has handled
        // everything before them; while it is busy they gather here until
        // they fill a batch or use up the credit, so a slow owner gets a few
        // large messages instead of a mailbox of small ones, and nothing
        // later than it could have handled it.
        if held.events.is_empty() {
            // Nothing to hand on (every event held was rejected).
            held.wire = 0;
        } else if credit.pending() <= held.events.len()
            || held.wire >= config.max_batch
            || !credit.available()
        {
            held.flush(sink);
        }
        if paused && credit.pending() <= credit.resume_level() {
            paused = false;
        }
        if !paused && !credit.available() {
            paused = true;
            StreamStats::add(&stats.credit_waits, 1);
        }
        // What to wait for: the owner catching up (to flush what is held),
        // or the credit to resume reading.
        let wake_at = if !held.events.is_empty() {
            Some(held.events.len())
        } else if paused {
            Some(credit.resume_level())
        } else {
            None
        };
        tokio::select! {
            control = controls.recv() => match control {
                Some(control) => {
                    enforcer.apply(&control);
                    let control = if enforcing {
                        enforce::for_event_worker(control)
                    } else {
                        Some(control)
                    };
                    // The outbound buffer is as large as the owner's queue, so
                    // this only fails once the call itself is gone; the
                    // inbound side reports that.
                    if control.is_some_and(|control| outbound.try_send(control).is_ok()) {
                        StreamStats::add(&stats.controls_sent, 1);
                    }
                }
                None => return CloseReason::Stopped,
            },
            () = credit.wait_until(wake_at.unwrap_or(0)), if wake_at.is_some() => {}
            message = inbound.message(), if !paused => {
                let first = match message {
                    Ok(Some(wire)) => wire,
                    Ok(None) => return CloseReason::EndOfStream,
                    Err(status) => return call_failed(&status, &inbound, stats),
                };
                let room = config.max_batch.saturating_sub(held.wire).max(1);
                let enforcer = enforcing.then_some(&mut enforcer);
                let mut fold = Fold { decoder: &mut decoder, enforcer, stats, credit, held };
                if let Some(reason) = drain_ready(first, &mut inbound, &mut fold, room) {
                    return reason;
                }
            }
        }
    }
}

/// The worker's side of an open call, in either framing.
struct Inbound {
    protocol: Protocol,
    messages: Streaming<Wire>,
    /// Reads on the call's connection.
    reads: Arc<ReadClock>,
    /// The PING answer deadline, when keepalive is on.
    keepalive_timeout: Option<Duration>,
}

impl Inbound {
    fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The next message; cancel-safe like [`Streaming::message`].
    async fn message(&mut self) -> Result<Option<Wire>, tonic::Status> {
        self.messages.message().await
    }
}

/// Where decoded events go: decoded, checked against the enforced control
/// (on `StreamTelemetry` streams), held, and their credit taken.
struct Fold<'a> {
    decoder: &'a mut Decoder,
    enforcer: Option<&'a mut Enforcer>,
    stats: &'a StreamStats,
    credit: &'a Credit,
    held: &'a mut Held,
}

/// Decodes `first` and every further message that is already buffered onto
/// `held`, without waiting, until `max` wire events were read or the owner's
/// `credit` is used up (it is taken as events are decoded). A message is
/// never split, so the credit is overshot by at most one message. Returns
/// how the call ended if that was seen while draining.
fn drain_ready(
    first: Wire,
    inbound: &mut Inbound,
    fold: &mut Fold<'_>,
    max: usize,
) -> Option<CloseReason> {
    let mut seen = decode_wire(first, fold);
    while seen < max && fold.credit.available() {
        match inbound.message().now_or_never() {
            Some(Ok(Some(wire))) => seen += decode_wire(wire, fold),
            Some(Ok(None)) => return Some(CloseReason::EndOfStream),
            Some(Err(status)) => return Some(call_failed(&status, inbound, fold.stats)),
            None => break,
        }
    }
    None
}

/// Decodes one message's events onto `held` and takes their credit;
/// returns how many wire events it counts for (an empty or malformed
/// message counts as one, so draining always ends).
fn decode_wire(wire: Wire, fold: &mut Fold<'_>) -> usize {
    let seen = wire.len();
    let before = fold.held.events.len();
    let mut added = wire::fold(wire, fold.decoder, fold.stats, &mut fold.held.events);
    if let Some(enforcer) = fold.enforcer.as_deref_mut() {
        added = enforcer.retain(&mut fold.held.events, before, fold.stats);
    }
    fold.credit.take(added);
    fold.held.wire += seen;
    seen
}

fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// How an open call that failed with `status` ends, counted in `stats`.
fn call_failed(status: &tonic::Status, inbound: &Inbound, stats: &StreamStats) -> CloseReason {
    if let Some(bytes) = wire::oversized_message_bytes(status) {
        StreamStats::add(&stats.oversized_messages, 1);
        StreamStats::max(&stats.oversized_bytes_max, bytes);
        return CloseReason::Error(status_text(status));
    }
    let keepalive = inbound.keepalive_timeout;
    if keepalive
        .is_some_and(|timeout| is_transport_error(status) && inbound.reads.silent_for() >= timeout)
    {
        StreamStats::add(&stats.keepalive_timeouts, 1);
        return CloseReason::KeepaliveTimeout;
    }
    CloseReason::Error(status_text(status))
}

/// Whether the call failed under the connection (a transport error from
/// hyper), rather than with a status the worker sent.
fn is_transport_error(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<hyper::Error>() || error.is::<std::io::Error>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// Toggle-on, the first control message of every stream.
pub fn enable() -> TelemetryControl {
    TelemetryControl {
        control: Some(telemetry_control::Control::Toggle(TelemetryToggle {
            enabled: true,
        })),
    }
}

/// A fresh outbound control queue holding the first control, [`enable`].
fn outbound() -> (
    mpsc::Sender<TelemetryControl>,
    ReceiverStream<TelemetryControl>,
) {
    let (tx, rx) = mpsc::channel(64);
    tx.try_send(enable()).expect("fresh channel has room");
    (tx, ReceiverStream::new(rx))
}

/// Connects and opens the call within `bound` (counted in
/// `open_timeouts` when it runs out).
async fn open(
    address: &Address,
    config: &StreamConfig,
    stats: &StreamStats,
    bound: Duration,
) -> Result<(mpsc::Sender<TelemetryControl>, Inbound), String> {
    match tokio::time::timeout(bound, open_call(address, config, stats)).await {
        Ok(result) => result,
        Err(_) => {
            StreamStats::add(&stats.open_timeouts, 1);
            Err(format!("open timed out after {} ms", bound.as_millis()))
        }
    }
}

/// Connects and opens the call: `StreamTelemetryBatches`, or
/// `StreamTelemetry` on the same channel if the worker does not implement
/// it. Negotiated on every connection, since a worker may be upgraded or
/// downgraded between two.
async fn open_call(
    address: &Address,
    config: &StreamConfig,
    stats: &StreamStats,
) -> Result<(mpsc::Sender<TelemetryControl>, Inbound), String> {
    let reads = ReadClock::new();
    let channel = connect(address, config, &reads)
        .await
        .map_err(|e| error_chain(&e))?;
    let client =
        tonic::client::Grpc::new(channel).max_decoding_message_size(config.max_message_bytes);
    let mut client = Client {
        grpc: client,
        reads,
        keepalive_timeout: config.keepalive_interval.map(|_| config.keepalive_timeout),
        secret: config.secret.clone(),
    };
    match call(&mut client, Framing::Batch).await {
        Ok(call) => return Ok(call),
        Err(status) if status.code() == tonic::Code::Unimplemented => {}
        Err(status) => return Err(status_text(&status)),
    }
    let call = call(&mut client, Framing::Event)
        .await
        .map_err(|status| status_text(&status))?;
    StreamStats::add(&stats.fallbacks, 1);
    Ok(call)
}

/// A connection to a worker, ready for telemetry calls.
struct Client {
    grpc: tonic::client::Grpc<Channel>,
    reads: Arc<ReadClock>,
    keepalive_timeout: Option<Duration>,
    /// Sent with every call on this connection.
    secret: Option<Secret>,
}

/// Starts one telemetry call and waits for its response headers.
async fn call(
    client: &mut Client,
    framing: Framing,
) -> Result<(mpsc::Sender<TelemetryControl>, Inbound), tonic::Status> {
    let (path, protocol) = match framing {
        Framing::Batch => (BATCHES_PATH, Protocol::Batches),
        Framing::Event => (EVENTS_PATH, Protocol::Events),
    };
    client
        .grpc
        .ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("channel not ready: {e}")))?;
    let (tx, rx) = outbound();
    let mut request = tonic::Request::new(rx);
    if let Some(secret) = &client.secret {
        secret.apply(&mut request);
    }
    let response = client
        .grpc
        .streaming(
            request,
            PathAndQuery::from_static(path),
            WireCodec::new(framing),
        )
        .await?;
    Ok((
        tx,
        Inbound {
            protocol,
            messages: response.into_inner(),
            reads: client.reads.clone(),
            keepalive_timeout: client.keepalive_timeout,
        },
    ))
}

async fn connect(
    address: &Address,
    config: &StreamConfig,
    reads: &Arc<ReadClock>,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = match address {
        Address::Tcp(authority) => Endpoint::from_shared(format!("http://{authority}"))?,
        // The URI is required by the API but unused: the connector decides
        // where to go.
        Address::Unix(_) => Endpoint::from_static("http://localhost"),
    };
    let mut endpoint = endpoint
        .initial_stream_window_size(config.stream_window_bytes)
        .initial_connection_window_size(config.connection_window_bytes);
    if let Some(interval) = config.keepalive_interval {
        endpoint = endpoint
            .http2_keep_alive_interval(interval)
            .keep_alive_timeout(config.keepalive_timeout)
            .keep_alive_while_idle(true);
    }
    let address = address.clone();
    let reads = reads.clone();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let address = address.clone();
            let reads = reads.clone();
            async move {
                let io: Box<dyn Io> = match &address {
                    Address::Tcp(authority) => {
                        let socket = TcpStream::connect(authority.as_str()).await?;
                        socket.set_nodelay(true)?;
                        Box::new(socket)
                    }
                    Address::Unix(path) => Box::new(UnixStream::connect(path).await?),
                };
                Ok::<_, std::io::Error>(TokioIo::new(Watched { io, reads }))
            }
        }))
        .await
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// When a connection last saw its socket become readable (data, EOF or an
/// error). hyper closes a connection whose keepalive PING went unanswered
/// without saying so to the open call (it sees a broken pipe, as when the
/// worker dies), so a call that fails after this long a silence was ended
/// by the keepalive: a dead worker's EOF or reset is itself a read.
#[derive(Debug)]
struct ReadClock {
    start: Instant,
    last_ns: std::sync::atomic::AtomicU64,
}

impl ReadClock {
    fn new() -> Arc<ReadClock> {
        Arc::new(ReadClock {
            start: Instant::now(),
            last_ns: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let now = self.start.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.last_ns.store(now, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = Duration::from_nanos(self.last_ns.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// A socket that records its reads on a [`ReadClock`].
struct Watched {
    io: Box<dyn Io>,
    reads: Arc<ReadClock>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if result.is_ready() {
            self.reads.touch();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Sym;
    use crate::decode::Key;
    use crate::proto::bridge_service_server::{BridgeService, BridgeServiceServer};
    use crate::proto::{TelemetryEvent, TelemetryEventBatch};
    use prost::Message;
    use std::collections::HashMap;
    use std::pin::Pin;
    use std::sync::atomic::AtomicU8;
    use tokio::net::{TcpListener, UnixListener};
    use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
    use tokio_stream::{Stream, StreamExt};
    use tonic::{Request, Response, Streaming as TonicStreaming};

    #[test]
    fn parses_addresses() {
        assert_eq!(
            Address::parse("127.0.0.1:50051"),
            Ok(Address::Tcp("127.0.0.1:50051".into()))
        );
        assert_eq!(
            Address::parse("http://localhost:9"),
            Ok(Address::Tcp("localhost:9".into()))
        );
        assert_eq!(
            Address::parse("unix:/tmp/w.sock"),
            Ok(Address::Unix("/tmp/w.sock".into()))
        );
        assert_eq!(
            Address::parse("unix:///tmp/w.sock"),
            Ok(Address::Unix("/tmp/w.sock".into()))
        );
        for bad in [
            "",
            "localhost",
            ":80",
            "host:0",
            "host:99999",
            "unix:relative",
            "unix:",
            "a/b:1",
        ] {
            assert!(Address::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Address::parse("unix:/x.sock").unwrap().to_string(),
            "unix:/x.sock"
        );
    }

    /// A worker stand-in: sends `events` on every `StreamTelemetry` call,
    /// records controls. With `batches`, it also serves
    /// `StreamTelemetryBatches` (sending those messages); without, that RPC
    /// is unimplemented, as in a worker that predates it.
    struct FakeWorker {
        events: Vec<TelemetryEvent>,
        controls: mpsc::UnboundedSender<TelemetryControl>,
        hold_open: bool,
        batches: Option<Vec<TelemetryEventBatch>>,
        /// Send every message in a DATA frame of its own, as grpc-core
        /// does (tonic coalesces messages that are ready together).
        one_by_one: bool,
        /// Refuse calls without this secret (UNAUTHENTICATED), as a worker
        /// started with one does.
        secret: Option<&'static str>,
    }

    /// Yields each item on a poll of its own, with `Pending` in between.
    struct OneByOne<S> {
        inner: S,
        ready: bool,
    }

    impl<S: Stream + Unpin> Stream for OneByOne<S> {
        type Item = S::Item;

        fn poll_next(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<S::Item>> {
            if !self.ready {
                self.ready = true;
                cx.waker().wake_by_ref();
                return std::task::Poll::Pending;
            }
            self.ready = false;
            Pin::new(&mut self.inner).poll_next(cx)
        }
    }

    type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;
    type EventStream = Boxed<TelemetryEvent>;
    type BatchStream = Boxed<TelemetryEventBatch>;

    impl FakeWorker {
        fn check_secret<T>(&self, request: &Request<T>) -> Result<(), tonic::Status> {
            let Some(secret) = self.secret else {
                return Ok(());
            };
            match request.metadata().get(crate::auth::SECRET_HEADER) {
                Some(value) if value.as_bytes() == secret.as_bytes() => Ok(()),
                _ => Err(tonic::Status::unauthenticated("wrong telemetry secret")),
            }
        }

        fn consume_controls(&self, request: Request<TonicStreaming<TelemetryControl>>) {
            let mut inbound = request.into_inner();
            let controls = self.controls.clone();
            tokio::spawn(async move {
                while let Some(Ok(control)) = inbound.next().await {
                    let _ = controls.send(control);
                }
            });
        }

        fn respond<T: Send + 'static>(&self, items: Vec<T>) -> Boxed<T> {
            let items = tokio_stream::iter(items.into_iter().map(Ok));
            let items: Boxed<T> = if self.one_by_one {
                Box::pin(OneByOne {
                    inner: items,
                    ready: false,
                })
            } else {
                Box::pin(items)
            };
            if self.hold_open {
                Box::pin(items.chain(tokio_stream::pending()))
            } else {
                items
            }
        }
    }

    #[tonic::async_trait]
    impl BridgeService for FakeWorker {
        type StreamTelemetryStream = EventStream;
        type StreamTelemetryBatchesStream = BatchStream;

        async fn stream_telemetry(
            &self,
            request: Request<TonicStreaming<TelemetryControl>>,
        ) -> Result<Response<EventStream>, tonic::Status> {
            self.check_secret(&request)?;
            self.consume_controls(request);
            Ok(Response::new(self.respond(self.events.clone())))
        }

        async fn stream_telemetry_batches(
            &self,
            request: Request<TonicStreaming<TelemetryControl>>,
        ) -> Result<Response<BatchStream>, tonic::Status> {
            let Some(batches) = &self.batches else {
                return Err(tonic::Status::unimplemented("no batches here"));
            };
            self.check_secret(&request)?;
            self.consume_controls(request);
            Ok(Response::new(self.respond(batches.clone())))
        }
    }

    fn event(name: &str, correlation_id: &str) -> TelemetryEvent {
        TelemetryEvent {
            event_parts: name.split('.').map(String::from).collect(),
            metadata: HashMap::from([("command".to_string(), "predict".to_string())]),
            correlation_id: correlation_id.into(),
            ..Default::default()
        }
    }

    enum Seen {
        Status(Status),
        Events(Vec<Decoded>),
    }

    /// Passes everything on; with `ack`, acknowledges events at once, like
    /// an owner that keeps up.
    struct ChannelSink {
        tx: mpsc::UnboundedSender<Seen>,
        ack: Option<Arc<Credit>>,
    }

    impl Sink for ChannelSink {
        fn status(&mut self, status: Status) {
            let _ = self.tx.send(Seen::Status(status));
        }
        fn events(&mut self, batch: Vec<Decoded>) {
            if let Some(credit) = &self.ack {
                credit.release(batch.len());
            }
            let _ = self.tx.send(Seen::Events(batch));
        }
    }

    struct Harness {
        seen: mpsc::UnboundedReceiver<Seen>,
        controls_tx: mpsc::Sender<TelemetryControl>,
        stop: Option<oneshot::Sender<()>>,
        stats: Arc<StreamStats>,
        credit: Arc<Credit>,
        task: tokio::task::JoinHandle<()>,
    }

    /// A stream whose owner keeps up (the sink acknowledges every batch).
    fn start(address: Address, config: StreamConfig) -> Harness {
        start_inner(address, config, 8_192, true)
    }

    /// A stream whose owner acknowledges nothing unless the test releases
    /// `h.credit`.
    fn start_with_credit(address: Address, config: StreamConfig, credit: usize) -> Harness {
        start_inner(address, config, credit, false)
    }

    fn start_inner(address: Address, config: StreamConfig, credit: usize, ack: bool) -> Harness {
        let (tx, seen) = mpsc::unbounded_channel();
        let (controls_tx, controls_rx) = mpsc::channel(8);
        let (stop_tx, stop_rx) = oneshot::channel();
        let stats = Arc::new(StreamStats::default());
        let credit = Arc::new(Credit::new(credit));
        let sink = ChannelSink {
            tx,
            ack: ack.then(|| credit.clone()),
        };
        let task = tokio::spawn(run(
            address,
            config,
            controls_rx,
            stop_rx,
            stats.clone(),
            credit.clone(),
            sink,
        ));
        Harness {
            seen,
            controls_tx,
            stop: Some(stop_tx),
            stats,
            credit,
            task,
        }
    }

    async fn next(h: &mut Harness) -> Seen {
        tokio::time::timeout(Duration::from_secs(10), h.seen.recv())
            .await
            .expect("stream reported in time")
            .expect("sink open")
    }

    async fn expect_status(h: &mut Harness, want: Status) {
        match next(h).await {
            Seen::Status(got) => assert_eq!(got, want),
            Seen::Events(b) => panic!("expected {want:?}, got {} events", b.len()),
        }
    }

    /// Collects events until the stream closes; returns them and the reason.
    async fn collect_until_closed(h: &mut Harness) -> (Vec<Decoded>, CloseReason) {
        let mut all = Vec::new();
        loop {
            match next(h).await {
                Seen::Events(batch) => all.extend(batch),
                Seen::Status(Status::Closed(reason)) => return (all, reason),
                Seen::Status(other) => panic!("unexpected {other:?}"),
            }
        }
    }

    /// A worker with only `StreamTelemetry`.
    fn worker(
        events: Vec<TelemetryEvent>,
        hold_open: bool,
    ) -> (FakeWorker, mpsc::UnboundedReceiver<TelemetryControl>) {
        let (controls, rx) = mpsc::unbounded_channel();
        (
            FakeWorker {
                events,
                controls,
                hold_open,
                batches: None,
                one_by_one: false,
                secret: None,
            },
            rx,
        )
    }

    /// A worker that also serves `StreamTelemetryBatches`, with these
    /// messages (its `StreamTelemetry` would send none).
    fn batch_worker(
        batches: Vec<Vec<TelemetryEvent>>,
        hold_open: bool,
    ) -> (FakeWorker, mpsc::UnboundedReceiver<TelemetryControl>) {
        let batches = batches
            .into_iter()
            .map(|events| TelemetryEventBatch {
                events,
                base_timestamp_ns: 0,
            })
            .collect();
        let (worker, rx) = worker(Vec::new(), hold_open);
        (
            FakeWorker {
                batches: Some(batches),
                ..worker
            },
            rx,
        )
    }

    /// `n` events whose correlation ids are their positions.
    fn numbered(n: usize) -> Vec<TelemetryEvent> {
        (0..n)
            .map(|i| event("python.call.stop", &i.to_string()))
            .collect()
    }

    fn positions(events: &[Decoded]) -> Vec<usize> {
        events
            .iter()
            .map(|e| e.correlation_id.as_deref().unwrap().parse().unwrap())
            .collect()
    }

    /// Events the sink gets until it has been quiet for `quiet`.
    async fn collect_quiet(h: &mut Harness, quiet: Duration) -> Vec<Decoded> {
        let mut all = Vec::new();
        while let Ok(seen) = tokio::time::timeout(quiet, h.seen.recv()).await {
            match seen.expect("sink open") {
                Seen::Events(batch) => all.extend(batch),
                Seen::Status(status) => panic!("unexpected {status:?}"),
            }
        }
        all
    }

    async fn serve_tcp(worker: FakeWorker) -> Address {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = Address::Tcp(listener.local_addr().unwrap().to_string());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(BridgeServiceServer::new(worker))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        address
    }

    fn serve_unix(worker: FakeWorker, path: &std::path::Path) {
        let listener = UnixListener::bind(path).unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(BridgeServiceServer::new(worker))
                .serve_with_incoming(UnixListenerStream::new(listener)),
        );
    }

    fn socket_path(tag: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("snakepit-core-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    /// The dotted Python names of decoded catalog events, in order.
    fn python_names(events: &[Decoded]) -> Vec<&'static str> {
        events
            .iter()
            .filter_map(|e| e.event.spec().and_then(|s| s.python))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_stream_delivers_decoded_events_and_ends() {
        let events = vec![
            event("python.call.start", "c1"),
            event("zz.unknown.evt", "c1"),
            event("python.call.stop", "c1"),
        ];
        let (worker, mut controls) = worker(events, false);
        let address = serve_tcp(worker).await;
        let mut h = start(address, StreamConfig::default());

        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Events)).await;
        let (events, reason) = collect_until_closed(&mut h).await;
        assert_eq!(reason, CloseReason::EndOfStream);

        assert_eq!(
            python_names(&events),
            ["python.call.start", "python.call.stop"]
        );
        assert_eq!(events[0].correlation_id.as_deref(), Some("c1"));
        assert_eq!(
            events[0].metadata,
            vec![(Key::Known(Sym::command), "predict".to_string())]
        );
        assert_eq!(StreamStats::get(&h.stats.received), 3);
        assert_eq!(StreamStats::get(&h.stats.dropped_unknown_event), 1);

        // Every stream starts by switching the worker's telemetry on.
        let first = controls.recv().await.expect("a control message");
        assert_eq!(first, enable());
        h.task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn controls_reach_the_worker_and_stop_closes() {
        let (worker, mut controls) = worker(vec![event("python.call.start", "")], true);
        let address = serve_tcp(worker).await;
        let mut h = start(address, StreamConfig::default());
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Events)).await;
        assert_eq!(controls.recv().await, Some(enable()));
        // The worker's one event is read before the toggle below: on a
        // StreamTelemetry worker the stream enforces toggles itself, so an
        // event read after it would be dropped (enforced_disabled).
        tokio::time::timeout(Duration::from_secs(5), async {
            while StreamStats::get(&h.stats.received) < 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the worker's event is read");

        let off = TelemetryControl {
            control: Some(telemetry_control::Control::Toggle(TelemetryToggle {
                enabled: false,
            })),
        };
        h.controls_tx.send(off.clone()).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), controls.recv())
            .await
            .unwrap();
        assert_eq!(got, Some(off));

        h.stop.take().unwrap().send(()).unwrap();
        let (events, reason) = collect_until_closed(&mut h).await;
        assert_eq!(reason, CloseReason::Stopped);
        assert_eq!(events.len(), 1);
        assert_eq!(StreamStats::get(&h.stats.controls_sent), 2);
        h.task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_every_handle_ends_the_stream() {
        let (worker, _controls) = worker(vec![], true);
        let address = serve_tcp(worker).await;
        let mut h = start(address, StreamConfig::default());
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Events)).await;
        drop(h.stop.take());
        let (_, reason) = collect_until_closed(&mut h).await;
        assert_eq!(reason, CloseReason::Stopped);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unix_socket_and_retry_until_the_worker_listens() {
        let path = socket_path("retry");
        let mut h = start(Address::Unix(path.clone()), StreamConfig::default());
        expect_status(&mut h, Status::Connecting).await;
        tokio::time::sleep(Duration::from_millis(350)).await;
        let (worker, _controls) = worker(vec![event("tool.result_size", "")], false);
        serve_unix(worker, &path);

        expect_status(&mut h, Status::Open(Protocol::Events)).await;
        let (events, reason) = collect_until_closed(&mut h).await;
        assert_eq!(reason, CloseReason::EndOfStream);
        assert_eq!(events.len(), 1);
        assert!(StreamStats::get(&h.stats.connect_attempts) >= 2);
        let _ = std::fs::remove_file(path);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn controls_fail_once_closed_is_reported() {
        let config = StreamConfig {
            connect_timeout: Duration::from_millis(100),
            retry_interval: Duration::from_millis(20),
            ..StreamConfig::default()
        };
        for _ in 0..20 {
            let mut h = start(Address::Unix(socket_path("closed")), config.clone());
            expect_status(&mut h, Status::Connecting).await;
            match next(&mut h).await {
                Seen::Status(Status::Closed(CloseReason::ConnectFailed(_))) => {}
                _ => panic!("expected a connect failure"),
            }
            assert!(h.controls_tx.try_send(enable()).is_err());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gives_up_after_the_connect_timeout() {
        let config = StreamConfig {
            connect_timeout: Duration::from_millis(300),
            retry_interval: Duration::from_millis(50),
            ..StreamConfig::default()
        };
        let mut h = start(Address::Unix(socket_path("nobody")), config);
        expect_status(&mut h, Status::Connecting).await;
        match next(&mut h).await {
            Seen::Status(Status::Closed(CloseReason::ConnectFailed(error))) => {
                assert!(!error.is_empty());
            }
            _ => panic!("expected a connect failure"),
        }
        assert!(StreamStats::get(&h.stats.connect_attempts) >= 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_events_arrive_in_batches_and_are_all_accounted_for() {
        let events: Vec<_> = (0..5_000).map(|_| event("python.call.stop", "")).collect();
        let (worker, _controls) = worker(events, false);
        let address = serve_tcp(worker).await;
        let mut h = start(
            address,
            StreamConfig {
                max_batch: 100,
                ..StreamConfig::default()
            },
        );
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Events)).await;
        let mut batches = 0;
        let mut total = 0;
        loop {
            match next(&mut h).await {
                Seen::Events(batch) => {
                    assert!(batch.len() <= 100);
                    batches += 1;
                    total += batch.len();
                }
                Seen::Status(Status::Closed(reason)) => {
                    assert_eq!(reason, CloseReason::EndOfStream);
                    break;
                }
                Seen::Status(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(total, 5_000);
        assert!(batches < 5_000, "events were batched ({batches} batches)");
        assert_eq!(StreamStats::get(&h.stats.received), 5_000);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn falls_back_to_stream_telemetry_when_batches_are_unimplemented() {
        let (worker, mut controls) = worker(numbered(50), false);
        let address = serve_tcp(worker).await;
        let mut h = start(address, StreamConfig::default());
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Events)).await;
        let (events, reason) = collect_until_closed(&mut h).await;
        assert_eq!(reason, CloseReason::EndOfStream);
        assert_eq!(positions(&events), (0..50).collect::<Vec<_>>());
        assert_eq!(StreamStats::get(&h.stats.fallbacks), 1);
        assert_eq!(StreamStats::get(&h.stats.wire_messages), 50);
        assert_eq!(StreamStats::get(&h.stats.received), 50);
        assert_eq!(StreamStats::get(&h.stats.connect_attempts), 1);
        // The fallback call starts with its own toggle-on.
        assert_eq!(controls.recv().await, Some(enable()));
        assert_eq!(StreamStats::get(&h.stats.controls_sent), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_carry_many_events_per_message_in_order() {
        // 1000 events in messages of 7; sink batches of about 10 wire events
        // cut across message boundaries, but never split a message.
        let batches: Vec<Vec<_>> = numbered(1_000).chunks(7).map(<[_]>::to_vec).collect();
        let (worker, mut controls) = batch_worker(batches, false);
        let address = serve_tcp(worker).await;
        let mut h = start(
            address,
            StreamConfig {
                max_batch: 10,
                ..StreamConfig::default()
            },
        );
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Batches)).await;
        let mut all = Vec::new();
        loop {
            match next(&mut h).await {
                Seen::Events(batch) => {
                    let last = positions(&batch).last().copied().unwrap();
                    assert!(
                        batch.len() % 7 == 0 || last == 999,
                        "a message was split: {} events",
                        batch.len()
                    );
                    assert!(batch.len() <= 14);
                    all.extend(batch);
                }
                Seen::Status(Status::Closed(reason)) => {
                    assert_eq!(reason, CloseReason::EndOfStream);
                    break;
                }
                Seen::Status(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(positions(&all), (0..1_000).collect::<Vec<_>>());
        assert_eq!(StreamStats::get(&h.stats.wire_messages), 143);
        assert_eq!(StreamStats::get(&h.stats.received), 1_000);
        assert_eq!(StreamStats::get(&h.stats.fallbacks), 0);
        assert_eq!(controls.recv().await, Some(enable()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_base_timestamp_is_added_to_its_events() {
        let at = |offset: i64| TelemetryEvent {
            timestamp_ns: offset,
            ..event("python.call.stop", "")
        };
        let batch = |base: i64, events: Vec<TelemetryEvent>| TelemetryEventBatch {
            events,
            base_timestamp_ns: base,
        };
        let (mut worker, _controls) = batch_worker(vec![], false);
        worker.batches = Some(vec![
            batch(1_700_000_000_000_000_000, vec![at(0), at(1_500)]),
            batch(0, vec![at(42)]),
            batch(i64::MAX, vec![at(10)]),
        ]);
        let address = serve_tcp(worker).await;
        let mut h = start(address, StreamConfig::default());
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Batches)).await;
        let (events, _) = collect_until_closed(&mut h).await;
        let times: Vec<_> = events.iter().map(|e| e.timestamp_ns).collect();
        assert_eq!(
            times,
            [
                1_700_000_000_000_000_000,
                1_700_000_000_000_001_500,
                42,
                i64::MAX
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn empty_and_partly_unknown_batches() {
        let batches = vec![
            vec![],
            vec![event("python.call.start", "a"), event("zz.unknown.evt", "")],
            vec![],
            vec![event("python.call.stop", "a")],
        ];
        let (worker, _controls) = batch_worker(batches, false);
        let address = serve_tcp(worker).await;
        let mut h = start(address, StreamConfig::default());
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Batches)).await;
        let (events, reason) = collect_until_closed(&mut h).await;
        assert_eq!(reason, CloseReason::EndOfStream);
        assert_eq!(
            python_names(&events),
            ["python.call.start", "python.call.stop"]
        );
        let s = &h.stats;
        assert_eq!(StreamStats::get(&s.wire_messages), 4);
        assert_eq!(StreamStats::get(&s.received), 3);
        assert_eq!(
            StreamStats::get(&s.received),
            events.len() as u64 + StreamStats::get(&s.dropped_unknown_event)
        );
    }

    /// Without credit the stream stops reading (controls still pass), and
    /// resumes once enough is released; nothing is lost or reordered.
    async fn credit_bounds_what_is_pending(h: &mut Harness, message: usize, total: usize) {
        let quiet = Duration::from_millis(300);
        let first = collect_quiet(h, quiet).await;
        assert!(
            (100..100 + message).contains(&first.len()),
            "{} events handed on with a credit of 100",
            first.len()
        );
        assert_eq!(h.credit.pending(), first.len());
        assert!(StreamStats::get(&h.stats.credit_waits) >= 1);

        // Above the resume mark: still paused.
        h.credit.release(first.len() - 60);
        assert!(collect_quiet(h, quiet).await.is_empty());

        let mut all = first;
        while all.len() < total {
            h.credit.release(h.credit.pending());
            let more = collect_quiet(h, quiet).await;
            assert!(!more.is_empty(), "resumed after the release");
            assert!(h.credit.pending() < 100 + message);
            all.extend(more);
        }
        assert_eq!(positions(&all), (0..total).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_credit_no_reading_with_single_events() {
        let (worker, mut controls) = worker(numbered(1_000), true);
        let address = serve_tcp(worker).await;
        let mut h = start_with_credit(address, StreamConfig::default(), 100);
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Events)).await;
        assert_eq!(controls.recv().await, Some(enable()));
        tokio::time::sleep(Duration::from_millis(200)).await;

        // Controls go through while the stream waits for credit.
        assert!(StreamStats::get(&h.stats.credit_waits) >= 1);
        h.controls_tx.send(enable()).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), controls.recv()).await;
        assert_eq!(got.unwrap(), Some(enable()));

        credit_bounds_what_is_pending(&mut h, 1, 1_000).await;
        h.stop.take().unwrap().send(()).unwrap();
        let (_, reason) = collect_until_closed(&mut h).await;
        assert_eq!(reason, CloseReason::Stopped);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_credit_no_reading_with_batches() {
        let batches: Vec<Vec<_>> = numbered(1_000).chunks(30).map(<[_]>::to_vec).collect();
        let (worker, _controls) = batch_worker(batches, true);
        let address = serve_tcp(worker).await;
        let mut h = start_with_credit(address, StreamConfig::default(), 100);
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Batches)).await;
        credit_bounds_what_is_pending(&mut h, 30, 1_000).await;
    }

    /// A paused stream leaves the worker's small DATA frames buffered in
    /// h2, which closes the connection (ENHANCE_YOUR_CALM) once their
    /// framing overhead exceeds its budget. The windows keep that from
    /// happening to a well-behaved worker, however small its events.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paused_stream_of_tiny_messages_stays_open() {
        let tiny = TelemetryEvent {
            event_parts: vec!["tool".into(), "result_size".into()],
            ..Default::default()
        };
        // Enough that the old windows (2 MiB stream, 5 MiB connection) let
        // h2's budget run out.
        let total = 30_000;
        let (mut worker, _controls) = worker(vec![tiny; total], true);
        worker.one_by_one = true;
        let address = serve_tcp(worker).await;
        let mut h = start_with_credit(address, StreamConfig::default(), 100);
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Events)).await;

        // Paused with at most a window's worth of frames buffered.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let mut got = collect_quiet(&mut h, Duration::from_millis(200))
            .await
            .len();
        assert_eq!(got, 100);
        // An owner that acknowledges each batch as it handles it.
        h.credit.release(got);
        while got < total {
            match next(&mut h).await {
                Seen::Events(batch) => {
                    got += batch.len();
                    h.credit.release(batch.len());
                }
                Seen::Status(status) => panic!("unexpected {status:?} after {got} events"),
            }
        }
        assert_eq!(got, total);
        assert_eq!(StreamStats::get(&h.stats.wire_messages), total as u64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_owner_gets_few_large_batches_in_order() {
        let total = 5_000;
        let (mut worker, _controls) = worker(numbered(total), true);
        worker.one_by_one = true;
        let address = serve_tcp(worker).await;
        let mut h = start_with_credit(address, StreamConfig::default(), 1_000);
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Events)).await;
        let mut all = Vec::new();
        let mut batches = 0;
        while all.len() < total {
            match next(&mut h).await {
                Seen::Events(batch) => {
                    // Never more than the credit outstanding (one-event
                    // messages: no overshoot).
                    assert!(h.credit.pending() <= 1_000);
                    batches += 1;
                    // A slow owner: 10 ms per batch, then the ack.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    h.credit.release(batch.len());
                    all.extend(batch);
                }
                Seen::Status(status) => panic!("unexpected {status:?}"),
            }
        }
        assert_eq!(positions(&all), (0..total).collect::<Vec<_>>());
        assert!(batches < 100, "{batches} batches for {total} events");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_held_for_a_busy_owner_are_delivered_on_stop() {
        let (mut worker, _controls) = worker(numbered(50), true);
        worker.one_by_one = true;
        let address = serve_tcp(worker).await;
        // The owner never acknowledges: after the first batch, events are
        // held back (less than the credit and a batch).
        let mut h = start_with_credit(address, StreamConfig::default(), 1_000);
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Events)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(StreamStats::get(&h.stats.received), 50);
        h.stop.take().unwrap().send(()).unwrap();
        let (events, reason) = collect_until_closed(&mut h).await;
        assert_eq!(reason, CloseReason::Stopped);
        assert_eq!(positions(&events), (0..50).collect::<Vec<_>>());
        assert_eq!(h.credit.pending(), 50);
    }

    /// A TCP listener that accepts connections and never says anything
    /// (no HTTP/2 settings, no response). Keeps the sockets open.
    async fn silent_listener() -> (Address, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = Address::Tcp(listener.local_addr().unwrap().to_string());
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
            }
        });
        (address, accepted)
    }

    async fn expect_connect_failed(h: &mut Harness) -> String {
        match next(h).await {
            Seen::Status(Status::Closed(CloseReason::ConnectFailed(error))) => error,
            Seen::Status(other) => panic!("expected a connect failure, got {other:?}"),
            Seen::Events(_) => panic!("expected a connect failure, got events"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_that_accepts_and_never_answers_times_out_a_lone_attempt() {
        let (address, accepted) = silent_listener().await;
        // connect_timeout zero, as on a reconnect: one attempt, bounded by
        // the open timeout.
        let config = StreamConfig {
            connect_timeout: Duration::ZERO,
            open_timeout: Duration::from_millis(200),
            ..StreamConfig::default()
        };
        let mut h = start(address, config);
        expect_status(&mut h, Status::Connecting).await;
        let error = expect_connect_failed(&mut h).await;
        assert_eq!(error, "open timed out after 200 ms");
        assert_eq!(StreamStats::get(&h.stats.open_timeouts), 1);
        assert_eq!(StreamStats::get(&h.stats.connect_attempts), 1);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_connect_timeout_bounds_a_first_open_to_a_silent_worker() {
        let (address, _accepted) = silent_listener().await;
        // The open timeout is longer than the whole connect timeout: the
        // attempt is cut at the connect deadline.
        let config = StreamConfig {
            connect_timeout: Duration::from_millis(300),
            open_timeout: Duration::from_secs(3_600),
            retry_interval: Duration::from_millis(20),
            ..StreamConfig::default()
        };
        let mut h = start(address, config);
        expect_status(&mut h, Status::Connecting).await;
        let error = expect_connect_failed(&mut h).await;
        assert!(error.starts_with("open timed out after"), "{error}");
        assert!(StreamStats::get(&h.stats.open_timeouts) >= 1);
        assert_eq!(
            StreamStats::get(&h.stats.open_timeouts),
            StreamStats::get(&h.stats.connect_attempts)
        );
    }

    /// Completes HTTP/2 and accepts the call, but never sends its response
    /// headers (on `StreamTelemetryBatches`, or, with `batches: false`, on
    /// the `StreamTelemetry` fallback).
    struct Mute {
        batches: bool,
        calls: Arc<AtomicUsize>,
    }

    #[tonic::async_trait]
    impl BridgeService for Mute {
        type StreamTelemetryStream = EventStream;
        type StreamTelemetryBatchesStream = BatchStream;

        async fn stream_telemetry(
            &self,
            _request: Request<TonicStreaming<TelemetryControl>>,
        ) -> Result<Response<EventStream>, tonic::Status> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            std::future::pending().await
        }

        async fn stream_telemetry_batches(
            &self,
            _request: Request<TonicStreaming<TelemetryControl>>,
        ) -> Result<Response<BatchStream>, tonic::Status> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if !self.batches {
                return Err(tonic::Status::unimplemented("no batches here"));
            }
            std::future::pending().await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_that_never_sends_response_headers_times_out() {
        for batches in [true, false] {
            let calls = Arc::new(AtomicUsize::new(0));
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = Address::Tcp(listener.local_addr().unwrap().to_string());
            let mute = Mute {
                batches,
                calls: calls.clone(),
            };
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(BridgeServiceServer::new(mute))
                    .serve_with_incoming(TcpListenerStream::new(listener)),
            );
            let config = StreamConfig {
                connect_timeout: Duration::ZERO,
                open_timeout: Duration::from_millis(300),
                ..StreamConfig::default()
            };
            let mut h = start(address, config);
            expect_status(&mut h, Status::Connecting).await;
            let error = expect_connect_failed(&mut h).await;
            assert_eq!(error, "open timed out after 300 ms", "batches: {batches}");
            assert_eq!(StreamStats::get(&h.stats.open_timeouts), 1);
            // Without batches, the fallback call was made (and hung).
            let want = if batches { 1 } else { 2 };
            assert_eq!(calls.load(Ordering::SeqCst), want, "batches: {batches}");
        }
    }

    const FORWARD: u8 = 0;
    const FREEZE: u8 = 1;
    const CUT: u8 = 2;

    /// A TCP proxy in front of `upstream` that forwards both directions
    /// while `mode` is `FORWARD`. On `FREEZE` it stops reading and writing
    /// and holds the sockets open (a network black hole); on `CUT` it
    /// closes them (a dead worker).
    async fn freezing_proxy(upstream: Address, mode: Arc<AtomicU8>) -> Address {
        let Address::Tcp(upstream) = upstream else {
            unreachable!()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = Address::Tcp(listener.local_addr().unwrap().to_string());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(forward(client_read, server_write, mode.clone()));
                tokio::spawn(forward(server_read, client_write, mode.clone()));
            }
        });
        address
    }

    async fn forward(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mode: Arc<AtomicU8>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = tokio::select! {
                read = from.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                // Stop at once when the mode changes.
                () = async {
                    while mode.load(Ordering::SeqCst) == FORWARD {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                } => {
                    hold_if_frozen(&mode).await;
                    return;
                }
            };
            if mode.load(Ordering::SeqCst) != FORWARD {
                hold_if_frozen(&mode).await;
                return;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unanswered_keepalive_closes_a_hung_stream() {
        let (worker, _controls) = batch_worker(vec![vec![event("python.call.stop", "k")]], true);
        let upstream = serve_tcp(worker).await;
        let mode = Arc::new(AtomicU8::new(FORWARD));
        let address = freezing_proxy(upstream, mode.clone()).await;
        let config = StreamConfig {
            keepalive_interval: Some(Duration::from_millis(200)),
            keepalive_timeout: Duration::from_millis(300),
            ..StreamConfig::default()
        };
        let mut h = start(address, config);
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Batches)).await;
        match next(&mut h).await {
            Seen::Events(batch) => assert_eq!(batch.len(), 1),
            Seen::Status(status) => panic!("unexpected {status:?}"),
        }
        // Answered PINGs keep an idle stream open.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(h.seen.is_empty(), "the idle stream stayed open");
        mode.store(FREEZE, Ordering::SeqCst);
        let (events, reason) = collect_until_closed(&mut h).await;
        assert!(events.is_empty());
        assert_eq!(reason, CloseReason::KeepaliveTimeout);
        assert_eq!(StreamStats::get(&h.stats.keepalive_timeouts), 1);
    }

    async fn hold_if_frozen(mode: &AtomicU8) {
        if mode.load(Ordering::SeqCst) == FREEZE {
            // Hold both halves open, silent, for good.
            std::future::pending::<()>().await;
        }
    }

    /// A connection that dies (EOF) after a long idle spell is an error,
    /// not a keepalive timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_connection_is_not_taken_for_a_keepalive_timeout() {
        let (worker, _controls) = batch_worker(vec![vec![event("python.call.stop", "k")]], true);
        let upstream = serve_tcp(worker).await;
        let mode = Arc::new(AtomicU8::new(FORWARD));
        let address = freezing_proxy(upstream, mode.clone()).await;
        // PINGs every 300 ms, so the connection is silent for up to 300 ms
        // at a time, longer than the PING answer deadline.
        let config = StreamConfig {
            keepalive_interval: Some(Duration::from_millis(300)),
            keepalive_timeout: Duration::from_millis(100),
            ..StreamConfig::default()
        };
        let mut h = start(address, config);
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Batches)).await;
        assert!(matches!(next(&mut h).await, Seen::Events(_)));
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert!(h.seen.is_empty(), "the idle stream stayed open");
        mode.store(CUT, Ordering::SeqCst);
        let (_, reason) = collect_until_closed(&mut h).await;
        assert!(matches!(reason, CloseReason::Error(_)), "{reason:?}");
        assert_eq!(StreamStats::get(&h.stats.keepalive_timeouts), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_oversized_message_is_counted_with_its_size_and_ends_the_call() {
        let big = TelemetryEvent {
            metadata: HashMap::from([("blob".to_string(), "x".repeat(2_000))]),
            ..event("python.call.stop", "big")
        };
        let size = TelemetryEventBatch {
            events: vec![big.clone()],
            base_timestamp_ns: 0,
        }
        .encoded_len() as u64;
        let batches = vec![vec![event("python.call.start", "a")], vec![big]];
        let (worker, _controls) = batch_worker(batches, true);
        let address = serve_tcp(worker).await;
        let config = StreamConfig {
            max_message_bytes: 1_000,
            ..StreamConfig::default()
        };
        let mut h = start(address, config);
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Batches)).await;
        let (events, reason) = collect_until_closed(&mut h).await;
        assert_eq!(positions_or_ids(&events), ["a"]);
        match reason {
            CloseReason::Error(text) => assert!(text.starts_with("OutOfRange"), "{text}"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(StreamStats::get(&h.stats.oversized_messages), 1);
        assert_eq!(StreamStats::get(&h.stats.oversized_bytes_max), size);
        assert_eq!(StreamStats::get(&h.stats.received), 1);
    }

    fn positions_or_ids(events: &[Decoded]) -> Vec<&str> {
        events
            .iter()
            .map(|e| e.correlation_id.as_deref().unwrap_or(""))
            .collect()
    }

    /// Bytes that mark a correlation id for [`corrupting_proxy`] to turn
    /// into invalid UTF-8 (same length, so all framing stays valid).
    const MARKER: &[u8] = b"CORRUPT-ME-PLEASE";

    /// A TCP proxy in front of `upstream` that replaces every [`MARKER`] in
    /// what the worker sends with 0xFF bytes.
    async fn corrupting_proxy(upstream: Address) -> Address {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Address::Tcp(upstream) = upstream else {
            unreachable!()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = Address::Tcp(listener.local_addr().unwrap().to_string());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut pending: Vec<u8> = Vec::new();
                    loop {
                        let n = match server_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        pending.extend_from_slice(&buf[..n]);
                        let mut i = 0;
                        while i + MARKER.len() <= pending.len() {
                            if &pending[i..i + MARKER.len()] == MARKER {
                                pending[i..i + MARKER.len()].fill(0xff);
                                i += MARKER.len();
                            } else {
                                i += 1;
                            }
                        }
                        // Hold back a tail that may be the start of a
                        // marker split across reads.
                        let keep = (1..MARKER.len())
                            .rev()
                            .find(|k| pending.ends_with(&MARKER[..*k]))
                            .unwrap_or(0);
                        let send = pending.len() - keep;
                        if client_write.write_all(&pending[..send]).await.is_err() {
                            return;
                        }
                        pending.drain(..send);
                    }
                });
            }
        });
        address
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_with_invalid_utf8_is_dropped_alone_over_the_wire() {
        let marker = std::str::from_utf8(MARKER).unwrap();
        // Batches: the bad event's neighbours in its message are delivered.
        let batches = vec![
            vec![
                event("python.call.start", "a"),
                event("python.call.stop", marker),
                event("python.call.stop", "b"),
            ],
            vec![event("python.call.stop", "c")],
        ];
        let (batched, _controls) = batch_worker(batches, false);
        let address = corrupting_proxy(serve_tcp(batched).await).await;
        let mut h = start(address, StreamConfig::default());
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Batches)).await;
        let (events, reason) = collect_until_closed(&mut h).await;
        assert_eq!(reason, CloseReason::EndOfStream);
        assert_eq!(positions_or_ids(&events), ["a", "b", "c"]);
        let s = &h.stats;
        assert_eq!(StreamStats::get(&s.received), 4);
        assert_eq!(StreamStats::get(&s.dropped_malformed), 1);
        assert_eq!(StreamStats::get(&s.malformed_messages), 0);
        assert_eq!(StreamStats::get(&s.wire_messages), 2);

        // Single events: the bad message is one malformed event.
        let events = vec![
            event("python.call.start", "a"),
            event("python.call.stop", marker),
            event("python.call.stop", "b"),
        ];
        let (single, _controls) = worker(events, false);
        let address = corrupting_proxy(serve_tcp(single).await).await;
        let mut h = start(address, StreamConfig::default());
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Events)).await;
        let (events, reason) = collect_until_closed(&mut h).await;
        assert_eq!(reason, CloseReason::EndOfStream);
        assert_eq!(positions_or_ids(&events), ["a", "b"]);
        assert_eq!(StreamStats::get(&h.stats.received), 3);
        assert_eq!(StreamStats::get(&h.stats.dropped_malformed), 1);
    }

    fn sampling(rate: f64, patterns: &[&str]) -> TelemetryControl {
        TelemetryControl {
            control: Some(telemetry_control::Control::Sampling(
                crate::proto::TelemetrySamplingUpdate {
                    sampling_rate: rate,
                    event_patterns: patterns.iter().map(|p| p.to_string()).collect(),
                },
            )),
        }
    }

    fn toggle(enabled: bool) -> TelemetryControl {
        TelemetryControl {
            control: Some(telemetry_control::Control::Toggle(TelemetryToggle {
                enabled,
            })),
        }
    }

    /// A control state set before the stream opened: python.call.* at 0.0,
    /// tool.* denied.
    fn seeded_control() -> StreamConfig {
        StreamConfig {
            control: ControlState::new(
                true,
                1.0,
                vec![(0.0, vec!["python.call.*".into()])],
                vec![],
                vec!["tool.*".into()],
            ),
            ..StreamConfig::default()
        }
    }

    fn mixed_events() -> Vec<TelemetryEvent> {
        vec![
            event("python.call.start", "s1"),
            event("python.gc.completed", "g1"),
            event("tool.result_size", "t1"),
            event("python.call.stop", "s1"),
            event("python.memory.sampled", "m1"),
        ]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_telemetry_worker_gets_control_enforced_from_the_first_event() {
        // Events a worker buffered before the call opened reach the stream
        // before any control message: the seeded state applies to them.
        let (worker, mut controls) = worker(mixed_events(), true);
        let address = serve_tcp(worker).await;
        let mut h = start(address, seeded_control());
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Events)).await;
        let mut got = Vec::new();
        while got.len() < 2 {
            match next(&mut h).await {
                Seen::Events(batch) => got.extend(batch),
                Seen::Status(status) => panic!("unexpected {status:?}"),
            }
        }
        assert_eq!(
            python_names(&got),
            ["python.gc.completed", "python.memory.sampled"]
        );
        assert_eq!(StreamStats::get(&h.stats.enforced_sampled), 2);
        assert_eq!(StreamStats::get(&h.stats.enforced_filtered), 1);
        assert_eq!(StreamStats::get(&h.stats.received), 5);
        // What the owner sends on open: the worker gets toggle and filter,
        // and a neutral rate in place of each sampling update.
        let deny = TelemetryControl {
            control: Some(telemetry_control::Control::Filter(
                crate::proto::TelemetryEventFilter {
                    allow: vec![],
                    deny: vec!["tool.*".into()],
                },
            )),
        };
        for control in [
            toggle(true),
            sampling(0.5, &[]),
            sampling(0.0, &["python.call.*"]),
            deny.clone(),
            toggle(false),
        ] {
            h.controls_tx.send(control).await.unwrap();
        }
        let mut seen = Vec::new();
        while seen.len() < 5 {
            let control = tokio::time::timeout(Duration::from_secs(10), controls.recv())
                .await
                .expect("controls arrive")
                .expect("worker alive");
            seen.push(control);
        }
        assert_eq!(
            seen,
            [
                enable(),
                toggle(true),
                sampling(1.0, &[]),
                deny,
                toggle(false)
            ]
        );
        assert_eq!(StreamStats::get(&h.stats.controls_sent), 5);
        h.stop.take().unwrap().send(()).unwrap();
        h.task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batches_worker_applies_control_itself() {
        let (worker, mut controls) = batch_worker(vec![mixed_events()], true);
        let address = serve_tcp(worker).await;
        let mut h = start(address, seeded_control());
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Batches)).await;
        let mut got = Vec::new();
        while got.len() < 5 {
            match next(&mut h).await {
                Seen::Events(batch) => got.extend(batch),
                Seen::Status(status) => panic!("unexpected {status:?}"),
            }
        }
        assert_eq!(StreamStats::get(&h.stats.enforced_sampled), 0);
        assert_eq!(StreamStats::get(&h.stats.enforced_filtered), 0);
        // Pattern rules go to the worker as they are.
        h.controls_tx
            .send(sampling(0.0, &["python.call.*"]))
            .await
            .unwrap();
        assert_eq!(controls.recv().await, Some(enable()));
        assert_eq!(
            controls.recv().await,
            Some(sampling(0.0, &["python.call.*"]))
        );
        h.stop.take().unwrap().send(()).unwrap();
        h.task.await.unwrap();
    }

    const SECRET: &str = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3I";

    fn with_secret(secret: Option<&str>) -> StreamConfig {
        StreamConfig {
            connect_timeout: Duration::ZERO,
            secret: secret.map(|s| Secret::new(s.as_bytes()).unwrap()),
            ..StreamConfig::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_secret_goes_with_the_batches_call() {
        let (worker, _controls) = batch_worker(vec![numbered(3)], true);
        let worker = FakeWorker {
            secret: Some(SECRET),
            ..worker
        };
        let address = serve_tcp(worker).await;
        let mut h = start(address, with_secret(Some(SECRET)));
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Batches)).await;
        let mut got = Vec::new();
        while got.len() < 3 {
            match next(&mut h).await {
                Seen::Events(batch) => got.extend(batch),
                Seen::Status(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(positions(&got), vec![0, 1, 2]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_secret_goes_with_the_fallback_call_too() {
        let (worker, _controls) = worker(numbered(2), true);
        let worker = FakeWorker {
            secret: Some(SECRET),
            ..worker
        };
        let address = serve_tcp(worker).await;
        let mut h = start(address, with_secret(Some(SECRET)));
        expect_status(&mut h, Status::Connecting).await;
        expect_status(&mut h, Status::Open(Protocol::Events)).await;
        assert_eq!(StreamStats::get(&h.stats.fallbacks), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_or_wrong_secret_is_refused_and_never_opens() {
        for secret in [None, Some("d3Jvbmctd3Jvbmctd3Jvbmctd3Jvbmctd3Jvbmc")] {
            let (worker, _controls) = batch_worker(vec![numbered(1)], true);
            let worker = FakeWorker {
                secret: Some(SECRET),
                ..worker
            };
            let address = serve_tcp(worker).await;
            let mut h = start(address, with_secret(secret));
            expect_status(&mut h, Status::Connecting).await;
            let error = expect_connect_failed(&mut h).await;
            assert!(error.contains("wrong telemetry secret"), "{error}");
            assert!(!error.contains(SECRET));
        }
    }

    #[test]
    fn the_config_debug_hides_the_secret() {
        let shown = format!("{:?}", with_secret(Some(SECRET)));
        assert!(!shown.contains(SECRET), "{shown}");
    }
}
