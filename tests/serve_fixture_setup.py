"""Write tests/fixtures/serve/: a tiny FFN-memory run on a converted Llama and its ``--serve`` export.

Run once with memlm's environment, then make the golden files with transformers + PEFT::

    .venv/bin/python -m tests.serve_fixture_setup          # run/, export/, prompts.json
    /tmp/hfvenv/bin/python tests/make_serve_fixtures.py     # golden.npz

The run is built as tests/test_convert_posthoc.py builds it (``memlm convert --from-hf`` of the
Llama fixture, ``memlm prepare`` with the hashing embedder, k = 2, depth 2, and 8 frozen-anchor
steps of an FFN-memory (4, 4) with a generic memory), then kept in the fixture with only what
serving reads: the anchor checkpoint (no optimizer state), the bank and generic stores (parameters
only), the converted HF folder's files, and the data directory's manifest, tokenizer and tree. Its
``config.json`` names ``../data`` and ``../converted``; :func:`materialise` copies it to a scratch
folder with those paths made absolute, which is how the test and the export below open it.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

FIX = Path(__file__).resolve().parent / "fixtures" / "serve"
PROMPTS = ["the quick brown fox", "a memory bank holds the", "common knowledge tiny models", "the lazy dog jumps"]
NEW_TOKENS = 8
DATA_FILES = ("manifest.json", "tokenizer.json", "tokenizer_config.json", "tree.npz")
STATE_DIRS = ("mu", "nu")  # optimizer moments of the bank stores: serving reads the parameters only


def materialise(dst: Path, fixture: Path = FIX / "run") -> Path:
    """Copy the fixture run to ``dst`` with its data and init paths absolute; returns the memory run."""
    shutil.copytree(fixture, dst)
    run = dst / "memory"
    record = json.loads((run / "config.json").read_text())
    record["data_dir"] = str((run / record["data_dir"]).resolve())
    record["init_from"] = str((run / record["init_from"]).resolve())
    (run / "config.json").write_text(json.dumps(record, indent=2))
    return run


def _keep(src: Path, dst: Path) -> None:
    """The run directories serving reads: config, newest checkpoint's params and meta, the stores' parameters."""
    dst.mkdir(parents=True)
    shutil.copy2(src / "config.json", dst / "config.json")
    step = max(int(p.name) for p in (src / "checkpoints").iterdir() if p.name.isdigit())
    ck_src, ck_dst = src / "checkpoints" / str(step), dst / "checkpoints" / str(step)
    shutil.copytree(ck_src, ck_dst, ignore=lambda d, names: ["opt"] if Path(d) == ck_src else [])
    for store in ("bank", "generic"):
        shutil.copytree(src / store, dst / store, ignore=lambda d, names: [n for n in names if n in STATE_DIRS])


def build(scratch: Path) -> None:
    """Train the run in ``scratch`` (converted, data, memory); :func:`keep` then files it."""
    from memlm.cli import main
    from tests.test_convert_posthoc import FIX as CONVERT_FIX
    from tests.test_convert_posthoc import TREE, _corpus

    def run(*argv) -> None:
        assert main([str(a) for a in argv]) == 0, argv

    conv, data, mem = scratch / "converted", scratch / "data", scratch / "memory"
    run("convert", "--from-hf", CONVERT_FIX / "llama", "--out", conv, "--config.model.remat=none",
        "--config.data.seq_len=32")
    _corpus(scratch / "corpus.jsonl")
    run("prepare", "--config", conv, "--corpus", scratch / "corpus.jsonl", "--out", data, *TREE,
        "--config.eval.heldout_documents=8")
    run("train", "--config", conv / "config.json", "--init-from", conv, "--data", data, "--workdir", mem, *TREE,
        "--config.memory.type=ffn", "--config.memory.sizes=(4,4)", "--config.memory.generic=true",
        "--config.train.mode=frozen", "--config.train.steps=8", "--config.train.batch_size=8",
        "--config.train.log_every=4", "--config.train.checkpoint_every=8", "--config.train.memory_lr=0.05",
        "--config.train.memory_warmup_steps=1")


def keep(scratch: Path) -> None:
    """Keep the serving files of the run built in ``scratch`` as FIX/run."""
    conv, data, mem = scratch / "converted", scratch / "data", scratch / "memory"
    out = FIX / "run"
    shutil.rmtree(out, ignore_errors=True)
    _keep(mem, out / "memory")
    shutil.copytree(conv / "hf", out / "converted" / "hf", ignore=shutil.ignore_patterns("reference.npz"))
    (out / "data").mkdir()
    for name in DATA_FILES:
        shutil.copy2(data / name, out / "data" / name)
    record = json.loads((out / "memory" / "config.json").read_text())
    record.update(data_dir="../data", init_from="../converted")
    (out / "memory" / "config.json").write_text(json.dumps(record, indent=2))


def export(scratch: Path) -> None:
    """Export the fixture run with ``--serve`` into FIX/export and write FIX/prompts.json."""
    from memlm.cli import main
    from memlm.infer.run import load_run
    from memlm.serve.descent import adapter_name

    run_dir = materialise(scratch / "copy")
    shutil.rmtree(FIX / "export", ignore_errors=True)
    assert main(["export", str(run_dir), "--serve", "--out", str(FIX / "export")]) == 0
    run = load_run(run_dir)
    paths = run.memory.paths(PROMPTS)
    prompts = {"texts": PROMPTS, "ids": [[int(i) for i in run.tokenizer.encode(t)] for t in PROMPTS],
               "adapters": [adapter_name(p, len(p)) for p in paths], "new_tokens": NEW_TOKENS,
               "eot_id": int(run.tokenizer.eot_id)}
    (FIX / "prompts.json").write_text(json.dumps(prompts, indent=2) + "\n")


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        if "--export-only" not in sys.argv:
            build(Path(scratch) / "build")
            keep(Path(scratch) / "build")
        export(Path(scratch))
    print(f"wrote {FIX / 'run'}, {FIX / 'export'} and {FIX / 'prompts.json'}; now run "
          "/tmp/hfvenv/bin/python tests/make_serve_fixtures.py")


if __name__ == "__main__":
    main()
