"""Jitted prefill / chunk / decode steps and generation over any cache type.

A `Runner` holds a model split into (graphdef, flat parameters) once, so every step is one jitted
program with the caches donated (their buffers are reused in place); the programs re-trace
per cache pytree type, so compressed caches go through the same functions. The strict
protocol: prefill the prompt into exact `DenseCache`s, optionally convert them
(`convert_caches`, e.g. to a compressed cache), then feed chunks (a question) and decode.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np

from tqjax.kvcache import FlushSchedule
from tqjax.models.config import ModelConfig
from tqjax.models.decoder import Decoder, init_caches

Caches = tuple[Any, ...]


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None) -> jax.Array:
  """Next tokens [B] int32 from logits [B, V]: greedy at temperature 0, else sampled."""
  if temperature < 0:
    raise ValueError(f"{temperature=} must be >= 0")
  if top_k is not None and top_k < 1:
    raise ValueError(f"{top_k=} must be >= 1 or None")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"{top_p=} must be in (0, 1] or None")
  logits = logits.astype(jnp.float32)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep = before < top_p  # always keeps the first
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class _Graph:
  """A GraphDef and the treedef of its state as a jit static argument, hashed once.

  Hashing a GraphDef walks the whole module graph (~6 ms for 30 layers), which jit would do
  on every call, and flattening an `nnx.State` costs ~1 ms: the state travels as a flat
  tuple of arrays. Equal graphs still share compiled programs.
  """
  __slots__ = ("graphdef", "treedef", "_hash")

  def __init__(self, graphdef: nnx.GraphDef, treedef: Any):
    self.graphdef = graphdef
    self.treedef = treedef
    self._hash = hash((graphdef, treedef))

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other: object) -> bool:
    return isinstance(other, _Graph) and (self is other or (
      self.graphdef == other.graphdef and self.treedef == other.treedef))

  def merge(self, leaves: tuple[jax.Array, ...]) -> Decoder:
    return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("logits_to_keep",),
                   donate_argnums=(3,))
def _forward(graph: _Graph, params: tuple[jax.Array, ...], tokens: jax.Array, caches: Caches,
             *, logits_to_keep: int | None = None) -> tuple[jax.Array, Caches]:
  return graph.merge(params)(tokens, caches, logits_to_keep=logits_to_keep)


@functools.partial(jax.jit, static_argnames=("size",))
def _take(tokens: jax.Array, start: jax.Array, *, size: int) -> jax.Array:
  """tokens [B, T] -> tokens[:, start:start + size]: one program per size, not per start."""
  return jax.lax.dynamic_slice_in_dim(tokens, start, size, axis=1)


def check_chunk(chunk: Any) -> None:
  """``chunk`` (prompt tokens per prefill step) must be a positive int or None."""
  if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral)
                            or chunk < 1):
    raise ValueError(f"chunk must be a positive int (tokens per prefill step) or None, got "
                     f"chunk={chunk!r} ({type(chunk).__name__})")


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("capacity", "cache_dtype", "logits_to_keep"))
def _prefill(graph: _Graph, params: tuple[jax.Array, ...], tokens: jax.Array, *,
             capacity: int, cache_dtype: jnp.dtype, logits_to_keep: int | None = None
             ) -> tuple[jax.Array, Caches]:
  model = graph.merge(params)
  caches = init_caches(model.config, tokens.shape[0], capacity, cache_dtype)
  return model(tokens, caches, logits_to_keep=logits_to_keep)


def _decode_body(graph: _Graph, params: tuple[jax.Array, ...], tokens: jax.Array,
                 caches: Caches, key: jax.Array, *, temperature: float, top_k: int | None,
                 top_p: float | None) -> tuple[jax.Array, Caches, jax.Array]:
  logits, caches = graph.merge(params)(tokens, caches)
  key, sub = jax.random.split(key)
  next_tokens = sample_logits(logits[:, -1], sub, temperature=temperature, top_k=top_k,
                              top_p=top_p)
  return next_tokens, caches, key


_decode = functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3,),
                            static_argnames=("temperature", "top_k", "top_p"))(_decode_body)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(4,),
                   static_argnames=("treedef", "changed", "temperature", "top_k", "top_p"))
def _decode_changed(graph: _Graph, params: tuple[jax.Array, ...], tokens: jax.Array,
                    kept: tuple[jax.Array, ...], moved: tuple[jax.Array, ...],
                    key: jax.Array, *, treedef: Any, changed: tuple[bool, ...], **sampling
                    ) -> tuple[jax.Array, tuple[jax.Array, ...], jax.Array]:
  """`_decode` taking the caches' leaves in two groups: ``kept`` (the step passes them
  through: read, neither donated nor returned) and ``moved`` (donated, returned)."""
  caches = jax.tree.unflatten(treedef, _join(changed, kept, moved))
  next_tokens, caches, key = _decode_body(graph, params, tokens, caches, key, **sampling)
  leaves = jax.tree.leaves(caches)
  return next_tokens, tuple(x for x, c in zip(leaves, changed) if c), key


def _join(changed: tuple[bool, ...], kept, moved) -> list[Any]:
  kept, moved = iter(kept), iter(moved)
  return [next(moved) if c else next(kept) for c in changed]


_CHANGED: dict[Any, tuple[bool, ...]] = {}


def changed_leaves(graph: _Graph, params: tuple[jax.Array, ...], tokens: jax.Array,
                   caches: Caches, key: jax.Array, **sampling) -> tuple[bool, ...]:
  """Which leaves of the caches a decode step writes (the others it passes through), per
  leaf of ``jax.tree.leaves(caches)``; found by tracing the step once per structure."""
  treedef = jax.tree.structure(caches)
  memo = (graph, treedef, tokens.shape, tuple(sorted(sampling.items())))
  if memo not in _CHANGED:
    found = []

    def probe(params, tokens, caches, key):
      _, out, _ = _decode_body(graph, params, tokens, caches, key, **sampling)
      ins, outs = jax.tree.leaves(caches), jax.tree.leaves(out)
      same = jax.tree.structure(out) == treedef
      found.append(tuple(not same or o is not i for o, i in zip(outs, ins)))

    jax.eval_shape(probe, params, tokens, caches, key)
    _CHANGED[memo] = found[0]
  return _CHANGED[memo]


_sample = jax.jit(sample_logits, static_argnames=("temperature", "top_k", "top_p"))


@dataclasses.dataclass(frozen=True)
class Runner:
  """A model split once into (graphdef, state), with its jitted steps."""
  graph: _Graph
  params: tuple[jax.Array, ...]  # the flattened nnx.State
  config: ModelConfig
  dtype: jnp.dtype  # parameter dtype, the default cache dtype

  @property
  def graphdef(self) -> nnx.GraphDef:
    return self.graph.graphdef

  @property
  def state(self) -> nnx.State:
    return jax.tree.unflatten(self.graph.treedef, self.params)

  def model(self) -> Decoder:
    """The NNX model (sharing the arrays)."""
    return self.graph.merge(self.params)

  @classmethod
  def from_model(cls, model: Decoder | Runner) -> Runner:
    if isinstance(model, Runner):
      return model
    if not isinstance(model, Decoder):
      raise TypeError(f"expected a tqjax Decoder or Runner, got {type(model).__name__}")
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    return cls(_Graph(graphdef, treedef), tuple(leaves), model.config, model.dtype)

  def init_caches(self, batch: int, capacity: int, dtype: jnp.dtype | None = None) -> Caches:
    return init_caches(self.config, batch, capacity, dtype or self.dtype)

  def forward(self, tokens: jax.Array, caches: Caches, *, logits_to_keep: int | None = None,
              chunk: int | None = None) -> tuple[jax.Array, Caches]:
    """Chunk step: tokens [B, T] through caches of any type (donated) -> logits [B, T, V]
    (the last ``logits_to_keep`` positions only, when given).

    With ``chunk``, the tokens go through in steps of at most ``chunk`` tokens (a long
    prompt's attention scores are [B, H, chunk, S] instead of [B, H, T, S]); the result
    is the same as in one step up to float rounding: the caches hold every token, their
    query statistics are summed over all steps, and ``logits_to_keep`` still means the
    last positions of all T tokens (gathered across steps when they span several).
    Each distinct step length is one compiled program: a T that ``chunk`` does not divide
    compiles once more for its shorter last step. It is not padded to ``chunk``: every
    token fed is appended to the caches and counted in their statistics, so padding
    would change them (and could overflow the capacity).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    check_chunk(chunk)
    if chunk is None or tokens.ndim != 2 or tokens.shape[1] <= chunk:
      return _forward(self.graph, self.params, tokens, caches, logits_to_keep=logits_to_keep)
    t, chunk = tokens.shape[1], int(chunk)
    if logits_to_keep is not None and not 1 <= logits_to_keep <= t:
      raise ValueError(f"{logits_to_keep=} must be in [1, T={t}] or None")
    kept = []
    for start in range(0, t, chunk):
      size = min(chunk, t - start)
      # positions of this step among the last logits_to_keep of all T
      want = size if logits_to_keep is None else min(size, logits_to_keep - (t - start - size))
      logits, caches = _forward(self.graph, self.params,
                                _take(tokens, jnp.int32(start), size=size), caches,
                                logits_to_keep=None if want == size else max(want, 1))
      if want > 0:
        kept.append(logits)
    return (kept[0] if len(kept) == 1 else jnp.concatenate(kept, axis=1)), caches

  def prefill(self, tokens: jax.Array, capacity: int, dtype: jnp.dtype | None = None, *,
              logits_to_keep: int | None = None, chunk: int | None = None
              ) -> tuple[jax.Array, Caches]:
    """Fresh exact `DenseCache`s of `capacity` filled with tokens [B, T] -> (logits, caches)
    (logits [B, T, V], or of the last ``logits_to_keep`` positions).

    ``chunk``: feed the prompt in steps of at most ``chunk`` tokens (see `forward`), so the
    attention scores of a step are [B, H, chunk, capacity] instead of [B, H, T, capacity]
    (at Qwen2.5-7B shapes, B=8 and T=8192 in one step hold 56 GiB of float32 scores).
    Same logits and caches (k, v, lengths, query statistics) up to float rounding; the
    caches are created empty (dtype ``dtype`` or the parameters') and every step,
    the first included, is `forward`.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    check_chunk(chunk)
    if tokens.ndim != 2:
      raise ValueError(f"expected tokens [B, T], got {tokens.shape=}")
    if capacity < tokens.shape[1]:
      raise ValueError(f"{capacity=} is smaller than the prompt length {tokens.shape[1]}")
    if chunk is not None and chunk < tokens.shape[1]:
      caches = self.init_caches(tokens.shape[0], capacity, dtype)
      return self.forward(tokens, caches, logits_to_keep=logits_to_keep, chunk=chunk)
    return _prefill(self.graph, self.params, tokens, capacity=capacity,
                    cache_dtype=jnp.dtype(dtype or self.dtype), logits_to_keep=logits_to_keep)

  def decode_step(self, tokens: jax.Array, caches: Caches, key: jax.Array, *,
                  temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None) -> tuple[jax.Array, Caches, jax.Array]:
    """tokens [B, 1] -> (next tokens [B] int32, caches, next key); the cache arrays the
    step writes are donated.

    Only those travel through the program as donated inputs and outputs (a compressed
    cache's step writes its window and lengths; codes, scales and tables are read): every
    array a step takes and returns costs host time on each call (~4 us on the H200 host),
    and a compressed cache has 20 per layer against the exact cache's 3."""
    tokens = jnp.asarray(tokens, jnp.int32)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    leaves, treedef = jax.tree.flatten(caches)
    changed = changed_leaves(self.graph, self.params, tokens, caches, key, **sampling)
    kept = tuple(x for x, c in zip(leaves, changed) if not c)
    moved = tuple(x for x, c in zip(leaves, changed) if c)
    next_tokens, moved, key = _decode_changed(self.graph, self.params, tokens, kept, moved,
                                              key, treedef=treedef, changed=changed,
                                              **sampling)
    return next_tokens, jax.tree.unflatten(treedef, _join(changed, kept, moved)), key

  def generate(self, prompt_ids: jax.Array, *, max_new_tokens: int,
               capacity: int | None = None,
               convert_caches: Callable[[Caches], Caches] | None = None,
               temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int = 0, eos_id: int | None = None,
               prefill_chunk: int | None = None) -> jax.Array:
    """Prefills the prompt into exact DenseCaches (in steps of at most ``prefill_chunk``
    tokens when given, see `prefill`), converts them if asked, then decodes (see
    `decode`). Returns new tokens [B, N] int32."""
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1:
      raise ValueError(f"expected prompt_ids [B, T] with T >= 1, got {prompt_ids.shape}")
    if max_new_tokens < 1:
      raise ValueError(f"{max_new_tokens=} must be >= 1")
    needed = prompt_ids.shape[1] + max_new_tokens - 1  # the last token is never fed back
    capacity = needed if capacity is None else capacity
    if capacity < needed:
      raise ValueError(f"{capacity=} is too small: the prompt ({prompt_ids.shape[1]}) plus "
                       f"{max_new_tokens=} needs {needed}")
    logits, caches = self.prefill(prompt_ids, capacity, logits_to_keep=1, chunk=prefill_chunk)
    if convert_caches is not None:
      caches = convert_caches(caches)
    return self.decode(logits, caches, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                       eos_id=eos_id)

  def decode(self, logits: jax.Array, caches: Caches, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, eos_id: int | None = None
             ) -> jax.Array:
    """Continues from the logits [B, T, V] of the last prefill/chunk step: new tokens
    [B, N] int32, N <= max_new_tokens (fewer only when every row hit eos_id; rows that
    finished earlier are filled with eos_id). The caches are donated.

    E.g. NIAH: `logits, caches = prefill(document)`, `caches = convert(caches)`,
    `logits, caches = forward(question, caches)`, `decode(logits, caches, ...)`.
    """
    if max_new_tokens < 1:
      raise ValueError(f"{max_new_tokens=} must be >= 1")
    capacity = getattr(caches[0], "capacity", None)
    if capacity is not None:
      needed = int(jnp.max(caches[0].lengths)) + max_new_tokens - 1
      if needed > capacity:
        raise ValueError(f"cache capacity {capacity} is too small: {max_new_tokens=} after "
                         f"{int(jnp.max(caches[0].lengths))} stored tokens needs {needed}")
    key, sub = jax.random.split(jax.random.key(seed))
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    token = _sample(logits[:, -1], sub, **sampling)
    out = [token]
    done = None if eos_id is None else token == eos_id
    all_done = [] if done is None else [jnp.all(done)]  # per token: every row finished
    schedule = FlushSchedule(caches)  # compressed windows flushed without a branch per step
    caches = schedule.begin(caches)
    ahead = max_steps_ahead(token)
    for i in range(max_new_tokens - 1):
      # The stop test reads the token before the last: it waits for the step before the
      # one in flight, so the device is never idle while the host dispatches (reading the
      # last token would drain the queue every step). The one token it may decode past
      # the end is cut below.
      if len(all_done) >= 2 and bool(all_done[-2]):
        break
      caches = schedule.before_step(caches)
      token, caches, key = self.decode_step(token[:, None], caches, key, **sampling)
      if ahead and (i + 1) % ahead == 0:
        token.block_until_ready()
      if done is not None:
        token = jnp.where(done, jnp.int32(eos_id), token)
        done = done | (token == eos_id)
        all_done.append(jnp.all(done))
      out.append(token)
    if all_done:
      finished = np.flatnonzero(np.asarray(jnp.stack(all_done)))
      if finished.size:
        out = out[:finished[0] + 1]
    return jnp.stack(out, axis=1)


# XLA's CPU client launches each device's part of a multi-device program on a thread pool
# and caps the launches in flight per device; when the parts of later steps take the slots
# before an earlier step's part launches, that step's collectives wait for a partner that
# never starts and XLA aborts the process after 40 s (seen in the tests' 2-device runs
# about every other time). Loops of steps over several CPU devices therefore wait for
# their results every few steps.
CPU_STEPS_AHEAD = 8


def max_steps_ahead(x: jax.Array) -> int | None:
  """How many steps producing arrays placed like ``x`` a loop may dispatch before it waits
  for one: `CPU_STEPS_AHEAD` on several CPU devices, else None (no limit)."""
  devices = x.sharding.device_set
  return CPU_STEPS_AHEAD if len(devices) > 1 and next(iter(devices)).platform == "cpu" else None


def prefill(model: Decoder | Runner, tokens: jax.Array, capacity: int,
            dtype: jnp.dtype | None = None, *, logits_to_keep: int | None = None,
            chunk: int | None = None) -> tuple[jax.Array, Caches]:
  """Exact prefill into fresh DenseCaches. See `Runner.prefill`."""
  return Runner.from_model(model).prefill(tokens, capacity, dtype,
                                          logits_to_keep=logits_to_keep, chunk=chunk)


def forward(model: Decoder | Runner, tokens: jax.Array, caches: Caches
            ) -> tuple[jax.Array, Caches]:
  return Runner.from_model(model).forward(tokens, caches)


def decode(model: Decoder | Runner, logits: jax.Array, caches: Caches, *,
           max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, seed: int = 0, eos_id: int | None = None
           ) -> jax.Array:
  """Decodes after a prefill/chunk step. See `Runner.decode`."""
  return Runner.from_model(model).decode(
    logits, caches, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
    top_p=top_p, seed=seed, eos_id=eos_id)


def generate(model: Decoder | Runner, prompt_ids: jax.Array, *, max_new_tokens: int,
             capacity: int | None = None,
             convert_caches: Callable[[Caches], Caches] | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, eos_id: int | None = None,
             prefill_chunk: int | None = None) -> jax.Array:
  """Prefill exactly, convert the caches if asked, then decode. See `Runner.generate`."""
  return Runner.from_model(model).generate(
    prompt_ids, max_new_tokens=max_new_tokens, capacity=capacity,
    convert_caches=convert_caches, temperature=temperature, top_k=top_k, top_p=top_p,
    seed=seed, eos_id=eos_id, prefill_chunk=prefill_chunk)
