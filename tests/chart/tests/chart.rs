//! The Helm chart in charts/causeway, rendered by a real `helm template`: every manifest parses into its
//! k8s-openapi type without losing a field, every container command line is accepted by the binary it runs, RBAC
//! grants exactly what each binary calls, the node agent gets the host access its datapath needs, Services select
//! their pods, the certificates Helm generates are usable for etcd mTLS, bad values are refused, and the chart's
//! CRDs are the generated ones.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context as _, Result};
use causeway::clustermesh as cli;
use causeway_chart_tests::{binary, check_command_line, helm_template, parse_manifests, Manifest};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

const NS: &str = "causeway";

/// Minimal values: what `causeway clustermesh enable` needs a cluster to have (name and ID); everything else default.
const MINIMAL: &str = "cluster:\n  name: east\n  id: 1\n";

/// Every option switched away from its default, so each template branch is rendered and checked.
const EVERYTHING: &str = r#"
monitoring:
  podMonitors: {enabled: true, interval: 15s, labels: {release: prom}}
  prometheusRules: {enabled: true, labels: {release: prom}}
cluster:
  name: west-2
  id: 300
  maxConnectedClusters: 511
logFormat: text
clustermesh:
  apiserver:
    peers: [east, north]
    enableMcsApi: true
    identityGcGrace: 1h
    service:
      type: LoadBalancer
      loadBalancerIP: 192.0.2.10
      loadBalancerSourceRanges: [198.51.100.0/24]
      annotations:
        service.beta.kubernetes.io/aws-load-balancer-internal: "true"
  tls:
    source: helm
    serverCertDnsNames: [mesh.west.example]
    serverCertIPs: [192.0.2.10]
identitySync:
  cacheTtl: 10m
  remoteReadyTimeout: 30s
  endpointSliceInterval: 100ms
  peersSecret: my-peers
egressGateway:
  podCidrs: [10.2.0.0/16]
  serviceCidrs: [10.102.0.0/16]
  meshPodCidrs:
    east: [10.1.0.0/16]
    north: [10.3.0.0/16, 10.33.0.0/16]
  probe: {rise: 2, fall: 4, holdDown: 10s, staleAfter: 1s, port: 9000, interval: 200ms}
  grpcPort: 19967
nodeAgent:
  podInterfacePrefix: lxc
  podInterfaces: [eth9]
  externalInterface: eth1
  enforceIdentityPolicy: true
  wireguard: {interface: wg-mesh, port: 51999}
  priorityClassName: ""
"#;

fn render(values: &str) -> Result<Vec<Manifest>> {
    parse_manifests(&helm_template(values, NS, &[])?)
}

fn one<'a>(ms: &'a [Manifest], kind: &str, name: &str) -> Result<&'a Manifest> {
    ms.iter().find(|m| m.kind == kind && m.name == name).with_context(|| {
        format!("no {kind} {name} rendered; have {:?}", ms.iter().map(|m| (&m.kind, &m.name)).collect::<Vec<_>>())
    })
}

fn typed<T: DeserializeOwned>(m: &Manifest) -> Result<T> {
    serde_json::from_value(m.doc.clone())
        .with_context(|| format!("{} {} does not parse as its API type", m.kind, m.name))
}

/// Drops what serialization legitimately leaves out (nulls, empty maps) so that a typed round trip can be compared
/// with what helm printed.
fn normalize(v: &Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), normalize(v)))
                .filter(|(_, v)| !matches!(v, Value::Object(m) if m.is_empty()))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(normalize).collect()),
        other => other.clone(),
    }
}

/// Parses the manifest into `T` and back: a field the API type does not know (a typo such as `hostNetwrok`, a
/// field at the wrong level) is dropped by the typed parse, so the round trip differs and the test names it.
fn round_trip<T: DeserializeOwned + Serialize>(m: &Manifest) -> Result<()> {
    let obj: T = typed(m)?;
    let back = normalize(&serde_json::to_value(&obj)?);
    let orig = normalize(&m.doc);
    if back != orig {
        bail!(
            "{} {} ({}) has fields its API type does not know:\n{}",
            m.kind,
            m.name,
            m.source,
            first_difference("", &orig, &back)
        );
    }
    Ok(())
}

fn first_difference(path: &str, a: &Value, b: &Value) -> String {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    None => return format!("{path}.{k} is not a field of the type"),
                    Some(w) if v != w => return first_difference(&format!("{path}.{k}"), v, w),
                    _ => {}
                }
            }
            format!("{path}: the typed object has extra fields")
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                if v != w {
                    return first_difference(&format!("{path}[{i}]"), v, w);
                }
            }
            format!("{path}: arrays differ")
        }
        _ => format!("{path}: {a} became {b}"),
    }
}

fn check_all_typed(ms: &[Manifest]) -> Result<()> {
    for m in ms {
        let api = m.doc["apiVersion"].as_str().unwrap_or("");
        match (api, m.kind.as_str()) {
            ("apps/v1", "Deployment") => round_trip::<Deployment>(m)?,
            ("apps/v1", "DaemonSet") => round_trip::<DaemonSet>(m)?,
            ("v1", "Service") => round_trip::<Service>(m)?,
            ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(m)?,
            ("v1", "Secret") => round_trip::<Secret>(m)?,
            ("v1", "ConfigMap") => round_trip::<ConfigMap>(m)?,
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(m)?,
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => round_trip::<ClusterRoleBinding>(m)?,
            ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(m)?,
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(m)?,
            // Prometheus Operator kinds: no typed API here; their required shape is checked instead.
            ("monitoring.coreos.com/v1", "PodMonitor") => check_pod_monitor(m)?,
            ("monitoring.coreos.com/v1", "PrometheusRule") => check_prometheus_rule(m)?,
            _ => bail!("{} {} has an apiVersion/kind this test does not check: {api} {}", m.kind, m.name, m.kind),
        }
    }
    Ok(())
}

fn pod_spec(ms: &[Manifest], kind: &str, name: &str) -> Result<PodSpec> {
    let m = one(ms, kind, name)?;
    let spec = match kind {
        "Deployment" => typed::<Deployment>(m)?.spec.and_then(|s| s.template.spec),
        "DaemonSet" => typed::<DaemonSet>(m)?.spec.and_then(|s| s.template.spec),
        _ => bail!("{kind} has no pod template"),
    };
    spec.with_context(|| format!("{kind} {name} has no pod spec"))
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> Result<&'a Container> {
    spec.containers.iter().find(|c| c.name == name).with_context(|| format!("no container {name}"))
}

fn arg_value<'a>(c: &'a Container, flag: &str) -> Option<&'a str> {
    c.args.iter().flatten().find_map(|a| a.strip_prefix(&format!("{flag}=")))
}

/// The data of ConfigMap `causeway-config`: the chart's when it renders one, else what `causeway clustermesh enable`
/// writes (a sample in the CLI's format).
fn cluster_config(ms: &[Manifest]) -> Result<BTreeMap<String, String>> {
    match ms.iter().find(|m| m.kind == "ConfigMap" && m.name == cli::CONFIG_MAP) {
        Some(m) => Ok(typed::<ConfigMap>(m)?.data.unwrap_or_default()),
        None => Ok(BTreeMap::from([
            (cli::KEY_CLUSTER_NAME.to_string(), "south".to_string()),
            (cli::KEY_CLUSTER_ID.to_string(), "7".to_string()),
            (cli::KEY_MAX_CONNECTED_CLUSTERS.to_string(), "255".to_string()),
            (cli::KEY_PEERS.to_string(), "east,west".to_string()),
        ])),
    }
}

/// The environment a container gets: literal values, the downward API (sample node name and IP) and keys of
/// `causeway-config`; so `$(VAR)` references and env fallbacks can be handed to the binary.
fn container_env(c: &Container, config: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    for e in c.env.iter().flatten() {
        let from = e.value_from.as_ref();
        let field = from.and_then(|f| f.field_ref.as_ref());
        let key = from.and_then(|f| f.config_map_key_ref.as_ref());
        let value = match (&e.value, field, key) {
            (Some(v), _, _) => v.clone(),
            (None, Some(f), _) if f.field_path == "spec.nodeName" => "node-a".to_string(),
            (None, Some(f), _) if f.field_path == "metadata.name" => "causeway-pod-0".to_string(),
            (None, Some(f), _) if f.field_path == "metadata.namespace" => NS.to_string(),
            (None, Some(f), _) if f.field_path == "status.hostIP" || f.field_path == "status.podIP" => {
                "10.0.0.7".to_string()
            }
            (None, Some(f), _) => bail!("{}: unexpected downward API field {}", e.name, f.field_path),
            (None, None, Some(k)) => {
                assert_eq!(k.name, cli::CONFIG_MAP, "{}: reads the ConfigMap the CLI writes", e.name);
                match config.get(&k.key) {
                    Some(v) => v.clone(),
                    // An optional key that is absent leaves the variable unset, as kubelet does.
                    None if k.optional == Some(true) => continue,
                    None => bail!("{}: causeway-config has no key {}", e.name, k.key),
                }
            }
            (None, None, None) => bail!("{}: a value source this test does not know", e.name),
        };
        env.insert(e.name.clone(), value);
    }
    Ok(env)
}

/// Every container that runs a Causeway binary, with that binary's name (the image's /usr/local/bin/<name>).
fn causeway_containers(ms: &[Manifest]) -> Result<Vec<(String, Container)>> {
    let mut out = Vec::new();
    for m in ms.iter().filter(|m| m.kind == "Deployment" || m.kind == "DaemonSet") {
        let spec = pod_spec(ms, &m.kind, &m.name)?;
        for c in spec.containers.iter() {
            let Some(bin) =
                c.command.as_ref().and_then(|cmd| cmd.first()).and_then(|p| p.strip_prefix("/usr/local/bin/"))
            else {
                continue;
            };
            out.push((format!("{bin}@{}/{}", m.name, c.name), c.clone()));
        }
    }
    Ok(out)
}

fn check_command_lines(ms: &[Manifest]) -> Result<BTreeSet<String>> {
    let mut seen = BTreeSet::new();
    let config = cluster_config(ms)?;
    for (label, c) in causeway_containers(ms)? {
        let bin = label.split('@').next().unwrap_or_default().to_string();
        let env = container_env(&c, &config)?;
        let args: Vec<String> = c.args.iter().flatten().map(|a| causeway_chart_tests::expand_vars(a, &env)).collect();
        check_command_line(&binary(&bin)?, &args, &env).with_context(|| format!("container {label}"))?;
        seen.insert(bin);
    }
    Ok(seen)
}

#[test]
fn minimal_values_render_every_component_as_valid_api_objects() -> Result<()> {
    let ms = render(MINIMAL)?;
    check_all_typed(&ms)?;
    let kinds: BTreeSet<(String, String)> = ms.iter().map(|m| (m.kind.clone(), m.name.clone())).collect();
    for (kind, name) in [
        ("Deployment", "clustermesh-apiserver"),
        ("Service", "clustermesh-apiserver"),
        ("Deployment", "identity-sync"),
        ("Service", "identity-sync"),
        ("Deployment", "egress-gw"),
        ("Service", "egress-gw"),
        ("DaemonSet", "causeway-node-agent"),
        ("ConfigMap", "causeway-config"),
    ] {
        assert!(kinds.contains(&(kind.to_string(), name.to_string())), "missing {kind} {name}");
    }
    // With certificates from `causeway clustermesh enable`, the chart must not create (and so overwrite) them.
    assert!(!ms.iter().any(|m| m.kind == "Secret"), "tls.source=secrets renders no Secret");
    for m in ms.iter().filter(|m| m.kind != "ClusterRole" && m.kind != "ClusterRoleBinding") {
        // egress-gw records Events in "default" only; everything else lives in the release namespace.
        let expected = if m.kind.starts_with("Role") && m.name.ends_with("-events") { "default" } else { NS };
        assert_eq!(m.namespace.as_deref(), Some(expected), "{} {} namespace", m.kind, m.name);
    }
    Ok(())
}

#[test]
fn every_option_renders_as_valid_api_objects() -> Result<()> {
    let ms = render(EVERYTHING)?;
    check_all_typed(&ms)?;
    assert_eq!(ms.iter().filter(|m| m.kind == "Secret").count(), 3, "CA, server and admin Secrets");
    Ok(())
}

#[test]
fn every_container_command_line_is_accepted_by_its_binary() -> Result<()> {
    for (what, values) in [("minimal", MINIMAL), ("everything", EVERYTHING)] {
        let ms = render(values)?;
        let seen = check_command_lines(&ms).with_context(|| format!("{what} values"))?;
        let expected: BTreeSet<String> = ["clustermesh-apiserver", "identity-sync", "egress-gw", "causeway-node-agent"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(seen, expected, "{what}: every binary is run by the chart and checked");
    }
    Ok(())
}

#[test]
fn the_command_line_check_rejects_unknown_flags_bad_values_and_missing_required_flags() -> Result<()> {
    // The check above must be able to fail: a flag the binary lacks, a value its parser refuses, a required flag
    // that is missing.
    let ms = render(MINIMAL)?;
    let spec = pod_spec(&ms, "Deployment", "egress-gw")?;
    let c = container(&spec, "egress-gw")?;
    let bin = binary("egress-gw")?;
    let args: Vec<String> = c.args.iter().flatten().cloned().collect();
    let env = container_env(c, &cluster_config(&ms)?)?;
    check_command_line(&bin, &args, &env).context("the chart's own arguments")?;

    let mut unknown = args.clone();
    unknown.push("--no-such-flag=1".into());
    let err = check_command_line(&bin, &unknown, &env).expect_err("unknown flag accepted");
    assert!(format!("{err:#}").contains("--no-such-flag"), "{err:#}");

    let bad_value: Vec<String> = args
        .iter()
        .map(|a| if a.starts_with("--hold-down=") { "--hold-down=soon".into() } else { a.clone() })
        .collect();
    let err = check_command_line(&bin, &bad_value, &env).expect_err("bad value accepted");
    assert!(format!("{err:#}").contains("hold-down"), "{err:#}");

    // identity-sync takes --cluster-name from the ConfigMap through its env fallback: without it, it is missing.
    let spec = pod_spec(&ms, "Deployment", "identity-sync")?;
    let c = container(&spec, "identity-sync")?;
    let bin = binary("identity-sync")?;
    let args: Vec<String> = c.args.iter().flatten().cloned().collect();
    let mut env = container_env(c, &cluster_config(&ms)?)?;
    check_command_line(&bin, &args, &env).context("the chart's own arguments")?;
    env.remove("CAUSEWAY_CLUSTER_NAME");
    let err = check_command_line(&bin, &args, &env).expect_err("missing required flag accepted");
    assert!(format!("{err:#}").contains("--cluster-name"), "{err:#}");

    // The node agent takes its node name and IP from the downward API through env fallbacks: without them the
    // required flags are missing.
    let spec = pod_spec(&ms, "DaemonSet", "causeway-node-agent")?;
    let agent = container(&spec, "node-agent")?;
    let args: Vec<String> = agent.args.iter().flatten().cloned().collect();
    let err = check_command_line(&binary("causeway-node-agent")?, &args, &BTreeMap::new())
        .expect_err("node agent without node name accepted");
    assert!(format!("{err:#}").contains("--node-"), "{err:#}");
    Ok(())
}

/// (apiGroup, resource, verbs) of every rule, flattened, so order and grouping do not matter.
fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for r in rules {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    out.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
        assert!(r.resource_names.is_none() && r.non_resource_urls.is_none(), "unexpected rule shape {r:?}");
    }
    out
}

/// Like [`grants`], for roles whose rules may name their objects: (apiGroup, resource, verb, resourceName), with
/// `*` for a rule that names none.
fn named_grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String, String)> {
    let mut out = BTreeSet::new();
    for r in rules {
        assert!(r.non_resource_urls.is_none(), "unexpected rule shape {r:?}");
        let names = r.resource_names.clone().unwrap_or_else(|| vec!["*".to_string()]);
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    for n in &names {
                        out.insert((g.clone(), res.clone(), v.clone(), n.clone()));
                    }
                }
            }
        }
    }
    out
}

fn set(items: &[(&str, &str, &[&str])]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for (g, r, verbs) in items {
        for v in *verbs {
            out.insert((g.to_string(), r.to_string(), v.to_string()));
        }
    }
    out
}

fn cluster_role(ms: &[Manifest], name: &str) -> Result<BTreeSet<(String, String, String)>> {
    let role: ClusterRole = typed(one(ms, "ClusterRole", name)?)?;
    Ok(grants(role.rules.as_deref().unwrap_or_default()))
}

/// Components that run replicas with leader election (`causeway-leader`): each gets create on leases and get/update
/// on its own Lease only, in the release namespace; its Deployment passes `--leader-elect` and the pod's namespace.
const LEADER_ELECTED: &[(&str, &str, &str)] = &[
    ("egress-gw", "causeway-egress-gw", "causeway-egress-gw"),
    ("identity-sync", "causeway-identity-sync", "causeway-identity-sync"),
];

#[test]
fn leader_elected_components_may_touch_only_their_own_lease() -> Result<()> {
    let ms = render(MINIMAL)?;
    for (deployment, sa, lease) in LEADER_ELECTED {
        let role_name = format!("{sa}-leader");
        let role: Role = typed(one(&ms, "Role", &role_name)?)?;
        assert_eq!(role.metadata.namespace.as_deref(), Some(NS), "{role_name}");
        let lg = "coordination.k8s.io".to_string();
        let want: BTreeSet<(String, String, String, String)> = [
            (lg.clone(), "leases".to_string(), "create".to_string(), "*".to_string()),
            (lg.clone(), "leases".to_string(), "get".to_string(), lease.to_string()),
            (lg, "leases".to_string(), "update".to_string(), lease.to_string()),
        ]
        .into_iter()
        .collect();
        assert_eq!(named_grants(role.rules.as_deref().unwrap_or_default()), want, "{role_name}");
        let b: RoleBinding = typed(one(&ms, "RoleBinding", &role_name)?)?;
        let subjects = b.subjects.unwrap_or_default();
        assert_eq!(
            (b.role_ref.name.as_str(), subjects.len(), subjects.first().map(|s| s.name.as_str())),
            (role_name.as_str(), 1, Some(*sa))
        );
        // A standby by default, and a rollout that never leaves it without a running replica.
        let d: Deployment = typed(one(&ms, "Deployment", deployment)?)?;
        let ds = d.spec.context("Deployment spec")?;
        assert_eq!(ds.replicas, Some(2), "{deployment} replicas");
        let rolling = ds.strategy.and_then(|s| s.rolling_update);
        assert_eq!(
            rolling.and_then(|r| r.max_unavailable),
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0)),
            "{deployment} rollout strategy"
        );
        let spec = pod_spec(&ms, "Deployment", deployment)?;
        let c = container(&spec, deployment)?;
        assert!(c.args.iter().flatten().any(|a| a == "--leader-elect"), "{deployment} runs without --leader-elect");
        let env = c.env.clone().unwrap_or_default();
        for var in ["POD_NAMESPACE", "POD_NAME"] {
            assert!(
                env.iter().any(|e| e.name == var && e.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).is_some()),
                "{deployment}: {var} from the downward API"
            );
        }
        assert_eq!(
            arg_value(c, "--leader-elect-lease-name"),
            None,
            "the binary's default Lease name is the one RBAC names"
        );
    }
    Ok(())
}

#[test]
fn rbac_grants_each_component_exactly_the_calls_its_binary_makes() -> Result<()> {
    const LW: &[&str] = &["list", "watch"];
    let ms = render(MINIMAL)?;
    // clustermesh-apiserver/src/kube/mod.rs (watchers) and src/identity/kube.rs (identity objects).
    let apiserver = set(&[
        ("", "namespaces", LW),
        ("", "pods", LW),
        ("", "nodes", LW),
        ("", "services", LW),
        ("discovery.k8s.io", "endpointslices", LW),
        ("causeway.io", "causewayidentities", &["list", "get", "create", "delete"]),
        ("causeway.io", "causewayidentities/status", &["patch"]),
        // src/workloads/server.rs: registration (get, status patch) and the watcher (list, watch).
        ("causeway.io", "externalworkloads", &["get", "list", "watch"]),
        ("causeway.io", "externalworkloads/status", &["patch"]),
    ]);
    assert_eq!(cluster_role(&ms, "causeway-clustermesh-apiserver")?, apiserver);
    // src/peers.rs: the one ConfigMap the peers are kept in, watched by name, in the release namespace only.
    let peers: Role = typed(one(&ms, "Role", "causeway-clustermesh-apiserver-peers")?)?;
    assert_eq!(peers.metadata.namespace.as_deref(), Some(NS));
    let want: BTreeSet<(String, String, String, String)> = ["get", "list", "watch"]
        .into_iter()
        .map(|v| (String::new(), "configmaps".to_string(), v.to_string(), cli::CONFIG_MAP.to_string()))
        .collect();
    assert_eq!(named_grants(peers.rules.as_deref().unwrap_or_default()), want);
    let b: RoleBinding = typed(one(&ms, "RoleBinding", "causeway-clustermesh-apiserver-peers")?)?;
    assert_eq!(b.metadata.namespace.as_deref(), Some(NS));
    assert_eq!((b.role_ref.kind.as_str(), b.role_ref.name.as_str()), ("Role", "causeway-clustermesh-apiserver-peers"));
    let subjects = b.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(
        (subjects[0].kind.as_str(), subjects[0].name.as_str(), subjects[0].namespace.as_deref()),
        ("ServiceAccount", "causeway-clustermesh-apiserver", Some(NS))
    );
    // ...which is the ConfigMap the apiserver is told to watch.
    let spec = pod_spec(&ms, "Deployment", "clustermesh-apiserver")?;
    assert_eq!(
        arg_value(container(&spec, "clustermesh-apiserver")?, "--peers-configmap"),
        Some(format!("{NS}/{}", cli::CONFIG_MAP).as_str())
    );
    // identity-sync/src/kube: watch Services and EndpointSlices, server-side apply (patch + create) and delete slices,
    // watch ExternalWorkloads (src/kube/workloads.rs).
    let sync = set(&[
        ("", "services", LW),
        ("discovery.k8s.io", "endpointslices", &["list", "watch", "create", "patch", "delete"]),
        ("causeway.io", "externalworkloads", LW),
    ]);
    assert_eq!(cluster_role(&ms, "causeway-identity-sync")?, sync);
    // Without the ExternalWorkload watcher, neither the flag's default nor the grant.
    let off = render(&format!("{MINIMAL}identitySync:\n  watchExternalWorkloads: false\n"))?;
    let mut without = sync.clone();
    without.retain(|(_, r, _)| r != "externalworkloads");
    assert_eq!(cluster_role(&off, "causeway-identity-sync")?, without);
    for (ms, want) in [(&ms, "--watch-external-workloads=true"), (&off, "--watch-external-workloads=false")] {
        let spec = pod_spec(ms, "Deployment", "identity-sync")?;
        assert!(container(&spec, "identity-sync")?.args.iter().flatten().any(|a| a == want), "{want}");
    }
    // egress-gw/src/kube/mod.rs: watchers and the status merge patch; Events through a Role in "default" only.
    assert_eq!(
        cluster_role(&ms, "causeway-egress-gw")?,
        set(&[
            ("", "pods", LW),
            ("", "namespaces", LW),
            ("", "nodes", LW),
            ("causeway.io", "egressgatewaypolicies", LW),
            ("causeway.io", "egressgatewaypolicies/status", &["patch"]),
        ])
    );
    let events: Role = typed(one(&ms, "Role", "causeway-egress-gw-events")?)?;
    assert_eq!(events.metadata.namespace.as_deref(), Some("default"));
    assert_eq!(
        grants(events.rules.as_deref().unwrap_or_default()),
        set(&[("events.k8s.io", "events", &["create", "patch"])])
    );

    // The MCS API switch adds exactly the ServiceExport watch.
    let mcs = render(&format!("{MINIMAL}clustermesh:\n  apiserver:\n    enableMcsApi: true\n"))?;
    let mut with_mcs = apiserver.clone();
    with_mcs.extend(set(&[("multicluster.x-k8s.io", "serviceexports", LW)]));
    assert_eq!(cluster_role(&mcs, "causeway-clustermesh-apiserver")?, with_mcs);

    // Each binding gives its role to its component's ServiceAccount and to nothing else.
    for (workload, name) in [
        ("clustermesh-apiserver", "causeway-clustermesh-apiserver"),
        ("identity-sync", "causeway-identity-sync"),
        ("egress-gw", "causeway-egress-gw"),
    ] {
        let b: ClusterRoleBinding = typed(one(&ms, "ClusterRoleBinding", name)?)?;
        assert_eq!(b.role_ref.name, name);
        let subjects = b.subjects.unwrap_or_default();
        assert_eq!(subjects.len(), 1, "{name}");
        assert_eq!((subjects[0].kind.as_str(), subjects[0].name.as_str()), ("ServiceAccount", name));
        assert_eq!(subjects[0].namespace.as_deref(), Some(NS));
        let spec = pod_spec(&ms, "Deployment", workload)?;
        assert_eq!(spec.service_account_name.as_deref(), Some(name), "{workload} runs as its own ServiceAccount");
    }
    // The node agent's one kube call is the merge patch of its Node's annotations (datapath/src/egress/publish.rs),
    // made only with --publish-interfaces, which the chart passes when egress gateways are on.
    assert_eq!(cluster_role(&ms, "causeway-node-agent")?, set(&[("", "nodes", &["patch"])]));
    let spec = pod_spec(&ms, "DaemonSet", "causeway-node-agent")?;
    assert_eq!(spec.automount_service_account_token, Some(true));
    assert!(container(&spec, "node-agent")?.args.iter().flatten().any(|a| a == "--publish-interfaces"));
    // Without egress gateways it does not call the kube API: no token, no role, no binding.
    let ms = render(&format!("{MINIMAL}egressGateway: {{enabled: false}}\n"))?;
    let spec = pod_spec(&ms, "DaemonSet", "causeway-node-agent")?;
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert!(!container(&spec, "node-agent")?.args.iter().flatten().any(|a| a == "--publish-interfaces"));
    assert!(!ms.iter().any(|m| m.kind.starts_with("ClusterRole") && m.name == "causeway-node-agent"));
    Ok(())
}

/// The (apiGroup, resource) of every Kubernetes type a component's non-test source names in `Api<T>` /
/// `Api::<T>`, plus Events when it makes a `Recorder`: the resources its ClusterRole must cover, read from the code.
fn resources_in_source(dirs: &[&str]) -> Result<BTreeSet<(String, String)>> {
    Ok(resource_uses(dirs)?.into_keys().collect())
}

/// Like [`resources_in_source`], with whether a file naming the resource also runs a kube-rs `watcher(` (which
/// needs list and watch).
fn resource_uses(dirs: &[&str]) -> Result<BTreeMap<(String, String), bool>> {
    let mut files = Vec::new();
    let mut stack: Vec<std::path::PathBuf> = dirs.iter().map(|d| causeway_chart_tests::repo_root().join(d)).collect();
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        } else if p.extension().is_some_and(|e| e == "rs") {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if !(name == "tests.rs" || name.ends_with("_tests.rs")) {
                files.push(p);
            }
        }
    }
    let mut out: BTreeMap<(String, String), bool> = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        let watches = text.contains("watcher(");
        if text.contains("Recorder::new(") {
            out.entry(("events.k8s.io".to_string(), "events".to_string())).or_insert(false);
        }
        for pat in ["Api::<", "Api<"] {
            for (i, _) in text.match_indices(pat) {
                let ident: String =
                    text[i + pat.len()..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                let r = match ident.as_str() {
                    "Namespace" | "KNamespace" => ("", "namespaces"),
                    "Pod" | "KPod" => ("", "pods"),
                    "Node" | "KNode" => ("", "nodes"),
                    "Service" | "KService" => ("", "services"),
                    "EndpointSlice" => ("discovery.k8s.io", "endpointslices"),
                    "CausewayIdentity" => ("causeway.io", "causewayidentities"),
                    "EgressGatewayPolicy" => ("causeway.io", "egressgatewaypolicies"),
                    "ExternalWorkload" => ("causeway.io", "externalworkloads"),
                    "ConfigMap" => ("", "configmaps"),
                    // The ServiceExport watch (a DynamicObject) is checked with enableMcsApi above; `K` is a generic.
                    "DynamicObject" | "K" => continue,
                    other => bail!("{}: Api<{other}>: a kind this test cannot map to a resource; add it", f.display()),
                };
                *out.entry((r.0.to_string(), r.1.to_string())).or_insert(false) |= watches;
            }
        }
    }
    Ok(out)
}

#[test]
fn every_kind_a_component_calls_is_in_its_role_and_no_other() -> Result<()> {
    let ms = render(MINIMAL)?;
    let roles = |names: &[&str]| -> Result<BTreeSet<(String, String)>> {
        let mut out = BTreeSet::new();
        for name in names {
            let m = ms.iter().find(|m| (m.kind == "ClusterRole" || m.kind == "Role") && m.name == *name);
            let m = m.with_context(|| format!("no role {name}"))?;
            let rules: Vec<PolicyRule> = serde_json::from_value(m.doc["rules"].clone())?;
            // Subresources (status) belong to their resource; a rule naming its objects grants its resource too.
            out.extend(
                named_grants(&rules)
                    .into_iter()
                    .map(|(g, r, _, _)| (g, r.split('/').next().unwrap_or_default().to_string())),
            );
        }
        Ok(out)
    };
    for (dirs, role_names) in [
        (
            &["clustermesh-apiserver/src"][..],
            &["causeway-clustermesh-apiserver", "causeway-clustermesh-apiserver-peers"][..],
        ),
        (&["identity-sync/src"][..], &["causeway-identity-sync"][..]),
        (&["egress-gw/src"][..], &["causeway-egress-gw", "causeway-egress-gw-events"][..]),
        (&["datapath/src"][..], &["causeway-node-agent"][..]),
    ] {
        assert_eq!(roles(role_names)?, resources_in_source(dirs)?, "{dirs:?}: resources in the code vs the role");
        // A resource a watcher follows needs list and watch.
        for ((group, resource), watched) in resource_uses(dirs)? {
            if !watched {
                continue;
            }
            // Across the component's roles (a ClusterRole, or a Role naming the one object watched).
            let mut g = BTreeSet::new();
            for name in role_names {
                for m in ms.iter().filter(|m| (m.kind == "ClusterRole" || m.kind == "Role") && m.name == *name) {
                    let rules: Vec<PolicyRule> = serde_json::from_value(m.doc["rules"].clone())?;
                    g.extend(named_grants(&rules).into_iter().map(|(g, r, v, _)| (g, r, v)));
                }
            }
            for verb in ["list", "watch"] {
                assert!(
                    g.contains(&(group.clone(), resource.clone(), verb.to_string())),
                    "{role_names:?}: {dirs:?} runs a watcher on {group}/{resource}, which needs {verb}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn node_agent_gets_the_host_access_its_datapath_needs() -> Result<()> {
    let ms = render(EVERYTHING)?;
    let spec = pod_spec(&ms, "DaemonSet", "causeway-node-agent")?;
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"), "resolves the Service names it dials");
    let agent = container(&spec, "node-agent")?;
    assert_eq!(agent.security_context.as_ref().and_then(|s| s.privileged), Some(true));
    let host_paths: BTreeMap<String, String> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.clone(), v.host_path.as_ref()?.path.clone())))
        .collect();
    let mounts: BTreeMap<String, String> =
        agent.volume_mounts.iter().flatten().map(|m| (m.mount_path.clone(), m.name.clone())).collect();
    let host_of = |path: &str| mounts.get(path).and_then(|v| host_paths.get(v)).cloned();
    assert_eq!(host_of("/sys/fs/bpf").as_deref(), Some("/sys/fs/bpf"), "bpffs from the host");
    assert_eq!(host_of("/dev/net/tun").as_deref(), Some("/dev/net/tun"), "TUN for userspace WireGuard");
    let state = arg_value(agent, "--state-dir").context("--state-dir")?;
    assert_eq!(host_of(state).as_deref(), Some(state), "state dir (shadow journal, WireGuard key) on the host");
    let bpffs = arg_value(agent, "--bpffs-root").context("--bpffs-root")?;
    assert!(bpffs.starts_with("/sys/fs/bpf/"), "pins go to the mounted bpffs, not {bpffs}");
    // It dials the Services the chart creates, on their ports.
    let sync_svc: Service = typed(one(&ms, "Service", "identity-sync")?)?;
    let sync_port = sync_svc.spec.as_ref().and_then(|s| s.ports.as_ref()).and_then(|p| p.first()).map(|p| p.port);
    assert_eq!(
        arg_value(agent, "--identity-sync-addr"),
        Some(format!("http://identity-sync.{NS}.svc:{}", sync_port.unwrap_or_default()).as_str())
    );
    let egress_svc: Service = typed(one(&ms, "Service", "egress-gw")?)?;
    let egress_port = egress_svc.spec.as_ref().and_then(|s| s.ports.as_ref()).and_then(|p| p.first()).map(|p| p.port);
    assert_eq!(
        arg_value(agent, "--egress-addr"),
        Some(format!("http://egress-gw.{NS}.svc:{}", egress_port.unwrap_or_default()).as_str())
    );
    assert_eq!(arg_value(agent, "--external-interface"), Some("eth1"));
    // egress-gw serves the stream on the port its Service targets, and probes the port the agents answer on.
    let egw = pod_spec(&ms, "Deployment", "egress-gw")?;
    let egw = container(&egw, "egress-gw")?;
    let grpc_port = egw.ports.iter().flatten().find(|p| p.name.as_deref() == Some("grpc")).map(|p| p.container_port);
    assert_eq!(arg_value(egw, "--grpc-addr"), Some(format!("0.0.0.0:{}", grpc_port.unwrap_or_default()).as_str()));
    assert_eq!(egress_port, Some(19967));
    assert_eq!(arg_value(egw, "--probe-port"), Some("9000"));
    assert_eq!(arg_value(agent, "--probe-addr"), Some("0.0.0.0:9000"));
    // The init container mounts a bpffs when the host has none, and propagates it back to the host.
    let init = spec.init_containers.as_ref().and_then(|c| c.first()).context("mount-bpf-fs init container")?;
    let m = init.volume_mounts.iter().flatten().find(|m| m.mount_path == "/sys/fs/bpf").context("bpffs mount")?;
    assert_eq!(m.mount_propagation.as_deref(), Some("Bidirectional"));
    Ok(())
}

/// The Service's selector matches its pods' labels and its target port names a container port.
fn check_service_targets(ms: &[Manifest], svc_name: &str, kind: &str, workload: &str) -> Result<Service> {
    let svc: Service = typed(one(ms, "Service", svc_name)?)?;
    let spec = svc.spec.clone().context("service spec")?;
    let selector = spec.selector.clone().unwrap_or_default();
    let m = one(ms, kind, workload)?;
    let labels: BTreeMap<String, String> =
        serde_json::from_value(m.doc["spec"]["template"]["metadata"]["labels"].clone()).context("pod labels")?;
    assert!(!selector.is_empty(), "{svc_name} selects something");
    for (k, v) in &selector {
        assert_eq!(labels.get(k), Some(v), "{svc_name} selector {k}={v} matches the {workload} pods");
    }
    let pod = pod_spec(ms, kind, workload)?;
    let port_names: BTreeSet<String> =
        pod.containers.iter().flat_map(|c| c.ports.iter().flatten()).filter_map(|p| p.name.clone()).collect();
    for p in spec.ports.iter().flatten() {
        let target = match &p.target_port {
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s)) => s.clone(),
            other => bail!("{svc_name} port {} targets {other:?}, not a named container port", p.port),
        };
        assert!(port_names.contains(&target), "{svc_name} targets port {target}; pods have {port_names:?}");
    }
    Ok(svc)
}

#[test]
fn services_select_their_pods_and_the_apiserver_service_type_follows_values() -> Result<()> {
    let ms = render(MINIMAL)?;
    let svc = check_service_targets(&ms, cli::APISERVER_SERVICE, "Deployment", "clustermesh-apiserver")?;
    let spec = svc.spec.context("spec")?;
    assert_eq!(spec.type_.as_deref(), Some("NodePort"));
    assert_eq!(spec.ports.as_ref().and_then(|p| p.first()).and_then(|p| p.node_port), Some(32379));
    check_service_targets(&ms, "identity-sync", "Deployment", "identity-sync")?;
    check_service_targets(&ms, "egress-gw", "Deployment", "egress-gw")?;

    let lb = render(EVERYTHING)?;
    let svc = check_service_targets(&lb, cli::APISERVER_SERVICE, "Deployment", "clustermesh-apiserver")?;
    let spec = svc.spec.context("spec")?;
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(spec.load_balancer_ip.as_deref(), Some("192.0.2.10"));
    assert_eq!(spec.ports.as_ref().and_then(|p| p.first()).and_then(|p| p.node_port), None);
    Ok(())
}

#[test]
fn apiserver_runs_etcd_as_a_sidecar_with_client_certificate_auth() -> Result<()> {
    let ms = render(EVERYTHING)?;
    let spec = pod_spec(&ms, "Deployment", "clustermesh-apiserver")?;
    let etcd = container(&spec, "etcd")?;
    let api = container(&spec, "clustermesh-apiserver")?;
    let etcd_args: Vec<&str> = etcd.command.iter().flatten().map(String::as_str).collect();
    assert!(etcd_args.contains(&"--client-cert-auth"), "{etcd_args:?}");
    assert!(etcd_args.contains(&"--listen-client-urls=https://0.0.0.0:2379"), "TLS on the client port");

    // Secret volume name → secret name, and mount path → volume for each container.
    let secrets: BTreeMap<String, String> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.clone(), v.secret.as_ref()?.secret_name.clone()?)))
        .collect();
    let secret_of = |c: &Container, file: &str| -> Option<(String, String)> {
        let m = c.volume_mounts.iter().flatten().find(|m| file.starts_with(&format!("{}/", m.mount_path)))?;
        let key = file.strip_prefix(&format!("{}/", m.mount_path))?.to_string();
        Some((secrets.get(&m.name)?.clone(), key))
    };
    for flag in ["--cert-file", "--key-file", "--trusted-ca-file"] {
        let file = etcd_args.iter().find_map(|a| a.strip_prefix(&format!("{flag}="))).context(flag)?;
        let (secret, key) =
            secret_of(etcd, file).with_context(|| format!("etcd {flag} {file} is not in a mounted Secret"))?;
        assert_eq!(secret, cli::SERVER_SECRET);
        assert!(["tls.crt", "tls.key", "ca.crt"].contains(&key.as_str()), "{key}");
    }
    for flag in ["--etcd-ca", "--etcd-cert", "--etcd-key"] {
        let file = arg_value(api, flag).context(flag)?;
        let (secret, _) =
            secret_of(api, file).with_context(|| format!("apiserver {flag} {file} is not in a mounted Secret"))?;
        assert_eq!(secret, cli::ADMIN_SECRET);
    }
    assert_eq!(arg_value(api, "--etcd-endpoints"), Some("https://127.0.0.1:2379"));
    // The external-workload registration service serves the server certificate and trusts the mesh CA.
    for flag in ["--workloads-tls-ca", "--workloads-tls-cert", "--workloads-tls-key"] {
        let file = arg_value(api, flag).context(flag)?;
        let (secret, _) =
            secret_of(api, file).with_context(|| format!("apiserver {flag} {file} is not in a mounted Secret"))?;
        assert_eq!(secret, cli::SERVER_SECRET);
    }
    let svc: Service = typed(one(&ms, "Service", cli::APISERVER_SERVICE)?)?;
    let port = arg_value(api, "--workloads-addr").and_then(|a| a.rsplit(':').next()).context("--workloads-addr")?;
    assert!(
        svc.spec
            .and_then(|s| s.ports)
            .unwrap_or_default()
            .iter()
            .any(|p| p.name.as_deref() == Some("workloads") && p.port.to_string() == port),
        "the Service exposes the registration port"
    );
    assert_eq!(arg_value(api, "--peers"), Some("east,north"));
    // identity-sync reads the peer config Secret as a directory at its --remotes-dir, and starts without it.
    let sync = pod_spec(&ms, "Deployment", "identity-sync")?;
    let c = container(&sync, "identity-sync")?;
    let dir = arg_value(c, "--remotes-dir").context("--remotes-dir")?;
    let mount = c.volume_mounts.iter().flatten().find(|m| m.mount_path == dir).context("remotes mount")?;
    let vol = sync.volumes.iter().flatten().find(|v| v.name == mount.name).context("remotes volume")?;
    let secret = vol.secret.as_ref().context("remotes volume is a Secret")?;
    assert_eq!(secret.secret_name.as_deref(), Some("my-peers"));
    assert_eq!(secret.optional, Some(true));
    Ok(())
}

fn pem_der(data: &BTreeMap<String, k8s_openapi::ByteString>, key: &str) -> Result<Vec<u8>> {
    let bytes = &data.get(key).with_context(|| format!("no {key}"))?.0;
    let (_, pem) = x509_parser::pem::parse_x509_pem(bytes).map_err(|e| anyhow::anyhow!("{key} is not PEM: {e}"))?;
    Ok(pem.contents)
}

#[test]
fn helm_generated_certificates_name_the_service_and_chain_to_the_ca() -> Result<()> {
    use x509_parser::prelude::*;
    let ms = render(EVERYTHING)?;
    let data = |name: &str| -> Result<BTreeMap<String, k8s_openapi::ByteString>> {
        let s: Secret = typed(one(&ms, "Secret", name)?)?;
        Ok(s.data.unwrap_or_default())
    };
    let ca_data = data(cli::CA_SECRET)?;
    assert!(
        ca_data.contains_key(cli::CA_KEY_FILE),
        "the CA key is kept for `clustermesh connect` to sign remote certs"
    );
    let ca_der = pem_der(&ca_data, "ca.crt")?;
    let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|e| anyhow::anyhow!("CA: {e}"))?;
    assert!(ca.is_ca());

    let server_data = data(cli::SERVER_SECRET)?;
    let server_der = pem_der(&server_data, "tls.crt")?;
    let (_, server) = X509Certificate::from_der(&server_der).map_err(|e| anyhow::anyhow!("server: {e}"))?;
    server.verify_signature(Some(ca.public_key())).map_err(|e| anyhow::anyhow!("server not signed by the CA: {e}"))?;
    let san = server.subject_alternative_name().ok().flatten().context("server SANs")?;
    let mut dns = BTreeSet::new();
    let mut ips = BTreeSet::new();
    for n in &san.value.general_names {
        match n {
            GeneralName::DNSName(d) => {
                dns.insert(d.to_string());
            }
            GeneralName::IPAddress(ip) => {
                ips.insert(ip.to_vec());
            }
            _ => {}
        }
    }
    for name in [
        cli::APISERVER_SERVICE.to_string(),
        format!("{}.{NS}.svc", cli::APISERVER_SERVICE),
        "mesh.west.example".to_string(),
    ] {
        assert!(dns.contains(&name), "server certificate lacks {name}: {dns:?}");
    }
    assert!(ips.contains(&vec![127, 0, 0, 1]), "loopback, for the apiserver in the same pod");
    assert!(ips.contains(&vec![192, 0, 2, 10]), "the LoadBalancer IP from values");

    let admin_data = data(cli::ADMIN_SECRET)?;
    let admin_der = pem_der(&admin_data, "tls.crt")?;
    let (_, admin) = X509Certificate::from_der(&admin_der).map_err(|e| anyhow::anyhow!("admin: {e}"))?;
    admin.verify_signature(Some(ca.public_key())).map_err(|e| anyhow::anyhow!("admin not signed by the CA: {e}"))?;
    let cn: Vec<&str> = admin.subject().iter_common_name().filter_map(|c| c.as_str().ok()).collect();
    assert_eq!(cn, vec!["root"], "etcd takes the user from the CN; creating peer users needs root");
    let eku = admin.extended_key_usage().ok().flatten().context("admin EKU")?;
    assert!(eku.value.client_auth, "a client certificate");
    // Every Secret carries the same CA that etcd trusts.
    assert_eq!(pem_der(&server_data, "ca.crt")?, ca_der);
    assert_eq!(pem_der(&admin_data, "ca.crt")?, ca_der);
    Ok(())
}

#[test]
fn bad_values_are_refused_with_a_clear_message() -> Result<()> {
    for (values, expect) in [
        ("cluster: {id: 3}", "set both, or neither"),
        ("cluster: {name: default, id: 1}", "must not be \"default\""),
        ("cluster: {name: East, id: 1}", "use a-z"),
        ("cluster: {name: east, id: 0}", "cluster.id must be between 1 and 255"),
        ("cluster: {name: east, id: 256}", "cluster.id must be between 1 and 255"),
        ("cluster: {name: east, id: 1, maxConnectedClusters: 300}", "must be 255 or 511"),
        (
            "cluster: {name: east, id: 1}\nclustermesh: {apiserver: {service: {type: ExternalName}}}",
            "must be NodePort, LoadBalancer or ClusterIP",
        ),
        ("cluster: {name: east, id: 1}\nclustermesh: {tls: {source: vault}}", "must be \"secrets\" or \"helm\""),
        (
            "cluster: {name: east, id: 1}\nidentitySync: {enabled: false}\negressGateway: {enabled: false}",
            "no stream to follow",
        ),
        ("cluster: {name: east, id: 1}\nnodeAgent: {podInterfacePrefix: \"\"}", "refuses to guess which interfaces"),
        (
            "cluster: {name: east, id: 1}\nclustermesh: {apiserver: {replicas: 2}}",
            "clustermesh.apiserver.replicas must be 1, not 2",
        ),
    ] {
        let err = helm_template(values, NS, &[]).map(|_| ()).expect_err(values);
        assert!(format!("{err:#}").contains(expect), "values {values:?}: expected {expect:?} in {err:#}");
    }
    // ClusterIP (flat networks) is allowed.
    render(&format!("{MINIMAL}clustermesh: {{apiserver: {{service: {{type: ClusterIP}}}}}}"))?;
    Ok(())
}

#[test]
fn components_can_be_turned_off() -> Result<()> {
    // External workloads off: no registration flags and no ExternalWorkload rights.
    let ms = render(&format!("{MINIMAL}clustermesh: {{apiserver: {{externalWorkloads: {{enabled: false}}}}}}\n"))?;
    let spec = pod_spec(&ms, "Deployment", "clustermesh-apiserver")?;
    assert_eq!(arg_value(container(&spec, "clustermesh-apiserver")?, "--workloads-addr"), None);
    let role = cluster_role(&ms, "causeway-clustermesh-apiserver")?;
    assert!(!role.iter().any(|(_, r, _)| r.starts_with("externalworkloads")), "{role:?}");
    check_command_lines(&ms)?;

    let ms = render(&format!(
        "{MINIMAL}egressGateway: {{enabled: false}}\nclustermesh: {{apiserver: {{enabled: false}}}}\n"
    ))?;
    check_all_typed(&ms)?;
    assert!(!ms.iter().any(|m| m.name.contains("egress-gw") || m.name.contains("clustermesh-apiserver")));
    assert!(ms.iter().any(|m| m.name == "identity-sync"));
    let spec = pod_spec(&ms, "DaemonSet", "causeway-node-agent")?;
    assert_eq!(arg_value(container(&spec, "node-agent")?, "--egress-addr"), None, "no egress stream to dial");
    check_command_lines(&ms)?;

    // Egress only (no mesh): the agent follows the egress stream alone, and its binary accepts that.
    let ms = render(&format!(
        "{MINIMAL}identitySync: {{enabled: false}}\nclustermesh: {{apiserver: {{enabled: false}}}}\n"
    ))?;
    check_all_typed(&ms)?;
    let spec = pod_spec(&ms, "DaemonSet", "causeway-node-agent")?;
    let agent = container(&spec, "node-agent")?;
    assert_eq!(arg_value(agent, "--identity-sync-addr"), None);
    assert!(arg_value(agent, "--egress-addr").is_some());
    // ...and egress-gw has no MeshView to learn meshed pod CIDRs from.
    let spec = pod_spec(&ms, "Deployment", "egress-gw")?;
    assert_eq!(arg_value(container(&spec, "egress-gw")?, "--identity-sync-addr"), None);
    check_command_lines(&ms)?;
    Ok(())
}

#[test]
fn egress_gw_and_node_agents_follow_the_identity_sync_service() -> Result<()> {
    let ms = render(MINIMAL)?;
    let svc: Service = typed(one(&ms, "Service", "identity-sync")?)?;
    let port = svc.spec.and_then(|s| s.ports).and_then(|p| p.first().map(|p| p.port)).context("identity-sync port")?;
    let want = format!("http://identity-sync.{NS}.svc:{port}");
    let gw = pod_spec(&ms, "Deployment", "egress-gw")?;
    assert_eq!(arg_value(container(&gw, "egress-gw")?, "--identity-sync-addr"), Some(want.as_str()));
    let agent = pod_spec(&ms, "DaemonSet", "causeway-node-agent")?;
    assert_eq!(arg_value(container(&agent, "node-agent")?, "--identity-sync-addr"), Some(want.as_str()));
    Ok(())
}

#[test]
fn chart_crds_are_the_generated_ones() -> Result<()> {
    let path = causeway_chart_tests::chart_dir().join("crds/causeway.io_crds.yaml");
    let in_chart = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let generated = causeway_crds::render_yaml()?;
    assert!(
        in_chart == generated,
        "{} differs from the CRD types: run `cargo run -p causeway-chart-tests --bin crd-reference -- --write`",
        path.display()
    );
    // helm installs them: `--include-crds` renders each one.
    let with_crds = parse_manifests(&helm_template(MINIMAL, NS, &["--include-crds"])?)?;
    let names: BTreeSet<String> =
        with_crds.iter().filter(|m| m.kind == "CustomResourceDefinition").map(|m| m.name.clone()).collect();
    let expected: BTreeSet<String> = causeway_crds::all_crds().into_iter().filter_map(|c| c.metadata.name).collect();
    assert_eq!(names, expected);
    Ok(())
}

#[test]
fn chart_and_cli_agree_on_the_objects_they_share() -> Result<()> {
    // With name and ID in the values, the chart's ConfigMap is what `causeway clustermesh enable` reads and accepts.
    let ms = render(MINIMAL)?;
    let data = cluster_config(&ms)?;
    let settings = cli::ClusterSettings::from_data(&data).map_err(anyhow::Error::msg)?.context("settings")?;
    settings.validate()?;
    assert_eq!((settings.name.as_str(), settings.id, settings.max_connected_clusters), ("east", 1, 255));

    // Without them the chart renders no ConfigMap (enable creates it) and every component reads the CLI's keys.
    let ms = render("")?;
    check_all_typed(&ms)?;
    assert!(!ms.iter().any(|m| m.kind == "ConfigMap"), "enable owns causeway-config");
    // (The apiserver watches the peers key with --peers-configmap, checked with the RBAC; it is not read at start.)
    for (workload, extra) in [("clustermesh-apiserver", None::<&str>), ("identity-sync", None)] {
        let spec = pod_spec(&ms, "Deployment", workload)?;
        let c = container(&spec, workload)?;
        let refs: BTreeMap<String, bool> = c
            .env
            .iter()
            .flatten()
            .filter_map(|e| e.value_from.as_ref()?.config_map_key_ref.as_ref())
            .filter(|k| k.name == cli::CONFIG_MAP)
            .map(|k| (k.key.clone(), k.optional == Some(true)))
            .collect();
        let mut want: BTreeMap<String, bool> =
            [cli::KEY_CLUSTER_NAME, cli::KEY_CLUSTER_ID, cli::KEY_MAX_CONNECTED_CLUSTERS]
                .into_iter()
                .map(|k| (k.to_string(), false))
                .collect();
        want.extend(extra.map(|k| (k.to_string(), true)));
        assert_eq!(refs, want, "{workload}: ConfigMap keys (and whether optional)");
    }
    check_command_lines(&ms)?;

    // identity-sync reads the remotes Secret `connect` writes, and serves /status on the Service port the CLI's
    // status command proxies to by default (`--sync-service identity-sync --sync-port metrics`).
    let sync = pod_spec(&ms, "Deployment", "identity-sync")?;
    let vol = sync.volumes.iter().flatten().find_map(|v| v.secret.as_ref()).context("remotes Secret volume")?;
    assert_eq!(vol.secret_name.as_deref(), Some(cli::REMOTES_SECRET));
    let svc: Service = typed(one(&ms, "Service", "identity-sync")?)?;
    let port =
        svc.spec.and_then(|s| s.ports).unwrap_or_default().into_iter().find(|p| p.name.as_deref() == Some("metrics"));
    let port = port.context("identity-sync Service has a port named metrics")?;
    let metrics_addr = arg_value(container(&sync, "identity-sync")?, "--metrics-addr").context("--metrics-addr")?;
    assert_eq!(metrics_addr, format!("0.0.0.0:{}", port.port), "the metrics port serves /status");

    // `connect` finds etcd on the apiserver Service's port named `etcd`; `egress status` scrapes agents on the node.
    let svc: Service = typed(one(&ms, "Service", cli::APISERVER_SERVICE)?)?;
    assert!(svc.spec.and_then(|s| s.ports).unwrap_or_default().iter().any(|p| p.name.as_deref() == Some("etcd")));
    let agent = pod_spec(&ms, "DaemonSet", "causeway-node-agent")?;
    assert_eq!(
        arg_value(container(&agent, "node-agent")?, "--metrics-addr"),
        Some(format!("0.0.0.0:{}", causeway::egress::DEFAULT_AGENT_METRICS_PORT).as_str())
    );
    Ok(())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

#[test]
fn helm_lint_strict_passes_and_catches_a_broken_template() -> Result<()> {
    let chart = causeway_chart_tests::chart_dir();
    for values in [MINIMAL, EVERYTHING, ""] {
        causeway_chart_tests::helm_lint(&chart, values, NS).with_context(|| format!("values {values:?}"))?;
    }
    // Lint is a real check: a copy of the chart with a template that renders invalid YAML fails it.
    let tmp = tempfile::tempdir()?;
    let broken = tmp.path().join("causeway");
    copy_dir(&chart, &broken)?;
    let template = broken.join("templates/egress-gw.yaml");
    let text = std::fs::read_to_string(&template)?;
    let broken_text = text.replacen("  replicas: {{", "  replicas: [{{", 1);
    assert_ne!(broken_text, text, "the template to break has no `replicas:` line");
    std::fs::write(&template, broken_text)?;
    let err = causeway_chart_tests::helm_lint(&broken, MINIMAL, NS).expect_err("lint accepted a broken template");
    assert!(format!("{err:#}").contains("egress-gw.yaml"), "{err:#}");
    Ok(())
}

fn check_pod_monitor(m: &Manifest) -> Result<()> {
    let spec = &m.doc["spec"];
    ensure!(spec["selector"]["matchLabels"].as_object().is_some_and(|l| !l.is_empty()), "{}: no selector", m.name);
    let endpoints = spec["podMetricsEndpoints"].as_array().with_context(|| format!("{}: no endpoints", m.name))?;
    for e in endpoints {
        ensure!(e["port"].as_str().is_some() && e["path"].as_str().is_some(), "{}: endpoint {e}", m.name);
    }
    Ok(())
}

/// Every rule of a PrometheusRule: (alert, expr, severity, summary) as strings, or an error naming what is missing.
fn alert_rules(m: &Manifest) -> Result<Vec<(String, String, String, String)>> {
    let mut out = Vec::new();
    for g in m.doc["spec"]["groups"].as_array().with_context(|| format!("{}: no groups", m.name))? {
        ensure!(g["name"].as_str().is_some(), "{}: a group without a name", m.name);
        for r in g["rules"].as_array().with_context(|| format!("{}: a group without rules", m.name))? {
            let field =
                |k: &str| r[k].as_str().map(str::to_string).with_context(|| format!("{}: rule {r} lacks {k}", m.name));
            let sev =
                r["labels"]["severity"].as_str().map(str::to_string).with_context(|| format!("no severity: {r}"))?;
            let summary =
                r["annotations"]["summary"].as_str().map(str::to_string).with_context(|| format!("no summary: {r}"))?;
            ensure!(r["annotations"]["description"].as_str().is_some(), "no description: {r}");
            out.push((field("alert")?, field("expr")?, sev, summary));
        }
    }
    Ok(out)
}

fn check_prometheus_rule(m: &Manifest) -> Result<()> {
    alert_rules(m).map(|_| ())
}

/// Every metric the components register, by name without the `causeway_` prefix: whether it is a counter
/// (exposed as `<name>_total`), something else, or unknown. Read from the sources: `.register("name", "help",
/// self.field.clone())` and the field's declared type in the same file.
fn registered_metrics() -> Result<BTreeMap<String, Option<bool>>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    let mut dirs: Vec<PathBuf> =
        ["clustermesh-apiserver", "identity-sync", "egress-gw", "datapath", "leader", "kvstore", "runtime"]
            .iter()
            .map(|c| root.join(c).join("src"))
            .collect();
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let mut out = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        for (at, _) in text.match_indices(".register") {
            let rest = &text[at + ".register".len()..];
            let rest = rest.strip_prefix("_with_unit").unwrap_or(rest);
            let Some(rest) = rest.strip_prefix('(') else { continue };
            let Some(rest) = rest.trim_start().strip_prefix('"') else { continue };
            let Some((name, rest)) = rest.split_once('"') else { continue };
            // Skip the help string, then look at the value: `self.<field>.clone()`.
            let after_help = rest.split_once('"').and_then(|(_, r)| r.split_once('"')).map(|(_, r)| r);
            let field = after_help
                .map(|r| r.trim_start_matches([',', ' ', '\n']))
                .and_then(|r| r.strip_prefix("self."))
                .and_then(|r| r.split_once('.'))
                .map(|(f, _)| f.to_string());
            let counter = field.and_then(|f| {
                let decl = format!("{f}: ");
                text.match_indices(&decl)
                    .map(|(i, _)| text[i + decl.len()..].split('\n').next().unwrap_or(""))
                    .find(|ty| ty.contains("Counter") || ty.contains("Gauge") || ty.contains("Histogram"))
                    .map(|ty| ty.contains("Counter"))
            });
            out.insert(name.to_string(), counter);
        }
    }
    ensure!(out.len() > 30, "found only {} registered metrics: the scan is broken", out.len());
    Ok(out)
}

/// `causeway_…` names in a PromQL expression.
fn metric_tokens(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in expr.match_indices("causeway_") {
        let name: String = expr[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        out.push(name);
    }
    out
}

#[test]
fn monitoring_scrapes_every_component_and_alerts_name_only_metrics_that_exist() -> Result<()> {
    // Off by default: no Prometheus Operator objects (their CRDs may not exist).
    let plain = render(MINIMAL)?;
    assert!(!plain.iter().any(|m| m.doc["apiVersion"] == "monitoring.coreos.com/v1"), "monitoring objects by default");

    let ms = render(EVERYTHING)?;
    // One PodMonitor per workload, selecting exactly its pods, on a port its container has.
    let workloads = [
        ("Deployment", "clustermesh-apiserver"),
        ("Deployment", "identity-sync"),
        ("Deployment", "egress-gw"),
        ("DaemonSet", "causeway-node-agent"),
    ];
    let monitors: Vec<&Manifest> = ms.iter().filter(|m| m.kind == "PodMonitor").collect();
    assert_eq!(monitors.len(), workloads.len(), "{:?}", monitors.iter().map(|m| &m.name).collect::<Vec<_>>());
    for (kind, name) in workloads {
        let w = one(&ms, kind, name)?;
        let pod_labels = &w.doc["spec"]["template"]["metadata"]["labels"];
        let monitor = monitors
            .iter()
            .find(|m| {
                m.doc["spec"]["selector"]["matchLabels"]
                    .as_object()
                    .is_some_and(|sel| sel.iter().all(|(k, v)| pod_labels[k] == *v))
            })
            .with_context(|| format!("no PodMonitor selects {kind} {name}'s pods"))?;
        let port = monitor.doc["spec"]["podMetricsEndpoints"][0]["port"].as_str().context("port")?;
        let spec = pod_spec(&ms, kind, name)?;
        assert!(
            spec.containers.iter().flat_map(|c| c.ports.iter().flatten()).any(|p| p.name.as_deref() == Some(port)),
            "{kind} {name} has no port named {port}"
        );
        assert_eq!(monitor.doc["metadata"]["labels"]["release"], "prom", "extra labels");
    }

    // Every alert names only metrics a component registers, with `_total` exactly on counters.
    let registered = registered_metrics()?;
    let rule = one(&ms, "PrometheusRule", "causeway")?;
    let alerts = alert_rules(rule)?;
    assert!(alerts.len() >= 8, "{alerts:?}");
    for (alert, expr, severity, _) in &alerts {
        assert!(["warning", "critical"].contains(&severity.as_str()), "{alert}: severity {severity}");
        let tokens = metric_tokens(expr);
        assert!(!tokens.is_empty(), "{alert}: no Causeway metric in {expr}");
        for t in tokens {
            let base = t.strip_prefix("causeway_").unwrap_or(&t);
            match (base.strip_suffix("_total"), registered.get(base)) {
                (Some(counter), _) if registered.contains_key(counter) => assert_ne!(
                    registered[counter],
                    Some(false),
                    "{alert}: {t} adds _total to {counter}, which is not a counter"
                ),
                (_, Some(kind)) => {
                    assert_ne!(*kind, Some(true), "{alert}: {t} is a counter, exposed as {t}_total")
                }
                _ => panic!("{alert}: {t} is not registered by any component"),
            }
        }
    }
    // The scan itself can tell counters from gauges (else the checks above would prove nothing).
    assert_eq!(registered.get("export_errors"), Some(&Some(true)));
    assert_eq!(registered.get("egress_healthy_gateways"), Some(&Some(false)));
    Ok(())
}
