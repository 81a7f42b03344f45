//! A "remote cluster" that is only an etcd, filled by the test with whatever it wants identity-sync to read: a
//! valid store, a hostile one, or garbage. Keys are built with `causeway-store`'s typed keys.

use std::fmt::Display;

use anyhow::Context as _;
use causeway_store::values::Capabilities;
use causeway_store::{ClusterConfig, Kind, StoreKey};

use crate::Etcd;

pub struct FakeRemote {
    pub name: String,
    pub etcd: Etcd,
}

impl FakeRemote {
    /// A plaintext etcd, empty.
    pub async fn start(name: &str) -> FakeRemote {
        FakeRemote { name: name.to_string(), etcd: Etcd::start().await }
    }

    pub async fn put(&self, key: impl Display, value: impl Into<Vec<u8>>) -> anyhow::Result<()> {
        let key = key.to_string();
        let mut c = self.etcd.client().await;
        c.put(key.clone(), value.into(), None).await.with_context(|| format!("putting {key}"))?;
        Ok(())
    }

    pub async fn delete(&self, key: impl Display) -> anyhow::Result<()> {
        let key = key.to_string();
        let mut c = self.etcd.client().await;
        c.delete(key.clone(), None).await.with_context(|| format!("deleting {key}"))?;
        Ok(())
    }

    /// Writes `cilium/.has-cluster-config` and this remote's cluster config claiming `id`, with synced canaries and
    /// 255 clusters (what clustermesh-apiserver writes).
    pub async fn write_cluster_config(&self, id: u32) -> anyhow::Result<()> {
        let config = ClusterConfig {
            id,
            capabilities: Capabilities {
                synced_canaries: true,
                max_connected_clusters: 255,
                service_exports_enabled: Some(false),
            },
        };
        self.put(StoreKey::HasClusterConfig, "true").await?;
        self.put(StoreKey::ClusterConfig { cluster: self.name.clone() }, serde_json::to_vec(&config)?).await
    }

    /// Writes every kind's synced canary, as a writer does once its first export is complete.
    pub async fn mark_synced(&self) -> anyhow::Result<()> {
        for kind in Kind::ALL {
            self.put(StoreKey::Synced { cluster: self.name.clone(), kind }, "2025-01-01T00:00:00Z").await?;
        }
        Ok(())
    }

    /// `cilium/state/services/v1/<this remote>/<ns>/<name>`
    pub fn service_key(&self, namespace: &str, name: &str) -> StoreKey {
        StoreKey::Service { cluster: self.name.clone(), namespace: namespace.to_string(), name: name.to_string() }
    }

    /// A valid global, shared service value from this remote with the given backends on port `http`/8080.
    pub fn service_json(&self, id: u32, namespace: &str, name: &str, backends: &[&str]) -> serde_json::Value {
        let backends: serde_json::Map<String, serde_json::Value> = backends
            .iter()
            .map(|ip| (ip.to_string(), serde_json::json!({"http": {"Protocol": "TCP", "Port": 8080}})))
            .collect();
        serde_json::json!({
            "cluster": self.name, "namespace": namespace, "name": name,
            "frontends": {}, "backends": backends,
            "labels": {}, "selector": {}, "includeExternal": false, "shared": true, "clusterID": id
        })
    }
}
