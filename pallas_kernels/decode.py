"""Fused dequantize + attention decode over a TurboQuant-compressed KV region.

A compressed key or value is a sum of *segments* (see ``tqjax.quantizer``): segment i
has a d_i x D map A_i, a codebook c_i of 2**b_i centroids, packed codes (``tqjax.packing``
layout) and one scale n_i per token. With the projected query ``qk_i = A_i q`` (already
multiplied by the softmax scale and any key transform) the logit of token s is

    score[s] = sum_i n_i[s] * <qk_i, c_i[codes_i[s]]>,

and the value side accumulates, per value segment j, in the rotated domain

    acc_j = sum_s p[s] * n_j[s] * c_j[codes_j[s]],   p = exp(score - m).

The kernel reads codes and scales only; it returns the flash-decoding partials
``(m, l, acc_j)`` over the compressed region. The caller merges them with the exact
window (:func:`merge_partials`) and rotates the output back (``out = sum_j acc_j @ A_j / l``).

Design:

* Triton-lowered Pallas (``plgpu.CompilerParams``) for every preset; for k4v4 and k3v3
  also a Mosaic GPU kernel (``implementation="mosaic"``,
  :mod:`pallas_kernels.decode_mosaic`), chosen by measurement (session 9, below): 1.44x
  faster than this kernel at B = 8, S = 64K (session 10: 297 against 388 us at B = 8, 51
  against 59 us at B = 1; in the model 1.31x against 1.20x the bf16 step at Qwen2.5-7B
  shapes, B = 8, 32K; session 15, its shared-memory table lookup, H100: 206-212 against
  564-578 us here at B = 8, 64K; session 17, k3v3 on the H100: 250.5 against 599.0 us). It
  stays opt-in: it takes two presets, on sm_90 only, and this kernel covers every preset
  and shape.
  The Triton lowering gives masked loads, ``join``-based interleaving, integer ops on any
  tile shape, gathers from refs and an ``interpret`` mode that runs the same kernel body
  on CPU, so every configuration is tested here; Mosaic GPU's interpreter runs neither
  register-operand wgmma nor ``inline_mgpu``, so that kernel's asm and register layouts
  are checked on CPU by a PTX emulation and its numerics on the GPU only.
* One program per (batch row, KV head, split of S): all G query heads of the KV head
  (or the T*G query rows of a chunk) are rows of one small matrix, so each code is read
  from memory once. Query rows are padded to 16 for the tensor-core ``dot``.
* Codes are unpacked in registers with shifts and masks and interleaved back into
  coordinate order with ``join`` + ``reshape``, so each segment is one dot of depth d_i.
  A segment whose dim is not a power of two (96 in the 32 + 96 outlier split) is padded
  in-kernel to the next power of two with masked loads and zero query columns.
* The lookup: 2- to 5-bit segments whose rows are a power-of-two number of 32-bit
  words (``lookup="lut"``, the default for concrete centroids; see `lut_eligible`: 64 and
  128 coordinates) are looked up 4 codes at a time by PTX byte permutes (``prmt``) on
  float16 tables held in registers, through multi-output inline asm blocks
  (:mod:`pallas_kernels.inline_asm`); see ``_LUT_WORD`` (4 bits, sign trick on a
  symmetric codebook) and ``_lut_low_asm`` (2 and 3 bits, whole codebook, the 3-bit code's
  high bit moved into the selectors from the 1-bit plane read as 16-bit halves). The
  cache's packing layout is read as it is. 4-bit segments take the "nibbles" layout
  (`_lut_nibble_asm`): 4 bytes of a row per asm block (``pack = 4`` on uint8), the low
  nibbles' values as one result and the high nibbles' as another, so the tile arrives as
  two [tokens, d / 2] operands that meet the query's even and odd coordinates in two dots:
  no interleave, and every element depends on its own byte only, so the block stays
  correct under whatever register layout Triton propagates back from the dot (a first
  version that returned each word's codes in coordinate order was wrong on the GPU for
  exactly that reason). 5-bit segments take the same layout with their high bits as a
  second argument (`_LUT5_WORD`, `_high_bits`). 2- and 3-bit words return 16 float16
  parts that are interleaved back into coordinate order (one dot per segment, "joined";
  letting 8 parts meet a permuted query, 8 dots of depth d / 8, was 1.8x slower at 4
  bits). Other segments use a select tree on centroids baked in as constants
  (``"select"``) or a gather from the table in memory (``"gather"``, traced centroids).
* Split-K over S (flash decoding): the splits' partials are combined outside the kernel
  (as :func:`merge_partials` does; a few KB). The kernel writes only the G real query
  rows of its accumulators, and the splits are merged before a "parts" layout is put
  back into coordinate order (so only the merged result is permuted).

Measured on the H200 (``bench/kernels.py --sweep --quick``, B = 8, Hq = 32, Hkv = 8,
D = 128, S = 64K; the fastest fp16 decode in the same run 478 us, torch cuDNN):

* session 1, select tree: 4-bit 1369 us (0.35x of fp16), 3-bit 969 us, 2-bit 540 us;
* session 2, byte-permute lookup, parts interleaved back: 4-bit 510 us (0.94x of fp16,
  1.09 TB/s of compressed bytes) at 64 tokens per tile, 4 warps, 2 stages, query rows as
  the dot's M; the parts meeting a permuted query instead: 913 us at the best tiling.
* session 3: 2- and 3-bit segments moved from the select tree to the byte-permute lookup
  (1.4 and 1.7 PTX integer instructions per coordinate, against ~10 and ~17).
* session 4 (GPU-checked): the 2- and 3-bit lookups 3-bit 996 -> 481 us, 2-bit 538 ->
  444 us, k3.5v3.5 1223 -> 526 us (B = 8; B = 1: 137 -> 61 us at 3 bits); the 4-bit
  "nibbles" layout 514 -> 481 us at the old tiling; one warp and 32 tokens per program
  for every width (`tuned_block_sizes`). ``bench/kernels.py --quick`` in one run, fastest
  fp16 477 us (jax cuDNN): k4v4 391 us (1.22x), k3v3 444 (1.08x), k2v2 417 (1.15x); B = 1
  (fp16 59 us): 60, 72, 58 us. An int8 variant (keys looked up as int8 on a half-integer
  grid, 1.6 instructions per coordinate, the query split into two int8 parts for 14-bit
  precision, int8 dots) was no faster (523 us; 410 us with a plain int8 query, too coarse
  for a tight reference).
* session 7: 5-bit keys by byte permutes in the "nibbles" layout (`_LUT5_WORD`; before,
  a select tree over the two bit planes interleaved into coordinate order): k5v3 1677 ->
  568 us at B = 8, 236 -> 85 us at B = 1; 537-549 us and 73-78 us with 3 stages
  (`tuned_block_sizes`), against fp16 baselines of 455-483 and 60-61 us.
* The floor of this Triton structure is the limit now, not the lookup or the bytes: 2-,
  3- and 4-bit codes take about the same time (395-445 us at B = 8) although 2 bits read
  half the bytes of 4, and with the lookup skipped entirely (codes cast to float16, wrong
  values, a timing diagnostic) the old structure took 459-530 us. Per tile of 32 tokens a
  program still pays 16-row MMAs and a 16-row softmax for 4-7 real query rows, and the
  dequantized operands go through shared memory (a tile is 4x the bytes of its codes).
  Beating the fp16 cache by the byte ratio (3.9x at 4 bits) needs the dequantized
  operands produced directly in the tensor cores' register layout and several KV heads'
  tiles per program: a CUDA or Mosaic GPU kernel, not a Triton-lowered one (see issue 4).
  jax 0.11 also warns that the Pallas Triton backend is deprecated in favour of Mosaic GPU.
* session 8, Nsight Compute on k4v4 at B = 8, S = 64K (``ncu --set full`` over
  ``bench/ncu_decode.py``, clocks locked at 1.32 GHz): 250 registers per thread, so 8
  one-warp programs per SM (12.5% occupancy, 1024 programs: 0.97 waves); issue slots 64%
  busy, the integer ALU pipe 62% (~110M of 232M warp instructions; the FMA pipe 25%,
  tensor cores 5%), DRAM 22%; shared loads of the pipelined codes with 4-way bank
  conflicts. The registers are about what a tile holds: acc 64, the query 32, the key and
  value tiles 64 each ([32, 128] float16 per warp), the logits 16. So the lookup is most
  of the work after all: 22 PTX integer instructions per 8 codes on a pipe of 64 lanes per
  clock per SM is ~150-180 us of the H200's ALU time for the 1.07G codes of that shape,
  which is already the 3.3x target (145 us); the target needs lookups off the integer pipe
  (fewer instructions per code, or the tensor cores), not only a better tiling. Looking
  tiles up and meeting the query in 2 or 4 column chunks (so fewer looked-up values are
  live) left 234 registers and was slower (k4v4 391 -> 398 / 446 us; branch
  ``wip/chunks``).
* session 9: register-pressure variants (the value lookup after the softmax; lazy
  rescaling) and a cheaper 4-bit lookup (sign-magnitude, 18 instead of 22 instructions)
  moved this kernel by -4% to +7% (``ncu``: 224-254 registers, still 11% occupancy; the
  grid, 1024 one-warp programs, caps it too). SASS: per 32-token tile 1768 instructions
  per thread (6.9 per code): PRMT 26%, IMAD 22% (register moves and the tables'
  re-materialization), LOP3 11%, and byte loads + PRMTs that assemble each lookup word
  from 4 tokens (Triton's layout conversion). The Mosaic GPU kernel (same run,
  ``bench/kernels.py --quick --presets k4v4``, fastest fp16 481 us, torch cuDNN): 279 us
  at B = 8 (1.72x) against 401 us (1.20x) here; B = 1 (fastest fp16 68 us): 52 against
  46 us. Its profile (the prototype): 94-112 registers, 4 warpgroups per SM, ~165M warp
  instructions, the integer pipe ~69% busy: the lookup is its limit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from tqjax import packing
from pallas_kernels import decode_mosaic, inline_asm, tuned_block_sizes

Array = jax.Array

# Query rows are padded to this for the tensor-core dot (mma m16n8k16).
_MIN_ROWS = 16
# Smallest dot depth that the Triton tensor-core dot accepts.
_MIN_DEPTH = 16


class Partial(NamedTuple):
  """Flash-decoding partial result over a set of tokens.

  m: [..., G] float32 row max of the logits (-inf where no token was valid).
  l: [..., G] float32 sum of exp(logit - m).
  acc: per value segment j, [..., G, d_j] float32, sum of exp(logit - m) * value_j.
  """
  m: Array
  l: Array
  acc: tuple[Array, ...]


@dataclasses.dataclass(frozen=True)
class SegmentLayout:
  """Static layout of one segment's packed codes (derived from dim and bits)."""
  dim: int
  bits: int

  def __post_init__(self):
    packing.check_bits(self.bits)
    if self.dim < 8 or self.dim % 8:
      raise ValueError(f"segment dim must be a positive multiple of 8, got {self.dim}")

  @property
  def packed(self) -> int:
    return packing.packed_size(self.dim, self.bits)

  @property
  def padded_dim(self) -> int:
    """Coordinates the kernel computes on: a power of two >= 16."""
    return max(_MIN_DEPTH, pl.next_power_of_2(self.dim))

  def planes(self) -> list[tuple[int, int, int, int]]:
    """(shift, width, byte offset, bytes) of each bit plane."""
    out, offset = [], 0
    for shift, width in packing.planes(self.bits):
      size = packing.plane_bytes(self.dim, width)
      out.append((shift, width, offset, size))
      offset += size
    return out


# ----------------------------------------------------------------------------------------
# Kernel body.


def _interleave(parts: list[Array]) -> Array:
  """[[S, n]] * p (p a power of two) -> [S, n * p] with out[:, j * p + t] = parts[t][:, j]."""
  if len(parts) == 1:
    return parts[0]
  evens = _interleave(parts[0::2])
  odds = _interleave(parts[1::2])
  rows, cols = evens.shape
  return jnp.stack([evens, odds], axis=-1).reshape(rows, 2 * cols)


def _load_codes(codes_ref, rows: slice | Any, seg: SegmentLayout, row_mask) -> Array:
  """Unpacks one segment's codes of a tile of tokens.

  Args:
    codes_ref: [S, P] uint8 ref (P = packed bytes of the segment).
    rows: the token slice of the tile (``pl.ds``).
    seg: the segment layout.
    row_mask: [block_s] bool or None, rows that may be read.

  Returns:
    [block_s, padded_dim] int32 codes in coordinate order (padding columns hold 0).
  """
  codes = None
  for shift, width, offset, size in seg.planes():
    per_byte = 8 // width
    padded_bytes = seg.padded_dim // per_byte
    col_mask = None
    if padded_bytes != size:
      col_mask = jnp.arange(padded_bytes) < size
    mask = None
    if row_mask is not None and col_mask is not None:
      mask = row_mask[:, None] & col_mask[None, :]
    elif row_mask is not None:
      mask = jnp.broadcast_to(row_mask[:, None], (row_mask.shape[0], padded_bytes))
    elif col_mask is not None:
      mask = col_mask[None, :]
    ref = codes_ref.at[rows, pl.ds(offset, padded_bytes)]
    if mask is None:
      plane = ref[...]
    else:
      plane = plgpu.load(ref, mask=mask, other=0)
    plane = plane.astype(jnp.int32)  # [block_s, padded_bytes]
    low = (1 << width) - 1
    parts = [(plane >> (t * width)) & low for t in range(per_byte)]
    plane_codes = _interleave(parts)  # [block_s, padded_dim]
    if shift:
      plane_codes = plane_codes << shift
    codes = plane_codes if codes is None else codes | plane_codes
  return codes


def _lookup(codes: Array, centroids: tuple[float, ...] | None, cb_ref, bits: int,
            dtype) -> Array:
  """c[codes] as ``dtype``: a select tree on constants, or a gather from ``cb_ref``."""
  if cb_ref is None:  # timing diagnostic: skip the lookup (values are the codes)
    return codes.astype(dtype)
  if centroids is None:
    return cb_ref[codes].astype(dtype)
  return _select_tree(codes, centroids, dtype)


def _select_tree(codes: Array, centroids: tuple[float, ...], dtype) -> Array:
  """c[codes] as ``dtype`` by selects on the code's bits, the centroids as constants."""
  values = [jnp.asarray(c, dtype) for c in centroids]
  level = 0
  while len(values) > 1:
    bit = ((codes >> level) & 1) == 1
    values = [jnp.where(bit, hi, lo) for lo, hi in zip(values[0::2], values[1::2])]
    level += 1
  return jnp.broadcast_to(values[0], codes.shape)


# The "lut" lookup: codes are looked up several at a time by PTX byte permutes (PRMT) on
# float16 tables held in registers. `prmt.b32 d, a, b, s` builds each byte i of d from the
# byte of the 8-byte pool {b, a} that nibble i of s names (bit 3 of the nibble must be clear),
# so a pool of the low bytes of 8 (or 4) float16 centroids and one of their high bytes turn 4
# nibble-sized codes into their float16 bytes; two more permutes pair low and high bytes up.
# The asm blocks take two 32-bit words of codes at a time (`pack = 2`) and return float16
# pairs (that code of the first word, the same code of the second word): part t of a word
# is its code t, and the kernel interleaves the parts back into coordinate order.
#
# 4 bits: a packed row is read as 32-bit words of 8 codes (word w holds coordinates
# 8w .. 8w + 7, code t in bits 4t .. 4t + 3). The codebook is symmetric (c[15 - k] = -c[k]),
# so a code is a sign (bit 3 clear: negative) and a 3-bit index into the 8 positive centroids
# M. Their float16 bit patterns sit in four registers (low bytes of M[0..3], M[4..7]; high
# bytes of the same), and one PRMT looks up 4 codes at once; the sign goes into the high
# bytes, two more permutes interleave low and high bytes into float16 pairs and a last one
# pairs the two words up. 52 PTX integer instructions per 16 codes (3.25 per coordinate), no
# int -> float conversion, against ~30 per coordinate for a select tree (unpacking, 4 levels
# of bit tests and 15 selects).
_LUT_CODES = 8  # 4-bit codes per 32-bit word

_LUT_WORD = """
  not.b32 n{w}, {x};
  and.b32 n{w}, n{w}, 0x88888888;
  shr.u32 f{w}, n{w}, 3;
  mul.lo.u32 f{w}, f{w}, 7;
  xor.b32 j{w}, {x}, f{w};
  and.b32 j{w}, j{w}, 0x77777777;
  shr.u32 f{w}, j{w}, 16;
  prmt.b32 l0{w}, tl0, tl1, j{w};
  prmt.b32 h0{w}, th0, th1, j{w};
  prmt.b32 l1{w}, tl0, tl1, f{w};
  prmt.b32 h1{w}, th0, th1, f{w};
  shl.b32 f{w}, n{w}, 4;
  prmt.b32 j{w}, n{w}, f{w}, 0x1504;
  and.b32 j{w}, j{w}, 0x80808080;
  or.b32 h0{w}, h0{w}, j{w};
  prmt.b32 j{w}, n{w}, f{w}, 0x3726;
  and.b32 j{w}, j{w}, 0x80808080;
  or.b32 h1{w}, h1{w}, j{w};
  prmt.b32 p0{w}, l0{w}, h0{w}, 0x5140;
  prmt.b32 p1{w}, l0{w}, h0{w}, 0x7362;
  prmt.b32 p2{w}, l1{w}, h1{w}, 0x5140;
  prmt.b32 p3{w}, l1{w}, h1{w}, 0x7362;
"""


def _lut_asm(tables: tuple[int, int, int, int]) -> str:
  """PTX for two words ($8, $9) -> 8 float16 pairs ($0 .. $7): $t = (code t of word
  $8, code t of word $9), as `elementwise_inline_asm` with pack = 2 expects."""
  regs = ", ".join(f"{r}{w}" for w in "ab" for r in ("n", "f", "j", "l0", "h0", "l1", "h1",
                                                       "p0", "p1", "p2", "p3"))
  body = [f".reg .b32 tl0, tl1, th0, th1, {regs};"]
  body += [f"mov.b32 {name}, {value:#010x};"
           for name, value in zip(("tl0", "tl1", "th0", "th1"), tables)]
  body += [_LUT_WORD.format(w="a", x="$8"), _LUT_WORD.format(w="b", x="$9")]
  for t in range(_LUT_CODES):
    select = "0x5410" if t % 2 == 0 else "0x7632"  # low or high halves of both words
    body.append(f"prmt.b32 ${t}, p{t // 2}a, p{t // 2}b, {select};")
  return "{\n" + "\n".join(body) + "\n}"


def _lut_nibble_asm(tables: tuple[int, int, int, int]) -> str:
  """PTX for 4 bytes of a packed row ($4, `pack = 4` on uint8) -> the float16 values of their
  low nibbles ($0, $1: 4 elements of the first result) and of their high nibbles ($2, $3:
  of the second). Element k of each result depends on byte k alone, so the block is
  elementwise whichever 4 elements Triton's layout hands it (the "nibbles" layout)."""
  regs = ", ".join(f"{r}a" for r in ("n", "f", "j", "l0", "h0", "l1", "h1"))
  body = [f".reg .b32 tl0, tl1, th0, th1, {regs};"]
  body += [f"mov.b32 {name}, {value:#010x};"
           for name, value in zip(("tl0", "tl1", "th0", "th1"), tables)]
  word = _LUT_WORD.format(w="a", x="$4").splitlines()
  word = [line for line in word if not line.strip().startswith("prmt.b32 p")]
  # l0/h0: low/high bytes of codes 0 .. 3 (bytes 0, 1), l1/h1 of codes 4 .. 7 (bytes 2, 3).
  word += ["prmt.b32 $0, l0a, h0a, 0x6240;", "prmt.b32 $1, l1a, h1a, 0x6240;",  # codes 0 2 4 6
           "prmt.b32 $2, l0a, h0a, 0x7351;", "prmt.b32 $3, l1a, h1a, 0x7351;"]  # codes 1 3 5 7
  return "{\n" + "\n".join(body + word) + "\n}"


# 5 bits ("nibbles" layout only): the 4-bit low plane's bytes as at 4 bits, and per byte its
# two codes' high bits (the 1-bit plane, spread by the kernel to bits 0 and 1 of a byte per
# element, `_high_bits`) as a second argument, so every element still depends on its own
# bytes alone. A symmetric codebook of 32 has c[k] = T[k - 16] for k >= 16 and -T[15 - k]
# below, T = the 16 positive centroids: the high bit is the sign, and m = low ^ (h ? 0 : 15)
# indexes T. T's float16 bytes fill two 8-byte pools per byte (T[0..7], T[8..15]); both are
# looked up with m's low 3 bits and a third permute keeps, per code, the pool that m's bit 3
# names. 35 PTX integer instructions per 8 codes (4.4 per coordinate) against the 4-bit
# block's 22.
_LUT5_WORD = """
  and.b32 n, $5, 0x03030303;
  mul.lo.u32 n, n, 72;
  and.b32 n, n, 0x88888888;
  xor.b32 n, n, 0x88888888;
  shr.u32 f, n, 3;
  mul.lo.u32 f, f, 15;
  xor.b32 m, $4, f;
  and.b32 s, m, 0x77777777;
  shr.u32 f, m, 1;
  lop3.b32 w, f, 0x44444444, 0x32103210, 0xea;
{half0}
  shr.u32 s, s, 16;
  shr.u32 w, w, 16;
{half1}
  shl.b32 f, n, 4;
  prmt.b32 s, n, f, 0x1504;
  and.b32 s, s, 0x80808080;
  or.b32 h0, h0, s;
  prmt.b32 s, n, f, 0x3726;
  and.b32 s, s, 0x80808080;
  or.b32 h1, h1, s;
  prmt.b32 $0, l0, h0, 0x6240;
  prmt.b32 $1, l1, h1, 0x6240;
  prmt.b32 $2, l0, h0, 0x7351;
  prmt.b32 $3, l1, h1, 0x7351;
"""


# Codes 0-3 (half 0, selectors in the low 16 bits of s and w) or 4-7 (half 1): their
# float16 low bytes (l) and high bytes (h), each looked up in both pools and merged by w.
_LUT5_HALF = """
  prmt.b32 la, ta0, ta1, s;
  prmt.b32 lb, tb0, tb1, s;
  prmt.b32 l{t}, la, lb, w;
  prmt.b32 la, tc0, tc1, s;
  prmt.b32 lb, td0, td1, s;
  prmt.b32 h{t}, la, lb, w;"""


def _lut_nibble5_asm(tables: tuple[int, ...]) -> str:
  """PTX for 4 bytes of the low plane ($4) and their codes' high bits ($5: bit 0 of byte k
  for its low nibble's code, bit 1 for the high nibble's), `pack = 4` on uint8 -> the float16
  values of the low nibbles' codes ($0, $1) and of the high nibbles' ($2, $3), as
  `_lut_nibble_asm`. `tables`: `_lut_full_tables` of the 16 positive centroids."""
  names = ("ta0", "ta1", "tb0", "tb1", "tc0", "tc1", "td0", "td1")
  body = [f".reg .b32 {', '.join(names)}, n, f, m, s, w, la, lb, l0, h0, l1, h1;"]
  body += [f"mov.b32 {name}, {value:#010x};" for name, value in zip(names, tables)]
  word = _LUT5_WORD.format(half0=_LUT5_HALF.format(t=0), half1=_LUT5_HALF.format(t=1))
  return "{\n" + "\n".join(body) + word + "}"


# 2 and 3 bits: 16 codes per 32-bit word of the low (2-bit) plane (word w holds coordinates
# 16w .. 16w + 15, code t in bits 2t, 2t + 1); at 3 bits the 1-bit plane read as 16-bit
# halves has the same shape (half w: bit t = bit 2 of code t of word w), and `pack = 2`
# hands the two words' halves over as one register H (the first word's in bits 0 .. 15).
# No sign trick: the pools hold the whole codebook, so any codebook works (3 bits: low bytes
# of c[0..7] in two registers, high bytes in two more; 2 bits: 4 bytes each, as the
# immediate b operand, picked by selector nibbles 4 .. 7, so no register holds a table).
# Per pair of words (a, b):
#   P = prmt(a, b, 0x5140): bytes (a.0, b.0, a.1, b.1); Q = prmt(a, b, 0x7362): bytes 2, 3.
#   Byte k of P holds 4 codes of one word in 2-bit fields f0..f3, so P & 0x33333333 has
#   nibbles (f0, f2) in every byte: the selector of codes 0, 2 of both words (low 16 bits:
#   a0 a2 b0 b2) and of codes 4, 6 (high 16 bits); (P >> 2) & 0x33333333 those of codes 1,
#   3, 5, 7 (2 bits: | 0x44444444 in the same lop3). Per selector: a low-byte and a
#   high-byte lookup, then prmt 0x6240 / 0x7351 pair them up into (code i of a, code i of
#   b) and (code i + 2 of a, of b); shift by 16 and repeat.
#   3 bits: bit 2 of every selector nibble is the code's high bit. With G = H >> 4,
#   HP = prmt(H, G, 0x6420) has the high bits of P's byte k in the low nibble of its byte k
#   (bit f for field f; Q: 0x7531). (HP & 0x05050505) * 20 moves bits 0 and 2 of every byte
#   to bits 2 and 6 (the carry of the two terms at bit 4 stops in bit 5: never bits 3 or 7,
#   nor the next byte), and one lop3 "(P & 0x33333333) | (t & ~0x33333333)" merges them;
#   odd fields: (HP & 0x0a0a0a0a) * 10 and P >> 2.
# Per 32 codes: 44 PTX integer instructions at 2 bits (1.375 per coordinate; 34 of them
# PRMT), 55 at 3 bits (1.72; 36 PRMT, 4 IMAD), against ~10 and ~17 per coordinate for the
# select tree (unpacking each plane, bit tests, 3 or 7 selects). ptxas 12.9 for sm_90 keeps
# these counts (SASS), plus ~13 register copies of the 3-bit tables per block (IMAD.MOV,
# on the FMA pipe); the 4-bit block: 52 PTX, 40 ALU + 12 IMAD in SASS per 16 codes.
_LUT_LOW_CODES = 16  # 2- and 3-bit codes per 32-bit word of the low plane


def _lut_low_asm(bits: int, tables: tuple[int, ...]) -> str:
  """PTX for two words of the low plane ($16, $17; at 3 bits also their high bits as two
  16-bit halves of $18) -> 16 float16 pairs ($0 .. $15): $t = (code t of word $16, code t
  of word $17). `tables`: `_lut_full_tables` of the 2**bits centroids."""
  if bits not in (2, 3):
    raise ValueError(f"the low-bit lut takes 2 or 3 bits, got {bits=}")
  if bits == 2:  # 4 entries: the table is the immediate b operand, picked by nibbles 4 .. 7
    pool_l, pool_h = ("0", f"{tables[0]:#010x}"), ("0", f"{tables[1]:#010x}")
    names = ()
  else:
    pool_l, pool_h = ("tl0", "tl1"), ("th0", "th1")
    names = pool_l + pool_h
  body = [f".reg .b32 {''.join(n + ', ' for n in names)}p, q, g, hp, hq, t, s, l, h;"]
  body += [f"mov.b32 {n}, {v:#010x};" for n, v in zip(names, tables)]
  body += ["prmt.b32 p, $16, $17, 0x5140;", "prmt.b32 q, $16, $17, 0x7362;"]
  if bits == 3:
    body += ["shr.u32 g, $18, 4;", "prmt.b32 hp, $18, g, 0x6420;",
             "prmt.b32 hq, $18, g, 0x7531;"]
  for base, x, hx in ((0, "p", "hp"), (8, "q", "hq")):
    for odd in (0, 1):
      if odd:
        body.append(f"shr.u32 s, {x}, 2;")
      src = "s" if odd else x
      if bits == 2:  # (codes & 3) | 4: lop3 "(a & b) | c"
        body.append(f"lop3.b32 s, {src}, 0x33333333, 0x44444444, 0xea;")
      else:
        mask, factor = ("0x0a0a0a0a", 10) if odd else ("0x05050505", 20)
        body += [f"and.b32 t, {hx}, {mask};", f"mul.lo.u32 t, t, {factor};",
                 f"lop3.b32 s, {src}, t, 0x33333333, 0xe4;"]
      for half in (0, 1):
        if half:
          body.append("shr.u32 s, s, 16;")
        first = base + odd + 4 * half
        body += [f"prmt.b32 l, {pool_l[0]}, {pool_l[1]}, s;",
                 f"prmt.b32 h, {pool_h[0]}, {pool_h[1]}, s;",
                 f"prmt.b32 ${first}, l, h, 0x6240;",
                 f"prmt.b32 ${first + 2}, l, h, 0x7351;"]
  return "{\n" + "\n".join(body) + "\n}"


def lut_eligible(seg: SegmentLayout, centroids: tuple[float, ...] | None, *,
                 layout: str = "joined", block_s: int | None = None,
                 num_warps: int | None = None) -> bool:
  """Whether a segment can take the "lut" lookup in `layout` (see `_LAYOUT_PARTS`).

  Needs concrete centroids and 2 to 5 bits with a row of W words, W a power of two:
  4 and 5 bits: W = dim / 8 (of the 4-bit plane), a symmetric codebook (the sign trick);
  2 and 3 bits: W = dim / 16 (3 bits: dim a multiple of 32, so the row is whole 32-bit
  words), any codebook. The "parts" layout takes 4 bits only and needs W >= 16 (one dot of
  depth W per part); "nibbles" takes 4 and 5 bits (5 bits only "nibbles") and needs 4 W >= 16
  (two dots of depth 4 W). With the tile given:
  every thread needs the whole words its asm block packs (Triton refuses an asm block
  with fewer elements per thread than it packs): two words ("joined", "parts": pack = 2,
  block_s * W >= 64 * num_warps) or the 4 bytes of one ("nibbles": pack = 4 on uint8,
  block_s * 4 W >= 128 * num_warps).
  """
  if layout not in _LAYOUT_PARTS:
    raise ValueError(f"layout must be one of {sorted(_LAYOUT_PARTS)}, got {layout!r}")
  if centroids is None or seg.bits not in (2, 3, 4, 5) or seg.dim < _MIN_DEPTH:
    return False
  if seg.bits == 5 and layout != "nibbles":
    return False
  per_word = _LUT_CODES if seg.bits >= 4 else _LUT_LOW_CODES
  if seg.dim % per_word or (seg.bits == 3 and seg.dim % 32):
    return False
  words = seg.dim // per_word
  if words & (words - 1):
    return False
  if layout != "joined" and (seg.bits < 4 or seg.dim // _LAYOUT_PARTS[layout] < _MIN_DEPTH):
    return False
  if block_s is not None and num_warps is not None:
    elements, per_thread = (4 * words, 4) if layout == "nibbles" else (words, 2)
    if block_s * elements < per_thread * 32 * num_warps:
      return False
  return seg.bits < 4 or symmetric_codebook(centroids)


def symmetric_codebook(centroids: Sequence[float]) -> bool:
  """Whether sorted centroids are symmetric about 0 (c[k] = -c[-1 - k]; the sign trick of
  the 4- and 5-bit lookups)."""
  c = np.asarray(centroids, np.float64)
  return bool(np.all(np.abs(c + c[::-1]) <= 1e-6 * np.abs(c).max()))


def lut_layout(seg: SegmentLayout, centroids: tuple[float, ...] | None, lookup: str, *,
               block_s: int, num_warps: int) -> str | None:
  """The layout (`_LAYOUT_PARTS`) a segment's values take under `lookup`, None if no lut.

  "lut" looks 4-bit segments up as low and high nibbles that meet a permuted query
  ("nibbles", else "joined" where only that fits); "lut-joined" interleaves a word's parts
  back into coordinate order (one dot per segment; 1.1-1.2x slower on the H200),
  "lut-parts" splits them into 8 parts (1.8x slower). 2- and 3-bit segments take "joined"
  under every lut lookup, 5-bit segments "nibbles".
  """
  if not lookup.startswith("lut"):
    return None
  layouts = ["joined"]
  if seg.bits == 5:
    layouts = ["nibbles"]
  elif seg.bits == 4 and lookup != "lut-joined":
    layouts = ["parts"] if lookup == "lut-parts" else ["nibbles", "joined"]
  for layout in layouts:
    if lut_eligible(seg, centroids, layout=layout, block_s=block_s, num_warps=num_warps):
      return layout
  return None


def _lut_tables(centroids: tuple[float, ...]) -> tuple[int, int, int, int]:
  """The float16 bytes of the 8 positive centroids, packed 4 to a 32-bit word."""
  return _lut_full_tables(centroids[8:])


def _lut_full_tables(centroids: Sequence[float]) -> tuple[int, ...]:
  """The float16 bytes of `centroids` (4 or 8), packed 4 to a 32-bit word: the low bytes'
  words, then the high bytes'."""
  bits = np.asarray(centroids, np.float16).view(np.uint16).astype(np.uint32)
  word = lambda b: int(b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24)
  lo, hi = bits & 0xFF, bits >> 8
  return tuple(word(x[i:i + 4]) for x in (lo, hi) for i in range(0, len(bits), 4))


def _lut_parts(bits: int, words: Array, high: Array | None, centroids: tuple[float, ...],
               interpret: bool) -> list[Array]:
  """Codes -> their centroids as float16, part t = code t of every word.

  Args:
    bits: 2, 3 or 4.
    words: [block_s, W] uint32, the (low-plane) words of the codes.
    high: 3 bits: [block_s, W] uint16, the high bits (half w: bit t = code t of word w);
      else None.
    centroids: the codebook (2**bits values).
    interpret: the same function in plain jnp (no PTX off the GPU).

  Returns:
    per_word x [block_s, W] float16 (per_word = 8 at 4 bits, else 16).
  """
  per_word = _LUT_CODES if bits == 4 else _LUT_LOW_CODES
  width = 4 if bits == 4 else 2
  if interpret:
    parts = []
    for t in range(per_word):
      codes = (words >> (width * t)) & ((1 << width) - 1)
      if bits == 3:
        codes = codes | (((high.astype(jnp.uint32) >> t) & 1) << 2)
      parts.append(_select_tree(codes.astype(jnp.int32), centroids, jnp.float16))
    return parts
  shape = jax.ShapeDtypeStruct(words.shape, jnp.float16)
  if bits == 4:
    asm, args = _lut_asm(_lut_tables(centroids)), [words]
  else:
    asm = _lut_low_asm(bits, _lut_full_tables(centroids))
    args = [words] if bits == 2 else [words, high]
  # pack = 2: two registers per uint32 argument, one for the two halves of a uint16 one.
  inputs = ["r", "r"] + (["r"] if bits == 3 else [])
  return inline_asm.multi_output_asm(
      asm, args=args, constraints=",".join(["=r"] * per_word + inputs), pack=2,
      result_shape_dtypes=[shape] * per_word)


def _lut_nibbles(codes: Array, centroids: tuple[float, ...], interpret: bool,
                 high: Array | None = None) -> list[Array]:
  """4- or 5-bit codes -> their centroids as float16 in the "nibbles" layout.

  Args:
    codes: [block_s, d / 2] uint8, the (4-bit plane of the) packed rows (byte j: the low 4
      bits of coordinates 2j, 2j + 1).
    centroids: the codebook (16 or 32 values, symmetric).
    interpret: the same function in plain jnp (no PTX off the GPU).
    high: 5 bits: [block_s, d / 2] uint8, bit t of byte j = bit 4 of coordinate 2j + t
      (`_high_bits`); else None.

  Returns:
    2 x [block_s, d / 2] float16: part t, element j = coordinate 2j + t.
  """
  if interpret:
    parts = []
    for t in range(2):
      part = (codes >> (4 * t)) & 15
      if high is not None:
        part = part | (((high >> t) & 1) << 4)
      parts.append(_select_tree(part.astype(jnp.int32), centroids, jnp.float16))
    return parts
  shape = jax.ShapeDtypeStruct(codes.shape, jnp.float16)
  if high is None:
    asm, args = _lut_nibble_asm(_lut_tables(centroids)), [codes]
  else:
    asm, args = _lut_nibble5_asm(_lut_full_tables(centroids[16:])), [codes, high]
  return inline_asm.multi_output_asm(
      asm, args=args, constraints="=r,=r,=r,=r" + ",r" * len(args), pack=4,
      result_shape_dtypes=[shape] * 2)


def _high_bits(ref, rows: Array, seg: SegmentLayout, row_mask) -> Array:
  """The 1-bit plane of 5-bit codes, spread to the 4-bit plane's bytes: [block_s, d / 2]
  uint8, bits 0 and 1 of byte j = bit 4 of coordinates 2j and 2j + 1.

  Byte j of the 4-bit plane needs bits 2j % 8, 2j % 8 + 1 of the 1-bit plane's byte j // 4:
  a gather of that byte (each read 4 times, from cache) and a shift per column, so the
  lookup stays elementwise. (Loading the plane once and repeating its bytes in registers
  took the same time on the H200: 535-575 us at B = 8, S = 64K, k5v3.)
  """
  (_, _, _, nibble_bytes), (_, _, offset, _) = seg.planes()
  cols = jnp.arange(nibble_bytes)[None, :]
  shape = (rows.shape[0], nibble_bytes)
  idx = (jnp.broadcast_to(rows[:, None], shape), jnp.broadcast_to(offset + cols // 4, shape))
  if row_mask is None:
    byte = ref[idx]
  else:
    byte = plgpu.load(ref.at[idx], mask=jnp.broadcast_to(row_mask[:, None], shape), other=0)
  return (byte >> (2 * (cols % 4)).astype(jnp.uint8)) & 3


# How many dots a "lut" segment's tile meets the query in: "joined": the float16 parts of a
# word interleaved back into coordinate order, one dot of depth d; "parts": part t holds
# coordinates 8w + t, 8 dots of depth d / 8; "nibbles" (4 bits): part t holds coordinate
# 2j + t (nibble t of byte j) at element j, two dots of depth d / 2. The query (and the
# value accumulators) take the same permutation outside the kernel (`_parts_perm`).
_LAYOUT_PARTS = {"joined": 1, "parts": _LUT_CODES, "nibbles": 2}


def _parts_perm(layout: str, dim: int) -> np.ndarray:
  """[parts, dim / parts] int: the coordinate at each element of each part of `layout`."""
  coords = np.arange(dim)
  if layout == "parts":
    return coords.reshape(dim // _LUT_CODES, _LUT_CODES).T
  if layout == "nibbles":
    return coords.reshape(dim // 2, 2).T
  raise ValueError(f"layout {layout!r} has no parts")


def _code_views(seg: SegmentLayout, lut: str | None) -> int:
  """How many views of a segment's packed codes the kernel reads (see `_views`)."""
  return 2 if lut and seg.bits == 3 else 1


def _views(codes: Array, seg: SegmentLayout, lut: str | None) -> list[Array]:
  """The kernel's views of [B, K, S, P] uint8 codes: the bytes themselves (also for the
  "nibbles" layout), or for a "lut" segment the same bytes as uint32 words (and at 3 bits
  also as uint16 halves, the high plane's)."""
  if not lut or lut == "nibbles":
    return [codes]
  as_type = lambda width, dtype: lax.bitcast_convert_type(
      codes.reshape(*codes.shape[:-1], codes.shape[-1] // width, width), dtype)
  views = [as_type(4, jnp.uint32)]
  if seg.bits == 3:
    views.append(as_type(2, jnp.uint16))
  return views


def _decode_kernel(
    lengths_ref,  # [B] int32 (whole array)
    *refs,
    key_segs: tuple[SegmentLayout, ...],
    value_segs: tuple[SegmentLayout, ...],
    key_centroids: tuple[tuple[float, ...] | None, ...],
    value_centroids: tuple[tuple[float, ...] | None, ...],
    key_lut: tuple[str | None, ...],  # per segment: None or a layout of _LAYOUT_PARTS
    value_lut: tuple[str | None, ...],
    seq_len: int,
    split_len: int,
    block_s: int,
    real_rows: int,
    start_token: int,
    lookup: str,
    orient: str,
    interpret: bool,
):
  nk, nv = len(key_segs), len(value_segs)
  it = iter(refs)
  # Per key segment: [Gp, padded_dim] float16 ([padded_dim, Gp] "tokens"); a segment in
  # parts (`_LAYOUT_PARTS`): [P, Gp, d / P] ([P, d / P, Gp]), permuted as `_parts_perm`.
  q_refs = [next(it) for _ in range(nk)]
  # Codes per segment: ([S, P_i] uint8,); "lut": ([S, P_i / 4] uint32,), at 3 bits also the
  # same bytes as [S, P_i / 2] uint16 (the high bit plane as halves).
  code_refs = lambda segs, luts: [tuple(next(it) for _ in range(_code_views(s, lut)))
                                   for s, lut in zip(segs, luts)]
  kc_refs = code_refs(key_segs, key_lut)
  kn_refs = [next(it) for _ in range(nk)]  # [S] float16 | float32
  kcb_refs = [next(it) for _ in range(nk)]  # [2**b_i] float32
  vc_refs = code_refs(value_segs, value_lut)
  vn_refs = [next(it) for _ in range(nv)]  # [S]
  vcb_refs = [next(it) for _ in range(nv)]  # [2**b_j] float32
  m_ref = next(it)  # [Gp] float32
  l_ref = next(it)  # [Gp] float32
  acc_refs = [next(it) for _ in range(nv)]  # [Gp, padded_dim_j] float32 (as the queries)

  b = pl.program_id(0)
  split = pl.program_id(2)
  length = lengths_ref[b]
  first = split * split_len
  end = jnp.minimum(jnp.minimum(first + split_len, length), seq_len)
  if start_token:  # skip whole tiles before start_token, mask the rest
    first = jnp.maximum(first, (start_token // block_s) * block_s)
  num_blocks = jnp.maximum(end - first + block_s - 1, 0) // block_s
  tok = orient == "tokens"
  rows = q_refs[0].shape[-1 if tok else -2]

  split = lambda lut: lut is not None and _LAYOUT_PARTS[lut] > 1  # several dots per tile

  def load_q(ref, lut):
    return [ref[u] for u in range(_LAYOUT_PARTS[lut])] if split(lut) else ref[...]

  qs = [load_q(r, lut) for r, lut in zip(q_refs, key_lut)]
  # "lut-gather": the segments without a lut read their centroids from memory.
  gathered = lambda lut: lookup == "gather" or (lookup == "lut-gather" and lut is None)
  ck = [None if gathered(key_lut[i]) else key_centroids[i] for i in range(nk)]
  cv = [None if gathered(value_lut[j]) else value_centroids[j] for j in range(nv)]
  if lookup == "none":
    kcb_refs, vcb_refs = [None] * nk, [None] * nv
  need_row_mask = seq_len % block_s != 0 or split_len % block_s != 0

  # Logits as [Gp, block_s] ("rows": query rows are the dot's M) or as [block_s, Gp]
  # ("tokens": tokens are M, so a tile of >= 64 tokens fills a wgmma).
  ax = 0 if tok else 1  # the token axis of the logits
  bcast = (lambda v: v[:, None]) if tok else (lambda v: v[None, :])  # per token
  rowb = (lambda v: v[None, :]) if tok else (lambda v: v[:, None])  # per query row

  def key_dot(keys, q):  # keys [block_s, d] -> logits
    if tok:  # [block_s, d] @ [d, Gp]
      return lax.dot_general(keys, q, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return lax.dot_general(q, keys, (((1,), (1,)), ((), ())),  # [Gp, d] @ [block_s, d]^T
                           preferred_element_type=jnp.float32)

  def value_dot(vals, pn):  # vals [block_s, d], pn like the logits -> acc update
    if tok:  # [block_s, d]^T @ [block_s, Gp] -> [d, Gp]
      return lax.dot_general(vals, pn, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return lax.dot_general(pn, vals, (((1,), (0,)), ((), ())),  # [Gp, block_s] @ [block_s, d]
                           preferred_element_type=jnp.float32)

  def load_tokens(ref, tile, row_mask):  # ref [S, ...] -> the tile's rows
    if row_mask is None:
      return ref[tile]
    mask = row_mask.reshape(row_mask.shape + (1,) * (len(ref.shape) - 1))
    mask = jnp.broadcast_to(mask, (block_s, *ref.shape[1:]))
    return plgpu.load(ref.at[tile], mask=mask, other=0)

  def load_columns(ref, tile, start, width, row_mask):  # ref [S, P] -> [block_s, width]
    view = ref.at[tile, pl.ds(start, width)]
    if row_mask is None:
      return view[...]
    mask = jnp.broadcast_to(row_mask[:, None], (block_s, width))
    return plgpu.load(view, mask=mask, other=0)

  def segment_values(codes_refs, seg, centroids, cb_ref, lut, tile, row_mask):
    """The tile's centroid values: [block_s, padded_dim] float16, or the "lut" parts."""
    if lut == "nibbles":
      nibbles = seg.dim // 2
      high = None
      if seg.bits == 5:
        high = _high_bits(codes_refs[0], tile.start + jnp.arange(block_s), seg, row_mask)
      return _lut_nibbles(load_columns(codes_refs[0], tile, 0, nibbles, row_mask),
                          centroids, interpret, high)
    if lut:
      words = seg.dim // (_LUT_CODES if seg.bits == 4 else _LUT_LOW_CODES)
      lo = load_columns(codes_refs[0], tile, 0, words, row_mask)
      hi = None
      if seg.bits == 3:  # the 1-bit plane follows the 2-bit one: halves 2W .. 3W - 1
        hi = load_columns(codes_refs[1], tile, 2 * words, words, row_mask)
      parts = _lut_parts(seg.bits, lo, hi, centroids, interpret)
      return parts if lut == "parts" else _interleave(parts)  # coordinate per_word * w + t
    codes = _load_codes(codes_refs[0], tile, seg, row_mask)
    return _lookup(codes, centroids, cb_ref, seg.bits, jnp.float16)

  def body(i, carry):
    m_prev, l_prev, accs = carry
    s0 = first + i * block_s
    tile = pl.ds(pl.multiple_of(s0, block_s), block_s)
    pos = s0 + jnp.arange(block_s)
    valid = (pos < end) & (pos >= start_token) if start_token else pos < end
    row_mask = (pos < seq_len) if need_row_mask else None

    scores = jnp.zeros((block_s, rows) if tok else (rows, block_s), jnp.float32)
    for t in range(nk):
      keys = segment_values(kc_refs[t], key_segs[t], ck[t], kcb_refs[t], key_lut[t], tile,
                            row_mask)
      if split(key_lut[t]):
        dots = sum(key_dot(part, q) for part, q in zip(keys, qs[t]))
      else:
        dots = key_dot(keys, qs[t])
      n = load_tokens(kn_refs[t], tile, row_mask).astype(jnp.float32)
      scores = scores + dots * bcast(n)
    scores = jnp.where(bcast(valid), scores, -jnp.inf)

    m_next = jnp.maximum(m_prev, jnp.max(scores, axis=ax))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    corr = jnp.exp(m_prev - m_safe)
    p = jnp.exp(scores - rowb(m_safe))
    l_next = l_prev * corr + jnp.sum(p, axis=ax)

    new_accs = []
    for t in range(nv):
      vals = segment_values(vc_refs[t], value_segs[t], cv[t], vcb_refs[t], value_lut[t],
                            tile, row_mask)
      n = load_tokens(vn_refs[t], tile, row_mask).astype(jnp.float32)
      n = jnp.where(valid, n, 0.0)  # garbage scales past the length may be inf/nan
      pn = (p * bcast(n)).astype(jnp.float16)
      if split(value_lut[t]):
        new_accs.append(tuple(a * rowb(corr) + value_dot(part, pn)
                              for a, part in zip(accs[t], vals)))
      else:
        new_accs.append(accs[t] * rowb(corr) + value_dot(vals, pn))
    return m_next, l_next, tuple(new_accs)

  def zero_acc(ref, lut):
    if split(lut):
      return (jnp.zeros(ref.shape[1:], jnp.float32),) * _LAYOUT_PARTS[lut]
    return jnp.zeros(ref.shape, jnp.float32)

  m0 = jnp.full((rows,), -jnp.inf, jnp.float32)
  l0 = jnp.zeros((rows,), jnp.float32)
  acc0 = tuple(zero_acc(r, lut) for r, lut in zip(acc_refs, value_lut))
  m, l, accs = lax.fori_loop(0, num_blocks, body, (m0, l0, acc0))
  m_ref[...] = m
  l_ref[...] = l
  # Only the real query rows of the accumulators: the padding rows' bytes would be written
  # here and read again by the merge for nothing (at G = 4, 3/4 of them).
  real = rowb(jnp.arange(rows) < real_rows)

  def store(ref, acc):
    plgpu.store(ref, acc, mask=jnp.broadcast_to(real, acc.shape))

  for ref, acc, lut in zip(acc_refs, accs, value_lut):
    if split(lut):
      for u, part in enumerate(acc):
        store(ref.at[jnp.int32(u)], part)
    else:
      store(ref, acc)


# ----------------------------------------------------------------------------------------
# Wrapper.


def _static_centroids(c) -> tuple[float, ...] | None:
  """The centroids as Python floats when known at trace time, else None."""
  try:
    values = np.asarray(c, np.float32)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None
  return tuple(float(x) for x in values.reshape(-1))


def _check_segments(name: str, q, codes, scales, centroids, shape_bk_s) -> list[SegmentLayout]:
  n = len(codes)
  if not (len(scales) == len(centroids) == n) or (q is not None and len(q) != n):
    raise ValueError(
        f"{name}: every segment needs codes, scales and centroids"
        f"{' and a query' if q is not None else ''}; got {len(codes)} codes, "
        f"{len(scales)} scales, {len(centroids)} centroids"
        f"{'' if q is None else f', {len(q)} queries'}")
  if n == 0:
    raise ValueError(f"{name}: at least one segment is needed")
  segs = []
  for i in range(n):
    c = centroids[i]
    if c.ndim != 1 or c.shape[0] & (c.shape[0] - 1) or c.shape[0] < 2:
      raise ValueError(f"{name}[{i}]: centroids must be [2**bits], got shape {c.shape}")
    bits = int(np.log2(c.shape[0]))
    if codes[i].dtype != jnp.uint8:
      raise TypeError(f"{name}[{i}]: codes must be uint8, got {codes[i].dtype}")
    if q is not None:
      dim = q[i].shape[-1]
    else:
      dim = None
      for d in range(8, 8 * 1024 + 1, 8):
        if packing.packed_size(d, bits) == codes[i].shape[-1]:
          dim = d
          break
      if dim is None:
        raise ValueError(f"{name}[{i}]: no dim packs into {codes[i].shape[-1]} bytes "
                         f"at {bits=}")
    seg = SegmentLayout(dim, bits)
    want = (*shape_bk_s, seg.packed)
    if codes[i].shape != want:
      raise ValueError(f"{name}[{i}]: codes must be [B, K, S, packed_size({dim}, {bits})]"
                       f" = {want}, got {codes[i].shape}")
    if scales[i].shape != tuple(shape_bk_s):
      raise ValueError(f"{name}[{i}]: scales must be [B, K, S] = {tuple(shape_bk_s)}, "
                       f"got {scales[i].shape}")
    if scales[i].dtype not in (jnp.float16, jnp.float32, jnp.bfloat16):
      raise TypeError(f"{name}[{i}]: scales must be float16/bfloat16/float32, "
                      f"got {scales[i].dtype}")
    segs.append(seg)
  return segs


def value_dims_from_codes(v_codes: Sequence[Array], v_centroids: Sequence[Array]) -> tuple[int, ...]:
  """The value segments' dims implied by their packed widths (multiples of 8)."""
  dims = []
  for codes, c in zip(v_codes, v_centroids):
    bits = int(np.log2(c.shape[0]))
    for d in range(8, 8 * 1024 + 1, 8):
      if packing.packed_size(d, bits) == codes.shape[-1]:
        dims.append(d)
        break
  return tuple(dims)


def decode(
    qk: Sequence[Array],
    k_codes: Sequence[Array],
    k_scales: Sequence[Array],
    k_centroids: Sequence[Array],
    v_codes: Sequence[Array],
    v_scales: Sequence[Array],
    v_centroids: Sequence[Array],
    lengths: Array,
    *,
    implementation: str = "xla",
    interpret: bool = False,
    block_s: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    lookup: str | None = None,
    orient: str | None = None,
    start: int = 0,
    layer: int | None = None,
) -> Partial:
  """Attention partials of query rows over a compressed KV region.

  Args:
    qk: per key segment i, [B, K, G, d_i] float32: the rotated, scaled query rows. For a
      chunk of T query tokens pass G = T * G' rows (every query sees every valid
      compressed token; causality lives in the exact window).
    k_codes: per key segment, [B, K, S, packed_size(d_i, b_i)] uint8.
    k_scales: per key segment, [B, K, S] float16/bfloat16/float32 (n_i).
    k_centroids: per key segment, [2**b_i] float32.
    v_codes, v_scales, v_centroids: the same for the value segments (dims d_j).
    lengths: [B] int32, valid compressed tokens per row (tokens >= length are ignored).
    implementation: "xla" (the jnp reference), "pallas" (the fused Triton-lowered kernel)
      or "mosaic" (the fused Mosaic GPU kernel of `pallas_kernels.decode_mosaic`: one key
      and one value segment, both 4-bit or both 3-bit, of 128 coordinates, or both 4-bit
      of 64; symmetric codebooks under lookup "prmt"; at most 16 rows; sm_90 only; an
      error otherwise).
    interpret: run the Pallas kernel in interpret mode (CPU testing).
    block_s, num_splits, num_warps, num_stages: kernel tiling; default from
      :mod:`pallas_kernels.tuned_block_sizes` ("mosaic": block_s is the step of 64 or 128
      tokens, or 256 at 64 coordinates; no num_warps).
    orient: "rows" (query rows are the dot's M) or "tokens" (tokens are M); tiling.
    lookup: "lut" (2-, 3- and 4-bit segments of 64 or 128 coordinates, 4 bits with a
      symmetric codebook, look codes up 4 at a time with byte permutes, see
      `lut_eligible`; 4-bit segments in the "nibbles" layout; the other segments as
      "select"), "select" (a select tree on the centroids baked into the kernel as
      constants) or "gather" (centroids read from memory). "lut" and "select" need
      concrete centroids; the default is "lut" for concrete centroids, else "gather".
      ("lut-joined" and "lut-parts" are slower layouts of 4-bit segments under "lut",
      kept for the benchmark's sweep; "lut-gather" is "lut" with "gather" for the segments
      that have no lut, e.g. 5-bit keys.)
      ("none" skips the lookup and gives wrong values: a timing diagnostic for
      bench/kernels.py only.) "mosaic" has its own: "prmt" (byte permutes, symmetric
      codebooks) or "smem" (a table in shared memory); None: "smem" up to 8 rows
      (`decode_mosaic.default_lookup`).
    start: compressed tokens before this position are ignored (e.g. attention-sink
      tokens kept exact elsewhere); a static int >= 0.
    layer: a static int: the codes and scales hold every layer of a model, with a leading
      layer axis ([L, B, K, S, P] and [L, B, K, S]), and this layer is read; the kernel
      indexes it in place (a slice taken outside the kernel would be a copy of the
      layer's region on every call).

  Returns:
    :class:`Partial` with m, l: [B, K, G] and acc_j: [B, K, G, d_j] (rotated domain,
    unnormalized).
  """
  if implementation not in ("xla", "pallas", "mosaic"):
    raise ValueError(f'implementation must be "xla", "pallas" or "mosaic", got '
                     f'{implementation!r}')
  qk, k_codes, k_scales, k_centroids = map(tuple, (qk, k_codes, k_scales, k_centroids))
  v_codes, v_scales, v_centroids = map(tuple, (v_codes, v_scales, v_centroids))
  if not qk:
    raise ValueError("qk: at least one key segment is needed")
  B, K, G = qk[0].shape[:3]
  if layer is not None and (not isinstance(layer, (int, np.integer)) or isinstance(layer, bool)
                            or not 0 <= layer < (k_codes[0].shape[0] if k_codes else 0)):
    raise ValueError(f"layer must be a static int indexing the leading layer axis of the "
                     f"codes (of {k_codes[0].shape[0] if k_codes else 0} layers), got {layer!r}")
  lead = () if layer is None else (k_codes[0].shape[0],)
  S = k_codes[0].shape[len(lead) + 2] if k_codes else 0
  key_segs = _check_segments("keys", qk, k_codes, k_scales, k_centroids, (*lead, B, K, S))
  value_segs = _check_segments("values", None, v_codes, v_scales, v_centroids,
                               (*lead, B, K, S))
  for i, q in enumerate(qk):
    if q.shape[:3] != (B, K, G) or q.ndim != 4:
      raise ValueError(f"qk[{i}] must be [B, K, G, d] = ({B}, {K}, {G}, d), got {q.shape}")
  if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be [B] = ({B},) integer, got {lengths.shape} "
                     f"{lengths.dtype}")
  if not isinstance(start, (int, np.integer)) or start < 0:
    raise ValueError(f"start must be a static int >= 0, got {start!r}")
  start = int(start)
  if implementation == "xla":
    if layer is not None:
      k_codes, k_scales, v_codes, v_scales = (tuple(x[layer] for x in xs) for xs in (
        k_codes, k_scales, v_codes, v_scales))
    return decode_reference(qk, k_codes, k_scales, k_centroids, v_codes, v_scales,
                            v_centroids, lengths, start=start)

  static_ck = tuple(_static_centroids(c) for c in k_centroids)
  static_cv = tuple(_static_centroids(c) for c in v_centroids)
  if implementation == "mosaic":
    _check_mosaic(key_segs, value_segs, static_ck, static_cv, G, interpret, lookup,
                  dict(num_warps=num_warps, orient=orient))
    return decode_mosaic.decode_mosaic(
        qk, k_codes, k_scales, k_centroids, v_codes, v_scales, v_centroids, lengths,
        start=start, layer=None if layer is None else int(layer), step=block_s,
        num_splits=num_splits, num_stages=num_stages, lookup=lookup)
  if lookup is None:
    lookup = "gather" if any(c is None for c in static_ck + static_cv) else "lut"
  if lookup not in ("lut", "lut-gather", "lut-joined", "lut-parts", "select", "gather", "none"):
    raise ValueError(f'lookup must be "lut", "lut-gather", "select" or "gather" (or '
                     f'"lut-joined", "lut-parts"), got {lookup!r}')
  if lookup != "gather" and any(c is None for c in static_ck + static_cv):
    raise ValueError(f'lookup="{lookup}" bakes the centroids into the kernel and needs them '
                     'concrete (numpy or a non-traced array); got traced centroids: pass '
                     'lookup="gather"')
  if G > 128:
    raise ValueError(f"pallas decode supports at most 128 query rows per KV head, got {G=}")
  cfg = tuned_block_sizes.decode_config(
      batch=B, kv_heads=K, seq_len=S, head_dim=sum(s.dim for s in key_segs),
      key_bits=tuple(s.bits for s in key_segs), value_bits=tuple(s.bits for s in value_segs))
  orient = orient or cfg.orient
  if orient not in ("rows", "tokens"):
    raise ValueError(f'orient must be "rows" or "tokens", got {orient!r}')
  block_s = block_s or cfg.block_s
  rows = max(_MIN_ROWS, pl.next_power_of_2(G))
  # The tuned tilings hold one query group; a chunk's rows (up to 128) get a warp per 32.
  num_warps = num_warps or max(cfg.num_warps, rows // 32)
  num_stages = num_stages or cfg.num_stages
  if block_s < 16 or block_s & (block_s - 1):
    raise ValueError(f"block_s must be a power of two >= 16, got {block_s}")
  blocks_total = max(1, pl.cdiv(S, block_s))
  if num_splits is None:
    num_splits = tuned_block_sizes.num_splits(B * K, blocks_total, cfg.target_programs)
  num_splits = max(1, min(num_splits, blocks_total))
  split_len = pl.cdiv(blocks_total, num_splits) * block_s
  num_splits = pl.cdiv(max(S, 1), split_len)

  lut_mode = lambda seg, c: lut_layout(seg, c, lookup, block_s=block_s, num_warps=num_warps)

  key_lut = tuple(lut_mode(seg, c) for seg, c in zip(key_segs, static_ck))
  value_lut = tuple(lut_mode(seg, c) for seg, c in zip(value_segs, static_cv))
  return _decode_pallas(
      qk, k_codes, k_scales, k_centroids, v_codes, v_scales, v_centroids,
      lengths.astype(jnp.int32), key_segs=tuple(key_segs), value_segs=tuple(value_segs),
      static_ck=static_ck, static_cv=static_cv, block_s=block_s, split_len=split_len,
      num_splits=num_splits, num_warps=num_warps, num_stages=num_stages, lookup=lookup,
      orient=orient, interpret=interpret, key_lut=key_lut, value_lut=value_lut,
      start=start, layer=None if layer is None else int(layer))


def _check_mosaic(key_segs, value_segs, static_ck, static_cv, G, interpret, lookup,
                  other) -> None:
  """What `implementation="mosaic"` (`pallas_kernels.decode_mosaic`) takes, else an error."""
  if lookup not in (None,) + decode_mosaic.LOOKUPS:
    raise ValueError(f'implementation="mosaic" takes lookup in {decode_mosaic.LOOKUPS} '
                     f'(or None: `decode_mosaic.default_lookup`), got {lookup!r}')
  segs = ((key_segs, static_ck, "key"), (value_segs, static_cv, "value"))
  widths = {s.bits for s in key_segs + value_segs}
  for segments, centroids, name in segs:
    if (len(segments) != 1 or segments[0].bits not in (3, 4) or len(widths) != 1
        or segments[0].dim not in (decode_mosaic.DIM, 64)
        or (segments[0].dim == 64 and segments[0].bits != 4)):
      raise ValueError(f'implementation="mosaic" takes one 4-bit or 3-bit {name} segment of '
                       f'{decode_mosaic.DIM} coordinates, or a 4-bit one of 64, as wide as '
                       f'the other side\'s (the k4v4 and k3v3 presets), got '
                       f'{[(s.dim, s.bits) for s in segments]} (dim, bits)')
    if segments[0].dim == 64 and lookup == "prmt":
      raise ValueError('implementation="mosaic" takes lookup "smem" (or None) at 64 '
                       'coordinates, got "prmt"')
    if segments[0].bits == 3 and lookup == "prmt":
      raise ValueError('implementation="mosaic" takes lookup "smem" (or None) for 3-bit '
                       'codes, got "prmt"')
    if centroids[0] is None:
      raise ValueError(f'implementation="mosaic" bakes the {name} codebook into the kernel; '
                       'got traced centroids')
    if lookup == "prmt" and not symmetric_codebook(centroids[0]):
      raise ValueError(f'implementation="mosaic", lookup="prmt" bakes a symmetric {name} '
                       'codebook into the kernel; got asymmetric centroids')
  if G > decode_mosaic.MAX_ROWS:
    raise ValueError(f'implementation="mosaic" takes at most {decode_mosaic.MAX_ROWS} query '
                     f'rows per KV head, got G = {G}')
  if interpret:
    raise ValueError('implementation="mosaic" has no interpret mode (Mosaic GPU\'s '
                     'interpreter runs no inline asm); test it on a GPU')
  given = sorted(k for k, v in other.items() if v is not None)
  if given:
    raise ValueError(f'implementation="mosaic" has its own tiling; {given} apply to "pallas" '
                     'only')


def _decode_pallas(qk, k_codes, k_scales, k_centroids, v_codes, v_scales, v_centroids,
                   lengths, *, key_segs, value_segs, static_ck, static_cv, block_s,
                   split_len, num_splits, num_warps, num_stages, lookup, orient,
                   interpret, key_lut, value_lut, start, layer):
  B, K, G = qk[0].shape[:3]
  S = k_codes[0].shape[-2]
  rows = max(_MIN_ROWS, pl.next_power_of_2(G))
  tok = orient == "tokens"
  qs = []
  for q, seg, lut in zip(qk, key_segs, key_lut):
    q = jnp.pad(q.astype(jnp.float32),
                ((0, 0), (0, 0), (0, rows - G), (0, seg.padded_dim - seg.dim)))
    q = q.astype(jnp.float16)
    if lut and _LAYOUT_PARTS[lut] > 1:  # [B, K, Gp, d] -> [B, K, P, Gp, d / P]
      q = jnp.moveaxis(q[..., _parts_perm(lut, seg.dim)], -2, 2)
    qs.append(jnp.swapaxes(q, -1, -2) if tok else q)
  k_codes = [v for c, seg, lut in zip(k_codes, key_segs, key_lut) for v in _views(c, seg, lut)]
  v_codes = [v for c, seg, lut in zip(v_codes, value_segs, value_lut)
             for v in _views(c, seg, lut)]
  kcb = [jnp.asarray(c, jnp.float32) for c in k_centroids]
  vcb = [jnp.asarray(c, jnp.float32) for c in v_centroids]

  def bks(shape_tail):  # per (b, k) block of a [B, K, ...] array
    n = len(shape_tail)
    return pl.BlockSpec((None, None, *shape_tail), lambda b, k, s: (b, k) + (0,) * n)

  def region(shape_tail):  # per (b, k) block of codes or scales, at `layer` if stacked
    if layer is None:
      return bks(shape_tail)
    n = len(shape_tail)
    return pl.BlockSpec((None, None, None, *shape_tail),
                        lambda b, k, s: (layer, b, k) + (0,) * n)

  whole = lambda shape: pl.BlockSpec(shape, lambda b, k, s: (0,) * len(shape))
  in_specs = (
      [whole((B,))]
      + [bks(q.shape[2:]) for q in qs]
      + [region(c.shape[-2:]) for c in k_codes]
      + [region((S,)) for _ in key_segs]
      + [whole(c.shape) for c in kcb]
      + [region(c.shape[-2:]) for c in v_codes]
      + [region((S,)) for _ in value_segs]
      + [whole(c.shape) for c in vcb])
  out_block = lambda tail: pl.BlockSpec(
      (None, None, None, *tail), lambda b, k, s: (b, k, s) + (0,) * len(tail))

  def acc_tail(seg, lut):
    if not lut or _LAYOUT_PARTS[lut] == 1:
      return (seg.padded_dim, rows) if tok else (rows, seg.padded_dim)
    n = _LAYOUT_PARTS[lut]
    return (n, seg.dim // n, rows) if tok else (n, rows, seg.dim // n)

  acc_tail = [acc_tail(seg, lut) for seg, lut in zip(value_segs, value_lut)]
  out_specs = ([out_block((rows,)), out_block((rows,))]
               + [out_block(tail) for tail in acc_tail])
  out_shape = ([jax.ShapeDtypeStruct((B, K, num_splits, rows), jnp.float32)] * 2
               + [jax.ShapeDtypeStruct((B, K, num_splits, *tail), jnp.float32)
                  for tail in acc_tail])
  kernel = functools.partial(
      _decode_kernel, key_segs=key_segs, value_segs=value_segs, key_centroids=static_ck,
      value_centroids=static_cv, key_lut=key_lut, value_lut=value_lut, seq_len=S,
      split_len=split_len, block_s=block_s, real_rows=G, start_token=start, lookup=lookup,
      orient=orient, interpret=interpret)
  m, l, *accs = pl.pallas_call(
      kernel,
      grid=(B, K, num_splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="tq_decode",
  )(lengths, *qs, *k_codes, *k_scales, *kcb, *v_codes, *v_scales, *vcb)
  if tok:
    accs = [jnp.swapaxes(a, -1, -2) for a in accs]
  # The splits merged first (the rows past G were never written), then the small result
  # put into coordinate order: in parts, [B, K, P, G, d / P] -> [B, K, G, d] (permuted).
  m_max, w = _merge_weights(m[..., :G], axis=2)  # [B, K, G], [B, K, splits, G]
  out = []
  for a, seg, lut in zip(accs, value_segs, value_lut):
    # Products and a sum, not a dot: float32 dots may run at TF32 on the GPU.
    if lut and _LAYOUT_PARTS[lut] > 1:
      a = jnp.sum(w[:, :, :, None, :, None] * a[..., :G, :], axis=2)  # [B, K, P, G, d / P]
      a = jnp.moveaxis(a, 2, 3).reshape(B, K, G, seg.dim)
      a = a[..., np.argsort(_parts_perm(lut, seg.dim).ravel())]
    else:
      a = jnp.sum(w[..., None] * a[..., :G, :], axis=2)
    out.append(a[..., :seg.dim])
  return Partial(m_max, jnp.sum(w * l[..., :G], axis=2), tuple(out))


# ----------------------------------------------------------------------------------------
# Combining partials.


def _merge_weights(m: Array, axis: int) -> tuple[Array, Array]:
  """The merged row max over `axis` of partials' maxima m, and each partial's weight
  exp(m - max) (0 for a partial that saw no token; a row that saw none keeps -inf)."""
  top = jnp.max(m, axis=axis)
  return top, jnp.exp(m - jnp.expand_dims(jnp.where(top == -jnp.inf, 0.0, top), axis))


def merge_partials(*parts: Partial, axis: int | None = None) -> Partial:
  """Merges flash-decoding partials over disjoint token sets.

  Either several :class:`Partial` of equal shapes (e.g. the compressed region and the
  exact window), or one whose ``axis`` (an axis of m, before the row axis) enumerates
  the splits to merge. Rows that saw no token (m = -inf) contribute nothing.
  """
  if axis is not None:
    if len(parts) != 1:
      raise ValueError(f"merge over an axis takes one Partial, got {len(parts)}")
    (p,) = parts
    axis = axis % p.m.ndim
    m, w = _merge_weights(p.m, axis)
    l = jnp.sum(w * p.l, axis=axis)
    acc = tuple(jnp.sum(w[..., None] * a, axis=axis) for a in p.acc)
    return Partial(m, l, acc)
  if not parts:
    raise ValueError("merge_partials needs at least one Partial")
  stacked = Partial(jnp.stack([p.m for p in parts]), jnp.stack([p.l for p in parts]),
                    tuple(jnp.stack(a) for a in zip(*(p.acc for p in parts))))
  return merge_partials(stacked, axis=0)


# ----------------------------------------------------------------------------------------
# Reference.


def dequantize_segment(codes: Array, centroids: Array, dim: int) -> Array:
  """[..., packed] uint8 -> [..., dim] float32 centroid values c[codes]."""
  bits = int(np.log2(centroids.shape[0]))
  idx = packing.unpack(codes, dim, bits).astype(jnp.int32)
  return jnp.asarray(centroids, jnp.float32)[idx]


def decode_reference(qk, k_codes, k_scales, k_centroids, v_codes, v_scales, v_centroids,
                     lengths, *, start: int = 0) -> Partial:
  """Plain-jnp float32 computation of :func:`decode` (same arguments and result)."""
  S = k_codes[0].shape[2]
  scores = 0.0
  for q, codes, n, c in zip(qk, k_codes, k_scales, k_centroids):
    keys = dequantize_segment(codes, c, q.shape[-1])  # [B, K, S, d]
    dots = jnp.einsum("bkgd,bksd->bkgs", q.astype(jnp.float32), keys,
                      precision=lax.Precision.HIGHEST)
    scores = scores + dots * n.astype(jnp.float32)[:, :, None, :]
  slots = jnp.arange(S)[None, :]
  valid = (slots < lengths[:, None]) & (slots >= start)  # [B, S]
  scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
  m = jnp.max(scores, axis=-1)
  m_safe = jnp.where(m == -jnp.inf, 0.0, m)
  p = jnp.exp(scores - m_safe[..., None])  # [B, K, G, S]
  l = jnp.sum(p, axis=-1)
  accs = []
  for codes, n, c, dim in zip(v_codes, v_scales, v_centroids,
                              value_dims_from_codes(v_codes, v_centroids)):
    vals = dequantize_segment(codes, c, dim)  # [B, K, S, d]
    n = jnp.where(valid[:, None, :], n.astype(jnp.float32), 0.0)
    accs.append(jnp.einsum("bkgs,bksd->bkgd", p * n[:, :, None, :], vals,
                           precision=lax.Precision.HIGHEST))
  return Partial(m, l, tuple(accs))
