//! The audit trail: one record per request, chained with HMAC-SHA256 so that
//! an edited, deleted, inserted or reordered record is detected.
//!
//! A record never holds a value: only who, what, where, how many, which
//! tokens (tokens are not PII), the outcome and where the call came from.
//!
//! Canonical encoding, version 2 (what the MAC covers; integers big-endian,
//! every string preceded by its length as `u16`, the token list by its count
//! as `u32`), written from schema version 6 on:
//!
//! ```text
//! 0x02 ‖ seq u64 ‖ at_micros i64 ‖ caller ‖ action ‖ collection ‖ items u32
//!      ‖ prefix ‖ token count u32 ‖ token… ‖ outcome ‖ error_code
//!      ‖ request_id ‖ peer
//! token = 0x01 ‖ 16 bytes    a default token `<prefix>_<base64url of them>`
//!       | 0x00 ‖ string      any other token, as text
//! ```
//!
//! `prefix` is that of the record's first default token (empty if none): a
//! default token is 17 bytes instead of its 23 to 31 characters. Version 1,
//! written before, is the same without `prefix` and with every token as a
//! string; it still decodes and verifies.
//!
//! Chain: `mac_0 = 32 zero bytes`, `mac_n = HMAC-SHA256(audit_key, mac_{n-1} ‖
//! encoding(record_n))`. The audit key lives in the keyring, wrapped by the
//! root key like every other key.

use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use crate::crypto::{KEY_LEN, SecretKey};
use crate::token::TOKEN_RANDOM_BYTES;

/// The first encoding version: every token as text.
pub const AUDIT_FORMAT_V1: u8 = 1;
/// The current encoding version: default tokens as their 16 bytes.
pub const AUDIT_FORMAT_V2: u8 = 2;
/// Token tags of version 2.
const TOKEN_TEXT: u8 = 0;
const TOKEN_DEFAULT: u8 = 1;
/// Length of a chain MAC.
pub const MAC_LEN: usize = 32;
/// The MAC before the first record.
pub const GENESIS_MAC: [u8; MAC_LEN] = [0; MAC_LEN];

/// Generates a fieldless enum whose variants each have one stored name.
macro_rules! named {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            /// Every variant.
            pub const ALL: &'static [Self] = &[$(Self::$variant,)*];

            /// The name stored in the trail and shown to auditors.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)*
                }
            }

            /// The variant stored as `text`, if any.
            pub fn parse(text: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str() == text)
            }
        }
    };
}

named! {
    /// What an audit record is about: its `action` column. One writer per
    /// record: the store for a data change and its record, the vault for a
    /// record of its own, the RPC wrapper for a failed call.
    Event {
        /// Values swapped for tokens.
        Tokenize = "tokenize",
        /// Values read back in clear.
        Detokenize = "detokenize",
        /// Values read back masked.
        DetokenizeMasked = "detokenize_masked",
        /// Values deleted.
        Delete = "delete",
        /// Expired values erased by the background purge.
        Purge = "purge",
        /// The trail queried or exported.
        AuditQuery = "audit_query",
        /// The trail verified.
        AuditVerify = "audit_verify",
        /// A copy of the whole store taken.
        Backup = "backup",
        /// Key versions listed.
        ListKeys = "list_keys",
        /// A new primary data key.
        RotateDataKey = "rotate_data_key",
        /// A new primary blind-index key.
        RotateIndexKey = "rotate_index_key",
        /// Records moved onto the primary data key.
        Reencrypt = "reencrypt",
        /// Blind-index entries moved onto the primary index key.
        Reindex = "reindex",
        /// A data key version destroyed.
        RetireKeyVersion = "retire_key_version",
        /// Unused index key versions destroyed.
        RetireIndexKeys = "retire_index_keys",
        /// The root key replaced.
        RotateRootKey = "rotate_root_key",
        /// The policy reloaded on request.
        ReloadPolicy = "reload_policy",
        /// The root key unsealed at start.
        Unseal = "unseal",
        /// TLS handshakes refused (a bounded summary).
        Handshake = "handshake",
    }
}

named! {
    /// How it ended: its `outcome` column. `Ok`, the two stages of
    /// long operations, a refused handshake, or the gRPC status code of a
    /// failed call.
    Outcome {
        /// Done.
        Ok = "OK",
        /// A long operation began (its end is a record of its own).
        Started = "STARTED",
        /// Asked for; it takes effect asynchronously.
        Requested = "REQUESTED",
        /// A TLS handshake was refused.
        Refused = "REFUSED",
        /// `CANCELLED`.
        Cancelled = "CANCELLED",
        /// `UNKNOWN`.
        Unknown = "UNKNOWN",
        /// `INVALID_ARGUMENT`.
        InvalidArgument = "INVALID_ARGUMENT",
        /// `DEADLINE_EXCEEDED`.
        DeadlineExceeded = "DEADLINE_EXCEEDED",
        /// `NOT_FOUND`.
        NotFound = "NOT_FOUND",
        /// `ALREADY_EXISTS`.
        AlreadyExists = "ALREADY_EXISTS",
        /// `PERMISSION_DENIED`.
        PermissionDenied = "PERMISSION_DENIED",
        /// `RESOURCE_EXHAUSTED`.
        ResourceExhausted = "RESOURCE_EXHAUSTED",
        /// `FAILED_PRECONDITION`.
        FailedPrecondition = "FAILED_PRECONDITION",
        /// `ABORTED`.
        Aborted = "ABORTED",
        /// `OUT_OF_RANGE`.
        OutOfRange = "OUT_OF_RANGE",
        /// `UNIMPLEMENTED`.
        Unimplemented = "UNIMPLEMENTED",
        /// `INTERNAL`.
        Internal = "INTERNAL",
        /// `UNAVAILABLE`.
        Unavailable = "UNAVAILABLE",
        /// `DATA_LOSS`.
        DataLoss = "DATA_LOSS",
        /// `UNAUTHENTICATED`.
        Unauthenticated = "UNAUTHENTICATED",
    }
}

/// One audited request. No field ever holds a value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditRecord {
    /// When, in microseconds since the Unix epoch (UTC).
    pub at_micros: i64,
    /// The caller's name, or empty when unauthenticated.
    pub caller: String,
    /// What happened: an [`Event`]'s name (kept as text so that a record
    /// written by a newer release still decodes and verifies).
    pub action: String,
    /// The collection, or empty.
    pub collection: String,
    /// Items in the request.
    pub items: u32,
    /// Tokens involved (issued, read or deleted).
    pub tokens: Vec<String>,
    /// How it ended: an [`Outcome`]'s name.
    pub outcome: String,
    /// A finer error code, or empty.
    pub error_code: String,
    /// The request id, or empty.
    pub request_id: String,
    /// The peer address, or empty.
    pub peer: String,
}

/// Why bytes are not an audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not version 1 or 2, truncated, trailing bytes, a string that is not
    /// UTF-8, or an unknown token tag.
    #[error("malformed audit record")]
    Malformed,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Fields are bounded far below 64 KiB (names, tokens, addresses);
    // anything longer is cut at a character boundary rather than lost.
    let mut end = s.len().min(usize::from(u16::MAX));
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let len = u16::try_from(end).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

impl AuditRecord {
    /// The canonical encoding of this record as number `seq`.
    pub fn encode(&self, seq: u64) -> Vec<u8> {
        self.encode_in(seq, AUDIT_FORMAT_V2)
    }

    /// The canonical encoding in `version` ([`AUDIT_FORMAT_V1`]; anything
    /// else is the current one): what a record decoded from that version
    /// encodes back to.
    pub fn encode_in(&self, seq: u64, version: u8) -> Vec<u8> {
        let v2 = version != AUDIT_FORMAT_V1;
        let prefix = if v2 {
            self.tokens.iter().find_map(|t| crate::token::default_parts(t)).map_or("", |(p, _)| p)
        } else {
            ""
        };
        let mut out = Vec::with_capacity(64 + self.tokens.len() * (TOKEN_RANDOM_BYTES + 1));
        out.push(if v2 { AUDIT_FORMAT_V2 } else { AUDIT_FORMAT_V1 });
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&self.at_micros.to_be_bytes());
        put_str(&mut out, &self.caller);
        put_str(&mut out, &self.action);
        put_str(&mut out, &self.collection);
        out.extend_from_slice(&self.items.to_be_bytes());
        if v2 {
            put_str(&mut out, prefix);
        }
        let count = u32::try_from(self.tokens.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for token in self.tokens.iter().take(count as usize) {
            match crate::token::default_parts(token).filter(|_| v2) {
                Some((p, body)) if p == prefix => {
                    out.push(TOKEN_DEFAULT);
                    out.extend_from_slice(&body);
                }
                _ if v2 => {
                    out.push(TOKEN_TEXT);
                    put_str(&mut out, token);
                }
                _ => put_str(&mut out, token),
            }
        }
        put_str(&mut out, &self.outcome);
        put_str(&mut out, &self.error_code);
        put_str(&mut out, &self.request_id);
        put_str(&mut out, &self.peer);
        out
    }

    /// Decodes a canonical encoding into its sequence number and record.
    pub fn decode(bytes: &[u8]) -> Result<(u64, Self), DecodeError> {
        let (version, seq, record) = Self::parse(bytes)?;
        // One record, one encoding: a version-2 token written as text that
        // could have been bytes, or a prefix that is not the first default
        // token's, would be a second spelling of the same record.
        if version == AUDIT_FORMAT_V2 && record.encode(seq) != bytes {
            return Err(DecodeError::Malformed);
        }
        Ok((seq, record))
    }

    /// Reads an encoding of either version, canonical or not: `(version,
    /// seq, record)`.
    fn parse(bytes: &[u8]) -> Result<(u8, u64, Self), DecodeError> {
        let mut r = Reader(bytes);
        let version = r.take(1)?[0];
        if version != AUDIT_FORMAT_V1 && version != AUDIT_FORMAT_V2 {
            return Err(DecodeError::Malformed);
        }
        let seq = u64::from_be_bytes(r.array()?);
        let at_micros = i64::from_be_bytes(r.array()?);
        let caller = r.string()?;
        let action = r.string()?;
        let collection = r.string()?;
        let items = u32::from_be_bytes(r.array()?);
        let prefix = if version == AUDIT_FORMAT_V2 { Some(r.string()?) } else { None };
        let count = u32::from_be_bytes(r.array()?);
        let mut tokens = Vec::new();
        for _ in 0..count {
            let Some(prefix) = &prefix else {
                tokens.push(r.string()?);
                continue;
            };
            match r.take(1)?[0] {
                TOKEN_TEXT => tokens.push(r.string()?),
                TOKEN_DEFAULT => {
                    let prefix: crate::token::TokenPrefix = prefix.parse().map_err(|_| DecodeError::Malformed)?;
                    tokens.push(crate::token::token_from_bytes(&prefix, &r.array()?).into_string());
                }
                _ => return Err(DecodeError::Malformed),
            }
        }
        let record = Self {
            at_micros,
            caller,
            action,
            collection,
            items,
            tokens,
            outcome: r.string()?,
            error_code: r.string()?,
            request_id: r.string()?,
            peer: r.string()?,
        };
        if !r.0.is_empty() {
            return Err(DecodeError::Malformed);
        }
        Ok((version, seq, record))
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Malformed);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.take(N)?.try_into().map_err(|_| DecodeError::Malformed)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let len = usize::from(u16::from_be_bytes(self.array()?));
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| DecodeError::Malformed)
    }
}

impl AuditRecord {
    /// The record as one JSON object (for exports and the log sink): time as
    /// RFC 3339 and microseconds, the chain MAC in hex.
    pub fn to_json(&self, seq: u64, mac: &[u8]) -> serde_json::Value {
        let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.at_micros) * 1000)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_default();
        serde_json::json!({
            "seq": seq,
            "at": at,
            "at_micros": self.at_micros,
            "caller": self.caller,
            "action": self.action,
            "collection": self.collection,
            "items": self.items,
            "tokens": self.tokens,
            "outcome": self.outcome,
            "error_code": self.error_code,
            "request_id": self.request_id,
            "peer": self.peer,
            "mac": hex::encode(mac),
        })
    }
}

/// Where committed audit records are also written, one JSON object per
/// line, for log shippers. The database stays the source of truth: a sink
/// that fails is logged, never fatal.
pub struct AuditSink {
    target: std::sync::Mutex<SinkTarget>,
}

enum SinkTarget {
    Stdout,
    File(std::path::PathBuf, std::fs::File),
}

fn open_append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

impl AuditSink {
    /// Records go to standard output.
    pub fn stdout() -> Self {
        Self { target: std::sync::Mutex::new(SinkTarget::Stdout) }
    }

    /// Records are appended to `path` (created 0600).
    pub fn file(path: &std::path::Path) -> std::io::Result<Self> {
        let file = open_append(path)?;
        Ok(Self { target: std::sync::Mutex::new(SinkTarget::File(path.to_owned(), file)) })
    }

    /// Reopens a file sink (after log rotation moved the old file away).
    pub fn reopen(&self) {
        let mut target = self.target.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let SinkTarget::File(path, file) = &mut *target {
            match open_append(path) {
                Ok(reopened) => *file = reopened,
                Err(e) => tracing::error!(path = %path.display(), error = %e, "cannot reopen the audit sink"),
            }
        }
    }

    /// Writes one line per record.
    pub fn emit(&self, records: &[(u64, AuditRecord, [u8; MAC_LEN])]) {
        use std::io::Write as _;
        let mut text = String::new();
        for (seq, record, mac) in records {
            text.push_str(&record.to_json(*seq, mac).to_string());
            text.push('\n');
        }
        let mut target = self.target.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let written = match &mut *target {
            SinkTarget::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(text.as_bytes()).and_then(|()| out.flush())
            }
            SinkTarget::File(_, file) => file.write_all(text.as_bytes()),
        };
        if let Err(e) = written {
            tracing::error!(error = %e, "cannot write to the audit sink; the records are in the database");
        }
    }
}

/// The key of the audit chain. Zeroized on drop; no `Debug`, no `Clone`.
pub struct AuditKey(SecretKey);

impl AuditKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(SecretKey::from_bytes(bytes))
    }

    /// The next MAC of the chain.
    pub fn chain(&self, previous: &[u8; MAC_LEN], encoded: &[u8]) -> [u8; MAC_LEN] {
        // HMAC accepts keys of any length: this cannot fail.
        let mut mac = <Hmac<Sha256>>::new_from_slice(self.0.expose_secret()).unwrap_or_else(|_| unreachable!());
        mac.update(previous);
        mac.update(encoded);
        mac.finalize().into_bytes().into()
    }
}

/// The end of a verified chain: the last sequence number and its MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Sequence number of the last record (0 for an empty trail).
    pub seq: u64,
    /// Its MAC.
    pub mac: [u8; MAC_LEN],
}

impl Head {
    /// The head of an empty trail.
    pub const GENESIS: Self = Self { seq: 0, mac: GENESIS_MAC };
}

/// Where and why verification stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit record {seq}: {reason}")]
pub struct VerifyError {
    /// The first bad sequence number.
    pub seq: u64,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Checks stored rows `(seq, encoded, mac)` in order from the start of the
/// trail: consecutive numbers from 1, each encoding well formed and naming
/// its own number, each MAC the chain's. Returns the head.
pub fn verify<I>(key: &AuditKey, rows: I) -> Result<Head, VerifyError>
where
    I: IntoIterator<Item = (u64, Vec<u8>, Vec<u8>)>,
{
    let mut chain = Chain::new();
    for (seq, encoded, mac) in rows {
        chain.push(key, seq, &encoded, &mac)?;
    }
    Ok(chain.head())
}

/// The chain checked so far, one record at a time: all a verification of
/// any length holds in memory.
#[derive(Debug, Clone)]
pub struct Chain {
    head: Head,
}

impl Chain {
    /// Before the first record.
    pub fn new() -> Self {
        Self { head: Head::GENESIS }
    }

    /// Checks the next record (`seq`, its canonical encoding, its stored
    /// MAC) against the chain so far.
    pub fn push(&mut self, key: &AuditKey, seq: u64, encoded: &[u8], mac: &[u8]) -> Result<(), VerifyError> {
        let expected_seq = self.head.seq + 1;
        if seq != expected_seq {
            return Err(VerifyError {
                seq: expected_seq,
                reason: if seq > expected_seq { "missing (deleted)" } else { "out of order" },
            });
        }
        match AuditRecord::decode(encoded) {
            Ok((inner, _)) if inner == seq => {}
            Ok(_) => return Err(VerifyError { seq, reason: "sequence number does not match the record" }),
            Err(_) => return Err(VerifyError { seq, reason: "malformed record" }),
        }
        let computed = key.chain(&self.head.mac, encoded);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(computed.as_slice(), mac)) {
            return Err(VerifyError { seq, reason: "MAC mismatch (edited, inserted or reordered)" });
        }
        self.head = Head { seq, mac: computed };
        Ok(())
    }

    /// The last record checked.
    pub fn head(&self) -> Head {
        self.head
    }
}

impl Default for Chain {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample() -> AuditRecord {
        AuditRecord {
            at_micros: 1_796_000_000_123_456,
            caller: "writer".into(),
            action: "tokenize".into(),
            collection: "card".into(),
            items: 2,
            tokens: vec!["card_AAAAAAAAAAAAAAAAAAAAAA".into(), "card_AAAAAAAAAAAAAAAAAAAAAQ".into()],
            outcome: "OK".into(),
            error_code: String::new(),
            request_id: "req-1".into(),
            peer: "127.0.0.1:50000".into(),
        }
    }

    fn chain_of(key: &AuditKey, records: &[AuditRecord]) -> Vec<(u64, Vec<u8>, Vec<u8>)> {
        let mut head = Head::GENESIS;
        records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let seq = i as u64 + 1;
                let encoded = r.encode(seq);
                let mac = key.chain(&head.mac, &encoded);
                head = Head { seq, mac };
                (seq, encoded, mac.to_vec())
            })
            .collect()
    }

    /// `tests/vectors/audit_v1.toml` pins the first encoding and its chain:
    /// records written before version 2 still decode and verify.
    #[test]
    fn version_1_still_decodes_and_verifies() {
        let file: toml::Table = toml::from_str(include_str!("../tests/vectors/audit_v1.toml")).unwrap();
        let field = |name: &str| hex::decode(file["chain"][name].as_str().unwrap()).unwrap();
        let key = AuditKey::from_bytes(field("audit_key").try_into().unwrap());
        let (seq, first) = AuditRecord::decode(&field("record_1")).unwrap();
        assert_eq!((seq, first), (1, sample()));
        let rows = [(1, field("record_1"), field("mac_1")), (2, field("record_2"), field("mac_2"))];
        assert_eq!(verify(&key, rows).unwrap().seq, 2);
    }

    /// `tests/vectors/audit_v2.toml` pins the encoding and the chain.
    #[test]
    fn known_answer_vector() {
        let file: toml::Table = toml::from_str(include_str!("../tests/vectors/audit_v2.toml")).unwrap();
        let field = |name: &str| file["chain"][name].as_str().unwrap().to_owned();
        let key = AuditKey::from_bytes(hex::decode(field("audit_key")).unwrap().try_into().unwrap());
        let mut second = sample();
        second.action = "detokenize".into();
        second.caller = "reader".into();
        second.tokens.truncate(1);
        second.items = 1;
        let rows = chain_of(&key, &[sample(), second]);
        assert_eq!(hex::encode(&rows[0].1), field("record_1"));
        assert_eq!(hex::encode(&rows[0].2), field("mac_1"));
        assert_eq!(hex::encode(&rows[1].1), field("record_2"));
        assert_eq!(hex::encode(&rows[1].2), field("mac_2"));
        // A record of shaped tokens, and one mixing prefixes: the others as
        // text.
        let mut third = sample();
        third.tokens =
            vec!["4111 1111 1111 1111".into(), "card_AAAAAAAAAAAAAAAAAAAAAA".into(), "x_AAAAAAAAAAAAAAAAAAAAAA".into()];
        assert_eq!(hex::encode(third.encode(3)), field("record_3"));
        assert_eq!(AuditRecord::decode(&third.encode(3)), Ok((3, third)));
    }

    #[test]
    fn fail_an_unknown_version_or_token_tag_does_not_decode() {
        let good = sample().encode(1);
        let mut version = good.clone();
        version[0] = 3;
        assert_eq!(AuditRecord::decode(&version), Err(DecodeError::Malformed));
        // The first token's tag sits after the fixed fields and the prefix.
        let at = 1 + 8 + 8 + (2 + 6) + (2 + 8) + (2 + 4) + 4 + (2 + 4) + 4;
        assert_eq!(good[at], TOKEN_DEFAULT);
        let mut tag = good;
        tag[at] = 7;
        assert_eq!(AuditRecord::decode(&tag), Err(DecodeError::Malformed));
        // A default token spelled as text is a second encoding: refused.
        let mut one = sample();
        one.tokens.truncate(1);
        let mut text = one.encode(1);
        let token = one.tokens[0].clone();
        let (_, raw) = crate::token::default_parts(&token).unwrap();
        let tagged: Vec<u8> = std::iter::once(TOKEN_DEFAULT).chain(raw).collect();
        let body = text.windows(17).position(|w| w == tagged).unwrap();
        let mut spelled = vec![TOKEN_TEXT];
        spelled.extend_from_slice(&u16::try_from(token.len()).unwrap().to_be_bytes());
        spelled.extend_from_slice(token.as_bytes());
        text.splice(body..body + 17, spelled);
        // Well formed, and the same record, but not its encoding.
        assert_eq!(AuditRecord::parse(&text).map(|(_, _, r)| r), Ok(one));
        assert_eq!(AuditRecord::decode(&text), Err(DecodeError::Malformed));
    }

    #[test]
    fn tampering_is_detected_at_the_first_bad_record() {
        let key = AuditKey::from_bytes([5; 32]);
        let records: Vec<AuditRecord> = (0..5).map(|i| AuditRecord { items: i, ..sample() }).collect();
        let rows = chain_of(&key, &records);
        assert_eq!(verify(&key, rows.clone()).unwrap().seq, 5);

        let mut edited = rows.clone();
        let (_, record) = AuditRecord::decode(&edited[2].1).unwrap();
        edited[2].1 = AuditRecord { caller: "someone".into(), ..record }.encode(3);
        assert_eq!(verify(&key, edited).unwrap_err().seq, 3);

        let mut deleted = rows.clone();
        deleted.remove(1);
        assert_eq!(verify(&key, deleted).unwrap_err(), VerifyError { seq: 2, reason: "missing (deleted)" });

        let mut swapped = rows.clone();
        swapped.swap(1, 3);
        assert_eq!(verify(&key, swapped).unwrap_err().seq, 2);

        let mut renumbered = rows.clone();
        renumbered.swap(1, 3);
        renumbered[1].0 = 2;
        renumbered[3].0 = 4;
        assert_eq!(verify(&key, renumbered).unwrap_err().seq, 2);

        let mut forged = rows.clone();
        let fake = sample().encode(6);
        forged.push((6, fake.clone(), AuditKey::from_bytes([6; 32]).chain(&[0; 32], &fake).to_vec()));
        assert_eq!(
            verify(&key, forged).unwrap_err(),
            VerifyError { seq: 6, reason: "MAC mismatch (edited, inserted or reordered)" }
        );

        assert_eq!(verify(&AuditKey::from_bytes([9; 32]), rows).unwrap_err().seq, 1);
    }

    proptest! {
        #[test]
        fn encoding_round_trips(
            seq in any::<u64>(),
            at in any::<i64>(),
            caller in "\\PC{0,20}",
            tokens in prop::collection::vec("[a-z]{1,5}_[A-Za-z0-9_-]{22}", 0..20),
            items in any::<u32>(),
        ) {
            let record = AuditRecord { at_micros: at, caller, tokens, items, ..sample() };
            prop_assert_eq!(AuditRecord::decode(&record.encode(seq)), Ok((seq, record)));
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = AuditRecord::decode(&bytes);
        }
    }
}
