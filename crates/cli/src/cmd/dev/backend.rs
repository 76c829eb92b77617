//! `switchyard dev backend`: the demo backend of one POP. Each service it
//! serves answers any HTTP GET with a line naming the service and the POP,
//! so a `curl` through a gateway shows where the request landed.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{bail, Context, Result};
use axum::{routing::get, Router};
use clap::Args;

/// Serve demo services that say which POP answered (used by `dev`).
#[derive(Debug, Args)]
pub struct BackendArgs {
    /// The POP this backend belongs to (named in every answer).
    #[arg(long)]
    pub pop: String,
    /// A service to serve, as `NAME.NAMESPACE` (repeatable); each gets its
    /// own listener on 127.0.0.1.
    #[arg(long = "serve", required = true)]
    pub services: Vec<String>,
    /// Ports to listen on, in the order of --serve (0 or missing: a free
    /// port).
    #[arg(long = "port", value_delimiter = ',')]
    pub ports: Vec<u16>,
    /// Write `{"<service>": "127.0.0.1:P", ...}` here once listening.
    #[arg(long)]
    pub ready_file: PathBuf,
}

/// The body a demo backend answers with.
pub fn answer(service: &str, pop: &str) -> String {
    format!("{service} served by {pop}\n")
}

pub async fn run(a: BackendArgs) -> Result<()> {
    if a.services.is_empty() {
        bail!("nothing to serve: give --serve NAME.NAMESPACE");
    }
    let mut bound = serde_json::Map::new();
    let mut tasks = Vec::new();
    for (i, svc) in a.services.iter().enumerate() {
        let port = a.ports.get(i).copied().unwrap_or(0);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("demo backend for {svc} cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        bound.insert(svc.clone(), serde_json::json!(local.to_string()));
        let body = answer(svc, &a.pop);
        let app = Router::new().fallback(get(move || {
            let body = body.clone();
            async move { body }
        }));
        tasks.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "demo backend stopped");
            }
        }));
    }
    let tmp = a.ready_file.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&bound)?)?;
    std::fs::rename(&tmp, &a.ready_file)?;
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}
