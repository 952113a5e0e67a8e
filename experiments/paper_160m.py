"""OpenLM-160M anchor (rows A1-A4) with the (256,64,16,0) FFN-memory: 18.06M fetched, 4.624B bank;
the co-training stage of row A2 (see experiments/paper.py)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("memlm_paper", Path(__file__).with_name("paper.py"))
_paper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_paper)


def get_config():
    c = _paper.row("A2")
    c.name = "paper_160m"
    return c
