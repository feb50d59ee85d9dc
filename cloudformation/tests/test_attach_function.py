"""The attach function (the stack attaches the IoT policy; devices hold no iot:AttachPolicy),
extracted from the template and run against moto
(mock_aws) as a device would call it: with the ID token the user pool gave the device.

moto runs no Lambda code without Docker, so the handler runs in-process. moto's
GetId ignores Logins and hands out a fresh identity on every call: the tests therefore check
that the identity comes from GetId (a new one of the pool), never from the payload, and that
only the stack's policy is attached to it.
"""
import json
import logging

import boto3
import pytest
from moto import mock_aws

import cfn
from helpers import PARAMETERS

REGION = "us-east-1"
OTHER = "us-east-1:0b0b0b0b-5555-6666-7777-888888888888"


class Device:
    """A pool, its shared user signed in (a real RS256 ID token from moto), the stack's policy."""

    def __init__(self, template, monkeypatch):
        self.idp = boto3.client("cognito-idp", region_name=REGION)
        self.identity = boto3.client("cognito-identity", region_name=REGION)
        self.iot = boto3.client("iot", region_name=REGION)
        account = boto3.client("sts", region_name=REGION).get_caller_identity()["Account"]
        stack = cfn.Stack(template, PARAMETERS, region=REGION, account=account)
        pool = stack.properties("CognitoUserPool")
        for key in ("LambdaConfig", "DeletionProtection"):
            pool.pop(key, None)
        pool_id = self.idp.create_user_pool(PoolName=pool.pop("UserPoolName"), **pool)["UserPool"]["Id"]
        stack.refs["CognitoUserPool"] = pool_id
        client_id = self.idp.create_user_pool_client(**stack.properties("CognitoUserPoolClient"))[
            "UserPoolClient"]["ClientId"]
        stack.refs["CognitoUserPoolClient"] = client_id
        self.pool_id = self.identity.create_identity_pool(
            **stack.properties("CognitoIdentityPool"))["IdentityPoolId"]
        stack.refs["CognitoIdentityPool"] = self.pool_id
        policy = stack.properties("CognitoIoTPolicy")
        self.policy = policy["PolicyName"]
        self.iot.create_policy(policyName=self.policy, policyDocument=json.dumps(policy["PolicyDocument"]))
        self.iot.create_policy(policyName="admin-policy", policyDocument="{}")
        user, password = "relay-test-app-user", "Aa1!" + "x" * 20
        self.idp.admin_create_user(UserPoolId=pool_id, Username=user, MessageAction="SUPPRESS",
                                   UserAttributes=[{"Name": "email", "Value": f"{user}@example.com"}])
        self.idp.admin_set_user_password(UserPoolId=pool_id, Username=user, Password=password,
                                         Permanent=True)
        self.id_token = self.idp.initiate_auth(
            ClientId=client_id, AuthFlow="USER_PASSWORD_AUTH",
            AuthParameters={"USERNAME": user, "PASSWORD": password})["AuthenticationResult"]["IdToken"]
        # The function's environment, exactly as the template sets it.
        for name, value in stack.properties("AttachPolicyFunction")["Environment"]["Variables"].items():
            monkeypatch.setenv(name, value)
        self.stack = stack

    def targets(self, policy=None):
        return self.iot.list_targets_for_policy(policyName=policy or self.policy)["targets"]

    def identities(self):
        listed = self.identity.list_identities(IdentityPoolId=self.pool_id, MaxResults=60)
        return {i["IdentityId"] for i in listed["Identities"]}


@pytest.fixture
def attach(lambdas):
    return lambdas["attach"]


@pytest.fixture
def device(aws_env, template, monkeypatch):
    with mock_aws():
        yield Device(template, monkeypatch)


def test_attaches_the_stacks_policy_to_the_callers_own_identity(device, attach, context):
    answer = attach.handler({"IdToken": device.id_token}, context)
    assert answer == {"identity_id": answer["identity_id"], "policy": device.policy}
    assert answer["identity_id"] in device.identities()  # from GetId, in this pool
    assert device.targets() == [answer["identity_id"]]
    assert device.targets("admin-policy") == []


def test_a_named_identity_or_policy_in_the_payload_is_ignored(device, attach, context):
    device.identity.get_id(IdentityPoolId=device.pool_id)  # someone else's identity exists
    event = {"IdToken": device.id_token, "IdentityId": OTHER, "identity_id": OTHER,
             "policy": "admin-policy", "PolicyName": "admin-policy", "target": OTHER}
    answer = attach.handler(event, context)
    assert answer["identity_id"] != OTHER and answer["policy"] == device.policy
    assert OTHER not in device.targets()
    assert device.targets("admin-policy") == []


@pytest.mark.parametrize("event", [
    {}, None, [], "token", {"IdToken": ""}, {"IdToken": None}, {"IdToken": 42},
    {"IdToken": "not-a-jwt"}, {"IdToken": "a.b.c" + "x" * 20000}, {"idtoken": "a.b.c"},
    {"IdentityId": OTHER},
])
def test_refuses_a_payload_without_a_token(device, attach, context, event):
    with pytest.raises(attach.Refused) as raised:
        attach.handler(event, context)
    assert "IdToken" in str(raised.value)
    assert device.targets() == []


def test_a_token_the_identity_pool_refuses_attaches_nothing(device, attach, context, monkeypatch):
    from botocore.exceptions import ClientError
    real = attach.boto3.client

    def refusing(name, **kwargs):
        made = real(name, **kwargs)
        if name == "cognito-identity":
            def get_id(**_):
                raise ClientError({"Error": {"Code": "NotAuthorizedException",
                                             "Message": "Invalid login token."}}, "GetId")
            made.get_id = get_id
        return made

    # moto accepts any token; real Cognito verifies it: play that refusal.
    monkeypatch.setattr(attach.boto3, "client", refusing)
    with pytest.raises(attach.Refused) as raised:
        attach.handler({"IdToken": device.id_token}, context)
    assert "NotAuthorizedException" in str(raised.value)
    assert device.id_token not in str(raised.value)
    assert device.targets() == []


def test_never_logs_the_token(device, attach, context, caplog):
    caplog.set_level(logging.INFO)  # the function's level (botocore's DEBUG would show bodies)
    attach.handler({"IdToken": device.id_token}, context)
    with pytest.raises(attach.Refused):
        attach.handler({"IdToken": device.id_token + "x" * 20000}, context)
    assert "attached" in caplog.text
    assert device.id_token.split(".")[1] not in caplog.text
