//! The one tokio runtime of the VM, created on first use and never dropped.

use once_cell::sync::Lazy;
use tokio::runtime::{Builder, Runtime};

/// Two workers are plenty: each stream task only reads its socket, decodes
/// and hands batches to the delivery thread.
pub static RUNTIME: Lazy<Runtime> = Lazy::new(|| {
    Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("snakepit-telemetry-io")
        .enable_all()
        .build()
        .expect("snakepit_telemetry: cannot start the tokio runtime")
});
