//! The gRPC service end to end: the real `piivault` binary, real mutual
//! TLS with certificates from the project's own PKI, a real tonic client.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::server::{DevServer, tls};
use piivault::format::luhn_valid;
use piivault::grpc::proto::{
    self, DeleteRequest, DetokenizeRequest, ItemErrorCode, TokenizeRequest, delete_result, detokenize_result,
    tokenize_result,
};
use piivault::pki::{Ca, CertSpec};
use piivault::policy::CallerId;
use time::{Duration, OffsetDateTime};
use tonic::Code;
use tonic::transport::Channel;

type Client = proto::tokenizer_client::TokenizerClient<Channel>;

async fn tokenize(
    client: &mut Client,
    collection: &str,
    values: &[&str],
) -> Result<Vec<tokenize_result::Outcome>, tonic::Status> {
    let request =
        TokenizeRequest { collection: collection.into(), values: values.iter().map(|v| (*v).to_owned()).collect() };
    Ok(client.tokenize(request).await?.into_inner().results.into_iter().map(|r| r.outcome.unwrap()).collect())
}

async fn tokens(client: &mut Client, collection: &str, values: &[&str]) -> Vec<String> {
    tokenize(client, collection, values)
        .await
        .unwrap()
        .into_iter()
        .map(|o| match o {
            tokenize_result::Outcome::Token(t) => t,
            tokenize_result::Outcome::Error(e) => panic!("tokenize item failed: {e:?}"),
        })
        .collect()
}

/// (value or error code, masked) per item.
async fn detokenize(
    client: &mut Client,
    collection: &str,
    tokens: &[String],
) -> Result<Vec<(Result<String, i32>, bool)>, tonic::Status> {
    let request = DetokenizeRequest { collection: collection.into(), tokens: tokens.to_vec() };
    Ok(client
        .detokenize(request)
        .await?
        .into_inner()
        .results
        .into_iter()
        .map(|r| match r.outcome.unwrap() {
            detokenize_result::Outcome::Value(v) => (Ok(v), r.masked),
            detokenize_result::Outcome::Error(e) => (Err(e.code), r.masked),
        })
        .collect())
}

async fn delete(
    client: &mut Client,
    collection: &str,
    tokens: &[String],
) -> Result<Vec<Result<bool, i32>>, tonic::Status> {
    let request = DeleteRequest { collection: collection.into(), tokens: tokens.to_vec() };
    Ok(client
        .delete(request)
        .await?
        .into_inner()
        .results
        .into_iter()
        .map(|r| match r.outcome.unwrap() {
            delete_result::Outcome::Deleted(d) => Ok(d),
            delete_result::Outcome::Error(e) => Err(e.code),
        })
        .collect())
}

const NOT_FOUND: i32 = ItemErrorCode::NotFound as i32;

/// Whether a token has its collection's format, given the value.
type Shape = fn(&str, &str) -> bool;

/// Same length; digits stay digits; everything else stays where it is.
fn same_shape(value: &str, token: &str) -> bool {
    value.len() == token.len()
        && value.bytes().zip(token.bytes()).all(|(v, t)| if v.is_ascii_digit() { t.is_ascii_digit() } else { v == t })
}

#[tokio::test]
async fn every_sample_collection_round_trips_over_mtls() {
    let server = DevServer::start();
    let mut writer = server.client("writer").await;
    let mut reader = server.client("reader").await;
    let mut support = server.client("support").await;
    // Each collection's values, what its tokens look like, and what support
    // (detokenize_masked) sees.
    let samples: [(&str, &[&str], Shape, &[&str]); 5] = [
        (
            "card",
            &["4111 1111 1111 1111", "5500-0000-0000-0004"],
            |v, t| same_shape(v, t) && t.ends_with(&v[v.len() - 4..]) && !luhn_valid(t),
            &["**** **** **** 1111", "****-****-****-0004"],
        ),
        ("ssn", &["078-05-1120"], same_shape, &["***-**-1120"]),
        (
            "email",
            &["zoë.ångström@exämple.org", "jane@example.org"],
            |v, t| t.len() == 16 + v.len() - v.find('@').unwrap() && t.ends_with(&v[v.find('@').unwrap()..]),
            &["z***@exämple.org", "j***@example.org"],
        ),
        ("phone", &["+81 3-1234-5678"], same_shape, &["+** *-****-5678"]),
        (
            "name",
            &["李小龍", "محمد", "Zoë Ångström 🙂"],
            |_, t| t.starts_with("name_") && t.len() == 27,
            &["***", "****", "*** ****tröm 🙂"],
        ),
    ];
    let mut all_values = Vec::new();
    for (collection, values, shape, masked) in samples {
        let tokens = tokens(&mut writer, collection, values).await;
        assert_eq!(tokens.len(), values.len());
        for (value, token) in values.iter().zip(&tokens) {
            assert!(shape(value, token), "{collection}: {token:?} does not have the collection's format");
            assert_ne!(value, token);
        }
        let back = detokenize(&mut reader, collection, &tokens).await.unwrap();
        let expected: Vec<_> = values.iter().map(|v| (Ok((*v).to_owned()), false)).collect();
        assert_eq!(back, expected, "{collection}");
        let shown = detokenize(&mut support, collection, &tokens).await.unwrap();
        let expected: Vec<_> = masked.iter().map(|v| (Ok((*v).to_owned()), true)).collect();
        assert_eq!(shown, expected, "{collection}");
        all_values.extend_from_slice(values);
    }
    // ssn and email are deterministic; email normalizes to lower case.
    let again = tokens(&mut writer, "ssn", &["078-05-1120", "219-09-9999"]).await;
    let first = tokens(&mut writer, "ssn", &["078-05-1120"]).await;
    assert_eq!(again[0], first[0]);
    assert_ne!(again[0], again[1]);
    let email = tokens(&mut writer, "email", &["  Jane@Example.ORG", "jane@example.org"]).await;
    assert_eq!(email[0], email[1]);
    assert_eq!(detokenize(&mut reader, "email", &email[..1]).await.unwrap()[0].0, Ok("jane@example.org".into()));
    // Random collections are not deterministic.
    let names = tokens(&mut writer, "name", &["Zoë", "Zoë"]).await;
    assert_ne!(names[0], names[1]);
    let output = server.output();
    assert!(output.contains("method=\"Tokenize\""), "{output}");
    for value in all_values {
        assert!(!output.contains(value), "the server printed a value");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    Tokenize,
    Detokenize,
    Delete,
}

/// What one cell of the grant matrix answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ok { masked: bool },
    Denied,
}

const OK: Answer = Answer::Ok { masked: false };
const MASKED: Answer = Answer::Ok { masked: true };
const DENIED: Answer = Answer::Denied;

async fn call(client: &mut Client, rpc: Rpc, collection: &str, token: &str) -> Answer {
    let status = match rpc {
        Rpc::Tokenize => {
            tokenize(client, collection, &[if collection == "ssn" { "219-09-9999" } else { "4000 0566 5566 5556" }])
                .await
                .map(|r| {
                    assert!(matches!(r[0], tokenize_result::Outcome::Token(_)));
                    Answer::Ok { masked: false }
                })
        }
        Rpc::Detokenize => {
            detokenize(client, collection, &[token.to_owned()]).await.map(|r| Answer::Ok { masked: r[0].1 })
        }
        Rpc::Delete => delete(client, collection, &["card_AAAAAAAAAAAAAAAAAAAAAA".to_owned()]).await.map(|r| {
            assert_eq!(r, vec![Err(NOT_FOUND)]);
            Answer::Ok { masked: false }
        }),
    };
    match status {
        Ok(answer) => answer,
        Err(status) => {
            assert_eq!(status.code(), Code::PermissionDenied, "{rpc:?} on {collection}: {status:?}");
            assert_eq!(status.message(), piivault::grpc::DENIED);
            Answer::Denied
        }
    }
}

/// Every dev caller (and one with a certificate but no grants) × every RPC
/// × a granted, an ungranted and an unknown collection.
#[tokio::test]
async fn the_whole_grant_matrix() {
    let server = DevServer::start();
    // A narrower caller so that "known but not granted" is a real case.
    let policy = server.dir.join("policy.toml");
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str("\n[callers.cardonly]\ntokenize = [\"card\"]\ndetokenize = [\"card\"]\ndelete = [\"card\"]\n");
    std::fs::write(&policy, text).unwrap();
    server.reload();
    let ca = server.ca();
    for name in ["cardonly", "stranger"] {
        ca.issue(&name.parse().unwrap(), "piivault.local", 1, &server.dir.join("clients").join(name)).unwrap();
    }
    let mut writer = server.client("writer").await;
    let card_token = tokens(&mut writer, "card", &["4111111111111111"]).await.remove(0);
    let ssn_token = tokens(&mut writer, "ssn", &["078-05-1120"]).await.remove(0);

    #[rustfmt::skip]
    let expected: &[(&str, Rpc, Answer, Answer)] = &[
        // caller,   rpc,             "card",  "ssn"
        ("writer",   Rpc::Tokenize,   OK,      OK),
        ("writer",   Rpc::Detokenize, DENIED,  DENIED),
        ("writer",   Rpc::Delete,     OK,      OK),
        ("reader",   Rpc::Tokenize,   DENIED,  DENIED),
        ("reader",   Rpc::Detokenize, OK,      OK),
        ("reader",   Rpc::Delete,     DENIED,  DENIED),
        ("support",  Rpc::Tokenize,   DENIED,  DENIED),
        ("support",  Rpc::Detokenize, MASKED,  MASKED),
        ("support",  Rpc::Delete,     DENIED,  DENIED),
        ("admin",    Rpc::Tokenize,   DENIED,  DENIED),
        ("admin",    Rpc::Detokenize, DENIED,  DENIED),
        ("admin",    Rpc::Delete,     DENIED,  DENIED),
        ("auditor",  Rpc::Tokenize,   DENIED,  DENIED),
        ("auditor",  Rpc::Detokenize, DENIED,  DENIED),
        ("auditor",  Rpc::Delete,     DENIED,  DENIED),
        ("cardonly", Rpc::Tokenize,   OK,      DENIED),
        ("cardonly", Rpc::Detokenize, OK,      DENIED),
        ("cardonly", Rpc::Delete,     OK,      DENIED),
        ("stranger", Rpc::Tokenize,   DENIED,  DENIED),
        ("stranger", Rpc::Detokenize, DENIED,  DENIED),
        ("stranger", Rpc::Delete,     DENIED,  DENIED),
    ];
    let mut cells = 0;
    for (caller, rpc, on_card, on_ssn) in expected {
        let mut client = server.client(caller).await;
        assert_eq!(call(&mut client, *rpc, "card", &card_token).await, *on_card, "{caller} {rpc:?} card");
        assert_eq!(call(&mut client, *rpc, "ssn", &ssn_token).await, *on_ssn, "{caller} {rpc:?} ssn");
        // An unknown collection answers exactly like an ungranted one.
        assert_eq!(call(&mut client, *rpc, "no_such_collection", &card_token).await, DENIED, "{caller} {rpc:?}");
        cells += 3;
    }
    assert_eq!(cells, 63);
    // The values the reader and support saw were the real and masked ones.
    let mut reader = server.client("reader").await;
    assert_eq!(
        detokenize(&mut reader, "card", std::slice::from_ref(&card_token)).await.unwrap()[0].0,
        Ok("4111111111111111".into())
    );
    let mut support = server.client("support").await;
    assert_eq!(detokenize(&mut support, "card", &[card_token]).await.unwrap()[0].0, Ok("************1111".into()));
    // Denials are logged with the authenticated caller.
    let output = server.output();
    assert!(output.contains("caller=\"stranger\" method=\"Tokenize\""), "{output}");
    assert!(output.contains("outcome=\"PERMISSION_DENIED\""));
}

fn spec(name: &str) -> CertSpec {
    CertSpec::client(&name.parse::<CallerId>().unwrap(), "piivault.local", 1)
}

/// A refused handshake: the call fails at the transport level (never with
/// an answer from the service), and the server logs the refusal with
/// `reason`.
async fn assert_handshake_refused(server: &DevServer, tls: tonic::transport::ClientTlsConfig, reason: &str) {
    let before = server.output().matches(reason).count();
    if let Ok(mut client) = server.connect(tls).await {
        let status = tokenize(&mut client, "card", &["never stored"]).await.expect_err(reason);
        assert!(
            matches!(status.code(), Code::Unknown | Code::Unavailable | Code::Cancelled),
            "{reason}: the service answered {status:?}"
        );
    }
    for _ in 0..200 {
        if server.output().matches(reason).count() > before {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the server did not log a refused handshake with {reason:?}:\n{}", server.output());
}

#[tokio::test]
async fn handshakes_without_a_valid_client_certificate_are_refused() {
    let server = DevServer::start();
    let before = server.record_count();
    let now = OffsetDateTime::now_utc();
    let mut cases = 0;

    // No client certificate at all.
    let no_cert = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(server.ca_pem()));
    assert_handshake_refused(&server, no_cert, "TLS handshake refused peer=127.0.0.1:").await;
    // One WARN line per source and reason per window (the rest are counted
    // into the window's summary), naming the peer and the reason.
    let output = server.output();
    let lines: Vec<&str> = output.lines().filter(|l| l.contains("TLS handshake refused")).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("peer=127.0.0.1:") && lines[0].contains("peer sent no certificates"), "{lines:?}");
    cases += 1;

    // A certificate from another CA, with a perfectly good identity.
    let other = tempfile::tempdir().unwrap();
    let foreign_ca = Ca::init(other.path(), "elsewhere.example", &["localhost".into()]).unwrap();
    let foreign = foreign_ca.sign(&spec("writer")).unwrap();
    assert_handshake_refused(&server, server.tls_signed(&foreign), "invalid peer certificate: UnknownIssuer").await;
    cases += 1;

    // Expired, and not yet valid.
    let mut expired = spec("writer");
    expired.not_before = now - Duration::days(10);
    expired.not_after = now - Duration::days(1);
    assert_handshake_refused(&server, server.tls_signed(&server.sign(&expired)), "certificate expired").await;
    let mut future = spec("writer");
    future.not_before = now + Duration::days(1);
    future.not_after = now + Duration::days(10);
    assert_handshake_refused(&server, server.tls_signed(&server.sign(&future)), "certificate not valid yet").await;
    cases += 2;

    // serverAuth only: not a client certificate.
    let mut server_only = spec("writer");
    server_only.client_auth = false;
    server_only.server_auth = true;
    assert_handshake_refused(
        &server,
        server.tls_signed(&server.sign(&server_only)),
        "does not allow extended key usage for client authentication",
    )
    .await;
    cases += 1;

    // Revoked: works before `certs revoke` + reload, refused after, both on
    // a new connection and on the connection opened before.
    let ca = server.ca();
    let out = server.dir.join("clients/revokee");
    ca.issue(&"writer".parse().unwrap(), "piivault.local", 1, &out).unwrap();
    let revokee_tls = tls(
        &server.ca_pem(),
        &std::fs::read(out.join("cert.pem")).unwrap(),
        &std::fs::read(out.join("key.pem")).unwrap(),
    );
    let mut open_before = server.connect(revokee_tls.clone()).await.unwrap();
    assert_eq!(tokens(&mut open_before, "name", &["before revocation"]).await.len(), 1);
    let revoke = std::process::Command::new(common::server::BIN)
        .args(["certs", "revoke", "--data-dir", server.dir.to_str().unwrap()])
        .arg(
            std::fs::read_to_string(server.dir.join("pki/issued.toml"))
                .unwrap()
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("serial = \"").map(|s| s.trim_end_matches('"').to_owned()))
                .unwrap(),
        )
        .output()
        .unwrap();
    assert!(revoke.status.success(), "{}", String::from_utf8_lossy(&revoke.stderr));
    server.reload();
    assert_handshake_refused(&server, revokee_tls, "invalid peer certificate: Revoked").await;
    // Refused on the connection opened before, or that connection is
    // already closed by the server (it re-checks its certificate every
    // second) and the client's reconnection is refused at the handshake.
    let status = tokenize(&mut open_before, "card", &["after revocation"]).await.unwrap_err();
    assert!(
        matches!(
            (status.code(), status.message()),
            (Code::Unauthenticated, "the client certificate has been revoked")
                | (Code::Unavailable | Code::Unknown | Code::Cancelled, _)
        ),
        "{status:?}"
    );
    cases += 1;

    assert_eq!(cases, 6);
    assert_eq!(server.record_count(), before + 1, "only the pre-revocation value was stored");
    // The dev writer is unaffected by all this.
    let mut writer = server.client("writer").await;
    assert_eq!(tokens(&mut writer, "name", &["still fine"]).await.len(), 1);
}

#[tokio::test]
async fn certificates_without_exactly_one_identity_in_the_trust_domain_are_unauthenticated() {
    let server = DevServer::start();
    let before = server.record_count();
    let mut no_uri = spec("writer");
    no_uri.uris.clear();
    let mut two = spec("writer");
    two.uris.push("spiffe://piivault.local/reader".into());
    let mut foreign_domain = spec("writer");
    foreign_domain.uris = vec!["spiffe://other.domain/writer".into()];
    let mut not_spiffe = spec("writer");
    not_spiffe.uris = vec!["https://piivault.local/writer".into()];
    let cases = [
        (no_uri, "the client certificate has no URI SAN"),
        (two, "the client certificate has more than one URI SAN"),
        (foreign_domain, "the client certificate's URI SAN is not in trust domain piivault.local"),
        (not_spiffe, "the client certificate's URI SAN is not in trust domain piivault.local"),
    ];
    for (spec, message) in &cases {
        let mut client = server.connect(server.tls_signed(&server.sign(spec))).await.unwrap();
        let status = tokenize(&mut client, "card", &["refused"]).await.unwrap_err();
        assert_eq!((status.code(), status.message()), (Code::Unauthenticated, *message));
        let status = detokenize(&mut client, "card", &["card_AAAAAAAAAAAAAAAAAAAAAA".into()]).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    assert_eq!(server.record_count(), before);
}

/// A certificate from the vault's CA with no extended key usage at all
/// (which the verifier would take as "any purpose") names no caller.
#[tokio::test]
async fn a_leaf_without_client_auth_names_no_caller() {
    let server = DevServer::start();
    let mut bare = spec("writer");
    bare.client_auth = false;
    let mut client = server.connect(server.tls_signed(&server.sign(&bare))).await.unwrap();
    let status = tokenize(&mut client, "name", &["never stored"]).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::Unauthenticated,
            "the client certificate is not for client authentication (no clientAuth extended key usage)"
        )
    );
    let mut writer = server.client("writer").await;
    assert_eq!(tokens(&mut writer, "name", &["with clientAuth"]).await.len(), 1);
}

#[tokio::test]
async fn metadata_claiming_another_identity_changes_nothing() {
    let server = DevServer::start();
    let mut writer = server.client("writer").await;
    let token = tokens(&mut writer, "card", &["4111111111111111"]).await.remove(0);
    let mut request = tonic::Request::new(DetokenizeRequest { collection: "card".into(), tokens: vec![token.clone()] });
    for (key, value) in [
        ("x-spiffe-id", "spiffe://piivault.local/reader"),
        ("x-forwarded-client-cert", "URI=spiffe://piivault.local/reader"),
        ("authorization", "Bearer reader"),
        ("x-piivault-caller", "reader"),
    ] {
        request.metadata_mut().insert(key, value.parse().unwrap());
    }
    let status = writer.detokenize(request).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // The RPC's log line is written as the response leaves: wait for it.
    let mut output = server.output();
    for _ in 0..100 {
        if output.contains("method=\"Detokenize\"") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        output = server.output();
    }
    assert!(output.contains("caller=\"writer\" method=\"Detokenize\""), "{output}");
    assert!(!output.contains("caller=\"reader\""));
}

#[tokio::test]
async fn bad_items_fail_alone_and_bad_requests_change_nothing() {
    let server = DevServer::start();
    let mut writer = server.client("writer").await;
    let mut reader = server.client("reader").await;
    let card = tokens(&mut writer, "card", &["4000056655665556"]).await.remove(0);
    let ssn = tokens(&mut writer, "ssn", &["078-05-1120"]).await.remove(0);
    let unknown = "card_AAAAAAAAAAAAAAAAAAAAAA".to_owned();
    let back = detokenize(&mut reader, "card", &[card.clone(), unknown, ssn.clone(), "garbage".into()]).await.unwrap();
    assert_eq!(
        back,
        vec![
            (Ok("4000056655665556".into()), false),
            (Err(NOT_FOUND), false),
            (Err(NOT_FOUND), false),
            (Err(NOT_FOUND), false)
        ]
    );
    let before = server.record_count();

    // Oversized batch: one item over the limit.
    let many: Vec<&str> = vec!["v"; 1001];
    let status = tokenize(&mut writer, "card", &many).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::ResourceExhausted, "the request has 1001 items; the limit is 1000")
    );
    // Empty batch.
    for status in [
        tokenize(&mut writer, "card", &[]).await.unwrap_err(),
        detokenize(&mut reader, "card", &[]).await.unwrap_err(),
        delete(&mut writer, "card", &[]).await.unwrap_err(),
    ] {
        assert_eq!((status.code(), status.message()), (Code::InvalidArgument, "the request has no items"));
    }
    // Oversized and empty values fail alone.
    let big = "9".repeat(4097);
    let result = tokenize(&mut writer, "name", &["ok value", &big, ""]).await.unwrap();
    assert!(matches!(result[0], tokenize_result::Outcome::Token(_)));
    for (outcome, message) in result[1..].iter().zip(["the value is longer than 4096 bytes", "the value is empty"]) {
        let tokenize_result::Outcome::Error(e) = outcome else { panic!("expected an item error") };
        assert_eq!((e.code, e.message.as_str()), (ItemErrorCode::InvalidValue as i32, message));
    }
    // A value that does not fit its collection's format fails alone, and
    // the message does not repeat it.
    let result = tokenize(&mut writer, "card", &["4111-1111-111", "5105 1051 0510 5100"]).await.unwrap();
    let tokenize_result::Outcome::Error(e) = &result[0] else { panic!("expected an item error") };
    assert_eq!(
        (e.code, e.message.as_str()),
        (
            ItemErrorCode::InvalidValue as i32,
            "the value does not fit the collection's format (card): a card number is 12 to 19 digits, optionally grouped by single spaces or dashes"
        )
    );
    assert!(matches!(result[1], tokenize_result::Outcome::Token(_)));
    // A message over max_message_bytes (8 MiB): 2,100 values of 4 KiB.
    let chunk = "8".repeat(4096);
    let huge: Vec<&str> = vec![chunk.as_str(); 2100];
    let status = tokenize(&mut writer, "card", &huge).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::ResourceExhausted, "the message is larger than the server's max_message_bytes")
    );
    assert_eq!(server.record_count(), before + 2, "only the two valid values were stored");
    assert_eq!(detokenize(&mut reader, "card", &[card]).await.unwrap()[0].0, Ok("4000056655665556".into()));
    let output = server.output();
    assert!(!output.contains(&big[..64]));
    assert!(!output.contains("4000056655665556"));
}

#[tokio::test]
async fn delete_then_detokenize_is_not_found_and_health_reports_serving() {
    let server = DevServer::start();
    let mut writer = server.client("writer").await;
    let mut reader = server.client("reader").await;
    let t = tokens(&mut writer, "email", &["gone@example.org", "kept@example.org"]).await;
    assert_eq!(delete(&mut writer, "email", &t[..1]).await.unwrap(), vec![Ok(true)]);
    assert_eq!(delete(&mut writer, "email", &t[..1]).await.unwrap(), vec![Err(NOT_FOUND)]);
    let back = detokenize(&mut reader, "email", &t).await.unwrap();
    assert_eq!(back, vec![(Err(NOT_FOUND), false), (Ok("kept@example.org".into()), false)]);

    let channel = server.channel("auditor").await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest { service: "piivault.v1.Tokenizer".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}

/// A record altered on disk under a running server: that item alone fails
/// (UNREADABLE, the same opaque answer whatever the damage), the server logs
/// an alert naming the token (never the value), and the rest is served.
#[tokio::test]
async fn a_corrupted_record_fails_alone_with_an_alert() {
    let server = DevServer::start();
    let mut writer = server.client("writer").await;
    let mut reader = server.client("reader").await;
    let t = tokens(&mut writer, "name", &["Grace Hopper", "Alan Turing"]).await;
    {
        let db = common::tamper::open(&server.db_path());
        // The first record of the collection: t[0] (records are kept in
        // the order they were added).
        let (id, seq) = common::tamper::nth_record(&db, "name", 0);
        let mut ct: Vec<u8> = db
            .query_row("SELECT ciphertext FROM records WHERE collection_id = ?1 AND seq = ?2", [id, seq], |r| r.get(0))
            .unwrap();
        ct[20] ^= 0x01;
        db.execute(
            "UPDATE records SET ciphertext = ?1 WHERE collection_id = ?2 AND seq = ?3",
            common::tamper::params![ct, id, seq],
        )
        .unwrap();
    }
    let back = detokenize(&mut reader, "name", &t).await.unwrap();
    assert_eq!(back, vec![(Err(ItemErrorCode::Unreadable as i32), false), (Ok("Alan Turing".into()), false)]);
    let output = server.output();
    let alert = output.lines().find(|l| l.contains("stored record failed to decrypt")).expect("an alert line");
    assert!(alert.contains("alert=true") && alert.contains(&t[0]), "{alert}");
    assert!(!output.contains("Grace Hopper"));
}

/// `piivault certs init` on a running vault's directory re-issues the
/// server certificate; the server loads it (here on SIGHUP; the file
/// watcher does the same), new handshakes get it, and a connection opened
/// before keeps serving on the same TCP connection.
#[tokio::test]
async fn a_new_server_certificate_is_loaded_without_dropping_connections() {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, ServerName};

    let server = DevServer::start();
    let mut writer = server.client("writer").await;
    let before = tokens(&mut writer, "name", &["Before Reload"]).await;
    let old_cert = std::fs::read(server.dir.join("pki/server.pem")).unwrap();
    let renewed = std::process::Command::new(common::server::BIN)
        .args(["certs", "init", "--data-dir", server.dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(renewed.status.success(), "{}", String::from_utf8_lossy(&renewed.stderr));
    assert_ne!(std::fs::read(server.dir.join("pki/server.pem")).unwrap(), old_cert);
    server.reload();
    // The held connection still serves, and it is the same one: both
    // requests are on the audit trail from the same peer address and port.
    let after = tokens(&mut writer, "name", &["After Reload"]).await;
    let db = common::tamper::open(&server.db_path());
    let peers: Vec<String> = db
        .prepare("SELECT record FROM audit WHERE action = 'tokenize' ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|bytes| piivault::audit::AuditRecord::decode(&bytes.unwrap()).unwrap().1.peer)
        .collect();
    assert_eq!(peers.len(), 2, "{before:?} {after:?}");
    assert_eq!(peers[0], peers[1]);
    // A new handshake is answered with the new certificate.
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let connector = common::server::raw_tls_connector(&server.dir, "reader");
    let tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let new_cert = CertificateDer::from_pem_file(server.dir.join("pki/server.pem")).unwrap();
    assert_eq!(presented, new_cert);
}

#[tokio::test]
async fn a_bad_policy_on_reload_keeps_the_old_one() {
    let server = DevServer::start();
    let policy = server.dir.join("policy.toml");
    let good = std::fs::read_to_string(&policy).unwrap();
    std::fs::write(&policy, format!("{good}\n[callers.writer]\ntokenize = [\"card\"]\n")).unwrap();
    server.reload();
    let output = server.output();
    assert!(output.contains("policy reload failed; keeping the previous policy"), "{output}");
    let mut writer = server.client("writer").await;
    assert_eq!(tokens(&mut writer, "ssn", &["078-05-1120"]).await.len(), 1);
    // A good edit applies without a restart: the reader loses detokenize.
    std::fs::write(
        &policy,
        good.replace("[callers.reader]\ndetokenize = [\"*\"]", "[callers.reader]\ndetokenize = [\"card\"]"),
    )
    .unwrap();
    server.reload();
    let mut reader = server.client("reader").await;
    let token = tokens(&mut writer, "ssn", &["219-09-9999"]).await;
    assert_eq!(detokenize(&mut reader, "ssn", &token).await.unwrap_err().code(), Code::PermissionDenied);
}

/// Run again on an existing directory, `piivault dev` reuses it: same CA,
/// same certificates, same data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_reuses_its_directory() {
    let server = DevServer::start();
    let dir = server.dir.clone();
    let mut writer = server.client("writer").await;
    let token = tokens(&mut writer, "phone", &["+1 202 555 0143"]).await;
    let ca_before = server.ca_pem();
    let (status, tmp) = tokio::task::spawn_blocking(move || server.stop()).await.unwrap();
    assert!(status.success());

    let again = DevServer::start_in(tmp, dir);
    assert_eq!(again.ca_pem(), ca_before);
    assert!(!again.output().contains("initialised a new vault"));
    let mut reader = again.client("reader").await;
    assert_eq!(detokenize(&mut reader, "phone", &token).await.unwrap(), vec![(Ok("+1 202 555 0143".into()), false)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_gracefully_and_keeps_every_acknowledged_value() {
    let server = DevServer::start();
    let mut writer = server.client("writer").await;
    let t = tokens(&mut writer, "name", &["Ada Lovelace", "Grace Hopper"]).await;
    let dir = server.dir.clone();
    let pid = server.pid();
    let (status, _keep) = tokio::task::spawn_blocking(move || server.stop()).await.unwrap();
    assert!(status.success(), "exit status {status:?} (pid {pid})");
    assert!(!dir.join("vault.db-wal").exists() || std::fs::metadata(dir.join("vault.db-wal")).unwrap().len() == 0);
    assert_eq!(common::server::record_count(&dir.join("vault.db")), 2);
    // A restart serves the same values.
    let check = std::process::Command::new(common::server::BIN)
        .args(["check", "--config", dir.join("config.toml").to_str().unwrap(), "--passphrase-file"])
        .arg(dir.join("dev-passphrase"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    assert!(String::from_utf8_lossy(&check.stdout).contains("name=2"));
    assert_eq!(t.len(), 2);
}

fn cli(server: &DevServer, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write as _;
    let addr = server.addr.to_string();
    let mut cmd = std::process::Command::new(common::server::BIN);
    cmd.args(args).args(["--addr", &addr]).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    cmd.env_remove("PIIVAULT_ADDR")
        .env_remove("PIIVAULT_CACERT")
        .env_remove("PIIVAULT_CLIENT_CERT")
        .env_remove("PIIVAULT_CLIENT_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(if stdin.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() });
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn stdout_lines(out: &std::process::Output) -> Vec<String> {
    String::from_utf8(out.stdout.clone()).unwrap().lines().map(String::from).collect()
}

/// `piivault dev`, then the command-line client as `writer` and `reader`,
/// each a separate process.
#[test]
fn the_cli_client_against_piivault_dev() {
    let server = DevServer::start();
    let dir = server.dir.to_str().unwrap();
    let out = cli(
        &server,
        &[
            "tokenize",
            "--data-dir",
            dir,
            "--as",
            "writer",
            "--collection",
            "card",
            "4000 0566 5566 5556",
            "5105105105105100",
        ],
        &[],
        None,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tokens = stdout_lines(&out);
    assert_eq!(tokens.len(), 2);
    assert!(tokens[0].ends_with(" 5556") && tokens[0].len() == 19 && tokens[1].ends_with("5100"), "{tokens:?}");

    // Tokens on stdin, one per line, plus an unknown one: exit 1, every item printed.
    let input = format!("{}\ncard_AAAAAAAAAAAAAAAAAAAAAA\n{}\n", tokens[0], tokens[1]);
    let out =
        cli(&server, &["detokenize", "--data-dir", dir, "--as", "reader", "--collection", "card"], &[], Some(&input));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout_lines(&out), ["4000 0566 5566 5556", "error: NOT_FOUND: token not found", "5105105105105100"]);
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "piivault: 1 of 3 items failed");

    // The environment variables, and JSON; support sees masked values.
    let client = server.dir.join("clients/support");
    let (ca, cert, key) = (server.dir.join("pki/ca.pem"), client.join("cert.pem"), client.join("key.pem"));
    let env = [
        ("PIIVAULT_CACERT", ca.to_str().unwrap()),
        ("PIIVAULT_CLIENT_CERT", cert.to_str().unwrap()),
        ("PIIVAULT_CLIENT_KEY", key.to_str().unwrap()),
    ];
    let out = cli(&server, &["detokenize", "--collection", "card", "--json", &tokens[0], &tokens[1]], &env, None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json,
        serde_json::json!([{"value": "**** **** **** 5556", "masked": true}, {"value": "************5100", "masked": true}])
    );

    // The reader may not tokenize: one clear line, exit 1.
    let out = cli(&server, &["tokenize", "--data-dir", dir, "--as", "reader", "--collection", "card", "x"], &[], None);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "piivault: PERMISSION_DENIED: permission denied for this collection"
    );

    // A client that trusts another CA refuses the server.
    let other = tempfile::tempdir().unwrap();
    Ca::init(other.path(), "elsewhere.example", &["localhost".into()]).unwrap();
    let wrong_ca = other.path().join("pki/ca.pem");
    let out = cli(
        &server,
        &[
            "tokenize",
            "--data-dir",
            dir,
            "--as",
            "writer",
            "--ca",
            wrong_ca.to_str().unwrap(),
            "--collection",
            "card",
            "x",
        ],
        &[],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("piivault: cannot connect to 127.0.0.1:") && err.contains("UnknownIssuer"), "{err}");

    // Missing credentials are bad usage.
    let out = cli(&server, &["tokenize", "--collection", "card", "x"], &[], None);
    assert_eq!(out.status.code(), Some(64));

    let output = server.output();
    for value in ["4000 0566 5566 5556", "5105105105105100"] {
        assert!(!output.contains(value), "the server printed a value");
    }
}

/// TLS 1.2 and 1.3 both negotiate an AEAD suite with ephemeral key exchange.
#[tokio::test]
async fn tls_12_and_13_negotiate_aead_suites() {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let server = DevServer::start();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(&server.ca_pem()).unwrap()).unwrap();
    let client_dir = server.dir.join("clients/writer");
    let cert = CertificateDer::from_pem_file(client_dir.join("cert.pem")).unwrap();
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let key = PrivateKeyDer::from_pem_file(client_dir.join("key.pem")).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(piivault::tls::crypto_provider())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(vec![cert.clone()], key)
            .unwrap();
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let stream = connector.connect(ServerName::try_from("127.0.0.1").unwrap(), tcp).await.unwrap();
        let session = stream.get_ref().1;
        assert_eq!(session.protocol_version(), Some(version.version));
        let suite = format!("{:?}", session.negotiated_cipher_suite().unwrap().suite());
        assert!(suite.contains("GCM") || suite.contains("CHACHA20_POLY1305"), "{suite}");
        assert!(suite.starts_with("TLS13_") || suite.starts_with("TLS_ECDHE_"), "{suite}");
    }
}

/// Server reflection lists the services, for grpcurl and friends.
#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = DevServer::start();
    let channel = server.channel("reader").await;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else { panic!("{response:?}") };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "piivault.v1.Admin",
            "piivault.v1.Audit",
            "piivault.v1.Tokenizer"
        ]
    );
}

/// Successes, denials and unauthenticated calls are all on the record, with
/// caller, peer and request id; no value is.
#[tokio::test]
async fn calls_over_the_network_are_audited() {
    let server = DevServer::start();
    let mut writer = server.client("writer").await;
    let mut request =
        tonic::Request::new(TokenizeRequest { collection: "card".into(), values: vec!["4000056655665556".into()] });
    request.metadata_mut().insert("x-request-id", "order-7781".parse().unwrap());
    writer.tokenize(request).await.unwrap();
    let denied = detokenize(&mut writer, "card", &["card_AAAAAAAAAAAAAAAAAAAAAA".into()]).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let mut nobody = spec("writer");
    nobody.uris.clear();
    let mut anonymous = server.connect(server.tls_signed(&server.sign(&nobody))).await.unwrap();
    assert_eq!(tokenize(&mut anonymous, "card", &["x"]).await.unwrap_err().code(), Code::Unauthenticated);

    let db = common::tamper::open_read_only(&server.db_path());
    let mut stmt = db.prepare("SELECT record FROM audit ORDER BY seq").unwrap();
    let records: Vec<piivault::audit::AuditRecord> = stmt
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|bytes| piivault::audit::AuditRecord::decode(&bytes.unwrap()).unwrap().1)
        .collect();
    assert_eq!(records.len(), 4, "{records:?}");
    // The server's own start: the unseal, by the provider that did it.
    let (unseal, records) = records.split_first().unwrap();
    assert_eq!(
        (unseal.caller.as_str(), unseal.action.as_str(), unseal.outcome.as_str(), unseal.error_code.as_str()),
        ("(startup)", "unseal", "OK", "passphrase")
    );
    let fields = |r: &piivault::audit::AuditRecord| {
        (r.caller.clone(), r.action.clone(), r.collection.clone(), r.items, r.outcome.clone(), r.tokens.len())
    };
    assert_eq!(fields(&records[0]), ("writer".into(), "tokenize".into(), "card".into(), 1, "OK".into(), 1));
    assert_eq!(records[0].request_id, "order-7781");
    assert!(records[0].peer.starts_with("127.0.0.1:"));
    // Refused before its body was read (the writer holds no detokenize
    // grant at all): no collection or item count, since neither was decoded.
    assert_eq!(
        fields(&records[1]),
        ("writer".into(), "detokenize".into(), String::new(), 0, "PERMISSION_DENIED".into(), 0)
    );
    assert_eq!(records[1].request_id.len(), 16, "a request id is generated when none is given");
    assert_eq!(fields(&records[2]), (String::new(), "tokenize".into(), String::new(), 0, "UNAUTHENTICATED".into(), 0));
    assert_eq!(records[2].error_code, "the client certificate has no URI SAN");
    let raw = std::fs::read(server.db_path()).unwrap();
    let wal = std::fs::read(server.dir.join("vault.db-wal")).unwrap_or_default();
    assert!(!common::contains(&raw, b"4000056655665556") && !common::contains(&wal, b"4000056655665556"));
}

fn lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The compliance questions, asked as an auditor over the network and
/// offline from the data directory: who detokenized token T; everything
/// caller C did in a window; every denied request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compliance_queries_return_exactly_the_right_records() {
    let server = DevServer::start();
    let dir = server.dir.to_str().unwrap().to_owned();
    let mut writer = server.client("writer").await;
    let mut reader = server.client("reader").await;
    let mut support = server.client("support").await;
    let t = tokens(&mut writer, "card", &["4000056655665556", "5105105105105100"]).await;
    let window_start = time::OffsetDateTime::now_utc();
    detokenize(&mut reader, "card", &t[..1]).await.unwrap();
    detokenize(&mut support, "card", &t[..1]).await.unwrap();
    detokenize(&mut reader, "card", &t[1..]).await.unwrap();
    assert_eq!(detokenize(&mut writer, "card", &t[..1]).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(tokenize(&mut reader, "card", &["x"]).await.unwrap_err().code(), Code::PermissionDenied);
    let since = window_start.format(&time::format_description::well_known::Rfc3339).unwrap();

    let s = server.addr.to_string();
    let query = |who: &str, extra: &[&str]| {
        let mut args = vec!["audit", "query", "--json", "--data-dir", &dir, "--as", who, "--addr", &s];
        args.extend_from_slice(extra);
        std::process::Command::new(common::server::BIN).args(&args).output().unwrap()
    };
    let fields = |v: &serde_json::Value| {
        (
            v["caller"].as_str().unwrap().to_owned(),
            v["action"].as_str().unwrap().to_owned(),
            v["outcome"].as_str().unwrap().to_owned(),
        )
    };

    // Who detokenized token T? (in clear, and masked)
    let who_read = lines(&query("auditor", &["--token", &t[0], "--action", "detokenize"]));
    assert_eq!(who_read.iter().map(fields).collect::<Vec<_>>(), [("reader".into(), "detokenize".into(), "OK".into())]);
    assert_eq!(who_read[0]["tokens"], serde_json::json!([t[0]]));
    let masked = lines(&query("auditor", &["--token", &t[0], "--action", "detokenize_masked"]));
    assert_eq!(
        masked.iter().map(fields).collect::<Vec<_>>(),
        [("support".into(), "detokenize_masked".into(), "OK".into())]
    );

    // Everything the reader did in the window.
    let reader_did = lines(&query("auditor", &["--caller", "reader", "--since", &since]));
    assert_eq!(
        reader_did.iter().map(fields).collect::<Vec<_>>(),
        [
            ("reader".into(), "detokenize".into(), "OK".into()),
            ("reader".into(), "detokenize".into(), "OK".into()),
            ("reader".into(), "tokenize".into(), "PERMISSION_DENIED".into()),
        ]
    );
    assert_eq!(reader_did[1]["tokens"], serde_json::json!([t[1]]));
    let before_window = lines(&query("auditor", &["--caller", "writer", "--until", &since]));
    assert_eq!(
        before_window.iter().map(fields).collect::<Vec<_>>(),
        [("writer".into(), "tokenize".into(), "OK".into())]
    );

    // Every denied request.
    let denied = lines(&query("auditor", &["--outcome", "PERMISSION_DENIED"]));
    assert_eq!(
        denied.iter().map(fields).collect::<Vec<_>>(),
        [
            ("writer".into(), "detokenize".into(), "PERMISSION_DENIED".into()),
            ("reader".into(), "tokenize".into(), "PERMISSION_DENIED".into())
        ]
    );

    // A filter that is not a token is not copied into the trail (it is free
    // text and could hold anything).
    assert!(lines(&query("auditor", &["--token", "4000056655665556"])).is_empty());

    // Only auditors may ask; asking is itself on the record, and so is the refusal.
    let refused = query("writer", &[]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("PERMISSION_DENIED"));
    let offline = std::process::Command::new(common::server::BIN)
        .args(["audit", "query", "--json", "--data-dir", &dir, "--action", "audit_query"])
        .output()
        .unwrap();
    let asked = lines(&offline);
    assert_eq!(asked.iter().filter(|r| r["caller"] == "auditor" && r["outcome"] == "OK").count(), 6);
    assert_eq!(asked[5]["tokens"], serde_json::json!([]));
    assert_eq!(asked.iter().filter(|r| r["caller"] == "writer" && r["outcome"] == "PERMISSION_DENIED").count(), 1);
    assert_eq!(asked[0]["tokens"], serde_json::json!([t[0]]), "the token an auditor asked about is recorded");

    // Export: every record, JSON lines, chained MACs, no value anywhere.
    let export = std::process::Command::new(common::server::BIN)
        .args(["audit", "export", "--format", "jsonl", "--data-dir", &dir, "--as", "auditor", "--addr", &s])
        .output()
        .unwrap();
    let all = lines(&export);
    let seqs: Vec<u64> = all.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert!(all.iter().all(|r| r["mac"].as_str().unwrap().len() == 64));
    let text = String::from_utf8_lossy(&export.stdout);
    assert!(!text.contains("4000056655665556") && !text.contains("5105105105105100"));

    // Verify over the network.
    let channel = server.channel("auditor").await;
    let verdict =
        proto::audit_client::AuditClient::new(channel).verify(proto::AuditVerifyRequest {}).await.unwrap().into_inner();
    assert!(verdict.ok, "{verdict:?}");
    assert!(verdict.records >= seqs.len() as u64);
    assert_eq!(verdict.head_mac.len(), 64);
}

/// The JSON-lines sink (reopened on SIGHUP), alerts on repeated refusals,
/// and refused handshakes on the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_alerts_and_refused_handshakes() {
    let first = DevServer::start();
    let dir = first.dir.clone();
    let (status, tmp) = tokio::task::spawn_blocking(move || first.stop()).await.unwrap();
    assert!(status.success());
    let config = dir.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text =
        text.replace("sink = \"none\"", "sink = \"audit.jsonl\"").replace("alert_threshold = 5", "alert_threshold = 3");
    std::fs::write(&config, text).unwrap();
    let server = DevServer::start_in(tmp, dir.clone());

    let mut writer = server.client("writer").await;
    let t = tokens(&mut writer, "ssn", &["078-05-1120"]).await;
    for _ in 0..3 {
        assert_eq!(detokenize(&mut writer, "ssn", &t).await.unwrap_err().code(), Code::PermissionDenied);
    }
    let other = tempfile::tempdir().unwrap();
    let foreign =
        Ca::init(other.path(), "elsewhere.example", &["localhost".into()]).unwrap().sign(&spec("writer")).unwrap();
    assert_handshake_refused(&server, server.tls_signed(&foreign), "invalid peer certificate: UnknownIssuer").await;

    let output = server.output();
    assert!(output.contains("repeated refused requests"), "{output}");
    assert!(output.contains("subject=\"writer\""), "{output}");

    // The refusal's audit record is written just after its log line: wait
    // for it in the sink before rotating the file.
    let sink = dir.join("audit.jsonl");
    for _ in 0..200 {
        if std::fs::read_to_string(&sink).unwrap_or_default().contains("\"handshake\"") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    // Rotate the sink file away, SIGHUP, and the next record lands in a new file.
    let rotated = dir.join("audit.jsonl.1");
    std::fs::rename(&sink, &rotated).unwrap();
    server.reload();
    tokens(&mut writer, "ssn", &["219-09-9999"]).await;
    let old: Vec<serde_json::Value> =
        std::fs::read_to_string(&rotated).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let new: Vec<serde_json::Value> =
        std::fs::read_to_string(&sink).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let actions: Vec<&str> = old.iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(&actions[..5], ["unseal", "tokenize", "detokenize", "detokenize", "detokenize"]);
    assert!(old.iter().any(|r| r["action"] == "handshake"
        && r["outcome"] == "REFUSED"
        && r["peer"].as_str().unwrap().starts_with("127.0.0.1:")
        && r["error_code"].as_str().unwrap().contains("UnknownIssuer")));
    // The client retries a refused handshake on its own, so a late refusal
    // record may land in the new file too; the tokenize must, and only once.
    let new_calls: Vec<_> = new.iter().filter(|r| r["action"] != "handshake").collect();
    assert_eq!(new_calls.len(), 1, "{new:?}");
    assert_eq!((new_calls[0]["action"].as_str(), new_calls[0]["caller"].as_str()), (Some("tokenize"), Some("writer")));
    let seqs: Vec<u64> = old.iter().chain(&new).map(|r| r["seq"].as_u64().unwrap()).collect();
    // Record 1 is the first start's unseal, before the sink was configured.
    assert_eq!(seqs, (2..=seqs.len() as u64 + 1).collect::<Vec<_>>(), "the sink carries every record, in order");
    let all = std::fs::read_to_string(&rotated).unwrap() + &std::fs::read_to_string(&sink).unwrap();
    assert!(!all.contains("078-05-1120") && !all.contains("219-09-9999"));
}

/// `piivault keys ARGS` as `who` against the server at `addr`.
fn keys_cli(dir: &str, addr: &str, who: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::server::BIN)
        .args(["keys"])
        .args(args)
        .args(["--data-dir", dir, "--as", who, "--addr", addr])
        .output()
        .unwrap()
}

/// `(version, state, records)` of `collection`'s `purpose` keys, as `keys
/// list --json` shows them to `who`.
fn key_list(dir: &str, addr: &str, who: &str, collection: &str, purpose: &str) -> Vec<(u64, String, u64)> {
    let out = keys_cli(dir, addr, who, &["list", "--collection", collection, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    value
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["purpose"] == purpose)
        .map(|v| {
            (v["version"].as_u64().unwrap(), v["state"].as_str().unwrap().to_owned(), v["records"].as_u64().unwrap())
        })
        .collect()
}

/// `(action, caller or error code)` of every record on `collection` (every
/// record, if empty) with `outcome`, as the auditor's query answers.
fn refusals_on_record(dir: &str, addr: &str, collection: &str, outcome: &str) -> Vec<(String, String)> {
    let mut args = vec!["audit", "query", "--json", "--data-dir", dir, "--as", "auditor", "--addr", addr];
    if !collection.is_empty() {
        args.extend(["--collection", collection]);
    }
    let audit = std::process::Command::new(common::server::BIN).args(args).output().unwrap();
    lines(&audit)
        .iter()
        .filter(|v| v["outcome"] == outcome)
        .map(|v| {
            let detail = if outcome == "PERMISSION_DENIED" { &v["caller"] } else { &v["error_code"] };
            (v["action"].as_str().unwrap().to_owned(), detail.as_str().unwrap().to_owned())
        })
        .collect()
}

/// `piivault keys` as the admin caller against `piivault dev`: list, rotate,
/// re-encrypt, retire, each checked through `ListKeys` and real detokenize
/// calls; other callers are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_management_through_the_admin_api() {
    let server = DevServer::start();
    let dir = server.dir.to_str().unwrap().to_owned();
    let addr = server.addr.to_string();
    let keys = |who: &str, args: &[&str]| keys_cli(&dir, &addr, who, args);
    let list_of = |who: &str, collection: &str, purpose: &str| key_list(&dir, &addr, who, collection, purpose);
    let list = |who: &str| list_of(who, "card", "data");
    let mut writer = server.client("writer").await;
    let mut reader = server.client("reader").await;
    let values: Vec<String> = (0..40).map(|i| format!("5105 1051 0510 {i:04}")).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    let old = tokens(&mut writer, "card", &refs).await;
    assert_eq!(list("admin"), [(1, "primary".into(), 40)]);

    let out = keys("admin", &["rotate", "--collection", "card"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().next().unwrap().split(':').next().unwrap(), "card");
    assert!(String::from_utf8_lossy(&out.stdout).contains("version 2 is now primary"));
    let new = tokens(&mut writer, "card", &["4000 0566 5566 5556"]).await;
    assert_eq!(list("admin"), [(1, "active".into(), 40), (2, "primary".into(), 1)]);

    let refused = keys("admin", &["retire", "--collection", "card", "--key-version", "1"]);
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&refused.stderr).trim(),
        "piivault: FAILED_PRECONDITION: cannot retire the key version: 40 records are still sealed under this version; run reencrypt first"
    );
    // The refusal is on the trail once, under its own action, by the store
    // that refused it.
    assert_eq!(
        refusals_on_record(&dir, &addr, "card", "FAILED_PRECONDITION"),
        [(
            "retire_key_version".to_owned(),
            "40 records are still sealed under this version; run reencrypt first".to_owned()
        )]
    );

    let out = keys("admin", &["reencrypt", "--collection", "card", "--batch", "16", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let progress: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(progress.iter().map(|p| p["moved"].as_u64().unwrap()).collect::<Vec<_>>(), [16, 32, 40, 40]);
    assert_eq!(progress.last().unwrap()["done"], true);
    assert_eq!(progress.last().unwrap()["remaining"], 0);
    assert_eq!(list("admin"), [(1, "retiring".into(), 0), (2, "primary".into(), 41)]);

    let out = keys("admin", &["retire", "--collection", "card", "--key-version", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(list("admin"), [(1, "retired".into(), 0), (2, "primary".into(), 41)]);
    let back = detokenize(&mut reader, "card", &old).await.unwrap();
    assert_eq!(back.into_iter().map(|(v, _)| v.unwrap()).collect::<Vec<_>>(), values);
    assert_eq!(detokenize(&mut reader, "card", &new).await.unwrap()[0].0, Ok("4000 0566 5566 5556".into()));

    // Only the admin grant manages keys.
    for who in ["writer", "reader", "auditor"] {
        let out = keys(who, &["rotate", "--collection", "card"]);
        assert_eq!(out.status.code(), Some(1), "{who}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("PERMISSION_DENIED"), "{who}");
    }
    assert_eq!(list("admin").len(), 2, "the refused rotations changed nothing");
    // Each refusal is recorded under what was asked, not the grant it lacked
    // (before its body is read: no collection).
    assert_eq!(
        refusals_on_record(&dir, &addr, "", "PERMISSION_DENIED"),
        ["writer", "reader", "auditor"].map(|who| ("rotate_data_key".to_owned(), who.to_owned()))
    );

    // The blind index of a deterministic collection: its key rotates online
    // and the index is rebuilt under the new one in the background.
    let emails = tokens(&mut writer, "email", &["a@example.org", "b@example.org"]).await;
    assert_eq!(list_of("admin", "email", "index"), [(1, "primary".into(), 2)]);
    let out = keys("admin", &["rotate-index", "--collection", "email"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "email: index key version 2 is now primary; the index is being rebuilt in the background"
    );
    let mut index = list_of("admin", "email", "index");
    for _ in 0..100 {
        if index[0].1 == "retired" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        index = list_of("admin", "email", "index");
    }
    assert_eq!(index, [(1, "retired".into(), 0), (2, "primary".into(), 2)]);
    assert_eq!(tokens(&mut writer, "email", &["A@Example.org", "b@example.org"]).await, emails);
    let refused = keys("admin", &["rotate-index", "--collection", "card"]);
    assert_eq!(
        String::from_utf8_lossy(&refused.stderr).trim(),
        "piivault: FAILED_PRECONDITION: the collection is not deterministic: it has no blind index"
    );
    let mut admin = proto::admin_client::AdminClient::new(server.channel("admin").await);
    admin.reload_policy(proto::ReloadPolicyRequest {}).await.unwrap();
    let mut writer_admin = proto::admin_client::AdminClient::new(server.channel("writer").await);
    assert_eq!(
        writer_admin.reload_policy(proto::ReloadPolicyRequest {}).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // The table output for people.
    let table = String::from_utf8(keys("admin", &["list"]).stdout).unwrap();
    assert!(table.starts_with("COLLECTION"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("card") && l.contains("retired")), "{table}");
}

/// `keys rotate-root` online, as the admin: values keep flowing, and after a
/// restart only the new passphrase opens the vault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_key_rotation_online() {
    let server = DevServer::start();
    let dir = server.dir.clone();
    let mut writer = server.client("writer").await;
    let mut reader = server.client("reader").await;
    let before = tokens(&mut writer, "name", &["Ada Lovelace"]).await;
    let new_pass = dir.join("new-passphrase");
    common::write_secret(&new_pass, "rotated online passphrase");
    let rotate = |who: &str| {
        std::process::Command::new(common::server::BIN)
            .args(["keys", "rotate-root", "--new-passphrase-file", new_pass.to_str().unwrap()])
            .args(["--data-dir", dir.to_str().unwrap(), "--as", who, "--addr", &server.addr.to_string()])
            .output()
            .unwrap()
    };
    let refused = rotate("writer");
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("PERMISSION_DENIED"));
    // A weak passphrase or a degenerate raw key is refused, and nothing changes.
    let mut root_admin = proto::admin_client::AdminClient::new(server.channel("admin").await);
    let sealed_before = std::fs::read(dir.join("root.sealed")).unwrap();
    for (request, message) in [
        (
            proto::RotateRootKeyRequest { new_passphrase: "a".into(), ..Default::default() },
            "the passphrase is too weak: use at least 12 characters with at least 6 different ones",
        ),
        (
            proto::RotateRootKeyRequest { new_raw_key_hex: "00".repeat(32), ..Default::default() },
            "the raw key is degenerate (fewer than 16 different bytes): generate it with a CSPRNG",
        ),
    ] {
        let status = root_admin.rotate_root_key(request).await.unwrap_err();
        assert_eq!((status.code(), status.message()), (Code::InvalidArgument, message));
    }
    assert_eq!(std::fs::read(dir.join("root.sealed")).unwrap(), sealed_before);
    let out = rotate("admin");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("root key rotated: 13 keys re-wrapped"));
    // Traffic is unaffected, including new keys wrapped under the new root.
    let after = tokens(&mut writer, "name", &["Grace Hopper"]).await;
    let mut admin = proto::admin_client::AdminClient::new(server.channel("admin").await);
    admin
        .rotate_data_key(proto::RotateDataKeyRequest { collection: "name".into(), compromised_version: 0 })
        .await
        .unwrap();
    let latest = tokens(&mut writer, "name", &["Katherine Johnson"]).await;
    let all: Vec<String> = before.iter().chain(&after).chain(&latest).cloned().collect();
    let back: Vec<String> =
        detokenize(&mut reader, "name", &all).await.unwrap().into_iter().map(|(v, _)| v.unwrap()).collect();
    assert_eq!(back, ["Ada Lovelace", "Grace Hopper", "Katherine Johnson"]);
    assert!(!server.output().contains("rotated online passphrase"));

    let (status, _keep) = tokio::task::spawn_blocking(move || server.stop()).await.unwrap();
    assert!(status.success());
    let check = |pass_file: &std::path::Path| {
        std::process::Command::new(common::server::BIN)
            .args(["check", "--config", dir.join("config.toml").to_str().unwrap(), "--passphrase-file"])
            .arg(pass_file)
            .output()
            .unwrap()
    };
    assert_eq!(
        check(&dir.join("dev-passphrase")).status.code(),
        Some(78),
        "the old passphrase must not open the vault"
    );
    let ok = check(&new_pass);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("name=3"));
}

/// `piivault bench` against `piivault dev`: it seeds, loads, and reports
/// numbers that agree with each other and with the store.
#[test]
fn the_load_generator_reports_a_mixed_run() {
    let server = DevServer::start();
    let dir = server.dir.to_str().unwrap();
    let pid = server.pid().to_string();
    let before = server.record_count();
    let args = [
        "bench",
        "--data-dir",
        dir,
        "--as",
        "writer",
        "--reader",
        "reader",
        "--op",
        "mixed",
        "--collection",
        "card",
        "--seed",
        "300",
        "--batch",
        "5",
        "--concurrency",
        "4",
        "--connections",
        "2",
        "--duration",
        "1",
        "--server-pid",
        &pid,
        "--json",
    ];
    let out = cli(&server, &args, &[], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let number =
        |path: &[&str]| path.iter().fold(&report, |v, k| &v[*k]).as_f64().unwrap_or_else(|| panic!("{path:?}"));
    assert_eq!((report["op"].as_str(), report["collection"].as_str()), (Some("mixed"), Some("card")));
    assert_eq!((number(&["errors"]), number(&["seeded"]), number(&["batch"])), (0.0, 300.0, 5.0));
    let requests = number(&["requests"]);
    assert!(requests >= 10.0, "{report}");
    let duration = number(&["duration_s"]);
    assert!((1.0..3.0).contains(&duration), "{report}");
    assert!((number(&["requests_per_s"]) - requests / duration).abs() < 1.0, "{report}");
    assert!((number(&["values_per_s"]) - 5.0 * requests / duration).abs() < 5.0, "{report}");
    let latency: Vec<f64> = ["p50", "p90", "p99", "max"].iter().map(|p| number(&["latency_ms", p])).collect();
    assert!(latency[0] > 0.0 && latency.windows(2).all(|w| w[0] <= w[1]), "{report}");
    assert!(number(&["server", "cpu_us_per_request"]) > 0.0, "{report}");
    assert!(number(&["server", "peak_rss_mib"]) >= number(&["server", "rss_mib"]), "{report}");
    // One request in five tokenizes 5 new values (each of the 4 callers
    // starts with one); the seed stored 300.
    let stored = server.record_count() - before;
    let whole = report["requests"].as_i64().unwrap();
    assert!((300 + 5 * (whole / 5)..=300 + 5 * (whole / 5 + 4)).contains(&stored), "{stored} {report}");

    // Reading needs tokens to read.
    let out =
        cli(&server, &["bench", "--data-dir", dir, "--as", "reader", "--op", "detokenize", "--seed", "0"], &[], None);
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "piivault: --op Detokenize needs --seed of at least 1");
}

/// Copies a dev data directory's files except the store (config, policy,
/// sealed root and passphrase, PKI, client certificates) into `to`.
fn copy_dir_without_store(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.starts_with("vault.db") {
            continue;
        }
        if path.is_dir() {
            copy_dir_without_store(&path, &to.join(&name));
        } else {
            std::fs::copy(&path, to.join(&name)).unwrap();
        }
    }
}

/// `piivault backup` while writes go on; the copy, put in place in a new
/// data directory, serves every token acknowledged before it began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_backup_restores_into_a_new_vault() {
    let server = DevServer::start();
    let dir = server.dir.to_str().unwrap().to_owned();
    let mut writer = server.client("writer").await;
    let values: Vec<String> = (0..400).map(|i| format!("4000 1234 5678 {i:04}")).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    let before = tokens(&mut writer, "card", &refs).await;
    let emails = tokens(&mut writer, "email", &["backup@example.org"]).await;

    // Writes keep coming while the backup runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, mut writer) = (stop.clone(), server.client("writer").await);
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch: Vec<String> = (0..50).map(|i| format!("during backup {n} {i}")).collect();
                let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
                tokens(&mut writer, "name", &refs).await;
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("backup.db");
    let backup =
        cli(&server, &["backup", "--data-dir", &dir, "--as", "admin", "--out", out.to_str().unwrap()], &[], None);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let batches = traffic.await.unwrap();
    assert!(backup.status.success(), "{}", String::from_utf8_lossy(&backup.stderr));
    let said = String::from_utf8_lossy(&backup.stdout).to_string();
    assert!(
        said.starts_with(&format!("backup written to {}: ", out.display())) && said.contains("integrity ok"),
        "{said}"
    );
    assert!(batches > 0);
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&out).unwrap().permissions()) & 0o777, 0o600);
    // The server's temporary copy is gone.
    assert!(
        std::fs::read_dir(&server.dir).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains("backup"))
    );
    // Not over an existing file, and not as anyone but an admin.
    let again =
        cli(&server, &["backup", "--data-dir", &dir, "--as", "admin", "--out", out.to_str().unwrap()], &[], None);
    assert_eq!(again.status.code(), Some(64), "{}", String::from_utf8_lossy(&again.stderr));
    let refused = cli(&server, &["backup", "--data-dir", &dir, "--as", "writer", "--out", "/tmp/never.db"], &[], None);
    assert_eq!(
        String::from_utf8_lossy(&refused.stderr).trim(),
        "piivault: PERMISSION_DENIED: permission denied for this collection"
    );
    assert!(!std::path::Path::new("/tmp/never.db").exists());
    // The original's trail says what left: the copy's size and its values.
    let live_in_copy = common::server::record_count(&out);
    let mut audit = piivault::grpc::proto::audit_client::AuditClient::new(server.channel("auditor").await);
    let request = piivault::grpc::proto::AuditQueryRequest { action: "backup".into(), ..Default::default() };
    let mut stream = audit.query(request).await.unwrap().into_inner();
    let mut seen = Vec::new();
    while let Some(record) = stream.message().await.unwrap() {
        seen.push((record.outcome, record.items, record.error_code));
    }
    let size = std::fs::metadata(&out).unwrap().len();
    assert_eq!(seen[0].0, "STARTED");
    assert_eq!(seen[1], ("OK".into(), u32::try_from(live_in_copy).unwrap(), format!("bytes={size}")), "{seen:?}");
    assert!(live_in_copy >= 401, "{live_in_copy}");

    // Restore: the same data directory's files, the backup as vault.db.
    let restored_tmp = tempfile::tempdir().unwrap();
    let restored_dir = restored_tmp.path().join("vault");
    copy_dir_without_store(&server.dir, &restored_dir);
    std::fs::copy(&out, restored_dir.join("vault.db")).unwrap();
    let restored = DevServer::start_in(restored_tmp, restored_dir);
    let mut reader = restored.client("reader").await;
    let back = detokenize(&mut reader, "card", &before).await.unwrap();
    assert_eq!(back.into_iter().map(|(v, _)| v.unwrap()).collect::<Vec<_>>(), values);
    // Deterministic lookups survive too: the same value, the same token.
    let mut restored_writer = restored.client("writer").await;
    assert_eq!(tokens(&mut restored_writer, "email", &["backup@example.org"]).await, emails);
    // The backup is on the record, in the copy as in the original.
    let mut audit = piivault::grpc::proto::audit_client::AuditClient::new(restored.channel("auditor").await);
    let request = piivault::grpc::proto::AuditQueryRequest { action: "backup".into(), ..Default::default() };
    let mut stream = audit.query(request).await.unwrap().into_inner();
    let record = stream.message().await.unwrap().expect("the backup's audit record");
    assert_eq!((record.caller.as_str(), record.outcome.as_str()), ("admin", "STARTED"));
}

/// Bytes sent as they are, for requests no generated client can make.
#[derive(Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        Self
    }

    fn decoder(&mut self) -> Self::Decoder {
        Self
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        buf.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf as _;
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// A request whose protobuf does not decode (truncated varint, wrong wire
/// type, a length past the end) is the caller's error: `INVALID_ARGUMENT`
/// with a fixed message, counted; nothing is stored and the server serves on.
#[tokio::test]
async fn malformed_messages_are_invalid_argument() {
    let server = DevServer::start();
    let channel = server.channel("writer").await;
    let before = server.record_count();
    let malformed: [&[u8]; 3] = [
        &[0x0a, 0x04, b'c', b'a', b'r', b'd', 0x12, 0xff], // values: a length varint cut short
        &[0x08, 0x01],                                     // collection (a string) sent as a varint
        &[0x0a, 0x05, b'c'],                               // collection: 5 bytes announced, 1 sent
    ];
    for bytes in malformed {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static("/piivault.v1.Tokenizer/Tokenize");
        let status = grpc.unary(tonic::Request::new(bytes.to_vec()), path, RawCodec).await.unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (Code::InvalidArgument, piivault::grpc::codec::MALFORMED),
            "{bytes:?}"
        );
    }
    assert_eq!(server.metric("piivault_malformed_messages_total"), Some(3.0));
    assert_eq!(server.record_count(), before);
    let mut writer = server.client("writer").await;
    assert_eq!(tokens(&mut writer, "name", &["after the junk"]).await.len(), 1);
}
