"""Where one fused decode call spends device time: the kernel against the XLA programs
around it (the query's layout before, the split merge after), from a `jax.profiler` trace.

    PYTHONPATH=. python bench/decode_profile.py --dims 64,128 --presets k4v4,k3v3 \\
        --implementations mosaic,pallas --batch 1 --seq 16384 --out DIR

Per case (head dim x preset x implementation; one the implementation does not take is
listed as skipped with its reason): the call's time by `bench.kernels.time_jax` (a chain of
dependent calls, as in `bench/kernels.py`), then `--calls` calls of that chain traced, every
device event grouped by name and divided by the calls (`bench.profile`; the chain's own
1e-30 perturbation of the query is one small program a call). The sum of the events
against the call's time shows the launch gaps. Inputs are `bench/kernels.py`'s (Hq = 32,
Hkv = 8, random codes). Writes ``decode_profile.json`` to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax

from bench import kernels as bk
from bench import profile as bp


def profile_case(D: int, preset: str, implementation: str, B: int, S: int, *, calls: int,
                 planes: str, top: int, **kw) -> dict:
  fn, args = bk.decode_call(B, S, D, preset, jax.random.key(0), implementation, **kw)
  us = bk.time_jax(fn, args)
  chain = bk._chain(fn, calls)
  jax.block_until_ready(chain(*args))
  with tempfile.TemporaryDirectory() as trace:
    with jax.profiler.trace(trace):
      jax.block_until_ready(chain(*args))
    timelines = bp.summarize(trace, top=top, steps=calls, planes=planes)
  return dict(D=D, preset=preset, implementation=implementation, B=B, S=S, kwargs=kw,
              us=us, timelines=timelines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--dims", default="64", help="comma list of head dims (64, 128)")
  ap.add_argument("--presets", default="k4v4,k3v3")
  ap.add_argument("--implementations", default="mosaic,pallas")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--seq", type=int, default=16384, help="cached tokens a row")
  ap.add_argument("--kwargs", default="{}", help="JSON: more arguments of pallas_kernels.decode.decode")
  ap.add_argument("--calls", type=int, default=10, help="calls traced (events are divided)")
  ap.add_argument("--top", type=int, default=12, help="events a timeline")
  ap.add_argument("--planes", default="/device:",
                  help="trace plane prefix ('/host:CPU' for the XLA CPU backend)")
  ap.add_argument("--out", default=None, help="directory for decode_profile.json")
  args = ap.parse_args(argv)
  try:
    dims = [int(d) for d in args.dims.split(",") if d]
    kw = json.loads(args.kwargs)
  except ValueError as e:
    raise SystemExit(f"--dims takes integers and --kwargs a JSON object: {e}") from None
  if not isinstance(kw, dict):
    raise SystemExit(f"--kwargs must be a JSON object, got {args.kwargs!r}")
  bad = [d for d in dims if d not in (64, 128)]
  if bad or not dims:
    raise SystemExit(f"--dims: head dims are 64 and 128, got {args.dims!r}")
  if args.batch < 1 or args.seq < 1 or args.calls < 1:
    raise SystemExit(f"--batch, --seq and --calls must be >= 1, got {args.batch}, "
                     f"{args.seq}, {args.calls}")
  rows = []
  for D in dims:
    known = bk.presets(D)
    for preset in [p for p in args.presets.split(",") if p]:
      if preset not in known:
        raise SystemExit(f"--presets: {preset!r} is not one of {sorted(known)} at D = {D}")
      for implementation in [i for i in args.implementations.split(",") if i]:
        name = f"D={D} {preset} {implementation} B={args.batch} S={args.seq}"
        try:
          row = profile_case(D, preset, implementation, args.batch, args.seq,
                             calls=args.calls, planes=args.planes, top=args.top, **kw)
        except ValueError as e:  # a combination the implementation does not take
          row = dict(D=D, preset=preset, implementation=implementation, skipped=str(e))
          print(f"== {name}: skipped: {e}", flush=True)
        else:
          print(f"== {name}: {row['us']:.1f} us a call\n" + bp.format_summary(row["timelines"]),
                flush=True)
        rows.append(row)
        if args.out:  # after every case: a cut-off run keeps what it measured
          os.makedirs(args.out, exist_ok=True)
          with open(os.path.join(args.out, "decode_profile.json"), "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, rows=rows), f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
