//! The election against the in-memory kube API stand-in (`tests/fake-kube-apiserver`, real HTTP list/get/update
//! with resourceVersion conflicts): one leader among racing replicas, takeover when the leader dies or gives up,
//! stepping down when the API server goes away, and a garbage Lease that does not wedge the election.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use causeway_leader::{LeaderMetrics, Leadership, LeaseConfig, Role, Timing};
use fake_kube_apiserver::FakeApiServer;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};

const TIMING: Timing = Timing {
    lease_duration: Duration::from_secs(2),
    renew_deadline: Duration::from_millis(1500),
    retry_period: Duration::from_millis(200),
};

fn cfg(identity: &str) -> LeaseConfig {
    LeaseConfig { namespace: "default".into(), name: "ctl".into(), identity: identity.into(), timing: TIMING }
}

async fn wait_until<F: Fn() -> bool>(what: &str, f: F) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn holder(api: &Api<Lease>) -> Result<Option<String>> {
    let l = api.get("ctl").await.context("get the Lease")?;
    Ok(l.spec.and_then(|s| s.holder_identity).filter(|h| !h.is_empty()))
}

#[tokio::test]
async fn one_leader_among_racing_replicas_and_takeover_when_it_dies() -> Result<()> {
    let server = FakeApiServer::start("127.0.0.1:0".parse()?).await?;
    let client = kube::Client::try_from(kube::Config::new(server.url().parse()?))?;
    let api: Api<Lease> = Api::namespaced(client.clone(), "default");
    let ids = ["r0", "r1", "r2"];
    let metrics: Vec<LeaderMetrics> = ids.iter().map(|_| LeaderMetrics::default()).collect();
    let mut replicas: Vec<Option<Leadership>> = Vec::new();
    for (id, m) in ids.iter().zip(&metrics) {
        replicas.push(Some(Leadership::spawn(client.clone(), cfg(id), m.clone())?));
    }
    let leaders = |rs: &Vec<Option<Leadership>>| {
        rs.iter()
            .enumerate()
            .filter(|(_, r)| r.as_ref().is_some_and(Leadership::is_leader))
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
    };
    wait_until("a leader", || leaders(&replicas).len() == 1).await?;
    // Sample for a while: never two leaders, and the Lease names the one that leads.
    for _ in 0..100 {
        let l = leaders(&replicas);
        assert!(l.len() <= 1, "two replicas lead at once: {l:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = leaders(&replicas)[0];
    assert_eq!(holder(&api).await?.as_deref(), Some(ids[first]));
    assert_eq!(metrics[first].leader.get(), 1);
    for (i, m) in metrics.iter().enumerate() {
        if i != first {
            assert_eq!(m.leader.get(), 0, "standby {i} reports itself leader");
            assert!(
                matches!(replicas[i].as_ref().map(Leadership::role), Some(Role::Follower { holder: Some(ref h) }) if h == ids[first]),
                "standby {i} names the leader"
            );
        }
    }
    let transitions = api.get("ctl").await?.spec.and_then(|s| s.lease_transitions).unwrap_or(0);

    // The leader dies without giving the Lease up (dropped: its task is aborted, no release written).
    drop(replicas[first].take());
    wait_until("a new leader after the old one died", || leaders(&replicas).len() == 1).await?;
    let second = leaders(&replicas)[0];
    assert_ne!(second, first);
    assert_eq!(holder(&api).await?.as_deref(), Some(ids[second]));
    let after = api.get("ctl").await?.spec.and_then(|s| s.lease_transitions).unwrap_or(0);
    assert_eq!(after, transitions + 1, "a takeover counts one transition");

    // The new leader shuts down cleanly: it gives the Lease up and the last replica takes over.
    let leaving = replicas[second].take().context("leader present")?;
    leaving.release().await;
    let h = holder(&api).await?;
    assert_ne!(h.as_deref(), Some(ids[second]), "a released Lease does not name the replica that left");
    wait_until("the last replica to lead", || leaders(&replicas).len() == 1).await?;
    let third = leaders(&replicas)[0];
    assert!(third != first && third != second);
    assert_eq!(holder(&api).await?.as_deref(), Some(ids[third]));
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_leader_steps_down_when_it_cannot_renew() -> Result<()> {
    let server = FakeApiServer::start("127.0.0.1:0".parse()?).await?;
    let client = kube::Client::try_from(kube::Config::new(server.url().parse()?))?;
    let metrics = LeaderMetrics::default();
    let l = Leadership::spawn(client, cfg("solo"), metrics.clone())?;
    wait_until("leading", || l.is_leader()).await?;
    server.shutdown().await?;
    // No API server: renewals fail, and the replica stops acting once the renew deadline passes.
    tokio::time::timeout(Duration::from_secs(20), l.lost()).await.context("still leading without an API server")?;
    assert!(matches!(l.role(), Role::Follower { .. }), "{:?}", l.role());
    assert_eq!(metrics.leader.get(), 0);
    assert!(metrics.errors.get() > 0, "the failed renewals are counted");
    Ok(())
}

#[tokio::test]
async fn a_garbage_lease_does_not_block_the_election() -> Result<()> {
    let server = FakeApiServer::start("127.0.0.1:0".parse()?).await?;
    let client = kube::Client::try_from(kube::Config::new(server.url().parse()?))?;
    let api: Api<Lease> = Api::namespaced(client.clone(), "default");
    // A Lease someone wrote by hand: a holder that will never renew and a negative duration.
    let garbage: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "ctl"},
        "spec": {"holderIdentity": "ghost", "leaseDurationSeconds": -5}
    }))?;
    api.create(&PostParams::default(), &garbage).await?;
    let l = Leadership::spawn(client, cfg("real"), LeaderMetrics::default())?;
    wait_until("taking over the garbage Lease", || l.is_leader()).await?;
    assert_eq!(holder(&api).await?.as_deref(), Some("real"));
    Ok(())
}

#[tokio::test]
async fn bad_timing_is_refused_with_a_clear_error() -> Result<()> {
    let server = FakeApiServer::start("127.0.0.1:0".parse()?).await?;
    let client = kube::Client::try_from(kube::Config::new(server.url().parse()?))?;
    let mut c = cfg("x");
    c.timing.renew_deadline = c.timing.lease_duration;
    let err = Leadership::spawn(client, c, LeaderMetrics::default()).err().context("bad timing accepted")?;
    assert!(err.to_string().contains("shorter than the lease duration"), "{err}");
    Ok(())
}
