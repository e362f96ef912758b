#!/usr/bin/env python3
"""Hostile clients against one gateway, for measuring what they cost the
well-behaved ones (run `chatgate-loadtest latency` beside it).

Loopback only, bounded in count and time, stops by itself. Standard
library only. Floods, each from its own 127.0.0.x source addresses:

  silent     upgrades that never send Identify (held until closed)
  keepalive  HTTP keep-alive sockets asking GET /nope every 2 s
  heartbeat  identified connections sending Heartbeat frames flat out
  bomb       identified connections sending 1 KiB Sends that claim 1 MiB
  typing     one user's 5 connections typing flat out in one room
  churn      identifies resuming 1,000 made-up room names each, over and over

    python3 loadtest/flood.py --port 8080 --seconds 30 --sockets 2000
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import random
import socket
import struct
import threading
import time
import zlib

DEV_SECRET = "chatgate-dev-secret-not-for-production"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(secret: str, user: str) -> str:
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": user, "exp": int(time.time()) + 3600, "rooms": ["*"]}).encode())
    mac = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def varint(v: int) -> bytes:
    if v < 251:
        return bytes([v])
    if v <= 0xFFFF:
        return b"\xfb" + struct.pack("<H", v)
    if v <= 0xFFFFFFFF:
        return b"\xfc" + struct.pack("<I", v)
    return b"\xfd" + struct.pack("<Q", v)


def text(s: str) -> bytes:
    b = s.encode()
    return varint(len(b)) + b


def frame(op: int, rid: int, payload: bytes, compressed: bool = False) -> bytes:
    return bytes([op, 1 if compressed else 0]) + struct.pack("<I", rid) + payload


def ws_message(data: bytes) -> bytes:
    """One masked binary WebSocket frame (clients must mask)."""
    mask = os.urandom(4)
    n = len(data)
    if n < 126:
        head = bytes([0x82, 0x80 | n])
    elif n <= 0xFFFF:
        head = bytes([0x82, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([0x82, 0x80 | 127]) + struct.pack(">Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    return head + mask + masked


def connect(src: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((src, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def upgrade(s: socket.socket) -> bool:
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Protocol: chat.v1\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1024)
        if not chunk:
            return False
        head += chunk
    return head.startswith(b"HTTP/1.1 101")


def drain(s: socket.socket, stop: threading.Event) -> None:
    s.settimeout(0.5)
    while not stop.is_set():
        try:
            if not s.recv(65536):
                return
        except socket.timeout:
            continue
        except OSError:
            return


def identified(src: str, port: int, secret: str, user: str) -> socket.socket:
    s = connect(src, port)
    if not upgrade(s):
        raise OSError("upgrade refused")
    s.sendall(ws_message(frame(0x01, 1, text(token(secret, user)) + b"\x00")))
    return s


def silent(args, stop, counts):
    held = []
    for i in range(args.sockets):
        if stop.is_set():
            break
        try:
            s = connect(f"127.0.0.{10 + i % 8}", args.port)
            counts["silent_upgraded" if upgrade(s) else "silent_refused"] += 1
            held.append(s)
        except OSError:
            counts["silent_failed"] += 1
    stop.wait()
    for s in held:
        s.close()


def keepalive(args, stop, counts):
    socks = []
    for i in range(args.sockets // 4):
        try:
            socks.append(connect(f"127.0.0.{20 + i % 8}", args.port))
        except OSError:
            counts["keepalive_failed"] += 1
    while not stop.is_set():
        alive = []
        for s in socks:
            try:
                s.sendall(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
                s.settimeout(0.01)
                try:
                    s.recv(4096)
                except socket.timeout:
                    pass
                alive.append(s)
                counts["keepalive_requests"] += 1
            except OSError:
                counts["keepalive_closed"] += 1
                try:
                    alive.append(connect(f"127.0.0.{20 + random.randrange(8)}", args.port))
                except OSError:
                    pass
        socks = alive
        stop.wait(2)


def heartbeat(args, stop, counts):
    beat = ws_message(frame(0x02, 7, b""))
    s = identified("127.0.0.30", args.port, args.secret, f"hb-{random.random()}")
    threading.Thread(target=drain, args=(s, stop), daemon=True).start()
    burst = beat * 256
    while not stop.is_set():
        try:
            s.sendall(burst)
            counts["heartbeats_sent"] += 256
        except OSError:
            counts["heartbeat_closed"] += 1
            return


def bomb(args, stop, counts):
    body = "a" * (1 << 20)
    payload = text("public:flood") + text("c") + text(body) + b"\x00"
    z = zlib.compressobj(1, zlib.DEFLATED, -15)
    packed = z.compress(payload) + z.flush()
    msg = ws_message(frame(0x05, 9, packed, compressed=True))
    while not stop.is_set():
        try:
            s = identified("127.0.0.31", args.port, args.secret, f"bomb-{random.random()}")
            s.sendall(ws_message(frame(0x03, 2, varint(1) + text("public:flood"))))
            s.sendall(msg)
            counts["bombs_sent"] += 1
            s.close()
        except OSError:
            counts["bomb_failed"] += 1
            stop.wait(0.1)


def typing(args, stop, counts):
    tabs = []
    for _ in range(5):
        s = identified("127.0.0.32", args.port, args.secret, "typer")
        s.sendall(ws_message(frame(0x03, 2, varint(1) + text("public:flood"))))
        threading.Thread(target=drain, args=(s, stop), daemon=True).start()
        tabs.append(s)
    t = ws_message(frame(0x06, 0, text("public:flood")))
    while not stop.is_set():
        for s in tabs:
            try:
                s.sendall(t * 64)
                counts["typing_sent"] += 64
            except OSError:
                counts["typing_closed"] += 1
                return
        stop.wait(0.01)


def churn(args, stop, counts):
    """Resumes naming made-up open rooms: state the node must not keep."""
    while not stop.is_set():
        try:
            s = connect("127.0.0.33", args.port)
            if not upgrade(s):
                counts["churn_refused"] += 1
                s.close()
                continue
            tag = random.getrandbits(48)
            positions = b"".join(
                text(f"public:made-up-{tag}-{i}") + varint(1) + varint(0) for i in range(1000)
            )
            resume = b"\x01" + os.urandom(16) + varint(1000) + positions
            payload = text(token(args.secret, f"churn-{tag}")) + resume
            s.sendall(ws_message(frame(0x01, 1, payload)))
            s.settimeout(5)
            try:
                s.recv(65536)
            except OSError:
                pass
            counts["churn_identifies"] += 1
            s.close()
        except OSError:
            counts["churn_failed"] += 1
            stop.wait(0.1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--sockets", type=int, default=2000)
    p.add_argument("--secret", default=os.environ.get("CHAT_TOKEN_SECRET", DEV_SECRET))
    p.add_argument("--floods", default="silent,keepalive,heartbeat,bomb,typing")
    args = p.parse_args()
    stop = threading.Event()
    counts = {k: 0 for k in [
        "silent_upgraded", "silent_refused", "silent_failed", "keepalive_requests",
        "keepalive_closed", "keepalive_failed", "heartbeats_sent", "heartbeat_closed",
        "bombs_sent", "bomb_failed", "typing_sent", "typing_closed",
        "churn_identifies", "churn_refused", "churn_failed"]}
    floods = {"silent": silent, "keepalive": keepalive, "heartbeat": heartbeat, "bomb": bomb,
              "typing": typing, "churn": churn}
    threads = [threading.Thread(target=floods[f], args=(args, stop, counts), daemon=True)
               for f in args.floods.split(",")]
    for t in threads:
        t.start()
    time.sleep(args.seconds)
    stop.set()
    for t in threads:
        t.join(5)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
