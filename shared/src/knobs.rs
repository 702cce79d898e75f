//! The live knobs: one definition per knob (name, kind, range, default, doc) and the validation
//! that both processes use, so that the control plane refuses exactly what the data plane would.
//! Knob values live in the control block as `AtomicU64`s; this module only describes them.

use crate::limits::{
    MAX_COMMIT_CREDITS, MAX_DOORBELL_BATCH, MAX_KNOBS, MAX_PREPARE_CREDITS, MAX_PREPARES_PER_MSG,
    MAX_RANGE_PER_MSG, MAX_WRITE_CREDITS, MAX_WRITES_PER_MSG,
};

/// How a knob's `u64` value is to be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KnobKind {
    /// 0 or 1, shown as false/true.
    Bool,
    /// An integer within `[min, max]`.
    Integer,
    /// An index into the listed names, shown as the name.
    Choice(&'static [&'static str]),
}

/// The definition of one knob.
#[derive(Clone, Copy, Debug)]
pub struct KnobSpec {
    pub knob: Knob,
    pub name: &'static str,
    pub kind: KnobKind,
    pub min: u64,
    pub max: u64,
    pub default: u64,
    pub doc: &'static str,
}

/// Why a knob value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KnobError {
    #[error("unknown knob `{name}`")]
    Unknown { name: String },
    #[error("knob `{name}`: {value} is outside the allowed range {min}..={max}")]
    OutOfRange {
        name: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("knob `{name}`: `{value}` is not one of {allowed:?}")]
    NotAChoice {
        name: &'static str,
        value: String,
        allowed: &'static [&'static str],
    },
    #[error("knob `{name}` expects an integer within {min}..={max}")]
    NotAnInteger {
        name: &'static str,
        min: u64,
        max: u64,
    },
    #[error("knob `{name}` expects {expected}")]
    WrongType {
        name: &'static str,
        expected: &'static str,
    },
}

/// Poll-mode names, indexed by the knob value.
pub const POLL_MODES: &[&str] = &["busy", "adaptive"];
/// Value of the poll-mode knob meaning "spin without yielding".
pub const POLL_MODE_BUSY: u64 = 0;
/// Value of the poll-mode knob meaning "spin, then yield the core when idle".
pub const POLL_MODE_ADAPTIVE: u64 = 1;

macro_rules! knobs {
    ($( $variant:ident { $name:literal, $kind:expr, $min:expr, $max:expr, $default:expr, $doc:literal } )*) => {
        /// Every live knob; the discriminant is the knob's slot in the control block.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Knob { $( #[doc = $doc] $variant, )* }

        /// All knob definitions, in slot order.
        pub const KNOBS: &[KnobSpec] = &[
            $( KnobSpec { knob: Knob::$variant, name: $name, kind: $kind, min: $min, max: $max, default: $default, doc: $doc }, )*
        ];
    };
}

knobs! {
    Multicast { "multicast", KnobKind::Bool, 0, 1, 1,
        "Broadcast prepares and commits to a multicast group (true) or as one unicast per follower (false)." }
    PrepareBatch { "prepare_batch", KnobKind::Integer, 1, MAX_PREPARES_PER_MSG as u64, MAX_PREPARES_PER_MSG as u64,
        "Most prepares the leader packs into one PREPARE message." }
    WriteBatch { "write_batch", KnobKind::Integer, 1, MAX_WRITES_PER_MSG as u64, MAX_WRITES_PER_MSG as u64,
        "Most client writes a follower packs into one forwarded WRITE message." }
    AckBatch { "ack_batch", KnobKind::Integer, MAX_PREPARES_PER_MSG as u64, MAX_RANGE_PER_MSG as u64, MAX_RANGE_PER_MSG as u64,
        "Most prepares one ACK message may acknowledge; at least one PREPARE's worth, because a follower sends at most one ACK per PREPARE it consumed." }
    CommitBatch { "commit_batch", KnobKind::Integer, 1, MAX_RANGE_PER_MSG as u64, MAX_RANGE_PER_MSG as u64,
        "Most writes one COMMIT message may cover." }
    DoorbellBatch { "doorbell_batch", KnobKind::Integer, 1, MAX_DOORBELL_BATCH as u64, 16,
        "Most send requests posted together with one doorbell." }
    PollMode { "poll_mode", KnobKind::Choice(POLL_MODES), 0, 1, POLL_MODE_ADAPTIVE,
        "busy: spin on dedicated cores; adaptive: spin, then yield the core while idle." }
    WriteRatioPermille { "write_ratio_permille", KnobKind::Integer, 0, 1000, 50,
        "Share of emulated client requests that are writes, in per-mille." }
    PrepareCredits { "prepare_credits", KnobKind::Integer, 1, MAX_PREPARE_CREDITS as u64, 16,
        "PREPARE messages the leader may have outstanding towards each follower." }
    WriteCredits { "write_credits", KnobKind::Integer, 1, MAX_WRITE_CREDITS as u64, 8,
        "Forwarded WRITE messages a follower may have outstanding towards the leader." }
    CommitCredits { "commit_credits", KnobKind::Integer, 1, MAX_COMMIT_CREDITS as u64, 64,
        "COMMIT messages the leader may have outstanding towards each follower." }
    StatsIntervalMs { "stats_interval_ms", KnobKind::Integer, 100, 60_000, 2_000,
        "How often the data plane prints its stats line, in milliseconds." }
    RetransmitTimeoutUs { "retransmit_timeout_us", KnobKind::Integer, 50, 1_000_000, 500,
        "How long a sender waits for progress before it sends unacknowledged prepares, commits, forwarded writes or snapshot chunks again (doubled per silent timeout, up to 32 times)." }
    SlowFollowerGraceUs { "slow_follower_grace_us", KnobKind::Integer, 0, 1_000_000, 1_000,
        "How long the leader holds back for a follower that has run out of credits while a quorum of the others could go on; after it, that follower catches up by retransmission." }
    HeartbeatIntervalMs { "heartbeat_interval_ms", KnobKind::Integer, 1, 10_000, 20,
        "How long a pipeline may send its peer nothing before it sends a heartbeat (a CREDIT), so that silence means a dead or cut-off peer, not an idle one." }
    PeerTimeoutMs { "peer_timeout_ms", KnobKind::Integer, 10, 600_000, 1_000,
        "How long a follower may hear nothing from its leader, or a leader from a quorum of its followers, before the node reports it: sync_state no_leader or no_quorum, healthz 503 with the reason, a log line." }
    ElectionTimeoutMs { "election_timeout_ms", KnobKind::Integer, 0, 600_000, 50,
        "How long a follower may hear nothing from its leader, or a leader from a quorum, before it gives it up and elects a new leader (also how long an elected node waits for a quorum to follow it); 0 never elects (node 0 leads for good). Only with one worker per node." }
    FinalizeWaitUs { "finalize_wait_us", KnobKind::Integer, 10, 1_000_000, 1_000,
        "How long an election waits, once a quorum agrees on a vote, for a better one before it decides (FastLeaderElection's finalizeWait)." }
}

const _: () = assert!(KNOBS.len() <= MAX_KNOBS);

impl Knob {
    /// The knob's definition (a `const fn`, so that an option can take its range from it).
    pub const fn spec(self) -> &'static KnobSpec {
        &KNOBS[self as usize]
    }

    /// Finds a knob by its name.
    pub fn by_name(name: &str) -> Result<Knob, KnobError> {
        KNOBS
            .iter()
            .find(|spec| spec.name == name)
            .map(|spec| spec.knob)
            .ok_or_else(|| KnobError::Unknown {
                name: name.to_owned(),
            })
    }

    /// The control block slot of this knob.
    pub fn slot(self) -> usize {
        self as usize
    }
}

/// A JSON number as a non-negative integer: `7`, and also `7.0` or `7e0`, which JSON (and
/// JSON Schema's `integer`) count as the same integer; `None` for fractions, negative values and
/// whole numbers beyond 2^53, which a double does not hold exactly.
fn whole_number(number: &serde_json::Number) -> Option<u64> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    number.as_u64().or_else(|| {
        let value = number.as_f64()?;
        #[allow(
            clippy::cast_possible_truncation,
            reason = "a whole value within 0..=2^53, which u64 holds exactly"
        )]
        ((0.0..=EXACT).contains(&value) && value.fract() == 0.0).then_some(value as u64)
    })
}

impl KnobSpec {
    /// Checks a raw value against this knob's range.
    pub fn validate(&self, value: u64) -> Result<u64, KnobError> {
        if value < self.min || value > self.max {
            return Err(KnobError::OutOfRange {
                name: self.name,
                value,
                min: self.min,
                max: self.max,
            });
        }
        Ok(value)
    }

    /// Parses and validates a JSON value (bool, integer or choice name) for this knob.
    pub fn parse_json(&self, value: &serde_json::Value) -> Result<u64, KnobError> {
        let raw = match (self.kind, value) {
            (KnobKind::Bool, serde_json::Value::Bool(flag)) => u64::from(*flag),
            (KnobKind::Bool, _) => {
                return Err(KnobError::WrongType {
                    name: self.name,
                    expected: "a boolean",
                });
            }
            (KnobKind::Integer, serde_json::Value::Number(number)) => {
                whole_number(number).ok_or_else(|| self.not_an_integer())?
            }
            (KnobKind::Integer, _) => return Err(self.not_an_integer()),
            (KnobKind::Choice(names), serde_json::Value::String(text)) => {
                self.parse_choice(names, text)?
            }
            (KnobKind::Choice(_), _) => {
                return Err(KnobError::WrongType {
                    name: self.name,
                    expected: "a string",
                });
            }
        };
        self.validate(raw)
    }

    /// Parses and validates a textual value (`true`, `42`, `adaptive`) for this knob.
    pub fn parse_text(&self, text: &str) -> Result<u64, KnobError> {
        let raw = match self.kind {
            KnobKind::Bool => match text {
                "true" | "on" | "1" => 1,
                "false" | "off" | "0" => 0,
                _ => {
                    return Err(KnobError::WrongType {
                        name: self.name,
                        expected: "true or false",
                    });
                }
            },
            KnobKind::Integer => text.parse::<u64>().map_err(|_| self.not_an_integer())?,
            KnobKind::Choice(names) => self.parse_choice(names, text)?,
        };
        self.validate(raw)
    }

    fn not_an_integer(&self) -> KnobError {
        KnobError::NotAnInteger {
            name: self.name,
            min: self.min,
            max: self.max,
        }
    }

    /// The values this knob accepts, as `--help` and the README show them.
    pub fn accepted(&self) -> String {
        match self.kind {
            KnobKind::Bool => "true or false".to_owned(),
            KnobKind::Integer => format!("{}..={}", self.min, self.max),
            KnobKind::Choice(names) => names.join(" or "),
        }
    }

    fn parse_choice(&self, names: &'static [&'static str], text: &str) -> Result<u64, KnobError> {
        names
            .iter()
            .position(|name| *name == text)
            .map(|index| index as u64)
            .ok_or_else(|| KnobError::NotAChoice {
                name: self.name,
                value: text.to_owned(),
                allowed: names,
            })
    }

    /// Renders a raw value the way users write it.
    pub fn to_json(&self, value: u64) -> serde_json::Value {
        match self.kind {
            KnobKind::Bool => serde_json::Value::Bool(value != 0),
            KnobKind::Integer => serde_json::Value::from(value),
            KnobKind::Choice(names) => usize::try_from(value)
                .ok()
                .and_then(|index| names.get(index))
                .map_or(serde_json::Value::from(value), |name| {
                    serde_json::Value::from(*name)
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_declaration_order() {
        for (slot, spec) in KNOBS.iter().enumerate() {
            assert_eq!(spec.knob.slot(), slot);
            assert!(
                spec.min <= spec.default && spec.default <= spec.max,
                "{}",
                spec.name
            );
            // The range is the whole definition of what a knob accepts: a bool or a choice
            // must not admit a value that has no meaning.
            match spec.kind {
                KnobKind::Bool => assert_eq!((spec.min, spec.max), (0, 1), "{}", spec.name),
                KnobKind::Choice(names) => {
                    assert_eq!((spec.min, spec.max + 1), (0, names.len() as u64));
                }
                KnobKind::Integer => assert!(spec.max < u64::MAX / 2, "{}", spec.name),
            }
        }
    }

    #[test]
    fn validation_names_the_knob_and_range() {
        let spec = Knob::PrepareBatch.spec();
        let error = spec.parse_json(&serde_json::json!(99)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "knob `prepare_batch`: 99 is outside the allowed range 1..=16"
        );
        assert_eq!(
            spec.parse_json(&serde_json::json!("x"))
                .unwrap_err()
                .to_string(),
            "knob `prepare_batch` expects an integer within 1..=16"
        );
        assert_eq!(
            spec.parse_text("-1").unwrap_err().to_string(),
            "knob `prepare_batch` expects an integer within 1..=16"
        );
        assert_eq!(spec.accepted(), "1..=16");
        assert_eq!(Knob::PollMode.spec().accepted(), "busy or adaptive");
        assert_eq!(spec.parse_json(&serde_json::json!(8.0)), Ok(8));
        assert_eq!(spec.parse_json(&serde_json::json!(8e0)), Ok(8));
        for refused in [
            serde_json::json!(2.5),
            serde_json::json!(-1),
            serde_json::json!(-1.0),
            serde_json::json!(1e300),
        ] {
            assert!(
                matches!(
                    spec.parse_json(&refused),
                    Err(KnobError::NotAnInteger { .. })
                ),
                "{refused}"
            );
        }
        assert_eq!(Knob::PollMode.spec().parse_text("busy"), Ok(POLL_MODE_BUSY));
        assert!(Knob::PollMode.spec().parse_text("lazy").is_err());
        assert_eq!(
            Knob::Multicast.spec().parse_json(&serde_json::json!(false)),
            Ok(0)
        );
        assert_eq!(
            Knob::by_name("nope"),
            Err(KnobError::Unknown {
                name: "nope".into()
            })
        );
    }

    #[test]
    fn json_round_trip() {
        for spec in KNOBS {
            assert_eq!(
                spec.parse_json(&spec.to_json(spec.default)),
                Ok(spec.default)
            );
        }
    }
}
