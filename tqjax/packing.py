"""Bit packing of b-bit codes (b = 1..8) along the last axis, with no wasted bits.

Layout, chosen so that a GPU kernel unpacks any width with shifts and masks that never
cross a byte:

* b in {1, 2, 4, 8}: ``8 // b`` codes per byte, little-endian inside the byte: code ``i``
  sits in byte ``i * b // 8`` at bit offset ``(i * b) % 8``. For b = 4, byte ``j`` is
  ``c[2j] | c[2j + 1] << 4``.
* other widths are split into bit planes of power-of-two widths, low bits first
  (3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1). Plane ``p`` holds bits
  ``[shift_p, shift_p + width_p)`` of every code, packed as above, and the planes are
  concatenated along the last axis.

Each plane of ``n`` codes takes ``ceil(n * width / 8)`` bytes, so a row of ``n`` codes
takes exactly ``n * b / 8`` bytes whenever ``n`` is a multiple of 8 (every head_dim we
support); otherwise only the last byte of each plane is partly used (alignment).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

MAX_BITS = 8


def check_bits(bits: int, name: str = "bits") -> int:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
    raise TypeError(f"{name} must be an int in 1..{MAX_BITS}, got {bits!r}")
  if not 1 <= bits <= MAX_BITS:
    raise ValueError(f"{name} must be in 1..{MAX_BITS}, got {bits}")
  return int(bits)


def planes(bits: int) -> tuple[tuple[int, int], ...]:
  """(shift, width) of each bit plane of a ``bits``-wide code, low bits first."""
  bits = check_bits(bits)
  widths = (8,) if bits == 8 else tuple(w for w in (4, 2, 1) if bits & w)
  shifts = np.cumsum((0,) + widths[:-1])
  return tuple((int(s), w) for s, w in zip(shifts, widths))


def plane_bytes(n: int, width: int) -> int:
  return -(-n * width // 8)


def packed_size(n: int, bits: int) -> int:
  """Bytes taken by ``n`` packed ``bits``-wide codes."""
  return sum(plane_bytes(n, w) for _, w in planes(bits))


def _pack_plane(codes, width: int):
  # codes: [..., n] uint8 with values < 2**width.
  n = codes.shape[-1]
  per_byte = 8 // width
  pad = (-n) % per_byte
  if pad:
    codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
  grouped = codes.reshape(*codes.shape[:-1], -1, per_byte).astype(jnp.uint32)
  shifts = jnp.arange(per_byte, dtype=jnp.uint32) * width
  return jnp.sum(grouped << shifts, axis=-1, dtype=jnp.uint32).astype(jnp.uint8)


def _unpack_plane(packed, n: int, width: int):
  per_byte = 8 // width
  shifts = jnp.arange(per_byte, dtype=jnp.uint8) * width
  mask = jnp.uint8((1 << width) - 1)
  codes = (packed[..., None] >> shifts) & mask
  return codes.reshape(*packed.shape[:-1], -1)[..., :n]


def pack(codes, bits: int):
  """Packs integer codes in ``[0, 2**bits)`` along the last axis into uint8.

  Args:
    codes: [..., n] any integer dtype.
    bits: code width, 1..8.

  Returns:
    [..., packed_size(n, bits)] uint8.
  """
  bits = check_bits(bits)
  codes = jnp.asarray(codes)
  if not jnp.issubdtype(codes.dtype, jnp.integer):
    raise TypeError(f"codes must have an integer dtype, got {codes.dtype}")
  if codes.ndim == 0:
    raise ValueError(f"codes must have at least one axis, got shape {codes.shape}")
  codes = codes.astype(jnp.uint8)
  parts = []
  for shift, width in planes(bits):
    plane = (codes >> shift) & ((1 << width) - 1)
    parts.append(_pack_plane(plane, width))
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def unpack(packed, n: int, bits: int):
  """Inverse of :func:`pack`: [..., packed_size(n, bits)] uint8 -> [..., n] uint8."""
  bits = check_bits(bits)
  packed = jnp.asarray(packed)
  if packed.dtype != jnp.uint8:
    raise TypeError(f"packed must be uint8, got {packed.dtype}")
  want = packed_size(n, bits)
  if packed.shape[-1] != want:
    raise ValueError(
        f"packed.shape[-1] must be packed_size({n=}, {bits=}) = {want}, "
        f"got shape {packed.shape}")
  codes, offset = None, 0
  for shift, width in planes(bits):
    size = plane_bytes(n, width)
    plane = _unpack_plane(packed[..., offset:offset + size], n, width)
    offset += size
    codes = plane << shift if codes is None else codes | (plane << shift)
  return codes
