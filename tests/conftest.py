"""Shared pytest fixtures (generic only)."""

import zlib

import numpy as np
import pytest


@pytest.fixture
def rng(request) -> np.random.Generator:
  """A numpy Generator seeded from the test's name: fresh draws per test, reproducible."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
