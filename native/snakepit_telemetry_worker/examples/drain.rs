//! Reads a worker's telemetry stream with the NIF's own client and counts
//! what it delivers: a stand-in for Elixir when measuring a worker alone.
//!
//!     drain <address> <secret|-> <events> [timeout_s]
//!
//! Prints `delivered=<n> stats=<n> elapsed_ms=<ms>` once `events` regular
//! events arrived (or the timeout passed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use snakepit_telemetry_core::auth::Secret;
use snakepit_telemetry_core::credit::Credit;
use snakepit_telemetry_core::decode::Decoded;
use snakepit_telemetry_core::stats::StreamStats;
use snakepit_telemetry_core::stream::{self, Address, Sink, Status, StreamConfig};
use tokio::sync::{mpsc, oneshot};

struct Counter {
    tx: mpsc::UnboundedSender<(usize, usize)>,
    credit: Arc<Credit>,
}

impl Sink for Counter {
    fn status(&mut self, status: Status) {
        eprintln!("drain: {status:?}");
    }
    fn events(&mut self, batch: Vec<Decoded>) {
        self.credit.release(batch.len());
        let stats = batch
            .iter()
            .filter(|e| e.event.spec().and_then(|s| s.python) == Some("telemetry.python.stats"))
            .count();
        let _ = self.tx.send((batch.len() - stats, stats));
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: drain <address> <secret|-> <events> [timeout_s]");
        std::process::exit(2);
    }
    let address = Address::parse(&args[1]).expect("an address");
    let secret = (args[2] != "-").then(|| Secret::new(args[2].as_bytes()).expect("a secret"));
    let want: usize = args[3].parse().expect("a count");
    let timeout = Duration::from_secs_f64(args.get(4).map_or(60.0, |t| t.parse().unwrap()));
    let credit = Arc::new(Credit::new(1 << 20));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (_controls_tx, controls) = mpsc::channel(8);
    let (stop_tx, stop) = oneshot::channel();
    let config = StreamConfig {
        secret,
        ..StreamConfig::default()
    };
    let task = tokio::spawn(stream::run(
        address,
        config,
        controls,
        stop,
        Arc::new(StreamStats::default()),
        credit.clone(),
        Counter { tx, credit },
    ));
    let started = Instant::now();
    let (mut delivered, mut stats) = (0, 0);
    while delivered < want {
        match tokio::time::timeout_at((started + timeout).into(), rx.recv()).await {
            Ok(Some((n, s))) => {
                delivered += n;
                stats += s;
            }
            _ => break,
        }
    }
    println!(
        "delivered={delivered} stats={stats} elapsed_ms={}",
        started.elapsed().as_millis()
    );
    let _ = stop_tx.send(());
    let _ = task.await;
}
