//! The call logic of `Core` (the semantics of `telemetry/stream.py`),
//! driven step by step as both routes drive it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use snakepit_telemetry_core::enforce::ControlState;
use snakepit_telemetry_core::proto::{
    telemetry_control, telemetry_value, TelemetryControl, TelemetryEvent, TelemetryEventBatch,
    TelemetryEventFilter, TelemetrySamplingUpdate, TelemetryToggle,
};
use snakepit_telemetry_worker::event::{encode_name, EventWriter, Item};
use snakepit_telemetry_worker::stream::{
    now_ns, Core, Flush, Reason, Settings, Step, FLUSH_EVENTS, STATS_EVENT, STATS_MEASUREMENTS,
    TAKEOVER_GRACE,
};

fn settings() -> Settings {
    Settings {
        queue_size: 64,
        flush_interval: Duration::ZERO,
        stats_interval: Duration::ZERO,
        ..Settings::default()
    }
}

fn item(name: &str, seq: i64) -> Item {
    let mut w = EventWriter::new(&encode_name(name.split('.')), 32);
    w.measurement_int("seq", seq);
    w.finish(1_000 + seq)
}

fn seq_of(event: &TelemetryEvent) -> i64 {
    match event.measurements["seq"].value {
        Some(telemetry_value::Value::IntValue(v)) => v,
        ref other => panic!("seq is {other:?}"),
    }
}

/// Steps until a message comes (failing after a generous deadline).
fn next_message(core: &Core, cell: &snakepit_telemetry_worker::stream::CallCell) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match core.step(cell) {
            Step::Message(m) => return m,
            Step::Wait { until, idle, .. } => {
                assert!(Instant::now() < deadline, "no message in time");
                core.wait_blocking(cell, until.min(deadline), idle);
            }
            Step::Ended => panic!("call ended"),
        }
    }
}

/// A batched call that has just sent a regular event (after the stats
/// report that opens a call, when stats are on), so that its next flush time
/// is a whole flush interval away.
fn just_sent(core: &Core) -> Arc<snakepit_telemetry_worker::stream::CallCell> {
    let cell = core.open_call(true);
    core.push(item("a.b", -1));
    loop {
        // After a quiet spell the event goes at once.
        let message = next_message(core, &cell);
        core.confirm(&cell);
        if batch_events(&message)
            .iter()
            .any(|e| e.event_parts != STATS_EVENT)
        {
            return cell;
        }
    }
}

fn batch_events(message: &[u8]) -> Vec<TelemetryEvent> {
    let batch = TelemetryEventBatch::decode(message).unwrap();
    batch
        .events
        .into_iter()
        .map(|mut e| {
            e.timestamp_ns += batch.base_timestamp_ns;
            e
        })
        .collect()
}

fn stat(core: &Core, name: &str) -> u64 {
    core.stats()
        .get(name)
        .unwrap_or_else(|| panic!("no stat {name}"))
}

#[test]
fn a_batched_call_sends_queued_events_with_their_timestamps() {
    let core = Core::new(settings());
    for seq in 0..5 {
        core.push(item("python.call.stop", seq));
    }
    let cell = core.open_call(true);
    let events = batch_events(&next_message(&core, &cell));
    assert_eq!(
        events.iter().map(seq_of).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    assert_eq!(
        events.iter().map(|e| e.timestamp_ns).collect::<Vec<_>>(),
        vec![1000, 1001, 1002, 1003, 1004]
    );
    assert_eq!(stat(&core, "in_flight"), 5);
    core.confirm(&cell);
    assert_eq!(stat(&core, "sent"), 5);
    assert_eq!(stat(&core, "batches_sent"), 1);
    assert_eq!(stat(&core, "in_flight"), 0);
    assert_eq!(stat(&core, "emitted"), 5);
    assert!(core.wait_drained(Duration::from_secs(1)));
    core.finish(&cell);
    assert!(!core.stats().active_stream);
}

#[test]
fn the_event_rpc_sends_one_message_per_event() {
    let core = Core::new(settings());
    core.push(item("a.b", 7));
    core.push(item("a.b", 8));
    let cell = core.open_call(false);
    let first = TelemetryEvent::decode(next_message(&core, &cell).as_slice()).unwrap();
    let second = TelemetryEvent::decode(next_message(&core, &cell).as_slice()).unwrap();
    assert_eq!((seq_of(&first), first.timestamp_ns), (7, 1007));
    assert_eq!(seq_of(&second), 8);
    assert_eq!(first.event_parts, vec!["a", "b"]);
    // The second step confirmed the first message.
    assert_eq!(stat(&core, "sent"), 1);
    core.confirm(&cell);
    assert_eq!(stat(&core, "sent"), 2);
    assert_eq!(stat(&core, "batches_sent"), 0);
}

#[test]
fn stats_events_come_first_and_then_only_when_a_counter_changed() {
    let core = Core::new(Settings {
        stats_interval: Duration::from_millis(20),
        ..settings()
    });
    for framing in [true, false] {
        let cell = core.open_call(framing);
        let message = next_message(&core, &cell);
        let event = if framing {
            let mut events = batch_events(&message);
            assert_eq!(events.len(), 1);
            events.remove(0)
        } else {
            TelemetryEvent::decode(message.as_slice()).unwrap()
        };
        assert_eq!(event.event_parts, vec!["telemetry", "python", "stats"]);
        let mut keys: Vec<&str> = event.measurements.keys().map(String::as_str).collect();
        keys.sort();
        let mut want = STATS_MEASUREMENTS.to_vec();
        want.sort();
        assert_eq!(keys, want);
        assert_eq!(
            event.metadata,
            HashMap::from([
                ("instance_id".to_string(), core.instance_id().to_string()),
                ("implementation".to_string(), "native".to_string()),
            ])
        );
        assert!(event.timestamp_ns > 0);
        core.finish(&cell);
    }
    // The measurements are written in STATS_MEASUREMENTS order.
    let cell = core.open_call(false);
    let raw = next_message(&core, &cell);
    let text = String::from_utf8_lossy(&raw);
    let positions: Vec<usize> = STATS_MEASUREMENTS
        .iter()
        .map(|k| {
            text.find(&format!("\n{}{k}", char::from(k.len() as u8)))
                .unwrap()
        })
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    // Nothing changed: the next step waits (idle) rather than report again.
    match core.step(&cell) {
        Step::Wait { idle: true, .. } => {}
        other => panic!("expected a wait, got {other:?}"),
    }
    // A change is reported at the next due time.
    core.refuse(Reason::Invalid);
    let report = TelemetryEvent::decode(next_message(&core, &cell).as_slice()).unwrap();
    assert_eq!(
        report.measurements["dropped_invalid"].value,
        Some(telemetry_value::Value::IntValue(1))
    );
    assert_eq!(stat(&core, "stats_reports"), 4);
}

#[test]
fn a_new_call_takes_over_and_the_old_one_hands_back_what_it_did_not_send() {
    let core = Core::new(settings());
    for seq in 0..3 {
        core.push(item("a.b", seq));
    }
    let old = core.open_call(false);
    let first = TelemetryEvent::decode(next_message(&core, &old).as_slice()).unwrap();
    assert_eq!(seq_of(&first), 0);
    // Not confirmed: the message is in a send when the new call arrives,
    // and the transport ends the old call there.
    let new = core.open_call(false);
    core.finish(&old);
    assert_eq!(core.step(&old), Step::Ended);
    assert!(old.is_finished());
    assert_eq!(stat(&core, "interrupted_sends"), 1);
    assert_eq!(stat(&core, "queue_len"), 2);
    assert_eq!(stat(&core, "in_flight"), 0);
    let seqs: Vec<i64> = (0..2)
        .map(|_| seq_of(&TelemetryEvent::decode(next_message(&core, &new).as_slice()).unwrap()))
        .collect();
    assert_eq!(seqs, vec![1, 2]);
    core.confirm(&new);
    assert_eq!(stat(&core, "sent"), 2);
    assert_eq!(stat(&core, "emitted"), 3);
    assert_eq!(stat(&core, "streams_opened"), 2);
    // finish is idempotent and a finished call stays ended.
    core.finish(&old);
    assert_eq!(core.step(&old), Step::Ended);
    assert_eq!(stat(&core, "interrupted_sends"), 1);
}

#[test]
fn a_superseded_call_that_asks_for_more_confirms_its_message_and_ends() {
    let core = Core::new(settings());
    for seq in 0..3 {
        core.push(item("a.b", seq));
    }
    let old = core.open_call(false);
    next_message(&core, &old);
    let new = core.open_call(false);
    // Asking for the next message means the transport took the last one.
    assert_eq!(core.step(&old), Step::Ended);
    assert_eq!(stat(&core, "sent"), 1);
    assert_eq!(stat(&core, "interrupted_sends"), 0);
    let next = TelemetryEvent::decode(next_message(&core, &new).as_slice()).unwrap();
    assert_eq!(seq_of(&next), 1);
}

#[test]
fn a_superseded_call_stuck_in_a_send_is_finished_after_the_grace() {
    let core = Core::new(settings());
    for seq in 0..3 {
        core.push(item("a.b", seq));
    }
    let old = core.open_call(false);
    next_message(&core, &old); // stuck: never stepped or confirmed again
    let opened = Instant::now();
    let new = core.open_call(false);
    // The new call finds nothing queued until the old one is finished.
    let message = next_message(&core, &new);
    assert!(opened.elapsed() >= TAKEOVER_GRACE);
    assert!(old.is_finished());
    assert_eq!(
        seq_of(&TelemetryEvent::decode(message.as_slice()).unwrap()),
        1
    );
    assert_eq!(stat(&core, "interrupted_sends"), 1);
}

#[test]
fn close_ends_the_active_call() {
    let core = Arc::new(Core::new(settings()));
    let cell = core.open_call(true);
    let (c2, cell2) = (core.clone(), cell.clone());
    let waiter = std::thread::spawn(move || loop {
        match c2.step(&cell2) {
            Step::Wait { until, idle, .. } => c2.wait_blocking(&cell2, until, idle),
            other => return other,
        }
    });
    core.close();
    assert_eq!(waiter.join().unwrap(), Step::Ended);
    assert!(!core.stats().active_stream);
}

#[test]
fn an_emit_wakes_a_sender_asleep_on_an_empty_queue() {
    let core = Arc::new(Core::new(settings()));
    let cell = core.open_call(true);
    let (c2, cell2) = (core.clone(), cell.clone());
    let sender = std::thread::spawn(move || loop {
        match c2.step(&cell2) {
            // A long wait: only the emit's wake-up ends it in time.
            Step::Wait { idle: true, .. } => {
                c2.wait_blocking(&cell2, Instant::now() + Duration::from_secs(60), true)
            }
            Step::Wait { until, idle, .. } => c2.wait_blocking(&cell2, until, idle),
            Step::Message(m) => return m,
            Step::Ended => panic!("ended"),
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while core.idle_waiters() == 0 {
        assert!(Instant::now() < deadline, "sender never slept");
        std::thread::yield_now();
    }
    let started = Instant::now();
    core.push(item("a.b", 1));
    let events = batch_events(&sender.join().unwrap());
    assert_eq!(seq_of(&events[0]), 1);
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn small_batches_wait_for_the_flush_interval() {
    let core = Core::new(Settings {
        flush_interval: Duration::from_secs(30),
        queue_size: 512,
        ..settings()
    });
    let cell = just_sent(&core);
    core.push(item("a.b", 2));
    match core.step(&cell) {
        Step::Wait {
            until,
            idle: false,
            flush,
        } => {
            assert_eq!(flush, Some(until));
            assert!(until > Instant::now() + Duration::from_secs(20))
        }
        other => panic!("expected the flush wait, got {other:?}"),
    }
    // A full batch does not wait.
    for seq in 0..255 {
        core.push(item("a.b", seq));
    }
    assert_eq!(stat(&core, "queue_len"), 256);
    let events = batch_events(&next_message(&core, &cell));
    assert_eq!(events.len(), 256);
}

/// A [`Flush`] that counts its runs (and may panic).
#[derive(Default)]
struct CountingFlush {
    runs: std::sync::atomic::AtomicUsize,
    panic: bool,
}

impl Flush for CountingFlush {
    fn flush(&self) -> bool {
        self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.panic {
            panic!("flush failed");
        }
        true
    }
}

impl CountingFlush {
    fn runs(&self) -> usize {
        self.runs.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// An event stamped now (the trigger compares emit times with the due time).
fn item_now(seq: i64) -> Item {
    let mut w = EventWriter::new(&encode_name(["a", "b"]), 32);
    w.measurement_int("seq", seq);
    w.finish(now_ns())
}

#[test]
fn an_emit_runs_the_installed_flush_only_once_a_batch_is_due() {
    let core = Core::new(Settings {
        flush_interval: Duration::from_secs(30),
        queue_size: 512,
        ..settings()
    });
    let flush = Arc::new(CountingFlush::default());
    let weak: std::sync::Weak<dyn Flush> = Arc::downgrade(&flush) as _;
    core.install_flush(weak.clone(), Duration::from_secs(10));
    assert_eq!(core.flush_margin(), Duration::from_secs(10));
    // Nothing due: no flush.
    core.push(item_now(1));
    assert_eq!(flush.runs(), 0);
    // A call waiting for a flush time 25 s away: due 10 s before it.
    core.set_flush_due(Some(Instant::now() + Duration::from_secs(25)));
    core.push(item_now(2));
    assert_eq!(flush.runs(), 0, "not due yet");
    // Within the margin: the emit flushes.
    core.set_flush_due(Some(Instant::now() + Duration::from_secs(5)));
    core.push(item_now(3));
    assert_eq!(flush.runs(), 1);
    // A call mid-send: not due.
    core.set_flush_due(None);
    core.push(item_now(4));
    assert_eq!(flush.runs(), 1);
    // Removed: never again; the events are all queued.
    core.set_flush_due(Some(Instant::now()));
    core.remove_flush(&weak);
    core.push(item_now(5));
    assert_eq!(flush.runs(), 1);
    assert_eq!(stat(&core, "queue_len"), 5);
}

#[test]
fn an_emit_runs_the_flush_for_a_sender_asleep_on_an_empty_queue() {
    let core = Core::new(Settings {
        flush_interval: Duration::from_secs(30),
        ..settings()
    });
    let flush = Arc::new(CountingFlush::default());
    core.install_flush(Arc::downgrade(&flush) as _, Duration::from_secs(1));
    let cell = core.open_call(true);
    assert!(
        core.announce_async(&cell, true),
        "an empty queue: it sleeps"
    );
    core.push(item("a.b", 1));
    assert_eq!(flush.runs(), 1, "an idle sender's wake becomes a flush");
    core.leave_idle();
}

#[test]
fn a_panicking_flush_is_counted_and_the_event_stays_queued() {
    let core = Core::new(settings());
    let flush = Arc::new(CountingFlush {
        panic: true,
        ..Default::default()
    });
    core.install_flush(Arc::downgrade(&flush) as _, Duration::from_secs(1));
    core.set_flush_due(Some(Instant::now()));
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    core.push(item_now(1));
    std::panic::set_hook(hook);
    assert_eq!(flush.runs(), 1);
    assert_eq!(stat(&core, "internal_errors"), 1);
    assert_eq!(stat(&core, "queue_len"), 1);
}

#[test]
fn with_a_flush_installed_a_batch_goes_within_the_margin_of_its_flush_time() {
    let core = Core::new(Settings {
        flush_interval: Duration::from_secs(30),
        queue_size: 512,
        ..settings()
    });
    let cell = just_sent(&core); // the next flush time: 30 s from now
    core.push(item("a.b", 2));
    assert!(matches!(core.step(&cell), Step::Wait { idle: false, .. }));
    // A margin wider than what is left: it goes now.
    let flush = Arc::new(CountingFlush::default());
    core.install_flush(Arc::downgrade(&flush) as _, Duration::from_secs(40));
    let events = batch_events(&next_message(&core, &cell));
    assert_eq!(seq_of(&events[0]), 2);
}

#[test]
fn the_emit_that_fills_a_batch_tells_the_sender_once() {
    let core = Core::new(Settings {
        flush_interval: Duration::from_secs(30),
        queue_size: 2048,
        ..settings()
    });
    let flush = Arc::new(CountingFlush::default());
    core.install_flush(Arc::downgrade(&flush) as _, Duration::from_secs(1));
    let cell = core.open_call(true);
    for seq in 0..FLUSH_EVENTS as i64 - 1 {
        core.push(item("a.b", seq));
    }
    assert_eq!(flush.runs(), 0, "not a full batch yet");
    core.push(item("a.b", 255));
    assert_eq!(flush.runs(), 1, "the push that fills a batch flushes");
    for seq in 256..600 {
        core.push(item("a.b", seq));
    }
    assert_eq!(flush.runs(), 1, "once per batch, not per push");
    // Taking from the queue (a send) re-arms it.
    let events = batch_events(&next_message(&core, &cell));
    assert_eq!(events.len(), 600);
    core.confirm(&cell);
    for seq in 0..FLUSH_EVENTS as i64 {
        core.push(item("a.b", seq));
    }
    assert_eq!(flush.runs(), 2);
}

#[test]
fn a_full_batch_wakes_a_sender_waiting_for_its_flush_time() {
    let core = Arc::new(Core::new(Settings {
        flush_interval: Duration::from_secs(600),
        queue_size: 2048,
        ..settings()
    }));
    let cell = just_sent(&core); // the next flush time: 10 minutes away
    core.push(item("a.b", 1));
    let (c2, cell2) = (core.clone(), cell.clone());
    let sender = std::thread::spawn(move || loop {
        match c2.step(&cell2) {
            Step::Wait { until, idle, .. } => c2.wait_blocking(&cell2, until, idle),
            Step::Message(m) => return m,
            Step::Ended => panic!("ended"),
        }
    });
    for seq in 2..=FLUSH_EVENTS as i64 {
        core.push(item("a.b", seq));
    }
    // Only the full batch's wake ends a 10-minute wait in time.
    let events = batch_events(&sender.join().unwrap());
    assert!(events.len() >= FLUSH_EVENTS, "{}", events.len());
}

#[test]
fn a_batch_waits_for_a_stats_report_due_before_its_flush_time() {
    let core = Core::new(Settings {
        flush_interval: Duration::from_secs(30),
        stats_interval: Duration::from_secs(5),
        queue_size: 512,
        ..settings()
    });
    let cell = just_sent(&core); // after the opening stats report
    core.push(item("a.b", 2));
    // The next report (5 s) comes before the flush time (30 s): the event
    // waits for it rather than going alone now; emitters are told the
    // batch's own flush time.
    match core.step(&cell) {
        Step::Wait {
            until,
            idle: false,
            flush: Some(flush),
        } => {
            assert!(until < flush, "{until:?} {flush:?}");
            assert!(flush > Instant::now() + Duration::from_secs(20));
        }
        other => panic!("expected a wait, got {other:?}"),
    }
    assert_eq!(stat(&core, "queue_len"), 1);
}

#[test]
fn oversized_events_are_dropped_and_counted_on_both_rpcs() {
    let big = || {
        let mut w = EventWriter::new(&encode_name(["a", "b"]), 0);
        w.metadata("k", &"x".repeat(300));
        w.finish(5)
    };
    for batched in [true, false] {
        let core = Core::new(Settings {
            max_message_bytes: 200,
            ..settings()
        });
        core.push(big());
        core.push(item("a.b", 1));
        let cell = core.open_call(batched);
        let message = next_message(&core, &cell);
        assert!(message.len() <= 200);
        let seq = if batched {
            seq_of(&batch_events(&message)[0])
        } else {
            seq_of(&TelemetryEvent::decode(message.as_slice()).unwrap())
        };
        assert_eq!(seq, 1);
        core.confirm(&cell);
        assert_eq!(stat(&core, "dropped_oversized"), 1);
        assert_eq!(stat(&core, "sent"), 1);
        assert_eq!(stat(&core, "in_flight"), 0);
    }
}

#[test]
fn a_full_queue_counts_drops_and_emitted_adds_up() {
    let core = Core::new(Settings {
        queue_size: 2,
        ..settings()
    });
    for seq in 0..5 {
        core.push(item("a.b", seq));
    }
    core.refuse(Reason::Sampled);
    let stats = core.stats();
    assert_eq!(stats.get("dropped_queue_full"), Some(3));
    assert_eq!(stats.get("dropped_sampled"), Some(1));
    assert_eq!(stats.get("queue_len"), Some(2));
    assert_eq!(stats.get("enqueued"), Some(2));
    assert_eq!(stats.get("emitted"), Some(6));
    let drained = core.drain_queued();
    assert_eq!(drained.len(), 2);
    assert_eq!(stat(&core, "emitted"), 6);
    assert_eq!(stat(&core, "queue_len"), 0);
}

fn control(c: telemetry_control::Control) -> Vec<u8> {
    TelemetryControl { control: Some(c) }.encode_to_vec()
}

#[test]
fn controls_apply_to_the_newest_call_and_reset_with_each_call() {
    let core = Core::new(Settings {
        control: ControlState::new(true, 1.0, vec![], vec![], vec!["secret.*".into()]),
        ..settings()
    });
    assert!(!core.passthrough());
    assert_eq!(core.decide("secret.x", None), Err(Reason::Filtered));
    let cell = core.open_call(true);
    let deny_all = control(telemetry_control::Control::Filter(TelemetryEventFilter {
        allow: vec![],
        deny: vec!["*".into()],
    }));
    assert!(core.apply_control(&deny_all, Some(cell.generation)));
    assert_eq!(core.decide("a.b", None), Err(Reason::Filtered));
    // A superseded call's control is ignored.
    assert!(!core.apply_control(&deny_all, Some(cell.generation - 1)));
    let off = control(telemetry_control::Control::Toggle(TelemetryToggle {
        enabled: false,
    }));
    assert!(core.apply_control(&off, None));
    assert_eq!(core.decide("a.b", None), Err(Reason::Disabled));
    assert!(!core.stats().enabled);
    // Malformed and empty controls are counted.
    assert!(!core.apply_control(&[0xff, 0xff], None));
    assert!(!core.apply_control(&[], None));
    assert_eq!(stat(&core, "internal_errors"), 2);
    assert_eq!(stat(&core, "controls_applied"), 2);
    // A new call starts from the defaults.
    core.open_call(true);
    assert_eq!(core.decide("a.b", None), Ok(()));
    assert_eq!(core.decide("secret.x", None), Err(Reason::Filtered));
}

#[test]
fn sampling_rules_and_their_truncation() {
    let core = Core::new(settings());
    assert!(core.passthrough());
    for i in 0..34 {
        let rule = control(telemetry_control::Control::Sampling(
            TelemetrySamplingUpdate {
                sampling_rate: 0.0,
                event_patterns: vec![format!("r{i}.*")],
            },
        ));
        assert!(core.apply_control(&rule, None));
    }
    assert_eq!(stat(&core, "controls_truncated"), 2);
    assert_eq!(core.control().state.rules().count(), 32);
    assert!(!core.passthrough());
    assert_eq!(core.sample_rate("r33.x"), 0.0);
    assert_eq!(core.sample_rate("r0.x"), 1.0); // truncated away
    assert!(!core.sample("r5.y"));
    assert!(core.sample("other"));
    assert_eq!(core.decide("r5.y", None), Err(Reason::Sampled));
    assert_eq!(core.decide("r5.y", Some(true)), Ok(()));
    assert_eq!(core.decide("other", Some(false)), Err(Reason::Sampled));
    let half = control(telemetry_control::Control::Sampling(
        TelemetrySamplingUpdate {
            sampling_rate: 0.5,
            event_patterns: vec![],
        },
    ));
    assert!(core.apply_control(&half, None));
    let kept = (0..4000)
        .filter(|_| core.decide("other", None).is_ok())
        .count();
    assert!((1000..3000).contains(&kept), "{kept}");
}
