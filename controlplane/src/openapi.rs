//! The REST API's OpenAPI document, generated from the handlers' annotations with utoipa.
//!
//! The checked-in `controlplane/openapi.json` is this document pretty-printed; a test fails
//! when they differ (rerun it with `RZAB_UPDATE_OPENAPI=1` to rewrite the file), and another
//! calls every documented route. `rzab-controlplane --openapi` prints it.
//!
//! Touches nothing.

use utoipa::OpenApi;

use crate::rest;

/// The OpenAPI description of [`crate::rest::router`].
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "rzab-controlplane",
        description = "Per-node control plane of rzab: health and status, live knobs (per node or cluster-wide), endpoints, Prometheus metrics. Every error is a JSON object {error, field, allowed}."
    ),
    paths(
        rest::healthz,
        rest::status,
        rest::get_knobs,
        rest::patch_knobs,
        rest::endpoints,
        rest::prometheus_metrics,
        rest::openapi_document,
    ),
    tags(
        (name = "status", description = "Health, status and endpoints"),
        (name = "knobs", description = "Live knobs"),
        (name = "metrics", description = "Prometheus metrics and this document"),
    )
)]
pub struct ApiDoc;

/// The document as the checked-in file holds it (pretty JSON, trailing newline).
pub fn document() -> Result<String, serde_json::Error> {
    let mut text = ApiDoc::openapi().to_pretty_json()?;
    text.push('\n');
    Ok(text)
}
