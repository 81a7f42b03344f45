//! Compiles every `bpf/*.bpf.c` into a BPF object in `OUT_DIR`, which `src/bpf` embeds with
//! `include_bytes_aligned!`. Clang is found as `$CAUSEWAY_CLANG`, then `clang-19`, then `clang`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn find_clang() -> Result<String, String> {
    let mut candidates = Vec::new();
    if let Ok(c) = env::var("CAUSEWAY_CLANG") {
        candidates.push(c);
    }
    candidates.push("clang-19".to_string());
    candidates.push("clang".to_string());
    for c in &candidates {
        if Command::new(c).arg("--version").output().map(|o| o.status.success()).unwrap_or(false) {
            return Ok(c.clone());
        }
    }
    Err(format!(
        "no clang found (tried {}): the eBPF programs in datapath/bpf are C and need clang with the BPF target. \
         Install Debian `clang-19` and `libbpf-dev` (scripts/install-deps.sh does), or set CAUSEWAY_CLANG.",
        candidates.join(", ")
    ))
}

fn main() {
    println!("cargo:rerun-if-env-changed=CAUSEWAY_CLANG");
    println!("cargo:rerun-if-changed=bpf");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let bpf_dir = manifest.join("bpf");
    let clang = match find_clang() {
        Ok(c) => c,
        Err(msg) => panic!("{msg}"),
    };
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&bpf_dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", bpf_dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".bpf.c"))
        .collect();
    sources.sort();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
        compile(&clang, src, &bpf_dir.join("include"), &out);
    }
    if let Ok(entries) = std::fs::read_dir(bpf_dir.join("include")) {
        for e in entries.flatten() {
            println!("cargo:rerun-if-changed={}", e.path().display());
        }
    }
}

fn compile(clang: &str, src: &Path, include: &Path, out: &Path) {
    let file = src.file_name().and_then(|f| f.to_str()).unwrap_or_default();
    let stem = file.trim_end_matches(".bpf.c");
    let obj = out.join(format!("{stem}.bpf.o"));
    let output = Command::new(clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf", "-D__TARGET_ARCH_x86"])
        .arg("-I/usr/include/x86_64-linux-gnu")
        .arg(format!("-I{}", include.display()))
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(&obj)
        .output()
        .unwrap_or_else(|e| panic!("running {clang}: {e}"));
    if !output.status.success() {
        panic!(
            "{clang} failed on {}:\n{}{}",
            src.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
