# The two commands a newcomer needs: `make demo` and `make test` (both as root on Debian).
.PHONY: demo test deps lint audit system-test tarball-test bench bench-downlink bench-wire cross-deps deb-all arm-smoke fleet-sim

demo:
	bash scripts/demo.sh

deps:
	bash scripts/install-test-deps.sh

# The whole suite: unit, CLI and integration tests (moto + mosquitto in private network
# namespaces), the CloudFormation checks, then the .deb under a real systemd.
test: deps
	t=$$(date +%s) && bash scripts/cargo-test.sh && echo "== cargo test took $$(($$(date +%s) - t)) s"
	t=$$(date +%s) && PATH="$(CURDIR)/.venv/bin:$$PATH" bash cloudformation/check.sh && echo "== check.sh took $$(($$(date +%s) - t)) s"
	t=$$(date +%s) && $(MAKE) system-test && echo "== system-test took $$(($$(date +%s) - t)) s"

# Builds the .deb, lints it (only initial-upload-closes-no-bugs is allowed), and runs it under
# systemd as PID 1 of a throwaway container (tests/system/run.sh), from this checkout and from
# a fresh clone under /tmp (tests/system/from-clone.sh).
system-test:
	deb=$$(cargo deb --quiet | tail -n 1) && \
	lintian --fail-on error,warning --suppress-tags initial-upload-closes-no-bugs "$$deb" && \
	bash tests/system/run.sh "$$deb" && \
	bash tests/system/from-clone.sh "$$deb"

# The release tarball's install.sh in throwaway containers, under systemd and without
# (tests/system/tarball.sh). TARBALL=path tests that tarball (CI: the x86_64 one of make dist);
# without it, a tarball of this machine's release build, dynamic as it is.
TARBALL ?=
tarball-test:
	tarball="$(TARBALL)" && \
	if [ -z "$$tarball" ]; then \
		cargo build --release --bin iot-cognito-relay && \
		tarball=$$(TARBALL_ALLOW_DYNAMIC=1 bash scripts/tarball.sh \
			"$${CARGO_TARGET_DIR:-target}/release/iot-cognito-relay" "$$(uname -m)" target/tarball-test); \
	fi && \
	bash tests/system/tarball.sh "$$tarball"

# The three packages: amd64, and arm64 + armhf cross-built (Debian's cross gcc, see
# .cargo/config.toml), each lintian-clean; copied to target/debian-all/.
deb-all:
	bash scripts/deb-all.sh

cross-deps:
	bash scripts/install-cross-deps.sh

# The packages of `make deb-all` run under qemu-user-static: --version and check-config on the
# shipped config for all three, and the end-to-end demo (moto + mosquitto) with the ARM binaries.
arm-smoke: cross-deps
	bash tests/arm/smoke.sh target/debian-all/*_amd64.deb
	bash tests/arm/smoke.sh --e2e target/debian-all/*_arm64.deb target/debian-all/*_armhf.deb

# Our daemon vs an awsiotsdk relay vs bare rumqttc (benches/relay.rs); writes
# target/relay-bench/results.json and relay-benchmark.png.
bench: deps
	cargo bench --profile release --bench relay

# Cloud -> app latency of the downlink (p50/p99 at 10 and 100 msg/s), outside `make test`.
bench-downlink: deps
	cargo bench --profile release --bench downlink_latency

# Bytes on a metered link and billed IoT Core messages per device (benches/wire.rs,
# docs/benchmarks.md "Wire bytes"): idle, 1/min, 1/s and 1/s batched, each with default and
# cellular settings, all at once for one window (WIRE_BENCH_SECONDS, default 3600). Writes
# target/wire-bench/results.json. WIRE_BENCH_BINARY=path measures another build.
bench-wire: deps
	cargo bench --profile release --bench wire

# 100 daemons of one self-register stack against one moto and one mosquitto, Cognito's quotas
# scaled down by the proxy (tests/fleet_sim.rs; `make test` runs it with 5). Uses the release
# binary (cargo rebuilds it only when out of date); writes target/fleet-sim/report.json and fleet-sim.png.
# FLEET_SIM_DEVICES and FLEET_SIM_RATE_SCALE override the defaults.
FLEET_SIM_DEVICES ?= 100
FLEET_SIM_RATE_SCALE ?= 10
fleet-sim: deps
	cargo build --release --bin iot-cognito-relay
	FLEET_SIM_DEVICES=$(FLEET_SIM_DEVICES) FLEET_SIM_RATE_SCALE=$(FLEET_SIM_RATE_SCALE) \
	IOT_COGNITO_RELAY_TEST_BINARY=$(CURDIR)/target/release/iot-cognito-relay \
	FLEET_SIM_OUT=$(CURDIR)/target/fleet-sim \
	cargo test --test fleet_sim -- --nocapture
	.venv/bin/python benches/python/fleet_plot.py target/fleet-sim/report.json target/fleet-sim/fleet-sim.png

# Smoke test on a real AWS account, never run by CI (docs/operations.md, "Smoke test on a real
# AWS account"): needs AWS credentials and a region (environment or profile); deploys a throwaway
# stack, runs the daemon from target/release against it, checks delivery and that a detached IoT
# policy heals, deletes everything. AWS_SMOKE_ARGS passes options: --dry-run, --keep, --update-from FILE.
.PHONY: aws-smoke
aws-smoke:
	$(if $(wildcard .venv/bin/python3),.venv/bin/python3,python3) scripts/aws-smoke.py $(AWS_SMOKE_ARGS)

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

# RustSec advisories: the offline database when one sits beside the repository (CI, .ci/run),
# otherwise cargo-audit fetches the current one.
ADVISORY_DB := $(wildcard ../shared/rustsec-advisory-db)
audit:
	command -v cargo-audit >/dev/null || cargo install cargo-audit --locked --quiet
ifneq ($(ADVISORY_DB),)
	cargo audit --db $(ADVISORY_DB) --no-fetch
else
	cargo audit
endif
