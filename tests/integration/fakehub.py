"""A Hugging Face Hub cache laid out by the test, as `huggingface_hub` writes one, holding some files.

`HF_HOME/hub/models--ORG--NAME/` with `refs/<branch>` (the commit), `snapshots/<commit>/<file>`
(a relative symlink) and `blobs/<etag>`: the etag of a safetensors file (an LFS file on the Hub) is
the SHA-256 of its bytes, that of a small file the git blob id. With `HF_HUB_OFFLINE=1` every
party reads only what its own cache holds.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

REPO_ID = "petals-test/tiny-llama"
COMMIT = "1" * 40
OTHER_COMMIT = "2" * 40
SMALL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


def etag(name: str, data: bytes) -> str:
    if name.endswith(".safetensors"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def repo_dir(hf_home: Path, repo_id: str = REPO_ID) -> Path:
    return hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))


def add_files(hf_home: Path, folder: Path, files: Iterable[str], *, repo_id: str = REPO_ID,
              commit: str = COMMIT, ref: str | None = "main") -> Path:
    """Put `files` of the checkpoint `folder` into the cache at `commit` (small files always);
    point `ref` at it. Returns the snapshot folder."""
    repo = repo_dir(hf_home, repo_id)
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    names = [f for f in SMALL_FILES if (folder / f).exists()] + [f for f in files if f not in SMALL_FILES]
    for name in names:
        data = (folder / name).read_bytes()
        blob = repo / "blobs" / etag(name, data)
        blob.write_bytes(data)
        link = snapshot / name
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, snapshot))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def offline_env(hf_home: Path) -> dict[str, str]:
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
