"""The "tqjax" attention function for transformers, and switching a model to it.

Importing this module registers, under the name "tqjax",
* `tqjax_attention_forward` with `transformers.AttentionInterface`: exact torch SDPA for
  the prefill (then the K/V go into the JAX cache), JAX update + attend for decode steps
  and chunks (see `bridge.cache`);
* `sdpa_mask` with `transformers.AttentionMaskInterface`: without a registered mask
  function transformers passes no mask, and a padded prefill would attend to padding.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from bridge.cache import ATTENTION_NAME, ModelSpec, PendingKV

_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")


def _real_tokens(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
  """[B, T] bool, False on padding, from the prefill's 4D mask [B|1, 1, T, T]; None when
  there is no mask or no padding. A token attends to itself unless it is padding (causal
  and sliding-window masks keep the diagonal), so the diagonal is the padding mask."""
  if mask is None:
    return None
  if mask.dtype != torch.bool or mask.ndim != 4 or tuple(mask.shape[-2:]) != (length, length):
    raise ValueError(f"expected the prefill mask as bool [B, 1, T={length}, T={length}] "
                     f"(sdpa_mask), got {mask.dtype} {tuple(mask.shape)}")
  real = torch.diagonal(mask[:, 0], dim1=-2, dim2=-1).expand(batch, length)  # [B, T]
  if bool(real.all()):
    return None
  if not bool(real.any(dim=1).all()):
    raise ValueError("a prompt row holds padding only")
  return real


def _check_positions(real: torch.Tensor | None, position_ids: torch.Tensor | None) -> None:
  """The JAX cache stores the real token t of a row at slot = number of earlier real
  tokens, which must be its position (as transformers' `generate` makes it)."""
  if position_ids is None:
    return
  b, t = position_ids.shape[0], position_ids.shape[-1]
  if real is None:
    expected = torch.arange(t, device=position_ids.device).expand(b, t)
    ok = bool((position_ids == expected).all())
  else:
    expected = torch.cumsum(real.to(torch.int64), dim=1) - 1
    ok = bool(((position_ids == expected) | ~real).all())
  if not ok:
    raise ValueError("the tqjax cache needs prompt positions 0, 1, ... over the real tokens "
                     f"of each row (padding skipped); got position_ids {position_ids.tolist()}")


def tqjax_attention_forward(
  module: torch.nn.Module,
  query: torch.Tensor,  # [B, H, T, D]
  key: PendingKV,
  value: PendingKV,
  attention_mask: torch.Tensor | None,
  dropout: float = 0.0,
  scaling: float | None = None,
  sliding_window: int | None = None,
  **kwargs: Any,
) -> tuple[torch.Tensor, None]:  # ([B, T, H, D], no attention weights)
  """Attention over a `TurboQuantHFCache` layer (its `update` returned the handles)."""
  if not isinstance(key, PendingKV) or value is not key:
    raise TypeError(f"the {ATTENTION_NAME!r} attention needs a bridge.TurboQuantHFCache as "
                    f"the model's cache (past_key_values), got keys of type "
                    f"{type(key).__name__}")
  if dropout:
    raise ValueError(f"the {ATTENTION_NAME!r} attention is for inference, got {dropout=}")
  for name in _UNSUPPORTED_KWARGS:
    if kwargs.get(name) is not None:
      raise ValueError(f"the {ATTENTION_NAME!r} attention does not support {name!r}")
  if kwargs.get("output_attentions"):
    raise ValueError(f"the {ATTENTION_NAME!r} attention does not return attention weights")
  layer = key.layer
  scale = query.shape[-1] ** -0.5 if scaling is None else scaling
  if layer.state is None:  # the prefill: exact attention in torch, then fill the JAX cache
    b, _, t, _ = query.shape
    real = _real_tokens(attention_mask, b, t)
    _check_positions(real, kwargs.get("position_ids"))
    out, _ = sdpa_attention_forward(module, query, key.keys, key.values, attention_mask,
                                    dropout=0.0, scaling=scale, **kwargs)
    layer.prefill(query, key.keys, key.values, real)
    return out, None
  return layer.update_attend(query, key.keys, key.values, scale, sliding_window), None


AttentionInterface.register(ATTENTION_NAME, tqjax_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@contextlib.contextmanager
def tqjax_attention(model: Any) -> Iterator[Any]:
  """Runs `model` (a transformers Llama / Qwen2 / Mistral) with the "tqjax" attention
  inside the block and restores its previous attention implementation after."""
  ModelSpec.from_hf(model.config)  # a clear error for unsupported architectures
  previous = model.config._attn_implementation
  model.set_attn_implementation(ATTENTION_NAME)
  if model.config._attn_implementation != ATTENTION_NAME:
    raise RuntimeError(f"{type(model).__name__} did not accept the {ATTENTION_NAME!r} "
                       f"attention implementation")
  try:
    yield model
  finally:
    model.set_attn_implementation(previous)
