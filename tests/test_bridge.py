"""The Hugging Face bridge: transformers models decoding over tqjax caches through DLPack.

References: the stock transformers model (SDPA, its own cache) for exact parity, and the
Flax decoder (`tqjax.models`) on the same weights and cache preset for compressed parity.
"""

import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import bridge
from bridge import cache as bridge_cache
from tqjax.dense_cache import DenseCache
from tqjax.kvcache import TurboQuantCache, convert_caches, preset as named_preset
from tqjax.models import Runner, from_torch, load_hf

import hf_random

VOCAB = 97
PROMPT = 13
NEW = 6
CAP = 32  # one capacity (max_cache_len) everywhere: the jitted steps compile once
COMPRESSED = dict(window=4, flush_block=2)  # small window: the prompt reaches the codes


def hf_configs() -> dict[str, transformers.PretrainedConfig]:
  common = dict(vocab_size=VOCAB, intermediate_size=53, num_hidden_layers=2,
                max_position_embeddings=128, eos_token_id=None, bos_token_id=None,
                pad_token_id=None)
  return {
    "llama": transformers.LlamaConfig(  # GQA 6/2, Llama-3 RoPE scaling
      hidden_size=42, num_attention_heads=6, num_key_value_heads=2, head_dim=64,
      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16}, **common),
    "qwen2": transformers.Qwen2Config(  # biases, tied embeddings; layer 1 slides (window 5)
      hidden_size=42, num_attention_heads=6, num_key_value_heads=3, head_dim=64,
      tie_word_embeddings=True, use_sliding_window=True, sliding_window=5,
      max_window_layers=1, **common),
    "mistral": transformers.MistralConfig(  # MQA, every layer slides (window 7)
      hidden_size=35, num_attention_heads=5, num_key_value_heads=1, head_dim=64,
      sliding_window=7, **common),
  }


def random_hf_model(config, seed: int = 0):
  return hf_random.random_hf_model(config, seed, attn_implementation="sdpa", gain=2.0)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def arch_model(request):
  return request.param, random_hf_model(hf_configs()[request.param], seed=len(request.param))


def cache_kw(model, cache) -> dict:
  """`cache=` on transformers >= 5.24 (which deprecates `past_key_values=`), else
  `past_key_values=`."""
  name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
  return {name: cache}


def new_cache(model, preset=None, **kw):
  kw = {"max_cache_len": CAP, **({} if preset is None else COMPRESSED), **kw}
  return bridge.TurboQuantHFCache.from_model(model, preset=preset, **kw)


def generate(model, ids, cache=None, attention_mask=None, **kw):
  kw = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0, **kw}
  if attention_mask is not None:
    kw["attention_mask"] = attention_mask
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # generation-config notes
    if cache is None:
      return model.generate(ids, **kw)
    with bridge.tqjax_attention(model):
      return model.generate(ids, **kw, **cache_kw(model, cache))


def prompts(seed: int, batch: int = 2, length: int = PROMPT) -> torch.Tensor:
  return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- exact parity with the stock model ----


def test_exact_cache_greedy_tokens_and_logits_equal_stock(arch_model):
  arch, model = arch_model
  ids = prompts(1, batch=2)
  ref = generate(model, ids, return_dict_in_generate=True, output_logits=True)
  cache = new_cache(model)
  out = generate(model, ids, cache, return_dict_in_generate=True, output_logits=True)
  np.testing.assert_array_equal(out.sequences.numpy(), ref.sequences.numpy())
  np.testing.assert_allclose(torch.stack(out.logits).numpy(), torch.stack(ref.logits).numpy(),
                             rtol=1e-4, atol=1e-4)
  assert all(isinstance(c, DenseCache) for c in cache.jax_caches())
  assert cache.get_seq_length() == PROMPT + NEW - 1
  assert model.config._attn_implementation == "sdpa"  # restored


def test_8bit_cache_greedy_tokens_equal_stock():
  model = random_hf_model(hf_configs()["mistral"], seed=3)
  ids = prompts(2)
  ref = generate(model, ids)
  cache = new_cache(model, "k8v8")
  out = generate(model, ids, cache)
  np.testing.assert_array_equal(out.numpy(), ref.numpy())
  assert all(isinstance(c, TurboQuantCache) for c in cache.jax_caches())
  # the prompt minus the exact window went into the codes
  assert np.asarray(cache.jax_caches()[0].compressed).min() >= PROMPT - 4


def test_sampling_matches_stock_with_the_same_seed(arch_model):
  arch, model = arch_model
  ids = prompts(3, batch=2)
  kw = dict(do_sample=True, temperature=1.3, top_k=20)
  torch.manual_seed(123)
  ref = generate(model, ids, **kw)
  torch.manual_seed(123)
  out = generate(model, ids, new_cache(model), **kw)
  np.testing.assert_array_equal(out.numpy(), ref.numpy())
  torch.manual_seed(124)
  other = generate(model, ids, new_cache(model), **kw)
  assert (other[:, PROMPT:] != out[:, PROMPT:]).any()  # it really samples


# ---- left padding ----


def left_padded(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
  width = max(len(r) for r in rows)
  ids = torch.full((len(rows), width), pad_id)
  mask = torch.zeros((len(rows), width), dtype=torch.int64)
  for i, r in enumerate(rows):
    ids[i, width - len(r):] = r
    mask[i, width - len(r):] = 1
  return ids, mask


def test_left_padded_batch_equals_single_rows(arch_model):
  arch, model = arch_model
  rows = [prompts(10 + i, length=n)[0] for i, n in enumerate((PROMPT, 7))]
  ids, mask = left_padded(rows)
  batch = generate(model, ids, new_cache(model),
                   attention_mask=mask)
  stock = generate(model, ids, attention_mask=mask)
  np.testing.assert_array_equal(batch.numpy(), stock.numpy())
  for i, row in enumerate(rows):
    single = generate(model, row[None], new_cache(model))
    np.testing.assert_array_equal(batch[i, ids.shape[1]:].numpy(), single[0, len(row):].numpy())
  # padding never reaches the JAX cache: real lengths per row
  cache = new_cache(model)
  generate(model, ids, cache, attention_mask=mask)
  np.testing.assert_array_equal(np.asarray(cache.jax_caches()[1].lengths),
                                [len(r) + NEW - 1 for r in rows])


def test_compressed_cache_ignores_padding():
  """Extra left padding changes nothing: the compressed caches see the same real tokens."""
  model = random_hf_model(hf_configs()["qwen2"], seed=5)
  rows = [prompts(20 + i, length=n)[0] for i, n in enumerate((PROMPT, 8))]
  outputs = []
  for extra in (0, 3):
    ids, mask = left_padded(rows)
    ids = torch.cat([torch.zeros((2, extra), dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros((2, extra), dtype=mask.dtype), mask], dim=1)
    cache = new_cache(model, "k4v4")
    out = generate(model, ids, cache, attention_mask=mask, return_dict_in_generate=True,
                   output_logits=True)
    outputs.append((out.sequences[:, ids.shape[1]:], torch.stack(out.logits)))
  np.testing.assert_array_equal(outputs[0][0].numpy(), outputs[1][0].numpy())
  np.testing.assert_allclose(outputs[0][1].numpy(), outputs[1][1].numpy(), rtol=1e-4,
                             atol=1e-4)


# ---- parity with the Flax decoder on the same weights and preset ----


@pytest.mark.parametrize("preset", [None, "k4v4"])
def test_chunk_and_decode_logits_match_flax(arch_model, preset):
  """Strict protocol on both sides: exact prefill, convert, a chunk (T = 4), two decode
  steps; logits of every fed token agree."""
  arch, model = arch_model
  ids = prompts(4, batch=2, length=PROMPT + 6)
  doc, chunk, steps = ids[:, :PROMPT], ids[:, PROMPT:PROMPT + 4], ids[:, PROMPT + 4:]
  overrides = {} if preset is None else COMPRESSED
  capacity = CAP

  runner = Runner.from_model(from_torch(model))
  _, caches = runner.prefill(jnp.asarray(doc.numpy()), capacity)
  if preset is not None:
    caches = convert_caches(caches, named_preset(preset, **overrides), capacity=capacity)
  flax_logits = []
  for part in (chunk, steps[:, :1], steps[:, 1:]):
    logits, caches = runner.forward(jnp.asarray(part.numpy()), caches)
    flax_logits.append(np.asarray(logits))

  cache = bridge.TurboQuantHFCache.from_model(model, preset=preset, max_cache_len=capacity,
                                              **overrides)
  hf_logits = []
  with torch.no_grad(), bridge.tqjax_attention(model):
    model(doc, **cache_kw(model, cache))
    for part in (chunk, steps[:, :1], steps[:, 1:]):
      hf_logits.append(model(part, **cache_kw(model, cache)).logits.numpy())
  for got, want in zip(hf_logits, flax_logits):
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * scale)


# ---- the paired protocol: one exact prefill, a baseline and a compressed copy ----


def test_convert_shares_one_exact_prefill():
  model = random_hf_model(hf_configs()["llama"], seed=5)
  ids = prompts(5, length=PROMPT + 1)
  doc, question = ids[:, :PROMPT], ids
  base = new_cache(model)
  with torch.no_grad(), bridge.tqjax_attention(model):
    model(doc, **cache_kw(model, base))
  tq = base.convert("k4v4", **COMPRESSED)
  assert tq.get_seq_length() == base.get_seq_length() == PROMPT
  out_tq = generate(model, question, tq)
  out_base = generate(model, question, base)
  np.testing.assert_array_equal(out_base.numpy(), generate(model, question).numpy())
  fresh = new_cache(model, "k4v4")
  with torch.no_grad(), bridge.tqjax_attention(model):
    model(doc, **cache_kw(model, fresh))
  np.testing.assert_array_equal(out_tq.numpy(), generate(model, question, fresh).numpy())


# ---- capacity ----


@pytest.mark.parametrize("kind", ["dense", "k4v4"])
def test_growing_the_capacity_keeps_the_cache(kind):
  """A full cache grown along S (zeros) attends exactly as one built with the capacity."""
  kk, kv, kn, kq = jax.random.split(jax.random.key(0), 4)
  k = jax.random.normal(kk, (2, PROMPT, 2, 64))  # [B, S, K, D], the llama config's shapes
  v = jax.random.normal(kv, (2, PROMPT, 2, 64))
  qkv = jax.random.normal(kq, (2, 1, 6 + 2 + 2, 64))  # [B, T, H + 2K, D]
  config = None if kind == "dense" else named_preset(kind, **COMPRESSED)

  def filled(capacity):
    dense = DenseCache.init(2, 2, 64, capacity).update(k, v)
    if config is None:
      return dense
    return TurboQuantCache.from_dense(dense, config, layer=0, capacity=capacity)

  small = filled(PROMPT)
  grown = bridge_cache._with_capacity(small, CAP)
  assert grown.capacity == CAP
  step = lambda c: bridge_cache._update_attend(c, qkv, num_heads=6, num_kv_heads=2,
                                               scale=0.125, sliding_window=None)
  got_cache, got = step(grown)
  want_cache, want = step(filled(CAP))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got_cache.lengths, [PROMPT + 1] * 2)


def test_capacity_policy():
  model = random_hf_model(hf_configs()["llama"])
  cache = bridge.TurboQuantHFCache.from_model(model, preset=None)
  assert cache.capacity_for(13) == 256 + 256 and cache.capacity_for(520, current=512) == 1024
  assert cache.get_max_length() == -1
  fixed = bridge.TurboQuantHFCache.from_model(model, preset=None, max_cache_len=PROMPT + 3)
  assert fixed.get_max_length() == PROMPT + 3
  with pytest.raises(ValueError, match="max_cache_len=16 tokens, 17 arrived"):
    generate(model, prompts(6), fixed, max_new_tokens=5)
  mosaic = bridge.TurboQuantHFCache.from_model(model, max_cache_len=700,
                                               implementation="mosaic")
  assert mosaic.capacity_for(13) == 768  # the Mosaic kernel reads whole 128-token steps


# ---- errors ----


def test_clear_errors():
  gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
    vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=32))
  with pytest.raises(ValueError, match="supports model types .* got model_type='gpt2'"):
    bridge.TurboQuantHFCache.from_model(gpt2)
  with pytest.raises(ValueError, match="got model_type='gpt2'"):
    with bridge.tqjax_attention(gpt2):
      pass
  model = random_hf_model(hf_configs()["llama"])
  ids = prompts(7)
  cache = new_cache(model)
  with pytest.raises(RuntimeError, match="inside `with bridge.tqjax_attention"):
    model(ids, **cache_kw(model, cache))
  with pytest.raises(TypeError, match="needs a bridge.TurboQuantHFCache"):
    with bridge.tqjax_attention(model):
      model(ids, use_cache=False)
  with pytest.raises(NotImplementedError, match="beam search"):
    generate(model, ids, new_cache(model), num_beams=2)
  with pytest.raises(ValueError, match="unknown cache preset 'k9v9'"):
    bridge.TurboQuantHFCache.from_model(model, preset="k9v9")
  with pytest.raises(ValueError, match="implementation must be one of"):
    bridge.TurboQuantHFCache.from_model(model, implementation="cuda")
  assert model.config._attn_implementation == "sdpa"


def test_dlpack_handoffs_alias_buffers():
  x = torch.randn(3, 5, 7)
  j = bridge.to_jax(x)
  assert j.unsafe_buffer_pointer() == x.data_ptr()  # zero-copy
  strided = x.transpose(0, 1)
  np.testing.assert_array_equal(np.asarray(bridge.to_jax(strided)), strided.numpy())
  ints = bridge.to_jax(torch.arange(11))
  assert ints.dtype == jnp.int32
  out = jnp.arange(13, dtype=jnp.float32) * 2
  back = bridge.to_torch(out)
  assert back.data_ptr() == out.unsafe_buffer_pointer()
  np.testing.assert_array_equal(back.numpy(), np.asarray(out))


# ---- SmolLM2-135M-Instruct end to end (offline, 98 MB download the first time) ----


@pytest.mark.slow
def test_smollm2_end_to_end():
  hf, tokenizer = load_hf("smollm2-135m")
  messages = [{"role": "user", "content": "What is the capital of France?"}]
  ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
  ref = generate(hf, ids, max_new_tokens=8)
  exact = generate(hf, ids, bridge.TurboQuantHFCache.from_model(hf, preset=None),
                   max_new_tokens=8)
  np.testing.assert_array_equal(exact.numpy(), ref.numpy())
  cache = bridge.TurboQuantHFCache.from_model(hf, preset="k4v4", window=8, flush_block=4)
  compressed = generate(hf, ids, cache, max_new_tokens=8)
  assert np.asarray(cache.jax_caches()[0].compressed).min() >= ids.shape[1] - 8
  assert "Paris" in tokenizer.decode(compressed[0, ids.shape[1]:])


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA device")
@pytest.mark.parametrize("preset,capacity,impl,head_dim", [("k4v4", 768, "pallas", 128),
                                                          ("k5v3", 777, "pallas", 128),
                                                          ("k4v4", 709, "mosaic", 128),
                                                          ("k4v4", 709, "mosaic", 64)])
def test_pallas_bridge_matches_xla_bridge_on_gpu(preset, capacity, impl, head_dim):
  # Real head shapes (D = 128 or 64, G = 7) in bfloat16 on the GPU, teacher-forced (the
  # same tokens for every cache: free generation of a random model diverges at the first
  # flipped argmax): the fused kernel's logits equal the jnp path's, and both stay near
  # the exact cache's.
  config = transformers.Qwen2Config(
    vocab_size=VOCAB, hidden_size=896, intermediate_size=512, num_hidden_layers=2,
    num_attention_heads=7, num_key_value_heads=1, head_dim=head_dim,
    max_position_embeddings=2048,
    eos_token_id=None, bos_token_id=None, pad_token_id=None)
  model = hf_random.random_hf_model(config, 3, attn_implementation="sdpa").to("cuda", torch.bfloat16)
  ids = torch.randint(0, VOCAB, (2, 708), generator=torch.Generator().manual_seed(4)).cuda()
  logits = {}
  with bridge.tqjax_attention(model), torch.no_grad():
    for run in ("exact", "xla", impl):
      cache = bridge.TurboQuantHFCache.from_model(
        model, None if run == "exact" else preset, max_cache_len=capacity,
        implementation="pallas" if run == "exact" else run)
      model(ids[:, :700], past_key_values=cache)
      steps = [model(ids[:, t:t + 1], past_key_values=cache).logits[:, -1]
               for t in range(700, 708)]
      logits[run] = torch.stack(steps).float().cpu().numpy()
  rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
  assert rel(logits[impl], logits["xla"]) < 0.02, rel(logits[impl], logits["xla"])
  assert rel(logits["xla"], logits["exact"]) < 0.1, rel(logits["xla"], logits["exact"])
