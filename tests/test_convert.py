"""Hugging Face conversion against the real library's outputs (fixtures made by make_convert_fixtures.py).

Every family's tiny random-weight checkpoint was run by ``transformers`` (eager attention, float32):
memlm's converted model must give the same next-token distributions (per-token KL < 1e-4), the same
20 greedy tokens through the KV-cache decoder, the same prompt token ids, the HF end-of-sequence
token as its EOT, and a bit-exact HF checkpoint back. Turning one architecture option off must
break the match (the comparison can fail).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memlm.cli import main
from memlm.convert import ConvertError, family_of_hf
from memlm.convert.run import from_hf, to_hf
from memlm.convert.safetensors import Checkpoint, write_checkpoint
from memlm.infer.generate import generate
from memlm.infer.run import load_run
from memlm.model.functional import AnchorFunctional

FIX = Path(__file__).resolve().parent / "fixtures" / "convert"
FAMILIES = ("llama", "qwen2", "qwen3", "gemma3", "gemma2")
BOS = {"llama": "<|begin_of_text|>", "qwen2": None, "qwen3": None, "gemma3": "<bos>", "gemma2": "<bos>"}
EOS = {"llama": "<|eot_id|>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>", "gemma3": "<eos>", "gemma2": "<eos>"}
# One option per family whose removal must break the match (what the family's map and config carry).
ABLATIONS = {
    "llama": {"rope_scaling": "none"},
    "qwen2": {"local_layers": ()},
    "qwen3": {"qk_norm_scope": "head", "rope_scaling": "none"},
    "gemma3": {"embed_scale": False, "rope_local_base": 0.0, "final_softcap": 0.0, "query_pre_attn_scalar": 0.0},
    "gemma2": {"attn_softcap": 0.0},
}


def kl(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per-token KL(reference || memlm) of next-token distributions."""
    p = jax.nn.log_softmax(jnp.asarray(ref_logits, jnp.float32), -1)
    q = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)
    return np.asarray(jnp.sum(jnp.exp(p) * (p - q), -1))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (run directory, loaded run, reference arrays); converted once per module."""
    root = tmp_path_factory.mktemp("converted")
    cache = {}

    def get(family):
        if family not in cache:
            out = root / family
            from_hf(FIX / family, out, overrides={"model.compute_dtype": "float32"}, quiet=True)
            cache[family] = (out, load_run(out), dict(np.load(FIX / family / "reference.npz")))
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(converted, family):
    _, run, ref = converted(family)
    forward = jax.jit(lambda f, p, t: f.apply(p, t), static_argnums=0)
    tokens = jnp.asarray(ref["tokens"], jnp.int32)
    per_token = kl(ref["logits"], forward(run.fn, run.params, tokens))
    assert per_token.shape == ref["tokens"].shape
    assert per_token.max() < 1e-4, (family, float(per_token.max()))
    # Without one of the family's options the same weights give other distributions.
    broken = AnchorFunctional(dataclasses.replace(run.fn.spec, **ABLATIONS[family]))
    assert kl(ref["logits"], forward(broken, run.params, tokens)).max() > 1e-2  # 100x the tolerance


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_and_tokenizer_match_transformers(converted, family):
    """From text: the prompts' ids (the family's BOS template included) and the greedy tokens equal
    transformers', which encoded the same text with AutoTokenizer of the same folder."""
    _, run, ref = converted(family)
    assert run.tokenizer.eot == EOS[family]  # the HF folder's eos, not the first known end-of-text name
    ids = [run.tokenizer.encode(str(t)).tolist() for t in ref["prompts"]]
    assert ids == [[int(i) for i in row if i >= 0] for row in ref["prompt_ids"]]
    bos = BOS[family]
    assert all((row[0] == run.tokenizer._tok.token_to_id(bos)) if bos else True for row in ids)
    out = generate(run.fn, run.params, ids, None, 20, eot_id=-1)  # both prompts in one right-padded batch
    assert out == ref["generated"].tolist()


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_chat_prompt_matches_apply_chat_template(converted, family):
    """``memlm generate --chat``: the chat template's ids and their greedy continuation equal transformers'."""
    from memlm.infer.generate import generate_text

    _, run, ref = converted(family)
    chat = run.tokenizer.encode_chat([{"role": "user", "content": str(ref["prompts"][0])}]).tolist()
    assert chat == ref["chat_ids"].tolist()
    assert generate(run.fn, run.params, [chat], None, 20, eot_id=-1) == [ref["chat_generated"].tolist()]
    text = generate_text(run.fn, run.params, run.tokenizer, [str(ref["prompts"][0])], None, 20, chat=True)[0]
    want = ref["chat_generated"].tolist()
    if run.tokenizer.eot_id in want:
        want = want[: want.index(run.tokenizer.eot_id)]
    assert text == run.tokenizer.decode(want)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_to_memlm_to_hf_is_bit_exact(converted, family, tmp_path):
    run_dir, _, _ = converted(family)
    to_hf(run_dir, tmp_path / "hf", max_shard_bytes=20_000, quiet=True)
    a, b = Checkpoint(FIX / family), Checkpoint(tmp_path / "hf")
    assert a.names() == b.names()
    for n in a.names():
        assert (a.dtype(n), a.shape(n)) == (b.dtype(n), b.shape(n)), n
        assert a.get(n).tobytes() == b.get(n).tobytes(), n
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (FIX / family / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1  # sharded, with the index
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == a.names()


@pytest.mark.parametrize("family", FAMILIES)
def test_written_config_carries_the_original_fields(converted, family, tmp_path):
    """A run without its original config.json (e.g. trained from scratch) gets one from the family
    mapping: it reads back to the same architecture and keeps the original's architecture fields."""
    from memlm.convert import family_named

    run_dir, run, _ = converted(family)
    fam = family_named(family)
    original = json.loads((FIX / family / "config.json").read_text())
    m = {**run.cfg.model.to_dict()}
    written = fam.write_config(m)
    assert fam.read_config(written) == fam.read_config(original)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings",
                "sliding_window", "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping"):
        if key in original and original[key] is not None:
            assert written[key] == original[key], key


def test_hub_configs_parameter_counts_equal_transformers():
    """Config.json files in the Hub's older format: memlm counts the parameters transformers builds."""
    from memlm.convert.run import converted_config
    from memlm.model.accounting import anchor_params

    hub = json.loads((FIX / "hub_configs.json").read_text())
    for name, entry in hub.items():
        fam = family_of_hf(entry["config"])
        keys = fam.read_config(entry["config"])
        cfg = converted_config(fam, keys, {"x": "BF16"}, entry["config"], None)
        assert anchor_params(cfg) == entry["params"], name
        if entry["layer_types"]:
            local = [i for i, t in enumerate(entry["layer_types"]) if t == "sliding_attention"]
            assert list(keys["local_layers"]) == local, name


def test_safetensors_writer_is_read_by_the_safetensors_library(tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.normal(size=(3, i + 1)).astype(np.float32) for i in range(6)}
    tensors["ids"] = np.arange(5, dtype=np.int64)
    specs = [(n, v.shape, v.dtype) for n, v in tensors.items()]
    files = write_checkpoint(tmp_path, specs, tensors.__getitem__, max_shard_bytes=64)
    assert len(files) > 1
    back = {}
    for f in files:
        back.update(load_file(tmp_path / f))
    assert sorted(back) == sorted(tensors)
    for n, v in tensors.items():
        np.testing.assert_array_equal(back[n], v)
        np.testing.assert_array_equal(Checkpoint(tmp_path).get(n), v)


def _cli(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def test_bad_inputs_fail_with_one_line(converted, tmp_path, capsys):
    run_dir, run, _ = converted("llama")
    # an architecture option cannot be overridden on conversion
    rc, err = _cli(capsys, "convert", "--from-hf", str(FIX / "llama"), "--out", str(tmp_path / "a"),
                   "--config.model.n_layers=2")
    assert rc == 2 and "model.n_layers" in err and "fixed by the checkpoint" in err and len(err.splitlines()) == 1
    # an existing, non-empty --out is never overwritten
    rc, err = _cli(capsys, "convert", "--from-hf", str(FIX / "llama"), "--out", str(run_dir))
    assert rc == 2 and "not empty" in err
    # a checkpoint missing a tensor, or carrying an unknown one
    for drop, add in (("model.norm.weight", None), (None, "model.extra.weight")):
        bad = tmp_path / f"bad_{drop or add}"
        shutil.copytree(FIX / "qwen3", bad)
        ck = Checkpoint(bad)
        t = {n: np.array(ck.get(n)) for n in ck.names() if n != drop}
        if add:
            t[add] = np.zeros(2, np.float32)
        (bad / "model.safetensors").unlink()
        write_checkpoint(bad, [(n, v.shape, v.dtype) for n, v in t.items()], t.__getitem__)
        rc, err = _cli(capsys, "convert", "--from-hf", str(bad), "--out", str(tmp_path / f"o_{drop or add}"))
        assert rc == 2 and repr(drop or add) in err, err
    # an unknown family
    weird = tmp_path / "weird"
    shutil.copytree(FIX / "qwen3", weird)
    cfg = json.loads((weird / "config.json").read_text())
    (weird / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    rc, err = _cli(capsys, "convert", "--from-hf", str(weird), "--out", str(tmp_path / "w"))
    assert rc == 2 and "'mamba'" in err
    assert not (tmp_path / "w").exists()


def test_openlm_anchor_has_no_hf_equivalent(tmp_path, capsys):
    """memlm's own block (gain-only LayerNorm, full-width QK-norm) fails export naming both."""
    from helpers import small_config

    from memlm.convert.run import write_run

    cfg = small_config("none", sizes=(0,))
    params = {k: np.zeros(v.shape, v.dtype) for k, v in AnchorFunctional(cfg).shapes.items()}
    write_run(tmp_path / "run", cfg, params, [], {"family": None}, {}, "test")
    rc, err = _cli(capsys, "convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf"))
    assert rc == 2 and len(err.splitlines()) == 1
    assert "model.norm = 'layernorm'" in err and "model.qk_norm_scope = 'full'" in err
    assert "no Hugging Face equivalent" in err
    assert not (tmp_path / "hf").exists()


def test_gelu_ffn_memory_equals_a_widened_gelu_ffn():
    """FFN-memory units use the anchor's own activation: a GeGLU anchor's memory is a wider GeGLU FFN."""
    from helpers import random_memory, small_config

    cfg = small_config("ffn", sizes=(4, 4), norm="rmsnorm", qk_norm=False, ffn_activation="gelu_tanh")
    f = AnchorFunctional(cfg)
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype) for k, v in f.shapes.items()}
    mem = random_memory(cfg, 2, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.model.vocab_size)
    wide_cfg = small_config("none", sizes=(0,), norm="rmsnorm", qk_norm=False, ffn_activation="gelu_tanh",
                            d_ff=cfg.model.d_ff + 8)
    wide = dict(params)
    # one shared memory row for both sequences (the first sequence's), widened into the FFN
    mem = {n: jnp.broadcast_to(v[:1], v.shape) for n, v in mem.items()}
    wide["w1"] = jnp.concatenate([params["w1"], mem["w1"][0]], -1)
    wide["w2"] = jnp.concatenate([params["w2"], mem["w2"][0]], -1)
    wide["w3"] = jnp.concatenate([params["w3"], mem["w3"][0]], -2)
    got = jax.jit(lambda p, t, m: f.apply(p, t, memory=m))(params, tokens, mem)
    g = AnchorFunctional(wide_cfg)
    want = jax.jit(lambda p, t: g.apply(p, t))(wide, tokens)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_config_errors_name_the_key():
    from helpers import small_config

    from memlm.config import ConfigError

    with pytest.raises(ConfigError, match="model.local_layers"):
        small_config("none", sizes=(0,), local_layers=(0,))  # no sliding_window
    with pytest.raises(ConfigError, match="model.local_layers"):
        small_config("none", sizes=(0,), local_layers=(5,), sliding_window=4)
    with pytest.raises(ConfigError, match="model.ffn_activation"):
        small_config("none", sizes=(0,), ffn_activation="relu")
    with pytest.raises(ConfigError, match="model.rope_scaling"):
        small_config("none", sizes=(0,), rope_scaling="yarn")
    with pytest.raises(ConvertError, match="rope_type = 'yarn'"):
        from memlm.convert import llama

        llama.read_config({**json.loads((FIX / "llama" / "config.json").read_text()),
                           "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})


def test_sliding_window_attention_flops_count_the_keys_each_query_sees():
    from memlm.model.accounting import attention_flops

    seq, window, heads, dh = 32, 4, 2, 8
    keys = sum(min(i, window - 1) + 0.5 for i in range(seq)) / seq  # the diagonal counts half, as S / 2 does
    want = 6 * seq * heads * dh + round(2 * 12 * keys * heads * dh)
    assert attention_flops(3, seq, heads, dh, (0, 1), window) == want
    assert attention_flops(3, seq, heads, dh, (0, 1), seq) == attention_flops(3, seq, heads, dh) == 6 * 3 * seq * 16


def test_float16_checkpoint_with_a_stored_tied_head_round_trips(tmp_path):
    """float16 tensors become float32 parameters (exactly) and go back to float16; a tied checkpoint that
    also stores ``lm_head.weight`` gets it back."""
    src = tmp_path / "src"
    shutil.copytree(FIX / "qwen2", src)
    ck = Checkpoint(src)
    t = {n: np.asarray(ck.get(n)).astype(np.float16) for n in ck.names()}
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
    (src / "model.safetensors").unlink()
    write_checkpoint(src, [(n, v.shape, v.dtype) for n, v in t.items()], t.__getitem__, max_shard_bytes=30_000)
    from_hf(src, tmp_path / "run", quiet=True)
    record = json.loads((tmp_path / "run" / "config.json").read_text())  # written by RunDir.write_config
    assert list(record) == ["config", "data_dir", "init_from", "converted_from"]
    assert (record["data_dir"], record["init_from"], record["converted_from"]) == \
        (str((tmp_path / "run" / "hf").resolve()), None, str(src.resolve()))
    assert not (tmp_path / "run" / "config.json.tmp").exists()
    cfg = record["config"]
    assert (cfg["model"]["param_dtype"], cfg["model"]["compute_dtype"]) == ("float32", "bfloat16")
    to_hf(tmp_path / "run", tmp_path / "back", quiet=True)
    back = Checkpoint(tmp_path / "back")
    assert back.names() == sorted(t)
    for n, v in t.items():
        assert back.dtype(n) == np.float16 and back.get(n).tobytes() == v.tobytes(), n


def test_every_family_option_at_once_scan_equals_a_layer_loop_and_the_cache():
    """All options on, memory on the middle layer only: the scanned anchor (per-layer local flags sliced
    per memory segment) equals a Python loop over ``layer`` with each layer's own mask and RoPE tables,
    KV-cache decoding equals the full forward, and gradients flow under full remat."""
    from helpers import random_memory, small_config

    from memlm.model.anchor import init_cache, layer
    from memlm.model.layers import document_mask, rope_tables_from, window_mask

    opts = dict(norm="rmsnorm", norm_offset=True, qk_norm=True, qk_norm_scope="head", qkv_bias=True,
                embed_scale=True, ffn_activation="gelu_tanh", post_norms=True, sliding_window=3, local_layers=(0, 2),
                rope_local_base=500.0, rope_scaling="llama3", rope_scaling_factor=4.0, rope_original_max_len=16,
                query_pre_attn_scalar=12.0, attn_softcap=2.0, final_softcap=3.0, n_kv_heads=2, remat="full")
    cfg = small_config("ffn", sizes=(4, 4), **opts)
    cfg.memory.update(placement="middle", placement_layers=1)
    f = AnchorFunctional(cfg)
    s = f.spec
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(0.4 * rng.standard_normal(v.shape), v.dtype) for k, v in f.shapes.items()}
    mem = random_memory(cfg, 2, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.model.vocab_size)
    full = jax.jit(lambda p, t, m: f.apply(p, t, memory=m))(params, tokens, mem)

    # the reference: one layer at a time, each with its own context
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    seg = jnp.ones((2, 12), jnp.int32)
    mask = document_mask(seg, seg, pos, pos)
    ctx_global = dict(mask=mask, rope=rope_tables_from(pos, s.inv_freq()))
    ctx_local = dict(mask=window_mask(mask, pos, pos, 3), rope=rope_tables_from(pos, s.inv_freq(local=True)))
    x = params["embed"][tokens] * jnp.sqrt(jnp.float32(cfg.model.d_model))
    for i in range(cfg.model.n_layers):
        p = {n: v[i] for n, v in params.items() if v.ndim >= 2 and n not in ("embed", "head")}
        m = {n: v[:, 0] for n, v in mem.items()} if i == 1 else None  # one memory layer: index 0 of its axis
        x, _ = layer(s, p, x, m, None, ctx_local if i in (0, 2) else ctx_global)
    ref = jnp.tanh(s.normalize(x, params["final_norm"]) @ params["head"] / 3.0) * 3.0
    np.testing.assert_allclose(full, ref, rtol=2e-5, atol=2e-5)

    cache = init_cache(s, 2, 16, dtype="float32")
    step = jax.jit(lambda p, t, q, m, c: f.apply(p, t, positions=q, memory=m, cache=c))
    logits, cache = step(params, tokens[:, :7], pos[:, :7], mem, cache)
    outs = [logits]
    for i in range(7, 12):
        logits, cache = step(params, tokens[:, i:i + 1], pos[:, i:i + 1], mem, cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-4)

    grads = jax.jit(jax.grad(lambda p, m: jnp.sum(f.apply(p, tokens, memory=m) ** 2), argnums=(0, 1)))(params, mem)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads[1]["w3"]).max()) > 0 and float(jnp.abs(grads[0]["bq"]).max()) > 0
