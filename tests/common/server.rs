//! A real `piivault dev` process on 127.0.0.1:0, its captured output, and
//! real tonic clients with certificates made by the project's own PKI.

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use piivault::grpc::proto::tokenizer_client::TokenizerClient;
use piivault::pki::{Ca, CertSpec, Signed};
use tempfile::TempDir;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub const BIN: &str = env!("CARGO_BIN_EXE_piivault");

/// A running `piivault dev`.
pub struct DevServer {
    pub dir: PathBuf,
    pub addr: SocketAddr,
    /// Where its Prometheus metrics are served.
    pub metrics_addr: SocketAddr,
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
    tmp: Option<TempDir>,
}

impl DevServer {
    pub fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("vault");
        Self::start_in(tmp, dir)
    }

    /// `piivault dev` on `dir` inside `tmp` (which may already hold a dev vault).
    pub fn start_in(tmp: TempDir, dir: PathBuf) -> Self {
        Self::start_at(tmp, dir, "127.0.0.1:0")
    }

    /// The same, listening on `listen`.
    pub fn start_at(tmp: TempDir, dir: PathBuf, listen: &str) -> Self {
        let mut child = Command::new(BIN)
            .args(["dev", "--data-dir", dir.to_str().unwrap(), "--listen", listen])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env_remove("PIIVAULT_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let out = output.clone();
        let metrics = Arc::new(Mutex::new(None));
        let metrics_out = metrics.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("piivault: listening on ") {
                    let _ = tx.send(addr.parse::<SocketAddr>().unwrap());
                }
                if let Some(addr) = line.strip_prefix("piivault: metrics on http://") {
                    *metrics_out.lock().unwrap() = addr.strip_suffix("/metrics").unwrap().parse().ok();
                }
                let mut out = out.lock().unwrap();
                out.extend_from_slice(line.as_bytes());
                out.push(b'\n');
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let err = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                err.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let addr = rx.recv_timeout(Duration::from_mins(1)).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("piivault dev did not start: {}", String::from_utf8_lossy(&output.lock().unwrap()))
        });
        let metrics_addr = metrics.lock().unwrap().expect("the metrics address is printed before the gRPC one");
        Self { dir, addr, metrics_addr, child, output, tmp: Some(tmp) }
    }

    /// Everything the process printed so far (stdout and stderr).
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// The metrics endpoint's answer: status line and body.
    pub fn scrape(&self) -> (String, String) {
        use std::io::Write as _;
        let mut tcp = std::net::TcpStream::connect(self.metrics_addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(tcp, "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_owned(), body.to_owned())
    }

    /// One sample from the metrics, by its name and labels as printed
    /// (`piivault_sealed`, `piivault_tokens{collection="card"}`); `None` if
    /// absent.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.scrape();
        body.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args(["-s", signal, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Sends SIGHUP and waits until the server logged the reload.
    pub fn reload(&self) {
        let crl_loads = |out: &str| out.matches("CRL reloaded").count() + out.matches("CRL reload failed").count();
        let before = self.output().matches("SIGHUP: reloading").count();
        let crl_before = crl_loads(&self.output());
        self.signal("HUP");
        for _ in 0..200 {
            let out = self.output();
            if out.matches("SIGHUP: reloading").count() > before && crl_loads(&out) > crl_before {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("the server did not reload");
    }

    /// SIGTERM, then wait for the exit; the data directory outlives the
    /// server through the returned guard.
    pub fn stop(mut self) -> (ExitStatus, TempDir) {
        self.signal("TERM");
        for _ in 0..800 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.tmp.take().unwrap());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("the server did not stop on SIGTERM");
    }

    /// SIGKILL: no shutdown, no checkpoint, nothing flushed but what was
    /// already durable. The data directory outlives it.
    pub fn kill(mut self) -> TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.tmp.take().unwrap()
    }

    pub fn ca(&self) -> Ca {
        Ca::load(&self.dir).unwrap()
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("pki/ca.pem")).unwrap()
    }

    /// TLS for a dev caller (`writer`, `reader`, ...).
    pub fn tls_for(&self, name: &str) -> ClientTlsConfig {
        let client = self.dir.join("clients").join(name);
        tls(
            &self.ca_pem(),
            &std::fs::read(client.join("cert.pem")).unwrap(),
            &std::fs::read(client.join("key.pem")).unwrap(),
        )
    }

    /// TLS presenting a certificate the test signed with the vault CA.
    pub fn tls_signed(&self, signed: &Signed) -> ClientTlsConfig {
        tls(&self.ca_pem(), signed.cert_pem.as_bytes(), signed.key_pem.as_bytes())
    }

    pub fn sign(&self, spec: &CertSpec) -> Signed {
        self.ca().sign(spec).unwrap()
    }

    /// A channel with `tls`, for any of the server's services.
    pub async fn channel_with(&self, tls: ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
        Endpoint::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .connect()
            .await
    }

    /// A channel as dev caller `name`.
    pub async fn channel(&self, name: &str) -> Channel {
        self.channel_with(self.tls_for(name)).await.unwrap()
    }

    pub async fn connect(&self, tls: ClientTlsConfig) -> Result<TokenizerClient<Channel>, tonic::transport::Error> {
        let channel = self.channel_with(tls).await?;
        Ok(TokenizerClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20))
    }

    pub async fn client(&self, name: &str) -> TokenizerClient<Channel> {
        self.connect(self.tls_for(name)).await.unwrap()
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.join("vault.db")
    }

    /// Live records per collection, read straight from the database file.
    pub fn record_count(&self) -> i64 {
        record_count(&self.db_path())
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tls(ca: &[u8], cert: &[u8], key: &[u8]) -> ClientTlsConfig {
    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).identity(Identity::from_pem(cert, key))
}

pub fn record_count(db: &Path) -> i64 {
    let conn = crate::common::tamper::open_read_only(db);
    conn.query_row("SELECT count(*) FROM records WHERE ciphertext IS NOT NULL", [], |r| r.get(0)).unwrap()
}

/// A raw rustls connector trusting `dir`'s vault CA and presenting caller
/// `caller`'s certificate from `dir/clients/<caller>/`: for tests that look
/// below gRPC (what the server sends, or does not).
pub fn raw_tls_connector(dir: &Path, caller: &str) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let client = dir.join("clients").join(caller);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(dir.join("pki/ca.pem")).unwrap()).unwrap();
    let certs: Vec<_> = CertificateDer::pem_file_iter(client.join("cert.pem")).unwrap().map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_file(client.join("key.pem")).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}
