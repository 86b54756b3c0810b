"""Which projection weights of a graph the recipe quantizes, and why each other one is left.

A projection weight is a 2-D floating parameter, or a 3-D stack of them (mixture-of-experts
weights), read by a matrix product (aten.linear, mm, addmm, matmul, bmm, baddbmm, einsum, or
any op named like one, e.g. a grouped-mm custom op), directly or through a view. After
`canonicalize_linears` and `annotate_linears`, each is one of:
- planned: a linear with a `LinearPlan`;
- left by the recipe: the LM head (full precision unless a rule quantizes it) or a `skip` /
  `w16` rule;
- unrecognised: read by a product qfx does not rewrite (a shared weight, a batched product),
  so it stays in full precision; `check_coverage` warns naming each, and refuses a recipe
  that quantizes weights when none at all was found.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from qfx.graph import get_attr_tensor, module_path
from qfx.passes.annotate_linears import LinearPlan, is_head

aten = torch.ops.aten
_PRODUCT_NAMES = ("linear", "mm", "matmul", "einsum")  # bmm, addmm, _grouped_mm, grouped_mm_fallback, ...
_VIEWS = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default, aten.mT.default,
          aten.view.default, aten.reshape.default, aten.expand.default, aten.unsqueeze.default, aten.to.dtype,
          aten._to_copy.default, aten.contiguous.default, aten.detach.default, aten.select.int, aten.slice.Tensor,
          aten.index.Tensor, aten.unbind.int}


def _is_product(n: Node) -> bool:
    if getattr(n.target, "namespace", None) == "qfx":  # already quantized (its scales are not weights)
        return False
    name = getattr(n.target, "__name__", str(n.target)).split(".")[0].lower()
    return any(k in name for k in _PRODUCT_NAMES)


@dataclass(frozen=True)
class Projection:
    weight: str  # get_attr target
    path: str  # module path of the reading op
    op: str  # the product reading it, e.g. "linear", "bmm"
    status: str  # "quantized", "head", "skipped" or "unrecognised"


def projections(gm: GraphModule) -> list[Projection]:
    """Every projection weight of `gm` with what the plan does with it, in graph order."""
    found: dict[str, Projection] = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr" or not _is_weight(gm, n.target):
            continue
        for product, via_view in _products_reading(n):
            op = str(product.target).split(".")[-2] if "." in str(product.target) else str(product.target)
            path = module_path(product) or n.target.rpartition(".")[0]
            plan = product.meta.get("qfx")
            if product.target is aten.linear.default and product.args[1] is n and not via_view:
                if isinstance(plan, LinearPlan):
                    status = "quantized"
                else:
                    status = "head" if is_head(product) else "skipped"
            else:
                status = "unrecognised"
            previous = found.get(n.target)
            if previous is None or previous.status == "quantized" and status == "unrecognised":
                found[n.target] = Projection(n.target, path, op, status)
    return list(found.values())


def check_coverage(gm: GraphModule, quantizes_weights: bool) -> str | None:
    """Record `total_linears` in gm.meta["qfx"]; warn about unrecognised projections. Returns
    the refusal (a message) when the recipe quantizes weights and no projection could be planned."""
    found = projections(gm)
    gm.meta.setdefault("qfx", {})["total_linears"] = len(found)
    missed = [p for p in found if p.status == "unrecognised"]
    planned = sum(p.status == "quantized" for p in found)
    if quantizes_weights and planned == 0 and missed:
        return (f"no projection could be quantized: {_listed(missed)} "
                "(a product of activations with a shared or batched weight is not rewritten into a linear)")
    if missed:
        warnings.warn(f"{len(missed)} of {len(found)} projection weights stay in full precision because qfx does not "
                      f"rewrite the product that reads them: {_listed(missed)}", stacklevel=3)
    return None


def _listed(items: list[Projection], most: int = 4) -> str:
    text = ", ".join(f"{p.path or p.weight} ({p.op} reads {p.weight})" for p in items[:most])
    return text + (f" and {len(items) - most} more" if len(items) > most else "")


def _is_weight(gm: GraphModule, target: str) -> bool:
    t = get_attr_tensor(gm, target)
    return isinstance(t, torch.Tensor) and t.ndim in (2, 3) and t.is_floating_point()


def _products_reading(attr: Node) -> list[tuple[Node, bool]]:
    """(product, whether reached through a view) for each matrix product reading `attr`."""
    out, todo, seen = [], [(u, False) for u in attr.users], set()
    while todo:
        n, via_view = todo.pop()
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        if _is_product(n):
            out.append((n, via_view))
        elif n.target in _VIEWS or n.target is operator.getitem:
            todo.extend((u, True) for u in n.users)
    return out
