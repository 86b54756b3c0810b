"""Backend pass: kernel linears that read the same input become one wider kernel linear.

q, k and v (and gate and up) each read the same normed hidden state. At decode sizes each of
their products is too small to keep the GPU's memory system busy, and every launch costs a
few microseconds, so one launch over N = n_q + n_k + n_v is faster than three. The fused
node's weight is the siblings' kernel-layout weights concatenated along N (scales, zero
points and biases likewise); each sibling's result becomes a `narrow` of the fused output.
Exact: every output column is computed from its own weight column, scale and zero, as before.

Requires: `lower_kernels` has run (`qfx::kernel_linear` nodes over the constants it added).
Guarantees: siblings that agree on kernel, bits, group, K, weight layout, the presence of zero
points, the activation-scale node and the rotation factor are replaced by views of one fused node; others are left
as they are. The siblings' own packed weights are no longer read (the backend prunes them).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.fx import GraphModule, Node

from qfx.lowering.constant_inputs import ConstantInputs
from qfx.lowering.kernel_op import KernelLinearArgs
from qfx.lowering.lower_kernels import KERNEL_LINEAR, tensor_behind
from qfx.passes import finish


def _sibling_groups(gm: GraphModule, inputs: dict[Node, torch.Tensor]) -> list[list[Node]]:
    """Kernel linears sharing their input and every setting but N, in graph order."""
    groups: dict[tuple, list[Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != KERNEL_LINEAR:
            continue
        a = KernelLinearArgs.of(node)
        key = (a.x, a.kernel, a.bits, a.group, a.k, inputs[a.data].dtype, a.zero is None, a.a_scale, a.mix)
        groups[key].append(node)
    return [nodes for nodes in groups.values() if len(nodes) > 1]


def _concat_bias(nodes: list[Node], inputs, gm) -> torch.Tensor | None:
    """The siblings' biases end to end, zeros for those without one (None if none has one)."""
    args = [KernelLinearArgs.of(n) for n in nodes]
    biases = [tensor_behind(a.bias, inputs, gm) for a in args]
    present = [b for b in biases if b is not None]
    if not present:
        return None
    ref = present[0]
    return torch.cat([(torch.zeros(a.n, dtype=ref.dtype, device=ref.device) if b is None else b.to(ref.dtype))
                      for a, b in zip(args, biases)])


def fuse_sibling_kernels(gm: GraphModule, example_inputs, constants: ConstantInputs) -> dict[str, int]:
    """Rewrite in place, adding the fused weights to `constants`; returns {"fused": nodes
    replaced, "fused_into": fused nodes made}. `example_inputs` holds a tensor for every
    placeholder, the constants already added included."""
    inputs = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs))
    replaced = made = 0
    for nodes in _sibling_groups(gm, inputs):
        args = [KernelLinearArgs.of(n) for n in nodes]
        first = args[0]
        rows_layout = inputs[first.data].dtype != torch.int32  # "rows": (N, K); "packed": (K / per_word, N)
        data = torch.cat([inputs[a.data] for a in args], dim=0 if rows_layout else 1)
        scale = torch.cat([inputs[a.scale] for a in args], dim=1)  # (G, N)
        zero = None if first.zero is None else torch.cat([inputs[a.zero] for a in args], dim=1)
        bias = _concat_bias(nodes, inputs, gm)
        widths = [a.n for a in args]
        tag = f"_qfx_fused_{made}"
        fields = [constants.add(f"{tag}_{f}", t) for f, t in (("data", data), ("scale", scale), ("zero", zero),
                                                              ("bias", bias))]
        for node, t in zip(fields, (data, scale, zero, bias)):  # later groups look these up too
            if node is not None:
                inputs[node] = t
        with gm.graph.inserting_before(nodes[0]):  # after x; before every sibling's users
            data_node, scale_node, zero_node, bias_node = fields
            fused = gm.graph.call_function(KERNEL_LINEAR, tuple(first._replace(
                data=data_node, scale=scale_node, zero=zero_node, bias=bias_node, n=sum(widths))))
            starts = [sum(widths[:i]) for i in range(len(nodes))]
            views = [gm.graph.call_function(torch.narrow, (fused, -1, s, w)) for s, w in zip(starts, widths)]
        for node, view in zip(nodes, views):
            view.meta = dict(node.meta)
            node.replace_all_uses_with(view)
            gm.graph.erase_node(node)
        replaced += len(nodes)
        made += 1
    finish(gm, "fuse_siblings", replaced)
    return {"fused": replaced, "fused_into": made}
