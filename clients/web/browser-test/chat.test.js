// The chat page in headless Chromium against a real gateway: chatting,
// history paging, typing and reactions, refusals, markup in messages and a
// refused token. Each test starts its own gateway on a spare port.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import {
  FROM_DISK, WEB_DIR, bodies, joinRoom, launch, nodeClient, openChat, pageServer, sendText, startGateway, stopGateway, uniq, waitForCount,
} from './harness.js';

const LOBBY = 'public:lobby';
let browser;

before(async () => {
  browser = await launch();
});
after(async () => {
  await browser?.close();
});

/** A gateway for one test, stopped (and its page server closed) when the test ends. */
async function gateway(t, opts) {
  const g = await startGateway(opts);
  const server = await pageServer(g);
  t.after(async () => {
    server.close();
    await stopGateway(g);
  });
  return { g, url: server.url };
}

/** Records every data-status value each message of the page takes, by client id. */
function recordStatuses(page) {
  return page.evaluate(() => {
    window.__statuses = {};
    const seen = (li) => (window.__statuses[li.dataset.cid] ??= []);
    new MutationObserver((records) => {
      for (const r of records) {
        const nodes = r.type == 'attributes' ? [r.target] : [...r.addedNodes];
        for (const n of nodes) {
          if (!(n instanceof HTMLElement) || !n.matches('li.msg') || !n.dataset.status) continue;
          const list = seen(n);
          if (list.at(-1) != n.dataset.status) list.push(n.dataset.status);
        }
      }
    }).observe(document.getElementById('logs'), { subtree: true, childList: true, attributes: true, attributeFilter: ['data-status'] });
  });
}

test('the gateway serves the committed page build with its CSP', { timeout: 30000 }, async (t) => {
  const g = await startGateway();
  t.after(() => stopGateway(g));
  const index = await fetch(`${g.http}/`);
  const csp = index.headers.get('content-security-policy');
  assert.match(csp, /script-src 'self'/);
  assert.doesNotMatch(csp, /unsafe-inline/);
  for (const [path, file, type] of [
    ['/', 'index.html', 'text/html'],
    ['/app.js', 'app.js', 'text/javascript'],
    ['/app.css', 'app.css', 'text/css'],
  ]) {
    const r = await fetch(g.http + path);
    assert.equal(r.status, 200, path);
    assert.ok(r.headers.get('content-type').startsWith(type), path);
    const served = Buffer.from(await r.arrayBuffer());
    if (FROM_DISK) continue; // the page under test comes from disk; the binary's copy may be older
    assert.ok(
      served.equals(readFileSync(WEB_DIR + file)),
      `${path} differs from crates/gateway/web/${file}: the binary predates the page build (cargo build -p chatgate-gateway)`,
    );
  }
  assert.equal((await fetch(`${g.http}/dev/token?name=`)).status, 400);
  const tok = await (await fetch(`${g.http}/dev/token?name=ada`)).json();
  assert.equal(tok.user, 'ada');
});

test('two pages chat: pending then sent, no echo; a page outside the room sees nothing', { timeout: 60000 }, async (t) => {
  const { url } = await gateway(t);
  const room = `public:a-${uniq()}`;
  const alice = `alice-${uniq()}`;
  const bob = `bob-${uniq()}`;
  const a = await openChat(browser, url, alice);
  const b = await openChat(browser, url, bob);
  const c = await openChat(browser, url, `carol-${uniq()}`);
  await joinRoom(a, room);
  await joinRoom(b, room);
  await recordStatuses(a);

  const hello = `hello bob ${uniq()}`;
  await sendText(a, hello);
  await waitForCount(b, room, hello, 1);
  await a.waitForSelector(`.log[data-room="${room}"] li.msg[data-status=sent]`);
  const reply = `hi alice ${uniq()}`;
  await sendText(b, reply);
  await waitForCount(a, room, reply, 1);
  await a.waitForTimeout(500); // room for a late echo, if there were one

  assert.deepEqual(await bodies(a, room), [hello, reply]);
  assert.deepEqual(await bodies(b, room), [hello, reply]);
  const own = a.locator(`.log[data-room="${room}"] li.msg.own`);
  assert.equal(await own.count(), 1, 'own message shown once, from the ack');
  const cid = await own.getAttribute('data-cid');
  assert.deepEqual((await a.evaluate(() => window.__statuses))[cid], ['pending', 'sent']);
  // The ack gave the same stored id the other page received.
  const idAtA = await own.getAttribute('data-id');
  assert.ok(idAtA);
  assert.equal(await b.locator(`.log[data-room="${room}"] li.msg[data-id="${idAtA}"]`).count(), 1);
  assert.equal(await a.locator(`.log[data-room="${room}"] li.msg[data-sender="${bob}"] [data-testid=sender]`).textContent(), bob);
  assert.equal(await b.locator(`.log[data-room="${room}"] li.msg[data-sender="${alice}"] time`).count(), 1);

  // Carol is in the lobby only: nothing of the room reaches her page.
  const html = await c.content();
  assert.ok(!html.includes(hello) && !html.includes(reply) && !html.includes(room));
  assert.equal(await c.locator('li.msg').count(), 0);
  for (const p of [a, b, c]) assert.deepEqual(p.errors ?? [], []);
});

test('scrolling up loads three older pages of history, in order, without duplicates', { timeout: 60000 }, async (t) => {
  const { g, url } = await gateway(t);
  const room = `public:history-${uniq()}`;
  const seeder = await nodeClient(g, `seeder-${uniq()}`);
  t.after(() => seeder.close());
  await seeder.join([room]);
  const all = Array.from({ length: 160 }, (_, i) => `history ${String(i + 1).padStart(3, '0')}`);
  for (const body of all) await seeder.send(room, body);

  const p = await openChat(browser, url, `reader-${uniq()}`);
  await joinRoom(p, room);
  const log = p.locator(`.log[data-room="${room}"]`);
  const count = () => p.locator(`.log[data-room="${room}"] li.msg`).count();
  assert.equal(await count(), 50, 'the newest page first');
  assert.deepEqual(await bodies(p, room), all.slice(110));
  assert.equal(await log.getAttribute('data-history'), 'more');

  const seen = [50];
  for (let i = 0; i < 6 && (await log.getAttribute('data-history')) != 'complete'; i++) {
    const n = await count();
    const topId = await p.locator(`.log[data-room="${room}"] li.msg`).first().getAttribute('data-id');
    await log.evaluate((el) => (el.scrollTop = 0));
    await p.waitForFunction(
      ([room, n]) => {
        const el = document.querySelector(`.log[data-room="${room}"]`);
        return el.querySelectorAll('li.msg').length > n && el.dataset.history != 'loading';
      },
      [room, n],
    );
    seen.push(await count());
    // The message that was on top stays where the reader looked: older ones went above it.
    const offset = await p.evaluate(
      ([room, id]) => {
        const log = document.querySelector(`.log[data-room="${room}"]`);
        const el = log.querySelector(`li.msg[data-id="${id}"]`);
        return { top: el.getBoundingClientRect().top - log.getBoundingClientRect().top, scrollTop: log.scrollTop };
      },
      [room, topId],
    );
    assert.ok(offset.scrollTop > 0 && Math.abs(offset.top) < 60, `scroll position kept: ${JSON.stringify(offset)}`);
  }
  assert.deepEqual(seen, [50, 100, 150, 160]);
  assert.equal(await log.getAttribute('data-history'), 'complete');
  assert.deepEqual(await bodies(p, room), all, 'every message once, oldest first');
  const ids = await p.$$eval(`.log[data-room="${room}"] li.msg`, (els) => els.map((e) => e.dataset.id));
  assert.equal(new Set(ids).size, 160);
  assert.match(await p.locator(`.log[data-room="${room}"] [data-testid=history-head]`).textContent(), /beginning/);
});

test('typing shows and expires; reactions count on both pages; a refused join is shown', { timeout: 60000 }, async (t) => {
  const { url } = await gateway(t);
  const room = `public:react-${uniq()}`;
  const bob = `bob-${uniq()}`;
  const a = await openChat(browser, url, `alice-${uniq()}`);
  const b = await openChat(browser, url, bob);
  await joinRoom(a, room);
  await joinRoom(b, room);

  await b.fill('#text', 'thinking');
  await a.waitForSelector(`#typing:text("${bob} is typing…")`);
  await a.waitForFunction(() => document.getElementById('typing').textContent == '', null, { timeout: 8000 });

  await b.fill('#text', '');
  const body = `react to me ${uniq()}`;
  await sendText(b, body);
  await waitForCount(a, room, body, 1);
  const msgAt = (p) => p.locator(`.log[data-room="${room}"] li.msg`, { hasText: body });
  const chip = (p) => msgAt(p).locator('[data-testid=reaction][data-emoji="👍"]');
  await msgAt(a).hover();
  await msgAt(a).locator('[data-testid=react][data-emoji="👍"]').click();
  await b.waitForSelector(`.log[data-room="${room}"] [data-testid=reaction][data-emoji="👍"][data-count="1"]`);
  assert.equal(await chip(a).getAttribute('data-count'), '1');
  assert.equal(await chip(a).getAttribute('aria-pressed'), 'true');
  assert.equal(await chip(b).getAttribute('aria-pressed'), 'false');
  await chip(b).click(); // Bob adds his own
  // Each page shows a count once the gateway's event reached it, and the
  // two pages' events arrive in either order.
  const counted = (p, n) => p.waitForSelector(`.log[data-room="${room}"] [data-testid=reaction][data-emoji="👍"][data-count="${n}"]`);
  await counted(a, 2);
  await counted(b, 2);
  await chip(a).click(); // Alice takes hers back
  await counted(b, 1);
  await counted(a, 1);
  assert.equal(await chip(a).getAttribute('aria-pressed'), 'false');

  // A room that needs a grant: refused with forbidden, shown, not added.
  const team = `team:${uniq()}`;
  await a.fill('#join-room', team);
  await a.click('[data-testid=join-button]');
  const err = a.locator('[data-testid=error]', { hasText: team });
  await err.waitFor();
  assert.match(await err.textContent(), /forbidden/);
  assert.ok(await err.isVisible());
  assert.equal(await a.locator(`[data-testid=room][data-room="${team}"]`).count(), 0);
  assert.equal(await a.locator('#state').getAttribute('data-state'), 'ready');
});

test('markup in a message or a name is shown as text and never runs', { timeout: 60000 }, async (t) => {
  const { url } = await gateway(t);
  const room = `public:xss-${uniq()}`;
  const evil = `<img src=x onerror=alert(1)>`; // a valid name: 29 characters, no controls
  const body = `<img src=x onerror="window.__pwned=1;alert(2)"><script>window.__pwned=2;alert(3)</script><b>not bold</b> & &amp;`;
  const a = await openChat(browser, url, evil);
  const b = await openChat(browser, url, `bob-${uniq()}`);
  const dialogs = [];
  for (const p of [a, b]) p.on('dialog', (d) => (dialogs.push(d.message()), d.dismiss()));
  await joinRoom(a, room);
  await joinRoom(b, room);
  await sendText(a, body);
  await waitForCount(b, room, '<img', 1);
  await b.waitForTimeout(500); // an onerror would have fired by now

  for (const p of [a, b]) {
    assert.deepEqual(await bodies(p, room), [body]);
    const log = `.log[data-room="${room}"]`;
    assert.equal(await p.locator(`${log} img, ${log} script, ${log} b`).count(), 0, 'no element was created from the text');
    assert.equal(await p.locator(`${log} [data-testid=sender]`).textContent(), evil);
    assert.equal(await p.evaluate(() => window.__pwned), undefined);
  }
  assert.equal(await a.locator('#me').textContent(), evil);
  assert.deepEqual(dialogs, []);
});

test('a refused token is shown as an error and not retried in a loop', { timeout: 60000 }, async (t) => {
  const { url } = await gateway(t);
  const context = await browser.newContext();
  t.after(() => context.close());
  const p = await context.newPage();
  await p.route('**/dev/token?*', (route) =>
    route.fulfill({ contentType: 'application/json', body: JSON.stringify({ token: 'eyJhbGciOiJIUzI1NiJ9.e30.bad', user: 'x' }) }),
  );
  let sockets = 0;
  p.on('websocket', () => sockets++);
  await p.goto(url);
  await p.fill('#name', `mallory-${uniq()}`);
  await p.click('[data-testid=signin-button]');
  const err = p.locator('[data-testid=error]', { hasText: '4100' });
  await err.waitFor({ timeout: 10000 });
  assert.ok(await err.isVisible());
  assert.match(await err.textContent(), /invalid token/i);
  await p.waitForTimeout(4000); // the client's backoff would have retried twice by now
  assert.equal(sockets, 1, 'one connection, no reconnect loop');
  assert.equal(await p.locator('#state').getAttribute('data-state'), 'closed');
  assert.ok(await p.locator('[data-testid=reconnect]').isVisible());
});
