#!/usr/bin/env python3
"""A TLS proxy in front of mosquitto's wss listener that reads every websocket upgrade.

Each upgrade is logged to --log as one JSON line
    {"t": epoch, "amz_date": "20261129T150000Z", "amz_expires": "86400",
     "access_key": "ASIA...", "action": "pass" | "cut" | "refuse403"}
and then handled as the control file says:
    pass          forward to the broker (also when the file is missing)
    cut           close every open connection, and close new ones after reading the upgrade
    refuse403 S   answer 403 Forbidden with a Date header S seconds off this machine's clock
                  (what IoT Core answers a device whose clock is off)

With --answer-broker-pings it reads the websocket frames both ways and answers the broker's
PING frames itself instead of passing them on: mosquitto's libwebsockets pings every client
every 300 s (its default validity policy), which IoT Core does not document doing (its idle
check is the MQTT keep-alive); the wire benchmark uses this to count what a device exchanges
with IoT Core, not with libwebsockets. Each answered ping is logged as {"t": ..., "broker_ping": true}.

Usage: ws_proxy.py [--host 127.0.0.1] --port 8444 --target-port 8443 --cert F --key F
       --control FILE --log FILE [--answer-broker-pings]
"""
import argparse
import json
import os
import select
import socket
import ssl
import threading
import time
import urllib.parse
from email.utils import formatdate

MAX_HEAD = 16384
POLL_S = 0.2
PING, PONG = 0x9, 0xA


def split_frames(data):
    """Complete websocket frames at the start of `data` as (bytes, opcode, payload), and the rest."""
    frames = []
    while len(data) >= 2:
        length, at = data[1] & 0x7F, 2
        if length == 126:
            if len(data) < 4:
                break
            length, at = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            if len(data) < 10:
                break
            length, at = int.from_bytes(data[2:10], "big"), 10
        key = data[at:at + 4] if data[1] & 0x80 else b""
        end = at + len(key) + length
        if len(data) < end:
            break
        payload = data[at + len(key):end]
        if key:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        frames.append((data[:end], data[0] & 0x0F, payload))
        data = data[end:]
    return frames, data


def read_head(sock):
    """An HTTP head from `sock` and whatever came after it, or None if it closed or sent too much."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk or len(data) > MAX_HEAD:
            return None
        data += chunk
    return data


def masked_pong(payload):
    """A client's PONG frame (clients mask every frame, RFC 6455 5.3); payloads are < 126 bytes."""
    key = os.urandom(4)
    return (bytes([0x80 | PONG, 0x80 | len(payload)]) + key
            + bytes(b ^ key[i % 4] for i, b in enumerate(payload)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--answer-broker-pings", action="store_true")
    for name in ("--port", "--target-port"):
        parser.add_argument(name, type=int, required=True)
    for name in ("--cert", "--key", "--control", "--log"):
        parser.add_argument(name, required=True)
    args = parser.parse_args()
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(args.cert, args.key)
    client_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_tls.check_hostname = False
    client_tls.verify_mode = ssl.CERT_NONE
    log_lock = threading.Lock()

    def mode():
        try:
            with open(args.control) as f:
                return f.read().strip() or "pass"
        except OSError:
            return "pass"

    def log(entry):
        with log_lock, open(args.log, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def handle(raw):
        try:
            conn = server_tls.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        upstream = None
        try:
            head = read_head(conn)
            if head is None:
                return
            target = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[1]
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
            first = lambda key: query.get(key, [None])[0]
            credential = first("X-Amz-Credential") or ""
            now = mode()
            log({"t": time.time(), "amz_date": first("X-Amz-Date"),
                 "amz_expires": first("X-Amz-Expires"),
                 "access_key": credential.split("/")[0], "action": now.split()[0]})
            if now.startswith("refuse403"):
                skew = float(now.split()[1])
                body = b"Forbidden"
                conn.sendall(
                    b"HTTP/1.1 403 Forbidden\r\nDate: "
                    + formatdate(time.time() + skew, usegmt=True).encode()
                    + b"\r\nContent-Type: text/plain\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
                return
            if now != "pass":
                return
            upstream = client_tls.wrap_socket(
                socket.create_connection(("127.0.0.1", args.target_port), timeout=10))
            upstream.settimeout(None)
            upstream.sendall(head)
            peers = {conn: upstream, upstream: conn}
            # With --answer-broker-pings the broker's upgrade answer is passed on, then only whole
            # frames, so that a PONG sent to the broker never lands inside one of the client's.
            partial = {conn: b"", upstream: b""}
            if args.answer_broker_pings:
                answer = read_head(upstream)
                if answer is None:
                    return
                answer, partial[upstream] = answer.split(b"\r\n\r\n", 1)
                conn.sendall(answer + b"\r\n\r\n")
            while mode() == "pass":
                ready = [s for s in peers if s.pending()]
                if not ready:
                    ready = select.select(list(peers), [], [], POLL_S)[0]
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if not args.answer_broker_pings:
                        peers[sock].sendall(data)
                        continue
                    frames, partial[sock] = split_frames(partial[sock] + data)
                    forward = b""
                    for raw, opcode, payload in frames:
                        if sock is upstream and opcode == PING:
                            upstream.sendall(masked_pong(payload))
                            log({"t": time.time(), "broker_ping": True})
                        else:
                            forward += raw
                    if forward:
                        peers[sock].sendall(forward)
        except (OSError, ssl.SSLError, ValueError, IndexError):
            return
        finally:
            for sock in (conn, upstream):
                if sock is not None:
                    try:
                        sock.close()
                    except OSError:
                        pass

    server = socket.create_server((args.host, args.port))
    while True:
        raw, _ = server.accept()
        threading.Thread(target=handle, args=(raw,), daemon=True).start()


if __name__ == "__main__":
    main()
