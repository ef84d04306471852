"""A petals_protocol.p2p peer in its own process, for the p2p tests (run: python peer_main.py).

Prints "ready <full multiaddr>" on stdout once it listens, then serves until killed or until its
stdin closes. Protocols (all use FramedStream unless noted):
  /petals-test/echo/1      echo every frame back unchanged
  /petals-test/sleepy/1    do not consume for SLEEP seconds (the pump keeps draining), then echo
  /petals-test/small/1     echo, but with a 1 KiB max frame size (a larger frame is refused)
  /petals-test/close/1     answer one frame, then close the stream cleanly
  /petals-test/oversize/1  raw: write a frame header announcing 2**31 bytes, then wait
"""

from __future__ import annotations

import argparse
import struct
import sys

import trio
from libp2p.abc import INetStream

from petals_protocol.errors import FrameTooLarge
from petals_protocol.p2p.host import make_host, listen_multiaddrs, quiet_libp2p_logs, running_host
from petals_protocol.p2p.identity import ephemeral_identity
from petals_protocol.p2p.streams import FramedStream, StreamClosed, open_framed

ECHO = "/petals-test/echo/1"
SLEEPY = "/petals-test/sleepy/1"
SMALL = "/petals-test/small/1"
CLOSE = "/petals-test/close/1"
OVERSIZE = "/petals-test/oversize/1"
SMALL_MAX_FRAME = 1024
SLEEP = 7.0  # longer than yamux's hard-coded 5 s window-update wait (bug 2)


async def _echo_frames(framed: FramedStream) -> None:
    try:
        async for payload in framed.frames():
            await framed.send_frame(payload)
    except StreamClosed:
        return  # reset or connection lost: nothing to answer


async def handle_echo(stream: INetStream) -> None:
    async with open_framed(stream) as framed:
        await _echo_frames(framed)


async def handle_sleepy(stream: INetStream) -> None:
    async with open_framed(stream) as framed:
        await trio.sleep(SLEEP)
        await _echo_frames(framed)


async def handle_small(stream: INetStream) -> None:
    async with open_framed(stream, max_frame_size=SMALL_MAX_FRAME) as framed:
        try:
            await _echo_frames(framed)
        except FrameTooLarge:
            return  # the pump already reset the stream; the client sees it


async def handle_close(stream: INetStream) -> None:
    async with open_framed(stream) as framed:
        await framed.send_frame(await framed.receive_frame())


async def handle_oversize(stream: INetStream) -> None:
    await stream.write(struct.pack(">I", 2**31) + b"x" * 16)
    await trio.sleep(30)


async def main(psk_hex: str | None) -> None:
    quiet_libp2p_logs()
    host = make_host(ephemeral_identity(), psk=bytes.fromhex(psk_hex) if psk_hex else None)
    for protocol, handler in (
        (ECHO, handle_echo),
        (SLEEPY, handle_sleepy),
        (SMALL, handle_small),
        (CLOSE, handle_close),
        (OVERSIZE, handle_oversize),
    ):
        host.set_stream_handler(protocol, handler)
    async with running_host(host, ["/ip4/127.0.0.1/tcp/0"]):
        print("ready", listen_multiaddrs(host)[0], flush=True)
        # Serve until the test closes our stdin (or kills us).
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--psk-hex")
    trio.run(main, parser.parse_args().psk_hex)
