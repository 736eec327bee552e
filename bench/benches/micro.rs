//! Micro benchmarks of ringhub's hot-path building blocks, with no I/O (criterion).
//!
//! - `resp`: parsing Redis pub/sub pushes as a shard's subscriber link receives them
//!   (`resp::parse`, the incremental `resp::Parser` over a pipelined read, `resp::as_pubsub`).
//! - `codec`: server frame encoding (the fan-out frame: header + message JSON, built once per
//!   shard) and client frame decoding (unmask + UTF-8 check), small and 64 KiB.
//! - `topics`: `TopicRegistry` subscribe/unsubscribe, with and without first/last transitions.
//! - `fanout_enqueue`: one frame to 1,000 and 100,000 outboxes, through the real
//!   `Shard::deliver_local` (no socket is touched until the flusher runs, which these benches never
//!   start), beside a stand-alone model of the same outbox (`VecDeque<Bytes>` per connection with
//!   a byte budget and a dirty list) that also pays the dirty-list push every round.
//!
//! Run quickly: `cargo bench -p ringhub-bench -- --warm-up-time 1 --measurement-time 2`.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use ringhub::broker::MemoryBroker;
use ringhub::codec::{self, Control, Data, OpCode};
use ringhub::config::Config;
use ringhub::inbox::Inbox;
use ringhub::protocol;
use ringhub::resp;
use ringhub::shard::{Phase, Shard, Shared, FRAME_OVERHEAD};
use ringhub::topics::TopicRegistry;
use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A message payload like ringhub-load's 64-byte data.
const DATA: &[u8] = br#"{"p":0,"s":123456,"t":987654321012345,"x":"xxxxxxxxxxxxxxxxxxxxxxx"}"#;

/// One RESP pub/sub push, `["message", "ws:chan:<channel>", data]`, RESP2 array or RESP3 push.
fn resp_push(resp3: bool, channel: &str, data: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.extend_from_slice(if resp3 { b">3\r\n" } else { b"*3\r\n" });
    b.extend_from_slice(b"$7\r\nmessage\r\n");
    let ch = format!("ws:chan:{channel}");
    b.extend_from_slice(format!("${}\r\n{ch}\r\n", ch.len()).as_bytes());
    b.extend_from_slice(format!("${}\r\n", data.len()).as_bytes());
    b.extend_from_slice(data);
    b.extend_from_slice(b"\r\n");
    b
}

fn bench_resp(c: &mut Criterion) {
    let limits = resp::Limits::default();
    let mut g = c.benchmark_group("resp");
    for (name, resp3) in [("resp2", false), ("resp3", true)] {
        let one = resp_push(resp3, "news", DATA);
        g.throughput(Throughput::Bytes(one.len() as u64));
        g.bench_function(BenchmarkId::new("parse_push", name), |b| {
            b.iter_batched_ref(
                || one.clone(),
                |buf| {
                    let f = resp::parse(buf, &limits).unwrap().unwrap();
                    black_box(resp::as_pubsub(&f))
                },
                BatchSize::SmallInput,
            )
        });
    }
    // A read that carried 64 pushes, parsed one after another by the stateful parser.
    let mut burst = BytesMut::new();
    for _ in 0..64 {
        burst.extend_from_slice(&resp_push(false, "news", DATA));
    }
    g.throughput(Throughput::Elements(64));
    g.bench_function("parser_64_pushes", |b| {
        let mut parser = resp::Parser::new();
        b.iter_batched_ref(
            || burst.clone(),
            |buf| {
                while let Some(f) = parser.parse(buf, &limits).unwrap() {
                    black_box(resp::as_pubsub(&f));
                }
            },
            BatchSize::SmallInput,
        )
    });
    // A push whose payload arrives in 16 reads of 4 KiB (the incremental path).
    let big_data = format!("\"{}\"", "y".repeat(64 * 1024 - 2)).into_bytes();
    let big = resp_push(false, "news", &big_data);
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.bench_function("parser_64KiB_push_in_4KiB_reads", |b| {
        let mut parser = resp::Parser::new();
        b.iter(|| {
            let mut buf = BytesMut::with_capacity(big.len());
            let mut got = None;
            for chunk in big.chunks(4096) {
                buf.extend_from_slice(chunk);
                if let Some(f) = parser.parse(&mut buf, &limits).unwrap() {
                    got = Some(f);
                }
            }
            black_box(got.unwrap())
        })
    });
    g.finish();
}

fn bench_codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    let big_data = format!("\"{}\"", "y".repeat(64 * 1024 - 200)).into_bytes();
    for (name, data) in [("small", DATA), ("64KiB", big_data.as_slice())] {
        // The fan-out frame as `Shard::deliver_local` builds it: header + message JSON, once.
        let json_len = protocol::message_json_len("news", data);
        g.throughput(Throughput::Bytes(json_len as u64));
        g.bench_function(BenchmarkId::new("encode_message_frame", name), |b| {
            b.iter(|| {
                let mut buf = BytesMut::with_capacity(codec::frame_header_len(json_len) + json_len);
                codec::write_frame_header(&mut buf, OpCode::Data(Data::Text), json_len);
                protocol::write_message_json(&mut buf, "news", black_box(data));
                black_box(buf.freeze())
            })
        });
        // A client's publish frame: masked, unmasked in place and UTF-8 checked by the decoder.
        let cmd = format!(
            r#"{{"type":"publish","channel":"news","data":{}}}"#,
            std::str::from_utf8(data).unwrap()
        );
        let mut wire = Vec::new();
        codec::encode_masked(
            OpCode::Data(Data::Text),
            true,
            cmd.as_bytes(),
            [0x11, 0x22, 0x33, 0x44],
            &mut wire,
        );
        let wire = BytesMut::from(&wire[..]);
        let limits = codec::Limits {
            max_frame_size: 1 << 20,
            max_message_size: 1 << 20,
        };
        g.throughput(Throughput::Bytes(cmd.len() as u64));
        g.bench_function(BenchmarkId::new("decode_client_frame", name), |b| {
            let mut dec = codec::Decoder::new();
            b.iter_batched_ref(
                || wire.clone(),
                |buf| black_box(dec.decode(buf, &limits).unwrap().unwrap()),
                BatchSize::SmallInput,
            )
        });
    }
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_ping", |b| {
        b.iter(|| black_box(codec::encode_frame(OpCode::Control(Control::Ping), b"")))
    });
    g.finish();
}

fn bench_topics(c: &mut Criterion) {
    let mut g = c.benchmark_group("topics");
    g.throughput(Throughput::Elements(1));
    // First subscriber joins, last one leaves: creates and drops the topic every time.
    g.bench_function("subscribe_unsubscribe_alone", |b| {
        let mut reg = TopicRegistry::new();
        b.iter(|| {
            black_box(reg.subscribe(7, black_box("news")));
            black_box(reg.unsubscribe(7, black_box("news")));
        })
    });
    // Join and leave a channel that 1,000 others hold (no transition).
    g.bench_function("subscribe_unsubscribe_among_1000", |b| {
        let mut reg = TopicRegistry::new();
        for k in 0..1000 {
            reg.subscribe(k, "news");
        }
        b.iter(|| {
            black_box(reg.subscribe(5000, black_box("news")));
            black_box(reg.unsubscribe(5000, black_box("news")));
        })
    });
    // A connection with 10 subscriptions goes away.
    let names: Vec<String> = (0..10).map(|i| format!("room-{i}")).collect();
    g.throughput(Throughput::Elements(10));
    g.bench_function("subscribe_10_then_remove_conn", |b| {
        let mut reg = TopicRegistry::new();
        for k in 0..100 {
            for n in &names {
                reg.subscribe(k, n);
            }
        }
        b.iter(|| {
            for n in &names {
                reg.subscribe(1000, n);
            }
            reg.remove_conn(1000, |ch| {
                black_box(ch);
            });
        })
    });
    g.finish();
}

/// A shard with `n` open connections subscribed to "news", no runtime and no sockets: fan-out only
/// queues frames, and nothing here ever flushes.
fn shard_with_subscribers(n: usize) -> Shard {
    let inbox = Inbox::new();
    let peers: Arc<[Arc<Inbox>]> = Arc::from(vec![inbox.clone()]);
    let shared = Arc::new(Shared {
        connections: AtomicUsize::new(0),
        max_connections: usize::MAX,
        readiness: ringhub::redis::Readiness::new(1, true),
        registry: None,
        addr: "127.0.0.1:0".parse().unwrap(),
        started_at: 0,
        verifier: None,
    });
    let cfg = Config {
        shards: 1,
        ..Config::default()
    };
    let mut shard = Shard::new(
        0,
        Arc::new(cfg),
        Arc::from("bench"),
        shared,
        inbox,
        peers.clone(),
        Box::new(MemoryBroker::new(0, peers)),
    );
    for _ in 0..n {
        // -1: no socket; the flusher (which would write to it) is never run here.
        let key = shard.insert_conn(-1);
        // What `Shard::mark_open` does to the entry (without the registry bookkeeping).
        shard.conns[key].phase = Phase::Open;
        shard.topics.subscribe(key, "news");
    }
    shard
}

/// Empty every outbox, as a flush that drained them would (capacity kept, so steady state).
fn drain_outboxes(shard: &mut Shard) {
    for (_, c) in shard.conns.iter_mut() {
        debug_assert_eq!(c.phase, Phase::Open);
        c.outbox.clear();
        c.queued = 0;
    }
}

/// The outbox model: what `Shard::enqueue` does per subscriber, including the dirty list.
struct ModelConn {
    outbox: VecDeque<Bytes>,
    queued: usize,
    dirty: bool,
}

fn bench_fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout_enqueue");
    for n in [1_000usize, 100_000] {
        g.throughput(Throughput::Elements(n as u64));
        // The real code path: build the frame once, clone it into each subscriber's outbox.
        let mut shard = shard_with_subscribers(n);
        g.bench_function(BenchmarkId::new("shard_deliver_local", n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    shard.deliver_local(black_box("news"), black_box(DATA));
                    total += t.elapsed();
                    drain_outboxes(&mut shard);
                }
                total
            })
        });
        drop(shard);

        // The model, paying the dirty-list push for every subscriber every round.
        let frame = codec::encode_frame(OpCode::Data(Data::Text), DATA);
        let limit = 1usize << 20;
        let mut conns: Vec<ModelConn> = (0..n)
            .map(|_| ModelConn {
                outbox: VecDeque::new(),
                queued: 0,
                dirty: false,
            })
            .collect();
        let subscribers: Vec<usize> = (0..n).collect();
        let mut dirty: Vec<usize> = Vec::with_capacity(n);
        g.bench_function(BenchmarkId::new("model_outbox", n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let f = black_box(&frame);
                    for &key in &subscribers {
                        let c = &mut conns[key];
                        let cost = f.len() + FRAME_OVERHEAD;
                        if c.queued + cost > limit {
                            continue;
                        }
                        c.queued += cost;
                        c.outbox.push_back(f.clone());
                        if !c.dirty {
                            c.dirty = true;
                            dirty.push(key);
                        }
                    }
                    total += t.elapsed();
                    for key in dirty.drain(..) {
                        let c = &mut conns[key];
                        c.outbox.clear();
                        c.queued = 0;
                        c.dirty = false;
                    }
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_resp, bench_codec, bench_topics, bench_fanout);
criterion_main!(benches);
