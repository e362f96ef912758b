// The chat page across a gateway restart and a network outage: every
// message shown exactly once, in order, and the connection state visible
// throughout. Each test starts its own gateway.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  bodies, joinRoom, launch, openChat, pageServer, recordStates, restartGateway, sendText, startGateway, states, stopGateway, uniq,
  waitForCount,
} from './harness.js';

let browser;
before(async () => {
  browser = await launch();
});
after(async () => {
  await browser?.close();
});

/** Every stored-status of the room's own messages on `page`. */
const ownStatuses = (page, room) =>
  page.$$eval(`.log[data-room="${room}"] li.msg.own`, (els) => els.map((e) => e.dataset.status));

/** Index of `want` in `list` at or after `from`; -1 when absent. */
const after_ = (list, want, from = 0) => list.indexOf(want, from);

/**
 * A gateway started with `options`, and two pages in a new room named
 * after `prefix`: `a` (the one that goes away; its states recorded and its
 * new WebSockets counted in `opened.count`) and `b` (the one that talks).
 */
async function awayAndTalker(t, options, prefix) {
  const g = await startGateway(options);
  const server = await pageServer(g);
  t.after(async () => {
    server.close();
    await stopGateway(g);
  });
  const room = `public:${prefix}-${uniq()}`;
  const a = await openChat(browser, server.url, `away-${uniq()}`);
  const b = await openChat(browser, server.url, `talker-${uniq()}`);
  await joinRoom(a, room);
  await joinRoom(b, room);
  await recordStates(a);
  const opened = { count: 0 };
  a.on('websocket', () => opened.count++);
  return { room, a, b, opened };
}

test('a gateway restart (SIGTERM, PostgreSQL keeps history) while one page keeps sending', { timeout: 90000 }, async (t) => {
  let g = await startGateway({ database: true });
  const server = await pageServer(g); // the same URL after the restart: same port
  t.after(async () => {
    server.close();
    await stopGateway(g);
  });
  const room = `public:restart-${uniq()}`;
  const a = await openChat(browser, server.url, `sender-${uniq()}`);
  const b = await openChat(browser, server.url, `reader-${uniq()}`);
  await joinRoom(a, room);
  await joinRoom(b, room);
  await recordStates(a);
  await recordStates(b);

  const tag = `r${uniq()}`;
  const sent = [];
  const send = async (i) => {
    const body = `${tag} #${String(i).padStart(2, '0')}`;
    sent.push(body);
    await sendText(a, body);
    await a.waitForTimeout(100);
  };
  let i = 0;
  while (i < 8) await send(++i); // before
  const restart = (async () => {
    g = await restartGateway(g); // SIGTERM: sessions closed with 4000, then the same port again
  })();
  // Keep sending while the gateway stops, is down, and comes back.
  while (i < 30) await send(++i);
  await restart;
  while (i < 40) await send(++i); // after

  await waitForCount(b, room, tag, sent.length, 30000);
  await a.waitForFunction(
    (room) => [...document.querySelectorAll(`.log[data-room="${room}"] li.msg.own`)].every((e) => e.dataset.status == 'sent'),
    room,
    { timeout: 20000 },
  );
  await b.waitForTimeout(500);
  const atB = (await bodies(b, room)).filter((x) => x.startsWith(tag));
  assert.deepEqual(atB, sent, 'every message exactly once, in order');
  const atA = (await bodies(a, room)).filter((x) => x.startsWith(tag));
  assert.deepEqual(atA, sent);
  assert.deepEqual(await ownStatuses(a, room), sent.map(() => 'sent'));
  const ids = await b.$$eval(`.log[data-room="${room}"] li.msg`, (els) => els.map((e) => e.dataset.id));
  assert.equal(new Set(ids).size, sent.length);

  const sa = await states(a);
  const r = after_(sa, 'reconnecting');
  assert.ok(r >= 0 && after_(sa, 'ready', r) > r, `sender went reconnecting, then ready: ${sa}`);
  assert.equal(await a.locator('#state').getAttribute('data-state'), 'ready');
  const sb = await states(b);
  assert.ok(after_(sb, 'ready', after_(sb, 'reconnecting')) > 0, `reader went reconnecting, then ready: ${sb}`);

  // History survived the restart: a new page loads all of it from PostgreSQL.
  const c = await openChat(browser, server.url, `late-${uniq()}`);
  await joinRoom(c, room);
  assert.deepEqual((await bodies(c, room)).filter((x) => x.startsWith(tag)), sent);
});

// Chromium's offline emulation does not close an open WebSocket: its frames
// are held in both directions and delivered when the network comes back
// (and `navigator.onLine` turns false, firing `offline`). Left at that, a
// short outage would only test that buffering. The page's client shows
// `offline` at the `offline` event and probes the socket with a heartbeat;
// the gateway here runs with a 1.5 s heartbeat timeout, so the unanswered
// probe gives the socket up after 1.5 s. Reconnect attempts fail while
// offline (new connections are refused by the emulation), and the `online`
// event makes it reconnect at once and resume, the replay bringing exactly
// what it missed. The test checks that this path was taken: a second
// WebSocket, and the states ready → offline → ready.
test('an offline page resumes and shows exactly the messages it missed', { timeout: 60000 }, async (t) => {
  const { room, a, b, opened } = await awayAndTalker(t, {}, 'offline');

  const tag = `o${uniq()}`;
  await sendText(b, `${tag} before`);
  await waitForCount(a, room, `${tag} before`, 1);

  await a.context().setOffline(true);
  const missed = [];
  const t0 = Date.now();
  for (let i = 1; i <= 10; i++) {
    const body = `${tag} missed ${String(i).padStart(2, '0')}`;
    missed.push(body);
    await sendText(b, body);
    await b.waitForTimeout(700);
  }
  await sendText(a, `${tag} written offline`); // queued: pending until the page is back
  await a.waitForTimeout(Math.max(0, 10000 - (Date.now() - t0)));
  assert.deepEqual((await bodies(a, room)).filter((x) => x.includes(' missed ')), [], 'nothing arrived while offline');
  assert.equal(await a.locator('#state').getAttribute('data-state'), 'offline');
  assert.equal(await a.locator(`.log[data-room="${room}"] li.msg.own`).getAttribute('data-status'), 'pending');

  await a.context().setOffline(false);
  await waitForCount(a, room, `${tag} missed`, missed.length, 15000);
  await a.waitForSelector(`.log[data-room="${room}"] li.msg.own[data-status=sent]`, { timeout: 15000 });
  await waitForCount(b, room, `${tag} written offline`, 1);
  await sendText(b, `${tag} after`);
  await waitForCount(a, room, `${tag} after`, 1);
  await a.waitForTimeout(300);

  assert.deepEqual(
    (await bodies(a, room)).filter((x) => x.startsWith(tag)),
    [`${tag} before`, ...missed, `${tag} written offline`, `${tag} after`],
  );
  assert.deepEqual((await bodies(b, room)).filter((x) => x == `${tag} written offline`), [`${tag} written offline`]);
  const sa = await states(a);
  const off = after_(sa, 'offline');
  assert.ok(off >= 0 && after_(sa, 'ready', off) > off, `ready → offline → ready: ${sa}`);
  assert.equal(opened.count, 1, 'one new WebSocket after the outage (the resume)');
});

// The same outage, but longer than the gateway's recovery window (1 s
// here): the resume cannot replay and answers `recovered = false`, so the
// page must load the gap from history. More than one history page (50)
// was missed, so it pages back until it meets what it already shows.
test('past the recovery window the page reloads the gap from history, without duplicates', { timeout: 60000 }, async (t) => {
  const { room, a, b } = await awayAndTalker(t, { args: ['--recovery-window-secs', '1'] }, 'gap');

  const tag = `g${uniq()}`;
  await sendText(b, `${tag} before`);
  await waitForCount(a, room, `${tag} before`, 1);
  await a.context().setOffline(true);
  const missed = [];
  for (let i = 1; i <= 70; i++) {
    const body = `${tag} missed ${String(i).padStart(2, '0')}`;
    missed.push(body);
    await sendText(b, body);
  }
  await waitForCount(b, room, `${tag} missed`, missed.length);
  await b.waitForFunction(
    (room) => [...document.querySelectorAll(`.log[data-room="${room}"] li.msg.own`)].every((e) => e.dataset.status == 'sent'),
    room,
  );
  await a.waitForFunction(() => document.getElementById('state').dataset.state == 'offline', null, { timeout: 10000 });
  await a.waitForTimeout(2500); // the missed events age out of the recovery window
  await a.context().setOffline(false);

  await waitForCount(a, room, `${tag} missed`, missed.length, 20000);
  await sendText(b, `${tag} after`);
  await waitForCount(a, room, `${tag} after`, 1);
  await a.waitForTimeout(300);
  assert.deepEqual((await bodies(a, room)).filter((x) => x.startsWith(tag)), [`${tag} before`, ...missed, `${tag} after`]);
  const ids = await a.$$eval(`.log[data-room="${room}"] li.msg`, (els) => els.map((e) => e.dataset.id));
  assert.equal(new Set(ids).size, ids.length, 'no message twice');
  const sa = await states(a);
  assert.ok(after_(sa, 'ready', after_(sa, 'offline')) > 0, `${sa}`);
});

// With the gateway's default-like heartbeats (20 s), a silent network would
// be noticed only after the interval plus the timeout. The `offline` event
// says it at once, and `online` brings the session back at once: the
// client gives up the socket its probe found quiet and resumes on a new one
// (or, should the held frames answer the probe first, keeps it).
test('offline shows at once and online recovers at once, without waiting for the heartbeat', { timeout: 60000 }, async (t) => {
  const { room, a, b, opened } = await awayAndTalker(t, { heartbeat: [20000, 20000] }, 'flaky');
  const tag = `f${uniq()}`;
  await sendText(b, `${tag} before`);
  await waitForCount(a, room, `${tag} before`, 1);

  await a.context().setOffline(true);
  await a.waitForFunction(() => document.getElementById('state').dataset.state == 'offline', null, { timeout: 2000 });
  const missed = [];
  for (let i = 1; i <= 3; i++) {
    missed.push(`${tag} missed ${i}`);
    await sendText(b, missed[i - 1]);
  }
  await sendText(a, `${tag} written offline`);
  await a.waitForTimeout(2000);
  assert.equal(await a.locator('#state').getAttribute('data-state'), 'offline');
  assert.deepEqual((await bodies(a, room)).filter((x) => x.includes(' missed ')), [], 'nothing arrived while offline');
  assert.equal(await a.locator(`.log[data-room="${room}"] li.msg.own`).getAttribute('data-status'), 'pending');

  await a.context().setOffline(false);
  const t0 = Date.now();
  await waitForCount(a, room, `${tag} missed`, missed.length, 5000);
  await a.waitForSelector(`.log[data-room="${room}"] li.msg.own[data-status=sent]`, { timeout: 5000 });
  await a.waitForFunction(() => document.getElementById('state').dataset.state == 'ready', null, { timeout: 5000 });
  const took = Date.now() - t0;
  assert.ok(took < 5000, `back after ${took} ms`);
  await waitForCount(b, room, `${tag} written offline`, 1);
  await a.waitForTimeout(300);
  assert.deepEqual((await bodies(a, room)).filter((x) => x.startsWith(tag)), [`${tag} before`, ...missed, `${tag} written offline`]);
  assert.deepEqual((await bodies(b, room)).filter((x) => x == `${tag} written offline`), [`${tag} written offline`]);
  const sa = await states(a);
  const off = after_(sa, 'offline');
  assert.ok(off >= 0 && after_(sa, 'ready', off) > off, `ready → offline → ready: ${sa}`);
  assert.ok(opened.count <= 1, `${opened.count} new WebSockets`);
  t.diagnostic(`offline → online: back in ${took} ms, ${opened.count} new WebSocket(s), states ${sa.join(' → ')}`);
});
