// Large messages travel compressed both ways (PROTOCOL.md §3): a sender
// deflates a payload over 1 KiB (raw DEFLATE) when that makes it smaller
// and sets bit 0 of the frame's flags byte. The page's client compresses
// its Send with CompressionStream and the gateway inflates it; the gateway
// compresses the NewMessage and HistoryPage it sends and the other page
// inflates them with DecompressionStream. The test reads the raw frames
// from Chromium's side of the WebSocket to check that compressed frames
// were really used, in each direction.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { bodies, joinRoom, launch, openChat, pageServer, sendText, startGateway, stopGateway, uniq, waitForCount } from './harness.js';

const NEW_MESSAGE = 0x60;
const HISTORY_PAGE = 0x47;
const SEND = 0x05;
const COMPRESSED = 0x01;

let browser;
before(async () => {
  browser = await launch();
});
after(async () => {
  await browser?.close();
});

/** Collects the binary frames a page sends and receives: [{ dir, opcode, flags, size }]. */
function frames(page) {
  const all = [];
  page.on('websocket', (ws) => {
    const add = (dir) => (f) => {
      if (typeof f.payload != 'string') all.push({ dir, opcode: f.payload[0], flags: f.payload[1], size: f.payload.length });
    };
    ws.on('framesent', add('sent'));
    ws.on('framereceived', add('received'));
  });
  return all;
}

/** About 3 KB of text that differs per call, with multi-byte characters, compressing to well under 1 KiB. */
function bigBody(who) {
  const lines = [];
  for (let i = 1; i <= 40; i++) lines.push(`${who} line ${i}: grüße, ünïcödé and 🙂 — the quick brown fox jumps over the lazy dog.`);
  return `${uniq()}\n${lines.join('\n')}`;
}

test('a message over 1 KiB travels compressed: sent by the page, delivered by the gateway, and in history', { timeout: 60000 }, async (t) => {
  const g = await startGateway();
  const server = await pageServer(g);
  t.after(async () => {
    server.close();
    await stopGateway(g);
  });
  const room = `public:big-${uniq()}`;
  let fa, fb, fc;
  const a = await openChat(browser, server.url, `alice-${uniq()}`, { onPage: (p) => (fa = frames(p)) });
  const b = await openChat(browser, server.url, `bob-${uniq()}`, { onPage: (p) => (fb = frames(p)) });
  await joinRoom(a, room);
  await joinRoom(b, room);

  const fromA = bigBody('alice');
  const fromB = bigBody('bob');
  const bytes = Buffer.byteLength(fromA);
  assert.ok(bytes > 2048, `${bytes} bytes`);
  await sendText(a, fromA);
  await waitForCount(b, room, fromA.slice(0, 8), 1);
  await sendText(b, fromB);
  await waitForCount(a, room, fromB.slice(0, 8), 1);

  // Rendered exactly, every character, on both pages.
  assert.deepEqual(await bodies(a, room), [fromA, fromB]);
  assert.deepEqual(await bodies(b, room), [fromA, fromB]);

  // Each page received the other's message as one compressed NewMessage, far smaller than the text.
  for (const [f, name] of [[fb, 'bob'], [fa, 'alice']]) {
    const news = f.filter((x) => x.dir == 'received' && x.opcode == NEW_MESSAGE && x.size > 200);
    assert.equal(news.length, 1, `${name}: one large NewMessage`);
    assert.equal(news[0].flags & COMPRESSED, COMPRESSED, `${name}: the compressed flag is set`);
    assert.ok(news[0].size < bytes / 2, `${name}: ${news[0].size} bytes on the wire for ${bytes} bytes of text`);
  }
  // Each page sent its message as one compressed Send, far smaller than the text.
  for (const [f, name] of [[fa, 'alice'], [fb, 'bob']]) {
    const sends = f.filter((x) => x.dir == 'sent' && x.opcode == SEND);
    assert.equal(sends.length, 1, `${name}: one Send`);
    assert.equal(sends[0].flags & COMPRESSED, COMPRESSED, `${name}: the Send's compressed flag is set`);
    assert.ok(sends[0].size < bytes / 2, `${name}: ${sends[0].size} bytes sent for ${bytes} bytes of text`);
  }
  // Small frames stay uncompressed.
  for (const f of [fa, fb]) {
    const small = f.filter((x) => x.dir == 'sent' && x.opcode != SEND);
    assert.ok(small.length >= 2, 'Identify and Join sent');
    assert.ok(small.every((x) => (x.flags & COMPRESSED) == 0 && x.size < 1030), JSON.stringify(small));
  }

  // A page joining later loads both from history, in one compressed HistoryPage.
  const c = await openChat(browser, server.url, `carol-${uniq()}`, { onPage: (p) => (fc = frames(p)) });
  await joinRoom(c, room);
  assert.deepEqual(await bodies(c, room), [fromA, fromB]);
  const pages = fc.filter((x) => x.dir == 'received' && x.opcode == HISTORY_PAGE && x.size > 200);
  assert.equal(pages.length, 1);
  assert.equal(pages[0].flags & COMPRESSED, COMPRESSED);
  assert.ok(pages[0].size < bytes, `history page: ${pages[0].size} bytes on the wire for ${2 * bytes} bytes of text`);
});
