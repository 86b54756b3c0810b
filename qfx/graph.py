"""Helpers that read and edit captured graphs: module paths of nodes, the linears and decoder
blocks of a graph, and the tensors behind `get_attr` targets."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

LINEAR_TARGETS = (torch.ops.aten.linear.default,)


def module_path(node: Node) -> str:
    """Module path of the innermost module that produced `node` ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return clean_path(path)


def clean_path(path: str) -> str:
    # strict-mode exports spell paths as L['self'].model.layers[0]; normalise to dotted form
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return re.sub(r"\[(\d+)\]", r".\1", path)


def linear_nodes(gm: GraphModule) -> list[Node]:
    """aten.linear calls whose weight is a graph attribute (a parameter, not an activation)."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target in LINEAR_TARGETS and _is_attr(n.args[1])
    ]


def _is_attr(n) -> bool:
    return isinstance(n, Node) and n.op == "get_attr"


@dataclass(frozen=True)
class Block:
    """A repeated decoder block: its module path and the linears inside it, in graph order."""

    path: str
    linears: tuple[str, ...]


def decoder_blocks(gm: GraphModule) -> list[Block]:
    """The repeated blocks of the model, found from module paths of the form `<list>.<i>`.

    The outermost indexed container that holds linears is taken as the block list (e.g.
    `model.layers.0`, `transformer.h.3`); nothing is keyed on class or attribute names.
    """
    order: dict[str, list[str]] = {}
    for n in linear_nodes(gm):
        stack = [clean_path(p) for p, _ in (n.meta.get("nn_module_stack") or {}).values()]
        block = next((p for p in stack if re.search(r"\.\d+$", p)), None)
        if block is not None:
            order.setdefault(block, []).append(module_path(n))
    # keep the dominant container (the one with most members), e.g. not a lone "heads.0"
    by_parent: dict[str, list[str]] = {}
    for path in order:
        by_parent.setdefault(path.rsplit(".", 1)[0], []).append(path)
    if not by_parent:
        return []
    parent = max(by_parent, key=lambda p: len(by_parent[p]))
    return [Block(p, tuple(order[p])) for p in by_parent[parent]]


def get_attr_tensor(gm: torch.nn.Module, target: str) -> torch.Tensor:
    """The tensor a get_attr `target` (dotted path) refers to."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr_tensor(root: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Put `value` at dotted path `target`, creating parent modules as needed.

    An existing parameter stays a parameter (frozen); anything else becomes a buffer.
    """
    owner_path, _, name = target.rpartition(".")
    owner = root
    for part in owner_path.split(".") if owner_path else ():
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if name in owner._parameters:
        owner._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
        return
    if hasattr(owner, name) and name not in owner._buffers:
        delattr(owner, name)  # a plain attribute (e.g. a lifted constant): make it a buffer
    owner.register_buffer(name, value)


def retarget_devices(gm: GraphModule, device: torch.device | str) -> GraphModule:
    """Point the ops that create tensors (`arange(..., device=cpu)`, casts to a device) at
    `device`, in `gm` and in the subgraphs of higher-order ops, which are copied first so that
    graphs sharing them are unchanged. A graph captured on one device then runs on another
    once its tensors are moved too (`gm.to(device)`)."""
    device = torch.device(device)
    for name, sub in list(gm.named_children()):
        if isinstance(sub, GraphModule):
            setattr(gm, name, retarget_devices(copy.deepcopy(sub), device))
    from torch.fx.node import map_aggregate

    def swap(a):
        return device if isinstance(a, torch.device) else a

    for n in gm.graph.nodes:  # device arguments, positional (aten.to.device) or keyword
        n.args = map_aggregate(n.args, swap)
        n.kwargs = map_aggregate(n.kwargs, swap)
    gm.recompile()
    return gm
