//! The REST API (axum): health, status, knobs (read and change, per node or cluster-wide),
//! endpoints, Prometheus metrics and the OpenAPI document. Every error is a JSON
//! [`ErrorBody`] with a 4xx or 5xx status.
//!
//! Request bodies must be JSON, small, and arrive within the body timeout (415, 413, 408);
//! a knob change answers 200 only once the values are in force on every worker it is for, 202
//! while some have not confirmed it yet.
//!
//! Touches: the attached control block (reads; knob writes through `ControlBlock::set_knobs`,
//! which validates everything before applying anything), the registry (cluster-scoped knob
//! updates, and reading peers' records to report which nodes applied them).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body_util::BodyExt;
use rzab_shared::{AttachedControlBlock, ControlBlock, EndpointAddress, Knob, SyncState};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use crate::knobs::{KnobFieldError, KnobView, knob_names, parse_changes, views};
use crate::metrics;
use crate::openapi::ApiDoc;
use crate::registry::{Keys, KnobsApply, NodeRecord, PeerView, RegistryClient, RegistryError};
use crate::state::{Shared, dataplane_fresh, dataplane_heartbeat_age, dataplane_up, now_ns};

/// How long a knob change waits for the data plane's workers to confirm it (the wait ends as
/// soon as they have; workers check once per loop iteration, which a loaded machine delays).
pub const WORKER_CONFIRM_WAIT: Duration = Duration::from_secs(1);
/// How long a cluster-scoped knob change waits for the other nodes to report it in force.
pub const CLUSTER_CONFIRM_WAIT: Duration = Duration::from_secs(2);

/// What every handler gets.
#[derive(Clone, Debug)]
pub struct AppState {
    pub shared: Arc<Shared>,
    pub metrics: Arc<prometheus::Registry>,
}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
    /// The offending field (a knob name, `scope`, `body`, `content-type`), if one is to blame.
    pub field: Option<String>,
    /// What would have been accepted there.
    pub allowed: Option<String>,
}

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    fn new(
        status: StatusCode,
        error: String,
        field: Option<&str>,
        allowed: Option<String>,
    ) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                error,
                field: field.map(str::to_owned),
                allowed,
            },
        }
    }

    fn not_attached(shared: &Shared) -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not attached to the control block {}: {}",
                shared.attachment.path().display(),
                shared.attachment.waiting_reason()
            ),
            None,
            None,
        )
    }
}

impl From<KnobFieldError> for ApiError {
    fn from(error: KnobFieldError) -> Self {
        let status = if error.out_of_range {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::new(
            status,
            error.message,
            Some(error.field.as_deref().unwrap_or("body")),
            Some(error.allowed),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    (status, axum::Json(value)).into_response()
}

/// The REST router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/status", get(status))
        .route("/v1/knobs", get(get_knobs).patch(patch_knobs))
        .route("/v1/endpoints", get(endpoints))
        .route("/metrics", get(prometheus_metrics))
        .route("/openapi.json", get(openapi_document))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such route".to_owned(),
        None,
        Some("/healthz, /v1/status, /v1/knobs, /v1/endpoints, /metrics, /openapi.json".to_owned()),
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route".to_owned(),
        None,
        Some("GET (and PATCH on /v1/knobs)".to_owned()),
    )
}

/// Health: attached, and the data plane's heartbeat fresh.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Health {
    pub ok: bool,
    pub node: u32,
    pub attached: bool,
    pub lifecycle: Option<String>,
    pub dataplane_heartbeat_age_seconds: Option<f64>,
    pub registry_state: String,
    /// Why the node is not healthy (null when it is).
    pub reason: Option<String>,
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "status",
    responses(
        (status = 200, description = "Attached to the control block and the data plane's heartbeat is fresh", body = Health),
        (status = 503, description = "Not attached, the data plane is silent, or a pipeline hears nothing from its leader (no_leader), from a quorum (no_quorum), was left behind (fell_behind) or has no leader while an election runs (electing); `reason` says which", body = Health),
    )
)]
pub async fn healthz(State(state): State<AppState>) -> Response {
    let shared = &state.shared;
    let attached = shared.attachment.block();
    let block: Option<&ControlBlock> = attached.as_deref().map(|block| &**block);
    let reason = match block {
        None => Some(format!(
            "not attached to the control block: {}",
            shared.attachment.waiting_reason()
        )),
        Some(block) if !dataplane_fresh(block) => Some(match dataplane_heartbeat_age(block) {
            Some(age) => format!("the data plane's heartbeat is {age:.1} s old"),
            None => "the data plane has never beaten its heartbeat".to_owned(),
        }),
        Some(block) => crate::state::pipeline_trouble(block),
    };
    let health = Health {
        ok: reason.is_none(),
        node: shared.config.node,
        attached: block.is_some(),
        lifecycle: block.map(|block| block.lifecycle().name().to_owned()),
        dataplane_heartbeat_age_seconds: block.and_then(dataplane_heartbeat_age),
        registry_state: shared.registry.state().name().to_owned(),
        reason,
    };
    let status = if health.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, &health)
}

/// The registry exchange, as this node sees it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct RegistryView {
    pub address: String,
    /// unknown, connecting, unreachable, publishing, waiting_for_peers or ready.
    pub state: String,
    /// What the exchange is waiting for, or its last error.
    pub detail: String,
    pub generation: String,
    /// True when no --generation was given (keys of different runs may then meet).
    pub generation_defaulted: bool,
    /// The cluster knobs version applied to this node's data plane (0: none).
    pub knobs_version: u64,
}

/// One worker's pipeline.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct WorkerStatus {
    pub worker: u32,
    /// starting, catching_up or serving; in trouble: no_leader, no_quorum, fell_behind or electing
    /// (see docs/reliability.md).
    pub sync_state: String,
    /// The highest zxid this worker's node has applied, as the worker saw it.
    pub applied_zxid: u64,
    pub leader_zxid: u64,
    /// leader_zxid minus applied_zxid, 0 when not behind.
    pub replication_lag: u64,
    pub knob_epoch_seen: u64,
    /// Seconds since the worker's last report (null unless it publishes a wall-clock stamp).
    pub heartbeat_age_seconds: Option<f64>,
}

/// The attached data plane.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct DataplaneView {
    pub pid: u32,
    /// The data plane's instance, in hex (changes with every start).
    pub instance: String,
    /// Running with a fresh heartbeat.
    pub up: bool,
    pub uptime_seconds: Option<f64>,
    pub heartbeat_age_seconds: Option<f64>,
}

/// This control plane.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ControlplaneView {
    pub pid: u32,
    pub uptime_seconds: f64,
    pub listen: String,
    /// How many times a control block was attached (more than 1 after data-plane restarts).
    pub attaches: u64,
}

/// GET /v1/status.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct StatusResponse {
    pub cluster: String,
    pub generation: String,
    pub node: u32,
    /// leader or follower, as the data plane reports its pipelines' leader; electing while it
    /// has none and elects one; unknown until it says.
    pub role: String,
    pub block: String,
    pub attached: bool,
    /// Why the control block is not attached (null when it is).
    pub attach_error: Option<String>,
    pub transport: Option<String>,
    pub workers: Option<u32>,
    pub nodes: Option<u32>,
    pub lifecycle: Option<String>,
    /// The highest zxid applied by this node, over its workers.
    pub applied_zxid: Option<u64>,
    /// The largest replication lag over this node's workers.
    pub replication_lag: Option<u64>,
    pub knob_epoch: Option<u64>,
    /// Bumped each time the remote table is (re)written.
    pub peers_generation: Option<u64>,
    pub registry: RegistryView,
    pub peers: Vec<PeerView>,
    pub worker_status: Vec<WorkerStatus>,
    pub dataplane: Option<DataplaneView>,
    pub controlplane: ControlplaneView,
}

fn worker_status(block: &ControlBlock) -> Vec<WorkerStatus> {
    let workers = block.worker_count();
    let started = block.header.started_ns.load(Ordering::Relaxed);
    (0..workers)
        .map(|worker| {
            let gauges = &block.worker(worker as usize).gauges;
            let applied_zxid = gauges.applied_zxid.load(Ordering::Relaxed);
            let leader_zxid = gauges.leader_zxid.load(Ordering::Relaxed);
            let heartbeat = gauges.heartbeat_ns.load(Ordering::Relaxed);
            WorkerStatus {
                worker,
                sync_state: SyncState::from_code(gauges.sync_state.load(Ordering::Relaxed))
                    .name()
                    .to_owned(),
                applied_zxid,
                leader_zxid,
                replication_lag: leader_zxid.saturating_sub(applied_zxid),
                knob_epoch_seen: gauges.knob_epoch_seen.load(Ordering::Relaxed),
                // Only a wall-clock stamp from this data plane's lifetime means anything.
                heartbeat_age_seconds: (heartbeat != 0 && heartbeat >= started)
                    .then(|| now_ns().saturating_sub(heartbeat) as f64 / 1e9),
            }
        })
        .collect()
}

/// Builds the status document (also used by tests).
pub fn status_document(shared: &Shared) -> StatusResponse {
    let attached = shared.attachment.block();
    let block: Option<&ControlBlock> = attached.as_deref().map(|block| &**block);
    let workers = block.map(worker_status).unwrap_or_default();
    let instance = block.map(|block| block.header.instance.load(Ordering::Relaxed));
    StatusResponse {
        cluster: shared.config.cluster.clone(),
        generation: shared.config.generation.clone(),
        node: shared.config.node,
        role: shared.role().to_owned(),
        block: shared.attachment.path().display().to_string(),
        attached: block.is_some(),
        attach_error: block.is_none().then(|| shared.attachment.waiting_reason()),
        transport: block
            .and_then(ControlBlock::transport)
            .map(|kind| kind.name().to_owned()),
        workers: block.map(ControlBlock::worker_count),
        nodes: block.map(ControlBlock::node_count),
        lifecycle: block.map(|block| block.lifecycle().name().to_owned()),
        applied_zxid: block.map(|_| {
            workers
                .iter()
                .map(|worker| worker.applied_zxid)
                .max()
                .unwrap_or(0)
        }),
        replication_lag: block.map(|_| {
            workers
                .iter()
                .map(|worker| worker.replication_lag)
                .max()
                .unwrap_or(0)
        }),
        knob_epoch: block.map(ControlBlock::knob_epoch),
        peers_generation: block
            .map(|block| block.handshake.peers_generation.load(Ordering::Acquire)),
        registry: RegistryView {
            address: shared.config.registry.to_string(),
            state: shared.registry.state().name().to_owned(),
            detail: shared.registry.detail(),
            generation: shared.config.generation.clone(),
            generation_defaulted: shared.config.generation_defaulted,
            knobs_version: instance.map_or(0, |instance| shared.registry.knobs_version(instance)),
        },
        peers: shared.registry.peers(),
        worker_status: workers,
        dataplane: block.map(|block| {
            let started = block.header.started_ns.load(Ordering::Relaxed);
            DataplaneView {
                pid: block.header.owner_pid.load(Ordering::Relaxed),
                instance: format!("{:016x}", instance.unwrap_or(0)),
                up: dataplane_up(block),
                uptime_seconds: (started != 0)
                    .then(|| now_ns().saturating_sub(started) as f64 / 1e9),
                heartbeat_age_seconds: dataplane_heartbeat_age(block),
            }
        }),
        controlplane: ControlplaneView {
            pid: std::process::id(),
            uptime_seconds: shared.started.elapsed().as_secs_f64(),
            listen: shared.local_addr.to_string(),
            attaches: shared.attachment.attach_count(),
        },
    }
}

#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "status",
    responses((status = 200, description = "The node's state: role, data plane, registry, peers, pipelines", body = StatusResponse))
)]
pub async fn status(State(state): State<AppState>) -> Response {
    json(StatusCode::OK, &status_document(&state.shared))
}

/// GET /v1/knobs.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct KnobsResponse {
    pub node: u32,
    pub attached: bool,
    /// Changes after every knob update (null when not attached).
    pub epoch: Option<u64>,
    pub knobs: Vec<KnobView>,
}

#[utoipa::path(
    get,
    path = "/v1/knobs",
    tag = "knobs",
    responses((status = 200, description = "Every live knob with its value, range and help; values are null while not attached", body = KnobsResponse))
)]
pub async fn get_knobs(State(state): State<AppState>) -> Response {
    let block = state.shared.attachment.block();
    let control: Option<&ControlBlock> = block.as_deref().map(|block| &**block);
    json(
        StatusCode::OK,
        &KnobsResponse {
            node: state.shared.config.node,
            attached: block.is_some(),
            epoch: control.map(ControlBlock::knob_epoch),
            knobs: views(control),
        },
    )
}

/// A PATCH body: knob name -> new value (boolean, integer or choice name, per the knob). Its
/// schema ([`crate::knobs::changes_schema`]) is built from the knob definitions, so it names
/// exactly the knobs, types, ranges and choices the server accepts.
#[derive(Clone, Debug)]
pub struct KnobChanges;

impl utoipa::PartialSchema for KnobChanges {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        crate::knobs::changes_schema(1).into()
    }
}

impl ToSchema for KnobChanges {}

/// The values of a knob change, in canonical form (the schema of [`KnobChanges`], without its
/// minimum of one knob).
#[derive(Clone, Debug)]
pub struct KnobValues;

impl utoipa::PartialSchema for KnobValues {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        crate::knobs::changes_schema(0).into()
    }
}

impl ToSchema for KnobValues {}

/// Whether the data plane's workers have picked a change up.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct DataplaneConfirmation {
    /// The data plane is running with a fresh heartbeat (otherwise nothing was waited for).
    pub running: bool,
    pub workers: u32,
    /// Workers whose knob_epoch_seen reached the new epoch.
    pub workers_seen: u32,
    pub all_seen: bool,
    /// How long the control plane waited for the workers, in milliseconds.
    pub waited_ms: f64,
    pub note: String,
}

/// Where a knob change is in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// In force on every worker (of this node, or for scope=cluster of every node): 200.
    Applied,
    /// Stored (in this node's control block, and for scope=cluster in the registry), but not
    /// every worker has confirmed it within the wait, or the data plane is not running: 202.
    /// Workers that have not confirmed it yet pick it up on their next iteration.
    Pending,
}

/// Which nodes a knob change is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// This node only (the default).
    Node,
    /// Every node, through the registry.
    Cluster,
}

/// PATCH /v1/knobs.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct PatchResponse {
    /// applied (200): in force on every worker; pending (202): stored, not yet confirmed by
    /// every worker.
    pub outcome: Outcome,
    pub scope: Scope,
    pub node: u32,
    /// The values changed, in canonical form.
    #[schema(value_type = KnobValues)]
    pub values: serde_json::Map<String, serde_json::Value>,
    /// This node's knob epoch after the change (null when not attached).
    pub epoch: Option<u64>,
    pub dataplane: DataplaneConfirmation,
    /// The cluster knobs version written to the registry (scope=cluster).
    pub registry_version: Option<u64>,
    /// Nodes whose every worker has picked that version up (scope=cluster).
    pub nodes_applied: Option<Vec<u32>>,
    /// Nodes that had not confirmed it within the wait (scope=cluster).
    pub nodes_pending: Option<Vec<u32>>,
}

fn parse_scope(query: Option<&str>) -> Result<Scope, ApiError> {
    let mut scope = Scope::Node;
    for pair in query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name != "scope" {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("unknown query parameter `{name}`"),
                Some(name),
                Some("scope".to_owned()),
            ));
        }
        scope = match value {
            "node" => Scope::Node,
            "cluster" => Scope::Cluster,
            other => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("unknown scope `{other}`"),
                    Some("scope"),
                    Some("node, cluster".to_owned()),
                ));
            }
        };
    }
    Ok(scope)
}

/// Largest request body accepted (a knobs object is a few hundred bytes).
pub const MAX_BODY_BYTES: usize = 64 << 10;

/// Whether a Content-Type names JSON (`application/json`, any parameters, any case).
fn is_json(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// Reads a request body that must be JSON: 415 for another (or no) Content-Type, 413 past
/// [`MAX_BODY_BYTES`] (from Content-Length before reading anything, or while reading a
/// chunked body), 408 if the whole body has not arrived within `timeout`. Whatever the client
/// still sends after a refusal is discarded by the connection's lingering close
/// ([`crate::http`]), so the refusal reaches it.
async fn read_json_body(
    headers: &HeaderMap,
    body: Body,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|value| value.to_str().unwrap_or("(not text)"));
    if !content_type.is_some_and(is_json) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "the body must be application/json, not {}; nothing was applied",
                content_type.unwrap_or("unspecified")
            ),
            Some("content-type"),
            Some("application/json".to_owned()),
        ));
    }
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {MAX_BODY_BYTES} bytes; nothing was applied"),
            Some("body"),
            Some(format!(
                "a JSON object of knob name -> value, at most {MAX_BODY_BYTES} bytes"
            )),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let read = async {
        let mut body = body;
        let mut data = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|error| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("reading the body failed: {error}"),
                    Some("body"),
                    None,
                )
            })?;
            if let Ok(chunk) = frame.into_data() {
                if data.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(too_large());
                }
                data.extend_from_slice(&chunk);
            }
        }
        Ok(Bytes::from(data))
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the body did not arrive within {} ms; nothing was applied",
                timeout.as_millis()
            ),
            Some("body"),
            None,
        )
    })?
}

/// Waits (up to [`WORKER_CONFIRM_WAIT`]) for every worker to report `epoch`.
async fn confirm_workers(block: &AttachedControlBlock, epoch: u64) -> DataplaneConfirmation {
    let workers = block.worker_count();
    let seen = || {
        (0..workers)
            .filter(|worker| {
                block
                    .worker(*worker as usize)
                    .gauges
                    .knob_epoch_seen
                    .load(Ordering::Acquire)
                    >= epoch
            })
            .count()
    };
    if !dataplane_up(block) {
        return DataplaneConfirmation {
            running: false,
            workers,
            workers_seen: 0,
            all_seen: false,
            waited_ms: 0.0,
            note: format!(
                "the data plane is not running (lifecycle {}): the values are in its control block and take effect when it runs",
                block.lifecycle().name()
            ),
        };
    }
    let started = Instant::now();
    let mut count = seen();
    while count < workers as usize && started.elapsed() < WORKER_CONFIRM_WAIT {
        tokio::time::sleep(Duration::from_millis(1)).await;
        count = seen();
    }
    let waited_ms = started.elapsed().as_secs_f64() * 1e3;
    let all_seen = count >= workers as usize;
    let workers_seen = u32::try_from(count).unwrap_or(workers);
    DataplaneConfirmation {
        running: true,
        workers,
        workers_seen,
        all_seen,
        waited_ms,
        note: if all_seen {
            format!("every worker applied the change within {waited_ms:.1} ms")
        } else {
            format!(
                "{workers_seen} of {workers} workers confirmed within {} ms; the others apply it on their next iteration",
                WORKER_CONFIRM_WAIT.as_millis()
            )
        },
    }
}

fn not_running(note: String) -> DataplaneConfirmation {
    DataplaneConfirmation {
        running: false,
        workers: 0,
        workers_seen: 0,
        all_seen: false,
        waited_ms: 0.0,
        note,
    }
}

fn registry_unavailable(error: &RegistryError) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("cluster knobs need the registry, which failed ({error}); nothing was applied"),
        Some("scope"),
        Some("node".to_owned()),
    )
}

/// Reads the other nodes' records until each reports `version` (or a later one) in force on
/// every worker, or the wait ends.
async fn confirm_nodes(
    client: RegistryClient,
    keys: Keys,
    nodes: Vec<u32>,
    version: u64,
) -> (Vec<u32>, Vec<u32>) {
    let started = Instant::now();
    let mut applied = Vec::new();
    let mut pending = nodes;
    loop {
        let wanted: Vec<String> = pending.iter().map(|node| keys.node(*node)).collect();
        let reader = client.clone();
        let found = tokio::task::spawn_blocking(move || reader.get_many(&wanted))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        pending.retain(|node| {
            let done = found
                .get(&keys.node(*node))
                .and_then(|text| serde_json::from_str::<NodeRecord>(text).ok())
                .is_some_and(|record| record.knobs_version >= version && record.knobs_in_force);
            if done {
                applied.push(*node);
            }
            !done
        });
        if pending.is_empty() || started.elapsed() >= CLUSTER_CONFIRM_WAIT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    applied.sort_unstable();
    (applied, pending)
}

fn respond(response: &PatchResponse) -> Response {
    let status = match response.outcome {
        Outcome::Applied => StatusCode::OK,
        Outcome::Pending => StatusCode::ACCEPTED,
    };
    json(status, response)
}

#[utoipa::path(
    patch,
    path = "/v1/knobs",
    tag = "knobs",
    params(("scope" = Option<Scope>, Query, description = "`node` (default): this node only; `cluster`: every node, through the registry")),
    request_body(content = KnobChanges, description = "Knob name -> new value. Everything is validated before anything is applied.", content_type = "application/json"),
    responses(
        (status = 200, description = "Applied: in force on every worker (for scope=cluster, of every node); says how long the workers took, and for scope=cluster the registry version", body = PatchResponse),
        (status = 202, description = "Stored but not yet confirmed by every worker within the wait (or the data plane is not running); `dataplane` and `nodes_pending` say where it is pending", body = PatchResponse),
        (status = 400, description = "Malformed body, unknown knob, wrong type, unknown scope or query parameter; nothing applied", body = ErrorBody),
        (status = 408, description = "The body did not arrive within the body timeout; nothing applied", body = ErrorBody),
        (status = 409, description = "scope=cluster: published, but a newer cluster knobs version with other values for these knobs is in force on this node", body = ErrorBody),
        (status = 413, description = "The body is too large; nothing applied", body = ErrorBody),
        (status = 415, description = "The body is not application/json; nothing applied", body = ErrorBody),
        (status = 422, description = "A value outside its knob's range or choices; nothing applied", body = ErrorBody),
        (status = 502, description = "scope=cluster: the registry's knobs document is refused by this node", body = ErrorBody),
        (status = 503, description = "Not attached (scope=node) or the registry is unreachable (scope=cluster); nothing applied", body = ErrorBody),
    )
)]
pub async fn patch_knobs(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let shared = &state.shared;
    let body = read_json_body(&headers, body, shared.config.http.body_timeout).await?;
    let scope = parse_scope(query.as_deref())?;
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {error}"),
            Some("body"),
            Some(format!(
                "a JSON object of knob name -> value; knobs: {}",
                knob_names()
            )),
        )
    })?;
    let changes = parse_changes(&value)?;
    let values: serde_json::Map<String, serde_json::Value> = changes
        .iter()
        .map(|(knob, _, value)| (knob.spec().name.to_owned(), value.clone()))
        .collect();
    let raw: Vec<(Knob, u64)> = changes.iter().map(|(knob, raw, _)| (*knob, *raw)).collect();
    match scope {
        Scope::Node => patch_node(shared, values, &raw).await,
        Scope::Cluster => patch_cluster(shared, values, &raw).await,
    }
}

async fn patch_node(
    shared: &Shared,
    values: serde_json::Map<String, serde_json::Value>,
    raw: &[(Knob, u64)],
) -> Result<Response, ApiError> {
    let block = shared
        .attachment
        .block()
        .ok_or_else(|| ApiError::not_attached(shared))?;
    block.set_knobs(raw).map_err(|error| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            error.to_string(),
            None,
            None,
        )
    })?;
    let epoch = block.knob_epoch();
    tracing::info!(values = %serde_json::Value::Object(values.clone()), epoch, "knobs changed (scope node)");
    let dataplane = confirm_workers(&block, epoch).await;
    Ok(respond(&PatchResponse {
        outcome: if dataplane.all_seen {
            Outcome::Applied
        } else {
            Outcome::Pending
        },
        scope: Scope::Node,
        node: shared.config.node,
        values,
        epoch: Some(epoch),
        dataplane,
        registry_version: None,
        nodes_applied: None,
        nodes_pending: None,
    }))
}

async fn patch_cluster(
    shared: &Shared,
    values: serde_json::Map<String, serde_json::Value>,
    raw: &[(Knob, u64)],
) -> Result<Response, ApiError> {
    let client = shared.registry.client().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "cluster knobs need the registry, which is {} ({}); nothing was applied",
                shared.registry.state().name(),
                shared.registry.detail()
            ),
            Some("scope"),
            Some("node".to_owned()),
        )
    })?;
    let keys = Keys::new(&shared.config.cluster, &shared.config.generation);
    let node = shared.config.node;
    let document = {
        let client = client.clone();
        let keys = keys.clone();
        let values = values.clone();
        let base = shared.registry.knobs_base();
        tokio::task::spawn_blocking(move || client.update_knobs(&keys, &values, node, &base))
            .await
            .map_err(|error| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the registry update did not finish: {error}"),
                    None,
                    None,
                )
            })?
            .map_err(|error| registry_unavailable(&error))?
    };
    tracing::info!(
        version = document.version,
        values = %serde_json::Value::Object(values.clone()),
        "cluster knobs published"
    );
    let block = shared.attachment.block();
    let (epoch, dataplane, nodes) = match block {
        Some(block) => {
            let applied = shared.registry.apply_knobs(&block, &document).map_err(|reason| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "published as version {}, but the registry's knobs document is refused here: {reason}",
                        document.version
                    ),
                    None,
                    None,
                )
            })?;
            // "Applied" is what the block holds, not what the apply step hoped: a version this
            // node already had in force may carry other values.
            if let Some((knob, _)) = raw.iter().find(|(knob, value)| block.knob(*knob) != *value) {
                let in_force = match applied {
                    KnobsApply::Superseded { applied } => format!("version {applied}"),
                    KnobsApply::Applied | KnobsApply::AlreadyApplied => "a later change".to_owned(),
                };
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "published as version {}, but this node has {in_force} in force, with {} = {}",
                        document.version,
                        knob.spec().name,
                        knob.spec().to_json(block.knob(*knob))
                    ),
                    Some(knob.spec().name),
                    None,
                ));
            }
            let epoch = block.knob_epoch();
            let confirmation = confirm_workers(&block, epoch).await;
            (Some(epoch), confirmation, block.node_count())
        }
        None => (
            None,
            not_running(format!(
                "not attached to the control block ({}): this node applies version {} when it attaches",
                shared.attachment.waiting_reason(),
                document.version
            )),
            0,
        ),
    };
    let others: Vec<u32> = (0..nodes).filter(|other| *other != node).collect();
    let (mut nodes_applied, mut nodes_pending) =
        confirm_nodes(client, keys, others, document.version).await;
    if dataplane.all_seen {
        nodes_applied.push(node);
        nodes_applied.sort_unstable();
    } else {
        nodes_pending.push(node);
        nodes_pending.sort_unstable();
    }
    let outcome = if epoch.is_some() && dataplane.all_seen && nodes_pending.is_empty() {
        Outcome::Applied
    } else {
        Outcome::Pending
    };
    Ok(respond(&PatchResponse {
        outcome,
        scope: Scope::Cluster,
        node,
        values,
        epoch,
        dataplane,
        registry_version: Some(document.version),
        nodes_applied: Some(nodes_applied),
        nodes_pending: Some(nodes_pending),
    }))
}

/// One endpoint slot.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EndpointSlotView {
    pub worker: u32,
    /// The address (`{"kind": "shm", "port": 3}`, `{"kind": "udp", "ip": ..., "port": ...}`,
    /// `{"kind": "verbs", ...}`), or null for an empty slot.
    #[schema(value_type = Option<Object>)]
    pub address: Option<EndpointAddress>,
}

/// One node's row of the remote table.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct RemoteNodeView {
    pub node: u32,
    pub endpoints: Vec<EndpointSlotView>,
}

/// GET /v1/endpoints.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EndpointsResponse {
    pub node: u32,
    pub transport: Option<String>,
    /// Whether the data plane has declared its local endpoints final.
    pub endpoints_published: bool,
    pub peers_generation: u64,
    pub local: Vec<EndpointSlotView>,
    /// remote[node][worker], as written by the control plane (or statically by the data plane).
    pub remote: Vec<RemoteNodeView>,
}

#[utoipa::path(
    get,
    path = "/v1/endpoints",
    tag = "status",
    responses(
        (status = 200, description = "This node's local endpoints and the remote table", body = EndpointsResponse),
        (status = 503, description = "Not attached to the control block", body = ErrorBody),
    )
)]
pub async fn endpoints(State(state): State<AppState>) -> Result<Response, ApiError> {
    let block = state
        .shared
        .attachment
        .block()
        .ok_or_else(|| ApiError::not_attached(&state.shared))?;
    let workers = block.worker_count();
    let slot_views = |row: &dyn Fn(u32) -> Option<EndpointAddress>| {
        (0..workers)
            .map(|worker| EndpointSlotView {
                worker,
                address: row(worker),
            })
            .collect::<Vec<_>>()
    };
    let local = slot_views(&|worker| block.worker(worker as usize).local_endpoint.load());
    let remote = (0..block.node_count())
        .map(|node| RemoteNodeView {
            node,
            endpoints: slot_views(&|worker| {
                block
                    .remote
                    .get(node as usize)
                    .and_then(|row| row.get(worker as usize))
                    .and_then(|slot| slot.load())
            }),
        })
        .collect();
    let instance = block.header.instance.load(Ordering::Relaxed);
    Ok(json(
        StatusCode::OK,
        &EndpointsResponse {
            node: block.node_id(),
            transport: block.transport().map(|kind| kind.name().to_owned()),
            endpoints_published: block.handshake.endpoints_published.load(Ordering::Acquire)
                == instance,
            peers_generation: block.handshake.peers_generation.load(Ordering::Acquire),
            local,
            remote,
        },
    ))
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "metrics",
    responses(
        (status = 200, description = "Prometheus text exposition format, read from the control block at scrape time", content_type = "text/plain; version=0.0.4", body = String),
        (status = 500, description = "The metrics could not be encoded", body = ErrorBody),
    )
)]
pub async fn prometheus_metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let text = metrics::render(&state.metrics).map_err(|error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {error}"),
            None,
            None,
        )
    })?;
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response())
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "metrics",
    responses((status = 200, description = "This document", content_type = "application/json", body = Object))
)]
pub async fn openapi_document() -> Response {
    json(StatusCode::OK, &ApiDoc::openapi())
}
