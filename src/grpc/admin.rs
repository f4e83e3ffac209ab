//! The `piivault.v1.Admin` service: online key management. Needs the
//! global `admin` grant; every call is audited (by the vault, in the same
//! transaction as its effect, or at the edge when refused).

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::call::Call;
use super::proto::admin_server::Admin;
use super::proto::{self, ReencryptProgress};
use super::server::Live;
use super::{EdgeError, Failure};
use crate::audit::{Event, Outcome};
use crate::crypto::root::{Passphrase, Pkcs11Unlock, RawKey, Unlock};
use crate::policy::Action;
use crate::vault::Vault;

/// Records per re-encryption transaction unless the caller says otherwise.
const DEFAULT_REENCRYPT_BATCH: usize = 500;
/// The largest batch a caller may ask for.
const MAX_REENCRYPT_BATCH: usize = 10_000;

/// Serves `Admin` for one vault.
pub struct AdminService {
    vault: Vault,
    live: Arc<Live>,
}

impl AdminService {
    /// A service acting on `vault`, deciding access with `live`.
    pub fn new(vault: Vault, live: Arc<Live>) -> Self {
        Self { vault, live }
    }

    /// The proof of the current secret a root rotation carries: exactly one
    /// of the three.
    fn current_secret(&self, passphrase: &str, raw_hex: &str, pin: &str) -> Result<Unlock, Failure> {
        let wrong = || Failure::from(EdgeError::InvalidArgument(WRONG_CURRENT_SECRET.into()));
        match (passphrase.is_empty(), raw_hex.is_empty(), pin.is_empty()) {
            (false, true, true) => Passphrase::new(passphrase.to_owned()).map(Unlock::Passphrase).map_err(|_| wrong()),
            (true, false, true) => RawKey::parse(raw_hex.as_bytes()).map(Unlock::RawKey).map_err(|_| wrong()),
            (true, true, false) => {
                let hsm = self.vault.hsm().ok_or_else(wrong)?;
                let pin = crate::crypto::pkcs11::Pin::new(pin.to_owned()).map_err(|_| wrong())?;
                Ok(Unlock::Pkcs11(Pkcs11Unlock { hsm: Arc::new(hsm.with_pin(pin)), key_label: String::new() }))
            }
            _ => Err(wrong()),
        }
    }
}

/// Why a root rotation without a valid proof of the current secret fails.
const WRONG_CURRENT_SECRET: &str =
    "the current secret (current_passphrase, current_raw_key_hex or current_pkcs11_pin) does not open this vault";

type ProgressStream = Pin<Box<dyn Stream<Item = Result<ReencryptProgress, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<proto::BackupChunk, Status>> + Send>>;

/// Bytes per streamed backup chunk.
const BACKUP_CHUNK: usize = 1 << 20;

/// Streams the file at `path` in chunks, then removes it (also when the
/// caller goes away).
fn stream_file(path: std::path::PathBuf) -> ChunkStream {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt as _;
        let sent = async {
            let mut file = tokio::fs::File::open(&path).await?;
            loop {
                let mut data = vec![0u8; BACKUP_CHUNK];
                let n = file.read(&mut data).await?;
                if n == 0 {
                    return Ok::<_, std::io::Error>(());
                }
                data.truncate(n);
                if tx.send(Ok(proto::BackupChunk { data })).await.is_err() {
                    return Ok(()); // the caller went away
                }
            }
        }
        .await;
        if let Err(e) = sent {
            tracing::error!(error = %e, "cannot stream the backup");
            let _ = tx.send(Err(Status::unavailable("the backup cannot be read back"))).await;
        }
        if let Err(e) = tokio::fs::remove_file(&path).await {
            tracing::error!(error = %e, path = %path.display(), "cannot remove a streamed backup file");
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl Admin for AdminService {
    type ReencryptStream = ProgressStream;
    type BackupStream = ChunkStream;

    async fn backup(&self, request: Request<proto::BackupRequest>) -> Result<Response<ChunkStream>, Status> {
        let mut call = Call::start("Backup", Event::Backup, &request, "", 0);
        let result = async {
            call.admit(&self.live, &request, &[Action::Backup])?;
            let path = self.vault.backup(&call.who).await?;
            Ok::<_, Failure>(Response::new(stream_file(path)))
        }
        .await;
        call.finish(&self.vault, &self.live, result).await
    }

    async fn list_keys(
        &self,
        request: Request<proto::ListKeysRequest>,
    ) -> Result<Response<proto::ListKeysResponse>, Status> {
        let mut call = Call::start("ListKeys", Event::ListKeys, &request, &request.get_ref().collection, 0);
        let result = async {
            call.admit(&self.live, &request, &[Action::Admin])?;
            let asked = request.into_inner().collection;
            let names = if asked.is_empty() { self.vault.collection_names() } else { vec![asked] };
            let mut collections = Vec::new();
            for name in names {
                let versions = self
                    .vault
                    .list_keys(&call.who, &name)
                    .await?
                    .into_iter()
                    .map(|k| proto::KeyVersion {
                        version: k.version,
                        state: k.state.as_str().to_owned(),
                        created_at_micros: k.created_at,
                        records: k.records,
                        encryptions: k.encryptions,
                        purpose: k.purpose.as_str().to_owned(),
                    })
                    .collect();
                collections.push(proto::CollectionKeys { collection: name, versions });
            }
            Ok::<_, Failure>(Response::new(proto::ListKeysResponse { collections }))
        }
        .await;
        call.finish(&self.vault, &self.live, result).await
    }

    async fn rotate_data_key(
        &self,
        request: Request<proto::RotateDataKeyRequest>,
    ) -> Result<Response<proto::RotateDataKeyResponse>, Status> {
        let mut call = Call::start("RotateDataKey", Event::RotateDataKey, &request, &request.get_ref().collection, 0);
        let result = async {
            call.admit(&self.live, &request, &[Action::Admin])?;
            let proto::RotateDataKeyRequest { collection, compromised_version } = request.into_inner();
            let version = if compromised_version == 0 {
                self.vault.rotate_data_key(&call.who, &collection).await?
            } else {
                self.vault.rotate_compromised(&call.who, &collection, compromised_version).await?
            };
            Ok::<_, Failure>(Response::new(proto::RotateDataKeyResponse { version }))
        }
        .await;
        call.finish(&self.vault, &self.live, result).await
    }

    async fn rotate_index_key(
        &self,
        request: Request<proto::RotateIndexKeyRequest>,
    ) -> Result<Response<proto::RotateIndexKeyResponse>, Status> {
        let mut call = Call::start("RotateIndexKey", Event::RotateIndexKey, &request, &request.get_ref().collection, 0);
        let result = async {
            call.admit(&self.live, &request, &[Action::Admin])?;
            let collection = request.into_inner().collection;
            let version = self.vault.rotate_index_key(&call.who, &collection).await?;
            Ok::<_, Failure>(Response::new(proto::RotateIndexKeyResponse { version }))
        }
        .await;
        call.finish(&self.vault, &self.live, result).await
    }

    async fn reencrypt(&self, request: Request<proto::ReencryptRequest>) -> Result<Response<ProgressStream>, Status> {
        let mut call = Call::start("Reencrypt", Event::Reencrypt, &request, &request.get_ref().collection, 0);
        let result = async {
            call.admit(&self.live, &request, &[Action::Admin])?;
            let proto::ReencryptRequest { collection, batch_size } = request.into_inner();
            if !self.vault.has_collection(&collection) {
                return Err(Failure::Vault(crate::VaultError::UnknownCollection));
            }
            let batch = match usize::try_from(batch_size).unwrap_or(usize::MAX) {
                0 => DEFAULT_REENCRYPT_BATCH,
                n if n > MAX_REENCRYPT_BATCH => {
                    return Err(
                        EdgeError::InvalidArgument(format!("batch_size is at most {MAX_REENCRYPT_BATCH}")).into()
                    );
                }
                n => n,
            };
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let (vault, who) = (self.vault.clone(), call.who.clone());
            // Runs to the end even if the caller goes away: re-encryption is
            // meant to finish in the background.
            tokio::spawn(async move {
                let progress_tx = tx.clone();
                let mut report = move |p: &crate::vault::ReencryptProgress| {
                    let _ = progress_tx.send(Ok(ReencryptProgress {
                        moved: p.moved,
                        unreadable: p.unreadable,
                        remaining: 0,
                        done: false,
                    }));
                };
                let last = match vault.reencrypt(&who, &collection, batch, &mut report).await {
                    Ok(p) => Ok(ReencryptProgress {
                        moved: p.moved,
                        unreadable: p.unreadable,
                        remaining: p.remaining,
                        done: true,
                    }),
                    Err(e) => {
                        tracing::error!(error = %e, collection, "re-encryption stopped; run it again to resume");
                        Err(Status::from(Failure::Vault(e)))
                    }
                };
                let _ = tx.send(last);
            });
            let stream: ProgressStream = Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
            Ok(Response::new(stream))
        }
        .await;
        call.finish(&self.vault, &self.live, result).await
    }

    async fn retire_key_version(
        &self,
        request: Request<proto::RetireKeyVersionRequest>,
    ) -> Result<Response<proto::RetireKeyVersionResponse>, Status> {
        let mut call =
            Call::start("RetireKeyVersion", Event::RetireKeyVersion, &request, &request.get_ref().collection, 0);
        let result = async {
            call.admit(&self.live, &request, &[Action::Admin])?;
            let proto::RetireKeyVersionRequest { collection, version } = request.into_inner();
            self.vault.retire_key_version(&call.who, &collection, version).await?;
            Ok::<_, Failure>(Response::new(proto::RetireKeyVersionResponse {}))
        }
        .await;
        call.finish(&self.vault, &self.live, result).await
    }

    async fn rotate_root_key(
        &self,
        request: Request<proto::RotateRootKeyRequest>,
    ) -> Result<Response<proto::RotateRootKeyResponse>, Status> {
        let mut call = Call::start("RotateRootKey", Event::RotateRootKey, &request, "", 0);
        let result = async {
            call.admit(&self.live, &request, &[Action::RotateRoot])?;
            let proto::RotateRootKeyRequest {
                new_passphrase,
                new_raw_key_hex,
                new_pkcs11_key_label,
                current_passphrase,
                current_raw_key_hex,
                current_pkcs11_pin,
            } = request.into_inner();
            let current = (
                zeroize::Zeroizing::new(current_passphrase),
                zeroize::Zeroizing::new(current_raw_key_hex),
                zeroize::Zeroizing::new(current_pkcs11_pin),
            );
            let (passphrase, raw) = (zeroize::Zeroizing::new(new_passphrase), zeroize::Zeroizing::new(new_raw_key_hex));
            let invalid = |e: crate::crypto::CryptoError| EdgeError::InvalidArgument(e.to_string());
            let unlock = match (passphrase.is_empty(), raw.is_empty(), new_pkcs11_key_label.is_empty()) {
                (false, true, true) => Unlock::Passphrase(
                    Passphrase::new(passphrase.to_string()).and_then(Passphrase::strong).map_err(invalid)?,
                ),
                (true, false, true) => {
                    Unlock::RawKey(RawKey::parse(raw.as_bytes()).and_then(RawKey::strong).map_err(invalid)?)
                }
                (true, true, false) => Unlock::Pkcs11(Pkcs11Unlock {
                    hsm: self.vault.hsm().ok_or_else(|| {
                        EdgeError::Precondition("this server's config.toml has no [root_key.pkcs11] token".into())
                    })?,
                    key_label: new_pkcs11_key_label,
                }),
                _ => {
                    return Err(EdgeError::InvalidArgument(
                        "set exactly one of new_passphrase, new_raw_key_hex or new_pkcs11_key_label".into(),
                    )
                    .into());
                }
            };
            // Proof of the current secret, after the request itself is
            // checked: a stolen admin certificate alone cannot re-key.
            let proof = self.current_secret(&current.0, &current.1, &current.2)?;
            if !self.vault.opens_current_root(&proof)? {
                return Err(EdgeError::InvalidArgument(WRONG_CURRENT_SECRET.into()).into());
            }
            let keys = self.vault.rotate_root(&call.who, &unlock, crate::crypto::root::DEFAULT_KDF).await?;
            Ok::<_, Failure>(Response::new(proto::RotateRootKeyResponse {
                keys_rewrapped: u32::try_from(keys).unwrap_or(u32::MAX),
            }))
        }
        .await;
        call.finish(&self.vault, &self.live, result).await
    }

    async fn reload_policy(
        &self,
        request: Request<proto::ReloadPolicyRequest>,
    ) -> Result<Response<proto::ReloadPolicyResponse>, Status> {
        let mut call = Call::start("ReloadPolicy", Event::ReloadPolicy, &request, "", 0);
        let result = async {
            call.admit(&self.live, &request, &[Action::Admin])?;
            // On the record before anything changes (a failed reload adds
            // its own failure record).
            self.vault.record(call.who.record(Event::ReloadPolicy, "", 0, Outcome::Requested)).await?;
            self.live.reload().map_err(EdgeError::Precondition)?;
            Ok::<_, Failure>(Response::new(proto::ReloadPolicyResponse {}))
        }
        .await;
        call.finish(&self.vault, &self.live, result).await
    }
}
