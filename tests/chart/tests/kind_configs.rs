//! kind-configs/: the 2- and 3-cluster meshes. Within a mesh, pod and service CIDRs must be disjoint (from each
//! other, across clusters), and cluster names and IDs unique; each cluster's Helm values must agree with its kind
//! config (name, CIDRs, every peer's pod CIDR) and render with the chart; the mesh script must be valid bash. (Creating the clusters needs
//! Docker and is not done here.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use causeway_chart_tests::{helm_template, parse_manifests, repo_root};
use ipnet::IpNet;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KindConfig {
    kind: String,
    #[serde(rename = "apiVersion")]
    api_version: String,
    name: String,
    networking: KindNetworking,
    nodes: Vec<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KindNetworking {
    pod_subnet: IpNet,
    service_subnet: IpNet,
}

#[derive(Debug)]
struct ClusterFiles {
    kind: KindConfig,
    values: serde_yaml::Value,
    values_text: String,
}

fn mesh(dir: &str) -> Result<BTreeMap<String, ClusterFiles>> {
    let dir: PathBuf = repo_root().join("kind-configs").join(dir);
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let Some(stem) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".kind.yaml")) else {
            continue;
        };
        let kind: KindConfig = serde_yaml::from_str(&read(&path)?).with_context(|| format!("{}", path.display()))?;
        let values_path = dir.join(format!("{stem}.values.yaml"));
        let values_text = read(&values_path)?;
        let values = serde_yaml::from_str(&values_text).with_context(|| format!("{}", values_path.display()))?;
        if kind.name != stem {
            bail!("{} names cluster {:?}; the file name says {stem:?}", path.display(), kind.name);
        }
        out.insert(stem.to_string(), ClusterFiles { kind, values, values_text });
    }
    Ok(out)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn cidrs(v: &serde_yaml::Value) -> Result<Vec<IpNet>> {
    v.as_sequence()
        .context("a list of CIDRs")?
        .iter()
        .map(|c| c.as_str().context("a CIDR string")?.parse::<IpNet>().context("a CIDR"))
        .collect()
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn check_mesh(dir: &str, expected: &[&str]) -> Result<()> {
    let mesh = mesh(dir)?;
    let names: Vec<&str> = mesh.keys().map(String::as_str).collect();
    let mut want: Vec<&str> = expected.to_vec();
    want.sort();
    assert_eq!(names, want, "{dir}: clusters");

    // Every subnet of the mesh, labelled, must be disjoint from every other.
    let mut subnets: Vec<(String, IpNet)> = Vec::new();
    let mut ids = BTreeSet::new();
    for (name, c) in &mesh {
        assert_eq!((c.kind.kind.as_str(), c.kind.api_version.as_str()), ("Cluster", "kind.x-k8s.io/v1alpha4"));
        assert!(!c.kind.nodes.is_empty(), "{name}: nodes");
        subnets.push((format!("{name} pods"), c.kind.networking.pod_subnet));
        subnets.push((format!("{name} services"), c.kind.networking.service_subnet));

        let v = &c.values;
        assert_eq!(v["cluster"]["name"].as_str(), Some(name.as_str()), "{dir}/{name}: values cluster.name");
        let id = v["cluster"]["id"].as_u64().with_context(|| format!("{dir}/{name}: cluster.id"))?;
        assert!((1..=255).contains(&id), "{dir}/{name}: cluster.id {id}");
        assert!(ids.insert(id), "{dir}: cluster ID {id} used twice");
        // The egress controller's view of the networks is the kind config's.
        assert_eq!(cidrs(&v["egressGateway"]["podCidrs"])?, vec![c.kind.networking.pod_subnet], "{dir}/{name}");
        assert_eq!(cidrs(&v["egressGateway"]["serviceCidrs"])?, vec![c.kind.networking.service_subnet], "{dir}/{name}");
        // Every other cluster's pod CIDR is a mesh CIDR (never sent to an egress gateway).
        let others: BTreeSet<String> = mesh.keys().filter(|n| *n != name).cloned().collect();
        let mesh_cidrs = v["egressGateway"]["meshPodCidrs"].as_mapping().context("meshPodCidrs")?;
        let mut listed = BTreeSet::new();
        for (peer, list) in mesh_cidrs {
            let peer = peer.as_str().context("peer name")?.to_string();
            let theirs =
                &mesh.get(&peer).with_context(|| format!("{dir}/{name}: meshPodCidrs names unknown {peer}"))?;
            assert_eq!(cidrs(list)?, vec![theirs.kind.networking.pod_subnet], "{dir}/{name}: meshPodCidrs.{peer}");
            listed.insert(peer);
        }
        assert_eq!(listed, others, "{dir}/{name}: meshPodCidrs covers every peer");

        // The values render with the chart.
        let ms = parse_manifests(&helm_template(&c.values_text, "causeway", &[])?)
            .with_context(|| format!("{dir}/{name}.values.yaml"))?;
        assert!(ms.iter().any(|m| m.kind == "DaemonSet"), "{dir}/{name}: renders the node agent");
    }
    for (i, (la, a)) in subnets.iter().enumerate() {
        for (lb, b) in &subnets[i + 1..] {
            assert!(!overlaps(a, b), "{dir}: {la} {a} overlaps {lb} {b}");
        }
    }
    Ok(())
}

#[test]
fn two_cluster_mesh_is_consistent() -> Result<()> {
    check_mesh("2-clusters", &["east", "west"])
}

#[test]
fn three_cluster_mesh_is_consistent() -> Result<()> {
    check_mesh("3-clusters", &["east", "west", "north"])
}

#[test]
fn the_overlap_check_catches_overlaps() {
    // The disjointness check above must be able to fail.
    let a: IpNet = "10.1.0.0/16".parse().expect("cidr");
    assert!(overlaps(&a, &"10.1.128.0/17".parse().expect("cidr")));
    assert!(overlaps(&"10.0.0.0/8".parse().expect("cidr"), &a));
    assert!(!overlaps(&a, &"10.2.0.0/16".parse().expect("cidr")));
}

#[test]
fn mesh_script_is_valid_bash_and_uses_the_configs() -> Result<()> {
    let script = repo_root().join("kind-configs/mesh-up.sh");
    let out = std::process::Command::new("bash").arg("-n").arg(&script).output().context("bash -n")?;
    assert!(out.status.success(), "bash -n: {}", String::from_utf8_lossy(&out.stderr));
    let text = read(&script)?;
    for needle in ["kind create cluster --config", "charts/causeway", "clustermesh enable", "clustermesh connect"] {
        assert!(text.contains(needle), "mesh-up.sh does not run {needle:?}");
    }
    Ok(())
}
