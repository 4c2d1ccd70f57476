"""Lloyd–Max codebooks: paper numbers, Monte Carlo, stationarity, file validation, cache."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil

import numpy as np
import pytest

from tqjax import codebook
from tqjax.codebook import CodebookError, get_codebook, lloyd_max, load_file


def _shipped_path(head_dim: int) -> pathlib.Path:
  return codebook.shipped_dir() / codebook.file_name(head_dim)


@pytest.mark.parametrize("bits,want", [(1, 0.361), (2, 0.116), (3, 0.034), (4, 0.0093)])
def test_distortion_d128_matches_paper(bits, want):
  cb = get_codebook(128, bits)
  assert cb.distortion == pytest.approx(want, rel=0.03)
  # Three significant digits, as in DESIGN §1.
  assert float(f"{cb.distortion:.3g}") == pytest.approx(want, rel=0.012)


def test_b2_centroids_scaled():
  cb = get_codebook(128, 2)
  np.testing.assert_allclose(cb.centroids * math.sqrt(128), [-1.5052, -0.4525, 0.4525, 1.5052], atol=1e-3)


def test_closed_forms_small_d():
  # d = 3: f is uniform on [-1, 1], the optimum is the uniform quantizer.
  for bits in (1, 3):
    n = 2**bits
    cb = lloyd_max(3, bits)
    np.testing.assert_allclose(cb.centroids, (np.arange(n) + 0.5) * 2 / n - 1, atol=1e-13)
    assert cb.distortion == pytest.approx(3 * (2 / n) ** 2 / 12, rel=1e-12)
  # d = 2 (arcsine density, singular at ±1), 1 bit: c = E|x| = 2/π, D = 2 (1/2 − c²).
  cb = lloyd_max(2, 1)
  np.testing.assert_allclose(cb.centroids, [-2 / math.pi, 2 / math.pi], rtol=1e-14)
  assert cb.distortion == pytest.approx(2 * (0.5 - (2 / math.pi) ** 2), rel=1e-13)


def test_large_d_tends_to_gaussian():
  # Lloyd–Max for N(0, 1) (Max 1960): D = 1 − 2/π, 0.1175, 0.03454, 0.009497 for b = 1..4.
  for bits, want in [(1, 1 - 2 / math.pi), (2, 0.1175), (3, 0.03454), (4, 0.009497)]:
    assert lloyd_max(8191, bits).distortion == pytest.approx(want, rel=2e-3)


@pytest.mark.parametrize("head_dim,bits", [(61, 2), (128, 3), (96, 4)])
def test_monte_carlo(head_dim, bits):
  rng = np.random.default_rng(head_dim * 10 + bits)
  cb = get_codebook(head_dim, bits)
  n = 20011
  x = rng.standard_normal((n, head_dim))
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  idx = np.searchsorted(cb.boundaries, x)
  err = np.sum((x - cb.centroids[idx]) ** 2, axis=-1)  # [n]
  stderr = err.std() / math.sqrt(n)
  assert abs(err.mean() - cb.distortion) < 4 * stderr, (err.mean(), cb.distortion, stderr)
  # Nearest-centroid search gives the same cells as the midpoints.
  nearest = np.argmin(np.abs(x[:997, :, None] - cb.centroids), axis=-1)
  np.testing.assert_array_equal(nearest, idx[:997])


def _cell_means(head_dim: int, centroids: np.ndarray) -> np.ndarray:
  """Conditional means computed independently of the module: exact first moments
  (∫ x (1−x²)^p dx = −(1−x²)^(p+1) / (2(p+1))) over masses from composite
  Gauss–Legendre in x (64 panels × 40 nodes per cell)."""
  p = (head_dim - 3) / 2
  edges = np.concatenate([[-1.0], (centroids[:-1] + centroids[1:]) / 2, [1.0]])
  u, w = np.polynomial.legendre.leggauss(40)
  means = []
  for a, b in zip(edges[:-1], edges[1:]):
    first = ((1 - a * a) ** (p + 1) - (1 - b * b) ** (p + 1)) / (2 * (p + 1))
    grid = np.linspace(a, b, 65)
    lo, hi = grid[:-1, None], grid[1:, None]
    xs = lo + (hi - lo) * (u + 1) / 2
    mass = np.sum((hi - lo) / 2 * w * (1 - xs * xs) ** p)
    means.append(first / mass)
  return np.array(means)


@pytest.mark.parametrize("head_dim", codebook.SHIPPED_HEAD_DIMS)
def test_shipped_tables_valid_and_stationary(head_dim):
  tables = load_file(_shipped_path(head_dim), head_dim)
  assert sorted(tables) == list(range(1, 9))
  for bits, cb in tables.items():
    assert cb is not None and cb.head_dim == head_dim and cb.bits == bits
    c = cb.centroids
    assert c.dtype == np.float64 and c.shape == (2**bits,)
    assert cb.boundaries.shape == (2**bits - 1,)
    assert np.all(np.diff(c) > 0)
    np.testing.assert_array_equal(c, -c[::-1])
    np.testing.assert_array_equal(cb.boundaries, (c[:-1] + c[1:]) / 2)
    assert not c.flags.writeable and not cb.boundaries.flags.writeable
    np.testing.assert_allclose(_cell_means(head_dim, c), c, rtol=0, atol=1e-9 * c[-1])
    np.testing.assert_allclose(codebook.conditional_means(head_dim, c), c, rtol=0, atol=1e-12 * c[-1])
    assert cb == get_codebook(head_dim, bits)
  # More bits, less distortion, never below the 4^-b lower bound nor above √3π/2 · 4^-b.
  d = [tables[b].distortion for b in range(1, 9)]
  assert all(x > y for x, y in zip(d, d[1:]))
  for b, x in zip(range(1, 9), d):
    assert 4.0**-b < x < math.sqrt(3) * math.pi / 2 * 4.0**-b


def test_solver_matches_shipped():
  # To the last bits: numpy's float64 sin/cos differ between builds and CPUs.
  fresh, shipped = lloyd_max(128, 8), get_codebook(128, 8)
  np.testing.assert_allclose(fresh.centroids, shipped.centroids, rtol=0,
                             atol=codebook.REGENERATE_RTOL * shipped.centroids[-1])
  assert fresh.distortion == pytest.approx(shipped.distortion, rel=codebook.REGENERATE_RTOL)


def test_generate_check_passes():
  assert codebook.generate(check=True) == []


def test_generate_check_detects_difference(tmp_path):
  for d in codebook.SHIPPED_HEAD_DIMS:
    shutil.copy(_shipped_path(d), tmp_path / codebook.file_name(d))
  assert codebook.generate(tmp_path, check=True) == []
  # Layout alone is no difference; a centroid off by 1e-10 of the largest, or another
  # method text, is.
  path = tmp_path / "d80.json"
  path.write_text(path.read_text().replace('"schema": 1', '"schema":  1'))
  assert codebook.generate(tmp_path, check=True, head_dims=(64, 80)) == []
  doc = json.loads(path.read_text())
  table = doc["tables"][3]
  table["centroids"][-1] += 1e-10 * table["centroids"][-1]
  path.write_text(json.dumps(doc))
  assert codebook.generate(tmp_path, check=True, head_dims=(64, 80)) == [str(path)]
  other = tmp_path / "d96.json"
  doc = json.loads(other.read_text())
  doc["method"] += " "
  other.write_text(json.dumps(doc))
  assert codebook.generate(tmp_path, check=True, head_dims=(96,)) == [str(other)]
  assert codebook.main(["generate", "--check", "--out", str(tmp_path)]) == 1


def _tamper(tmp_path, edit) -> pathlib.Path:
  doc = json.loads(_shipped_path(64).read_text())
  edit(doc)
  path = tmp_path / "d64.json"
  path.write_text(json.dumps(doc))
  return path


def _table(doc, bits):
  return doc["tables"][bits - 1]


def _shift_pair(doc):
  c = _table(doc, 3)["centroids"]
  c[0] *= 1.01
  c[-1] *= 1.01
  _table(doc, 3)["boundaries"] = [(a + b) / 2 for a, b in zip(c, c[1:])]


@pytest.mark.parametrize(
  "edit,match",
  [
    (lambda doc: _table(doc, 2)["centroids"].pop(), "expected 4 centroids"),
    (lambda doc: _table(doc, 2)["centroids"].reverse(), "not strictly ascending"),
    (lambda doc: _table(doc, 4).update(distortion=_table(doc, 4)["distortion"] * (1 + 1e-6)),
     "recorded distortion"),
    (lambda doc: _table(doc, 2)["centroids"].__setitem__(0, -0.3), "not symmetric"),
    (lambda doc: _table(doc, 2)["boundaries"].__setitem__(0, -0.1), "midpoints"),
    (_shift_pair, "conditional means"),
    (lambda doc: doc.update(head_dim=80), "head_dim=64"),
    (lambda doc: doc.update(schema=2), "schema"),
    (lambda doc: doc["tables"].pop(), "expected tables for bits"),
    (lambda doc: doc.pop("generator"), "generator"),
  ],
)
def test_corrupt_file_raises(tmp_path, edit, match):
  path = _tamper(tmp_path, edit)
  with pytest.raises(CodebookError, match=match) as info:
    load_file(path, 64)
  assert str(path) in str(info.value)


def test_bad_json_and_missing_file(tmp_path):
  path = tmp_path / "d64.json"
  path.write_text(_shipped_path(64).read_text()[:-200])
  with pytest.raises(CodebookError, match="invalid JSON") as info:
    load_file(path, 64)
  assert str(path) in str(info.value)
  missing = tmp_path / "d999.json"
  with pytest.raises(CodebookError, match="does not exist") as info:
    load_file(missing)
  assert str(missing) in str(info.value)


@pytest.mark.parametrize("bits", [0, 9, -1, 2.5, "2", True, None])
def test_bad_bits(bits):
  with pytest.raises((TypeError, ValueError), match=r"bits must .*got"):
    get_codebook(64, bits)
  with pytest.raises((TypeError, ValueError), match=r"bits must"):
    lloyd_max(64, bits)


@pytest.mark.parametrize("head_dim", [1, 0, -128, 64.0, "64", None, False])
def test_bad_head_dim(head_dim):
  with pytest.raises((TypeError, ValueError), match=r"head_dim must .*got"):
    get_codebook(head_dim, 2)


def test_on_demand_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("TQJAX_CACHE_DIR", str(tmp_path))
  cb = get_codebook(np.int64(37), 3)
  path = tmp_path / "codebooks" / "d37.json"
  assert path.exists()
  assert cb == lloyd_max(37, 3)
  assert get_codebook(37, 3) is cb  # memoized
  # A fresh read of the cached file gives the same tables.
  assert load_file(path, 37) == {b: lloyd_max(37, b) for b in range(1, 9)}
  assert cb.distortion == pytest.approx(codebook.expected_distortion(37, cb.centroids), rel=1e-12)
  # A corrupt cached file is reported, not silently recomputed.
  other = tmp_path / "other"
  monkeypatch.setenv("TQJAX_CACHE_DIR", str(other))
  (other / "codebooks").mkdir(parents=True)
  (other / "codebooks" / "d37.json").write_text("{")
  with pytest.raises(CodebookError, match="d37.json.*invalid JSON"):
    get_codebook(37, 3)


def test_codebook_is_read_only():
  cb = get_codebook(128, 4)
  with pytest.raises(ValueError):
    cb.centroids[0] = 0.0
  with pytest.raises(dataclasses.FrozenInstanceError):
    cb.bits = 3


# ---- codebooks on the float8 e4m3 grid


@pytest.mark.parametrize("head_dim,bits,most", [(128, 1, 0.0), (128, 2, 1e-4), (128, 3, 0.003),
                                                (128, 4, 0.01), (64, 4, 0.013)])
def test_e4m3_codebook_is_on_the_grid_and_near_lloyd_max(head_dim, bits, most):
  import ml_dtypes
  e4m3 = codebook.get_codebook(head_dim, bits, grid="e4m3")
  lloyd = codebook.get_codebook(head_dim, bits)
  scale = codebook.e4m3_scale(head_dim, bits)
  c = e4m3.centroids
  # float8 values times the scale (float64 rounding aside), symmetric, ascending.
  units = c / scale
  on_grid = units.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  np.testing.assert_allclose(units, on_grid, rtol=1e-12, atol=0)
  np.testing.assert_array_equal(c, -c[::-1])
  assert np.all(np.diff(c) > 0)
  np.testing.assert_array_equal(e4m3.boundaries, (c[:-1] + c[1:]) / 2)
  assert e4m3.distortion == pytest.approx(codebook.expected_distortion(head_dim, c), rel=1e-12)
  # Lloyd-Max is the optimum; the grid costs at most `most` of it (measured: 1 bit 0,
  # 2 bits 4e-6, 3 bits 0.0017, 4 bits 0.0091 at d = 128 and 0.0125 at d = 64).
  assert lloyd.distortion <= e4m3.distortion * (1 + 1e-12)
  assert e4m3.distortion <= lloyd.distortion * (1 + most)
  # A local optimum on the grid: no magnitude moved to a neighbouring grid value helps.
  grid = codebook.e4m3_values()
  idx = np.searchsorted(grid, on_grid[2 ** (bits - 1):])
  for k in range(len(idx)):
    for move in (-1, 1):
      cand = idx.copy()
      cand[k] += move
      if cand[k] < 0 or cand[k] >= len(grid) or np.any(np.diff(cand) <= 0):
        continue
      mags = scale * grid[cand]
      moved = codebook.expected_distortion(head_dim, np.concatenate([-mags[::-1], mags]))
      assert moved >= e4m3.distortion * (1 - 1e-12), (k, move)


def test_e4m3_grid_values_and_bad_grid():
  grid = codebook.e4m3_values()
  assert len(grid) == 126 and grid[0] == 2.0 ** -9 and grid[-1] == 448.0
  assert np.all(np.diff(grid) > 0)
  with pytest.raises(ValueError, match="grid must be one of .* got 'e5m2'"):
    codebook.get_codebook(128, 4, grid="e5m2")
