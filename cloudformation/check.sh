#!/usr/bin/env bash
# Checks of the cloud side: cfn-lint (no errors, warnings or informational findings), checkov
# (no failed check; skips only in the template, each with a written reason) and the pytest suite
# (Lambda code against moto, policy tests, template <-> tests/support/provision.py drift).
# Runs all three and exits non-zero if any of them failed.
#
# Needs the tools of requirements-dev.txt on PATH, e.g.
#   python3 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt
#   PATH="$PWD/.venv/bin:$PATH" cloudformation/check.sh
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
# Fall back to the repository's venv when the tools are not on PATH.
if ! command -v cfn-lint >/dev/null 2>&1 && [ -x "$root/.venv/bin/cfn-lint" ]; then
    PATH="$root/.venv/bin:$PATH"
fi
for tool in cfn-lint checkov python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "check.sh: $tool not found (pip install -r requirements-dev.txt)" >&2; exit 2; }
done
cd "$here"

failed=()

echo "== cfn-lint $(cfn-lint --version 2>&1 | awk '{print $NF}')"
# Exit code is a bitmask: 2 errors, 4 warnings, 8 informational. All of them fail the check.
if cfn-lint --include-checks I -- cognito.yml; then
    echo "cfn-lint: no errors, warnings or informational findings"
else
    failed+=(cfn-lint)
fi

echo "== checkov $(checkov --version 2>/dev/null)"
checkov_out="$(checkov --framework cloudformation --skip-download --compact -f cognito.yml 2>&1)"
checkov_rc=$?
# The summary, then every failed or skipped check with its resource and written reason.
printf '%s\n' "$checkov_out" | awk '
    /^Passed checks/ { print }
    /^Check: / { check = $0 }
    /(FAILED|SKIPPED) for resource/ { print check; print }
    /Suppress comment/ { print }'
[ "$checkov_rc" -eq 0 ] || failed+=(checkov)

echo "== pytest"
if ! python3 -m pytest -q tests; then
    failed+=(pytest)
fi

if [ "${#failed[@]}" -ne 0 ]; then
    echo "check.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "check.sh: all cloud-side checks passed"
