//! `tapgraph-controller operator issue`: an operator certificate and a ready tapgraphctl config.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use tapgraph::identity::Identity;

use crate::config::ControllerConfig;
use crate::enrollment::ca::ControllerPki;
use crate::store::{Store, StoreSettings};

/// The address tapgraphctl should dial: `listen`, or the first server name with its port when the
/// controller listens on every address.
fn dial_address(config: &ControllerConfig) -> String {
    let listen: SocketAddr = config.listen;
    if !listen.ip().is_unspecified() {
        return listen.to_string();
    }
    let host = config
        .pki
        .server_names
        .first()
        .cloned()
        .unwrap_or_else(|| "localhost".into());
    if host.contains(':') {
        format!("[{host}]:{}", listen.port())
    } else {
        format!("{host}:{}", listen.port())
    }
}

/// The controller's PKI as the daemon loads it: for replicas sharing a database, the CA they
/// share (so the operator's certificate works against every replica), read from the database on a
/// runtime of its own. The embedded store is not opened: the running controller holds it.
fn load_pki(config: &ControllerConfig) -> anyhow::Result<ControllerPki> {
    let context = || format!("PKI in {}", config.pki.dir.display());
    let StoreSettings::Postgres(_) = &config.store else {
        return ControllerPki::load(&config.pki, None)
            .map_err(anyhow::Error::msg)
            .with_context(context);
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    runtime.block_on(async {
        let store = Store::connect(&config.store, &config.state_dir, &config.replica).await?;
        ControllerPki::load(&config.pki, Some((&store, &config.replica)))
            .map_err(anyhow::Error::msg)
            .with_context(context)
    })
}

pub fn issue(
    config: &ControllerConfig,
    name: &str,
    out: Option<PathBuf>,
    address: Option<String>,
    lifetime: &str,
) -> anyhow::Result<()> {
    let identity = Identity::operator(name)?;
    let lifetime = tapgraph::units::parse_duration(lifetime).context("--lifetime")?;
    if lifetime.as_secs() < 60 {
        bail!("--lifetime must be at least 1m");
    }
    let pki = load_pki(config)?;
    let cert = pki.ca.issue(&identity, &[], lifetime)?;
    let address = address.unwrap_or_else(|| dial_address(config));
    let server_name = address
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string())
        .unwrap_or_else(|| address.clone());
    let text = format!(
        "# tapgraphctl configuration for operator {name}, issued by the controller CA\n\
         # {fingerprint}. Keep it private: it holds the operator's key.\n\
         controller = \"{address}\"\n\
         server_name = \"{server_name}\"\n\
         ca_pem = \"\"\"\n{ca}\"\"\"\n\
         cert_pem = \"\"\"\n{cert}\"\"\"\n\
         key_pem = \"\"\"\n{key}\"\"\"\n",
        fingerprint = pki.fingerprint(),
        ca = pki.ca.cert_pem(),
        cert = cert.cert_pem,
        key = cert.key_pem,
    );
    let out = out.unwrap_or_else(|| PathBuf::from(format!("tapgraphctl-{name}.toml")));
    // `-`: the config on stdout, for `kubectl exec … > alice.toml` from a pod without a shell.
    if out.as_os_str() == "-" {
        print!("{text}");
        eprintln!("Operator {name}: tapgraphctl config written to stdout (it holds a private key)");
        return Ok(());
    }
    tapgraph::fsutil::write_private(&out, text.as_bytes())
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "Operator {name}: tapgraphctl config written to {}",
        out.display()
    );
    println!("  export TAPGRAPHCTL_CONFIG={}", out.display());
    println!("  tapgraphctl agent list");
    Ok(())
}
