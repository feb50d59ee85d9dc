#!/usr/bin/env python3
"""Counts a device's TCP traffic on one interface, per direction and remote port (stdlib only).

An AF_PACKET socket on --iface sees every frame the interface sends and receives. Each IPv4
TCP packet is counted by direction (up: its source is --local) and by the remote port's name
(--port NAME=PORT, e.g. api=5001 mqtt=8443; anything else is "other"): packets, IP bytes
(the IP header's total length), TCP payload bytes, and SYNs without ACK (connections opened).
Frames that are not IPv4 are counted apart ("non_ip").

It prints "ready" once the socket listens. Every line read from stdin is answered with one
JSON line of the totals since the start (including the kernel's count of frames it dropped
for a full buffer, which should stay 0); end of stdin ends it. benches/wire.rs runs it in
each device's network namespace.

Usage: tcp_payload.py --iface wire0 --local 10.77.0.10 --port api=5001 --port mqtt=8443
"""
import argparse
import json
import os
import select
import socket
import struct
import sys

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
# Headers only: the lengths come from the IP and TCP headers, not from the captured size.
SNAPLEN = 256


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iface", required=True)
    parser.add_argument("--local", required=True)
    parser.add_argument("--port", action="append", default=[], help="NAME=PORT")
    args = parser.parse_args()
    names = {}
    for item in args.port:
        name, port = item.split("=", 1)
        names[int(port)] = name
    local = socket.inet_aton(args.local)

    def zero():
        return {"packets": 0, "ip_bytes": 0, "payload": 0, "syn": 0}

    totals = {
        direction: {name: zero() for name in list(names.values()) + ["other"]}
        for direction in ("up", "down")
    }
    totals["non_ip"] = {"frames": 0, "bytes": 0}
    totals["dropped"] = 0

    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((args.iface, 0))
    sock.setblocking(False)

    def count(frame):
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            totals["non_ip"]["frames"] += 1
            # At most SNAPLEN of each: enough to see that there are any (ARP is 42).
            totals["non_ip"]["bytes"] += len(frame)
            return
        ip = frame[14:]
        header = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        if ip[9] != socket.IPPROTO_TCP or len(ip) < header + 14:
            return
        tcp = ip[header:]
        source_port, dest_port = struct.unpack("!HH", tcp[0:4])
        tcp_header = (tcp[12] >> 4) * 4
        flags = tcp[13]
        up = ip[12:16] == local
        remote = dest_port if up else source_port
        entry = totals["up" if up else "down"][names.get(remote, "other")]
        entry["packets"] += 1
        entry["ip_bytes"] += total
        entry["payload"] += max(0, total - header - tcp_header)
        if flags & 0x02 and not flags & 0x10:
            entry["syn"] += 1

    def drain():
        while True:
            try:
                frame = sock.recv(SNAPLEN)
            except BlockingIOError:
                return
            count(frame)

    def dropped():
        stats = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        # Reading the statistics resets them.
        return struct.unpack("II", stats)[1]

    print("ready", flush=True)
    stdin = sys.stdin.fileno()
    pending = b""
    while True:
        readable, _, _ = select.select([sock, stdin], [], [])
        if sock in readable:
            drain()
        if stdin in readable:
            chunk = os.read(stdin, 4096)
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                _, pending = pending.split(b"\n", 1)
                # Whatever the kernel already queued belongs to this answer.
                drain()
                totals["dropped"] += dropped()
                print(json.dumps(totals), flush=True)


if __name__ == "__main__":
    main()
