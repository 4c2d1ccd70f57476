"""DenseCache and dense_attention against a float64 numpy reference."""

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tqjax.dense_cache import (DenseCache, combine_partials, dense_attention,
                               dense_attention_partial)


def attention_reference(q, k, v, lengths, scale, window):
  """q [B, T, H, D] (the last T tokens of each row), k, v [B, K, S, D], lengths [B] after
  the append. float64 loops over rows and heads."""
  b, t, h, d = q.shape
  kh = k.shape[1]
  g = h // kh
  out = np.zeros((b, t, h, d))
  for bi in range(b):
    for ti in range(t):
      pos = lengths[bi] - t + ti
      keys = np.arange(lengths[bi])
      keys = keys[keys <= pos]
      if window is not None:
        keys = keys[keys > pos - window]
      for hi in range(h):
        kk = k[bi, hi // g, keys].astype(np.float64)
        vv = v[bi, hi // g, keys].astype(np.float64)
        logits = kk @ q[bi, ti, hi].astype(np.float64) * scale
        p = np.exp(logits - logits.max())
        out[bi, ti, hi] = p @ vv / p.sum()
  return out


def filled_cache(rng, b, kh, d, cap, prev_lengths, dtype=jnp.float32):
  k = rng.standard_normal((b, kh, cap, d)).astype(np.float32)
  v = rng.standard_normal((b, kh, cap, d)).astype(np.float32)
  return dataclasses.replace(DenseCache.init(b, kh, d, cap, dtype), k=jnp.asarray(k, dtype),
                             v=jnp.asarray(v, dtype), lengths=jnp.asarray(prev_lengths, jnp.int32))


@pytest.mark.parametrize("b,kh,g,d,t,window", [
  (3, 2, 3, 7, 5, None),  # GQA, chunk of 5
  (2, 3, 1, 11, 1, None),  # MHA decode
  (3, 1, 5, 13, 3, 4),  # MQA, sliding window shorter than the context
  (2, 2, 2, 5, 7, 2),  # window shorter than the chunk
])
def test_update_then_attend_matches_reference(rng, b, kh, g, d, t, window):
  cap = 29
  prev = rng.integers(0, cap - t + 1, size=b)  # per-row lengths differ
  cache = filled_cache(rng, b, kh, d, cap, prev)  # garbage beyond `prev` must be ignored
  k_new = rng.standard_normal((b, t, kh, d)).astype(np.float32)
  v_new = rng.standard_normal((b, t, kh, d)).astype(np.float32)
  q = rng.standard_normal((b, t, kh * g, d)).astype(np.float32)
  scale = d ** -0.5

  cache = jax.jit(DenseCache.update)(cache, k_new, v_new)
  np.testing.assert_array_equal(np.asarray(cache.lengths), prev + t)
  k_all, v_all = np.asarray(cache.k), np.asarray(cache.v)
  for bi in range(b):
    np.testing.assert_array_equal(k_all[bi, :, prev[bi]:prev[bi] + t], k_new[bi].swapaxes(0, 1))
    np.testing.assert_array_equal(v_all[bi, :, prev[bi]:prev[bi] + t], v_new[bi].swapaxes(0, 1))

  out = jax.jit(lambda c, q: c.attend(q, scale=scale, sliding_window=window))(cache, q)
  assert out.dtype == jnp.float32 and out.shape == q.shape
  ref = attention_reference(q, k_all, v_all, prev + t, scale, window)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_update_leaves_other_slots_untouched(rng):
  b, kh, d, cap, t = 2, 3, 5, 17, 4
  prev = np.array([3, 9])
  cache = filled_cache(rng, b, kh, d, cap, prev)
  before = np.asarray(cache.k)
  new = rng.standard_normal((b, t, kh, d)).astype(np.float32)
  after = np.asarray(cache.update(new, new).k)
  for bi in range(b):
    keep = np.ones(cap, bool)
    keep[prev[bi]:prev[bi] + t] = False
    np.testing.assert_array_equal(after[bi][:, keep], before[bi][:, keep])


def test_bf16_attend_returns_q_dtype(rng):
  b, kh, g, d, cap, t = 2, 2, 2, 16, 13, 3
  cache = DenseCache.init(b, kh, d, cap, jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((b, t, kh, d)), jnp.bfloat16)
  q = jnp.asarray(rng.standard_normal((b, t, kh * g, d)), jnp.bfloat16)
  cache = cache.update(k, k)
  out = cache.attend(q, scale=0.25)
  assert out.dtype == jnp.bfloat16
  ref = attention_reference(np.asarray(q, np.float32), np.asarray(cache.k, np.float32),
                            np.asarray(cache.v, np.float32), np.full(b, t), 0.25, None)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=3e-2, atol=3e-2)


def test_donated_update_reuses_buffers(rng):
  b, kh, d, cap, t = 2, 3, 7, 31, 1
  cache = DenseCache.init(b, kh, d, cap, jnp.float32)
  new = jnp.asarray(rng.standard_normal((b, t, kh, d)), jnp.float32)
  update = jax.jit(DenseCache.update, donate_argnums=0)
  cache = update(cache, new, new)  # compile once
  k_ptr, v_ptr = cache.k.unsafe_buffer_pointer(), cache.v.unsafe_buffer_pointer()
  old = cache
  cache = update(cache, new, new)
  assert old.k.is_deleted() and old.v.is_deleted()
  assert cache.k.unsafe_buffer_pointer() == k_ptr
  assert cache.v.unsafe_buffer_pointer() == v_ptr
  np.testing.assert_array_equal(np.asarray(cache.lengths), [2 * t] * b)


def test_partials_over_split_regions_combine_to_full_attention(rng):
  # The way a cache with an exact window and a compressed region combines its two parts;
  # the second region is empty for some queries (-inf max) and must drop out.
  b, t, kh, g, d, s = 2, 3, 2, 3, 7, 19
  q = jnp.asarray(rng.standard_normal((b, t, kh * g, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, kh, s, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, kh, s, d)), jnp.float32)
  q_pos = jnp.asarray([[10, 11, 12], [4, 5, 6]], jnp.int32)
  pos = jnp.arange(s, dtype=jnp.int32)
  valid = pos[None, :] < jnp.asarray([[13], [7]])
  full = dense_attention(q, k, v, q_pos, pos, valid, 0.3, None)
  split = 11
  parts = [dense_attention_partial(q, k[:, :, :split], v[:, :, :split], q_pos, pos[:split],
                                   valid[:, :split], 0.3, None),
           dense_attention_partial(q, k[:, :, split:], v[:, :, split:], q_pos, pos[split:],
                                   valid[:, split:], 0.3, None)]
  assert not np.isfinite(np.asarray(parts[1][1])[1]).any()  # row 1 sees nothing there
  np.testing.assert_allclose(np.asarray(combine_partials(parts, jnp.float32)),
                             np.asarray(full), rtol=1e-6, atol=1e-6)


def test_shape_errors():
  cache = DenseCache.init(2, 3, 8, 5, jnp.float32)
  with pytest.raises(ValueError, match="K=3"):
    cache.update(jnp.zeros((2, 1, 4, 8)), jnp.zeros((2, 1, 4, 8)))
  with pytest.raises(ValueError, match="same shape"):
    cache.update(jnp.zeros((2, 1, 3, 8)), jnp.zeros((2, 2, 3, 8)))
  with pytest.raises(ValueError, match="capacity 5"):
    cache.update(jnp.zeros((2, 6, 3, 8)), jnp.zeros((2, 6, 3, 8)))
  with pytest.raises(ValueError, match="multiple of K=3"):
    cache.attend(jnp.zeros((2, 1, 4, 8)), scale=1.0)
  with pytest.raises(ValueError, match="capacity=0"):
    DenseCache.init(2, 3, 8, 0)


def test_memory_bytes():
  cache = DenseCache.init(3, 2, 16, 11, jnp.bfloat16)
  # k, v, lengths, and the query statistics (float32 [K, D] sums and a count).
  assert cache.memory_bytes() == 2 * (3 * 2 * 11 * 16 * 2) + 3 * 4 + 2 * 16 * 4 + 4


def test_update_gathers_query_statistics():
  rng = np.random.default_rng(7)
  q = rng.standard_normal((2, 5, 6, 8)).astype(np.float32) * np.arange(1, 9)
  cache = DenseCache.init(2, 3, 8, 16).update(jnp.zeros((2, 5, 3, 8)), jnp.zeros((2, 5, 3, 8)),
                                              jnp.asarray(q))
  want = np.sqrt((q.reshape(2, 5, 3, 2, 8).astype(np.float64) ** 2).mean(axis=(0, 1, 3)))
  np.testing.assert_allclose(cache.query_rms(), want, rtol=1e-5)
  np.testing.assert_array_equal(DenseCache.init(1, 3, 8, 4).query_rms(), 1.0)
