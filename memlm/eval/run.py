"""``memlm eval``: load a run, build its memory conditions, score probes and perplexity, report.

A run is evaluated with the data directory it was trained on (recorded in its config.json):
the same tokenizer, the same tree and the same embedder, so an evaluation context routes
through exactly the code that routed the training documents. Results go to
``RUN_DIR/eval/<probes>.json`` (DESIGN.md §6), a table on the console and a bar plot per bucket
and condition (``RUN_DIR/eval/<probes>.png``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from memlm.config import apply_overrides, validate
from memlm.eval.conditions import ConditionError, parse_conditions
from memlm.memspec import FetchedMemory
from memlm.model.functional import AnchorFunctional


@dataclasses.dataclass
class Run:
    """Everything needed to score a trained run."""

    cfg: ml_collections.ConfigDict
    workdir: Path
    data_dir: Path
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
    """The run's :class:`~memlm.eval.conditions.MemoryProvider`: texts -> embed -> route -> gather.

    ``fetched`` routes each text greedily; ``blocked`` takes, at ``block_level``, the next-best
    sibling of the text's own node (the paper's blocking test); ``generic`` is the run's generic
    memory (one row shared by all texts); ``none`` is no memory. Embeddings are cached per text,
    so scoring several conditions embeds each context once.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: Path, data_dir: Path, manifest: dict,
                 meta: dict | None = None):
        self.cfg = cfg
        self.bank = self.generic = None
        self.tree = self.embedder = None
        self._emb_cache: dict[str, np.ndarray] = {}
        available = ["none"]
        if cfg.memory.type != "none" and (workdir / "bank").exists():
            from memlm.bank.layout import BankLayout
            from memlm.bank.store import BankStore
            from memlm.retrieval import Tree, get_embedder

            tree_info = manifest["tree"]
            self.tree = Tree.load(data_dir / tree_info["path"], expect_dim=int(tree_info["dim"]),
                                  expect_embedder=tree_info["embedder"])
            ecfg = ml_collections.ConfigDict(cfg.to_dict())
            ecfg.tree.embedder = tree_info["embedder"]
            self.embedder = get_embedder(ecfg)
            # The bank version the loaded checkpoint pairs with (a later, unpaired save is not used).
            meta = meta or {}
            self.bank = BankStore.open(workdir / "bank", BankLayout.from_config(cfg), tree_id=self.tree.id,
                                       version=meta.get("bank_version")).load(inference=True)
            available += ["fetched", "blocked"]
            if cfg.memory.generic and (workdir / "generic").exists():
                self.generic = BankStore.open(workdir / "generic", BankLayout.generic_from_config(cfg),
                                              version=meta.get("generic_version")).load(inference=True)
                available.insert(1, "generic")
        self.available = tuple(available)
        self._gather = jax.jit(_gather)

    def paths(self, texts: list[str], condition: str = "fetched") -> np.ndarray:
        """The tree path of each text under ``fetched`` or ``blocked`` routing."""
        from memlm.retrieval import route

        missing = [t for t in dict.fromkeys(texts) if t not in self._emb_cache]
        if missing:
            for t, e in zip(missing, self.embedder.embed(missing), strict=True):
                self._emb_cache[t] = e
        emb = np.stack([self._emb_cache[t] for t in texts])
        block = self.cfg.eval.block_level if condition == "blocked" else None
        return route(self.tree, emb, block_level=block)

    def __call__(self, texts: list[str], condition: str) -> FetchedMemory | None:
        if condition not in self.available:
            raise ConditionError(f"condition {condition!r} is not available for this run "
                                 f"(available: {', '.join(self.available)})")
        if condition == "none":
            return None
        if condition == "generic":
            return self._gather(self.generic, jnp.zeros((1, 1), jnp.int32))
        return self._gather(self.bank, jnp.asarray(self.paths(texts, condition)))


def _gather(state, paths):
    from memlm.bank.device import gather

    return gather(state, paths)


def load_run(workdir: str | Path, data_dir: str | Path | None = None,
             overrides: dict[str, str] | None = None) -> Run:
    """Load a run's config, newest complete anchor parameters, tokenizer, tree and banks."""
    from memlm.data.records import read_manifest
    from memlm.data.tokenizer import load_tokenizer
    from memlm.train.checkpoint import abstract_like, restore_item
    from memlm.train.loop import load_run_config

    workdir = Path(workdir)
    cfg, record = load_run_config(workdir)
    if overrides:
        apply_overrides(cfg, {k: v for k, v in overrides.items() if k.startswith("eval.")})
        validate(cfg)
    data_dir = Path(data_dir or record["data_dir"])
    manifest = read_manifest(data_dir)
    fn = AnchorFunctional(cfg)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step, params, meta = restore_item(workdir, "params",
                                      abstract_like(fn.shapes, jax.tree.map(lambda _: one, fn.shapes)))
    tokenizer = load_tokenizer(data_dir / manifest["tokenizer"]["path"], cfg.model.vocab_multiple)
    return Run(cfg=cfg, workdir=workdir, data_dir=data_dir, fn=fn, params=params, step=step, tokenizer=tokenizer,
               memory=RunMemory(cfg, workdir, data_dir, manifest, meta))


def _heldout(run: Run) -> tuple[list[np.ndarray], list[str]]:
    path = run.data_dir / "heldout.jsonl"
    if not path.exists():
        return [], []
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    texts = texts[: run.cfg.eval.heldout_documents]
    eot = run.tokenizer.eot_id
    docs = [np.concatenate([run.tokenizer.encode(t), [eot]]).astype(np.int32) for t in texts]
    return docs, texts


def evaluate_run(run: Run, probe_files: list[Path], conditions: tuple[str, ...], quiet: bool = False) -> dict:
    """Perplexity on the held-out documents and accuracy on each probe file, per condition."""
    from memlm.eval.perplexity import evaluate_perplexity
    from memlm.eval.plot import PlotUnavailableError, format_table, plot_buckets
    from memlm.eval.probes import evaluate_probes, load_probes

    ev = run.cfg.eval
    out_dir = run.workdir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    docs, texts = _heldout(run)
    ppl = {}
    if docs:
        ppl = evaluate_perplexity(run.fn, run.params, docs, texts, run.memory, conditions,
                                  seq_len=run.cfg.data.seq_len, batch_size=ev.batch_size)["conditions"]
    results = {}
    for path in probe_files:
        probes = load_probes(path)
        res = evaluate_probes(run.fn, run.params, run.tokenizer, probes, run.memory, conditions,
                              max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, return_outputs=True)
        name = path.stem
        result = {"probes": name, "file": str(path), "run": str(run.workdir), "step": run.step,
                  "conditions": res["conditions"],
                  "perplexity": {c: ppl[c]["perplexity"] for c in ppl}}
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
        (out_dir / f"{name}.outputs.json").write_text(json.dumps(res["outputs"], indent=2))
        if not quiet:
            print(format_table(result, title=f"{name} ({run.workdir}, step {run.step})"))
        try:
            plot_buckets(result, out_dir / f"{name}.png", title=f"{name}: accuracy by frequency bucket")
        except PlotUnavailableError as e:
            print(f"memlm eval: no plot ({e})")
        results[name] = result
    if not quiet:
        print(f"memlm eval: wrote {', '.join(str(out_dir / f'{n}.json') for n in results)} and plots in {out_dir}")
    return results


def probe_files_of(run: Run, probes: str | None) -> list[Path]:
    if probes:
        return [Path(probes)]
    from memlm.data.records import read_manifest

    files = read_manifest(run.data_dir).get("probes", {})
    if not files:
        raise FileNotFoundError(f"no probe file given and {str(run.data_dir)!r} has no built-in probes: "
                                "pass --probes FILE.jsonl")
    return [run.data_dir / f for f in files.values()]


def evaluate(workdir: str | Path, probes: str | None = None, conditions: str | None = None,
             data_dir: str | Path | None = None, overrides: dict[str, str] | None = None) -> dict:
    """The ``memlm eval`` verb."""
    run = load_run(workdir, data_dir, overrides)
    wanted = parse_conditions(conditions or run.cfg.eval.conditions)
    conds = tuple(c for c in wanted if c in run.conditions)
    skipped = [c for c in wanted if c not in conds]
    if skipped:
        print(f"memlm eval: skipping {', '.join(skipped)} (this run has {', '.join(run.conditions)})")
    return evaluate_run(run, probe_files_of(run, probes), conds)
