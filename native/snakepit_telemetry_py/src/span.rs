//! `telemetry.span` on the native default stream: the base class of the
//! Python `span` (`_native.SpanBase`), whose construction, `__enter__` and
//! successful `__exit__` run here without a Python frame.
//!
//! `__enter__` takes the native path when the extension's default stream is
//! installed (`set_default`) and the name is an exact, valid dotted `str`:
//! it decides sampling once for the whole span (with the rate of
//! `<name>.start`), draws the span id, takes the correlation id in force
//! unless one was given, and queues `<name>.start`. A successful exit queues
//! `<name>.stop` with the duration (`time.monotonic_ns` units). Everything
//! else (another backend, an exception, `stop(extra)`, `fail(...)`) goes to
//! the Python subclass's methods (`_enter_slow`, `_exit_slow`, which end a
//! native span through `_native_end`). Nothing raises into the caller:
//! failures are counted as process errors.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyDict};

use snakepit_telemetry_worker::stream as wstream;

use crate::convert::{self, Name, NameLookup};
use crate::{emit_named, Measure, Stream, CONFIG, DEFAULT};

/// Span ids: a counter from a random base (see `_internal/spans.py`),
/// seeded by Python (`seed_span_ids`, again in a forked child).
static SPAN_IDS: AtomicU64 = AtomicU64::new(1);

/// The next span id (never 0).
#[pyfunction]
pub(crate) fn new_span_id() -> u64 {
    loop {
        let id = SPAN_IDS.fetch_add(1, Ordering::Relaxed);
        if id != 0 {
            return id;
        }
    }
}

/// Restarts span ids at `base`.
#[pyfunction]
fn seed_span_ids(base: u64) {
    SPAN_IDS.store(base, Ordering::Relaxed);
}

/// `time.monotonic_ns()`.
#[inline]
fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// A span name's three event names.
struct SpanNames {
    start: Name,
    stop: Name,
    exception: Name,
}

const SPAN_NAME_CACHE_LIMIT: usize = 4096;

thread_local! {
    /// Span name -> its events' names (`None`: not valid), bounded.
    static SPAN_NAMES: RefCell<HashMap<Box<str>, Option<Arc<SpanNames>>>> = RefCell::new(HashMap::new());
}

/// The event names of a span named by the exact `str` `name`, if it is a
/// valid dotted name (else the Python path decides what happens).
///
/// # Safety
/// `name` is a live exact `str`; the GIL is held.
unsafe fn span_names(name: *mut ffi::PyObject) -> Option<Arc<SpanNames>> {
    let text = convert::utf8(name)?;
    if let Some(hit) = SPAN_NAMES.with(|c| c.borrow().get(text).cloned()) {
        return hit;
    }
    let names = match convert::lookup_str(name) {
        NameLookup::Valid(_) => {
            let make =
                |suffix: &'static str| convert::name_from_parts(text.split('.').chain([suffix]));
            match (make("start"), make("stop"), make("exception")) {
                (Some(start), Some(stop), Some(exception)) => Some(Arc::new(SpanNames {
                    start,
                    stop,
                    exception,
                })),
                _ => None,
            }
        }
        _ => None,
    };
    SPAN_NAMES.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() >= SPAN_NAME_CACHE_LIMIT {
            c.clear();
        }
        c.insert(text.into(), names.clone());
    });
    names
}

/// The correlation id in force (the ContextVar `configure` set), or None.
pub(crate) fn context_correlation_id(py: Python<'_>) -> Option<Bound<'_, PyAny>> {
    let config = CONFIG.load(Ordering::Acquire);
    if config.is_null() {
        return None;
    }
    // SAFETY: configs are never freed; the GIL is held.
    unsafe {
        let var = (*config).correlation_var.as_ptr();
        let mut value: *mut ffi::PyObject = std::ptr::null_mut();
        if ffi::PyContextVar_Get(var, std::ptr::null_mut(), &mut value) < 0 {
            ffi::PyErr_Clear();
            return None;
        }
        if value.is_null() {
            return None;
        }
        Some(Bound::from_owned_ptr(py, value))
    }
}

/// A span started on the native path.
struct Native {
    /// The stream at enter (its core is looked up at each event, so a
    /// forked child's renewed core is the one written to).
    stream: Py<Stream>,
    names: Arc<SpanNames>,
    sampled: bool,
}

/// Base class of `telemetry.span` with the native implementation.
#[pyclass(subclass, module = "snakepit_telemetry._native")]
pub(crate) struct SpanBase {
    #[pyo3(get, set, name = "_name")]
    name: Py<PyAny>,
    /// `None` until read or set (an empty dict then).
    metadata: Option<Py<PyAny>>,
    #[pyo3(get, set, name = "_correlation_id")]
    correlation_id: Py<PyAny>,
    #[pyo3(get, set, name = "_started")]
    started: i64,
    #[pyo3(get, set, name = "_span_id")]
    span_id: u64,
    /// Read as `_native.NATIVE_SPAN` while the span is native.
    backend: Py<PyAny>,
    #[pyo3(get, set, name = "_token")]
    token: Py<PyAny>,
    native: Option<Native>,
}

/// `dict(metadata) if metadata else {}` (None for empty), counting a
/// failure as a process error (as `errors.count()`).
fn copy_metadata(metadata: Option<&Bound<'_, PyAny>>) -> Option<Py<PyAny>> {
    let m = metadata?;
    let py = m.py();
    let copied = (|| -> PyResult<Option<Py<PyAny>>> {
        if unsafe { ffi::PyDict_CheckExact(m.as_ptr()) } != 0 {
            let d = m.cast::<PyDict>()?;
            if d.is_empty() {
                return Ok(None);
            }
            return Ok(Some(d.copy()?.into_any().unbind()));
        }
        if !m.is_truthy()? {
            return Ok(None);
        }
        let dict_type = py.get_type::<PyDict>();
        Ok(Some(dict_type.call1((m,))?.unbind()))
    })();
    match copied {
        Ok(d) => d,
        Err(_) => {
            wstream::count_process_errors(1);
            Some(PyDict::new(py).into_any().unbind())
        }
    }
}

impl SpanBase {
    /// Emits one of the span's events on the native path.
    fn emit(&self, py: Python<'_>, native: &Native, name: &Name, measure: Measure<'_, '_>) {
        let stream = native.stream.bind(py);
        let core = stream.get().core_ref();
        let metadata = self.metadata.as_ref().map(|m| m.bind(py));
        let correlation_id = self.correlation_id.bind(py);
        let correlation_id = (!correlation_id.is_none()).then_some(correlation_id);
        emit_named(
            core,
            name,
            measure,
            metadata,
            correlation_id,
            Some(native.sampled),
            self.span_id,
            None,
        );
    }

    /// The native start, if this span can take it.
    fn enter_native(&mut self, py: Python<'_>) -> bool {
        let default = DEFAULT.load(Ordering::Acquire);
        let name = self.name.as_ptr();
        // SAFETY: the GIL is held; DEFAULT holds a reference to a Stream.
        unsafe {
            if default.is_null() || ffi::PyUnicode_CheckExact(name) == 0 {
                return false;
            }
            let Some(names) = span_names(name) else {
                return false;
            };
            let stream: Py<Stream> = Bound::from_borrowed_ptr(py, default)
                .cast_into_unchecked::<Stream>()
                .unbind();
            if self.correlation_id.is_none(py) {
                if let Some(id) = context_correlation_id(py) {
                    self.correlation_id = id.unbind();
                }
            }
            let sampled = stream.get().core_ref().sample(&names.start.dotted);
            self.span_id = new_span_id();
            let native = Native {
                stream,
                names,
                sampled,
            };
            self.emit(
                py,
                &native,
                &native.names.start,
                Measure::Int("system_time", wstream::now_ns()),
            );
            self.native = Some(native);
            self.started = monotonic_ns();
        }
        true
    }
}

#[pymethods]
impl SpanBase {
    #[new]
    #[pyo3(signature = (name, metadata=None, correlation_id=None))]
    fn new(
        py: Python<'_>,
        name: Py<PyAny>,
        metadata: Option<&Bound<'_, PyAny>>,
        correlation_id: Option<Py<PyAny>>,
    ) -> SpanBase {
        SpanBase {
            name,
            metadata: copy_metadata(metadata.filter(|m| !m.is_none())),
            correlation_id: correlation_id.unwrap_or_else(|| py.None()),
            started: 0,
            span_id: 0,
            backend: py.None(),
            token: py.None(),
            native: None,
        }
    }

    /// The garbage collector sees what a span holds (a cycle through its
    /// metadata or token is collectable: dicts and tuples clear).
    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        visit.call(&self.name)?;
        if let Some(m) = &self.metadata {
            visit.call(m)?;
        }
        visit.call(&self.correlation_id)?;
        visit.call(&self.backend)?;
        visit.call(&self.token)?;
        if let Some(native) = &self.native {
            visit.call(&native.stream)?;
        }
        Ok(())
    }

    #[getter(_metadata)]
    fn get_metadata(&mut self, py: Python<'_>) -> Py<PyAny> {
        self.metadata
            .get_or_insert_with(|| PyDict::new(py).into_any().unbind())
            .clone_ref(py)
    }

    #[setter(_metadata)]
    fn set_metadata(&mut self, value: Py<PyAny>) {
        self.metadata = Some(value);
    }

    #[getter(_backend)]
    fn get_backend(&self, py: Python<'_>) -> Py<PyAny> {
        match (&self.native, NATIVE_SPAN.get(py)) {
            (Some(_), Some(marker)) => marker.clone_ref(py),
            _ => self.backend.clone_ref(py),
        }
    }

    #[setter(_backend)]
    fn set_backend(&mut self, value: Py<PyAny>) {
        self.backend = value;
    }

    /// Whether the span was started on the native path.
    #[getter(_native_active)]
    fn native_active(&self) -> bool {
        self.native.is_some()
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        let py = slf.py();
        let done = match slf.try_borrow_mut() {
            Ok(mut this) => {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    this.enter_native(py)
                }));
                outcome.unwrap_or_else(|_| {
                    wstream::count_process_errors(1);
                    true
                })
            }
            Err(_) => false,
        };
        if !done && slf.call_method0(intern!(py, "_enter_slow")).is_err() {
            wstream::count_process_errors(1);
        }
        slf
    }

    fn __exit__(
        slf: &Bound<'_, Self>,
        exc_type: &Bound<'_, PyAny>,
        exc: &Bound<'_, PyAny>,
        _tb: &Bound<'_, PyAny>,
    ) -> bool {
        let ended = monotonic_ns();
        let py = slf.py();
        if exc_type.is_none() {
            if let Ok(this) = slf.try_borrow() {
                if let Some(native) = &this.native {
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        this.emit(
                            py,
                            native,
                            &native.names.stop,
                            Measure::Int("duration", ended - this.started),
                        )
                    }));
                    if outcome.is_err() {
                        wstream::count_process_errors(1);
                    }
                    return false;
                }
            }
        }
        if slf
            .call_method1(intern!(py, "_exit_slow"), (exc_type, exc, ended))
            .is_err()
        {
            wstream::count_process_errors(1);
        }
        false // never swallow the user's exception
    }

    /// Ends a native span (for `stop(extra)`, `fail` and exceptions): emits
    /// `<name>.stop` (`failed` false) or `<name>.exception` with
    /// `{"duration": duration}`, `metadata` and `stacktrace`.
    #[pyo3(signature = (failed, duration, metadata, stacktrace=None))]
    fn _native_end(
        &self,
        py: Python<'_>,
        failed: &Bound<'_, PyBool>,
        duration: i64,
        metadata: Option<&Bound<'_, PyAny>>,
        stacktrace: Option<&Bound<'_, PyAny>>,
    ) {
        let Some(native) = &self.native else {
            return;
        };
        let name = if failed.is_true() {
            &native.names.exception
        } else {
            &native.names.stop
        };
        let stream = native.stream.bind(py);
        let correlation_id = self.correlation_id.bind(py);
        emit_named(
            stream.get().core_ref(),
            name,
            Measure::Int("duration", duration),
            metadata.filter(|m| !m.is_none()),
            (!correlation_id.is_none()).then_some(correlation_id),
            Some(native.sampled),
            self.span_id,
            stacktrace.filter(|s| !s.is_none()),
        );
    }
}

/// What a native span's `_backend` reads as (a plain `object()`).
static NATIVE_SPAN: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let marker = NATIVE_SPAN.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        Ok(py.eval(c"object()", None, None)?.unbind())
    })?;
    m.add("NATIVE_SPAN", marker.clone_ref(py))?;
    m.add_class::<SpanBase>()?;
    m.add_function(wrap_pyfunction!(new_span_id, m)?)?;
    m.add_function(wrap_pyfunction!(seed_span_ids, m)?)?;
    Ok(())
}
