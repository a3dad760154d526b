//! Events and keys that applications register at run time.
//!
//! The catalog is fixed at compile time; an application that emits its own
//! Python events (`telemetry.span("inference")`) registers their names here,
//! together with atoms that already exist in its own code. This registry only
//! maps Python text to small ids; the NIF keeps the atoms for each id. A name
//! nobody registered is still dropped and counted, so atom safety holds.

use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

use crate::catalog;

/// Most custom event names and keys a VM may register: registration is an
/// application's configuration, not something driven by input.
pub const MAX_EVENTS: usize = 4_096;
pub const MAX_KEYS: usize = 1_024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegisterError {
    #[error("{0:?} is not a dotted name of lowercase identifiers")]
    InvalidName(String),
    #[error("{0:?} is already an event of the catalog")]
    InCatalog(String),
    #[error("too many custom names (the limit is {0})")]
    TooMany(usize),
}

#[derive(Default)]
struct Tables {
    events: HashMap<String, u32>,
    /// Event names by id.
    event_names: Vec<String>,
    keys: HashMap<String, u32>,
}

fn tables() -> &'static RwLock<Tables> {
    static TABLES: OnceLock<RwLock<Tables>> = OnceLock::new();
    TABLES.get_or_init(Default::default)
}

fn valid_segment(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

fn intern(map: &mut HashMap<String, u32>, name: &str, max: usize) -> Result<u32, RegisterError> {
    if let Some(id) = map.get(name) {
        return Ok(*id);
    }
    if map.len() >= max {
        return Err(RegisterError::TooMany(max));
    }
    let id = map.len() as u32;
    map.insert(name.to_string(), id);
    Ok(id)
}

/// Registers a dotted Python event name; returns its id (the same id if it
/// was registered before).
pub fn register_event(python_name: &str) -> Result<u32, RegisterError> {
    if python_name.is_empty() || !python_name.split('.').all(valid_segment) {
        return Err(RegisterError::InvalidName(python_name.to_string()));
    }
    if catalog::event(python_name).is_some() {
        return Err(RegisterError::InCatalog(python_name.to_string()));
    }
    let mut tables = tables().write().unwrap_or_else(|e| e.into_inner());
    let id = intern(&mut tables.events, python_name, MAX_EVENTS)?;
    if id as usize == tables.event_names.len() {
        tables.event_names.push(python_name.to_string());
    }
    Ok(id)
}

/// Registers a measurement or metadata key that should arrive as an atom.
pub fn register_key(key: &str) -> Result<u32, RegisterError> {
    if !valid_segment(key) {
        return Err(RegisterError::InvalidName(key.to_string()));
    }
    let mut tables = tables().write().unwrap_or_else(|e| e.into_inner());
    intern(&mut tables.keys, key, MAX_KEYS)
}

/// The id of a registered event name.
pub fn event(python_name: &str) -> Option<u32> {
    let tables = tables().read().unwrap_or_else(|e| e.into_inner());
    tables.events.get(python_name).copied()
}

/// The dotted Python name of a registered event.
pub fn event_name(id: u32) -> Option<String> {
    let tables = tables().read().unwrap_or_else(|e| e.into_inner());
    tables.event_names.get(id as usize).cloned()
}

/// The id of a registered key.
pub fn key(name: &str) -> Option<u32> {
    let tables = tables().read().unwrap_or_else(|e| e.into_inner());
    tables.keys.get(name).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_names_once_and_refuses_bad_ones() {
        let a = register_event("custom_test.inference.stop").unwrap();
        assert_eq!(register_event("custom_test.inference.stop"), Ok(a));
        assert_eq!(event("custom_test.inference.stop"), Some(a));
        assert_eq!(event("custom_test.inference.nope"), None);
        assert_eq!(event_name(a).as_deref(), Some("custom_test.inference.stop"));
        assert_ne!(register_event("custom_test.inference.start").unwrap(), a);

        for bad in ["", "Upper.case", "a..b", "a.b-c", "9lives"] {
            assert!(
                matches!(register_event(bad), Err(RegisterError::InvalidName(_))),
                "{bad}"
            );
        }
        assert_eq!(
            register_event("python.call.stop"),
            Err(RegisterError::InCatalog("python.call.stop".into()))
        );

        let k = register_key("custom_test_model").unwrap();
        assert_eq!(key("custom_test_model"), Some(k));
        assert!(register_key("a.b").is_err());
    }
}
