"""The pre-sign-up trigger, extracted from the template and run as Cognito would run it."""
import copy
import re

import pytest

from helpers import DOMAIN


def signup_event(email, source="PreSignUp_SignUp", user="device-0001"):
    attributes = {} if email is None else {"email": email}
    return {
        "version": "1",
        "region": "us-east-1",
        "userPoolId": "us-east-1_TestPool1",
        "userName": user,
        "triggerSource": source,
        "callerContext": {"awsSdkVersion": "aws-sdk-rust", "clientId": "testclientid123"},
        "request": {"userAttributes": attributes, "validationData": None},
        "response": {"autoConfirmUser": False, "autoVerifyEmail": False, "autoVerifyPhone": False},
    }


@pytest.fixture
def amazon(monkeypatch):
    """amazon.com as the allowed domain, a real domain that look-alike addresses can imitate."""
    monkeypatch.setenv("ALLOWED_EMAIL_DOMAIN", "amazon.com")


ACCEPTED = ["user@amazon.com", "first.last+tag@amazon.com", "relay-test-app-user@amazon.com",
            "A.User_01@amazon.com"]

LOOK_ALIKES = [
    "user@amazon.com.evil.io",      # allowed domain as a prefix of another
    "a@b@amazon.com",               # two '@': the "domain" after the last one is not the address's
    "user@AMAZON.COM",              # upper case: exact comparison (see the handler's docstring)
    "user@Amazon.com",
    "user@amazon.co",
    "user@evilamazon.com",
    "user@evil-amazon.com",
    "user@mail.amazon.com",         # a subdomain is another domain
    "user@amazon.com.",             # trailing dot
    "user@amazon.com ",             # trailing space
    " user@amazon.com",
    "user@amazon.com\n",
    "user@\u0430mazon.com",         # Cyrillic a
    "user@amazon\uff0ecom",         # fullwidth full stop
    "us\u00e9r@amazon.com",         # non-ASCII local part
    "@amazon.com",                  # empty local part
    "amazon.com",                   # no '@'
    "user@",
    "",
    "user@amazon.com@amazon.com",
    "user%amazon.com@evil.io",
    "x" * 65 + "@amazon.com",       # local part over 64 characters
]


@pytest.mark.parametrize("email", ACCEPTED)
def test_admin_created_users_of_the_allowed_domain_pass(presignup, amazon, email):
    event = signup_event(email, "PreSignUp_AdminCreateUser")
    result = presignup.handler(copy.deepcopy(event), None)
    # Cognito ignores autoConfirmUser for AdminCreateUser (AdminSetUserPassword confirms).
    assert result["response"]["autoConfirmUser"] is False
    assert result["request"] == event["request"]


@pytest.mark.parametrize("email", LOOK_ALIKES)
def test_rejects_look_alikes(presignup, amazon, email):
    event = signup_event(email, "PreSignUp_AdminCreateUser")
    with pytest.raises(Exception) as raised:
        presignup.handler(event, None)
    # Cognito returns the message to the caller: it names the rule, not a stack trace.
    assert "amazon.com" in str(raised.value)
    assert event["response"]["autoConfirmUser"] is False


@pytest.mark.parametrize("email", LOOK_ALIKES)
def test_email_allowed_is_exact(presignup, email):
    assert presignup.email_allowed(email, "amazon.com") is False


def test_case_folding_cannot_forge_a_domain(presignup):
    # 'K' (U+212A KELVIN SIGN).lower() == 'k': a case-insensitive comparison would accept it.
    assert "\u212aiosk.example".lower() == "kiosk.example"
    assert presignup.email_allowed("user@\u212aiosk.example", "kiosk.example") is False
    assert presignup.email_allowed("user@kiosk.example", "kiosk.example") is True


@pytest.mark.parametrize("email", [None, 42, ["user@amazon.com"]])
def test_rejects_missing_or_malformed_email(presignup, amazon, email):
    event = signup_event(None, "PreSignUp_AdminCreateUser")
    if email is not None:
        event["request"]["userAttributes"]["email"] = email
    with pytest.raises(Exception):
        presignup.handler(event, None)


def test_rejects_everything_without_a_configured_domain(presignup, monkeypatch):
    monkeypatch.delenv("ALLOWED_EMAIL_DOMAIN", raising=False)
    with pytest.raises(Exception):
        presignup.handler(signup_event("user@amazon.com", "PreSignUp_AdminCreateUser"), None)
    monkeypatch.setenv("ALLOWED_EMAIL_DOMAIN", "")
    with pytest.raises(Exception):
        presignup.handler(signup_event("user@", "PreSignUp_AdminCreateUser"), None)


@pytest.mark.parametrize("source", ["PreSignUp_ExternalProvider", "PreSignUp_Unknown", None, 7])
def test_other_sign_up_sources_are_refused(presignup, amazon, source):
    with pytest.raises(Exception):
        presignup.handler(signup_event("user@amazon.com", source), None)


def test_template_wires_the_domain_parameter(stack):
    props = stack.properties("PreSignUpFunction")
    assert props["Environment"]["Variables"] == {"ALLOWED_EMAIL_DOMAIN": DOMAIN,
                                                 "SECRET_SUFFIX": "_relay-test-app-user"}
    # The secret the function reads is the custom resource's: <UserPoolId><SECRET_SUFFIX>.
    assert stack.get_att("AppUser", "SecretName") == \
        stack.ref("CognitoUserPool") + props["Environment"]["Variables"]["SECRET_SUFFIX"]
    assert stack.properties("CognitoUserPool")["LambdaConfig"]["PreSignUp"] == stack.get_att(
        "PreSignUpFunction", "Arn")


@pytest.mark.parametrize("domain,ok", [
    ("example.com", True), ("devices.example.co.uk", True), ("xn--bcher-kva.example", True),
    ("a-b.io", True), ("amazon.com", True),
    ("Example.com", False), ("EXAMPLE.COM", False), ("example.com.", False), ("*.example.com", False),
    ("example", False), ("-example.com", False), ("exa mple.com", False), ("user@example.com", False),
    ("", False),
])
def test_domain_parameter_accepts_only_lower_case_domains(template, domain, ok):
    # CloudFormation matches AllowedPattern against the whole value.
    pattern = template["Parameters"]["AllowedEmailDomain"]["AllowedPattern"]
    assert (re.fullmatch(pattern, domain) is not None) is ok


def test_template_has_no_hard_coded_domain(template):
    code = template["Resources"]["PreSignUpFunction"]["Properties"]["Code"]["ZipFile"]
    assert "amazon.com" not in code
    assert "Default" not in template["Parameters"]["AllowedEmailDomain"]


def test_the_shared_app_user_passes_the_trigger(stack, presignup, monkeypatch):
    props = stack.properties("AppUser")
    monkeypatch.setenv("ALLOWED_EMAIL_DOMAIN", stack.parameters["AllowedEmailDomain"])
    event = signup_event(props["EmailAddress"], "PreSignUp_AdminCreateUser", props["UserName"])
    presignup.handler(event, None)  # does not raise
