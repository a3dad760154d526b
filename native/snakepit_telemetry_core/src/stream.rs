//! One telemetry stream: connect to a worker, keep the `StreamTelemetry` call
//! open, forward control messages to it and hand decoded events to a [`Sink`]
//! in batches.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Streaming;

use crate::decode::{DecodeConfig, Decoded, Decoder};
use crate::proto::bridge_service_client::BridgeServiceClient;
use crate::proto::{telemetry_control, TelemetryControl, TelemetryEvent, TelemetryToggle};
use crate::stats::StreamStats;

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
    /// How long to keep trying to connect before giving up.
    pub connect_timeout: Duration,
    /// Pause between connection attempts.
    pub retry_interval: Duration,
    /// Most wire events folded into one batch for the sink.
    pub max_batch: usize,
    /// Largest gRPC message accepted from the worker.
    pub max_message_bytes: usize,
    pub decode: DecodeConfig,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            connect_timeout: Duration::from_secs(10),
            retry_interval: Duration::from_millis(100),
            max_batch: 512,
            max_message_bytes: 4 * 1024 * 1024,
            decode: DecodeConfig::default(),
        }
    }
}

/// What a stream reports about itself, in order: `Connecting`, then `Open`
/// if a connection was made, then exactly one `Closed`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Connecting,
    Open,
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
    /// No connection within the connect timeout; holds the last error.
    ConnectFailed(String),
}

/// Receives what a stream produces. Called from the stream's task.
pub trait Sink: Send + 'static {
    fn status(&mut self, status: Status);
    /// A non-empty batch of decoded events. The sink accounts for them in
    /// the stream's stats (delivered or dropped).
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
    mut sink: S,
) {
    let _live = LiveGuard::new();
    sink.status(Status::Connecting);
    let reason = tokio::select! {
        biased;
        _ = &mut stop => CloseReason::Stopped,
        reason = session(&address, &config, &mut controls, &stats, &mut sink) => reason,
    };
    sink.status(Status::Closed(reason));
}

async fn session<S: Sink>(
    address: &Address,
    config: &StreamConfig,
    controls: &mut mpsc::Receiver<TelemetryControl>,
    stats: &StreamStats,
    sink: &mut S,
) -> CloseReason {
    let deadline = Instant::now() + config.connect_timeout;
    let (outbound, mut inbound) = loop {
        StreamStats::add(&stats.connect_attempts, 1);
        match open(address, config).await {
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
    sink.status(Status::Open);

    let mut decoder = Decoder::new(config.decode.clone());
    loop {
        tokio::select! {
            control = controls.recv() => match control {
                Some(control) => {
                    // The outbound buffer is as large as the owner's queue, so
                    // this only fails once the call itself is gone; the
                    // inbound side reports that.
                    if outbound.try_send(control).is_ok() {
                        StreamStats::add(&stats.controls_sent, 1);
                    }
                }
                None => return CloseReason::Stopped,
            },
            message = inbound.message() => {
                let first = match message {
                    Ok(Some(event)) => event,
                    Ok(None) => return CloseReason::EndOfStream,
                    Err(status) => return CloseReason::Error(status_text(&status)),
                };
                let (batch, end) = drain_ready(first, &mut inbound, &mut decoder, stats, config.max_batch);
                if !batch.is_empty() {
                    sink.events(batch);
                }
                if let Some(reason) = end {
                    return reason;
                }
            }
        }
    }
}

/// Decodes `first` and every further event that is already buffered, up to
/// `max` wire events, without waiting. Also returns how the call ended if
/// that was seen while draining.
fn drain_ready(
    first: TelemetryEvent,
    inbound: &mut Streaming<TelemetryEvent>,
    decoder: &mut Decoder,
    stats: &StreamStats,
    max: usize,
) -> (Vec<Decoded>, Option<CloseReason>) {
    let mut batch = Vec::with_capacity(max.min(64));
    let mut seen = 1;
    batch.extend(decoder.decode(first, stats).ok());
    while seen < max {
        match inbound.message().now_or_never() {
            Some(Ok(Some(event))) => {
                seen += 1;
                batch.extend(decoder.decode(event, stats).ok());
            }
            Some(Ok(None)) => return (batch, Some(CloseReason::EndOfStream)),
            Some(Err(status)) => return (batch, Some(CloseReason::Error(status_text(&status)))),
            None => break,
        }
    }
    (batch, None)
}

fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// Toggle-on, the first control message of every stream.
pub fn enable() -> TelemetryControl {
    TelemetryControl {
        control: Some(telemetry_control::Control::Toggle(TelemetryToggle {
            enabled: true,
        })),
    }
}

async fn open(
    address: &Address,
    config: &StreamConfig,
) -> Result<(mpsc::Sender<TelemetryControl>, Streaming<TelemetryEvent>), String> {
    let channel = connect(address).await.map_err(|e| error_chain(&e))?;
    let mut client =
        BridgeServiceClient::new(channel).max_decoding_message_size(config.max_message_bytes);
    let (tx, rx) = mpsc::channel(64);
    tx.try_send(enable()).expect("fresh channel has room");
    let response = client
        .stream_telemetry(ReceiverStream::new(rx))
        .await
        .map_err(|status| status_text(&status))?;
    Ok((tx, response.into_inner()))
}

async fn connect(address: &Address) -> Result<Channel, tonic::transport::Error> {
    match address {
        Address::Tcp(authority) => {
            Endpoint::from_shared(format!("http://{authority}"))?
                .tcp_nodelay(true)
                .connect()
                .await
        }
        Address::Unix(path) => {
            let path = path.clone();
            // The URI is required by the API but unused: the connector
            // decides where to go.
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move { UnixStream::connect(path).await.map(TokioIo::new) }
                }))
                .await
        }
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
    use std::collections::HashMap;
    use std::pin::Pin;
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

    /// A worker stand-in: sends `events` on every call, records controls.
    struct FakeWorker {
        events: Vec<TelemetryEvent>,
        controls: mpsc::UnboundedSender<TelemetryControl>,
        hold_open: bool,
    }

    type EventStream = Pin<Box<dyn Stream<Item = Result<TelemetryEvent, tonic::Status>> + Send>>;

    #[tonic::async_trait]
    impl BridgeService for FakeWorker {
        type StreamTelemetryStream = EventStream;

        async fn stream_telemetry(
            &self,
            request: Request<TonicStreaming<TelemetryControl>>,
        ) -> Result<Response<EventStream>, tonic::Status> {
            let mut inbound = request.into_inner();
            let controls = self.controls.clone();
            tokio::spawn(async move {
                while let Some(Ok(control)) = inbound.next().await {
                    let _ = controls.send(control);
                }
            });
            let events = tokio_stream::iter(self.events.clone().into_iter().map(Ok));
            let stream: EventStream = if self.hold_open {
                Box::pin(events.chain(tokio_stream::pending()))
            } else {
                Box::pin(events)
            };
            Ok(Response::new(stream))
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

    struct ChannelSink(mpsc::UnboundedSender<Seen>);

    impl Sink for ChannelSink {
        fn status(&mut self, status: Status) {
            let _ = self.0.send(Seen::Status(status));
        }
        fn events(&mut self, batch: Vec<Decoded>) {
            let _ = self.0.send(Seen::Events(batch));
        }
    }

    struct Harness {
        seen: mpsc::UnboundedReceiver<Seen>,
        controls_tx: mpsc::Sender<TelemetryControl>,
        stop: Option<oneshot::Sender<()>>,
        stats: Arc<StreamStats>,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(address: Address, config: StreamConfig) -> Harness {
        let (tx, seen) = mpsc::unbounded_channel();
        let (controls_tx, controls_rx) = mpsc::channel(8);
        let (stop_tx, stop_rx) = oneshot::channel();
        let stats = Arc::new(StreamStats::default());
        let task = tokio::spawn(run(
            address,
            config,
            controls_rx,
            stop_rx,
            stats.clone(),
            ChannelSink(tx),
        ));
        Harness {
            seen,
            controls_tx,
            stop: Some(stop_tx),
            stats,
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
            },
            rx,
        )
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
        expect_status(&mut h, Status::Open).await;
        let (events, reason) = collect_until_closed(&mut h).await;
        assert_eq!(reason, CloseReason::EndOfStream);

        let names: Vec<_> = events
            .iter()
            .filter_map(|e| e.event.spec().and_then(|s| s.python))
            .collect();
        assert_eq!(names, ["python.call.start", "python.call.stop"]);
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
        expect_status(&mut h, Status::Open).await;
        assert_eq!(controls.recv().await, Some(enable()));

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
        expect_status(&mut h, Status::Open).await;
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

        expect_status(&mut h, Status::Open).await;
        let (events, reason) = collect_until_closed(&mut h).await;
        assert_eq!(reason, CloseReason::EndOfStream);
        assert_eq!(events.len(), 1);
        assert!(StreamStats::get(&h.stats.connect_attempts) >= 2);
        let _ = std::fs::remove_file(path);
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
        expect_status(&mut h, Status::Open).await;
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
}
