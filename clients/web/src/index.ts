/**
 * chatgate browser client (`chat.v1`).
 *
 * - {@link ChatClient}: what an application uses. It owns the reconnect
 *   and resume logic of PROTOCOL.md §9, because getting positions, re-sends
 *   and backoff right is where chat clients lose or duplicate messages.
 * - {@link encode} / {@link decode}: the bare codec, exported for tools,
 *   tests and anyone speaking the protocol over another transport.
 *
 * No runtime dependencies: WebSocket, (De)CompressionStream, TextEncoder
 * and crypto are the platform's (in Node, pass the `ws` package's WebSocket).
 * @packageDocumentation
 */
export { ChatClient } from './client.js';
export type { ClientEvents, ClientOptions, State, WebSocketLike } from './client.js';
export { ChatError, compress, decode, encode, MAX_FRAME } from './codec.js';
export type * from './codec.js';
