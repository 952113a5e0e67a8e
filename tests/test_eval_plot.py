"""The probe table and the bar plot per bucket and condition."""

import sys

import pytest

from memlm.eval.plot import PlotUnavailableError, format_table, plot_buckets

RESULT = {
    "probes": "islands",
    "conditions": {
        "none": {"accuracy": 0.25, "n": 8, "by_bucket": {"rare": 0.0, "common": 0.5}},
        "fetched": {"accuracy": 0.875, "n": 8, "by_bucket": {"rare": 0.75, "common": 1.0}},
    },
    "perplexity": {"none": {"perplexity": 31.4159}, "fetched": 12.0},
}


def test_table_shows_accuracy_per_condition_and_bucket():
    text = format_table(RESULT)
    lines = text.splitlines()
    header = next(line for line in lines if "condition" in line)
    assert header.index("bucket rare") < header.index("bucket common") < header.index("perplexity")
    fetched = next(line for line in lines if line.strip("│ ").startswith("fetched"))
    for cell in ("87.5%", "75.0%", "100.0%", "12.00"):
        assert cell in fetched
    none = next(line for line in lines if line.strip("│ ").startswith("none"))
    for cell in ("25.0%", "0.0%", "50.0%", "31.42"):
        assert cell in none
    assert "islands" in text
    assert "perplexity" not in format_table({"conditions": RESULT["conditions"]})


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_buckets(RESULT, tmp_path / "plots" / "islands.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 300 and height > 200


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(PlotUnavailableError, match=r"pip install 'memlm\[plot\]'"):
        plot_buckets(RESULT, tmp_path / "x.png")
