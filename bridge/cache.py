"""A transformers `Cache` whose layers keep tqjax caches in JAX-owned buffers.

Flow per layer (the strict protocol, DESIGN §6):

* **Prefill** (the first forward, the cache is empty): the attention function runs exact
  torch SDPA over the prompt with transformers' mask, then the prompt's q/k/v cross into JAX
  once and fill a `DenseCache`; with a compression preset the layer converts it right away
  with `TurboQuantCache.from_dense`. Padding is dropped on the way in: the real tokens of
  row b are stored at slots 0 .. n_b - 1, which are their positions (transformers gives a
  left- or right-padded token the position = number of earlier real tokens), so each row
  of the JAX cache is ragged-exact and later steps need no padding mask.
* **Decode and chunks**: q, k and v are concatenated in torch into one contiguous
  [B, T, H + 2K, D] tensor, cross into JAX by DLPack (zero-copy on the GPU), one jitted
  program does `cache.update(k, v, q)` + `cache.attend(q)` with the cache donated, and the
  output [B, T, H, D] comes back by DLPack: two hand-offs and one JAX dispatch per layer.

`Cache.update` cannot run attention, so a layer's `update` returns a `PendingKV` handle in
place of the key and value tensors; transformers passes it untouched to the attention
function registered as "tqjax" (`bridge.attention`), which does the work above.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from bridge.dlpack import to_jax, to_torch
from tqjax.dense_cache import DenseCache
from tqjax.kvcache import CacheConfig, TurboQuantCache, preset as named_preset

ATTENTION_NAME = "tqjax"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
# "mosaic": the Mosaic GPU decode kernel (the k4v4 and k3v3 presets at head_dim 128, k4v4 at
# 64; at most 16 query heads per KV head, sm_90; `pallas_kernels.decode_mosaic`).
IMPLEMENTATIONS = ("xla", "pallas", "mosaic")
_MOSAIC_STEP = 128  # a mosaic cache's capacity is whole steps of the kernel
_CAPACITY_BLOCK = 256  # capacities are multiples of this (fewer recompiles)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


# ---- the JAX programs ----


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads", "capacity"))
def _prefill_dense(
  qkv: jax.Array,  # [B, T, H + 2K, D] queries, keys (after RoPE), values
  order: jax.Array | None,  # [B, T] int32: real tokens first, in order (None: no padding)
  lengths: jax.Array | None,  # [B] int32 real tokens per row (None: T)
  *, num_heads: int, num_kv_heads: int, capacity: int,
) -> DenseCache:
  """A `DenseCache` holding the prompt, its query statistics over the real tokens only."""
  b, t, _, d = qkv.shape
  if order is not None:
    qkv = jnp.take_along_axis(qkv, order[:, :, None, None], axis=1)
    real = jnp.arange(t, dtype=jnp.int32)[None, :] < lengths[:, None]  # [B, T]
    qkv = jnp.where(real[:, :, None, None], qkv, jnp.zeros((), qkv.dtype))
  h, kh = num_heads, num_kv_heads
  cache = DenseCache.init(b, kh, d, capacity, qkv.dtype)
  cache = cache.update(qkv[:, :, h:h + kh], qkv[:, :, h + kh:], qkv[:, :, :h])
  if lengths is not None:  # padding rows were zero: only the count needs fixing
    count = jnp.sum(lengths).astype(jnp.float32) * (h // kh)
    cache = dataclasses.replace(cache, lengths=lengths, query_count=count)
  return cache


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads", "scale",
                                             "sliding_window"), donate_argnums=(0,))
def _update_attend(
  cache: Any,  # DenseCache | TurboQuantCache, donated
  qkv: jax.Array,  # [B, T, H + 2K, D]
  *, num_heads: int, num_kv_heads: int, scale: float, sliding_window: int | None,
) -> tuple[Any, jax.Array]:  # (cache, out [B, T, H, D])
  q = qkv[:, :, :num_heads]
  k = qkv[:, :, num_heads:num_heads + num_kv_heads]
  v = qkv[:, :, num_heads + num_kv_heads:]
  cache = cache.update(k, v, q)
  return cache, cache.attend(q, scale=scale, sliding_window=sliding_window)


def _with_capacity(cache: Any, capacity: int) -> Any:
  """The cache with its preallocated sequence axis (axis 2, [B, K, S_cap, ...]) grown."""
  def pad(x: jax.Array) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[2] = (0, capacity - x.shape[2])
    return jnp.pad(x, widths)

  if isinstance(cache, DenseCache):
    return dataclasses.replace(cache, k=pad(cache.k), v=pad(cache.v))
  if isinstance(cache, TurboQuantCache):
    return dataclasses.replace(
      cache, k_codes=tuple(map(pad, cache.k_codes)), k_scales=tuple(map(pad, cache.k_scales)),
      v_codes=tuple(map(pad, cache.v_codes)), v_scales=tuple(map(pad, cache.v_scales)))
  raise TypeError(f"cannot grow a {type(cache).__name__}; pass max_cache_len instead")


def _shared_structure(state: Any) -> Any:
  """`state` with its quantizers' seeds set to 0. A seed only chose the rotation and sketch
  matrices, which are arrays built already; without it in the static configs the layers'
  caches share one pytree structure and so one compiled `_update_attend` (else every
  layer compiles its own)."""
  if not isinstance(state, TurboQuantCache):
    return state
  canon = lambda q: dataclasses.replace(q, config=dataclasses.replace(q.config, seed=0))
  return dataclasses.replace(state, key_quantizer=canon(state.key_quantizer),
                             value_quantizer=canon(state.value_quantizer))


def _fresh_leaves(new: Any, old: Any) -> Any:
  """`new` with every leaf that shares a buffer with a leaf of `old` copied, so that
  donating one of the two caches never deletes a buffer of the other."""
  old_buffers = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(old)}
  return jax.tree.map(
    lambda x: jnp.copy(x) if x.unsafe_buffer_pointer() in old_buffers else x, new)


# ---- model shape and checks ----


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the cache needs to know about a transformers Llama / Qwen2 / Mistral model."""
  model_type: str
  num_layers: int
  num_heads: int  # H
  num_kv_heads: int  # K
  head_dim: int  # D

  @classmethod
  def from_hf(cls, hf_config: Any) -> ModelSpec:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"the tqjax bridge supports model types {SUPPORTED_MODEL_TYPES}, got "
                       f"{model_type=}")
    layer_types = getattr(hf_config, "layer_types", None) or ()
    unsupported = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
    if unsupported:
      raise ValueError(f"the tqjax bridge supports layer types {SUPPORTED_LAYER_TYPES}, the "
                       f"model has {unsupported}")
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    return cls(model_type, hf_config.num_hidden_layers, num_heads, num_kv_heads, head_dim)


def resolve_preset(preset: str | CacheConfig | None, **overrides) -> CacheConfig | None:
  """None (exact, no compression), a `CacheConfig`, or a preset name ("k4v4", ...)."""
  if preset is None:
    if overrides:
      raise ValueError(f"overrides {sorted(overrides)} need a compression preset, got None")
    return None
  if isinstance(preset, CacheConfig):
    return dataclasses.replace(preset, **overrides) if overrides else preset
  if isinstance(preset, str):
    return named_preset(preset, **overrides)
  raise TypeError(f"preset must be a name, a CacheConfig or None, got {type(preset).__name__}")


def default_implementation() -> str:
  """"pallas" (the fused kernels) when JAX runs on a GPU, else "xla" (the jnp reference)."""
  return "pallas" if jax.default_backend() == "gpu" else "xla"


# ---- the handle that travels from `update` to the attention function ----


class PendingKV:
  """The new keys and values of one layer, on their way to the attention function."""
  __slots__ = ("layer", "keys", "values")

  def __init__(self, layer: TQJaxLayer, keys: torch.Tensor, values: torch.Tensor):
    self.layer = layer
    self.keys = keys  # [B, K, T, D]
    self.values = values  # [B, K, T, D]

  def __repr__(self) -> str:
    return (f"PendingKV(layer={self.layer.index}, keys={tuple(self.keys.shape)}, "
            f"dtype={self.keys.dtype})")


# ---- one layer ----


class TQJaxLayer(CacheLayerMixin):
  """One layer: a `DenseCache` or `TurboQuantCache` (JAX) plus transformers' bookkeeping.

  `seen` counts every token transformers fed, padding included (it sizes transformers'
  masks and positions); the JAX cache's per-row `lengths` count real tokens only.
  """

  is_sliding = False  # every token is kept; the sliding window is applied when attending
  is_compileable = False
  is_croppable = False
  supports_early_init = False

  def __init__(self, owner: TurboQuantHFCache, index: int):
    super().__init__()
    self.owner = owner
    self.index = index
    self.state: DenseCache | TurboQuantCache | None = None
    self.seen = 0
    self.capacity = 0

  def __repr__(self) -> str:
    kind = "empty" if self.state is None else type(self.state).__name__
    return f"TQJaxLayer({self.index}, {kind}, seen={self.seen}, capacity={self.capacity})"

  # transformers' layer protocol

  def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
    self.device, self.dtype = key_states.device, key_states.dtype
    self.is_initialized = True

  def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
             **kwargs: Any) -> tuple[PendingKV, PendingKV]:
    """Returns a `PendingKV` handle (twice, for keys and values); the "tqjax" attention
    function stores the K/V and attends."""
    self.owner.check_attention_implementation()
    if not self.is_initialized:
      self.lazy_initialization(key_states, value_states)
    self.seen += key_states.shape[-2]
    pending = PendingKV(self, key_states, value_states)
    return pending, pending

  def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
    return self.seen + query_length, 0

  def get_seq_length(self) -> int:
    return self.seen

  def get_max_length(self) -> int:
    return -1 if self.owner.token_limit is None else self.owner.token_limit

  def reset(self) -> None:
    self.state, self.seen, self.capacity = None, 0, 0
    self.is_initialized = False

  def crop(self, tokens_to_remove: int) -> None:
    raise NotImplementedError("the tqjax cache cannot be cropped (no assisted or "
                              "speculative decoding)")

  def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
    raise NotImplementedError("the tqjax cache does not support beam search (num_beams > 1)")

  def batch_repeat_interleave(self, repeats: int) -> None:
    if self.state is not None:
      raise NotImplementedError("the tqjax cache cannot repeat a filled batch")

  def batch_select_indices(self, indices: torch.Tensor) -> None:
    if self.state is not None:
      raise NotImplementedError("the tqjax cache cannot select rows of a filled batch")

  def offload(self) -> None:
    raise NotImplementedError("the tqjax cache lives in JAX buffers and is not offloaded")

  def prefetch(self) -> None:
    raise NotImplementedError("the tqjax cache lives in JAX buffers and is not offloaded")

  # the work, called by the attention function

  def prefill(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              real: torch.Tensor | None) -> None:
    """Stores the prompt's keys, values [B, K, T, D] (and statistics of its queries
    [B, H, T, D]); `real` [B, T] bool marks the real (not padding) tokens, None when every
    token is real."""
    if self.state is not None:
      raise RuntimeError(f"layer {self.index} already holds a prefill")
    h, (b, kh, t, _) = query.shape[1], keys.shape
    qkv = torch.cat([query.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)],
                    dim=2)  # [B, T, H + 2K, D]
    order = lengths = None
    if real is not None:
      order = to_jax(torch.argsort((~real).to(torch.int8), dim=1, stable=True))  # [B, T]
      lengths = to_jax(real.sum(dim=1))  # [B]
    config = self.owner.cache_config
    dense_capacity = t if config is not None else self.owner.capacity_for(self.seen)
    dense = _prefill_dense(to_jax(qkv), order, lengths, num_heads=h, num_kv_heads=kh,
                           capacity=dense_capacity)
    if config is None:
      self.state, self.capacity = dense, dense_capacity
    else:
      self.state = self.owner.compress(dense, self.index, self.owner.capacity_for(self.seen))
      self.capacity = self.state.capacity

  def update_attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    scale: float, sliding_window: int | None) -> torch.Tensor:
    """Appends keys, values [B, K, T, D] and returns the attention of query [B, H, T, D]
    over the whole cache, [B, T, H, D]."""
    if self.state is None:
      raise RuntimeError(f"layer {self.index} has no prefill")
    if self.seen > self.capacity:
      self.state = _with_capacity(self.state, self.owner.capacity_for(self.seen,
                                                                      current=self.capacity))
      self.capacity = self.state.capacity
    h, kh = query.shape[1], keys.shape[1]
    qkv = torch.cat([query.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)],
                    dim=2)  # [B, T, H + 2K, D]
    self.state, out = _update_attend(self.state, to_jax(qkv), num_heads=h, num_kv_heads=kh,
                                     scale=float(scale), sliding_window=sliding_window)
    return to_torch(out)


# ---- the cache ----


class TurboQuantHFCache(Cache):
  """transformers `Cache` over tqjax caches; use with the "tqjax" attention:

      cache = TurboQuantHFCache.from_model(model, preset="k4v4")
      with bridge.tqjax_attention(model):
        out = model.generate(ids, past_key_values=cache, max_new_tokens=64)

  `preset=None` keeps the exact `DenseCache` (compression off). `max_cache_len` fixes the
  capacity in tokens (prompt + new tokens, padding included); without it the capacity
  follows the prompt and doubles when full (one recompile each time).
  """

  def __init__(self, hf_config: Any, *, config: CacheConfig | None,
               max_cache_len: int | None = None, implementation: str | None = None):
    self.spec = ModelSpec.from_hf(hf_config)
    implementation = default_implementation() if implementation is None else implementation
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got "
                       f"{implementation!r}")
    if max_cache_len is not None and max_cache_len < 1:
      raise ValueError(f"{max_cache_len=} must be >= 1 or None")
    self.hf_config = hf_config
    self.cache_config = config  # None: exact, no compression
    self.token_limit = max_cache_len  # (transformers 5.17 has a max_cache_len property)
    self.implementation = implementation
    super().__init__(layers=[TQJaxLayer(self, i) for i in range(self.spec.num_layers)])

  @classmethod
  def from_model(cls, model: Any, preset: str | CacheConfig | None = "k4v4", *,
                 max_cache_len: int | None = None, implementation: str | None = None,
                 **overrides: Any) -> TurboQuantHFCache:
    """A cache for a transformers Llama / Qwen2 / Mistral model and a preset name
    (`tqjax.kvcache.PRESETS`, with `CacheConfig` field overrides such as window=128),
    a `CacheConfig`, or None (exact)."""
    return cls(model.config, config=resolve_preset(preset, **overrides),
               max_cache_len=max_cache_len, implementation=implementation)

  def check_attention_implementation(self) -> None:
    current = getattr(self.hf_config, "_attn_implementation", None)
    if current != ATTENTION_NAME:
      raise RuntimeError(
        f"a TurboQuantHFCache needs the model's attention set to {ATTENTION_NAME!r}, got "
        f"{current!r}: run the model inside `with bridge.tqjax_attention(model):`")

  def capacity_for(self, needed: int, current: int = 0) -> int:
    """Capacity (tokens) that holds `needed` tokens: max_cache_len, or grown by doubling."""
    if self.token_limit is not None:
      if needed > self.token_limit:
        raise ValueError(f"the cache holds max_cache_len={self.token_limit} tokens, "
                         f"{needed} arrived (prompt and new tokens, padding included)")
      if self.implementation == "mosaic":  # slots past the limit stay unused
        return _round_up(self.token_limit, _MOSAIC_STEP)
      return self.token_limit
    return _round_up(max(needed + _CAPACITY_BLOCK, 2 * current), _CAPACITY_BLOCK)

  def compress(self, dense: DenseCache, layer: int, capacity: int) -> TurboQuantCache:
    if self.cache_config is None:
      raise RuntimeError("this cache has no compression preset")
    state = TurboQuantCache.from_dense(dense, self.cache_config, layer=layer, capacity=capacity,
                                       implementation=self.implementation)
    # Committed to the dense cache's device like the outputs of the jitted step, so that
    # the step compiles once for both.
    return _shared_structure(jax.device_put(state, next(iter(dense.k.devices()))))

  def convert(self, preset: str | CacheConfig, *, implementation: str | None = None,
              **overrides: Any) -> TurboQuantHFCache:
    """A compressed copy of this exact, prefilled cache (the paired protocol: one exact
    prefill, then a baseline and a compressed run). This cache stays usable."""
    config = resolve_preset(preset, **overrides)
    if config is None:
      raise ValueError("convert needs a compression preset, got None")
    if self.cache_config is not None:
      raise ValueError(f"convert needs an exact (preset=None) cache, this one is "
                       f"{self.cache_config.name!r}")
    if any(layer.state is None for layer in self.layers):
      raise ValueError("convert needs a prefilled cache (run the prompt through it first)")
    other = TurboQuantHFCache(self.hf_config, config=config, max_cache_len=self.token_limit,
                              implementation=implementation or self.implementation)
    for mine, theirs in zip(self.layers, other.layers):
      state = other.compress(mine.state, mine.index, mine.capacity)
      theirs.state = _fresh_leaves(state, mine.state)
      theirs.capacity = state.capacity
      theirs.seen = mine.seen
      theirs.device, theirs.dtype, theirs.is_initialized = mine.device, mine.dtype, True
    return other

  def jax_caches(self) -> tuple[Any, ...]:
    """The per-layer tqjax caches (None for a layer not filled yet)."""
    return tuple(layer.state for layer in self.layers)

  def memory_bytes(self) -> int:
    """Bytes held by the JAX caches of every layer."""
    return sum(layer.state.memory_bytes() for layer in self.layers if layer.state is not None)
