// A Hybrid Connections listener made with Microsoft's hyco-ws, speaking azbridge's
// preamble: it accepts the port names in NAMES (answering [1, 0, mode]), closes without a
// word on any other name (azbridge's answer), and echoes every byte it receives.
// Driven by tests/bridge_interop.rs; prints one JSON line per event.
//
// Environment: RELAY (host:port of the relay), ENTITY (hybrid connection), KEY_NAME, KEY,
// NAMES (comma-separated port names), and NODE_EXTRA_CA_CERTS (the relay's test CA).
'use strict';

const WebSocket = require('hyco-ws');

const { RELAY, ENTITY, KEY_NAME, KEY } = process.env;
const NAMES = (process.env.NAMES || '').split(',').filter((n) => n.length > 0);
const report = (event) => console.log(JSON.stringify(event));

const uri = `wss://${RELAY}/$hc/${ENTITY}?sb-hc-action=listen&sb-hc-id=hyco-ws-listener`;
const server = WebSocket.createRelayedServer(
  {
    server: uri,
    // A function: hyco-ws calls it again for its hourly renewToken.
    token: () => WebSocket.createRelayToken(uri, KEY_NAME, KEY),
  },
  (socket) => {
    let head = Buffer.alloc(0);
    let accepted = false;
    let received = 0;
    socket.on('message', (data) => {
      const bytes = Buffer.isBuffer(data) ? data : Buffer.from(data);
      if (accepted) {
        received += bytes.length;
        socket.send(bytes, { binary: true });
        return;
      }
      head = Buffer.concat([head, bytes]);
      if (head.length < 4 || head.length < 4 + head[3]) {
        return;
      }
      if (head[0] !== 1 || head[1] !== 0 || head[2] > 1) {
        socket.send(Buffer.from([0, 0, 0]), { binary: true });
        socket.close();
        return;
      }
      const name = head.slice(4, 4 + head[3]).toString('utf8');
      if (!NAMES.includes(name)) {
        report({ event: 'unknown-name', name });
        socket.close();
        return;
      }
      accepted = true;
      report({ event: 'accepted', name, mode: head[2] });
      socket.send(Buffer.from([1, 0, head[2]]), { binary: true });
      const rest = head.slice(4 + head[3]);
      if (rest.length > 0) {
        received += rest.length;
        socket.send(rest, { binary: true });
      }
    });
    socket.on('close', () => report({ event: 'closed', received }));
    socket.on('error', (error) => report({ event: 'socket-error', message: String(error) }));
  },
);
server.on('listening', () => report({ event: 'listening' }));
server.on('error', (error) => report({ event: 'error', message: String((error && error.message) || error) }));
