"""scripts/aws-smoke.py (`make aws-smoke`): its pure parts, and its dry run end to end.

The dry run runs the smoke's own code against an in-memory stand-in of AWS and of the daemon,
checks every AWS call against botocore's service models and calls nothing, so CI can run it.
"""
import importlib.util
import os
import random
import re
import subprocess
import sys

import pytest

import cfn

SCRIPT = cfn.REPO_ROOT / "scripts" / "aws-smoke.py"
FAKE_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
FAKE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
FAKE_TOKEN = "IQoJb3JpZ2luX2VjEXAMPLEsessiontoken"
SECRET_LIKE = [
    re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\."),  # JWT
    re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"),  # access key id
    re.compile(r"(?i)\"?(password|SecretAccessKey|SessionToken|registration_code)\"?\s*[:=]\s*\"?[^\s\"<]"),
]


def load_smoke():
    spec = importlib.util.spec_from_file_location("aws_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["aws_smoke"] = module
    spec.loader.exec_module(module)
    return module


smoke = load_smoke()


@pytest.fixture(scope="module")
def prefix_pattern():
    return re.compile(cfn.load_template()["Parameters"]["Prefix"]["AllowedPattern"])


def dry_run(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    # Credentials in the environment must neither be needed nor be printed.
    env.update(AWS_ACCESS_KEY_ID=FAKE_KEY_ID, AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
               AWS_SESSION_TOKEN=FAKE_TOKEN, AWS_DEFAULT_REGION="eu-west-1",
               AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", *args], capture_output=True,
                            text=True, env=env, timeout=60, check=False)
    return result


@pytest.fixture(scope="module")
def plan():
    return dry_run()


def steps(output):
    return [m.group(1) for m in re.finditer(r"^== ([a-z-]+):", output, re.MULTILINE)]


def assert_no_secrets(output):
    for value in (FAKE_KEY_ID, FAKE_SECRET, FAKE_TOKEN):
        assert value not in output
    for pattern in SECRET_LIKE:
        assert not pattern.search(output), pattern.search(output).group(0)


def assert_in_order(items, expected):
    positions = [items.index(step) for step in expected]
    assert positions == sorted(positions), items


# ---- pure parts --------------------------------------------------------------------------------


def test_default_names_fit_the_templates_prefix_pattern(prefix_pattern):
    rng = random.Random(7)
    for _ in range(500):
        names = smoke.derive_names(rng=rng, prefix_pattern=prefix_pattern)
        assert prefix_pattern.match(names.prefix), names
        assert names.stack.startswith("iot-relay-smoke-") and names.prefix == names.stack
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{0,127}", names.stack)
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,80}", names.queue)
        assert re.fullmatch(r"[\w+=,.@-]{1,64}", names.role)
        assert re.fullmatch(r"[A-Za-z0-9_]{1,128}", names.rule)
    two = {smoke.derive_names(prefix_pattern=prefix_pattern).stack for _ in range(20)}
    assert len(two) == 20, "every run gets its own stack"


@pytest.mark.parametrize("stack_name", [
    "My-Smoke-Stack", "x" * 40 + "-ab12cd34", "a" + "-b" * 60, "Smoke2", "q" * 128,
])
def test_prefix_from_a_given_stack_name(stack_name, prefix_pattern):
    prefix = smoke.derive_prefix(stack_name, prefix_pattern)
    assert prefix_pattern.match(prefix), prefix
    assert prefix == prefix.lower()
    if stack_name.endswith("-ab12cd34"):
        assert prefix.endswith("ab12cd34"), "a long name keeps its random end"


def test_a_stack_name_without_a_usable_prefix_is_refused(prefix_pattern):
    with pytest.raises(smoke.SmokeFailure):
        smoke.derive_names("9", prefix_pattern=prefix_pattern)
    with pytest.raises(smoke.SmokeFailure):
        smoke.derive_names("has space", prefix_pattern=prefix_pattern)


def test_create_parameters_are_checked_against_the_template(tmp_path):
    template = smoke.Template.read(cfn.TEMPLATE_PATH)
    names = smoke.derive_names(prefix_pattern=template.prefix_pattern())
    params = smoke.create_parameters(template, names, "203.0.113.10/32", "devices.example.com",
                                     "self-register", {})
    assert {p["ParameterKey"]: p["ParameterValue"] for p in params} == {
        "Prefix": names.prefix, "AllowedEmailDomain": "devices.example.com",
        "DeviceCidrs": "203.0.113.10/32", "RegistrationMode": "self-register"}
    with pytest.raises(smoke.SmokeFailure, match="DeviceCidrs"):
        smoke.create_parameters(template, names, "203.0.113.10", "devices.example.com", "self-register", {})
    with pytest.raises(smoke.SmokeFailure, match="RegistrationMode"):
        smoke.create_parameters(template, names, "203.0.113.10/32", "d.example.com", "fleet", {})


def test_update_reuses_stored_values_and_fills_new_parameters():
    template = smoke.Template.read(cfn.TEMPLATE_PATH)
    previous = set(template.parameters) - {"RegistrationMode", "LogRetentionInDays"}
    params, notes = smoke.update_parameters(template, previous, {"AllowClassicFlow": "true"})
    by_key = {p["ParameterKey"]: p for p in params}
    assert by_key["Prefix"] == {"ParameterKey": "Prefix", "UsePreviousValue": True}
    assert by_key["DeviceCidrs"]["UsePreviousValue"] is True
    assert by_key["RegistrationMode"]["ParameterValue"] == "shared-user"
    assert by_key["AllowClassicFlow"]["ParameterValue"] == "true"
    assert "LogRetentionInDays" not in by_key, "a new parameter without a rule takes its default"
    assert any(n.startswith("LogRetentionInDays: new") for n in notes)


def test_redaction():
    shown = smoke.redact({"Password": "hunter2", "IdToken": "x", "Credentials": {"SecretKey": "s"},
                          "SecretName": "pool_app-user", "note": f"key {FAKE_KEY_ID}",
                          "url": "wss://h/mqtt?X-Amz-Signature=abc&X-Amz-Security-Token=def"})
    assert shown["Password"] == shown["IdToken"] == shown["Credentials"] == "<redacted>"
    assert shown["SecretName"] == "pool_app-user", "a secret's name is not a secret"
    assert FAKE_KEY_ID not in shown["note"]
    assert "abc" not in shown["url"] and "def" not in shown["url"]
    assert "X-Amz-Signature=<redacted>" in shown["url"]
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJl"
    assert jwt not in smoke.redact_text(f"token {jwt} end")


def test_sink_is_scoped_to_the_stacks_identity_pool():
    sql = smoke.sink_sql("eu-west-1:0000-1111")
    assert sql == "SELECT *, topic() AS smoke_topic FROM 'eu-west-1:0000-1111/+/smoke/#'"


# ---- the dry run -------------------------------------------------------------------------------

PLAN = ["deploy", "config-from-stack", "run", "send", "verify", "detach", "heal", "delete"]


def test_dry_run_prints_the_whole_plan_in_order(plan):
    result = plan
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert_in_order(steps(out), PLAN)
    assert "update" not in steps(out)
    for call in ("cloudformation create_stack(", "iam create_role(", "sqs create_queue(",
                 "iot create_topic_rule(", "iot detach_policy(", "sqs receive_message(",
                 "cloudformation delete_stack(", "iot delete_topic_rule(", "iam delete_role(",
                 "sqs delete_queue(", "cognito-identity delete_identity_pool(",
                 "cognito-idp delete_user_pool("):
        assert call in out, call
    assert " config-from-stack " in out and " run --config " in out and " send --socket " in out
    assert "status --json --socket" in out
    assert "EnableIoTLogging" not in out and "set_v2_logging" not in out
    assert re.search(r"AWS calls checked against botocore's service models", out)
    assert out.rstrip().splitlines()[-1].startswith("aws-smoke: DRY RUN complete")
    assert_no_secrets(out + result.stderr)


def test_dry_run_update_from_an_older_template(tmp_path):
    text = cfn.TEMPLATE_PATH.read_text(encoding="utf-8")
    old = re.sub(r"  RegistrationMode:\n    Type: String\n(?:      .*\n|    .*\n)*?"
                 r"    AllowedValues: \[self-register, shared-user\]\n", "", text, count=1)
    assert old != text
    path = tmp_path / "old-cognito.yml"
    path.write_text(old, encoding="utf-8")
    result = dry_run("--update-from", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert_in_order(steps(out), ["deploy", "update", "config-from-stack", "run", "send", "verify",
                                 "detach", "heal", "delete"])
    create = next(line for line in out.splitlines() if "create_stack(" in line)
    assert "RegistrationMode" not in create, "the old template has no such parameter"
    update = next(line for line in out.splitlines() if "update_stack(" in line)
    assert '{"ParameterKey":"DeviceCidrs","UsePreviousValue":true}' in update
    assert '{"ParameterKey":"RegistrationMode","ParameterValue":"shared-user"}' in update
    assert_no_secrets(out)


def test_retained_iot_policy_is_deleted_only_when_the_template_retains_it(plan, tmp_path):
    template = cfn.load_template()
    retains = template["Resources"]["CognitoIoTPolicy"].get("DeletionPolicy") in ("Retain", "RetainExceptOnCreate")
    out = plan.stdout
    assert ("retained CognitoIoTPolicy" in out) == retains
    # The opposite policy, from a template copy.
    text = cfn.TEMPLATE_PATH.read_text(encoding="utf-8")
    block = "  CognitoIoTPolicy:\n    Type: AWS::IoT::Policy\n"
    assert block in text
    if retains:
        text = re.sub(r"(  CognitoIoTPolicy:\n    Type: AWS::IoT::Policy\n)(    (DeletionPolicy|UpdateReplacePolicy): \w+\n)+",
                      r"\1", text)
    else:
        text = text.replace(block, block + "    DeletionPolicy: Retain\n    UpdateReplacePolicy: Retain\n")
    copy = tmp_path / "cognito.yml"
    copy.write_text(text, encoding="utf-8")
    out = dry_run("--template", str(copy)).stdout
    assert ("retained CognitoIoTPolicy" in out) == (not retains)
    assert "retained CognitoUserPool" in out and "retained CognitoIdentityPool" in out


@pytest.mark.parametrize("fault, step", [("deploy", "deploy"), ("verify", "verify"), ("heal", "heal")])
def test_a_failed_step_gives_its_verdict_and_still_deletes(fault, step, capsys):
    options = smoke.parse_args(["--dry-run", "--fault", fault, "--heal-budget", "540"])
    code = smoke.Smoke(options).main()
    out = capsys.readouterr().out
    assert code == 1
    assert out.rstrip().splitlines()[-1].startswith(f"aws-smoke: FAILED at {step}: ")
    assert "== delete:" in out and "delete_stack(" in out
    if fault == "heal":
        assert "restarting the daemon" in out
    assert_no_secrets(out)


def test_keep_skips_the_delete(capsys):
    code = smoke.Smoke(smoke.parse_args(["--dry-run", "--keep"])).main()
    out = capsys.readouterr().out
    assert code == 0
    assert "delete_stack(" not in out and "skipped (--keep)" in out


def test_the_smoke_never_turns_on_iot_logging():
    with pytest.raises(SystemExit):
        smoke.parse_args(["--dry-run", "--param", "EnableIoTLogging=true"])
