"""Random Hugging Face models for tests: weights large enough that attention is far from uniform."""

import torch
import transformers


def random_hf_model(config, seed: int = 0, *, attn_implementation: str = "eager",
                    gain: float = 1.0):
  """A transformers causal LM from `config` with seeded Gaussian weights (linear layers
  scaled by gain / sqrt(fan_in), norms near 1, biases of 0.5 scale)."""
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith("bias"):
        p.copy_(0.5 * noise)
      elif "embed_tokens" in name:
        p.copy_(noise)
      else:
        p.copy_(gain * noise / p.shape[1] ** 0.5)
  return model.eval()
