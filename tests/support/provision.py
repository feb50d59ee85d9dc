#!/usr/bin/env python3
"""Provision an emulated (moto) account the way cloudformation/cognito.yml does.

The Rust integration harness runs this once per test against its own moto_server and reads
the JSON it prints. cloudformation/tests/test_drift.py checks the names, tags and policy
layout used here against the template, so the emulated cloud and the real one cannot drift apart.

Usage: provision.py --endpoint http://127.0.0.1:PORT [--region us-east-1] [--prefix relay-test]
                    [--device-cidrs 127.0.0.0/8,::1/128] [--attach-function NAME]
                    [--registration-mode shared-user|self-register]

The JSON printed also holds what tests/support/aws_gate.py needs to evaluate the template's
policies with these physical ids: prefix, account_id, auth_role_arn, secret_arn,
attach_function_arn (the template's function, named as it names it unless --attach-function
gives another) and pre_sign_up_role_arn.

--attach-function tags the secret with AttachFunction as the template does (devices then invoke
that function instead of calling AttachPolicy). moto runs no Lambda code here: a test that uses
it answers the invocations itself (tests/support/attach_proxy.py). Without it, the secret is that
of an older stack and the daemon attaches the policy itself.

--registration-mode self-register (the template's RegistrationMode) makes no shared user: the
secret holds {"registration_code": ...} and the EmailDomain tag, and the pool allows SignUp. moto
runs no pre-sign-up trigger: tests/support/cognito_proxy.py plays it with the template's handler.
"""
import argparse
import json
import secrets
import string

SHARED, FLEET = "shared-user", "self-register"

import boto3

PRE_SIGN_UP_EMAIL_DOMAIN = "example.com"
# The tests' devices reach the emulated cloud over loopback.
DEVICE_CIDRS = ["127.0.0.0/8", "::1/128"]


def app_user_name(prefix):
    return f"{prefix}-app-user"


def secret_name(user_pool_id, prefix):
    # Same pattern as the template's user-creation Lambda.
    return f"{user_pool_id}_{app_user_name(prefix)}"


def iot_policy_document(region, account, identity_pool_id, device_cidrs=None):
    """Each identity may connect as itself and publish under <pool>/<its identity id>/, only
    from the device network.

    As in the template: one statement (the device networks written once; each action matches
    only its own resource kind): Connect as itself, Publish and Receive on its own topics,
    Subscribe to its own topic filters (the downlink), nothing else.
    """
    sub = "${cognito-identity.amazonaws.com:sub}"
    arn = f"arn:aws:iot:{region}:{account}"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["iot:Connect", "iot:Publish", "iot:Receive", "iot:Subscribe"],
                "Resource": [
                    f"{arn}:client/{sub}",
                    f"{arn}:topic/{identity_pool_id}/{sub}/*",
                    f"{arn}:topicfilter/{identity_pool_id}/{sub}/*",
                ],
                "Condition": {"IpAddress": {"aws:SourceIp": list(device_cidrs or DEVICE_CIDRS)}},
            },
        ],
    }


def random_password():
    alphabet = string.ascii_letters + string.digits
    core = "".join(secrets.choice(alphabet) for _ in range(20))
    return core + "aA1!"


def registration_code():
    return secrets.token_urlsafe(32)  # as the template's custom resource makes it


def provision(endpoint, region, prefix, device_cidrs=None, attach_function=None, mode=SHARED):
    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=region
    )
    client = lambda name: session.client(name, endpoint_url=endpoint)  # noqa: E731
    idp, identity, iam = client("cognito-idp"), client("cognito-identity"), client("iam")
    iot, sm, sts = client("iot"), client("secretsmanager"), client("sts")
    account = sts.get_caller_identity()["Account"]

    pool_id = idp.create_user_pool(
        PoolName=f"{prefix}-user-pool",
        AdminCreateUserConfig={"AllowAdminCreateUserOnly": mode != FLEET},
        UsernameConfiguration={"CaseSensitive": False},
    )["UserPool"]["Id"]
    client_id = idp.create_user_pool_client(
        UserPoolId=pool_id,
        ClientName=f"{prefix}-app-client",
        ExplicitAuthFlows=["ALLOW_USER_PASSWORD_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"],
        ReadAttributes=["email"],
        WriteAttributes=["email"],
    )["UserPoolClient"]["ClientId"]
    username, password, code = app_user_name(prefix), None, None
    if mode == FLEET:
        code = registration_code()
    else:
        password = random_password()
        idp.admin_create_user(
            UserPoolId=pool_id,
            Username=username,
            UserAttributes=[{"Name": "email", "Value": f"{username}@{PRE_SIGN_UP_EMAIL_DOMAIN}"}],
            MessageAction="SUPPRESS",
        )
        idp.admin_set_user_password(
            UserPoolId=pool_id, Username=username, Password=password, Permanent=True
        )

    identity_pool_id = identity.create_identity_pool(
        IdentityPoolName=f"{prefix.replace('-', '_')}_identity_pool",
        AllowUnauthenticatedIdentities=True,
        CognitoIdentityProviders=[
            {
                "ProviderName": f"cognito-idp.{region}.amazonaws.com/{pool_id}",
                "ClientId": client_id,
            }
        ],
    )["IdentityPoolId"]

    def role(name, amr):
        trust = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Federated": "cognito-identity.amazonaws.com"},
                    "Action": "sts:AssumeRoleWithWebIdentity",
                    "Condition": {
                        "StringEquals": {"cognito-identity.amazonaws.com:aud": identity_pool_id},
                        "ForAnyValue:StringLike": {"cognito-identity.amazonaws.com:amr": amr},
                    },
                }
            ],
        }
        return iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))[
            "Role"
        ]["Arn"]

    unauth_role_arn = role(f"{prefix}-cognito-unauth-role", "unauthenticated")
    auth_role_arn = role(f"{prefix}-cognito-auth-role", "authenticated")
    # moto does not implement SetIdentityPoolRoles; roles exist for the classic flow.

    policy_name = f"{prefix}-iot-policy"
    iot.create_policy(
        policyName=policy_name,
        policyDocument=json.dumps(
            iot_policy_document(region, account, identity_pool_id, device_cidrs)
        ),
    )
    iot_endpoint = iot.describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"]

    name = secret_name(pool_id, prefix)
    tags = [
        {"Key": "ClientId", "Value": client_id},
        {"Key": "UserPoolId", "Value": pool_id},
        {"Key": "IdentityPoolId", "Value": identity_pool_id},
        {"Key": "IoTEndpoint", "Value": iot_endpoint},
        {"Key": "IoTPolicy", "Value": policy_name},
    ]
    if attach_function:
        tags.append({"Key": "AttachFunction", "Value": attach_function})
    if mode == FLEET:
        tags.append({"Key": "EmailDomain", "Value": PRE_SIGN_UP_EMAIL_DOMAIN})
        value = {"registration_code": code}
    else:
        value = {username: password}
    secret_arn = sm.create_secret(Name=name, SecretString=json.dumps(value), Tags=tags)["ARN"]
    function = attach_function or f"{prefix}-attach-policy"  # the template's FunctionName
    if not function.startswith("arn:"):
        function = f"arn:aws:lambda:{region}:{account}:function:{function}"
    return {
        "region": region,
        "identity_pool_id": identity_pool_id,
        "secret_id": name,
        "unauth_role_arn": unauth_role_arn,
        "user_pool_id": pool_id,
        "client_id": client_id,
        "username": username if mode == SHARED else None,
        "password": password,
        "iot_policy": policy_name,
        "iot_endpoint": iot_endpoint,
        "registration_mode": mode,
        "registration_code": code,
        "email_domain": PRE_SIGN_UP_EMAIL_DOMAIN,
        # What tests/support/aws_gate.py needs to resolve the template's policies.
        "prefix": prefix,
        "account_id": account,
        "auth_role_arn": auth_role_arn,
        "secret_arn": secret_arn,
        "attach_function_arn": function,
        # Not created in moto (no Lambda runs here); named as the template names it.
        "pre_sign_up_role_arn": f"arn:aws:iam::{account}:role/{prefix}-pre-sign-up-role",
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--prefix", default="relay-test")
    parser.add_argument("--device-cidrs", default=",".join(DEVICE_CIDRS))
    parser.add_argument("--attach-function", default=None)
    parser.add_argument("--registration-mode", choices=(SHARED, FLEET), default=SHARED)
    args = parser.parse_args()
    result = provision(args.endpoint, args.region, args.prefix, args.device_cidrs.split(","),
                       args.attach_function, args.registration_mode)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
