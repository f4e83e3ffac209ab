//! Who may do what: callers, actions and the policy that grants them.
//!
//! The policy is the one place where access is decided. Anything it does not
//! grant is denied: an unknown caller, an action not listed, a collection not
//! listed or not configured. An unknown collection and an ungranted one get
//! the same answer, so a caller cannot probe which collections exist.
//!
//! `policy.toml`:
//!
//! ```toml
//! [callers.writer]                 # spiffe://<trust-domain>/writer
//! tokenize = ["*"]                 # every configured collection
//! delete = ["card", "ssn"]
//!
//! [callers.support]
//! detokenize_masked = ["card"]
//!
//! [callers.ops]
//! admin = true                     # data and index keys, policy reload
//! audit = true
//!
//! [callers.break-glass]
//! backup = true                    # never implied by admin
//! rotate_root = true               # never implied by admin
//!
//! [defaults]                       # limits for callers that set none
//! requests_per_second = 500        # token bucket: refill rate ...
//! burst = 1000                     # ... and size (default: the rate)
//! detokenize_max_values = 100000   # values read back (clear or masked) ...
//! detokenize_window = "1h"         # ... within any such sliding window
//! tokenize_max_values = 1000000    # values tokenized per window
//! delete_max_values = 10000        # tokens deleted per window, found or not
//! deterministic_hits_max = 10000   # values that already had a token
//! ```
//!
//! Each quota's window is `<kind>_window` (default one hour). A caller's own
//! table may set the same limits; each rate or quota it sets replaces the
//! default one. Callers the policy does not name get the defaults
//! too (their requests are refused, but refusing is work as well).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::CollectionName;

/// What a caller asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Swap values for tokens.
    Tokenize,
    /// Read values back in clear.
    Detokenize,
    /// Read values back masked.
    DetokenizeMasked,
    /// Delete stored values.
    Delete,
    /// Data and index key management, policy reload (global).
    Admin,
    /// Read the audit trail (global).
    Audit,
    /// Take a copy of the whole store: every ciphertext and wrapped key
    /// (global; never implied by `admin`).
    Backup,
    /// Replace the root key and what unseals it (global; never implied by
    /// `admin`).
    RotateRoot,
}

impl Action {
    /// Every action, for exhaustive tests and listings.
    pub const ALL: [Self; 8] = [
        Self::Tokenize,
        Self::Detokenize,
        Self::DetokenizeMasked,
        Self::Delete,
        Self::Admin,
        Self::Audit,
        Self::Backup,
        Self::RotateRoot,
    ];

    /// Whether the action is global (not on collections).
    pub fn is_global(self) -> bool {
        matches!(self, Self::Admin | Self::Audit | Self::Backup | Self::RotateRoot)
    }

    /// The name used in `policy.toml` and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tokenize => "tokenize",
            Self::Detokenize => "detokenize",
            Self::DetokenizeMasked => "detokenize_masked",
            Self::Delete => "delete",
            Self::Admin => "admin",
            Self::Audit => "audit",
            Self::Backup => "backup",
            Self::RotateRoot => "rotate_root",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a certificate does not name a caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// No URI SAN at all.
    #[error("the client certificate has no URI SAN")]
    NoUri,
    /// More than one URI SAN: ambiguous.
    #[error("the client certificate has more than one URI SAN")]
    SeveralUris,
    /// A URI that is not `spiffe://<trust-domain>/<name>` of this vault.
    #[error("the client certificate's URI SAN is not in trust domain {0}")]
    ForeignTrustDomain(String),
    /// The certificate could not be parsed.
    #[error("the client certificate cannot be parsed")]
    Unparsable,
    /// No clientAuth extended key usage: the certificate was not issued to
    /// authenticate a client (RFC 5280 would take a missing extension as
    /// "any purpose"; piivault does not).
    #[error("the client certificate is not for client authentication (no clientAuth extended key usage)")]
    NotForClients,
}

/// An authenticated caller: the name part of `spiffe://<trust-domain>/<name>`,
/// taken from the verified client certificate and nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallerId(String);

impl CallerId {
    /// Parses the URI SANs of a verified certificate for `trust_domain`.
    /// Exactly one URI SAN is accepted, and it must be
    /// `spiffe://<trust_domain>/<name>`.
    pub fn from_uri_sans(uris: &[&str], trust_domain: &str) -> Result<Self, IdentityError> {
        let uri = match uris {
            [] => return Err(IdentityError::NoUri),
            [uri] => *uri,
            _ => return Err(IdentityError::SeveralUris),
        };
        let foreign = || IdentityError::ForeignTrustDomain(trust_domain.to_owned());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(foreign)?;
        let (domain, name) = rest.split_once('/').ok_or_else(foreign)?;
        if domain != trust_domain {
            return Err(foreign());
        }
        name.parse().map_err(|_| foreign())
    }

    /// The caller's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The full SPIFFE ID in `trust_domain`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!("spiffe://{trust_domain}/{}", self.0)
    }
}

impl fmt::Display for CallerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A string that is not a caller name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a caller name is 1 to 128 characters of a-z, A-Z, 0-9, '.', '-', '_' and '/' (no empty segments)")]
pub struct BadCallerName;

impl FromStr for CallerId {
    type Err = BadCallerName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = (1..=128).contains(&s.len())
            && s.split('/').all(|segment| {
                !segment.is_empty()
                    && segment != "."
                    && segment != ".."
                    && segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            });
        if ok { Ok(Self(s.to_owned())) } else { Err(BadCallerName) }
    }
}

/// Which collections an action is granted on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    /// Every configured collection.
    All,
    /// These collections.
    Some(BTreeSet<CollectionName>),
}

/// One caller's grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Grants {
    collections: BTreeMap<Action, Scope>,
    /// The global actions granted.
    global: BTreeSet<Action>,
    limits: CallerLimits,
}

/// A token bucket on a caller's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRate {
    /// Requests per second the bucket refills with.
    pub per_second: u32,
    /// The bucket's size: requests allowed at once after a quiet time.
    pub burst: u32,
}

/// A per-caller quota: values at most within any sliding window of this
/// length (the bulk-detokenize guard, and the quotas on tokenized values,
/// deletes and deterministic hits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Values at most.
    pub max_values: u64,
    /// The window.
    pub window: Duration,
}

/// The limits on one caller's traffic; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallerLimits {
    /// Requests of every kind.
    pub requests: Option<RequestRate>,
    /// Values detokenized.
    pub detokenize: Option<Quota>,
    /// Values tokenized (each may become a new token of its collection).
    pub tokenize: Option<Quota>,
    /// Tokens deleted (hits and misses alike: guessing costs quota).
    pub delete: Option<Quota>,
    /// Tokenized values of deterministic collections that already had a
    /// token: each one confirms a guess.
    pub deterministic_hits: Option<Quota>,
}

/// The quota settings of a policy table, by kind: the two keys that set
/// each, and the field they fill.
const QUOTA_KEYS: [(&str, &str); 4] = [
    ("detokenize_max_values", "detokenize_window"),
    ("tokenize_max_values", "tokenize_window"),
    ("delete_max_values", "delete_window"),
    ("deterministic_hits_max", "deterministic_hits_window"),
];

/// The checked policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    callers: BTreeMap<CallerId, Grants>,
    defaults: CallerLimits,
}

/// Errors loading a policy. Each names the line at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML, an unknown action, or a caller listed twice.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's explanation, with the line.
        message: String,
    },
    /// A value outside what piivault accepts.
    #[error("{path}: line {line}: {problem}")]
    Invalid {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        problem: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    defaults: RawLimits,
    #[serde(default)]
    callers: BTreeMap<Spanned<String>, RawGrants>,
}

/// The limit settings, in `[defaults]` or a caller's table.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    requests_per_second: Option<Spanned<i64>>,
    burst: Option<Spanned<i64>>,
    detokenize_max_values: Option<Spanned<i64>>,
    detokenize_window: Option<Spanned<String>>,
    tokenize_max_values: Option<Spanned<i64>>,
    tokenize_window: Option<Spanned<String>>,
    delete_max_values: Option<Spanned<i64>>,
    delete_window: Option<Spanned<String>>,
    deterministic_hits_max: Option<Spanned<i64>>,
    deterministic_hits_window: Option<Spanned<String>>,
}

/// One quota's `(max, window)` settings as written.
type RawQuota<'a> = (Option<&'a Spanned<i64>>, Option<&'a Spanned<String>>);

impl RawLimits {
    /// Each quota's `(max, window)` settings, in [`QUOTA_KEYS`] order.
    fn quotas(&self) -> [RawQuota<'_>; 4] {
        [
            (self.detokenize_max_values.as_ref(), self.detokenize_window.as_ref()),
            (self.tokenize_max_values.as_ref(), self.tokenize_window.as_ref()),
            (self.delete_max_values.as_ref(), self.delete_window.as_ref()),
            (self.deterministic_hits_max.as_ref(), self.deterministic_hits_window.as_ref()),
        ]
    }
}

/// Largest accepted request rate or burst.
const MAX_RATE: i64 = 1_000_000;
/// Default window of a quota that names only its maximum.
const DEFAULT_QUOTA_WINDOW: Duration = Duration::from_hours(1);

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
#[allow(clippy::struct_excessive_bools)] // the file's four global grants, as written
struct RawGrants {
    tokenize: Option<Vec<Spanned<String>>>,
    detokenize: Option<Vec<Spanned<String>>>,
    detokenize_masked: Option<Vec<Spanned<String>>>,
    delete: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    audit: bool,
    #[serde(default)]
    backup: bool,
    #[serde(default)]
    rotate_root: bool,
    requests_per_second: Option<Spanned<i64>>,
    burst: Option<Spanned<i64>>,
    detokenize_max_values: Option<Spanned<i64>>,
    detokenize_window: Option<Spanned<String>>,
    tokenize_max_values: Option<Spanned<i64>>,
    tokenize_window: Option<Spanned<String>>,
    delete_max_values: Option<Spanned<i64>>,
    delete_window: Option<Spanned<String>>,
    deterministic_hits_max: Option<Spanned<i64>>,
    deterministic_hits_window: Option<Spanned<String>>,
}

impl Policy {
    /// Reads and checks a policy file against the configured collections.
    pub fn load(path: &Path, collections: &BTreeSet<CollectionName>) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| PolicyError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text, &path.display().to_string(), collections)
    }

    /// Checks policy text; `path` only labels errors.
    pub fn parse(text: &str, path: &str, collections: &BTreeSet<CollectionName>) -> Result<Self, PolicyError> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let invalid = |offset: usize, problem: String| PolicyError::Invalid {
            path: path.to_owned(),
            line: line_of(offset),
            problem,
        };
        let raw: RawPolicy = toml::from_str(text).map_err(|e| PolicyError::Parse {
            path: path.to_owned(),
            message: e.span().map_or_else(
                || e.message().to_owned(),
                |span| format!("line {}: {}", line_of(span.start), e.message()),
            ),
        })?;
        let defaults = parse_limits(&raw.defaults, "defaults", &invalid)?;
        let mut callers = BTreeMap::new();
        for (name, raw_grants) in raw.callers {
            let caller: CallerId =
                name.get_ref().parse().map_err(|e: BadCallerName| invalid(name.span().start, e.to_string()))?;
            // Each limit the caller sets replaces the default one; the pair
            // it belongs to is checked as a whole.
            let own = RawLimits {
                requests_per_second: raw_grants.requests_per_second,
                burst: raw_grants.burst,
                detokenize_max_values: raw_grants.detokenize_max_values,
                detokenize_window: raw_grants.detokenize_window,
                tokenize_max_values: raw_grants.tokenize_max_values,
                tokenize_window: raw_grants.tokenize_window,
                delete_max_values: raw_grants.delete_max_values,
                delete_window: raw_grants.delete_window,
                deterministic_hits_max: raw_grants.deterministic_hits_max,
                deterministic_hits_window: raw_grants.deterministic_hits_window,
            };
            let rate_set = own.requests_per_second.is_some() || own.burst.is_some();
            let set = own.quotas().map(|(max, window)| max.is_some() || window.is_some());
            let mine = parse_limits(&own, &format!("caller {caller}"), &invalid)?;
            let pick = |i: usize, own: Option<Quota>, default: Option<Quota>| if set[i] { own } else { default };
            let caller_limits = CallerLimits {
                requests: if rate_set { mine.requests } else { defaults.requests },
                detokenize: pick(0, mine.detokenize, defaults.detokenize),
                tokenize: pick(1, mine.tokenize, defaults.tokenize),
                delete: pick(2, mine.delete, defaults.delete),
                deterministic_hits: pick(3, mine.deterministic_hits, defaults.deterministic_hits),
            };
            let global = [
                (Action::Admin, raw_grants.admin),
                (Action::Audit, raw_grants.audit),
                (Action::Backup, raw_grants.backup),
                (Action::RotateRoot, raw_grants.rotate_root),
            ]
            .into_iter()
            .filter_map(|(action, granted)| granted.then_some(action))
            .collect();
            let mut grants = Grants { global, limits: caller_limits, ..Grants::default() };
            for (action, list) in [
                (Action::Tokenize, raw_grants.tokenize),
                (Action::Detokenize, raw_grants.detokenize),
                (Action::DetokenizeMasked, raw_grants.detokenize_masked),
                (Action::Delete, raw_grants.delete),
            ] {
                let Some(list) = list else { continue };
                let mut scope = BTreeSet::new();
                let mut all = false;
                for entry in list {
                    if entry.get_ref() == "*" {
                        all = true;
                        continue;
                    }
                    let collection =
                        entry.get_ref().parse::<CollectionName>().ok().filter(|c| collections.contains(c)).ok_or_else(
                            || {
                                invalid(
                                    entry.span().start,
                                    format!("caller {caller}: {action} names unknown collection {:?}", entry.get_ref()),
                                )
                            },
                        )?;
                    scope.insert(collection);
                }
                grants.collections.insert(action, if all { Scope::All } else { Scope::Some(scope) });
            }
            callers.insert(caller, grants);
        }
        Ok(Self { callers, defaults })
    }

    /// The limits on `caller`'s traffic: its own, or the defaults (also for
    /// callers the policy does not name).
    pub fn limits(&self, caller: &CallerId) -> CallerLimits {
        self.callers.get(caller).map_or(self.defaults, |grants| grants.limits)
    }

    /// Whether `caller` may perform `action` on `collection` (ignored for the
    /// global actions). Default deny.
    pub fn allows(&self, caller: &CallerId, action: Action, collection: Option<&str>) -> bool {
        let Some(grants) = self.callers.get(caller) else { return false };
        match action {
            global if global.is_global() => grants.global.contains(&global),
            _ => match (grants.collections.get(&action), collection) {
                (Some(Scope::All), Some(_)) => true,
                (Some(Scope::Some(set)), Some(name)) => set.iter().any(|c| c.as_str() == name),
                _ => false,
            },
        }
    }

    /// Whether `caller` may perform `action` on at least one collection (or,
    /// for the global actions, at all).
    pub fn grants_anywhere(&self, caller: &CallerId, action: Action) -> bool {
        let Some(grants) = self.callers.get(caller) else { return false };
        if action.is_global() {
            grants.global.contains(&action)
        } else {
            grants.collections.get(&action).is_some_and(|scope| match scope {
                Scope::All => true,
                Scope::Some(set) => !set.is_empty(),
            })
        }
    }

    /// The callers the policy names.
    pub fn callers(&self) -> impl Iterator<Item = &CallerId> {
        self.callers.keys()
    }
}

/// Checks one table's limit settings; `context` names the table in errors
/// and `invalid` turns an offset into an error naming its line.
fn parse_limits(
    raw: &RawLimits,
    context: &str,
    invalid: &dyn Fn(usize, String) -> PolicyError,
) -> Result<CallerLimits, PolicyError> {
    // A positive whole number up to `max`, or the line it is on.
    let positive = |setting: &Spanned<i64>, key: &str, max: i64| {
        let n = *setting.get_ref();
        if (1..=max).contains(&n) {
            Ok(n.unsigned_abs())
        } else {
            Err(invalid(setting.span().start, format!("{key} must be between 1 and {max}, got {n}")))
        }
    };
    let requests = match (&raw.requests_per_second, &raw.burst) {
        (None, None) => None,
        (None, Some(burst)) => {
            return Err(invalid(burst.span().start, format!("{context}: burst needs requests_per_second")));
        }
        (Some(rate), burst) => {
            let per_second = positive(rate, "requests_per_second", MAX_RATE)?;
            let burst = burst.as_ref().map_or(Ok(per_second), |b| positive(b, "burst", MAX_RATE))?;
            Some(RequestRate {
                per_second: u32::try_from(per_second).unwrap_or(u32::MAX),
                burst: u32::try_from(burst).unwrap_or(u32::MAX),
            })
        }
    };
    let mut quotas = [None; 4];
    for (slot, ((max, window), (max_key, window_key))) in
        quotas.iter_mut().zip(raw.quotas().into_iter().zip(QUOTA_KEYS))
    {
        *slot = match (max, window) {
            (None, None) => None,
            (None, Some(window)) => {
                return Err(invalid(window.span().start, format!("{context}: {window_key} needs {max_key}")));
            }
            (Some(max), window) => {
                let max_values = positive(max, max_key, i64::MAX)?;
                let window = match window {
                    None => DEFAULT_QUOTA_WINDOW,
                    Some(w) => crate::config::parse_duration(w.get_ref()).ok_or_else(|| {
                        invalid(
                            w.span().start,
                            format!(
                                "{window_key} must be a whole number and a unit (s, m, h, d), got {:?}",
                                w.get_ref()
                            ),
                        )
                    })?,
                };
                Some(Quota { max_values, window })
            }
        };
    }
    let [detokenize, tokenize, delete, deterministic_hits] = quotas;
    Ok(CallerLimits { requests, detokenize, tokenize, delete, deterministic_hits })
}

/// The `policy.toml` written by `piivault init`: nobody is granted anything.
pub const EMPTY_POLICY: &str = "\
# piivault policy: which caller may do what. Anything not granted is denied.
# A caller is the name in its certificate's URI SAN, spiffe://<trust-domain>/<name>.
# Actions on collections: tokenize, detokenize, detokenize_masked, delete
# (a list of collection names, or \"*\" for all). Global (true/false): admin
# (data and index keys, policy reload), audit, and the two that admin never
# implies: backup (a copy of every ciphertext and wrapped key) and rotate_root
# (what unseals the vault).
# After an edit, reload with `kill -HUP <pid of piivault serve>`.
#
# [callers.payments-api]
# tokenize = [\"card\"]
#
# [callers.shipping]
# detokenize = [\"name\", \"phone\"]
# requests_per_second = 200        # token bucket: refill rate ...
# burst = 400                      # ... and size (default: the rate)
# detokenize_max_values = 50000    # bulk-detokenize guard: values per window
# detokenize_window = \"1h\"
#
# [callers.loader]
# tokenize = [\"name\"]
# tokenize_max_values = 10000000   # a bulk load: raise its own quota

# Limits for every caller without its own table's limits, and for callers not
# listed here. Conservative on purpose: a caller that needs more gets its own
# (each limit it sets replaces the default), or raise them here for everyone.
[defaults]
requests_per_second = 500        # token bucket: refill rate ...
burst = 1000                     # ... and size
detokenize_max_values = 50000    # values read back (clear or masked) ...
detokenize_window = \"1h\"         # ... within any sliding hour
tokenize_max_values = 1000000    # values tokenized: a writer cannot fill a shaped collection
tokenize_window = \"1h\"
delete_max_values = 10000        # tokens deleted, found or not: guessing short tokens costs quota
delete_window = \"1h\"
deterministic_hits_max = 10000   # values that already had a token (deterministic collections):
deterministic_hits_window = \"1h\" # each confirms a guess about a token's value
";

/// The limits `init` writes into `[defaults]` of a new policy.
pub const SHIPPED_DEFAULTS: CallerLimits = CallerLimits {
    requests: Some(RequestRate { per_second: 500, burst: 1000 }),
    detokenize: Some(Quota { max_values: 50_000, window: Duration::from_hours(1) }),
    tokenize: Some(Quota { max_values: 1_000_000, window: Duration::from_hours(1) }),
    delete: Some(Quota { max_values: 10_000, window: Duration::from_hours(1) }),
    deterministic_hits: Some(Quota { max_values: 10_000, window: Duration::from_hours(1) }),
};

#[cfg(test)]
mod tests {
    use super::*;

    fn collections() -> BTreeSet<CollectionName> {
        ["card", "ssn", "email"].iter().map(|c| c.parse().unwrap()).collect()
    }

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(text, "policy.toml", &collections())
    }

    fn caller(name: &str) -> CallerId {
        name.parse().unwrap()
    }

    #[test]
    fn grants_are_exactly_what_is_written() {
        let policy = parse(
            "[callers.writer]\ntokenize = [\"*\"]\ndelete = [\"card\"]\n\
             [callers.\"team/reader\"]\ndetokenize = [\"ssn\"]\n[callers.ops]\nadmin = true\n",
        )
        .unwrap();
        let writer = caller("writer");
        assert!(policy.allows(&writer, Action::Tokenize, Some("card")));
        assert!(policy.allows(&writer, Action::Tokenize, Some("email")));
        assert!(policy.allows(&writer, Action::Delete, Some("card")));
        assert!(!policy.allows(&writer, Action::Delete, Some("ssn")));
        assert!(!policy.allows(&writer, Action::Detokenize, Some("card")));
        assert!(!policy.allows(&writer, Action::Admin, None));
        let reader = caller("team/reader");
        assert!(policy.allows(&reader, Action::Detokenize, Some("ssn")));
        assert!(!policy.allows(&reader, Action::Detokenize, Some("card")));
        assert!(!policy.allows(&reader, Action::DetokenizeMasked, Some("ssn")));
        assert!(policy.allows(&caller("ops"), Action::Admin, None));
        assert!(!policy.allows(&caller("ops"), Action::Audit, None));
        assert!(!policy.allows(&caller("ops"), Action::Tokenize, Some("card")));
        for action in Action::ALL {
            assert!(!policy.allows(&caller("stranger"), action, Some("card")));
        }
        // A collection-scoped action without a collection is never granted.
        assert!(!policy.allows(&writer, Action::Tokenize, None));
    }

    #[test]
    fn limits_come_from_the_caller_else_the_defaults() {
        let policy = parse(
            "[defaults]\nrequests_per_second = 100\ndetokenize_max_values = 5000\n\
             [callers.batch]\ntokenize = [\"*\"]\nrequests_per_second = 10\nburst = 40\n\
             [callers.bulk]\ndetokenize = [\"*\"]\ndetokenize_max_values = 9\ndetokenize_window = \"30m\"\n",
        )
        .unwrap();
        let default_quota = Some(Quota { max_values: 5000, window: Duration::from_hours(1) });
        assert_eq!(
            policy.limits(&caller("batch")),
            CallerLimits {
                requests: Some(RequestRate { per_second: 10, burst: 40 }),
                detokenize: default_quota,
                ..CallerLimits::default()
            }
        );
        assert_eq!(
            policy.limits(&caller("bulk")),
            CallerLimits {
                requests: Some(RequestRate { per_second: 100, burst: 100 }),
                detokenize: Some(Quota { max_values: 9, window: Duration::from_mins(30) }),
                ..CallerLimits::default()
            }
        );
        // The writer quotas: each pair replaces its default on its own.
        let writers = parse(
            "[defaults]\ntokenize_max_values = 100\ndelete_max_values = 10\ndelete_window = \"10m\"\n\
             deterministic_hits_max = 7\n[callers.loader]\ntokenize = [\"*\"]\ntokenize_max_values = 5000\n\
             tokenize_window = \"1d\"\n",
        )
        .unwrap();
        let hour = Duration::from_hours(1);
        assert_eq!(
            writers.limits(&caller("loader")),
            CallerLimits {
                tokenize: Some(Quota { max_values: 5000, window: Duration::from_hours(24) }),
                delete: Some(Quota { max_values: 10, window: Duration::from_mins(10) }),
                deterministic_hits: Some(Quota { max_values: 7, window: hour }),
                ..CallerLimits::default()
            }
        );
        assert_eq!(writers.limits(&caller("stranger")).tokenize, Some(Quota { max_values: 100, window: hour }));
        // Callers the policy does not name get the defaults.
        assert_eq!(policy.limits(&caller("stranger")), policy.limits(&caller("nobody")));
        assert_eq!(policy.limits(&caller("stranger")).requests, Some(RequestRate { per_second: 100, burst: 100 }));
        // No limits anywhere: unlimited.
        assert_eq!(parse("[callers.a]\n").unwrap().limits(&caller("a")), CallerLimits::default());
    }

    #[test]
    fn bad_limits_name_the_line() {
        let err = parse("[defaults]\nburst = 5\n").unwrap_err().to_string();
        assert_eq!(err, "policy.toml: line 2: defaults: burst needs requests_per_second");
        let err = parse("[callers.a]\n\nrequests_per_second = 0\n").unwrap_err().to_string();
        assert_eq!(err, "policy.toml: line 3: requests_per_second must be between 1 and 1000000, got 0");
        let err = parse("[callers.a]\ndetokenize_window = \"1h\"\n").unwrap_err().to_string();
        assert_eq!(err, "policy.toml: line 2: caller a: detokenize_window needs detokenize_max_values");
        let err = parse("[defaults]\ndetokenize_max_values = 5\ndetokenize_window = \"soon\"\n").unwrap_err();
        assert!(err.to_string().starts_with("policy.toml: line 3: detokenize_window must be"), "{err}");
        let err = parse("[callers.a]\ndelete_window = \"1h\"\n").unwrap_err().to_string();
        assert_eq!(err, "policy.toml: line 2: caller a: delete_window needs delete_max_values");
        let err = parse("[defaults]\ndeterministic_hits_max = 0\n").unwrap_err().to_string();
        assert_eq!(err, "policy.toml: line 2: deterministic_hits_max must be between 1 and 9223372036854775807, got 0");
        let err = parse("[defaults]\nrate = 5\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `rate`"), "{err}");
    }

    /// `admin` grants data and index keys and reloads; `backup` and
    /// `rotate_root` are separate, and none implies another.
    #[test]
    fn backup_and_rotate_root_are_their_own_grants() {
        let policy = parse(
            "[callers.ops]\nadmin = true\naudit = true\n[callers.vaulted]\nbackup = true\n[callers.keyholder]\nrotate_root = true\n",
        )
        .unwrap();
        let granted = |name: &str| -> Vec<&str> {
            Action::ALL.iter().filter(|a| policy.allows(&caller(name), **a, None)).map(|a| a.as_str()).collect()
        };
        assert_eq!(granted("ops"), ["admin", "audit"]);
        assert_eq!(granted("vaulted"), ["backup"]);
        assert_eq!(granted("keyholder"), ["rotate_root"]);
        assert!(Action::ALL.iter().filter(|a| a.is_global()).count() == 4);
    }

    #[test]
    fn the_empty_policy_denies_everything() {
        let policy = parse(EMPTY_POLICY).unwrap();
        assert_eq!(policy.callers().count(), 0);
    }

    /// A new vault's policy limits every caller that sets nothing: the
    /// defaults written by `init`, and a caller's own limit replacing one.
    #[test]
    fn a_new_policy_ships_conservative_defaults() {
        let shipped = parse(EMPTY_POLICY).unwrap();
        let nobody: CallerId = "unlisted".parse().unwrap();
        assert_eq!(shipped.limits(&nobody), SHIPPED_DEFAULTS);
        let with_caller =
            format!("{EMPTY_POLICY}\n[callers.etl]\ndetokenize = [\"card\"]\nrequests_per_second = 2000\n");
        let policy = parse(&with_caller).unwrap();
        let etl = policy.limits(&"etl".parse().unwrap());
        assert_eq!(etl.requests, Some(RequestRate { per_second: 2000, burst: 2000 }));
        assert_eq!(etl.detokenize, SHIPPED_DEFAULTS.detokenize, "an unset limit stays the default");
    }

    #[test]
    fn errors_name_the_line() {
        let err = parse("[callers.a]\ntokenize = [\"card\"]\nread = [\"card\"]\n").unwrap_err().to_string();
        assert!(err.starts_with("policy.toml: line 3: unknown field `read`"), "{err}");
        let err = parse("[callers.a]\ntokenize = [\"card\"]\n\n[callers.a]\n").unwrap_err().to_string();
        assert!(err.starts_with("policy.toml: line 4:"), "{err}");
        assert!(err.contains("duplicate"), "{err}");
        let err = parse("[callers.a]\ntokenize = [\n  \"card\",\n  \"iban\",\n]\n").unwrap_err().to_string();
        assert_eq!(err, "policy.toml: line 4: caller a: tokenize names unknown collection \"iban\"");
        let err = parse("[callers.\"a b\"]\n").unwrap_err().to_string();
        assert!(err.starts_with("policy.toml: line 1: a caller name is"), "{err}");
        let err = parse("[callers.a]\nadmin = \"yes\"\n").unwrap_err().to_string();
        assert!(err.starts_with("policy.toml: line 2:"), "{err}");
    }

    #[test]
    fn identities_come_only_from_one_spiffe_uri_in_the_trust_domain() {
        let td = "vault.test";
        assert_eq!(CallerId::from_uri_sans(&["spiffe://vault.test/writer"], td), Ok(caller("writer")));
        assert_eq!(CallerId::from_uri_sans(&["spiffe://vault.test/ns/a/sa/b"], td), Ok(caller("ns/a/sa/b")));
        assert_eq!(CallerId::from_uri_sans(&[], td), Err(IdentityError::NoUri));
        assert_eq!(
            CallerId::from_uri_sans(&["spiffe://vault.test/a", "spiffe://vault.test/b"], td),
            Err(IdentityError::SeveralUris)
        );
        for foreign in [
            "spiffe://other.test/writer",
            "spiffe://vault.test",
            "spiffe://vault.test/",
            "spiffe://vault.test/a//b",
            "spiffe://vault.test/../admin",
            "https://vault.test/writer",
            "spiffe://vault.test.evil/writer",
        ] {
            assert_eq!(
                CallerId::from_uri_sans(&[foreign], td),
                Err(IdentityError::ForeignTrustDomain(td.into())),
                "{foreign}"
            );
        }
        assert_eq!(caller("writer").spiffe_id(td), "spiffe://vault.test/writer");
    }
}
