//! Writes the CRD YAML into `charts/tollgate/files/crds/` (or the directory given as the argument).

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/tollgate/files/crds")
        });
    std::fs::create_dir_all(&dir)?;
    for (file, yaml) in tollgate_crds::crdgen::render() {
        std::fs::write(dir.join(file), yaml)?;
        println!("wrote {}", dir.join(file).display());
    }
    Ok(())
}
