//! Child processes of the sandbox: started detached, with logs in files, tracked by PID so `down` from another
//! invocation can stop them.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::SandboxError;

/// A process the sandbox started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proc {
    pub name: String,
    pub pid: u32,
    pub log: PathBuf,
}

/// Starts `program args...` in its own process group (so a Ctrl-C in the terminal that ran `sandbox up` does not
/// reach it), stdout and stderr appended to `log`.
pub fn spawn(name: &str, program: &Path, args: &[String], log: &Path) -> Result<Proc, SandboxError> {
    use std::os::unix::process::CommandExt;
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| SandboxError::Io(format!("opening log {}", log.display()), e))?;
    let err = out.try_clone().map_err(|e| SandboxError::Io(format!("opening log {}", log.display()), e))?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .process_group(0)
        .spawn()
        .map_err(|e| SandboxError::Io(format!("starting {} ({})", name, program.display()), e))?;
    Ok(Proc { name: name.to_string(), pid: child.id(), log: log.to_path_buf() })
}

pub fn is_alive(pid: u32) -> bool {
    // Signal 0 checks existence, but an exited child that `sandbox up` has not reaped is a zombie and still
    // exists; /proc tells the two apart.
    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain spaces or parentheses.
        Ok(stat) => {
            !matches!(stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().chars().next()), Some(Some('Z' | 'X')))
        }
        Err(_) => false,
    }
}

/// SIGTERM, then SIGKILL after `grace`.
pub fn stop(pid: u32, grace: Duration) {
    use nix::sys::signal::{kill, Signal};
    let p = nix::unistd::Pid::from_raw(pid as i32);
    if kill(p, Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !is_alive(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = kill(p, Signal::SIGKILL);
}

/// A free loopback port. The port is released before use, so another process could take it in between; the
/// sandbox reports a clear error from the child's log if that happens.
pub fn free_port() -> Result<u16, SandboxError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| SandboxError::Io("finding a free port".into(), e))?;
    l.local_addr().map(|a| a.port()).map_err(|e| SandboxError::Io("finding a free port".into(), e))
}

/// Waits until something accepts TCP connections on `addr`, or the process died, or the deadline passed.
pub fn wait_for_port(proc_: &Proc, addr: SocketAddr, timeout: Duration) -> Result<(), SandboxError> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if !is_alive(proc_.pid) || Instant::now() > deadline {
            return Err(SandboxError::NotStarted {
                name: proc_.name.clone(),
                log: proc_.log.clone(),
                tail: tail(&proc_.log),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Last lines of a log, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
