//! Custom events and keys registered by the application at run time.
//!
//! The atoms come from Elixir as terms, so they already exist in the
//! application's code; the NIF only remembers them by the small ids that
//! `snakepit_telemetry_core::custom` hands out for the Python text.

use std::sync::RwLock;

use rustler::{Atom, Encoder, Env, Term};
use snakepit_telemetry_core::custom;

use crate::atoms;

static EVENTS: RwLock<Vec<(String, Vec<Atom>)>> = RwLock::new(Vec::new());
static KEYS: RwLock<Vec<Atom>> = RwLock::new(Vec::new());

fn set<T: Clone>(table: &RwLock<Vec<T>>, id: u32, value: T, filler: T) {
    let mut table = table.write().unwrap_or_else(|e| e.into_inner());
    let id = id as usize;
    if table.len() <= id {
        table.resize(id + 1, filler);
    }
    table[id] = value;
}

/// Maps a dotted Python event name to an event name made of existing atoms.
/// Registering a name again replaces its event name. Dirty: the name and
/// its atom list come from the caller with no size bound.
#[rustler::nif(schedule = "DirtyCpu")]
fn register_custom_event(python_name: String, name: Vec<Atom>) -> Result<Atom, (Atom, String)> {
    if name.is_empty() {
        return Err((atoms::invalid_option(), "the event name is empty".into()));
    }
    let id = custom::register_event(&python_name)
        .map_err(|e| (atoms::invalid_option(), e.to_string()))?;
    set(
        &EVENTS,
        id,
        (python_name, name),
        (String::new(), Vec::new()),
    );
    Ok(atoms::ok())
}

/// Makes a measurement or metadata key arrive as this (existing) atom.
#[rustler::nif]
fn register_custom_key<'a>(env: Env<'a>, key: Atom) -> Result<Atom, (Atom, String)> {
    let text = key
        .to_term(env)
        .atom_to_string()
        .map_err(|_| (atoms::invalid_option(), "not an atom".to_string()))?;
    let id = custom::register_key(&text).map_err(|e| (atoms::invalid_option(), e.to_string()))?;
    set(&KEYS, id, key, key);
    Ok(atoms::ok())
}

/// `[{python_name, event_name}]` for every registered custom event. Dirty:
/// up to `MAX_EVENTS` entries whose names have no length bound.
#[rustler::nif(schedule = "DirtyCpu")]
fn custom_events<'a>(env: Env<'a>) -> Term<'a> {
    let table = EVENTS.read().unwrap_or_else(|e| e.into_inner());
    let list: Vec<(&str, &Vec<Atom>)> = table
        .iter()
        .filter(|(python, _)| !python.is_empty())
        .map(|(python, name)| (python.as_str(), name))
        .collect();
    list.encode(env)
}

/// Encodes a custom event's name, or `None` if the id is unknown.
pub fn event_name<'a>(env: Env<'a>, id: u32) -> Option<Term<'a>> {
    let table = EVENTS.read().unwrap_or_else(|e| e.into_inner());
    table
        .get(id as usize)
        .filter(|(_, name)| !name.is_empty())
        .map(|(_, name)| name.encode(env))
}

/// The atom of a custom key, or `None` if the id is unknown.
pub fn key(id: u32) -> Option<Atom> {
    let table = KEYS.read().unwrap_or_else(|e| e.into_inner());
    table.get(id as usize).copied()
}
