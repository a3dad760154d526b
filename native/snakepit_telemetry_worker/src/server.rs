//! A gRPC server for `BridgeService`'s two telemetry methods, on a unix
//! socket (mode 0600) or a TCP address, serving one [`Core`]: hyper's HTTP/2
//! server and tonic's gRPC codec, its connections and calls run by a
//! [`Driver`] (see [`crate::drive`]), so that an emitting thread can send a
//! due batch itself.
//!
//! Every call is checked for the secret (metadata
//! `x-snakepit-telemetry-secret`, [`SECRET_HEADER`],
//! compared in constant time) before it can take over the active call;
//! refused calls end with `UNAUTHENTICATED` and are counted in
//! `refused_calls`. Messages are sent as the call logic of [`Core::step`]
//! builds them (already encoded); controls are applied as they arrive.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use snakepit_telemetry_core::auth::SECRET_HEADER;
use tokio::io::unix::AsyncFd;
use tokio::runtime::Runtime;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};

use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::drive::{Driver, DriverExec};
use crate::stream::Flush;
use crate::unix_conn::UnixIncoming;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, BoxFuture};
use tonic::server::{Grpc, StreamingService};
use tonic::{Request, Response, Status, Streaming};

use crate::stream::{CallCell, Core, Step};

pub const BATCHES_PATH: &str = "/snakepit.bridge.BridgeService/StreamTelemetryBatches";
pub const EVENTS_PATH: &str = "/snakepit.bridge.BridgeService/StreamTelemetry";

/// Sends ready-encoded messages and hands received ones over undecoded.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

#[derive(Debug, Clone, Copy, Default)]
pub struct RawEncoder;

#[derive(Debug, Clone, Copy, Default)]
pub struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// Equality in time independent of where the values differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Calls opened through one server (so that stopping it ends them).
type Calls = Arc<Mutex<Vec<Weak<CallCell>>>>;

/// The telemetry methods of `BridgeService` for one stream, as hyper calls
/// them (other methods answer `UNIMPLEMENTED`).
#[derive(Clone, Debug)]
pub struct TelemetryService {
    core: Arc<Core>,
    calls: Calls,
}

impl TelemetryService {
    pub fn new(core: Arc<Core>) -> Self {
        TelemetryService {
            core,
            calls: Calls::default(),
        }
    }
}

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for TelemetryService {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn call(&self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
        let batched = match req.uri().path() {
            BATCHES_PATH => true,
            EVENTS_PATH => false,
            _ => {
                return Box::pin(async move {
                    Ok(Status::unimplemented("not a telemetry method").into_http())
                })
            }
        };
        let method = Method {
            core: self.core.clone(),
            batched,
            calls: self.calls.clone(),
        };
        Box::pin(async move {
            let mut grpc = Grpc::new(RawCodec);
            Ok(grpc.streaming(method, req).await)
        })
    }
}

struct Method {
    core: Arc<Core>,
    batched: bool,
    calls: Calls,
}

impl StreamingService<Bytes> for Method {
    type Response = Bytes;
    type ResponseStream = CallStream;
    type Future = std::future::Ready<Result<Response<CallStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        std::future::ready(self.open(request))
    }
}

impl Method {
    fn open(&self, request: Request<Streaming<Bytes>>) -> Result<Response<CallStream>, Status> {
        let core = &self.core;
        if let Some(secret) = &core.settings().secret {
            let given = request.metadata().get(SECRET_HEADER).map(|v| v.as_bytes());
            if !given.is_some_and(|g| constant_time_eq(g, secret)) {
                core.count("refused_calls", 1);
                return Err(Status::unauthenticated(
                    "telemetry call refused: missing or wrong secret",
                ));
            }
        }
        let cell = core.open_call(self.batched);
        {
            let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            calls.retain(|c| c.strong_count() > 0);
            calls.push(Arc::downgrade(&cell));
        }
        let mut inbound = request.into_inner();
        let controls_core = core.clone();
        let generation = cell.generation;
        let controls = tokio::spawn(async move {
            // Ends with the client's half of the call (or an error when the
            // call is cancelled), or when a newer call took over.
            while let Ok(Some(control)) = inbound.message().await {
                if !controls_core.apply_control(&control, Some(generation))
                    && !controls_core.is_current(generation)
                {
                    return;
                }
            }
        });
        Ok(Response::new(CallStream {
            core: core.clone(),
            cell,
            controls,
            notified: None,
            timer: None,
            idle: false,
        }))
    }
}

/// The response stream of one call: messages from [`Core::step`].
pub struct CallStream {
    core: Arc<Core>,
    cell: Arc<CallCell>,
    controls: JoinHandle<()>,
    notified: Option<Pin<Box<OwnedNotified>>>,
    timer: Option<Timer>,
    /// Counted in the core's idle waiters.
    idle: bool,
}

impl CallStream {
    fn release(&mut self) {
        self.notified = None;
        if self.idle {
            self.idle = false;
            self.core.leave_idle();
        }
    }
}

impl Stream for CallStream {
    type Item = Result<Bytes, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        this.release();
        loop {
            match this.core.step(&this.cell) {
                Step::Message(message) => {
                    // Until hyper asks for more (it may wait for window),
                    // emits have nothing to send.
                    this.core.set_flush_due(None);
                    return Poll::Ready(Some(Ok(Bytes::from(message))));
                }
                Step::Ended => {
                    this.core.set_flush_due(None);
                    return Poll::Ready(None);
                }
                Step::Wait { until, idle, flush } => {
                    let mut notified = Box::pin(this.core.notify().notified_owned());
                    notified.as_mut().enable();
                    let wait = this.core.announce_async(&this.cell, idle);
                    this.idle = idle;
                    if !wait {
                        this.release();
                        continue;
                    }
                    let timer = match &mut this.timer {
                        Some(timer) => timer,
                        None => match Timer::new() {
                            Ok(timer) => this.timer.insert(timer),
                            Err(_) => {
                                // No timer: look again soon rather than never.
                                this.release();
                                cx.waker().wake_by_ref();
                                return Poll::Pending;
                            }
                        },
                    };
                    if timer.poll_until(cx, until).is_ready()
                        || notified.as_mut().poll(cx).is_ready()
                    {
                        this.release();
                        continue;
                    }
                    this.notified = Some(notified);
                    this.core.set_flush_due(flush.filter(|_| !idle));
                    return Poll::Pending;
                }
            }
        }
    }
}

/// A deadline for the call's waits: a timerfd on the runtime's IO driver
/// rather than a tokio timer, so that moving the deadline after a send
/// does not make the driver wake itself (one wake per batch: the expiry).
struct Timer {
    fd: AsyncFd<std::os::fd::OwnedFd>,
    /// The deadline it is armed for.
    armed: Option<std::time::Instant>,
}

impl Timer {
    fn new() -> io::Result<Timer> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscall; the fd is owned below.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd nobody else owns; the AsyncFd owns it and never
        // replaces or closes it while registered.
        let fd = unsafe {
            AsyncFd::register_with_interest(
                std::os::fd::OwnedFd::from_raw_fd(raw),
                tokio::io::Interest::READABLE,
            )?
        };
        Ok(Timer { fd, armed: None })
    }

    /// Arms the timer for `until` (CLOCK_MONOTONIC, as `Instant`).
    fn arm(&mut self, until: std::time::Instant) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        let left = until.saturating_duration_since(std::time::Instant::now());
        // At least 1 ns: an all-zero value would disarm it.
        let total =
            (now.tv_sec as u128) * 1_000_000_000 + now.tv_nsec as u128 + left.as_nanos().max(1);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (total / 1_000_000_000) as libc::time_t,
                tv_nsec: (total % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: a valid fd and itimerspec.
        let rc = unsafe {
            libc::timerfd_settime(
                self.fd.get_ref().as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed = Some(until);
        Ok(())
    }

    /// Ready once `until` passed; otherwise registers the waker.
    fn poll_until(&mut self, cx: &mut Context<'_>, until: std::time::Instant) -> Poll<()> {
        if std::time::Instant::now() >= until {
            return Poll::Ready(());
        }
        if self.armed != Some(until) && self.arm(until).is_err() {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        loop {
            match self.fd.poll_read_ready(cx) {
                Poll::Ready(Ok(mut guard)) => {
                    // The expiry need not be read: the registration is
                    // edge-triggered, each expiry is an edge, and arming
                    // resets the count. A readiness left from an earlier
                    // expiry is cleared and waited past.
                    guard.clear_ready();
                    if std::time::Instant::now() >= until {
                        self.armed = None;
                        return Poll::Ready(());
                    }
                }
                Poll::Ready(Err(_)) => {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for CallStream {
    fn drop(&mut self) {
        if self.core.is_current(self.cell.generation) {
            self.core.set_flush_due(None);
        }
        self.release();
        self.controls.abort();
        self.core.finish(&self.cell);
    }
}

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddress {
    /// `host:port` (port 0: any free port).
    Tcp(String),
    /// `unix:/absolute/path` or `unix:///absolute/path`.
    Unix(PathBuf),
}

impl ListenAddress {
    pub fn parse(address: &str) -> Result<ListenAddress, String> {
        let invalid = || {
            format!(
                "invalid telemetry listen address {address:?}: expected \"host:port\" or \"unix:/absolute/path\""
            )
        };
        if let Some(rest) = address.strip_prefix("unix:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if !path.starts_with('/') || path.len() < 2 {
                return Err(invalid());
            }
            return Ok(ListenAddress::Unix(PathBuf::from(path)));
        }
        let authority = address.strip_prefix("http://").unwrap_or(address);
        let (host, port) = authority.rsplit_once(':').ok_or_else(invalid)?;
        if host.is_empty() || host.contains('/') || port.parse::<u16>().is_err() {
            return Err(invalid());
        }
        Ok(ListenAddress::Tcp(authority.to_string()))
    }
}

/// The tokio runtime of this process, built on first use and again in a
/// forked child (whose copy has no threads), driven by one thread of its own.
pub fn runtime() -> io::Result<Arc<Runtime>> {
    static RUNTIME: Mutex<Option<(u32, Arc<Runtime>)>> = Mutex::new(None);
    let pid = std::process::id();
    let mut slot = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((owner, rt)) = slot.as_ref() {
        if *owner == pid {
            return Ok(rt.clone());
        }
    }
    if let Some((_, inherited)) = slot.take() {
        // The parent's runtime: its threads do not exist here, and dropping
        // it could wait for them forever.
        std::mem::forget(inherited);
    }
    // One thread drives everything (a current-thread runtime): cheaper per
    // message than a multi-thread scheduler, and the server's work is small.
    let rt = Arc::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
    );
    let driver = rt.clone();
    std::thread::Builder::new()
        .name("snakepit-telemetry".into())
        .spawn(move || driver.block_on(std::future::pending::<()>()))?;
    *slot = Some((pid, rt.clone()));
    Ok(rt)
}

/// A running server; [`ServerHandle::stop`] (or drop) ends it and its calls.
#[derive(Debug)]
pub struct ServerHandle {
    address: String,
    core: Arc<Core>,
    calls: Calls,
    driver: Arc<Driver>,
    /// Set when stopping: connections shut down gracefully.
    stopping: Arc<AtomicBool>,
    shutdown: Option<oneshot::Sender<()>>,
    path: Option<PathBuf>,
    pid: u32,
}

/// How long a stopped server's connections may take to close before they
/// are dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How early, as a share of the flush interval, an emit may send a batch
/// that is nearly due (see [`Flush`]): the later it may, the fewer batches;
/// the earlier, the likelier an emit comes in time and saves the timer's
/// wake.
pub const FLUSH_MARGIN_SHARE: u32 = 10;

impl ServerHandle {
    /// The bound address: `ip:port` or `unix:/path`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Stops accepting, ends the calls opened through this server (as a
    /// takeover would: unsent events go back to the queue) and closes its
    /// connections; removes the unix socket.
    pub fn stop(self) {}

    /// Forgets the server without touching its task (in a forked child,
    /// whose copy of the runtime has no threads).
    pub fn forget(self) {
        std::mem::forget(self);
    }

    /// The rounds of polling its connections and calls, by emitters (that
    /// sent a due batch themselves) and by the runtime's thread.
    pub fn rounds(&self) -> crate::drive::Rounds {
        self.driver.rounds()
    }

    /// The server's connections and calls not finished yet.
    pub fn open_tasks(&self) -> usize {
        self.driver.len()
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if self.pid != std::process::id() {
            return;
        }
        let flush: Weak<dyn Flush> = Arc::downgrade(&self.driver) as Weak<dyn Flush>;
        self.core.remove_flush(&flush);
        let calls = std::mem::take(&mut *self.calls.lock().unwrap_or_else(|e| e.into_inner()));
        for cell in calls.iter().filter_map(Weak::upgrade) {
            self.core.cancel(&cell);
        }
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.driver.ask_poll();
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
        if let Ok(rt) = runtime() {
            let driver = self.driver.clone();
            rt.spawn(async move {
                let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
                while !driver.is_empty() && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                driver.abort_all();
            });
        }
    }
}

/// One HTTP/2 connection, shut down gracefully once its server stops.
struct Connection<I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> {
    conn:
        Pin<Box<hyper::server::conn::http2::Connection<TokioIo<I>, TelemetryService, DriverExec>>>,
    stopping: Arc<AtomicBool>,
    shutting_down: bool,
}

impl<I> Future for Connection<I>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if !self.shutting_down && self.stopping.load(Ordering::SeqCst) {
            self.shutting_down = true;
            self.conn.as_mut().graceful_shutdown();
        }
        self.conn.as_mut().poll(cx).map(|_| ())
    }
}

/// What accepts a server's connections.
struct Acceptor {
    driver: Arc<Driver>,
    service: TelemetryService,
    stopping: Arc<AtomicBool>,
    http2: hyper::server::conn::http2::Builder<DriverExec>,
}

impl Acceptor {
    fn add<I>(&self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let conn = self
            .http2
            .serve_connection(TokioIo::new(io), self.service.clone());
        self.driver.add(Box::pin(Connection {
            conn: Box::pin(conn),
            stopping: self.stopping.clone(),
            shutting_down: false,
        }));
    }

    /// Adds each accepted connection until `stop` fires; a failed accept
    /// (e.g. out of descriptors) is retried after a pause rather than ending
    /// the server.
    async fn run<S, I>(self, mut incoming: S, mut stop: oneshot::Receiver<()>)
    where
        S: Stream<Item = io::Result<I>> + Unpin,
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        loop {
            tokio::select! {
                _ = &mut stop => return,
                accepted = incoming.next() => match accepted {
                    Some(Ok(io)) => self.add(io),
                    Some(Err(_)) => tokio::time::sleep(ACCEPT_RETRY).await,
                    None => return,
                },
            }
        }
    }
}

/// The pause before accepting again after a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Starts serving `core` on `address`.
pub fn serve(core: Arc<Core>, address: &str) -> io::Result<ServerHandle> {
    let listen = ListenAddress::parse(address)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let rt = runtime()?;
    let service = TelemetryService::new(core.clone());
    let calls = service.calls.clone();
    let (shutdown, signal) = oneshot::channel::<()>();
    let _guard = rt.enter();
    let driver = Driver::start(rt.handle().clone(), core.clone());
    let stopping = Arc::new(AtomicBool::new(false));
    let acceptor = Acceptor {
        driver: driver.clone(),
        service,
        stopping: stopping.clone(),
        http2: hyper::server::conn::http2::Builder::new(DriverExec(driver.clone())),
    };
    let (address, path) = match listen {
        ListenAddress::Tcp(authority) => {
            let std_listener = std::net::TcpListener::bind(authority.as_str())?;
            std_listener.set_nonblocking(true)?;
            let bound = std_listener.local_addr()?;
            let listener = tokio::net::TcpListener::from_std(std_listener)?;
            let incoming = TcpListenerStream::new(listener).map(|accepted| {
                accepted.inspect(|stream| {
                    // Small messages go out at once (no Nagle delay behind
                    // an ACK).
                    let _ = stream.set_nodelay(true);
                })
            });
            rt.spawn(acceptor.run(incoming, signal));
            (bound.to_string(), None)
        }
        ListenAddress::Unix(path) => {
            remove_stale_socket(&path)?;
            let std_listener = std::os::unix::net::UnixListener::bind(&path)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            std_listener.set_nonblocking(true)?;
            let listener = tokio::net::UnixListener::from_std(std_listener)?;
            // Connections registered for reads only: one wake per batch, as
            // on TCP (see unix_conn).
            rt.spawn(acceptor.run(UnixIncoming::new(listener), signal));
            (format!("unix:{}", path.display()), Some(path))
        }
    };
    // With a flush interval, batches are at most one per interval less the
    // margin, so an emitter sends at most that many. Without one (every
    // event at once), sending on the emitter's thread would write once per
    // event there: the runtime's thread sends, batching what comes meanwhile.
    let interval = core.settings().flush_interval;
    if !interval.is_zero() {
        core.install_flush(
            Arc::downgrade(&driver) as Weak<dyn Flush>,
            interval / FLUSH_MARGIN_SHARE,
        );
    }
    Ok(ServerHandle {
        address,
        core,
        calls,
        driver,
        stopping,
        shutdown: Some(shutdown),
        path,
        pid: std::process::id(),
    })
}

/// Removes a socket file nobody listens on (left by a dead process);
/// anything else at `path` is left alone (bind then fails).
fn remove_stale_socket(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is served by another process", path.display()),
                )),
                Err(_) => std::fs::remove_file(path),
            }
        }
        _ => Ok(()),
    }
}
