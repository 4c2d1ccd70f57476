"""The exact KV cache and the plain attention math other cache types reuse.

`DenseCache` stores keys and values unquantized, [B, K, S_cap, D], and implements the
per-layer cache protocol every cache type shares (`lengths`, `update`, `attend`), so model
code never branches on the cache type.

`dense_attention` is the reference attention (GQA, causal by position, validity mask,
optional sliding window, softmax in float32). `dense_attention_partial` returns the
unnormalized pieces (accumulator, row max, row sum) so that a cache with several regions
(an exact window plus a compressed region) can combine them with `combine_partials`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp


def einsum_f32(subscripts: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """einsum accumulating and returning float32 whatever the operand dtypes.

  XLA:CPU has no bf16 x bf16 -> f32 dot for batched contractions, so on CPU the operands
  are upcast first (exact: every bf16/f16 value is a float32); elsewhere the dot
  accumulates in float32 directly (`preferred_element_type`).
  """
  if jax.default_backend() == "cpu":
    return jnp.einsum(subscripts, a.astype(jnp.float32), b.astype(jnp.float32))
  return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32)


def attention_mask(
  q_positions: jax.Array,  # [B, T] int
  kv_positions: jax.Array,  # [B, S] or [S] int
  kv_valid: jax.Array,  # [B, S] bool
  sliding_window: int | None = None,
) -> jax.Array:  # [B, T, S] bool
  """True where query t may attend to key s: valid, causal, inside the window."""
  if kv_positions.ndim == 1:
    kv_positions = kv_positions[None, :]
  q_pos = q_positions[:, :, None]  # [B, T, 1]
  kv_pos = kv_positions[:, None, :]  # [B, 1, S]
  mask = kv_valid[:, None, :] & (kv_pos <= q_pos)
  if sliding_window is not None:
    mask &= kv_pos > q_pos - sliding_window
  return mask


def _check_attention_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"expected q [B, T, H, D] and k, v [B, K, S, D], got {q.shape=}, "
                     f"{k.shape=}, {v.shape=}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got {k.shape=}, {v.shape=}")
  b, _, h, d = q.shape
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"q [B, T, H, D] and k [B, K, S, D] disagree on B or D: {q.shape=}, "
                     f"{k.shape=}")
  if h % k.shape[1]:
    raise ValueError(f"q heads H={h} must be a multiple of kv heads K={k.shape[1]}")


@functools.partial(jax.jit, static_argnames=("sliding_window",))
def dense_attention_partial(
  q: jax.Array,  # [B, T, H, D]
  k: jax.Array,  # [B, K, S, D]
  v: jax.Array,  # [B, K, S, D]
  q_positions: jax.Array,  # [B, T]
  kv_positions: jax.Array,  # [B, S] or [S]
  kv_valid: jax.Array,  # [B, S] bool
  scale: float,
  sliding_window: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Unnormalized attention over one region of keys.

  Returns (acc [B, T, H, D] float32, row_max [B, T, H] float32, row_sum [B, T, H] float32)
  with acc = Σ_s exp(l_s - row_max) v_s and row_sum = Σ_s exp(l_s - row_max). A query that
  sees no key of this region gets row_max = -inf and acc = row_sum = 0.
  """
  _check_attention_shapes(q, k, v)
  b, t, h, d = q.shape
  kh = k.shape[1]
  g = h // kh
  # [B, K, G, T, D]: batch dims (B, K) lead and (G, T) merge into one matmul row dim, the
  # layout XLA's dot wants (3.5x faster on CPU than contracting [B, T, K, G, D] directly).
  qg = q.reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4)
  logits = einsum_f32("bkgtd,bksd->bkgts", qg, k) * jnp.float32(scale)
  mask = attention_mask(q_positions, kv_positions, kv_valid, sliding_window)  # [B, T, S]
  mask = mask[:, None, None]  # [B, 1, 1, T, S]
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1)  # [B, K, G, T]
  safe_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.where(mask, jnp.exp(logits - safe_max[..., None]), 0.0)  # [B, K, G, T, S]
  row_sum = jnp.sum(p, axis=-1)
  acc = einsum_f32("bkgts,bksd->bkgtd", p.astype(v.dtype), v)  # [B, K, G, T, D]

  def to_bth(x):  # [B, K, G, T, ...] -> [B, T, H, ...]
    return jnp.moveaxis(x, 3, 1).reshape(b, t, h, *x.shape[4:])

  return to_bth(acc), to_bth(row_max), to_bth(row_sum)


def combine_partials(
  parts: Sequence[tuple[jax.Array, jax.Array, jax.Array]], dtype: jnp.dtype
) -> jax.Array:  # [B, T, H, D]
  """Merges (acc, row_max, row_sum) of disjoint key regions into normalized attention."""
  row_max = parts[0][1]
  for _, m, _ in parts[1:]:
    row_max = jnp.maximum(row_max, m)
  safe_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  acc = 0.0
  total = 0.0
  for a, m, s in parts:
    w = jnp.where(jnp.isfinite(m), jnp.exp(m - safe_max), 0.0)  # [B, T, H]
    acc = acc + a * w[..., None]
    total = total + s * w
  return (acc / total[..., None]).astype(dtype)


@functools.partial(jax.jit, static_argnames=("sliding_window",))
def dense_attention(
  q: jax.Array,  # [B, T, H, D]
  k: jax.Array,  # [B, K, S, D]
  v: jax.Array,  # [B, K, S, D]
  q_positions: jax.Array,  # [B, T]
  kv_positions: jax.Array,  # [B, S] or [S]
  kv_valid: jax.Array,  # [B, S] bool
  scale: float,
  sliding_window: int | None = None,
) -> jax.Array:  # [B, T, H, D], q.dtype
  """softmax(scale q kᵀ + mask) v with GQA (H = G K), softmax in float32."""
  return combine_partials(
    [dense_attention_partial(q, k, v, q_positions, kv_positions, kv_valid, scale,
                             sliding_window)], q.dtype)


def _write_row(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  # buf [K, S_cap, D], new [K, T, D], start scalar
  return jax.lax.dynamic_update_slice(buf, new, (0, start, 0))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseCache:
  """Exact per-layer KV cache, preallocated to a capacity S_cap."""
  k: jax.Array  # [B, K, S_cap, D]
  v: jax.Array  # [B, K, S_cap, D]
  lengths: jax.Array  # [B] int32, tokens stored per row (= position of the next token)
  # Running Σ q² per KV head and channel of the queries passed to `update`, and their
  # count: a compressed cache built from this one scales its keys with them.
  query_sq: jax.Array  # [K, D] float32
  query_count: jax.Array  # [] float32

  @classmethod
  def init(cls, batch: int, num_kv_heads: int, head_dim: int, capacity: int,
           dtype: jnp.dtype = jnp.float32) -> DenseCache:
    for name, value in (("batch", batch), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim), ("capacity", capacity)):
      if value < 1:
        raise ValueError(f"{name}={value} must be >= 1")
    shape = (batch, num_kv_heads, capacity, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               lengths=jnp.zeros((batch,), jnp.int32),
               query_sq=jnp.zeros((num_kv_heads, head_dim), jnp.float32),
               query_count=jnp.zeros((), jnp.float32))

  def shardings(self, mesh: jax.sharding.Mesh, *, data_axis: str = "data",
                model_axis: str = "model") -> DenseCache:
    """The cache's `NamedSharding`s (a DenseCache of them): lengths [B] over data_axis, the
    query statistics over model_axis (the sum [K, D]) or replicated (the count), every
    other array (k, v: [B, K, ...]) over (data_axis, model_axis). Works on a concrete or
    an abstract (`jax.eval_shape`) cache."""
    from tqjax import sharding as sharding_lib

    b, kh = self.k.shape[:2]
    s = sharding_lib.cache_shardings(mesh, batch=b, num_kv_heads=kh, data_axis=data_axis,
                                     model_axis=model_axis)
    small = dict(lengths=s.batch, query_sq=s.heads, query_count=s.replicated)
    return DenseCache(**{f.name: small.get(f.name, s.batch_heads) for f in dataclasses.fields(self)})

  @property
  def capacity(self) -> int:
    return self.k.shape[2]

  def update(self, k: jax.Array, v: jax.Array, q: jax.Array | None = None) -> DenseCache:
    """Appends k, v [B, T, K, D] (keys after RoPE) at positions lengths .. lengths + T - 1,
    and adds the queries q [B, T, H, D] of the same tokens, when given, to the statistics.

    Rows whose lengths + T exceed the capacity are not checked (lengths are traced
    values); callers size the capacity (see `generate`).
    """
    b, kh, s_cap, d = self.k.shape
    if k.shape != v.shape:
      raise ValueError(f"k and v must have the same shape, got {k.shape=}, {v.shape=}")
    if k.ndim != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (b, kh, d):
      raise ValueError(f"expected k, v [B={b}, T, K={kh}, D={d}], got {k.shape=}")
    t = k.shape[1]
    if t > s_cap:
      raise ValueError(f"cannot append T={t} tokens to a cache of capacity {s_cap}")
    new_k = jnp.swapaxes(k, 1, 2).astype(self.k.dtype)  # [B, K, T, D]
    new_v = jnp.swapaxes(v, 1, 2).astype(self.v.dtype)
    write = jax.vmap(_write_row)
    query_sq, query_count = self.query_sq, self.query_count
    if q is not None:
      if q.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != d or q.shape[2] % kh:
        raise ValueError(f"expected q [B={b}, T={t}, H (multiple of K={kh}), D={d}], got {q.shape=}")
      qg = q.reshape(b, t, kh, -1, d).astype(jnp.float32)
      query_sq = query_sq + jnp.sum(qg * qg, axis=(0, 1, 3))
      query_count = query_count + b * t * qg.shape[3]
    return DenseCache(k=write(self.k, new_k, self.lengths),
                      v=write(self.v, new_v, self.lengths),
                      lengths=self.lengths + jnp.int32(t),
                      query_sq=query_sq, query_count=query_count)

  def query_rms(self) -> jax.Array:  # [K, D]; all ones before any query was seen
    rms = jnp.sqrt(self.query_sq / jnp.maximum(self.query_count, 1.0))
    return jnp.where(self.query_count > 0, rms, 1.0)

  def attend(self, q: jax.Array, *, scale: float,
             sliding_window: int | None = None) -> jax.Array:
    """Attention of q [B, T, H, D], the T tokens just appended, over the stored keys."""
    b, kh, s_cap, d = self.k.shape
    if q.ndim != 4 or q.shape[0] != b or q.shape[3] != d or q.shape[2] % kh:
      raise ValueError(f"expected q [B={b}, T, H (multiple of K={kh}), D={d}], got {q.shape=}")
    t = q.shape[1]
    q_positions = self.lengths[:, None] - t + jnp.arange(t, dtype=jnp.int32)  # [B, T]
    kv_positions = jnp.arange(s_cap, dtype=jnp.int32)  # [S]
    kv_valid = kv_positions[None, :] < self.lengths[:, None]  # [B, S]
    return dense_attention(q, self.k, self.v, q_positions, kv_positions, kv_valid, scale,
                           sliding_window)

  def memory_bytes(self) -> int:
    """Bytes held by the cache arrays (allocated capacity, not the filled part)."""
    return int(sum(x.nbytes for x in jax.tree.leaves(self)))
