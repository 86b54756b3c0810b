"""Decide, for every linear, how it is quantized: `node.meta["qfx"] = LinearPlan`.

Requires: linears as aten.linear with get_attr weights (run canonicalize_linears first).
Guarantees: each linear the recipe quantizes carries a LinearPlan; the LM head (the linear
from which the graph output is reached without crossing another linear) is marked and,
unless a rule or `quantize_head` says otherwise, left in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule, Node

from qfx.graph import get_attr_tensor, linear_nodes, module_path
from qfx.config import ConfigError, QuantSpec, Recipe
from qfx.passes import finish


@dataclass(frozen=True)
class LinearPlan:
    path: str  # module path, e.g. model.layers.0.mlp.down_proj
    weight_target: str  # get_attr target of the weight
    out_features: int
    in_features: int
    weight: QuantSpec
    act: QuantSpec | None
    is_head: bool


def is_head(node: Node) -> bool:
    """True when the graph output is reachable from `node` without passing another linear."""
    targets = {node.target}
    seen, todo = {node}, list(node.users)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "output":
            return True
        if n.op == "call_function" and n.target in targets:
            continue
        todo.extend(n.users)
    return False


def linear_path(node: Node) -> str:
    """The name a linear's quantized tensors, observers and rules go by: for a parameter named
    `weight`, the path of the module that calls the linear (model.layers.0.mlp.down_proj;
    `lm_head` for a head tied to the embeddings) or else the weight's owner; for any other
    parameter, its own path with `_linear` appended (a root-level `proj` -> `proj_linear`), a
    free name beside it, so two weights of one module never share a name."""
    target = node.args[1].target
    owner, _, name = target.rpartition(".")
    if name == "weight" and (module_path(node) or owner):
        return module_path(node) or owner
    return f"{target}_linear"


def annotate_linears(gm: GraphModule, recipe: Recipe) -> GraphModule:
    planned = 0
    for node in linear_nodes(gm):
        path = linear_path(node)
        head = is_head(node)
        w_spec, a_spec = recipe.resolve(path, head)
        node.meta.pop("qfx", None)
        if w_spec is None:
            if a_spec is not None:
                raise ConfigError(f"{path}: activation quantization needs quantized weights; give it a weight spec")
            continue
        if a_spec is not None and (a_spec.dtype == "fp8") != (w_spec.dtype == "fp8"):
            raise ConfigError(f"{path}: fp8 activations go with fp8 weights (got weights {w_spec.short()}, acts {a_spec.short()})")
        out_f, in_f = get_attr_tensor(gm, node.args[1].target).shape
        node.meta["qfx"] = LinearPlan(path, node.args[1].target, out_f, in_f, w_spec, a_spec, head)
        planned += 1
    return finish(gm, "annotate_linears", planned)


def plans(gm: GraphModule) -> list[tuple[Node, LinearPlan]]:
    """(node, plan) for each annotated linear, in graph order."""
    return [(n, n.meta["qfx"]) for n in gm.graph.nodes if isinstance(n.meta.get("qfx"), LinearPlan)]
