"""torch <-> JAX hand-offs through DLPack.

On the same device these are zero-copy: the JAX array aliases the torch buffer and vice
versa (DLPack's stream argument orders the producer's and the consumer's CUDA streams).
DLPack carries dense row-major buffers only, so a strided view is made contiguous first,
and int64 becomes int32 (JAX runs without x64). A torch view of a JAX buffer aliases an
immutable buffer: treat it as read-only.
"""

from __future__ import annotations

import jax
import jax.dlpack
import torch


def to_jax(tensor: torch.Tensor) -> jax.Array:
  """The JAX array over `tensor`'s buffer (a copy only for strided views or int64)."""
  tensor = tensor.detach()
  if tensor.dtype == torch.int64:
    tensor = tensor.to(torch.int32)
  if not tensor.is_contiguous():
    tensor = tensor.contiguous()
  return jax.dlpack.from_dlpack(tensor)


def to_torch(array: jax.Array) -> torch.Tensor:
  """A torch tensor over `array`'s buffer (read-only by convention)."""
  return torch.from_dlpack(array)
