//! Prints the CRD reference (markdown) generated from the Rust CRD types:
//! `cargo run -p causeway-chart-tests --bin crd-reference > docs/crd-reference.md`

fn main() {
    print!("{}", causeway_chart_tests::crd_reference::render());
}
