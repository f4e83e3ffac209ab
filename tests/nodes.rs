//! Several `piivault serve` processes on one PostgreSQL database (a real
//! server from scripts/test-postgres): what one node issues, every node
//! answers; a value gets one token whichever nodes it goes through; every
//! node writes and verifies its own audit chain, and no two processes
//! write one chain.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

#[path = "common/postgres.rs"]
mod pg;

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const PASSPHRASE: &str = "test passphrase: long enough, never printed";
const BIN: &str = env!("CARGO_BIN_EXE_piivault");

fn piivault(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .env("PIIVAULT_PASSPHRASE", PASSPHRASE)
        .env_remove("PIIVAULT_LOG")
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Node directories made by `init` on `database` (node `main`, in `a`)
/// and copied for every other name, each with its own `[store] node`,
/// serving on a free port, caller `app` allowed everything.
fn nodes(tmp: &Path, database: &pg::Database, names: &[&str]) -> Vec<PathBuf> {
    nodes_on(tmp, &["--postgres-url", &database.settings.url, "--postgres-password-env", pg::PASSWORD_VAR], names)
}

/// [`nodes`] on the database that the `init` flags `store` name.
fn nodes_on(tmp: &Path, store: &[&str], names: &[&str]) -> Vec<PathBuf> {
    let first = tmp.join("main");
    let mut init = vec!["init", "--data-dir", first.to_str().unwrap()];
    init.extend_from_slice(store);
    let out = piivault(&init);
    assert!(out.status.success(), "{}", stderr(&out));
    let config = first.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    // No store flags: a SQLite vault.
    let backend = if store.is_empty() { "backend = \"sqlite\"" } else { "backend = \"postgres\"" };
    assert!(text.contains(backend) && (store.is_empty() || text.contains("node = \"main\"")), "{text}");
    let text = text.replace("127.0.0.1:7443", "127.0.0.1:0").replace("127.0.0.1:9464", "none");
    std::fs::write(&config, text).unwrap();
    std::fs::write(
        first.join("policy.toml"),
        "[callers.app]\ntokenize = [\"*\"]\ndetokenize = [\"*\"]\ndelete = [\"*\"]\nadmin = true\naudit = true\nrotate_root = true\n",
    )
    .unwrap();
    let ca = piivault::pki::Ca::load(&first).unwrap();
    ca.issue(&"app".parse().unwrap(), "piivault.local", 1, &first.join("clients/app")).unwrap();
    let mut dirs = vec![first.clone()];
    for name in names {
        let dir = tmp.join(name);
        assert!(Command::new("cp").args(["-a"]).arg(&first).arg(&dir).status().unwrap().success());
        let config = dir.join("config.toml");
        let text = std::fs::read_to_string(&config).unwrap().replace("node = \"main\"", &format!("node = \"{name}\""));
        std::fs::write(&config, text).unwrap();
        dirs.push(dir);
    }
    dirs
}

/// `piivault serve` of node `dir`, unsealed with `passphrase`, its output
/// piped.
fn serve(dir: &Path, passphrase: &str) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--config", dir.join("config.toml").to_str().unwrap()])
        .env("PIIVAULT_PASSPHRASE", passphrase)
        .env_remove("PIIVAULT_LOG")
        .stdout(Stdio::piped());
    command
}

/// A running `piivault serve` and its address.
struct Node {
    child: Child,
    addr: String,
    dir: PathBuf,
}

impl Node {
    fn start(dir: &Path) -> Self {
        Self::start_with(dir, PASSPHRASE)
    }

    fn start_with(dir: &Path, passphrase: &str) -> Self {
        let mut child = serve(dir, passphrase).stderr(Stdio::null()).spawn().unwrap();
        let addr = std::io::BufReader::new(child.stdout.take().unwrap())
            .lines()
            .map_while(Result::ok)
            .find_map(|line| line.strip_prefix("piivault: listening on ").map(str::to_owned))
            .expect("the node did not start");
        Self { child, addr, dir: dir.to_owned() }
    }

    /// `piivault <op> --collection <collection> <items>` as `app`.
    fn run(&self, op: &str, collection: &str, items: &[&str]) -> Output {
        let mut args = vec![op, "--addr", &self.addr, "--data-dir", self.dir.to_str().unwrap(), "--as", "app"];
        args.extend_from_slice(&["--collection", collection]);
        args.extend_from_slice(items);
        piivault(&args)
    }

    fn ok(&self, op: &str, collection: &str, items: &[&str]) -> Vec<String> {
        let out = self.run(op, collection, items);
        assert!(out.status.success(), "{op} on {}: {}", self.addr, stderr(&out));
        stdout(&out).lines().map(str::to_owned).collect()
    }

    /// `piivault keys <args>` through this node as `app`.
    fn keys(&self, args: &[&str]) -> String {
        let mut all = vec!["keys", args[0], "--addr", &self.addr, "--data-dir", self.dir.to_str().unwrap()];
        all.extend_from_slice(&["--as", "app"]);
        all.extend_from_slice(&args[1..]);
        let out = piivault(&all);
        assert!(out.status.success(), "keys {args:?}: {}", stderr(&out));
        stdout(&out)
    }

    /// Records ever sealed under each data-key version of `collection`.
    fn encryptions(&self, collection: &str) -> Vec<(u64, u64)> {
        let listed: serde_json::Value =
            serde_json::from_str(&self.keys(&["list", "--collection", collection, "--json"])).unwrap();
        listed
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["purpose"] == "data")
            .map(|v| (v["version"].as_u64().unwrap(), v["encryptions"].as_u64().unwrap()))
            .collect()
    }

    fn stop(mut self) {
        Command::new("kill").args(["-s", "TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(self.child.wait().unwrap().success());
    }
}

#[test]
fn what_one_node_issues_every_node_answers() {
    let database = pg::Database::new();
    let tmp = tempfile::tempdir().unwrap();
    let dirs = nodes(tmp.path(), &database, &["node-b"]);
    let (a, b) = (Node::start(&dirs[0]), Node::start(&dirs[1]));

    let cards = a.ok("tokenize", "card", &["4111 1111 1111 1111", "5500 0000 0000 0004"]);
    let names = b.ok("tokenize", "name", &["Ada Lovelace", "Grace Hopper"]);
    assert_eq!(cards.len(), 2);
    assert_ne!(cards[0], "4111 1111 1111 1111");
    let card_refs: Vec<&str> = cards.iter().map(String::as_str).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(b.ok("detokenize", "card", &card_refs), ["4111 1111 1111 1111", "5500 0000 0000 0004"]);
    assert_eq!(a.ok("detokenize", "name", &name_refs), ["Ada Lovelace", "Grace Hopper"]);

    // Who saw a card token, asked through B: every node's chain answers,
    // B's own first (its detokenize, then the query itself), then A's
    // tokenize.
    let (b_dir, card) = (b.dir.to_str().unwrap(), cards[0].as_str());
    let out =
        piivault(&["audit", "query", "--addr", &b.addr, "--data-dir", b_dir, "--as", "app", "--token", card, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let seen: Vec<(String, String)> = stdout(&out)
        .lines()
        .map(|line| {
            let event: serde_json::Value = serde_json::from_str(line).unwrap();
            (event["chain"].as_str().unwrap().to_owned(), event["action"].as_str().unwrap().to_owned())
        })
        .collect();
    let expected = [("node-b", "detokenize"), ("node-b", "audit_query"), ("main", "tokenize")];
    assert_eq!(seen, expected.map(|(c, a)| (c.to_owned(), a.to_owned())));

    // Both nodes number records of one collection from their own blocks:
    // tokens never repeat.
    let more = b.ok("tokenize", "card", &["4111 1111 1111 1111"]);
    assert!(!cards.contains(&more[0]), "{cards:?} {more:?}");

    // A deterministic value has one token whichever node is asked.
    let ssn_a = a.ok("tokenize", "ssn", &["078-05-1120"]);
    let ssn_b = b.ok("tokenize", "ssn", &["078051120"]);
    assert_eq!(crate_digits(&ssn_a[0]), crate_digits(&ssn_b[0]));

    // Deleted through one node: gone on the other at once.
    assert!(b.run("delete", "name", &[&names[0]]).status.success());
    let out = a.run("detokenize", "name", &[&names[0]]);
    assert_eq!((out.status.code(), stdout(&out)), (Some(1), "error: NOT_FOUND: token not found".to_owned()));
    a.stop();
    b.stop();

    // Verified from either node's directory, every chain verifies: the
    // node's own first, then the other's, each with its own records.
    for (dir, other) in [(&dirs[0], "node-b"), (&dirs[1], "main")] {
        let text = verified(dir);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let records = |line: &str| -> u64 { line.split(' ').find_map(|w| w.parse().ok()).unwrap() };
        assert!(lines[0].starts_with("ok: ") && records(lines[0]) >= 4, "{text}");
        assert!(lines[1].starts_with(&format!("ok: chain {other}: ")) && records(lines[1]) >= 4, "{text}");
    }
}

/// An SSN token's digits (its writing follows the value's).
fn crate_digits(token: &str) -> String {
    token.chars().filter(char::is_ascii_digit).collect()
}

#[test]
fn one_value_gets_one_token_through_every_node_at_once() {
    let database = pg::Database::new();
    let tmp = tempfile::tempdir().unwrap();
    let dirs = nodes(tmp.path(), &database, &["node-b", "node-c"]);
    let nodes: Vec<Node> = dirs.iter().map(|d| Node::start(d)).collect();
    let tokens: Vec<String> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..9)
            .map(|i| {
                let node = &nodes[i % nodes.len()];
                scope.spawn(move || node.ok("tokenize", "ssn", &["219-09-9999"]).remove(0))
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    assert!(tokens.iter().all(|t| *t == tokens[0]), "{tokens:?}");
    assert_ne!(tokens[0], "219-09-9999");
    for node in &nodes {
        assert_eq!(node.ok("detokenize", "ssn", &[&tokens[0]]), ["219-09-9999"]);
    }
    for node in nodes {
        node.stop();
    }
}

#[test]
fn two_processes_never_write_one_chain() {
    let database = pg::Database::new();
    let tmp = tempfile::tempdir().unwrap();
    let dirs = nodes(tmp.path(), &database, &[]);
    let a = Node::start(&dirs[0]);
    // The same node name again: refused at start, before it serves.
    let out = Command::new(BIN)
        .args(["serve", "--config", dirs[0].join("config.toml").to_str().unwrap()])
        .env("PIIVAULT_PASSPHRASE", PASSPHRASE)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("another running node writes this node's audit chain"), "{}", stderr(&out));
    // An offline reader beside the running node takes nothing.
    let token = a.ok("tokenize", "name", &["Katherine Johnson"]).remove(0);
    verified(&dirs[0]);
    assert_eq!(a.ok("detokenize", "name", &[&token]), ["Katherine Johnson"]);
    a.stop();
}

#[test]
fn a_key_rotated_through_one_node_is_in_force_on_every_node() {
    let database = pg::Database::new();
    let tmp = tempfile::tempdir().unwrap();
    let dirs = nodes(tmp.path(), &database, &["node-b"]);
    // The nodes reread the keys only hourly: what they pick up within a
    // second, the database's notification told them.
    for dir in &dirs {
        let config = dir.join("config.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(
            &config,
            text.replace("purge_batch = 500\n", "purge_batch = 500\nkey_refresh_interval_s = 3600\n"),
        )
        .unwrap();
    }
    let (a, b) = (Node::start(&dirs[0]), Node::start(&dirs[1]));
    let old = b.ok("tokenize", "name", &["Alan Turing"]);
    assert_eq!(a.encryptions("name"), [(1, 1)]);

    let rotated: serde_json::Value =
        serde_json::from_str(&a.keys(&["rotate", "--collection", "name", "--json"])).unwrap();
    assert_eq!(rotated["version"], 2);
    // A record sealed through A under the new version reads on B at once:
    // B loads the version it meets before it answers.
    let new = a.ok("tokenize", "name", &["Edsger Dijkstra"]);
    assert_eq!(b.ok("detokenize", "name", &[&new[0], &old[0]]), ["Edsger Dijkstra", "Alan Turing"]);
    // Within a second B seals under version 2 too.
    std::thread::sleep(Duration::from_secs(1));
    b.ok("tokenize", "name", &["Barbara Liskov", "John Backus"]);
    assert_eq!(a.encryptions("name"), [(1, 1), (2, 3)]);

    // Version 1 emptied and retired through B: A forgets it and nothing is
    // ever sealed under it again.
    let moved = b.keys(&["reencrypt", "--collection", "name"]);
    assert!(moved.contains("1 moved"), "{moved}");
    b.keys(&["retire", "--collection", "name", "--key-version", "1"]);
    std::thread::sleep(Duration::from_secs(1));
    let later = a.ok("tokenize", "name", &["Frances Allen"]);
    assert_eq!(b.ok("detokenize", "name", &[&old[0], &later[0]]), ["Alan Turing", "Frances Allen"]);
    let listed = a.keys(&["list", "--collection", "name", "--json"]);
    assert!(listed.contains("\"state\":\"retired\""), "{listed}");
    a.stop();
    b.stop();
}

/// What a load of single tokenize calls through `node` got until `done`:
/// the acknowledged `(value, token)` pairs, in order, and how many calls
/// failed.
struct Load {
    acked: Mutex<Vec<(String, String)>>,
    failed: AtomicUsize,
    done: AtomicBool,
}

impl Load {
    fn new() -> Self {
        Self { acked: Mutex::new(Vec::new()), failed: AtomicUsize::new(0), done: AtomicBool::new(false) }
    }

    /// Calls until `done`; a failed call must be one `expected` accepts.
    fn run(&self, node: &Node, prefix: &str, expected: impl Fn(&str) -> bool) {
        for i in 0.. {
            if self.done.load(Ordering::SeqCst) {
                break;
            }
            let value = format!("{prefix} {i}");
            let out = node.run("tokenize", "name", &[&value]);
            if out.status.success() {
                self.acked.lock().unwrap().push((value, stdout(&out)));
            } else {
                let err = stderr(&out);
                assert!(expected(&err), "{err}");
                self.failed.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `more` calls beyond `from` were acknowledged.
    fn wait_for(&self, from: usize, more: usize) {
        let deadline = Instant::now() + Duration::from_mins(1);
        while self.acked() < from + more {
            assert!(Instant::now() < deadline, "only {} calls acknowledged", self.acked());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every acknowledged token reads back, through `node`, as its value.
    fn check(&self, node: &Node) {
        let acked = self.acked.lock().unwrap();
        assert!(!acked.is_empty());
        for chunk in acked.chunks(200) {
            let tokens: Vec<&str> = chunk.iter().map(|(_, t)| t.as_str()).collect();
            let values: Vec<&str> = chunk.iter().map(|(v, _)| v.as_str()).collect();
            assert_eq!(node.ok("detokenize", "name", &tokens), values);
        }
    }
}

#[test]
fn postgres_stopped_under_load_answers_unavailable_and_recovers_losing_nothing() {
    let cluster = pg::OwnCluster::start();
    let tmp = tempfile::tempdir().unwrap();
    let password = cluster.password_file.to_str().unwrap();
    let dirs = nodes_on(tmp.path(), &["--postgres-url", &cluster.url, "--postgres-password-file", password], &[]);
    let node = Node::start(&dirs[0]);
    let load = Load::new();
    std::thread::scope(|scope| {
        scope.spawn(|| load.run(&node, "Before Outage", |err| err.contains("UNAVAILABLE")));
        load.wait_for(0, 10);
        cluster.stop();
        let down = load.acked();
        std::thread::sleep(Duration::from_secs(2));
        // Nothing is acknowledged while the database is down.
        assert!(load.acked() <= down + 1, "{} acknowledged while down", load.acked() - down);
        assert!(load.failed.load(Ordering::SeqCst) > 0);
        cluster.restart();
        // The node reconnects by itself.
        load.wait_for(load.acked(), 10);
        load.done.store(true, Ordering::SeqCst);
    });
    load.check(&node);
    node.stop();
    verified(&dirs[0]);
}

#[test]
fn a_failover_to_a_synchronous_standby_loses_no_acknowledged_token() {
    let cluster = pg::OwnCluster::start();
    let standby = cluster.start_standby();
    // The nodes know both servers and sign in only where writes go.
    let url = cluster.url.replace("/vault", &format!(",127.0.0.1:{standby}/vault?target_session_attrs=read-write"));
    let tmp = tempfile::tempdir().unwrap();
    let password = cluster.password_file.to_str().unwrap();
    let dirs = nodes_on(tmp.path(), &["--postgres-url", &url, "--postgres-password-file", password], &["node-b"]);
    let (a, b) = (Node::start(&dirs[0]), Node::start(&dirs[1]));
    let (load_a, load_b) = (Load::new(), Load::new());
    std::thread::scope(|scope| {
        scope.spawn(|| load_a.run(&a, "Failover A", |err| err.contains("UNAVAILABLE")));
        scope.spawn(|| load_b.run(&b, "Failover B", |err| err.contains("UNAVAILABLE")));
        load_a.wait_for(0, 10);
        load_b.wait_for(0, 10);
        // The primary dies mid-load; the standby takes over.
        cluster.crash();
        cluster.promote_standby();
        // Both nodes find the new primary by themselves.
        load_a.wait_for(load_a.acked(), 10);
        load_b.wait_for(load_b.acked(), 10);
        load_a.done.store(true, Ordering::SeqCst);
        load_b.done.store(true, Ordering::SeqCst);
    });
    // The nodes saw the outage (calls in it failed, with UNAVAILABLE only).
    assert!(load_a.failed.load(Ordering::SeqCst) + load_b.failed.load(Ordering::SeqCst) > 0);
    // Every token acknowledged before, during and after the failover reads
    // back, through either node.
    load_a.check(&b);
    load_b.check(&a);
    a.stop();
    b.stop();
    for dir in &dirs {
        verified(dir);
    }
}

#[test]
fn a_node_killed_under_load_loses_no_acknowledged_token() {
    let database = pg::Database::new();
    let tmp = tempfile::tempdir().unwrap();
    let dirs = nodes(tmp.path(), &database, &["node-b"]);
    let (mut a, b) = (Node::start(&dirs[0]), Node::start(&dirs[1]));
    let load = Load::new();
    std::thread::scope(|scope| {
        // A call in flight when the node dies fails however the connection
        // ends; what matters is what was acknowledged.
        scope.spawn(|| load.run(&a, "Killed Node", |_| true));
        load.wait_for(0, 20);
        Command::new("kill").args(["-s", "KILL", &a.child.id().to_string()]).status().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        load.done.store(true, Ordering::SeqCst);
    });
    let _ = a.child.wait();
    // Every token the killed node acknowledged answers on the other.
    load.check(&b);
    // The killed node's chain is free again, and verifies.
    a = Node::start(&dirs[0]);
    assert_eq!(a.ok("detokenize", "name", &[&load.acked.lock().unwrap()[0].1]), ["Killed Node 0"]);
    a.stop();
    b.stop();
    for dir in &dirs {
        verified(dir);
    }
}

#[test]
fn a_killed_node_s_re_encryption_is_finished_by_another_node() {
    let database = pg::Database::new();
    let tmp = tempfile::tempdir().unwrap();
    let dirs = nodes(tmp.path(), &database, &["node-b"]);
    // B looks for unfinished background work every second.
    let config = dirs[1].join("config.toml");
    let text =
        std::fs::read_to_string(&config).unwrap().replace("key_check_interval_s = 60", "key_check_interval_s = 1");
    std::fs::write(&config, text).unwrap();
    let (mut a, b) = (Node::start(&dirs[0]), Node::start(&dirs[1]));
    let values: Vec<String> = (0..20_000).map(|i| format!("Resumed Person {i}")).collect();
    let mut tokens = Vec::new();
    for chunk in values.chunks(1000) {
        let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
        tokens.extend(a.ok("tokenize", "name", &chunk));
    }
    // A leak: A marks version 1 compromised and starts moving 20,000
    // records off it, and dies at once.
    a.keys(&["rotate", "--collection", "name", "--compromised", "1"]);
    Command::new("kill").args(["-s", "KILL", &a.child.id().to_string()]).status().unwrap();
    let _ = a.child.wait();

    let records_under = |version: u64| -> u64 {
        let listed: serde_json::Value =
            serde_json::from_str(&b.keys(&["list", "--collection", "name", "--json"])).unwrap();
        let key = listed.as_array().unwrap().iter().find(|v| v["purpose"] == "data" && v["version"] == version);
        key.unwrap()["records"].as_u64().unwrap()
    };
    let deadline = Instant::now() + Duration::from_mins(1);
    while records_under(1) > 0 {
        assert!(Instant::now() < deadline, "{} records still under the compromised version", records_under(1));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(records_under(2), 20_000);
    let sample: Vec<&str> = tokens.iter().step_by(97).map(String::as_str).collect();
    let expected: Vec<&str> = values.iter().step_by(97).map(String::as_str).collect();
    assert_eq!(b.ok("detokenize", "name", &sample), expected);
    b.stop();
    // B moved records itself: its own chain has the re-encryption's batches.
    let b_dir = dirs[1].to_str().unwrap();
    let out =
        piivault(&["audit", "query", "--data-dir", b_dir, "--chain", "node-b", "--action", "reencrypt", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let moved_by_b: u64 = stdout(&out)
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["items"].as_u64().unwrap_or(0))
        .sum();
    assert!(moved_by_b > 0, "node B moved nothing: {}", stdout(&out));
    for dir in &dirs {
        verified(dir);
    }
}

#[test]
fn a_caller_s_detokenize_quota_holds_across_the_nodes() {
    let database = pg::Database::new();
    let tmp = tempfile::tempdir().unwrap();
    let dirs = nodes(tmp.path(), &database, &["node-b"]);
    for dir in &dirs {
        let policy = dir.join("policy.toml");
        let text =
            std::fs::read_to_string(&policy).unwrap() + "detokenize_max_values = 100\ndetokenize_window = \"1h\"\n";
        std::fs::write(&policy, text).unwrap();
    }
    let (a, b) = (Node::start(&dirs[0]), Node::start(&dirs[1]));
    let values: Vec<String> = (0..150).map(|i| format!("Quota Person {i}")).collect();
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    let tokens = a.ok("tokenize", "name", &values);
    let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
    assert_eq!(a.ok("detokenize", "name", &tokens[..60]), values[..60]);
    // Once A's use has reached B, B grants only what is left of the 100.
    std::thread::sleep(Duration::from_secs(3));
    let refused = b.run("detokenize", "name", &tokens[60..120]);
    assert!(!refused.status.success());
    let message = stderr(&refused);
    assert!(message.contains("RESOURCE_EXHAUSTED"), "{message}");
    assert!(!message.contains("Quota Person"), "a refusal named a value: {message}");
    assert_eq!(b.ok("detokenize", "name", &tokens[60..100]), values[60..100]);
    std::thread::sleep(Duration::from_secs(3));
    // And B's use counts on A.
    let refused = a.run("detokenize", "name", &tokens[100..101]);
    assert!(stderr(&refused).contains("RESOURCE_EXHAUSTED"), "{}", stderr(&refused));
    a.stop();
    b.stop();
}

#[test]
fn a_sqlite_vault_copied_to_postgres_keeps_every_token_key_version_and_audit_record() {
    let database = pg::Database::new();
    let tmp = tempfile::tempdir().unwrap();
    let dir = nodes_on(tmp.path(), &[], &[]).remove(0);
    let sqlite = Node::start(&dir);
    let names = sqlite.ok("tokenize", "name", &["Ada Lovelace", "Grace Hopper"]);
    sqlite.keys(&["rotate", "--collection", "name"]);
    let later = sqlite.ok("tokenize", "name", &["Alan Turing"]);
    let ssn = sqlite.ok("tokenize", "ssn", &["078-05-1120"]);
    sqlite.keys(&["rotate-index", "--collection", "ssn"]);
    let card = sqlite.ok("tokenize", "card", &["4111 1111 1111 1111"]);
    assert!(sqlite.run("delete", "name", &[&names[1]]).status.success());

    // Copied while the vault serves: one snapshot of the file.
    let copy = |url: &str| {
        let dir = dir.to_str().unwrap();
        piivault(&[
            "store",
            "copy",
            "--data-dir",
            dir,
            "--postgres-url",
            url,
            "--postgres-password-env",
            pg::PASSWORD_VAR,
        ])
    };
    let out = copy(&database.settings.url);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(said.starts_with("copied 5 records, "), "{said}");
    let copied_audit: u64 = said.split(" audit records").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    // A second copy into the database, which is a store now, is refused.
    let again = copy(&database.settings.url);
    assert!(!again.status.success() && stderr(&again).contains("already exists"), "{}", stderr(&again));
    sqlite.stop();

    // The same directory, its [store] now the database.
    let config = dir.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "backend = \"sqlite\"\npath = \"vault.db\"\n",
        &format!(
            "backend = \"postgres\"\nurl = \"{}\"\npassword_env = \"{}\"\n",
            database.settings.url,
            pg::PASSWORD_VAR
        ),
    );
    assert!(text.contains("backend = \"postgres\""), "{text}");
    std::fs::write(&config, text).unwrap();
    let text = verified(&dir);
    let records: u64 = text.strip_prefix("ok: ").unwrap().split(' ').next().unwrap().parse().unwrap();
    assert_eq!(records, copied_audit, "{text}");

    let postgres = Node::start(&dir);
    // Every token answers as before, under both key versions; the deleted
    // one stays deleted; the deterministic value keeps its token.
    assert_eq!(postgres.ok("detokenize", "name", &[&names[0], &later[0]]), ["Ada Lovelace", "Alan Turing"]);
    let out = postgres.run("detokenize", "name", &[&names[1]]);
    assert_eq!(stdout(&out), "error: NOT_FOUND: token not found");
    assert_eq!(postgres.ok("detokenize", "card", &[&card[0]]), ["4111 1111 1111 1111"]);
    assert_eq!(crate_digits(&postgres.ok("tokenize", "ssn", &["078051120"])[0]), crate_digits(&ssn[0]));
    assert_eq!(postgres.encryptions("name"), [(1, 2), (2, 1)]);
    // New records take new numbers: a new token never repeats an old one.
    let new = postgres.ok("tokenize", "name", &["Barbara Liskov"]);
    assert!(!names.contains(&new[0]) && new != later);
    postgres.stop();
    verified(&dir);
}

/// What `piivault audit verify` of node `dir` printed; it must pass.
fn verified(dir: &Path) -> String {
    let out = piivault(&["audit", "verify", "--data-dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

/// How `piivault serve` of node `dir` ended, when it must not start.
fn refused_start(dir: &Path, passphrase: &str) -> Output {
    let child = serve(dir, passphrase).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id().to_string();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(30));
        // Still running: it started, which is the failure.
        let _ = Command::new("kill").args(["-s", "KILL", &pid]).status();
    });
    let out = child.wait_with_output().unwrap();
    drop(watchdog);
    assert!(!out.status.success() && out.status.code().is_some(), "the node started: {}", stderr(&out));
    out
}

#[test]
fn the_root_key_rotates_through_one_node_and_its_sealed_file_goes_to_the_others() {
    const NEW: &str = "the rotated passphrase of every node";
    let database = pg::Database::new();
    let tmp = tempfile::tempdir().unwrap();
    let dirs = nodes(tmp.path(), &database, &["node-b"]);
    let (a, b) = (Node::start(&dirs[0]), Node::start(&dirs[1]));
    let token = b.ok("tokenize", "name", &["Grace Hopper"]);
    let new_pass = tmp.path().join("new-passphrase");
    std::fs::write(&new_pass, NEW).unwrap();
    std::fs::set_permissions(&new_pass, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let rotate = || {
        let (dir, new) = (a.dir.to_str().unwrap(), new_pass.to_str().unwrap());
        piivault(&[
            "keys",
            "rotate-root",
            "--new-passphrase-file",
            new,
            "--data-dir",
            dir,
            "--as",
            "app",
            "--addr",
            &a.addr,
        ])
    };
    // B still runs with the old root in memory: refused, nothing changed.
    let sealed = std::fs::read(a.dir.join("root.sealed")).unwrap();
    let refused = rotate();
    assert!(!refused.status.success());
    let message = stderr(&refused);
    assert!(
        message.contains("FAILED_PRECONDITION") && message.contains("other nodes are running on this store (node-b)"),
        "{message}"
    );
    assert_eq!(std::fs::read(a.dir.join("root.sealed")).unwrap(), sealed);

    b.stop();
    let rotated = rotate();
    assert!(rotated.status.success(), "{}", stderr(&rotated));
    assert_ne!(std::fs::read(a.dir.join("root.sealed")).unwrap(), sealed);
    // B's own file still holds the old root: the keys do not open with it,
    // and B does not serve.
    let out = refused_start(&dirs[1], PASSPHRASE);
    assert!(stderr(&out).contains("does not open with this root key"), "{}", stderr(&out));
    // With A's sealed file and the new passphrase, B serves every value, and
    // what each node rotates now opens on the other.
    std::fs::copy(a.dir.join("root.sealed"), dirs[1].join("root.sealed")).unwrap();
    let b = Node::start_with(&dirs[1], NEW);
    assert_eq!(b.ok("detokenize", "name", &[&token[0]]), ["Grace Hopper"]);
    b.keys(&["rotate", "--collection", "name"]);
    std::thread::sleep(piivault::vault::KEY_REFRESH_INTERVAL * 2);
    let sealed_on_a = a.ok("tokenize", "name", &["Katherine Johnson"]);
    assert_eq!(b.ok("detokenize", "name", &[&sealed_on_a[0]]), ["Katherine Johnson"]);
    assert_eq!(a.encryptions("name"), [(1, 1), (2, 1)]);
    a.stop();
    b.stop();
}

/// Tokenize records on each node's chain, by chain, as one offline `audit
/// query` through `dir` reads them (every chain, its own first).
fn tokenize_records(dir: &Path) -> Vec<(String, usize)> {
    let out = piivault(&["audit", "query", "--data-dir", dir.to_str().unwrap(), "--action", "tokenize", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut counts: Vec<(String, usize)> = Vec::new();
    for line in stdout(&out).lines() {
        let chain = serde_json::from_str::<serde_json::Value>(line).unwrap()["chain"].as_str().unwrap().to_owned();
        match counts.last_mut() {
            Some((last, n)) if *last == chain => *n += 1,
            _ => counts.push((chain, 1)),
        }
    }
    counts
}

#[test]
fn the_rust_client_spreads_calls_over_the_nodes_and_skips_a_dead_one() {
    use piivault_client::{Client, Config};

    let database = pg::Database::new();
    let tmp = tempfile::tempdir().unwrap();
    let dirs = nodes(tmp.path(), &database, &["node-b"]);
    let (a, mut b) = (Node::start(&dirs[0]), Node::start(&dirs[1]));
    let app = dirs[0].join("clients/app");
    let config = Config::from_files(
        format!("{},{}", a.addr, b.addr),
        &dirs[0].join("pki/ca.pem"),
        &app.join("cert.pem"),
        &app.join("key.pem"),
    )
    .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let values: Vec<String> = (0..10).map(|i| format!("Spread Value {i}")).collect();
    let tokens: Vec<String> = runtime.block_on(async {
        let client = Client::connect(config.clone()).await.unwrap();
        let mut tokens = Vec::new();
        for value in &values {
            tokens.push(client.tokenize("name", &[value]).await.unwrap().remove(0).unwrap());
        }
        tokens
    });
    // Round robin: five calls each.
    let by_chain = |first: &str, second: &str| vec![(first.to_owned(), 5), (second.to_owned(), 5)];
    assert_eq!(tokenize_records(&dirs[0]), by_chain("main", "node-b"));
    assert_eq!(tokenize_records(&dirs[1]), by_chain("node-b", "main"));

    Command::new("kill").args(["-s", "KILL", &b.child.id().to_string()]).status().unwrap();
    let _ = b.child.wait();
    runtime.block_on(async {
        let client = Client::connect(config).await.unwrap();
        // Reads go on through the node that is left, retried there at once.
        for _ in 0..3 {
            let read = client.detokenize("name", &tokens).await.unwrap();
            let read: Vec<&str> = read.iter().map(|r| r.as_ref().unwrap().value.expose()).collect();
            assert_eq!(read, values);
        }
        // Writes are not retried (the value could be stored twice), but the
        // dead node is skipped once it failed one.
        let mut failed = 0;
        for i in 0..6 {
            match client.tokenize("name", &[format!("After Kill {i}")]).await {
                Ok(mut t) => assert!(t.remove(0).is_ok()),
                Err(e) => {
                    assert!(e.to_string().contains("UNAVAILABLE") || e.to_string().contains("navailable"), "{e}");
                    failed += 1;
                }
            }
        }
        assert!(failed <= 1, "{failed} writes failed");
    });
    a.stop();
}
