"""The embedded default: a tiny anchor with a two-level FFN-memory, trained on the generated
facts corpus on a 2-core CPU in minutes. Every ``memlm`` verb uses it when given no --config."""

from memlm.config import default_config


def get_config():
    c = default_config()
    c.name = "tiny"
    c.model.update(d_model=128, n_layers=4, n_heads=4, head_dim=32, d_ff=512, tied_embeddings=True,
                   vocab_size=2048, vocab_multiple=64, max_seq_len=128, compute_dtype="float32",
                   remat="full")
    c.memory.update(type="ffn", sizes=(32, 32), generic=True)
    c.tree.update(k=8, depth=2, kmeans_steps=20, kmeans_batch=2048)
    c.data.update(seq_len=128, tokenizer_vocab=2048, facts_documents=8_000)
    c.train.update(mode="anchor", steps=300, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=30,
                   weight_decay=0.05, memory_lr=1e-2, memory_min_lr=1e-3, memory_warmup_steps=10,
                   memory_weight_decay=1e-3, checkpoint_every=100, log_every=10)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    return c
