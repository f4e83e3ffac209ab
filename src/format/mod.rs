//! Collection formats: what a collection's tokens look like, how its values
//! are normalized before they are tokenized, and what a masked reveal shows.
//!
//! Shaped tokens (every format but `random`) keep their value's shape and
//! *locate* their record ([`shaped`]): the free positions (those not kept)
//! are FF1, under the collection's token key, of the record's number in
//! its shape. They carry nothing of the value beyond the kept characters
//! and the shape; the value is only reachable through the vault's record.
//! A token never equals its value (the vault takes the next number if it
//! would).
//!
//! A shaped token's identity is its *canonical* form, its letters and
//! digits alone ([`Format::canonical`]): `9674 4677 4499 0004` and
//! `9674467744990004` are one token, stored once, rendered in whatever
//! shape the caller wrote its value ([`Format::render`]).
//!
//! Nothing here logs or formats a value; errors carry fixed text only.

mod shaped;

pub use shaped::{MAX_SHAPE_NUMBER, SHAPE_BITS, record_seq, split_seq};

use std::fmt;

use crate::token::{MAX_TOKEN_LEN, Token, TokenPrefix};
use crate::value::PiiValue;

/// The fewest possible tokens a collection's format may offer for its
/// shortest value: the floor of FF1's domain (NIST SP 800-38G rev. 1).
/// Below it, the permutation is weak and guessing a token is cheap; such a
/// configuration is refused at load.
pub const MIN_TOKEN_SPACE: u128 = 1_000_000;

/// Longest value (in bytes) a format-preserving collection accepts: its
/// tokens are as long as its values.
pub const MAX_PRESERVED_LEN: usize = MAX_TOKEN_LEN;

/// Digits in a card number (ISO/IEC 7812-1 allows 8 to 19; issued payment
/// cards have 12 to 19).
pub const CARD_DIGITS: std::ops::RangeInclusive<usize> = 12..=19;
/// Digits in a US Social Security Number.
const SSN_DIGITS: usize = 9;
/// SSN tokens: area numbers 900–999 are never issued as SSNs, and group
/// numbers 00–49 are outside every range the IRS uses for ITINs (area 9xx,
/// groups 50–65, 70–88, 90–92, 94–99): no token is a valid SSN or ITIN.
const SSN_TOKEN_AREA_FIRST: u8 = b'9';
/// Highest first digit of an SSN token's group number (groups 00–49).
const SSN_TOKEN_GROUP_FIRST_MAX: u8 = b'4';
/// The most digits an E.164 country calling code has.
const MAX_COUNTRY_CODE: usize = 3;
/// Random characters in an email token's local part (`[a-z0-9]`).
const EMAIL_LOCAL_RANDOM: usize = 16;
/// The longest domain an email token can keep: with its own local part and
/// the `@`, the token is at most [`MAX_TOKEN_LEN`].
const EMAIL_MAX_KEPT_DOMAIN: usize = MAX_TOKEN_LEN - EMAIL_LOCAL_RANDOM - 1;
const _: () = assert!(EMAIL_MAX_KEPT_DOMAIN == 239, "the refusal's message names 239");
/// Random characters in a tokenized email domain's label.
const EMAIL_DOMAIN_RANDOM: usize = 12;
/// The reserved top-level domain (RFC 2606) of tokenized email domains: a
/// token never routes mail anywhere.
const EMAIL_TOKEN_TLD: &str = "invalid";

/// Lowercase letters and digits, the alphabet of email tokens.
const LOWER_ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const DIGITS: &[u8] = b"0123456789";
const LOWER: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// The Luhn rule of card-shaped tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Luhn {
    /// Tokens pass the Luhn check (for columns that validate it).
    Valid,
    /// Tokens fail the Luhn check: they can never be mistaken for a real
    /// card number.
    Invalid,
    /// Either.
    Any,
}

impl Luhn {
    /// Parses a configuration name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "valid" => Some(Self::Valid),
            "invalid" => Some(Self::Invalid),
            "any" => Some(Self::Any),
            _ => None,
        }
    }
}

/// What a collection's tokens look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// `<prefix>_<22 base64url characters>`: the record's sequence number
    /// and 64 random bits, sealed under the collection's token key by the
    /// vault ([`crate::token::TokenKey`]).
    Random {
        /// The collection's token prefix.
        prefix: TokenPrefix,
    },
    /// Same length; digits stay digits, anything else (separators such as
    /// `-`, spaces, parentheses) stays where it is.
    Digits {
        /// Trailing digits copied from the value.
        keep_last: usize,
        /// Fewest digits a value may have.
        min_len: usize,
        /// A value written `+<country code> …` keeps its E.164 country
        /// calling code (1 to 3 digits).
        keep_country_code: bool,
    },
    /// Same length; each letter or digit is replaced by one of its class
    /// (upper, lower, digit); separators stay.
    Alphanumeric {
        /// Trailing letters and digits copied from the value.
        keep_last: usize,
        /// Fewest letters and digits a value may have.
        min_len: usize,
    },
    /// 12 to 19 digits (grouped by single spaces or dashes as the issuer
    /// prints them, or not at all), optionally keeping the leading and
    /// trailing digits, with a configured Luhn rule.
    Card {
        /// Leading digits copied from the value (the issuer number).
        keep_first: usize,
        /// Trailing digits copied from the value.
        keep_last: usize,
        /// Fewest digits a value may have (12 to 19).
        min_len: usize,
        /// Whether tokens pass, fail or ignore the Luhn check.
        luhn: Luhn,
    },
    /// A US Social Security Number, `AAA-GG-SSSS`, `AAA GG SSSS` or
    /// `AAAGGSSSS`. Tokens keep the writing and use area numbers 900–999
    /// with group numbers 00–49, so no token is a valid SSN (or ITIN).
    Ssn,
    /// A syntactically valid address with a random local part; the domain is
    /// kept or replaced by a random one under `.invalid`.
    Email {
        /// Whether the value's domain is kept.
        keep_domain: bool,
    },
}

/// Why a value does not fit its collection's format. Fixed text only: no
/// part of the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the value does not fit the collection's format ({format}): {reason}")]
pub struct Misfit {
    /// The format's name.
    pub format: &'static str,
    /// What is wrong, in fixed words.
    pub reason: &'static str,
}

/// The character class of one position of a format-preserving value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Digit,
    Lower,
    Upper,
    /// Kept as it is.
    Separator,
}

impl Class {
    fn alphabet(self) -> &'static [u8] {
        match self {
            Self::Digit => DIGITS,
            Self::Lower => LOWER,
            Self::Upper => UPPER,
            Self::Separator => &[],
        }
    }
}

impl Format {
    /// The configuration name of the format.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Random { .. } => "random",
            Self::Digits { .. } => "digits",
            Self::Alphanumeric { .. } => "alphanumeric",
            Self::Card { .. } => "card",
            Self::Ssn => "ssn",
            Self::Email { .. } => "email",
        }
    }

    /// How many tokens the format offers for the shortest value it accepts
    /// (saturating). Compared with [`MIN_TOKEN_SPACE`] at load.
    pub fn token_space(&self) -> u128 {
        self.token_space_at(self.min_slots())
    }

    /// The fewest letters and digits a value of this format has.
    pub fn min_slots(&self) -> usize {
        match *self {
            Self::Random { .. } | Self::Email { .. } => 0,
            Self::Digits { min_len, .. } | Self::Alphanumeric { min_len, .. } | Self::Card { min_len, .. } => min_len,
            Self::Ssn => SSN_DIGITS,
        }
    }

    /// How many tokens the format offers for a value of `slots` letters and
    /// digits (saturating; the worst case where the value's shape matters).
    /// Tokens are counted against it per length while serving.
    pub fn token_space_at(&self, slots: usize) -> u128 {
        let pow =
            |base: u128, exp: usize| u32::try_from(exp).ok().and_then(|e| base.checked_pow(e)).unwrap_or(u128::MAX);
        match *self {
            Self::Random { .. } => u128::MAX,
            Self::Digits { keep_last, keep_country_code, .. } => {
                let kept = keep_last + if keep_country_code { MAX_COUNTRY_CODE } else { 0 };
                pow(10, slots.saturating_sub(kept))
            }
            // The worst case of an alphanumeric value is all digits.
            Self::Alphanumeric { keep_last, .. } => pow(10, slots.saturating_sub(keep_last)),
            Self::Card { keep_first, keep_last, luhn, .. } => {
                let free = slots.saturating_sub(keep_first + keep_last);
                if free == 0 {
                    return 1;
                }
                // Any one free digit can be chosen to satisfy (or break) the
                // check, so exactly a tenth of the completions pass it.
                let all = pow(10, free);
                match luhn {
                    Luhn::Any => all,
                    Luhn::Valid => all / 10,
                    Luhn::Invalid => all / 10 * 9,
                }
            }
            // Area 9xx (100), group 00-49 (50), serial 0000-9999.
            Self::Ssn => 100 * 50 * 10_000,
            Self::Email { keep_domain } => {
                let random = EMAIL_LOCAL_RANDOM + if keep_domain { 0 } else { EMAIL_DOMAIN_RANDOM };
                pow(36, random)
            }
        }
    }

    /// Whether the format's tokens and values have a canonical form other
    /// than their writing (digits, alphanumeric, card, ssn). These are also
    /// the formats whose token space can run out, so their tokens are
    /// counted against it per length.
    pub fn is_canonicalized(&self) -> bool {
        matches!(self, Self::Digits { .. } | Self::Alphanumeric { .. } | Self::Card { .. } | Self::Ssn)
    }

    /// The letters and digits of `text` (a value or a token of this
    /// format): the form a shaped token is stored and looked up under, and
    /// the form a deterministic value is indexed under, so `078-05-1120`
    /// and `078051120` are one SSN. Random and email tokens, and values of
    /// those formats, are their own canonical form.
    pub fn canonical<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        if !self.is_canonicalized() || text.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return std::borrow::Cow::Borrowed(text);
        }
        std::borrow::Cow::Owned(alnum_only(text))
    }

    /// The token whose letters and digits are those of `canonical` (any
    /// writing of it), written in the shape of `shape` (a value of this
    /// format with as many letters and digits): its separators, in their
    /// places. `None` if the counts differ.
    pub fn render(&self, canonical: &str, shape: &str) -> Option<String> {
        if !self.is_canonicalized() {
            return Some(canonical.to_owned());
        }
        let mut chars = canonical.bytes().filter(u8::is_ascii_alphanumeric);
        let mut out = Vec::with_capacity(shape.len());
        for b in shape.bytes() {
            out.push(if b.is_ascii_alphanumeric() { chars.next()? } else { b });
        }
        if chars.next().is_some() {
            return None;
        }
        String::from_utf8(out).ok()
    }

    /// What decides which strings are this format's tokens: the format, and
    /// the prefix of random tokens or the Luhn rule of card tokens. Stored
    /// with the collection; a configuration that changes it is refused,
    /// since the tokens already issued would stop answering.
    pub fn token_kind(&self) -> String {
        match self {
            Self::Random { prefix } => format!("random:{}", prefix.as_str()),
            Self::Ssn => "ssn".to_owned(),
            Self::Card { luhn, .. } => format!(
                "card:{}",
                match luhn {
                    Luhn::Valid => "valid",
                    Luhn::Invalid => "invalid",
                    Luhn::Any => "any",
                }
            ),
            other => other.name().to_owned(),
        }
    }

    /// Whether the format copies the value's shape into its tokens (every
    /// format but `random`).
    pub fn preserves_shape(&self) -> bool {
        !matches!(self, Self::Random { .. })
    }

    /// Checks that `value` fits the format.
    pub fn check_value(&self, value: &str) -> Result<(), Misfit> {
        let misfit = |reason| Misfit { format: self.name(), reason };
        match *self {
            Self::Random { .. } => Ok(()),
            Self::Digits { min_len, .. } => {
                let classes =
                    classify(value, false).ok_or(misfit("only digits, spaces and punctuation are allowed"))?;
                if slots(&classes) < min_len {
                    return Err(misfit("it has fewer digits than the collection's min_len"));
                }
                Ok(())
            }
            Self::Alphanumeric { keep_last: _, min_len } => {
                let classes = classify(value, true)
                    .ok_or(misfit("only ASCII letters, digits, spaces and punctuation are allowed"))?;
                if slots(&classes) < min_len {
                    return Err(misfit("it has fewer letters and digits than the collection's min_len"));
                }
                Ok(())
            }
            Self::Card { min_len, .. } => {
                if !is_card_shaped(value) {
                    return Err(misfit(
                        "a card number is 12 to 19 digits, optionally grouped by single spaces or dashes",
                    ));
                }
                if slots_of(value) < min_len {
                    return Err(misfit("it has fewer digits than the collection's min_len"));
                }
                Ok(())
            }
            Self::Ssn => {
                if !is_ssn_shaped(value) {
                    return Err(misfit("an SSN is 9 digits, written AAA-GG-SSSS, AAA GG SSSS or AAAGGSSSS"));
                }
                Ok(())
            }
            Self::Email { keep_domain } => {
                let Some((_, domain)) = split_email(value) else {
                    return Err(misfit("not an email address of the form local@domain.tld"));
                };
                // The token keeps the domain after a local part of its own:
                // it must still be a token that parses.
                if keep_domain && domain.len() > EMAIL_MAX_KEPT_DOMAIN {
                    return Err(misfit("its domain is too long for a token that keeps it (at most 239 bytes)"));
                }
                Ok(())
            }
        }
    }

    /// Parses `text` as a token of this format. `None` for anything this
    /// format can never have issued.
    pub fn parse_token(&self, text: &str) -> Option<Token> {
        if text.len() > MAX_TOKEN_LEN {
            return None;
        }
        let ok = match self {
            Self::Random { prefix } => {
                return text.parse::<Token>().ok().filter(|t| t.prefix() == prefix.as_str());
            }
            Self::Digits { .. } => classify(text, false).is_some_and(|c| slots(&c) > 0),
            Self::Alphanumeric { .. } => classify(text, true).is_some_and(|c| slots(&c) > 0),
            Self::Ssn => {
                let digits = self.canonical(text);
                is_ssn_shaped(text)
                    && digits.as_bytes()[0] == SSN_TOKEN_AREA_FIRST
                    && digits.as_bytes()[3] <= SSN_TOKEN_GROUP_FIRST_MAX
            }
            Self::Card { luhn, .. } => {
                is_card_shaped(text)
                    && match luhn {
                        Luhn::Valid => luhn_valid(text),
                        Luhn::Invalid => !luhn_valid(text),
                        Luhn::Any => true,
                    }
            }
            Self::Email { .. } => split_email(text).is_some(),
        };
        ok.then(|| Token::preserved(text.to_owned()))
    }
}

/// Classes of each character of a format-preserving value, or `None` if a
/// character is not allowed (non-ASCII, control; letters unless `letters`).
fn classify(value: &str, letters: bool) -> Option<Vec<Class>> {
    value
        .bytes()
        .map(|b| match b {
            b'0'..=b'9' => Some(Class::Digit),
            b'a'..=b'z' if letters => Some(Class::Lower),
            b'A'..=b'Z' if letters => Some(Class::Upper),
            b' ' => Some(Class::Separator),
            _ if b.is_ascii_punctuation() => Some(Class::Separator),
            _ => None,
        })
        .collect()
}

fn slots(classes: &[Class]) -> usize {
    classes.iter().filter(|c| **c != Class::Separator).count()
}

/// The ASCII letters and digits of `text`, in order: the canonical form of
/// a shaped token.
pub fn alnum_only(text: &str) -> String {
    text.chars().filter(char::is_ascii_alphanumeric).collect()
}

/// The letters and digits in `text`: a shaped value's length as far as
/// its token space goes.
pub fn slots_of(text: &str) -> usize {
    text.bytes().filter(u8::is_ascii_alphanumeric).count()
}

/// 12 to 19 digits, grouped by single spaces or dashes if at all (any
/// grouping: 4-4-4-4, Amex 4-6-5, Diners 4-6-4, 4-4-4-4-3).
fn is_card_shaped(value: &str) -> bool {
    let digits = value.bytes().filter(u8::is_ascii_digit).count();
    CARD_DIGITS.contains(&digits)
        && value.bytes().all(|b| b.is_ascii_digit() || b == b' ' || b == b'-')
        && value.bytes().next().is_some_and(|b| b.is_ascii_digit())
        && value.bytes().last().is_some_and(|b| b.is_ascii_digit())
        && !value.as_bytes().windows(2).any(|w| !w[0].is_ascii_digit() && !w[1].is_ascii_digit())
}

/// `AAAGGSSSS`, `AAA-GG-SSSS` or `AAA GG SSSS`.
fn is_ssn_shaped(value: &str) -> bool {
    let b = value.as_bytes();
    match b.len() {
        9 => b.iter().all(u8::is_ascii_digit),
        11 => {
            let sep = b[3];
            (sep == b'-' || sep == b' ')
                && b[6] == sep
                && b.iter().enumerate().all(|(i, c)| i == 3 || i == 6 || c.is_ascii_digit())
        }
        _ => false,
    }
}

/// The number of digits of the E.164 country calling code of a value
/// written `+<code>…` (0 without a leading `+`). Codes are prefix-free:
/// 1 and 7 have one digit; the two-digit codes are listed; every other
/// code has three (ITU-T E.164 assignments).
fn country_code_len(value: &str) -> usize {
    const TWO_DIGIT: &[&[u8; 2]] = &[
        b"20", b"27", b"30", b"31", b"32", b"33", b"34", b"36", b"39", b"40", b"41", b"43", b"44", b"45", b"46", b"47",
        b"48", b"49", b"51", b"52", b"53", b"54", b"55", b"56", b"57", b"58", b"60", b"61", b"62", b"63", b"64", b"65",
        b"66", b"81", b"82", b"84", b"86", b"90", b"91", b"92", b"93", b"94", b"95", b"98",
    ];
    let Some(rest) = value.strip_prefix('+') else { return 0 };
    let digits: Vec<u8> = rest.bytes().filter(u8::is_ascii_digit).take(2).collect();
    match digits.as_slice() {
        [b'1' | b'7', ..] => 1,
        [a, b] if TWO_DIGIT.contains(&&[*a, *b]) => 2,
        _ => MAX_COUNTRY_CODE,
    }
}

/// Whether the digits of `text` pass the Luhn check.
pub fn luhn_valid(text: &str) -> bool {
    luhn_digits_valid(text.as_bytes())
}

/// Whether the ASCII digits among `text` pass the Luhn check.
fn luhn_digits_valid(text: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in text.iter().rev().filter(|b| b.is_ascii_digit()).map(|b| u32::from(b - b'0')).enumerate() {
        sum += if i % 2 == 1 {
            let doubled = d * 2;
            if doubled > 9 { doubled - 9 } else { doubled }
        } else {
            d
        };
    }
    sum.is_multiple_of(10)
}

/// `(local, domain)` of a syntactically valid address: a local part of 1 to
/// 64 bytes without spaces, controls, `@` or the characters RFC 5322 only
/// allows quoted; a domain of at least two dot-separated labels of letters,
/// digits and inner hyphens (internationalized letters allowed), at most
/// 253 bytes.
fn split_email(value: &str) -> Option<(&str, &str)> {
    let (local, domain) = value.split_once('@')?;
    let local_ok = (1..=64).contains(&local.len())
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local.chars().all(|c| !c.is_whitespace() && !c.is_control() && !"@\"(),:;<>[]\\".contains(c));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = domain.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_alphanumeric() || c == '-')
        });
    (local_ok && domain_ok).then_some((local, domain))
}

/// Value normalization, applied before a value is tokenized, indexed and
/// stored: the vault stores the normalized value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Normalize {
    /// Strip leading and trailing whitespace.
    pub trim: bool,
    /// Change letter case (Unicode).
    pub case: Option<Case>,
    /// Drop everything but ASCII digits.
    pub digits_only: bool,
}

/// A letter-case normalization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    /// `Alice@Example.ORG` → `alice@example.org`.
    Lower,
    /// `ab123` → `AB123`.
    Upper,
}

impl Normalize {
    /// Parses the configuration's list of steps (`trim`, `lowercase`,
    /// `uppercase`, `digits_only`).
    pub fn parse<'a>(steps: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut out = Self::default();
        for step in steps {
            match step {
                "trim" => out.trim = true,
                "digits_only" => out.digits_only = true,
                "lowercase" | "uppercase" => {
                    let case = if step == "lowercase" { Case::Lower } else { Case::Upper };
                    if out.case.is_some_and(|c| c != case) {
                        return Err("lowercase and uppercase contradict each other".to_owned());
                    }
                    out.case = Some(case);
                }
                other => {
                    return Err(format!("unknown step {other:?}; expected trim, lowercase, uppercase or digits_only"));
                }
            }
        }
        Ok(out)
    }

    /// Whether any step is configured.
    pub fn is_identity(&self) -> bool {
        *self == Self::default()
    }

    /// The normalized value (the input is zeroized as it drops).
    pub fn apply(&self, value: PiiValue) -> PiiValue {
        if self.is_identity() {
            return value;
        }
        let mut text = value.expose_secret();
        if self.trim {
            text = text.trim();
        }
        let mut out: String =
            if self.digits_only { text.chars().filter(char::is_ascii_digit).collect() } else { text.to_owned() };
        match self.case {
            Some(Case::Lower) => out = replace_zeroizing(out, str::to_lowercase),
            Some(Case::Upper) => out = replace_zeroizing(out, str::to_uppercase),
            None => {}
        }
        PiiValue::new(out)
    }
}

fn replace_zeroizing(old: String, f: impl FnOnce(&str) -> String) -> String {
    let new = f(&old);
    zeroize::Zeroize::zeroize(&mut zeroize::Zeroizing::new(old));
    new
}

/// Letters and digits that stay hidden at the least: a rule that would
/// leave fewer hidden masks the whole value instead.
pub const MASK_MIN_HIDDEN: usize = 4;
/// Fewest characters in an email's local part for its first letter to be
/// shown.
const MASK_EMAIL_MIN_LOCAL: usize = 3;

/// What a masked reveal (`detokenize_masked`) shows of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mask {
    /// Every letter and digit becomes `*`; separators stay.
    Full,
    /// The first `first` and last `last` letters and digits stay, the rest
    /// become `*`, separators stay: `4111 1111 1111 1111` with `last = 4` →
    /// `**** **** **** 1111`. If fewer than [`MASK_MIN_HIDDEN`] would stay
    /// hidden, everything is masked.
    Keep {
        /// Leading letters and digits shown.
        first: usize,
        /// Trailing letters and digits shown.
        last: usize,
    },
    /// The first letter of the local part and the domain:
    /// `jane@example.org` → `j***@example.org`. A value that is not an
    /// address is masked fully.
    Email,
}

impl Mask {
    /// The default of a format: the email rule for emails, the last four
    /// otherwise.
    pub fn default_for(format: &Format) -> Self {
        match format {
            Format::Email { .. } => Self::Email,
            _ => Self::Keep { first: 0, last: 4 },
        }
    }

    /// Parses `full`, `email`, `last:N`, `first:N` or `first:N,last:M`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "full" => return Some(Self::Full),
            "email" => return Some(Self::Email),
            _ => {}
        }
        let (mut first, mut last) = (None, None);
        for part in text.split(',') {
            let (name, n) = part.trim().split_once(':')?;
            let n: usize = n.trim().parse().ok().filter(|n| *n <= MAX_TOKEN_LEN)?;
            let slot = match name.trim() {
                "first" => &mut first,
                "last" => &mut last,
                _ => return None,
            };
            if slot.replace(n).is_some() {
                return None;
            }
        }
        Some(Self::Keep { first: first.unwrap_or(0), last: last.unwrap_or(0) })
    }

    /// The masked value.
    pub fn apply(&self, value: &PiiValue) -> PiiValue {
        let text = value.expose_secret();
        PiiValue::new(match *self {
            Self::Full => mask_alnum(text, 0, 0),
            Self::Keep { first, last } => mask_alnum(text, first, last),
            Self::Email => match text.rsplit_once('@') {
                Some((local, domain)) if !local.is_empty() && !domain.is_empty() => {
                    let mut out = String::with_capacity(domain.len() + 5);
                    match local.chars().next() {
                        Some(c) if local.chars().count() >= MASK_EMAIL_MIN_LOCAL && c.is_alphanumeric() => out.push(c),
                        _ => out.push('*'),
                    }
                    out.push_str("***@");
                    out.push_str(domain);
                    out
                }
                _ => mask_alnum(text, 0, 0),
            },
        })
    }
}

impl fmt::Display for Mask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full => f.write_str("full"),
            Self::Email => f.write_str("email"),
            Self::Keep { first, last } => write!(f, "first:{first},last:{last}"),
        }
    }
}

/// Every letter and digit of `text` becomes `*`, except the first `first`
/// and last `last` when at least [`MASK_MIN_HIDDEN`] stay hidden.
fn mask_alnum(text: &str, first: usize, last: usize) -> String {
    let alnum = text.chars().filter(|c| c.is_alphanumeric()).count();
    let (first, last) = if alnum >= first + last + MASK_MIN_HIDDEN { (first, last) } else { (0, 0) };
    let mut seen = 0;
    text.chars()
        .map(|c| {
            if !c.is_alphanumeric() {
                return c;
            }
            seen += 1;
            if seen <= first || seen > alnum - last { c } else { '*' }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use proptest::prelude::*;

    use super::*;
    use crate::token::TokenKey;

    fn digits(keep_last: usize) -> Format {
        Format::Digits { keep_last, min_len: keep_last + 6, keep_country_code: false }
    }

    fn card(keep_first: usize, keep_last: usize, luhn: Luhn) -> Format {
        Format::Card { keep_first, keep_last, min_len: 12, luhn }
    }

    /// A token of `value` under a fixed key, for the next number (every
    /// call takes another, as records do).
    fn token(format: &Format, value: &str) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        format.check_value(value).unwrap();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let key = TokenKey::new(&[7; 32]).unwrap();
        let token = format.shaped_token(&key, value, n).unwrap().into_string();
        assert_eq!(format.shaped_numbers(&key, &token), vec![n], "{token} reads back");
        token
    }

    /// Position by position: separators equal, letters and digits of the
    /// same class.
    fn same_shape(value: &str, token: &str) -> bool {
        value.len() == token.len()
            && value.bytes().zip(token.bytes()).all(|(v, t)| match v {
                b'0'..=b'9' => t.is_ascii_digit(),
                b'a'..=b'z' => t.is_ascii_lowercase(),
                b'A'..=b'Z' => t.is_ascii_uppercase(),
                _ => v == t,
            })
    }

    /// An email token keeps the domain after a local part of its own, so a
    /// long domain with a short local part made a token longer than any
    /// token can be, which never parsed back (found by the `token_parse`
    /// fuzz target): such a value is refused before anything is stored.
    #[test]
    fn an_email_whose_token_would_not_fit_is_refused() {
        let keep = Format::Email { keep_domain: true };
        // A domain of `len` bytes in labels DNS allows (at most 63 each).
        let domain = |len: usize| {
            let mut rest = len - "org".len();
            let mut labels = Vec::new();
            while rest > 51 {
                labels.push("d".repeat(50));
                rest -= 51;
            }
            labels.push("e".repeat(rest - 1));
            labels.push("org".to_owned());
            let domain = labels.join(".");
            assert_eq!(domain.len(), len);
            domain
        };
        let longest = format!("a@{}", domain(EMAIL_MAX_KEPT_DOMAIN));
        let made = token(&keep, &longest);
        assert_eq!(made.len(), MAX_TOKEN_LEN);
        assert!(keep.parse_token(&made).is_some());
        let too_long = format!("a@{}", domain(EMAIL_MAX_KEPT_DOMAIN + 1));
        assert_eq!(
            keep.check_value(&too_long).unwrap_err().reason,
            "its domain is too long for a token that keeps it (at most 239 bytes)"
        );
        let key = TokenKey::new(&[7; 32]).unwrap();
        assert!(keep.shaped_token(&key, &too_long, 1).is_none(), "never a token that does not parse");
        // Without the domain, the token's length does not depend on it.
        token(&Format::Email { keep_domain: false }, &too_long);
    }

    fn alnum_positions(text: &str) -> Vec<usize> {
        text.char_indices().filter(|(_, c)| c.is_alphanumeric()).map(|(i, _)| i).collect()
    }

    #[test]
    fn luhn_known_answers() {
        for valid in ["4111 1111 1111 1111", "5500-0000-0000-0004", "4000056655665556", "79927398713"] {
            assert!(luhn_valid(valid), "{valid}");
        }
        for invalid in ["4111 1111 1111 1112", "79927398710", "1234567812345678"] {
            assert!(!luhn_valid(invalid), "{invalid}");
        }
    }

    #[test]
    fn token_spaces() {
        assert_eq!(digits(0).token_space(), 1_000_000);
        assert_eq!(Format::Digits { keep_last: 4, min_len: 9, keep_country_code: false }.token_space(), 100_000);
        // A country code may keep up to three digits.
        assert_eq!(Format::Digits { keep_last: 0, min_len: 9, keep_country_code: true }.token_space(), 1_000_000);
        // Counted at the shortest card number, 12 digits.
        assert_eq!(card(0, 4, Luhn::Any).token_space(), 10u128.pow(8));
        assert_eq!(card(0, 4, Luhn::Invalid).token_space(), 9 * 10u128.pow(7));
        assert_eq!(card(0, 4, Luhn::Invalid).token_space_at(16), 9 * 10u128.pow(11));
        assert_eq!(card(0, 4, Luhn::Invalid).token_space_at(15), 9 * 10u128.pow(10));
        // The issuer number and the last four leave six free digits of a
        // 16-digit number, one of which the Luhn rule constrains: too few.
        assert_eq!(card(6, 4, Luhn::Valid).token_space_at(16), 100_000);
        assert_eq!(card(6, 4, Luhn::Invalid).token_space_at(16), 900_000);
        assert_eq!(card(6, 4, Luhn::Invalid).token_space(), 90);
        assert_eq!(card(8, 8, Luhn::Any).token_space(), 1);
        assert_eq!(Format::Ssn.token_space(), 50_000_000);
        assert_eq!(Format::Email { keep_domain: true }.token_space(), 36u128.pow(16));
    }

    #[test]
    fn values_that_do_not_fit_are_refused_without_echoing_them() {
        let cases: [(Format, &str); 14] = [
            (digits(0), "12345a"),
            (digits(0), "12345"),
            (Format::Alphanumeric { keep_last: 0, min_len: 6 }, "Zoë123456"),
            (card(0, 4, Luhn::Invalid), "4111 1111 111"),
            (card(0, 4, Luhn::Invalid), "4111 1111 1111 1111 1111"),
            (card(0, 4, Luhn::Invalid), "4111_1111_1111_1111"),
            (card(0, 4, Luhn::Invalid), "4111  1111 1111 1111"),
            (card(0, 4, Luhn::Invalid), " 4111 1111 1111 1111"),
            (Format::Card { keep_first: 0, keep_last: 4, min_len: 15, luhn: Luhn::Invalid }, "30569309025904"),
            (Format::Ssn, "078-05-112"),
            (Format::Ssn, "078-051120"),
            (Format::Ssn, "078 05-1120"),
            (Format::Email { keep_domain: true }, "jane.example.org"),
            (Format::Email { keep_domain: true }, "jane@localhost"),
        ];
        for (format, value) in cases {
            let err = format.check_value(value).unwrap_err().to_string();
            assert!(err.starts_with(&format!("the value does not fit the collection's format ({})", format.name())));
            assert!(!err.contains(value), "{err}");
        }
    }

    #[test]
    fn examples() {
        let t = token(&card(0, 4, Luhn::Invalid), "4111 1111 1111 1111");
        assert!(t.ends_with(" 1111") && same_shape("4111 1111 1111 1111", &t) && !luhn_valid(&t), "{t}");
        let t = token(&card(6, 0, Luhn::Valid), "5500-0000-0000-0004");
        assert!(t.starts_with("5500-00") && luhn_valid(&t), "{t}");
        let t = token(&digits(0), "078-05-1120");
        assert!(same_shape("078-05-1120", &t), "{t}");
        let t = token(&Format::Email { keep_domain: true }, "jane@example.org");
        assert!(t.ends_with("@example.org") && t.len() == 16 + 12, "{t}");
        let t = token(&Format::Email { keep_domain: false }, "jane@example.org");
        assert!(t.ends_with(".invalid") && split_email(&t).is_some(), "{t}");
        let t = token(&Format::Alphanumeric { keep_last: 2, min_len: 8 }, "AB-123456-cd");
        assert!(same_shape("AB-123456-cd", &t) && t.ends_with("cd"), "{t}");
    }

    /// Public test card numbers (the networks' and payment processors'
    /// documented test values), one of each length and grouping issuers
    /// print.
    const TEST_CARDS: [&str; 14] = [
        "4222222222222",           // Visa, 13 digits
        "4111111111111111",        // Visa, 16
        "4242 4242 4242 4242",     // Visa, 4-4-4-4
        "5555555555554444",        // Mastercard
        "2223003122003222",        // Mastercard 2-series
        "378282246310005",         // American Express, 15
        "3782 822463 10005",       // American Express, 4-6-5
        "371449635398431",         // American Express
        "30569309025904",          // Diners Club, 14
        "3056 930902 5904",        // Diners Club, 4-6-4
        "6011111111111117",        // Discover
        "3566002020360505",        // JCB
        "6205500000000000004",     // UnionPay, 19
        "6205 5000 0000 0000 004", // UnionPay, 4-4-4-4-3
    ];

    #[test]
    fn every_card_length_and_grouping() {
        for value in TEST_CARDS {
            assert!(luhn_valid(value), "{value} is a Luhn-valid test number");
            for format in [card(0, 4, Luhn::Invalid), card(6, 0, Luhn::Valid), card(0, 0, Luhn::Any)] {
                let t = token(&format, value);
                assert!(same_shape(value, &t), "{value} -> {t}");
                assert_ne!(t, value);
                assert_eq!(format.parse_token(&t).unwrap().as_str(), t);
                assert_eq!(format.render(&format.canonical(&t), value).unwrap(), t);
            }
            let t = token(&card(0, 4, Luhn::Invalid), value);
            assert!(!luhn_valid(&t) && t.ends_with(&value[value.len() - 4..]), "{t}");
            let t = token(&card(6, 0, Luhn::Valid), value);
            assert!(luhn_valid(&t) && t[..6] == value[..6], "{t}");
        }
        // An 8-digit issuer number: first 8 and last 4 kept leave 7 free
        // digits of a 19-digit number.
        let bin8 = Format::Card { keep_first: 8, keep_last: 4, min_len: 19, luhn: Luhn::Invalid };
        let t = token(&bin8, "6205500000000000004");
        assert!(t.starts_with("62055000") && t.ends_with("0004") && !luhn_valid(&t), "{t}");
        assert_eq!(bin8.token_space(), 9_000_000);
        // min_len refuses shorter numbers.
        let long = Format::Card { keep_first: 0, keep_last: 4, min_len: 15, luhn: Luhn::Invalid };
        assert!(long.check_value("378282246310005").is_ok());
        assert!(long.check_value("30569309025904").is_err());
    }

    #[test]
    fn ssn_tokens_are_never_valid_ssns_or_itins() {
        for value in ["078-05-1120", "078 05 1120", "078051120", "219-09-9999", "912-70-1234"] {
            Format::Ssn.check_value(value).unwrap();
            for _ in 0..200 {
                let t = token(&Format::Ssn, value);
                assert!(same_shape(value, &t), "{value} -> {t}");
                let d = alnum_only(&t);
                // Area 900-999: never issued as an SSN; group 00-49:
                // outside the ITIN ranges.
                assert_eq!(&d[..1], "9", "{t}");
                assert!(d.as_bytes()[3] <= b'4', "{t}");
                assert_eq!(Format::Ssn.parse_token(&t).unwrap().as_str(), t);
            }
        }
        // A real-looking SSN or ITIN is never taken for a token.
        for real in ["078-05-1120", "219099999", "912-70-1234", "900-50-0000", "666-12-3456"] {
            assert!(Format::Ssn.parse_token(real).is_none(), "{real}");
        }
        assert!(Format::Ssn.parse_token("900-49-0000").is_some());
    }

    #[test]
    fn phone_tokens_keep_the_country_code() {
        let phone = Format::Digits { keep_last: 0, min_len: 9, keep_country_code: true };
        for (value, kept) in [
            ("+1 (202) 555-0143", "+1 ("),
            ("+44 20 7946 0958", "+44 "),
            ("+353 1 234 5678", "+353 "),
            ("+79161234567", "+7"),
            ("+4915123456789", "+49"),
            ("+8613812345678", "+86"),
            ("+97212345678", "+972"),
        ] {
            for _ in 0..50 {
                let t = token(&phone, value);
                assert!(t.starts_with(kept) && same_shape(value, &t), "{value} -> {t}");
                assert_ne!(t, value);
            }
        }
        // Without a leading +, nothing is known to be a country code.
        assert_eq!(country_code_len("44 20 7946 0958"), 0);
        assert_eq!(country_code_len("+1"), 1);
        assert_eq!(country_code_len("+"), 3);
    }

    #[test]
    fn canonical_forms_and_rendering() {
        let c = card(0, 4, Luhn::Invalid);
        assert_eq!(c.canonical("9674 4677 4499 0004"), "9674467744990004");
        assert_eq!(c.canonical("9674467744990004"), "9674467744990004");
        assert_eq!(c.render("9674467744990004", "4111-1111-1111-0004").unwrap(), "9674-4677-4499-0004");
        assert_eq!(c.render("378282246310005", "3782 822463 10005").unwrap(), "3782 822463 10005");
        assert_eq!(c.render("9674467744990004", "4111 1111 1111 111"), None);
        assert_eq!(c.render("96744677449900041", "4111 1111 1111 1111"), None);
        assert_eq!(Format::Ssn.canonical("078-05-1120"), "078051120");
        assert_eq!(Format::Ssn.render("962492504", "078 05 1120").unwrap(), "962 49 2504");
        assert_eq!(digits(0).canonical("+1 (202) 555-0143"), "12025550143");
        let email = Format::Email { keep_domain: true };
        assert_eq!(email.canonical("a.b-c@example.org"), "a.b-c@example.org");
        assert_eq!(email.render("x@example.org", "anything").unwrap(), "x@example.org");
        let random = Format::Random { prefix: "name".parse().unwrap() };
        assert_eq!(random.canonical("name_a-b_c"), "name_a-b_c");
    }

    #[test]
    fn token_spaces_per_length() {
        let c = card(0, 4, Luhn::Invalid);
        assert_eq!(c.token_space_at(12), 9 * 10u128.pow(7));
        assert_eq!(c.token_space_at(19), 9 * 10u128.pow(14));
        assert!(c.is_canonicalized() && digits(0).is_canonicalized() && Format::Ssn.is_canonicalized());
        assert!(!Format::Email { keep_domain: true }.is_canonicalized());
        assert_eq!(slots_of("3782 822463 10005"), 15);
    }

    #[test]
    fn tokens_parse_as_their_format_only() {
        let c = card(0, 4, Luhn::Invalid);
        let t = token(&c, "4111111111111111");
        assert_eq!(c.parse_token(&t).unwrap().as_str(), t);
        assert!(c.parse_token("4111111111111111").is_none(), "a Luhn-valid number is never an invalid-rule token");
        assert!(c.parse_token("card_AAAAAAAAAAAAAAAAAAAAAA").is_none());
        assert!(digits(0).parse_token("--").is_none());
        assert!(digits(0).parse_token(&"1".repeat(MAX_TOKEN_LEN + 1)).is_none());
        let random = Format::Random { prefix: "name".parse().unwrap() };
        assert!(random.parse_token("4111111111111111").is_none());
        assert!(random.parse_token("name_AAAAAAAAAAAAAAAAAAAAAA").is_some());
        assert!(random.parse_token("card_AAAAAAAAAAAAAAAAAAAAAA").is_none());
    }

    #[test]
    fn normalization() {
        let apply = |n: &Normalize, v: &str| n.apply(PiiValue::from(v)).expose_secret().to_owned();
        let email = Normalize::parse(["trim", "lowercase"]).unwrap();
        assert_eq!(apply(&email, "  Jane.Doe@Example.ORG "), "jane.doe@example.org");
        assert_eq!(apply(&Normalize::parse(["digits_only"]).unwrap(), "078-05-1120"), "078051120");
        assert_eq!(apply(&Normalize::parse(["uppercase"]).unwrap(), "ab12cd"), "AB12CD");
        assert_eq!(apply(&Normalize::default(), " As Is "), " As Is ");
        assert_eq!(
            Normalize::parse(["lowercase", "uppercase"]).unwrap_err(),
            "lowercase and uppercase contradict each other"
        );
        assert!(Normalize::parse(["nfc"]).unwrap_err().starts_with("unknown step \"nfc\""));
    }

    #[test]
    fn masks() {
        let apply = |m: Mask, v: &str| m.apply(&PiiValue::from(v)).expose_secret().to_owned();
        let last4 = Mask::Keep { first: 0, last: 4 };
        assert_eq!(apply(last4, "4111 1111 1111 1111"), "**** **** **** 1111");
        assert_eq!(apply(last4, "078-05-1120"), "***-**-1120");
        assert_eq!(apply(last4, "1234567"), "*******");
        assert_eq!(apply(Mask::Keep { first: 6, last: 4 }, "4111111111111111"), "411111******1111");
        assert_eq!(apply(Mask::Full, "Zoë Ångström"), "*** ********");
        assert_eq!(apply(Mask::Email, "jane@example.org"), "j***@example.org");
        assert_eq!(apply(Mask::Email, "jo@example.org"), "****@example.org");
        assert_eq!(apply(Mask::Email, "not an address"), "*** ** *******");
        assert_eq!(Mask::parse("first:6,last:4"), Some(Mask::Keep { first: 6, last: 4 }));
        assert_eq!(Mask::parse("last:4"), Some(Mask::Keep { first: 0, last: 4 }));
        for bad in ["", "last", "last:x", "last:4,last:2", "middle:3", "none"] {
            assert_eq!(Mask::parse(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn digits_tokens_keep_shape(value in "[0-9]{6,20}|[0-9 ()+-]{0,4}[0-9]{6,12}[0-9 -]{0,6}", keep in 0usize..4) {
            let format = digits(keep);
            prop_assume!(format.check_value(&value).is_ok());
            let t = token(&format, &value);
            prop_assert!(same_shape(&value, &t));
            prop_assert_ne!(&t, &value);
            let v: Vec<u8> = value.bytes().filter(u8::is_ascii_digit).collect();
            let k: Vec<u8> = t.bytes().filter(u8::is_ascii_digit).collect();
            prop_assert_eq!(&v[v.len() - keep..], &k[k.len() - keep..]);
            prop_assert!(format.parse_token(&t).is_some());
        }

        #[test]
        fn alphanumeric_tokens_keep_each_class(value in "[A-Za-z0-9]{8,30}([ ._-][A-Za-z0-9]{1,5})?", keep in 0usize..3) {
            let format = Format::Alphanumeric { keep_last: keep, min_len: keep + 6 };
            let t = token(&format, &value);
            prop_assert!(same_shape(&value, &t));
            prop_assert_ne!(&t, &value);
            prop_assert_eq!(&value[value.len() - keep..], &t[t.len() - keep..]);
        }

        #[test]
        fn card_tokens_honour_kept_digits_and_luhn(
            body in "[0-9]{12,19}",
            grouping in 0usize..4,
            keep_first in prop_oneof![Just(0usize), Just(6)],
            keep_last in prop_oneof![Just(0usize), Just(4)],
            luhn in prop_oneof![Just(Luhn::Valid), Just(Luhn::Invalid), Just(Luhn::Any)],
        ) {
            let format = card(keep_first, keep_last, luhn);
            // A configuration this small is refused at load.
            prop_assume!(format.token_space_at(body.len()) >= MIN_TOKEN_SPACE);
            // Ungrouped, 4-4-4-4(-3) with spaces, 4-6-rest (Amex, Diners)
            // with spaces, or 4-4-... with dashes.
            let groups = |sizes: &[usize], sep: &str| {
                let mut rest = body.as_str();
                let mut parts = Vec::new();
                for &n in sizes.iter().chain(std::iter::repeat(&4)) {
                    if rest.is_empty() { break; }
                    let (a, b) = rest.split_at(n.min(rest.len()));
                    parts.push(a);
                    rest = b;
                }
                parts.join(sep)
            };
            let value = match grouping {
                0 => body.clone(),
                1 => groups(&[4], " "),
                2 => groups(&[4, 6, 9], " "),
                _ => groups(&[4], "-"),
            };
            let t = token(&format, &value);
            prop_assert!(same_shape(&value, &t));
            prop_assert_ne!(&t, &value);
            let v: String = value.chars().filter(char::is_ascii_digit).collect();
            let k: String = t.chars().filter(char::is_ascii_digit).collect();
            prop_assert_eq!(&v[..keep_first], &k[..keep_first]);
            prop_assert_eq!(&v[v.len() - keep_last..], &k[k.len() - keep_last..]);
            match luhn {
                Luhn::Valid => prop_assert!(luhn_valid(&t)),
                Luhn::Invalid => prop_assert!(!luhn_valid(&t)),
                Luhn::Any => {}
            }
            prop_assert_eq!(format.parse_token(&t).map(Token::into_string), Some(t.clone()));
            // Any writing of the token's digits is the same token.
            prop_assert_eq!(format.render(&format.canonical(&t), &body).unwrap(), k.clone());
            prop_assert_eq!(format.canonical(&t), k.as_str());
        }

        #[test]
        fn ssn_tokens_keep_the_writing(area in "[0-9]{3}", group in "[0-9]{2}", serial in "[0-9]{4}", sep in prop_oneof![Just(""), Just("-"), Just(" ")]) {
            let value = format!("{area}{sep}{group}{sep}{serial}");
            let t = token(&Format::Ssn, &value);
            prop_assert!(same_shape(&value, &t));
            prop_assert_ne!(&t, &value);
            prop_assert_eq!(Format::Ssn.parse_token(&t).map(Token::into_string), Some(t.clone()));
            prop_assert!(Format::Ssn.parse_token(&value).is_none() || value.starts_with('9'));
        }

        #[test]
        fn email_tokens_are_addresses(local in "[a-zA-Z0-9._%+-]{1,20}", domain in "[a-z0-9]{1,10}\\.[a-z]{2,6}", keep_domain in any::<bool>()) {
            let value = format!("{local}@{domain}");
            prop_assume!(split_email(&value).is_some());
            let format = Format::Email { keep_domain };
            let t = token(&format, &value);
            let (tl, td) = split_email(&t).unwrap();
            prop_assert_eq!(tl.len(), EMAIL_LOCAL_RANDOM);
            prop_assert!(tl.bytes().all(|b| LOWER_ALNUM.contains(&b)));
            if keep_domain {
                prop_assert_eq!(td, domain.as_str());
            } else {
                prop_assert!(td.ends_with(".invalid"));
            }
            prop_assert_ne!(&t, &value);
            prop_assert!(format.parse_token(&t).is_some());
        }

        #[test]
        fn masks_never_reveal_more_than_their_rule(value in "\\PC{0,40}", first in 0usize..7, last in 0usize..7) {
            let rule = Mask::Keep { first, last };
            let masked = rule.apply(&PiiValue::from(value.as_str()));
            let masked = masked.expose_secret();
            prop_assert_eq!(masked.chars().count(), value.chars().count());
            let alnum = alnum_positions(&value).len();
            let mut shown = 0;
            for (v, m) in value.chars().zip(masked.chars()) {
                if v.is_alphanumeric() {
                    prop_assert!(m == '*' || m == v);
                    shown += usize::from(m != '*');
                } else {
                    prop_assert_eq!(m, v);
                }
            }
            prop_assert!(shown <= first + last);
            prop_assert!(shown == 0 || alnum - shown >= MASK_MIN_HIDDEN);
            let full = Mask::Full.apply(&PiiValue::from(value.as_str()));
            prop_assert!(full.expose_secret().chars().all(|c| !c.is_alphanumeric()));
        }

        #[test]
        fn email_mask_shows_at_most_one_letter_and_the_domain(local in "\\PC{1,20}", domain in "[a-z]{1,10}\\.[a-z]{2,4}") {
            let value = format!("{local}@{domain}");
            let masked = Mask::Email.apply(&PiiValue::from(value.as_str()));
            let (shown_local, shown_domain) = masked.expose_secret().rsplit_once('@').unwrap();
            prop_assert_eq!(shown_domain, domain.as_str());
            prop_assert_eq!(shown_local.chars().count(), 4);
            prop_assert!(shown_local.chars().skip(1).all(|c| c == '*'));
        }

        #[test]
        fn parsing_tokens_never_panics(text in "\\PC{0,300}") {
            for format in [digits(0), card(0, 4, Luhn::Invalid), Format::Email { keep_domain: true }] {
                let _ = format.parse_token(&text);
                let _ = format.check_value(&text);
            }
        }
    }
}
