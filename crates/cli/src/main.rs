//! `switchyard`: run and operate a Switchyard federation.

mod client;
mod cmd;
mod heap;
mod output;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    heap::limit_arenas();
    let cli = cmd::Cli::parse();
    cmd::init_logging(&cli);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(cmd::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One clear line: what failed, where, and what to do next.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
