"""Backend pass: a norm feeding int8 / fp8-activation kernel linears writes their codes itself.

An "act_quant" kernel linear with dynamic per-token scales quantizes its input inside the GEMM
(every N tile re-reads the rows for their absmax) or in a separate pass before it. When the
input is a norm's output, this pass splits the quantization out as `qfx::quantize_rows`, whose
reference math the backend hands to Inductor; Inductor generates one kernel for the norm (and
the residual add before it) and the per-token absmax, scale and rounding after it, which writes
int8 / e4m3 codes and row scales instead of the bf16 normed rows. The GEMM reads the codes.
Linears that read the same norm (q, k, v; gate, up) share one quantization, so sibling fusion
still sees one input.

A norm is found from data flow: through casts and elementwise products with a (K,) weight (or
a scalar; Gemma's (1 + w) is one), an op that multiplies by a reciprocal square root or divides
by a square root (RMSNorm, and LayerNorm written out) or a fused norm op. Finding one only
decides where the quantization runs: the codes are computed from x itself either way. Inputs
from anything else (attention, the gated MLP product) keep the quantization in the GEMM, where
it costs no extra launch.

Requires: `lower_kernels` has run. Guarantees: the rewritten linears compute the same codes as
`qfx.ops.fake_quantize_activation` (the reference's quantizer), from the same normed values.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from qfx.lowering.kernel_op import KernelLinearArgs
from qfx.lowering.lower_kernels import KERNEL_LINEAR
from qfx.passes import finish

aten = torch.ops.aten
QUANTIZE_ROWS = torch.ops.qfx.quantize_rows.default
CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default, aten.clone.default,
         aten.contiguous.default, aten.alias.default, aten.view.default, aten.reshape.default,
         aten._unsafe_view.default}
NORM_OPS = {aten.native_layer_norm.default, aten.layer_norm.default, aten.rms_norm.default}
PRODUCTS = {aten.mul.Tensor, aten.div.Tensor}


def _value(node):
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, Node) else None


def _through_casts(n):
    while isinstance(n, Node) and n.op == "call_function" and n.target in CASTS:
        n = n.args[0]
    return n


def _is_call(n, target) -> bool:
    n = _through_casts(n)
    return isinstance(n, Node) and n.op == "call_function" and n.target is target


def _normalizes(n: Node) -> bool:
    """n is x * rsqrt(...) or x / sqrt(...)."""
    if n.target is aten.div.Tensor:
        return _is_call(n.args[1], aten.sqrt.default)
    return any(_is_call(a, aten.rsqrt.default) for a in n.args)


def _is_norm(x: Node, k: int, depth: int = 6) -> bool:
    """Whether x (..., K) is a norm's output (module docstring), looking back `depth` products."""
    n = _through_casts(x)
    if not isinstance(n, Node) or n.op != "call_function" or depth == 0:
        return False
    if n.target in NORM_OPS or (n.target is operator.getitem and _through_casts(n.args[0]).target in NORM_OPS):
        return True
    if n.target not in PRODUCTS:
        return False
    if _normalizes(n):
        return True
    for a, other in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
        shape = getattr(_value(other), "shape", None)
        if (not isinstance(other, Node) or shape is not None and tuple(shape) in ((k,), (1,), ())) \
                and _is_norm(a, k, depth - 1):
            return True  # an elementwise weight (or scalar) times a norm's output
    return False


def quantize_in_producer(gm: GraphModule, example_inputs) -> dict[str, int]:
    """Rewrite in place; returns {"act_quant_in_producer": linears rewritten,
    "producer_quantizers": `qfx::quantize_rows` nodes added}."""
    inputs = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs))
    quantized: dict[tuple[Node, bool], tuple[Node, Node]] = {}
    rewritten = 0
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target == KERNEL_LINEAR]:
        a = KernelLinearArgs.of(node)
        x_val = _value(a.x)
        if a.kernel != "act_quant" or a.a_scale is not None or x_val is None or not _is_norm(a.x, a.k):
            continue
        fp8 = inputs[a.data].dtype == torch.float8_e4m3fn
        if (a.x, fp8) not in quantized:
            with gm.graph.inserting_after(a.x):
                q = gm.graph.call_function(QUANTIZE_ROWS, (a.x, fp8))
            with gm.graph.inserting_after(q):
                codes = gm.graph.call_function(operator.getitem, (q, 0))
            with gm.graph.inserting_after(codes):
                scales = gm.graph.call_function(operator.getitem, (q, 1))
            quantized[a.x, fp8] = codes, scales
        codes, scales = quantized[a.x, fp8]
        node.args = tuple(a._replace(x=codes, a_scale=scales, out_dtype=x_val.dtype))
        node.kwargs = {}
        rewritten += 1
    finish(gm, "quantize_in_producer", rewritten)
    return {"act_quant_in_producer": rewritten, "producer_quantizers": len(quantized)}

