// ChatClient: one session over one WebSocket at a time, kept alive across
// reconnects by resuming with per-room positions (PROTOCOL.md §9).
import {
  ChatError, compress, decode, encode, MAX_FRAME,
  type AttachmentInput, type ClientFrames, type Cursor, type ErrorBody, type Frame,
  type HistoryPage, type MessageSent, type NewMessage, type Reacted, type Reaction, type Ready,
  type RoomPosition, type RoomResume, type UserTyping,
} from './codec.js';

/**
 * `connecting`: before the first Ready. `ready`: a session is open.
 * `reconnecting`: it dropped and the client is getting it back (requests
 * queue meanwhile). `offline`: the browser says it has no network (its
 * `offline` event sets it at once; the `online` event reconnects at once).
 * `closed`: for good:
 * `close()`, or a close code that says not to reconnect (4100–4199; §8
 * decides by range, so a code a newer server adds is handled too).
 */
export type State = 'connecting' | 'ready' | 'reconnecting' | 'offline' | 'closed';

/** The events `on()` accepts and what each listener receives. */
export interface ClientEvents {
  /** A session opened: the first connect and every reconnect. */
  ready: Ready;
  /** A message from someone else (or another connection of this user), each exactly once, in order. */
  message: NewMessage;
  /** Someone is typing. Ephemeral: never replayed. */
  typing: UserTyping;
  /** A reaction was added or removed. */
  reaction: Reaction;
  /** The server took this connection out of rooms (unsolicited Left): drop them, do not rejoin on your own. */
  removed: { rooms: string[] };
  /** A resume finished. Rooms with `recovered: false` have a gap: reload their history. */
  resumed: { rooms: RoomResume[] };
  /** Events were skipped in a room (seq jumped from `after` to `next`): reload its history. */
  missed: { room: string; after: bigint; next: bigint };
  /** A room's stream was replaced (new epoch): reload its history; live events continue. */
  streamLost: { room: string; epoch: bigint; seq: bigint };
  /** An Error frame that answers no pending request (e.g. a Typing refused), or an undecodable frame. */
  error: ChatError;
  /** The connection state changed. */
  state: State;
  /** The client stopped for good; `code` is the close code (4107 carries the application's reason). */
  closed: { code: number; reason: string };
}

/**
 * A WebSocket constructor: the browser's, or e.g. the `ws` package's in
 * Node. Typed loosely so other implementations fit; the client uses
 * `binaryType`, `send`, `close` and the `on*` handler properties.
 */
export type WebSocketLike = new (url: string, protocols: string) => object;

export interface ClientOptions {
  /** `ws(s)://host:port/ws`. */
  url: string;
  /** The access token, or a function returning one; a function is called before every connect, so it can refresh. */
  token: string | (() => string | Promise<string>);
  /** WebSocket implementation; defaults to the global one. */
  WebSocket?: WebSocketLike;
  /** Reply timeout per request, and the limit for a connect to reach Ready. Default 15 s. */
  timeout?: number;
  /** First backoff step (default 1 s) and the largest (default 5 s); each delay is scaled by a random factor in [0.5, 1]. */
  minDelay?: number;
  maxDelay?: number;
}

// `w`: the socket the request was last written to.
interface Req { t: keyof ClientFrames; d: any; res: (v: any) => void; rej: (e: any) => void; tm?: any; n?: number; w?: WebSocket }

// Error codes not worth retrying unchanged (§7): invalid_request,
// not_in_room, not_found, too_many_rooms, forbidden. Anything else,
// unknown codes included, is treated as transient.
const FINAL_ERRORS = [1, 3, 4, 5, 9];
const g = globalThis as any;
const uuid = (): string =>
  g.crypto.randomUUID?.() ??
  Array.from(g.crypto.getRandomValues(new Uint8Array(16)), (b: number) => (b + 256).toString(16).slice(1)).join('');

/**
 * A chat session that survives disconnects: requests made while the
 * connection is down wait and go out after the next Ready; unanswered
 * Sends and Reacts are re-sent with the same ids, and the resume replays
 * what was missed, so nothing is lost or shown twice.
 */
export class ChatClient {
  /** Current connection state (read-only; watch the `state` event). */
  state: State = 'connecting';
  /** The last Ready: user id and name, heartbeat settings, limits. */
  session?: Ready;
  /** Position per room (epoch, seq), what a resume presents (§9.5). Read-only. */
  readonly positions = new Map<string, [bigint, bigint]>();

  private _o: ClientOptions;
  private _ws?: WebSocket;
  private _rid = 0;
  private _pend = new Map<number, Req>();
  private _ls: { [K in keyof ClientEvents]?: Set<(e: ClientEvents[K]) => void> } = {};
  private _q: Promise<void> = Promise.resolve();
  private _sq: Promise<unknown> = this._q;
  private _try = 0;
  private _hb: any;
  private _dead: any;
  private _rt: any;
  private _soon = 0;
  private _pr = 0;
  private _hid = false;
  private _run = false;
  private _wait: [(r: Ready) => void, (e: ChatError) => void][] = [];
  private _typ = new Map<string, number>();
  private _tt = new Map<string, any>();

  constructor(options: ClientOptions) {
    this._o = options;
  }

  /** Subscribes to an event; returns the function that unsubscribes. */
  on<K extends keyof ClientEvents>(type: K, fn: (e: ClientEvents[K]) => void): () => void {
    const s = ((this._ls[type] as Set<typeof fn>) ??= new Set());
    s.add(fn);
    return () => s.delete(fn);
  }

  /**
   * Opens the session; resolves at the first Ready. Rejects only when the
   * client stops for good (a 4100–4199 close or `close()`); transient
   * failures are retried with backoff meanwhile. After a final close it may
   * be called again (e.g. with a new token): the session resumes.
   */
  connect(): Promise<Ready> {
    const p = new Promise<Ready>((res, rej) => (this.state == 'ready' ? res(this.session!) : this._wait.push([res, rej])));
    if (!this._run) {
      this._run = true;
      this._set(this.session ? 'reconnecting' : 'connecting');
      this._listen('add');
      this._open();
    }
    return p;
  }

  /** Closes for good: pending requests reject with kind `closed`. */
  close(): void {
    const ws = this._ws;
    this._stop(1000, 'client closed');
    ws?.close(1000);
  }

  /** Joins rooms; resolves with the rooms newly joined and their positions. */
  join(rooms: string[]): Promise<{ rooms: RoomPosition[] }> {
    return this._req('Join', { rooms });
  }

  /** Leaves rooms (takes them off the user's room list). */
  leave(rooms: string[]): Promise<{ rooms: string[] }> {
    return this._req('Leave', { rooms });
  }

  /**
   * Sends a message; resolves once it is stored and published. The
   * idempotency key is fresh per call and kept across every retry; pass
   * your own `clientMsgId` to retry a send that rejected (e.g. on timeout)
   * without risking a second copy.
   */
  send(room: string, body: string, attachments: AttachmentInput[] = [], clientMsgId = uuid()): Promise<MessageSent> {
    clearTimeout(this._tt.get(room)); // the message ends the typing: no late Typing after it
    this._tt.delete(room);
    return this._req('Send', { room, client_msg_id: clientMsgId, body, attachments });
  }

  /** Adds (or with `remove`, removes) this user's reaction to a message. */
  react(room: string, messageId: bigint | number, emoji: string, remove = false): Promise<Reacted> {
    return this._req('React', { room, message_id: messageId, emoji, remove });
  }

  /**
   * Says the user is typing. Fire and forget, at most once per 3 s per
   * room (the indicator outlives that): a call within 3 s of the last
   * Typing sends one more when the 3 s are over (one, however many calls),
   * so typing that goes on is reported. Dropped while disconnected, a
   * late one too: a stale "typing" is worse than none. `send` to the room
   * cancels a late one.
   */
  typing(room: string): void {
    const wait = (this._typ.get(room) ?? -3e3) + 3e3 - Date.now();
    if (this.state != 'ready') return;
    if (wait <= 0) {
      this._send('Typing', { room });
      this._typ.set(room, Date.now());
    } else if (!this._tt.has(room))
      this._tt.set(room, setTimeout(() => (this._tt.delete(room), this.typing(room)), wait));
  }

  /** One page of history, newest first; pass `page.next` as `before` for older ones. */
  history(room: string, before: Cursor | null = null, limit = 50): Promise<HistoryPage> {
    return this._req('History', { room, before, limit });
  }

  // ---- internals ------------------------------------------------------

  private _emit<K extends keyof ClientEvents>(type: K, e: ClientEvents[K]) {
    this._ls[type]?.forEach((f) => {
      try {
        f(e);
      } catch (x) {
        // A listener's bug must not derail the session; report it apart.
        setTimeout(() => {
          throw x;
        });
      }
    });
  }

  private _set(s: State) {
    if (this.state != s) this._emit('state', (this.state = s));
  }

  private _req<K extends keyof ClientFrames>(t: K, d: ClientFrames[K]): Promise<any> {
    return new Promise((res, rej) => {
      if (this.state == 'closed') throw new ChatError('closed', 'client is closed');
      encode(t, d as any); // §6 checks now, while the caller still has the arguments
      const rid = this._id();
      const r: Req = { t, d, res, rej };
      this._pend.set(rid, r);
      if (this.state == 'ready') this._write(rid, r);
    });
  }

  private _id() {
    return (this._rid = (this._rid % 0xffffffff) + 1); // 1..2^32-1, never 0
  }

  /**
   * Encodes now (so §6 faults throw to the caller), compresses when large
   * (§3). Compression is async, so frames go out through one queue, in the
   * order they were made; a frame for a socket given up meanwhile is dropped
   * (unanswered requests are written again after the next Ready).
   */
  private _send<K extends keyof ClientFrames>(t: K, d: ClientFrames[K], rid = 0) {
    const ws = this._ws;
    const b = encode(t, d as any, rid, this.session?.max_frame_bytes ?? MAX_FRAME);
    this._sq = this._sq
      .then(() => compress(b))
      .then((z) => ws && ws == this._ws && ws.send(z as Uint8Array<ArrayBuffer>))
      .catch(() => {}); // a socket that cannot send is noticed by the heartbeat
  }

  /** Writes every pending request not yet written to the current socket. */
  private _flush() {
    for (const [id, r] of this._pend) if (r.w != this._ws) this._write(id, r);
  }

  private _write(rid: number, r: Req) {
    try {
      this._send(r.t, r.d, rid);
      r.w = this._ws;
    } catch (e) {
      this._pend.delete(rid);
      return r.rej(e);
    }
    r.tm = setTimeout(() => {
      this._pend.delete(rid);
      r.rej(new ChatError('timeout', `${r.t} got no reply`));
    }, this._o.timeout ?? 15e3);
  }

  private async _open() {
    this._rt = this._soon = 0;
    const o = this._o;
    let token: string;
    try {
      token = typeof o.token == 'string' ? o.token : await o.token();
    } catch {
      return this._lost(undefined, 1006, 'token unavailable');
    }
    if (this.state == 'closed') return;
    let ws: WebSocket;
    try {
      ws = this._ws = new (o.WebSocket ?? WebSocket)(o.url, 'chat.v1') as WebSocket;
    } catch (e: any) {
      return this._stop(1006, e.message); // a malformed URL: retrying cannot help
    }
    ws.binaryType = 'arraybuffer';
    // Reaching Ready counts as one request: if it takes longer, try again.
    this._dead = setTimeout(() => this._drop(ws, 'connect timed out'), o.timeout ?? 15e3);
    ws.onopen = () => {
      const sid = this.session?.session_id;
      const positions = [...this.positions].map(([room, [epoch, seq]]) => ({ room, epoch, seq }));
      try {
        this._send('Identify', { token, resume: sid ? { session_id: sid, positions } : null }, this._id());
      } catch (e: any) {
        this._lost(ws, 4100, e.message); // a token breaking §6 is refused like a bad one
        ws.close();
      }
    };
    ws.onmessage = (e) => {
      // Frames are handled strictly in arrival order, decompression or not.
      this._q = this._q.then(async () => {
        if (ws != this._ws) return;
        let f: Frame;
        try {
          f = await decode(e.data, true, this.session?.max_frame_bytes ?? MAX_FRAME);
        } catch (x: any) {
          this._emit('error', x instanceof ChatError ? x : new ChatError('malformed_payload', 'text frame'));
          return this._drop(ws, 'undecodable frame'); // the resume fills what was lost
        }
        if (ws == this._ws) for (const x of f.flat ?? [f]) this._frame(x);
      }).catch((x) => this._emit('error', x)); // keep the chain alive whatever happens
    };
    ws.onclose = (e) => this._lost(ws, e.code, e.reason);
    ws.onerror = () => {}; // a close event follows (and Node's `ws` throws on an unheard error)
  }

  /** Gives up on a socket now (dead, or unreadable) and reconnects; its close event is ignored. */
  private _drop(ws: WebSocket, why: string) {
    this._lost(ws, 1006, why);
    ws.close();
  }

  private _lost(ws: WebSocket | undefined, code: number, reason: string) {
    if (ws != this._ws || this.state == 'closed') return;
    this._ws = undefined;
    this._pr = 0;
    clearInterval(this._hb);
    clearTimeout(this._dead);
    this._dead = 0;
    for (const r of this._pend.values()) clearTimeout(r.tm);
    // §8: 4100–4199 mean retrying unchanged fails again; every other code
    // (4000–4099, 1000–1015 with 1006 for a dropped socket, and codes this
    // version does not define) means reconnect and resume.
    if (code >= 4100 && code <= 4199) return this._stop(code, reason);
    this._set(g.navigator?.onLine === false ? 'offline' : this.session ? 'reconnecting' : 'connecting');
    // 4000 (node draining) and 4005 (streams lost) mean come back at once,
    // with jitter only; everything else backs off exponentially. The
    // network back or the page visible during this attempt: try again now.
    const step = Math.min(this._o.maxDelay ?? 5e3, (this._o.minDelay ?? 1e3) * 2 ** this._try++);
    this._rt = setTimeout(
      () => this._open(),
      this._soon ? 0 : code == 4000 || code == 4005 ? Math.random() * 500 : step * (0.5 + Math.random() / 2),
    );
  }

  private _stop(code: number, reason: string) {
    this._ws = undefined;
    this._run = false;
    this._pr = 0;
    clearInterval(this._hb);
    clearTimeout(this._dead);
    clearTimeout(this._rt);
    this._tt.forEach(clearTimeout);
    this._tt.clear();
    this._listen('remove');
    const e = new ChatError('closed', reason || `closed (${code})`, code);
    for (const r of this._pend.values()) clearTimeout(r.tm), r.rej(e);
    this._pend.clear();
    this._set('closed');
    for (const w of this._wait.splice(0)) w[1](e);
    this._emit('closed', { code, reason });
  }

  private _listen(how: 'add' | 'remove') {
    for (const [t, e, f] of [[g.window, 'online', this._wake], [g.window, 'offline', this._off], [g.document, 'visibilitychange', this._vis]])
      t?.[how + 'EventListener'](e, f);
  }

  /**
   * Network back, or the tab visible again: probe a live socket; or give up
   * a socket that went quiet offline; or skip the backoff wait; or, while
   * an attempt is under way, try again at once should it fail.
   */
  private _wake = () => {
    if (this.state == 'ready') return this._beat();
    this._soon = 1;
    if (this._pr) this._drop(this._ws!, 'network changed');
    else if (this._rt) clearTimeout(this._rt), this._open();
  };

  /**
   * The browser says the network is gone: say `offline` now, and probe the
   * socket instead of closing it (a flaky network may still carry it): an
   * answer within the heartbeat timeout brings `ready` back on the same
   * socket; no answer, or the network coming back first, and it is replaced.
   * Requests wait meanwhile.
   */
  private _off = () => {
    if (this.state == 'ready') {
      const ws = this._ws!;
      clearTimeout(this._dead);
      this._dead = setTimeout(() => this._drop(ws, 'offline'), this.session!.heartbeat_timeout_ms);
      this._send('Heartbeat', {}, (this._pr = this._id()));
    }
    this._set('offline');
  };

  private _vis = () => {
    const hidden = g.document.visibilityState == 'hidden';
    if (this._hid && !hidden) this._wake();
    this._hid = hidden;
  };

  /** Heartbeat (§9.3): no HeartbeatAck within the timeout means the connection is dead. */
  private _beat() {
    const ws = this._ws!;
    this._send('Heartbeat', {});
    this._dead ||= setTimeout(() => this._drop(ws, 'heartbeat timeout'), this.session!.heartbeat_timeout_ms);
  }

  /**
   * Moves a room's position for a frame at (e, s) following §9.5; false
   * when the client already has it.
   */
  private _at(room: string, e: bigint, s: bigint): boolean {
    const p = this.positions.get(room);
    if (p && p[0] != e) {
      if (p[0]) this._emit('streamLost', { room, epoch: e, seq: s - 1n }); // epoch 0: position unknown
    } else if (p && s <= p[1]) return false;
    else if (p && s > p[1] + 1n) this._emit('missed', { room, after: p[1], next: s });
    this.positions.set(room, [e, s]);
    return true;
  }

  private _frame({ type, rid, data: d }: Frame) {
    const pos = this.positions;
    const req = rid ? this._pend.get(rid) : undefined;
    if (type == 'Ready') {
      clearTimeout(this._dead);
      this._dead = this._try = this._soon = 0;
      this.session = d;
      for (const r of d.rooms) pos.set(r.room, [r.epoch, r.seq]);
      this._hb = setInterval(() => this._beat(), d.heartbeat_interval_ms);
      this._set('ready');
      this._emit('ready', d);
      for (const w of this._wait.splice(0)) w[0](d);
      // Everything unanswered goes out again with its request id and, for
      // Sends, its client_msg_id: the server answers a repeat as a duplicate.
      return this._flush();
    }
    // While an offline probe is out, only its answer counts: an earlier
    // one may have been on its way before the network went.
    if (type == 'HeartbeatAck' && (!this._pr || rid == this._pr)) {
      clearTimeout(this._dead);
      this._dead = 0;
      if (this._pr) (this._pr = 0), this._set('ready'), this._flush();
    }
    if (type == 'Joined')
      for (const r of d.rooms) {
        // Events after the joined position may precede Joined (§9.5): never move back.
        const p = pos.get(r.room);
        if (!p || p[0] != r.epoch || p[1] < r.seq) pos.set(r.room, [r.epoch, r.seq]);
      }
    if (type == 'Left') {
      for (const r of d.rooms) pos.delete(r);
      if (!rid) this._emit('removed', d);
    }
    // A duplicate's ack and a no-op Reacted (seq 0) take no place in the stream.
    if ((type == 'MessageSent' && !d.duplicate && d.seq) || (type == 'Reacted' && d.seq)) this._at(d.room, d.epoch, d.seq);
    if (type == 'Resumed') {
      for (const r of d.rooms) pos.set(r.room, [r.epoch, r.seq]);
      this._emit('resumed', d);
    }
    if (type == 'NewMessage' && this._at(d.message.room, d.epoch, d.message.seq)) {
      const m = d.message;
      // Our own Send whose ack was lost comes back in the replay; its
      // re-sent Send resolves it, so it is not also shown as someone's message.
      let own = false;
      if (m.sender_id == this.session?.user_id) for (const r of this._pend.values()) own ||= r.d.client_msg_id == m.client_msg_id;
      if (!own) this._emit('message', d);
    }
    if (type == 'Reaction' && this._at(d.room, d.epoch, d.seq)) this._emit('reaction', d);
    if (type == 'UserTyping') this._emit('typing', d);
    if (type == 'Error') {
      const { code, retry_after_ms: ms, message }: ErrorBody = d;
      const e = new ChatError('server', message, code, ms);
      if (!req) return this._emit('error', e);
      clearTimeout(req.tm);
      // §7: transient failures are retried with the same request (for a
      // Send the same client_msg_id, so it is stored at most once).
      if (!FINAL_ERRORS.includes(code) && (req.n = (req.n ?? 0) + 1) < 5) {
        req.tm = setTimeout(() => this._pend.get(rid) == req && this._write(rid, req), Math.max(ms, 500 * 2 ** req.n));
        return;
      }
      this._pend.delete(rid);
      return req.rej(e);
    }
    if (req) {
      clearTimeout(req.tm);
      this._pend.delete(rid);
      req.res(d);
    }
  }
}
