//! The data directory: private directories and files.
//!
//! Directories are created 0700 and files 0600, written completely and
//! fsynced before they count as created. This module never writes a secret
//! in clear: what it is handed is already sealed or not secret.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

/// Where a running `piivault dev` writes the address it listens on, so that
/// the command-line client given only `--data-dir` finds it. Removed when
/// the dev vault stops.
pub const DEV_ADDRESS_FILE: &str = "dev-address";

/// The address a running dev vault in `dir` recorded, if any.
pub fn dev_address(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(DEV_ADDRESS_FILE)).ok()?;
    let addr = text.trim();
    addr.parse::<std::net::SocketAddr>().ok().map(|_| addr.to_owned())
}

/// Creates `dir` (and missing parents) with mode 0700, or tightens an
/// existing directory to 0700.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        std::fs::set_permissions(dir, Permissions::from_mode(0o700))
    } else {
        DirBuilder::new().recursive(true).mode(0o700).create(dir)
    }
}

/// Writes a new file with mode 0600; refuses to replace an existing one.
/// The file and its directory are fsynced before returning.
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(contents)?;
    file.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Creates an empty file at `path` with mode 0600; refuses to replace an
/// existing one.
pub fn create_private_empty_file(path: &Path) -> std::io::Result<()> {
    OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map(drop)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn modes_are_private_and_existing_files_are_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        create_private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let file = dir.join("f");
        write_private_file(&file, b"one").unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        let again = write_private_file(&file, b"two").unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&file).unwrap(), b"one");

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    }
}
