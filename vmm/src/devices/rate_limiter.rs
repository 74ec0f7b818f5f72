//! Rate limiting of a device's I/O with Firecracker's semantics: a token bucket for bytes and one for operations,
//! each `size` tokens refilled from empty to full in `refill_time_ms`, plus a one-time burst spent first. A request
//! proceeds when every configured bucket has its tokens (and takes them); otherwise the device stops taking
//! requests and arms a timer for when the tokens will be there. A request larger than a bucket waits for a full
//! bucket and leaves the rest as a debt the next request waits out, so the average rate holds whatever the
//! guest's request sizes. Budgets are kept in snapshots.
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use flint_vmm_api::config::{RateLimiterConfig, TokenBucketConfig};
use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

/// One bucket: its configuration, what it holds now, and when it was last refilled.
#[derive(Debug)]
pub struct TokenBucket {
    cfg: TokenBucketConfig,
    /// Tokens held; below zero after a request larger than the bucket (the debt is refilled before the next one).
    budget: i128,
    burst: u64,
    last: Instant,
    /// Refill remainder, in token-nanoseconds (so slow refills lose nothing to rounding).
    carry: u128,
}

impl TokenBucket {
    pub fn new(cfg: TokenBucketConfig) -> Self {
        TokenBucket { cfg, budget: i128::from(cfg.size), burst: cfg.one_time_burst, last: Instant::now(), carry: 0 }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = now;
        let per = u128::from(self.cfg.refill_time_ms) * 1_000_000;
        let total = elapsed * u128::from(self.cfg.size) + self.carry;
        let add = total / per;
        self.carry = total % per;
        self.budget = (self.budget + add as i128).min(i128::from(self.cfg.size));
        if self.budget == i128::from(self.cfg.size) {
            self.carry = 0;
        }
    }

    /// What `n` tokens need to be there: a request above the bucket's size needs a full bucket (and leaves a debt).
    fn need(&self, n: u64) -> i128 {
        i128::from(n.min(self.cfg.size.saturating_add(self.burst)))
    }

    fn has(&self, n: u64) -> bool {
        i128::from(self.burst) + self.budget >= self.need(n)
    }

    fn take(&mut self, n: u64) {
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        self.budget -= i128::from(n - from_burst);
    }

    /// How long until `n` tokens are there.
    fn wait_for(&self, n: u64) -> Duration {
        let want = (self.need(n) - i128::from(self.burst) - self.budget).max(0) as u128;
        let ns = want * u128::from(self.cfg.refill_time_ms) * 1_000_000;
        let ns = (ns.saturating_sub(self.carry)).div_ceil(u128::from(self.cfg.size).max(1));
        Duration::from_nanos(ns.min(u128::from(u64::MAX)) as u64).max(Duration::from_micros(100))
    }
}

/// The state a snapshot keeps: what each bucket holds.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct RateLimiterState {
    pub bandwidth: Option<(u64, u64)>,
    pub ops: Option<(u64, u64)>,
}

/// A device's limiter: its buckets and the timer that wakes the device when it was throttled.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
    /// Times a request had to wait.
    pub throttled: u64,
}

impl RateLimiter {
    pub fn new(cfg: &RateLimiterConfig) -> std::io::Result<Self> {
        Ok(RateLimiter {
            bandwidth: cfg.bandwidth.map(TokenBucket::new),
            ops: cfg.ops.map(TokenBucket::new),
            timer: TimerFd::new()?,
            blocked: false,
            throttled: 0,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Whether the device is waiting for its timer (it takes no requests meanwhile).
    pub fn blocked(&self) -> bool {
        self.blocked
    }

    /// Takes the tokens of a request of `bytes` if both buckets have them; otherwise arms the timer, marks the
    /// limiter blocked and returns false (the caller puts the request back).
    pub fn consume(&mut self, bytes: u64) -> bool {
        self.consume_at(bytes, Instant::now())
    }

    fn consume_at(&mut self, bytes: u64, now: Instant) -> bool {
        let mut wait = Duration::ZERO;
        for (b, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, 1)] {
            if let Some(b) = b {
                b.refill(now);
                if !b.has(n) {
                    wait = wait.max(b.wait_for(n));
                }
            }
        }
        if !wait.is_zero() {
            self.blocked = true;
            self.throttled += 1;
            let _ = self.timer.reset(wait, None);
            return false;
        }
        for (b, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, 1)] {
            if let Some(b) = b {
                b.take(n);
            }
        }
        true
    }

    /// The timer fired: the device may take requests again.
    pub fn timer_fired(&mut self) {
        let _ = self.timer.wait();
        self.blocked = false;
    }

    pub fn save(&self) -> RateLimiterState {
        RateLimiterState {
            bandwidth: self.bandwidth.as_ref().map(|b| (b.budget.max(0) as u64, b.burst)),
            ops: self.ops.as_ref().map(|b| (b.budget.max(0) as u64, b.burst)),
        }
    }

    /// Takes back saved budgets (capped by this configuration's sizes; the clock restarts now).
    pub fn restore(&mut self, s: &RateLimiterState) {
        for (b, saved) in [(&mut self.bandwidth, s.bandwidth), (&mut self.ops, s.ops)] {
            if let (Some(b), Some((budget, burst))) = (b, saved) {
                b.budget = i128::from(budget.min(b.cfg.size));
                b.burst = burst.min(b.cfg.one_time_burst);
                b.last = Instant::now();
                b.carry = 0;
            }
        }
    }

    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "throttled": self.throttled,
            "bandwidth_budget": self.bandwidth.as_ref().map(|b| b.budget as i64),
            "ops_budget": self.ops.as_ref().map(|b| b.budget as i64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bw(size: u64, ms: u64, burst: u64) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig { size, one_time_burst: burst, refill_time_ms: ms }),
            ops: None,
        }
    }

    #[test]
    fn a_bucket_limits_the_rate_to_size_per_refill_time() {
        // 1 MiB per second, 64 KiB requests, over 10 simulated seconds: about 10 MiB pass (plus the full start).
        let mut l = RateLimiter::new(&bw(1 << 20, 1000, 0)).unwrap();
        let t0 = Instant::now();
        let mut passed = 0u64;
        let mut now = t0;
        while now < t0 + Duration::from_secs(10) {
            if l.consume_at(64 << 10, now) {
                passed += 64 << 10;
            }
            now += Duration::from_millis(1);
        }
        let mib = passed as f64 / (1 << 20) as f64;
        assert!((10.0..=11.1).contains(&mib), "{mib} MiB in 10 s at 1 MiB/s");
        assert!(l.throttled > 0);
    }

    #[test]
    fn one_time_burst_is_spent_first_and_never_refilled() {
        let mut l = RateLimiter::new(&bw(1000, 1000, 5000)).unwrap();
        let now = Instant::now();
        assert!(l.consume_at(5500, now), "burst + budget");
        assert!(!l.consume_at(600, now), "burst gone, 500 left");
        assert!(l.consume_at(500, now));
        // A second later the budget is full again; the burst is not.
        assert!(l.consume_at(1000, now + Duration::from_secs(1)));
        assert!(!l.consume_at(1, now + Duration::from_secs(1)));
    }

    #[test]
    fn oversized_requests_wait_for_a_full_bucket_and_ops_count_too() {
        let mut l = RateLimiter::new(&bw(1000, 1000, 0)).unwrap();
        let now = Instant::now();
        assert!(l.consume_at(5000, now), "a full bucket lets an oversized request through");
        // ... and leaves a debt of 4000: the bucket is full again only 5 s later.
        assert!(!l.consume_at(5000, now + Duration::from_millis(4900)));
        assert!(l.consume_at(5000, now + Duration::from_millis(5000)));
        // Whatever the request size, the average rate holds: 100 requests of 3000 bytes need about 300 s.
        let mut l = RateLimiter::new(&bw(1000, 1000, 0)).unwrap();
        let (mut t, mut done) = (now, 0);
        while done < 100 {
            if l.consume_at(3000, t) {
                done += 1;
            }
            t += Duration::from_millis(10);
        }
        let secs = (t - now).as_secs_f64();
        assert!((295.0..305.0).contains(&secs), "{secs} s");
        let mut ops = RateLimiter::new(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig { size: 2, one_time_burst: 0, refill_time_ms: 1000 }),
        })
        .unwrap();
        assert!(ops.consume_at(1 << 30, now) && ops.consume_at(1, now) && !ops.consume_at(1, now));
        // Saved and restored budgets carry over (a clone does not start with a full bucket it did not have).
        let saved = ops.save();
        let mut again = RateLimiter::new(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig { size: 2, one_time_burst: 0, refill_time_ms: 1000 }),
        })
        .unwrap();
        again.restore(&saved);
        assert!(!again.consume_at(1, Instant::now()));
    }
}
