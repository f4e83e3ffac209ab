//! `piivault bench`: a load generator over real mutual-TLS gRPC.
//!
//! Seeds a collection with N tokens, then runs one operation (or a mix)
//! from many concurrent callers over a few HTTP/2 connections for a bounded
//! time, and reports throughput, latency percentiles, errors, and, given
//! the server's pid, its CPU time per request and peak RSS (from `/proc`).
//! Values are synthetic numbers (or addresses): never real data.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::anyhow;

use super::client::{self, ConnectArgs};
use super::{Classify as _, CliError, Failure, say};
use piivault_client::Client;

/// The longest run allowed, so a typo cannot load a server for hours.
const MAX_DURATION_S: u64 = 600;
/// Values per seeding request.
const SEED_BATCH: usize = 1000;
/// Concurrent seeding requests.
const SEED_CONCURRENCY: usize = 4;
/// Most seeded tokens kept for detokenize requests (a uniform sample of
/// the rest would not change what a B-tree lookup costs).
const MAX_KEPT_TOKENS: usize = 1_000_000;
/// Linux's `USER_HZ`: the unit of CPU times in `/proc/<pid>/stat`.
const USER_HZ: f64 = 100.0;

/// What each request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// Tokenize new values.
    Tokenize,
    /// Detokenize seeded tokens.
    Detokenize,
    /// One tokenize for every four detokenizes.
    Mixed,
}

/// What the synthetic values look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// 16-digit numbers: fit `random`, `digits`, `alphanumeric` and `card`
    /// collections.
    Number,
    /// `u<number>@example.org`: fits `email` collections.
    Email,
    /// `AAA-GG-SSSS`: fits `ssn` collections.
    Ssn,
}

/// Arguments of `piivault bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// What each request does.
    #[arg(long, value_enum, default_value_t = Operation::Tokenize)]
    op: Operation,
    /// The collection.
    #[arg(long, short = 'c', default_value = "name")]
    collection: String,
    /// Items per request.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch: u32,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    concurrency: u32,
    /// HTTP/2 connections the requests are spread over.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    connections: u32,
    /// Seconds of load (at most 600).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=MAX_DURATION_S))]
    duration: u64,
    /// Tokens to store before measuring (needed by detokenize and mixed).
    #[arg(long, default_value_t = 10_000)]
    seed: u64,
    /// What the values look like.
    #[arg(long, value_enum, default_value_t = Shape::Number)]
    shape: Shape,
    /// With `--data-dir`: the caller that reads (detokenize); `--as` is the
    /// one that writes. Without it, `--as` (or the certificate) does both.
    #[arg(long, value_name = "NAME", requires = "data_dir")]
    reader: Option<String>,
    /// The server's process id, for its CPU time per request and peak RSS.
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// The measured outcome of a run.
#[derive(Debug, serde::Serialize)]
struct Report {
    op: Operation,
    collection: String,
    batch: u32,
    concurrency: u32,
    connections: u32,
    duration_s: f64,
    seeded: u64,
    seed_values_per_s: Option<f64>,
    requests: u64,
    requests_per_s: f64,
    values_per_s: f64,
    errors: u64,
    latency_ms: Percentiles,
    server: Option<ServerUsage>,
}

#[derive(Debug, serde::Serialize)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

#[derive(Debug, serde::Serialize)]
struct ServerUsage {
    pid: u32,
    cpu_us_per_request: f64,
    cpu_us_per_value: f64,
    cpu_cores_busy: f64,
    peak_rss_mib: f64,
    rss_mib: f64,
}

/// CPU seconds (user + system, all threads) of process `pid`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; the fields after it do not.
    let after = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13
    // counted from the state field.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// `(peak, current)` resident memory of `pid`, in MiB.
fn rss_mib(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

fn value(shape: Shape, n: u64) -> String {
    match shape {
        Shape::Number => format!("4{:015}", n % 1_000_000_000_000_000),
        Shape::Email => format!("u{n}@example.org"),
        Shape::Ssn => {
            let n = n % 1_000_000_000;
            format!("{:03}-{:02}-{:04}", n / 1_000_000, n / 10_000 % 100, n % 10_000)
        }
    }
}

/// A run's value numbers: distinct per run, so a deterministic collection
/// sees new values rather than repeats.
fn run_base() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    u64::try_from(nanos % 1_000_000_000_000).unwrap_or(0) * 1000
}

/// `connections` clients (each its own HTTP/2 connection) as one caller.
async fn clients(args: &ConnectArgs, connections: u32) -> Result<Vec<Client>, CliError> {
    let mut out = Vec::new();
    for _ in 0..connections {
        out.push(client::connect(args).await?);
    }
    Ok(out)
}

/// Stores `args.seed` values; returns up to [`MAX_KEPT_TOKENS`] of their
/// tokens, and the seeding rate.
async fn seed(args: &BenchArgs, writers: &[Client], base: u64) -> Result<(Vec<String>, Option<f64>), CliError> {
    if args.seed == 0 {
        return Ok((Vec::new(), None));
    }
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let keep_every = usize::try_from(args.seed / MAX_KEPT_TOKENS as u64 + 1).unwrap_or(usize::MAX);
    let mut tasks = Vec::new();
    for worker in 0..SEED_CONCURRENCY {
        let client = writers[worker % writers.len()].clone();
        let (next, total, collection, shape) = (next.clone(), args.seed, args.collection.clone(), args.shape);
        tasks.push(tokio::spawn(async move {
            let mut kept = Vec::new();
            loop {
                let from = next.fetch_add(SEED_BATCH as u64, Ordering::Relaxed);
                if from >= total {
                    return Ok(kept);
                }
                let to = (from + SEED_BATCH as u64).min(total);
                let values: Vec<String> = (from..to).map(|n| value(shape, base + n)).collect();
                let tokens = client.tokenize(&collection, &values).await?;
                kept.extend(tokens.into_iter().flatten().step_by(keep_every));
            }
        }));
    }
    let mut kept = Vec::new();
    for task in tasks {
        let tokens: Result<Vec<String>, piivault_client::Error> =
            task.await.map_err(|e| anyhow!("a seeding task failed: {e}")).or_fail(Failure::Other)?;
        kept.extend(tokens.map_err(client::client_error)?);
    }
    if kept.is_empty() {
        return Err(anyhow!("seeding stored no value: does the collection accept --shape values?"))
            .or_fail(Failure::Other);
    }
    #[allow(clippy::cast_precision_loss)] // a rate
    let rate = args.seed as f64 / started.elapsed().as_secs_f64();
    Ok((kept, Some(rate)))
}

/// One caller's loop until `stop`: latencies in microseconds, and errors.
async fn worker(
    writer: Client,
    reader: Client,
    args: Arc<(Operation, String, u32, Shape)>,
    tokens: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
    mut n: u64,
) -> (Vec<u32>, u64) {
    let (op, collection, batch, shape) = (args.0, args.1.as_str(), args.2, args.3);
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut i: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let tokenize = match op {
            Operation::Tokenize => true,
            Operation::Detokenize => false,
            Operation::Mixed => i.is_multiple_of(5),
        };
        i += 1;
        let started = Instant::now();
        let failed = if tokenize {
            let values: Vec<String> = (0..u64::from(batch)).map(|k| value(shape, n + k)).collect();
            n += u64::from(batch);
            match writer.tokenize(collection, &values).await {
                Ok(results) => results.iter().filter(|t| t.is_err()).count() as u64,
                Err(_) => u64::from(batch),
            }
        } else {
            let picked: Vec<&str> = (0..u64::from(batch))
                .map(|k| tokens[usize::try_from((n + k * 7919) % tokens.len() as u64).unwrap_or(0)].as_str())
                .collect();
            n += u64::from(batch);
            match reader.detokenize(collection, &picked).await {
                Ok(results) => results.iter().filter(|r| r.is_err()).count() as u64,
                Err(_) => u64::from(batch),
            }
        };
        latencies.push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX));
        errors += failed;
    }
    (latencies, errors)
}

#[allow(clippy::cast_precision_loss)] // latencies in microseconds
fn percentiles(mut micros: Vec<u32>) -> Percentiles {
    micros.sort_unstable();
    let at = |q: f64| -> f64 {
        if micros.is_empty() {
            return 0.0;
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // an index below len
        let i = ((micros.len() - 1) as f64 * q).round() as usize;
        f64::from(micros[i]) / 1000.0
    };
    Percentiles { p50: at(0.50), p90: at(0.90), p99: at(0.99), max: at(1.0) }
}

/// Runs `piivault bench`.
#[allow(clippy::cast_precision_loss)] // rates and averages
pub async fn run(args: BenchArgs) -> Result<(), CliError> {
    let writers = clients(&args.connect, args.connections).await?;
    let readers = match &args.reader {
        Some(name) => clients(&args.connect.acting_as(name), args.connections).await?,
        None => writers.clone(),
    };
    let base = run_base();
    let needs_tokens = args.op != Operation::Tokenize;
    if needs_tokens && args.seed == 0 {
        return Err(anyhow!("--op {:?} needs --seed of at least 1", args.op)).or_fail(Failure::Usage);
    }
    let (kept, seed_rate) = seed(&args, &writers, base).await?;
    let tokens = Arc::new(kept);

    let stop = Arc::new(AtomicBool::new(false));
    let shared = Arc::new((args.op, args.collection.clone(), args.batch, args.shape));
    let cpu_before = args.server_pid.and_then(cpu_seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.concurrency {
        let c = usize::try_from(w % args.connections).unwrap_or(0);
        let first = base + args.seed + u64::from(w) * 1_000_000_000;
        tasks.push(tokio::spawn(worker(
            writers[c].clone(),
            readers[c].clone(),
            shared.clone(),
            tokens.clone(),
            stop.clone(),
            first,
        )));
    }
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await.map_err(|e| anyhow!("a load task failed: {e}")).or_fail(Failure::Other)?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = args.server_pid.and_then(cpu_seconds);
    let requests = latencies.len() as u64;
    let server = match (args.server_pid, cpu_before, cpu_after, args.server_pid.and_then(rss_mib)) {
        (Some(pid), Some(before), Some(after), Some((peak, rss))) => {
            let cpu = after - before;
            Some(ServerUsage {
                pid,
                cpu_us_per_request: cpu * 1e6 / requests.max(1) as f64,
                cpu_us_per_value: cpu * 1e6 / (requests.max(1) * u64::from(args.batch)) as f64,
                cpu_cores_busy: cpu / elapsed,
                peak_rss_mib: peak,
                rss_mib: rss,
            })
        }
        (Some(pid), ..) => {
            return Err(anyhow!("cannot read /proc/{pid}: is the server running on this machine?"))
                .or_fail(Failure::Usage);
        }
        _ => None,
    };
    let report = Report {
        op: args.op,
        collection: args.collection.clone(),
        batch: args.batch,
        concurrency: args.concurrency,
        connections: args.connections,
        duration_s: elapsed,
        seeded: args.seed,
        seed_values_per_s: seed_rate,
        requests,
        requests_per_s: requests as f64 / elapsed,
        values_per_s: (requests * u64::from(args.batch)) as f64 / elapsed,
        errors,
        latency_ms: percentiles(latencies),
        server,
    };
    if args.json {
        say(&serde_json::to_string(&report).or_fail(Failure::Other)?);
    } else {
        print_report(&report);
    }
    if errors > 0 {
        return Err(anyhow!("{errors} items failed")).or_fail(Failure::Other);
    }
    Ok(())
}

fn print_report(r: &Report) {
    say(&format!(
        "piivault bench: {:?} on {}, batch {}, concurrency {}, {} connections, {:.1} s, {} tokens seeded{}",
        r.op,
        r.collection,
        r.batch,
        r.concurrency,
        r.connections,
        r.duration_s,
        r.seeded,
        r.seed_values_per_s.map(|s| format!(" ({s:.0} values/s)")).unwrap_or_default()
    ));
    say(&format!(
        "  {:.0} requests/s, {:.0} values/s, {} errors; latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
        r.requests_per_s,
        r.values_per_s,
        r.errors,
        r.latency_ms.p50,
        r.latency_ms.p90,
        r.latency_ms.p99,
        r.latency_ms.max
    ));
    if let Some(s) = &r.server {
        say(&format!(
            "  server pid {}: {:.1} µs CPU per request ({:.2} µs per value, {:.2} cores busy), RSS {:.1} MiB, peak {:.1} MiB",
            s.pid, s.cpu_us_per_request, s.cpu_us_per_value, s.cpu_cores_busy, s.rss_mib, s.peak_rss_mib
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::float_cmp)] // exact values from integer microseconds
    fn percentiles_of_known_latencies() {
        let p = percentiles((1..=1000).map(|ms| ms * 1000).collect());
        assert_eq!((p.p50, p.p90, p.p99, p.max), (501.0, 900.0, 990.0, 1000.0));
        let empty = percentiles(Vec::new());
        assert_eq!(empty.max, 0.0);
    }

    #[test]
    fn values_fit_their_shapes() {
        assert_eq!(value(Shape::Number, 42), "4000000000000042");
        assert_eq!(value(Shape::Email, 42), "u42@example.org");
        assert_eq!(value(Shape::Ssn, 1_234_567_890), "234-56-7890");
        assert!(crate::format::Format::Ssn.check_value(&value(Shape::Ssn, 42)).is_ok());
        let card = crate::format::Format::Card {
            keep_first: 0,
            keep_last: 4,
            min_len: 12,
            luhn: crate::format::Luhn::Invalid,
        };
        assert!(card.check_value(&value(Shape::Number, 123_456_789)).is_ok());
    }

    #[test]
    fn own_process_usage_is_readable() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).is_some_and(|s| s >= 0.0));
        let (peak, rss) = rss_mib(pid).unwrap();
        assert!(peak >= rss && rss > 0.0);
    }
}
