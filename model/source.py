"""Where a checkpoint lives: a local directory, an fsspec URI of a directory, or a hub id.

`CheckpointSource` gives the rest of model/ one way to list and read a checkpoint's files
(config.json, generation_config.json, safetensors, tokenizer.model or tokenizer.json,
preprocessor_config.json; a LoRA adapter's adapter_config.json) wherever they are.
It is not a cache or a downloader of its own: hub ids go through huggingface_hub's own
cache, remote URIs through fsspec.

Not here: what the files mean (config.py, weights.py, tokenizer.py, images.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import fsspec


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message names the file or tensor and the fix."""


# owner/name as the hub spells repo ids; anything with a scheme or an existing path is not one.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class CheckpointSource:
    """A directory of checkpoint files on some filesystem."""

    root: str  # directory path on `fs`, without a trailing slash
    fs: Any  # fsspec filesystem holding `root`
    description: str  # what the user passed, for error messages
    revision: str | None = None  # hub commit or None for plain directories
    _listing: list[str] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, source: str | os.PathLike, storage_options: dict | None = None) -> CheckpointSource:
        """Resolve `source` (local dir, fsspec URI of a dir, or hub id) to a readable directory."""
        text = os.fspath(source)
        if "://" in text:
            fs, root = fsspec.core.url_to_fs(text, **(storage_options or {}))
            root = root.rstrip("/")
            try:
                is_dir = fs.isdir(root)
            except Exception as exc:  # network, permissions: name the source, keep the cause
                raise CheckpointError(f"cannot read checkpoint directory {text!r}: {exc}") from exc
            if not is_dir:
                raise CheckpointError(f"checkpoint {text!r} is not a directory (or does not exist)")
            return cls(root=root, fs=fs, description=text)
        if os.path.isdir(text):
            fs = fsspec.filesystem("file")
            return cls(root=os.path.abspath(text).rstrip("/"), fs=fs, description=text)
        if os.path.exists(text):
            raise CheckpointError(f"checkpoint {text!r} is a file; pass the directory that holds config.json")
        if _HUB_ID.match(text):
            return cls._from_hub(text)
        raise CheckpointError(
            f"checkpoint {text!r} not found: pass a local directory, an fsspec URI of a directory "
            f"(s3://bucket/ckpt/), or a hub id such as google/t5gemma-2-270m-270m"
        )

    @classmethod
    def _from_hub(cls, repo_id: str) -> CheckpointSource:
        # Only the file kinds we can use are fetched: safetensors, never pickles or remote code.
        try:
            import huggingface_hub
        except ImportError as exc:  # a declared dependency; only a broken install gets here
            raise CheckpointError("huggingface_hub is not installed; pip install huggingface_hub") from exc
        patterns = ["*.json", "*.safetensors", "tokenizer.model"]
        try:
            local = huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns)
        except Exception as exc:
            raise CheckpointError(
                f"cannot fetch hub checkpoint {repo_id!r} ({type(exc).__name__}: {exc}). This machine may be "
                f"offline: download it where the hub is reachable (huggingface-cli download {repo_id} "
                f"--local-dir DIR) and pass DIR, or an s3:// copy of it"
            ) from exc
        revision = os.path.basename(os.path.normpath(local))
        return cls(root=local.rstrip("/"), fs=fsspec.filesystem("file"), description=repo_id, revision=revision)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def files(self) -> list[str]:
        """File names directly in the directory (sorted)."""
        if self._listing is None:
            entries = self.fs.ls(self.root, detail=False)
            self._listing = sorted(os.path.basename(str(e).rstrip("/")) for e in entries)
        return self._listing

    def exists(self, name: str) -> bool:
        return name in self.files()

    def read_bytes(self, name: str) -> bytes:
        if not self.exists(name):
            raise CheckpointError(f"checkpoint {self.description!r} has no {name}")
        with self.fs.open(self.path(name), "rb") as handle:
            return handle.read()

    def local_path(self, name: str) -> str | None:
        """A path on local disk for `name` when the source is local (lets safetensors mmap)."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return self.path(name) if protocol in ("file", "local") else None
