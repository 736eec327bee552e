//! The broker seam: how a publish on one shard reaches the subscribers on every other shard (and,
//! with Redis, on every other instance).
//!
//! The shard owns its topic registry and does local fan-out itself; the broker only decides where
//! else a message must go and is told about the registry's transitions:
//! - [`Broker::publish`] is called once per accepted publish. It returns [`Route::Local`] when the
//!   shard must deliver to its own subscribers right away (the in-process broker), or
//!   [`Route::ViaBus`] when the message comes back through the bus like any other (Redis).
//! - [`Broker::first_subscriber`] / [`Broker::last_unsubscribed`] follow the topic registry's
//!   transitions; a Redis broker SUBSCRIBEs / UNSUBSCRIBEs lazily on them.
//!
//! Delivery guarantee of [`MemoryBroker`]: every message reaches every shard that had a subscriber
//! when the publish was routed, in publish order per publishing shard (FIFO inboxes). There is no
//! persistence: a message published on a channel nobody is subscribed to is dropped.

use crate::inbox::{Inbox, ShardMsg};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;

/// Where the shard must deliver a publish it just handed to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Deliver to this shard's local subscribers now.
    Local,
    /// Do not deliver locally: the message will come back through the bus.
    ViaBus,
}

/// Why a publish could not be accepted. Not fatal for the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The bus is down (Redis link not ready); the client gets an `unavailable` error.
    #[error("the message bus is unavailable")]
    Unavailable,
}

/// A history read in flight (Redis mode).
pub type HistoryFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<crate::history::Page, BrokerError>>>>;

/// One per shard. Implementations must not block: they queue work and return.
pub trait Broker {
    /// Route a publish of `data` (JSON text) on `channel` from this shard.
    fn publish(&mut self, channel: &str, data: &[u8]) -> Result<Route, BrokerError>;
    /// The shard's first local subscriber of `channel` joined.
    fn first_subscriber(&mut self, channel: &str);
    /// The shard's last local subscriber of `channel` left.
    fn last_unsubscribed(&mut self, channel: &str);
    /// Whether the bus has not yet confirmed a subscription to `channel` that this shard asked
    /// for: the shard then holds the client's `subscribed` ack (and its further commands) until
    /// the confirmation, so that a publish after the ack is delivered.
    fn subscription_pending(&self, _channel: &str) -> bool {
        false
    }
    /// Shard `from` reported an interest change (in-process broker only).
    fn peer_interest(&mut self, _from: usize, _channel: Arc<str>, _on: bool) {}
    /// Redis mode: publish on a history channel (numbered and kept by Redis, then delivered
    /// through the bus with its offset). The in-process broker is never asked: in embedded mode
    /// the shard sends history publishes to the channel's owner shard itself.
    fn publish_history(
        &mut self,
        _channel: &str,
        _data: &[u8],
        _opts: &crate::history::HistoryOptions,
    ) -> Result<(), BrokerError> {
        Err(BrokerError::Unavailable)
    }
    /// Redis mode: read `channel`'s history after `since` (at most `limit` messages), with its
    /// epoch and top offset. `None`: this broker keeps no history (embedded mode reads the owner
    /// shard instead).
    fn read_history(
        &mut self,
        _channel: &str,
        _since: Option<u64>,
        _limit: usize,
        _opts: &crate::history::HistoryOptions,
    ) -> Option<HistoryFuture> {
        None
    }
    /// Embedded mode: this shard owns `channel`'s history and numbered a message; forward it to
    /// the other shards with subscribers (as `DeliverNumbered`). Other brokers ignore it.
    fn forward_numbered(&mut self, _channel: &str, _data: &Bytes, _offset: u64, _epoch: &Arc<str>) {
    }
    /// Whether publishes can currently be accepted (`/readyz`).
    fn is_ready(&self) -> bool {
        true
    }
}

/// The embedded (single-instance) broker: carries publishes to the other shards of this process
/// through their inboxes, only to shards that reported a subscriber for the channel.
///
/// Each shard learns the other shards' interest from `Interest` messages in its own inbox, so the
/// routing table is shard-local (no shared map, no lock). Before routing a publish the shard drains
/// its inbox (see `Shard::publish`): an interest change pushed by shard B before B acknowledged a
/// subscribe is therefore seen by shard A for any publish that A receives after the client saw
/// that acknowledgement.
pub struct MemoryBroker {
    me: usize,
    peers: Arc<[Arc<Inbox>]>,
    /// channel → other shards with at least one subscriber.
    interest: HashMap<Arc<str>, Vec<usize>>,
}

impl MemoryBroker {
    pub fn new(me: usize, peers: Arc<[Arc<Inbox>]>) -> Self {
        MemoryBroker {
            me,
            peers,
            interest: HashMap::new(),
        }
    }

    fn tell_peers(&self, channel: &str, on: bool) {
        if self.peers.len() <= 1 {
            return;
        }
        let channel: Arc<str> = Arc::from(channel);
        for (i, inbox) in self.peers.iter().enumerate() {
            if i != self.me {
                inbox.push(ShardMsg::Interest {
                    from: self.me,
                    channel: channel.clone(),
                    on,
                });
            }
        }
    }
}

impl Broker for MemoryBroker {
    fn forward_numbered(&mut self, channel: &str, data: &Bytes, offset: u64, epoch: &Arc<str>) {
        if let Some((name, shards)) = self.interest.get_key_value(channel) {
            for &s in shards {
                self.peers[s].push(ShardMsg::DeliverNumbered {
                    channel: name.clone(),
                    data: data.clone(),
                    offset,
                    epoch: epoch.clone(),
                });
            }
        }
    }

    fn publish(&mut self, channel: &str, data: &[u8]) -> Result<Route, BrokerError> {
        if let Some((name, shards)) = self.interest.get_key_value(channel) {
            // One copy of the payload for all remote shards; each builds its own frame from it.
            let data = Bytes::copy_from_slice(data);
            for &s in shards {
                self.peers[s].push(ShardMsg::Deliver {
                    channel: name.clone(),
                    data: data.clone(),
                });
            }
        }
        Ok(Route::Local)
    }

    fn first_subscriber(&mut self, channel: &str) {
        self.tell_peers(channel, true);
    }

    fn last_unsubscribed(&mut self, channel: &str) {
        self.tell_peers(channel, false);
    }

    fn peer_interest(&mut self, from: usize, channel: Arc<str>, on: bool) {
        if on {
            let shards = self.interest.entry(channel).or_default();
            if !shards.contains(&from) {
                shards.push(from);
            }
        } else if let Some(shards) = self.interest.get_mut(&channel) {
            shards.retain(|&s| s != from);
            if shards.is_empty() {
                self.interest.remove(&channel);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_only_to_interested_shards() {
        let peers: Arc<[Arc<Inbox>]> = vec![Inbox::new(), Inbox::new(), Inbox::new()].into();
        let mut b0 = MemoryBroker::new(0, peers.clone());
        let mut b1 = MemoryBroker::new(1, peers.clone());
        b1.first_subscriber("news");
        // Shard 0 learns of shard 1's interest from its inbox.
        match peers[0].try_pop() {
            Some(ShardMsg::Interest { from, channel, on }) => b0.peer_interest(from, channel, on),
            other => panic!("expected interest, got {other:?}"),
        }
        assert!(matches!(
            peers[2].try_pop(),
            Some(ShardMsg::Interest { .. })
        ));
        assert_eq!(b0.publish("news", b"1").unwrap(), Route::Local);
        assert!(
            matches!(peers[1].try_pop(), Some(ShardMsg::Deliver { data, .. }) if &data[..] == b"1")
        );
        assert!(
            peers[2].is_empty(),
            "shard 2 has no subscriber and must get nothing"
        );
        b0.publish("other", b"2").unwrap();
        assert!(peers[1].is_empty());
        b0.peer_interest(1, Arc::from("news"), false);
        b0.publish("news", b"3").unwrap();
        assert!(peers[1].is_empty(), "interest withdrawn");
    }
}
