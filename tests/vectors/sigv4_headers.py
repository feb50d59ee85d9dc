#!/usr/bin/env python3
"""Generate SigV4 header-signing test vectors for the two REST calls the daemon makes without
a service crate (src/identity/rest.rs): IoT AttachPolicy and Lambda Invoke.

botocore is the oracle: a SigV4 implementation independent of the Rust aws-sigv4 crate.
`botocore.auth.SigV4Auth` signs the same request (method, URL with the encoded path label,
the call's own headers, body, session token) at a fixed time; the Rust side must produce the
same URL and the same Authorization header byte for byte.

Needs only botocore (tested with 1.35.99, the tests' .venv). Regenerate with:

    python3 tests/vectors/sigv4_headers.py > tests/vectors/sigv4_headers.json
"""

import datetime
import json
import sys
from unittest import mock
from urllib.parse import quote

import botocore.auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

CREDENTIALS = {
    "access_key_id": "ASIAEXAMPLEDEVICE001",
    "secret_access_key": "deviceSecret+/=0123456789abcdefghijklmnop",
    "session_token": "IQoJb3JpZ2luX2VjEOr//////////wEaCXVzLWVhc3QtMSJHMEUCIQD+token==",
}

CASES = [
    {
        "operation": "AttachPolicy",
        "policy": "stack-IotPolicy+v2=a,b@c",
        "target": "eu-west-1:0f6b5a2e-1111-2222-3333-444455556666",
        "region": "eu-west-1",
        "endpoint": "https://iot.eu-west-1.amazonaws.com",
        "time": "2026-12-07T10:00:00Z",
    },
    {
        "operation": "Invoke",
        "function": "arn:aws:lambda:us-east-1:123456789012:function:stack-AttachFunction",
        "payload": '{"IdToken":"eyJraWQiOiJ0ZXN0In0.e30.c2ln"}',
        "region": "us-east-1",
        "endpoint": "http://127.0.0.1:5000",
        "time": "2026-01-02T03:04:05Z",
    },
]


def fixed_clock(when):
    """botocore's clock held at `when`: get_current_datetime in newer releases, utcnow in older."""
    if hasattr(botocore.auth, "get_current_datetime"):
        def get_current_datetime(remove_tzinfo=True):
            return when if remove_tzinfo else when.replace(tzinfo=datetime.timezone.utc)

        return mock.patch.object(botocore.auth, "get_current_datetime", get_current_datetime)

    class Held(datetime.datetime):
        @classmethod
        def utcnow(cls):
            return when

    return mock.patch.object(botocore.auth.datetime, "datetime", Held)


def label(value):
    return quote(value, safe="-_.~")


def sign(case):
    case = dict(CREDENTIALS, **case)
    if case["operation"] == "AttachPolicy":
        service, method = "iot", "PUT"
        path = f"/target-policies/{label(case['policy'])}"
        headers = {"content-type": "application/json"}
        body = json.dumps({"target": case["target"]}, separators=(",", ":")).encode()
    else:
        service, method = "lambda", "POST"
        path = f"/2015-03-31/functions/{label(case['function'])}/invocations"
        headers = {"x-amz-invocation-type": "RequestResponse"}
        body = case["payload"].encode()
    url = case["endpoint"] + path
    request = AWSRequest(method=method, url=url, headers=headers, data=body)
    creds = Credentials(case["access_key_id"], case["secret_access_key"], case["session_token"])
    when = datetime.datetime.strptime(case["time"], "%Y-%m-%dT%H:%M:%SZ")
    with fixed_clock(when):
        botocore.auth.SigV4Auth(creds, service, case["region"]).add_auth(request)
    assert request.headers["X-Amz-Date"] == f"{when:%Y%m%dT%H%M%SZ}"  # the clock patch worked
    return dict(case, url=url, authorization=request.headers["Authorization"])


def main():
    json.dump([sign(case) for case in CASES], sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
