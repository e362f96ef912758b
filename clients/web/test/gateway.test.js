// ChatClient against the real gateway: a chatgate process on loopback, and
// a tiny TCP proxy in front of it that the tests cut, refuse, freeze or
// mute to make the server unreachable without losing its state.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHmac, randomUUID } from 'node:crypto';
import { existsSync } from 'node:fs';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import WebSocket from 'ws';
import { ChatClient, ChatError } from '../dist/chatgate.js';

const BIN = process.env.CHATGATE_BIN ?? new URL('../../../target/debug/chatgate', import.meta.url).pathname;
const SECRET = 'chatgate-dev-secret-not-for-production';
const LOBBY = 'public:lobby';
// Short heartbeats so a dead connection is noticed within seconds.
const HEARTBEAT = ['--heartbeat-interval-ms', '1000', '--heartbeat-timeout-ms', '1500'];

let gw; // { proc, addr, port }
const clients = [];
const proxies = [];

/** Starts the gateway and waits for its readiness line. */
function startGateway(listen = '127.0.0.1:0') {
  return new Promise((resolve, reject) => {
    const proc = spawn(BIN, ['--listen', listen, ...HEARTBEAT], {
      stdio: ['ignore', 'pipe', 'ignore'],
      env: { ...process.env, CHAT_LOG: 'warn' },
    });
    let out = '';
    proc.stdout.on('data', (d) => {
      out += d;
      const m = /chatgate listening on http:\/\/(\S+)/.exec(out);
      if (m) resolve({ proc, addr: m[1], port: +m[1].split(':').pop() });
    });
    proc.on('error', reject);
    proc.on('exit', (code) => reject(new Error(`gateway exited (${code}) before listening: ${out}`)));
  });
}

async function stopGateway(g) {
  if (g.proc.exitCode !== null) return;
  const exited = new Promise((r) => g.proc.once('exit', r));
  g.proc.kill('SIGTERM'); // by the PID we started
  await Promise.race([exited, sleep(5000).then(() => g.proc.kill('SIGKILL'))]);
}

const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
/** An HS256 JWT like an identity provider would issue. */
function token(sub, { rooms = ['*'], secret = SECRET, exp = Math.floor(Date.now() / 1000) + 3600 } = {}) {
  const claims = { sub, name: sub[0].toUpperCase() + sub.slice(1), exp };
  if (rooms) claims.rooms = rooms;
  const unsigned = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${unsigned}.${createHmac('sha256', secret).update(unsigned).digest('base64url')}`;
}

const user = (name) => `${name}-${randomUUID().slice(0, 8)}`;
const wsUrl = (port) => `ws://127.0.0.1:${port}/ws`;

function client(tok, port = gw.port, extra = {}) {
  const c = new ChatClient({ url: wsUrl(port), token: tok, WebSocket, ...extra });
  clients.push(c);
  return c;
}

/** Resolves with the first `type` event matching `pred`. */
function waitFor(c, type, pred = () => true, ms = 15000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => (off(), reject(new Error(`no ${type} event within ${ms} ms`))), ms);
    const off = c.on(type, (e) => {
      if (pred(e)) clearTimeout(t), off(), resolve(e);
    });
  });
}
const waitState = (c, s, ms) => (c.state === s ? Promise.resolve() : waitFor(c, 'state', (x) => x === s, ms));

/** Records every event of `type`. */
function record(c, type) {
  const all = [];
  c.on(type, (e) => all.push(e));
  return all;
}
const bodies = (msgs, room = LOBBY) => msgs.filter((m) => m.message.room === room).map((m) => m.message.body);

/**
 * A TCP proxy to the gateway. `down`: refuse new connections. `cut()`:
 * drop every current connection. `freeze()`: current connections stop
 * forwarding anything (a dead network path, no FIN). `mute()`: current
 * connections still deliver to the server but nothing comes back.
 */
function proxy(target) {
  return new Promise((resolve) => {
    const pairs = new Set();
    const p = { down: false, port: 0 };
    const server = net.createServer((c) => {
      if (p.down) return c.destroy();
      const s = net.connect(target(), '127.0.0.1');
      const pair = { c, s, up: true, back: true };
      pairs.add(pair);
      c.on('data', (d) => pair.up && s.write(d));
      s.on('data', (d) => pair.back && c.write(d));
      const end = () => (c.destroy(), s.destroy(), pairs.delete(pair));
      for (const x of [c, s]) x.on('close', end).on('error', end);
    });
    p.cut = () => pairs.forEach((x) => (x.c.destroy(), x.s.destroy()));
    p.freeze = () => pairs.forEach((x) => (x.up = x.back = false));
    p.mute = () => pairs.forEach((x) => (x.back = false));
    p.close = () => (p.cut(), server.close());
    server.listen(0, '127.0.0.1', () => {
      p.port = server.address().port;
      proxies.push(p);
      resolve(p);
    });
  });
}

before(async () => {
  assert.ok(existsSync(BIN), `gateway binary missing: ${BIN} (cargo build -p chatgate-gateway)`);
  gw = await startGateway();
});

after(async () => {
  for (const c of clients) c.close();
  for (const p of proxies) p.close();
  if (gw) await stopGateway(gw);
});

test('two clients exchange messages, typing, reactions and history in an open room', async () => {
  const a = client(token(user('alice')));
  const b = client(token(user('bob')));
  const states = record(a, 'state');
  const [ra] = await Promise.all([a.connect(), b.connect()]);
  assert.equal(a.state, 'ready');
  assert.deepEqual(states, ['ready']);
  assert.equal(ra.session_id.length, 16);
  assert.ok(ra.heartbeat_interval_ms > 0);
  await a.join([LOBBY]);
  const joined = await b.join([LOBBY]);
  assert.equal(joined.rooms[0].room, LOBBY);
  assert.deepEqual((await b.join([LOBBY])).rooms, [], 'a second join lists nothing');

  const tag = randomUUID();
  const atB = waitFor(b, 'message', (m) => m.message.body === `hello ${tag}`);
  const sent = await a.send(LOBBY, `hello ${tag}`);
  assert.equal(sent.duplicate, false);
  assert.equal(typeof sent.message_id, 'bigint');
  const m = await atB;
  assert.equal(m.message.sender_id, a.session.user_id);
  assert.equal(m.message.id, sent.message_id);
  assert.equal(m.message.seq, sent.seq);

  const atA = waitFor(a, 'message', (x) => x.message.body === `hi ${tag}`);
  const back = await b.send(LOBBY, `hi ${tag}`, [{ url: 'https://cdn.example/p.png', name: 'p.png', mime: 'image/png', size: 1234 }]);
  const got = await atA;
  assert.equal(got.message.attachments[0].size, 1234n);
  assert.deepEqual(a.positions.get(LOBBY), [back.epoch, back.seq]);
  assert.deepEqual(b.positions.get(LOBBY), [back.epoch, back.seq]);

  const typing = waitFor(a, 'typing', (t) => t.user_id === b.session.user_id);
  b.typing(LOBBY);
  b.typing(LOBBY); // throttled: one frame
  await typing;

  const reaction = waitFor(b, 'reaction', (r) => r.message_id === back.message_id);
  const reacted = await a.react(LOBBY, back.message_id, '👍');
  assert.ok(reacted.seq > 0n);
  assert.equal((await reaction).emoji, '👍');
  const noop = await a.react(LOBBY, back.message_id, '👍'); // already there: seq 0, nothing moves
  assert.equal(noop.seq, 0n);
  assert.deepEqual(a.positions.get(LOBBY), [reacted.epoch, reacted.seq]);

  const page = await b.history(LOBBY, null, 10);
  const texts = page.messages.map((x) => x.body);
  assert.deepEqual(texts.slice(0, 2), [`hi ${tag}`, `hello ${tag}`], 'newest first');
  await assert.rejects(a.send(LOBBY, '   '), (e) => e instanceof ChatError && e.kind === 'invalid_request');
});

test('a send made while the server is unreachable goes out after reconnect, exactly once', async () => {
  const p = await proxy(() => gw.port);
  const a = client(token(user('carol')), p.port);
  const b = client(token(user('dave')));
  await Promise.all([a.connect(), b.connect()]);
  await a.join([LOBBY]);
  await b.join([LOBBY]);
  const atB = record(b, 'message');

  p.down = true;
  p.cut();
  await waitState(a, 'reconnecting');
  const body = `offline ${randomUUID()}`;
  const pending = a.send(LOBBY, body);
  await sleep(1500); // a few refused attempts
  assert.notEqual(a.state, 'ready');
  assert.deepEqual(bodies(atB).filter((x) => x === body), []);

  p.down = false;
  const sent = await pending;
  assert.equal(sent.duplicate, false);
  assert.equal(a.state, 'ready');
  await sleep(500);
  assert.deepEqual(bodies(atB).filter((x) => x === body), [body], 'delivered exactly once');
});

test('a forced reconnect resumes: messages sent meanwhile arrive in order, exactly once', async () => {
  const p = await proxy(() => gw.port);
  const a = client(token(user('erin')), p.port);
  const b = client(token(user('frank')));
  await Promise.all([a.connect(), b.connect()]);
  await a.join([LOBBY]);
  await b.join([LOBBY]);
  const atA = record(a, 'message');
  const gaps = [...record(a, 'missed'), ...record(a, 'streamLost')];
  const resumed = waitFor(a, 'resumed');
  const sid = a.session.session_id;

  p.down = true;
  p.cut();
  await waitState(a, 'reconnecting');
  const tag = randomUUID();
  const sent = [];
  for (let i = 1; i <= 5; i++) sent.push(`${tag} #${i}`), await b.send(LOBBY, `${tag} #${i}`);
  p.down = false;

  const r = await resumed;
  const lobby = r.rooms.find((x) => x.room === LOBBY);
  assert.equal(lobby.recovered, true);
  assert.equal(lobby.replayed, 5);
  assert.notDeepEqual(a.session.session_id, sid, 'a new session id');
  // Live traffic after the resume is not repeated or reordered either.
  await b.send(LOBBY, `${tag} #6`);
  sent.push(`${tag} #6`);
  await waitFor(a, 'message', (m) => m.message.body === `${tag} #6`).catch(() => {});
  assert.deepEqual(bodies(atA).filter((x) => x.startsWith(tag)), sent);
  assert.deepEqual(gaps, []);
  assert.deepEqual(a.positions.get(LOBBY), b.positions.get(LOBBY));
});

test('a send whose acknowledgement was lost is re-sent with its id: one message, duplicate ack', async () => {
  const p = await proxy(() => gw.port);
  const a = client(token(user('gina')), p.port);
  const b = client(token(user('hank')));
  await Promise.all([a.connect(), b.connect()]);
  await a.join([LOBBY]);
  await b.join([LOBBY]);
  const atA = record(a, 'message');
  const atB = record(b, 'message');

  p.mute(); // the Send reaches the server; nothing comes back
  const body = `ack lost ${randomUUID()}`;
  const pending = a.send(LOBBY, body);
  await waitFor(b, 'message', (m) => m.message.body === body);
  p.cut();
  const sent = await pending;
  assert.equal(sent.duplicate, true, 'the retry found it stored');
  await sleep(300);
  assert.deepEqual(bodies(atB).filter((x) => x === body), [body]);
  assert.deepEqual(bodies(atA).filter((x) => x === body), [], 'own message not echoed as someone else’s');
  // The replay moved the position past the message; the duplicate ack did not move it back.
  assert.deepEqual(a.positions.get(LOBBY), b.positions.get(LOBBY));
});

test('a dead connection (no heartbeat ack) is noticed and resumed', async () => {
  const p = await proxy(() => gw.port);
  const a = client(token(user('ivan')), p.port);
  const b = client(token(user('judy')));
  await Promise.all([a.connect(), b.connect()]);
  await a.join([LOBBY]);
  await b.join([LOBBY]);
  const atA = record(a, 'message');
  p.freeze(); // no FIN, no RST: only the missing HeartbeatAck tells
  const t0 = Date.now();
  const body = `while frozen ${randomUUID()}`;
  await b.send(LOBBY, body);
  await waitState(a, 'reconnecting', 10000);
  assert.ok(Date.now() - t0 < 4000, 'noticed within interval + timeout');
  await waitFor(a, 'resumed');
  await sleep(200);
  assert.deepEqual(bodies(atA).filter((x) => x === body), [body]);
});

test('a refused token closes with 4100 and never reconnects', async () => {
  let sockets = 0;
  class Counting extends WebSocket {
    constructor(...args) {
      super(...args);
      sockets++;
    }
  }
  const c = client(token(user('mallory'), { secret: 'not-the-secret' }), gw.port, { WebSocket: Counting });
  const closed = waitFor(c, 'closed');
  await assert.rejects(c.connect(), (e) => e instanceof ChatError && e.kind === 'closed' && e.code === 4100);
  assert.equal((await closed).code, 4100);
  assert.equal(c.state, 'closed');
  await assert.rejects(c.send(LOBBY, 'x'), { kind: 'closed' });
  await sleep(2500);
  assert.equal(sockets, 1, 'no reconnect attempt');
  assert.equal(c.state, 'closed');
});

test('joining a members room without a grant is refused with forbidden (9)', async () => {
  const c = client(token(user('nina'), { rooms: null }));
  await c.connect();
  await assert.rejects(c.join(['team:1']), (e) => e instanceof ChatError && e.kind === 'server' && e.code === 9);
  // Refused whole: the open room of the same request is not joined either.
  await assert.rejects(c.join([LOBBY, 'team:1']), { code: 9 });
  assert.equal(c.positions.has(LOBBY), false);
  assert.equal(c.state, 'ready');
  assert.equal((await c.join([LOBBY])).rooms.length, 1);
});

test('a gateway restart (4000, streams gone) reconnects and reports the gap', async () => {
  const a = client(token(user('olga'), {}), gw.port);
  await a.connect();
  await a.join([LOBBY]);
  await a.send(LOBBY, `before restart ${randomUUID()}`);
  const states = record(a, 'state');
  const resumed = waitFor(a, 'resumed', () => true, 20000);
  const port = gw.port;
  await stopGateway(gw); // closes sessions with 4000
  gw = await startGateway(`127.0.0.1:${port}`);
  const r = await resumed;
  const lobby = r.rooms.find((x) => x.room === LOBBY);
  assert.equal(lobby.recovered, false, 'the new process has no stream to replay');
  assert.deepEqual(a.positions.get(LOBBY), [lobby.epoch, lobby.seq]);
  assert.equal(states[0], 'reconnecting');
  assert.equal(a.state, 'ready');
});
