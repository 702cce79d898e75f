//! Typed endpoint records: the address of one worker's transport endpoint, as the data plane
//! publishes it in its control block and as the control plane exchanges it through the
//! registry. Two encodings: serde (JSON, with a schema version) for the registry, and a fixed
//! 64-byte binary form for the control block's atomic slots.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::limits::ENDPOINT_BYTES;

/// Schema version of [`EndpointRecord`]; bumped on any incompatible change.
pub const ENDPOINT_SCHEMA_VERSION: u32 = 1;

/// Which transport backend an endpoint belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    Shm,
    Udp,
    Verbs,
}

impl TransportKind {
    pub const ALL: [TransportKind; 3] =
        [TransportKind::Shm, TransportKind::Udp, TransportKind::Verbs];

    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Shm => "shm",
            TransportKind::Udp => "udp",
            TransportKind::Verbs => "verbs",
        }
    }

    /// Numeric code stored in the control block (0 means "not set").
    pub fn code(self) -> u32 {
        match self {
            TransportKind::Shm => 1,
            TransportKind::Udp => 2,
            TransportKind::Verbs => 3,
        }
    }

    pub fn from_code(code: u32) -> Option<TransportKind> {
        TransportKind::ALL
            .into_iter()
            .find(|kind| kind.code() == code)
    }
}

impl std::str::FromStr for TransportKind {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        TransportKind::ALL
            .into_iter()
            .find(|kind| kind.name() == text)
            .ok_or_else(|| format!("unknown transport `{text}`: expected shm, udp or verbs"))
    }
}

/// Where one transport endpoint can be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EndpointAddress {
    /// A port of a shared-memory fabric (the fabric is named by the cluster configuration).
    Shm { port: u32 },
    /// A kernel UDP socket.
    Udp { ip: Ipv4Addr, port: u16 },
    /// An RDMA UD queue pair.
    Verbs {
        lid: u16,
        gid: [u8; 16],
        qpn: u32,
        qkey: u32,
    },
}

/// Why a binary endpoint could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointDecodeError {
    #[error("empty endpoint slot")]
    Empty,
    #[error("unknown endpoint kind {0}")]
    UnknownKind(u8),
}

impl EndpointAddress {
    pub fn transport(&self) -> TransportKind {
        match self {
            EndpointAddress::Shm { .. } => TransportKind::Shm,
            EndpointAddress::Udp { .. } => TransportKind::Udp,
            EndpointAddress::Verbs { .. } => TransportKind::Verbs,
        }
    }

    /// The fixed binary form: byte 0 is the transport code, the rest little-endian fields.
    pub fn to_bytes(&self) -> [u8; ENDPOINT_BYTES] {
        let mut bytes = [0u8; ENDPOINT_BYTES];
        bytes[0] = self.transport().code().to_le_bytes()[0];
        match *self {
            EndpointAddress::Shm { port } => bytes[4..8].copy_from_slice(&port.to_le_bytes()),
            EndpointAddress::Udp { ip, port } => {
                bytes[4..8].copy_from_slice(&ip.octets());
                bytes[8..10].copy_from_slice(&port.to_le_bytes());
            }
            EndpointAddress::Verbs {
                lid,
                gid,
                qpn,
                qkey,
            } => {
                bytes[2..4].copy_from_slice(&lid.to_le_bytes());
                bytes[4..8].copy_from_slice(&qpn.to_le_bytes());
                bytes[8..12].copy_from_slice(&qkey.to_le_bytes());
                bytes[16..32].copy_from_slice(&gid);
            }
        }
        bytes
    }

    /// Decodes the fixed binary form.
    pub fn from_bytes(bytes: &[u8; ENDPOINT_BYTES]) -> Result<Self, EndpointDecodeError> {
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        match TransportKind::from_code(u32::from(bytes[0])) {
            Some(TransportKind::Shm) => Ok(EndpointAddress::Shm { port: u32_at(4) }),
            Some(TransportKind::Udp) => Ok(EndpointAddress::Udp {
                ip: Ipv4Addr::new(bytes[4], bytes[5], bytes[6], bytes[7]),
                port: u16_at(8),
            }),
            Some(TransportKind::Verbs) => {
                let mut gid = [0u8; 16];
                gid.copy_from_slice(&bytes[16..32]);
                Ok(EndpointAddress::Verbs {
                    lid: u16_at(2),
                    gid,
                    qpn: u32_at(4),
                    qkey: u32_at(8),
                })
            }
            None if bytes[0] == 0 => Err(EndpointDecodeError::Empty),
            None => Err(EndpointDecodeError::UnknownKind(bytes[0])),
        }
    }
}

/// One worker's endpoint, as exchanged through the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub schema: u32,
    pub node: u16,
    pub worker: u16,
    pub address: EndpointAddress,
}

impl EndpointRecord {
    pub fn new(node: u16, worker: u16, address: EndpointAddress) -> Self {
        EndpointRecord {
            schema: ENDPOINT_SCHEMA_VERSION,
            node,
            worker,
            address,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<EndpointAddress> {
        vec![
            EndpointAddress::Shm { port: 7 },
            EndpointAddress::Udp {
                ip: Ipv4Addr::new(10, 1, 2, 3),
                port: 40_001,
            },
            EndpointAddress::Verbs {
                lid: 12,
                gid: [9; 16],
                qpn: 0x00ab_cdef,
                qkey: 0x1111_1111,
            },
        ]
    }

    #[test]
    fn binary_round_trip() {
        for address in samples() {
            assert_eq!(
                EndpointAddress::from_bytes(&address.to_bytes()),
                Ok(address)
            );
        }
        assert_eq!(
            EndpointAddress::from_bytes(&[0; ENDPOINT_BYTES]),
            Err(EndpointDecodeError::Empty)
        );
        let mut foreign = [0; ENDPOINT_BYTES];
        foreign[0] = 77;
        assert_eq!(
            EndpointAddress::from_bytes(&foreign),
            Err(EndpointDecodeError::UnknownKind(77))
        );
    }

    #[test]
    fn json_round_trip_carries_schema() {
        for address in samples() {
            let record = EndpointRecord::new(2, 3, address);
            let text = serde_json::to_string(&record).unwrap();
            assert!(text.contains("\"schema\":1"), "{text}");
            assert_eq!(
                serde_json::from_str::<EndpointRecord>(&text).unwrap(),
                record
            );
        }
    }
}
