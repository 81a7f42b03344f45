//! kube-rs `Api` verbs against the fake: get/list/create/replace/patch/delete, conflicts,
//! selectors, pagination, server-side apply, discovery and malformed input.

mod common;

use std::collections::BTreeMap;

use common::{api_error, start_default};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::discovery::Discovery;
use kube::ResourceExt;
use serde_json::json;

fn cm(name: &str, labels: &[(&str, &str)], data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        },
        data: Some(data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ..Default::default()
    }
}

fn data(c: &ConfigMap) -> BTreeMap<String, String> {
    c.data.clone().unwrap_or_default()
}

#[tokio::test]
async fn configmap_crud_and_conflicts() -> anyhow::Result<()> {
    let (server, client) = start_default().await?;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let pp = PostParams::default();

    let created = api.create(&pp, &cm("a", &[("app", "x")], &[("k", "1")])).await?;
    assert_eq!(created.namespace().as_deref(), Some("default"));
    assert!(created.uid().is_some_and(|u| !u.is_empty()));
    assert!(created.metadata.creation_timestamp.is_some());
    let rv1 = created.resource_version().unwrap_or_default();
    assert_eq!(rv1, server.resource_version().to_string());

    let err = api_error(api.create(&pp, &cm("a", &[], &[])).await)?;
    assert_eq!((err.code, err.reason.as_str()), (409, "AlreadyExists"));

    let got = api.get("a").await?;
    assert_eq!(data(&got)["k"], "1");

    // replace with the current resourceVersion succeeds and bumps it
    let mut edit = got.clone();
    edit.data = Some([("k".to_string(), "2".to_string())].into());
    let replaced = api.replace("a", &pp, &edit).await?;
    assert_eq!(data(&replaced)["k"], "2");
    let rv2 = replaced.resource_version().unwrap_or_default();
    assert!(rv2.parse::<u64>()? > rv1.parse::<u64>()?);

    // replace with the stale one conflicts
    let err = api_error(api.replace("a", &pp, &edit).await)?;
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));

    // merge, strategic-merge and JSON patches
    let merged = api.patch("a", &PatchParams::default(), &Patch::Merge(json!({"data": {"m": "merge"}}))).await?;
    assert_eq!(data(&merged)["m"], "merge");
    let strategic =
        api.patch("a", &PatchParams::default(), &Patch::Strategic(json!({"data": {"s": "smp", "m": null}}))).await?;
    assert_eq!(data(&strategic).get("m"), None);
    assert_eq!(data(&strategic)["s"], "smp");
    let ops: serde_json::Value = json!([
        {"op": "test", "path": "/data/s", "value": "smp"},
        {"op": "replace", "path": "/data/k", "value": "3"},
        {"op": "add", "path": "/metadata/labels/added", "value": "yes"},
        {"op": "remove", "path": "/data/s"}
    ]);
    let jp = api.patch("a", &PatchParams::default(), &Patch::Json::<()>(serde_json::from_value(ops)?)).await?;
    assert_eq!(data(&jp)["k"], "3");
    assert_eq!(jp.labels().get("added").map(String::as_str), Some("yes"));
    let failed_test: serde_json::Value = json!([{"op": "test", "path": "/data/k", "value": "nope"}]);
    let err = api_error(
        api.patch("a", &PatchParams::default(), &Patch::Json::<()>(serde_json::from_value(failed_test)?)).await,
    )?;
    assert_eq!(err.code, 422);

    // a patch carrying a stale resourceVersion is a conflict
    let err = api_error(
        api.patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": rv1}, "data": {"x": "y"}})),
        )
        .await,
    )?;
    assert_eq!(err.code, 409);

    // a no-op patch does not bump the resourceVersion
    let before = api.get("a").await?.resource_version();
    let same = api.patch("a", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": "3"}}))).await?;
    assert_eq!(same.resource_version(), before);

    // generateName
    let mut gen = cm("", &[], &[]);
    gen.metadata.name = None;
    gen.metadata.generate_name = Some("gen-".into());
    let g = api.create(&pp, &gen).await?;
    assert!(g.name_any().starts_with("gen-") && g.name_any().len() == "gen-".len() + 5);

    // delete returns the object; then it is gone
    let deleted = api.delete("a", &DeleteParams::default()).await?;
    assert!(deleted.left().is_some_and(|c| c.name_any() == "a"));
    let err = api_error(api.get("a").await)?;
    assert_eq!((err.code, err.reason.as_str()), (404, "NotFound"));
    let err = api_error(api.delete("a", &DeleteParams::default()).await)?;
    assert_eq!(err.code, 404);
    assert_eq!(api.get_opt("a").await?.map(|c| c.name_any()), None);
    let err = api_error(api.replace("a", &pp, &edit).await)?;
    assert_eq!(err.code, 404);
    let err = api_error(api.patch("a", &PatchParams::default(), &Patch::Merge(json!({}))).await)?;
    assert_eq!(err.code, 404);

    server.shutdown().await
}

#[tokio::test]
async fn delete_preconditions_and_collection() -> anyhow::Result<()> {
    let (server, client) = start_default().await?;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let pp = PostParams::default();
    for (name, tier) in [("a", "x"), ("b", "x"), ("c", "y")] {
        api.create(&pp, &cm(name, &[("tier", tier)], &[])).await?;
    }
    let stale = DeleteParams {
        preconditions: Some(kube::api::Preconditions { resource_version: Some("1".into()), uid: None }),
        ..Default::default()
    };
    let err = api_error(api.delete("a", &stale).await)?;
    assert_eq!(err.code, 409);

    let deleted = api.delete_collection(&DeleteParams::default(), &ListParams::default().labels("tier=x")).await?;
    let names: Vec<String> = deleted.left().map(|l| l.items.iter().map(|c| c.name_any()).collect()).unwrap_or_default();
    assert_eq!(names, vec!["a", "b"]);
    let left: Vec<String> = api.list(&ListParams::default()).await?.items.iter().map(|c| c.name_any()).collect();
    assert_eq!(left, vec!["c"]);
    server.shutdown().await
}

#[tokio::test]
async fn label_and_field_selectors_and_all_namespaces() -> anyhow::Result<()> {
    let (server, client) = start_default().await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let pp = PostParams::default();
    for ns in ["one", "two"] {
        let n =
            Namespace { metadata: ObjectMeta { name: Some(ns.into()), ..Default::default() }, ..Default::default() };
        namespaces.create(&pp, &n).await?;
    }
    let pods = |ns: &str| -> Api<Pod> { Api::namespaced(client.clone(), ns) };
    let pod = |name: &str, labels: &[(&str, &str)]| Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        },
        ..Default::default()
    };
    pods("one").create(&pp, &pod("web-1", &[("app", "web"), ("tier", "front")])).await?;
    pods("one").create(&pp, &pod("db-1", &[("app", "db"), ("tier", "back")])).await?;
    pods("two").create(&pp, &pod("web-2", &[("app", "web")])).await?;

    let all: Api<Pod> = Api::all(client.clone());
    let names = |l: kube::core::ObjectList<Pod>| -> Vec<String> { l.items.iter().map(|p| p.name_any()).collect() };
    let q = |s: &str| ListParams::default().labels(s);

    assert_eq!(names(all.list(&ListParams::default()).await?), vec!["db-1", "web-1", "web-2"]);
    assert_eq!(names(all.list(&q("app=web")).await?), vec!["web-1", "web-2"]);
    assert_eq!(names(all.list(&q("app!=web")).await?), vec!["db-1"]);
    assert_eq!(names(all.list(&q("tier")).await?), vec!["db-1", "web-1"]);
    assert_eq!(names(all.list(&q("!tier")).await?), vec!["web-2"]);
    assert_eq!(names(all.list(&q("tier in (front,middle)")).await?), vec!["web-1"]);
    assert_eq!(names(all.list(&q("tier notin (front)")).await?), vec!["db-1", "web-2"]);
    assert_eq!(names(all.list(&q("app=web,tier=front")).await?), vec!["web-1"]);
    assert_eq!(names(pods("one").list(&q("app=web")).await?), vec!["web-1"]);
    let by_ns = ListParams::default().fields("metadata.namespace=two");
    assert_eq!(names(all.list(&by_ns).await?), vec!["web-2"]);
    let by_name = ListParams::default().fields("metadata.name=db-1");
    assert_eq!(names(all.list(&by_name).await?), vec!["db-1"]);
    let not_name = ListParams::default().fields("metadata.name!=db-1");
    assert_eq!(names(pods("one").list(&not_name).await?), vec!["web-1"]);

    let err = api_error(all.list(&q("app in (web")).await)?;
    assert_eq!(err.code, 400);

    server.shutdown().await
}

#[tokio::test]
async fn pagination_with_limit_and_continue() -> anyhow::Result<()> {
    let (server, client) = start_default().await?;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    for i in 0..7 {
        api.create(&PostParams::default(), &cm(&format!("cm-{i}"), &[], &[])).await?;
    }
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    let mut first_rv = None;
    loop {
        let mut lp = ListParams::default().limit(3);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = api.list(&lp).await?;
        pages += 1;
        assert!(page.items.len() <= 3);
        first_rv.get_or_insert(page.metadata.resource_version.clone());
        // every page of one list reports the first page's resourceVersion
        assert_eq!(Some(&page.metadata.resource_version), first_rv.as_ref());
        seen.extend(page.items.iter().map(|c| c.name_any()));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => {
                assert!(page.metadata.remaining_item_count.is_some_and(|r| r > 0));
                token = Some(c);
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..7).map(|i| format!("cm-{i}")).collect();
    assert_eq!(seen, expected);

    let err = api_error(api.list(&ListParams::default().limit(2).continue_token("garbage!")).await)?;
    assert_eq!(err.code, 400);
    server.shutdown().await
}

#[tokio::test]
async fn server_side_apply_creates_then_merges() -> anyhow::Result<()> {
    let (server, client) = start_default().await?;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let ssa = PatchParams::apply("causeway-test").force();
    let applied = api.patch("applied", &ssa, &Patch::Apply(cm("applied", &[("a", "1")], &[("k", "v")]))).await?;
    assert_eq!(data(&applied)["k"], "v");
    let again = api
        .patch(
            "applied",
            &ssa,
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "applied"},
                "data": {"k2": "v2"}
            })),
        )
        .await?;
    // merged, not replaced: field ownership is not tracked (documented)
    assert_eq!(data(&again)["k"], "v");
    assert_eq!(data(&again)["k2"], "v2");
    assert_eq!(again.uid(), applied.uid());

    let err = api_error(api.patch("x", &PatchParams::default(), &Patch::Apply(cm("x", &[], &[]))).await)?;
    assert_eq!(err.code, 400, "apply without fieldManager is rejected: {err:?}");
    server.shutdown().await
}

#[tokio::test]
async fn discovery_and_version() -> anyhow::Result<()> {
    let (server, client) = start_default().await?;
    let info = client.apiserver_version().await?;
    assert_eq!(info.major, "1");
    let discovery = Discovery::new(client.clone()).run().await?;
    let mut found = Vec::new();
    for group in discovery.groups() {
        for (ar, caps) in group.recommended_resources() {
            found.push(format!("{}/{}:{:?}", ar.group, ar.plural, caps.scope));
        }
    }
    for want in [
        "/pods:Namespaced",
        "/nodes:Cluster",
        "/namespaces:Cluster",
        "discovery.k8s.io/endpointslices:Namespaced",
        "coordination.k8s.io/leases:Namespaced",
        "apiextensions.k8s.io/customresourcedefinitions:Cluster",
        "events.k8s.io/events:Namespaced",
    ] {
        assert!(found.iter().any(|f| f == want), "{want} missing from {found:?}");
    }
    server.shutdown().await
}

#[tokio::test]
async fn malformed_requests_get_status_errors() -> anyhow::Result<()> {
    let (server, client) = start_default().await?;
    let send = |method: &str, path: &str, ct: &str, body: &[u8]| {
        http::Request::builder().method(method).uri(path).header("content-type", ct).body(body.to_vec())
    };
    let cases: Vec<(http::Request<Vec<u8>>, u16)> = vec![
        (send("POST", "/api/v1/namespaces/default/configmaps", "application/json", b"{not json")?, 400),
        (send("POST", "/api/v1/namespaces/default/configmaps", "application/json", b"[1,2]")?, 400),
        (
            send(
                "POST",
                "/api/v1/namespaces/default/configmaps",
                "application/json",
                br#"{"kind":"Pod","metadata":{"name":"x"}}"#,
            )?,
            400,
        ),
        (send("POST", "/api/v1/namespaces/default/configmaps", "application/json", br#"{"metadata":{}}"#)?, 422),
        (send("GET", "/api/v1/namespaces/default/widgets", "application/json", b"")?, 404),
        (send("GET", "/apis/nope.example.com/v1/things", "application/json", b"")?, 404),
        (send("GET", "/api/v1/namespaces/default/configmaps/a/b/c/d", "application/json", b"")?, 404),
        (send("GET", "/api/v1/nodes/n/frobnicate", "application/json", b"")?, 404),
        (send("GET", "/api/v1/namespaces/default/pods?limit=minus-one", "application/json", b"")?, 400),
        (send("GET", "/api/v1/namespaces/default/pods?watch=true&resourceVersion=abc", "application/json", b"")?, 400),
        (send("PATCH", "/api/v1/namespaces/default/configmaps/a", "text/plain", b"{}")?, 415),
        (send("PATCH", "/api/v1/namespaces/default", "application/merge-patch+json", b"{bad")?, 400),
        (send("DELETE", "/api/v1/namespaces/default/configmaps/a", "application/json", b"{bad")?, 400),
        (send("PUT", "/api/v1/namespaces/default/configmaps", "application/json", b"{}")?, 405),
    ];
    for (req, want) in cases {
        let what = format!("{} {}", req.method(), req.uri());
        let res = client.request::<serde_json::Value>(req).await;
        let status = api_error(res)?;
        assert_eq!(status.code, want, "{what}: {status:?}");
        assert!(!status.reason.is_empty(), "{what}: Status without a reason");
    }
    // The server is still fine afterwards.
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    api.create(&PostParams::default(), &cm("after", &[], &[])).await?;
    server.shutdown().await
}

#[tokio::test]
async fn deleting_a_namespace_deletes_its_objects() -> anyhow::Result<()> {
    let (server, client) = start_default().await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns =
        Namespace { metadata: ObjectMeta { name: Some("doomed".into()), ..Default::default() }, ..Default::default() };
    let created = namespaces.create(&PostParams::default(), &ns).await?;
    assert_eq!(created.status.and_then(|s| s.phase).as_deref(), Some("Active"));
    let doomed: Api<ConfigMap> = Api::namespaced(client.clone(), "doomed");
    let kept: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    doomed.create(&PostParams::default(), &cm("a", &[], &[])).await?;
    kept.create(&PostParams::default(), &cm("a", &[], &[])).await?;
    namespaces.delete("doomed", &DeleteParams::default()).await?;
    assert!(doomed.list(&ListParams::default()).await?.items.is_empty());
    assert_eq!(kept.list(&ListParams::default()).await?.items.len(), 1);
    server.shutdown().await
}
