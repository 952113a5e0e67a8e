"""Split the bios corpus for the editing experiments of ``docs/editing.md``.

Writes, under ``OUT`` (default ``data/editing_bios``):

- ``old.jsonl``: every bios document except those of the *new* people (what the run is trained on);
- ``new.jsonl``: the new people's documents (what ``memlm learn`` teaches afterwards);
- ``forget.jsonl``: the documents of the people to forget (``memlm forget RUN --corpus forget.jsonl``);
- ``people.json``: who is new, who is to be forgotten, each person's mentions and bucket;
- ``probes/{new,forget,kept}_{hometown,birth_year}.jsonl``: the bios probes of each group.

New people: 10 per frequency bucket among the probed (non-tutor) people; forgotten people: 4 per
bucket among the others; kept: every other probed person. Buckets are the bios corpus's own (fifths
of the probed people by mentions in the whole corpus), so a new person is compared with co-trained
people of the same mention count. Deterministic for (documents, seed).

    python experiments/editing/bios_split.py [--documents 8000] [--seed 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from memlm.corpora import bios
from memlm.corpora.facts import count_mentions, write_probes

NEW_PER_BUCKET = 10
FORGET_PER_BUCKET = 4


def split(n_documents: int, seed: int, out: Path) -> dict:
    """Write the split (see the module docstring); returns ``people.json``'s content."""
    docs = list(bios.generate(n_documents, seed))
    ps = bios.people(seed)
    counts = count_mentions((d["text"] for d in docs), [p.name for p in ps])
    items = bios.probe_items(ps, counts)  # non-tutor people, buckets among them
    bucket = {row["entity"]: row["bucket"] for row in items["hometown"]}
    rng = np.random.default_rng([seed, 33])
    new, forget = [], []
    for b in sorted(set(bucket.values())):
        members = sorted(n for n, v in bucket.items() if v == b)
        picked = [members[i] for i in rng.permutation(len(members))]
        new += picked[:NEW_PER_BUCKET]
        forget += picked[NEW_PER_BUCKET:NEW_PER_BUCKET + FORGET_PER_BUCKET]
    group = {n: "kept" for n in bucket} | dict.fromkeys(new, "new") | dict.fromkeys(forget, "forget")
    out.mkdir(parents=True, exist_ok=True)
    with (open(out / "old.jsonl", "w", encoding="utf-8") as fo, open(out / "new.jsonl", "w", encoding="utf-8") as fn,
          open(out / "forget.jsonl", "w", encoding="utf-8") as ff):
        for d in docs:
            line = json.dumps(d, ensure_ascii=False) + "\n"
            (fn if group.get(d["entity"]) == "new" else fo).write(line)
            if group.get(d["entity"]) == "forget":
                ff.write(line)
    for g in ("new", "forget", "kept"):
        write_probes(out / "probes", {f"{g}_{probe}": [r for r in rows if group[r["entity"]] == g]
                                      for probe, rows in items.items()})
    people = {"documents": n_documents, "seed": seed, "new": sorted(new), "forget": sorted(forget),
              "mentions": {n: counts[n] for n in bucket}, "bucket": bucket}
    (out / "people.json").write_text(json.dumps(people, indent=1), encoding="utf-8")
    return people


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--documents", type=int, default=8000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="data/editing_bios")
    a = ap.parse_args()
    p = split(a.documents, a.seed, Path(a.out))
    n_new = len((Path(a.out) / "new.jsonl").read_text(encoding="utf-8").splitlines())
    print(f"{len(p['new'])} new people ({n_new} documents), {len(p['forget'])} to forget -> {a.out}")


if __name__ == "__main__":
    main()
