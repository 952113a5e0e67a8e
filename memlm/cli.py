"""The ``memlm`` command line: prepare, train, eval, generate, info, convert, export, route, merge, sweep, demo.

Every verb works with no flags on the embedded default (the tiny preset packaged as
``memlm/presets/tiny.py`` and the generated facts corpus). Configs are preset files (the paper's
under ``experiments/``) overridden with
``--config.section.key=value``; bad keys and values fail at once with one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from collections.abc import Sequence

import ml_collections

from memlm.config import ConfigError, apply_overrides, load_config, validate

DEFAULT_DATA = "data/facts"
DEFAULT_RUN = "runs/tiny"


class UsageError(ValueError):
    """A command-line or input problem: reported as one line, exit status 2."""


def _split_config_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    rest, overrides = [], {}
    it = iter(argv)
    for arg in it:
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                value = next(it, None)
                if value is None:
                    raise UsageError(f"{arg} needs a value")
            overrides[key] = value
        else:
            rest.append(arg)
    return rest, overrides


def resolve_config(path: str | None, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """Load a preset, apply overrides and validate (fails naming the bad key and value)."""
    cfg = load_config(path)
    apply_overrides(cfg, overrides)
    return validate(cfg)


def _cmd_info(args, cfg) -> None:
    if args.block is not None or args.run is not None:
        if args.run is None or args.block is None:
            raise UsageError("give a run and a block: memlm info RUN --block LEVEL:NODE")
        from memlm.infer.lineage import format_trace, trace
        from memlm.infer.run import load_run

        print(format_trace(trace(load_run(args.run), block=args.block, limit=args.limit)))
        return
    from memlm.model.accounting import accounting

    acc = accounting(cfg)
    if args.json:
        print(json.dumps(acc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    m = cfg.model
    console = Console()
    console.print(f"[bold]{cfg.name}[/]: anchor L={m.n_layers} d={m.d_model} heads={m.n_heads}x{m.head_dim} "
                  f"kv_heads={m.n_kv_heads or m.n_heads} d_ff={m.d_ff} vocab={m.vocab_size} "
                  f"{'tied' if m.tied_embeddings else 'separate'} head")
    t = Table(title="memory bank" if acc["levels"] else None)
    for col in ("level", "nodes", "r", "block params", "bank params"):
        t.add_column(col, justify="right")
    for lv in acc["levels"]:
        t.add_row(str(lv["level"]), f"{lv['nodes']:,}", str(lv["r"]), f"{lv['block_params']:,}",
                  f"{lv['bank_params']:,}")
    if acc["levels"]:
        console.print(t)
    fl = acc["flops_per_token"]
    rows = [
        ("anchor parameters", f"{acc['anchor_params']:,}"),
        ("anchor non-embedding", f"{acc['anchor_non_embedding']:,}"),
        ("memory type", f"{acc['memory_type']} {tuple(acc['memory_sizes'])}"),
        ("fetched parameters", f"{acc['fetched_params']:,} ({100 * acc['fetched_ratio']:.1f}% of anchor)"),
        ("bank parameters", f"{acc['bank_params']:,} ({acc['bank_bytes'] / 1e9:.2f} GB in {acc['bank_dtype']})"),
        ("bank training state", f"{acc['bank_state_bytes'] / 1e9:.2f} GB ({acc['master_dtype']} master + float32 "
                                "moments + counters)"),
        ("generic memory", f"{acc['generic_params']:,}"),
        (f"train FLOPs/token (S={acc['seq_len']})",
         f"anchor {fl['anchor_train']:.3e}, memory {fl['memory_train']:.3e}"),
        ("inference FLOPs/token", f"anchor {fl['anchor_inference']:.3e}, memory {fl['memory_inference']:.3e}"),
        ("memory / dense FLOP ratio", f"{acc['flop_ratio']:.3f}"),
    ]
    tiers = _tiers_here(cfg)
    if tiers:
        rows.append((f"bank per device ({tiers[0]} devices here)", ", ".join(
            f"L{t['level']} {t['tier']} {t['device_bytes'] / 1e9:.3g} GB" for t in tiers[1])))
        off = sum(t["off_device_bytes"] for t in tiers[1])
        if off:
            rows.append(("bank off device, per shard", f"{off / 1e9:.3g} GB"))
    s = Table(show_header=False)
    s.add_column()
    s.add_column(justify="right")
    for r in rows:
        s.add_row(*r)
    console.print(s)


def _tiers_here(cfg) -> tuple[int, list[dict]] | None:
    """The bank's tiers on this host's devices with the config's mesh (None: no memory, or the mesh
    does not fit the local devices; ``memlm compile`` reports them for any topology)."""
    import jax

    from memlm.bank.placement import tier_report
    from memlm.config import ConfigError, mesh_shape
    from memlm.memspec import uses_memory
    from memlm.sharding import make_mesh

    if not uses_memory(cfg):
        return None
    devices = jax.devices()
    try:
        mesh = make_mesh(mesh_shape(cfg, len(devices)), devices)
    except (ConfigError, ValueError):
        return None
    return len(devices), tier_report(cfg, mesh)  # a device budget it exceeds fails naming the levels


def _cmd_compile(args, cfg) -> None:
    from memlm.train.compile import CompileError, compile_report, misfit_line

    report = compile_report(cfg, args.topology, capacity=args.capacity)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        pd = report["per_device"]
        gb = lambda x: "-" if x is None else f"{x / 1e9:.2f} GB"  # noqa: E731
        print(f"memlm compile: {report['config']} on {report['topology']} ({report['devices']}), mesh "
              f"{report['mesh']}, batch {report['global_batch']} in {report['micro_steps']} micro-steps of "
              f"{report['microbatch']}")
        print(f"  per device: arguments {gb(pd['arguments'])}, temporaries {gb(pd['temporaries'])}, outputs "
              f"{gb(pd['outputs'])}, total {gb(pd['total'])} of {gb(pd['capacity'])}")
        for t in report.get("tiers", []):
            off = f", {gb(t['off_device_bytes'])} per shard off device" if t["tier"] != "device" else ""
            print(f"  bank level {t['level']}: {t['tier']}, {gb(t['device_bytes'])} of training state per device{off}")
        for c in report["collectives"][:12]:
            print(f"  {c['op']:<20} {c['bytes'] / 2**20:>12.2f} MiB  x{c['count']}")
    if not report["fits"]:
        raise CompileError(misfit_line(report))


def _cmd_prepare(args, cfg) -> None:
    from memlm.data.prepare import prepare

    out = args.out or default_out(args.corpus)
    prepare(cfg, args.corpus, out, workers=args.workers, pipeline_options=args.pipeline_options or ())


def default_out(corpus: str) -> str:
    """``data/<name>``: the corpus file's or folder's name without its extensions (``data/facts``)."""
    import re

    if corpus.startswith("hf://datasets/"):  # OWNER/NAME/CONFIG:SPLIT -> NAME_CONFIG
        parts = corpus[len("hf://datasets/"):].split(":")[0].split("/")
        name = "_".join(parts[1:] or parts)
    else:
        fixed = re.split(r"[*?\[]", corpus)[0]  # a glob: its fixed part
        name = fixed.rstrip("/").rsplit("/", 1)[-1] if fixed == corpus else fixed.rsplit("/", 1)[0].rsplit("/", 1)[-1]
    name = name or "corpus"
    name = re.sub(r"(\.(jsonl|json|parquet|pq|txt|csv|tsv|arrow|gz|zst|zstd))+$", "", name, flags=re.I) or "corpus"
    return f"data/{re.sub(r'[^A-Za-z0-9_.=+-]', '_', name)}"


def _cmd_train(args, cfg) -> None:
    from memlm.train.loop import train

    distributed = None
    if args.coordinator or args.num_processes is not None or args.process_id is not None:
        distributed = dict(coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    if args.local_device_ids:
        distributed = dict(distributed or {}, local_device_ids=[int(x) for x in args.local_device_ids.split(",")])
    train(cfg, data_dir=args.data, workdir=args.workdir, init_from=args.init_from,
          allow_config_change=args.allow_config_change, distributed=distributed)


def _cmd_merge(args, cfg) -> None:
    from memlm.train.merge import merge_runs

    merge_runs(args.runs, args.out)


def _cmd_eval(args, cfg) -> None:
    from memlm.eval.run import evaluate

    if args.perplexity_key:
        args.overrides = {**args.overrides, "eval.perplexity_key": args.perplexity_key}
    if args.tasks:
        from memlm.eval.harness_run import evaluate_harness

        evaluate_harness(args.workdir, args.tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                         conditions=args.conditions, limit=args.limit, data_dir=args.data, overrides=args.overrides,
                         suite_data=args.suite_data)
        return
    evaluate(args.workdir, probes=args.probes, conditions=args.conditions, data_dir=args.data,
             perplexity_only=args.perplexity_only,
             overrides=args.overrides)


def _cmd_trace(args, cfg) -> None:
    from memlm.infer.lineage import format_trace, trace
    from memlm.infer.run import load_run

    if (args.text is None) == (args.block is None):
        raise UsageError("give one of --text TEXT or --block LEVEL:NODE")
    print(format_trace(trace(load_run(args.workdir, args.data), text=args.text, block=args.block, limit=args.limit)))


def _cmd_learn(args, cfg) -> None:
    from memlm.edit.learn import learn

    e = learn(args.run, args.corpus, steps=args.steps, epochs=args.epochs, replay=args.replay, lr=args.lr,
              batch_size=args.batch_size, levels=args.levels)
    print(f"memlm learn: edit {e['edit']}: {e['documents']} documents (numbers {e['first_document']}.."
          f"{e['first_document'] + e['documents'] - 1}) into {len(e['leaves'])} leaves; {e['steps']} steps on "
          f"{e['new_sequences']} new + {e['replay_sequences']} replayed sequences, loss {e['loss_first']:.3f} -> "
          f"{e['loss_last']:.3f}; checkpoint {e['step']} (bank version {e.get('bank_version')}), "
          f"{e['seconds_total']:.0f} s")


def _cmd_forget(args, cfg) -> None:
    from memlm.edit.forget import forget

    e = forget(args.run, documents=args.documents, entity=args.entity, corpus=args.corpus, levels=args.levels,
               steps=args.steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    reset = ", ".join(f"level {lv}: {len(ids)}" for lv, ids in e["reset"].items())
    print(f"memlm forget: edit {e['edit']}: {len(e['documents'])} documents forgotten; blocks reset ({reset}) and "
          f"retrained on {e['retrain_sequences']} sequences of {len(e['leaves_retrained'])} leaves in {e['steps']} "
          f"steps; checkpoint {e['step']} (bank version {e.get('bank_version')}), {e['seconds_total']:.0f} s. "
          "The anchor and the levels not reset still learnt from them (docs/editing.md)")


def _cmd_generate(args, cfg) -> None:
    from memlm.serve.generate import generate_cli

    generate_cli(args.workdir, args.prompt, condition=args.condition, max_new_tokens=args.max_new_tokens,
                 overrides=args.overrides, chat=args.chat)


def _cmd_convert(args, cfg) -> None:
    from memlm.convert.run import from_hf, to_hf
    from memlm.convert.safetensors import parse_size

    if bool(args.from_hf) == bool(args.to_hf):
        raise UsageError("give one of --from-hf HF_DIR or --to-hf RUN_DIR (with --out)")
    if args.from_hf:
        if args.family:
            raise UsageError("--family applies to --to-hf (the HF folder's config.json names its family)")
        from_hf(args.from_hf, args.out, overrides=args.overrides)
    else:
        if args.overrides:
            raise UsageError("--config.* overrides apply to --from-hf (the run's own config is exported)")
        to_hf(args.to_hf, args.out, family=args.family, max_shard_bytes=parse_size(args.max_shard_size))


def _cmd_export(args, cfg) -> None:
    if args.serve and args.merge_path:
        raise UsageError("give one of --serve or --merge-path")
    if args.serve or args.merge_path:
        from memlm.serve.export import export_merged, export_serve

        if args.serve:
            export_serve(args.run_dir, args.out, paths=args.paths)
        else:
            export_merged(args.run_dir, args.out, args.merge_path)
        return
    from memlm.convert.export import export_bank

    export_bank(args.run_dir, args.out)


def _cmd_route(args, cfg) -> None:
    from memlm.serve.router import route_cli

    route_cli(args.serve, [args.text])


def _cmd_sweep(args, cfg) -> None:
    from memlm.sweeps.spec import SweepError

    try:
        if args.action == "run":
            from memlm.sweeps.runner import run_sweep

            run_sweep(args.file, args.out, parallel=args.parallel, only=args.only, emit=args.emit,
                      launcher=args.launcher, prepare_only=args.prepare_only)
        elif args.action == "collect":
            from memlm.sweeps.collect import collect

            collect(args.file, args.out)
        else:
            from memlm.sweeps.report import report

            report(args.file, args.out, n_boot=args.bootstrap)
    except SweepError as e:
        raise UsageError(str(e)) from None


def _cmd_demo(args, cfg) -> None:
    if args.tiers:
        from memlm.demo_tiers import run_tiers_demo

        run_tiers_demo(workdir=args.workdir or "runs/demo_tiers", data_dir=args.data or "data/facts_k32",
                       config=args.config)
        return
    from memlm.demo import run_demo

    run_demo(workdir=args.workdir or "runs/demo", data_dir=args.data or DEFAULT_DATA, config=args.config)


CONFIG_EPILOG = ("Any config key is set with --config.SECTION.KEY=VALUE (e.g. --config.train.steps=500, "
                 "--config.tree.embedder=hash); `memlm info` prints a config's sizes, and memlm/config.py lists "
                 "every key with its default and meaning.")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that names each flag's default, unless its help text already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        silent = action.default in (None, "", False, argparse.SUPPRESS) or not action.option_strings
        if silent or "default" in text.lower():
            return text
        return f"{text} (default: %(default)s)"


def _lineage_and_edit_verbs(add) -> None:
    """``trace``, ``learn`` and ``forget``: which documents a block holds, and changing them."""
    sp = add("trace", "which training documents trained the blocks a text fetches (or one block)")
    sp.add_argument("--workdir", default=DEFAULT_RUN, help="the run directory")
    sp.add_argument("--data", default=None, help="data directory (default: the one the run was trained on)")
    sp.add_argument("--text", default=None, help="a text: routed as `fetched` routes it")
    sp.add_argument("--block", default=None, help="LEVEL:NODE, e.g. 2:13")
    sp.add_argument("--limit", type=int, default=5, help="documents shown per block")
    sp = add("learn", "teach a trained run new documents: only the blocks on their paths train")
    sp.add_argument("run", metavar="RUN", help="the run directory (a memory run with checkpoints)")
    sp.add_argument("--corpus", required=True, help="the new documents (any corpus form `memlm prepare` reads)")
    sp.add_argument("--steps", type=int, default=None, help="training steps (default: --epochs over the edit's data)")
    sp.add_argument("--epochs", type=float, default=8.0, help="passes over the new and replayed sequences")
    sp.add_argument("--replay", type=float, default=1.0, help="share of each touched leaf's old sequences "
                    "trained beside the new ones (0: the new ones only)")
    sp.add_argument("--lr", type=float, default=None, help="memory learning rate (default: sqrt(train.memory_lr x "
                    "train.memory_min_lr), the middle of the run's memory schedule)")
    sp.add_argument("--batch-size", type=int, default=None, help="default: the run's train.batch_size")
    sp.add_argument("--levels", default=None, help="the levels that learn, e.g. 1,2 (default: the leaf level only; "
                    "shallower blocks are shared with other leaves)")
    sp = add("forget", "remove documents from a trained run's blocks: reset their leaves, retrain on the rest")
    sp.add_argument("run", metavar="RUN", help="the run directory")
    sp.add_argument("--documents", default=None, help="document numbers, e.g. 3,17,40-45 (as `memlm trace` "
                    "lists them)")
    sp.add_argument("--entity", default=None, action="append", help="every document whose text names this (whole "
                    "words, any case); give it again for more names")
    sp.add_argument("--corpus", default=None, help="every document whose text is one of this file's documents")
    sp.add_argument("--levels", default=None, help="also reset these levels' nodes on the paths, e.g. 1 (default: "
                    "the leaf level only)")
    sp.add_argument("--steps", type=int, default=None, help="retraining steps (default: --epochs over the "
                    "remaining sequences)")
    sp.add_argument("--epochs", type=float, default=8.0)
    sp.add_argument("--lr", type=float, default=None, help="memory learning rate (default: train.memory_lr)")
    sp.add_argument("--batch-size", type=int, default=None, help="default: the run's train.batch_size")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memlm", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)

    def add(name, help_text):
        sp = sub.add_parser(name, help=help_text, description=help_text, epilog=CONFIG_EPILOG,
                            formatter_class=_DefaultsFormatter)
        sp.add_argument("--config", default=None, help="preset file (default: the packaged tiny preset, "
                        "memlm/presets/tiny.py)")
        return sp

    sp = add("info", "parameter, bank and FLOP accounting of a config; with RUN --block, a block's documents")
    sp.add_argument("run", nargs="?", default=None, metavar="RUN", help="a run directory (with --block)")
    sp.add_argument("--block", default=None, help="LEVEL:NODE: the documents that trained this block of RUN")
    sp.add_argument("--limit", type=int, default=5, help="--block: documents shown")
    sp.add_argument("--json", action="store_true")
    sp = add("compile", "compile the train step ahead of time for a topology: per-device memory and collectives")
    sp.add_argument("--topology", required=True, help="cpu:N or a TPU topology such as v5p:2x2x1")
    sp.add_argument("--capacity", type=float, default=None, help="bytes per device (default: known HBM, 80e9 for cpu)")
    sp.add_argument("--json", action="store_true")
    sp = add("prepare", "tokenize, embed, cluster, route and pack a corpus")
    sp.add_argument("--corpus", default="facts",
                    help="a corpus file (.jsonl[.gz|.zst], .json array, parquet, .txt, .csv / .tsv, .arrow), a folder "
                         "or glob of them (local or URL; a `datasets.save_to_disk` folder), hf://datasets/OWNER/NAME"
                         "[/CONFIG][:SPLIT], or a generated corpus: 'facts' or 'bios'. Records' text: "
                         "--config.data.text_field (default text, else content or body); .txt files: "
                         "--config.data.txt_split=file|paragraph|line")
    sp.add_argument("--out", default=None, help=f"default data/<corpus name> ({DEFAULT_DATA} for facts)")
    sp.add_argument("--workers", type=int, default=None,
                    help="run prepare as an Apache Beam pipeline of resumable work units on N local worker "
                         "processes (default: one process, no engine)")
    sp.add_argument("--pipeline-options", default="",
                    help="Beam pipeline options for a cluster runner, e.g. "
                         "'--runner=DataflowRunner --project=P --region=R --temp_location=gs://...'")
    sp = add("train", "train an anchor and / or its memory bank")
    sp.add_argument("--data", default=DEFAULT_DATA, help="prepared data directory")
    sp.add_argument("--workdir", default=DEFAULT_RUN, help="the run directory (resumed when it has checkpoints)")
    sp.add_argument("--init-from", default=None, help="start from another run's anchor")
    sp.add_argument("--allow-config-change", action="store_true",
                    help="resume with a different train section (e.g. more steps: the cosine is re-shaped)")
    sp.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (several processes)")
    sp.add_argument("--num-processes", type=int, default=None)
    sp.add_argument("--process-id", type=int, default=None)
    sp.add_argument("--local-device-ids", default=None, help="comma list of this process's local devices")
    sp = add("merge", "merge per-subtree frozen-anchor runs into one bank")
    sp.add_argument("runs", nargs="+", help="the subtree runs (train.subtree=i each)")
    sp.add_argument("--out", required=True, help="the merged run directory")
    sp = add("eval", "perplexity and long-tail probes under memory conditions")
    sp.add_argument("--workdir", default=DEFAULT_RUN, help="the run directory")
    sp.add_argument("--data", default=None, help="data directory (default: the one the run was trained on)")
    sp.add_argument("--probes", default=None, help="probe file (.jsonl); default: the data dir's built-in probes")
    sp.add_argument("--perplexity-only", action="store_true", help="held-out perplexity only, no probes "
                    "(RUN/eval/perplexity.json)")
    sp.add_argument("--conditions", default=None, help="comma list of none,generic,fetched,blocked,rag,rag+fetched "
                    "(default: the run's eval.conditions)")
    sp.add_argument("--perplexity-key", default=None, help="held-out perplexity's retrieval key: document (default) "
                    "or prefix:N (also keyed by the first N tokens, scoring only the tokens after them)")
    sp.add_argument("--tasks", default=None, help="comma list of lm-evaluation-harness tasks (instead of the probes); "
                    "memlm_paper: the paper's 13 tasks with its shots, and Avg-CK / Avg-SK")
    sp.add_argument("--suite-data", default=None, help="--tasks memlm_paper offline: a folder of TASK/SPLIT.jsonl "
                    "(docs/evaluation.md)")
    sp.add_argument("--include-path", default=None, help="--tasks: a folder of local task YAML files")
    sp.add_argument("--num-fewshot", type=int, default=None, help="--tasks: few-shot examples per task")
    sp.add_argument("--limit", type=float, default=None, help="--tasks: examples per task (a fraction when < 1)")
    sp = add("generate", "greedy generation with fetched memory")
    sp.add_argument("--workdir", default=DEFAULT_RUN, help="the run directory")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--condition", default=None, help="none, generic, fetched or blocked (default: fetched when "
                    "the run has a bank, else none)")
    sp.add_argument("--max-new-tokens", type=int, default=32)
    sp.add_argument("--chat", action="store_true", help="send the prompt as a user message through the converted "
                    "tokenizer's chat template (as transformers' apply_chat_template does)")
    sp = add("convert", "Hugging Face checkpoint <-> memlm run directory")
    sp.add_argument("--from-hf", default=None, metavar="HF_DIR", help="an HF folder (config.json, safetensors, "
                    "tokenizer.json) to convert into the run directory --out")
    sp.add_argument("--to-hf", default=None, metavar="RUN_DIR",
                    help="a run whose anchor to write as the HF folder --out")
    sp.add_argument("--out", required=True)
    sp.add_argument("--family", default=None, help="--to-hf: llama, qwen2, qwen3, gemma3 or gemma2 (default: the "
                    "family the run was converted from, else the first that expresses the anchor)")
    sp.add_argument("--max-shard-size", default="5GB", help="--to-hf: largest safetensors file (e.g. 5GB, 500MB)")
    sp = add("export", "a run's bank and generic memory as zarr3 arrays plus metadata")
    sp.add_argument("run_dir", metavar="RUN_DIR")
    sp.add_argument("--out", required=True)
    sp.add_argument("--serve", action="store_true", help="a padded HF anchor, one PEFT LoRA adapter per path "
                    "and a router, for engines that serve many LoRA adapters (docs/serving.md)")
    sp.add_argument("--paths", default="all", help="--serve: all, N (the N most used leaves) or for:TEXT")
    sp.add_argument("--merge-path", default=None, metavar="TEXT|3,14",
                    help="one HF model with this path's FFN-memory blocks merged into its FFN")
    sp = add("route", "the adapter of a text's path in a --serve export")
    sp.add_argument("--serve", required=True, metavar="DIR", help="a `memlm export --serve` folder")
    sp.add_argument("--text", required=True)
    sp = sub.add_parser("sweep", help="run, collect and report a scaling-law sweep (experiments/sweeps/*.py)")
    sp.add_argument("action", choices=("run", "collect", "report"))
    sp.add_argument("file", metavar="SWEEP_FILE", help="a python file defining SWEEP")
    sp.add_argument("--out", required=True, metavar="SWEEP_DIR")
    sp.add_argument("--parallel", type=int, default=1, help="run: runs at once (subprocesses)")
    sp.add_argument("--only", default=None, help="run: a comma list of run names")
    sp.add_argument("--emit", choices=("slurm", "tpu"), default=None,
                    help="run: write job scripts into SWEEP_DIR/jobs instead of running")
    sp.add_argument("--launcher", default=None, help="run: command that trains in place of `memlm train` "
                    "(launch/slurm_gpu.sh, launch/tpu_pod.sh; the job scripts set it)")
    sp.add_argument("--prepare-only", action="store_true", help="run: prepare the sweep's data and stop")
    sp.add_argument("--bootstrap", type=int, default=200, help="report: bootstrap resamples per fit")
    _lineage_and_edit_verbs(add)
    sp = add("demo", "the whole pipeline on the embedded default")
    sp.add_argument("--workdir", default=None, help="default runs/demo (runs/demo_tiers with --tiers)")
    sp.add_argument("--data", default=None, help=f"default {DEFAULT_DATA} (data/facts_k32 with --tiers)")
    sp.add_argument("--tiers", action="store_true",
                    help="train with a bank ten times larger than the device budget it is given")
    return p


@contextlib.contextmanager
def _interruptible(verb: str):
    """SIGTERM stops a verb as Ctrl-C does (``train`` has its own handler: it saves a checkpoint first)."""
    import signal

    if verb == "train" or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compile":  # devices are fixed when jax is imported: set them up first
        from memlm.train.compile import prepare_environment

        topo = next((a.split("=", 1)[1] for a in argv if a.startswith("--topology=")), None)
        if topo is None and "--topology" in argv[:-1]:
            topo = argv[argv.index("--topology") + 1]
        if topo:
            with contextlib.suppress(ValueError):  # a bad topology is reported below, as one line
                prepare_environment(topo)
    try:
        rest, overrides = _split_config_overrides(argv)
        args = build_parser().parse_args(rest)
        args.overrides = overrides
        if args.verb == "sweep":  # each run of a sweep resolves its own config
            if overrides:
                raise UsageError("--config.* overrides go into the sweep file (its overrides / runs)")
            cfg = None
        else:
            cfg = resolve_config(args.config, overrides)
        handler = globals()[f"_cmd_{args.verb}"]
        with _interruptible(args.verb):
            handler(args, cfg)
    except KeyboardInterrupt:
        print(f"memlm {argv[0]}: interrupted; what finished is kept: run the same command again to go on",
              file=sys.stderr, flush=True)
        return 130
    except (ConfigError, UsageError, FileNotFoundError) as e:
        print(f"memlm {argv[0] if argv else ''}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        # Bad input (a corrupt file, a mismatched tree or bank): one clear line, no traceback.
        if type(e).__module__.startswith("memlm"):
            print(f"memlm {argv[0]}: error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
