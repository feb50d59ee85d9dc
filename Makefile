# The two commands a newcomer needs: `make demo` and `make test` (both as root on Debian).
.PHONY: demo test deps lint audit system-test tarball-test bench bench-downlink bench-wire cross-deps deb-all dist arm-smoke fleet-sim

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
# a fresh clone under /tmp (tests/system/from-clone.sh). SYSTEM_TEST_DEB=path tests that
# package instead of building one (CI: the amd64 package of `deb-all`, one build for both).
SYSTEM_TEST_DEB ?=
system-test:
	deb="$(SYSTEM_TEST_DEB)" && { [ -n "$$deb" ] || deb=$$(cargo deb --quiet | tail -n 1); } && \
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

# The three packages, amd64, arm64 and armhf (ARMv6: Pi Zero/1 and later), linked by zig
# (cargo zigbuild) against glibc 2.28's symbols, Depends: libc6 (>= the binary's newest
# GLIBC_ need), each lintian-clean; copied to target/debian-all/. Release profile: for releases,
# outside CI (CI builds them with --profile ci).
deb-all:
	bash scripts/deb-all.sh

# A release: the three packages and the four static musl tarballs (x86_64, aarch64, ARMv7,
# ARMv6; scripts/tarball.sh) in target/dist/ with SHA256SUMS, release profile (fat LTO), each
# smoke-tested (tests/arm/smoke.sh). Not run by CI; see README "Releases".
dist:
	bash scripts/dist.sh

cross-deps:
	bash scripts/install-cross-deps.sh

# After `make dist` (or deb-all plus `scripts/build-targets.sh static`): the three packages and
# the four static binaries under qemu-user-static (tests/arm/smoke.sh): --version and
# check-config on the shipped config for all, the glibc floor and an old glibc for the packages,
# and the end-to-end demo with every ARM binary, the static ARMv6 one as an ARM1176.
# SMOKE_PROFILE=ci tests CI's builds.
SMOKE_PROFILE ?= release
STATIC_BIN = $(or $(CARGO_TARGET_DIR),target)/$(1)/$(SMOKE_PROFILE)/iot-cognito-relay
arm-smoke: cross-deps
	bash tests/arm/smoke.sh target/debian-all/*_amd64.deb \
		x86_64-unknown-linux-musl=$(call STATIC_BIN,x86_64-unknown-linux-musl)
	bash tests/arm/smoke.sh --e2e target/debian-all/*_arm64.deb target/debian-all/*_armhf.deb \
		aarch64-unknown-linux-musl=$(call STATIC_BIN,aarch64-unknown-linux-musl) \
		armv7-unknown-linux-musleabihf=$(call STATIC_BIN,armv7-unknown-linux-musleabihf) \
		arm-unknown-linux-musleabihf=$(call STATIC_BIN,arm-unknown-linux-musleabihf)

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
