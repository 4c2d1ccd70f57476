"""Precomputed Lloyd–Max codebooks, as data: ``d{head_dim}.json`` for head_dim 64, 80, 96, 128, 256.

Each file holds ``schema``, ``head_dim``, ``generator`` (the command that regenerates it,
``python -m tqjax.codebook generate``), ``method`` and ``tables``: one
``{bits, centroids, boundaries, distortion}`` per bits = 1..8. The schema and the solver
are documented in :mod:`tqjax.codebook`, which loads and validates these files.
"""
