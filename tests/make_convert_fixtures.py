"""Write tests/fixtures/convert/: tiny random-weight Hugging Face checkpoints and their reference outputs.

The conversion tests (tests/test_convert.py) check memlm's converted models against these files
with no torch installed. This script needs torch, transformers and tokenizers, so it runs in a
separate environment outside the repository. To regenerate:

    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch==2.13.0          # first: the CPU wheel
    /tmp/hfvenv/bin/pip install transformers safetensors tokenizers
    /tmp/hfvenv/bin/python tests/make_convert_fixtures.py

It does not import memlm. For every family it writes ``<family>/`` as ``save_pretrained`` does
(config.json, generation_config.json, safetensors weights: the Llama one sharded with an index, the
Gemma 3 one in bfloat16) plus a small BPE ``tokenizer.json`` and ``tokenizer_config.json`` whose
``eos_token`` is not the first end-of-text name memlm would otherwise try, with the family's
special-token template (Llama 3's ``<|begin_of_text|>`` in ``tokenizer.json``; Gemma's ``<bos>``
there and ``add_bos_token`` in ``tokenizer_config.json``; none for Qwen, which gets a ChatML chat
template), and ``reference.npz``: ``tokens`` [2, 24] and the model's float32 ``logits`` for them
(eager attention), the ``prompts`` (text), their token ids as ``AutoTokenizer`` of the saved folder
encodes the text, the 20 greedy tokens ``generate`` adds to each prompt (EOS stopping off), and
``margin``: the smallest top-1 / top-2 logit gap met while generating (how far greedy decoding is
from a tie). Qwen families also hold ``chat_ids`` (``apply_chat_template`` of the first prompt as a
user message) and ``chat_generated``, its greedy continuation. ``hub_configs.json`` holds config.json files in
the Hub's format (older rope fields) with the parameter count transformers builds from each, on the
meta device (no weights).

``--check-export DIR`` instead loads an HF folder that ``memlm convert --to-hf`` wrote (DIR/hf) and
compares its logits with ``DIR/memlm_logits.npz`` (``tokens``, ``logits``), printing the KL.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

OUT = Path(__file__).resolve().parent / "fixtures" / "convert"
VOCAB = 96
SEQ = 24
NEW = 20
TEXT = ("the quick brown fox jumps over the lazy dog. a memory bank holds the long tail; the anchor keeps "
        "common knowledge. tiny models read tiny texts, and every token counts. ") * 4
PROMPTS = ["the lazy fox", "a memory bank holds the"]

COMMON = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.02)

FAMILIES = {
    # Llama 3.1-style RoPE scaling with a small original context, so all three frequency bands occur.
    "llama": dict(cls="LlamaConfig", specials=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
                  eos="<|eot_id|>", bos="<|begin_of_text|>", template="tokenizer.json", shard="12KB",
                  dtype=torch.float32,
                  config=dict(rms_norm_eps=1e-5, tie_word_embeddings=False,
                              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 64})),
    # Qwen2.5-style: q/k/v biases, tied embeddings, a sliding window on the last layer.
    "qwen2": dict(cls="Qwen2Config", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>",
                  bos=None, dtype=torch.float32,
                  config=dict(rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=True, sliding_window=4,
                              max_window_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3": dict(cls="Qwen3Config", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>",
                  bos=None, dtype=torch.float32,
                  config=dict(rms_norm_eps=1e-6, tie_word_embeddings=False,
                              rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0})),
    # Gemma 3: local, local, global; a local RoPE base; linear scaling on the global layers; a final soft-cap.
    "gemma3": dict(cls="Gemma3TextConfig", specials=["<pad>", "<eos>", "<bos>", "<unk>"], eos="<eos>", bos="<bos>",
                   template="both", dtype=torch.bfloat16,
                   config=dict(num_key_value_heads=1, rms_norm_eps=1e-6, tie_word_embeddings=True, sliding_window=4,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                               query_pre_attn_scalar=12, final_logit_softcapping=4.0,
                               hidden_activation="gelu_pytorch_tanh",
                               rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1e6,
                                                                   "factor": 2.0},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    # Gemma 2: attention and final-logit soft-capping, alternating local / global layers.
    "gemma2": dict(cls="Gemma2Config", specials=["<pad>", "<eos>", "<bos>", "<unk>"], eos="<eos>", bos="<bos>",
                   template="both", dtype=torch.float32,
                   config=dict(rms_norm_eps=1e-6, tie_word_embeddings=True, sliding_window=4,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                               query_pre_attn_scalar=12, attn_logit_softcapping=3.0, final_logit_softcapping=4.0,
                               hidden_activation="gelu_pytorch_tanh",
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}


# Qwen2's pre-tokenizer: transformers' Qwen2Tokenizer rebuilds this pipeline around the file's vocabulary
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")


def make_tokenizer(specials: list[str], byte_level: bool = False) -> Tokenizer:
    """A small BPE over the fixture text: Metaspace pre-tokenizer (like sentencepiece), or Qwen2's
    byte-level pipeline (NFC, its split regex, byte-level) with ``byte_level``."""
    tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in specials else None))
    if byte_level:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=specials, show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return tok


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def set_template(tok: Tokenizer, bos: str) -> None:
    """The family's BOS template in tokenizer.json, as its released tokenizers have it."""
    tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])


def greedy(ref, p: list[int]) -> tuple[list[int], float]:
    """NEW greedy tokens after prompt ids p (EOS off) and the smallest top-1 / top-2 gap."""
    with torch.no_grad():
        # an explicit mask: transformers would take a BOS whose id is the pad id (Llama's here) for padding
        g = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                         max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    margin = min(float(torch.topk(s[0].float(), 2).values.diff().abs()) for s in g.scores)
    return g.sequences[0, len(p):].tolist(), margin


def randomize(model: torch.nn.Module, offset_norms: bool, seed: int) -> None:
    """Weights large enough for peaked, input-dependent logits (the default init gives near-uniform ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if offset_norms else 1.0) + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(1.2 * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def build(family: str, spec: dict, seed: int) -> None:
    out = OUT / family
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok = make_tokenizer(spec["specials"], byte_level=family.startswith("qwen"))
    assert tok.get_vocab_size() <= VOCAB
    eos_id, bos_id = tok.token_to_id(spec["eos"]), tok.token_to_id(spec["bos"]) if spec["bos"] else None
    cfg = getattr(transformers, spec["cls"])(**{**COMMON, **spec["config"]}, eos_token_id=eos_id, bos_token_id=bos_id,
                                             pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    randomize(model, family.startswith("gemma"), seed)
    model = model.to(spec["dtype"])
    kw = {"max_shard_size": spec["shard"]} if "shard" in spec else {}
    model.save_pretrained(out, safe_serialization=True, **kw)
    if spec.get("template"):
        set_template(tok, spec["bos"])
    tok.save(str(out / "tokenizer.json"))
    tcfg = {"eos_token": spec["eos"], "model_max_length": 64, "tokenizer_class": "PreTrainedTokenizerFast"}
    if spec["bos"]:
        tcfg["bos_token"] = spec["bos"]
    if spec.get("template") == "both":
        tcfg.update(add_bos_token=True, add_eos_token=False)
    if family.startswith("qwen"):
        tcfg["chat_template"] = CHATML
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)

    # References, in float32, from the saved checkpoint (the model memlm converts).
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, tok.get_vocab_size(), size=(2, SEQ)).astype(np.int64)
    with torch.no_grad():
        logits = ref(torch.from_numpy(tokens)).logits.float().numpy()
    ref.generation_config.eos_token_id = None
    ids, generated, margin = [], [], np.inf
    for text in PROMPTS:
        p = hf_tok(text)["input_ids"]  # from text, through the folder's own tokenizer (its template included)
        ids.append(p)
        g, m = greedy(ref, p)
        generated.append(g)
        margin = min(margin, m)
    extra = {}
    if hf_tok.chat_template:
        chat = [{"role": "user", "content": PROMPTS[0]}]
        chat_ids = list(hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"])
        g, m = greedy(ref, chat_ids)
        margin = min(margin, m)
        extra = {"chat_ids": np.array(chat_ids, np.int64), "chat_generated": np.array(g, np.int64)}
    width = max(len(p) for p in ids)
    np.savez_compressed(out / "reference.npz", tokens=tokens, logits=logits.astype(np.float32),
                        prompts=np.array(PROMPTS), prompt_ids=np.array([p + [-1] * (width - len(p)) for p in ids]),
                        generated=np.array(generated, np.int64), margin=np.float32(margin), **extra)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{family}: {sorted(f.name for f in out.iterdir())}, {size / 1024:.0f} KiB, "
          f"greedy margin {margin:.4f}, logit std {logits.std():.2f}")
    assert margin > 1e-3, f"{family}: greedy decoding is too close to a tie; change the seed"


# config.json files in the Hub's format (older rope fields) of real models: memlm's parameter count for
# each is checked against what transformers builds (on the meta device: no weights).
HUB = {
    "Llama-3.2-1B": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
                     "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
                     "hidden_size": 2048, "intermediate_size": 8192, "max_position_embeddings": 131072,
                     "mlp_bias": False, "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
                     "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": True,
                     "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                     "torch_dtype": "bfloat16", "vocab_size": 128256},
    "Llama-3.1-8B": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
                     "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
                     "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 32,
                     "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
                     "rope_theta": 500000.0, "tie_word_embeddings": False,
                     "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                     "torch_dtype": "bfloat16", "vocab_size": 128256},
    "Qwen2.5-0.5B": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                     "hidden_size": 896, "intermediate_size": 4864, "max_position_embeddings": 32768,
                     "max_window_layers": 24, "num_attention_heads": 14, "num_hidden_layers": 24,
                     "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
                     "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
                     "use_sliding_window": False, "vocab_size": 151936},
    "Qwen3-0.6B": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
                   "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3072,
                   "max_position_embeddings": 40960, "max_window_layers": 28, "num_attention_heads": 16,
                   "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
                   "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
                   "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936},
    "gemma-3-1b-pt": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
                      "attn_logit_softcapping": None, "final_logit_softcapping": None, "head_dim": 256,
                      "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "intermediate_size": 6912,
                      "max_position_embeddings": 32768, "num_attention_heads": 4, "num_hidden_layers": 26,
                      "num_key_value_heads": 1, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
                      "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
                      "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
                      "vocab_size": 262144},
    "gemma-2-2b": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "attn_logit_softcapping": 50.0,
                   "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
                   "hidden_size": 2304, "intermediate_size": 9216, "max_position_embeddings": 8192,
                   "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4,
                   "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
                   "sliding_window": 4096, "torch_dtype": "float32", "vocab_size": 256000},
}


def hub_counts() -> None:
    out = {}
    for name, cfg in HUB.items():
        config = transformers.AutoConfig.for_model(**cfg)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        n = sum(p.numel() for p in model.parameters())
        layer_types = list(getattr(config, "layer_types", None) or [])
        out[name] = {"config": cfg, "params": n, "layer_types": layer_types}
        print(f"{name}: {n:,} parameters")
    (OUT / "hub_configs.json").write_text(json.dumps(out, indent=1) + "\n")


def check_export(folder: Path) -> None:
    ref = np.load(folder / "memlm_logits.npz")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "hf", attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(ref["tokens"].astype(np.int64))).logits.float().numpy()
    p = torch.log_softmax(torch.from_numpy(logits), -1)
    q = torch.log_softmax(torch.from_numpy(ref["logits"]), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    print(f"{folder}: {type(model).__name__}, per-token KL(transformers || memlm) max {kl.max():.3e}, "
          f"mean {kl.mean():.3e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-export", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.check_export:
        check_export(args.check_export)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    for i, (family, spec) in enumerate(FAMILIES.items()):
        build(family, spec, seed=i + 1)
    hub_counts()
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1024:.0f} KiB), transformers {transformers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
