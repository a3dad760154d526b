//! The Rust server read by the NIF's own stream client
//! (`snakepit_telemetry_core::stream::run`, unchanged): decoded events,
//! stats events, controls, the secret check and takeover, on TCP and unix
//! sockets; and the `StreamTelemetry` RPC read by a plain tonic client.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use snakepit_telemetry_core::auth::{Secret, SECRET_HEADER};
use snakepit_telemetry_core::credit::Credit;
use snakepit_telemetry_core::decode::{Decoded, Key, Number};
use snakepit_telemetry_core::proto::{
    telemetry_control, TelemetryControl, TelemetryEvent, TelemetryEventFilter,
};
use snakepit_telemetry_core::stats::StreamStats;
use snakepit_telemetry_core::stream::{
    self, Address, CloseReason, Protocol, Sink, Status, StreamConfig,
};
use snakepit_telemetry_worker::event::{encode_name, EventWriter, Item};
use snakepit_telemetry_worker::server::{self, RawCodec, EVENTS_PATH};
use snakepit_telemetry_worker::stream::{Core, Settings};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};

const SECRET: &str = "0123456789abcdefghijklmnop";
const WAIT: Duration = Duration::from_secs(10);

enum Seen {
    Status(Status),
    Events(Vec<Decoded>),
}

struct ChannelSink {
    tx: mpsc::UnboundedSender<Seen>,
    credit: Arc<Credit>,
}

impl Sink for ChannelSink {
    fn status(&mut self, status: Status) {
        let _ = self.tx.send(Seen::Status(status));
    }
    fn events(&mut self, batch: Vec<Decoded>) {
        self.credit.release(batch.len());
        let _ = self.tx.send(Seen::Events(batch));
    }
}

/// One NIF stream reading a worker.
struct Reader {
    seen: mpsc::UnboundedReceiver<Seen>,
    controls: mpsc::Sender<TelemetryControl>,
    stop: Option<oneshot::Sender<()>>,
    events: Vec<Decoded>,
}

fn config(secret: &str) -> StreamConfig {
    StreamConfig {
        connect_timeout: Duration::from_millis(500),
        retry_interval: Duration::from_millis(50),
        secret: Some(Secret::new(secret.as_bytes()).unwrap()),
        ..StreamConfig::default()
    }
}

fn read(address: &str, config: StreamConfig) -> Reader {
    let (tx, seen) = mpsc::unbounded_channel();
    let (controls, controls_rx) = mpsc::channel(8);
    let (stop, stop_rx) = oneshot::channel();
    let credit = Arc::new(Credit::new(100_000));
    let sink = ChannelSink {
        tx,
        credit: credit.clone(),
    };
    tokio::spawn(stream::run(
        Address::parse(address).unwrap(),
        config,
        controls_rx,
        stop_rx,
        Arc::new(StreamStats::default()),
        credit,
        sink,
    ));
    Reader {
        seen,
        controls,
        stop: Some(stop),
        events: Vec::new(),
    }
}

impl Reader {
    async fn status(&mut self) -> Status {
        loop {
            match timeout(WAIT, self.seen.recv())
                .await
                .expect("in time")
                .expect("open")
            {
                Seen::Status(s) => return s,
                Seen::Events(batch) => self.events.extend(batch),
            }
        }
    }

    /// Waits for events until `done` holds of what was received.
    async fn until(&mut self, done: impl Fn(&[Decoded]) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(&self.events) {
            match tokio::time::timeout_at(deadline, self.seen.recv()).await {
                Ok(Some(Seen::Events(batch))) => self.events.extend(batch),
                Ok(Some(Seen::Status(s))) => panic!("unexpected status {s:?}"),
                Ok(None) => panic!("stream gone"),
                Err(_) => panic!("timed out; have {} events", self.events.len()),
            }
        }
    }
}

fn python_name(e: &Decoded) -> &'static str {
    e.event.spec().and_then(|s| s.python).unwrap_or("?")
}

fn stop_event(duration: i64, correlation_id: &str) -> Item {
    let mut w = EventWriter::new(&encode_name(["python", "call", "stop"]), 64);
    w.measurement_int("duration", duration);
    w.metadata("command", "predict");
    w.correlation_id(correlation_id);
    w.finish(1_700_000_000_000_000_000)
}

fn durations(events: &[Decoded]) -> Vec<i64> {
    events
        .iter()
        .filter(|e| python_name(e) == "python.call.stop")
        .map(|e| {
            e.measurements
                .iter()
                .find_map(|(k, v)| match (k, v) {
                    (Key::Known(s), Number::Int(n)) if s.name() == "duration" => Some(*n),
                    _ => None,
                })
                .expect("a duration")
        })
        .collect()
}

fn core(secret: Option<&str>) -> Arc<Core> {
    Arc::new(Core::new(Settings {
        secret: secret.map(|s| s.as_bytes().to_vec()),
        ..Settings::default()
    }))
}

async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn stat(core: &Core, name: &str) -> u64 {
    core.stats().get(name).unwrap()
}

/// A TCP and a unix-socket address to listen on (the socket in a new
/// directory named after `test`), the socket's path and its directory.
fn both_transports(test: &str) -> ([String; 2], std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("snakepit-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("telemetry.sock");
    let listens = [
        "127.0.0.1:0".to_string(),
        format!("unix:{}", socket.display()),
    ];
    (listens, socket, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nif_client_reads_batches_over_tcp_and_unix_sockets() {
    let (listens, socket, dir) = both_transports("worker-test");
    for listen in listens {
        let core = core(Some(SECRET));
        let handle = server::serve(core.clone(), &listen).unwrap();
        let address = handle.address().to_string();
        if listen.starts_with("unix:") {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(address, listen);
            let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        } else {
            assert!(address.starts_with("127.0.0.1:") && !address.ends_with(":0"));
        }
        core.push(stop_event(1, "early")); // queued before the call
        let mut reader = read(&address, config(SECRET));
        assert_eq!(reader.status().await, Status::Connecting);
        assert_eq!(reader.status().await, Status::Open(Protocol::Batches));
        for i in 2..=100 {
            core.push(stop_event(i, "c1"));
        }
        reader.until(|events| durations(events).len() == 100).await;
        assert_eq!(durations(&reader.events), (1..=100).collect::<Vec<_>>());
        let stats_event = reader
            .events
            .iter()
            .find(|e| python_name(e) == "telemetry.python.stats")
            .expect("a stats event");
        assert!(stats_event.metadata.contains(&(
            Key::Known(snakepit_telemetry_core::catalog::Sym::instance_id),
            core.instance_id().to_string()
        )));
        let last = reader.events.last().unwrap();
        assert_eq!(last.correlation_id.as_deref(), Some("c1"));
        assert_eq!(last.timestamp_ns, 1_700_000_000_000_000_000);
        wait_for("sent", || stat(&core, "sent") == 100).await;
        assert!(stat(&core, "batches_sent") >= 1);
        // The client's first control (toggle on) was applied.
        assert!(stat(&core, "controls_applied") >= 1);
        reader.stop.take().unwrap().send(()).unwrap();
        assert_eq!(reader.status().await, Status::Closed(CloseReason::Stopped));
        wait_for("the call to end", || !core.stats().active_stream).await;
        handle.stop();
    }
    assert!(!socket.exists(), "stop removes the socket");
    let _ = std::fs::remove_dir(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_secret_are_refused_and_counted() {
    let core = core(Some(SECRET));
    let handle = server::serve(core.clone(), "127.0.0.1:0").unwrap();
    let mut reader = read(handle.address(), config("the-wrong-secret-0123456789"));
    assert_eq!(reader.status().await, Status::Connecting);
    match reader.status().await {
        Status::Closed(CloseReason::ConnectFailed(why)) => {
            assert!(why.to_lowercase().contains("unauthenticated"), "{why}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(stat(&core, "refused_calls") >= 1);
    assert_eq!(stat(&core, "streams_opened"), 0);
    // Nor does a call without any secret get in.
    let mut plain = config(SECRET);
    plain.secret = None;
    let refused = stat(&core, "refused_calls");
    let mut reader = read(handle.address(), plain);
    assert_eq!(reader.status().await, Status::Connecting);
    assert!(matches!(
        reader.status().await,
        Status::Closed(CloseReason::ConnectFailed(_))
    ));
    assert!(stat(&core, "refused_calls") > refused);
    assert_eq!(stat(&core, "streams_opened"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controls_from_the_client_are_applied_to_the_stream() {
    let core = core(None);
    let handle = server::serve(core.clone(), "127.0.0.1:0").unwrap();
    let mut reader = read(handle.address(), config(SECRET));
    assert_eq!(reader.status().await, Status::Connecting);
    assert_eq!(reader.status().await, Status::Open(Protocol::Batches));
    let deny = TelemetryControl {
        control: Some(telemetry_control::Control::Filter(TelemetryEventFilter {
            allow: vec![],
            deny: vec!["python.call.*".into()],
        })),
    };
    reader.controls.send(deny).await.unwrap();
    wait_for("the filter", || core.control().filtering).await;
    assert!(core.decide("python.call.stop", None).is_err());
    assert!(core.decide("tool.result_size", None).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_client_takes_over_from_the_first() {
    let core = core(Some(SECRET));
    let handle = server::serve(core.clone(), "127.0.0.1:0").unwrap();
    let mut first = read(handle.address(), config(SECRET));
    assert_eq!(first.status().await, Status::Connecting);
    assert_eq!(first.status().await, Status::Open(Protocol::Batches));
    core.push(stop_event(1, ""));
    first.until(|e| durations(e) == [1]).await;
    let mut second = read(handle.address(), config(SECRET));
    assert_eq!(second.status().await, Status::Connecting);
    assert_eq!(second.status().await, Status::Open(Protocol::Batches));
    // The superseded call ends normally.
    assert_eq!(
        first.status().await,
        Status::Closed(CloseReason::EndOfStream)
    );
    core.push(stop_event(2, ""));
    second.until(|e| durations(e) == [2]).await;
    assert_eq!(durations(&first.events), [1]);
    assert_eq!(stat(&core, "streams_opened"), 2);
    assert_eq!(stat(&core, "interrupted_sends"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_rpc_sends_one_event_per_message() {
    let core = core(Some(SECRET));
    let handle = server::serve(core.clone(), "127.0.0.1:0").unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", handle.address()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.unwrap();
    let mut request = tonic::Request::new(tokio_stream::iter(Vec::<Bytes>::new()));
    request
        .metadata_mut()
        .insert(SECRET_HEADER, SECRET.parse().unwrap());
    let mut messages = client
        .streaming(
            request,
            tonic::codegen::http::uri::PathAndQuery::from_static(EVENTS_PATH),
            RawCodec,
        )
        .await
        .unwrap()
        .into_inner();
    let first = messages.message().await.unwrap().unwrap();
    let stats = TelemetryEvent::decode(first).unwrap();
    assert_eq!(stats.event_parts, ["telemetry", "python", "stats"]);
    assert_eq!(stats.metadata["implementation"], "native");
    core.push(stop_event(5, "x"));
    core.push(stop_event(6, "y"));
    for (duration, cid) in [(5, "x"), (6, "y")] {
        let event = TelemetryEvent::decode(messages.message().await.unwrap().unwrap()).unwrap();
        assert_eq!(event.event_parts, ["python", "call", "stop"]);
        assert_eq!(event.correlation_id, cid);
        assert_eq!(
            event.measurements["duration"].value,
            Some(snakepit_telemetry_core::proto::telemetry_value::Value::IntValue(duration))
        );
    }
    drop(messages);
    wait_for("the call to end", || !core.stats().active_stream).await;
    // The second message was taken by the transport when the client dropped:
    // at most it is counted as interrupted, never lost silently.
    let stats = core.stats();
    assert_eq!(
        stats.get("sent").unwrap() + stats.get("interrupted_sends").unwrap(),
        2
    );
}

#[test]
fn bad_addresses_are_refused() {
    let core = core(None);
    for bad in ["nope", "unix:relative.sock", "host:99999", ":80"] {
        let err = server::serve(core.clone(), bad).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{bad}");
    }
    assert!(server::serve(core, "unix:/nonexistent-dir/for/sure/t.sock").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_server_ends_its_call_and_keeps_the_queue() {
    let core = core(Some(SECRET));
    let handle = server::serve(core.clone(), "127.0.0.1:0").unwrap();
    let address = handle.address().to_string();
    let mut reader = read(&address, config(SECRET));
    assert_eq!(reader.status().await, Status::Connecting);
    assert_eq!(reader.status().await, Status::Open(Protocol::Batches));
    wait_for("the call", || core.stats().active_stream).await;
    tokio::task::spawn_blocking(move || handle.stop())
        .await
        .unwrap();
    match reader.status().await {
        Status::Closed(CloseReason::EndOfStream) | Status::Closed(CloseReason::Error(_)) => {}
        other => panic!("expected the call to end, got {other:?}"),
    }
    wait_for("the call to end", || !core.stats().active_stream).await;
    // The listener closes on the server's own thread, soon after stop():
    // await the condition (a connection refused), never a duration.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tokio::net::TcpStream::connect(&address).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the stopped server still accepts connections"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // Events wait in the queue for the next call.
    core.push(stop_event(1, ""));
    assert_eq!(stat(&core, "queue_len"), 1);
}

/// With a steady stream of emits, batches go out on the emitting thread
/// (it finds them due within the margin of their flush time), in order and
/// all of them; the runtime's thread keeps the deadline for the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_emitter_sends_its_batches_itself() {
    let (listens, _socket, dir) = both_transports("inline-test");
    for listen in listens {
        let core = Arc::new(Core::new(Settings {
            secret: Some(SECRET.as_bytes().to_vec()),
            flush_interval: Duration::from_millis(10),
            stats_interval: Duration::ZERO,
            ..Settings::default()
        }));
        let handle = server::serve(core.clone(), &listen).unwrap();
        let mut reader = read(handle.address(), config(SECRET));
        assert_eq!(reader.status().await, Status::Connecting);
        assert_eq!(reader.status().await, Status::Open(Protocol::Batches));
        wait_for("the call", || core.stats().active_stream).await;
        let before = handle.rounds();
        let emitter = core.clone();
        let total = 400;
        std::thread::spawn(move || {
            for i in 1..=total {
                let mut w = EventWriter::new(&encode_name(["python", "call", "stop"]), 64);
                w.measurement_int("duration", i);
                emitter.push(w.finish(snakepit_telemetry_worker::stream::now_ns()));
                std::thread::sleep(Duration::from_micros(500));
            }
        });
        reader
            .until(|events| durations(events).len() == total as usize)
            .await;
        assert_eq!(durations(&reader.events), (1..=total).collect::<Vec<_>>());
        let rounds = handle.rounds();
        assert!(
            rounds.by_emitters > before.by_emitters,
            "no batch went out on the emitting thread: {rounds:?}"
        );
        wait_for("sent", || stat(&core, "sent") == total as u64).await;
        assert_eq!(stat(&core, "internal_errors"), 0);
        reader.stop.take().unwrap().send(()).unwrap();
        assert_eq!(reader.status().await, Status::Closed(CloseReason::Stopped));
        handle.stop();
    }
    let _ = std::fs::remove_dir(&dir);
}
