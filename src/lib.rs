//! ringhub: a thread-per-core WebSocket pub/sub hub.
//!
//! # Layout
//! Sans-IO layers (no sockets; unit-tested, fuzzed and benched on their own):
//! - [`codec`]: WebSocket frame decoder/encoder (RFC 6455 rules, UTF-8 across fragments).
//! - [`http`]: HTTP/1.1 request-head parsing, upgrade validation and small responses.
//! - [`protocol`]: client protocol v1 (JSON commands in, JSON replies and message frames out).
//! - [`topics`]: the per-shard topic registry (channel → local subscribers); reports
//!   first-subscriber / last-subscriber transitions.
//! - [`config`]: every limit with its default; [`metrics`]: per-shard counters.
//! - [`ratelimit`]: the per-connection publish token bucket.
//!
//! - [`auth`]: token verification, the JWKS cache and namespace permissions (pure decisions).
//!
//! I/O layers:
//! - [`server`]: starts one thread per shard, signals, shutdown.
//! - [`shard`]: what one core owns and its loops (accept, inbox, timer sweep); the hot path.
//! - [`conn`]: one connection's task (HTTP API, upgrade, WebSocket read/write loop).
//! - [`api`]: `POST /send` and `POST /disconnect` (by connection or user, on any instance).
//! - [`inbox`]: the only cross-thread path into a shard.
//! - [`broker`]: the seam between shards and instances; in-process implementation.
//! - [`redis`]: the Redis implementation: per-shard links, lazy subscriptions, history in Redis.
//! - [`registry`]: connection registry and instance heartbeats on a dedicated core (Redis mode).
//! - [`resp`]: sans-IO RESP parser and command encoder.
//! - [`sock`]: non-blocking receive helper.

pub mod api;
pub mod auth;
pub mod broker;
pub mod codec;
pub mod config;
pub mod conn;
pub mod history;
pub mod http;
pub mod inbox;
pub mod metrics;
pub mod protocol;
pub mod ratelimit;
pub mod recovery;
pub mod redis;
pub mod registry;
pub mod resp;
pub mod server;
pub mod session;
pub mod shard;
pub mod sock;
pub mod topics;
