"""Stage caching for ``prepare``: a stage that already ran with the same inputs is not run again.

Each stage has a key: a hash of everything its outputs depend on, including the keys of the stages
it reads from. So a changed corpus changes every key downstream of the read, a changed tokenizer
setting leaves the held-out split alone but re-tokenizes and repacks, and a changed
``tree.kmeans_steps`` refits the tree without re-embedding. A stage's record
(``<out_dir>/.stages/<name>.json``: key, info, output files) is written only after its outputs,
so an interrupted stage runs again next time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from memlm.data.records import write_json


def stage_key(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (16 hex digits)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class Stages:
    """The stage records of one output directory, and which stages this run reused or ran."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / ".stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.status: dict[str, dict[str, Any]] = {}

    def lookup(self, name: str, key: str) -> dict[str, Any] | None:
        """The stage's info if it finished with this key and its outputs are all still there."""
        path = self.dir / f"{name}.json"
        if not path.is_file():
            return None
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            return None
        if record.get("key") != key or not all((self.out_dir / p).exists() for p in record.get("outputs", [])):
            return None
        self.status[name] = {"key": key, "reused": True}
        return record["info"]

    def done(self, name: str, key: str, info: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
        """Record a finished stage (outputs relative to the output directory); returns ``info``."""
        write_json(self.dir / f"{name}.json", {"key": key, "info": info, "outputs": outputs})
        self.status[name] = {"key": key, "reused": False}
        return info
