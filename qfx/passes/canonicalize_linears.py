"""Rewrite matmuls against a weight parameter into aten.linear.

Requires: a captured graph. Guarantees: every `addmm(bias, x, W)` / `mm(x, W)` whose W is a
parameter used by that node alone becomes `linear(x, W^T, bias)`, with W replaced in place by
its transpose (GPT-2 style Conv1D stores W as (in, out)); the targets transposed are listed in
`gm.meta["qfx"]["transposed"]` for exporters. Shared weights are left alone.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from qfx.passes import finish

_MATMULS = {torch.ops.aten.addmm.default: (2, 1, 0), torch.ops.aten.mm.default: (1, 0, None)}


def canonicalize_linears(gm: GraphModule) -> GraphModule:
    attr_uses: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            attr_uses[n.target] = attr_uses.get(n.target, 0) + len(n.users)
    rewrites = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _MATMULS or node.kwargs:
            continue
        w_i, x_i, b_i = _MATMULS[node.target]
        w = node.args[w_i]
        if getattr(w, "op", None) != "get_attr" or attr_uses.get(w.target) != 1:
            continue
        if node.target is torch.ops.aten.addmm.default and len(node.args) != 3:
            continue  # addmm with beta/alpha is not a plain linear
        owner_path, _, name = w.target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        param = getattr(owner, name)
        setattr(owner, name, torch.nn.Parameter(param.detach().t().contiguous(), requires_grad=False))
        gm.meta.setdefault("qfx", {}).setdefault("transposed", []).append(w.target)
        args = (node.args[x_i], w) + ((node.args[b_i],) if b_i is not None else ())
        with gm.graph.inserting_before(node):
            lin = gm.graph.call_function(torch.ops.aten.linear.default, args)
        lin.meta = dict(node.meta)
        node.replace_all_uses_with(lin)
        gm.graph.erase_node(node)
        rewrites += 1
    return finish(gm, "canonicalize_linears", rewrites)
