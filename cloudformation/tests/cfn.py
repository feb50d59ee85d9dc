"""Read cloudformation/cognito.yml and evaluate it the way CloudFormation would, for tests.

`load_template()` turns the short-form tags (!Ref, !Sub, ...) into their JSON form, so tests look
at the same document CloudFormation receives. `Stack` resolves intrinsic functions against
parameter values and the physical ids a test supplies (for example those moto handed out).
`load_lambda()` extracts a function's inline ZipFile code and imports it as a module.
"""
import importlib.util
import re
import sys
from pathlib import Path

import yaml

CLOUDFORMATION_DIR = Path(__file__).resolve().parents[1]
TEMPLATE_PATH = CLOUDFORMATION_DIR / "cognito.yml"
REPO_ROOT = CLOUDFORMATION_DIR.parent
PROVISION_PATH = REPO_ROOT / "tests" / "support" / "provision.py"

NO_VALUE = object()  # AWS::NoValue: removes the property or list item that holds it


class _CfnLoader(yaml.SafeLoader):
    pass


def _intrinsic(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix in ("Ref", "Condition"):
        return {suffix: value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {"Fn::" + suffix: value}


_CfnLoader.add_multi_constructor("!", _intrinsic)


def load_template(path=TEMPLATE_PATH):
    with open(path, encoding="utf-8") as handle:
        return yaml.load(handle, Loader=_CfnLoader)  # noqa: S506 - SafeLoader subclass


def load_lambda(template, logical_id, tmp_dir):
    """Write the function's inline code to tmp_dir/<id>/index.py and import it."""
    code = template["Resources"][logical_id]["Properties"]["Code"]["ZipFile"]
    assert isinstance(code, str), f"{logical_id}: inline code must be a plain string"
    folder = Path(tmp_dir) / logical_id
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "index.py"
    path.write_text(code, encoding="utf-8")
    name = f"cfn_lambda_{logical_id}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_provision():
    spec = importlib.util.spec_from_file_location("provision", PROVISION_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SUB_VARIABLE = re.compile(r"\$\{([^}]*)\}")


def generated_name(stack_name, logical_id, limit=64):
    """The physical name CloudFormation gives a resource without a name property:
    <stack name>-<logical id>-<12 random characters>, the first two shortened to fit `limit`."""
    suffix = "-AbCdEf123456"
    room = limit - len(suffix) - 1
    stack_part = stack_name[:max(room - len(logical_id), room // 2)]
    logical_part = logical_id[:room - len(stack_part)]
    return f"{stack_part}-{logical_part}{suffix}"


class Stack:
    """A template with parameter values and physical ids: evaluates intrinsic functions."""

    def __init__(self, template, parameters=None, region="us-east-1", account="123456789012",
                 refs=None, attributes=None, partition="aws", stack_name="test-stack"):
        self.template = template
        self.region, self.account, self.partition = region, account, partition
        self.stack_name = stack_name
        self.parameters = {}
        for name, spec in template.get("Parameters", {}).items():
            value = (parameters or {}).get(name, spec.get("Default"))
            if value is None:
                raise KeyError(f"parameter {name} has no default: give a value")
            if spec["Type"] == "CommaDelimitedList" and isinstance(value, str):
                value = value.split(",")
            self.parameters[name] = value if isinstance(value, list) else str(value)
        self.pseudo = {
            "AWS::Region": region, "AWS::AccountId": account, "AWS::Partition": partition,
            "AWS::StackName": stack_name, "AWS::URLSuffix": "amazonaws.com",
            "AWS::NoValue": NO_VALUE,
        }
        self.refs = dict(refs or {})
        self.attributes = dict(attributes or {})

    # -- resources
    def resource(self, logical_id):
        return self.template["Resources"][logical_id]

    def properties(self, logical_id):
        return self.eval(self.resource(logical_id).get("Properties", {}))

    def condition(self, name):
        return bool(self.eval(self.template["Conditions"][name]))

    def output(self, name):
        return self.eval(self.template["Outputs"][name]["Value"])

    def ref(self, name):
        if name in self.pseudo:
            return self.pseudo[name]
        if name in self.parameters:
            return self.parameters[name]
        if name in self.refs:
            return self.refs[name]
        resource = self.template["Resources"][name]
        props = resource.get("Properties", {})
        named = {
            "AWS::IoT::Policy": "PolicyName", "AWS::IAM::Role": "RoleName",
            "AWS::Logs::LogGroup": "LogGroupName", "AWS::Lambda::Function": "FunctionName",
        }
        if resource["Type"] in named:
            if named[resource["Type"]] not in props:
                return generated_name(self.stack_name, name)
            return self.eval(props[named[resource["Type"]]])
        return f"<{name}>"

    def get_att(self, logical_id, attribute):
        key = f"{logical_id}.{attribute}"
        if key in self.attributes:
            return self.attributes[key]
        resource = self.template["Resources"][logical_id]
        kind, region, account = resource["Type"], self.region, self.account
        if kind == "AWS::IAM::Role" and attribute == "Arn":
            return f"arn:{self.partition}:iam::{account}:role/{self.ref(logical_id)}"
        if kind == "AWS::Lambda::Function" and attribute == "Arn":
            return f"arn:aws:lambda:{region}:{account}:function:{self.ref(logical_id)}"
        if kind == "AWS::Logs::LogGroup" and attribute == "Arn":
            return f"arn:aws:logs:{region}:{account}:log-group:{self.ref(logical_id)}:*"
        if kind == "AWS::Cognito::UserPool" and attribute == "Arn":
            return f"arn:aws:cognito-idp:{region}:{account}:userpool/{self.ref(logical_id)}"
        if kind == "AWS::Cognito::UserPool" and attribute == "ProviderName":
            return f"cognito-idp.{region}.amazonaws.com/{self.ref(logical_id)}"
        if logical_id == "AppUser":
            props = self.properties("AppUser")
            name = f"{props['UserPoolId']}_{props['UserName']}"
            return {
                "SecretName": name,
                "SecretArn": f"arn:aws:secretsmanager:{region}:{account}:secret:{name}-AbC123",
                "UserName": props["UserName"],
                "IoTEndpoint": f"a1b2c3d4e5f6g7-ats.iot.{region}.amazonaws.com",
            }[attribute]
        raise KeyError(f"no value for GetAtt {key}: pass it in attributes")

    # -- intrinsic functions
    def eval(self, node):
        if isinstance(node, list):
            values = [self.eval(item) for item in node]
            return [value for value in values if value is not NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            (key, arg), = node.items()
            if key == "Ref":
                return self.ref(arg)
            if key == "Condition":
                return self.condition(arg)
            if key.startswith("Fn::"):
                return getattr(self, "_fn_" + key[4:].lower())(arg)
        values = {key: self.eval(value) for key, value in node.items()}
        return {key: value for key, value in values.items() if value is not NO_VALUE}

    def _fn_getatt(self, arg):
        logical_id, attribute = arg
        return self.get_att(logical_id, attribute)

    def _fn_sub(self, arg):
        text, variables = (arg, {}) if isinstance(arg, str) else (arg[0], self.eval(arg[1]))

        def replace(match):
            name = match.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if name in variables:
                value = variables[name]
            elif "." in name and not name.startswith("AWS::"):
                value = self.get_att(*name.split(".", 1))
            else:
                value = self.ref(name)
            assert isinstance(value, str), f"Fn::Sub ${{{name}}} is not a string: {value!r}"
            return value

        return _SUB_VARIABLE.sub(replace, text)

    def _fn_join(self, arg):
        delimiter, items = arg
        return delimiter.join(self.eval(items))

    def _fn_split(self, arg):
        delimiter, source = arg
        return self.eval(source).split(delimiter)

    def _fn_select(self, arg):
        index, items = arg
        return self.eval(items)[int(self.eval(index))]

    def _fn_if(self, arg):
        name, when_true, when_false = arg
        return self.eval(when_true if self.condition(name) else when_false)

    def _fn_equals(self, arg):
        left, right = self.eval(arg)
        return str(left) == str(right)

    def _fn_not(self, arg):
        return not self.eval(arg[0])

    def _fn_and(self, arg):
        return all(self.eval(arg))

    def _fn_or(self, arg):
        return any(self.eval(arg))
