//! The native half of snakepit_telemetry, without any BEAM symbols.
//!
//! The NIF crate wraps this one: it owns the tokio runtime, turns [`Sym`]s
//! into preallocated atoms and [`decode::Decoded`] events into terms. Keeping
//! the stream, decoding and catalog logic here lets `cargo test` cover them
//! (a rustler cdylib cannot be linked outside the BEAM).
//!
//! [`Sym`]: catalog::Sym

pub mod auth;
pub mod catalog;
pub mod credit;
pub mod custom;
pub mod decode;
pub mod enforce;
pub mod json;
mod snakepit_v013;
pub mod stats;
pub mod stream;
pub mod wire;

/// Messages and client/server code generated from `proto/snakepit_bridge.proto`.
pub mod proto {
    tonic::include_proto!("snakepit.bridge");
}
