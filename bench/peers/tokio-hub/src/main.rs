//! tokio-hub: a benchmark peer written the way most Rust pub/sub hubs are: tokio's default
//! (multi-threaded) runtime, tokio-tungstenite for WebSocket, one `tokio::sync::broadcast`
//! channel per hub channel, and one task per connection that `select!`s between the socket and its
//! subscriptions and `send`s each message (one frame encode and one flush per delivery).
//! Speaks ringhub protocol v1 far enough for ringhub-load. Usage: `tokio-hub PORT`.

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamMap;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Messages a subscriber may lag behind before it is dropped as a slow consumer.
const CAPACITY: usize = 4096;

#[derive(Default)]
struct Hub {
    channels: Mutex<HashMap<String, broadcast::Sender<Utf8Bytes>>>,
    instance: String,
    next_id: AtomicU64,
}

#[derive(Deserialize)]
struct Cmd<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    channel: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
}

fn ack(kind: &str, channel: &str, id: Option<&RawValue>) -> Message {
    let ch = serde_json::to_string(channel).unwrap();
    Message::text(match id {
        Some(id) => format!(r#"{{"type":"{kind}","channel":{ch},"id":{}}}"#, id.get()),
        None => format!(r#"{{"type":"{kind}","channel":{ch}}}"#),
    })
}

#[tokio::main]
async fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("usage: tokio-hub PORT");
    let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    let hub = Arc::new(Hub {
        instance: format!("{:016x}", std::process::id() as u64 * 0x9e37_79b9_7f4a_7c15),
        ..Hub::default()
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(serve(hub.clone(), stream));
    }
}

async fn serve(hub: Arc<Hub>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let n = hub.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    let welcome = format!(
        r#"{{"type":"welcome","connection":"{0}-0-{n}","instance":"{0}"}}"#,
        hub.instance
    );
    if ws.send(Message::text(welcome)).await.is_err() {
        return;
    }
    let mut subs: StreamMap<String, BroadcastStream<Utf8Bytes>> = StreamMap::new();
    loop {
        tokio::select! {
            incoming = ws.next() => {
                let text = match incoming {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => continue,
                };
                let reply = handle(&hub, &mut subs, text.as_str());
                if let Some(reply) = reply {
                    if ws.send(reply).await.is_err() {
                        break;
                    }
                }
            }
            Some((_, item)) = subs.next(), if !subs.is_empty() => {
                match item {
                    Ok(text) => {
                        if ws.send(Message::Text(text)).await.is_err() {
                            break;
                        }
                    }
                    Err(_lagged) => {
                        let _ = ws
                            .close(Some(CloseFrame {
                                code: CloseCode::Again,
                                reason: "slow consumer".into(),
                            }))
                            .await;
                        break;
                    }
                }
            }
        }
    }
    drop(subs);
    // Forget channels nobody listens to any more.
    hub.channels
        .lock()
        .unwrap()
        .retain(|_, tx| tx.receiver_count() > 0);
}

fn handle(
    hub: &Hub,
    subs: &mut StreamMap<String, BroadcastStream<Utf8Bytes>>,
    text: &str,
) -> Option<Message> {
    let Ok(cmd) = serde_json::from_str::<Cmd>(text) else {
        return Some(Message::text(
            r#"{"type":"error","code":"bad_request","message":"not a command"}"#,
        ));
    };
    let channel = cmd.channel.unwrap_or_default();
    match cmd.kind {
        "publish" => {
            let data = cmd.data.map_or("null", |d| d.get());
            let frame = format!(
                r#"{{"type":"message","channel":{},"data":{data}}}"#,
                serde_json::to_string(&channel).unwrap()
            );
            if let Some(tx) = hub.channels.lock().unwrap().get(&channel) {
                let _ = tx.send(Utf8Bytes::from(frame));
            }
            cmd.id.map(|id| ack("published", &channel, Some(id)))
        }
        "subscribe" => {
            if !subs.contains_key(&channel) {
                let rx = hub
                    .channels
                    .lock()
                    .unwrap()
                    .entry(channel.clone())
                    .or_insert_with(|| broadcast::channel(CAPACITY).0)
                    .subscribe();
                subs.insert(channel.clone(), BroadcastStream::new(rx));
            }
            Some(ack("subscribed", &channel, cmd.id))
        }
        "unsubscribe" => {
            subs.remove(&channel);
            Some(ack("unsubscribed", &channel, cmd.id))
        }
        "ping" => Some(Message::text(match cmd.id {
            Some(id) => format!(r#"{{"type":"pong","id":{}}}"#, id.get()),
            None => r#"{"type":"pong"}"#.to_owned(),
        })),
        _ => Some(Message::text(
            r#"{"type":"error","code":"bad_request","message":"unknown type"}"#,
        )),
    }
}
