//! `gateway-node`: the processes of the gateway benchmark.
//!
//! - `gateway-node gw ...` runs one Switchyard gateway (the
//!   `switchyard-dataplane` crate, the same code the agent embeds) from a
//!   protobuf `PopView` file, and writes its bound addresses as JSON to
//!   `--ready` once the view is applied.
//! - `gateway-node echo ...` runs a TCP backend that greets each client
//!   with its name and a newline, then echoes everything back (half-close
//!   passed on).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use prost::Message;
use serde::Serialize;
use switchyard_dataplane::{GatewayConfig, GatewayIdentity, VipBind};
use switchyard_proto::pb;
use tokio::io::AsyncWriteExt;

#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run one gateway.
    Gw {
        /// This POP.
        #[arg(long)]
        pop: String,
        /// Certificate chain PEM file (a gateway identity).
        #[arg(long)]
        cert: PathBuf,
        /// Private key PEM file.
        #[arg(long)]
        key: PathBuf,
        /// CA PEM file.
        #[arg(long)]
        ca: PathBuf,
        /// Trust domain.
        #[arg(long)]
        domain: String,
        /// QUIC tunnel listen address.
        #[arg(long, default_value = "127.0.0.1:0")]
        tunnel: SocketAddr,
        /// The view: a protobuf-encoded `PopView`.
        #[arg(long)]
        view: PathBuf,
        /// Bind VIP listeners on this address with OS-chosen ports instead
        /// of the VIPs.
        #[arg(long)]
        listen_ip: Option<IpAddr>,
        /// Probe interval, ms.
        #[arg(long, default_value_t = 100)]
        probe_interval_ms: u64,
        /// Where to write the bound addresses (JSON) once ready.
        #[arg(long)]
        ready: PathBuf,
    },
    /// Run a greeting echo backend.
    Echo {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Name sent as the first line to each client.
        #[arg(long)]
        name: String,
        /// Where to write the bound address once listening.
        #[arg(long)]
        ready: PathBuf,
    },
}

/// What `gw` writes to `--ready`.
#[derive(Debug, Serialize)]
struct Ready {
    tunnel: SocketAddr,
    /// `ns/name:port` -> bound address.
    listeners: std::collections::BTreeMap<String, SocketAddr>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // One core per system under test: one worker thread (the
    // current-thread scheduler with GATEWAY_NODE_RUNTIME=current).
    let rt = if std::env::var("GATEWAY_NODE_RUNTIME").as_deref() == Ok("current") {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?
    };
    rt.block_on(async move {
        match args.cmd {
            Cmd::Gw {
                pop,
                cert,
                key,
                ca,
                domain,
                tunnel,
                view,
                listen_ip,
                probe_interval_ms,
                ready,
            } => {
                let read = |p: &PathBuf| {
                    std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))
                };
                let identity = GatewayIdentity {
                    cert_chain_pem: read(&cert)?,
                    key_pem: read(&key)?,
                    ca_pem: read(&ca)?,
                    domain,
                };
                let bytes =
                    std::fs::read(&view).with_context(|| format!("read {}", view.display()))?;
                let view = pb::PopView::decode(bytes.as_slice()).context("decode view")?;
                let epoch = view.epoch;
                let mut cfg = GatewayConfig::new(pop, "gw0", tunnel, identity);
                if let Some(ip) = listen_ip {
                    cfg.vip_bind = VipBind::Ephemeral(ip);
                }
                cfg.probe_interval = Duration::from_millis(probe_interval_ms);
                let (_tx, rx) = tokio::sync::watch::channel(Some(view));
                let gw = switchyard_dataplane::start(cfg, rx).await?;
                gw.applied_epoch().wait_for(|e| *e >= epoch).await?;
                let r = Ready {
                    tunnel: gw.tunnel_addr,
                    listeners: gw
                        .listeners()
                        .into_iter()
                        .map(|l| (format!("{}:{}", l.service, l.port), l.addr))
                        .collect(),
                };
                let tmp = ready.with_extension("tmp");
                std::fs::write(&tmp, serde_json::to_vec(&r)?)?;
                std::fs::rename(&tmp, &ready)?;
                tokio::signal::ctrl_c().await?;
                gw.shutdown().await;
                Ok(())
            }
            Cmd::Echo {
                listen,
                name,
                ready,
            } => {
                // A deep accept queue: the bench opens connections in
                // bursts of hundreds.
                let sock = if listen.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                sock.set_reuseaddr(true)?;
                sock.bind(listen)?;
                let l = sock.listen(4096)?;
                let tmp = ready.with_extension("tmp");
                std::fs::write(&tmp, serde_json::to_vec(&l.local_addr()?)?)?;
                std::fs::rename(&tmp, &ready)?;
                let greeting = format!("{name}\n").into_bytes();
                loop {
                    let (s, _) = l.accept().await?;
                    let greeting = greeting.clone();
                    tokio::spawn(async move {
                        let _ = s.set_nodelay(true);
                        let (mut r, mut w) = s.into_split();
                        if w.write_all(&greeting).await.is_err() {
                            return;
                        }
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        let _ = w.shutdown().await;
                    });
                }
            }
        }
    })
}
