//! The node's WireGuard private key on disk (`<state dir>/wireguard.key`, base64 like `wg genkey` writes it).
//!
//! One function shared by the agent (which configures the interface with it) and `causeway-node-agent register`
//! (which sends its public key to the clustermesh-apiserver before the agent ever runs): both must end up with the
//! same key, whichever runs first, so a missing file is created atomically and a concurrent creator's key wins.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::keys::{KeyError, PrivateKey};

/// The file name under the state directory.
pub const KEY_FILE: &str = "wireguard.key";

/// Why the key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("WireGuard key in {path}: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> KeyFileError + 'a {
    move |source| KeyFileError::Io { op, path: path.to_owned(), source }
}

/// Loads the key from `path`, or generates one and stores it there (mode 0600). Creation never exposes a partial
/// file: the key is written to a private temporary file beside it and hard-linked into place, which fails if
/// another process got there first, whose key is then read and used.
pub fn load_or_create(path: &Path) -> Result<PrivateKey, KeyFileError> {
    if let Some(key) = read(path)? {
        return Ok(key);
    }
    let key = PrivateKey::generate();
    // Unique per process and call (threads of one process may race too).
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = path.with_file_name(format!(
        ".{}.{}.{}.tmp",
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| KEY_FILE.to_owned()),
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("creating", &tmp))?;
        f.write_all(format!("{}\n", key.to_base64()).as_bytes()).map_err(io_err("writing", &tmp))?;
        f.sync_all().map_err(io_err("syncing", &tmp))?;
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io_err("linking", path)(e)),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    if written? {
        return Ok(key);
    }
    // Someone else created it between our read and our link: theirs is the key.
    read(path)?.ok_or_else(|| KeyFileError::Io {
        op: "reading",
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::NotFound, "vanished right after another process created it"),
    })
}

fn read(path: &Path) -> Result<Option<PrivateKey>, KeyFileError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            text.trim().parse().map(Some).map_err(|source| KeyFileError::Invalid { path: path.to_owned(), source })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("reading", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("cw-keyfile-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn creates_a_private_file_once_and_reads_it_back() {
        let d = dir();
        let path = d.join(KEY_FILE);
        let first = load_or_create(&path).expect("create");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create(&path).expect("load"), first, "the second call reads the same key");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.trim(), first.to_base64(), "wg's format");
        let leftovers: Vec<_> = std::fs::read_dir(&d).expect("ls").filter_map(|e| e.ok()).collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left: {leftovers:?}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn concurrent_creators_agree_on_one_key() {
        let d = dir();
        let path = d.join(KEY_FILE);
        let keys: Vec<PrivateKey> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8).map(|_| s.spawn(|| load_or_create(&path).expect("key"))).collect();
            hs.into_iter().map(|h| h.join().expect("thread")).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]), "every caller got the stored key");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_replaced() {
        let d = dir();
        let path = d.join(KEY_FILE);
        std::fs::write(&path, "garbage").expect("write");
        let err = load_or_create(&path).unwrap_err();
        assert!(matches!(err, KeyFileError::Invalid { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "garbage", "never overwritten");
        std::fs::remove_dir_all(&d).ok();
    }
}
