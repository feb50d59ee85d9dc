"""Template-wide rules that neither cfn-lint nor checkov states."""
import json
import re

import botocore.session
from botocore import xform_name
import pytest

import cfn
import iam
from helpers import FLEET_PARAMETERS, PARAMETERS

SPEC_OUTPUTS = {"CognitoIdentityPoolID", "CognitoUnAuthRole", "SecretName", "Region", "IoTEndpoint",
                "IoTPolicy", "ClassicFlow", "AttachFunction", "RegistrationMode"}


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
    assert stack.output("ClassicFlow") == "true"  # config-from-stack then writes unauth_role_arn
    assert stack.output("AttachFunction") == stack.get_att("AttachPolicyFunction", "Arn")
    assert stack.output("RegistrationMode") == "shared-user"
    assert cfn.Stack(template, FLEET_PARAMETERS).output("RegistrationMode") == "self-register"


@pytest.mark.parametrize("name", ["PreSignUpFunction", "UserSetupFunction", "AttachPolicyFunction"])
def test_functions_use_a_supported_python(template, name):
    runtime = template["Resources"][name]["Properties"]["Runtime"]
    match = re.fullmatch(r"python3\.(\d+)", runtime)
    assert match and int(match.group(1)) >= 12, runtime


def test_every_function_logs_to_a_group_with_retention(template, stack):
    functions = resources_of(template, "AWS::Lambda::Function")
    groups = resources_of(template, "AWS::Logs::LogGroup")
    assert len(functions) == len(groups) == 3
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
    assert cfn.TEMPLATE_PATH.stat().st_size <= 51_200


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
            if "Statement" in node and "Version" in node:  # an IAM policy, not a WAF rule
                for statement in iam.as_list(node["Statement"]):
                    check(statement)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(template["Resources"])


def test_user_pool_is_admin_only_unless_fleet_mode(template):
    assert template["Parameters"]["RegistrationMode"]["Default"] == "self-register"
    assert template["Parameters"]["RegistrationMode"]["AllowedValues"] == ["self-register", "shared-user"]
    for value, admin_only in (("shared-user", True), ("self-register", False)):
        stack = cfn.Stack(template, dict(PARAMETERS, RegistrationMode=value))
        props = stack.properties("CognitoUserPool")
        assert props["AdminCreateUserConfig"]["AllowAdminCreateUserOnly"] is admin_only


def test_user_setup_role_grants_exactly_the_calls_its_code_makes(template, stack):
    """Every AWS call in the inline code is allowed by the role, and nothing else is granted."""
    code = template["Resources"]["UserSetupFunction"]["Properties"]["Code"]["ZipFile"]
    session = botocore.session.get_session()
    receivers = {"idp": "cognito-idp", "sm": "secretsmanager", "iot": "iot"}  # client variables
    calls = set()
    for service, variable, method in re.findall(r'(?:client\("([a-z-]+)"\)|\b(idp|sm|iot))\.(\w+)\(', code):
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


def test_attach_function_role_grants_exactly_the_calls_its_code_makes(template, stack):
    code = template["Resources"]["AttachPolicyFunction"]["Properties"]["Code"]["ZipFile"]
    signed = set(re.findall(r'boto3\.client\("([a-z-]+)", config=BOTO\)\.(\w+)\(', code))
    assert signed == {("iot", "attach_policy")}
    # GetId is a public API: called unsigned, so it needs (and gets) no IAM permission.
    assert 'boto3.client("cognito-identity", config=BOTO.merge(Config(signature_version=UNSIGNED)))' in code
    statements = iam.role_statements(stack.properties("AttachPolicyFunctionRole"))
    assert iam.allowed_actions(statements) - {"logs:CreateLogStream", "logs:PutLogEvents"} == {
        "iot:AttachPolicy"}


# ------------------------------------------------------------------ safe updates

@pytest.mark.parametrize("name", ["CognitoUserPool", "CognitoIdentityPool"])
def test_pools_are_retained_on_delete_and_replacement(template, name):
    resource = template["Resources"][name]
    assert resource["DeletionPolicy"] == "Retain"
    assert resource["UpdateReplacePolicy"] == "Retain"


def test_user_pool_deletion_protection_is_on(stack):
    assert stack.properties("CognitoUserPool")["DeletionProtection"] == "ACTIVE"


def test_stack_policy_refuses_replacing_or_deleting_the_pools():
    policy = json.loads((cfn.CLOUDFORMATION_DIR / "stack-policy.json").read_text())
    denies = [s for s in policy["Statement"] if s["Effect"] == "Deny"]
    assert len(denies) == 1
    assert set(denies[0]["Action"]) == {"Update:Replace", "Update:Delete"}
    assert set(denies[0]["Resource"]) == {"LogicalResourceId/CognitoUserPool",
                                          "LogicalResourceId/CognitoIdentityPool"}
    assert denies[0]["Principal"] == "*"
    # Everything else stays updatable.
    allows = [s for s in policy["Statement"] if s["Effect"] == "Allow"]
    assert [(s["Action"], s["Resource"]) for s in allows] == [("Update:*", "*")]


def test_custom_resource_function_is_never_retried(template, stack):
    configs = resources_of(template, "AWS::Lambda::EventInvokeConfig")
    assert list(configs) == ["UserSetupInvokeConfig"]
    props = stack.properties("UserSetupInvokeConfig")
    assert props["MaximumRetryAttempts"] == 0
    assert props["Qualifier"] == "$LATEST"
    assert template["Resources"]["UserSetupInvokeConfig"]["Properties"]["FunctionName"] == {
        "Ref": "UserSetupFunction"}


def test_guests_get_a_role_only_after_the_secret_is_network_restricted(template):
    assert template["Resources"]["CognitoIdentityPoolRoleAttachment"]["DependsOn"] == "SecretResourcePolicy"


def test_custom_resource_tags_the_secret_with_the_policy_and_the_attach_function(template):
    props = template["Resources"]["AppUser"]["Properties"]
    assert props["IoTPolicy"] == {"Ref": "CognitoIoTPolicy"}
    assert props["AttachFunction"] == {"Fn::GetAtt": ["AttachPolicyFunction", "Arn"]}


def test_iot_policy_is_retained_on_delete_and_replacement(template):
    """Deleting needs every attachment detached first (10,000 devices: far more than one Lambda
    run) and IoT can refuse deleting a just-detached policy for minutes. Retained, the stack
    deletes in one go; without the stack's roles the policy grants nothing (IoT Core checks the
    role too); cloudformation/README.md documents its cleanup."""
    policy = template["Resources"]["CognitoIoTPolicy"]
    assert policy["DeletionPolicy"] == "Retain"
    assert policy["UpdateReplacePolicy"] == "Retain"
    # Nothing of the stack detaches or deletes IoT policies any more.
    for name in ("UserSetupFunction", "AttachPolicyFunction"):
        code = template["Resources"][name]["Properties"]["Code"]["ZipFile"]
        assert "detach_policy" not in code and "delete_policy" not in code, name


# ------------------------------------------------------------------ IAM names: one account, many regions

def test_no_iam_role_has_a_fixed_name(template):
    """IAM names are account-wide: a fixed RoleName fails the same Prefix in a second region.
    CloudFormation names the roles <stack>-<logical id>-<random>, at most 64 characters."""
    roles = resources_of(template, "AWS::IAM::Role")
    assert len(roles) == 6
    for name, role in roles.items():
        assert "RoleName" not in role["Properties"], name
        assert "Path" not in role["Properties"], name
    # The 128-character maximum stack name still gives names within IAM's 64.
    stack = cfn.Stack(template, dict(PARAMETERS, Prefix="p" * 32), stack_name="s" * 128)
    for name in roles:
        assert len(stack.ref(name)) <= 64
    assert cfn.Stack(template, PARAMETERS, region="eu-west-1").get_att("IAMAuthenticatedRole", "Arn") \
        .startswith("arn:aws:iam::123456789012:role/test-stack-IAMAuthenticatedRole-")


def test_device_roles_replaced_by_the_renaming_are_kept_for_running_devices(template):
    # The first update from a template with fixed role names replaces the roles. Devices hold
    # credentials of (and, for guests, the ARN of) the old ones: kept until the migration
    # deletes them (docs/operations.md).
    for name in ("IAMUnAuthenticatedRole", "IAMAuthenticatedRole"):
        role = template["Resources"][name]
        assert role["UpdateReplacePolicy"] == "Retain", name
        assert role["DeletionPolicy"] == "Delete", name


# ------------------------------------------------------------------ logging, flows, WAF

def conditional(template, condition):
    return sorted(name for name, r in template["Resources"].items() if r.get("Condition") == condition)


def test_iot_logging_exists_only_under_its_parameter(template):
    assert template["Parameters"]["EnableIoTLogging"]["Default"] == "false"
    assert conditional(template, "IoTLogging") == ["IoTLoggingConfiguration", "IoTLoggingRole"]
    assert list(resources_of(template, "AWS::IoT::Logging")) == ["IoTLoggingConfiguration"]
    for value, on in (("false", False), ("true", True)):
        assert cfn.Stack(template, dict(PARAMETERS, EnableIoTLogging=value)).condition("IoTLogging") is on
    level = template["Parameters"]["IoTLogLevel"]
    assert set(level["AllowedValues"]) == {"ERROR", "WARN", "INFO", "DEBUG", "DISABLED"}
    stack = cfn.Stack(template, dict(PARAMETERS, EnableIoTLogging="true", IoTLogLevel="DEBUG"))
    props = stack.properties("IoTLoggingConfiguration")
    assert props == {"AccountId": "123456789012", "DefaultLogLevel": "DEBUG",
                     "RoleArn": stack.get_att("IoTLoggingRole", "Arn")}
    role = stack.properties("IoTLoggingRole")
    (trust,) = iam.statements(role["AssumeRolePolicyDocument"])
    assert trust["Principal"] == {"Service": "iot.amazonaws.com"}
    assert trust["Condition"] == {"StringEquals": {"aws:SourceAccount": "123456789012"}}
    statements = iam.role_statements(role)
    group = "arn:aws:logs:us-east-1:123456789012:log-group:AWSIotLogsV2:*"
    assert iam.evaluate(statements, "logs:PutLogEvents", group) == iam.ALLOW
    assert iam.evaluate(statements, "logs:PutLogEvents", group.replace("AWSIotLogsV2", "other")) != iam.ALLOW


@pytest.mark.parametrize("value", [None, "false", "true"])
def test_the_basic_flow_is_always_allowed(template, value):
    """Enhanced-flow guest credentials carry Cognito's session policy, which allows no Secrets
    Manager action: guests read the secret through the basic flow, whatever AllowClassicFlow
    says (an update keeps a parameter's stored value, so a new default would not reach old
    stacks)."""
    parameters = dict(PARAMETERS) if value is None else dict(PARAMETERS, AllowClassicFlow=value)
    stack = cfn.Stack(template, parameters)
    assert stack.properties("CognitoIdentityPool")["AllowClassicFlow"] is True
    assert stack.properties("CognitoIdentityPool")["AllowUnauthenticatedIdentities"] is True
    assert stack.output("ClassicFlow") == "true"
    assert rule_passes(template, parameters) == []


def test_the_old_allow_classic_flow_parameter_is_kept_and_ignored(template):
    # `update-stack --parameters ParameterKey=AllowClassicFlow,UsePreviousValue=true` fails on a
    # template without the parameter: it stays, and decides nothing.
    parameter = template["Parameters"]["AllowClassicFlow"]
    assert "Ignored" in parameter["Description"]
    used_in = [name for name, resource in template["Resources"].items()
               if "AllowClassicFlow" in json.dumps(resource).replace('"AllowClassicFlow": true', "")]
    assert used_in == []
    assert "AllowClassicFlow" not in json.dumps(template["Conditions"])
    assert "AllowClassicFlow" not in json.dumps(template["Outputs"])
    assert rule_passes(template, {"AllowClassicFlow": "maybe"}) == [
        template["Rules"]["AllowClassicFlowIsIgnored"]["Assertions"][0]["AssertDescription"]]


def test_app_client_cannot_change_user_attributes(stack, template):
    client = stack.properties("CognitoUserPoolClient")
    assert client["WriteAttributes"] == ["email"]  # needed by SignUp in fleet mode, then...
    (email,) = [a for a in stack.properties("CognitoUserPool")["Schema"] if a["Name"] == "email"]
    assert email["Mutable"] is False  # ...immutable: UpdateUserAttributes can change nothing


def test_user_pool_waf_is_optional_and_allows_only_device_calls(template):
    assert template["Parameters"]["EnableUserPoolWaf"]["Default"] == "false"
    assert conditional(template, "UserPoolWaf") == ["UserPoolDeviceNetwork", "UserPoolWebAcl",
                                                     "UserPoolWebAclAssociation"]
    for fleet in ("false", "true"):
        mode = "self-register" if fleet == "true" else "shared-user"
        stack = cfn.Stack(template, dict(PARAMETERS, EnableUserPoolWaf="true", RegistrationMode=mode),
                          attributes={"UserPoolDeviceNetwork.Arn": "ipset-arn", "UserPoolWebAcl.Arn": "acl-arn"})
        acl = stack.properties("UserPoolWebAcl")
        assert acl["DefaultAction"] == {"Block": {}}
        assert acl["Scope"] == "REGIONAL"
        rate, allow = sorted(acl["Rules"], key=lambda r: r["Priority"])
        assert rate["Action"] == {"Block": {}}
        based = rate["Statement"]["RateBasedStatement"]
        assert based["Limit"] == stack.parameters["WafSignUpRateLimit"]
        assert based["ScopeDownStatement"]["ByteMatchStatement"]["SearchString"] == \
            "AWSCognitoIdentityProviderService.SignUp"
        assert allow["Action"] == {"Allow": {}}
        network, target = allow["Statement"]["AndStatement"]["Statements"]
        assert network == {"IPSetReferenceStatement": {"Arn": "ipset-arn"}}
        assert stack.properties("UserPoolDeviceNetwork")["Addresses"] == stack.parameters["DeviceCidrs"]
        pattern = target["RegexMatchStatement"]["RegexString"]
        assert target["RegexMatchStatement"]["FieldToMatch"] == {"SingleHeader": {"Name": "x-amz-target"}}
        allowed = {op for op in ("InitiateAuth", "SignUp", "DeleteUser", "ChangePassword",
                                 "GlobalSignOut", "UpdateUserAttributes", "ForgotPassword",
                                 "RevokeToken", "GetUser", "InitiateAuthX")
                   if re.search(pattern, "AWSCognitoIdentityProviderService." + op)}
        assert allowed == ({"InitiateAuth", "SignUp"} if fleet == "true" else {"InitiateAuth"})
        association = stack.properties("UserPoolWebAclAssociation")
        assert association == {"ResourceArn": stack.get_att("CognitoUserPool", "Arn"),
                               "WebACLArn": "acl-arn"}


def test_presignup_concurrency_is_capped_when_asked(template):
    assert cfn.Stack(template, PARAMETERS).properties("PreSignUpFunction").get(
        "ReservedConcurrentExecutions") is None
    capped = cfn.Stack(template, dict(PARAMETERS, SignUpConcurrencyLimit="20"))
    assert capped.properties("PreSignUpFunction")["ReservedConcurrentExecutions"] == "20"


# ------------------------------------------------------------------ "any network"

def rule_passes(template, parameters):
    """Evaluates the template's Rules (the functions they use) for `parameters`."""
    stack = cfn.Stack(template, dict(PARAMETERS, **parameters))

    def value(node):
        if isinstance(node, dict) and len(node) == 1:
            (key, arg), = node.items()
            if key == "Fn::Contains":
                return value(arg[1]) in value(arg[0])
            if key == "Fn::Not":
                return not value(arg[0])
            if key == "Fn::Equals":
                return str(value(arg[0])) == str(value(arg[1]))
            if key == "Ref":
                return stack.ref(arg)
            raise NotImplementedError(key)
        return node

    failed = []
    for name, rule in template["Rules"].items():
        if "RuleCondition" in rule and not value(rule["RuleCondition"]):
            continue
        failed += [a["AssertDescription"] for a in rule["Assertions"] if not value(a["Assert"])]
    return failed


@pytest.mark.parametrize("cidrs,any_network,ok", [
    ("203.0.113.0/24", "false", True),
    ("0.0.0.0/0", "false", False),
    ("203.0.113.0/24,::/0", "false", False),
    ("0.0.0.0/0,::/0", "true", True),
])
def test_any_network_needs_the_explicit_parameter(template, cidrs, any_network, ok):
    assert template["Parameters"]["AllowAnyNetwork"]["Default"] == "false"
    failed = rule_passes(template, {"DeviceCidrs": cidrs, "AllowAnyNetwork": any_network})
    assert (failed == []) is ok, failed


def test_user_pool_waf_refuses_any_network(template):
    failed = rule_passes(template, {"DeviceCidrs": "0.0.0.0/0", "AllowAnyNetwork": "true",
                                    "EnableUserPoolWaf": "true"})
    assert failed and "EnableUserPoolWaf" in failed[0]


def test_presignup_role_grants_exactly_the_calls_its_code_makes(template, stack):
    code = template["Resources"]["PreSignUpFunction"]["Properties"]["Code"]["ZipFile"]
    calls = set(re.findall(r'boto3\.client\("([a-z-]+)"\)\.(\w+)\(', code))
    assert calls == {("secretsmanager", "get_secret_value")}
    assert code.count("boto3.client(") == 1
    statements = iam.role_statements(stack.properties("PreSignUpFunctionRole"))
    assert iam.allowed_actions(statements) - {"logs:CreateLogStream", "logs:PutLogEvents"} == {
        "secretsmanager:GetSecretValue"}
