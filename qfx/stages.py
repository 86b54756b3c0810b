"""Split a captured graph into stages that run one after the other: prefix, decoder blocks, suffix.

Stage 0 holds what comes before the first block (embedding, rotary tables, masks), stages
1..N the decoder blocks (found by `qfx.graph.decoder_blocks`), stage N+1 what follows the
last block (final norm, head). Each stage is its own GraphModule whose get_attr and
call_module targets are the *same* tensors and modules as the source graph's, so observers
see the same objects; rebinding an attribute on a stage (e.g. to a device copy) leaves the
source graph alone. Values crossing stages are named by the source node that produced them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch.fx import Graph, GraphModule, Node

from qfx.graph import clean_path, decoder_blocks


@dataclass
class Stage:
    name: str  # "prefix", the block path (e.g. "model.layers.3"), or "suffix"
    module: GraphModule
    inputs: tuple[str, ...]  # source-node names read, in the stage's placeholder order
    outputs: tuple[str, ...]  # source-node names produced for later stages (or the graph output)


def _block_of(node: Node, block_paths: dict[str, int]) -> int | None:
    for path, _cls in (node.meta.get("nn_module_stack") or {}).values():
        idx = block_paths.get(clean_path(path))
        if idx is not None:
            return idx
    return None


def assign_stages(gm: GraphModule) -> tuple[dict[Node, int], list[str]]:
    """Stage index of each computing node, and the stage names.

    Block nodes go to their block's stage; any other node to the latest stage among its
    inputs, except that nodes after the last block form the suffix. A graph whose blocks do
    not run in order (a node of one block reads a later block's value) is one stage, with a
    warning naming the node.
    """
    blocks = [b.path for b in decoder_blocks(gm)]
    names = ["prefix", *blocks, "suffix"]
    block_index = {p: i + 1 for i, p in enumerate(blocks)}
    last = len(blocks)
    stage: dict[Node, int] = {}
    free: list[Node] = []  # nodes outside every block
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        latest = max((stage[a] for a in node.all_input_nodes if a in stage), default=0)
        own = _block_of(node, block_index)
        if own is None:
            own = latest
            free.append(node)
        if own < latest:  # e.g. a looped model running its first blocks again after later ones
            warnings.warn(f"cannot calibrate block by block: node {node.name} of {names[own]} reads a value of the "
                          f"later block {names[latest]}; calibrating the whole model as one stage (every linear's "
                          "statistics held at once)", stacklevel=3)
            return {n: 1 for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")}, \
                ["prefix", "whole model"]
        stage[node] = own
    # free nodes after the last block whose users all come after it too form the suffix
    for node in reversed(free):
        if last > 0 and stage[node] == last and all(u.op == "output" or stage.get(u) == last + 1 for u in node.users):
            stage[node] = last + 1
    return stage, names


def split_stages(gm: GraphModule) -> list[Stage]:
    """The stages of `gm` in execution order (empty ones dropped)."""
    stage, names = assign_stages(gm)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    later_use: dict[Node, int] = {}  # the last stage reading each value (len(names) = graph output)
    for node in gm.graph.nodes:
        for a in node.all_input_nodes:
            if a.op != "get_attr":
                later_use[a] = max(later_use.get(a, -1), len(names) if node is output else stage[node])
    stages = []
    for s, name in enumerate(names):
        members = [n for n in gm.graph.nodes if stage.get(n) == s]
        if not members:
            continue
        outside = [a for a in dict.fromkeys(a for n in members for a in n.all_input_nodes)
                   if a.op == "placeholder" or (a.op != "get_attr" and stage[a] != s)]
        graph = Graph()
        env: dict[Node, Node] = {}
        for a in outside:
            env[a] = graph.placeholder(a.name)
            # the value's metadata, not its producer's plan: a linear's output read by a later
            # stage must not make that stage's placeholder look like a linear to quantize
            env[a].meta = {k: v for k, v in a.meta.items() if k != "qfx"}
        for n in members:
            for a in n.all_input_nodes:
                if a.op == "get_attr" and a not in env:
                    env[a] = graph.node_copy(a)
            env[n] = graph.node_copy(n, lambda a: env[a])
        outs = [n for n in members if later_use.get(n, -1) > s]
        graph.output(tuple(env[n] for n in outs))
        module = GraphModule(gm, graph, class_name=f"Stage{s}")
        stages.append(Stage(name, module, tuple(a.name for a in outside), tuple(n.name for n in outs)))
    return stages
