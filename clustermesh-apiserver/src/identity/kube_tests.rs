//! `KubeIdentityStore` against the fake kube API server (`tests/fake-kube-apiserver`, a test stand-in speaking
//! the real wire protocol). Time comes from a fake clock; nothing sleeps or asserts on timing.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use causeway_crds::{CausewayIdentity, CausewayIdentitySpec};
use causeway_store::{ClusterInfo, LabelSet, MaxConnectedClusters};
use chrono::{DateTime, TimeZone, Utc};
use fake_kube_apiserver::{FakeApiServer, FakeApiServerHandle};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, CustomResourceExt};

use super::{IdentityError, KubeIdentityStore};

const GRACE: Duration = Duration::from_secs(600);

async fn fake_kube() -> (FakeApiServerHandle, Client) {
    let server = FakeApiServer::start("127.0.0.1:0".parse().unwrap()).await.expect("start fake kube-apiserver");
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig_yaml()).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("config");
    let client = Client::try_from(config).expect("client");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &CausewayIdentity::crd()).await.expect("install CausewayIdentity CRD");
    (server, client)
}

/// A fake clock shared by the test and the store: seconds after a fixed epoch.
#[derive(Clone, Default)]
struct FakeClock(Arc<AtomicI64>);

impl FakeClock {
    fn now(&self) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + self.0.load(Ordering::SeqCst), 0).single().expect("valid time")
    }
    fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_secs() as i64, Ordering::SeqCst);
    }
}

fn east() -> ClusterInfo {
    ClusterInfo::new("east", 1, MaxConnectedClusters::C255).expect("cluster info")
}

fn store(client: &Client, clock: &FakeClock) -> KubeIdentityStore {
    let c = clock.clone();
    KubeIdentityStore::new(client.clone(), east(), GRACE).with_clock(move || c.now())
}

fn labels(app: &str) -> LabelSet {
    LabelSet::parse(&format!(
        "k8s:app={app};k8s:io.cilium.k8s.policy.cluster=east;k8s:io.kubernetes.pod.namespace=shop;"
    ))
    .expect("labels")
}

async fn object(client: &Client, id: u32) -> Option<CausewayIdentity> {
    Api::<CausewayIdentity>::all(client.clone()).get_opt(&id.to_string()).await.expect("get identity")
}

async fn squat(client: &Client, id: u32, labels: &LabelSet) {
    let obj = CausewayIdentity::new(
        &id.to_string(),
        CausewayIdentitySpec { labels: labels.to_string(), cluster: "east".to_string() },
    );
    Api::<CausewayIdentity>::all(client.clone()).create(&PostParams::default(), &obj).await.expect("pre-create");
}

#[tokio::test]
async fn allocations_are_persisted_and_survive_a_restart() {
    let (server, client) = fake_kube().await;
    let clock = FakeClock::default();

    let first = store(&client, &clock);
    assert!(first.start().await.expect("start").is_empty());
    let cart = first.acquire(&labels("cart")).await.expect("acquire cart");
    let web = first.acquire(&labels("web")).await.expect("acquire web");
    assert_eq!((cart, web), (65537, 65538), "first allocatable IDs of cluster 1");
    assert_eq!(first.acquire(&labels("cart")).await.expect("again"), cart, "same labels, same ID");
    let persisted = object(&client, cart).await.expect("persisted before use");
    assert_eq!(persisted.spec.labels, labels("cart").to_string());
    assert_eq!(persisted.spec.cluster, "east");
    drop(first);

    // "Restart": a new store restores both IDs from the kube API.
    let second = store(&client, &clock);
    let restored = second.start().await.expect("restart");
    assert_eq!(restored, vec![(cart, labels("cart")), (web, labels("web"))]);
    assert_eq!(second.acquire(&labels("web")).await.expect("web after restart"), web);
    let api = second.acquire(&labels("api")).await.expect("api");
    assert_eq!(api, 65539, "new labels do not collide with restored IDs");

    server.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn existing_objects_are_skipped_or_adopted() {
    let (server, client) = fake_kube().await;
    let clock = FakeClock::default();
    let s = store(&client, &clock);
    s.start().await.expect("start");
    assert_eq!(s.acquire(&labels("cart")).await.expect("cart"), 65537);

    // Someone else (a previous leader that crashed mid-way) already wrote 65538 with other labels, and 65539
    // with exactly the labels we are about to ask for.
    squat(&client, 65538, &labels("squatter")).await;
    squat(&client, 65539, &labels("web")).await;
    assert_eq!(s.acquire(&labels("api")).await.expect("api"), 65540, "65538 taken by other labels, 65539 too");
    assert_eq!(s.acquire(&labels("squatter")).await.expect("squatter"), 65538, "known after the collision");
    assert_eq!(s.acquire(&labels("web")).await.expect("web"), 65539, "adopted: the object has our labels");
    assert_eq!(object(&client, 65540).await.expect("api persisted").spec.labels, labels("api").to_string());

    let foreign = LabelSet::parse("k8s:app=cart;k8s:io.cilium.k8s.policy.cluster=west;").expect("labels");
    assert!(matches!(s.acquire(&foreign).await, Err(IdentityError::ForeignLabels { .. })));

    server.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn garbage_is_deleted_only_after_grace() {
    let (server, client) = fake_kube().await;
    let clock = FakeClock::default();
    let s = store(&client, &clock);
    s.start().await.expect("start");
    let cart = s.acquire(&labels("cart")).await.expect("cart");
    let web = s.acquire(&labels("web")).await.expect("web");

    s.release(&labels("cart")).await.expect("release cart");
    let status = object(&client, cart).await.expect("still there").status.unwrap_or_default();
    assert!(status.last_used.is_some(), "lastUsed recorded when the last user left");

    clock.advance(GRACE);
    let report = s.gc_once().await;
    assert!(report.deleted.is_empty() && report.failed.is_empty(), "not past grace yet: {report:?}");
    assert!(object(&client, cart).await.is_some());

    clock.advance(Duration::from_secs(1));
    let report = s.gc_once().await;
    assert_eq!(report.deleted, vec![cart]);
    assert!(object(&client, cart).await.is_none(), "object deleted");
    assert!(object(&client, web).await.is_some(), "live identity kept");

    // The deleted number is free again, but the cursor moves on first; the old labels get a fresh ID.
    let again = s.acquire(&labels("cart")).await.expect("cart again");
    assert_ne!(again, web);
    assert!(object(&client, again).await.is_some());

    server.shutdown().await.expect("shutdown");
}
