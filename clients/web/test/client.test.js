// ChatClient behaviour the real gateway cannot easily be made to show:
// a scripted fake WebSocket plays the server, using the codec both ways.
import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { deflateRawSync } from 'node:zlib';
import { setTimeout as sleep } from 'node:timers/promises';
import { ChatClient, decode, encode } from '../dist/chatgate.js';

const SID = new Uint8Array(16).fill(7);
const ready = (rooms = [], o = {}) => ({
  session_id: SID, user_id: 'me', user_name: 'Me', rooms, heartbeat_interval_ms: 60000,
  heartbeat_timeout_ms: 1000, max_frame_bytes: 1 << 20, resuming: false, ...o,
});
const msg = (room, seq, o = {}) => ({
  id: seq, room, seq, sender_id: 'u-other', sender_name: 'Other', sender_image: '', client_msg_id: `c${seq}`,
  body: `m${seq}`, attachments: [], reactions: [], created_at_ms: 1764316800000, ...o,
});

/**
 * A fake socket; `script(sock, frame)` answers each client frame, in the
 * order they were written. `wire` keeps the raw frames. The first `refuse`
 * sockets fail; `opening(n)` may instead give socket n (from 1) an opening
 * time and whether it opens: `[ms, ok]`.
 */
function fake(script, { refuse = 0, opening } = {}) {
  const socks = [];
  class FakeWS {
    constructor(url, proto) {
      Object.assign(this, { url, proto, frames: [], wire: [], closed: false, read: Promise.resolve() });
      socks.push(this);
      const [ms, ok] = opening?.(socks.length) ?? [1, socks.length > refuse];
      setTimeout(() => (this.closed ? 0 : ok ? this.onopen?.() : this.drop(1006)), ms);
    }
    send(b) {
      if (this.closed) return;
      const bytes = Uint8Array.from(b);
      this.wire.push(bytes);
      this.read = this.read.then(async () => {
        const f = await decode(bytes, false);
        this.frames.push(f);
        script(this, f);
      });
    }
    close(code = 1005) {
      if (!this.closed) (this.closed = true), setTimeout(() => this.onclose?.({ code, reason: '' }), 1);
    }
    push(type, data, rid = 0) {
      this.onmessage?.({ data: encode(type, data, rid).buffer });
    }
    raw(bytes) {
      this.onmessage?.({ data: Uint8Array.from(bytes).buffer });
    }
    drop(code, reason = '') {
      this.closed = true;
      this.onclose?.({ code, reason });
    }
  }
  return { FakeWS, socks };
}
/** The usual server: Ready for Identify (resuming when asked), Ok-ish answers. */
const basic = (rooms = []) => (s, f) => {
  if (f.type === 'Identify') {
    s.push('Ready', ready(rooms, { resuming: !!f.data.resume }), f.rid);
    if (f.data.resume) s.push('Resumed', { rooms: [] });
  }
  if (f.type === 'Heartbeat') s.push('HeartbeatAck', { server_time_ms: 1 }, f.rid);
};

const made = [];
function client(FakeWS, o = {}) {
  const c = new ChatClient({ url: 'ws://test/ws', token: 'tok', WebSocket: FakeWS, ...o });
  made.push(c);
  return c;
}
afterEach(() => {
  for (const c of made.splice(0)) c.close();
  delete globalThis.window;
  delete globalThis.document;
  delete globalThis.navigator;
});
const until = async (cond, ms = 3000) => {
  for (const end = Date.now() + ms; !cond(); await sleep(5)) if (Date.now() > end) throw new Error('timed out');
};

test('identify offers chat.v1, request ids start at 1 and stay unique', async () => {
  const { FakeWS, socks } = fake((s, f) => {
    basic()(s, f);
    if (f.type === 'Join') s.push('Joined', { rooms: f.data.rooms.map((room) => ({ room, epoch: 1, seq: 0 })) }, f.rid);
  });
  const c = client(FakeWS);
  const r = await c.connect();
  assert.equal(socks[0].proto, 'chat.v1');
  assert.equal(socks[0].frames[0].type, 'Identify');
  assert.equal(socks[0].frames[0].rid, 1);
  assert.equal(socks[0].frames[0].data.resume, null);
  assert.equal(r.user_id, 'me');
  await Promise.all([c.join(['a']), c.join(['b'])]);
  assert.deepEqual(socks[0].frames.map((f) => f.rid), [1, 2, 3]);
  assert.deepEqual([...c.positions.keys()], ['a', 'b']);
});

test('§9.5 positions: duplicates ignored, gaps and new epochs reported, acks that take no place ignored', async () => {
  const { FakeWS, socks } = fake(basic([{ room: 'r', epoch: 1, seq: 5 }]));
  const c = client(FakeWS);
  const seen = [], missed = [], lost = [];
  c.on('message', (m) => seen.push(`${m.epoch}:${m.message.seq}`));
  c.on('missed', (e) => missed.push(e));
  c.on('streamLost', (e) => lost.push(e));
  await c.connect();
  const s = socks[0];
  const ev = (epoch, seq) => s.push('NewMessage', { epoch, message: msg('r', seq) });
  ev(1, 5); // at the position: already seen
  ev(1, 6);
  ev(1, 8); // 7 missed
  ev(1, 7); // behind: ignored
  s.push('MessageSent', { room: 'r', message_id: 1, epoch: 1, seq: 99, created_at_ms: 1, duplicate: true });
  s.push('Reacted', { room: 'r', message_id: 1, epoch: 1, seq: 0 });
  await until(() => seen.length === 2);
  await sleep(20);
  assert.deepEqual(c.positions.get('r'), [1n, 8n], 'duplicate ack and no-op Reacted did not move it');
  s.push('Reacted', { room: 'r', message_id: 1, epoch: 1, seq: 9 });
  await sleep(20);
  assert.deepEqual(c.positions.get('r'), [1n, 9n], 'own Reacted takes its place');
  ev(2, 1); // new epoch
  await until(() => seen.length === 3);
  await sleep(20);
  assert.deepEqual(seen, ['1:6', '1:8', '2:1']);
  assert.deepEqual(missed, [{ room: 'r', after: 6n, next: 8n }]);
  assert.deepEqual(lost, [{ room: 'r', epoch: 2n, seq: 0n }]);
  assert.deepEqual(c.positions.get('r'), [2n, 1n]);
});

test('batches and compressed frames are handled in order', async () => {
  const { FakeWS, socks } = fake(basic([{ room: 'r', epoch: 1, seq: 0 }]));
  const c = client(FakeWS);
  const seen = [];
  c.on('message', (m) => seen.push(m.message.body));
  c.on('typing', (t) => seen.push(`typing ${t.user_id}`));
  await c.connect();
  const s = socks[0];
  const big = encode('NewMessage', { epoch: 1, message: msg('r', 1, { body: 'x'.repeat(5000) }) });
  s.raw([0x60, 1, 0, 0, 0, 0, ...deflateRawSync(big.subarray(6))]); // compressed: async inflate
  s.push('Batch', {
    frames: [
      encode('NewMessage', { epoch: 1, message: msg('r', 2) }),
      encode('UserTyping', { room: 'r', user_id: 'u-x' }),
      encode('NewMessage', { epoch: 1, message: msg('r', 3) }),
    ],
  });
  await until(() => seen.length === 4);
  assert.deepEqual(seen.map((x) => x.slice(0, 8)), ['x'.repeat(8), 'm2', 'typing u', 'm3']);
});

test('requests wait while disconnected, then go out after Ready with the same ids; the resume carries positions', async () => {
  let acks = false;
  const { FakeWS, socks } = fake((s, f) => {
    basic([{ room: 'r', epoch: 3, seq: 10 }])(s, f);
    if (f.type === 'Send' && acks)
      s.push('MessageSent', { room: 'r', message_id: 1, epoch: 3, seq: 11, created_at_ms: 1, duplicate: false }, f.rid);
  });
  const c = client(FakeWS, { minDelay: 50, maxDelay: 100 });
  await c.connect();
  const first = c.send('r', 'one'); // written, never answered on this socket
  await until(() => socks[0].frames.length === 2);
  socks[0].drop(4001);
  assert.equal(c.state, 'reconnecting');
  const second = c.send('r', 'two'); // queued
  acks = true;
  const [a, b] = await Promise.all([first, second]);
  assert.equal(a.seq, 11n);
  assert.equal(b.seq, 11n);
  const [s0, s1] = socks;
  const id0 = s0.frames[1].data.client_msg_id;
  const resent = s1.frames.filter((f) => f.type === 'Send');
  assert.deepEqual(resent.map((f) => f.data.body), ['one', 'two']);
  assert.equal(resent[0].data.client_msg_id, id0);
  assert.equal(resent[0].rid, s0.frames[1].rid);
  assert.match(id0, /^[0-9a-f-]{36}$/);
  const resume = s1.frames[0].data.resume;
  assert.deepEqual([...resume.session_id], [...SID]);
  assert.deepEqual(resume.positions, [{ room: 'r', epoch: 3n, seq: 10n }]);
});

test('backoff: exponential from minDelay, capped at maxDelay, jittered in [0.5, 1]', async () => {
  const { FakeWS, socks } = fake(basic(), { refuse: 5 });
  const c = client(FakeWS, { minDelay: 80, maxDelay: 320 });
  const t = [];
  const p = c.connect();
  // Record when each socket appears.
  for (let i = 0; i < 6; i++) {
    await until(() => socks.length > i, 5000);
    t.push(Date.now());
  }
  await p;
  const gaps = t.slice(1).map((x, i) => x - t[i]);
  const steps = [80, 160, 320, 320, 320];
  gaps.forEach((g, i) => {
    assert.ok(g >= steps[i] * 0.5 - 5 && g <= steps[i] + 150, `attempt ${i}: ${g} ms for step ${steps[i]}`);
  });
  assert.equal(c.state, 'ready');
});

test('4000 reconnects at once; 4107 stops for good with the reason', async () => {
  const { FakeWS, socks } = fake(basic());
  const c = client(FakeWS, { minDelay: 10000, maxDelay: 10000 });
  await c.connect();
  const t0 = Date.now();
  socks[0].drop(4000, 'draining');
  await until(() => c.state === 'ready' && socks.length === 2);
  assert.ok(Date.now() - t0 < 700, 'no backoff after 4000');
  const closed = new Promise((r) => c.on('closed', r));
  const pending = c.history('r');
  socks[1].drop(4107, 'banned by the application');
  assert.deepEqual(await closed, { code: 4107, reason: 'banned by the application' });
  await assert.rejects(pending, { kind: 'closed', code: 4107, message: 'banned by the application' });
  assert.equal(c.state, 'closed');
  await sleep(100);
  assert.equal(socks.length, 2);
});

test('transient errors are retried with the same request; final ones reject', async () => {
  let sends = 0;
  const { FakeWS, socks } = fake((s, f) => {
    basic()(s, f);
    if (f.type === 'Send') {
      if (++sends === 1) s.push('Error', { code: 2, retry_after_ms: 300, message: 'rate limited' }, f.rid);
      else s.push('MessageSent', { room: 'r', message_id: 1, epoch: 1, seq: 1, created_at_ms: 1, duplicate: false }, f.rid);
    }
    if (f.type === 'Join') s.push('Error', { code: 9, retry_after_ms: 0, message: 'not a member of team:1' }, f.rid);
  });
  const c = client(FakeWS);
  await c.connect();
  const t0 = Date.now();
  await c.send('r', 'hi');
  assert.ok(Date.now() - t0 >= 290, 'waited retry_after_ms');
  const sendFrames = socks[0].frames.filter((f) => f.type === 'Send');
  assert.equal(sendFrames.length, 2);
  assert.equal(sendFrames[0].data.client_msg_id, sendFrames[1].data.client_msg_id);
  await assert.rejects(c.join(['team:1']), { kind: 'server', code: 9, message: 'not a member of team:1' });
});

test('timeouts, heartbeats, dead connections', async () => {
  let answer = true;
  const { FakeWS, socks } = fake((s, f) => {
    if (f.type === 'Identify') s.push('Ready', ready([], { heartbeat_interval_ms: 50, heartbeat_timeout_ms: 100 }), f.rid);
    if (f.type === 'Heartbeat' && answer) s.push('HeartbeatAck', { server_time_ms: 1 }, f.rid);
  });
  const c = client(FakeWS, { timeout: 150, minDelay: 20, maxDelay: 40 });
  await c.connect();
  await assert.rejects(c.history('r'), { kind: 'timeout' });
  assert.ok(socks[0].frames.filter((f) => f.type === 'Heartbeat').length >= 2, 'heartbeats at the interval');
  assert.equal(socks.length, 1, 'acked heartbeats keep the connection');
  answer = false;
  await until(() => socks.length === 2, 1000);
  answer = true;
  await until(() => c.state === 'ready');
});

test('typing is throttled per room and dropped while disconnected', async () => {
  const { FakeWS, socks } = fake(basic());
  const c = client(FakeWS);
  c.typing('r'); // not ready yet: dropped
  await c.connect();
  c.typing('r');
  c.typing('r');
  c.typing('s');
  await sleep(20);
  const typing = socks[0].frames.filter((f) => f.type === 'Typing');
  assert.deepEqual(typing.map((f) => [f.data.room, f.rid]), [['r', 0], ['s', 0]]);
});

test('unsolicited Left drops the rooms; errors without a request surface as events', async () => {
  const { FakeWS, socks } = fake(basic([{ room: 'team:1', epoch: 1, seq: 0 }, { room: 'r', epoch: 1, seq: 0 }]));
  const c = client(FakeWS);
  const removed = new Promise((r) => c.on('removed', r));
  const errors = [];
  c.on('error', (e) => errors.push(e));
  await c.connect();
  socks[0].push('Left', { rooms: ['team:1'] });
  assert.deepEqual(await removed, { rooms: ['team:1'] });
  assert.deepEqual([...c.positions.keys()], ['r']);
  socks[0].push('Error', { code: 9, retry_after_ms: 0, message: 'may not post' });
  socks[0].raw([0x60, 2, 0, 0, 0, 0]); // reserved flag: a broken server frame → error, then reconnect
  await until(() => errors.length === 2 && socks.length === 2);
  assert.deepEqual(errors.map((e) => [e.kind, e.code]), [['server', 9], ['reserved_flags', 0]]);
});

test('the browser coming back online, or the tab visible again, skips the backoff wait', async () => {
  globalThis.window = new EventTarget();
  globalThis.document = Object.assign(new EventTarget(), { visibilityState: 'visible' });
  const { FakeWS, socks } = fake(basic());
  const c = client(FakeWS, { minDelay: 60000, maxDelay: 60000 });
  await c.connect();
  socks[0].drop(1006);
  await sleep(20);
  assert.equal(socks.length, 1, 'waiting out the backoff');
  window.dispatchEvent(new Event('online'));
  await until(() => c.state === 'ready' && socks.length === 2);

  socks[1].drop(1006);
  document.visibilityState = 'hidden';
  document.dispatchEvent(new Event('visibilitychange'));
  await sleep(20);
  assert.equal(socks.length, 2);
  document.visibilityState = 'visible';
  document.dispatchEvent(new Event('visibilitychange'));
  await until(() => c.state === 'ready' && socks.length === 3);

  // When ready, becoming visible probes the connection with a heartbeat.
  const beats = () => socks[2].frames.filter((f) => f.type === 'Heartbeat').length;
  document.visibilityState = 'hidden';
  document.dispatchEvent(new Event('visibilitychange'));
  document.visibilityState = 'visible';
  document.dispatchEvent(new Event('visibilitychange'));
  await until(() => beats() === 1);
});

test('a malformed URL stops at once with a typed error', async () => {
  const { default: WebSocket } = await import('ws');
  const c = client(WebSocket, { url: 'not a url' });
  await assert.rejects(c.connect(), { kind: 'closed' });
  assert.equal(c.state, 'closed');
});

/** A body of about `n` bytes that compresses well and differs per call. */
const big = (tag, n = 4000) => `${tag} ${'the quick brown fox jumps over the lazy dog. '.repeat(Math.ceil(n / 45))}`;

test('large frames go out compressed, every frame in the order it was made, re-sends after a reconnect too', async () => {
  let acks = false;
  const { FakeWS, socks } = fake((s, f) => {
    basic([{ room: 'r', epoch: 1, seq: 0 }])(s, f);
    if (f.type === 'Send' && acks)
      s.push('MessageSent', { room: 'r', message_id: f.rid, epoch: 1, seq: f.rid, created_at_ms: 1, duplicate: false }, f.rid);
  });
  const c = client(FakeWS, { minDelay: 20, maxDelay: 40 });
  await c.connect();
  const bodies = [big('one'), 'two', big('three', 16000), 'four', big('five')];
  const sent = bodies.map((b) => c.send('r', b)); // written at once, compressed one after another
  c.typing('r');
  const s0 = socks[0];
  await until(() => s0.frames.length === 7);
  const order = (s) => s.frames.slice(1).map((f) => (f.type === 'Send' ? f.data.body : f.type));
  assert.deepEqual(order(s0), [...bodies, 'Typing']);
  const sizes = (s) => s.wire.slice(1).map((w) => [w[0], w[1], w.length]);
  for (const [i, [op, flags, size]] of sizes(s0).entries()) {
    const long = i < 5 && bodies[i].length > 1024;
    assert.equal(flags, long ? 1 : 0, `frame ${i}: compressed only when large`);
    if (long) assert.ok(size < bodies[i].length / 4, `frame ${i}: ${size} bytes for ${bodies[i].length}`);
    assert.equal(op, i < 5 ? 5 : 6);
  }
  // The socket drops unanswered: the next one resumes and writes them again, same order, same ids.
  acks = true;
  s0.drop(1006);
  const acked = await Promise.all(sent);
  const s1 = socks[1];
  assert.equal(s1.frames[0].type, 'Identify');
  assert.deepEqual(order(s1), bodies);
  assert.deepEqual(s1.frames.slice(1).map((f) => f.rid), s0.frames.slice(1, 6).map((f) => f.rid));
  assert.deepEqual(sizes(s1).map((x) => x[1]), [1, 0, 1, 0, 1]);
  assert.deepEqual(acked.map((a) => a.message_id), s0.frames.slice(1, 6).map((f) => BigInt(f.rid)));
});

test('a large request made while reconnecting waits for Identify and goes out compressed after Ready', async () => {
  const { FakeWS, socks } = fake((s, f) => {
    basic()(s, f);
    if (f.type === 'Join') s.push('Joined', { rooms: f.data.rooms.map((room) => ({ room, epoch: 1, seq: 0 })) }, f.rid);
  });
  const c = client(FakeWS, { minDelay: 20, maxDelay: 40 });
  await c.connect();
  socks[0].drop(1006);
  const rooms = Array.from({ length: 100 }, (_, i) => `public:room-number-${String(i).padStart(3, '0')}`);
  const joined = await c.join(rooms); // a payload of 3 KB
  assert.equal(joined.rooms.length, 100);
  const s1 = socks[1];
  assert.deepEqual(s1.frames.map((f) => f.type), ['Identify', 'Join']);
  assert.equal(s1.wire[1][1], 1, 'compressed');
  // The resume names all 100 rooms: the Identify is large too, and compressed.
  socks[1].drop(1006);
  await until(() => socks.length === 3 && socks[2].frames.length >= 1);
  assert.equal(socks[2].frames[0].data.resume.positions.length, 100);
  assert.equal(socks[2].wire[0][1], 1);
});

test('offline: the state says so at once; an unanswered probe gives the socket up; online reconnects at once', async () => {
  globalThis.window = new EventTarget();
  globalThis.navigator = { onLine: true };
  let answer = true;
  const { FakeWS, socks } = fake((s, f) => {
    if (f.type === 'Identify') s.push('Ready', ready([{ room: 'r', epoch: 1, seq: 0 }], { heartbeat_timeout_ms: 300 }), f.rid);
    if (f.type === 'Heartbeat' && answer) s.push('HeartbeatAck', { server_time_ms: 1 }, f.rid);
    if (f.type === 'Send') s.push('MessageSent', { room: 'r', message_id: 1, epoch: 1, seq: 1, created_at_ms: 1, duplicate: false }, f.rid);
  });
  const c = client(FakeWS, { minDelay: 60000, maxDelay: 60000 });
  await c.connect();
  answer = false;
  navigator.onLine = false;
  const t0 = Date.now();
  window.dispatchEvent(new Event('offline'));
  assert.equal(c.state, 'offline', 'at once, not after the heartbeat timeout');
  socks[0].push('HeartbeatAck', { server_time_ms: 1 }); // an older heartbeat's answer, late: not the probe's
  const sent = c.send('r', 'written offline'); // waits
  await until(() => socks[0].frames.some((f) => f.type === 'Heartbeat'));
  const probe = socks[0].frames.find((f) => f.type === 'Heartbeat');
  assert.ok(probe.rid > 0, 'the probe has its own request id');
  await sleep(100);
  assert.equal(c.state, 'offline');
  await until(() => socks[0].closed, 2000);
  assert.ok(Date.now() - t0 >= 280, 'given up after the heartbeat timeout');
  assert.equal(c.state, 'offline');
  assert.equal(socks[0].frames.filter((f) => f.type === 'Send').length, 0, 'nothing written to a socket in doubt');
  await sleep(50);
  assert.equal(socks.length, 1, 'backing off (60 s)');
  navigator.onLine = true;
  window.dispatchEvent(new Event('online'));
  assert.equal((await sent).seq, 1n);
  assert.equal(c.state, 'ready');
  assert.equal(socks.length, 2);
  assert.deepEqual(socks[1].frames.map((f) => f.type), ['Identify', 'Send']);

  // Online again before the probe's deadline: the quiet socket is replaced at once.
  answer = false;
  navigator.onLine = false;
  window.dispatchEvent(new Event('offline'));
  await sleep(30);
  navigator.onLine = true;
  const t1 = Date.now();
  window.dispatchEvent(new Event('online'));
  await until(() => c.state === 'ready' && socks.length === 3);
  assert.ok(Date.now() - t1 < 250, `${Date.now() - t1} ms`);
  assert.ok(socks[1].closed);
});

test('offline: a probe answered keeps the socket (a flaky network), and what waited goes out on it', async () => {
  globalThis.window = new EventTarget();
  globalThis.navigator = { onLine: true };
  const { FakeWS, socks } = fake((s, f) => {
    basic([{ room: 'r', epoch: 1, seq: 0 }])(s, f);
    if (f.type === 'History') s.push('HistoryPage', { room: 'r', messages: [], next: null }, f.rid);
  });
  const c = client(FakeWS, { minDelay: 60000, maxDelay: 60000 });
  const states = [];
  c.on('state', (x) => states.push(x));
  await c.connect();
  navigator.onLine = false;
  window.dispatchEvent(new Event('offline'));
  assert.equal(c.state, 'offline');
  const page = c.history('r'); // waits for the probe's answer
  assert.deepEqual((await page).messages, []);
  assert.equal(c.state, 'ready');
  assert.deepEqual(states, ['ready', 'offline', 'ready']);
  assert.equal(socks.length, 1);
  assert.deepEqual(socks[0].frames.map((f) => f.type), ['Identify', 'Heartbeat', 'History']);
  await sleep(1200); // past the probe's deadline (heartbeat_timeout_ms 1000): answered, so nothing is dropped
  assert.equal(socks.length, 1);
});

test('online or the page visible during a connect attempt: if it fails, the next one is at once', async () => {
  globalThis.window = new EventTarget();
  globalThis.document = Object.assign(new EventTarget(), { visibilityState: 'visible' });
  // Sockets 2 and 4 take 100 ms to fail; the others open.
  const { FakeWS, socks } = fake(basic(), { opening: (n) => (n === 2 || n === 4 ? [100, false] : [1, true]) });
  const c = client(FakeWS, { minDelay: 60000, maxDelay: 60000 });
  await c.connect();
  socks[0].drop(1006); // backing off for 30–60 s
  await sleep(20);
  window.dispatchEvent(new Event('online')); // skips the wait: socket 2, which will fail
  assert.equal(socks.length, 2);
  await sleep(30);
  window.dispatchEvent(new Event('online')); // during that attempt
  await until(() => c.state === 'ready' && socks.length === 3, 1000);

  socks[2].drop(1006);
  document.visibilityState = 'hidden';
  document.dispatchEvent(new Event('visibilitychange'));
  document.visibilityState = 'visible';
  document.dispatchEvent(new Event('visibilitychange')); // socket 4, which will fail
  assert.equal(socks.length, 4);
  await sleep(30);
  document.visibilityState = 'hidden';
  document.dispatchEvent(new Event('visibilitychange'));
  document.visibilityState = 'visible';
  document.dispatchEvent(new Event('visibilitychange')); // during that attempt
  await until(() => c.state === 'ready' && socks.length === 5, 1000);

  // Without a wake, a failed attempt backs off as usual.
  socks[4].drop(1006);
  await sleep(300);
  assert.equal(socks.length, 5);
});

test('typing: a call within 3 s of the last Typing sends one more when they are over; a message cancels it', async () => {
  const { FakeWS, socks } = fake(basic());
  const c = client(FakeWS);
  await c.connect();
  const s = socks[0];
  const t0 = Date.now();
  c.typing('r');
  c.typing('s');
  await sleep(100);
  c.typing('r');
  c.typing('s');
  await sleep(100);
  c.typing('r'); // still one late Typing for r
  c.send('s', 'done typing').catch(() => {}); // s: the message ends it, no late Typing (never answered here)
  const typing = () => s.frames.filter((f) => f.type === 'Typing').map((f) => f.data.room);
  await until(() => typing().length === 3, 4000);
  const late = Date.now() - t0;
  assert.deepEqual(typing(), ['r', 's', 'r']);
  assert.ok(late >= 2990 && late < 3400, `late Typing after ${late} ms`);
  await sleep(300);
  assert.deepEqual(typing(), ['r', 's', 'r'], 'one late Typing, none for s');
  c.typing('r'); // within 3 s of the late one: waits again
  await sleep(50);
  assert.equal(typing().length, 3);
});
