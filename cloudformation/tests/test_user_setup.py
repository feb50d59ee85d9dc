"""The user-setup custom resource, extracted from the template and run against moto (mock_aws).

The fake account is built from the template's own resource properties, and the custom resource
gets the properties CloudFormation would send, evaluated from the template with moto's ids.
CloudFormation's pre-signed response URL is a recorder on 127.0.0.1.
"""
import json
import logging
import string
import time

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

import cfn
from helpers import PARAMETERS, PREFIX, FakeContext, cfn_event

REGION = "us-east-1"


class Cloud:
    """moto resources made from the template's properties, and the AppUser properties."""

    def __init__(self, template):
        self.idp = boto3.client("cognito-idp", region_name=REGION)
        self.sm = boto3.client("secretsmanager", region_name=REGION)
        self.identity = boto3.client("cognito-identity", region_name=REGION)
        self.iot = boto3.client("iot", region_name=REGION)
        self.kms = boto3.client("kms", region_name=REGION)
        account = boto3.client("sts", region_name=REGION).get_caller_identity()["Account"]
        stack = cfn.Stack(template, PARAMETERS, region=REGION, account=account)

        pool = stack.properties("CognitoUserPool")
        pool.pop("LambdaConfig")  # moto would try to run the trigger in Docker
        pool.pop("DeletionProtection", None)
        self.pool_id = self.idp.create_user_pool(PoolName=pool.pop("UserPoolName"), **pool)[
            "UserPool"]["Id"]
        stack.refs["CognitoUserPool"] = self.pool_id

        client = stack.properties("CognitoUserPoolClient")
        self.client_id = self.idp.create_user_pool_client(**client)["UserPoolClient"]["ClientId"]
        stack.refs["CognitoUserPoolClient"] = self.client_id

        self.identity_pool_id = self.identity.create_identity_pool(
            **stack.properties("CognitoIdentityPool"))["IdentityPoolId"]
        stack.refs["CognitoIdentityPool"] = self.identity_pool_id

        policy = stack.properties("CognitoIoTPolicy")
        self.iot.create_policy(policyName=policy["PolicyName"],
                               policyDocument=json.dumps(policy["PolicyDocument"]))
        self.stack = stack
        self.props = {key: str(value) for key, value in stack.properties("AppUser").items()
                      if key not in ("ServiceToken", "ServiceTimeout")}

    def secret_name(self, props=None):
        props = props or self.props
        return f"{props['UserPoolId']}_{props['UserName']}"

    def secret_exists(self, name):
        try:
            self.sm.describe_secret(SecretId=name)
            return True
        except ClientError as exc:
            assert exc.response["Error"]["Code"] == "ResourceNotFoundException"
            return False

    def user_exists(self, user_name, pool_id=None):
        try:
            self.idp.admin_get_user(UserPoolId=pool_id or self.pool_id, Username=user_name)
            return True
        except ClientError as exc:
            assert exc.response["Error"]["Code"] == "UserNotFoundException"
            return False

    def tags(self, name):
        return {t["Key"]: t["Value"] for t in self.sm.describe_secret(SecretId=name)["Tags"]}

    def password(self, name):
        return json.loads(self.sm.get_secret_value(SecretId=name)["SecretString"])


@pytest.fixture
def cloud(aws_env, template):
    with mock_aws():
        yield Cloud(template)


@pytest.fixture
def invoke(user_setup, cfn_responses):
    def run(kind, props, physical_id=None, old_properties=None, context=None):
        event = cfn_event(kind, props, cfn_responses.url, physical_id, old_properties)
        before = len(cfn_responses.requests)
        user_setup.handler(event, context or FakeContext())
        assert len(cfn_responses.requests) == before + 1, "expected exactly one response"
        answer = cfn_responses.last()
        assert answer["RequestId"] == event["RequestId"]
        assert answer["StackId"] == event["StackId"]
        assert answer["LogicalResourceId"] == "AppUser"
        return answer
    return run


# ------------------------------------------------------------------------------------ Create

def test_create_makes_the_user_the_secret_and_its_tags(cloud, invoke):
    answer = invoke("Create", cloud.props)
    assert answer["Status"] == "SUCCESS", answer["Reason"]
    name = cloud.secret_name()
    assert name == f"{cloud.pool_id}_{PREFIX}-app-user"
    assert answer["PhysicalResourceId"] == name

    described = cloud.sm.describe_secret(SecretId=name)
    data = answer["Data"]
    assert data["SecretArn"] == described["ARN"]
    assert data["SecretName"] == name
    assert data["UserName"] == f"{PREFIX}-app-user"
    assert described.get("KmsKeyId") in (None, "alias/aws/secretsmanager")
    assert cloud.tags(name) == {
        "ClientId": cloud.client_id,
        "UserPoolId": cloud.pool_id,
        "IdentityPoolId": cloud.identity_pool_id,
        "IoTEndpoint": data["IoTEndpoint"],
        "IoTPolicy": f"{PREFIX}-iot-policy",
        "AttachFunction": cloud.stack.get_att("AttachPolicyFunction", "Arn"),
    }
    assert data["IoTEndpoint"].endswith(".amazonaws.com")

    secret = cloud.password(name)
    assert list(secret) == [f"{PREFIX}-app-user"]
    password = secret[f"{PREFIX}-app-user"]
    assert len(password) == 32
    for chars in (string.ascii_lowercase, string.ascii_uppercase, string.digits, "!#%&*+-.:=?^_~"):
        assert any(c in chars for c in password)

    user = cloud.idp.admin_get_user(UserPoolId=cloud.pool_id, Username=f"{PREFIX}-app-user")
    assert user["UserStatus"] == "CONFIRMED"
    attributes = {a["Name"]: a["Value"] for a in user["UserAttributes"]}
    assert attributes["email"] == f"{PREFIX}-app-user@example.com"

    # The device's step 3 works with what the secret holds.
    auth = cloud.idp.initiate_auth(
        ClientId=cloud.client_id, AuthFlow="USER_PASSWORD_AUTH",
        AuthParameters={"USERNAME": f"{PREFIX}-app-user", "PASSWORD": password})
    assert auth["AuthenticationResult"]["IdToken"]


def test_every_getatt_on_the_custom_resource_is_answered(cloud, invoke, template):
    answer = invoke("Create", cloud.props)
    used = set()

    def walk(node):
        if isinstance(node, dict):
            if "Fn::GetAtt" in node and node["Fn::GetAtt"][0] == "AppUser":
                used.add(node["Fn::GetAtt"][1])
            for key, value in node.items():
                if key == "Fn::Sub" and isinstance(value, str) and "${AppUser." in value:
                    used.add(value.split("${AppUser.", 1)[1].split("}", 1)[0])
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(template)
    assert used == {"SecretArn", "SecretName", "IoTEndpoint"}
    assert used <= set(answer["Data"])
    update = invoke("Update", cloud.props, answer["PhysicalResourceId"], cloud.props)
    assert used <= set(update["Data"])


def test_the_password_is_never_logged_or_sent_to_cloudformation(cloud, invoke, caplog,
                                                               cfn_responses):
    # At the level the function logs at in Lambda (INFO; botocore's DEBUG dumps bodies).
    caplog.set_level(logging.INFO)
    answer = invoke("Create", cloud.props)
    name = answer["PhysicalResourceId"]
    password = cloud.password(name)[f"{PREFIX}-app-user"]
    invoke("Update", dict(cloud.props, IoTPolicy="x"), name, cloud.props)
    invoke("Delete", cloud.props, name)
    assert "created user" in caplog.text  # the log is not empty
    assert password not in caplog.text
    assert all(password.encode() not in request["raw"] for request in cfn_responses.requests)


def test_create_fails_cleanly_when_the_user_pool_is_missing(cloud, invoke):
    props = dict(cloud.props, UserPoolId="us-east-1_DoesNotExist")
    answer = invoke("Create", props)
    assert answer["Status"] == "FAILED"
    assert "ResourceNotFoundException" in answer["Reason"]
    assert answer["PhysicalResourceId"].startswith("failed-create-")
    assert not cloud.secret_exists(cloud.secret_name(props))
    # CloudFormation's rollback then sends Delete for that id: a no-op that succeeds.
    rollback = invoke("Delete", props, answer["PhysicalResourceId"])
    assert rollback["Status"] == "SUCCESS"


def test_create_rolls_back_its_user_and_never_touches_a_foreign_secret(cloud, invoke):
    name = cloud.secret_name()
    cloud.sm.create_secret(Name=name, SecretString="not ours")
    answer = invoke("Create", cloud.props)
    assert answer["Status"] == "FAILED"
    assert "ResourceExistsException" in answer["Reason"]
    assert not cloud.user_exists(f"{PREFIX}-app-user"), "the user this call made was left behind"
    rollback = invoke("Delete", cloud.props, answer["PhysicalResourceId"])
    assert rollback["Status"] == "SUCCESS"
    assert cloud.sm.get_secret_value(SecretId=name)["SecretString"] == "not ours"


def test_create_answers_failed_on_unexpected_errors(cloud, invoke, user_setup, monkeypatch):
    def boom():
        raise RuntimeError("endpoint lookup exploded " + "x" * 10_000)

    monkeypatch.setattr(user_setup, "iot_endpoint", boom)
    answer = invoke("Create", cloud.props)
    assert answer["Status"] == "FAILED"
    assert answer["Reason"].startswith("RuntimeError: endpoint lookup exploded")
    assert len(json.dumps(answer)) < 4096  # CloudFormation's limit for a response
    assert not cloud.user_exists(f"{PREFIX}-app-user")


def test_create_answers_failed_when_a_call_fails_midway(cloud, invoke, user_setup, monkeypatch):
    real_client = user_setup.client

    def client(name):
        made = real_client(name)
        if name == "secretsmanager":
            def refuse(**kwargs):
                raise ClientError({"Error": {"Code": "AccessDeniedException",
                                             "Message": "not allowed"}}, "CreateSecret")
            made.create_secret = refuse
        return made

    monkeypatch.setattr(user_setup, "client", client)
    answer = invoke("Create", cloud.props)
    assert answer["Status"] == "FAILED"
    assert "AccessDeniedException" in answer["Reason"]
    assert not cloud.user_exists(f"{PREFIX}-app-user")


@pytest.mark.parametrize("missing", ["ClientId", "UserPoolId", "KmsKeyId", "EmailAddress"])
def test_create_answers_failed_on_missing_properties(cloud, invoke, missing):
    props = dict(cloud.props)
    del props[missing]
    answer = invoke("Create", props)
    assert answer["Status"] == "FAILED"
    assert missing in answer["Reason"]


def test_unknown_request_types_are_answered(cloud, invoke):
    answer = invoke("Explode", cloud.props)
    assert answer["Status"] == "FAILED"
    assert "unknown request type" in answer["Reason"]


# ------------------------------------------------------------------------------------ Update

def test_update_in_place_keeps_user_and_password_and_refreshes_tags(cloud, invoke):
    created = invoke("Create", cloud.props)
    name = created["PhysicalResourceId"]
    password = cloud.password(name)
    key_arn = cloud.kms.create_key()["KeyMetadata"]["Arn"]
    cloud.iot.create_policy(policyName="other-policy", policyDocument="{}")
    new = dict(cloud.props, IoTPolicy="other-policy", KmsKeyId=key_arn)

    answer = invoke("Update", new, name, cloud.props)
    assert answer["Status"] == "SUCCESS", answer["Reason"]
    assert answer["PhysicalResourceId"] == name  # same resource: CloudFormation deletes nothing
    assert answer["Data"]["SecretArn"] == created["Data"]["SecretArn"]
    assert answer["Data"]["SecretName"] == name
    assert cloud.tags(name)["IoTPolicy"] == "other-policy"
    assert set(cloud.tags(name)) == {"ClientId", "UserPoolId", "IdentityPoolId", "IoTEndpoint",
                                     "IoTPolicy", "AttachFunction"}
    assert cloud.sm.describe_secret(SecretId=name)["KmsKeyId"] == key_arn
    assert cloud.password(name) == password
    assert cloud.user_exists(f"{PREFIX}-app-user")


def test_update_with_nothing_changed_succeeds(cloud, invoke):
    created = invoke("Create", cloud.props)
    answer = invoke("Update", cloud.props, created["PhysicalResourceId"], cloud.props)
    assert answer["Status"] == "SUCCESS", answer["Reason"]
    assert answer["PhysicalResourceId"] == created["PhysicalResourceId"]


def test_update_with_a_new_user_name_is_a_replacement(cloud, invoke):
    created = invoke("Create", cloud.props)
    new = dict(cloud.props, UserName="relay-two-app-user",
               EmailAddress="relay-two-app-user@example.com")
    answer = invoke("Update", new, created["PhysicalResourceId"], cloud.props)
    assert answer["Status"] == "SUCCESS", answer["Reason"]
    assert answer["PhysicalResourceId"] == f"{cloud.pool_id}_relay-two-app-user"
    assert cloud.user_exists("relay-two-app-user")
    # CloudFormation then deletes the old physical resource with the old properties.
    cleanup = invoke("Delete", cloud.props, created["PhysicalResourceId"])
    assert cleanup["Status"] == "SUCCESS"
    assert not cloud.secret_exists(created["PhysicalResourceId"])
    assert not cloud.user_exists(f"{PREFIX}-app-user")
    assert cloud.secret_exists(answer["PhysicalResourceId"])
    assert cloud.user_exists("relay-two-app-user")


def test_failed_update_keeps_the_old_physical_id(cloud, invoke):
    created = invoke("Create", cloud.props)
    name = created["PhysicalResourceId"]
    cloud.sm.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True)  # out of band
    answer = invoke("Update", dict(cloud.props, IoTPolicy="x"), name, cloud.props)
    assert answer["Status"] == "FAILED"
    assert answer["PhysicalResourceId"] == name  # never a new id: nothing gets deleted by mistake


def identities_holding(cloud, policy, count=0):
    """Makes `count` identities of the pool hold `policy`; returns the policy's targets."""
    for _ in range(count):
        identity_id = cloud.identity.get_id(IdentityPoolId=cloud.identity_pool_id)["IdentityId"]
        cloud.iot.attach_policy(policyName=policy, target=identity_id)
    return cloud.iot.list_targets_for_policy(policyName=policy)["targets"]


def test_update_to_a_new_policy_only_retags(cloud, invoke):
    # The old policy is Retain on replacement: its attachments stay, nothing is detached.
    created = invoke("Create", cloud.props)
    old = cloud.props["IoTPolicy"]
    assert len(identities_holding(cloud, old, 2)) == 2
    cloud.iot.create_policy(policyName="other-policy", policyDocument="{}")
    answer = invoke("Update", dict(cloud.props, IoTPolicy="other-policy"),
                    created["PhysicalResourceId"], cloud.props)
    assert answer["Status"] == "SUCCESS", answer["Reason"]
    assert len(identities_holding(cloud, old)) == 2
    assert cloud.tags(created["PhysicalResourceId"])["IoTPolicy"] == "other-policy"


# ------------------------------------------------------------------------------------ Delete

def test_delete_leaves_the_retained_iot_policy_and_its_attachments(cloud, invoke, user_setup,
                                                                    monkeypatch):
    """The IoT policy is DeletionPolicy Retain (thousands of attachments cannot be detached in
    one run, and IoT can refuse deleting a just-detached policy): Delete makes no IoT call."""
    created = invoke("Create", cloud.props)
    policy = cloud.props["IoTPolicy"]
    assert len(identities_holding(cloud, policy, 3)) == 3
    real_client = user_setup.client
    services = []
    monkeypatch.setattr(user_setup, "client", lambda name: services.append(name) or real_client(name))
    answer = invoke("Delete", cloud.props, created["PhysicalResourceId"])
    assert answer["Status"] == "SUCCESS", answer["Reason"]
    assert "left behind" not in answer["Reason"]
    assert "iot" not in services
    assert len(identities_holding(cloud, policy)) == 3
    assert not cloud.secret_exists(created["PhysicalResourceId"])


def test_delete_after_the_policy_is_gone_succeeds(cloud, invoke):
    created = invoke("Create", cloud.props)
    cloud.iot.delete_policy(policyName=cloud.props["IoTPolicy"])
    answer = invoke("Delete", cloud.props, created["PhysicalResourceId"])
    assert answer["Status"] == "SUCCESS"
    assert "left behind" not in answer["Reason"]
    assert not cloud.secret_exists(created["PhysicalResourceId"])


def test_delete_removes_the_secret_and_the_user(cloud, invoke):
    created = invoke("Create", cloud.props)
    answer = invoke("Delete", cloud.props, created["PhysicalResourceId"])
    assert answer["Status"] == "SUCCESS", answer["Reason"]
    assert not cloud.secret_exists(created["PhysicalResourceId"])
    assert not cloud.user_exists(f"{PREFIX}-app-user")


def test_delete_of_what_is_already_gone_succeeds(cloud, invoke):
    created = invoke("Create", cloud.props)
    assert invoke("Delete", cloud.props, created["PhysicalResourceId"])["Status"] == "SUCCESS"
    again = invoke("Delete", cloud.props, created["PhysicalResourceId"])
    assert again["Status"] == "SUCCESS"
    assert "left behind" not in again["Reason"]
    cloud.idp.delete_user_pool(UserPoolId=cloud.pool_id)
    assert invoke("Delete", cloud.props, created["PhysicalResourceId"])["Status"] == "SUCCESS"


def test_delete_never_blocks_the_stack_and_names_what_it_left(cloud, invoke, user_setup, monkeypatch):
    created = invoke("Create", cloud.props)

    class Refusing:
        def __getattr__(self, name):
            def refuse(**kwargs):
                raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, name)
            return refuse

    monkeypatch.setattr(user_setup, "client", lambda name: Refusing())
    answer = invoke("Delete", cloud.props, created["PhysicalResourceId"])
    assert answer["Status"] == "SUCCESS"
    assert "left behind" in answer["Reason"]
    assert created["PhysicalResourceId"] in answer["Reason"]
    assert "AccessDeniedException" in answer["Reason"]


def test_delete_answers_even_when_properties_are_garbage(cloud, invoke):
    answer = invoke("Delete", {}, "some-id")
    assert answer["Status"] == "SUCCESS"


# ------------------------------------------------------------------- answering CloudFormation

def test_answers_before_the_lambda_times_out_and_cleans_up_after(cloud, user_setup, cfn_responses,
                                                                  monkeypatch):
    real = user_setup.iot_endpoint

    def slow():
        time.sleep(1.5)
        return real()

    monkeypatch.setattr(user_setup, "iot_endpoint", slow)
    context = FakeContext(remaining_ms=10_600)  # the watchdog fires 10 s before the end: at 0.6 s
    started = time.monotonic()
    user_setup.handler(cfn_event("Create", cloud.props, cfn_responses.url), context)
    assert len(cfn_responses.requests) == 1, "exactly one answer, the timeout's"
    answer = cfn_responses.last()
    assert answer["Status"] == "FAILED"
    assert "timed out" in answer["Reason"]
    assert answer["PhysicalResourceId"].startswith("failed-create-")
    assert cfn_responses.requests[0]["at"] - started < 1.4, "answered only after the work ended"
    # CloudFormation was told FAILED: what the late call made must not linger.
    assert not cloud.user_exists(f"{PREFIX}-app-user")
    assert not cloud.secret_exists(cloud.secret_name())


def test_delete_timeout_answers_success(cloud, user_setup, cfn_responses, monkeypatch):
    def slow(name):
        time.sleep(1.2)
        raise ClientError({"Error": {"Code": "ResourceNotFoundException", "Message": ""}}, "x")

    monkeypatch.setattr(user_setup, "client", slow)
    event = cfn_event("Delete", cloud.props, cfn_responses.url, physical_id=cloud.secret_name())
    user_setup.handler(event, FakeContext(remaining_ms=10_500))
    assert [a["Status"] for a in cfn_responses.answers] == ["SUCCESS"]


def test_response_is_a_put_that_s3_accepts(cloud, invoke, cfn_responses):
    invoke("Create", cloud.props)
    request = cfn_responses.requests[-1]
    assert request["method"] == "PUT"
    assert request["path"].startswith("/cfn-response?X-Amz-Signature=")
    # The pre-signed URL was signed without a content type: any other value breaks the signature.
    assert request["headers"].get("Content-Type", "") == ""
    answer = json.loads(request["raw"])
    assert set(answer) >= {"Status", "Reason", "PhysicalResourceId", "StackId", "RequestId",
                           "LogicalResourceId", "Data"}


def test_response_delivery_is_retried(cloud, user_setup, cfn_responses):
    cfn_responses.failures_left = 1  # the first PUT gets HTTP 503
    event = cfn_event("Delete", cloud.props, cfn_responses.url, physical_id="failed-create-x")
    user_setup.handler(event, FakeContext())
    assert [a["Status"] for a in cfn_responses.answers] == ["SUCCESS", "SUCCESS"]


# ------------------------------------------------------------------ self-register (fleet) mode

def fleet_props(cloud):
    return dict(cloud.props, RegistrationMode="self-register")


def test_self_register_create_makes_a_code_and_no_user(cloud, invoke, caplog):
    props = fleet_props(cloud)
    with caplog.at_level(logging.INFO):
        answer = invoke("Create", props)
    assert answer["Status"] == "SUCCESS", answer["Reason"]
    name = cloud.secret_name()
    assert answer["PhysicalResourceId"] == name  # the same secret name as in shared-user mode
    value = cloud.password(name)
    assert list(value) == ["registration_code"]
    code = value["registration_code"]
    assert len(code) >= 43 and set(code) <= set(string.ascii_letters + string.digits + "-_")
    assert not cloud.user_exists(f"{PREFIX}-app-user")
    tags = cloud.tags(name)
    assert tags["EmailDomain"] == "example.com"
    assert list(tags)[:5] == ["ClientId", "UserPoolId", "IdentityPoolId", "IoTEndpoint", "IoTPolicy"]
    assert code not in caplog.text and code not in json.dumps(answer)
    # A second stack gets another code.
    other = cloud.idp.create_user_pool(PoolName="other")["UserPool"]["Id"]
    second = invoke("Create", dict(props, UserPoolId=other))
    assert cloud.password(second["PhysicalResourceId"])["registration_code"] != code


def test_shared_user_secrets_carry_no_email_domain_tag(cloud, invoke):
    answer = invoke("Create", cloud.props)
    assert "EmailDomain" not in cloud.tags(answer["PhysicalResourceId"])


def test_update_keeps_the_code_unless_the_mode_changes(cloud, invoke):
    props = fleet_props(cloud)
    name = invoke("Create", props)["PhysicalResourceId"]
    code = cloud.password(name)["registration_code"]
    # An operator's rotation (put-secret-value) survives later stack updates.
    cloud.sm.put_secret_value(SecretId=name, SecretString=json.dumps({"registration_code": "rotated-" + "r" * 40}))
    assert invoke("Update", dict(props, IoTPolicy=props["IoTPolicy"]), name, props)["Status"] == "SUCCESS"
    assert cloud.password(name) == {"registration_code": "rotated-" + "r" * 40}
    assert code != "rotated-" + "r" * 40


def test_migrating_a_shared_user_stack_to_self_register(cloud, invoke):
    shared = cloud.props
    name = invoke("Create", shared)["PhysicalResourceId"]
    # Stacks from before RegistrationMode send no such property: they are shared-user.
    old = {k: v for k, v in shared.items() if k != "RegistrationMode"}
    answer = invoke("Update", fleet_props(cloud), name, old)
    assert answer["Status"] == "SUCCESS", answer["Reason"]
    assert answer["PhysicalResourceId"] == name  # devices keep their secret_id
    assert list(cloud.password(name)) == ["registration_code"]
    assert cloud.tags(name)["EmailDomain"] == "example.com"
    # The shared user stays until the operator deletes it (docs/operations.md).
    assert cloud.user_exists(f"{PREFIX}-app-user")


def test_going_back_to_shared_user_makes_a_working_user(cloud, invoke):
    props = fleet_props(cloud)
    name = invoke("Create", props)["PhysicalResourceId"]
    answer = invoke("Update", cloud.props, name, props)
    assert answer["Status"] == "SUCCESS", answer["Reason"]
    secret = cloud.password(name)
    password = secret[f"{PREFIX}-app-user"]
    auth = cloud.idp.initiate_auth(
        ClientId=cloud.client_id, AuthFlow="USER_PASSWORD_AUTH",
        AuthParameters={"USERNAME": f"{PREFIX}-app-user", "PASSWORD": password})
    assert auth["AuthenticationResult"]["IdToken"]
    # And once more to self-register and back: the kept user gets a new password.
    invoke("Update", props, name, cloud.props)
    assert invoke("Update", cloud.props, name, props)["Status"] == "SUCCESS"
    assert cloud.password(name)[f"{PREFIX}-app-user"] != password
