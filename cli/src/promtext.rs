//! A small reader for the Prometheus text exposition format: enough to pick samples out of a node agent's
//! `/metrics` page. Bad lines are skipped, never fatal: the page comes from another process over the network.

use std::collections::BTreeMap;

/// One sample: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses every well-formed sample line of `text`. Comments (`# HELP`, `# TYPE`, `# EOF`) and malformed lines are
/// ignored.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

/// Samples named `name`.
pub fn samples<'a>(all: &'a [Sample], name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
    all.iter().filter(move |s| s.name == name)
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, tail) = parse_labels(after)?;
        labels = parsed;
        rest = tail;
    }
    // The value, then an optional timestamp.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample { name: name.to_string(), labels, value })
}

/// Parses `k="v",k2="v2"}` and returns the labels and what follows the closing brace.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start();
        if let Some(tail) = s.strip_prefix('}') {
            return Some((labels, tail));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim();
        if key.is_empty() {
            return None;
        }
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.insert(key.to_string(), value);
        s = s[end + 1..].trim_start();
        if let Some(tail) = s.strip_prefix(',') {
            s = tail;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_labels_values_and_skips_junk() {
        let text = "# HELP causeway_x help\n# TYPE causeway_x gauge\n\
            causeway_x{egress_ip=\"192.0.2.1\",destination=\"203.0.113.5\"} 12\n\
            causeway_y 3.5 1700000000\n\
            causeway_z{a=\"q\\\"uote\\\\\",} +Inf\n\
            garbage line here\n\
            causeway_w{a=\"unterminated} 1\n\
            {a=\"b\"} 1\n";
        let s = parse(text);
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(s[0].name, "causeway_x");
        assert_eq!(s[0].labels["egress_ip"], "192.0.2.1");
        assert_eq!(s[0].labels["destination"], "203.0.113.5");
        assert_eq!(s[0].value, 12.0);
        assert_eq!(s[1].value, 3.5);
        assert_eq!(s[2].labels["a"], "q\"uote\\");
        assert!(s[2].value.is_infinite());
        assert_eq!(samples(&s, "causeway_y").count(), 1);
    }
}
