"""tests/support/aws_gate.py: the test bed enforces what AWS enforces (emulators alone do not).

moto runs on 127.0.0.1, provision.py makes the account, and gates start in front of it (and of
mosquitto when it is installed) with the template's own policies. Each test calls through a gate
with boto3 or raw sockets, as a device would, and checks the answer AWS would give.
"""
import base64
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

import cfn
from helpers import free_port, moto_server

sys.path.insert(0, str(cfn.REPO_ROOT / "tests" / "support"))
import aws_gate  # noqa: E402 - the module under test (its framing helpers serve the client)

GATE = cfn.REPO_ROOT / "tests" / "support" / "aws_gate.py"
REGION, PREFIX = "us-east-1", "gate-test"
NO_RETRY = Config(retries={"max_attempts": 1, "mode": "standard"})
MOSQUITTO = shutil.which("mosquitto")


def wait_for(predicate, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def json_lines(path):
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("gate")


@pytest.fixture(scope="module")
def moto(workdir):
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def account(moto, workdir):
    result = subprocess.run(
        [sys.executable, str(cfn.PROVISION_PATH), "--endpoint", moto, "--region", REGION,
         "--prefix", PREFIX, "--device-cidrs", "127.0.0.0/8,::1/128"],
        capture_output=True, text=True, timeout=120, check=True,
        env={"PATH": "/usr/bin:/bin", "AWS_CONFIG_FILE": "/dev/null",
             "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"})
    path = workdir / "account.json"
    path.write_text(result.stdout)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def certificates(workdir):
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=workdir, check=True, capture_output=True, timeout=60)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj",
            "/CN=gate-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (workdir / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext")
    return {"ca": str(workdir / "ca.crt"), "server": str(workdir / "server.crt"),
            "key": str(workdir / "server.key")}


@pytest.fixture(scope="module")
def broker(workdir, certificates):
    """mosquitto with a wss listener (mosquitto binds websockets listeners to every interface) and a plain
    listener on 127.0.0.1 for the test's own publishes."""
    if not MOSQUITTO:
        yield None
        return
    wss, plain = free_port(), free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(
        f"per_listener_settings false\nallow_anonymous true\nuser root\n"
        f"log_dest file {workdir}/mosquitto.log\n"
        f"listener {plain} 127.0.0.1\nprotocol mqtt\n"
        f"listener {wss} 127.0.0.1\nprotocol websockets\nwebsockets_headers_size 8192\n"
        f"cafile {certificates['ca']}\ncertfile {certificates['server']}\nkeyfile {certificates['key']}\n")
    process = subprocess.Popen([MOSQUITTO, "-c", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)

    def accepts():
        try:
            socket.create_connection(("127.0.0.1", plain), timeout=0.2).close()
            socket.create_connection(("127.0.0.1", wss), timeout=0.2).close()
            return True
        except OSError:
            return False
    wait_for(accepts, "mosquitto")
    yield {"wss": wss, "plain": plain}
    process.terminate()
    process.wait(timeout=10)


class FakeLambda:
    """Plays Lambda behind the gate: records what reaches it."""

    def __init__(self):
        self.calls = []
        calls = self.calls

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                calls.append((self.path, body))
                data = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"


@pytest.fixture(scope="module")
def fake_lambda():
    fake = FakeLambda()
    yield fake
    fake.server.shutdown()


class RunningGate:
    def __init__(self, process, http_port, wss_port, log):
        self.process, self.http_port, self.wss_port, self.log = process, http_port, wss_port, log
        self.url = f"http://127.0.0.1:{http_port}"

    def entries(self, **match):
        return [e for e in json_lines(self.log) if all(e.get(k) == v for k, v in match.items())]

    def client(self, service, credentials=None):
        if credentials is None:
            return boto3.client(service, region_name=REGION, endpoint_url=self.url,
                                config=NO_RETRY.merge(Config(signature_version=UNSIGNED)))
        return boto3.client(service, region_name=REGION, endpoint_url=self.url, config=NO_RETRY,
                            **credentials)


@pytest.fixture(scope="module")
def start_gate(workdir, moto, account, certificates, broker, fake_lambda):
    started = []

    def start(*extra, template=None):
        http_port, wss_port = free_port(), free_port()
        log = workdir / f"gate-{len(started)}.log"
        command = [sys.executable, str(GATE), "--account", str(workdir / "account.json"),
                   "--upstream", moto, "--lambda", fake_lambda.url, "--http-port", str(http_port),
                   "--wss-port", str(wss_port), "--broker-port", str(broker["wss"] if broker else 1),
                   "--cert", certificates["server"], "--key", certificates["key"],
                   "--cafile", certificates["ca"], "--log", str(log), *extra]
        if template:
            command += ["--template", str(template)]
        stderr = open(workdir / f"gate-{len(started)}.err", "w")
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        gate = RunningGate(process, http_port, wss_port, log)
        started.append(gate)
        wait_for(lambda: gate.entries(ready=True) or process.poll() is not None, "the gate")
        assert process.poll() is None, (workdir / f"gate-{len(started) - 1}.err").read_text()
        return gate

    yield start
    for gate in started:
        gate.process.terminate()
        gate.process.wait(timeout=10)


@pytest.fixture(scope="module")
def gate(start_gate):
    return start_gate()


# -- the device's calls, as the daemon makes them

def guest_enhanced(gate, account):
    identity = gate.client("cognito-identity")
    identity_id = identity.get_id(IdentityPoolId=account["identity_pool_id"])["IdentityId"]
    credentials = identity.get_credentials_for_identity(IdentityId=identity_id)["Credentials"]
    return identity_id, {"aws_access_key_id": credentials["AccessKeyId"],
                         "aws_secret_access_key": credentials["SecretKey"],
                         "aws_session_token": credentials["SessionToken"]}


def guest_classic(gate, account, role_arn=None):
    identity = gate.client("cognito-identity")
    identity_id = identity.get_id(IdentityPoolId=account["identity_pool_id"])["IdentityId"]
    token = identity.get_open_id_token(IdentityId=identity_id)["Token"]
    credentials = gate.client("sts").assume_role_with_web_identity(
        RoleArn=role_arn or account["unauth_role_arn"], RoleSessionName="iot-cognito-relay",
        WebIdentityToken=token)["Credentials"]
    return identity_id, {"aws_access_key_id": credentials["AccessKeyId"],
                         "aws_secret_access_key": credentials["SecretAccessKey"],
                         "aws_session_token": credentials["SessionToken"]}


def id_token(gate, account):
    return gate.client("cognito-idp").initiate_auth(
        ClientId=account["client_id"], AuthFlow="USER_PASSWORD_AUTH",
        AuthParameters={"USERNAME": account["username"], "PASSWORD": account["password"]},
    )["AuthenticationResult"]["IdToken"]


def authenticated(gate, account):
    logins = {f"cognito-idp.{REGION}.amazonaws.com/{account['user_pool_id']}": id_token(gate, account)}
    identity = gate.client("cognito-identity")
    identity_id = identity.get_id(IdentityPoolId=account["identity_pool_id"], Logins=logins)["IdentityId"]
    credentials = identity.get_credentials_for_identity(IdentityId=identity_id, Logins=logins)["Credentials"]
    return identity_id, {"aws_access_key_id": credentials["AccessKeyId"],
                         "aws_secret_access_key": credentials["SecretKey"],
                         "aws_session_token": credentials["SessionToken"]}


def refusal(call):
    with pytest.raises(ClientError) as caught:
        call()
    error = caught.value.response
    return error["ResponseMetadata"]["HTTPStatusCode"], error["Error"]["Code"], error["Error"]["Message"]


def template_with_pool_classic_flow(tmp_path, allowed):
    """The template with the identity pool's AllowClassicFlow set, as older stacks had it."""
    text = cfn.TEMPLATE_PATH.read_text()
    changed, count = re.subn(r"(?m)^(      AllowClassicFlow: ).*$", rf"\g<1>{str(allowed).lower()}", text)
    assert count == 1, "the identity pool's AllowClassicFlow property was not found"
    path = tmp_path / "cognito.yml"
    path.write_text(changed)
    return path


# -- HTTP side

def test_enhanced_flow_guest_is_refused_by_the_session_policy(gate, account):
    """(a) Why guests use the basic flow: enhanced-flow guest credentials carry Cognito's session
    policy, which allows no Secrets Manager action (docs/security.md)."""
    _, credentials = guest_enhanced(gate, account)
    sm = gate.client("secretsmanager", credentials)
    status, code, message = refusal(lambda: sm.get_secret_value(SecretId=account["secret_id"]))
    role = account["unauth_role_arn"].rsplit("/", 1)[1]
    assert (status, code) == (400, "AccessDeniedException")
    assert message == (
        f"User: arn:aws:sts::{account['account_id']}:assumed-role/{role}/CognitoIdentityCredentials"
        f" is not authorized to perform: secretsmanager:GetSecretValue on resource: "
        f"{account['secret_arn']} because no session policy allows the "
        f"secretsmanager:GetSecretValue action")
    (denied,) = gate.entries(op="secretsmanager:GetSecretValue", decision="deny")
    assert denied["principal"]["flow"] == "enhanced" and not denied["principal"]["authenticated"]
    assert "no session policy" in denied["reason"]


def test_classic_flow_guest_reads_the_secret(gate, account):
    """(b) The basic flow has no session policy: the unauth role's own policy decides."""
    _, credentials = guest_classic(gate, account)
    sm = gate.client("secretsmanager", credentials)
    value = json.loads(sm.get_secret_value(SecretId=account["secret_id"])["SecretString"])
    assert value == {account["username"]: account["password"]}
    assert sm.describe_secret(SecretId=account["secret_id"])["ARN"] == account["secret_arn"]
    # The role allows this one secret only.
    status, code, message = refusal(lambda: sm.get_secret_value(SecretId="another-secret"))
    assert (status, code) == (400, "AccessDeniedException")
    assert message.endswith("because no identity-based policy allows the secretsmanager:GetSecretValue action")
    log = "\n".join(gate.log.read_text().splitlines())
    assert account["password"] not in log and "SessionToken" not in log
    assert credentials["aws_session_token"] not in log


def test_a_role_the_token_does_not_fit_is_refused(gate, account):
    """The auth role's trust policy wants amr "authenticated": a guest token cannot assume it."""
    with pytest.raises(ClientError) as caught:
        guest_classic(gate, account, role_arn=account["auth_role_arn"])
    error = caught.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert error["Error"]["Code"] == "AccessDenied"
    sts = gate.client("sts")
    status, code, _ = refusal(lambda: sts.assume_role_with_web_identity(
        RoleArn=account["unauth_role_arn"], RoleSessionName="xy", WebIdentityToken="forged"))
    assert (status, code) == (400, "InvalidIdentityToken")


def test_source_outside_device_cidrs_is_denied_by_the_resource_policy(start_gate, account):
    """(c) The secret's resource policy denies reads from outside DeviceCidrs."""
    gate = start_gate("--device-cidrs", "10.0.0.0/8")
    _, credentials = guest_classic(gate, account)
    sm = gate.client("secretsmanager", credentials)
    status, code, message = refusal(lambda: sm.get_secret_value(SecretId=account["secret_id"]))
    assert (status, code) == (400, "AccessDeniedException")
    assert message.endswith("with an explicit deny in a resource-based policy")


def test_classic_flow_refused_when_the_pool_does_not_allow_it(start_gate, account, tmp_path):
    """(d) A pool with AllowClassicFlow false (stacks from templates before the basic flow was always on) refuses
    GetOpenIdToken as Cognito does; the current template allows it whatever the parameter says."""
    gate = start_gate(template=template_with_pool_classic_flow(tmp_path, False))
    identity = gate.client("cognito-identity")
    identity_id = identity.get_id(IdentityPoolId=account["identity_pool_id"])["IdentityId"]
    status, code, message = refusal(lambda: identity.get_open_id_token(IdentityId=identity_id))
    assert (status, code) == (400, "InvalidParameterException")
    assert message == "Basic (classic) flow is not enabled, please use enhanced flow."
    # Such a stack leaves devices the enhanced flow only: the guest read fails.
    _, credentials = guest_enhanced(gate, account)
    status, code, _ = refusal(lambda: gate.client("secretsmanager", credentials).get_secret_value(
        SecretId=account["secret_id"]))
    assert (status, code) == (400, "AccessDeniedException")


def test_the_template_allows_the_classic_flow_whatever_the_parameter(start_gate, account):
    gate = start_gate("--param", "AllowClassicFlow=false")
    pool = cfn.load_template()["Resources"]["CognitoIdentityPool"]["Properties"]
    if pool["AllowClassicFlow"] is not True:
        pytest.xfail("cognito.yml still lets AllowClassicFlow=false disable the basic flow")
    _, credentials = guest_classic(gate, account)
    assert gate.client("secretsmanager", credentials).get_secret_value(SecretId=account["secret_id"])


def test_authenticated_identity_invokes_the_attach_function_not_attach_policy(gate, account, fake_lambda):
    """(e) The auth role may invoke the stack's function; iot:AttachPolicy it does not hold."""
    identity_id, credentials = authenticated(gate, account)
    answer = gate.client("lambda", credentials).invoke(
        FunctionName=account["attach_function_arn"], Payload=b'{"IdToken": "x.y.z"}')
    assert answer["StatusCode"] == 200 and json.loads(answer["Payload"].read()) == {"ok": True}
    assert fake_lambda.calls and fake_lambda.calls[-1][0].endswith("/invocations")
    other = account["attach_function_arn"] + "-other"
    before = len(fake_lambda.calls)
    status, code, _ = refusal(lambda: gate.client("lambda", credentials).invoke(FunctionName=other))
    assert (status, code, len(fake_lambda.calls)) == (403, "AccessDeniedException", before)

    iot = gate.client("iot", credentials)
    status, code, message = refusal(lambda: iot.attach_policy(policyName=account["iot_policy"],
                                                              target=identity_id))
    assert (status, code) == (403, "AccessDeniedException")
    assert message.endswith("because no identity-based policy allows the iot:AttachPolicy action")
    assert f"on resource: {identity_id} " in message
    assert gate.entries(op="iot:AttachPolicy", decision="deny")
    # The authenticated role reads no secret either (only the guest step does).
    status, code, _ = refusal(lambda: gate.client("secretsmanager", credentials).get_secret_value(
        SecretId=account["secret_id"]))
    assert (status, code) == (400, "AccessDeniedException")


def test_the_same_login_gets_the_same_identity(gate, account):
    """As Cognito: GetId with the same login answers the same identity (moto would not)."""
    logins = {f"cognito-idp.{REGION}.amazonaws.com/{account['user_pool_id']}": id_token(gate, account)}
    identity = gate.client("cognito-identity")
    first = identity.get_id(IdentityPoolId=account["identity_pool_id"], Logins=logins)["IdentityId"]
    logins = {key: id_token(gate, account) for key in logins}  # a fresh token of the same user
    assert identity.get_id(IdentityPoolId=account["identity_pool_id"], Logins=logins)["IdentityId"] == first
    # An access token is no login.
    access = gate.client("cognito-idp").initiate_auth(
        ClientId=account["client_id"], AuthFlow="USER_PASSWORD_AUTH",
        AuthParameters={"USERNAME": account["username"], "PASSWORD": account["password"]},
    )["AuthenticationResult"]["AccessToken"]
    status, code, _ = refusal(lambda: identity.get_credentials_for_identity(
        IdentityId=first, Logins={key: access for key in logins}))
    assert (status, code) == (400, "NotAuthorizedException")


def test_what_the_gate_does_not_model_raises():
    """Strict: an unknown condition key, and aws:SourceIp in an IAM policy IoT Core evaluates."""
    with pytest.raises(aws_gate.NotModelled):
        "aws:RequestTag/x" in aws_gate.Context({})  # noqa: B015 - the lookup itself raises
    assert "aws:SourceVpce" not in aws_gate.Context({})
    cloud = aws_gate.Cloud.__new__(aws_gate.Cloud)
    statement = {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*",
                 "Condition": {"IpAddress": {"aws:SourceIp": ["127.0.0.0/8"]}}}
    role = aws_gate.Role("arn:aws:iam::123456789012:role/r", [statement], [], 3600)
    principal = aws_gate.Principal("ASIAX", "t", role, "s", "id", True, "enhanced", None,
                                   time.time() + 60, "123456789012", "secret")
    with pytest.raises(aws_gate.NotModelled, match="aws:SourceIp"):
        cloud.iot_decide(principal, "iot:Connect", "arn:aws:iot:us-east-1:123456789012:client/id",
                         "id", "127.0.0.1", [])


def test_unknown_unsigned_and_forged_requests(gate, account):
    forged = {"aws_access_key_id": "ASIAFORGEDFORGED1234", "aws_secret_access_key": "x",
              "aws_session_token": "y"}
    status, code, _ = refusal(lambda: gate.client("secretsmanager", forged).get_secret_value(
        SecretId=account["secret_id"]))
    assert (status, code) == (400, "UnrecognizedClientException")
    status, code, _ = refusal(lambda: gate.client("lambda", forged).invoke(FunctionName="f"))
    assert (status, code) == (403, "UnrecognizedClientException")
    # A minted key with another session token is as invalid.
    _, credentials = guest_classic(gate, account)
    status, code, _ = refusal(lambda: gate.client("secretsmanager", dict(
        credentials, aws_session_token="other")).get_secret_value(SecretId=account["secret_id"]))
    assert code == "UnrecognizedClientException"
    # Unsigned Secrets Manager call: raw HTTP, as AWS answers it.
    request = urllib.request.Request(
        gate.url + "/", data=json.dumps({"SecretId": account["secret_id"]}).encode(), method="POST",
        headers={"X-Amz-Target": "secretsmanager.GetSecretValue",
                 "Content-Type": "application/x-amz-json-1.1"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    assert json.loads(caught.value.read())["__type"] == "MissingAuthenticationTokenException"


def test_a_signature_made_with_another_secret_is_refused(gate, account):
    """AWS recomputes the signature with the key's secret: right key and token, wrong secret
    -> 403 InvalidSignatureException (SignatureDoesNotMatch from STS); the right secret
    passes, also for the REST services (IoT's AttachPolicy reaches the policy check)."""
    identity_id, credentials = authenticated(gate, account)
    wrong = dict(credentials, aws_secret_access_key=credentials["aws_secret_access_key"][::-1])
    status, code, message = refusal(lambda: gate.client("secretsmanager", wrong).get_secret_value(
        SecretId=account["secret_id"]))
    assert (status, code) == (403, "InvalidSignatureException")
    assert message.startswith("The request signature we calculated does not match")
    status, code, _ = refusal(lambda: gate.client("iot", wrong).attach_policy(
        policyName="p+1", target=identity_id))
    assert (status, code) == (403, "InvalidSignatureException")
    status, code, _ = refusal(lambda: gate.client("sts", wrong).get_caller_identity())
    assert (status, code) == (403, "SignatureDoesNotMatch")
    assert gate.client("sts", credentials).get_caller_identity()["Arn"].startswith("arn:aws:sts::")
    # Signed correctly, AttachPolicy is judged by the policies (devices hold no iot:AttachPolicy).
    status, code, _ = refusal(lambda: gate.client("iot", credentials).attach_policy(
        policyName="p+1", target=identity_id))
    assert (status, code) == (403, "AccessDeniedException")
    mismatches = [e for e in gate.entries(decision="deny") if e.get("reason") == "signature mismatch"]
    assert len(mismatches) == 3
    assert credentials["aws_secret_access_key"] not in gate.log.read_text()


def test_expired_credentials_are_refused_as_each_service_does(gate, account):
    """moto's credentials live 90 s (15 min at least from STS): the expiry rule is checked on the
    gate's own state rather than by waiting."""
    _, credentials = guest_classic(gate, account)
    (minted,) = [e for e in gate.entries(decision="minted")
                 if e["principal"]["akid"] == credentials["aws_access_key_id"]]
    assert minted["principal"]["flow"] == "classic"
    state = aws_gate.Gate.__new__(aws_gate.Gate)
    state.lock, state.principals = threading.Lock(), {}
    role = aws_gate.Role("arn:aws:iam::123456789012:role/r", [], [], 3600)
    for akid, expires in (("ASIAOLD", time.time() - 1), ("ASIANEW", time.time() + 60)):
        state.principals[akid] = aws_gate.Principal(akid, "token", role, "s", "id", False, "classic",
                                                    None, expires, "123456789012", "secret")
    assert state.principal("ASIAOLD", "token") == (None, "expired")
    assert state.principal("ASIANEW", "token")[1] is None
    assert state.principal("ASIANEW", "other") == (None, "invalid")
    assert aws_gate.error_shape("secretsmanager", "expired") == (400, "ExpiredTokenException")
    assert aws_gate.error_shape("lambda", "expired") == (403, "ExpiredTokenException")
    assert aws_gate.error_shape("sts", "expired") == (400, "ExpiredToken")


# -- MQTT side

class WsMqtt:
    """A minimal MQTT 3.1.1 client over wss: raw socket, TLS and RFC 6455 framing."""

    def __init__(self, port, cafile, credentials):
        context = ssl.create_default_context(cafile=cafile)
        self.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                                        server_hostname="127.0.0.1")
        query = urllib.parse.urlencode({
            "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
            "X-Amz-Credential": f"{credentials['aws_access_key_id']}/20261207/{REGION}/iotdevicegateway/aws4_request",
            "X-Amz-Date": "20261207T000000Z", "X-Amz-SignedHeaders": "host",
            "X-Amz-Signature": "0" * 64, "X-Amz-Security-Token": credentials["aws_session_token"]})
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /mqtt?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n").encode())
        self.raw = b""
        while b"\r\n\r\n" not in self.raw:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            self.raw += chunk
        head, _, self.raw = self.raw.partition(b"\r\n\r\n")
        self.status = int(head.split()[1]) if head else 0
        self.mqtt = b""

    def send(self, packet):
        self.sock.sendall(aws_gate.frame(2, packet, mask=True))

    def _exactly(self, n):
        while len(self.raw) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.raw += chunk
        data, self.raw = self.raw[:n], self.raw[n:]
        return data

    def receive(self, timeout=5.0):
        """The next MQTT packet, or None when the connection was closed."""
        self.sock.settimeout(timeout)
        try:
            while True:
                packets, rest = aws_gate.split_packets(self.mqtt)
                if packets:
                    self.mqtt = b"".join(packets[1:]) + rest
                    return packets[0]
                head = self._exactly(2)
                length = head[1] & 0x7F
                if length == 126:
                    length = int.from_bytes(self._exactly(2), "big")
                elif length == 127:
                    length = int.from_bytes(self._exactly(8), "big")
                payload = self._exactly(length)
                if head[0] & 0x0F == 8:
                    return None
                self.mqtt += payload
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            if isinstance(exc, socket.timeout):
                raise
            return None

    def close(self):
        self.sock.close()


def mqtt_string(text):
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def packet(first, body):
    return bytes([first]) + aws_gate.encode_length(len(body)) + body


def connect_packet(client_id):
    return packet(0x10, mqtt_string("MQTT") + bytes([4, 0x02]) + (60).to_bytes(2, "big")
                  + mqtt_string(client_id))


def publish_packet(topic, payload, packet_id=1):
    return packet(0x32, mqtt_string(topic) + packet_id.to_bytes(2, "big") + payload)


def subscribe_packet(packet_id, *filters):
    return packet(0x82, packet_id.to_bytes(2, "big") + b"".join(mqtt_string(f) + b"\x01" for f in filters))


def plain_publish(port, topic, payload):
    """QoS 1 publish on the broker's own plain listener: a message for the subscriber."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(connect_packet("gate-test-injector"))
        assert sock.recv(4)[0] == 0x20
        sock.sendall(publish_packet(topic, payload, 7))
        assert sock.recv(4)[0] == 0x40


needs_broker = pytest.mark.skipif(not MOSQUITTO, reason="mosquitto is not installed (apt-get install mosquitto)")


@pytest.fixture
def moto_iot(moto):
    return boto3.client("iot", region_name=REGION, endpoint_url=moto,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@needs_broker
def test_mqtt_upgrade_with_unknown_credentials_is_403(gate, certificates):
    client = WsMqtt(gate.wss_port, certificates["ca"], {"aws_access_key_id": "ASIANOBODY0000000000",
                                                        "aws_session_token": "t"})
    assert client.status == 403
    client.close()


@needs_broker
def test_mqtt_connect_subscribe_publish_receive(gate, account, certificates, broker, moto_iot):
    """(f) CONNECT without an attached policy: closed, no CONNACK. Attached: CONNACK; a foreign
    filter gets SUBACK 0x80; a foreign topic's PUBLISH closes; after a detach a message for the
    identity is not delivered and the next PUBLISH closes."""
    identity_id, credentials = authenticated(gate, account)
    own = f"{account['identity_pool_id']}/{identity_id}"

    client = WsMqtt(gate.wss_port, certificates["ca"], credentials)
    assert client.status == 101
    client.send(connect_packet(identity_id))
    assert client.receive() is None, "CONNECT without an attached IoT policy must be closed, no CONNACK"
    (refused,) = gate.entries(mqtt="connect", client_id=identity_id)
    assert refused["decision"] == "deny" and "no attached IoT policy" in refused["reason"]

    moto_iot.attach_policy(policyName=account["iot_policy"], target=identity_id)
    time.sleep(aws_gate.ATTACHMENT_CACHE_SECONDS + 0.1)
    client = WsMqtt(gate.wss_port, certificates["ca"], credentials)
    client.send(connect_packet(identity_id))
    connack = client.receive()
    if connack is None:
        reasons = [e["reason"] for e in gate.entries(mqtt="connect", client_id=identity_id)]
        pytest.fail(f"CONNECT refused after attach: {reasons[-1]}")
    assert connack[0] == 0x20 and connack[3] == 0

    client.send(subscribe_packet(5, f"{own}/down/#", f"{account['identity_pool_id']}/someone-else/#"))
    suback = client.receive()
    assert suback[0] == 0x90 and suback[2:4] == b"\x00\x05" and suback[4:] == b"\x01\x80"

    client.send(publish_packet(f"{own}/down/hello", b"one", 9))
    got = [client.receive(), client.receive()]
    kinds = sorted(p[0] & 0xF0 for p in got)
    assert kinds == [0x30, 0x40], got  # the PUBACK and its own message back (RECEIVE allowed)

    # Detach: RECEIVE is checked at delivery (dropped, PUBACKed upstream), PUBLISH closes.
    moto_iot.detach_policy(policyName=account["iot_policy"], target=identity_id)
    time.sleep(aws_gate.ATTACHMENT_CACHE_SECONDS + 0.1)
    plain_publish(broker["plain"], f"{own}/down/dropped", b"two")
    wait_for(lambda: gate.entries(mqtt="receive", topic=f"{own}/down/dropped"), "the dropped receive")
    client.send(publish_packet(f"{own}/up/after-detach", b"three", 10))
    assert client.receive() is None
    assert gate.entries(mqtt="publish", topic=f"{own}/up/after-detach", decision="deny")

    # Attached again: a foreign topic closes the connection.
    moto_iot.attach_policy(policyName=account["iot_policy"], target=identity_id)
    time.sleep(aws_gate.ATTACHMENT_CACHE_SECONDS + 0.1)
    client = WsMqtt(gate.wss_port, certificates["ca"], credentials)
    client.send(connect_packet(identity_id))
    assert client.receive()[0] == 0x20
    client.send(publish_packet(f"{account['identity_pool_id']}/someone-else/up", b"x", 11))
    assert client.receive() is None
    (denied,) = gate.entries(mqtt="publish", topic=f"{account['identity_pool_id']}/someone-else/up")
    assert denied["decision"] == "deny"


@needs_broker
def test_mqtt_policy_delay_and_guest_credentials(start_gate, account, certificates, moto_iot):
    gate = start_gate("--policy-delay", "2")
    identity_id, credentials = authenticated(gate, account)
    moto_iot.attach_policy(policyName=account["iot_policy"], target=identity_id)
    client = WsMqtt(gate.wss_port, certificates["ca"], credentials)
    client.send(connect_packet(identity_id))
    assert client.receive()[0] == 0x20, "a device's first attachment counts at once"
    client.close()
    moto_iot.detach_policy(policyName=account["iot_policy"], target=identity_id)
    time.sleep(1.1)  # the gate's attachment cache
    client = WsMqtt(gate.wss_port, certificates["ca"], credentials)
    client.send(connect_packet(identity_id))
    assert client.receive() is None, "detached: CONNECT closed"
    moto_iot.attach_policy(policyName=account["iot_policy"], target=identity_id)
    time.sleep(1.1)
    client = WsMqtt(gate.wss_port, certificates["ca"], credentials)
    client.send(connect_packet(identity_id))
    assert client.receive() is None, "an attachment again counts only --policy-delay seconds later"
    time.sleep(2.1)
    client = WsMqtt(gate.wss_port, certificates["ca"], credentials)
    client.send(connect_packet(identity_id))
    assert client.receive()[0] == 0x20
    client.close()
    # Guests: the unauth role allows no IoT action (IoT checks guests with IAM only).
    guest_id, guest = guest_classic(gate, account)
    client = WsMqtt(gate.wss_port, certificates["ca"], guest)
    client.send(connect_packet(guest_id))
    assert client.receive() is None
    assert "no identity-based policy" in gate.entries(mqtt="connect", client_id=guest_id)[0]["reason"]


def test_control_file_cuts_the_mqtt_network(start_gate, workdir):
    """--control "refuse": connections refused (a network cut), not closed after CONNECT."""
    control = workdir / "gate-mode"
    gate = start_gate("--control", str(control))
    socket.create_connection(("127.0.0.1", gate.wss_port), timeout=2).close()
    control.write_text("refuse")
    wait_for(lambda: gate.entries(mqtt="listener", decision="refuse"), "the cut")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", gate.wss_port), timeout=2)
    control.write_text("pass")
    wait_for(lambda: gate.entries(mqtt="listener", decision="pass"), "the network back")
    socket.create_connection(("127.0.0.1", gate.wss_port), timeout=2).close()


def test_a_request_signed_more_than_five_minutes_off_is_refused_as_aws_does():
    """AWS denies a signed request more than 5 minutes from its X-Amz-Date (IAM User Guide,
    "AWS Signature Version 4 for API requests"), in either direction; within that it passes."""
    import datetime
    now = datetime.datetime(2026, 12, 7, 9, 0, 0, tzinfo=datetime.timezone.utc)
    assert aws_gate.signature_time_problem("20261207T085600Z", now) is None
    assert aws_gate.signature_time_problem("20261207T090400Z", now) is None
    assert aws_gate.signature_time_problem("20261207T070000Z", now).startswith("Signature expired")
    assert aws_gate.signature_time_problem("20261207T110000Z", now).startswith(
        "Signature not yet current")
