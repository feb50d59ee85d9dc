# The two commands a newcomer needs: `make demo` and `make test` (both as root on Debian).
.PHONY: demo test deps lint audit

demo:
	bash scripts/demo.sh

deps:
	bash scripts/install-test-deps.sh

# The whole suite: unit, CLI and integration tests (moto + mosquitto in private network
# namespaces), then the CloudFormation checks.
test: deps
	cargo test --all-targets
	PATH="$(CURDIR)/.venv/bin:$$PATH" bash cloudformation/check.sh

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

audit:
	cargo audit --db ../shared/rustsec-advisory-db --no-fetch
