//! Secrets passed in environment variables: taken out of the environment
//! at start, kept in zeroized memory, read from there.

use std::collections::HashMap;
use std::sync::OnceLock;

use zeroize::Zeroizing;

/// Secrets taken out of the environment at start (see [`take_from_env`]).
static TAKEN: OnceLock<HashMap<String, Zeroizing<String>>> = OnceLock::new();

/// Moves the variables `names` out of the process environment into memory
/// that is zeroized, so that nothing started later, nothing that reads the
/// environment later, and nobody reading `/proc/PID/environ` sees them: the
/// value's bytes are overwritten where the process received them, then the
/// variable is removed.
///
/// Must run before any thread exists: `main` calls it before it builds the
/// runtime, which is what makes the removal sound.
#[allow(unsafe_code)]
pub(crate) fn take_from_env(names: Vec<String>) {
    unsafe extern "C" {
        /// The C runtime's environment: a null-terminated array of
        /// `NAME=value` strings.
        static environ: *const *mut std::ffi::c_char;
    }
    let mut taken = HashMap::new();
    for name in names {
        if name.is_empty() || name.contains('=') || taken.contains_key(&name) {
            continue;
        }
        let Some(value) = std::env::var_os(&name) else { continue };
        if let Ok(value) = value.into_string() {
            taken.insert(name.clone(), Zeroizing::new(value));
        }
        let prefix = format!("{name}=");
        // SAFETY: called from `main` before the tokio runtime or any other
        // thread is started, so nothing reads or writes the environment
        // concurrently. `environ` is a null-terminated array of pointers to
        // NUL-terminated, writable strings; only bytes before each string's
        // terminator are written.
        unsafe {
            let mut entry = environ;
            while !entry.is_null() && !(*entry).is_null() {
                let bytes = std::ffi::CStr::from_ptr(*entry).to_bytes();
                if bytes.starts_with(prefix.as_bytes()) {
                    let value_len = bytes.len() - prefix.len();
                    std::ptr::write_bytes((*entry).add(prefix.len()), 0, value_len);
                }
                entry = entry.add(1);
            }
            std::env::remove_var(&name);
        }
    }
    let _ = TAKEN.set(taken);
}

/// Whether the variable `name` was set (and taken) at start, or is set.
pub(crate) fn env_has(name: &str) -> bool {
    TAKEN.get().is_some_and(|taken| taken.contains_key(name)) || std::env::var_os(name).is_some()
}

/// A variable taken at start, or (for library embedders and tests that
/// never went through `main`) the environment's.
pub(crate) fn env_secret(name: &str) -> Option<Zeroizing<String>> {
    if let Some(value) = TAKEN.get().and_then(|taken| taken.get(name)) {
        return Some(value.clone());
    }
    std::env::var(name).ok().map(Zeroizing::new)
}
