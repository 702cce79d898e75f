//! Starting and stopping one control plane: binds the REST listener, then runs the attach
//! supervisor (a tokio task), the registry worker (its own thread, because the memcache client
//! blocks) and the REST server ([`crate::http`] serving the axum router), until
//! [`ControlPlane::shutdown`], which gives requests in flight the configured grace and then
//! drops what is left.
//!
//! Touches: the listen socket, and through its parts the control block and the registry.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::attach::ATTACH_INTERVAL;
use crate::options::Config;
use crate::rest::{AppState, router};
use crate::state::Shared;
use crate::{http, metrics, registry};

/// Why a control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listening on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("setting up the metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("starting the registry thread: {0}")]
    Thread(std::io::Error),
}

/// A running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    shared: Arc<Shared>,
    attach_task: JoinHandle<()>,
    server_task: JoinHandle<()>,
    server_stop: Option<oneshot::Sender<()>>,
    registry_stop: Option<std::sync::mpsc::Sender<()>>,
    registry_thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlPlane {
    /// Starts every part on the current tokio runtime.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Listen {
                    address: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Listen {
            address: config.listen,
            source,
        })?;
        if config.generation_defaulted {
            tracing::warn!(
                "no --generation given: using `{}`; keys left by an earlier run with the same generation are only told apart by their heartbeats. Pass a fresh one per run (e.g. `date +%s%N`)",
                config.generation
            );
        }
        tracing::info!(
            node = config.node,
            cluster = %config.cluster,
            generation = %config.generation,
            block = %config.block.display(),
            registry = %config.registry,
            listen = %local_addr,
            "rzab-controlplane starting"
        );
        let shared = Arc::new(Shared::new(config, local_addr));
        shared.attachment.step();

        let attach_task = {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(ATTACH_INTERVAL);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    interval.tick().await;
                    shared.attachment.step();
                }
            })
        };

        let (registry_stop, stop_receiver) = std::sync::mpsc::channel();
        let registry_thread =
            registry::spawn(Arc::clone(&shared), stop_receiver).map_err(StartError::Thread)?;

        let state = AppState {
            metrics: Arc::new(metrics::registry(Arc::clone(&shared))?),
            shared: Arc::clone(&shared),
        };
        let (server_stop, stopped) = oneshot::channel::<()>();
        let limits = shared.config.http;
        let server_task = tokio::spawn(http::serve(listener, router(state), limits, async {
            let _ = stopped.await;
        }));
        Ok(ControlPlane {
            shared,
            attach_task,
            server_task,
            server_stop: Some(server_stop),
            registry_stop: Some(registry_stop),
            registry_thread: Some(registry_thread),
        })
    }

    /// The address the REST server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// The shared state (for tests and embedding).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops the server, the attach supervisor and the registry worker.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.server_stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.server_task).await {
            Ok(()) => {}
            Err(error) => tracing::warn!("REST server task failed: {error}"),
        }
        self.attach_task.abort();
        drop(self.registry_stop.take());
        if let Some(thread) = self.registry_thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        tracing::info!("rzab-controlplane stopped");
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.attach_task.abort();
        self.server_task.abort();
        // Dropping the sender stops the registry thread after its current round.
        drop(self.registry_stop.take());
    }
}
