"""Sharded decode (`tqjax.sharding`) against the single-device decode, on 4 fake CPU devices.

XLA fixes the number of CPU devices when jax starts and the rest of the suite runs with
one, so `test_four_device_suite` re-runs this file in two subprocesses at once (half of the
tests each, one core each) with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` and
LLVM's optimizations off (3-4x faster compiles of these tiny programs); there the other
tests run and the launcher skips itself, here it is the other way round.
"""

import dataclasses
import functools
import importlib
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tqjax import kvcache as kv
from tqjax import sharding as sh
from tqjax.dense_cache import DenseCache
from tqjax.models import Decoder, ModelConfig, Runner

DEVICES = 4
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
in_child = pytest.mark.skipif(jax.device_count() < DEVICES,
                              reason=f"runs in the {DEVICES}-device subprocesses")
# The tests of the first subprocess (about half of the compile time); the second runs the
# others.
FIRST = ("test_sharded_decode_equals_single_device[dense-tied-2x2]",
         "test_sharded_decode_equals_single_device[k4v4-xla-1x4]")
generate_lib = importlib.import_module("tqjax.models.generate")

# H = 12 query heads over K = 4 KV heads (G = 3); every split dimension divides by 4.
QWEN = ModelConfig(model_type="qwen2", vocab_size=96, hidden_size=48, intermediate_size=44,
                   num_layers=2, num_heads=12, num_kv_heads=4, head_dim=32, qkv_bias=True)
LLAMA_TIED = ModelConfig(model_type="llama", vocab_size=96, hidden_size=48,
                         intermediate_size=44, num_layers=2, num_heads=12, num_kv_heads=4,
                         head_dim=32, tie_word_embeddings=True)
PROMPT, CHUNK, STEPS = 37, 3, 6  # window 16 + flush 8: the last step flushes
CAPACITY = 61


@functools.cache
def random_runner(config: ModelConfig) -> Runner:
  return Runner.from_model(Decoder(config, rngs=nnx.Rngs(0)))


@pytest.mark.skipif(jax.device_count() >= DEVICES, reason="the launcher runs in the parent")
def test_four_device_suite():
  flags = (f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE} "
           f"--xla_force_host_platform_device_count={DEVICES}")
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.path.relpath(os.path.abspath(__file__), root)  # as pytest writes node ids
  first = [f"{path}::{name}" for name in FIRST]
  parts = (first, [path, *(f"--deselect={n}" for n in first)])
  procs = [subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *part],
                            env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for part in parts]
  passed = 0
  for proc in procs:
    out = proc.communicate(timeout=900)[0]
    summary = out.strip().splitlines()[-1]
    assert proc.returncode == 0, out[-8000:]
    assert not re.search(r"failed|error", summary), out[-8000:]
    passed += int(re.search(r"(\d+) passed", summary).group(1))
  assert passed >= 9


def run_protocol(runner: Runner, prefill, convert, tokens):
  """Prefill, convert, a chunk of CHUNK tokens, then STEPS teacher-forced decode steps:
  (the last-token logits of each call [B, V], the caches)."""
  logits, caches = prefill(runner, tokens[:, :PROMPT])
  caches = convert(caches)
  out = [logits[:, -1]]
  logits, caches = runner.forward(tokens[:, PROMPT:PROMPT + CHUNK], caches)
  out.append(logits[:, -1])
  for i in range(PROMPT + CHUNK, PROMPT + CHUNK + STEPS):
    logits, caches = runner.forward(tokens[:, i:i + 1], caches)
    out.append(logits[:, -1])
  return [np.asarray(x) for x in out], caches


def assert_laid_out(caches, mesh, batch, num_kv_heads):
  data, model = mesh.shape["data"], mesh.shape["model"]
  for cache in caches:
    assert isinstance(cache, sh.ShardedCache)
    leaves = jax.tree.leaves(cache.cache)
    expected = jax.tree.leaves(cache.shardings())
    assert len(leaves) == len(expected)
    for leaf, sharding in zip(leaves, expected):
      if leaf.size == 0:  # an empty buffer (e.g. no sink tokens): XLA lays it out as it likes
        continue
      assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (leaf.shape, leaf.sharding, sharding)
    big = cache.cache.k if isinstance(cache.cache, DenseCache) else cache.cache.k_codes[0]
    assert {s.data.shape[:2] for s in big.addressable_shards} == {(batch // data, num_kv_heads // model)}
    assert len({s.device for s in big.addressable_shards}) == DEVICES


@in_child
@pytest.mark.parametrize("config,preset,implementation,data,batch", [
    (LLAMA_TIED, None, "xla", 2, 2),
    (QWEN, "k4v4", "xla", 1, 3),
    # An outlier split (two segments); one layer: the interpreted kernel compiles slowly.
    (dataclasses.replace(QWEN, num_layers=1), "k3.5v3.5", "pallas-interpret", 2, 4),
], ids=["dense-tied-2x2", "k4v4-xla-1x4", "k3.5v3.5-pallas-2x2"])
def test_sharded_decode_equals_single_device(config, preset, implementation, data, batch):
  rng = np.random.default_rng(11)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, PROMPT + CHUNK + STEPS)), jnp.int32)
  # A small window: the compressed region holds most tokens and the decode steps flush.
  cache_config = None if preset is None else kv.preset(preset, window=16, flush_block=8)
  mesh = sh.make_mesh(data=data)
  assert dict(mesh.shape) == {"data": data, "model": DEVICES // data}
  runner = random_runner(config)
  sharded = sh.shard_params(runner, mesh)

  options = dict(implementation=implementation)
  single, single_caches = run_protocol(
      runner, lambda r, t: r.prefill(t, CAPACITY),
      jax.jit(lambda c: c if preset is None else kv.convert_caches(c, cache_config, **options)),
      tokens)
  multi, multi_caches = run_protocol(
      # the sharded prefill in steps of 16, 16 and 5 tokens (`Runner.forward`'s chunk)
      sharded, lambda r, t: sh.prefill(r, t, CAPACITY, mesh, chunk=16),
      lambda c: c if preset is None else sh.convert_caches(c, cache_config, **options),
      tokens)
  # Float32 sums in another order; a compressed cache also rounds its scales to float16,
  # where a last-bit difference can flip one rounding (5e-4 on that token's scale).
  tolerance = 1e-5 if preset is None else 2e-4
  for step, (m, s) in enumerate(zip(multi, single)):
    rel = np.linalg.norm(m - s) / np.linalg.norm(s)
    assert rel < tolerance, (step, rel)

  assert_laid_out(multi_caches, mesh, batch, config.num_kv_heads)
  if preset is not None:  # the flushes happened: tokens went from the window to the codes
    assert int(multi_caches[0].cache.compressed[0]) > PROMPT - 16
  qkv_kernel = sharded.state["layers"][0]["self_attn"]["qkv_proj"]["kernel"][...]
  heads = config.num_heads + 2 * config.num_kv_heads
  assert {s.data.shape for s in qkv_kernel.addressable_shards} == {
      (config.hidden_size, heads * config.head_dim // mesh.shape["model"])}


def collective_sizes(hlo: str) -> list[int]:
  """Per collective op of a compiled HLO module, the element count of its result(s)."""
  sizes = []
  ops = r"(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(-start)?\("
  for line in hlo.splitlines():
    match = re.match(r"\s*(ROOT )?%\S+ = (.+?) " + ops, line)
    if match:
      shapes = re.findall(r"\w+\[([\d,]*)\]", match.group(2))
      sizes.append(sum(int(np.prod([int(d) for d in dims.split(",") if d])) for dims in shapes))
  return sizes


@in_child
def test_decode_step_moves_no_cache_data_between_devices():
  """Per-shard attention and the layouts of weights and caches keep the collectives of a
  decode step few and activation-sized: an all-reduce of [B, 1, hidden] after each
  row-parallel projection (2 per layer) and after the vocabulary-parallel embedding, the
  window-flush flag, the argmax over vocabulary shards (a value and an index)."""
  mesh = sh.make_mesh(data=2)
  runner = sh.shard_params(random_runner(QWEN), mesh)
  capacity = 211
  tokens = np.random.default_rng(2).integers(0, QWEN.vocab_size, (2, PROMPT))
  _, caches = sh.prefill(runner, tokens, capacity, mesh)
  caches = sh.convert_caches(caches, kv.preset("k4v4", window=16, flush_block=8),
                             implementation="xla")
  step = generate_lib._decode.lower(
      runner.graph, runner.params, sh.shard_tokens(tokens[:, :1], mesh), caches,
      jax.random.key(0), temperature=0.0, top_k=None, top_p=None).compile()
  sizes = collective_sizes(step.as_text())
  assert sizes, "expected the all-reduces of the row-parallel layers"
  # At most one token's hidden features per row (B / data = 1 here): nothing cache-sized
  # (>= capacity elements per device), no weights, no full logits.
  assert max(sizes) <= QWEN.hidden_size, sorted(sizes)
  assert len(sizes) <= 2 * QWEN.num_layers + 4, sorted(sizes)


@in_child
def test_pallas_kernel_lowers_for_cuda_with_local_shapes():
  """Under shard_map the Triton kernel is lowered for one shard: its grid is (B / data,
  K / model, splits)."""
  b, kh, g, d = 4, 4, 3, 64
  mesh = sh.make_mesh(data=2)
  (cache,) = sh.build_caches(
      lambda: [kv.TurboQuantCache.init(kv.preset("k4v4"), layer=0, batch=b, num_kv_heads=kh,
                                       head_dim=d, capacity=256, implementation="pallas")], mesh)
  assert_laid_out([cache], mesh, b, kh)
  q = jnp.zeros((b, 1, kh * g, d), jnp.float32)
  text = jax.jit(lambda c, q: c.attend(q, scale=0.125)).trace(cache, q).lower(
      lowering_platforms=("cuda",)).as_text()
  calls = [line for line in text.splitlines() if "__gpu$xla.gpu.triton" in line and "grid_x" in line]
  assert len(calls) == 1, calls
  grid = [int(re.search(rf"grid_{a} = (\d+)", calls[0]).group(1)) for a in "xyz"]
  assert grid[:2] == [b // 2, kh // 2], grid


@in_child
def test_cli_checks_and_times(monkeypatch, capsys):
  monkeypatch.setattr(ModelConfig, "qwen2_5_7b", classmethod(lambda cls: QWEN))
  rc = sh.main(["--devices", "4", "--data", "2", "--layers", "1", "--batch", "2",
                "--prompt-len", "29", "--prefill-chunk", "11", "--steps", "2", "--time-steps", "2", "--presets", "k4v4",
                "--window", "8", "--dtype", "float32"])
  out = capsys.readouterr().out
  assert rc == 0, out
  result = json.loads(out.strip().splitlines()[-1])
  assert result["ok"] and result["model"] == 2 and result["max_rel_logit_error"] < 1e-4
  assert result["prefill_chunk"] == 11
  assert result["sharded_step_ms"] > 0 and result["single_step_ms"] > 0
  assert result["greedy_tokens_equal"]  # Runner.decode_step on sharded weights and caches


@in_child
def test_shard_caches_moves_filled_caches():
  rng = np.random.default_rng(5)
  mesh = sh.make_mesh(data=2)
  dense = DenseCache.init(2, 4, 16, 13).update(
      *(jnp.asarray(rng.standard_normal((2, 7, 4, 16)), jnp.float32) for _ in range(2)),
      jnp.asarray(rng.standard_normal((2, 7, 12, 16)), jnp.float32))
  (cache,) = sh.shard_caches([dense], mesh)
  assert_laid_out([cache], mesh, 2, 4)
  for got, want in zip(jax.tree.leaves(cache.cache), jax.tree.leaves(dense)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert cache.capacity == 13 and cache.memory_bytes() == dense.memory_bytes()


@in_child
def test_loops_over_cpu_meshes_wait_every_few_steps():
  # XLA's CPU client aborts when the parts of many steps dispatched ahead fill a device's
  # launch slots before an earlier step's part launches (its collectives time out): the
  # decode loops wait every CPU_STEPS_AHEAD steps there, and only there.
  x = jnp.zeros((4, 1), jnp.int32)
  assert generate_lib.max_steps_ahead(x) is None
  spread = jax.device_put(x, jax.sharding.NamedSharding(sh.make_mesh(data=2),
                                                        jax.sharding.PartitionSpec("data")))
  assert generate_lib.max_steps_ahead(spread) == generate_lib.CPU_STEPS_AHEAD


@in_child
def test_bad_layouts_raise():
  with pytest.raises(ValueError, match="needs 8 devices, got 4"):
    sh.make_mesh(model=4, data=2)
  mesh = sh.make_mesh(data=2)
  with pytest.raises(ValueError, match="num_kv_heads=3 must be divisible by the mesh axis 'model' of size 2"):
    DenseCache.init(2, 3, 16, 8).shardings(mesh)
  with pytest.raises(ValueError, match="batch=3 must be divisible by the mesh axis 'data' of size 2"):
    kv.TurboQuantCache.init(kv.preset("k4v4"), layer=0, batch=3, num_kv_heads=2, head_dim=32,
                            capacity=8).shardings(mesh)
  with pytest.raises(ValueError, match="num_kv_heads=2 must be divisible by the mesh axis 'model' of size 4"):
    sh.check_model(dataclasses.replace(QWEN, num_heads=6, num_kv_heads=2), sh.make_mesh(model=4))
  with pytest.raises(ValueError, match="intermediate_size=42 must be divisible by the mesh axis 'model' of size 4"):
    sh.check_model(dataclasses.replace(QWEN, intermediate_size=42), sh.make_mesh(model=4))
  with pytest.raises(ValueError, match="mesh axis 'heads' not in the mesh's axes"):
    DenseCache.init(2, 4, 16, 8).shardings(mesh, model_axis="heads")
