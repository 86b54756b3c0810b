"""The "qfx" torch.compile backend, registered on `import qfx`.

    fast = torch.compile(qmodel, backend="qfx")

Steps on the Dynamo graph: count the qfx ops it holds, then hand the graph to Inductor with
the qfx ops' reference implementations as decompositions, so Inductor sees plain aten math
(unpack, dequantize, matmul) and fuses it like any other code. Options (passed as
`torch.compile(..., options={...})`): `decompose` (default True) keeps or drops that step;
the rest go to Inductor as config patches.
"""

from __future__ import annotations

import torch
from torch._dynamo import register_backend
from torch.fx import GraphModule

from qfx.ops import quantized_linear_ref

QFX_OPS = (torch.ops.qfx.quantized_linear.default,)
DECOMPOSITIONS = {torch.ops.qfx.quantized_linear.default: quantized_linear_ref}


def qfx_op_count(gm: GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in QFX_OPS)


@register_backend(name="qfx")
def qfx_backend(gm: GraphModule, example_inputs, options: dict | None = None):
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    options = dict(options or {})
    decompose = options.pop("decompose", True)
    gm.meta.setdefault("qfx", {})["backend_qfx_ops"] = qfx_op_count(gm)
    # compile_fx *replaces* its table with the one given: extend Inductor's own, never drop it
    decomps = {**select_decomp_table(), **DECOMPOSITIONS} if decompose else None
    return compile_fx(gm, example_inputs, config_patches=options or None, decompositions=decomps)
