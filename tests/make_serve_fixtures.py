"""Write tests/fixtures/serve/golden.npz: transformers + PEFT outputs of a ``memlm export --serve`` folder.

tests/test_serve_export.py checks memlm's own logits against these with no torch installed. This
script needs torch, transformers and peft, so it runs in a separate environment, after
``tests/serve_fixture_setup.py`` wrote the export and the prompts::

    .venv/bin/python -m tests.serve_fixture_setup
    /tmp/hfvenv/bin/pip install peft                       # with torch, transformers, safetensors
    /tmp/hfvenv/bin/python tests/make_serve_fixtures.py

It does not import memlm. It loads ``export/base`` (float32, eager attention) and, per prompt of
``prompts.json``, the adapter of the prompt's path with PEFT (``PeftModel.from_pretrained``), and
saves, with prompts right-padded to one length (``lengths`` real tokens each):

- ``base_logits`` [P, T, V]: the padded base alone;
- ``adapter_logits`` [P, T, V]: base + the prompt's own path adapter, one prompt at a time;
- ``mixed_logits`` [P, T, V]: all prompts in one batch, each row naming its adapter (PEFT's
  mixed-batch inference, ``adapter_names=``), as a multi-LoRA server runs them;
- ``generic_logits`` [P, T, V]: base + the ``generic`` adapter;
- ``base_greedy`` / ``adapter_greedy`` [P, new_tokens]: greedy tokens (no EOS stopping);
- ``versions``: torch, transformers and peft versions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import peft
import torch
import transformers

FIX = Path(__file__).resolve().parent / "fixtures" / "serve"


def _logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(_logits(model, out)[-1].argmax()))
    return out[len(ids):]


def _padded(rows: list[np.ndarray], t: int) -> np.ndarray:
    out = np.zeros((len(rows), t, rows[0].shape[-1]), np.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _base():
    model = transformers.AutoModelForCausalLM.from_pretrained(FIX / "export" / "base", torch_dtype=torch.float32,
                                                              attn_implementation="eager")
    return model.eval()


def main() -> None:
    torch.manual_seed(0)
    prompts = json.loads((FIX / "prompts.json").read_text())
    ids, names, new = prompts["ids"], prompts["adapters"], int(prompts["new_tokens"])
    t = max(len(p) for p in ids)
    base = _base()
    base_logits = [_logits(base, p) for p in ids]
    base_greedy = [_greedy(base, p, new) for p in ids]
    adapters = FIX / "export" / "adapters"
    model = peft.PeftModel.from_pretrained(_base(), adapters / "generic", adapter_name="generic").eval()
    for name in sorted(set(names)):
        model.load_adapter(adapters / name, adapter_name=name)
    adapter_logits, adapter_greedy, generic_logits = [], [], []
    for p, name in zip(ids, names, strict=True):
        model.set_adapter(name)
        adapter_logits.append(_logits(model, p))
        adapter_greedy.append(_greedy(model, p, new))
        model.set_adapter("generic")
        generic_logits.append(_logits(model, p))
    batch = torch.zeros((len(ids), t), dtype=torch.long)
    mask = torch.zeros((len(ids), t), dtype=torch.long)
    for i, p in enumerate(ids):
        batch[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    with torch.no_grad():
        mixed = model(input_ids=batch, attention_mask=mask, adapter_names=list(names)).logits.float().numpy()
    np.savez_compressed(
        FIX / "golden.npz", lengths=np.array([len(p) for p in ids]), base_logits=_padded(base_logits, t),
        adapter_logits=_padded(adapter_logits, t), mixed_logits=mixed, generic_logits=_padded(generic_logits, t),
        base_greedy=np.array(base_greedy), adapter_greedy=np.array(adapter_greedy),
        versions=np.array([torch.__version__, transformers.__version__, peft.__version__]))
    print(f"wrote {FIX / 'golden.npz'} (torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__})")


if __name__ == "__main__":
    main()
