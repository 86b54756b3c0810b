"""Give a graph from `qfx.capture.capture_for_cache` a static KV cache: the generation graph.

    (input_ids (B, S), position_ids (B, S), cache_position (S,), attention_mask (B, length))
        -> logits (B, S, V)

Requires: the quantization passes already applied (`qfx.pipeline`), so that keys and values
enter attention as the recipe makes them: rotated (R3, `qfx::hadamard`) and fake-quantized
(`qfx::quantize_kv`); every attention an `aten.scaled_dot_product_attention` whose keys and
values are the kv heads, repeated for grouped-query attention by views only (HF's repeat_kv).
Guarantees (on a new GraphModule over the same tensors): each attention becomes a `qfx.kv_cache.CachedAttention` submodule
(`kv_cache.<i>`) that writes the new tokens' keys and values at `cache_position` (as codes
when the graph quantized them: the cache is stored at N bits, not simulated) and attends
over all slots with `qfx.kv_cache.cache_mask`; the mask HF built from the sequence is left
dead and removed. Fed a whole sequence at positions 0..S-1 into an empty cache, or the same
sequence one token at a time, the logits are those of the full-sequence graph.
A graph it cannot express is refused with the node that stops it.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

import qfx.ops  # noqa: F401  (registers qfx::hadamard, qfx::quantize_kv)
from qfx.kv_cache import CachedAttention, cache_mask
from qfx.passes import finish
from qfx.regions import ATTENTION

aten = torch.ops.aten
QUANTIZE_KV = torch.ops.qfx.quantize_kv.default
PER_HEAD = (torch.ops.qfx.hadamard.default,)  # per token and head: commute with repeating kv heads
REPEAT = {aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.expand.default,
          aten.unsqueeze.default, aten.slice.Tensor, aten.clone.default, aten.contiguous.default}


class CacheError(ValueError):
    """A graph the cached generation graph cannot express; the message names the node."""


def _shape(n: Node) -> tuple:
    return tuple(n.meta["val"].shape)


def _kv_source(arg: Node, q: Node) -> tuple[Node, list[Node], tuple[int, int] | None]:
    """(the kv-head tensor (B, KVH, S, D), per-head ops between it and attention (first to
    last), (bits, group) of the KV quantizer or None)."""
    quant, per_head = None, []
    n = arg
    if n.op == "call_function" and n.target is QUANTIZE_KV:
        quant, n = (int(n.args[1]), int(n.args[2])), n.args[0]
    while n.op == "call_function" and n.target in PER_HEAD:
        per_head.insert(0, n)
        n = n.args[0]
    chain = [n]
    while chain[-1].op == "call_function" and chain[-1].target in REPEAT and isinstance(chain[-1].args[0], Node):
        chain.append(chain[-1].args[0])
    heads, tail = _shape(q)[1], _shape(arg)[-2:]
    for cand in reversed(chain):  # the earliest 4-D tensor of the chain is the kv heads
        s = _shape(cand) if "val" in cand.meta else ()
        if len(s) == 4 and s[-2:] == tail and heads % s[1] == 0:
            return cand, per_head, quant
    raise CacheError(f"attention reads {arg.name} ({arg.target}), whose kv heads qfx cannot find: "
                     "the cached graph needs keys and values as (batch, kv heads, sequence, head dim)")


def attach_kv_cache(gm: GraphModule, max_batch: int, length: int) -> GraphModule:
    graph = gm.graph
    if not gm.meta.get("qfx", {}).get("positions"):
        raise CacheError("attach_kv_cache takes a graph from qfx.capture.capture_for_cache (positions as an input)")
    attentions = [n for n in graph.nodes if n.op == "call_function" and n.target in ATTENTION]
    if not attentions:
        raise CacheError("the model has no scaled_dot_product_attention to cache "
                         "(load it with attn_implementation='sdpa')")
    for n in list(graph.nodes):  # export's input guards describe the old signature
        if n.op == "call_module" and n.target == "_guards_fn":
            graph.erase_node(n)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        cache_position = graph.placeholder("cache_position")
    with graph.inserting_after(cache_position):
        attention_mask = graph.placeholder("attention_mask")
    with graph.inserting_after(attention_mask):
        mask = graph.call_function(cache_mask, (cache_position, attention_mask))
    gm.add_module("kv_cache", torch.nn.Module())
    for i, attn in enumerate(attentions):
        args = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), attn.args))
        args.update(attn.kwargs)
        if args.get("dropout_p", 0.0) or args.get("enable_gqa"):
            raise CacheError(f"{attn.name}: attention with dropout or enable_gqa is not cached")
        q = args["query"]
        k, k_ops, k_quant = _kv_source(args["key"], q)
        _b, kv_heads, _s, head_dim = _shape(k)
        dtype = args["key"].meta["val"].dtype
        v, v_ops, v_quant = _kv_source(args["value"], q)
        if k_quant != v_quant:
            raise CacheError(f"{attn.name}: keys and values are quantized differently ({k_quant} / {v_quant})")
        for ops, src in ((k_ops, "k"), (v_ops, "v")):  # replay the per-head ops on the kv heads
            node = k if src == "k" else v
            for op in ops:
                with graph.inserting_before(attn):
                    node = graph.call_function(op.target, (node, *op.args[1:]), op.kwargs)
                node.meta = {key: val for key, val in op.meta.items() if key != "val"}
            if src == "k":
                k = node
            else:
                v = node
        device = q.meta["val"].device
        bits, group = k_quant if k_quant else (None, 0)
        layer = CachedAttention(max_batch, kv_heads, length, head_dim, dtype, device, args.get("scale"), bits, group)
        gm.kv_cache.add_module(str(i), layer)
        with graph.inserting_before(attn):
            out = graph.call_module(f"kv_cache.{i}", (q, k, v, cache_position, mask))
        out.meta = {key: val for key, val in attn.meta.items() if key != "val"}
        out.meta["val"] = attn.meta.get("val")
        attn.replace_all_uses_with(out)
        graph.erase_node(attn)
    _remove_dead(graph)
    graph._codegen = torch.fx.graph.CodeGen()  # plain positional inputs, no pytree spec of the old signature
    output = next(n for n in graph.nodes if n.op == "output")
    if isinstance(output.args[0], (tuple, list)) and len(output.args[0]) == 1:
        output.args = (output.args[0][0],)  # the logits, not export's 1-tuple
    cached = GraphModule(gm, graph, class_name="CachedLM")  # without export's input-checking hook
    cached.meta = gm.meta
    cached.meta["qfx"]["kv_cache"] = {"max_batch": max_batch, "length": length}
    return finish(cached, "attach_kv_cache", len(attentions))


def _remove_dead(graph) -> None:
    """Dead code elimination that also drops export's metadata asserts on dead values."""
    while True:
        asserts = [n for n in graph.nodes if n.op == "call_function" and n.target is aten._assert_tensor_metadata.default
                   and all(u is n for u in n.args[0].users)]
        for n in asserts:
            graph.erase_node(n)
        if not graph.eliminate_dead_code() and not asserts:
            return
