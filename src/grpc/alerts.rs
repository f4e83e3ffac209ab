//! Alerts on repeated refusals (denied or unauthenticated calls, failed
//! handshakes, rate-limited requests, connections over the cap).
//!
//! Refusals are counted per subject: a caller by name, an IPv4 address, or
//! an IPv6 /64 (one customer's network: an attacker holding a /64 cannot
//! spread a flood over 2^64 subjects). The table of subjects is capped; when
//! it is full, the least recently seen tenth is forgotten, so a flood of new
//! subjects can never stop a new one from being tracked. A global count of
//! every refusal within the window raises its own alert, so a flood spread
//! too thin for any subject's threshold is still seen.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::metrics::metrics;

/// Subjects tracked at once; beyond it, the least recently seen are forgotten.
const MAX_SUBJECTS: usize = 10_000;
/// Refusals across all subjects within the window, in multiples of the
/// per-subject threshold, that raise the global alert.
const GLOBAL_FACTOR: usize = 100;
/// Steps of the global sliding window.
const GLOBAL_STEPS: u32 = 60;

/// Who an alert is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    /// An authenticated caller, by name.
    Caller(String),
    /// A peer address: IPv4 as it is, IPv6 cut to its /64.
    Network(IpAddr),
}

impl Subject {
    /// The subject of a peer at `ip`.
    pub fn peer(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::Network(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::Network(IpAddr::V4(v4)),
                None => Self::Network(IpAddr::V6(Ipv6Addr::from(v6.to_bits() & !u128::from(u64::MAX)))),
            },
        }
    }

    /// The subject of a caller named `name`.
    pub fn caller(name: &str) -> Self {
        Self::Caller(name.to_owned())
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Caller(name) => f.write_str(name),
            Self::Network(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Self::Network(IpAddr::V6(net)) => write!(f, "{net}/64"),
        }
    }
}

/// What one refusal raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Raised {
    /// The subject reached the threshold.
    pub subject: bool,
    /// All refusals together reached the global threshold.
    pub global: bool,
}

struct Seen {
    times: VecDeque<Instant>,
    last: Instant,
}

struct State {
    subjects: HashMap<Subject, Seen>,
    /// Refusals per step of the window, oldest first: (step start, count).
    global: VecDeque<(Instant, usize)>,
    /// When the global alert last fired (at most once per window).
    global_alerted: Option<Instant>,
}

/// Counts refusals per subject and raises a WARN alert when one reaches the
/// threshold within the window.
pub struct Alerts {
    window: Duration,
    threshold: usize,
    state: Mutex<State>,
}

impl Alerts {
    /// Alerts at `threshold` refusals within `window`.
    pub fn new(window: Duration, threshold: usize) -> Self {
        let state = State { subjects: HashMap::new(), global: VecDeque::new(), global_alerted: None };
        Self { window, threshold, state: Mutex::new(state) }
    }

    /// Notes one refusal of `subject`.
    pub fn note(&self, subject: &Subject, what: &'static str) -> Raised {
        self.note_at(subject, what, Instant::now())
    }

    /// Notes `n` refusals of `subject` at once (the misses of one request):
    /// one lock, and at most one alert, however many.
    pub fn note_many(&self, subject: &Subject, what: &'static str, n: usize) -> Raised {
        if n == 0 {
            return Raised::default();
        }
        self.note_n_at(subject, what, n, Instant::now())
    }

    fn note_at(&self, subject: &Subject, what: &'static str, now: Instant) -> Raised {
        self.note_n_at(subject, what, 1, now)
    }

    fn note_n_at(&self, subject: &Subject, what: &'static str, n: usize, now: Instant) -> Raised {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Beyond the threshold more entries change nothing but memory.
        let n = n.min(self.threshold.max(1));
        let mut global = false;
        for _ in 0..n {
            global |= self.count_globally(&mut state, now);
        }
        let raised = Raised { global, subject: false };
        if state.subjects.len() >= MAX_SUBJECTS && !state.subjects.contains_key(subject) {
            forget_least_recent(&mut state.subjects);
        }
        let seen = state.subjects.entry(subject.clone()).or_insert_with(|| Seen { times: VecDeque::new(), last: now });
        seen.last = now;
        seen.times.extend(std::iter::repeat_n(now, n));
        while seen.times.front().is_some_and(|t| now.duration_since(*t) >= self.window) {
            seen.times.pop_front();
        }
        if seen.times.len() < self.threshold {
            return raised;
        }
        let count = seen.times.len();
        seen.times.clear();
        drop(state);
        let total = metrics().alerts.inc() + 1;
        tracing::warn!(
            alert = true,
            subject = subject.to_string().as_str(),
            count,
            window_s = self.window.as_secs(),
            alerts_raised = total,
            "repeated {what}"
        );
        Raised { subject: true, ..raised }
    }

    /// Adds one to the global sliding count; whether that raised the global
    /// alert.
    fn count_globally(&self, state: &mut State, now: Instant) -> bool {
        let step = self.window / GLOBAL_STEPS;
        while state.global.front().is_some_and(|(start, _)| now.duration_since(*start) >= self.window) {
            state.global.pop_front();
        }
        match state.global.back_mut() {
            Some((start, count)) if now.duration_since(*start) < step => *count += 1,
            _ => state.global.push_back((now, 1)),
        }
        let total: usize = state.global.iter().map(|(_, count)| count).sum();
        let quiet = state.global_alerted.is_none_or(|at| now.duration_since(at) >= self.window);
        if total < self.threshold.saturating_mul(GLOBAL_FACTOR) || !quiet {
            return false;
        }
        state.global_alerted = Some(now);
        let alerts = metrics().alerts.inc() + 1;
        tracing::warn!(
            alert = true,
            subject = "(all)",
            count = total,
            subjects = state.subjects.len(),
            window_s = self.window.as_secs(),
            alerts_raised = alerts,
            "repeated refusals from many subjects"
        );
        true
    }
}

/// Forgets the least recently seen tenth of the table (at least one).
fn forget_least_recent(subjects: &mut HashMap<Subject, Seen>) {
    let mut lasts: Vec<Instant> = subjects.values().map(|s| s.last).collect();
    let cut = (subjects.len() / 10).max(1);
    let (_, nth, _) = lasts.select_nth_unstable(cut - 1);
    let threshold = *nth;
    let mut forgotten = 0;
    subjects.retain(|_, seen| {
        let keep = seen.last > threshold || forgotten >= cut;
        if !keep {
            forgotten += 1;
        }
        keep
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6(text: &str) -> Subject {
        Subject::peer(text.parse().unwrap())
    }

    #[test]
    fn ipv6_peers_count_by_their_64() {
        assert_eq!(v6("2001:db8:1:2:aaaa::1"), v6("2001:db8:1:2:ffff:1:2:3"));
        assert_ne!(v6("2001:db8:1:2::1"), v6("2001:db8:1:3::1"));
        assert_eq!(v6("2001:db8:1:2:aaaa::1").to_string(), "2001:db8:1:2::/64");
        assert_eq!(v6("::ffff:192.0.2.7").to_string(), "192.0.2.7", "a mapped IPv4 is that address");
        assert_eq!(Subject::peer("192.0.2.7".parse().unwrap()).to_string(), "192.0.2.7");

        let alerts = Alerts::new(Duration::from_mins(1), 5);
        let now = Instant::now();
        let raised: Vec<bool> = (0..5u16)
            .map(|i| alerts.note_at(&v6(&format!("2001:db8:1:2::{i:x}")), "refused requests", now).subject)
            .collect();
        assert_eq!(raised, [false, false, false, false, true], "five addresses of one /64 are one subject");
    }

    /// A table filled with other subjects (10,000 addresses) cannot keep a
    /// new one from alerting: the least recently seen are forgotten.
    #[test]
    fn a_full_table_still_tracks_a_new_subject() {
        let alerts = Alerts::new(Duration::from_mins(1), 3);
        let start = Instant::now();
        for i in 0..u32::try_from(MAX_SUBJECTS).unwrap() {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            alerts.note_at(&Subject::peer(ip), "failed TLS handshakes", start);
        }
        let later = start + Duration::from_secs(1);
        let caller =
            |n| alerts.note_at(&Subject::caller("mallory"), "refused requests", later + Duration::from_millis(n));
        assert_eq!([caller(0).subject, caller(1).subject, caller(2).subject], [false, false, true]);
        let tracked = alerts.state.lock().unwrap().subjects.len();
        assert!(tracked <= MAX_SUBJECTS && tracked > MAX_SUBJECTS - MAX_SUBJECTS / 10 - 2, "{tracked}");
    }

    /// Many refusals noted at once (one request's misses) raise the alert
    /// once, and keep no more than the threshold's worth of entries.
    #[test]
    fn many_at_once_raise_one_alert() {
        let alerts = Alerts::new(Duration::from_mins(1), 5);
        let who = Subject::caller("guesser");
        assert_eq!(alerts.note_many(&who, "deletes of unknown tokens", 0), Raised::default());
        assert!(!alerts.note_many(&who, "deletes of unknown tokens", 4).subject);
        assert!(alerts.note_many(&who, "deletes of unknown tokens", 1000).subject);
        assert!(alerts.state.lock().unwrap().subjects[&who].times.is_empty(), "cleared when it fired");
        assert!(!alerts.note_many(&who, "deletes of unknown tokens", 4).subject);
    }

    /// Refusals spread over many subjects, each below its threshold, raise
    /// the global alert once per window.
    #[test]
    fn a_thin_flood_raises_the_global_alert() {
        let alerts = Alerts::new(Duration::from_mins(1), 5);
        let start = Instant::now();
        let mut global = Vec::new();
        for i in 0..1200u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0xc000_0200 + i));
            let raised =
                alerts.note_at(&Subject::peer(ip), "failed TLS handshakes", start + Duration::from_millis(i.into()));
            assert!(!raised.subject);
            if raised.global {
                global.push(i);
            }
        }
        assert_eq!(global, [499], "at 100 × the threshold, once per window");
        let after = start + Duration::from_secs(62);
        let raised = alerts.note_at(&Subject::caller("x"), "refused requests", after);
        assert!(!raised.global, "the window moved on: the old refusals no longer count");
    }
}
