"""tests/support/provision.py (the Rust tests' emulated cloud) against the template.

provision.py runs through its CLI, exactly as the Rust harness runs it, against a moto server on
127.0.0.1. What it made is read back and compared with the template evaluated for the same
prefix, region, account and ids; the template's own user-setup Lambda then runs against the
same server so the secrets both produce can be compared field by field. Both registration modes
(the template's RegistrationMode, provision.py's --registration-mode) are checked.
"""
import json
import re
import subprocess
import sys

import urllib.request

import boto3
import pytest

import cfn
from helpers import CIDRS, FakeContext, cfn_event, moto_server

REGION, PREFIX = "us-east-1", "drift-check"
# The JSON the Rust harness reads: this test keeps it stable.
PROVISION_KEYS = {"region", "identity_pool_id", "secret_id", "unauth_role_arn", "user_pool_id",
                  "client_id", "username", "password", "iot_policy", "iot_endpoint",
                  "registration_mode", "registration_code", "email_domain",
                  # tests/support/aws_gate.py
                  "prefix", "account_id", "auth_role_arn", "secret_arn", "attach_function_arn",
                  "pre_sign_up_role_arn"}
MODES = ["shared-user", "self-register"]


@pytest.fixture(scope="module")
def moto_endpoint():
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def clients(moto_endpoint):
    def make(name):
        return boto3.client(name, region_name=REGION, endpoint_url=moto_endpoint,
                            aws_access_key_id="testing", aws_secret_access_key="testing")
    return make


@pytest.fixture(scope="module", params=MODES)
def provisioned(moto_endpoint, clients, request):
    # One server for both modes: start each from an empty account.
    requests_post(f"{moto_endpoint}/moto-api/reset")
    result = subprocess.run(
        [sys.executable, str(cfn.PROVISION_PATH), "--endpoint", moto_endpoint, "--region", REGION,
         "--prefix", PREFIX, "--device-cidrs", ",".join(CIDRS),
         "--attach-function", f"{PREFIX}-attach-policy", "--registration-mode", request.param],
        capture_output=True, text=True, timeout=120, check=True,
        env={"PATH": "/usr/bin:/bin", "AWS_CONFIG_FILE": "/dev/null",
             "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"},
    )
    output = json.loads(result.stdout)
    account = clients("sts").get_caller_identity()["Account"]
    return output, account


def requests_post(url):
    with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=10):
        pass


def template_for(template, provision_module, output, account):
    """The template evaluated with provision.py's ids and values."""
    parameters = {"Prefix": PREFIX, "AllowedEmailDomain": provision_module.PRE_SIGN_UP_EMAIL_DOMAIN,
                  "DeviceCidrs": ",".join(CIDRS), "RegistrationMode": output["registration_mode"]}
    refs = {"CognitoUserPool": output["user_pool_id"],
            "CognitoUserPoolClient": output["client_id"],
            "CognitoIdentityPool": output["identity_pool_id"]}
    return cfn.Stack(template, parameters, region=REGION, account=account, refs=refs)


def test_provision_cli_output_is_unchanged(provisioned):
    output, _ = provisioned
    assert set(output) == PROVISION_KEYS
    assert output["region"] == REGION


def test_names_match_the_template(template, provision, provisioned, clients):
    output, account = provisioned
    stack = template_for(template, provision, output, account)
    idp, identity = clients("cognito-idp"), clients("cognito-identity")

    pool = idp.describe_user_pool(UserPoolId=output["user_pool_id"])["UserPool"]
    template_pool_props = stack.properties("CognitoUserPool")
    assert pool["Name"] == template_pool_props["UserPoolName"]
    # Self sign-up exactly in self-register mode, in both.
    assert pool["AdminCreateUserConfig"]["AllowAdminCreateUserOnly"] is \
        template_pool_props["AdminCreateUserConfig"]["AllowAdminCreateUserOnly"] is \
        (output["registration_mode"] == "shared-user")
    client = idp.describe_user_pool_client(UserPoolId=output["user_pool_id"],
                                           ClientId=output["client_id"])["UserPoolClient"]
    template_client = stack.properties("CognitoUserPoolClient")
    assert client["ClientName"] == template_client["ClientName"]
    assert set(client["ExplicitAuthFlows"]) == set(template_client["ExplicitAuthFlows"])
    assert client["ReadAttributes"] == template_client["ReadAttributes"]
    assert client["WriteAttributes"] == template_client["WriteAttributes"]
    assert not client.get("ClientSecret")

    pool_description = identity.describe_identity_pool(IdentityPoolId=output["identity_pool_id"])
    template_pool = stack.properties("CognitoIdentityPool")
    assert pool_description["IdentityPoolName"] == template_pool["IdentityPoolName"]
    assert pool_description["AllowUnauthenticatedIdentities"] is True
    assert template_pool["AllowUnauthenticatedIdentities"] is True
    (provider,) = pool_description["CognitoIdentityProviders"]
    (template_provider,) = template_pool["CognitoIdentityProviders"]
    assert provider["ProviderName"] == template_provider["ProviderName"]
    assert provider["ClientId"] == template_provider["ClientId"]

    props = stack.properties("AppUser")
    assert props["RegistrationMode"] == output["registration_mode"]
    assert props["UserName"] == provision.app_user_name(PREFIX)
    if output["registration_mode"] == "shared-user":
        assert output["username"] == props["UserName"]
    assert output["iot_policy"] == stack.ref("CognitoIoTPolicy")
    assert output["secret_id"] == provision.secret_name(output["user_pool_id"], PREFIX)
    assert output["secret_id"] == stack.get_att("AppUser", "SecretName")
    # The template leaves role names to CloudFormation (IAM names are account-wide): the
    # emulated account's names are its own; test_roles_match_the_template compares the roles.
    assert "RoleName" not in stack.properties("IAMUnAuthenticatedRole")
    assert output["unauth_role_arn"].startswith(f"arn:aws:iam::{account}:role/")
    for key in ("auth_role_arn", "pre_sign_up_role_arn"):
        assert output[key].startswith(f"arn:aws:iam::{account}:role/"), key
    assert output["attach_function_arn"] == stack.get_att("AttachPolicyFunction", "Arn")
    assert (output["prefix"], output["account_id"]) == (PREFIX, account)
    assert output["secret_arn"].startswith(
        stack.get_att("AppUser", "SecretArn").rsplit("-", 1)[0] + "-")


def test_roles_match_the_template(template, provision, provisioned, clients):
    """provision.py's two Cognito roles trust the same pool and amr as the template's. The
    template gives them no RoleName, so they are found by what they trust; the guest role is the
    one whose ARN provision.py hands out as unauth_role_arn (the basic flow assumes it)."""
    output, account = provisioned
    stack = template_for(template, provision, output, account)
    roles = clients("iam").list_roles()["Roles"]

    def trust(role):
        document = role["AssumeRolePolicyDocument"]
        return json.loads(document) if isinstance(document, str) else document

    by_amr = {}
    for role in roles:
        for statement in trust(role)["Statement"]:
            amr = statement.get("Condition", {}).get("ForAnyValue:StringLike", {}).get(
                "cognito-identity.amazonaws.com:amr")
            if amr:
                by_amr.setdefault(amr, []).append(role)
    assert sorted(by_amr) == ["authenticated", "unauthenticated"]
    for logical_id, amr in (("IAMUnAuthenticatedRole", "unauthenticated"),
                            ("IAMAuthenticatedRole", "authenticated")):
        props = stack.properties(logical_id)
        assert "RoleName" not in props, logical_id
        (role,) = by_amr[amr]
        assert trust(role) == props["AssumeRolePolicyDocument"], logical_id
    assert by_amr["unauthenticated"][0]["Arn"] == output["unauth_role_arn"]


def test_iot_policy_topic_layout_matches_the_template(template, provision, provisioned, clients):
    output, account = provisioned
    stack = template_for(template, provision, output, account)
    template_policy = stack.properties("CognitoIoTPolicy")
    created = clients("iot").get_policy(policyName=output["iot_policy"])
    assert created["policyName"] == template_policy["PolicyName"]
    assert json.loads(created["policyDocument"]) == template_policy["PolicyDocument"]
    assert provision.iot_policy_document(REGION, account, output["identity_pool_id"], CIDRS) == \
        template_policy["PolicyDocument"]


def test_secret_and_user_match_what_the_template_lambda_makes(
        template, provision, provisioned, clients, user_setup, presignup, cfn_responses,
        moto_endpoint, aws_env, monkeypatch):
    output, account = provisioned
    fleet = output["registration_mode"] == "self-register"
    stack = template_for(template, provision, output, account)
    sm, idp = clients("secretsmanager"), clients("cognito-idp")

    # What provision.py made.
    described = sm.describe_secret(SecretId=output["secret_id"])
    provision_tags = [(t["Key"], t["Value"]) for t in described["Tags"]]
    expected_tags = {
        "ClientId": output["client_id"], "UserPoolId": output["user_pool_id"],
        "IdentityPoolId": output["identity_pool_id"], "IoTEndpoint": output["iot_endpoint"],
        "IoTPolicy": output["iot_policy"], "AttachFunction": f"{PREFIX}-attach-policy"}
    if fleet:
        expected_tags["EmailDomain"] = provision.PRE_SIGN_UP_EMAIL_DOMAIN
    assert dict(provision_tags) == expected_tags
    assert stack.get_att("AttachPolicyFunction", "Arn").endswith(":function:" + dict(provision_tags)["AttachFunction"])
    secret = json.loads(sm.get_secret_value(SecretId=output["secret_id"])["SecretString"])
    app_user = stack.properties("AppUser")["UserName"]
    if fleet:
        assert secret == {"registration_code": output["registration_code"]}
        assert not any(u["Username"] == app_user
                       for u in idp.list_users(UserPoolId=output["user_pool_id"])["Users"])
    else:
        assert secret == {output["username"]: output["password"]}
        user = idp.admin_get_user(UserPoolId=output["user_pool_id"], Username=output["username"])
        assert user["UserStatus"] == "CONFIRMED"
        email = {a["Name"]: a["Value"] for a in user["UserAttributes"]}["email"]
        assert email == stack.properties("AppUser")["EmailAddress"]
        # The template's pre-sign-up trigger would approve provision.py's user.
        monkeypatch.setenv("ALLOWED_EMAIL_DOMAIN", provision.PRE_SIGN_UP_EMAIL_DOMAIN)
        presignup.handler({"triggerSource": "PreSignUp_AdminCreateUser", "userName": output["username"],
                           "request": {"userAttributes": {"email": email}}, "response": {}}, None)

    # What the template's Lambda makes for a second stack with the same prefix, same server.
    second_pool = idp.create_user_pool(PoolName=f"{PREFIX}-user-pool")["UserPool"]["Id"]
    stack.refs["CognitoUserPool"] = second_pool
    props = {k: str(v) for k, v in stack.properties("AppUser").items()
             if k not in ("ServiceToken", "ServiceTimeout")}
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    user_setup.handler(cfn_event("Create", props, cfn_responses.url), FakeContext())
    answer = cfn_responses.last()
    assert answer["Status"] == "SUCCESS", answer["Reason"]
    name = answer["PhysicalResourceId"]
    assert name == provision.secret_name(second_pool, PREFIX)
    lambda_tags = [(t["Key"], t["Value"]) for t in sm.describe_secret(SecretId=name)["Tags"]]
    assert [key for key, _ in lambda_tags] == [key for key, _ in provision_tags]
    assert dict(lambda_tags)["EmailDomain" if fleet else "IoTPolicy"] == dict(provision_tags)[
        "EmailDomain" if fleet else "IoTPolicy"]
    lambda_secret = json.loads(sm.get_secret_value(SecretId=name)["SecretString"])
    assert list(lambda_secret) == list(secret)
    if fleet:
        # Same form: a URL-safe random code of the same length, and a new one per stack.
        assert len(lambda_secret["registration_code"]) == len(secret["registration_code"]) >= 43
        assert lambda_secret["registration_code"] != secret["registration_code"]
        assert not any(u["Username"] == app_user for u in idp.list_users(UserPoolId=second_pool)["Users"])
    else:
        lambda_user = idp.admin_get_user(UserPoolId=second_pool, Username=output["username"])
        assert lambda_user["UserStatus"] == user["UserStatus"]
        assert {a["Name"]: a["Value"] for a in lambda_user["UserAttributes"]}["email"] == email


def test_rust_fixture_of_the_stack_outputs_matches_the_template(template):
    """tests/data/describe-stacks.json feeds the Rust config-from-stack tests."""
    sample = cfn.REPO_ROOT / "tests" / "data" / "describe-stacks.json"
    if not sample.exists():
        pytest.skip("no Rust fixture of describe-stacks")
    (described,) = json.loads(sample.read_text())["Stacks"]
    outputs = {o["OutputKey"]: o["OutputValue"] for o in described["Outputs"]}
    assert set(outputs) == set(template["Outputs"])
    prefix = outputs["IoTPolicy"].removesuffix("-iot-policy")
    stack = cfn.Stack(template, {"Prefix": prefix, "AllowedEmailDomain": "example.com",
                                 "DeviceCidrs": "203.0.113.0/24",
                                 "AllowClassicFlow": outputs["ClassicFlow"],
                                 "RegistrationMode": outputs["RegistrationMode"]},
                      region=outputs["Region"], account=outputs["CognitoUnAuthRole"].split(":")[4],
                      refs={"CognitoUserPool": outputs["SecretName"].split("_" + prefix)[0]})
    assert outputs["IoTPolicy"] == stack.output("IoTPolicy")
    # A role ARN of the stack's account: CloudFormation names the role (older templates gave it
    # the fixed name <Prefix>-cognito-unauth-role, as in this fixture).
    assert template["Outputs"]["CognitoUnAuthRole"]["Value"] == {
        "Fn::GetAtt": ["IAMUnAuthenticatedRole", "Arn"]}
    assert re.fullmatch(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@-]{1,64}", outputs["CognitoUnAuthRole"])
    assert outputs["SecretName"] == stack.output("SecretName")
    assert outputs["ClassicFlow"] == stack.output("ClassicFlow")
    assert outputs["AttachFunction"] == stack.output("AttachFunction")
    assert outputs["RegistrationMode"] == stack.output("RegistrationMode")
