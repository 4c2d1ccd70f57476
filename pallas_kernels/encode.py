"""Fused TurboQuant encode: normalize, rotate, quantize, pack (and QJL signs) in one pass.

x [N, D] (one layer's keys or values, tokens and heads flattened) -> per segment packed
codes [N, P_i] uint8 and scales [N], exactly as ``tqjax.quantizer.encode`` (the jnp
reference, ``implementation="xla"``) computes them. See that module for the math.

Kernel layout (Triton-lowered Pallas, like ``decode.py``): one program per ``steps``
blocks of ``block_n`` tokens. A segment of width b is packed into bit planes; every plane byte holds the codes
of coordinates ``R*j + t`` (t < R, R = 8 // narrowest plane width) for fixed j, so the
kernel projects x onto the rows ``t, t + R, ...`` of the segment map (one dot per
residue t, the rows permuted by the wrapper), quantizes each [block_n, d / R] tile by
comparisons with the boundaries, ORs the shifted codes of the residues that share a byte,
and stores each plane with one strided store. Nothing is gathered or reshaped in-kernel.
Dots run at float32 accuracy on the tensor cores (three TF32 passes, Triton's "tf32x3"),
so codes match the float32 reference except at near ties. Session 13 (H100, Nsight
Compute): with true float32 dots (Triton's FMA "ieee" dot, `precision="ieee"`) each
thread held its rows and columns of both operands in a 24 KB local-memory stack (32
registers, 97.6M spill requests, IPC 0.11): 26 ms for 256K vectors, the 60x gap to XLA.
With tf32x3 (session 14, H100, `bench()` below, 1M vectors of D = 128, k4 mse, median of
5): 1.25 ms against 98.9 ms for "ieee" and 1.51 ms for the XLA reference; 0.27 TB/s of
input and codes, 11% of the copy bandwidth `bench/kernels.py` measured on that card
(2.43 TB/s); codes differ from the float32 reference in 1.2e-6 of coordinates (XLA's own
encode: 4.9e-4). block_n 128 took 6.1 ms and 256 does not fit shared memory.

Session 16 (H100, `bench()`, same call; us for 1M vectors, k4 mse | k4 prod): XLA 1491 |
3252; "highest" 64 tokens a program 1374 | 12023, with 8 blocks a program (``steps``,
the maps read once for them) 2499 | over shared memory; one TF32 pass ("default") 1094
| 3492; "float16" (one pass on float16 operands) 834 | 1316, 8 blocks of 64 811 |
over shared memory, 16 blocks of 32 628 | 4090, 4 blocks of 128 1393 | over. Then the
codes by binary search (`search`: 4 comparisons and 11 selects a coordinate at 4 bits
instead of 15 comparisons and sums), next call: XLA 1679 | 2684; "highest" 1559 | 11970;
"default" 693 | 3219; "float16" 716 | 1048, 4 blocks of 32 621 | 2947, 16 of 32 641 |
2905, **8 blocks of 64 561** (0.61 TB/s of input and codes, 25% of the 2.44 TB/s copy
bandwidth `bench/kernels.py` measured on that card) | over shared memory. The two calls'
XLA rows differ by 13%: compare within a call. Codes differ from the float32 reference in
1.2e-3 of the bytes with float16 operands (mse; prod 1.2e-2, mostly QJL signs of
projections near 0) and 4.9e-4 with one TF32 pass (XLA's own: 4.9e-4 and 5.2e-3). The
defaults stay exact ("highest", 64 tokens a program); ``precision="float16", block_n=64,
steps=8`` is the fast setting for mse keys, ``precision="float16"`` alone for prod.

Session 17 (H100, 1M vectors, one process, us): the centroids by a select tree on the
search's comparisons (`search` with values), only where the norm correction or a QJL
segment needs them, and small float16 maps and the codebooks loaded once a program:
mse4 float16, 64 tokens a program, 405-412 (0.82-0.84 TB/s, 34% of the copy bandwidth)
against 499-508 before, 8 blocks of 64 469-482 (unchanged), XLA 1517-1549. Nsight
Compute (mse4, float16, 8 blocks of 64): the search is half of the instructions (FSEL
25%, FSETP 14%, SEL 12%); 185 registers, 2 programs of 4 warps an SM; issue slots 47%
busy.

Session 18 (H100, 1M vectors, one process; these and session 17's numbers above timed one
call at a time, ~0.1 ms of dispatch included, so 405 us then is 301.5 us timed calls back
to back, as `bench` now does): codes by sign and magnitude (`search_odd`, the default for
odd-symmetric tables): mse4 float16, 64 tokens a program, 257.9-264.2 us against 303.3-303.7
with the binary search (1.29-1.32 TB/s, 53-54% of the 2.45 TB/s copy bandwidth); exact
("highest") 936-1038 against 996; prod4 float16 797-801 against 803-806 (its two more
projections dominate). XLA 1301 (mse4) and 2433 (prod4). Next call (`bench`, via
`bench/kernels.py --dims 64 --presets k4v4,k3v3 --no-check`; copy bandwidth 2.45 TB/s),
mse4 | prod4: float16 253 (1.34 TB/s, 55%) | 785, binary search 292 | 778; the new
"float16x3" (three float16 passes, float32-accurate) 482 | 2549 against "highest" 934 |
11155 and one TF32 pass 516 | 2522: it is the default now.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import tuned_block_sizes
from tqjax import packing
from tqjax import quantizer as qz

_MIN_DEPTH = 16


def _padded(n: int) -> int:
  return max(_MIN_DEPTH, pl.next_power_of_2(n))


def _encode_kernel(x_ref, *refs, segs, plane_counts, groups, norm_correction, block_n,
                   steps, num_rows, precision, odd):
  ns = len(segs)
  it = iter(refs)
  # Per segment and bit plane p (width w, pb = 8 // w codes per byte, nb = d / pb bytes):
  # [pb, nb_pad, D] (float32, or float16 for precision "float16"), row u + pb * c of the
  # segment map at [u, c] (zero padded); for "float16x3" [2 * pb, nb_pad, D], the map's
  # float16 rounding, then the float16 rounding of the rest.
  map_refs = [[next(it) for _ in range(plane_counts[i])] for i in range(ns)]
  cb_refs = [next(it) for _ in range(ns)]  # [2**b_i] float32
  bd_refs = [next(it) for _ in range(ns)]  # [2**b_i - 1] float32
  code_refs = [next(it) for _ in range(ns)]  # [steps * block_n, P_i] uint8
  scale_refs = [next(it) for _ in range(ns)]  # [steps * block_n] scale dtype
  half = precision in ("float16", "float16x3")  # the dots take the unit vector
  split = precision == "float16x3"  # maps in pairs (rounding, rest): see encode()
  if half:  # operands rounded to float16, float32 sums: one tensor-core pass
    dot_precision, operand = lax.Precision.DEFAULT, lambda a: a.astype(jnp.float16)
  else:
    dot_precision, operand = precision, lambda a: a

  def dot(a, m, dims):
    if not split:
      return lax.dot_general(operand(a), m, (dims, ((), ())), precision=dot_precision,
                             preferred_element_type=jnp.float32)
    # a m = a_hi m_hi + a_lo m_hi + a_hi m_lo + a_lo m_lo, the last term dropped (2**-22
    # of the product): three float16 passes.
    (m_hi, m_lo), a_hi = m, a.astype(jnp.float16)
    a_lo = (a - a_hi.astype(jnp.float32)).astype(jnp.float16)
    one = lambda p, q: lax.dot_general(p, q, (dims, ((), ())),
                                       preferred_element_type=jnp.float32)
    return one(a_hi, m_hi) + one(a_lo, m_hi) + one(a_hi, m_lo)

  proj = lambda a, m: dot(a, m, ((1,), (1,)))
  back = lambda a, m: dot(a, m, ((1,), (0,)))

  first = pl.program_id(0) * steps  # the program's first block
  # Small maps (float16, up to 32 KB: one 4-bit codebook segment of 128) and the codebooks
  # are loaded once a program, before its blocks; larger ones where they are used.
  # Session 17 (H100, 1M vectors of D = 128, 64 tokens a program, us, two calls): mse4
  # float16 405-412 loaded first against 480-508 where used; loaded first, prod4 float16
  # (96 KB of maps) took 1163-1265 against 941-1051 and mse4 "highest" (float32, 64 KB)
  # 1316-1356 against 1126-1216.
  hoist = half and sum(m.shape[0] * m.shape[1] * m.shape[2] * m.dtype.itemsize
                       for planes in map_refs for m in planes) <= 32768
  scalars = lambda ref: [ref[k] for k in range(ref.shape[0])]
  if hoist:
    hoisted_maps = [[[m[u_] for u_ in range(m.shape[0])] for m in planes]
                    for planes in map_refs]
    hoisted_codebooks = [(scalars(b), scalars(c)) for b, c in zip(bd_refs, cb_refs)]

  def block(s):
    rows = pl.ds(s * block_n if isinstance(s, int) else pl.multiple_of(s * block_n, block_n),
                 block_n)
    i0 = (first + s) * block_n
    row_ok = (i0 + jnp.arange(block_n)) < num_rows
    x = plgpu.load(x_ref.at[rows], mask=row_ok[:, None], other=0).astype(jnp.float32)
    col = jnp.arange(x.shape[1])
    residual = None  # unit residual of the group, [block_n, D] (zero outside the group)
    norm = None
    for i, seg in enumerate(segs):
      start, stop = groups[i]
      if i == 0 or groups[i - 1] != groups[i]:
        in_group = (col >= start) & (col < stop)
        norm = jnp.sqrt(jnp.sum(jnp.where(in_group[None, :], x * x, 0.0), axis=1))
        safe = jnp.where(norm > 0, norm, 1.0)
        # The group's unit vector (residual moves on after a codebook segment); for float16
        # operands by a reciprocal and a multiply (the rounding to float16 is coarser than
        # either), else by the reference's division.
        unit = (x * (1.0 / safe)[:, None] if precision == "float16" else x / safe[:, None])
        unit = unit * in_group[None, :]
        residual = unit
      if seg.kind == "codebook":
        # The centroids feed the norm correction and the residual a QJL segment after
        # this one (in its group) sketches; else only the codes are needed.
        need_c = norm_correction or any(
            other.kind != "codebook" and groups[j] == groups[i]
            for j, other in enumerate(segs))
        bounds, cents = (hoisted_codebooks[i] if hoist
                         else (scalars(bd_refs[i]), scalars(cb_refs[i])))
      scale = None
      offset = 0
      for p, (shift, width) in enumerate(packing.planes(seg.bits)):
        maps = hoisted_maps[i][p] if hoist else map_refs[i][p]  # maps[u_]: [nb_pad, D]
        pb, nb_pad = map_refs[i][p].shape[:2]
        if split:  # maps[u_]: the pair
          pb //= 2
          maps = [(maps[u_], maps[pb + u_]) for u_ in range(pb)]
        nb = packing.plane_bytes(seg.dim, width)
        byte = jnp.zeros((block_n, nb_pad), jnp.int32)
        us, cs = [], []
        for u_ in range(pb):
          if seg.kind == "codebook":
            # The dots take the unit vector in float16 (x itself may overflow it), the
            # float32 input as it is.
            u = (proj(unit, maps[u_]) if half
                 else proj(x, maps[u_]) / safe[:, None])  # [block_n, nb_pad]
            find = search_odd if odd[i] else search
            if p == 0 and need_c:
              idx, c = find(u, bounds, cents)
              us.append(u)
              cs.append(c)
            else:
              idx = find(u, bounds)
          else:  # qjl: sign(S r)
            idx = (proj(residual, maps[u_]) >= 0).astype(jnp.int32)
          byte = byte | (((idx >> shift) & ((1 << width) - 1)) << (u_ * width))
        mask = row_ok[:, None]
        if nb_pad != nb:
          mask = mask & (jnp.arange(nb_pad) < nb)[None, :]
        plgpu.store(code_refs[i].at[rows, pl.ds(offset, nb_pad)], byte.astype(jnp.uint8),
                    mask=mask)
        offset += nb
        if seg.kind == "codebook" and p == 0 and need_c:
          if norm_correction:
            cn = jnp.sqrt(sum(jnp.sum(c * c, axis=1) for c in cs))
            scale = norm / jnp.where(cn > 0, cn, 1.0)
          else:
            scale = norm
          f = (scale / safe)[:, None]
          residual = sum(back(u - c * f, maps[u_]) for u_, (u, c) in enumerate(zip(us, cs)))
        elif seg.kind == "codebook" and p == 0:
          scale = norm
      if seg.kind != "codebook":
        scale = norm * jnp.sqrt(jnp.sum(residual * residual, axis=1))
      plgpu.store(scale_refs[i].at[rows], scale.astype(scale_refs[i].dtype), mask=row_ok)

  if steps == 1:
    block(0)
  else:  # one program loops over its blocks

    def body(s, carry):
      block(s)
      return carry

    lax.fori_loop(0, steps, body, ())


def search(u, bounds, values=None):
  """The number of sorted `bounds` (2**b - 1 scalars) below each element of u, by binary
  search: b comparisons and 2**b - 1 - b selects of the next boundary, against 2**b - 1
  comparisons and sums; the same count for any u (NaN: 0). With `values` (2**b scalars,
  e.g. the centroids) also values[count], by a tree of 2**b - 1 selects on the search's
  comparisons (against 2**b comparisons and selects of a chain over the count)."""
  levels = len(bounds) + 1
  if levels & (levels - 1):
    raise ValueError(f"search needs 2**b - 1 bounds, got {len(bounds)}")
  idx, above = _binary_search(u, bounds)
  if values is None:
    return idx
  if len(values) != levels:
    raise ValueError(f"search needs {levels} values for {len(bounds)} bounds, got "
                     f"{len(values)}")
  return idx, jnp.broadcast_to(_select_tree(above, values), u.shape)


def _binary_search(u, bounds):
  """(count of bounds below u, the comparisons: above[l] is u in the upper half at level
  l) for 2**b - 1 sorted bounds."""
  levels = len(bounds) + 1
  above = []

  def boundary(l, depth=0, base=0):  # the boundary level l compares with
    if depth == l:
      return bounds[base + (levels >> (l + 1)) - 1]
    size = levels >> (depth + 1)  # codes in the upper half at this depth
    return jnp.where(above[depth], boundary(l, depth + 1, base + size),
                     boundary(l, depth + 1, base))

  idx = jnp.zeros(u.shape, jnp.int32)
  while len(above) < levels.bit_length() - 1:
    l = len(above)
    above.append(u > boundary(l))
    idx = idx + jnp.where(above[l], levels >> (l + 1), 0)
  return idx, above


def _select_tree(above, values):
  """values[count] from the binary search's comparisons: codes 2m and 2m + 1 differ in
  the last comparison, pairs of pairs in the one before."""
  for l in reversed(range(len(above))):
    values = [jnp.where(above[l], hi, lo) for lo, hi in zip(values[::2], values[1::2])]
  return values[0]


def search_odd(u, bounds, values=None):
  """:func:`search` for odd-symmetric bounds (``bounds[k] == -bounds[-1 - k]``, the middle
  one 0) and values (``values[k] == -values[-1 - k]``), as Lloyd-Max codebooks are: the
  sign comparison, then a binary search of |u| over the positive half (b - 1 comparisons
  and 2**(b - 1) - b selects: 3 and 4 at 4 bits, against 4 and 11), the same counts as
  :func:`search` for every u, ties, ±0, ±inf and NaN (0) included.

  |u| is compared as the integer of its bits (the order of non-negative floats): a u at
  or below 0 needs |u| >= bound where a positive one needs |u| > bound, so its bits get
  1 added (unsigned, so NaN stays above every bound and counts 0)."""
  levels = len(bounds) + 1
  if levels & (levels - 1) or levels < 4:
    raise ValueError(f"search_odd needs 2**b - 1 bounds with b >= 2, got {len(bounds)}")
  half = levels // 2
  top = u > bounds[half - 1]  # the upper half (u > 0)
  bits = lax.bitcast_convert_type(u, jnp.uint32) & jnp.uint32(0x7FFFFFFF)
  mag = bits + jnp.where(top, jnp.uint32(0), jnp.uint32(1))
  upper = [lax.bitcast_convert_type(b, jnp.uint32) for b in bounds[half:]]
  m, above = _binary_search(mag, upper)
  # Upper half: half + m; lower: half - 1 - m (m < half, so both are one xor).
  idx = m ^ jnp.where(top, half, half - 1)
  if values is None:
    return idx
  if len(values) != levels:
    raise ValueError(f"search_odd needs {levels} values for {len(bounds)} bounds, got "
                     f"{len(values)}")
  v = _select_tree(above, values[half:])
  return idx, jnp.where(top, v, -v)


def _odd_segments(quantizer: qz.Quantizer) -> tuple[bool, ...]:
  """Per segment: a codebook of 2 or more bits with odd-symmetric boundaries (the middle
  one 0) and centroids, which :func:`search_odd` needs. Read from the quantizer's arrays
  where they are concrete, else from the config's tables (which ``Quantizer.create``
  casts to them)."""
  arrays = (*quantizer.centroids, *quantizer.boundaries)
  if any(isinstance(a, jax.core.Tracer) for a in arrays):
    centroids = qz.segment_centroids(quantizer.config)
    boundaries = qz.segment_boundaries(quantizer.config)
  else:
    centroids, boundaries = quantizer.centroids, quantizer.boundaries
  odd = lambda a: np.array_equal(a, -a[::-1])
  out = []
  for seg, c, b in zip(quantizer.config.segments, centroids, boundaries):
    c, b = np.asarray(c, np.float32), np.asarray(b, np.float32)
    out.append(seg.kind == "codebook" and seg.bits >= 2 and odd(c) and odd(b)
               and b[len(b) // 2] == 0)
  return tuple(out)


def _plane_maps(quantizer: qz.Quantizer) -> list[list[jax.Array]]:
  out = []
  for amap, seg in zip(quantizer.maps, quantizer.config.segments):
    planes = []
    for _, width in packing.planes(seg.bits):
      pb = 8 // width
      nb = seg.dim // pb
      rows = amap.reshape(nb, pb, -1).transpose(1, 0, 2)  # [pb, nb, D]: rows u + pb * c
      planes.append(jnp.pad(rows, ((0, 0), (0, _padded(nb) - nb), (0, 0))))
    out.append(planes)
  return out


def encode(quantizer: qz.Quantizer, x: jax.Array, *, implementation: str = "xla",
           interpret: bool = False, block_n: int | None = None, steps: int | None = None,
           num_warps: int | None = None, num_stages: int | None = None,
           precision: str = "float16x3", search: str = "auto") -> qz.Encoded:
  """Quantizes x [N, D] into per segment codes [N, P_i] uint8 and scales [N].

  ``implementation="xla"`` is :func:`tqjax.quantizer.encode`; ``"pallas"`` the fused
  kernel (``interpret=True`` runs it on CPU), one program per ``steps`` blocks of
  ``block_n`` tokens (the segment maps read once a program). ``precision`` of the
  kernel's projections:

  - "float16x3" (the default): three float16 tensor-core passes, the unit vector and the
    maps each split into their float16 rounding and the float16 rounding of the rest, all
    products but rest x rest. Codes are the float32 reference's except at near ties, as
    with "highest", in half its time (session 18, H100, 1M vectors of D = 128: 6e-6 of
    the bytes differ against 1.2e-6; mse4 482 against 934 us, prod4 2549 against 11155).
  - "highest": float32 accuracy from three TF32 passes.
  - "default": one TF32 pass, faster; codes at coordinate boundaries may differ ("high"
    is the same in Triton).
  - "float16": the unit vector and the maps rounded to float16, float32 sums, one pass
    at twice TF32's rate and half its operand bytes (the fastest: mse4 253 us); a code
    moves where a coordinate lies within ~1e-3 of its own size from a boundary.
  - "ieee": float32 FMAs, the same codes as "highest" and far slower (module docstring).

  In interpret mode "highest" runs float32 dots.

  ``search`` of the codes: "binary" (:func:`search`), "odd" (:func:`search_odd`, for
  odd-symmetric codebooks: the sign, then half the table) or "auto" ("odd" for every
  codebook segment of 2 or more bits whose boundaries and centroids are odd-symmetric, as
  Lloyd-Max and e4m3 tables are). The codes are the same.
  """
  precisions = {"highest": (lax.Precision.HIGHEST if interpret
                            else lax.DotAlgorithmPreset.TF32_TF32_F32_X3),
                "ieee": lax.Precision.HIGHEST, "high": lax.Precision.HIGH,
                "default": lax.Precision.DEFAULT, "float16": "float16",
                "float16x3": "float16x3"}
  if precision not in precisions:
    raise ValueError(f"precision must be one of {sorted(precisions)}, got {precision!r}")
  if search not in ("auto", "binary", "odd"):
    raise ValueError(f'search must be "auto", "binary" or "odd", got {search!r}')
  if implementation not in ("xla", "pallas"):
    raise ValueError(f'implementation must be "xla" or "pallas", got {implementation!r}')
  cfg = quantizer.config
  if x.ndim != 2 or x.shape[1] != cfg.head_dim:
    raise ValueError(f"x must be [N, D] with D = head_dim = {cfg.head_dim}, got {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be float16/bfloat16/float32, got {x.dtype}")
  if implementation == "xla":
    return encode_reference(quantizer, x)
  for seg in cfg.segments:
    if seg.dim % 8:
      raise ValueError(f"pallas encode needs segment dims that are multiples of 8, got "
                       f"{seg.dim}")
  tuned = tuned_block_sizes.encode_config(head_dim=cfg.head_dim)
  block_n = block_n or tuned.block_n
  steps = steps or tuned.steps
  num_warps = num_warps or tuned.num_warps
  num_stages = num_stages or tuned.num_stages
  if block_n < 16 or block_n & (block_n - 1):
    raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps must be an int >= 1, got {steps!r}")
  if cfg.head_dim & (cfg.head_dim - 1):
    raise ValueError(f"pallas encode needs a power-of-two head_dim, got {cfg.head_dim}")
  N, D = x.shape
  segs = cfg.segments
  odd = tuple(search != "binary" and s for s in _odd_segments(quantizer))
  if search == "odd" and not all(odd[i] for i, s in enumerate(segs) if s.kind == "codebook"):
    raise ValueError('search="odd" needs odd-symmetric codebooks of 2 or more bits, got '
                     f"segments {[(s.kind, s.bits) for s in segs]} with odd-symmetric {odd}")
  plane_maps = _plane_maps(quantizer)
  maps = [m for planes in plane_maps for m in planes]
  if precision == "float16":
    maps = [m.astype(jnp.float16) for m in maps]
  elif precision == "float16x3":  # [2 pb, nb_pad, D]: the rounding, then the rest's
    hi = [m.astype(jnp.float16) for m in maps]
    maps = [jnp.concatenate([h, (m - h.astype(jnp.float32)).astype(jnp.float16)])
            for h, m in zip(hi, maps)]
  packed = [packing.packed_size(s.dim, s.bits) for s in segs]
  # A plane whose byte count is not a power of two is stored as a masked power-of-two
  # tile, so its array gets room for it (sliced off after the kernel).
  alloc = []
  for seg, planes in zip(segs, plane_maps):
    end, offset = 0, 0
    for (_, width), m in zip(packing.planes(seg.bits), planes):
      end = max(end, offset + m.shape[1])
      offset += packing.plane_bytes(seg.dim, width)
    alloc.append(end)
  rows = block_n * steps  # tokens per program
  grid = (pl.cdiv(N, rows),)
  whole = lambda a: pl.BlockSpec(a.shape, lambda n: (0,) * a.ndim)
  kernel = functools.partial(
      _encode_kernel, segs=segs, plane_counts=tuple(len(p) for p in plane_maps),
      groups=tuple((s.start, s.stop) for s in segs), norm_correction=cfg.norm_correction,
      block_n=block_n, steps=steps, num_rows=N, precision=precisions[precision], odd=odd)
  outs = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[pl.BlockSpec((rows, D), lambda n: (n, 0))]
      + [whole(m) for m in maps]
      + [whole(c) for c in quantizer.centroids]
      + [whole(b) for b in quantizer.boundaries],
      out_specs=[pl.BlockSpec((rows, p), lambda n: (n, 0)) for p in alloc]
      + [pl.BlockSpec((rows,), lambda n: (n,)) for _ in segs],
      out_shape=[jax.ShapeDtypeStruct((N, p), jnp.uint8) for p in alloc]
      + [jax.ShapeDtypeStruct((N,), jnp.dtype(cfg.scale_dtype)) for _ in segs],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="tq_encode",
  )(x, *maps, *quantizer.centroids, *quantizer.boundaries)
  ns = len(segs)
  codes = tuple(c if a == p else c[:, :p] for c, a, p in zip(outs[:ns], alloc, packed))
  return qz.Encoded(codes, tuple(outs[ns:]))


def encode_reference(quantizer: qz.Quantizer, x: jax.Array) -> qz.Encoded:
  """The jnp reference: :func:`tqjax.quantizer.encode` on x [N, D]."""
  return qz.encode(quantizer, x)


def bench(key, *, n: int = 1 << 20, calls: int = 10) -> dict:
  """Encode throughput on the device: n vectors of D = 128 (k4 mse and prod), the XLA
  reference and the kernel at a few tilings, dot precisions and searches. Each sample
  times `calls` calls dispatched back to back (one call alone adds ~0.1 ms of dispatch
  to a ~0.3 ms kernel: session 18); median of 5."""
  out = {}
  x = jax.random.normal(key, (n, 128), jnp.float16)
  variants = {"xla": dict(implementation="xla")}
  for block_n, steps, precision, search in (
      (64, 1, "highest", "auto"), (64, 1, "float16x3", "auto"), (64, 1, "default", "auto"),
      (64, 1, "float16", "auto"),
      (64, 1, "float16", "binary"), (32, 4, "float16", "auto"), (64, 8, "float16", "auto")):
    variants[f"pallas-{block_n}x{steps}-{precision}-{search}"] = dict(
        implementation="pallas", block_n=block_n, steps=steps, precision=precision,
        search=search)
  for name, cfg in {"mse4": qz.QuantizerConfig(128, 4),
                    "prod4": qz.QuantizerConfig(128, 4, kind="prod")}.items():
    quant = qz.Quantizer.create(cfg)
    with jax.default_matmul_precision("float32"):
      ref = jax.jit(lambda x: encode(quant, x))(x[:65536])
    row = {}
    for vname, kw in variants.items():
      f = jax.jit(lambda x, kw=kw: encode(quant, x, **kw))
      try:
        jax.block_until_ready(f(x))
        ts = []
        for _ in range(5):
          t0 = time.perf_counter()
          for _ in range(calls):
            got = f(x)
          jax.block_until_ready(got)
          ts.append((time.perf_counter() - t0) / calls)
        t = sorted(ts)[2]
        nbytes = x.nbytes + n * cfg.bytes_per_vector
        got = f(x[:65536])
        mismatch = float(np.mean([np.mean(np.asarray(a) != np.asarray(b))
                                  for a, b in zip(ref.codes, got.codes)]))
        row[vname] = {"us": t * 1e6, "tbps": nbytes / t * 1e-12, "code_mismatch": mismatch}
      except Exception as e:
        row[vname] = {"error": repr(e)[:300]}
      print("encode", name, vname, row[vname], flush=True)
    out[name] = row
  return out
