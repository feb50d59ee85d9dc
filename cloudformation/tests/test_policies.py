"""Static tests of the template's policies: moto enforces neither IAM conditions nor resource
policies, so each policy is evaluated here (iam.py) for the requests that matter."""
import json
import re

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
    (topics,) = [[r for r in iam.as_list(s["Resource"]) if ":topic/" in r] for s in publish]
    assert topics == [f"arn:aws:iot:{REGION}:{ACCOUNT}:topic/{pool(stack)}/${{{SUB}}}/*"]
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
    # Nothing beyond plain publishing on its topics (Subscribe is asked on topic filters, below).
    for action in ("iot:RetainPublish", "iot:UpdateThingShadow", "iot:GetRetainedMessage"):
        assert iam.evaluate(statements, action, topic(stack, ME, "a"), me) != iam.ALLOW


def topic_filter(stack, *parts):
    return f"arn:aws:iot:{REGION}:{ACCOUNT}:topicfilter/" + "/".join([pool(stack), *parts])


# The downlink: a device subscribes to filters under its own prefix and receives on
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


# AttachPolicy cannot be scoped to a policy or a target, so no device holds it (the stack's
# function attaches the policy).
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


# Every IoT action a device may take is allowed by the role and by the IoT policy (IoT Core
# requires both). The network (DeviceCidrs) is checked in the IoT policy, where AWS documents
# aws:SourceIp for IoT Core; it is not documented for IAM policies that IoT Core evaluates, so the
# role's IoT statement has none (a condition key that is never set would deny everything).
DATA_ACTIONS = ("iot:Connect", "iot:Publish", "iot:Subscribe", "iot:Receive")


def data_plane_documents(stack):
    role = iam.role_statements(stack.properties("IAMAuthenticatedRole"))
    return {"role": role,
            "iot-policy": iam.statements(stack.properties("CognitoIoTPolicy")["PolicyDocument"])}


def granting(statements):
    return [s for s in statements if s["Effect"] == "Allow"
            and any(a in DATA_ACTIONS for a in iam.as_list(s["Action"]))]


def test_the_iot_policy_carries_the_device_network_and_the_role_does_not(stack):
    documents = data_plane_documents(stack)
    (statement,) = granting(documents["iot-policy"])
    assert statement["Condition"] == {"IpAddress": {"aws:SourceIp": CIDRS}}
    (statement,) = granting(documents["role"])
    assert "Condition" not in statement


@pytest.mark.parametrize("ip", OUTSIDE + [None])
def test_no_iot_action_from_outside_the_device_network(stack, ip):
    context = {SUB: ME} if ip is None else {SUB: ME, "aws:SourceIp": ip}
    resources = {"iot:Connect": f"arn:aws:iot:{REGION}:{ACCOUNT}:client/{ME}",
                 "iot:Publish": topic(stack, ME, "a"),
                 "iot:Subscribe": f"arn:aws:iot:{REGION}:{ACCOUNT}:topicfilter/{pool(stack)}/{ME}/a",
                 "iot:Receive": topic(stack, ME, "a")}
    documents = data_plane_documents(stack)
    for action, resource in resources.items():
        # Both must allow: the IoT policy refuses, so IoT Core refuses.
        assert iam.evaluate(documents["iot-policy"], action, resource, context) != iam.ALLOW, action
        assert iam.evaluate(documents["role"], action, resource, context) == iam.ALLOW, action
        inside = dict(context, **{"aws:SourceIp": INSIDE[0]})
        assert iam.evaluate(documents["iot-policy"], action, resource, inside) == iam.ALLOW, action


def test_data_plane_scope_is_the_same_in_the_role_and_the_iot_policy(stack):
    documents = data_plane_documents(stack)
    (role,), (policy,) = granting(documents["role"]), granting(documents["iot-policy"])
    assert sorted(iam.as_list(role["Action"])) == sorted(iam.as_list(policy["Action"])) == sorted(DATA_ACTIONS)
    assert iam.as_list(role["Resource"]) == iam.as_list(policy["Resource"])


def three_statement_iot_policy(stack):
    """The IoT policy as it was, with DeviceCidrs in each of three statements."""
    arn, me = f"arn:aws:iot:{REGION}:{ACCOUNT}", f"${{{SUB}}}"
    network = {"IpAddress": {"aws:SourceIp": CIDRS}}
    return [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{arn}:client/{me}", "Condition": network},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
         "Resource": f"{arn}:topic/{pool(stack)}/{me}/*", "Condition": network},
        {"Effect": "Allow", "Action": "iot:Subscribe",
         "Resource": f"{arn}:topicfilter/{pool(stack)}/{me}/*", "Condition": network},
    ]


# The resource kind IoT Core authorizes each action on (AWS IoT Core's actions reference).
REQUEST_KIND = {"iot:Connect": "client", "iot:Publish": "topic", "iot:Receive": "topic",
                "iot:RetainPublish": "topic", "iot:GetRetainedMessage": "topic",
                "iot:Subscribe": "topicfilter", "iot:UpdateThingShadow": "thing",
                "iot:DeleteThingShadow": "thing"}
KINDS = ("client", "topic", "topicfilter", "thing", "thinggroup", "cert", "rolealias", "policy")


def resource_names(stack):
    return [ME, OTHER, f"{pool(stack)}/{ME}/a", f"{pool(stack)}/{ME}/a/b", f"{pool(stack)}/{ME}",
            f"{pool(stack)}/{OTHER}/a", f"{pool(stack)}/{ME}/#", f"{pool(stack)}/+/a", "#",
            f"filter/{pool(stack)}/{ME}/a", f"{pool(stack)}/{ME}/commands/+",
            "$aws/things/x/shadow/update", f"/{pool(stack)}/{ME}/a"]


def test_one_statement_allows_exactly_what_the_three_did(stack):
    """IoT Core asks each action on its own resource kind (Connect on client/, Publish and Receive
    on topic/, Subscribe on topicfilter/): for every such request one statement with all actions
    and all resources decides as the three statements, one per kind, did."""
    merged = iam.statements(stack.properties("CognitoIoTPolicy")["PolicyDocument"])
    old = three_statement_iot_policy(stack)
    base = f"arn:aws:iot:{REGION}:{ACCOUNT}"
    compared, allowed = 0, []
    for action, kind in REQUEST_KIND.items():
        for name in resource_names(stack):
            for ip in (INSIDE[0], OUTSIDE[0]):
                context = {SUB: ME, "aws:SourceIp": ip}
                resource = f"{base}:{kind}/{name}"
                verdict = iam.evaluate(merged, action, resource, context)
                assert verdict == iam.evaluate(old, action, resource, context), (action, resource, ip)
                compared += 1
                if verdict == iam.ALLOW:
                    allowed.append((action, kind, name, ip))
    assert compared == len(REQUEST_KIND) * len(resource_names(stack)) * 2
    # Only its own client id and what is under its own prefix, only from inside.
    assert allowed
    for action, kind, name, ip in allowed:
        assert ip == INSIDE[0] and action in DATA_ACTIONS, (action, kind, name, ip)
        assert name == ME if kind == "client" else name.startswith(f"{pool(stack)}/{ME}/"), name
    assert {action for action, *_ in allowed} == set(DATA_ACTIONS)
    assert iam.evaluate(merged, "iot:Subscribe", f"{base}:topicfilter/{pool(stack)}/{ME}/#",
                        {SUB: ME, "aws:SourceIp": INSIDE[0]}) == iam.ALLOW


def test_each_resource_of_the_statement_matches_one_kind_only(stack):
    """Why merging is safe: a client/ pattern never matches a topic/ or topicfilter/ ARN and so on,
    so an action can only be allowed on the kind it was allowed on before."""
    (statement,) = iam.statements(stack.properties("CognitoIoTPolicy")["PolicyDocument"])
    base = f"arn:aws:iot:{REGION}:{ACCOUNT}"
    for pattern in statement["Resource"]:
        own = pattern[len(base) + 1:].split("/", 1)[0]
        matched = {kind for kind in KINDS for name in resource_names(stack)
                   if iam.evaluate([dict(statement, Resource=pattern, Condition={})], "iot:Connect",
                                   f"{base}:{kind}/{name}", {SUB: ME}) == iam.ALLOW}
        assert matched == {own}, pattern


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
    assert sorted(found) == ["CognitoIoTPolicy", "IAMAuthenticatedRole", "SecretResourcePolicy"]
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
    # IPv6: at most 8 groups of at most 4 hex digits (at most 43 characters with the prefix).
    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", True), ("::1/128", True), ("fe80::/10", True),
    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", False), ("2001:0db80::/32", False),
    ("0000:0000:0000:0000:0000:0000:0000:00000/128", False), (":::::::::::/64", False),
])
def test_cidr_parameter_pattern(template, value, ok):
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
    assert [s["Action"] for s in star] == ["iot:DescribeEndpoint"]
    # The IoT policy is retained on delete: the function neither lists nor detaches its targets.
    for action in ("iot:DetachPolicy", "iot:ListTargetsForPolicy", "iot:DeletePolicy"):
        assert iam.evaluate(statements, action, "*") != iam.ALLOW
        assert iam.evaluate(statements, action, ME) != iam.ALLOW


# ------------------------------------------------------------------ IoT policy size

# IoT refuses policy documents over 2,048 characters (whitespace not counted). DeviceCidrs is
# written once; the documented maximum holds for the longest CIDR the parameter accepts and the
# longest partition, region, account, identity pool id and Prefix.
IOT_POLICY_LIMIT = 2048
MAX_DEVICE_CIDRS = 31
LONGEST_CIDR = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"  # 43 characters
LONGEST_PARTITION = "aws-us-gov"  # 10 characters
LONGEST_REGION = "us-isof-south-1"  # 15 characters, no region name is longer


def iot_policy_characters(template, cidrs):
    stack = cfn.Stack(template, dict(PARAMETERS, Prefix="p" * 32, DeviceCidrs=",".join(cidrs)),
                      region=LONGEST_REGION, account="999999999999", partition=LONGEST_PARTITION,
                      refs={"CognitoIdentityPool": f"{LONGEST_REGION}:ffffffff-ffff-ffff-ffff-ffffffffffff"})
    document = stack.properties("CognitoIoTPolicy")["PolicyDocument"]
    assert document["Statement"][0]["Condition"]["IpAddress"]["aws:SourceIp"] == list(cidrs)
    return len("".join(json.dumps(document).split()))


def test_the_longest_cidr_is_the_longest_the_parameter_accepts(template):
    pattern = template["Parameters"]["DeviceCidrs"]["AllowedPattern"]
    assert re.fullmatch(pattern, LONGEST_CIDR)
    assert len(LONGEST_CIDR) == 43
    for longer in ("f" + LONGEST_CIDR, LONGEST_CIDR.replace(":", "::", 1), "255.255.255.255/320"):
        assert not re.fullmatch(pattern, longer), longer


def test_the_maximum_number_of_device_networks_fits_the_iot_policy_limit(template):
    at_max = iot_policy_characters(template, [LONGEST_CIDR] * MAX_DEVICE_CIDRS)
    one_more = iot_policy_characters(template, [LONGEST_CIDR] * (MAX_DEVICE_CIDRS + 1))
    print(f"IoT policy at {MAX_DEVICE_CIDRS} CIDRs: {at_max} characters; at {MAX_DEVICE_CIDRS + 1}: {one_more}")
    assert at_max <= IOT_POLICY_LIMIT < one_more
    # The documented maximum is the one computed here.
    description = " ".join(template["Parameters"]["DeviceCidrs"]["Description"].split())
    assert f"At most {MAX_DEVICE_CIDRS} " in description
    readme = " ".join((cfn.CLOUDFORMATION_DIR / "README.md").read_text().split())
    assert f"at most {MAX_DEVICE_CIDRS} networks" in readme


def test_ipv4_networks_count_no_more_than_ipv6_ones(template):
    mixed = ["255.255.255.255/32", LONGEST_CIDR] * (MAX_DEVICE_CIDRS // 2) + ["10.0.0.0/8"]
    assert len(mixed) == MAX_DEVICE_CIDRS
    assert iot_policy_characters(template, mixed) <= IOT_POLICY_LIMIT
