#!/usr/bin/env python3
"""Peer relay for the benchmark: what a fleet operator could write with the AWS IoT Device SDK
for Python v2 (`awsiotsdk`, on top of `awscrt`) instead of running iot-cognito-relay, written
as lean as a careful awscrt relay can be.

It speaks the same socket protocol as the daemon (docs/protocol.md): newline-delimited
JSON on a Unix stream socket, one object per line,
    {"topic": "...", "payload": <any JSON>, "id": <optional str|number>, "qos": 1}
and publishes each message to PREFIX + "/" + topic over MQTT 3.1.1 over WebSockets with SigV4
(mqtt_connection_builder.websockets_with_default_aws_signing), QoS 1 by default.

Design, and why each choice is the cheap one:
- Answers: `{"id":..,"ok":true}` is sent once the broker PUBACKed the message (QoS 1) — the
  strongest promise a relay without a disk spool can make. `--ack queued` answers as soon as
  the message is handed to the CRT instead (in memory only: lost on a crash).
- Event loop: uvloop when installed (benches/python/requirements.txt has it), else asyncio's own. Each
  client is an `asyncio.Protocol`: bytes arrive in `data_received`, no stream reader, no task
  and no await per chunk.
- In-flight bound: at most --max-in-flight publishes are unacknowledged at once. A client
  whose next line finds no free permit stops being read (`pause_reading`) and keeps the lines
  it has; a PUBACK resumes it. Back-pressure reaches the writer through the socket, and the
  event loop never blocks.
- Per message: one orjson parse, topics checked once and remembered, one `publish()`, and the
  done callback is a bound method (no closure); the message's client and id ride on the future.
- The cycle collector is tuned for a relay: objects made at start are frozen out of its way,
  and it runs every 100,000 allocations instead of 700.
- Completions arrive on the CRT's event-loop thread; they are queued and handed to the asyncio
  loop in batches (one wake-up per batch, not one per message), where permits are released and
  answers are written, one write per client per batch.
- The CRT thread keeps its Python thread state. CPython makes a thread state for a foreign
  thread at every callback and frees it after, and 3.11 maps and unmaps a 16 KiB frame stack
  each time: measured, that was over half of the relay's CPU per message. Taking the GIL state
  once more on that thread, and never giving it back, keeps one thread state for the thread's
  life (PyGILState_Ensure, public C API, through ctypes).
- clean_session=False: with a clean session the CRT fails every unacknowledged publish when the
  connection drops (AWS_ERROR_MQTT_CANCELLED_FOR_CLEAN_SESSION); with a persistent session it
  keeps them and re-sends them after its automatic reconnect, which is what an at-least-once
  relay wants. (AWS IoT Core supports persistent sessions; the relay never subscribes, so the
  session holds no subscriptions and the broker queues nothing for it.)
- SIGTERM/SIGINT: stop accepting and reading, answer lines read but not yet published with
  `shutting_down`, wait (up to --drain-timeout) for every outstanding PUBACK, answer, then
  disconnect and exit 0.

Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN (static
provider). The SigV4 signature is made at each WebSocket handshake, so a reconnect after the
credentials expire fails; refreshing them is out of scope for this peer.

Prints "ready" on stdout once connected and listening. Logs go to stderr.
"""

import argparse
import asyncio
import base64
import binascii
import collections
import ctypes
import gc
import json
import os
import signal
import sys
import threading
import time

from awscrt import auth, mqtt
from awsiot import mqtt_connection_builder

try:
    import uvloop
except ImportError:  # pragma: no cover - asyncio's own loop
    uvloop = None

MAX_LINE = 256 * 1024
MAX_PAYLOAD = 128 * 1024
# A client that does not read its answers loses them once this much is buffered for it.
MAX_ANSWER_BUFFER = 4 * 1024 * 1024
# Checked topics remembered (devices use a handful; a client inventing topics only costs checks).
TOPIC_CACHE = 4096
QOS = {1: mqtt.QoS.AT_LEAST_ONCE, 0: mqtt.QoS.AT_MOST_ONCE}

# The standard library's JSON, with its objects made once: json.dumps() with non-default
# arguments builds a new JSONEncoder on every call.
_std_decode = json.JSONDecoder().decode
_std_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

try:
    # orjson (benches/python/requirements.txt has it) is about 4x faster on this path. Whatever it
    # refuses (integers beyond 64 bits, NaN, ...) goes to the standard library, so the accepted
    # input and the output are the same either way.
    import orjson

    def _loads(line):
        try:
            return orjson.loads(line)
        except orjson.JSONDecodeError:
            return _std_decode(line.decode())

    def _dumps_bytes(value):
        try:
            return orjson.dumps(value)
        except TypeError:
            return _std_encode(value).encode()
except ImportError:  # pragma: no cover - the plain standard library path
    def _loads(line):
        return _std_decode(line.decode())

    def _dumps_bytes(value):
        return _std_encode(value).encode()


def log(message):
    print(f"peer_relay: {message}", file=sys.stderr, flush=True)


def error_answer(id_json, code, message):
    if id_json is None:
        return ('{"ok":false,"error":"%s","message":%s}\n' % (code, _std_encode(message))).encode()
    return ('{"id":%s,"ok":false,"error":"%s","message":%s}\n'
            % (id_json, code, _std_encode(message))).encode()


def topic_error(full_topic, topic):
    if not topic:
        return "topic is empty"
    if "+" in topic or "#" in topic or "\0" in topic:
        return "topic contains a wildcard or NUL"
    if topic[0] in "/$":
        return "topic starts with '/' or '$'"
    if len(full_topic.encode()) > 256:
        return "topic is longer than 256 bytes"
    if full_topic.count("/") > 7:
        return "topic has more than 7 '/'"
    return None


class Client(asyncio.Protocol):
    """One connected socket client: the lines it sent that wait for a permit, and how many of
    its messages await a PUBACK."""

    def __init__(self, relay):
        self.relay = relay
        self.transport = None
        self.partial = b""  # the start of a line whose newline has not arrived
        self.discarding = False  # inside a line longer than MAX_LINE
        self.lines = collections.deque()  # complete lines not yet published
        self.pending = 0  # published, not yet completed
        self.reading = True  # until EOF
        self.paused = False

    # ---- asyncio.Protocol ----

    def connection_made(self, transport):
        self.transport = transport
        self.relay.clients.add(self)

    def data_received(self, data):
        if self.discarding:
            cut = data.find(b"\n")
            if cut < 0:
                return
            data = data[cut + 1:]
            self.discarding = False
        if self.partial:
            data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > MAX_LINE:
            self.partial = b""
            self.discarding = True
            self.send(error_answer(None, "line_too_long", "line longer than 256 KiB"))
        if self.lines:
            self.lines.extend(lines)
        else:
            self.lines = collections.deque(lines)
        self.work()

    def eof_received(self):
        self.reading = False
        self.close_when_done()
        return True  # keep the transport open for the answers still to come

    def connection_lost(self, exc):
        self.reading = False
        self.lines.clear()
        self.relay.clients.discard(self)

    # ---- relaying ----

    def work(self):
        """Publishes this client's lines while permits last; pauses reading when they run out."""
        relay = self.relay
        lines = self.lines
        answers = []
        while lines:
            if relay.free == 0:
                if not self.paused and not self.transport.is_closing():
                    self.transport.pause_reading()
                    self.paused = True
                relay.waiting.append(self)
                break
            answer = relay.relay_line(self, lines.popleft())
            if answer is not None:
                answers.append(answer)
        else:
            if self.paused and not relay.stopping:
                self.paused = False
                self.transport.resume_reading()
        if answers:
            self.send(b"".join(answers))
        self.close_when_done()

    def send(self, data):
        transport = self.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() > MAX_ANSWER_BUFFER:
            return  # the client does not read its answers: it loses them, nothing else
        transport.write(data)

    def close_when_done(self):
        # After its EOF a client may still wait for answers (e.g. `nc -N`): close only once
        # every message it sent has completed.
        if not self.reading and not self.lines and self.pending == 0 \
                and not self.transport.is_closing():
            self.transport.close()


class Relay:
    def __init__(self, args, connection):
        self.args = args
        self.publish = connection.publish
        self.prefix = args.topic_prefix.rstrip("/") + "/"
        self.ack_on_puback = args.ack == "puback"
        self.loop = asyncio.get_running_loop()
        self.free = args.max_in_flight  # permits of the in-flight bound
        self.waiting = collections.deque()  # clients paused for a permit
        self.outstanding = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.stopping = False
        self.clients = set()
        self.topics = {}  # topic -> full topic, or an error text
        # Completed futures handed over from the CRT thread.
        self.done = collections.deque()
        self.wakeup_pending = False
        self.crt_thread_pinned = False
        self.published = 0
        self.failed = 0

    # ---- one line ----

    def relay_line(self, client, line):
        """Publishes one line (a permit is free); returns an answer to send now, or None."""
        if len(line) > MAX_LINE:
            return error_answer(None, "line_too_long", "line longer than 256 KiB")
        try:
            message = _loads(line)
        except ValueError as error:  # UnicodeDecodeError included
            if not line.strip():
                return None
            return error_answer(None, "invalid_json", str(error))
        if message.__class__ is not dict:
            return error_answer(None, "invalid_json", "a line must be a JSON object")
        id_json = None
        if "id" in message:
            id_value = message["id"]
            if id_value.__class__ is int:
                id_json = str(id_value)
            elif id_value.__class__ is str or id_value.__class__ is float:
                id_json = _std_encode(id_value)
            else:
                return error_answer(None, "invalid_json", "id must be a string or a number")
        if message.get("op") == "status":
            return self.status_answer()
        topic = message.get("topic")
        if topic is None:
            return error_answer(id_json, "missing_field", "topic is required")
        if topic.__class__ is not str:
            return error_answer(id_json, "invalid_topic", "topic must be a string")
        full_topic = self.topics.get(topic)
        if full_topic is None:
            full_topic = self.check_topic(topic)
        if full_topic.__class__ is bytes:
            return error_answer(id_json, "invalid_topic", full_topic.decode())
        if "payload" in message:
            payload = message["payload"]
            if payload.__class__ is str:
                payload = payload.encode()
            else:
                payload = _dumps_bytes(payload)
        elif "payload_base64" in message:
            try:
                payload = base64.b64decode(message["payload_base64"], validate=True)
            except (binascii.Error, TypeError, ValueError) as error:
                return error_answer(id_json, "invalid_json", f"payload_base64: {error}")
        else:
            return error_answer(id_json, "missing_field", "payload is required")
        if len(payload) > MAX_PAYLOAD:
            return error_answer(id_json, "payload_too_large", "payload larger than 128 KiB")
        qos = message.get("qos", 1)
        qos = QOS.get(qos) if qos.__class__ is int else None
        if qos is None:
            return error_answer(id_json, "invalid_qos", "qos must be 0 or 1")
        if self.stopping:
            return error_answer(id_json, "shutting_down", "the relay is stopping")

        self.free -= 1
        if self.outstanding == 0:
            self.idle.clear()
        self.outstanding += 1
        client.pending += 1
        future, _packet_id = self.publish(full_topic, payload, qos)
        future.relay_client = client
        future.relay_id = id_json
        future.add_done_callback(self.on_complete)
        if id_json is not None and not self.ack_on_puback:
            return b'{"id":%s,"ok":true}\n' % id_json.encode()
        return None

    def check_topic(self, topic):
        """The full topic (str), or what is wrong with it (bytes); remembered either way."""
        full_topic = self.prefix + topic
        problem = topic_error(full_topic, topic)
        result = full_topic if problem is None else problem.encode()
        if len(self.topics) >= TOPIC_CACHE:
            self.topics.clear()
        self.topics[topic] = result
        return result

    def status_answer(self):
        status = {
            "state": "stopping" if self.stopping else "connected",
            "in_flight": self.outstanding,
            "published_total": self.published,
            "dropped_total": self.failed,
        }
        return _dumps_bytes({"ok": True, "status": status}) + b"\n"

    # ---- completions (CRT thread -> asyncio loop) ----

    def on_complete(self, future):
        # Runs on the CRT event-loop thread (or inline if the future is already done).
        if not self.crt_thread_pinned and threading.current_thread() is not threading.main_thread():
            ctypes.pythonapi.PyGILState_Ensure()  # never released: see the module docstring
            self.crt_thread_pinned = True
        self.done.append(future)
        if not self.wakeup_pending:
            self.wakeup_pending = True
            self.loop.call_soon_threadsafe(self.drain_done)

    def drain_done(self):
        # Clear the flag before popping: a completion appended after this point schedules
        # another drain, so none is ever left behind.
        self.wakeup_pending = False
        done = self.done
        batches = {}
        count = 0
        while done:
            future = done.popleft()
            count += 1
            client = future.relay_client
            client.pending -= 1
            id_json = future.relay_id
            error = future.exception()
            if error is None:
                self.published += 1
                answer = None
                if id_json is not None and self.ack_on_puback:
                    answer = b'{"id":%s,"ok":true}\n' % id_json.encode()
            else:
                self.failed += 1
                answer = None
                if id_json is not None and self.ack_on_puback:
                    answer = error_answer(id_json, "publish_failed", str(error))
                else:
                    log(f"publish failed: {error}")
            answers = batches.get(client)
            if answers is None:
                answers = batches[client] = []
            if answer is not None:
                answers.append(answer)
        for client, answers in batches.items():
            if answers:
                client.send(b"".join(answers))
            client.close_when_done()
        if count:
            self.outstanding -= count
            self.free += count
            if self.outstanding == 0:
                self.idle.set()
            waiting = self.waiting
            while waiting and self.free:
                waiting.popleft().work()

    # ---- shutdown ----

    async def stop(self, server):
        self.stopping = True
        server.close()
        self.waiting.clear()
        for client in list(self.clients):
            if not client.transport.is_closing():
                client.transport.pause_reading()
            # Lines read but not published are answered, not dropped silently.
            answers = [error_answer(self.peek_id(line), "shutting_down", "the relay is stopping")
                       for line in client.lines if line.strip()]
            client.lines.clear()
            client.reading = False
            if answers:
                client.send(b"".join(answers))
            client.close_when_done()
        try:
            await asyncio.wait_for(self.idle.wait(), self.args.drain_timeout)
        except asyncio.TimeoutError:
            log(f"{self.outstanding} publishes still unacknowledged after "
                f"{self.args.drain_timeout}s; exiting anyway")
        for client in list(self.clients):
            if not client.transport.is_closing():
                client.transport.close()
        # A transport closes once its last answers are written (then connection_lost).
        deadline = time.monotonic() + 2
        while self.clients and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    @staticmethod
    def peek_id(line):
        try:
            value = _loads(line)
            if isinstance(value, dict) and "id" in value:
                return _std_encode(value["id"])
        except ValueError:
            pass
        return None


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--endpoint", required=True, help="IoT data endpoint host name")
    parser.add_argument("--port", type=int, default=443)
    parser.add_argument("--ca-file", help="PEM file of trusted CAs (default: system store)")
    parser.add_argument("--region", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--topic-prefix", required=True)
    parser.add_argument("--max-in-flight", type=int, default=100,
                        help="bound on unacknowledged publishes (default 100)")
    parser.add_argument("--ack", choices=("puback", "queued"), default="puback",
                        help="answer an id once PUBACKed (default) or once queued in memory")
    parser.add_argument("--keep-alive", type=int, default=30, help="seconds (default 30)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds to wait for outstanding PUBACKs on SIGTERM (default 30)")
    args = parser.parse_args()
    if args.max_in_flight < 1:
        parser.error("--max-in-flight must be at least 1")
    return args


def build_connection(args):
    try:
        access_key = os.environ["AWS_ACCESS_KEY_ID"]
        secret_key = os.environ["AWS_SECRET_ACCESS_KEY"]
    except KeyError as missing:
        sys.exit(f"peer_relay: environment variable {missing} is not set")
    credentials = auth.AwsCredentialsProvider.new_static(
        access_key, secret_key, os.environ.get("AWS_SESSION_TOKEN") or None)
    return mqtt_connection_builder.websockets_with_default_aws_signing(
        region=args.region,
        credentials_provider=credentials,
        endpoint=args.endpoint,
        port=args.port,
        ca_filepath=args.ca_file,
        client_id=args.client_id,
        clean_session=False,
        keep_alive_secs=args.keep_alive,
        on_connection_interrupted=lambda connection, error, **kw: log(
            f"connection interrupted: {error}"),
        on_connection_resumed=lambda connection, return_code, session_present, **kw: log(
            f"connection resumed: {return_code} session_present={session_present}"),
    )


async def main():
    args = parse_args()
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)

    connection = build_connection(args)
    started = time.monotonic()
    try:
        await asyncio.wrap_future(connection.connect())
    except Exception as error:  # noqa: BLE001 - any connect failure is fatal here
        log(f"cannot connect to {args.endpoint}:{args.port}: {error}")
        return 1
    log(f"connected to {args.endpoint}:{args.port} in {time.monotonic() - started:.2f}s"
        f" ({'uvloop' if uvloop else 'asyncio'} event loop)")

    relay = Relay(args, connection)
    try:
        os.unlink(args.socket)
    except FileNotFoundError:
        pass
    server = await loop.create_unix_server(lambda: Client(relay), path=args.socket, backlog=512)
    # Each message makes a few container objects (the CRT's future and its lock): with the
    # default threshold the cycle collector ran every few hundred messages, over every object
    # made at start. Those are frozen out of its way, and it runs a hundred times less often.
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    print("ready", flush=True)

    await stop_requested.wait()
    log("stopping")
    await relay.stop(server)
    try:
        os.unlink(args.socket)
    except FileNotFoundError:
        pass
    try:
        await asyncio.wait_for(asyncio.wrap_future(connection.disconnect()), 5)
    except Exception as error:  # noqa: BLE001
        log(f"disconnect: {error}")
    log(f"stopped: published={relay.published} failed={relay.failed} "
        f"unacknowledged={relay.outstanding}")
    return 0


if __name__ == "__main__":
    sys.exit(uvloop.run(main()) if uvloop else asyncio.run(main()))
