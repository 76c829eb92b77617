//! Serves the POP zone of a view read from a file, through the agent's
//! `--dns` code path (`switchyard_dns::server::follow` over a view watch,
//! `zone::build`, `DnsServer`), for the DNS benchmark: a process that can
//! be pinned to a core without an agent, a hub or enrolment.
//!
//! `dns-serve --view FILE --listen 127.0.0.1:0 [--workers N] [--ready-file F]`
//! where FILE is a protobuf-encoded `PopView`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use prost::Message;
use switchyard_dns::{DnsConfig, DnsServer};
use switchyard_proto::pb;
use tokio::sync::watch;

#[derive(Debug, Parser)]
struct Args {
    /// Protobuf-encoded PopView.
    #[arg(long)]
    view: PathBuf,
    /// UDP and TCP listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// UDP sockets/threads (0: one per available core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Write the bound address here once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bytes = std::fs::read(&args.view)
        .with_context(|| format!("cannot read {}", args.view.display()))?;
    let view = pb::PopView::decode(bytes.as_slice()).context("the view file does not decode")?;
    let (_views, rx) = watch::channel(Some(view));
    let (tables, _task) = switchyard_dns::server::follow(rx, |v: &Option<pb::PopView>| {
        switchyard_dns::zone::build(v.as_ref()).ok()
    });
    let names = tables.borrow().names();
    let server = DnsServer::bind(
        DnsConfig {
            listen: args.listen,
            udp_workers: args.workers,
            ..Default::default()
        },
        tables,
    )
    .await
    .context("cannot bind")?;
    let addr = server.local_addr();
    if let Some(p) = &args.ready_file {
        std::fs::write(p, addr.to_string())?;
    }
    eprintln!("dns-serve: {names} names on {addr}");
    tokio::signal::ctrl_c().await?;
    server.shutdown();
    Ok(())
}
