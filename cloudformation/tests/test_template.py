"""Template-wide rules of issue 8 that neither cfn-lint nor checkov states."""
import re

import botocore.session
from botocore import xform_name
import pytest

import cfn
import iam
from helpers import PARAMETERS

SPEC_OUTPUTS = {"CognitoIdentityPoolID", "CognitoUnAuthRole", "SecretName", "Region", "IoTEndpoint",
                "IoTPolicy"}


def resources_of(template, kind):
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def test_outputs_are_the_ones_config_from_stack_reads(template, stack):
    assert set(template["Outputs"]) == SPEC_OUTPUTS
    assert stack.output("CognitoIdentityPoolID") == stack.ref("CognitoIdentityPool")
    assert stack.output("CognitoUnAuthRole") == stack.get_att("IAMUnAuthenticatedRole", "Arn")
    assert stack.output("SecretName") == stack.get_att("AppUser", "SecretName")
    assert stack.output("Region") == "us-east-1"
    assert stack.output("IoTEndpoint") == stack.get_att("AppUser", "IoTEndpoint")
    assert stack.output("IoTPolicy") == "relay-test-iot-policy"


@pytest.mark.parametrize("name", ["PreSignUpFunction", "UserSetupFunction"])
def test_functions_use_a_supported_python(template, name):
    runtime = template["Resources"][name]["Properties"]["Runtime"]
    match = re.fullmatch(r"python3\.(\d+)", runtime)
    assert match and int(match.group(1)) >= 12, runtime


def test_every_function_logs_to_a_group_with_retention(template, stack):
    functions = resources_of(template, "AWS::Lambda::Function")
    groups = resources_of(template, "AWS::Logs::LogGroup")
    assert len(functions) == len(groups) == 2
    for name, function in functions.items():
        target = function["Properties"]["LoggingConfig"]["LogGroup"]
        assert set(target) == {"Ref"} and target["Ref"] in groups, name
        group = stack.properties(target["Ref"])
        assert group["RetentionInDays"] == stack.parameters["LogRetentionInDays"]
        # The name Lambda would pick by itself, so no second, unmanaged group appears.
        assert group["LogGroupName"] == "/aws/lambda/" + stack.properties(name)["FunctionName"]


def test_custom_resource_times_out_long_before_an_hour(template):
    custom = template["Resources"]["AppUser"]["Properties"]
    function = template["Resources"]["UserSetupFunction"]["Properties"]
    assert 0 < custom["ServiceTimeout"] <= 600
    # The function answers 10 s before its own timeout, which ends before CloudFormation's.
    assert 30 <= function["Timeout"] < custom["ServiceTimeout"]


def test_custom_resource_runs_after_cognito_may_invoke_the_trigger(template):
    assert template["Resources"]["AppUser"]["DependsOn"] == "PreSignUpInvokePermission"


def test_secret_is_encrypted_with_the_parameterised_key(template, stack):
    parameter = template["Parameters"]["SecretKmsKey"]
    assert parameter["Default"] == "alias/aws/secretsmanager"
    assert template["Resources"]["AppUser"]["Properties"]["KmsKeyId"] == {"Ref": "SecretKmsKey"}
    custom = cfn.Stack(template, dict(PARAMETERS, SecretKmsKey="arn:aws:kms:us-east-1:123456789012:key/k"))
    assert not stack.condition("UseCustomerManagedKey")
    assert custom.condition("UseCustomerManagedKey")
    pattern = parameter["AllowedPattern"]
    assert re.fullmatch(pattern, "alias/aws/secretsmanager")
    assert re.fullmatch(pattern, "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab")
    assert not re.fullmatch(pattern, "alias/my-key")  # IAM needs the key ARN to grant it


def test_template_fits_a_direct_upload():
    # `aws cloudformation deploy` without an S3 bucket accepts at most 51,200 bytes.
    assert cfn.TEMPLATE_PATH.stat().st_size < 51_200


def test_every_checkov_skip_has_a_written_reason(template):
    skips = [(name, skip) for name, r in template["Resources"].items()
             for skip in r.get("Metadata", {}).get("checkov", {}).get("skip", [])]
    assert skips
    for name, skip in skips:
        assert re.fullmatch(r"CKV2?_AWS_\d+", skip["id"]), name
        assert len(skip.get("comment", "")) >= 30, f"{name}: {skip['id']} needs a reason"


def test_no_iam_policy_uses_wildcard_actions_or_negations(template):
    def check(statement):
        if "Fn::If" in statement:  # a conditional statement: check both branches
            for branch in statement["Fn::If"][1:]:
                if "Ref" not in branch:
                    check(branch)
            return
        assert not {"NotAction", "NotResource", "NotPrincipal"} & set(statement)
        assert all("*" not in action for action in iam.as_list(statement["Action"])), statement

    def walk(node):
        if isinstance(node, dict):
            if "Statement" in node:
                for statement in iam.as_list(node["Statement"]):
                    check(statement)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(template["Resources"])


def test_user_pool_is_admin_only_unless_fleet_mode(template):
    assert template["Parameters"]["AllowSelfSignUp"]["Default"] == "false"
    for value, admin_only in (("false", True), ("true", False)):
        stack = cfn.Stack(template, dict(PARAMETERS, AllowSelfSignUp=value))
        props = stack.properties("CognitoUserPool")
        assert props["AdminCreateUserConfig"]["AllowAdminCreateUserOnly"] is admin_only


def test_user_setup_role_grants_exactly_the_calls_its_code_makes(template, stack):
    """Every AWS call in the inline code is allowed by the role, and nothing else is granted."""
    code = template["Resources"]["UserSetupFunction"]["Properties"]["Code"]["ZipFile"]
    session = botocore.session.get_session()
    receivers = {"idp": "cognito-idp", "sm": "secretsmanager"}  # the code's client variables
    calls = set()
    for service, variable, method in re.findall(r'(?:client\("([a-z-]+)"\)|\b(idp|sm))\.(\w+)\(', code):
        service = service or receivers[variable]
        operations = {xform_name(op): op
                      for op in session.get_service_model(service).operation_names}
        assert method in operations, f"{service} has no {method}"
        calls.add(f"{service}:{operations[method]}")
    assert calls == {"cognito-idp:AdminCreateUser", "cognito-idp:AdminSetUserPassword",
                     "cognito-idp:AdminDeleteUser", "secretsmanager:CreateSecret",
                     "secretsmanager:TagResource", "secretsmanager:UpdateSecret",
                     "secretsmanager:DeleteSecret", "iot:DescribeEndpoint"}
    statements = iam.role_statements(stack.properties("UserSetupFunctionRole"))
    granted = iam.allowed_actions(statements) - {"logs:CreateLogStream", "logs:PutLogEvents"}
    assert granted == calls
