"""Results files that keep what earlier calls measured: merged per condition, never silently replaced.

``memlm eval --conditions none,fetched`` and later ``--conditions rag`` on the same checkpoint leave
one file with all three conditions (a condition measured again is replaced by the new numbers).
Results of another step of the run (or of another run written to the same folder) are not mixed
with the new ones: the old file moves to ``<name>.step<N>.json`` and a line says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["save_merged"]


def _merge(old: Any, new: Any) -> Any:
    """Dicts merge key by key (recursively); anything else is replaced by the new value."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{k: _merge(old[k], v) if k in old else v for k, v in new.items()}}
    return new


def save_merged(path: str | os.PathLike, result: dict[str, Any], step: int, run: str,
                say=print) -> dict[str, Any]:
    """Write ``result`` to ``path``, merged into the results already there for the same run and step;
    returns what was written. ``result`` must carry ``"step"`` and ``"run"`` (top level or under ``"memlm"``)."""
    path = Path(path)
    merged = result
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        where = (old.get("memlm", old) if isinstance(old, dict) else {}) or {}
        if where.get("step") == step and where.get("run") == run:
            merged = _merge(old, result)
        elif old is not None:
            kept = path.with_name(f"{path.stem}.step{where.get('step', 'unknown')}{path.suffix}")
            os.replace(path, kept)
            say(f"memlm eval: {path.name} held step {where.get('step')} of {where.get('run')}; kept it as {kept.name}")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(merged, indent=2))
    os.replace(tmp, path)
    return merged
