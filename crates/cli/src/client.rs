//! Connecting to the hub as an operator, from `admin.toml`.

use std::{path::PathBuf, sync::Arc};

use anyhow::{anyhow, Context, Result};
use switchyard_hub::server::{channel::tls_channel, AdminConfig, ALPN_H2};
use switchyard_pki::ExpectedPeer;
use switchyard_proto::pb::admin_client::AdminClient;
use tonic::transport::Channel;

/// Where the operator credential file is looked for when neither
/// `--config` nor `SWITCHYARD_CONFIG` names it.
pub fn default_config_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("switchyard").join("admin.toml")
}

/// An admin client and the hub address it talks to.
pub struct Admin {
    /// The gRPC client.
    pub client: AdminClient<Channel>,
    /// The hub node answering.
    pub addr: String,
}

/// Loads `admin.toml` and connects to the first hub node that answers.
pub async fn connect(config: Option<&PathBuf>) -> Result<Admin> {
    let path = config.cloned().unwrap_or_else(default_config_path);
    let cfg = AdminConfig::read(&path).map_err(|e| {
        anyhow!("cannot read the operator credentials: {e}. Pass --config PATH or set SWITCHYARD_CONFIG (the file `switchyard hub --bootstrap` wrote)")
    })?;
    let tls = switchyard_pki::client_config(
        Some((&cfg.cert_pem, &cfg.key_pem)),
        &cfg.ca_pem,
        ExpectedPeer::AnyHub {
            domain: cfg.domain.clone(),
        },
        vec![ALPN_H2.to_vec()],
    )
    .context("operator credentials in admin.toml are unusable")?;
    let tls = Arc::new(tls);
    let mut errors = Vec::new();
    for addr in &cfg.hubs {
        let channel = tls_channel(addr, tls.clone())?;
        let mut client = AdminClient::new(channel.clone());
        // A cheap call that proves the node is up and accepts us.
        match client.federation(switchyard_proto::pb::Empty {}).await {
            Ok(_) => {
                return Ok(Admin {
                    client: AdminClient::new(channel),
                    addr: addr.clone(),
                })
            }
            Err(s) => errors.push(format!("{addr}: {}", s.message())),
        }
    }
    Err(anyhow!(
        "no hub node answered ({}); check that the hub runs and that admin.toml lists its addresses",
        errors.join("; ")
    ))
}

/// Turns a gRPC status into one clear line naming the node.
pub fn status_err(addr: &str, s: tonic::Status) -> anyhow::Error {
    anyhow!("hub {addr}: {} ({:?})", s.message(), s.code())
}
