"""OpenLM-160M anchor (rows A1-A4) with the (256,64,16,0) FFN-memory: 18.06M fetched, 4.624B bank."""

from memlm.config import default_config


def get_config():
    c = default_config()
    c.name = "paper_160m"
    c.model.update(d_model=512, n_layers=35, n_heads=12, head_dim=32, d_ff=2048, tied_embeddings=True,
                   vocab_size=50_432, max_seq_len=2048)
    c.memory.update(type="ffn", sizes=(256, 64, 16, 0))
    c.tree.update(k=16, depth=4)
    c.data.update(seq_len=2048, tokenizer_vocab=50_277)
    # Memory training recipe (App. A.2): 1,024 x 2,048 tokens, peak 1e-4 -> 1e-5, weight decay 1e-3.
    c.train.update(mode="cotrain", batch_size=1024, steps=2**40 // (1024 * 2048), warmup_steps=10_000,
                   lr=1e-4, min_lr=1e-5, weight_decay=1e-3, memory_lr=1e-4, memory_min_lr=1e-5,
                   memory_warmup_steps=10_000, memory_weight_decay=1e-3, checkpoint_every=1000)
    c.memory.dtype = "bfloat16"
    c.train.microbatch_size = 64  # 16 micro-steps: fits a v5p:2x2x1 at 46 GB a chip (bench/RESULTS.md)
    return c
