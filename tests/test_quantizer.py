"""TurboQuant quantizers against float64 numpy references and the paper's numbers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import distortion
from tqjax import packing
from tqjax import quantizer as qz
from tqjax import rotation
from tqjax.codebook import get_codebook

N = 40_000  # vectors per distortion estimate: standard error well under 1%


def unit_vectors(rng, n, dim):
  x = rng.standard_normal((n, dim))
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_mse(x, pi, book):
  """float64 numpy TurboQuant_mse: (codes, x̂) for unit-or-not rows x [N, D]."""
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  y = x @ pi.T / norm
  idx = np.argmin(np.abs(y[..., None] - book.centroids), axis=-1)
  return idx, norm * (book.centroids[idx] @ pi)


@pytest.mark.parametrize("bits, paper", [(1, 0.361), (2, 0.116), (3, 0.034), (4, 0.0093)])
def test_mse_distortion_matches_paper(bits, paper):
  config = qz.QuantizerConfig(128, bits)
  row = distortion.measure(config, N, seed=bits)
  assert row["d_mse"] == pytest.approx(paper, rel=0.03)
  # float64 numpy reference on independent vectors agrees too.
  rng = np.random.default_rng(bits)
  x = unit_vectors(rng, N // 4, 128)
  pi = np.asarray(qz.Quantizer.create(config).maps[0], np.float64)
  _, x_hat = reference_mse(x, pi, get_codebook(128, bits))
  assert np.mean(np.sum((x - x_hat)**2, -1)) == pytest.approx(paper, rel=0.03)


@pytest.mark.parametrize("bits, paper", [(1, 1.57), (2, 0.56), (3, 0.18), (4, None)])
def test_prod_distortion_and_unbiasedness(bits, paper):
  row = distortion.measure(qz.QuantizerConfig(128, bits, kind="prod"), N, seed=10 + bits)
  if paper is None:
    # The paper's 0.047 at b = 4 is π/2 · 0.03, its rounded 3-bit D_mse; the exact QJL
    # variance on the 3-bit residual is π/2 · D_mse(3) − O(1/d).
    paper = math.pi / 2 * get_codebook(128, bits - 1).distortion
  assert row["d_prod_x_d"] == pytest.approx(paper, rel=0.05)
  assert row["slope"] == pytest.approx(1.0, abs=0.02)


def test_e4m3_codebook_quantizes_to_its_centroids_at_its_distortion():
  # Codes are the nearest e4m3-grid centroids (float64 reference), and the measured
  # distortion is the codebook's (+0.9% over Lloyd-Max's 0.0093 at 4 bits).
  config = qz.QuantizerConfig(128, 4, codebook="e4m3")
  quantizer = qz.Quantizer.create(config)
  book = get_codebook(128, 4, "e4m3")
  np.testing.assert_array_equal(np.asarray(quantizer.centroids[0]),
                                book.centroids.astype(np.float32))
  rng = np.random.default_rng(11)
  x = unit_vectors(rng, N // 4, 128)
  pi = np.asarray(quantizer.maps[0], np.float64)
  idx_ref, x_hat_ref = reference_mse(x, pi, book)
  enc = qz.encode(quantizer, jnp.asarray(x, jnp.float32))
  idx = np.asarray(packing.unpack(enc.codes[0], 128, 4))
  assert np.mean(idx == idx_ref) > 0.999
  assert np.mean(np.sum((x - x_hat_ref) ** 2, -1)) == pytest.approx(book.distortion, rel=0.03)
  assert book.distortion > get_codebook(128, 4).distortion


def test_mse_is_biased_by_two_over_pi_at_one_bit():
  row = distortion.measure(qz.QuantizerConfig(128, 1), N, seed=3)
  assert row["slope"] == pytest.approx(2 / math.pi, abs=0.02)


@pytest.mark.parametrize("dim, bits, kind, rot", [(64, 3, "mse", "hadamard"), (80, 2, "mse", "haar"),
                                                   (64, 3, "prod", "hadamard"), (96, 4, "prod", "haar")])
def test_codes_match_float64_reference(dim, bits, kind, rot):
  config = qz.QuantizerConfig(dim, bits, kind=kind, rotation=rot, seed=7)
  quantizer = qz.Quantizer.create(config)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((501, dim)) * rng.uniform(0.1, 30, (501, 1))  # any norms
  enc = qz.encode(quantizer, jnp.asarray(x, jnp.float32))
  seg = config.segments[0]
  pi = np.asarray(quantizer.maps[0], np.float64)
  idx_ref, x_hat_ref = reference_mse(x, pi, get_codebook(dim, seg.bits))
  idx = np.asarray(packing.unpack(enc.codes[0], dim, seg.bits))
  assert np.mean(idx == idx_ref) > 0.999  # float32 vs float64 ties at bucket edges
  np.testing.assert_allclose(np.asarray(enc.scales[0]), np.linalg.norm(x, axis=-1), rtol=1e-5)
  x_hat = np.asarray(qz.decode(quantizer, enc))
  if kind == "mse":
    err = np.linalg.norm(x_hat - x_hat_ref, axis=-1) / np.linalg.norm(x, axis=-1)
    assert np.quantile(err, 0.99) < 1e-4
  else:  # reconstruction adds the QJL term √(π/2)/d · ‖x‖‖r‖ · Sᵀ sign(S r)
    s = np.asarray(quantizer.maps[1], np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    r = x / norm - x_hat_ref / norm
    qjl = math.sqrt(math.pi / 2) / dim * np.linalg.norm(r, axis=-1, keepdims=True) * (np.sign(r @ s.T) @ s)
    err = np.linalg.norm(x_hat - (x_hat_ref + norm * qjl), axis=-1) / norm[:, 0]
    assert np.quantile(err, 0.99) < 1e-3


def test_inner_product_equals_query_dot_reconstruction():
  config = qz.QuantizerConfig(64, 3, kind="prod", outlier_channels=16, outlier_bits=4, rotation="haar")
  quantizer = qz.Quantizer.create(config)
  rng = np.random.default_rng(2)
  x, q = (jnp.asarray(rng.standard_normal((37, 64)), jnp.float32) for _ in range(2))
  enc = qz.encode(quantizer, x)
  np.testing.assert_allclose(qz.inner_product(quantizer, q, enc),
                             jnp.sum(q * qz.decode(quantizer, enc), -1), rtol=1e-4, atol=1e-4)


def test_outlier_split_quantizes_each_group_independently():
  config = qz.QuantizerConfig(128, 2, outlier_channels=64, outlier_bits=3)
  assert [(s.start, s.stop, s.bits) for s in config.segments] == [(0, 64, 3), (64, 128, 2)]
  quantizer = qz.Quantizer.create(config)
  rng = np.random.default_rng(3)
  x = np.concatenate([30 * rng.standard_normal((N // 4, 64)), rng.standard_normal((N // 4, 64))], -1)
  x_hat = np.asarray(qz.decode(quantizer, qz.encode(quantizer, jnp.asarray(x, jnp.float32))))
  for (start, stop, bits) in config.groups:
    part = x[:, start:stop]
    rel = np.sum((part - x_hat[:, start:stop])**2, -1) / np.sum(part**2, -1)
    assert rel.mean() == pytest.approx(get_codebook(64, bits).distortion, rel=0.05)
  # Exact accounting: 64·3 + 64·2 code bits and two float32 norms per 128 coordinates.
  assert config.bits_per_coordinate == (64 * 3 + 64 * 2 + 2 * 32) / 128


def test_norm_correction_gives_unit_reconstructions():
  quantizer = qz.Quantizer.create(qz.QuantizerConfig(64, 2, norm_correction=True))
  x = jnp.asarray(np.random.default_rng(4).standard_normal((101, 64)), jnp.float32)
  x_hat = qz.decode(quantizer, qz.encode(quantizer, x))
  np.testing.assert_allclose(jnp.linalg.norm(x_hat, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_encode_is_jittable_and_matches_eager():
  quantizer = qz.Quantizer.create(qz.QuantizerConfig(64, 4, kind="prod"))
  x = jnp.asarray(np.random.default_rng(5).standard_normal((3, 11, 64)), jnp.bfloat16)
  eager, jitted = qz.encode(quantizer, x), jax.jit(qz.encode)(quantizer, x)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6)
  assert eager.codes[0].shape == (3, 11, packing.packed_size(64, 3))


def test_zero_vector_reconstructs_to_zero():
  quantizer = qz.Quantizer.create(qz.QuantizerConfig(64, 3, kind="prod"))
  x_hat = qz.decode(quantizer, qz.encode(quantizer, jnp.zeros((2, 64))))
  np.testing.assert_array_equal(np.asarray(x_hat), 0.0)


@pytest.mark.parametrize("bits, group", [(2, 16), (4, 32), (8, 64)])
def test_minmax_values_against_numpy(bits, group):
  config = qz.MinMaxConfig(64, bits, group_size=group, scale_dtype="float32")
  x = np.random.default_rng(bits).standard_normal((53, 64)).astype(np.float32)
  x_hat = np.asarray(qz.decode_minmax(config, qz.encode_minmax(config, x)))
  g = x.reshape(53, -1, group)
  step = (g.max(-1, keepdims=True) - g.min(-1, keepdims=True)) / (2**bits - 1)
  assert np.all(np.abs(x_hat.reshape(g.shape) - g) <= step / 2 + 1e-5)
  assert config.bits_per_coordinate == bits + 2 * 32 / group


def test_bits_per_coordinate_counts_every_byte():
  assert qz.QuantizerConfig(128, 4, scale_dtype="float16").bits_per_coordinate == 4 + 16 / 128
  assert qz.QuantizerConfig(128, 3, kind="prod", scale_dtype="float16").bits_per_coordinate == 3 + 32 / 128
  assert qz.QuantizerConfig(96, 3, rotation="haar").bits_per_coordinate == 3 + 32 / 96
  assert qz.QuantizerConfig(128, 4, scale_dtype="float16").bytes_per_vector == 66


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(head_dim=128, bits=0), ValueError, "bits must be in 1..8, got 0"),
    (dict(head_dim=128, bits=9), ValueError, "bits must be in 1..8, got 9"),
    (dict(head_dim=128, bits=2.5), TypeError, "bits must be an int"),
    (dict(head_dim=96, bits=4), ValueError, "power-of-two"),
    (dict(head_dim=128, bits=4, kind="fast"), ValueError, "kind must be one of"),
    (dict(head_dim=128, bits=4, rotation="dct"), ValueError, "rotation must be one of"),
    (dict(head_dim=128, bits=2, outlier_channels=32), ValueError, "needs outlier_bits"),
    (dict(head_dim=128, bits=2, outlier_channels=32, outlier_bits=3), ValueError, "power-of-two"),
    (dict(head_dim=128, bits=2, outlier_channels=127, outlier_bits=3, rotation="haar"), ValueError,
     "outlier_channels must be in"),
    (dict(head_dim=128, bits=4, codebook="nf4"), ValueError,
     r"codebook must be one of \('lloyd-max', 'e4m3'\), got 'nf4'"),
])
def test_bad_config_raises(kwargs, error, match):
  with pytest.raises(error, match=match):
    qz.QuantizerConfig(**kwargs)


def test_bad_input_raises():
  quantizer = qz.Quantizer.create(qz.QuantizerConfig(64, 2))
  with pytest.raises(TypeError, match="floating dtype, got int32"):
    qz.encode(quantizer, jnp.ones((3, 64), jnp.int32))
  with pytest.raises(ValueError, match=r"head_dim=64, got shape \(3, 65\)"):
    qz.encode(quantizer, jnp.ones((3, 65)))
  for bad in (jnp.nan, jnp.inf):
    with pytest.raises(ValueError, match="NaN or Inf"):
      qz.encode(quantizer, jnp.ones((3, 64)).at[1, 5].set(bad))
  with pytest.raises(ValueError, match="head_dim=64"):
    qz.inner_product(quantizer, jnp.ones((3, 32)), qz.encode(quantizer, jnp.ones((3, 64))))


@pytest.mark.parametrize("kind", ["hadamard", "haar"])
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_rotation_orthogonal_and_deterministic(kind, dim):
  a, b = rotation.rotation(kind, dim, 11), rotation.rotation(kind, dim, 11)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(a @ a.T, np.eye(dim), atol=1e-12)
  assert not np.allclose(a, rotation.rotation(kind, dim, 12))


def test_hadamard_spreads_a_dc_offset():
  # Without random signs the all-ones vector would land on one coordinate.
  y = rotation.hadamard(64, 0) @ np.ones(64)
  assert np.abs(y).max() < 0.5 * np.linalg.norm(y)


def test_haar_is_sign_fixed():
  # QR without the sign fix makes E[Q_11] != 0: the sign-fixed matrix has a symmetric first entry.
  firsts = np.array([rotation.haar(8, s)[0, 0] for s in range(400)])
  assert abs(firsts.mean()) < 3 * firsts.std() / math.sqrt(400)


def test_rotation_bad_args():
  with pytest.raises(ValueError, match="power-of-two dimension, got dim=96"):
    rotation.hadamard(96, 0)
  with pytest.raises(ValueError, match="rotation must be one of"):
    rotation.rotation("givens", 64, 0)
  with pytest.raises(TypeError, match="dim must be a positive int"):
    rotation.haar(6.0, 0)
