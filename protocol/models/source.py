"""Where a checkpoint's files come from: a local folder, or a Hugging Face Hub repo pinned to a commit.

Nobody in a swarm needs the whole model, so files are fetched one at a time, when a party decides
it needs them: the config and the index first, then only the shards holding its tensors. A Hub
model goes through ``huggingface_hub``'s own cache (``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_TOKEN``,
``HF_HUB_OFFLINE``), so a file fetched once is never fetched again, and a partly filled cache
works offline for the files it holds. The revision the user names (a branch, a tag) is resolved
to a commit once; every later file comes from that commit, so a party never mixes two revisions.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
)

from petals_protocol.errors import PetalsError

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_OFFLINE_VALUES = {"1", "on", "yes", "true"}


class ModelLoadError(PetalsError):
    """A checkpoint or span cannot be loaded; the message names the path and what is wrong.

    It is the operator's fault (bad path, incomplete download, unsupported model), never the peer's.
    """

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.reason = message


class ModelSource(Protocol):
    """The files of one checkpoint, fetched on demand."""

    name: str  # as the user gave it: a folder or a Hub id
    commit: str | None  # the Hub commit every file comes from; None for a local folder

    def fetch(self, filename: str) -> Path:
        """A local path holding ``filename``, fetched if needed; ModelLoadError if it cannot be had."""
        ...

    def fetch_optional(self, filename: str) -> Path | None:
        """Like ``fetch``, but None where the checkpoint has no such file."""
        ...

    def expected_sha256(self, path: Path) -> str | None:
        """The SHA-256 the publisher gives for this fetched file, where the source carries one."""
        ...


@dataclass
class LocalFolder:
    """A checkpoint folder on disk: full, or holding only some shards."""

    root: Path
    commit: str | None = None

    @property
    def name(self) -> str:
        return str(self.root)

    def fetch(self, filename: str) -> Path:
        path = self.root / filename
        if not path.is_file():
            raise ModelLoadError(self.root, f"{filename} is missing")
        return path

    def fetch_optional(self, filename: str) -> Path | None:
        path = self.root / filename
        return path if path.is_file() else None

    def expected_sha256(self, path: Path) -> str | None:
        return None


@dataclass
class HubRepo:
    """A model repository on the Hugging Face Hub, read through the local Hub cache."""

    repo_id: str
    revision: str | None = None
    token: str | bool | None = None
    cache_dir: Path | None = None  # None: huggingface_hub's (HF_HUB_CACHE, else HF_HOME/hub)
    offline: bool = field(default_factory=lambda: os.environ.get("HF_HUB_OFFLINE", "").lower() in _OFFLINE_VALUES)
    commit: str | None = None

    @property
    def name(self) -> str:
        return self.repo_id

    def resolve(self) -> HubRepo:
        """Pin the revision to a commit, reading the config (the one file every party needs)."""
        config = self._download("config.json", self.revision)
        commit = config.parent.name
        if not _COMMIT.match(commit):
            raise ModelLoadError(self.repo_id, f"the Hub cache put config.json outside a commit snapshot ({config})")
        self.commit = commit
        log.info("model=%s revision=%s commit=%s", self.repo_id, self.revision or "main", commit)
        return self

    @property
    def snapshot(self) -> Path:
        """The folder of this commit's files in the Hub cache (fetched files appear there)."""
        return self.fetch("config.json").parent

    def _download(self, filename: str, revision: str | None) -> Path:
        try:
            return Path(hf_hub_download(self.repo_id, filename, revision=revision, token=self.token,
                                        cache_dir=self.cache_dir, local_files_only=self.offline))
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
            where = "HF_HUB_OFFLINE is set" if self.offline else "the Hub could not be reached"
            raise ModelLoadError(self.repo_id, f"{filename} (revision {revision or 'main'}) is not in the local "
                                 f"Hugging Face cache and {where}: {exc}") from exc
        except EntryNotFoundError as exc:
            raise ModelLoadError(self.repo_id, f"{filename} is not in the repository: {exc}") from exc
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise ModelLoadError(self.repo_id, f"cannot fetch {filename}: {exc}") from exc

    def fetch(self, filename: str) -> Path:
        path = self._download(filename, self.commit or self.revision)
        log.debug("model=%s file=%s at %s", self.repo_id, filename, path)
        return path

    def fetch_optional(self, filename: str) -> Path | None:
        try:
            return self.fetch(filename)
        except ModelLoadError as exc:
            if isinstance(exc.__cause__, EntryNotFoundError):  # also LocalEntryNotFoundError
                return None  # offline, an uncached file counts as absent: optional files have a fallback
            raise

    def expected_sha256(self, path: Path) -> str | None:
        """The cache names each blob by its ETag, which for an LFS file (every safetensors shard on
        the Hub) is the SHA-256 the Hub computed on upload, at the commit this file came from."""
        blob = path.resolve()
        return blob.name if blob.parent.name == "blobs" and _SHA256.match(blob.name) else None

    def cached_shards(self) -> dict[str, Path]:
        """The safetensors files of this commit present in the cache: {file name: blob path}."""
        snapshot = self.snapshot
        return {p.name: p.resolve() for p in snapshot.glob("*.safetensors") if p.exists()}

    def evict(self, keep: set[str], max_bytes: int) -> list[str]:
        """Delete cached shards of this commit outside ``keep`` (largest first) until the shards
        take at most ``max_bytes``; returns the names deleted. Shards in ``keep`` are never deleted."""
        snapshot = self.snapshot
        cached = self.cached_shards()
        sizes = {name: blob.stat().st_size for name, blob in cached.items()}
        total = sum(sizes.values())
        evicted: list[str] = []
        for name in sorted(set(cached) - keep, key=lambda n: -sizes[n]):
            if total <= max_bytes:
                break
            (snapshot / name).unlink(missing_ok=True)
            cached[name].unlink(missing_ok=True)
            total -= sizes[name]
            evicted.append(name)
        return evicted


def hub_cache_dir() -> Path | None:
    """The Hub cache the environment names (read now, not when huggingface_hub was imported);
    None: huggingface_hub's default."""
    hub_cache, home = os.environ.get("HF_HUB_CACHE"), os.environ.get("HF_HOME")
    return Path(hub_cache) if hub_cache else (Path(home) / "hub" if home else None)


def open_source(name: str | Path, *, revision: str | None = None, token: str | bool | None = None,
                cache_dir: str | Path | None = None) -> ModelSource:
    """A local folder if ``name`` is one, else a Hub model id (``org/name``) resolved to a commit."""
    path = Path(name)
    if path.is_dir():
        if revision is not None:
            raise ModelLoadError(path, f"revision {revision!r} is for Hub models; this is a local folder")
        return LocalFolder(path)
    text = str(name)
    if path.exists() or text.startswith((".", "/", "~")) or not _REPO_ID.match(text):
        raise ModelLoadError(path, "not a directory (expected a Hugging Face checkpoint folder or a Hub id ORG/NAME)")
    if cache_dir is None:
        cache_dir = hub_cache_dir()
    try:
        return HubRepo(text, revision=revision, token=token,
                       cache_dir=Path(cache_dir) if cache_dir is not None else None).resolve()
    except ModelLoadError as exc:
        raise ModelLoadError(text, f"no such local folder, and as a Hub model id: {exc.reason}") from exc
