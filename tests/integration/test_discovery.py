"""Discovery with real daemons: signed DHT records, routing from one bootstrap address, expiry, placement."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import trio
from transformers import AutoModelForCausalLM

from petals_client import AutoDistributedModelForCausalLM
from petals_client.discovery import join_swarm
from petals_client.localswarm import LocalSwarm
from petals_client.runtime import ClientRuntime
from petals_protocol.models.fingerprint import model_fingerprint
from petals_protocol.p2p.host import make_host, running_host
from petals_protocol.p2p.identity import ephemeral_identity

pytestmark = pytest.mark.integration

# Fast announcements so expiry and rebalancing happen within a test's patience.
FAST = ["--num-threads", "1", "--announce-period", "1", "--record-ttl", "4", "--rebalance-period", "2"]
PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35]])


class Watcher:
    """One long-lived DHT client that looks up the model's daemons on demand (as `petals swarm` does).

    A fresh client per lookup would leave the daemons' routing state full of dead peers."""

    def __init__(self, model_path, bootstrap: str) -> None:
        self.fingerprint = model_fingerprint(model_path)
        holder = {}

        async def main(nursery, stop):
            host = make_host(ephemeral_identity())
            ready = trio.Event()

            async def keep():
                async with running_host(host, ["/ip4/127.0.0.1/tcp/0"]):
                    ready.set()
                    await trio.sleep_forever()

            nursery.start_soon(keep)
            await ready.wait()
            holder["discovery"] = await join_swarm(host, nursery, [bootstrap])

        self.runtime = ClientRuntime(main)
        self.discovery = holder["discovery"]

    def __call__(self) -> list:
        return self.runtime.call(self.discovery.find_servers, self.fingerprint)

    def close(self) -> None:
        self.runtime.close()


@pytest.fixture
def watcher_factory():
    made = []

    def make(model_path, bootstrap):
        made.append(Watcher(model_path, bootstrap))
        return made[-1]

    yield make
    for w in made:
        w.close()


def online_spans(found) -> list[tuple[int, int]]:
    return sorted((s.start, s.end) for s in found if s.state == "online")


def wait_until(predicate, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s (last: {last})")


def test_five_daemons_one_bootstrap_expiry_and_restart(llama_path, watcher_factory):
    with LocalSwarm(llama_path, extra_args=FAST) as swarm:
        boot = swarm.start("0:2", initial_peers=[])
        find_servers = watcher_factory(llama_path, boot.addrs[0])
        spans = ["2:4", "4:6", "0:3", "3:6"]
        for s in spans:
            swarm.start(s, initial_peers=boot.addrs, wait=False)
        swarm.wait_all()
        everyone = sorted([(0, 2), (2, 4), (4, 6), (0, 3), (3, 6)])
        wait_until(lambda: online_spans(find_servers()) == everyone, 30)

        # a client that knows only the bootstrap address finds a route and generates exactly
        begin = time.perf_counter()
        model = AutoDistributedModelForCausalLM.from_pretrained(llama_path, initial_peers=boot.addrs)
        found_in = time.perf_counter() - begin
        try:
            assert len(model.swarm.servers()) == 5, model.swarm.servers()
            ref = AutoModelForCausalLM.from_pretrained(llama_path).generate(PROMPT, max_new_tokens=12, do_sample=False)
            assert model.generate(PROMPT, max_new_tokens=12, do_sample=False).tolist() == ref.tolist()
        finally:
            model.close()
        print(f"\nfresh client: from_pretrained (DHT join + lookup + probes) took {found_in:.2f} s")

        # a SIGKILLed daemon (no OFFLINE announcement) vanishes once its record expires (ttl 4 s)
        victim = swarm.daemons[2]  # serves 4:6
        victim.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: (4, 6) not in online_spans(find_servers()), 15)
        assert time.monotonic() - killed_at <= 4 + 6  # ttl plus one lookup's slack

        # restarting with the same identity and a new span is seen with the new span
        again = swarm.start("1:5", initial_peers=boot.addrs, name=victim.name)
        assert again.peer_id == victim.peer_id
        wait_until(lambda: (1, 5) in online_spans(find_servers()), 15)
        mine = [s for s in find_servers() if s.peer_id == again.peer_id]
        assert [(s.start, s.end, s.state) for s in mine] == [(1, 5, "online")]


def test_graceful_stop_announces_offline(llama_path, watcher_factory):
    with LocalSwarm(llama_path, extra_args=FAST + ["--record-ttl", "60", "--announce-period", "20"]) as swarm:
        boot = swarm.start("0:3", initial_peers=[])
        find_servers = watcher_factory(llama_path, boot.addrs[0])
        other = swarm.start("3:6", initial_peers=boot.addrs)
        wait_until(lambda: online_spans(find_servers()) == [(0, 3), (3, 6)], 20)
        assert other.stop() == 0
        # with a 60 s ttl only the OFFLINE record can make it disappear this fast
        wait_until(lambda: online_spans(find_servers()) == [(0, 3)], 10)


def test_num_blocks_cover_the_model_and_recover_a_departure(tmp_path, watcher_factory):
    from petals_protocol.models.synthetic import make_random_checkpoint

    path = make_random_checkpoint(tmp_path / "m12", "llama", num_layers=12, hidden_size=32, num_heads=2,
                                  vocab_size=64, seed=5)
    with LocalSwarm(path, extra_args=FAST, echo=bool(os.environ.get("PETALS_TEST_ECHO"))) as swarm:
        boot = swarm.start(None, initial_peers=[], args=["--num-blocks", "4"])
        find_servers = watcher_factory(path, boot.addrs[0])
        for _ in range(3):  # one after another, as volunteers arrive
            swarm.start(None, initial_peers=boot.addrs, args=["--num-blocks", "4"])

        def coverage():
            spans = online_spans(find_servers())
            covered = {b for a, e in spans for b in range(a, e)}
            return spans if covered == set(range(12)) else None

        spans = wait_until(coverage, 30)
        assert len(spans) == 4
        # stop a daemon that is the only one serving its blocks; the redundant one moves there
        by_span = {}
        for d in swarm.daemons:
            status = [s for s in find_servers() if s.peer_id == d.peer_id][0]
            by_span.setdefault((status.start, status.end), []).append(d)
        sole = next(ds[0] for span, ds in by_span.items() if len(ds) == 1 and ds[0] is not boot)
        sole.stop()
        left_at = time.monotonic()
        wait_until(coverage, 40)
        print(f"\nre-covered the departed daemon's blocks in {time.monotonic() - left_at:.1f} s")
