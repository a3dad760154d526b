//! Credit between a stream and its owner: how many decoded events may be on
//! their way to the owner (queued for delivery, in its mailbox, or being
//! handled) before the stream stops reading from the worker.
//!
//! The stream [`take`](Credit::take)s credit for every event it hands on;
//! the owner [`release`](Credit::release)s it once it has handled them, and
//! the delivery path releases the credit of events that never reach the
//! owner. While no credit is [`available`](Credit::available), the stream
//! leaves the gRPC call unread, so HTTP/2 flow control stops the worker's
//! sender and the worker's own bounded queue sheds (and counts) the excess.
//!
//! Reading resumes once at most half of `max` is pending
//! ([`wait`](Credit::wait)), so a slow owner receives a few large messages
//! rather than many one-event ones.
//!
//! Events are counted from the moment they are decoded, so events the
//! stream holds back for the owner count as well.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Shared by a stream's task, its delivery path and the owner's handle.
#[derive(Debug)]
pub struct Credit {
    max: usize,
    resume: usize,
    pending: AtomicUsize,
    notify: Notify,
}

impl Credit {
    /// At most `max` events pending (plus one wire message, which is never
    /// split). `max` is at least 1.
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Credit {
            max,
            resume: max / 2,
            pending: AtomicUsize::new(0),
            notify: Notify::new(),
        }
    }

    /// The bound this credit was made with.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Events handed on and not yet released.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Counts `n` events as handed on.
    pub fn take(&self, n: usize) {
        self.pending.fetch_add(n, Ordering::AcqRel);
    }

    /// Counts `n` events as handled (or lost on the way), never below zero,
    /// and wakes a stream waiting for credit.
    pub fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let _ = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                Some(p.saturating_sub(n))
            });
        self.notify.notify_waiters();
    }

    /// Whether `n` more events may be handed on without reaching `max`.
    pub fn allows(&self, n: usize) -> bool {
        self.pending().saturating_add(n) < self.max
    }

    /// Whether the stream may read (fewer than `max` events pending).
    pub fn available(&self) -> bool {
        self.allows(0)
    }

    /// Where reading resumes after the stream ran out of credit: `max / 2`.
    pub fn resume_level(&self) -> usize {
        self.resume
    }

    /// Waits until reading may resume: at most `max / 2` events pending.
    /// Cancel-safe (a `select!` branch may drop it at any point).
    pub async fn wait(&self) {
        self.wait_until(self.resume).await;
    }

    /// Waits until at most `level` events are pending. Cancel-safe.
    pub async fn wait_until(&self, level: usize) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a release between the check
            // and the await still wakes us.
            notified.as_mut().enable();
            if self.pending() <= level {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn take_and_saturating_release() {
        let credit = Credit::new(4);
        assert!(credit.available());
        credit.take(3);
        assert!(credit.available());
        assert!(!credit.allows(1));
        credit.take(1);
        assert!(!credit.available());
        credit.release(10);
        assert_eq!(credit.pending(), 0);
        assert!(credit.available());
        credit.release(1);
        assert_eq!(credit.pending(), 0);
        assert_eq!(Credit::new(0).max(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn release_wakes_a_waiter() {
        let credit = Arc::new(Credit::new(10));
        credit.take(10);
        let waiter = tokio::spawn({
            let credit = credit.clone();
            async move { credit.wait().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        // Still above the resume mark (5): keeps waiting.
        credit.release(4);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        credit.release(1);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the release")
            .unwrap();
    }

    #[tokio::test]
    async fn wait_returns_at_once_when_little_is_pending() {
        let credit = Credit::new(8);
        credit.take(4);
        tokio::time::timeout(Duration::from_secs(1), credit.wait())
            .await
            .expect("no wait needed");
    }
}
