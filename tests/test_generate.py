"""Greedy generation with the KV cache and fetched memory equals repeated full forwards."""


import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CharTokenizer, jit_forward, small_model

from memlm.infer.generate import bucket, generate, generate_text
from memlm.memspec import fetched_shapes

REF_LEN = 32  # the reference forward's fixed length (one compile); causality makes right padding inert


def numpy_memory(cfg, batch, seed):
    """A FetchedMemory of standard normals (numpy: no device compile for each shape)."""
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(shape).astype(np.float32) for n, shape in fetched_shapes(cfg, batch).items()}


@pytest.fixture(scope="module")
def model():
    return small_model()


def reference_greedy(f, params, prompt, memory_row, steps, eot_id=-1):
    """Greedy decoding by a full forward (no cache) over the whole sequence at every step."""
    forward = jit_forward(f)
    seq, out = list(prompt), []
    for _ in range(steps):
        padded = np.zeros((1, REF_LEN), np.int32)
        padded[0, : len(seq)] = seq
        logits = forward(params, padded, memory_row)
        nxt = int(np.argmax(np.asarray(logits[0, len(seq) - 1])))
        if nxt == eot_id:
            break
        out.append(nxt)
        seq.append(nxt)
    return out


def _prompts(vocab):
    rng = np.random.default_rng(3)
    return [rng.integers(1, vocab, size=n).tolist() for n in (3, 11, 7)]


def test_generation_with_fetched_memory_equals_full_forward_argmax(model):
    cfg, f, params = model
    prompts = _prompts(cfg.model.vocab_size)
    memory = numpy_memory(cfg, len(prompts), 5)
    steps = 9
    refs = [reference_greedy(f, params, p, {k: v[i:i + 1] for k, v in memory.items()}, steps)
            for i, p in enumerate(prompts)]
    # The memory changes what is generated (otherwise the test would not check that it is used).
    assert refs != [reference_greedy(f, params, p, None, steps) for p in prompts]
    assert generate(f, params, prompts, memory, steps, eot_id=-1) == refs

    # Stopping at EOT: take a token that row 1 emits mid-way and does not emit earlier.
    k = next(i for i in range(2, steps) if refs[1][i] not in refs[1][:i])
    eot = refs[1][k]
    stopped = generate(f, params, prompts, memory, steps, eot_id=eot)
    assert stopped[1] == refs[1][:k]
    for got, ref in zip(stopped, refs, strict=True):
        assert got == (ref[: ref.index(eot)] if eot in ref else ref)


def test_generation_without_memory_and_with_shared_memory(model):
    cfg, f, params = model
    prompts = _prompts(cfg.model.vocab_size)
    refs = [reference_greedy(f, params, p, None, 5) for p in prompts]
    assert generate(f, params, prompts, None, 5, eot_id=-1) == refs
    shared = numpy_memory(cfg, 1, 9)
    refs = [reference_greedy(f, params, p, shared, 5) for p in prompts]
    assert generate(f, params, prompts, shared, 5, eot_id=-1) == refs


def test_generate_text_round_trips_through_a_tokenizer(model):
    cfg, f, params = model

    Chars = CharTokenizer

    prompts = ["hello", "a longer prompt", "x"]  # the shapes of the test above: no new compile
    ids = generate(f, params, [Chars().encode(p) for p in prompts], None, 4, eot_id=0)
    assert generate_text(f, params, Chars(), prompts, None, 4) == [Chars().decode(i) for i in ids]


def test_generate_rejects_bad_input(model):
    cfg, f, params = model
    with pytest.raises(ValueError, match="empty"):
        generate(f, params, [[1, 2], []], None, 4, eot_id=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(f, params, [[1, 2]], None, 0, eot_id=0)
    memory = numpy_memory(cfg, 3, 1)
    with pytest.raises(ValueError, match="do not match 2 prompts"):
        generate(f, params, [[1], [2]], memory, 4, eot_id=0)
    assert generate(f, params, [], None, 4, eot_id=0) == []


def test_bucket_is_the_next_power_of_two():
    assert [bucket(n) for n in (1, 2, 3, 8, 9)] == [1, 2, 4, 8, 16]
    assert bucket(3, minimum=16) == 16
    assert jnp.int32(bucket(17, 16)) == 32
