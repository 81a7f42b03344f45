//! The sandbox's demo workload: the same global Service `shop/cart` in every cluster, each with its own pods.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::json;

use super::{ClusterState, SandboxError};

pub const NAMESPACE: &str = "shop";
pub const SERVICE: &str = "cart";
const SOURCE_CLUSTER_LABEL: &str = "multicluster.kubernetes.io/source-cluster";

pub async fn client(c: &ClusterState) -> Result<Client, SandboxError> {
    client_for(&c.name, &c.kubeconfig).await
}

async fn client_for(cluster: &str, kubeconfig: &Path) -> Result<Client, SandboxError> {
    let err = |message: String| SandboxError::Kubeconfig { cluster: cluster.to_string(), message };
    let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| err(e.to_string()))?;
    let cfg =
        Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.map_err(|e| err(e.to_string()))?;
    Client::try_from(cfg).map_err(|source| SandboxError::Kube { cluster: cluster.to_string(), source })
}

/// Installs Causeway's CRDs, generated from the same Rust types as `crds/*.yaml`.
pub async fn install_crds(cluster: &str, kubeconfig: &Path) -> Result<(), SandboxError> {
    let api = Api::<CustomResourceDefinition>::all(client_for(cluster, kubeconfig).await?);
    for crd in causeway_crds::all_crds() {
        api.create(&PostParams::default(), &crd)
            .await
            .map_err(|source| SandboxError::Kube { cluster: cluster.to_string(), source })?;
    }
    Ok(())
}

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    // The values are literals below; a failure here is a programming error in this file, caught by the sandbox test.
    serde_json::from_value(v).expect("demo object literal matches its type")
}

/// Creates namespace, node, two pods, the global service and its EndpointSlice in cluster number `index`.
pub async fn create(c: &ClusterState, index: usize) -> Result<(), SandboxError> {
    let client = client(c).await?;
    let kerr = |source| SandboxError::Kube { cluster: c.name.clone(), source };
    let pp = PostParams::default();
    let n = index + 1;
    let node_name = format!("{}-node-1", c.name);
    let node_ip = format!("192.0.2.{n}");

    let ns: Namespace = from_json(json!({"metadata": {"name": NAMESPACE, "labels": {"team": "shop"}}}));
    Api::<Namespace>::all(client.clone()).create(&pp, &ns).await.map_err(kerr)?;

    let node: Node = from_json(json!({
        "metadata": {"name": node_name, "labels": {"topology.kubernetes.io/zone": format!("{}-1a", c.name)}},
        "spec": {"podCIDR": format!("10.{n}.1.0/24"), "podCIDRs": [format!("10.{n}.1.0/24")]},
        "status": {"addresses": [{"type": "InternalIP", "address": node_ip}]}
    }));
    Api::<Node>::all(client.clone()).create(&pp, &node).await.map_err(kerr)?;

    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    let mut endpoints = Vec::new();
    for p in 0..2 {
        let ip = format!("10.{n}.1.{}", 10 + p);
        let name = format!("cart-{}-{p}", c.name);
        let pod: Pod = from_json(json!({
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": "cart"}},
            "spec": {"nodeName": node_name, "containers": [{"name": "cart", "image": "cart:1",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": node_ip}
        }));
        pods.create(&pp, &pod).await.map_err(kerr)?;
        endpoints.push(json!({"addresses": [ip], "conditions": {"ready": true, "serving": true},
            "nodeName": node_name, "targetRef": {"kind": "Pod", "name": name, "namespace": NAMESPACE}}));
    }

    let svc: Service = from_json(json!({
        "metadata": {"name": SERVICE, "namespace": NAMESPACE,
            "annotations": {"service.cilium.io/global": "true"}, "labels": {"app": "cart"}},
        "spec": {"selector": {"app": "cart"}, "clusterIP": format!("10.9{}.0.20", 5 + n),
            "clusterIPs": [format!("10.9{}.0.20", 5 + n)],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    }));
    Api::<Service>::namespaced(client.clone(), NAMESPACE).create(&pp, &svc).await.map_err(kerr)?;

    let slice: EndpointSlice = from_json(json!({
        "metadata": {"name": format!("{SERVICE}-local"), "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": SERVICE,
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    }));
    Api::<EndpointSlice>::namespaced(client, NAMESPACE).create(&pp, &slice).await.map_err(kerr)?;
    Ok(())
}

/// Backends of `shop/cart` in cluster `c`, by the cluster they come from: the local slice plus the slices
/// identity-sync wrote for each remote.
pub async fn merged_backends(c: &ClusterState) -> Result<BTreeMap<String, Vec<String>>, SandboxError> {
    let client = client(c).await?;
    let slices = Api::<EndpointSlice>::namespaced(client, NAMESPACE)
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={SERVICE}")))
        .await
        .map_err(|source| SandboxError::Kube { cluster: c.name.clone(), source })?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for s in slices {
        let source = s.metadata.labels.as_ref().and_then(|l| l.get(SOURCE_CLUSTER_LABEL)).cloned();
        let source = source.unwrap_or_else(|| c.name.clone());
        let addrs = out.entry(source).or_default();
        for e in &s.endpoints {
            addrs.extend(e.addresses.iter().cloned());
        }
        addrs.sort();
    }
    out.retain(|_, v| !v.is_empty());
    Ok(out)
}
