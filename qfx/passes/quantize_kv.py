"""Quantize the KV cache: keys and values pass through `qfx.quantize_kv` before attention.

Requires: a captured graph with `aten.scaled_dot_product_attention` (HF's sdpa attention);
run after `rotate`, so keys are quantized after their R3 rotation.
Guarantees: each attention reads its keys and values as a KV cache quantized per the
recipe's `kv` spec would give them back (asymmetric int, one range per token, head and group
of the head dim). Returns the graph unchanged when the recipe has no `kv` spec.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

import qfx.ops  # noqa: F401  (registers torch.ops.qfx.quantize_kv)
from qfx.config import ConfigError, QuantSpec
from qfx.passes import finish
from qfx.regions import ATTENTION


def quantize_kv_cache(gm: GraphModule, spec: QuantSpec | None) -> GraphModule:
    if spec is None:
        return gm
    attentions = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ATTENTION]
    if not attentions:
        raise ConfigError("kv: the recipe quantizes the KV cache, but the graph has no scaled_dot_product_attention "
                          "(load the model with attn_implementation='sdpa')")
    group = spec.group_size if spec.granularity == "group" else 0
    for attn in attentions:
        args = list(attn.args)
        for i in (1, 2):  # keys, values
            with gm.graph.inserting_before(attn):
                q = gm.graph.call_function(torch.ops.qfx.quantize_kv.default, (args[i], spec.bits, group))
            q.meta = {k: v for k, v in attn.meta.items() if k in ("nn_module_stack", "stack_trace")}
            q.meta["val"] = args[i].meta["val"]
            args[i] = q
        attn.args = tuple(args)
    return finish(gm, "quantize_kv_cache", 2 * len(attentions))
