//! The in-memory object store: objects as `serde_json::Value`, one global resourceVersion counter,
//! and a bounded history of write events that watches replay from.

use std::collections::{BTreeMap, VecDeque};

use base64::Engine as _;
use serde_json::{json, Map, Value};
use tokio::sync::watch;

use crate::error::{ApiError, ApiResult};
use crate::patch::{self, PatchKind};
use crate::registry::{parse_crd, Registry, ResourceInfo, ResourceKey};
use crate::selectors::Filter;

/// `(namespace, name)`; the namespace is `""` for cluster-scoped objects.
type ObjKey = (String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug, Clone)]
struct HistoryEvent {
    rv: u64,
    key: ResourceKey,
    etype: EventType,
    object: Value,
    /// The object before a modification, so that selector-filtered watches can turn a modification
    /// into ADDED or DELETED when an object starts or stops matching.
    prev: Option<Value>,
}

pub struct ListResult {
    pub items: Vec<Value>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<usize>,
}

/// Preconditions from a DeleteOptions body.
#[derive(Debug, Default)]
pub struct Preconditions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

/// A watch asked for a resourceVersion older than the retained history.
#[derive(Debug)]
pub struct Gone;

pub struct Store {
    pub registry: Registry,
    objects: BTreeMap<ResourceKey, BTreeMap<ObjKey, Value>>,
    rv: u64,
    /// Events with `rv <= compacted_rv` are no longer in `history`.
    compacted_rv: u64,
    history: VecDeque<HistoryEvent>,
    history_limit: usize,
    rng: u64,
    rv_tx: watch::Sender<u64>,
}

fn meta(obj: &Value) -> Option<&Map<String, Value>> {
    obj.get("metadata").and_then(Value::as_object)
}

pub fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    meta(obj).and_then(|m| m.get(field)).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// The object's metadata map, created if missing. Callers have checked that `obj` is an object.
fn meta_mut(obj: &mut Value) -> ApiResult<&mut Map<String, Value>> {
    let map = obj.as_object_mut().ok_or_else(|| ApiError::bad_request("the object must be a JSON object"))?;
    let m = map.entry("metadata").or_insert_with(|| Value::Object(Map::new()));
    if !m.is_object() {
        return Err(ApiError::bad_request("metadata must be a JSON object"));
    }
    m.as_object_mut().ok_or_else(|| ApiError::bad_request("metadata must be a JSON object"))
}

fn set_meta(obj: &mut Value, field: &str, value: Value) -> ApiResult<()> {
    meta_mut(obj)?.insert(field.to_string(), value);
    Ok(())
}

/// Copies `field` from `src`'s metadata into `dst`'s, removing it from `dst` if `src` lacks it.
fn copy_meta(dst: &mut Value, src: &Value, field: &str) -> ApiResult<()> {
    let m = meta_mut(dst)?;
    match meta(src).and_then(|s| s.get(field)) {
        Some(v) => m.insert(field.to_string(), v.clone()),
        None => m.remove(field),
    };
    Ok(())
}

/// Everything but metadata and status: what `generation` tracks.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn validate_name(info: &ResourceInfo, name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('%');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            &info.group,
            &info.plural,
            name,
            format!(
                "metadata.name: Invalid value: {name:?}: a name may not be empty, '.', '..', or contain '/' or '%'"
            ),
        ))
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: u64,
    ns: String,
    name: String,
}

impl Store {
    pub fn new(history_limit: usize, rv_tx: watch::Sender<u64>) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x5eed);
        let mut store = Self {
            registry: Registry::builtin(),
            objects: BTreeMap::new(),
            rv: 1,
            compacted_rv: 1,
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            rng: seed | 1,
            rv_tx,
        };
        if let Some(ns_info) = store.registry.lookup("", "v1", "namespaces").cloned() {
            for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
                let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
                if let Err(e) = store.create(&ns_info, None, body, false) {
                    tracing::error!(namespace = ns, error = ?e, "could not create a default namespace");
                }
            }
        }
        store
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Drops the whole event history: watches from any older resourceVersion now get 410 Gone.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted_rv = self.rv;
    }

    fn next_random(&mut self) -> u64 {
        // splitmix64: enough for names and uids that only need to be unique within one server.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn new_uid(&mut self) -> String {
        let a = self.next_random();
        let b = self.next_random();
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            ((b >> 48) & 0x3fff) | 0x8000,
            b & 0xffff_ffff_ffff
        )
    }

    fn random_suffix(&mut self) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let mut r = self.next_random();
        (0..5)
            .map(|_| {
                let c = ALPHABET[(r % ALPHABET.len() as u64) as usize] as char;
                r /= ALPHABET.len() as u64;
                c
            })
            .collect()
    }

    fn ns_key(info: &ResourceInfo, ns: Option<&str>) -> String {
        if info.namespaced {
            ns.unwrap_or("").to_string()
        } else {
            String::new()
        }
    }

    fn current(&self, info: &ResourceInfo, key: &ObjKey) -> Option<&Value> {
        self.objects.get(&info.key()).and_then(|m| m.get(key))
    }

    /// Records a write: bumps the resourceVersion, stores (or removes) the object, appends history.
    fn commit(
        &mut self,
        rkey: ResourceKey,
        okey: ObjKey,
        etype: EventType,
        mut obj: Value,
        prev: Option<Value>,
    ) -> ApiResult<Value> {
        self.rv += 1;
        set_meta(&mut obj, "resourceVersion", Value::String(self.rv.to_string()))?;
        let bucket = self.objects.entry(rkey.clone()).or_default();
        match etype {
            EventType::Deleted => {
                bucket.remove(&okey);
            }
            EventType::Added | EventType::Modified => {
                bucket.insert(okey, obj.clone());
            }
        }
        self.history.push_back(HistoryEvent { rv: self.rv, key: rkey, etype, object: obj.clone(), prev });
        while self.history.len() > self.history_limit {
            if let Some(ev) = self.history.pop_front() {
                self.compacted_rv = ev.rv;
            }
        }
        self.rv_tx.send_replace(self.rv);
        Ok(obj)
    }

    pub fn get(&self, info: &ResourceInfo, ns: Option<&str>, name: &str) -> ApiResult<Value> {
        let key = (Self::ns_key(info, ns), name.to_string());
        self.current(info, &key).cloned().ok_or_else(|| ApiError::not_found(&info.group, &info.plural, name))
    }

    pub fn list(
        &self,
        info: &ResourceInfo,
        filter: &Filter,
        limit: Option<usize>,
        cont: Option<&str>,
    ) -> ApiResult<ListResult> {
        let token = match cont.filter(|c| !c.is_empty()) {
            None => None,
            Some(c) => {
                let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(c)
                    .map_err(|_| ApiError::bad_request("invalid continue token"))?;
                let token: ContinueToken =
                    serde_json::from_slice(&bytes).map_err(|_| ApiError::bad_request("invalid continue token"))?;
                if token.rv < self.compacted_rv {
                    return Err(ApiError::gone(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ));
                }
                Some(token)
            }
        };
        let resource_version = token.as_ref().map_or(self.rv, |t| t.rv);
        let empty = BTreeMap::new();
        let bucket = self.objects.get(&info.key()).unwrap_or(&empty);
        let mut matching = bucket
            .iter()
            .filter(|(k, _)| {
                token.as_ref().is_none_or(|t| (k.0.as_str(), k.1.as_str()) > (t.ns.as_str(), t.name.as_str()))
            })
            .filter(|(_, v)| filter.matches(v));
        let limit = limit.filter(|l| *l > 0);
        let mut items = Vec::new();
        let mut last = None;
        for (k, v) in matching.by_ref() {
            if limit.is_some_and(|l| items.len() >= l) {
                // One more match exists: count the rest and hand out a token.
                let remaining = 1 + matching.count();
                let token = last.map(|(ns, name): (String, String)| {
                    let t = ContinueToken { rv: resource_version, ns, name };
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&t).unwrap_or_default())
                });
                return Ok(ListResult { items, resource_version, continue_token: token, remaining: Some(remaining) });
            }
            items.push(v.clone());
            last = Some(k.clone());
        }
        Ok(ListResult { items, resource_version, continue_token: None, remaining: None })
    }

    pub fn create(
        &mut self,
        info: &ResourceInfo,
        ns: Option<&str>,
        mut body: Value,
        dry_run: bool,
    ) -> ApiResult<Value> {
        if !body.is_object() {
            return Err(ApiError::bad_request("the request body must be a JSON object"));
        }
        let ns_key = Self::ns_key(info, ns);
        if info.namespaced && ns_key.is_empty() {
            return Err(ApiError::bad_request("a namespaced object must be created under /namespaces/{namespace}/"));
        }
        if let Some(body_ns) = meta_str(&body, "namespace") {
            if info.namespaced && body_ns != ns_key {
                return Err(ApiError::bad_request(format!(
                    "the namespace of the provided object ({body_ns}) does not match the namespace sent on the request ({ns_key})"
                )));
            }
        }
        if meta_str(&body, "resourceVersion").is_some() {
            return Err(ApiError::bad_request("resourceVersion should not be set on objects to be created"));
        }
        let name = match (meta_str(&body, "name"), meta_str(&body, "generateName")) {
            (Some(n), _) => n.to_string(),
            (None, Some(prefix)) => {
                let prefix = prefix.to_string();
                loop {
                    let candidate = format!("{prefix}{}", self.random_suffix());
                    if self.current(info, &(ns_key.clone(), candidate.clone())).is_none() {
                        break candidate;
                    }
                }
            }
            (None, None) => {
                return Err(ApiError::invalid(
                    &info.group,
                    &info.plural,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ))
            }
        };
        validate_name(info, &name)?;
        let okey = (ns_key.clone(), name.clone());
        if self.current(info, &okey).is_some() {
            return Err(ApiError::already_exists(&info.group, &info.plural, &name));
        }

        let obj =
            body.as_object_mut().ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))?;
        obj.insert("apiVersion".into(), Value::String(info.api_version(info.storage_version())));
        obj.insert("kind".into(), Value::String(info.kind.clone()));
        if info.custom && info.status_subresource {
            obj.remove("status");
        }
        let uid = self.new_uid();
        let m = meta_mut(&mut body)?;
        m.insert("name".into(), Value::String(name.clone()));
        if info.namespaced {
            m.insert("namespace".into(), Value::String(ns_key));
        } else {
            m.remove("namespace");
        }
        m.insert("uid".into(), Value::String(uid));
        m.insert("creationTimestamp".into(), Value::String(now()));
        if info.tracks_generation {
            m.insert("generation".into(), json!(1));
        } else {
            m.remove("generation");
        }
        m.remove("deletionTimestamp");

        if info.is_namespace() && body.pointer("/status/phase").is_none() {
            patch::merge_patch(&mut body, &json!({"status": {"phase": "Active"}}));
        }
        if info.is_crd() {
            let crd_info = parse_crd(&body).map_err(|e| ApiError::invalid(&info.group, &info.plural, &name, e))?;
            if !self.registry.available_for_crd(&crd_info.key()) {
                return Err(ApiError::invalid(
                    &info.group,
                    &info.plural,
                    &name,
                    "spec.names.plural: the resource is already served by a built-in API",
                ));
            }
            mark_crd_established(&mut body, &crd_info);
            if !dry_run {
                self.registry.register(crd_info);
            }
        }
        if dry_run {
            return Ok(body);
        }
        self.commit(info.key(), okey, EventType::Added, body, None)
    }

    /// PUT: replaces the object. A non-empty `metadata.resourceVersion` in the body must match.
    pub fn update(
        &mut self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        body: Value,
        status_only: bool,
        dry_run: bool,
    ) -> ApiResult<Value> {
        if !body.is_object() {
            return Err(ApiError::bad_request("the request body must be a JSON object"));
        }
        let okey = (Self::ns_key(info, ns), name.to_string());
        let old =
            self.current(info, &okey).cloned().ok_or_else(|| ApiError::not_found(&info.group, &info.plural, name))?;
        if let Some(rv) = meta_str(&body, "resourceVersion") {
            if Some(rv) != meta_str(&old, "resourceVersion") {
                return Err(ApiError::conflict(
                    &info.group,
                    &info.plural,
                    name,
                    "the object has been modified; please apply your changes to the latest version and try again",
                ));
            }
        }
        self.write_update(info, okey, old, body, status_only, dry_run)
    }

    /// PATCH. Returns the object and whether it was created (only apply patches create).
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        kind: PatchKind,
        patch_body: &Value,
        status_only: bool,
        dry_run: bool,
    ) -> ApiResult<(Value, bool)> {
        let okey = (Self::ns_key(info, ns), name.to_string());
        let Some(old) = self.current(info, &okey).cloned() else {
            if kind == PatchKind::Apply && !status_only {
                let mut body = patch_body.clone();
                if !body.is_object() {
                    return Err(ApiError::bad_request("an apply patch must be an object"));
                }
                if meta_str(&body, "name").is_some_and(|n| n != name) {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object does not match the name on the URL ({name})"
                    )));
                }
                set_meta(&mut body, "name", Value::String(name.to_string()))?;
                return self.create(info, ns, body, dry_run).map(|o| (o, true));
            }
            return Err(ApiError::not_found(&info.group, &info.plural, name));
        };
        let new = match kind {
            PatchKind::Merge | PatchKind::StrategicMerge | PatchKind::Apply => {
                if !patch_body.is_object() {
                    return Err(ApiError::bad_request("a merge or apply patch must be a JSON object"));
                }
                let mut new = old.clone();
                patch::merge_patch(&mut new, patch_body);
                new
            }
            PatchKind::Json => patch::json_patch(&old, patch_body)
                .map_err(|e| ApiError::invalid(&info.group, &info.plural, name, e))?,
        };
        if !new.is_object() {
            return Err(ApiError::invalid(&info.group, &info.plural, name, "the patched object is not a JSON object"));
        }
        if meta_str(&new, "resourceVersion") != meta_str(&old, "resourceVersion")
            && meta_str(&new, "resourceVersion").is_some()
        {
            return Err(ApiError::conflict(
                &info.group,
                &info.plural,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        self.write_update(info, okey, old, new, status_only, dry_run).map(|o| (o, false))
    }

    fn write_update(
        &mut self,
        info: &ResourceInfo,
        okey: ObjKey,
        old: Value,
        new: Value,
        status_only: bool,
        dry_run: bool,
    ) -> ApiResult<Value> {
        let name = okey.1.clone();
        if let Some(n) = meta_str(&new, "name") {
            if n != name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
        }
        if info.namespaced {
            if let Some(n) = meta_str(&new, "namespace") {
                if n != okey.0 {
                    return Err(ApiError::bad_request(format!(
                        "the namespace of the provided object ({n}) does not match the namespace sent on the request ({})",
                        okey.0
                    )));
                }
            }
        }
        let mut result = if status_only {
            let mut r = old.clone();
            if let Some(obj) = r.as_object_mut() {
                match new.get("status") {
                    Some(s) => obj.insert("status".into(), s.clone()),
                    None => obj.remove("status"),
                };
            }
            r
        } else {
            let mut r = new;
            if info.status_subresource {
                if let Some(obj) = r.as_object_mut() {
                    match old.get("status") {
                        Some(s) => obj.insert("status".into(), s.clone()),
                        None => obj.remove("status"),
                    };
                }
            }
            r
        };
        // Server-owned fields keep their stored values.
        for field in ["name", "namespace", "uid", "creationTimestamp", "resourceVersion", "generation"] {
            copy_meta(&mut result, &old, field)?;
        }
        if let Some(obj) = result.as_object_mut() {
            for field in ["apiVersion", "kind"] {
                if let Some(v) = old.get(field) {
                    obj.insert(field.into(), v.clone());
                }
            }
        }
        if info.tracks_generation && spec_part(&result) != spec_part(&old) {
            let generation = meta(&old).and_then(|m| m.get("generation")).and_then(Value::as_i64).unwrap_or(0);
            set_meta(&mut result, "generation", json!(generation + 1))?;
        }
        if info.is_crd() {
            let crd_info = parse_crd(&result).map_err(|e| ApiError::invalid(&info.group, &info.plural, &name, e))?;
            let accepted = crd_info_status(&crd_info)["acceptedNames"].clone();
            if old.pointer("/status/acceptedNames") != Some(&accepted) {
                mark_crd_established(&mut result, &crd_info);
            } else if let (Some(obj), Some(status)) = (result.as_object_mut(), old.get("status")) {
                obj.insert("status".into(), status.clone());
            }
            if !dry_run {
                self.registry.register(crd_info);
            }
        }
        if result == old || dry_run {
            // A no-op write neither bumps the resourceVersion nor emits an event, as on a real apiserver.
            return Ok(result);
        }
        self.commit(info.key(), okey, EventType::Modified, result, Some(old))
    }

    pub fn delete(
        &mut self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        pre: &Preconditions,
        dry_run: bool,
    ) -> ApiResult<Value> {
        let okey = (Self::ns_key(info, ns), name.to_string());
        let old =
            self.current(info, &okey).cloned().ok_or_else(|| ApiError::not_found(&info.group, &info.plural, name))?;
        if let Some(uid) = &pre.uid {
            let have = meta_str(&old, "uid").unwrap_or("");
            if uid != have {
                return Err(ApiError::conflict(
                    &info.group,
                    &info.plural,
                    name,
                    &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {have}"),
                ));
            }
        }
        if let Some(rv) = &pre.resource_version {
            let have = meta_str(&old, "resourceVersion").unwrap_or("");
            if rv != have {
                return Err(ApiError::conflict(&info.group, &info.plural, name, &format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {have}")));
            }
        }
        if dry_run {
            return Ok(old);
        }
        if info.is_crd() {
            if let Ok(crd_info) = parse_crd(&old) {
                let key = crd_info.key();
                self.delete_all(&key, |_| true)?;
                self.registry.unregister(&key);
            }
        }
        if info.is_namespace() {
            let keys: Vec<ResourceKey> = self.objects.keys().cloned().collect();
            for key in keys {
                if self.registry.get(&key).is_some_and(|i| i.namespaced) {
                    self.delete_all(&key, |k| k.0 == name)?;
                }
            }
        }
        self.commit(info.key(), okey, EventType::Deleted, old, None)
    }

    fn delete_all(&mut self, key: &ResourceKey, pick: impl Fn(&ObjKey) -> bool) -> ApiResult<()> {
        let victims: Vec<(ObjKey, Value)> = self
            .objects
            .get(key)
            .map(|b| b.iter().filter(|(k, _)| pick(k)).map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        for (okey, obj) in victims {
            self.commit(key.clone(), okey, EventType::Deleted, obj, None)?;
        }
        Ok(())
    }

    pub fn delete_collection(&mut self, info: &ResourceInfo, filter: &Filter, dry_run: bool) -> ApiResult<Vec<Value>> {
        let names: Vec<(String, String)> = self
            .objects
            .get(&info.key())
            .map(|b| b.iter().filter(|(_, v)| filter.matches(v)).map(|(k, _)| k.clone()).collect())
            .unwrap_or_default();
        let mut deleted = Vec::new();
        for (ns, name) in names {
            let ns = (!ns.is_empty()).then_some(ns);
            deleted.push(self.delete(info, ns.as_deref(), &name, &Preconditions::default(), dry_run)?);
        }
        Ok(deleted)
    }

    /// The current matching objects and the resourceVersion they are consistent with.
    pub fn snapshot(&self, info: &ResourceInfo, filter: &Filter) -> (Vec<Value>, u64) {
        let items = self
            .objects
            .get(&info.key())
            .map(|b| b.values().filter(|v| filter.matches(v)).cloned().collect())
            .unwrap_or_default();
        (items, self.rv)
    }

    /// Whether a watch may start from `rv`.
    pub fn check_watchable(&self, rv: u64) -> Result<(), Gone> {
        if rv < self.compacted_rv {
            Err(Gone)
        } else {
            Ok(())
        }
    }

    /// Events for `key` after `cursor` that pass `filter`, and the new cursor.
    pub fn events_since(
        &self,
        key: &ResourceKey,
        cursor: u64,
        filter: &Filter,
    ) -> Result<(Vec<(EventType, Value)>, u64), Gone> {
        self.check_watchable(cursor)?;
        let start = self.history.partition_point(|e| e.rv <= cursor);
        let mut out = Vec::new();
        for ev in self.history.range(start..).filter(|e| e.key == *key) {
            let now_matches = filter.matches(&ev.object);
            let etype = match ev.etype {
                EventType::Added | EventType::Deleted => now_matches.then_some(ev.etype),
                EventType::Modified => {
                    let was = ev.prev.as_ref().is_some_and(|p| filter.matches(p));
                    match (was, now_matches) {
                        (true, true) => Some(EventType::Modified),
                        (false, true) => Some(EventType::Added),
                        (true, false) => Some(EventType::Deleted),
                        (false, false) => None,
                    }
                }
            };
            if let Some(etype) = etype {
                out.push((etype, ev.object.clone()));
            }
        }
        Ok((out, cursor.max(self.rv)))
    }
}

/// A real apiserver's CRD controller marks a valid CRD Established and NamesAccepted; clients wait for that.
fn mark_crd_established(crd: &mut Value, info: &ResourceInfo) {
    if let Some(obj) = crd.as_object_mut() {
        obj.insert("status".into(), crd_info_status(info));
    }
}

fn crd_info_status(info: &ResourceInfo) -> Value {
    let ts = now();
    let cond = |t: &str, reason: &str, msg: &str| json!({"type": t, "status": "True", "reason": reason, "message": msg, "lastTransitionTime": ts});
    let status = json!({
        "conditions": [
            cond("NamesAccepted", "NoConflicts", "no conflicts found"),
            cond("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "acceptedNames": {
            "plural": info.plural,
            "singular": info.singular,
            "kind": info.kind,
            "listKind": info.list_kind(),
            "shortNames": info.short_names,
        },
        "storedVersions": [info.storage_version()],
    });
    status
}
