//! Reading an emit's arguments under the GIL: the conversion rules of
//! `_internal/convert.py` and `_internal/wire.py` (same drops, same
//! counts), writing the event's protobuf encoding at once. No reference to
//! the caller's objects is kept.
//!
//! * measurements: `None` is nothing; anything but a mapping counts 1 in
//!   `measurements_dropped`; a key that is not exactly `str` is dropped and
//!   counted; `int`, `float` and `str` values are kept (ints outside int64
//!   dropped and counted, non-finite floats kept); other values go through
//!   `coerce_measurement` (bool -> int, `numbers.Integral` -> `int()`,
//!   `numbers.Real` -> `float()`, a `str` subclass -> its text), else are
//!   dropped and counted;
//! * metadata: `None` is nothing, a non-mapping counts 1 in
//!   `internal_errors`; `None` values are skipped; other keys and values
//!   become `str()` (an entry whose `str()` raises or whose text cannot be
//!   UTF-8 is left out and counts 1 in `internal_errors`);
//! * the correlation id is `str()`'d unless it is `None` or a `str`;
//! * anything else that raises (iterating a mapping, a lone surrogate in a
//!   measurement or in the correlation id, an `int()` that raises) drops the
//!   whole event, counted once in `internal_errors`.

use std::cell::RefCell;
use std::os::raw::c_int;
use std::ptr;
use std::rc::Rc;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple};

use snakepit_telemetry_worker::event::{encode_name, EventWriter};

/// The event could not be converted (counted once in `internal_errors`).
#[derive(Debug)]
pub struct Failed;

/// A validated event name.
#[derive(Debug)]
pub struct Name {
    /// Encoded `event_parts` fields.
    pub encoded: Box<[u8]>,
    /// Dotted, for filters and sampling rules.
    pub dotted: Box<str>,
}

pub enum NameLookup {
    Valid(Rc<Name>),
    Invalid,
    /// Valid for Python but not encodable (a lone surrogate).
    Unencodable,
}

const NAME_SLOTS: usize = 1024;

struct NameSlot {
    /// The `str` object last looked up here, with a reference of ours
    /// (so its address cannot be reused while it is here). Released when
    /// the slot is replaced (with the GIL held), leaked at thread exit.
    object: *mut ffi::PyObject,
    key: Box<[u8]>,
    name: Option<Rc<Name>>,
}

thread_local! {
    /// Dotted name -> validated name, direct-mapped by Python's (cached)
    /// string hash: bounded, no lock; a hit on the same object costs a
    /// pointer comparison, on an equal string a memcmp.
    static NAMES: RefCell<Vec<Option<NameSlot>>> = RefCell::new((0..NAME_SLOTS).map(|_| None).collect());
}

/// The UTF-8 text of a `str` (or subclass) object; `None` (error cleared)
/// if it has none (lone surrogates). Borrowed from the object.
///
/// # Safety
/// `obj` must be a live `str` object that outlives the returned slice.
#[inline]
pub unsafe fn utf8<'a>(obj: *mut ffi::PyObject) -> Option<&'a str> {
    let mut size: ffi::Py_ssize_t = 0;
    let data = ffi::PyUnicode_AsUTF8AndSize(obj, &mut size);
    if data.is_null() {
        ffi::PyErr_Clear();
        return None;
    }
    Some(std::str::from_utf8_unchecked(std::slice::from_raw_parts(
        data as *const u8,
        size as usize,
    )))
}

pub(crate) fn name_from_parts<'a>(
    parts: impl IntoIterator<Item = &'a str> + Clone,
) -> Option<Name> {
    let mut dotted = String::new();
    for (i, part) in parts.clone().into_iter().enumerate() {
        if part.is_empty() {
            return None;
        }
        if i > 0 {
            dotted.push('.');
        }
        dotted.push_str(part);
    }
    if dotted.is_empty() {
        return None;
    }
    Some(Name {
        encoded: encode_name(parts).into_boxed_slice(),
        dotted: dotted.into_boxed_str(),
    })
}

/// A dotted name of an exact `str` object, cached.
///
/// # Safety
/// `event` must be a live exact `str` object; the GIL is held.
#[inline]
pub unsafe fn lookup_str(event: *mut ffi::PyObject) -> NameLookup {
    let hash = ffi::PyObject_Hash(event);
    let index = (hash as usize) & (NAME_SLOTS - 1);
    let hit = NAMES.with(|names| {
        let names = names.borrow();
        match &names[index] {
            Some(slot) if slot.object == event => Some(slot.name.clone()),
            Some(slot) => match utf8(event) {
                Some(text) if &*slot.key == text.as_bytes() => Some(slot.name.clone()),
                _ => None,
            },
            None => None,
        }
    });
    let name = match hit {
        Some(name) => name,
        None => {
            let Some(text) = utf8(event) else {
                return NameLookup::Unencodable;
            };
            let name = name_from_parts(text.split('.')).map(Rc::new);
            ffi::Py_INCREF(event);
            let old = NAMES.with(|names| {
                names.borrow_mut()[index].replace(NameSlot {
                    object: event,
                    key: text.as_bytes().into(),
                    name: name.clone(),
                })
            });
            if let Some(old) = old {
                // A str's deallocation runs no Python code.
                ffi::Py_DECREF(old.object);
            }
            name
        }
    };
    match name {
        Some(name) => NameLookup::Valid(name),
        None => NameLookup::Invalid,
    }
}

/// Any event argument, as `convert.event_parts` validates it: a dotted
/// `str`, a `str` subclass (its text) or a list/tuple of non-empty `str`.
pub fn lookup(event: &Bound<'_, PyAny>) -> NameLookup {
    let ptr = event.as_ptr();
    unsafe {
        if ffi::PyUnicode_CheckExact(ptr) != 0 {
            return lookup_str(ptr);
        }
        if ffi::PyList_Check(ptr) != 0 || ffi::PyTuple_Check(ptr) != 0 {
            let Ok(items) = event.try_iter() else {
                let _ = PyErr::take(event.py());
                return NameLookup::Invalid;
            };
            let mut parts: Vec<Bound<'_, PyAny>> = Vec::new();
            for item in items {
                match item {
                    Ok(part) if ffi::PyUnicode_CheckExact(part.as_ptr()) != 0 => parts.push(part),
                    _ => return NameLookup::Invalid,
                }
            }
            let mut texts = Vec::with_capacity(parts.len());
            for part in &parts {
                match utf8(part.as_ptr()) {
                    Some(text) => texts.push(text),
                    None => {
                        if part.is_empty().unwrap_or(true) {
                            return NameLookup::Invalid;
                        }
                        // Validated, then unencodable.
                        if parts.iter().any(|p| p.is_empty().unwrap_or(true)) {
                            return NameLookup::Invalid;
                        }
                        return NameLookup::Unencodable;
                    }
                }
            }
            return match name_from_parts(texts.iter().copied()) {
                Some(name) => NameLookup::Valid(Rc::new(name)),
                None => NameLookup::Invalid,
            };
        }
        if ffi::PyUnicode_Check(ptr) != 0 {
            let Some(text) = utf8(ptr) else {
                return NameLookup::Unencodable;
            };
            return match name_from_parts(text.split('.')) {
                Some(name) => NameLookup::Valid(Rc::new(name)),
                None => NameLookup::Invalid,
            };
        }
    }
    NameLookup::Invalid
}

static INTEGRAL: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static REAL: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static MAPPING: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn abc<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Py<PyAny>>,
    module: &str,
    name: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let abc = cell.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        Ok(py.import(module)?.getattr(name)?.unbind())
    })?;
    Ok(abc.bind(py).clone())
}

fn is_instance(value: &Bound<'_, PyAny>, cls: &Bound<'_, PyAny>) -> Result<bool, Failed> {
    let r = unsafe { ffi::PyObject_IsInstance(value.as_ptr(), cls.as_ptr()) };
    if r < 0 {
        let _ = PyErr::take(value.py());
        return Err(Failed);
    }
    Ok(r == 1)
}

fn is_mapping(value: &Bound<'_, PyAny>) -> Result<bool, Failed> {
    let py = value.py();
    let mapping = abc(py, &MAPPING, "collections.abc", "Mapping").map_err(|_| Failed)?;
    is_instance(value, &mapping)
}

/// A measurement value the wire can carry.
enum Scalar<'a> {
    Int(i64),
    Float(f64),
    Str(&'a str),
}

/// An int object as int64; `None` outside int64. Errors are failures.
unsafe fn as_i64(obj: *mut ffi::PyObject) -> Result<Option<i64>, Failed> {
    let mut overflow: c_int = 0;
    let v = ffi::PyLong_AsLongLongAndOverflow(obj, &mut overflow);
    if overflow != 0 {
        return Ok(None);
    }
    if v == -1 && !ffi::PyErr_Occurred().is_null() {
        ffi::PyErr_Clear();
        return Err(Failed);
    }
    Ok(Some(v))
}

/// `coerce_measurement`: `Ok(None)` means dropped. The result's text (if
/// any) lives in `keep`.
fn coerce<'py>(
    value: &Bound<'py, PyAny>,
    keep: &mut Option<Bound<'py, PyAny>>,
) -> Result<Option<Scalar<'static>>, Failed> {
    let py = value.py();
    let ptr = value.as_ptr();
    unsafe {
        if ffi::PyBool_Check(ptr) != 0 {
            return Ok(Some(Scalar::Int((ptr == ffi::Py_True()) as i64)));
        }
        let integral = abc(py, &INTEGRAL, "numbers", "Integral").map_err(|_| Failed)?;
        if is_instance(value, &integral)? {
            let as_int = ffi::PyNumber_Long(ptr);
            if as_int.is_null() {
                ffi::PyErr_Clear();
                return Err(Failed);
            }
            let as_int = Bound::from_owned_ptr(py, as_int);
            return Ok(as_i64(as_int.as_ptr())?.map(Scalar::Int));
        }
        let real = abc(py, &REAL, "numbers", "Real").map_err(|_| Failed)?;
        if is_instance(value, &real)? {
            let f = ffi::PyNumber_Float(ptr);
            if f.is_null() {
                ffi::PyErr_Clear();
                return Err(Failed);
            }
            let f = Bound::from_owned_ptr(py, f);
            return Ok(Some(Scalar::Float(ffi::PyFloat_AsDouble(f.as_ptr()))));
        }
        if ffi::PyUnicode_Check(ptr) != 0 {
            let text = utf8(ptr).ok_or(Failed)?;
            *keep = Some(value.clone());
            // Lives as long as `keep` holds the object.
            return Ok(Some(Scalar::Str(
                std::mem::transmute::<&str, &'static str>(text),
            )));
        }
    }
    Ok(None)
}

type Pair<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>);

/// Items of a mapping that is not an exact dict, as owned pairs.
fn mapping_items<'py>(raw: &Bound<'py, PyAny>) -> Result<Vec<Pair<'py>>, Failed> {
    let items = raw.call_method0("items").map_err(|_| Failed)?;
    let mut out = Vec::new();
    for item in items.try_iter().map_err(|_| Failed)? {
        let item = item.map_err(|_| Failed)?;
        let mut pair = item.try_iter().map_err(|_| Failed)?;
        let key = pair.next().ok_or(Failed)?.map_err(|_| Failed)?;
        let value = pair.next().ok_or(Failed)?.map_err(|_| Failed)?;
        if pair.next().is_some() {
            return Err(Failed);
        }
        out.push((key, value));
    }
    Ok(out)
}

/// Whether converting `obj` runs no Python code: an exact str, int or
/// float, or None.
#[inline]
unsafe fn plain(obj: *mut ffi::PyObject) -> bool {
    ffi::PyUnicode_CheckExact(obj) != 0
        || ffi::PyLong_CheckExact(obj) != 0
        || ffi::PyFloat_CheckExact(obj) != 0
        || obj == ffi::Py_None()
}

/// Calls `f` with each (key, value) of a mapping: an exact dict is read in
/// place (references held across any Python code `f` runs; a dict resized
/// meanwhile fails the event, as iterating it in Python raises).
fn for_each_item<'py>(
    raw: &Bound<'py, PyAny>,
    mut f: impl FnMut(&Bound<'py, PyAny>, &Bound<'py, PyAny>) -> Result<(), Failed>,
) -> Result<(), Failed> {
    let py = raw.py();
    unsafe {
        if ffi::PyDict_CheckExact(raw.as_ptr()) != 0 {
            let dict: &Bound<'py, PyDict> = raw.cast_unchecked();
            let size = ffi::PyDict_Size(dict.as_ptr());
            let mut pos: ffi::Py_ssize_t = 0;
            let mut key: *mut ffi::PyObject = ptr::null_mut();
            let mut value: *mut ffi::PyObject = ptr::null_mut();
            while ffi::PyDict_Next(dict.as_ptr(), &mut pos, &mut key, &mut value) != 0 {
                let key = Bound::from_borrowed_ptr(py, key);
                let value = Bound::from_borrowed_ptr(py, value);
                f(&key, &value)?;
                // Only Python code (str(), int(), ...) can resize the dict.
                if !(plain(key.as_ptr()) && plain(value.as_ptr()))
                    && ffi::PyDict_Size(dict.as_ptr()) != size
                {
                    return Err(Failed);
                }
            }
            return Ok(());
        }
    }
    for (key, value) in mapping_items(raw)? {
        f(&key, &value)?;
    }
    Ok(())
}

/// Writes the measurements; returns how many were dropped.
pub fn measurements(w: &mut EventWriter, raw: &Bound<'_, PyAny>) -> Result<u64, Failed> {
    if raw.is_none() {
        return Ok(0);
    }
    if unsafe { ffi::PyDict_CheckExact(raw.as_ptr()) } == 0 && !is_mapping(raw)? {
        return Ok(1);
    }
    let mut dropped = 0u64;
    for_each_item(raw, |key, value| {
        let kp = key.as_ptr();
        let vp = value.as_ptr();
        unsafe {
            if ffi::PyUnicode_CheckExact(kp) == 0 {
                dropped += 1;
                return Ok(());
            }
            let mut keep = None;
            let scalar = if ffi::PyLong_CheckExact(vp) != 0 {
                as_i64(vp)?.map(Scalar::Int)
            } else if ffi::PyFloat_CheckExact(vp) != 0 {
                Some(Scalar::Float(ffi::PyFloat_AS_DOUBLE(vp)))
            } else if ffi::PyUnicode_CheckExact(vp) != 0 {
                Some(Scalar::Str(std::mem::transmute::<&str, &'static str>(
                    utf8(vp).ok_or(Failed)?,
                )))
            } else {
                coerce(value, &mut keep)?
            };
            let Some(scalar) = scalar else {
                dropped += 1;
                return Ok(());
            };
            let key = utf8(kp).ok_or(Failed)?;
            match scalar {
                Scalar::Int(v) => w.measurement_int(key, v),
                Scalar::Float(v) => w.measurement_float(key, v),
                Scalar::Str(v) => w.measurement_str(key, v),
            }
            drop(keep);
        }
        Ok(())
    })?;
    Ok(dropped)
}

/// `str(obj)` unless it is exactly a `str`, as UTF-8 (kept alive in `keep`).
fn text_of<'py>(
    obj: &Bound<'py, PyAny>,
    keep: &mut Option<Bound<'py, PyAny>>,
) -> Option<&'static str> {
    unsafe {
        let ptr = obj.as_ptr();
        if ffi::PyUnicode_CheckExact(ptr) != 0 {
            return utf8(ptr).map(|t| std::mem::transmute::<&str, &'static str>(t));
        }
        let s = ffi::PyObject_Str(ptr);
        if s.is_null() {
            ffi::PyErr_Clear();
            return None;
        }
        let s = Bound::from_owned_ptr(obj.py(), s);
        let text = utf8(s.as_ptr()).map(|t| std::mem::transmute::<&str, &'static str>(t));
        *keep = Some(s);
        text
    }
}

/// Writes the metadata; returns how many entries failed.
pub fn metadata(w: &mut EventWriter, raw: &Bound<'_, PyAny>) -> Result<u64, Failed> {
    if raw.is_none() {
        return Ok(0);
    }
    if unsafe { ffi::PyDict_CheckExact(raw.as_ptr()) } == 0 && !is_mapping(raw)? {
        return Ok(1);
    }
    let mut errors = 0u64;
    for_each_item(raw, |key, value| {
        if value.is_none() {
            return Ok(());
        }
        let mut keep_key = None;
        let mut keep_value = None;
        match (text_of(key, &mut keep_key), text_of(value, &mut keep_value)) {
            (Some(k), Some(v)) => w.metadata(k, v),
            _ => errors += 1,
        }
        drop(keep_key);
        drop(keep_value);
        Ok(())
    })?;
    Ok(errors)
}

/// Writes the correlation id (`None`: none).
pub fn correlation_id(w: &mut EventWriter, raw: Option<&Bound<'_, PyAny>>) -> Result<(), Failed> {
    let Some(raw) = raw else {
        return Ok(());
    };
    if raw.is_none() {
        return Ok(());
    }
    let mut keep = None;
    let text = text_of(raw, &mut keep).ok_or(Failed)?;
    w.correlation_id(text);
    drop(keep);
    Ok(())
}

/// A span id as `stream.py` keeps it: an exact int in 1..2^64, else 0.
pub fn span_id(raw: &Bound<'_, PyAny>) -> u64 {
    unsafe {
        if ffi::PyLong_CheckExact(raw.as_ptr()) == 0 {
            return 0;
        }
        let v = ffi::PyLong_AsUnsignedLongLong(raw.as_ptr());
        if v == u64::MAX && !ffi::PyErr_Occurred().is_null() {
            ffi::PyErr_Clear();
            return 0;
        }
        v
    }
}

fn frame_text<'py>(
    obj: &Bound<'py, PyAny>,
    keep: &mut Vec<Bound<'py, PyAny>>,
) -> Result<&'static str, Failed> {
    unsafe {
        if ffi::PyUnicode_Check(obj.as_ptr()) != 0 {
            let text = utf8(obj.as_ptr()).ok_or(Failed)?;
            keep.push(obj.clone());
            return Ok(std::mem::transmute::<&str, &'static str>(text));
        }
    }
    // `if file:` then `.encode()`: a falsy non-str is left out, a truthy one fails.
    match obj.is_truthy() {
        Ok(false) => Ok(""),
        _ => {
            let _ = PyErr::take(obj.py());
            Err(Failed)
        }
    }
}

/// Writes the frames of an exception event's traceback (a tuple of
/// `(file, line, function)`; anything but a tuple is no traceback).
pub fn stacktrace(w: &mut EventWriter, raw: Option<&Bound<'_, PyAny>>) -> Result<(), Failed> {
    let Some(raw) = raw else {
        return Ok(());
    };
    let Ok(frames) = raw.cast_exact::<PyTuple>() else {
        return Ok(());
    };
    for frame in frames.iter() {
        let mut parts = frame.try_iter().map_err(|_| Failed)?;
        let mut next = || -> Result<Bound<'_, PyAny>, Failed> {
            parts.next().ok_or(Failed)?.map_err(|_| Failed)
        };
        let (file, line, function) = (next()?, next()?, next()?);
        if parts.next().is_some() {
            return Err(Failed);
        }
        let mut keep = Vec::new();
        let file = frame_text(&file, &mut keep)?;
        let function = frame_text(&function, &mut keep)?;
        let line = unsafe {
            if ffi::PyLong_Check(line.as_ptr()) == 0 {
                return Err(Failed);
            }
            match as_i64(line.as_ptr())? {
                Some(v) => v as i128,
                None => 0,
            }
        };
        w.frame(file, line, function);
        drop(keep);
    }
    Ok(())
}
