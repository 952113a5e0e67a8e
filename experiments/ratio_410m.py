"""Memory-to-model-ratio anchor 410m (App. A.7, Tab. 8): its only stage, the anchor (2^38 tokens, cosine
1e-3 -> 1e-5, weight decay 0.1); see experiments/ratio.py."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("memlm_ratio", Path(__file__).with_name("ratio.py"))
_ratio = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ratio)


def get_config():
    return _ratio.get_config("410m_anchor")
