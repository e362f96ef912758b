//! Server binary (accept loop, WebSocket + HTTP on one port, sessions, rooms, limits, metrics). Built in the single-node gateway step.
