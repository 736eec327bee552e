// v1.js: the few replies of ringhub's client protocol v1 that the Node benchmark peers send
// (uws/server.js, node-ws-redis/server.js), written once.
'use strict';

const hasId = (id) => id !== undefined && id !== null;

exports.welcome = (instance, n) =>
  `{"type":"welcome","connection":"${instance}-0-${n}","instance":"${instance}"}`;

exports.ack = (type, channel, id) => {
  const ch = JSON.stringify(channel);
  return hasId(id)
    ? `{"type":"${type}","channel":${ch},"id":${JSON.stringify(id)}}`
    : `{"type":"${type}","channel":${ch}}`;
};

exports.pong = (id) => (hasId(id) ? `{"type":"pong","id":${JSON.stringify(id)}}` : '{"type":"pong"}');

exports.error = (code, message) => JSON.stringify({ type: 'error', code, message });

exports.message = (channel, dataJson) =>
  `{"type":"message","channel":${JSON.stringify(channel)},"data":${dataJson}}`;

exports.hasId = hasId;
