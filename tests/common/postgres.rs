//! A database of its own for each test, in the throwaway PostgreSQL
//! cluster that `scripts/test-postgres` starts (`scripts/test-all` starts
//! one and exports where it is).

#![allow(dead_code)] // each test crate uses a different subset

use piivault::config::{PostgresSettings, SecretSource};

/// Where the cluster is: a URL with a user that may create databases.
const URL_VAR: &str = "PIIVAULT_TEST_POSTGRES";
/// That user's password.
pub const PASSWORD_VAR: &str = "PIIVAULT_TEST_POSTGRES_PASSWORD";

/// The cluster's URL; without one the test fails and says how to start it.
pub fn cluster_url() -> String {
    std::env::var(URL_VAR).unwrap_or_else(|_| {
        panic!(
            "{URL_VAR} is not set: this test needs a PostgreSQL server. Run scripts/test-all, which starts one, \
             or start one yourself: eval \"$(scripts/test-postgres start /tmp/piivault-pg)\""
        )
    })
}

fn password() -> String {
    std::env::var(PASSWORD_VAR).unwrap_or_else(|_| panic!("{PASSWORD_VAR} is not set (scripts/test-postgres sets it)"))
}

/// Runs `sql` as the cluster's test user, on a thread of its own (the
/// blocking client cannot run on a test's runtime thread).
pub fn admin(sql: &str) {
    let sql = sql.to_owned();
    std::thread::spawn(move || {
        let mut config: postgres::Config = cluster_url().parse().unwrap();
        config.password(password());
        let mut client = config.connect(postgres::NoTls).unwrap();
        // CREATE DATABASE copies template1 and is refused while another
        // session (another test's CREATE DATABASE) uses it: try again.
        for _ in 0..100 {
            match client.batch_execute(&sql) {
                Err(e) if e.code() == Some(&postgres::error::SqlState::OBJECT_IN_USE) => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => return other.unwrap(),
            }
        }
        panic!("{sql}: the template database stayed busy");
    })
    .join()
    .unwrap();
}

/// A new, empty database, dropped (with its connections) at the end.
pub struct Database {
    /// How a node reaches it (node name `main`).
    pub settings: PostgresSettings,
    pub name: String,
}

impl Database {
    pub fn new() -> Self {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).unwrap();
        let name = format!("piivault_test_{}", hex::encode(bytes));
        admin(&format!("CREATE DATABASE {name}"));
        let url = cluster_url();
        let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
        let settings = PostgresSettings {
            url: format!("{base}/{name}"),
            password: Some(SecretSource::Env(PASSWORD_VAR.into())),
            ca_file: None,
            node: "main".into(),
        };
        Self { settings, name }
    }

    /// Runs `sql` (statements separated by `;`) in this database as the
    /// test user; returns the rows of the last one, each column as text.
    pub fn sql(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let (url, sql) = (self.settings.url.clone(), sql.to_owned());
        std::thread::spawn(move || {
            let mut config: postgres::Config = url.parse().unwrap();
            config.password(password());
            let mut client = config.connect(postgres::NoTls).unwrap();
            let mut rows = Vec::new();
            for message in client.simple_query(&sql).unwrap() {
                if let postgres::SimpleQueryMessage::Row(row) = message {
                    rows.push((0..row.len()).map(|i| row.get(i).map(str::to_owned)).collect());
                }
            }
            rows
        })
        .join()
        .unwrap()
    }

    /// These settings for another node.
    pub fn node(&self, node: &str) -> PostgresSettings {
        PostgresSettings { node: node.into(), ..self.settings.clone() }
    }
}

impl Default for Database {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            admin(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
    }
}

/// A cluster of a test's own (scripts/test-postgres), for the tests that
/// stop the server: the shared one serves every other test meanwhile.
pub struct OwnCluster {
    dir: tempfile::TempDir,
    /// The URL of its database `vault` (user `piivault_test`).
    pub url: String,
    /// That user's password, in a 0600 file.
    pub password_file: std::path::PathBuf,
}

fn script(args: &[&str]) -> String {
    let out = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-postgres"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "test-postgres {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

impl OwnCluster {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Run as root, the server runs as `postgres`, which must reach its
        // directory inside this one.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let cluster = dir.path().join("pg");
        let vars = script(&["start", cluster.to_str().unwrap()]);
        let var = |name: &str| {
            vars.lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}='"))?.strip_suffix('\'').map(str::to_owned))
                .unwrap()
        };
        let (admin_url, password) = (var("PIIVAULT_TEST_POSTGRES"), var("PIIVAULT_TEST_POSTGRES_PASSWORD"));
        let admin = admin_url.clone();
        let pw = password.clone();
        std::thread::spawn(move || {
            let mut config: postgres::Config = admin.parse().unwrap();
            config.password(pw);
            config.connect(postgres::NoTls).unwrap().batch_execute("CREATE DATABASE vault").unwrap();
        })
        .join()
        .unwrap();
        let password_file = dir.path().join("pg-password");
        std::fs::write(&password_file, &password).unwrap();
        std::fs::set_permissions(&password_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let url = admin_url.replace("/postgres", "/vault");
        Self { dir, url, password_file }
    }

    fn cluster(&self) -> String {
        self.dir.path().join("pg").to_str().unwrap().to_owned()
    }

    /// Stops the server (fast shutdown: sessions are ended).
    pub fn stop(&self) {
        script(&["stop", &self.cluster()]);
    }

    /// Starts it again on the same port.
    pub fn restart(&self) {
        script(&["restart", &self.cluster()]);
    }

    /// Stops the server at once, as a crash would (no shutdown checkpoint).
    pub fn crash(&self) {
        script(&["crash", &self.cluster()]);
    }

    /// A synchronous streaming standby of this cluster (in this cluster's
    /// directory): once this returns, every commit on this one waits until
    /// the standby has it on disk. Returns the standby's port.
    pub fn start_standby(&self) -> u16 {
        let standby = self.dir.path().join("standby");
        script(&["standby", &self.cluster(), standby.to_str().unwrap()]).trim().parse().unwrap()
    }

    /// Makes the standby the primary.
    pub fn promote_standby(&self) {
        script(&["promote", self.dir.path().join("standby").to_str().unwrap()]);
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        for cluster in [self.cluster(), self.dir.path().join("standby").to_str().unwrap().to_owned()] {
            let _ = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-postgres"))
                .args(["stop", &cluster])
                .output();
        }
    }
}
