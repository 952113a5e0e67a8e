"""Tables of the editing experiment from ``evaluate.py``'s JSON files: accuracy (%) per frequency bucket.

    python experiments/editing/table.py LABEL=FILE.json [LABEL=FILE.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(res: dict) -> str:
    by = res["by_bucket"]
    items = [f"{100 * res['accuracy']:.1f}"] + [f"{100 * by[b]:.0f}" for b in sorted(by)]
    return " | ".join(items)


def main(args: list[str]) -> None:
    if not args or any("=" not in a for a in args):
        sys.exit("usage: python experiments/editing/table.py LABEL=FILE.json [LABEL=FILE.json ...]")
    runs = [(a.split("=", 1)[0], json.loads(Path(a.split("=", 1)[1]).read_text())) for a in args]
    first = runs[0][1]
    for route in first:
        for key in first[route]:
            if key == "step":
                continue
            n = first[route][key][next(iter(first[route][key]))]["n_by_bucket"]
            print(f"\n{route} {key} (items per bucket: {' / '.join(str(n[b]) for b in sorted(n))})")
            print("| run | condition | all | " + " | ".join(sorted(n)) + " |")
            for label, res in runs:
                for cond, r in res[route][key].items():
                    print(f"| {label} | {cond} | {row(r)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
