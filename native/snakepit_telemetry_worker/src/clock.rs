//! Wall-clock nanoseconds for event timestamps, cheaply.
//!
//! `clock_gettime(CLOCK_REALTIME)` costs ~35 ns on a VM, a large share of an
//! emit. Where the kernel itself keeps time with the TSC (x86_64, clocksource
//! `tsc`: invariant and trusted), a timestamp is interpolated from the TSC
//! instead: `anchor_ns + (tsc - anchor_tsc) * rate`, with the anchor taken
//! from `clock_gettime` again about every second (and the rate measured
//! between two anchors), so the result tracks the wall clock (NTP slews,
//! steps) within a second and stays within about a microsecond of it (either
//! side) in between. Until a rate is known (the first 50 ms), and everywhere else
//! (or with `SNAKEPIT_TELEMETRY_NO_TSC` set), every timestamp comes from
//! `clock_gettime`.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock nanoseconds since the epoch, from the system clock.
#[inline]
pub fn system_ns() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

#[cfg(target_arch = "x86_64")]
mod tsc {
    use std::sync::atomic::{fence, AtomicBool, AtomicI64, AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::Duration;

    use super::system_ns;

    /// How often the anchor is taken again from the system clock.
    pub const REANCHOR: Duration = Duration::from_secs(1);
    /// The least span over which a rate is measured.
    pub const MIN_SPAN: Duration = Duration::from_millis(50);
    /// At a re-anchoring, interpolated time ahead of the system clock by at
    /// most this much (the interpolation's own error) is not stepped back but
    /// slewed away over the next period, so that timestamps never go
    /// backwards; a larger gap is the system clock itself stepping back, and
    /// is followed.
    pub const MAX_SLEW: Duration = Duration::from_millis(1);

    /// A seqlock over (anchor tsc, anchor ns, rate as ns per tick << 32).
    struct Calibration {
        seq: AtomicU64,
        tsc: AtomicU64,
        ns: AtomicI64,
        /// The system clock's reading at the anchor (`ns` may be ahead of it
        /// by a slewed step), from which the next rate is measured; written
        /// by the re-anchoring thread only.
        sys: AtomicI64,
        /// 0 until a rate was measured.
        rate: AtomicU64,
        /// Ticks after which to re-anchor (REANCHOR at the measured rate).
        reanchor_ticks: AtomicU64,
        writing: AtomicBool,
    }

    static CALIBRATION: Calibration = Calibration {
        seq: AtomicU64::new(0),
        tsc: AtomicU64::new(0),
        ns: AtomicI64::new(0),
        sys: AtomicI64::new(0),
        rate: AtomicU64::new(0),
        reanchor_ticks: AtomicU64::new(0),
        writing: AtomicBool::new(false),
    };

    /// Whether the kernel keeps its own time with the TSC.
    fn usable() -> bool {
        static USABLE: OnceLock<bool> = OnceLock::new();
        *USABLE.get_or_init(|| {
            std::env::var_os("SNAKEPIT_TELEMETRY_NO_TSC").is_none()
                && std::fs::read_to_string(
                    "/sys/devices/system/clocksource/clocksource0/current_clocksource",
                )
                .is_ok_and(|s| s.trim() == "tsc")
        })
    }

    #[inline]
    fn rdtsc() -> u64 {
        // SAFETY: rdtsc is available on every x86_64 CPU.
        unsafe { core::arch::x86_64::_rdtsc() }
    }

    /// A consistent snapshot: (tsc, ns, rate, reanchor_ticks).
    #[inline]
    fn read() -> Option<(u64, i64, u64, u64)> {
        let c = &CALIBRATION;
        for _ in 0..4 {
            let s1 = c.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                continue;
            }
            let snapshot = (
                c.tsc.load(Ordering::Relaxed),
                c.ns.load(Ordering::Relaxed),
                c.rate.load(Ordering::Relaxed),
                c.reanchor_ticks.load(Ordering::Relaxed),
            );
            fence(Ordering::Acquire);
            if c.seq.load(Ordering::Relaxed) == s1 {
                return Some(snapshot);
            }
        }
        None
    }

    /// A TSC reading and a system-clock reading taken together: the pair
    /// read most closely of a few tries, the TSC at the midpoint (a thread
    /// preempted between the two would anchor the clock off by as long).
    fn paired() -> (u64, i64) {
        /// A close pair (a clock read takes well under 1 000 ticks).
        const CLOSE: u64 = 20_000;
        let mut best: Option<(u64, u64, i64)> = None;
        for _ in 0..4 {
            let t1 = rdtsc();
            let ns = system_ns();
            let width = rdtsc().wrapping_sub(t1);
            if best.map_or(true, |(w, _, _)| width < w) {
                best = Some((width, t1.wrapping_add(width / 2), ns));
            }
            if width < CLOSE {
                break;
            }
        }
        let (_, tsc, ns) = best.expect("at least one try");
        (tsc, ns)
    }

    /// Takes a new anchor (one writer at a time; others keep the old one).
    #[cold]
    fn reanchor(previous: Option<(u64, i64)>) {
        let c = &CALIBRATION;
        if c.writing.swap(true, Ordering::Acquire) {
            return;
        }
        let (tsc, sys) = paired();
        let mut ns = sys;
        let (rate, ticks) = match previous {
            Some((t0, n0))
                if tsc > t0
                    && sys - c.sys.load(Ordering::Relaxed) >= MIN_SPAN.as_nanos() as i64 =>
            {
                let measured =
                    (((sys - c.sys.load(Ordering::Relaxed)) as u128) << 32) / u128::from(tsc - t0);
                let period = REANCHOR.as_nanos();
                let ticks = (period << 32) / measured.max(1);
                let mut rate = measured;
                let old_rate = u128::from(c.rate.load(Ordering::Relaxed));
                if old_rate != 0 {
                    // Where the old calibration has got to: never go back
                    // from there by a mere interpolation error; slew it away.
                    let reached = n0 + ((u128::from(tsc - t0) * old_rate) >> 32) as i64;
                    let ahead = reached - sys;
                    if ahead > 0 && (ahead as u128) < MAX_SLEW.as_nanos() {
                        ns = reached;
                        rate = rate * (period - ahead as u128) / period;
                    }
                }
                (rate as u64, ticks as u64)
            }
            // No span to measure over yet: keep the old anchor until there is.
            Some(_)
                if c.rate.load(Ordering::Relaxed) == 0 && tsc > c.tsc.load(Ordering::Relaxed) =>
            {
                c.writing.store(false, Ordering::Release);
                return;
            }
            _ => (0, 0),
        };
        let s = c.seq.load(Ordering::Relaxed);
        c.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        c.tsc.store(tsc, Ordering::Relaxed);
        c.ns.store(ns, Ordering::Relaxed);
        c.sys.store(sys, Ordering::Relaxed);
        c.rate.store(rate, Ordering::Relaxed);
        c.reanchor_ticks.store(ticks, Ordering::Relaxed);
        c.seq.store(s.wrapping_add(2), Ordering::Release);
        c.writing.store(false, Ordering::Release);
    }

    /// In a forked child: a re-anchoring thread of the parent that does not
    /// exist here must not keep the clock from ever re-anchoring.
    pub fn after_fork() {
        CALIBRATION.writing.store(false, Ordering::SeqCst);
    }

    #[inline]
    pub fn now_ns() -> i64 {
        if !usable() {
            return system_ns();
        }
        let Some((t0, n0, rate, ticks)) = read() else {
            return system_ns();
        };
        let tsc = rdtsc();
        if rate == 0 {
            // Not calibrated yet (or a first anchor is missing).
            reanchor((t0 != 0).then_some((t0, n0)));
            return system_ns();
        }
        let elapsed = tsc.wrapping_sub(t0);
        if tsc < t0 || elapsed >= ticks {
            // Due (or the TSC went back, e.g. a migrated VM): re-anchor.
            reanchor(Some((t0, n0)));
            if tsc < t0 {
                return system_ns();
            }
        }
        n0 + ((u128::from(elapsed) * u128::from(rate)) >> 32) as i64
    }
}

/// Call in a forked child (see [`crate::stream::reseed_after_fork`]).
pub fn after_fork() {
    #[cfg(target_arch = "x86_64")]
    tsc::after_fork();
}

/// Wall-clock nanoseconds since the epoch for an event (see the module docs).
#[inline]
pub fn now_ns() -> i64 {
    #[cfg(target_arch = "x86_64")]
    {
        tsc::now_ns()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        system_ns()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn interpolated_time_tracks_the_system_clock_and_never_goes_back() {
        // Long enough for a rate to be measured and the anchor renewed twice;
        // read back to back, so that a step back at a renewal would show.
        let until = Instant::now() + Duration::from_millis(2200);
        let mut worst = 0i64;
        let mut checks = 0u64;
        let mut last = i64::MIN;
        while Instant::now() < until {
            let before = system_ns();
            let ours = now_ns();
            let after = system_ns();
            assert!(ours >= last, "went back by {} ns", last - ours);
            last = ours;
            // Within the bracket, give or take a few microseconds of
            // interpolation error.
            let error = if ours < before {
                before - ours
            } else if ours > after {
                ours - after
            } else {
                0
            };
            worst = worst.max(error);
            checks += 1;
        }
        assert!(checks > 1000);
        assert!(worst < 20_000, "worst error {worst} ns");
    }
}
