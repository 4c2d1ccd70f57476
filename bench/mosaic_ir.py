"""The Mosaic GPU decode kernel's module as text, without debug info, lowered for CUDA on
any machine (no GPU needed): to show that a change leaves the kernel as it was.

    PYTHONPATH=. python bench/mosaic_ir.py --out /tmp/new.mlir
    (cd OTHER_TREE && PYTHONPATH=. python bench/mosaic_ir.py --out /tmp/old.mlir)
    cmp /tmp/old.mlir /tmp/new.mlir

The call is `decode_mosaic.decode_mosaic(..., start=3)` at B = 2, Hkv = 4, G = 7,
S = 1024, k4v4 (or --preset k3v3; random codes); --kwargs adds keyword arguments (a
Python dict literal). The module sits bytecode-encoded in the custom call's backend
config; its source locations change with any edit of the file, so they are left out.
"""

from __future__ import annotations

import argparse
import ast

import jax
from jax._src.lib.mlir import ir
from jax.interpreters import mlir

from bench import kernels as bk
from pallas_kernels import decode_mosaic as dm


def kernel_modules(lowered) -> list[str]:
  """The text of every Mosaic GPU module in a lowered computation."""
  found = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for inner in block.operations:
          if (inner.operation.name == "stablehlo.custom_call"
              and "mhlo.backend_config" in inner.attributes):
            config = ir.DictAttr(inner.attributes["mhlo.backend_config"])
            if "module" in config:
              found.append(ir.StringAttr(config["module"]).value_bytes)
          walk(inner.operation)

  walk(lowered.compiler_ir("stablehlo").operation)
  texts = []
  with mlir.make_ir_context() as ctx:
    ctx.allow_unregistered_dialects = True  # stable_mosaic_gpu: kept as generic ops
    for blob in found:
      texts.append(ir.Module.parse(blob).operation.get_asm(enable_debug_info=False))
  return texts


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--kwargs", default="{}", help="extra keyword arguments, a dict literal")
  ap.add_argument("--preset", default="k4v4", choices=("k4v4", "k3v3"))
  args = ap.parse_args(argv)
  kwargs = ast.literal_eval(args.kwargs)
  if not isinstance(kwargs, dict):
    raise SystemExit(f"--kwargs must be a dict literal, got {args.kwargs!r}")
  keys, values = bk.presets(128)[args.preset]
  qk, kc, kn, kcb, vc, vn, vcb, lengths = bk.make_inputs(
      jax.random.key(0), 2, 1024, keys, values, rows=7, kv_heads=4)
  fn = lambda qk, kc, kn, vc, vn, lengths: dm.decode_mosaic(
      qk, kc, kn, kcb, vc, vn, vcb, lengths, start=3, **kwargs)
  lowered = jax.jit(fn).trace(qk, kc, kn, vc, vn, lengths).lower(
      lowering_platforms=("cuda",))
  texts = kernel_modules(lowered)
  if not texts:
    raise SystemExit("no Mosaic GPU module in the lowered computation")
  with open(args.out, "w") as f:
    f.write("\n".join(texts))
  print(f"{len(texts)} module(s), {sum(map(len, texts))} characters -> {args.out}")


if __name__ == "__main__":
  main()
