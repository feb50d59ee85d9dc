#!/usr/bin/env python3
"""Peer relay for the benchmark: what a fleet operator could write with the AWS IoT Device SDK
for Python v2 (`awsiotsdk`, on top of `awscrt`) instead of running iot-cognito-relay.

It speaks the same socket protocol as the daemon (SPEC.md, "Socket protocol"): newline-delimited
JSON on a Unix stream socket, one object per line,
    {"topic": "...", "payload": <any JSON>, "id": <optional str|number>, "qos": 1}
and publishes each message to PREFIX + "/" + topic over MQTT 3.1.1 over WebSockets with SigV4
(mqtt_connection_builder.websockets_with_default_aws_signing), QoS 1 by default.

Design (see bench/README section in the report for the reasoning):
- Answers: `{"id":..,"ok":true}` is sent once the broker PUBACKed the message (QoS 1) — the
  strongest promise a relay without a disk spool can make. `--ack queued` answers as soon as
  the message is handed to the CRT instead (in memory only: lost on a crash).
- In-flight bound: at most --max-in-flight publishes are unacknowledged at once. A client
  whose line would exceed the bound simply is not read further (asyncio semaphore), so the
  back-pressure reaches the writer through the socket; the event loop never blocks.
- Concurrency: one asyncio event loop (main thread) owns the socket server and all clients; the
  CRT runs its own event-loop thread for TLS/WebSocket/MQTT. PUBACK completions arrive on the
  CRT thread and are handed to the asyncio loop in batches (one wake-up per batch, not one per
  message), where permits are released and answers are written, one write per client per batch.
- clean_session=False: with a clean session the CRT fails every unacknowledged publish when the
  connection drops (AWS_ERROR_MQTT_CANCELLED_FOR_CLEAN_SESSION); with a persistent session it
  keeps them and re-sends them after its automatic reconnect, which is what an at-least-once
  relay wants. (AWS IoT Core supports persistent sessions; the relay never subscribes, so the
  session holds no subscriptions and the broker queues nothing for it.)
- SIGTERM/SIGINT: stop accepting and reading, answer lines already read but not yet published
  with `shutting_down`, wait (up to --drain-timeout) for every outstanding PUBACK, answer, then
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
import json
import os
import signal
import sys
import time

from awscrt import auth, mqtt
from awsiot import mqtt_connection_builder

MAX_LINE = 256 * 1024
MAX_PAYLOAD = 128 * 1024
READ_CHUNK = 256 * 1024
# A client that does not read its answers loses them once this much is buffered for it.
MAX_ANSWER_BUFFER = 4 * 1024 * 1024

# The standard library's JSON, with its objects made once: json.dumps() with non-default
# arguments builds a new JSONEncoder on every call.
_std_decode = json.JSONDecoder().decode
_std_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

try:
    # orjson (if installed; bench/requirements.txt has it) is about 4x faster on this path.
    # Whatever it refuses (integers beyond 64 bits, NaN, ...) goes to the standard library,
    # so the accepted input and the output are the same either way.
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


def _dumps(value):
    return _std_encode(value)


def log(message):
    print(f"peer_relay: {message}", file=sys.stderr, flush=True)


def error_answer(id_json, code, message):
    if id_json is None:
        return ('{"ok":false,"error":"%s","message":%s}\n' % (code, _dumps(message))).encode()
    return ('{"id":%s,"ok":false,"error":"%s","message":%s}\n'
            % (id_json, code, _dumps(message))).encode()


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


class Client:
    """One connected socket client: its writer, and how many of its messages await a PUBACK."""

    __slots__ = ("writer", "transport", "pending", "reading")

    def __init__(self, writer):
        self.writer = writer
        self.transport = writer.transport
        self.pending = 0  # published, not yet completed
        self.reading = True

    def send(self, data):
        if self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size() > MAX_ANSWER_BUFFER:
            return  # the client does not read its answers: it loses them, nothing else
        self.writer.write(data)

    def close_when_done(self):
        # After its EOF a client may still wait for answers (e.g. `nc -N`): close only once
        # every message it sent has completed.
        if not self.reading and self.pending == 0 and not self.transport.is_closing():
            self.writer.close()


class Relay:
    def __init__(self, args, connection):
        self.args = args
        self.connection = connection
        self.prefix = args.topic_prefix.rstrip("/") + "/"
        self.ack_on_puback = args.ack == "puback"
        self.loop = asyncio.get_running_loop()
        # The in-flight bound: free permits, and the readers waiting for one.
        self.free = args.max_in_flight
        self.waiters = collections.deque()
        self.outstanding = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.stopping = False
        self.tasks = set()
        self.clients = set()
        # Completions handed over from the CRT thread: (client, id_json, future).
        self.done = collections.deque()
        self.wakeup_pending = False
        self.published = 0
        self.failed = 0

    # ---- the in-flight bound ----

    async def wait_for_permit(self):
        while self.free == 0:
            waiter = self.loop.create_future()
            self.waiters.append(waiter)
            await waiter

    def release(self, count):
        self.free += count
        waiters = self.waiters
        while count and waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    # ---- completions (CRT thread -> asyncio loop) ----

    def on_complete(self, client, id_bytes, future):
        # Runs on the CRT event-loop thread (or inline if the future is already done).
        self.done.append((client, id_bytes, future))
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
        while True:
            try:
                client, id_bytes, future = done.popleft()
            except IndexError:
                break
            count += 1
            client.pending -= 1
            error = future.exception()
            if error is None:
                self.published += 1
                if id_bytes is not None and self.ack_on_puback:
                    answers = batches.get(client)
                    if answers is None:
                        answers = batches[client] = []
                    answers.append(b'{"id":%s,"ok":true}\n' % id_bytes)
            else:
                self.failed += 1
                if id_bytes is not None and self.ack_on_puback:
                    batches.setdefault(client, []).append(
                        error_answer(id_bytes.decode(), "publish_failed", str(error)))
                else:
                    log(f"publish failed: {error}")
            if client.pending == 0 and not client.reading:
                batches.setdefault(client, [])
        for client, answers in batches.items():
            if answers:
                client.send(b"".join(answers))
            self.settle(client)
        if count:
            self.outstanding -= count
            self.release(count)
            if self.outstanding == 0:
                self.idle.set()

    # ---- socket clients ----

    async def handle_client(self, reader, writer):
        task = asyncio.current_task()
        self.tasks.add(task)
        client = Client(writer)
        self.clients.add(client)
        pending = b""
        discarding = False  # inside a line longer than MAX_LINE
        lines = []
        index = 0
        try:
            while not self.stopping:
                chunk = await reader.read(READ_CHUNK)
                if not chunk:
                    break
                if discarding:
                    cut = chunk.find(b"\n")
                    if cut < 0:
                        continue
                    chunk = chunk[cut + 1:]
                    discarding = False
                lines = (pending + chunk).split(b"\n") if pending else chunk.split(b"\n")
                pending = lines.pop()
                if len(pending) > MAX_LINE:
                    pending = b""
                    discarding = True
                    client.send(error_answer(None, "line_too_long", "line longer than 256 KiB"))
                answers = []
                for index, line in enumerate(lines):
                    request = self.parse(line)
                    if request.__class__ is bytes:  # an immediate answer
                        answers.append(request)
                        continue
                    if request is None:
                        continue
                    if self.free == 0:
                        if answers:  # answer what we have before waiting
                            client.send(b"".join(answers))
                            answers = []
                        await self.wait_for_permit()
                    answer = self.publish(client, request)
                    if answer is not None:
                        answers.append(answer)
                index = len(lines)
                if answers:
                    client.send(b"".join(answers))
        except asyncio.CancelledError:
            # Stopping: the lines read but not published are answered, not dropped silently.
            answers = []
            for line in lines[index:]:
                answers.append(error_answer(self.peek_id(line), "shutting_down",
                                            "the relay is stopping"))
            if answers:
                client.send(b"".join(answers))
        except (ConnectionError, OSError):
            pass
        finally:
            self.tasks.discard(task)
            client.reading = False
            self.settle(client)

    def settle(self, client):
        client.close_when_done()
        if client.transport.is_closing():
            self.clients.discard(client)

    @staticmethod
    def peek_id(line):
        try:
            value = _loads(line)
            if isinstance(value, dict) and "id" in value:
                return _dumps(value["id"])
        except ValueError:
            pass
        return None

    def parse(self, line):
        """Returns (full_topic, payload, qos, id_bytes), an answer (bytes), or None."""
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
                id_json = _dumps(id_value)
            else:
                return error_answer(None, "invalid_json", "id must be a string or a number")
        if message.get("op") == "status":
            return self.status_answer()
        topic = message.get("topic")
        if topic is None:
            return error_answer(id_json, "missing_field", "topic is required")
        if topic.__class__ is not str:
            return error_answer(id_json, "invalid_topic", "topic must be a string")
        full_topic = self.prefix + topic
        problem = topic_error(full_topic, topic)
        if problem:
            return error_answer(id_json, "invalid_topic", problem)
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
        if qos == 1 and qos.__class__ is int:
            qos = mqtt.QoS.AT_LEAST_ONCE
        elif qos == 0 and qos.__class__ is int:
            qos = mqtt.QoS.AT_MOST_ONCE
        else:
            return error_answer(id_json, "invalid_qos", "qos must be 0 or 1")
        if self.stopping:
            return error_answer(id_json, "shutting_down", "the relay is stopping")
        return full_topic, payload, qos, (id_json.encode() if id_json is not None else None)

    def publish(self, client, request):
        """Hands one message to the CRT (a permit is free); returns an answer or None."""
        full_topic, payload, qos, id_bytes = request
        self.free -= 1
        self.outstanding += 1
        self.idle.clear()
        client.pending += 1
        future, _packet_id = self.connection.publish(full_topic, payload, qos)
        future.add_done_callback(
            lambda f, c=client, i=id_bytes: self.on_complete(c, i, f))
        if id_bytes is not None and not self.ack_on_puback:
            return b'{"id":%s,"ok":true}\n' % id_bytes
        return None

    def status_answer(self):
        status = {
            "state": "stopping" if self.stopping else "connected",
            "in_flight": self.outstanding,
            "published_total": self.published,
            "dropped_total": self.failed,
        }
        return (_dumps({"ok": True, "status": status}) + "\n").encode()

    # ---- shutdown ----

    async def stop(self, server):
        self.stopping = True
        server.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(self.idle.wait(), self.args.drain_timeout)
        except asyncio.TimeoutError:
            log(f"{self.outstanding} publishes still unacknowledged after "
                f"{self.args.drain_timeout}s; exiting anyway")
        # Flush the last answers before the loop goes away.
        for client in list(self.clients):
            if not client.transport.is_closing():
                client.writer.close()
        for client in list(self.clients):
            try:
                await asyncio.wait_for(client.writer.wait_closed(), 2)
            except (asyncio.TimeoutError, ConnectionError, OSError):
                pass


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
    log(f"connected to {args.endpoint}:{args.port} in {time.monotonic() - started:.2f}s")

    relay = Relay(args, connection)
    try:
        os.unlink(args.socket)
    except FileNotFoundError:
        pass
    server = await asyncio.start_unix_server(relay.handle_client, path=args.socket,
                                             limit=MAX_LINE + 1, backlog=512)
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
    sys.exit(asyncio.run(main()))
