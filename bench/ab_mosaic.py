"""A/B of Mosaic decode variants (kwargs of `decode_mosaic.decode_mosaic`) in one process:
checked against the XLA reference, then timed alternately at the e2e layer and 64K (or
the --shapes given).

    PYTHONPATH=. python bench/ab_mosaic.py --variants '{"a": {"num_splits": 33},
        "b": {"num_splits": 37}}'

Session 16 (H100) chose one wave of programs for the table lookup: `--variants '{"1 wave":
{"programs": 264}, "2 waves": {"programs": 528}, "4 waves": {"programs": 1056}}'` gives
the splits it measured at each shape. `--preset k3v3` times the 3-bit kernel instead,
`--head-dim 64` the 4-bit kernel at 64 coordinates; `--baselines` adds the fastest fp16
baseline of each S shape and the variants' best as multiples of it.

Each shape's variants are timed in turn (`bench.kernels.time_jax`), --rounds times over, so
drift shows as a spread and not as a difference; the table last. Session 13 (H100) it
chose `ldmatrix` for the value codes and the edge-only length mask, session 15 the
shared-memory table (`--variants '{"prmt": {"lookup": "prmt"}, "smem": {"lookup":
"smem"}}'`).
"""

from __future__ import annotations

import argparse
import importlib
import json

import jax
import jax.numpy as jnp

from bench import kernels as bk
from pallas_kernels import decode as dk
from pallas_kernels import decode_mosaic as dm


def run(fn_kw, qk, kc, kn, kcb, vc, vn, vcb, lengths):
  """`decode_mosaic` with the variant's kwargs ("programs" among them: the splits for that
  many programs, by the tiling the kernel picks for the shape); "module" names another
  module with the same function (e.g. a copy of the kernel before a change)."""
  fn_kw = dict(fn_kw)
  module = importlib.import_module(fn_kw.pop("module")) if "module" in fn_kw else dm
  return module.decode_mosaic(qk, kc, kn, kcb, vc, vn, vcb, lengths, **fn_kw)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variants", required=True,
                  help='a JSON object: name -> decode_mosaic kwargs (and "module")')
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--preset", default="k4v4", choices=("k4v4", "k3v3"),
                  help="the cache's codes (the kernel's two code widths)")
  ap.add_argument("--head-dim", type=int, default=128, choices=(128, 64),
                  help="coordinates a head (64: k4v4 only)")
  ap.add_argument("--shapes", default="layer B8,layer B1,64K B8,64K B1",
                  help='a comma list of "layer B<batch>" (the e2e layer) and "<S>K B<batch>"'
                       ' (S x 1024 tokens, 8 KV heads), e.g. "16K B1,128K B8"')
  ap.add_argument("--baselines", action="store_true",
                  help="time the fp16 baselines (`bench.kernels.baselines`) of each S shape "
                       "first, and give each variant's best as a multiple of the fastest")
  args = ap.parse_args(argv)
  if args.head_dim == 64 and args.preset != "k4v4":
    raise SystemExit(f"--head-dim 64 takes --preset k4v4, got {args.preset}")
  shapes = {}
  for sname in args.shapes.split(","):
    size, _, batch = sname.strip().partition(" B")
    if not batch.isdigit() or not (size == "layer" or size[:-1].isdigit() and size[-1] == "K"):
      raise SystemExit(f'--shapes: each is "layer B<batch>" or "<S>K B<batch>", got {sname!r} '
                       f'in {args.shapes!r}')
    shapes[sname.strip()] = ((int(batch), bk.E2E_SLOTS, bk.E2E_LAYER) if size == "layer" else
                             (int(batch), int(size[:-1]) * 1024, {}))
  try:
    variants = json.loads(args.variants)
  except json.JSONDecodeError as e:
    raise SystemExit(f"--variants must be JSON, got {args.variants!r}: {e}") from None
  if (not isinstance(variants, dict) or not variants
      or not all(isinstance(kw, dict) for kw in variants.values())):
    raise SystemExit(f"--variants must map names to objects of kwargs, got {variants!r}")
  if args.rounds < 1:
    raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
  keys, values = bk.presets(args.head_dim)[args.preset]
  key = jax.random.key(3)
  # Correctness: rows of different lengths, a split boundary inside.
  qk, kc, kn, kcb, vc, vn, vcb, _ = bk.make_inputs(key, 3, 4608, keys, values, rows=7,
                                                   kv_heads=2)
  lengths = jnp.asarray([4608, 3400, 1], jnp.int32)
  ref = bk.finalize(dk.decode(qk, kc, kn, kcb, vc, vn, vcb, lengths, implementation="xla"))
  for name, kw in list(variants.items()):
    for extra in ({}, {"num_splits": 4}):
      f = lambda qk, kc, kn, vc, vn, lengths, kw=dict(kw, **extra): run(
          kw, qk, kc, kn, kcb, vc, vn, vcb, lengths)
      try:
        got = bk.finalize(jax.jit(f)(qk, kc, kn, vc, vn, lengths))
      except Exception as e:  # a variant that does not build is reported, the rest run
        print(f"check {name} {extra}: failed, not timed: {repr(e)[:300]}", flush=True)
        del variants[name]
        break
      print(f"check {name} {extra}: rel_err {bk.rel_err(got, ref):.2e}", flush=True)
  table = {}
  for sname, (B, S, shape) in shapes.items():
    extra = {}
    if shape:
      extra = dict(rows=shape["rows"], kv_heads=shape["kv_heads"],
                   lengths=jnp.full((B,), shape["valid"], jnp.int32))
    if args.baselines and not shape:
      times = {n: t for n, t in bk.baselines(B, S, args.head_dim, key).items()
               if isinstance(t, float)}
      fastest = min(times, key=times.get)
      table[(sname, "fp16")] = [times[fastest]]
      print(f"{sname} fp16: fastest {fastest} {times[fastest]:.1f} us of {times}", flush=True)
    qk, kc, kn, kcb, vc, vn, vcb, lengths = bk.make_inputs(key, B, S, keys, values, **extra)
    for r in range(args.rounds):
      for name, kw in variants.items():
        fn = lambda qk, kc, kn, vc, vn, lengths, kw=kw: run(kw, qk, kc, kn, kcb, vc, vn, vcb,
                                                            lengths)
        t = bk.time_jax(fn, (qk, kc, kn, vc, vn, lengths))
        table.setdefault((sname, name), []).append(t)
        print(f"{sname} {name} round {r}: {t:.1f} us", flush=True)
  print(f"\n{'shape':10s} " + " ".join(f"{n:>16s}" for n in variants)
        + (f" {'fp16':>8s}" if args.baselines else ""))
  for sname in shapes:
    base = table.get((sname, "fp16"), [None])[0]
    cell = lambda ts: "/".join(f"{t:.1f}" for t in ts) + (
        f" {base / min(ts):.2f}x" if base else "")
    print(f"{sname:10s} " + " ".join(f"{cell(table[(sname, n)]):>16s}" for n in variants)
          + (f" {base:8.1f}" if base else ""))


if __name__ == "__main__":
  main()
