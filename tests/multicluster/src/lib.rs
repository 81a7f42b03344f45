//! TEST HARNESS for Causeway's end-to-end tests: the real `clustermesh-apiserver` and `identity-sync` binaries,
//! one real etcd per cluster (plaintext or mTLS), and the in-memory kube API stand-in, wired the way the sandbox
//! (`cli/src/sandbox`) wires them. Never a runtime dependency.
//!
//! - [`Cluster`]: etcd + fake kube API (in-process) + clustermesh-apiserver + identity-sync, with helpers to create
//!   pods, global services and their EndpointSlices, to connect to peers (remote config files), and to read what a
//!   user would check: the EndpointSlices, identity-sync's `/status` and `/metrics`.
//! - [`FakeRemote`]: a bare etcd that a test fills by hand (hostile or broken remotes).
//! - [`Proxy`]: a loopback TCP proxy that can cut identity-sync off from a remote while that remote stays up.
//!
//! The binaries are taken from the cargo target directory this test binary runs from (`target/debug`), so they
//! must be built first: `cargo build --workspace --bins` (`scripts/test.sh` does). A missing binary is an error that
//! says so, never a skip. Every child process is SIGKILLed when its owner is dropped; when a test panics, the tails
//! of every component log are printed to help diagnose it.

mod cluster;
mod fake_remote;
mod process;
mod proxy;

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

pub use cluster::{start_mesh, Backends, Cluster, ClusterSpec, RemoteTls};
pub use fake_remote::FakeRemote;
pub use process::Proc;
pub use proxy::Proxy;

pub use causeway_testsupport::Etcd;

/// How long a test waits for something a user would expect to happen "soon".
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The directory holding the workspace's binaries: `CAUSEWAY_BIN_DIR`, or the cargo profile directory this test
/// binary was built into (`target/<profile>/deps/<test>` → `target/<profile>`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CAUSEWAY_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating the test binary")?;
    let mut dir = exe.parent().context("the test binary has no parent directory")?.to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Path of a workspace binary, or an error that says how to build it.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "binary {} not found: build the workspace binaries first (`cargo build --workspace --bins`, which \
             scripts/test.sh runs), or set CAUSEWAY_BIN_DIR",
            path.display()
        );
    }
    warn_if_stale(name, &path);
    Ok(path)
}

/// A binary older than its crate's sources means the test runs yesterday's code; say so (once per binary) rather
/// than fail, since the sources may be mid-edit.
fn warn_if_stale(name: &str, bin: &std::path::Path) {
    let crate_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(name).join("src");
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else { return };
    let mut stack = vec![crate_dir];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t > built) {
                eprintln!(
                    "warning: {} is older than {}; run `cargo build --workspace --bins` to test the current code",
                    bin.display(),
                    p.display()
                );
                return;
            }
        }
    }
}

/// Polls `check` every 100 ms until it returns `Ok(value)`, or fails after `timeout` with the last `Err`
/// description (what was observed instead), so a failed wait says what the state actually was.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(last) => {
                if start.elapsed() > timeout {
                    bail!("timed out after {timeout:?} waiting for {what}; last observed: {last}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Samples `check` every 100 ms for `period` and fails on the first sample that is an `Err`: "this stays true the
/// whole time" (nothing flaps).
pub async fn always<F, Fut>(what: &str, period: Duration, mut check: F) -> anyhow::Result<usize>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    let mut samples = 0;
    while start.elapsed() < period {
        if let Err(observed) = check().await {
            bail!("{what} stopped holding after {:?} ({samples} good samples before): {observed}", start.elapsed());
        }
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(samples)
}

/// Expected backends, e.g. `backends(&[("east", &["10.1.1.10"]), ("west", &["10.2.1.10"])])`.
pub fn backends(entries: &[(&str, &[&str])]) -> Backends {
    entries.iter().map(|(c, ips)| (c.to_string(), ips.iter().map(|s| s.to_string()).collect())).collect()
}
