"""Hugging Face PyTorch models attending over tqjax caches through DLPack.

    import bridge
    cache = bridge.TurboQuantHFCache.from_model(model, preset="k4v4")
    with bridge.tqjax_attention(model):
      out = model.generate(ids, past_key_values=cache, max_new_tokens=64)

The prompt is prefilled with exact attention (torch SDPA) into a `DenseCache`, converted
per layer to a `TurboQuantCache` (`preset=None` keeps it exact); decode steps and chunks
run the cache's update + attend in JAX (the jnp reference on CPU, the Pallas kernels on
the GPU), q/k/v and the output crossing by DLPack. Importing this package registers the
"tqjax" attention and mask functions with transformers.
"""

from bridge.attention import tqjax_attention, tqjax_attention_forward
from bridge.cache import (ATTENTION_NAME, SUPPORTED_MODEL_TYPES, ModelSpec, PendingKV,
                          TQJaxLayer, TurboQuantHFCache, resolve_preset)
from bridge.dlpack import to_jax, to_torch

__all__ = [
  "ATTENTION_NAME", "SUPPORTED_MODEL_TYPES", "ModelSpec", "PendingKV", "TQJaxLayer",
  "TurboQuantHFCache", "resolve_preset", "tqjax_attention", "tqjax_attention_forward",
  "to_jax", "to_torch",
]
