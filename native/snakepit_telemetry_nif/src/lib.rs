//! The snakepit_telemetry NIF: a thin layer between the BEAM and
//! `snakepit_telemetry_core`. It owns the tokio runtime, preallocates every
//! atom it can produce and turns decoded events into terms.

mod atoms;
mod catalog;
mod custom;
mod delivery;
mod encode;
mod json;
mod runtime;
mod secret;
mod stream;

rustler::init!("Elixir.Snakepit.Telemetry.Native", load = atoms::load);
