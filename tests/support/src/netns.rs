//! Network-namespace fixtures for datapath tests: "nodes", "pods" and "external hosts" are netns joined by veth.
//!
//! Every test that needs root starts with [`privileged`]: without root/netns it prints `SKIP <test>: ...` and the
//! test returns early, unless `CAUSEWAY_PRIVILEGED_TESTS=1` is set (CI), in which case it panics so that the test
//! fails instead of silently passing.
//!
//! ```no_run
//! use causeway_testsupport::netns::{self, Netns};
//!
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! if !netns::privileged("two_nodes_ping") {
//!     return Ok(());
//! }
//! let a = Netns::new("node")?; // unique: "node-<pid>-<n>", deleted on drop
//! let b = Netns::new("node")?;
//! netns::veth(&a, "eth0", "192.168.77.1/24", &b, "eth0", "192.168.77.2/24")?;
//! a.sysctl("net.ipv4.ip_forward", "1")?;
//! a.exec(&["ip", "route", "add", "10.244.2.0/24", "via", "192.168.77.2"])?;
//! netns::ping(&a, "192.168.77.2")?;
//!
//! // Run Rust code (open a TUN, attach BPF, bind a socket) inside the netns. Threads spawned from inside the
//! // closure inherit the netns.
//! let port = a.run_in(|| std::net::TcpListener::bind("0.0.0.0:0").and_then(|l| l.local_addr()))??.port();
//! # let _ = port;
//!
//! // A background process in the netns, killed when the guard (or the netns) is dropped.
//! let _server = b.spawn(&["iperf3", "-s", "-1"])?;
//! # Ok(())
//! # }
//! ```
//!
//! Names: netns names are unique per process ([`unique_name`]); interface names inside a netns only have to be
//! unique within it, but anything global (e.g. WireGuard's `/var/run/wireguard/<ifname>.sock`) should use
//! [`unique_ifname`], which stays within the kernel's 15-character limit.

use std::fmt;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};

/// Set to `1` (as CI does) to make privileged tests fail instead of skipping when they cannot run.
pub const PRIVILEGED_ENV: &str = "CAUSEWAY_PRIVILEGED_TESTS";

/// Whether this test can use network namespaces (root, `ip netns add` works).
///
/// - yes → `true`;
/// - no, and `CAUSEWAY_PRIVILEGED_TESTS=1` → panics with the reason (the test fails);
/// - no → prints `SKIP <test_name>: needs root/netns (<reason>)` and returns `false`; the test should return.
pub fn privileged(test_name: &str) -> bool {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    let probe = PROBE.get_or_init(probe_netns);
    match probe {
        Ok(()) => true,
        Err(why) => {
            if std::env::var(PRIVILEGED_ENV).as_deref() == Ok("1") {
                panic!("{test_name} needs root and network namespaces, and {PRIVILEGED_ENV}=1 forbids skipping: {why}");
            }
            println!("SKIP {test_name}: needs root/netns ({why})");
            false
        }
    }
}

fn probe_netns() -> Result<(), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("not running as root".to_owned());
    }
    // Creating (and deleting) a namespace is the real capability check: containers may be root without it.
    let ns = Netns::new("probe").map_err(|e| e.to_string())?;
    drop(ns);
    Ok(())
}

/// A failed command or namespace operation, with what was run and what it printed.
#[derive(Debug)]
pub struct NetnsError(String);

impl fmt::Display for NetnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NetnsError {}

impl NetnsError {
    fn new(msg: impl Into<String>) -> Self {
        NetnsError(msg.into())
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `<prefix>-<pid>-<n>`: unique among all processes on the machine while this one lives.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// An interface name unique on the machine, at most 15 characters: `<prefix><pid hex><n hex>`, with the prefix cut
/// so that the whole fits. Use it for names that are global (WireGuard UAPI sockets live in `/var/run/wireguard`
/// for every netns).
pub fn unique_ifname(prefix: &str) -> String {
    let suffix = format!("{:x}x{:x}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
    let keep = 15usize.saturating_sub(suffix.len()).min(prefix.len());
    let mut name = format!("{}{suffix}", &prefix[..keep]);
    name.truncate(15);
    name
}

/// A named network namespace (`ip netns add`), deleted on drop together with every process still running in it.
pub struct Netns {
    name: String,
}

impl fmt::Debug for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netns").field("name", &self.name).finish()
    }
}

impl Netns {
    /// Creates `<prefix>-<pid>-<n>` with its loopback up.
    pub fn new(prefix: &str) -> Result<Netns, NetnsError> {
        let name = unique_name(prefix);
        run_checked(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (for `ip netns exec <name>` / `ip -n <name>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, the bind mount that keeps the namespace alive.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `argv` inside the namespace and waits; a non-zero exit is an error carrying stdout and stderr.
    pub fn exec(&self, argv: &[&str]) -> Result<Output, NetnsError> {
        run_checked(&mut self.command(argv)?)
    }

    /// Runs `argv` inside the namespace and returns its output whatever the exit status.
    pub fn exec_unchecked(&self, argv: &[&str]) -> Result<Output, NetnsError> {
        let mut cmd = self.command(argv)?;
        cmd.output().map_err(|e| NetnsError::new(format!("cannot run {}: {e}", describe(&cmd))))
    }

    /// `sh -c <script>` inside the namespace (checked).
    pub fn sh(&self, script: &str) -> Result<Output, NetnsError> {
        self.exec(&["sh", "-c", script])
    }

    /// `ip <args>` inside the namespace (checked); `args` is split on whitespace.
    pub fn ip(&self, args: &str) -> Result<Output, NetnsError> {
        let mut argv = vec!["ip"];
        argv.extend(args.split_whitespace());
        self.exec(&argv)
    }

    /// A `Command` that runs `argv` inside the namespace (via `ip netns exec`).
    pub fn command(&self, argv: &[&str]) -> Result<Command, NetnsError> {
        if argv.is_empty() {
            return Err(NetnsError::new("empty command"));
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv);
        Ok(cmd)
    }

    /// Starts `argv` in the background inside the namespace (stdout/stderr captured). The process is killed when
    /// the guard is dropped, and in any case when the namespace is.
    pub fn spawn(&self, argv: &[&str]) -> Result<NsChild, NetnsError> {
        let mut cmd = self.command(argv)?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = cmd.spawn().map_err(|e| NetnsError::new(format!("cannot start {}: {e}", describe(&cmd))))?;
        Ok(NsChild { child: Some(child), what: describe(&cmd) })
    }

    /// Writes a sysctl inside the namespace, e.g. `sysctl("net.ipv4.ip_forward", "1")`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), NetnsError> {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")]).map(drop)
    }

    /// Turns on IPv4 forwarding and turns off reverse-path filtering (all/default), what a router "node" needs.
    pub fn router(&self) -> Result<(), NetnsError> {
        self.sysctl("net.ipv4.ip_forward", "1")?;
        self.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        self.sysctl("net.ipv4.conf.default.rp_filter", "0")
    }

    /// Runs `f` on a dedicated thread that has joined this namespace (`setns(CLONE_NEWNET)`), and waits for it.
    /// Sockets, TUN devices and BPF attachments created there belong to the namespace, and threads spawned from
    /// inside `f` inherit it. A panic in `f` is propagated.
    pub fn run_in<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T, NetnsError> {
        let file = self.open()?;
        thread::scope(|s| {
            let handle = s.spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::new(format!("setns: {e}")))?;
                Ok(f())
            });
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Like [`Netns::run_in`] but does not wait: `f` runs on a new thread inside the namespace. `join()` the
    /// handle to get its result (a panic in `f` shows as `Err` from `join`).
    pub fn enter<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
        &self,
        f: F,
    ) -> Result<thread::JoinHandle<T>, NetnsError> {
        let file = self.open()?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(), NetnsError>>(1);
        let handle = thread::Builder::new()
            .name(format!("ns-{}", self.name))
            .spawn(move || {
                if let Err(e) = setns(&file, CloneFlags::CLONE_NEWNET) {
                    let _ = tx.send(Err(NetnsError::new(format!("setns: {e}"))));
                    // The caller gets the error from the channel and never sees this thread's result.
                    panic!("setns failed");
                }
                let _ = tx.send(Ok(()));
                f()
            })
            .map_err(|e| NetnsError::new(format!("spawn thread: {e}")))?;
        match rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(NetnsError::new("netns thread exited before joining the namespace")),
        }
    }

    fn open(&self) -> Result<File, NetnsError> {
        File::open(self.path()).map_err(|e| NetnsError::new(format!("open {}: {e}", self.path().display())))
    }

    /// Process ids of everything running in the namespace (`ip netns pids`).
    pub fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let me = std::process::id() as i32;
        for pid in self.pids() {
            // Never our own process (a thread of ours may sit in the netns but the process does not belong to it).
            if pid != me {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).stderr(Stdio::null()).status();
    }
}

/// A background process started with [`Netns::spawn`]; killed (SIGKILL) and reaped on drop.
pub struct NsChild {
    child: Option<Child>,
    what: String,
}

impl fmt::Debug for NsChild {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NsChild").field("what", &self.what).field("pid", &self.child.as_ref().map(Child::id)).finish()
    }
}

impl NsChild {
    /// The `std` child (e.g. to `try_wait`).
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("NsChild holds its child until dropped")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child().try_wait(), Ok(None))
    }

    /// Waits for the process to exit on its own and returns its output; an error if it failed.
    pub fn wait(mut self) -> Result<Output, NetnsError> {
        let child = self.child.take().expect("NsChild holds its child until dropped");
        let out = child.wait_with_output().map_err(|e| NetnsError::new(format!("wait for {}: {e}", self.what)))?;
        check(&self.what, out)
    }

    /// Kills the process and returns what it printed.
    pub fn kill(mut self) -> Output {
        let mut child = self.child.take().expect("NsChild holds its child until dropped");
        let _ = child.kill();
        child.wait_with_output().unwrap_or_else(|_| Output {
            status: std::process::ExitStatus::default(),
            stdout: Vec::new(),
            stderr: Vec::new(),
        })
    }
}

impl Drop for NsChild {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A veth pair `a_if` (in `a`, address `a_addr`, CIDR notation) ↔ `b_if` (in `b`, `b_addr`), both up.
/// An empty address leaves that end without one.
pub fn veth(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) -> Result<(), NetnsError> {
    // Created directly in the target namespaces, so the names only have to be unique inside them.
    run_checked(
        Command::new("ip")
            .args(["link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns", &b.name]),
    )?;
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        if !addr.is_empty() {
            ns.exec(&["ip", "addr", "add", addr, "dev", ifname])?;
        }
        ns.exec(&["ip", "link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// Pings `addr` from `from` until one echo comes back (up to 20 tries, 1 s each); the first packets may be lost
/// while a tunnel handshakes or neighbours resolve.
pub fn ping(from: &Netns, addr: &str) -> Result<(), NetnsError> {
    let mut last = None;
    for _ in 0..20 {
        match from.exec(&["ping", "-n", "-c", "1", "-W", "1", addr]) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| NetnsError::new("ping never ran")))
}

/// Waits until `cond` holds, polling every 20 ms, up to `timeout`; returns whether it held.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

fn run_checked(cmd: &mut Command) -> Result<Output, NetnsError> {
    let what = describe(cmd);
    let out = cmd.output().map_err(|e| NetnsError::new(format!("cannot run {what}: {e}")))?;
    check(&what, out)
}

fn check(what: &str, out: Output) -> Result<Output, NetnsError> {
    if out.status.success() {
        Ok(out)
    } else {
        Err(NetnsError::new(format!(
            "`{what}` failed ({}): stderr: {} stdout: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        )))
    }
}

/// Two "nodes" joined by an underlay veth, each with a "pod" behind it, the shape of the datapath tests:
///
/// ```text
/// pod_a 10.244.1.2 ─ pod0 10.244.1.1 [node_a] eth0 192.168.50.1 ══ 192.168.50.2 eth0 [node_b] pod0 10.244.2.1 ─ 10.244.2.2 pod_b
/// ```
///
/// Nodes forward (ip_forward=1, rp_filter off); each pod has a default route via its node. Nothing routes
/// 10.244.2.0/24 on node_a (or 10.244.1.0/24 on node_b) yet: that is the tunnel's job.
#[derive(Debug)]
pub struct TwoNodes {
    pub node_a: Netns,
    pub node_b: Netns,
    pub pod_a: Netns,
    pub pod_b: Netns,
}

impl TwoNodes {
    /// Node A's underlay address.
    pub const NODE_A_IP: &'static str = "192.168.50.1";
    pub const NODE_B_IP: &'static str = "192.168.50.2";
    pub const POD_A_CIDR: &'static str = "10.244.1.0/24";
    pub const POD_B_CIDR: &'static str = "10.244.2.0/24";
    pub const POD_A_IP: &'static str = "10.244.1.2";
    pub const POD_B_IP: &'static str = "10.244.2.2";
    /// The nodes' addresses on their pod networks (the pods' gateways).
    pub const ROUTER_A_IP: &'static str = "10.244.1.1";
    pub const ROUTER_B_IP: &'static str = "10.244.2.1";
    /// The underlay interface's name in both nodes.
    pub const UNDERLAY_IF: &'static str = "eth0";

    pub fn new() -> Result<TwoNodes, NetnsError> {
        let t = TwoNodes {
            node_a: Netns::new("nodea")?,
            node_b: Netns::new("nodeb")?,
            pod_a: Netns::new("poda")?,
            pod_b: Netns::new("podb")?,
        };
        veth(&t.node_a, "eth0", "192.168.50.1/24", &t.node_b, "eth0", "192.168.50.2/24")?;
        for (node, pod, router, pod_ip) in
            [(&t.node_a, &t.pod_a, "10.244.1.1", "10.244.1.2"), (&t.node_b, &t.pod_b, "10.244.2.1", "10.244.2.2")]
        {
            node.router()?;
            veth(node, "pod0", &format!("{router}/24"), pod, "eth0", &format!("{pod_ip}/24"))?;
            pod.exec(&["ip", "route", "add", "default", "via", router])?;
        }
        Ok(t)
    }
}

/// Debian's `wireguard-go` (configured with `wg`) on an interface inside a netns: the independent WireGuard
/// implementation the interop tests and the benchmark baseline use. Killed, and its socket removed, on drop.
#[derive(Debug)]
pub struct WireguardGo {
    ifname: String,
    ns_name: String,
    process: Option<NsChild>,
    public_key: String,
}

impl WireguardGo {
    /// Starts `wireguard-go -f <ifname>` in `ns`, gives it a key made by `wg genkey`, listens on `port`, sets MTU
    /// 1420 and brings the link up. `ifname` must be unique on the machine (see [`unique_ifname`]).
    pub fn start(ns: &Netns, ifname: &str, port: u16) -> Result<WireguardGo, NetnsError> {
        let process = ns.spawn(&["wireguard-go", "-f", ifname])?;
        let mut wg = WireguardGo {
            ifname: ifname.to_owned(),
            ns_name: ns.name().to_owned(),
            process: Some(process),
            public_key: String::new(),
        };
        let sock = PathBuf::from("/var/run/wireguard").join(format!("{ifname}.sock"));
        if !wait_for(Duration::from_secs(10), || std::os::unix::net::UnixStream::connect(&sock).is_ok()) {
            return Err(NetnsError::new(format!("wireguard-go did not open {} within 10 s", sock.display())));
        }
        let private = run_checked(Command::new("wg").arg("genkey"))?;
        let private = String::from_utf8_lossy(&private.stdout).trim().to_owned();
        let keyfile = tempfile::NamedTempFile::new().map_err(|e| NetnsError::new(format!("temp key file: {e}")))?;
        std::fs::write(keyfile.path(), format!("{private}\n")).map_err(|e| NetnsError::new(format!("{e}")))?;
        let path = keyfile.path().to_string_lossy().into_owned();
        ns.exec(&["wg", "set", ifname, "private-key", &path, "listen-port", &port.to_string()])?;
        let public = ns.exec(&["wg", "show", ifname, "public-key"])?;
        wg.public_key = String::from_utf8_lossy(&public.stdout).trim().to_owned();
        ns.exec(&["ip", "link", "set", "dev", ifname, "mtu", "1420", "up"])?;
        Ok(wg)
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Its public key, base64 as `wg` prints it.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// `wg <args...>` on this interface's netns.
    pub fn wg(&self, args: &[&str]) -> Result<Output, NetnsError> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns_name, "wg"]).args(args);
        run_checked(&mut cmd)
    }

    /// Adds or updates a peer (`wg set <if> peer <key> endpoint <endpoint> allowed-ips <a,b>`).
    pub fn set_peer(&self, public_key: &str, endpoint: &str, allowed_ips: &[&str]) -> Result<(), NetnsError> {
        let ips = allowed_ips.join(",");
        self.wg(&["set", &self.ifname, "peer", public_key, "endpoint", endpoint, "allowed-ips", &ips]).map(drop)
    }

    pub fn remove_peer(&self, public_key: &str) -> Result<(), NetnsError> {
        self.wg(&["set", &self.ifname, "peer", public_key, "remove"]).map(drop)
    }

    /// `wg show <if> latest-handshakes` as (peer key, unix seconds; 0 = never).
    pub fn latest_handshakes(&self) -> Result<Vec<(String, u64)>, NetnsError> {
        let out = self.wg(&["show", &self.ifname, "latest-handshakes"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((it.next()?.to_owned(), it.next()?.parse().ok()?))
            })
            .collect())
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        drop(self.process.take());
        let _ = std::fs::remove_file(PathBuf::from("/var/run/wireguard").join(format!("{}.sock", self.ifname)));
    }
}

/// Named nftables counters on a device's ingress (table `netdev causeway_test`), to prove what crosses a wire:
/// `NftCounters::ingress(&ns, "eth0", &[("wg_udp", "udp dport 51820"), ("plain", "ip saddr 10.244.0.0/16")])`.
#[derive(Debug)]
pub struct NftCounters<'a> {
    ns: &'a Netns,
}

impl<'a> NftCounters<'a> {
    /// Installs one counter per `(name, match expression)`; the table is removed with the netns.
    pub fn ingress(ns: &'a Netns, device: &str, counters: &[(&str, &str)]) -> Result<Self, NetnsError> {
        let mut script = String::from("table netdev causeway_test {\n");
        for (name, _) in counters {
            script.push_str(&format!("  counter {name} {{}}\n"));
        }
        script.push_str(&format!(
            "  chain ingress {{\n    type filter hook ingress device \"{device}\" priority 0; policy accept;\n"
        ));
        for (name, expr) in counters {
            script.push_str(&format!("    {expr} counter name \"{name}\"\n"));
        }
        script.push_str("  }\n}\n");
        let file = tempfile::NamedTempFile::new().map_err(|e| NetnsError::new(format!("temp nft file: {e}")))?;
        std::fs::write(file.path(), script).map_err(|e| NetnsError::new(format!("{e}")))?;
        ns.exec(&["nft", "-f", &file.path().to_string_lossy()])?;
        Ok(NftCounters { ns })
    }

    /// (packets, bytes) of counter `name`.
    pub fn read(&self, name: &str) -> Result<(u64, u64), NetnsError> {
        let out = self.ns.exec(&["nft", "list", "counter", "netdev", "causeway_test", name])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |key: &str| -> Option<u64> {
            let mut words = text.split_whitespace();
            while let Some(w) = words.next() {
                if w == key {
                    return words.next()?.parse().ok();
                }
            }
            None
        };
        match (field("packets"), field("bytes")) {
            (Some(p), Some(b)) => Ok((p, b)),
            _ => Err(NetnsError::new(format!("no packets/bytes in nft output: {text}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_ifnames_fit_and_differ() {
        let a = unique_ifname("causeway-wg");
        let b = unique_ifname("causeway-wg");
        assert!(a.len() <= 15 && b.len() <= 15, "{a} {b}");
        assert_ne!(a, b);
    }

    #[test]
    fn two_netns_veth_ping() {
        if !privileged("two_netns_veth_ping") {
            return;
        }
        let a = Netns::new("tsa").expect("netns a");
        let b = Netns::new("tsb").expect("netns b");
        veth(&a, "va", "192.168.201.1/24", &b, "vb", "192.168.201.2/24").expect("veth");
        ping(&a, "192.168.201.2").expect("ping across the veth");

        // A thread inside `b` sees b's address, proving run_in really switched namespaces.
        let listener = b.run_in(|| std::net::TcpListener::bind("192.168.201.2:0")).expect("run_in").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let got = a.run_in(|| std::net::TcpStream::connect(("192.168.201.2", port)).map(|_| ())).expect("run_in");
        got.expect("connect from a to b's listener");
        // From the test's own namespace that address does not exist.
        assert!(std::net::TcpListener::bind("192.168.201.2:0").is_err());

        // Processes spawned in a netns die with it.
        let mut sleeper = b.spawn(&["sleep", "60"]).expect("spawn");
        assert!(sleeper.is_running());
        let path = b.path();
        drop(b);
        assert!(!path.exists(), "netns bind mount removed");
        assert!(wait_for(Duration::from_secs(5), || !sleeper.is_running()), "process in the netns was killed");
    }
}
