//! CustomResourceDefinitions: creating one serves its kind; custom objects support CRUD, watch,
//! generation and the status subresource; deleting the CRD removes the kind and its objects.

mod common;

use common::{api_error, start_default, within};
use futures::TryStreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::discovery::Discovery;
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::watcher;
use kube::ResourceExt;
use serde_json::json;

fn widget_crd(status_subresource: bool) -> anyhow::Result<CustomResourceDefinition> {
    let subresources = if status_subresource { json!({"status": {}}) } else { json!({}) };
    Ok(serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.test.causeway.io"},
        "spec": {
            "group": "test.causeway.io",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wg"]},
            "versions": [{
                "name": "v1alpha1",
                "served": true,
                "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                "subresources": subresources
            }]
        }
    }))?)
}

fn widget_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("test.causeway.io", "v1alpha1", "Widget"), "widgets")
}

fn widget(name: &str, size: u32) -> anyhow::Result<DynamicObject> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "test.causeway.io/v1alpha1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"size": size},
        "status": {"ignored": "on create"}
    }))?)
}

fn generation(o: &DynamicObject) -> i64 {
    o.metadata.generation.unwrap_or_default()
}

#[tokio::test]
async fn crd_registration_then_custom_object_crud_and_status() -> anyhow::Result<()> {
    let (server, client) = start_default().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let ar = widget_resource();
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);

    // Not served before the CRD exists.
    let err = api_error(widgets.list(&ListParams::default()).await)?;
    assert_eq!(err.code, 404);

    crds.create(&PostParams::default(), &widget_crd(true)?).await?;
    let established = await_condition(crds.clone(), "widgets.test.causeway.io", conditions::is_crd_established());
    within("the CRD to be established", established).await??;

    // Discovery lists the new kind.
    let discovery = Discovery::new(client.clone()).run().await?;
    let (found, caps) = discovery
        .resolve_gvk(&GroupVersionKind::gvk("test.causeway.io", "v1alpha1", "Widget"))
        .ok_or_else(|| anyhow::anyhow!("Widget not discovered"))?;
    assert_eq!(found.plural, "widgets");
    assert!(caps.subresources.iter().any(|(sub, _)| sub.plural == "status"));

    // Create: status is dropped (status subresource), generation starts at 1.
    let created = widgets.create(&PostParams::default(), &widget("w1", 1)?).await?;
    assert_eq!(generation(&created), 1);
    assert!(created.data.get("status").is_none());

    // Spec change bumps generation; a status change through the main resource is ignored.
    let patched = widgets
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 2}, "status": {"phase": "ignored"}})),
        )
        .await?;
    assert_eq!(generation(&patched), 2);
    assert_eq!(patched.data["spec"]["size"], 2);
    assert!(patched.data.get("status").is_none());

    // The status subresource changes only status, and leaves generation alone.
    let with_status = widgets
        .patch_status(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 99}, "status": {"phase": "Ready"}})),
        )
        .await?;
    assert_eq!(with_status.data["status"]["phase"], "Ready");
    assert_eq!(with_status.data["spec"]["size"], 2);
    assert_eq!(generation(&with_status), 2);
    let got = widgets.get_status("w1").await?;
    assert_eq!(got.data["status"]["phase"], "Ready");

    // replace_status with the current object; and SSA on the status subresource.
    let mut next = got.clone();
    next.data["status"] = json!({"phase": "Degraded"});
    let replaced = widgets.replace_status("w1", &PostParams::default(), &next).await?;
    assert_eq!(replaced.data["status"]["phase"], "Degraded");
    let err = api_error(widgets.replace_status("w1", &PostParams::default(), &next).await)?;
    assert_eq!(err.code, 409, "stale resourceVersion on the status subresource");
    let applied = widgets
        .patch_status(
            "w1",
            &PatchParams::apply("causeway-test").force(),
            &Patch::Apply(json!({
                "apiVersion": "test.causeway.io/v1alpha1", "kind": "Widget",
                "metadata": {"name": "w1"},
                "status": {"phase": "Ready", "observedGeneration": 2}
            })),
        )
        .await?;
    assert_eq!(applied.data["status"]["observedGeneration"], 2);

    // List and watch custom objects.
    let list = widgets.list(&ListParams::default()).await?;
    assert_eq!(list.items.iter().map(|o| o.name_any()).collect::<Vec<_>>(), vec!["w1"]);
    let mut events = Box::pin(watcher(widgets.clone(), watcher::Config::default()));
    let mut names = Vec::new();
    while names.is_empty() {
        if let Some(watcher::Event::InitApply(o)) = within("widget list", events.try_next()).await?? {
            names.push(o.name_any());
        }
    }
    assert_eq!(names, vec!["w1"]);
    drop(events);

    // A cluster-wide view works too.
    let all: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    assert_eq!(all.list(&ListParams::default()).await?.items.len(), 1);

    // Deleting the CRD removes the kind and its objects.
    crds.delete("widgets.test.causeway.io", &DeleteParams::default()).await?;
    let err = api_error(widgets.get("w1").await)?;
    assert_eq!(err.code, 404);
    let err = api_error(widgets.list(&ListParams::default()).await)?;
    assert_eq!(err.code, 404);

    // Re-creating it starts empty.
    crds.create(&PostParams::default(), &widget_crd(false)?).await?;
    assert!(widgets.list(&ListParams::default()).await?.items.is_empty());
    // Without a status subresource, status is an ordinary field.
    let plain = widgets.create(&PostParams::default(), &widget("w2", 1)?).await?;
    assert_eq!(plain.data["status"]["ignored"], "on create");
    let err = api_error(widgets.get_status("w2").await)?;
    assert_eq!(err.code, 404);
    server.shutdown().await
}

#[tokio::test]
async fn invalid_crds_are_rejected() -> anyhow::Result<()> {
    let (server, client) = start_default().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut bad = widget_crd(false)?;
    bad.metadata.name = Some("wrong.name".into());
    let err = api_error(crds.create(&PostParams::default(), &bad).await)?;
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));

    let mut clash = widget_crd(false)?;
    clash.metadata.name = Some("pods".into());
    clash.spec.group = String::new();
    clash.spec.names.plural = "pods".into();
    let err = api_error(crds.create(&PostParams::default(), &clash).await)?;
    assert_eq!(err.code, 422);

    // The server still serves its built-ins.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::all(client);
    pods.list(&ListParams::default()).await?;
    server.shutdown().await
}
