"""benchmarks/packet_split.py: a decode step split by the link emulator's packet trace."""
from __future__ import annotations

import pytest

from benchmarks.packet_split import Message, follow, messages, split

NAMES = {"10.0.0.1": "client", "10.0.0.2": "d0", "10.0.0.3": "d1"}
IP = {name: ip for ip, name in NAMES.items()}
STEP = 1000  # bytes of activations: a step's message is at least this


def packet(sent: float, held: float, src: str, dst: str, payload: int) -> tuple:
    return (sent, sent + held, IP[src], IP[dst], payload)


def one_step(t: float) -> list[tuple]:
    """client -> d0 (two packets) -> d1 -> client, with the off-path and small traffic a real chain has."""
    return [
        packet(t, 0.025, "client", "d0", 1448), packet(t + 0.0001, 0.0252, "client", "d0", 300),
        packet(t + 0.001, 0.025, "client", "d1", 30),  # a window update: too small to be a step
        # d0 got the step at t + 0.0253, pushes at + 0.004 and answers the client after
        packet(t + 0.0293, 0.026, "d0", "d1", 1400),
        packet(t + 0.0300, 0.025, "d0", "client", 1300),
        # d1 got it at t + 0.0553, answers the client (the last hop) at + 0.005
        packet(t + 0.0603, 0.0255, "d1", "client", 1300),
    ]


def test_messages_group_a_writes_packets_and_keep_links_apart() -> None:
    msgs = messages(one_step(10.0), NAMES)
    first = msgs[0]
    assert (first.src, first.dst, first.payload) == ("client", "d0", 1748)
    assert first.sent == 10.0 and first.delivered == pytest.approx(10.0253)
    assert [(m.src, m.dst) for m in msgs] == [("client", "d0"), ("client", "d1"), ("d0", "d1"), ("d0", "client"),
                                              ("d1", "client")]
    # a paced sender (BBR) lets a message's third packet go 0.6 ms after the first two: still one message
    paced = [packet(5.0, 0.025, "d0", "d1", 1448), packet(5.0, 0.025, "d0", "d1", 1448),
             packet(5.0006, 0.025, "d0", "d1", 1300), packet(5.2, 0.025, "d0", "d1", 1448)]
    assert [(m.payload, m.sent) for m in messages(paced, NAMES)] == [(4196, 5.0), (1448, 5.2)]
    # a packet to an address outside the lab, or a bare acknowledgement, is no message
    assert messages([(1.0, 1.1, "10.9.9.9", IP["d0"], 500), (1.0, 1.1, IP["d0"], IP["d1"], 0)], NAMES) == []


def test_a_step_is_followed_along_the_critical_path() -> None:
    by_src: dict[str, list[Message]] = {}
    for m in messages(one_step(10.0), NAMES):
        by_src.setdefault(m.src, []).append(m)
    path = follow(by_src, "client", 9.99, STEP)
    assert path is not None and path.hosts == ["client", "d0", "d1", "client"]
    assert path.legs == pytest.approx([0.0253, 0.026, 0.0255])
    assert path.dwell == pytest.approx([0.004, 0.005])  # d0's push, not its later answer, is the path
    assert path.returned - path.sent == pytest.approx(0.0253 + 0.004 + 0.026 + 0.005 + 0.0255)
    assert follow(by_src, "client", 10.5, STEP) is None  # no step after that


def test_split_takes_medians_over_steps_and_the_clients_dwell_between_them() -> None:
    starts = [10.0, 10.2, 10.4]
    trace = [p for t in starts for p in one_step(t)]
    # the client called into the session 1 ms before each step left and returned 1 ms after its result
    windows = [(t - 0.001, t + 0.0253 + 0.004 + 0.026 + 0.005 + 0.0255 + 0.001) for t in starts]
    result = split(trace, NAMES, "client", [windows], STEP)
    assert result is not None
    assert result.steps == 3 and result.chain == ["client", "d0", "d1", "client"]
    assert result.legs_s == pytest.approx([0.0253, 0.026, 0.0255])
    assert result.dwell_s == pytest.approx({"d0": 0.004, "d1": 0.005})
    assert result.client_s == pytest.approx(0.2 - 0.0858)  # result back to the next step out
    assert result.on_wire_s == pytest.approx(0.0858)
    assert result.unmatched == 0 and result.others == 0
    # A window whose result came back after the call returned is not this step: not counted.
    late = split(trace, NAMES, "client", [[(9.999, 10.05)]], STEP)
    assert late is None


def test_steps_on_another_chain_are_counted_apart() -> None:
    trace = one_step(10.0) + one_step(10.2)
    # a third step skips d1 (d0 is the last hop): client -> d0 -> client
    trace += [packet(10.4, 0.025, "client", "d0", 1448), packet(10.431, 0.025, "d0", "client", 1300)]
    windows = [(9.999, 10.09), (10.199, 10.29), (10.399, 10.46)]
    result = split(trace, NAMES, "client", [windows], STEP)
    assert result is not None and result.steps == 2 and result.others == 1
    assert result.chain == ["client", "d0", "d1", "client"]
