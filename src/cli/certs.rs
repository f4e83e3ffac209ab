//! `piivault certs`: the vault's own PKI.

use std::path::{Path, PathBuf};

use clap::Subcommand;

use super::{Classify as _, CliError, Failure, report, say};
use crate::config::{CONFIG_FILE, Config};
use crate::pki::{self, Ca};
use crate::policy::CallerId;

#[derive(Debug, Subcommand)]
pub(super) enum CertsCommand {
    /// Create the vault CA if missing and (re)issue the server certificate.
    Init {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// DNS names or IP addresses for the server certificate (repeat the
        /// flag); default: `server.server_names` from config.toml.
        #[arg(long = "server-name", value_name = "NAME")]
        server_names: Vec<String>,
    },
    /// Issue a certificate for caller NAME: spiffe://<trust-domain>/NAME.
    Issue {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The caller's name.
        #[arg(long, value_name = "NAME")]
        name: String,
        /// Days of validity.
        #[arg(long, default_value_t = 90)]
        days: u32,
        /// Where to write cert.pem and key.pem (default DIR/clients/NAME).
        #[arg(long, value_name = "OUT")]
        out: Option<PathBuf>,
    },
    /// Revoke certificates by caller name or serial; writes pki/crl.pem.
    /// Send SIGHUP to a running server to apply it.
    Revoke {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// A caller name (revokes all its certificates) or a serial number.
        #[arg(value_name = "NAME_OR_SERIAL")]
        selector: String,
    },
    /// Re-sign pki/crl.pem now (valid 30 days). Every other certs command
    /// re-signs it when its nextUpdate is within a week; a server refuses a
    /// CRL past its nextUpdate.
    Crl {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
    },
    /// List issued certificates.
    List {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// The vault CA of `data_dir`, its CRL re-signed first if it is due.
fn loaded(data_dir: &Path) -> Result<Ca, CliError> {
    let ca = Ca::load(data_dir).or_fail(Failure::Config)?;
    if let Some(next) = ca.refresh_crl(false).or_fail(Failure::Other)? {
        report(&format!(
            "pki/crl.pem was due (its nextUpdate within a week or passed): re-signed, valid until {}",
            pki::format_time(next)
        ));
    }
    Ok(ca)
}

pub(super) fn certs(command: CertsCommand) -> Result<(), CliError> {
    let load_config = |dir: &Path| Config::load(&dir.join(CONFIG_FILE)).or_fail(Failure::Config);
    match command {
        CertsCommand::Init { data_dir, server_names } => {
            let config = load_config(&data_dir)?;
            let names = if server_names.is_empty() { config.server.server_names.clone() } else { server_names };
            Ca::init(&data_dir, &config.server.trust_domain, &names).or_fail(Failure::Other)?;
            say(&format!("vault CA ready; server certificate issued for {}", names.join(", ")));
        }
        CertsCommand::Issue { data_dir, name, days, out } => {
            let config = load_config(&data_dir)?;
            let caller: CallerId = name.parse().or_fail(Failure::Usage)?;
            let ca = loaded(&data_dir)?;
            let out = out.unwrap_or_else(|| data_dir.join("clients").join(caller.as_str()));
            let issued = ca.issue(&caller, &config.server.trust_domain, days, &out).map_err(|e| CliError {
                failure: if matches!(e, pki::PkiError::Invalid(_)) { Failure::Usage } else { Failure::Other },
                error: e.into(),
            })?;
            say(&format!(
                "issued {} for {} (serial {}, valid until {}) in {}",
                out.join("cert.pem").display(),
                caller.spiffe_id(&config.server.trust_domain),
                issued.serial,
                pki::format_time(issued.not_after),
                out.display()
            ));
        }
        CertsCommand::Revoke { data_dir, selector } => {
            let ca = Ca::load(&data_dir).or_fail(Failure::Config)?;
            let revoked = ca.revoke(&selector).map_err(|e| CliError {
                failure: if matches!(e, pki::PkiError::NotFound(_)) { Failure::Usage } else { Failure::Other },
                error: e.into(),
            })?;
            for cert in revoked {
                say(&format!("revoked {} (serial {})", cert.name, cert.serial));
            }
            say("pki/crl.pem updated; send SIGHUP to a running server to apply it");
        }
        CertsCommand::Crl { data_dir } => {
            let ca = Ca::load(&data_dir).or_fail(Failure::Config)?;
            let next = ca.refresh_crl(true).or_fail(Failure::Other)?.unwrap_or_default();
            say(&format!(
                "pki/crl.pem re-signed, valid until {}; a running server reloads it within seconds",
                pki::format_time(next)
            ));
        }
        CertsCommand::List { data_dir, json } => {
            let ca = loaded(&data_dir)?;
            let list = ca.list().or_fail(Failure::Other)?;
            if json {
                say(&serde_json::to_string_pretty(&list).or_fail(Failure::Other)?);
            } else {
                say(&format!("{:<24} {:<32} {:<20} {}", "NAME", "SERIAL", "NOT AFTER", "STATUS"));
                for cert in list {
                    let status = cert
                        .revoked_at
                        .map_or_else(|| "valid".to_owned(), |t| format!("revoked {}", pki::format_time(t)));
                    say(&format!(
                        "{:<24} {:<32} {:<20} {status}",
                        cert.name,
                        cert.serial,
                        pki::format_time(cert.not_after)
                    ));
                }
            }
        }
    }
    Ok(())
}
