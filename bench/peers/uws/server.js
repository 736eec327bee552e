// uws/server.js: benchmark peer, the speed reference: uWebSockets.js (npm
// @trufflesuite/uws-js-unofficial) topic pub/sub, single-threaded, speaking ringhub protocol v1
// far enough for ringhub-load. Messages go out through uWS topics (ws.subscribe(channel),
// app.publish(channel, frame)), so uWS builds each frame once and batches per socket.
// Usage: node uws/server.js PORT
'use strict';
const uWS = require('@trufflesuite/uws-js-unofficial');
const crypto = require('crypto');
const { welcome, ack, pong, error, message, hasId } = require('../v1');

const port = Number(process.argv[2] || 9001);
const instance = crypto.randomBytes(8).toString('hex');
let nextId = 0;



const app = uWS.App();
app.ws('/ws', {
  compression: uWS.DISABLED,
  maxPayloadLength: 64 * 1024,
  // Like ringhub's --max-queued-bytes: a subscriber more than 1 MiB behind is closed.
  maxBackpressure: 1024 * 1024,
  closeOnBackpressureLimit: true,
  idleTimeout: 60,
  sendPingsAutomatically: true,
  open: (ws) => {
    nextId += 1;
    ws.send(welcome(instance, nextId), false);
  },
  message: (ws, msg, isBinary) => {
    if (isBinary) {
      ws.end(1003, 'binary frames are not supported');
      return;
    }
    let cmd;
    try {
      cmd = JSON.parse(Buffer.from(msg).toString('utf8'));
    } catch (e) {
      ws.send(error('bad_request', 'not JSON'), false);
      return;
    }
    const channel = cmd.channel;
    switch (cmd.type) {
      case 'publish':
        if (typeof channel !== 'string') return ws.send(error('bad_request', 'channel'), false);
        app.publish(channel, message(channel, JSON.stringify(cmd.data === undefined ? null : cmd.data)), false);
        if (hasId(cmd.id)) ws.send(ack('published', channel, cmd.id), false);
        break;
      case 'subscribe':
        if (typeof channel !== 'string') return ws.send(error('bad_request', 'channel'), false);
        ws.subscribe(channel);
        ws.send(ack('subscribed', channel, cmd.id), false);
        break;
      case 'unsubscribe':
        if (typeof channel !== 'string') return ws.send(error('bad_request', 'channel'), false);
        ws.unsubscribe(channel);
        ws.send(ack('unsubscribed', channel, cmd.id), false);
        break;
      case 'ping':
        ws.send(pong(cmd.id), false);
        break;
      default:
        ws.send(error('bad_request', 'unknown type'), false);
    }
  },
}).listen('127.0.0.1', port, (token) => {
  if (!token) {
    console.error(`uws peer: cannot listen on 127.0.0.1:${port}`);
    process.exit(1);
  }
});
