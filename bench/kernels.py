"""Benchmark of the Pallas kernels against fp16 decode attention, in one run.

    PYTHONPATH=. python bench/kernels.py --out DIR            # full grid
    PYTHONPATH=. python bench/kernels.py --quick --out DIR    # B=8/1, S=64K, D=128
    PYTHONPATH=. python bench/kernels.py --dims 64 --presets k4v4,k3v3 --out DIR
                                                # the full grid's D = 64 half, two presets
    PYTHONPATH=. python bench/kernels.py --sweep --dims 64 --presets k4v4,k3v3 \
        --implementations pallas --no-encode --out DIR  # the Triton tilings at D = 64
    PYTHONPATH=. python bench/kernels.py --sweep --out DIR    # tiling sweep (tuning)
    PYTHONPATH=. python bench/kernels.py --sweep --quick --presets k4v4 \
        --implementations mosaic --out DIR                     # the Mosaic kernel's tilings
    PYTHONPATH=. python bench/kernels.py --layer-sweep --quick --presets k4v4 --out DIR
                                                # ... and its splits at the e2e model's layer
    PYTHONPATH=. python bench/kernels.py --quick --presets k3v3,k2v2 --lookups select,lut \
        --out DIR                                              # lookups side by side

Checks correctness first (kernel vs the jnp reference on identical random codes), then
times, for B in {1, 8}, Hq = 32, Hkv = 8, D in {128, 64}, S in {4K, 16K, 64K, 128K}, our
fused decode per preset against the fp16 baselines measured in the same run: jax's
Pallas ``decode_attention.gqa`` (on its own [B, S, K, D] layout, which it transposes per
call), the same Pallas kernel (``mqa``) on a [B, K, S, D] cache, the XLA reference
(einsum), ``jax.nn.dot_product_attention(implementation="cudnn")`` and torch SDPA
(each backend that accepts the shape); k4v4 and k3v3 at D = 128 and k4v4 at 64 also by
the Mosaic GPU kernel (rows ".../mosaic", `pallas_kernels.decode_mosaic`). Also encode
throughput.

Timing: each jax function is jitted as a chain of n dependent calls (an optimization
barrier between them) and timed by the device-synchronized wall clock for two chain
lengths; the difference over the extra calls is one call, without dispatch overhead.
Median over repetitions. Torch is timed with a CUDA graph of n calls and CUDA events.
Per row: microseconds, bytes read, TB/s, fraction of the copy bandwidth measured in
the same run, speedup against the fastest fp16 baseline of the same shape.
Writes ``kernels.json`` to ``--out`` and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import decode as dk
from tqjax import packing

HQ, HKV = 32, 8
G = HQ // HKV


def presets(head_dim: int) -> dict[str, tuple[list[tuple[int, int]], list[tuple[int, int]]]]:
  """name -> (key segments, value segments), each a list of (dim, bits)."""
  q, h = head_dim // 4, head_dim // 2
  return {
      "k4v4": ([(head_dim, 4)], [(head_dim, 4)]),
      "k3v3": ([(head_dim, 3)], [(head_dim, 3)]),
      "k2v2": ([(head_dim, 2)], [(head_dim, 2)]),
      "prod4": ([(head_dim, 3), (head_dim, 1)], [(head_dim, 4)]),
      "split2.5": ([(q, 3), (head_dim - q, 2)], [(q, 3), (head_dim - q, 2)]),
      "k3.5v3.5": ([(h, 4), (h, 3)], [(h, 4), (h, 3)]),  # the outlier-split preset
      "k5v3": ([(head_dim, 5)], [(head_dim, 3)]),  # the 4-bit preset NIAH keeps lossless
      "k3.5v2.5": ([(h, 4), (h, 3)], [(h, 3), (h, 2)]),  # the 3-bit NIAH preset
      "k4v4-e4m3": ([(head_dim, 4)], [(head_dim, 4)]),  # codebooks on the float8 grid
  }


# Presets whose codebooks are not Lloyd-Max's (`tqjax.codebook.get_codebook`'s grid).
GRIDS = {"k4v4-e4m3": "e4m3"}


def centroids(dim: int, bits: int, grid: str = "lloyd-max") -> np.ndarray:
  """The project's codebook (Lloyd-Max, or on the e4m3 grid), float16-exact (so a
  kernel's float16 table equals the reference's float32 one)."""
  from tqjax import codebook
  c = np.asarray(codebook.get_codebook(dim, bits, grid).centroids, np.float32)
  return c.astype(np.float16).astype(np.float32)


def make_inputs(key, B, S, keys, values, *, rows=G, lengths=None, kv_heads=HKV,
                grid="lloyd-max"):
  ks = jax.random.split(key, 16)
  qk, kc, kn, kcb, vc, vn, vcb = [], [], [], [], [], [], []
  for i, (d, b) in enumerate(keys):
    qk.append(jax.random.normal(ks[i], (B, kv_heads, rows, d), jnp.float32)
              .astype(jnp.float16).astype(jnp.float32) * 2)
    kc.append(jax.random.randint(ks[4 + i], (B, kv_heads, S, packing.packed_size(d, b)), 0, 256,
                                 jnp.int32).astype(jnp.uint8))
    kn.append(jax.random.uniform(ks[8 + i], (B, kv_heads, S), jnp.float32, 0.5, 2.0)
              .astype(jnp.float16))
    kcb.append(centroids(d, b, grid))
  for j, (d, b) in enumerate(values):
    vc.append(jax.random.randint(ks[12 + j], (B, kv_heads, S, packing.packed_size(d, b)), 0, 256,
                                 jnp.int32).astype(jnp.uint8))
    vn.append(jax.random.uniform(ks[14 + j], (B, kv_heads, S), jnp.float32, 0.5, 2.0)
              .astype(jnp.float16))
    vcb.append(centroids(d, b, grid))
  if lengths is None:
    lengths = jnp.full((B,), S, jnp.int32)
  return qk, kc, kn, kcb, vc, vn, vcb, lengths


def compressed_bytes(B, S, keys, values, scale_bytes=2, kv_heads=HKV) -> int:
  per_token = sum(packing.packed_size(d, b) + scale_bytes for d, b in keys + values)
  return B * kv_heads * S * per_token


def lut_bits(B, S, keys, values, **kw) -> list[int]:
  """Bit widths of the segments that take the byte-permute lookup under `kw`'s tiling."""
  from pallas_kernels import tuned_block_sizes
  cfg = tuned_block_sizes.decode_config(
      batch=B, kv_heads=HKV, seq_len=S, head_dim=sum(d for d, _ in keys),
      key_bits=tuple(b for _, b in keys), value_bits=tuple(b for _, b in values))
  tiling = dict(block_s=kw.get("block_s") or cfg.block_s,
                num_warps=kw.get("num_warps") or cfg.num_warps)
  return [b for d, b in keys + values
          if dk.lut_layout(dk.SegmentLayout(d, b), tuple(float(x) for x in centroids(d, b)),
                           kw.get("lookup") or "lut", **tiling)]


def finalize(p: dk.Partial):
  return [a / p.l[..., None] for a in p.acc]


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ----------------------------------------------------------------------------------------
# Timing.


def _chain(fn, n):
  """n dependent calls: each perturbs the first argument by 1e-30 * (a result scalar).

  The perturbation is a real data dependency (an optimization barrier is not: XLA
  drops it and dead-code-eliminates all but the last call).
  """
  def run(x, *rest):
    out = None
    for _ in range(n):
      out = fn(x, *rest)
      s = jax.tree.leaves(out)[0].ravel()[0].astype(jnp.float32) * 1e-30
      x = jax.tree.map(lambda a: a + s.astype(a.dtype), x)
    return out
  return jax.jit(run)


def time_jax(fn, args, *, n_small=2, span_s=4e-3, max_calls=32, reps=7) -> float:
  """Microseconds per call of ``fn(*args)`` (args[0] must be an array, and a small one: the
  chain adds to it on every call, so a cache there puts a pass over it into the time, as
  session 16 found timing the Mosaic kernel with its codes first): the difference of
  two chains of dependent calls over the calls between them, the long chain sized to run
  about `span_s` (at most `max_calls`; host-timer jitter of tens of microseconds then
  moves a 50 us kernel by a few percent, against ~20% with a fixed 8), median of `reps`."""
  def per_call(small, big, n_big):
    t0 = time.perf_counter()
    jax.block_until_ready(small(*args))
    t1 = time.perf_counter()
    jax.block_until_ready(big(*args))
    t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) / (n_big - n_small)

  small, probe = _chain(fn, n_small), _chain(fn, 8)
  jax.block_until_ready(small(*args))
  jax.block_until_ready(probe(*args))
  guess = max(statistics.median(per_call(small, probe, 8) for _ in range(3)), 1e-6)
  n_big = int(min(max_calls, max(8, n_small + math.ceil(span_s / guess))))
  big = probe if n_big == 8 else _chain(fn, n_big)
  jax.block_until_ready(big(*args))
  samples = [per_call(small, big, n_big) * 1e6 for _ in range(reps)]
  if statistics.median(samples) <= 0:
    raise RuntimeError(f"timing failed (non-positive): {samples}")
  return statistics.median(samples)


def time_torch(fn, *, n=8, reps=5) -> float:
  import torch
  s = torch.cuda.Stream()
  s.wait_stream(torch.cuda.current_stream())
  with torch.cuda.stream(s):
    for _ in range(3):
      fn()
  torch.cuda.current_stream().wait_stream(s)
  g = torch.cuda.CUDAGraph()
  with torch.cuda.graph(g):
    for _ in range(n):
      fn()
  g.replay()
  torch.cuda.synchronize()
  samples = []
  for _ in range(reps):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    torch.cuda.synchronize()
    samples.append(a.elapsed_time(b) * 1e3 / n)
  return statistics.median(samples)


def copy_bandwidth(results: dict) -> float:
  """Bytes/s of a device-to-device copy (read + write) through torch (CUDA graph)."""
  import torch
  nbytes = 2 << 30
  a = torch.randint(0, 1 << 30, (nbytes // 4,), dtype=torch.int32, device="cuda")
  b = torch.empty_like(a)
  t = time_torch(lambda: b.copy_(a))
  bw = 2 * nbytes / (t * 1e-6)
  results.setdefault("copy_bandwidth", []).append(bw)
  del a, b
  torch.cuda.empty_cache()
  return bw


# ----------------------------------------------------------------------------------------
# Baselines (fp16, Hq = 32, Hkv = 8).


def baselines(B, S, D, key) -> dict[str, float]:
  k1, k2, k3 = jax.random.split(key, 3)
  q = jax.random.normal(k1, (B, HQ, D), jnp.float16)
  k_bksd = jax.random.normal(k2, (B, HKV, S, D), jnp.float16)
  v_bksd = jax.random.normal(k3, (B, HKV, S, D), jnp.float16)
  scale = 1 / math.sqrt(D)
  out: dict[str, float] = {}

  def xla_ref(q, k, v):
    qg = q.reshape(B, HKV, G, D)
    s = jnp.einsum("bkgd,bksd->bkgs", qg, k, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bkgs,bksd->bkgd", p.astype(v.dtype), v)

  cands = {"xla_einsum": (xla_ref, (q, k_bksd, v_bksd))}
  try:
    from jax.experimental.pallas.ops.gpu import decode_attention as da
    k_bskd = jnp.swapaxes(k_bksd, 1, 2)
    v_bskd = jnp.swapaxes(v_bksd, 1, 2)
    cands["pallas_gqa_bskd"] = (lambda q, k, v: da.gqa(q, k, v), (q, k_bskd, v_bskd))
    def mqa_bksd(q, k, v):
      qg = q.reshape(B * HKV, G, D)
      o = da.mqa(qg, k.reshape(B * HKV, S, D), v.reshape(B * HKV, S, D))
      return o
    cands["pallas_mqa_bksd"] = (mqa_bksd, (q, k_bksd, v_bksd))
  except Exception as e:
    out["pallas_error"] = repr(e)
  def cudnn(q, k, v):
    return jax.nn.dot_product_attention(q[:, None], k, v, implementation="cudnn")
  cands["jax_cudnn_bskd"] = (cudnn, (q, jnp.swapaxes(k_bksd, 1, 2), jnp.swapaxes(v_bksd, 1, 2)))
  for name, (fn, args) in cands.items():
    try:
      out[name] = time_jax(fn, args)
    except Exception as e:
      out[name + "_error"] = repr(e).splitlines()[0][:200]
  del cands
  try:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    tq = torch.randn(B, HQ, 1, D, dtype=torch.float16, device="cuda")
    tk = torch.randn(B, HKV, S, D, dtype=torch.float16, device="cuda")
    tv = torch.randn(B, HKV, S, D, dtype=torch.float16, device="cuda")
    for name, backend in [("torch_cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("torch_flash", SDPBackend.FLASH_ATTENTION)]:
      # (EFFICIENT_ATTENTION has no GQA kernel for these shapes: "No available kernel".)
      def f(backend=backend):
        with sdpa_kernel(backend):
          return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True)
      try:
        f()
        torch.cuda.synchronize()
        out[name] = time_torch(f)
      except Exception as e:
        out[name + "_error"] = repr(e).splitlines()[0][:200]
    del tq, tk, tv
    torch.cuda.empty_cache()
  except Exception as e:
    out["torch_error"] = repr(e).splitlines()[0][:200]
  return out


# ----------------------------------------------------------------------------------------


def check_decode(key, results, impl_kwargs) -> bool:
  """Kernel vs reference on identical random codes, every preset, ragged lengths."""
  ok = True
  for D in (128, 64):
    for name, (keys, values) in presets(D).items():
      B, S = 3, 4096 + 37
      lengths = jnp.asarray([S, 1000, 0], jnp.int32)
      args = make_inputs(key, B, S, keys, values, lengths=lengths,
                         grid=GRIDS.get(name, "lloyd-max"))
      ref = dk.decode(*args, implementation="xla")
      out = dk.decode(*args, implementation="pallas", **impl_kwargs)
      rows = [0, 1]  # row 2 is empty: l = 0
      err = max(rel_err(np.asarray(a)[rows], np.asarray(b)[rows])
                for a, b in zip(finalize(out), finalize(ref)))
      empty_ok = bool(jnp.all(out.l[2] == 0)) and all(bool(jnp.all(a[2] == 0)) for a in out.acc)
      good = err < 3e-3 and empty_ok and all(bool(jnp.all(jnp.isfinite(a))) for a in out.acc)
      lut = lut_bits(B, S, keys, values, **impl_kwargs)
      results.setdefault("checks", []).append(
          {"D": D, "preset": name, "rel_err": err, "empty_row_ok": empty_ok, "ok": good,
           "lut_bits": lut})
      print(f"check D={D} {name:9s} rel_err={err:.2e} empty_ok={empty_ok} lut_bits={lut} "
            f"{'OK' if good else 'FAIL'}", flush=True)
      ok &= good
  return ok


def decode_call(B, S, D, preset, key, implementation="pallas", shape=None, **kw):
  """(fn, args) of one decode call on random inputs, as `bench_decode` times it."""
  keys, values = presets(D)[preset]
  shape = shape or {}
  lengths = (jnp.full((B,), shape["valid"], jnp.int32) if "valid" in shape else None)
  qk, kc, kn, kcb, vc, vn, vcb, lengths = make_inputs(
      key, B, S, keys, values, rows=shape.get("rows", G), lengths=lengths,
      kv_heads=shape.get("kv_heads", HKV), grid=GRIDS.get(preset, "lloyd-max"))
  # Centroids are closed over: constants of the compiled program, as in the cache.
  fn = lambda qk, kc, kn, vc, vn, lengths: dk.decode(
      qk, kc, kn, kcb, vc, vn, vcb, lengths, implementation=implementation, **kw)
  return fn, (qk, kc, kn, vc, vn, lengths)


def bench_decode(B, S, D, preset, key, implementation="pallas", shape=None, **kw):
  """(us, bytes read) of one decode call; `shape`: dict(kv_heads, rows, valid) instead of
  the module's Hkv = 8, G = 4 and every slot valid."""
  t = time_jax(*decode_call(B, S, D, preset, key, implementation, shape, **kw))
  keys, values = presets(D)[preset]
  return t, compressed_bytes(B, S, keys, values, kv_heads=(shape or {}).get("kv_heads", HKV))


# One attention layer of the e2e model at Qwen2.5-7B shapes: 4 KV heads of 7 query heads,
# a 32K context in a cache of 33,024 slots (`bench/e2e.py`'s capacity).
E2E_LAYER = dict(kv_heads=4, rows=7, valid=32768)
E2E_SLOTS = 33024


def layer_sweep(key, results, dump) -> None:
  """The Triton kernel and Mosaic splits at the e2e layer (`E2E_LAYER`), B = 8 and 1."""
  # Whole waves of the 3 blocks an SM that fit (396 programs on the H200): B = 8 12, 24,
  # 37 splits; B = 1 99 (and 129, the most with 2 steps each).
  for B, splits in ((8, (None, 12, 16, 24, 29, 33, 37)), (1, (None, 64, 99, 129))):
    for kw in [dict(implementation="pallas")] + [
        dict(implementation="mosaic", num_splits=n) for n in splits]:
      try:
        t, nbytes = bench_decode(B, E2E_SLOTS, 128, "k4v4", key, shape=E2E_LAYER, **kw)
        row = dict(B=B, S=E2E_SLOTS, **E2E_LAYER, us=round(t, 1), tbps=nbytes / t * 1e-6, **kw)
      except Exception as e:
        row = dict(B=B, S=E2E_SLOTS, **E2E_LAYER, error=repr(e)[:300], **kw)
      results["layer_sweep"].append(row)
      print("layer", row, flush=True)
      dump()


def check_variant(key, preset, implementation="pallas", head_dim=128, **kw) -> float:
  keys, values = presets(head_dim)[preset]
  B, S = 2, 2048 + (128 if implementation == "mosaic" else 37)  # mosaic: whole 128-token steps
  if implementation == "mosaic" and "num_splits" in kw:  # a sweep's splits are for S = 64K
    kw = dict(kw, num_splits=min(kw["num_splits"], S // kw.get("block_s", 128)))
  qk, kc, kn, kcb, vc, vn, vcb, lengths = make_inputs(
      key, B, S, keys, values, lengths=jnp.asarray([S, 999], jnp.int32),
      grid=GRIDS.get(preset, "lloyd-max"))
  ref = dk.decode(qk, kc, kn, kcb, vc, vn, vcb, lengths, implementation="xla")
  out = jax.jit(lambda qk, kc, kn, vc, vn, lengths: dk.decode(
      qk, kc, kn, kcb, vc, vn, vcb, lengths, implementation=implementation, **kw))(
          qk, kc, kn, vc, vn, lengths)
  return max(rel_err(a, b) for a, b in zip(finalize(out), finalize(ref)))


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=".")
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--sweep", action="store_true")
  ap.add_argument("--layer-sweep", action="store_true",
                  help="k4v4 at the e2e model's layer (Qwen2.5-7B: Hkv 4, G 7, 32K of 33,024 "
                       "slots): the Triton kernel and Mosaic splits (default = None)")
  ap.add_argument("--no-check", action="store_true")
  ap.add_argument("--no-encode", action="store_true", help="skip the encode throughput")
  ap.add_argument("--presets", default="",
                  help="comma list of presets for the table (and, with --sweep, the only "
                       "presets swept)")
  ap.add_argument("--lookups", default="",
                  help='comma list of decode lookups to time per preset, e.g. "select,lut" '
                       '(default: the kernel\'s default)')
  ap.add_argument("--implementations", default="pallas,mosaic",
                  help='comma list of decode kernels to time: "pallas" (Triton-lowered) and '
                       '"mosaic" (Mosaic GPU: k4v4 and k3v3 at D = 128, k4v4 at 64)')
  ap.add_argument("--dims", default=None,
                  help="comma list of head dims (128, 64) of the full grid (default both) "
                       "and of --sweep (default 128; the Mosaic kernel's rows k4v4 only at 64); "
                       "--quick: 128")
  args = ap.parse_args(argv)
  dims = None
  if args.dims is not None:
    try:
      dims = [int(d) for d in args.dims.split(",")]
    except ValueError:
      dims = []
    if not dims or set(dims) - {128, 64}:
      ap.error(f"--dims: a comma list of 128 and 64, got {args.dims!r}")
  impls = args.implementations.split(",")
  if not impls or set(impls) - {"pallas", "mosaic"}:
    ap.error(f'--implementations: a comma list of "pallas" and "mosaic", got '
             f'{args.implementations!r}')
  os.makedirs(args.out, exist_ok=True)
  results: dict = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                   "rows": [], "sweep": [], "layer_sweep": []}
  key = jax.random.key(0)
  copy_bandwidth(results)  # warms the clocks up
  bw = copy_bandwidth(results)
  print(f"copy bandwidth: {results['copy_bandwidth']}", flush=True)
  results["copy_bandwidth_used"] = bw
  if not args.no_check:
    results["check_ok"] = check_decode(key, results, {})
  out_path = os.path.join(args.out, "kernels.json")

  def dump():
    with open(out_path, "w") as f:
      json.dump(results, f, indent=1)

  if args.sweep:
    # Session 2 (the 4-bit joined lut, 64 tokens / 4 warps / 2 stages: 510 us at B = 8) and
    # session 3 (2- and 3-bit lut at that tiling) found the tilings around these; session
    # 4: the 4-bit "nibbles" layout ("lut") with fewer warps and tokens per program.
    tile = lambda bs, w, st, **kw: dict(block_s=bs, num_warps=w, num_stages=st, **kw)
    configs = [(8, 65536, "k4v4", tile(64, 4, 2, lookup="lut-joined"))]
    configs += [(8, 65536, "k4v4", tile(*t)) for t in
                ((32, 1, 2), (32, 1, 3), (32, 2, 3), (64, 1, 2), (16, 1, 2))]
    configs += [(8, 65536, "k4v4", tile(32, 1, 2, num_splits=32))]
    configs += [(1, 65536, "k4v4", tile(*t)) for t in ((32, 1, 2), (32, 2, 2), (16, 1, 2))]
    configs += [(1, 65536, "k4v4", tile(32, 1, 2, num_splits=256))]
    configs += [(B, 65536, p, tile(*t)) for p in ("k3v3", "k2v2") for B in (8, 1)
                for t in ((64, 4, 2), (32, 2, 2), (32, 1, 2), (64, 2, 3))]
    if args.presets:  # only the given presets, over the tilings above
      configs = [(B, 65536, p, tile(*t)) for p in args.presets.split(",") for B in (8, 1)
                 for t in ((32, 1, 2), (32, 1, 3), (32, 2, 2), (32, 2, 3), (64, 2, 2),
                           (64, 4, 2), (16, 1, 2))]
    if not args.presets or "k4v4" in args.presets.split(","):
      # The Mosaic GPU kernel: step (block_s) x stages x splits (programs = 8 B splits).
      configs += [(B, 65536, "k4v4", dict(implementation="mosaic", block_s=bs, num_stages=st,
                                          num_splits=n))
                  for B, splits in ((8, (8, 16, 32)), (1, (64, 128, 256)))
                  for bs in (128, 64) for st in (2, 3) for n in splits]
    configs = [(D, *c) for D in dims or [128] for c in configs  # Mosaic rows: k4v4 only
               if c[3].get("implementation", "pallas") in impls]
    for D, B, S, preset, kw in configs:
      try:
        err = (check_variant(key, preset, head_dim=D, **kw) if kw.get("lookup") != "none"
               else None)
        t, nbytes = bench_decode(B, S, D, preset, key, **kw)
        lut = [] if kw.get("implementation") == "mosaic" else lut_bits(
            B, S, *presets(D)[preset], **kw)
        row = dict(D=D, B=B, S=S, preset=preset, us=round(t, 1), tbps=nbytes / t * 1e-6,
                   err=err, lut_bits=lut, **kw)
      except Exception as e:
        row = dict(D=D, B=B, S=S, preset=preset, error=repr(e)[:300], **kw)
      results["sweep"].append(row)
      print("sweep", row, flush=True)
      dump()

  if args.layer_sweep:
    layer_sweep(key, results, dump)

  # Encode before the decode rows: ~1 minute, and a job cut short by its time share
  # (bench/h200.py) then still has it (session 13 and 14 on the H100 lost it at the end).
  if not args.no_encode:
    try:
      results["encode"] = bench_encode(key)
      for row in results["encode"].values():  # quantizer -> variant -> numbers
        for r in row.values():
          if "tbps" in r:
            r["frac_copy_bw"] = r["tbps"] * 1e12 / bw
    except Exception as e:
      traceback.print_exc()
      results["encode"] = {"error": repr(e)[:300]}
    dump()

  shapes = ([(8, 128, 65536), (1, 128, 65536)] if args.quick else
            [(B, D, S) for D in dims or (128, 64) for B in (8, 1)
             for S in (4096, 16384, 65536, 131072)])
  names = args.presets.split(",") if args.presets else list(presets(128))
  lookups = args.lookups.split(",") if args.lookups else [None]
  for B, D, S in shapes:
    base = baselines(B, S, D, key)
    fp16_bytes = 2 * B * HKV * S * D * 2
    times = {k: v for k, v in base.items() if isinstance(v, float)}
    fastest = min(times.values()) if times else float("nan")
    for name, t in base.items():
      if isinstance(t, float):
        results["rows"].append(dict(kind="baseline", name=name, B=B, D=D, S=S, us=t,
                                    bytes=fp16_bytes, frac_copy_bw=fp16_bytes / (t * 1e-6) / bw,
                                    speedup=fastest / t))
      else:
        results["rows"].append(dict(kind="baseline", name=name, B=B, D=D, S=S, error=t))
    for name in names:
      # The Mosaic GPU kernel (pallas_kernels.decode_mosaic) where it applies: k4v4 and k3v3
      # at D = 128, k4v4 at 64.
      mosaic = (presets(D)[name] in (([(128, 4)], [(128, 4)]), ([(128, 3)], [(128, 3)]),
                                     ([(64, 4)], [(64, 4)]))
                and "mosaic" in impls)
      kernels = ["mosaic"] if mosaic else []
      for lookup in (lookups if "pallas" in impls else []) + kernels:
        kw = ({"implementation": "mosaic"} if lookup == "mosaic" else
              {"lookup": lookup} if lookup else {})
        label = f"{name}/{lookup}" if lookup else name
        lut = [] if lookup in kernels else lut_bits(B, S, *presets(D)[name], **kw)
        try:
          err = check_variant(key, name, head_dim=D, **kw) if lookup else None  # else checked
          t, nbytes = bench_decode(B, S, D, name, key, **kw)
          results["rows"].append(dict(kind="tq_decode", name=label, B=B, D=D, S=S, us=t,
                                      bytes=nbytes, frac_copy_bw=nbytes / (t * 1e-6) / bw,
                                      speedup=fastest / t, lut_bits=lut, rel_err=err))
        except Exception as e:
          traceback.print_exc()
          results["rows"].append(dict(kind="tq_decode", name=label, B=B, D=D, S=S,
                                      error=repr(e)[:300], lut_bits=lut))
        print(results["rows"][-1], flush=True)
        dump()

  print(f"\ndevice {results['device']}  copy bw {bw / 1e12:.2f} TB/s  "
        f"check_ok={results.get('check_ok')}")
  print(f"{'kind':9s} {'name':16s} {'B':>2s} {'D':>4s} {'S':>7s} {'us':>9s} {'MB':>8s} "
        f"{'bw%':>5s} {'x fp16':>7s}")
  for r in results["rows"]:
    if "us" in r:
      print(f"{r['kind'][:9]:9s} {r['name'][:16]:16s} {r['B']:2d} {r['D']:4d} {r['S']:7d} "
            f"{r['us']:9.1f} {r['bytes'] / 1e6:8.1f} {100 * r['frac_copy_bw']:5.1f} "
            f"{r['speedup']:7.2f}")
  if "encode" in results:
    print("encode", results["encode"])


def bench_encode(key) -> dict:
  from pallas_kernels import encode as ek
  return ek.bench(key)


if __name__ == "__main__":
  main()
