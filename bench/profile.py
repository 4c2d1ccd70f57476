"""Where a traced program spends device time: a `jax.profiler` trace summarized as a table.

    python -m bench.profile DIR [--top 25] [--steps 3]

DIR is a folder given to `jax.profiler.trace` (e.g. ``bench/e2e.py --profile-dir``; every
``*.xplane.pb`` below it is read). For each device plane (``/device:GPU:0`` ...) and each
of its timelines (CUDA streams, XLA ops, XLA modules) the events are grouped by name:
total time, count, share of the timeline's busy time. ``--steps`` divides totals by the
number of traced steps, giving per-step numbers. The busy time of a stream against the
span from its first to its last event shows the launch gaps.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
from typing import Any

from jax.profiler import ProfileData


def summarize(path: str, *, top: int = 25, steps: int = 1,
              planes: str = "/device:") -> list[dict[str, Any]]:
  """Per timeline of the planes whose name starts with `planes`: {plane, line, span_us, busy_us, events: [(name, us, count)]},
  times divided by `steps`. `path` is an ``.xplane.pb`` file or a folder holding one."""
  if steps < 1:
    raise ValueError(f"{steps=} must be >= 1")
  files = [path] if os.path.isfile(path) else sorted(
      glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True))
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb under {path!r} (a jax.profiler.trace folder)")
  out = []
  for file in files:
    for plane in ProfileData.from_file(file).planes:
      if not plane.name.startswith(planes):
        continue
      for line in plane.lines:
        totals: dict[str, float] = collections.defaultdict(float)
        counts: collections.Counter = collections.Counter()
        first, last, busy = None, None, 0.0
        for ev in line.events:
          totals[ev.name] += ev.duration_ns
          counts[ev.name] += 1
          busy += ev.duration_ns
          first = ev.start_ns if first is None else min(first, ev.start_ns)
          last = ev.end_ns if last is None else max(last, ev.end_ns)
        if not counts:
          continue
        ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
        out.append(dict(
            file=file, plane=plane.name, line=line.name,
            span_us=(last - first) / 1e3 / steps, busy_us=busy / 1e3 / steps,
            events=[(name, ns / 1e3 / steps, counts[name] / steps) for name, ns in ranked]))
  return out


def format_summary(rows: list[dict[str, Any]], *, width: int = 90) -> str:
  lines = []
  for row in rows:
    lines.append(f"{row['plane']} | {row['line']}: busy {row['busy_us']:.0f} us of a "
                 f"{row['span_us']:.0f} us span")
    for name, us, count in row["events"]:
      share = us / row["busy_us"] if row["busy_us"] else 0.0
      lines.append(f"  {us:10.1f} us {share:6.1%} x{count:<7.1f} {name[:width]}")
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
  ap.add_argument("path", help="a jax.profiler trace folder or .xplane.pb file")
  ap.add_argument("--top", type=int, default=25, help="events per timeline")
  ap.add_argument("--steps", type=int, default=1, help="traced steps (totals are divided)")
  ap.add_argument("--planes", default="/device:", help="plane name prefix ('/host:CPU' on a CPU)")
  ap.add_argument("--json", default=None, help="also write the summary here")
  args = ap.parse_args(argv)
  rows = summarize(args.path, top=args.top, steps=args.steps, planes=args.planes)
  print(format_summary(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
