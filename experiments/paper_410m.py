"""OpenLM-410M anchor (rows B1-B3) with the (512,128,32,0) FFN-memory: 49.5M fetched, 12.68B bank;
the co-training stage of row B2 (see experiments/paper.py)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("memlm_paper", Path(__file__).with_name("paper.py"))
_paper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_paper)


def get_config():
    c = _paper.row("B2")
    c.name = "paper_410m"
    return c
