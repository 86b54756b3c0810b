"""Fold each RMSNorm's elementwise weight into the linears that read the norm.

Requires: a captured graph whose residual stream `qfx.residual.find_stream` understands
(raises RotationError naming the first problem otherwise).
Guarantees: for every norm with weight w (or `offset + w`), each reader's weight becomes
W diag(offset + w) and the norm's weight becomes the identity (w = 1 - offset), so the norm
is a pure `x / rms(x)` and commutes with rotations of the stream. LayerNorms (OPT) first
have the stream centred (embedding rows and writers' outputs made zero-mean, which their
mean subtraction makes invisible) and become RMSNorms, their bias folded into the readers'
biases. A weight shared between a
reader and the token embedding (tied embeddings) is untied first: the embedding then reads
its own tensor (`<embedding path>.weight`). Tensors are rebound, never changed in place, so
the model the graph was captured from keeps its weights. The function is unchanged
(exact in float64).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from qfx.graph import get_attr_tensor, module_path, set_attr_tensor
from qfx.passes import finish
from qfx.residual import Stream, find_stream


class RotationError(ValueError):
    """A model part that rotations or norm folding cannot rewrite exactly; the message names it."""


def checked_stream(gm: GraphModule) -> Stream:
    stream = find_stream(gm)
    if stream.problems:
        more = f" (and {len(stream.problems) - 1} more)" if len(stream.problems) > 1 else ""
        raise RotationError(f"cannot rotate this model exactly: {stream.problems[0]}{more}")
    return stream


def untie_embeddings(gm: GraphModule, stream: Stream) -> int:
    """Give each embedding whose table anything else reads (a tied LM head, on the stream or
    behind a head of its own as in XLM-RoBERTa-XL) a get_attr of its own, holding the same
    tensor until one of them is rewritten. Returns how many were untied."""
    untied = 0
    for emb in stream.embeddings:
        shared = emb.args[0].target
        if not any(u is not emb for n in gm.graph.nodes if n.op == "get_attr" and n.target == shared
                   for u in n.users):
            continue
        own = f"{module_path(emb) or emb.name}.weight"
        if own == shared:
            own = f"{shared}_embedding"
        set_attr_tensor(gm, own, get_attr_tensor(gm, shared))
        with gm.graph.inserting_before(emb):
            node = gm.graph.get_attr(own)
        emb.replace_input_with(emb.args[0], node)
        untied += 1
    if untied:
        gm.meta.setdefault("qfx", {})["untied"] = True
    return untied


def rebind(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    """Replace the tensor at `target` by `value` in the old tensor's dtype and device."""
    old = get_attr_tensor(gm, target)
    set_attr_tensor(gm, target, value.to(device=old.device, dtype=old.dtype))


def fold_norm_weights(gm: GraphModule, stream: Stream) -> int:
    folded = 0
    for norm in stream.norms:
        if norm.weight is None:
            continue
        w = get_attr_tensor(gm, norm.weight).detach().double() + norm.offset
        for reader in norm.readers:
            target = reader.args[1].target
            rebind(gm, target, get_attr_tensor(gm, target).detach().double() * w.to(get_attr_tensor(gm, target).device))
        rebind(gm, norm.weight, torch.full_like(w, 1.0 - norm.offset))
        folded += 1
    return folded


def center_stream(gm: GraphModule, stream: Stream) -> None:
    """Make every token's residual vector zero-mean: embedding rows and writers' outputs
    (W -> W - mean over its D output rows, b -> b - mean(b)) lose their mean. Only LayerNorms
    read the stream and they subtract that mean anyway, so the function is unchanged."""
    for emb in stream.embeddings:
        e = get_attr_tensor(gm, emb.args[0].target).detach().double()
        rebind(gm, emb.args[0].target, e - e.mean(-1, keepdim=True))
    for lin in stream.writers:
        w = get_attr_tensor(gm, lin.args[1].target).detach().double()
        rebind(gm, lin.args[1].target, w - w.mean(0, keepdim=True))
        b = lin.args[2] if len(lin.args) > 2 else None
        if isinstance(b, Node):
            t = get_attr_tensor(gm, b.target).detach().double()
            rebind(gm, b.target, t - t.mean())


def _reader_bias(gm: GraphModule, lin: Node) -> str:
    """The get_attr target of `lin`'s bias, created as zeros when it has none."""
    b = lin.args[2] if len(lin.args) > 2 else None
    if isinstance(b, Node):
        return b.target
    w_target = lin.args[1].target
    target = (w_target[: -len(".weight")] if w_target.endswith(".weight") else w_target) + ".bias"
    w = get_attr_tensor(gm, w_target)
    set_attr_tensor(gm, target, torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    with gm.graph.inserting_before(lin):
        node = gm.graph.get_attr(target)
    lin.args = (lin.args[0], lin.args[1], node)
    return target


def layer_norms_to_rms(gm: GraphModule, stream: Stream, compute: bool = True) -> int:
    """Replace each LayerNorm on a (centred) stream by `x * rsqrt(mean(x^2) + eps)`, its weight
    and bias folded into the readers (W diag(w), reader bias + W b). Run `center_stream` first."""
    aten = torch.ops.aten
    converted = 0
    for norm in [n for n in stream.norms if n.kind == "layer"]:
        ln, x = norm.node, norm.node.args[0]
        eps = ln.args[4] if len(ln.args) > 4 else 1e-5
        val = ln.meta["val"]
        with gm.graph.inserting_before(ln):
            sq = gm.graph.call_function(aten.pow.Tensor_Scalar, (x, 2))
            ms = gm.graph.call_function(aten.mean.dim, (sq, [-1], True))
            plus = gm.graph.call_function(aten.add.Tensor, (ms, eps))
            r = gm.graph.call_function(aten.rsqrt.default, (plus,))
            out = gm.graph.call_function(aten.mul.Tensor, (x, r))
        for n, v in ((sq, val), (ms, val.mean(-1, keepdim=True)), (plus, val.mean(-1, keepdim=True)),
                     (r, val.mean(-1, keepdim=True)), (out, val)):
            n.meta = {k: ln.meta[k] for k in ("nn_module_stack", "stack_trace") if k in ln.meta}
            n.meta["val"] = v
        ln.replace_all_uses_with(out)
        gm.graph.erase_node(ln)
        for reader in norm.readers:
            w_target = reader.args[1].target
            w = get_attr_tensor(gm, w_target).detach().double()
            bias = _reader_bias(gm, reader) if norm.bias is not None else None
            if not compute:
                continue
            if norm.bias is not None:
                b = get_attr_tensor(gm, norm.bias).detach().double().to(w.device)
                rebind(gm, bias, get_attr_tensor(gm, bias).detach().double() + w @ b)
            if norm.weight is not None:
                g = get_attr_tensor(gm, norm.weight).detach().double().to(w.device)
                rebind(gm, w_target, w * g)
        converted += 1
    for n in list(gm.graph.nodes):  # the LayerNorms' parameters are read by nothing now
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
    return converted


def prepare_stream(gm: GraphModule, compute: bool = True) -> Stream:
    """The checked stream with tied embeddings untied and LayerNorms turned into RMSNorms
    (centring the stream first); `compute=False` rewrites only the graph (for loading)."""
    stream = checked_stream(gm)
    untie_embeddings(gm, stream)
    if any(n.kind == "layer" for n in stream.norms):
        if compute:
            center_stream(gm, stream)
        layer_norms_to_rms(gm, stream, compute)
        gm.graph.lint()
        gm.recompile()
        stream = checked_stream(gm)
    return stream


def fold_norms(gm: GraphModule) -> GraphModule:
    layer_norms = sum(n.kind == "layer" for n in checked_stream(gm).norms)  # folded while converted
    stream = prepare_stream(gm)
    return finish(gm, "fold_norms", layer_norms + fold_norm_weights(gm, stream))
