"""Insert the observers a recipe needs in front of each planned linear.

Requires: annotate_linears. Guarantees: each planned linear with a static (non-dynamic)
activation spec reads its input through a range observer `<linear path>.input_observer`;
when the recipe's weight method is GPTQ, also through a `<linear path>.hessian_observer`.
Observers pass values through, so the graph computes the same function. RTN with dynamic or
no activation quantization gets no observer.
"""

from __future__ import annotations

from torch.fx import GraphModule

from qfx.capture import get_attr_tensor
from qfx.config import Recipe
from qfx.observers import OBSERVER_TYPES, HessianObserver
from qfx.passes import finish
from qfx.passes.annotate_linears import plans

OBSERVER_SUFFIX = "input_observer"
HESSIAN_SUFFIX = "hessian_observer"


def insert_observers(gm: GraphModule, recipe: Recipe) -> GraphModule:
    inserted = 0
    for node, plan in plans(gm):
        if plan.act is not None and not plan.act.dynamic:
            _observe_input(gm, node, f"{plan.path}.{OBSERVER_SUFFIX}", OBSERVER_TYPES[plan.act.observer](name=plan.path))
            inserted += 1
        if recipe.weight_method == "gptq" and plan.weight.dtype == "int":
            device = get_attr_tensor(gm, plan.weight_target).device
            hessian = HessianObserver(plan.in_features, name=plan.path, device=device)
            _observe_input(gm, node, f"{plan.path}.{HESSIAN_SUFFIX}", hessian)
            inserted += 1
    return finish(gm, "insert_observers", inserted)


def _observe_input(gm: GraphModule, node, target: str, observer) -> None:
    gm.add_submodule(target, observer)
    x = node.args[0]
    with gm.graph.inserting_before(node):
        obs = gm.graph.call_module(target, (x,))
    obs.meta = {k: v for k, v in x.meta.items() if k in ("val", "tensor_meta")}
    node.replace_input_with(x, obs)
