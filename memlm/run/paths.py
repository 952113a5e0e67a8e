"""Locations: a local path or a URL, wherever memlm names a directory (run, data, bank, init).

``location(text)`` gives an ``etils.epath.Path``: ``gs://``, ``s3://`` and the other schemes epath
knows stay URLs (``pathlib.Path("gs://b/r")`` would silently become ``gs:/b/r``); ``file://`` URLs
and plain paths become absolute local paths.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlparse

from etils import epath

REMOTE_SCHEMES = ("gs", "s3", "az", "hf")


class LocationError(ValueError):
    """A directory name memlm cannot use; the message names it."""


def location(text: str | os.PathLike | epath.Path) -> epath.Path:
    """The epath for a directory name (local path, ``file://`` URL or a remote URL)."""
    if isinstance(text, epath.Path):
        return text
    s = os.fspath(text)
    if "://" not in s:
        return epath.Path(os.path.abspath(s))
    scheme = s.split("://", 1)[0]
    if scheme == "file":
        parsed = urlparse(s)
        if parsed.netloc not in ("", "localhost"):
            raise LocationError(f"{s!r}: a file:// URL names a local path (file:///abs/path)")
        return epath.Path(unquote(parsed.path))
    if scheme in REMOTE_SCHEMES:
        return epath.Path(s)
    raise LocationError(f"{s!r}: unsupported URL scheme {scheme!r} (use a path, file://, or one of "
                        f"{', '.join(s_ + '://' for s_ in REMOTE_SCHEMES)})")


def is_local(path: epath.Path) -> bool:
    """Whether a location is on the local filesystem (where file locks and appends work)."""
    return "://" not in os.fspath(path)
