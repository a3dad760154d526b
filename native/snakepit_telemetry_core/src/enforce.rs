//! Control enforced on the native side, for workers that do not apply it
//! themselves the way Elixir means it.
//!
//! Snakepit v0.13's Python (`snakepit_bridge.telemetry.stream.TelemetryStream`)
//! serves only `StreamTelemetry`, one event per message, and treats control
//! messages differently from this project's Python:
//!
//! * a sampling update's `event_patterns` are ignored: its rate becomes the
//!   rate of *every* event, so a rule meant for `"python.call.*"` would
//!   sample everything;
//! * each event is sampled alone: a span's start and stop are decided
//!   independently;
//! * toggle, sampling and filters are applied when an event is emitted, and
//!   an event emitted before the first stream opened was buffered under the
//!   defaults (on, rate 1.0, no filters): control sent on open never reaches
//!   it.
//!
//! On a stream that fell back to `StreamTelemetry` (protocol `:events`), the
//! stream task therefore keeps the worker's whole control state itself
//! ([`ControlState`], seeded when the stream opens and updated by every
//! control message that passes through it) and applies it to what it
//! receives ([`Enforcer`]): toggle, allow/deny, and per-pattern sampling
//! with whole spans. The worker is only sent what it applies correctly:
//! toggle and filters as they are, and instead of each sampling update a
//! neutral one (rate 1.0, no patterns) so that it samples nothing itself;
//! see [`for_event_worker`]. Each drop is counted under its own reason
//! (`enforced_disabled`, `enforced_filtered`, `enforced_sampled`).
//!
//! The semantics are those of `Snakepit.Telemetry.Control` and the Python
//! `ControlState`: globs are Python's `fnmatch` globs over dotted Python
//! names; deny wins over allow and an empty allow list allows every event;
//! an event's rate is that of the newest rule with a matching pattern, else
//! the default rate; a span's sampling decision is taken at its start (with
//! the rate for `<name>.start`) and holds for its stop or exception; the
//! order of checks is toggle, filter, sampling. The worker's own stats
//! event (`telemetry.python.stats`) is never dropped.
//!
//! ## Span identity and its limits
//!
//! Events from a v0.13 worker carry no span id. A span is identified by its
//! correlation id and its name (the event name without `.start`, `.stop`
//! or `.exception`), and the decisions of open spans with the same identity
//! are kept last in, first out, which is right for nested spans. Two spans
//! with the same name and correlation id (often the empty one, which v0.13
//! sends when there is none) that overlap without nesting, e.g. in two
//! threads, may swap decisions: every stop still follows some start's
//! decision, so the number of whole spans kept stays right, but a kept stop
//! may belong to a dropped start. Decisions are only recorded while some
//! rate is below 1.0; at most [`MAX_OPEN_SPANS`] are kept (then they are
//! forgotten all at once), and an end whose start was not recorded is
//! sampled alone with its own rate.

use std::collections::HashMap;

use crate::custom;
use crate::decode::{Decoded, Event};
use crate::proto::{telemetry_control, TelemetryControl, TelemetrySamplingUpdate};
use crate::stats::StreamStats;

/// Most sampling rules kept; the oldest go first (as in `Control`).
pub const MAX_RULES: usize = 32;
/// Most open span decisions remembered.
pub const MAX_OPEN_SPANS: usize = 4_096;
/// Most per-name verdicts cached (then the cache starts over).
const MAX_CACHED_NAMES: usize = 4_096;
/// The worker's stats event: never sampled, filtered or disabled.
const STATS_EVENT: &str = "telemetry.python.stats";

/// One element of a compiled glob.
#[derive(Clone, Debug, PartialEq)]
enum Token {
    /// `*`: any run of characters, dots included.
    Star,
    /// `?`: any one character.
    Any,
    Char(char),
    /// `[...]` / `[!...]`: one character in (or not in) the ranges.
    Set {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

/// A Python `fnmatch` glob (`fnmatch.fnmatchcase`, which `fnmatch.fnmatch`
/// is on POSIX): `*` matches any run of characters (dots included), `?` one
/// character, `[seq]` one character of `seq` (with `a-z` ranges; `[!seq]`
/// negates; a `]` right after `[` or `[!` is literal; a `[` without a
/// closing `]` is literal), everything else itself. The whole name must
/// match.
#[derive(Clone, Debug, PartialEq)]
pub struct Glob {
    tokens: Vec<Token>,
}

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        let chars: Vec<char> = pattern.chars().collect();
        let mut tokens = Vec::with_capacity(chars.len());
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            i += 1;
            match c {
                '*' => {
                    if tokens.last() != Some(&Token::Star) {
                        tokens.push(Token::Star);
                    }
                }
                '?' => tokens.push(Token::Any),
                '[' => match parse_set(&chars, i) {
                    Some((token, next)) => {
                        tokens.push(token);
                        i = next;
                    }
                    None => tokens.push(Token::Char('[')),
                },
                c => tokens.push(Token::Char(c)),
            }
        }
        Glob { tokens }
    }

    pub fn matches(&self, name: &str) -> bool {
        let name: Vec<char> = name.chars().collect();
        let tokens = &self.tokens;
        // Greedy match with backtracking to the last star: linear in
        // practice, O(len(name) * len(pattern)) at worst.
        let (mut t, mut n) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while n < name.len() {
            match tokens.get(t) {
                Some(Token::Star) => {
                    star = Some((t, n));
                    t += 1;
                    continue;
                }
                Some(token) if token_matches(token, name[n]) => {
                    t += 1;
                    n += 1;
                    continue;
                }
                _ => {}
            }
            match star {
                Some((st, sn)) => {
                    t = st + 1;
                    n = sn + 1;
                    star = Some((st, sn + 1));
                }
                None => return false,
            }
        }
        tokens[t..].iter().all(|token| *token == Token::Star)
    }
}

fn token_matches(token: &Token, c: char) -> bool {
    match token {
        Token::Star => true,
        Token::Any => true,
        Token::Char(x) => *x == c,
        Token::Set { negated, ranges } => {
            ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c)) != *negated
        }
    }
}

/// Parses a set whose `[` is just before `start`; `None` if it has no
/// closing `]` (the `[` is then literal). Returns the token and the index
/// after the `]`.
fn parse_set(chars: &[char], start: usize) -> Option<(Token, usize)> {
    let mut j = start;
    if chars.get(j) == Some(&'!') {
        j += 1;
    }
    if chars.get(j) == Some(&']') {
        j += 1;
    }
    while j < chars.len() && chars[j] != ']' {
        j += 1;
    }
    if j >= chars.len() {
        return None;
    }
    let mut body = &chars[start..j];
    let negated = body.first() == Some(&'!');
    if negated {
        body = &body[1..];
    }
    // Like fnmatch: `a-z` is a range, a `-` at either end is literal, and a
    // reversed range such as `z-a` matches nothing, its two ends included.
    let mut ranges = Vec::new();
    let mut k = 0;
    while k < body.len() {
        let lo = body[k];
        if k + 2 < body.len() && body[k + 1] == '-' {
            let hi = body[k + 2];
            if lo <= hi {
                ranges.push((lo, hi));
            }
            k += 3;
        } else {
            ranges.push((lo, lo));
            k += 1;
        }
    }
    Some((Token::Set { negated, ranges }, j + 1))
}

/// Globs of which any may match.
#[derive(Clone, Debug, Default, PartialEq)]
struct Globs {
    patterns: Vec<String>,
    globs: Vec<Glob>,
}

impl Globs {
    fn new(patterns: Vec<String>) -> Globs {
        let globs = patterns.iter().map(|p| Glob::new(p)).collect();
        Globs { patterns, globs }
    }

    fn any(&self, name: &str) -> bool {
        self.globs.iter().any(|g| g.matches(name))
    }

    fn is_empty(&self) -> bool {
        self.globs.is_empty()
    }
}

/// A sampling rule: `rate` for events matching any of its patterns.
#[derive(Clone, Debug, PartialEq)]
struct Rule {
    rate: f64,
    globs: Globs,
}

/// The control state a worker should be in, as Elixir's
/// `Snakepit.Telemetry.Control` keeps it (see there for how rules combine).
#[derive(Clone, Debug, PartialEq)]
pub struct ControlState {
    enabled: bool,
    default_rate: f64,
    /// Oldest first.
    rules: Vec<Rule>,
    allow: Globs,
    deny: Globs,
}

impl Default for ControlState {
    fn default() -> Self {
        ControlState {
            enabled: true,
            default_rate: 1.0,
            rules: Vec::new(),
            allow: Globs::default(),
            deny: Globs::default(),
        }
    }
}

/// Clamps into 0..=1; NaN means no usable rate, so 1.0 (as in Python).
fn clamp_rate(rate: f64) -> f64 {
    if rate.is_nan() {
        1.0
    } else {
        rate.clamp(0.0, 1.0)
    }
}

impl ControlState {
    /// The state after `enabled`, the default rate, the rules (oldest
    /// first, as `{rate, patterns}`) and the filter lists were applied to
    /// the default state, in the order Elixir sends them on open.
    pub fn new(
        enabled: bool,
        default_rate: f64,
        rules: Vec<(f64, Vec<String>)>,
        allow: Vec<String>,
        deny: Vec<String>,
    ) -> ControlState {
        let mut state = ControlState {
            enabled,
            default_rate: clamp_rate(default_rate),
            ..ControlState::default()
        };
        for (rate, patterns) in rules {
            state.put_sampling(rate, patterns);
        }
        state.allow = Globs::new(allow);
        state.deny = Globs::new(deny);
        state
    }

    /// Applies one control message, as a worker of this project does.
    pub fn apply(&mut self, control: &TelemetryControl) {
        match &control.control {
            Some(telemetry_control::Control::Toggle(t)) => self.enabled = t.enabled,
            Some(telemetry_control::Control::Sampling(s)) => {
                self.put_sampling(s.sampling_rate, s.event_patterns.clone());
            }
            Some(telemetry_control::Control::Filter(f)) => {
                self.allow = Globs::new(f.allow.clone());
                self.deny = Globs::new(f.deny.clone());
            }
            None => {}
        }
    }

    /// Applies one control message like [`ControlState::apply`] and returns
    /// how many sampling rules it pushed out (over [`MAX_RULES`]); `None`
    /// when the message carries no control.
    pub fn apply_counting(&mut self, control: &TelemetryControl) -> Option<usize> {
        match &control.control {
            Some(telemetry_control::Control::Sampling(s)) => {
                Some(self.put_sampling(s.sampling_rate, s.event_patterns.clone()))
            }
            Some(_) => {
                self.apply(control);
                Some(0)
            }
            None => None,
        }
    }

    /// Returns the number of rules dropped to stay within [`MAX_RULES`].
    fn put_sampling(&mut self, rate: f64, patterns: Vec<String>) -> usize {
        let rate = clamp_rate(rate);
        if patterns.is_empty() {
            self.default_rate = rate;
            return 0;
        }
        self.rules.retain(|r| r.globs.patterns != patterns);
        self.rules.push(Rule {
            rate,
            globs: Globs::new(patterns),
        });
        let excess = self.rules.len().saturating_sub(MAX_RULES);
        self.rules.drain(..excess);
        excess
    }

    /// The rate of events that no rule matches.
    pub fn default_rate(&self) -> f64 {
        self.default_rate
    }

    /// The sampling rules as `(rate, patterns)`, oldest first.
    pub fn rules(&self) -> impl Iterator<Item = (f64, &[String])> {
        self.rules
            .iter()
            .map(|r| (r.rate, r.globs.patterns.as_slice()))
    }

    /// The allow list's patterns.
    pub fn allow_patterns(&self) -> &[String] {
        &self.allow.patterns
    }

    /// The deny list's patterns.
    pub fn deny_patterns(&self) -> &[String] {
        &self.deny.patterns
    }

    /// Whether an allow or deny list is set.
    pub fn filtering(&self) -> bool {
        !self.allow.is_empty() || !self.deny.is_empty()
    }

    /// Whether any event may be sampled out.
    pub fn sampling(&self) -> bool {
        self.default_rate < 1.0 || self.rules.iter().any(|r| r.rate < 1.0)
    }

    /// Deny wins; an empty allow list allows everything.
    pub fn allowed(&self, name: &str) -> bool {
        !self.deny.any(name) && (self.allow.is_empty() || self.allow.any(name))
    }

    /// The rate of the newest rule matching `name`, else the default rate.
    pub fn rate_for(&self, name: &str) -> f64 {
        self.rules
            .iter()
            .rev()
            .find(|r| r.globs.any(name))
            .map_or(self.default_rate, |r| r.rate)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }
}

/// What a `StreamTelemetry` worker is sent in place of `control`: toggle
/// and filter as they are (the worker applies them correctly, only late),
/// and for a sampling update a neutral one (rate 1.0, no patterns), so the
/// worker never takes a pattern rule's rate, nor the default rate, as the
/// rate of every event; the stream samples instead. `None`: send nothing.
pub fn for_event_worker(control: TelemetryControl) -> Option<TelemetryControl> {
    match control.control {
        Some(telemetry_control::Control::Sampling(ref s)) if !s.event_patterns.is_empty() => None,
        Some(telemetry_control::Control::Sampling(_)) => Some(TelemetryControl {
            control: Some(telemetry_control::Control::Sampling(
                TelemetrySamplingUpdate {
                    sampling_rate: 1.0,
                    event_patterns: Vec::new(),
                },
            )),
        }),
        _ => Some(control),
    }
}

/// Why the stream dropped an event it enforces control on.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Dropped {
    Disabled,
    Filtered,
    Sampled,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum SpanEdge {
    Start,
    End,
}

/// The span an event belongs to: its name without the last part, for
/// `.start`, `.stop` and `.exception` events.
fn span_edge(name: &str) -> Option<(&str, SpanEdge)> {
    let (base, last) = name.rsplit_once('.')?;
    match last {
        "start" => Some((base, SpanEdge::Start)),
        "stop" | "exception" => Some((base, SpanEdge::End)),
        _ => None,
    }
}

/// Applies a [`ControlState`] to decoded events (see the module docs).
#[derive(Debug)]
pub struct Enforcer {
    state: ControlState,
    /// Filter verdict and rate per dotted name, for the current state.
    verdicts: HashMap<String, (bool, f64)>,
    /// Decisions of open spans by (correlation id, span name), innermost
    /// last.
    spans: HashMap<(String, String), Vec<bool>>,
    open_spans: usize,
    rng: u64,
}

impl Enforcer {
    pub fn new(state: ControlState) -> Enforcer {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Enforcer::with_seed(state, seed ^ (&seed as *const u64 as u64))
    }

    /// With a fixed random seed, for tests.
    pub fn with_seed(state: ControlState, seed: u64) -> Enforcer {
        Enforcer {
            state,
            verdicts: HashMap::new(),
            spans: HashMap::new(),
            open_spans: 0,
            rng: seed | 1,
        }
    }

    pub fn state(&self) -> &ControlState {
        &self.state
    }

    /// Applies a control message to the state.
    pub fn apply(&mut self, control: &TelemetryControl) {
        self.state.apply(control);
        self.verdicts.clear();
    }

    /// A uniform number in [0, 1) (xorshift64*).
    fn random(&mut self) -> f64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn keep(&mut self, rate: f64) -> bool {
        rate >= 1.0 || (rate > 0.0 && self.random() < rate)
    }

    fn verdict(&mut self, name: &str) -> (bool, f64) {
        if let Some(v) = self.verdicts.get(name) {
            return *v;
        }
        let v = (self.state.allowed(name), self.state.rate_for(name));
        if self.verdicts.len() >= MAX_CACHED_NAMES {
            self.verdicts.clear();
        }
        self.verdicts.insert(name.to_string(), v);
        v
    }

    /// `None` to deliver the event named `name` (dotted Python name), or why
    /// it is dropped.
    pub fn admit(&mut self, name: &str, correlation_id: Option<&str>) -> Option<Dropped> {
        if name == STATS_EVENT {
            return None;
        }
        if !self.state.enabled {
            return Some(Dropped::Disabled);
        }
        let (allowed, rate) = self.verdict(name);
        let sampled = match span_edge(name) {
            Some((base, SpanEdge::Start)) => {
                let keep = self.keep(rate);
                if self.state.sampling() {
                    self.remember(correlation_id.unwrap_or(""), base, keep);
                }
                keep
            }
            Some((base, SpanEdge::End)) => match self.recall(correlation_id.unwrap_or(""), base) {
                Some(keep) => keep,
                None => self.keep(rate),
            },
            None => self.keep(rate),
        };
        if !allowed {
            Some(Dropped::Filtered)
        } else if !sampled {
            Some(Dropped::Sampled)
        } else {
            None
        }
    }

    fn remember(&mut self, correlation_id: &str, span: &str, keep: bool) {
        if self.open_spans >= MAX_OPEN_SPANS {
            self.spans.clear();
            self.open_spans = 0;
        }
        self.spans
            .entry((correlation_id.to_string(), span.to_string()))
            .or_default()
            .push(keep);
        self.open_spans += 1;
    }

    fn recall(&mut self, correlation_id: &str, span: &str) -> Option<bool> {
        if self.spans.is_empty() {
            return None;
        }
        let key = (correlation_id.to_string(), span.to_string());
        let stack = self.spans.get_mut(&key)?;
        let keep = stack.pop();
        if stack.is_empty() {
            self.spans.remove(&key);
        }
        if keep.is_some() {
            self.open_spans -= 1;
        }
        keep
    }

    /// Drops from `events[from..]` what the state does not let through,
    /// counting each drop in `stats`; returns how many are left there.
    pub fn retain(&mut self, events: &mut Vec<Decoded>, from: usize, stats: &StreamStats) -> usize {
        let mut kept = from;
        for i in from..events.len() {
            let verdict = match python_name(&events[i]) {
                Some(name) => {
                    let key = span_key(&events[i]);
                    self.admit(&name, key.as_deref())
                }
                None => None,
            };
            match verdict {
                None => {
                    events.swap(kept, i);
                    kept += 1;
                }
                Some(Dropped::Disabled) => StreamStats::add(&stats.enforced_disabled, 1),
                Some(Dropped::Filtered) => StreamStats::add(&stats.enforced_filtered, 1),
                Some(Dropped::Sampled) => StreamStats::add(&stats.enforced_sampled, 1),
            }
        }
        events.truncate(kept);
        kept - from
    }
}

/// The dotted Python name of a decoded event.
fn python_name(event: &Decoded) -> Option<std::borrow::Cow<'static, str>> {
    match event.event {
        Event::Catalog(id) => id.spec().python.map(std::borrow::Cow::Borrowed),
        Event::Custom(id) => custom::event_name(id).map(std::borrow::Cow::Owned),
    }
}

/// What identifies an event's span for whole-span sampling: its span id when
/// the worker sends one (a NUL first, so it never equals a correlation id a
/// worker could send), else its correlation id (Snakepit v0.13 sends no span
/// ids: spans are told apart by correlation id and name).
fn span_key(event: &Decoded) -> Option<String> {
    match event.span_id {
        Some(id) => Some(format!("\u{0}{id}")),
        None => event.correlation_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{DecodeConfig, Decoder};
    use crate::proto::{TelemetryEvent, TelemetryEventFilter, TelemetryToggle};

    const NAMES: &[&str] = &[
        "python.call.stop",
        "python.call.start",
        "tool.execution.start",
        "tool.result_size",
        "]x",
        "ax",
        "[x",
        "x[",
        "-",
        "a",
        "b",
        "zx",
        "x",
        "p",
        "python.callx",
        "python.call",
        "snakepit.serialization.unserializable_marker",
        "qython.gc.stop",
    ];

    /// Pattern, and the names of `NAMES` that Python's
    /// `fnmatch.fnmatchcase` matches (computed with CPython 3.12).
    const FNMATCH: &[(&str, &[&str])] = &[
        ("python.call.*", &["python.call.stop", "python.call.start"]),
        (
            "python.*",
            &[
                "python.call.stop",
                "python.call.start",
                "python.callx",
                "python.call",
            ],
        ),
        ("*", NAMES),
        ("*.stop", &["python.call.stop", "qython.gc.stop"]),
        ("tool.?xecution.start", &["tool.execution.start"]),
        (
            "[pt]*",
            &[
                "python.call.stop",
                "python.call.start",
                "tool.execution.start",
                "tool.result_size",
                "p",
                "python.callx",
                "python.call",
            ],
        ),
        (
            "[!p]*",
            &[
                "tool.execution.start",
                "tool.result_size",
                "]x",
                "ax",
                "[x",
                "x[",
                "-",
                "a",
                "b",
                "zx",
                "x",
                "snakepit.serialization.unserializable_marker",
                "qython.gc.stop",
            ],
        ),
        ("[a-c]*", &["ax", "a", "b"]),
        ("[z-a]x", &[]),
        ("[]]x", &["]x"]),
        ("[!]]x", &["ax", "[x", "zx"]),
        ("[x", &["[x"]),
        ("x[", &["x["]),
        ("[-a]", &["-", "a"]),
        ("[a-]", &["-", "a"]),
        ("python.call.st[oa]p", &["python.call.stop"]),
        (
            "*call*",
            &[
                "python.call.stop",
                "python.call.start",
                "python.callx",
                "python.call",
            ],
        ),
        ("**.stop", &["python.call.stop", "qython.gc.stop"]),
        ("python.call", &["python.call"]),
        ("?", &["-", "a", "b", "x", "p"]),
        ("[p-q]ython.*.stop", &["python.call.stop", "qython.gc.stop"]),
        ("tool.*.*", &["tool.execution.start"]),
    ];

    #[test]
    fn globs_match_like_python_fnmatch() {
        for (pattern, expected) in FNMATCH {
            let glob = Glob::new(pattern);
            let got: Vec<&str> = NAMES.iter().copied().filter(|n| glob.matches(n)).collect();
            assert_eq!(&got, expected, "pattern {pattern:?}");
        }
    }

    #[test]
    fn apply_counting_reports_rules_pushed_out_and_the_state_reads_back() {
        let mut state = ControlState::default();
        assert!(!state.filtering());
        for i in 0..MAX_RULES + 3 {
            let p = format!("r{i}.*");
            assert_eq!(
                state.apply_counting(&sampling(0.5, &[p.as_str()])),
                Some(usize::from(i >= MAX_RULES))
            );
        }
        // Replacing a rule (same patterns) pushes nothing out.
        assert_eq!(state.apply_counting(&sampling(0.25, &["r5.*"])), Some(0));
        let rules: Vec<(f64, Vec<String>)> =
            state.rules().map(|(rate, p)| (rate, p.to_vec())).collect();
        assert_eq!(rules.len(), MAX_RULES);
        assert_eq!(rules[0], (0.5, vec!["r3.*".to_string()]));
        assert_eq!(rules[MAX_RULES - 1], (0.25, vec!["r5.*".to_string()]));
        assert_eq!(state.apply_counting(&sampling(f64::NAN, &[])), Some(0));
        assert_eq!(state.default_rate(), 1.0);
        assert_eq!(state.apply_counting(&filter(&["a.*"], &["a.b"])), Some(0));
        assert!(state.filtering());
        assert_eq!(state.allow_patterns(), ["a.*"]);
        assert_eq!(state.deny_patterns(), ["a.b"]);
        assert_eq!(state.apply_counting(&toggle(false)), Some(0));
        assert!(!state.enabled());
        assert_eq!(
            state.apply_counting(&TelemetryControl { control: None }),
            None
        );
    }

    fn sampling(rate: f64, patterns: &[&str]) -> TelemetryControl {
        TelemetryControl {
            control: Some(telemetry_control::Control::Sampling(
                TelemetrySamplingUpdate {
                    sampling_rate: rate,
                    event_patterns: patterns.iter().map(|p| p.to_string()).collect(),
                },
            )),
        }
    }

    fn toggle(enabled: bool) -> TelemetryControl {
        TelemetryControl {
            control: Some(telemetry_control::Control::Toggle(TelemetryToggle {
                enabled,
            })),
        }
    }

    fn filter(allow: &[&str], deny: &[&str]) -> TelemetryControl {
        TelemetryControl {
            control: Some(telemetry_control::Control::Filter(TelemetryEventFilter {
                allow: allow.iter().map(|p| p.to_string()).collect(),
                deny: deny.iter().map(|p| p.to_string()).collect(),
            })),
        }
    }

    #[test]
    fn rules_combine_like_elixir_control() {
        let mut s = ControlState::default();
        assert!(!s.sampling());
        s.apply(&sampling(0.5, &[]));
        s.apply(&sampling(0.0, &["python.call.*"]));
        s.apply(&sampling(0.2, &["python.*"]));
        assert_eq!(s.rate_for("tool.result_size"), 0.5);
        // The newest matching rule wins.
        assert_eq!(s.rate_for("python.call.stop"), 0.2);
        // The same pattern list replaces its rule and becomes the newest.
        s.apply(&sampling(0.0, &["python.call.*"]));
        assert_eq!(s.rate_for("python.call.stop"), 0.0);
        assert_eq!(s.rate_for("python.gc.completed"), 0.2);
        // Clamped; NaN means 1.0.
        s.apply(&sampling(7.0, &[]));
        assert_eq!(s.default_rate, 1.0);
        s.apply(&sampling(f64::NAN, &["python.*"]));
        assert_eq!(s.rate_for("python.gc.completed"), 1.0);
        // At most MAX_RULES; the oldest go first.
        for i in 0..40 {
            s.apply(&sampling(0.0, &[&format!("r{i}.*")]));
        }
        assert_eq!(s.rules.len(), MAX_RULES);
        assert_eq!(s.rate_for("python.call.stop"), 1.0);
        assert_eq!(s.rate_for("r39.x"), 0.0);
        assert_eq!(s.rate_for("r7.x"), 1.0);

        // Deny wins; an empty allow list allows everything.
        s.apply(&filter(&[], &["tool.*"]));
        assert!(s.allowed("python.call.stop") && !s.allowed("tool.result_size"));
        s.apply(&filter(&["python.*", "tool.*"], &["tool.result_size"]));
        assert!(s.allowed("tool.execution.start") && !s.allowed("tool.result_size"));
        assert!(!s.allowed("snakepit.serialization.unserializable_marker"));

        let seeded = ControlState::new(
            false,
            0.25,
            vec![(0.0, vec!["python.call.*".into()])],
            vec![],
            vec!["tool.*".into()],
        );
        assert!(!seeded.enabled());
        assert_eq!(seeded.rate_for("python.call.start"), 0.0);
        assert_eq!(seeded.rate_for("python.gc.completed"), 0.25);
        assert!(!seeded.allowed("tool.result_size"));
    }

    #[test]
    fn an_event_worker_is_never_sent_a_sampling_rate_or_a_pattern_rule() {
        assert_eq!(for_event_worker(sampling(0.0, &["python.call.*"])), None);
        assert_eq!(
            for_event_worker(sampling(0.3, &[])),
            Some(sampling(1.0, &[]))
        );
        assert_eq!(for_event_worker(toggle(false)), Some(toggle(false)));
        let f = filter(&["python.*"], &["tool.*"]);
        assert_eq!(for_event_worker(f.clone()), Some(f));
    }

    #[test]
    fn toggle_filter_and_sampling_drop_with_their_reasons() {
        let mut e = Enforcer::with_seed(ControlState::default(), 7);
        assert_eq!(e.admit("tool.result_size", None), None);
        e.apply(&filter(&[], &["tool.*"]));
        assert_eq!(e.admit("tool.result_size", None), Some(Dropped::Filtered));
        e.apply(&sampling(0.0, &["python.call.*"]));
        assert_eq!(
            e.admit("python.call.stop", Some("c")),
            Some(Dropped::Sampled)
        );
        assert_eq!(e.admit("python.gc.completed", None), None);
        e.apply(&toggle(false));
        assert_eq!(
            e.admit("python.gc.completed", None),
            Some(Dropped::Disabled)
        );
        // The worker's own stats are never dropped.
        assert_eq!(e.admit(STATS_EVENT, None), None);
        e.apply(&toggle(true));
        assert_eq!(e.admit("python.gc.completed", None), None);
    }

    #[test]
    fn spans_are_sampled_whole() {
        let mut e = Enforcer::with_seed(ControlState::default(), 42);
        e.apply(&sampling(0.5, &["tool.execution.*"]));
        let mut kept = 0;
        for i in 0..2_000 {
            let cid = format!("c{i}");
            let start = e.admit("tool.execution.start", Some(&cid)).is_none();
            // An event between start and stop is sampled on its own.
            e.admit("tool.result_size", Some(&cid));
            let end = if i % 3 == 0 {
                "tool.execution.exception"
            } else {
                "tool.execution.stop"
            };
            let stop = e.admit(end, Some(&cid)).is_none();
            assert_eq!(start, stop, "span {i}");
            kept += usize::from(start);
        }
        // Binomial(2000, 0.5): mean 1000, sd 22; 8 sd either side.
        assert!((820..=1180).contains(&kept), "{kept} spans kept");
        assert!(e.spans.is_empty() && e.open_spans == 0);
    }

    #[test]
    fn span_ids_keep_overlapping_spans_of_one_correlation_apart() {
        let mut e = Enforcer::with_seed(ControlState::default(), 11);
        e.apply(&sampling(0.5, &["tool.execution.*"]));
        let event = |name: &str, span: u64| Decoded {
            event: Event::Catalog(crate::catalog::event(name).expect("a catalog event")),
            measurements: Vec::new(),
            metadata: Vec::new(),
            correlation_id: Some("same".into()),
            timestamp_ns: 0,
            emit_time: None,
            span_id: Some(span),
            stacktrace: Vec::new(),
        };
        let stats = StreamStats::default();
        // Many pairs of spans that overlap without nesting (a starts, b
        // starts, a stops, b stops), all with one correlation id: each stop
        // follows its own start, which a correlation id alone cannot tell.
        let mut kept = 0;
        for i in 0..500u64 {
            let (a, b) = (2 * i + 1, 2 * i + 2);
            let mut events = vec![
                event("tool.execution.start", a),
                event("tool.execution.start", b),
                event("tool.execution.stop", a),
                event("tool.execution.exception", b),
            ];
            e.retain(&mut events, 0, &stats);
            let spans: Vec<u64> = events.iter().map(|d| d.span_id.unwrap()).collect();
            for id in [a, b] {
                let n = spans.iter().filter(|s| **s == id).count();
                assert!(n == 0 || n == 2, "span {id} kept half: {spans:?}");
                kept += usize::from(n == 2);
            }
        }
        assert!((400..=600).contains(&kept), "{kept} of 1000 spans kept");
        assert!(e.spans.is_empty() && e.open_spans == 0);
    }

    #[test]
    fn nested_spans_with_one_identity_pair_up_innermost_first() {
        let mut e = Enforcer::with_seed(ControlState::default(), 3);
        e.apply(&sampling(0.5, &[]));
        for _ in 0..500 {
            // The empty correlation id, as v0.13 sends without one.
            let outer = e.admit("python.call.start", None).is_none();
            let inner = e.admit("python.call.start", None).is_none();
            assert_eq!(e.admit("python.call.stop", None).is_none(), inner);
            assert_eq!(e.admit("python.call.exception", None).is_none(), outer);
        }
        assert!(e.spans.is_empty());
    }

    #[test]
    fn a_decision_outlives_a_rate_change_and_unknown_ends_are_sampled_alone() {
        let mut e = Enforcer::with_seed(ControlState::default(), 1);
        e.apply(&sampling(0.0, &["python.call.*"]));
        assert_eq!(
            e.admit("python.call.start", Some("a")),
            Some(Dropped::Sampled)
        );
        e.apply(&sampling(1.0, &["python.call.*"]));
        // Decided at the start: dropped too, though the rate is now 1.0.
        assert_eq!(
            e.admit("python.call.stop", Some("a")),
            Some(Dropped::Sampled)
        );
        // A stop whose start was never seen takes its own rate.
        assert_eq!(e.admit("python.call.stop", Some("b")), None);
        // Open spans are bounded.
        e.apply(&sampling(0.5, &[]));
        for i in 0..(MAX_OPEN_SPANS + 10) {
            e.admit("python.call.start", Some(&i.to_string()));
        }
        assert!(e.open_spans <= MAX_OPEN_SPANS);
    }

    #[test]
    fn retain_keeps_order_and_counts_each_reason() {
        let stats = StreamStats::default();
        let mut decoder = Decoder::new(DecodeConfig::default());
        let names = [
            "python.call.start",
            "tool.result_size",
            "python.gc.completed",
            "python.call.stop",
            "telemetry.python.stats",
        ];
        let mut events: Vec<Decoded> = names
            .iter()
            .map(|n| {
                let ev = TelemetryEvent {
                    event_parts: n.split('.').map(String::from).collect(),
                    ..Default::default()
                };
                decoder.decode(ev, &stats).unwrap()
            })
            .collect();
        let mut e = Enforcer::with_seed(ControlState::default(), 9);
        e.apply(&sampling(0.0, &["python.call.*"]));
        e.apply(&filter(&[], &["tool.*"]));
        let kept = e.retain(&mut events, 1, &stats);
        assert_eq!(kept, 2);
        let left: Vec<_> = events
            .iter()
            .map(|d| d.event.spec().unwrap().python.unwrap())
            .collect();
        // The first event was before `from`: not looked at.
        assert_eq!(
            left,
            [
                "python.call.start",
                "python.gc.completed",
                "telemetry.python.stats"
            ]
        );
        assert_eq!(StreamStats::get(&stats.enforced_filtered), 1);
        assert_eq!(StreamStats::get(&stats.enforced_sampled), 1);

        e.apply(&toggle(false));
        assert_eq!(e.retain(&mut events, 0, &stats), 1);
        assert_eq!(StreamStats::get(&stats.enforced_disabled), 2);
    }

    #[test]
    fn registered_custom_events_are_enforced_by_name() {
        custom::register_event("enforce_test.inference.start").unwrap();
        custom::register_event("enforce_test.inference.stop").unwrap();
        let stats = StreamStats::default();
        let mut decoder = Decoder::new(DecodeConfig::default());
        let mut events: Vec<Decoded> = [
            "enforce_test.inference.start",
            "enforce_test.inference.stop",
        ]
        .iter()
        .map(|n| {
            let ev = TelemetryEvent {
                event_parts: n.split('.').map(String::from).collect(),
                ..Default::default()
            };
            decoder.decode(ev, &stats).unwrap()
        })
        .collect();
        let mut e = Enforcer::with_seed(ControlState::default(), 5);
        e.apply(&sampling(0.0, &["enforce_test.*"]));
        assert_eq!(e.retain(&mut events, 0, &stats), 0);
        assert_eq!(StreamStats::get(&stats.enforced_sampled), 2);
    }
}
