"""Tensor-parallel decode across devices with `jax.sharding`.

A mesh has two axes: ``"data"`` (batch rows) and ``"model"`` (KV heads and the model's
column/row-parallel weights, Megatron style). Everything but attention is partitioned by
XLA's SPMD partitioner from the shardings of the inputs:

* **weights** (`shard_params`): the fused q/k/v and gate/up projections and ``lm_head``
  are column-parallel (output features over ``model``: whole KV-head groups, since K
  divides by the axis size, so the query heads of a KV head stay on its device), o/down
  are row-parallel (input features over ``model``; one all-reduce after each), the
  embedding table is split over the vocabulary (a masked local lookup and one all-reduce;
  the residual stream stays replicated, so a layer costs two all-reduces of
  [B, T, hidden]), norms are replicated;
* **caches** (the caches' own ``shardings(mesh)``; `shard_caches` moves existing caches,
  `build_caches` / `init_caches` / `convert_caches` create them in place): every [B, K, ...]
  array over (``data``, ``model``), per-row counters over ``data``, per-KV-head tables
  over ``model``, the quantizers' tables replicated.

Attention runs per shard: `ShardedCache` wraps a per-layer cache of any type and calls
its ``attend`` under `jax.shard_map`, so each device sees only its own rows and KV heads
(a Pallas kernel cannot be partitioned by XLA and must see local shapes). Its
``update`` stays partitioned by XLA, its result pinned to the cache's shardings. The
wrapper speaks the cache protocol, so `tqjax.models.Runner`'s jitted steps run
unchanged: shard the runner and the caches, then call ``forward`` / ``decode_step`` /
``decode`` as on one device.

    mesh = make_mesh(model=2)
    runner = shard_params(runner, mesh)
    logits, caches = prefill(runner, prompt, capacity, mesh)  # exact DenseCaches, sharded
    caches = convert_caches(caches, kvcache.preset("k4v4"), implementation="pallas")
    tokens = runner.decode(logits, caches, max_new_tokens=32)

``python -m tqjax.sharding --devices 2`` checks a sharded decode against one device on a
random model and times both (see `main`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tqjax import kvcache
from tqjax.dense_cache import DenseCache
from tqjax.models.config import ModelConfig
from tqjax.models.decoder import Decoder
from tqjax.models.generate import Runner, check_chunk

DATA, MODEL = "data", "model"


def make_mesh(devices: Sequence[jax.Device] | None = None, *, model: int | None = None,
              data: int = 1) -> Mesh:
  """A (data, model) mesh over the first ``data * model`` of ``devices`` (default: all
  devices; ``model`` defaults to all of them over ``data``)."""
  devices = list(jax.devices() if devices is None else devices)
  if data < 1:
    raise ValueError(f"{data=} must be >= 1")
  if model is None:
    if len(devices) % data:
      raise ValueError(f"{data=} must divide the number of devices {len(devices)}")
    model = len(devices) // data
  if model < 1:
    raise ValueError(f"{model=} must be >= 1")
  if data * model > len(devices):
    raise ValueError(f"a mesh of {data=} x {model=} needs {data * model} devices, "
                     f"got {len(devices)}")
  grid = np.empty((data, model), dtype=object)
  for i, d in enumerate(devices[:data * model]):
    grid[i // model, i % model] = d
  return Mesh(grid, (DATA, MODEL))


def _axis_size(mesh: Mesh, axis: str) -> int:
  if axis not in mesh.shape:
    raise ValueError(f"mesh axis {axis!r} not in the mesh's axes {tuple(mesh.shape)}")
  return mesh.shape[axis]


class CacheShardings(NamedTuple):
  """The four shardings a per-layer cache's arrays take."""
  batch_heads: NamedSharding  # [B, K, ...]
  batch: NamedSharding  # [B]
  heads: NamedSharding  # [K, ...]
  replicated: NamedSharding


def cache_shardings(mesh: Mesh, *, batch: int, num_kv_heads: int, data_axis: str = DATA,
                    model_axis: str = MODEL) -> CacheShardings:
  """Shardings of a cache with ``batch`` rows and ``num_kv_heads`` KV heads; checks that
  the mesh's axes divide them."""
  for name, value, axis in (("batch", batch, data_axis),
                            ("num_kv_heads", num_kv_heads, model_axis)):
    size = _axis_size(mesh, axis)
    if value % size:
      raise ValueError(f"{name}={value} must be divisible by the mesh axis {axis!r} of size {size}")
  named = lambda *spec: NamedSharding(mesh, P(*spec))
  return CacheShardings(named(data_axis, model_axis), named(data_axis), named(model_axis),
                        named())


# ----------------------------------------------------------------------------------------
# Caches.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ShardedCache:
  """A per-layer cache (any type with ``shardings(mesh)``) laid out over a mesh; speaks the
  cache protocol. ``attend`` runs the wrapped cache's ``attend`` per shard (`shard_map`
  over rows and KV heads); ``update`` is partitioned by XLA and keeps the shardings."""
  cache: Any
  mesh: Mesh = dataclasses.field(metadata=dict(static=True))
  data_axis: str = dataclasses.field(default=DATA, metadata=dict(static=True))
  model_axis: str = dataclasses.field(default=MODEL, metadata=dict(static=True))

  @property
  def lengths(self) -> jax.Array:
    return self.cache.lengths

  @property
  def capacity(self) -> int:
    return self.cache.capacity

  def shardings(self) -> Any:
    """The wrapped cache's `NamedSharding`s (a pytree shaped like ``cache``)."""
    return self.cache.shardings(self.mesh, data_axis=self.data_axis, model_axis=self.model_axis)

  def memory_bytes(self) -> int:
    """Bytes of the cache's arrays on all devices together."""
    return self.cache.memory_bytes()

  def update(self, k: jax.Array, v: jax.Array, q: jax.Array | None = None) -> ShardedCache:
    """Appends k, v [B, T, K, D] (and the queries q [B, T, H, D] for statistics)."""
    cache = self.cache.update(k, v) if q is None else self.cache.update(k, v, q)
    # Pinned where written; arrays passed through stay the same (a decode step can then
    # leave them out of its outputs, see `Runner.decode_step`).
    cache = jax.tree.map(lambda new, old, s: new if new is old else
                         jax.lax.with_sharding_constraint(new, s), cache, self.cache,
                         self.shardings())
    return dataclasses.replace(self, cache=cache)

  def attend(self, q: jax.Array, *, scale: float, sliding_window: int | None = None
             ) -> jax.Array:
    """Attention of q [B, T, H, D] per shard: each device attends its rows' queries of its
    KV heads' query heads (H and K split alike, so a group stays together)."""
    if q.ndim != 4:
      raise ValueError(f"expected q [B, T, H, D], got {q.shape=}")
    cache_specs = jax.tree.map(lambda s: s.spec, self.shardings())
    q_spec = P(self.data_axis, None, self.model_axis, None)  # [B, T, H, D]
    local = jax.shard_map(
        lambda cache, q: cache.attend(q, scale=scale, sliding_window=sliding_window),
        mesh=self.mesh, in_specs=(cache_specs, q_spec), out_specs=q_spec,
        check_vma=False)  # a Pallas call carries no varying-axes annotation
    return local(self.cache, q)


def unwrap(caches: Sequence[Any]) -> tuple[Any, ...]:
  """The per-layer caches inside `ShardedCache`s (others pass through)."""
  return tuple(c.cache if isinstance(c, ShardedCache) else c for c in caches)


def shard_caches(caches: Sequence[Any], mesh: Mesh, *, data_axis: str = DATA,
                 model_axis: str = MODEL) -> tuple[ShardedCache, ...]:
  """Moves a model's per-layer caches onto the mesh (their ``shardings(mesh)``) and wraps
  them; already wrapped caches are laid out anew."""
  out = []
  for cache in unwrap(caches):
    wrapped = ShardedCache(cache, mesh, data_axis, model_axis)
    out.append(dataclasses.replace(wrapped, cache=jax.device_put(cache, wrapped.shardings())))
  return tuple(out)


def build_caches(make: Callable[..., Sequence[Any]], mesh: Mesh, *args, data_axis: str = DATA,
                 model_axis: str = MODEL) -> tuple[ShardedCache, ...]:
  """Runs ``make(*args)``, which returns a model's per-layer caches (of types with
  ``shardings(mesh)``), as one jitted program whose outputs are created directly in their
  sharded layout (nothing is gathered on one device first), and wraps them. E.g. caches
  too large for one device: ``build_caches(lambda: tuple(TurboQuantCache.init(...) for
  ...), mesh)``."""
  make_tuple = lambda *a: tuple(make(*a))
  shapes = jax.eval_shape(make_tuple, *args)
  out = tuple(c.shardings(mesh, data_axis=data_axis, model_axis=model_axis) for c in shapes)
  caches = jax.jit(make_tuple, out_shardings=out)(*args)
  return tuple(ShardedCache(c, mesh, data_axis, model_axis) for c in caches)


def init_caches(config: ModelConfig | Runner, batch: int, capacity: int, mesh: Mesh,
                dtype: jnp.dtype | None = None, *, data_axis: str = DATA,
                model_axis: str = MODEL) -> tuple[ShardedCache, ...]:
  """Empty exact `DenseCache`s, created directly in their sharded layout."""
  if isinstance(config, Runner):
    dtype = dtype or config.dtype
    config = config.config
  dtype = jnp.dtype(dtype or jnp.float32)
  make = lambda: tuple(DenseCache.init(batch, config.num_kv_heads, config.head_dim, capacity, dtype)
                       for _ in range(config.num_layers))
  return build_caches(make, mesh, data_axis=data_axis, model_axis=model_axis)


def convert_caches(caches: Sequence[ShardedCache], config: kvcache.CacheConfig, *,
                   capacity: int | None = None, query_rms=None,
                   implementation: str = "xla") -> tuple[ShardedCache, ...]:
  """`tqjax.kvcache.convert_caches` for sharded caches: one jitted program whose outputs are
  created in the compressed caches' sharded layout (the inputs are kept)."""
  if not caches or not all(isinstance(c, ShardedCache) for c in caches):
    raise TypeError("expected a tuple of ShardedCache (see shard_caches / init_caches), got "
                    f"{[type(c).__name__ for c in caches]}")
  first = caches[0]
  if any((c.mesh, c.data_axis, c.model_axis) != (first.mesh, first.data_axis, first.model_axis)
         for c in caches):
    raise ValueError("the caches lie on different meshes or axes")
  convert = lambda inner, rms: kvcache.convert_caches(
      inner, config, capacity=capacity, query_rms=rms, implementation=implementation)
  return build_caches(convert, first.mesh, unwrap(caches), query_rms,
                      data_axis=first.data_axis, model_axis=first.model_axis)


# ----------------------------------------------------------------------------------------
# Weights.

# Column-parallel: the fused projections' layouts keep each device's KV-head groups and
# gate/up pairs whole (`tqjax.models.decoder.fuse_qkv`, `fuse_gate_up`).
_COLUMN = ("qkv_proj", "gate_up_proj", "lm_head")
_ROW = ("o_proj", "down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm", "norm")


def _param_spec(path: tuple[str, ...], model_axis: str) -> P:
  """Tensor-parallel layout of one parameter, from its path in the model."""
  module, name = path[-2], path[-1]
  spec = None
  if module in _COLUMN:
    spec = {"kernel": P(None, model_axis), "bias": P(model_axis)}.get(name)  # kernel [in, out]
  elif module in _ROW:
    spec = {"kernel": P(model_axis, None), "bias": P()}.get(name)
  elif module == "embed_tokens" and name == "embedding":
    spec = P(model_axis, None)  # [V, hidden]: vocabulary-parallel
  elif module in _NORMS and name == "weight":
    spec = P()
  if spec is not None:
    return spec
  raise ValueError(f"no tensor-parallel layout for the parameter {'.'.join(path)}")


def _path_names(path) -> tuple[str, ...]:
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  return tuple(n for n in names if n != "value")  # nnx.Param's own leaf


def check_model(config: ModelConfig, mesh: Mesh, *, model_axis: str = MODEL) -> None:
  """Raises ValueError unless every dimension `shard_params` splits divides by the axis."""
  size = _axis_size(mesh, model_axis)
  for name in ("num_kv_heads", "num_heads", "intermediate_size", "vocab_size"):
    value = getattr(config, name)
    if value % size:
      raise ValueError(f"{name}={value} must be divisible by the mesh axis {model_axis!r} "
                       f"of size {size}")


def param_shardings(runner: Runner, mesh: Mesh, *, model_axis: str = MODEL
                    ) -> tuple[NamedSharding, ...]:
  """The `NamedSharding` of each of ``runner.params`` (replicated over the other axes)."""
  check_model(runner.config, mesh, model_axis=model_axis)
  paths = jax.tree_util.tree_flatten_with_path(runner.state)[0]
  return tuple(NamedSharding(mesh, _param_spec(_path_names(p), model_axis)) for p, _ in paths)


def shard_params(model: Decoder | Runner, mesh: Mesh, *, model_axis: str = MODEL) -> Runner:
  """A `Runner` whose weights are laid out tensor-parallel over ``model_axis``."""
  runner = Runner.from_model(model)
  params = jax.device_put(runner.params, param_shardings(runner, mesh, model_axis=model_axis))
  return dataclasses.replace(runner, params=tuple(params))


def shard_tokens(tokens, mesh: Mesh, *, data_axis: str = DATA) -> jax.Array:
  """tokens [B, T] int32 with rows over ``data_axis``."""
  tokens = jnp.asarray(tokens, jnp.int32)
  return jax.device_put(tokens, NamedSharding(mesh, P(data_axis, None)))


def prefill(runner: Runner, tokens, capacity: int, mesh: Mesh, dtype: jnp.dtype | None = None,
            *, data_axis: str = DATA, model_axis: str = MODEL,
            logits_to_keep: int | None = None, chunk: int | None = None
            ) -> tuple[jax.Array, tuple[ShardedCache, ...]]:
  """`Runner.prefill` into sharded exact caches: (logits [B, T, V] or of the last
  ``logits_to_keep`` positions, caches); with ``chunk``, in steps of at most ``chunk``
  tokens (see `Runner.forward`)."""
  tokens = jnp.asarray(tokens, jnp.int32)
  check_chunk(chunk)
  if tokens.ndim != 2:
    raise ValueError(f"expected tokens [B, T], got {tokens.shape=}")
  tokens = shard_tokens(tokens, mesh, data_axis=data_axis)
  if capacity < tokens.shape[1]:
    raise ValueError(f"{capacity=} is smaller than the prompt length {tokens.shape[1]}")
  caches = init_caches(runner, tokens.shape[0], capacity, mesh, dtype, data_axis=data_axis,
                       model_axis=model_axis)
  return runner.forward(tokens, caches, logits_to_keep=logits_to_keep, chunk=chunk)


# ----------------------------------------------------------------------------------------
# Check and timing on N devices (for bench/e2e and the GPU run).


def _random_model(config: ModelConfig, dtype, seed: int) -> Runner:
  return Runner.from_model(Decoder(config, dtype=dtype, rngs=nnx.Rngs(seed)))


def _time_steps(runner: Runner, caches, tokens, steps: int) -> tuple[float, np.ndarray]:
  """Median ms of ``steps`` greedy jitted decode steps (after one warm-up step) and the
  tokens they chose [B, steps + 1]."""
  key = jax.random.key(0)
  nxt, caches, key = runner.decode_step(tokens, caches, key)
  nxt.block_until_ready()
  times, chosen = [], [nxt]
  for _ in range(steps):
    start = time.perf_counter()
    nxt, caches, key = runner.decode_step(nxt[:, None], caches, key)
    nxt.block_until_ready()
    times.append((time.perf_counter() - start) * 1e3)
    chosen.append(nxt)
  return statistics.median(times), np.stack([np.asarray(t) for t in chosen], axis=1)


def compare(config: ModelConfig, *, devices: int, data: int = 1, batch: int, prompt_len: int,
            steps: int, preset: str | None, implementation: str = "xla",
            window: int | None = None, dtype=jnp.float32, seed: int = 0,
            time_steps: int = 0, prefill_chunk: int | None = None) -> dict:
  """Prefill + ``steps`` teacher-forced decode steps of a random model on one device and on
  a (data, model = devices / data) mesh, exact (``preset=None``) or converted to the named
  cache preset (``window`` overrides its exact window); returns the relative logit error
  of each step (‖sharded − single‖ / ‖single‖) and, with ``time_steps``, the median
  decode-step ms of both and whether their greedy tokens agree. ``prefill_chunk``: both
  prefills run in steps of at most that many tokens (`Runner.prefill`'s ``chunk``)."""
  mesh = make_mesh(jax.devices()[:devices], data=data)
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, prompt_len + steps)), jnp.int32)
  capacity = prompt_len + steps + time_steps + 1
  runner = _random_model(config, dtype, seed)
  sharded = shard_params(runner, mesh)
  overrides = {} if window is None else dict(window=window, flush_block=min(32, window))
  cache_config = None if preset is None else kvcache.preset(preset, **overrides)

  def run(r, prefill_fn, convert_fn):
    logits, caches = prefill_fn(r, tokens[:, :prompt_len])
    if cache_config is not None:
      caches = convert_fn(caches)
    out = [np.asarray(logits[:, -1], np.float32)]
    for i in range(steps):
      logits, caches = r.forward(tokens[:, prompt_len + i:prompt_len + i + 1], caches)
      out.append(np.asarray(logits[:, -1], np.float32))
    return out, caches

  single, single_caches = run(
      runner, lambda r, t: r.prefill(t, capacity, logits_to_keep=1, chunk=prefill_chunk),
      jax.jit(lambda c: kvcache.convert_caches(c, cache_config, implementation=implementation)))
  multi, multi_caches = run(
      sharded, lambda r, t: prefill(r, t, capacity, mesh, logits_to_keep=1, chunk=prefill_chunk),
      lambda c: convert_caches(c, cache_config, implementation=implementation))
  errors = [float(np.linalg.norm(m - s) / np.linalg.norm(s)) for m, s in zip(multi, single)]
  result = dict(devices=devices, data=data, model=mesh.shape[MODEL], batch=batch,
                prompt_len=prompt_len, prefill_chunk=prefill_chunk, steps=steps,
                preset=preset or "dense",
                implementation=implementation, dtype=jnp.dtype(dtype).name,
                max_rel_logit_error=max(errors), rel_logit_errors=errors)
  if time_steps:
    last = tokens[:, -1:]
    result["single_step_ms"], want = _time_steps(runner, single_caches, last, time_steps)
    result["sharded_step_ms"], got = _time_steps(sharded, multi_caches, shard_tokens(last, mesh),
                                                 time_steps)
    result["greedy_tokens_equal"] = bool(np.array_equal(got, want))
  return result


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m tqjax.sharding --devices 2 [--shape qwen2_5_7b --layers 4 ...]``: sharded
  vs single-device logits and decode-step times on a random model; prints JSON."""
  parser = argparse.ArgumentParser(prog="python -m tqjax.sharding", description=main.__doc__)
  parser.add_argument("--devices", type=int, default=len(jax.devices()))
  parser.add_argument("--data", type=int, default=1, help="mesh rows (batch split)")
  parser.add_argument("--shape", choices=("qwen2_5_7b", "llama3_8b"), default="qwen2_5_7b")
  parser.add_argument("--layers", type=int, default=4, help="layers of the shape kept")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--prompt-len", type=int, default=512)
  parser.add_argument("--prefill-chunk", type=int, default=None,
                      help="prefill the prompt in steps of at most this many tokens")
  parser.add_argument("--steps", type=int, default=4, help="decode steps compared")
  parser.add_argument("--time-steps", type=int, default=20, help="decode steps timed")
  parser.add_argument("--presets", default="dense,k4v4", help="comma list; 'dense' = exact")
  parser.add_argument("--implementation", default="xla", choices=kvcache.IMPLEMENTATIONS)
  parser.add_argument("--window", type=int, default=None, help="exact window (preset's default)")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--tolerance", type=float, default=None,
                      help="fail (exit 1) when a relative logit error exceeds it "
                           "(default 1e-4 for float32, 5e-2 otherwise)")
  args = parser.parse_args(argv)
  config = dataclasses.replace(getattr(ModelConfig, args.shape)(), num_layers=args.layers)
  tolerance = args.tolerance or (1e-4 if args.dtype == "float32" else 5e-2)
  ok = True
  for name in args.presets.split(","):
    result = compare(config, devices=args.devices, data=args.data, batch=args.batch,
                     prompt_len=args.prompt_len, steps=args.steps,
                     preset=None if name == "dense" else name,
                     implementation=args.implementation, window=args.window,
                     dtype=jnp.dtype(args.dtype),
                     time_steps=args.time_steps, prefill_chunk=args.prefill_chunk)
    result["ok"] = result["max_rel_logit_error"] <= tolerance
    ok &= result["ok"]
    print(json.dumps(result), flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
