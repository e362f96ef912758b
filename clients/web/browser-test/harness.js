// Shared by the browser tests and scripts: gateway processes, headless
// Chromium, and helpers that drive and read the chat page.
//
// Every gateway is a child process on a 127.0.0.1 port chosen by the
// system (or the same port again for a restart), stopped by the PID it was
// started with. Chromium is Debian's (/usr/bin/chromium, override with
// CHROMIUM); playwright-core never downloads a browser of its own.
//
// CHATGATE_PAGE=disk serves the page from crates/gateway/web/ (or from
// CHATGATE_PAGE_DIR) through a small local server in front of the gateway
// instead of the copy compiled into the binary: for working on the page
// without rebuilding the gateway.
import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import WebSocket from 'ws';
import { ChatClient } from '../dist/chatgate.js';

const repo = (p) => fileURLToPath(new URL(`../../../${p}`, import.meta.url));
export const BIN = process.env.CHATGATE_BIN ?? repo('target/debug/chatgate');
export const WEB_DIR = repo('crates/gateway/web/');
export const DATABASE_URL = process.env.CHAT_TEST_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test';
export const FROM_DISK = process.env.CHATGATE_PAGE === 'disk';
const PAGE_DIR = process.env.CHATGATE_PAGE_DIR ?? WEB_DIR;

export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
];

const running = new Set();
process.on('exit', () => {
  for (const p of running) p.kill('SIGKILL'); // only processes this file started
});

/**
 * Starts a gateway and waits for its "listening" line. Request and message
 * budgets are raised (tests send fast) and heartbeats shortened (a dead
 * connection is noticed within 2.5 s).
 */
export async function startGateway({ port = 0, database = false, heartbeat = [1000, 1500], args = [], bin = BIN } = {}) {
  if (!existsSync(bin)) throw new Error(`gateway binary missing: ${bin} (cargo build -p chatgate-gateway)`);
  const argv = [
    '--listen', `127.0.0.1:${port}`,
    '--requests-per-second', '1000', '--request-burst', '1000',
    '--messages-per-minute', '100000',
    '--heartbeat-interval-ms', String(heartbeat[0]), '--heartbeat-timeout-ms', String(heartbeat[1]),
    ...(database ? ['--database-url', DATABASE_URL] : []),
    ...args,
  ];
  // A port just given up may take a moment to be free again.
  for (let attempt = 0; ; attempt++) {
    try {
      return await spawnGateway(bin, argv);
    } catch (e) {
      if (port === 0 || attempt >= 20) throw e;
      await sleep(250);
    }
  }
}

function spawnGateway(bin, argv) {
  return new Promise((resolve, reject) => {
    const proc = spawn(bin, argv, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, CHAT_LOG: 'warn' } });
    running.add(proc);
    let out = '';
    let err = '';
    const timer = setTimeout(() => (proc.kill('SIGKILL'), reject(new Error(`gateway not listening after 20 s: ${err}`))), 20000);
    proc.stderr.on('data', (d) => (err = (err + d).slice(-4000)));
    proc.stdout.on('data', (d) => {
      out += d;
      const m = /chatgate listening on http:\/\/(\S+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        const port = +m[1].split(':').pop();
        resolve({ proc, port, bin, argv, http: `http://127.0.0.1:${port}` });
      }
    });
    proc.on('error', (e) => (clearTimeout(timer), reject(e)));
    proc.on('exit', (code) => {
      running.delete(proc);
      clearTimeout(timer);
      reject(new Error(`gateway exited (${code}) before listening: ${err}`));
    });
  });
}

/** SIGTERM (the gateway drains: close 4000), SIGKILL after 10 s. */
export async function stopGateway(g) {
  if (!g || g.proc.exitCode !== null || g.proc.signalCode !== null) return;
  const exited = new Promise((r) => g.proc.once('exit', r));
  g.proc.kill('SIGTERM');
  const t = setTimeout(() => g.proc.kill('SIGKILL'), 10000);
  await exited;
  clearTimeout(t);
}

/** Starts the same gateway again on its port. */
export async function restartGateway(g) {
  await stopGateway(g);
  const argv = [...g.argv];
  argv[argv.indexOf('--listen') + 1] = `127.0.0.1:${g.port}`;
  const port = g.port;
  for (let attempt = 0; ; attempt++) {
    try {
      const n = await spawnGateway(g.bin, argv);
      if (n.port !== port) throw new Error(`restarted on ${n.port}, not ${port}`);
      return n;
    } catch (e) {
      if (attempt >= 20) throw e;
      await sleep(250);
    }
  }
}

/**
 * Where a browser opens the page: the gateway itself, or with
 * CHATGATE_PAGE=disk a local server that serves crates/gateway/web/ (with
 * the gateway's CSP) and forwards everything else, WebSocket included.
 * The returned object keeps working across restarts on the same port.
 */
export async function pageServer(g, { fromDisk = FROM_DISK } = {}) {
  if (!fromDisk) return { url: `${g.http}/`, close() {} };
  const types = { 'index.html': 'text/html', 'app.js': 'text/javascript', 'app.css': 'text/css' };
  const csp =
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; " +
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
  const server = http.createServer((req, res) => {
    const file = req.url === '/' ? 'index.html' : req.url.slice(1);
    if (types[file]) {
      res.writeHead(200, { 'content-type': types[file], 'content-security-policy': csp, 'cache-control': 'no-cache' });
      return res.end(readFileSync(PAGE_DIR + file));
    }
    const up = http.request({ host: '127.0.0.1', port: g.port, path: req.url, method: req.method, headers: req.headers }, (r) => {
      res.writeHead(r.statusCode, r.headers);
      r.pipe(res);
    });
    up.on('error', () => (res.writeHead(502), res.end()));
    req.pipe(up);
  });
  const sockets = new Set();
  server.on('upgrade', (req, sock, head) => {
    const up = net.connect(g.port, '127.0.0.1', () => {
      up.write(`${req.method} ${req.url} HTTP/1.1\r\n`);
      for (let i = 0; i < req.rawHeaders.length; i += 2) up.write(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`);
      up.write('\r\n');
      up.write(head);
      up.pipe(sock).pipe(up);
    });
    for (const s of [up, sock]) {
      s.setNoDelay(true); // no Nagle delay on small frames
      sockets.add(s);
      s.on('error', () => (up.destroy(), sock.destroy()));
      s.on('close', () => (sockets.delete(s), up.destroy(), sock.destroy()));
    }
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return {
    url: `http://127.0.0.1:${server.address().port}/`,
    close() {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

export function launch() {
  return chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', args: CHROMIUM_ARGS, timeout: 30000 });
}

/** A unique user or room suffix, so runs never meet each other's data (PostgreSQL keeps it). */
export const uniq = () => Math.random().toString(36).slice(2, 10);

/**
 * Opens the page in a fresh browser context (own storage, own network
 * emulation), signs in as `name` and waits until the session is ready with
 * the lobby shown. `onPage(page)` runs before the page loads (to listen to
 * its WebSockets from the start).
 */
export async function openChat(browser, url, name, { viewport = { width: 900, height: 700 }, onPage } = {}) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.on('pageerror', (e) => (page.errors ??= []).push(e));
  onPage?.(page);
  await page.goto(url);
  await page.fill('#name', name);
  await page.click('[data-testid=signin-button]');
  await page.waitForSelector('#state[data-state=ready]');
  await page.waitForSelector('.log[data-room="public:lobby"]:not([hidden])');
  return page;
}

/** Joins `room` with the page's join field and waits until its history is loaded. */
export async function joinRoom(page, room) {
  await page.fill('#join-room', room);
  await page.click('[data-testid=join-button]');
  await page.waitForSelector(`.log[data-room="${room}"]:not([hidden]):not([data-history=loading])`);
}

/** Sends `body` in the visible room by typing it and pressing Enter. */
export async function sendText(page, body) {
  await page.fill('#text', body);
  await page.press('#text', 'Enter');
}

/** The bodies shown in `room`, top to bottom. */
export function bodies(page, room) {
  return page.$$eval(`.log[data-room="${room}"] li.msg .body`, (els) => els.map((e) => e.textContent));
}

/** Waits until `room` shows `n` messages matching `prefix` (or more, which the caller's assertions catch). */
export async function waitForCount(page, room, prefix, n, timeout = 20000) {
  await page.waitForFunction(
    ([room, prefix, n]) =>
      [...document.querySelectorAll(`.log[data-room="${room}"] li.msg .body`)].filter((e) => e.textContent.startsWith(prefix))
        .length >= n,
    [room, prefix, n],
    { timeout },
  );
}

/** A Node client of the same library, signed in through the gateway's /dev/token. */
export async function nodeClient(g, name) {
  const token = async () => {
    const r = await fetch(`${g.http}/dev/token?name=${encodeURIComponent(name)}`);
    if (!r.ok) throw new Error(`dev token: HTTP ${r.status}`);
    return (await r.json()).token;
  };
  const c = new ChatClient({ url: `ws://127.0.0.1:${g.port}/ws`, token, WebSocket });
  await c.connect();
  return c;
}

/** Records the page's connection states (data-state of #state) as they change; read with `states(page)`. */
export async function recordStates(page) {
  await page.evaluate(() => {
    const el = document.getElementById('state');
    window.__states = [el.dataset.state];
    new MutationObserver(() => window.__states.push(el.dataset.state)).observe(el, { attributes: true, attributeFilter: ['data-state'] });
  });
}
export const states = (page) => page.evaluate(() => window.__states);
