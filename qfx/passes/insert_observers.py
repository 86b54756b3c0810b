"""Insert an activation observer in front of every linear that needs a static input range.

Requires: annotate_linears. Guarantees: each planned linear with a static (non-dynamic)
activation spec reads its input through a `call_module` observer named
`<linear path>.input_observer`; nothing else changes, so the graph computes the same values.
Dynamic and weight-only linears get no observer.
"""

from __future__ import annotations

from torch.fx import GraphModule

from qfx.observers import OBSERVER_TYPES
from qfx.passes import finish
from qfx.passes.annotate_linears import plans

OBSERVER_SUFFIX = "input_observer"


def insert_observers(gm: GraphModule) -> GraphModule:
    inserted = 0
    for node, plan in plans(gm):
        if plan.act is None or plan.act.dynamic:
            continue
        target = f"{plan.path}.{OBSERVER_SUFFIX}" if plan.path else OBSERVER_SUFFIX
        gm.add_submodule(target, OBSERVER_TYPES[plan.act.observer](name=plan.path))
        x = node.args[0]
        with gm.graph.inserting_before(node):
            obs = gm.graph.call_module(target, (x,))
        obs.meta = {k: v for k, v in x.meta.items() if k in ("val", "tensor_meta")}
        node.replace_input_with(x, obs)
        inserted += 1
    return finish(gm, "insert_observers", inserted)
