"""Random rotations Π of R^D, deterministic from a seed.

Both kinds are built on the host in float64 numpy from ``np.random.default_rng(seed)``
and only then cast, so the same seed gives the same matrix on every machine and on every
JAX backend (CPU or GPU: the device never draws the randomness).

* ``"haar"``: a Haar-distributed orthogonal matrix, the QR factor of a Gaussian matrix with
  the signs of R's diagonal folded into Q (without that fix, Q is not Haar).
* ``"hadamard"``: ``H · diag(s) / sqrt(D)`` with H the Sylvester Hadamard matrix and s i.i.d.
  random signs; D must be a power of two. The signs matter: without them the all-ones
  direction (a DC offset in the input) maps onto a single coordinate.

A rotation acts as ``y = Π x`` (``x @ Π.T`` on row vectors).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

RotationKind = Literal["hadamard", "haar"]
ROTATION_KINDS = ("hadamard", "haar")


def _check_dim(dim: int, name: str = "dim") -> int:
  if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
    raise TypeError(f"{name} must be a positive int, got {dim!r}")
  if dim < 1:
    raise ValueError(f"{name} must be positive, got {dim}")
  return int(dim)


def is_power_of_two(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def haar(dim: int, seed: int) -> np.ndarray:
  """[dim, dim] float64 Haar-random orthogonal matrix."""
  dim = _check_dim(dim)
  gauss = np.random.default_rng(seed).standard_normal((dim, dim))
  q, r = np.linalg.qr(gauss)
  return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def hadamard(dim: int, seed: int) -> np.ndarray:
  """[dim, dim] float64 randomized Hadamard rotation H·diag(s)/sqrt(dim)."""
  dim = _check_dim(dim)
  if not is_power_of_two(dim):
    raise ValueError(f"the hadamard rotation needs a power-of-two dimension, got {dim=}; "
                     "use rotation='haar' for other dimensions")
  h = np.ones((1, 1))
  while h.shape[0] < dim:
    h = np.block([[h, h], [h, -h]])
  signs = np.where(np.random.default_rng(seed).random(dim) < 0.5, -1.0, 1.0)
  return h * signs / np.sqrt(dim)


def rotation(kind: RotationKind, dim: int, seed: int) -> np.ndarray:
  """[dim, dim] float64 rotation of the given kind."""
  if kind == "haar":
    return haar(dim, seed)
  if kind == "hadamard":
    return hadamard(dim, seed)
  raise ValueError(f"rotation must be one of {ROTATION_KINDS}, got {kind!r}")


def gaussian(rows: int, dim: int, seed: int) -> np.ndarray:
  """[rows, dim] float64 i.i.d. N(0, 1) matrix (the QJL sketch S)."""
  return np.random.default_rng(seed).standard_normal((_check_dim(rows, "rows"), _check_dim(dim)))
