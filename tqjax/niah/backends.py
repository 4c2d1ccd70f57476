"""NIAH backends: answer one prompt under several cache presets, sharing one exact prefill.

A backend holds a model and its tokenizer. `answer(doc_ids, question_ids, presets,
max_new_tokens)` runs the strict protocol of DESIGN §6 once per prompt:

1. prefill the document into exact `DenseCache`s (one prefill for all presets);
2. per preset, keep the dense caches (``"baseline"``) or convert them with
   `tqjax.kvcache.convert_caches` (`TurboQuantCache.from_dense` per layer);
3. feed the question ids as one chunk through that preset's caches, then decode greedily.

Preset names are ``"baseline"`` and the names of `tqjax.kvcache.PRESETS`, each optionally
followed by ``:option=value`` overrides of its `CacheConfig` (``"k4v4:window=128:sink_tokens=8"``;
options: `PRESET_OPTIONS`). An override beats the run's ``window``.

Each answer also carries the **margin** of the needle's code: along the greedy answer, the
logit of the code's next token minus the largest other logit, the smallest over the
code's tokens (stopping at the first token where the answer leaves the code, whose margin
is then <= 0). Positive: the greedy answer spells the code; its size says how close the
cell is to flipping, a continuous measure where pass/fail is not.

Backends: ``"flax"`` (the Flax decoder of `tqjax.models`) and ``"hf"`` (the transformers
model, attending through `bridge`: torch SDPA prefill, JAX caches for the question and
the answer).
"""

from __future__ import annotations

import dataclasses
import functools
import json
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


# Scalar `CacheConfig` fields a preset name may override ("k4v4:window=128:sink_tokens=8").
PRESET_OPTIONS: dict[str, type] = {
  "window": int, "flush_block": int, "sink_tokens": int, "key_transform": str,
  "scale_power": float, "norm_correction": bool, "rotation": str, "seed": int,
}


def preset_names() -> tuple[str, ...]:
  """Every preset a NIAH run accepts: the exact baseline and the compressed presets."""
  return (BASELINE, *kvcache.PRESETS)


def _option_value(name: str, text: str, preset: str) -> Any:
  kind = PRESET_OPTIONS[name]
  if kind is bool:
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"preset {preset!r}: {name} must be true or false, got {text!r}")
    return text.lower() in ("true", "1")
  try:
    return kind(text)
  except ValueError:
    raise ValueError(f"preset {preset!r}: {name} must be {kind.__name__}, got {text!r}") from None


def parse_preset(preset: str) -> tuple[str, dict[str, Any]]:
  """``"k4v4:window=128:sink_tokens=8"`` -> ``("k4v4", {"window": 128, "sink_tokens": 8})``."""
  name, *options = preset.split(":")
  if name not in preset_names():
    raise ValueError(f"unknown preset {name!r} (in {preset!r}); choose from "
                     f"{', '.join(preset_names())}")
  if name == BASELINE and options:
    raise ValueError(f"{BASELINE!r} keeps the exact cache and takes no options, got {preset!r}")
  overrides: dict[str, Any] = {}
  for option in options:
    key, sep, value = option.partition("=")
    if not sep or key not in PRESET_OPTIONS:
      raise ValueError(f"preset {preset!r}: expected options name=value with a name from "
                       f"{', '.join(PRESET_OPTIONS)}, got {option!r}")
    if key in overrides:
      raise ValueError(f"preset {preset!r}: {key} given twice")
    overrides[key] = _option_value(key, value, preset)
  return name, overrides


def cache_config(preset: str, window: int | None) -> kvcache.CacheConfig:
  """The compressed cache config of a preset (with its ``:option=value`` overrides);
  `window` overrides the exact window unless the preset sets its own (the flush block
  shrinks to the window when the window is smaller, unless set too)."""
  name, overrides = parse_preset(preset)
  if name == BASELINE:
    raise ValueError(f"{BASELINE!r} keeps the exact cache and has no compressed config")
  if window is not None and "window" not in overrides:
    overrides["window"] = window
  if "window" in overrides:
    if overrides["window"] < 1:
      raise ValueError(f"window must be >= 1 token, got {overrides['window']} (preset {preset!r})")
    if "flush_block" not in overrides:
      overrides["flush_block"] = min(kvcache.preset(name).flush_block, overrides["window"])
  try:
    return kvcache.preset(name, **overrides)
  except ValueError as e:
    raise ValueError(f"preset {preset!r}: {e}") from e


def describe(preset: str, window: int | None) -> dict[str, Any] | None:
  """The preset's resolved cache config as JSON data (None for the baseline): recorded
  with every cell, so a rerun after a preset's defaults changed does not reuse its cells."""
  if parse_preset(preset)[0] == BASELINE:
    return None
  return json.loads(json.dumps(dataclasses.asdict(cache_config(preset, window))))


def check_presets(presets: Sequence[str]) -> tuple[str, ...]:
  for preset in presets:
    parse_preset(preset)
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


@dataclasses.dataclass(frozen=True)
class Answer:
  """A greedy answer: its token ids (without the eos token) and the code's margin (None
  without a target)."""
  ids: list[int]
  margin: float | None = None


class Backend(Protocol):
  name: str
  tokenizer: Any
  info: ModelInfo

  def answer(self, doc_ids: Sequence[int], question_ids: Sequence[int],
             presets: Sequence[str], max_new_tokens: int,
             target: Sequence[int] | None = None) -> dict[str, Answer]:
    """Greedy answer per preset, one shared prefill; with `target` (the code's token
    ids), each answer's margin on it."""
    ...


class MarginTracker:
  """The margin of `target` along a greedy answer, fed one step's logits [V] at a time:
  min over steps of logit[target[i]] - max_{j != target[i]} logit[j], up to the first
  step whose greedy token leaves the target (margin <= 0) or the target's end."""

  def __init__(self, target: Sequence[int] | None):
    self.target = None if target is None else [int(t) for t in target]
    if self.target is not None and not self.target:
      raise ValueError("the margin's target has no tokens")
    self.margin: float | None = None
    self._step = 0
    self._done = self.target is None

  @property
  def wants_logits(self) -> bool:
    return not self._done

  def feed(self, logits: Any) -> None:
    if self._done:
      return
    logits = np.asarray(logits, np.float64).reshape(-1)
    want = self.target[self._step]
    if not 0 <= want < logits.shape[0]:
      raise ValueError(f"target token {want} is outside the vocabulary of {logits.shape[0]}")
    best_other = np.max(np.delete(logits, want))
    m = float(logits[want] - best_other)
    self.margin = m if self.margin is None else min(self.margin, m)
    self._step += 1
    self._done = m <= 0 or self._step == len(self.target)


def cache_accounting(preset: str, info: ModelInfo, window: int | None, tokens: int
                     ) -> dict[str, float | int]:
  """Bits per coordinate, compression against an fp16 cache, and the bytes held by all
  layers' caches sized for `tokens` tokens (shapes only: nothing is allocated).

  ``code_bits_per_coordinate``: codes and norms (the rate of long contexts);
  ``bits_per_coordinate``: that plus every exact token a compressed cache holds — the
  sink tokens and the window buffer (window + flush block slots) — at the cache dtype's
  width, spread over `tokens`; the compression ratio is against the latter."""
  b, kh, d = 1, info.num_kv_heads, info.head_dim
  dtype = DTYPES[info.dtype]
  exact_bits = 8 * jnp.dtype(dtype).itemsize
  if preset == BASELINE:
    caches = [jax.eval_shape(lambda: DenseCache.init(b, kh, d, tokens, dtype))] * info.num_layers
    code_bits = bits = float(exact_bits)
  else:
    config = cache_config(preset, window)
    caches = [jax.eval_shape(functools.partial(
        kvcache.TurboQuantCache.init, config, layer=layer, batch=b, num_kv_heads=kh,
        head_dim=d, capacity=tokens, dtype=dtype)) for layer in range(info.num_layers)]
    code_bits = config.bits_per_coordinate(info.num_layers, d)
    # The exact sink tokens (counted by the config) and the exact window buffer.
    bits = (config.bits_per_coordinate(info.num_layers, d, tokens=tokens, exact_bits=exact_bits)
            + (config.window + config.flush_block) * exact_bits / tokens)
  nbytes = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
               for c in caches for x in jax.tree.leaves(c))
  return {"code_bits_per_coordinate": float(code_bits), "bits_per_coordinate": float(bits),
          "compression_vs_fp16": 16.0 / float(bits), "memory_bytes": int(nbytes),
          "memory_tokens": int(tokens)}


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
             presets: Sequence[str], max_new_tokens: int,
             target: Sequence[int] | None = None) -> dict[str, Answer]:
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
      answers[preset] = self._decode(question, caches, max_new_tokens, target)
    return {p: answers[p] for p in presets}

  def _decode(self, question: np.ndarray, caches: Any, max_new_tokens: int,
              target: Sequence[int] | None) -> Answer:
    # Every step is the model's chunk step (logits of the last position), so the margin
    # reads the very logits the greedy token comes from.
    logits, caches = self.runner.forward(question, caches, logits_to_keep=1)
    margin = MarginTracker(target)
    out: list[int] = []
    while True:
      last = logits[0, -1]  # [V]
      if margin.wants_logits:
        margin.feed(last)
      t = int(jnp.argmax(last))
      if t in self.eos_ids:
        break
      out.append(t)
      if len(out) == max_new_tokens:
        break
      logits, caches = self.runner.forward(np.asarray([[t]], np.int32), caches,
                                           logits_to_keep=1)
    return Answer(out, margin.margin)


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
             presets: Sequence[str], max_new_tokens: int,
             target: Sequence[int] | None = None) -> dict[str, Answer]:
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
                                  pad_token_id=pad, output_logits=True,
                                  return_dict_in_generate=True, **self._cache_kw(cache))
        ids = [int(t) for t in out.sequences[0, full.shape[1]:]]
        stop = next((i for i, t in enumerate(ids) if t in self.eos_ids), len(ids))
        margin = MarginTracker(target)
        for step in out.logits:  # the raw logits of each step, [1, V]
          margin.feed(step[0].float().numpy())
        answers[preset] = Answer(ids[:stop], margin.margin)
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
