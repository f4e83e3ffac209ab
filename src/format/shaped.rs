//! Shaped tokens that locate their records (../shared/DESIGN.md §4).
//!
//! A shaped token is its value's shape with the *free* positions (those the
//! format does not keep) filled in from a number: the record's number in
//! its shape's sequence. The value gives the template (separators, kept
//! characters, which class each free position is); the number, permuted by
//! FF1 under the collection's token key over the template's domain, gives
//! the free characters. The domain is the product of the free positions'
//! alphabets (a mixed-radix number, most significant position first); a
//! card's Luhn rule is met by fixing its last free digit after the
//! permutation (tokens that pass: the one digit that passes; tokens that
//! fail: one of the nine that fail, which is one more radix-9 numeral of
//! the domain).
//!
//! Reading a token back is the same in reverse: its template (from the
//! token itself: kept characters and separators are where the value had
//! them), its free characters as a number, that number un-permuted. The
//! store then compares the whole token with the record's, so a token that
//! was never issued opens to nothing.
//!
//! The FF1 tweak names the format and the shape: the number of letters and
//! digits, and the alphabet of every free position. Nothing here sees a
//! value beyond its shape, or logs.

use num_bigint::BigUint;

use super::{
    Class, DIGITS, EMAIL_DOMAIN_RANDOM, EMAIL_LOCAL_RANDOM, EMAIL_TOKEN_TLD, Format, LOWER_ALNUM, Luhn,
    MIN_TOKEN_SPACE, SSN_TOKEN_AREA_FIRST, classify, country_code_len, is_ssn_shaped, luhn_digits_valid, split_email,
};
use crate::token::{Token, TokenKey};

/// Bits of a record's sequence number below its shape: a shaped record's
/// place in its collection is `shape << SHAPE_BITS | number`, so each shape
/// numbers its records from 1 without meeting another's.
pub const SHAPE_BITS: u32 = 48;
/// Numbers a shape may hand out (below 2^48).
pub const MAX_SHAPE_NUMBER: u64 = (1 << SHAPE_BITS) - 1;

/// The group digits of SSN tokens: 0 to 4 (groups 00–49).
const SSN_GROUP_FIRST: &[u8] = b"01234";
/// Tags the FF1 tweak of this scheme.
const TWEAK_LABEL: &[u8] = b"piivault shaped token v1";

/// The record place of number `n` of `shape`.
pub fn record_seq(shape: u32, n: u64) -> u64 {
    (u64::from(shape) << SHAPE_BITS) | (n & MAX_SHAPE_NUMBER)
}

/// `(shape, number)` of a record place.
pub fn split_seq(seq: u64) -> (u32, u64) {
    (u32::try_from(seq >> SHAPE_BITS).unwrap_or(u32::MAX), seq & MAX_SHAPE_NUMBER)
}

/// One position of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Copied as it is: a separator, a kept character, a fixed digit.
    Fixed(u8),
    /// One character of an alphabet, from the number.
    Free(&'static [u8]),
    /// The digit that meets the card's Luhn rule.
    Luhn,
}

/// A token's positions, from its value (or from the token itself).
struct Template {
    slots: Vec<Slot>,
    /// The card rule the [`Slot::Luhn`] digit meets (`Any`: no such slot).
    luhn: Luhn,
}

impl Template {
    /// How many tokens fit: the product of the free alphabets, times 9 for
    /// a digit chosen to fail the Luhn check.
    fn domain(&self) -> BigUint {
        let mut n = BigUint::from(1u32);
        for slot in &self.slots {
            if let Slot::Free(alphabet) = slot {
                n *= u32::try_from(alphabet.len()).unwrap_or(u32::MAX);
            }
        }
        if self.luhn == Luhn::Invalid {
            n *= 9u32;
        }
        n
    }

    /// The FF1 tweak: the scheme, the format, the shape and every free
    /// position's alphabet size.
    fn tweak(&self, format: &Format, shape: u32) -> Vec<u8> {
        let mut tweak = Vec::with_capacity(TWEAK_LABEL.len() + 16 + self.slots.len());
        tweak.extend_from_slice(TWEAK_LABEL);
        tweak.extend_from_slice(format.token_kind().as_bytes());
        tweak.push(0);
        tweak.extend_from_slice(&shape.to_be_bytes());
        for slot in &self.slots {
            match slot {
                Slot::Free(alphabet) => tweak.push(u8::try_from(alphabet.len()).unwrap_or(u8::MAX)),
                Slot::Luhn => tweak.push(0),
                Slot::Fixed(_) => {}
            }
        }
        tweak
    }

    /// The token for `x` (below [`Template::domain`]).
    fn write(&self, mut x: BigUint) -> Option<Vec<u8>> {
        let mut out: Vec<u8> = self.slots.iter().map(|s| if let Slot::Fixed(b) = s { *b } else { b'0' }).collect();
        let fail_choice = if self.luhn == Luhn::Invalid {
            let r = digit_of(&x, 9);
            x /= 9u32;
            Some(r)
        } else {
            None
        };
        for (i, slot) in self.slots.iter().enumerate().rev() {
            if let Slot::Free(alphabet) = slot {
                let n = u32::try_from(alphabet.len()).ok()?;
                out[i] = alphabet[usize::from(digit_of(&x, n))];
                x /= n;
            }
        }
        if let Some(at) = self.slots.iter().position(|s| *s == Slot::Luhn) {
            let passing = passing_digit(&mut out, at);
            out[at] = match fail_choice {
                // The nine failing digits in order, skipping the passing one.
                Some(r) => b'0' + if r < passing { r } else { r + 1 },
                None => b'0' + passing,
            };
        }
        Some(out)
    }

    /// The number `token` was written from, if it has this template's
    /// shape and meets its Luhn rule.
    fn read(&self, token: &[u8]) -> Option<BigUint> {
        if token.len() != self.slots.len() {
            return None;
        }
        let mut x = BigUint::default();
        for (slot, &b) in self.slots.iter().zip(token) {
            match slot {
                Slot::Fixed(f) if *f != b => return None,
                Slot::Fixed(_) | Slot::Luhn => {}
                Slot::Free(alphabet) => {
                    let index = alphabet.iter().position(|&a| a == b)?;
                    x *= u32::try_from(alphabet.len()).ok()?;
                    x += u32::try_from(index).ok()?;
                }
            }
        }
        if let Some(at) = self.slots.iter().position(|s| *s == Slot::Luhn) {
            let digit = token[at].checked_sub(b'0').filter(|d| *d <= 9)?;
            let passing = passing_digit(&mut token.to_vec(), at);
            match self.luhn {
                Luhn::Valid if digit != passing => return None,
                Luhn::Invalid => {
                    if digit == passing {
                        return None;
                    }
                    x *= 9u32;
                    x += u32::from(if digit < passing { digit } else { digit - 1 });
                }
                _ => {}
            }
        }
        Some(x)
    }
}

/// `x mod n` as a numeral (`n` at most 256).
fn digit_of(x: &BigUint, n: u32) -> u8 {
    let r = x % n;
    r.iter_u32_digits().next().and_then(|d| u8::try_from(d).ok()).unwrap_or(0)
}

/// The digit at `at` that makes `digits` pass the Luhn check (exactly one
/// does: at a doubled place or not, the ten digits give ten different
/// sums mod 10).
fn passing_digit(digits: &mut [u8], at: usize) -> u8 {
    for d in 0..10 {
        digits[at] = b'0' + d;
        if luhn_digits_valid(digits) {
            return d;
        }
    }
    0
}

impl Format {
    /// The sequence a record of `text` (a value, or a token of this format)
    /// is numbered in: its letters and digits for the formats counted per
    /// length, 0 (the collection's own) for default and email tokens.
    pub fn shape_of(&self, text: &str) -> u32 {
        if self.is_canonicalized() { u32::try_from(super::slots_of(text)).unwrap_or(u32::MAX) } else { 0 }
    }

    /// The shaped token of `value` for number `n` of its shape, in the
    /// value's writing. `None` if the value's domain is below the floor (or
    /// `n` is outside it): its shape has no token left.
    pub fn shaped_token(&self, key: &TokenKey, value: &str, n: u64) -> Option<Token> {
        let template = self.template(value.as_bytes(), false)?;
        let domain = template.domain();
        if domain < BigUint::from(MIN_TOKEN_SPACE) {
            return None;
        }
        let tweak = template.tweak(self, self.shape_of(value));
        let x = key.permute(&tweak, &domain, &BigUint::from(n))?;
        let text = String::from_utf8(template.write(x)?).ok()?;
        // Never a token that would not parse back.
        (text.len() <= crate::token::MAX_TOKEN_LEN).then(|| Token::preserved(text))
    }

    /// The numbers (in its shape) that `token`, as presented, may stand
    /// for: one, or none if it cannot be a token of this scheme. A phone
    /// token presented without its `+` may also be the one with it.
    pub fn shaped_numbers(&self, key: &TokenKey, token: &str) -> Vec<u64> {
        let mut numbers = Vec::with_capacity(2);
        numbers.extend(self.shaped_number(key, token));
        if matches!(self, Self::Digits { keep_country_code: true, .. }) && !token.starts_with('+') {
            numbers.extend(self.shaped_number(key, &format!("+{token}")));
        }
        numbers
    }

    fn shaped_number(&self, key: &TokenKey, token: &str) -> Option<u64> {
        let template = self.template(token.as_bytes(), true)?;
        let domain = template.domain();
        let x = template.read(token.as_bytes())?;
        let n = key.unpermute(&template.tweak(self, self.shape_of(token)), &domain, &x)?;
        u64::try_from(n).ok().filter(|n| (1..=MAX_SHAPE_NUMBER).contains(n))
    }

    /// The template of `text`: a value, or (`as_token`) a token presented
    /// for lookup, whose own kept characters and separators are the value's.
    fn template(&self, text: &[u8], as_token: bool) -> Option<Template> {
        let keep = |keep_first: usize, keep_last: usize, letters: bool| -> Option<Vec<Slot>> {
            let value = std::str::from_utf8(text).ok()?;
            let classes = classify(value, letters)?;
            let total = classes.iter().filter(|c| **c != Class::Separator).count();
            let mut seen = 0;
            Some(
                text.iter()
                    .zip(classes)
                    .map(|(&b, class)| {
                        if class == Class::Separator {
                            return Slot::Fixed(b);
                        }
                        seen += 1;
                        if seen <= keep_first || seen > total.saturating_sub(keep_last) {
                            Slot::Fixed(b)
                        } else {
                            Slot::Free(class.alphabet())
                        }
                    })
                    .collect(),
            )
        };
        let (slots, luhn) = match *self {
            Self::Random { .. } => return None,
            Self::Digits { keep_last, keep_country_code, .. } => {
                let value = std::str::from_utf8(text).ok()?;
                let keep_first = if keep_country_code { country_code_len(value) } else { 0 };
                (keep(keep_first, keep_last, false)?, Luhn::Any)
            }
            Self::Alphanumeric { keep_last, .. } => (keep(0, keep_last, true)?, Luhn::Any),
            Self::Card { keep_first, keep_last, luhn, .. } => {
                let mut slots = keep(keep_first, keep_last, false)?;
                if luhn != Luhn::Any {
                    let last_free = slots.iter().rposition(|s| matches!(s, Slot::Free(_)))?;
                    slots[last_free] = Slot::Luhn;
                }
                (slots, luhn)
            }
            Self::Ssn => {
                if !is_ssn_shaped(std::str::from_utf8(text).ok()?) {
                    return None;
                }
                let mut digit = 0;
                let slots = text
                    .iter()
                    .map(|&b| {
                        if !b.is_ascii_digit() {
                            return Slot::Fixed(b);
                        }
                        digit += 1;
                        match digit {
                            1 => Slot::Fixed(SSN_TOKEN_AREA_FIRST),
                            4 => Slot::Free(SSN_GROUP_FIRST),
                            _ => Slot::Free(DIGITS),
                        }
                    })
                    .collect();
                (slots, Luhn::Any)
            }
            Self::Email { keep_domain } => {
                let (local, domain) = split_email(std::str::from_utf8(text).ok()?)?;
                if as_token && local.len() != EMAIL_LOCAL_RANDOM {
                    return None;
                }
                let mut slots = vec![Slot::Free(LOWER_ALNUM); EMAIL_LOCAL_RANDOM];
                slots.push(Slot::Fixed(b'@'));
                if keep_domain {
                    slots.extend(domain.bytes().map(Slot::Fixed));
                } else {
                    slots.extend(std::iter::repeat_n(Slot::Free(LOWER_ALNUM), EMAIL_DOMAIN_RANDOM));
                    slots.push(Slot::Fixed(b'.'));
                    slots.extend(EMAIL_TOKEN_TLD.bytes().map(Slot::Fixed));
                }
                (slots, Luhn::Any)
            }
        };
        Some(Template { slots, luhn })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The format a vector case names.
    fn format_of(case: &toml::Table) -> Format {
        let int = |k: &str| case.get(k).and_then(toml::Value::as_integer).map_or(0, |v| usize::try_from(v).unwrap());
        let flag = |k: &str| case.get(k).and_then(toml::Value::as_bool).unwrap_or(false);
        match case["kind"].as_str().unwrap() {
            "digits" => {
                Format::Digits { keep_last: int("keep_last"), min_len: 6, keep_country_code: flag("keep_country_code") }
            }
            "alphanumeric" => Format::Alphanumeric { keep_last: int("keep_last"), min_len: 6 },
            "card" => Format::Card {
                keep_first: int("keep_first"),
                keep_last: int("keep_last"),
                min_len: 12,
                luhn: Luhn::parse(case["luhn"].as_str().unwrap()).unwrap(),
            },
            "ssn" => Format::Ssn,
            "email" => Format::Email { keep_domain: flag("keep_domain") },
            other => panic!("unknown kind {other}"),
        }
    }

    fn vectors() -> (TokenKey, Vec<(Format, String, u64, String)>) {
        let file: toml::Table = toml::from_str(include_str!("../../tests/vectors/shaped_tokens.toml")).unwrap();
        let key: [u8; 32] = hex::decode(file["token_key"].as_str().unwrap()).unwrap().try_into().unwrap();
        let cases = file["case"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let c = c.as_table().unwrap();
                let n = u64::try_from(c["number"].as_integer().unwrap()).unwrap();
                (format_of(c), c["value"].as_str().unwrap().to_owned(), n, c["token"].as_str().unwrap().to_owned())
            })
            .collect();
        (TokenKey::new(&key).unwrap(), cases)
    }

    /// Known answers from an independent implementation
    /// (`tests/vectors/shaped_tokens.py`: FF1 written from NIST SP 800-38G
    /// and checked against its samples).
    #[test]
    fn shaped_tokens_known_answers() {
        let (key, cases) = vectors();
        assert_eq!(cases.len(), 21);
        for (format, value, n, token) in cases {
            let made = format.shaped_token(&key, &value, n).unwrap();
            assert_eq!(made.as_str(), token, "{format:?} {value} #{n}");
            assert_eq!(format.shaped_numbers(&key, &token), vec![n], "{token}");
            assert!(format.parse_token(&token).is_some(), "{token}");
        }
    }

    #[test]
    fn fail_another_key_or_a_changed_free_character_reads_to_another_number() {
        let (key, cases) = vectors();
        let other = TokenKey::new(&[0x55; 32]).unwrap();
        for (format, value, n, token) in cases {
            assert_ne!(format.shaped_token(&other, &value, n).unwrap().as_str(), token);
            assert_ne!(format.shaped_numbers(&other, &token), vec![n], "{token}");
            // The first free character (a kept prefix is not free),
            // changed to another of its alphabet.
            let template = format.template(token.as_bytes(), true).unwrap();
            let at = template.slots.iter().position(|s| matches!(s, Slot::Free(_))).unwrap();
            let Slot::Free(alphabet) = template.slots[at] else { unreachable!() };
            let mut changed = token.clone().into_bytes();
            changed[at] = *alphabet.iter().find(|&&c| c != changed[at]).unwrap();
            let changed = String::from_utf8(changed).unwrap();
            assert_ne!(format.shaped_numbers(&key, &changed), vec![n], "{changed}");
        }
        // A Luhn-invalid token's check digit moved to the passing one is no
        // token of that rule at all.
        let card = Format::Card { keep_first: 0, keep_last: 4, min_len: 12, luhn: Luhn::Invalid };
        let token = card.shaped_token(&key, "4111 1111 1111 1111", 1).unwrap().into_string();
        let mut digits = token.clone().into_bytes();
        let at = 13; // the last free digit, before the kept " 1111"
        let pass = passing_digit(&mut digits, at);
        digits[at] = b'0' + pass;
        assert!(card.shaped_numbers(&key, std::str::from_utf8(&digits).unwrap()).is_empty());
        // A shape below the FF1 floor has no token.
        let small = Format::Digits { keep_last: 1, min_len: 6, keep_country_code: false };
        assert!(small.shaped_token(&key, "123456", 1).is_none());
        // Nor has a number outside the domain, or 0 read back.
        let ssn_space = u64::try_from(Format::Ssn.token_space()).unwrap();
        assert!(Format::Ssn.shaped_token(&key, "078-05-1120", ssn_space).is_none());
    }

    /// A phone token presented without its `+` may be read either way.
    #[test]
    fn a_phone_token_without_its_plus_is_read_both_ways() {
        let key = TokenKey::new(&[3; 32]).unwrap();
        let phone = Format::Digits { keep_last: 0, min_len: 9, keep_country_code: true };
        let token = phone.shaped_token(&key, "+44 20 7946 0958", 42).unwrap().into_string();
        assert!(token.starts_with("+44 "), "{token}");
        assert_eq!(phone.shaped_numbers(&key, &token), vec![42]);
        let bare = token.trim_start_matches('+');
        assert!(phone.shaped_numbers(&key, bare).contains(&42), "{bare}");
    }

    proptest! {
        #[test]
        fn distinct_numbers_give_distinct_tokens(a in 1u64..50_000_000, b in 1u64..50_000_000, key: [u8; 32]) {
            prop_assume!(a != b);
            let key = TokenKey::new(&key).unwrap();
            for (format, value) in [
                (Format::Ssn, "078-05-1120"),
                (Format::Card { keep_first: 0, keep_last: 4, min_len: 12, luhn: Luhn::Invalid }, "4111111111111111"),
                (Format::Email { keep_domain: true }, "jane@example.org"),
            ] {
                let ta = format.shaped_token(&key, value, a).unwrap();
                let tb = format.shaped_token(&key, value, b).unwrap();
                prop_assert_ne!(&ta, &tb);
                prop_assert_eq!(format.shaped_numbers(&key, ta.as_str()), vec![a]);
            }
        }

        #[test]
        fn reading_any_text_never_panics(text in "\\PC{0,64}", key: [u8; 32]) {
            let key = TokenKey::new(&key).unwrap();
            for format in [
                Format::Ssn,
                Format::Card { keep_first: 6, keep_last: 4, min_len: 19, luhn: Luhn::Valid },
                Format::Digits { keep_last: 0, min_len: 6, keep_country_code: true },
                Format::Alphanumeric { keep_last: 2, min_len: 8 },
                Format::Email { keep_domain: false },
            ] {
                let _ = format.shaped_numbers(&key, &text);
            }
        }
    }

    #[test]
    fn record_places_keep_shapes_apart() {
        assert_eq!(record_seq(0, 7), 7);
        assert_eq!(record_seq(16, 1), (16 << 48) | 1);
        assert_eq!(split_seq(record_seq(19, MAX_SHAPE_NUMBER)), (19, MAX_SHAPE_NUMBER));
        assert_ne!(record_seq(9, 1), record_seq(10, 1));
    }

    #[test]
    fn every_luhn_position_has_one_passing_digit() {
        for len in 2..20 {
            for at in 0..len {
                let mut digits = vec![b'3'; len];
                let passing = passing_digit(&mut digits, at);
                let passes = (0..10u8)
                    .filter(|d| {
                        digits[at] = b'0' + d;
                        luhn_digits_valid(&digits)
                    })
                    .count();
                assert_eq!(passes, 1, "len {len} at {at}");
                digits[at] = b'0' + passing;
                assert!(luhn_digits_valid(&digits));
            }
        }
    }
}
