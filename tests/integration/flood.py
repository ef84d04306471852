"""A flooding peer, as its own process (its CPU and GIL apart from the test's honest client).

`python flood.py ADDR MODE STREAMS`: open STREAMS inference streams to the daemon at ADDR and
write to each as fast as it takes, re-opening a stream whenever the daemon ends it, until killed.
Prints "flooding" once every stream is open, and the bytes written on exit (SIGTERM).

Modes:
- `big`: frames announcing 16 MiB (a tensor-carrying "step" tag, the rest random bytes);
- `random`: random bytes, no framing at all (about 1% of random 4-byte headers announce a frame
  under 64 MiB).
"""
from __future__ import annotations

import os
import signal
import struct
import sys

import trio

from petals_protocol.errors import PetalsError
from petals_protocol.ids import INFERENCE_PROTOCOL
from petals_protocol.p2p.streams import StreamOpenError

from rawclient import RawClient, pack, raw_client

FRAME = 16 * 2**20
CHUNK = 256 * 1024


def _big_frame() -> bytes:
    start = pack({"t": "step", "session_id": os.urandom(16)})
    body = start + os.urandom(FRAME - len(start))
    return struct.pack(">I", FRAME) + body


async def _flood_one(client: RawClient, addr: str, mode: str, opened: trio.Event, sent: list[int]) -> None:
    first = True
    payload = _big_frame() if mode == "big" else os.urandom(FRAME)
    while True:
        try:
            stream = await client.open(addr, INFERENCE_PROTOCOL)
        except (StreamOpenError, PetalsError):
            await trio.sleep(0.05)  # refused (busy): try again soon
            continue
        if first:
            opened.set()
            first = False
        try:
            for at in range(0, len(payload), CHUNK):
                await stream.stream.write(payload[at:at + CHUNK])
                sent[0] += CHUNK
        except Exception:  # noqa: BLE001 - the daemon ended the stream: open another
            pass
        try:
            await stream.reset()
        except PetalsError:
            pass


async def main(addr: str, mode: str, streams: int) -> None:
    sent = [0]
    async with raw_client() as client:
        events = [trio.Event() for _ in range(streams)]
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                for event in events:
                    nursery.start_soon(_flood_one, client, addr, mode, event, sent)
                for event in events:
                    await event.wait()
                print("flooding", flush=True)
                async for _ in signals:
                    print(f"sent {sent[0]}", flush=True)
                    nursery.cancel_scope.cancel()
                    break


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
