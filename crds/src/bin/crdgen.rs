//! Prints every Causeway CRD as one multi-document YAML stream:
//! `cargo run -p causeway-crds --bin crdgen > crds/causeway.io_crds.yaml`

fn main() {
    match causeway_crds::render_yaml() {
        Ok(yaml) => print!("{yaml}"),
        Err(e) => {
            eprintln!("crdgen: {e}");
            std::process::exit(1);
        }
    }
}
