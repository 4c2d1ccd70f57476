"""`ModelConfig`: the one configuration of the Llama-family decoder (Llama, Qwen2, Mistral).

The architectures differ only in configuration: q/k/v (and o) biases, tied embeddings,
RoPE parameters and per-layer sliding windows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style frequency-dependent RoPE scaling ("llama3"), or uniform ("linear")."""
  rope_type: str  # "llama3" or "linear"
  factor: float
  low_freq_factor: float = 1.0  # llama3 only
  high_freq_factor: float = 4.0  # llama3 only
  original_max_position_embeddings: int = 8192  # llama3 only

  def __post_init__(self):
    if self.rope_type not in ("llama3", "linear"):
      raise ValueError(f"rope_type must be 'llama3' or 'linear', got {self.rope_type!r}")
    if self.factor <= 0:
      raise ValueError(f"{self.factor=} must be > 0")
    if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
      raise ValueError(f"{self.high_freq_factor=} must exceed {self.low_freq_factor=}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  model_type: str  # "llama", "qwen2" or "mistral" (informational: behaviour is the fields)
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int  # H
  num_kv_heads: int  # K
  head_dim: int  # D
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  sliding_window: int | None = None
  # Which layers use `sliding_window`; None means every layer (when it is set).
  sliding_layers: tuple[bool, ...] | None = None
  max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"model_type={self.model_type!r} is not supported; supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "num_kv_heads", "head_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"{self.num_heads=} must be a multiple of {self.num_kv_heads=}")
    if self.head_dim % 2:
      raise ValueError(f"{self.head_dim=} must be even (RoPE rotates pairs)")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"{self.sliding_window=} must be >= 1 or None")
    if self.sliding_layers is not None and len(self.sliding_layers) != self.num_layers:
      raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries, expected "
                       f"{self.num_layers=}")

  @property
  def group_size(self) -> int:  # G
    return self.num_heads // self.num_kv_heads

  def layer_window(self, layer: int) -> int | None:
    """The sliding window of `layer`, None for full attention."""
    if self.sliding_window is None:
      return None
    if self.sliding_layers is None or self.sliding_layers[layer]:
      return self.sliding_window
    return None

  def rope_inv_freq(self) -> np.ndarray:  # [D // 2] float32
    """Inverse RoPE frequencies, computed in float32 as transformers does."""
    exponent = np.arange(0, self.head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(
      self.head_dim)
    inv_freq = (1.0 / (np.float32(self.rope_theta) ** exponent)).astype(np.float32)
    s = self.rope_scaling
    if s is None:
      return inv_freq
    if s.rope_type == "linear":
      return (inv_freq / np.float32(s.factor)).astype(np.float32)
    # llama3: long wavelengths divided by `factor`, short ones kept, smooth in between.
    old = s.original_max_position_embeddings
    low_freq_wavelen = old / s.low_freq_factor
    high_freq_wavelen = old / s.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)

  # ---- presets (benchmark shapes) ----

  @classmethod
  def qwen2_5_7b(cls) -> ModelConfig:
    return cls(model_type="qwen2", vocab_size=152064, hidden_size=3584,
               intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
               head_dim=128, rms_norm_eps=1e-6, rope_theta=1_000_000.0, qkv_bias=True,
               max_position_embeddings=32768)

  @classmethod
  def llama3_8b(cls) -> ModelConfig:
    return cls(model_type="llama", vocab_size=128256, hidden_size=4096,
               intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
               head_dim=128, rms_norm_eps=1e-5, rope_theta=500_000.0,
               max_position_embeddings=8192)

  # ---- from transformers ----

  @classmethod
  def from_hf(cls, hf_config: Any) -> ModelConfig:
    """Builds the config from a transformers `LlamaConfig`/`Qwen2Config`/`MistralConfig`."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"model_type={model_type!r} is not supported; supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"hidden_act={act!r} is not supported; expected 'silu'")
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    rope_theta, rope_scaling = _rope_from_hf(hf_config)

    sliding_window = getattr(hf_config, "sliding_window", None)
    sliding_layers = None
    layer_types = getattr(hf_config, "layer_types", None)
    if model_type == "llama":
      sliding_window = None
    elif model_type == "qwen2":
      if layer_types is not None:
        sliding_layers = tuple(t == "sliding_attention" for t in layer_types)
      elif not getattr(hf_config, "use_sliding_window", False):
        sliding_window = None
      if sliding_layers is not None and not any(sliding_layers):
        sliding_window, sliding_layers = None, None
    if model_type == "llama":
      bias = bool(getattr(hf_config, "attention_bias", False))
      qkv_bias, o_bias = bias, bias
    elif model_type == "qwen2":
      qkv_bias, o_bias = True, False
    else:
      qkv_bias, o_bias = False, False
    return cls(
      model_type=model_type,
      vocab_size=hf_config.vocab_size,
      hidden_size=hf_config.hidden_size,
      intermediate_size=hf_config.intermediate_size,
      num_layers=hf_config.num_hidden_layers,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      rms_norm_eps=float(hf_config.rms_norm_eps),
      rope_theta=rope_theta,
      rope_scaling=rope_scaling,
      qkv_bias=qkv_bias,
      o_bias=o_bias,
      mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
      tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
      sliding_window=sliding_window,
      sliding_layers=sliding_layers,
      max_position_embeddings=int(getattr(hf_config, "max_position_embeddings", 8192)),
    )


def _rope_from_hf(hf_config: Any) -> tuple[float, RopeScaling | None]:
  # transformers 5 keeps `rope_parameters`; 4.x used `rope_theta` + `rope_scaling`.
  params = getattr(hf_config, "rope_parameters", None)
  if params is None:
    params = dict(getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise ValueError(f"partial_rotary_factor={partial} is not supported; expected 1.0")
  theta = float(params.get("rope_theta", 10000.0))
  if rope_type == "default":
    return theta, None
  if rope_type == "linear":
    return theta, RopeScaling("linear", float(params["factor"]))
  if rope_type == "llama3":
    return theta, RopeScaling(
      "llama3", float(params["factor"]), float(params["low_freq_factor"]),
      float(params["high_freq_factor"]),
      int(params.get("original_max_position_embeddings")
          or getattr(hf_config, "max_position_embeddings")))
  raise ValueError(f"rope_type={rope_type!r} is not supported; supported: default, linear, "
                   "llama3")
