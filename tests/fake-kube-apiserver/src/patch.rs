//! Patch bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), and the apply body.
//!
//! Strategic merge patch and server-side apply are both reduced to a JSON merge patch: lists are
//! replaced whole, `$patch` directives are not understood, and no field ownership is tracked.

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    StrategicMerge,
    Json,
    Apply,
}

impl PatchKind {
    /// From a request's Content-Type (parameters such as `; charset=utf-8` are ignored).
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        match essence {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::StrategicMerge),
            "application/json-patch+json" => Some(Self::Json),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(Self::Apply),
            _ => None,
        }
    }
}

/// RFC 7386: objects merge recursively, `null` deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(serde_json::Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Parses an apply body, which may be JSON or YAML.
pub fn parse_apply_body(body: &[u8]) -> Result<Value, String> {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        return Ok(v);
    }
    serde_yaml::from_slice::<Value>(body).map_err(|e| format!("error decoding YAML: {e}"))
}

fn parse_pointer(path: &str) -> Result<Vec<String>, String> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let rest = path.strip_prefix('/').ok_or_else(|| format!("invalid JSON pointer {path:?}: must start with '/'"))?;
    Ok(rest.split('/').map(|t| t.replace("~1", "/").replace("~0", "~")).collect())
}

fn array_index(token: &str, len: usize, allow_end: bool) -> Result<usize, String> {
    if allow_end && token == "-" {
        return Ok(len);
    }
    let idx: usize = token.parse().map_err(|_| format!("invalid array index {token:?}"))?;
    let max = if allow_end { len } else { len.saturating_sub(1) };
    if idx > max || (!allow_end && len == 0) {
        return Err(format!("array index {idx} out of bounds"));
    }
    Ok(idx)
}

fn resolve<'a>(doc: &'a Value, tokens: &[String]) -> Result<&'a Value, String> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m.get(t).ok_or_else(|| format!("path element {t:?} not found"))?,
            Value::Array(a) => {
                let i = array_index(t, a.len(), false)?;
                a.get(i).ok_or_else(|| format!("array index {i} out of bounds"))?
            }
            _ => return Err(format!("cannot descend into a scalar at {t:?}")),
        };
    }
    Ok(cur)
}

fn parent_mut<'a>(doc: &'a mut Value, tokens: &[String]) -> Result<&'a mut Value, String> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m.get_mut(t).ok_or_else(|| format!("path element {t:?} not found"))?,
            Value::Array(a) => {
                let i = array_index(t, a.len(), false)?;
                a.get_mut(i).ok_or_else(|| format!("array index {i} out of bounds"))?
            }
            _ => return Err(format!("cannot descend into a scalar at {t:?}")),
        };
    }
    Ok(cur)
}

fn add(doc: &mut Value, tokens: &[String], value: Value) -> Result<(), String> {
    let Some((last, parents)) = tokens.split_last() else {
        *doc = value;
        return Ok(());
    };
    match parent_mut(doc, parents)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(a) => {
            let i = array_index(last, a.len(), true)?;
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!("cannot add {last:?} to a scalar")),
    }
}

fn remove(doc: &mut Value, tokens: &[String]) -> Result<Value, String> {
    let Some((last, parents)) = tokens.split_last() else {
        return Err("cannot remove the whole document".into());
    };
    match parent_mut(doc, parents)? {
        Value::Object(m) => m.remove(last).ok_or_else(|| format!("path element {last:?} not found")),
        Value::Array(a) => {
            let i = array_index(last, a.len(), false)?;
            Ok(a.remove(i))
        }
        _ => Err(format!("cannot remove {last:?} from a scalar")),
    }
}

/// RFC 6902. The whole patch applies or none of it does.
pub fn json_patch(doc: &Value, ops: &Value) -> Result<Value, String> {
    let ops = ops.as_array().ok_or("a JSON patch must be an array of operations")?;
    let mut doc = doc.clone();
    for (i, op) in ops.iter().enumerate() {
        let field = |name: &str| -> Result<&str, String> {
            op.get(name).and_then(Value::as_str).ok_or_else(|| format!("operation {i}: missing string field {name:?}"))
        };
        let value = || -> Result<Value, String> {
            op.get("value").cloned().ok_or_else(|| format!("operation {i}: missing field \"value\""))
        };
        let path = parse_pointer(field("path")?)?;
        let res = match field("op")? {
            "add" => add(&mut doc, &path, value()?),
            "remove" => remove(&mut doc, &path).map(|_| ()),
            "replace" if path.is_empty() => {
                doc = value()?;
                Ok(())
            }
            "replace" => {
                let v = value()?;
                remove(&mut doc, &path).and_then(|_| add(&mut doc, &path, v))
            }
            "move" => {
                let from = parse_pointer(field("from")?)?;
                if path.starts_with(&from) && path.len() > from.len() {
                    Err("cannot move a value into one of its children".to_string())
                } else {
                    remove(&mut doc, &from).and_then(|v| add(&mut doc, &path, v))
                }
            }
            "copy" => {
                let from = parse_pointer(field("from")?)?;
                resolve(&doc, &from).cloned().and_then(|v| add(&mut doc, &path, v))
            }
            "test" => {
                let want = value()?;
                match resolve(&doc, &path) {
                    Ok(got) if *got == want => Ok(()),
                    Ok(_) => Err("test failed: value differs".to_string()),
                    Err(e) => Err(format!("test failed: {e}")),
                }
            }
            other => Err(format!("unknown op {other:?}")),
        };
        res.map_err(|e| format!("operation {i} ({}): {e}", field("op").unwrap_or("?")))?;
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_rfc7386() {
        let mut doc = json!({"a": {"b": 1, "c": 2}, "l": [1, 2], "x": 1});
        merge_patch(&mut doc, &json!({"a": {"b": null, "d": 3}, "l": [3], "x": null, "y": {"z": 1}}));
        assert_eq!(doc, json!({"a": {"c": 2, "d": 3}, "l": [3], "y": {"z": 1}}));
    }

    #[test]
    fn json_patch_ops() {
        let doc = json!({"a": [1, 2], "m": {"k": "v"}});
        let out = json_patch(
            &doc,
            &json!([
                {"op": "test", "path": "/m/k", "value": "v"},
                {"op": "add", "path": "/a/-", "value": 3},
                {"op": "add", "path": "/a/0", "value": 0},
                {"op": "replace", "path": "/m/k", "value": "w"},
                {"op": "remove", "path": "/a/1"},
                {"op": "copy", "from": "/m", "path": "/n"},
                {"op": "move", "from": "/n/k", "path": "/moved"},
                {"op": "add", "path": "/esc~1aped", "value": true}
            ]),
        );
        assert_eq!(out, Ok(json!({"a": [0, 2, 3], "m": {"k": "w"}, "n": {}, "moved": "w", "esc/aped": true})));
        assert!(json_patch(&doc, &json!([{"op": "test", "path": "/m/k", "value": "x"}])).is_err());
        assert!(json_patch(&doc, &json!([{"op": "replace", "path": "/nope", "value": 1}])).is_err());
        assert!(json_patch(&doc, &json!([{"op": "remove", "path": "/a/5"}])).is_err());
        assert!(json_patch(&doc, &json!({"op": "add"})).is_err());
        assert!(json_patch(&doc, &json!([{"op": "frob", "path": "/a"}])).is_err());
    }

    #[test]
    fn apply_body_yaml_or_json() {
        assert_eq!(parse_apply_body(b"{\"a\":1}"), Ok(json!({"a": 1})));
        assert_eq!(parse_apply_body(b"a: 1\nb: [x]\n"), Ok(json!({"a": 1, "b": ["x"]})));
        assert!(parse_apply_body(b"a: [").is_err());
    }
}
