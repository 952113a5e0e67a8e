"""bench/route_sweep.py's setting syntax: each setting parses to the eval keys it names, and its label
parses back to the same setting."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("route_sweep", Path(__file__).parents[1] / "bench" / "route_sweep.py")
route_sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(route_sweep)


@pytest.mark.parametrize("text, want", [
    ("off", {"route_gate": "off"}),
    ("off:none:a0.5", {"route_gate": "off", "route_fallback": "none", "route_anchor_confidence": 0.5}),
    ("beam:2:generic", {"route_gate": "off", "route_beam": 2, "route_beam_generic": True}),
    ("descent:2:p0.5:none:a0.25", {"route_gate": "off", "route_descent": "likelihood", "route_descent_width": 2,
                                   "route_beam_generic": False, "route_posterior": 0.5, "route_fallback": "none",
                                   "route_anchor_confidence": 0.25}),
    ("distance:1:0.6", {"route_gate": "distance", "route_gate_level": 1, "route_gate_threshold": 0.6}),
])
def test_a_setting_parses_to_its_eval_keys_and_its_label_back_to_it(text, want):
    got = route_sweep.parse_setting(text)
    assert got == want
    assert route_sweep.parse_setting(route_sweep.label(got)) == got
