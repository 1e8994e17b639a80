//! Which QUIC connection attempts the coordinator takes on, before any certificate is seen.
//!
//! An Initial packet that starts a handshake costs the server a connection's state (about
//! 32 KB with TLS) until the handshake ends or times out, and it needs no certificate: a
//! flood of Initials that never complete (a black-box probe sent 20 000, taking an idle
//! coordinator from 57 MB to 691 MB) must not grow memory or stall honest rounds. The rule,
//! per attempt:
//! - while fewer than [`HandshakeLimits::retry_above`] handshakes are pending, accept;
//! - above that, or once half of [`HandshakeLimits::per_address`] are pending from its IP
//!   address, an attempt from an address that has not proved it receives our packets gets a
//!   stateless Retry (RFC 9000 §8.1.2): it costs us nothing, a spoofed or fire-and-forget
//!   flood ends there, and an honest client answers with the token and is then validated (so
//!   an honest client behind the same address as a flood still gets in);
//! - a validated attempt is refused once [`HandshakeLimits::max_pending`] handshakes are
//!   pending in all, or [`HandshakeLimits::per_address`] from its IP address;
//! - a handshake that has not finished after [`HandshakeLimits::timeout`] is dropped.
//!
//! [`Admission`] is the bookkeeping (no I/O); the daemon asks it for each `quinn::Incoming`
//! and holds the [`Pending`] guard it returns until the handshake ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Bounds on unfinished handshakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Pending handshakes above which unvalidated addresses get a Retry (also above half of
    /// `per_address` from one address).
    pub retry_above: usize,
    /// Pending handshakes in all, beyond which attempts are refused.
    pub max_pending: usize,
    /// Pending handshakes from one IP address, beyond which its attempts are refused.
    pub per_address: usize,
    /// Longest a handshake may take.
    pub timeout: Duration,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            retry_above: 32,
            max_pending: 256,
            per_address: 16,
            timeout: Duration::from_secs(10),
        }
    }
}

/// What to do with a connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start the handshake (hold the [`Pending`] until it ends).
    Accept,
    /// Answer with a stateless Retry.
    Retry,
    /// Refuse (CONNECTION_REFUSED).
    Refuse,
}

/// Counts of what [`Admission`] decided, and the most handshakes pending at once.
#[derive(Debug, Default)]
pub struct AdmissionStats {
    /// Attempts accepted.
    pub accepted: AtomicU64,
    /// Attempts answered with a Retry.
    pub retried: AtomicU64,
    /// Attempts refused.
    pub refused: AtomicU64,
    /// Handshakes dropped at the timeout.
    pub timed_out: AtomicU64,
    /// The largest number of handshakes pending at once.
    pub peak_pending: AtomicUsize,
}

/// A copy of [`AdmissionStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandshakeCounts {
    /// Attempts accepted.
    pub accepted: u64,
    /// Attempts answered with a Retry.
    pub retried: u64,
    /// Attempts refused.
    pub refused: u64,
    /// Handshakes dropped at the timeout.
    pub timed_out: u64,
    /// The largest number of handshakes pending at once.
    pub peak_pending: usize,
}

impl AdmissionStats {
    /// The counts now.
    pub fn snapshot(&self) -> HandshakeCounts {
        HandshakeCounts {
            accepted: self.accepted.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
            peak_pending: self.peak_pending.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// The pending handshakes, shared by the accept loop and the connection tasks.
#[derive(Debug, Clone)]
pub struct Admission {
    limits: HandshakeLimits,
    counts: Arc<Mutex<Counts>>,
    stats: Arc<AdmissionStats>,
}

/// One pending handshake; dropping it ends it.
#[derive(Debug)]
pub struct Pending {
    ip: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.by_ip.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    /// No handshake pending yet.
    pub fn new(limits: HandshakeLimits) -> Self {
        Admission {
            limits,
            counts: Arc::default(),
            stats: Arc::default(),
        }
    }

    /// The limits.
    pub fn limits(&self) -> HandshakeLimits {
        self.limits
    }

    /// What was decided so far.
    pub fn stats(&self) -> Arc<AdmissionStats> {
        self.stats.clone()
    }

    /// Handshakes pending now.
    pub fn pending(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
    }

    /// Decides on an attempt from `ip` (`validated`: its address is proved, by a Retry token;
    /// `may_retry`: a Retry is allowed for it). An accepted attempt comes with its guard.
    pub fn decide(
        &self,
        ip: IpAddr,
        validated: bool,
        may_retry: bool,
    ) -> (Decision, Option<Pending>) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let from_ip = c.by_ip.get(&ip).copied().unwrap_or(0);
        let busy = c.total >= self.limits.retry_above || from_ip >= self.limits.per_address / 2;
        let decision = if !validated && may_retry && busy {
            Decision::Retry
        } else if c.total >= self.limits.max_pending || from_ip >= self.limits.per_address {
            Decision::Refuse
        } else {
            Decision::Accept
        };
        let counter = match decision {
            Decision::Accept => &self.stats.accepted,
            Decision::Retry => &self.stats.retried,
            Decision::Refuse => &self.stats.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if decision != Decision::Accept {
            return (decision, None);
        }
        c.total += 1;
        *c.by_ip.entry(ip).or_insert(0) += 1;
        self.stats
            .peak_pending
            .fetch_max(c.total, Ordering::Relaxed);
        (
            decision,
            Some(Pending {
                ip,
                counts: self.counts.clone(),
            }),
        )
    }

    /// Records a handshake dropped at the timeout.
    pub fn timed_out(&self) {
        self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn limits() -> HandshakeLimits {
        HandshakeLimits {
            retry_above: 2,
            max_pending: 4,
            per_address: 3,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn below_the_retry_threshold_every_attempt_is_accepted() {
        let a = Admission::new(limits());
        let (d1, g1) = a.decide(ip(1), false, true);
        let (d2, g2) = a.decide(ip(2), false, true);
        assert_eq!((d1, d2), (Decision::Accept, Decision::Accept));
        assert_eq!(a.pending(), 2);
        drop((g1, g2));
        assert_eq!(a.pending(), 0);
    }

    #[test]
    fn above_it_unvalidated_attempts_get_a_retry_and_cost_nothing() {
        let a = Admission::new(limits());
        let _held: Vec<_> = (0..2).map(|k| a.decide(ip(k), false, true).1).collect();
        for _ in 0..1000 {
            let (d, g) = a.decide(ip(9), false, true);
            assert_eq!(d, Decision::Retry);
            assert!(g.is_none());
        }
        assert_eq!(a.pending(), 2);
        // The same client back with a Retry token is validated and taken on.
        assert_eq!(a.decide(ip(9), true, false).0, Decision::Accept);
        let c = a.stats().snapshot();
        assert_eq!(
            (c.accepted, c.retried, c.refused, c.peak_pending),
            (3, 1000, 0, 3)
        );
    }

    #[test]
    fn an_address_with_half_its_cap_pending_is_retried_then_let_in_when_validated() {
        let a = Admission::new(HandshakeLimits {
            retry_above: 100,
            per_address: 4,
            ..limits()
        });
        let _flood: Vec<_> = (0..2)
            .map(|_| a.decide(ip(7), false, true).1.unwrap())
            .collect();
        assert_eq!(a.decide(ip(7), false, true).0, Decision::Retry);
        assert_eq!(
            a.decide(ip(8), false, true).0,
            Decision::Accept,
            "another address"
        );
        // The honest client behind the flood's address, back with its Retry token.
        assert_eq!(a.decide(ip(7), true, false).0, Decision::Accept);
    }

    #[test]
    fn validated_attempts_are_capped_in_all_and_per_address() {
        let a = Admission::new(limits());
        let mut held = Vec::new();
        for _ in 0..3 {
            let (d, g) = a.decide(ip(1), true, false);
            assert_eq!(d, Decision::Accept);
            held.push(g);
        }
        assert_eq!(
            a.decide(ip(1), true, false).0,
            Decision::Refuse,
            "per address"
        );
        let (d, g) = a.decide(ip(2), true, false);
        assert_eq!(d, Decision::Accept);
        held.push(g);
        assert_eq!(a.decide(ip(3), true, false).0, Decision::Refuse, "in all");
        // An attempt that may not be retried (it already carries a token) is not retried.
        assert_eq!(a.decide(ip(3), false, false).0, Decision::Refuse);
        held.pop();
        assert_eq!(a.decide(ip(3), true, false).0, Decision::Accept);
        assert_eq!(
            a.stats().snapshot().peak_pending,
            4,
            "never more than max_pending at once"
        );
    }
}
