"""Long-tail probes: the paper's scoring rules, probe files, and accuracy per bucket and condition."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DictMemoryProvider, small_config

from memlm.eval.probes import (
    ProbeFileError,
    bucket_order,
    evaluate_probes,
    is_correct,
    load_probes,
    normalize,
    parse_integers,
)
from memlm.infer.conditions import ConditionError, parse_conditions
from memlm.model.anchor import AnchorSpec

FIXTURES = Path(__file__).parent / "fixtures"
EOT = 127
SCRIPT_LEN = 96


class Chars:
    """A character tokenizer: one id per ASCII character, EOT = 127."""

    eot_id = EOT

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class ScriptedLM:
    """A stand-in LM whose greedy output is written in its memory: the token after position p is
    ``memory["script"][p]`` (``params["script"]`` without memory). It honours the anchor's call and
    cache contract, so generation and scoring run exactly as with the anchor."""

    def __init__(self):
        self.spec = AnchorSpec.from_config(small_config("none"))

    def apply(self, params, tokens, segment_ids=None, positions=None, memory=None, cache=None):
        script = params["script"][None] if memory is None else memory["script"]
        nxt = jnp.take_along_axis(jnp.broadcast_to(script, (tokens.shape[0], script.shape[-1])), positions, axis=1)
        logits = 10.0 * jax.nn.one_hot(nxt, self.spec.vocab_size)
        if cache is None:
            return logits
        return logits, dict(cache, lengths=cache["lengths"] + jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32))


def script(prompt: str, says: str) -> dict:
    """Memory that makes ScriptedLM answer ``prompt`` with ``says`` and then EOT."""
    out = np.full(SCRIPT_LEN, EOT, np.int32)
    ids = Chars().encode(says)
    out[len(prompt) - 1: len(prompt) - 1 + len(ids)] = ids
    return {"script": out}


# (fetched, blocked) answers per probe of eval_probes_islands.jsonl; generic says one thing to all.
SAYS = [
    (" 4,120 people.", " 412 people"),             # rare, numeric 4120
    (" Port Merrow, on the west coast", " Port Merrowby"),  # rare, "Port Merrow" (retrieved by context)
    (" 1762.", " 17620"),                           # common, numeric 1762
    (" red and white", "Red\nblue"),                 # common, "red"
    (" the south quay", " The north pier!"),         # no bucket, "the north pier"
]
GENERIC = " 1762 or so"


@pytest.mark.parametrize("answer,output", [
    ("26", " 26"), ("26", "The atomic number is 26."), ("26", "Fe-26 and 30"), ("-3", "it is -3 degrees"),
    ("1000", " 1,000 of them"), ("26", "Z26"), ("Paris", " Paris, France."), ("Paris", "the paris"),
    ("New York", " new  York city"), ("red", "Red\nblue"), ("The north pier", "north pier!"),
    ("U.S.", " US"),
])
def test_correct_answers(answer, output):
    assert is_correct(answer, output)


@pytest.mark.parametrize("answer,output", [
    ("26", " 126"), ("26", "26.5"), ("26", "2 6"), ("3", "it is -3"), ("26", ""), ("Paris", " Parisian"),
    ("Paris", " London, Paris"), ("New York", "new"), ("red", "blue\nred"),
])
def test_wrong_answers(answer, output):
    assert not is_correct(answer, output)


def test_parsing_and_normalisation():
    assert parse_integers("in 1,234 of 7 cases, 3.5% and -2, x-9") == [1234, 7, -2, 9]
    assert normalize("  The  Quick, brown fox! A test.") == "quick brown fox test"


def test_probe_file_with_custom_buckets_loads():
    probes = load_probes(FIXTURES / "eval_probes_islands.jsonl")
    assert [p.answer for p in probes] == ["4120", "Port Merrow", "1762", "red", "the north pier"]
    assert [p.bucket for p in probes] == ["rare", "rare", "common", "common", None]
    assert probes[1].key == "Oskany is an island nation." and probes[0].key == probes[0].prompt
    assert bucket_order(["rare", "common", "rare"]) == ["rare", "common"]
    assert bucket_order(["10", "2", "0"]) == ["0", "2", "10"]


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "x", "answer": 1', "not valid JSON"),
    ('["prompt", "answer"]', "expected a JSON object"),
    ('{"prompt": "x"}', "missing field 'answer'"),
    ('{"answer": "y"}', "missing field 'prompt'"),
    ('{"prompt": "x", "answer": true}', "field 'answer' must be str or int"),
    ('{"prompt": "x", "answer": "y", "bucket": [1]}', "field 'bucket'"),
    ('{"prompt": "x", "answer": "the"}', "empty after normalisation"),
    ('{"prompt": " ", "answer": "y"}', "field 'prompt' is empty"),
])
def test_bad_probe_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "probes.jsonl"
    path.write_text('{"prompt": "ok", "answer": "fine"}\n\n' + line + "\n")
    with pytest.raises(ProbeFileError, match=message) as e:
        load_probes(path)
    assert f"{path}:3" in str(e.value)
    with pytest.raises(ProbeFileError, match="does not exist"):
        load_probes(tmp_path / "missing.jsonl")


def test_probe_evaluation_per_bucket_and_condition():
    probes = load_probes(FIXTURES / "eval_probes_islands.jsonl")
    # The generic memory is one script shared by every row: written for the Brisk Harbour prompt, it
    # gives the others only fragments ("2 or so", " or so", ...) or nothing.
    provider = DictMemoryProvider(
        per_text={"fetched": {p.key: script(p.prompt, s[0]) for p, s in zip(probes, SAYS, strict=True)},
                  "blocked": {p.key: script(p.prompt, s[1]) for p, s in zip(probes, SAYS, strict=True)}},
        shared={"generic": script(probes[2].prompt, GENERIC)},
    )
    params = {"script": jnp.full((SCRIPT_LEN,), EOT, jnp.int32)}  # the anchor alone says nothing

    result = evaluate_probes(ScriptedLM(), params, Chars(), probes, provider, "none,generic,fetched,blocked",
                             max_new_tokens=16, batch_size=2, return_outputs=True)
    res = result["conditions"]
    assert list(res) == ["none", "generic", "fetched", "blocked"]
    assert res["fetched"] == {"accuracy": 0.8, "n": 5, "by_bucket": {"rare": 1.0, "common": 1.0},
                              "n_by_bucket": {"rare": 2, "common": 2}}
    assert res["blocked"]["accuracy"] == 0.4 and res["blocked"]["by_bucket"] == {"rare": 0.0, "common": 0.5}
    assert res["generic"]["accuracy"] == 0.2 and res["generic"]["by_bucket"] == {"rare": 0.0, "common": 0.5}
    assert res["none"]["accuracy"] == 0.0
    fetched = result["outputs"]["fetched"]
    assert [o["output"] for o in fetched] == [s[0][:16] for s in SAYS]
    assert [o["correct"] for o in fetched] == [True, True, True, True, False]
    assert result["outputs"]["none"][0]["output"] == ""
    # One memory request per batch and condition (the last batch padded to 2); "none" asks too and gets None.
    assert [n for c, n in provider.calls if c == "fetched"] == [2, 2, 2]


def test_conditions_are_checked():
    assert parse_conditions("none, fetched") == ("none", "fetched")
    with pytest.raises(ConditionError, match="unknown memory condition 'fetch'"):
        parse_conditions("none,fetch")
    with pytest.raises(ConditionError, match="no 'fetched' memory for text 'b'"):
        DictMemoryProvider(per_text={"fetched": {"a": {"x": np.zeros(2)}}})(["a", "b"], "fetched")
