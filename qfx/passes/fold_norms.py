"""Fold each RMSNorm's elementwise weight into the linears that read the norm.

Requires: a captured graph whose residual stream `qfx.residual.find_stream` understands
(raises RotationError naming the first problem otherwise).
Guarantees: for every norm with weight w (or `offset + w`), each reader's weight becomes
W diag(offset + w) and the norm's weight becomes the identity (w = 1 - offset), so the norm
is a pure `x / rms(x)` and commutes with rotations of the stream. A weight shared between a
reader and the token embedding (tied embeddings) is untied first: the embedding then reads
its own tensor (`<embedding path>.weight`). Tensors are rebound, never changed in place, so
the model the graph was captured from keeps its weights. The function is unchanged
(exact in float64).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from qfx.capture import get_attr_tensor, module_path, set_attr_tensor
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
    """Give each embedding whose table is also a linear's weight a get_attr of its own
    (holding the same tensor until one of them is rewritten). Returns how many were untied."""
    linear_weights = {w.args[1].target for w in stream.writers} | {r.args[1].target for n in stream.norms
                                                                   for r in n.readers}
    untied = 0
    for emb in stream.embeddings:
        shared = emb.args[0].target
        if shared not in linear_weights:
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


def fold_norms(gm: GraphModule) -> GraphModule:
    stream = checked_stream(gm)
    untie_embeddings(gm, stream)
    return finish(gm, "fold_norms", fold_norm_weights(gm, stream))
