#!/usr/bin/env python3
"""Enforces in front of moto and mosquitto what AWS enforces and the emulators do not.

moto applies no IAM, session or resource policy and mosquitto no IoT policy. This gate sits in front of both and authorizes
every call the daemon makes the way AWS would, from the CloudFormation template itself
(cloudformation/cognito.yml read at start-up, evaluated by cloudformation/tests/cfn.py with the
ids tests/support/provision.py made, policies evaluated by cloudformation/tests/iam.py):

HTTP (--http-port; allowed calls go to --upstream, Lambda invocations to --lambda)
  * Credentials are minted here: each GetCredentialsForIdentity (enhanced flow) and
    AssumeRoleWithWebIdentity (basic flow) answer gets a unique ASIA... key, secret and session
    token, remembered with its principal: role (the pool's unauthenticated role without Logins,
    its authenticated role with them; the RoleArn in the basic flow), identity id, session policy
    (AmazonCognitoUnAuthedIdentitiesSessionPolicy for enhanced-flow guests, from
    tests/support/data/) and expiration. Cognito itself assumes the pool's role, so its trust
    policy is checked in both flows.
  * GetId with Logins answers the identity already linked to that login (Cognito does; moto
    mints a new id per call): point the attach function's cognito-identity calls at the gate
    and it attaches to the device's own identity.
  * GetOpenIdToken is refused when the template's pool has AllowClassicFlow false; its token is
    remembered (identity, authenticated or not, 10 minutes) for AssumeRoleWithWebIdentity, which
    checks the role's trust policy (aud, amr) with it. Logins must hold a user-pool ID token of
    the template's pool and client (payload checked, not the signature).
  * Every signed call: unknown key or wrong session token -> the service's invalid-token error,
    expired -> its expired-token error; a signature that botocore, recomputing it with the
    minted secret from what arrived, does not get -> 403 InvalidSignatureException
    (SignatureDoesNotMatch for STS); then the action on its resource with the request context
    (aws:SourceIp = the TCP peer, aws:PrincipalArn, cognito-identity.amazonaws.com:sub/aud/amr):
    explicit Deny in any policy wins, otherwise the role's identity-based policy must allow, and
    so must the session policy when there is one; the secret's resource policy (the template's
    AWS::SecretsManager::ResourcePolicy) takes part. A denial is answered as that service answers
    it and never reaches moto: Secrets Manager and Cognito HTTP 400 JSON AccessDeniedException,
    Lambda and IoT 403 AccessDeniedException, STS 403 XML AccessDenied, with IAM's message
    ("User: <session ARN> is not authorized to perform: <action> on resource: <ARN> because no
    session policy allows the <action> action"). IoT's control plane answers an IAM denial with
    403 AccessDeniedException naming the target as resource (seen from AttachPolicy in the
    field), not 401 UnauthorizedException, which IoT keeps for other refusals.
  * Unsigned calls pass only for operations AWS serves unsigned (GetId, GetOpenIdToken,
    GetCredentialsForIdentity, InitiateAuth, SignUp, ..., AssumeRoleWithWebIdentity).

MQTT over wss (--wss-port, TLS with --cert/--key; forwards to mosquitto's wss listener on
127.0.0.1:--broker-port trusting --cafile)
  * The websocket upgrade's X-Amz-Credential names the principal; unknown or expired -> HTTP 403.
  * CONNECT (and its will topic), PUBLISH (+ iot:RetainPublish when retained), SUBSCRIBE and
    RECEIVE are authorized with the role's IAM policy (and session policy) and, for
    authenticated identities, the IoT policies attached to the identity id in moto
    (list_attached_policies + get_policy, looked up at most once a second); context
    cognito-identity.amazonaws.com:sub, iot:ClientId, aws:SourceIp (IoT policies only: AWS does
    not document aws:SourceIp for the IAM policies IoT Core evaluates, so an IAM statement that
    uses it raises). Refused as IoT Core does: CONNECT -> connection closed without CONNACK;
    PUBLISH -> connection closed; SUBSCRIBE -> SUBACK 0x80 for that filter; RECEIVE -> not
    delivered (PUBACKed to the broker so it does not resend). QoS 2 and MQTT 5 close the
    connection (IoT Core has no QoS 2; MQTT 5 is not modelled here).
  * --policy-delay S: an attachment that replaces a lost one counts only S seconds after the
    gate first sees it (IoT applies policy changes in minutes); a device's first attachment
    counts at once; a detach counts at the next lookup.

Anything a policy uses that this gate does not model (operators, condition keys, NotAction,
resource-based Allow, role mappings, managed policy ARNs...) raises: HTTP 500 InternalFailure
or a closed MQTT connection, logged with decision "error". It never passes silently.

Log (--log): {"ready": true} once both listeners accept, then one JSON line per decision:
HTTP {"t", "op", "principal": {"role", "authenticated", "flow", "akid"}, "source_ip", "decision":
"allow"|"deny"|"pass"|"minted"|"error", "reason"}; MQTT {"t", "mqtt": "upgrade"|"connect"|
"publish"|"subscribe"|"receive", "client_id", "topic"|"filters", "decision", "reason"}
("receive" only when denied). Tokens, passwords and secret values are never logged.

AWS documents followed:
  IAM policy evaluation logic (explicit deny, identity-based, resource-based, session policies):
    https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_evaluation-logic.html
    https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_evaluation-logic_policy-eval-basics.html
  Access denied error messages:
    https://docs.aws.amazon.com/IAM/latest/UserGuide/troubleshoot_access-denied.html
  Cognito identity pools, enhanced (simplified) vs basic (classic) flow, and the scope-down of
  enhanced-flow guest credentials:
    https://docs.aws.amazon.com/cognito/latest/developerguide/authentication-flow.html
    https://docs.aws.amazon.com/cognito/latest/developerguide/iam-roles.html
    https://docs.aws.amazon.com/cognito/latest/developerguide/role-trust-and-permissions.html
  The managed session policy (v3, edited 2024-11-01):
    https://docs.aws.amazon.com/aws-managed-policy/latest/reference/AmazonCognitoUnAuthedIdentitiesSessionPolicy.html
  IoT Core with Cognito identities (IAM policy and attached IoT policy; guests: IAM only):
    https://docs.aws.amazon.com/iot/latest/developerguide/cog-iot-policies.html
    https://docs.aws.amazon.com/iot/latest/developerguide/cognito-identities.html
    https://docs.aws.amazon.com/iot/latest/developerguide/iot-policy-actions.html
  STS AssumeRoleWithWebIdentity errors; Cognito GetOpenIdToken (token valid 10 minutes):
    https://docs.aws.amazon.com/STS/latest/APIReference/API_AssumeRoleWithWebIdentity.html
    https://docs.aws.amazon.com/cognitoidentity/latest/APIReference/API_GetOpenIdToken.html

Usage: aws_gate.py --account FILE --upstream URL [--lambda URL] --http-port P
                   --wss-port P --broker-port 8443 --cert server.crt --key server.key
                   --cafile ca.crt --log FILE [--device-cidrs 127.0.0.0/8,::1/128]
                   [--param Name=Value ...] [--policy-delay SECONDS] [--template FILE]
                   [--control FILE]
--template reads another copy of the template (tests of older stacks). --control FILE: "pass"
(or no file) serves; "refuse" closes the MQTT listener (new connections are refused) and drops
the open ones, as a network cut does, until the file says "pass" again; "outside" makes every
HTTP caller appear to come from 203.0.113.9 (TEST-NET-3), a device network outside DeviceCidrs.
"""
import argparse
import asyncio
import base64
import datetime
import http.client
import json
import os
import re
import secrets
import ssl
import string
import struct
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "cloudformation" / "tests"))
import cfn  # noqa: E402 - the template reader of the cloud-side tests
import iam  # noqa: E402 - their strict policy evaluator

SESSION_POLICY = Path(__file__).resolve().parent / "data" / "AmazonCognitoUnAuthedIdentitiesSessionPolicy.json"
COGNITO = "cognito-identity.amazonaws.com"
SUB, AUD, AMR = f"{COGNITO}:sub", f"{COGNITO}:aud", f"{COGNITO}:amr"
OPENID_TOKEN_SECONDS = 600  # GetOpenIdToken: "The OpenID token is valid for 10 minutes."
ENHANCED_SESSION_NAME = "CognitoIdentityCredentials"
ATTACHMENT_CACHE_SECONDS = 1.0
# Condition keys absent from every request the daemon makes (no VPC endpoint): absent, not unknown.
ABSENT_KEYS = {"aws:SourceVpce", "aws:SourceVpc", "aws:VpcSourceIp"}

# The test account's own keys (moto's): what the harness and the Lambda players sign with.
ADMIN_KEY = "testing"
# Operations AWS serves without a signature.
UNSIGNED = {
    ("cognito-identity", op) for op in ("GetId", "GetOpenIdToken", "GetCredentialsForIdentity",
                                        "UnlinkIdentity")
} | {
    ("cognito-idp", op) for op in (
        "InitiateAuth", "RespondToAuthChallenge", "SignUp", "ConfirmSignUp",
        "ResendConfirmationCode", "ForgotPassword", "ConfirmForgotPassword", "GetUser",
        "GlobalSignOut", "RevokeToken", "ChangePassword", "UpdateUserAttributes",
        "DeleteUser", "GetTokensFromRefreshToken")
} | {("sts", "AssumeRoleWithWebIdentity")}
TARGET_PREFIXES = {"AWSCognitoIdentityService": "cognito-identity",
                   "AWSCognitoIdentityProviderService": "cognito-idp",
                   "secretsmanager": "secretsmanager"}
INVOKE = re.compile(r"^/2015-03-31/functions/([^/]+)/invocations$")
ATTACH = re.compile(r"^/target-policies/([^/]+)$")
CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/[^/]+/([^/]+)/([^/]+)/aws4_request")


class NotModelled(Exception):
    """A policy or request uses something this gate does not model."""


class Context(dict):
    """A request context in which a condition key the gate does not model raises instead of
    counting as absent (iam.py asks `key in context`)."""

    def __init__(self, values, undocumented=None):
        super().__init__(values)
        self.undocumented = dict(undocumented or {})

    def __contains__(self, key):
        if key in self.undocumented:
            raise NotModelled(self.undocumented[key])
        if dict.__contains__(self, key):
            return True
        if key in ABSENT_KEYS:
            return False
        raise NotModelled(f"condition key {key} is not modelled by the gate")


@dataclass
class Role:
    arn: str
    statements: list
    trust: list
    max_session: int

    @property
    def name(self):
        return self.arn.rsplit("/", 1)[1]


@dataclass
class Principal:
    akid: str
    token: str
    role: Role
    session: str
    identity_id: str
    authenticated: bool
    flow: str  # "enhanced" or "classic"
    session_policy: list  # statements, or None
    expires: float
    account: str
    secret: str  # never logged: only for checking signatures

    @property
    def arn(self):
        return f"arn:aws:sts::{self.account}:assumed-role/{self.role.name}/{self.session}"

    def summary(self):
        return {"role": self.role.name, "authenticated": self.authenticated, "flow": self.flow,
                "akid": self.akid}


def getatt_target(node):
    if not (isinstance(node, dict) and list(node) == ["Fn::GetAtt"] and node["Fn::GetAtt"][1] == "Arn"):
        raise NotModelled(f"a role given as {node!r}, not !GetAtt <role>.Arn")
    return node["Fn::GetAtt"][0]


class Cloud:
    """The template evaluated with the provisioned ids: the identity pool, its roles, the secret's
    resource policy."""

    def __init__(self, account, template_path, device_cidrs, overrides):
        template = cfn.load_template(template_path)
        resources = template["Resources"]

        def only(kind):
            found = [k for k, v in resources.items() if v["Type"] == kind]
            if len(found) != 1:
                raise NotModelled(f"{len(found)} resources of type {kind}")
            return found[0]

        self.account, self.region = account["account_id"], account["region"]
        self.pool_id, self.user_pool_id = account["identity_pool_id"], account["user_pool_id"]
        self.client_id = account["client_id"]
        self.secret_arn, self.secret_name = account["secret_arn"], account["secret_id"]
        pool_logical = only("AWS::Cognito::IdentityPool")
        attachment = resources[only("AWS::Cognito::IdentityPoolRoleAttachment")]["Properties"]
        if set(attachment) - {"IdentityPoolId", "Roles"}:
            raise NotModelled("identity pool role mappings")
        role_ids = {kind: getatt_target(attachment["Roles"][kind])
                    for kind in ("authenticated", "unauthenticated")}
        parameters = {"Prefix": account["prefix"], "AllowedEmailDomain": account["email_domain"],
                      "DeviceCidrs": device_cidrs, "RegistrationMode": account["registration_mode"]}
        for name, value in overrides.items():
            if name not in template["Parameters"]:
                raise SystemExit(f"--param {name}: the template has no such parameter")
            parameters[name] = value
        parameters = {k: v for k, v in parameters.items() if k in template["Parameters"]}
        attributes = {f"{role_ids['unauthenticated']}.Arn": account["unauth_role_arn"],
                      f"{role_ids['authenticated']}.Arn": account["auth_role_arn"],
                      "AppUser.SecretArn": self.secret_arn, "AppUser.SecretName": self.secret_name}
        for logical, key in (("AttachPolicyFunction", "attach_function_arn"),
                             ("PreSignUpFunctionRole", "pre_sign_up_role_arn")):
            if logical in resources:
                attributes[f"{logical}.Arn"] = account[key]
        refs = {only("AWS::Cognito::UserPool"): self.user_pool_id,
                only("AWS::Cognito::UserPoolClient"): self.client_id, pool_logical: self.pool_id}
        stack = cfn.Stack(template, parameters, region=self.region, account=self.account,
                          refs=refs, attributes=attributes)
        pool = stack.properties(pool_logical)
        for key in ("SupportedLoginProviders", "DeveloperProviderName", "OpenIdConnectProviderARNs",
                    "SamlProviderARNs"):
            if pool.get(key):
                raise NotModelled(f"identity pool {key}")
        self.allow_classic = pool.get("AllowClassicFlow") in (True, "true")
        self.allow_guests = pool.get("AllowUnauthenticatedIdentities") in (True, "true")
        self.providers = {p["ProviderName"]: p["ClientId"] for p in pool.get("CognitoIdentityProviders", [])}
        self.roles = {}
        self.pool_roles = {}
        for kind, logical in role_ids.items():
            role = self._role(stack, resources, logical, attributes[f"{logical}.Arn"])
            self.roles[role.arn] = role
            self.pool_roles[kind] = role
        self.secret_policy = []
        for logical, resource in resources.items():
            if resource["Type"] == "AWS::SecretsManager::ResourcePolicy" and "Condition" not in resource:
                props = stack.properties(logical)
                if props["SecretId"] != self.secret_arn:
                    raise NotModelled(f"{logical} is for another secret: {props['SecretId']}")
                self.secret_policy += iam.statements(props["ResourcePolicy"])
            elif resource["Type"] == "AWS::SecretsManager::ResourcePolicy":
                raise NotModelled(f"{logical} has a Condition")
        self.session_policy = iam.statements(
            json.loads(SESSION_POLICY.read_text())["PolicyDocument"])

    @staticmethod
    def _role(stack, resources, logical, arn):
        props = stack.properties(logical)
        for key in ("ManagedPolicyArns", "PermissionsBoundary"):
            if props.get(key):
                raise NotModelled(f"{logical} {key}")
        statements = iam.role_statements(props)
        for other, resource in resources.items():
            if resource["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy") and \
                    {"Ref": logical} in resource["Properties"].get("Roles", []):
                statements += iam.statements(stack.properties(other)["PolicyDocument"])
        return Role(arn, statements, iam.statements(props["AssumeRolePolicyDocument"]),
                    int(props.get("MaxSessionDuration", 3600)))

    def trusts(self, role, authenticated, issuer_pool):
        amr = ["authenticated", f"cognito-idp.{self.region}.amazonaws.com/{self.user_pool_id}"] \
            if authenticated else ["unauthenticated"]
        context = Context({AUD: issuer_pool, AMR: amr})
        return iam.evaluate(role.trust, "sts:AssumeRoleWithWebIdentity", None, context,
                            principal={"Federated": COGNITO}) == iam.ALLOW

    def decide(self, principal, action, resource, context, resource_policy=()):
        """(allowed, IAM's message) for a request of `principal`."""
        identity = iam.evaluate(principal.role.statements, action, resource, context)
        session = None if principal.session_policy is None else \
            iam.evaluate(principal.session_policy, action, resource, context)
        on_resource = iam.evaluate(resource_policy, action, resource, context,
                                   principal={"AWS": [principal.role.arn, principal.arn]})
        head = f"User: {principal.arn} is not authorized to perform: {action} on resource: {resource} "
        for decision, kind in ((identity, "an identity-based"), (on_resource, "a resource-based"),
                               (session, "a session")):
            if decision == iam.DENY:
                return False, head + f"with an explicit deny in {kind} policy"
        if on_resource == iam.ALLOW:
            raise NotModelled("a resource-based policy that allows")
        if identity != iam.ALLOW:
            return False, head + f"because no identity-based policy allows the {action} action"
        if session not in (None, iam.ALLOW):
            return False, head + f"because no session policy allows the {action} action"
        return True, "allowed"

    def iot_decide(self, principal, action, resource, client_id, source_ip, iot_policies):
        """IoT Core's data plane: the role (and session policy); for authenticated identities
        also the attached IoT policies."""
        values = {SUB: principal.identity_id, "iot:ClientId": client_id}
        undocumented = {"aws:SourceIp": "aws:SourceIp in an IAM policy evaluated by IoT Core "
                                        "(documented for IoT policies only)"}
        allowed, message = self.decide(principal, action, resource, Context(values, undocumented))
        if not allowed:
            return False, "IAM: " + message.split(f" on resource: {resource} ", 1)[1]
        if not principal.authenticated:
            return True, "allowed by the role (unauthenticated identity: IAM only)"
        statements = []
        for name, document in iot_policies:
            if document.get("Version") != "2012-10-17":
                raise NotModelled(f"IoT policy {name} version {document.get('Version')}")
            statements += iam.statements(document)
        decision = iam.evaluate(statements, action, resource,
                                Context(dict(values, **{"aws:SourceIp": source_ip})))
        if decision == iam.DENY:
            return False, "explicit deny in an attached IoT policy"
        if decision != iam.ALLOW:
            names = ", ".join(n for n, _ in iot_policies) or "none"
            return False, f"no attached IoT policy allows it (attached: {names})"
        return True, "allowed"


def new_key():
    return "ASIA" + "".join(secrets.choice(string.ascii_uppercase + "234567") for _ in range(16))


# AWS denies a signed request that reaches it more than five minutes from the time stamp it
# was signed with ("Protect against potential replay attacks", IAM User Guide, "AWS Signature
# Version 4 for API requests": https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_aws-signing.html);
# JSON services answer 403 InvalidSignatureException "Signature expired: ...".
SIGNATURE_SKEW = datetime.timedelta(minutes=5)


def signature_time_problem(amz_date, now=None):
    """The refusal's message for a request signed at `amz_date` (X-Amz-Date), or None."""
    try:
        signed = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return None  # no time stamp to judge: the signature check is moto's (it does none)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    fmt = "%Y%m%dT%H%M%SZ"
    if signed < now - SIGNATURE_SKEW:
        return (f"Signature expired: {signed.strftime(fmt)} is now earlier than "
                f"{(now - SIGNATURE_SKEW).strftime(fmt)} ({now.strftime(fmt)} - 5 min.)")
    if signed > now + SIGNATURE_SKEW:
        return (f"Signature not yet current: {signed.strftime(fmt)} is still later than "
                f"{(now + SIGNATURE_SKEW).strftime(fmt)} ({now.strftime(fmt)} + 5 min.)")
    return None


# AWS recomputes every signed request's signature from what arrived and the key's secret, and
# refuses a mismatch: 403 InvalidSignatureException (JSON and REST services) or
# SignatureDoesNotMatch (STS), "The request signature we calculated does not match the
# signature you provided..." (IAM User Guide, "Troubleshoot signing errors":
# https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv-troubleshooting.html).
SIGNATURE_MISMATCH = ("The request signature we calculated does not match the signature you "
                      "provided. Check your AWS Secret Access Key and signing method. Consult "
                      "the service documentation for details.")
AUTHORIZATION = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
                           r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})$")


def signature_mismatch(secret, method, path, headers, body):
    """None when the SigV4 Authorization header is what `secret` signs for this request,
    recomputed by botocore (an implementation independent of the daemon's aws-sigv4) from the
    method, path, the headers the client listed as signed, and the body; else the reason."""
    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    match = AUTHORIZATION.match(headers.get("Authorization", ""))
    if not match:
        return "not a SigV4 Authorization header"
    akid, day, region, service, signed_headers, signature = match.groups()
    amz_date = headers.get("X-Amz-Date", "")
    if not amz_date.startswith(day):
        return "the credential scope's day is not X-Amz-Date's"
    names = signed_headers.split(";")
    missing = [name for name in names if headers.get(name) is None]
    if missing:
        return f"signed headers missing from the request: {missing}"

    class Listed(botocore.auth.SigV4Auth):
        def headers_to_sign(self, request):  # exactly the client's list, as AWS reads it
            signed = super().headers_to_sign(request)
            for name in list(signed.keys()):
                del signed[name]
            for name in names:
                signed[name] = headers[name]
            return signed

    request = AWSRequest(method=method, url=f"http://{headers.get('Host', '')}{path}",
                         headers={name: headers[name] for name in names}, data=body)
    request.context["timestamp"] = amz_date
    signer = Listed(Credentials(akid, secret, headers.get("X-Amz-Security-Token")), service, region)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    return None if expected == signature else "signature mismatch"


# Where a device outside the stack's DeviceCidrs appears to come from (--control outside).
OUTSIDE_ADDRESS = "203.0.113.9"


class Gate:
    """State shared by both sides: the principals minted, the OpenID tokens, IoT attachments."""

    def __init__(self, args, cloud):
        self.args, self.cloud = args, cloud
        self.lock = threading.Lock()
        self.principals = {}
        self.openid_tokens = {}
        self.linked = {}  # (pool, logins' (provider, sub)) -> identity id
        self.attached = {}  # identity id -> (looked up at, [(name, document)])
        self.first_seen = {}  # (identity id, policy) -> when the gate first saw it attached
        self.ever_attached = set()  # (identity id, policy) that counted once
        self.log_file = open(args.log, "a", buffering=1, encoding="utf-8")

        import boto3  # noqa: E402 - boto3 is slow to import; only the gate needs it

        self.iot = boto3.client("iot", region_name=cloud.region, endpoint_url=args.upstream,
                                aws_access_key_id="testing", aws_secret_access_key="testing")


    def control_mode(self):
        try:
            return Path(self.args.control).read_text().strip() if self.args.control else "pass"
        except OSError:
            return "pass"

    def log(self, **entry):
        with self.lock:
            self.log_file.write(json.dumps({"t": time.time(), **entry}) + "\n")

    def mint(self, role, identity_id, authenticated, flow, session_policy, session, expires):
        secret = base64.b64encode(secrets.token_bytes(30)).decode()
        principal = Principal(new_key(), base64.b64encode(secrets.token_bytes(96)).decode(), role,
                              session, identity_id, authenticated, flow, session_policy, expires,
                              self.cloud.account, secret)
        with self.lock:
            self.principals[principal.akid] = principal
        return principal, secret

    def principal(self, akid, token):
        """(principal, None) or (None, "invalid" | "expired")."""
        with self.lock:
            found = self.principals.get(akid)
        if found is None or token != found.token:
            return None, "invalid"
        if time.time() >= found.expires:
            return None, "expired"
        return found, None

    def iot_policies(self, identity_id):
        """The IoT policies attached to identity_id that count now (cached ATTACHMENT_CACHE_SECONDS)."""
        now = time.monotonic()
        with self.lock:
            cached = self.attached.get(identity_id)
        if cached and now - cached[0] < ATTACHMENT_CACHE_SECONDS:
            return cached[1]
        names = [p["policyName"] for p in
                 self.iot.list_attached_policies(target=identity_id)["policies"]]
        counted = []
        with self.lock:
            for key in [k for k in self.first_seen if k[0] == identity_id and k[1] not in names]:
                del self.first_seen[key]
            for name in names:
                # The delay plays a policy change reaching IoT Core; a device's first
                # attachment counts at once, so only an attachment that replaces a lost one waits.
                first = (identity_id, name) not in self.ever_attached
                if first or now - self.first_seen.setdefault((identity_id, name), now) >= self.args.policy_delay:
                    counted.append(name)
                    self.ever_attached.add((identity_id, name))
        documents = [(name, json.loads(self.iot.get_policy(policyName=name)["policyDocument"]))
                     for name in counted]
        with self.lock:
            self.attached[identity_id] = (now, documents)
        return documents


# ----------------------------------------------------------------------------- HTTP side

def error_shape(service, kind):
    """(status, code) with which `service` answers `kind` of refusal."""
    table = {
        "json": {"invalid": (400, "UnrecognizedClientException"), "expired": (400, "ExpiredTokenException"),
                 "missing": (400, "MissingAuthenticationTokenException"),
                 "denied": (400, "AccessDeniedException")},
        "rest": {"invalid": (403, "UnrecognizedClientException"), "expired": (403, "ExpiredTokenException"),
                 "missing": (403, "MissingAuthenticationTokenException"),
                 "denied": (403, "AccessDeniedException")},
        "sts": {"invalid": (403, "InvalidClientTokenId"), "expired": (400, "ExpiredToken"),
                "missing": (403, "MissingAuthenticationToken"), "denied": (403, "AccessDenied")},
    }
    family = "sts" if service == "sts" else "rest" if service in ("lambda", "iot") else "json"
    return table[family][kind]


MESSAGES = {"invalid": "The security token included in the request is invalid.",
            "expired": "The security token included in the request is expired",
            "missing": "Missing Authentication Token"}


def parse_jwt(token):
    try:
        payload = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, AttributeError):
        return None


def make_handler(gate):
    cloud = gate.cloud
    upstream = urllib.parse.urlsplit(gate.args.upstream)
    lambda_url = urllib.parse.urlsplit(gate.args.lambda_url or gate.args.upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):
            pass

        # -- plumbing
        def read_body(self):
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return body
                    body += self.rfile.read(size)
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def reply(self, status, headers, data):
            self.send_response(status)
            for key, value in headers:
                if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def forward(self, body, target=upstream):
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "transfer-encoding", "content-length")}
                headers["Host"] = target.netloc
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                return response.status, response.getheaders(), response.read()
            finally:
                conn.close()

        def refuse(self, service, kind, message=None, code=None, status=None):
            default_status, default_code = error_shape(service, kind) if kind else (status, code)
            status, code = status or default_status, code or default_code
            message = message or MESSAGES[kind]
            request_id = str(uuid.uuid4())
            if service == "sts":
                data = (f'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
                        f"<Error><Type>Sender</Type><Code>{code}</Code><Message>{xml_escape(message)}"
                        f"</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>").encode()
                headers = [("Content-Type", "text/xml")]
            else:
                key = "Message" if service in ("secretsmanager", "lambda") else "message"
                document = {key: message}
                if service in ("cognito-identity", "cognito-idp", "secretsmanager"):
                    document = {"__type": code, **document}
                    content_type = "application/x-amz-json-1.1"
                else:
                    content_type = "application/json"
                if service == "lambda" and code == "AccessDeniedException":
                    document["Type"] = "User"
                data = json.dumps(document).encode()
                headers = [("Content-Type", content_type), ("x-amzn-ErrorType", code)]
            self.reply(status, headers + [("x-amzn-RequestId", request_id)], data)

        # -- dispatch
        def handle_any(self):
            body = self.read_body()
            peer = OUTSIDE_ADDRESS if gate.control_mode() == "outside" else self.client_address[0]
            path = urllib.parse.urlsplit(self.path)
            service, op, params = self.classify(path, body)
            entry = {"op": f"{service}:{op}", "source_ip": peer}
            try:
                self.dispatch(service, op, params, body, path, peer, entry)
            except NotModelled as exc:
                gate.log(**entry, decision="error", reason=f"not modelled: {exc}")
                self.refuse(service, None, f"aws_gate: not modelled: {exc}", "InternalFailure", 500)
            except Exception as exc:  # noqa: BLE001 - a gate bug must be visible, not pass
                gate.log(**entry, decision="error", reason=f"{type(exc).__name__}: {exc}",
                         trace=traceback.format_exc(limit=5))
                self.refuse(service, None, f"aws_gate: {type(exc).__name__}", "InternalFailure", 500)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = handle_any

        def classify(self, path, body):
            target = self.headers.get("X-Amz-Target", "")
            if path.path.startswith("/moto-api"):
                return "moto-api", path.path, {}
            if target:
                prefix, _, op = target.rpartition(".")
                params = json.loads(body or b"{}")
                return TARGET_PREFIXES.get(prefix, prefix), op, params
            if (match := INVOKE.match(path.path)) and self.command == "POST":
                query = urllib.parse.parse_qs(path.query)
                return "lambda", "Invoke", {"FunctionName": urllib.parse.unquote(match.group(1)),
                                            "Qualifier": query.get("Qualifier", [None])[0]}
            if (match := ATTACH.match(path.path)) and self.command == "PUT":
                params = json.loads(body or b"{}")
                params["policyName"] = urllib.parse.unquote(match.group(1))
                return "iot", "AttachPolicy", params
            form = dict(urllib.parse.parse_qsl(path.query))
            if "x-www-form-urlencoded" in self.headers.get("Content-Type", ""):
                form.update(urllib.parse.parse_qsl(body.decode()))
            if "Action" in form:
                return "sts", form["Action"], form
            credential = CREDENTIAL.search(self.headers.get("Authorization", ""))
            return (credential.group(3) if credential else "unknown"), f"{self.command} {path.path}", {}

        def dispatch(self, service, op, params, body, path, peer, entry):
            if service == "moto-api":
                gate.log(**entry, decision="pass")
                self.reply(*self.forward(body))
                return
            credential = CREDENTIAL.search(self.headers.get("Authorization", ""))
            principal = None
            if credential and credential.group(1) == ADMIN_KEY and (service, op) in UNSIGNED:
                # The account's own (test) credentials, e.g. the attach function's boto3: valid
                # keys, and AWS serves these operations to any caller.
                credential = None
            if credential:
                skewed = signature_time_problem(self.headers.get("X-Amz-Date", ""))
                if skewed:
                    gate.log(**entry, akid=credential.group(1), decision="deny", reason=skewed)
                    self.refuse(service, None, skewed, "InvalidSignatureException", 403)
                    return
                principal, problem = gate.principal(credential.group(1),
                                                    self.headers.get("X-Amz-Security-Token"))
                if problem:
                    gate.log(**entry, akid=credential.group(1), decision="deny", reason=f"{problem} token")
                    self.refuse(service, problem)
                    return
                mismatch = signature_mismatch(principal.secret, self.command, self.path,
                                              self.headers, body)
                if mismatch:
                    gate.log(**entry, akid=credential.group(1), decision="deny", reason=mismatch)
                    code = "SignatureDoesNotMatch" if service == "sts" else "InvalidSignatureException"
                    self.refuse(service, None, SIGNATURE_MISMATCH, code, 403)
                    return
                entry["principal"] = principal.summary()
            if (service, op) in UNSIGNED:
                handler = getattr(self, f"op_{op}", None)
                if handler:
                    handler(service, params, body, entry)
                else:
                    gate.log(**entry, decision="pass")
                    self.reply(*self.forward(body))
                return
            if principal is None:
                gate.log(**entry, decision="deny", reason="unsigned")
                self.refuse(service, "missing")
                return
            if (service, op) == ("sts", "GetCallerIdentity"):  # needs no permission
                gate.log(**entry, decision="allow", reason="GetCallerIdentity needs no permission")
                self.reply(200, [("Content-Type", "text/xml")], caller_identity(principal))
                return
            action, resource, resource_policy, reason = self.resource_of(service, op, params)
            context = Context({"aws:SourceIp": peer, "aws:PrincipalArn": principal.role.arn,
                               "aws:PrincipalAccount": cloud.account, SUB: principal.identity_id,
                               AUD: cloud.pool_id,
                               AMR: ["authenticated"] if principal.authenticated else ["unauthenticated"]})
            allowed, message = cloud.decide(principal, action, resource, context, resource_policy)
            if not allowed:
                gate.log(**entry, decision="deny", reason=message)
                self.refuse(service, "denied", message)
                return
            gate.log(**entry, decision="allow", reason=reason or message)
            self.reply(*self.forward(body, lambda_url if service == "lambda" else upstream))

        def resource_of(self, service, op, params):
            """(action, resource ARN, resource policy, note) of a signed call."""
            action = f"{service}:{op}"
            if service == "secretsmanager" and op in ("GetSecretValue", "DescribeSecret"):
                secret = params.get("SecretId", "")
                ours = secret in (cloud.secret_name, cloud.secret_arn) or (
                    secret.startswith("arn:") and cloud.secret_arn.startswith(secret + "-"))
                if ours:
                    return action, cloud.secret_arn, cloud.secret_policy, None
                arn = secret if secret.startswith("arn:") else \
                    f"arn:aws:secretsmanager:{cloud.region}:{cloud.account}:secret:{secret}"
                return action, arn, (), None
            if service == "lambda":
                name = params["FunctionName"]
                arn = name if name.startswith("arn:") else \
                    f"arn:aws:lambda:{cloud.region}:{cloud.account}:function:{name}"
                if params.get("Qualifier"):
                    arn += ":" + params["Qualifier"]
                return "lambda:InvokeFunction", arn, (), None
            if service == "iot" and op == "AttachPolicy":
                # No IAM resource type for a Cognito identity: IoT names the target.
                return action, params.get("target", ""), (), None
            return action, "*", (), f"resource of {action} not modelled: evaluated on *"

        # -- operations with their own rules
        def logins_problem(self, params):
            """Why Cognito would refuse the Logins, or None."""
            for provider, token in (params.get("Logins") or {}).items():
                if provider not in cloud.providers:
                    return "NotAuthorizedException", f"Invalid login token. Issuer {provider} is not configured for this identity pool."
                claims = parse_jwt(token)
                if not claims or claims.get("token_use") != "id":
                    return "NotAuthorizedException", "Invalid login token. Not a valid OpenId Connect identity token."
                if claims.get("iss") != f"https://{provider}" or claims.get("aud") != cloud.providers[provider]:
                    return "NotAuthorizedException", "Invalid login token. Incorrect token audience."
                if claims.get("exp", 0) <= time.time():
                    return "NotAuthorizedException", "Invalid login token. Token expired."
            return None

        def cognito_refusal(self, entry, code, message):
            gate.log(**entry, decision="deny", reason=f"{code}: {message}")
            self.refuse("cognito-identity", None, message, code, 400)

        def op_GetId(self, service, params, body, entry):
            problem = self.logins_problem(params)
            if problem:
                self.cognito_refusal(entry, *problem)
                return
            # Cognito answers the same login with the same identity; moto mints a new one each
            # time: the gate keeps the first, so the attach function, asking with
            # the device's token, attaches to the device's identity.
            logins = sorted((provider, parse_jwt(token)["sub"])
                            for provider, token in (params.get("Logins") or {}).items())
            key = (params.get("IdentityPoolId"), tuple(logins))
            with gate.lock:
                linked = gate.linked.get(key) if logins else None
            if linked:
                gate.log(**entry, decision="pass", reason="the identity already linked to this login")
                self.reply(200, [("Content-Type", "application/x-amz-json-1.1")],
                           json.dumps({"IdentityId": linked}).encode())
                return
            status, headers, data = self.forward(body)
            if status == 200 and logins:
                with gate.lock:
                    gate.linked.setdefault(key, json.loads(data)["IdentityId"])
            gate.log(**entry, decision="pass")
            self.reply(status, headers, data)

        def op_GetOpenIdToken(self, service, params, body, entry):
            if not cloud.allow_classic:
                self.cognito_refusal(entry, "InvalidParameterException",
                                     "Basic (classic) flow is not enabled, please use enhanced flow.")
                return
            problem = self.logins_problem(params)
            if problem:
                self.cognito_refusal(entry, *problem)
                return
            status, headers, data = self.forward(body)
            if status == 200:
                token = json.loads(data)["Token"]
                with gate.lock:
                    gate.openid_tokens[token] = (params["IdentityId"], cloud.pool_id,
                                                 bool(params.get("Logins")), time.time())
            gate.log(**entry, decision="pass", authenticated=bool(params.get("Logins")))
            self.reply(status, headers, data)

        def op_GetCredentialsForIdentity(self, service, params, body, entry):
            authenticated = bool(params.get("Logins"))
            if params.get("CustomRoleArn"):
                raise NotModelled("GetCredentialsForIdentity CustomRoleArn (role mappings)")
            if not authenticated and not cloud.allow_guests:
                self.cognito_refusal(entry, "NotAuthorizedException",
                                     "Unauthenticated access is not supported for this identity pool.")
                return
            problem = self.logins_problem(params)
            if problem:
                self.cognito_refusal(entry, *problem)
                return
            role = cloud.pool_roles["authenticated" if authenticated else "unauthenticated"]
            if not cloud.trusts(role, authenticated, cloud.pool_id):
                self.cognito_refusal(entry, "InvalidIdentityPoolConfigurationException",
                                     "Invalid identity pool configuration. Check assigned IAM roles for this pool.")
                return
            status, headers, data = self.forward(body)
            if status != 200:
                gate.log(**entry, decision="pass", reason=f"upstream {status}")
                self.reply(status, headers, data)
                return
            answer = json.loads(data)
            credentials = answer["Credentials"]
            principal, secret = gate.mint(
                role, params["IdentityId"], authenticated, "enhanced",
                None if authenticated else cloud.session_policy, ENHANCED_SESSION_NAME,
                float(credentials["Expiration"]))
            credentials.update(AccessKeyId=principal.akid, SecretKey=secret,
                               SessionToken=principal.token)
            gate.log(**{**entry, "principal": principal.summary()}, decision="minted",
                     session_policy=None if authenticated else SESSION_POLICY.stem)
            self.reply(status, headers, json.dumps(answer).encode())

        def op_AssumeRoleWithWebIdentity(self, service, params, body, entry):
            if params.get("PolicyArns.member.1.arn"):
                raise NotModelled("AssumeRoleWithWebIdentity PolicyArns")
            token = params.get("WebIdentityToken", "")
            with gate.lock:
                facts = gate.openid_tokens.get(token)
            role = cloud.roles.get(params.get("RoleArn", ""))
            if facts is None:
                gate.log(**entry, decision="deny", reason="unknown web identity token")
                self.refuse("sts", None, "The web identity token that was passed could not be "
                            "validated by AWS. Get a new identity token from the identity provider "
                            "and then retry the request.", "InvalidIdentityToken", 400)
                return
            identity_id, pool_id, authenticated, issued = facts
            if time.time() > issued + OPENID_TOKEN_SECONDS:
                gate.log(**entry, decision="deny", reason="expired web identity token")
                self.refuse("sts", None, "Token expired: the web identity token is older than 10 minutes",
                            "ExpiredTokenException", 400)
                return
            if role is None or not cloud.trusts(role, authenticated, pool_id):
                gate.log(**entry, decision="deny",
                         reason=f"trust policy of {params.get('RoleArn')} does not allow this token "
                                f"({'authenticated' if authenticated else 'unauthenticated'})")
                self.refuse("sts", "denied", "Not authorized to perform sts:AssumeRoleWithWebIdentity")
                return
            duration = int(params.get("DurationSeconds") or 3600)
            if duration > role.max_session:
                gate.log(**entry, decision="deny", reason="DurationSeconds over MaxSessionDuration")
                self.refuse("sts", None, f"The requested DurationSeconds exceeds the MaxSessionDuration "
                            f"set for this role.", "ValidationError", 400)
                return
            session_policy = iam.statements(json.loads(params["Policy"])) if params.get("Policy") else None
            status, headers, data = self.forward(body)
            if status != 200:
                gate.log(**entry, decision="pass", reason=f"upstream {status}")
                self.reply(status, headers, data)
                return
            text = data.decode()
            expiration = re.search(r"<Expiration>([^<]+)</Expiration>", text).group(1)
            expires = datetime.datetime.fromisoformat(expiration.replace("Z", "+00:00")).timestamp()
            principal, secret = gate.mint(role, identity_id, authenticated, "classic", session_policy,
                                          params.get("RoleSessionName", ""), expires)
            for tag, value in (("AccessKeyId", principal.akid), ("SecretAccessKey", secret),
                               ("SessionToken", principal.token), ("Arn", principal.arn)):
                text = re.sub(rf"<{tag}>[^<]*</{tag}>", f"<{tag}>{value}</{tag}>", text, count=1)
            gate.log(**{**entry, "principal": principal.summary()}, decision="minted")
            self.reply(status, headers, text.encode())

    return Handler


def xml_escape(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def caller_identity(principal):
    return (f'<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
            f"<GetCallerIdentityResult><Arn>{principal.arn}</Arn>"
            f"<UserId>AROA{principal.akid[4:]}:{principal.session}</UserId>"
            f"<Account>{principal.account}</Account></GetCallerIdentityResult>"
            f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata>"
            f"</GetCallerIdentityResponse>").encode()


# ----------------------------------------------------------------------------- MQTT side

def encode_length(n):
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def split_packets(buffer):
    """Complete MQTT packets at the start of buffer, and the rest."""
    packets, offset = [], 0
    while offset + 2 <= len(buffer):
        length, multiplier, index = 0, 1, offset + 1
        while True:
            if index >= len(buffer):
                return packets, buffer[offset:]
            byte = buffer[index]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            index += 1
            if not byte & 0x80:
                break
        if index + length > len(buffer):
            break
        packets.append(buffer[offset:index + length])
        offset = index + length
    return packets, buffer[offset:]


def body_of(packet):
    index = 1
    while packet[index] & 0x80:
        index += 1
    return packet[index + 1:]


def read_string(data, index):
    (length,) = struct.unpack(">H", data[index:index + 2])
    return data[index + 2:index + 2 + length].decode("utf-8"), index + 2 + length


def frame(opcode, payload, mask):
    head = bytes([0x80 | opcode])
    bit = 0x80 if mask else 0
    if len(payload) < 126:
        head += bytes([bit | len(payload)])
    elif len(payload) < 65536:
        head += bytes([bit | 126]) + struct.pack(">H", len(payload))
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", len(payload))
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def read_frame(reader):
    head = await reader.readexactly(2)
    length = head[1] & 0x7F
    if length == 126:
        (length,) = struct.unpack(">H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack(">Q", await reader.readexactly(8))
    key = await reader.readexactly(4) if head[1] & 0x80 else b""
    payload = await reader.readexactly(length)
    if key:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head[0] & 0x0F, payload


class Closed(Exception):
    """The connection is closed as IoT Core closes it."""


class MqttConnection:
    def __init__(self, gate, principal, peer, client, broker):
        self.gate, self.principal, self.peer = gate, principal, peer
        self.client, self.broker = client, broker  # (reader, writer) pairs
        self.client_id = None
        self.pending = {}  # SUBSCRIBE packet id -> [allowed per filter]

    def log(self, kind, decision, reason, **fields):
        self.gate.log(mqtt=kind, client_id=self.client_id, identity_id=self.principal.identity_id,
                      source_ip=self.peer, decision=decision, reason=reason, **fields)

    async def allowed(self, action, kind, name):
        cloud = self.gate.cloud
        resource = f"arn:aws:iot:{cloud.region}:{cloud.account}:{kind}/{name}"
        policies = await asyncio.to_thread(self.gate.iot_policies, self.principal.identity_id) \
            if self.principal.authenticated else []
        return cloud.iot_decide(self.principal, action, resource, self.client_id or "", self.peer,
                                policies)

    async def from_client(self, packet):
        """What to send the broker for this client packet (raises Closed)."""
        kind = packet[0] >> 4
        body = body_of(packet)
        if kind != 1 and self.client_id is None:
            self.log("protocol", "deny", f"packet type {kind} before CONNECT")
            raise Closed
        if kind == 1:
            return await self.connect(body, packet)
        if kind == 3:
            return await self.publish(packet[0], body, packet)
        if kind == 8:
            return await self.subscribe(body)
        return packet

    async def connect(self, body, packet):
        if self.client_id is not None:
            self.log("connect", "deny", "a second CONNECT")
            raise Closed
        name, index = read_string(body, 0)
        level, flags = body[index], body[index + 1]
        index += 4
        if (name, level) != ("MQTT", 4):
            self.client_id = ""
            self.log("connect", "deny", f"not modelled: protocol {name} level {level}")
            raise Closed
        self.client_id, index = read_string(body, index)
        checks = [("iot:Connect", "client", self.client_id)]
        if flags & 0x04:
            will_topic, index = read_string(body, index)
            checks.append(("iot:Publish", "topic", will_topic))
            if flags & 0x20:
                checks.append(("iot:RetainPublish", "topic", will_topic))
        for action, kind, name in checks:
            ok, reason = await self.allowed(action, kind, name)
            if not ok:
                self.log("connect", "deny", f"{action} {kind}/{name}: {reason}")
                raise Closed
        self.log("connect", "allow", "allowed")
        return packet

    async def publish(self, first, body, packet):
        qos, retain = (first >> 1) & 3, first & 1
        topic, _ = read_string(body, 0)
        if qos > 1:
            self.log("publish", "deny", f"QoS {qos}: IoT Core supports QoS 0 and 1", topic=topic)
            raise Closed
        actions = ["iot:Publish"] + (["iot:RetainPublish"] if retain else [])
        for action in actions:
            ok, reason = await self.allowed(action, "topic", topic)
            if not ok:
                self.log("publish", "deny", f"{action}: {reason}", topic=topic)
                raise Closed
        self.log("publish", "allow", "allowed", topic=topic, qos=qos)
        return packet

    async def subscribe(self, body):
        (packet_id,) = struct.unpack(">H", body[:2])
        index, requested = 2, []
        while index < len(body):
            topic_filter, index = read_string(body, index)
            requested.append((topic_filter, body[index]))
            index += 1
        verdicts, reasons = [], []
        for topic_filter, _ in requested:
            ok, reason = await self.allowed("iot:Subscribe", "topicfilter", topic_filter)
            verdicts.append(ok)
            reasons.append(reason)
        self.log("subscribe", "allow" if all(verdicts) else "deny" if not any(verdicts) else "partial",
                 "; ".join(f"{f}: {r}" for (f, _), r in zip(requested, reasons)),
                 filters=[{"filter": f, "allowed": ok} for (f, _), ok in zip(requested, verdicts)])
        if not any(verdicts):
            suback = struct.pack(">H", packet_id) + b"\x80" * len(verdicts)
            self.client[1].write(frame(2, b"\x90" + encode_length(len(suback)) + suback, mask=False))
            return b""
        self.pending[packet_id] = verdicts
        kept = struct.pack(">H", packet_id) + b"".join(
            struct.pack(">H", len(f.encode())) + f.encode() + bytes([qos])
            for (f, qos), ok in zip(requested, verdicts) if ok)
        return b"\x82" + encode_length(len(kept)) + kept

    async def from_broker(self, packet):
        """What to send the client for this broker packet."""
        kind = packet[0] >> 4
        body = body_of(packet)
        if kind == 9:
            (packet_id,) = struct.unpack(">H", body[:2])
            verdicts = self.pending.pop(packet_id, None)
            if verdicts is None:
                return packet
            codes = iter(body[2:])
            merged = bytes(next(codes) if ok else 0x80 for ok in verdicts)
            suback = body[:2] + merged
            return b"\x90" + encode_length(len(suback)) + suback
        if kind == 3:
            qos = (packet[0] >> 1) & 3
            topic, index = read_string(body, 0)
            ok, reason = await self.allowed("iot:Receive", "topic", topic)
            if ok:
                return packet
            self.log("receive", "deny", reason, topic=topic)
            if qos == 1:
                self.broker[1].write(frame(2, b"\x40\x02" + body[index:index + 2], mask=True))
            elif qos == 2:
                raise NotModelled("a QoS 2 delivery")
            return b""
        return packet

    async def pump(self, source, sink, mask, handle):
        buffer = b""
        while True:
            opcode, payload = await read_frame(source[0])
            if opcode in (0, 1, 2):
                packets, buffer = split_packets(buffer + payload)
                for packet in packets:
                    out = await handle(packet)
                    if out:
                        sink[1].write(frame(2, out, mask))
            else:
                sink[1].write(frame(opcode, payload, mask))
                if opcode == 8:
                    return
            await sink[1].drain()


class MqttSide:
    def __init__(self, gate, args):
        self.gate, self.args = gate, args
        self.server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_tls.load_cert_chain(args.cert, args.key)
        self.client_tls = ssl.create_default_context(cafile=args.cafile)
        self.open = set()  # client writers, dropped by --control refuse

    async def handle(self, reader, writer):
        peer = writer.get_extra_info("peername")[0]
        broker_writer = None
        self.open.add(writer)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            target = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[1]
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
            akid = query.get("X-Amz-Credential", [""])[0].split("/")[0]
            principal, problem = self.gate.principal(akid, query.get("X-Amz-Security-Token", [None])[0])
            if problem:
                self.gate.log(mqtt="upgrade", akid=akid, source_ip=peer, decision="deny",
                              reason=f"{problem} credentials")
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: 9\r\nConnection: close\r\n\r\nForbidden")
                await writer.drain()
                return
            broker_reader, broker_writer = await asyncio.open_connection(
                "127.0.0.1", self.args.broker_port, ssl=self.client_tls, server_hostname="127.0.0.1")
            broker_writer.write(head)
            answer = await broker_reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            if b" 101 " not in answer.split(b"\r\n", 1)[0]:
                return
            connection = MqttConnection(self.gate, principal, peer, (reader, writer),
                                        (broker_reader, broker_writer))
            tasks = [asyncio.ensure_future(connection.pump(connection.client, connection.broker, True,
                                                           connection.from_client)),
                     asyncio.ensure_future(connection.pump(connection.broker, connection.client, False,
                                                           connection.from_broker))]
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            for task in done:
                error = task.exception()
                if isinstance(error, NotModelled):
                    connection.log("error", "error", f"not modelled: {error}")
                elif error and not isinstance(error, (Closed, asyncio.IncompleteReadError,
                                                      ConnectionError, ssl.SSLError)):
                    connection.log("error", "error", f"{type(error).__name__}: {error}")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ConnectionError, ssl.SSLError, IndexError, ValueError):
            pass
        finally:
            self.open.discard(writer)
            for stream in (writer, broker_writer):
                if stream is not None:
                    try:
                        stream.close()
                    except Exception:  # noqa: BLE001 - closing anyway
                        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--account", required=True, help="the JSON provision.py printed")
    parser.add_argument("--upstream", required=True, help="moto (or a proxy in front of it)")
    parser.add_argument("--lambda", dest="lambda_url", default=None)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--wss-port", type=int, required=True)
    parser.add_argument("--broker-port", type=int, default=8443)
    for name in ("--cert", "--key", "--cafile", "--log"):
        parser.add_argument(name, required=True)
    parser.add_argument("--device-cidrs", default="127.0.0.0/8,::1/128")
    parser.add_argument("--param", action="append", default=[], help="template parameter Name=Value")
    parser.add_argument("--policy-delay", type=float, default=0.0)
    parser.add_argument("--template", default=str(cfn.TEMPLATE_PATH))
    parser.add_argument("--control", default=None,
                        help='file: "pass" or "refuse" (the MQTT listener refuses connections)')
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.param)
    account = json.loads(Path(args.account).read_text())
    cloud = Cloud(account, args.template, args.device_cidrs, overrides)
    gate = Gate(args, cloud)
    http_server = ThreadingHTTPServer(("127.0.0.1", args.http_port), make_handler(gate))
    http_server.daemon_threads = True
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    mqtt = MqttSide(gate, args)

    def mode():
        try:
            return Path(args.control).read_text().strip() if args.control else "pass"
        except OSError:
            return "pass"

    async def listen():
        return await asyncio.start_server(mqtt.handle, "127.0.0.1", args.wss_port,
                                          ssl=mqtt.server_tls, limit=1 << 20)

    async def serve():
        server = await listen()
        gate.log_file.write(json.dumps({"ready": True}) + "\n")
        print(json.dumps({"ready": True}), flush=True)
        while True:  # --control: "refuse" cuts the network (refused, open ones dropped)
            await asyncio.sleep(0.1)
            now = mode()
            if now == "refuse" and server is not None:
                server.close()
                server = None
                for writer in list(mqtt.open):
                    writer.transport.abort()
                gate.log(mqtt="listener", decision="refuse", reason="--control refuse")
            elif now != "refuse" and server is None:
                server = await listen()
                gate.log(mqtt="listener", decision="pass", reason="--control pass")

    asyncio.run(serve())


if __name__ == "__main__":
    main()
