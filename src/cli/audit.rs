//! `piivault audit`: compliance queries, export and verification, online
//! or offline.

use std::path::PathBuf;

use anyhow::anyhow;
use clap::Subcommand;

use super::{Classify as _, CliError, Failure, SecretArgs, Unseal, client, open_offline, say, vault_failure};
use crate::audit::{Event, Outcome};

#[derive(Debug, Subcommand)]
pub(super) enum AuditCommand {
    /// Verify the whole HMAC chain offline; exits 1 naming the first bad
    /// record. With `--expect-head SEQ:MAC` (from an earlier `audit head`,
    /// kept elsewhere) a truncated trail is detected too.
    Verify {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// A head recorded earlier: the trail must still contain it.
        #[arg(long, value_name = "SEQ:MAC")]
        expect_head: Option<String>,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Records matching the filters, oldest first (needs the `audit` grant
    /// online; reads the file with `--data-dir DIR` alone).
    Query {
        #[command(flatten)]
        filter: AuditFilterArgs,
        /// Most records to print.
        #[arg(long)]
        limit: Option<u64>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: client::ConnectArgs,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Every record, as JSON lines.
    Export {
        /// Output format.
        #[arg(long, value_parser = ["jsonl"], default_value = "jsonl")]
        format: String,
        #[command(flatten)]
        connect: client::ConnectArgs,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Print the head of the trail (`SEQ:MAC`) for anchoring elsewhere.
    Head {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        secret: SecretArgs,
    },
}

#[derive(Debug, clap::Args)]
pub(super) struct AuditFilterArgs {
    /// Records involving this token.
    #[arg(long)]
    token: Option<String>,
    /// Records of this caller.
    #[arg(long)]
    caller: Option<String>,
    /// Records of this action (`tokenize`, `detokenize`,
    /// `detokenize_masked`, `delete`, `audit_query`, `handshake`, ...).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(Event::ALL.iter().map(|e| e.as_str())))]
    action: Option<String>,
    /// Records on this collection.
    #[arg(long)]
    collection: Option<String>,
    /// Records with this outcome (`OK`, `PERMISSION_DENIED`,
    /// `UNAUTHENTICATED`, `REFUSED`, ...).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(Outcome::ALL.iter().map(|o| o.as_str())))]
    outcome: Option<String>,
    /// Records at or after this time (RFC 3339, e.g. 2026-11-29T00:00:00Z).
    #[arg(long, value_parser = parse_time)]
    since: Option<i64>,
    /// Records before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    until: Option<i64>,
    /// Records of this audit chain only (a node's `[store] node`, on a
    /// store that several nodes share). Without it, every chain, this
    /// node's first.
    #[arg(long)]
    chain: Option<String>,
}

/// RFC 3339 to unix microseconds.
pub(super) fn parse_time(text: &str) -> Result<i64, String> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| format!("{text:?} is not an RFC 3339 time such as 2026-11-29T14:00:00Z"))?;
    i64::try_from(t.unix_timestamp_nanos() / 1000).map_err(|_| "time out of range".to_owned())
}

/// `piivault audit query` and `export`: from a server as an auditor, or
/// from a data directory offline.
pub(super) async fn audit_read(
    mut filter: crate::store::AuditFilter,
    token: Option<String>,
    limit: Option<u64>,
    json: bool,
    connect: &client::ConnectArgs,
    secret: SecretArgs,
) -> Result<(), CliError> {
    let print = |chain: &str, seq: u64, record: crate::audit::AuditRecord, mac: &[u8]| {
        if json {
            let mut line = record.to_json(seq, mac);
            line["chain"] = chain.into();
            say(&line.to_string());
        } else {
            say(&format!(
                "{chain:<8} {seq:>8} {} {:<12} {:<18} {:<10} items={:<4} {:<18} {}",
                crate::pki::format_time(record.at_micros / 1_000_000),
                if record.caller.is_empty() { "-" } else { &record.caller },
                record.action,
                if record.collection.is_empty() { "-" } else { &record.collection },
                record.items,
                record.outcome,
                record.tokens.join(","),
            ));
        }
    };
    if let Some(dir) = connect.offline_dir() {
        let vault = open_offline(dir, secret, Unseal::ReadOnly).await?;
        let limit = limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
        if let Some(token) = &token {
            let located =
                vault.locate_issued(token).await.map_err(|e| CliError { failure: Failure::Other, error: e.into() })?;
            filter.record = located.map_or(crate::store::RecordMatch::Unissued, |(_, at)| at);
        }
        let failed = |e: crate::error::VaultError| CliError { failure: Failure::Other, error: e.into() };
        let chains = match &filter.chain {
            Some(chain) => vec![chain.clone()],
            None => vault.audit_chains().await.map_err(failed)?,
        };
        let mut left = limit;
        for chain in chains {
            let records = vault
                .query_audit(crate::store::AuditFilter { chain: Some(chain.clone()), ..filter.clone() }, left)
                .await
                .map_err(failed)?;
            left = left.saturating_sub(records.len());
            for (seq, record, mac) in records {
                print(&chain, seq, record, &mac);
            }
        }
        return Ok(());
    }
    let channel = client::channel(connect).await?;
    let request = crate::grpc::proto::AuditQueryRequest {
        token: token.unwrap_or_default(),
        caller: filter.caller.unwrap_or_default(),
        action: filter.action.unwrap_or_default(),
        collection: filter.collection.unwrap_or_default(),
        outcome: filter.outcome.unwrap_or_default(),
        since_micros: filter.since.unwrap_or(0),
        until_micros: filter.until.unwrap_or(0),
        limit: limit.unwrap_or(0),
        chain: filter.chain.unwrap_or_default(),
    };
    let mut stream = crate::grpc::proto::audit_client::AuditClient::new(channel)
        .query(request)
        .await
        .map_err(|s| client::status_error(&s))?
        .into_inner();
    while let Some(event) = stream.message().await.map_err(|s| client::status_error(&s))? {
        let mac = hex::decode(&event.mac).unwrap_or_default();
        let record = crate::audit::AuditRecord {
            at_micros: event.at_micros,
            caller: event.caller,
            action: event.action,
            collection: event.collection,
            items: event.items,
            tokens: event.tokens,
            outcome: event.outcome,
            error_code: event.error_code,
            request_id: event.request_id,
            peer: event.peer,
        };
        print(&event.chain, event.seq, record, &mac);
    }
    Ok(())
}

/// `piivault audit …`.
pub(super) async fn audit(command: AuditCommand) -> Result<(), CliError> {
    let (data_dir, secret, expect, verify) = match command {
        AuditCommand::Verify { data_dir, expect_head, secret } => (data_dir, secret, Some(expect_head), true),
        AuditCommand::Head { data_dir, secret } => (data_dir, secret, None, false),
        AuditCommand::Query { filter, limit, json, connect, secret } => {
            let token = filter.token;
            let filter = crate::store::AuditFilter {
                record: crate::store::RecordMatch::Any,
                caller: filter.caller,
                action: filter.action,
                collection: filter.collection,
                outcome: filter.outcome,
                since: filter.since,
                until: filter.until,
                after_seq: 0,
                chain: filter.chain,
            };
            return audit_read(filter, token, limit, json, &connect, secret).await;
        }
        AuditCommand::Export { format: _, connect, secret } => {
            return audit_read(crate::store::AuditFilter::default(), None, None, true, &connect, secret).await;
        }
    };
    let expected = match expect.flatten() {
        Some(text) => {
            let parsed =
                text.split_once(':').and_then(|(seq, mac)| Some((seq.parse::<u64>().ok()?, mac.to_ascii_lowercase())));
            Some(parsed.ok_or_else(|| CliError {
                failure: Failure::Usage,
                error: anyhow!("--expect-head takes SEQ:MAC, as printed by `piivault audit head`"),
            })?)
        }
        None => None,
    };
    let vault = open_offline(&data_dir, secret, Unseal::ReadOnly).await?;
    // Every chain (one per node on a shared store): this node's is the
    // head printed, anchored and checked against --expect-head.
    let verified =
        vault.verify_every_chain().await.map_err(|e| CliError { failure: vault_failure(&e), error: e.into() })?;
    let mut heads = verified.map_err(|(chain, e)| CliError {
        failure: Failure::Other,
        error: anyhow!("audit trail broken: {e} (chain {chain})"),
    })?;
    let others = heads.split_off(1.min(heads.len()));
    let head = heads.pop().map_or(crate::audit::Head::GENESIS, |(_, head)| head);
    let mac = hex::encode(head.mac);
    if let Some((seq, expected_mac)) = expected {
        if head.seq < seq {
            return Err(anyhow!("audit trail truncated: it ends at record {} but record {seq} was anchored", head.seq))
                .or_fail(Failure::Other);
        }
        // The chain verified, so the stored MAC of the anchored record is
        // the chain's own.
        let anchored = vault.audit_mac(seq).await.map_err(|e| CliError { failure: Failure::Other, error: e.into() })?;
        if anchored.as_deref() != Some(expected_mac.as_str()) {
            return Err(anyhow!("audit trail diverges from the anchored head at record {seq}")).or_fail(Failure::Other);
        }
    }
    if verify {
        say(&format!("ok: {} records, head {}:{mac}", head.seq, head.seq));
        for (chain, other) in others {
            say(&format!("ok: chain {chain}: {} records, head {}:{}", other.seq, other.seq, hex::encode(other.mac)));
        }
    } else {
        say(&format!("{}:{mac}", head.seq));
    }
    Ok(())
}
