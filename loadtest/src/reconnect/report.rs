//! The `reconnect` report: setup, reconnects and recoveries, deliveries owed and received,
//! offsets, recovery time (the main histogram, what `--hgrm` writes), CPU.

use super::{Agg, Plan, DATA_OVERHEAD};
use crate::cli::{DropMode, ReconnectArgs};
use crate::report::{Cpu, Deliveries, Report};
use crate::Prepared;
use hdrhistogram::Histogram;
use serde_json::json;

/// p50 and max of a list of counts.
fn p50_max(v: &[u64]) -> (u64, u64) {
    let mut s = v.to_vec();
    s.sort_unstable();
    match s.len() {
        0 => (0, 0),
        n => (s[(n - 1) / 2], s[n - 1]),
    }
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        100.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// A histogram (ns) as JSON µs.
fn hist_json(h: &Histogram<u64>) -> serde_json::Value {
    let q = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "max": h.max() as f64 / 1000.0,
        "samples": h.len(),
    })
}

/// What a recovery time is, for the report.
const RECOVERY_WHAT: &str = "recovery time: subscribe with since written → the message at the \
                             reply's top read (empty backlog: → the reply read), recovered:true \
                             only";

pub(super) fn report(
    plan: &Plan,
    agg: &Agg,
    a: &ReconnectArgs,
    prep: &Prepared,
    cpu: Cpu,
    setup_s: f64,
    drain_s: f64,
) -> Report {
    let c = &agg.counts;
    let mut r = Report::new("reconnect", prep);
    let n = plan.subscribers;
    r.setup(
        "subscribers",
        format!(
            "{n} on {} channel(s) {}0…, each dropped and resubscribed with `since`",
            plan.channels, plan.prefix
        ),
    );
    let http = (0..plan.publishers)
        .filter(|&p| plan.pub_target(p).http)
        .count();
    let how = match http {
        0 => "over WebSocket, each publish with an id (acknowledged by `published`)".to_string(),
        h if h == plan.publishers => "with POST /publish (acknowledged by 200)".into(),
        h => format!("{h} with POST /publish, the others over WebSocket"),
    };
    r.setup("publishers", format!("{} {how}", plan.publishers));
    r.setup(
        "load",
        format!(
            "{} msg/s total on a fixed schedule, {} B of data per message",
            a.rate,
            a.payload_size.max(DATA_OVERHEAD)
        ),
    );
    let every = a.drop_every.as_secs_f64();
    let drops = match plan.wave {
        None => format!("each subscriber once every {every} s, staggered"),
        Some(m) => format!("{m} subscriber(s) at once every {every} s, in turn"),
    };
    let mode = match plan.drop_mode {
        DropMode::Close => "close: WebSocket close, read on until the hub's close",
        DropMode::Abort => "abort: TCP reset, no close frame",
    };
    let back = if plan.sticky || plan.sub_targets.len() == 1 {
        "to the same instance"
    } else {
        "to the next instance"
    };
    r.setup(
        "drops",
        format!(
            "{drops} after the warmup ({mode}); back after {} ms, {back}",
            a.down_time.as_millis()
        ),
    );
    r.param("subscribers", json!(n));
    r.param("channels", json!(plan.channels));
    r.param("channel_prefix", json!(a.channel_prefix));
    r.param("publishers", json!(plan.publishers));
    r.param("publishers_http", json!(http));
    r.param("rate", json!(a.rate));
    r.param("payload_size", json!(a.payload_size.max(DATA_OVERHEAD)));
    r.param("drop_every_s", json!(every));
    r.param("drop_fraction", json!(a.drop_fraction));
    r.param("drop_mode", json!(plan.drop_mode.as_str()));
    r.param("down_time_ms", json!(a.down_time.as_secs_f64() * 1000.0));
    r.param("sticky", json!(plan.sticky));
    r.common_setup(prep, plan.tokens.as_deref());

    let sent: u64 = c.sent.iter().sum();
    let acked: u64 = c.acked.iter().sum();
    let unanswered = c.unanswered.max(0) as u64;
    let expected = c.expected();
    let delivered = c.delivered();
    let d = Deliveries {
        publishes_scheduled: Some(c.scheduled),
        publishes_sent: sent,
        publishes_unsent: c.unsent,
        subscriptions: c.subs.iter().sum(),
        expected,
        received: c.seq.received,
        delivered,
        lost: expected.saturating_sub(delivered),
        extra: delivered.saturating_sub(expected),
        duplicates: c.seq.duplicates,
        reordered: c.seq.reordered,
        unexpected: c.unexpected,
        deliveries_in_window: c.window_deliveries,
        deliveries_per_s: c.window_deliveries as f64 / (plan.measure_ns as f64 / 1e9),
    };
    let authed = if plan.tokens.is_some() {
        ", each authenticated"
    } else {
        ""
    };
    r.line(
        "setup",
        format!("{} connections in {setup_s:.2} s{authed}", c.setup_ok),
    );
    if plan.tokens.is_some() {
        r.set_auth(c.setup_ok - c.anonymous, c.anonymous);
    }
    r.line(
        "publishes",
        format!(
            "{sent} written of {} scheduled: {acked} acknowledged, {} refused, {unanswered} \
             unanswered",
            c.scheduled, c.refused
        ),
    );
    r.line(
        "drops",
        format!(
            "{} ({}), {} skipped (the subscriber was still away)",
            c.drops,
            plan.drop_mode.as_str(),
            c.drops_skipped
        ),
    );
    r.line(
        "reconnects",
        format!(
            "{} subscribes with since; {} failed attempt(s) (retried); {} connection(s) \
             ended by the hub or an error (reconnected too)",
            c.reconnects, c.failed_attempts, c.lost_conns
        ),
    );
    let recovered_pct = pct(c.recovered, c.replies);
    r.line(
        "recovered",
        format!(
            "{} of {} replies ({recovered_pct:.3}%); {} not recoverable (recovered:false); {} \
             cut short before the backlog was complete",
            c.recovered, c.replies, c.not_recoverable, c.incomplete
        ),
    );
    let backlog_total: u64 = c.backlog.iter().sum();
    let (b50, bmax) = p50_max(&c.backlog);
    r.line(
        "msgs recovered",
        format!(
            "{backlog_total} in backlogs ({} received), per reconnect p50 {b50} max {bmax}",
            c.backlog_received
        ),
    );
    r.lag(
        "reply µs",
        "reply_time_us",
        &agg.reply,
        "subscribe with since → reply, every reconnect",
    );
    r.line(
        "expected",
        format!(
            "{expected} (acknowledged publishes × subscribers of their channel, less {} not \
             recoverable)",
            c.window_msgs.saturating_sub(c.excluded_window_msgs)
        ),
    );
    r.line(
        "delivered",
        format!(
            "{delivered} ({:.3}%), live or recovered",
            pct(delivered, expected)
        ),
    );
    r.line(
        "lost",
        format!(
            "{} (waited {drain_s:.1} s after the run for stragglers)",
            d.lost
        ),
    );
    r.line(
        "duplicates",
        format!(
            "{} (a message received twice by one subscriber, across reconnects)",
            d.duplicates
        ),
    );
    r.line("reordered", d.reordered.to_string());
    r.line(
        "not recoverable",
        format!(
            "{} message(s) in {} recovered:false window(s) (top − since; not counted as lost)",
            c.window_msgs, c.not_recoverable
        ),
    );
    if d.extra > 0 || d.unexpected > 0 {
        r.line(
            "unexpected",
            format!(
                "{} unexpected message(s), {} more distinct deliveries than expected",
                d.unexpected, d.extra
            ),
        );
    }
    if c.unaccounted > 0 {
        r.warn(format!(
            "{} subscriber(s) left out of the loss accounting: a reply whose missed messages \
             cannot be counted (epoch changed, since ahead of the channel, or no `recovered`)",
            c.unaccounted
        ));
    }
    r.set_offsets(&c.offsets);
    r.lag(
        "send lag µs",
        "send_lag_us",
        &agg.send_lag,
        "writes behind schedule",
    );
    if d.lost > 0 {
        r.warn(format!(
            "{} of {expected} expected deliveries did not arrive ({:.3}%)",
            d.lost,
            pct(d.lost, expected)
        ));
    }
    if d.duplicates > 0 || d.reordered > 0 {
        r.warn(format!(
            "{} duplicate(s) and {} reordered message(s)",
            d.duplicates, d.reordered
        ));
    }
    if c.not_recoverable > 0 {
        r.warn(format!(
            "{} of {} reconnects were not recoverable (recovered:false): the backlog was \
             longer than the hub's max_recovery or its history_size, or expired",
            c.not_recoverable, c.replies
        ));
    }
    if c.drops == 0 {
        r.warn(
            "no subscriber was dropped: drops start after --warmup and are made only when the \
             reconnect (--down-time later) falls within --duration; lengthen --duration or \
             shorten --drop-every",
        );
    }
    if c.errors.count("publish refused: rate_limited") > 0 {
        r.warn(
            "the hub rate-limited the publishers: start it with --max-publish-rate 0, or \
             spread --rate over more --publishers (or publish with an http:// --publish-url)",
        );
    }
    if unanswered > 0 || c.refused > 0 {
        r.warn(format!(
            "{} publish(es) refused and {unanswered} never answered: not expected at the \
             subscribers",
            c.refused
        ));
    }
    if c.errors.count("hub error permission_denied")
        + c.errors.count("publish refused: permission_denied")
        > 0
    {
        r.warn(
            "the hub answered permission_denied: with [auth], clients may publish only where \
             the namespace allows it (`publish = \"authenticated\"`), or publish with an \
             http:// --publish-url",
        );
    }
    r.json_extra(
        "reconnect",
        json!({
            "drops": c.drops,
            "drops_skipped": c.drops_skipped,
            "reconnects": c.reconnects,
            "failed_attempts": c.failed_attempts,
            "connections_lost": c.lost_conns,
            "replies": c.replies,
            "recovered": c.recovered,
            "recovered_pct": recovered_pct,
            "not_recoverable": c.not_recoverable,
            "not_recoverable_messages": c.window_msgs,
            "incomplete": c.incomplete,
            "unaccounted_subscribers": c.unaccounted,
            "messages_recovered": {
                "total": backlog_total,
                "received": c.backlog_received,
                "p50": b50,
                "max": bmax,
            },
            "recovery_time_us": hist_json(&agg.recovery),
            "reply_time_us": hist_json(&agg.reply),
            "publishes_acknowledged": acked,
            "publishes_refused": c.refused,
            "publishes_unanswered": unanswered,
        }),
    );
    r.set_latency(agg.recovery.clone(), RECOVERY_WHAT);
    r.set_latency_label("recovery µs");
    r.set_errors(&c.errors, &c.closes, prep.fd_limit, c.setup_ok);
    r.set_deliveries(d);
    r.set_cpu(cpu);
    r
}
