// Every vector of proto-spec/vectors passes both ways (PROTOCOL.md §11),
// against the built bundle: decode hex → frame and request id; canonical
// frames re-encode to exactly hex; invalid cases fail with their kind.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { ChatError, compress, decode, encode } from '../dist/chatgate.js';

const DIR = new URL('../../../proto-spec/vectors/', import.meta.url);
const BIG = '\u0000big:';

/**
 * JSON.parse that keeps integers exact: integer literals of 16 or more
 * digits (outside strings) are quoted with a marker first, then revived as
 * BigInt. Everything shorter is below 2^53 and exact as a number.
 */
export function parseExact(text) {
  let out = '';
  for (let i = 0; i < text.length; ) {
    const c = text[i];
    if (c === '"') {
      let j = i + 1;
      while (text[j] !== '"') j += text[j] === '\\' ? 2 : 1;
      out += text.slice(i, ++j);
      i = j;
    } else if (/[-\d]/.test(c)) {
      const m = /^-?\d+(\.\d+)?([eE][-+]?\d+)?/.exec(text.slice(i))[0];
      out += /^\d{16,}$/.test(m) ? `"\\u0000big:${m}"` : m; // escaped marker, revived below
      i += m.length;
    } else {
      out += c;
      i++;
    }
  }
  return JSON.parse(out, (_, v) => (typeof v === 'string' && v.startsWith(BIG) ? BigInt(v.slice(BIG.length)) : v));
}

const load = (name) => parseExact(readFileSync(new URL(`${name}.json`, DIR), 'utf8'));
const hex = (s) => Uint8Array.from(s.match(/../g) ?? [], (h) => parseInt(h, 16));
const toHex = (u) => Buffer.from(u).toString('hex');
/** A vector's `frame`: `{Name: payload}`, or a bare name for an empty payload. */
const split = (f) => (typeof f === 'string' ? [f, {}] : Object.entries(f)[0]);

/** Compares a decoded value with the vector's: u64 as BigInt, bytes as arrays. */
function same(actual, expected, path = '') {
  if (typeof actual === 'bigint') {
    assert.equal(typeof expected === 'bigint' || Number.isSafeInteger(expected), true, `${path}: exact integer expected`);
    assert.equal(actual, BigInt(expected), path);
  } else if (actual instanceof Uint8Array) assert.deepEqual([...actual], expected, path);
  else if (Array.isArray(actual)) {
    assert.equal(actual.length, expected.length, `${path}.length`);
    actual.forEach((x, i) => same(x, expected[i], `${path}[${i}]`));
  } else if (actual && typeof actual === 'object') {
    assert.deepEqual(Object.keys(actual).sort(), Object.keys(expected).sort(), `${path} keys`);
    for (const k of Object.keys(actual)) same(actual[k], expected[k], `${path}.${k}`);
  } else assert.equal(actual, expected, path);
}

const index = JSON.parse(readFileSync(new URL('index.json', DIR), 'utf8'));
assert.ok(index.vectors.length >= 59, 'index lists the vectors');

for (const name of index.vectors) {
  test(`vector ${name}`, async () => {
    const v = load(name);
    const fromServer = v.direction === 'server_to_client';
    const bytes = hex(v.hex);
    if (v.error) {
      const max = v.config?.max_frame_bytes;
      await assert.rejects(decode(bytes, fromServer, max), (e) => {
        assert.ok(e instanceof ChatError, `ChatError, got ${e}`);
        assert.equal(e.kind, v.error);
        return true;
      });
      return;
    }
    const [type, payload] = split(v.frame);
    const f = await decode(bytes, fromServer);
    assert.equal(f.type, type);
    assert.equal(f.rid, v.request_id);
    same(f.data, payload, type);
    if (v.canonical) {
      assert.equal(toHex(encode(type, payload, v.request_id)), v.hex, 'canonical re-encode');
    } else {
      // Compressed: our own encoding, plain and compressed, must decode to the same frame.
      const plain = encode(type, f.data, f.rid);
      for (const b of [plain, await compress(plain)]) {
        const again = await decode(b, fromServer);
        same(again.data, payload, type);
        assert.equal(again.rid, v.request_id);
      }
    }
    if (v.flattened) {
      assert.equal(f.flat.length, v.flattened.length);
      f.flat.forEach((inner, i) => {
        const [t, p] = split(v.flattened[i].frame);
        assert.equal(inner.type, t);
        assert.equal(inner.rid, v.flattened[i].request_id);
        same(inner.data, p, `flattened[${i}]`);
      });
    }
  });
}

test('parseExact keeps u64 values exact', () => {
  const v = parseExact('{"a":18446744073709551615,"b":[1,9007199254740993],"s":"x\\"12345678901234567"}');
  assert.equal(v.a, 18446744073709551615n);
  assert.equal(v.b[1], 9007199254740993n);
  assert.equal(v.s, 'x"12345678901234567');
});

test('varints: shortest form out, longer forms in, wider markers refused', async () => {
  const ack = (p) => decode(Uint8Array.from([0x41, 0, 0, 0, 0, 0, ...p]));
  const cases = [[0n, '00'], [250n, 'fa'], [251n, 'fbfb00'], [1000n, 'fbe803'], [65536n, 'fc00000100'], [1n << 32n, 'fd0000000001000000']];
  for (const [n, h] of cases) {
    assert.equal(toHex(encode('HeartbeatAck', { server_time_ms: n })).slice(12), h);
    assert.equal((await ack(hex(h))).data.server_time_ms, n);
  }
  assert.equal((await ack([0xfb, 5, 0])).data.server_time_ms, 5n); // longer form accepted
  await assert.rejects(ack([0xfe, ...new Array(16).fill(0)]), { kind: 'malformed_payload' });
  await assert.rejects(ack([0xff]), { kind: 'malformed_payload' });
  // u16 Error.code refuses FC; u32 retry_after_ms refuses FD.
  await assert.rejects(decode(hex('490000000000fc0100000000' + '00')), { kind: 'malformed_payload' });
  await assert.rejects(decode(hex('49000000000001fd010000000000000000')), { kind: 'malformed_payload' });
  assert.throws(() => encode('HeartbeatAck', { server_time_ms: 1n << 64n }), { kind: 'invalid_request' });
});

test('§6 limits are checked on encode', () => {
  const bad = (t, d) => assert.throws(() => encode(t, d, 1), { kind: 'invalid_request' }, JSON.stringify(d));
  const send = (o) => ({ room: 'r', client_msg_id: 'c', body: 'hi', attachments: [], ...o });
  const att = (o) => ({ url: 'https://x.example/a', name: '', mime: 'image/png', size: 1, ...o });
  bad('Join', { rooms: [] });
  bad('Join', { rooms: new Array(101).fill('r') });
  bad('Join', { rooms: ['r'.repeat(129)] });
  bad('Join', { rooms: [''] });
  bad('Join', { rooms: ['a\u0007b'] });
  bad('Join', { rooms: ['a\u200Bb'] });
  bad('Join', { rooms: ['a\u202Eb'] });
  encode('Join', { rooms: ['a\u200Db', 'é'.repeat(64)] }); // joiners allowed, 128 bytes allowed
  bad('Send', send({ body: '' }));
  bad('Send', send({ body: ' \u00A0\u3000\n' }));
  encode('Send', send({ body: '\u200B' })); // U+200B is not whitespace
  bad('Send', send({ body: 'a\u0000b' })); // no NUL in any text field
  bad('Send', send({ client_msg_id: 'c\u0000' }));
  bad('React', { room: 'r', message_id: 1, emoji: '\u0000', remove: false });
  encode('Send', send({ body: '', attachments: [att()] }));
  bad('Send', send({ body: 'x'.repeat(16385) }));
  bad('Send', send({ client_msg_id: '' }));
  bad('Send', send({ client_msg_id: 'x'.repeat(65) }));
  bad('Send', send({ attachments: new Array(11).fill(att()) }));
  bad('Send', send({ attachments: [att({ url: 'javascript:alert(1)' })] }));
  bad('Send', send({ attachments: [att({ url: 'https://x.example/a b' })] }));
  encode('Send', send({ attachments: [att({ url: 'HTTPS://X.EXAMPLE/' })] }));
  bad('Send', send({ attachments: [att({ name: 'n'.repeat(256) })] }));
  bad('Send', send({ attachments: [att({ mime: 'm'.repeat(128) })] }));
  bad('React', { room: 'r', message_id: 1, emoji: '', remove: false });
  bad('History', { room: 'r', before: null, limit: 101 });
  bad('Identify', { token: '', resume: null });
  bad('Identify', { token: 't'.repeat(4097), resume: null });
  assert.throws(() => encode('Join', { rooms: ['r'.repeat(100)] }, 1, 64), { kind: 'frame_too_large' });
});

test('a compressed frame inflates; a bomb stops at the cap', async () => {
  const { deflateRawSync } = await import('node:zlib');
  const payload = encode('UserTyping', { room: 'general', user_id: 'u'.repeat(3000) }).subarray(6);
  const z = deflateRawSync(payload);
  const f = await decode(Uint8Array.from([0x61, 1, 0, 0, 0, 0, ...z]));
  assert.equal(f.data.user_id.length, 3000);
  // Within the frame cap, yet inflating past it.
  await assert.rejects(decode(Uint8Array.from([0x61, 1, 0, 0, 0, 0, ...z]), true, 2000), { kind: 'payload_too_large' });
  await assert.rejects(decode(Uint8Array.from([0x61, 1, 0, 0, 0, 0, ...z.subarray(0, z.length - 3)])), { kind: 'bad_compression' });
});

test('strings round-trip byte for byte, a leading BOM included', async () => {
  const body = '\uFEFFhi \u{1F44B}';
  const b = encode('UserTyping', { room: 'r', user_id: body });
  assert.equal((await decode(b)).data.user_id, body);
});

test('compress: payloads over 1,024 bytes go out deflated and flagged, only when smaller', async () => {
  const { inflateRawSync, deflateRawSync } = await import('node:zlib');
  // Send payload = room (2) + client_msg_id (2) + body (3 + n) + attachments (1) = n + 8 bytes.
  const send = (n, rid = 7) => encode('Send', { room: 'r', client_msg_id: 'c', body: 'a'.repeat(n), attachments: [] }, rid);
  const at = send(1016);
  assert.equal(at.length - 6, 1024);
  assert.equal(await compress(at), at, 'a payload of exactly 1,024 bytes is left alone');
  const over = send(1017, 0x01020304);
  const z = await compress(over);
  assert.equal(z[1], 1, 'compressed flag');
  assert.deepEqual([...z.subarray(0, 6)], [5, 1, 4, 3, 2, 1], 'opcode and request id kept');
  assert.ok(z.length < over.length / 10, `${z.length} bytes`);
  // Raw DEFLATE, exactly the payload: what the gateway inflates.
  assert.deepEqual(inflateRawSync(z.subarray(6)), Buffer.from(over.subarray(6)));
  const back = await decode(z, false);
  assert.equal(back.rid, 0x01020304);
  assert.equal(back.data.body, 'a'.repeat(1017));

  // The largest legal Send inflates within the gateway's cap for a Send payload (41,042 bytes).
  const max = encode('Send', {
    room: 'r'.repeat(128), client_msg_id: 'c'.repeat(64), body: '\u{1F600}'.repeat(4096),
    attachments: new Array(10).fill({ url: `https://x.example/${'u'.repeat(2030)}`, name: 'n'.repeat(255), mime: 'm'.repeat(127), size: 2n ** 64n - 1n }),
  }, 1);
  assert.ok(max.length - 6 <= 41042, `${max.length - 6} bytes`);
  const zmax = await compress(max);
  assert.equal(zmax[1], 1);
  assert.equal((await decode(zmax, false, 41042 + 6)).data.body, '\u{1F600}'.repeat(4096));

  // Incompressible: deflate would not make it smaller, so it goes as it is.
  const noise = encode('Batch', { frames: [Uint8Array.from({ length: 3000 }, () => (Math.random() * 256) | 0)] });
  assert.ok(deflateRawSync(noise.subarray(6)).length >= noise.length - 6);
  assert.equal(await compress(noise), noise);
  // Already compressed: left alone.
  assert.equal(await compress(z), z);
});

test('compress without CompressionStream sends uncompressed', async () => {
  const d = Object.getOwnPropertyDescriptor(globalThis, 'CompressionStream');
  delete globalThis.CompressionStream;
  try {
    assert.equal(typeof CompressionStream, 'undefined');
    const big = encode('Send', { room: 'r', client_msg_id: 'c', body: 'a'.repeat(5000), attachments: [] }, 1);
    assert.equal(await compress(big), big);
  } finally {
    Object.defineProperty(globalThis, 'CompressionStream', d);
  }
  assert.equal(typeof CompressionStream, 'function');
});
