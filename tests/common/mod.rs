//! Shared helpers for the integration tests: a vault in a temporary data
//! directory, built from a config map, opened with a real sealed root key.

#![allow(dead_code)] // each test crate uses a different subset

use std::path::{Path, PathBuf};

use piivault::crypto::root::{self, RawKey, RootKey, Unlock};
use piivault::store::OpenMode;
use piivault::token::{RandomTokens, TokenGenerator};
use piivault::vault::{Requester, Vault};
use piivault::{Config, ItemError, PiiValue};
use tempfile::TempDir;

/// Values from strings.
pub fn values(items: &[&str]) -> Vec<PiiValue> {
    items.iter().map(|v| PiiValue::from(*v)).collect()
}

/// Tokenizes `items`, every one of which must succeed.
pub async fn tokenize_ok(vault: &Vault, collection: &str, items: &[&str]) -> Vec<String> {
    vault
        .tokenize(&who(), collection, values(items))
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap().into_string())
        .collect()
}

/// Detokenizes `tokens`, item by item, as strings.
pub async fn detokenize_strings(vault: &Vault, collection: &str, tokens: &[String]) -> Vec<Result<String, ItemError>> {
    vault
        .detokenize(&who(), collection, tokens.to_vec())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.map(|v| v.expose_secret().to_owned()))
        .collect()
}

/// The requester in-process tests act as.
pub fn who() -> Requester {
    Requester::named("test")
}

/// The sample collections plus the defaults, with room for overrides.
pub fn config_text(extra: &str) -> String {
    format!(
        "{extra}\n\
         [collections.card]\nprefix = \"card\"\n\
         [collections.ssn]\nprefix = \"ssn\"\n\
         [collections.email]\nprefix = \"email\"\n\
         [collections.phone]\nprefix = \"phone\"\n\
         [collections.name]\nprefix = \"name\"\n"
    )
}

/// The raw key tests seal their root key with (a real provider, no KDF).
pub fn unlock() -> Unlock {
    Unlock::RawKey(RawKey::parse(&[0x11; 32]).unwrap())
}

/// A data directory with a config and a sealed root key.
pub struct Fixture {
    pub dir: PathBuf,
    pub config: Config,
    sealed: Vec<u8>,
    owned_tmp: Option<TempDir>,
}

impl Fixture {
    pub fn new() -> Self {
        Self::with_config("")
    }

    pub fn with_config(extra: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let mut fixture = Self::in_dir(tmp.path(), extra);
        fixture.owned_tmp = Some(tmp);
        fixture
    }

    /// A fixture in a directory the caller owns (a mounted filesystem).
    pub fn in_dir(dir: &Path, extra: &str) -> Self {
        let config = Config::parse(&config_text(extra), dir).unwrap();
        let (_, sealed) = root::create(&unlock(), root::MIN_KDF).unwrap();
        Self { dir: dir.to_path_buf(), config, sealed, owned_tmp: None }
    }

    pub fn root(&self) -> RootKey {
        root::unseal(&self.sealed, &unlock()).unwrap()
    }

    pub fn db_path(&self) -> PathBuf {
        self.config.store_backend.sqlite_path().expect("a SQLite store").to_owned()
    }

    pub async fn create(&self) -> Vault {
        Vault::create(&self.config, &self.root()).await.unwrap()
    }

    pub async fn create_with(&self, tokens: Box<dyn TokenGenerator>) -> Vault {
        Vault::open_with(&self.config, &self.root(), OpenMode::Create, tokens).await.unwrap()
    }

    pub async fn open(&self) -> Vault {
        Vault::open(&self.config, &self.root()).await.unwrap()
    }

    pub async fn try_open(&self) -> Result<Vault, piivault::VaultError> {
        Vault::open_with(&self.config, &self.root(), OpenMode::Existing, Box::new(RandomTokens)).await
    }
}

/// Every regular file below `dir`, with its bytes.
pub fn all_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

/// Whether `needle` occurs anywhere in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// A tmpfs of a fixed size mounted on a fresh temporary directory, unmounted
/// on drop: a real filesystem that really fills up or turns read-only.
/// Needs root (CI and the development machines run as root).
pub struct Tmpfs {
    pub dir: TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs needs root (CAP_SYS_ADMIN)");
        Self { dir }
    }

    pub fn remount(&self, options: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

pub mod server;
pub mod tamper;

/// Writes a secret file as an operator must: readable by its owner only
/// (piivault refuses secret files that group or others may read).
pub fn write_secret(path: &Path, contents: impl AsRef<[u8]>) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A process's stdout, as text.
pub fn stdout(out: &std::process::Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A process's stderr, as text.
pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// Exit code and the single `piivault: …` stderr line of a failed run,
/// checked free of every one of `secrets`.
pub fn failure_line(out: &std::process::Output, secrets: &[&str]) -> (i32, String) {
    let err = stderr(out);
    assert_eq!(err.lines().count(), 1, "expected one line on stderr, got {err:?}");
    assert!(err.starts_with("piivault: "), "{err}");
    assert!(secrets.iter().all(|s| !err.contains(s)), "a secret in the error line");
    (out.status.code().unwrap(), err)
}
