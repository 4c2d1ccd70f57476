"""A few calls of the fused decode kernel at one preset and shape, for a profiler.

    PYTHONPATH=. ncu --target-processes all -k regex:tq_decode -c 1 --set full -o DIR/k4v4 \\
        python bench/ncu_decode.py --preset k4v4 --batch 8 --seq 65536
    ncu --import DIR/k4v4.ncu-rep --page details      # registers, occupancy, pipes, stalls
    # the Mosaic kernel at the e2e model's layer (Hkv 4, G 7, 32K of 33,024 slots), and
    # per-instruction counts and stalls of its SASS:
    PYTHONPATH=. ncu --target-processes all -k regex:mosaic -c 1 --set full -o DIR/layer \\
        python bench/ncu_decode.py --implementation mosaic --layer --batch 8
    ncu --import DIR/layer.ncu-rep --page source --print-source sass --csv > DIR/sass.csv

The inputs are `bench/kernels.py`'s (Hq = 32, Hkv = 8, random codes, D = 128; with
--layer its `E2E_LAYER` at `E2E_SLOTS`); tiling arguments pass through to
`pallas_kernels.decode.decode`. Prints the mean time of a few
calls (under a profiler that replays the kernel it means nothing).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from bench import kernels as bk
from pallas_kernels import decode as dk


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="k4v4", help=f"one of {sorted(bk.presets(128))}")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=65536, help="compressed tokens per row")
  ap.add_argument("--calls", type=int, default=3)
  for name in ("block_s", "num_warps", "num_stages", "num_splits"):
    ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
  ap.add_argument("--lookup", default=None)
  ap.add_argument("--implementation", default="pallas", choices=("pallas", "mosaic"),
                  help="on a GPU (the CPU runs the xla reference)")
  ap.add_argument("--layer", action="store_true",
                  help="the e2e model's layer (Hkv 4, G 7, 32,768 valid of 33,024 slots) "
                       "instead of Hkv 8, G 4 and --seq")
  args = ap.parse_args(argv)
  if args.preset not in bk.presets(128):
    raise SystemExit(f"--preset must be one of {sorted(bk.presets(128))}, got {args.preset!r}")
  if args.batch < 1 or args.seq < 1 or args.calls < 1:
    raise SystemExit(f"--batch, --seq and --calls must be >= 1, got {args.batch}, "
                     f"{args.seq}, {args.calls}")
  tiling = {k: getattr(args, k) for k in ("block_s", "num_warps", "num_stages", "num_splits",
                                          "lookup") if getattr(args, k) is not None}
  keys, values = bk.presets(128)[args.preset]
  if args.layer:
    seq, layer = bk.E2E_SLOTS, bk.E2E_LAYER
    shape = dict(rows=layer["rows"], kv_heads=layer["kv_heads"],
                 lengths=jnp.full((args.batch,), layer["valid"], jnp.int32))
  else:
    seq, shape = args.seq, {}
  qk, kc, kn, kcb, vc, vn, vcb, lengths = bk.make_inputs(
      jax.random.key(0), args.batch, seq, keys, values, **shape)
  implementation = args.implementation if jax.default_backend() == "gpu" else "xla"
  fn = jax.jit(lambda qk, kc, kn, vc, vn, lengths: dk.decode(
      qk, kc, kn, kcb, vc, vn, vcb, lengths, implementation=implementation, **tiling))
  jax.block_until_ready(fn(qk, kc, kn, vc, vn, lengths))  # compile
  start = time.perf_counter()
  for _ in range(args.calls):
    out = fn(qk, kc, kn, vc, vn, lengths)
  jax.block_until_ready(out)
  us = (time.perf_counter() - start) / args.calls * 1e6
  print(f"{args.preset} B={args.batch} S={seq} {implementation} {tiling}: {us:.1f} us "
        f"per call (mean of {args.calls})")


if __name__ == "__main__":
  main()
