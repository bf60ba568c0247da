//! Group commit: ONE writer thread drains a bounded channel of pending messages, appends each
//! batch in one transaction (one fsync) and only then releases the batch's acknowledgements to
//! their sessions. While one fsync runs, the next batch gathers, so the fsync cost (~0.3 ms
//! here) is shared by every message that arrived meanwhile.
//!
//! Order: the channel is FIFO and a session sends its items in packet order, so each session
//! gets its acks back in packet order. Refusals that must keep that order (a v5 PUBACK 0x87
//! after stored messages) travel through the same queue as [`Work::Echo`] and are never written.

use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{broadcast, mpsc, watch};

use super::metrics::Metrics;
use super::storage::DiskGuard;
use devid_store::{Appended, LiveMessage, MessageStore, NewMessage};

/// What the writer does with one item.
#[derive(Debug)]
pub enum Work {
    /// Append durably.
    Store(NewMessage),
    /// Write nothing; answer with this reason code in order.
    Echo(u8),
}

/// The outcome of one item, sent back to its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Durably stored.
    Stored,
    /// Stored before (same device and msg-id): acknowledged, not stored again.
    Duplicate,
    /// An echoed reason code (nothing stored).
    Echo(u8),
    /// The commit failed: nothing of the batch is stored.
    Failed,
}

/// One acknowledgement for a session.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    /// Packet id to acknowledge (None for QoS 0).
    pub packet_id: Option<NonZeroU16>,
    /// What happened.
    pub outcome: Outcome,
}

/// One item for the writer.
#[derive(Debug)]
pub struct Pending {
    /// What to do.
    pub work: Work,
    /// Packet id to acknowledge afterwards.
    pub packet_id: Option<NonZeroU16>,
    /// Where the ack goes (the session's channel).
    pub reply: mpsc::UnboundedSender<Ack>,
}

/// The sending side of the group-commit writer.
#[derive(Debug, Clone)]
pub struct CommitQueue {
    tx: mpsc::Sender<Pending>,
    fatal: watch::Receiver<Option<String>>,
}

/// The writer is gone (it only stops when the process does).
#[derive(Debug, thiserror::Error)]
#[error("the message writer has stopped; restart the server")]
pub struct WriterStopped;

impl CommitQueue {
    /// Start the writer thread.
    pub fn start(
        store: Arc<dyn MessageStore>,
        metrics: Arc<Metrics>,
        live: broadcast::Sender<Arc<LiveMessage>>,
        disk: Option<Arc<DiskGuard>>,
        batch_max: usize,
        queue: usize,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let (fatal_tx, fatal) = watch::channel(None);
        std::thread::Builder::new()
            .name("devid-commit".into())
            .spawn(move || {
                if let Some(why) = writer(rx, store, metrics, live, disk, batch_max.max(1)) {
                    let _ = fatal_tx.send(Some(why));
                }
            })?;
        Ok(Self { tx, fatal })
    }

    /// Becomes `Some(why)` when the writer stopped for good after a fatal storage error (a
    /// failed fdatasync): the server must exit non-zero and be restarted.
    pub fn fatal(&self) -> watch::Receiver<Option<String>> {
        self.fatal.clone()
    }

    /// Queue one item, waiting while the queue is full (backpressure).
    pub async fn submit(&self, p: Pending) -> Result<(), WriterStopped> {
        match self.tx.try_send(p) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(p)) => {
                self.tx.send(p).await.map_err(|_| WriterStopped)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(WriterStopped),
        }
    }
}

/// The writer loop; returns the reason when it stopped for a fatal storage error (then it
/// acknowledges nothing more: the queue is dropped with it).
fn writer(
    mut rx: mpsc::Receiver<Pending>,
    store: Arc<dyn MessageStore>,
    metrics: Arc<Metrics>,
    live: broadcast::Sender<Arc<LiveMessage>>,
    disk: Option<Arc<DiskGuard>>,
    batch_max: usize,
) -> Option<String> {
    let mut fatal = None;
    let mut items: Vec<(mpsc::UnboundedSender<Ack>, Option<NonZeroU16>, Option<u8>)> =
        Vec::with_capacity(batch_max);
    let mut rows: Vec<NewMessage> = Vec::with_capacity(batch_max);
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(p) = next.take() {
            match p.work {
                Work::Store(m) => {
                    rows.push(m);
                    items.push((p.reply, p.packet_id, None));
                }
                Work::Echo(code) => items.push((p.reply, p.packet_id, Some(code))),
            }
            if rows.len() < batch_max {
                next = rx.try_recv().ok();
            }
        }
        let results = if rows.is_empty() {
            Ok(Vec::new())
        } else {
            let start = Instant::now();
            let r = store.append_batch(&rows);
            metrics
                .commit_seconds
                .observe(start.elapsed().as_secs_f64());
            metrics.commit_batch_size.observe(rows.len() as f64);
            r
        };
        let mut results = match results {
            Ok(r) if r.len() == rows.len() => Some(r.into_iter()),
            Ok(_) => {
                tracing::error!("message store returned a wrong number of results");
                metrics.commit_failures.inc();
                None
            }
            Err(e) if e.is_fatal() => {
                tracing::error!(error = %e, messages = rows.len(), "group commit failed fatally (fdatasync): nothing of the batch is acknowledged, nothing more will be; the server is exiting so that a restart recovers from what is on disk");
                metrics.commit_failures.inc();
                fatal = Some(e.to_string());
                None
            }
            Err(e) => {
                tracing::error!(error = %e, messages = rows.len(), "group commit failed; nothing of the batch is acknowledged");
                metrics.commit_failures.inc();
                // a full disk is the usual cause: refuse further publishes at once
                if let Some(d) = &disk {
                    d.check_now();
                }
                None
            }
        };
        let streaming = live.receiver_count() > 0;
        let mut stored = 0u64;
        let mut dups = 0u64;
        let mut row_iter = rows.drain(..);
        for (reply, packet_id, echo) in items.drain(..) {
            let outcome = match echo {
                Some(code) => Outcome::Echo(code),
                None => {
                    let row = row_iter.next();
                    match (results.as_mut().and_then(Iterator::next), row) {
                        (Some(Appended::Stored(id)), Some(row)) => {
                            stored += 1;
                            if streaming {
                                let _ = live.send(Arc::new(LiveMessage::new(id, row)));
                            }
                            Outcome::Stored
                        }
                        // counted and streamed by the store's index hook once indexed
                        (Some(Appended::Logged(_)), _) => Outcome::Stored,
                        (Some(Appended::Duplicate), _) => {
                            dups += 1;
                            Outcome::Duplicate
                        }
                        _ => Outcome::Failed,
                    }
                }
            };
            // A closed session simply does not get its ack; the message is stored anyway.
            let _ = reply.send(Ack { packet_id, outcome });
        }
        drop(row_iter);
        metrics.messages_stored.inc_by(stored);
        metrics.messages_duplicate.inc_by(dups);
        if fatal.is_some() {
            // Items still queued are dropped unanswered with `rx`.
            tracing::error!("message writer stopped after a fatal storage error");
            return fatal;
        }
    }
    tracing::info!("message writer stopped");
    None
}
