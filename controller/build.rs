//! The web console's built files (console/dist, from `npm run build`) are embedded into the
//! controller. Rebuild when they change, including when they first appear: the directory is made
//! here (empty) if missing, so Cargo has something to watch. A build without Node embeds nothing
//! and the controller serves a page that says how to build the console.

fn main() {
    let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../console/dist");
    // Best effort: a read-only source tree simply reruns this script every build.
    let _ = std::fs::create_dir_all(&dist);
    println!("cargo:rerun-if-changed={}", dist.display());
}
