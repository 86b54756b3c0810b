"""Rewrite matmuls against a weight parameter into aten.linear.

Requires: a captured graph. Guarantees: a product of activations x (..., K) with a 2-D
parameter W that only this product reads becomes `linear(x, W', bias)`, whatever form the
model wrote it in:
- `mm(x, W)` / `addmm(b, x, W)` / `matmul(x, W)` with W stored (K, N) (GPT-2's Conv1D):
  W is replaced in place by its transpose, and the targets transposed are listed in
  `gm.meta["qfx"]["transposed"]` for exporters;
- the same ops on a transposed view of W stored (N, K) (`x @ self.weight.T`, `t`,
  `transpose`, `permute`): the view is dropped, W is used as stored;
- a bias added separately (`linear(...) + b`, b a 1-D parameter of N values read only
  there) becomes the linear's bias.
Shared weights (tied embeddings read by a matmul, a parameter read twice) are left alone;
`qfx.passes.coverage` reports what stays unrecognised.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from qfx.graph import get_attr_tensor
from qfx.passes import finish

aten = torch.ops.aten
# op -> (index of the weight operand, index of x, index of the bias or None)
_MATMULS = {aten.addmm.default: (2, 1, 0), aten.mm.default: (1, 0, None), aten.matmul.default: (1, 0, None)}
_TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default, aten.mT.default}


def canonicalize_linears(gm: GraphModule) -> GraphModule:
    uses = _attr_uses(gm)
    rewrites = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _MATMULS or node.kwargs:
            continue
        if node.target is aten.addmm.default and len(node.args) != 3:
            continue  # addmm with beta/alpha is not a plain linear
        w_i, x_i, b_i = _MATMULS[node.target]
        operand = node.args[w_i]
        weight, transposed_view = _weight_of(gm, operand, uses)
        if weight is None:
            continue
        if not transposed_view:  # stored (K, N): store (N, K) instead
            owner_path, _, name = weight.target.rpartition(".")
            owner = gm.get_submodule(owner_path)
            param = getattr(owner, name)
            setattr(owner, name, torch.nn.Parameter(param.detach().t().contiguous(), requires_grad=False))
            gm.meta.setdefault("qfx", {}).setdefault("transposed", []).append(weight.target)
        args = (node.args[x_i], weight) + ((node.args[b_i],) if b_i is not None else ())
        with gm.graph.inserting_before(node):
            lin = gm.graph.call_function(aten.linear.default, args)
        lin.meta = dict(node.meta)
        node.replace_all_uses_with(lin)
        gm.graph.erase_node(node)
        if transposed_view:
            gm.graph.erase_node(operand)
        _fold_bias_add(gm, lin, uses)
        rewrites += 1
    return finish(gm, "canonicalize_linears", rewrites)


def _attr_uses(gm: GraphModule) -> dict[str, int]:
    uses: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            uses[n.target] = uses.get(n.target, 0) + len(n.users)
    return uses


def _is_2d_weight(gm: GraphModule, n, uses: dict[str, int]) -> bool:
    if not isinstance(n, Node) or n.op != "get_attr" or uses.get(n.target) != 1:
        return False
    t = get_attr_tensor(gm, n.target)
    return isinstance(t, torch.Tensor) and t.ndim == 2 and t.is_floating_point()


def _weight_of(gm: GraphModule, operand, uses: dict[str, int]) -> tuple[Node | None, bool]:
    """(W's get_attr, whether the operand is W's transposed view) when the operand is a 2-D
    parameter read only here, or a transposed view of one read only here; else (None, False)."""
    if _is_2d_weight(gm, operand, uses):
        return operand, False
    if (isinstance(operand, Node) and operand.op == "call_function" and operand.target in _TRANSPOSES
            and len(operand.users) == 1 and _swaps_2d(operand) and _is_2d_weight(gm, operand.args[0], uses)):
        return operand.args[0], True
    return None, False


def _swaps_2d(view: Node) -> bool:
    """Whether the view op swaps the two dims of a 2-D tensor."""
    if view.target is aten.transpose.int:
        return {d % 2 for d in view.args[1:3]} == {0, 1}
    if view.target is aten.permute.default:
        return [d % 2 for d in view.args[1]] == [1, 0]
    return True  # t, numpy_T, mT of a 2-D tensor


def _fold_bias_add(gm: GraphModule, lin: Node, uses: dict[str, int]) -> None:
    """linear(x, W) + b -> linear(x, W, b) for a 1-D parameter b of W's rows read only there."""
    if len(lin.args) > 2 or len(lin.users) != 1:
        return
    add = next(iter(lin.users))
    if add.op != "call_function" or add.target is not aten.add.Tensor or add.kwargs or len(add.args) != 2:
        return
    bias = add.args[1] if add.args[0] is lin else add.args[0]
    if not isinstance(bias, Node) or bias.op != "get_attr" or uses.get(bias.target) != 1:
        return
    b, w = get_attr_tensor(gm, bias.target), get_attr_tensor(gm, lin.args[1].target)
    if not isinstance(b, torch.Tensor) or b.ndim != 1 or b.shape[0] != w.shape[0] or b.dtype != w.dtype:
        return
    lin.args = (*lin.args, bias)
    add.replace_all_uses_with(lin)
    gm.graph.erase_node(add)

