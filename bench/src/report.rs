//! Printing figures beside their baselines, and the `--enforce` exit code.

use std::process::ExitCode;

/// Flags every bench takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// Exit non-zero when a target is missed (timing targets are not enforced by default: shared CI machines are
    /// noisy, and the figures are for docs/benchmarks.md).
    #[arg(long)]
    pub enforce: bool,
    /// Repetitions of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

/// One bench's output.
pub struct Report {
    name: &'static str,
    enforce: bool,
    missed: Vec<String>,
}

impl Report {
    /// Prints the header: bench, date, commit, machine.
    pub fn start(name: &'static str, what: &str, common: &Common) -> Report {
        let commit = cmd("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
        let dirty = cmd("git", &["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
        let date = cmd("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_default();
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
        println!("== {name}: {what}");
        println!(
            "   date {date}, commit {commit}{}, {cores} cores, {} runs (median reported)",
            if dirty { " (+local changes)" } else { "" },
            common.runs
        );
        Report { name, enforce: common.enforce, missed: Vec::new() }
    }

    /// A figure and what it is.
    pub fn row(&self, label: &str, value: impl std::fmt::Display) {
        println!("   {label:<52} {value}");
    }

    /// A target and whether it was met.
    pub fn target(&mut self, what: &str, met: bool) {
        println!("   target {what:<45} {}", if met { "MET" } else { "MISSED" });
        if !met {
            self.missed.push(what.to_string());
        }
    }

    /// Exit code: failure only for a missed target under `--enforce`.
    pub fn finish(self) -> ExitCode {
        if self.missed.is_empty() {
            println!("   {}: all targets met", self.name);
            return ExitCode::SUCCESS;
        }
        println!("   {}: missed {:?}{}", self.name, self.missed, if self.enforce { "" } else { " (not enforced)" });
        if self.enforce {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    }
}

fn cmd(prog: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(prog).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Median of `xs` (0 when empty).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The `p`-th percentile (0..=100) of sorted `v`, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Formats several samples: `median (min–max)`.
pub fn spread(xs: &[f64], unit: &str, digits: usize) -> String {
    let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.digits$} {unit} (min {min:.digits$}, max {max:.digits$})", median(xs))
}

/// VmRSS of this process, in bytes, from /proc/self/status.
pub fn vm_rss() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow::anyhow!("no VmRSS line in /proc/self/status"))?;
    let kb: u64 = line.split_whitespace().nth(1).ok_or_else(|| anyhow::anyhow!("malformed VmRSS line"))?.parse()?;
    Ok(kb * 1024)
}
