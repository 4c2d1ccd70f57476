"""Loading Hugging Face checkpoints (hub ids, local folders, GGUF files) into the decoder.

transformers loads the checkpoint as a float32 torch model on CPU (GGUF weights are
dequantized by transformers); its state dict is converted to JAX arrays of the requested
dtype and placed into the NNX model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tqjax.hub import DEFAULT_MODEL, resolve_model
from tqjax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from tqjax.models.decoder import Decoder, fuse_gate_up, fuse_qkv


def _to_jax(tensor: Any, dtype: jnp.dtype, transpose: bool = False) -> jax.Array:
  array = tensor.detach().to("cpu").float().numpy()
  if transpose:
    array = array.T
  return jnp.asarray(np.ascontiguousarray(array), dtype=dtype)


def from_state_dict(config: ModelConfig, state_dict: dict[str, Any],
                    dtype: jnp.dtype = jnp.float32) -> Decoder:
  """Builds a `Decoder` from a transformers Llama/Qwen2/Mistral state dict (torch tensors)."""
  model = nnx.eval_shape(lambda: Decoder(config, dtype=dtype, rngs=nnx.Rngs(0)))
  used: set[str] = set()

  def tensor(name: str, transpose: bool = False) -> jax.Array:
    if name not in state_dict:
      raise KeyError(f"checkpoint has no tensor {name!r}")
    used.add(name)
    return _to_jax(state_dict[name], dtype, transpose)

  def set_checked(variable: nnx.Variable, value: jax.Array, what: str) -> None:
    if value.shape != variable.shape:
      raise ValueError(f"{what}: expected shape {variable.shape}, got {value.shape}")
    variable.set_value(value)

  def put(variable: nnx.Variable, name: str, transpose: bool = False) -> None:
    set_checked(variable, tensor(name, transpose), name)

  def put_linear(linear: nnx.Linear, prefix: str) -> None:
    put(linear.kernel, f"{prefix}.weight", transpose=True)  # torch [out, in] -> [in, out]
    if linear.bias is not None:
      put(linear.bias, f"{prefix}.bias")

  def put_fused(linear: nnx.Linear, prefixes: list[str], fuse) -> None:
    """A fused projection from the checkpoint's separate ones (torch [out, in] each)."""
    for variable, suffix, transpose in ((linear.kernel, "weight", True),
                                        (linear.bias, "bias", False)):
      if variable is not None:
        names = [f"{prefix}.{suffix}" for prefix in prefixes]
        set_checked(variable, fuse(*[tensor(n, transpose) for n in names]), " + ".join(names))

  put(model.embed_tokens.embedding, "model.embed_tokens.weight")
  for i, block in enumerate(model.layers):
    p = f"model.layers.{i}"
    put(block.input_layernorm.weight, f"{p}.input_layernorm.weight")
    put(block.post_attention_layernorm.weight, f"{p}.post_attention_layernorm.weight")
    qkv = [f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")]
    put_fused(block.self_attn.qkv_proj, qkv, lambda q, k, v: fuse_qkv(q, k, v, config.num_kv_heads))
    put_linear(block.self_attn.o_proj, f"{p}.self_attn.o_proj")
    put_fused(block.mlp.gate_up_proj, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], fuse_gate_up)
    put_linear(block.mlp.down_proj, f"{p}.mlp.down_proj")
  put(model.norm.weight, "model.norm.weight")
  if model.lm_head is not None:
    put_linear(model.lm_head, "lm_head")
  # Tied checkpoints may list lm_head.weight as an alias of the embedding; rotary buffers
  # are recomputed from the config.
  unused = [n for n in state_dict if n not in used and n != "lm_head.weight"
            and not n.endswith("rotary_emb.inv_freq")]
  if unused:
    raise ValueError(f"checkpoint tensors not used by the {config.model_type} decoder: "
                     f"{unused[:8]}{' ...' if len(unused) > 8 else ''}")
  return model


def from_torch(hf_model: Any, dtype: jnp.dtype = jnp.float32) -> Decoder:
  """Converts a built transformers `*ForCausalLM` (Llama, Qwen2, Mistral) to a `Decoder`."""
  config = ModelConfig.from_hf(hf_model.config)
  return from_state_dict(config, hf_model.state_dict(), dtype)


def load_hf(name_or_path: str, *, gguf_file: str | None = None) -> tuple[Any, Any]:
  """(transformers model in float32 on CPU, tokenizer) for an alias, hub id, local folder
  or GGUF file, after checking that the architecture is supported."""
  import torch
  import transformers

  if gguf_file is None:
    resolved = resolve_model(name_or_path)
    path, gguf_file = resolved.path, resolved.gguf_file
  else:
    path = name_or_path
  kwargs = {} if gguf_file is None else {"gguf_file": gguf_file}
  where = f"{path!r}" + ("" if gguf_file is None else f" with gguf_file={gguf_file!r}")
  tried = "a GGUF file" if gguf_file else "a local folder or a Hugging Face hub id"

  def failed(e: Exception) -> OSError:
    return OSError(
      f"could not load {name_or_path!r}: tried {where} as {tried} (no access to the hub? "
      f"offline alias: {DEFAULT_MODEL!r}). transformers said: {e}")

  def check(hf_config: Any) -> None:
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"{name_or_path!r} is a {hf_config.model_type!r} model; supported "
                       f"architectures: {', '.join(SUPPORTED_MODEL_TYPES)}")

  # A folder's or hub id's config is cheap: reject an architecture before loading weights.
  # transformers parses a GGUF file in Python on every call (~10 s for 100 MB), so a GGUF
  # model is checked after loading, parsing the file once.
  hf_config = None
  if gguf_file is None:
    try:
      hf_config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
      raise failed(e) from e
    check(hf_config)
  try:
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      path, config=hf_config, dtype=torch.float32, **kwargs).eval()
  except (OSError, ValueError) as e:
    raise failed(e) from e
  check(hf_model.config)
  tokenizer = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
  return hf_model, tokenizer


def load_model(name_or_path: str, *, gguf_file: str | None = None,
               dtype: jnp.dtype = jnp.float32) -> tuple[Decoder, Any, ModelConfig]:
  """(model, tokenizer, config) from an alias (`tqjax.hub.DEFAULT_MODEL`), a hub id, a local
  folder, or a GGUF file (a path to it, or a folder/hub id plus `gguf_file`)."""
  hf_model, tokenizer = load_hf(name_or_path, gguf_file=gguf_file)
  model = from_torch(hf_model, dtype)
  return model, tokenizer, model.config
