"""Reading a compiled step's HLO: which collectives it runs and how many bytes each moves.

Used by ``memlm compile`` (the report) and by the tests that hold the bank exchange to its
promise (no collective carries a whole bank level or a whole batch's fetched rows). Sizes are
per device, from the result shapes of the optimised HLO: a synchronous collective's bytes are
the sum of its result arrays (CPU lowers an all-to-all to a tuple of pieces); an asynchronous
``*-start`` op counts its largest array (its tuple also holds the operand and scratch).
"""

from __future__ import annotations

import collections
import dataclasses
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all", "collective-broadcast")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
             "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled module."""

    op: str
    bytes: int  # per device
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, dims) of its result arrays
    line: str


def _arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY.findall(shape_text)]


def _nbytes(dtype: str, dims: tuple[int, ...]) -> int:
    n = 1
    for x in dims:
        n *= x
    return n * _ITEMSIZE.get(dtype, 4)


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective (``*-done`` halves of async pairs skipped) in optimised HLO text."""
    out = []
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        arrays = _arrays(m.group(1))
        sizes = [_nbytes(d, s) for d, s in arrays]
        nbytes = max(sizes, default=0) if m.group(3) else sum(sizes)
        out.append(Collective(m.group(2), nbytes, tuple(arrays), line.strip()[:300]))
    return out


def summary(items: list[Collective]) -> list[dict]:
    """``[{"op", "bytes", "count"}]``, one row per (op, bytes), largest first."""
    counts = collections.Counter((c.op, c.bytes) for c in items)
    return [{"op": op, "bytes": b, "count": n} for (op, b), n in sorted(counts.items(), key=lambda x: -x[0][1])]


def largest_buffers(hlo_text: str, n: int = 3) -> list[str]:
    """The ``n`` largest array shapes computed by the module (inputs excluded): what an overrun is made of."""
    seen: dict[str, int] = {}
    for line in hlo_text.splitlines():
        if "=" not in line or any(op in line for op in (" parameter(", " get-tuple-element(", " bitcast(")):
            continue  # inputs and views of them are not new buffers
        head = line.split("=", 1)[1].split("(", 1)[0] if "(" in line else line.split("=", 1)[1]
        for d, dims in _arrays(head):
            key = f"{d}[{','.join(map(str, dims))}]"
            seen[key] = max(seen.get(key, 0), _nbytes(d, dims))
    return [f"{k} ({v / 2**30:.2f} GiB)" for k, v in sorted(seen.items(), key=lambda x: -x[1])[:n]]
