"""End to end: decode tokens/s and memory of whole models, bf16 cache vs TurboQuant presets.

    python -m bench.e2e --quick --out DIR    # GPU: the headline rows (Flax, Qwen2.5-7B shapes,
                                             #   B 8 and 1, 32K and 128K, bf16 vs k4v4)
    python -m bench.e2e --out DIR            # GPU: both models, B 1 and 8, 8K-128K, bf16 /
                                             #   k4v4 / k3v3, Flax and bridge paths
    python -m bench.e2e --models tiny --batches 2 --contexts 256,384 --budget-gib 0.02 \\
        --in-process --out DIR               # CPU: a tiny model (what tests/test_e2e.py runs)
    python bench/e2e.py --quick --devices 1,2 --out DIR   # 2 GPUs: the quick rows on one GPU,
                                             #   then tensor-parallel over two (kind "sharded")

**Flax path.** `tqjax.models.Decoder` at Qwen2.5-7B shapes (28 layers, 28 q / 4 kv heads,
head_dim 128) and Llama-3-8B shapes (32 layers, 32 / 8 heads), random bf16 weights. The
caches of a given context are built directly, never by a prefill: a `DenseCache` of random
bf16 K/V with ``lengths = context``, or a `TurboQuantCache` made by ``from_dense`` of a short
random dense cache (the key transforms, the exact window and sinks) whose code and scale
buffers are then replaced by random ones of the full capacity (``compressed = context -
window``). Nothing is timed on zeros. The compressed caches of all layers travel as one
`kvcache.StackedCache` (one set of arrays; ``--per-layer-caches``: a tuple of per-layer
caches, rows marked ``cache_layout``). Capacity = context + 256 (the decoded tokens). The
decode step is the Runner's jitted step (`tqjax.models.generate`: the model over all
layers, greedy sampling, caches donated), one program per token, compiled ahead of time so
that its compile time and memory analysis are known before anything is allocated;
compressed caches run the fused Pallas kernel on the GPU (``implementation="pallas"``) and
the jnp path on the CPU (``--implementation``; a preset written ``k4v4@mosaic`` takes the
named implementation for its rows, so kernels compare in one run). Each row: warm-up steps, then ``--steps`` steps each timed from
dispatch to the next token being ready; tokens/s = batch / median step time. The default
32 steps hold exactly one window flush of a compressed cache (F = 32 tokens), so the mean
is the amortized step time; the median leaves the flush step out. Then ``--steps`` more
dispatched back to back with one wait at the end (``step_ms_pipelined``: no host gap
between steps) and, with ``--profile-dir``, a `jax.profiler` trace of a few more.

Programs are lowered in this thread and compiled by a thread pool (XLA compiles without
the GIL); compile seconds are per program, measured while others compiled alongside.

**Several devices** (``--devices 1,2``, Flax path): the 1-device rows run first (the
reference), then for each count N > 1 every (batch, context, preset) again tensor-parallel
over N devices (kind ``"sharded"``; `tqjax.sharding`: a (data 1, model N) mesh, weights
column/row-parallel, each cache split over KV heads with attention per shard, the Pallas
kernel on each GPU's shard): the same weights, the same random caches (built directly in
their sharded layout: the same values, threefry bits do not depend on the layout), the same
tokens, steps compiled ahead of time in the pool. Every row first decodes ``--check-steps``
untimed steps and keeps their greedy tokens (``check_tokens``); a sharded row's check steps
are fed the 1-device row's tokens, ``tokens_match`` is the share it reproduces (one means
the same tokens; in bf16 an isolated miss is a near-tie rounded the other way, since the
row-parallel sums add in another order). ``scaling`` = its tokens/s over the 1-device
row's; memory per device: ``cache_bytes_per_device``, ``weights_bytes_per_device`` and
each device's allocator statistics (``memory.per_device``). The fit rows are 1-device only.

**Longest context in a budget** (``kind="fit"``), per model, batch and preset: bytes of the
caches as a function of capacity (exact: the shapes of a cache at two capacities, the same
numbers `memory_bytes()` gives), the weights, and the step's temporaries (the compiled
programs' `memory_analysis()` at the contexts run, linear in the capacity) give the longest
context whose weights + caches + temporaries fit ``--budget-gib`` (default: the device
allocator's limit less ``--headroom-gib``). The presets in ``--verify`` are then allocated
at that context and decoded for a few steps.

**Bridge path.** transformers `Qwen2ForCausalLM` / `LlamaForCausalLM` at the same shapes
(random bf16 weights, torch on CUDA) through `bench.bridge.Bench`: stock `DynamicCache` and
`StaticCache` vs `bridge.TurboQuantHFCache` (exact and each preset), caches of random
contents built directly as above (for the bridge: JAX caches put into its layers). Its
correctness check (`Bench.check`: a real prefill, exact bridge vs stock logits) runs once
per model at a small context. On the GPU with both paths each runs in its own process:
JAX's allocator keeps what it freed, which torch could not get back.

**Memory numbers** (``memory`` of a row): ``bytes_in_use_after_build`` = the allocator's
bytes in use with weights and caches allocated (before the first step);
``step_temp_bytes`` / ``step_output_bytes`` / ``step_alias_bytes`` = the compiled step's
`memory_analysis()`; ``estimated_peak_bytes`` = bytes in use after build + temporaries +
outputs not aliased to donated inputs; ``peak_bytes_in_use`` = the allocator's raw peak
since the process started (it does not reset; it is the row's peak only when it grew during
the row, ``peak_grew_in_row``). Cache bytes are `memory_bytes()` of the allocated caches;
``bits_per_coordinate`` is the preset's long-context storage rate.

Out-of-memory configurations are estimated before allocating and recorded as skipped with
the reason (allocation errors are caught as well). ``e2e.json`` in ``--out`` is rewritten
after every row, merged with the rows of earlier runs into the same folder (a row is
replaced only by the same configuration: split a long run into several calls). A short
table and the issue's targets are printed last.
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
  sys.path.pop(0)  # run as `python bench/e2e.py`, this folder would shadow packages (bridge)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from concurrent.futures import Future, ThreadPoolExecutor  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from tqjax import kvcache  # noqa: E402
from tqjax import sharding as sharding_lib  # noqa: E402
from tqjax.dense_cache import DenseCache  # noqa: E402
from tqjax.models import Decoder, ModelConfig, Runner  # noqa: E402
from tqjax.models.generate import _decode_changed, changed_leaves, max_steps_ahead  # noqa: E402

BF16 = "bf16"  # the exact DenseCache in the model's dtype
MARGIN = 256  # capacity beyond the context: the decoded tokens
PATHS = ("flax", "bridge")
GIB = 2**30
# Budgets for each path's JAX allocator (used only when unset, and only on a GPU).
MEM_FRACTION = {"flax": "0.95", "bridge": "0.85"}
DEFAULTS = dict(models="qwen2.5-7b,llama3-8b", batches="1,8", contexts="8192,32768,131072",
                presets="bf16,k4v4,k3v3", paths="flax,bridge", verify=None)
QUICK = dict(models="qwen2.5-7b", batches="8,1", contexts="32768,131072", presets="bf16,k4v4",
             paths="flax", verify="bf16,k4v4")
TARGETS = dict(b8_32k=1.4, b8_128k=2.5, b1_min=1.0, context=3.8)


# ---- model shapes ----


def tiny_config() -> ModelConfig:
  """A 2-layer Qwen2-style model for CPU tests (prime-ish sizes, G = 3)."""
  return ModelConfig(model_type="qwen2", vocab_size=131, hidden_size=96, intermediate_size=160,
                     num_layers=2, num_heads=6, num_kv_heads=2, head_dim=64, qkv_bias=True,
                     max_position_embeddings=1 << 20)


MODELS: dict[str, Callable[[], ModelConfig]] = {
  "qwen2.5-7b": ModelConfig.qwen2_5_7b, "llama3-8b": ModelConfig.llama3_8b, "tiny": tiny_config,
  # The tiny model with a vocabulary that splits over 2 devices (tensor-parallel CPU tests).
  "tiny-tp": lambda: dataclasses.replace(tiny_config(), vocab_size=132),
}


def model_config(name: str) -> ModelConfig:
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
  return MODELS[name]()


def hf_config(config: ModelConfig) -> Any:
  """The transformers config of the same shapes (Qwen2Config or LlamaConfig)."""
  import transformers

  common = dict(
    vocab_size=config.vocab_size, hidden_size=config.hidden_size,
    intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
    num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
    head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
    max_position_embeddings=max(config.max_position_embeddings, 1 << 20),
    tie_word_embeddings=config.tie_word_embeddings)
  if config.model_type == "qwen2":
    return transformers.Qwen2Config(**common)
  if config.model_type == "llama":
    return transformers.LlamaConfig(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias,
                                    **common)
  raise ValueError(f"no transformers config for model_type={config.model_type!r}")


def random_runner(config: ModelConfig, dtype=jnp.bfloat16, seed: int = 0,
                  mesh: Mesh | None = None) -> Runner:
  """A `Runner` of the decoder with random weights: kernels uniform with variance 1/fan_in,
  embeddings of unit variance, norms 1, biases in ±0.1, drawn on the device.

  The parameters of one layer are drawn by one jitted program, shared by every layer (and
  one more for the embeddings and the final norm): one program drawing all ~340 parameters
  of a 7B model took XLA 27 s to compile on 2 CPU cores and about 100 s on the H200 host.
  With ``mesh`` the parameters are created directly in their tensor-parallel layout
  (`tqjax.sharding.param_shardings`), each device drawing only its shard; threefry random
  bits do not depend on the layout (``jax_threefry_partitionable``), so the values equal
  those of the single-device runner of the same seed."""
  if mesh is not None and not jax.config.jax_threefry_partitionable:
    raise RuntimeError("sharded random weights equal the single-device ones only with "
                       "jax_threefry_partitionable=True (the default since jax 0.5)")
  abstract = Runner.from_model(nnx.eval_shape(
    lambda: Decoder(config, dtype=dtype, rngs=nnx.Rngs(0))))  # params: ShapeDtypeStructs
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(abstract.state)[0]]
  shardings = ([None] * len(paths) if mesh is None else
               sharding_lib.param_shardings(abstract, mesh))
  groups: dict[Any, list[int]] = {}  # a layer's parameters (or the others) -> leaf indices
  draws = []  # per leaf: (kind, shape, dtype, bound, sharding)
  for i, (path, leaf, sharding) in enumerate(zip(paths, abstract.params, shardings)):
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      kind, bound = "ones", 0.0
    elif "embedding" in name:
      kind, bound = "uniform", math.sqrt(3)
    elif len(leaf.shape) == 2:  # kernels [in, out]
      kind, bound = "uniform", math.sqrt(3 / leaf.shape[0])
    else:  # biases
      kind, bound = "uniform", 0.1
    draws.append((kind, leaf.shape, jnp.dtype(leaf.dtype), bound, sharding))
    names = _path_keys(path)
    group = ("layer", names[names.index("layers") + 1]) if "layers" in names else ("top",)
    groups.setdefault(group, []).append(i)

  programs: dict[tuple, Callable[..., tuple[jax.Array, ...]]] = {}

  def program(signature: tuple) -> Callable[..., tuple[jax.Array, ...]]:
    if signature not in programs:
      def fill(root, indices):  # leaf i from fold_in(root, i), whatever its group
        out = []
        for j, (kind, shape, dt, bound, _) in enumerate(signature):
          key = jax.random.fold_in(root, indices[j])
          out.append(jnp.ones(shape, dt) if kind == "ones" else
                     jax.random.uniform(key, shape, dt, -bound, bound))
        return tuple(out)
      programs[signature] = jax.jit(fill, out_shardings=tuple(d[-1] for d in signature))
    return programs[signature]

  root = jax.random.key(seed)
  leaves: list[Any] = [None] * len(paths)
  for indices in groups.values():
    drawn = program(tuple(draws[i] for i in indices))(root, jnp.asarray(indices, jnp.uint32))
    for i, x in zip(indices, drawn):
      leaves[i] = x
  return dataclasses.replace(abstract, params=tuple(leaves))


def _path_keys(path) -> list[Any]:
  return [getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in path]


# ---- caches of a given context, random contents ----


def split_preset(preset: str) -> tuple[str, str | None]:
  """"k4v4@mosaic" -> ("k4v4", "mosaic"): a preset may name the implementation of its
  compressed caches (Flax path), so one run compares kernels; plain names -> (name, None)."""
  name, at, impl = preset.partition("@")
  if not at:
    return preset, None
  if name == BF16 or impl not in kvcache.IMPLEMENTATIONS:
    raise SystemExit(f"--presets: {preset!r}: a TurboQuant preset may take @ one of "
                     f"{kvcache.IMPLEMENTATIONS} (bf16 none)")
  return name, impl


def cache_config(preset: str) -> kvcache.CacheConfig | None:
  """None for the exact bf16 cache, else the named TurboQuant preset (any @implementation
  stripped)."""
  name, _ = split_preset(preset)
  return None if name == BF16 else kvcache.preset(name)


def _random_dense(key, context, *, batch: int, num_kv_heads: int, head_dim: int,
                  capacity: int, dtype) -> DenseCache:
  """A DenseCache [B, K, capacity, D] of uniform(-2, 2) K/V, lengths = context."""
  kk, kv = jax.random.split(key)
  shape = (batch, num_kv_heads, capacity, head_dim)
  cache = DenseCache.init(batch, num_kv_heads, head_dim, capacity, dtype)
  return dataclasses.replace(
    cache, k=jax.random.uniform(kk, shape, dtype, -2.0, 2.0),
    v=jax.random.uniform(kv, shape, dtype, -2.0, 2.0),
    lengths=jnp.full((batch,), context, jnp.int32))


def short_tokens(config: kvcache.CacheConfig) -> int:
  """Tokens of the short dense cache a compressed one is made from."""
  return config.sink_tokens + config.window + config.flush_block


def _random_turboquant(key, context, *, config: kvcache.CacheConfig, layer: int, batch: int,
                       num_kv_heads: int, head_dim: int, capacity: int, dtype,
                       implementation: str) -> kvcache.TurboQuantCache:
  """A TurboQuantCache holding `context` tokens: transforms, window and sinks from
  ``from_dense`` of a short random dense cache, random codes and scales at full capacity."""
  k_short, k_codes, k_scales = jax.random.split(key, 3)
  short = short_tokens(config)
  dense = _random_dense(k_short, short, batch=batch, num_kv_heads=num_kv_heads,
                        head_dim=head_dim, capacity=short, dtype=dtype)
  cache = kvcache.TurboQuantCache.from_dense(dense, config, layer=layer,
                                             implementation=implementation)
  held = cache.lengths - cache.compressed  # [B] tokens in the exact window

  def codes(buffers, key):
    keys = jax.random.split(key, len(buffers))
    return tuple(jax.random.bits(k, x.shape[:2] + (capacity,) + x.shape[3:], jnp.uint8)
                 for k, x in zip(keys, buffers))

  def scales(buffers, key):  # positive, about the norm of a D-dim vector of unit entries
    keys = jax.random.split(key, len(buffers))
    root = math.sqrt(head_dim)
    return tuple(jax.random.uniform(k, x.shape[:2] + (capacity,), x.dtype, 0.5 * root,
                                    1.5 * root) for k, x in zip(keys, buffers))

  kc, vc = jax.random.split(k_codes)
  ks, vs = jax.random.split(k_scales)
  lengths = jnp.full((batch,), context, jnp.int32)
  return dataclasses.replace(
    cache, k_codes=codes(cache.k_codes, kc), v_codes=codes(cache.v_codes, vc),
    k_scales=scales(cache.k_scales, ks), v_scales=scales(cache.v_scales, vs),
    lengths=lengths, compressed=lengths - held)


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """Which caches to build: preset, batch, capacity, for one model; with ``mesh``, laid out
  over it (`tqjax.sharding`: every [B, K, ...] array split over KV heads on the ``model``
  axis) and wrapped in `ShardedCache` (attention per shard)."""
  model: ModelConfig
  preset: str
  batch: int
  capacity: int
  dtype: Any
  implementation: str  # of compressed caches
  mesh: Mesh | None = None
  stack: bool = True  # compressed caches as one `kvcache.StackedCache` (without a mesh)

  @property
  def stacks(self) -> bool:
    return self.stack and self.mesh is None and cache_config(self.preset) is not None

  @property
  def devices(self) -> list[jax.Device]:
    return [jax.devices()[0]] if self.mesh is None else list(self.mesh.devices.flat)

  def replicated(self) -> jax.sharding.Sharding:
    """Where the step's tokens and key live."""
    if self.mesh is None:
      return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(self.mesh, PartitionSpec())

  def builder(self, layer: int) -> Callable[..., Any]:
    """fn(key, context) -> the cache of `layer` (not jitted)."""
    m = self.model
    shapes = dict(batch=self.batch, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                  capacity=self.capacity, dtype=self.dtype)
    config = cache_config(self.preset)
    if config is None:
      return functools.partial(_random_dense, **shapes)
    implementation = split_preset(self.preset)[1] or self.implementation
    return functools.partial(_random_turboquant, config=config, layer=layer,
                             implementation=implementation, **shapes)

  def builder_group(self, layer: int) -> Any:
    """Layers with equal groups share one compiled builder (equal quantizer configs)."""
    config = cache_config(self.preset)
    return None if config is None else config.quantizers(layer, self.model.head_dim)

  def unsharded(self) -> tuple[Any, ...]:
    """The per-layer caches as ShapeDtypeStructs, without a layout (traced once per group)."""
    shapes: dict[Any, Any] = {}
    out = []
    for layer in range(self.model.num_layers):
      group = self.builder_group(layer)
      if group not in shapes:
        shapes[group] = jax.eval_shape(self.builder(layer), jax.random.key(0), jnp.int32(0))
      out.append(shapes[group])
    return tuple(out)

  def abstract(self) -> tuple[Any, ...]:
    """The caches as the decode step takes them, as ShapeDtypeStructs (nothing allocated):
    with a mesh, `ShardedCache`s whose leaves carry their shardings."""
    shapes = self.unsharded()
    if self.stacks:
      return jax.eval_shape(kvcache.StackedCache.stack, shapes)
    if self.mesh is None:
      return shapes
    return tuple(sharding_lib.ShardedCache(jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), c,
      c.shardings(self.mesh)), self.mesh) for c in shapes)

  def check_context(self, context: int, steps: int) -> None:
    config = cache_config(self.preset)
    if config is not None and context <= short_tokens(config):
      raise ValueError(f"{context=} must exceed the {short_tokens(config)} tokens of sinks, "
                       f"window and flush block of preset {self.preset!r}")
    if context + steps > self.capacity:
      raise ValueError(f"{context=} + {steps} decoded tokens exceed capacity={self.capacity}")


def tree_nbytes(tree: Any, *, per_device: bool = False) -> int:
  """Bytes of every array (or ShapeDtypeStruct) leaf: what `memory_bytes()` counts; with
  ``per_device``, of one device's shard of each (leaves with a sharding split evenly)."""
  def shape(x):
    sharding = getattr(x, "sharding", None)
    return sharding.shard_shape(x.shape) if per_device and sharding is not None else x.shape
  return int(sum(math.prod(shape(x)) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype")))


def bytes_per_device(tree: Any) -> dict[int, int]:
  """Bytes of the arrays' shards held by each device (device id -> bytes)."""
  out: dict[int, int] = {}
  for x in jax.tree.leaves(tree):
    for shard in getattr(x, "addressable_shards", ()):
      out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
  return out


def cache_memory_bytes(caches: Sequence[Any] | kvcache.StackedCache) -> int:
  if isinstance(caches, kvcache.StackedCache):
    return caches.memory_bytes()
  return int(sum(c.memory_bytes() for c in caches))


@dataclasses.dataclass(frozen=True)
class CacheLayout:
  """bytes(capacity) = fixed + per_token * capacity, all layers and batch rows (with
  ``per_device``: on each device of the spec's mesh)."""
  fixed: int
  per_token: int  # bytes per position of the capacity, all layers and rows

  @classmethod
  def measure(cls, spec: CacheSpec, c1: int = 1024, c2: int = 2048, *,
              per_device: bool = False) -> CacheLayout:
    b1 = tree_nbytes(dataclasses.replace(spec, capacity=c1).abstract(), per_device=per_device)
    b2 = tree_nbytes(dataclasses.replace(spec, capacity=c2).abstract(), per_device=per_device)
    per_token, rest = divmod(b2 - b1, c2 - c1)
    if rest:
      raise ValueError(f"cache bytes are not linear in the capacity: {b1=} at {c1}, {b2=} at {c2}")
    return cls(fixed=b1 - per_token * c1, per_token=per_token)

  def bytes(self, capacity: int) -> int:
    return self.fixed + self.per_token * capacity


def max_capacity_int32(spec: CacheSpec) -> int:
  """The largest capacity at which every cache buffer holds fewer than 2**31 elements
  (kernels and XLA may index a buffer with int32)."""
  small = jax.tree.leaves(dataclasses.replace(spec, capacity=1024).abstract())
  large = jax.tree.leaves(dataclasses.replace(spec, capacity=2048).abstract())
  limit = sys.maxsize
  for x, y in zip(small, large):
    slope = (math.prod(y.shape) - math.prod(x.shape)) // 1024
    if slope > 0:
      limit = min(limit, (2**31 - 1 - (math.prod(x.shape) - slope * 1024)) // slope)
  return limit


# ---- programs: lowered here, compiled in a pool ----


GREEDY = dict(temperature=0.0, top_k=None, top_p=None)


class StepFunction:
  """The Runner's greedy decode step as `Runner.decode_step` runs it: only the cache arrays
  the step writes are donated and returned (`tqjax.models.generate.changed_leaves`),
  compiled ahead of time. ``lower(params, tokens, caches, key)`` (caches may be abstract)
  -> an object whose ``compile()`` gives fn(params, tokens [B, 1], caches, key) ->
  (next tokens [B], caches, key)."""

  def __init__(self, runner: Runner):
    self.runner = runner

  def lower(self, params, tokens, caches, key, **lower_kwargs) -> _LoweredStep:
    """``lower_kwargs`` go to `jax.stages.Traced.lower` (e.g. ``lowering_platforms``)."""
    return _LoweredStep(self.runner, params, tokens, caches, key, **lower_kwargs)


class _LoweredStep:
  def __init__(self, runner: Runner, params, tokens, caches, key, **lower_kwargs):
    self.treedef = jax.tree.structure(caches)
    self.changed = changed_leaves(runner.graph, params, tokens, caches, key, **GREEDY)
    leaves = jax.tree.leaves(caches)
    kept = tuple(x for x, c in zip(leaves, self.changed) if not c)
    moved = tuple(x for x, c in zip(leaves, self.changed) if c)
    self.lowered = _decode_changed.trace(
      runner.graph, params, tokens, kept, moved, key, treedef=self.treedef,
      changed=self.changed, **GREEDY).lower(**lower_kwargs)

  def compile(self) -> _CompiledStep:
    return _CompiledStep(self.lowered.compile(), self.treedef, self.changed)


class _CompiledStep:
  def __init__(self, compiled, treedef, changed: tuple[bool, ...]):
    self.compiled, self.treedef, self.changed = compiled, treedef, changed

  def memory_analysis(self):
    return self.compiled.memory_analysis()

  def __call__(self, params, tokens, caches, key):
    leaves = self.treedef.flatten_up_to(caches)
    kept = tuple(x for x, c in zip(leaves, self.changed) if not c)
    moved = tuple(x for x, c in zip(leaves, self.changed) if c)
    nxt, moved, key = self.compiled(params, tokens, kept, moved, key)
    moved = iter(moved)
    return nxt, self.treedef.unflatten(
      [next(moved) if c else x for x, c in zip(leaves, self.changed)]), key


def step_function(runner: Runner) -> StepFunction:
  return StepFunction(runner)


def memory_analysis(compiled: Any) -> dict[str, int] | None:
  try:
    ma = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    return None
  if ma is None:
    return None
  names = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
           "alias_size_in_bytes", "generated_code_size_in_bytes")
  return {n.replace("_size_in_bytes", "_bytes"): int(getattr(ma, n, 0) or 0) for n in names}


class Program:
  """The compiled decode step and cache builders of one (preset, batch, capacity), on one
  device or, with the spec's mesh, tensor-parallel (``runner`` sharded over the same mesh:
  `tqjax.sharding.shard_params`); the builders then create each cache directly in its
  sharded layout."""

  def __init__(self, spec: CacheSpec, runner: Runner, step: Callable[..., Any]):
    self.spec = spec
    t0 = time.perf_counter()
    sharding = None if spec.mesh is None else spec.replicated()
    tokens = jax.ShapeDtypeStruct((spec.batch, 1), jnp.int32, sharding=sharding)
    # Compressed windows are flushed by `kvcache.FlushSchedule` between steps (no branch).
    abstract = kvcache.with_auto_flush(spec.abstract(), False)
    self.step_lowered = step.lower(runner.params, tokens, abstract,
                                   self.place(jax.random.key(0)))
    self.builder_lowered: dict[Any, Any] = {}
    self.layer_group = []
    unsharded = spec.unsharded()
    for layer in range(spec.model.num_layers):
      group = spec.builder_group(layer)
      self.layer_group.append(group)
      if group not in self.builder_lowered:
        out = None if spec.mesh is None else unsharded[layer].shardings(spec.mesh)
        self.builder_lowered[group] = jax.jit(spec.builder(layer), out_shardings=out).lower(
          jax.random.key(0), jnp.int32(0))
    self.lower_s = time.perf_counter() - t0
    self.compile_s: float | None = None
    self.step = None
    self.builders: dict[Any, Any] = {}
    self.memory: dict[str, int] | None = None

  def compile(self) -> Program:
    t0 = time.perf_counter()
    self.step = self.step_lowered.compile()
    self.builders = {g: low.compile() for g, low in self.builder_lowered.items()}
    self.compile_s = time.perf_counter() - t0
    self.memory = memory_analysis(self.step)
    self.step_lowered = self.builder_lowered = None  # free the modules
    return self

  def step_extra_bytes(self) -> int | None:
    """Temporaries + outputs not aliased to donated inputs (None: unknown)."""
    if self.memory is None:
      return None
    m = self.memory
    return m["temp_bytes"] + max(m["output_bytes"] - m["alias_bytes"], 0)

  def place(self, x):
    """``x`` (tokens or a key) where the step takes it: as is on one device, replicated
    over the mesh."""
    return x if self.spec.mesh is None else jax.device_put(x, self.spec.replicated())

  def build(self, key, context: int) -> tuple[Any, ...]:
    """The caches (allocated) of `context` tokens, random contents: the same values with
    or without a mesh (threefry random bits do not depend on the layout)."""
    build_layer = lambda layer: self.builders[self.layer_group[layer]](
      jax.random.fold_in(key, layer), jnp.int32(context))
    if self.spec.stacks:  # layer by layer into the stacked arrays: one layer's extra memory
      stacked = _zeros(self.spec.abstract())
      for layer in range(len(self.layer_group)):
        stacked = _put_layer(stacked, build_layer(layer), jnp.int32(layer))
      return kvcache.with_auto_flush(stacked, False)
    caches = tuple(build_layer(layer) for layer in range(len(self.layer_group)))
    if self.spec.mesh is not None:
      caches = tuple(sharding_lib.ShardedCache(c, self.spec.mesh) for c in caches)
    return kvcache.with_auto_flush(caches, False)


def _zeros(abstract: Any) -> Any:
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)


@functools.partial(jax.jit, donate_argnums=0)
def _put_layer(stacked: kvcache.StackedCache, cache: kvcache.TurboQuantCache,
               layer: jax.Array) -> kvcache.StackedCache:
  """``stacked`` with layer ``layer`` (traced: one program for all layers) set to ``cache``."""
  return kvcache.StackedCache(jax.tree.map(
    lambda s, c: jax.lax.dynamic_update_index_in_dim(s, c, layer, 0), stacked.layers, cache))


def compile_all(make: Sequence[Callable[[], Program]], workers: int
                ) -> tuple[list[Program | BaseException], float]:
  """Lowers each program here (tracing holds the GIL) and compiles it in a pool as soon as
  it is lowered. Returns the programs (or the error that stopped each) and the wall time."""
  t0 = time.perf_counter()
  futures: list[Future | BaseException] = []
  with ThreadPoolExecutor(max(1, workers)) as pool:
    for fn in make:
      try:
        futures.append(pool.submit(fn().compile))
      except Exception as e:  # lowering failed
        futures.append(e)
    out = []
    for f in futures:
      if isinstance(f, BaseException):
        out.append(f)
        continue
      try:
        out.append(f.result())
      except Exception as e:
        out.append(e)
  return out, time.perf_counter() - t0


# ---- device memory ----


def memory_stats(device: jax.Device | None = None) -> dict[str, int]:
  """The allocator's statistics of ``device`` (default: the first); empty on the CPU."""
  stats = (device or jax.devices()[0]).memory_stats() or {}
  keep = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit", "largest_alloc_size")
  return {k: int(stats[k]) for k in keep if k in stats}


def is_oom(error: BaseException) -> bool:
  text = f"{type(error).__name__}: {error}"
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                 "OutOfMemory", "CUDA_ERROR_OUT_OF_MEMORY"))


def error_text(error: BaseException) -> str:
  return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error) else ''}"


def free() -> None:
  gc.collect()


# ---- the results document ----


def row_key(row: dict) -> tuple:
  kind = row["kind"]
  if kind == "fit":
    return (kind, row["path"], row["model"], row["batch"], row["preset"])
  return (kind, row["path"], row["model"], row["batch"], row["context"],
          row.get("variant", row.get("preset")), row.get("devices", 1),
          row.get("cache_layout"))


def cache_layout(spec: CacheSpec) -> str | None:
  """How a row's compressed caches travel: "stacked" (one `kvcache.StackedCache`) or
  "per-layer" (a tuple of per-layer caches); None for the bf16 cache."""
  if cache_config(spec.preset) is None:
    return None
  return "stacked" if spec.stacks else "per-layer"


class Results:
  """e2e.json: rows (merged with earlier runs into the same folder), meta, targets."""

  def __init__(self, out: str, fresh: bool = False):
    os.makedirs(out, exist_ok=True)
    self.path = os.path.join(out, "e2e.json")
    self.doc: dict[str, Any] = dict(meta={}, notes=NOTES, rows=[], targets={})
    if not fresh and os.path.exists(self.path):
      with open(self.path) as f:
        old = json.load(f)
      self.doc["meta"] = old.get("meta", {})
      self.doc["rows"] = old.get("rows", [])

  @property
  def rows(self) -> list[dict]:
    return self.doc["rows"]

  def add(self, row: dict) -> None:
    key = row_key(row)
    self.doc["rows"] = [r for r in self.rows if row_key(r) != key] + [row]
    self.write()

  def merge(self, path: str) -> None:
    """Rows and meta of another e2e.json; its rows replace ours of the same configuration."""
    with open(path) as f:
      other = json.load(f)
    for name, meta in other.get("meta", {}).items():
      self.doc["meta"][name] = meta
    keys = {row_key(r) for r in other.get("rows", [])}
    self.doc["rows"] = [r for r in self.rows if row_key(r) not in keys] + other.get("rows", [])
    self.write()

  def set_meta(self, path: str, meta: dict) -> None:
    self.doc["meta"][path] = meta
    self.write()

  def write(self) -> None:
    annotate(self.rows)
    self.doc["targets"] = targets(self.rows)
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.doc, f, indent=1, default=float)
    os.replace(tmp, self.path)


NOTES = {
  "tokens_per_s": "batch / median step seconds (step = dispatch until the next tokens are ready)",
  "tokens_per_s_mean": "batch / mean step seconds over the timed steps (with --steps 32: one "
                       "window flush of a compressed cache included, amortized)",
  "tokens_per_s_pipelined": "batch / mean seconds of --steps more steps dispatched back to "
                            "back with one wait at the end (no host gap between steps)",
  "speedup_vs_bf16": "tokens_per_s / tokens_per_s of the bf16 row of the same path, model, "
                     "batch and context",
  "cache_bytes": "memory_bytes() of all layers' caches as allocated (capacity = context + 256)",
  "cache_bytes_per_token": "bytes one more position of capacity costs, per sequence, all "
                           "layers (keys and values)",
  "memory.bytes_in_use_after_build": "allocator bytes in use with weights and caches allocated",
  "memory.step_temp_bytes": "compiled decode step's memory_analysis() temporaries",
  "memory.estimated_peak_bytes": "bytes_in_use_after_build + temporaries + outputs not aliased",
  "memory.peak_bytes_in_use": "allocator's raw peak since process start (never reset)",
  "fit.max_context": "longest context (multiple of 256) with weights + caches(context + 256) + "
                     "step temporaries (linear fit over the contexts run) <= budget_bytes",
  "bridge.step_ms": "median seconds of one HF forward of one token (bench.bridge.Bench)",
  "sharded": "kind of the rows of --devices N > 1: the decode rows' configurations run "
             "tensor-parallel over N devices (tqjax.sharding: weights column/row-parallel, "
             "caches split over KV heads, attention per shard), same weights, caches and tokens",
  "check_tokens": "greedy tokens [B, check_steps] of the first steps (untimed, before warm-up)",
  "tokens_match": "sharded rows: share of their first check_steps greedy tokens equal to the "
                  "1-device row's check_tokens, each step fed the 1-device row's previous "
                  "token (teacher-forced: a near-tie flipped by bf16 rounding in another order "
                  "costs one token, not the rest of the row)",
  "scaling": "sharded rows: tokens_per_s / tokens_per_s of the 1-device decode row of the "
             "same model, batch, context and preset (scaling_pipelined: the same, pipelined)",
  "cache_bytes_per_device": "bytes of the caches' shards on each device of the row, in mesh "
                            "order",
  "memory.per_device": "allocator statistics of each device of the row (before the build, "
                       "after the build, after the steps)",
}


def annotate(rows: list[dict]) -> None:
  """Ratios against the baseline rows of the same configuration."""
  base: dict[tuple, dict] = {}
  for r in rows:
    if r.get("status") != "ok":
      continue
    if r["kind"] == "decode" and r["preset"] == BF16 and r.get("variant") in (None, "bridge-exact"):
      base[(r["path"], r["model"], r["batch"], r["context"])] = r
    if r["kind"] == "decode" and r.get("variant") in ("stock-static", "stock-dynamic"):
      base[(r["path"], r["model"], r["batch"], r["context"], r["variant"])] = r
  fits = {(r["path"], r["model"], r["batch"]): r for r in rows
          if r["kind"] == "fit" and r["preset"] == BF16 and r.get("max_context")}
  for r in rows:
    if r.get("status") != "ok":
      continue
    if r["kind"] == "decode":
      b = base.get((r["path"], r["model"], r["batch"], r["context"]))
      if b is not None:
        r["speedup_vs_bf16"] = r["tokens_per_s"] / b["tokens_per_s"]
      for variant in ("stock-static", "stock-dynamic"):
        s = base.get((r["path"], r["model"], r["batch"], r["context"], variant))
        if s is not None:
          r[f"speedup_vs_{variant.replace('-', '_')}"] = s["step_ms"] / r["step_ms"]
    elif r["kind"] == "fit":
      b = fits.get((r["path"], r["model"], r["batch"]))
      if b is not None and r.get("max_context"):
        r["context_ratio_vs_bf16"] = r["max_context"] / b["max_context"]
  single = {(r["path"], r["model"], r["batch"], r["context"], r["preset"]): r for r in rows
            if r["kind"] == "decode" and r.get("status") == "ok" and "variant" not in r}
  sharded_bf16 = {(r["path"], r["model"], r["batch"], r["context"], r["devices"]): r
                  for r in rows if r["kind"] == "sharded" and r.get("status") == "ok"
                  and r["preset"] == BF16}
  for r in rows:
    if r["kind"] != "sharded" or r.get("status") != "ok":
      continue
    one = single.get((r["path"], r["model"], r["batch"], r["context"], r["preset"]))
    if one is not None:
      r["scaling"] = r["tokens_per_s"] / one["tokens_per_s"]
      r["scaling_pipelined"] = one["step_ms_pipelined"] / r["step_ms_pipelined"]
    b = sharded_bf16.get((r["path"], r["model"], r["batch"], r["context"], r["devices"]))
    if b is not None:
      r["speedup_vs_bf16"] = r["tokens_per_s"] / b["tokens_per_s"]


def targets(rows: list[dict]) -> dict[str, Any]:
  """Issue 6's targets on the Flax path, per model present, for k4v4 and each k4v4@kernel
  (e.g. k4v4@mosaic) present: {model: {preset: {target: {value, target, met}}}}."""
  out: dict[str, Any] = {}
  ok = [r for r in rows if r.get("status") == "ok" and r["path"] == "flax"]
  for model in sorted({r["model"] for r in ok}):
    mine = [r for r in ok if r["model"] == model]
    out[model] = {}
    for preset in sorted({r["preset"] for r in mine if split_preset(r["preset"])[0] == "k4v4"}):
      dec = {(r["batch"], r["context"]): r.get("speedup_vs_bf16") for r in mine
             if r["kind"] == "decode" and r["preset"] == preset}
      fit = {r["batch"]: r.get("context_ratio_vs_bf16") for r in mine
             if r["kind"] == "fit" and r["preset"] == preset}
      t: dict[str, Any] = {}
      for name, context in (("b8_32k", 32768), ("b8_128k", 131072)):
        value = dec.get((8, context))
        t[name] = dict(value=value, target=TARGETS[name],
                       met=None if value is None else value >= TARGETS[name])
      b1 = [v for (b, _), v in dec.items() if b == 1 and v is not None]
      t["b1_min"] = dict(value=min(b1) if b1 else None, target=TARGETS["b1_min"],
                         met=min(b1) >= TARGETS["b1_min"] if b1 else None)
      ratios = [v for v in fit.values() if v is not None]
      t["context"] = dict(value=min(ratios) if ratios else None, target=TARGETS["context"],
                          met=min(ratios) >= TARGETS["context"] if ratios else None)
      out[model][preset] = t
  return out


# ---- the Flax path ----


def time_steps(step, params, tokens, caches, key, *, warmup: int, steps: int, vocab: int,
               profile_dir: str | None = None, profile_steps: int = 3, check_steps: int = 0,
               reference: np.ndarray | None = None,
               place: Callable[[jax.Array], jax.Array] = lambda x: x
               ) -> tuple[dict[str, Any], Any, int]:
  """Greedy decode steps: `check_steps` whose tokens are kept ("check": [B, check_steps];
  with `reference` [B, >= check_steps], step i + 1 is fed reference[:, i] instead of its
  own last token, placed by `place`), `warmup`, then `steps` each timed from dispatch until
  its tokens are ready (seconds in "synced"), then `steps` dispatched back to back with one
  wait at the end (mean seconds in "pipelined": no host gap between steps, as in a
  generation loop that does not look at the tokens), then, with `profile_dir`,
  `profile_steps` under `jax.profiler.trace`. A compressed cache's window is flushed
  between steps as `Runner.decode` does (`kvcache.FlushSchedule`; its program compiled
  before timing), inside the timed span of the step that needs it. Returns (timings, final
  caches, steps taken)."""
  schedule = kvcache.FlushSchedule(caches)
  caches = schedule.warm(caches)
  compiled_step = step

  def step(params, tokens, caches, key):
    return compiled_step(params, tokens, schedule.before_step(caches), key)

  checked = []
  for i in range(check_steps):
    nxt, caches, key = step(params, tokens, caches, key)
    checked.append(nxt)
    tokens = (nxt[:, None] if reference is None else
              place(jnp.asarray(reference[:, i:i + 1], jnp.int32)))
  synced = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    nxt, caches, key = step(params, tokens, caches, key)
    nxt.block_until_ready()
    if i >= warmup:
      synced.append(time.perf_counter() - t0)
    tokens = nxt[:, None]
  ahead = max_steps_ahead(tokens)
  t0 = time.perf_counter()
  for i in range(steps):
    nxt, caches, key = step(params, tokens, caches, key)
    tokens = nxt[:, None]
    if ahead and (i + 1) % ahead == 0:
      tokens.block_until_ready()
  tokens.block_until_ready()
  pipelined = (time.perf_counter() - t0) / steps
  taken = check_steps + warmup + 2 * steps
  if profile_dir:
    with jax.profiler.trace(profile_dir):
      for _ in range(profile_steps):
        nxt, caches, key = step(params, tokens, caches, key)
        tokens = nxt[:, None]
      tokens.block_until_ready()
    taken += profile_steps
  schedule.end(caches)  # checks the host's count of the windows against the caches
  host = np.asarray(tokens)
  if host.min() < 0 or host.max() >= vocab:
    raise RuntimeError(f"decoded tokens out of range [0, {vocab}): {host.ravel()[:8]}")
  check = np.stack([np.asarray(t) for t in checked], 1) if checked else None
  return dict(synced=synced, pipelined=pipelined, check=check), caches, taken


class FlaxBench:

  def __init__(self, args, results: Results):
    self.args = args
    self.results = results
    self.implementation = args.implementation or (
      "pallas" if jax.default_backend() == "gpu" else "xla")
    self.dtype = jnp.bfloat16
    self.stack = not args.per_layer_caches
    self._device_layouts: dict[Any, CacheLayout] = {}
    if max(args.devices) > jax.device_count():
      raise SystemExit(f"--devices {','.join(map(str, args.devices))}: only "
                       f"{jax.device_count()} devices present")
    stats = memory_stats()
    limit = args.memory_limit_gib * GIB if args.memory_limit_gib else stats.get("bytes_limit")
    self.limit = None if limit is None else int(limit)
    self.headroom = int(args.headroom_gib * GIB)
    if args.budget_gib:
      self.budget = int(args.budget_gib * GIB)
    elif self.limit is not None:
      self.budget = self.limit - self.headroom
    else:
      self.budget = None
    results.set_meta("flax", dict(
      jax=jax.__version__, backend=jax.default_backend(), device=jax.devices()[0].device_kind,
      implementation=self.implementation, dtype="bfloat16", steps=args.steps,
      warmup=args.warmup, check_steps=args.check_steps, devices=args.devices,
      device_count=jax.device_count(), margin=MARGIN, memory_limit_bytes=self.limit,
      headroom_bytes=self.headroom, budget_bytes=self.budget,
      compile_workers=args.compile_workers, memory_stats_at_start=stats,
      allocator=dict((k, os.environ.get(k)) for k in (
        "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
        "XLA_PYTHON_CLIENT_ALLOCATOR"))))

  def available(self, devices: Sequence[jax.Device] | None = None) -> int | None:
    """Bytes that may still be allocated on each of ``devices`` (default: the first
    device; None: unknown, e.g. on the CPU)."""
    if self.limit is None:
      return None
    return min(self.limit - self.headroom - memory_stats(d).get("bytes_in_use", 0)
               for d in (devices or [jax.devices()[0]]))

  def queue(self, cells: list, makers: list, row: dict, spec: CacheSpec, runner: Runner,
            step: Any, *, need: int, avail: int | None,
            free: Callable[[int, int], str]) -> None:
    """Adds a row's program to a compile wave, or records the row as skipped when its
    caches (``need`` bytes per device) exceed ``avail``; ``free`` words the shortfall."""
    if avail is not None and need > avail:
      self.results.add(dict(row, status="skipped", reason=(
        f"out of memory (estimated before allocating): {free(need, avail)}")))
      return
    spec.check_context(row["context"], decoded_tokens(self.args))
    cells.append((row, spec))
    makers.append(functools.partial(Program, spec, runner, step))

  def run(self) -> None:
    for name in self.args.models:
      self.run_model(name)
      free()

  def run_model(self, name: str) -> None:
    args = self.args
    config = model_config(name)
    t0 = time.perf_counter()
    runner = random_runner(config, self.dtype)
    jax.block_until_ready(runner.params)
    weights = tree_nbytes(runner.params)
    weights_s = time.perf_counter() - t0
    step = step_function(runner)
    base = dict(kind="decode", path="flax", model=name, implementation=self.implementation,
                dtype="bfloat16", steps=args.steps, warmup=args.warmup, weights_bytes=weights)
    layouts = {}
    for preset in args.presets:
      for batch in args.batches:
        spec = CacheSpec(config, preset, batch, 2048, self.dtype, self.implementation,
                         stack=self.stack)
        layouts[preset, batch] = CacheLayout.measure(spec)

    # Wave 1: every (preset, batch, context) that may fit.
    cells, makers = [], []
    for batch in args.batches:
      for context in args.contexts:
        for preset in args.presets:
          capacity = context + MARGIN
          spec = CacheSpec(config, preset, batch, capacity, self.dtype, self.implementation,
                           stack=self.stack)
          row = dict(base, batch=batch, context=context, preset=preset, capacity=capacity,
                     cache_layout=cache_layout(spec),
                     implementation=split_preset(preset)[1] or self.implementation)
          self.queue(cells, makers, row, spec, runner, step,
                     need=layouts[preset, batch].bytes(capacity), avail=self.available(),
                     free=lambda need, avail: (
                       f"caches need {need / GIB:.1f} GiB, {avail / GIB:.1f} GiB free after "
                       f"the weights ({weights / GIB:.1f} GiB) and "
                       f"{self.headroom / GIB:.1f} GiB headroom"))
    programs, wave_s = compile_all(makers, args.compile_workers)
    print(f"[flax {name}] weights {weights / GIB:.2f} GiB in {weights_s:.1f} s; compiled "
          f"{len(programs)} programs in {wave_s:.1f} s", flush=True)

    measured: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for (row, spec), program in zip(cells, programs):
      row["compile_wave_s"], row["compile_wave_programs"] = wave_s, len(programs)
      if isinstance(program, BaseException):
        status = "skipped" if is_oom(program) else "error"
        self.results.add(dict(row, status=status, reason=f"compile: {error_text(program)}"))
        continue
      extra = program.step_extra_bytes()
      if extra is not None:
        measured.setdefault((spec.preset, spec.batch), []).append((spec.capacity, extra))
      self.results.add(self.decode_row(row, spec, program, runner, layouts, weights))
      print(self.line(self.results.rows[-1]), flush=True)
      del program
      free()
    for devices in args.devices:
      if devices > 1:
        self.run_sharded(name, config, runner, base, layouts, weights, devices)
    self.fit(name, config, runner, step, base, layouts, measured, weights)

  def run_sharded(self, name: str, config: ModelConfig, runner: Runner, base: dict,
                  layouts: dict, weights: int, devices: int) -> None:
    """Every (batch, context, preset) again, tensor-parallel over `devices` devices
    (`tqjax.sharding`: weights column/row-parallel, caches split over KV heads, attention
    per shard; kind "sharded"): the same weights (``shard_params`` of the one-device
    runner), the same random caches (built directly in their sharded layout) and tokens;
    steps compiled ahead of time in the pool as the one-device rows'. Correctness: the
    first ``--check-steps`` greedy tokens against the one-device row's (``tokens_match``);
    ``scaling`` against its tokens/s (see `annotate`)."""
    args = self.args
    try:
      if jax.device_count() < devices:
        raise ValueError(f"--devices {devices}: {jax.device_count()} devices present")
      mesh = sharding_lib.make_mesh(jax.devices()[:devices], model=devices)
      t0 = time.perf_counter()
      sharded = sharding_lib.shard_params(runner, mesh)
      jax.block_until_ready(sharded.params)
      shard_s = time.perf_counter() - t0
    except ValueError as e:  # too few devices, or a dimension the mesh does not divide
      for batch in args.batches:
        for context in args.contexts:
          for preset in args.presets:
            self.results.add(dict(base, kind="sharded", devices=devices, batch=batch,
                                  context=context, preset=preset, status="skipped",
                                  reason=str(e)))
      return
    on_devices = bytes_per_device(sharded.params)
    base = dict(base, kind="sharded", devices=devices,
                weights_bytes_per_device=[on_devices.get(d.id, 0) for d in mesh.devices.flat])
    step = step_function(sharded)
    cells, makers = [], []
    for batch in args.batches:
      for context in args.contexts:
        for preset in args.presets:
          capacity = context + MARGIN
          spec = CacheSpec(config, preset, batch, capacity, self.dtype, self.implementation,
                           mesh)
          row = dict(base, batch=batch, context=context, preset=preset, capacity=capacity,
                     implementation=split_preset(preset)[1] or self.implementation)
          self.queue(cells, makers, row, spec, sharded, step,
                     need=self.device_layout(spec).bytes(capacity),
                     avail=self.available(spec.devices),
                     free=lambda need, avail: (
                       f"caches need {need / GIB:.1f} GiB per device, "
                       f"{avail / GIB:.1f} GiB free"))
    programs, wave_s = compile_all(makers, args.compile_workers)
    print(f"[flax {name}] sharded over {devices} devices in {shard_s:.1f} s; compiled "
          f"{len(programs)} programs in {wave_s:.1f} s", flush=True)
    for (row, spec), program in zip(cells, programs):
      row["compile_wave_s"], row["compile_wave_programs"] = wave_s, len(programs)
      if isinstance(program, BaseException):
        status = "skipped" if is_oom(program) else "error"
        self.results.add(dict(row, status=status, reason=f"compile: {error_text(program)}"))
        continue
      self.results.add(self.decode_row(row, spec, program, sharded, layouts, weights))
      print(self.line(self.results.rows[-1]), flush=True)
      del program
      free()
    del sharded, step
    free()

  def device_layout(self, spec: CacheSpec) -> CacheLayout:
    """The caches' bytes on each device of the spec's mesh as a function of capacity."""
    key = (spec.preset, spec.batch, spec.mesh)
    if key not in self._device_layouts:
      self._device_layouts[key] = CacheLayout.measure(spec, per_device=True)
    return self._device_layouts[key]

  def reference_tokens(self, row: dict) -> np.ndarray | None:
    """The check tokens of the one-device decode row of the same configuration, if it ran
    (it runs first in the same call and replaces any earlier run's row)."""
    for r in self.results.rows:
      if (r["kind"] == "decode" and r.get("status") == "ok" and "variant" not in r
          and r.get("check_tokens") is not None
          and all(r.get(k) == row[k] for k in ("path", "model", "batch", "context", "preset"))):
        tokens = np.asarray(r["check_tokens"], np.int32)
        if tokens.shape[1] >= self.args.check_steps:
          return tokens
    return None

  def decode_row(self, row: dict, spec: CacheSpec, program: Program, runner: Runner,
                 layouts: dict, weights: int, *, steps: int | None = None,
                 verify: bool = False) -> dict:
    """Builds the caches, decodes, returns the row. With the spec's mesh (`runner` sharded
    over it) the first steps are fed the one-device row's tokens and compared."""
    args = self.args
    steps = args.steps if steps is None else steps
    layout = layouts[spec.preset, spec.batch]
    device_layout = layout if spec.mesh is None else self.device_layout(spec)
    devices = spec.devices
    config = cache_config(spec.preset)
    bits = (8.0 * jnp.dtype(spec.dtype).itemsize if config is None else
            config.bits_per_coordinate(spec.model.num_layers, spec.model.head_dim))
    row = dict(row, lower_s=program.lower_s, compile_s=program.compile_s,
               bits_per_coordinate=bits, cache_bytes_per_token=layout.per_token / spec.batch)
    extra = program.step_extra_bytes()  # per device
    need = device_layout.bytes(spec.capacity) + (extra or 0)
    avail = self.available(devices)
    if avail is not None and need > avail:
      return dict(row, status="skipped", reason=(
        f"out of memory (estimated before allocating): caches + step temporaries need "
        f"{need / GIB:.1f} GiB{'' if spec.mesh is None else ' per device'}, "
        f"{avail / GIB:.1f} GiB free"))
    reference = None if spec.mesh is None else self.reference_tokens(row)
    caches = None
    try:
      before = [memory_stats(d) for d in devices]
      key = jax.random.key(spec.batch * 1_000_003 + row["context"])
      caches = program.build(key, row["context"])
      jax.block_until_ready(caches)
      built = [memory_stats(d) for d in devices]
      cache_bytes = cache_memory_bytes(caches)
      if cache_bytes != layout.bytes(spec.capacity):
        raise RuntimeError(f"memory_bytes()={cache_bytes} differs from the layout's "
                           f"{layout.bytes(spec.capacity)} at capacity {spec.capacity}")
      on_devices = bytes_per_device(caches)
      cache_per_device = [on_devices.get(d.id, 0) for d in devices]
      if max(cache_per_device) != device_layout.bytes(spec.capacity):
        raise RuntimeError(f"cache bytes per device {cache_per_device} differ from the "
                           f"layout's {device_layout.bytes(spec.capacity)}")
      tokens = program.place(jax.random.randint(jax.random.key(7), (spec.batch, 1), 0,
                                                spec.model.vocab_size, jnp.int32))
      profile = None
      if args.profile_dir and not verify:
        # "k4v4@mosaic" -> "k4v4-mosaic": a plain file name (copy tools refuse "@").
        profile = os.path.join(args.profile_dir, f"{row['model']}-b{spec.batch}-"
                               f"s{row['context']}-{spec.preset.replace('@', '-')}"
                               f"{'' if spec.mesh is None else f'-d{len(devices)}'}")
      timings, caches, taken = time_steps(
        program.step, runner.params, tokens, caches, program.place(jax.random.key(1)),
        warmup=args.warmup, steps=steps, vocab=spec.model.vocab_size, profile_dir=profile,
        profile_steps=args.profile_steps, check_steps=args.check_steps, reference=reference,
        place=program.place)
      times = timings["synced"]
      lengths = np.asarray(caches[0].lengths)
      want = row["context"] + taken
      if not (lengths == want).all():
        raise RuntimeError(f"cache lengths after decoding are {lengths}, expected {want}")
      after = [memory_stats(d) for d in devices]
    except Exception as e:  # noqa: BLE001 - every failure becomes a row
      caches = None
      free()
      status = "skipped" if is_oom(e) else "error"
      if status == "error":
        traceback.print_exc()
      return dict(row, status=status, reason=f"run: {error_text(e)}")
    finally:
      del caches
      free()
    median, mean = statistics.median(times), statistics.fmean(times)
    read = weights + layout.per_token * row["context"]
    # One device: its statistics. Several: the most loaded device's.
    most = lambda stats, name: max((s.get(name) for s in stats if name in s), default=None)
    memory = dict(memory_stats_before=before[0] if spec.mesh is None else before,
                  bytes_in_use_after_build=most(built, "bytes_in_use"),
                  peak_bytes_in_use=most(after, "peak_bytes_in_use"),
                  peak_grew_in_row=any(a.get("peak_bytes_in_use", 0) > b.get("peak_bytes_in_use", 0)
                                       for a, b in zip(after, before)) if after[0] else None,
                  **{f"step_{k}": v for k, v in (program.memory or {}).items()})
    if spec.mesh is not None:
      memory["per_device"] = [
        dict(device=d.id, cache_bytes=c, before=b, after_build=u, after_steps=a)
        for d, c, b, u, a in zip(devices, cache_per_device, before, built, after)]
    if extra is not None:  # without allocator statistics (CPU): weights + caches + step
      held = memory["bytes_in_use_after_build"]
      on_one = (weights + cache_bytes if spec.mesh is None else
                max(row.get("weights_bytes_per_device") or [weights]) + max(cache_per_device))
      memory["estimated_peak_basis"] = ("bytes_in_use_after_build" if held is not None
                                        else "weights_bytes + cache_bytes (per device)")
      memory["estimated_peak_bytes"] = (on_one if held is None else held) + extra
    out = dict(row, status="ok", step_ms=1e3 * median, step_ms_mean=1e3 * mean,
               step_ms_min=1e3 * min(times), step_ms_all=[1e3 * t for t in times],
               tokens_per_s=spec.batch / median, tokens_per_s_mean=spec.batch / mean,
               step_ms_pipelined=1e3 * timings["pipelined"],
               tokens_per_s_pipelined=spec.batch / timings["pipelined"], profile=profile,
               cache_bytes=cache_bytes, bytes_read_per_step_estimate=read,
               read_tb_per_s=read / median / 1e12, memory=memory,
               check_steps=args.check_steps, check_tokens=(
                 None if timings["check"] is None else timings["check"].tolist()))
    if spec.mesh is not None:
      out["cache_bytes_per_device"] = cache_per_device
      out["tokens_match"] = None if reference is None or timings["check"] is None else float(
        (timings["check"] == reference[:, :args.check_steps]).mean())
      if reference is None:
        out["tokens_match_note"] = "no one-device decode row of this configuration to compare"
    return out

  # -- the longest context in the budget --

  def fit(self, name: str, config: ModelConfig, runner: Runner, step, base: dict,
          layouts: dict, measured: dict, weights: int) -> None:
    args = self.args
    if self.budget is None:
      print(f"[flax {name}] no memory budget known (CPU without --budget-gib): no fit rows",
            flush=True)
      return
    fits = {}
    for batch in args.batches:
      for preset in args.presets:
        layout = layouts[preset, batch]
        points = measured.get((preset, batch), [])
        if len({c for c, _ in points}) >= 2:
          slope, intercept = np.polyfit([c for c, _ in points], [t for _, t in points], 1)
          temp_a, temp_b = float(max(intercept, 0.0)), float(max(slope, 0.0))
        elif points:
          temp_a, temp_b = float(max(t for _, t in points)), 0.0
        else:
          temp_a, temp_b = 0.0, 0.0
        free_bytes = self.budget - weights - layout.fixed - temp_a
        per = layout.per_token + temp_b
        context = int((free_bytes - per * MARGIN) // per) // 256 * 256
        row = dict(kind="fit", path="flax", model=name, batch=batch, preset=preset,
                   budget_bytes=self.budget, weights_bytes=weights,
                   cache_fixed_bytes=layout.fixed,
                   cache_bytes_per_token=layout.per_token / batch,
                   temp_fit=dict(bytes_at_0=temp_a, bytes_per_token=temp_b / batch,
                                 points=[dict(capacity=c, bytes=t) for c, t in points]),
                   max_context=max(context, 0), verified=None)
        if context > 0:
          cap = context + MARGIN
          row["estimated_total_bytes"] = (weights + layout.bytes(cap) + temp_a + temp_b * cap)
          row["status"] = "ok"
        else:
          row["status"] = "skipped"
          row["reason"] = "the weights and step temporaries alone exceed the budget"
        fits[batch, preset] = row
        self.results.add(row)
    # Verification: allocate at the fitted context and decode a few steps.
    todo = [(b, p) for b in args.batches for p in args.verify
            if p in args.presets and fits[b, p]["status"] == "ok"]
    makers, specs = [], []
    for batch, preset in todo:
      row = fits[batch, preset]
      context = row["max_context"]
      spec = CacheSpec(config, preset, batch, context + MARGIN, self.dtype, self.implementation,
                       stack=self.stack)
      limit = (max_capacity_int32(spec) - MARGIN) // 256 * 256
      if limit < context:  # kept out of the kernels' reach: a crash would end the run
        context = limit
        spec = dataclasses.replace(spec, capacity=context + MARGIN)
        row["verify_note"] = ("verified at a shorter context: at max_context a cache buffer "
                              "would hold 2**31 elements or more (int32 indexing)")
      row["verify_context"] = context
      spec.check_context(context, args.check_steps + args.warmup + 2 * args.verify_steps)
      specs.append(spec)
      makers.append(functools.partial(Program, spec, runner, step))
    if not makers:
      return
    programs, wave_s = compile_all(makers, args.compile_workers)
    print(f"[flax {name}] compiled {len(programs)} fit checks in {wave_s:.1f} s", flush=True)
    for spec, program in zip(specs, programs):
      row = fits[spec.batch, spec.preset]
      if isinstance(program, BaseException):
        row.update(verified=False, verify=dict(error=f"compile: {error_text(program)}"))
        self.results.add(row)
        continue
      row_in = dict(base, batch=spec.batch, context=row["verify_context"], preset=spec.preset,
                    capacity=spec.capacity)
      result = self.decode_row(row_in, spec, program, runner, layouts, weights,
                               steps=args.verify_steps, verify=True)
      del program
      free()
      verify = {k: result.get(k) for k in ("status", "reason", "step_ms", "tokens_per_s",
                                           "cache_bytes", "compile_s", "memory")}
      peak = (result.get("memory") or {}).get("estimated_peak_bytes")
      verify["within_budget"] = None if peak is None else peak <= self.budget
      row.update(verified=result["status"] == "ok" and verify["within_budget"] is not False,
                 verify=verify)
      self.results.add(row)
      print(self.line(row), flush=True)

  @staticmethod
  def line(r: dict) -> str:
    if r["kind"] == "sharded":
      head = f"{r['model']} B={r['batch']} S={r['context']} {r['preset']} on {r['devices']} devices"
      if r.get("status") != "ok":
        return f"{head}: {r['status']} ({r.get('reason')})"
      return (f"{head}: {r['step_ms']:.2f} ms, {r['tokens_per_s']:.1f} tok/s, scaling "
              f"{fmt(r.get('scaling'))}, tokens match {fmt(r.get('tokens_match'))}, cache "
              f"{max(r['cache_bytes_per_device']) / GIB:.2f} GiB per device, compile "
              f"{r['compile_s']:.1f} s")
    if r["kind"] == "fit":
      return (f"fit {r['model']} B={r['batch']} {r['preset']}: max context {r['max_context']} "
              f"verified={r.get('verified')}")
    if r.get("status") != "ok":
      return (f"{r['model']} B={r['batch']} S={r['context']} {r['preset']}: {r['status']} "
              f"({r.get('reason')})")
    return (f"{r['model']} B={r['batch']} S={r['context']} {r['preset']}: "
            f"{r['step_ms']:.2f} ms, {r['tokens_per_s']:.1f} tok/s, compile {r['compile_s']:.1f} s")


def check_step_matches_runner(runner: Runner, spec: CacheSpec, context: int, *, steps: int = 3
                              ) -> tuple[tuple[np.ndarray, Any], tuple[np.ndarray, Any]]:
  """`steps` greedy steps by the bench's compiled step and by the Runner's own
  `decode_step`, each on its own copy of the same random caches: ((tokens [B, steps],
  final caches) of the bench, (the same) of the Runner). The bench's correctness reference."""
  program = Program(spec, runner, step_function(runner)).compile()
  tokens = jax.random.randint(jax.random.key(4), (spec.batch, 1), 0, spec.model.vocab_size,
                              jnp.int32)
  results = []
  for run in (functools.partial(program.step, runner.params), runner.decode_step):
    caches, t, key, out = program.build(jax.random.key(3), context), tokens, jax.random.key(5), []
    schedule = kvcache.FlushSchedule(caches)
    for _ in range(steps):
      nxt, caches, key = run(t, schedule.before_step(caches), key)
      out.append(np.asarray(nxt))
      t = nxt[:, None]
    results.append((np.stack(out, 1), caches))
  return results[0], results[1]


# ---- the bridge path ----


class BridgeE2E:
  """Stock transformers caches vs the tqjax bridge, caches of random contents."""

  def __init__(self, args, results: Results):
    import torch

    from bench import bridge as bridge_bench

    self.torch = torch
    self.bridge_bench = bridge_bench
    self.args = args
    self.results = results
    self.device = "cuda" if torch.cuda.is_available() else "cpu"
    self.implementation = args.implementation or (
      "pallas" if jax.default_backend() == "gpu" else "xla")
    self.compressed = [p for p in args.presets if p != BF16]
    self.headroom = int(args.headroom_gib * GIB)
    results.set_meta("bridge", dict(
      torch=torch.__version__, jax=jax.__version__,
      transformers=__import__("transformers").__version__, device=(
        torch.cuda.get_device_name() if self.device == "cuda" else "cpu"),
      jax_backend=jax.default_backend(), implementation=self.implementation,
      dtype="bfloat16" if self.device == "cuda" else "float32", steps=args.steps,
      warmup=args.warmup, margin=self.bridge_bench.MARGIN))

  def run(self) -> None:
    for name in self.args.models:
      self.run_model(name)

  def bench(self, config: ModelConfig):
    a = self.args
    bargs = argparse.Namespace(quick=self.device == "cpu", steps=a.steps, warmup=a.warmup,
                               presets=self.compressed, implementation=self.implementation)
    return self.bridge_bench.Bench(bargs, config=hf_config(config))

  def free_bytes(self, jax_side: bool = False) -> int | None:
    """Bytes that torch (or, with `jax_side`, JAX: its allocator's free pool too, within its
    limit) may still allocate, less the headroom; None when unknown (CPU)."""
    if self.device != "cuda":
      return None if not self.args.memory_limit_gib else int(self.args.memory_limit_gib * GIB)
    free = int(self.torch.cuda.mem_get_info()[0])
    if jax_side:
      stats = jax.devices()[0].memory_stats() or {}
      in_use = stats.get("bytes_in_use", 0)
      free += max(stats.get("pool_bytes", in_use) - in_use, 0)
      if "bytes_limit" in stats:
        free = min(free, stats["bytes_limit"] - in_use)
    return free - self.headroom

  def run_model(self, name: str) -> None:
    torch, args = self.torch, self.args
    config = model_config(name)
    bb = self.bench(config)
    dtype = bb.dtype
    elem = torch.finfo(dtype).bits // 8
    base = dict(kind="decode", path="bridge", model=name, implementation=self.implementation,
                dtype=str(dtype).removeprefix("torch."), steps=args.steps, warmup=args.warmup)
    check_context = min(1024, min(args.contexts))
    try:
      check = bb.check(check_context)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - recorded, the timing still runs
      check = dict(context=check_context, error=error_text(e))
    meta = dict(self.results.doc["meta"].get("bridge", {}))
    meta.setdefault("check", {})[name] = check
    self.results.set_meta("bridge", meta)
    print(f"[bridge {name}] check: {json.dumps(check)}", flush=True)
    mk = lambda *shape: torch.empty(shape, device=bb.device, dtype=dtype).uniform_(-2, 2)
    layers, kh, d = config.num_layers, config.num_kv_heads, config.head_dim
    kv_bytes = lambda batch, s: 2 * layers * batch * kh * s * d * elem
    breakdown = {}
    for batch in args.batches:
      token = torch.randint(0, config.vocab_size, (batch, 1), device=bb.device)
      breakdown[batch] = dict(torch=bb.torch_only(token), handoff=bb.handoffs(batch))
    # Phase 1: stock caches (torch memory, released after each).
    for batch in args.batches:
      token = torch.randint(0, config.vocab_size, (batch, 1), device=bb.device)
      torch_s = breakdown[batch]["torch"]
      for context in args.contexts:
        cap = context + self.bridge_bench.MARGIN
        for variant in ("stock-dynamic", "stock-static"):
          row = dict(base, batch=batch, context=context, preset=BF16, variant=variant)
          need = kv_bytes(batch, cap if variant == "stock-static" else context + 1) + (
            2 * kv_bytes(batch, context) // layers)  # one layer's K/V in flight
          avail = self.free_bytes()
          if avail is not None and need > avail:
            self.results.add(dict(row, status="skipped", reason=(
              f"out of memory (estimated before allocating): {need / GIB:.1f} GiB of K/V, "
              f"{avail / GIB:.1f} GiB free")))
            continue
          cache = None
          try:
            if variant == "stock-dynamic":
              cache = self.bridge_bench.DynamicCache(config=bb.config)
            else:
              cache = self.bridge_bench.StaticCache(config=bb.config, max_cache_len=cap)
            for i in range(layers):
              cache.update(mk(batch, kh, context, d), mk(batch, kh, context, d), i)
            nbytes = sum(l.keys.nbytes + l.values.nbytes for l in cache.layers)
            if bb.device == "cuda":
              torch.cuda.reset_peak_memory_stats()
            step = bb.timed_steps(token, cache)
            peak = torch.cuda.max_memory_allocated() if bb.device == "cuda" else None
            row.update(status="ok", step_ms=1e3 * step, tokens_per_s=batch / step,
                       kv_bytes=nbytes, torch_peak_bytes=peak,
                       breakdown_ms=dict(torch=1e3 * torch_s, attention=1e3 * (step - torch_s)))
          except Exception as e:  # noqa: BLE001
            row.update(status="skipped" if is_oom(e) else "error", reason=error_text(e))
          finally:
            del cache
            bb.free()
          self.results.add(row)
          print(self.line(row), flush=True)
    # Phase 2: the bridge (JAX memory).
    for batch in args.batches:
      token = torch.randint(0, config.vocab_size, (batch, 1), device=bb.device)
      for context in args.contexts:
        for preset in [BF16, *self.compressed]:
          self.results.add(self.bridge_row(bb, config, base, batch, context, preset, token,
                                           breakdown[batch]))
          print(self.line(self.results.rows[-1]), flush=True)
    del bb
    free()
    if self.device == "cuda":
      torch.cuda.empty_cache()

  def bridge_row(self, bb, config: ModelConfig, base: dict, batch: int, context: int,
                 preset: str, token, breakdown: dict) -> dict:
    import bridge

    variant = "bridge-exact" if preset == BF16 else f"bridge-{preset}"
    cap = context + self.bridge_bench.MARGIN
    row = dict(base, batch=batch, context=context, preset=preset, variant=variant, capacity=cap)
    dtype = jnp.dtype(str(bb.dtype).removeprefix("torch."))
    spec = CacheSpec(config, preset, batch, cap, dtype, self.implementation)
    layout = CacheLayout.measure(spec)
    need = layout.bytes(cap)
    avail = self.free_bytes(jax_side=True)
    if avail is not None and need > avail:
      return dict(row, status="skipped", reason=(
        f"out of memory (estimated before allocating): caches need {need / GIB:.1f} GiB, "
        f"{avail / GIB:.1f} GiB free"))
    cache = None
    try:
      spec.check_context(context, decoded_tokens(self.args))
      builders: dict[Any, Any] = {}
      states = []
      key = jax.random.key(batch * 1_000_003 + context)
      for layer in range(config.num_layers):
        group = spec.builder_group(layer)
        if group not in builders:
          builders[group] = jax.jit(spec.builder(layer))
        # Committed, like the outputs of the bridge's step: one compile serves both.
        states.append(jax.device_put(builders[group](jax.random.fold_in(key, layer),
                                                     jnp.int32(context)), jax.devices()[0]))
      jax.block_until_ready(states)
      cache = bridge.TurboQuantHFCache.from_model(
        bb.model, preset=None if preset == BF16 else preset, max_cache_len=cap,
        implementation=self.implementation)
      for layer, state in zip(cache.layers, states):
        layer.state, layer.capacity, layer.seen = state, cap, context
        layer.device, layer.dtype, layer.is_initialized = bb.device, bb.dtype, True
      del states
      with bridge.tqjax_attention(bb.model):
        step = bb.timed_steps(token, cache)
        jax_s = bb.jax_attention(cache, batch)
      stats = memory_stats() if jax.default_backend() == "gpu" else {}
      t = breakdown
      row.update(status="ok", step_ms=1e3 * step, tokens_per_s=batch / step,
                 kv_bytes=cache.memory_bytes(), cache_bytes=cache.memory_bytes(),
                 jax_memory=stats, breakdown_ms=dict(
                   torch=1e3 * t["torch"], handoff=1e3 * t["handoff"], jax=1e3 * jax_s,
                   glue=1e3 * (step - t["torch"] - t["handoff"] - jax_s)))
    except Exception as e:  # noqa: BLE001
      row.update(status="skipped" if is_oom(e) else "error", reason=error_text(e))
      if row["status"] == "error":
        traceback.print_exc()
    finally:
      del cache
      bb.free()
    return row

  @staticmethod
  def line(r: dict) -> str:
    if r.get("status") != "ok":
      return (f"{r['model']} B={r['batch']} S={r['context']} {r['variant']}: {r['status']} "
              f"({r.get('reason')})")
    return (f"{r['model']} B={r['batch']} S={r['context']} {r['variant']}: "
            f"{r['step_ms']:.2f} ms, {r['tokens_per_s']:.1f} tok/s")


# ---- the table ----


def fmt(x: Any, spec: str = ".2f", none: str = "-") -> str:
  return none if x is None else format(x, spec)


def table(doc: dict) -> str:
  rows = doc["rows"]
  lines = []
  dec = [r for r in rows if r["kind"] == "decode" and r["path"] == "flax"]
  if dec:
    lines.append(f"{'flax':12s} {'B':>2s} {'S':>7s} {'preset':7s} {'ms':>8s} {'mean':>8s} "
                 f"{'pipe':>8s} {'tok/s':>8s} {'x bf16':>6s} {'cache GiB':>9s} {'peak GiB':>8s} "
                 f"{'comp s':>6s}")
    for r in sorted(dec, key=lambda r: (r["model"], r["batch"], r["context"], r["preset"])):
      if r.get("status") != "ok":
        lines.append(f"{r['model'][:12]:12s} {r['batch']:2d} {r['context']:7d} "
                     f"{r['preset'][:7]:7s} {r['status']}: {str(r.get('reason'))[:70]}")
        continue
      peak = (r.get("memory") or {}).get("estimated_peak_bytes")
      lines.append(
        f"{r['model'][:12]:12s} {r['batch']:2d} {r['context']:7d} {r['preset'][:7]:7s} "
        f"{r['step_ms']:8.2f} {r['step_ms_mean']:8.2f} {r['step_ms_pipelined']:8.2f} "
        f"{r['tokens_per_s']:8.1f} "
        f"{fmt(r.get('speedup_vs_bf16')):>6s} {r['cache_bytes'] / GIB:9.2f} "
        f"{fmt(None if peak is None else peak / GIB):>8s} {fmt(r.get('compile_s'), '.1f'):>6s}")
  sh = [r for r in rows if r["kind"] == "sharded"]
  if sh:
    lines.append(f"{'sharded':12s} {'B':>2s} {'S':>7s} {'preset':7s} {'dev':>3s} {'ms':>8s} "
                 f"{'pipe':>8s} {'tok/s':>8s} {'x 1 dev':>7s} {'x pipe':>6s} {'match':>5s} "
                 f"{'x bf16':>6s} {'GiB/dev':>7s}")
    for r in sorted(sh, key=lambda r: (r["model"], r["batch"], r["context"], r["preset"],
                                       r["devices"])):
      head = (f"{r['model'][:12]:12s} {r['batch']:2d} {r['context']:7d} {r['preset'][:7]:7s} "
              f"{r['devices']:3d}")
      if r.get("status") != "ok":
        lines.append(f"{head} {r['status']}: {str(r.get('reason'))[:60]}")
        continue
      per_device = r.get("cache_bytes_per_device")
      lines.append(f"{head} {r['step_ms']:8.2f} {r['step_ms_pipelined']:8.2f} "
                   f"{r['tokens_per_s']:8.1f} {fmt(r.get('scaling')):>7s} "
                   f"{fmt(r.get('scaling_pipelined')):>6s} {fmt(r.get('tokens_match')):>5s} "
                   f"{fmt(r.get('speedup_vs_bf16')):>6s} "
                   f"{fmt(max(per_device) / GIB if per_device else None):>7s}")
  fits = [r for r in rows if r["kind"] == "fit"]
  if fits:
    lines.append(f"{'fit':12s} {'B':>2s} {'preset':7s} {'max ctx':>9s} {'x bf16':>6s} "
                 f"{'budget GiB':>10s} {'verified':8s}")
    for r in sorted(fits, key=lambda r: (r["model"], r["batch"], r["preset"])):
      lines.append(f"{r['model'][:12]:12s} {r['batch']:2d} {r['preset'][:7]:7s} "
                   f"{r.get('max_context', 0):9d} {fmt(r.get('context_ratio_vs_bf16')):>6s} "
                   f"{r['budget_bytes'] / GIB:10.1f} {str(r.get('verified')):8s}")
  br = [r for r in rows if r["kind"] == "decode" and r["path"] == "bridge"]
  if br:
    lines.append(f"{'bridge':12s} {'B':>2s} {'S':>7s} {'variant':14s} {'ms':>8s} {'tok/s':>8s} "
                 f"{'x static':>8s} {'x dyn':>6s} {'KV GiB':>7s}")
    for r in sorted(br, key=lambda r: (r["model"], r["batch"], r["context"], r["variant"])):
      if r.get("status") != "ok":
        lines.append(f"{r['model'][:12]:12s} {r['batch']:2d} {r['context']:7d} "
                     f"{r['variant'][:14]:14s} {r['status']}: {str(r.get('reason'))[:60]}")
        continue
      lines.append(
        f"{r['model'][:12]:12s} {r['batch']:2d} {r['context']:7d} {r['variant'][:14]:14s} "
        f"{r['step_ms']:8.2f} {r['tokens_per_s']:8.1f} "
        f"{fmt(r.get('speedup_vs_stock_static')):>8s} {fmt(r.get('speedup_vs_stock_dynamic')):>6s} "
        f"{r['kv_bytes'] / GIB:7.2f}")
  for model, per_preset in doc.get("targets", {}).items():
    for preset, t in per_preset.items():
      parts = []
      for name, label in (("b8_32k", "B8 32K x"), ("b8_128k", "B8 128K x"),
                          ("b1_min", "B1 min x"), ("context", "context x")):
        v = t[name]
        mark = {True: "ok", False: "MISS", None: "n/a"}[v["met"]]
        parts.append(f"{label} {fmt(v['value'])} (>= {v['target']}) {mark}")
      lines.append(f"targets {preset} {model}: " + "; ".join(parts))
  return "\n".join(lines)


# ---- main ----


def parse_list(kind, text: str) -> list:
  values = [kind(x.strip()) for x in text.split(",") if x.strip()]
  if not values:
    raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
  return values


def parse_context(text: str) -> int:
  t = text.strip().lower()
  return int(t[:-1]) * 1024 if t.endswith("k") else int(t)


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=".", help="directory for e2e.json")
  ap.add_argument("--quick", action="store_true",
                  help="headline rows only: " + ", ".join(f"--{k} {v}" for k, v in QUICK.items()))
  ap.add_argument("--models", default=None, help=f"comma-separated, of {sorted(MODELS)} "
                  f"(default {DEFAULTS['models']})")
  ap.add_argument("--batches", default=None, help=f"default {DEFAULTS['batches']}")
  ap.add_argument("--contexts", default=None, help=f"tokens, e.g. 32K (default {DEFAULTS['contexts']})")
  ap.add_argument("--presets", default=None,
                  help=f"bf16 (exact cache) and TurboQuant presets {sorted(kvcache.PRESETS)} "
                  f"(default {DEFAULTS['presets']}); a preset@implementation (e.g. "
                  f"k4v4@mosaic, Flax path) overrides --implementation for its rows")
  ap.add_argument("--paths", default=None, help=f"flax, bridge (default {DEFAULTS['paths']})")
  ap.add_argument("--verify", default=None,
                  help="presets allocated at their fitted longest context (default: all)")
  ap.add_argument("--steps", type=int, default=32, help="timed decode steps per row")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--verify-steps", type=int, default=3)
  ap.add_argument("--profile-dir", default=None,
                  help="Flax path: a jax.profiler trace of --profile-steps more steps per row")
  ap.add_argument("--profile-steps", type=int, default=3)
  ap.add_argument("--budget-gib", type=float, default=None,
                  help="memory budget of the fit (default: allocator limit - headroom)")
  ap.add_argument("--headroom-gib", type=float, default=4.0)
  ap.add_argument("--memory-limit-gib", type=float, default=None,
                  help="device memory to plan for (default: the allocator's limit; none on CPU)")
  ap.add_argument("--check-steps", type=int, default=3,
                  help="untimed first steps whose greedy tokens are kept; sharded rows compare "
                       "theirs with the 1-device row's (tokens_match)")
  ap.add_argument("--devices", default="1",
                  help="Flax path: device counts, e.g. 1,2: the 1-device rows always run "
                       "(the reference), then for each count N > 1 the same rows "
                       "tensor-parallel over N devices (kind 'sharded', scaling and "
                       "tokens_match vs 1 device)")
  ap.add_argument("--implementation", default=None,
                  choices=[i for i in kvcache.IMPLEMENTATIONS if i != "pallas-interpret"],
                  help="of compressed caches (default: pallas on GPU, xla on CPU; mosaic: "
                       "the Mosaic GPU kernel, k4v4 and k3v3)")
  ap.add_argument("--per-layer-caches", action="store_true",
                  help="compressed caches as a tuple of per-layer caches (the layout before "
                       "kvcache.StackedCache; rows get cache_layout='per-layer')")
  ap.add_argument("--compile-workers", type=int, default=min(8, os.cpu_count() or 1))
  ap.add_argument("--compile-cache", default=None, help="JAX persistent compilation cache dir")
  ap.add_argument("--in-process", action="store_true",
                  help="everything in this process (CPU); default: the Flax path in one "
                  "process, the bridge path in one per model")
  ap.add_argument("--fresh", action="store_true", help="discard rows of earlier runs in --out")
  ap.add_argument("--merge", default=None,
                  help="comma-separated e2e.json files of other runs: merge them into --out "
                  "and print the table (no benchmark, no device needed)")
  return ap


def resolve(args: argparse.Namespace) -> argparse.Namespace:
  base = QUICK if args.quick else DEFAULTS
  for name in ("models", "batches", "contexts", "presets", "paths", "verify"):
    if getattr(args, name) is None:
      setattr(args, name, base[name])
  args.models = parse_list(str, args.models)
  args.batches = parse_list(int, args.batches)
  args.devices = sorted(set(parse_list(int, args.devices)))
  if any(d < 1 for d in args.devices):
    raise SystemExit(f"--devices: counts must be >= 1, got {args.devices}")
  args.contexts = parse_list(parse_context, args.contexts)
  args.presets = parse_list(str, args.presets)
  args.paths = parse_list(str, args.paths)
  args.verify = args.presets if args.verify is None else parse_list(str, args.verify)
  for m in args.models:
    model_config(m)
  for p in args.presets:
    cache_config(p)
  if "bridge" in args.paths and any(split_preset(p)[1] for p in args.presets):
    raise SystemExit(f"--presets: preset@implementation is for the Flax path only, got "
                     f"{args.presets} with --paths {','.join(args.paths)}")
  bad = sorted(set(args.paths) - set(PATHS))
  if bad:
    raise SystemExit(f"--paths: unknown {bad}; choose from {PATHS}")
  bad = sorted(set(args.verify) - set(args.presets))
  if bad:
    raise SystemExit(f"--verify: {bad} not in --presets {args.presets}")
  if args.steps < 1 or args.warmup < 0 or args.verify_steps < 1 or args.check_steps < 0:
    raise SystemExit(f"need --steps >= 1, --warmup >= 0, --verify-steps >= 1, "
                     f"--check-steps >= 0, got {args.steps}, {args.warmup}, "
                     f"{args.verify_steps}, {args.check_steps}")
  if decoded_tokens(args) > MARGIN:
    raise SystemExit(f"a row decodes {decoded_tokens(args)} tokens (--warmup, --steps, "
                     f"--profile-steps), more than the {MARGIN} of room beyond each context")
  return args


def decoded_tokens(args: argparse.Namespace) -> int:
  """Tokens a row appends to its caches: Flax (check + warm-up + synced + pipelined +
  profiled steps) or bridge (timed steps + the breakdown's attention-only steps)."""
  flax = (args.check_steps + args.warmup + 2 * args.steps +
          (args.profile_steps if args.profile_dir else 0))
  return max(flax, 2 * (args.warmup + args.steps))


def configure_allocator(paths: Sequence[str]) -> None:
  """JAX's GPU allocator: grow on demand; a larger share than the default 75% for the
  Flax path (nothing else uses the GPU), less for the bridge (torch holds the weights).
  Must run before the JAX backend starts; explicit settings win."""
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  fraction = MEM_FRACTION["bridge" if "bridge" in paths else "flax"]
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", fraction)


def child_runs(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
  """(path, models) of each process: the Flax path in one, the bridge one per model (the
  JAX pool of one model's rows would keep memory from the next model's torch caches)."""
  runs = []
  for path in args.paths:
    groups = [[m] for m in args.models] if path == "bridge" else [list(args.models)]
    runs.extend((path, models) for models in groups)
  return runs


def child_argv(args: argparse.Namespace, path: str, models: Sequence[str]) -> list[str]:
  """The options of a child process: this run's resolved options for one path."""
  join = lambda xs: ",".join(map(str, xs))
  argv = ["--out", args.out, "--paths", path, "--models", join(models),
          "--batches", join(args.batches), "--contexts", join(args.contexts),
          "--presets", join(args.presets), "--verify", join(args.verify),
          "--steps", str(args.steps), "--warmup", str(args.warmup),
          "--devices", join(args.devices), "--check-steps", str(args.check_steps),
          "--verify-steps", str(args.verify_steps), "--headroom-gib", str(args.headroom_gib),
          "--compile-workers", str(args.compile_workers),
          "--profile-steps", str(args.profile_steps), "--no-table"]
  if args.per_layer_caches:
    argv.append("--per-layer-caches")
  for name in ("budget_gib", "memory_limit_gib", "implementation", "compile_cache",
               "profile_dir"):
    value = getattr(args, name)
    if value is not None:
      argv += [f"--{name.replace('_', '-')}", str(value)]
  return argv


def run_children(args: argparse.Namespace) -> int:
  """Runs `child_runs` one after the other, each in its own process."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  rc = 0
  for path, models in child_runs(args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", MEM_FRACTION[path])
    cmd = [sys.executable, "-m", "bench.e2e", *child_argv(args, path, models)]
    print(f"=== {path} {','.join(models)}: {' '.join(cmd[1:])}", flush=True)
    rc = subprocess.run(cmd, env=env, cwd=root).returncode or rc
  return rc


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  ap = build_parser()
  ap.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)
  args = resolve(ap.parse_args(argv))
  results = Results(args.out, fresh=args.fresh)
  if args.merge:
    for path in parse_list(str, args.merge):
      results.merge(path)
    rc = 0
  elif len(child_runs(args)) > 1 and not args.in_process:
    if args.fresh:
      results.write()  # the children merge into an emptied e2e.json
    rc = run_children(args)
    results = Results(args.out)
  else:
    configure_allocator(args.paths)
    if args.compile_cache:
      jax.config.update("jax_compilation_cache_dir", args.compile_cache)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    rc = 0
    if "flax" in args.paths:
      FlaxBench(args, results).run()
    if "bridge" in args.paths:
      BridgeE2E(args, results).run()
    results.write()
  if not args.no_table:
    print()
    print(table(results.doc))
    print(f"wrote {results.path}")
  return rc


if __name__ == "__main__":
  sys.exit(main())
