//! The `pkcs11` root-key provider against a real PKCS#11 module: `SoftHSM`,
//! with a token initialized per test in a temporary directory
//! (`SOFTHSM2_CONF`). The piivault binary runs as a process; what the tests
//! themselves do through PKCS#11 (read a key's attributes, make an
//! extractable key, delete a key, decrypt the sealed root) runs in a child
//! process of this test binary (`hsm_probe`), so that the environment is
//! set before the module is loaded.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::{stderr, stdout};

use std::io::{BufRead as _, Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const PIN: &str = "4917-pin-never-printed";
const SO_PIN: &str = "8021-so-pin";
const TOKEN: &str = "piivault-test";
const PASSPHRASE: &str = "hsm test passphrase: long enough, never printed";
const VALUES: [&str; 3] = ["Ada Lovelace", "Grace Hopper", "Katherine Johnson"];

/// Where Debian puts `SoftHSM`'s module. Missing means the test command did
/// not install `softhsm2`: a failure, never a skip.
fn module() -> &'static str {
    const CANDIDATES: [&str; 2] =
        ["/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"];
    CANDIDATES
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("libsofthsm2.so is missing: install Debian's softhsm2 (scripts/test-all does)")
}

/// A `SoftHSM` token in a temporary directory, and a data directory beside it.
struct Hsm {
    tmp: tempfile::TempDir,
    conf: PathBuf,
}

impl Hsm {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let tokens = tmp.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = tmp.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", tokens.display()),
        )
        .unwrap();
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", SO_PIN])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .expect("softhsm2-util is missing: install Debian's softhsm2 (scripts/test-all does)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let hsm = Self { tmp, conf };
        hsm.write_secret("pin", PIN);
        hsm
    }

    /// Whether `SoftHSM` still lists the token.
    fn token_listed(&self) -> bool {
        let out = Command::new("softhsm2-util").arg("--show-slots").env("SOFTHSM2_CONF", &self.conf).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim().strip_prefix("Label:").map(str::trim) == Some(TOKEN))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn dir(&self) -> PathBuf {
        self.path("vault")
    }

    /// A 0600 file holding `text`.
    fn write_secret(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, format!("{text}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// The piivault binary with this token's configuration.
    fn piivault(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let out = self.command(args, env).stdin(Stdio::null()).output().unwrap();
        self.log(&out.stdout);
        self.log(&out.stderr);
        out
    }

    fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_piivault"));
        cmd.args(args).env("SOFTHSM2_CONF", &self.conf).env_remove("PIIVAULT_PASSPHRASE").env_remove("PIIVAULT_LOG");
        cmd.envs(env.iter().copied());
        cmd
    }

    /// Everything any process printed, for the final grep.
    fn log(&self, bytes: &[u8]) {
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(self.path("all-output.log")).unwrap();
        file.write_all(bytes).unwrap();
    }

    fn init_pkcs11(&self, key_label: &str) -> Output {
        let pin = self.path("pin");
        let dir = self.dir();
        self.piivault(
            &[
                "init",
                "--data-dir",
                dir.to_str().unwrap(),
                "--pkcs11-module",
                module(),
                "--pkcs11-token-label",
                TOKEN,
                "--pkcs11-pin-file",
                pin.to_str().unwrap(),
                "--pkcs11-key-label",
                key_label,
            ],
            &[],
        )
    }

    fn config(&self) -> PathBuf {
        self.dir().join("config.toml")
    }

    fn check(&self, env: &[(&str, &str)]) -> Output {
        let config = self.config();
        self.piivault(&["check", "--config", config.to_str().unwrap()], env)
    }

    /// Rewrites config.toml.
    fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(self.config()).unwrap();
        std::fs::write(self.config(), edit(text)).unwrap();
    }

    /// Ports 0, a policy for `app` (tokenize and detokenize `name`),
    /// `admin` (data keys: not the root) and `root-admin` (`rotate_root`
    /// only), and their certificates.
    fn prepare_serving(&self) {
        self.edit_config(|t| t.replace("127.0.0.1:7443", "127.0.0.1:0").replace("127.0.0.1:9464", "127.0.0.1:0"));
        let dir = self.dir();
        std::fs::write(
            dir.join("policy.toml"),
            "[callers.app]\ntokenize = [\"name\"]\ndetokenize = [\"name\"]\n[callers.admin]\nadmin = true\n\
             [callers.root-admin]\nrotate_root = true\n",
        )
        .unwrap();
        let ca = piivault::pki::Ca::load(&dir).unwrap();
        for name in ["app", "admin", "root-admin"] {
            ca.issue(&name.parse().unwrap(), "piivault.local", 1, &dir.join("clients").join(name)).unwrap();
        }
    }

    /// `piivault serve`; its gRPC and metrics addresses.
    fn serve(&self, env: &[(&str, &str)]) -> Served {
        let config = self.config();
        let mut child = self
            .command(&["serve", "--config", config.to_str().unwrap()], env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut metrics = None;
        let mut addr = None;
        for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok) {
            self.log(line.as_bytes());
            if let Some(m) = line.strip_prefix("piivault: metrics on http://") {
                metrics = Some(m.trim_end_matches("/metrics").to_owned());
            }
            if let Some(a) = line.strip_prefix("piivault: listening on ") {
                addr = Some(a.to_owned());
                break;
            }
        }
        let addr = addr.unwrap_or_else(|| {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("serve did not start: {err}")
        });
        Served { child, addr, metrics: metrics.unwrap() }
    }

    /// The command-line client as `who` against a served vault.
    fn call(&self, served: &Served, who: &str, args: &[&str]) -> Output {
        self.call_with(served, who, args, &[])
    }

    /// [`Hsm::call`] with environment variables for the client.
    fn call_with(&self, served: &Served, who: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        let dir = self.dir();
        // After the (sub)command's words: `keys rotate-root`, `tokenize`.
        let words = if args[0] == "keys" { 2 } else { 1 };
        let mut all = args[..words].to_vec();
        all.extend(["--addr", &served.addr, "--data-dir", dir.to_str().unwrap(), "--as", who]);
        all.extend_from_slice(&args[words..]);
        self.piivault(&all, env)
    }

    fn tokenize(&self, served: &Served) -> Vec<String> {
        let mut args = vec!["tokenize", "--collection", "name"];
        args.extend(VALUES);
        let out = self.call(served, "app", &args);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).lines().map(str::to_owned).collect()
    }

    fn assert_detokenizes(&self, served: &Served, tokens: &[String]) {
        let mut args = vec!["detokenize", "--collection", "name"];
        args.extend(tokens.iter().map(String::as_str));
        let out = self.call(served, "app", &args);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out).lines().collect::<Vec<_>>(), VALUES, "the values did not come back");
    }

    /// Runs `op` in a child of this test binary with the token's
    /// configuration (see `hsm_probe`); its stdout.
    fn probe(&self, op: &str, arg: &str) -> String {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "hsm_probe", "--ignored", "--nocapture", "--test-threads", "1"])
            .env("SOFTHSM2_CONF", &self.conf)
            .env("PIIVAULT_HSM_PROBE", op)
            .env("PIIVAULT_HSM_PROBE_ARG", arg)
            .env("PIIVAULT_HSM_PROBE_OUT", self.path("probe.out"))
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success() && printed.contains("1 passed"), "probe {op} failed: {printed}");
        std::fs::read_to_string(self.path("probe.out")).unwrap()
    }

    /// The root key, decrypted through the token from root.sealed (kept in
    /// a file, never printed).
    fn root_key(&self) -> Vec<u8> {
        let sealed = self.dir().join("root.sealed");
        hex::decode(self.probe("unseal", sealed.to_str().unwrap()).trim()).unwrap()
    }

    /// Neither the PIN nor the root key (raw or hex) in any file of the data
    /// directory or in anything a process printed.
    fn assert_no_secret_anywhere(&self, root_key: &[u8]) {
        let mut files = vec![self.path("all-output.log")];
        let mut dirs = vec![self.dir()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() { dirs.push(path) } else { files.push(path) }
            }
        }
        assert!(files.len() > 8, "{files:?}");
        let hex_key = hex::encode(root_key);
        for file in files {
            let bytes = std::fs::read(&file).unwrap();
            for needle in [PIN.as_bytes(), root_key, hex_key.as_bytes(), hex_key.to_uppercase().as_bytes()] {
                assert!(!bytes.windows(needle.len()).any(|w| w == needle), "a secret is in {}", file.display());
            }
        }
    }
}

struct Served {
    child: Child,
    addr: String,
    metrics: String,
}

impl Served {
    fn metrics(&self) -> String {
        let mut stream = std::net::TcpStream::connect(&self.metrics).unwrap();
        write!(stream, "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    }

    /// SIGTERM, and its log.
    fn stop(self, hsm: &Hsm) -> String {
        Command::new("kill").args(["-s", "TERM", &self.child.id().to_string()]).status().unwrap();
        let out = self.child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        hsm.log(&out.stderr);
        String::from_utf8(out.stderr).unwrap()
    }
}

/// Exit code and the single stderr line of a failed run (trimmed), checked
/// free of the PIN and the passphrase.
fn failure(out: &Output) -> (i32, String) {
    let (code, err) = common::failure_line(out, &[PIN, PASSPHRASE]);
    (code, err.trim().to_owned())
}

/// The provider byte of a sealed root file: 1 passphrase, 2 raw, 3 pkcs11.
fn sealed_provider(path: &Path) -> u8 {
    std::fs::read(path).unwrap()[5]
}

/// The audit records of a stopped vault, as JSON (offline query).
fn audit_actions(hsm: &Hsm, env: &[(&str, &str)]) -> Vec<serde_json::Value> {
    let dir = hsm.dir();
    let out = hsm.piivault(&["audit", "query", "--data-dir", dir.to_str().unwrap(), "--json"], env);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Init through the token, serve, tokenize and detokenize, restart (a
/// second unseal), read again; each unseal is audited and counted; the
/// sealed file names the token and key; no PIN or root key anywhere.
#[test]
fn init_serve_and_restart_through_the_token() {
    let hsm = Hsm::new();
    let out = hsm.init_pkcs11("piivault-root");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with(
            "root key sealed by the PKCS#11 key \"piivault-root\", created in the token (sensitive, never extractable)"
        ),
        "{}",
        stdout(&out)
    );
    let config = std::fs::read_to_string(hsm.config()).unwrap();
    assert!(config.contains("provider = \"pkcs11\""), "{config}");
    assert!(config.contains(&format!("token_label = \"{TOKEN}\"")), "{config}");
    let sealed = std::fs::read(hsm.dir().join("root.sealed")).unwrap();
    assert_eq!(sealed[5], 3, "provider byte: pkcs11");
    let uri = format!("pkcs11:token={TOKEN};object=piivault-root;type=secret-key");
    assert!(sealed.windows(uri.len()).any(|w| w == uri.as_bytes()), "the file records token and key");

    let checked = hsm.check(&[]);
    assert!(checked.status.success(), "{}", stderr(&checked));
    assert!(stdout(&checked).starts_with("ok: root key unsealed"), "{}", stdout(&checked));

    hsm.prepare_serving();
    let served = hsm.serve(&[]);
    let tokens = hsm.tokenize(&served);
    assert_eq!(tokens.len(), 3);
    hsm.assert_detokenizes(&served, &tokens);
    let metrics = served.metrics();
    assert!(
        metrics
            .contains("piivault_root_key_operations_total{operation=\"unseal\",provider=\"pkcs11\",outcome=\"ok\"} 1"),
        "{metrics}"
    );
    let log = served.stop(&hsm);
    assert!(log.contains("root key unsealed") && log.contains("provider=\"pkcs11\""), "{log}");

    let served = hsm.serve(&[]);
    hsm.assert_detokenizes(&served, &tokens);
    served.stop(&hsm);

    let unseals: Vec<_> = audit_actions(&hsm, &[])
        .into_iter()
        .filter(|r| r["action"] == "unseal")
        .map(|r| r["error_code"].clone())
        .collect();
    // check, and two starts.
    assert_eq!(unseals, ["pkcs11", "pkcs11", "pkcs11"]);
    hsm.assert_no_secret_anywhere(&hsm.root_key());
}

/// Wrong PIN, missing key, missing module, token not found, PIN variable
/// unset, PIN file readable by others: each refused at start with exit 78
/// and one precise line, never the PIN.
#[test]
fn every_token_failure_at_start_exits_78() {
    let hsm = Hsm::new();
    assert!(hsm.init_pkcs11("piivault-root").status.success());
    let original = std::fs::read_to_string(hsm.config()).unwrap();
    let pin = hsm.path("pin");
    let pin = pin.to_str().unwrap();
    let with_config = |edit: &dyn Fn(&str) -> String| {
        std::fs::write(hsm.config(), edit(&original)).unwrap();
        let result = failure(&hsm.check(&[]));
        std::fs::write(hsm.config(), &original).unwrap();
        result
    };
    let config_dir = hsm.dir().join("root.sealed");
    let sealed = config_dir.display();

    let wrong = hsm.write_secret("wrong-pin", "0000");
    assert_eq!(
        with_config(&|t| t.replace(pin, wrong.to_str().unwrap())),
        (78, format!("piivault: {sealed}: the PKCS#11 token refused the PIN (CKR_PIN_INCORRECT)"))
    );
    assert_eq!(
        with_config(&|t| t.replace(module(), "/nonexistent/libpkcs11.so")),
        (78, format!("piivault: {sealed}: cannot load the PKCS#11 module /nonexistent/libpkcs11.so: no such file"))
    );
    assert_eq!(
        with_config(&|t| t.replace(&format!("token_label = \"{TOKEN}\""), "token_label = \"elsewhere\"")),
        (78, format!("piivault: {sealed}: no PKCS#11 token with label \"elsewhere\" in the module's slots"))
    );
    assert_eq!(
        with_config(&|t| t.replace(&format!("pin_file = \"{pin}\""), "pin_env = \"PIIVAULT_TEST_PIN\"")),
        (78, format!("piivault: {sealed}: the PKCS#11 PIN variable $PIIVAULT_TEST_PIN is not set"))
    );
    std::fs::set_permissions(hsm.path("pin"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, message) = failure(&hsm.check(&[]));
    assert_eq!(code, 78);
    assert!(message.ends_with("may be read by group or others (mode 644); chmod 600 it"), "{message}");
    std::fs::set_permissions(hsm.path("pin"), std::fs::Permissions::from_mode(0o600)).unwrap();

    // The PIN from a variable works, and is gone from the environment of
    // the server (its children and /proc/PID/environ updates never see it).
    std::fs::write(hsm.config(), original.replace(&format!("pin_file = \"{pin}\""), "pin_env = \"PIIVAULT_TEST_PIN\""))
        .unwrap();
    let checked = hsm.check(&[("PIIVAULT_TEST_PIN", PIN)]);
    assert!(checked.status.success(), "{}", stderr(&checked));
    std::fs::write(hsm.config(), &original).unwrap();

    hsm.probe("delete", "piivault-root");
    assert_eq!(
        failure(&hsm.check(&[])),
        (78, format!("piivault: {sealed}: no AES key labelled \"piivault-root\" in the PKCS#11 token"))
    );
}

/// The key piivault makes is sensitive and never extractable, and its value
/// cannot be read through PKCS#11; an existing extractable key is refused
/// for sealing, and init leaves nothing behind.
#[test]
fn the_wrapping_key_never_leaves_the_token() {
    let hsm = Hsm::new();
    assert!(hsm.init_pkcs11("piivault-root").status.success());
    assert_eq!(
        hsm.probe("attributes", "piivault-root").trim(),
        "sensitive=true extractable=false never_extractable=true always_sensitive=true token=true value=refused"
    );

    let other = Hsm::new();
    other.probe("make-extractable", "leaky");
    assert_eq!(
        other.probe("attributes", "leaky").trim(),
        "sensitive=false extractable=true never_extractable=false always_sensitive=false token=true value=readable"
    );
    assert_eq!(
        failure(&other.init_pkcs11("leaky")),
        (
            78,
            "piivault: the PKCS#11 key \"leaky\" cannot wrap the root key: it is extractable (CKA_EXTRACTABLE is true)"
                .to_owned()
        )
    );
    assert!(!other.dir().join("root.sealed").exists() && !other.dir().join("config.toml").exists());
}

/// The test binary as a PKCS#11 client (run by `Hsm::probe`, with
/// `SOFTHSM2_CONF` set before the module loads).
#[test]
#[ignore = "run as a child process by the tests above"]
fn hsm_probe() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::mechanism::aead::GcmParams;
    use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
    use cryptoki::session::UserType;

    let op = std::env::var("PIIVAULT_HSM_PROBE").expect("run by Hsm::probe");
    let arg = std::env::var("PIIVAULT_HSM_PROBE_ARG").unwrap();
    let out = PathBuf::from(std::env::var_os("PIIVAULT_HSM_PROBE_OUT").unwrap());
    let ctx = Pkcs11::new(module()).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).unwrap();
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label() == TOKEN)
        .unwrap();
    let session = ctx.open_rw_session(slot).unwrap();
    session.login(UserType::User, Some(&PIN.into())).unwrap();
    let find = |label: &str| {
        let found = session
            .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Label(label.as_bytes().to_vec())])
            .unwrap();
        assert_eq!(found.len(), 1, "{label}");
        found[0]
    };
    let result = match op.as_str() {
        "attributes" => {
            let key = find(&arg);
            let wanted = [
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::NeverExtractable,
                AttributeType::AlwaysSensitive,
                AttributeType::Token,
            ];
            let mut words = Vec::new();
            for attribute in session.get_attributes(key, &wanted).unwrap() {
                words.push(match attribute {
                    Attribute::Sensitive(v) => format!("sensitive={v}"),
                    Attribute::Extractable(v) => format!("extractable={v}"),
                    Attribute::NeverExtractable(v) => format!("never_extractable={v}"),
                    Attribute::AlwaysSensitive(v) => format!("always_sensitive={v}"),
                    Attribute::Token(v) => format!("token={v}"),
                    other => panic!("unexpected {other:?}"),
                });
            }
            // Only whether the value comes out, never the value itself.
            let value = match session.get_attributes(key, &[AttributeType::Value]) {
                Ok(attributes) if attributes.iter().any(|a| matches!(a, Attribute::Value(v) if !v.is_empty())) => {
                    "readable"
                }
                Ok(_) | Err(_) => "refused",
            };
            words.push(format!("value={value}"));
            words.join(" ")
        }
        "make-extractable" | "make-key" => {
            let leaky = op == "make-extractable";
            let template = [
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32u64.into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(!leaky),
                Attribute::Extractable(leaky),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Label(arg.as_bytes().to_vec()),
            ];
            session.generate_key(&Mechanism::AesKeyGen, &template).unwrap();
            String::new()
        }
        "delete" => {
            session.destroy_object(find(&arg)).unwrap();
            String::new()
        }
        "unseal" => {
            // Layout: magic(4) version(1) provider(1) L(2) URI(L) nonce(12) sealed(48).
            let file = std::fs::read(&arg).unwrap();
            let l = usize::from(u16::from_be_bytes([file[6], file[7]]));
            let uri = std::str::from_utf8(&file[8..8 + l]).unwrap();
            let label = uri.split(';').find_map(|p| p.strip_prefix("object=")).unwrap();
            let mut nonce = file[8 + l..20 + l].to_vec();
            let params = GcmParams::new(&mut nonce, &file[..8 + l], 128u64.into()).unwrap();
            let root = session.decrypt(&Mechanism::AesGcm(params), find(label), &file[20 + l..]).unwrap();
            assert_eq!(root.len(), 32);
            hex::encode(root)
        }
        other => panic!("unknown probe {other}"),
    };
    std::fs::write(out, result).unwrap();
}

/// Keeps `piivault keys rotate-root` (offline, `args`) being killed (SIGKILL) at
/// growing delays until the rotation has taken effect; after every kill the
/// vault opens with the secrets of both sides (an interrupted rotation is
/// finished or rolled back by the open) and still holds the same records.
/// Returns how many kills left the vault as it was.
///
/// `SoftHSM`'s file store is not crash-safe: it rewrites its token file at
/// every login, and a process killed in that write leaves a token `SoftHSM`
/// no longer lists (seen here; an HSM keeps its state itself). So the token
/// directory is copied before each run and put back when, after a kill, the
/// module lists no token at all: the test is about piivault's files, not
/// `SoftHSM`'s. Such runs are counted and bounded.
fn rotate_with_kills(hsm: &Hsm, args: &[&str], env: &[(&str, &str)], done: &dyn Fn(&[u8]) -> bool) -> usize {
    let dir = hsm.dir();
    let sealed = dir.join("root.sealed");
    let pending = dir.join("root.sealed.new");
    let mut all = vec!["keys", "rotate-root", "--data-dir", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let tokens = hsm.path("tokens");
    let saved = hsm.path("tokens.saved");
    let copy = |from: &Path, to: &Path| {
        let _ = std::fs::remove_dir_all(to);
        assert!(Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap().success());
    };
    let mut torn = 0;
    for step in 0..60 {
        copy(&tokens, &saved);
        let mut child = hsm.command(&all, env).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(15 * step as u64));
        if child.try_wait().unwrap().is_none() {
            Command::new("kill").args(["-s", "KILL", &child.id().to_string()]).status().unwrap();
        }
        let out = child.wait_with_output().unwrap();
        hsm.log(&out.stderr);
        assert!(step < 59, "rotate-root never took effect: {}", String::from_utf8_lossy(&out.stderr));
        if !hsm.token_listed() {
            torn += 1;
            assert!(torn <= 3 && torn * 2 <= step + 1, "SoftHSM lost its token too often ({torn} of {step})");
            copy(&saved, &tokens);
            assert!(hsm.token_listed());
        }
        let checked = hsm.check(env);
        assert!(checked.status.success(), "after a kill at step {step}: {}", stderr(&checked));
        assert!(stdout(&checked).contains("name=3"), "{}", stdout(&checked));
        assert!(!pending.exists(), "the open resolved the interrupted rotation");
        if done(&std::fs::read(&sealed).unwrap()) {
            return step;
        }
    }
    unreachable!("the last step panics")
}

fn sealed_by_key(label: &str) -> impl Fn(&[u8]) -> bool {
    let uri = format!("pkcs11:token={TOKEN};object={label};type=secret-key");
    move |file: &[u8]| file[5] == 3 && file.windows(uri.len()).any(|w| w == uri.as_bytes())
}

/// Root rotation from a passphrase into the token, to a new key label in
/// the same token, and back to a passphrase, offline with SIGKILL at
/// growing delays in each, then online through the Admin API both ways:
/// the values keep coming back and the audit trail names each provider.
#[test]
fn rotate_root_between_providers_with_sigkill() {
    let hsm = Hsm::new();
    let dir = hsm.dir();
    let init = hsm.piivault(&["init", "--data-dir", dir.to_str().unwrap()], &[("PIIVAULT_PASSPHRASE", PASSPHRASE)]);
    assert!(init.status.success(), "{}", stderr(&init));
    let pin = hsm.path("pin");
    hsm.edit_config(|t| {
        format!(
            "{t}\n[root_key.pkcs11]\nmodule = \"{}\"\ntoken_label = \"{TOKEN}\"\npin_file = \"{}\"\n",
            module(),
            pin.display()
        )
    });
    hsm.prepare_serving();
    let pass = [("PIIVAULT_PASSPHRASE", PASSPHRASE)];
    let served = hsm.serve(&pass);
    let tokens = hsm.tokenize(&served);
    served.stop(&hsm);
    let sealed = dir.join("root.sealed");

    // Passphrase to the token, then to another key in it. The keys exist
    // beforehand: SoftHSM's file store rewrites its token file when it adds
    // a key, and a process killed in the middle of that write loses the
    // token (an HSM commits a new key atomically; SoftHSM does not).
    hsm.probe("make-key", "root-a");
    hsm.probe("make-key", "root-b");
    let passphrase_sealed = std::fs::read(&sealed).unwrap();
    let before = rotate_with_kills(&hsm, &["--new-pkcs11-key-label", "root-a"], &pass, &sealed_by_key("root-a"));
    assert!(before >= 1, "no kill landed before the rotation took effect");
    let before = rotate_with_kills(&hsm, &["--new-pkcs11-key-label", "root-b"], &pass, &sealed_by_key("root-b"));
    assert!(before >= 1);
    let token_sealed = std::fs::read(&sealed).unwrap();
    assert!(sealed_by_key("root-b")(&token_sealed));
    // Back to a (new) passphrase.
    let new_pass = "a second passphrase, also long enough";
    let new_file = hsm.write_secret("new-pass", new_pass);
    let both = [("PIIVAULT_PASSPHRASE", new_pass)];
    let before = rotate_with_kills(&hsm, &["--new-passphrase-file", new_file.to_str().unwrap()], &both, &|f| f[5] == 1);
    assert!(before >= 1);
    assert_eq!(failure(&hsm.check(&pass)).0, 78, "the first passphrase no longer opens it");
    let pending = dir.join("root.sealed.new");

    // The two halves of an interruption across providers, exactly: killed
    // after the keys were re-wrapped under the passphrase-sealed root but
    // before the rename (the token's file is still in place, the new one
    // beside it): the open finishes the rotation.
    let new_sealed = std::fs::read(&sealed).unwrap();
    std::fs::write(&sealed, &token_sealed).unwrap();
    std::fs::write(&pending, &new_sealed).unwrap();
    let checked = hsm.check(&both);
    assert!(checked.status.success(), "{}", stderr(&checked));
    assert_eq!((std::fs::read(&sealed).unwrap(), pending.exists()), (new_sealed.clone(), false));
    // Killed before the re-wrap: a leftover sealed by the token (a root key
    // the store never took) is discarded.
    std::fs::write(&pending, &token_sealed).unwrap();
    let checked = hsm.check(&both);
    assert!(checked.status.success(), "{}", stderr(&checked));
    assert_eq!((std::fs::read(&sealed).unwrap(), pending.exists()), (new_sealed, false));
    assert_ne!(passphrase_sealed, token_sealed);

    rotate_online_both_ways(&hsm, &tokens, &pass, &both);

    let third = [("PIIVAULT_PASSPHRASE", "the third passphrase, long enough too")];
    let served = hsm.serve(&third);
    hsm.assert_detokenizes(&served, &tokens);
    served.stop(&hsm);
    let rotations: Vec<_> = audit_actions(&hsm, &third)
        .into_iter()
        .filter(|r| r["action"] == "rotate_root_key" && r["outcome"] == "OK")
        .map(|r| r["error_code"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(rotations, ["pkcs11", "pkcs11", "passphrase", "pkcs11", "passphrase"]);
    let verified = hsm.piivault(&["audit", "verify", "--data-dir", dir.to_str().unwrap()], &third);
    assert!(verified.status.success(), "{}", stderr(&verified));
}

/// Online, as a `rotate_root` identity with proof of the current secret:
/// from the passphrase `both` into the token and back to a third
/// passphrase; an admin-only identity and a missing or wrong proof are
/// refused.
fn rotate_online_both_ways(hsm: &Hsm, tokens: &[String], pass: &[(&str, &str)], both: &[(&str, &str)]) {
    let sealed = hsm.dir().join("root.sealed");
    // Online: into the token and back, as the admin, while serving.
    let served = hsm.serve(both);
    hsm.assert_detokenizes(&served, tokens);
    // The admin grant does not imply rotate_root.
    let into_token = ["keys", "rotate-root", "--new-pkcs11-key-label", "root-online"];
    let refused = hsm.call_with(&served, "admin", &into_token, both);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("PERMISSION_DENIED"), "{}", stderr(&refused));
    // Without proof of the current secret (a stolen certificate alone), no.
    let unproven = hsm.call_with(&served, "root-admin", &into_token, pass);
    assert_eq!(
        failure(&unproven),
        (
            1,
            "piivault: INVALID_ARGUMENT: the current secret (current_passphrase, current_raw_key_hex or current_pkcs11_pin) does not open this vault"
                .to_owned()
        )
    );
    assert_eq!(sealed_provider(&sealed), 1);
    let rotated = hsm.call_with(&served, "root-admin", &into_token, both);
    assert!(rotated.status.success(), "{}", stderr(&rotated));
    assert!(
        stdout(&rotated).starts_with("root key rotated: 13 keys re-wrapped, sealed by the PKCS#11 key \"root-online\""),
        "{}",
        stdout(&rotated)
    );
    assert_eq!(sealed_provider(&sealed), 3);
    hsm.assert_detokenizes(&served, tokens);
    let back = hsm.write_secret("back-pass", "the third passphrase, long enough too");
    let pin = hsm.path("pin");
    let to_passphrase = ["keys", "rotate-root", "--new-passphrase-file", back.to_str().unwrap()];
    let wrong_pin = hsm.write_secret("wrong-pin", "0000");
    let unproven = hsm.call(
        &served,
        "root-admin",
        &[&to_passphrase[..], &["--current-pkcs11-pin-file", wrong_pin.to_str().unwrap()]].concat(),
    );
    assert!(stderr(&unproven).contains("INVALID_ARGUMENT: the current secret"), "{}", stderr(&unproven));
    let rotated = hsm.call(
        &served,
        "root-admin",
        &[&to_passphrase[..], &["--current-pkcs11-pin-file", pin.to_str().unwrap()]].concat(),
    );
    assert!(rotated.status.success(), "{}", stderr(&rotated));
    assert_eq!(sealed_provider(&sealed), 1);
    let metrics = served.metrics();
    assert!(
        metrics.contains("piivault_root_key_operations_total{operation=\"seal\",provider=\"pkcs11\",outcome=\"ok\"} 1"),
        "{metrics}"
    );
    served.stop(hsm);
}

/// The token goes away while the vault serves: requests keep working (the
/// root key is unsealed in memory), a rotation into the token is refused
/// with a precise error, and the next start exits 78.
#[test]
fn a_token_removed_while_serving() {
    let hsm = Hsm::new();
    assert!(hsm.init_pkcs11("piivault-root").status.success());
    hsm.prepare_serving();
    let served = hsm.serve(&[]);
    let tokens = hsm.tokenize(&served);
    let root_key = hsm.root_key();
    let removed = Command::new("softhsm2-util")
        .args(["--delete-token", "--token", TOKEN])
        .env("SOFTHSM2_CONF", &hsm.conf)
        .output()
        .unwrap();
    assert!(removed.status.success(), "{}", String::from_utf8_lossy(&removed.stderr));
    hsm.assert_detokenizes(&served, &tokens);
    let pin = hsm.path("pin");
    let rotated = hsm.call(
        &served,
        "root-admin",
        &[
            "keys",
            "rotate-root",
            "--new-pkcs11-key-label",
            "after-removal",
            "--current-pkcs11-pin-file",
            pin.to_str().unwrap(),
        ],
    );
    assert_eq!(rotated.status.code(), Some(1));
    let err = stderr(&rotated);
    // SoftHSM answers that the token is gone or with a general error for its
    // slot, depending on what it had loaded.
    assert!(err.starts_with("piivault: FAILED_PRECONDITION: the PKCS#11 token failed: "), "{err}");
    assert!(!err.contains(PIN));
    assert_eq!(sealed_provider(&hsm.dir().join("root.sealed")), 3);
    assert!(!hsm.dir().join("root.sealed.new").exists());
    hsm.assert_detokenizes(&served, &tokens);
    served.stop(&hsm);
    let (code, message) = failure(&hsm.check(&[]));
    assert_eq!(code, 78);
    assert!(message.ends_with(&format!("no PKCS#11 token with label \"{TOKEN}\" in the module's slots")), "{message}");
    hsm.assert_no_secret_anywhere(&root_key);
}
