"""Shared test values and helpers: stack parameters, a fake Lambda context, CloudFormation
custom-resource events and a recorder that plays CloudFormation's response URL."""
import contextlib
import http.server
import json
import socket
import threading
import time
import uuid

PREFIX = "relay-test"
DOMAIN = "example.com"
CIDRS = ["203.0.113.0/24", "198.51.100.7/32", "2001:db8::/32"]
# Most tests run the shared-user stack (the custom resource then also makes a user);
# FLEET_PARAMETERS is the template's default mode.
PARAMETERS = {"Prefix": PREFIX, "AllowedEmailDomain": DOMAIN, "DeviceCidrs": ",".join(CIDRS),
              "RegistrationMode": "shared-user"}
FLEET_PARAMETERS = dict(PARAMETERS, RegistrationMode="self-register")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def moto_server():
    """A moto server on a free port of 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer  # noqa: PLC0415 - only the tests that need it

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


class ResponseRecorder:
    """Plays CloudFormation's pre-signed S3 URL: records every PUT it receives."""

    def __init__(self):
        self.requests = []
        self.failures_left = 0
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self):  # noqa: N802 - http.server API
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                recorder.requests.append({
                    "at": time.monotonic(), "method": "PUT", "path": self.path,
                    "headers": dict(self.headers), "raw": raw,
                })
                status = 200
                if recorder.failures_left:
                    recorder.failures_left -= 1
                    status = 503
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/cfn-response?X-Amz-Signature=x"

    @property
    def answers(self):
        return [json.loads(request["raw"]) for request in self.requests]

    def last(self):
        assert self.requests, "the custom resource sent no response to CloudFormation"
        return self.answers[-1]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class FakeContext:
    def __init__(self, remaining_ms=120_000):
        self.deadline = time.monotonic() + remaining_ms / 1000.0
        self.log_stream_name = "2026/11/26/[$LATEST]0123456789abcdef"
        self.aws_request_id = str(uuid.uuid4())

    def get_remaining_time_in_millis(self):
        return int(max(self.deadline - time.monotonic(), 0) * 1000)


def cfn_event(kind, properties, url, physical_id=None, old_properties=None):
    event = {
        "RequestType": kind,
        "ServiceToken": "arn:aws:lambda:us-east-1:123456789012:function:relay-test-user-setup",
        "ResponseURL": url,
        "StackId": "arn:aws:cloudformation:us-east-1:123456789012:stack/relay-test/0f0f0f0f",
        "RequestId": str(uuid.uuid4()),
        "LogicalResourceId": "AppUser",
        "ResourceType": "Custom::CognitoAppUser",
        "ResourceProperties": {"ServiceToken": "arn:aws:lambda:…", "ServiceTimeout": "300",
                               **properties},
    }
    if physical_id is not None:
        event["PhysicalResourceId"] = physical_id
    if old_properties is not None:
        event["OldResourceProperties"] = {"ServiceToken": "arn:aws:lambda:…", **old_properties}
    return event
