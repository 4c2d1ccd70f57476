"""Lloyd–Max codebooks for one coordinate of a randomly rotated unit vector.

After a random rotation, each coordinate of a unit vector in R^d follows

    f(x) = Γ(d/2) / (√π Γ((d−1)/2)) · (1 − x²)^((d−3)/2)   on [−1, 1]

(≈ N(0, 1/d) for large d). A ``bits``-bit codebook is the Lloyd–Max quantizer of f:
2**bits centroids, each the conditional mean of its cell, with the cell boundaries at the
midpoints between neighbouring centroids. Its expected distortion for unit vectors is

    D_mse = E‖x − x̂‖² = d · Σ_k ∫_{I_k} (x − c_k)² f(x) dx.

At d = 128: b = 1..4 give 0.361, 0.116, 0.034, 0.0093.

Solver (:func:`lloyd_max`, float64 numpy only). f is even, so the optimum is solved on
[0, 1] with 2**(bits−1) levels (one cell boundary fixed at 0) and mirrored, which makes
every table exactly symmetric. Integrals are taken in θ = asin x, where
f(x) dx = C cos^(d−2)θ dθ is smooth on [0, π/2] for every d ≥ 2 (this removes the
endpoint singularity of f at d = 2); each cell is integrated by composite Gauss–Legendre
quadrature (``_PANELS`` panels × ``_NODES`` nodes). For large d the upper end of the
support is cut where cos^(d−2)θ falls below e^−80 (mass beyond it is far below float64
resolution). Start from the high-resolution compander (point density ∝ f^(1/3)), take
``_LLOYD_STEPS`` Lloyd steps, then Newton steps on the centroid conditions
g_k = ∫_{I_k} (x − c_k) f dx = 0 (tridiagonal Jacobian) until the largest centroid
update is below ``_TOL`` relative to the largest centroid, then ``_NEWTON_EXTRA`` more
(quadratic convergence takes them to the float64 floor, ~1e-14 relative); a final Lloyd
step sets every centroid to its cell's conditional mean. No randomness, so generation is deterministic.

head_dim must be ≥ 2 (at d = 1 the "coordinate" is ±1 and f is not a density).

Shipped tables (``codebooks/d{head_dim}.json`` in the package ``codebooks``, head_dim in
:data:`SHIPPED_HEAD_DIMS`) are regenerated bit for bit by
``python -m tqjax.codebook generate`` and checked by ``... generate --check``. Other
head_dims are computed on first use and cached as the same kind of file under
``$TQJAX_CACHE_DIR/codebooks`` (default ``~/.cache/tqjax/codebooks``).

File schema (JSON, one file per head_dim; floats as Python ``repr``, which round-trips)::

  {
    "schema": 1,
    "head_dim": 128,
    "generator": "python -m tqjax.codebook generate",
    "method": "<density, quadrature, convergence tolerance>",
    "tables": [                       # bits 1..8, in order
      {"bits": 1,
       "centroids": [c_0, ...],       # 2**bits floats, strictly ascending, c == −c[::-1]
       "boundaries": [t_0, ...],      # 2**bits − 1 floats, t_k = (c_k + c_{k+1}) / 2
       "distortion": D_mse},          # for unit vectors, as defined above
      ...
    ]
  }

Every load validates every table (count, order, symmetry, midpoints, key, stationarity,
and the recorded distortion against one recomputed from the centroids) and raises
:class:`CodebookError` naming the file and the fault.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.resources
import json
import math
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

SCHEMA = 1
MAX_BITS = 8
MIN_HEAD_DIM = 2
SHIPPED_HEAD_DIMS = (64, 80, 96, 128, 256)
GENERATOR = "python -m tqjax.codebook generate"

_PANELS = 8  # Gauss–Legendre panels per cell.
_NODES = 16  # nodes per panel.
_LOG_CUTOFF = -80.0  # support is cut where cos^(d-2)θ < e^_LOG_CUTOFF.
_LLOYD_STEPS = 30
_NEWTON_MAX_STEPS = 100
_TOL = 1e-9  # Newton runs until max|Δc| <= _TOL * max|c| ...
_NEWTON_EXTRA = 2  # ... and then this many more steps (quadratic: to the float64 floor).

# Load-time tolerances.
_SYMMETRY_ATOL = 1e-15
_DISTORTION_RTOL = 1e-9
_STATIONARITY_RTOL = 1e-9  # |c_k − E[x | cell k]| <= this * max|c|.

METHOD = (
  "Lloyd-Max for f(x) = Gamma(d/2)/(sqrt(pi) Gamma((d-1)/2)) (1-x^2)^((d-3)/2) on [-1,1]; "
  f"solved on [0,1] with 2^(b-1) levels and mirrored; integrals in theta = asin(x) by "
  f"composite Gauss-Legendre ({_PANELS} panels x {_NODES} nodes per cell, support cut where "
  f"cos^(d-2)(theta) < exp({_LOG_CUTOFF:g})); compander start, {_LLOYD_STEPS} Lloyd steps, "
  f"Newton until max|dc| <= {_TOL:g} max|c| then {_NEWTON_EXTRA} more Newton steps, "
  "one final Lloyd step"
)


class CodebookError(ValueError):
  """A codebook file is missing or its contents are invalid."""


@dataclasses.dataclass(frozen=True)
class Codebook:
  """Lloyd–Max codebook for a coordinate of a randomly rotated unit vector in R^head_dim."""

  head_dim: int
  bits: int
  centroids: np.ndarray  # [2**bits] float64, ascending.
  boundaries: np.ndarray  # [2**bits - 1] float64, midpoints of centroids.
  distortion: float  # expected ‖x − x̂‖² for unit x.

  def __post_init__(self):
    for name in ("centroids", "boundaries"):
      a = np.array(getattr(self, name), dtype=np.float64)
      a.setflags(write=False)
      object.__setattr__(self, name, a)
    object.__setattr__(self, "distortion", float(self.distortion))

  def __eq__(self, other):
    if not isinstance(other, Codebook):
      return NotImplemented
    return (
      self.head_dim == other.head_dim
      and self.bits == other.bits
      and np.array_equal(self.centroids, other.centroids)
      and np.array_equal(self.boundaries, other.boundaries)
      and self.distortion == other.distortion
    )

  def __hash__(self):
    return hash((self.head_dim, self.bits, self.centroids.tobytes(), self.distortion))


# ----------------------------------------------------------------------------- arguments


def check_bits(bits) -> int:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
    raise TypeError(f"bits must be an int in 1..{MAX_BITS}, got {bits!r}")
  if not 1 <= bits <= MAX_BITS:
    raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
  return int(bits)


def check_head_dim(head_dim) -> int:
  if isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)):
    raise TypeError(f"head_dim must be an int >= {MIN_HEAD_DIM}, got {head_dim!r}")
  if head_dim < MIN_HEAD_DIM:
    raise ValueError(f"head_dim must be >= {MIN_HEAD_DIM}, got {head_dim}")
  return int(head_dim)


# ----------------------------------------------------------------------------- quadrature


class _Density:
  """f for one head_dim, with per-cell quadrature on the positive half in θ = asin x."""

  def __init__(self, head_dim: int):
    d = head_dim
    self.d = d
    self.p = (d - 3) / 2  # f ∝ (1 − x²)^p
    self.norm = math.exp(math.lgamma(d / 2) - math.lgamma((d - 1) / 2)) / math.sqrt(math.pi)
    if d > 2:
      # cos^(d-2)θ = e^_LOG_CUTOFF at θ_max.
      self.theta_max = math.acos(math.exp(_LOG_CUTOFF / (d - 2)))
    else:
      self.theta_max = math.pi / 2
    self.x_max = math.sin(self.theta_max)
    u, w = np.polynomial.legendre.leggauss(_NODES)
    # Composite rule on [0, 1]: _PANELS panels of _NODES nodes.
    left = np.arange(_PANELS)[:, None] / _PANELS
    self.u = (left + (u[None, :] + 1) / (2 * _PANELS)).reshape(-1)  # [P*N]
    self.w = np.broadcast_to(w / (2 * _PANELS), (_PANELS, _NODES)).reshape(-1)  # [P*N]

  def pdf(self, x: np.ndarray) -> np.ndarray:
    return self.norm * (1 - x * x) ** self.p

  def nodes(self, edges: np.ndarray):
    """Nodes x [C, P*N] and weights [C, P*N] (weights include f) for cells between edges."""
    theta = np.arcsin(np.minimum(edges, self.x_max))  # [C + 1]
    lo, width = theta[:-1, None], (theta[1:] - theta[:-1])[:, None]
    th = lo + width * self.u[None, :]
    wts = width * self.w[None, :] * self.norm * np.cos(th) ** (self.d - 2)
    return np.sin(th), wts

  def cell_moments(self, edges: np.ndarray):
    """Mass and first moment of each cell between consecutive edges."""
    x, wts = self.nodes(edges)
    return wts.sum(-1), (wts * x).sum(-1)

  def half_distortion(self, edges: np.ndarray, c: np.ndarray) -> float:
    x, wts = self.nodes(edges)
    return float((wts * (x - c[:, None]) ** 2).sum())


def _half_edges(c_pos: np.ndarray) -> np.ndarray:
  """Cell edges on [0, 1] for positive centroids c_pos (the mirror cell meets at 0)."""
  return np.concatenate([[0.0], (c_pos[:-1] + c_pos[1:]) / 2, [1.0]])


def _compander_start(dens: _Density, levels: int) -> np.ndarray:
  """Centroids at the (k − ½)/levels quantiles of the point density ∝ f^(1/3) on [0, 1]."""
  th = np.linspace(0.0, dens.theta_max, 20001)
  g = np.cos(th) ** (dens.d / 3)  # f^(1/3) dx ∝ cos^(d/3)θ dθ
  cum = np.concatenate([[0.0], np.cumsum((g[1:] + g[:-1]) / 2 * np.diff(th))])
  q = (np.arange(levels) + 0.5) / levels * cum[-1]
  return np.sin(np.interp(q, cum, th))


def _tridiagonal_solve(lower, diag, upper, rhs):
  """Thomas algorithm (plain loops: deterministic, no LAPACK)."""
  n = len(diag)
  cp = np.empty(n)
  dp = np.empty(n)
  cp[0] = upper[0] / diag[0] if n > 1 else 0.0
  dp[0] = rhs[0] / diag[0]
  for i in range(1, n):
    m = diag[i] - lower[i - 1] * cp[i - 1]
    cp[i] = upper[i] / m if i < n - 1 else 0.0
    dp[i] = (rhs[i] - lower[i - 1] * dp[i - 1]) / m
  out = np.empty(n)
  out[-1] = dp[-1]
  for i in range(n - 2, -1, -1):
    out[i] = dp[i] - cp[i] * out[i + 1]
  return out


def _solve_half(dens: _Density, levels: int) -> np.ndarray:
  """Positive-half Lloyd–Max centroids (ascending) for ``levels`` levels."""
  c = _compander_start(dens, levels)
  for _ in range(_LLOYD_STEPS):
    m, m1 = dens.cell_moments(_half_edges(c))
    c = m1 / m
  if levels > 1:
    extra = None
    for _ in range(_NEWTON_MAX_STEPS):
      t = _half_edges(c)
      m, m1 = dens.cell_moments(t)
      g = m1 - c * m  # [L] centroid conditions
      # dg_k/dt_k = (t_k − c_k) f(t_k), dg_k/dt_{k−1} = −(t_{k−1} − c_k) f(t_{k−1}),
      # t_k = (c_k + c_{k+1}) / 2: the Jacobian dg/dc is tridiagonal.
      ft = dens.pdf(t[1:-1])  # [L − 1] interior edges
      a = (t[1:-1] - c[:-1]) * ft / 2  # ∂g_k/∂t_k · ½ for k < L − 1
      b = -(t[1:-1] - c[1:]) * ft / 2  # ∂g_{k+1}/∂t_k · ½
      diag = -m.copy()
      diag[:-1] += a
      diag[1:] += b
      step = _tridiagonal_solve(b, diag, a, -g)
      if not np.all(np.isfinite(step)):
        raise RuntimeError(f"Newton step not finite for head_dim={dens.d}, {levels=}")
      scale = 1.0
      while True:  # Halve the step until the centroids stay ordered inside (0, x_max).
        new = c + scale * step
        if new[0] > 0 and np.all(np.diff(new) > 0) and new[-1] < dens.x_max:
          break
        scale /= 2
      c = new
      if extra is None and np.max(np.abs(scale * step)) <= _TOL * c[-1]:
        extra = _NEWTON_EXTRA
      if extra is not None:
        if extra == 0:
          break
        extra -= 1
    else:
      raise RuntimeError(f"Newton did not converge for head_dim={dens.d}, {levels=}")
  m, m1 = dens.cell_moments(_half_edges(c))
  return m1 / m


def _mirror(c_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  centroids = np.concatenate([-c_pos[::-1], c_pos])
  return centroids, (centroids[:-1] + centroids[1:]) / 2


def lloyd_max(head_dim: int, bits: int) -> Codebook:
  """Solve the Lloyd–Max codebook for a coordinate of a random unit vector in R^head_dim."""
  head_dim, bits = check_head_dim(head_dim), check_bits(bits)
  dens = _Density(head_dim)
  c_pos = _solve_half(dens, 2 ** (bits - 1))
  centroids, boundaries = _mirror(c_pos)
  distortion = head_dim * 2 * dens.half_distortion(_half_edges(c_pos), c_pos)
  return Codebook(head_dim, bits, centroids, boundaries, distortion)


def expected_distortion(head_dim: int, centroids: np.ndarray) -> float:
  """d · Σ_k ∫_{I_k} (x − c_k)² f dx for sorted centroids, cells split at midpoints."""
  dens = _Density(check_head_dim(head_dim))
  c = np.asarray(centroids, dtype=np.float64)
  edges = np.concatenate([[-1.0], (c[:-1] + c[1:]) / 2, [1.0]])
  # Integrate each cell as its positive and negative parts (f is even).
  pos = np.maximum(edges, 0.0)
  neg = np.maximum(-edges[::-1], 0.0)
  return head_dim * (dens.half_distortion(pos, c) + dens.half_distortion(neg, -c[::-1]))


def conditional_means(head_dim: int, centroids: np.ndarray) -> np.ndarray:
  """E[x | x in cell k] for the cells of sorted centroids (split at midpoints)."""
  dens = _Density(check_head_dim(head_dim))
  c = np.asarray(centroids, dtype=np.float64)
  edges = np.concatenate([[-1.0], (c[:-1] + c[1:]) / 2, [1.0]])
  pm, pm1 = dens.cell_moments(np.maximum(edges, 0.0))
  nm, nm1 = dens.cell_moments(np.maximum(-edges[::-1], 0.0))
  return (pm1 - nm1[::-1]) / (pm + nm[::-1])


# ----------------------------------------------------------------------------- files


def _table_json(cb: Codebook) -> dict:
  return {
    "bits": cb.bits,
    "centroids": [float(v) for v in cb.centroids],
    "boundaries": [float(v) for v in cb.boundaries],
    "distortion": cb.distortion,
  }


def file_text(head_dim: int) -> str:
  """The exact contents of the codebook file for head_dim (all bits 1..MAX_BITS)."""
  doc = {
    "schema": SCHEMA,
    "head_dim": head_dim,
    "generator": GENERATOR,
    "method": METHOD,
    "tables": [_table_json(lloyd_max(head_dim, b)) for b in range(1, MAX_BITS + 1)],
  }
  return json.dumps(doc, indent=1) + "\n"


def _fail(path, msg: str):
  raise CodebookError(f"codebook file {path}: {msg}")


def _validate_table(path, head_dim: int, t) -> Codebook:
  if not isinstance(t, dict) or set(t) != {"bits", "centroids", "boundaries", "distortion"}:
    _fail(path, "each table must be an object with keys bits, centroids, boundaries, distortion; "
                f"got {t!r:.200}")
  bits = t["bits"]
  if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
    _fail(path, f"table bits must be an int in 1..{MAX_BITS}, got {bits!r}")
  where = f"table bits={bits}"
  try:
    c = np.array(t["centroids"], dtype=np.float64)
    bd = np.array(t["boundaries"], dtype=np.float64)
    dist = float(t["distortion"])
  except (TypeError, ValueError) as e:
    _fail(path, f"{where}: centroids/boundaries/distortion must be numbers ({e})")
  n = 2**bits
  if c.shape != (n,):
    _fail(path, f"{where}: expected {n} centroids, got shape {c.shape}")
  if bd.shape != (n - 1,):
    _fail(path, f"{where}: expected {n - 1} boundaries, got shape {bd.shape}")
  if not (np.all(np.isfinite(c)) and np.all(np.abs(c) < 1)):
    _fail(path, f"{where}: centroids must be finite and inside (-1, 1)")
  if not np.all(np.diff(c) > 0):
    k = int(np.argmin(np.diff(c)))
    _fail(path, f"{where}: centroids not strictly ascending at index {k}: {c[k]!r} >= {c[k + 1]!r}")
  asym = float(np.max(np.abs(c + c[::-1])))
  if asym > _SYMMETRY_ATOL:
    _fail(path, f"{where}: centroids not symmetric, max|c + c[::-1]| = {asym:.3g} > {_SYMMETRY_ATOL:g}")
  mid_err = float(np.max(np.abs(bd - (c[:-1] + c[1:]) / 2), initial=0.0))
  if not np.all(np.isfinite(bd)) or mid_err > _SYMMETRY_ATOL:
    _fail(path, f"{where}: boundaries are not the centroid midpoints (max error {mid_err:.3g})")
  means = conditional_means(head_dim, c)
  stat_err = float(np.max(np.abs(means - c)) / c[-1])
  if stat_err > _STATIONARITY_RTOL:
    _fail(path, f"{where}: centroids are not the conditional means of their cells "
                f"(max error {stat_err:.3g} relative > {_STATIONARITY_RTOL:g})")
  want = expected_distortion(head_dim, c)
  if not abs(dist - want) <= _DISTORTION_RTOL * want:
    _fail(path, f"{where}: recorded distortion {dist!r} != {want!r} recomputed from the centroids")
  return Codebook(head_dim, bits, c, bd, dist)


def load_file(path: os.PathLike | str, head_dim: int | None = None) -> dict[int, Codebook]:
  """Read and validate a codebook file; returns {bits: Codebook} for bits 1..MAX_BITS."""
  path = pathlib.Path(path)
  try:
    text = path.read_text()
  except FileNotFoundError:
    raise CodebookError(f"codebook file {path} does not exist") from None
  except OSError as e:
    raise CodebookError(f"codebook file {path} cannot be read: {e}") from None
  return _parse(path, text, head_dim)


def _parse(path, text: str, head_dim: int | None) -> dict[int, Codebook]:
  try:
    doc = json.loads(text)
  except json.JSONDecodeError as e:
    _fail(path, f"invalid JSON ({e})")
  if not isinstance(doc, dict):
    _fail(path, f"expected a JSON object, got {type(doc).__name__}")
  for key in ("schema", "head_dim", "generator", "method", "tables"):
    if key not in doc:
      _fail(path, f"missing key {key!r}")
  if doc["schema"] != SCHEMA:
    _fail(path, f"schema must be {SCHEMA}, got {doc['schema']!r}")
  d = doc["head_dim"]
  if isinstance(d, bool) or not isinstance(d, int) or d < MIN_HEAD_DIM:
    _fail(path, f"head_dim must be an int >= {MIN_HEAD_DIM}, got {d!r}")
  if head_dim is not None and d != head_dim:
    _fail(path, f"expected head_dim={head_dim}, file has head_dim={d}")
  tables = doc["tables"]
  if not isinstance(tables, list):
    _fail(path, f"tables must be a list, got {type(tables).__name__}")
  out = {}
  for t in tables:
    cb = _validate_table(path, d, t)
    if cb.bits in out:
      _fail(path, f"duplicate table for bits={cb.bits}")
    out[cb.bits] = cb
  want = list(range(1, MAX_BITS + 1))
  if list(out) != want:
    _fail(path, f"expected tables for bits {want} in order, got {list(out)}")
  return out


def shipped_dir() -> pathlib.Path:
  """Directory of the shipped tables (the ``codebooks`` package)."""
  return pathlib.Path(str(importlib.resources.files("codebooks")))


def cache_dir() -> pathlib.Path:
  """Where on-demand tables are cached: $TQJAX_CACHE_DIR/codebooks or ~/.cache/tqjax/codebooks."""
  root = os.environ.get("TQJAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tqjax")
  return pathlib.Path(root) / "codebooks"


def file_name(head_dim: int) -> str:
  return f"d{head_dim}.json"


def _write_atomic(path: pathlib.Path, text: str):
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


@functools.lru_cache(maxsize=None)
def _tables(head_dim: int, cache: pathlib.Path | None) -> dict[int, Codebook]:
  if cache is None:
    res = importlib.resources.files("codebooks").joinpath(file_name(head_dim))
    label = f"codebooks/{file_name(head_dim)}"
    try:
      text = res.read_text()
    except FileNotFoundError:
      raise CodebookError(
        f"codebook file {label} (shipped with the package) does not exist; "
        f"regenerate with `{GENERATOR}`"
      ) from None
    return _parse(label, text, head_dim)
  path = cache / file_name(head_dim)
  if not path.exists():
    _write_atomic(path, file_text(head_dim))
  try:
    return load_file(path, head_dim)
  except CodebookError as e:
    raise CodebookError(f"{e} (a cached table: delete the file to recompute it)") from None


def get_codebook(head_dim: int, bits: int) -> Codebook:
  """The Lloyd–Max codebook for (head_dim, bits): shipped table or computed and cached."""
  head_dim, bits = check_head_dim(head_dim), check_bits(bits)
  cache = None if head_dim in SHIPPED_HEAD_DIMS else cache_dir()
  return _tables(head_dim, cache)[bits]


# ----------------------------------------------------------------------------- CLI


def generate(out_dir: os.PathLike | str | None = None, check: bool = False,
             head_dims=SHIPPED_HEAD_DIMS) -> list[str]:
  """Write (or with check=True, compare) the shipped files; returns the names that differ."""
  out = pathlib.Path(out_dir) if out_dir is not None else shipped_dir()
  differ = []
  for d in head_dims:
    text = file_text(d)
    path = out / file_name(d)
    if check:
      if not path.exists() or path.read_bytes() != text.encode():
        differ.append(str(path))
    else:
      _write_atomic(path, text)
  return differ


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m tqjax.codebook", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  gen = sub.add_parser("generate", help="regenerate the shipped tables codebooks/d*.json")
  gen.add_argument("--check", action="store_true",
                   help="regenerate in memory; exit 1 if a shipped file differs byte for byte")
  gen.add_argument("--out", default=None, help="directory (default: the codebooks package)")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  differ = generate(args.out, check=args.check)
  secs = time.perf_counter() - start
  if args.check:
    if differ:
      print("differs from the generator:\n  " + "\n  ".join(differ), file=sys.stderr)
      return 1
    print(f"codebooks match the generator ({secs:.2f} s)")
  else:
    print(f"wrote {len(SHIPPED_HEAD_DIMS)} codebook files in {secs:.2f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
