"""Fused 4-bit dequantize + attention decode as a Mosaic GPU (Hopper wgmma) kernel.

The same computation as :func:`pallas_kernels.decode.decode` (``implementation="mosaic"``
there) for one 4-bit key segment and one 4-bit value segment of 128 coordinates (the
k4v4 preset; any codebook, a symmetric one for ``lookup="prmt"``), at most 16 query rows
per KV head. It reads the cache as it is: tqjax's packing (byte j = code 2j | code
2j+1 << 4), sorted codes.

Why a second kernel: the Triton-lowered one is bound by its structure (16-row query
padding, a shared-memory round trip of the dequantized tiles, 250 registers and one warp
per program), not by the bytes it reads; see the profile in `pallas_kernels.decode`. Here:

* Tokens are the wgmma M (a warpgroup, 128 threads, takes 64- or 128-token steps), the
  query rows the N (8 or 16), so padding costs at most 2x on tiny tensor-core work.
* Codes are dequantized straight into the wgmma's register A operand by inline PTX,
  never through shared memory as float16 tiles:
  S^T [T, N] = K [T, 128] @ Q^T and O^T [128, N] += V^T [128, T] @ P^T.
  The default lookup up to 8 query rows (``"smem"``, `smem_word_asm`, session 15) reads a
  byte's two values at once from a 64 KB table in shared memory (`smem_table`: 256 rows
  of 256 bytes, the float16 pair of each byte for each of 32 lanes, keys in the first 128
  bytes and values in the rest, so a warp's 32 lookups hit 32 banks; one bulk copy from
  global memory per program): per byte a `prmt` makes the address (the byte into bits
  8..15 of the lane's offset), an `add` the table's base (uniform; ptxas folds it into the
  load's address, session 17's SASS), one `ld.shared.b32`; the values' pairs
  are then regrouped by token with 2 `prmt`s per 2 outputs. 12 instructions per 8 key
  codes and 16 per 8 value codes, against 21 + 4 table copies for ``"prmt"`` (`word_asm`:
  byte permutes on tables in the PTX, 3 of them relabelling the sorted codes to
  sign-magnitude). The table and the pipeline leave room for 2 programs an SM, not 3.
  Session 15, H100, `bench/ab_mosaic.py` (us, two rounds, prmt | smem): e2e layer B = 8
  78.7/82.0 | 67.9/70.7, B = 1 18.0/16.1 | 18.1/15.3; 64K B = 8 265.0/264.4 |
  219.4/212.7, B = 1 52.7/46.4 | 51.2/44.3. `bench/kernels.py --quick` on the H100 (same
  run, fastest fp16 658-676 us at B = 8, 92-93 us at B = 1): 205.8-211.7 us at B = 8 64K
  (3.19-3.20x; 107-110% of the measured copy bandwidth, which counts read and write), 44.3-
  44.9 us at B = 1 (2.07-2.09x). Session 16, H100, with one wave of programs (below):
  207.3 us at B = 8 (3.35x torch cuDNN's 694.7), 36.3 us at B = 1 (2.59x its 94.0).
* K: a thread's 4 words (one 16-byte load) of two token rows become 16 columns of its
  fragment; the columns are a fixed permutation of the coordinates (`k_perm`), undone by
  permuting the query. V^T: a thread holds 4 coordinates x 16 tokens; one
  `ldmatrix.x4.trans` hands it the 16-bit slot of its 4 coordinates of two tokens, for 4
  token pairs (the value codes sit in shared memory with a 64-byte swizzle, so the 8
  rows of a matrix hit distinct banks); the rows are a fixed permutation of the
  coordinates (`v_perm`), undone on the output. Session 13, H100, `bench/ab_mosaic.py`:
  against 32 32-bit loads and 16 `prmt`s a step, 1-2% faster (e2e layer B = 8 83.6-84.3
  against 85.1-86.0 us; B = 8 64K 271 against 275).
* Online softmax over the tokens (a cross-warp max per step; the length mask only on
  steps that cross a split's ends: another 1-3%, layer 82.7-82.8 us, B = 8 64K 264, same
  call), flash-decoding splits of
  whole steps merged by the wrapper. The splits are the most that keep B * K * splits
  within the tuned number of programs (`tuned_block_sizes.MOSAIC_DECODE`, by lookup:
  "smem" one wave of the 2 blocks an SM that fit, 264, measured best on the H100 in
  session 16 at the e2e layer and at 64K, B = 8 and 1; "prmt" 1056 on the H200, measured
  best among 16-65 splits at the e2e layer, 2.67 waves of its 3 blocks an SM, see below),
  at least 2 steps each, evened out; the
  last split's window moves back to stay inside S (`split_window`) and masks the tokens
  of the split before, so any multiple of the step works.

Measured on the H200 in one call (`bench/kernels.py --quick --no-encode --presets k4v4`,
Hq = 32, Hkv = 8, S = 64K, random codes, session 10): B = 8: 297 us, 1.61x the fastest fp16
baseline (478 us, jax cuDNN), against 388 us (1.23x) for the Triton kernel (session 9: 279
against 401 us); B = 1: 51 us (0.99x of 51 us, jax Pallas `mqa`) against 59 us. At the
e2e model's layer (Hkv = 4, G = 7, 33,024 slots): 73 us with 33 splits, 92.7 us with 29
(two waves but for 128 programs), 112 us for the Triton kernel; in the model
(`bench/e2e.py --presets bf16,k4v4,k4v4@mosaic`, Qwen2.5-7B shapes, 32K) 1.31x the bf16
step at B = 8 (Triton 1.20x), 1.19x at B = 1 (1.16x), and 1.71x at B = 8, 128K. The
prototype's profile (Nsight Compute): 94-112 registers, 4 warpgroups per SM, the integer
pipe ~69% busy, and the 64-byte swizzle of the value codes took bank conflicts off
(294 -> 282 us at the same tiling).

What limited it with the "prmt" lookup (session 11, Nsight Compute on the H200,
`ncu -k regex:mosaic --set full`, the e2e layer, 33 splits): instruction issue (what led
to the "smem" lookup). 168 registers and 47 KB of shared memory a block allow 3 blocks
(warpgroups) per SM, not 4 (18.75% occupancy), so 1056 programs are 2.67 waves of 396;
issue slots 65% busy, IPC 2.7, ALU pipe 67%, DRAM 31% (1.5 TB/s);
stalls: selected 28%, not selected 20%, wait 15%, math 13%, barrier 10%; ~5.3 thread
instructions per code, half of them the lookup (PRMT 26%, IMAD 22%, LOP3 15% of all);
shared-load bank conflicts 12% of wavefronts. Fewer instructions in all is the way on,
not moving them to another pipe. Where they go (session 13, the ncu source page
`--page source --print-source sass` on the H100, the kernel as it was before that
session, per thread-step of 128 tokens, ~1350 in all): the lookups' 32 words x 22
(PRMT 351, LOP3 198, IMAD.SHL 106 and IMAD 33 for the shifts and the multiply by 7, SHF
33) plus 126 IMAD.U32 that copy the tables, immediates in the PTX, out of uniform
registers before every `prmt` (9% of the step; passing them as register operands did
not pay, below); then 32 LDS of value words (now 4 `ldmatrix`), 32 HGMMA, ~53 UMOV/R2UR
for the wgmma descriptors, and the softmax (FMUL 34, FFMA 28, FADD 20, FMNMX 20, 10 each
of MUFU.EX2, SHFL, FSEL). Tried and measured slower (session 11, the timer of
`bench/kernels.py`, ~2% spread; from session 13 `bench/ab_mosaic.py`, variants
alternating in one process):

* A 32 KB table (one codebook for keys and values, rows of 128 bytes: the lane offset 8
  lane and a `shr` after the address `prmt`, 16 / 20 instructions per 8 key / value codes),
  small enough for 3 programs an SM (session 15, H100, against the 64 KB "smem" table,
  two rounds, us): layer B = 8 73.4/83.3 against 72.4/74.6, 64K B = 8 248.9/252.0 against
  213.9/238.3, 64K B = 1 47.2/56.3 against 45.2/43.2: not taken.

* The tables as register operands of the PTX ($5..$8 of `word_asm`), written into each
  row's header by the wrapper and loaded from shared memory once a tile (session 14,
  H100, against this kernel, two rounds, us): e2e layer B = 8 77.6/78.1 against
  78.8/79.3, 64K B = 8 263.7/257.0 against 267.5/271.6, but 64K B = 1 50.0/50.4 against
  43.7/45.8 and the layer at B = 1 17.3/20.7 against 16.2/18.7: not taken. With it, the
  magnitude index in 3 instructions instead of 4 (`lop3` of the sign bits, then one
  `mul.hi.u32` by 7 << 29 for the shift and the x7) gave 76.8/77.8, 262.7/263.7,
  49.4/49.9 and 15.4/16.9; on this kernel alone (next call, one round and a half before
  the call's time ran out) 64K B = 8 270.5/269.6 against 267.6 and B = 1 48.3 against
  46.8/45.3: not taken either.

* An odd quintic codebook (c = s u (1 + b u^2 + g u^4), u = (2k + 1 - 16) / 16; distortion
  +0.16% at 4 bits) dequantized on the FP16 pipe (a code into float16 by a shift and a
  `lop3` against 0x6408, then 4 half2 ops: 7 integer + 20 FP16 instructions per 8 codes):
  5-8% slower (layer 82.9-86.9 against 79.5-80.7 us): the H200's FP16 FMA pipe issues at
  the ALU's rate, and 27 instructions are more than 21.
* Keys into float8 e4m3 for FP8 wgmmas (an e4m3-grid codebook, the `k4v4-e4m3` preset;
  11 integer ops and a multiply per 8 codes, the query in 3 e4m3 parts): first built as 3
  wgmmas on the parts of a [3, rows, 128] shared buffer, which on the H200 gave the first
  part's scores alone (rel. error 0.075 against the reference); it also timed no faster
  than the float16 lookup (B = 8, 64K: 276 against 267 us; B = 1: 55.7 against 39.5) for
  the same MMA work a fixed version would do (one wgmma of contraction 3 x 128), and the
  values' side would need the probabilities in e4m3 parts too. Removed (session 12).
* 64-token steps (96 registers, 5 blocks an SM): layer 85-90 us, B = 8 64K 307-310; 3 or
  4 stages at 128-token steps: 81.4 / 91.5 us at the layer.

3 bits (k3v3, whose bytes are 0.76 of k4v4's; issue 4 asks 4x fp16 for it), written in
session 16 and first run in session 17 (H100, `bench/kernels.py --quick --no-encode
--presets k3v3,k4v4`, one call; fastest fp16 torch cuDNN 694.4 us at B = 8, 93.9 at
B = 1): B = 8, S = 64K 279.0 us (2.49x; k4v4 here 206.4, 3.36x; the Triton k3v3 600.7,
1.16x), B = 1 42.7 us (2.20x; k4v4 36.1, 2.60x), relative error 3.1e-5. Its lookups cost
more instructions than 4-bit ones for fewer bytes, so it is slower than k4v4. Nsight
Compute (same session, 64K B = 8, `bench/ncu_decode.py --implementation mosaic --preset
k3v3`, the source page): 1024 warp instructions a warp-step against k4v4's 734 (PRMT 236
against 196, LDS 178 against 142, LOP3 101 against 5, IMAD 89 against 29, SHF 59; the
table's base add is folded into LDS's addressing in both); 146 registers and 55 KB of
shared memory a program, so 3 fit an SM where the 4-bit kernel's 64 KB table leaves 2;
issue slots 51% busy with 2 resident (k4v4: 51%, at 80% of DRAM bandwidth). One wave of
3 an SM (396 programs, "smem3" in `tuned_block_sizes`): 252-253 against 282 us at 64K
B = 8 (`bench/ab_mosaic.py --preset k3v3`); `bench/kernels.py --quick` in the next call:
250.5 us, 2.77x torch cuDNN's 694.8 (B = 1: 41.0 us, 2.29x). The design,
counted from its PTX: a 3-bit row is a 2-bit plane (32
bytes, byte j = codes 4j..4j+3) and a 1-bit plane (16 bytes, byte j = the high bits of
codes 8j..8j+7). A 6-bit pair index (the pair's 2-bit nibble, its 2 high bits above)
goes into bits 8..13 of the lane offset as here, in a 64-row table (`smem_table3`, 16 KB).
* Keys: thread q of 4 takes coordinates 32q..32q+31 (2 words of the 2-bit plane W2, one
  of the 1-bit plane). One `prmt` puts the 1-bit word's half into bytes 0 and 2, and two
  shift+`lop3` steps spread its 2-bit groups to nibble positions (B). Then
  L = lop3(W2, B << 4, 0x0F0F0F0F) and H = lop3(W2 >> 4, B, 0x0F0F0F0F) hold the index
  of pairs 2j and 2j + 1 in byte j. That is ~17 instructions per 8 codes against 12.
* Values: give warp w, lane group l4 the 4 coordinates of 2-bit byte
  g = 16 (w // 2) + 2 l4 + w % 2. One `ldmatrix.x4.trans` then serves as now: warps 2c
  and 2c + 1 read 16-byte chunk c, and each keeps the low or the high byte of its 16-bit
  slot. The 1-bit plane does not fit that map (its slot is 16 codes), so its nibble takes
  a 32-bit `ld.shared` per token and a shift. With 2 `prmt`s to pair the tokens' bytes
  and nibbles, L/H as for keys, 4 lookups and 4 regrouping `prmt`s, that is ~27
  instructions per 8 codes against 16.
* In all, ~700 lookup instructions a thread-step against ~450, for 0.76 of the bytes. On
  the H100, where the 4-bit kernel is at its bytes, that suggests ~3.3-3.6x fp16, not 4x.

Considered for 3 bits and not built (session 23, on paper and the CPU, no GPU came): a
lookup with no table. A codebook on the float8 e5m2 grid (the high byte of a float16:
centroids ± {1, 3, 5, 8} times a scale) costs +0.96% distortion at 128 coordinates
(0.03397 -> 0.03429, `codebook.expected_distortion`; +0.91% at 64, +4.2% for 4 bits). Then
one `prmt` with the 8 high bytes as its table makes a float16 pair (its low bytes zero by
sign-replicating a positive entry), but only from a selector with the two codes as 3-bit
nibbles 1 and 3 and 0xC in nibbles 0 and 2, and building those from the two planes costs
what the table lookups cost now. Counted: keys 33 instructions per 16 codes, as `key3_asm`
(26 with the 1-bit plane stored in a spread order, a cache format change); values ~20 per 8
against 27; ~550 lookup instructions a thread-step against ~700 (k4v4: ~450). Between the
H100's k3v3 (~700, 250 us at B = 8, 64K) and k4v4 (~450, 206 us) that is ~225 us, ~3.1x
fp16, where 4x needs <= 174 us. Not worth a new codebook and cache format.

64 coordinates (4-bit, "smem" lookup only; written in session 18, first run in session 19
on the H100: `pytest -m gpu -k decode_mosaic_gpu` passes, relative error 2.8e-5 in
`bench/kernels.py`; the D = 128 modules are byte-identical, `bench/mosaic_ir.py`): keys
as at 128 with 2
words a thread-row (`k_perm(lookup, 64)`); V^T [64, T] is one M group, so a thread
dequantizes one byte (2 coordinates) a token: `ldmatrix.x4.trans` on 32-byte rows (no
swizzle: rows r and r + 4 of a matrix share banks) hands it a 16-bit slot, and warp
parity picks its byte (`value3_group`, `value64_asm`: 2 lookups and 2 regrouping `prmt`s
per 4 codes; `v_perm64`). Session 19, H100, `bench/kernels.py --dims 64 --presets
k4v4,k3v3 --no-encode` (one wave of 264 programs, as at 128), x the fastest fp16 (torch
cuDNN) at 4K/16K/64K/128K: B = 8 1.46/1.59/1.71/1.75 (the Triton kernel 1.07/1.02/0.99/
1.00), B = 1 0.81/0.94 (Triton 0.84/0.68). fp16 at D = 64 reads at 3.1 TB/s as at 128;
this kernel at 1.4 TB/s against 2.8 at 128 (202.9 us at B = 8, 64K in both): a step
holds half the bytes for the same softmax, barriers, wgmma waits and table copy. Two
waves of 2 programs an SM and 3 stages ("smem64" in `tuned_block_sizes`) took 64K B = 8
from 202.9 to 171.8 us (1.7 TB/s). Its grid (session 20, H100, `bench/kernels.py --dims
64`), x the fastest fp16 of the same run at B = 8: 1.02/1.62/1.92/2.03 at 4K/16K/64K/128K.
At B = 1, 16K (`bench/decode_profile.py`) the kernel takes 8.0 of the call's 10.3 us
(fp16 jax cuDNN 8.6 us: 0.83x); the XLA programs around it take under 1 us. Session 21
(H100, `bench/ab_mosaic.py --head-dim 64 --baselines`, two rounds, x the fastest fp16
of the same run): 256-token steps (a step's registers as at 128 coordinates), 2 stages,
one wave of 264 programs, now "smem64" (up to 8 query rows; with 16, "smem64x16" keeps
the tiling before, which the GPU tests ran with): B = 8, 64K 146.2 us (2.33x; 128-token
steps 177.2/174.5, 1.95x), B = 1 16K 12.6/14.2 (0.93x torch cuDNN's 11.7; 16.9/13.4), 64K
29.7/28.2 (1.73x; 32.9/32.8), 128K 45.8/44.6 (1.99x; 54.8/55.2).

Tried and measured slower (session 21, H100, `bench/ab_mosaic.py`, branch
`wip/table-fill`): each program copying the table without its 32 lane copies (2 KB) and
writing them into shared memory itself (32 loads and 16-byte stores a thread, then a
warpgroup barrier), against one 64 KB bulk copy: D = 128 B = 1 16K 18.6/18.2 against
15.1/15.3 us, 64K B = 8 212.7/214.1 against 204.8/201.7; no gain at 64 coordinates or
for the 3-bit kernel. A cheaper way to the table did not shorten the B = 1 call.

Limits: whole splits past a row's length are skipped, but a split that holds the length
runs all its steps (masked); S must be a multiple of the step (64); the kernel needs an
sm_90 GPU (no interpret mode: Mosaic GPU's interpreter has no inline asm); a stacked
cache's layer is static (one kernel per layer, the same code).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

DIM = 128  # coordinates per segment
ROW_BYTES = DIM // 2  # bytes of 4-bit codes per token
MAX_ROWS = 16  # query rows per KV head (the wgmma N: 8 or 16)


def word_asm(table_lo: tuple[int, int], table_hi: tuple[int, int]) -> str:
  """PTX: a word $4 of 8 sorted 4-bit codes n0..n7 -> 4 f16x2 outputs $0..$3, output j =
  (value(n_j), value(n_{j+4})).

  Sorted code k is +c[k - 8] for k >= 8 and -c[7 - k] below (a symmetric codebook); the
  magnitude index goes through two byte-permute tables (`table_lo`, `table_hi`: the low
  and high bytes of the 8 positive centroids as float16) and the sign is XORed in.
  """
  lines = ["{", ".reg .b32 W, m, sa, sb, la, ha, lb, hb, x, t;",
           "mov.b32 W, $4;",
           "shr.b32 t, W, 3;",
           "lop3.b32 t, t, 0x11111111, 0, 0x0C;",  # 1 in each negative code's low bit
           "mul.lo.u32 t, t, 7;",
           "lop3.b32 m, W, t, 0x77777777, 0x28;",  # magnitude index (W ^ t) & 7 per code
           "prmt.b32 sa, m, 0, 0x3120;",  # codes 0, 1, 4, 5 as selector nibbles
           "prmt.b32 sb, m, 0, 0x3131;",  # codes 2, 3, 6, 7
           f"prmt.b32 la, {table_lo[0]}, {table_lo[1]}, sa;",
           f"prmt.b32 ha, {table_hi[0]}, {table_hi[1]}, sa;",
           f"prmt.b32 lb, {table_lo[0]}, {table_lo[1]}, sb;",
           f"prmt.b32 hb, {table_hi[0]}, {table_hi[1]}, sb;",
           "prmt.b32 $0, la, ha, 0x6240;", "prmt.b32 $1, la, ha, 0x7351;",
           "prmt.b32 $2, lb, hb, 0x6240;", "prmt.b32 $3, lb, hb, 0x7351;"]
  # The sign (bit 3 of a sorted code is clear for a negative value) of code j, bit 3 + 4j,
  # and of code j + 4 into bits 15 and 31 of output j.
  for j in range(4):
    shift = 12 - 4 * j
    if shift:
      lines.append(f"shl.b32 x, W, {shift};")
    lines.append(f"lop3.b32 ${j}, ${j}, {'x' if shift else 'W'}, 0x80008000, 0xD2;")
  lines.append("}")
  return "\n".join(lines)


def tables(centroids: tuple[float, ...]) -> tuple[tuple[int, int], tuple[int, int]]:
  """The low and high bytes of the 8 positive centroids (float16), 4 to a word: the
  Triton kernel's tables (`decode._lut_tables`) as (low words, high words)."""
  from pallas_kernels.decode import _lut_tables
  lo0, lo1, hi0, hi1 = _lut_tables(centroids)
  return (lo0, lo1), (hi0, hi1)


LOOKUPS = ("prmt", "smem")
TABLE_WORDS = 64  # words per row of the shared-memory table: 32 lanes x (keys, values)


def default_lookup(G: int, symmetric: bool) -> str:
  """"smem" where it was measured faster: up to 8 query rows (the wgmma N of 8). At 16
  rows the query, probabilities and accumulator tiles double, ~114 KB of shared memory a
  program with the table, so one program an SM, not two: not measured, so "prmt" there
  (it needs symmetric codebooks; "smem" takes any)."""
  return "smem" if G <= 8 or not symmetric else "prmt"


def smem_word_asm(pairs: bool) -> str:
  """PTX: a word $4 of 8 4-bit codes n0..n7 -> 4 f16x2 outputs $0..$3 by 4 loads from the
  shared-memory table (`smem_table`): byte j of the word (codes 2j, 2j + 1), as a number,
  selects the table's row; the thread reads the word at its lane offset $5 (4 lane, plus
  128 for the value table; < 256) of that row, the table starting at $6.

  One `prmt` puts the byte into bits 8..15 of the lane offset (rows of 256 bytes), one
  `add` the base (uniform), one `ld.shared` the pair. `pairs`: output j is byte j's pair
  (value(n_2j), value(n_2j+1)); else output j is (value(n_j), value(n_j+4)) as `word_asm`
  gives it, by two more `prmt`s per two outputs.
  """
  lines = ["{", ".reg .b32 a0, a1, a2, a3, p0, p1, p2, p3;"]
  out = [f"${j}" for j in range(4)] if pairs else ["p0", "p1", "p2", "p3"]
  for j in range(4):
    lines += [f"prmt.b32 a{j}, $4, $5, 0x55{j}4;", f"add.u32 a{j}, a{j}, $6;",
              f"ld.shared.b32 {out[j]}, [a{j}];"]
  if not pairs:  # (n_j, n_j+4): the low (j even) or high halves of pairs j // 2 and 2 + j // 2
    lines += ["prmt.b32 $0, p0, p2, 0x5410;", "prmt.b32 $1, p0, p2, 0x7632;",
              "prmt.b32 $2, p1, p3, 0x5410;", "prmt.b32 $3, p1, p3, 0x7632;"]
  lines.append("}")
  return "\n".join(lines)


def smem_table(k_centroids, v_centroids) -> np.ndarray:
  """uint32 [256, 64]: row b, word 32 v + lane (v = 0 keys, 1 values) holds the float16
  pair (c[b & 15], c[b >> 4]) of that side's codebook, for every lane, so a warp's 32
  lookups of any bytes hit 32 distinct banks."""
  b = np.arange(256)
  rows = []
  for c in (k_centroids, v_centroids):
    h = np.asarray(c, np.float16).view(np.uint16).astype(np.uint32)
    rows.append(np.repeat((h[b & 15] | h[b >> 4] << 16)[:, None], 32, axis=1))
  return np.concatenate(rows, axis=1)


# 3 bits (`key3_asm`, `value3_asm`; the design in the module docstring). A 3-bit row is a
# 2-bit plane (32 bytes, byte j = codes 4j..4j+3) and a 1-bit plane (16 bytes, byte j =
# the high bits of codes 8j..8j+7). A pair of codes (2m, 2m+1) has a 6-bit index: its 2-bit
# nibble (code 2m in bits 0..1) and its 2 high bits above (code 2m's in bit 4).
TABLE3_ROWS = 64


def smem_table3(k_centroids, v_centroids) -> np.ndarray:
  """uint32 [64, 64]: row r, word 32 v + lane (v = 0 keys, 1 values) holds the float16
  pair (c[(r & 3) | (r >> 2 & 4)], c[(r >> 2 & 3) | (r >> 3 & 4)]) of that side's 8-entry
  codebook, for every lane (as `smem_table`)."""
  r = np.arange(TABLE3_ROWS)
  first, second = (r & 3) | (r >> 2 & 4), (r >> 2 & 3) | (r >> 3 & 4)
  rows = []
  for c in (k_centroids, v_centroids):
    h = np.asarray(c, np.float16).view(np.uint16).astype(np.uint32)
    if h.shape != (8,):
      raise ValueError(f"smem_table3 needs 8 centroids a side, got {h.shape}")
    rows.append(np.repeat((h[first] | h[second] << 16)[:, None], 32, axis=1))
  return np.concatenate(rows, axis=1)


def _lookups3(index_bytes, outs) -> list[str]:
  """PTX: for each (register, byte j) in `index_bytes`, the table's pair at row (that
  byte) into the next name of `outs`: `prmt` of the byte into bits 8..15 of the lane
  offset, `add` of the base, `ld.shared`. Lane offset and table base are the asm's last
  two operands, named LANE and BASE by the caller."""
  lines = []
  for (reg, j), out in zip(index_bytes, outs):
    lines += [f"prmt.b32 a, {reg}, LANE, 0x55{j}4;", "add.u32 a, a, BASE;",
              f"ld.shared.b32 {out}, [a];"]
  return lines


def key3_asm() -> str:
  """PTX: 2-bit plane words $16 (codes 0..15 of 32) and $17 (16..31), 1-bit plane word
  $18 (their high bits), lane offset $19, table base $20 -> 16 f16x2 outputs $0..$15,
  output m = (value(code 2m), value(code 2m + 1)).

  Per half k of the 32 codes: `prmt` puts the 1-bit word's bytes 2k, 2k + 1 into bytes 0
  and 2, two shift+`lop3`s spread its 2-bit groups to nibble positions (B: pair 2j's high
  bits at bits 8j..8j+1, pair 2j + 1's at 8j+4..8j+5), then L = (W & 0x0F..) | (B << 4 &
  ~0x0F..) and H = (W >> 4 & 0x0F..) | (B & ~0x0F..) hold pair 2j's and 2j + 1's index in
  byte j; 8 lookups. 33 instructions per 16 codes."""
  lines = ["{", ".reg .b32 x, t, L, H, a;"]
  for k in range(2):
    lines += [f"prmt.b32 x, $18, 0, {'0x4342' if k else '0x4140'};",
              "shl.b32 t, x, 4;", "lop3.b32 x, x, t, 0x0F0F0F0F, 0xA8;",  # (x | t) & c
              "shl.b32 t, x, 2;", "lop3.b32 x, x, t, 0x33333333, 0xA8;",
              "shl.b32 t, x, 4;", f"lop3.b32 L, ${16 + k}, t, 0x0F0F0F0F, 0xE4;",  # a&c | b&~c
              f"shr.b32 t, ${16 + k}, 4;", "lop3.b32 H, t, x, 0x0F0F0F0F, 0xE4;"]
    pairs = [("L" if p % 2 == 0 else "H", p // 2) for p in range(8)]
    lines += _lookups3(pairs, [f"${8 * k + p}" for p in range(8)])
  lines.append("}")
  return "\n".join(lines).replace("LANE", "$19").replace("BASE", "$20")


def value3_asm() -> str:
  """PTX: a word $4 of the 2-bit plane as `ldmatrix.trans` gives it (a 16-bit slot of
  token A in the low half, of token B in the high half), the thread's byte of the slot
  as a `prmt` selector $5 (0x4420 for the low byte, 0x4431 for the high), the 1-bit
  plane's words $6 (token A) and $7 (token B) holding the slot byte's 4 high bits at bit
  $8, lane offset $9, table base $10 -> 4 f16x2 outputs $0..$3, output k = (value of code
  k of the byte in token A, in token B).

  27 instructions per 8 codes: the bytes of both tokens into one register, the nibbles
  into another, L and H as for keys (with masks: the nibbles carry other codes' bits),
  4 lookups, 4 `prmt`s to regroup by token."""
  lines = ["{", ".reg .b32 X, N, NA, NB, t, u, L, H, a, pA, pB, qA, qB;",
           "prmt.b32 X, $4, 0, $5;",  # byte 0: token A's 4 codes, byte 1: token B's
           "shr.b32 NA, $6, $8;", "shr.b32 NB, $7, $8;",
           "prmt.b32 N, NA, NB, 0x4440;",  # bits 0..3 of byte 0 (A) and byte 1 (B)
           "shl.b32 t, N, 4;", "and.b32 t, t, 0x30303030;",
           "lop3.b32 L, X, t, 0x0F0F0F0F, 0xEC;",  # (a & c) | b
           "shl.b32 u, N, 2;", "and.b32 u, u, 0x30303030;", "shr.b32 X, X, 4;",
           "lop3.b32 H, X, u, 0x0F0F0F0F, 0xEC;"]
  lines += _lookups3([("L", 0), ("L", 1), ("H", 0), ("H", 1)], ["pA", "pB", "qA", "qB"])
  lines += ["prmt.b32 $0, pA, pB, 0x5410;", "prmt.b32 $1, pA, pB, 0x7632;",
            "prmt.b32 $2, qA, qB, 0x5410;", "prmt.b32 $3, qA, qB, 0x7632;", "}"]
  return "\n".join(lines).replace("LANE", "$9").replace("BASE", "$10")


def k_perm3() -> np.ndarray:
  """Column c of a dequantized 3-bit key tile holds coordinate k_perm3()[c]: thread lane
  q (of 4) holds coordinates 32q..32q+31, pair m (output m of `key3_asm`) in column block
  m, columns 8m + 2q + e."""
  m, q, e = np.meshgrid(*(np.arange(n) for n in (16, 4, 2)), indexing="ij")
  perm = np.empty(DIM, np.int64)
  perm[(8 * m + 2 * q + e).ravel()] = (32 * q + 2 * m + e).ravel()
  return perm


def value3_group(warp, l4):
  """The 2-bit byte (4 coordinates) a thread dequantizes for V^T: warps 2c and 2c + 1
  share 16-byte chunk c of a row, lane group l4 its 16-bit slot l4, the even warp the
  slot's low byte and the odd one its high byte."""
  return 16 * (warp // 2) + 2 * l4 + warp % 2


def v_perm3() -> np.ndarray:
  """Row R of the dequantized 3-bit V^T tile holds coordinate v_perm3()[R]: warp w, lane
  group l4 holds rows 64 mg + 16 w + l4 + 8 h, code 2 mg + h of its byte (`value3_group`)."""
  mg, w, l4, h = np.meshgrid(*(np.arange(n) for n in (2, 4, 8, 2)), indexing="ij")
  perm = np.empty(DIM, np.int64)
  perm[(64 * mg + 16 * w + l4 + 8 * h).ravel()] = (
      4 * value3_group(w, l4) + 2 * mg + h).ravel()
  return perm


def k_perm(lookup: str = "prmt", dim: int = DIM) -> np.ndarray:
  """Column c of a dequantized key tile holds coordinate k_perm()[c].

  Thread lane q (of 4) loads words n q..n q + n - 1 of its rows (n = dim / 32 words);
  output j of word i goes to column block 4i + j, columns 8(4i + j) + 2q + e, and holds
  code j + 4e of the word, coordinate 8(n q + i) + j + 4e ("prmt"), or code 2j + e,
  coordinate 8(n q + i) + 2j + e ("smem": byte j's pair)."""
  n = dim // 32
  i, j, q, e = np.meshgrid(*(np.arange(k) for k in (n, 4, 4, 2)), indexing="ij")
  code = j + 4 * e if lookup == "prmt" else 2 * j + e
  perm = np.empty(dim, np.int64)
  perm[(8 * (4 * i + j) + 2 * q + e).ravel()] = (8 * (n * q + i) + code).ravel()
  return perm


def v_perm64() -> np.ndarray:
  """Row R of the dequantized 4-bit V^T tile at 64 coordinates holds coordinate
  v_perm64()[R]: warp w, lane group l4 holds rows 16 w + l4 + 8 h, code h of its byte
  (`value3_group`: the bytes of a 32-byte row, two to a 16-bit slot)."""
  w, l4, h = np.meshgrid(*(np.arange(n) for n in (4, 8, 2)), indexing="ij")
  perm = np.empty(64, np.int64)
  perm[(16 * w + l4 + 8 * h).ravel()] = (2 * value3_group(w, l4) + h).ravel()
  return perm


def v_perm() -> np.ndarray:
  """Row R of the dequantized V^T tile holds coordinate v_perm()[R].

  Warp w, lane group l4 = lane // 4 holds rows 64 mg + 16 w + l4 + 8 h; it reads the
  16-bit slot 8 w + l4 (coordinates 4 slot .. 4 slot + 3), code 2 mg + h of it."""
  mg, w, l4, h = np.meshgrid(*(np.arange(n) for n in (2, 4, 8, 2)), indexing="ij")
  perm = np.empty(DIM, np.int64)
  perm[(64 * mg + 16 * w + l4 + 8 * h).ravel()] = (4 * (8 * w + l4) + 2 * mg + h).ravel()
  return perm


# Each thread: 16 consecutive bytes (one load; 4 words) of the two token rows it holds in
# the wgmma fragment (rows r and r + 8 of its warp's 16), lane q of 4 the bytes 16q ...
def _code_layout(row_bytes: int = ROW_BYTES):
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  rb = row_bytes
  return fa.TiledLayout(fa.Tiling(((64, rb), (16, rb), (8, rb), (rb // 4,))),
                        warp_dims=(-7,), lane_dims=(-3, -2), vector_dim=-1)


def _mlir():
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import arith, llvm, vector
  import jax.experimental.mosaic.gpu as mgpu
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  return ir, arith, llvm, vector, mgpu, fa


def _table_operands(table_ref, offset: int):
  """The last two operands of `smem_word_asm`: this thread's lane offset 4 lane + `offset`
  and the table's shared-memory address."""
  ir, arith, llvm, _, mgpu, _ = _mlir()
  i32 = ir.IntegerType.get_signless(32)
  c = lambda v: mgpu.utils.c(v, i32)
  lane = arith.shli(arith.andi(mgpu.utils.thread_idx(), c(31)), c(2))
  return [arith.addi(lane, c(offset)),
          llvm.ptrtoint(i32, mgpu.utils.memref_ptr(table_ref))]


def _key_tile(asm: str, tokens: int, dim: int = DIM):
  """inline_mgpu body: key codes uint8 [T, dim / 2] in SMEM (and the lookup table, for
  `smem_word_asm`) -> the f16 [T, dim] wgmma A operand. Each thread loads the dim / 32
  words of its two rows (`_code_layout`); output j of word i (4 outputs of f16x2) is
  register column 4 i + j."""
  def body(ctx, codes_ref, *table_ref):
    del ctx
    ir, _, llvm, vector, mgpu, fa = _mlir()
    extra = _table_operands(*table_ref, 0) if table_ref else []
    constraints = "=r,=r,=r,=r,r" + ",r" * len(extra)
    i32 = ir.IntegerType.get_signless(32)
    f16x2 = ir.VectorType.get((2,), ir.F16Type.get())
    words = dim // 32  # a thread's quarter of a row
    codes = fa.FragmentedArray.load_untiled(codes_ref, layout=_code_layout(dim // 2),
                                            is_signed=False, optimized=False)
    regs = np.empty(fa.WGMMA_LAYOUT.registers_shape((tokens, dim)), dtype=object)
    out_ty = llvm.StructType.get_literal([i32] * 4)
    for rt in range(tokens // 64):
      for h in range(2):  # rows r and r + 8
        vec = vector.bitcast(ir.VectorType.get((words,), i32),
                             codes.registers[rt, 0, 0, 0, h, 0, 0, 0, 0])
        for i in range(words):
          w = vector.extract(vec, dynamic_position=[],
                             static_position=ir.DenseI64ArrayAttr.get([i]))
          out = llvm.inline_asm(out_ty, [w, *extra], asm, constraints,
                                has_side_effects=False)
          for j in range(4):
            regs[rt, 4 * i + j, 0, 0, h, 0, 0, 0, 0] = mgpu.utils.bitcast(
                llvm.extractvalue(i32, out, [j]), f16x2)
    return fa.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)
  return body


def _value_tile(asm: str, tokens: int):
  """inline_mgpu body: value codes uint8 [T, 64] in SMEM (tiled (8, 64), 64-byte swizzle;
  and the lookup table, for `smem_word_asm`) -> f16 V^T [128, T] wgmma A operand. One
  `ldmatrix.x4.trans` gives a thread, for 4 tiles J of 8 tokens, the word `asm` takes
  (`word_asm`, or `smem_word_asm` with pairs=False): its 16-bit slot 8 warp + l4
  (coordinates 4 slot .. 4 slot + 3) of tokens 8J + 2q (low half) and 8J + 2q + 1 (high).

  The 8 x 8 b16 matrix of tile J is its 8 token rows x the 16-byte chunk of slots 8 warp ..
  8 warp + 7; lane L gives the row address of row L % 8 of matrix L // 8 (the 64-byte
  swizzle puts chunk c of row r at c ^ (r >> 1)); .trans hands thread (l4, q) column l4,
  rows 2q and 2q + 1."""
  def body(ctx, codes_ref, *table_ref):
    del ctx
    ir, arith, llvm, _, mgpu, fa = _mlir()
    i32 = ir.IntegerType.get_signless(32)
    f16x2 = ir.VectorType.get((2,), ir.F16Type.get())
    c = lambda v: mgpu.utils.c(v, i32)
    extra = _table_operands(*table_ref, 128) if table_ref else []
    constraints = "=r,=r,=r,=r,r" + ",r" * len(extra)
    *_, lane, warp = _thread()
    r = arith.andi(lane, c(7))
    chunk = arith.xori(warp, arith.shrui(r, c(1)))
    offset = arith.addi(arith.addi(arith.muli(arith.shrui(lane, c(3)), c(8 * ROW_BYTES)),
                                   arith.muli(r, c(ROW_BYTES))), arith.shli(chunk, c(4)))
    base = llvm.ptrtoint(i32, mgpu.utils.memref_ptr(codes_ref))
    addr = arith.addi(base, offset)
    load_ty = llvm.StructType.get_literal([i32] * 4)
    load = ("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {$0, $1, $2, $3}, [$4 + "
            "%d];")
    regs = np.empty(fa.WGMMA_LAYOUT.registers_shape((DIM, tokens)), dtype=object)
    out_ty = llvm.StructType.get_literal([i32] * 4)
    for g in range(tokens // 32):  # tiles J = 4g .. 4g + 3, 8 rows of 64 bytes each
      # A load LLVM cannot see: side effects keep it after the pipeline's barrier wait.
      words = llvm.inline_asm(load_ty, [addr], load % (g * 32 * ROW_BYTES),
                              "=r,=r,=r,=r,r", has_side_effects=True)
      for i in range(4):
        J = 4 * g + i
        out = llvm.inline_asm(out_ty, [llvm.extractvalue(i32, words, [i]), *extra], asm,
                              constraints, has_side_effects=False)
        for j in range(4):  # code j = 2 mg + h of the slot
          regs[j // 2, J, 0, 0, j % 2, 0, 0, 0, 0] = mgpu.utils.bitcast(
              llvm.extractvalue(i32, out, [j]), f16x2)
    return fa.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)
  return body


ROW3_BYTES = 48  # a 3-bit token row: 32 bytes of the 2-bit plane, 16 of the 1-bit plane


def _load_asm(count: int, addr, offset: int):
  """`count` (1 or 2) 32-bit words from shared memory at addr + offset, in a load LLVM
  cannot see: side effects keep it after the pipeline's barrier wait."""
  ir, _, llvm, _, _, _ = _mlir()
  i32 = ir.IntegerType.get_signless(32)
  if count == 1:
    return [llvm.inline_asm(i32, [addr], f"ld.shared.b32 $0, [$1 + {offset}];", "=r,r",
                            has_side_effects=True)]
  pair = llvm.inline_asm(llvm.StructType.get_literal([i32] * 2), [addr],
                         f"ld.shared.v2.b32 {{$0, $1}}, [$2 + {offset}];", "=r,=r,r",
                         has_side_effects=True)
  return [llvm.extractvalue(i32, pair, [i]) for i in range(2)]


def _thread():
  """(i32, f16x2, an i32 constant maker, lane, warp of the warpgroup) for a tile body."""
  ir, arith, _, _, mgpu, _ = _mlir()
  i32 = ir.IntegerType.get_signless(32)
  c = lambda v: mgpu.utils.c(v, i32)
  tid = mgpu.utils.thread_idx()
  return (i32, ir.VectorType.get((2,), ir.F16Type.get()), c, arith.andi(tid, c(31)),
          arith.andi(arith.shrui(tid, c(5)), c(3)))


def _key_tile3(tokens: int):
  """inline_mgpu body: 3-bit key codes uint8 [T, 48] and the table (`smem_table3`) in SMEM
  -> the f16 [T, 128] wgmma A operand. Thread lane q (of 4) of row r loads the 2-bit
  plane's bytes 8q..8q+7 and the 1-bit plane's 4q..4q+3 (`key3_asm`'s 3 words); output m
  is register column m (`k_perm3`)."""
  def body(ctx, codes_ref, table_ref):
    del ctx
    _, arith, llvm, _, mgpu, fa = _mlir()
    i32, f16x2, c, lane, warp = _thread()
    q = arith.andi(lane, c(3))
    row = arith.addi(arith.muli(warp, c(16)), arith.shrui(lane, c(2)))  # 16 w + l4
    start = arith.addi(llvm.ptrtoint(i32, mgpu.utils.memref_ptr(codes_ref)),
                       arith.muli(row, c(ROW3_BYTES)))
    low = arith.addi(start, arith.muli(q, c(8)))
    high = arith.addi(start, arith.addi(c(32), arith.muli(q, c(4))))
    extra = _table_operands(table_ref, 0)
    regs = np.empty(fa.WGMMA_LAYOUT.registers_shape((tokens, DIM)), dtype=object)
    out_ty = llvm.StructType.get_literal([i32] * 16)
    constraints = ",".join(["=r"] * 16 + ["r"] * 5)
    for rt in range(tokens // 64):
      for h in range(2):  # rows r and r + 8
        offset = (64 * rt + 8 * h) * ROW3_BYTES
        words = _load_asm(2, low, offset) + _load_asm(1, high, offset)
        out = llvm.inline_asm(out_ty, [*words, *extra], key3_asm(), constraints,
                              has_side_effects=False)
        for m in range(16):
          regs[rt, m, 0, 0, h, 0, 0, 0, 0] = mgpu.utils.bitcast(
              llvm.extractvalue(i32, out, [m]), f16x2)
    return fa.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)
  return body


def _value_tile3(tokens: int):
  """inline_mgpu body: 3-bit value codes uint8 [T, 48] and the table in SMEM -> f16 V^T
  [128, T] wgmma A operand. One `ldmatrix.x4.trans` gives a thread, for 4 tiles J of 8
  tokens, the 16-bit slot l4 of 2-bit chunk warp // 2 of tokens 8J + 2q and 8J + 2q + 1
  (48-byte rows: the 8 rows of a matrix hit distinct banks without a swizzle); it keeps
  the slot's low or high byte (`value3_group`), and loads the word of the 1-bit plane that
  holds that byte's 4 high bits, per token. Output k is register (J, code k = 2 mg + h)."""
  def body(ctx, codes_ref, table_ref):
    del ctx
    _, arith, llvm, _, mgpu, fa = _mlir()
    i32, f16x2, c, lane, warp = _thread()
    l4, q, odd = arith.shrui(lane, c(2)), arith.andi(lane, c(3)), arith.andi(warp, c(1))
    chunk = arith.shrui(warp, c(1))
    group = arith.addi(arith.addi(arith.muli(chunk, c(16)), arith.muli(l4, c(2))), odd)
    one_bit = arith.addi(c(32), arith.shrui(group, c(1)))  # the 1-bit byte of the group
    shift = arith.addi(arith.muli(arith.andi(one_bit, c(3)), c(8)),
                       arith.muli(arith.andi(group, c(1)), c(4)))
    select = arith.addi(c(0x4420), arith.muli(odd, c(0x11)))  # 0x4420 or 0x4431
    base = llvm.ptrtoint(i32, mgpu.utils.memref_ptr(codes_ref))
    rows = arith.addi(base, arith.addi(arith.muli(lane, c(ROW3_BYTES)),
                                       arith.muli(chunk, c(16))))
    bits = arith.addi(base, arith.addi(arith.muli(q, c(2 * ROW3_BYTES)),
                                       arith.andi(one_bit, c(~3))))
    extra = _table_operands(table_ref, 128)
    load_ty = llvm.StructType.get_literal([i32] * 4)
    load = ("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {$0, $1, $2, $3}, [$4 + "
            "%d];")
    regs = np.empty(fa.WGMMA_LAYOUT.registers_shape((DIM, tokens)), dtype=object)
    out_ty = llvm.StructType.get_literal([i32] * 4)
    constraints = "=r,=r,=r,=r" + ",r" * 7
    for g in range(tokens // 32):  # tiles J = 4g .. 4g + 3
      words = llvm.inline_asm(load_ty, [rows], load % (g * 32 * ROW3_BYTES),
                              "=r,=r,=r,=r,r", has_side_effects=True)
      for i in range(4):
        J = 4 * g + i
        high = [_load_asm(1, bits, 8 * J * ROW3_BYTES + e * ROW3_BYTES)[0] for e in range(2)]
        out = llvm.inline_asm(out_ty, [llvm.extractvalue(i32, words, [i]), select, *high,
                                       shift, *extra], value3_asm(), constraints,
                              has_side_effects=False)
        for k in range(4):
          regs[k // 2, J, 0, 0, k % 2, 0, 0, 0, 0] = mgpu.utils.bitcast(
              llvm.extractvalue(i32, out, [k]), f16x2)
    return fa.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)
  return body


# 4-bit codes at 64 coordinates (a 32-byte row), lookup "smem" only: keys as at 128 with 2
# words a thread-row; values one byte (2 coordinates) a thread-token, `value64_asm`.
def value64_asm() -> str:
  """PTX: a word $2 as `ldmatrix.trans` gives it (a 16-bit slot of token A in the low half,
  of token B in the high half), lane offset $3, `prmt` selectors $4 and $5 of the
  thread's byte of the slot in token A and in token B (bits 8..15 of the offset), table
  base $6 -> 2 f16x2 outputs: $0 = (code 0 of the byte in A, in B), $1 = (code 1, code 1).
  Two lookups of byte pairs (`smem_table`) and two `prmt`s to regroup by token: 8
  instructions per 4 codes, as `smem_word_asm` at 128."""
  return "\n".join([
      "{", ".reg .b32 a, pA, pB;",
      "prmt.b32 a, $2, $3, $4;", "add.u32 a, a, $6;", "ld.shared.b32 pA, [a];",
      "prmt.b32 a, $2, $3, $5;", "add.u32 a, a, $6;", "ld.shared.b32 pB, [a];",
      "prmt.b32 $0, pA, pB, 0x5410;", "prmt.b32 $1, pA, pB, 0x7632;", "}"])


def _value_tile64(tokens: int):
  """inline_mgpu body: 4-bit value codes uint8 [T, 32] and the table (`smem_table`) in
  SMEM -> f16 V^T [64, T] wgmma A operand. One `ldmatrix.x4.trans` gives a thread, for 4
  tiles J of 8 tokens, the 16-bit slot l4 of chunk warp // 2 of tokens 8J + 2q and
  8J + 2q + 1 (32-byte rows, no swizzle: rows r and r + 4 of a matrix share banks); it
  keeps the slot's low or high byte by warp parity (`value3_group`). Output h is register
  (J, h), code h of that byte (`v_perm64`)."""
  def body(ctx, codes_ref, table_ref):
    del ctx
    _, arith, llvm, _, mgpu, fa = _mlir()
    i32, f16x2, c, lane, warp = _thread()
    odd, chunk = arith.andi(warp, c(1)), arith.shrui(warp, c(1))
    # The byte into bits 8..15 of the lane offset: byte odd (token A) or 2 + odd (B).
    sel_a = arith.addi(c(0x5504), arith.muli(odd, c(0x10)))
    sel_b = arith.addi(c(0x5524), arith.muli(odd, c(0x10)))
    base = llvm.ptrtoint(i32, mgpu.utils.memref_ptr(codes_ref))
    rows = arith.addi(base, arith.addi(arith.muli(lane, c(32)), arith.muli(chunk, c(16))))
    lane_offset, table = _table_operands(table_ref, 128)
    load_ty = llvm.StructType.get_literal([i32] * 4)
    load = ("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {$0, $1, $2, $3}, [$4 + "
            "%d];")
    regs = np.empty(fa.WGMMA_LAYOUT.registers_shape((64, tokens)), dtype=object)
    out_ty = llvm.StructType.get_literal([i32] * 2)
    for g in range(tokens // 32):  # tiles J = 4g .. 4g + 3
      words = llvm.inline_asm(load_ty, [rows], load % (g * 32 * 32), "=r,=r,=r,=r,r",
                              has_side_effects=True)
      for i in range(4):
        out = llvm.inline_asm(out_ty, [llvm.extractvalue(i32, words, [i]), lane_offset,
                                       sel_a, sel_b, table], value64_asm(),
                              "=r,=r,r,r,r,r,r", has_side_effects=False)
        for h in range(2):
          regs[0, 4 * g + i, 0, 0, h, 0, 0, 0, 0] = mgpu.utils.bitcast(
              llvm.extractvalue(i32, out, [h]), f16x2)
    return fa.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)
  return body


def split_window(split, split_len: int, S: int):
  """(first, read): split `split` owns tokens [first, min(first + split_len, S)) and reads
  the window [read, read + split_len), which stays inside S: the last split's moves back
  and its tokens before `first` (the split before's) are masked."""
  first = split * split_len
  return first, jnp.minimum(first, S - split_len)


@functools.lru_cache(maxsize=None)
def _build(B: int, K: int, S: int, rows: int, step: int, splits: int, stages: int,
           start: int, layer: int | None, k_centroids: tuple[float, ...],
           v_centroids: tuple[float, ...], lookup: str, dim: int = DIM):
  split_len = -(-S // step // splits) * step  # tokens per split; the last may hold fewer
  smem = lookup == "smem"
  three = len(k_centroids) == 8  # 3-bit codes (`key3_asm`, `value3_asm`), "smem" only
  row_bytes, table_rows = (ROW3_BYTES, TABLE3_ROWS) if three else (dim // 2, 256)
  if three:
    key_tile, value_tile = _key_tile3(step), _value_tile3(step)
  elif dim != DIM:  # 64 coordinates, "smem" only
    key_tile, value_tile = _key_tile(smem_word_asm(pairs=True), step, dim), _value_tile64(step)
  elif smem:
    key_tile, value_tile = (_key_tile(smem_word_asm(pairs=True), step),
                            _value_tile(smem_word_asm(pairs=False), step))
  else:
    key_tile = _key_tile(word_asm(*tables(k_centroids)), step)
    value_tile = _value_tile(word_asm(*tables(v_centroids)), step)
  # 4-bit value codes in (8, 64) tiles with a 64-byte swizzle for `ldmatrix`; 48-byte rows
  # hit distinct banks as they are.
  v_transforms = (() if three or dim != DIM else
                  (plgpu.TilingTransform((8, ROW_BYTES)), plgpu.SwizzleTransform(64)))
  N, T = rows, step

  def kernel(*refs):
    if smem:  # the table: an input after the query, a scratch buffer after the barrier
      (ends_gmem, kc_gmem, vc_gmem, kn_gmem, vn_gmem, q_gmem, table_gmem, o_gmem, ml_gmem,
       ends_smem, q_smem, p_smem, o_smem, ml_smem, bar, table_smem) = refs
      tables_ = (table_smem,)
    else:
      (ends_gmem, kc_gmem, vc_gmem, kn_gmem, vn_gmem, q_gmem, o_gmem, ml_gmem,
       ends_smem, q_smem, p_smem, o_smem, ml_smem, bar) = refs
      tables_ = ()
    b, k, split = lax.axis_index("b"), lax.axis_index("k"), lax.axis_index("split")
    plgpu.copy_gmem_to_smem(ends_gmem.at[b], ends_smem, bar.at[0])
    plgpu.copy_gmem_to_smem(q_gmem.at[b, k], q_smem, bar.at[0])
    if smem:
      plgpu.copy_gmem_to_smem(table_gmem, table_smem, bar.at[0])
    plgpu.barrier_wait(bar.at[0])
    end = ends_smem[0]
    first, read = split_window(split, split_len, S)
    lower, stop = jnp.maximum(first, start), jnp.minimum(first + split_len, end)

    def step_fn(indices, kc_smem, vc_smem, kn_smem, vn_smem, carry):
      acc, m, l = carry
      keys = plgpu.inline_mgpu(
          arg_types=(plgpu.RefType(),) * (1 + smem),
          return_type=plgpu.ShapeDtypeStruct((T, dim), jnp.float16, layout=plgpu.Layout.WGMMA),
      )(key_tile)(kc_smem, *tables_)

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, keys, q_smem.T)
        return acc_ref[...]
      s = pl.run_scoped(qk, plgpu.ACC((T, N), jnp.float32))
      per_token = lambda ref: lax.broadcast_in_dim(plgpu.load(
          ref, (), layout=plgpu.Layout.WGMMA.reduce(1)).astype(jnp.float32), (T, N), [0])
      first_pos = read + indices[0] * T

      def valid():
        pos = first_pos + plgpu.broadcasted_iota(jnp.int32, (T, N), 0,
                                                 layout=plgpu.Layout.WGMMA)
        return (pos >= lower) & (pos < stop)
      # Steps wholly inside [lower, stop) skip the mask (1-3% at the e2e layer and 64K).
      inside = (first_pos >= lower) & (first_pos + T <= stop)
      masked = lambda x, fill: lax.cond(inside, lambda x: x,
                                        lambda x: jnp.where(valid(), x, fill), x)
      s = masked(s * per_token(kn_smem), -jnp.inf)
      m_next = jnp.maximum(m, s.max(axis=0))
      m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
      corr = jnp.exp(m - m_safe)
      p = jnp.exp(s - lax.broadcast_in_dim(m_safe, (T, N), [1]))
      l = l * lax.broadcast_in_dim(corr, (T, N), [1]) + p
      # Scales past the length may be garbage (inf/nan): select, do not multiply by 0.
      pn = masked(p * per_token(vn_smem), 0.0).astype(jnp.float16)
      p_smem.T[...] = plgpu.layout_cast(pn, plgpu.Layout.WGMMA_TRANSPOSED)
      plgpu.commit_smem()
      values = plgpu.inline_mgpu(
          arg_types=(plgpu.RefType(transforms=v_transforms),) + (plgpu.RefType(),) * smem,
          return_type=plgpu.ShapeDtypeStruct((dim, T), jnp.float16, layout=plgpu.Layout.WGMMA),
      )(value_tile)(vc_smem, *tables_)
      acc = acc * lax.broadcast_in_dim(corr, (dim, N), [1])

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, values, p_smem.T)
      return pl.run_state(pv)(plgpu.ACC.init(acc)), m_next, l

    def write(acc, m, l):
      o_smem[...] = acc
      ml_smem.at[0][...] = m
      ml_smem.at[1][...] = l
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[b, k, split])
      plgpu.copy_smem_to_gmem(ml_smem, ml_gmem.at[b, k, split])
      plgpu.wait_smem_to_gmem(0)

    at = lambda ref: ref.at[b, k] if layer is None else ref.at[layer, b, k]
    tokens = pl.ds(read, split_len)
    lay = plgpu.Layout.WGMMA

    @pl.when((first < end) & (first + split_len > start))
    def _():
      init = (plgpu.layout_cast(jnp.full((dim, N), 0.0, jnp.float32), lay),
              plgpu.layout_cast(jnp.full((N,), -jnp.inf, jnp.float32), lay.reduce(0)),
              plgpu.layout_cast(jnp.full((T, N), 0.0, jnp.float32), lay))
      pipe = plgpu.emit_pipeline(
          step_fn, grid=(split_len // T,), max_concurrent_steps=stages,
          in_specs=[plgpu.BlockSpec((T, row_bytes), lambda i: (i, 0)),
                    plgpu.BlockSpec((T, row_bytes), lambda i: (i, 0), transforms=v_transforms),
                    plgpu.BlockSpec((T,), lambda i: (i,)),
                    plgpu.BlockSpec((T,), lambda i: (i,))],
          init_carry=init)
      acc, m, l = pipe(at(kc_gmem).at[tokens], at(vc_gmem).at[tokens],
                       at(kn_gmem).at[tokens], at(vn_gmem).at[tokens])
      write(acc, m, l.sum(axis=0))

    @pl.when((first >= end) | (first + split_len <= start))
    def _():
      write(plgpu.layout_cast(jnp.full((dim, N), 0.0, jnp.float32), lay),
            plgpu.layout_cast(jnp.full((N,), -jnp.inf, jnp.float32), lay.reduce(0)),
            plgpu.layout_cast(jnp.full((N,), 0.0, jnp.float32), lay.reduce(0)))

  swizzle = lambda nbytes: (plgpu.TilingTransform((8, nbytes // 2)),
                            plgpu.SwizzleTransform(nbytes))
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((B, K, splits, dim, N), jnp.float32),
                jax.ShapeDtypeStruct((B, K, splits, 2, N), jnp.float32)),
      grid=(B, K, splits), grid_names=("b", "k", "split"),
      scratch_types=[
          plgpu.SMEM((32,), jnp.int32),  # a 128-byte row: TMA copies whole warpgroup multiples
          plgpu.SMEM((N, dim), jnp.float16, transforms=swizzle(128)),
          plgpu.SMEM((N, T), jnp.float16, transforms=swizzle(min(128, 2 * T))),
          plgpu.SMEM((dim, N), jnp.float32),
          plgpu.SMEM((2, N), jnp.float32),
          plgpu.Barrier(num_arrivals=2 + smem, num_barriers=1),
      ] + [plgpu.SMEM((table_rows, TABLE_WORDS), jnp.uint32)] * smem,
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
  )


def default_tiling(B: int, K: int, S: int, lookup: str,
                   programs: int | None = None) -> tuple[int, int, int]:
  """(step, splits, stages) from `tuned_block_sizes.MOSAIC_DECODE` for the lookup ("prmt",
  "smem", or "smem3" for the 3-bit kernel's, "smem64" for the 4-bit one at 64
  coordinates, "smem64x16" there with 16 query rows): the tuned step (halved, down to 64,
  until it divides S), the most splits that keep B * K * splits within the tuned number
  of programs (or `programs`; at least 1 split, and at least the tuned `min_steps` steps
  each: one-step splits pay a pipeline's start for one step), then evened out into whole
  steps, none empty."""
  from pallas_kernels import tuned_block_sizes
  cfg = tuned_block_sizes.mosaic_decode_config(lookup)
  step = cfg.step
  while S % step and step > 64:
    step //= 2
  steps = S // step
  splits = max(1, min((programs or cfg.target_programs) // (B * K), steps // cfg.min_steps))
  return step, whole_splits(steps, splits), cfg.num_stages


def whole_splits(steps: int, splits: int) -> int:
  """`splits` evened out into splits of whole steps, none empty (7 of 8 steps: 4 of 2)."""
  return -(-steps // -(-steps // splits))


def decode_mosaic(qk, k_codes, k_scales, k_centroids, v_codes, v_scales, v_centroids,
                  lengths, *, start: int = 0, layer: int | None = None,
                  step: int | None = None, num_splits: int | None = None,
                  num_stages: int | None = None, lookup: str | None = None,
                  programs: int | None = None):
  """`pallas_kernels.decode.decode` by the Mosaic GPU kernel; the arguments are checked
  there (this takes what that function passes, see its docstring). Returns a `Partial`.

  lookup: "prmt" (`word_asm`: byte permutes on tables in the PTX) or "smem" (`smem_word_asm`:
  loads from a 64 KB table in shared memory); None: `default_lookup`. 3-bit codes (k3v3)
  take "smem" only (`key3_asm`, `value3_asm`). programs: the programs the splits aim at
  instead of the tuned number (`default_tiling`; an explicit num_splits wins).
  """
  from pallas_kernels.decode import Partial, _merge_weights

  (q,), (kc,), (kn,), (vc,), (vn,) = qk, k_codes, k_scales, v_codes, v_scales
  ck, cv = (tuple(float(x) for x in np.asarray(c, np.float32)) for c in (k_centroids[0],
                                                                         v_centroids[0]))
  B, K, G, dim = q.shape
  S = kc.shape[-2]
  three = len(ck) == 8
  if dim != DIM and (three or lookup not in (None, "smem")):
    raise ValueError(f'mosaic decode: {dim} coordinates take 4-bit codes and lookup "smem", '
                     f"got {len(ck)} centroids and lookup {lookup!r}")
  if dim != DIM:
    lookup = "smem"
  if lookup is None:
    from pallas_kernels.decode import symmetric_codebook
    lookup = "smem" if three else default_lookup(G, symmetric_codebook(ck)
                                                 and symmetric_codebook(cv))
  if lookup not in LOOKUPS:
    raise ValueError(f"mosaic decode: lookup must be one of {LOOKUPS}, got {lookup!r}")
  if three and lookup != "smem":
    raise ValueError(f'mosaic decode: 3-bit codes take lookup "smem", got {lookup!r}')
  tiling = ("smem3" if three else lookup if dim == DIM else "smem64" if G <= 8 else
            "smem64x16")
  if programs is not None and (isinstance(programs, bool) or not isinstance(programs, int)
                               or programs < 1):
    raise ValueError(f"mosaic decode: programs must be a positive int or None, got {programs!r}")
  auto = default_tiling(B, K, S, tiling, programs)
  step, num_splits, num_stages = step or auto[0], num_splits or auto[1], num_stages or auto[2]
  if num_stages < 1:
    raise ValueError(f"mosaic decode: num_stages must be >= 1, got {num_stages}")
  # 256-token steps at 64 coordinates: the registers of a 128-token step at 128.
  steps_ok = (64, 128) if dim == DIM else (64, 128, 256)
  if step not in steps_ok or S % step or S == 0:
    raise ValueError(f"mosaic decode: step must be one of {steps_ok} at {dim} coordinates "
                     f"and divide S = {S} (> 0), got {step}")
  if not 1 <= num_splits <= S // step:
    raise ValueError(f"mosaic decode: num_splits must be in [1, S / step = {S // step}], "
                     f"got {num_splits}")
  num_splits = whole_splits(S // step, num_splits)
  rows = 8 if G <= 8 else 16
  ends = jnp.zeros((B, 32), jnp.int32).at[:, 0].set(jnp.clip(lengths, 0, S).astype(jnp.int32))
  pad = ((0, 0), (0, 0), (0, rows - G), (0, 0))
  qp = jnp.pad(q[..., k_perm3() if three else k_perm(lookup, dim)].astype(jnp.float16), pad)
  kernel = _build(B, K, S, rows, step, num_splits, num_stages, start, layer, ck, cv, lookup,
                  dim)
  table = ((jnp.asarray((smem_table3 if three else smem_table)(ck, cv)),)
           if lookup == "smem" else ())
  # The cache's uint8 codes as they are (the kernel reads 4 bytes as a word itself; a
  # bitcast out here could make XLA copy the whole stacked array).
  o, ml = kernel(ends, kc, vc, kn, vn, qp, *table)  # o [B, K, splits, 128 (v_perm rows), rows]
  m, w = _merge_weights(ml[:, :, :, 0], axis=2)  # [B, K, rows], [B, K, splits, rows]
  l = jnp.sum(w * ml[:, :, :, 1], axis=2)
  # A plain float32 sum (an einsum may take TF32 on the GPU).
  acc = jnp.sum(o * w[:, :, :, None, :], axis=2)  # [B, K, 128, rows]
  rows_perm = v_perm3() if three else v_perm() if dim == DIM else v_perm64()
  acc = jnp.swapaxes(acc, -1, -2)[..., :G, :][..., np.argsort(rows_perm)]
  return Partial(m[..., :G], l[..., :G], (acc,))
