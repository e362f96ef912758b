// The chat page served by the gateway at `/`. It uses only the ChatClient
// library (../src); everything here is presentation: rooms, messages,
// history paging, typing, reactions, connection state and errors.
//
// Rules the page keeps:
// - User data reaches the DOM only as text (textContent, text nodes,
//   attribute values); never as markup.
// - A message is keyed by room + message id. Own messages are shown at
//   once as pending, keyed by their client_msg_id, and settle from the
//   acknowledgement (the server does not echo a message to the connection
//   that sent it), or from history if that brings them first.
// - Whenever the library reports a gap (resume not recovered, a missed
//   sequence number, a lost stream), the room's recent history is loaded
//   again and merged; the keys make that idempotent.
import { ChatClient, ChatError } from '../src/index.js';
import type { Cursor, Message, State } from '../src/index.js';

const DEFAULT_ROOMS = ['public:lobby', 'public:random'];
const EMOJI = ['👍', '❤️', '😂', '🎉'];
/** How long "X is typing…" stays without a new typing event (the server sends at most one per 2 s). */
const TYPING_MS = 5000;
/** Pages one gap reload may fetch before it settles for what it has. */
const MAX_GAP_PAGES = 20;
const NEAR = 48; // px from an edge that count as "at" it
const PENDING_AT = 1n << 64n; // pending messages sort after every stored one

interface Entry {
  el: HTMLLIElement;
  t: bigint; // created_at_ms (PENDING_AT while pending)
  n: bigint; // message id (a local counter while pending)
  id?: bigint;
  cid: string;
  counts: Map<string, number>;
  mine: Set<string>;
  chips: HTMLElement;
  time: HTMLTimeElement;
  status: HTMLElement;
}

interface Room {
  name: string;
  item: HTMLLIElement;
  badge: HTMLElement;
  log: HTMLDivElement;
  list: HTMLOListElement;
  head: HTMLElement;
  order: Entry[];
  byId: Map<string, Entry>;
  byCid: Map<string, Entry>; // own messages of this page, pending or settled
  older: Cursor | null; // cursor of the next older history page
  loaded: boolean;
  paging: boolean;
  reloading: boolean;
  again: boolean;
  stick: boolean;
  unread: number;
  typing: Map<string, number>;
  gone: boolean;
}

const $ = <T extends HTMLElement = HTMLElement>(id: string) => document.getElementById(id) as T;
const ui = {
  state: $('state'),
  reconnect: $<HTMLButtonElement>('reconnect'),
  me: $('me'),
  signout: $<HTMLButtonElement>('signout'),
  errors: $<HTMLUListElement>('errors'),
  signin: $('signin'),
  signinForm: $<HTMLFormElement>('signin-form'),
  name: $<HTMLInputElement>('name'),
  chat: $('chat'),
  roomList: $<HTMLUListElement>('room-list'),
  joinForm: $<HTMLFormElement>('join-form'),
  joinRoom: $<HTMLInputElement>('join-room'),
  title: $('room-title'),
  logs: $('logs'),
  typing: $('typing'),
  composer: $<HTMLFormElement>('composer'),
  text: $<HTMLTextAreaElement>('text'),
};

let chat: ChatClient | undefined;
let me = '';
let active: Room | undefined;
let localN = 0n;
const rooms = new Map<string, Room>();
const entryOf = new WeakMap<Element, Entry>();

/** Creates an element; string children become text nodes, never markup. */
function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string> = {},
  ...kids: (Node | string)[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k == 'class') el.className = v;
    else el.setAttribute(k, v);
  }
  el.append(...kids);
  return el;
}

const randomId = () =>
  Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, '0')).join('');

// ---- errors and state -------------------------------------------------

function showError(text: string) {
  const last = ui.errors.lastElementChild;
  if (last && last.firstChild?.textContent == text) return; // the same again: once is enough
  const close = h('button', { class: 'link', type: 'button', 'aria-label': 'Dismiss' }, '×');
  const li = h('li', { class: 'error', 'data-testid': 'error' }, h('span', {}, text), close);
  close.onclick = () => li.remove();
  ui.errors.append(li);
  while (ui.errors.children.length > 5) ui.errors.firstElementChild!.remove();
}

function describe(e: unknown): string {
  if (e instanceof ChatError) {
    if (e.kind == 'server' && e.code == 9) return 'not allowed (forbidden)';
    if (e.kind == 'server') return `${e.message} (error ${e.code})`;
    if (e.kind == 'closed') return `connection closed${e.code ? ` (${e.code})` : ''}: ${e.message}`;
    return `${e.message} (${e.kind})`;
  }
  return e instanceof Error ? e.message : String(e);
}

function setState(s: State | 'idle') {
  ui.state.dataset.state = s;
  ui.state.textContent = s == 'idle' ? 'not connected' : s;
  ui.reconnect.hidden = s != 'closed';
  document.body.dataset.state = s;
}

// ---- tokens --------------------------------------------------------------

/** A development token for `name`; Error with a readable message otherwise, `fatal` when retrying cannot help. */
async function fetchToken(name: string): Promise<string> {
  const r = await fetch(`/dev/token?name=${encodeURIComponent(name)}`, { cache: 'no-store' });
  if (r.ok) return (await r.json()).token;
  let why = `sign-in failed (HTTP ${r.status})`;
  if (r.status == 404) why = 'this gateway hands out no development tokens (it needs its development secret and a loopback listener)';
  else if (r.status == 400) why = (await r.json().catch(() => ({}))).error ?? why;
  throw Object.assign(new Error(why), { fatal: r.status >= 400 && r.status < 500 });
}

// ---- rooms -------------------------------------------------------------

function room(name: string): Room {
  let r = rooms.get(name);
  if (r) return r;
  const badge = h('span', { class: 'badge', 'data-testid': 'unread' });
  const button = h('button', { type: 'button' }, h('span', { class: 'room-name' }, name), badge);
  const item = h('li', { 'data-testid': 'room', 'data-room': name }, button);
  const head = h('li', { class: 'head', 'data-testid': 'history-head' });
  const list = h('ol', { class: 'messages', 'data-testid': 'messages' }, head);
  const log = h('div', { class: 'log', 'data-testid': 'log', 'data-room': name, 'data-history': 'loading', role: 'log' }, list);
  log.hidden = true;
  r = {
    name, item, badge, log, list, head, order: [], byId: new Map(), byCid: new Map(), older: null,
    loaded: false, paging: false, reloading: false, again: false, stick: true, unread: 0, typing: new Map(), gone: false,
  };
  const rr = r;
  button.onclick = () => select(rr);
  log.addEventListener('scroll', () => {
    rr.stick = log.scrollHeight - log.scrollTop - log.clientHeight < NEAR;
    if (log.scrollTop < NEAR) loadOlder(rr);
  });
  log.addEventListener('click', (ev) => onLogClick(rr, ev));
  rooms.set(name, r);
  ui.roomList.append(item);
  ui.logs.append(log);
  return r;
}

function select(r: Room) {
  if (active) active.log.hidden = true, active.item.classList.remove('active');
  active = r;
  r.item.classList.add('active');
  r.log.hidden = false;
  r.unread = 0;
  r.badge.textContent = '';
  ui.title.textContent = r.name;
  ui.composer.classList.toggle('disabled', r.gone);
  if (r.stick) r.log.scrollTop = r.log.scrollHeight;
  renderTyping();
  fill(r);
}

function markHistory(r: Room) {
  r.log.dataset.history = r.paging || !r.loaded ? 'loading' : r.older ? 'more' : 'complete';
  r.head.textContent = !r.loaded || r.older ? (r.paging ? 'Loading older messages…' : '') : `This is the beginning of ${r.name}.`;
}

/** Keeps what the reader looks at in place while `fn` adds messages: the bottom if they were there, else the first visible message. */
function keepScroll(r: Room, fn: () => void) {
  const log = r.log;
  let anchor: Entry | undefined;
  if (!r.stick && !log.hidden) {
    // The first message whose bottom is below the top of the view.
    let lo = 0;
    let hi = r.order.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      const el = r.order[mid].el;
      if (el.offsetTop + el.offsetHeight <= log.scrollTop) lo = mid + 1;
      else hi = mid;
    }
    anchor = r.order[lo];
  }
  const top = anchor?.el.offsetTop ?? 0;
  fn();
  if (r.stick) log.scrollTop = log.scrollHeight;
  else if (anchor?.el.isConnected) log.scrollTop += anchor.el.offsetTop - top;
}

/** Loads older pages while the visible room's messages do not fill its view (nothing to scroll yet). */
function fill(r: Room) {
  if (r == active && r.loaded && r.older && r.log.scrollHeight <= r.log.clientHeight + NEAR) loadOlder(r);
}

// ---- messages ----------------------------------------------------------

const before = (a: Entry, b: Entry) => a.t < b.t || (a.t == b.t && a.n < b.n);

/** Puts an entry at its place in time order (stored ones by time and id, pending ones last in send order). */
function place(r: Room, e: Entry) {
  const i = r.order.indexOf(e);
  if (i >= 0) r.order.splice(i, 1);
  let lo = 0;
  let hi = r.order.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (before(r.order[mid], e)) lo = mid + 1;
    else hi = mid;
  }
  r.order.splice(lo, 0, e);
  const next = r.order[lo + 1];
  if (next) r.list.insertBefore(e.el, next.el);
  else r.list.append(e.el);
}

function hue(id: string) {
  let x = 0;
  for (const c of id) x = (x * 31 + c.codePointAt(0)!) >>> 0;
  return `c${x % 8}`;
}

function setTime(e: Entry) {
  if (e.t == PENDING_AT) return;
  const d = new Date(Number(e.t));
  e.time.dateTime = d.toISOString();
  e.time.title = d.toLocaleString();
  const hm = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  const today = d.toDateString() == new Date().toDateString();
  e.time.textContent = today ? hm : `${d.toLocaleDateString([], { month: 'short', day: 'numeric' })}, ${hm}`;
}

function setStatus(e: Entry, s: 'pending' | 'sent' | 'failed') {
  e.el.dataset.status = s;
  e.status.textContent = s == 'pending' ? 'sending…' : s == 'failed' ? 'not sent' : '';
  e.status.title = s;
}

function makeEntry(r: Room, m: { sender_id: string; sender_name: string; body: string; cid: string }): Entry {
  const own = m.sender_id == me;
  const time = h('time', { 'data-testid': 'time' });
  const status = h('span', { class: 'status', 'data-testid': 'status' });
  const chips = h('div', { class: 'reactions', 'data-testid': 'reactions' });
  const picker = h('span', { class: 'picker' });
  for (const emoji of EMOJI) picker.append(h('button', { type: 'button', class: 'pick', 'data-testid': 'react', 'data-emoji': emoji, title: `React with ${emoji}` }, emoji));
  const name = m.sender_name || m.sender_id || 'system';
  const el = h(
    'li',
    { class: own ? 'msg own' : 'msg', 'data-testid': 'message', 'data-room': r.name, 'data-cid': m.cid, 'data-sender': m.sender_id },
    h('span', { class: `avatar ${hue(m.sender_id)}`, 'aria-hidden': 'true' }, [...name][0]?.toUpperCase() ?? '?'),
    h(
      'div',
      { class: 'main' },
      h('div', { class: 'meta' }, h('span', { class: 'who', 'data-testid': 'sender', title: m.sender_id }, name), time, status),
      h('p', { class: 'body', 'data-testid': 'body' }, m.body),
      h('div', { class: 'foot' }, chips, picker),
    ),
  );
  const e: Entry = { el, t: PENDING_AT, n: 0n, cid: m.cid, counts: new Map(), mine: new Set(), chips, time, status };
  entryOf.set(el, e);
  return e;
}

/** Gives an entry its stored identity (id, time) and moves it to its place. */
function settle(r: Room, e: Entry, id: bigint, t: bigint) {
  const key = String(id);
  const other = r.byId.get(key);
  if (other && other != e) {
    // Already shown (e.g. history brought it): keep that one.
    const i = r.order.indexOf(e);
    if (i >= 0) r.order.splice(i, 1);
    e.el.remove();
    return other;
  }
  e.id = id;
  e.t = t;
  e.n = id;
  e.el.dataset.id = key;
  r.byId.set(key, e);
  setTime(e);
  setStatus(e, 'sent');
  place(r, e);
  return e;
}

/** Adds a stored message unless it is shown already; history also refreshes reaction counts. Returns whether it was new. */
function upsert(r: Room, m: Message, fromHistory: boolean): boolean {
  let e = r.byId.get(String(m.id));
  const fresh = !e;
  if (!e && m.sender_id == me) {
    const own = r.byCid.get(m.client_msg_id);
    if (own) e = settle(r, own, m.id, m.created_at_ms); // our pending message, found stored before its ack
  }
  if (!e) {
    e = makeEntry(r, { sender_id: m.sender_id, sender_name: m.sender_name, body: m.body, cid: m.client_msg_id });
    settle(r, e, m.id, m.created_at_ms);
  }
  if (fromHistory || fresh) {
    e.counts = new Map(m.reactions.map((x) => [x.emoji, x.count]));
    renderChips(e);
  }
  return fresh;
}

function merge(r: Room, msgs: Message[]) {
  keepScroll(r, () => {
    for (const m of msgs) upsert(r, m, true);
  });
}

function send(r: Room, body: string, cid = randomId(), e?: Entry) {
  if (!chat) return;
  if (!e) {
    e = makeEntry(r, { sender_id: me, sender_name: chat.session?.user_name ?? me, body, cid });
    e.n = ++localN;
    r.byCid.set(cid, e);
    r.stick = true;
    keepScroll(r, () => place(r, e!));
  }
  const entry = e;
  setStatus(entry, 'pending');
  entry.el.querySelector('.retry')?.remove();
  chat.send(r.name, body, [], cid).then(
    (ack) => keepScroll(r, () => settle(r, entry, ack.message_id, ack.created_at_ms)),
    (err) => {
      if (entry.id !== undefined) return; // history showed it stored meanwhile
      setStatus(entry, 'failed');
      const retry = h('button', { type: 'button', class: 'link retry', 'data-testid': 'retry' }, 'retry');
      retry.onclick = () => send(r, body, cid, entry); // same id: stored at most once
      entry.status.after(retry);
      showError(`Message to ${r.name} not sent: ${describe(err)}`);
    },
  );
}

// ---- reactions -----------------------------------------------------------

function renderChips(e: Entry) {
  const chips: HTMLElement[] = [];
  for (const [emoji, n] of e.counts) {
    if (n <= 0) continue;
    chips.push(
      h(
        'button',
        { type: 'button', class: e.mine.has(emoji) ? 'chip mine' : 'chip', 'data-testid': 'reaction', 'data-emoji': emoji, 'data-count': String(n), 'aria-pressed': String(e.mine.has(emoji)) },
        `${emoji} `,
        h('span', { class: 'count' }, String(n)),
      ),
    );
  }
  e.chips.replaceChildren(...chips);
}

function bump(e: Entry, emoji: string, by: number) {
  e.counts.set(emoji, Math.max(0, (e.counts.get(emoji) ?? 0) + by));
  renderChips(e);
}

function react(r: Room, e: Entry, emoji: string) {
  if (!chat || e.id === undefined) return;
  const remove = e.mine.has(emoji);
  chat.react(r.name, e.id, emoji, remove).then(
    (ack) => {
      if (remove) e.mine.delete(emoji);
      else e.mine.add(emoji);
      if (ack.seq != 0n) bump(e, emoji, remove ? -1 : 1);
      else renderChips(e);
    },
    (err) => showError(`Reaction not saved: ${describe(err)}`),
  );
}

function onLogClick(r: Room, ev: Event) {
  const b = (ev.target as Element).closest('button[data-emoji]') as HTMLElement | null;
  const li = b?.closest('li.msg');
  const e = li && entryOf.get(li);
  if (b && e) react(r, e, b.dataset.emoji!);
}

// ---- typing ----------------------------------------------------------------

function renderTyping() {
  const now = Date.now();
  const who: string[] = [];
  if (active) for (const [u, until] of active.typing) until > now ? who.push(u) : active.typing.delete(u);
  ui.typing.textContent =
    who.length == 0 ? '' : who.length == 1 ? `${who[0]} is typing…` : who.length == 2 ? `${who[0]} and ${who[1]} are typing…` : `${who.length} people are typing…`;
}
setInterval(renderTyping, 1000);

// ---- history -------------------------------------------------------------

/**
 * Loads the newest history of a room and merges it. The first time it is
 * one page (older ones come on scroll); after a gap it pages back until it
 * meets a message already shown, so the gap is filled however long.
 */
async function reload(r: Room) {
  if (r.reloading) return void (r.again = true);
  r.reloading = true;
  try {
    do {
      r.again = false;
      let cursor: Cursor | null = null;
      for (let i = 0; i < MAX_GAP_PAGES; i++) {
        const c = chat;
        if (!c) return;
        const page = await c.history(r.name, cursor);
        if (c != chat) return;
        const overlaps = page.messages.some((m) => r.byId.has(String(m.id)));
        const first = !r.loaded || r.byId.size == 0;
        merge(r, page.messages);
        if (first) {
          r.older = page.next;
          r.loaded = true;
          break;
        }
        if (overlaps || !page.next) break;
        cursor = page.next;
      }
    } while (r.again);
  } catch (e) {
    showError(`Could not load the history of ${r.name}: ${describe(e)}`);
  } finally {
    r.reloading = false;
    markHistory(r);
    fill(r);
  }
}

async function loadOlder(r: Room) {
  const c = chat;
  if (!c || !r.loaded || !r.older || r.paging) return;
  r.paging = true;
  markHistory(r);
  try {
    const page = await c.history(r.name, r.older);
    if (c != chat) return;
    r.older = page.next;
    r.stick = false;
    merge(r, page.messages);
  } catch (e) {
    showError(`Could not load older messages of ${r.name}: ${describe(e)}`);
  } finally {
    r.paging = false;
    markHistory(r);
  }
  fill(r);
}

// ---- session ---------------------------------------------------------------

/** Shows a room the session is in and loads its history once. */
function enter(name: string) {
  const r = room(name);
  r.gone = false;
  r.item.classList.remove('gone');
  if (!r.loaded && !r.reloading) reload(r);
  if (!active) select(r);
  return r;
}

function start(name: string, first: string) {
  let token: string | undefined = first;
  const c = new ChatClient({
    url: `${location.protocol == 'https:' ? 'wss' : 'ws'}://${location.host}/ws`,
    // One fresh token per connect: they expire, and a resume may come hours later.
    token: async () => {
      const t = token;
      token = undefined;
      if (t) return t;
      try {
        return await fetchToken(name);
      } catch (e: any) {
        if (e.fatal && chat == c) showError(`Sign-in failed: ${e.message}`), c.close();
        throw e;
      }
    },
  });
  chat = c;
  c.on('state', (s) => chat == c && setState(s));
  let joined = false;
  c.on('ready', async (ready) => {
    me = ready.user_id;
    ui.me.textContent = ready.user_name == ready.user_id ? ready.user_id : `${ready.user_name} (${ready.user_id})`;
    for (const p of ready.rooms) enter(p.room);
    if (joined) return;
    // Once per sign-in; resumes keep the rooms. Rooms joined earlier come back in Ready.
    joined = true;
    for (const n of DEFAULT_ROOMS) room(n);
    try {
      await c.join(DEFAULT_ROOMS);
    } catch (e) {
      return showError(`Could not join ${DEFAULT_ROOMS.join(', ')}: ${describe(e)}`);
    }
    if (chat != c) return;
    for (const n of DEFAULT_ROOMS) enter(n);
    select(rooms.get(DEFAULT_ROOMS[0])!);
    ui.text.focus();
  });
  c.on('message', ({ message: m }) => {
    const r = room(m.room);
    let fresh = false;
    keepScroll(r, () => (fresh = upsert(r, m, false)));
    r.typing.delete(m.sender_id);
    if (r == active) renderTyping();
    else if (fresh) r.badge.textContent = String(++r.unread);
  });
  c.on('typing', ({ room: name, user_id }) => {
    if (user_id == me) return;
    room(name).typing.set(user_id, Date.now() + TYPING_MS);
    renderTyping();
  });
  c.on('reaction', (x) => {
    const e = rooms.get(x.room)?.byId.get(String(x.message_id));
    if (!e) return; // not loaded: history brings its counts
    if (x.user_id == me) x.removed ? e.mine.delete(x.emoji) : e.mine.add(x.emoji);
    bump(e, x.emoji, x.removed ? -1 : 1);
  });
  c.on('resumed', ({ rooms: rs }) => rs.forEach((x) => !x.recovered && reload(room(x.room))));
  c.on('missed', ({ room: name }) => reload(room(name)));
  c.on('streamLost', ({ room: name }) => reload(room(name)));
  c.on('removed', ({ rooms: rs }) => {
    for (const name of rs) {
      const r = room(name);
      r.gone = true;
      r.item.classList.add('gone');
      if (r == active) ui.composer.classList.add('disabled');
      showError(`You are no longer in ${name}.`);
    }
  });
  c.on('error', (e) => showError(describe(e)));
  c.on('closed', ({ code, reason }) => {
    if (chat != c || code == 1000) return;
    const hint = code == 4100 ? 'The sign-in was refused (invalid token). Sign in again.' : code == 4107 ? 'The session was ended.' : 'Not reconnecting.';
    showError(`Disconnected (${code}${reason ? `: ${reason}` : ''}). ${hint}`);
  });

  ui.signin.hidden = true;
  ui.chat.hidden = false;
  ui.signout.hidden = false;
  setState(c.state);
  c.connect().catch(() => {}); // a final close is reported by 'closed'
}

function signOut() {
  const c = chat;
  chat = undefined;
  c?.close();
  for (const r of rooms.values()) r.item.remove(), r.log.remove();
  rooms.clear();
  active = undefined;
  me = '';
  ui.me.textContent = '';
  ui.title.textContent = '';
  ui.typing.textContent = '';
  ui.errors.replaceChildren();
  ui.chat.hidden = true;
  ui.signout.hidden = true;
  ui.signin.hidden = false;
  setState('idle');
  ui.name.focus();
}

// ---- wiring ------------------------------------------------------------

ui.name.value = localStorage.getItem('chatgate.name') ?? '';

ui.signinForm.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const name = ui.name.value.trim();
  const button = ui.signinForm.querySelector('button')!;
  button.disabled = true;
  try {
    const token = await fetchToken(name);
    localStorage.setItem('chatgate.name', name);
    start(name, token);
  } catch (e) {
    showError(`Sign-in failed: ${describe(e)}`);
  } finally {
    button.disabled = false;
  }
});

ui.signout.onclick = signOut;
ui.reconnect.onclick = () => chat?.connect().catch(() => {});

ui.joinForm.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const c = chat;
  const name = ui.joinRoom.value.trim();
  if (!c || !name) return;
  try {
    await c.join([name]);
  } catch (e) {
    return showError(`Could not join ${name}: ${describe(e)}`);
  }
  if (c != chat) return;
  ui.joinRoom.value = '';
  select(enter(name));
});

ui.composer.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const body = ui.text.value;
  if (!active || active.gone || !body.trim()) return;
  send(active, body);
  ui.text.value = '';
});

ui.text.addEventListener('keydown', (ev) => {
  if (ev.key == 'Enter' && !ev.shiftKey && !ev.isComposing) ev.preventDefault(), ui.composer.requestSubmit();
});

ui.text.addEventListener('input', () => {
  if (chat && active && !active.gone && ui.text.value.trim()) chat.typing(active.name);
});

setState('idle');
