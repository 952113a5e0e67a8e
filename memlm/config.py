"""Configuration schema: one ml_collections ConfigDict with sections model, memory, tree, data,
train, eval and mesh, plus validation whose errors name the bad key and value.

Presets (the default ``memlm/presets/tiny.py``, the paper's in ``experiments/``) call
:func:`default_config` and change what they need; command-line overrides
(``--config.section.key=value``) go through :func:`apply_overrides`. A config is validated once
where it enters: the command line, a run directory's record, a sweep's expansion, a conversion, and
the public entry points that take a caller's config (``prepare(cfg)``, ``train(cfg)``); code inside
trusts it. A bad config fails before anything is built or compiled.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import ml_collections

MEMORY_TYPES = ("none", "ffn", "lora_qk", "lora_ov", "lora_ffn", "kv")
MEMORY_PLACEMENTS = ("all", "early", "middle", "late")
NORMS = ("layernorm", "rmsnorm")
QK_NORM_SCOPES = ("full", "head")
FFN_ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
ROPE_SCALINGS = ("none", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas_gpu", "splash")
TRAIN_MODES = ("anchor", "frozen", "cotrain", "scratch")
DTYPES = ("float32", "bfloat16")
EMBED_UNITS = ("document", "window")
CONDITIONS = ("none", "generic", "fetched", "blocked", "rag", "rag+fetched")
EMBEDDERS = ("minilm", "hash")
EMBED_DTYPES = ("auto", "float32", "bfloat16")


# The embedded default preset, shipped inside the package (loaded by path: no import circle with it).
DEFAULT_PRESET = str(Path(__file__).resolve().parent / "presets" / "tiny.py")

# Keys memlm once had and reads no more: a run's config.json that still has one loads without it.
REMOVED_KEYS: dict[str, tuple[str, ...]] = {"data": ("shuffle_buffer",)}


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the value."""


class ConditionError(ValueError):
    """An unknown memory condition, one a run does not have, or memory of the wrong shape."""


def default_config() -> ml_collections.ConfigDict:
    """The full schema with defaults (the paper's 160M anchor shapes, memory off)."""
    c = ml_collections.ConfigDict()
    c.name = "default"

    c.model = ml_collections.ConfigDict(
        dict(
            vocab_size=50_432,  # padded size used by the embedding and head
            vocab_multiple=64,  # a tokenizer's vocabulary is padded up to a multiple of this
            d_model=512,
            n_layers=35,
            n_heads=12,
            n_kv_heads=0,  # 0: same as n_heads (multi-head); smaller: grouped-query attention
            head_dim=32,  # decoupled from d_model (the 160M uses 12 x 32 with d = 512)
            d_ff=2048,
            tied_embeddings=True,
            norm="layernorm",  # gain-only LayerNorm (OpenLM); or rmsnorm
            qk_norm=True,
            norm_eps=1e-5,
            rope_base=100_000.0,
            max_seq_len=2048,
            init_std=0.02,
            param_dtype="float32",
            compute_dtype="bfloat16",
            remat="full",
            attention="auto",  # auto | xla | cudnn | pallas_gpu | splash (segment-id kernels: model/kernels.py)
            # Architecture options of other model families (the defaults are memlm's own OpenLM block):
            norm_offset=False,  # norm gains stored as offsets from one, applied as (1 + w) (Gemma)
            qk_norm_scope="full",  # QK-norm over the full q / k width, or "head": per head over head_dim
            qkv_bias=False,  # biases on the query / key / value projections (Qwen2)
            embed_scale=False,  # multiply the token embeddings by sqrt(d_model) (Gemma)
            ffn_activation="silu",  # gate activation: silu (SwiGLU), gelu_tanh (GeGLU, Gemma), gelu
            post_norms=False,  # norms on the attention and FFN outputs before the residual add (Gemma 3)
            sliding_window=0,  # window of the local layers (tokens, the query included); 0: none
            local_layers=(),  # indices of the sliding-window (local) layers; the others attend globally
            rope_local_base=0.0,  # RoPE base of the local layers (unscaled); 0: the global tables
            rope_scaling="none",  # none, linear or llama3 (Llama 3.1 frequency-dependent scaling)
            rope_scaling_factor=1.0,
            rope_low_freq_factor=1.0,  # llama3 scaling only
            rope_high_freq_factor=4.0,  # llama3 scaling only
            rope_original_max_len=8192,  # llama3 scaling only: the pre-scaling context length
            query_pre_attn_scalar=0.0,  # attention scores scaled by its -1/2 power; 0: head_dim (1/sqrt(dh))
            attn_softcap=0.0,  # soft-cap of the attention scores, cap * tanh(s / cap); 0: none
            final_softcap=0.0,  # soft-cap of the output logits; 0: none
        )
    )

    c.memory = ml_collections.ConfigDict(
        dict(
            type="none",
            sizes=(256, 64, 16, 0),  # r_l per level: FFN units, LoRA rank or KV slots
            placement="all",
            placement_layers=10,  # layer count for early / middle / late placement
            lora_alpha=2.0,
            init_std=0.02,
            dtype="float32",  # compute dtype of fetched blocks (what the model reads, what devices exchange)
            master_dtype="float32",  # stored parameters the optimizer updates; moments are always float32
            generic=True,  # train a context-independent generic memory of the fetched size
        )
    )

    c.bank = ml_collections.ConfigDict(
        dict(
            replicate_levels=1,  # levels up to this one are replicated on every device (an explicit choice)
            exchange_rows=0,  # rows per destination per exchange round; 0: an even share of a micro-batch
            device_levels=-1,  # levels 1..device_levels live on device; deeper ones off device (-1: all on device)
            host_cache_bytes=0,  # off-device levels: 0 = whole in host memory; > 0 = read from tensorstore, cached
            device_bytes=0,  # > 0: the bank state a device may hold; a bigger one fails naming levels to move off
        )
    )

    c.tree = ml_collections.ConfigDict(
        dict(
            k=16,
            depth=4,
            kmeans_steps=20,
            kmeans_batch=6400,
            balance_factor=1.5,  # a cluster over balance_factor / k of assignments is split
            seed=0,
            embedder="minilm",  # or "hash": a dependency-free hashed n-gram embedder (tests)
            embed_unit="document",  # or "window": non-overlapping windows of embed_window tokens
            embed_window=2048,
            embed_batch=64,
            embed_max_tokens=256,  # encoder window; longer texts are split and averaged
            embed_dtype="auto",  # MiniLM matmuls: "auto" = bfloat16 on GPU / TPU, float32 on CPU; or either
            fit_sample=4_000_000,  # the tree is fitted on at most this many units, drawn uniformly (all when fewer)
        )
    )

    c.data = ml_collections.ConfigDict(
        dict(
            corpus="facts",
            seq_len=2048,
            tokenizer="",  # path to a tokenizer.json; empty: train a byte-level BPE on the corpus
            tokenizer_vocab=8192,
            facts_documents=20_000,
            seed=0,
            records_per_shard=4096,
            unit_shards=1,  # `prepare --workers N`: input shards per work unit (the unit of resumable work)
            # the record field holding a document's text (JSON, parquet, CSV / TSV, Arrow, datasets);
            # at "text", records without it are read from "content" or "body"
            text_field="text",
            txt_split="file",  # a .txt file is one document ("file"), one per "paragraph" or per "line"
            entity_field="entity",  # document field naming what a document is about (routing diagnostics); "": off
            num_threads=2,
            prefetch=4,
        )
    )

    c.train = ml_collections.ConfigDict(
        dict(
            mode="anchor",
            steps=1000,
            batch_size=32,
            microbatch_size=0,  # global sequences per micro-step (gradient accumulation); 0: the whole batch
            subtree=-1,  # >= 0: train only level-1 subtree i's blocks on its sequences (frozen per-subtree jobs)
            # Misrouting robustness: this share of the fetching sequences reads a sibling's path instead
            # of its own (a uniform other node at level sibling_path_level, uniform below it); those
            # blocks do not learn from it, so only the anchor learns to cope with a block it did not get.
            sibling_path_prob=0.0,
            sibling_path_level=1,
            # the bank levels that learn (others are read, never updated); (): every level. memlm learn
            # trains the leaf level only, so blocks shared with other leaves keep what they hold
            memory_levels=(),
            loss_chunk=4096,  # tokens per device whose logits are held at once by the loss (never [B, T, vocab])
            seed=0,
            lr=5e-3,
            min_lr=5e-5,
            warmup_steps=100,
            weight_decay=0.05,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            clip_norm=1.0,
            memory_lr=1e-4,
            memory_min_lr=1e-5,
            memory_warmup_steps=100,
            memory_weight_decay=1e-3,
            checkpoint_every=200,
            keep_checkpoints=3,
            log_every=10,
            # > 0: every eval_every steps (and at the last step), held-out perplexity under the
            # eval.conditions and the accuracy on the data directory's probe files, to metrics.jsonl
            # and TensorBoard (memlm/train/evaluation.py); eval_probes caps the probes per file (0: all)
            eval_every=0,
            eval_probes=0,
            # where metrics go besides metrics.jsonl (always written): a comma list of "tensorboard"
            # and "wandb" (pip install 'memlm[track]'; WANDB_MODE=offline records without network)
            trackers="tensorboard",
            wandb_project="memlm",
        )
    )

    c.eval = ml_collections.ConfigDict(
        dict(
            conditions="none,generic,fetched,blocked",
            block_level=1,
            max_new_tokens=8,
            batch_size=16,
            heldout_documents=64,
            # held-out perplexity's retrieval key: "document" (the whole document, as the paper) or
            # "prefix:N" (also: the memory fetched with the first N tokens, only the tokens after them scored)
            perplexity_key="document",
            # confidence gate on "fetched": queries whose routing is not trusted get the generic memory.
            # "distance": farther than route_gate_threshold from their level-route_gate_level node's
            # centroid; "margin": a sibling within route_gate_threshold of that distance; "off".
            route_gate="off",
            route_gate_threshold=0.0,
            route_gate_level=1,
            # route_beam > 1: "fetched" scores the route_beam best paths (a beam by centroid distance)
            # and keeps, per text, the one under which the anchor gives the retrieval text the highest
            # likelihood; route_beam_generic adds the generic memory as one more candidate.
            route_beam=1,
            route_beam_generic=False,
            # "likelihood": descend the tree by the anchor's likelihood of the retrieval text instead of
            # by centroid distance: at each level the k children of the node chosen so far (each
            # completed greedily below) are scored and the likeliest kept (depth x k forwards a text).
            route_descent="embedding",
            route_descent_width=1,  # partial paths the likelihood descent keeps per level
            # > 0: keep the likeliest candidate only when its posterior (softmax of the candidates' and
            # the generic memory's log-likelihoods of the retrieval text) reaches this; else generic
            route_posterior=0.0,
            # > 0: a text whose greedy answer under the anchor alone has at least this probability gets
            # the fallback whatever the routing chose (memlm/infer/beam.py): memory for what the anchor
            # is unsure of
            route_anchor_confidence=0.0,
            # what a text falls back to (route_beam_generic, route_posterior, route_anchor_confidence,
            # route_gate): "generic", the
            # generic memory; "none", zero blocks: the anchor alone
            route_fallback="generic",
            # a run taught by `memlm learn` (memlm/infer/edits.py): a text whose log-likelihood under a
            # learned leaf's block rose by at least route_edit_gain nats over that block's rows before
            # the learn fetches that leaf's path, whatever the routing above chose
            route_edits=True,
            route_edit_gain=8.0,
            route_edit_candidates=64,  # learned leaves scored per text at most (those nearest its embedding)
            # the rag conditions: the rag_documents training documents nearest the retrieval text,
            # put before the context within rag_tokens tokens (memlm/infer/rag.py)
            rag_documents=3,
            rag_tokens=64,
        )
    )

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return c


def load_config(path: str | None = None) -> ml_collections.ConfigDict:
    """Load a preset file (``experiments/*.py`` with ``get_config()``), or the packaged default
    (:data:`DEFAULT_PRESET`, ``memlm/presets/tiny.py``).

    A ``.json`` file (a run's ``config.json``, or a bare config as JSON) or a run directory loads
    the config that run used: ``--config CONVERTED_RUN`` gives a config that matches a converted
    model's architecture, to override (memory, tree, train) for post-hoc memory training.
    """
    if path is not None and (path.endswith(".json") or Path(path).is_dir()):
        file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {str(file)!r} does not exist")
        try:
            obj = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {str(file)!r} is not valid JSON ({e})") from None
        return config_from_json(obj, str(file))
    if path is None:
        path = DEFAULT_PRESET
    spec_arg = None
    if ":" in path and not Path(path).exists():
        path, spec_arg = path.split(":", 1)
    if not Path(path).exists():
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"memlm_config_{Path(path).stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config()")
    return module.get_config(spec_arg) if spec_arg is not None else module.get_config()


def config_from_json(obj: dict, source: str = "config") -> ml_collections.ConfigDict:
    """A config from its JSON form (``{"config": {...}, ...}`` as a run records it, or the bare dict).

    Keys the JSON lacks keep their defaults (a run written before a key existed); keys memlm no
    longer has (:data:`REMOVED_KEYS`) are dropped; JSON lists become tuples where the schema has a
    tuple; unknown keys fail naming the key and the file.
    """
    data = obj.get("config", obj) if isinstance(obj, dict) else obj
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: not a memlm config (expected a JSON object)")
    cfg = default_config()
    for section, value in data.items():
        if section not in cfg:
            raise ConfigError(f"{source}: unknown config section {section!r}")
        if not isinstance(cfg[section], ml_collections.ConfigDict):
            cfg[section] = value
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: config section {section!r} must be an object, got {value!r}")
        for k, v in drop_removed_keys(section, value).items():
            if k not in cfg[section]:
                raise ConfigError(f"{source}: unknown config key {section}.{k}")
            current = cfg[section][k]
            if isinstance(current, tuple) and isinstance(v, list):
                v = tuple(v)
            elif isinstance(current, float) and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            try:
                cfg[section][k] = v
            except TypeError as e:
                raise ConfigError(f"{source}: config key {section}.{k} = {v!r}: {e}") from None
    return cfg


def drop_removed_keys(section: str, values: dict) -> dict:
    """A recorded config section without the keys memlm no longer has (:data:`REMOVED_KEYS`)."""
    gone = REMOVED_KEYS.get(section, ())
    return {k: v for k, v in values.items() if k not in gone}


def _parse_value(text: str, current: Any) -> Any:
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"expected a boolean, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"cannot parse {text!r}") from e
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list | int):
        value = tuple(value) if isinstance(value, list) else (value,)
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(f"expected {type(current).__name__}, got {text!r}")
    return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """Apply ``{"train.steps": "10"}``-style overrides; unknown keys fail naming the key."""
    for key, text in overrides.items():
        parts = key.split(".")
        node = cfg
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r} (in --config.{key})")
            if i < len(parts) - 1:
                node = node[part]
        try:
            node[parts[-1]] = _parse_value(text, node[parts[-1]])
        except ConfigError as e:
            raise ConfigError(f"config key {key!r}: {e}") from None
    return cfg


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"config key {key!r} = {value!r}: {why}")


def _check_positive(cfg: ml_collections.ConfigDict, section: str, keys: tuple[str, ...], strict=True) -> None:
    for k in keys:
        v = cfg[section][k]
        if not isinstance(v, int | float) or isinstance(v, bool) or (v <= 0 if strict else v < 0):
            _fail(f"{section}.{k}", v, "must be positive" if strict else "must not be negative")


def _check_choice(cfg: ml_collections.ConfigDict, key: str, choices: tuple[str, ...]) -> None:
    section, k = key.split(".")
    v = cfg[section][k]
    if v not in choices:
        _fail(key, v, f"unknown value; choose one of {', '.join(choices)}")


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check every section; raise ConfigError naming the first bad key and value."""
    expected = default_config()
    for section in expected:
        if section not in cfg:
            _fail(section, None, "missing section")
    for section in cfg:
        if section not in expected:
            _fail(section, cfg[section], "unknown config section")
        if isinstance(cfg[section], ml_collections.ConfigDict):
            for k in cfg[section]:
                if k not in expected[section]:
                    _fail(f"{section}.{k}", cfg[section][k], "unknown config key")
    m = cfg.model
    _check_positive(cfg, "model", ("vocab_size", "vocab_multiple", "d_model", "n_layers", "n_heads", "head_dim",
                                   "d_ff", "max_seq_len", "rope_base", "norm_eps", "init_std"))
    _check_positive(cfg, "model", ("n_kv_heads",), strict=False)
    if m.head_dim % 2:
        _fail("model.head_dim", m.head_dim, "must be even (RoPE rotates pairs of dimensions)")
    if m.n_kv_heads and m.n_heads % m.n_kv_heads:
        _fail("model.n_kv_heads", m.n_kv_heads, f"must divide model.n_heads = {m.n_heads}")
    if m.vocab_size % m.vocab_multiple:
        _fail("model.vocab_size", m.vocab_size, f"must be a multiple of model.vocab_multiple = {m.vocab_multiple}")
    _check_choice(cfg, "model.norm", NORMS)
    _validate_architecture(cfg)
    _check_choice(cfg, "model.remat", REMAT_POLICIES)
    _check_choice(cfg, "model.attention", ATTENTION_IMPLS)
    if m.attention == "splash" and cfg.data.seq_len % 128:
        _fail("model.attention", m.attention, f"splash attention tiles the sequence by 128: data.seq_len = "
              f"{cfg.data.seq_len} is not a multiple of 128")
    _check_choice(cfg, "model.param_dtype", DTYPES)
    _check_choice(cfg, "model.compute_dtype", DTYPES)

    mem = cfg.memory
    _check_choice(cfg, "memory.type", MEMORY_TYPES)
    _check_choice(cfg, "memory.placement", MEMORY_PLACEMENTS)
    _check_choice(cfg, "memory.dtype", DTYPES)
    sizes = tuple(mem.sizes)
    if not all(isinstance(r, int) and not isinstance(r, bool) for r in sizes):
        _fail("memory.sizes", sizes, "must be a tuple of integers (r_1, ..., r_p)")
    if any(r < 0 for r in sizes):
        _fail("memory.sizes", sizes, "sizes must not be negative")
    if mem.type != "none":
        if not any(sizes):
            _fail("memory.sizes", sizes, f"memory.type = {mem.type!r} needs at least one non-zero level")
        deepest = max(i + 1 for i, r in enumerate(sizes) if r)
        if deepest > cfg.tree.depth:
            _fail("memory.sizes", sizes, f"level {deepest} is deeper than the tree (tree.depth = {cfg.tree.depth})")
    _check_positive(cfg, "memory", ("placement_layers", "lora_alpha", "init_std"))
    if mem.placement != "all" and mem.placement_layers > m.n_layers:
        _fail("memory.placement_layers", mem.placement_layers, f"exceeds model.n_layers = {m.n_layers}")
    _check_choice(cfg, "memory.master_dtype", DTYPES)
    if mem.master_dtype == "bfloat16" and mem.dtype == "float32":
        _fail("memory.master_dtype", mem.master_dtype, "a bfloat16 master cannot feed a float32 compute copy")
    _check_positive(cfg, "bank", ("replicate_levels", "exchange_rows", "host_cache_bytes", "device_bytes"),
                    strict=False)
    dl = cfg.bank.device_levels
    if not isinstance(dl, int) or dl < -1:
        _fail("bank.device_levels", dl, "must be -1 (every level on device) or a level count >= 0")
    if dl != -1 and dl < cfg.bank.replicate_levels and mem.type != "none":
        _fail("bank.device_levels", dl, f"replicated levels (bank.replicate_levels = {cfg.bank.replicate_levels}) "
              "stay on device: move fewer levels off device or replicate fewer")

    _check_positive(cfg, "tree", ("k", "depth", "kmeans_steps", "kmeans_batch", "balance_factor", "embed_window",
                                  "embed_batch", "embed_max_tokens", "fit_sample"))
    if cfg.tree.k < 2:
        _fail("tree.k", cfg.tree.k, "a tree needs at least 2 children per node")
    _check_choice(cfg, "tree.embed_unit", EMBED_UNITS)
    _check_choice(cfg, "tree.embedder", EMBEDDERS)
    _check_choice(cfg, "tree.embed_dtype", EMBED_DTYPES)
    if cfg.tree.balance_factor < 1.0:
        _fail("tree.balance_factor", cfg.tree.balance_factor, "must be at least 1.0")

    _check_positive(cfg, "data", ("seq_len", "tokenizer_vocab", "facts_documents", "records_per_shard",
                                  "num_threads", "prefetch", "unit_shards"))
    if cfg.data.seq_len > m.max_seq_len:
        _fail("data.seq_len", cfg.data.seq_len, f"exceeds model.max_seq_len = {m.max_seq_len}")

    t = cfg.train
    _check_choice(cfg, "train.mode", TRAIN_MODES)
    _check_positive(cfg, "train", ("steps", "batch_size", "lr", "b1", "b2", "eps", "clip_norm", "memory_lr",
                                   "checkpoint_every", "keep_checkpoints", "log_every", "loss_chunk"))
    _check_positive(cfg, "train", ("microbatch_size", "eval_every", "eval_probes"), strict=False)
    if t.subtree >= 0:
        if t.mode != "frozen":
            _fail("train.subtree", t.subtree, "per-subtree jobs train the bank of a frozen anchor: "
                  "set train.mode=frozen")
        if t.subtree >= cfg.tree.k:
            _fail("train.subtree", t.subtree, f"the tree has level-1 nodes 0..{cfg.tree.k - 1}")
        if mem.generic:
            _fail("train.subtree", t.subtree, "the generic memory is shared by all subtrees and cannot be merged: "
                  "set memory.generic=false for per-subtree jobs")
    elif t.subtree != -1:
        _fail("train.subtree", t.subtree, "must be -1 (all subtrees) or a level-1 node")
    if not isinstance(t.sibling_path_prob, (int, float)) or not 0.0 <= t.sibling_path_prob < 1.0:
        _fail("train.sibling_path_prob", t.sibling_path_prob, "must be a probability in [0, 1)")
    levels = t.memory_levels
    if not isinstance(levels, (tuple, list)) or not all(isinstance(x, int) and 1 <= x <= cfg.tree.depth
                                                        for x in levels):
        _fail("train.memory_levels", levels, f"must be a tuple of tree levels in 1..{cfg.tree.depth} (() for all)")
    if not isinstance(t.sibling_path_level, int) or not 1 <= t.sibling_path_level <= cfg.tree.depth:
        _fail("train.sibling_path_level", t.sibling_path_level, f"must be a tree level in 1..{cfg.tree.depth}")
    if t.sibling_path_prob and t.mode == "frozen":
        _fail("train.sibling_path_prob", t.sibling_path_prob, "trains nothing with a frozen anchor (the blocks of a "
              "sibling-path row do not learn from it): use train.mode=cotrain")
    if t.microbatch_size and t.batch_size % t.microbatch_size:
        _fail("train.microbatch_size", t.microbatch_size, f"must divide train.batch_size = {t.batch_size}")
    _check_positive(cfg, "train", ("min_lr", "warmup_steps", "weight_decay", "memory_min_lr",
                                   "memory_warmup_steps", "memory_weight_decay"), strict=False)
    if not (0 < t.b1 < 1 and 0 < t.b2 < 1):
        _fail("train.b1/b2", (t.b1, t.b2), "must lie in (0, 1)")
    if t.mode in ("frozen", "cotrain", "scratch") and mem.type == "none":
        _fail("train.mode", t.mode, "needs a memory: set memory.type (e.g. 'ffn')")

    for c in str(cfg.eval.conditions).split(","):
        if c and c not in CONDITIONS:
            _fail("eval.conditions", cfg.eval.conditions, f"unknown condition {c!r}; choose from {CONDITIONS}")
    _check_positive(cfg, "eval", ("block_level", "max_new_tokens", "batch_size", "heldout_documents"))
    _check_positive(cfg, "eval", ("rag_documents", "rag_tokens"))
    _check_choice(cfg, "data.txt_split", ("file", "paragraph", "line"))
    for tracker in str(cfg.train.trackers).split(","):
        if tracker.strip() and tracker.strip() not in ("tensorboard", "wandb"):
            _fail("train.trackers", cfg.train.trackers, f"unknown tracker {tracker.strip()!r}; choose from "
                  "tensorboard, wandb (comma separated; metrics.jsonl is always written)")
    if not isinstance(cfg.data.text_field, str) or not cfg.data.text_field:
        _fail("data.text_field", cfg.data.text_field, "must name a record field")
    pkey = str(cfg.eval.perplexity_key)
    if pkey != "document" and not (pkey.startswith("prefix:") and pkey[7:].isdigit() and int(pkey[7:]) >= 1):
        _fail("eval.perplexity_key", pkey, "choose 'document' or 'prefix:N' with N >= 1 tokens")
    gate = cfg.eval.route_gate
    if gate not in ("off", "distance", "margin"):
        _fail("eval.route_gate", gate, "choose from 'off', 'distance' or 'margin'")
    if not isinstance(cfg.eval.route_gate_threshold, (int, float)) or cfg.eval.route_gate_threshold < 0:
        _fail("eval.route_gate_threshold", cfg.eval.route_gate_threshold, "must be a number >= 0")
    if not 1 <= cfg.eval.route_gate_level <= cfg.tree.depth:
        _fail("eval.route_gate_level", cfg.eval.route_gate_level, f"must be a tree level in 1..{cfg.tree.depth}")
    if not isinstance(cfg.eval.route_beam, int) or isinstance(cfg.eval.route_beam, bool) or cfg.eval.route_beam < 1:
        _fail("eval.route_beam", cfg.eval.route_beam, "must be an integer >= 1 (1: greedy routing)")
    if cfg.eval.route_descent not in ("embedding", "likelihood"):
        _fail("eval.route_descent", cfg.eval.route_descent, "choose from 'embedding' or 'likelihood'")
    w = cfg.eval.route_descent_width
    if not isinstance(w, int) or isinstance(w, bool) or w < 1:
        _fail("eval.route_descent_width", w, "must be an integer >= 1")
    if cfg.eval.route_descent == "likelihood" and cfg.eval.route_beam > 1:
        _fail("eval.route_beam", cfg.eval.route_beam, "is a beam by centroid distance: it does not combine with "
              "eval.route_descent='likelihood' (set route_beam=1)")
    q = cfg.eval.route_posterior
    if not isinstance(q, (int, float)) or isinstance(q, bool) or not 0.0 <= q <= 1.0:
        _fail("eval.route_posterior", q, "must be a probability in [0, 1] (0: off)")
    if not float(cfg.eval.route_edit_gain) > 0:
        _fail("eval.route_edit_gain", cfg.eval.route_edit_gain, "must be a number of nats > 0")
    if not int(cfg.eval.route_edit_candidates) >= 1:
        _fail("eval.route_edit_candidates", cfg.eval.route_edit_candidates, "must be an integer >= 1")
    if cfg.eval.route_fallback not in ("generic", "none"):
        _fail("eval.route_fallback", cfg.eval.route_fallback, "choose from 'generic' or 'none'")
    needs_generic = mem.type != "none" and not mem.generic and cfg.eval.route_fallback == "generic"
    if q > 0 and needs_generic:
        _fail("eval.route_posterior", q, "falls back to the generic memory: set memory.generic=true "
              "(or eval.route_fallback=none)")
    c = cfg.eval.route_anchor_confidence
    if not isinstance(c, (int, float)) or isinstance(c, bool) or not 0.0 <= c <= 1.0:
        _fail("eval.route_anchor_confidence", c, "must be a probability in [0, 1] (0: off)")
    if c > 0 and needs_generic:
        _fail("eval.route_anchor_confidence", c, "falls back to the generic memory: set memory.generic=true "
              "(or eval.route_fallback=none)")
    if cfg.eval.route_beam_generic and needs_generic:
        _fail("eval.route_beam_generic", True, "needs the generic memory: set memory.generic=true")
    if gate != "off" and needs_generic:
        _fail("eval.route_gate", gate, "falls back to the generic memory: set memory.generic=true")
    if cfg.eval.block_level > cfg.tree.depth:
        _fail("eval.block_level", cfg.eval.block_level, f"deeper than tree.depth = {cfg.tree.depth}")
    if mem.type != "none" and cfg.eval.block_level > max(i + 1 for i, r in enumerate(sizes) if r):
        # Blocking a level changes that node and its descendants: below the deepest memory level it changes nothing.
        _fail("eval.block_level", cfg.eval.block_level, f"below the deepest level with memory "
              f"(memory.sizes = {sizes}): blocking it would change no fetched block")

    for k in ("data", "fsdp", "tensor"):
        v = cfg.mesh[k]
        if not isinstance(v, int) or (v < 1 and v != -1):
            _fail(f"mesh.{k}", v, "must be a positive size or -1 (fill the remaining devices)")
    if [cfg.mesh[k] for k in ("data", "fsdp", "tensor")].count(-1) > 1:
        _fail("mesh", dict(cfg.mesh), "at most one axis may be -1")
    if cfg.mesh.tensor > 1:
        kv = m.n_kv_heads or m.n_heads
        if m.n_heads % cfg.mesh.tensor or kv % cfg.mesh.tensor:
            _fail("mesh.tensor", cfg.mesh.tensor, f"must divide the head counts ({m.n_heads}, {kv})")
    return cfg


def _validate_architecture(cfg: ml_collections.ConfigDict) -> None:
    """The family options of the model section (norm offsets, biases, sliding windows, RoPE scaling...)."""
    m, d = cfg.model, default_config().model
    get = lambda k: m.get(k, d[k])  # noqa: E731 - run directories written before a key existed use its default
    for k in ("norm_offset", "qkv_bias", "embed_scale", "post_norms"):
        if not isinstance(get(k), bool):
            _fail(f"model.{k}", get(k), "must be true or false")
    for k, choices in (("qk_norm_scope", QK_NORM_SCOPES), ("ffn_activation", FFN_ACTIVATIONS),
                       ("rope_scaling", ROPE_SCALINGS)):
        if get(k) not in choices:
            _fail(f"model.{k}", get(k), f"unknown value; choose one of {', '.join(choices)}")
    for k in ("sliding_window", "rope_local_base", "query_pre_attn_scalar", "attn_softcap", "final_softcap"):
        v = get(k)
        if not isinstance(v, int | float) or isinstance(v, bool) or v < 0:
            _fail(f"model.{k}", v, "must be a number >= 0 (0: off)")
    for k in ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len"):
        v = get(k)
        if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
            _fail(f"model.{k}", v, "must be positive")
    if get("rope_scaling") == "llama3" and get("rope_high_freq_factor") <= get("rope_low_freq_factor"):
        _fail("model.rope_high_freq_factor", get("rope_high_freq_factor"),
              f"must exceed model.rope_low_freq_factor = {get('rope_low_freq_factor')} for llama3 RoPE scaling")
    local = get("local_layers")
    if not isinstance(local, tuple | list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in local):
        _fail("model.local_layers", local, "must be a tuple of layer indices")
    bad = [i for i in local if not 0 <= i < m.n_layers]
    if bad:
        _fail("model.local_layers", tuple(local), f"layer {bad[0]} is outside 0..{m.n_layers - 1}")
    if len(set(local)) != len(local):
        _fail("model.local_layers", tuple(local), "lists a layer twice")
    if local and not get("sliding_window"):
        _fail("model.local_layers", tuple(local), "local layers need model.sliding_window > 0")
    if not isinstance(get("sliding_window"), int):
        _fail("model.sliding_window", get("sliding_window"), "must be an integer number of tokens")


def memory_layers(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
    """The [start, end) range of anchor layers that receive memory (placement ablation, Tab. 9)."""
    n, p = cfg.model.n_layers, cfg.memory.placement_layers
    if cfg.memory.placement == "all":
        return 0, n
    if cfg.memory.placement == "early":
        return 0, p
    if cfg.memory.placement == "late":
        return n - p, n
    start = (n - p) // 2
    return start, start + p


def padded_vocab(n: int, multiple: int) -> int:
    """Round a tokenizer's vocabulary up to the model's multiple (GPT-NeoX: 50,277 -> 50,432 at 128...)."""
    return int(math.ceil(n / multiple) * multiple)


def mesh_shape(cfg: ml_collections.ConfigDict, n_devices: int) -> tuple[int, int, int]:
    """Resolve (data, fsdp, tensor) against a device count; -1 fills. Fails naming the axis."""
    sizes = {k: cfg.mesh[k] for k in ("data", "fsdp", "tensor")}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if n_devices % fixed:
        raise ConfigError(f"config key 'mesh' = {sizes}: the fixed axes ({fixed}) do not divide {n_devices} devices")
    for k, v in sizes.items():
        if v == -1:
            sizes[k] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise ConfigError(f"config key 'mesh' = {sizes}: uses {math.prod(sizes.values())} devices, have {n_devices}")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]
