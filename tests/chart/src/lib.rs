//! TEST HARNESS for what operators install: the Helm chart in `charts/causeway`, the kind configs in
//! `kind-configs/`, and the generated CRD reference in `docs/crd-reference.md`. Never a runtime dependency.
//!
//! Where it sits: after every component is built. The chart's manifests are rendered by a real `helm` binary
//! (`scripts/install-deps.sh` installs one), parsed into the k8s-openapi types, and every container command line is
//! handed to the real binary it runs (`<binary> <args> --help`), so a flag a binary does not accept fails a test.
//! The CRD reference is rendered from the same Rust CRD types as `crds/causeway.io_crds.yaml`.

pub mod crd_reference;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The chart directory.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/causeway")
}

/// The helm binary: `CAUSEWAY_HELM`, else `helm` on PATH. Missing is an error that says how to install it, never a
/// skip.
pub fn helm() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CAUSEWAY_HELM") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("helm");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("helm not found in PATH: run scripts/install-deps.sh (it installs helm), or set CAUSEWAY_HELM")
}

/// One rendered manifest: its kind, name and the document as JSON.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub source: String,
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
    pub doc: serde_json::Value,
}

/// Runs `helm template` on the chart with `--set`-style values (given as a YAML values file so that types are
/// kept), in `namespace`. Returns helm's error text as `Err` when rendering fails (for the validation tests).
pub fn helm_template(values_yaml: &str, namespace: &str, extra: &[&str]) -> Result<String> {
    let dir = tempfile_dir()?;
    let values = dir.join("values.yaml");
    std::fs::write(&values, values_yaml).context("writing the values file")?;
    let out = Command::new(helm()?)
        .args(["template", "causeway"])
        .arg(chart_dir())
        .args(["--namespace", namespace, "--values"])
        .arg(&values)
        .args(extra)
        .output()
        .context("running helm template")?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8(out.stdout).context("helm template printed non-UTF-8")
}

/// A private scratch directory (no tempfile dependency outside dev-dependencies).
fn tempfile_dir() -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "causeway-chart-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Splits helm's output into documents, keeping the `# Source:` template name of each.
pub fn parse_manifests(rendered: &str) -> Result<Vec<Manifest>> {
    // Documents are separated by lines that are exactly `---` (a `---` inside a value is not a separator).
    let mut chunks: Vec<String> = vec![String::new()];
    for line in rendered.lines() {
        if line.trim_end() == "---" {
            chunks.push(String::new());
        } else if let Some(current) = chunks.last_mut() {
            current.push_str(line);
            current.push('\n');
        }
    }
    let mut out = Vec::new();
    for chunk in &chunks {
        let source = chunk.lines().find_map(|l| l.strip_prefix("# Source: ")).map(str::to_string).unwrap_or_default();
        let value: serde_yaml::Value =
            serde_yaml::from_str(chunk).with_context(|| format!("document from {source} is not YAML:\n{chunk}"))?;
        if value.is_null() {
            continue;
        }
        let doc: serde_json::Value =
            serde_json::to_value(&value).with_context(|| format!("document from {source} is not JSON-like"))?;
        let kind = doc["kind"].as_str().with_context(|| format!("document from {source} has no kind"))?.to_string();
        let name = doc["metadata"]["name"]
            .as_str()
            .with_context(|| format!("{kind} from {source} has no metadata.name"))?
            .to_string();
        let namespace = doc["metadata"]["namespace"].as_str().map(str::to_string);
        out.push(Manifest { source, kind, name, namespace, doc });
    }
    Ok(out)
}

/// The directory holding the workspace's binaries: `CAUSEWAY_BIN_DIR`, or the cargo profile directory this test
/// binary was built into (`target/<profile>/deps/<test>` → `target/<profile>`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CAUSEWAY_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating the test binary")?;
    let mut dir = exe.parent().context("the test binary has no parent directory")?.to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Path of a workspace binary, or an error that says how to build it.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "binary {} not found: build the workspace binaries first (`cargo build --workspace --bins`, which \
             scripts/test.sh runs), or set CAUSEWAY_BIN_DIR",
            path.display()
        );
    }
    Ok(path)
}

/// What a binary's `--help` says about its flags.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// Long flags the binary accepts, with the environment variable that can stand in for each.
    pub env: BTreeMap<String, Option<String>>,
    /// Long flags the usage line lists as required.
    pub required: Vec<String>,
}

/// Reads `binary --help` (clap's format): every `--flag`, its `[env: NAME=]`, and the required flags of the
/// `Usage:` line.
pub fn flags_of(binary: &Path) -> Result<Flags> {
    let out = Command::new(binary).arg("--help").output().with_context(|| format!("running {binary:?} --help"))?;
    if !out.status.success() {
        bail!("{binary:?} --help failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut flags = Flags::default();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if let Some(usage) = trimmed.strip_prefix("Usage:") {
            // Required options are the ones outside [OPTIONS]: `--cluster-name <CLUSTER_NAME>`.
            flags.required = usage.split_whitespace().filter(|w| w.starts_with("--")).map(|w| w.to_string()).collect();
            continue;
        }
        // An option line: `  -x, --flag <VALUE>  text` or `      --flag <VALUE>  text`.
        let first = trimmed.split_whitespace().next().unwrap_or("");
        let long = if first.starts_with("--") {
            Some(first)
        } else if first.starts_with('-') && first.ends_with(',') {
            trimmed.split_whitespace().nth(1)
        } else {
            None
        };
        if let Some(long) = long.filter(|l| l.starts_with("--") && l.len() > 2) {
            let name = long.trim_end_matches(',').to_string();
            flags.env.insert(name.clone(), None);
            current = Some(name);
        }
        if let (Some(name), Some(pos)) = (&current, line.find("[env: ")) {
            let rest = &line[pos + 6..];
            let var = rest.split(['=', ']']).next().unwrap_or("").to_string();
            flags.env.insert(name.clone(), Some(var));
        }
    }
    if flags.env.is_empty() {
        bail!("{binary:?} --help lists no flags:\n{text}");
    }
    Ok(flags)
}

/// Expands Kubernetes' `$(VAR)` references in a container argument from `vars`.
pub fn expand_vars(arg: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = arg.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

/// Checks a container command line against the real binary: clap parses every argument (names and values, with
/// each value parser) before it acts on the trailing `--help`, so an unknown flag or an unparsable value fails here.
/// Then every flag the usage line marks as required must be given as an argument or through its environment
/// variable in `env`.
pub fn check_command_line(binary: &Path, args: &[String], env: &BTreeMap<String, String>) -> Result<()> {
    let out = Command::new(binary)
        .args(args)
        .arg("--help")
        // Only the container's environment: the test's own CAUSEWAY_* variables must not fill gaps.
        .env_clear()
        .envs(env)
        .output()
        .with_context(|| format!("running {binary:?}"))?;
    if !out.status.success() {
        bail!(
            "{} rejects the chart's arguments {args:?}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let flags = flags_of(binary)?;
    for req in &flags.required {
        let given = args.iter().any(|a| a == req || a.starts_with(&format!("{req}=")));
        let by_env = flags.env.get(req).cloned().flatten().is_some_and(|var| env.contains_key(&var));
        if !given && !by_env {
            bail!(
                "{} requires {req}, which the chart gives neither as an argument nor in the environment",
                binary.display()
            );
        }
    }
    Ok(())
}

/// Runs `helm lint --strict` on the chart in `chart` with `values_yaml`; returns helm's output, or its complaints as
/// `Err`.
pub fn helm_lint(chart: &Path, values_yaml: &str, namespace: &str) -> Result<String> {
    let dir = tempfile_dir()?;
    let values = dir.join("values.yaml");
    std::fs::write(&values, values_yaml).context("writing the values file")?;
    let out = Command::new(helm()?)
        .args(["lint", "--strict", "--namespace", namespace, "--values"])
        .arg(&values)
        .arg(chart)
        .output()
        .context("running helm lint")?;
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("{}", text.trim());
    }
    Ok(text)
}
