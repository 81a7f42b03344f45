//! Label and field selectors, as accepted in `labelSelector=` and `fieldSelector=`.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(Vec<LabelReq>);

fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
}

fn valid_value(value: &str) -> bool {
    value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err("unbalanced ')'".into());
                }
            }
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '('".into());
    }
    parts.push(&s[start..]);
    Ok(parts)
}

fn parse_set(key: &str, rest: &str) -> Result<Vec<String>, String> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected '(values)' after the operator for key {key:?}"))?;
    let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
    if let Some(bad) = values.iter().find(|v| !valid_value(v)) {
        return Err(format!("invalid label value {bad:?}"));
    }
    Ok(values)
}

impl LabelSelector {
    pub fn parse(input: &str) -> Result<Self, String> {
        let input = input.trim();
        if input.is_empty() {
            return Ok(Self::default());
        }
        let mut reqs = Vec::new();
        for part in split_top_level(input)? {
            let part = part.trim();
            if part.is_empty() {
                return Err("empty requirement".into());
            }
            reqs.push(parse_requirement(part)?);
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, labels: Option<&serde_json::Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
            LabelReq::Equals(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEquals(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|l| vs.iter().all(|v| v != l)),
        })
    }
}

fn parse_requirement(part: &str) -> Result<LabelReq, String> {
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        return if valid_key(key) {
            Ok(LabelReq::NotExists(key.to_string()))
        } else {
            Err(format!("invalid label key {key:?}"))
        };
    }
    let binary = [("!=", false), ("==", true), ("=", true)];
    for (op, eq) in binary {
        if let Some((k, v)) = part.split_once(op) {
            let (k, v) = (k.trim(), v.trim());
            if !valid_key(k) {
                return Err(format!("invalid label key {k:?}"));
            }
            if !valid_value(v) {
                return Err(format!("invalid label value {v:?}"));
            }
            return Ok(if eq { LabelReq::Equals(k.into(), v.into()) } else { LabelReq::NotEquals(k.into(), v.into()) });
        }
    }
    // `key in (a,b)` / `key notin (a,b)` / `key`
    let mut words = part.splitn(2, char::is_whitespace);
    let key = words.next().unwrap_or("").trim();
    let rest = words.next().unwrap_or("").trim();
    if !valid_key(key) {
        return Err(format!("invalid label key {key:?}"));
    }
    if rest.is_empty() {
        return Ok(LabelReq::Exists(key.to_string()));
    }
    if let Some(set) = rest.strip_prefix("notin") {
        return Ok(LabelReq::NotIn(key.to_string(), parse_set(key, set)?));
    }
    if let Some(set) = rest.strip_prefix("in") {
        return Ok(LabelReq::In(key.to_string(), parse_set(key, set)?));
    }
    Err(format!("unsupported label requirement {part:?}"))
}

/// A parsed field selector: `path=value`, `path==value`, `path!=value`, comma-separated.
/// Any dotted path into the object is accepted (a real apiserver only allows a per-kind list);
/// a missing field compares as the empty string.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector(Vec<(Vec<String>, String, bool)>);

impl FieldSelector {
    pub fn parse(input: &str) -> Result<Self, String> {
        let input = input.trim();
        if input.is_empty() {
            return Ok(Self::default());
        }
        let mut reqs = Vec::new();
        for part in input.split(',') {
            let part = part.trim();
            let (path, value, eq) = if let Some((p, v)) = part.split_once("!=") {
                (p, v, false)
            } else if let Some((p, v)) = part.split_once("==") {
                (p, v, true)
            } else if let Some((p, v)) = part.split_once('=') {
                (p, v, true)
            } else {
                return Err(format!("invalid field selector requirement {part:?}"));
            };
            let path = path.trim();
            if path.is_empty() || path.split('.').any(str::is_empty) {
                return Err(format!("invalid field path {path:?}"));
            }
            reqs.push((path.split('.').map(str::to_string).collect(), value.trim().to_string(), eq));
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, want, eq)| {
            let mut cur = Some(obj);
            for p in path {
                cur = cur.and_then(|c| c.get(p));
            }
            let got = match cur {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            (got == *want) == *eq
        })
    }
}

/// Everything a list or watch filters on.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            let obj_ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
            if obj_ns != ns {
                return false;
            }
        }
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        self.labels.matches(labels) && self.fields.matches(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn label_selector_forms() {
        let l = labels(json!({"app": "web", "tier": "front", "env": ""}));
        let m = |s: &str| LabelSelector::parse(s).map(|sel| sel.matches(Some(&l)));
        assert_eq!(m("app=web"), Ok(true));
        assert_eq!(m("app==web"), Ok(true));
        assert_eq!(m("app!=web"), Ok(false));
        assert_eq!(m("missing!=x"), Ok(true));
        assert_eq!(m("app"), Ok(true));
        assert_eq!(m("!app"), Ok(false));
        assert_eq!(m("!missing"), Ok(true));
        assert_eq!(m("tier in (front, back)"), Ok(true));
        assert_eq!(m("tier notin (front,back)"), Ok(false));
        assert_eq!(m("missing notin (a)"), Ok(true));
        assert_eq!(m("missing in (a)"), Ok(false));
        assert_eq!(m("app=web,tier in (x,front),!missing"), Ok(true));
        assert_eq!(m("env="), Ok(true));
        assert_eq!(m(""), Ok(true));
        assert!(LabelSelector::parse("app in (a").is_err());
        assert!(LabelSelector::parse("a b c").is_err());
        assert!(LabelSelector::parse("=x").is_err());
        assert!(LabelSelector::parse("a,,b").is_err());
    }

    #[test]
    fn field_selector_forms() {
        let obj = json!({"metadata": {"name": "a", "namespace": "ns"}, "spec": {"replicas": 3}});
        let m = |s: &str| FieldSelector::parse(s).map(|sel| sel.matches(&obj));
        assert_eq!(m("metadata.name=a"), Ok(true));
        assert_eq!(m("metadata.name==b"), Ok(false));
        assert_eq!(m("metadata.namespace!=ns"), Ok(false));
        assert_eq!(m("spec.replicas=3"), Ok(true));
        assert_eq!(m("spec.nodeName="), Ok(true));
        assert_eq!(m("metadata.name=a,metadata.namespace=ns"), Ok(true));
        assert!(FieldSelector::parse("nonsense").is_err());
        assert!(FieldSelector::parse("a..b=c").is_err());
    }
}
