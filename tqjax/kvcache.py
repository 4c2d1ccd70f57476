"""The compressed KV cache: TurboQuant codes for old tokens, an exact window for new ones.

Per layer, `TurboQuantCache` holds

* a **compressed region** preallocated to a capacity S_cap: for each key and value segment
  (see `tqjax.quantizer`) packed codes [B, K, S_cap, P_i] uint8 and scales [B, K, S_cap];
  slot j holds the token at position j;
* an **exact window** of the newest tokens, [B, K, W + F, D], flushed into the compressed
  region F tokens at a time (F = ``flush_block``) whenever it would overflow, so at least
  W = ``window`` of the newest tokens stay exact;
* per-row ``lengths`` (all tokens) and ``compressed`` (tokens in the compressed region);
* optionally an exact **sink** buffer, [B, K, N, D], for the first N = ``sink_tokens``
  positions (attention sinks): once those tokens leave the window they are kept exact there
  and their slots in the compressed region are ignored by both attention paths.

**Key transforms** (DESIGN §2). Softmax ignores a constant added to every score, and
q·k = (q∘s)·(k/s), so every key — compressed or in the window — is stored as
k' = ((k − μ)/s)[π] and every query used as q' = (q∘s)[π], with μ, s and the channel order π
per layer and KV head, estimated from the prefill (``from_dense``) and then frozen:
scores change by the per-query constant q·μ only. Centering removes the huge per-channel
offsets of Qwen2-family keys (k_proj has a bias); scaling by s_c = σ_c^α evens out the
channels; π puts the channels with the largest σ first, where an outlier split spends
more bits.

Attention works in the rotated domain: the query is projected once per key segment, the
output accumulated per value segment and rotated back once. The jnp path here is the
reference; ``implementation="pallas"`` runs the fused decode kernel of `pallas_kernels`
for the compressed region and merges it with the window the same way (``"mosaic"``: the
Mosaic GPU kernel, k4v4 caches only).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from tqjax import dense_cache
from tqjax import quantizer as qz
from tqjax.dense_cache import DenseCache

KeyTransform = Literal["none", "center", "center_scale"]
KEY_TRANSFORMS = ("none", "center", "center_scale")
# "mosaic": the Mosaic GPU decode kernel (k4v4 and k3v3 at head_dim 128, k4v4 at 64;
# `pallas_kernels.decode_mosaic`);
# "pallas-interpret": the Triton kernel in interpret mode (CPU testing).
IMPLEMENTATIONS = ("xla", "pallas", "mosaic", "pallas-interpret")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """Bits of one tensor (keys or values): ``bits`` for every channel, or an outlier split
  (the widest ``outlier_fraction`` of the channels at ``outlier_bits``)."""
  bits: int
  kind: qz.Kind = "mse"
  outlier_fraction: float = 0.0  # share of channels (the largest) quantized at outlier_bits
  outlier_bits: int | None = None
  codebook: str = "lloyd-max"  # or "e4m3" (`tqjax.quantizer.QuantizerConfig.codebook`)

  def quantizer(self, head_dim: int, *, seed: int, rotation: str, norm_correction: bool,
                scale_dtype: str) -> qz.QuantizerConfig:
    outliers = int(round(self.outlier_fraction * head_dim))
    return qz.QuantizerConfig(
        head_dim, self.bits, kind=self.kind, rotation=rotation, seed=seed,
        norm_correction=norm_correction, outlier_channels=outliers,
        outlier_bits=self.outlier_bits if outliers else None, scale_dtype=scale_dtype,
        codebook=self.codebook)


@dataclasses.dataclass(frozen=True)
class CacheConfig:
  """How a layer's cache compresses; validated at construction. Presets below.

  Every preset but ``plain-k4v4`` keeps the first ``sink_tokens`` = 4 tokens exact
  (attention sinks): later layers put most of a query's attention on the first token, so
  noise on that one key moves every attention weight. Measured on SmolLM2-135M, 4K-token
  NIAH prompts, needle at 25%: mean attention KL of the question's queries 0.016 -> 0.0065
  at k4v4 (layers 12-29: ~0.017 -> ~0.002); 4 and 16 sink tokens measured the same. On the
  full NIAH matrix (1K-4K x 5 depths) k4v4 still misses one 4K cell (depth 0%) with sinks at
  window 64 or 128: key noise (8-bit keys with 4-bit values find it), see `k5v3`.
  """
  keys: TensorSpec = TensorSpec(4)
  values: TensorSpec = TensorSpec(4)
  window: int = 64  # newest tokens kept exact
  flush_block: int = 32  # tokens moved from the window into the codes at a time
  sink_tokens: int = 4  # the first tokens (attention sinks) kept exact for good
  key_transform: KeyTransform = "center_scale"
  scale_power: float = 0.5  # s_c = σ_c ** scale_power
  norm_correction: bool = True
  rotation: str = "hadamard"
  scale_dtype: str = "float16"
  seed: int = 0
  # (layer, keys, values) overrides, e.g. more bits for the outlier layer 0.
  layer_overrides: tuple[tuple[int, TensorSpec, TensorSpec], ...] = ()
  name: str = "custom"

  def __post_init__(self):
    if self.window < 1:
      raise ValueError(f"window must be >= 1, got {self.window}")
    if not 1 <= self.flush_block <= self.window:
      raise ValueError(f"flush_block must be in 1..window={self.window}, got {self.flush_block}")
    if self.sink_tokens < 0:
      raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
    if self.key_transform not in KEY_TRANSFORMS:
      raise ValueError(f"key_transform must be one of {KEY_TRANSFORMS}, got {self.key_transform!r}")
    if self.scale_power < 0:
      raise ValueError(f"scale_power must be >= 0, got {self.scale_power}")
    for layer, keys, values in ((None, self.keys, self.values), *self.layer_overrides):
      if values.kind != "mse":
        raise ValueError(f"values are quantized with kind='mse' only, got {values} (layer {layer})")
      for spec in (keys, values):  # builds, and so validates, a quantizer at head_dim 128
        spec.quantizer(128, seed=0, rotation=self.rotation, norm_correction=False,
                       scale_dtype=self.scale_dtype)

  def specs(self, layer: int) -> tuple[TensorSpec, TensorSpec]:
    for index, keys, values in self.layer_overrides:
      if index == layer:
        return keys, values
    return self.keys, self.values

  def quantizers(self, layer: int, head_dim: int) -> tuple[qz.QuantizerConfig, qz.QuantizerConfig]:
    keys, values = self.specs(layer)
    # One rotation for keys and one for values, shared by all layers: the cache's static
    # metadata then matches across layers, so jitted code compiles once for all of them.
    make = lambda spec, salt: spec.quantizer(
        head_dim, seed=2 * self.seed + salt, rotation=self.rotation,
        norm_correction=self.norm_correction, scale_dtype=self.scale_dtype)
    return make(keys, 0), make(values, 1)

  def bits_per_coordinate(self, num_layers: int, head_dim: int, *, tokens: int | None = None,
                          exact_bits: int = 16) -> float:
    """Mean stored bits per K/V coordinate of the compressed region, every overhead counted.

    With ``tokens`` (a context length), the exact sink tokens count too: ``sink_tokens``
    of them at ``exact_bits`` (the cache dtype's width) spread over the ``tokens`` tokens.
    Without it, the rate of long contexts (the sink's share tends to zero)."""
    total = 0.0
    for layer in range(num_layers):
      k, v = self.quantizers(layer, head_dim)
      total += k.bits_per_coordinate + v.bits_per_coordinate
    bits = total / (2 * num_layers)
    if tokens is not None and self.sink_tokens:
      if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
      bits += self.sink_tokens * exact_bits / tokens
    return bits

  # Named presets.
  @classmethod
  def k4v4(cls, **kw) -> CacheConfig:
    """4 bits on keys and values, 4 exact sink tokens; with a float16 norm per vector
    4 + 16 / head_dim bits per coordinate (4.25 at head_dim 64, 4.125 at 128)."""
    return cls(TensorSpec(4), TensorSpec(4), name="k4v4", **kw)

  @classmethod
  def k4v4_e4m3(cls, **kw) -> CacheConfig:
    """k4v4 with codebooks on the float8 e4m3 grid times one scale
    (`tqjax.codebook.get_codebook(..., grid="e4m3")`): the same bytes, distortion +0.91%
    at head_dim 128 and +1.25% at 64 against Lloyd–Max (0.009399 vs 0.009315 at 128), made
    so that a kernel could look codes up into float8 for the tensor cores; the Mosaic
    kernel's float8 key lookup timed no faster than its float16 one and was removed
    (`pallas_kernels.decode_mosaic`), so no kernel gains from it now and k4v4 is the
    better choice. Every implementation takes it (its codebooks are symmetric like
    Lloyd–Max's). Measured with k4v4 in one run (`tqjax niah
    --presets baseline,k4v4,k4v4-e4m3`, SmolLM2-135M, 1K/2K/4K x 5 depths, window 128):
    both 14/15, the same miss (4K, depth 0%), min margins -0.94 (e4m3) and -1.34, median
    margin vs the baseline -0.06 and -0.10."""
    spec = TensorSpec(4, codebook="e4m3")
    return cls(spec, spec, name="k4v4-e4m3", **kw)

  @classmethod
  def k5v3(cls, **kw) -> CacheConfig:
    """4 bits on average, spent where softmax needs them: keys at 5, values at 3 (the
    bytes of k4v4). Measured, `tqjax niah --presets baseline,k4v4,k5v3,k4v2 --window 128`
    (SmolLM2-135M, 1K/2K/4K tokens x depths 0-100%, seed 0): k5v3 15/15 = baseline,
    k4v4 14/15 (miss: 4K depth 0%); with --seed 1 at 4K (5 depths) baseline 4/5, and
    k5v3, k4v4 and k4v2 each agree with it in 5 of 5. Not a guarantee: on 6 4K prompts
    (depths 0/25/50%, trials 0-1) x 4 rotation seeds, window 64, k5v3 disagreed with the
    exact baseline in 3 of 24 cells, k4v4 in 6."""
    return cls(TensorSpec(5), TensorSpec(3), name="k5v3", **kw)

  @classmethod
  def k4v2(cls, **kw) -> CacheConfig:
    """3 bits on average (the bytes of k3v3: 3.25 with the norms at head_dim 64): keys
    at 4, values at 2, 4 exact sink tokens. Measured on SmolLM2-135M, 1K/2K/4K tokens x
    depths 0-100%, seed 0 (`tqjax niah --presets baseline,k4v4,k5v3,k4v2 --window 128`):
    13/15, baseline 15/15 (misses: 4K depths 0% and 25%, where the exact margins are
    +1.75 and +0.61 logits); at window 64 (session 2) also 13/15, the same misses. On
    the 6 4K prompts x 4 rotation seeds of k5v3's note k4v2 disagreed with the exact
    baseline in 7 of 24 cells, k3v3 in 7. The 4K misses are key noise (depth 0%) and value
    noise (25%); `k3p5v2p5` spends the same code bits by channel and keeps both."""
    return cls(TensorSpec(4), TensorSpec(2), name="k4v2", **kw)

  @classmethod
  def k3v3(cls, **kw) -> CacheConfig:
    """3 bits on keys and values, 4 exact sink tokens (see k4v2 for the same size)."""
    return cls(TensorSpec(3), TensorSpec(3), name="k3v3", **kw)

  @classmethod
  def k2v2(cls, **kw) -> CacheConfig:
    return cls(TensorSpec(2), TensorSpec(2), name="k2v2", **kw)

  @classmethod
  def k3p5v3p5(cls, **kw) -> CacheConfig:
    """3.5 bits: the half of the channels with the largest spread at 4 bits, the rest at 3."""
    spec = TensorSpec(3, outlier_fraction=0.5, outlier_bits=4)
    return cls(spec, spec, name="k3.5v3.5", **kw)

  @classmethod
  def k3p5v2p5(cls, **kw) -> CacheConfig:
    """3 code bits on average, split by channel: keys 3.5 (the half of the channels with the
    largest spread at 4 bits, the rest at 3), values 2.5 (half at 3, half at 2). Each half
    has its own float16 norm, so with the norms 3.5 bits per coordinate at head_dim 64 and
    3.25 at 128 (k4v2: 3.25 / 3.125). Measured on SmolLM2-135M, 4K-token prompts x depths
    0-100% x 4 trials, window 128 (`tqjax niah --presets
    baseline,k5v3,k4v4,k4v2,k3v3,k3.5v2.5 --lengths 4K --trials 4`): 17/20, the baseline's
    very cells, where k4v2 answers 16 (losing two, gaining one), k3v3 13, k4v4 15 and k5v3
    16. Its segments (halves of 2, 3 and 4 bits) all take the fused kernel's byte-permute
    lookup (`pallas_kernels.decode.lut_eligible`); not yet timed on the GPU."""
    return cls(TensorSpec(3, outlier_fraction=0.5, outlier_bits=4),
               TensorSpec(2, outlier_fraction=0.5, outlier_bits=3), name="k3.5v2.5", **kw)

  @classmethod
  def k2p5v2p5(cls, **kw) -> CacheConfig:
    spec = TensorSpec(2, outlier_fraction=0.5, outlier_bits=3)
    return cls(spec, spec, name="k2.5v2.5", **kw)

  @classmethod
  def k4v4_prod(cls, **kw) -> CacheConfig:
    """Keys by TurboQuant_prod (3-bit mse + 1-bit QJL), values 4-bit mse."""
    return cls(TensorSpec(4, kind="prod"), TensorSpec(4), name="k4v4-prod", **kw)

  @classmethod
  def k8v8(cls, **kw) -> CacheConfig:
    return cls(TensorSpec(8), TensorSpec(8), name="k8v8", **kw)

  @classmethod
  def plain_k4v4(cls, **kw) -> CacheConfig:
    """The paper's TurboQuant with no key transforms and no sink tokens (for comparison)."""
    kw = {"sink_tokens": 0, **kw}
    return cls(TensorSpec(4), TensorSpec(4), key_transform="none", norm_correction=False,
               name="plain-k4v4", **kw)


PRESETS = {
    "k4v4": CacheConfig.k4v4, "k4v4-e4m3": CacheConfig.k4v4_e4m3,
    "k5v3": CacheConfig.k5v3, "k4v2": CacheConfig.k4v2,
    "k3v3": CacheConfig.k3v3, "k2v2": CacheConfig.k2v2,
    "k3.5v3.5": CacheConfig.k3p5v3p5, "k3.5v2.5": CacheConfig.k3p5v2p5,
    "k2.5v2.5": CacheConfig.k2p5v2p5,
    "k4v4-prod": CacheConfig.k4v4_prod, "k8v8": CacheConfig.k8v8,
    "plain-k4v4": CacheConfig.plain_k4v4,
}


def preset(name: str, **overrides) -> CacheConfig:
  """A named preset, e.g. ``preset("k4v4", window=128)``."""
  if name not in PRESETS:
    raise ValueError(f"unknown cache preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name](**overrides)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KeyTransformState:
  """k' = ((k − mean) / scale)[..., order], q' = (q ∘ scale)[..., order], per KV head."""
  mean: jax.Array  # [K, D] float32
  scale: jax.Array  # [K, D] float32
  order: jax.Array  # [K, D] int32, a permutation of the channels

  @classmethod
  def identity(cls, num_kv_heads: int, head_dim: int) -> KeyTransformState:
    return cls(jnp.zeros((num_kv_heads, head_dim)), jnp.ones((num_kv_heads, head_dim)),
               jnp.tile(jnp.arange(head_dim, dtype=jnp.int32), (num_kv_heads, 1)))

  @classmethod
  def estimate(cls, k, valid, config: CacheConfig, query_rms=None) -> KeyTransformState:
    """From prefill keys k [B, K, S, D], their validity [B, S] and, when known, the
    root-mean-square query channel per KV head [K, D].

    With the scaled keys' quantization error spread evenly over channels, the score error
    Σ_c (q_c s_c)² · Σ_c σ_c² / s_c² is smallest for s_c² ∝ σ_c / rms(q_c); without query
    statistics, queries are taken as isotropic.
    """
    w = valid[:, None, :, None].astype(jnp.float32)  # [B, 1, S, 1]
    count = jnp.maximum(jnp.sum(w, axis=(0, 2)), 1.0)  # [1, 1]
    k = k.astype(jnp.float32)
    mean = jnp.sum(k * w, axis=(0, 2)) / count  # [K, D]
    if config.key_transform == "none":
      mean = jnp.zeros_like(mean)
    spread = jnp.sqrt(jnp.sum(((k - mean[None, :, None]) ** 2) * w, axis=(0, 2)) / count)
    spread = jnp.maximum(spread, 1e-6 * jnp.max(spread, axis=-1, keepdims=True) + 1e-30)
    if config.key_transform == "center_scale":
      ratio = spread if query_rms is None else spread / jnp.maximum(query_rms, 1e-30)
      scale = ratio ** config.scale_power
      scale = scale / jnp.exp(jnp.mean(jnp.log(scale), axis=-1, keepdims=True))
    else:
      scale = jnp.ones_like(spread)
    order = jnp.argsort(-spread / scale, axis=-1).astype(jnp.int32)  # widest channels first
    return cls(mean, scale, order)

  def keys(self, k):  # k [B, T, K, D] -> [B, T, K, D] float32
    k = (k.astype(jnp.float32) - self.mean) / self.scale
    return jnp.take_along_axis(k, jnp.broadcast_to(self.order, k.shape), axis=-1)

  def queries(self, q):  # q [B, T, K, G, D] -> [B, T, K, G, D] float32
    q = q.astype(jnp.float32) * self.scale[:, None, :]
    return jnp.take_along_axis(q, jnp.broadcast_to(self.order[:, None, :], q.shape), axis=-1)


def _value_order(v, valid):
  """Channel order of the values: widest first (for an outlier split), per KV head."""
  w = valid[:, None, :, None].astype(jnp.float32)
  spread = jnp.sum(v.astype(jnp.float32) ** 2 * w, axis=(0, 2))  # [K, D]
  return jnp.argsort(-spread, axis=-1).astype(jnp.int32)


def _permute(x, order):  # x [..., K, D], order [K, D]
  return jnp.take_along_axis(x, jnp.broadcast_to(order, x.shape), axis=-1)


def _folded_maps(key_quantizer: qz.Quantizer, value_quantizer: qz.Quantizer,
                 transform: KeyTransformState, value_order):
  """Per KV head k, the maps of `TurboQuantCache.query_maps` and ``value_maps``.

  A query's transformed channel c is q[order_k[c]] · scale_k[order_k[c]], so column
  order_k[c] of A_i P_k diag(scale_k) is column c of A_i times scale_k[order_k[c]]. The
  keys' mean has no query term, as in `KeyTransformState.queries` (every stored key is
  centred, so a query's scores all move by one constant).
  A value's channel c is its permuted channel j with order_k[j] = c: column order_k[j]
  of the value map is column j of A_j. Both move columns by the inverse permutation.
  """
  def fold(amap, order, scale=None):  # amap [d, D], order [K, D] -> [K, d, D]
    folded = jnp.swapaxes(amap[:, jnp.argsort(order, axis=-1)], 0, 1)
    return folded if scale is None else folded * scale[:, None, :]

  query_maps = tuple(fold(a, transform.order, transform.scale.astype(jnp.float32))
                     for a in key_quantizer.maps)
  value_maps = tuple(fold(a, value_order) for a in value_quantizer.maps)
  return query_maps, value_maps


def _unpermute(x, order):  # inverse of _permute: x[..., j] goes to channel order[j]
  # A scatter, not a gather by argsort(order): a sort is one more GPU program per layer
  # and step (~3 us each on the H200).
  return jnp.put_along_axis(jnp.zeros_like(x), jnp.broadcast_to(order, x.shape), x, axis=-1,
                            inplace=False)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TurboQuantCache:
  """Compressed per-layer KV cache; same protocol as `DenseCache` (update / attend)."""
  key_quantizer: qz.Quantizer
  value_quantizer: qz.Quantizer
  transform: KeyTransformState
  value_order: jax.Array  # [K, D] int32
  # The Pallas path's query and output maps, per KV head, with the key transform and the
  # value order folded in (`_folded_maps`): one einsum per segment on each side of the
  # kernel, no scatter or transposes (at batch 1 every small GPU program costs a few us).
  # Made by `init` (another transform or value order needs a new cache), never written.
  query_maps: tuple[jax.Array, ...]  # per key segment [K, d_i, D] float32: q -> A_i q'
  value_maps: tuple[jax.Array, ...]  # per value segment [K, d_j, D] float32: -> value channels
  k_codes: tuple[jax.Array, ...]  # per key segment [B, K, S_cap, P_i] uint8
  k_scales: tuple[jax.Array, ...]  # per key segment [B, K, S_cap]
  v_codes: tuple[jax.Array, ...]  # per value segment [B, K, S_cap, P_i] uint8
  v_scales: tuple[jax.Array, ...]  # per value segment [B, K, S_cap]
  window_k: jax.Array  # [B, K, W + F, D] transformed keys
  window_v: jax.Array  # [B, K, W + F, D] values
  sink_k: jax.Array  # [B, K, N, D] transformed keys of positions 0 .. N-1 (N = sink tokens)
  sink_v: jax.Array  # [B, K, N, D] values; sink slot p is valid once p < compressed
  lengths: jax.Array  # [B] int32: all tokens
  compressed: jax.Array  # [B] int32: tokens in the compressed region (positions 0 .. compressed-1)
  window: int = dataclasses.field(metadata=dict(static=True))
  flush_block: int = dataclasses.field(metadata=dict(static=True))
  implementation: str = dataclasses.field(default="xla", metadata=dict(static=True))
  # False: `update` never flushes (no branch in the compiled step); whoever appends must
  # make room first (`make_room`, as `FlushSchedule` does), else the window overflows.
  auto_flush: bool = dataclasses.field(default=True, metadata=dict(static=True))
  # Set on a layer of a `StackedCache`: the codes, scales and windows hold every layer
  # ([L, B, K, ...]) and this cache is layer `region_layer` of them (read and written in
  # place: a slice taken of them would be a copy on every step).
  region_layer: int | None = dataclasses.field(default=None, metadata=dict(static=True))

  # Construction.

  @classmethod
  def init(cls, config: CacheConfig, *, layer: int, batch: int, num_kv_heads: int, head_dim: int,
           capacity: int, dtype=jnp.bfloat16, transform: KeyTransformState | None = None,
           value_order=None, implementation: str = "xla") -> TurboQuantCache:
    """An empty cache for ``capacity`` tokens (identity key transform unless given)."""
    for name, value in (("batch", batch), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim), ("capacity", capacity)):
      if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    kcfg, vcfg = config.quantizers(layer, head_dim)
    lead = (batch, num_kv_heads, capacity)

    def region(qcfg):
      codes = tuple(jnp.zeros(lead + (qz.packing.packed_size(s.dim, s.bits),), jnp.uint8)
                    for s in qcfg.segments)
      scales = tuple(jnp.zeros(lead, qcfg.scale_dtype) for _ in qcfg.segments)
      return codes, scales

    k_codes, k_scales = region(kcfg)
    v_codes, v_scales = region(vcfg)
    window_shape = (batch, num_kv_heads, max(config.window + config.flush_block, 1), head_dim)
    sink_shape = (batch, num_kv_heads, config.sink_tokens, head_dim)
    if transform is None:
      transform = KeyTransformState.identity(num_kv_heads, head_dim)
    if value_order is None:
      value_order = KeyTransformState.identity(num_kv_heads, head_dim).order
    key_quantizer, value_quantizer = qz.Quantizer.create(kcfg), qz.Quantizer.create(vcfg)
    query_maps, value_maps = _folded_maps(key_quantizer, value_quantizer, transform, value_order)
    return cls(key_quantizer, value_quantizer, transform, value_order, query_maps, value_maps,
               k_codes, k_scales, v_codes, v_scales,
               jnp.zeros(window_shape, dtype), jnp.zeros(window_shape, dtype),
               jnp.zeros(sink_shape, dtype), jnp.zeros(sink_shape, dtype),
               jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32),
               window=config.window, flush_block=config.flush_block,
               implementation=implementation)

  @classmethod
  def from_dense(cls, dense: DenseCache, config: CacheConfig, *, layer: int,
                 capacity: int | None = None, query_rms=None,
                 implementation: str = "xla") -> TurboQuantCache:
    """Compresses a filled exact cache (the prefill): estimates and freezes the key
    transforms from its keys and the queries' RMS per channel [K, D] (``query_rms``, by
    default the one the dense cache gathered during the prefill), encodes all but the newest ``window`` tokens of each row and
    keeps those exact. ``capacity`` defaults to the dense cache's."""
    b, kh, s, d = dense.k.shape
    capacity = s if capacity is None else capacity
    if capacity < s:
      raise ValueError(f"capacity={capacity} must be >= the dense cache's capacity {s}")
    valid = jnp.arange(s)[None, :] < dense.lengths[:, None]  # [B, S]
    if query_rms is None:
      query_rms = dense.query_rms()
    transform = KeyTransformState.estimate(dense.k, valid, config, query_rms)
    value_order = _value_order(dense.v, valid)
    cache = cls.init(config, layer=layer, batch=b, num_kv_heads=kh, head_dim=d, capacity=capacity,
                     dtype=dense.k.dtype, transform=transform, value_order=value_order,
                     implementation=implementation)
    return cache._load(jnp.swapaxes(dense.k, 1, 2), jnp.swapaxes(dense.v, 1, 2), dense.lengths)

  def shardings(self, mesh: jax.sharding.Mesh, *, data_axis: str = "data",
                model_axis: str = "model") -> TurboQuantCache:
    """The cache's `NamedSharding`s (a TurboQuantCache of them): the quantizers' tables
    replicated, the key transforms, value order [K, D] and folded maps [K, d, D] over
    model_axis, lengths and compressed [B] over data_axis, every other array (codes,
    scales, exact buffers: [B, K, ...]) over (data_axis, model_axis). Works on a concrete
    or an abstract (`jax.eval_shape`) cache."""
    from tqjax import sharding as sharding_lib

    if self.region_layer is not None:
      raise NotImplementedError(
        f"layer {self.region_layer} of a StackedCache cannot be laid out over a mesh: "
        f"tqjax.sharding takes per-layer caches (StackedCache.unstack())")
    b, kh = self.window_k.shape[:2]
    s = sharding_lib.cache_shardings(mesh, batch=b, num_kv_heads=kh, data_axis=data_axis,
                                     model_axis=model_axis)
    small = dict(key_quantizer=s.replicated, value_quantizer=s.replicated, transform=s.heads,
                 value_order=s.heads, query_maps=s.heads, value_maps=s.heads, lengths=s.batch,
                 compressed=s.batch)

    def like(name, tree):
      sharding = small.get(name, s.batch_heads)
      return jax.tree.map(lambda _: sharding, tree)

    return dataclasses.replace(self, **{f.name: like(f.name, getattr(self, f.name))
                                        for f in dataclasses.fields(self)
                                        if not f.metadata.get("static")})

  def _load(self, k, v, lengths) -> TurboQuantCache:
    """Fills an empty cache with k, v [B, S, K, D] of which the first lengths[b] are valid."""
    s = k.shape[1]
    keep = jnp.minimum(lengths, self.window)  # exact tokens per row
    compressed = lengths - keep
    k_codes, k_scales = _encode_region(self.key_quantizer, self.transform.keys(k))
    v_codes, v_scales = _encode_region(self.value_quantizer, _permute(v.astype(jnp.float32), self.value_order))
    pad = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, self.capacity - s)] + [(0, 0)] * (x.ndim - 3))
    # Window: positions compressed .. lengths-1 go to window slots 0 .. keep-1.
    idx = compressed[:, None] + jnp.arange(self.window_k.shape[2])[None, :]  # [B, W+F]
    take = lambda x: jnp.take_along_axis(x, jnp.clip(idx, 0, s - 1)[:, :, None, None], axis=1)
    window_k = jnp.swapaxes(take(self.transform.keys(k)), 1, 2).astype(self.window_k.dtype)
    window_v = jnp.swapaxes(take(v), 1, 2).astype(self.window_v.dtype)
    # Sink: positions 0 .. N-1 (those not yet compressed stay in the window and are masked).
    n = self.sink_tokens
    head = lambda x: jnp.swapaxes(jnp.pad(x[:, :n], [(0, 0), (0, max(n - s, 0)), (0, 0), (0, 0)]), 1, 2)
    sink_k = head(self.transform.keys(k)).astype(self.sink_k.dtype)
    sink_v = head(v).astype(self.sink_v.dtype)
    return dataclasses.replace(
        self, k_codes=tuple(map(pad, k_codes)), k_scales=tuple(map(pad, k_scales)),
        v_codes=tuple(map(pad, v_codes)), v_scales=tuple(map(pad, v_scales)),
        window_k=window_k, window_v=window_v, sink_k=sink_k, sink_v=sink_v,
        lengths=jnp.array(lengths, jnp.int32),  # a copy: donating one cache must not free the other's
        compressed=compressed.astype(jnp.int32))

  # Shapes and accounting.

  @property
  def capacity(self) -> int:
    return self.k_scales[0].shape[-1]

  @property
  def window_room(self) -> int:
    """Slots of the exact window (W + F)."""
    return self.window_k.shape[-2]

  def _region(self, arrays) -> tuple[jax.Array, ...]:
    """This layer's codes, scales or windows [B, K, ...] (a slice when stacked)."""
    if self.region_layer is None:
      return tuple(arrays)
    return tuple(a[self.region_layer] for a in arrays)

  @property
  def _windows(self) -> tuple[jax.Array, jax.Array]:
    """This layer's exact window keys and values [B, K, W + F, D]."""
    return self._region((self.window_k, self.window_v))

  def _with_windows(self, window_k, window_v) -> dict[str, jax.Array]:
    """Fields that set this layer's windows to [B, K, W + F, D] arrays."""
    if self.region_layer is not None:
      window_k, window_v = (full.at[self.region_layer].set(new) for full, new in (
        (self.window_k, window_k), (self.window_v, window_v)))
    return dict(window_k=window_k, window_v=window_v)

  @property
  def head_dim(self) -> int:
    return self.window_k.shape[-1]

  @property
  def num_kv_heads(self) -> int:
    return self.window_k.shape[-3]

  @property
  def sink_tokens(self) -> int:
    return self.sink_k.shape[2]

  def memory_bytes(self) -> int:
    """Bytes held by the cache's arrays (allocated capacity, window and transforms); for a
    layer of a `StackedCache`, this layer's share of the stacked codes, scales and windows."""
    stacked = () if self.region_layer is None else _IN_PLACE
    total = 0
    for f in dataclasses.fields(self):
      if f.metadata.get("static"):
        continue
      for x in jax.tree.leaves(getattr(self, f.name)):
        if hasattr(x, "nbytes"):
          total += x.nbytes // x.shape[0] if f.name in stacked else x.nbytes
    return int(total)

  def bits_per_coordinate(self) -> float:
    """Stored bits per K/V coordinate of the compressed region (codes and scales), the
    exact sink buffer spread over the capacity."""
    kc, vc = self.key_quantizer.config, self.value_quantizer.config
    sink = self.sink_tokens * 8 * self.sink_k.dtype.itemsize / self.capacity
    return (kc.bits_per_coordinate + vc.bits_per_coordinate) / 2 + sink

  def dequantize(self):
    """(keys, values) [B, K, S_cap, D] float32 in position order: decoded codes below
    ``compressed`` (the exact sink tokens below ``min(sink_tokens, compressed)``), the exact
    window from there to ``lengths``. Keys stay in the
    transformed basis (score them with ``transform.queries(q)``); values are in their own."""
    k = qz.decode(self.key_quantizer, qz.Encoded(self._region(self.k_codes),
                                                 self._region(self.k_scales)))  # [B, K, S, D]
    v = qz.decode(self.value_quantizer, qz.Encoded(self._region(self.v_codes),
                                                   self._region(self.v_scales)))
    v = jnp.swapaxes(_unpermute(jnp.swapaxes(v, 1, 2), self.value_order), 1, 2)  # [B, K, S, D]
    at = self.compressed[:, None] + jnp.arange(self.window_room)  # [B, W+F]
    at = jnp.where(at < self.lengths[:, None], at, self.capacity)  # drop the empty slots
    put = jax.vmap(lambda buf, new, i: buf.at[:, i].set(new, mode="drop"))
    sink_at = jnp.arange(self.sink_tokens)[None, :]  # [1, N]
    sink_at = jnp.where(sink_at < self.compressed[:, None], sink_at, self.capacity)  # [B, N]
    k = put(k, self.sink_k.astype(jnp.float32), sink_at)
    v = put(v, self.sink_v.astype(jnp.float32), sink_at)
    window_k, window_v = self._windows
    return (put(k, window_k.astype(jnp.float32), at),
            put(v, window_v.astype(jnp.float32), at))

  # The protocol.

  def update(self, k, v, q=None) -> TurboQuantCache:
    """Appends k, v [B, T, K, D] (keys after RoPE), flushing the window as it fills.
    (``q`` is accepted for the protocol; the key transforms are frozen.)"""
    b, kh, _, d = self.window_k.shape[-4:]
    if k.shape != v.shape or k.ndim != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (b, kh, d):
      raise ValueError(f"expected k, v [B={b}, T, K={kh}, D={d}], got {k.shape=}, {v.shape=}")
    cache = self
    k = self.transform.keys(k)  # [B, T, K, D] float32
    step = max(self.flush_block, 1)
    for start in range(0, k.shape[1], step):  # static chunks of at most F tokens
      cache = cache._append(k[:, start:start + step], v[:, start:start + step])
    return cache

  def make_room(self, t: int) -> TurboQuantCache:
    """Flushes F tokens of every row whose window cannot take ``t`` more (no branch: rows
    that have room write nowhere); what `update` does on its own when ``auto_flush``."""
    return self._flush(self.lengths - self.compressed + t > self.window_room)

  def _append(self, k, v) -> TurboQuantCache:
    t = k.shape[1]
    held = self.lengths - self.compressed  # tokens in the window
    room = self.window_room
    cache = self
    if self.auto_flush:
      # A data-dependent branch: on a GPU the host reads the predicate and the stream
      # drains (~0.25 ms per layer measured on the H200); decode loops avoid it with
      # `FlushSchedule`.
      cache = jax.lax.cond(jnp.any(held + t > room), lambda c: c._flush(held + t > room),
                           lambda c: c, self)
    held = cache.lengths - cache.compressed
    if self.region_layer is None:  # row b's tokens at window slot held[b]
      write = jax.vmap(lambda buf, new, at: jax.lax.dynamic_update_slice(buf, new, (0, at, 0)))
    else:  # the same, into this layer of the stacked windows [L, B, K, W + F, D]
      layer = self.region_layer
      write = jax.vmap(lambda buf, new, at: jax.lax.dynamic_update_slice(
        buf, new[None], (layer, 0, at, 0)), in_axes=(1, 0, 0), out_axes=1)
    window_k = write(cache.window_k, jnp.swapaxes(k, 1, 2).astype(cache.window_k.dtype), held)
    window_v = write(cache.window_v, jnp.swapaxes(v, 1, 2).astype(cache.window_v.dtype), held)
    return dataclasses.replace(cache, window_k=window_k, window_v=window_v,
                               lengths=cache.lengths + jnp.int32(t))

  def _flush(self, rows) -> TurboQuantCache:
    """Moves the oldest F window tokens of the given rows [B] bool into the codes."""
    f = self.flush_block
    window_k, window_v = self._windows
    block_k = jnp.swapaxes(window_k[:, :, :f], 1, 2)  # [B, F, K, D] transformed keys
    block_v = _permute(jnp.swapaxes(window_v[:, :, :f], 1, 2).astype(jnp.float32), self.value_order)
    k_codes, k_scales = _encode_region(self.key_quantizer, block_k)
    v_codes, v_scales = _encode_region(self.value_quantizer, block_v)
    # Rows that do not flush write nowhere: their target index is out of bounds.
    at = jnp.where(rows, self.compressed, self.capacity)[:, None] + jnp.arange(f)  # [B, F]
    if self.region_layer is None:
      put = lambda buf, new: jax.vmap(lambda b_, n_, i_: b_.at[:, i_].set(n_, mode="drop"))(
          buf, new, at)
    else:  # straight into this layer of the stacked codes and scales [L, B, K, S_cap, ...]
      layer = self.region_layer
      put = lambda buf, new: jax.vmap(
          # (an int and an array index apart: numpy puts the indexed axis F first)
          lambda b_, n_, i_: b_.at[layer, :, i_].set(jnp.moveaxis(n_, 1, 0), mode="drop"),
          in_axes=(1, 0, 0), out_axes=1)(buf, new, at)
    shifted = lambda w: jnp.where(rows[:, None, None, None], jnp.roll(w, -f, axis=2), w)
    # Flushed positions below the sink size are kept exact in the sink as well.
    sink_at = jnp.where(at < self.sink_tokens, at, self.sink_tokens)  # [B, F]; N: dropped
    sink_put = lambda buf, new: jax.vmap(lambda b_, n_, i_: b_.at[:, i_].set(n_, mode="drop"))(
        buf, new.astype(buf.dtype), sink_at)
    return dataclasses.replace(
        self,
        k_codes=tuple(map(put, self.k_codes, k_codes)), k_scales=tuple(map(put, self.k_scales, k_scales)),
        v_codes=tuple(map(put, self.v_codes, v_codes)), v_scales=tuple(map(put, self.v_scales, v_scales)),
        **self._with_windows(shifted(window_k), shifted(window_v)),
        sink_k=sink_put(self.sink_k, window_k[:, :, :f]),
        sink_v=sink_put(self.sink_v, window_v[:, :, :f]),
        compressed=self.compressed + jnp.where(rows, f, 0).astype(jnp.int32))

  def attend(self, q, *, scale: float, sliding_window: int | None = None):
    """Attention of q [B, T, H, D], the T tokens just appended, over every stored token."""
    b, kh, room, d = self.window_k.shape[-4:]
    if q.ndim != 4 or q.shape[0] != b or q.shape[3] != d or q.shape[2] % kh:
      raise ValueError(f"expected q [B={b}, T, H (multiple of K={kh}), D={d}], got {q.shape=}")
    t, h = q.shape[1], q.shape[2]
    q_pos = self.lengths[:, None] - t + jnp.arange(t, dtype=jnp.int32)  # [B, T]
    qg = self.transform.queries(q.reshape(b, t, kh, h // kh, d))  # [B, T, K, G, D]
    # The compressed region: slot j is position j (the sink's slots j < N are read exactly below).
    n = self.sink_tokens
    slots = jnp.arange(self.capacity, dtype=jnp.int32)
    valid = (slots[None, :] < self.compressed[:, None]) & (slots[None, :] >= n)
    if self.implementation != "xla":
      if t > self.window:
        raise ValueError(f"implementation={self.implementation!r} reads chunks of at most window={self.window} "
                         f"query tokens (newer tokens must all be exact), got T={t}")
      if sliding_window is not None and sliding_window < self.capacity:
        raise ValueError(f"implementation={self.implementation!r} has no sliding-window mask, got "
                         f"{sliding_window=} below capacity={self.capacity}")
      compressed = self._compressed_partial_pallas(q.reshape(b, t, kh, h // kh, d), scale)
    else:
      mask = dense_cache.attention_mask(q_pos, slots, valid, sliding_window)  # [B, T, S]
      compressed = self._compressed_partial(qg, mask, scale)
    # The exact tokens in one partial: the window (slot i is position compressed + i) and,
    # before it, the sink (slot p is position p, valid once it left the window). One
    # partial instead of two: on a GPU at batch 1 every small program of a layer costs
    # a few microseconds whatever its size.
    w_pos = self.compressed[:, None] + jnp.arange(room, dtype=jnp.int32)  # [B, W+F]
    w_valid = w_pos < self.lengths[:, None]
    exact_k, exact_v = self._windows
    if n:
      s_pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
      w_valid = jnp.concatenate([s_pos < self.compressed[:, None], w_valid], axis=1)
      w_pos = jnp.concatenate([s_pos, w_pos], axis=1)
      exact_k = jnp.concatenate([self.sink_k.astype(exact_k.dtype), exact_k], axis=2)
      exact_v = jnp.concatenate([self.sink_v.astype(exact_v.dtype), exact_v], axis=2)
    exact = dense_cache.dense_attention_partial(
        qg.reshape(b, t, h, d), exact_k, exact_v, q_pos, w_pos, w_valid, scale, sliding_window)
    return dense_cache.combine_partials([compressed, exact], q.dtype)

  def _compressed_partial(self, qg, mask, scale):
    """(acc [B, T, H, D] in the original value basis, row max, row sum) over the codes."""
    b, t, kh, g, d = qg.shape
    kq, vq = self.key_quantizer, self.value_quantizer
    logits = 0.0
    k_values = _region_values(kq, self._region(self.k_codes), self._region(self.k_scales))
    for qp, seg_vals in zip(qz.project_query(kq, qg), k_values):
      logits = logits + jnp.einsum("btkgi,bksi->btkgs", qp, seg_vals)
    logits = jnp.where(mask[:, :, None, None, :], logits * jnp.float32(scale), -jnp.inf)
    row_max = jnp.max(logits, axis=-1)
    safe_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(logits - safe_max[..., None])  # masked entries are exp(-inf) = 0
    acc = 0.0
    v_values = _region_values(vq, self._region(self.v_codes), self._region(self.v_scales))
    for amap, seg_vals in zip(vq.maps, v_values):
      acc = acc + jnp.einsum("btkgs,bksi->btkgi", p, seg_vals) @ amap  # rotate back once
    acc = _unpermute(acc, self.value_order[:, None, :])
    return acc.reshape(b, t, kh * g, d), row_max.reshape(b, t, -1), jnp.sum(p, -1).reshape(b, t, -1)


  def _compressed_partial_pallas(self, q, scale):
    """`_compressed_partial` by the fused Pallas decode kernel (every valid compressed
    token is older than every query: the window holds the chunk); slots below the sink
    size are skipped (``start``). Takes the queries q [B, T, K, G, D] untransformed: the
    folded maps move them into each key segment's basis, and the kernel's output back into
    the values' channels, by one einsum per segment each (straight into the layouts the
    kernel takes and gives)."""
    from pallas_kernels import decode as decode_kernel

    b, t, kh, g, d = q.shape
    kq, vq = self.key_quantizer, self.value_quantizer
    # The scale after the dot, where XLA can fold it into the GEMM (its alpha).
    q = q.astype(jnp.float32)
    qk = [(jnp.einsum("btkgD,kiD->bktgi", q, m) * jnp.float32(scale)).reshape(b, kh, t * g, -1)
          for m in self.query_maps]  # [B, K, T*G, d_i]
    as32 = lambda cs: [np.asarray(c, np.float32) for c in cs]  # concrete: baked into the kernel
    part = decode_kernel.decode(
        qk, self.k_codes, self.k_scales, as32(qz.segment_centroids(kq.config)),
        self.v_codes, self.v_scales, as32(qz.segment_centroids(vq.config)), self.compressed,
        implementation="mosaic" if self.implementation == "mosaic" else "pallas",
        interpret=self.implementation == "pallas-interpret",
        start=self.sink_tokens, layer=self.region_layer)
    acc = sum(jnp.einsum("bktgj,kjD->btkgD", a.reshape(b, kh, t, g, -1), m)
              for a, m in zip(part.acc, self.value_maps))  # [B, T, K, G, D] original channels
    return acc.reshape(b, t, kh * g, d), _from_rows(part.m, t), _from_rows(part.l, t)

# The arrays a layer of a `StackedCache` reads and writes in the stack itself.
_IN_PLACE = ("k_codes", "k_scales", "v_codes", "v_scales", "window_k", "window_v")
# What a layer's `update` may write (the rest is frozen after `from_dense`).
_WRITTEN = ("sink_k", "sink_v", "lengths", "compressed") + _IN_PLACE


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedCache:
  """The compressed caches of every layer of a model as one set of arrays.

  ``layers`` is a `TurboQuantCache` whose every array has a leading layer axis [L, ...].
  A jitted decode step pays host time for each array it takes: a tuple of L per-layer
  caches passes ~20 arrays per layer (codes, scales, windows, sinks, transforms, folded
  maps, tables: 22 for k4v4), this one the same ~20 for the whole model. Measured on the
  H200 at Qwen2.5-7B shapes (28 layers, batch 1, 32K tokens, `bench/e2e.py`, with ~17
  arrays per layer then): the synced k4v4 step took 11.1 ms over
  per-layer caches and 8.4 ms stacked (bf16 8.5 ms; pipelined, where the host's work hides
  behind the device's, 6.1 and 6.4 ms).

  It is used like a tuple of caches (`tqjax.models.Decoder` takes either):
  ``stacked[i]`` is layer i, a `TurboQuantCache` whose small arrays are slices and whose
  codes, scales and windows are the whole stacked arrays with ``region_layer = i`` (the
  fused kernel indexes the layer in place and the new tokens are written into the stacked
  windows: nothing big is copied), and ``stacked.set(i, layer)`` writes back what the
  layer changed. Build one with
  `StackedCache.stack` (or ``convert_caches(..., stack=True)``), get the tuple back with
  `unstack`. All layers need the same shapes and static configuration.
  """
  layers: TurboQuantCache

  @classmethod
  def stack(cls, caches) -> StackedCache:
    """Stacks per-layer `TurboQuantCache`s (a copy of every array)."""
    caches = tuple(caches)
    if not caches or not all(isinstance(c, TurboQuantCache) and c.region_layer is None
                             for c in caches):
      raise TypeError(f"StackedCache.stack takes a non-empty sequence of (unstacked) "
                      f"TurboQuantCache, got {[type(c).__name__ for c in caches]}")
    first = jax.tree.structure(caches[0])
    for i, c in enumerate(caches):
      if jax.tree.structure(c) != first:
        raise ValueError(f"caches[{i}] differs from caches[0] in its static configuration "
                         f"(quantizers, window, implementation): layers stack only when "
                         f"equal ({jax.tree.structure(c)} vs {first})")
      shapes = [(x.shape, x.dtype) for x in jax.tree.leaves(c)]
      want = [(x.shape, x.dtype) for x in jax.tree.leaves(caches[0])]
      if shapes != want:
        raise ValueError(f"caches[{i}] differs from caches[0] in its array shapes: "
                         f"{shapes} vs {want}")
    return cls(jax.tree.map(lambda *xs: jnp.stack(xs), *caches))

  def unstack(self) -> tuple[TurboQuantCache, ...]:
    """The per-layer caches (copies)."""
    return tuple(jax.tree.map(lambda x: x[i], self.layers) for i in range(len(self)))

  def __len__(self) -> int:
    return self.layers.lengths.shape[0]

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __getitem__(self, i: int) -> TurboQuantCache:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < len(self):
      raise IndexError(f"layer index must be an int in [0, {len(self)}), got {i!r}")
    i = int(i)
    small = {f.name: jax.tree.map(lambda x: x[i], getattr(self.layers, f.name))
             for f in dataclasses.fields(TurboQuantCache)
             if not f.metadata.get("static") and f.name not in _IN_PLACE}
    layer = dataclasses.replace(self.layers, region_layer=i, **small)
    self.__dict__.setdefault("_given", {})[i] = layer  # `set` writes only what changed
    return layer

  def set(self, i: int, layer: TurboQuantCache) -> StackedCache:
    """The stack with layer i replaced by ``layer`` (``self[i]`` after `update`): arrays it
    did not change (the same objects as ``self[i]`` gave) are kept as they are."""
    if not isinstance(layer, TurboQuantCache) or layer.region_layer != i:
      raise ValueError(f"set({i}, layer) takes layer {i} of this stack (a TurboQuantCache with "
                       f"region_layer={i}), got {type(layer).__name__} with region_layer="
                       f"{getattr(layer, 'region_layer', None)}")
    given = self.__dict__.get("_given", {}).get(i)
    out = {}
    for name in _WRITTEN:
      new = getattr(layer, name)
      if given is not None and new is getattr(given, name):
        continue
      if name in _IN_PLACE:  # the whole stacked arrays already
        out[name] = new
      else:
        out[name] = jax.lax.dynamic_update_index_in_dim(getattr(self.layers, name), new, i, 0)
    return StackedCache(dataclasses.replace(self.layers, auto_flush=layer.auto_flush, **out))

  # What `FlushSchedule` and `with_auto_flush` use.

  @property
  def lengths(self) -> jax.Array:  # [L, B]
    return self.layers.lengths

  @property
  def compressed(self) -> jax.Array:  # [L, B]
    return self.layers.compressed

  @property
  def window_room(self) -> int:
    return self.layers.window_room

  @property
  def flush_block(self) -> int:
    return self.layers.flush_block

  @property
  def capacity(self) -> int:
    return self.layers.capacity

  def with_auto_flush(self, flag: bool) -> StackedCache:
    return StackedCache(dataclasses.replace(self.layers, auto_flush=flag))

  def make_room(self, t: int) -> StackedCache:
    """`TurboQuantCache.make_room` of every layer at once (one flush for all layers)."""
    return StackedCache(jax.vmap(lambda c: c.make_room(t))(self.layers))

  def memory_bytes(self) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(self) if hasattr(x, "nbytes")))

  def bits_per_coordinate(self) -> float:
    return self[0].bits_per_coordinate()

  def shardings(self, mesh: jax.sharding.Mesh, **axes):
    raise NotImplementedError("a StackedCache cannot be laid out over a mesh: tqjax.sharding "
                              "takes per-layer caches (StackedCache.unstack())")


def _is_compressed(x) -> bool:
  return isinstance(x, (TurboQuantCache, StackedCache))


def with_auto_flush(caches, flag: bool):
  """The caches (any pytree) with every `TurboQuantCache`'s ``auto_flush`` set (same arrays;
  works on abstract caches too)."""
  def switch(c):
    if isinstance(c, StackedCache):
      return c.with_auto_flush(flag)
    return dataclasses.replace(c, auto_flush=flag) if _is_compressed(c) else c
  return jax.tree.map(switch, caches, is_leaf=_is_compressed)


@jax.jit(static_argnums=1, donate_argnums=0)
def _make_room(caches, t: int):
  return jax.tree.map(lambda c: c.make_room(t) if _is_compressed(c) else c, caches,
                      is_leaf=_is_compressed)


class FlushSchedule:
  """Decode steps with no branch: the host keeps a copy of every compressed window's fill.

  A `TurboQuantCache` flushes its window when a row would overflow it; inside a jitted
  step that is a data-dependent `lax.cond` per layer, which on a GPU makes the host wait
  for the predicate and drains the stream (measured on the H200 at Qwen2.5-7B shapes,
  batch 1, 32K tokens: a step of 28 layers 14.1 ms instead of 6.3). Every decode step
  adds the same number of tokens to every row, so the fill is known on the host: read it
  once, switch the caches' ``auto_flush`` off, and before each step flush exactly the rows
  the branch would have flushed, by a separate program, only on the steps that need it.
  The result is the same caches bit for bit.

      schedule = FlushSchedule(caches)
      caches = schedule.begin(caches)
      for _ in range(n):
        caches = schedule.before_step(caches)
        token, caches, key = runner.decode_step(token[:, None], caches, key)
      caches = schedule.end(caches)

  Caches of other types (and the wrapped caches of `tqjax.sharding.ShardedCache`) are
  found anywhere in the pytree; without compressed caches every call is a no-op.
  """

  def __init__(self, caches):
    found = [c for c in jax.tree.leaves(caches, is_leaf=_is_compressed) if _is_compressed(c)]
    self._held = [np.asarray(c.lengths - c.compressed) for c in found]  # [B] per layer
    self._room = [c.window_room for c in found]
    self._block = [c.flush_block for c in found]

  def begin(self, caches):
    """The caches with ``auto_flush`` off (the same arrays)."""
    return with_auto_flush(caches, False)

  def warm(self, caches, t: int = 1):
    """Runs the flush program now (compiling it outside a timed loop): it flushes the rows
    that cannot take ``t`` more tokens and leaves the others as they are."""
    if not self._held:
      return caches
    need = [held + t > room for held, room in zip(self._held, self._room)]
    caches = _make_room(caches, t)
    self._held = [np.where(n, held - f, held) for n, held, f in zip(need, self._held, self._block)]
    return caches

  def before_step(self, caches, t: int = 1):
    """Makes room for ``t`` tokens per row (t at most every window's flush block)."""
    if not self._held:
      return caches
    if t < 1 or t > min(self._block):
      raise ValueError(f"t must be in [1, flush_block={min(self._block)}], got {t=}")
    need = [held + t > room for held, room in zip(self._held, self._room)]
    if any(n.any() for n in need):
      caches = _make_room(caches, t)
      self._held = [np.where(n, held - f, held)
                    for n, held, f in zip(need, self._held, self._block)]
    self._held = [held + t for held in self._held]
    return caches

  def end(self, caches):
    """``auto_flush`` back on, after checking the host's fill against the caches' (one
    read of the first compressed layer)."""
    found = [c for c in jax.tree.leaves(caches, is_leaf=_is_compressed) if _is_compressed(c)]
    if found:
      held = np.asarray(found[0].lengths - found[0].compressed)
      if not np.array_equal(held, self._held[0]):
        raise RuntimeError(f"FlushSchedule lost track of the window: the host counted "
                           f"{self._held[0].tolist()} tokens per row, the cache holds "
                           f"{held.tolist()} (were tokens appended between before_step calls?)")
    return with_auto_flush(caches, True)


def _from_rows(x, t):  # [B, K, T * G, ...] -> [B, T, K * G, ...]
  b, kh, rows = x.shape[:3]
  x = jnp.moveaxis(x.reshape(b, kh, t, rows // t, *x.shape[3:]), 2, 1)
  return x.reshape(b, t, kh * (rows // t), *x.shape[4:])


def _encode_region(quantizer: qz.Quantizer, x):
  """x [B, S, K, D] -> per segment codes [B, K, S, P] and scales [B, K, S]."""
  enc = qz.encode(quantizer, jnp.swapaxes(x, 1, 2))
  return enc.codes, enc.scales


def _region_values(quantizer: qz.Quantizer, codes, scales):
  """Per segment n · c[codes]: [B, K, S, d_i] float32."""
  return qz.segment_values(quantizer, qz.Encoded(tuple(codes), tuple(scales)))


def convert_caches(dense_caches, config: CacheConfig, *, capacity: int | None = None,
                   query_rms=None, implementation: str = "xla", stack: bool = False):
  """Per-layer `TurboQuantCache.from_dense` over a model's tuple of dense caches
  (``query_rms``: one [K, D] array per layer, or None); with ``stack``, one
  `StackedCache` of them (needs equal quantizers in every layer: no ``layer_overrides``)."""
  query_rms = [None] * len(dense_caches) if query_rms is None else query_rms
  caches = tuple(TurboQuantCache.from_dense(c, config, layer=i, capacity=capacity,
                                            query_rms=r, implementation=implementation)
                 for i, (c, r) in enumerate(zip(dense_caches, query_rms)))
  return StackedCache.stack(caches) if stack else caches
