#!/usr/bin/env bash
# The whole job once, against an emulated cloud: moto (AWS) and mosquitto (IoT Core's broker)
# run in a private network namespace with only loopback, so nothing is reachable from outside.
# Provisions the account like the CloudFormation template, starts the daemon, sends a few
# readings through its socket with `iot-cognito-relay send`, prints what the broker received,
# and cleans everything up. Needs root (network namespace); installs what is missing.
# RELAY_BIN=path runs that binary instead of building one, RELAY_RUNNER="qemu-aarch64-static -L
# /usr/aarch64-linux-gnu" runs it through an emulator (tests/arm/smoke.sh does both).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ "$(id -u)" != 0 ]; then echo "demo: run as root (it creates a network namespace)" >&2; exit 1; fi
bash scripts/install-test-deps.sh >/dev/null
if [ -z "${RELAY_BIN:-}" ]; then
    cargo build --quiet
    RELAY_BIN=$ROOT/target/debug/iot-cognito-relay
fi
# The runner's words, then the binary (word splitting of RELAY_RUNNER is intended).
read -r -a BIN <<<"${RELAY_RUNNER:-}"
BIN+=("$RELAY_BIN")
# The daemon start and the readings' round trip take longer under emulation.
WAIT_TENTHS=${RELAY_WAIT_TENTHS:-100}

WORK=$(mktemp -d /tmp/iot-cognito-relay-demo.XXXXXX)
NS=icr-demo-$$
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns delete "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
in_ns() { ip netns exec "$NS" "$@"; }

echo "== emulated cloud in network namespace $NS"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$WORK/ca.key" \
    -out "$WORK/ca.crt" -days 1 -subj /CN=demo-ca -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$WORK/server.key" \
    -out "$WORK/server.csr" -subj /CN=localhost 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$WORK/ext"
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" -CAcreateserial \
    -out "$WORK/server.crt" -days 1 -extfile "$WORK/ext" 2>/dev/null
cat >"$WORK/mosquitto.conf" <<CONF
per_listener_settings false
allow_anonymous true
user root
persistence false
log_dest file $WORK/mosquitto.log
connection_messages true
listener 1883 127.0.0.1
protocol mqtt
listener 8443 127.0.0.1
protocol websockets
websockets_headers_size 8192
cafile $WORK/ca.crt
certfile $WORK/server.crt
keyfile $WORK/server.key
CONF
# Started with `ip netns exec` directly (not through a function) so that $! is the server itself.
ip netns exec "$NS" .venv/bin/moto_server -H 127.0.0.1 -p 5000 >"$WORK/moto.log" 2>&1 & PIDS+=($!)
ip netns exec "$NS" mosquitto -c "$WORK/mosquitto.conf" & PIDS+=($!)
for _ in $(seq 100); do in_ns .venv/bin/python3 -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:5000/moto-api/")' 2>/dev/null && break; sleep 0.1; done

echo "== provisioning moto like cloudformation/cognito.yml"
ACCOUNT=$(in_ns env AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing .venv/bin/python3 tests/support/provision.py --endpoint http://127.0.0.1:5000 --prefix demo)
field() { .venv/bin/python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$ACCOUNT" "$1"; }
cat >"$WORK/config.toml" <<CONF
[aws]
endpoint_url = "http://127.0.0.1:5000"
[identity]
identity_pool_id = "$(field identity_pool_id)"
secret_id = "$(field secret_id)"
unauth_role_arn = "$(field unauth_role_arn)"
[mqtt]
url = "wss://127.0.0.1:8443/mqtt"
ca_file = "$WORK/ca.crt"
[socket]
path = "$WORK/relay.sock"
[state]
dir = "$WORK/state"
CONF
echo "   identity pool $(field identity_pool_id), secret $(field secret_id)"

echo "== starting iot-cognito-relay"
ip netns exec "$NS" env -u AWS_ENDPOINT_URL "${BIN[@]}" run --config "$WORK/config.toml" 2>"$WORK/daemon.log" & PIDS+=($!)
for _ in $(seq "$WAIT_TENTHS"); do [ -S "$WORK/relay.sock" ] && break; sleep 0.1; done

ip netns exec "$NS" mosquitto_sub -h 127.0.0.1 -p 1883 -t '#' -v -C 5 -W 30 >"$WORK/received.txt" & SUB=$!
sleep 0.5
echo "== sending 5 readings through the socket"
for i in 1 2 3 4 5; do echo "{\"celsius\": 2$i.5, \"reading\": $i}"; done \
    | "${BIN[@]}" send --socket "$WORK/relay.sock" --topic sensors/temperature
wait "$SUB" || true
echo "== what the broker received (topic payload)"
cat "$WORK/received.txt"
echo "== daemon status"
"${BIN[@]}" status --socket "$WORK/relay.sock"
[ "$(wc -l <"$WORK/received.txt")" = 5 ] || { echo "demo: expected 5 readings; daemon log:" >&2; cat "$WORK/daemon.log" >&2; exit 1; }
