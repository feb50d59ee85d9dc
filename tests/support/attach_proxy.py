#!/usr/bin/env python3
"""Plays AWS Lambda for the template's attach function in the Rust end-to-end tests.

moto runs no Lambda code without Docker, so this small server answers
`POST /2015-03-31/functions/<name>/invocations` the way Lambda does (RequestResponse) by running
the template's own handler, extracted from cloudformation/cognito.yml, against moto. A handler
exception becomes a function error (`X-Amz-Function-Error: Unhandled`, body with errorType and
errorMessage), as with Lambda. The daemon reaches it through AWS_ENDPOINT_URL_LAMBDA. Every
invocation is appended to --log as one JSON line (function, payload keys, answer or error; never
the token).

Usage: attach_proxy.py --port P --moto URL --identity-pool-id ID --user-pool-id ID --policy NAME
                       --log FILE [--region us-east-1]
"""
import argparse
import http.server
import json
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[2]
INVOCATION = re.compile(r"^/2015-03-31/functions/([^/]+)/invocations$")
MAX_PAYLOAD = 6 * 1024 * 1024  # Lambda's synchronous payload limit


def load_handler():
    sys.path.insert(0, str(REPO / "cloudformation" / "tests"))
    import cfn  # noqa: E402 - the template reader the cloud-side tests use

    folder = tempfile.mkdtemp(prefix="attach-function-")
    return cfn.load_lambda(cfn.load_template(), "AttachPolicyFunction", folder)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--moto", required=True)
    parser.add_argument("--identity-pool-id", required=True)
    parser.add_argument("--user-pool-id", required=True)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--region", default="us-east-1")
    args = parser.parse_args()

    # The handler's environment as the template sets it, and boto3 aimed at moto.
    os.environ.update({
        "IDENTITY_POOL_ID": args.identity_pool_id,
        "USER_POOL_PROVIDER": f"cognito-idp.{args.region}.amazonaws.com/{args.user_pool_id}",
        "IOT_POLICY": args.policy,
        "AWS_ENDPOINT_URL": args.moto,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": args.region,
    })
    handler = load_handler()
    lock = threading.Lock()

    class Lambda(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server API
            match = INVOCATION.match(self.path.split("?", 1)[0])
            length = int(self.headers.get("Content-Length", 0))
            if not match or length > MAX_PAYLOAD:
                self.reply(404, {"Type": "User", "message": "not an invocation"})
                return
            body = self.rfile.read(length)
            record = {"function": unquote(match.group(1))}
            headers = {"X-Amz-Executed-Version": "$LATEST"}
            try:
                event = json.loads(body or b"null")
                record["payload_keys"] = sorted(event) if isinstance(event, dict) else []
                answer = handler.handler(event, None)
                record["answer"] = answer
            except Exception as exc:  # noqa: BLE001 - Lambda reports every error the same way
                answer = {"errorType": type(exc).__name__, "errorMessage": str(exc)}
                record["error"] = answer
                headers["X-Amz-Function-Error"] = "Unhandled"
            with lock, open(args.log, "a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")
            self.reply(200, answer, headers)

        def do_GET(self):  # noqa: N802 - readiness probe
            self.reply(200, {"ready": True})

        def reply(self, status, document, headers=None):
            data = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Lambda)
    server.serve_forever()


if __name__ == "__main__":
    main()
