//! `comm-aggregator [--config PATH]`: the service. Loads the configuration, sets up the
//! logs, and runs [`comm_aggregator::run`] until SIGTERM or SIGINT.

use comm_aggregator::app::otel;
use comm_aggregator::config::{self, Config};
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: comm-aggregator [--config PATH]";

fn main() -> ExitCode {
    let path = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Run(p)) => p,
        Ok(Command::Help) => {
            println!(
                "{USAGE}\nSee README.md for the settings. Environment variables:\n{}",
                config::env_help()
            );
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let cfg = match Config::from_process_env(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let traces = init_tracing(&cfg);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(comm_aggregator::run(cfg, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("comm-aggregator: {e}");
            ExitCode::FAILURE
        }
    };
    // After the shutdown's stages: the spans they ended are exported too.
    if let Some(p) = traces {
        otel::shutdown(p);
    }
    code
}

enum Command {
    /// Run with the configuration file named by `--config` (default `config.toml`).
    Run(PathBuf),
    Help,
}

#[derive(Debug, thiserror::Error)]
enum UsageError {
    #[error("--config needs a path")]
    ConfigWithoutPath,
    #[error("unknown argument {0:?}; {USAGE}")]
    Unknown(String),
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Command, UsageError> {
    let mut path = PathBuf::from("config.toml");
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" => path = args.next().ok_or(UsageError::ConfigWithoutPath)?.into(),
            "--help" | "-h" => return Ok(Command::Help),
            _ => return Err(UsageError::Unknown(a)),
        }
    }
    Ok(Command::Run(path))
}

/// The logs (text or JSON), and the OpenTelemetry layer when traces are exported: its
/// provider is returned, to be flushed once the service has stopped.
fn init_tracing(cfg: &Config) -> Option<SdkTracerProvider> {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,warp=warn"));
    // Colour only for a person at a terminal: a log file or journald gets plain text.
    let ansi = std::io::stdout().is_terminal();
    let json = cfg.server.log_format == "json";
    let provider = otel::provider().unwrap_or_else(|e| {
        eprintln!("comm-aggregator: traces off, the exporter cannot be built: {e}");
        None
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(json.then(|| tracing_subscriber::fmt::layer().json().with_ansi(false)))
        .with((!json).then(|| tracing_subscriber::fmt::layer().with_ansi(ansi)))
        .with(provider.as_ref().map(otel::layer))
        .init();
    provider
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
