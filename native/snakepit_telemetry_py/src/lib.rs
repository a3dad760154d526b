//! `snakepit_telemetry._native`: the native implementation of the
//! telemetry stream (see `priv/python/snakepit_telemetry/_native.pyi`).
//!
//! `emit` reads its arguments under the GIL, converts and encodes the event
//! at once (see [`convert`]) and pushes it on the stream's lock-free queue;
//! everything after runs in Rust without the GIL
//! (`snakepit_telemetry_worker`): the grpcio route pulls ready messages
//! through [`Call`], and [`Stream::serve`] starts a tonic server on Rust
//! threads.

mod convert;
mod span;

use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyKeyError, PyStopIteration, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use snakepit_telemetry_core::enforce::ControlState;
use snakepit_telemetry_worker::event::EventWriter;
use snakepit_telemetry_worker::server::{self, ServerHandle};
use snakepit_telemetry_worker::stream::{self as wstream, CallCell, Core, Reason, Settings, Step};

use convert::{Failed, NameLookup};

/// Initial size of a thread's scratch buffer (events that fit their queue
/// slot, see `INLINE_BODY`, are copied there).
const EVENT_CAPACITY: usize = 256;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Converts and queues one event on `core`. Never raises; every outcome is
/// counted.
#[allow(clippy::too_many_arguments)]
pub(crate) fn emit_into(
    core: &Core,
    name: NameLookup,
    measurements: Measure<'_, '_>,
    metadata: Option<&Bound<'_, PyAny>>,
    correlation_id: Option<&Bound<'_, PyAny>>,
    sampled: Option<bool>,
    span_id: u64,
    stacktrace: Option<&Bound<'_, PyAny>>,
) {
    let name = match name {
        NameLookup::Valid(name) => name,
        NameLookup::Invalid => return core.refuse(Reason::Invalid),
        NameLookup::Unencodable => return core.refuse(Reason::InternalError),
    };
    emit_named(
        core,
        &name,
        measurements,
        metadata,
        correlation_id,
        sampled,
        span_id,
        stacktrace,
    );
}

/// [`emit_into`] for a validated name.
#[allow(clippy::too_many_arguments)]
pub(crate) fn emit_named(
    core: &Core,
    name: &convert::Name,
    measurements: Measure<'_, '_>,
    metadata: Option<&Bound<'_, PyAny>>,
    correlation_id: Option<&Bound<'_, PyAny>>,
    sampled: Option<bool>,
    span_id: u64,
    stacktrace: Option<&Bound<'_, PyAny>>,
) {
    let timestamp_ns = wstream::now_ns();
    if !(core.passthrough() && sampled != Some(false)) {
        if let Err(reason) = core.decide(&name.dotted, sampled) {
            return core.refuse(reason);
        }
    }
    if core.is_full() {
        return core.refuse(Reason::QueueFull);
    }
    // A scratch buffer per thread: an event that fits its queue slot needs
    // no allocation. (An emit re-entered from Python code run below finds
    // it taken and uses a new one.)
    let scratch = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let scratch = if scratch.capacity() == 0 {
        Vec::with_capacity(EVENT_CAPACITY)
    } else {
        scratch
    };
    let mut w = EventWriter::with_buffer(scratch, &name.encoded);
    match encode_fields(
        &mut w,
        measurements,
        metadata,
        correlation_id,
        span_id,
        stacktrace,
    ) {
        Ok((dropped, errors)) => {
            if dropped != 0 {
                core.count("measurements_dropped", dropped);
            }
            if errors != 0 {
                core.count("internal_errors", errors);
            }
            let (item, scratch) = w.finish_reuse(timestamp_ns);
            core.push(item);
            SCRATCH.with(|s| *s.borrow_mut() = scratch);
        }
        Err(Failed) => core.refuse(Reason::InternalError),
    }
}

/// An event's measurements: the caller's object, or one integer a span
/// writes itself (no dict built).
#[derive(Clone, Copy)]
pub(crate) enum Measure<'a, 'py> {
    Object(Option<&'a Bound<'py, PyAny>>),
    Int(&'static str, i64),
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn encode_fields(
    w: &mut EventWriter,
    measurements: Measure<'_, '_>,
    metadata: Option<&Bound<'_, PyAny>>,
    correlation_id: Option<&Bound<'_, PyAny>>,
    span_id: u64,
    stacktrace: Option<&Bound<'_, PyAny>>,
) -> Result<(u64, u64), Failed> {
    let dropped = match measurements {
        Measure::Object(Some(m)) => convert::measurements(w, m)?,
        Measure::Object(None) => 0,
        Measure::Int(key, value) => {
            w.measurement_int(key, value);
            0
        }
    };
    let errors = match metadata {
        Some(m) => convert::metadata(w, m)?,
        None => 0,
    };
    convert::correlation_id(w, correlation_id)?;
    w.span_id(span_id);
    convert::stacktrace(w, stacktrace)?;
    Ok((dropped, errors))
}

/// A telemetry stream whose queue, encoding, calls and server run in Rust.
#[pyclass(frozen, module = "snakepit_telemetry._native")]
pub(crate) struct Stream {
    /// One strong count of the core. Replaced in a forked child (the old
    /// one is leaked: its locks may be held by threads that do not exist
    /// there), never freed before the stream.
    core: AtomicPtr<Core>,
    server: Mutex<Option<ServerHandle>>,
}

impl Stream {
    pub(crate) fn core_ref(&self) -> &Core {
        // SAFETY: the pointer holds a strong count for as long as `self`
        // lives; a replaced core is leaked, never freed.
        unsafe { &*self.core.load(Ordering::Acquire) }
    }

    fn core(&self) -> Arc<Core> {
        let ptr = self.core.load(Ordering::Acquire);
        // SAFETY: as in core_ref.
        unsafe {
            Arc::increment_strong_count(ptr);
            Arc::from_raw(ptr)
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let ptr = *self.core.get_mut();
        if !ptr.is_null() {
            // SAFETY: the stream's own strong count.
            drop(unsafe { Arc::from_raw(ptr) });
        }
    }
}

fn seconds(value: f64) -> Duration {
    if value.is_finite() && value > 0.0 {
        Duration::from_secs_f64(value.min(1e9))
    } else {
        Duration::ZERO
    }
}

#[pymethods]
impl Stream {
    #[new]
    #[pyo3(signature = (*, queue_size, flush_interval_ms, stats_interval_ms, max_message_bytes, enabled, default_rate, allow, deny, secret))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        queue_size: usize,
        flush_interval_ms: u64,
        stats_interval_ms: u64,
        max_message_bytes: usize,
        enabled: bool,
        default_rate: f64,
        allow: Vec<String>,
        deny: Vec<String>,
        secret: Option<Vec<u8>>,
    ) -> PyResult<Stream> {
        if queue_size < 1 {
            return Err(PyValueError::new_err(format!(
                "queue_size must be >= 1, got {queue_size}"
            )));
        }
        if max_message_bytes < 1 {
            return Err(PyValueError::new_err("max_message_bytes must be >= 1"));
        }
        let settings = Settings {
            queue_size,
            flush_interval: Duration::from_millis(flush_interval_ms),
            stats_interval: Duration::from_millis(stats_interval_ms),
            max_message_bytes,
            control: ControlState::new(enabled, default_rate, Vec::new(), allow, deny),
            secret: secret.filter(|s| !s.is_empty()),
        };
        Ok(Stream {
            core: AtomicPtr::new(Arc::into_raw(Arc::new(Core::new(settings))) as *mut Core),
            server: Mutex::new(None),
        })
    }

    #[getter]
    fn instance_id(&self) -> String {
        self.core_ref().instance_id().to_string()
    }

    /// Whether a sender waits for an event (so an emit wakes it).
    #[getter]
    fn idle(&self) -> bool {
        self.core_ref().idle_waiters() > 0
    }

    #[getter]
    fn queue_size(&self) -> usize {
        self.core_ref().queue_size()
    }

    /// Queues one event; never raises (see `TelemetryStream.emit_event`).
    #[pyo3(signature = (event, measurements=None, metadata=None, correlation_id=None, sampled=None, span_id=None, stacktrace=None))]
    #[allow(clippy::too_many_arguments)]
    fn emit_event(
        &self,
        event: &Bound<'_, PyAny>,
        measurements: Option<&Bound<'_, PyAny>>,
        metadata: Option<&Bound<'_, PyAny>>,
        correlation_id: Option<&Bound<'_, PyAny>>,
        sampled: Option<&Bound<'_, PyAny>>,
        span_id: Option<&Bound<'_, PyAny>>,
        stacktrace: Option<&Bound<'_, PyAny>>,
    ) {
        // `self` is borrowed from the object the caller holds: its core
        // outlives this call even if Python code run below drops others.
        let core = self.core_ref();
        let sampled = match sampled {
            None => None,
            Some(s) if s.is_none() => None,
            Some(s) => match s.is_truthy() {
                Ok(b) => Some(b),
                Err(_) => return core.refuse(Reason::InternalError),
            },
        };
        let span = span_id.map_or(0, convert::span_id);
        emit_into(
            core,
            convert::lookup(event),
            Measure::Object(measurements),
            metadata,
            correlation_id,
            sampled,
            span,
            stacktrace,
        );
    }

    /// A sampling decision for `event` (as `TelemetryStream.sample`).
    fn sample(&self, event: &Bound<'_, PyAny>) -> bool {
        match convert::lookup(event) {
            NameLookup::Valid(name) => self.core_ref().sample(&name.dotted),
            _ => true,
        }
    }

    fn sample_rate(&self, name: &str) -> f64 {
        self.core_ref().sample_rate(name)
    }

    #[pyo3(signature = (counter, amount=1))]
    fn count(&self, counter: &str, amount: u64) -> PyResult<()> {
        if self.core_ref().count(counter, amount) {
            Ok(())
        } else {
            Err(PyKeyError::new_err(counter.to_string()))
        }
    }

    /// Every key of `TelemetryStream.stats()` but `process_internal_errors`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = self.core_ref().stats();
        let out = PyDict::new(py);
        for (name, value) in &stats.counts {
            if matches!(
                *name,
                "queue_size" | "max_message_bytes" | "queue_len" | "in_flight"
            ) {
                continue;
            }
            out.set_item(name, value)?;
        }
        for key in ["queue_len", "in_flight", "queue_size"] {
            out.set_item(key, stats.get(key).unwrap_or(0))?;
        }
        out.set_item("active_stream", stats.active_stream)?;
        out.set_item("enabled", stats.enabled)?;
        out.set_item(
            "max_message_bytes",
            stats.get("max_message_bytes").unwrap_or(0),
        )?;
        Ok(out)
    }

    /// The control state in force, as `ControlState.to_dict()`.
    fn control_state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let control = self.core_ref().control();
        let state = &control.state;
        let out = PyDict::new(py);
        out.set_item("enabled", state.enabled())?;
        out.set_item("default_rate", state.default_rate())?;
        let rules = PyList::empty(py);
        for (rate, patterns) in state.rules() {
            let rule = PyDict::new(py);
            rule.set_item("rate", rate)?;
            rule.set_item("patterns", patterns.to_vec())?;
            rules.append(rule)?;
        }
        out.set_item("rules", rules)?;
        out.set_item("allow", state.allow_patterns().to_vec())?;
        out.set_item("deny", state.deny_patterns().to_vec())?;
        Ok(out)
    }

    fn wait_drained(&self, py: Python<'_>, timeout_s: f64) -> bool {
        let core = self.core();
        py.detach(|| core.wait_drained(seconds(timeout_s)))
    }

    fn close(&self) {
        self.core_ref().close();
    }

    /// Takes everything queued, each as a serialized `TelemetryEvent`.
    fn drain_queued<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyBytes>> {
        self.core_ref()
            .drain_messages()
            .iter()
            .map(|m| PyBytes::new(py, m))
            .collect()
    }

    #[pyo3(signature = (data, generation=None))]
    fn apply_control(&self, data: &Bound<'_, PyAny>, generation: Option<u64>) -> bool {
        let core = self.core_ref();
        match data.cast::<PyBytes>() {
            Ok(bytes) => core.apply_control(bytes.as_bytes(), generation),
            Err(_) => {
                core.count("internal_errors", 1);
                false
            }
        }
    }

    /// Opens a call for the grpcio route; it takes over from any previous.
    fn open_call(&self, batched: bool) -> Call {
        let core = self.core();
        let cell = core.open_call(batched);
        Call { core, cell }
    }

    /// Serves this stream on `address` (`unix:/abs/path` or `host:port`);
    /// returns the bound address.
    fn serve(&self, py: Python<'_>, address: &str) -> PyResult<String> {
        let core = self.core();
        let address = address.to_string();
        let handle = py
            .detach(|| server::serve(core, &address))
            .map_err(|e| -> PyErr {
                if e.kind() == std::io::ErrorKind::InvalidInput {
                    PyValueError::new_err(e.to_string())
                } else {
                    e.into()
                }
            })?;
        let bound = handle.address().to_string();
        let old = lock(&self.server).replace(handle);
        drop(old);
        Ok(bound)
    }

    fn stop_serving(&self, py: Python<'_>) {
        let old = lock(&self.server).take();
        py.detach(move || drop(old));
    }

    /// How the server's work ran: rounds run by emitting threads (that sent
    /// a due batch themselves) and by its own thread, and the time the
    /// emitters' rounds took (ns); `None` when not serving.
    fn server_rounds(&self) -> Option<(u64, u64, u64)> {
        lock(&self.server).as_ref().map(|h| {
            let r = h.rounds();
            (r.by_emitters, r.by_runtime, r.emitter_ns)
        })
    }

    #[getter]
    fn serving(&self) -> Option<String> {
        lock(&self.server).as_ref().map(|h| h.address().to_string())
    }

    /// In a forked child: a new instance (new id, counters at 0, empty
    /// queue, no call, no server).
    fn after_fork_in_child(&self) {
        let old = self.core.load(Ordering::Acquire);
        // SAFETY: the stream's own strong count; leaked below, never freed.
        let settings = unsafe { (*old).settings().clone() };
        let fresh = Arc::into_raw(Arc::new(Core::new(settings))) as *mut Core;
        self.core.store(fresh, Ordering::Release);
        // The server's task and socket belong to the parent. (A lock held
        // at the fork by a thread that does not exist here stays held.)
        if let Ok(mut server) = self.server.try_lock() {
            if let Some(handle) = server.take() {
                handle.forget();
            }
        }
        wstream::reseed_after_fork();
    }
}

/// One telemetry call on the grpcio route.
#[pyclass(module = "snakepit_telemetry._native")]
struct Call {
    core: Arc<Core>,
    cell: Arc<CallCell>,
}

#[pymethods]
impl Call {
    #[getter]
    fn generation(&self) -> u64 {
        self.cell.generation
    }

    /// The next message, `None` if none within `timeout_s`; raises
    /// `StopIteration` once the call was superseded or closed.
    fn next<'py>(&self, py: Python<'py>, timeout_s: f64) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let deadline = Instant::now() + seconds(timeout_s);
        let core = &self.core;
        let cell = &self.cell;
        let step = py.detach(|| loop {
            match core.step(cell) {
                Step::Wait { until, idle, .. } => {
                    let now = Instant::now();
                    if now >= deadline {
                        return None;
                    }
                    core.wait_blocking(cell, until.min(deadline), idle);
                }
                other => return Some(other),
            }
        });
        match step {
            None => Ok(None),
            Some(Step::Message(m)) => Ok(Some(PyBytes::new(py, &m))),
            Some(_) => Err(PyStopIteration::new_err(())),
        }
    }

    /// The message of the last `next()` was taken by gRPC.
    fn sent(&self) {
        self.core.confirm(&self.cell);
    }

    /// The call ended: unsent events go back to the queue. Idempotent.
    fn finish(&self) {
        self.core.finish(&self.cell);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.core.finish(&self.cell);
    }
}

/// The default stream: a strong reference to a `Stream` object, or null.
/// Read and written only with the GIL held.
pub(crate) static DEFAULT: AtomicPtr<ffi::PyObject> = AtomicPtr::new(std::ptr::null_mut());

pub(crate) struct Config {
    pub(crate) correlation_var: Py<PyAny>,
    fallback: Py<PyAny>,
}

/// Set by `configure`; replaced configs are leaked (configure is rare).
pub(crate) static CONFIG: AtomicPtr<Config> = AtomicPtr::new(std::ptr::null_mut());

#[pyfunction]
fn set_default(stream: Option<&Bound<'_, Stream>>) {
    let new = match stream {
        Some(s) => s.clone().into_ptr(),
        None => std::ptr::null_mut(),
    };
    let old = DEFAULT.swap(new, Ordering::AcqRel);
    if !old.is_null() {
        // SAFETY: DEFAULT's own reference, released with the GIL held (an
        // emit running Python code holds a reference of its own).
        unsafe { ffi::Py_DECREF(old) };
    }
}

/// The default stream (`set_default`), or None.
#[pyfunction]
fn default_stream(py: Python<'_>) -> Option<Py<PyAny>> {
    let ptr = DEFAULT.load(Ordering::Acquire);
    // SAFETY: DEFAULT holds a reference; the GIL is held.
    (!ptr.is_null()).then(|| unsafe { Bound::from_borrowed_ptr(py, ptr) }.unbind())
}

/// What `configure` set: `(correlation_var, fallback)`, or None.
#[pyfunction]
fn configuration(py: Python<'_>) -> Option<(Py<PyAny>, Py<PyAny>)> {
    let ptr = CONFIG.load(Ordering::Acquire);
    // SAFETY: configs are never freed.
    (!ptr.is_null()).then(|| unsafe {
        (
            (*ptr).correlation_var.clone_ref(py),
            (*ptr).fallback.clone_ref(py),
        )
    })
}

#[pyfunction]
fn configure(correlation_var: Py<PyAny>, fallback: Py<PyAny>) {
    let config = Box::into_raw(Box::new(Config {
        correlation_var,
        fallback,
    }));
    CONFIG.store(config, Ordering::Release);
}

const EMIT_PARAMS: [&str; 4] = ["event", "measurements", "metadata", "correlation_id"];

/// Binds the vectorcall arguments of `emit` to its four parameters.
///
/// # Safety
/// The arguments of a METH_FASTCALL | METH_KEYWORDS call.
unsafe fn bind_emit_args(
    py: Python<'_>,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<[*mut ffi::PyObject; 4]> {
    let nargs = ffi::PyVectorcall_NARGS(nargsf as usize) as usize;
    let mut slots = [std::ptr::null_mut(); 4];
    if nargs > 4 {
        return Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "emit() takes from 2 to 4 positional arguments but {nargs} were given"
        )));
    }
    for (i, slot) in slots.iter_mut().enumerate().take(nargs) {
        *slot = *args.add(i);
    }
    if !kwnames.is_null() {
        let names = Bound::from_borrowed_ptr(py, kwnames);
        let names = names.cast_unchecked::<pyo3::types::PyTuple>();
        for (i, name) in names.iter().enumerate() {
            let name: String = name.extract()?;
            let Some(index) = EMIT_PARAMS.iter().position(|p| *p == name) else {
                return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                    "emit() got an unexpected keyword argument '{name}'"
                )));
            };
            if !slots[index].is_null() {
                return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                    "emit() got multiple values for argument '{name}'"
                )));
            }
            slots[index] = *args.add(nargs + i);
        }
    }
    for (slot, name) in slots.iter().zip(EMIT_PARAMS).take(2) {
        if slot.is_null() {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "emit() missing required argument: '{name}'"
            )));
        }
    }
    Ok(slots)
}

/// `telemetry.emit` on the native implementation: a bare METH_FASTCALL
/// function (no argument-parsing layer). Never raises, except a TypeError
/// for a call that does not match its signature, as a Python function would.
unsafe extern "C" fn emit_raw(
    _module: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let py = Python::assume_attached();
    let slots = match bind_emit_args(py, args, nargsf, kwnames) {
        Ok(slots) => slots,
        Err(e) => {
            e.restore(py);
            return std::ptr::null_mut();
        }
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| emit_bound(py, slots)));
    if outcome.is_err() {
        wstream::count_process_errors(1);
    }
    if !ffi::PyErr_Occurred().is_null() {
        // Every failure is counted where it happens; nothing may leak out.
        ffi::PyErr_Clear();
    }
    ffi::Py_INCREF(ffi::Py_None());
    ffi::Py_None()
}

/// # Safety
/// `slots` are borrowed argument references (event and measurements set).
unsafe fn emit_bound(py: Python<'_>, slots: [*mut ffi::PyObject; 4]) {
    let [event, measurements, metadata, correlation_id] = slots;
    let config = CONFIG.load(Ordering::Acquire);
    let default = DEFAULT.load(Ordering::Acquire);
    let none = ffi::Py_None();
    let opt = |p: *mut ffi::PyObject| {
        if p.is_null() || p == none {
            None
        } else {
            Some(Bound::from_borrowed_ptr(py, p))
        }
    };
    if default.is_null() || ffi::PyUnicode_CheckExact(event) == 0 {
        if config.is_null() {
            wstream::count_process_errors(1);
            return;
        }
        let arg = |p: *mut ffi::PyObject| {
            Bound::from_borrowed_ptr(py, if p.is_null() { none } else { p })
        };
        // SAFETY: configs are never freed.
        let fallback = (*config).fallback.bind(py);
        let args = (
            arg(event),
            arg(measurements),
            arg(metadata),
            arg(correlation_id),
        );
        if fallback.call1(args).is_err() {
            wstream::count_process_errors(1);
        }
        return;
    }
    // Our own reference keeps the stream (and so its core) alive even if
    // Python code run below replaces the default stream.
    let stream = Bound::from_borrowed_ptr(py, default);
    let stream = stream.cast_unchecked::<Stream>();
    let core = stream.get().core_ref();
    let mut context_value = None;
    let correlation_id = match opt(correlation_id) {
        Some(c) => Some(c),
        None if !config.is_null() => {
            // SAFETY: configs are never freed.
            let var = (*config).correlation_var.as_ptr();
            let mut value: *mut ffi::PyObject = std::ptr::null_mut();
            if ffi::PyContextVar_Get(var, std::ptr::null_mut(), &mut value) < 0 {
                ffi::PyErr_Clear();
            } else if !value.is_null() {
                context_value = Some(Bound::from_owned_ptr(py, value));
            }
            context_value.filter(|v| !v.is_none())
        }
        None => None,
    };
    let name = convert::lookup_str(event);
    let measurements = opt(measurements);
    let metadata = opt(metadata);
    emit_into(
        core,
        name,
        Measure::Object(measurements.as_ref()),
        metadata.as_ref(),
        correlation_id.as_ref(),
        None,
        0,
        None,
    );
}

static mut EMIT_DEF: ffi::PyMethodDef = ffi::PyMethodDef {
    ml_name: c"emit".as_ptr(),
    ml_meth: ffi::PyMethodDefPointer {
        PyCFunctionFastWithKeywords: emit_raw,
    },
    ml_flags: ffi::METH_FASTCALL | ffi::METH_KEYWORDS,
    ml_doc: c"emit(event, measurements, metadata=None, correlation_id=None)\n--\n\nQueue one event on the default stream (or hand it to the fallback); never raises.".as_ptr(),
};

fn add_emit(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    // SAFETY: a static method definition, read-only after this.
    let function = unsafe {
        let ptr = ffi::PyCFunction_NewEx(
            std::ptr::addr_of_mut!(EMIT_DEF),
            std::ptr::null_mut(),
            m.name()?.as_ptr(),
        );
        Bound::from_owned_ptr_or_err(py, ptr)?
    };
    m.add("emit", function)
}

#[pyfunction]
#[pyo3(signature = (amount=1))]
fn count_process_errors(amount: u64) {
    wstream::count_process_errors(amount);
}

#[pyfunction]
fn process_errors() -> u64 {
    wstream::process_errors()
}

#[pyfunction]
fn reset_process_errors() {
    wstream::reset_process_errors();
}

/// `gil_used = true`: the default stream, configuration and name cache rely
/// on the GIL (a free-threaded Python re-enables it for this module).
#[pymodule(gil_used = true)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("IMPLEMENTATION_VERSION", env!("CARGO_PKG_VERSION"))?;
    m.add("IMPLEMENTATION", wstream::IMPLEMENTATION)?;
    m.add("MAX_BATCH_EVENTS", wstream::MAX_BATCH_EVENTS)?;
    m.add("FLUSH_EVENTS", wstream::FLUSH_EVENTS)?;
    m.add_class::<Stream>()?;
    m.add_class::<Call>()?;
    span::register(m)?;
    add_emit(m)?;
    m.add_function(wrap_pyfunction!(set_default, m)?)?;
    m.add_function(wrap_pyfunction!(configure, m)?)?;
    m.add_function(wrap_pyfunction!(default_stream, m)?)?;
    m.add_function(wrap_pyfunction!(configuration, m)?)?;
    m.add_function(wrap_pyfunction!(count_process_errors, m)?)?;
    m.add_function(wrap_pyfunction!(process_errors, m)?)?;
    m.add_function(wrap_pyfunction!(reset_process_errors, m)?)?;
    Ok(())
}
