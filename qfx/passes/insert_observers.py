"""Insert the observers a recipe needs in front of each planned linear.

Requires: annotate_linears. Guarantees: each planned linear with a static (non-dynamic)
activation spec reads its input through a range observer `<linear path>.input_observer`;
when the recipe's weight method is GPTQ (GPTAQ), also through a `<linear path>.hessian_observer`
(an asymmetric one), shared by the linears that read the same value with the same weight spec; when the pipeline holds a scale search (SmoothQuant, AWQ), also through a
`<linear path>.channel_observer`.
Observers pass values through, so the graph computes the same function. RTN with dynamic or
no activation quantization gets no observer.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from qfx.graph import get_attr_tensor
from qfx.config import TRANSFORM_METHODS, Recipe
from qfx.observers import OBSERVER_TYPES, AsymmetricHessianObserver, ChannelStatsObserver, HessianObserver
from qfx.passes import finish
from qfx.passes.annotate_linears import plans

OBSERVER_SUFFIX = "input_observer"
HESSIAN_SUFFIX = "hessian_observer"
CHANNEL_SUFFIX = "channel_observer"


def insert_observers(gm: GraphModule, recipe: Recipe) -> GraphModule:
    inserted = 0
    # linears reading the same value with the same weight spec (q, k, v; gate, up) share one
    # Hessian observer: one X^T X per input, and GPTQ solves them together (see quantize_linears)
    shared_hessians: dict[tuple, object] = {}
    for node, plan in plans(gm):
        if plan.act is not None and not plan.act.dynamic:
            _observe_input(gm, node, f"{plan.path}.{OBSERVER_SUFFIX}", OBSERVER_TYPES[plan.act.observer](name=plan.path))
            inserted += 1
        device = get_attr_tensor(gm, plan.weight_target).device
        device = torch.device("cpu") if device.type == "meta" else device  # weights read from disk later
        if recipe.weight_method in ("gptq", "gptaq") and plan.weight.dtype == "int":
            kind = AsymmetricHessianObserver if recipe.weight_method == "gptaq" else HessianObserver
            key = (node.args[0], plan.weight)
            if key in shared_hessians:
                node.replace_input_with(node.args[0], shared_hessians[key])
            else:
                hessian = kind(plan.in_features, name=plan.path, device=device, first_token_weight=recipe.gptq.sink_weight)
                shared_hessians[key] = _observe_input(gm, node, f"{plan.path}.{HESSIAN_SUFFIX}", hessian)
                inserted += 1
        if any(m in TRANSFORM_METHODS for m in recipe.methods):
            _observe_input(gm, node, f"{plan.path}.{CHANNEL_SUFFIX}", ChannelStatsObserver(plan.in_features, plan.path))
            inserted += 1
    return finish(gm, "insert_observers", inserted)


def _observe_input(gm: GraphModule, node, target: str, observer) -> None:
    gm.add_submodule(target, observer)
    x = node.args[0]
    with gm.graph.inserting_before(node):
        obs = gm.graph.call_module(target, (x,))
    obs.meta = {k: v for k, v in x.meta.items() if k in ("val", "tensor_meta")}
    if "nn_module_stack" in node.meta:  # the observer belongs to its linear's block (see qfx.stages), even
        obs.meta["nn_module_stack"] = node.meta["nn_module_stack"]  # when the input comes from the block before
    node.replace_input_with(x, obs)
    return obs
