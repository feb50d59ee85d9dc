"""A small IAM policy evaluator: enough of the language this template uses, strictly.

moto enforces neither resource policies nor aws:SourceIp (docs/security.md), so the tests evaluate
the template's policies here: Allow/Deny statements, Action/Resource wildcards (* and ?),
policy variables such as ${cognito-identity.amazonaws.com:sub} in resources, and the condition
operators StringEquals, StringLike, IpAddress, NotIpAddress, ArnEquals and ArnNotEquals (with
ForAnyValue:), and the Principal of resource-based and trust policies (`principal=`: "*", AWS
account/role/session ARNs, Federated, Service). Anything else raises (other operators, NotAction,
NotResource, NotPrincipal, policy variables in condition values, other Principal forms), so a
policy that grows beyond this evaluator fails loudly instead of passing.
"""
import ipaddress
import re

ALLOW, DENY, IMPLICIT_DENY = "Allow", "Deny", "ImplicitDeny"
_VARIABLE = re.compile(r"\$\{([^}]+)\}")


def as_list(value):
    return value if isinstance(value, list) else [value]


def wildcard(pattern, value, ignore_case=False):
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.IGNORECASE if ignore_case else 0) is not None


def statements(policy):
    return as_list(policy["Statement"])


def _resource_matches(pattern, resource, context):
    missing = []

    def substitute(match):
        if match.group(1) not in context:
            missing.append(match.group(1))
            return ""
        # The variable's value is literal text, not a wildcard.
        return context[match.group(1)].replace("*", "\0").replace("?", "\1")

    concrete = _VARIABLE.sub(substitute, pattern)
    if missing:
        return False
    regex = "".join(
        ".*" if c == "*" else "." if c == "?" else re.escape({"\0": "*", "\1": "?"}.get(c, c))
        for c in concrete
    )
    return re.fullmatch(regex, resource) is not None


def _ip_in(value, cidrs):
    address = ipaddress.ip_address(value)
    return any(address in ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def _condition_holds(condition, context):
    for operator, pairs in condition.items():
        qualifier, _, base = operator.rpartition(":")
        if qualifier not in ("", "ForAnyValue"):
            raise NotImplementedError(operator)
        for key, expected in pairs.items():
            expected = [str(value) for value in as_list(expected)]
            if any("${" in value for value in expected):
                raise NotImplementedError(f"policy variable in the condition value of {key}")
            if key not in context:
                # A missing key never matches; the negated operators are then true.
                if base.startswith("Not") or base.startswith("StringNot") or base.startswith("ArnNot"):
                    continue
                return False
            actual = as_list(context[key])
            if base == "StringEquals":
                ok = any(value in expected for value in actual)
            elif base == "StringLike":
                ok = any(wildcard(pattern, value) for value in actual for pattern in expected)
            elif base == "IpAddress":
                ok = any(_ip_in(value, expected) for value in actual)
            elif base == "NotIpAddress":
                ok = not any(_ip_in(value, expected) for value in actual)
            elif base in ("ArnEquals", "ArnNotEquals"):
                matched = any(wildcard(pattern, value) for value in actual for pattern in expected)
                ok = matched if base == "ArnEquals" else not matched
            else:
                raise NotImplementedError(operator)
            if not ok:
                return False
    return True


def principal_matches(statement, principal):
    """Whether a resource-based or trust policy statement names `principal`: a dict of
    {"AWS": [role ARN, session ARN, account]} or {"Federated": ...} or {"Service": ...}."""
    named = statement.get("Principal")
    if named is None:
        raise NotImplementedError("a resource-based or trust policy statement without Principal")
    if named == "*":
        return True
    for kind, values in named.items():
        if kind not in ("AWS", "Federated", "Service"):
            raise NotImplementedError(f"Principal {kind}")
        for value in as_list(values):
            if kind == "AWS" and value == "*":
                return True
            if kind == "AWS" and re.fullmatch(r"[0-9]{12}|arn:aws:iam::[0-9]{12}:root", value):
                # The account: every principal of that account it delegates to.
                account = value if value.isdigit() else value.split(":")[4]
                if any(arn.split(":")[4] == account for arn in principal.get("AWS", [])):
                    return True
            elif value in as_list(principal.get(kind, [])):
                return True
    return False


def statement_applies(statement, action, resource, context, principal=None):
    for unsupported in ("NotAction", "NotResource", "NotPrincipal"):
        if unsupported in statement:
            raise NotImplementedError(unsupported)
    if principal is not None and not principal_matches(statement, principal):
        return False
    if not any(wildcard(pattern, action, ignore_case=True) for pattern in as_list(statement["Action"])):
        return False
    if resource is None:
        # A trust policy: the role itself is the resource and statements name none.
        if "Resource" in statement:
            raise NotImplementedError("Resource in a trust policy statement")
    elif not any(_resource_matches(pattern, resource, context) for pattern in as_list(statement["Resource"])):
        return False
    return _condition_holds(statement.get("Condition", {}), context)


def evaluate(policy_statements, action, resource, context=None, principal=None):
    """Allow, Deny (an explicit Deny applies) or ImplicitDeny for one request. `principal`
    (resource-based and trust policies) makes each statement's Principal count; `resource`
    None evaluates a trust policy."""
    context = context or {}
    applying = [s for s in policy_statements
                if statement_applies(s, action, resource, context, principal)]
    if any(s["Effect"] == "Deny" for s in applying):
        return DENY
    if any(s["Effect"] == "Allow" for s in applying):
        return ALLOW
    return IMPLICIT_DENY


def allowed_actions(policy_statements):
    return {action for s in policy_statements if s["Effect"] == "Allow" for action in as_list(s["Action"])}


def role_statements(role_properties):
    """All statements of a role's inline policies."""
    found = []
    for policy in role_properties.get("Policies", []):
        found.extend(statements(policy["PolicyDocument"]))
    return found
