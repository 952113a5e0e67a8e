"""Table 1 row A1: see experiments/paper.py (docs/paper.md §4, §6.1)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("memlm_paper", Path(__file__).with_name("paper.py"))
_paper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_paper)


def get_config():
    return _paper.row("A1")
