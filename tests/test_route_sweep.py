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


def test_halves_are_balanced_per_bucket_and_do_not_depend_on_the_order_of_the_questions():
    import numpy as np

    keys = [f"Q: where was person {i} born? A:" for i in range(41)]
    buckets = [str(i % 3) if i < 39 else None for i in range(41)]
    half = route_sweep.halves(keys, buckets)
    for b in set(buckets):
        got = half[[i for i in range(41) if buckets[i] == b]]
        assert abs(int(got.sum()) * 2 - len(got)) <= 1, (b, got)
    order = np.random.default_rng(0).permutation(41)
    again = route_sweep.halves([keys[i] for i in order], [buckets[i] for i in order])
    assert dict(zip([keys[i] for i in order], again.tolist(), strict=True)) == dict(zip(keys, half.tolist(),
                                                                                         strict=True))


def _outputs(correct, buckets):
    return [{"correct": bool(c), "bucket": b} for c, b in zip(correct, buckets, strict=True)]


def test_scores_on_a_half_equal_a_numpy_reference():
    import numpy as np

    rng = np.random.default_rng(1)
    buckets = [str(b) for b in rng.integers(0, 5, size=60)]
    correct = rng.random(60) < 0.4
    take = rng.random(60) < 0.5
    got = route_sweep.on_rows(_outputs(correct, buckets), take)
    assert got["accuracy"] == pytest.approx(correct[take].mean())
    for b in sorted(set(np.array(buckets)[take])):
        rows = take & (np.array(buckets) == b)
        assert got["by_bucket"][b] == pytest.approx(correct[rows].mean())
    assert list(got["by_bucket"]) == sorted(got["by_bucket"], key=float)


def test_the_pick_prefers_the_most_accurate_setting_that_meets_the_rule_else_the_widest_margin():
    def row(name, meets, acc, margin):
        return {"setting": name, "probes": {"p": {"meets": meets, "accuracy": acc, "worst_margin": margin}}}

    assert route_sweep.pick([row("a", False, 0.9, -0.1), row("b", True, 0.5, 0.0), row("c", True, 0.6, 0.0)]) \
        == ("c", True)
    assert route_sweep.pick([row("a", False, 0.9, -0.2), row("b", False, 0.5, -0.1)]) == ("b", False)
    assert route_sweep.pick([]) == (None, False)


def test_holdout_picks_on_one_half_and_judges_the_pick_on_the_other():
    """Setting "lucky" wins on half 0 only; the holdout picks it there and finds it misses on half 1,
    judged against half 1's own none and greedy figures."""
    import numpy as np

    from memlm.eval.probes import Probe

    n = 40
    probes = [Probe(prompt=f"Q: {i}? A:", answer="x", bucket=str(i % 2)) for i in range(n)]
    split = route_sweep.halves([p.key for p in probes], [p.bucket for p in probes])
    buckets = [p.bucket for p in probes]
    none = np.zeros(n, bool)
    greedy = np.zeros(n, bool)
    lucky = split == 0  # right on every half-0 question, wrong on half 1
    steady = np.arange(n) % 4 < 2  # right on some questions of both halves
    outputs = {"base": {"p": {"none": _outputs(none, buckets), "fetched": _outputs(greedy, buckets)}},
               "lucky": {"p": {"fetched": _outputs(lucky, buckets)}},
               "steady": {"p": {"fetched": _outputs(steady, buckets)}}}
    res = route_sweep.holdout({"p": probes}, outputs, ["lucky", "steady"])
    assert res["pick"] == "lucky" and res["pick_meets"]
    check = res["check"]["probes"]["p"]
    assert check["accuracy"] == 0.0 and check["meets"]  # level with none and greedy on half 1 (all wrong)
    none[split == 1] = True  # now none answers all of half 1: the pick falls under it there
    outputs["base"]["p"]["none"] = _outputs(none, buckets)
    res = route_sweep.holdout({"p": probes}, outputs, ["lucky", "steady"])
    assert res["pick"] == "lucky" and not res["check_meets"]
    assert res["check"]["probes"]["p"]["worst_margin"] == -1.0
