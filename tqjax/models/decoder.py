"""The Llama-family decoder in Flax NNX (Llama, Qwen2, Mistral: one implementation).

`Decoder(tokens [B, T], caches) -> (logits [B, T, V] float32, caches)`. `caches` is a tuple
of per-layer caches of any type that implements the cache protocol (`lengths`, `update`,
`attend`; see `tqjax.dense_cache.DenseCache`), or one `tqjax.kvcache.StackedCache` (every
layer's compressed cache in one set of arrays: layer i is ``caches[i]``, written back with
``caches.set(i, ...)`` before layer i + 1 runs); otherwise the model never looks at the
cache type.
Positions come from the caches: token t of row b is at `lengths[b] + t`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tqjax.dense_cache import DenseCache, einsum_f32
from tqjax.kvcache import StackedCache
from tqjax.models.config import ModelConfig


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype):
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.weight[...] * y.astype(x.dtype)


def rope_cos_sin(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, T, D // 2] float32 for positions [B, T]."""
  inv_freq = jnp.asarray(config.rope_inv_freq())  # [D // 2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B, T, N, D] by position; halves convention (x[:D/2], x[D/2:] are pairs)."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  c = cos[:, :, None, :].astype(x.dtype)  # [B, T, 1, D // 2]
  s = sin[:, :, None, :].astype(x.dtype)
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _linear(din: int, dout: int, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


# Fused projections. One matmul reads the weights of q, k and v (and of gate and up) in one
# kernel; at batch 1 XLA also rewrites a matrix-vector product whose operands are small
# (under 10M elements, e.g. Llama-3-8B's 4096 x 1024 k_proj) into a multiply and a reduction,
# and it fused k's and v's multiplies into one program that wrote both products out
# (16 MB per layer): 37 us per layer on the H200 against ~4 us for the bytes read.
# Column layouts that a split of the output over devices keeps whole (tensor parallelism):
# q, k, v grouped by KV head, gate and up interleaved.


def fuse_qkv(q: jax.Array, k: jax.Array, v: jax.Array, num_kv_heads: int) -> jax.Array:
  """q [..., H * D], k and v [..., K * D] (kernels or biases) -> [..., K * (G + 2) * D]:
  per KV head, its G = H / K query heads, its key, its value."""
  kh = num_kv_heads
  if (k.shape != v.shape or q.shape[:-1] != k.shape[:-1] or k.shape[-1] % kh
      or q.shape[-1] % k.shape[-1]):
    raise ValueError(f"fuse_qkv takes q [..., H * D], k and v [..., K * D] with K = "
                     f"num_kv_heads = {kh} dividing H; got q {q.shape}, k {k.shape}, "
                     f"v {v.shape}")
  d = k.shape[-1] // kh
  lead = q.shape[:-1]
  parts = [q.reshape(*lead, kh, -1, d), k.reshape(*lead, kh, 1, d), v.reshape(*lead, kh, 1, d)]
  return jnp.concatenate(parts, axis=-2).reshape(*lead, -1)


def fuse_gate_up(gate: jax.Array, up: jax.Array) -> jax.Array:
  """gate, up [..., I] -> [..., 2 I] with column 2j = gate j, column 2j + 1 = up j."""
  if gate.shape != up.shape:
    raise ValueError(f"fuse_gate_up takes gate and up of one shape, got {gate.shape} and "
                     f"{up.shape}")
  return jnp.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], -1)


class Attention(nnx.Module):

  def __init__(self, config: ModelConfig, layer: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    h, k, d = config.num_heads, config.num_kv_heads, config.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = h, k, d
    self.sliding_window = config.layer_window(layer)
    # transformers' q_proj, k_proj and v_proj in one (`fuse_qkv`).
    self.qkv_proj = _linear(config.hidden_size, (h + 2 * k) * d, config.qkv_bias, dtype, rngs)
    self.o_proj = _linear(h * d, config.hidden_size, config.o_bias, dtype, rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: Any
               ) -> tuple[jax.Array, Any]:
    b, t, _ = x.shape
    g = self.num_heads // self.num_kv_heads
    qkv = self.qkv_proj(x).reshape(b, t, self.num_kv_heads, g + 2, self.head_dim)
    q = qkv[:, :, :, :g].reshape(b, t, self.num_heads, self.head_dim)  # [B, T, H, D]
    k, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]  # [B, T, K, D]
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    cache = cache.update(k, v, q)
    out = cache.attend(q, scale=self.head_dim ** -0.5, sliding_window=self.sliding_window)
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), cache


class MLP(nnx.Module):

  def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    hid, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
    self.gate_up_proj = _linear(hid, 2 * inter, bias, dtype, rngs)  # `fuse_gate_up`
    self.down_proj = _linear(inter, hid, bias, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate_up = self.gate_up_proj(x).reshape(*x.shape[:-1], -1, 2)
    return self.down_proj(jax.nn.silu(gate_up[..., 0]) * gate_up[..., 1])


class Block(nnx.Module):

  def __init__(self, config: ModelConfig, layer: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    self.self_attn = Attention(config, layer, dtype=dtype, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                                            dtype=dtype)
    self.mlp = MLP(config, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: Any
               ) -> tuple[jax.Array, Any]:
    attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, cache)
    x = x + attn
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, cache


class Decoder(nnx.Module):
  """Llama-family causal LM. Parameter names follow transformers' state dict, except the
  fused projections ``qkv_proj`` (`fuse_qkv`) and ``gate_up_proj`` (`fuse_gate_up`)."""

  def __init__(self, config: ModelConfig, *, dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    self.dtype = jnp.dtype(dtype)
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                  param_dtype=dtype, rngs=rngs)
    self.layers = nnx.List([Block(config, i, dtype=dtype, rngs=rngs)
                            for i in range(config.num_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    if config.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = _linear(config.hidden_size, config.vocab_size, False, dtype, rngs)

  def __call__(self, tokens: jax.Array, caches: Sequence[Any], *,
               logits_to_keep: int | None = None) -> tuple[jax.Array, tuple[Any, ...]]:
    """tokens [B, T] int -> (logits [B, T, V] float32, new caches); with
    ``logits_to_keep=n`` only the last n positions' logits, [B, n, V] (a long prompt's
    full-vocabulary logits can outweigh its cache)."""
    if tokens.ndim != 2:
      raise ValueError(f"expected tokens [B, T], got {tokens.shape=}")
    if logits_to_keep is not None and not 1 <= logits_to_keep <= tokens.shape[1]:
      raise ValueError(f"{logits_to_keep=} must be in [1, T={tokens.shape[1]}] or None")
    if len(caches) != self.config.num_layers:
      raise ValueError(f"expected {self.config.num_layers} layer caches, got {len(caches)}")
    t = tokens.shape[1]
    positions = caches[0].lengths[:, None] + jnp.arange(t, dtype=jnp.int32)  # [B, T]
    cos, sin = rope_cos_sin(self.config, positions)
    x = self.embed_tokens(tokens)  # [B, T, hidden]
    stacked = isinstance(caches, StackedCache)
    new_caches = []
    for i, block in enumerate(self.layers):
      x, cache = block(x, cos, sin, caches[i])
      if stacked:  # written back before the next layer reads the stack
        caches = caches.set(i, cache)
      else:
        new_caches.append(cache)
    if logits_to_keep is not None:
      x = x[:, -logits_to_keep:]
    x = self.norm(x)
    if self.lm_head is None:
      w = self.embed_tokens.embedding[...]  # [V, hidden]
      logits = einsum_f32("bth,vh->btv", x, w)
    else:
      w = self.lm_head.kernel[...]  # [hidden, V]
      logits = einsum_f32("bth,hv->btv", x, w)
    return logits, caches if stacked else tuple(new_caches)


def init_caches(config: ModelConfig, batch: int, capacity: int,
                dtype: jnp.dtype = jnp.float32) -> tuple[DenseCache, ...]:
  """One empty `DenseCache` per layer."""
  return tuple(DenseCache.init(batch, config.num_kv_heads, config.head_dim, capacity, dtype)
               for _ in range(config.num_layers))
