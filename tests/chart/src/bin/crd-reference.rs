//! Prints the CRD reference (markdown) generated from the Rust CRD types:
//! `cargo run -p causeway-chart-tests --bin crd-reference > docs/crd-reference.md`
//!
//! With `--write` it instead refreshes both generated copies that live outside crds/: docs/crd-reference.md and the
//! chart's charts/causeway/crds/causeway.io_crds.yaml (run it after changing the CRD types and crdgen).

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let reference = causeway_chart_tests::crd_reference::render();
    if std::env::args().nth(1).as_deref() != Some("--write") {
        print!("{reference}");
        return Ok(());
    }
    let root = causeway_chart_tests::repo_root();
    let doc = root.join("docs/crd-reference.md");
    std::fs::write(&doc, reference).with_context(|| format!("writing {}", doc.display()))?;
    let yaml = causeway_crds::render_yaml().context("rendering the CRDs")?;
    let chart = causeway_chart_tests::chart_dir().join("crds/causeway.io_crds.yaml");
    std::fs::write(&chart, yaml).with_context(|| format!("writing {}", chart.display()))?;
    eprintln!("wrote {} and {}", doc.display(), chart.display());
    Ok(())
}
