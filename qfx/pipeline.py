"""The order of passes, defined once: every way of building a quantized graph calls this.

    capture ─▶ canonicalize_linears ─▶ rotate ─▶ quantize_kv_cache ─▶ annotate_linears
        ├─▶ insert_observers                       (prepare: statistics, then convert)
        └─▶ quantize_linears(allocate_only=True)   (tensors come from a file or another graph)

What differs between callers is a parameter, not a copy of the list:
- `compute`: rotations computed and folded into the weights (prepare), or only the graph
  structure laid out (online ops, untied embeddings) for tensors filled in afterwards (load,
  import, the cached generation graph);
- `rotations`: learned or identity rotations instead of the recipe's random Hadamard ones;
- which capture produced the graph (`qfx.capture.capture` for `input_ids -> logits`,
  `qfx.capture.capture_for_cache` for the generation graph): the passes read structure off
  the graph and apply to both.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from qfx.graph import linear_nodes
from qfx.config import Recipe
from qfx.coverage import check_coverage
from qfx.passes.annotate_linears import annotate_linears
from qfx.passes.canonicalize_linears import canonicalize_linears
from qfx.passes.insert_observers import insert_observers
from qfx.passes.quantize_kv import quantize_kv_cache
from qfx.passes.quantize_linears import quantize_linears
from qfx.passes.rotate import rotate_for_recipe


class QuantizeError(RuntimeError):
    """A model or input that the recipe cannot be applied to."""


def lay_out(gm: GraphModule, recipe: Recipe, *, compute: bool = True,
            rotations: dict[str, torch.Tensor] | None = None) -> GraphModule:
    """The recipe's structure on a captured graph: canonical linears, rotations, KV-cache
    quantizers, and a plan on every linear (which spec, which region)."""
    gm = canonicalize_linears(gm)
    if not linear_nodes(gm):
        source = gm.meta.get("qfx", {}).get("source", {})
        raise QuantizeError(f"{source.get('class', 'the model')} has no linear layers with parameter weights; "
                            "qfx quantizes linear / Conv1D projections")
    gm = rotate_for_recipe(gm, recipe, rotations=rotations, compute=compute)
    gm = quantize_kv_cache(gm, recipe.kv)
    gm = annotate_linears(gm, recipe)
    if refusal := check_coverage(gm, quantizes_weights=recipe.weight is not None):
        raise QuantizeError(refusal)
    return gm


def with_observers(gm: GraphModule, recipe: Recipe, rotations=None) -> GraphModule:
    """`lay_out`, then observers where the recipe needs statistics (what `qfx.prepare` returns)."""
    gm = insert_observers(lay_out(gm, recipe, rotations=rotations), recipe)
    gm.meta["qfx"]["recipe"] = recipe.to_dict()
    return gm


def for_tensors(gm: GraphModule, recipe: Recipe) -> GraphModule:
    """`lay_out` without computing anything, then quantized ops over uninitialised tensors of
    the right shapes and dtypes: the caller fills them (from a checkpoint or another graph)."""
    gm = quantize_linears(lay_out(gm, recipe, compute=False), allocate_only=True)
    gm.meta["qfx"]["recipe"] = recipe.to_dict()
    return gm
