//! Compiles the agent's BPF program (`bpf/connect.bpf.c`) with clang into `OUT_DIR`, where
//! `src/bpf.rs` embeds it with `include_bytes!`.
//!
//! clang and libbpf's headers are build requirements, like libpcap: without them the build fails
//! and says to run `scripts/install-deps`, rather than building an agent that silently cannot
//! name the process of a short-lived connection. (Where the kernel refuses the program at run
//! time, the agent falls back and says so; that is a property of the host, not of the build.)
//! `TAPGRAPH_CLANG` names another clang.

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = "bpf/connect.bpf.c";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-env-changed=TAPGRAPH_CLANG");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("connect.bpf.o");
    let clang = std::env::var("TAPGRAPH_CLANG").unwrap_or_else(|_| "clang".into());
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    // `-target bpf` does not search the multiarch include directory that holds <asm/types.h>.
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        fail("libbpf's headers (/usr/include/bpf/bpf_helpers.h) are missing: install libbpf-dev");
    }
    let result = Command::new(&clang)
        .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
        .arg(format!("-D__TARGET_ARCH_{}", target_arch_macro(&arch)))
        .arg("-I")
        .arg(&multiarch)
        .arg("-c")
        .arg(SOURCE)
        .arg("-o")
        .arg(&object)
        .status();
    match result {
        Ok(status) if status.success() => {}
        Ok(status) => fail(&format!(
            "`{clang} -target bpf` failed on {SOURCE} ({status})"
        )),
        Err(e) => fail(&format!(
            "cannot run `{clang}` to compile {SOURCE}: {e}; the agent's BPF program needs clang"
        )),
    }
}

/// libbpf's name for the architecture (`bpf_tracing.h`), for completeness of the build flags.
fn target_arch_macro(arch: &str) -> &str {
    match arch {
        "x86_64" => "x86",
        "aarch64" => "arm64",
        "powerpc64" => "powerpc",
        "s390x" => "s390",
        other => other,
    }
}

fn fail(why: &str) -> ! {
    eprintln!(
        "error: tapgraph-agent: {why}.\n  Run `scripts/install-deps` (it installs clang, llvm and libbpf-dev on Debian/Ubuntu)."
    );
    std::process::exit(1);
}
