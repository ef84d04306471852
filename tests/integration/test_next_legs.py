"""Daemon-measured legs with real daemons: each daemon measures its round trips to the daemons
serving the block after its span and publishes them in its signed record (next_rtts), and the
client reads them into routing (client/routing.py uses them for the daemon-to-daemon legs)."""
from __future__ import annotations

import os
import signal
import time

import pytest

from petals_client import AutoDistributedModelForCausalLM
from petals_client.localswarm import LocalSwarm
from petals_client.routing import choose_route
from petals_protocol.records import MAX_RTT

from swarmlib import DAEMON_ARGS, make_endless_model

pytestmark = pytest.mark.integration


def test_daemons_publish_round_trips_to_the_next_span_and_the_client_reads_them(tmp_path):
    path = make_endless_model(tmp_path)
    swarm = LocalSwarm(path, extra_args=[*DAEMON_ARGS, "--announce-period", "2"],
                       echo=bool(os.environ.get("PETALS_TEST_ECHO")))
    try:
        # The last span first: a daemon learns who serves the block after its span from the swarm's
        # records as it starts, and again only every records period.
        last = swarm.start("4:6", name="last")
        middle = swarm.start("2:4", name="middle", wait=False)
        middle2 = swarm.start("2:4", name="middle2", wait=False)
        swarm.wait_all()
        first = swarm.start("0:2", name="first")
        with AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.addrs) as model:
            deadline = time.monotonic() + 90  # the next daemons are learnt every MEMBERS_PERIOD
            while True:
                model.runtime.call(model.swarm.refresh)
                infos = {s.peer_id: s for s in model.swarm.servers()}
                legs = {peer: dict(info.next_rtts) for peer, info in infos.items()}
                if len(legs.get(first.peer_id, {})) == 2 and all(legs.get(m.peer_id) for m in (middle, middle2)):
                    break
                assert time.monotonic() < deadline, f"no next_rtts published in time: {legs}"
                time.sleep(0.5)
            # Exactly the daemons serving the block after each span; the last span has none.
            assert set(legs[first.peer_id]) == {middle.peer_id, middle2.peer_id}
            assert set(legs[middle.peer_id]) == set(legs[middle2.peer_id]) == {last.peer_id}
            assert legs[last.peer_id] == {}
            for peer_legs in legs.values():
                assert all(0 < rtt < MAX_RTT for rtt in peer_legs.values())
            print(f"\nmeasured legs (s): {legs}")
            route = choose_route(list(infos.values()), 0, 6)
            assert [(h.start, h.end) for h in route] == [(0, 2), (2, 4), (4, 6)]
    finally:
        for daemon in swarm.daemons:
            daemon.signal(signal.SIGKILL)
        swarm.stop()
