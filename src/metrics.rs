//! Per-shard counters, merged only when read.
//!
//! Each shard owns one [`ShardMetrics`] of plain `u64` fields (no atomics: only the shard's own
//! thread writes them). `GET /metrics` asks every shard for a copy through its inbox and renders
//! the per-shard values plus their sums in the Prometheus text format.

use crate::protocol::ErrorCode;
use std::fmt::Write as _;

/// Error codes counted per shard, in a fixed order (index = position here).
pub const ERROR_CODES: [ErrorCode; 11] = [
    ErrorCode::BadRequest,
    ErrorCode::InvalidChannel,
    ErrorCode::TooManySubscriptions,
    ErrorCode::MessageTooLarge,
    ErrorCode::Unavailable,
    ErrorCode::RateLimited,
    ErrorCode::NotFound,
    ErrorCode::Unauthorized,
    ErrorCode::TokenExpired,
    ErrorCode::PermissionDenied,
    ErrorCode::UnknownNamespace,
];

fn error_index(code: ErrorCode) -> usize {
    ERROR_CODES.iter().position(|c| *c == code).unwrap_or(0)
}

/// One shard's counters. Plain values: copied (`Clone`) to answer a metrics request.
#[derive(Debug, Clone, Default)]
pub struct ShardMetrics {
    /// Open WebSocket connections (gauge).
    pub connections_current: u64,
    /// WebSocket connections accepted since start.
    pub connections_total: u64,
    /// HTTP requests served (non-upgrade).
    pub http_requests: u64,
    /// WebSocket messages (text frames, reassembled) received from clients.
    pub messages_received: u64,
    /// Publishes accepted on this shard (from clients and `POST /publish`).
    pub messages_published: u64,
    /// Frames queued to subscribers (one per subscriber per message).
    pub messages_delivered: u64,
    /// Bytes handed to the kernel.
    pub bytes_written: u64,
    /// Connections cut off with 1013 because their outbox exceeded the limit.
    pub slow_consumer_closes: u64,
    /// Connections closed for a protocol violation (1002/1003/1007/1009).
    pub protocol_closes: u64,
    /// Connections closed by the idle timeout.
    pub idle_closes: u64,
    /// Connections closed with 1008 for exceeding the publish rate limit persistently.
    pub rate_limit_closes: u64,
    /// Connections dropped because the handshake did not complete in time.
    pub handshake_timeouts: u64,
    /// Upgrades refused because of `max_connections`.
    pub connections_refused: u64,
    /// Messages received from the bus (Redis mode).
    pub bus_messages_received: u64,
    /// Registry events dropped because the registry's queue was full (repaired by a full refresh).
    pub registry_drops: u64,
    /// Connections authenticated (`connect` accepted).
    pub auth_successes: u64,
    /// Tokens refused (connection and channel tokens, at connect, subscribe and refresh).
    pub auth_failures: u64,
    /// Connections closed because their token expired without a refresh (4002).
    pub expiry_closes: u64,
    /// Connections closed on a backend's request (`POST /disconnect`).
    pub server_disconnects: u64,
    /// Upgrades refused with 403 by `allowed_origins`.
    pub origin_refusals: u64,
    /// History reads (subscribes to history channels, `history` commands, `GET /history`).
    pub history_reads: u64,
    /// Subscribes with `since` answered `recovered: true`.
    pub recoveries_complete: u64,
    /// Subscribes with `since` answered `recovered: false`.
    pub recoveries_reset: u64,
    /// Messages sent as the backlog of complete recoveries.
    pub messages_recovered: u64,
    /// Messages a shard fetched from the history to fill a gap in its live stream (Redis mode).
    pub history_repaired: u64,
    /// Epoch changes seen on a live history channel (`reset` sent to its subscribers).
    pub history_resets: u64,
    /// Error replies sent, by code (see [`ERROR_CODES`]).
    pub errors: [u64; ERROR_CODES.len()],
}

impl ShardMetrics {
    /// Count one error reply.
    pub fn count_error(&mut self, code: ErrorCode) {
        self.errors[error_index(code)] += 1;
    }

    fn add(&mut self, o: &ShardMetrics) {
        self.connections_current += o.connections_current;
        self.connections_total += o.connections_total;
        self.http_requests += o.http_requests;
        self.messages_received += o.messages_received;
        self.messages_published += o.messages_published;
        self.messages_delivered += o.messages_delivered;
        self.bytes_written += o.bytes_written;
        self.slow_consumer_closes += o.slow_consumer_closes;
        self.protocol_closes += o.protocol_closes;
        self.idle_closes += o.idle_closes;
        self.rate_limit_closes += o.rate_limit_closes;
        self.handshake_timeouts += o.handshake_timeouts;
        self.connections_refused += o.connections_refused;
        self.bus_messages_received += o.bus_messages_received;
        self.registry_drops += o.registry_drops;
        self.auth_successes += o.auth_successes;
        self.auth_failures += o.auth_failures;
        self.expiry_closes += o.expiry_closes;
        self.server_disconnects += o.server_disconnects;
        self.origin_refusals += o.origin_refusals;
        self.history_reads += o.history_reads;
        self.recoveries_complete += o.recoveries_complete;
        self.recoveries_reset += o.recoveries_reset;
        self.messages_recovered += o.messages_recovered;
        self.history_repaired += o.history_repaired;
        self.history_resets += o.history_resets;
        for (a, b) in self.errors.iter_mut().zip(o.errors.iter()) {
            *a += b;
        }
    }
}

/// Render per-shard snapshots (index = shard id) as Prometheus text exposition format.
pub fn render_prometheus(shards: &[ShardMetrics]) -> String {
    let mut total = ShardMetrics::default();
    for s in shards {
        total.add(s);
    }
    let mut out = String::with_capacity(4096);
    type Getter = fn(&ShardMetrics) -> u64;
    let series: [(&str, &str, &str, Getter); 26] = [
        (
            "ringhub_connections",
            "gauge",
            "Open WebSocket connections.",
            |m| m.connections_current,
        ),
        (
            "ringhub_connections_total",
            "counter",
            "WebSocket connections accepted.",
            |m| m.connections_total,
        ),
        (
            "ringhub_http_requests_total",
            "counter",
            "HTTP API requests served.",
            |m| m.http_requests,
        ),
        (
            "ringhub_messages_received_total",
            "counter",
            "Messages received from WebSocket clients.",
            |m| m.messages_received,
        ),
        (
            "ringhub_messages_published_total",
            "counter",
            "Publishes accepted (clients and POST /publish).",
            |m| m.messages_published,
        ),
        (
            "ringhub_messages_delivered_total",
            "counter",
            "Messages queued to subscribers.",
            |m| m.messages_delivered,
        ),
        (
            "ringhub_bytes_written_total",
            "counter",
            "Bytes written to sockets.",
            |m| m.bytes_written,
        ),
        (
            "ringhub_slow_consumer_closes_total",
            "counter",
            "Connections closed with 1013 for a full outbox.",
            |m| m.slow_consumer_closes,
        ),
        (
            "ringhub_protocol_closes_total",
            "counter",
            "Connections closed for protocol violations.",
            |m| m.protocol_closes,
        ),
        (
            "ringhub_idle_closes_total",
            "counter",
            "Connections closed by the idle timeout.",
            |m| m.idle_closes,
        ),
        (
            "ringhub_rate_limit_closes_total",
            "counter",
            "Connections closed with 1008 for persistent publish rate abuse.",
            |m| m.rate_limit_closes,
        ),
        (
            "ringhub_handshake_timeouts_total",
            "counter",
            "Connections dropped at the handshake timeout.",
            |m| m.handshake_timeouts,
        ),
        (
            "ringhub_connections_refused_total",
            "counter",
            "Upgrades refused at max connections.",
            |m| m.connections_refused,
        ),
        (
            "ringhub_bus_messages_received_total",
            "counter",
            "Messages received from Redis (Redis mode).",
            |m| m.bus_messages_received,
        ),
        (
            "ringhub_registry_drops_total",
            "counter",
            "Registry events dropped at a full queue (repaired by a full refresh).",
            |m| m.registry_drops,
        ),
        (
            "ringhub_auth_successes_total",
            "counter",
            "Connections authenticated with a token.",
            |m| m.auth_successes,
        ),
        (
            "ringhub_auth_failures_total",
            "counter",
            "Connection and channel tokens refused.",
            |m| m.auth_failures,
        ),
        (
            "ringhub_expiry_closes_total",
            "counter",
            "Connections closed with 4002 because their token expired without a refresh.",
            |m| m.expiry_closes,
        ),
        (
            "ringhub_server_disconnects_total",
            "counter",
            "Connections closed on a backend's request (POST /disconnect).",
            |m| m.server_disconnects,
        ),
        (
            "ringhub_origin_refusals_total",
            "counter",
            "Upgrades refused with 403 by allowed_origins.",
            |m| m.origin_refusals,
        ),
        (
            "ringhub_history_reads_total",
            "counter",
            "History reads (history subscribes, history commands, GET /history).",
            |m| m.history_reads,
        ),
        (
            "ringhub_recoveries_complete_total",
            "counter",
            "Subscribes with since answered recovered:true.",
            |m| m.recoveries_complete,
        ),
        (
            "ringhub_recoveries_reset_total",
            "counter",
            "Subscribes with since answered recovered:false.",
            |m| m.recoveries_reset,
        ),
        (
            "ringhub_messages_recovered_total",
            "counter",
            "Messages sent as recovery backlogs.",
            |m| m.messages_recovered,
        ),
        (
            "ringhub_history_repaired_total",
            "counter",
            "Messages fetched from the history to fill a gap in a shard's live stream.",
            |m| m.history_repaired,
        ),
        (
            "ringhub_history_resets_total",
            "counter",
            "Epoch changes on live history channels (reset sent).",
            |m| m.history_resets,
        ),
    ];
    for (name, kind, help, get) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {}", get(&total));
        for (i, s) in shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", get(s));
        }
    }
    let name = "ringhub_errors_total";
    let _ = writeln!(
        out,
        "# HELP {name} Error replies sent to clients, by code.\n# TYPE {name} counter"
    );
    for (i, code) in ERROR_CODES.iter().enumerate() {
        let _ = writeln!(
            out,
            "{name}{{code=\"{}\"}} {}",
            code.as_str(),
            total.errors[i]
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_shards_and_labels_them() {
        let mut a = ShardMetrics {
            messages_delivered: 5,
            ..Default::default()
        };
        a.count_error(ErrorCode::InvalidChannel);
        let b = ShardMetrics {
            messages_delivered: 7,
            ..Default::default()
        };
        let text = render_prometheus(&[a, b]);
        assert!(text.contains("\nringhub_messages_delivered_total 12\n"));
        assert!(text.contains("ringhub_messages_delivered_total{shard=\"1\"} 7\n"));
        assert!(text.contains("ringhub_errors_total{code=\"invalid_channel\"} 1\n"));
        assert!(text.contains("# TYPE ringhub_connections gauge"));
    }
}
