"""NIAH backends: answer one prompt under several cache presets, sharing one exact prefill.

A backend holds a model and its tokenizer. `answer(doc_ids, question_ids, presets,
max_new_tokens)` runs the strict protocol of DESIGN §6 once per prompt:

1. prefill the document into exact `DenseCache`s (one prefill for all presets);
2. per preset, keep the dense caches (``"baseline"``) or convert them with
   `tqjax.kvcache.convert_caches` (`TurboQuantCache.from_dense` per layer);
3. feed the question ids as one chunk through that preset's caches, then decode greedily.

Preset names are ``"baseline"`` and the names of `tqjax.kvcache.PRESETS`.

Backends: ``"flax"`` (the Flax decoder of `tqjax.models`) and ``"hf"`` (the transformers
model, attending through `bridge`: torch SDPA prefill, JAX caches for the question and
the answer).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from tqjax import kvcache
from tqjax.dense_cache import DenseCache

BASELINE = "baseline"
BACKENDS = ("flax", "hf")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def preset_names() -> tuple[str, ...]:
  """Every preset a NIAH run accepts: the exact baseline and the compressed presets."""
  return (BASELINE, *kvcache.PRESETS)


def cache_config(preset: str, window: int | None) -> kvcache.CacheConfig:
  """The compressed cache config of a preset; `window` overrides its exact window (the
  flush block shrinks to the window when the window is smaller)."""
  if preset == BASELINE:
    raise ValueError(f"{BASELINE!r} keeps the exact cache and has no compressed config")
  if window is None:
    return kvcache.preset(preset)
  if window < 1:
    raise ValueError(f"window must be >= 1 token, got {window}")
  default = kvcache.preset(preset)
  return kvcache.preset(preset, window=window, flush_block=min(default.flush_block, window))


def check_presets(presets: Sequence[str]) -> tuple[str, ...]:
  known = preset_names()
  unknown = [p for p in presets if p not in known]
  if unknown:
    raise ValueError(f"unknown preset(s) {unknown}; choose from {', '.join(known)}")
  if len(set(presets)) != len(presets):
    raise ValueError(f"presets repeat: {list(presets)}")
  if not presets:
    raise ValueError("at least one preset is needed")
  return tuple(presets)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What the report needs to know about the model (and its cache shapes)."""
  name: str  # as asked for (alias, hub id or path)
  model_type: str
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  dtype: str  # parameter and dense-cache dtype


class Backend(Protocol):
  name: str
  tokenizer: Any
  info: ModelInfo

  def answer(self, doc_ids: Sequence[int], question_ids: Sequence[int],
             presets: Sequence[str], max_new_tokens: int) -> dict[str, list[int]]:
    """Greedy answer token ids per preset (without the eos token), one shared prefill."""
    ...


def cache_accounting(preset: str, info: ModelInfo, window: int | None, tokens: int
                     ) -> dict[str, float | int]:
  """Bits per coordinate, compression against an fp16 cache, and the bytes held by all
  layers' caches sized for `tokens` tokens (shapes only: nothing is allocated)."""
  b, kh, d = 1, info.num_kv_heads, info.head_dim
  dtype = DTYPES[info.dtype]
  if preset == BASELINE:
    caches = [jax.eval_shape(lambda: DenseCache.init(b, kh, d, tokens, dtype))] * info.num_layers
    bits = 8.0 * jnp.dtype(dtype).itemsize
  else:
    config = cache_config(preset, window)
    caches = [jax.eval_shape(functools.partial(
        kvcache.TurboQuantCache.init, config, layer=layer, batch=b, num_kv_heads=kh,
        head_dim=d, capacity=tokens, dtype=dtype)) for layer in range(info.num_layers)]
    # The exact sink tokens count too, spread over the context.
    bits = config.bits_per_coordinate(info.num_layers, d, tokens=tokens,
                                      exact_bits=8 * jnp.dtype(dtype).itemsize)
  nbytes = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
               for c in caches for x in jax.tree.leaves(c))
  return {"bits_per_coordinate": float(bits), "compression_vs_fp16": 16.0 / float(bits),
          "memory_bytes": int(nbytes), "memory_tokens": int(tokens)}


class FlaxBackend:
  """The Flax decoder of `tqjax.models`, jitted steps with a fixed cache capacity.

  The document is prefilled in chunks of `chunk` tokens (the last one right-padded, then
  the caches' lengths are wound back past the padding: causal attention keeps the padding
  invisible to real tokens, later appends overwrite it, and the padding's queries are kept
  out of the query statistics), so every prompt of a run reuses the same compiled
  programs: one chunk step per cache size (chunk * 2^k), and per preset one conversion,
  one question step and one decode step at the full capacity. Prefill chunks compute no
  logits (only the question's are read).
  """
  name = "flax"

  def __init__(self, model: Any, tokenizer: Any, *, capacity: int, window: int | None = None,
               chunk: int = 512, model_name: str = "custom"):
    from tqjax.models import Runner

    if chunk < 1:
      raise ValueError(f"{chunk=} must be >= 1")
    if capacity < 1:
      raise ValueError(f"{capacity=} must be >= 1")
    self.runner = Runner.from_model(model)
    self.tokenizer = tokenizer
    self.chunk = chunk
    self.capacity = capacity
    self.window = window
    cfg = self.runner.config
    self.info = ModelInfo(name=model_name, model_type=cfg.model_type,
                          num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                          num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                          dtype=jnp.dtype(self.runner.dtype).name)
    self.eos_ids = _eos_ids(tokenizer)
    self._pad_id = int(next(iter(self.eos_ids), 0))
    self._converters: dict[str, Any] = {}

  @classmethod
  def load(cls, name_or_path: str, *, gguf_file: str | None = None, dtype: str = "float32",
           capacity: int, window: int | None = None, chunk: int = 512) -> FlaxBackend:
    from tqjax.models import load_model

    if dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model, tokenizer, _ = load_model(name_or_path, gguf_file=gguf_file, dtype=DTYPES[dtype])
    return cls(model, tokenizer, capacity=capacity, window=window, chunk=chunk,
               model_name=name_or_path)

  def _converter(self, preset: str):
    if preset not in self._converters:
      config = cache_config(preset, self.window)
      self._converters[preset] = jax.jit(lambda caches: kvcache.convert_caches(caches, config))
    return self._converters[preset]

  def prefill(self, doc_ids: Sequence[int]) -> tuple[DenseCache, ...]:
    """Exact caches of capacity `self.capacity` holding `doc_ids` (batch 1).

    Chunks attend over a cache that grows through capacities chunk * 2^k, so early chunks
    do not pay for attention over the whole capacity; the caches are padded to the full
    capacity at the end (later programs see one shape).
    """
    n = len(doc_ids)
    if n < 1:
      raise ValueError("the document has no tokens")
    padded = np.full(-(-n // self.chunk) * self.chunk, self._pad_id, np.int32)
    if len(padded) > self.capacity:
      raise ValueError(f"a document of {n} tokens, padded to whole chunks of {self.chunk} "
                       f"({len(padded)}), does not fit the capacity {self.capacity}")
    padded[:n] = doc_ids
    caches = self.runner.init_caches(1, self._bucket(self.chunk))
    for start in range(0, len(padded), self.chunk):
      caches = _grow(caches, self._bucket(start + self.chunk))
      real = jnp.int32(min(n - start, self.chunk))  # traced: one program for every chunk
      caches = _prefill_chunk(self.runner.graph, self.runner.params, caches,
                              jnp.asarray(padded[None, start:start + self.chunk]), real)
    caches = _grow(caches, self.capacity)
    pad = len(padded) - n
    if pad:
      caches = tuple(dataclasses.replace(c, lengths=c.lengths - pad) for c in caches)
    return caches

  def _bucket(self, tokens: int) -> int:
    """The smallest chunk * 2^k >= tokens, at most the capacity."""
    size = self.chunk
    while size < tokens:
      size *= 2
    return min(size, self.capacity)

  def answer(self, doc_ids: Sequence[int], question_ids: Sequence[int],
             presets: Sequence[str], max_new_tokens: int) -> dict[str, list[int]]:
    check_presets(presets)
    if max_new_tokens < 1:
      raise ValueError(f"{max_new_tokens=} must be >= 1")
    needed = len(doc_ids) + len(question_ids) + max_new_tokens - 1
    if needed > self.capacity:
      raise ValueError(f"the prompt ({len(doc_ids)} + {len(question_ids)} tokens) and "
                       f"{max_new_tokens=} need {needed} cache slots, capacity {self.capacity}")
    dense = self.prefill(doc_ids)
    question = np.asarray(question_ids, np.int32)[None]
    answers = {}
    # The baseline goes last: its steps donate (consume) the shared dense caches.
    for preset in sorted(presets, key=lambda p: p == BASELINE):
      caches = dense if preset == BASELINE else self._converter(preset)(dense)
      answers[preset] = self._decode(question, caches, max_new_tokens)
    return {p: answers[p] for p in presets}

  def _decode(self, question: np.ndarray, caches: Any, max_new_tokens: int) -> list[int]:
    logits, caches = self.runner.forward(question, caches, logits_to_keep=1)
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # [1]
    key = jax.random.key(0)  # unused at temperature 0
    out: list[int] = []
    while True:
      t = int(token[0])
      if t in self.eos_ids:
        break
      out.append(t)
      if len(out) == max_new_tokens:
        break
      token, caches, key = self.runner.decode_step(token[:, None], caches, key)
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _PaddedChunkCache:
  """A `DenseCache` fed one prefill chunk whose tokens from index ``real`` on are padding:
  the padding's queries stay out of the query statistics (keys and values are written,
  and dropped later by winding the lengths back). Same protocol as the cache it wraps."""
  cache: DenseCache
  real: jax.Array  # [] int32, real tokens at the start of the chunk

  @property
  def lengths(self) -> jax.Array:
    return self.cache.lengths

  def update(self, k: jax.Array, v: jax.Array, q: jax.Array | None = None) -> _PaddedChunkCache:
    if q is None:
      return dataclasses.replace(self, cache=self.cache.update(k, v))
    t = q.shape[1]
    keep = jnp.arange(t) < self.real  # [T]
    cache = self.cache.update(k, v, jnp.where(keep[None, :, None, None], q, 0))
    # Count only the real tokens' queries (the count grows linearly with T).
    added = cache.query_count - self.cache.query_count
    count = self.cache.query_count + added * self.real.astype(jnp.float32) / t
    return dataclasses.replace(self, cache=dataclasses.replace(cache, query_count=count))

  def attend(self, q: jax.Array, *, scale: float, sliding_window: int | None = None) -> jax.Array:
    return self.cache.attend(q, scale=scale, sliding_window=sliding_window)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _prefill_chunk(graph: Any, params: tuple[jax.Array, ...], caches: tuple[DenseCache, ...],
                   tokens: jax.Array, real: jax.Array) -> tuple[DenseCache, ...]:
  """One prefill chunk, tokens [1, chunk] of which the first `real` are the document's,
  through the caches (donated). Only the caches are returned: no logits are computed
  beyond one position, which XLA then drops as unused."""
  wrapped = tuple(_PaddedChunkCache(c, real) for c in caches)
  _, wrapped = graph.merge(params)(tokens, wrapped, logits_to_keep=1)
  return tuple(w.cache for w in wrapped)


def _grow(caches: tuple[DenseCache, ...], capacity: int) -> tuple[DenseCache, ...]:
  """The same caches with room for `capacity` tokens (zeros appended along S)."""
  extra = capacity - caches[0].capacity
  if extra <= 0:
    return caches
  pad = ((0, 0), (0, 0), (0, extra), (0, 0))  # [B, K, S, D]
  return tuple(dataclasses.replace(c, k=jnp.pad(c.k, pad), v=jnp.pad(c.v, pad)) for c in caches)


def _eos_ids(tokenizer: Any) -> frozenset[int]:
  ids = getattr(tokenizer, "eos_token_id", None)
  if ids is None:
    return frozenset()
  return frozenset([ids] if isinstance(ids, int) else ids)


class HFBackend:
  """A transformers model through the PyTorch bridge (`bridge.TurboQuantHFCache`).

  The document is prefilled once into an exact bridge cache (torch SDPA, then the K/V in
  JAX `DenseCache`s); each compressed preset is a `convert`ed copy; `generate` then feeds
  the question as one chunk over that cache and decodes greedily.
  """
  name = "hf"

  def __init__(self, hf_model: Any, tokenizer: Any, *, capacity: int,
               window: int | None = None, model_name: str = "custom"):
    import bridge  # noqa: F401  (registers the "tqjax" attention)
    from tqjax.models import ModelConfig

    self.model, self.tokenizer, self.capacity, self.window = hf_model, tokenizer, capacity, window
    cfg = ModelConfig.from_hf(hf_model.config)
    self.info = ModelInfo(name=model_name, model_type=cfg.model_type,
                          num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                          num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                          dtype=str(next(hf_model.parameters()).dtype).removeprefix("torch."))
    self.eos_ids = _eos_ids(tokenizer)

  @classmethod
  def load(cls, name_or_path: str, *, gguf_file: str | None = None, dtype: str = "float32",
           capacity: int, window: int | None = None) -> HFBackend:
    from tqjax.models import load_hf

    if dtype != "float32":
      raise ValueError(f"backend 'hf' runs the float32 model transformers loads, got {dtype=}")
    hf_model, tokenizer = load_hf(name_or_path, gguf_file=gguf_file)
    return cls(hf_model, tokenizer, capacity=capacity, window=window, model_name=name_or_path)

  def _cache_kw(self, cache: Any) -> dict[str, Any]:
    import inspect

    # transformers >= 5.24 names the argument `cache`, earlier ones `past_key_values`.
    params = inspect.signature(self.model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}

  def answer(self, doc_ids: Sequence[int], question_ids: Sequence[int],
             presets: Sequence[str], max_new_tokens: int) -> dict[str, list[int]]:
    import warnings

    import bridge
    import torch

    check_presets(presets)
    if max_new_tokens < 1:
      raise ValueError(f"{max_new_tokens=} must be >= 1")
    doc = torch.tensor([list(doc_ids)], dtype=torch.long)
    full = torch.tensor([list(doc_ids) + list(question_ids)], dtype=torch.long)
    exact = bridge.TurboQuantHFCache.from_model(self.model, preset=None,
                                                max_cache_len=self.capacity)
    pad = next(iter(self.eos_ids), 0)
    answers = {}
    with torch.no_grad(), bridge.tqjax_attention(self.model), warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)  # generation-config notes
      self.model(doc, logits_to_keep=1, **self._cache_kw(exact))  # the cache is what counts
      # The baseline goes last: generating appends to the exact cache.
      for preset in sorted(presets, key=lambda p: p == BASELINE):
        cache = exact if preset == BASELINE else exact.convert(cache_config(preset, self.window))
        out = self.model.generate(full, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=pad, **self._cache_kw(cache))
        ids = [int(t) for t in out[0, full.shape[1]:]]
        stop = next((i for i, t in enumerate(ids) if t in self.eos_ids), len(ids))
        answers[preset] = ids[:stop]
    return {p: answers[p] for p in presets}


def make_backend(name: str, model: str, *, gguf_file: str | None = None,
                 dtype: str = "float32", capacity: int, window: int | None = None,
                 chunk: int = 512) -> Backend:
  """Loads the model for backend `name` ("flax" or "hf")."""
  if name == "flax":
    return FlaxBackend.load(model, gguf_file=gguf_file, dtype=dtype, capacity=capacity,
                            window=window, chunk=chunk)
  if name == "hf":
    try:
      import bridge  # noqa: F401
    except ImportError as e:
      raise NotImplementedError(
        f"backend 'hf' needs the PyTorch bridge (package `bridge`, with torch and "
        f"transformers), which does not import here: {e}. Use --backend flax.") from e
    return HFBackend.load(model, gguf_file=gguf_file, dtype=dtype, capacity=capacity,
                          window=window)
  raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
