"""The documented removal of the retained IoT policy (docs/operations.md, "Deleting the stack").

The stack keeps CognitoIoTPolicy on delete (DeletionPolicy Retain, test_template.py says why).
This runs the documented command block itself, with the AWS CLI, against a moto server holding
the template's policy attached to many identities and with older versions, and checks that the
policy is gone afterwards. IoT can refuse deleting a just-detached policy: the first delete is
refused here (a wrapper around `aws`), so the retry loop runs. Needs the `aws` CLI on PATH.
"""
import json
import os
import re
import shutil
import stat
import subprocess
import time

import boto3
import pytest

import cfn
from helpers import PARAMETERS, moto_server

REGION = "us-east-1"
OPERATIONS = cfn.REPO_ROOT / "docs" / "operations.md"
IDENTITIES = 12  # attached identities; each detach is one CLI process (about 1 s of CPU)


def documented_cleanup():
    """The first ```sh block of the section "Deleting the stack"."""
    text = OPERATIONS.read_text(encoding="utf-8")
    section = text.split("\n## Deleting the stack\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "no command block in 'Deleting the stack'"
    return match.group(1)


@pytest.fixture
def moto_endpoint():
    with moto_server() as endpoint:
        yield endpoint


WRAPPER = """#!/bin/sh
# Records every aws call; refuses the first delete-policy as IoT does right after a detach.
echo "$*" >> "{log}"
case "$*" in
  *"iot delete-policy "*)
    if [ ! -e "{refused}" ]; then
      : > "{refused}"
      echo "An error occurred (DeleteConflictException) when calling the DeletePolicy operation: The policy cannot be deleted as the policy is attached to one or more principals" >&2
      exit 254
    fi ;;
esac
exec "{aws}" "$@"
"""


def executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_the_documented_commands_remove_a_retained_policy_with_many_attachments(
        template, moto_endpoint, tmp_path, monkeypatch):
    aws = shutil.which("aws")
    if aws is None:
        pytest.skip("needs the AWS CLI (aws) on PATH")
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                       "AWS_ENDPOINT_URL": moto_endpoint}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    session = boto3.session.Session(region_name=REGION)
    iot = session.client("iot", endpoint_url=moto_endpoint)
    identity = session.client("cognito-identity", endpoint_url=moto_endpoint)

    # The retained policy as the stack left it: the template's document, two older versions.
    stack = cfn.Stack(template, PARAMETERS, region=REGION)
    pool = identity.create_identity_pool(IdentityPoolName="relay_test_identity_pool",
                                         AllowUnauthenticatedIdentities=True)["IdentityPoolId"]
    stack.refs["CognitoIdentityPool"] = pool
    props = stack.properties("CognitoIoTPolicy")
    policy, document = props["PolicyName"], props["PolicyDocument"]
    iot.create_policy(policyName=policy, policyDocument=json.dumps(document))
    for _ in range(2):
        iot.create_policy_version(policyName=policy, policyDocument=json.dumps(document),
                                  setAsDefault=True)
    targets = {identity.get_id(IdentityPoolId=pool)["IdentityId"] for _ in range(IDENTITIES)}
    for target in targets:
        iot.attach_policy(policyName=policy, target=target)
    assert set(iot.list_targets_for_policy(policyName=policy)["targets"]) == targets
    with pytest.raises(iot.exceptions.DeleteConflictException):
        iot.delete_policy(policyName=policy)  # what the stack delete would have run into

    # The documented block, with this region and policy, `aws` wrapped, `sleep` instant.
    script = documented_cleanup()
    script = re.sub(r"^REGION=.*$", f"REGION={REGION}", script, count=1, flags=re.M)
    script = re.sub(r"^POLICY=.*$", f"POLICY={policy}", script, count=1, flags=re.M)
    bin_dir, log = tmp_path / "bin", tmp_path / "aws-calls.log"
    bin_dir.mkdir()
    executable(bin_dir / "aws", WRAPPER.format(log=log, refused=tmp_path / "refused", aws=aws))
    executable(bin_dir / "sleep", "#!/bin/sh\nexit 0\n")
    started = time.monotonic()
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"))
    seconds = time.monotonic() - started
    calls = log.read_text().splitlines()
    print(f"cleanup of {IDENTITIES} attachments: {len(calls)} aws calls in {seconds:.1f} s")
    assert result.returncode == 0, result.stderr

    detached = {c.rsplit("--target ", 1)[1] for c in calls if c.startswith("iot detach-policy ")}
    assert detached == targets
    assert sum(c.startswith("iot delete-policy-version ") for c in calls) == 2
    assert sum(c.startswith("iot delete-policy ") for c in calls) == 2  # refused once, then gone
    assert policy not in [p["policyName"] for p in iot.list_policies()["policies"]]
