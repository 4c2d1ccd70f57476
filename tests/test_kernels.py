"""Pallas kernels vs their jnp references on identical codes.

CPU: interpret mode (the same kernel body) and a CUDA lowering smoke test per
configuration (the Triton custom call must really appear). GPU: the compiled kernels,
skipped without a CUDA device.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import decode as dk
from pallas_kernels import decode_mosaic as dm
from pallas_kernels import encode as ek
from tqjax import packing
from tqjax import quantizer as qz

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())

# name -> (key segments, value segments), each a tuple of (dim, bits). Segments of 2-4 bits
# whose rows are a power-of-two number of words take the byte-permute ("lut") lookup when
# the tile holds two words per thread (64-coordinate 2- and 3-bit segments: 64+ tokens per
# tile at 4 warps), the others the select tree (see `dk.lut_eligible`).
PRESETS = {
    "mse4": (((64, 4),), ((64, 4),)),
    "mse3": (((64, 3),), ((64, 3),)),
    "mse2": (((64, 2),), ((64, 2),)),
    "prod4": (((64, 3), (64, 1)), ((64, 4),)),
    "split": (((16, 3), (48, 2)), ((16, 3), (48, 2))),
    "lut4": (((128, 4),), ((128, 4),)),
    "lut_k5v4": (((128, 5),), ((128, 4),)),
    "k3v3": (((128, 3),), ((128, 3),)),
    "k2v2": (((128, 2),), ((128, 2),)),
    "k3.5v3.5": (((64, 4), (64, 3)), ((64, 4), (64, 3))),  # the outlier split at D = 128
}


def _centroids(rng, dim, bits):
  """A random symmetric codebook (as Lloyd-Max codebooks are), float16-exact: the
  kernel's tables are float16."""
  half = np.sort(np.abs(rng.normal(size=2**(bits - 1)))) / math.sqrt(dim)
  c = np.concatenate([-half[::-1], half])
  return c.astype(np.float16).astype(np.float32)


def make_case(seed, preset, *, B=2, K=3, G=5, S=211, lengths=None):
  rng = np.random.default_rng(seed)
  keys, values = PRESETS[preset]
  qk, kc, kn, kcb, vc, vn, vcb = [], [], [], [], [], [], []
  for d, b in keys:
    qk.append(jnp.asarray((rng.normal(size=(B, K, G, d)) * 3).astype(np.float16),
                          jnp.float32))
    kc.append(packing.pack(jnp.asarray(rng.integers(0, 2**b, (B, K, S, d))), b))
    kn.append(jnp.asarray(rng.uniform(0.5, 2, (B, K, S)), jnp.float16))
    kcb.append(_centroids(rng, d, b))
  for d, b in values:
    vc.append(packing.pack(jnp.asarray(rng.integers(0, 2**b, (B, K, S, d))), b))
    vn.append(jnp.asarray(rng.uniform(0.5, 2, (B, K, S)), jnp.float32))
    vcb.append(_centroids(rng, d, b))
  if lengths is None:
    lengths = rng.integers(1, S + 1, (B,))
  # Garbage past the length must not leak: poison those scales.
  valid = np.arange(S)[None, :] < np.asarray(lengths)[:, None]
  kn = [jnp.where(valid[:, None, :], n, jnp.nan).astype(n.dtype) for n in kn]
  vn = [jnp.where(valid[:, None, :], n, jnp.inf).astype(n.dtype) for n in vn]
  return qk, kc, kn, kcb, vc, vn, vcb, jnp.asarray(lengths, jnp.int32)


def assert_partials_close(got: dk.Partial, ref: dk.Partial, S: int):
  m_got, m_ref = np.asarray(got.m), np.asarray(ref.m)
  np.testing.assert_array_equal(np.isneginf(m_got), np.isneginf(m_ref))
  fin = np.isfinite(m_ref)
  np.testing.assert_allclose(m_got[fin], m_ref[fin], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got.l), np.asarray(ref.l), rtol=1e-5, atol=0)
  # acc: probabilities times scales meet the value table in float16 in the kernel.
  tol = 1e-4 * math.sqrt(S)
  for a, b in zip(got.acc, ref.acc):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a))
    err = np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-30)
    err = np.where(np.linalg.norm(b, axis=-1) == 0, np.abs(a).max(axis=-1), err)
    assert err.max() < tol, (err.max(), tol)


def reference_dense(qk, kc, kn, kcb, vc, vn, vcb, lengths) -> dk.Partial:
  """float64 numpy attention partials over dequantized keys and values."""
  S = kc[0].shape[2]
  scores = 0
  for q, c, n, cb in zip(qk, kc, kn, kcb):
    keys = np.asarray(dk.dequantize_segment(c, cb, q.shape[-1]), np.float64)
    scores = scores + np.einsum("bkgd,bksd->bkgs", np.asarray(q, np.float64), keys) * \
        np.asarray(n, np.float64)[:, :, None, :]
  valid = np.arange(S)[None, :] < np.asarray(lengths)[:, None]
  scores = np.where(valid[:, None, None, :], scores, -np.inf)
  m = scores.max(-1)
  p = np.exp(scores - np.where(np.isneginf(m), 0, m)[..., None])
  accs = []
  for c, n, cb, d in zip(vc, vn, vcb, dk.value_dims_from_codes(vc, vcb)):
    vals = np.asarray(dk.dequantize_segment(c, cb, d), np.float64)
    n = np.where(valid[:, None, :], np.asarray(n, np.float64), 0)
    accs.append(np.einsum("bkgs,bksd->bkgd", p * n[:, :, None, :], vals))
  return dk.Partial(m, p.sum(-1), tuple(accs))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_reference_matches_float64(preset):
  args = make_case(0, preset)
  assert_partials_close(dk.decode(*args, implementation="xla"), reference_dense(*args), 211)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_decode_interpret_matches_reference(preset):
  args = make_case(1, preset, lengths=[211, 0])  # a full row and an empty one
  ref = dk.decode(*args, implementation="xla")
  got = dk.decode(*args, implementation="pallas", interpret=True, block_s=32, num_splits=3)
  assert_partials_close(got, ref, 211)
  assert np.all(np.isneginf(np.asarray(got.m[1]))) and np.all(np.asarray(got.l[1]) == 0)


@pytest.mark.parametrize("preset,orient,lookup", [("mse3", "tokens", "select"),
                                                  ("mse3", "rows", "gather"),
                                                  ("split", "rows", "lut-gather")])
def test_decode_interpret_variants(preset, orient, lookup):
  args = make_case(2, preset, S=173, G=3)
  ref = dk.decode(*args, implementation="xla")
  got = dk.decode(*args, implementation="pallas", interpret=True, block_s=16, num_splits=4,
                  orient=orient, lookup=lookup)
  assert_partials_close(got, ref, 173)


def test_decode_chunk_rows_and_traced_centroids():
  # A chunk of T = 4 query tokens with G = 5 heads: 20 query rows; centroids as jit args.
  qk, kc, kn, kcb, vc, vn, vcb, lengths = make_case(3, "prod4", G=20, S=97)
  ref = dk.decode(qk, kc, kn, kcb, vc, vn, vcb, lengths, implementation="xla")
  f = jax.jit(lambda kcb, vcb: dk.decode(qk, kc, kn, kcb, vc, vn, vcb, lengths,
                                         implementation="pallas", interpret=True,
                                         block_s=32, num_splits=2))
  assert_partials_close(f(kcb, vcb), ref, 97)
  with pytest.raises(ValueError, match="concrete"):
    jax.jit(lambda kcb, vcb: dk.decode(qk, kc, kn, kcb, vc, vn, vcb, lengths,
                                       implementation="pallas", lookup="select"))(kcb, vcb)


@pytest.mark.parametrize("orient,lookup", [("rows", "lut"), ("tokens", "lut"),
                                           ("tokens", "lut-parts"), ("rows", "lut-joined"),
                                           ("tokens", "lut-joined")])
def test_decode_interpret_lut_path_and_start(orient, lookup):
  # The lut path's query permutation and the per-part accumulators, with tokens before
  # `start` ignored (both implementations).
  args = make_case(12, "lut4", B=2, K=2, G=7, S=300, lengths=[300, 131])
  S, start = 300, 37
  assert dk.lut_eligible(dk.SegmentLayout(128, 4), tuple(float(x) for x in args[3][0]))
  sliced = [[a[:, :, start:] for a in arg] for arg in (args[1], args[2], args[4], args[5])]
  ref = dk.decode(args[0], sliced[0], sliced[1], args[3], sliced[2], sliced[3], args[6],
                  args[7] - start)
  got_ref = dk.decode(*args, start=start)
  got = dk.decode(*args, implementation="pallas", interpret=True, block_s=32, num_splits=3,
                  orient=orient, lookup=lookup, start=start)
  assert_partials_close(got_ref, ref, S)
  assert_partials_close(got, ref, S)


def _run_ptx(asm: str, inputs: list[np.ndarray], outputs: int,
             shared: np.ndarray | None = None) -> list[np.ndarray]:
  """Runs the straight-line PTX of a lut lookup on uint32 numpy arrays (the handful of
  instructions it uses), so its bit logic is checked without a GPU. Registers $0 ..
  $outputs - 1 are the results, the next ones the inputs; `shared` is shared memory as
  uint32 words from address 0 (`ld.shared.b32` must be 4-byte aligned and inside it)."""
  regs = {f"${outputs + i}": np.asarray(x).astype(np.uint32) for i, x in enumerate(inputs)}

  def ld_shared(addr):
    assert shared is not None and np.all(addr % 4 == 0) and np.all(addr < 4 * shared.size)
    return shared[addr // 4]

  def val(tok):
    tok = tok.strip()
    return np.uint32(int(tok, 0)) if tok[0].isdigit() else regs[tok]

  def prmt(a, b, c):
    data = np.asarray(a, np.uint64) | (np.asarray(b, np.uint64) << np.uint64(32))
    out = np.zeros(np.broadcast(a, b, c).shape, np.uint32)
    for byte in range(4):
      sel = (np.asarray(c, np.uint32) >> np.uint32(4 * byte)) & np.uint32(15)
      assert np.all(sel < 8), "sign-replicate mode is not used"
      picked = (data >> (sel.astype(np.uint64) * np.uint64(8))) & np.uint64(0xFF)
      out |= picked.astype(np.uint32) << np.uint32(8 * byte)
    return out

  def lop3(a, b, c, lut):  # bit i of lut: the result for (a, b, c) = (i >> 2, i >> 1, i) & 1
    out = np.zeros(np.broadcast(a, b, c).shape, np.uint32)
    for i in range(8):
      if int(lut) >> i & 1:
        out |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
    return out

  ops = {
      "not.b32": lambda a: ~a, "and.b32": np.bitwise_and, "or.b32": np.bitwise_or,
      "xor.b32": np.bitwise_xor, "shr.u32": lambda a, b: a >> b, "shr.b32": lambda a, b: a >> b,
      "shl.b32": lambda a, b: a << b, "mul.lo.u32": lambda a, b: a * b,
      "mov.b32": lambda a: np.uint32(a), "prmt.b32": prmt, "lop3.b32": lop3,
  }
  ops["add.u32"], ops["ld.shared.b32"] = lambda a, b: a + b, ld_shared
  for line in _ptx_instructions(asm):
    op, rest = line.split(None, 1)
    dst, *srcs = [t.strip().strip("[]") for t in rest.split(",")]
    with np.errstate(over="ignore"):
      regs[dst] = np.asarray(ops[op](*[val(t) for t in srcs]), np.uint32)
  return [regs[f"${t}"] for t in range(outputs)]


def _ptx_instructions(asm: str) -> list[str]:
  lines = [line.strip() for line in asm.replace("{", "").replace("}", "").split(";")]
  return [line for line in lines if line and not line.startswith(".reg")]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lut_ptx_looks_up_every_code(bits):
  # Every code in every position of a word, from the cache's packing through the kernel's
  # views of it (`dk._views`, the columns the kernel loads): the PTX's float16 pairs must
  # equal the codebook's values (code t of the first word in the low half, of the second
  # word in the high half; at 3 bits the words' high-bit halves share one register).
  rng = np.random.default_rng(13 + bits)
  per_word = 8 if bits == 4 else 16
  if bits == 4:  # the sign trick needs a symmetric codebook; 2 and 3 bits take any
    centroids = _centroids(rng, 128, bits)
    asm = dk._lut_asm(dk._lut_tables(tuple(float(x) for x in centroids)))
  else:
    centroids = np.sort(rng.normal(size=2**bits) * 0.1).astype(np.float16)
    asm = dk._lut_low_asm(bits, dk._lut_full_tables(tuple(float(x) for x in centroids)))
  codes = rng.integers(0, 2**bits, (4096, 2 * per_word))  # two words per row
  codes[:2**bits] = np.arange(2**bits)[:, None]  # every code in every place
  packed = packing.pack(jnp.asarray(codes), bits)[None, None]  # [1, 1, n, P]
  seg = dk.SegmentLayout(2 * per_word, bits)
  views = [np.asarray(v)[0, 0] for v in dk._views(packed, seg, "joined")]
  inputs = [views[0][:, 0], views[0][:, 1]]  # the (low plane's) words 0 and 1
  if bits == 3:  # the 1-bit plane as halves 2W .. 3W - 1 (W = 2), packed two to a register
    halves = views[1][:, 4:6].astype(np.uint32)
    inputs.append(halves[:, 0] | halves[:, 1] << 16)
  outs = _run_ptx(asm, inputs, per_word)
  table = np.asarray(centroids, np.float16)
  for t, out in enumerate(outs):
    pair = np.stack([out & 0xFFFF, out >> 16], -1).astype(np.uint16).view(np.float16)
    np.testing.assert_array_equal(pair[:, 0], table[codes[:, t]])
    np.testing.assert_array_equal(pair[:, 1], table[codes[:, per_word + t]])
  # The integer instructions per 32-bit word pair that the module's comments count (the
  # table moves aside): 52 per 16 codes at 4 bits, 44 and 55 per 32 codes at 2 and 3.
  work = [i for i in _ptx_instructions(asm) if not i.startswith("mov.b32")]
  assert len(work) == {2: 44, 3: 55, 4: 52}[bits]


def test_lut_nibble_ptx_looks_up_every_code():
  # The "nibbles" layout: 4 bytes (`pack = 4` on uint8) -> the float16 values of their low
  # nibbles (result 0: $0 = bytes 0, 1; $1 = bytes 2, 3) and high nibbles (result 1: $2, $3),
  # element k from byte k alone; then the kernel's permutation of whole rows (`_lut_nibbles`
  # in jnp) against `_parts_perm`.
  rng = np.random.default_rng(17)
  centroids = _centroids(rng, 128, 4)
  asm = dk._lut_nibble_asm(dk._lut_tables(tuple(float(x) for x in centroids)))
  codes = rng.integers(0, 16, (4096, 8))
  codes[:16] = np.arange(16)[:, None]
  word = np.asarray(packing.pack(jnp.asarray(codes), 4)).view(np.uint32)[:, 0]
  outs = _run_ptx(asm, [word], 4)
  table = np.asarray(centroids, np.float16)
  for r, out in enumerate(outs):
    pair = np.stack([out & 0xFFFF, out >> 16], -1).astype(np.uint16).view(np.float16)
    nibble, byte = divmod(r, 2)  # result nibble, bytes 2 * byte .. 2 * byte + 1
    np.testing.assert_array_equal(pair, table[codes[:, [4 * byte + nibble, 4 * byte + 2 + nibble]]])
  assert len([i for i in _ptx_instructions(asm) if not i.startswith("mov.b32")]) == 22
  row = rng.integers(0, 16, (3, 128))
  parts = dk._lut_nibbles(packing.pack(jnp.asarray(row), 4), tuple(centroids), True)
  perm = dk._parts_perm("nibbles", 128)
  for t in range(2):
    np.testing.assert_array_equal(np.asarray(parts[t]), table[row[:, perm[t]]])


def test_lut_nibble5_ptx_looks_up_every_code():
  # 5 bits in the "nibbles" layout: the 4-bit plane's bytes and their codes' high bits as the
  # kernel spreads them (`dk._high_bits`, run in interpret mode on the cache's packing) ->
  # the same 4 float16 pairs as at 4 bits, now over a codebook of 32; then the jnp path.
  rng = np.random.default_rng(19)
  centroids = _centroids(rng, 128, 5)
  asm = dk._lut_nibble5_asm(dk._lut_full_tables(tuple(float(x) for x in centroids[16:])))
  dim = 16
  codes = rng.integers(0, 32, (4096, dim))
  codes[:32, :8] = np.arange(32)[:, None]  # every code in every place of the first word
  packed = packing.pack(jnp.asarray(codes), 5)  # [n, 8 nibble bytes + 2 high-bit bytes]
  seg = dk.SegmentLayout(dim, 5)

  def high_kernel(ref, out_ref):
    out_ref[...] = dk._high_bits(ref, jnp.arange(ref.shape[0]), seg, None)

  high = pl.pallas_call(high_kernel, out_shape=jax.ShapeDtypeStruct((4096, dim // 2), jnp.uint8),
                        interpret=True)(packed)
  np.testing.assert_array_equal(np.asarray(high), codes[:, 0::2] >> 4 | (codes[:, 1::2] >> 4) << 1)
  word = lambda x: np.ascontiguousarray(np.asarray(x)[:, :4]).view(np.uint32)[:, 0]
  outs = _run_ptx(asm, [word(packed), word(high)], 4)
  table = np.asarray(centroids, np.float16)
  for r, out in enumerate(outs):
    pair = np.stack([out & 0xFFFF, out >> 16], -1).astype(np.uint16).view(np.float16)
    nibble, byte = divmod(r, 2)
    np.testing.assert_array_equal(pair, table[codes[:, [4 * byte + nibble, 4 * byte + 2 + nibble]]])
  assert len([i for i in _ptx_instructions(asm) if not i.startswith("mov.b32")]) == 35
  parts = dk._lut_nibbles(packed[:, :dim // 2], tuple(centroids), True, high)
  perm = dk._parts_perm("nibbles", dim)
  for t in range(2):
    np.testing.assert_array_equal(np.asarray(parts[t]), table[codes[:, perm[t]]])


def test_lut_eligibility():
  sym = lambda b: tuple(float(x) for x in _centroids(np.random.default_rng(b), 64, b))
  asym = lambda b: tuple(np.sort(np.random.default_rng(b).normal(size=2**b)).tolist())
  ok = lambda d, b, c=None, **kw: dk.lut_eligible(dk.SegmentLayout(d, b), c or sym(b), **kw)
  for d, b in [(128, 2), (64, 2), (128, 3), (64, 3), (32, 3), (128, 4), (64, 4)]:
    assert ok(d, b), (d, b)
  assert ok(128, 2, asym(2)) and ok(64, 3, asym(3))  # the tables hold the whole codebook
  assert not ok(128, 4, asym(4))  # 4 bits: the sign trick needs a symmetric codebook
  # Rows that are no power-of-two number of words (48@2, 96@3), a 3-bit row of 6 bytes
  # (16@3), other widths, traced centroids:
  for d, b in [(48, 2), (96, 3), (16, 3), (128, 5), (128, 1), (96, 4)]:
    assert not ok(d, b), (d, b)
  assert not dk.lut_eligible(dk.SegmentLayout(128, 3), None)
  # The "parts" layout: 4 bits and >= 16 words only.
  assert ok(128, 4, layout="parts") and not ok(64, 4, layout="parts")
  assert not ok(128, 3, layout="parts") and not ok(128, 3, layout="nibbles")
  assert ok(64, 4, layout="nibbles") and ok(32, 4, layout="nibbles")
  # 5 bits: the nibbles layout only, with a symmetric codebook.
  assert ok(128, 5, layout="nibbles") and ok(64, 5, layout="nibbles")
  assert not ok(128, 5, asym(5), layout="nibbles") and not ok(128, 5, layout="parts")
  assert not ok(16, 5, layout="nibbles") and not ok(96, 5, layout="nibbles")
  assert not ok(16, 4, layout="nibbles")  # two dots of depth 8
  # pack = 4 on bytes: block_s * d / 2 >= 128 * num_warps (16 rows of 32 bytes: 4 warps).
  assert ok(64, 4, layout="nibbles", block_s=16, num_warps=4)
  assert not ok(64, 4, layout="nibbles", block_s=16, num_warps=8)
  # pack = 2 takes two words per thread: block_s * W >= 64 * num_warps.
  assert ok(64, 3, block_s=64, num_warps=4) and not ok(64, 3, block_s=32, num_warps=4)
  assert ok(128, 2, block_s=32, num_warps=4) and not ok(128, 2, block_s=32, num_warps=8)
  assert ok(128, 4, block_s=16, num_warps=4)


@pytest.mark.parametrize("preset,orient", [("k2v2", "rows"), ("k3v3", "tokens"),
                                           ("k3.5v3.5", "rows"), ("lut_k5v4", "rows")])
def test_decode_interpret_lut_low_bits(preset, orient, monkeypatch):
  # 2-, 3- and 5-bit codes (and the 64@4 + 64@3 outlier split) through the byte-permute path
  # against the reference: asymmetric 2- and 3-bit codebooks, a ragged last tile, an empty
  # split (row 1: 100 tokens, splits of 128), tokens before `start` ignored; every segment
  # must take the lut.
  seen = []
  lut_parts, lut_nibbles = dk._lut_parts, dk._lut_nibbles
  monkeypatch.setattr(dk, "_lut_parts",
                      lambda bits, *a: seen.append(bits) or lut_parts(bits, *a))
  monkeypatch.setattr(dk, "_lut_nibbles",
                      lambda *a: seen.append(4 if a[3] is None else 5) or lut_nibbles(*a))
  qk, kc, kn, kcb, vc, vn, vcb, lengths = make_case(21, preset, B=2, K=1, G=6, S=233,
                                                    lengths=[233, 100])
  rng = np.random.default_rng(22)
  draw = lambda n: np.sort(rng.normal(size=n) * 0.1).astype(np.float16).astype(np.float32)
  asym = lambda cb: [c if c.shape[0] >= 16 else draw(c.shape[0]) for c in cb]
  args = (qk, kc, kn, asym(kcb), vc, vn, asym(vcb), lengths)
  ref = dk.decode(*args, start=5)
  got = dk.decode(*args, implementation="pallas", interpret=True, block_s=64, num_splits=3,
                  orient=orient, start=5, lookup="lut")
  assert_partials_close(got, ref, 233)
  keys, values = PRESETS[preset]
  assert sorted(seen) == sorted(b for _, b in keys + values)


def test_merge_partials_splits_tokens():
  qk, kc, kn, kcb, vc, vn, vcb, _ = make_case(4, "mse4", S=150, lengths=[150, 150])
  full = reference_dense(qk, kc, kn, kcb, vc, vn, vcb, jnp.asarray([150, 150]))
  cut = 61
  halves = []
  for lo, hi in ((0, cut), (cut, 150)):
    sl = lambda a: a[:, :, lo:hi]
    halves.append(dk.decode(qk, [sl(c) for c in kc], [sl(n) for n in kn], kcb,
                            [sl(c) for c in vc], [sl(n) for n in vn], vcb,
                            jnp.asarray([hi - lo] * 2, jnp.int32)))
  merged = dk.merge_partials(*halves)
  np.testing.assert_allclose(merged.m, full.m, rtol=1e-6)
  np.testing.assert_allclose(merged.l, full.l, rtol=1e-5)
  np.testing.assert_allclose(merged.acc[0], full.acc[0], rtol=1e-5, atol=1e-6)


def test_decode_rejects_bad_arguments():
  qk, kc, kn, kcb, vc, vn, vcb, lengths = make_case(5, "mse4", S=64)
  with pytest.raises(ValueError, match="implementation"):
    dk.decode(qk, kc, kn, kcb, vc, vn, vcb, lengths, implementation="cuda")
  with pytest.raises(ValueError, match="packed_size"):
    dk.decode(qk, [c[..., :-1] for c in kc], kn, kcb, vc, vn, vcb, lengths)
  with pytest.raises(ValueError, match="lengths"):
    dk.decode(qk, kc, kn, kcb, vc, vn, vcb, lengths[:1])
  with pytest.raises(ValueError, match="block_s"):
    dk.decode(qk, kc, kn, kcb, vc, vn, vcb, lengths, implementation="pallas", block_s=48)


def _lowered(f, *args) -> str:
  return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


# A line of each lut asm block, to find it in the lowered kernel.
_LUT_MARKS = {2: "0x44444444, 0xea", 3: "prmt.b32 hp, $18, g, 0x6420", 4: "not.b32 na, $8",
              5: "mul.lo.u32 n, n, 72"}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_decode_lowers_to_triton_for_cuda(preset):
  qk, kc, kn, kcb, vc, vn, vcb, lengths = make_case(6, preset, S=128)
  lower = lambda lookup: _lowered(
      lambda *a: dk.decode(*a[:3], kcb, *a[3:5], vcb, a[5], implementation="pallas",
                           block_s=64, num_warps=4, lookup=lookup),
      qk, kc, kn, vc, vn, lengths)
  text, default = lower("lut-joined"), lower(None)
  assert "__gpu$xla.gpu.triton" in text and "tq_decode" in text
  keys, values = PRESETS[preset]
  for (d, b), c in zip(keys + values, kcb + vcb):  # the lut segments' asm is in the module
    if b in _LUT_MARKS:
      eligible = dk.lut_eligible(dk.SegmentLayout(d, b), tuple(float(x) for x in c),
                                 layout="nibbles" if b == 5 else "joined", block_s=64,
                                 num_warps=4)
      assert eligible == (d in (64, 128)), (d, b)
      assert (_LUT_MARKS[b] in text) == eligible, (d, b)
      # The default ("lut"): 4- and 5-bit segments in the nibbles layout, 2 and 3 bits joined.
      mark = "not.b32 na, $4" if b == 4 else _LUT_MARKS[b]
      assert (mark in default) == eligible, (d, b)
      assert b != 4 or _LUT_MARKS[4] not in default



# --- The Mosaic GPU decode kernel (pallas_kernels.decode_mosaic). The register layout of a
# wgmma A operand (PTX ISA, m64nNk16): warpgroup thread t, warp w = t // 32, lane l holds
# rows 16 w + l // 4 + 8 h (h = 0, 1) of each 64-row tile and columns 8 j + 2 (l % 4) + e
# (e = 0, 1: the low and high half of register j).


@pytest.mark.parametrize("lookup", dm.LOOKUPS)
def test_mosaic_ptx_dequantizes_every_code_into_the_wgmma_layout(lookup):
  # Keys: thread t reads words 4q .. 4q+3 of its rows (q = l % 4); output j of word i is its
  # register 4i + j. Values: the thread's 16-bit slot 8w + l // 4 of tokens 8J + 2q + e,
  # as `ldmatrix` reads it from the swizzled tile (`_ldmatrix_value_words`); output j is
  # register (J, code j = 2 mg + h of the slot) of V^T. Every code value occurs in every
  # position. "smem": keys and values from different codebooks (any codebook: no sign
  # trick), the table at a base that is not 256-aligned, each thread at its lane's words.
  rng = np.random.default_rng(21)
  centroids = _centroids(rng, 128, 4)
  table = np.asarray(centroids, np.float16)
  if lookup == "prmt":
    lo, hi = dm.tables(tuple(float(x) for x in centroids))
    key_asm = value_asm = dm.word_asm(lo, hi)
    value_table, shared = table, None
    extra = lambda t, v: []
  else:
    value_table = np.sort(rng.normal(size=16)).astype(np.float16)  # asymmetric
    base = 1040  # bytes
    shared = np.zeros(base // 4 + 256 * dm.TABLE_WORDS, np.uint32)
    shared[base // 4:] = dm.smem_table(table, value_table).ravel()
    key_asm, value_asm = dm.smem_word_asm(pairs=True), dm.smem_word_asm(pairs=False)
    extra = lambda t, v: [4 * (t % 32) + 128 * v, np.full_like(t, base)]
  T = 128
  kc, vc = rng.integers(0, 16, (2, T, 128))
  kc[:16], vc[:16] = np.arange(16)[:, None], np.arange(16)[:, None]
  words = lambda c: np.asarray(packing.pack(jnp.asarray(c), 4)).view(np.uint32)  # [T, 16]
  t = np.arange(128)
  w, l4, q = t // 32, (t % 32) // 4, t % 4
  f16 = lambda x: np.stack([x & 0xFFFF, x >> 16], -1).astype(np.uint16).view(np.float16)

  key_words, got = words(kc), np.full((T, 128), np.nan, np.float16)
  for rt in range(T // 64):
    for h in range(2):
      row = 64 * rt + 16 * w + l4 + 8 * h
      for i in range(4):
        outs = _run_ptx(key_asm, [key_words[row, 4 * q + i], *extra(t, 0)], 4, shared)
        for j, out in enumerate(outs):
          for e in range(2):
            got[row, 8 * (4 * i + j) + 2 * q + e] = f16(out)[:, e]
  np.testing.assert_array_equal(got, table[kc][:, dm.k_perm(lookup)])

  J, w, l4, q, word = (np.asarray(x) for x in zip(*_ldmatrix_value_words(vc)))
  got = np.full((128, T), np.nan, np.float16)
  thread = 32 * w + 4 * l4 + q
  for j, out in enumerate(_run_ptx(value_asm, [word, *extra(thread, 1)], 4, shared)):
    mg, h = divmod(j, 2)
    for e in range(2):
      got[64 * mg + 16 * w + l4 + 8 * h, 8 * J + 2 * q + e] = f16(out)[:, e]
  np.testing.assert_array_equal(got, value_table[vc][:, dm.v_perm()].T)
  assert sorted(dm.k_perm(lookup)) == sorted(dm.v_perm()) == list(range(128))
  # The counts the module's docstring gives per 8 codes: 21 (and the move of the input);
  # 12 for keys, 16 for values, of which 4 loads and 4 adds that may fold into the loads.
  counts = (22, 22) if lookup == "prmt" else (12, 16)
  assert (len(_ptx_instructions(key_asm)), len(_ptx_instructions(value_asm))) == counts


def test_mosaic_3bit_ptx_dequantizes_every_code_into_the_wgmma_layout():
  # The 3-bit lookups (`key3_asm`, `value3_asm`) on the cache's
  # packing, every code value in every position, keys and values from different
  # asymmetric codebooks, the table at a base that is not 256-aligned.
  rng = np.random.default_rng(31)
  kt, vt = (np.sort(rng.normal(size=8)).astype(np.float16) for _ in range(2))
  base = 1040
  shared = np.zeros(base // 4 + dm.TABLE3_ROWS * dm.TABLE_WORDS, np.uint32)
  shared[base // 4:] = dm.smem_table3(kt, vt).ravel()
  T = 128
  kc, vc = rng.integers(0, 8, (2, T, 128))
  kc[:8], vc[:8] = np.arange(8)[:, None], np.arange(8)[:, None]
  rows = lambda c: np.asarray(packing.pack(jnp.asarray(c), 3))  # [T, 48]: 32 + 16 bytes
  word = lambda b, i: b[..., i:i + 4].copy().view(np.uint32)[..., 0]  # bytes i..i+3
  t = np.arange(128)
  w, l4, q = t // 32, (t % 32) // 4, t % 4
  f16 = lambda x: np.stack([x & 0xFFFF, x >> 16], -1).astype(np.uint16).view(np.float16)
  lane = lambda v: 4 * (t % 32) + 128 * v

  kb, got = rows(kc), np.full((T, 128), np.nan, np.float16)
  for rt in range(T // 64):
    for h in range(2):
      row = 64 * rt + 16 * w + l4 + 8 * h
      b = kb[row]  # [128 threads, 48]
      inputs = [np.array([word(b[i], 8 * q[i]) for i in t]),
                np.array([word(b[i], 8 * q[i] + 4) for i in t]),
                np.array([word(b[i], 32 + 4 * q[i]) for i in t]), lane(0), np.full(128, base)]
      for m, out in enumerate(_run_ptx(dm.key3_asm(), inputs, 16, shared)):
        for e in range(2):
          got[row, 8 * m + 2 * q + e] = f16(out)[:, e]
  np.testing.assert_array_equal(got, kt[kc][:, dm.k_perm3()])

  vb, got = rows(vc), np.full((128, T), np.nan, np.float16)
  g = dm.value3_group(w, l4)
  slot = 16 * (w // 2) + 2 * l4  # the slot's first byte in the 2-bit plane
  one_bit = 32 + g // 2  # the 1-bit byte of the group's high bits
  for J in range(T // 8):
    A, B = 8 * J + 2 * q, 8 * J + 2 * q + 1  # the thread's two tokens
    W = np.array([int(vb[A[i], slot[i]]) | int(vb[A[i], slot[i] + 1]) << 8
                  | int(vb[B[i], slot[i]]) << 16 | int(vb[B[i], slot[i] + 1]) << 24
                  for i in t], np.uint32)
    aligned = one_bit - one_bit % 4
    inputs = [W, np.where(w % 2, 0x4431, 0x4420),
              np.array([word(vb[A[i]], aligned[i]) for i in t]),
              np.array([word(vb[B[i]], aligned[i]) for i in t]),
              8 * (one_bit % 4) + 4 * (g % 2), lane(1), np.full(128, base)]
    for k, out in enumerate(_run_ptx(dm.value3_asm(), inputs, 4, shared)):
      mg, h = divmod(k, 2)
      for e, tok in enumerate((A, B)):
        got[64 * mg + 16 * w + l4 + 8 * h, tok] = f16(out)[:, e]
  np.testing.assert_array_equal(got, vt[vc][:, dm.v_perm3()].T)
  assert sorted(dm.k_perm3()) == sorted(dm.v_perm3()) == list(range(128))
  # The docstrings' counts: 33 per 16 key codes (x2), 27 per 8 value codes.
  assert (len(_ptx_instructions(dm.key3_asm())), len(_ptx_instructions(dm.value3_asm()))) == (
      66, 27)


def test_mosaic_64_ptx_dequantizes_every_code_into_the_wgmma_layout():
  # 4 bits at 64 coordinates ("smem" only): keys as at 128 with 2 words a thread-row
  # (`k_perm(..., 64)`); values one byte of the 16-bit slot that `ldmatrix.trans` hands
  # the thread from 32-byte rows (no swizzle), its low or high byte by warp parity
  # (`value64_asm`, `v_perm64`). Every code value in every position, keys and values
  # from different asymmetric codebooks, the table at a base that is not 256-aligned.
  rng = np.random.default_rng(41)
  kt, vt = (np.sort(rng.normal(size=16)).astype(np.float16) for _ in range(2))
  base = 1040
  shared = np.zeros(base // 4 + 256 * dm.TABLE_WORDS, np.uint32)
  shared[base // 4:] = dm.smem_table(kt, vt).ravel()
  T = 128
  kc, vc = rng.integers(0, 16, (2, T, 64))
  kc[:16], vc[:16] = np.arange(16)[:, None], np.arange(16)[:, None]
  rows = lambda c: np.asarray(packing.pack(jnp.asarray(c), 4))  # [T, 32]
  t = np.arange(128)
  w, l4, q = t // 32, (t % 32) // 4, t % 4
  f16 = lambda x: np.stack([x & 0xFFFF, x >> 16], -1).astype(np.uint16).view(np.float16)
  lane = lambda v: 4 * (t % 32) + 128 * v

  key_words, got = rows(kc).view(np.uint32), np.full((T, 64), np.nan, np.float16)  # [T, 8]
  for rt in range(T // 64):
    for h in range(2):
      row = 64 * rt + 16 * w + l4 + 8 * h
      for i in range(2):
        outs = _run_ptx(dm.smem_word_asm(pairs=True),
                        [key_words[row, 2 * q + i], lane(0), np.full(128, base)], 4, shared)
        for j, out in enumerate(outs):
          for e in range(2):
            got[row, 8 * (4 * i + j) + 2 * q + e] = f16(out)[:, e]
  np.testing.assert_array_equal(got, kt[kc][:, dm.k_perm("smem", 64)])

  vb, got = rows(vc), np.full((64, T), np.nan, np.float16)
  slot = 16 * (w // 2) + 2 * l4  # the 16-bit slot's first byte
  for J in range(T // 8):
    A, B = 8 * J + 2 * q, 8 * J + 2 * q + 1  # the thread's two tokens
    W = np.array([int(vb[A[i], slot[i]]) | int(vb[A[i], slot[i] + 1]) << 8
                  | int(vb[B[i], slot[i]]) << 16 | int(vb[B[i], slot[i] + 1]) << 24
                  for i in t], np.uint32)
    inputs = [W, lane(1), 0x5504 + 0x10 * (w % 2), 0x5524 + 0x10 * (w % 2), np.full(128, base)]
    for h, out in enumerate(_run_ptx(dm.value64_asm(), inputs, 2, shared)):
      for e, tok in enumerate((A, B)):
        got[16 * w + l4 + 8 * h, tok] = f16(out)[:, e]
  np.testing.assert_array_equal(got, vt[vc][:, dm.v_perm64()].T)
  assert sorted(dm.k_perm("smem", 64)) == sorted(dm.v_perm64()) == list(range(64))
  assert dm.k_perm("smem", 128).tolist() == dm.k_perm("smem").tolist()
  assert len(_ptx_instructions(dm.value64_asm())) == 8  # per 4 codes, as the docstring says


def _ldmatrix_value_words(vc):
  """(J, warp, l4, q, word) for every thread and tile J of value codes vc [T, 128], as
  `decode_mosaic._value_tile` loads them: the tile sits in shared memory as TMA's 64-byte
  swizzle stores it (16-byte chunk c of row r at c ^ (r >> 1) & 3); lane L of warp w points
  at row L % 8 of matrix L // 8 (tile J = 4g + L // 8); `ldmatrix.x4.trans` (PTX ISA) hands
  thread (l4, q) of matrix i the 16-bit elements (row 2q, column l4) and (row 2q + 1,
  column l4) as the low and high half of its register i."""
  T = vc.shape[0]
  natural = np.asarray(packing.pack(jnp.asarray(vc), 4)).reshape(T, 4, 16)  # 16-byte chunks
  tile = np.empty_like(natural)
  for row in range(T):
    for chunk in range(4):
      tile[row, chunk ^ ((row >> 1) & 3)] = natural[row, chunk]
  smem = tile.reshape(-1)
  for w in range(4):
    lane = np.arange(32)
    r = lane % 8
    offset = (lane // 8) * 8 * dm.ROW_BYTES + r * dm.ROW_BYTES + ((w ^ (r >> 1)) << 4)
    for g in range(T // 32):
      rows = [smem[o + g * 32 * dm.ROW_BYTES:][:16].view(np.uint16) for o in offset]
      for i in range(4):
        for t in range(32):
          l4, q = t // 4, t % 4
          word = int(rows[8 * i + 2 * q][l4]) | int(rows[8 * i + 2 * q + 1][l4]) << 16
          yield 4 * g + i, w, l4, q, word


def test_decode_mosaic_lowers_for_cuda_and_checks_its_arguments(monkeypatch):
  qk, kc, kn, kcb, vc, vn, vcb, lengths = make_case(6, "lut4", B=2, K=2, G=4, S=256)
  text = _lowered(lambda *a: dk.decode(*a[:3], kcb, *a[3:5], vcb, a[5],
                                       implementation="mosaic", start=3),
                  qk, kc, kn, vc, vn, lengths)
  assert "mosaic_gpu" in text and "__gpu$xla.gpu.triton" not in text
  stacked = [jnp.stack([x, x]) for x in (kc[0], kn[0], vc[0], vn[0])]
  text = _lowered(lambda q, kc, kn, vc, vn, lengths: dk.decode(
      [q], [kc], [kn], kcb, [vc], [vn], vcb, lengths, implementation="mosaic", layer=1),
      qk[0], *stacked, lengths)
  assert "mosaic_gpu" in text
  # 3 bits: the 3-bit lookups' loads in the kernel, "smem" only, tiled as "smem3".
  k3 = make_case(6, "k3v3", B=2, K=2, G=4, S=256)
  tilings = []
  tiling = dm.default_tiling
  monkeypatch.setattr(dm, "default_tiling", lambda *a: tilings.append(a[3]) or tiling(*a))
  text = _lowered(lambda *a: dk.decode(*a[:3], k3[3], *a[3:5], k3[6], a[5],
                                       implementation="mosaic"), *k3[:3], *k3[4:6], k3[7])
  assert "mosaic_gpu" in text and "ld.shared.v2.b32" in text and "0x4342" in text
  assert tilings == ["smem3"]
  with pytest.raises(ValueError, match='takes lookup "smem" .* for 3-bit codes, got "prmt"'):
    dk.decode(*k3, implementation="mosaic", lookup="prmt")
  # 4 bits at 64 coordinates: the value lookup's selectors in the kernel, "smem" only.
  k64 = make_case(6, "mse4", B=2, K=2, G=4, S=256)  # 4 bits at 64
  text64 = _lowered(lambda *a: dk.decode(*a[:3], k64[3], *a[3:5], k64[6], a[5],
                                         implementation="mosaic"), *k64[:3], *k64[4:6], k64[7])
  assert "mosaic_gpu" in text64 and "ld.shared.b32 pB" in text64
  assert tilings == ["smem3", "smem64"]
  k64x16 = make_case(6, "mse4", B=2, K=2, G=12, S=256)  # 16 query rows: their own tiling
  _lowered(lambda *a: dk.decode(*a[:3], k64x16[3], *a[3:5], k64x16[6], a[5],
                                implementation="mosaic"), *k64x16[:3], *k64x16[4:6], k64x16[7])
  assert tilings == ["smem3", "smem64", "smem64x16"]
  assert "mosaic_gpu" in _lowered(lambda *a: dk.decode(  # 256-token steps at 64
      *a[:3], k64[3], *a[3:5], k64[6], a[5], implementation="mosaic", block_s=256,
      num_stages=2), *k64[:3], *k64[4:6], k64[7])
  with pytest.raises(ValueError, match='takes lookup "smem" .* at 64 coordinates'):
    dk.decode(*k64, implementation="mosaic", lookup="prmt")
  with pytest.raises(ValueError, match="one 4-bit or 3-bit key segment of 128"):
    dk.decode(*make_case(6, "lut_k5v4", S=256), implementation="mosaic")
  with pytest.raises(ValueError, match="one 4-bit or 3-bit key segment of 128"):
    dk.decode(*make_case(6, "k2v2", S=256), implementation="mosaic")
  with pytest.raises(ValueError, match="at most 16 query rows"):
    dk.decode(*make_case(6, "lut4", G=17, S=256), implementation="mosaic")
  with pytest.raises(ValueError, match="no interpret mode"):
    dk.decode(*make_case(6, "lut4", S=256), implementation="mosaic", interpret=True)
  with pytest.raises(ValueError, match=r"\['num_warps'\] apply to \"pallas\" only"):
    dk.decode(*make_case(6, "lut4", S=256), implementation="mosaic", num_warps=2)
  with pytest.raises(ValueError, match=r"step must be one of \(64, 128\) at 128 .* got 32"):
    dk.decode(*make_case(6, "lut4", S=256), implementation="mosaic", block_s=32)
  with pytest.raises(ValueError, match=r"step must be one of \(64, 128\) at 128 .* got 256"):
    dk.decode(*make_case(6, "lut4", S=256), implementation="mosaic", block_s=256)
  with pytest.raises(ValueError, match=r"num_splits must be in \[1, S / step = 2\], got 3"):
    dk.decode(*make_case(6, "lut4", S=256), implementation="mosaic", num_splits=3)
  asym = make_case(6, "lut4", S=256)
  asym[3][0] = asym[3][0] + np.eye(1, 16, 0, np.float32)[0] * 0.01
  with pytest.raises(ValueError, match="symmetric key codebook into the kernel; got asymmetric"):
    dk.decode(*asym, implementation="mosaic", lookup="prmt")
  assert "mosaic_gpu" in _lowered(  # "smem" takes any codebook
      lambda *a: dk.decode(*a[:3], asym[3], *a[3:5], vcb, a[5], implementation="mosaic",
                           lookup="smem"), qk, kc, kn, vc, vn, lengths)
  # The default lookup: the shared-memory table up to 8 query rows or for an asymmetric
  # codebook, the byte permutes at 16 rows (its `ld.shared` is in the module or not).
  assert "ld.shared.b32" in text
  for G, centroids, table in ((12, kcb, False), (12, asym[3], True)):
    case = make_case(6, "lut4", B=2, K=2, G=G, S=256)
    got = _lowered(lambda *a: dk.decode(*a[:3], centroids, *a[3:5], vcb, a[5],
                                        implementation="mosaic"),
                   *(case[i] for i in (0, 1, 2, 4, 5, 7)))
    assert ("ld.shared.b32" in got) == table, (G, table)
  with pytest.raises(ValueError, match="divide S"):
    dk.decode(*make_case(6, "lut4", S=211), implementation="mosaic")
  with pytest.raises(ValueError, match=r"takes lookup in \('prmt', 'smem'\) .* got 'lut'"):
    dk.decode(*make_case(6, "lut4", S=256), implementation="mosaic", lookup="lut")


def test_decode_mosaic_programs_take_the_kernels_own_tiling(monkeypatch):
  # `programs` (bench/ab_mosaic.py's variants) goes to the tiling the kernel picks: at 64
  # coordinates the 256-token steps of "smem64", so 16 programs at B = 2, 2 heads are 4
  # splits of 4 steps (splits sized for "smem"'s 128-token steps could exceed S / step).
  case = make_case(6, "mse4", B=2, K=2, G=4, S=4096)
  built, tilings = [], []
  tiling = dm.default_tiling
  monkeypatch.setattr(dm, "default_tiling", lambda *a: tilings.append(a) or tiling(*a))
  monkeypatch.setattr(dm, "_build", lambda *a: built.append(a) or (_ for _ in ()).throw(
      RuntimeError("built")))
  with pytest.raises(RuntimeError, match="built"):
    dm.decode_mosaic(*case, programs=16)
  assert tilings == [(2, 2, 4096, "smem64", 16)]
  assert built[0][4:7] == (256, 4, 2)  # step, splits, stages
  with pytest.raises(RuntimeError, match="built"):
    dm.decode_mosaic(*case, programs=16, num_splits=2)  # an explicit num_splits wins
  assert built[1][5] == 2
  for bad in (0, 2.0, True):
    with pytest.raises(ValueError, match=f"programs must be a positive int or None, got {bad!r}"):
      dm.decode_mosaic(*case, programs=bad)


# The most splits of whole steps that keep B * K * splits within the tuned number of
# programs (for "prmt" 1056 on the H200, else 1024; for "smem" one wave, 264), at least 2
# steps each where S has them: the e2e cache of 33,024 tokens (258 steps of 128) gets 33
# splits of 8 at B = 8, 4 heads, for 1056 programs (a power of two dividing 258 gave 2),
# 129 of 2 at B = 1; for 1024 programs 32 splits would be 9 steps each: 29 of them. For
# 264 programs 8 splits at B = 8 and 66, evened out to 65 of 4 steps, at B = 1; at 64K,
# 8 heads, B = 1, 33 splits make 16 steps each, evened out to 32. With 4 steps a split at
# least ("smem64"), 512 programs at 16K, B = 1 are 32 splits, not 64; at 64K, 64.
@pytest.mark.parametrize("B,K,S,target,min_steps,want", [
    (8, 4, 33024, 1056, 2, (128, 33)), (1, 4, 33024, 1056, 2, (128, 129)),
    (8, 4, 33024, 1024, 2, (128, 29)), (8, 8, 65536, 1056, 2, (128, 16)),
    (1, 8, 65536, 1056, 2, (128, 128)), (2, 2, 4480, 1024, 2, (128, 12)),
    (1, 1, 4160, 1024, 2, (64, 22)), (1, 1, 64, 1024, 2, (64, 1)),
    (8, 4, 33024, 264, 2, (128, 8)), (1, 4, 33024, 264, 2, (128, 65)),
    (8, 8, 65536, 264, 2, (128, 4)), (1, 8, 65536, 264, 2, (128, 32)),
    (64, 8, 4096, 264, 2, (128, 1)),
    (1, 8, 16384, 512, 4, (128, 32)), (1, 8, 65536, 512, 4, (128, 64)),
    (8, 8, 16384, 512, 4, (128, 8))])
def test_mosaic_splits_cover_every_token_once_from_inside_the_cache(B, K, S, target, min_steps,
                                                                    want, monkeypatch):
  from pallas_kernels import tuned_block_sizes as tbs
  asked = []
  monkeypatch.setattr(tbs, "mosaic_decode_config",
                      lambda lookup: asked.append(lookup) or tbs.MosaicDecodeConfig(
                          step=128, num_stages=2, target_programs=target, min_steps=min_steps))
  step, splits, _ = dm.default_tiling(B, K, S, "smem")
  assert (step, splits) == want and asked == ["smem"]
  # A tuned step that does not divide S is halved until it does (64 divides every S).
  monkeypatch.setattr(tbs, "mosaic_decode_config", lambda lookup: tbs.MosaicDecodeConfig(
      step=256, num_stages=2, target_programs=target, min_steps=min_steps))
  assert dm.default_tiling(B, K, S, "smem64")[0] == (
      256 if S % 256 == 0 else 128 if S % 128 == 0 else 64)
  # An explicit number of programs (bench/ab_mosaic.py's "programs") instead of the tuned.
  assert dm.default_tiling(B, K, S, "smem", 1)[1] == 1
  split_len = -(-S // step // splits) * step
  first, read = (np.asarray(x) for x in dm.split_window(np.arange(splits), split_len, S))
  owned = np.zeros(S, np.int64)
  for f, r in zip(first, read):
    assert 0 <= r <= f < S and r + split_len <= S  # every split non-empty, its window inside
    owned[f:min(f + split_len, S)] += 1
  assert (owned == 1).all()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("preset,lookup", [("lut4", "prmt"), ("lut4", "smem"),
                                           ("k3v3", "smem"), ("mse4", "smem")])
@pytest.mark.parametrize("G,start,layer,S,splits", [(4, 0, None, 4096, None),
                                                    (7, 5, None, 4096, None),
                                                    (12, 0, 1, 4096, None),
                                                    (4, 3, None, 4480, 4),
                                                    (7, 3, None, 4608, 4)])
def test_decode_mosaic_gpu_matches_reference(G, start, layer, S, splits, preset, lookup):
  # S = 4480 in 4 splits: 9, 9, 9 and 8 steps of 128, the last read from token 3328; row 1
  # ends inside that overlap. mse4 (64 coordinates) takes 256-token steps up to 8 rows
  # ("smem64"): S = 4608 in 4 splits of 5, 5, 5 and 3 steps, the last read from 3328; at
  # S = 4480 the step halves to 128, and 12 rows take the 16-row tiling ("smem64x16").
  args = make_case(8, preset, B=3, K=2, G=G, S=S, lengths=[S, 3400 if splits else 1000, 0])
  ref = dk.decode(*args, implementation="xla", start=start)
  qk, kc, kn, kcb, vc, vn, vcb, lengths = args
  if layer is not None:  # the same region as layer 1 of 2, read in place
    kc, kn, vc, vn = ([jnp.stack([x[0] * 0, x[0]])] for x in (kc, kn, vc, vn))
  got = jax.jit(lambda *a: dk.decode(*a[:3], kcb, *a[3:5], vcb, a[5], implementation="mosaic",
                                     start=start, layer=layer, num_splits=splits,
                                     lookup=lookup))(
                                         qk, kc, kn, vc, vn, lengths)
  assert_partials_close(got, ref, S)


ENCODE_CONFIGS = {
    "mse4": qz.QuantizerConfig(64, 4),
    "mse3_nc_f16": qz.QuantizerConfig(64, 3, norm_correction=True, scale_dtype="float16"),
    "prod2": qz.QuantizerConfig(64, 2, kind="prod"),
    "split_prod": qz.QuantizerConfig(64, 3, kind="prod", outlier_channels=16, outlier_bits=4,
                                     rotation="haar"),
}


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("name", list(ENCODE_CONFIGS))
def test_encode_interpret_matches_quantizer(name, steps):
  # 37 tokens: 3 programs of one block or 2 of two blocks (the last block past the end).
  cfg = ENCODE_CONFIGS[name]
  quant = qz.Quantizer.create(cfg)
  x = jnp.asarray(np.random.default_rng(7).normal(size=(37, cfg.head_dim)) * 5, jnp.float16)
  ref = ek.encode(quant, x)
  got = ek.encode(quant, x, implementation="pallas", interpret=True, block_n=16, steps=steps)
  for a, b in zip(got.codes, ref.codes):
    assert a.shape == b.shape and a.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(got.scales, ref.scales):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=2e-6 if a.dtype == jnp.float32 else 1e-3)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
def test_encode_search_counts_boundaries_below(bits):
  # The kernel's binary search against the count of boundaries below, at the boundaries
  # themselves, just above them, and at NaN and infinities.
  rng = np.random.default_rng(bits)
  bounds = np.sort(rng.normal(size=2**bits - 1)).astype(np.float32)
  u = np.concatenate([rng.normal(size=3000), bounds, np.nextafter(bounds, np.inf),
                      [np.nan, np.inf, -np.inf]]).astype(np.float32)
  got = ek.search(jnp.asarray(u), [jnp.float32(b) for b in bounds])
  count = (u[:, None] > bounds[None, :]).sum(1)
  np.testing.assert_array_equal(np.asarray(got), count)
  # With values: the value at the count, by the select tree.
  values = rng.normal(size=2**bits).astype(np.float32)
  idx, got = ek.search(jnp.asarray(u), [jnp.float32(b) for b in bounds],
                       [jnp.float32(v) for v in values])
  np.testing.assert_array_equal(np.asarray(idx), count)
  np.testing.assert_array_equal(np.asarray(got), values[count])
  with pytest.raises(ValueError, match="2\\*\\*b - 1 bounds, got 2"):
    ek.search(jnp.asarray(u), [jnp.float32(0), jnp.float32(1)])
  with pytest.raises(ValueError, match=f"needs {2**bits} values .* got 3"):
    ek.search(jnp.asarray(u), [jnp.float32(b) for b in bounds], [jnp.float32(0)] * 3)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_encode_search_odd_counts_boundaries_below(bits):
  # The sign-then-magnitude search on odd-symmetric tables: the count of boundaries below
  # at ±boundaries, their neighbours, ±0, ±inf and NaNs of every payload (0, as search).
  rng = np.random.default_rng(10 + bits)
  upper = np.sort(np.abs(rng.normal(size=2**(bits - 1) - 1))).astype(np.float32)
  bounds = np.concatenate([-upper[::-1], [0], upper]).astype(np.float32)
  values = np.sort(np.abs(rng.normal(size=2**(bits - 1)))).astype(np.float32)
  values = np.concatenate([-values[::-1], values])
  nans = np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0xFFC00001], np.uint32).view(np.float32)
  near = np.concatenate([np.nextafter(bounds, np.inf), np.nextafter(bounds, -np.inf)])
  u = np.concatenate([rng.normal(size=3000), bounds, near[np.abs(near) > 1e-30],
                      [0.0, -0.0, np.inf, -np.inf], nans]).astype(np.float32)
  count = (u[:, None] > bounds[None, :]).sum(1)
  as_scalars = lambda a: [jnp.float32(v) for v in a]
  np.testing.assert_array_equal(np.asarray(ek.search_odd(jnp.asarray(u), as_scalars(bounds))),
                                count)
  idx, got = ek.search_odd(jnp.asarray(u), as_scalars(bounds), as_scalars(values))
  np.testing.assert_array_equal(np.asarray(idx), count)
  np.testing.assert_array_equal(np.asarray(got), values[count])
  with pytest.raises(ValueError, match="b >= 2, got 1"):
    ek.search_odd(jnp.asarray(u), [jnp.float32(0)])
  with pytest.raises(ValueError, match=f"needs {2**bits} values .* got 3"):
    ek.search_odd(jnp.asarray(u), as_scalars(bounds), [jnp.float32(0)] * 3)


def test_encode_search_argument():
  # "auto" takes the odd search for Lloyd-Max tables and the binary one for the QJL sign;
  # all three give the reference's codes; "odd" refuses a table that is not symmetric.
  cfg = ENCODE_CONFIGS["split_prod"]
  quant = qz.Quantizer.create(cfg)
  assert ek._odd_segments(quant) == (True, False, True, False)
  x = jnp.asarray(np.random.default_rng(11).normal(size=(40, cfg.head_dim)), jnp.float32)
  ref = ek.encode(quant, x)
  for search in ("auto", "binary", "odd"):
    got = ek.encode(quant, x, implementation="pallas", interpret=True, block_n=16,
                    search=search)
    for a, b in zip(got.codes, ref.codes):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Under jit the quantizer's arrays are traced: the config's tables decide.
  seen = []
  jax.jit(lambda q: seen.append(ek._odd_segments(q)) or q.maps[0])(quant)
  assert seen == [(True, False, True, False)]
  skewed = dataclasses.replace(quant, boundaries=(quant.boundaries[0] + 1e-3,
                                                  *quant.boundaries[1:]))
  assert ek._odd_segments(skewed) == (False, False, True, False)
  with pytest.raises(ValueError, match='search="odd" needs odd-symmetric'):
    ek.encode(skewed, x, implementation="pallas", interpret=True, search="odd")
  with pytest.raises(ValueError, match='search must be "auto", "binary" or "odd", got'):
    ek.encode(quant, x, implementation="pallas", interpret=True, search="linear")


@pytest.mark.parametrize("name", list(ENCODE_CONFIGS))
def test_encode_float16x3_matches_quantizer(name):
  # Three float16 passes (each operand split into its float16 rounding and the rest's):
  # the float32 reference's codes on 300 tokens of a wide range, where one float16 pass
  # moves some (test below); scales as the reference's.
  cfg = ENCODE_CONFIGS[name]
  quant = qz.Quantizer.create(cfg)
  x = jnp.asarray(np.random.default_rng(12).normal(size=(300, cfg.head_dim)) * 50,
                  jnp.float16)
  ref = ek.encode(quant, x)
  got = ek.encode(quant, x, implementation="pallas", interpret=True, block_n=32,
                  precision="float16x3")
  for a, b in zip(got.codes, ref.codes):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(got.scales, ref.scales):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=3e-6 if a.dtype == jnp.float32 else 1e-3)


@pytest.mark.parametrize("name", ["mse4", "split_prod"])
def test_encode_float16_dots_move_only_near_ties(name):
  # precision="float16" rounds the unit vector and the maps to float16: a codebook code
  # may move to its neighbour where a coordinate lies near a boundary, rarely; a QJL sign
  # where the residual's projection is near 0.
  cfg = ENCODE_CONFIGS[name]
  quant = qz.Quantizer.create(cfg)
  x = jnp.asarray(np.random.default_rng(8).normal(size=(300, cfg.head_dim)) * 50, jnp.float16)
  ref = ek.encode(quant, x)
  got = ek.encode(quant, x, implementation="pallas", interpret=True, block_n=32, steps=2,
                  precision="float16")
  for seg, a, b, sa, sb in zip(cfg.segments, got.codes, ref.codes, got.scales, ref.scales):
    ca = np.asarray(packing.unpack(a, seg.dim, seg.bits), np.int32)
    cb = np.asarray(packing.unpack(b, seg.dim, seg.bits), np.int32)
    moved = np.mean(ca != cb)
    if seg.kind == "codebook":
      assert 0 < moved < 2e-3 and np.abs(ca - cb).max() == 1
      # The scale is the float32 norm (no norm correction): unchanged.
      np.testing.assert_allclose(np.asarray(sa), np.asarray(sb), rtol=1e-6)
    else:
      assert moved < 2e-2
      np.testing.assert_allclose(np.asarray(sa), np.asarray(sb), rtol=1e-2)


@pytest.mark.parametrize("name", list(ENCODE_CONFIGS))
def test_encode_lowers_to_triton_for_cuda(name):
  quant = qz.Quantizer.create(ENCODE_CONFIGS[name])
  x = jnp.zeros((40, 64), jnp.bfloat16)
  for kw in ({}, {"steps": 4, "precision": "float16"}, {"precision": "float16x3"}):
    text = _lowered(lambda x: ek.encode(quant, x, implementation="pallas", **kw), x)
    assert "__gpu$xla.gpu.triton" in text and "tq_encode" in text


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("lookup", [None, "lut-joined", "select", "lut-gather"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_decode_gpu_matches_reference(preset, lookup):
  args = make_case(8, preset, B=3, K=2, G=4, S=4099, lengths=[4099, 1000, 0])
  ref = dk.decode(*args, implementation="xla")
  got = jax.jit(lambda *a: dk.decode(*a[:3], args[3], *a[3:5], args[6], a[5],
                                     implementation="pallas", lookup=lookup))(
                                         *args[:3], args[4], args[5], args[7])
  assert_partials_close(got, ref, 4099)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("kw", [{}, {"steps": 3, "precision": "float16"},
                                {"precision": "highest"}])
@pytest.mark.parametrize("name", list(ENCODE_CONFIGS))
def test_encode_gpu_matches_quantizer(name, kw):
  cfg = ENCODE_CONFIGS[name]
  quant = qz.Quantizer.create(cfg)
  x = jax.random.normal(jax.random.key(9), (5003, 64), jnp.float32) * 3
  # The kernel's dots are float32-accurate (but "float16"); XLA's default on GPU is TF32,
  # which moved 0.1% (QJL signs: 0.5%) of the codes on the H200.
  with jax.default_matmul_precision("float32"):
    ref = jax.jit(lambda x: ek.encode(quant, x))(x)
  got = jax.jit(lambda x: ek.encode(quant, x, implementation="pallas", **kw))(x)
  for seg, a, b in zip(cfg.segments, got.codes, ref.codes):
    # Same math in float32 with another summation order: allow rare boundary ties; with
    # float16 operands nearer ties move (see test_encode_float16_dots_move_only_near_ties).
    ca = np.asarray(packing.unpack(a, seg.dim, seg.bits), np.int32)
    cb = np.asarray(packing.unpack(b, seg.dim, seg.bits), np.int32)
    limit = (1e-3 if kw.get("precision") != "float16" else 2e-3 if seg.kind == "codebook"
             else 2e-2)
    assert np.mean(ca != cb) < limit
    if seg.kind == "codebook":
      assert np.abs(ca - cb).max() <= 1


def test_tuned_block_sizes_lookup(monkeypatch):
  # The tiling table: exact key, then (device, "*", key bits, value bits), then the
  # device's wildcard, then DEFAULT (another device).
  from pallas_kernels import tuned_block_sizes as tbs
  cfg = lambda kb, vb: tbs.decode_config(batch=8, kv_heads=8, seq_len=65536, head_dim=128,
                                         key_bits=kb, value_bits=vb)
  assert cfg((4,), (4,)) == tbs.DEFAULT  # this machine is no H200
  tilings = dm.LOOKUPS + ("smem3", "smem64", "smem64x16")
  assert [tbs.mosaic_decode_config(lk) for lk in tilings] == [
      tbs.MOSAIC_DEFAULT[lk] for lk in tilings]
  monkeypatch.setattr(tbs, "_device_kind", lambda: "NVIDIA H200")
  # The Mosaic kernel's programs by lookup: 2.67 waves of 3 programs an SM, 1 of 2, for
  # the 3-bit kernel 1 of 3, and for the 4-bit one at 64 coordinates 1 of 2 in 256-token
  # steps, with 16 query rows 2 of 2 in 128-token steps (no H200 entry: the default).
  assert [(tbs.mosaic_decode_config(lk).target_programs, tbs.mosaic_decode_config(lk).step)
          for lk in tilings] == [(1056, 128), (264, 128), (396, 128), (264, 256), (512, 128)]
  assert cfg((4,), (4,)) == tbs.DECODE[("NVIDIA H200", "*", (4,), (4,))]
  assert cfg([4], [4]) == tbs.DECODE[("NVIDIA H200", "*", (4,), (4,))]  # lists as tuples
  assert cfg((3,), (3,)) == tbs.DECODE[("NVIDIA H200", "*", "*", "*")]
  exact = tbs.DecodeConfig(block_s=16, num_warps=2, num_stages=4, target_programs=7)
  monkeypatch.setitem(tbs.DECODE, ("NVIDIA H200", 128, (3,), (3,)), exact)
  assert cfg((3,), (3,)) == exact


def test_decode_profile_breaks_a_call_into_programs(tmp_path, capsys):
  # bench/decode_profile.py on the XLA CPU backend: the traced programs of one call, and a
  # combination that cannot run here listed as skipped with its reason, not dropped.
  from bench import decode_profile
  decode_profile.main(["--dims", "64", "--presets", "k4v4", "--implementations",
                       "xla,mosaic", "--seq", "256", "--calls", "2", "--planes", "/host:CPU",
                       "--out", str(tmp_path)])
  with open(tmp_path / "decode_profile.json") as f:
    xla, mosaic = json.load(f)["rows"]
  assert xla["us"] > 0 and xla["implementation"] == "xla"
  events = [e for t in xla["timelines"] for e in t["events"]]
  assert any("fusion" in name and us > 0 for name, us, _ in events)
  assert mosaic["implementation"] == "mosaic" and "interpret" in mosaic["skipped"]
  assert "D=64 k4v4 mosaic B=1 S=256: skipped" in capsys.readouterr().out
