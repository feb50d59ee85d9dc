#!/usr/bin/env python3
"""Smoke test of iot-cognito-relay on a real AWS account (`make aws-smoke`).

Deploys a throwaway stack from cloudformation/cognito.yml, runs the daemon from this build
against it as a child process (config, state and socket in a temporary directory: nothing is
installed system-wide), sends messages and checks that each one reaches IoT Core (a topic rule
scoped to the stack's identity pool forwards them to an SQS queue the script creates), detaches
the stack's IoT policy from the device while it keeps publishing and checks that the daemon
attaches it again and delivers everything sent meanwhile, then deletes everything it created.
It prints every step with its timing and ends with one verdict line:

    aws-smoke: PASSED
    aws-smoke: FAILED at <step>: <reason>

Credentials and region come from the usual places (environment, profile, SSO, instance role).
`--dry-run` runs the same code against an in-memory stand-in of AWS and of the daemon: it
prints every AWS call (parameters checked against botocore's service models when botocore is
installed) and every command, calls nothing and needs no credentials. See docs/operations.md,
"Smoke test on a real AWS account".
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = REPO_ROOT / "cloudformation" / "cognito.yml"
DEFAULT_BINARY = "target/release/iot-cognito-relay"
BUILD_COMMAND = ["cargo", "build", "--release", "--bin", "iot-cognito-relay"]
CHECKIP_URL = "https://checkip.amazonaws.com"
# TEST-NET-3 (RFC 5737): what the dry run uses instead of asking for the caller's address.
DRY_RUN_ADDRESS = "203.0.113.10"
TAG_KEY = "iot-cognito-relay-smoke"
# The largest template CloudFormation accepts as TemplateBody (larger ones go through S3).
MAX_TEMPLATE_BODY = 51_200
STEPS = ("preflight", "deploy", "update", "sink", "config-from-stack", "run", "send", "verify",
         "detach", "heal", "delete")
# Parameters an older template did not have, and the value that keeps such a stack as it was
# when it is updated (the template's own RegistrationMode description: stacks from before the
# parameter are shared-user and must say so when they are updated).
NEW_PARAMETER_VALUE_FOR_OLD_STACKS = {"RegistrationMode": "shared-user"}
# Keys whose values are never printed, and value shapes that are masked wherever they appear.
SECRET_KEYS = re.compile(
    r"(password|passwd|token|secretaccesskey|secret_access_key|accesskeyid|access_key_id|"
    r"sessiontoken|session_token|credentials|registration_code|secretstring|secretbinary)",
    re.IGNORECASE)
SECRET_SHAPES = [
    (re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"), "<redacted>"),  # JWT
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), "<redacted>"),  # access key id
    (re.compile(r"(?i)(X-Amz-(?:Security-Token|Signature|Credential)=)[^&\s\"']+"), r"\1<redacted>"),
]
REDACTED = "<redacted>"


class SmokeFailure(Exception):
    """A step failed; the message is the reason printed in the verdict."""


# ---------------------------------------------------------------------------------------------
# Pure helpers: names, template, parameters, redaction
# ---------------------------------------------------------------------------------------------

PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$")  # fallback; the template's wins
STACK_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,127}$")


def random_suffix(rng=secrets, length=8):
    alphabet = string.ascii_lowercase + string.digits
    return "".join(rng.choice(alphabet) for _ in range(length))


def derive_prefix(stack_name, pattern=PREFIX_PATTERN, max_len=32):
    """The template's Prefix for a stack name: lower case, [a-z0-9-], at most max_len
    characters; a name too long keeps its end (where the random suffix is)."""
    text = re.sub(r"[^a-z0-9-]+", "-", stack_name.lower())
    text = re.sub(r"-{2,}", "-", text).strip("-")
    if len(text) > max_len:
        tail = text[-9:]
        text = (text[: max_len - len(tail) - 1].rstrip("-") + "-" + tail).strip("-")
        text = re.sub(r"-{2,}", "-", text)
    if not text or not text[0].isalpha():
        text = ("s-" + text)[:max_len].rstrip("-")
    if not pattern.match(text):
        raise SmokeFailure(f"cannot derive a Prefix from stack name {stack_name!r} "
                           f"(got {text!r}, outside {pattern.pattern})")
    return text


@dataclass
class Names:
    stack: str
    prefix: str
    run_id: str
    queue: str
    role: str
    rule: str


def derive_names(stack_name=None, rng=secrets, prefix_pattern=PREFIX_PATTERN):
    suffix = random_suffix(rng)
    stack = stack_name or f"iot-relay-smoke-{suffix}"
    if not STACK_NAME_PATTERN.match(stack):
        raise SmokeFailure(f"invalid stack name {stack!r}")
    prefix = derive_prefix(stack, prefix_pattern)
    run_id = suffix if stack_name is None else f"{prefix}-{suffix}"
    base = prefix[:40]
    return Names(stack=stack, prefix=prefix, run_id=run_id,
                 queue=f"{base}-smoke-sink"[:80],
                 role=f"{base}-smoke-sink-role"[:64],
                 rule=re.sub(r"[^A-Za-z0-9_]", "_", f"{base}_smoke_sink"))


def load_template(path):
    """The template with CloudFormation's short-form tags (!Ref, !Sub, ...) in their JSON form:
    the reader the cloud-side tests use (cloudformation/tests/cfn.py)."""
    sys.path.insert(0, str(REPO_ROOT / "cloudformation" / "tests"))
    try:
        import cfn  # noqa: PLC0415 - needs PyYAML, only when a template is read
    except ImportError as exc:  # pragma: no cover - PyYAML is in requirements-dev.txt
        raise SmokeFailure("PyYAML is missing: .venv/bin/pip install -r requirements-dev.txt") from exc
    return cfn.load_template(path)


@dataclass
class Template:
    path: Path
    body: str
    parameters: dict
    resources: dict

    @classmethod
    def read(cls, path):
        path = Path(path)
        try:
            body = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SmokeFailure(f"cannot read template {path}: {exc.strerror}") from exc
        doc = load_template(path)
        if not isinstance(doc, dict) or "Resources" not in doc:
            raise SmokeFailure(f"{path} is not a CloudFormation template")
        return cls(path=path, body=body, parameters=doc.get("Parameters") or {},
                   resources=doc["Resources"])

    def check_deployable(self):
        size = len(self.body.encode("utf-8"))
        if size > MAX_TEMPLATE_BODY:
            raise SmokeFailure(f"{self.path} is {size} bytes, over the {MAX_TEMPLATE_BODY}-byte "
                               "TemplateBody limit: it needs `aws cloudformation package` first")
        for logical, resource in self.resources.items():
            code = (resource.get("Properties") or {}).get("Code")
            if resource.get("Type") == "AWS::Lambda::Function" and isinstance(code, str):
                raise SmokeFailure(f"{self.path}: {logical}.Code is a local path; package the "
                                   "template (`aws cloudformation package`) and deploy that")

    def prefix_pattern(self):
        pattern = (self.parameters.get("Prefix") or {}).get("AllowedPattern")
        return re.compile(pattern) if pattern else PREFIX_PATTERN

    def deletion_policy(self, logical_id):
        return (self.resources.get(logical_id) or {}).get("DeletionPolicy", "Delete")

    def retained(self):
        """Logical id -> type of every resource the stack leaves behind when it is deleted."""
        return {logical: r.get("Type") for logical, r in self.resources.items()
                if r.get("DeletionPolicy") in ("Retain", "RetainExceptOnCreate")}

    def resource_of_type(self, type_name):
        return [logical for logical, r in self.resources.items() if r.get("Type") == type_name]


def check_parameter(template, key, value):
    spec = template.parameters.get(key)
    if spec is None:
        raise SmokeFailure(f"{template.path} has no parameter {key}")
    pattern = spec.get("AllowedPattern")
    allowed = spec.get("AllowedValues")
    items = value.split(",") if spec.get("Type") == "CommaDelimitedList" else [value]
    for item in items:
        if pattern and not re.match(pattern, item):
            raise SmokeFailure(f"{key}={item!r} does not match the template's AllowedPattern {pattern}")
        if allowed and item not in [str(a) for a in allowed]:
            raise SmokeFailure(f"{key}={item!r} is not one of {allowed}")


def create_parameters(template, names, device_cidrs, email_domain, registration_mode, overrides):
    """Parameters of CreateStack: what the smoke sets, then --param overrides. Parameters the
    template does not have (an older one) are left out."""
    wanted = {"Prefix": names.prefix, "AllowedEmailDomain": email_domain,
              "DeviceCidrs": device_cidrs, "RegistrationMode": registration_mode}
    wanted = {k: v for k, v in wanted.items() if k in template.parameters}
    wanted.update(overrides)
    for key, value in wanted.items():
        check_parameter(template, key, value)
    return [{"ParameterKey": k, "ParameterValue": v} for k, v in wanted.items()]


def update_parameters(template, previous_keys, overrides):
    """Parameters of UpdateStack the way `aws cloudformation deploy` sends them: every
    parameter the stack already has and the new template keeps reuses its stored value
    (UsePreviousValue; UpdateStack would otherwise fall back to the template default), a
    parameter new in the template takes its default, or the value an old stack needs
    (NEW_PARAMETER_VALUE_FOR_OLD_STACKS), and --param overrides win. Returns (parameters, notes)."""
    params, notes = [], []
    for key in template.parameters:
        if key in overrides:
            check_parameter(template, key, overrides[key])
            params.append({"ParameterKey": key, "ParameterValue": overrides[key]})
            notes.append(f"{key}: {overrides[key]} (--param)")
        elif key in previous_keys:
            params.append({"ParameterKey": key, "UsePreviousValue": True})
        elif key in NEW_PARAMETER_VALUE_FOR_OLD_STACKS:
            value = NEW_PARAMETER_VALUE_FOR_OLD_STACKS[key]
            params.append({"ParameterKey": key, "ParameterValue": value})
            notes.append(f"{key}: new in this template; {value}, what a stack from before it is "
                         f"(override with --param {key}=...)")
        else:
            notes.append(f"{key}: new in this template; its default "
                         f"{template.parameters[key].get('Default')!r}")
    return params, notes


def redact(value, key=""):
    """A copy of value with secret-looking keys and value shapes masked."""
    if key and SECRET_KEYS.search(key):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_text(text):
    for shape, replacement in SECRET_SHAPES:
        text = shape.sub(replacement, text)
    return text


def format_params(params):
    """One line per call: secrets masked, long values (a template body) abbreviated."""
    def short(value):
        if isinstance(value, str) and len(value) > 600:
            return f"<{len(value)} characters, not shown>"
        return value
    return ", ".join(f"{k}={json.dumps(short(v), separators=(',', ':'))}" for k, v in redact(params).items())


def minutes(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def message_payload(run_id, n, phase):
    return json.dumps({"smoke_run": run_id, "n": n, "phase": phase}, separators=(",", ":"))


def sink_sql(identity_pool_id):
    return f"SELECT *, topic() AS smoke_topic FROM '{identity_pool_id}/+/smoke/#'"


# ---------------------------------------------------------------------------------------------
# Output and time
# ---------------------------------------------------------------------------------------------


class Out:
    def __init__(self, clock, dry_run, stream=None):
        self.clock = clock
        self.dry_run = dry_run
        self.stream = stream
        self.start = clock.now()
        self.step = "preflight"
        self.step_start = self.start

    def line(self, text=""):
        print(redact_text(text), file=self.stream or sys.stdout, flush=True)

    def info(self, text):
        stamp = "" if self.dry_run else f"[+{minutes(self.clock.now() - self.start)}] "
        self.line(f"{stamp}{text}")

    def begin(self, step, what):
        self.step = step
        self.step_start = self.clock.now()
        self.line()
        self.info(f"== {step}: {what}")

    def done(self, detail=""):
        took = "" if self.dry_run else f" in {minutes(self.clock.now() - self.step_start)}"
        self.info(f"-- {self.step}: done{took}{': ' + detail if detail else ''}")


class RealClock:
    @staticmethod
    def now():
        return time.monotonic()

    @staticmethod
    def sleep(seconds):
        time.sleep(seconds)


class VirtualClock:
    """The dry run's clock: sleeping advances it at once."""

    def __init__(self):
        self.t = 0.0

    def now(self):
        return self.t

    def sleep(self, seconds):
        self.t += seconds


# ---------------------------------------------------------------------------------------------
# AWS: real (boto3) or the dry run's stand-in
# ---------------------------------------------------------------------------------------------


class AwsError(Exception):
    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Aws:
    """Every AWS call of the smoke goes through call(): printed (redacted), then made."""

    def __init__(self, out, session=None, fake=None):
        self.out = out
        self.session = session
        self.fake = fake
        self.clients = {}
        self.announced = set()
        self.validated = 0
        self.validator = _BotocoreValidator() if fake is not None else None

    def call(self, service, operation, params=None, poll=None, quiet=False):
        params = params or {}
        key = (service, operation, poll)
        if poll is not None:
            if key not in self.announced:
                self.announced.add(key)
                self.out.info(f"   aws {service} {operation}({format_params(params)})  [{poll}]")
        elif not quiet:
            self.out.info(f"   aws {service} {operation}({format_params(params)})")
        if self.fake is not None:
            if self.validator is not None and self.validator.validate(service, operation, params):
                self.validated += 1
            return self.fake.handle(service, operation, params)
        return self._real(service, operation, params)

    def _real(self, service, operation, params):
        from botocore.exceptions import ClientError

        client = self.clients.get(service)
        if client is None:
            from botocore.config import Config

            client = self.session.client(service, config=Config(retries={"mode": "standard", "max_attempts": 8}))
            self.clients[service] = client
        try:
            return getattr(client, operation)(**params)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise AwsError(error.get("Code", "ClientError"), error.get("Message", str(exc))) from exc


class _BotocoreValidator:
    """Checks the dry run's calls against botocore's service models (no network, no
    credentials): a misspelt operation or parameter fails the dry run."""

    def __init__(self):
        try:
            import botocore.session
            from botocore import xform_name
            from botocore.validate import ParamValidator
        except ImportError:
            self.session = None
            return
        self.session = botocore.session.get_session()
        self.xform_name = xform_name
        self.validator = ParamValidator()
        self.models = {}

    def validate(self, service, operation, params):
        if self.session is None:
            return False
        model = self.models.get(service)
        if model is None:
            model = self.session.get_service_model(service)
            model = (model, {self.xform_name(name): name for name in model.operation_names})
            self.models[service] = model
        service_model, names = model
        if operation not in names:
            raise SmokeFailure(f"dry run: {service} has no operation {operation}")
        shape = service_model.operation_model(names[operation]).input_shape
        report = self.validator.validate(params, shape)
        if report.has_errors():
            raise SmokeFailure(f"dry run: {service}.{operation}: {report.generate_report()}")
        return True


# ---------------------------------------------------------------------------------------------
# The daemon: a child process from the build, or the dry run's stand-in
# ---------------------------------------------------------------------------------------------


class Daemon:
    """Runs the built binary with everything under one temporary directory."""

    def __init__(self, out, binary, workdir, dry_run, fake=None, log_level="info"):
        self.out = out
        self.binary = binary
        self.workdir = Path(workdir)
        self.dry_run = dry_run
        self.fake = fake
        self.log_level = log_level
        self.config = self.workdir / "config.toml"
        self.socket = self.workdir / "relay.sock"
        self.state = self.workdir / "state"
        self.log = self.workdir / "daemon.log"
        self.outputs = self.workdir / "stack-outputs.json"
        self.process = None
        self.log_handle = None
        self.log_offset = 0
        self.env_overrides = {}
        self.announced = set()

    def show(self, argv, suffix=""):
        self.out.info(f"   run: {shlex.join(str(a) for a in argv)}{suffix}")

    def ensure_binary(self):
        if self.binary.exists():
            self.out.info(f"   binary: {self.binary}")
            built = self.binary.stat().st_mtime
            sources = [REPO_ROOT / "Cargo.toml", REPO_ROOT / "Cargo.lock", *(REPO_ROOT / "src").rglob("*.rs")]
            if any(p.exists() and p.stat().st_mtime > built for p in sources):
                self.out.info(f"   note: src/ changed after this binary was built; `{shlex.join(BUILD_COMMAND)}` "
                              "to test the current code")
            return
        self.show(BUILD_COMMAND, f"   (cwd {REPO_ROOT}; {self.binary} is missing)")
        if self.dry_run:
            self.out.info("   (dry run: nothing is built)")
            return
        if shutil.which("cargo") is None:
            raise SmokeFailure(f"{self.binary} is missing and cargo is not on PATH")
        result = subprocess.run(BUILD_COMMAND, cwd=REPO_ROOT, check=False)
        if result.returncode != 0 or not self.binary.exists():
            raise SmokeFailure(f"`{shlex.join(BUILD_COMMAND)}` failed (exit {result.returncode})")

    def _run(self, args, timeout=60, stdin=None):
        argv = [str(self.binary), *args]
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  input=stdin, check=False, env=self._env())
        except subprocess.TimeoutExpired as exc:
            raise SmokeFailure(f"`{shlex.join(argv[:3])} ...` did not finish in {timeout} s") from exc

    def _env(self):
        env = dict(os.environ)
        env.update(self.env_overrides)
        return env

    def write_config(self, describe_stacks):
        """config-from-stack on the stack's describe-stacks JSON, then the socket, state dir
        and log level of this run added (or set through the environment when the generated
        file already has those tables)."""
        argv = [self.binary, "config-from-stack", self.outputs]
        self.out.info(f"   write {self.outputs} (describe-stacks JSON, no secrets)")
        self.show(argv, f" > {self.config}")
        if self.dry_run:
            text = self.fake.config_from_stack(describe_stacks)
        else:
            self.outputs.write_text(json.dumps(describe_stacks, indent=2, default=str), encoding="utf-8")
            result = self._run(["config-from-stack", str(self.outputs)])
            if result.returncode != 0:
                raise SmokeFailure(f"config-from-stack exited {result.returncode}: {result.stderr.strip()}")
            text = result.stdout
        try:
            tables = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SmokeFailure(f"config-from-stack wrote no valid TOML: {exc}") from exc
        local = {"socket": {"path": str(self.socket)}, "state": {"dir": str(self.state)},
                 "log": {"level": self.log_level}}
        extra = []
        for table, values in local.items():
            if table in tables:
                for key, value in values.items():
                    self.env_overrides[f"IOT_COGNITO_RELAY__{table.upper()}__{key.upper()}"] = value
            else:
                extra.append(f"\n[{table}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
        if extra:
            extra.insert(0, "\n# Added by scripts/aws-smoke.py: this run's temporary directory.")
        text = text.rstrip("\n") + "\n" + "".join(extra)
        for line in text.splitlines():
            self.out.info(f"   | {line}")
        for key, value in self.env_overrides.items():
            self.out.info(f"   env {key}={value}")
        if not self.dry_run:
            self.config.write_text(text, encoding="utf-8")
            os.chmod(self.config, 0o600)
        self.show([self.binary, "check-config", "--config", self.config])
        if not self.dry_run:
            result = self._run(["check-config", "--config", str(self.config)])
            if result.returncode != 0:
                raise SmokeFailure(f"check-config exited {result.returncode}: {result.stderr.strip()}")
        return tables

    def start(self):
        argv = [self.binary, "run", "--config", self.config]
        self.show(argv, f" > {self.log} 2>&1 &")
        if self.dry_run:
            self.fake.daemon_started()
            return
        self.state.mkdir(mode=0o700, exist_ok=True)
        self.log_handle = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        # Its own session: a Ctrl-C in the terminal reaches the script, which stops the daemon
        # in order (SIGTERM, drain) instead of both being interrupted at once.
        self.process = subprocess.Popen([str(a) for a in argv], stdout=self.log_handle,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=self._env(), start_new_session=True)
        self.out.info(f"   daemon pid {self.process.pid}")

    def running(self):
        if self.dry_run:
            return self.fake.daemon_running
        return self.process is not None and self.process.poll() is None

    def stop(self):
        if self.dry_run:
            if self.fake.daemon_running:
                self.out.info("   stop the daemon: SIGTERM, up to 30 s to drain, then SIGKILL")
                self.fake.daemon_running = False
            return
        if self.process is None:
            return
        if self.process.poll() is None:
            self.out.info(f"   stop the daemon (pid {self.process.pid}): SIGTERM")
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.out.info("   the daemon did not stop in 30 s: SIGKILL")
                self.process.kill()
                self.process.wait(timeout=10)
        self.out.info(f"   daemon exited {self.process.returncode}")
        self.process = None
        if self.log_handle is not None:
            self.log_handle.close()
            self.log_handle = None

    def status(self, announce=None):
        args = ["status", "--json", "--socket", str(self.socket), "--timeout", "5s"]
        if announce and announce not in self.announced:
            self.announced.add(announce)
            self.show([self.binary, *args], f"   [{announce}]")
        if self.dry_run:
            return self.fake.daemon_status()
        result = self._run(args, timeout=15)
        if result.returncode != 0:
            return None
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError:
            return None

    def send(self, topic, payload):
        args = ["send", "--socket", str(self.socket), "--topic", topic, payload]
        self.show([self.binary, *args])
        if self.dry_run:
            self.fake.daemon_send(topic, payload)
            return
        result = self._run(args, timeout=90)
        if result.returncode != 0:
            raise SmokeFailure(f"send --topic {topic} exited {result.returncode}: "
                               f"{result.stderr.strip() or result.stdout.strip()}")

    def new_log_lines(self):
        if self.dry_run or not self.log.exists():
            return []
        with open(self.log, "rb") as handle:
            handle.seek(self.log_offset)
            data = handle.read()
        self.log_offset += len(data)
        return data.decode("utf-8", "replace").splitlines()

    def log_tail(self, lines=25):
        if self.dry_run or not self.log.exists():
            return []
        return self.log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]


# ---------------------------------------------------------------------------------------------
# The dry run's stand-in for AWS and the daemon
# ---------------------------------------------------------------------------------------------


class FakeCloud:
    """Just enough AWS and daemon behaviour for the smoke's own code to run every step.
    `fault` makes one thing go wrong (tests of the failure paths)."""

    ACCOUNT = "123456789012"

    def __init__(self, region, names, template, fault=None, old_template=None):
        self.region = region
        self.names = names
        self.template = template
        self.templates = [t for t in (template, old_template) if t is not None]
        self.stack_parameters = []
        self.fault = fault
        self.stack_status = None
        self.pool = f"{region}:00000000-0000-4000-8000-000000000000"
        self.identity = f"{region}:11111111-1111-4111-8111-111111111111"
        self.policy = f"{names.prefix}-iot-policy"
        self.targets = set()
        self.queue = []
        self.daemon_running = False
        self.detached = False
        self.status_polls = 0

    def handle(self, service, operation, params):
        method = getattr(self, f"{service.replace('-', '_')}__{operation}", None)
        return method(params) if method else {}

    # sts
    def sts__get_caller_identity(self, _):
        return {"Account": self.ACCOUNT, "Arn": f"arn:aws:iam::{self.ACCOUNT}:user/dry-run"}

    # cloudformation
    def cloudformation__create_stack(self, params):
        self.stack_status = "CREATE_FAILED" if self.fault == "deploy" else "CREATE_COMPLETE"
        self._deployed(params)
        return {"StackId": self._stack_id()}

    def cloudformation__update_stack(self, params):
        self.stack_status = "UPDATE_COMPLETE"
        self._deployed(params)
        return {"StackId": self._stack_id()}

    def _deployed(self, params):
        """Like CloudFormation, the stack then has every parameter of the template it runs."""
        for template in self.templates:
            if template.body == params["TemplateBody"]:
                self.stack_parameters = list(template.parameters)

    def cloudformation__delete_stack(self, _):
        self.stack_status = "DELETE_COMPLETE"
        return {}

    def cloudformation__describe_stacks(self, params):
        name = params.get("StackName")
        parameters = [{"ParameterKey": k, "ParameterValue": "..."} for k in self.stack_parameters]
        outputs = {"CognitoIdentityPoolID": self.pool, "SecretName": f"{self.region}_EXAMPLE_{self.names.prefix}-app-user",
                   "CognitoUnAuthRole": f"arn:aws:iam::{self.ACCOUNT}:role/{self.names.prefix}-cognito-unauth-role",
                   "Region": self.region, "IoTEndpoint": f"example-ats.iot.{self.region}.amazonaws.com",
                   "IoTPolicy": self.policy, "ClassicFlow": "true",
                   "AttachFunction": f"arn:aws:lambda:{self.region}:{self.ACCOUNT}:function:{self.names.prefix}-attach-policy",
                   "RegistrationMode": "self-register"}
        return {"Stacks": [{"StackName": self.names.stack, "StackId": self._stack_id(),
                            "StackStatus": self.stack_status or "CREATE_COMPLETE", "Parameters": parameters,
                            "Outputs": [{"OutputKey": k, "OutputValue": v} for k, v in outputs.items()]
                            if name else []}]}

    def cloudformation__describe_stack_events(self, _):
        if self.stack_status == "CREATE_FAILED":
            return {"StackEvents": [{"EventId": "1", "LogicalResourceId": "CognitoUserPool",
                                     "ResourceType": "AWS::Cognito::UserPool", "ResourceStatus": "CREATE_FAILED",
                                     "ResourceStatusReason": "dry run: injected failure"}]}
        return {"StackEvents": []}

    def cloudformation__list_stack_resources(self, _):
        physical = {"AWS::Cognito::UserPool": f"{self.region}_EXAMPLE", "AWS::Cognito::IdentityPool": self.pool,
                    "AWS::IoT::Policy": self.policy}
        deleted = self.stack_status == "DELETE_COMPLETE"
        return {"StackResourceSummaries": [
            {"LogicalResourceId": logical, "ResourceType": r.get("Type"),
             "PhysicalResourceId": physical.get(r.get("Type"), f"{self.names.prefix}-{logical}"),
             "ResourceStatus": ("DELETE_SKIPPED" if r.get("DeletionPolicy") in ("Retain", "RetainExceptOnCreate")
                                else "DELETE_COMPLETE") if deleted else "CREATE_COMPLETE"}
            for logical, r in self.template.resources.items() if "Condition" not in r]}

    def _stack_id(self):
        return f"arn:aws:cloudformation:{self.region}:{self.ACCOUNT}:stack/{self.names.stack}/dry-run"

    # sqs / iam / iot
    def sqs__create_queue(self, params):
        return {"QueueUrl": f"https://sqs.{self.region}.amazonaws.com/{self.ACCOUNT}/{params['QueueName']}"}

    def sqs__get_queue_attributes(self, _):
        return {"Attributes": {"QueueArn": f"arn:aws:sqs:{self.region}:{self.ACCOUNT}:{self.names.queue}"}}

    def sqs__receive_message(self, _):
        batch, self.queue = self.queue[:10], self.queue[10:]
        return {"Messages": [{"MessageId": str(i), "ReceiptHandle": f"handle-{i}", "Body": body}
                             for i, body in enumerate(batch)]}

    def iam__create_role(self, params):
        return {"Role": {"Arn": f"arn:aws:iam::{self.ACCOUNT}:role/{params['RoleName']}"}}

    def iot__detach_policy(self, params):
        self.targets.discard(params["target"])
        self.detached = True
        return {}

    def iot__list_targets_for_policy(self, _):
        if self.detached and self.fault != "heal" and self.daemon_running:
            self.targets.add(self.identity)  # the daemon attached it again
            self.detached = False
        return {"targets": sorted(self.targets)}

    def iot__list_policy_versions(self, _):
        return {"policyVersions": [{"versionId": "1", "isDefaultVersion": True}]}

    # the daemon
    def config_from_stack(self, describe_stacks):
        outputs = {o["OutputKey"]: o["OutputValue"] for o in describe_stacks["Stacks"][0]["Outputs"]}
        return ("# (dry run: what config-from-stack writes, roughly)\n"
                f"[aws]\nregion = {json.dumps(outputs['Region'])}\n\n"
                f"[identity]\nidentity_pool_id = {json.dumps(outputs['CognitoIdentityPoolID'])}\n"
                f"secret_id = {json.dumps(outputs['SecretName'])}\n"
                f"unauth_role_arn = {json.dumps(outputs['CognitoUnAuthRole'])}\n\n"
                f"[mqtt]\nendpoint = {json.dumps(outputs['IoTEndpoint'])}\n")

    def daemon_started(self):
        self.daemon_running = True
        if not self.detached:  # first start: the daemon attaches the policy
            self.targets.add(self.identity)

    def daemon_status(self):
        self.status_polls += 1
        return {"state": "connected", "identity_id": self.identity, "spool_messages": 0,
                "published_total": 0, "reconnects_total": 1 if self.detached else 0,
                "mqtt_last_error": "closed after CONNECT" if self.detached else None}

    def daemon_send(self, topic, payload):
        if self.fault == "verify":
            return
        body = dict(json.loads(payload), smoke_topic=f"{self.pool}/{self.identity}/{topic}")
        self.queue.append(json.dumps(body))


# ---------------------------------------------------------------------------------------------
# The smoke
# ---------------------------------------------------------------------------------------------


@dataclass
class Options:
    dry_run: bool = False
    binary: Path = REPO_ROOT / DEFAULT_BINARY
    template: Path = TEMPLATE
    update_from: Path | None = None
    device_cidrs: str | None = None
    email_domain: str = "devices.example.com"
    registration_mode: str = "self-register"
    params: dict = field(default_factory=dict)
    stack_name: str | None = None
    messages: int = 10
    heal_budget: float = 1200.0
    heal_interval: float = 10.0
    heal_restart_after: float = 480.0
    connect_timeout: float = 300.0
    verify_timeout: float = 180.0
    stack_timeout: float = 1800.0
    keep: bool = False
    region: str | None = None
    profile: str | None = None
    log_level: str = "info"
    fault: str | None = None

    def params_for(self, template):
        """--param values the given template declares (an older template may lack some)."""
        return {k: v for k, v in self.params.items() if k in template.parameters}


class Smoke:
    def __init__(self, options, out=None, clock=None):
        self.o = options
        self.clock = clock or (VirtualClock() if options.dry_run else RealClock())
        self.out = out or Out(self.clock, options.dry_run)
        self.template = Template.read(options.template)
        self.old_template = Template.read(options.update_from) if options.update_from else None
        self.names = derive_names(options.stack_name, prefix_pattern=self.template.prefix_pattern())
        self.cleanups = []  # (what, function), run last-in first-out
        self.created = []  # what the run made, for the "left behind" report
        self.stack_id = None
        self.stack_resources = {}
        self.outputs = {}
        self.identity_id = None
        self.sent = {}  # n -> phase
        self.arrived = set()
        self.fake = None
        self.aws = None
        self.daemon = None
        self.interrupts = 0
        self.failed = False
        self.partition = "aws"
        self.account = None
        self.region = None

    # ---- plumbing ---------------------------------------------------------------------------

    def sleep(self, seconds):
        self.clock.sleep(seconds)

    def on_cleanup(self, what, function):
        self.cleanups.append((what, function))
        self.created.append(what)

    def setup_aws(self):
        if self.o.dry_run:
            region = self.o.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            self.region = region
            self.fake = FakeCloud(region, self.names, self.template, self.o.fault, self.old_template)
            self.aws = Aws(self.out, fake=self.fake)
            return
        try:
            import boto3
        except ImportError as exc:
            raise SmokeFailure("boto3 is missing: run with .venv/bin/python (make deps)") from exc
        session = boto3.Session(profile_name=self.o.profile, region_name=self.o.region)
        if not session.region_name:
            raise SmokeFailure("no AWS region: set AWS_REGION (or AWS_DEFAULT_REGION), a profile "
                               "region, or pass --region")
        if session.get_credentials() is None:
            raise SmokeFailure("no AWS credentials found (environment, profile, SSO or instance role)")
        self.region = session.region_name
        self.aws = Aws(self.out, session=session)

    def workdir(self):
        if self.o.dry_run:
            return Path(tempfile.gettempdir()) / "aws-smoke-XXXXXXXX"
        path = Path(tempfile.mkdtemp(prefix="aws-smoke-"))
        os.chmod(path, 0o700)
        return path

    # ---- steps ------------------------------------------------------------------------------

    def preflight(self):
        self.out.begin("preflight", "account, region, names, the device network")
        self.setup_aws()
        who = self.aws.call("sts", "get_caller_identity")
        self.account = who["Account"]
        self.partition = who["Arn"].split(":")[1]
        self.out.info(f"   account {self.account}, region {self.region}, caller {who['Arn']}")
        self.template.check_deployable()
        if self.old_template:
            self.old_template.check_deployable()
        cidrs = self.o.device_cidrs or self.public_address()
        self.device_cidrs = cidrs
        self.out.info(f"   stack {self.names.stack}, Prefix {self.names.prefix}, run id {self.names.run_id}")
        self.out.info(f"   DeviceCidrs {cidrs}; RegistrationMode {self.o.registration_mode}; "
                      f"AllowedEmailDomain {self.o.email_domain}")
        retained = self.template.retained()
        self.out.info("   the template retains on delete: " + (", ".join(
            f"{k} ({v})" for k, v in retained.items()) or "nothing") + "; the smoke deletes those itself")
        self.out.done()

    def public_address(self):
        if self.o.dry_run:
            self.out.info(f"   GET {CHECKIP_URL}  (dry run: not asked; using {DRY_RUN_ADDRESS}, a documentation address)")
            return f"{DRY_RUN_ADDRESS}/32"
        self.out.info(f"   GET {CHECKIP_URL}")
        try:
            with urllib.request.urlopen(CHECKIP_URL, timeout=15) as answer:  # noqa: S310 - fixed https URL
                text = answer.read(100).decode("ascii", "replace").strip()
            address = ipaddress.ip_address(text)
        except (OSError, ValueError) as exc:
            raise SmokeFailure(f"cannot find this machine's public address at {CHECKIP_URL} ({exc}); "
                               "pass --device-cidrs") from exc
        return f"{address}/{address.max_prefixlen}"

    def deploy(self):
        first = self.old_template or self.template
        self.out.begin("deploy", f"stack {self.names.stack} from {self.rel(first.path)}")
        params = create_parameters(first, self.names, self.device_cidrs, self.o.email_domain,
                                   self.o.registration_mode, self.o.params_for(first))
        answer = self.aws.call("cloudformation", "create_stack", {
            "StackName": self.names.stack,
            "TemplateBody": first.body,
            "Parameters": params,
            "Capabilities": ["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"],
            "Tags": [{"Key": TAG_KEY, "Value": self.names.run_id}],
        })
        self.stack_id = answer["StackId"]
        self.on_cleanup(f"stack {self.names.stack}", self.delete_stack)
        self.wait_stack("CREATE_COMPLETE", ("ROLLBACK_COMPLETE",))
        self.remember_resources()
        self.out.done()

    def update(self):
        self.out.begin("update", f"stack {self.names.stack} to {self.rel(self.template.path)}, "
                                 "keeping the stored parameter values")
        stack = self.aws.call("cloudformation", "describe_stacks", {"StackName": self.stack_id})["Stacks"][0]
        previous = {p["ParameterKey"] for p in stack.get("Parameters", [])}
        params, notes = update_parameters(self.template, previous, self.o.params)
        for note in notes:
            self.out.info(f"   {note}")
        try:
            self.aws.call("cloudformation", "update_stack", {
                "StackName": self.stack_id,
                "TemplateBody": self.template.body,
                "Parameters": params,
                "Capabilities": ["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"],
                "Tags": [{"Key": TAG_KEY, "Value": self.names.run_id}],
            })
        except AwsError as exc:
            if "No updates are to be performed" in exc.message:
                self.out.info("   no changes between the two templates")
                self.out.done()
                return
            raise SmokeFailure(f"update_stack refused: {exc}") from exc
        self.wait_stack("UPDATE_COMPLETE", ("UPDATE_ROLLBACK_COMPLETE",))
        self.remember_resources()
        self.out.done()

    def wait_stack(self, goal, failed, allow_missing=False):
        deadline = self.clock.now() + self.o.stack_timeout
        seen_events = set()
        last = None
        while True:
            try:
                stacks = self.aws.call("cloudformation", "describe_stacks", {"StackName": self.stack_id},
                                       poll=f"every 10 s until {goal}, at most {minutes(self.o.stack_timeout)}")
            except AwsError as exc:
                if allow_missing and "does not exist" in exc.message:
                    return "DELETE_COMPLETE"
                raise
            stack = stacks["Stacks"][0]
            status = stack["StackStatus"]
            self.print_events(seen_events)
            if status != last:
                self.out.info(f"   stack status {status}")
                last = status
            if status == goal:
                return status
            if status in failed or status.endswith("_FAILED"):
                reasons = self.failure_reasons()
                raise SmokeFailure(f"stack {status}" + (f": {reasons}" if reasons else ""))
            if self.clock.now() > deadline:
                raise SmokeFailure(f"stack still {status} after {minutes(self.o.stack_timeout)}")
            self.sleep(10)

    def print_events(self, seen):
        try:
            events = self.aws.call("cloudformation", "describe_stack_events", {"StackName": self.stack_id},
                                   poll="with each status poll: print new resource events")["StackEvents"]
        except AwsError:
            return
        fresh = [e for e in events if e["EventId"] not in seen]
        for event in reversed(fresh):
            seen.add(event["EventId"])
            if self.o.dry_run:
                continue
            reason = f" - {event['ResourceStatusReason']}" if event.get("ResourceStatusReason") else ""
            self.out.info(f"     {event['ResourceStatus']:<20} {event['LogicalResourceId']} "
                          f"({event['ResourceType']}){reason}")

    def failure_reasons(self):
        try:
            events = self.aws.call("cloudformation", "describe_stack_events",
                                   {"StackName": self.stack_id}, quiet=True)["StackEvents"]
        except AwsError:
            return ""
        failed = [f"{e['LogicalResourceId']}: {e.get('ResourceStatusReason', '')}"
                  for e in reversed(events) if e["ResourceStatus"].endswith("_FAILED")
                  and "cancelled" not in e.get("ResourceStatusReason", "").lower()]
        return "; ".join(failed[:3])

    def remember_resources(self):
        answer = self.aws.call("cloudformation", "list_stack_resources", {"StackName": self.stack_id})
        for summary in answer.get("StackResourceSummaries", []):
            self.stack_resources[summary["LogicalResourceId"]] = (summary["ResourceType"],
                                                                   summary.get("PhysicalResourceId"))

    def read_outputs(self):
        stack = self.aws.call("cloudformation", "describe_stacks", {"StackName": self.stack_id})["Stacks"][0]
        self.outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
        for key in ("CognitoIdentityPoolID", "SecretName", "IoTPolicy"):
            if not self.outputs.get(key):
                raise SmokeFailure(f"the stack has no output {key}")
        for key, value in sorted(self.outputs.items()):
            self.out.info(f"   output {key} = {value}")
        return stack

    def sink(self):
        self.out.begin("sink", "SQS queue + IoT topic rule scoped to this stack's identity pool "
                               "(the account-wide IoT logging setting is not touched)")
        self.read_outputs()
        pool = self.outputs["CognitoIdentityPoolID"]
        url = self.aws.call("sqs", "create_queue", {
            "QueueName": self.names.queue,
            "Attributes": {"MessageRetentionPeriod": "3600", "SqsManagedSseEnabled": "true"},
            "tags": {TAG_KEY: self.names.run_id},
        })["QueueUrl"]
        self.queue_url = url
        self.on_cleanup(f"SQS queue {self.names.queue}",
                        lambda: self.aws.call("sqs", "delete_queue", {"QueueUrl": url}))
        arn = self.aws.call("sqs", "get_queue_attributes",
                            {"QueueUrl": url, "AttributeNames": ["QueueArn"]})["Attributes"]["QueueArn"]
        rule_arn = f"arn:{self.partition}:iot:{self.region}:{self.account}:rule/{self.names.rule}"
        trust = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"Service": "iot.amazonaws.com"}, "Action": "sts:AssumeRole",
            "Condition": {"StringEquals": {"aws:SourceAccount": self.account},
                          "ArnLike": {"aws:SourceArn": rule_arn}}}]}
        role_arn = self.aws.call("iam", "create_role", {
            "RoleName": self.names.role,
            "AssumeRolePolicyDocument": json.dumps(trust),
            "Description": f"aws-smoke {self.names.run_id}: IoT rule -> SQS (deleted by the smoke)",
            "MaxSessionDuration": 3600,
            "Tags": [{"Key": TAG_KEY, "Value": self.names.run_id}],
        })["Role"]["Arn"]
        self.on_cleanup(f"IAM role {self.names.role}", self.delete_role)
        self.aws.call("iam", "put_role_policy", {
            "RoleName": self.names.role, "PolicyName": "send-to-the-smoke-queue",
            "PolicyDocument": json.dumps({"Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Action": "sqs:SendMessage", "Resource": arn}]}),
        })
        payload = {
            "sql": sink_sql(pool),
            "description": f"aws-smoke {self.names.run_id}: messages of stack {self.names.stack} to SQS",
            "actions": [{"sqs": {"roleArn": role_arn, "queueUrl": url, "useBase64": False}}],
            "ruleDisabled": False,
            "awsIotSqlVersion": "2016-03-23",
        }
        # A new role takes a few seconds to be assumable; IoT checks it when the rule is made.
        deadline = self.clock.now() + 120
        while True:
            try:
                self.aws.call("iot", "create_topic_rule", {
                    "ruleName": self.names.rule, "topicRulePayload": payload,
                    "tags": f"{TAG_KEY}={self.names.run_id}"},
                    poll="again every 10 s while IoT cannot assume the new role yet, at most 2 min")
                break
            except AwsError as exc:
                if exc.code != "InvalidRequestException" or self.clock.now() > deadline:
                    raise SmokeFailure(f"create_topic_rule: {exc}") from exc
                self.sleep(10)
        self.on_cleanup(f"IoT topic rule {self.names.rule}",
                        lambda: self.aws.call("iot", "delete_topic_rule", {"ruleName": self.names.rule}))
        self.out.done(f"rule {self.names.rule}: {payload['sql']}")

    def configure(self):
        self.out.begin("config-from-stack", "the daemon's config from the stack outputs, in a temporary directory")
        self.daemon = Daemon(self.out, self.o.binary, self.workdir(), self.o.dry_run, self.fake, self.o.log_level)
        self.out.info(f"   temporary directory {self.daemon.workdir} (config, state, socket, log)")
        if not self.o.dry_run and not self.o.keep:
            workdir = self.daemon.workdir
            self.cleanups.append((f"temporary directory {workdir}", lambda: self.remove_workdir(workdir)))
        self.daemon.ensure_binary()
        stack = self.aws.call("cloudformation", "describe_stacks", {"StackName": self.stack_id})
        tables = self.daemon.write_config(stack)
        if "unauth_role_arn" not in tables.get("identity", {}):
            self.out.info("   note: the config has no identity.unauth_role_arn (enhanced flow for guests)")
        self.out.done()

    def run(self):
        self.out.begin("run", "the daemon as a child process, until it is connected")
        self.daemon.start()
        self.cleanups.append(("the daemon", self.daemon.stop))
        self.wait_connected(self.o.connect_timeout)
        self.out.done(f"identity {self.identity_id}")

    def wait_connected(self, timeout):
        deadline = self.clock.now() + timeout
        last = None
        while True:
            status = self.daemon.status(announce=f"every 2 s until state is connected, at most {minutes(timeout)}")
            summary = self.summarize(status)
            if summary != last:
                self.out.info(f"   {summary}")
                last = summary
            self.print_log_lines(r"(?i)error|warn|attach|refus|denied")
            if status and status.get("state") == "connected" and status.get("identity_id"):
                self.identity_id = status["identity_id"]
                return status
            if not self.daemon.running():
                raise SmokeFailure("the daemon exited: " + " | ".join(self.daemon.log_tail(5)))
            if self.clock.now() > deadline:
                tail = self.daemon.log_tail(10)
                for line in tail:
                    self.out.info(f"   log: {line}")
                raise SmokeFailure(f"not connected after {minutes(timeout)}: {summary}")
            self.sleep(2)

    @staticmethod
    def summarize(status):
        if status is None:
            return "status: no answer on the socket yet"
        keys = ["state", "identity_id", "last_error", "mqtt_last_error", "reconnects_total", "spool_messages"]
        keys += sorted(k for k in status if "attach" in k.lower())
        return "status: " + ", ".join(f"{k}={json.dumps(status.get(k))}" for k in keys if k in status)

    def print_log_lines(self, pattern):
        for line in self.daemon.new_log_lines():
            if re.search(pattern, line):
                self.out.info(f"   log: {line[:300]}")

    def send_one(self, phase):
        n = len(self.sent) + 1
        self.daemon.send(f"smoke/{n}", message_payload(self.names.run_id, n, phase))
        self.sent[n] = phase
        return n

    def send(self):
        self.out.begin("send", f"{self.o.messages} messages, topics smoke/1..smoke/{self.o.messages}")
        for _ in range(self.o.messages):
            self.send_one("send")
        self.out.done()

    def drain_queue(self, announce):
        messages = self.aws.call("sqs", "receive_message", {
            "QueueUrl": self.queue_url, "MaxNumberOfMessages": 10, "WaitTimeSeconds": 10,
        }, poll=announce).get("Messages", [])
        if not messages:
            if self.o.dry_run:
                self.sleep(10)
            return 0
        fresh = 0
        for message in messages:
            try:
                body = json.loads(message["Body"])
            except json.JSONDecodeError:
                continue
            if body.get("smoke_run") == self.names.run_id and isinstance(body.get("n"), int):
                fresh += body["n"] not in self.arrived
                self.arrived.add(body["n"])
        self.aws.call("sqs", "delete_message_batch", {"QueueUrl": self.queue_url, "Entries": [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]},
            poll="after each receive: delete what was read")
        return fresh

    def missing(self, phase=None):
        return sorted(n for n, p in self.sent.items() if n not in self.arrived and (phase is None or p == phase))

    def verify(self):
        self.out.begin("verify", f"every message reaches the queue, at most {minutes(self.o.verify_timeout)}")
        deadline = self.clock.now() + self.o.verify_timeout
        while self.missing():
            if self.drain_queue("long poll (10 s) until every message arrived"):
                self.out.info(f"   arrived {len(self.arrived)}/{len(self.sent)}")
            if self.missing() and self.clock.now() > deadline:
                raise SmokeFailure(f"{len(self.missing())} of {len(self.sent)} messages did not arrive within "
                                   f"{minutes(self.o.verify_timeout)} (missing n={self.missing()[:10]}); "
                                   + self.summarize(self.daemon.status()))
        self.out.done(f"{len(self.sent)}/{len(self.sent)} arrived")

    def policy_targets(self, announce=None):
        targets, marker = [], None
        while True:
            params = {"policyName": self.outputs["IoTPolicy"], "pageSize": 250}
            if marker:
                params["marker"] = marker
            page = self.aws.call("iot", "list_targets_for_policy", params, poll=announce, quiet=announce is None)
            targets += page.get("targets", [])
            marker = page.get("nextMarker")
            if not marker:
                return targets

    def detach(self):
        policy = self.outputs["IoTPolicy"]
        self.out.begin("detach", f"IoT policy {policy} from the device's identity, while it keeps publishing")
        self.out.info(f"   identity {self.identity_id} (from `status --json`), policy {policy} (stack output IoTPolicy)")
        if self.identity_id not in self.policy_targets(announce="before: the identity is a target"):
            self.out.info("   note: the identity is not listed as a target before the detach")
        self.send_one("heal")
        self.aws.call("iot", "detach_policy", {"policyName": policy, "target": self.identity_id})
        self.detached_at = self.clock.now()
        self.out.done()

    def heal(self):
        budget = self.o.heal_budget
        self.out.begin("heal", f"keep publishing every {int(self.o.heal_interval)} s; the daemon must attach "
                               f"the policy again and deliver everything; at most {minutes(budget)}")
        deadline = self.detached_at + budget
        reattached_at = None
        restarted = False
        baseline = self.daemon.status() or {}
        reconnects0 = baseline.get("reconnects_total", 0) or 0
        last_summary = None
        while True:
            started = self.clock.now()
            n = self.send_one("heal" if reattached_at is None else "after")
            status = self.daemon.status(announce="with each message: the daemon's view")
            summary = self.summarize(status)
            if summary != last_summary:
                self.out.info(f"   +{minutes(self.clock.now() - self.detached_at)} {summary}")
                last_summary = summary
            self.print_log_lines(r"(?i)attach|clos|refus|denied|doubt")
            if reattached_at is None:
                targets = self.policy_targets(announce="with each message: is the identity attached again?")
                if self.identity_id in targets:
                    reattached_at = self.clock.now()
                    self.out.info(f"   +{minutes(reattached_at - self.detached_at)} the identity is a target of the "
                                  f"policy again (the daemon re-attached it); message n={n}")
            self.drain_queue("with each message: collect what arrived (10 s long poll)")
            after = [m for m, p in self.sent.items() if p == "after"]
            if reattached_at is not None and len(after) >= 2 and not self.missing():
                break
            now = self.clock.now()
            if now > deadline:
                if reattached_at is None:
                    disrupted = ((status or {}).get("reconnects_total", 0) or 0) > reconnects0
                    why = ("the connection was dropped but the policy was never attached again" if disrupted
                           else "IoT never dropped the daemon's connection and it never re-attached")
                    raise SmokeFailure(f"not re-attached within {minutes(budget)}: {why}; {summary}")
                raise SmokeFailure(f"re-attached after {minutes(reattached_at - self.detached_at)}, but "
                                   f"{len(self.missing())} of {len(self.sent)} messages had not arrived "
                                   f"{minutes(now - reattached_at)} later (missing n={self.missing()[:10]})")
            if (reattached_at is None and not restarted and now - self.detached_at > self.o.heal_restart_after
                    and ((status or {}).get("reconnects_total", 0) or 0) == reconnects0):
                # IoT applies a detach to a live connection when it re-evaluates it; a restart
                # makes the next CONNECT meet the detached state (the daemon's cached "attached"
                # state on disk must not stop it from attaching again).
                self.out.info(f"   no reconnect after {minutes(self.o.heal_restart_after)}: restarting the "
                              "daemon (same state dir) so its next CONNECT meets the detached policy")
                self.daemon.stop()
                self.daemon.start()
                restarted = True
            self.sleep(max(0.0, self.o.heal_interval - (self.clock.now() - started)))
        self.out.done(f"re-attached after {minutes(reattached_at - self.detached_at)}; "
                      f"{len(self.sent)}/{len(self.sent)} messages arrived "
                      f"({sum(1 for p in self.sent.values() if p != 'send')} sent after the detach)")

    # ---- cleanup ----------------------------------------------------------------------------

    def delete_role(self):
        try:
            self.aws.call("iam", "delete_role_policy", {"RoleName": self.names.role, "PolicyName": "send-to-the-smoke-queue"})
        except AwsError as exc:
            if exc.code != "NoSuchEntity":
                raise
        self.aws.call("iam", "delete_role", {"RoleName": self.names.role})

    def delete_stack(self):
        if not self.stack_resources and self.stack_id:
            try:
                self.remember_resources()
            except AwsError:
                pass
        retain = []
        for attempt in range(1, 4):
            params = {"StackName": self.stack_id}
            if retain:
                params["RetainResources"] = retain
            self.aws.call("cloudformation", "delete_stack", params)
            try:
                self.wait_stack("DELETE_COMPLETE", ("DELETE_FAILED",), allow_missing=True)
                break
            except SmokeFailure as exc:
                if attempt == 3:
                    raise
                failed = self.delete_failed_resources()
                self.out.info(f"   delete attempt {attempt} failed ({exc}); failed resources: {failed or 'none listed'}")
                for logical in failed:
                    kind, physical = self.stack_resources.get(logical, (None, None))
                    if kind == "AWS::IoT::Policy" and physical:
                        self.detach_all(physical)
                if attempt == 2:
                    retain = failed  # the last try keeps them out of the stack; cleaned below
                self.sleep(60)
        self.cleanup_retained(set(retain))

    def delete_failed_resources(self):
        answer = self.aws.call("cloudformation", "list_stack_resources", {"StackName": self.stack_id}, quiet=True)
        return [s["LogicalResourceId"] for s in answer.get("StackResourceSummaries", [])
                if s["ResourceStatus"] == "DELETE_FAILED"]

    def cleanup_retained(self, also):
        """Deletes what the stack left behind: resources whose DeletionPolicy retains them
        (read from the template at run time and confirmed by their DELETE_SKIPPED status) and
        those the last delete attempt had to retain."""
        skipped = set(also)
        try:
            answer = self.aws.call("cloudformation", "list_stack_resources", {"StackName": self.stack_id})
            skipped |= {s["LogicalResourceId"] for s in answer.get("StackResourceSummaries", [])
                        if s["ResourceStatus"] == "DELETE_SKIPPED"}
        except AwsError as exc:
            self.out.info(f"   cannot list the deleted stack's resources ({exc}); using the template's DeletionPolicy")
        skipped |= {k for k in self.template.retained() if k in self.stack_resources}
        policy_logical = self.template.resource_of_type("AWS::IoT::Policy")
        for logical in policy_logical:
            self.out.info(f"   {logical}: DeletionPolicy {self.template.deletion_policy(logical)} in "
                          f"{self.rel(self.template.path)}")
        left = []
        order = {"AWS::IoT::Policy": 0, "AWS::Cognito::IdentityPool": 1, "AWS::Cognito::UserPool": 2}
        for logical in sorted(skipped, key=lambda k: order.get(self.stack_resources.get(k, ("", ""))[0], 9)):
            kind, physical = self.stack_resources.get(logical, (None, None))
            if not physical:
                continue
            self.out.info(f"   retained {logical} ({kind}) {physical}: deleting it")
            try:
                if kind == "AWS::IoT::Policy":
                    self.delete_iot_policy(physical)
                elif kind == "AWS::Cognito::IdentityPool":
                    self.aws.call("cognito-identity", "delete_identity_pool", {"IdentityPoolId": physical})
                elif kind == "AWS::Cognito::UserPool":
                    # The template turns deletion protection on; UpdateUserPool resets what it is
                    # not given, which does not matter for a pool deleted right after.
                    self.aws.call("cognito-idp", "update_user_pool",
                                  {"UserPoolId": physical, "DeletionProtection": "INACTIVE"})
                    self.aws.call("cognito-idp", "delete_user_pool", {"UserPoolId": physical})
                else:
                    left.append(f"{kind} {physical}")
            except (AwsError, SmokeFailure) as exc:
                if isinstance(exc, AwsError) and exc.code == "ResourceNotFoundException":
                    continue
                left.append(f"{kind} {physical} ({exc})")
        if left:
            raise SmokeFailure("left behind: " + "; ".join(left))

    def detach_all(self, policy):
        targets, marker = [], None
        while True:
            params = {"policyName": policy, "pageSize": 250}
            if marker:
                params["marker"] = marker
            page = self.aws.call("iot", "list_targets_for_policy", params)
            targets += page.get("targets", [])
            marker = page.get("nextMarker")
            if not marker:
                break
        for target in targets:
            self.aws.call("iot", "detach_policy", {"policyName": policy, "target": target})
        return targets

    def delete_iot_policy(self, policy):
        self.detach_all(policy)
        versions = self.aws.call("iot", "list_policy_versions", {"policyName": policy}).get("policyVersions", [])
        for version in versions:
            if not version.get("isDefaultVersion"):
                self.aws.call("iot", "delete_policy_version", {"policyName": policy, "policyVersionId": version["versionId"]})
        # IoT can refuse deleting a just-detached policy for a few minutes.
        deadline = self.clock.now() + 600
        while True:
            try:
                self.aws.call("iot", "delete_policy", {"policyName": policy},
                              poll="again every 30 s while IoT still counts it as attached, at most 10 min")
                return
            except AwsError as exc:
                if exc.code == "ResourceNotFoundException":
                    return
                if exc.code != "DeleteConflictException" or self.clock.now() > deadline:
                    raise
                self.detach_all(policy)
                self.sleep(30)

    def cleanup(self):
        if not self.cleanups:
            return None
        if self.o.keep:
            self.out.begin("delete", "skipped (--keep): the daemon stops, the rest stays")
            for what, function in reversed(self.cleanups):
                if what == "the daemon":
                    function()
            self.out.info("   kept: " + "; ".join(self.created))
            if self.daemon is not None:
                self.out.info(f"   kept: temporary directory {self.daemon.workdir} (config, state, log)")
            self.out.info(f"   delete them later: aws cloudformation delete-stack --stack-name {self.names.stack}, "
                          "then the user pool, identity pool (and IoT policy, if retained) it leaves, the topic "
                          f"rule, the role and the queue; all carry the tag {TAG_KEY}={self.names.run_id} "
                          "where the service has tags")
            self.out.done()
            return None
        self.out.begin("delete", "everything this run created, newest first")
        errors = []
        previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._interrupt_during_cleanup)
        try:
            for what, function in reversed(self.cleanups):
                self.out.info(f"   - {what}")
                try:
                    function()
                except KeyboardInterrupt:
                    errors.append(f"{what}: interrupted")
                    break
                except Exception as exc:  # noqa: BLE001 - every cleanup runs; each failure is reported
                    errors.append(f"{what}: {exc}")
                    self.out.info(f"     failed: {exc}")
        finally:
            signal.signal(signal.SIGINT, previous)
        self.cleanups.clear()
        if errors:
            self.out.info("   LEFT BEHIND (delete by hand; all carry the tag "
                          f"{TAG_KEY}={self.names.run_id} where the service has tags):")
            for error in errors:
                self.out.info(f"     {error}")
            return "; ".join(errors)
        self.out.done()
        return None

    def remove_workdir(self, workdir):
        if self.failed:
            self.out.info(f"     kept for a look, as the run failed: {workdir} (daemon.log, config.toml, state/)")
            return
        shutil.rmtree(workdir, ignore_errors=True)

    def _interrupt_during_cleanup(self, _signum, _frame):
        self.interrupts += 1
        if self.interrupts >= 3:
            raise KeyboardInterrupt
        self.out.info("   cleanup in progress: interrupting would leave resources behind "
                      f"(press Ctrl-C {3 - self.interrupts} more time(s) to abandon it)")

    @staticmethod
    def rel(path):
        try:
            return str(Path(path).resolve().relative_to(REPO_ROOT))
        except ValueError:
            return str(path)

    # ---- the whole run ----------------------------------------------------------------------

    def main(self):
        mode = "DRY RUN: prints the plan, calls nothing" if self.o.dry_run else "real AWS account"
        self.out.line(f"aws-smoke: {mode}")
        self.out.line(f"aws-smoke: template {self.rel(self.template.path)}"
                      + (f", first deployed from {self.rel(self.old_template.path)} (--update-from)"
                         if self.old_template else ""))
        failure = None
        try:
            self.preflight()
            self.deploy()
            if self.old_template:
                self.update()
            self.sink()
            self.configure()
            self.run()
            self.send()
            self.verify()
            self.detach()
            self.heal()
        except SmokeFailure as exc:
            failure = (self.out.step, str(exc))
        except AwsError as exc:
            failure = (self.out.step, f"AWS answered {exc}")
        except KeyboardInterrupt:
            failure = (self.out.step, "interrupted")
        except Exception as exc:  # noqa: BLE001 - reported in the verdict, resources still cleaned up
            failure = (self.out.step, f"{type(exc).__name__}: {exc}")
        finally:
            self.failed = failure is not None
            if failure and self.daemon is not None:
                tail = self.daemon.log_tail(20)
                if tail:
                    self.out.line()
                    self.out.line(f"the daemon's last log lines ({self.daemon.log}):")
                    for line in tail:
                        self.out.line(f"   {line[:300]}")
            try:
                cleanup_error = self.cleanup()
            except KeyboardInterrupt:
                cleanup_error = "interrupted"
            if cleanup_error and failure is None:
                failure = ("delete", cleanup_error)
        self.out.line()
        if self.o.dry_run and self.aws is not None:
            checked = (f"{self.aws.validated} AWS calls checked against botocore's service models"
                       if self.aws.validated else "botocore not installed: AWS calls not checked against its models")
            self.out.line(f"aws-smoke: dry run: {checked}")
        if failure:
            step, reason = failure
            self.out.line(f"aws-smoke: FAILED at {step}: {redact_text(reason)}")
            return 1
        if self.o.dry_run:
            self.out.line("aws-smoke: DRY RUN complete (nothing was called; a real run ends with PASSED or FAILED)")
            return 0
        self.out.line("aws-smoke: PASSED")
        return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="aws-smoke.py",
        description="Deploy a throwaway stack, run the daemon from this build against it, check delivery "
                    "and healing of a detached IoT policy, delete everything. Needs AWS credentials and a "
                    "region from the usual places; costs cents; about 10-30 minutes.")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; call nothing, need no credentials")
    parser.add_argument("--binary", default=DEFAULT_BINARY,
                        help=f"the daemon to test (default {DEFAULT_BINARY}; built with cargo if missing)")
    parser.add_argument("--template", default=str(TEMPLATE), help="the current template (default: cloudformation/cognito.yml)")
    parser.add_argument("--update-from", metavar="OLD_TEMPLATE",
                        help="deploy OLD_TEMPLATE first, then update the stack to the current template "
                             "keeping the stored parameter values")
    parser.add_argument("--device-cidrs", help="DeviceCidrs (default: this machine's public address/32 "
                                               f"from {CHECKIP_URL})")
    parser.add_argument("--email-domain", default="devices.example.com", help="AllowedEmailDomain")
    parser.add_argument("--registration-mode", default="self-register", choices=["self-register", "shared-user"])
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="another stack parameter (repeatable; wins over the smoke's own values)")
    parser.add_argument("--stack-name", help="stack name (default iot-relay-smoke-<random>); Prefix derives from it")
    parser.add_argument("--messages", type=int, default=10, help="messages of the send step (default 10)")
    parser.add_argument("--heal-budget", type=float, default=1200, help="seconds for the heal check (default 1200)")
    parser.add_argument("--keep", action="store_true", help="keep the stack and everything else (the daemon stops)")
    parser.add_argument("--region", help="AWS region (default: from the environment or profile)")
    parser.add_argument("--profile", help="AWS profile (default: from the environment)")
    parser.add_argument("--log-level", default="info", help="the daemon's log level (default info)")
    parser.add_argument("--fault", choices=["deploy", "verify", "heal"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fault and not args.dry_run:
        parser.error("--fault is for --dry-run only")
    if args.messages < 1:
        parser.error("--messages must be at least 1")
    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--param {item!r}: expected KEY=VALUE")
        params[key] = value
    if params.get("EnableIoTLogging", "false") != "false":
        parser.error("EnableIoTLogging changes the account-wide IoT logging setting; the smoke never does")
    binary = Path(args.binary)
    if not binary.is_absolute():
        binary = REPO_ROOT / binary
    return Options(dry_run=args.dry_run, binary=binary, template=Path(args.template),
                   update_from=Path(args.update_from) if args.update_from else None,
                   device_cidrs=args.device_cidrs, email_domain=args.email_domain,
                   registration_mode=args.registration_mode, params=params, stack_name=args.stack_name,
                   messages=args.messages, heal_budget=args.heal_budget, keep=args.keep,
                   region=args.region, profile=args.profile, log_level=args.log_level, fault=args.fault)


def main(argv=None):
    try:
        options = parse_args(argv)
        smoke = Smoke(options)
    except SmokeFailure as exc:
        print(f"aws-smoke: FAILED at preflight: {exc}", flush=True)
        return 1

    def terminate(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    return smoke.main()


if __name__ == "__main__":
    sys.exit(main())
