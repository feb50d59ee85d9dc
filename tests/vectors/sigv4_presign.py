#!/usr/bin/env python3
"""Generate SigV4 presigned-URL test vectors for the AWS IoT Core websocket URL.

Why botocore is the oracle: it is an SigV4 implementation independent of the
Rust aws-sigv4 crate. `botocore.auth.SigV4QueryAuth` given credentials
WITHOUT the session token, with the token then appended as the last query
parameter, yields exactly the URL form IoT Core expects for
MQTT-over-WebSockets (token not part of the canonical request). The Rust
presigner (aws-sigv4, SignatureLocation::QueryParams +
SessionTokenMode::Exclude) must reproduce `query` / `url` byte for byte.

Signing inputs: GET wss://<host>/mqtt, service `iotdevicegateway`, signed
header `host` only (port kept when present), payload hash = SHA-256 of "",
X-Amz-Expires = 3600, time fixed per case (botocore's clock is patched).

Token encoding: `urllib.parse.quote(token, safe="")`, i.e. every byte except
A-Z a-z 0-9 - . _ ~ is percent-encoded with uppercase hex (same set as
botocore's percent_encode and aws-smithy-http's query::fmt_string).

Needs only botocore (tested with 1.43.11). Regenerate with:

    python3 tests/vectors/sigv4_presign.py > tests/vectors/sigv4_presign.json
"""

import datetime
import json
import sys
from unittest import mock
from urllib.parse import quote

import botocore
import botocore.auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

SERVICE = "iotdevicegateway"
PATH = "/mqtt"
EXPIRES = 3600

CASES = [
    {
        "name": "aws-endpoint-token-needs-escaping",
        "access_key_id": "AKIAIOSFODNN7EXAMPLE",
        "secret_access_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "session_token": "IQoJb3JpZ2luX2VjEOr//////////wEaCXVzLWVhc3QtMSJHMEUCIQD+test/token+with=chars==",
        "region": "us-east-1",
        "host": "example-ats.iot.us-east-1.amazonaws.com",
        "time": "2026-11-26T10:00:00Z",
    },
    {
        "name": "local-host-with-port",
        "access_key_id": "ASIAEXAMPLELOCAL0001",
        "secret_access_key": "localSecretKey+/=0123456789abcdefghijklmn",
        "session_token": "plainTokenValue_-.~0123456789",
        "region": "eu-west-1",
        "host": "127.0.0.1:8443",
        "time": "2026-01-02T03:04:05Z",
    },
]


def fixed_clock(when):
    def get_current_datetime(remove_tzinfo=True):
        return when if remove_tzinfo else when.replace(tzinfo=datetime.timezone.utc)

    return get_current_datetime


def presign(case):
    when = datetime.datetime.strptime(case["time"], "%Y-%m-%dT%H:%M:%SZ")
    creds = Credentials(case["access_key_id"], case["secret_access_key"])  # token=None
    assert creds.token is None
    request = AWSRequest(method="GET", url=f"wss://{case['host']}{PATH}")
    auth = botocore.auth.SigV4QueryAuth(creds, SERVICE, case["region"], expires=EXPIRES)
    with mock.patch.object(botocore.auth, "get_current_datetime", fixed_clock(when)):
        auth.add_auth(request)
    base, _, query = request.url.partition("?")
    assert base == f"wss://{case['host']}{PATH}", request.url
    assert f"X-Amz-Date={when:%Y%m%dT%H%M%SZ}&" in query, query  # clock patch worked
    assert "X-Amz-SignedHeaders=host&" in query, query
    query += "&X-Amz-Security-Token=" + quote(case["session_token"], safe="")
    signature = query.split("X-Amz-Signature=")[1].split("&")[0]
    return dict(
        case,
        path=PATH,
        service=SERVICE,
        expires=EXPIRES,
        signature=signature,
        query=query,
        url=f"{base}?{query}",
    )


def main():
    out = {
        "generator": "tests/vectors/sigv4_presign.py",
        "oracle": f"botocore {botocore.__version__} SigV4QueryAuth, credentials without token",
        "note": (
            "Query parameter order (botocore, not alphabetical): X-Amz-Algorithm, "
            "X-Amz-Credential, X-Amz-Date, X-Amz-Expires, X-Amz-SignedHeaders, "
            "X-Amz-Signature, then X-Amz-Security-Token appended last and NOT signed. "
            "Values percent-encoded with only A-Za-z0-9-._~ left as is, uppercase hex "
            "(e.g. '/' -> %2F, '+' -> %2B, '=' -> %3D). Canonical request: GET, /mqtt, "
            "sorted canonical query without token, signed headers 'host' (host[:port]), "
            "payload hash SHA-256 of empty string."
        ),
        "cases": [presign(c) for c in CASES],
    }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
