"""Opening a trained run for inference: its anchor parameters, tokenizer, tree and banks.

A run is opened with the data directory it was trained on (recorded in its config.json): the
same tokenizer, the same tree and the same embedder, so a text routes through exactly the code
that routed the training documents. ``memlm eval``, ``memlm generate`` and conversion all open
runs here; none of them imports training.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from memlm.config import ConditionError, apply_overrides, validate
from memlm.infer.conditions import memory_condition
from memlm.memspec import FetchedMemory
from memlm.model.functional import AnchorFunctional
from memlm.run.checkpoints import abstract_like, restore_item
from memlm.run.directory import RunDir
from memlm.run.paths import location


@dataclasses.dataclass
class Run:
    """Everything needed to score a trained run."""

    cfg: ml_collections.ConfigDict
    workdir: epath.Path
    data_dir: epath.Path
    fn: AnchorFunctional
    params: Any
    step: int
    tokenizer: Any
    memory: RunMemory

    @property
    def conditions(self) -> tuple[str, ...]:
        """The conditions this run supports (an anchor-only run has only ``none``)."""
        return self.memory.available


class RunMemory:
    """The run's :class:`~memlm.infer.conditions.MemoryProvider`: texts -> embed -> route -> gather.

    ``fetched`` routes each text greedily; ``blocked`` takes, at ``block_level``, the next-best
    sibling of the text's own node (the paper's blocking test); ``generic`` is the run's generic
    memory (one row shared by all texts); ``none`` is no memory. Embeddings are cached per text,
    so scoring several conditions embeds each context once.

    With ``eval.route_gate`` on, ``fetched`` gives the generic memory to the texts whose routing
    the gate does not trust (``retrieval.confidence.gated``): far from their node's centroid, or
    nearly as close to a sibling. The other texts keep their path's blocks.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: epath.Path, data_dir: epath.Path, manifest: dict,
                 meta: dict | None = None, tokenizer: Any = None):
        self.cfg, self.data_dir, self.manifest, self.tokenizer = cfg, data_dir, manifest, tokenizer
        self._documents = None
        self.bank = self.generic = self.tiers = None
        self.tree = self.embedder = None
        self._emb_cache: dict[str, np.ndarray] = {}
        self._tree_info = manifest.get("tree")
        available = ["none"]
        if cfg.memory.type != "none" and (workdir / "bank").exists():
            from memlm.bank.layout import BankLayout
            from memlm.bank.store import BankStore
            from memlm.retrieval import Tree

            tree_info = manifest["tree"]
            self.tree = Tree.load(data_dir / tree_info["path"], expect_dim=int(tree_info["dim"]),
                                  expect_embedder=tree_info["embedder"])
            self.embedder = self._make_embedder()
            # The bank version the loaded checkpoint pairs with (a later, unpaired save is not used).
            meta = meta or {}
            store = BankStore.open(workdir / "bank", BankLayout.from_config(cfg), tree_id=self.tree.id,
                                   version=meta.get("bank_version"))
            self.tiers = None
            if 0 <= cfg.bank.device_levels < store.layout.levels[-1].level:
                # deep levels stay off device (``bank.device_levels``): blocks read per batch of texts
                from memlm.bank.tiers import InferenceTiers

                self.tiers = InferenceTiers(store, cfg.bank.device_levels, cfg.bank.host_cache_bytes)
            else:
                self.bank = store.load(inference=True)
            available += ["fetched", "blocked"]
            if cfg.memory.generic and (workdir / "generic").exists():
                self.generic = BankStore.open(workdir / "generic", BankLayout.generic_from_config(cfg),
                                              version=meta.get("generic_version")).load(inference=True)
                available.insert(1, "generic")
        if self._tree_info is not None and tokenizer is not None:
            available += ["rag", "rag+fetched"] if "fetched" in available else ["rag"]
        self.available = tuple(available)
        if cfg.eval.route_gate != "off" and "fetched" in self.available and self.generic is None:
            raise ConditionError(f"eval.route_gate = {cfg.eval.route_gate!r} falls back to the generic memory, and "
                                 f"{str(workdir)!r} has none")
        self._gather = jax.jit(_gather)
        self._mix = jax.jit(_mix)

    def _make_embedder(self):
        """The embedder the data directory's documents were embedded with (its name and dtype)."""
        from memlm.retrieval import get_embedder

        if self._tree_info is None:
            raise ConditionError("this data directory has no tree (a converted checkpoint's folder): nothing "
                                 "says which embedder its documents were embedded with")
        ecfg = ml_collections.ConfigDict(self.cfg.to_dict())
        ecfg.tree.embedder = self._tree_info["embedder"]
        ecfg.tree.embed_dtype = self._tree_info.get("embed_dtype", "float32")  # as the documents were embedded
        return get_embedder(ecfg)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit embeddings of texts, as the training documents were embedded (cached per text)."""
        if self.embedder is None:
            self.embedder = self._make_embedder()
        return self._embed(texts)

    def _preload(self) -> None:
        """The held-out documents' embeddings ``memlm prepare`` computed (``heldout_embeddings.npy``), when
        this embedder is the one that computed them: perplexity does not embed them again."""
        self._preloaded = True
        path = self.data_dir / "heldout_embeddings.npy"
        tree = self._tree_info or {}
        emb = self.embedder
        mine = (emb.name, getattr(emb, "dtype", "float32"), getattr(emb, "max_tokens", None))
        theirs = (tree.get("embedder"), tree.get("embed_dtype", "float32"),
                  tree.get("embed_max_tokens") if mine[2] is not None else None)
        if mine != theirs or not path.exists() or not (self.data_dir / "heldout.jsonl").exists():
            return
        import json

        vecs = np.load(path)
        texts = [json.loads(line)["text"] for line in (self.data_dir / "heldout.jsonl").read_text().splitlines()
                 if line.strip()]
        if len(texts) == len(vecs):
            self._emb_cache.update({t: v for t, v in zip(texts, vecs, strict=True)})

    def _embed(self, texts: list[str]) -> np.ndarray:
        if not getattr(self, "_preloaded", False):
            self._preload()
        missing = [t for t in dict.fromkeys(texts) if t not in self._emb_cache]
        if missing:
            for t, e in zip(missing, self.embedder.embed(missing), strict=True):
                self._emb_cache[t] = e
        return np.stack([self._emb_cache[t] for t in texts])

    def documents(self, texts: list[str]) -> list[list[int]]:
        """The token ids the rag conditions put before each text (``memlm.infer.rag``; the index is
        built on first use)."""
        if self._documents is None:
            from memlm.infer.rag import DocumentIndex, RagError, RetrievedDocuments, build_index

            index = DocumentIndex(build_index(self.data_dir, self.manifest, self.tokenizer))
            if index.embedder != self._tree_info["embedder"]:
                raise RagError(f"the rag index of {str(self.data_dir)!r} was embedded with {index.embedder!r}, "
                               f"its tree with {self._tree_info['embedder']!r}: run `memlm prepare` again")
            self._documents = RetrievedDocuments(index, self.embed, self.tokenizer, int(self.cfg.eval.rag_documents),
                                                 int(self.cfg.eval.rag_tokens))
        return self._documents(texts)

    def paths(self, texts: list[str], condition: str = "fetched") -> np.ndarray:
        """The tree path of each text under ``fetched`` or ``blocked`` routing."""
        from memlm.retrieval import route

        condition = memory_condition(condition)
        block = self.cfg.eval.block_level if condition == "blocked" else None
        return route(self.tree, self._embed(texts), block_level=block)

    def gated(self, texts: list[str], paths: np.ndarray | None = None) -> np.ndarray:
        """bool ``[n]``: the texts the ``eval.route_gate`` sends to the generic memory (none when off)."""
        from memlm.retrieval.confidence import gated, path_scores

        ev = self.cfg.eval
        if ev.route_gate == "off":
            return np.zeros(len(texts), bool)
        paths = self.paths(texts) if paths is None else paths
        distance, margin = path_scores(self.tree, self._embed(texts), paths)
        return gated(distance, margin, ev.route_gate, float(ev.route_gate_threshold), int(ev.route_gate_level))

    def __call__(self, texts: list[str], condition: str) -> FetchedMemory | None:
        if condition not in self.available:
            raise ConditionError(f"condition {condition!r} is not available for this run "
                                 f"(available: {', '.join(self.available)})")
        condition = memory_condition(condition)
        if condition == "none":
            return None
        if condition == "generic":
            return self._gather(self.generic, jnp.zeros((1, 1), jnp.int32))
        paths = self.paths(texts, condition)
        memory = self.tiers.gather(paths) if self.tiers is not None else self._gather(self.bank, jnp.asarray(paths))
        if condition == "fetched" and self.cfg.eval.route_gate != "off":
            mask = self.gated(texts, paths)
            if mask.any():
                memory = self._mix(memory, self._gather(self.generic, jnp.zeros((1, 1), jnp.int32)), jnp.asarray(mask))
        return memory


def _gather(state, paths):
    from memlm.bank.device import gather

    return gather(state, paths)


def _mix(fetched: FetchedMemory, generic: FetchedMemory, use_generic: jax.Array) -> FetchedMemory:
    """Row i of ``fetched``, or the (one-row) generic memory where ``use_generic[i]``."""
    return {name: jnp.where(use_generic.reshape((-1,) + (1,) * (a.ndim - 1)), generic[name].astype(a.dtype), a)
            for name, a in fetched.items()}


def load_run(workdir: str | os.PathLike, data_dir: str | os.PathLike | None = None,
             overrides: dict[str, str] | None = None, fn: AnchorFunctional | None = None) -> Run:
    """Load a run's config, newest complete anchor parameters, tokenizer, tree and banks.

    ``fn``: the anchor of an earlier load of the same run, whose compiled scoring and decoding are
    reused (evaluation during training opens each new checkpoint with it)."""
    from memlm.data.records import read_manifest
    from memlm.data.tokenizer import check_template, load_tokenizer

    workdir = location(workdir)
    cfg, record = RunDir(workdir).load_config()
    if overrides:
        # evaluation settings and where the bank lives (``bank.*`` tiers) may differ from training
        apply_overrides(cfg, {k: v for k, v in overrides.items() if k.startswith(("eval.", "bank."))})
        validate(cfg)
    data_dir = location(data_dir or record["data_dir"])
    manifest = read_manifest(data_dir)
    fn = fn if fn is not None else AnchorFunctional(cfg)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    step, params, meta = restore_item(workdir, "params",
                                      abstract_like(fn.shapes, jax.tree.map(lambda _: one, fn.shapes)))
    tokenizer = load_tokenizer(data_dir / manifest["tokenizer"]["path"], cfg.model.vocab_multiple)
    if manifest.get("kind") != "tokenizer":  # a converted run's folder holds no tokens to check
        check_template(manifest["tokenizer"].get("template"), tokenizer, str(data_dir))
    return Run(cfg=cfg, workdir=workdir, data_dir=data_dir, fn=fn, params=params, step=step, tokenizer=tokenizer,
               memory=RunMemory(cfg, workdir, data_dir, manifest, meta, tokenizer))
