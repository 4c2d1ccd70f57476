"""Bit packing round trips for every width on odd shapes, and the documented layout."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tqjax import packing


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 41), lead=st.lists(st.integers(1, 5), max_size=2),
       seed=st.integers(0, 2**31 - 1))
def test_round_trip(bits, n, lead, seed):
  codes = np.random.default_rng(seed).integers(0, 2**bits, (*lead, n))
  packed = packing.pack(codes, bits)
  assert packed.dtype == np.uint8
  assert packed.shape == (*lead, packing.packed_size(n, bits))
  np.testing.assert_array_equal(np.asarray(packing.unpack(packed, n, bits)), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_no_wasted_bits(bits):
  # A multiple of 8 codes fills whole bytes; otherwise each plane loses less than a byte.
  assert packing.packed_size(128, bits) == 128 * bits // 8
  for n in (1, 7, 13, 63):
    planes = len(packing.planes(bits))
    assert n * bits / 8 <= packing.packed_size(n, bits) < n * bits / 8 + planes


def test_layout_is_little_endian_bit_planes():
  np.testing.assert_array_equal(np.asarray(packing.pack(np.array([1, 2, 3, 4]), 4)), [0x21, 0x43])
  np.testing.assert_array_equal(np.asarray(packing.pack(np.array([1, 2, 3, 0]), 2)), [0b00111001])
  # 3 bits = a 2-bit plane of the low bits, then a 1-bit plane of bit 2.
  codes = np.array([5, 7, 0, 6, 1, 2, 3, 4])
  low = np.asarray(packing.pack(codes & 3, 2))
  high = np.asarray(packing.pack(codes >> 2, 1))
  np.testing.assert_array_equal(np.asarray(packing.pack(codes, 3)), np.concatenate([low, high]))
  assert packing.planes(7) == ((0, 4), (4, 2), (6, 1))


def test_jittable():
  codes = np.random.default_rng(0).integers(0, 8, (4, 24))
  packed = jax.jit(packing.pack, static_argnums=1)(codes, 3)
  np.testing.assert_array_equal(np.asarray(jax.jit(packing.unpack, static_argnums=(1, 2))(packed, 24, 3)), codes)


def test_bad_input_raises():
  with pytest.raises(ValueError, match="bits must be in 1..8, got 9"):
    packing.pack(np.zeros(8, np.int32), 9)
  with pytest.raises(ValueError, match="bits must be in 1..8, got 0"):
    packing.packed_size(8, 0)
  with pytest.raises(TypeError, match="integer dtype, got float32"):
    packing.pack(np.zeros(8, np.float32), 4)
  with pytest.raises(ValueError, match=r"packed_size\(n=8, bits=3\) = 3"):
    packing.unpack(np.zeros(4, np.uint8), 8, 3)
  with pytest.raises(TypeError, match="packed must be uint8"):
    packing.unpack(np.zeros(3, np.int32), 8, 3)
