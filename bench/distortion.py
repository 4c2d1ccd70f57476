"""Distortion of TurboQuant_mse and TurboQuant_prod beside the paper's values and bounds.

For each head_dim and bit width, on ``--n`` random unit vectors x and as many independent
random unit queries y (one jitted call per configuration):

* ``d_mse``   = E‖x − x̂‖²                 (paper Thm 1: 4^-b ≤ D_mse ≤ √3π/2 · 4^-b)
* ``d_prod_x_d`` = d · E(⟨y, x⟩ − ⟨y, x̂⟩)²  (paper Thm 2: 4^-b ≤ d·D_prod ≤ √3π² · 4^-b)
* ``slope``   least-squares slope of the estimate ⟨y, x̂⟩ against the truth ⟨y, x⟩
              (1 for the unbiased prod quantizer; 2/π for 1-bit mse)

    python -m bench.distortion --out out/distortion

prints a table, writes ``distortion.json`` (one row per method, head_dim and bits) and
``distortion.png`` (log scale, measured against the bounds) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from tqjax import quantizer as qz

# The paper's reported values (Fig. 3 / Sec. 3) at d = 128.
PAPER = {
    "mse": {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009},
    "prod": {1: 1.57, 2: 0.56, 3: 0.18, 4: 0.047},
}


def bounds(method: str, bits: int) -> tuple[float, float]:
  """(lower, upper) bound of d_mse (mse) or d·D_prod (prod) for unit vectors."""
  upper = (math.sqrt(3) * math.pi / 2 if method == "mse" else math.sqrt(3) * math.pi**2)
  return 4.0**-bits, upper * 4.0**-bits


def unit_vectors(key, n: int, dim: int):
  x = jax.random.normal(key, (n, dim), jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@jax.jit
def _measure(quantizer: qz.Quantizer, x, y):
  encoded = qz.encode(quantizer, x)
  x_hat = qz.decode(quantizer, encoded)
  truth = jnp.sum(x * y, axis=-1)
  estimate = qz.inner_product(quantizer, y, encoded)
  t, e = truth - truth.mean(), estimate - estimate.mean()
  return dict(
      d_mse=jnp.mean(jnp.sum((x - x_hat)**2, axis=-1)),
      d_prod=jnp.mean((truth - estimate)**2),
      slope=jnp.sum(t * e) / jnp.sum(t * t),
  )


def measure(config: qz.QuantizerConfig, n: int, seed: int = 0) -> dict:
  """One row of the table for ``config``."""
  kx, ky = jax.random.split(jax.random.key(seed))
  x = unit_vectors(kx, n, config.head_dim)
  y = unit_vectors(ky, n, config.head_dim)
  stats = {k: float(v) for k, v in _measure(qz.Quantizer.create(config), x, y).items()}
  lower, upper = bounds(config.kind, config.bits)
  return dict(
      method=config.kind, head_dim=config.head_dim, bits=config.bits, n=n,
      d_mse=stats["d_mse"], d_prod_x_d=stats["d_prod"] * config.head_dim, slope=stats["slope"],
      paper=PAPER[config.kind].get(config.bits) if config.head_dim == 128 else None,
      lower=lower, upper=upper, bits_per_coordinate=config.bits_per_coordinate)


def plot(rows: list[dict], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  panels = (("mse", "d_mse", "D_mse = E‖x − x̂‖²"), ("prod", "d_prod_x_d", "d · D_prod"))
  for ax, (method, field, title) in zip(axes, panels):
    bits = sorted({r["bits"] for r in rows})
    b = np.array(bits, float)
    lower, upper = zip(*(bounds(method, int(k)) for k in bits))
    ax.plot(b, upper, "k--", label="upper bound")
    ax.plot(b, lower, "k:", label="lower bound")
    for head_dim in sorted({r["head_dim"] for r in rows}, reverse=True):
      for m, style in (("mse", "o-"), ("prod", "s-")):
        sel = [r for r in rows if r["method"] == m and r["head_dim"] == head_dim]
        if sel:
          ax.plot([r["bits"] for r in sel], [r[field] for r in sel], style,
                  label=f"TurboQuant_{m}, d={head_dim}")
    paper = PAPER[method]
    ax.plot(list(paper), list(paper.values()), "r*", ms=10, label=f"paper ({method}, d=128)")
    ax.set_yscale("log")
    ax.set_xlabel("bits per coordinate (b)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def format_table(rows: list[dict]) -> str:
  head = f"{'method':6} {'d':>4} {'b':>2} {'D_mse':>9} {'d*D_prod':>9} {'slope':>7} {'paper':>7} {'lower':>8} {'upper':>8}"
  lines = [head, "-" * len(head)]
  for r in rows:
    paper = "" if r["paper"] is None else f"{r['paper']:.4g}"
    lines.append(f"{r['method']:6} {r['head_dim']:4d} {r['bits']:2d} {r['d_mse']:9.5f} "
                 f"{r['d_prod_x_d']:9.4f} {r['slope']:7.4f} {paper:>7} {r['lower']:8.4g} {r['upper']:8.4g}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(prog="tqjax distortion", description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/distortion"))
  parser.add_argument("--n", type=int, default=100_000, help="random unit vectors per row")
  parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
  parser.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4, 5])
  parser.add_argument("--rotation", choices=("hadamard", "haar"), default="hadamard")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.n < 2:
    parser.error(f"--n must be at least 2, got {args.n}")

  start = time.perf_counter()
  rows = []
  for head_dim in args.head_dims:
    for method in ("mse", "prod"):
      for bits in args.bits:
        config = qz.QuantizerConfig(head_dim, bits, kind=method, rotation=args.rotation, seed=args.seed)
        rows.append(measure(config, args.n, args.seed))
  args.out.mkdir(parents=True, exist_ok=True)
  meta = dict(n=args.n, seed=args.seed, rotation=args.rotation, backend=jax.default_backend(),
              jax=jax.__version__, seconds=round(time.perf_counter() - start, 2))
  (args.out / "distortion.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
  plot(rows, args.out / "distortion.png")
  print(format_table(rows))
  print(f"wrote {args.out / 'distortion.json'} and {args.out / 'distortion.png'} in {meta['seconds']} s")
  return rows


if __name__ == "__main__":
  main()
