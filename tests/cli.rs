//! The `piivault` binary, run as a process: init, check, exit codes, and a
//! vault written by one process and read by another.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::{stderr, stdout, who};

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use piivault::crypto::root::{self, Passphrase, Unlock};
use piivault::{Config, PiiValue, Vault};

const PASSPHRASE: &str = "test passphrase: long enough, never printed";
/// A raw key with as many different bytes as a random one.
const RAW_KEY_HEX: &str = "6b1f0e9a3c4d5e7f8091a2b3c4d5e6f70819a2b3c4d5e6f708192a3b4c5d6e7f";

fn piivault(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_piivault"));
    cmd.args(args).stdin(Stdio::null()).env_remove("PIIVAULT_PASSPHRASE").env_remove("PIIVAULT_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// Exit code and the single stderr line of a failed run.
fn failure(out: &Output) -> (i32, String) {
    common::failure_line(out, &[PASSPHRASE])
}

fn init(dir: &Path) -> Output {
    piivault(&["init", "--data-dir", dir.to_str().unwrap()], &[("PIIVAULT_PASSPHRASE", PASSPHRASE)])
}

fn check(dir: &Path, passphrase: &str) -> Output {
    let config = dir.join("config.toml");
    piivault(&["check", "--config", config.to_str().unwrap()], &[("PIIVAULT_PASSPHRASE", passphrase)])
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_creates_a_private_data_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vault");
    let out = init(&dir);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        format!("initialised a new vault in {} (collections: card, email, name, phone, ssn)", dir.display())
    );
    assert_eq!(mode(&dir), 0o700);
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["config.toml", "pki", "policy.toml", "root.sealed", "vault.db"]);
    assert_eq!(mode(&dir.join("pki")), 0o700);
    let mut pki: Vec<String> =
        std::fs::read_dir(dir.join("pki")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    pki.sort();
    assert_eq!(pki, ["ca.key", "ca.pem", "crl.pem", "issued.toml", "server.key", "server.pem"]);
    for (path, _) in common::all_files(&dir) {
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    let sealed = std::fs::read(dir.join("root.sealed")).unwrap();
    assert_eq!(&sealed[..6], b"PVRK\x01\x01");
    assert!(common::contains(&sealed, b"$argon2id$v=19$m=65536,t=3,p=1$"));
    assert!(!common::contains(&sealed, PASSPHRASE.as_bytes()));

    let ok = check(&dir, PASSPHRASE);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert_eq!(stdout(&ok).trim(), "ok: root key unsealed, store open, records: card=0 email=0 name=0 phone=0 ssn=0");
}

#[test]
fn init_refuses_an_existing_vault_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(init(tmp.path()).status.success());
    let before: Vec<_> = common::all_files(tmp.path());
    let out = init(tmp.path());
    let (code, err) = failure(&out);
    assert_eq!(code, 78);
    assert!(err.contains("already holds a vault"), "{err}");
    assert_eq!(common::all_files(tmp.path()), before);
}

#[test]
fn init_without_a_passphrase_is_bad_usage_and_creates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v");
    let out = piivault(&["init", "--data-dir", dir.to_str().unwrap()], &[]);
    assert_eq!(
        failure(&out),
        (64, "piivault: no passphrase: set PIIVAULT_PASSPHRASE or pass --passphrase-file\n".into())
    );
    assert!(!dir.exists());
    let empty = piivault(&["init", "--data-dir", dir.to_str().unwrap()], &[("PIIVAULT_PASSPHRASE", "\n")]);
    assert_eq!(failure(&empty), (64, "piivault: the passphrase is empty\n".into()));
    assert!(!dir.exists());
    // A passphrase below the floor is refused as a new secret.
    for weak in ["a", "short pass", "aaaaaaaaaaaaaaaaaaaaaaaa"] {
        let out = piivault(&["init", "--data-dir", dir.to_str().unwrap()], &[("PIIVAULT_PASSPHRASE", weak)]);
        assert_eq!(
            failure(&out),
            (
                64,
                "piivault: the passphrase is too weak: use at least 12 characters with at least 6 different ones\n"
                    .into()
            ),
            "{weak}"
        );
        assert!(!dir.exists());
    }
}

#[test]
fn bad_usage_exits_64_with_one_line() {
    for args in [&["frobnicate"][..], &["init"], &["check", "--config"], &["init", "--data-dir", "x", "--bogus"], &[]] {
        let out = piivault(args, &[]);
        let (code, err) = failure(&out);
        assert_eq!(code, 64, "{args:?}: {err}");
    }
    let help = piivault(&["--help"], &[]);
    assert!(help.status.success());
    assert!(stdout(&help).contains("init"));
}

#[test]
fn a_wrong_passphrase_or_a_damaged_sealed_file_exits_78() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(init(tmp.path()).status.success());
    let sealed_path = tmp.path().join("root.sealed");
    let good = std::fs::read(&sealed_path).unwrap();

    let (code, err) = failure(&check(tmp.path(), "not the passphrase"));
    assert_eq!(code, 78);
    assert!(err.contains("cannot unseal the root key: wrong passphrase or key"), "{err}");

    let mut altered = good.clone();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    std::fs::write(&sealed_path, &altered).unwrap();
    let (code, err) = failure(&check(tmp.path(), PASSPHRASE));
    assert_eq!(code, 78);
    assert!(err.contains("cannot unseal the root key"), "{err}");

    std::fs::write(&sealed_path, &good[..good.len() - 10]).unwrap();
    let (code, err) = failure(&check(tmp.path(), PASSPHRASE));
    assert_eq!(code, 78);
    assert!(err.ends_with("the sealed root file is malformed or truncated\n"), "{err}");

    std::fs::remove_file(&sealed_path).unwrap();
    let (code, err) = failure(&check(tmp.path(), PASSPHRASE));
    assert_eq!(code, 78);
    assert!(err.contains("cannot read the sealed root key"), "{err}");

    // Restored, it works again: nothing else was touched.
    std::fs::write(&sealed_path, &good).unwrap();
    assert!(check(tmp.path(), PASSPHRASE).status.success());

    // A passphrase file works the same as the variable, if only its owner
    // may read it.
    let pass_file = tmp.path().join("pass");
    std::fs::write(&pass_file, format!("{PASSPHRASE}\n")).unwrap();
    let config = tmp.path().join("config.toml");
    let with_file = || {
        piivault(
            &["check", "--config", config.to_str().unwrap(), "--passphrase-file", pass_file.to_str().unwrap()],
            &[],
        )
    };
    let (code, err) = failure(&with_file());
    assert_eq!(code, 78);
    assert_eq!(
        err,
        format!(
            "piivault: {}: the passphrase file {} may be read by group or others (mode 644); chmod 600 it\n",
            tmp.path().join("root.sealed").display(),
            pass_file.display()
        )
    );
    common::write_secret(&pass_file, format!("{PASSPHRASE}\n"));
    let out = with_file();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_bad_config_or_store_exits_78() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(init(tmp.path()).status.success());
    let config = tmp.path().join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();

    std::fs::write(&config, text.replace("prefix = \"name\"", "prefix = \"NAME!\"")).unwrap();
    let (code, err) = failure(&check(tmp.path(), PASSPHRASE));
    assert_eq!(code, 78);
    assert!(err.contains("collections.name.prefix:"), "{err}");

    std::fs::write(&config, text.replace("luhn = \"invalid\"", "luhn = \"invalid\"\nkeep_first = 6")).unwrap();
    let (code, err) = failure(&check(tmp.path(), PASSPHRASE));
    assert_eq!(code, 78);
    assert!(err.ends_with("collections.card: format \"card\" leaves 90 possible tokens for its shortest value (12 letters and digits); at least 1000000 are needed (keep fewer characters, or raise min_len)\n"), "{err}");

    // A format change would strand the tokens already issued.
    let ssn = "[collections.ssn]\nformat = \"ssn\"";
    std::fs::write(&config, text.replace(ssn, "[collections.ssn]\nformat = \"digits\"")).unwrap();
    let (code, err) = failure(&check(tmp.path(), PASSPHRASE));
    assert_eq!(code, 78);
    assert!(
        err.ends_with("collection ssn issues ssn tokens; the configuration says digits, and the tokens already issued would stop answering (restore the collection's format, or declare a new collection)\n"),
        "{err}"
    );

    std::fs::write(&config, text.replace("[limits]", "[limits]\nmax_widgets = 3")).unwrap();
    let (code, err) = failure(&check(tmp.path(), PASSPHRASE));
    assert_eq!(code, 78);
    assert!(err.contains("unknown field `max_widgets`"), "{err}");
    std::fs::write(&config, &text).unwrap();

    let db = tmp.path().join("vault.db");
    let real = std::fs::read(&db).unwrap();
    std::fs::write(&db, vec![0x5a; 8192]).unwrap();
    let (code, err) = failure(&check(tmp.path(), PASSPHRASE));
    assert_eq!(code, 78);
    assert!(err.ends_with("the database file is not a piivault store\n"), "{err}");
    std::fs::write(&db, real).unwrap();
    assert!(check(tmp.path(), PASSPHRASE).status.success());

    let (code, _) = failure(&check(&tmp.path().join("missing"), PASSPHRASE));
    assert_eq!(code, 78);
}

#[test]
fn a_raw_key_from_the_environment_or_a_file_seals_the_root() {
    let tmp = tempfile::tempdir().unwrap();
    let key = RAW_KEY_HEX.to_owned();
    let dir = tmp.path().join("env");
    // A degenerate key (one byte repeated) is refused as a new secret.
    let degenerate = piivault(
        &["init", "--data-dir", dir.to_str().unwrap(), "--raw-key-env", "MY_ROOT_KEY"],
        &[("MY_ROOT_KEY", &"3f".repeat(32))],
    );
    assert_eq!(
        failure(&degenerate),
        (78, "piivault: the raw key is degenerate (fewer than 16 different bytes): generate it with a CSPRNG\n".into())
    );
    assert!(!dir.exists());
    let out = piivault(
        &["init", "--data-dir", dir.to_str().unwrap(), "--raw-key-env", "MY_ROOT_KEY"],
        &[("MY_ROOT_KEY", &key)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let config = dir.join("config.toml");
    let check_env = |value: &str| piivault(&["check", "--config", config.to_str().unwrap()], &[("MY_ROOT_KEY", value)]);
    assert!(check_env(&key).status.success());
    let (code, err) = failure(&check_env(&"3e".repeat(32)));
    assert_eq!((code, err.contains("cannot unseal the root key")), (78, true), "{err}");
    let (code, err) = failure(&check_env("abcd"));
    assert_eq!(code, 78);
    assert!(err.contains("a raw root key must be exactly 32 bytes"), "{err}");
    let (code, err) = failure(&piivault(&["check", "--config", config.to_str().unwrap()], &[]));
    assert_eq!(code, 78);
    assert!(err.contains("$MY_ROOT_KEY is not set"), "{err}");

    let key_file = tmp.path().join("root.key");
    common::write_secret(&key_file, (100u8..132).collect::<Vec<_>>());
    let dir = tmp.path().join("file");
    let out =
        piivault(&["init", "--data-dir", dir.to_str().unwrap(), "--raw-key-file", key_file.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(check(&dir, "ignored").status.success());
    std::fs::write(&key_file, [0x42u8; 31]).unwrap();
    let (code, err) = failure(&check(&dir, "ignored"));
    assert_eq!(code, 78);
    assert!(err.contains("exactly 32 bytes"), "{err}");
}

/// A vault made by `piivault init` (process 1), tokenized into by this test
/// (process 2), read back by a fresh process of this test binary (3).
#[test]
fn a_second_process_detokenizes_what_the_first_tokenized() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(init(tmp.path()).status.success());
    let values = ["4111 1111 1111 1111", "jane@example.org", "Zoë"];
    let collections = ["card", "email", "name"];
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let tokens: Vec<String> = runtime.block_on(async {
        let (config, root) = open_config(tmp.path());
        let vault = Vault::open(&config, &root).await.unwrap();
        let mut tokens = Vec::new();
        for (collection, value) in collections.iter().zip(values) {
            let result = vault.tokenize(&who(), collection, vec![PiiValue::from(value)]).await.unwrap();
            tokens.push(result.into_iter().next().unwrap().unwrap().into_string());
        }
        tokens
    });
    let handoff = tmp.path().join("tokens.txt");
    std::fs::write(&handoff, tokens.join("\n")).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_detokenizes_from_another_process", "--ignored", "--nocapture"])
        .env("PIIVAULT_TEST_DIR", tmp.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&child.stdout);
    assert!(child.status.success(), "child failed: {out}");
    assert!(out.contains("1 passed"), "the child test did not run: {out}");
}

fn open_config(dir: &Path) -> (Config, root::RootKey) {
    let config = Config::load(&dir.join("config.toml")).unwrap();
    let sealed = std::fs::read(&config.sealed_root).unwrap();
    let unlock = Unlock::Passphrase(Passphrase::new(PASSPHRASE.to_owned()).unwrap());
    let root = root::unseal(&sealed, &unlock).unwrap();
    (config, root)
}

/// Run only by `a_second_process_detokenizes_what_the_first_tokenized`.
#[test]
#[ignore = "run as a child process by a_second_process_detokenizes_what_the_first_tokenized"]
fn child_detokenizes_from_another_process() {
    let dir = PathBuf::from(std::env::var_os("PIIVAULT_TEST_DIR").expect("run by the parent test"));
    let tokens: Vec<String> =
        std::fs::read_to_string(dir.join("tokens.txt")).unwrap().lines().map(String::from).collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (config, root) = open_config(&dir);
        let vault = Vault::open(&config, &root).await.unwrap();
        let expected = [("card", "4111 1111 1111 1111"), ("email", "jane@example.org"), ("name", "Zoë")];
        for (token, (collection, value)) in tokens.iter().zip(expected) {
            let back = vault.detokenize(&who(), collection, vec![token.clone()]).await.unwrap();
            let back = back.into_iter().next().unwrap().unwrap();
            assert!(back.expose_secret() == value, "{collection} did not round-trip across processes");
        }
    });
}

#[test]
fn certs_issue_list_and_revoke() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(init(tmp.path()).status.success());
    let dir = tmp.path().to_str().unwrap();
    let out = piivault(&["certs", "issue", "--data-dir", dir, "--name", "payments-api", "--days", "30"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("for spiffe://piivault.local/payments-api (serial "), "{text}");
    let client = tmp.path().join("clients/payments-api");
    assert_eq!(mode(&client.join("key.pem")), 0o600);
    assert_eq!(mode(&client), 0o700);
    assert!(std::fs::read_to_string(client.join("cert.pem")).unwrap().starts_with("-----BEGIN CERTIFICATE-----"));

    let list = piivault(&["certs", "list", "--data-dir", dir, "--json"], &[]);
    let listed: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["name"], "payments-api");
    assert!(listed[0].get("revoked_at").is_none());
    let serial = listed[0]["serial"].as_str().unwrap().to_owned();

    let out = piivault(&["certs", "revoke", "--data-dir", dir, "payments-api"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with(&format!("revoked payments-api (serial {serial})")));
    let table = stdout(&piivault(&["certs", "list", "--data-dir", dir], &[]));
    let row = table.lines().nth(1).unwrap();
    assert!(row.starts_with("payments-api") && row.contains(&serial) && row.contains("revoked 20"), "{table}");

    let (code, err) = failure(&piivault(&["certs", "revoke", "--data-dir", dir, "payments-api"], &[]));
    assert_eq!((code, err.contains("no unrevoked certificate matches payments-api")), (64, true), "{err}");
    let (code, err) = failure(&piivault(&["certs", "issue", "--data-dir", dir, "--name", "bad name"], &[]));
    assert_eq!(code, 64, "{err}");
    let (code, _) = failure(&piivault(&["certs", "issue", "--data-dir", dir, "--name", "x", "--days", "0"], &[]));
    assert_eq!(code, 64);
    // Re-issuing the server certificate for another name keeps the CA.
    let ca_before = std::fs::read(tmp.path().join("pki/ca.pem")).unwrap();
    let out = piivault(
        &["certs", "init", "--data-dir", dir, "--server-name", "vault.internal", "--server-name", "10.0.0.5"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(tmp.path().join("pki/ca.pem")).unwrap(), ca_before);
}

#[test]
fn serve_refuses_a_bad_policy_or_a_wrong_passphrase_with_78() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(init(tmp.path()).status.success());
    let config = tmp.path().join("config.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("127.0.0.1:7443", "127.0.0.1:0")
        .replace("127.0.0.1:9464", "127.0.0.1:0");
    std::fs::write(&config, text).unwrap();
    std::fs::write(tmp.path().join("policy.toml"), "[callers.app]\ntokenize = [\"card\", \"passport\"]\n").unwrap();
    let serve = |passphrase: &str| {
        piivault(&["serve", "--config", config.to_str().unwrap()], &[("PIIVAULT_PASSPHRASE", passphrase)])
    };
    let (code, err) = failure(&serve(PASSPHRASE));
    assert_eq!(code, 78);
    assert!(err.contains("policy.toml: line 2: caller app: tokenize names unknown collection \"passport\""), "{err}");
    std::fs::write(tmp.path().join("policy.toml"), "[callers.app]\ntokenize = [\"card\"]\n").unwrap();
    let (code, err) = failure(&serve("wrong"));
    assert_eq!(code, 78);
    assert!(err.contains("cannot unseal the root key"), "{err}");
}

/// `piivault serve` on an initialised `dir` whose config and policy are
/// edited by `config` and `policy`, with caller `app` certified: the child,
/// its address.
fn serve_edited(dir: &Path, config: impl FnOnce(String) -> String, policy: &str) -> (std::process::Child, String) {
    use std::io::BufRead as _;

    assert!(init(dir).status.success());
    let path = dir.join("config.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("127.0.0.1:7443", "127.0.0.1:0")
        .replace("127.0.0.1:9464", "127.0.0.1:0");
    std::fs::write(&path, config(text)).unwrap();
    std::fs::write(dir.join("policy.toml"), policy).unwrap();
    let ca = piivault::pki::Ca::load(dir).unwrap();
    ca.issue(&"app".parse().unwrap(), "piivault.local", 1, &dir.join("clients/app")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_piivault"))
        .args(["serve", "--config", path.to_str().unwrap()])
        .env("PIIVAULT_PASSPHRASE", PASSPHRASE)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = std::io::BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.strip_prefix("piivault: listening on ").map(str::to_owned))
        .unwrap();
    (child, addr)
}

/// Stops a served child with SIGTERM; its log (stderr).
fn stop_served(child: std::process::Child) -> String {
    Command::new("kill").args(["-s", "TERM", &child.id().to_string()]).status().unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stderr).unwrap()
}

/// The command-line client as `app` against a served `dir`.
fn as_app(dir: &Path, addr: &str, args: &[&str]) -> Output {
    let mut all = vec![args[0], "--addr", addr, "--data-dir", dir.to_str().unwrap(), "--as", "app"];
    all.extend_from_slice(&args[1..]);
    piivault(&all, &[])
}

/// `log_format = "json"`: one JSON object per line, with the RPC fields.
#[test]
fn json_logs_carry_the_rpc_fields_and_no_values() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, addr) = serve_edited(
        tmp.path(),
        |text| text.replace("log_format = \"text\"", "log_format = \"json\""),
        "[callers.app]\ntokenize = [\"*\"]\n",
    );
    let value = "json-log-secret-4111";
    let out = as_app(tmp.path(), &addr, &["tokenize", "--collection", "name", value]);
    assert!(out.status.success(), "{}", stderr(&out));
    let logs = stop_served(child);
    assert!(!logs.contains(value));
    let rpc = logs
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .find(|l| l["message"] == "rpc")
        .expect("an rpc log line");
    assert_eq!(rpc["caller"], "app");
    assert_eq!(rpc["method"], "Tokenize");
    assert_eq!(rpc["collection"], "name");
    assert_eq!(rpc["items"], 1);
    assert_eq!(rpc["outcome"], "OK");
    assert!(rpc["latency_ms"].as_f64().unwrap() >= 0.0);
}

/// A collection with a `ttl`: the server's background purge erases its
/// expired records (and says so), and an expired token is not found.
#[test]
fn serve_purges_expired_records() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, addr) = serve_edited(
        tmp.path(),
        |text| {
            text.replace("purge_interval_s = 60", "purge_interval_s = 1")
                + "\n[collections.otp]\nformat = \"digits\"\nttl = \"1s\"\n"
        },
        "[callers.app]\ntokenize = [\"otp\"]\ndetokenize = [\"otp\"]\n",
    );
    let out = as_app(tmp.path(), &addr, &["tokenize", "--collection", "otp", "481516"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out).trim().to_owned();
    assert_eq!(token.len(), 6);
    let out = as_app(tmp.path(), &addr, &["detokenize", "--collection", "otp", &token]);
    assert_eq!(stdout(&out).trim(), "481516");
    std::thread::sleep(std::time::Duration::from_secs(3));
    let out = as_app(tmp.path(), &addr, &["detokenize", "--collection", "otp", &token]);
    assert_eq!((out.status.code(), stdout(&out).trim()), (Some(1), "error: NOT_FOUND: token not found"));
    let logs = stop_served(child);
    let purged = logs.lines().find(|l| l.contains("expired records purged")).unwrap_or_else(|| panic!("{logs}"));
    assert!(purged.contains("purged=1"), "{purged}");
    assert!(!logs.contains("481516"));
}

/// Offline `keys rotate-root`: the old passphrase stops working, the new one
/// opens everything; and both halves of an interrupted rotation recover.
#[test]
fn rotate_root_offline_and_recovery_from_an_interruption() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(init(tmp.path()).status.success());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let token = runtime.block_on(async {
        let (config, root) = open_config(tmp.path());
        let vault = Vault::open(&config, &root).await.unwrap();
        let t = vault.tokenize(&who(), "ssn", vec![PiiValue::from("078-05-1120")]).await.unwrap();
        t.into_iter().next().unwrap().unwrap().into_string()
    });
    let sealed_path = tmp.path().join("root.sealed");
    let old_sealed = std::fs::read(&sealed_path).unwrap();
    let new_pass = tmp.path().join("new-pass");
    common::write_secret(&new_pass, "a brand new passphrase\n");
    let dir = tmp.path().to_str().unwrap();
    let out = piivault(
        &["keys", "rotate-root", "--data-dir", dir, "--new-passphrase-file", new_pass.to_str().unwrap()],
        &[("PIIVAULT_PASSPHRASE", PASSPHRASE)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("root key rotated: 13 keys re-wrapped"), "{}", stdout(&out));
    let new_sealed = std::fs::read(&sealed_path).unwrap();
    assert_ne!(new_sealed, old_sealed);
    assert!(!tmp.path().join("root.sealed.new").exists());

    let (code, err) = failure(&check(tmp.path(), PASSPHRASE));
    assert_eq!(code, 78, "{err}");
    assert!(check(tmp.path(), "a brand new passphrase").status.success());
    let read_back = |passphrase: &str| {
        runtime.block_on(async {
            let config = Config::load(&tmp.path().join("config.toml")).unwrap();
            let unlock = Unlock::Passphrase(Passphrase::new(passphrase.to_owned()).unwrap());
            let root = root::unseal(&std::fs::read(&config.sealed_root).unwrap(), &unlock).unwrap();
            let vault = Vault::open(&config, &root).await.unwrap();
            let back = vault.detokenize(&who(), "ssn", vec![token.clone()]).await.unwrap();
            assert!(vault.verify_audit().await.unwrap().is_ok());
            back.into_iter().next().unwrap().unwrap().expose_secret().to_owned()
        })
    };
    assert_eq!(read_back("a brand new passphrase"), "078-05-1120");

    // Interrupted after the keys were re-wrapped, before the rename: the new
    // file is still beside the old one. The new passphrase finishes it.
    std::fs::write(tmp.path().join("root.sealed.new"), &new_sealed).unwrap();
    std::fs::write(&sealed_path, &old_sealed).unwrap();
    let (code, err) = failure(&check(tmp.path(), PASSPHRASE));
    assert_eq!(code, 78);
    assert!(err.contains("an interrupted root-key rotation left"), "{err}");
    assert!(check(tmp.path(), "a brand new passphrase").status.success());
    assert_eq!(std::fs::read(&sealed_path).unwrap(), new_sealed);
    assert!(!tmp.path().join("root.sealed.new").exists());

    // Interrupted before the keys were re-wrapped: the leftover new file is
    // discarded once the (still valid) current passphrase opens the vault.
    let (_, stray) =
        root::create(&Unlock::Passphrase(Passphrase::new("never committed".into()).unwrap()), root::MIN_KDF).unwrap();
    std::fs::write(tmp.path().join("root.sealed.new"), &stray).unwrap();
    let (code, _) = failure(&check(tmp.path(), "never committed"));
    assert_eq!(code, 78);
    assert!(check(tmp.path(), "a brand new passphrase").status.success());
    assert!(!tmp.path().join("root.sealed.new").exists());
    assert_eq!(read_back("a brand new passphrase"), "078-05-1120");
}

/// `server.max_connections = 2`: a third connection is closed at accept
/// (and logged) while two are open; once one closes, a new one gets in.
#[test]
fn connections_over_the_cap_are_closed_at_accept() {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

    let tmp = tempfile::tempdir().unwrap();
    let (child, addr) = serve_edited(
        tmp.path(),
        |text| text.replace("max_connections = 1024", "max_connections = 2"),
        "[callers.app]\ntokenize = [\"name\"]\n",
    );
    let read = |p: &str| std::fs::read(tmp.path().join(p)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("pki/ca.pem")))
        .identity(Identity::from_pem(read("clients/app/cert.pem"), read("clients/app/key.pem")));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let endpoint = Endpoint::from_shared(format!("https://{addr}")).unwrap().tls_config(tls).unwrap();
    let mut held: Vec<_> = (0..2).map(|_| runtime.block_on(endpoint.connect()).unwrap()).collect();
    for channel in &held {
        let mut client = piivault::grpc::proto::tokenizer_client::TokenizerClient::new(channel.clone());
        let request = piivault::grpc::proto::TokenizeRequest { collection: "name".into(), values: vec!["held".into()] };
        assert_eq!(runtime.block_on(client.tokenize(request)).unwrap().into_inner().results.len(), 1);
    }
    let over = as_app(tmp.path(), &addr, &["tokenize", "--collection", "name", "third"]);
    assert_eq!(over.status.code(), Some(1));
    assert!(stderr(&over).starts_with(&format!("piivault: cannot connect to {addr}")), "{}", stderr(&over));
    held.pop();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let after = as_app(tmp.path(), &addr, &["tokenize", "--collection", "name", "fourth"]);
    assert!(after.status.success(), "{}", stderr(&after));
    drop(held);
    drop(runtime);
    let logs = stop_served(child);
    assert_eq!(logs.matches("connection refused: server.max_connections reached").count(), 1, "{logs}");
}

/// A peer that completes the TLS handshake and then sends nothing (no
/// HTTP/2 preface) is disconnected after `handshake_timeout_ms`, giving its
/// place under `max_connections` back.
#[test]
fn a_connection_silent_after_tls_is_closed() {
    use rustls::pki_types::ServerName;
    use tokio::io::AsyncReadExt as _;

    let tmp = tempfile::tempdir().unwrap();
    let (child, addr) = serve_edited(
        tmp.path(),
        |text| {
            text.replace("max_connections = 1024", "max_connections = 1")
                .replace("handshake_timeout_ms = 10000", "handshake_timeout_ms = 1000")
        },
        "[callers.app]\ntokenize = [\"name\"]\n",
    );
    let connector = common::server::raw_tls_connector(tmp.path(), "app");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (closed_after, refused_meanwhile) = runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let mut silent = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
        let started = std::time::Instant::now();
        // The only slot is taken: another caller is refused meanwhile.
        let addr = addr.clone();
        let dir = tmp.path().to_owned();
        let refused = tokio::task::spawn_blocking(move || {
            !as_app(&dir, &addr, &["tokenize", "--collection", "name", "meanwhile"]).status.success()
        });
        // The server's own HTTP/2 settings arrive; then the connection ends.
        let mut received = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(20), silent.read_to_end(&mut received)).await;
        assert!(read.is_ok(), "the silent connection was not closed");
        (started.elapsed(), refused.await.unwrap())
    });
    assert!(refused_meanwhile);
    assert!(closed_after >= std::time::Duration::from_millis(900), "{closed_after:?}");
    assert!(closed_after < std::time::Duration::from_secs(10), "{closed_after:?}");
    let after = as_app(tmp.path(), &addr, &["tokenize", "--collection", "name", "after"]);
    assert!(after.status.success(), "{}", stderr(&after));
    drop(runtime);
    let logs = stop_served(child);
    assert_eq!(logs.matches("connection closed: nothing sent after the TLS handshake").count(), 1, "{logs}");
}

/// A changed policy.toml is reloaded without a signal; a malformed one
/// keeps the previous policy and says why in the log.
#[test]
fn a_changed_policy_file_is_reloaded_and_a_broken_one_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, addr) = serve_edited(
        tmp.path(),
        |text| text.replace("reload_check_interval_s = 2", "reload_check_interval_s = 1"),
        "[callers.app]\ntokenize = [\"name\"]\n",
    );
    let card = |value: &str| as_app(tmp.path(), &addr, &["tokenize", "--collection", "card", value]);
    let denied = card("4000 0566 5566 5556");
    assert_eq!(stderr(&denied).trim(), "piivault: PERMISSION_DENIED: permission denied for this collection");

    std::fs::write(tmp.path().join("policy.toml"), "[callers.app]\ntokenize = [\"name\", \"card\"]\n").unwrap();
    let granted = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(200));
        card("4000 0566 5566 5556").status.success()
    });
    assert!(granted, "the new grant never took effect");

    std::fs::write(tmp.path().join("policy.toml"), "[callers.app]\ntokenize = [\"passport\"]\n").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let still = card("5105 1051 0510 5100");
    assert!(still.status.success(), "the previous policy was not kept: {}", stderr(&still));
    let logs = stop_served(child);
    assert!(logs.contains("policy or TLS files changed: reloading"), "{logs}");
    assert!(logs.contains("policy reload failed; keeping the previous policy"), "{logs}");
    assert!(logs.contains("unknown collection \"passport\""), "{logs}");
}

/// The passphrase and a raw key given in the environment leave it once read:
/// `/proc/PID/environ` of the running server, readable by its owner and
/// root, no longer holds either (their bytes are overwritten in place).
#[test]
fn secrets_leave_the_environment_of_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, _addr) = serve_edited(tmp.path(), |t| t, "");
    let environ = std::fs::read(format!("/proc/{}/environ", child.id())).unwrap();
    assert!(!common::contains(&environ, PASSPHRASE.as_bytes()), "the passphrase is still in the environment");
    assert!(common::contains(&environ, b"PATH="), "the rest of the environment is intact");
    stop_served(child);

    let raw = tmp.path().join("raw");
    let key = RAW_KEY_HEX;
    let env = [("MY_RAW_ROOT_KEY", key)];
    let init = piivault(&["init", "--data-dir", raw.to_str().unwrap(), "--raw-key-env", "MY_RAW_ROOT_KEY"], &env);
    assert!(init.status.success(), "{}", stderr(&init));
    let config = raw.join("config.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("127.0.0.1:7443", "127.0.0.1:0")
        .replace("127.0.0.1:9464", "none");
    std::fs::write(&config, text).unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_piivault"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .envs(env)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(server.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert!(line.starts_with("piivault: listening on "), "{line}");
    let environ = std::fs::read(format!("/proc/{}/environ", server.id())).unwrap();
    assert!(!common::contains(&environ, key.as_bytes()), "the raw key is still in the environment");
    server.kill().unwrap();
    server.wait().unwrap();
}
