"""LoRA adapters on daemons (`--adapters`) equal the same adapter merged into a local model."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from petals_client import AutoDistributedModelForCausalLM
from petals_client.localswarm import LocalSwarm
from swarmlib import DAEMON_ARGS, start_swarm

pytestmark = pytest.mark.integration

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
RANK, ALPHA = 4, 8
TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def write_lora(folder: Path, model: torch.nn.Module, *, seed: int, in_features: int | None = None) -> Path:
    """A LoRA adapter in PEFT's file layout (adapter_config.json + adapter_model.safetensors), for
    every block's TARGETS of `model`; `in_features` overrides the A matrices' width (a misfit)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for index in range(model.config.num_hidden_layers):
        for target in TARGETS:
            layer = model.get_submodule(f"model.layers.{index}.{target}")
            key = f"base_model.model.model.layers.{index}.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, in_features or layer.in_features, generator=generator) * 0.2
            tensors[f"{key}.lora_B.weight"] = torch.randn(layer.out_features, RANK, generator=generator) * 0.2
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
        "target_modules": [t.rsplit(".", 1)[1] for t in TARGETS], "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "base_model_name_or_path": "synthetic-llama",
    }))
    return folder


def merged(path: Path, adapter: Path) -> torch.nn.Module:
    """The local model with the adapter merged into its weights: W + (alpha / r) B A."""
    from safetensors.torch import load_file

    model = AutoModelForCausalLM.from_pretrained(path)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." in key:
                b = tensors[key.replace(".lora_A.", ".lora_B.")]
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                model.get_submodule(module).weight += (ALPHA / RANK) * b @ a
    return model


@pytest.fixture(scope="module")
def adapters(llama_path, tmp_path_factory):
    base = AutoModelForCausalLM.from_pretrained(llama_path)
    root = tmp_path_factory.mktemp("adapters")
    return write_lora(root / "style-a", base, seed=1), write_lora(root / "style-b", base, seed=2)


@pytest.fixture(scope="module")
def adapter_swarm(llama_path, adapters):
    swarm = start_swarm(llama_path, ["0:2", "2:4", "4:6"], ["--adapters", *map(str, adapters)])
    yield swarm
    swarm.stop()


@pytest.mark.parametrize("name", ["style-a", "style-b"])
def test_adapter_equals_the_merged_local_model(llama_path, adapters, adapter_swarm, name):
    folder = next(a for a in adapters if a.name == name)
    ref = merged(llama_path, folder)
    with AutoDistributedModelForCausalLM.from_pretrained(llama_path, initial_peers=adapter_swarm.addrs,
                                                         active_adapter=name) as model:
        expected = ref.generate(IDS, max_new_tokens=12, do_sample=False)
        assert model.generate(IDS, max_new_tokens=12, do_sample=False).tolist() == expected.tolist()
        x_ref = ref.get_input_embeddings()(IDS).detach().requires_grad_(True)
        out_ref = ref(inputs_embeds=x_ref, labels=IDS)
        out_ref.loss.backward()
        x = model.get_input_embeddings()(IDS).detach().requires_grad_(True)
        out = model(inputs_embeds=x, labels=IDS)
        out.loss.backward()
        assert (out.logits - out_ref.logits).abs().max().item() <= 1e-5
        assert (x.grad - x_ref.grad).abs().max().item() <= 1e-5


def test_without_an_adapter_the_daemons_serve_the_base_model(llama_path, adapter_swarm):
    ref = AutoModelForCausalLM.from_pretrained(llama_path)
    with AutoDistributedModelForCausalLM.from_pretrained(llama_path, initial_peers=adapter_swarm.addrs) as model:
        assert all(s.adapters == ("style-a", "style-b") for s in model.swarm.servers())
        expected = ref.generate(IDS, max_new_tokens=12, do_sample=False)
        assert model.generate(IDS, max_new_tokens=12, do_sample=False).tolist() == expected.tolist()
        with pytest.raises(ValueError, match="no daemon of this swarm serves adapter 'nope'"):
            AutoDistributedModelForCausalLM.from_pretrained(llama_path, initial_peers=adapter_swarm.addrs,
                                                            active_adapter="nope")


def test_an_adapter_that_does_not_fit_is_refused_at_start(llama_path, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(llama_path)
    bad = write_lora(tmp_path / "other-model", base, seed=3, in_features=32)
    swarm = LocalSwarm(llama_path, extra_args=DAEMON_ARGS + ["--adapters", str(bad)])
    try:
        daemon = swarm.start("0:2", wait=False)
        assert daemon.process.wait(120) == 1
        daemon.ready.wait(10)  # the stderr reader has seen the end
        fatal = [line for line in daemon.log if "petalsd: fatal:" in line]
        assert fatal, "\n".join(daemon.log)
        assert "other-model" in fatal[0] and "model.layers.0.mlp.down_proj" in fatal[0] \
            and "needs [4, " in fatal[0], fatal[0]
    finally:
        swarm.stop()


def test_hub_adapters_and_unsupported_adapters_at_load(llama_path, adapters, tmp_path, monkeypatch):
    from petals_protocol.models.checkpoint import Checkpoint
    from petals_protocol.models.synthetic import write_hub_cache
    from petalsd.adapters import AdapterError, load_adapters

    config = Checkpoint(llama_path).config
    folder = adapters[0]
    write_hub_cache(tmp_path / "hf", "petals-test/style-a", folder,
                    ["adapter_config.json", "adapter_model.safetensors"], commit="3" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (hub,) = load_adapters(["petals-test/style-a"], config)
    (local,) = load_adapters([str(folder)], config)
    assert hub.name == "petals-test/style-a" and local.name == "style-a"
    assert hub.weights.keys() == local.weights.keys()
    assert all(torch.equal(hub.weights[k][1], local.weights[k][1]) for k in hub.weights)
    with pytest.raises(AdapterError, match="no such folder, and as a Hub id"):
        load_adapters(["petals-test/missing"], config)

    def variant(name: str, settings: dict | None = None, extra: dict | None = None) -> str:
        target = tmp_path / name
        target.mkdir()
        base = json.loads((folder / "adapter_config.json").read_text())
        (target / "adapter_config.json").write_text(json.dumps({**base, **(settings or {})}))
        from safetensors.torch import load_file
        save_file({**load_file(str(folder / "adapter_model.safetensors")), **(extra or {})},
                  str(target / "adapter_model.safetensors"))
        return str(target)

    head = {"base_model.model.lm_head.lora_A.weight": torch.zeros(RANK, 64),
            "base_model.model.lm_head.lora_B.weight": torch.zeros(128, RANK)}
    cases = [
        (variant("with-bias", {"bias": "lora_only"}), "bias='lora_only' is not supported"),
        (variant("dora", {"use_dora": True}), "DoRA is not supported"),
        (variant("head", extra=head), "lm_head is not in a transformer block"),
        (variant("prefix", {"peft_type": "PREFIX_TUNING"}), "only LORA adapters"),
    ]
    for path, words in cases:
        with pytest.raises(AdapterError, match=re.escape(words)):
            load_adapters([path], config)
    with pytest.raises(AdapterError, match="two adapters are named 'style-a'"):
        load_adapters([str(folder), str(folder)], config)


def test_spot_checks_use_only_daemons_serving_the_adapter(llama_path, adapters):
    """A session with an adapter at R=1.0 is checked by the other daemon serving that adapter (the
    tokens equal the merged model's); a daemon without the adapter never checks it: with only that
    one left, R=1.0 is refused naming the adapter, and a lower rate (0.9: all six steps unchosen has
    odds of one in a million) skips the check."""
    from petals_client.spotcheck import SpotCheckUnavailable

    folder = adapters[0]
    expected = merged(llama_path, folder).generate(IDS, max_new_tokens=6, do_sample=False)
    swarm = LocalSwarm(llama_path, extra_args=DAEMON_ARGS)
    with swarm:
        with_adapter = [swarm.start("0:6", name=f"a{i}", args=["--adapters", str(folder)], wait=i == 1) for i in (1, 2)]
        plain = swarm.start("0:6", name="plain", args=["--throughput", "1000"], wait=False)
        swarm.wait_all()  # a2 and plain join through a1 together
        options = dict(active_adapter=folder.name, use_dht=False)
        with AutoDistributedModelForCausalLM.from_pretrained(llama_path, initial_peers=swarm.addrs,
                                                             spot_check_rate=1.0, **options) as model:
            assert model.generate(IDS, max_new_tokens=6, do_sample=False).tolist() == expected.tolist()
            stats = model.spot_checks
            assert stats.checked == 6 and stats.disagreements == 0 and stats.unchecked == 0
        alone = [with_adapter[0].peer_id, plain.peer_id]  # the plain daemon serves the blocks, not the adapter
        with AutoDistributedModelForCausalLM.from_pretrained(llama_path, initial_peers=swarm.addrs, allowed_peers=alone,
                                                             spot_check_rate=1.0, **options) as model:
            with pytest.raises(SpotCheckUnavailable, match=f"blocks 0:6 with adapter '{folder.name}'"):
                model.generate(IDS, max_new_tokens=2, do_sample=False)
        with AutoDistributedModelForCausalLM.from_pretrained(llama_path, initial_peers=swarm.addrs, allowed_peers=alone,
                                                             spot_check_rate=0.9, **options) as model:
            assert model.generate(IDS, max_new_tokens=6, do_sample=False).tolist() == expected.tolist()
            assert model.spot_checks.checked == 0 and model.spot_checks.unchecked > 0
