"""`petals swarm` and `petals serve` in a members-only swarm, as real processes over real daemons:
with --identity / --swarm-owner / --member-certificate a member lists the swarm and serves the
OpenAI API in it (the completion equals local transformers' greedy text); without a certificate
`petals swarm` is refused with a one-line error naming the swarm."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatmodel import make_chat_model
from petals_client.localswarm import LocalSwarm
from servelib import ServeProcess
from swarmlib import DAEMON_ARGS
from test_membership import _certify, _peer

pytestmark = pytest.mark.integration


def _petals(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "petals_client.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_swarm_and_serve_as_a_member(tmp_path: Path) -> None:
    model = make_chat_model(tmp_path / "tiny-chat")
    owner_key = tmp_path / "owner.key"
    owner = _peer(owner_key)
    work = tmp_path / "swarm"
    work.mkdir()
    for name in ("d1", "client"):
        _certify(owner_key, work / f"{name}.key", work / f"{name}.cert")
    member = ["--identity", str(work / "client.key"), "--swarm-owner", owner,
              "--member-certificate", str(work / "client.cert")]
    with LocalSwarm(model, workdir=work, extra_args=DAEMON_ARGS) as swarm:
        d1 = swarm.start("0:6", args=["--swarm-owner", owner, "--member-certificate", str(work / "d1.cert")])

        listed = _petals("swarm", "--model", str(model), "--initial-peers", *d1.addrs, "--json", *member)
        assert listed.returncode == 0, listed.stderr
        document = json.loads(listed.stdout)
        assert [s["peer_id"] for s in document["servers"]] == [d1.peer_id] and document["complete"]

        refused = _petals("swarm", "--model", str(model), "--initial-peers", *d1.addrs)
        print("petals swarm without a certificate:", refused.stderr)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        first = refused.stderr.splitlines()[0]
        assert first.startswith("petals: error:") and f"members-only swarm (owner {owner})" in first, refused.stderr
        # A certificate that is not for --identity's peer id is refused before joining, saying why.
        wrong = _petals("swarm", "--model", str(model), "--initial-peers", *d1.addrs, "--identity",
                        str(work / "other.key"), "--swarm-owner", owner, "--member-certificate", str(work / "client.cert"))
        assert wrong.returncode == 1 and "the certificate is for peer" in wrong.stderr.splitlines()[0], wrong.stderr

        server = ServeProcess(model, d1.addrs, ["--max-concurrent", "1", *member])
        try:
            client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)
            reply = client.completions.create(model=model.name, prompt="Hello, how are you", max_tokens=8,
                                              temperature=0)
        finally:
            server.stop()
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer.encode("Hello, how are you")
    local = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        out = local.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert reply.choices[0].text == tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
