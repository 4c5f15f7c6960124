//! The ctl's connection: a config file (as `tapgraph-controller operator issue` writes it) with the
//! controller address and the operator's CA, certificate and key, overridable by env and flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use tapgraph::config::{Layered, Sources};
use tapgraph::proto::admin_service_client::AdminServiceClient;
use tapgraph::transport::{self, ChannelOptions};
use tonic::transport::Channel;

/// Where the config file is looked for when neither --config nor TAPGRAPHCTL_CONFIG names one.
pub fn default_config_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("tapgraph").join("tapgraphctl.toml")
}

pub struct CtlConfig {
    pub controller: String,
    pub server_name: String,
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

const KNOWN: &[&str] = &["controller", "server_name", "ca_pem", "cert_pem", "key_pem"];

impl CtlConfig {
    /// Reads `file`, then applies `controller` and `server_name` overrides.
    pub fn load(
        file: &Path,
        controller: Option<String>,
        server_name: Option<String>,
    ) -> anyhow::Result<Self> {
        if !file.exists() {
            return Err(anyhow!(
                "no tapgraphctl config at {}: make one on the controller host with `tapgraph-controller operator issue NAME --out {}`, or pass --config",
                file.display(),
                file.display()
            ));
        }
        tapgraph::fsutil::check_private(file)
            .map_err(|e| anyhow!("{e} (it holds the operator key)"))?;
        let mut overrides = Vec::new();
        if let Some(c) = controller {
            overrides.push(("controller".to_string(), c));
        }
        if let Some(s) = server_name {
            overrides.push(("server_name".to_string(), s));
        }
        let sources = Sources {
            file: Some(file.to_path_buf()),
            env: Default::default(),
            overrides,
        };
        let mut c = Layered::load(&sources, KNOWN)?;
        let controller = c.string("controller", "127.0.0.1:7443");
        let default_name = controller
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string())
            .unwrap_or_else(|| controller.clone());
        let server_name = c.string("server_name", &default_name);
        let mut pem = |key: &str| {
            let v = c.string(key, "");
            if v.is_empty() {
                c.fail(key, "required (PEM text)");
            }
            v
        };
        let (ca_pem, cert_pem, key_pem) = (pem("ca_pem"), pem("cert_pem"), pem("key_pem"));
        let config = c.finish(Self {
            controller,
            server_name,
            ca_pem,
            cert_pem,
            key_pem,
        })?;
        Ok(config)
    }

    /// Connects to the controller's AdminService.
    pub async fn admin(&self) -> anyhow::Result<AdminServiceClient<Channel>> {
        let roots = tapgraph::tls::roots_from_pem(self.ca_pem.as_bytes())
            .map_err(|e| anyhow!("ca_pem: {e}"))?;
        let chain = tapgraph::tls::parse_certs(self.cert_pem.as_bytes()).map_err(|e| match e {
            tapgraph::tls::PemError::NoCertificate => anyhow!("cert_pem: no certificate"),
            e => anyhow!("cert_pem: {e}"),
        })?;
        let key = tapgraph::tls::parse_key(self.key_pem.as_bytes())
            .map_err(|e| anyhow!("key_pem: {e}"))?;
        let tls = tapgraph::tls::client_config(roots, Some((chain, key)))?;
        let options = ChannelOptions {
            connect_timeout: Duration::from_secs(5),
            ..ChannelOptions::default()
        };
        let channel = transport::connect(&self.controller, &self.server_name, tls, &options)
            .await
            .with_context(|| format!("cannot reach the controller at {}", self.controller))?;
        // The controller's answers have no size bound (an agent list of a large fleet, a map
        // from an old controller without StreamGraph): tonic's 4 MiB default would refuse them.
        // The controller is the operator's own, reached over mTLS.
        Ok(AdminServiceClient::new(channel).max_decoding_message_size(usize::MAX))
    }
}
