//! The remotes directory: one file per remote cluster, in the format Cilium's clustermesh uses.
//!
//! The file name is the remote cluster's name; the content is YAML:
//!
//! ```yaml
//! endpoints:
//! - https://east.mesh.example:2379
//! trusted-ca-file: /var/lib/causeway/remotes/east.ca.crt   # relative paths resolve against the directory
//! cert-file: east.crt
//! key-file: east.key
//! tls-server-name: clustermesh-apiserver   # optional (a Causeway addition): verify etcd's certificate against
//!                                          # this name instead of the endpoint's host
//! ```
//!
//! `tls-server-name` exists because peers and hosts often dial a NodePort or load-balancer address that the server
//! certificate was never issued for; every certificate Causeway issues carries the name `clustermesh-apiserver`.
//!
//! The directory is usually a mounted Secret, which kubelet updates by swapping a `..data` symlink. So files are
//! read through symlinks, dotfiles (`..data`, `..2024_01_01...`) and TLS material (`*.crt`, `*.key`, `*.pem`) are
//! skipped as remote names, and a change is detected by content (config file plus the TLS files it names), never
//! by modification time. Parsing and diffing are pure; [`watch_dir`] adds the I/O.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use causeway_store::ClusterName;
use serde::Deserialize;
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Why one remote's config file cannot be used. Only that remote is affected.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    #[error("remote config file {path} is not named after a valid cluster: {why}")]
    Name { path: String, why: String },
    #[error("cannot read remote config file {path}: {why}")]
    Read { path: String, why: String },
    #[error("remote config file {path} is not valid YAML with `endpoints`, `trusted-ca-file`, `cert-file` and `key-file`: {why}")]
    Yaml { path: String, why: String },
    #[error("remote config file {path} lists no endpoints: add at least one `https://host:port` under `endpoints`")]
    NoEndpoints { path: String },
    #[error("remote config file {path} has endpoint {endpoint:?}, which is not an http:// or https:// URL")]
    BadEndpoint { path: String, endpoint: String },
    #[error("remote config file {path} sets {given} but not {missing}: mTLS needs trusted-ca-file, cert-file and key-file together")]
    PartialTls { path: String, given: &'static str, missing: &'static str },
    #[error("remote config file {path} uses https endpoints but sets no trusted-ca-file/cert-file/key-file")]
    HttpsWithoutTls { path: String },
    #[error("remote config file {path} has tls-server-name {name:?}: {why}")]
    ServerName { path: String, name: String, why: &'static str },
    #[error("cannot read {what} {file} named by remote config file {path}: {why}")]
    TlsFile { path: String, what: &'static str, file: String, why: String },
}

/// The YAML shape, with Cilium's key names.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    endpoints: Vec<String>,
    #[serde(rename = "trusted-ca-file", default)]
    trusted_ca_file: Option<String>,
    #[serde(rename = "cert-file", default)]
    cert_file: Option<String>,
    #[serde(rename = "key-file", default)]
    key_file: Option<String>,
    #[serde(rename = "tls-server-name", default)]
    tls_server_name: Option<String>,
}

/// PEM material for mTLS, read at scan time so that a rotated certificate is a config change.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// Name the server certificate is verified against (`tls-server-name`), when not the endpoint's host.
    pub server_name: Option<String>,
}

impl TlsMaterial {
    /// The kvstore TLS settings this material stands for (with `tls-server-name` when set). Err names the file
    /// whose content is not UTF-8 PEM.
    pub fn to_kvstore(&self) -> Result<causeway_kvstore::TlsConfig, &'static str> {
        let pem = |what: &'static str, b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| what);
        let mut t = causeway_kvstore::TlsConfig::from_pem(
            pem("trusted-ca-file", &self.ca_pem)?,
            pem("cert-file", &self.cert_pem)?,
            pem("key-file", &self.key_pem)?,
        );
        if let Some(name) = &self.server_name {
            t = t.with_server_name(name.clone());
        }
        Ok(t)
    }
}

impl std::fmt::Debug for TlsMaterial {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// One usable remote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteConfig {
    pub name: ClusterName,
    pub path: PathBuf,
    pub endpoints: Vec<String>,
    /// None for plain `http://` endpoints (tests, or a remote behind a TLS-terminating proxy).
    pub tls: Option<TlsMaterial>,
}

/// The result of reading one file: usable, or an error that belongs to that remote's status.
pub type Loaded = Result<RemoteConfig, ConfigError>;

/// Whether a directory entry names a remote. Skips dotfiles (including Secret volumes' `..data` links) and TLS
/// material that often sits in the same Secret.
pub fn is_remote_file_name(name: &str) -> bool {
    !(name.is_empty()
        || name.starts_with('.')
        || name.ends_with(".crt")
        || name.ends_with(".key")
        || name.ends_with(".pem")
        || name.ends_with('~'))
}

/// Parses one config file's content. `read` reads referenced TLS files (a closure so tests need no disk).
pub fn parse_remote(
    file_name: &str,
    path: &Path,
    dir: &Path,
    content: &[u8],
    mut read: impl FnMut(&Path) -> std::io::Result<Vec<u8>>,
) -> Loaded {
    let p = path.display().to_string();
    let name = ClusterName::new(file_name).map_err(|e| ConfigError::Name { path: p.clone(), why: e.to_string() })?;
    let raw: RawConfig = if content.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ConfigError::NoEndpoints { path: p });
    } else {
        serde_yaml::from_slice(content).map_err(|e| ConfigError::Yaml { path: p.clone(), why: e.to_string() })?
    };
    let endpoints: Vec<String> = raw.endpoints.iter().map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
    if endpoints.is_empty() {
        return Err(ConfigError::NoEndpoints { path: p });
    }
    for e in &endpoints {
        if !(e.starts_with("https://") || e.starts_with("http://")) || e.len() <= "https://".len() {
            return Err(ConfigError::BadEndpoint { path: p, endpoint: e.clone() });
        }
    }
    let resolve = |f: &str| {
        let f = Path::new(f);
        if f.is_absolute() {
            f.to_path_buf()
        } else {
            dir.join(f)
        }
    };
    let fields =
        [("trusted-ca-file", &raw.trusted_ca_file), ("cert-file", &raw.cert_file), ("key-file", &raw.key_file)];
    let server_name = match raw.tls_server_name.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(n) if n.len() > 253 || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') => {
            return Err(ConfigError::ServerName {
                path: p,
                name: n.chars().take(64).collect(),
                why: "not a DNS name (letters, digits, '-' and '.')",
            });
        }
        Some(n) => Some(n.to_ascii_lowercase()),
    };
    let tls = match fields.iter().find(|(_, v)| v.is_some()) {
        None => {
            if endpoints.iter().any(|e| e.starts_with("https://")) {
                return Err(ConfigError::HttpsWithoutTls { path: p });
            }
            if let Some(name) = server_name {
                return Err(ConfigError::ServerName { path: p, name, why: "set without TLS (trusted-ca-file, ...)" });
            }
            None
        }
        Some((given, _)) => {
            if let Some((missing, _)) = fields.iter().find(|(_, v)| v.is_none()) {
                return Err(ConfigError::PartialTls { path: p, given, missing });
            }
            let (Some(ca), Some(cert), Some(key)) = (&raw.trusted_ca_file, &raw.cert_file, &raw.key_file) else {
                return Err(ConfigError::PartialTls { path: p, given, missing: "key-file" });
            };
            let (ca_file, cert_file, key_file) = (resolve(ca), resolve(cert), resolve(key));
            let mut load = |what: &'static str, f: &Path| {
                read(f).map_err(|e| ConfigError::TlsFile {
                    path: p.clone(),
                    what,
                    file: f.display().to_string(),
                    why: e.to_string(),
                })
            };
            let ca_pem = load("trusted-ca-file", &ca_file)?;
            let cert_pem = load("cert-file", &cert_file)?;
            let key_pem = load("key-file", &key_file)?;
            Some(TlsMaterial { ca_file, cert_file, key_file, ca_pem, cert_pem, key_pem, server_name })
        }
    };
    Ok(RemoteConfig { name, path: path.to_path_buf(), endpoints, tls })
}

/// Reads every remote file in `dir`. A missing directory reads as empty (no remotes yet), so a Secret mounted
/// later, or removed, is handled like any other change. Other directory errors are returned.
pub fn scan_dir(dir: &Path) -> std::io::Result<BTreeMap<String, Loaded>> {
    let mut out = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let Some(file_name) = entry.file_name().to_str().map(str::to_string) else {
            warn!(path = %entry.path().display(), "skipping remote config file whose name is not UTF-8");
            continue;
        };
        if !is_remote_file_name(&file_name) {
            continue;
        }
        let path = entry.path();
        // Follows symlinks: Secret volume files are links into `..data/`.
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => {}
            Err(e) => {
                // A dangling link mid-swap reads as an error now and is retried on the next scan.
                let err = ConfigError::Read { path: path.display().to_string(), why: e.to_string() };
                out.insert(file_name, Err(err));
                continue;
            }
        }
        let loaded = match std::fs::read(&path) {
            Ok(content) => parse_remote(&file_name, &path, dir, &content, |f| std::fs::read(f)),
            Err(e) => Err(ConfigError::Read { path: path.display().to_string(), why: e.to_string() }),
        };
        out.insert(file_name, loaded);
    }
    Ok(out)
}

/// What changed between two scans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Start a connection.
    Added(RemoteConfig),
    /// Reconnect with the new config (endpoints or TLS material changed).
    Changed(RemoteConfig),
    /// The file is gone: stop the connection and drain the remote's entries.
    Removed(String),
    /// The file exists but cannot be used. A remote that was running keeps its last good config (a bad edit must
    /// not drop live backends); the error goes into its status until the file is fixed or removed.
    Invalid { name: String, error: ConfigError },
    /// The file became valid again with the config that is already running: clear the error only.
    Fixed(String),
}

/// Diffs the running set against a new scan. `running` holds the last good config of each remote the caller runs
/// (so an invalid file keeps the old one); `errors` the remotes currently reported invalid. Both are updated.
pub fn diff(
    running: &mut BTreeMap<String, RemoteConfig>,
    errors: &mut BTreeMap<String, ConfigError>,
    scan: BTreeMap<String, Loaded>,
) -> Vec<Change> {
    let mut changes = Vec::new();
    let gone: std::collections::BTreeSet<String> =
        running.keys().chain(errors.keys()).filter(|n| !scan.contains_key(*n)).cloned().collect();
    for name in gone {
        // Also reported for a remote that was only ever invalid, so that its status entry goes away.
        errors.remove(&name);
        running.remove(&name);
        changes.push(Change::Removed(name));
    }
    for (name, loaded) in scan {
        match loaded {
            Ok(cfg) => {
                let was_invalid = errors.remove(&name).is_some();
                match running.get(&name) {
                    None => {
                        running.insert(name, cfg.clone());
                        changes.push(Change::Added(cfg));
                    }
                    Some(old) if *old != cfg => {
                        running.insert(name, cfg.clone());
                        changes.push(Change::Changed(cfg));
                    }
                    Some(_) if was_invalid => changes.push(Change::Fixed(name)),
                    Some(_) => {}
                }
            }
            Err(error) => {
                if errors.get(&name) != Some(&error) {
                    errors.insert(name.clone(), error.clone());
                    changes.push(Change::Invalid { name, error });
                }
            }
        }
    }
    changes
}

/// Watches `dir` and sends batches of changes until the receiver is dropped. The first batch (possibly empty)
/// comes from the first scan. Uses inotify (via notify) for prompt
/// reaction and rescans every `rescan` anyway: Secret volume updates are symlink swaps that some backends report
/// late or not at all, and a rescan is cheap.
pub async fn watch_dir(dir: PathBuf, rescan: Duration, tx: mpsc::Sender<Vec<Change>>) {
    let (wake_tx, mut wake_rx) = mpsc::channel::<()>(1);
    // The watcher lives as long as this future; dropping the future stops it.
    let _watcher = {
        let wake_tx = wake_tx.clone();
        let handler = move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
                let _ = wake_tx.try_send(());
            }
        };
        match notify::recommended_watcher(handler) {
            Ok(mut w) => {
                use notify::Watcher as _;
                match w.watch(&dir, notify::RecursiveMode::NonRecursive) {
                    Ok(()) => Some(w),
                    Err(e) => {
                        warn!(dir = %dir.display(), error = %e, "cannot watch the remotes directory; relying on periodic rescans");
                        None
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot start a file watcher; relying on periodic rescans");
                None
            }
        }
    };
    let mut running = BTreeMap::new();
    let mut errors = BTreeMap::new();
    let mut first = true;
    let mut ticker = tokio::time::interval(rescan);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            Some(()) = wake_rx.recv() => {
                // Coalesce the burst of events a symlink swap produces.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while wake_rx.try_recv().is_ok() {}
            }
            _ = tx.closed() => return,
        }
        let scan = match tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || scan_dir(&dir)
        })
        .await
        {
            Ok(Ok(scan)) => scan,
            Ok(Err(e)) => {
                warn!(dir = %dir.display(), error = %e, "cannot read the remotes directory; keeping the current remotes");
                continue;
            }
            Err(e) => {
                warn!(error = %e, "remotes directory scan task failed");
                continue;
            }
        };
        let changes = diff(&mut running, &mut errors, scan);
        // The first batch is sent even when empty: it tells the caller the directory has been read.
        if changes.is_empty() && !std::mem::take(&mut first) {
            continue;
        }
        first = false;
        for c in &changes {
            match c {
                Change::Added(cfg) => info!(remote = %cfg.name, endpoints = ?cfg.endpoints, "remote added"),
                Change::Changed(cfg) => info!(remote = %cfg.name, endpoints = ?cfg.endpoints, "remote config changed"),
                Change::Removed(name) => info!(remote = %name, "remote removed"),
                Change::Invalid { name, error } => warn!(remote = %name, error = %error, "remote config is invalid"),
                Change::Fixed(name) => debug!(remote = %name, "remote config is valid again"),
            }
        }
        if tx.send(changes).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_files(_: &Path) -> std::io::Result<Vec<u8>> {
        Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"))
    }

    fn files(p: &Path) -> std::io::Result<Vec<u8>> {
        Ok(format!("PEM of {}", p.display()).into_bytes())
    }

    fn parse(name: &str, content: &str, read: fn(&Path) -> std::io::Result<Vec<u8>>) -> Loaded {
        let dir = Path::new("/etc/remotes");
        parse_remote(name, &dir.join(name), dir, content.as_bytes(), read)
    }

    #[test]
    fn cilium_format_with_relative_and_absolute_tls_paths() {
        let cfg = parse(
            "east",
            "endpoints:\n- https://east.example:2379\ntrusted-ca-file: /abs/ca.crt\ncert-file: east.crt\nkey-file: east.key\n",
            files,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.name.as_str(), "east");
        assert_eq!(cfg.endpoints, vec!["https://east.example:2379"]);
        let tls = cfg.tls.unwrap_or_else(|| panic!("no tls"));
        assert_eq!(tls.ca_file, Path::new("/abs/ca.crt"));
        assert_eq!(tls.cert_file, Path::new("/etc/remotes/east.crt"));
        assert_eq!(tls.key_pem, b"PEM of /etc/remotes/east.key");
        assert_eq!(tls.server_name, None);
    }

    #[test]
    fn tls_server_name_is_optional_and_must_be_a_dns_name() {
        let base = "endpoints:\n- https://192.0.2.7:32379\ntrusted-ca-file: ca\ncert-file: c\nkey-file: k\n";
        let cfg = parse("east", &format!("{base}tls-server-name: Clustermesh-Apiserver\n"), files)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.tls.and_then(|t| t.server_name).as_deref(), Some("clustermesh-apiserver"));
        let err = parse("east", &format!("{base}tls-server-name: \"a b/c\"\n"), files).err();
        assert!(matches!(err, Some(ConfigError::ServerName { .. })), "{err:?}");
        let err = parse("east", "endpoints: [http://a:1]\ntls-server-name: x", files).err();
        assert!(matches!(err, Some(ConfigError::ServerName { .. })), "{err:?}");
    }

    #[test]
    fn plaintext_endpoints_need_no_tls() {
        let cfg = parse("west", "endpoints: [\"http://127.0.0.1:2379\"]", no_files).unwrap_or_else(|e| panic!("{e}"));
        assert!(cfg.tls.is_none());
    }

    #[test]
    fn errors_name_the_problem() {
        type Check = fn(&ConfigError) -> bool;
        let cases: [(&str, &str, Check); 8] = [
            ("East", "endpoints: [http://a:1]", |e| matches!(e, ConfigError::Name { .. })),
            ("east", "endpoints: [", |e| matches!(e, ConfigError::Yaml { .. })),
            ("east", "endpoint: [http://a:1]", |e| matches!(e, ConfigError::Yaml { .. })),
            ("east", "", |e| matches!(e, ConfigError::NoEndpoints { .. })),
            ("east", "endpoints: []", |e| matches!(e, ConfigError::NoEndpoints { .. })),
            ("east", "endpoints: [east:2379]", |e| matches!(e, ConfigError::BadEndpoint { .. })),
            ("east", "endpoints: [https://a:1]\ncert-file: c", |e| {
                matches!(e, ConfigError::PartialTls { missing: "trusted-ca-file", .. })
            }),
            ("east", "endpoints: [https://a:1]", |e| matches!(e, ConfigError::HttpsWithoutTls { .. })),
        ];
        for (name, content, check) in cases {
            let err = parse(name, content, files).err().unwrap_or_else(|| panic!("{content:?} parsed"));
            assert!(check(&err), "{content:?}: {err}");
            assert!(err.to_string().contains("/etc/remotes/"), "error does not name the file: {err}");
        }
        let err = parse("east", "endpoints: [https://a:1]\ntrusted-ca-file: ca\ncert-file: c\nkey-file: k", no_files)
            .err()
            .unwrap_or_else(|| panic!("parsed without TLS files"));
        assert!(matches!(err, ConfigError::TlsFile { what: "trusted-ca-file", .. }), "{err}");
    }

    #[test]
    fn file_name_filter() {
        for skip in ["..data", "..2024_01_01_00_00_00.123", ".hidden", "ca.crt", "east.key", "bundle.pem", "east~"] {
            assert!(!is_remote_file_name(skip), "{skip}");
        }
        for keep in ["east", "west-2"] {
            assert!(is_remote_file_name(keep), "{keep}");
        }
    }

    fn cfg(name: &str, endpoint: &str) -> Loaded {
        parse(name, &format!("endpoints: [{endpoint}]"), no_files)
    }

    #[test]
    fn diff_add_change_remove_and_invalid() {
        let mut running = BTreeMap::new();
        let mut errors = BTreeMap::new();
        let scan =
            BTreeMap::from([("east".into(), cfg("east", "http://a:1")), ("west".into(), cfg("west", "http://b:1"))]);
        let changes = diff(&mut running, &mut errors, scan.clone());
        assert_eq!(changes.len(), 2);
        assert!(changes.iter().all(|c| matches!(c, Change::Added(_))));
        // Same scan again: nothing.
        assert!(diff(&mut running, &mut errors, scan).is_empty());

        // east changes endpoint, west becomes invalid, north appears invalid.
        let scan = BTreeMap::from([
            ("east".into(), cfg("east", "http://a:2")),
            ("west".into(), cfg("west", "nonsense")),
            ("north".into(), cfg("north", "")),
        ]);
        let changes = diff(&mut running, &mut errors, scan.clone());
        assert!(
            matches!(&changes[..], [Change::Changed(c), Change::Invalid { .. }, Change::Invalid { .. }] if c.name.as_str() == "east"),
            "{changes:?}"
        );
        // west keeps its last good config.
        assert_eq!(running.get("west").map(|c| c.endpoints.clone()), Some(vec!["http://b:1".to_string()]));
        // The same errors again are not repeated.
        assert!(diff(&mut running, &mut errors, scan).is_empty());

        // west fixed back to its running config; north removed; east removed.
        let scan = BTreeMap::from([("west".into(), cfg("west", "http://b:1"))]);
        let changes = diff(&mut running, &mut errors, scan);
        assert!(changes.contains(&Change::Removed("east".into())), "{changes:?}");
        assert!(changes.contains(&Change::Removed("north".into())), "{changes:?}");
        assert!(changes.contains(&Change::Fixed("west".into())), "{changes:?}");
        assert_eq!(running.keys().collect::<Vec<_>>(), vec!["west"]);
        assert!(errors.is_empty());
    }

    #[test]
    fn scan_follows_secret_volume_symlinks() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let d = dir.path();
        let v1 = d.join("..2026_01_01");
        std::fs::create_dir(&v1).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(v1.join("east"), "endpoints: [http://a:1]").unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(v1.join("ca.crt"), "x").unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink("..2026_01_01", d.join("..data")).unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink("..data/east", d.join("east")).unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink("..data/ca.crt", d.join("ca.crt")).unwrap_or_else(|e| panic!("{e}"));
        let scan = scan_dir(d).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(scan.keys().collect::<Vec<_>>(), vec!["east"]);
        assert!(scan["east"].is_ok());
        // Missing directory reads as empty.
        assert!(scan_dir(&d.join("absent")).unwrap_or_else(|e| panic!("{e}")).is_empty());
    }

    #[tokio::test]
    async fn watch_reports_added_and_removed() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (tx, mut rx) = mpsc::channel(8);
        let task = tokio::spawn(watch_dir(dir.path().to_path_buf(), Duration::from_millis(200), tx));
        std::fs::write(dir.path().join("east"), "endpoints: [http://a:1]").unwrap_or_else(|e| panic!("{e}"));
        let deadline = Duration::from_secs(10);
        let got = tokio::time::timeout(deadline, async {
            loop {
                let batch = rx.recv().await.unwrap_or_default();
                if batch.iter().any(|c| matches!(c, Change::Added(c) if c.name.as_str() == "east")) {
                    return;
                }
            }
        })
        .await;
        assert!(got.is_ok(), "no Added for east");
        std::fs::remove_file(dir.path().join("east")).unwrap_or_else(|e| panic!("{e}"));
        let got = tokio::time::timeout(deadline, async {
            loop {
                let batch = rx.recv().await.unwrap_or_default();
                if batch.contains(&Change::Removed("east".into())) {
                    return;
                }
            }
        })
        .await;
        assert!(got.is_ok(), "no Removed for east");
        task.abort();
    }
}
