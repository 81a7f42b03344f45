//! The join script's real-host path (no CAUSEWAY_JOIN_ROOT): it writes /etc, /usr/local and /var/lib, drives
//! systemd and systemd-resolved, and checks DNS. Run for real inside a private mount namespace whose /etc,
//! /usr/local and /var/lib are overlays on a tmpfs (the host's files are never touched), with `systemctl` and the
//! node agent replaced by recorders on PATH / the agent path: what is checked is what the script asks of them.
//! The registration, tunnel and DNS themselves run for real in tests/external-workload.
//!
//! Needs root (mount namespaces): skipped with a message unless CAUSEWAY_PRIVILEGED_TESTS=1, which makes it fail.

mod common;

use std::path::Path;

use common::Clusters;
use serde_json::json;

/// Records every call in $CALLS; `is-active systemd-resolved` answers $RESOLVED_ACTIVE (0 or 3).
const FAKE_SYSTEMCTL: &str = r#"#!/bin/bash
echo "systemctl $*" >> "$CALLS"
if [ "$1" = is-active ]; then exit "${RESOLVED_ACTIVE:-3}"; fi
exit 0
"#;

/// Records every call in $CALLS; `register` writes the EnvironmentFile; `check-dns` exits $CHECK_DNS_EXIT.
const FAKE_AGENT: &str = r#"#!/bin/bash
echo "agent $*" >> "$CALLS"
case "$1" in
  register)
    while [ $# -gt 0 ]; do [ "$1" = --out ] && out="$2"; shift; done
    printf 'CAUSEWAY_WORKLOAD_IDENTITY=70001\nCAUSEWAY_MESH_IPV4=10.192.1.1\nCAUSEWAY_SERVICE_CIDRS=10.96.0.0/12\nCAUSEWAY_CLUSTER_DNS=10.96.0.10\nCAUSEWAY_CLUSTER_DOMAIN=cluster.local\nCAUSEWAY_HOME_CLUSTER=east\n' > "$out"
    ;;
  check-dns) exit "${CHECK_DNS_EXIT:-0}" ;;
esac
exit 0
"#;

/// Inside a new mount namespace: overlays, install, snapshot into $OUT/install, uninstall, snapshot into
/// $OUT/uninstall. The snapshots list the files of interest that exist and copy their content.
const DRIVER: &str = r#"set -euo pipefail
mount --make-rprivate /
mount -t tmpfs tmpfs "$SCRATCH"
for d in /etc /usr/local /var/lib; do
  mkdir -p "$SCRATCH/$d/upper" "$SCRATCH/$d/work"
  mount -t overlay overlay -o "lowerdir=$d,upperdir=$SCRATCH$d/upper,workdir=$SCRATCH$d/work" "$d"
done
printf 'nameserver 192.0.2.53\nsearch corp.example\noptions edns0\n' > /etc/resolv.conf
cp /etc/resolv.conf "$OUT/resolv.before"
snapshot() {
  mkdir -p "$OUT/$1"
  for f in /etc/causeway/node-agent.env /etc/causeway/workload.env /etc/systemd/system/causeway-node-agent.service \
           /etc/systemd/system/causeway-identity-sync.service /etc/systemd/resolved.conf.d/causeway.conf \
           /etc/resolv.conf /usr/local/bin/causeway-node-agent /etc/causeway/resolv.conf.orig /var/lib/causeway; do
    if [ -e "$f" ]; then echo "$f" >> "$OUT/$1/exists"; [ -f "$f" ] && cp "$f" "$OUT/$1/$(basename "$f")"; fi
  done
  touch "$OUT/$1/exists"
}
bash "$SCRIPT" > "$OUT/install.out" 2>&1
snapshot install
echo "---- uninstall" >> "$CALLS"
bash "$SCRIPT" uninstall > "$OUT/uninstall.out" 2>&1
snapshot uninstall
"#;

fn privileged(name: &str) -> bool {
    let uid = std::process::Command::new("id").arg("-u").output().map(|o| o.stdout).unwrap_or_default();
    if uid.trim_ascii() == b"0" {
        return true;
    }
    if std::env::var("CAUSEWAY_PRIVILEGED_TESTS").as_deref() == Ok("1") {
        panic!("{name} needs root (mount namespaces), and CAUSEWAY_PRIVILEGED_TESTS=1 forbids skipping");
    }
    println!("SKIP {name}: needs root (mount namespaces)");
    false
}

struct Run {
    out: std::path::PathBuf,
    calls: String,
    install: String,
}

impl Run {
    fn read(&self, what: &str) -> String {
        std::fs::read_to_string(self.out.join(what)).unwrap_or_default()
    }
}

async fn run_on_host(script: &str, tmp: &Path, resolved_active: bool, dns_ok: bool) -> anyhow::Result<Run> {
    let tag = format!("{}-{}", u8::from(resolved_active), u8::from(dns_ok));
    let dir = tmp.join(&tag);
    let (out, scratch, bin) = (dir.join("out"), dir.join("scratch"), dir.join("bin"));
    for d in [&out, &scratch, &bin] {
        std::fs::create_dir_all(d)?;
    }
    use std::os::unix::fs::PermissionsExt;
    for (name, text) in [("systemctl", FAKE_SYSTEMCTL), ("causeway-node-agent", FAKE_AGENT)] {
        std::fs::write(bin.join(name), text)?;
        std::fs::set_permissions(bin.join(name), std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::write(bin.join("identity-sync"), "#!/bin/sh\n")?;
    std::fs::write(dir.join("join.sh"), script)?;
    std::fs::write(dir.join("driver.sh"), DRIVER)?;
    let calls = dir.join("calls");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let run = tokio::process::Command::new("unshare")
        .args(["--mount", "bash"])
        .arg(dir.join("driver.sh"))
        .env("PATH", path)
        .env("SCRATCH", &scratch)
        .env("OUT", &out)
        .env("SCRIPT", dir.join("join.sh"))
        .env("CALLS", &calls)
        .env("RESOLVED_ACTIVE", if resolved_active { "0" } else { "3" })
        .env("CHECK_DNS_EXIT", if dns_ok { "0" } else { "1" })
        .env("CAUSEWAY_NODE_IP", "192.0.2.50")
        .env("CAUSEWAY_AGENT_BINARY", bin.join("causeway-node-agent"))
        .env("CAUSEWAY_IDENTITY_SYNC_BINARY", bin.join("identity-sync"))
        .env("CAUSEWAY_DNS_CHECK_SECONDS", "3")
        .env_remove("CAUSEWAY_JOIN_ROOT")
        .env_remove("CAUSEWAY_JOIN_NO_START")
        .output()
        .await?;
    let r =
        Run { out: out.clone(), calls: std::fs::read_to_string(&calls).unwrap_or_default(), install: String::new() };
    let install = r.read("install.out");
    anyhow::ensure!(
        run.status.success(),
        "driver failed: {}\ninstall:\n{install}\nuninstall:\n{}\ncalls:\n{}",
        String::from_utf8_lossy(&run.stderr),
        r.read("uninstall.out"),
        r.calls
    );
    Ok(Run { install, ..r })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_script_on_a_host_drives_systemd_resolved_and_checks_dns() -> anyhow::Result<()> {
    if !privileged("join_script_on_a_host_drives_systemd_resolved_and_checks_dns") {
        return Ok(());
    }
    let clusters = Clusters::start(&["east"]).await?;
    let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
        "metadata": {"name": "clustermesh-apiserver", "namespace": "causeway"},
        "spec": {"clusterIP": "10.96.0.5", "ports": [{"name": "etcd", "port": 2379}, {"name": "workloads", "port": 9965}]}
    }))?;
    kube::Api::namespaced(clusters.client("east").await?, "causeway").create(&Default::default(), &svc).await?;
    clusters
        .causeway(&["clustermesh", "enable", "--context", "east", "--cluster-name", "east", "--cluster-id", "1"])
        .await?
        .expect_ok("enable");
    let script =
        clusters.causeway(&["external-workload", "install", "vm-1", "--context", "east"]).await?.expect_ok("install");
    let tmp = tempfile::tempdir()?;

    // systemd-resolved active, DNS answers.
    let r = run_on_host(&script.stdout, tmp.path(), true, true).await?;
    let calls: Vec<&str> = r.calls.lines().collect();
    let pos = |c: &str| calls.iter().position(|l| *l == c);
    let register =
        calls.iter().position(|l| l.starts_with("agent register --name vm-1 --apiserver https://10.96.0.5:9965"));
    let enable = pos("systemctl enable causeway-identity-sync.service causeway-node-agent.service");
    let restart = pos("systemctl restart causeway-identity-sync.service causeway-node-agent.service");
    let resolved = pos("systemctl restart systemd-resolved");
    let check = calls.iter().position(|l| {
        l.starts_with("agent check-dns --resolv-conf /etc/resolv.conf --name kubernetes.default.svc.cluster.local")
    });
    assert!(
        register.is_some() && resolved.is_some() && enable.is_some() && restart.is_some() && check.is_some(),
        "{}",
        r.calls
    );
    assert!(register < resolved && resolved < enable && enable < restart && restart < check, "order:\n{}", r.calls);
    assert!(r.install.contains("causeway-join: cluster DNS works"), "{}", r.install);
    assert_eq!(r.read("install/causeway.conf"), "[Resolve]\nDNS=10.96.0.10\nDomains=~cluster.local\n");
    // resolved manages DNS: resolv.conf is left alone.
    assert_eq!(r.read("install/resolv.conf"), r.read("resolv.before"));
    assert!(r.read("install/node-agent.env").contains("CAUSEWAY_STATE_DIR=/var/lib/causeway\n"));
    let unit = r.read("install/causeway-node-agent.service");
    assert!(unit.contains("EnvironmentFile=/etc/causeway/workload.env\n"), "{unit}");
    assert!(unit.contains("ExecStart=/usr/local/bin/causeway-node-agent --identity-sync-addr"), "{unit}");
    // Uninstall: units stopped first, the datapath removed, the drop-in gone and resolved told, nothing left.
    let after: Vec<&str> = r.calls.split("---- uninstall\n").nth(1).unwrap_or_default().lines().collect();
    assert_eq!(
        after,
        vec![
            "systemctl disable --now causeway-node-agent.service causeway-identity-sync.service",
            "agent --uninstall --wireguard-interface cw_wg",
            "systemctl is-active --quiet systemd-resolved",
            "systemctl restart systemd-resolved",
            "systemctl daemon-reload",
        ],
        "{}",
        r.calls
    );
    assert_eq!(r.read("uninstall/exists"), "/etc/resolv.conf\n", "left behind after uninstall");
    assert_eq!(r.read("uninstall/resolv.conf"), r.read("resolv.before"));

    // No resolved, DNS never answers: resolv.conf rewritten with a backup, a warning (not a failure), restored.
    let r = run_on_host(&script.stdout, tmp.path(), false, false).await?;
    assert!(
        r.install.contains("warning: kubernetes.default.svc.cluster.local did not resolve within 3 s"),
        "{}",
        r.install
    );
    assert!(!r.calls.contains("systemctl restart systemd-resolved"), "{}", r.calls);
    let resolv = r.read("install/resolv.conf");
    let lines: Vec<&str> = resolv.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        lines,
        vec![
            "nameserver 10.96.0.10",
            "nameserver 192.0.2.53",
            "search svc.cluster.local cluster.local corp.example",
            "options edns0"
        ],
        "{resolv}"
    );
    assert_eq!(r.read("install/resolv.conf.orig"), r.read("resolv.before"));
    assert!(!r.read("install/exists").contains("resolved.conf.d"), "{}", r.read("install/exists"));
    assert_eq!(r.read("uninstall/resolv.conf"), r.read("resolv.before"), "resolv.conf not restored");
    assert_eq!(r.read("uninstall/exists"), "/etc/resolv.conf\n", "left behind after uninstall");
    Ok(())
}
