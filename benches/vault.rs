//! In-process throughput of the vault core: the baseline later network and
//! tuning work is measured against.
//!
//! Real SQLite file on disk, `synchronous=FULL`, real keys. Prints one line
//! per scenario. Run with `cargo bench --bench vault`; `PIIVAULT_BENCH_SECS`
//! sets the seconds per scenario (default 3).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a benchmark reports on stdout and fails loudly

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use piivault::crypto::root::{self, RawKey, Unlock};
use piivault::vault::Requester;
use piivault::{Config, PiiValue, Vault};

fn who() -> Requester {
    Requester::named("bench")
}

const COLLECTION: &str = "card";

fn main() {
    let secs: u64 = std::env::var("PIIVAULT_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let duration = Duration::from_secs(secs);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir_in(std::env::var("PIIVAULT_BENCH_DIR").unwrap_or_else(|_| "target".into())).unwrap();
    let config = Config::parse(
        "[collections.card]\n\
         [collections.shaped]\nformat = \"card\"\nkeep_last = 4\nluhn = \"invalid\"\n\
         [collections.det]\nformat = \"digits\"\ndeterministic = true\nmin_len = 9\n",
        dir.path(),
    )
    .unwrap();
    let unlock = Unlock::RawKey(RawKey::parse(&[0x11; 32]).unwrap());
    let (root_key, _) = root::create(&unlock, root::MIN_KDF).unwrap();
    let vault = runtime.block_on(Vault::create(&config, &root_key)).unwrap();

    // Seed tokens for the detokenize scenarios.
    let seeded: Arc<Vec<String>> = Arc::new(runtime.block_on(async {
        let mut tokens = Vec::new();
        for chunk in 0..100 {
            let values = (0..1000).map(|i| PiiValue::new(format!("4111{chunk:06}{i:06}"))).collect();
            tokens.extend(
                vault.tokenize(&who(), COLLECTION, values).await.unwrap().into_iter().map(|t| t.unwrap().into_string()),
            );
        }
        tokens
    }));
    println!("piivault in-process benchmark: {} s per scenario, {} tokens seeded", secs, seeded.len());
    println!("{:<60} {:>12} {:>14} {:>10}", "scenario", "requests/s", "values/s", "p99 ms");
    // `card` is a random-format collection; `shaped` is format = "card"
    // (keep_last = 4, Luhn invalid); `det` is a deterministic digits
    // collection (every value new: an index miss, then an insert).
    for (op, collection, batch, concurrency) in [
        ("tokenize", COLLECTION, 1, 1),
        ("tokenize", COLLECTION, 1, 64),
        ("tokenize", COLLECTION, 100, 1),
        ("tokenize", COLLECTION, 100, 8),
        ("tokenize", "shaped", 1, 64),
        ("tokenize", "shaped", 100, 8),
        ("tokenize", "det", 1, 64),
        ("tokenize", "det", 100, 8),
        ("detokenize", COLLECTION, 1, 1),
        ("detokenize", COLLECTION, 1, 64),
        ("detokenize", COLLECTION, 100, 1),
        ("detokenize", COLLECTION, 100, 8),
    ] {
        let (requests, p99) = runtime.block_on(run(&vault, &seeded, (op, collection), batch, concurrency, duration));
        #[allow(clippy::cast_precision_loss)] // rates, not money
        let rate = requests as f64 / duration.as_secs_f64();
        println!(
            "{:<60} {:>12.0} {:>14.0} {:>10.2}",
            format!("{op} {collection} batch={batch} concurrency={concurrency}"),
            rate,
            rate * f64::from(batch),
            p99.as_secs_f64() * 1000.0
        );
    }
    runtime.block_on(reencryption_rate(&vault, seeded.len()));
}

/// Rotates the data key and re-encrypts every seeded record onto the new
/// version: the re-encryption rate on 100,000 records.
async fn reencryption_rate(vault: &Vault, seeded: usize) {
    vault.rotate_data_key(&who(), COLLECTION).await.unwrap();
    let started = Instant::now();
    let done = vault.reencrypt(&who(), COLLECTION, 500, &mut |_| {}).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(done.remaining, 0);
    #[allow(clippy::cast_precision_loss)] // rates, not money
    let rate = done.moved as f64 / elapsed.as_secs_f64();
    println!(
        "re-encryption: {} records ({} seeded) moved to the new key version in {:.2} s: {:.0} records/s",
        done.moved,
        seeded,
        elapsed.as_secs_f64(),
        rate
    );
}

async fn run(
    vault: &Vault,
    seeded: &Arc<Vec<String>>,
    (op, collection): (&'static str, &'static str),
    batch: u32,
    concurrency: usize,
    duration: Duration,
) -> (u64, Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (vault, seeded, stop, count) = (vault.clone(), seeded.clone(), stop.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            // Each worker its own range of values, so none repeats.
            let mut n = worker * 1_000_000;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                if op == "tokenize" {
                    let values = (0..batch).map(|i| PiiValue::new(format!("5500{n:08}{i:04}"))).collect();
                    let out = vault.tokenize(&who(), collection, values).await.unwrap();
                    assert!(out.iter().all(Result::is_ok));
                } else {
                    let tokens = (0..batch as usize).map(|i| seeded[(n + i * 31) % seeded.len()].clone()).collect();
                    let out = vault.detokenize(&who(), collection, tokens).await.unwrap();
                    assert!(out.iter().all(Result::is_ok));
                }
                latencies.push(started.elapsed());
                count.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            latencies
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    latencies.sort();
    let p99 = latencies.get(latencies.len() * 99 / 100).copied().unwrap_or_default();
    (count.load(Ordering::Relaxed), p99)
}
