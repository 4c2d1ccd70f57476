"""Tuned tiling of the Pallas kernels, as data keyed by device kind.

Key schema of ``DECODE``: ``(device_kind, head_dim, key_bits, value_bits)`` where
``device_kind`` is ``jax.devices()[0].device_kind`` (e.g. ``"NVIDIA H200"``),
``head_dim`` the sum of the key segments' dims, and ``key_bits`` / ``value_bits`` the
tuples of the segments' bit widths (``(4,)`` for 4-bit mse, ``(3, 1)`` for 4-bit prod,
``(3, 2)`` for the 32@3 + 96@2 split). Value: :class:`DecodeConfig`. A missing key
falls back to ``(device_kind, "*", key_bits, value_bits)``, then to
``(device_kind, "*", "*", "*")`` and then to ``DEFAULT``; this is a lookup of tiling
data, not of implementations. The configs are for one query group (up to 16 query rows);
the kernel adds warps for more rows (a chunk of query tokens).

``MOSAIC_DECODE`` (the Mosaic GPU kernel, k4v4 and k3v3) has the key ``(device_kind,
lookup)`` (lookup "prmt" or "smem", or "smem3" for the 3-bit kernel, "smem64" for the
4-bit one at 64 coordinates, "smem64x16" there with 16 query rows) and the value
:class:`MosaicDecodeConfig`; another device gets ``MOSAIC_DEFAULT[lookup]``.

``ENCODE`` has the key ``(device_kind, head_dim)`` and the value :class:`EncodeConfig`.

Numbers come from ``bench/kernels.py --tune`` on the named device.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  block_s: int  # tokens per tile (power of two)
  num_warps: int
  num_stages: int
  target_programs: int  # split S until batch * kv_heads * splits reaches this
  orient: str = "rows"  # "rows": query rows are the dot's M; "tokens": tokens are M


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
  block_n: int  # tokens per block (power of two)
  num_warps: int
  num_stages: int
  steps: int = 1  # blocks per program


@dataclasses.dataclass(frozen=True)
class MosaicDecodeConfig:
  step: int  # tokens per pipeline step (64 or 128: the wgmma M; 256 at 64 coordinates)
  num_stages: int
  target_programs: int  # batch * kv_heads * splits nearest this (`decode_mosaic.default_tiling`)
  min_steps: int = 2  # steps a split at least (one-step splits pay a pipeline start a step)


DEFAULT = DecodeConfig(block_s=64, num_warps=4, num_stages=2, target_programs=528)
ENCODE_DEFAULT = EncodeConfig(block_n=64, num_warps=4, num_stages=2)

DECODE: dict[tuple, DecodeConfig] = {
    # bench/kernels.py --sweep --quick (B = 8 and 1, Hq = 32, Hkv = 8, D = 128, S = 64K),
    # session 4, the byte-permute lookups: one warp and 32 tokens per program beat the
    # session-2 tiling (64 tokens, 4 warps, 2 stages) for every width: 3 bits 438 us at
    # B = 8 (64/4/2: 489), 57 us at B = 1 (70); 2 bits 410 us (455), 55 us (65); 2 stages.
    # Query rows are the dot's M ("tokens" as M: 1.05-1.2x slower); 16 splits per (row,
    # head) at B = 8 (32: within noise).
    ("NVIDIA H200", "*", "*", "*"): DecodeConfig(
        block_s=32, num_warps=1, num_stages=2, target_programs=1024, orient="rows"),
    # 4 bits ("nibbles" layout): 32 tokens, one warp, 3 stages: 404 us at B = 8 (2 stages
    # 420-448 over three runs, 2 warps 3 stages 441, 64 tokens 1 warp 589, joined layout at
    # 64/4/2 514), 68-70 us at B = 1 for every tiling tried.
    ("NVIDIA H200", "*", (4,), (4,)): DecodeConfig(
        block_s=32, num_warps=1, num_stages=3, target_programs=1024, orient="rows"),
    # 5-bit keys (the "nibbles" lut with the high bits gathered), 3-bit values: 3 stages
    # 537-549 us at B = 8 (2 stages 563-570), 73-78 us at B = 1 either way (session 7,
    # `bench/kernels.py --sweep --quick --presets k5v3`; 2 warps, 64 or 16 tokens slower).
    ("NVIDIA H200", "*", (5,), (3,)): DecodeConfig(
        block_s=32, num_warps=1, num_stages=3, target_programs=1024, orient="rows"),
}

ENCODE: dict[tuple, EncodeConfig] = {}

# The "smem" lookup: one wave of its 2 programs an SM on 132 SMs (session 16, below).
_SMEM_ONE_WAVE = MosaicDecodeConfig(step=128, num_stages=2, target_programs=264)
# The 3-bit kernel ("smem3": its 16 KB table; 146 registers and 55 KB of shared memory a
# program leave room for 3 an SM): one wave of 3 an SM, 396 on 132 SMs (session 17, below).
_SMEM3_ONE_WAVE = MosaicDecodeConfig(step=128, num_stages=2, target_programs=396)
# The 4-bit kernel at 64 coordinates ("smem64"), session 19, H100. `bench/kernels.py --sweep
# --dims 64 --presets k4v4 --implementations mosaic`, S = 64K, us: B = 8 8 splits (512
# programs) 3 stages 171.8 (2 stages 179.2), 16 172.6/177.4, 32 175.7/175.5, 4 (the "smem"
# wave of 264) 202.9 in the grid before; 64-token steps 214-240. B = 1 64 splits (512)
# 32.0/32.4 (2/3 stages), 128 35.5/35.9, 256 42.4/44.1. `bench/ab_mosaic.py --head-dim 64
# --shapes "16K B1,128K B1,16K B8,128K B8"`, programs (stages) 128 (3) | 264 (2) | 512 (3)
# | 1024 (3), two rounds: 16K B = 1 16.4/16.8 | 11.6/13.0 | 14.6/15.5 | 16.3/14.8 (32 splits
# of 4 steps best: hence 4 steps a split at least); 128K B = 1 69.8/68.3 | 56.5/53.7 |
# 51.2/50.8 | 53.3/52.8; 16K B = 8 69.2/68.8 | 55.2/58.1 | 52.2/52.3 | 56.8/55.3; 128K
# B = 8 484.8/487.5 | 398.3/387.6 | 332.4/329.4 | 327.8/323.1. A step holds half the bytes
# of one at 128 for the same softmax, barriers and table copy: two waves of 2 programs an
# SM hide more of them than one. Session 21, H100, 256-token steps (a step's registers as
# at 128 coordinates; 2 stages), `bench/ab_mosaic.py --head-dim 64 --baselines --shapes
# "16K B1,64K B1,128K B1,64K B8"`, us, two rounds, 128-token steps (this tiling before) |
# 256-token steps with one wave (264 programs) | with 512: 16K B = 1 16.9/13.4 | 12.6/14.2
# | 30.7/16.1; 64K B = 1 32.9/32.8 | 29.7/28.2 | 32.2/30.7; 128K B = 1 54.8/55.2 |
# 45.8/44.6 | 49.9/60.8; 64K B = 8 177.2/174.5 | 146.2 | 141.1 (one round; the call's
# time ran out). One wave of 2-step splits at least, as at 128 coordinates.
_SMEM64 = MosaicDecodeConfig(step=256, num_stages=2, target_programs=264)
# 16 query rows (a group of 9-16) at 64 coordinates ("smem64x16"): 256-token steps were
# measured with 8 rows only, so the tiling of sessions 19-20 (whose GPU tests took groups
# of 12): 128-token steps, 3 stages, two waves, 4 steps a split at least.
_SMEM64X16 = MosaicDecodeConfig(step=128, num_stages=3, target_programs=512, min_steps=4)
MOSAIC_DEFAULT = {"prmt": MosaicDecodeConfig(step=128, num_stages=2, target_programs=1024),
                  "smem": _SMEM_ONE_WAVE, "smem3": _SMEM3_ONE_WAVE, "smem64": _SMEM64,
                  "smem64x16": _SMEM64X16}
MOSAIC_DECODE: dict[tuple[str, str], MosaicDecodeConfig] = {
    # Session 10 took 4 warpgroups an SM (528 programs a wave on the H200's 132 SMs); Nsight
    # Compute (session 11) shows 3 fit (168 registers, 47 KB of shared memory a block), so
    # 1056 programs are 2.67 waves of 396: whole waves (B = 8, Hkv = 4: 12, 24 or 37
    # splits; `bench/kernels.py --layer-sweep` times them) are not yet measured with the
    # steadier timer. 1056 measured best at the e2e layer (session 10, timed as
    # `bench/kernels.py --layer-sweep` does, B = 8, Hkv = 4, G = 7, 33,024 slots, 32,768
    # valid; one call): 33 splits (1056 programs) 73.0 us, 16 (512) 76.3, 29 (928) 92.7,
    # 43 (1376) 91.2, 65 (2080) 93.6;
    # 64-token steps 88-106 us, 3 stages 102.8. At S = 64K, Hkv = 8 (`bench/kernels.py
    # --sweep --quick --presets k4v4 --implementations mosaic`): B = 8 16 splits 284.6 us,
    # 32 276.6, 8 302.1; B = 1 128 splits 46.3 us, 64 60.2, 256 69.8 (one-step splits).
    ("NVIDIA H200", "prmt"): MosaicDecodeConfig(step=128, num_stages=2, target_programs=1056),
    # Session 13, the H100 (132 SMs too), `bench/h200.py --jobs kernels --layer-sweep`, the
    # e2e layer at B = 8: 29 splits (MOSAIC_DEFAULT's 1024 programs) 85.4 us, 33 (1056)
    # 78.3, 37 (1184: 3 whole waves) 77.4, 24 80.3, 12 81.3; B = 1: 129 splits 15.9-16.2,
    # 99 18.0, 64 18.1. The whole-wave 37 is within 1% of 33: the H200's target.
    # Session 15, the "smem" lookup (2 programs an SM; `--layer-sweep`, one call): B = 8
    # 33 splits 70.0 us (73.9 as the default's, the same 33), 16 68.0, 24 72.5, 37 75.6,
    # 12 80.3; B = 1 129 splits 19.7, 64 15.5, 99 17.7 (the default 16.4): within the
    # spread of one call (~5%), so the target stays until a call of several rounds.
    ("NVIDIA H100 80GB HBM3", "prmt"): MosaicDecodeConfig(step=128, num_stages=2,
                                                          target_programs=1056),
    # The "smem" lookup: one wave of 2 programs an SM (264 on 132 SMs) beat more waves
    # everywhere (session 16, H100, explicit splits, us, round 0/1 where both ran): e2e
    # layer B = 8 8 splits 64.3 against 16 68.5 and 33 (the old default) 70.5; B = 1 66
    # splits 14.8/14.2 against 129 16.6/15.4; S = 64K, 8 heads, B = 8 4 splits
    # 206.6/207.9 against 8 211.6/209.8 and 16 215.2/213.7; B = 1 33 splits 36.5
    # against 66 41.3 and 132 45.2. Every program pays the table's 64 KB copy and a
    # pipeline start, and whole waves leave no tail. The H200 has 132 SMs too; not yet
    # measured there.
    ("NVIDIA H200", "smem"): _SMEM_ONE_WAVE,
    ("NVIDIA H100 80GB HBM3", "smem"): _SMEM_ONE_WAVE,
    # k3v3 (session 17, H100, `bench/ab_mosaic.py --preset k3v3`, programs 264 | 396 |
    # 528, us, two rounds): e2e layer B = 8 82.7/81.9 | 74.0/74.1 | 79.0/77.9, B = 1
    # 17.2/16.9 | 16.9/17.0 | 15.2/15.5; 64K B = 8 281.4/281.8 | 253.0/251.8 |
    # 263.3/260.0, B = 1 44.4/44.2 | 42.7/42.0 | 42.9/42.2. Nsight Compute at 264 (64K
    # B = 8): 2 of the 3 programs an SM that fit, issue slots 51% busy.
    ("NVIDIA H200", "smem3"): _SMEM3_ONE_WAVE,
    ("NVIDIA H100 80GB HBM3", "smem3"): _SMEM3_ONE_WAVE,
}


def _device_kind() -> str:
  try:
    return jax.devices()[0].device_kind
  except RuntimeError:
    return "cpu"


def decode_config(*, batch: int, kv_heads: int, seq_len: int, head_dim: int,
                  key_bits: tuple[int, ...], value_bits: tuple[int, ...]) -> DecodeConfig:
  del batch, kv_heads, seq_len  # The table is not (yet) keyed by them.
  kind = _device_kind()
  key_bits, value_bits = tuple(key_bits), tuple(value_bits)
  for key in ((kind, head_dim, key_bits, value_bits), (kind, "*", key_bits, value_bits),
              (kind, "*", "*", "*")):
    if key in DECODE:
      return DECODE[key]
  return DEFAULT


def mosaic_decode_config(lookup: str) -> MosaicDecodeConfig:
  return MOSAIC_DECODE.get((_device_kind(), lookup), MOSAIC_DEFAULT[lookup])


def encode_config(*, head_dim: int) -> EncodeConfig:
  kind = _device_kind()
  for key in ((kind, head_dim), (kind, "*")):
    if key in ENCODE:
      return ENCODE[key]
  return ENCODE_DEFAULT


def num_splits(programs: int, blocks: int, target_programs: int) -> int:
  """Splits of S per (row, head) so that programs * splits >= target_programs."""
  want = -(-target_programs // max(programs, 1))
  return max(1, min(want, blocks))
