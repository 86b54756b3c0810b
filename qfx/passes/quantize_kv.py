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
    return finish(gm, "quantize_kv_cache", insert_kv_quantizers(gm, spec, ATTENTION))


def insert_kv_quantizers(gm: GraphModule, spec: QuantSpec, targets) -> int:
    """Put `qfx.quantize_kv` on the keys and values of every call to one of `targets` (the
    attention function as this graph records it); returns how many were put in."""
    attentions = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]
    if not attentions:
        raise ConfigError("kv: the recipe quantizes the KV cache, but the graph has no scaled_dot_product_attention "
                          "(load the model with attn_implementation='sdpa')")
    group = spec.group_size if spec.granularity == "group" else 0
    for attn in attentions:
        args = list(attn.args)
        for i, name in ((1, "key"), (2, "value")):
            source = args[i] if len(args) > i else attn.kwargs[name]
            with gm.graph.inserting_before(attn):
                q = gm.graph.call_function(torch.ops.qfx.quantize_kv.default, (source, spec.bits, group))
            q.meta = {k: v for k, v in attn.meta.items() if k in ("nn_module_stack", "stack_trace")}
            for key in ("val", "example_value"):  # fake values (export's, Dynamo's): the op's fake gives them
                if source.meta.get(key) is not None:
                    q.meta[key] = torch.ops.qfx.quantize_kv.default(source.meta[key], spec.bits, group)
            if len(args) > i:
                args[i] = q
            else:
                attn.kwargs = {**attn.kwargs, name: q}
        attn.args = tuple(args)
    return 2 * len(attentions)
