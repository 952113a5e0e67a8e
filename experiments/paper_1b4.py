"""OpenLM-1B ("1.4B", rows C1-C2) with the (768,256,16,0) FFN-memory: 153.4M fetched, 21.14B bank;
the co-training stage of row C2, at 4M-token batches (see experiments/paper.py)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("memlm_paper", Path(__file__).with_name("paper.py"))
_paper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_paper)


def get_config():
    c = _paper.row("C2")
    c.name = "paper_1b4"
    return c
