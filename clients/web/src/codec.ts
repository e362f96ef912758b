// The chat.v1 codec (proto-spec/PROTOCOL.md §2–§6), driven by one table of
// payload layouts so that encode and decode cannot drift apart, and so the
// bundle pays for the layout once instead of once per direction.

/** Decode failures, named exactly as the test vectors' `error` kinds (§11). */
export type CodecErrorKind =
  | 'truncated_header'
  | 'frame_too_large'
  | 'unknown_opcode'
  | 'reserved_flags'
  | 'bad_compression'
  | 'payload_too_large'
  | 'malformed_payload'
  | 'trailing_bytes'
  | 'nested_batch'
  | 'compressed_in_batch';

/**
 * Every failure the library reports. Codec kinds come from §11;
 * `invalid_request`: a §6 limit broken before sending (the server would
 * answer code 1); `server`: an Error frame (`code` from §7); `closed`: the
 * connection ended for good (`code` is the close code, §8); `timeout`: no
 * reply within the request timeout.
 */
export type ErrorKind = CodecErrorKind | 'invalid_request' | 'server' | 'closed' | 'timeout';

/** One error type, so callers switch on `kind` (and `code`) instead of classes. */
export class ChatError extends Error {
  constructor(
    /** What went wrong. */
    readonly kind: ErrorKind,
    message: string = kind,
    /** §7 error code (kind `server`) or §8 close code (kind `closed`); 0 otherwise. */
    readonly code = 0,
    /** Server hint (kind `server`): do not retry sooner than this. */
    readonly retryAfterMs = 0,
  ) {
    super(message);
  }
}

const fail = (k: ErrorKind, m?: string): never => {
  throw new ChatError(k, m);
};

// ---- Shared structs (§4.3) and payloads (§5), as decoded ----------------

/** Where a client is in one room's stream (§9.5). u64 fields are `bigint`. */
export interface RoomPosition { room: string; epoch: bigint; seq: bigint }
/** File metadata; the gateway never carries file bytes. */
export interface Attachment { url: string; name: string; mime: string; size: bigint }
/** What you pass to `send`: `size` may be a plain number. */
export interface AttachmentInput { url: string; name: string; mime: string; size: bigint | number }
/** Keyset-pagination position: send back what HistoryPage gave you. */
export interface Cursor { created_at_ms: bigint; message_id: bigint }
export interface ReactionCount { emoji: string; count: number }
/** A stored message. `sender_id` is the only identity; names are display hints. */
export interface Message {
  id: bigint; room: string; seq: bigint;
  sender_id: string; sender_name: string; sender_image: string;
  client_msg_id: string; body: string;
  attachments: Attachment[]; reactions: ReactionCount[]; created_at_ms: bigint;
}
export interface Resume { session_id: Uint8Array | ArrayLike<number>; positions: RoomPosition[] }
export interface RoomResume { room: string; recovered: boolean; replayed: number; epoch: bigint; seq: bigint }
export interface Ready {
  session_id: Uint8Array; user_id: string; user_name: string; rooms: RoomPosition[];
  heartbeat_interval_ms: number; heartbeat_timeout_ms: number; max_frame_bytes: number; resuming: boolean;
}
export interface MessageSent { room: string; message_id: bigint; epoch: bigint; seq: bigint; created_at_ms: bigint; duplicate: boolean }
export interface Reacted { room: string; message_id: bigint; epoch: bigint; seq: bigint }
export interface HistoryPage { room: string; messages: Message[]; next: Cursor | null }
export interface ErrorBody { code: number; retry_after_ms: number; message: string }
export interface NewMessage { epoch: bigint; message: Message }
export interface UserTyping { room: string; user_id: string }
export interface Reaction { room: string; epoch: bigint; seq: bigint; message_id: bigint; user_id: string; emoji: string; removed: boolean }

type Empty = Record<string, never>;
/** Client → server payloads (§5.1). u64 inputs may be numbers or bigints. */
export interface ClientFrames {
  Identify: { token: string; resume: Resume | null };
  Heartbeat: Empty;
  Join: { rooms: string[] };
  Leave: { rooms: string[] };
  Send: { room: string; client_msg_id: string; body: string; attachments: AttachmentInput[] };
  Typing: { room: string };
  React: { room: string; message_id: bigint | number; emoji: string; remove: boolean };
  History: { room: string; before: Cursor | null; limit: number };
}
/** Server → client payloads (§5.2, §5.3). */
export interface ServerFrames {
  Ready: Ready;
  HeartbeatAck: { server_time_ms: bigint };
  Joined: { rooms: RoomPosition[] };
  Left: { rooms: string[] };
  MessageSent: MessageSent;
  Reacted: Reacted;
  Ok: Empty;
  HistoryPage: HistoryPage;
  Resumed: { rooms: RoomResume[] };
  Error: ErrorBody;
  NewMessage: NewMessage;
  UserTyping: UserTyping;
  Reaction: Reaction;
  Batch: { frames: Uint8Array[] };
}
export type AllFrames = ClientFrames & ServerFrames;
export type FrameName = keyof AllFrames;
/**
 * A decoded frame: `type` is the §5 name, `rid` the request id, `data` the
 * payload with the spec's own field names (so §5 is its documentation).
 * A Batch also carries `flat`, its inner frames in delivery order.
 */
export type Frame<K extends FrameName = FrameName> = K extends FrameName
  ? { type: K; rid: number; data: AllFrames[K]; flat?: Frame[] }
  : never;

// ---- Layout table -------------------------------------------------------
// Field types: S string, Y bytes, X bytes16, O bool, 2/4/8 varint u16/u32/u64,
// *T seq<T>, ?T option<T>, capital letters below: structs.
const STRUCTS: Record<string, string> = {
  P: 'room:S epoch:8 seq:8',
  A: 'url:S name:S mime:S size:8',
  C: 'created_at_ms:8 message_id:8',
  E: 'emoji:S count:4',
  M: 'id:8 room:S seq:8 sender_id:S sender_name:S sender_image:S client_msg_id:S body:S attachments:*A reactions:*E created_at_ms:8',
  U: 'session_id:X positions:*P',
  Q: 'room:S recovered:O replayed:4 epoch:8 seq:8',
};
const OPS: Record<number, string> = {
  1: 'Identify token:S resume:?U',
  2: 'Heartbeat',
  3: 'Join rooms:*S',
  4: 'Leave rooms:*S',
  5: 'Send room:S client_msg_id:S body:S attachments:*A',
  6: 'Typing room:S',
  7: 'React room:S message_id:8 emoji:S remove:O',
  8: 'History room:S before:?C limit:4',
  64: 'Ready session_id:X user_id:S user_name:S rooms:*P heartbeat_interval_ms:4 heartbeat_timeout_ms:4 max_frame_bytes:4 resuming:O',
  65: 'HeartbeatAck server_time_ms:8',
  66: 'Joined rooms:*P',
  67: 'Left rooms:*S',
  68: 'MessageSent room:S message_id:8 epoch:8 seq:8 created_at_ms:8 duplicate:O',
  69: 'Reacted room:S message_id:8 epoch:8 seq:8',
  70: 'Ok',
  71: 'HistoryPage room:S messages:*M next:?C',
  72: 'Resumed rooms:*Q',
  73: 'Error code:2 retry_after_ms:4 message:S',
  96: 'NewMessage epoch:8 message:M',
  97: 'UserTyping room:S user_id:S',
  98: 'Reaction room:S epoch:8 seq:8 message_id:8 user_id:S emoji:S removed:O',
  127: 'Batch frames:*Y',
};
const CODE: Record<string, number> = {};
for (const op in OPS) CODE[OPS[op].split(' ')[0]] = +op;
const fields = (d = '') => (d ? d.split(' ') : []).map((f) => f.split(':'));

// §6 limits a client checks before sending: byte lengths of strings,
// element counts of seqs, the value of `limit`.
const LIMITS: Record<string, number[]> = {
  room: [1, 128], client_msg_id: [1, 64], body: [0, 16384], url: [1, 2048], name: [0, 255],
  mime: [0, 127], emoji: [1, 64], token: [1, 4096], rooms: [1, 100], attachments: [0, 10],
  positions: [0, 1000], limit: [0, 100],
};
const BAD_ROOM = /[\p{Cc}\u061C\u200B\u200E\u200F\u202A-\u202E\u2060\u2066-\u2069\uFEFF]/u;

/** Default frame and decompressed-payload cap (§2): 1 MiB. */
export const MAX_FRAME = 1 << 20;
// ignoreBOM: keep a leading U+FEFF, bytes in, same bytes out.
const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
const enc = new TextEncoder();

/**
 * Encodes one frame. Client frames are checked against §6 first (a
 * `ChatError` of kind `invalid_request`), so a bad request fails here with
 * a reason instead of costing a round trip. Never compresses: pass the
 * result to {@link compress} for that (compression is async, this is not).
 * `max` caps the uncompressed frame.
 */
export function encode<K extends FrameName>(type: K, data: AllFrames[K], rid = 0, max = MAX_FRAME): Uint8Array {
  const op = CODE[type];
  const client = op < 64;
  const o = [op, 0, rid & 255, (rid >> 8) & 255, (rid >> 16) & 255, rid >>> 24];
  const bytes = (a: ArrayLike<number>) => {
    for (let i = 0; i < a.length; i++) o.push(a[i]);
  };
  const limit = (name: string, n: number) => {
    const l = client && LIMITS[name];
    if (l && (n < l[0] || n > l[1])) fail('invalid_request', `${name}: ${n} outside ${l[0]}..${l[1]}`);
  };
  const int = (x: bigint | number, w: number) => {
    const v = BigInt(x);
    if (v < 0n || v >> BigInt(8 * w)) fail('invalid_request', 'integer out of range');
    const k = v < 251n ? 0 : v < 65536n ? 2 : v >> 32n ? 8 : 4;
    if (k) o.push(k > 4 ? 253 : 250 + k / 2);
    for (let i = 0; i < (k || 1); i++) o.push(Number((v >> BigInt(8 * i)) & 255n));
  };
  const put = (t: string, v: any, name: string): void => {
    const c = t[0], r = t.slice(1);
    if (c == '*') {
      limit(name, v.length);
      int(v.length, 8);
      for (const x of v) put(r, x, name.replace(/s$/, ''));
    } else if (c == '?') {
      o.push(v == null ? 0 : 1);
      if (v != null) put(r, v, name);
    } else if (c == 'O') o.push(v ? 1 : 0);
    else if (c == 'S') {
      const b = enc.encode(v);
      limit(name, b.length);
      // §6: no text field holds a NUL (stores cannot keep one).
      if (client && (v.includes('\0') || (name == 'room' && BAD_ROOM.test(v)) || (name == 'url' && !/^https?:\/\/[^\p{White_Space}\p{Cc}]+$/iu.test(v))))
        fail('invalid_request', `${name}: not allowed`);
      int(b.length, 8);
      bytes(b);
    } else if (c == 'Y') {
      int(v.length, 8);
      bytes(v);
    } else if (c == 'X') v.length == 16 ? bytes(v) : fail('invalid_request', 'bytes16');
    else if (c < 'A') {
      limit(name, Number(v));
      int(v, +c);
    } else for (const [k, t2] of fields(STRUCTS[c])) put(t2, v[k], k);
  };
  for (const [k, t] of fields(OPS[op].slice(type.length + 1))) put(t, (data as any)[k], k);
  if (op == 5 && !(data as any).attachments.length && /^\p{White_Space}*$/u.test((data as any).body))
    fail('invalid_request', 'empty body');
  if (o.length > max) fail('frame_too_large');
  return new Uint8Array(o);
}

/** Reads one payload, consuming it exactly (§4.2). */
function read(u: Uint8Array, fs: string[][]): any {
  let p = 0;
  const dv = new DataView(u.buffer, u.byteOffset, u.byteLength);
  const need = (n: number | bigint) => (n > u.length - p ? fail('malformed_payload') : (p += Number(n)));
  const byte = () => u[need(1) - 1];
  const int = (w: number): any => {
    const m = byte();
    const k = 2 << (m - 251); // FB→2, FC→4, FD→8 bytes; FE, FF wider than any field
    if (m > 250 && k > w) fail('malformed_payload');
    const x = m < 251 ? m : k == 2 ? dv.getUint16(need(2) - 2, true) : k == 4 ? dv.getUint32(need(4) - 4, true) : dv.getBigUint64(need(8) - 8, true);
    return w > 4 ? BigInt(x) : x;
  };
  // A length or count is checked against what is left before anything is
  // allocated: every element takes at least one byte.
  const len = () => {
    const n = int(8);
    need(n);
    p -= Number(n);
    return Number(n);
  };
  const bool = () => {
    const b = byte();
    return b > 1 ? fail('malformed_payload') : b;
  };
  const val = (t: string): any => {
    const c = t[0], r = t.slice(1);
    if (c == '*') {
      const a = [];
      for (let n = len(); n--; ) a.push(val(r));
      return a;
    }
    if (c == '?') return bool() ? val(r) : null;
    if (c == 'O') return !!bool();
    if (c == 'S' || c == 'Y' || c == 'X') {
      const n = c == 'X' ? 16 : len();
      const b = u.slice(need(n) - n, p);
      if (c != 'S') return b;
      try {
        return utf8.decode(b);
      } catch {
        fail('malformed_payload');
      }
    }
    if (c < 'A') return int(+c);
    return obj(fields(STRUCTS[c]));
  };
  const obj = (fs: string[][]) => {
    const o: any = {};
    for (const [k, t] of fs) o[k] = val(t);
    return o;
  };
  const o = obj(fs);
  if (p < u.length) fail('trailing_bytes');
  return o;
}

/** Header checks (§2), in the reference order: length, opcode, flags. */
function head(u: Uint8Array, server: boolean): number {
  if (u.length < 6) fail('truncated_header');
  if (!OPS[u[0]] || u[0] > 63 != server) fail('unknown_opcode');
  if (u[1] > 1) fail('reserved_flags');
  return u[1];
}

function body(u: Uint8Array, p: Uint8Array): Frame {
  const [type, ...fs] = OPS[u[0]].split(' ');
  const data = read(p, fs.map((f) => f.split(':')));
  const f: any = { type, rid: new DataView(u.buffer, u.byteOffset).getUint32(2, true), data };
  if (type == 'Batch') {
    // Members are whole, uncompressed, non-batch server frames (§5.3).
    for (const x of data.frames as Uint8Array[]) {
      head(x, true);
      if (x[0] == 127) fail('nested_batch');
      if (x[1]) fail('compressed_in_batch');
    }
    f.flat = data.frames.map((x: Uint8Array) => body(x, x.subarray(6)));
  }
  return f;
}

/**
 * Runs `b` through a (de)compression stream of the platform, reading chunk
 * by chunk and cancelling as soon as the output passes `cap` (§3: a 1 KiB
 * bomb must not become 1 MiB in memory first).
 */
async function flate(s: GenericTransformStream, b: Uint8Array, cap: number): Promise<Uint8Array> {
  const w = s.writable.getWriter();
  w.write(b).catch(() => {});
  w.close().catch(() => {});
  const r = s.readable.getReader();
  const parts: Uint8Array[] = [];
  let n = 0;
  for (;;) {
    let c;
    try {
      c = await r.read();
    } catch {
      return fail('bad_compression');
    }
    if (c.done) break;
    if ((n += c.value.length) > cap) {
      r.cancel().catch(() => {});
      fail('payload_too_large');
    }
    parts.push(c.value);
  }
  const out = new Uint8Array(n);
  n = 0;
  for (const x of parts) out.set(x, (n += x.length) - x.length);
  return out;
}

/**
 * Compresses an encoded frame for sending (§3): a payload over 1,024 bytes
 * is deflated (raw DEFLATE, the platform's `CompressionStream`) and flagged,
 * if that makes it smaller. Otherwise, or where the platform has no
 * `CompressionStream`, the frame comes back unchanged. Never throws.
 */
export async function compress(frame: Uint8Array): Promise<Uint8Array> {
  const n = frame.length - 6;
  if (n > 1024 && !frame[1] && typeof CompressionStream != 'undefined')
    try {
      const z = await flate(new CompressionStream('deflate-raw'), frame.subarray(6), n - 1);
      const o = new Uint8Array(6 + z.length);
      o.set(frame.subarray(0, 6));
      o.set(z, 6);
      o[1] = 1;
      return o;
    } catch {}
  return frame;
}

/**
 * Decodes one WebSocket message. `fromServer` picks the direction whose
 * opcodes are legal (§2); `max` is the frame cap, which also caps the
 * decompressed payload. Async because decompression is; everything else
 * resolves in the same tick. Throws `ChatError` with a §11 kind.
 */
export async function decode(input: ArrayBuffer | ArrayBufferView, fromServer = true, max = MAX_FRAME): Promise<Frame> {
  const u = ArrayBuffer.isView(input)
    ? new Uint8Array(input.buffer, input.byteOffset, input.byteLength)
    : new Uint8Array(input);
  if (u.length > max) fail('frame_too_large');
  const p = u.subarray(6);
  return body(u, head(u, fromServer) ? await flate(new DecompressionStream('deflate-raw'), p, max) : p);
}
