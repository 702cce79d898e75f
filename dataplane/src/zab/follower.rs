//! The follower's side of one pipeline: forwards its sessions' writes to the leader in
//! coalesced WRITE messages, stores PREPAREs by pseq (reordering is harmless), acknowledges
//! the contiguous prefix it holds with one ACK range per iteration, and applies committed
//! writes in zxid order. Pure state machine; see the parent module.

use super::wire::{self, Kind, Message};
use super::{
    Completions, EntryMeta, EntryRing, Limits, Outbox, PipelineConfig, PipelineStats, Replica,
    Target, half,
};

/// The node that leads every pipeline.
pub const LEADER_NODE: u8 = 0;

/// The follower's state for one pipeline.
#[derive(Debug)]
pub struct Follower {
    config: PipelineConfig,
    /// Prepares by pseq; `present` marks the ones held.
    pending: EntryRing,
    /// Every prepare below this pseq is held.
    received: u64,
    committed: u64,
    applied: u64,
    acked_sent: u64,
    acks_sent: u64,
    prepare_msgs_consumed: u64,
    commit_msgs_consumed: u64,
    /// Counters last reported to the leader.
    reported: [u64; 3],
    /// This node's writes waiting to be forwarded.
    outgoing: EntryRing,
    out_head: u64,
    out_tail: u64,
    write_msgs_sent: u64,
    write_msgs_consumed: u64,
    stats: PipelineStats,
}

impl Follower {
    pub fn new(config: PipelineConfig) -> Self {
        Follower {
            pending: EntryRing::new(config.window, config.value_len),
            received: 0,
            committed: 0,
            applied: 0,
            acked_sent: 0,
            acks_sent: 0,
            prepare_msgs_consumed: 0,
            commit_msgs_consumed: 0,
            reported: [0; 3],
            outgoing: EntryRing::new(config.sessions.max(1), config.value_len),
            out_head: 0,
            out_tail: 0,
            write_msgs_sent: 0,
            write_msgs_consumed: 0,
            stats: PipelineStats::default(),
            config,
        }
    }

    pub fn stats(&self) -> PipelineStats {
        self.stats
    }

    /// Prepares below this pseq have been applied here.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Queues a write of one of this node's sessions for the leader; false when there is no
    /// room (a session has at most one write outstanding, so this is sized to never refuse).
    pub fn submit_write(&mut self, session: u16, session_seq: u64, key: u64, value: &[u8]) -> bool {
        if self.out_tail - self.out_head >= self.outgoing.capacity() as u64 {
            return false;
        }
        let meta = EntryMeta::local_write(self.config.node, session, session_seq, key);
        self.outgoing.put(self.out_tail, meta, value);
        self.out_tail += 1;
        true
    }

    /// Handles one decoded message.
    pub fn handle(&mut self, message: &Message<'_>) {
        if message.header.from_node != LEADER_NODE {
            self.stats.dropped_unexpected += 1;
            return;
        }
        match message.header.kind {
            Kind::Prepare => {
                let (first_pseq, first_zxid) = message.prepare_start();
                let limit = self.applied + self.config.window as u64;
                let count = u64::from(message.header.count);
                if first_pseq.saturating_add(count) > limit {
                    // Outside the window the leader promised to respect: a foreign or corrupt
                    // message. Dropping it is safe; storing it would overwrite live entries.
                    self.stats.dropped_unexpected += 1;
                    return;
                }
                for index in 0..count {
                    let pseq = first_pseq + index;
                    if pseq < self.applied || self.pending.meta(pseq).present {
                        continue;
                    }
                    let entry = message.entry(usize::try_from(index).unwrap_or(0));
                    let meta = EntryMeta {
                        zxid: first_zxid + index,
                        key: entry.key,
                        session_seq: entry.session_seq,
                        session: entry.session,
                        origin_node: entry.origin_node,
                        present: true,
                        ends_message: false,
                    };
                    self.pending.put(pseq, meta, entry.value);
                }
                while self.received < limit && self.pending.meta(self.received).present {
                    self.received += 1;
                }
                self.prepare_msgs_consumed += 1;
            }
            Kind::Commit => {
                let (first, count) = message.range();
                self.committed = self.committed.max(first.saturating_add(count));
                self.commit_msgs_consumed += 1;
            }
            Kind::Credit => {
                self.write_msgs_consumed = self
                    .write_msgs_consumed
                    .max(message.header.credits[0].min(self.write_msgs_sent));
            }
            Kind::Write | Kind::Ack => self.stats.dropped_unexpected += 1,
        }
    }

    /// A one-line summary of the pipeline's positions and credits, for diagnostics.
    pub fn summary(&self) -> String {
        format!(
            "follower n{} p{}: received {} committed {} applied {} acked {} acks {}/{} commits {} reported {:?} writes {}..{} sent {} consumed {} {:?}",
            self.config.node,
            self.config.pipeline,
            self.received,
            self.committed,
            self.applied,
            self.acked_sent,
            self.acks_sent,
            self.prepare_msgs_consumed,
            self.commit_msgs_consumed,
            self.reported,
            self.out_head,
            self.out_tail,
            self.write_msgs_sent,
            self.write_msgs_consumed,
            self.stats
        )
    }

    fn credits(&self) -> [u64; 3] {
        [
            self.prepare_msgs_consumed,
            self.commit_msgs_consumed,
            self.applied,
        ]
    }

    /// Runs everything that can make progress: apply, ACK, forward writes, return credits.
    pub fn advance(
        &mut self,
        outbox: &mut impl Outbox,
        replica: &impl Replica,
        completions: &mut impl Completions,
        limits: &Limits,
    ) {
        self.apply(replica, completions);
        let mut sent_to_leader = self.send_ack(outbox, limits);
        sent_to_leader |= self.send_writes(outbox, limits);
        if !sent_to_leader {
            self.send_credit_if_due(outbox, limits);
        }
    }

    fn apply(&mut self, replica: &impl Replica, completions: &mut impl Completions) {
        while self.applied < self.committed && self.applied < self.received {
            let meta = *self.pending.meta(self.applied);
            if !replica.try_apply(meta.zxid, meta.key, self.pending.value(self.applied)) {
                self.stats.ordering_stalls += 1;
                break;
            }
            if meta.origin_node == self.config.node {
                completions.write_applied(meta.session, meta.session_seq, meta.zxid);
            }
            self.pending.meta_mut(self.applied).present = false;
            self.applied += 1;
            self.stats.writes_applied += 1;
            self.stats.last_applied_zxid = meta.zxid;
        }
    }

    fn send_ack(&mut self, outbox: &mut impl Outbox, limits: &Limits) -> bool {
        if self.received <= self.acked_sent || self.acks_sent >= self.prepare_msgs_consumed {
            return false;
        }
        let count = (self.received - self.acked_sent).min(limits.ack_batch.max(1));
        let credits = self.credits();
        let Some(buffer) = outbox.buffer() else {
            return false;
        };
        wire::put_header(buffer, &self.config.header(Kind::Ack, 0, credits));
        wire::put_range(buffer, self.acked_sent, count);
        outbox.send(
            Target::Leader,
            Kind::Ack,
            wire::HEADER_BYTES + wire::RANGE_BODY,
            count,
        );
        self.acked_sent += count;
        self.acks_sent += 1;
        self.reported = credits;
        true
    }

    fn send_writes(&mut self, outbox: &mut impl Outbox, limits: &Limits) -> bool {
        let mut sent = false;
        while self.out_tail > self.out_head {
            if self.write_msgs_sent - self.write_msgs_consumed >= limits.write_credits {
                self.stats.credit_stalls += 1;
                break;
            }
            let batch = (self.out_tail - self.out_head)
                .min(limits.write_batch.max(1) as u64)
                .min(self.config.writes_fitting() as u64);
            let credits = self.credits();
            let header =
                self.config
                    .header(Kind::Write, usize::try_from(batch).unwrap_or(0), credits);
            let Some(buffer) = outbox.buffer() else { break };
            wire::put_header(buffer, &header);
            let len = wire::HEADER_BYTES
                + self.outgoing.encode_entries(
                    self.out_head,
                    batch,
                    &mut buffer[wire::HEADER_BYTES..],
                );
            outbox.send(Target::Leader, Kind::Write, len, batch);
            self.out_head += batch;
            self.write_msgs_sent += 1;
            self.reported = credits;
            sent = true;
        }
        sent
    }

    fn send_credit_if_due(&mut self, outbox: &mut impl Outbox, limits: &Limits) {
        let credits = self.credits();
        let due = credits[0] - self.reported[0] >= half(limits.prepare_credits)
            || credits[1] - self.reported[1] >= half(limits.commit_credits)
            || credits[2] - self.reported[2] >= (self.config.window as u64 / 4).max(1);
        if !due {
            return;
        }
        let Some(buffer) = outbox.buffer() else {
            return;
        };
        wire::put_header(buffer, &self.config.header(Kind::Credit, 0, credits));
        outbox.send(Target::Leader, Kind::Credit, wire::HEADER_BYTES, 0);
        self.reported = credits;
    }
}
