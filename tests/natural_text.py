"""Natural text memlm did not write: paragraphs of the Python documentation that ships with every
CPython (``pydoc_data.topics``: the language reference's help topics)."""

import json
from pathlib import Path


def paragraphs(n: int, min_chars: int = 200) -> list[str]:
    """The first ``n`` paragraphs of at least ``min_chars`` characters, in the module's order."""
    from pydoc_data.topics import topics

    out = [p.strip() for _, text in sorted(topics.items()) for p in text.split("\n\n") if len(p.strip()) >= min_chars]
    if len(out) < n:
        raise ValueError(f"pydoc_data.topics has {len(out)} paragraphs of {min_chars}+ characters, fewer than {n}")
    return out[:n]


def write_jsonl(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in paragraphs(n)))
    return path
