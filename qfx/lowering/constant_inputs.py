"""Tensors a backend pass creates (packed or quantized weights), fed to the graph as extra inputs.

Dynamo hands the backend a graph whose parameters are inputs; a tensor made while compiling
is neither one of those inputs nor a parameter Dynamo knows of, so it cannot be a get_attr
constant there. Instead each becomes a placeholder after the original ones (with a fake value
from Dynamo's fake mode, as Dynamo's own placeholders carry), and `wrap` appends the tensors to
every call of the compiled function.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node


class ConstantInputs:
    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.nodes: list[Node] = []
        self.tensors: list[torch.Tensor] = []

    def add(self, name: str, tensor: torch.Tensor | None) -> Node | None:
        """A placeholder node standing for `tensor` (None stays None)."""
        if tensor is None:
            return None
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        with self.gm.graph.inserting_after(placeholders[-1]):
            node = self.gm.graph.placeholder(name)
        fake_mode = torch._guards.detect_fake_mode()
        node.meta["example_value"] = node.meta["val"] = (
            fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode is not None else tensor)
        node._dynamo_source = None  # made here, not read from user code (AOT accepts None)
        # a weight: CUDA graphs may keep its address instead of copying it in on every replay
        node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
        self.nodes.append(node)
        self.tensors.append(tensor)
        return node

    def prune(self) -> None:
        """Drop added inputs that no node reads any more (e.g. weights a later pass re-packed)."""
        kept = [(n, t) for n, t in zip(self.nodes, self.tensors) if n.users]
        for n in self.nodes:
            if not n.users:
                self.gm.graph.erase_node(n)
        self.nodes, self.tensors = [n for n, _ in kept], [t for _, t in kept]

    def example_inputs(self, example_inputs) -> list:
        return [*example_inputs, *self.tensors]

    def wrap(self, compiled):
        """The compiled function called with the original inputs only."""
        if not self.tensors:
            return compiled
        extra = list(self.tensors)

        def call(*args):  # Dynamo calls what a backend returns with the inputs unpacked
            return compiled(*args, *extra)

        return call
