"""TurboQuant quantizers as pure, jittable functions (arXiv 2504.19874).

Every quantized vector is a sum of **segments**. Segment ``i`` has a fixed linear map
``A_i`` ([d_i, D]), a codebook ``c_i`` (2**b_i centroids), per-vector codes (b_i bits for
each of d_i coordinates, packed) and one per-vector scale ``n_i``:

    x̂ = Σ_i n_i A_iᵀ c_i[codes_i]            ⟨q, x̂⟩ = Σ_i n_i ⟨A_i q, c_i[codes_i]⟩

so attention rotates the query once per segment and never rebuilds a key.

* ``kind="mse"`` (TurboQuant_mse): one segment, A = Π (a random rotation), codes the
  nearest Lloyd–Max centroids (or, with ``codebook="e4m3"``, centroids on the float8 e4m3
  grid times one scale) of the coordinates of Πx/‖x‖, n = ‖x‖, or
  ‖x‖ / ‖c[codes]‖ with ``norm_correction`` (the rebuilt unit vector gets norm 1).
* ``kind="prod"`` (TurboQuant_prod): the mse segment at b−1 bits plus a 1-bit QJL
  segment: A = S (i.i.d. N(0, 1)), codes sign(S r) of the unit residual
  r = x/‖x‖ − x̂_mse, centroids ±sqrt(π/2)/d and n = ‖x‖·‖r‖. Its inner-product estimate
  is unbiased. At b = 1 only the QJL segment remains.
* **outlier split** (``outlier_channels=d1, outlier_bits=b1``): channels [0, d1) and
  [d1, D) are quantized by two independent quantizers of the same kind (own rotation, own
  norm), at b1 and ``bits`` bits: 32 channels at 3 bits + 96 at 2 gives 2.5 bits/coordinate
  at D = 128. Which channels are outliers is the caller's choice: permute them to the
  front first (the KV cache folds that permutation into its key transform).

``QuantizerConfig`` is static; ``Quantizer`` is a pytree of the matrices and tables that
``encode``/``decode``/``inner_product`` take, so all of them run under ``jit``.
``MinMaxConfig`` is the per-group asymmetric integer quantizer kept for comparison.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from tqjax import packing
from tqjax import rotation as rotation_lib
from tqjax.codebook import GRIDS, get_codebook

Kind = Literal["mse", "prod"]
KINDS = ("mse", "prod")
SCALE_DTYPES = ("float32", "float16", "bfloat16")


def _check_int(value, name: str, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {value!r}")
  if value < low:
    raise ValueError(f"{name} must be >= {low}, got {value}")
  return int(value)


@dataclasses.dataclass(frozen=True)
class Segment:
  """Static description of one segment: which channels, how many bits, what codebook."""
  start: int  # first input channel of its channel group
  stop: int  # one past the last input channel of its channel group
  bits: int
  kind: Literal["codebook", "qjl"]

  @property
  def dim(self) -> int:
    return self.stop - self.start


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
  """A TurboQuant quantizer for vectors of size ``head_dim``, validated on construction.

  ``bits`` is the total width of each coordinate (for ``prod``: b−1 codebook bits plus the
  1-bit sketch). With ``outlier_channels > 0`` it is the width of the regular channels and
  ``outlier_bits`` that of the first ``outlier_channels`` channels.
  """
  head_dim: int
  bits: int
  kind: Kind = "mse"
  rotation: rotation_lib.RotationKind = "hadamard"
  seed: int = 0
  norm_correction: bool = False
  outlier_channels: int = 0
  outlier_bits: int | None = None
  scale_dtype: str = "float32"
  # "lloyd-max", or "e4m3": centroids on the float8 e4m3 grid times one scale
  # (`tqjax.codebook.get_codebook`; no kernel gains from it now: `CacheConfig.k4v4_e4m3`).
  codebook: str = "lloyd-max"

  def __post_init__(self):
    _check_int(self.head_dim, "head_dim", 2)
    packing.check_bits(self.bits)
    if self.kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
    if self.rotation not in rotation_lib.ROTATION_KINDS:
      raise ValueError(f"rotation must be one of {rotation_lib.ROTATION_KINDS}, got {self.rotation!r}")
    _check_int(self.seed, "seed", 0)
    _check_int(self.outlier_channels, "outlier_channels", 0)
    if self.outlier_channels:
      if self.outlier_bits is None:
        raise ValueError(f"outlier_channels={self.outlier_channels} needs outlier_bits")
      packing.check_bits(self.outlier_bits, "outlier_bits")
      if not 2 <= self.outlier_channels <= self.head_dim - 2:
        raise ValueError(f"outlier_channels must be in 2..head_dim-2={self.head_dim - 2}, "
                         f"got {self.outlier_channels}")
    elif self.outlier_bits is not None:
      raise ValueError(f"outlier_bits={self.outlier_bits} given without outlier_channels")
    if self.scale_dtype not in SCALE_DTYPES:
      raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")
    if self.codebook not in GRIDS:
      raise ValueError(f"codebook must be one of {GRIDS}, got {self.codebook!r}")
    if self.rotation == "hadamard":
      for start, stop, _ in self.groups:
        if not rotation_lib.is_power_of_two(stop - start):
          raise ValueError(
              f"rotation='hadamard' needs power-of-two channel groups, got a group of "
              f"{stop - start} channels (head_dim={self.head_dim}, outlier_channels={self.outlier_channels}); "
              "use rotation='haar'")

  @property
  def groups(self) -> tuple[tuple[int, int, int], ...]:
    """(start, stop, bits) of each independently quantized channel group."""
    if not self.outlier_channels:
      return ((0, self.head_dim, self.bits),)
    d1 = self.outlier_channels
    return ((0, d1, self.outlier_bits), (d1, self.head_dim, self.bits))

  @property
  def segments(self) -> tuple[Segment, ...]:
    out = []
    for start, stop, bits in self.groups:
      if self.kind == "mse":
        out.append(Segment(start, stop, bits, "codebook"))
      else:
        if bits > 1:
          out.append(Segment(start, stop, bits - 1, "codebook"))
        out.append(Segment(start, stop, 1, "qjl"))
    return tuple(out)

  @property
  def scale_bits(self) -> int:
    return jnp.dtype(self.scale_dtype).itemsize * 8

  @property
  def packed_bytes(self) -> int:
    """Bytes of packed codes per vector (all segments)."""
    return sum(packing.packed_size(s.dim, s.bits) for s in self.segments)

  @property
  def bytes_per_vector(self) -> int:
    """Everything stored per vector: packed codes plus one scale per segment."""
    return self.packed_bytes + len(self.segments) * self.scale_bits // 8

  @property
  def bits_per_coordinate(self) -> float:
    """Exact storage cost per coordinate, scales included (byte alignment too)."""
    return 8 * self.bytes_per_vector / self.head_dim


def segment_centroids(config: QuantizerConfig) -> tuple[np.ndarray, ...]:
  """Host-side float64 centroids of every segment (the QJL segment's are ±sqrt(π/2)/d)."""
  out = []
  for seg in config.segments:
    if seg.kind == "codebook":
      out.append(get_codebook(seg.dim, seg.bits, config.codebook).centroids)
    else:
      level = math.sqrt(math.pi / 2) / seg.dim
      out.append(np.array([-level, level]))
  return tuple(out)


def segment_boundaries(config: QuantizerConfig) -> tuple[np.ndarray, ...]:
  """Host-side float64 boundaries of every segment (the QJL segment's: 0, its sign)."""
  return tuple(get_codebook(seg.dim, seg.bits, config.codebook).boundaries
               if seg.kind == "codebook" else np.array([0.0]) for seg in config.segments)


def _segment_tables(config: QuantizerConfig):
  """Host-side float64 maps, centroids and boundaries of every segment."""
  maps = []
  for g, (start, stop, _) in enumerate(config.groups):
    dim = stop - start
    seeds = np.random.SeedSequence([config.seed, g]).generate_state(2)
    for seg in (s for s in config.segments if s.start == start):
      full = np.zeros((dim, config.head_dim))
      if seg.kind == "codebook":
        full[:, start:stop] = rotation_lib.rotation(config.rotation, dim, int(seeds[0]))
      else:
        full[:, start:stop] = rotation_lib.gaussian(dim, dim, int(seeds[1]))
      maps.append(full)
  return maps, segment_centroids(config), segment_boundaries(config)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Quantizer:
  """The arrays of a ``QuantizerConfig``: build with ``Quantizer.create(config)``."""
  maps: tuple[jax.Array, ...]  # per segment [d_i, D] float32
  centroids: tuple[jax.Array, ...]  # per segment [2**b_i] float32
  boundaries: tuple[jax.Array, ...]  # per segment [2**b_i - 1] float32
  config: QuantizerConfig = dataclasses.field(metadata=dict(static=True))

  @classmethod
  def create(cls, config: QuantizerConfig) -> Quantizer:
    maps, centroids, boundaries = _segment_tables(config)
    as32 = lambda arrays: tuple(jnp.asarray(a, jnp.float32) for a in arrays)
    return cls(as32(maps), as32(centroids), as32(boundaries), config)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Encoded:
  """Quantized vectors: per segment packed codes [..., P_i] uint8 and scales [...]."""
  codes: tuple[jax.Array, ...]
  scales: tuple[jax.Array, ...]


def check_input(x, head_dim: int, name: str = "x"):
  """Static checks (dtype, shape) always; finiteness when ``x`` holds concrete values."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
  if x.ndim == 0 or x.shape[-1] != head_dim:
    raise ValueError(f"{name}.shape[-1] must be head_dim={head_dim}, got shape {x.shape}")
  if not isinstance(x, jax.core.Tracer) and not bool(jnp.isfinite(x).all()):
    raise ValueError(f"{name} contains NaN or Inf")
  return x


def _quantize(u, boundaries):
  # Index of the bucket: boundaries are sorted midpoints between centroids. Comparing with
  # every boundary is fastest for small codebooks; a binary search keeps memory flat for
  # wide ones (compare_all would materialize [..., 255] at 8 bits).
  method = "compare_all" if boundaries.shape[0] <= 15 else "scan_unrolled"
  return jnp.searchsorted(boundaries, u, side="left", method=method).astype(jnp.uint8)


def _safe_div(a, b):
  return a / jnp.where(b > 0, b, 1.0)


def encode(quantizer: Quantizer, x) -> Encoded:
  """Quantizes x [..., D] (any float dtype) into one packed code array per segment."""
  cfg = quantizer.config
  x = check_input(x, cfg.head_dim).astype(jnp.float32)
  codes, scales = [], []
  for i, seg in enumerate(cfg.segments):
    amap = quantizer.maps[i][:, seg.start:seg.stop]  # [d, d]: Π or S of the group
    if seg.kind == "codebook":
      x_group = x[..., seg.start:seg.stop]
      norm = jnp.linalg.norm(x_group, axis=-1)
      u = _safe_div(x_group @ amap.T, norm[..., None])  # Π x / ‖x‖
      idx = _quantize(u, quantizer.boundaries[i])
      c = quantizer.centroids[i][idx]
      scale = _safe_div(norm, jnp.linalg.norm(c, axis=-1)) if cfg.norm_correction else norm
      # Unit residual in the group's own basis, for a QJL segment that may follow.
      residual = (u - c * _safe_div(scale, norm)[..., None]) @ amap
    else:
      if i == 0 or cfg.segments[i - 1].start != seg.start:  # prod at 1 bit: no mse part
        x_group = x[..., seg.start:seg.stop]
        norm = jnp.linalg.norm(x_group, axis=-1)
        residual = _safe_div(x_group, norm[..., None])
      idx = (residual @ amap.T >= 0).astype(jnp.uint8)  # sign(S r)
      scale = norm * jnp.linalg.norm(residual, axis=-1)
    codes.append(packing.pack(idx, seg.bits))
    scales.append(scale.astype(cfg.scale_dtype))
  return Encoded(tuple(codes), tuple(scales))


def segment_values(quantizer: Quantizer, encoded: Encoded) -> tuple[jax.Array, ...]:
  """Per segment n_i · c_i[codes_i]: [..., d_i] float32, the vector in its rotated basis."""
  out = []
  for i, seg in enumerate(quantizer.config.segments):
    idx = packing.unpack(encoded.codes[i], seg.dim, seg.bits)
    out.append(quantizer.centroids[i][idx] * encoded.scales[i].astype(jnp.float32)[..., None])
  return tuple(out)


def decode(quantizer: Quantizer, encoded: Encoded):
  """Reconstruction x̂ = Σ_i n_i A_iᵀ c_i[codes_i]: [..., D] float32."""
  values = segment_values(quantizer, encoded)
  return sum(v @ amap for v, amap in zip(values, quantizer.maps))


def project_query(quantizer: Quantizer, q) -> tuple[jax.Array, ...]:
  """Per segment A_i q: [..., d_i] float32 (rotate the query once, never the keys)."""
  q = check_input(q, quantizer.config.head_dim, "q").astype(jnp.float32)
  return tuple(q @ amap.T for amap in quantizer.maps)


def inner_product(quantizer: Quantizer, q, encoded: Encoded):
  """Estimates ⟨q, x⟩ for matching leading axes of q [..., D] and ``encoded`` [...]."""
  values = segment_values(quantizer, encoded)
  return sum(jnp.sum(qp * v, axis=-1) for qp, v in zip(project_query(quantizer, q), values))


# Per-group min/max integer quantization (the usual KIVI-style baseline for values).


@dataclasses.dataclass(frozen=True)
class MinMaxConfig:
  """Asymmetric b-bit integers per group of ``group_size`` consecutive channels."""
  head_dim: int
  bits: int
  group_size: int = 32
  scale_dtype: str = "float16"

  def __post_init__(self):
    _check_int(self.head_dim, "head_dim", 1)
    packing.check_bits(self.bits)
    _check_int(self.group_size, "group_size", 1)
    if self.head_dim % self.group_size:
      raise ValueError(f"head_dim={self.head_dim} must be a multiple of group_size={self.group_size}")
    if self.scale_dtype not in SCALE_DTYPES:
      raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")

  @property
  def bytes_per_vector(self) -> int:
    groups = self.head_dim // self.group_size
    return packing.packed_size(self.head_dim, self.bits) + 2 * groups * jnp.dtype(self.scale_dtype).itemsize

  @property
  def bits_per_coordinate(self) -> float:
    return 8 * self.bytes_per_vector / self.head_dim


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MinMaxEncoded:
  codes: jax.Array  # [..., packed_size(D, bits)] uint8
  scale: jax.Array  # [..., D // group_size]
  low: jax.Array  # [..., D // group_size]


def encode_minmax(config: MinMaxConfig, x) -> MinMaxEncoded:
  x = check_input(x, config.head_dim).astype(jnp.float32)
  grouped = x.reshape(*x.shape[:-1], -1, config.group_size)
  low, high = grouped.min(-1), grouped.max(-1)
  levels = (1 << config.bits) - 1
  scale = ((high - low) / levels).astype(config.scale_dtype)
  low = low.astype(config.scale_dtype)
  step = scale.astype(jnp.float32)[..., None]
  idx = jnp.floor(_safe_div(grouped - low.astype(jnp.float32)[..., None], step) + 0.5)
  idx = jnp.clip(idx, 0, levels).astype(jnp.uint8).reshape(x.shape)
  return MinMaxEncoded(packing.pack(idx, config.bits), scale, low)


def decode_minmax(config: MinMaxConfig, encoded: MinMaxEncoded):
  idx = packing.unpack(encoded.codes, config.head_dim, config.bits)
  grouped = idx.reshape(*idx.shape[:-1], -1, config.group_size).astype(jnp.float32)
  out = grouped * encoded.scale.astype(jnp.float32)[..., None] + encoded.low.astype(jnp.float32)[..., None]
  return out.reshape(idx.shape)
