//! Watches through kube-rs: raw `Api::watch`, `kube::runtime::watcher` (list-watch and streaming
//! lists), bookmarks, 410 Gone after compaction, and a reflector that re-lists and ends correct.

mod common;

use std::time::Duration;

use common::{start, start_default, within};
use fake_kube_apiserver::Options;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::{reflector, watcher};
use kube::ResourceExt;
use serde_json::json;

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A short description of a watcher event, to compare sequences.
fn describe(ev: &watcher::Event<ConfigMap>) -> String {
    match ev {
        watcher::Event::Init => "init".into(),
        watcher::Event::InitApply(c) => format!("init-apply {}", c.name_any()),
        watcher::Event::InitDone => "init-done".into(),
        watcher::Event::Apply(c) => {
            format!("apply {} {}", c.name_any(), c.labels().get("v").cloned().unwrap_or_default())
        }
        watcher::Event::Delete(c) => format!("delete {}", c.name_any()),
    }
}

async fn next(stream: &mut BoxStream<'_, watcher::Result<watcher::Event<ConfigMap>>>) -> anyhow::Result<String> {
    let ev =
        within("a watcher event", stream.try_next()).await??.ok_or_else(|| anyhow::anyhow!("watcher stream ended"))?;
    Ok(describe(&ev))
}

async fn watcher_sees_changes(config: watcher::Config) -> anyhow::Result<()> {
    let (server, client) = start_default().await?;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let pp = PostParams::default();
    api.create(&pp, &cm("existing", &[])).await?;

    let mut stream = watcher(api.clone(), config).boxed();
    assert_eq!(next(&mut stream).await?, "init");
    assert_eq!(next(&mut stream).await?, "init-apply existing");
    assert_eq!(next(&mut stream).await?, "init-done");

    api.create(&pp, &cm("new", &[("v", "1")])).await?;
    assert_eq!(next(&mut stream).await?, "apply new 1");
    api.patch("new", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"v": "2"}}}))).await?;
    assert_eq!(next(&mut stream).await?, "apply new 2");
    api.delete("new", &DeleteParams::default()).await?;
    assert_eq!(next(&mut stream).await?, "delete new");
    drop(stream);
    server.shutdown().await
}

#[tokio::test]
async fn watcher_list_watch_sees_add_modify_delete() -> anyhow::Result<()> {
    // kube's default InitialListStrategy::ListWatch: paginated list, then watch from its resourceVersion.
    watcher_sees_changes(watcher::Config::default()).await
}

#[tokio::test]
async fn watcher_list_watch_with_any_semantic_and_small_pages() -> anyhow::Result<()> {
    let mut cfg = watcher::Config::default().any_semantic();
    cfg.page_size = Some(1);
    watcher_sees_changes(cfg).await
}

#[tokio::test]
async fn watcher_streaming_list_sees_add_modify_delete() -> anyhow::Result<()> {
    // sendInitialEvents=true: synthetic ADDED events, then the initial-events-end BOOKMARK.
    watcher_sees_changes(watcher::Config::default().streaming_lists()).await
}

#[tokio::test]
async fn label_selector_applies_to_watch_events() -> anyhow::Result<()> {
    let (server, client) = start_default().await?;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let pp = PostParams::default();
    let mut stream = watcher(api.clone(), watcher::Config::default().labels("team=a")).boxed();
    assert_eq!(next(&mut stream).await?, "init");
    assert_eq!(next(&mut stream).await?, "init-done");
    api.create(&pp, &cm("other", &[("team", "b")])).await?;
    api.create(&pp, &cm("mine", &[("team", "a")])).await?;
    assert_eq!(next(&mut stream).await?, "apply mine ");
    // stops matching: seen as a deletion; starts matching: seen as an addition
    api.patch("mine", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"team": "b"}}}))).await?;
    assert_eq!(next(&mut stream).await?, "delete mine");
    api.patch("other", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"team": "a"}}}))).await?;
    assert_eq!(next(&mut stream).await?, "apply other ");
    drop(stream);
    server.shutdown().await
}

#[tokio::test]
async fn bookmarks_arrive_periodically_and_on_demand() -> anyhow::Result<()> {
    let options = Options { bookmark_interval: Duration::from_millis(100), ..Options::default() };
    let (server, client) = start(options).await?;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    api.create(&PostParams::default(), &cm("x", &[])).await?;
    let rv = server.resource_version().to_string();
    let wp = WatchParams { bookmarks: true, ..WatchParams::default() };
    let mut stream = api.watch(&wp, &rv).await?.boxed();
    let ev = within("a periodic bookmark", stream.try_next()).await??;
    match ev {
        Some(WatchEvent::Bookmark(bm)) => assert_eq!(bm.metadata.resource_version, rv),
        other => anyhow::bail!("expected a bookmark, got {other:?}"),
    }
    drop(stream);
    server.shutdown().await?;

    // With a long interval, force_bookmark is the only source.
    let options = Options { bookmark_interval: Duration::from_secs(3600), ..Options::default() };
    let (server, client) = start(options).await?;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let rv = server.resource_version().to_string();
    let mut stream = api.watch(&wp, &rv).await?.boxed();
    // The watch is subscribed to control signals once its response headers arrived.
    assert_eq!(server.open_watches(), 1);
    server.force_bookmark();
    let ev = within("a forced bookmark", stream.try_next()).await??;
    assert!(matches!(ev, Some(WatchEvent::Bookmark(_))), "got {ev:?}");
    drop(stream);
    server.shutdown().await
}

#[tokio::test]
async fn watch_timeout_seconds_ends_the_stream() -> anyhow::Result<()> {
    let (server, client) = start_default().await?;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let wp = WatchParams::default().timeout(1);
    let rv = server.resource_version().to_string();
    let events: Vec<_> = within("the watch to time out", api.watch(&wp, &rv).await?.collect::<Vec<_>>()).await?;
    assert!(events.iter().all(|e| matches!(e, Ok(WatchEvent::Bookmark(_)))), "{events:?}");
    server.shutdown().await
}

#[tokio::test]
async fn watch_from_compacted_resource_version_gets_410() -> anyhow::Result<()> {
    let options = Options { history_limit: 3, ..Options::default() };
    let (server, client) = start(options).await?;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let old = server.resource_version().to_string();
    // Within the history, a watch replays what happened after `old`.
    api.create(&PostParams::default(), &cm("a", &[])).await?;
    let mut replay = api.watch(&WatchParams::default(), &old).await?.boxed();
    match within("a replayed event", replay.try_next()).await?? {
        Some(WatchEvent::Added(c)) => assert_eq!(c.name_any(), "a"),
        other => anyhow::bail!("expected ADDED, got {other:?}"),
    }
    drop(replay);

    // Past the bounded history: 410 Gone as an ERROR event.
    for i in 0..5 {
        api.create(&PostParams::default(), &cm(&format!("b{i}"), &[])).await?;
    }
    let mut gone = api.watch(&WatchParams::default(), &old).await?.boxed();
    match within("the 410 error event", gone.try_next()).await?? {
        Some(WatchEvent::Error(status)) => assert_eq!((status.code, status.reason.as_str()), (410, "Expired")),
        other => anyhow::bail!("expected ERROR 410, got {other:?}"),
    }
    drop(gone);

    // After compact_history, even a recent resourceVersion is gone.
    let recent = server.resource_version();
    api.create(&PostParams::default(), &cm("c", &[])).await?;
    server.compact_history();
    let mut gone = api.watch(&WatchParams::default(), &recent.to_string()).await?.boxed();
    assert!(
        matches!(within("410 after compaction", gone.try_next()).await??, Some(WatchEvent::Error(s)) if s.code == 410)
    );
    server.shutdown().await
}

/// Reads notes until one equals `want`.
async fn wait_for(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>, want: &str) -> anyhow::Result<()> {
    within(want, async {
        while let Some(note) = rx.recv().await {
            if note == want {
                return Ok(());
            }
        }
        anyhow::bail!("the reflector stopped before {want:?}")
    })
    .await?
}

#[tokio::test]
async fn reflector_relists_after_410_and_ends_correct() -> anyhow::Result<()> {
    let (server, client) = start_default().await?;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let pp = PostParams::default();
    for name in ["keep", "change", "remove"] {
        api.create(&pp, &cm(name, &[("v", "1")])).await?;
    }

    let (reader, writer) = reflector::store::<ConfigMap>();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut stream = reflector(writer, watcher(api.clone(), watcher::Config::default())).boxed();
    let driver = tokio::spawn(async move {
        while let Some(item) = stream.next().await {
            let note = match item {
                Ok(ev) => describe(&ev),
                Err(watcher::Error::WatchError(status)) => format!("error {}", status.code),
                Err(e) => format!("other error: {e}"),
            };
            if tx.send(note).is_err() {
                break;
            }
        }
    });
    within("the reflector to be ready", reader.wait_until_ready()).await??;
    wait_for(&mut rx, "init-done").await?;
    // The watcher opens its watch on the poll after InitDone; compact under an open watch.
    within("the watcher's watch to open", async {
        while server.open_watches() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await?;

    server.compact_history();
    api.patch("change", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"v": "2"}}}))).await?;
    api.delete("remove", &DeleteParams::default()).await?;
    api.create(&pp, &cm("added", &[("v", "1")])).await?;

    // The open watch ends with 410 Gone; the watcher starts over with a fresh list.
    wait_for(&mut rx, "error 410").await?;
    wait_for(&mut rx, "init").await?;
    wait_for(&mut rx, "init-done").await?;

    let summary = || {
        let mut s: Vec<String> = reader
            .state()
            .iter()
            .map(|c| format!("{}={}", c.name_any(), c.labels().get("v").cloned().unwrap_or_default()))
            .collect();
        s.sort();
        s
    };
    let want = vec!["added=1", "change=2", "keep=1"];
    within("the reflector store to converge", async {
        while summary() != want {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await?;
    assert_eq!(summary(), want);
    driver.abort();
    server.shutdown().await
}

#[tokio::test]
async fn disconnected_watcher_resumes_without_relisting() -> anyhow::Result<()> {
    let (server, client) = start_default().await?;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut stream = watcher(api.clone(), watcher::Config::default()).boxed();
    assert_eq!(next(&mut stream).await?, "init");
    assert_eq!(next(&mut stream).await?, "init-done");
    // Poll once so that the watcher opens its watch, then cut it.
    api.create(&PostParams::default(), &cm("before", &[])).await?;
    assert_eq!(next(&mut stream).await?, "apply before ");
    server.disconnect_watches();
    api.create(&PostParams::default(), &cm("after", &[])).await?;
    // Resumed from its resourceVersion: the change made while disconnected arrives as an event,
    // with no second Init.
    assert_eq!(next(&mut stream).await?, "apply after ");
    drop(stream);
    server.shutdown().await
}

#[tokio::test]
async fn watch_on_an_object_path_sees_only_that_object() -> anyhow::Result<()> {
    let (server, client) = start_default().await?;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let rv = server.resource_version();
    api.create(&PostParams::default(), &cm("other", &[])).await?;
    api.create(&PostParams::default(), &cm("target", &[])).await?;
    let req = http::Request::get(format!(
        "/api/v1/namespaces/default/configmaps/target?watch=true&resourceVersion={rv}&timeoutSeconds=1"
    ))
    .body(Vec::new())?;
    let text = within("the object watch", client.request_text(req)).await??;
    let names: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).map(|v| v["object"]["metadata"]["name"].to_string()))
        .collect::<Result<_, _>>()?;
    assert_eq!(names, vec!["\"target\""]);
    server.shutdown().await
}
