#!/usr/bin/env python3
"""A test-side MQTT-over-websocket proxy between the daemon and mosquitto's wss listener.

The daemon connects to it with a plain ws:// URL; it forwards to mosquitto over TLS. It reads
the client's websocket frames (masked, as RFC 6455 requires of clients) and the MQTT packets in
them, to play two parts of IoT Core that mosquitto does not:

  --control FILE   "drop SUFFIX": close the connection (both sides) when a PUBLISH whose topic
                   ends with SUFFIX arrives, as IoT Core does with a publish its policy denies;
                   "pass" (or no file): forward everything.
  --jitter-ms N    hold each client frame 0..N ms before forwarding, in order: the delay rises
                   over each --jitter-period seconds and falls back to 0 at once (delivery
                   jitter of a cellular link; the sawtooth is the hard case for a sender that
                   bursts, since the burst before the fall lands next to the one after it).

Every PUBLISH forwarded to the broker is logged to --log as one JSON line
{"t": epoch seconds, "topic": ..., "bytes": payload length}; a drop as {"t": ..., "dropped": topic}.
The first line, {"ready": true}, says the proxy listens.

Usage: mqtt_proxy.py --port 8444 --target-port 8443 --cafile ca.crt --log FILE [--control FILE]
       [--jitter-ms 200 --jitter-period 2]
"""
import argparse
import asyncio
import json
import ssl
import struct
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--control", default="")
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--jitter-period", type=float, default=2.0)
    args = parser.parse_args()
    started = time.monotonic()
    log = open(args.log, "a", buffering=1)

    def drop_suffix():
        if not args.control:
            return None
        try:
            with open(args.control) as f:
                words = f.read().split()
        except OSError:
            return None
        return words[1] if len(words) == 2 and words[0] == "drop" else None

    def delay():
        if args.jitter_ms <= 0:
            return 0.0
        position = ((time.monotonic() - started) % args.jitter_period) / args.jitter_period
        return args.jitter_ms / 1000.0 * position

    def publishes(buffer):
        """Complete MQTT packets at the start of buffer: (topics and payload sizes of the
        PUBLISH packets, bytes consumed)."""
        found, offset = [], 0
        while offset + 2 <= len(buffer):
            kind = buffer[offset] >> 4
            qos = (buffer[offset] >> 1) & 3
            length, multiplier, index = 0, 1, offset + 1
            while True:
                if index >= len(buffer):
                    return found, offset
                byte = buffer[index]
                length += (byte & 0x7F) * multiplier
                multiplier *= 128
                index += 1
                if byte & 0x80 == 0:
                    break
            end = index + length
            if end > len(buffer):
                return found, offset
            if kind == 3:
                (topic_len,) = struct.unpack(">H", buffer[index:index + 2])
                topic = buffer[index + 2:index + 2 + topic_len].decode("utf-8", "replace")
                header = 2 + topic_len + (2 if qos else 0)
                found.append((topic, length - header))
            offset = end
        return found, offset

    async def read_frame(reader):
        head = await reader.readexactly(2)
        masked = head[1] & 0x80
        length = head[1] & 0x7F
        extra = b""
        if length == 126:
            extra = await reader.readexactly(2)
            (length,) = struct.unpack(">H", extra)
        elif length == 127:
            extra = await reader.readexactly(8)
            (length,) = struct.unpack(">Q", extra)
        mask = await reader.readexactly(4) if masked else b""
        payload = await reader.readexactly(length)
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if masked else payload
        return head + extra + mask + payload, head[0] & 0x0F, data

    async def handle(client_reader, client_writer):
        context = ssl.create_default_context(cafile=args.cafile)
        try:
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", args.target_port, ssl=context, server_hostname="127.0.0.1")
        except OSError:
            client_writer.close()
            return
        queue = asyncio.Queue()

        def close():
            for writer in (client_writer, up_writer):
                try:
                    writer.close()
                except Exception:
                    pass

        async def downstream():
            try:
                while data := await up_reader.read(65536):
                    client_writer.write(data)
                    await client_writer.drain()
            except Exception:
                pass
            close()

        async def forward():
            try:
                while True:
                    at, data, found = await queue.get()
                    wait = at - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    # Logged as it goes out, before the broker can deliver it: a test that
                    # saw a message at the subscriber finds it in this log.
                    for topic, size in found:
                        log.write(json.dumps({"t": time.time(), "topic": topic, "bytes": size}) + "\n")
                    up_writer.write(data)
                    await up_writer.drain()
            except Exception:
                close()

        down = asyncio.ensure_future(downstream())
        forwarder = asyncio.ensure_future(forward())
        last = 0.0
        dropping = False
        try:
            request = await client_reader.readuntil(b"\r\n\r\n")
            await queue.put((0.0, request, []))
            mqtt = b""
            while True:
                raw, opcode, data = await read_frame(client_reader)
                found = []
                if opcode in (0, 2):
                    mqtt += data
                    found, used = publishes(mqtt)
                    mqtt = mqtt[used:]
                suffix = drop_suffix()
                dropped = [t for t, _ in found if suffix and t.endswith(suffix)]
                if dropped:
                    log.write(json.dumps({"t": time.time(), "dropped": dropped[0]}) + "\n")
                    dropping = True
                    break
                last = max(last, time.monotonic() + delay())
                await queue.put((last, raw, found))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        # Let what was queued go out, unless the connection is being dropped on purpose.
        while not dropping and not queue.empty() and not forwarder.done():
            await asyncio.sleep(0.01)
        close()
        forwarder.cancel()
        down.cancel()

    async def serve():
        server = await asyncio.start_server(handle, "127.0.0.1", args.port)
        log.write(json.dumps({"ready": True}) + "\n")
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
