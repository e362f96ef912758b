// Measures how long a message takes from the sender's page to the
// reader's screen: two Chromium pages on one gateway, page A sends N
// messages one after another (each once the previous one is acknowledged),
// and page B notes when each message's element enters its DOM. Both pages
// run in the same browser, so both read the same clock
// (performance.timeOrigin + performance.now()). Page B also notes when its
// WebSocket delivered the frame, which splits the time into the network
// path (browser, gateway, browser) and the page's own part (decoding and
// rendering).
//
//   node browser-test/latency.js [--count 1000]
//
// Uses target/release/chatgate when it exists, else target/debug/chatgate
// (CHATGATE_BIN overrides). Not a test: it prints p50, p99 and max.
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { BIN, WEB_DIR, joinRoom, launch, openChat, pageServer, startGateway, stopGateway, uniq } from './harness.js';

const args = process.argv.slice(2);
const COUNT = args.includes('--count') ? +args[args.indexOf('--count') + 1] : 1000;
const release = fileURLToPath(new URL('../../../target/release/chatgate', import.meta.url));
const bin = process.env.CHATGATE_BIN ?? (existsSync(release) ? release : BIN);

const g = await startGateway({ bin, heartbeat: [25000, 20000] });
// A binary built before the current page would serve an older page: serve the committed build then.
const served = Buffer.from(await (await fetch(`${g.http}/app.js`)).arrayBuffer());
const stale = !served.equals(readFileSync(`${WEB_DIR}app.js`));
const server = await pageServer(g, { fromDisk: stale });
const browser = await launch();
try {
  const room = `public:latency-${uniq()}`;
  const a = await openChat(browser, server.url, `sender-${uniq()}`);
  // Time of the last frame B's WebSocket delivered (the page's client uses the global WebSocket).
  const b = await openChat(browser, server.url, `reader-${uniq()}`, {
    onPage: (p) =>
      p.addInitScript(() => {
        const Native = window.WebSocket;
        window.WebSocket = class extends Native {
          constructor(...args) {
            super(...args);
            this.addEventListener('message', () => (window.__frameAt = performance.timeOrigin + performance.now()));
          }
        };
      }),
  });
  await joinRoom(a, room);
  await joinRoom(b, room);
  const now = () => performance.timeOrigin + performance.now();

  await b.evaluate(([room, now]) => {
    const clock = new Function(`return (${now})()`);
    window.__seen = new Map();
    new MutationObserver((records) => {
      const t = clock();
      for (const r of records) {
        for (const n of r.addedNodes) if (n.matches?.('li.msg')) window.__seen.set(n.querySelector('.body').textContent, [window.__frameAt, t]);
      }
    }).observe(document.querySelector(`.log[data-room="${room}"] ol`), { childList: true });
  }, [room, now.toString()]);

  const started = Date.now();
  const sentAt = await a.evaluate(
    async ([room, count, now]) => {
      const clock = new Function(`return (${now})()`);
      const text = document.getElementById('text');
      const form = document.getElementById('composer');
      const list = document.querySelector(`.log[data-room="${room}"] ol`);
      const acked = (n) =>
        new Promise((resolve) => {
          const done = () => list.querySelectorAll('li.msg.own[data-status=sent]').length >= n;
          if (done()) return resolve();
          const mo = new MutationObserver(() => done() && (mo.disconnect(), resolve()));
          mo.observe(list, { subtree: true, attributes: true, attributeFilter: ['data-status'] });
        });
      const out = {};
      for (let i = 1; i <= count; i++) {
        const body = `latency ${i}`;
        text.value = body;
        out[body] = clock();
        form.requestSubmit(); // the page's own send path, as the Enter key takes it
        await acked(i);
      }
      return out;
    },
    [room, COUNT, now.toString()],
  );
  await b.waitForFunction((n) => window.__seen.size >= n, COUNT, { timeout: 60000 });
  const seen = new Map(await b.evaluate(() => [...window.__seen]));
  const sorted = (f) => Object.entries(sentAt).map(([body, t]) => f(seen.get(body), t)).sort((x, y) => x - y);
  const ms = sorted(([, shown], t) => shown - t);
  const wire = sorted(([frame], t) => frame - t);
  const render = sorted(([frame, shown]) => shown - frame);
  if (ms.length != COUNT || ms.some((x) => !(x >= 0))) throw new Error('a message was not seen');
  const q = (p, xs = ms) => xs[Math.min(xs.length - 1, Math.ceil((p / 100) * xs.length) - 1)].toFixed(2);
  const kind = bin.includes('/release/') ? 'release' : 'debug';
  console.log(`command: node browser-test/latency.js --count ${COUNT}   (gateway: ${kind} build${stale ? ', page served from crates/gateway/web' : ''})`);
  console.log(`${COUNT} messages in ${((Date.now() - started) / 1000).toFixed(1)} s, send() to element in the other page's DOM:`);
  console.log(`p50 ${q(50)} ms   p99 ${q(99)} ms   max ${ms.at(-1).toFixed(2)} ms`);
  console.log(`  of which send() to B's WebSocket frame: p50 ${q(50, wire)} ms, p99 ${q(99, wire)} ms`);
  console.log(`  and frame to element (decode, render):  p50 ${q(50, render)} ms, p99 ${q(99, render)} ms`);
} finally {
  await browser.close();
  server.close();
  await stopGateway(g);
}
