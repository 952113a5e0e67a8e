"""OpenLM-410M anchor (rows B1-B3) with the (512,128,32,0) FFN-memory: 49.5M fetched, 12.68B bank."""

from memlm.config import default_config


def get_config():
    c = default_config()
    c.name = "paper_410m"
    c.model.update(d_model=1024, n_layers=24, n_heads=16, head_dim=64, d_ff=2816, tied_embeddings=False,
                   vocab_size=50_432, max_seq_len=2048)
    c.memory.update(type="ffn", sizes=(512, 128, 32, 0), dtype="bfloat16")
    c.tree.update(k=16, depth=4)
    c.data.update(seq_len=2048, tokenizer_vocab=50_277)
    c.train.update(mode="cotrain", batch_size=1024, steps=2**40 // (1024 * 2048), warmup_steps=10_000,
                   lr=1e-4, min_lr=1e-5, weight_decay=1e-3, memory_lr=1e-4, memory_min_lr=1e-5,
                   memory_warmup_steps=10_000, memory_weight_decay=1e-3, checkpoint_every=1000)
    # Fits a v5p:2x2x1 at 91 GB a chip (bench/RESULTS.md): FSDP anchor, every bank level split by node.
    c.train.microbatch_size = 32
    c.mesh.update(data=1, fsdp=-1)
    c.bank.replicate_levels = 0
    return c
