"""Fixtures: the template, its Lambda code as modules, a fake AWS account, a CloudFormation
response endpoint on 127.0.0.1 that records what the custom resource answers."""
import pytest

import cfn
from helpers import PARAMETERS, FakeContext, ResponseRecorder


@pytest.fixture(scope="session")
def template():
    return cfn.load_template()


@pytest.fixture(scope="session")
def lambdas(template, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lambdas")
    return {
        "presignup": cfn.load_lambda(template, "PreSignUpFunction", folder),
        "user_setup": cfn.load_lambda(template, "UserSetupFunction", folder),
        "attach": cfn.load_lambda(template, "AttachPolicyFunction", folder),
    }


@pytest.fixture
def presignup(lambdas):
    return lambdas["presignup"]


@pytest.fixture
def user_setup(lambdas):
    return lambdas["user_setup"]


@pytest.fixture(scope="session")
def provision():
    return cfn.load_provision()


@pytest.fixture
def stack(template):
    return cfn.Stack(template, PARAMETERS)


@pytest.fixture
def aws_env(monkeypatch):
    """Fake credentials, one region, and nothing that could reach a real account."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_SECRETS_MANAGER", "AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER",
                "AWS_ENDPOINT_URL_IOT", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")


@pytest.fixture
def cfn_responses():
    recorder = ResponseRecorder()
    yield recorder
    recorder.close()


@pytest.fixture
def context():
    return FakeContext()
