//! The leader's side of one pipeline: takes client writes (forwarded by followers or from its
//! own sessions), gives them zxids, broadcasts PREPAREs, counts ACKs, commits at a quorum,
//! applies in zxid order and broadcasts COMMITs. Pure state machine; see the parent module.

use rzab_shared::limits::MAX_NODES;

use super::wire::{self, Kind, Message};
use super::{
    Completions, EntryMeta, EntryRing, Limits, MAX_WRITE_CREDITS, Outbox, PipelineConfig,
    PipelineStats, Replica, Target, ZxidSource, half,
};
use rzab_shared::limits::MAX_WRITES_PER_MSG;

/// What the leader knows of one follower.
#[derive(Clone, Copy, Debug, Default)]
struct FollowerLink {
    /// Every prepare below this pseq is held by the follower.
    acked: u64,
    prepare_consumed: u64,
    commit_consumed: u64,
    /// The follower has applied every prepare below this pseq.
    applied: u64,
    /// WRITE messages of this follower whose writes have all been prepared.
    write_consumed: u64,
    /// The `write_consumed` value last sent to the follower.
    write_reported: u64,
}

/// The leader's state for one pipeline.
#[derive(Debug)]
pub struct Leader {
    config: PipelineConfig,
    /// Writes waiting for a zxid, in arrival order.
    incoming: EntryRing,
    incoming_head: u64,
    incoming_tail: u64,
    /// Prepared writes, by pseq.
    pending: EntryRing,
    next_pseq: u64,
    committed: u64,
    applied: u64,
    commit_sent: u64,
    prepare_msgs_sent: u64,
    commit_msgs_sent: u64,
    links: [FollowerLink; MAX_NODES],
    stats: PipelineStats,
}

impl Leader {
    pub fn new(config: PipelineConfig) -> Self {
        let incoming_capacity =
            config.followers() * MAX_WRITE_CREDITS * MAX_WRITES_PER_MSG + config.sessions;
        Leader {
            incoming: EntryRing::new(incoming_capacity.max(1), config.value_len),
            incoming_head: 0,
            incoming_tail: 0,
            pending: EntryRing::new(config.window, config.value_len),
            next_pseq: 0,
            committed: 0,
            applied: 0,
            commit_sent: 0,
            prepare_msgs_sent: 0,
            commit_msgs_sent: 0,
            links: [FollowerLink::default(); MAX_NODES],
            stats: PipelineStats::default(),
            config,
        }
    }

    pub fn stats(&self) -> PipelineStats {
        self.stats
    }

    /// Prepares issued so far (the next pseq).
    pub fn prepared(&self) -> u64 {
        self.next_pseq
    }

    /// Writes committed so far (by pseq).
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// A one-line summary of the pipeline's positions and credits, for diagnostics.
    pub fn summary(&self) -> String {
        let links: Vec<String> = self
            .follower_ids()
            .map(|follower| {
                let link = &self.links[follower];
                format!(
                    "f{follower}[acked {} prep {}/{} commit {}/{} applied {} writes {}/{}]",
                    link.acked,
                    link.prepare_consumed,
                    self.prepare_msgs_sent,
                    link.commit_consumed,
                    self.commit_msgs_sent,
                    link.applied,
                    link.write_reported,
                    link.write_consumed
                )
            })
            .collect();
        format!(
            "leader p{}: incoming {} next {} committed {} commit_sent {} applied {} {} {:?}",
            self.config.pipeline,
            self.incoming_len(),
            self.next_pseq,
            self.committed,
            self.commit_sent,
            self.applied,
            links.join(" "),
            self.stats
        )
    }

    fn incoming_len(&self) -> u64 {
        self.incoming_tail - self.incoming_head
    }

    /// Queues a write of one of this node's own sessions; false when there is no room.
    pub fn submit_write(&mut self, session: u16, session_seq: u64, key: u64, value: &[u8]) -> bool {
        if self.incoming_len() >= self.incoming.capacity() as u64 {
            return false;
        }
        let meta = EntryMeta::local_write(self.config.node, session, session_seq, key);
        self.incoming.put(self.incoming_tail, meta, value);
        self.incoming_tail += 1;
        true
    }

    /// Handles one decoded message.
    pub fn handle(&mut self, message: &Message<'_>) {
        let from = usize::from(message.header.from_node);
        if from == usize::from(self.config.node) {
            self.stats.dropped_unexpected += 1;
            return;
        }
        let next_pseq = self.next_pseq;
        let link = &mut self.links[from];
        let [prepare_consumed, commit_consumed, applied] = message.header.credits;
        link.prepare_consumed = link
            .prepare_consumed
            .max(prepare_consumed.min(self.prepare_msgs_sent));
        link.commit_consumed = link
            .commit_consumed
            .max(commit_consumed.min(self.commit_msgs_sent));
        link.applied = link.applied.max(applied.min(next_pseq));
        match message.header.kind {
            Kind::Write => {
                let count = usize::from(message.header.count);
                if self.incoming_len() + count as u64 > self.incoming.capacity() as u64 {
                    self.stats.dropped_unexpected += 1;
                    return;
                }
                for index in 0..count {
                    let entry = message.entry(index);
                    let meta = EntryMeta {
                        zxid: 0,
                        key: entry.key,
                        session_seq: entry.session_seq,
                        session: entry.session,
                        origin_node: message.header.from_node,
                        present: true,
                        ends_message: index + 1 == count,
                    };
                    self.incoming.put(self.incoming_tail, meta, entry.value);
                    self.incoming_tail += 1;
                }
            }
            Kind::Ack => {
                // A follower acks only the prefix it holds whole, so a range's end means "every
                // prepare below this": later ranges may arrive first, and earlier ones change
                // nothing.
                let (first, count) = message.range();
                let end = first.saturating_add(count);
                if end <= next_pseq {
                    link.acked = link.acked.max(end);
                } else {
                    self.stats.dropped_unexpected += 1;
                }
            }
            Kind::Credit => {}
            Kind::Prepare | Kind::Commit => self.stats.dropped_unexpected += 1,
        }
    }

    fn follower_ids(&self) -> impl Iterator<Item = usize> + use<> {
        let leader = usize::from(self.config.node);
        (0..usize::from(self.config.nodes)).filter(move |node| *node != leader)
    }

    /// The highest pseq that a quorum (the leader plus `nodes / 2` followers) holds.
    fn quorum_point(&self) -> u64 {
        let needed = self.config.quorum_followers();
        if needed == 0 {
            return self.next_pseq;
        }
        let mut acked = [0u64; MAX_NODES];
        let mut count = 0;
        for follower in self.follower_ids() {
            acked[count] = self.links[follower].acked;
            count += 1;
        }
        let acked = &mut acked[..count];
        acked.sort_unstable_by(|a, b| b.cmp(a));
        acked[needed - 1]
    }

    /// Runs everything that can make progress: commit, apply, send COMMITs, PREPAREs and
    /// CREDITs.
    pub fn advance(
        &mut self,
        outbox: &mut impl Outbox,
        replica: &impl Replica,
        zxids: &ZxidSource,
        completions: &mut impl Completions,
        limits: &Limits,
    ) {
        self.committed = self.committed.max(self.quorum_point().min(self.next_pseq));
        self.apply(replica, completions);
        if self.config.followers() > 0 {
            self.send_commits(outbox, limits);
        } else {
            self.commit_sent = self.committed;
        }
        self.send_prepares(outbox, zxids, limits);
        self.send_credits(outbox, limits);
    }

    fn apply(&mut self, replica: &impl Replica, completions: &mut impl Completions) {
        while self.applied < self.committed {
            let meta = *self.pending.meta(self.applied);
            if !replica.try_apply(meta.zxid, meta.key, self.pending.value(self.applied)) {
                self.stats.ordering_stalls += 1;
                break;
            }
            if meta.origin_node == self.config.node {
                completions.write_applied(meta.session, meta.session_seq, meta.zxid);
            }
            self.applied += 1;
            self.stats.writes_applied += 1;
            self.stats.last_applied_zxid = meta.zxid;
        }
    }

    fn credits_exhausted(
        &self,
        sent: u64,
        consumed: impl Fn(&FollowerLink) -> u64,
        budget: u64,
    ) -> bool {
        self.follower_ids()
            .any(|follower| sent - consumed(&self.links[follower]) >= budget)
    }

    fn send_commits(&mut self, outbox: &mut impl Outbox, limits: &Limits) {
        while self.commit_sent < self.committed {
            if self.credits_exhausted(
                self.commit_msgs_sent,
                |link| link.commit_consumed,
                limits.commit_credits,
            ) {
                self.stats.credit_stalls += 1;
                return;
            }
            let count = (self.committed - self.commit_sent).min(limits.commit_batch.max(1));
            let Some(buffer) = outbox.buffer() else {
                return;
            };
            wire::put_header(buffer, &self.config.header(Kind::Commit, 0, [0; 3]));
            wire::put_range(buffer, self.commit_sent, count);
            outbox.send(
                Target::AllFollowers,
                Kind::Commit,
                wire::HEADER_BYTES + wire::RANGE_BODY,
                count,
            );
            self.commit_sent += count;
            self.commit_msgs_sent += 1;
        }
    }

    fn window_base(&self) -> u64 {
        self.follower_ids()
            .map(|follower| self.links[follower].applied)
            .fold(self.applied, u64::min)
    }

    fn send_prepares(&mut self, outbox: &mut impl Outbox, zxids: &ZxidSource, limits: &Limits) {
        let has_followers = self.config.followers() > 0;
        while self.incoming_len() > 0 {
            let in_window = self.next_pseq - self.window_base();
            let space = self.config.window as u64 - in_window;
            if space == 0 {
                self.stats.window_stalls += 1;
                return;
            }
            if has_followers
                && self.credits_exhausted(
                    self.prepare_msgs_sent,
                    |link| link.prepare_consumed,
                    limits.prepare_credits,
                )
            {
                self.stats.credit_stalls += 1;
                return;
            }
            let batch = self
                .incoming_len()
                .min(limits.prepare_batch.max(1) as u64)
                .min(self.config.prepares_fitting() as u64)
                .min(space);
            // Secure the buffer before taking zxids: zxids once taken cannot be given back.
            let buffer = match has_followers.then(|| outbox.buffer()) {
                Some(None) => return,
                Some(Some(buffer)) => Some(buffer),
                None => None,
            };
            let first_zxid = zxids.take(batch);
            let first_pseq = self.next_pseq;
            let node = self.config.node;
            let mut len = 0;
            if let Some(buffer) = buffer {
                let count = usize::try_from(batch).unwrap_or(0);
                wire::put_header(buffer, &self.config.header(Kind::Prepare, count, [0; 3]));
                wire::put_prepare_prefix(buffer, first_pseq, first_zxid);
                len = wire::HEADER_BYTES + wire::PREPARE_PREFIX;
                len += self
                    .incoming
                    .encode_entries(self.incoming_head, batch, &mut buffer[len..]);
            }
            for offset in 0..batch {
                let from = self.incoming_head + offset;
                let meta = *self.incoming.meta(from);
                if meta.ends_message && meta.origin_node != node {
                    self.links[usize::from(meta.origin_node)].write_consumed += 1;
                }
                let prepared = EntryMeta {
                    zxid: first_zxid + offset,
                    present: true,
                    ends_message: false,
                    ..meta
                };
                self.pending
                    .put_from(first_pseq + offset, prepared, &self.incoming, from);
            }
            self.incoming_head += batch;
            self.next_pseq += batch;
            if has_followers {
                self.prepare_msgs_sent += 1;
                outbox.send(Target::AllFollowers, Kind::Prepare, len, batch);
            } else {
                self.committed = self.next_pseq;
            }
        }
    }

    fn send_credits(&mut self, outbox: &mut impl Outbox, limits: &Limits) {
        for follower in 0..usize::from(self.config.nodes) {
            if follower == usize::from(self.config.node) {
                continue;
            }
            let link = self.links[follower];
            if link.write_consumed - link.write_reported < half(limits.write_credits) {
                continue;
            }
            let Some(buffer) = outbox.buffer() else {
                return;
            };
            wire::put_header(
                buffer,
                &self
                    .config
                    .header(Kind::Credit, 0, [link.write_consumed, 0, 0]),
            );
            let target = Target::Follower(u8::try_from(follower).unwrap_or(u8::MAX));
            outbox.send(target, Kind::Credit, wire::HEADER_BYTES, 0);
            self.links[follower].write_reported = link.write_consumed;
        }
    }
}
