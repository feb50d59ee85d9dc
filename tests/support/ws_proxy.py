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

Usage: ws_proxy.py --port 8444 --target-port 8443 --cert F --key F --control FILE --log FILE
"""
import argparse
import json
import select
import socket
import ssl
import threading
import time
import urllib.parse
from email.utils import formatdate

MAX_HEAD = 16384
POLL_S = 0.2


def main():
    parser = argparse.ArgumentParser()
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
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk or len(head) > MAX_HEAD:
                    return
                head += chunk
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
            while mode() == "pass":
                ready = [s for s in peers if s.pending()]
                if not ready:
                    ready = select.select(list(peers), [], [], POLL_S)[0]
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except (OSError, ssl.SSLError, ValueError, IndexError):
            return
        finally:
            for sock in (conn, upstream):
                if sock is not None:
                    try:
                        sock.close()
                    except OSError:
                        pass

    server = socket.create_server(("127.0.0.1", args.port))
    while True:
        raw, _ = server.accept()
        threading.Thread(target=handle, args=(raw,), daemon=True).start()


if __name__ == "__main__":
    main()
