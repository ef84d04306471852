"""`petals chat`: each reply is what local transformers generates from the chat template's rendering,
and the turns share one inference session while the rendering only grows."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_client import AutoDistributedModelForCausalLM
from petals_client.chat import chat_loop
from petals_client.demo.run import DEFAULT_MODEL
from petals_client.tokenizer import load_tokenizer

pytestmark = pytest.mark.integration

TEMPLATE = ("{% for m in messages %}<s>{{ m.role }}: {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant: {% endif %}")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """The demo model with a chat template added to its (standard) tokenizer files."""
    path = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(DEFAULT_MODEL, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return path


def test_chat_replies_equal_local_generation_in_one_session(chat_model, swarm_factory, monkeypatch):
    swarm = swarm_factory(chat_model, ["0:3", "3:6"])
    tokenizer = load_tokenizer(chat_model)
    local = AutoModelForCausalLM.from_pretrained(chat_model)
    with AutoDistributedModelForCausalLM.from_pretrained(chat_model, initial_peers=swarm.addrs) as lm:
        opened = []
        original = lm.inference_session
        monkeypatch.setattr(lm, "inference_session", lambda **kw: opened.append(kw) or original(**kw))
        out = io.StringIO()
        messages = chat_loop(lm, tokenizer, ["Beautiful is", "", "Simple is"], out, system="Zen",
                             max_length=512, max_new_tokens=12)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert len(opened) == 1  # the second turn extended the first one's session
    for turn in (3, 5):
        ids = torch.tensor([tokenizer.chat(messages[:turn - 1])])
        ref = local.generate(ids, max_new_tokens=12, do_sample=False)
        assert messages[turn - 1]["content"] == tokenizer.decode(ref[0, ids.shape[1]:].tolist())
        assert messages[turn - 1]["content"] in out.getvalue()
    assert messages[2]["content"]  # the model said something


def test_chat_command_and_a_model_without_template(chat_model, swarm_factory):
    swarm = swarm_factory(chat_model, ["0:6"])
    command = [sys.executable, "-m", "petals_client.cli", "chat", "--model", str(chat_model),
               "--initial-peers", *swarm.addrs, "--max-new-tokens", "6"]
    result = subprocess.run(command, input="Beautiful is\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("> ") and result.stdout.count("> ") == 2
    plain = subprocess.run([*command[:5], str(DEFAULT_MODEL), *command[6:]], input="hi\n", capture_output=True,
                           text=True, timeout=120)
    assert plain.returncode != 0 and "no chat template" in plain.stderr
