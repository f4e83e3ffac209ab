//! `piivault keys` and `piivault backup`: key management and the online
//! backup, through the admin API or offline.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};
use clap::Subcommand;

use super::init::read_new_passphrase;
use super::serve::DEV_PASSPHRASE_FILE;
use super::{
    Classify as _, CliError, Failure, SecretArgs, Unseal, client, offline_secret, open_offline, say, secrets,
    vault_failure,
};
use crate::crypto::root::{self, RawKey, Unlock};
use crate::datadir;

#[derive(Debug, Subcommand)]
pub(super) enum KeysCommand {
    /// Key versions (data keys, then blind-index keys) with state, live
    /// records (index entries) and encryptions.
    List {
        /// Only this collection.
        #[arg(long)]
        collection: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: client::ConnectArgs,
    },
    /// A new primary data key for a collection; older versions keep
    /// decrypting.
    Rotate {
        /// The collection.
        #[arg(long)]
        collection: String,
        /// A version suspected leaked: marked compromised (never encrypts
        /// again), replaced by a new primary, and re-encryption starts.
        #[arg(long, value_name = "VERSION")]
        compromised: Option<u32>,
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: client::ConnectArgs,
    },
    /// A new primary blind-index key for a deterministic collection; the
    /// index is rebuilt under it in the background while lookups go on,
    /// then the older index keys are destroyed.
    RotateIndex {
        /// The collection.
        #[arg(long)]
        collection: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: client::ConnectArgs,
    },
    /// Move a collection's records onto the primary version, in batches,
    /// while traffic continues. Safe to interrupt and run again.
    Reencrypt {
        /// The collection.
        #[arg(long)]
        collection: String,
        /// Records per transaction.
        #[arg(long, default_value_t = 500)]
        batch: u32,
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: client::ConnectArgs,
    },
    /// Replace the root key: a new one sealed under a new passphrase (or raw
    /// key), every wrapped key re-wrapped at once; the old passphrase stops
    /// working. Online as an admin, or offline on a stopped vault with
    /// `--data-dir DIR` alone (the old passphrase from `PIIVAULT_PASSPHRASE`,
    /// `--passphrase-file` or the terminal).
    RotateRoot {
        /// Read the new passphrase from this file (else prompted twice).
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: Option<PathBuf>,
        /// Seal the new root key with a raw key (32 bytes or 64 hex digits)
        /// from this file. Then set `[root_key] provider = "raw"` with
        /// `key_file` or `key_env` in config.toml before the next start.
        #[arg(long, value_name = "FILE", conflicts_with = "new_passphrase_file")]
        new_raw_key_file: Option<PathBuf>,
        /// Seal the new root key in the PKCS#11 token of `[root_key.pkcs11]`
        /// (the server's, online) under the AES key with this label: used
        /// if the token holds it (sensitive, non-extractable), else created.
        #[arg(long, value_name = "LABEL", conflicts_with_all = ["new_passphrase_file", "new_raw_key_file"])]
        new_pkcs11_key_label: Option<String>,
        /// Online, for a vault sealed with a raw key: the current one, as
        /// proof (a passphrase-sealed vault's proof is the passphrase, from
        /// `PIIVAULT_PASSPHRASE`, `--passphrase-file` or a dev directory).
        #[arg(long, value_name = "FILE", conflicts_with = "current_pkcs11_pin_file")]
        current_raw_key_file: Option<PathBuf>,
        /// Online, for a vault sealed in a PKCS#11 token: a file holding the
        /// token's user PIN, as proof.
        #[arg(long, value_name = "FILE")]
        current_pkcs11_pin_file: Option<PathBuf>,
        #[command(flatten)]
        connect: client::ConnectArgs,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Destroy a version's wrapped key (refused while records use it).
    Retire {
        /// The collection.
        #[arg(long)]
        collection: String,
        /// The version to destroy (`--version` is the program's own version).
        #[arg(long, value_name = "N")]
        key_version: u32,
        #[command(flatten)]
        connect: client::ConnectArgs,
    },
}

/// What `keys rotate-root` seals the new root key with.
pub(super) enum NewRoot {
    /// A new passphrase, from this file or typed twice.
    Passphrase(Option<PathBuf>),
    /// A raw key from this file.
    RawKeyFile(PathBuf),
    /// The key of this label in the configured PKCS#11 token.
    Pkcs11(String),
}

/// What an online `keys rotate-root` proves the current secret with.
pub(super) enum CurrentSecret {
    /// The passphrase (`--passphrase-file`, `PIIVAULT_PASSPHRASE`, a dev
    /// directory's, or typed).
    Passphrase,
    /// The raw key in this file.
    RawKeyFile(PathBuf),
    /// The PKCS#11 user PIN in this file.
    PinFile(PathBuf),
}

/// `piivault keys rotate-root`: offline on a stopped vault's directory, or
/// online through the Admin service with proof of the current secret. The
/// new provider may differ from the old one (passphrase, raw key, PKCS#11),
/// in both directions.
pub(super) async fn rotate_root(
    target: NewRoot,
    proof: CurrentSecret,
    connect: &client::ConnectArgs,
    secret: SecretArgs,
) -> Result<(), CliError> {
    use crate::grpc::proto::{self, admin_client::AdminClient};
    let read_raw = |path: &Path| secrets::read_secret_file(path, "new raw key");
    let count = if let Some(dir) = connect.offline_dir() {
        let vault = open_offline(dir, secret, Unseal::Recorded).await?;
        let unlock = match &target {
            NewRoot::RawKeyFile(path) => {
                Unlock::RawKey(RawKey::parse(&read_raw(path)?).and_then(RawKey::strong).or_fail(Failure::Usage)?)
            }
            NewRoot::Passphrase(file) => {
                Unlock::Passphrase(read_new_passphrase(&SecretArgs { passphrase_file: file.clone() })?)
            }
            NewRoot::Pkcs11(label) => Unlock::Pkcs11(root::Pkcs11Unlock {
                hsm: vault
                    .hsm()
                    .ok_or_else(|| anyhow!("config.toml has no [root_key.pkcs11] table naming the token"))
                    .or_fail(Failure::Config)?,
                key_label: label.clone(),
            }),
        };
        let who = crate::vault::Requester::named("(offline rotate-root)");
        let count = vault
            .rotate_root(&who, &unlock, root::DEFAULT_KDF)
            .await
            .map_err(|e| CliError { failure: vault_failure(&e), error: e.into() })?;
        // A dev directory keeps its passphrase beside the vault:
        // keep it in step, or `piivault dev` could not start again.
        let dev_file = dir.join(DEV_PASSPHRASE_FILE);
        if let (Unlock::Passphrase(p), true) = (&unlock, dev_file.exists()) {
            std::fs::remove_file(&dev_file).or_fail(Failure::Other)?;
            datadir::write_private_file(&dev_file, p.expose_secret().as_bytes()).or_fail(Failure::Other)?;
        }
        count
    } else {
        let mut request = proto::RotateRootKeyRequest::default();
        match &target {
            NewRoot::RawKeyFile(path) => {
                request.new_raw_key_hex = String::from_utf8_lossy(read_raw(path)?.trim_ascii()).into_owned();
            }
            NewRoot::Passphrase(file) => read_new_passphrase(&SecretArgs { passphrase_file: file.clone() })?
                .expose_secret()
                .clone_into(&mut request.new_passphrase),
            NewRoot::Pkcs11(label) => request.new_pkcs11_key_label.clone_from(label),
        }
        match proof {
            CurrentSecret::RawKeyFile(path) => {
                let key = secrets::read_secret_file(&path, "current raw key")?;
                request.current_raw_key_hex = String::from_utf8_lossy(key.trim_ascii()).into_owned();
            }
            CurrentSecret::PinFile(path) => {
                let pin = secrets::read_secret_file(&path, "current PKCS#11 PIN")?;
                String::from_utf8_lossy(&pin)
                    .trim_end_matches(['\r', '\n'])
                    .clone_into(&mut request.current_pkcs11_pin);
            }
            CurrentSecret::Passphrase => {
                let secret = match &connect.data_dir {
                    Some(dir) => offline_secret(dir, secret),
                    None => secret,
                };
                secrets::read_passphrase(&secret, false)?.expose_secret().clone_into(&mut request.current_passphrase);
            }
        }
        let mut admin = AdminClient::new(client::channel(connect).await?);
        let count =
            admin.rotate_root_key(request).await.map_err(|s| client::status_error(&s))?.into_inner().keys_rewrapped;
        usize::try_from(count).unwrap_or(usize::MAX)
    };
    let sealed_by = match target {
        NewRoot::Passphrase(_) => "a passphrase".to_owned(),
        NewRoot::RawKeyFile(_) => "a raw key".to_owned(),
        NewRoot::Pkcs11(label) => format!("the PKCS#11 key {label:?}"),
    };
    say(&format!(
        "root key rotated: {count} keys re-wrapped, sealed by {sealed_by}; the old secret no longer opens this vault"
    ));
    Ok(())
}

/// Prints `keys list` output: a table, or JSON.
pub(super) fn print_keys(listed: &crate::grpc::proto::ListKeysResponse, json: bool) {
    if json {
        let value: Vec<serde_json::Value> = listed
            .collections
            .iter()
            .flat_map(|c| {
                c.versions.iter().map(|v| {
                    serde_json::json!({
                        "collection": c.collection, "purpose": v.purpose, "version": v.version, "state": v.state,
                        "created_at_micros": v.created_at_micros, "records": v.records, "encryptions": v.encryptions,
                    })
                })
            })
            .collect();
        say(&serde_json::Value::Array(value).to_string());
    } else {
        say(&format!(
            "{:<16} {:<7} {:>7} {:<12} {:<20} {:>10} {:>12}",
            "COLLECTION", "PURPOSE", "VERSION", "STATE", "CREATED", "RECORDS", "ENCRYPTIONS"
        ));
        for c in &listed.collections {
            for v in &c.versions {
                say(&format!(
                    "{:<16} {:<7} {:>7} {:<12} {:<20} {:>10} {:>12}",
                    c.collection,
                    v.purpose,
                    v.version,
                    v.state,
                    crate::pki::format_time(v.created_at_micros / 1_000_000),
                    v.records,
                    v.encryptions
                ));
            }
        }
    }
}

/// `piivault backup`: streams a backup from the server into `out`, then
/// checks the copy is a whole piivault store.
pub(super) async fn backup(out: &Path, connect: &client::ConnectArgs) -> Result<(), CliError> {
    use std::io::Write as _;
    let mut admin = crate::grpc::proto::admin_client::AdminClient::new(client::channel(connect).await?)
        .max_decoding_message_size(8 << 20);
    let mut stream =
        admin.backup(crate::grpc::proto::BackupRequest {}).await.map_err(|s| client::status_error(&s))?.into_inner();
    crate::datadir::create_private_empty_file(out)
        .with_context(|| format!("cannot create {}", out.display()))
        .or_fail(Failure::Usage)?;
    let written = async {
        let mut file = std::fs::OpenOptions::new().write(true).open(out).or_fail(Failure::Other)?;
        let mut bytes = 0u64;
        while let Some(chunk) = stream.message().await.map_err(|s| client::status_error(&s))? {
            file.write_all(&chunk.data).or_fail(Failure::Other)?;
            bytes += chunk.data.len() as u64;
        }
        file.sync_all().or_fail(Failure::Other)?;
        crate::store::check_backup(out).or_fail(Failure::Other)?;
        Ok::<_, CliError>(bytes)
    }
    .await;
    match written {
        Ok(bytes) => {
            say(&format!(
                "backup written to {}: {bytes} bytes, integrity ok; restoring it needs this vault's root.sealed and passphrase",
                out.display()
            ));
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(out);
            Err(e)
        }
    }
}

/// `piivault keys …`: the Admin service as a client.
pub(super) async fn keys(command: KeysCommand) -> Result<(), CliError> {
    use crate::grpc::proto::{self, admin_client::AdminClient};
    let failed = |s: tonic::Status| client::status_error(&s);
    match command {
        KeysCommand::List { collection, json, connect } => {
            let mut admin = AdminClient::new(client::channel(&connect).await?);
            let request = proto::ListKeysRequest { collection: collection.unwrap_or_default() };
            let listed = admin.list_keys(request).await.map_err(failed)?.into_inner();
            print_keys(&listed, json);
        }
        KeysCommand::Rotate { collection, compromised, json, connect } => {
            let mut admin = AdminClient::new(client::channel(&connect).await?);
            let request = proto::RotateDataKeyRequest {
                collection: collection.clone(),
                compromised_version: compromised.unwrap_or(0),
            };
            let version = admin.rotate_data_key(request).await.map_err(failed)?.into_inner().version;
            if json {
                say(&serde_json::json!({ "collection": collection, "version": version }).to_string());
            } else {
                say(&format!(
                    "{collection}: version {version} is now primary; run `piivault keys reencrypt --collection {collection}` to move older records onto it"
                ));
            }
        }
        KeysCommand::RotateIndex { collection, json, connect } => {
            let mut admin = AdminClient::new(client::channel(&connect).await?);
            let request = proto::RotateIndexKeyRequest { collection: collection.clone() };
            let version = admin.rotate_index_key(request).await.map_err(failed)?.into_inner().version;
            if json {
                say(&serde_json::json!({ "collection": collection, "index_version": version }).to_string());
            } else {
                say(&format!(
                    "{collection}: index key version {version} is now primary; the index is being rebuilt in the background"
                ));
            }
        }
        KeysCommand::Reencrypt { collection, batch, json, connect } => {
            let mut admin = AdminClient::new(client::channel(&connect).await?);
            let request = proto::ReencryptRequest { collection: collection.clone(), batch_size: batch };
            let mut stream = admin.reencrypt(request).await.map_err(failed)?.into_inner();
            while let Some(p) = stream.message().await.map_err(failed)? {
                if json {
                    say(&serde_json::json!({
                        "moved": p.moved, "unreadable": p.unreadable, "remaining": p.remaining, "done": p.done,
                    })
                    .to_string());
                } else if p.done {
                    say(&format!(
                        "{collection}: re-encryption done: {} moved, {} unreadable, {} still under older versions",
                        p.moved, p.unreadable, p.remaining
                    ));
                } else {
                    say(&format!("{collection}: {} moved", p.moved));
                }
            }
        }
        KeysCommand::RotateRoot {
            new_passphrase_file,
            new_raw_key_file,
            new_pkcs11_key_label,
            current_raw_key_file,
            current_pkcs11_pin_file,
            connect,
            secret,
        } => {
            let target = match (new_raw_key_file, new_pkcs11_key_label) {
                (Some(file), _) => NewRoot::RawKeyFile(file),
                (None, Some(label)) => NewRoot::Pkcs11(label),
                (None, None) => NewRoot::Passphrase(new_passphrase_file),
            };
            let proof = match (current_raw_key_file, current_pkcs11_pin_file) {
                (Some(file), _) => CurrentSecret::RawKeyFile(file),
                (None, Some(file)) => CurrentSecret::PinFile(file),
                (None, None) => CurrentSecret::Passphrase,
            };
            rotate_root(target, proof, &connect, secret).await?;
        }
        KeysCommand::Retire { collection, key_version: version, connect } => {
            let mut admin = AdminClient::new(client::channel(&connect).await?);
            admin
                .retire_key_version(proto::RetireKeyVersionRequest { collection: collection.clone(), version })
                .await
                .map_err(failed)?;
            say(&format!("{collection}: version {version} retired; its wrapped key is destroyed"));
        }
    }
    Ok(())
}
