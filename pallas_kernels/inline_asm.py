"""Inline PTX with several results inside a Triton-lowered Pallas kernel.

`jax.experimental.pallas.triton.elementwise_inline_asm` lowers one result only (its rule
returns the op, not the op's results, in jax 0.10 and 0.11), while a lookup that turns one
word of packed codes into several float16 pairs needs one asm block with several outputs:
this primitive lowers to the same Triton op (`tt.elementwise_inline_asm`) and returns
every result. Off the GPU it has no implementation: callers take a jnp path in interpret
mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax._src import core as jax_core
from jax._src.lib.triton import dialect as tt_dialect
from jax._src.pallas.triton import lowering
from jax.interpreters import mlir

multi_output_asm_p = jax_core.Primitive("tq_multi_output_asm")
multi_output_asm_p.multiple_results = True


@multi_output_asm_p.def_abstract_eval
def _abstract_eval(*avals, result_shape_dtypes, **_):
  shapes = {a.shape for a in avals}
  if len(shapes) != 1 or any(r.shape not in shapes for r in result_shape_dtypes):
    raise ValueError(f"multi_output_asm: arguments and results must share one shape, got "
                     f"arguments {[a.shape for a in avals]} and results "
                     f"{[r.shape for r in result_shape_dtypes]}")
  return [jax_core.ShapedArray(r.shape, r.dtype) for r in result_shape_dtypes]


def _ir_type(ctx, aval):
  try:  # jax 0.10: (module context, aval); later versions: (aval)
    return mlir.aval_to_ir_type(ctx.context.mlir_ctx, aval)
  except TypeError:
    return mlir.aval_to_ir_type(aval)


@lowering.register_lowering(multi_output_asm_p)
def _lowering(ctx, *args, asm, constraints, pack, result_shape_dtypes):
  del result_shape_dtypes  # the avals carry them
  op = tt_dialect.ElementwiseInlineAsmOp(
      [_ir_type(ctx, aval) for aval in ctx.avals_out], asm, constraints=constraints,
      pure=True, packed_element=pack, args=list(args))
  return list(op.results)


def multi_output_asm(asm: str, *, args: Sequence[jax.Array], constraints: str, pack: int,
                     result_shape_dtypes: Sequence[jax.ShapeDtypeStruct]) -> list[jax.Array]:
  """Elementwise inline PTX with any number of results (each of the arguments' shape).

  `pack` elements of every argument go to one instance of `asm`; sub-32-bit elements are
  packed into 32-bit registers (e.g. float16 results with pack = 2: one "=r" each).
  """
  if not result_shape_dtypes:
    raise ValueError("multi_output_asm needs at least one result")
  return multi_output_asm_p.bind(*args, asm=asm, constraints=constraints, pack=pack,
                                 result_shape_dtypes=tuple(result_shape_dtypes))
