"""fsspec paths: a local path or URI opened on its filesystem, and the error storage failures raise.

Every module that touches storage (inputs.py, commit.py, validate.py) opens paths here, so the
protocol family of a path ("file" for local disks, "s3", "gcs", ...) is named one way.

Not here: what is read (inputs.py) or written (commit.py).
"""

from __future__ import annotations

from typing import Any

import fsspec

LOCAL_PROTOCOLS = ("file", "local")
GLOB_CHARS = "*?["


class StorageError(OSError):
    """A path cannot be listed, read or written; the message names the path and the fix. An OSError,
    like the failures it wraps, so code that handles I/O errors handles it too."""


def family(fs) -> str:
    """The filesystem's protocol family: "file" for local disks, else its first protocol name."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return "file" if protocol in LOCAL_PROTOCOLS else protocol


def open_fs(path: str, options: dict | None) -> tuple[Any, str]:
    """(fsspec filesystem, path on it) for a local path or URI."""
    try:
        return fsspec.core.url_to_fs(path, **(options or {}))
    except Exception as exc:  # unknown protocol, missing driver package, bad option
        raise StorageError(f"cannot open {path!r}: {type(exc).__name__}: {exc}") from exc


def uri_of(fs, path: str) -> str:
    """The full URI of `path` on `fs` (file:///abs/path, s3://bucket/key)."""
    return fs.unstrip_protocol(path)
