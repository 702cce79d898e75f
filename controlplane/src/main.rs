//! The `rzab-controlplane` binary: parses the options, sets up logging, and either prints
//! something once (`--inspect`, `--openapi`) or runs the control plane until SIGINT/SIGTERM.
//!
//! Touches: stdout (one-shot output), stderr (logs), signals; the rest through the library.

use anyhow::Context;
use clap::Parser;
use rzab_controlplane::{ControlPlane, Options, inspect, openapi};
use tracing_subscriber::EnvFilter;

/// How long the exit waits for blocking tasks (registry calls) still running.
const RUNTIME_STOP: std::time::Duration = std::time::Duration::from_secs(2);

fn init_logging() {
    // r2d2 (inside the memcache client) logs every failed connection attempt; the registry
    // worker reports those itself, throttled.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,r2d2=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

async fn stop_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    if options.openapi {
        print!(
            "{}",
            openapi::document().context("rendering the OpenAPI document")?
        );
        return Ok(());
    }
    if options.inspect {
        let path = options.inspect_path()?;
        let status =
            inspect::inspect(&path).with_context(|| format!("attaching to {}", path.display()))?;
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let config = options.config()?;
    init_logging();
    // Every connection is a file descriptor: a low default soft limit would cut the
    // connection limit down (rzab_controlplane::http lowers it to what fits).
    if let Err(error) = rzab_controlplane::http::raise_open_file_limit() {
        tracing::warn!("could not raise the open-file limit: {error}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("rzab-cp")
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = runtime.block_on(async {
        let control_plane = ControlPlane::start(config)
            .await
            .context("starting rzab-controlplane")?;
        let stopped = stop_signal().await;
        tracing::info!("stopping");
        control_plane.shutdown().await;
        stopped
    });
    // A registry call still running on a blocking thread (bounded by its socket timeouts)
    // must not hold the exit up beyond this.
    runtime.shutdown_timeout(RUNTIME_STOP);
    result
}
