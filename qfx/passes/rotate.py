"""QuaRot-style rotations as exact rewrites of the graph.

Requires: a captured RMSNorm decoder (`qfx.residual`), linears as aten.linear.
Guarantees, in float64 the logits are unchanged (tested to 1e-10 relative):

- R1 (D x D) on the residual stream: norm weights folded into their readers (`fold_norms`),
  embedding tables E -> E R1, every linear writing into the stream W -> R1^T W (bias b R1),
  every linear reading a norm W -> W R1 (the LM head included);
- R2 (head_dim x head_dim) per attention block, between v and o: v's rows of each kv head
  -> R2^T W, o's input columns of each head -> W R2 (GQA heads share their kv head's R2);
- R4: an online `qfx.hadamard` op before every other linear that writes into the stream
  (down_proj, fc2), whose weight takes W H;
- R3: `qfx.hadamard` on the queries and keys entering each attention (after RoPE), so a
  quantized KV cache stores rotated keys; q k^T is unchanged.

R1 and R2 default to random-sign Hadamard matrices (`qfx.algorithms.hadamard.orthogonal`,
seeded by the recipe); `rotations` may give them instead ({"R1": (D, D), "R2.<o_proj path>":
(head_dim, head_dim)}, e.g. learned by SpinQuant). With `compute=False` only the graph
structure is rewritten (untied embeddings, online ops): what `qfx.load` needs before it fills
the tensors from a checkpoint. Tensors are rebound, never changed in place.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

import qfx.ops  # noqa: F401  (registers torch.ops.qfx.hadamard)
from qfx.algorithms.hadamard import hadamard_dense, orthogonal
from qfx.capture import get_attr_tensor, module_path
from qfx.passes import finish
from qfx.passes.fold_norms import RotationError, checked_stream, fold_norm_weights, rebind, untie_embeddings
from qfx.regions import ATTENTION, Region, find_regions
from qfx.residual import Stream

HADAMARD = torch.ops.qfx.hadamard.default


def _read(gm: GraphModule, target: str) -> torch.Tensor:
    return get_attr_tensor(gm, target).detach().double()


def _bias_target(lin: Node) -> str | None:
    b = lin.args[2] if len(lin.args) > 2 else None
    return b.target if isinstance(b, Node) and b.op == "get_attr" else None


def rotate_stream(gm: GraphModule, stream: Stream, r1: torch.Tensor) -> None:
    """h -> h R1 on the residual stream (norm weights must already be folded)."""
    q = r1.double()
    for emb in stream.embeddings:
        t = emb.args[0].target
        rebind(gm, t, _read(gm, t) @ q.to(get_attr_tensor(gm, t).device))
    for lin in stream.writers:
        w = _read(gm, lin.args[1].target)
        rebind(gm, lin.args[1].target, q.to(w.device).T @ w)
        if (b := _bias_target(lin)) is not None:
            rebind(gm, b, _read(gm, b) @ q.to(w.device))
    for norm in stream.norms:
        for lin in norm.readers:
            w = _read(gm, lin.args[1].target)
            rebind(gm, lin.args[1].target, w @ q.to(w.device))


def rotate_heads(gm: GraphModule, region: Region, r2: torch.Tensor) -> None:
    """v -> v R2 per kv head, o's input columns of each head -> W R2 (see module docstring)."""
    hd = region.fold.head_dim
    q = r2.double()
    v_rows = sorted(set(region.fold.rows))
    for target in region.fold.targets:  # v's weight (N, K) then its bias (N,)
        t = _read(gm, target).clone()
        for start in v_rows[::hd]:
            block = t[start:start + hd]
            t[start:start + hd] = q.to(t.device).T @ block
        rebind(gm, target, t)
    for target in region.weights:
        w = _read(gm, target).clone()
        for start in range(0, w.shape[1], hd):
            w[:, start:start + hd] = w[:, start:start + hd] @ q.to(w.device)
        rebind(gm, target, w)


def _insert_hadamard(gm: GraphModule, consumer: Node, arg_index: int) -> Node:
    x = consumer.args[arg_index]
    with gm.graph.inserting_before(consumer):
        h = gm.graph.call_function(HADAMARD, (x,))
    h.meta = {k: v for k, v in consumer.meta.items() if k in ("nn_module_stack", "stack_trace")}
    h.meta["val"] = x.meta["val"]
    args = list(consumer.args)
    args[arg_index] = h  # just this argument: x may fill another one too
    consumer.args = tuple(args)
    return h


def rotate(gm: GraphModule, seed: int = 0, rotations: dict[str, torch.Tensor] | None = None,
           compute: bool = True) -> GraphModule:
    """Apply R1, R2, R3, R4 to `gm` (see the module docstring)."""
    rotations = rotations or {}
    stream = checked_stream(gm)
    untie_embeddings(gm, stream)
    regions = {r.linears[0]: r for r in find_regions(gm, stream.writers)}
    heads = [r for r in regions.values() if r.fold is not None and r.fold.head_dim is not None]
    online = [w for w in stream.writers if not any(module_path(w) == r.linears[0] for r in heads)]
    if compute:
        fold_norm_weights(gm, stream)
        r1 = rotations.get("R1")
        r1 = orthogonal(stream.width, seed) if r1 is None else _checked(r1, stream.width, "R1")
        rotate_stream(gm, stream, r1)
        for i, region in enumerate(heads):
            key = f"R2.{region.linears[0]}"
            r2 = rotations.get(key)
            hd = region.fold.head_dim
            r2 = orthogonal(hd, seed + 1 + i) if r2 is None else _checked(r2, hd, key)
            rotate_heads(gm, region, r2)
        for lin in online:
            w = _read(gm, lin.args[1].target)
            rebind(gm, lin.args[1].target, w @ hadamard_dense(w.shape[1]).to(w.device))
        unknown = set(rotations) - {"R1"} - {f"R2.{r.linears[0]}" for r in heads}
        if unknown:
            raise RotationError(f"rotations for parts this model does not have: {sorted(unknown)[:3]}")
    for lin in online:
        _insert_hadamard(gm, lin, 0)
    attentions = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ATTENTION]
    for attn in attentions:  # R3: queries and keys, after RoPE
        _insert_hadamard(gm, attn, 0)
        _insert_hadamard(gm, attn, 1)
    return finish(gm, "rotate", 1 + len(heads) + len(online) + 2 * len(attentions))


def _checked(r: torch.Tensor, n: int, name: str) -> torch.Tensor:
    if tuple(r.shape) != (n, n):
        raise RotationError(f"rotation {name} is {tuple(r.shape)}; this model needs ({n}, {n})")
    r = r.double()
    err = (r @ r.T - torch.eye(n, dtype=torch.float64)).abs().max().item()
    if err > 1e-4:
        raise RotationError(f"rotation {name} is not orthogonal (max |R R^T - I| = {err:.2e})")
    return r


def read_rotations(path: str) -> dict[str, torch.Tensor]:
    """Rotations saved as safetensors ({"R1": ..., "R2.<o_proj path>": ...})."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except FileNotFoundError:
        raise RotationError(f"rotation file {path} does not exist") from None
    except Exception as e:  # safetensors raises its own error types for bad files
        raise RotationError(f"rotation file {path} is not a safetensors file of rotations: {e}") from None


def rotate_for_recipe(gm: GraphModule, recipe, compute: bool = True) -> GraphModule:
    """`rotate` when the recipe's pipeline has a rotation method (see qfx.config.ROTATION_METHODS)."""
    from qfx.config import ROTATION_METHODS

    if not any(m in ROTATION_METHODS for m in recipe.methods):
        return gm
    rotations = read_rotations(recipe.rotation_path) if compute and recipe.rotation_path else None
    return rotate(gm, recipe.rotation_seed, rotations, compute=compute)
