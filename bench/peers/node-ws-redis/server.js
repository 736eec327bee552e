// node-ws-redis/server.js: benchmark peer, "the hub people write by hand": Node's `ws` server
// plus `ioredis` in Redis mode (one subscriber connection, one publisher connection). A channel's
// Redis subscription (ws:chan:<name>) is made lazily when its first local client subscribes and
// dropped when the last leaves; the `subscribed` ack waits for Redis' confirmation, so a publish
// after the ack is delivered. Speaks ringhub protocol v1 far enough for ringhub-load.
// Usage: node node-ws-redis/server.js PORT REDIS_PORT
'use strict';
const http = require('http');
const crypto = require('crypto');
const { welcome, ack, pong, error, message, hasId } = require('../v1');
const { WebSocketServer } = require('ws');
const Redis = require('ioredis');

const port = Number(process.argv[2] || 9002);
const redisPort = Number(process.argv[3] || 6380);
const PREFIX = 'ws:chan:';
const MAX_BUFFERED = 1024 * 1024;
const instance = crypto.randomBytes(8).toString('hex');
let nextId = 0;

const pub = new Redis({ host: '127.0.0.1', port: redisPort });
const sub = new Redis({ host: '127.0.0.1', port: redisPort });
// channel name -> { clients: Set<WebSocket>, ready: Promise }
const channels = new Map();

sub.on('messageBuffer', (rch, payload) => {
  const name = rch.toString().slice(PREFIX.length);
  const entry = channels.get(name);
  if (!entry) return;
  // One frame text per message (Buffer), handed to each client's socket.
  const frame = Buffer.from(message(name, payload.toString()));
  for (const ws of entry.clients) {
    if (ws.bufferedAmount > MAX_BUFFERED) {
      ws.close(1013, 'slow consumer');
      continue;
    }
    ws.send(frame, { binary: false });
  }
});



function join(ws, name) {
  let entry = channels.get(name);
  if (!entry) {
    entry = { clients: new Set(), ready: sub.subscribe(PREFIX + name) };
    channels.set(name, entry);
  }
  entry.clients.add(ws);
  ws.channels.add(name);
  return entry.ready;
}

function leave(ws, name) {
  ws.channels.delete(name);
  const entry = channels.get(name);
  if (!entry) return;
  entry.clients.delete(ws);
  if (entry.clients.size === 0) {
    channels.delete(name);
    sub.unsubscribe(PREFIX + name).catch(() => {});
  }
}

const server = http.createServer((req, res) => {
  res.writeHead(404);
  res.end();
});
const wss = new WebSocketServer({ server, path: '/ws', perMessageDeflate: false, maxPayload: 64 * 1024 });
wss.on('connection', (ws) => {
  nextId += 1;
  ws.channels = new Set();
  ws.send(welcome(instance, nextId));
  ws.on('message', (data, isBinary) => {
    if (isBinary) return ws.close(1003, 'binary frames are not supported');
    let cmd;
    try {
      cmd = JSON.parse(data.toString());
    } catch (e) {
      return ws.send(error('bad_request', 'not JSON'));
    }
    const channel = cmd.channel;
    if (cmd.type !== 'ping' && typeof channel !== 'string') return ws.send(error('bad_request', 'channel'));
    switch (cmd.type) {
      case 'publish':
        pub.publish(PREFIX + channel, JSON.stringify(cmd.data === undefined ? null : cmd.data)).catch(() => {});
        if (hasId(cmd.id)) ws.send(ack('published', channel, cmd.id));
        break;
      case 'subscribe':
        join(ws, channel).then(
          () => ws.send(ack('subscribed', channel, cmd.id)),
          () => ws.send(error('unavailable', 'redis subscribe failed')),
        );
        break;
      case 'unsubscribe':
        leave(ws, channel);
        ws.send(ack('unsubscribed', channel, cmd.id));
        break;
      case 'ping':
        ws.send(pong(cmd.id));
        break;
      default:
        ws.send(error('bad_request', 'unknown type'));
    }
  });
  ws.on('close', () => {
    for (const name of [...ws.channels]) leave(ws, name);
  });
  ws.on('error', () => {});
});
server.listen(port, '127.0.0.1');
