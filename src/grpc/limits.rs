//! Per-caller traffic limits: a token bucket on requests and sliding
//! windows on values: detokenized (the bulk-detokenize guard), tokenized,
//! deleted, and deterministic hits (see [`Metered`]). The limits
//! themselves come from the policy, so a reload changes them at once; the
//! use so far is kept here, per caller.
//!
//! On a store that several nodes share, the quotas hold across them: each
//! node shares its use with the others through the store every
//! [`SHARE_INTERVAL`] ([`Limiter::exchange`]) and counts theirs against
//! each quota, by the minute (so another node's use counts a little longer
//! than the window: never shorter). A caller can go beyond a quota by what
//! it gets through the other nodes in one interval. The request rate is
//! per node.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::policy::{CallerId, Quota, RequestRate};

/// Callers tracked at once; beyond it, the ones idle longest are forgotten
/// (a forgotten caller starts again with a full bucket and an empty window).
const MAX_TRACKED: usize = 10_000;

/// Slots a detokenize window is cut into: the window slides by 1/SLOTS.
const SLOTS: usize = 60;

/// What a per-caller quota counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metered {
    /// Values detokenized (clear or masked).
    Detokenize = 0,
    /// Values tokenized.
    Tokenize = 1,
    /// Tokens deleted, found or not.
    Delete = 2,
    /// Tokenized values of deterministic collections that already had a
    /// token.
    DeterministicHits = 3,
}

impl Metered {
    /// What the caller does, in a refusal's message.
    pub fn verb(self) -> &'static str {
        match self {
            Self::Detokenize => "detokenize",
            Self::Tokenize | Self::DeterministicHits => "tokenize",
            Self::Delete => "delete",
        }
    }

    /// What is counted, in a refusal's message.
    pub fn noun(self) -> &'static str {
        match self {
            Self::Detokenize | Self::Tokenize => "values",
            Self::Delete => "tokens",
            Self::DeterministicHits => "values that already have a token (deterministic collections)",
        }
    }

    /// The metric label of a refusal.
    pub fn label(self) -> &'static str {
        match self {
            Self::Detokenize => "detokenize_values",
            Self::Tokenize => "tokenize_values",
            Self::Delete => "delete_tokens",
            Self::DeterministicHits => "deterministic_hits",
        }
    }

    /// The caller's quota of this kind.
    pub fn quota(self, limits: &crate::policy::CallerLimits) -> Option<Quota> {
        match self {
            Self::Detokenize => limits.detokenize,
            Self::Tokenize => limits.tokenize,
            Self::Delete => limits.delete,
            Self::DeterministicHits => limits.deterministic_hits,
        }
    }
}

/// One caller's use of its limits.
struct Use {
    /// Requests left in the bucket, and when it was last refilled.
    tokens: f64,
    refilled: Instant,
    /// Values per slot of the current window, by [`Metered`] kind.
    windows: [SlidingWindow; 4],
    last_seen: Instant,
}

/// Counts in the last `SLOTS` slots of `window / SLOTS` each.
struct SlidingWindow {
    length: Duration,
    counts: [u64; SLOTS],
    /// The absolute number (since `Limiter::epoch`) of the newest slot.
    newest: u128,
}

impl SlidingWindow {
    fn new(length: Duration) -> Self {
        Self { length, counts: [0; SLOTS], newest: 0 }
    }

    /// Adds `n` if the window's total, with `others` used elsewhere, stays
    /// within `max`.
    fn take(&mut self, n: u64, others: u64, quota: Quota, since_epoch: Duration) -> bool {
        if self.used(quota, since_epoch).saturating_add(others).saturating_add(n) > quota.max_values {
            return false;
        }
        self.add(n);
        true
    }

    /// Adds `n` to the newest slot, whatever the total (for what is only
    /// known after the fact); call [`SlidingWindow::used`] first.
    fn add(&mut self, n: u64) {
        let slot = usize::try_from(self.newest % SLOTS as u128).unwrap_or(0);
        self.counts[slot] = self.counts[slot].saturating_add(n);
    }

    /// The window's total under `quota` at `since_epoch`, after sliding it.
    fn used(&mut self, quota: Quota, since_epoch: Duration) -> u64 {
        if quota.window != self.length {
            // The policy changed the window: count afresh under the new one.
            *self = Self::new(quota.window);
        }
        let slot_nanos = (quota.window.as_nanos() / SLOTS as u128).max(1);
        let now = since_epoch.as_nanos() / slot_nanos;
        let passed = now.saturating_sub(self.newest);
        if passed >= SLOTS as u128 {
            self.counts = [0; SLOTS];
        } else {
            for step in 1..=passed {
                self.counts[usize::try_from((self.newest + step) % SLOTS as u128).unwrap_or(0)] = 0;
            }
        }
        self.newest = self.newest.max(now);
        self.counts.iter().fold(0u64, |sum, n| sum.saturating_add(*n))
    }
}

/// How often a node shares its quota use with the other nodes.
pub const SHARE_INTERVAL: Duration = Duration::from_secs(1);

/// Quota use shared with other nodes (a store that several nodes share).
#[derive(Default)]
struct Shared {
    /// Whether the store is shared ([`Limiter::exchange`] runs).
    on: bool,
    /// This node's use since the last exchange, by caller, kind and minute.
    unshared: HashMap<(String, i16, i64), u64>,
    /// The other nodes' use, by caller and kind, as `(minute, values)`.
    elsewhere: HashMap<(String, i16), Vec<(i64, u64)>>,
    /// The longest quota window met: how far back the others' use is read.
    longest: Duration,
}

/// The current unix time in seconds.
fn unix_secs() -> i64 {
    crate::store::now_micros() / 1_000_000
}

/// Every caller's use of its limits.
pub struct Limiter {
    epoch: Instant,
    callers: Mutex<HashMap<CallerId, Use>>,
    shared: Mutex<Shared>,
}

impl Default for Limiter {
    fn default() -> Self {
        Self { epoch: Instant::now(), callers: Mutex::default(), shared: Mutex::default() }
    }
}

impl Limiter {
    /// One request by `caller` under `rate` (none: unlimited), at `now`:
    /// whether it may go ahead.
    pub fn request(&self, caller: &CallerId, rate: Option<RequestRate>, now: Instant) -> bool {
        let Some(rate) = rate else { return true };
        self.with(caller, now, |usage| {
            let burst = f64::from(rate.burst);
            let elapsed = now.saturating_duration_since(usage.refilled).as_secs_f64();
            usage.tokens = (usage.tokens + elapsed * f64::from(rate.per_second)).min(burst);
            usage.refilled = now;
            let allowed = usage.tokens >= 1.0;
            if allowed {
                usage.tokens -= 1.0;
            }
            allowed
        })
    }

    /// `values` of `kind` by `caller` under `quota` (none: unlimited), at
    /// `now`; refused with the quota it would exceed. A refused request uses
    /// none of the quota.
    pub fn take(
        &self,
        caller: &CallerId,
        kind: Metered,
        values: usize,
        quota: Option<Quota>,
        now: Instant,
    ) -> Result<(), Quota> {
        let Some(quota) = quota else { return Ok(()) };
        let since_epoch = now.saturating_duration_since(self.epoch);
        let others = self.elsewhere(caller, kind, quota.window);
        let n = u64::try_from(values).unwrap_or(u64::MAX);
        let taken = self.with(caller, now, |usage| usage.windows[kind as usize].take(n, others, quota, since_epoch));
        if !taken {
            return Err(quota);
        }
        self.note(caller, kind, n);
        Ok(())
    }

    /// Whether `caller`'s window of `kind` is already full under `quota`
    /// (for what is counted only after the request: deterministic hits).
    pub fn exhausted(&self, caller: &CallerId, kind: Metered, quota: Option<Quota>, now: Instant) -> bool {
        let Some(quota) = quota else { return false };
        let since_epoch = now.saturating_duration_since(self.epoch);
        let others = self.elsewhere(caller, kind, quota.window);
        self.with(caller, now, |usage| {
            usage.windows[kind as usize].used(quota, since_epoch).saturating_add(others) >= quota.max_values
        })
    }

    /// Counts `values` of `kind` that already happened; returns whether the
    /// window is now full (the next request of that kind is refused).
    pub fn count(&self, caller: &CallerId, kind: Metered, values: usize, quota: Option<Quota>, now: Instant) -> bool {
        let Some(quota) = quota else { return false };
        let since_epoch = now.saturating_duration_since(self.epoch);
        let others = self.elsewhere(caller, kind, quota.window);
        let n = u64::try_from(values).unwrap_or(u64::MAX);
        self.note(caller, kind, n);
        self.with(caller, now, |usage| {
            let window = &mut usage.windows[kind as usize];
            let used = window.used(quota, since_epoch);
            window.add(n);
            used.saturating_add(others).saturating_add(n) >= quota.max_values
        })
    }

    /// Values of `kind` that other nodes gave `caller` within `window`
    /// (none on a store of its own).
    fn elsewhere(&self, caller: &CallerId, kind: Metered, window: Duration) -> u64 {
        let mut shared = self.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !shared.on {
            return 0;
        }
        shared.longest = shared.longest.max(window);
        let from = (unix_secs() - i64::try_from(window.as_secs()).unwrap_or(i64::MAX)).div_euclid(60);
        shared.elsewhere.get(&(caller.as_str().to_owned(), kind as i16)).map_or(0, |minutes| {
            minutes.iter().filter(|(minute, _)| *minute >= from).fold(0u64, |sum, (_, n)| sum.saturating_add(*n))
        })
    }

    /// Keeps `values` of `kind` by `caller` for the next exchange.
    fn note(&self, caller: &CallerId, kind: Metered, values: u64) {
        let mut shared = self.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if shared.on && values > 0 {
            let key = (caller.as_str().to_owned(), kind as i16, unix_secs().div_euclid(60));
            let used = shared.unshared.entry(key).or_default();
            *used = used.saturating_add(values);
        }
    }

    /// One exchange with the other nodes through `store`: this node's use
    /// since the last one out, theirs in. The first call starts counting
    /// this node's use for them. If the store fails, this node's use is
    /// kept for the next exchange and theirs stays as last read.
    pub async fn exchange(&self, vault: &crate::vault::Vault) -> Result<(), crate::error::VaultError> {
        let (used, since_minute) = {
            let mut shared = self.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            shared.on = true;
            let longest = i64::try_from(shared.longest.max(Duration::from_hours(1)).as_secs()).unwrap_or(i64::MAX);
            let used: Vec<crate::store::QuotaUse> = shared
                .unshared
                .drain()
                .map(|((caller, kind, minute), used)| crate::store::QuotaUse { caller, kind, minute, used })
                .collect();
            (used, unix_secs().saturating_sub(longest).div_euclid(60))
        };
        match vault.share_quota_use(used.clone(), since_minute).await {
            Ok(theirs) => {
                let mut elsewhere: HashMap<(String, i16), Vec<(i64, u64)>> = HashMap::new();
                for u in theirs {
                    elsewhere.entry((u.caller, u.kind)).or_default().push((u.minute, u.used));
                }
                self.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner).elsewhere = elsewhere;
                Ok(())
            }
            Err(e) => {
                let mut shared = self.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                for u in used {
                    let kept = shared.unshared.entry((u.caller, u.kind, u.minute)).or_default();
                    *kept = kept.saturating_add(u.used);
                }
                Err(e)
            }
        }
    }

    fn with<T>(&self, caller: &CallerId, now: Instant, f: impl FnOnce(&mut Use) -> T) -> T {
        let mut callers = self.callers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if callers.len() >= MAX_TRACKED && !callers.contains_key(caller) {
            // Forget the half idle longest: O(n log n) once per MAX_TRACKED/2
            // new callers.
            let mut seen: Vec<Instant> = callers.values().map(|u| u.last_seen).collect();
            seen.sort_unstable();
            let cutoff = seen[seen.len() / 2];
            callers.retain(|_, u| u.last_seen > cutoff);
        }
        let usage = callers.entry(caller.clone()).or_insert_with(|| Use {
            tokens: f64::INFINITY,
            refilled: now,
            windows: std::array::from_fn(|_| SlidingWindow::new(Duration::ZERO)),
            last_seen: now,
        });
        usage.last_seen = now;
        f(usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(name: &str) -> CallerId {
        name.parse().unwrap()
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let limiter = Limiter::default();
        let rate = Some(RequestRate { per_second: 10, burst: 5 });
        let (a, b) = (caller("a"), caller("b"));
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(limiter.request(&a, rate, t0));
        }
        assert!(!limiter.request(&a, rate, t0));
        // Another caller has its own bucket.
        assert!(limiter.request(&b, rate, t0));
        // 10 per second: one more after 100 ms, not two.
        let t1 = t0 + Duration::from_millis(100);
        assert!(limiter.request(&a, rate, t1));
        assert!(!limiter.request(&a, rate, t1));
        // A long quiet time refills to the burst, no more.
        let t2 = t1 + Duration::from_mins(1);
        for _ in 0..5 {
            assert!(limiter.request(&a, rate, t2));
        }
        assert!(!limiter.request(&a, rate, t2));
        // No rate: unlimited.
        for _ in 0..100 {
            assert!(limiter.request(&a, None, t2));
        }
    }

    #[test]
    fn the_detokenize_window_slides() {
        let limiter = Limiter::default();
        let quota = Quota { max_values: 100, window: Duration::from_mins(1) };
        let a = caller("a");
        let t0 = limiter.epoch;
        assert_eq!(limiter.take(&a, Metered::Detokenize, 60, Some(quota), t0), Ok(()));
        assert_eq!(limiter.take(&a, Metered::Detokenize, 30, Some(quota), t0 + Duration::from_secs(30)), Ok(()));
        // 90 used: 11 more would be 101.
        assert_eq!(limiter.take(&a, Metered::Detokenize, 11, Some(quota), t0 + Duration::from_secs(59)), Err(quota));
        // The refused request used nothing.
        assert_eq!(limiter.take(&a, Metered::Detokenize, 10, Some(quota), t0 + Duration::from_secs(59)), Ok(()));
        assert_eq!(limiter.take(&a, Metered::Detokenize, 1, Some(quota), t0 + Duration::from_secs(59)), Err(quota));
        // At 60 s the first 60 have left the window; the 30 from 30 s and the
        // 10 from 59 s have not.
        assert_eq!(limiter.take(&a, Metered::Detokenize, 60, Some(quota), t0 + Duration::from_secs(61)), Ok(()));
        assert_eq!(limiter.take(&a, Metered::Detokenize, 1, Some(quota), t0 + Duration::from_secs(61)), Err(quota));
        // Long after, the whole quota again; a request over the quota never passes.
        let later = t0 + Duration::from_hours(2);
        assert_eq!(limiter.take(&a, Metered::Detokenize, 101, Some(quota), later), Err(quota));
        assert_eq!(limiter.take(&a, Metered::Detokenize, 100, Some(quota), later), Ok(()));
        assert_eq!(limiter.take(&a, Metered::Detokenize, 5, None, later), Ok(()));
    }

    /// Each kind has its own window; what is counted after the fact fills
    /// its window, and a full window is seen before the next request.
    #[test]
    fn each_kind_counts_apart_and_after_the_fact() {
        let limiter = Limiter::default();
        let quota = Some(Quota { max_values: 10, window: Duration::from_mins(1) });
        let (a, b) = (caller("a"), caller("b"));
        let t0 = limiter.epoch;
        assert_eq!(limiter.take(&a, Metered::Tokenize, 10, quota, t0), Ok(()));
        assert!(limiter.take(&a, Metered::Tokenize, 1, quota, t0).is_err());
        // Deletes and detokenizes are not touched by tokenizes.
        assert_eq!(limiter.take(&a, Metered::Delete, 10, quota, t0), Ok(()));
        assert_eq!(limiter.take(&a, Metered::Detokenize, 10, quota, t0), Ok(()));
        assert!(!limiter.exhausted(&a, Metered::DeterministicHits, quota, t0));
        assert!(!limiter.count(&a, Metered::DeterministicHits, 9, quota, t0));
        assert!(!limiter.exhausted(&a, Metered::DeterministicHits, quota, t0));
        // The tenth hit fills it (a request's hits may go past the maximum).
        assert!(limiter.count(&a, Metered::DeterministicHits, 3, quota, t0));
        assert!(limiter.exhausted(&a, Metered::DeterministicHits, quota, t0));
        assert!(!limiter.exhausted(&b, Metered::DeterministicHits, quota, t0), "another caller's window is its own");
        // The window slides for hits too; without a quota nothing is counted.
        assert!(!limiter.exhausted(&a, Metered::DeterministicHits, quota, t0 + Duration::from_secs(61)));
        assert!(!limiter.count(&a, Metered::DeterministicHits, 1_000, None, t0));
        assert!(!limiter.exhausted(&a, Metered::DeterministicHits, None, t0));
    }

    #[test]
    fn many_callers_are_tracked_within_bounds() {
        let limiter = Limiter::default();
        let rate = Some(RequestRate { per_second: 1, burst: 1 });
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED + 10) {
            assert!(limiter.request(&caller(&format!("c{i}")), rate, t0 + Duration::from_millis(i as u64)));
        }
        let tracked = limiter.callers.lock().unwrap().len();
        assert!(tracked <= MAX_TRACKED, "{tracked}");
        // The newest caller is still tracked: its bucket is empty.
        let newest = caller(&format!("c{}", MAX_TRACKED + 9));
        assert!(!limiter.request(&newest, rate, t0 + Duration::from_millis(MAX_TRACKED as u64 + 9)));
    }
}
