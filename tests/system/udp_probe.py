"""Probe packets for tests/system/test_wan.py, run inside the lab's namespaces.

    python udp_probe.py recv PORT COUNT TIMEOUT     # prints one JSON line: [[seq, one-way s], ...]
    python udp_probe.py send IP PORT COUNT GAP SIZE  # COUNT packets of SIZE bytes, GAP s apart

Every namespace shares the machine's monotonic clock, so the receiver subtracts the sender's
stamp from its own and gets the one-way delay itself, not half a round trip.
"""
from __future__ import annotations

import json
import socket
import struct
import sys
import time

HEADER = struct.Struct("!Id")


def recv(port: int, count: int, timeout: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    print("listening", flush=True)
    got: list[list[float]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        now = time.monotonic()
        seq, sent = HEADER.unpack_from(data)
        got.append([seq, now - sent])
    print(json.dumps(got), flush=True)


def send(ip: str, port: int, count: int, gap: float, size: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    padding = b"\0" * max(0, size - HEADER.size)
    began = time.monotonic()
    for seq in range(count):
        while time.monotonic() < began + seq * gap:
            time.sleep(min(0.001, gap))
        sock.sendto(HEADER.pack(seq, time.monotonic()) + padding, (ip, port))


if __name__ == "__main__":
    if sys.argv[1] == "recv":
        recv(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]))
