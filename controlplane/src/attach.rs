//! Attaching to the node's control block, and staying attached across restarts of either
//! process.
//!
//! [`Attachment::step`] is called every [`ATTACH_INTERVAL`]: while attached it beats the
//! control plane's heartbeat (which also records this process's pid); when the data plane has
//! restarted (a new `instance`), re-created the block, or the file has been removed or
//! replaced, it drops the old mapping and attaches again. While there is nothing valid to
//! attach to it logs why every few seconds and keeps trying; it never gives up.
//!
//! Touches: the control-block file (open, map, header heartbeat and pid), the log.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use rzab_shared::AttachedControlBlock;

/// How often the attachment is checked and the control plane's heartbeat beaten.
pub const ATTACH_INTERVAL: Duration = Duration::from_millis(100);
/// How often "still waiting for the control block" is logged.
pub const WAIT_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// What one [`Attachment::step`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttachEvent {
    /// Still attached to the same data plane.
    Unchanged,
    /// Attached (for the first time, or again after a restart) to this data plane instance.
    Attached { instance: u64 },
    /// Not attached; the reason.
    Waiting(String),
}

#[derive(Debug)]
struct Waiting {
    reason: String,
    last_log: Option<Instant>,
}

/// The control plane's handle on its node's control block, shared by every task.
#[derive(Debug)]
pub struct Attachment {
    path: PathBuf,
    cluster: String,
    node: u32,
    current: RwLock<Option<Arc<AttachedControlBlock>>>,
    waiting: Mutex<Waiting>,
    attaches: std::sync::atomic::AtomicU64,
}

impl Attachment {
    /// An attachment to the block at `path`, which must belong to `cluster` and `node`.
    pub fn new(path: &Path, cluster: &str, node: u32) -> Self {
        Attachment {
            path: path.to_owned(),
            cluster: cluster.to_owned(),
            node,
            current: RwLock::new(None),
            waiting: Mutex::new(Waiting {
                reason: "not attached yet".to_owned(),
                last_log: None,
            }),
            attaches: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The attached block, if any.
    pub fn block(&self) -> Option<Arc<AttachedControlBlock>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Why there is no attached block (meaningful only while [`Attachment::block`] is `None`).
    pub fn waiting_reason(&self) -> String {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reason
            .clone()
    }

    /// How many times a block was attached (1 after the first attach).
    pub fn attach_count(&self) -> u64 {
        self.attaches.load(Ordering::Relaxed)
    }

    fn set_current(&self, block: Option<Arc<AttachedControlBlock>>) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = block;
    }

    fn wait(&self, reason: String) -> AttachEvent {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        let changed = waiting.reason != reason;
        let due = waiting
            .last_log
            .is_none_or(|last| last.elapsed() >= WAIT_LOG_INTERVAL);
        if changed || due {
            tracing::info!(
                block = %self.path.display(),
                "waiting for the control block: {reason}"
            );
            waiting.last_log = Some(Instant::now());
        }
        waiting.reason.clone_from(&reason);
        AttachEvent::Waiting(reason)
    }

    /// Checks the attachment once: beats the heartbeat, or (re-)attaches.
    pub fn step(&self) -> AttachEvent {
        if let Some(block) = self.block() {
            if block.is_current() && block.is_file_at_path() {
                block.controlplane_heartbeat();
                return AttachEvent::Unchanged;
            }
            tracing::info!(
                block = %self.path.display(),
                "the data plane restarted or its control block was replaced: attaching again"
            );
            self.set_current(None);
        }
        let block = match AttachedControlBlock::attach(&self.path) {
            Ok(block) => block,
            Err(error) => return self.wait(error.to_string()),
        };
        let cluster = block.cluster_name();
        let node = block.node_id();
        if cluster != self.cluster || node != self.node {
            return self.wait(format!(
                "{} belongs to node {node} of cluster `{cluster}`, this control plane is for node {} of cluster `{}`",
                self.path.display(),
                self.node,
                self.cluster
            ));
        }
        block.controlplane_heartbeat();
        let instance = block.header.instance.load(Ordering::Relaxed);
        tracing::info!(
            block = %self.path.display(),
            instance = format_args!("{instance:016x}"),
            dataplane_pid = block.header.owner_pid.load(Ordering::Relaxed),
            lifecycle = block.lifecycle().name(),
            workers = block.worker_count(),
            nodes = block.node_count(),
            "attached to the control block"
        );
        self.set_current(Some(Arc::new(block)));
        self.attaches.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.last_log = None;
            waiting.reason = "attached".to_owned();
        }
        AttachEvent::Attached { instance }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rzab_shared::{ControlBlockInit, OwnedControlBlock, TransportKind};

    fn init(node: u32) -> ControlBlockInit {
        ControlBlockInit {
            cluster: "t".into(),
            node_id: node,
            node_count: 2,
            worker_count: 1,
            transport: TransportKind::Shm,
        }
    }

    #[test]
    fn waits_attaches_beats_and_reattaches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("block");
        let attachment = Attachment::new(&path, "t", 1);
        assert!(matches!(attachment.step(), AttachEvent::Waiting(_)));
        assert!(attachment.block().is_none());

        let wrong = OwnedControlBlock::create(&path, &init(0)).unwrap();
        match attachment.step() {
            AttachEvent::Waiting(reason) => assert!(reason.contains("node 0"), "{reason}"),
            other => panic!("{other:?}"),
        }
        drop(wrong);

        let first = OwnedControlBlock::create(&path, &init(1)).unwrap();
        let instance = first.header.instance.load(Ordering::Relaxed);
        assert_eq!(attachment.step(), AttachEvent::Attached { instance });
        assert_eq!(
            first.header.controlplane_pid.load(Ordering::Relaxed),
            std::process::id()
        );
        first
            .header
            .controlplane_heartbeat_ns
            .store(0, Ordering::Relaxed);
        assert_eq!(attachment.step(), AttachEvent::Unchanged);
        assert!(
            first
                .header
                .controlplane_heartbeat_ns
                .load(Ordering::Relaxed)
                > 0
        );

        drop(first);
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(attachment.step(), AttachEvent::Waiting(_)));
        let second = OwnedControlBlock::create(&path, &init(1)).unwrap();
        let instance = second.header.instance.load(Ordering::Relaxed);
        assert_eq!(attachment.step(), AttachEvent::Attached { instance });
        assert_eq!(attachment.attach_count(), 2);
    }
}
