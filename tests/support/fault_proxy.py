#!/usr/bin/env python3
"""A fault-injecting HTTP proxy in front of moto_server (moto has no fault injection).

Forwards every request to --target. While the control file says so, it answers JSON-protocol
AWS calls (Cognito Identity, Cognito user pools, Secrets Manager: the ones with X-Amz-Target)
with an error instead:
    pass       forward everything (also when the file is missing)
    throttle   HTTP 400 ThrottlingException
    error500   HTTP 500 InternalFailure
A token `lifetime=N` next to the mode (e.g. "pass lifetime=300") rewrites the `Expiration` of
forwarded GetCredentialsForIdentity answers to now + N seconds (moto's are fixed at 90 s).
Each such answer also gets its own AccessKeyId, so a test can tell which credentials signed
what; the key and its expiry are logged.
Every request is logged to --log as one JSON line {"t": epoch, "target": ..., "fault": ...,
"client": address, "access_key": ..., "expiration": ...}, so a test can count how hard the
daemon retried (and, with several daemons on their own addresses, whose request it was).

Usage: fault_proxy.py --port 5001 --target http://127.0.0.1:5000 --control FILE --log FILE
       [--host 127.0.0.1]  (benches/wire.rs binds 0.0.0.0: devices reach it over veth links)
"""
import argparse
import http.client
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = {
    "throttle": (400, "ThrottlingException", "Rate exceeded (injected)"),
    "error500": (500, "InternalFailure", "Internal failure (injected)"),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--target", required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    target = urllib.parse.urlsplit(args.target)
    log_lock = threading.Lock()

    def control():
        try:
            with open(args.control) as f:
                tokens = f.read().split()
        except OSError:
            tokens = []
        lifetime = next((float(t.split("=", 1)[1]) for t in tokens if t.startswith("lifetime=")),
                        None)
        return (tokens[0] if tokens else "pass"), lifetime

    issued = [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):
            pass

        def handle_any(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            amz_target = self.headers.get("X-Amz-Target", "")
            mode, lifetime = control()
            fault = FAULTS.get(mode) if amz_target else None
            entry = {"t": time.time(), "target": amz_target or self.path,
                     "fault": fault[1] if fault else None, "client": self.client_address[0]}
            if fault:
                with log_lock, open(args.log, "a") as log:
                    log.write(json.dumps(entry) + "\n")
                status, code, message = fault
                payload = json.dumps({"__type": code, "message": message}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("x-amzn-ErrorType", code)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            headers["Host"] = target.netloc
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            if amz_target.endswith(".GetCredentialsForIdentity") and response.status == 200:
                answer = json.loads(data)
                credentials = answer.get("Credentials", {})
                with log_lock:
                    issued[0] += 1
                    credentials["AccessKeyId"] = "ASIAPROXY%011d" % issued[0]
                if lifetime is not None:
                    credentials["Expiration"] = time.time() + lifetime
                entry["access_key"] = credentials.get("AccessKeyId")
                entry["expiration"] = credentials.get("Expiration")
                data = json.dumps(answer).encode()
            with log_lock, open(args.log, "a") as log:
                log.write(json.dumps(entry) + "\n")
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            conn.close()

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = handle_any

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
