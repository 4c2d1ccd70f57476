"""The Llama-family decoder (Llama, Qwen2, Mistral) in Flax NNX, its loading and generation."""

from tqjax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, RopeScaling
from tqjax.models.decoder import Decoder, init_caches
from tqjax.models.generate import (Runner, decode, forward, generate, prefill,
                                   sample_logits)
from tqjax.models.loading import from_state_dict, from_torch, load_hf, load_model

__all__ = [
  "SUPPORTED_MODEL_TYPES", "ModelConfig", "RopeScaling", "Decoder", "init_caches", "Runner",
  "decode", "forward", "generate", "prefill", "sample_logits", "from_state_dict", "from_torch",
  "load_hf", "load_model",
]
