//! Command-line definition and dispatch.

mod agent;
mod dev;
mod gateway;
mod hub;
mod ops;
mod service;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::output::Format;

/// Switchyard federates many small sites (POPs) into one service namespace
/// and moves traffic away from a site within a second when it goes dark.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct Global {
    /// Operator credential file written by `hub --bootstrap` (default:
    /// ~/.config/switchyard/admin.toml).
    #[arg(long, global = true, env = "SWITCHYARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Output format of listings.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How logs are written (to stderr).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a hub node, or manage hub members (`hub members list|remove`).
    Hub(hub::HubArgs),
    Agent(agent::AgentArgs),
    Gateway(gateway::GatewayArgs),
    /// A whole federation on this machine, on loopback: hub nodes, POPs
    /// (agent, DNS, gateway, demo backends), `dev kill|revive POP`.
    Dev(dev::DevArgs),
    /// Join tokens for new POPs and hub nodes.
    #[command(subcommand)]
    Token(ops::TokenCmd),
    /// POP records.
    #[command(subcommand)]
    Pop(ops::PopCmd),
    /// Traffic policies of global services.
    #[command(subcommand)]
    Policy(ops::PolicyCmd),
    /// Global services: `service list`, `service show NS/NAME [--from POP]`.
    #[command(subcommand)]
    Service(service::ServiceCmd),
    /// Why traffic for a service goes where it goes, seen from one POP.
    Explain {
        /// NAMESPACE/NAME.
        service: String,
        /// The POP whose decision table to explain.
        #[arg(long)]
        from: String,
    },
    /// The federation on one screen.
    Status,
}

/// Sets up `tracing` on stderr; `RUST_LOG` filters (default `info`, and
/// `warn` for `dev`, whose screen is for the newcomer's instructions; its
/// POPs log to files under the dev dir).
pub fn init_logging(cli: &Cli) {
    let g = &cli.global;
    let default = match cli.command {
        Command::Dev(_) => "warn,openraft=error",
        _ => "info,openraft=warn,h2=warn,tower=warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match g.log_format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> Result<()> {
    let g = &cli.global;
    match cli.command {
        Command::Hub(a) => hub::run(g, a).await,
        Command::Agent(a) => agent::run(g, a).await,
        Command::Gateway(a) => gateway::run(g, a).await,
        Command::Dev(a) => dev::run(g, a).await,
        Command::Token(c) => ops::token(g, c).await,
        Command::Pop(c) => ops::pop(g, c).await,
        Command::Policy(c) => ops::policy(g, c).await,
        Command::Service(c) => service::service(g, c).await,
        Command::Explain { service, from } => service::explain(g, service, from).await,
        Command::Status => ops::status(g).await,
    }
}
