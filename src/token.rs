//! Tokens: what callers hold instead of a value.
//!
//! The default format is `<prefix>_<body>`: a short collection prefix of
//! lowercase letters and digits, then 128 bits as 22 characters of unpadded
//! URL-safe base64. A token is never derived from the value it stands for;
//! it carries no information about it.
//!
//! A default token *locates* its record (../shared/DESIGN.md §4): its 128
//! bits are one AES-256 block under the collection's token key, the
//! encryption of (the record's 64-bit sequence number ‖ 64 random bits).
//! Opening it gives the sequence number to read and the random half to
//! compare. Tokens issued before this scheme are random bodies; they are
//! found by their text.
//!
//! This module parses and generates tokens. It never sees a value.

use std::fmt;
use std::str::FromStr;

use aes::Aes256;
use aes::cipher::{BlockDecrypt as _, BlockEncrypt as _, KeyInit as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fpe::ff1::FF1;
use num_bigint::BigUint;

use crate::crypto::{CryptoError, fill_random};

/// Random bytes in a default token (128 bits).
pub const TOKEN_RANDOM_BYTES: usize = 16;
/// Characters of the random body: 16 bytes in unpadded base64.
const BODY_LEN: usize = 22;
/// Longest prefix a collection may use.
pub const MAX_PREFIX_LEN: usize = 8;
/// Longest default (random) token; longer input is refused before it is
/// parsed.
const MAX_RANDOM_TOKEN_LEN: usize = MAX_PREFIX_LEN + 1 + BODY_LEN;
/// Longest token string any format produces (format-preserving tokens are
/// as long as their values, which are bounded by this).
pub const MAX_TOKEN_LEN: usize = 256;

/// Why a string is not a token or a prefix. Carries no part of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenParseError {
    /// Not `<prefix>_<22 base64url characters>`.
    #[error("not a token")]
    Malformed,
    /// A prefix must be 1 to 8 characters of `a-z` and `0-9`.
    #[error("a token prefix must be 1 to 8 characters of a-z and 0-9")]
    BadPrefix,
}

/// A collection's token prefix: 1 to 8 characters of `a-z` and `0-9`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenPrefix(String);

impl TokenPrefix {
    /// The prefix text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TokenPrefix {
    type Err = TokenParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok =
            (1..=MAX_PREFIX_LEN).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if ok { Ok(Self(s.to_owned())) } else { Err(TokenParseError::BadPrefix) }
    }
}

/// A syntactically valid token. Tokens are not secret and not PII: they may
/// be logged and audited.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Token {
    text: String,
    prefix_len: usize,
}

impl Token {
    /// The token as text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The collection prefix part.
    pub fn prefix(&self) -> &str {
        &self.text[..self.prefix_len]
    }

    /// Consumes the token into its text.
    pub fn into_string(self) -> String {
        self.text
    }

    /// A format-preserving token (no prefix), already checked by its
    /// collection's format.
    pub(crate) fn preserved(text: String) -> Self {
        Self { text, prefix_len: 0 }
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Token {
    type Err = TokenParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_RANDOM_TOKEN_LEN || s.len() < BODY_LEN + 2 || !s.is_ascii() {
            return Err(TokenParseError::Malformed);
        }
        let split = s.len() - BODY_LEN - 1;
        let (prefix, rest) = s.split_at(split);
        let body = rest.strip_prefix('_').ok_or(TokenParseError::Malformed)?;
        prefix.parse::<TokenPrefix>().map_err(|_| TokenParseError::Malformed)?;
        // Strict decoding: non-canonical trailing bits are refused, so one
        // token has exactly one spelling.
        let mut raw = [0u8; TOKEN_RANDOM_BYTES + 2];
        match URL_SAFE_NO_PAD.decode_slice(body, &mut raw) {
            Ok(TOKEN_RANDOM_BYTES) => Ok(Self { text: s.to_owned(), prefix_len: split }),
            _ => Err(TokenParseError::Malformed),
        }
    }
}

impl Token {
    /// The 128-bit body of a default token (`None` for shaped tokens).
    fn body(&self) -> Option<[u8; TOKEN_RANDOM_BYTES]> {
        let body = self.text.get(self.prefix_len + 1..).filter(|_| self.prefix_len > 0)?;
        let mut raw = [0u8; TOKEN_RANDOM_BYTES + 2];
        match URL_SAFE_NO_PAD.decode_slice(body, &mut raw) {
            Ok(TOKEN_RANDOM_BYTES) => raw[..TOKEN_RANDOM_BYTES].try_into().ok(),
            _ => None,
        }
    }
}

/// `(prefix, 16 body bytes)` of `text` if it is a default token (in its one
/// canonical spelling).
pub fn default_parts(text: &str) -> Option<(&str, [u8; TOKEN_RANDOM_BYTES])> {
    let token: Token = text.parse().ok()?;
    let body = token.body()?;
    Some((&text[..token.prefix_len], body))
}

/// Bytes of a sealed token's random half, stored with its record and
/// compared (in constant time) on every lookup.
pub const CHECK_BYTES: usize = 8;

/// What a default token holds under its collection's token key: where its
/// record is, and the random half that proves the token was issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sealed {
    /// The record's sequence number in its collection.
    pub seq: u64,
    /// 64 bits from the OS CSPRNG, drawn when the token was issued.
    pub check: [u8; CHECK_BYTES],
}

/// A collection's token key, ready to seal and open default tokens (a keyed
/// pseudorandom permutation of 128-bit blocks) and to place shaped ones
/// (FF1 of a number over a shape's domain). No `Debug`; both key schedules
/// are zeroized on drop.
pub struct TokenKey {
    block: Aes256,
    ff1: FF1<Aes256>,
}

/// What the FF1 key is derived under (HKDF-SHA256 of the token key), so
/// the two uses of the token key never share an AES key.
const FF1_KEY_INFO: &[u8] = b"piivault token key: FF1 shaped tokens v1";

/// Numerals below which FF1 over radix 2 is refused (NIST SP 800-38G
/// rev. 1 asks for a domain of at least 10^6; 2^20 is the least power of
/// two above it). A domain of 10^6 has 20-bit numbers.
const FF1_MIN_BITS: u64 = 20;

impl TokenKey {
    /// The permutations keyed by `key` (the collection's `token` key).
    /// (Neither step can fail: a 32-byte HKDF-SHA256 output and radix 2
    /// are both within bounds.)
    pub fn new(key: &[u8; 32]) -> Result<Self, CryptoError> {
        let mut ff1_key = zeroize::Zeroizing::new([0u8; 32]);
        hkdf::Hkdf::<sha2::Sha256>::new(None, key)
            .expand(FF1_KEY_INFO, ff1_key.as_mut())
            .map_err(|_| CryptoError::Encrypt)?;
        let ff1 = FF1::<Aes256>::new(ff1_key.as_ref(), 2).map_err(|_| CryptoError::Encrypt)?;
        Ok(Self { block: Aes256::new(key.into()), ff1 })
    }

    /// The default token with `prefix` for `sealed`.
    pub fn seal(&self, prefix: &TokenPrefix, sealed: Sealed) -> Token {
        let mut block = [0u8; TOKEN_RANDOM_BYTES];
        block[..8].copy_from_slice(&sealed.seq.to_be_bytes());
        block[8..].copy_from_slice(&sealed.check);
        let mut block = block.into();
        self.block.encrypt_block(&mut block);
        token_from_bytes(prefix, &block.into())
    }

    /// What a default token holds (`None` for a shaped token). Every body
    /// opens to something: whether a record has that sequence number and
    /// check is the store's to say.
    pub fn open(&self, token: &Token) -> Option<Sealed> {
        let mut block = token.body()?.into();
        self.block.decrypt_block(&mut block);
        let block: [u8; TOKEN_RANDOM_BYTES] = block.into();
        let (seq, check) = block.split_at(8);
        Some(Sealed { seq: u64::from_be_bytes(seq.try_into().ok()?), check: check.try_into().ok()? })
    }

    /// `x` permuted over `0..domain` under `tweak`: FF1 (radix 2) over the
    /// bits of the domain's largest number, walked along its cycle until it
    /// lands back in the domain (fewer than two steps on average). `None`
    /// for a domain of fewer than 20 bits or an `x` outside it.
    pub fn permute(&self, tweak: &[u8], domain: &BigUint, x: &BigUint) -> Option<BigUint> {
        self.walk(tweak, domain, x, Direction::Forward)
    }

    /// The inverse of [`TokenKey::permute`].
    pub fn unpermute(&self, tweak: &[u8], domain: &BigUint, y: &BigUint) -> Option<BigUint> {
        self.walk(tweak, domain, y, Direction::Back)
    }

    fn walk(&self, tweak: &[u8], domain: &BigUint, x: &BigUint, direction: Direction) -> Option<BigUint> {
        if x >= domain {
            return None;
        }
        let bits = (domain - 1u32).bits();
        if bits < FF1_MIN_BITS {
            return None;
        }
        // Domains of up to 128 bits (all but the longest shapes) walk on
        // machine words: the same FF1, without a big number per round.
        if let (Ok(small), Ok(x)) = (u128::try_from(domain), u128::try_from(x))
            && let Ok(len) = u32::try_from(bits)
            && bits <= 128
        {
            return cycle_walk(x, &small, |&at| Some(self.ff1_step(tweak, &Bits { value: at, len }, direction)?.value))
                .map(BigUint::from);
        }
        cycle_walk(x.clone(), domain, |at| {
            Some(self.ff1_step(tweak, &WideBits { value: at.clone(), len: bits }, direction)?.value)
        })
    }

    /// One FF1 encryption or decryption of `numerals`.
    fn ff1_step<N: fpe::ff1::NumeralString>(&self, tweak: &[u8], numerals: &N, direction: Direction) -> Option<N> {
        match direction {
            Direction::Forward => self.ff1.encrypt(tweak, numerals),
            Direction::Back => self.ff1.decrypt(tweak, numerals),
        }
        .ok()
    }
}

/// Steps from `x` (inside the domain) until a step lands inside it again.
/// The cycle of a permutation through `x` comes back to `x` itself, so this
/// ends; the domain is more than half the bit space, so each step lands in
/// it with probability above one half.
fn cycle_walk<T: PartialOrd>(mut at: T, domain: &T, mut step: impl FnMut(&T) -> Option<T>) -> Option<T> {
    loop {
        at = step(&at)?;
        if at < *domain {
            return Some(at);
        }
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Forward,
    Back,
}

/// A radix-2 FF1 numeral string of at most 128 bits, in one word: FF1
/// splits it into halves of at most 64 bits, whose arithmetic modulo 2^m is
/// a wrapping add or subtract and a mask (fpe's own strings do it with a
/// big number per round).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bits {
    value: u128,
    len: u32,
}

/// Half of a [`Bits`]: at most 64 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HalfBits {
    value: u64,
    len: u32,
}

impl HalfBits {
    /// The low `m` bits of `x`.
    fn masked(x: u64, m: usize) -> Self {
        let len = u32::try_from(m).unwrap_or(64).min(64);
        let value = if len == 64 { x } else { x & ((1u64 << len) - 1) };
        Self { value, len }
    }

    /// The big-endian byte string `other`, modulo 2^64 (all that matters
    /// modulo 2^m for m ≤ 64).
    fn low_word(other: impl Iterator<Item = u8>) -> u64 {
        other.fold(0u64, |acc, b| acc.wrapping_shl(8) | u64::from(b))
    }
}

impl fpe::ff1::Operations for HalfBits {
    type Bytes = Vec<u8>;

    fn numeral_count(&self) -> usize {
        usize::try_from(self.len).unwrap_or(usize::MAX)
    }

    fn to_be_bytes(&self, _radix: u32, b: usize) -> Vec<u8> {
        let bytes = self.value.to_be_bytes();
        let mut out = vec![0u8; b.saturating_sub(bytes.len())];
        out.extend_from_slice(&bytes[bytes.len().saturating_sub(b)..]);
        out
    }

    fn add_mod_exp(self, other: impl Iterator<Item = u8>, _radix: u32, m: usize) -> Self {
        Self::masked(self.value.wrapping_add(Self::low_word(other)), m)
    }

    fn sub_mod_exp(self, other: impl Iterator<Item = u8>, _radix: u32, m: usize) -> Self {
        Self::masked(self.value.wrapping_sub(Self::low_word(other)), m)
    }
}

impl fpe::ff1::NumeralString for Bits {
    type Ops = HalfBits;

    fn is_valid(&self, radix: u32) -> bool {
        radix == 2 && self.len <= 128 && (self.len == 128 || self.value >> self.len == 0)
    }

    fn numeral_count(&self) -> usize {
        usize::try_from(self.len).unwrap_or(usize::MAX)
    }

    fn split(&self) -> (HalfBits, HalfBits) {
        let u = self.len / 2;
        let v = self.len - u;
        let low = if v == 0 { 0 } else { self.value & (u128::MAX >> (128 - v)) };
        let high = if v == 128 { 0 } else { self.value >> v };
        // Each half has at most 64 bits, so these conversions keep them.
        let half = |x: u128, len| HalfBits { value: u64::try_from(x).unwrap_or(u64::MAX), len };
        (half(high, u), half(low, v))
    }

    fn concat(a: HalfBits, b: HalfBits) -> Self {
        Self { value: (u128::from(a.value) << b.len) | u128::from(b.value), len: a.len + b.len }
    }
}

/// A radix-2 FF1 numeral string of any length, as one number: the
/// halves' arithmetic modulo 2^m is an add or subtract and a truncation.
/// (fpe's own strings keep one numeral per bit and rebuild a number from
/// them every round: 0.8 ms per 256-digit token, against 50 µs here.)
#[derive(Debug, Clone, PartialEq, Eq)]
struct WideBits {
    value: BigUint,
    len: u64,
}

/// Half of a [`WideBits`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct WideHalf {
    value: BigUint,
    len: u64,
}

/// `x mod 2^bits`.
fn low_bits(x: BigUint, bits: u64) -> BigUint {
    if x.bits() <= bits { x } else { x & ((BigUint::from(1u8) << bits) - 1u8) }
}

impl WideHalf {
    fn modulo(value: BigUint, m: usize) -> Self {
        let len = u64::try_from(m).unwrap_or(u64::MAX);
        Self { value: low_bits(value, len), len }
    }
}

impl fpe::ff1::Operations for WideHalf {
    type Bytes = Vec<u8>;

    fn numeral_count(&self) -> usize {
        usize::try_from(self.len).unwrap_or(usize::MAX)
    }

    fn to_be_bytes(&self, _radix: u32, b: usize) -> Vec<u8> {
        let bytes = self.value.to_bytes_be();
        let mut out = vec![0u8; b.saturating_sub(bytes.len())];
        out.extend_from_slice(&bytes[bytes.len().saturating_sub(b)..]);
        out
    }

    fn add_mod_exp(self, other: impl Iterator<Item = u8>, _radix: u32, m: usize) -> Self {
        let other: Vec<u8> = other.collect();
        Self::modulo(self.value + BigUint::from_bytes_be(&other), m)
    }

    fn sub_mod_exp(self, other: impl Iterator<Item = u8>, _radix: u32, m: usize) -> Self {
        let other: Vec<u8> = other.collect();
        let len = u64::try_from(m).unwrap_or(u64::MAX);
        // (a - y) mod 2^m = (a + 2^m - (y mod 2^m)) mod 2^m, without going
        // negative (a < 2^m).
        let y = low_bits(BigUint::from_bytes_be(&other), len);
        Self::modulo((self.value + (BigUint::from(1u8) << len)) - y, m)
    }
}

impl fpe::ff1::NumeralString for WideBits {
    type Ops = WideHalf;

    fn is_valid(&self, radix: u32) -> bool {
        radix == 2 && self.value.bits() <= self.len
    }

    fn numeral_count(&self) -> usize {
        usize::try_from(self.len).unwrap_or(usize::MAX)
    }

    fn split(&self) -> (WideHalf, WideHalf) {
        let u = self.len / 2;
        let v = self.len - u;
        (WideHalf { value: &self.value >> v, len: u }, WideHalf { value: low_bits(self.value.clone(), v), len: v })
    }

    fn concat(a: WideHalf, b: WideHalf) -> Self {
        Self { value: (a.value << b.len) | b.value, len: a.len + b.len }
    }
}

/// Where the random half of new default tokens comes from. Production uses
/// [`RandomTokens`] (the OS CSPRNG); tests can supply a source that repeats
/// itself, to show that tokens stay unique by construction. Each default
/// token calls [`TokenGenerator::fill`] once; shaped tokens never do.
pub trait TokenGenerator: Send + Sync {
    /// Fills `buf` with random bytes.
    fn fill(&self, buf: &mut [u8]) -> Result<(), CryptoError>;
}

/// The OS CSPRNG.
#[derive(Debug, Default, Clone, Copy)]
pub struct RandomTokens;

impl TokenGenerator for RandomTokens {
    fn fill(&self, buf: &mut [u8]) -> Result<(), CryptoError> {
        fill_random(buf)
    }
}

/// A new default token for `prefix`: 128 bits from `source`.
pub fn random_token(prefix: &TokenPrefix, source: &dyn TokenGenerator) -> Result<Token, CryptoError> {
    let mut raw = [0u8; TOKEN_RANDOM_BYTES];
    source.fill(&mut raw)?;
    Ok(token_from_bytes(prefix, &raw))
}

/// The token with `prefix` whose random body is `raw`.
pub fn token_from_bytes(prefix: &TokenPrefix, raw: &[u8; TOKEN_RANDOM_BYTES]) -> Token {
    let mut text = String::with_capacity(prefix.0.len() + 1 + BODY_LEN);
    text.push_str(&prefix.0);
    text.push('_');
    URL_SAFE_NO_PAD.encode_string(raw, &mut text);
    Token { text, prefix_len: prefix.0.len() }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use fpe::ff1::FlexibleNumeralString;
    use proptest::prelude::*;

    use super::*;

    /// The `bits` low bits of `x`, most significant first (fpe's numerals).
    fn to_bits(x: &BigUint, bits: u64) -> Vec<u16> {
        (0..bits).rev().map(|i| u16::from(x.bit(i))).collect()
    }

    /// The number whose bits, most significant first, are `numerals`.
    fn from_bits(numerals: &[u16]) -> BigUint {
        numerals.iter().fold(BigUint::default(), |x, n| (x << 1u8) + u32::from(*n))
    }

    fn prefix(s: &str) -> TokenPrefix {
        s.parse().unwrap()
    }

    #[test]
    fn generated_tokens_parse_and_differ() {
        let p = prefix("card");
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let token = random_token(&p, &RandomTokens).unwrap();
            assert_eq!(token.as_str().len(), 4 + 1 + BODY_LEN);
            assert_eq!(token.prefix(), "card");
            assert_eq!(token.as_str().parse::<Token>().unwrap(), token);
            assert!(seen.insert(token));
        }
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let good = token_from_bytes(&prefix("ssn"), &[0xff; 16]).into_string();
        assert_eq!(good, "ssn______________________w");
        for bad in [
            "",
            "ssn",
            "ssn_",
            "SSN_____________________w",
            "ssn-_____________________w",
            "ssn______________________x", // non-canonical trailing bits
            "toolongprefix_____________________w",
            "ssn_____________________w=",
            "ssn_____________________é",
            "_____________________w",
        ] {
            assert_eq!(bad.parse::<Token>(), Err(TokenParseError::Malformed), "{bad:?} accepted");
        }
        // The prefix may itself be followed by a body starting with '_'.
        assert!(good.parse::<Token>().is_ok());
    }

    #[test]
    fn prefixes() {
        for ok in ["a", "card", "abcdefg8", "0"] {
            assert!(ok.parse::<TokenPrefix>().is_ok());
        }
        for bad in ["", "Card", "card_x", "abcdefghi", "né"] {
            assert_eq!(bad.parse::<TokenPrefix>(), Err(TokenParseError::BadPrefix));
        }
    }

    /// Known answers: AES-256 (FIPS 197, appendix C.3 key) over
    /// `seq ‖ check`, checked against an independent implementation
    /// (`openssl enc -aes-256-ecb`).
    #[test]
    fn sealed_tokens_known_answers() {
        let key: [u8; 32] = core::array::from_fn(|i| u8::try_from(i).unwrap());
        let tokens = TokenKey::new(&key).unwrap();
        let p = prefix("tok");
        for (seq, check, expected) in KNOWN_ANSWERS {
            let sealed = Sealed { seq: *seq, check: *check };
            let token = tokens.seal(&p, sealed);
            assert_eq!(token.as_str(), *expected);
            assert_eq!(tokens.open(&token.as_str().parse().unwrap()), Some(sealed));
        }
    }

    const KNOWN_ANSWERS: &[(u64, [u8; 8], &str)] = &[
        (1, [0; 8], "tok_UR3V75poK32kn5HIbE96ww"),
        (0x0102_0304_0506_0708, *b"\x11\x22\x33\x44\x55\x66\x77\x88", "tok_-CN8l3dWDdCFNEpqmUvLdA"),
        (u64::MAX, [0xff; 8], "tok_6ZnkHUyncNpThxF7XY9X7g"),
    ];

    #[test]
    fn fail_a_token_under_another_key_or_with_one_bit_changed_opens_to_another_record() {
        let a = TokenKey::new(&[1; 32]).unwrap();
        let b = TokenKey::new(&[2; 32]).unwrap();
        let p = prefix("tok");
        let sealed = Sealed { seq: 42, check: [7; 8] };
        let token = a.seal(&p, sealed);
        assert_ne!(b.open(&token), Some(sealed));
        let mut text = token.into_string();
        // The first body character, changed to another of the alphabet.
        let first = text.as_bytes()[4];
        text.replace_range(4..5, if first == b'A' { "B" } else { "A" });
        assert_ne!(a.open(&text.parse().unwrap()), Some(sealed));
        // Shaped tokens are not sealed.
        assert_eq!(a.open(&Token::preserved("4111111111111111".into())), None);
    }

    proptest! {
        /// The one-word numeral strings give exactly fpe's own answers.
        #[test]
        fn word_sized_ff1_agrees_with_fpe_strings(key: [u8; 32], tweak in proptest::collection::vec(any::<u8>(), 0..40), bits in 20u64..=128, x: u128) {
            let ff1 = FF1::<Aes256>::new(&key, 2).unwrap();
            let len = u32::try_from(bits).unwrap();
            let x = if bits == 128 { x } else { x & ((1u128 << bits) - 1) };
            let fast = ff1.encrypt(&tweak, &Bits { value: x, len }).unwrap();
            let slow = ff1.encrypt(&tweak, &FlexibleNumeralString::from(to_bits(&BigUint::from(x), bits))).unwrap();
            prop_assert_eq!(BigUint::from(fast.value), from_bits(&Vec::from(slow)));
            prop_assert_eq!(fast.len, len);
            prop_assert_eq!(ff1.decrypt(&tweak, &fast).unwrap(), Bits { value: x, len });
        }

        /// So do the numeral strings of any length.
        #[test]
        fn wide_ff1_agrees_with_fpe_strings(key: [u8; 32], tweak in proptest::collection::vec(any::<u8>(), 0..40), bits in 20u64..=900, x in proptest::collection::vec(any::<u8>(), 0..120)) {
            let ff1 = FF1::<Aes256>::new(&key, 2).unwrap();
            let x = low_bits(BigUint::from_bytes_be(&x), bits);
            let fast = ff1.encrypt(&tweak, &WideBits { value: x.clone(), len: bits }).unwrap();
            let slow = ff1.encrypt(&tweak, &FlexibleNumeralString::from(to_bits(&x, bits))).unwrap();
            prop_assert_eq!(&fast.value, &from_bits(&Vec::from(slow)));
            prop_assert_eq!(fast.len, bits);
            prop_assert_eq!(ff1.decrypt(&tweak, &fast).unwrap(), WideBits { value: x, len: bits });
        }

        #[test]
        fn sealing_then_opening_is_the_identity(seq: u64, check: [u8; 8], key: [u8; 32], p in "[a-z0-9]{1,8}") {
            let tokens = TokenKey::new(&key).unwrap();
            let token = tokens.seal(&prefix(&p), Sealed { seq, check });
            let parsed: Token = token.as_str().parse().unwrap();
            prop_assert_eq!(tokens.open(&parsed), Some(Sealed { seq, check }));
        }

        #[test]
        fn distinct_sequence_numbers_give_distinct_tokens(a: u64, b: u64, check: [u8; 8], key: [u8; 32]) {
            prop_assume!(a != b);
            let tokens = TokenKey::new(&key).unwrap();
            let p = prefix("t");
            prop_assert_ne!(tokens.seal(&p, Sealed { seq: a, check }), tokens.seal(&p, Sealed { seq: b, check }));
        }

        #[test]
        fn any_body_round_trips(raw in any::<[u8; 16]>(), p in "[a-z0-9]{1,8}") {
            let token = token_from_bytes(&prefix(&p), &raw);
            prop_assert_eq!(token.as_str().parse::<Token>().unwrap(), token.clone());
            prop_assert_eq!(token.prefix(), p.as_str());
        }

        #[test]
        fn parsing_never_panics(s in "\\PC{0,40}") {
            let _ = s.parse::<Token>();
        }
    }
}
