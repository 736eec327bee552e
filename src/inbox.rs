//! The one cross-thread path into a shard: a multi-producer queue plus a waker.
//!
//! Shards share nothing else. Anything another thread wants from a shard (a message to deliver,
//! a subscription-interest change, a metrics request, shutdown) is pushed here as a [`ShardMsg`].
//!
//! Invariants:
//! - Messages pushed by one thread are received in the order they were pushed (FIFO queue), which
//!   is what keeps per-publisher order across shards.
//! - Waking costs one atomic swap per push and at most one wake-up per drain: producers only wake
//!   the shard when the `notified` flag flips from false to true, so a burst of pushes costs one
//!   wake. The shard never busy-polls: its inbox task sleeps until woken.

use crate::metrics::ShardMetrics;
use bytes::Bytes;
use crossbeam_queue::SegQueue;
use futures_util::task::AtomicWaker;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;

/// What can be sent to a shard.
#[derive(Debug)]
pub enum ShardMsg {
    /// Deliver `data` (JSON text) on `channel` to this shard's local subscribers.
    Deliver { channel: Arc<str>, data: Bytes },
    /// Embedded mode: a publish on a history channel, sent to the channel's owner shard, which
    /// numbers it, keeps it and forwards it as [`ShardMsg::DeliverNumbered`].
    HistoryPublish { channel: Arc<str>, data: Bytes },
    /// Deliver a numbered message of a history channel (offset within epoch).
    DeliverNumbered {
        channel: Arc<str>,
        data: Bytes,
        offset: u64,
        epoch: Arc<str>,
    },
    /// Embedded mode: read a channel's history on its owner shard.
    HistoryRead {
        channel: Arc<str>,
        since: Option<u64>,
        limit: usize,
        /// Start the channel's epoch if it has none (subscribers; not mere readers).
        create: bool,
        reply: futures_channel::oneshot::Sender<crate::history::Page>,
    },
    /// Shard `from` gained its first (`on`) or lost its last (`!on`) subscriber of `channel`.
    /// Used by the in-process broker to publish only to shards that want a channel.
    Interest {
        from: usize,
        channel: Arc<str>,
        on: bool,
    },
    /// Send a copy of this shard's counters.
    Metrics(futures_channel::oneshot::Sender<ShardMetrics>),
    /// Deliver `{"type":"direct","data":<data>}` to one connection (slab `key`, checked against
    /// `seq`); `reply` learns whether it was there.
    Direct {
        key: usize,
        seq: u64,
        data: Bytes,
        reply: Option<futures_channel::oneshot::Sender<bool>>,
    },
    /// Deliver `{"type":"direct","data":<data>}` to every connection of `user` on this shard;
    /// `reply` learns how many got it.
    UserDirect {
        user: Arc<str>,
        data: Bytes,
        reply: futures_channel::oneshot::Sender<usize>,
    },
    /// Close one connection (slab `key`, checked against `seq`) with `code`/`reason` (a backend's
    /// `POST /disconnect`); `reply` learns whether it was there.
    Disconnect {
        key: usize,
        seq: u64,
        code: u16,
        reason: Arc<str>,
        reply: Option<futures_channel::oneshot::Sender<bool>>,
    },
    /// Close every connection of `user` on this shard; `reply` learns how many.
    UserDisconnect {
        user: Arc<str>,
        code: u16,
        reason: Arc<str>,
        reply: Option<futures_channel::oneshot::Sender<usize>>,
    },
    /// The registry repairs itself: send the records of every open WebSocket.
    RegistrySnapshot(futures_channel::oneshot::Sender<Vec<crate::registry::ConnRecord>>),
    /// Begin graceful shutdown: stop accepting, close clients with 1001, exit when drained.
    Shutdown,
}

/// Wakes one consumer task from any thread, at most once per drain: producers call
/// [`Wakeup::notify`] after pushing to their queue; the consumer awaits [`Wakeup::wait`] with a
/// check of its queue. A burst of pushes costs one wake-up.
#[derive(Debug, Default)]
pub struct Wakeup {
    waker: AtomicWaker,
    notified: AtomicBool,
}

impl Wakeup {
    /// Wake the consumer unless it is already scheduled to drain.
    pub fn notify(&self) {
        if !self.notified.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// Wait until `has_work()` holds (checked again after registering, so no push is missed).
    pub async fn wait(&self, has_work: impl Fn() -> bool) {
        poll_fn(|cx| {
            // Clear the flag first: a push after this point wakes us again.
            self.notified.store(false, Ordering::Release);
            if has_work() {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if has_work() {
                return Poll::Ready(());
            }
            Poll::Pending
        })
        .await
    }
}

/// A shard's inbound queue. Shared (`Arc`) between the owning shard and every producer.
#[derive(Default)]
pub struct Inbox {
    queue: SegQueue<ShardMsg>,
    wakeup: Wakeup,
}

impl Inbox {
    pub fn new() -> Arc<Inbox> {
        Arc::new(Inbox::default())
    }

    /// Push a message and wake the shard if it is not already scheduled to drain.
    pub fn push(&self, msg: ShardMsg) {
        self.queue.push(msg);
        self.wakeup.notify();
    }

    /// Take one message without waiting (the owning shard only).
    pub fn try_pop(&self) -> Option<ShardMsg> {
        self.queue.pop()
    }

    /// Whether anything is waiting (a cheap check before a publish is routed).
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Wait until there is something to drain (the owning shard's inbox task only).
    pub async fn ready(&self) {
        self.wakeup.wait(|| !self.queue.is_empty()).await
    }
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("len", &self.queue.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_per_producer_and_cross_thread_wake() {
        let inbox = Inbox::new();
        let producer = {
            let inbox = inbox.clone();
            std::thread::spawn(move || {
                for i in 0..10_000u32 {
                    inbox.push(ShardMsg::Deliver {
                        channel: Arc::from("c"),
                        data: Bytes::from(i.to_string()),
                    });
                }
            })
        };
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        let got = rt.block_on(async {
            let mut next = 0u32;
            while next < 10_000 {
                inbox.ready().await;
                while let Some(ShardMsg::Deliver { data, .. }) = inbox.try_pop() {
                    assert_eq!(data, Bytes::from(next.to_string()));
                    next += 1;
                }
            }
            next
        });
        producer.join().unwrap();
        assert_eq!(got, 10_000);
        assert!(inbox.is_empty());
    }
}
