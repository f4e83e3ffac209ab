//! criterion micro-benchmarks of the in-process hot paths: making and
//! reading a token per format, record seal and open, the blind index, one
//! audit chain step.
//! Run with `cargo bench --bench micro`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails loudly

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use piivault::audit::{AuditKey, AuditRecord};
use piivault::crypto::envelope;
use piivault::crypto::keyring::{DataKey, blind_index};
use piivault::format::{Format, Luhn};
use piivault::token::{Sealed, TokenKey};

fn tokens(c: &mut Criterion) {
    let mut group = c.benchmark_group("token");
    let formats = [
        ("random", Format::Random { prefix: "name".parse().unwrap() }, "Zoë Ångström"),
        ("digits", Format::Digits { keep_last: 0, min_len: 6, keep_country_code: false }, "078-05-1120"),
        ("alphanumeric", Format::Alphanumeric { keep_last: 4, min_len: 10 }, "GB82WEST12345698765432"),
        (
            "card_luhn_invalid",
            Format::Card { keep_first: 0, keep_last: 4, min_len: 12, luhn: Luhn::Invalid },
            "4111 1111 1111 1111",
        ),
        (
            "card_luhn_valid",
            Format::Card { keep_first: 6, keep_last: 0, min_len: 12, luhn: Luhn::Valid },
            "4111 1111 1111 1111",
        ),
        ("email", Format::Email { keep_domain: true }, "jane.doe@example.org"),
    ];
    let key = TokenKey::new(&[5; 32]).unwrap();
    for (name, format, value) in formats {
        if let Format::Random { prefix } = &format {
            let sealed = Sealed { seq: 123_456, check: [9; 8] };
            let token = key.seal(prefix, sealed);
            group.bench_function(format!("{name}/make"), |b| b.iter(|| key.seal(prefix, black_box(sealed))));
            group.bench_function(format!("{name}/read"), |b| b.iter(|| key.open(black_box(&token)).unwrap()));
            continue;
        }
        let token = format.shaped_token(&key, value, 123_456).unwrap();
        group.bench_function(format!("{name}/make"), |b| {
            b.iter(|| format.shaped_token(&key, black_box(value), black_box(123_456)).unwrap());
        });
        group.bench_function(format!("{name}/read"), |b| {
            b.iter(|| format.shaped_numbers(&key, black_box(token.as_str())));
        });
    }
    group.finish();
}

fn records(c: &mut Criterion) {
    let key = DataKey::from_bytes([7; 32]);
    let token = "name_xyAxhq59c_PiZzJZsJRzBA";
    let mut group = c.benchmark_group("record");
    for len in [16usize, 256, 4096] {
        let value = vec![b'x'; len];
        let sealed = envelope::seal(&key, 1, "name", token, &value).unwrap();
        group.bench_function(format!("seal_{len}B"), |b| {
            b.iter(|| envelope::seal(&key, 1, "name", token, black_box(&value)).unwrap());
        });
        group.bench_function(format!("open_{len}B"), |b| {
            b.iter(|| envelope::open(&key, "name", token, black_box(&sealed)).unwrap());
        });
    }
    group.finish();
}

fn index_and_audit(c: &mut Criterion) {
    let key = DataKey::from_bytes([9; 32]);
    c.bench_function("blind_index/email", |b| {
        b.iter(|| blind_index(&key, "email", black_box(b"jane.doe@example.org")).unwrap());
    });
    let audit = AuditKey::from_bytes([3; 32]);
    let record = AuditRecord {
        at_micros: 1_795_974_246_309_322,
        caller: "writer".into(),
        action: "tokenize".into(),
        collection: "card".into(),
        items: 100,
        tokens: (0..100).map(|i| format!("card_{i:022}")).collect(),
        outcome: "OK".into(),
        error_code: String::new(),
        request_id: "order-7781".into(),
        peer: "127.0.0.1:49188".into(),
    };
    let previous = [0u8; 32];
    c.bench_function("audit/encode_and_chain_100_tokens", |b| {
        b.iter(|| {
            let encoded = black_box(&record).encode(42);
            audit.chain(&previous, &encoded)
        });
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = tokens, records, index_and_audit
}
criterion_main!(benches);
