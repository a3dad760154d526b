//! The worker side of snakepit_telemetry's telemetry stream in Rust, without
//! Python symbols (so `cargo test` covers it): the Python extension
//! `snakepit_telemetry._native` (crate `snakepit_telemetry_py`) converts
//! emitted events under the GIL and hands them here.
//!
//! * [`event`]: encoded events and the messages built from them;
//! * [`stream`]: the queue, counters, control state and call logic of
//!   `telemetry/stream.py`;
//! * [`server`]: a gRPC server for `BridgeService`'s telemetry methods,
//!   driven by the same call logic;
//! * [`drive`]: runs the server's connections and calls on whichever thread
//!   asks (an emitter that found a batch due, or the runtime's thread).

pub mod clock;
pub mod counters;
pub mod drive;
pub mod event;
pub mod pb;
pub mod server;
pub mod stream;
pub mod unix_conn;
