#!/usr/bin/env python3
"""Cognito as the tests need it, in front of moto_server: the pre-sign-up trigger and the quotas.

moto runs no Cognito Lambda trigger and enforces no rate quota. This proxy forwards
every request to --target and adds both:

* Trigger (--user-pool-id given): on each `SignUp` it runs the template's own pre-sign-up handler
  (extracted from cloudformation/cognito.yml, as in Lambda) on the event Cognito would build. A
  refusal is answered as Cognito answers it (HTTP 400 UserLambdaValidationException, "PreSignUp
  failed with error <message>.") and the user is never created; an approval forwards the SignUp
  and then confirms the user (AdminConfirmSignUp), as autoConfirmUser does, so the answer says
  UserConfirmed: true. The handler reads the registration code from moto's Secrets Manager.
* Quotas (--rates "SignUp=2,InitiateAuth=5,GetId=2,GetCredentialsForIdentity=20"): a token bucket
  per API (X-Amz-Target operation name), requests per second with a burst of one second's worth;
  beyond it the call is answered HTTP 400 TooManyRequestsException, as Cognito answers it.

Every request is appended to --log as one JSON line {"t", "op", "result", "user", "flow"} where
result is "ok", "throttled", "refused" or the error code moto answered; "user" only for SignUp (a
device name), "flow" only for InitiateAuth (USER_PASSWORD_AUTH or REFRESH_TOKEN_AUTH). No
password, code or token is ever logged.

Usage: cognito_proxy.py --port P --target URL --log FILE [--rates SPEC]
                        [--user-pool-id ID --domain D --prefix P] [--region us-east-1]
"""
import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
JSON_TYPE = "application/x-amz-json-1.1"


def load_presignup():
    sys.path.insert(0, str(REPO / "cloudformation" / "tests"))
    import cfn  # noqa: E402 - the template reader the cloud-side tests use

    folder = tempfile.mkdtemp(prefix="pre-sign-up-")
    return cfn.load_lambda(cfn.load_template(), "PreSignUpFunction", folder)


class Buckets:
    """Token buckets per operation: `rate` per second, at most one second's worth saved."""

    def __init__(self, spec):
        self.rates = {}
        for item in filter(None, (spec or "").split(",")):
            name, _, rate = item.partition("=")
            self.rates[name.strip()] = float(rate)
        self.tokens = dict(self.rates)
        self.stamp = {name: time.monotonic() for name in self.rates}
        self.lock = threading.Lock()

    def admit(self, op):
        if op not in self.rates:
            return True
        with self.lock:
            now = time.monotonic()
            rate = self.rates[op]
            burst = max(rate, 1.0)
            self.tokens[op] = min(burst, self.tokens[op] + (now - self.stamp[op]) * rate)
            self.stamp[op] = now
            if self.tokens[op] >= 1.0:
                self.tokens[op] -= 1.0
                return True
            return False


def signup_event(request, pool_id, region):
    attributes = {a.get("Name"): a.get("Value") for a in request.get("UserAttributes") or []
                  if isinstance(a, dict)}
    return {
        "version": "1", "region": region, "userPoolId": pool_id,
        "userName": request.get("Username"), "triggerSource": "PreSignUp_SignUp",
        "callerContext": {"awsSdkVersion": "unknown", "clientId": request.get("ClientId")},
        "request": {"userAttributes": attributes, "validationData": None,
                    "clientMetadata": request.get("ClientMetadata") or {}},
        "response": {"autoConfirmUser": False, "autoVerifyEmail": False, "autoVerifyPhone": False},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--rates", default="")
    parser.add_argument("--user-pool-id")
    parser.add_argument("--domain", default="example.com")
    parser.add_argument("--prefix", default="relay-test")
    parser.add_argument("--region", default="us-east-1")
    args = parser.parse_args()
    target = urllib.parse.urlsplit(args.target)
    buckets = Buckets(args.rates)
    log_lock = threading.Lock()

    presignup = idp = None
    if args.user_pool_id:
        # The handler's environment as the template sets it, and boto3 aimed at moto.
        os.environ.update({
            "ALLOWED_EMAIL_DOMAIN": args.domain, "SECRET_SUFFIX": f"_{args.prefix}-app-user",
            "AWS_ENDPOINT_URL": args.target, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": args.region,
        })
        presignup = load_presignup()
        import boto3  # noqa: E402 - only needed with the trigger

        idp = boto3.client("cognito-idp", region_name=args.region, endpoint_url=args.target)

    def record(entry):
        with log_lock, open(args.log, "a", encoding="utf-8") as log:
            log.write(json.dumps(entry) + "\n")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):
            pass

        def reply(self, status, headers, data):
            self.send_response(status)
            for key, value in headers:
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def error(self, code, message):
            data = json.dumps({"__type": code, "message": message}).encode()
            self.reply(400, [("Content-Type", JSON_TYPE), ("x-amzn-ErrorType", code)], data)

        def forward(self, body):
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = target.netloc
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                return response.status, response.getheaders(), response.read()
            finally:
                conn.close()

        def handle_any(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            op = self.headers.get("X-Amz-Target", "").rpartition(".")[2]
            entry = {"t": time.time(), "op": op or self.path.split("?", 1)[0]}
            if op == "InitiateAuth":
                entry["flow"] = auth_flow(body)
            if op and not buckets.admit(op):
                entry["result"] = "throttled"
                record(entry)
                self.error("TooManyRequestsException", "Rate exceeded")
                return
            if op == "SignUp" and presignup is not None:
                self.sign_up(body, entry)
                return
            status, headers, data = self.forward(body)
            entry["result"] = "ok" if status < 300 else error_code(headers, data)
            record(entry)
            self.reply(status, headers, data)

        def sign_up(self, body, entry):
            try:
                request = json.loads(body or b"{}")
            except ValueError:
                request = {}
            entry["user"] = str(request.get("Username"))[:80]
            try:
                presignup.handler(signup_event(request, args.user_pool_id, args.region), None)
            except Exception as exc:  # noqa: BLE001 - Cognito answers every trigger error alike
                entry["result"] = "refused"
                record(entry)
                self.error("UserLambdaValidationException", f"PreSignUp failed with error {exc}.")
                return
            status, headers, data = self.forward(body)
            if status < 300:
                idp.admin_confirm_sign_up(UserPoolId=args.user_pool_id, Username=request["Username"])
                answer = json.loads(data)
                answer["UserConfirmed"] = True
                data = json.dumps(answer).encode()
            entry["result"] = "ok" if status < 300 else error_code(headers, data)
            record(entry)
            self.reply(status, headers, data)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = handle_any

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


def auth_flow(body):
    try:
        flow = json.loads(body or b"{}").get("AuthFlow")
    except (ValueError, AttributeError):
        return None
    return flow if flow in ("USER_PASSWORD_AUTH", "REFRESH_TOKEN_AUTH") else None


def error_code(headers, data):
    for key, value in headers:
        if key.lower() == "x-amzn-errortype":
            return value.split(":", 1)[0]
    try:
        return str(json.loads(data).get("__type", "error")).rpartition("#")[2]
    except (ValueError, AttributeError):
        return "error"


if __name__ == "__main__":
    main()
