"""A Hugging Face Hub cache per party, laid out by the test (`write_hub_cache`), holding some files.

With `HF_HUB_OFFLINE=1` every party reads only what its own cache holds.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from petals_protocol.models.synthetic import write_hub_cache

REPO_ID = "petals-test/tiny-llama"
COMMIT = "1" * 40
OTHER_COMMIT = "2" * 40
SMALL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


def repo_dir(hf_home: Path, repo_id: str = REPO_ID) -> Path:
    return hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))


def add_files(hf_home: Path, folder: Path, files: Iterable[str], *, repo_id: str = REPO_ID,
              commit: str = COMMIT, ref: str | None = "main") -> Path:
    """Put `files` of the checkpoint `folder` into the cache at `commit` (the small json files
    always); point `ref` at it. Returns the snapshot folder."""
    small = [f for f in SMALL_FILES if (folder / f).exists()]
    return write_hub_cache(hf_home, repo_id, folder, [*small, *(f for f in files if f not in small)],
                           commit=commit, ref=ref)


def offline_env(hf_home: Path) -> dict[str, str]:
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
