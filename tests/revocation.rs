//! Revocation and expiry on live connections (issue 16, item 6): a
//! connection ends when its certificate expires or is revoked, even idle;
//! a CRL past its nextUpdate is refused; the CRL reloads on its own.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::server::{BIN, DevServer};
use piivault::grpc::proto::{TokenizeRequest, tokenize_result};
use piivault::pki::CertSpec;
use time::OffsetDateTime;
use tonic::Code;

type Client = piivault::grpc::proto::tokenizer_client::TokenizerClient<tonic::transport::Channel>;

async fn tokenize(client: &mut Client, values: &[&str]) -> Result<usize, tonic::Status> {
    let request =
        TokenizeRequest { collection: "name".into(), values: values.iter().map(|v| (*v).to_owned()).collect() };
    let results = client.tokenize(request).await?.into_inner().results;
    Ok(results.iter().filter(|r| matches!(r.outcome, Some(tokenize_result::Outcome::Token(_)))).count())
}

/// Refused by the server with `message`, or by the transport (a new
/// connection's handshake failing, or a connection the server closed).
fn refused(status: &tonic::Status, message: &str) -> bool {
    match status.code() {
        Code::Unauthenticated => status.message() == message,
        code => matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled),
    }
}

const CLOSED: &str = "connection closed: its client certificate no longer stands";

/// Waits (up to 10 s) until the server has printed `needle` more than
/// `before` times.
async fn logged(server: &DevServer, needle: &str, before: usize) {
    for _ in 0..400 {
        if server.output().matches(needle).count() > before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the server never logged {needle:?}:\n{}", server.output());
}

fn certs(server: &DevServer, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(BIN)
        .args(["certs"])
        .args(args)
        .args(["--data-dir", server.dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

#[tokio::test]
async fn a_connection_ends_when_its_certificate_expires() {
    let server = DevServer::start();
    let mut spec = CertSpec::client(&"writer".parse().unwrap(), "piivault.local", 1);
    spec.not_after = OffsetDateTime::now_utc() + time::Duration::seconds(3);
    let tls = server.tls_signed(&server.sign(&spec));
    let mut client = server.connect(tls).await.unwrap();
    assert_eq!(tokenize(&mut client, &["Ada Lovelace"]).await.unwrap(), 1);
    // Left idle past its notAfter, the connection is closed by the server.
    logged(&server, CLOSED, 0).await;
    assert!(server.output().contains("the client certificate has expired"), "{}", server.output());
    // Nothing more goes through: refused per request, or at the handshake
    // of a new connection.
    let status = tokenize(&mut client, &["Grace Hopper"]).await.unwrap_err();
    assert!(refused(&status, "the client certificate has expired"), "{status:?}");
    // Others are not affected.
    let mut writer = server.client("writer").await;
    assert_eq!(tokenize(&mut writer, &["Grace Hopper"]).await.unwrap(), 1);
}

#[tokio::test]
async fn revoking_closes_open_connections_even_idle_ones() {
    let server = DevServer::start();
    let mut writer = server.client("writer").await;
    let mut reader = server.client("reader").await;
    assert_eq!(tokenize(&mut writer, &["Ada Lovelace"]).await.unwrap(), 1);
    certs(&server, &["revoke", "writer"]);
    // The file watcher reloads the CRL; the idle connection then closes
    // without a request on it.
    logged(&server, CLOSED, 0).await;
    assert!(server.output().contains("the client certificate has been revoked"));
    let status = tokenize(&mut writer, &["Grace Hopper"]).await.unwrap_err();
    assert!(refused(&status, "the client certificate has been revoked"), "{status:?}");
    // The reader's connection stays open: its refusal comes from the policy.
    assert_eq!(tokenize(&mut reader, &["x"]).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(server.output().matches(CLOSED).count(), 1);
}

#[tokio::test]
async fn a_stale_crl_is_refused_and_the_crl_reloads_on_its_own() {
    let server = DevServer::start();
    let crl = server.dir.join("pki/crl.pem");
    // A CRL signed before the revocation, valid one second more: what an
    // attacker with write access to pki/ would put back.
    let old = server.ca().sign_crl(OffsetDateTime::now_utc() + time::Duration::seconds(1)).unwrap();
    certs(&server, &["revoke", "writer"]);
    server.reload();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    std::fs::write(&crl, &old).unwrap();
    server.reload();
    // (The file watcher may have been reloading meanwhile: wait for the
    // refusal itself.)
    logged(&server, "CRL reload failed", 0).await;
    let output = server.output();
    assert!(output.contains("CRL reload failed") && output.contains("the CRL expired at"), "{output}");
    assert!(output.contains("re-sign it with `piivault certs crl`"));
    // The CRL in force still revokes the writer.
    assert!(tokenize(&mut server.client("writer").await, &["x"]).await.is_err());

    // `certs crl` re-signs it (from the register: the writer stays revoked).
    let out = certs(&server, &["crl"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("pki/crl.pem re-signed, valid until "));
    server.reload();
    assert!(tokenize(&mut server.client("writer").await, &["x"]).await.is_err());

    // A broken server certificate file keeps the previous TLS material but
    // not the previous CRL: a revocation still takes effect.
    let mut reader = server.client("reader").await;
    let closed = server.output().matches(CLOSED).count();
    std::fs::write(server.dir.join("pki/server.pem"), b"not a certificate").unwrap();
    certs(&server, &["revoke", "reader"]);
    server.reload();
    logged(&server, "TLS reload failed", 0).await;
    logged(&server, CLOSED, closed).await;
    assert!(tokenize(&mut reader, &["x"]).await.is_err());
}

/// A server does not start on a CRL past its nextUpdate: it exits with the
/// error, before serving anyone.
#[tokio::test]
async fn a_server_refuses_to_start_on_an_expired_crl() {
    let server = DevServer::start();
    let stale = server.ca().sign_crl(OffsetDateTime::now_utc() - time::Duration::hours(1)).unwrap();
    let (_, tmp) = server.stop();
    let dir = tmp.path().join("vault");
    std::fs::write(dir.join("pki/crl.pem"), stale).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["dev", "--data-dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0", "--metrics-listen", "none"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the CRL expired at") && stderr.contains("piivault certs crl"), "{stderr}");
}
