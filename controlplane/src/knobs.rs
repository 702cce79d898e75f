//! Knobs as JSON: the views the REST API shows, the validation of a JSON object of changes
//! (from a PATCH body or from the registry's cluster knobs document) into a list the control
//! block can apply whole, and the JSON Schema of such an object for the OpenAPI document.
//!
//! Touches nothing but memory; the ranges and parsing rules are `rzab_shared::knobs`'s, so the
//! control plane refuses exactly what the data plane would, and the schema describes exactly
//! what [`parse_changes`] accepts.

use rzab_shared::knobs::{KNOBS, KnobSpec};
use rzab_shared::{ControlBlock, Knob, KnobError, KnobKind};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa::openapi::schema::{AdditionalProperties, Object, ObjectBuilder, Type};

/// A refused knob change: which field, why, and what would have been accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnobFieldError {
    /// The offending field (the knob name), or `None` for the body as a whole.
    pub field: Option<String>,
    pub message: String,
    pub allowed: String,
    /// True for a value of the right type outside the allowed range or choices (422); false
    /// for an unknown field, a wrong type or a malformed body (400).
    pub out_of_range: bool,
}

/// Every knob name, comma separated.
pub fn knob_names() -> String {
    KNOBS
        .iter()
        .map(|spec| spec.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a knob accepts, for humans: `1..=16`, `true or false`, `busy, adaptive`.
pub fn allowed(spec: &KnobSpec) -> String {
    match spec.kind {
        KnobKind::Bool => "true or false".to_owned(),
        KnobKind::Integer => format!("{}..={}", spec.min, spec.max),
        KnobKind::Choice(names) => names.join(", "),
    }
}

fn kind_name(kind: KnobKind) -> &'static str {
    match kind {
        KnobKind::Bool => "bool",
        KnobKind::Integer => "integer",
        KnobKind::Choice(_) => "choice",
    }
}

fn field_error(name: &str, error: &KnobError) -> KnobFieldError {
    match Knob::by_name(name) {
        Err(_) => KnobFieldError {
            field: Some(name.to_owned()),
            message: error.to_string(),
            allowed: knob_names(),
            out_of_range: false,
        },
        Ok(knob) => KnobFieldError {
            field: Some(name.to_owned()),
            message: error.to_string(),
            allowed: allowed(knob.spec()),
            out_of_range: matches!(
                error,
                KnobError::OutOfRange { .. } | KnobError::NotAChoice { .. }
            ),
        },
    }
}

/// Validates every change of a JSON object (name -> value) and returns them in the object's
/// order, or the first refusal (in name order). Nothing is applied here.
pub fn parse_changes(
    body: &serde_json::Value,
) -> Result<Vec<(Knob, u64, serde_json::Value)>, KnobFieldError> {
    let Some(object) = body.as_object() else {
        return Err(KnobFieldError {
            field: None,
            message: "the body must be a JSON object of knob name -> value".to_owned(),
            allowed: knob_names(),
            out_of_range: false,
        });
    };
    if object.is_empty() {
        return Err(KnobFieldError {
            field: None,
            message: "the body names no knob".to_owned(),
            allowed: knob_names(),
            out_of_range: false,
        });
    }
    object
        .iter()
        .map(|(name, value)| {
            let knob = Knob::by_name(name).map_err(|error| field_error(name, &error))?;
            let spec = knob.spec();
            let raw = spec
                .parse_json(value)
                .map_err(|error| field_error(name, &error))?;
            Ok((knob, raw, spec.to_json(raw)))
        })
        .collect()
}

/// The JSON Schema of one knob's value: a boolean, an integer within the knob's range, or one
/// of its choice names.
pub fn value_schema(spec: &KnobSpec) -> Object {
    let builder = ObjectBuilder::new()
        .description(Some(spec.doc))
        .default(Some(spec.to_json(spec.default)));
    match spec.kind {
        KnobKind::Bool => builder.schema_type(Type::Boolean),
        KnobKind::Integer => builder
            .schema_type(Type::Integer)
            .minimum(Some(spec.min))
            .maximum(Some(spec.max)),
        KnobKind::Choice(names) => builder
            .schema_type(Type::String)
            .enum_values(Some(names.iter().copied())),
    }
    .build()
}

/// The JSON Schema of an object of knob changes: exactly the knobs, each with its value
/// schema, nothing else, and at least `min_knobs` of them (1 for a PATCH body).
pub fn changes_schema(min_knobs: usize) -> Object {
    KNOBS
        .iter()
        .fold(ObjectBuilder::new(), |builder, spec| {
            builder.property(spec.name, value_schema(spec))
        })
        .schema_type(Type::Object)
        .additional_properties(Some(
            AdditionalProperties::<utoipa::openapi::Schema>::FreeForm(false),
        ))
        .min_properties((min_knobs > 0).then_some(min_knobs))
        .build()
}

/// One knob as the REST API shows it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct KnobView {
    pub name: &'static str,
    /// `bool`, `integer` or `choice`.
    pub kind: &'static str,
    /// The current value (boolean, number or choice name); null when not attached.
    pub value: serde_json::Value,
    /// The default value (boolean, number or choice name).
    pub default: serde_json::Value,
    pub min: u64,
    pub max: u64,
    /// What the knob accepts, for humans (`1..=16`, `true or false`, `busy, adaptive`).
    pub allowed: String,
    /// The choice names, for a choice knob.
    pub choices: Option<Vec<&'static str>>,
    pub help: &'static str,
}

/// Every knob with its current value in `block` (null values without a block).
pub fn views(block: Option<&ControlBlock>) -> Vec<KnobView> {
    KNOBS
        .iter()
        .map(|spec| KnobView {
            name: spec.name,
            kind: kind_name(spec.kind),
            value: block.map_or(serde_json::Value::Null, |block| {
                spec.to_json(block.knob(spec.knob))
            }),
            default: spec.to_json(spec.default),
            min: spec.min,
            max: spec.max,
            allowed: allowed(spec),
            choices: match spec.kind {
                KnobKind::Choice(names) => Some(names.to_vec()),
                _ => None,
            },
            help: spec.doc,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn refusals_name_the_field_and_what_is_allowed() {
        let error = parse_changes(&json!({"prepare_batch": 99})).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("prepare_batch"));
        assert_eq!(error.allowed, "1..=16");
        assert!(error.out_of_range);

        let error = parse_changes(&json!({"nope": 1})).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("nope"));
        assert!(error.allowed.contains("multicast"));
        assert!(!error.out_of_range);

        let error = parse_changes(&json!({"multicast": 1})).unwrap_err();
        assert_eq!(error.allowed, "true or false");
        assert!(!error.out_of_range);

        let error = parse_changes(&json!({"poll_mode": "lazy"})).unwrap_err();
        assert_eq!(error.allowed, "busy, adaptive");
        assert!(error.out_of_range);

        assert!(parse_changes(&json!([1])).unwrap_err().field.is_none());
        assert!(parse_changes(&json!({})).is_err());
    }

    #[test]
    fn accepted_changes_come_back_canonical() {
        let changes =
            parse_changes(&json!({"multicast": false, "poll_mode": "busy", "write_batch": 3}))
                .unwrap();
        assert_eq!(
            changes,
            vec![
                (Knob::Multicast, 0, json!(false)),
                (Knob::PollMode, 0, json!("busy")),
                (Knob::WriteBatch, 3, json!(3)),
            ]
        );
        assert_eq!(views(None).len(), KNOBS.len());
    }

    #[test]
    fn the_schema_names_every_knob_with_its_range_and_nothing_else() {
        let schema = serde_json::to_value(changes_schema(1)).unwrap();
        assert_eq!(schema["additionalProperties"], json!(false));
        assert_eq!(schema["minProperties"], json!(1));
        let properties = schema["properties"].as_object().unwrap();
        assert_eq!(properties.len(), KNOBS.len());
        assert_eq!(properties["multicast"]["type"], json!("boolean"));
        assert_eq!(properties["prepare_batch"]["minimum"], json!(1));
        assert_eq!(properties["prepare_batch"]["maximum"], json!(16));
        assert_eq!(properties["ack_batch"]["minimum"], json!(16));
        assert_eq!(properties["poll_mode"]["enum"], json!(["busy", "adaptive"]));
        assert!(serde_json::to_value(changes_schema(0)).unwrap()["minProperties"].is_null());
    }
}
