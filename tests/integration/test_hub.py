"""Hub model ids with partial downloads: nobody holds the whole model.

Every party gets its own Hugging Face cache (HF_HOME in a temp dir, HF_HUB_OFFLINE=1) holding only
the small json files and the shards of its own tensors; the swarm still generates exactly what the
full local model does, and the fingerprint binds everyone to the same commit.
"""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from fakehub import COMMIT, OTHER_COMMIT, REPO_ID, add_files, offline_env, repo_dir
from petals_client import AutoDistributedModelForCausalLM
from petals_client.cli import main as cli_main
from petals_client.localswarm import DaemonStartError, LocalSwarm
from petals_client.routing import NoRoute
from petals_protocol.models.checkpoint import MANIFEST_FILE, Checkpoint
from petals_protocol.models.fingerprint import model_fingerprint, write_manifest
from petals_protocol.models.source import ModelLoadError
from petals_protocol.models.span import load_span, span_shards
from swarmlib import DAEMON_ARGS, make_model

pytestmark = pytest.mark.integration

PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    """A sharded checkpoint whose shards split the blocks (9 shards over 6 blocks and the ends)."""
    return make_model(tmp_path_factory.mktemp("hubmodel"), "llama", shards=8)


def client_shards(checkpoint: Checkpoint) -> set[str]:
    names = [n for n in checkpoint.tensor_names() if not n.startswith("model.layers.")]
    return checkpoint.shards_of(names)


@pytest.fixture
def offline(monkeypatch):
    """Point this process's Hub cache at `home` (the client's), offline."""
    def use(home: Path) -> None:
        for key, value in offline_env(home).items():
            monkeypatch.setenv(key, value)
    return use


def test_partial_hub_caches_generate_exactly(full, tmp_path, offline):
    checkpoint = Checkpoint(full)
    spans = {"a": (0, 3), "b": (3, 6)}
    homes = {name: tmp_path / name for name in ("a", "b", "client")}
    needed = {name: span_shards(checkpoint, *span) for name, span in spans.items()}
    needed["client"] = client_shards(checkpoint)
    for name, shards in needed.items():
        assert shards < set(checkpoint.shard_names()), name  # nobody holds the whole model
        add_files(homes[name], full, shards)
    offline(homes["client"])
    with LocalSwarm(REPO_ID, extra_args=DAEMON_ARGS) as swarm:
        first = swarm.start("0:3", env=offline_env(homes["a"]))
        swarm.start("3:6", initial_peers=first.addrs, env=offline_env(homes["b"]))
        for daemon, name in zip(swarm.daemons, ("a", "b")):
            fetched = {line.split("file=")[1].split()[0] for line in daemon.log if "fetched and checked" in line}
            assert fetched == needed[name]
        with AutoDistributedModelForCausalLM.from_pretrained(REPO_ID, initial_peers=swarm.addrs) as model:
            out = model.generate(PROMPT, max_new_tokens=16, do_sample=False)
            as_dict = model.generate(PROMPT, generation_config=GenerationConfig(max_new_tokens=16, do_sample=False),
                                     return_dict_in_generate=True, output_scores=True)
            forward = model(PROMPT, labels=PROMPT)
    ref_model = AutoModelForCausalLM.from_pretrained(full)
    ref = ref_model.generate(PROMPT, max_new_tokens=16, do_sample=False)
    assert out.tolist() == ref.tolist() == as_dict.sequences.tolist()
    assert len(as_dict.scores) == 16 and as_dict.scores[0].shape == (1, ref_model.config.vocab_size)
    with torch.no_grad():
        expected = ref_model(PROMPT, labels=PROMPT)
    assert torch.allclose(forward.logits, expected.logits, atol=1e-5)
    assert abs(forward.loss.item() - expected.loss.item()) <= 1e-5
    # the client's cache still holds only its own shards: nothing else was fetched
    snapshot = repo_dir(homes["client"]) / "snapshots" / COMMIT
    assert {p.name for p in snapshot.glob("*.safetensors")} == needed["client"]


def test_fingerprint_of_any_subset_is_the_full_ones(full, tmp_path, offline, monkeypatch):
    checkpoint = Checkpoint(full)
    shards = checkpoint.shard_names()
    # Hub: every subset of one commit gives one value; another commit another
    fingerprints = set()
    for i, subset in enumerate([shards[:1], shards[3:5], shards]):
        home = tmp_path / f"h{i}"
        add_files(home, full, subset)
        offline(home)
        fingerprints.add(model_fingerprint(REPO_ID))
    assert len(fingerprints) == 1
    add_files(tmp_path / "h0", full, shards[:1], commit=OTHER_COMMIT, ref="v2")
    offline(tmp_path / "h0")
    assert model_fingerprint(Checkpoint(REPO_ID, revision="v2")) not in fingerprints
    assert model_fingerprint(Checkpoint(REPO_ID, revision=COMMIT)) in fingerprints

    # local: a partial copy with the full copy's manifest has the full copy's fingerprint
    local = model_fingerprint(full)
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "model.safetensors.index.json", shards[2]):
        (partial / name).write_bytes((full / name).read_bytes())
    with pytest.raises(ModelLoadError, match="shards are missing"):
        model_fingerprint(partial)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cli_main(["manifest", str(full)]) == 0  # `petals manifest FOLDER`
    manifest = full / MANIFEST_FILE
    try:
        with pytest.raises(ModelLoadError, match="exists already"):
            write_manifest(full)
        (partial / MANIFEST_FILE).write_bytes(manifest.read_bytes())
        assert model_fingerprint(full) == local  # the manifest does not change the value
        assert model_fingerprint(partial) == local
        # a Hub repo carrying the manifest has the content fingerprint too, from any subset
        home = tmp_path / "with-manifest"
        add_files(home, full, [shards[0], MANIFEST_FILE])
        offline(home)
        assert model_fingerprint(REPO_ID) == local
    finally:
        manifest.unlink()


def flip_a_weight_byte(path: Path) -> None:
    """Change one byte of tensor data (past the safetensors header), in place."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 5] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_shard_that_differs_from_its_claim_is_refused(full, tmp_path, offline):
    checkpoint = Checkpoint(full)
    shard = sorted(span_shards(checkpoint, 0, 2))[-1]
    # Hub: the blob no longer has the SHA-256 the Hub gave for it
    home = tmp_path / "hub"
    snapshot = add_files(home, full, span_shards(checkpoint, 0, 2))
    flip_a_weight_byte((snapshot / shard).resolve())
    offline(home)
    with pytest.raises(ModelLoadError, match=f"{shard} has SHA-256 .* but commit {COMMIT} gives"):
        load_span(Checkpoint(REPO_ID), 0, 2)
    # a daemon refuses to start on it, saying why
    with pytest.raises(DaemonStartError, match="SHA-256"):
        with LocalSwarm(REPO_ID, extra_args=DAEMON_ARGS, ready_timeout=60) as swarm:
            swarm.start("0:2", env=offline_env(home))
    # local: a partial copy whose shard differs from the manifest
    partial = tmp_path / "partial"
    partial.mkdir()
    manifest = write_manifest(full)
    try:
        for name in ("config.json", "model.safetensors.index.json", MANIFEST_FILE, *span_shards(checkpoint, 0, 2)):
            (partial / name).write_bytes((full / name).read_bytes())
    finally:
        manifest.unlink()
    flip_a_weight_byte(partial / shard)
    with pytest.raises(ModelLoadError, match=f"{shard} does not match {MANIFEST_FILE}"):
        load_span(partial, 0, 2)


def test_num_blocks_on_a_partial_cache_fetches_only_the_chosen_shards(full, tmp_path):
    checkpoint = Checkpoint(full)
    chosen = span_shards(checkpoint, 0, 2)  # the first daemon of a new swarm takes the first blocks
    home = tmp_path / "hub"
    add_files(home, full, chosen)
    with LocalSwarm(REPO_ID, extra_args=DAEMON_ARGS) as swarm:
        daemon = swarm.start(None, args=["--num-blocks", "2"], env=offline_env(home))
        fetched = {line.split("file=")[1].split()[0] for line in daemon.log if "fetched and checked" in line}
        assert fetched == chosen
        assert any("blocks=0:2" in line for line in daemon.log if "ready" in line)


def test_max_disk_space_evicts_shards_of_blocks_not_served(full, tmp_path):
    checkpoint = Checkpoint(full)
    home = tmp_path / "hub"
    snapshot = add_files(home, full, checkpoint.shard_names())  # a full cache, e.g. from an earlier span
    keep = span_shards(checkpoint, 4, 6)
    with LocalSwarm(REPO_ID, extra_args=DAEMON_ARGS) as swarm:
        swarm.start("4:6", args=["--max-disk-space", "1"], env=offline_env(home))
        left = {p.name for p in snapshot.glob("*.safetensors")}
        assert left == keep  # everything else deleted; what is served is never deleted
        blobs = sum(p.stat().st_size for p in (repo_dir(home) / "blobs").iterdir() if p.stat().st_size > 10_000)
        assert blobs == sum((full / f).stat().st_size for f in keep)


def test_records_of_another_commit_are_not_routed_to(full, tmp_path, offline):
    home = tmp_path / "hub"
    shards = Checkpoint(full).shard_names()
    add_files(home, full, shards)  # same files at two commits: still two models for the swarm
    add_files(home, full, shards, commit=OTHER_COMMIT, ref=None)
    offline(home)
    with LocalSwarm(REPO_ID, extra_args=DAEMON_ARGS) as swarm:
        swarm.start("0:6", args=["--revision", OTHER_COMMIT], env=offline_env(home))
        with pytest.raises(NoRoute):
            AutoDistributedModelForCausalLM.from_pretrained(REPO_ID, initial_peers=swarm.addrs, connect_timeout=5)
        with AutoDistributedModelForCausalLM.from_pretrained(REPO_ID, initial_peers=swarm.addrs,
                                                             revision=OTHER_COMMIT) as model:
            ref = AutoModelForCausalLM.from_pretrained(full).generate(PROMPT, max_new_tokens=4, do_sample=False)
            assert model.generate(PROMPT, max_new_tokens=4, do_sample=False).tolist() == ref.tolist()


def test_unknown_models_and_files_are_named(full, tmp_path, offline):
    home = tmp_path / "hub"
    add_files(home, full, [])
    offline(home)
    with pytest.raises(ModelLoadError, match="no such local folder, and as a Hub model id: config.json .* not in the "
                                             "local Hugging Face cache and HF_HUB_OFFLINE is set"):
        Checkpoint("petals-test/absent")
    with pytest.raises(ModelLoadError, match="revision 'v1' is for Hub models"):
        Checkpoint(full, revision="v1")
    with pytest.raises(ModelLoadError, match="not a directory"):
        Checkpoint(tmp_path / "nope")
    checkpoint = Checkpoint(REPO_ID)  # only json files cached: opening works, loading a shard says what is missing
    shard = checkpoint.shard_names()[0]
    with pytest.raises(ModelLoadError, match=f"{shard} .* not in the local Hugging Face cache"):
        load_span(checkpoint, 0, 1)


@pytest.fixture
def unfrozen_after():
    """Daemon.load settles the heap (gc.freeze) of the process it runs in, here pytest's own."""
    yield
    gc.unfreeze()


def test_moving_to_other_blocks_fetches_them_and_evicts_the_old_ones(full, tmp_path, offline, unfrozen_after):
    """What a rebalancing move does (Daemon.load, before the new span is announced): the new span's
    shards are fetched and checked, and with max_disk_space the shards only the old span used go."""
    from petalsd.config import DaemonConfig
    from petalsd.daemon import build_daemon
    from petalsd.notify import Notifier

    checkpoint = Checkpoint(full)
    home = tmp_path / "hub"
    snapshot = add_files(home, full, span_shards(checkpoint, 0, 2) | span_shards(checkpoint, 4, 6))
    offline(home)
    config = DaemonConfig(model=REPO_ID, new_swarm=True, max_disk_space=1, throughput=1.0,
                          identity=tmp_path / "id.key")
    daemon = build_daemon(config, [], Notifier(None))
    span, _ = daemon.load(0, 2)
    assert {p.name for p in snapshot.glob("*.safetensors")} == span_shards(checkpoint, 0, 2)
    add_files(home, full, span_shards(checkpoint, 4, 6))  # the move's shards come "from the Hub" again
    moved, _ = daemon.load(4, 6)
    assert (moved.start, moved.end) == (4, 6)
    assert {p.name for p in snapshot.glob("*.safetensors")} == span_shards(checkpoint, 4, 6)
    assert daemon.serving_shards == span_shards(checkpoint, 4, 6)
