// A Hybrid Connections sender made with Microsoft's hyco-ws, speaking azbridge's preamble,
// against whatever listens on the relay (kips bridge -T in tests/bridge_interop.rs). Runs
// the cases named in CASES one after the other and prints one JSON line per case; exits 0
// when every case passed.
//
// Environment: RELAY (host:port), ENTITY, KEY_NAME, KEY, CASES (comma-separated), and
// NODE_EXTRA_CA_CERTS (the relay's test CA).
//
// Cases:
//   stream:<name>:<bytes>     preamble for <name> in stream mode, expect [1,0,0], then
//                             <bytes> bytes that must come back unchanged (an echo target)
//   datagram:<name>:<count>   preamble in datagram mode, expect [1,0,1], then <count>
//                             length-prefixed datagrams that must come back (a UDP echo)
//   unknown:<name>            expect the connection to close with no byte of answer
//   mismatch:<name>           datagram mode for a TCP port: expect [0,0,255]
//   nolistener                expect the relay to refuse the upgrade with 404
'use strict';

const crypto = require('crypto');
const WebSocket = require('hyco-ws');

const { RELAY, ENTITY, KEY_NAME, KEY } = process.env;
const CASES = (process.env.CASES || '').split(',').filter((c) => c.length > 0);

function preamble(mode, name) {
  const bytes = Buffer.from(name, 'utf8');
  return Buffer.concat([Buffer.from([1, 0, mode, bytes.length]), bytes]);
}

function frame(payload) {
  const length = Buffer.alloc(2);
  length.writeUInt16BE(payload.length, 0);
  return Buffer.concat([length, payload]);
}

// Opens a sender connection; resolves with { socket, next(n), closed } where next(n)
// resolves with the next n bytes, or null if the connection closes first.
function open(entity) {
  const uri = `wss://${RELAY}/$hc/${entity}?sb-hc-action=connect&sb-hc-id=hyco-ws-sender`;
  const token = WebSocket.createRelayToken(uri, KEY_NAME, KEY);
  return new Promise((resolve, reject) => {
    const socket = WebSocket.relayedConnect(uri, token);
    let buffered = Buffer.alloc(0);
    let waiting = null;
    let closed = false;
    const settle = () => {
      if (waiting && buffered.length >= waiting.n) {
        const bytes = buffered.slice(0, waiting.n);
        buffered = buffered.slice(waiting.n);
        const done = waiting.resolve;
        waiting = null;
        done(bytes);
      } else if (waiting && closed) {
        const done = waiting.resolve;
        waiting = null;
        done(null);
      }
    };
    socket.on('open', () =>
      resolve({
        socket,
        next: (n) =>
          new Promise((done) => {
            waiting = { n, resolve: done };
            settle();
          }),
        buffered: () => buffered.length,
      }),
    );
    socket.on('message', (data) => {
      buffered = Buffer.concat([buffered, Buffer.isBuffer(data) ? data : Buffer.from(data)]);
      settle();
    });
    socket.on('close', () => {
      closed = true;
      settle();
    });
    socket.on('error', (error) => {
      closed = true;
      settle();
      reject(error);
    });
  });
}

const runners = {
  async stream(name, size) {
    const connection = await open(ENTITY);
    connection.socket.send(preamble(0, name), { binary: true });
    const reply = await connection.next(3);
    if (!reply || !reply.equals(Buffer.from([1, 0, 0]))) {
      throw new Error(`preamble answer ${reply && reply.toString('hex')}`);
    }
    const payload = crypto.randomBytes(Number(size));
    for (let offset = 0; offset < payload.length; offset += 16384) {
      connection.socket.send(payload.slice(offset, offset + 16384), { binary: true });
    }
    const echoed = await connection.next(payload.length);
    connection.socket.close();
    if (!echoed || !echoed.equals(payload)) {
      throw new Error('the echo differs');
    }
    return { bytes: payload.length };
  },
  async datagram(name, count) {
    const connection = await open(ENTITY);
    connection.socket.send(preamble(1, name), { binary: true });
    const reply = await connection.next(3);
    if (!reply || !reply.equals(Buffer.from([1, 0, 1]))) {
      throw new Error(`preamble answer ${reply && reply.toString('hex')}`);
    }
    for (let i = 0; i < Number(count); i++) {
      const payload = crypto.randomBytes(100 + i);
      connection.socket.send(frame(payload), { binary: true });
      const length = await connection.next(2);
      const echoed = length && (await connection.next(length.readUInt16BE(0)));
      if (!echoed || !echoed.equals(payload)) {
        throw new Error(`datagram ${i} did not come back`);
      }
    }
    connection.socket.close();
    return { datagrams: Number(count) };
  },
  async unknown(name) {
    const connection = await open(ENTITY);
    connection.socket.send(preamble(0, name), { binary: true });
    const reply = await connection.next(1);
    if (reply !== null) {
      throw new Error(`answered ${reply.toString('hex')} to an unknown name`);
    }
    return { answer: 'closed without a byte' };
  },
  async mismatch(name) {
    const connection = await open(ENTITY);
    connection.socket.send(preamble(1, name), { binary: true });
    const reply = await connection.next(3);
    connection.socket.close();
    if (!reply || !reply.equals(Buffer.from([0, 0, 255]))) {
      throw new Error(`preamble answer ${reply && reply.toString('hex')}`);
    }
    return { answer: '0000ff' };
  },
  async nolistener() {
    try {
      const connection = await open(`${ENTITY}-empty`);
      connection.socket.close();
    } catch (error) {
      if (String(error).includes('404')) {
        return { refused: String(error) };
      }
      throw error;
    }
    throw new Error('connected without a listener');
  },
};

(async () => {
  let failed = 0;
  for (const spec of CASES) {
    const [kind, ...args] = spec.split(':');
    try {
      const detail = await runners[kind](...args);
      console.log(JSON.stringify({ case: spec, ok: true, detail }));
    } catch (error) {
      failed += 1;
      console.log(JSON.stringify({ case: spec, ok: false, error: String((error && error.stack) || error) }));
    }
  }
  process.exit(failed === 0 ? 0 : 1);
})();
