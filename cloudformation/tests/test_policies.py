"""Static tests of the template's policies: moto enforces neither IAM conditions nor resource
policies, so each policy is evaluated here (iam.py) for the requests that matter."""
import pytest

import cfn
import iam
from helpers import CIDRS, PARAMETERS

ACCOUNT, REGION = "123456789012", "us-east-1"
USER_POOL = "us-east-1_AbCdEfGhI"
SUB = "cognito-identity.amazonaws.com:sub"
ME, OTHER = "us-east-1:0a0a0a0a-1111-2222-3333-444444444444", "us-east-1:0b0b0b0b-5555-6666-7777-888888888888"
INSIDE = ["203.0.113.1", "203.0.113.254", "198.51.100.7", "2001:db8::1", "2001:db8:ffff::42"]
OUTSIDE = ["203.0.114.1", "198.51.100.8", "198.51.100.6", "10.0.0.1", "127.0.0.1", "8.8.8.8",
           "2001:db9::1", "::1"]


@pytest.fixture(params=[False, True], ids=["aws-managed-key", "customer-key"])
def stack(request, template):
    parameters = dict(PARAMETERS)
    if request.param:
        parameters["SecretKmsKey"] = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    return cfn.Stack(template, parameters, region=REGION, account=ACCOUNT,
                     refs={"CognitoUserPool": USER_POOL})


def pool(stack):
    return stack.ref("CognitoIdentityPool")


def topic(stack, *parts, pool_id=None):
    return f"arn:aws:iot:{REGION}:{ACCOUNT}:topic/" + "/".join([pool_id or pool(stack), *parts])


def secret_arn(stack):
    return stack.get_att("AppUser", "SecretArn")


def trust_condition(role):
    (statement,) = iam.statements(role["AssumeRolePolicyDocument"])
    assert statement["Effect"] == "Allow"
    assert statement["Principal"] == {"Federated": "cognito-identity.amazonaws.com"}
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    return statement["Condition"]


# ------------------------------------------------------------------ unauthenticated role

def test_unauth_role_trusts_only_guests_of_this_pool(stack):
    condition = trust_condition(stack.properties("IAMUnAuthenticatedRole"))
    assert condition == {
        "StringEquals": {"cognito-identity.amazonaws.com:aud": pool(stack)},
        "ForAnyValue:StringLike": {"cognito-identity.amazonaws.com:amr": "unauthenticated"},
    }


def test_unauth_role_can_read_only_the_one_secret(stack):
    statements = iam.role_statements(stack.properties("IAMUnAuthenticatedRole"))
    expected = {"secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"}
    if stack.condition("UseCustomerManagedKey"):
        expected.add("kms:Decrypt")
    assert iam.allowed_actions(statements) == expected
    arn = secret_arn(stack)
    for action in ("secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"):
        assert iam.evaluate(statements, action, arn) == iam.ALLOW
        for other in (arn[:-6] + "XyZ987", arn.rsplit(":", 1)[0] + ":other-secret-AbC123", "*",
                      arn.replace(REGION, "eu-west-1")):
            assert iam.evaluate(statements, action, other) != iam.ALLOW, other
    for action in ("secretsmanager:ListSecrets", "secretsmanager:PutSecretValue",
                   "iot:AttachPolicy", "iot:Connect", "iot:Publish", "cognito-identity:GetId",
                   "cognito-sync:ListRecords", "sts:AssumeRole"):
        assert iam.evaluate(statements, action, "*") != iam.ALLOW
    # Scoped by resource, not by wildcard.
    assert all("*" not in str(s["Resource"]) for s in statements if s["Action"] != "kms:Decrypt")


def test_unauth_role_decrypts_only_through_secrets_manager_for_that_secret(stack):
    statements = iam.role_statements(stack.properties("IAMUnAuthenticatedRole"))
    key = stack.parameters["SecretKmsKey"]
    via = {"kms:ViaService": f"secretsmanager.{REGION}.amazonaws.com",
           "kms:EncryptionContext:SecretARN": secret_arn(stack)}
    expected = iam.ALLOW if stack.condition("UseCustomerManagedKey") else iam.IMPLICIT_DENY
    assert iam.evaluate(statements, "kms:Decrypt", key, via) == expected
    assert iam.evaluate(statements, "kms:Decrypt", key, {}) != iam.ALLOW
    other_secret = dict(via, **{"kms:EncryptionContext:SecretARN": secret_arn(stack) + "x"})
    assert iam.evaluate(statements, "kms:Decrypt", key, other_secret) != iam.ALLOW


# ------------------------------------------------------------------ authenticated role

def test_auth_role_trusts_only_signed_in_identities_of_this_pool(stack):
    condition = trust_condition(stack.properties("IAMAuthenticatedRole"))
    assert condition == {
        "StringEquals": {"cognito-identity.amazonaws.com:aud": pool(stack)},
        "ForAnyValue:StringLike": {"cognito-identity.amazonaws.com:amr": "authenticated"},
    }


def test_auth_role_holds_only_what_the_onboarding_chain_uses(stack):
    statements = iam.role_statements(stack.properties("IAMAuthenticatedRole"))
    assert iam.allowed_actions(statements) == {"lambda:InvokeFunction", "iot:Connect", "iot:Publish",
                                               "iot:Receive", "iot:Subscribe"}
    assert all("*" not in action for s in statements for action in iam.as_list(s["Action"]))


def test_auth_role_publishes_only_under_its_own_prefix(stack):
    statements = iam.role_statements(stack.properties("IAMAuthenticatedRole"))
    publish = [s for s in statements
               if s["Effect"] == "Allow" and "iot:Publish" in iam.as_list(s["Action"])]
    assert [s["Resource"] for s in publish] == [
        f"arn:aws:iot:{REGION}:{ACCOUNT}:topic/{pool(stack)}/${{{SUB}}}/*"]
    me = {SUB: ME, "aws:SourceIp": INSIDE[0]}
    assert iam.evaluate(statements, "iot:Publish", topic(stack, ME, "sensors", "temp"), me) == iam.ALLOW
    for denied in (topic(stack, OTHER, "sensors", "temp"),
                   topic(stack, ME),
                   topic(stack, ME + "x", "a"),
                   topic(stack, ME, "a", pool_id="us-east-1:ffffffff-0000-0000-0000-000000000000"),
                   f"arn:aws:iot:{REGION}:{ACCOUNT}:topic/$aws/things/x/shadow/update",
                   f"arn:aws:iot:eu-west-1:{ACCOUNT}:topic/{pool(stack)}/{ME}/a"):
        assert iam.evaluate(statements, "iot:Publish", denied, me) != iam.ALLOW, denied
    # Without a Cognito identity the variable is unset and nothing matches.
    assert iam.evaluate(statements, "iot:Publish", topic(stack, ME, "a"),
                        {"aws:SourceIp": INSIDE[0]}) != iam.ALLOW
    # Subscribe is for topic filters (below), never for topic resources.
    for action in ("iot:Subscribe", "iot:RetainPublish", "iot:UpdateThingShadow"):
        assert iam.evaluate(statements, action, topic(stack, ME, "a"), me) != iam.ALLOW


def topic_filter(stack, *parts):
    return f"arn:aws:iot:{REGION}:{ACCOUNT}:topicfilter/" + "/".join([pool(stack), *parts])


# Issue 15: the downlink. A device subscribes to filters under its own prefix and receives on
# its own topics, in the role and in the IoT policy alike; nothing wider.
@pytest.mark.parametrize("where", ["role", "iot-policy"])
def test_a_device_subscribes_and_receives_only_under_its_own_prefix(stack, where):
    statements = data_plane_documents(stack)[where]
    me = {SUB: ME, "aws:SourceIp": INSIDE[0]}
    for allowed in (topic_filter(stack, ME, "commands", "#"), topic_filter(stack, ME, "config", "+"),
                    topic_filter(stack, ME, "a")):
        assert iam.evaluate(statements, "iot:Subscribe", allowed, me) == iam.ALLOW, allowed
    for denied in (topic_filter(stack, OTHER, "commands", "#"), topic_filter(stack, "#"),
                   topic_filter(stack, "+", "commands"), topic_filter(stack, ME),
                   f"arn:aws:iot:{REGION}:{ACCOUNT}:topicfilter/#",
                   f"arn:aws:iot:{REGION}:{ACCOUNT}:topicfilter/$aws/things/x/jobs/#"):
        assert iam.evaluate(statements, "iot:Subscribe", denied, me) != iam.ALLOW, denied
    assert iam.evaluate(statements, "iot:Receive", topic(stack, ME, "commands", "reboot"), me) == iam.ALLOW
    for denied in (topic(stack, OTHER, "commands", "reboot"), topic(stack, ME),
                   f"arn:aws:iot:{REGION}:{ACCOUNT}:topic/$aws/things/x/shadow/update/accepted"):
        assert iam.evaluate(statements, "iot:Receive", denied, me) != iam.ALLOW, denied


def test_auth_role_connects_only_as_its_own_identity(stack):
    statements = iam.role_statements(stack.properties("IAMAuthenticatedRole"))
    client = f"arn:aws:iot:{REGION}:{ACCOUNT}:client/"
    me = {SUB: ME, "aws:SourceIp": INSIDE[0]}
    assert iam.evaluate(statements, "iot:Connect", client + ME, me) == iam.ALLOW
    assert iam.evaluate(statements, "iot:Connect", client + OTHER, me) != iam.ALLOW
    assert iam.evaluate(statements, "iot:Connect", client + "any", me) != iam.ALLOW


# Issue 14, point 2: AttachPolicy cannot be scoped to a policy or a target, so no device holds it.
@pytest.mark.parametrize("role", ["IAMAuthenticatedRole", "IAMUnAuthenticatedRole"])
def test_no_device_role_holds_iot_attach_policy(stack, role):
    statements = iam.role_statements(stack.properties(role))
    assert "iot:AttachPolicy" not in iam.allowed_actions(statements)
    for ip in INSIDE[:1] + OUTSIDE[:1]:
        for target in ("*", OTHER, f"arn:aws:iot:{REGION}:{ACCOUNT}:cert/abcdef0123456789"):
            context = {SUB: ME, "aws:SourceIp": ip}
            assert iam.evaluate(statements, "iot:AttachPolicy", target, context) != iam.ALLOW


def test_auth_role_may_only_invoke_the_attach_function_from_the_device_network(stack):
    statements = iam.role_statements(stack.properties("IAMAuthenticatedRole"))
    function = stack.get_att("AttachPolicyFunction", "Arn")
    assert function.endswith(":function:relay-test-attach-policy")
    for ip in INSIDE:
        assert iam.evaluate(statements, "lambda:InvokeFunction", function,
                            {SUB: ME, "aws:SourceIp": ip}) == iam.ALLOW
    for ip in OUTSIDE:
        assert iam.evaluate(statements, "lambda:InvokeFunction", function,
                            {SUB: ME, "aws:SourceIp": ip}) != iam.ALLOW
    inside = {SUB: ME, "aws:SourceIp": INSIDE[0]}
    for other in (stack.get_att("UserSetupFunction", "Arn"), stack.get_att("PreSignUpFunction", "Arn"),
                  function + "-other", function.replace(REGION, "eu-west-1"), "*"):
        assert iam.evaluate(statements, "lambda:InvokeFunction", other, inside) != iam.ALLOW


def test_the_attach_function_role_attaches_but_never_to_certificates_or_thing_groups(stack):
    statements = iam.role_statements(stack.properties("AttachPolicyFunctionRole"))
    assert iam.allowed_actions(statements) == {"iot:AttachPolicy", "logs:CreateLogStream",
                                               "logs:PutLogEvents"}
    assert iam.evaluate(statements, "iot:AttachPolicy", ME) == iam.ALLOW
    for target in (f"arn:aws:iot:{REGION}:{ACCOUNT}:cert/abcdef0123456789",
                   f"arn:aws:iot:eu-west-1:{ACCOUNT}:cert/abcdef",
                   f"arn:aws:iot:{REGION}:{ACCOUNT}:thinggroup/all-devices"):
        assert iam.evaluate(statements, "iot:AttachPolicy", target) == iam.DENY
    # The function is told which policy and pool: the stack's own.
    variables = stack.properties("AttachPolicyFunction")["Environment"]["Variables"]
    assert variables == {"IDENTITY_POOL_ID": pool(stack),
                         "USER_POOL_PROVIDER": stack.get_att("CognitoUserPool", "ProviderName"),
                         "IOT_POLICY": stack.ref("CognitoIoTPolicy")}


# Issue 14, point 1: every IoT action a device may take, in the role and in the IoT policy, is
# bound to DeviceCidrs.
DATA_ACTIONS = ("iot:Connect", "iot:Publish", "iot:Subscribe", "iot:Receive")


def data_plane_documents(stack):
    role = iam.role_statements(stack.properties("IAMAuthenticatedRole"))
    return {"role": role,
            "iot-policy": iam.statements(stack.properties("CognitoIoTPolicy")["PolicyDocument"])}


def test_every_iot_action_carries_the_device_network(stack):
    for where, statements in data_plane_documents(stack).items():
        granted = [s for s in statements if s["Effect"] == "Allow"
                   and any(a in DATA_ACTIONS for a in iam.as_list(s["Action"]))]
        assert granted, where
        for statement in granted:
            assert statement.get("Condition") == {"IpAddress": {"aws:SourceIp": CIDRS}}, (where, statement)


@pytest.mark.parametrize("ip", OUTSIDE + [None])
def test_no_iot_action_from_outside_the_device_network(stack, ip):
    context = {SUB: ME} if ip is None else {SUB: ME, "aws:SourceIp": ip}
    resources = {"iot:Connect": f"arn:aws:iot:{REGION}:{ACCOUNT}:client/{ME}",
                 "iot:Publish": topic(stack, ME, "a"),
                 "iot:Subscribe": f"arn:aws:iot:{REGION}:{ACCOUNT}:topicfilter/{pool(stack)}/{ME}/a",
                 "iot:Receive": topic(stack, ME, "a")}
    for where, statements in data_plane_documents(stack).items():
        for action, resource in resources.items():
            assert iam.evaluate(statements, action, resource, context) != iam.ALLOW, (where, action)
        inside = dict(context, **{"aws:SourceIp": INSIDE[0]})
        assert iam.evaluate(statements, "iot:Publish", resources["iot:Publish"], inside) == iam.ALLOW


def test_data_plane_scope_is_the_same_in_the_role_and_the_iot_policy(stack):
    role = [s for s in iam.role_statements(stack.properties("IAMAuthenticatedRole"))
            if s["Effect"] == "Allow" and set(iam.as_list(s["Action"])) <= set(DATA_ACTIONS)]
    document = stack.properties("CognitoIoTPolicy")["PolicyDocument"]

    def scope(statements):
        return sorted((tuple(iam.as_list(s["Action"])), s["Resource"], repr(s.get("Condition")))
                      for s in statements)

    assert scope(role) == scope(iam.statements(document))


# ------------------------------------------------------------------ IoT policy

def test_iot_policy_confines_each_identity_to_its_topics(stack):
    document = stack.properties("CognitoIoTPolicy")["PolicyDocument"]
    statements = iam.statements(document)
    assert all(s["Effect"] == "Allow" for s in statements)
    assert iam.allowed_actions(statements) == {"iot:Connect", "iot:Publish", "iot:Receive",
                                               "iot:Subscribe"}
    me = {SUB: ME, "aws:SourceIp": INSIDE[0]}
    assert iam.evaluate(statements, "iot:Publish", topic(stack, ME, "a", "b"), me) == iam.ALLOW
    assert iam.evaluate(statements, "iot:Publish", topic(stack, OTHER, "a"), me) != iam.ALLOW
    client = f"arn:aws:iot:{REGION}:{ACCOUNT}:client/"
    assert iam.evaluate(statements, "iot:Connect", client + ME, me) == iam.ALLOW
    assert iam.evaluate(statements, "iot:Connect", client + OTHER, me) != iam.ALLOW


# ------------------------------------------------------------------ the secret's resource policy

def secret_policy(stack):
    props = stack.properties("SecretResourcePolicy")
    assert props["SecretId"] == secret_arn(stack)
    assert props["BlockPublicPolicy"] is True
    return iam.statements(props["ResourcePolicy"])


@pytest.mark.parametrize("ip", OUTSIDE)
def test_secret_policy_denies_every_address_outside_the_cidrs(stack, ip):
    statements = secret_policy(stack)
    for action in ("secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"):
        assert iam.evaluate(statements, action, secret_arn(stack), {"aws:SourceIp": ip}) == iam.DENY


@pytest.mark.parametrize("ip", INSIDE)
def test_secret_policy_lets_the_device_network_through(stack, ip):
    statements = secret_policy(stack)
    for action in ("secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"):
        assert iam.evaluate(statements, action, secret_arn(stack), {"aws:SourceIp": ip}) != iam.DENY


def test_secret_policy_denies_requests_without_a_source_address(stack):
    # Through a VPC endpoint or another AWS service there is no aws:SourceIp: still denied.
    statements = secret_policy(stack)
    assert iam.evaluate(statements, "secretsmanager:GetSecretValue", secret_arn(stack), {}) == iam.DENY


def test_secret_policy_applies_to_everyone(stack):
    (statement,) = secret_policy(stack)
    assert statement["Effect"] == "Deny"
    assert statement["Principal"] == {"AWS": "*"}
    assert statement["Resource"] == "*"


def test_the_cidrs_come_from_the_one_parameter(template):
    # Every use refers to DeviceCidrs itself, so they cannot disagree.
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            if "aws:SourceIp" in node:
                found.append(where)
                assert node["aws:SourceIp"] == {"Ref": "DeviceCidrs"}, where
            for key, value in node.items():
                walk(value, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for name, resource in template["Resources"].items():
        walk(resource, name)
    assert sorted(found) == ["CognitoIoTPolicy"] * 3 + ["IAMAuthenticatedRole"] * 4 + [
        "SecretResourcePolicy"]
    ipset = template["Resources"]["UserPoolDeviceNetwork"]["Properties"]
    assert ipset["Addresses"] == {"Ref": "DeviceCidrs"}


@pytest.mark.parametrize("value,ok", [
    ("203.0.113.0/24", True), ("198.51.100.7/32", True), ("0.0.0.0/0", True),
    ("2001:db8::/32", True), ("::/0", True), ("2001:DB8:0:0:0:0:0:1/128", True),
    ("10.0.0.0/1", True), ("2001:db8::/1", True),
    # "Any network" only in its canonical spelling, which the template's rule then checks.
    ("10.0.0.0/0", False), ("203.0.113.7/0", False), ("2001:db8::/0", False), ("::1/0", False),
    ("203.0.113.0", False), ("203.0.113.0/33", False), ("256.0.0.0/8", False),
    ("203.0.113/24", False), (" 203.0.113.0/24", False), ("example.com/24", False),
    ("2001:db8::/129", False), ("", False),
])
def test_cidr_parameter_pattern(template, value, ok):
    import re
    pattern = template["Parameters"]["DeviceCidrs"]["AllowedPattern"]
    assert (re.fullmatch(pattern, value) is not None) is ok


# ------------------------------------------------------------------ the Lambda roles

def test_presignup_role_writes_its_logs_and_reads_only_the_registration_code(stack):
    statements = iam.role_statements(stack.properties("PreSignUpFunctionRole"))
    expected = {"logs:CreateLogStream", "logs:PutLogEvents", "secretsmanager:GetSecretValue"}
    if stack.condition("UseCustomerManagedKey"):
        expected.add("kms:Decrypt")
    assert iam.allowed_actions(statements) == expected
    logs = stack.get_att("PreSignUpLogGroup", "Arn")
    assert iam.evaluate(statements, "logs:PutLogEvents", logs) == iam.ALLOW
    arn = secret_arn(stack)
    assert iam.evaluate(statements, "secretsmanager:GetSecretValue", arn) == iam.ALLOW
    prefix = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:"
    for other in (prefix + "us-east-1_AbCdEfGhI_other-app-user-AbC123",  # another stack's
                  prefix + "us-east-1_AbCdEfGhI_relay-test-app-user-AbC123-x",
                  prefix + "prod/database-AbC123", prefix.replace(REGION, "eu-west-1")
                  + "eu-west-1_AbCdEfGhI_relay-test-app-user-AbC123"):
        assert iam.evaluate(statements, "secretsmanager:GetSecretValue", other) != iam.ALLOW, other
    for action in ("secretsmanager:DescribeSecret", "secretsmanager:PutSecretValue",
                   "cognito-idp:AdminConfirmSignUp"):
        assert iam.evaluate(statements, action, arn) != iam.ALLOW
    if stack.condition("UseCustomerManagedKey"):
        key = stack.parameters["SecretKmsKey"]
        via = {"kms:ViaService": f"secretsmanager.{REGION}.amazonaws.com",
               "kms:EncryptionContext:SecretARN": arn}
        assert iam.evaluate(statements, "kms:Decrypt", key, via) == iam.ALLOW
        assert iam.evaluate(statements, "kms:Decrypt", key, {}) != iam.ALLOW


def test_secret_policy_lets_only_the_presignup_function_read_from_anywhere(stack):
    statements = secret_policy(stack)
    role = stack.get_att("PreSignUpFunctionRole", "Arn")
    for principal in (role, stack.get_att("IAMUnAuthenticatedRole", "Arn"),
                      f"arn:aws:iam::{ACCOUNT}:role/admin", role + "-copy"):
        for context in ({"aws:SourceIp": "8.8.8.8"}, {}):
            verdict = iam.evaluate(statements, "secretsmanager:GetSecretValue", secret_arn(stack),
                                   dict(context, **{"aws:PrincipalArn": principal}))
            assert (verdict != iam.DENY) is (principal == role), (principal, context)


def test_user_setup_role_is_scoped_to_the_pool_and_the_one_secret(stack):
    statements = iam.role_statements(stack.properties("UserSetupFunctionRole"))
    pool_arn = stack.get_att("CognitoUserPool", "Arn")
    arn = secret_arn(stack)
    for action in ("cognito-idp:AdminCreateUser", "cognito-idp:AdminSetUserPassword",
                   "cognito-idp:AdminDeleteUser"):
        assert iam.evaluate(statements, action, pool_arn) == iam.ALLOW
        assert iam.evaluate(statements, action, pool_arn[:-1] + "X") != iam.ALLOW
    for action in ("secretsmanager:CreateSecret", "secretsmanager:TagResource",
                   "secretsmanager:UpdateSecret", "secretsmanager:DeleteSecret"):
        assert iam.evaluate(statements, action, arn) == iam.ALLOW
        assert iam.evaluate(statements, action, arn.replace("_relay-test-app-user", "_other")) != iam.ALLOW
        assert iam.evaluate(statements, action, arn + "-more") != iam.ALLOW
    for action in ("secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret",
                   "cognito-idp:AdminGetUser", "iam:PassRole", "cognito-idp:SignUp"):
        assert iam.evaluate(statements, action, "*") != iam.ALLOW
        assert iam.evaluate(statements, action, arn) != iam.ALLOW
    star = [s for s in statements if s["Resource"] == "*"]
    assert [s["Action"] for s in star] == ["iot:DescribeEndpoint", "iot:DetachPolicy"]
    policy_arn = f"arn:aws:iot:{REGION}:{ACCOUNT}:policy/relay-test-iot-policy"
    assert iam.evaluate(statements, "iot:ListTargetsForPolicy", policy_arn) == iam.ALLOW
    assert iam.evaluate(statements, "iot:ListTargetsForPolicy", policy_arn + "2") != iam.ALLOW
    assert iam.evaluate(statements, "iot:DetachPolicy", ME) == iam.ALLOW
    assert iam.evaluate(statements, "iot:DetachPolicy",
                        f"arn:aws:iot:{REGION}:{ACCOUNT}:cert/abcdef") == iam.DENY
