//! The REST server's connection handling: accepts TCP connections and serves each with
//! hyper's HTTP/1.1 connection driver, under limits that keep a misbehaving client from
//! holding the server.
//!
//! - **Header timeout**: a connection must deliver a request's complete headers within
//!   [`HttpLimits::header_timeout`] of starting to wait for them (after it opens, and after each
//!   response on a keep-alive connection), or hyper closes it. This also bounds idle
//!   keep-alive connections. (The body timeout is the handlers' part, in `rest.rs`.)
//! - **Connection limit**: at most [`HttpLimits::max_connections`] connections (lowered to fit
//!   the open-file limit, see [`connection_budget`]). At the limit a new connection displaces
//!   the connection that has waited longest for a request; one that is inside a request is
//!   never displaced. Real clients send their headers at once, so the displaced connections are
//!   idle or stalled ones, and a flood of stalled connections cannot lock out `/v1/status`. If
//!   every connection is inside a request the new one gets an immediate 503 and is closed.
//! - **Lingering close**: a connection that hyper ends while the client may still be sending
//!   (a 413 for an oversize body, a 415, a 408) is half-closed (FIN after the response) and its
//!   remaining input read and discarded for up to [`LINGER`]. Closing a socket with unread
//!   input makes the kernel send a reset, which destroys the response in the client's receive
//!   buffer before the client reads it.
//! - **Graceful shutdown**: on stop, the listener closes, idle connections close at once,
//!   requests in flight get [`HttpLimits::shutdown_grace`] to finish, and whatever is left then
//!   (a client stalled mid-request, say) is dropped, so a stop always ends.
//!
//! Touches: the listening socket and the accepted connections; the log.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tower::ServiceExt;

pub use crate::options::HttpLimits;

/// How long a closing connection's remaining input is read and discarded.
pub const LINGER: Duration = Duration::from_secs(2);
/// Most bytes discarded while lingering (a client sending more is cut off).
pub const LINGER_BYTES: usize = 64 << 20;
/// File descriptors kept free for everything but connections: the registry's sockets, the
/// control block, the log, and a refused connection's 503.
pub const FD_RESERVE: u64 = 64;
/// How long a refused connection's 503 may take to write.
const REFUSE_WRITE: Duration = Duration::from_secs(1);
/// How long accepting pauses after running out of file descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(20);
/// How often accept errors are logged again.
const LOG_REPEAT: Duration = Duration::from_secs(10);

/// The open-file limit (soft), if it can be read.
pub fn open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own; no other memory is involved.
    let result = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (result == 0).then_some(limit.rlim_cur)
}

/// Raises the soft open-file limit to the hard one, so the connection limit is not cut down
/// by a low default soft limit (commonly 1024); returns the soft limit in force afterwards.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit from a struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        return Ok(raised.rlim_max);
    }
    Ok(limit.rlim_cur)
}

/// The connection limit that fits: `configured`, lowered so that connections and
/// [`FD_RESERVE`] fit in `open_files` (at least 1).
pub fn connection_budget(configured: usize, open_files: Option<u64>) -> usize {
    match open_files {
        Some(files) => {
            let fit = usize::try_from(files.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
            configured.min(fit).max(1)
        }
        None => configured,
    }
}

/// One open connection, as the limit sees it.
#[derive(Debug)]
struct Slot {
    /// True while a request is being served on it (HTTP/1.1 serves one at a time).
    busy: AtomicBool,
    /// When it last started waiting for a request, in nanoseconds since the server started.
    waiting_since: AtomicU64,
    /// Notified when another connection displaces this one.
    evict: Notify,
}

/// The open connections.
#[derive(Debug)]
struct Connections {
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
    started: Instant,
}

impl Connections {
    fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn len(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn open(&self, id: u64) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            busy: AtomicBool::new(false),
            waiting_since: AtomicU64::new(self.now()),
            evict: Notify::new(),
        });
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::clone(&slot));
        slot
    }

    fn close(&self, id: u64) {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// Tells the connection that has waited longest for a request to close, and stops
    /// counting it; false if every connection is inside a request.
    fn displace_oldest_waiting(&self) -> bool {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let victim = slots
            .iter()
            .filter(|(_, slot)| !slot.busy.load(Ordering::Acquire))
            .min_by_key(|(_, slot)| slot.waiting_since.load(Ordering::Relaxed))
            .map(|(id, _)| *id);
        match victim.and_then(|id| slots.remove(&id)) {
            Some(slot) => {
                // A permit is stored if the task is not waiting yet; it sees it next.
                slot.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Marks a connection busy for as long as one request is being served.
struct Busy {
    slot: Arc<Slot>,
    connections: Arc<Connections>,
}

impl Busy {
    fn new(slot: Arc<Slot>, connections: Arc<Connections>) -> Self {
        slot.busy.store(true, Ordering::Release);
        Busy { slot, connections }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.slot
            .waiting_since
            .store(self.connections.now(), Ordering::Relaxed);
        self.slot.busy.store(false, Ordering::Release);
    }
}

/// Removes a connection from the count when its task ends, however it ends.
struct Registered {
    id: u64,
    connections: Arc<Connections>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.connections.close(self.id);
    }
}

/// Serves `router` on `listener` under `limits` until `stop` resolves, then shuts down
/// gracefully (see the module docs). Returns once every connection has ended.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    stop: impl std::future::Future<Output = ()>,
) {
    let budget = connection_budget(limits.max_connections, open_file_limit());
    if budget < limits.max_connections {
        tracing::warn!(
            configured = limits.max_connections,
            allowed = budget,
            "--max-connections lowered to fit the open-file limit (RLIMIT_NOFILE minus {FD_RESERVE})"
        );
    }
    let connections = Arc::new(Connections {
        slots: Mutex::new(HashMap::new()),
        started: Instant::now(),
    });
    let (shutdown, shutting_down) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut next_id: u64 = 0;
    let mut last_error: Option<Instant> = None;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            biased;
            () = &mut stop => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    if connections.len() >= budget && !connections.displace_oldest_waiting() {
                        tasks.spawn(refuse(stream));
                        continue;
                    }
                    next_id = next_id.wrapping_add(1);
                    let slot = connections.open(next_id);
                    let registered = Registered { id: next_id, connections: Arc::clone(&connections) };
                    tasks.spawn(connection(
                        stream,
                        router.clone(),
                        limits,
                        slot,
                        registered,
                        shutting_down.clone(),
                    ));
                }
                Err(error) => {
                    if last_error.is_none_or(|at| at.elapsed() >= LOG_REPEAT) {
                        tracing::warn!("accepting a connection failed: {error}");
                        last_error = Some(Instant::now());
                    }
                    // Out of file descriptors (or another passing failure): connections
                    // closing, or being displaced by the next accepted one, free them.
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                }
            },
        }
    }
    drop(listener);
    let _ = shutdown.send(true);
    let open = tasks.len();
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "{} of {open} connections still open {} ms after the stop: dropped",
            tasks.len(),
            limits.shutdown_grace.as_millis()
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Answers a connection over the limit with a 503 and closes it.
async fn refuse(mut stream: TcpStream) {
    let body = r#"{"error":"too many connections","field":null,"allowed":null}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSE_WRITE, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// Serves one connection until it ends, is displaced, or the server stops.
async fn connection(
    stream: TcpStream,
    router: Router,
    limits: HttpLimits,
    slot: Arc<Slot>,
    registered: Registered,
    mut shutting_down: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let service = {
        let slot = Arc::clone(&slot);
        let connections = Arc::clone(&registered.connections);
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let router = router.clone();
            let busy = Busy::new(Arc::clone(&slot), Arc::clone(&connections));
            // Boxed: hyper hands the IO back (for the lingering close) only when the
            // service's future is Unpin.
            Box::pin(async move {
                let _busy = busy;
                let response: Result<_, Infallible> = router.oneshot(request).await;
                response
            })
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let mut connection = builder.serve_connection(TokioIo::new(stream), service);
    let mut stopping = *shutting_down.borrow();
    if stopping {
        std::pin::Pin::new(&mut connection).graceful_shutdown();
    }
    loop {
        let signalled = tokio::select! {
            result = std::future::poll_fn(|context| connection.poll_without_shutdown(context)) => {
                if let Err(error) = result {
                    // Header timeouts, resets, malformed requests: the client's doing.
                    tracing::debug!("connection ended: {error}");
                }
                break;
            }
            () = slot.evict.notified() => return,
            changed = shutting_down.changed(), if !stopping => changed.is_ok(),
        };
        stopping = true;
        if signalled {
            std::pin::Pin::new(&mut connection).graceful_shutdown();
        }
    }
    let mut stream = connection.into_parts().io.into_inner();
    // While stopping, nothing more is answered: no reason to hold the stop up.
    if !stopping && !*shutting_down.borrow() {
        tokio::select! {
            () = linger(&mut stream) => {}
            () = slot.evict.notified() => {}
            _ = shutting_down.changed() => {}
        }
    }
    drop(registered);
}

/// Half-closes the connection, then reads and discards what the client still sends, until it
/// closes its side, [`LINGER`] passes, or [`LINGER_BYTES`] were discarded.
async fn linger(stream: &mut TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(LINGER, async {
        let mut buffer = vec![0u8; 16 << 10];
        let mut discarded = 0usize;
        while discarded < LINGER_BYTES {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => discarded += read,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_fits_the_open_file_limit() {
        assert_eq!(connection_budget(1024, None), 1024);
        assert_eq!(connection_budget(1024, Some(20_000)), 1024);
        assert_eq!(
            connection_budget(1024, Some(256)),
            usize::try_from(256 - FD_RESERVE).unwrap()
        );
        assert_eq!(connection_budget(1024, Some(10)), 1);
    }

    #[test]
    fn the_longest_waiting_idle_connection_is_displaced_never_a_busy_one() {
        let connections = Arc::new(Connections {
            slots: Mutex::new(HashMap::new()),
            started: Instant::now(),
        });
        let first = connections.open(1);
        let _second = connections.open(2);
        let busy = Busy::new(Arc::clone(&first), Arc::clone(&connections));
        assert!(connections.displace_oldest_waiting());
        assert_eq!(connections.len(), 1, "the idle one went");
        assert!(connections.slots.lock().unwrap().contains_key(&1));
        assert!(
            !connections.displace_oldest_waiting(),
            "only a busy one left"
        );
        drop(busy);
        assert!(connections.displace_oldest_waiting());
        assert_eq!(connections.len(), 0);
    }
}
